//! One array of a zarr store, read by ranges of its first dimension into the element types the
//! import uses (whatever numeric type the store holds), through a cache of decoded chunks so that
//! consecutive ranges of one chunk decode it once.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use zarrs::array::chunk_cache::{ChunkCache, ChunkCacheDecodedLruChunkLimit};
use zarrs::array::data_type::{
    BoolDataType, FixedLengthUTF32DataType, Float16DataType, Float32DataType, Float64DataType, Int8DataType,
    Int16DataType, Int32DataType, Int64DataType, StringDataType, UInt8DataType, UInt16DataType, UInt32DataType,
    UInt64DataType,
};
use zarrs::array::{
    Array, ArrayShardedExt, ArrayShardedReadableExt, ArrayShardedReadableExtCache, ArraySubset, CodecOptions,
    ElementOwned,
};
use zarrs::storage::ReadableStorageTraits;

use crate::error::{Error, Result};

/// Largest decoded chunk (of an unsharded array; an inner chunk of a sharded one) an array may
/// declare: reading a range decodes whole chunks, so this bounds the memory a read takes
/// whatever the store declares. anndata's chunks are a few MB.
const MAX_CHUNK_BYTES: u64 = 512 << 20;
/// Bytes counted per element of a variable-length type (a string) when bounding its chunks.
const VARIABLE_ELEMENT_BYTES: u64 = 16;
/// Bytes a string element of a chunk may take when decoded (with its length prefix): a chunk of
/// strings that decodes to more is refused as a compression bomb.
const MAX_TEXT_BYTES: u64 = 4096;
/// Decoded chunks kept per array: the one being read and the next.
const CACHED_CHUNKS: u64 = 2;

/// What an array's elements are, as the readers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Elements {
    Bool,
    Int,
    UInt,
    /// Floats of this many bytes (2, 4 or 8).
    Float(u8),
    Text,
    /// Anything else (complex numbers, dates, structured records, ...), by its zarr name.
    Other,
}

enum Cache {
    Chunks(ChunkCacheDecodedLruChunkLimit),
    Shards(ArrayShardedReadableExtCache),
}

/// An array of the store, read by ranges.
pub(super) struct ZArray {
    root: PathBuf,
    name: String,
    array: Arc<Array<dyn ReadableStorageTraits>>,
    cache: Cache,
    elements: Elements,
    /// Rows of a chunk (a shard's inner chunk): reads are split at multiples of it, so that
    /// each piece decodes within one chunk (zarrs 0.23 panics merging variable-length elements
    /// of several cached chunks).
    step: u64,
    /// Chunks (shards of a sharded array) the grid has, and those with no file: zarr leaves out
    /// a chunk that holds only the fill value, and a damaged or partial copy loses some.
    chunks: u64,
    missing: u64,
}

impl std::fmt::Debug for ZArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZArray").field("name", &self.name).field("shape", &self.array.shape()).finish()
    }
}

fn elements_of(array: &Array<dyn ReadableStorageTraits>) -> Elements {
    let t = array.data_type();
    if t.is::<BoolDataType>() {
        Elements::Bool
    } else if t.is::<Int8DataType>() || t.is::<Int16DataType>() || t.is::<Int32DataType>() || t.is::<Int64DataType>() {
        Elements::Int
    } else if t.is::<UInt8DataType>()
        || t.is::<UInt16DataType>()
        || t.is::<UInt32DataType>()
        || t.is::<UInt64DataType>()
    {
        Elements::UInt
    } else if t.is::<Float16DataType>() {
        Elements::Float(2)
    } else if t.is::<Float32DataType>() {
        Elements::Float(4)
    } else if t.is::<Float64DataType>() {
        Elements::Float(8)
    } else if t.is::<StringDataType>() || t.is::<FixedLengthUTF32DataType>() {
        Elements::Text
    } else {
        Elements::Other
    }
}

impl ZArray {
    /// Opens array `name` (a path in the store, `obs/cell_type/codes`) of the store at `root`.
    pub(super) fn open(
        root: &Path,
        storage: &Arc<dyn ReadableStorageTraits>,
        guard: &super::guard::GuardedStore,
        name: &str,
    ) -> Result<ZArray> {
        let opened = crate::crew::catch_quietly(|| Array::open(Arc::clone(storage), &format!("/{name}"))).map_err(
            |message| Error::Unsupported {
                path: root.to_owned(),
                reason: format!("{name}: damaged metadata (the zarr library failed on it: {message})"),
            },
        )?;
        let array = opened.map_err(|e| Error::Unsupported { path: root.to_owned(), reason: format!("{name}: {e}") })?;
        let array = Arc::new(array);
        // Bound what one read decodes: the chunk (or a shard's inner chunk).
        let chunk = match array.effective_subchunk_shape() {
            Some(inner) => inner.iter().map(|d| d.get()).collect::<Vec<_>>(),
            None => array
                .chunk_shape(&vec![0; array.dimensionality()])
                .map(|s| s.iter().map(|d| d.get()).collect::<Vec<_>>())
                .unwrap_or_default(),
        };
        let element = array.data_type().fixed_size().map_or(VARIABLE_ELEMENT_BYTES, |s| s as u64);
        let bytes = chunk.iter().try_fold(element, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX);
        // What a chunk may decode to: its elements' bytes; strings at most MAX_TEXT_BYTES each.
        let decoded = match array.data_type().fixed_size() {
            Some(_) => bytes,
            None => chunk.iter().try_fold(MAX_TEXT_BYTES, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX),
        };
        guard.bound(name, decoded.min(MAX_CHUNK_BYTES));
        if bytes > MAX_CHUNK_BYTES {
            return Err(Error::Unsupported {
                path: root.to_owned(),
                reason: format!(
                    "{name}: chunks of {chunk:?} elements ({bytes} bytes decoded) exceed the {} MiB a read may take; \
                     rewrite the store with smaller chunks",
                    MAX_CHUNK_BYTES >> 20
                ),
            });
        }
        let cache = match array.is_sharded() {
            true => Cache::Shards(ArrayShardedReadableExtCache::new(&array)),
            false => Cache::Chunks(ChunkCacheDecodedLruChunkLimit::new(Arc::clone(&array), CACHED_CHUNKS)),
        };
        let elements = elements_of(&array);
        let step = chunk.first().copied().unwrap_or(u64::MAX).max(1);
        let chunks = array.chunk_grid_shape().iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX);
        Ok(ZArray { root: root.to_owned(), name: name.to_owned(), array, cache, elements, step, chunks, missing: 0 })
    }

    /// The array, knowing that `stored` chunk files are in its directory.
    pub(super) fn with_stored_chunks(mut self, stored: u64) -> ZArray {
        self.missing = self.chunks.saturating_sub(stored);
        self
    }

    /// Chunks of the grid (shards of a sharded array).
    pub(super) fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Chunks without a file, read as the fill value.
    pub(super) fn missing_chunks(&self) -> u64 {
        self.missing
    }

    /// The array's path in the store.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Its shape.
    pub(super) fn shape(&self) -> &[u64] {
        self.array.shape()
    }

    /// Its length (first dimension).
    pub(super) fn len(&self) -> u64 {
        self.shape().first().copied().unwrap_or(0)
    }

    /// What its elements are.
    pub(super) fn elements(&self) -> Elements {
        self.elements
    }

    /// Its data type's name, for messages.
    pub(super) fn type_name(&self) -> String {
        self.array.data_type().to_string()
    }

    fn error(&self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(&self.root, format!("{}: {what}", self.name))
    }

    fn unsupported(&self, expected: &str) -> Error {
        Error::Unsupported {
            path: self.root.to_owned(),
            reason: format!("{}: elements of type {}, expected {expected}", self.name, self.type_name()),
        }
    }

    /// Elements `rows` (of a 1-D array; rows of a 2-D one, every column), as stored.
    fn get<T: ElementOwned>(&self, rows: &Range<u64>) -> Result<Vec<T>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.end > self.len() {
            return Err(self.error(format!("rows {}..{} beyond its {} rows", rows.start, rows.end, self.len())));
        }
        let options = CodecOptions::default();
        let mut out: Vec<T> = Vec::new();
        let mut start = rows.start;
        while start < rows.end {
            let end = ((start / self.step).saturating_add(1).saturating_mul(self.step)).min(rows.end);
            let ranges: Vec<Range<u64>> =
                std::iter::once(start..end).chain(self.shape().iter().skip(1).map(|&d| 0..d)).collect();
            let subset = ArraySubset::new_with_ranges(&ranges);
            // The library indexes a damaged chunk's bytes as they say (a string's length past the
            // chunk's end) and panics: caught here, an error naming the array and rows.
            let read = crate::crew::catch_quietly(|| match &self.cache {
                Cache::Chunks(cache) => cache.retrieve_array_subset::<Vec<T>>(&subset, &options),
                Cache::Shards(cache) => {
                    self.array.retrieve_array_subset_sharded_opt::<Vec<T>>(cache, &subset, &options)
                }
            })
            .map_err(|message| {
                self.error(format!("rows {start}..{end}: a damaged chunk (the zarr library failed on it: {message})"))
            })?;
            let piece = read.map_err(|e| self.error(format!("rows {start}..{end}: {e}")))?;
            match out.is_empty() {
                true => out = piece,
                false => out.extend(piece),
            }
            start = end;
        }
        Ok(out)
    }

    /// Elements `rows` as signed integers (booleans as 0 and 1; unsigned beyond i64 refused).
    pub(super) fn ints(&self, rows: Range<u64>) -> Result<Vec<i64>> {
        let t = self.array.data_type();
        Ok(if t.is::<Int8DataType>() {
            self.get::<i8>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<Int16DataType>() {
            self.get::<i16>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<Int32DataType>() {
            self.get::<i32>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<Int64DataType>() {
            self.get::<i64>(&rows)?
        } else if t.is::<UInt8DataType>() {
            self.get::<u8>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<UInt16DataType>() {
            self.get::<u16>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<UInt32DataType>() {
            self.get::<u32>(&rows)?.into_iter().map(i64::from).collect()
        } else if t.is::<UInt64DataType>() {
            let values = self.get::<u64>(&rows)?;
            if let Some(at) = values.iter().position(|&v| v > i64::MAX as u64) {
                return Err(self.error(format!(
                    "row {}: {} is beyond the 64-bit signed range",
                    rows.start + at as u64,
                    values[at]
                )));
            }
            values.into_iter().map(|v| v as i64).collect()
        } else if t.is::<BoolDataType>() {
            self.get::<bool>(&rows)?.into_iter().map(i64::from).collect()
        } else {
            return Err(self.unsupported("integers"));
        })
    }

    /// Elements `rows` as unsigned integers (a column of `uint` type).
    pub(super) fn uints(&self, rows: Range<u64>) -> Result<Vec<u64>> {
        let t = self.array.data_type();
        Ok(if t.is::<UInt8DataType>() {
            self.get::<u8>(&rows)?.into_iter().map(u64::from).collect()
        } else if t.is::<UInt16DataType>() {
            self.get::<u16>(&rows)?.into_iter().map(u64::from).collect()
        } else if t.is::<UInt32DataType>() {
            self.get::<u32>(&rows)?.into_iter().map(u64::from).collect()
        } else if t.is::<UInt64DataType>() {
            self.get::<u64>(&rows)?
        } else {
            return Err(self.unsupported("unsigned integers"));
        })
    }

    /// Elements `rows` as f64 (any number; booleans as 0 and 1).
    pub(super) fn doubles(&self, rows: Range<u64>) -> Result<Vec<f64>> {
        let t = self.array.data_type();
        Ok(if t.is::<Float64DataType>() {
            self.get::<f64>(&rows)?
        } else if t.is::<Float32DataType>() {
            self.get::<f32>(&rows)?.into_iter().map(f64::from).collect()
        } else if t.is::<Float16DataType>() {
            self.get::<f16>(&rows)?.into_iter().map(f64::from).collect()
        } else if matches!(self.elements, Elements::Int | Elements::UInt | Elements::Bool) {
            self.ints_or_uints_as_f64(rows)?
        } else {
            return Err(self.unsupported("numbers"));
        })
    }

    fn ints_or_uints_as_f64(&self, rows: Range<u64>) -> Result<Vec<f64>> {
        match self.array.data_type().is::<UInt64DataType>() {
            true => Ok(self.uints(rows)?.into_iter().map(|v| v as f64).collect()),
            false => Ok(self.ints(rows)?.into_iter().map(|v| v as f64).collect()),
        }
    }

    /// Elements `rows` as f32, the store's value type (any number; booleans as 0 and 1); for a
    /// 2-D array, whole rows, row-major.
    pub(super) fn floats(&self, rows: Range<u64>) -> Result<Vec<f32>> {
        let t = self.array.data_type();
        Ok(if t.is::<Float32DataType>() {
            self.get::<f32>(&rows)?
        } else if t.is::<Float64DataType>() {
            self.get::<f64>(&rows)?.into_iter().map(|v| v as f32).collect()
        } else if t.is::<Float16DataType>() {
            self.get::<f16>(&rows)?.into_iter().map(f32::from).collect()
        } else if matches!(self.elements, Elements::Int | Elements::UInt | Elements::Bool) {
            self.ints_or_uints_as_f64(rows)?.into_iter().map(|v| v as f32).collect()
        } else {
            return Err(self.unsupported("numbers"));
        })
    }

    /// Elements `rows` as booleans.
    pub(super) fn bools(&self, rows: Range<u64>) -> Result<Vec<bool>> {
        match self.elements {
            Elements::Bool => self.get::<bool>(&rows),
            Elements::Int | Elements::UInt => Ok(self.ints(rows)?.into_iter().map(|v| v != 0).collect()),
            _ => Err(self.unsupported("booleans")),
        }
    }

    /// Elements `rows` as strings.
    pub(super) fn strings(&self, rows: Range<u64>) -> Result<Vec<String>> {
        match self.elements {
            Elements::Text => self.get::<String>(&rows),
            _ => Err(self.unsupported("strings")),
        }
    }
}

/// A matrix's arrays read by the shared reader ([`crate::anndata::StoredMatrix`]); the array
/// names itself in errors.
impl crate::anndata::MatrixArray for ZArray {
    fn len(&self) -> u64 {
        ZArray::len(self)
    }

    fn ints(&self, range: Range<u64>, _what: &dyn Fn() -> String) -> Result<Vec<i64>> {
        ZArray::ints(self, range)
    }

    fn floats(&self, range: Range<u64>, _what: &dyn Fn() -> String) -> Result<Vec<f32>> {
        ZArray::floats(self, range)
    }
}

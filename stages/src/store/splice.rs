//! A Parquet table extended by more rows without rewriting the rows it holds: the file is copied
//! byte for byte, the new row groups (from a file written with the same columns) follow it, and
//! a new footer lists both. Readers find a Parquet file's row groups through the footer at its end,
//! so the old footer, now in the middle, is never read; the copy's first bytes are the old file
//! exactly, so the old version's checksum still checks them (an appended store's `obs.parquet`).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::sync::Arc;

use parquet::file::metadata::{FileMetaData, ParquetMetaData, ParquetMetaDataReader, ParquetMetaDataWriter};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::error::{Error, Result};

/// Bytes of the magic that starts (and ends) a Parquet file.
const MAGIC: u64 = 4;

/// Properties for the new rows of a spliced table: no page index (its page locations are
/// absolute offsets inside the index, which moving the pages would break).
pub(crate) fn appendix_properties(base: WriterProperties) -> WriterProperties {
    base.into_builder().set_offset_index_disabled(true).set_statistics_enabled(EnabledStatistics::Chunk).build()
}

fn metadata(path: &Path, file: &File) -> Result<ParquetMetaData> {
    ParquetMetaDataReader::new().parse_and_finish(file).map_err(|e| Error::parquet(path, e))
}

/// Writes to `out` the Parquet file `old` (its first `old_len` bytes) followed by the row groups
/// of `new` and a footer listing both; `out` gets the schema and key-value metadata of `new`
/// (an obs table whose categories grew). Returns the bytes of `out`.
pub(crate) fn splice(
    (old_path, old, old_len): (&Path, &File, u64),
    (new_path, new): (&Path, &File),
    (out_path, out): (&Path, &mut File),
) -> Result<u64> {
    let before = metadata(old_path, old)?;
    let added = metadata(new_path, new)?;
    let (theirs, ours) = (before.file_metadata().schema_descr(), added.file_metadata().schema_descr());
    if theirs.root_schema() != ours.root_schema() {
        return Err(Error::InvalidInput(format!(
            "{}: the rows added have other Parquet columns than {}; the table must be written again",
            new_path.display(),
            old_path.display()
        )));
    }
    let new_len = new.metadata().map_err(|e| Error::io(new_path, e))?.len();
    let mut tail = [0u8; 8];
    let mut reader = new;
    reader.seek(SeekFrom::Start(new_len.saturating_sub(8))).map_err(|e| Error::io(new_path, e))?;
    reader.read_exact(&mut tail).map_err(|e| Error::io(new_path, e))?;
    let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    let pages_end = new_len
        .checked_sub(8 + footer)
        .filter(|&end| end >= MAGIC)
        .ok_or_else(|| Error::corrupt(new_path, "a footer longer than the file"))?;
    // The old file as it is, then the new pages.
    let mut old_reader = old;
    old_reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(old_path, e))?;
    let copied = std::io::copy(&mut old_reader.take(old_len), out).map_err(|e| Error::io(out_path, e))?;
    if copied != old_len {
        return Err(Error::corrupt(old_path, format!("{copied} bytes, expected {old_len}")));
    }
    reader.seek(SeekFrom::Start(MAGIC)).map_err(|e| Error::io(new_path, e))?;
    std::io::copy(&mut reader.take(pages_end - MAGIC), out).map_err(|e| Error::io(out_path, e))?;
    // Every offset of the new row groups moves by where their pages now start.
    let delta = i64::try_from(old_len).unwrap_or(i64::MAX) - MAGIC as i64;
    let shift = |o: Option<i64>| o.map(|o| o + delta);
    let mut row_groups = before.row_groups().to_vec();
    for (i, group) in added.row_groups().iter().enumerate() {
        let mut builder = group.clone().into_builder();
        let columns = builder
            .take_columns()
            .into_iter()
            .map(|c| {
                let data = c.data_page_offset() + delta;
                let (dictionary, index) = (shift(c.dictionary_page_offset()), shift(c.index_page_offset()));
                let bloom = shift(c.bloom_filter_offset());
                c.into_builder()
                    .set_data_page_offset(data)
                    .set_dictionary_page_offset(dictionary)
                    .set_index_page_offset(index)
                    .set_bloom_filter_offset(bloom)
                    .build()
            })
            .collect::<parquet::errors::Result<Vec<_>>>()
            .map_err(|e| Error::parquet(new_path, e))?;
        let mut builder = builder.set_column_metadata(columns).set_ordinal((before.num_row_groups() + i) as i32);
        if let Some(offset) = group.file_offset() {
            builder = builder.set_file_offset(offset + delta);
        }
        row_groups.push(builder.build().map_err(|e| Error::parquet(new_path, e))?);
    }
    let file = added.file_metadata();
    let rows = before.file_metadata().num_rows() + file.num_rows();
    let footer = FileMetaData::new(
        file.version(),
        rows,
        file.created_by().map(str::to_owned),
        file.key_value_metadata().cloned(),
        Arc::clone(&file.schema_descr_ptr()),
        file.column_orders().cloned(),
    );
    let spliced = ParquetMetaData::new(footer, row_groups);
    ParquetMetaDataWriter::new(&mut *out, &spliced).finish().map_err(|e| Error::parquet(out_path, e))?;
    out.flush().map_err(|e| Error::io(out_path, e))?;
    out.stream_position().map_err(|e| Error::io(out_path, e))
}

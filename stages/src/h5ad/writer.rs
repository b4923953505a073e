//! Writing a CSR `.h5ad` by appending row chunks.

use crate::output::OutputKind;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_schema::SchemaRef;
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File};

use super::dataframe::{DataFrameWriter, append, appendable, encoding, strings_to_h5};
use super::{DEG_GENE, DEG_GROUP, DEG_RANK};
use crate::counts_csr::CsrBatch;
use crate::error::{Error, Result};

/// Compression of the datasets written to an `.h5ad`.
/// gzip level of `--compression gzip`, unless set otherwise.
pub const DEFAULT_GZIP_LEVEL: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Compression of the datasets an `.h5ad` export writes.
pub enum H5adCompression {
    /// None (anndata's default).
    None,
    /// gzip (deflate) at this level, 0-9.
    /// gzip (deflate) at a level from 0 to 9 ([`DEFAULT_GZIP_LEVEL`] unless set otherwise).
    Gzip(u8),
    /// LZF: fast, light.
    Lzf,
}

/// Writes an AnnData file: CSR `X` (float32 data, int32/int64 indices, int64 indptr), `obs`,
/// `var`, and DEG lists in `uns`. Written to a temporary name and renamed by
/// [`finish`](H5adWriter::finish); dropped unfinished, the temporary file is removed.
pub struct H5adWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    n_vars: u64,
    /// int64 `indices`/`indptr` (else int32).
    wide: bool,
    data: Dataset,
    indices: Dataset,
    indptr: Dataset,
    obs: DataFrameWriter,
    x_group: hdf5::Group,
    rows: u64,
    nnz: u64,
    overwrite: bool,
    finished: bool,
    /// Held until the file is published or abandoned (dropped after `Drop::drop`).
    _lock: crate::output::OutputLock,
}

impl H5adWriter {
    /// Starts `dest` with the genes of `var` (first column: gene ids) and cells of `obs_schema`.
    /// `nnz` (the entries that will be written) picks the index type: `indices` and `indptr`
    /// are both int32 when it and the gene count fit, else both int64 (scipy needs them equal).
    pub fn create(
        dest: &Path,
        var: &RecordBatch,
        obs_schema: &SchemaRef,
        nnz: u64,
        compression: H5adCompression,
        overwrite: bool,
    ) -> Result<H5adWriter> {
        let lock = crate::output::claim_output(dest, OutputKind::File, overwrite)?;
        let tmp = crate::output::temporary_sibling(dest)?;
        let created = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // Without HDF5's own file lock: HDF5 opens the file without O_CLOEXEC and locks that
        // descriptor, so a child process started while the file is written (by a program that
        // embeds this library) would inherit the lock and keep it, on the published file, until it
        // exits, and a reader asking for the lock would fail. The temporary name and `lock` already
        // keep every other writer out.
        let file = File::with_options()
            .with_fapl(|p| p.file_locking(false))
            .create(super::hdf5_name(&tmp, &created))
            .map_err(Error::hdf5(&tmp, "creating"))?;
        let path = tmp.clone();
        encoding(&path, &file, "anndata", "0.1.0")?;
        let n_vars = var.num_rows() as u64;
        let mut var_writer = DataFrameWriter::create(&path, &file, "var", var.schema_ref(), compression)?;
        var_writer.append(var)?;
        let obs = DataFrameWriter::create(&path, &file, "obs", obs_schema, compression)?;
        let x_group = file.create_group("X").map_err(Error::hdf5(&path, "create X"))?;
        encoding(&path, &x_group, "csr_matrix", "0.1.0")?;
        let data = appendable::<f32>(&path, &x_group, "data", compression)?;
        let wide = n_vars > i32::MAX as u64 || nnz > i32::MAX as u64;
        let (indices, indptr) = if wide {
            (
                appendable::<i64>(&path, &x_group, "indices", compression)?,
                appendable::<i64>(&path, &x_group, "indptr", compression)?,
            )
        } else {
            (
                appendable::<i32>(&path, &x_group, "indices", compression)?,
                appendable::<i32>(&path, &x_group, "indptr", compression)?,
            )
        };
        append(&path, &indptr, 0, &[0i64])?;
        for (name, group) in [
            ("layers", "dict"),
            ("obsm", "dict"),
            ("varm", "dict"),
            ("obsp", "dict"),
            ("varp", "dict"),
            ("uns", "dict"),
        ] {
            let g = file.create_group(name).map_err(Error::hdf5(&path, format!("create {name}")))?;
            encoding(&path, &g, group, "0.1.0")?;
        }
        Ok(H5adWriter {
            dest: dest.to_owned(),
            tmp,
            file: Some(file),
            n_vars,
            wide,
            data,
            indices,
            indptr,
            obs,
            x_group,
            rows: 0,
            nnz: 0,
            overwrite,
            finished: false,
            _lock: lock,
        })
    }

    /// Appends rows and their `obs` rows.
    pub fn append(&mut self, rows: &CsrBatch, obs: &RecordBatch) -> Result<()> {
        if obs.num_rows() != rows.n_rows() {
            return Err(Error::InvalidInput(format!("{} obs rows for {} matrix rows", obs.num_rows(), rows.n_rows())));
        }
        let path = self.tmp.clone();
        let at = self.nnz as usize;
        let end = self.nnz + rows.nnz() as u64;
        if !self.wide && end > i32::MAX as u64 {
            return Err(Error::InvalidInput(format!(
                "{}: more entries ({end}) than announced at creation for int32 indices",
                self.dest.display()
            )));
        }
        append(&path, &self.data, at, rows.data())?;
        // HDF5 converts these i64 buffers to int32 where the datasets are narrow.
        let idx: Vec<i64> = rows.indices().iter().map(|&c| i64::from(c)).collect();
        append(&path, &self.indices, at, &idx)?;
        let offsets: Vec<i64> = rows.indptr()[1..].iter().map(|&o| (self.nnz + o) as i64).collect();
        append(&path, &self.indptr, self.rows as usize + 1, &offsets)?;
        self.obs.append(obs)?;
        self.rows += rows.n_rows() as u64;
        self.nnz += rows.nnz() as u64;
        Ok(())
    }

    /// Writes DEG lists as `uns/<key>`: a dict from group to its ranked gene names, from a table
    /// with columns `group`, `rank`, `gene` (what [`super::H5adReader::read_degs`] reads back).
    pub fn write_degs(&mut self, key: &str, table: &RecordBatch) -> Result<()> {
        let path = self.tmp.clone();
        let col = |name: &str| {
            table.column_by_name(name).ok_or_else(|| Error::InvalidInput(format!("DEG table has no column {name:?}")))
        };
        let groups = arrow_cast::cast(col(DEG_GROUP)?, &arrow_schema::DataType::Utf8)
            .map_err(|e| Error::arrow("DEG groups", e))?;
        let genes = arrow_cast::cast(col(DEG_GENE)?, &arrow_schema::DataType::Utf8)
            .map_err(|e| Error::arrow("DEG genes", e))?;
        let ranks = arrow_cast::cast(col(DEG_RANK)?, &arrow_schema::DataType::UInt32)
            .map_err(|e| Error::arrow("DEG ranks", e))?;
        let (groups, genes, ranks) =
            (groups.as_string::<i32>(), genes.as_string::<i32>(), ranks.as_primitive::<UInt32Type>());
        // Groups in order of first appearance, each with its (rank, gene) pairs.
        let mut lists: Vec<(String, Vec<(u32, String)>)> = Vec::new();
        let mut position: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for i in 0..table.num_rows() {
            let g = groups.value(i);
            let p = *position.entry(g.to_owned()).or_insert_with(|| {
                lists.push((g.to_owned(), Vec::new()));
                lists.len() - 1
            });
            lists[p].1.push((ranks.value(i), genes.value(i).to_owned()));
        }
        let file = self.file.as_ref().ok_or_else(|| Error::InvalidInput("writer finished".to_owned()))?;
        let uns = file.group("uns").map_err(Error::hdf5(&path, "uns"))?;
        let group = uns.create_group(key).map_err(Error::hdf5(&path, format!("uns/{key}")))?;
        encoding(&path, &group, "dict", "0.1.0")?;
        for (name, mut list) in lists {
            list.sort_by_key(|(r, _)| *r);
            let values: Vec<VarLenUnicode> = strings_to_h5(list.iter().map(|(_, g)| g))?;
            let ds = group
                .new_dataset::<VarLenUnicode>()
                .shape(values.len())
                .create(name.as_str())
                .map_err(Error::hdf5(&path, format!("uns/{key}/{name}")))?;
            if !values.is_empty() {
                ds.write_raw(&values).map_err(Error::hdf5(&path, format!("uns/{key}/{name}")))?;
            }
            encoding(&path, &ds, "string-array", "0.2.0")?;
        }
        Ok(())
    }

    /// Records the shape, closes the file and renames it into place.
    pub fn finish(mut self) -> Result<()> {
        let path = self.tmp.clone();
        let shape = [self.rows as i64, self.n_vars as i64];
        self.x_group
            .new_attr::<i64>()
            .shape(2)
            .create("shape")
            .and_then(|a| a.write_raw(&shape))
            .map_err(Error::hdf5(&path, "X: shape attribute"))?;
        if let Some(file) = self.file.take() {
            file.flush().map_err(Error::hdf5(&path, "flush"))?;
            file.close().map_err(Error::hdf5(&path, "close"))?;
        }
        crate::output::publish(&self.tmp, &self.dest, OutputKind::File, self.overwrite)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for H5adWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

//! The Parquet cell-table reader (Tahoe-100M's layout: gene-id and count lists beside the
//! cells' columns) and its gene vocabulary: the input is split into a vocabulary file and a
//! cell-table file (seeded by scripts/fuzz.sh with pyarrow-written pairs: integer, unsigned,
//! float and string ids, nulls, markers), read as the import reads them, by ids and by names,
//! with and without a marker count. Errors are fine; a panic or abort is a finding.
//!
//! Input: u32 LE length of the vocabulary file, its bytes, then the cell table's bytes.
#![no_main]

use cpa_stream_stages::CsrBatch;
use cpa_stream_stages::cell_table::{CellTable, CellTableLayout, Vocabulary};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(init: common::init(), |data: &[u8]| {
    let [a, b, c, d, rest @ ..] = data else { return };
    let split = (u32::from_le_bytes([*a, *b, *c, *d]) as usize).min(rest.len());
    let (vocabulary, cells) = rest.split_at(split);
    let dir = common::scratch();
    let (vocabulary_path, cells_path) = (dir.join("vocab.parquet"), dir.join("cells.parquet"));
    std::fs::write(&vocabulary_path, vocabulary).expect("scratch");
    std::fs::write(&cells_path, cells).expect("scratch");
    for id_column in [None, Some("gene_symbol")] {
        let Ok(vocabulary) = Vocabulary::read(&vocabulary_path, None, id_column) else { continue };
        for marker in [None, Some(-2.0)] {
            let layout = CellTableLayout { marker, ..CellTableLayout::default() };
            let Ok(table) = CellTable::open(&cells_path, &layout) else { continue };
            let _ = table.obs_schema();
            let Ok(batches) = table.batches(64) else { continue };
            let mut first = 0u64;
            let mut out = CsrBatch::new(vocabulary.len().min(u32::MAX as usize) as u32);
            for batch in batches.take(64) {
                let Ok(batch) = batch else { break };
                let rows = batch.num_rows() as u64;
                if table.split(&batch, first, &vocabulary, &mut out).is_err() {
                    break;
                }
                first += rows;
            }
        }
    }
});

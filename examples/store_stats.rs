//! Embedding the store in an ETL job: stream every cell of a store once, in bounded memory, and
//! compute per-gene statistics (mean count and fraction of cells expressing the gene).
//!
//! ```text
//! cargo run --release --example store_stats -- path/to/atlas.store
//! cargo run --release --example store_stats            # generates a small synthetic atlas first
//! ```

use std::path::PathBuf;

use cpa_stream::synth::{SynthConfig, SynthOptions};
use cpa_stream::{Access, CsrBatch, RunContext, Store};

/// Rows copied per batch.
const BATCH_ROWS: u64 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _scratch;
    let path = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = std::env::temp_dir().join(format!("cpa-stream-example-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("example.store");
            let config = SynthConfig::new(5_000, 500, 4, 2, 2, 2, 7);
            let options = SynthOptions { overwrite: true, ..SynthOptions::new(config, &path) };
            cpa_stream::synth::run(&options, &RunContext::default())?;
            _scratch = RemoveOnDrop(dir);
            path
        }
    };

    let store = Store::open(&path)?;
    store.advise(Access::Sequential);
    let n_vars = store.n_vars() as usize;
    let mut sums = vec![0f64; n_vars];
    let mut expressing = vec![0u64; n_vars];
    let mut cursor = store.cursor()?;
    let mut batch = CsrBatch::new(n_vars as u32);
    let mut start = 0;
    while start < store.n_obs() {
        let end = (start + BATCH_ROWS).min(store.n_obs());
        batch.clear();
        cursor.read_range(start..end, &mut batch)?;
        for (&gene, &value) in batch.indices().iter().zip(batch.data()) {
            sums[gene as usize] += f64::from(value);
            expressing[gene as usize] += 1;
        }
        // Pages of consumed rows leave this process's resident set.
        store.release(start..end);
        start = end;
    }

    let cells = store.n_obs().max(1) as f64;
    let mut order: Vec<usize> = (0..n_vars).collect();
    order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]));
    println!("{}: {} cells x {} genes", path.display(), store.n_obs(), n_vars);
    println!("{:>6} {:>12} {:>10}", "gene", "mean count", "expressing");
    for &g in order.iter().take(10) {
        println!("{g:>6} {:>12.3} {:>9.1}%", sums[g] / cells, 100.0 * expressing[g] as f64 / cells);
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

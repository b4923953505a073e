//! Where a count model's per-gene inverse dispersion starts (`model.dispersion_init =
//! "moments"`): a method-of-moments estimate from a sample of the training cells.
//!
//! Within a label group (covariates, condition and dose), cell `c`'s count of gene `g` has mean
//! `L_c p_g` (its library size times the group's proportion) and, under the negative binomial,
//! variance `m + m² / theta_g` with `m = L_c p_g`. Summed over the groups,
//! `1 / theta_g = sum (n / (n - 1) sum_c (x_cg - L_c p_g)² - sum_c L_c p_g) / sum_c (L_c p_g)²`,
//! with `p_g` each group's pooled proportion. Variation within a group that the latent space
//! explains (cell states) counts as dispersion here, so the start errs towards overdispersion;
//! training moves it from there.

use cpa_stream_pipeline::encoder::{CellLabels, Split};
use cpa_stream_stages::Result;
use cpa_stream_stages::store::Store;

/// Training cells sampled for the estimate at most, evenly spread over the store.
const SAMPLE_CELLS: u64 = 16_384;

/// Sampled cells a label group needs to enter the estimate: fewer leave its own proportions too
/// uncertain. Without any such group, the sample is one group.
const MIN_GROUP_CELLS: usize = 8;

/// Memory for one pass's sums (three a gene and group of the pass).
const ACCUMULATOR_BYTES: usize = 64 << 20;

/// The estimate's range of theta: a gene measured as underdispersed starts at the upper end
/// (near a Poisson), one with a huge excess at the lower.
const THETA_RANGE: (f64, f64) = (1e-2, 1e3);

/// The starting log theta of every gene, and what it came from.
#[derive(Debug, Clone)]
pub struct DispersionEstimate {
    /// Log theta per gene, in the store's gene order.
    pub log_theta: Vec<f32>,
    /// Training cells read.
    pub cells: usize,
    /// Label groups the estimate pooled.
    pub groups: usize,
    /// Genes with counts in those groups (the others start at the median of these).
    pub genes_estimated: usize,
}

/// The estimate from at most [`SAMPLE_CELLS`] training cells of `store` (`labels` its cells'
/// groups and splits). Reads only the sampled rows, each once, in store order within a pass of
/// groups; memory is at most [`ACCUMULATOR_BYTES`] of sums.
pub fn moment_log_theta(store: &Store, labels: &CellLabels) -> Result<DispersionEstimate> {
    moment_log_theta_within(store, labels, ACCUMULATOR_BYTES)
}

/// [`moment_log_theta`] with `accumulator_bytes` for a pass's sums.
fn moment_log_theta_within(store: &Store, labels: &CellLabels, accumulator_bytes: usize) -> Result<DispersionEstimate> {
    let genes = store.n_vars() as usize;
    let train_cells = labels.split_counts[Split::Train as usize];
    let step = train_cells.div_ceil(SAMPLE_CELLS).max(1);
    let mut sample: Vec<(u32, u64)> = Vec::with_capacity(train_cells.min(SAMPLE_CELLS) as usize);
    let mut seen = 0u64;
    for cell in 0..labels.n_cells() {
        if labels.split(cell) != Split::Train {
            continue;
        }
        if seen.is_multiple_of(step) {
            sample.push((labels.group_id(cell), cell));
        }
        seen += 1;
    }
    sample.sort_unstable();
    let mut runs: Vec<&[(u32, u64)]> =
        sample.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() >= MIN_GROUP_CELLS).collect();
    if runs.is_empty() && sample.len() >= 2 {
        runs.push(&sample);
    }

    // Groups are summed a pass at a time, as many as ACCUMULATOR_BYTES hold, and each pass reads
    // its rows in store order (a compressed block is decoded once a pass, not once a row).
    let mut cursor = store.cursor()?;
    let (mut numerator, mut denominator) = (vec![0f64; genes], vec![0f64; genes]);
    let (mut cells, mut groups) = (0usize, 0usize);
    let groups_per_pass = (accumulator_bytes / (3 * 8 * genes.max(1))).max(1);
    for pass in runs.chunks(groups_per_pass) {
        let mut rows: Vec<(u64, usize)> =
            pass.iter().enumerate().flat_map(|(slot, run)| run.iter().map(move |&(_, row)| (row, slot))).collect();
        rows.sort_unstable();
        // Per group of the pass and gene: counts, squared counts, counts times library size;
        // per group: library sizes, their squares, cells.
        let mut sums = vec![[0f64; 3]; pass.len() * genes];
        let mut libraries = vec![(0f64, 0f64, 0usize); pass.len()];
        for (row, slot) in rows {
            let (indices, values) = cursor.row(row)?;
            let library: f64 = values.iter().map(|&v| f64::from(v)).sum();
            if library <= 0.0 {
                continue;
            }
            let (sl, sl2, n) = &mut libraries[slot];
            (*sl, *sl2, *n) = (*sl + library, *sl2 + library * library, *n + 1);
            let group = &mut sums[slot * genes..(slot + 1) * genes];
            for (&g, &v) in indices.iter().zip(values) {
                let (sum, v) = (&mut group[g as usize], f64::from(v));
                sum[0] += v;
                sum[1] += v * v;
                sum[2] += v * library;
            }
        }
        for (slot, &(sl, sl2, n)) in libraries.iter().enumerate() {
            if n < 2 {
                continue;
            }
            let correction = n as f64 / (n - 1) as f64;
            for (g, &[s1, sx2, sxl]) in sums[slot * genes..(slot + 1) * genes].iter().enumerate() {
                if s1 > 0.0 {
                    let p = s1 / sl;
                    let squares = sx2 - 2.0 * p * sxl + p * p * sl2;
                    numerator[g] += correction * squares - s1;
                    denominator[g] += p * p * sl2;
                }
            }
            cells += n;
            groups += 1;
        }
    }

    let (low, high) = (THETA_RANGE.0.ln(), THETA_RANGE.1.ln());
    let estimated: Vec<Option<f64>> = numerator
        .iter()
        .zip(&denominator)
        .map(|(&num, &den)| {
            (den > 0.0).then(|| {
                let overdispersion = num / den;
                if overdispersion > 0.0 { (-overdispersion.ln()).clamp(low, high) } else { high }
            })
        })
        .collect();
    let mut known: Vec<f64> = estimated.iter().flatten().copied().collect();
    known.sort_unstable_by(f64::total_cmp);
    let fallback = if known.is_empty() { 0.0 } else { known[known.len() / 2] };
    Ok(DispersionEstimate {
        log_theta: estimated.iter().map(|e| e.unwrap_or(fallback) as f32).collect(),
        cells,
        groups,
        genes_estimated: known.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws of NB(mean, theta) by the gamma-Poisson mixture, from a small fixed generator.
    struct Draws(u64);

    impl Draws {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
        }

        /// Marsaglia and Tsang's gamma(shape, 1).
        fn gamma(&mut self, shape: f64) -> f64 {
            if shape < 1.0 {
                return self.gamma(shape + 1.0) * self.uniform().powf(1.0 / shape);
            }
            let d = shape - 1.0 / 3.0;
            let c = 1.0 / (9.0 * d).sqrt();
            loop {
                let x = self.normal();
                let v = (1.0 + c * x).powi(3);
                if v > 0.0 && self.uniform().ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                    return d * v;
                }
            }
        }

        fn poisson(&mut self, lambda: f64) -> f64 {
            if lambda > 30.0 {
                return (lambda + lambda.sqrt() * self.normal()).round().max(0.0);
            }
            let (limit, mut k, mut p) = ((-lambda).exp(), 0.0, 1.0);
            loop {
                p *= self.uniform();
                if p <= limit {
                    return k;
                }
                k += 1.0;
            }
        }

        fn nb(&mut self, mean: f64, theta: f64) -> f64 {
            let rate = self.gamma(theta) * mean / theta;
            self.poisson(rate)
        }
    }

    fn write_store(path: &std::path::Path, rows: &[Vec<f64>]) -> Store {
        use std::sync::Arc;

        use arrow_array::{RecordBatch, StringArray};
        use arrow_schema::{DataType, Field, Schema};
        use cpa_stream_stages::CsrBatch;
        use cpa_stream_stages::store::{StoreWriter, StoreWriterOptions};

        let ids = |name: &str, values: Vec<String>| {
            let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values))]).unwrap_or_else(|e| panic!("{e}"))
        };
        let genes = rows[0].len();
        let var = ids("gene_id", (0..genes).map(|g| format!("g{g}")).collect());
        let obs = ids("cell_id", (0..rows.len()).map(|c| format!("c{c}")).collect());
        let mut writer = StoreWriter::create(path, &var, obs.schema(), StoreWriterOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut batch = CsrBatch::new(genes as u32);
        for row in rows {
            let (indices, values): (Vec<u32>, Vec<f32>) =
                row.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(g, &v)| (g as u32, v as f32)).unzip();
            batch.push_row(&indices, &values);
        }
        writer.push_rows(&batch, &obs).unwrap_or_else(|e| panic!("{e}"));
        writer.finish().unwrap_or_else(|e| panic!("{e}"));
        Store::open(path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn recovers_the_dispersion_of_negative_binomial_counts_within_label_groups() {
        use cpa_stream_pipeline::encoder::Group;
        use cpa_stream_stages::model::vocab::Vocabulary;

        // Two groups whose proportions differ tenfold on half the genes: pooled without the
        // groups, that difference would read as overdispersion. The last gene stands for the rest
        // of a transcriptome, which makes the library size of a cell its counts' sum.
        let thetas = [0.5, 2.0, 8.0, 30.0];
        let genes = thetas.len() * 2 + 1;
        let cells = 4000;
        let mut draws = Draws(0x9e37_79b9_7f4a_7c15);
        let mut rows = Vec::with_capacity(cells);
        let mut labels = Vec::with_capacity(cells);
        for c in 0..cells {
            let group = (c % 2) as u32;
            let library = 2000.0 * (0.35 * draws.normal()).exp();
            let row: Vec<f64> = (0..genes)
                .map(|g| match g {
                    _ if g == genes - 1 => draws.nb(library * 0.8, 100.0),
                    _ => draws.nb(library * if g % 2 == 1 && group == 1 { 0.05 } else { 0.005 }, thetas[g / 2]),
                })
                .collect();
            rows.push(row);
            labels.push((group, if c % 10 == 9 { Split::Valid } else { Split::Train }));
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = write_store(&dir.path().join("nb.store"), &rows);
        let vocab = Vocabulary::new(
            (0..genes).map(|g| format!("g{g}")).collect(),
            "control",
            ["control", "x"].map(String::from),
            Vec::new(),
            vec![("control".into(), 1800), ("x".into(), 1800)],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let group = |class: u32, condition: &str| Group {
            parts: vec![(class + 1, 1.0)],
            covariates: Vec::new(),
            class,
            condition: condition.into(),
            dose: None,
        };
        let labels = CellLabels::from_parts(vocab, vec![group(0, "control"), group(1, "x")], &labels)
            .unwrap_or_else(|e| panic!("{e}"));
        let estimate = moment_log_theta(&store, &labels).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((estimate.cells, estimate.groups, estimate.genes_estimated), (3600, 2, genes));
        for (g, &log_theta) in estimate.log_theta[..genes - 1].iter().enumerate() {
            let theta = f64::from(log_theta).exp();
            // The sampling error of a moment estimate grows with theta at a mean of 10 to 100.
            assert!(
                (0.67..1.5).contains(&(theta / thetas[g / 2])),
                "gene {g}: theta {theta} against {}",
                thetas[g / 2]
            );
        }

        // A pass a group: the same sums, the same estimate.
        let by_group = moment_log_theta_within(&store, &labels, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(by_group.log_theta, estimate.log_theta);

        // The same cells as one group: the groups' tenfold difference reads as overdispersion.
        let one = vec![group(0, "control")];
        let cells: Vec<(u32, Split)> = (0..cells).map(|c| (0, labels.split(c as u64))).collect();
        let pooled = CellLabels::from_parts(labels.vocab.clone(), one, &cells).unwrap_or_else(|e| panic!("{e}"));
        let pooled = moment_log_theta(&store, &pooled).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pooled.groups, 1);
        let theta = f64::from(pooled.log_theta[7]).exp();
        assert!(theta < 3.0, "gene 7 pooled over both groups: theta {theta}, not the mixture's overdispersion");
    }
}

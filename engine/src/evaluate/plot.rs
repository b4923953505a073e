//! An evaluation's pictures, drawn with the [`plots`](cpa_stream_pipeline::plots) kit: the overview (every
//! condition's score against the control-mean baseline and the data's ceiling, sorted, the
//! conditions where the model does not beat the baseline marked) and one scatter plot per
//! condition, with the file names they go to.

use std::path::Path;

use super::{ConditionMetrics, PlotData};
use cpa_stream_pipeline::error::Result;
use cpa_stream_pipeline::plots::{DotChart, DotRow, Scatter, ScatterPoint, write_dots, write_scatter};

/// Rows of the overview at most; more conditions keep the lowest and highest scores.
const OVERVIEW_ROWS: usize = 80;

/// Writes `stem.svg` and `stem.png`: each condition's `r2_mean` (blue, red where it does not beat
/// the control mean) with the control mean's (grey bar end) and the data's split-half ceiling
/// (black tick), sorted by the model's score; values below -1 are drawn at -1.
pub fn overview(stem: &Path, title: &str, conditions: &[ConditionMetrics]) -> Result<()> {
    let mut rows: Vec<&ConditionMetrics> = conditions.iter().filter(|c| c.r2_mean.is_finite()).collect();
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_by(|a, b| a.r2_mean.total_cmp(&b.r2_mean));
    let shown = rows.len();
    if rows.len() > OVERVIEW_ROWS {
        let half = OVERVIEW_ROWS / 2;
        let (low, high) = (rows[..half].to_vec(), rows[rows.len() - half..].to_vec());
        rows = low.into_iter().chain(high).collect();
    }
    let n = rows.len();
    let label = |c: &ConditionMetrics| {
        let mut text = format!("{} {} ({})", c.condition, c.dose, c.covariates.join(","));
        if text.chars().count() > 44 {
            text = text.chars().take(43).collect::<String>() + "~";
        }
        text
    };
    let clamp = |v: f64| v.max(-1.0);
    let lo = clamp(
        rows.iter()
            .flat_map(|c| [c.r2_mean, c.r2_mean_control, c.field.ceiling_r2_mean])
            .filter(|v| v.is_finite())
            .fold(1.0, f64::min),
    ) - 0.05;
    let beats = rows.iter().filter(|c| c.field.beats_control == 1.0).count();
    let chart = DotChart {
        title: format!(
            "{title}: R2 of means per condition, sorted ({beats} of {n} beat the control mean{})",
            if shown > n { format!("; the {} lowest and highest of {shown}", n / 2) } else { String::new() }
        ),
        x_desc: "R2 over genes of the log1p means (1 = perfect)".to_owned(),
        x_range: (lo, 1.0),
        rows: rows
            .iter()
            .map(|c| DotRow {
                label: label(c),
                value: clamp(c.r2_mean),
                good: c.field.beats_control == 1.0,
                reference: clamp(c.r2_mean_control),
                mark: clamp(c.field.ceiling_r2_mean),
            })
            .collect(),
        legend: [
            "model (beats the control mean)",
            "model (does not)",
            "control mean (grey tick, bar to the model)",
            "split-half ceiling (tick)",
        ]
        .map(str::to_owned),
    };
    write_dots(stem, &chart)
}

/// Genes named beside their point in a condition's scatter plot (the top DEGs first).
const LABELLED_GENES: usize = 10;

/// Writes one condition's scatter plot as SVG at `path`: its top DEGs' predicted means (blue) and
/// control means (grey), half transparent, against the real (or true) means, with the identity
/// line; the first `LABELLED_GENES` (10) genes named beside their predicted point.
pub fn scatter(path: &Path, title: &str, real_label: &str, data: &PlotData, r2: f64) -> Result<()> {
    let points = (0..data.genes.len())
        .map(|i| ScatterPoint {
            x: data.real[i],
            y: data.predicted[i],
            secondary: data.control[i],
            name: (i < LABELLED_GENES).then(|| data.genes[i].clone()),
        })
        .collect();
    let subtitle = match r2.is_finite() {
        true => format!("top {} DEGs, log1p means; R2 of means over all genes {r2:.3}", data.genes.len()),
        false => format!("top {} DEGs, log1p means", data.genes.len()),
    };
    let scatter = Scatter {
        title: title.to_owned(),
        subtitle,
        x_desc: real_label.to_owned(),
        y_desc: "mean: predicted (blue), control (grey)".to_owned(),
        points,
    };
    write_scatter(path, &scatter)
}

/// A file-name-safe stem for a condition.
pub fn file_stem(name: &str) -> String {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.+".contains(c) { c } else { '_' }).collect();
    stem.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_has_a_point_per_gene_and_names_the_top_ones() {
        let data = PlotData {
            genes: (0..12).map(|i| format!("G<{i}>")).collect(),
            predicted: (0..12).map(|i| f64::from(i) * 0.1).collect(),
            real: (0..12).map(|i| f64::from(i) * 0.11).collect(),
            control: (0..12).map(|i| if i == 3 { f64::NAN } else { 0.2 }).collect(),
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("x.svg");
        scatter(&path, "X & Y", "real mean", &data, 0.9).unwrap_or_else(|e| panic!("{e}"));
        let svg = std::fs::read_to_string(&path).unwrap_or_default();
        // 12 predicted points and 11 control points (one control mean is NaN).
        assert_eq!(svg.matches("<circle").count(), 23, "{svg:.400}");
        assert!(svg.contains("G&lt;0&gt;") && svg.contains("G&lt;9&gt;") && !svg.contains("G&lt;10&gt;"));
        assert!(svg.contains("X &amp; Y"));
        assert_eq!(file_stem("k562_A+B_1+1/x"), "k562_A+B_1+1_x");
    }
}

//! File names of the per-condition scatter plots (drawn by [`crate::plots::write_scatter`]).

/// A file-name-safe stem for a condition.
pub fn file_stem(name: &str) -> String {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.+".contains(c) { c } else { '_' }).collect();
    stem.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::PlotData;

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
        crate::plots::write_scatter(&path, "X & Y", "real mean", &data, 0.9).unwrap_or_else(|e| panic!("{e}"));
        let svg = std::fs::read_to_string(&path).unwrap_or_default();
        // 12 predicted points and 11 control points (one control mean is NaN).
        assert_eq!(svg.matches("<circle").count(), 23, "{svg:.400}");
        assert!(svg.contains("G&lt;0&gt;") && svg.contains("G&lt;9&gt;") && !svg.contains("G&lt;10&gt;"));
        assert!(svg.contains("X &amp; Y"));
        assert_eq!(file_stem("k562_A+B_1+1/x"), "k562_A+B_1+1_x");
    }
}

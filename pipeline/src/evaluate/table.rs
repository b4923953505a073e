//! The table `cpa-stream evaluate` prints: one line per condition and the means.

use std::fmt::Write as _;

use super::EvaluateReport;

/// The printed table: one line per condition.
pub fn render_table(report: &EvaluateReport) -> String {
    let mut out = String::new();
    let f = |v: f64| if v.is_finite() { format!("{v:>8.3}") } else { format!("{:>8}", "-") };
    let _ = writeln!(
        out,
        "{:<28} {:<16} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "condition", "covariates", "cells", "ctrl", "r2_mean", "top20", "r2_var", "r2_delta", "ctrl_bl", "truth"
    );
    for c in &report.conditions {
        let top20 = c.top.iter().find(|t| t.k == 20).map_or(f64::NAN, |t| t.r2_mean);
        let mut name = format!("{} {}", c.condition, c.dose);
        if name.len() > 28 {
            name.truncate(27);
            name.push('~');
        }
        let mut covs = c.covariates.join(",");
        if covs.len() > 16 {
            covs.truncate(15);
            covs.push('~');
        }
        let _ = writeln!(
            out,
            "{name:<28} {covs:<16} {:>6} {:>6} {} {} {} {} {} {}",
            c.n_cells,
            c.n_control,
            f(c.r2_mean),
            f(top20),
            f(c.r2_var),
            f(c.r2_delta),
            f(c.r2_mean_control),
            f(c.truth.map_or(f64::NAN, |t| t.r2_mean))
        );
    }
    let m = |k: &str| report.summary.get(k).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "{:<28} {:<16} {:>6} {:>6} {} {} {} {} {} {}",
        "mean",
        "",
        "",
        "",
        f(m("r2_mean")),
        f(m("r2_mean_top20")),
        f(m("r2_var")),
        f(m("r2_delta")),
        f(m("r2_mean_control")),
        f(m("truth_r2_mean"))
    );
    out
}

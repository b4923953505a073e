//! The dose-response picture, drawn with the [`plots`](cpa_stream_pipeline::plots) kit.

use std::path::Path;

use super::{DecodedPoint, LatentPoint};
use cpa_stream_pipeline::error::Result;
use cpa_stream_pipeline::plots::{Colour, Line, Marks, PALETTE_LEN, Panel, padded_range, write_panels};

/// Writes `stem.svg` and `stem.png`: each perturbation's learned dose scaling `s(d)` (left) and,
/// with decoded curves, the length of the decoded change from dose 0 for the first covariate
/// combination (right), the truth's at its doses as crosses. At most ten perturbations are
/// drawn (those with the largest decoded, else latent, response); the title says how many.
pub(super) fn plot(
    stem: &Path,
    title: &str,
    latent: &[LatentPoint],
    decoded: &[DecodedPoint],
    space: &str,
) -> Result<()> {
    let mut order: Vec<&str> = Vec::new();
    for p in latent {
        if !order.contains(&p.perturbation.as_str()) {
            order.push(&p.perturbation);
        }
    }
    let first = decoded.first().map(|d| d.covariates.clone());
    let decoded: Vec<_> = decoded.iter().filter(|d| Some(&d.covariates) == first.as_ref()).collect();
    let largest = |name: &str| -> f64 {
        let of_decoded = decoded.iter().filter(|d| d.perturbation == name).map(|d| d.response).fold(0.0, f64::max);
        let of_latent = latent.iter().filter(|d| d.perturbation == name).map(|d| d.norm).fold(0.0, f64::max);
        if decoded.is_empty() { of_latent } else { of_decoded }
    };
    let total = order.len();
    if total > PALETTE_LEN {
        order.sort_by(|a, b| largest(b).total_cmp(&largest(a)));
        order.truncate(PALETTE_LEN);
    }
    let (mut latent_lines, mut decoded_lines, mut truth_marks) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &name) in order.iter().enumerate() {
        let colour = Colour::Palette(i);
        let points = latent.iter().filter(|p| p.perturbation == name).map(|p| (p.dose, p.response)).collect();
        latent_lines.push(Line { label: name.to_owned(), colour, points });
        let mine: Vec<_> = decoded.iter().filter(|p| p.perturbation == name).collect();
        if !mine.is_empty() {
            let points = mine.iter().map(|p| (p.dose, p.response)).collect();
            decoded_lines.push(Line { label: name.to_owned(), colour, points });
            truth_marks.push(Marks { colour, points: mine.iter().map(|p| (p.dose, p.true_response)).collect() });
        }
    }
    // Doses start at 0 (the curves' origin).
    let doses = (0.0, padded_range(latent.iter().map(|p| p.dose), (0.0, 1.0)).1);
    let shown = if total > order.len() {
        format!(" ({} of {total} perturbations, largest responses)", order.len())
    } else {
        String::new()
    };
    let title = format!("{title}{shown}");
    let right = match &first {
        Some(c) if c.is_empty() => format!("decoded change |Δ {space}|"),
        Some(c) => format!("decoded change |Δ {space}|, {}", c.join(", ")),
        None => String::new(),
    };
    let has_truth = truth_marks.iter().any(|m| m.points.iter().any(|p| p.1.is_finite()));
    let right = if has_truth { format!("{right} (x: truth)") } else { right };
    let panel = |title: &str, lines: Vec<Line>, marks: Vec<Marks>| Panel {
        title: title.to_owned(),
        x_desc: "dose".to_owned(),
        x_range: doses,
        lines,
        marks,
    };
    let mut panels = vec![panel("latent dose scaling s(d)", latent_lines, Vec::new())];
    if !decoded_lines.is_empty() {
        panels.push(panel(&right, decoded_lines, truth_marks));
    }
    let width = if panels.len() == 1 { 700 } else { 1300 };
    write_panels(stem, &title, 18, (width, 560), (1, panels.len()), &panels)
}

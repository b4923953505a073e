//! Pictures of runs and evaluations, drawn with plotters as SVG and PNG: a training run's
//! history (losses, validation, learning rate) and an evaluation's overview (every condition's
//! score against the control-mean baseline and the data's ceiling, sorted, the conditions where
//! the model does not beat the baseline marked).
//!
//! Text in the PNGs uses the DejaVu Sans font bundled in `pipeline/assets/` (its license beside
//! it), so the pictures look the same on every machine, with or without system fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::evaluate::ConditionMetrics;
use crate::train::EpochRecord;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the bundled font once for plotters' text.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(Error::InvalidInput("the bundled plot font could not be read".to_owned())) }
}

fn plot_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::InvalidInput(format!("{}: drawing the plot: {e}", path.display()))
}

/// The range of the finite values, padded; `fallback` when there are none.
fn range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return fallback;
    }
    // A flat series (a constant learning rate) gets a band around its value.
    let spread = hi - lo;
    let scale = lo.abs().max(hi.abs());
    let pad = if spread <= scale * 1e-6 { if scale > 0.0 { scale * 0.1 } else { 1.0 } } else { spread * 0.08 };
    (lo - pad, hi + pad)
}

/// A line of a panel: its legend label, colour and (epoch, value) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One panel of the history: a title, and series over epochs.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    epochs: (f64, f64),
    series: &[Series<'_>],
) -> std::result::Result<(), String> {
    panel_over(area, title, ("epoch", epochs), series, &[])
}

/// A panel of lines over `x` (its description and range), with optional marker-only series
/// (drawn as crosses, unlabelled).
fn panel_over<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x: (&str, (f64, f64)),
    series: &[Series<'_>],
    markers: &[(RGBColor, Vec<(f64, f64)>)],
) -> std::result::Result<(), String> {
    let (x_desc, epochs) = x;
    let integral = x_desc == "epoch";
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let y = range(
        series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).chain(markers.iter().flat_map(|m| m.1.iter().map(|p| p.1))),
        (0.0, 1.0),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(epochs.0..epochs.1, y.0..y.1)
        .map_err(e)?;
    let small = y.0.abs().max(y.1.abs()) < 1e-2;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| if integral { format!("{x:.0}") } else { format!("{x:.3}") })
        .y_label_formatter(&|v| if small { format!("{v:.2e}") } else { format!("{v:.3}") })
        .light_line_style(WHITE.mix(0.0))
        .label_style((FAMILY, 11))
        .draw()
        .map_err(e)?;
    for (label, colour, points) in series {
        let colour = *colour;
        let finite: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(finite.iter().copied(), colour.stroke_width(2)))
            .map_err(e)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        if finite.len() < 40 {
            chart.draw_series(finite.iter().map(|&p| Circle::new(p, 2, colour.filled()))).map_err(e)?;
        }
    }
    for (colour, points) in markers {
        let colour = *colour;
        let finite = points.iter().copied().filter(|p| p.1.is_finite());
        chart.draw_series(finite.map(|p| Cross::new(p, 5, colour.stroke_width(2)))).map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FAMILY, 11))
        .draw()
        .map_err(e)?;
    Ok(())
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(127, 127, 127);

/// Writes `stem.svg` and `stem.png`: the run's reconstruction and adversary losses, its
/// validation scores and its learning rate, per epoch (1-based, as the logs count).
pub fn write_history(stem: &Path, title: &str, records: &[EpochRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let x = |r: &EpochRecord| f64::from(r.train.epoch) + 1.0;
    let line = |f: &dyn Fn(&EpochRecord) -> f64| records.iter().map(|r| (x(r), f(r))).collect::<Vec<_>>();
    let validation = |f: fn(&crate::train::validate::ValidationScore) -> f64| {
        records.iter().filter_map(|r| r.validation.map(|v| (x(r), f(&v)))).collect::<Vec<_>>()
    };
    let epochs = (0.5, records.last().map_or(1.0, x) + 0.5);
    let recon = line(&|r| r.train.recon_loss);
    let adversary = line(&|r| r.train.adv_loss);
    let accuracy = line(&|r| r.train.acc_perts);
    let lr = line(&|r| r.train.lr);
    let (r2_mean, r2_var, score) = (validation(|v| v.r2_mean), validation(|v| v.r2_var), validation(|v| v.score));
    let title = title.to_owned();
    macro_rules! picture {
        ($root:expr) => {{
            let root = $root;
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let root = root.titled(&title, (FAMILY, 20)).map_err(|e| e.to_string())?;
            let panels = root.split_evenly((2, 2));
            panel(&panels[0], "reconstruction loss (per cell)", epochs, &[("recon", BLUE, recon.clone())])?;
            panel(
                &panels[1],
                "adversaries",
                epochs,
                &[("adversary loss", ORANGE, adversary.clone()), ("perturbation accuracy", GREY, accuracy.clone())],
            )?;
            panel(
                &panels[2],
                "validation",
                epochs,
                &[
                    ("r2_mean", GREEN, r2_mean.clone()),
                    ("r2_var", ORANGE, r2_var.clone()),
                    ("score", BLUE, score.clone()),
                ],
            )?;
            panel(&panels[3], "learning rate (autoencoder)", epochs, &[("lr", RED_, lr.clone())])?;
            Ok(())
        }};
    }
    both_with(stem, (1100, 760), |svg| picture!(svg), |png| picture!(png))
}

/// Draws the same picture as `stem.svg` and `stem.png` (`size` pixels), one closure per backend
/// (plotters' backends are distinct types), each file written under a temporary name and renamed
/// into place.
fn both_with(
    stem: &Path,
    size: (u32, u32),
    svg_draw: impl Fn(&DrawingArea<SVGBackend<'_>, Shift>) -> std::result::Result<(), String>,
    png_draw: impl Fn(&DrawingArea<BitMapBackend<'_>, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    font()?;
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    // The PNG encoder picks the format from the extension: the temporary name keeps it, after
    // the one rule's `.NAME.tmp-PID` (so that a killed run's are known as the file's).
    let tmp = |p: &Path| {
        let name = p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let ext = p.extension().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        p.with_file_name(format!(".{name}.tmp-{}.{ext}", std::process::id()))
    };
    let (svg_tmp, png_tmp) = (tmp(&svg), tmp(&png));
    let result = (|| {
        {
            let root = SVGBackend::new(&svg_tmp, size).into_drawing_area();
            svg_draw(&root).map_err(plot_error(&svg))?;
            root.present().map_err(|e| plot_error(&svg)(e.to_string()))?;
        }
        {
            let root = BitMapBackend::new(&png_tmp, size).into_drawing_area();
            png_draw(&root).map_err(plot_error(&png))?;
            root.present().map_err(|e| plot_error(&png)(e.to_string()))?;
        }
        std::fs::rename(&svg_tmp, &svg).map_err(Error::io(&svg))?;
        std::fs::rename(&png_tmp, &png).map_err(Error::io(&png))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&svg_tmp);
        let _ = std::fs::remove_file(&png_tmp);
    }
    result
}

/// Rows of the overview at most; more conditions keep the lowest and highest scores.
const OVERVIEW_ROWS: usize = 80;

/// Writes `stem.svg` and `stem.png`: each condition's `r2_mean` (blue, red where it does not beat
/// the control mean) with the control mean's (grey bar end) and the data's split-half ceiling
/// (black tick), sorted by the model's score; values below -1 are drawn at -1.
pub fn write_overview(stem: &Path, title: &str, conditions: &[ConditionMetrics]) -> Result<()> {
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
    let labels: Vec<String> = rows.iter().map(|c| label(c)).collect();
    let clamp = |v: f64| v.max(-1.0);
    let lo = clamp(
        rows.iter()
            .flat_map(|c| [c.r2_mean, c.r2_mean_control, c.field.ceiling_r2_mean])
            .filter(|v| v.is_finite())
            .fold(1.0, f64::min),
    ) - 0.05;
    let height = (120 + 18 * n as u32).max(320);
    let beats = rows.iter().filter(|c| c.field.beats_control == 1.0).count();
    let title = format!(
        "{title}: R2 of means per condition, sorted ({beats} of {n} beat the control mean{})",
        if shown > n { format!("; the {} lowest and highest of {shown}", n / 2) } else { String::new() }
    );
    macro_rules! picture {
        ($root:expr) => {{
            let root = $root;
            let e = |x: String| x;
            root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
            let mut chart = ChartBuilder::on(root)
                .caption(&title, (FAMILY, 17))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(300)
                .build_cartesian_2d(lo..1.0f64, -0.5f64..(n as f64 - 0.5))
                .map_err(|x| e(x.to_string()))?;
            chart
                .configure_mesh()
                .y_labels(n)
                .y_label_formatter(&|y| {
                    let i = y.round();
                    if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                        labels[i as usize].clone()
                    } else {
                        String::new()
                    }
                })
                .x_desc("R2 over genes of the log1p means (1 = perfect)")
                .label_style((FAMILY, 11))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|x| e(x.to_string()))?;
            for (i, c) in rows.iter().enumerate() {
                let y = i as f64;
                let (model, control) = (clamp(c.r2_mean), clamp(c.r2_mean_control));
                let colour = if c.field.beats_control == 1.0 { BLUE } else { RED_ };
                if control.is_finite() {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(control, y), (model, y)],
                            GREY.mix(0.6).stroke_width(3),
                        )))
                        .map_err(|x| e(x.to_string()))?;
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(control, y - 0.3), (control, y + 0.3)],
                            GREY.stroke_width(3),
                        )))
                        .map_err(|x| e(x.to_string()))?;
                }
                let ceiling = c.field.ceiling_r2_mean;
                if ceiling.is_finite() {
                    let ceiling = clamp(ceiling);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(ceiling, y - 0.35), (ceiling, y + 0.35)],
                            BLACK.stroke_width(2),
                        )))
                        .map_err(|x| e(x.to_string()))?;
                }
                chart
                    .draw_series(std::iter::once(Circle::new((model, y), 5, colour.filled())))
                    .map_err(|x| e(x.to_string()))?;
            }
            // The legend, drawn as series of no points so that plotters lays it out.
            let legend: [(&str, RGBColor); 4] = [
                ("model (beats the control mean)", BLUE),
                ("model (does not)", RED_),
                ("control mean (grey tick, bar to the model)", GREY),
                ("split-half ceiling (tick)", BLACK),
            ];
            for (name, colour) in legend {
                chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(|x| e(x.to_string()))?
                    .label(name)
                    .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .label_font((FAMILY, 11))
                .draw()
                .map_err(|x| e(x.to_string()))?;
            Ok(())
        }};
    }
    both_with(stem, (1000, height), |svg| picture!(svg), |png| picture!(png))
}

/// Genes named beside their point in a condition's scatter plot (the top DEGs first).
const LABELLED_GENES: usize = 10;

/// Writes one condition's scatter plot as SVG at `path`: its top DEGs' predicted means (blue) and
/// control means (grey), half transparent, against the real (or true) means, with the identity
/// line; the first [`LABELLED_GENES`] genes named beside their predicted point.
pub fn write_scatter(
    path: &Path,
    title: &str,
    real_label: &str,
    data: &crate::evaluate::PlotData,
    r2: f64,
) -> Result<()> {
    font()?;
    let points: Vec<(usize, f64, f64, f64)> = data
        .genes
        .iter()
        .enumerate()
        .filter_map(|(i, _)| {
            let (p, r, c) = (data.predicted[i], data.real[i], data.control[i]);
            (p.is_finite() && r.is_finite()).then_some((i, r, p, c))
        })
        .collect();
    let (lo, hi) = range(points.iter().flat_map(|&(_, r, p, c)| [r, p, c]), (0.0, 1.0));
    let subtitle = match r2.is_finite() {
        true => format!("top {} DEGs, log1p means; R2 of means over all genes {r2:.3}", data.genes.len()),
        false => format!("top {} DEGs, log1p means", data.genes.len()),
    };
    let draw = || -> std::result::Result<(), String> {
        let e = |x: DrawingAreaErrorKind<std::io::Error>| x.to_string();
        let root = SVGBackend::new(path, (480, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(title, (FAMILY, 15)).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&subtitle, (FAMILY, 11))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(lo..hi, lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(real_label)
            .y_desc("mean: predicted (blue), control (grey)")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.2}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .light_line_style(WHITE.mix(0.0))
            .label_style((FAMILY, 10))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.3).stroke_width(1))))
            .map_err(e)?;
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.3.is_finite())
                    .map(|&(_, r, _, c)| Circle::new((r, c), 3, GREY.mix(0.5).filled())),
            )
            .map_err(e)?;
        chart
            .draw_series(points.iter().map(|&(_, r, p, _)| Circle::new((r, p), 3, BLUE.mix(0.6).filled())))
            .map_err(e)?;
        let labels = points.iter().filter(|p| p.0 < LABELLED_GENES).map(|&(i, r, p, _)| {
            Text::new(format!(" {}", data.genes[i]), (r, p), (FAMILY, 9).into_font().color(&BLACK.mix(0.8)))
        });
        chart.draw_series(labels).map_err(e)?;
        root.present().map_err(e)
    };
    draw().map_err(plot_error(path))
}

/// A line with its own label: name, colour, points.
type OwnedSeries = (String, RGBColor, Vec<(f64, f64)>);

/// Colours of the dose-response lines (the tab10 palette).
const PALETTE: [RGBColor; 10] = [
    BLUE,
    ORANGE,
    GREEN,
    RED_,
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    GREY,
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Writes `stem.svg` and `stem.png`: each perturbation's learned dose scaling `s(d)` (left) and,
/// with decoded curves, the length of the decoded change from dose 0 for the first covariate
/// combination (right), the truth's at its doses as crosses. At most ten perturbations are
/// drawn (those with the largest decoded, else latent, response); the title says how many.
pub fn write_dose_response(
    stem: &Path,
    title: &str,
    latent: &[crate::dose_response::LatentPoint],
    decoded: &[crate::dose_response::DecodedPoint],
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
    if total > PALETTE.len() {
        order.sort_by(|a, b| largest(b).total_cmp(&largest(a)));
        order.truncate(PALETTE.len());
    }
    let mut latent_lines: Vec<OwnedSeries> = Vec::new();
    let mut decoded_lines: Vec<OwnedSeries> = Vec::new();
    let mut truth_marks = Vec::new();
    for (i, &name) in order.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> =
            latent.iter().filter(|p| p.perturbation == name).map(|p| (p.dose, p.response)).collect();
        latent_lines.push((name.to_owned(), colour, points));
        let mine: Vec<_> = decoded.iter().filter(|p| p.perturbation == name).collect();
        if !mine.is_empty() {
            decoded_lines.push((
                name.to_owned(),
                colour,
                mine.iter().map(|p| (p.dose, p.response)).collect::<Vec<_>>(),
            ));
            truth_marks.push((colour, mine.iter().map(|p| (p.dose, p.true_response)).collect::<Vec<_>>()));
        }
    }
    let doses = range(latent.iter().map(|p| p.dose), (0.0, 1.0));
    // Doses start at 0 (the curves' origin).
    let doses = (0.0, doses.1);
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
    let has_truth = truth_marks.iter().any(|m| m.1.iter().any(|p| p.1.is_finite()));
    let right = if has_truth { format!("{right} (x: truth)") } else { right };
    let latent_series: Vec<Series<'_>> = latent_lines.iter().map(|(n, c, p)| (n.as_str(), *c, p.clone())).collect();
    let decoded_series: Vec<Series<'_>> = decoded_lines.iter().map(|(n, c, p)| (n.as_str(), *c, p.clone())).collect();
    macro_rules! picture {
        ($root:expr) => {{
            let root = $root;
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let root = root.titled(&title, (FAMILY, 18)).map_err(|e| e.to_string())?;
            if decoded_series.is_empty() {
                panel_over(&root, "latent dose scaling s(d)", ("dose", doses), &latent_series, &[])?;
            } else {
                let panels = root.split_evenly((1, 2));
                panel_over(&panels[0], "latent dose scaling s(d)", ("dose", doses), &latent_series, &[])?;
                panel_over(&panels[1], &right, ("dose", doses), &decoded_series, &truth_marks)?;
            }
            Ok(())
        }};
    }
    let width = if decoded_series.is_empty() { 700 } else { 1300 };
    both_with(stem, (width, 560), |svg| picture!(svg), |png| picture!(png))
}

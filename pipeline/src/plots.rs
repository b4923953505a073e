//! A drawing kit for the pictures the commands write, with plotters, as SVG and PNG: panels of
//! lines over x (training history, dose responses), a dot chart of one value per row against a
//! reference and a mark (an evaluation's overview), and a scatter plot with named points (a
//! condition's genes). The kit knows nothing of runs or evaluations: each command gives it its
//! own data as these types and says what the axes and legends read.
//!
//! Text in the PNGs uses the DejaVu Sans font bundled in `pipeline/assets/` (its license beside
//! it), so the pictures look the same on every machine, with or without system fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

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
pub fn padded_range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
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

/// A colour of the kit: named ones, or the `n`-th of the ten-colour palette (tab10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// Blue.
    Blue,
    /// Orange.
    Orange,
    /// Green.
    Green,
    /// Red.
    Red,
    /// Grey.
    Grey,
    /// Black.
    Black,
    /// The palette's `n`-th colour (modulo its length).
    Palette(usize),
}

/// Colours of the palette (tab10).
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

/// Colours the palette holds.
pub const PALETTE_LEN: usize = PALETTE.len();

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(127, 127, 127);

impl Colour {
    fn rgb(self) -> RGBColor {
        match self {
            Colour::Blue => BLUE,
            Colour::Orange => ORANGE,
            Colour::Green => GREEN,
            Colour::Red => RED_,
            Colour::Grey => GREY,
            Colour::Black => BLACK,
            Colour::Palette(n) => PALETTE[n % PALETTE.len()],
        }
    }
}

/// A line of a panel: its legend label, colour and (x, y) points (non-finite y left out).
#[derive(Debug, Clone)]
pub struct Line {
    /// The legend's label.
    pub label: String,
    /// Its colour.
    pub colour: Colour,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// Points drawn as crosses, without a legend entry.
#[derive(Debug, Clone)]
pub struct Marks {
    /// Their colour.
    pub colour: Colour,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// A chart of lines (and marks) over x.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Its caption.
    pub title: String,
    /// What x is (`epoch`: whole numbers on the axis).
    pub x_desc: String,
    /// The x range drawn.
    pub x_range: (f64, f64),
    /// The lines, each with a legend entry.
    pub lines: Vec<Line>,
    /// Crosses.
    pub marks: Vec<Marks>,
}

/// A panel of lines over `x`, with marker-only series drawn as crosses.
fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> std::result::Result<(), String> {
    let epochs = panel.x_range;
    let integral = panel.x_desc == "epoch";
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    let y = padded_range(
        panel
            .lines
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(panel.marks.iter().flat_map(|m| m.points.iter().map(|p| p.1))),
        (0.0, 1.0),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(epochs.0..epochs.1, y.0..y.1)
        .map_err(e)?;
    let small = y.0.abs().max(y.1.abs()) < 1e-2;
    chart
        .configure_mesh()
        .x_desc(&panel.x_desc)
        .x_label_formatter(&|x| if integral { format!("{x:.0}") } else { format!("{x:.3}") })
        .y_label_formatter(&|v| if small { format!("{v:.2e}") } else { format!("{v:.3}") })
        .light_line_style(WHITE.mix(0.0))
        .label_style((FAMILY, 11))
        .draw()
        .map_err(e)?;
    for line in &panel.lines {
        let colour = line.colour.rgb();
        let finite: Vec<(f64, f64)> = line.points.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(finite.iter().copied(), colour.stroke_width(2)))
            .map_err(e)?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        if finite.len() < 40 {
            chart.draw_series(finite.iter().map(|&p| Circle::new(p, 2, colour.filled()))).map_err(e)?;
        }
    }
    for marks in &panel.marks {
        let colour = marks.colour.rgb();
        let finite = marks.points.iter().copied().filter(|p| p.1.is_finite());
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

/// Writes `stem.svg` and `stem.png` (`size` pixels): `panels` laid out in a grid of `rows` x
/// `columns`, under `title` (at `title_size` points).
pub fn write_panels(
    stem: &Path,
    title: &str,
    title_size: u32,
    size: (u32, u32),
    (rows, columns): (usize, usize),
    panels: &[Panel],
) -> Result<()> {
    macro_rules! picture {
        ($root:expr) => {{
            let root = $root;
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let root = root.titled(title, (FAMILY, title_size)).map_err(|e| e.to_string())?;
            let areas = if rows * columns == 1 { vec![root] } else { root.split_evenly((rows, columns)) };
            for (area, panel) in areas.iter().zip(panels) {
                draw_panel(area, panel)?;
            }
            Ok(())
        }};
    }
    both_with(stem, size, |svg| picture!(svg), |png| picture!(png))
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

/// A row of a dot chart: a value (a dot, in the good or the bad colour), a reference from
/// which a grey bar runs to the value (with a grey tick), and a mark (a black tick).
#[derive(Debug, Clone)]
pub struct DotRow {
    /// The row's label on the y axis.
    pub label: String,
    /// The dot.
    pub value: f64,
    /// Whether the dot is drawn in the good colour (blue) or the bad one (red).
    pub good: bool,
    /// Where the grey bar starts (not drawn when not finite).
    pub reference: f64,
    /// The black tick (not drawn when not finite).
    pub mark: f64,
}

/// A dot chart: one row per item, from the bottom up.
#[derive(Debug, Clone)]
pub struct DotChart {
    /// Its caption.
    pub title: String,
    /// What x is.
    pub x_desc: String,
    /// The x range drawn.
    pub x_range: (f64, f64),
    /// The rows, bottom first.
    pub rows: Vec<DotRow>,
    /// Legend labels of the good dot, the bad dot, the reference and the mark.
    pub legend: [String; 4],
}

/// Writes `stem.svg` and `stem.png` of a dot chart, 1,000 pixels wide and tall enough for its
/// rows.
pub fn write_dots(stem: &Path, chart: &DotChart) -> Result<()> {
    let n = chart.rows.len();
    let labels: Vec<&str> = chart.rows.iter().map(|r| r.label.as_str()).collect();
    let height = (120 + 18 * n as u32).max(320);
    let (lo, hi) = chart.x_range;
    macro_rules! picture {
        ($root:expr) => {{
            let root = $root;
            let e = |x: String| x;
            root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
            let mut plot = ChartBuilder::on(root)
                .caption(&chart.title, (FAMILY, 17))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(300)
                .build_cartesian_2d(lo..hi, -0.5f64..(n as f64 - 0.5))
                .map_err(|x| e(x.to_string()))?;
            plot.configure_mesh()
                .y_labels(n)
                .y_label_formatter(&|y| {
                    let i = y.round();
                    if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                        labels[i as usize].to_owned()
                    } else {
                        String::new()
                    }
                })
                .x_desc(&chart.x_desc)
                .label_style((FAMILY, 11))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|x| e(x.to_string()))?;
            for (i, row) in chart.rows.iter().enumerate() {
                let y = i as f64;
                let colour = if row.good { BLUE } else { RED_ };
                if row.reference.is_finite() {
                    plot.draw_series(std::iter::once(PathElement::new(
                        vec![(row.reference, y), (row.value, y)],
                        GREY.mix(0.6).stroke_width(3),
                    )))
                    .map_err(|x| e(x.to_string()))?;
                    plot.draw_series(std::iter::once(PathElement::new(
                        vec![(row.reference, y - 0.3), (row.reference, y + 0.3)],
                        GREY.stroke_width(3),
                    )))
                    .map_err(|x| e(x.to_string()))?;
                }
                if row.mark.is_finite() {
                    plot.draw_series(std::iter::once(PathElement::new(
                        vec![(row.mark, y - 0.35), (row.mark, y + 0.35)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(|x| e(x.to_string()))?;
                }
                plot.draw_series(std::iter::once(Circle::new((row.value, y), 5, colour.filled())))
                    .map_err(|x| e(x.to_string()))?;
            }
            // The legend, drawn as series of no points so that plotters lays it out.
            for (name, colour) in chart.legend.iter().zip([BLUE, RED_, GREY, BLACK]) {
                plot.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(|x| e(x.to_string()))?
                    .label(name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
            }
            plot.configure_series_labels()
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

/// A point of a scatter plot: at (`x`, `y`) in blue, with a grey companion at (`x`,
/// `secondary`) when finite, and a name beside it when it has one.
#[derive(Debug, Clone)]
pub struct ScatterPoint {
    /// x.
    pub x: f64,
    /// y of the blue point.
    pub y: f64,
    /// y of the grey point.
    pub secondary: f64,
    /// A name written beside the blue point.
    pub name: Option<String>,
}

/// A scatter plot over equal axes, with the identity line.
#[derive(Debug, Clone)]
pub struct Scatter {
    /// Its title.
    pub title: String,
    /// The line under it.
    pub subtitle: String,
    /// What x is.
    pub x_desc: String,
    /// What y is.
    pub y_desc: String,
    /// The points (non-finite ones left out).
    pub points: Vec<ScatterPoint>,
}

/// Writes a scatter plot as SVG at `path` (480 x 480): blue points half transparent over grey
/// ones, the identity line, names beside the blue points that have one.
pub fn write_scatter(path: &Path, scatter: &Scatter) -> Result<()> {
    font()?;
    let points: Vec<&ScatterPoint> = scatter.points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).collect();
    let (lo, hi) = padded_range(points.iter().flat_map(|p| [p.x, p.y, p.secondary]), (0.0, 1.0));
    let draw = || -> std::result::Result<(), String> {
        let e = |x: DrawingAreaErrorKind<std::io::Error>| x.to_string();
        let root = SVGBackend::new(path, (480, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(&scatter.title, (FAMILY, 15)).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&scatter.subtitle, (FAMILY, 11))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(lo..hi, lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(&scatter.x_desc)
            .y_desc(&scatter.y_desc)
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
                    .filter(|p| p.secondary.is_finite())
                    .map(|p| Circle::new((p.x, p.secondary), 3, GREY.mix(0.5).filled())),
            )
            .map_err(e)?;
        chart.draw_series(points.iter().map(|p| Circle::new((p.x, p.y), 3, BLUE.mix(0.6).filled()))).map_err(e)?;
        let names = points.iter().filter_map(|p| {
            let name = p.name.as_ref()?;
            Some(Text::new(format!(" {name}"), (p.x, p.y), (FAMILY, 9).into_font().color(&BLACK.mix(0.8))))
        });
        chart.draw_series(names).map_err(e)?;
        root.present().map_err(e)
    };
    draw().map_err(plot_error(path))
}

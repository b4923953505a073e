//! Per-condition SVG scatter plots: predicted against real (or true) mean of the top DEGs, with
//! the control mean for comparison and the identity line.

use std::fmt::Write as _;

use super::PlotData;

const SIZE: f64 = 420.0;
const MARGIN: f64 = 56.0;

/// A file-name-safe stem for a condition.
pub fn file_stem(name: &str) -> String {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.+".contains(c) { c } else { '_' }).collect();
    stem.chars().take(120).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

// Long: one SVG document written top to bottom.
/// The plot as an SVG document.
pub fn scatter_svg(title: &str, real_label: &str, data: &PlotData, r2: f64) -> String {
    let all = data.predicted.iter().chain(&data.real).chain(&data.control).copied().filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let plot = SIZE - 2.0 * MARGIN;
    let x = |v: f64| MARGIN + (v - lo) / (hi - lo) * plot;
    let y = |v: f64| SIZE - MARGIN - (v - lo) / (hi - lo) * plot;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" viewBox="0 0 {SIZE} {SIZE}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="13">{}</text>"#,
        SIZE / 2.0,
        escape(title)
    );
    let r2_text = if r2.is_finite() { format!("R2 of means (all genes) {r2:.3}") } else { String::new() };
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="36" text-anchor="middle" fill="#555">top {} DEGs, log1p means. {r2_text}</text>"##,
        SIZE / 2.0,
        data.genes.len()
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{MARGIN}" y="{MARGIN}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#bbb" stroke-dasharray="4 3"/>"##,
        x(lo),
        y(lo),
        x(hi),
        y(hi)
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            SIZE - MARGIN + 16.0
        );
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.2}</text>"#, MARGIN - 6.0, y(v) + 4.0);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        SIZE / 2.0,
        SIZE - 14.0,
        escape(real_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">mean (predicted, control)</text>"#,
        SIZE / 2.0,
        SIZE / 2.0
    );
    for ((gene, (&p, &r)), &c) in data.genes.iter().zip(data.predicted.iter().zip(&data.real)).zip(&data.control) {
        if !(p.is_finite() && r.is_finite()) {
            continue;
        }
        if c.is_finite() {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#aaa"><title>{} control {c:.3}</title></circle>"##,
                x(r),
                y(c),
                escape(gene)
            );
        }
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#1f77b4"><title>{} predicted {p:.3}, real {r:.3}</title></circle>"##,
            x(r),
            y(p),
            escape(gene)
        );
    }
    let _ = writeln!(
        svg,
        r##"<circle cx="{}" cy="{}" r="3" fill="#1f77b4"/><text x="{}" y="{}">predicted</text>"##,
        MARGIN + 10.0,
        MARGIN + 12.0,
        MARGIN + 18.0,
        MARGIN + 16.0
    );
    let _ = writeln!(
        svg,
        r##"<circle cx="{}" cy="{}" r="2.5" fill="#aaa"/><text x="{}" y="{}">control mean</text>"##,
        MARGIN + 10.0,
        MARGIN + 28.0,
        MARGIN + 18.0,
        MARGIN + 32.0
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_a_point_per_gene_and_escapes_names() {
        let data = PlotData {
            genes: vec!["A<1>".into(), "B".into()],
            predicted: vec![0.5, 1.0],
            real: vec![0.4, 1.2],
            control: vec![0.1, f64::NAN],
        };
        let svg = scatter_svg("X & Y", "real mean", &data, 0.9);
        assert_eq!(svg.matches("fill=\"#1f77b4\"><title>").count(), 2);
        assert_eq!(svg.matches("control 0.100").count(), 1);
        assert!(svg.contains("X &amp; Y") && svg.contains("A&lt;1&gt;"));
        assert_eq!(file_stem("k562_A+B_1+1/x"), "k562_A+B_1+1_x");
    }
}

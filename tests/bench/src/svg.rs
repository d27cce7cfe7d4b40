//! Plain SVG for the bench report: horizontal bar panels and a latency CDF. No plotting
//! dependency; the output opens in any browser.

use std::fmt::Write;

/// One panel of bars with its own scale.
#[derive(Debug)]
pub struct Panel {
    pub title: String,
    pub bars: Vec<(String, f64)>,
}

const WIDTH: f64 = 720.0;
const LABEL: f64 = 200.0;
const BAR: f64 = 18.0;
const GAP: f64 = 6.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The opening tag of a `WIDTH` x `height` image and its title.
fn header(height: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12"><text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    )
}

/// Panels of horizontal bars, one under the other, each scaled to its largest value.
pub fn bars(title: &str, panels: &[Panel]) -> String {
    let panel_height = |p: &Panel| 28.0 + p.bars.len() as f64 * (BAR + GAP) + 12.0;
    let height = 40.0 + panels.iter().map(panel_height).sum::<f64>();
    let mut svg = header(height, title);
    let mut y = 40.0;
    for p in panels {
        let _ = write!(
            svg,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 16.0,
            escape(&p.title)
        );
        y += 28.0;
        let max = p
            .bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        for (i, (label, value)) in p.bars.iter().enumerate() {
            let v = if value.is_finite() { *value } else { 0.0 };
            let w = (WIDTH - LABEL - 90.0) * v / max;
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{LABEL}" y="{y}" width="{w:.1}" height="{BAR}" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                LABEL - 6.0,
                y + 13.0,
                escape(label),
                COLOURS[i % COLOURS.len()],
                LABEL + w + 6.0,
                y + 13.0,
                fmt_value(v)
            );
            y += BAR + GAP;
        }
        y += 12.0;
    }
    svg.push_str("</svg>\n");
    svg
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Latency CDF: one line per system through its (percentile, microseconds) points, on a
/// logarithmic latency axis.
pub fn cdf(title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> String {
    let (h, left, right, top, bottom) = (420.0, 60.0, 180.0, 40.0, 50.0);
    let plot_w = WIDTH - left - right;
    let plot_h = h - top - bottom;
    let values = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi {
        (1.0, 10.0)
    } else {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let x = |us: f64| left + plot_w * (us.max(1e-3).log10() - lo) / (hi - lo);
    let y = |pct: f64| top + plot_h * (1.0 - pct / 100.0);
    let mut svg = header(h, title);
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>"##
    );
    let mut decade = lo;
    while decade <= hi {
        let xv = x(10f64.powf(decade));
        let _ = write!(
            svg,
            r##"<line x1="{xv:.1}" y1="{top}" x2="{xv:.1}" y2="{}" stroke="#ddd"/><text x="{xv:.1}" y="{}" text-anchor="middle">{} us</text>"##,
            top + plot_h,
            top + plot_h + 16.0,
            fmt_value(10f64.powf(decade))
        );
        decade += 1.0;
    }
    for pct in [0.0, 25.0, 50.0, 75.0, 90.0, 100.0] {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{pct}%</text>"#,
            left - 6.0,
            y(pct) + 4.0
        );
    }
    for (i, (name, points)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.1.is_finite() && p.1 > 0.0)
            .map(|&(pct, us)| format!("{:.1},{:.1}", x(us), y(pct)))
            .collect();
        if path.is_empty() {
            continue;
        }
        let _ = write!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/><rect x="{}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            path.join(" "),
            WIDTH - right + 12.0,
            top + 20.0 * i as f64,
            WIDTH - right + 30.0,
            top + 20.0 * i as f64 + 11.0,
            escape(name)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>"#,
        left + plot_w / 2.0,
        h - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_each_panel_and_escape_labels() {
        let svg = bars(
            "t",
            &[Panel {
                title: "a<b".into(),
                bars: vec![("x & y".into(), 50.0), ("z".into(), 100.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a&lt;b") && svg.contains("x &amp; y"));
        // The largest bar spans the whole bar area; the other half of it.
        let full = WIDTH - LABEL - 90.0;
        assert!(svg.contains(&format!("width=\"{full:.1}\"")));
        assert!(svg.contains(&format!("width=\"{:.1}\"", full / 2.0)));
    }

    #[test]
    fn cdf_draws_one_line_per_curve() {
        let svg = cdf(
            "lat",
            &[
                ("a".into(), vec![(50.0, 100.0), (99.0, 1000.0)]),
                ("b".into(), vec![(50.0, 200.0), (99.0, f64::NAN)]),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("100 us") && svg.contains("1000 us"));
    }
}

//! The end-of-run plot: a hand-written SVG with two panels side by side.
//!
//! Left: test accuracy (%) per round. Right: test loss and train loss per round. Both panels share
//! the round axis. Rounds without a value are left out of that series' line (no zero is drawn for
//! them), as are non-finite values and values too large to place (|v| > 1e150), so no coordinate is
//! ever NaN or infinite.

use super::axis::Axis;
use super::{MetricsError, RoundRecord};
use std::fmt::Write as _;
use std::path::Path;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 460.0;
/// Top of the panels (the title sits above).
const PANEL_TOP: f64 = 48.0;
const PANEL_W: f64 = 485.0;
const PANEL_H: f64 = 400.0;
const PANEL_GAP: f64 = 10.0;
/// Margins of the plot area inside a panel: room for the heading and legend, tick labels, axis labels.
const PLOT_LEFT: f64 = 70.0;
const PLOT_RIGHT: f64 = 15.0;
const PLOT_TOP: f64 = 48.0;
const PLOT_BOTTOM: f64 = 48.0;
/// Markers are drawn on each point up to this many points per series (beyond, the line alone).
const MAX_MARKERS: usize = 60;
/// Values beyond this magnitude are not plotted (their differences would overflow).
const MAX_PLOTTABLE: f64 = 1e150;

const ACC_COLOR: &str = "#1f77b4";
const TEST_LOSS_COLOR: &str = "#d62728";
const TRAIN_LOSS_COLOR: &str = "#2ca02c";

/// An SVG (hand-written XML, no dependency) with two panels side by side: (1) test accuracy per
/// round (in %), (2) test loss and train loss per round; axes with ticks and labels, a legend, the
/// title. A run the server did not evaluate (a model with local parameters) plots the clients'
/// own measures instead: their test RMSE (`data-series="client-test-rmse"`) or accuracy
/// (`"client-test-accuracy"`), and their test loss.
///
/// Rounds without evaluation are skipped in the accuracy/test-loss lines (no gaps drawn as zero).
/// Renders with any number of rounds, including none; a panel without data says so ("no evaluation
/// recorded", "no loss recorded"). Non-finite values are skipped, so no coordinate is NaN or
/// infinite. The title is escaped for XML. Each series is one `<polyline>` with one point per
/// plotted round, tagged `data-series="test-accuracy"`, `"test-loss"` or `"train-loss"`.
///
/// The string starts with `<svg` and ends with `</svg>` (no XML declaration, no trailing newline).
pub fn render_plot_svg(records: &[RoundRecord], title: &str) -> String {
    let client = |name: &'static str| move |r: &RoundRecord| r.strategy.get(name).copied();
    // The first panel shows what the task is measured by: the server's test accuracy; for
    // models only the clients can evaluate (local parameters), their own test RMSE (a real
    // target) or accuracy.
    let server_acc = series(records, |r| r.test_accuracy.map(|a| a * 100.0));
    let rmse = series(records, client("client_test_rmse"));
    let client_acc = series(records, |r| {
        client("client_test_accuracy")(r).map(|a| a * 100.0)
    });
    let (acc, measure) = if !server_acc.is_empty() {
        (
            server_acc,
            Measure::Accuracy("test-accuracy", "Test accuracy"),
        )
    } else if !rmse.is_empty() {
        (rmse, Measure::Rmse)
    } else if !client_acc.is_empty() {
        (
            client_acc,
            Measure::Accuracy(
                "client-test-accuracy",
                "Test accuracy (clients' own test sets)",
            ),
        )
    } else {
        (
            server_acc,
            Measure::Accuracy("test-accuracy", "Test accuracy"),
        )
    };
    let test_loss = series(records, |r| {
        r.test_loss.or_else(|| client("client_test_loss")(r))
    });
    let train_loss = series(records, |r| r.train_loss);

    let (rmin, rmax) = min_max(records.iter().map(|r| r.round as f64)).unwrap_or((0.0, 1.0));
    let (rmin, rmax) = if rmin == rmax {
        // One round: give it some room, without negative rounds.
        let lo = (rmin - 1.0).max(0.0);
        (lo, lo + 2.0)
    } else {
        (rmin, rmax)
    };
    let x_axis = Axis::new(rmin, rmax, 8, 1.0);

    let mut svg = String::new();
    let title = xml_escape(title);
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<title>{title}</title>
<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>
<text x="{}" y="30" text-anchor="middle" font-size="18" font-weight="bold">{title}</text>
"##,
        WIDTH / 2.0
    );

    // Panel 1: accuracy.
    let acc_panel = Panel::new(0);
    let acc_last = acc.last().map(|&(_, v)| v);
    let acc_label = match (acc_last, measure) {
        (Some(v), Measure::Accuracy(..)) => format!("test accuracy (last {v:.2}%)"),
        (Some(v), Measure::Rmse) => format!("test RMSE (last {v:.4})"),
        (None, _) => "test accuracy".to_string(),
    };
    // Accuracy stays within 0..=100 % unless the data do not; an error from 0 up.
    let acc_axis = min_max(acc.iter().map(|&(_, v)| v)).map(|(lo, hi)| {
        let mut axis = Axis::new(lo, hi, 6, 0.0);
        if lo >= 0.0 {
            axis.lo = axis.lo.max(0.0);
        }
        if hi <= 100.0 && matches!(measure, Measure::Accuracy(..)) {
            axis.hi = axis.hi.min(100.0);
        }
        axis.retain_ticks();
        axis
    });
    let (id, panel_title, unit) = match measure {
        Measure::Accuracy(id, title) => (id, title, "accuracy (%)"),
        Measure::Rmse => (
            "client-test-rmse",
            "Test RMSE (clients' own test sets)",
            "RMSE",
        ),
    };
    acc_panel.draw(
        &mut svg,
        panel_title,
        unit,
        &x_axis,
        acc_axis.as_ref(),
        &[Line {
            id,
            label: &acc_label,
            color: ACC_COLOR,
            dashed: false,
            points: &acc,
        }],
        "no evaluation recorded",
    );

    // Panel 2: losses.
    let loss_panel = Panel::new(1);
    let loss_axis =
        min_max(test_loss.iter().chain(&train_loss).map(|&(_, v)| v)).map(|(lo, hi)| {
            let mut axis = Axis::new(lo, hi, 6, 0.0);
            if lo >= 0.0 {
                axis.lo = axis.lo.max(0.0);
                axis.retain_ticks();
            }
            axis
        });
    let mut lines = Vec::new();
    if !test_loss.is_empty() {
        lines.push(Line {
            id: "test-loss",
            label: "test loss",
            color: TEST_LOSS_COLOR,
            dashed: false,
            points: &test_loss,
        });
    }
    if !train_loss.is_empty() {
        lines.push(Line {
            id: "train-loss",
            label: "train loss",
            color: TRAIN_LOSS_COLOR,
            dashed: true,
            points: &train_loss,
        });
    }
    loss_panel.draw(
        &mut svg,
        "Loss",
        "loss",
        &x_axis,
        loss_axis.as_ref(),
        &lines,
        "no loss recorded",
    );

    svg.push_str("</svg>");
    svg
}

/// Writes [`render_plot_svg`] to `path` (with a final newline).
pub fn write_plot_svg(
    records: &[RoundRecord],
    path: &Path,
    title: &str,
) -> Result<(), MetricsError> {
    let mut svg = render_plot_svg(records, title);
    svg.push('\n');
    std::fs::write(path, svg).map_err(MetricsError::io(path))
}

/// Horizontal room of one legend entry.
fn legend_width(label: &str) -> f64 {
    45.0 + 6.5 * label.chars().count() as f64
}

/// Height of one legend line.
const LEGEND_ROW: f64 = 16.0;

/// Colors of the curves of a comparison, in order (then repeated, dashed).
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One curve of a comparison: a label and its (round, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Legend label.
    pub label: String,
    /// (round, value) points; non-finite values are left out.
    pub points: Vec<(f64, f64)>,
}

/// One panel of a comparison: a heading and its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePanel {
    /// Heading above the panel.
    pub heading: String,
    /// The curves, each with its own color.
    pub curves: Vec<Curve>,
}

/// An SVG comparing curves (e.g. test accuracy per round of several strategies), one panel per
/// setting side by side, sharing one round axis and one `y_label` axis, each panel with a legend.
/// Curves are `<polyline>`s tagged `data-series="<label>"`. Non-finite points are left out.
pub fn render_curves_svg(title: &str, y_label: &str, panels: &[CurvePanel]) -> String {
    let clean = |c: &Curve| -> Vec<(f64, f64)> {
        c.points
            .iter()
            .copied()
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && y.abs() <= MAX_PLOTTABLE)
            .collect()
    };
    let points: Vec<Vec<Vec<(f64, f64)>>> = panels
        .iter()
        .map(|p| p.curves.iter().map(clean).collect())
        .collect();
    let all = || points.iter().flatten().flatten();
    let (xmin, xmax) = min_max(all().map(|p| p.0)).unwrap_or((0.0, 1.0));
    let (xmin, xmax) = if xmin == xmax {
        ((xmin - 1.0).max(0.0), (xmin - 1.0).max(0.0) + 2.0)
    } else {
        (xmin, xmax)
    };
    let x_axis = Axis::new(xmin, xmax, 8, 1.0);
    let y_axis = min_max(all().map(|p| p.1)).map(|(lo, hi)| Axis::new(lo, hi, 6, 0.0));
    let rows = panels
        .iter()
        .map(|p| {
            let labels: Vec<&str> = p.curves.iter().map(|c| c.label.as_str()).collect();
            Panel::legend_rows(&labels)
        })
        .max()
        .unwrap_or(1);
    let width = PANEL_GAP + panels.len().max(1) as f64 * (PANEL_W + PANEL_GAP);
    let height = HEIGHT + LEGEND_ROW * (rows - 1) as f64;
    let mut svg = String::new();
    let title = xml_escape(title);
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<title>{title}</title>
<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>
<text x="{}" y="30" text-anchor="middle" font-size="18" font-weight="bold">{title}</text>
"##,
        width / 2.0
    );
    for (i, (panel, pts)) in panels.iter().zip(&points).enumerate() {
        let lines: Vec<Line<'_>> = panel
            .curves
            .iter()
            .zip(pts)
            .enumerate()
            .map(|(k, (c, p))| Line {
                id: &c.label,
                label: &c.label,
                color: PALETTE[k % PALETTE.len()],
                dashed: k >= PALETTE.len(),
                points: p,
            })
            .collect();
        Panel::with_legend_rows(i, rows).draw(
            &mut svg,
            &panel.heading,
            y_label,
            &x_axis,
            y_axis.as_ref(),
            &lines,
            "nothing recorded",
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The plottable (round, value) points of one series, sorted by round.
fn series(records: &[RoundRecord], value: impl Fn(&RoundRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| value(r).map(|v| (r.round as f64, v)))
        .filter(|&(_, v)| v.is_finite() && v.abs() <= MAX_PLOTTABLE)
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// One series of a panel.
/// What the first panel shows.
#[derive(Clone, Copy)]
enum Measure {
    /// An accuracy in %: the series id and the panel's title.
    Accuracy(&'static str, &'static str),
    /// The clients' test RMSE.
    Rmse,
}

struct Line<'a> {
    /// `data-series` attribute.
    id: &'a str,
    label: &'a str,
    color: &'a str,
    dashed: bool,
    points: &'a [(f64, f64)],
}

/// The plot area of one panel, in SVG coordinates.
struct Panel {
    /// Left edge of the panel (headings and tick labels start here).
    x0: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Panel {
    fn new(index: usize) -> Panel {
        Self::with_legend_rows(index, 1)
    }

    /// A panel whose legend takes `rows` lines above the plot area.
    fn with_legend_rows(index: usize, rows: usize) -> Panel {
        let x0 = PANEL_GAP + index as f64 * (PANEL_W + PANEL_GAP);
        let extra = LEGEND_ROW * rows.saturating_sub(1) as f64;
        Panel {
            x0,
            left: x0 + PLOT_LEFT,
            right: x0 + PANEL_W - PLOT_RIGHT,
            top: PANEL_TOP + PLOT_TOP + extra,
            bottom: PANEL_TOP + PANEL_H - PLOT_BOTTOM + extra,
        }
    }

    /// Lines the legend of `lines` takes in a panel (entries wrap at the plot area's width).
    fn legend_rows(labels: &[&str]) -> usize {
        let width = PANEL_W - PLOT_LEFT - PLOT_RIGHT;
        let (mut rows, mut x) = (1, 0.0);
        for label in labels {
            let w = legend_width(label);
            if x > 0.0 && x + w > width {
                rows += 1;
                x = 0.0;
            }
            x += w;
        }
        rows
    }

    fn px(&self, x_axis: &Axis, x: f64) -> f64 {
        self.left + x_axis.frac(x) * (self.right - self.left)
    }

    fn py(&self, y_axis: &Axis, y: f64) -> f64 {
        self.bottom - y_axis.frac(y) * (self.bottom - self.top)
    }

    /// Draws heading, frame, axes, the lines and the legend; `empty` replaces the lines when
    /// `y_axis` is `None` (no plottable value).
    #[allow(clippy::too_many_arguments)]
    fn draw(
        &self,
        svg: &mut String,
        heading: &str,
        y_label: &str,
        x_axis: &Axis,
        y_axis: Option<&Axis>,
        lines: &[Line<'_>],
        empty: &str,
    ) {
        let (l, r, t, b) = (self.left, self.right, self.top, self.bottom);
        let _ = writeln!(svg, "<g>");
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
            self.x0 + 4.0,
            PANEL_TOP + 16.0,
            xml_escape(heading)
        );

        // Y grid, ticks and labels.
        if let Some(y_axis) = y_axis {
            for &v in &y_axis.ticks {
                let y = self.py(y_axis, v);
                let _ = writeln!(
                    svg,
                    r##"<line x1="{l:.1}" y1="{y:.1}" x2="{r:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    l - 6.0,
                    y + 4.0,
                    y_axis.label(v)
                );
            }
        }
        // X ticks and labels.
        for &v in &x_axis.ticks {
            let x = self.px(x_axis, v);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{b:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                b + 5.0,
                b + 18.0,
                x_axis.label(v)
            );
        }
        // Frame and axis labels.
        let _ = writeln!(
            svg,
            r##"<rect x="{l:.1}" y="{t:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444444"/>"##,
            r - l,
            b - t
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#,
            (l + r) / 2.0,
            b + 36.0
        );
        let (yx, yy) = (self.x0 + 14.0, (t + b) / 2.0);
        let _ = writeln!(
            svg,
            r#"<text x="{yx:.1}" y="{yy:.1}" text-anchor="middle" transform="rotate(-90 {yx:.1} {yy:.1})">{}</text>"#,
            xml_escape(y_label)
        );

        match y_axis {
            None => {
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" fill="#777777">{}</text>"##,
                    (l + r) / 2.0,
                    (t + b) / 2.0,
                    xml_escape(empty)
                );
            }
            Some(y_axis) => {
                for line in lines {
                    self.draw_line(svg, x_axis, y_axis, line);
                }
                // Legend, left to right above the plot area, wrapping at its width.
                let mut x = l;
                let mut y = PANEL_TOP + 36.0;
                for line in lines {
                    if x > l && x + legend_width(line.label) > r {
                        x = l;
                        y += LEGEND_ROW;
                    }
                    let _ = writeln!(
                        svg,
                        r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{}/><text x="{:.1}" y="{y:.1}">{}</text>"#,
                        y - 4.0,
                        x + 22.0,
                        y - 4.0,
                        line.color,
                        dash(line.dashed),
                        x + 27.0,
                        xml_escape(line.label)
                    );
                    x += legend_width(line.label);
                }
            }
        }
        let _ = writeln!(svg, "</g>");
    }

    fn draw_line(&self, svg: &mut String, x_axis: &Axis, y_axis: &Axis, line: &Line<'_>) {
        let coords: Vec<(f64, f64)> = line
            .points
            .iter()
            .map(|&(x, y)| (self.px(x_axis, x), self.py(y_axis, y)))
            .collect();
        let points: Vec<String> = coords
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline data-series="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{} points="{}"/>"#,
            line.id,
            line.color,
            dash(line.dashed),
            points.join(" ")
        );
        if coords.len() <= MAX_MARKERS {
            for (x, y) in coords {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{}"/>"#,
                    line.color
                );
            }
        }
    }
}

fn dash(dashed: bool) -> &'static str {
    if dashed {
        r#" stroke-dasharray="6 3""#
    } else {
        ""
    }
}

/// Escapes text for XML content and attributes; characters XML 1.0 forbids become spaces.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(
            xml_escape(r#"a<b>&"c"'d'"#),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;"
        );
        assert_eq!(xml_escape("x\u{1}y"), "x y");
    }
}

//! Line charts as SVG text, drawn on the server so that the console's curves need no
//! JavaScript: one series of (x, y) points, optionally on a log scale and smoothed (an
//! exponential moving average, debiased as TensorBoard does), with axes, ticks, a
//! `<title>` and a `<desc>` for screen readers. Pure: text in, text out; every string
//! that reaches the SVG is escaped here.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 240.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;
/// Most points drawn per line: more are thinned by stride (the text stays small).
pub const MAX_DRAWN: usize = 1000;
const TICKS: usize = 5;

/// How to draw a chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartOpts {
    /// y on a log10 scale (non-positive values are left out, and the description says so).
    pub log_y: bool,
    /// Smoothing weight in `[0, 1)`: 0 draws the raw line only.
    pub smooth: f64,
}

/// `&`, `<`, `>`, `"` and `'` as entities.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A number as a tick label: short, exponent form when very large or small.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && a < 1e9 {
        format!("{v:.0}")
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// The debiased exponential moving average of `ys` with weight `w`.
pub fn smoothed(ys: &[f64], w: f64) -> Vec<f64> {
    let w = w.clamp(0.0, 0.999);
    let mut acc = 0.0;
    let mut out = Vec::with_capacity(ys.len());
    for (i, y) in ys.iter().enumerate() {
        acc = acc * w + (1.0 - w) * y;
        let debias = 1.0 - w.powi(i as i32 + 1);
        out.push(if debias > 0.0 { acc / debias } else { *y });
    }
    out
}

/// An SVG line chart of `points` (x ascending or not; drawn in the order given), titled
/// `title`, with element ids prefixed by `id` (unique in the page).
pub fn line_chart(
    id: &str,
    title: &str,
    x_label: &str,
    points: &[(f64, f64)],
    opts: ChartOpts,
) -> String {
    let (id, title_e, x_label) = (esc(id), esc(title), esc(x_label));
    let total = points.len();
    let pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!opts.log_y || *y > 0.0))
        .map(|(x, y)| (x, if opts.log_y { y.log10() } else { y }))
        .collect();
    let dropped = total - pts.len();
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg class="chart" id="{id}" viewBox="0 0 {W} {H}" role="img" aria-labelledby="{id}-t {id}-d" xmlns="http://www.w3.org/2000/svg"><title id="{id}-t">{title_e}</title>"#
    );
    if pts.is_empty() {
        let _ = write!(
            o,
            r##"<desc id="{id}-d">No points yet.</desc><text x="{}" y="{}" text-anchor="middle" fill="#333">No points yet</text></svg>"##,
            W / 2.0,
            H / 2.0
        );
        return o;
    }
    let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let smooth = (opts.smooth > 0.0).then(|| smoothed(&ys, opts.smooth));
    let (xa, xb) = bounds(pts.iter().map(|p| p.0));
    let (mut x0, mut x1) = (xa, xb);
    let (mut y0, mut y1) = bounds(ys.iter().copied());
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
        y0 -= pad;
        y1 += pad;
    } else {
        let pad = (y1 - y0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * (H - TOP - BOTTOM);
    let last = pts[pts.len() - 1];
    let shown = |y: f64| if opts.log_y { 10f64.powf(y) } else { y };
    let _ = write!(
        o,
        r#"<desc id="{id}-d">{n} points over {x_label} {a} to {b}; last value {v}{scale}{sm}{drop}.</desc>"#,
        n = pts.len(),
        a = fmt_num(xa),
        b = fmt_num(xb),
        v = fmt_num(shown(last.1)),
        scale = if opts.log_y { ", log scale" } else { "" },
        sm = if smooth.is_some() { ", smoothed" } else { "" },
        drop = if dropped > 0 {
            format!(", {dropped} not drawn (not positive or not finite)")
        } else {
            String::new()
        },
    );
    // Axes and ticks.
    let (bx, by) = (LEFT, H - BOTTOM);
    let _ = write!(
        o,
        r##"<g stroke="#555" stroke-width="1"><line x1="{bx}" y1="{TOP}" x2="{bx}" y2="{by}"/><line x1="{bx}" y1="{by}" x2="{}" y2="{by}"/></g><g font-size="11" fill="#222">"##,
        W - RIGHT
    );
    for i in 0..TICKS {
        let f = i as f64 / (TICKS - 1) as f64;
        let yv = y0 + f * (y1 - y0);
        let y = sy(yv);
        let _ = write!(
            o,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            bx,
            W - RIGHT,
            bx - 6.0,
            y + 4.0,
            esc(&fmt_num(shown(yv)))
        );
        let xv = x0 + f * (x1 - x0);
        let _ = write!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            sx(xv),
            by + 16.0,
            esc(&fmt_num(xv))
        );
    }
    let _ = write!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text></g>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 4.0
    );
    let stride = pts.len().div_ceil(MAX_DRAWN).max(1);
    let line = |ys: &mut dyn Iterator<Item = (f64, f64)>| {
        let mut s = String::new();
        for (x, y) in ys {
            let _ = write!(s, "{:.1},{:.1} ", sx(x), sy(y));
        }
        s
    };
    let raw = line(&mut pts.iter().copied().step_by(stride));
    let (raw_color, raw_width) = if smooth.is_some() {
        ("#8aa4cc", 1.0)
    } else {
        ("#1a4a94", 2.0)
    };
    let _ = write!(
        o,
        r#"<polyline class="raw" fill="none" stroke="{raw_color}" stroke-width="{raw_width}" points="{raw}"/>"#
    );
    if let Some(sm) = &smooth {
        let s = line(&mut pts.iter().zip(sm).map(|(p, y)| (p.0, *y)).step_by(stride));
        let _ = write!(
            o,
            r##"<polyline class="smooth" fill="none" stroke="#0b2e66" stroke-width="2" points="{s}"/>"##
        );
    }
    o.push_str("</svg>");
    o
}

fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polyline(svg: &str, class: &str) -> Vec<(f64, f64)> {
        let tag = format!(r#"class="{class}""#);
        let at = svg.find(&tag).expect("the line");
        let rest = &svg[at..];
        let p = rest.find("points=\"").expect("points") + 8;
        let end = rest[p..].find('"').unwrap();
        rest[p..p + end]
            .split_whitespace()
            .map(|xy| {
                let (x, y) = xy.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn a_falling_loss_draws_a_falling_line_inside_the_frame() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 10.0 - i as f64)).collect();
        let svg = line_chart(
            "c",
            "loss <mean>",
            "step",
            &pts,
            ChartOpts {
                log_y: false,
                smooth: 0.0,
            },
        );
        assert!(
            svg.contains("<title id=\"c-t\">loss &lt;mean&gt;</title>"),
            "{svg}"
        );
        assert!(svg.contains("10 points"), "{svg}");
        let line = polyline(&svg, "raw");
        assert_eq!(line.len(), 10);
        // SVG y grows downwards: a falling loss has growing y.
        assert!(line.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1));
        assert!(line
            .iter()
            .all(|(x, y)| (LEFT..=W).contains(x) && (0.0..=H).contains(y)));
        assert!(!svg.contains("class=\"smooth\""));
    }

    #[test]
    fn log_scale_leaves_out_what_it_cannot_draw_and_says_so() {
        let pts = [(0.0, 100.0), (1.0, 10.0), (2.0, 0.0), (3.0, 1.0)];
        let svg = line_chart(
            "c",
            "x",
            "step",
            &pts,
            ChartOpts {
                log_y: true,
                smooth: 0.0,
            },
        );
        let line = polyline(&svg, "raw");
        assert_eq!(line.len(), 3);
        // Equal ratios are equal distances.
        let d1 = line[1].1 - line[0].1;
        let d2 = line[2].1 - line[1].1;
        assert!((d1 - d2).abs() < 0.2, "{d1} {d2}");
        assert!(
            svg.contains("1 not drawn") && svg.contains("log scale"),
            "{svg}"
        );
    }

    #[test]
    fn smoothing_is_a_debiased_moving_average() {
        let s = smoothed(&[1.0, 1.0, 1.0], 0.9);
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12), "{s:?}");
        let s = smoothed(&[0.0, 10.0], 0.5);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 5.0 / 0.75).abs() < 1e-12);
        let svg = line_chart(
            "c",
            "x",
            "step",
            &[(0.0, 1.0), (1.0, 3.0)],
            ChartOpts {
                log_y: false,
                smooth: 0.6,
            },
        );
        assert_eq!(polyline(&svg, "smooth").len(), 2);
    }

    #[test]
    fn no_points_and_one_point_still_draw() {
        let svg = line_chart(
            "c",
            "x",
            "step",
            &[],
            ChartOpts {
                log_y: false,
                smooth: 0.0,
            },
        );
        assert!(svg.contains("No points yet"));
        let svg = line_chart(
            "c",
            "x",
            "step",
            &[(3.0, 2.0)],
            ChartOpts {
                log_y: false,
                smooth: 0.0,
            },
        );
        assert_eq!(polyline(&svg, "raw").len(), 1);
    }
}

//! A live line plot (SVG) with several named series, redrawn in place while a cell runs.
//!
//! The SVG is written by hand rather than through plotters: plotters needs a font backend to
//! measure and draw axis labels, which the prelude does not build, and a plot this simple is
//! a hundred lines of deterministic, dependency-free output.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::display::{escape_html, evcxr_print, show, Display, MimeBundle, Rich};
use super::protocol::in_kernel;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 140.0;
const TOP: f64 = 32.0;
const BOTTOM: f64 = 44.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// `let mut plot = LinePlot::new("loss");` then `plot.push("run 1", step, loss)` in a loop.
/// The first point shows the plot; later points redraw it at most five times a second, and
/// [`LinePlot::finish`] draws the final state. Outside the kernel nothing is drawn while
/// points arrive and `finish` prints a one-line summary per series.
#[derive(Debug)]
pub struct LinePlot {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<(String, Vec<(f64, f64)>)>,
    display: Option<Display>,
    last_draw: Option<Instant>,
}

impl LinePlot {
    pub fn new(title: &str) -> Self {
        LinePlot {
            title: title.into(),
            x_label: "step".into(),
            y_label: String::new(),
            series: vec![],
            display: None,
            last_draw: None,
        }
    }

    pub fn x_label(mut self, label: &str) -> Self {
        self.x_label = label.into();
        self
    }

    pub fn y_label(mut self, label: &str) -> Self {
        self.y_label = label.into();
        self
    }

    /// Adds a point to the named series (created on first use) and redraws when due.
    pub fn push(&mut self, series: &str, x: f64, y: f64) {
        if !self.add_point(series, x, y) {
            return;
        }
        if in_kernel()
            && self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
        {
            self.draw();
        }
    }

    /// Adds a point without drawing (for building a plot shown later). Non-finite points are
    /// skipped; returns whether the point was added.
    pub fn add_point(&mut self, series: &str, x: f64, y: f64) -> bool {
        if !(x.is_finite() && y.is_finite()) {
            return false;
        }
        match self.series.iter_mut().find(|(name, _)| name == series) {
            Some((_, points)) => points.push((x, y)),
            None => self.series.push((series.into(), vec![(x, y)])),
        }
        true
    }

    /// Draws the final state (in the notebook) or prints a summary (elsewhere).
    pub fn finish(&mut self) {
        if in_kernel() {
            self.draw();
        } else {
            println!("{}", self.summary());
        }
    }

    /// The points of one series.
    pub fn points(&self, series: &str) -> Option<&[(f64, f64)]> {
        self.series
            .iter()
            .find(|(n, _)| n == series)
            .map(|(_, p)| p.as_slice())
    }

    /// Called by evcxr when the plot is the last expression of a cell.
    pub fn evcxr_display(&self) {
        evcxr_print(&self.mime_bundle());
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        match &self.display {
            Some(d) => d.update(&*self),
            None => self.display = Some(show(&*self)),
        }
    }

    fn summary(&self) -> String {
        let mut s = format!("{}:", self.title);
        for (name, points) in &self.series {
            if let Some((x, y)) = points.last() {
                let _ = write!(s, " {name} ({} points, last {x}: {y:.4})", points.len());
            }
        }
        s
    }

    /// The plot as a standalone SVG document.
    pub fn svg(&self) -> String {
        let points = self.series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = range(points.clone().map(|p| p.0));
        let (y0, y1) = range(points.map(|p| p.1));
        let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>",
            LEFT + pw / 2.0,
            escape_html(&self.title)
        );
        for t in ticks(x0, x1) {
            let x = sx(t);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                TOP + ph,
                TOP + ph + 16.0,
                label(t)
            );
        }
        for t in ticks(y0, y1) {
            let y = sy(t);
            let _ = writeln!(
                svg,
                "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            LEFT + pw / 2.0,
            HEIGHT - 8.0,
            escape_html(&self.x_label),
            TOP + ph / 2.0,
            escape_html(&self.y_label)
        );
        for (i, (name, points)) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                path.join(" ")
            );
            let ly = TOP + 12.0 + 18.0 * i as f64;
            let lx = LEFT + pw + 12.0;
            let _ = writeln!(
                svg,
                "<line x1=\"{lx}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\
                 <text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                lx + 24.0,
                escape_html(name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

impl Rich for LinePlot {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("image/svg+xml".to_string(), self.svg()),
            ("text/plain".to_string(), self.summary()),
        ])
    }
}

/// The data range, widened when empty or flat so that scaling never divides by zero.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// Round tick positions (1, 2 or 5 times a power of ten) inside `[lo, hi]`, about five of them.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(0.15, 0.9), vec![0.2, 0.4, 0.6000000000000001, 0.8]);
        assert_eq!(label(0.6000000000000001), "0.6");
    }

    #[test]
    fn svg_has_one_polyline_per_series_and_a_legend() {
        let mut plot = LinePlot::new("loss <train>").y_label("loss");
        for step in 0..10 {
            plot.push("run 1", step as f64, 2.0 / (1.0 + step as f64));
            plot.push("run 2", step as f64, 1.5 / (1.0 + step as f64));
        }
        plot.push("run 2", 11.0, f64::NAN); // ignored
        let svg = plot.svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">run 2</text>"));
        assert!(svg.contains("loss &lt;train&gt;"));
        assert_eq!(plot.points("run 1").unwrap().len(), 10);
        assert_eq!(plot.points("run 2").unwrap().len(), 10);
    }

    #[test]
    fn an_empty_or_flat_plot_still_renders() {
        assert!(LinePlot::new("empty").svg().ends_with("</svg>\n"));
        let mut flat = LinePlot::new("flat");
        flat.push("a", 1.0, 3.0);
        assert!(!flat.svg().contains("NaN"));
    }
}

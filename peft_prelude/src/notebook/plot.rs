//! A live line plot with several named series, drawn with plotters (SVG) and redrawn in place
//! while a cell runs. The run overlays of `train::plot_runs` are the same plot.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use plotters::prelude::*;

use super::display::{evcxr_print, show, Display, MimeBundle, Rich};
use super::figure::{render_svg, SANS};
use super::protocol::in_kernel;

const SIZE: (u32, u32) = (640, 360);
/// matplotlib's default cycle, so the curves look as Python users expect.
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
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

    /// The plot as a standalone SVG document (plotters' SVG backend; the labels are laid out
    /// with the bundled DejaVu Sans metrics and drawn in the page's sans-serif font).
    pub fn svg(&self) -> String {
        let points = self.series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = range(points.clone().map(|p| p.0));
        let (y0, y1) = range(points.map(|p| p.1));
        // Room above and below the curves.
        let pad = 0.05 * (y1 - y0);
        let (y0, y1) = (y0 - pad, y1 + pad);
        render_svg(SIZE, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(&self.title, (SANS, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .label_style((SANS, 14))
                .axis_desc_style((SANS, 15))
                .light_line_style(TRANSPARENT)
                .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
                .x_label_formatter(&|v| label(*v))
                .y_label_formatter(&|v| label(*v))
                .draw()?;
            for (i, (name, points)) in self.series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            if !self.series.is_empty() {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font((SANS, 14))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(0xbb, 0xbb, 0xbb))
                    .draw()?;
            }
            Ok(())
        })
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

/// A tick label: integers as they are, small values in scientific notation (learning rates),
/// others with at most four decimals.
fn label(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else if v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn labels_are_short() {
        assert_eq!(label(0.6000000000000001), "0.6");
        assert_eq!(label(12.0), "12");
        assert_eq!(label(2.5e-5), "2.5e-5");
    }

    #[test]
    fn svg_has_one_line_per_series_and_a_legend() {
        let mut plot = LinePlot::new("loss <train>").y_label("loss");
        for step in 0..10 {
            plot.push("run 1", step as f64, 2.0 / (1.0 + step as f64));
            plot.push("run 2", step as f64, 1.5 / (1.0 + step as f64));
        }
        plot.push("run 2", 11.0, f64::NAN); // ignored
        let svg = plot.svg();
        assert!(svg.starts_with("<svg"), "{svg}");
        // Each series: its curve and its legend sample, in its colour.
        for color in ["#1F77B4", "#FF7F0E"] {
            let lines = svg.matches(&format!("stroke=\"{color}\"")).count();
            assert_eq!(lines, 2, "{color}: {lines} elements");
        }
        assert_eq!(
            svg.matches("<polyline").count() - svg.matches("stroke=\"#000000\"").count(),
            4
        );
        for text in ["run 1", "run 2", "loss &lt;train&gt;", "loss", "step"] {
            assert!(has_text(&svg, text), "no text {text:?}");
        }
        assert_eq!(plot.points("run 1").unwrap().len(), 10);
        assert_eq!(plot.points("run 2").unwrap().len(), 10);
    }

    #[test]
    fn an_empty_or_flat_plot_still_renders() {
        assert!(LinePlot::new("empty").svg().trim_end().ends_with("</svg>"));
        let mut flat = LinePlot::new("flat");
        flat.push("a", 1.0, 3.0);
        let svg = flat.svg();
        assert!(!svg.contains("NaN") && has_text(&svg, "a"), "{svg}");
    }

    /// Whether the SVG has a text element reading `text` (plotters puts it on its own line).
    pub(crate) fn has_text(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{text}\n</text>")) || svg.contains(&format!(">{text}</text>"))
    }
}

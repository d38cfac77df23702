//! Charts drawn with plotters, the library Rust notebook users already draw with, shown inline
//! and redrawn in place. Our own plots ([`super::LinePlot`]) are drawn the same way.
//!
//! ```no_run
//! use peft_prelude::notebook::Figure;
//! use plotters::prelude::*;
//!
//! let mut fig = Figure::new(640, 360);
//! for n in 1..=5 {
//!     fig.draw(|root| {
//!         let mut chart = ChartBuilder::on(root)
//!             .margin(10)
//!             .x_label_area_size(30)
//!             .y_label_area_size(40)
//!             .build_cartesian_2d(0f64..10.0, 0f64..1.0)?;
//!         chart.configure_mesh().draw()?;
//!         chart.draw_series(LineSeries::new((0..=n * 20).map(|i| (i as f64 / 10.0, (i as f64 / 20.0).sin().abs())), &BLUE))?;
//!         Ok(())
//!     })?;
//! }
//! # Ok::<(), peft_prelude::Error>(())
//! ```

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::display::{evcxr_print, show, Display, MimeBundle, Rich};
use super::protocol::in_kernel;
use crate::error::{Error, Result};

/// The font family plotters lays text out with: the bundled DejaVu Sans (a subset: Latin,
/// Greek, common punctuation and math signs), so labels are measured the same on every
/// machine, fonts installed or not. The SVG names the family `sans-serif`; the browser draws it.
pub const SANS: &str = "sans-serif";

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");

/// Registers the bundled font with plotters (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are checked by `font_is_valid` below; a failure would only lose labels.
        let _ = plotters::style::register_font(SANS, FontStyle::Normal, FONT);
    });
}

/// What a drawing closure returns (plotters' errors are boxed).
pub type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Runs `draw` on a white SVG canvas of `size` pixels and returns the SVG document. A drawing
/// error becomes an SVG that says what went wrong (a plot never takes a cell down).
pub(crate) fn render_svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> String {
    try_render_svg(size, draw).unwrap_or_else(|e| {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\"><text x=\"10\" y=\"20\">{}</text></svg>\n",
            size.0,
            size.1,
            super::display::escape_html(&e.to_string())
        )
    })
}

fn try_render_svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<String> {
    register_font();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let plot_error = |e: Box<dyn std::error::Error>| {
            Error::InvalidArgument(format!("drawing the chart: {e}"))
        };
        root.fill(&WHITE).map_err(|e| plot_error(Box::new(e)))?;
        draw(&root).map_err(plot_error)?;
        root.present().map_err(|e| plot_error(Box::new(e)))?;
    }
    Ok(svg)
}

/// A plotters chart shown in the notebook: each [`draw`](Figure::draw) paints a fresh canvas;
/// the first shows it, later ones replace it in place (a chart that follows a running loop).
/// As a cell's last expression it is displayed too.
#[derive(Debug)]
pub struct Figure {
    size: (u32, u32),
    svg: String,
    display: Option<Display>,
}

impl Figure {
    pub fn new(width: u32, height: u32) -> Self {
        Figure {
            size: (width, height),
            svg: String::new(),
            display: None,
        }
    }

    /// Draws with plotters on a white `width × height` canvas, then shows the result (inside the
    /// kernel: a new output the first time, an in-place update after that).
    pub fn draw(
        &mut self,
        draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
    ) -> Result<&mut Self> {
        self.svg = try_render_svg(self.size, draw)?;
        if in_kernel() {
            match &self.display {
                Some(d) => d.update(&*self),
                None => self.display = Some(show(&*self)),
            }
        }
        Ok(self)
    }

    /// The last drawing, as an SVG document.
    pub fn svg(&self) -> &str {
        &self.svg
    }

    /// Called by evcxr when the figure is the last expression of a cell.
    pub fn evcxr_display(&self) {
        evcxr_print(&self.mime_bundle());
    }
}

impl Rich for Figure {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::from([
            ("image/svg+xml".to_string(), self.svg.clone()),
            (
                "text/plain".to_string(),
                format!("Figure {}x{}", self.size.0, self.size.1),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_font_lays_out_labels() {
        // ab_glyph can read the subset and measures text with it.
        register_font();
        let font: FontDesc = (SANS, 20).into_font();
        let (w, h) = font.box_size("loss 0.123").expect("the font measures text");
        assert!(w > 50 && h > 10, "{w}x{h}");
    }

    #[test]
    fn a_figure_draws_a_users_chart_and_redraws_it() {
        let mut fig = Figure::new(320, 200);
        fig.draw(|root| {
            let mut chart = ChartBuilder::on(root)
                .caption("squares", (SANS, 14))
                .x_label_area_size(20)
                .y_label_area_size(30)
                .build_cartesian_2d(0f64..4.0, 0f64..16.0)?;
            chart.configure_mesh().draw()?;
            chart.draw_series(LineSeries::new(
                (0..5).map(|x| (x as f64, (x * x) as f64)),
                &RED,
            ))?;
            Ok(())
        })
        .unwrap();
        assert!(super::super::plot::tests::has_text(fig.svg(), "squares"));
        assert!(fig.svg().contains("<polyline"));
        fig.draw(|root| {
            root.draw(&Circle::new((10, 10), 5, BLUE.filled()))?;
            Ok(())
        })
        .unwrap();
        assert!(!fig.svg().contains("squares"), "a fresh canvas each time");
        assert!(fig.svg().contains("<circle"));
        let err = Figure::new(10, 10)
            .draw(|_| Err("no data".into()))
            .unwrap_err();
        assert!(err.to_string().contains("no data"), "{err}");
    }
}

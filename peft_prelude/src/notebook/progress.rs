//! A progress bar with ETA and named metrics that redraws in place.

use std::time::{Duration, Instant};

use super::display::{escape_html, show, Display, MimeBundle, Rich};
use super::protocol::in_kernel;

/// `let mut bar = ProgressBar::new(100, "training");` then `bar.step(&[("loss", 1.2)])` per step.
/// Redraws at most ten times a second (always on the last step); outside the kernel prints a
/// line every few seconds instead.
#[derive(Debug)]
pub struct ProgressBar {
    label: String,
    total: u64,
    position: u64,
    metrics: Vec<(String, f64)>,
    started: Instant,
    last_draw: Option<Instant>,
    display: Option<Display>,
    /// Never shows itself (its HTML goes where its owner puts it, e.g. a widget).
    detached: bool,
}

impl ProgressBar {
    pub fn new(total: u64, label: &str) -> Self {
        ProgressBar {
            label: label.to_string(),
            total,
            position: 0,
            metrics: vec![],
            started: Instant::now(),
            last_draw: None,
            display: None,
            detached: false,
        }
    }

    /// A bar that keeps its state but never shows itself: its owner shows [`html`](Self::html).
    pub fn detached(total: u64, label: &str) -> Self {
        ProgressBar {
            detached: true,
            ..Self::new(total, label)
        }
    }

    /// Changes the number of steps (a run whose end moved).
    pub fn set_length(&mut self, total: u64) {
        self.total = total;
    }

    /// The bar as HTML.
    pub fn html(&self) -> String {
        self.mime_bundle().remove("text/html").unwrap_or_default()
    }

    /// Advances by one and records the given metrics (replacing earlier values of the same name).
    pub fn step(&mut self, metrics: &[(&str, f64)]) {
        self.set_position(self.position + 1, metrics);
    }

    /// Moves to `position` and records the given metrics.
    pub fn set_position(&mut self, position: u64, metrics: &[(&str, f64)]) {
        self.position = position.min(self.total.max(position));
        for (name, value) in metrics {
            match self.metrics.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = *value,
                None => self.metrics.push((name.to_string(), *value)),
            }
        }
        let interval = if in_kernel() {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        let done = self.position >= self.total;
        if done || self.last_draw.is_none_or(|t| t.elapsed() >= interval) {
            self.draw();
        }
    }

    /// Draws the final state (call after a loop that may have stopped early).
    pub fn finish(&mut self) {
        self.draw();
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        if self.detached {
            return;
        }
        match &self.display {
            Some(d) => d.update(&*self),
            None => self.display = Some(show(&*self)),
        }
    }

    fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.position as f64 / self.total as f64).min(1.0)
        }
    }

    /// Seconds left at the average pace so far.
    fn eta(&self) -> Option<f64> {
        let elapsed = self.started.elapsed().as_secs_f64();
        (self.position > 0 && self.position < self.total)
            .then(|| elapsed / self.position as f64 * (self.total - self.position) as f64)
    }

    fn summary(&self) -> String {
        let mut s = format!("{}/{}", self.position, self.total);
        s += &format!(" [{}", duration(self.started.elapsed().as_secs_f64()));
        if let Some(eta) = self.eta() {
            s += &format!(" < {}", duration(eta));
        }
        s.push(']');
        for (name, value) in &self.metrics {
            s += &format!(" {name}={}", metric(*value));
        }
        s
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// A metric as a person reads it: four decimals, or three significant digits for the small
/// values a learning rate takes (0.0000 says nothing).
fn metric(value: f64) -> String {
    if value != 0.0 && value.abs() < 0.01 {
        format!("{value:.2e}")
    } else {
        format!("{value:.4}")
    }
}

impl Rich for ProgressBar {
    fn mime_bundle(&self) -> MimeBundle {
        let width = 30;
        let filled = (self.fraction() * width as f64).round() as usize;
        let text = format!(
            "{} |{}{}| {:3.0}% {}",
            self.label,
            "█".repeat(filled),
            " ".repeat(width - filled),
            self.fraction() * 100.0,
            self.summary()
        );
        let html = format!(
            "<div style=\"font-family:monospace\">{} <progress value=\"{}\" max=\"{}\" \
             style=\"width:20em;vertical-align:middle\"></progress> {:.0}% {}</div>",
            escape_html(&self.label),
            self.position,
            self.total.max(1),
            self.fraction() * 100.0,
            escape_html(&self.summary())
        );
        MimeBundle::from([("text/plain".into(), text), ("text/html".into(), html)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_text_has_position_and_metrics() {
        let mut bar = ProgressBar::new(4, "train");
        bar.step(&[("loss", 2.5)]);
        bar.step(&[("loss", 1.5), ("lr", 0.001)]);
        let text = &bar.mime_bundle()["text/plain"];
        assert!(text.starts_with("train |"), "{text}");
        assert!(text.contains(" 50% 2/4 ["), "{text}");
        assert!(text.contains("loss=1.5000 lr=1.00e-3"), "{text}");
        assert!(bar.mime_bundle()["text/html"].contains("<progress value=\"2\" max=\"4\""));
        bar.step(&[("loss", 0.0), ("lr", 0.02)]);
        let text = &bar.mime_bundle()["text/plain"];
        assert!(text.contains("loss=0.0000 lr=0.0200"), "{text}");
    }
}

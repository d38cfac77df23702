//! The log of a training run (one entry per step), kept on disk under the output directory
//! so that runs of a session (or of earlier sessions) can be overlaid on one plot.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::notebook::LinePlot;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub epoch: f64,
    /// Set on steps where an evaluation ran.
    pub eval_loss: Option<f64>,
    /// A trainer's further metrics, by name (DPO's `rewards/margins`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl LogEntry {
    /// The entry as Hugging Face's Trainer prints a log line (a Python dict).
    pub fn hf_line(&self) -> String {
        let mut line = format!(
            "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:e}, 'epoch': {:.2}, 'tokens_per_second': {:.1}",
            self.loss, self.grad_norm, self.learning_rate, self.epoch, self.tokens_per_second
        );
        if let Some(l) = self.eval_loss {
            line.push_str(&format!(", 'eval_loss': {l:.4}"));
        }
        for (name, value) in &self.metrics {
            line.push_str(&format!(", '{name}': {value:.4}"));
        }
        line.push('}');
        line
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunHistory {
    pub name: String,
    pub entries: Vec<LogEntry>,
}

impl RunHistory {
    pub fn losses(&self) -> Vec<(usize, f64)> {
        self.entries.iter().map(|e| (e.step, e.loss)).collect()
    }

    pub fn last_loss(&self) -> Option<f64> {
        self.entries.last().map(|e| e.loss)
    }

    /// Writes `<output_dir>/runs/<name>.json` (atomically).
    pub fn save(&self, output_dir: impl AsRef<Path>) -> Result<()> {
        let output_dir = output_dir.as_ref();
        let dir = output_dir.join("runs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file = dir.join(format!("{}.json", sanitize(&self.name)));
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        crate::peft::io::write_atomic(&file, &json)
    }

    /// Every run saved under `output_dir`, oldest first.
    pub fn load_all(output_dir: impl AsRef<Path>) -> Result<Vec<RunHistory>> {
        Self::load_all_in(output_dir.as_ref())
    }

    fn load_all_in(output_dir: &Path) -> Result<Vec<RunHistory>> {
        let dir = output_dir.join("runs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(vec![]);
        };
        let mut files: Vec<_> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| (e.metadata().and_then(|m| m.modified()).ok(), e.path()))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| crate::error::read_json(&p))
            .collect()
    }
}

/// One plot with every run's loss curve (a cell's last expression shows it).
pub fn plot_runs(runs: &[RunHistory]) -> LinePlot {
    let mut plot = LinePlot::new("training loss").y_label("loss");
    for run in runs {
        for e in &run.entries {
            plot.add_point(&run.name, e.step as f64, e.loss);
        }
    }
    plot
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

//! The one training loop. A trainer is this loop plus its loss: an [`Objective`] says how the
//! gradients of one optimizer step are computed from the units (examples, packed rows,
//! preference pairs) of its micro-batches; everything else is here, once: the data order,
//! clipping, the schedule, the optimizer step, logging, evaluation, the live progress bar and
//! loss curve, the cooperative interrupt, checkpoints and exact resume, the run history.
//! [`SftTrainer`](super::SftTrainer) and [`DpoTrainer`](super::DpoTrainer) are
//! `Trainer<Sft>` and `Trainer<Dpo>`; a third trainer is one file with an `Objective`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::args::TrainingArgs;
use super::history::{LogEntry, RunHistory};
use super::optim::{clip_grad_norm, Moments, Optimizer};
use super::schedule::Schedule;
use crate::data::dataset::BatchOrder;
use crate::error::{Error, Result};
use crate::notebook::{self, LinePlot, ProgressBar};
use crate::peft::PeftModel;
use crate::tokenizer::Tokenizer;

/// What one optimizer step computed.
#[derive(Debug, Default)]
pub struct StepResult {
    /// The step's loss (as logged).
    pub loss: f64,
    /// Gradients for the optimizer's parameters, in its order (`None`: none arrived).
    pub grads: Vec<Option<Tensor>>,
    pub samples: usize,
    pub tokens: usize,
    /// Further metrics logged with the step, by name (DPO's `rewards/margins`, …).
    pub metrics: BTreeMap<String, f64>,
}

/// A trainer's loss: the gradients of one optimizer step.
pub trait Objective {
    /// The number of training units (what an epoch is made of).
    fn units(&self) -> usize;

    /// The loss and gradients (for `params`, in order) of one optimizer step whose
    /// micro-batches hold the units `micro_batches` (accumulated as the objective defines).
    fn step(
        &mut self,
        model: &PeftModel,
        micro_batches: &[Vec<usize>],
        params: &[Var],
        args: &TrainingArgs,
    ) -> Result<StepResult>;

    /// The evaluation loss, for objectives with an evaluation set.
    fn evaluate(&mut self, _model: &PeftModel, _args: &TrainingArgs) -> Option<Result<f64>> {
        None
    }

    /// Metrics of [`StepResult::metrics`] drawn beside the loss, and shown on the progress bar.
    fn plotted_metrics(&self) -> &'static [&'static str] {
        &[]
    }
}

/// What runs before each step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Between {
    Continue,
    Stop,
}

/// Where a run shows its progress: the cell's displays (a run in the foreground) or widgets
/// (a run in the background, whose cell has ended: only comm messages reach the page then).
pub(crate) trait Monitor {
    fn begin(&mut self, run: &str, first_step: usize, total: usize);
    /// After a step; `plotted`: the objective's metrics drawn beside the loss.
    fn step(&mut self, run: &str, entry: &LogEntry, total: usize, plotted: &[(&str, f64)]);
    fn end(&mut self);
}

/// A foreground run's progress bar and loss curve (the curve is the trainer's, so every
/// `train()` call of one trainer adds to it).
struct DisplayMonitor<'a> {
    progress: Option<ProgressBar>,
    plot: &'a mut LinePlot,
}

impl Monitor for DisplayMonitor<'_> {
    fn begin(&mut self, run: &str, first_step: usize, total: usize) {
        let mut progress = ProgressBar::new(total as u64, &format!("training {run}"));
        progress.set_position(first_step as u64, &[]);
        self.progress = Some(progress);
    }

    fn step(&mut self, run: &str, entry: &LogEntry, total: usize, plotted: &[(&str, f64)]) {
        self.plot.push(run, entry.step as f64, entry.loss);
        let mut shown = vec![("loss", entry.loss), ("lr", entry.learning_rate)];
        for &(name, v) in plotted {
            self.plot.push(name, entry.step as f64, v);
            shown.push((name, v));
        }
        if let Some(p) = self.progress.as_mut() {
            p.set_length(total as u64);
            p.set_position(entry.step as u64, &shown);
        }
    }

    fn end(&mut self) {
        if let Some(p) = self.progress.as_mut() {
            p.finish();
        }
        self.plot.finish();
    }
}

/// What `train()` returns (Hugging Face's `TrainOutput` and its metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutput {
    pub global_step: usize,
    /// Mean loss over the steps of this call.
    pub training_loss: f64,
    pub train_runtime: f64,
    pub train_samples_per_second: f64,
    pub train_steps_per_second: f64,
    pub train_tokens_per_second: f64,
    /// `true` when an interrupt stopped training early (call `train()` again to continue).
    pub interrupted: bool,
}

/// Where training stands; saved in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub epoch: f64,
    pub log_history: Vec<LogEntry>,
}

/// A model, its optimizer and schedule, and an objective: see the module documentation.
pub struct Trainer<O> {
    pub(crate) core: TrainerCore,
    pub(crate) objective: O,
}

/// Everything of a trainer but its objective, and the loop itself, which takes the objective
/// as `&mut dyn Objective`. The methods of [`Trainer`] only forward here: a notebook cell is a
/// crate compiled at opt-level 2, where rustc compiles anew every generic body the cell
/// calls; a `train()` generic over the objective made each training cell compile the loop.
pub(crate) struct TrainerCore {
    pub(crate) model: PeftModel,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) args: TrainingArgs,
    optimizer: Optimizer,
    schedule: Schedule,
    /// Which units each micro-batch holds.
    order: BatchOrder,
    state: TrainerState,
    /// Shows the loss curve of every `train()` call of this trainer.
    plot: Option<LinePlot>,
}

/// What runs before each step of [`TrainerCore::run`] (a background run's commands); it may
/// stop the run.
pub(crate) type BetweenSteps<'a> =
    dyn FnMut(&mut TrainerCore, &mut dyn Objective) -> Result<Between> + 'a;

impl<O: Objective> Trainer<O> {
    /// The loop around `objective` for the model's active adapter (how a new trainer is
    /// made: its constructor prepares the objective's data and calls this). `args` is
    /// validated and `output_dir` proven writable before anything else is done.
    pub fn with_objective(
        model: PeftModel,
        tokenizer: Tokenizer,
        args: TrainingArgs,
        objective: O,
    ) -> Result<Self> {
        let core = TrainerCore::new(model, tokenizer, args, objective.units())?;
        Ok(Trainer { core, objective })
    }

    /// Trains until `max_steps` / `num_train_epochs` are done, or until the notebook's
    /// interrupt: then it stops after the current step, keeping every update (call `train()`
    /// again to continue).
    pub fn train(&mut self) -> Result<TrainOutput> {
        self.core.train_steps(&mut self.objective, usize::MAX)
    }

    /// Like [`train`](Self::train) but stops after at most `steps` more optimizer steps
    /// (the schedule still spans the whole run).
    pub fn train_steps(&mut self, steps: usize) -> Result<TrainOutput> {
        self.core.train_steps(&mut self.objective, steps)
    }

    /// Changes the peak learning rate for the rest of the run (the schedule keeps its shape:
    /// warmup and decay continue from the current step with the new peak).
    pub fn set_learning_rate(&mut self, learning_rate: f64) -> Result<()> {
        self.core.set_learning_rate(learning_rate)
    }

    /// Changes where the run ends (optimizer steps in all); the schedule is stretched to it.
    pub fn set_max_steps(&mut self, max_steps: usize) -> Result<()> {
        self.core.set_max_steps(max_steps, self.objective.units())
    }

    /// Log every `steps` steps (0: never).
    pub fn set_logging_steps(&mut self, steps: usize) {
        self.core.args.logging_steps = steps;
    }

    /// Evaluate every `steps` steps (`None`: never).
    pub fn set_eval_steps(&mut self, steps: Option<usize>) {
        self.core.args.eval_steps = steps;
    }

    /// One optimizer step: gradients, clipping, the scheduled learning rate, the update,
    /// logging, evaluation and checkpoint when due. Returns the step's log entry and the
    /// samples and tokens it saw. A non-finite loss is an error that leaves the adapter as
    /// it was before the step.
    pub fn step(&mut self) -> Result<(LogEntry, usize, usize)> {
        self.core.step(&mut self.objective)
    }

    /// The evaluation loss (token-weighted mean over the evaluation set).
    pub fn evaluate(&mut self) -> Result<f64> {
        self.core.evaluate(&mut self.objective)
    }

    pub fn model(&self) -> &PeftModel {
        &self.core.model
    }

    pub fn model_mut(&mut self) -> &mut PeftModel {
        &mut self.core.model
    }

    pub fn into_model(self) -> PeftModel {
        self.core.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.core.tokenizer
    }

    pub fn args(&self) -> &TrainingArgs {
        &self.core.args
    }

    pub fn state(&self) -> &TrainerState {
        &self.core.state
    }

    pub fn total_steps(&self) -> usize {
        self.core.schedule.total_steps
    }

    /// This run's log so far.
    pub fn history(&self) -> RunHistory {
        self.core.history()
    }

    /// Writes `output_dir/checkpoint-{step}`: the adapter in PEFT's format, the raw trainable
    /// parameters, the optimizer moments and the trainer state. Written to a temporary
    /// directory and renamed, so a checkpoint is complete or absent. Returns its path.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        self.core.save_checkpoint()
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// parameters, optimizer moments, step, and the data order (derived from the step).
    /// Everything is read and checked before anything is changed: a damaged checkpoint is an
    /// error that names its file and leaves this trainer as it was.
    pub fn resume_from_checkpoint(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        self.core.resume_from_checkpoint(dir.as_ref())
    }
}

impl TrainerCore {
    fn new(
        model: PeftModel,
        tokenizer: Tokenizer,
        args: TrainingArgs,
        units: usize,
    ) -> Result<Self> {
        let args = args.validated()?;
        check_writable(&args.output_dir)?;
        let params = model.trainable_vars();
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "the model has no trainable parameters: add an adapter first".into(),
            ));
        }
        Ok(TrainerCore {
            optimizer: args.optimizer(params)?,
            schedule: args.schedule(units),
            order: BatchOrder::new(units, args.per_device_train_batch_size, args.seed),
            state: TrainerState::default(),
            plot: None,
            model,
            tokenizer,
            args,
        })
    }

    /// A foreground run of at most `steps` steps, drawn in the cell.
    fn train_steps(&mut self, objective: &mut dyn Objective, steps: usize) -> Result<TrainOutput> {
        super::background::Exclusive::check_free()?;
        let mut plot = self
            .plot
            .take()
            .unwrap_or_else(|| LinePlot::new("training loss").y_label("loss"));
        let mut monitor = DisplayMonitor {
            progress: None,
            plot: &mut plot,
        };
        let result = self.run(objective, steps, &mut monitor, &mut |_, _| {
            Ok(Between::Continue)
        });
        self.plot = Some(plot);
        result
    }

    /// The loop: up to `steps` optimizer steps, reported to `monitor`; `between` runs before
    /// each step (a background run's commands) and may stop the run. Stops early, keeping
    /// every update, on the notebook's interrupt.
    pub(crate) fn run(
        &mut self,
        objective: &mut dyn Objective,
        steps: usize,
        monitor: &mut dyn Monitor,
        between: &mut BetweenSteps<'_>,
    ) -> Result<TrainOutput> {
        let start = Instant::now();
        let first_step = self.state.global_step;
        let run = self.args.run_name();
        monitor.begin(&run, first_step, self.schedule.total_steps);
        let (mut losses, mut samples, mut tokens) = (vec![], 0usize, 0usize);
        let mut interrupted = false;
        self.model.train();
        let mut outcome = Ok(());
        loop {
            let stop_at = self
                .schedule
                .total_steps
                .min(first_step.saturating_add(steps));
            if self.state.global_step >= stop_at {
                break;
            }
            match between(self, objective) {
                Ok(Between::Continue) => {}
                Ok(Between::Stop) => break,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            if notebook::interrupted() {
                interrupted = true;
                break;
            }
            self.model.train();
            let (entry, step_samples, step_tokens) = match self.step(objective) {
                Ok(done) => done,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            samples += step_samples;
            tokens += step_tokens;
            losses.push(entry.loss);
            let plotted: Vec<(&str, f64)> = objective
                .plotted_metrics()
                .iter()
                .filter_map(|&name| entry.metrics.get(name).map(|&v| (name, v)))
                .collect();
            monitor.step(&run, &entry, self.schedule.total_steps, &plotted);
        }
        self.model.eval();
        self.model.release_training_buffers();
        monitor.end();
        outcome?;
        self.history().save(&self.args.output_dir)?;
        let runtime = start.elapsed().as_secs_f64();
        let steps = self.state.global_step - first_step;
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: if losses.is_empty() {
                f64::NAN
            } else {
                losses.iter().sum::<f64>() / losses.len() as f64
            },
            train_runtime: runtime,
            train_samples_per_second: samples as f64 / runtime.max(1e-9),
            train_steps_per_second: steps as f64 / runtime.max(1e-9),
            train_tokens_per_second: tokens as f64 / runtime.max(1e-9),
            interrupted,
        })
    }

    pub(crate) fn set_learning_rate(&mut self, learning_rate: f64) -> Result<()> {
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "the learning rate must be positive, got {learning_rate}"
            )));
        }
        self.args.learning_rate = learning_rate;
        self.schedule.base_lr = learning_rate;
        Ok(())
    }

    pub(crate) fn set_max_steps(&mut self, max_steps: usize, units: usize) -> Result<()> {
        if max_steps <= self.state.global_step {
            return Err(Error::InvalidArgument(format!(
                "max_steps {max_steps} is not after the current step {}",
                self.state.global_step
            )));
        }
        self.args.max_steps = max_steps as i64;
        self.schedule = self.args.schedule(units);
        Ok(())
    }

    fn step(&mut self, objective: &mut dyn Objective) -> Result<(LogEntry, usize, usize)> {
        let started = Instant::now();
        let accum = self.args.gradient_accumulation_steps;
        let base = self.state.global_step * accum;
        let micro_batches: Vec<Vec<usize>> = (0..accum)
            .map(|k| self.order.indices(base + k).to_vec())
            .collect();
        let params: Vec<Var> = self
            .optimizer
            .params()
            .iter()
            .map(|(_, v)| v.clone())
            .collect();
        let mut result = objective.step(&self.model, &micro_batches, &params, &self.args)?;
        if !result.loss.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the loss is {} at step {} (lower the learning rate, check the data); the adapter is left as it was before this step",
                result.loss,
                self.state.global_step + 1
            )));
        }
        let grad_norm = clip_grad_norm(&mut result.grads, self.args.max_grad_norm)?;
        let lr = self.schedule.lr(self.state.global_step);
        self.optimizer.set_lr(lr);
        self.optimizer.step(&result.grads)?;
        self.state.global_step += 1;
        self.state.epoch = (self.state.global_step * accum) as f64 / self.order.per_epoch() as f64;
        let mut entry = LogEntry {
            step: self.state.global_step,
            loss: result.loss,
            learning_rate: lr,
            grad_norm,
            tokens_per_second: result.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            epoch: self.state.epoch,
            eval_loss: None,
            metrics: result.metrics,
        };
        if self
            .args
            .eval_steps
            .is_some_and(|every| every > 0 && entry.step.is_multiple_of(every))
        {
            if let Some(loss) = objective.evaluate(&self.model, &self.args) {
                entry.eval_loss = Some(loss?);
                self.model.train();
            }
        }
        let log_now =
            self.args.logging_steps > 0 && entry.step.is_multiple_of(self.args.logging_steps);
        if log_now && !notebook::in_kernel() {
            println!("{}", entry.hf_line());
        }
        self.state.log_history.push(entry.clone());
        if let Some(every) = self.args.save_steps.filter(|s| *s > 0) {
            if self.state.global_step.is_multiple_of(every) {
                self.save_checkpoint()?;
            }
        }
        Ok((entry, result.samples, result.tokens))
    }

    fn evaluate(&mut self, objective: &mut dyn Objective) -> Result<f64> {
        objective
            .evaluate(&self.model, &self.args)
            .unwrap_or_else(|| {
                Err(Error::InvalidArgument(
                    "no evaluation dataset (use with_eval_dataset)".into(),
                ))
            })
    }

    pub(crate) fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    pub(crate) fn state(&self) -> &TrainerState {
        &self.state
    }

    fn history(&self) -> RunHistory {
        RunHistory {
            name: self.args.run_name(),
            entries: self.state.log_history.clone(),
        }
    }

    pub(crate) fn save_checkpoint(&self) -> Result<PathBuf> {
        let step = self.state.global_step;
        let final_dir = self.args.output_dir.join(format!("checkpoint-{step}"));
        let tmp = self
            .args
            .output_dir
            .join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
        self.recover_interrupted_checkpoints();
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if let Err(e) = self.write_checkpoint_files(&tmp, step) {
            // A full disk or a bad output directory: leave nothing half-written behind.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // Replacing a checkpoint of the same step: the old one is moved aside before the new
        // one takes its name, and removed after, so a kill leaves one of them whole.
        let old = self
            .args
            .output_dir
            .join(format!(".checkpoint-{step}.old-{}", std::process::id()));
        let replacing = final_dir.exists();
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        self.prune_checkpoints()?;
        Ok(final_dir)
    }

    /// Tidies what a process killed while saving checkpoints left behind: its temporary
    /// directories go; a checkpoint it had moved aside to replace comes back if the new one
    /// never took its name.
    fn recover_interrupted_checkpoints(&self) {
        let dir = &self.args.output_dir;
        crate::peft::io::remove_stale_temporaries_matching(
            dir,
            |name| {
                let rest = name.strip_prefix(".checkpoint-")?;
                let (step, pid) = rest
                    .split_once(".tmp-")
                    .or_else(|| rest.split_once(".old-"))?;
                Some((step.to_string(), pid.parse().ok()?))
            },
            |path, step| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let home = dir.join(format!("checkpoint-{step}"));
                if name.contains(".old-") && !home.exists() {
                    let _ = std::fs::rename(path, home);
                } else {
                    let _ = std::fs::remove_dir_all(path);
                }
            },
        );
    }

    /// The files of a checkpoint, written into `tmp`.
    fn write_checkpoint_files(&self, tmp: &Path, step: usize) -> Result<()> {
        let adapter = self.model.active_adapter();
        self.model.save_adapter(&adapter, tmp)?;
        let params: Vec<(String, Tensor)> = self
            .optimizer
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        crate::peft::io::write_safetensors_atomic(tmp.join("trainable.safetensors"), &params)?;
        let mut moments = vec![];
        for ((name, _), m) in self
            .optimizer
            .params()
            .iter()
            .zip(self.optimizer.moments()?)
        {
            moments.push((format!("{name}.exp_avg"), m.exp_avg));
            moments.push((format!("{name}.exp_avg_sq"), m.exp_avg_sq));
        }
        crate::peft::io::write_safetensors_atomic(tmp.join("optimizer.safetensors"), &moments)?;
        let state = serde_json::json!({
            "global_step": step,
            "epoch": self.state.epoch,
            "optimizer_steps": self.optimizer.steps_taken(),
            "log_history": self.state.log_history,
            "args": self.args,
        });
        let json =
            serde_json::to_vec_pretty(&state).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        crate::peft::io::write_atomic(tmp.join("trainer_state.json"), &json)?;
        Ok(())
    }

    fn prune_checkpoints(&self) -> Result<()> {
        let Some(limit) = self.args.save_total_limit else {
            return Ok(());
        };
        let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.args.output_dir)
            .map_err(|e| Error::io(&self.args.output_dir, e))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
                Some((step, e.path()))
            })
            .collect();
        found.sort();
        while found.len() > limit.max(1) {
            let (_, path) = found.remove(0);
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    fn resume_from_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let params_file = dir.join("trainable.safetensors");
        let params = crate::peft::io::read_safetensors(&params_file)?;
        let moments_file = dir.join("optimizer.safetensors");
        let moments = crate::peft::io::read_safetensors(&moments_file)?;
        let state_file = dir.join("trainer_state.json");
        let state: serde_json::Value = crate::error::read_json(&state_file)?;
        let get = |file: &PathBuf,
                   tensors: &BTreeMap<String, Tensor>,
                   key: String,
                   var: &Var|
         -> Result<Tensor> {
            let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                path: file.clone(),
                name: key.clone(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    path: file.clone(),
                    name: key,
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            crate::model::weights::check_finite(t, file, &key)?;
            Ok(t.to_dtype(var.dtype())?.to_device(var.device())?)
        };
        let mut values = vec![];
        let mut restored = vec![];
        for (name, var) in self.optimizer.params() {
            values.push(get(&params_file, &params, name.clone(), var)?);
            restored.push(Moments {
                exp_avg: get(&moments_file, &moments, format!("{name}.exp_avg"), var)?,
                exp_avg_sq: get(&moments_file, &moments, format!("{name}.exp_avg_sq"), var)?,
            });
        }
        // Steps beyond 2^40 are a damaged file, not a run (a step a millisecond for 30 years).
        let count = |k: &str| {
            state[k]
                .as_u64()
                .filter(|&n| n <= 1 << 40)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::corrupt(
                        &state_file,
                        format!("missing or invalid `{k}` (a step count up to 2^40 expected)"),
                    )
                })
        };
        let optimizer_steps = count("optimizer_steps")?;
        let global_step = count("global_step")?;
        if global_step > self.schedule.total_steps {
            return Err(Error::InvalidArgument(format!(
                "{}: the checkpoint is at step {global_step}, beyond this run's {} steps (set max_steps higher to continue it)",
                state_file.display(),
                self.schedule.total_steps
            )));
        }
        let epoch = match &state["epoch"] {
            serde_json::Value::Null => 0.0,
            v => v
                .as_f64()
                .filter(|e| e.is_finite() && *e >= 0.0)
                .ok_or_else(|| {
                    Error::corrupt(
                        &state_file,
                        "invalid `epoch` (a non-negative number expected)",
                    )
                })?,
        };
        let log_history = serde_json::from_value(state["log_history"].clone()).map_err(|e| {
            Error::corrupt(
                &state_file,
                format!("missing or invalid `log_history`: {e}"),
            )
        })?;
        // Checked: now apply.
        for ((_, var), value) in self.optimizer.params().iter().zip(&values) {
            var.set(value)?;
        }
        self.optimizer.restore(restored, optimizer_steps)?;
        self.state.global_step = global_step;
        self.state.epoch = epoch;
        self.state.log_history = log_history;
        Ok(())
    }
}

/// The token padding batches: the tokenizer's `<pad>` when it has one, else EOS (TRL's
/// fallback), else 0. Padded positions are masked, so the choice never changes a loss.
pub(crate) fn pad_id(tokenizer: &Tokenizer) -> u32 {
    tokenizer
        .token_to_id("<pad>")
        .or(tokenizer.eos_token_id())
        .unwrap_or(0)
}

/// Creates the output directory and proves it writable before any work is done.
fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| {
        Error::io(
            dir,
            std::io::Error::new(e.kind(), format!("output_dir is not writable: {e}")),
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

//! Supervised fine-tuning: TRL's `SFTTrainer` with Hugging Face's training loop semantics
//! (gradient accumulation, clipping, schedule, logging, checkpoints), a live loss curve in
//! the notebook, and a cooperative stop on interrupt that keeps every update.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::args::TrainingArgs;
use super::history::{LogEntry, RunHistory};
use super::loss::causal_lm_loss;
use super::optim::{clip_grad_norm, Moments, Optimizer};
use super::schedule::Schedule;
use crate::data::collate::{pack_examples, packed_batch, pad_batch, Batch, PackedRow};
use crate::data::dataset::BatchOrder;
use crate::data::tokenize::{tokenize_dataset, Example, TokenizeOptions};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Checkpointing};
use crate::notebook::{self, LinePlot, ProgressBar};
use crate::peft::PeftModel;
use crate::tokenizer::Tokenizer;

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

/// The training data, tokenized once.
#[derive(Debug)]
enum Units {
    Examples(Vec<Example>),
    Packed(Vec<PackedRow>),
}

impl Units {
    fn len(&self) -> usize {
        match self {
            Units::Examples(e) => e.len(),
            Units::Packed(p) => p.len(),
        }
    }
}

/// Where training stands; saved in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub epoch: f64,
    pub log_history: Vec<LogEntry>,
}

pub struct SftTrainer {
    model: PeftModel,
    tokenizer: Tokenizer,
    args: TrainingArgs,
    train: Units,
    eval: Option<Vec<Example>>,
    optimizer: Optimizer,
    schedule: Schedule,
    state: TrainerState,
    pad_id: u32,
    /// Which examples each micro-batch holds.
    order: BatchOrder,
    /// Shows the loss curve of every `train()` call of this trainer.
    plot: Option<LinePlot>,
}

impl SftTrainer {
    /// Tokenizes `dataset` (rows with `prompt`/`completion`, `messages`, or
    /// `args.dataset_text_field`) and prepares the optimizer for the model's active adapter.
    pub fn new(
        model: PeftModel,
        tokenizer: Tokenizer,
        dataset: &Dataset,
        args: TrainingArgs,
    ) -> Result<Self> {
        let args = args.validated()?;
        check_writable(&args.output_dir)?;
        let options = TokenizeOptions {
            max_seq_length: args.max_seq_length,
            completion_only_loss: args.completion_only_loss,
            text_field: args.dataset_text_field.clone(),
        };
        let examples = tokenize_dataset(dataset, &tokenizer, &options)?;
        if examples.iter().all(|e| e.num_label_tokens() == 0) {
            return Err(Error::InvalidArgument(
                "no example has a token to learn from (all labels masked or sequences of one token)".into(),
            ));
        }
        let train = if args.packing {
            Units::Packed(pack_examples(&examples, args.max_seq_length))
        } else {
            Units::Examples(examples)
        };
        let params = model.trainable_vars();
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "the model has no trainable parameters: add an adapter first".into(),
            ));
        }
        let optimizer = args.optimizer(params)?;
        let schedule = args.schedule(train.len());
        let pad_id = tokenizer
            .token_to_id("<pad>")
            .or(tokenizer.eos_token_id())
            .unwrap_or(0);
        let order = BatchOrder::new(train.len(), args.per_device_train_batch_size, args.seed);
        Ok(SftTrainer {
            order,
            model,
            tokenizer,
            args,
            train,
            eval: None,
            optimizer,
            schedule,
            state: TrainerState::default(),
            pad_id,
            plot: None,
        })
    }

    /// Adds an evaluation set (its loss is logged every `eval_steps`).
    pub fn with_eval_dataset(mut self, dataset: &Dataset) -> Result<Self> {
        let options = TokenizeOptions {
            max_seq_length: self.args.max_seq_length,
            completion_only_loss: self.args.completion_only_loss,
            text_field: self.args.dataset_text_field.clone(),
        };
        self.eval = Some(tokenize_dataset(dataset, &self.tokenizer, &options)?);
        Ok(self)
    }

    pub fn model(&self) -> &PeftModel {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut PeftModel {
        &mut self.model
    }

    pub fn into_model(self) -> PeftModel {
        self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn args(&self) -> &TrainingArgs {
        &self.args
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// This run's log so far.
    pub fn history(&self) -> RunHistory {
        RunHistory {
            name: self.args.run_name(),
            entries: self.state.log_history.clone(),
        }
    }

    /// Micro-batch `index` of the whole run: epoch `index / per_epoch` in an order shuffled
    /// with `seed + epoch`, so the sequence depends only on the index (resuming replays it).
    /// Micro-batch `index` of the whole run (see [`BatchOrder`]).
    fn micro_batch(&mut self, index: usize, device: &Device) -> Result<Batch> {
        let picked = self.order.indices(index).to_vec();
        match &self.train {
            Units::Examples(e) => {
                let refs: Vec<&Example> = picked.iter().map(|&i| &e[i]).collect();
                pad_batch(&refs, self.pad_id, device)
            }
            Units::Packed(p) => {
                let refs: Vec<&PackedRow> = picked.iter().map(|&i| &p[i]).collect();
                packed_batch(&refs, self.pad_id, device)
            }
        }
    }

    /// Trains until `max_steps` / `num_train_epochs` are done, or until the notebook's
    /// interrupt: then it stops after the current step, keeping every update (call `train()`
    /// again to continue).
    pub fn train(&mut self) -> Result<TrainOutput> {
        self.train_steps(usize::MAX)
    }

    /// Like [`train`](Self::train) but stops after at most `steps` more optimizer steps
    /// (the schedule still spans the whole run).
    pub fn train_steps(&mut self, steps: usize) -> Result<TrainOutput> {
        let device = self.model.device().clone();
        let start = Instant::now();
        let first_step = self.state.global_step;
        let total = self.schedule.total_steps;
        let stop_at = total.min(first_step.saturating_add(steps));
        let mut progress =
            ProgressBar::new(total as u64, &format!("training {}", self.args.run_name()));
        progress.set_position(first_step as u64, &[]);
        let run = self.args.run_name();
        let mut plot = self
            .plot
            .take()
            .unwrap_or_else(|| LinePlot::new("training loss").y_label("loss"));
        let mut losses = vec![];
        let (mut samples, mut tokens) = (0usize, 0usize);
        let mut interrupted = false;
        self.model.train();
        while self.state.global_step < stop_at {
            if notebook::interrupted() {
                interrupted = true;
                break;
            }
            let step_start = Instant::now();
            let accum = self.args.gradient_accumulation_steps;
            let base = self.state.global_step * accum;
            let batches = (0..accum)
                .map(|k| self.micro_batch(base + k, &device))
                .collect::<Result<Vec<_>>>()?;
            let label_tokens: usize = batches.iter().map(|b| b.num_label_tokens).sum();
            let params: Vec<Var> = self
                .optimizer
                .params()
                .iter()
                .map(|(_, v)| v.clone())
                .collect();
            let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
            let mut loss_sum = 0f64;
            for batch in &batches {
                if batch.num_label_tokens == 0 {
                    continue;
                }
                // Hugging Face's accumulation: every token of the step weighs the same.
                let (loss_value, count, step_grads) = batch_gradients(
                    &self.model,
                    batch,
                    1.0 / label_tokens.max(1) as f64,
                    &params,
                    self.args.checkpointing(),
                )?;
                loss_sum += loss_value * count as f64;
                for (slot, g) in grads.iter_mut().zip(step_grads) {
                    if let Some(g) = g {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g,
                        });
                    }
                }
                samples += batch.input_ids.dim(0)?;
                tokens += batch.num_tokens;
            }
            let step_tokens: usize = batches.iter().map(|b| b.num_tokens).sum();
            let loss = loss_sum / label_tokens.max(1) as f64;
            if !loss.is_finite() {
                self.model.eval();
                self.plot = Some(plot);
                return Err(Error::InvalidArgument(format!(
                    "the loss is {loss} at step {} (lower the learning rate, check the data); the adapter is left as it was before this step",
                    self.state.global_step + 1
                )));
            }
            let grad_norm = clip_grad_norm(&mut grads, self.args.max_grad_norm)?;
            let lr = self.schedule.lr(self.state.global_step);
            self.optimizer.set_lr(lr);
            self.optimizer.step(&grads)?;
            self.state.global_step += 1;
            self.state.epoch =
                (self.state.global_step * accum) as f64 / self.order.per_epoch() as f64;
            let seconds = step_start.elapsed().as_secs_f64();
            let mut entry = LogEntry {
                step: self.state.global_step,
                loss,
                learning_rate: lr,
                grad_norm,
                tokens_per_second: step_tokens as f64 / seconds.max(1e-9),
                epoch: self.state.epoch,
                eval_loss: None,
            };
            if let (Some(every), Some(_)) = (self.args.eval_steps, self.eval.as_ref()) {
                if every > 0 && self.state.global_step.is_multiple_of(every) {
                    entry.eval_loss = Some(self.evaluate()?);
                    self.model.train();
                }
            }
            losses.push(loss);
            plot.push(&run, entry.step as f64, loss);
            progress.set_position(entry.step as u64, &[("loss", loss), ("lr", lr)]);
            let log_now =
                self.args.logging_steps > 0 && entry.step.is_multiple_of(self.args.logging_steps);
            if log_now && !notebook::in_kernel() {
                println!(
                    "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:e}, 'epoch': {:.2}, 'tokens_per_second': {:.1}{}}}",
                    entry.loss,
                    entry.grad_norm,
                    entry.learning_rate,
                    entry.epoch,
                    entry.tokens_per_second,
                    entry.eval_loss.map(|l| format!(", 'eval_loss': {l:.4}")).unwrap_or_default()
                );
            }
            self.state.log_history.push(entry);
            if let Some(every) = self.args.save_steps.filter(|s| *s > 0) {
                if self.state.global_step.is_multiple_of(every) {
                    self.save_checkpoint()?;
                }
            }
        }
        self.model.eval();
        self.model.release_training_buffers();
        progress.finish();
        plot.finish();
        self.plot = Some(plot);
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

    /// Mean loss over the evaluation set (token-weighted).
    pub fn evaluate(&mut self) -> Result<f64> {
        let Some(eval) = self.eval.as_ref() else {
            return Err(Error::InvalidArgument(
                "no evaluation dataset (use with_eval_dataset)".into(),
            ));
        };
        self.model.eval();
        let device = self.model.device().clone();
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in eval.chunks(self.args.per_device_train_batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = pad_batch(&refs, self.pad_id, &device)?;
            if batch.num_label_tokens == 0 {
                continue;
            }
            let logits = self.model.logits(batch.forward())?;
            let (loss, n) = causal_lm_loss(&logits.detach(), &batch.labels)?;
            sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
            count += n;
        }
        Ok(sum / count.max(1) as f64)
    }

    /// Writes `output_dir/checkpoint-{step}`: the adapter in PEFT's format, the raw trainable
    /// parameters, the optimizer moments and the trainer state. Written to a temporary
    /// directory and renamed, so a checkpoint is complete or absent. Returns its path.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let step = self.state.global_step;
        let final_dir = self.args.output_dir.join(format!("checkpoint-{step}"));
        let tmp = self
            .args
            .output_dir
            .join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let adapter = self.model.active_adapter();
        self.model.save_adapter(&adapter, &tmp)?;
        let params: Vec<(String, Tensor)> = self
            .optimizer
            .params()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        crate::peft::io::write_safetensors_atomic(&tmp.join("trainable.safetensors"), &params)?;
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
        crate::peft::io::write_safetensors_atomic(&tmp.join("optimizer.safetensors"), &moments)?;
        let state = serde_json::json!({
            "global_step": step,
            "epoch": self.state.epoch,
            "optimizer_steps": self.optimizer.steps_taken(),
            "log_history": self.state.log_history,
            "args": self.args,
        });
        let json =
            serde_json::to_vec_pretty(&state).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        crate::peft::io::write_atomic(&tmp.join("trainer_state.json"), &json)?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        self.prune_checkpoints()?;
        Ok(final_dir)
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

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// parameters, optimizer moments, step, and the data order (derived from the step).
    pub fn resume_from_checkpoint(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let params = crate::peft::io::read_safetensors(&dir.join("trainable.safetensors"))?;
        let moments_file = dir.join("optimizer.safetensors");
        let moments = crate::peft::io::read_safetensors(&moments_file)?;
        let state: serde_json::Value = crate::error::read_json(&dir.join("trainer_state.json"))?;
        let mut restored = vec![];
        for (name, var) in self.optimizer.params() {
            let t = params.get(name).ok_or_else(|| Error::MissingTensor {
                path: dir.join("trainable.safetensors"),
                name: name.clone(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    path: dir.join("trainable.safetensors"),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            let get = |k: String| -> Result<Tensor> {
                moments.get(&k).cloned().ok_or(Error::MissingTensor {
                    path: moments_file.clone(),
                    name: k,
                })
            };
            restored.push(Moments {
                exp_avg: get(format!("{name}.exp_avg"))?.to_device(var.device())?,
                exp_avg_sq: get(format!("{name}.exp_avg_sq"))?.to_device(var.device())?,
            });
        }
        let bad = |k: &str| {
            Error::corrupt(
                dir.join("trainer_state.json"),
                format!("missing or invalid `{k}`"),
            )
        };
        let optimizer_steps = state["optimizer_steps"]
            .as_u64()
            .ok_or_else(|| bad("optimizer_steps"))? as usize;
        self.optimizer.restore(restored, optimizer_steps)?;
        self.state.global_step = state["global_step"]
            .as_u64()
            .ok_or_else(|| bad("global_step"))? as usize;
        self.state.epoch = state["epoch"].as_f64().unwrap_or(0.0);
        self.state.log_history =
            serde_json::from_value(state["log_history"].clone()).map_err(|_| bad("log_history"))?;
        Ok(())
    }
}

/// The mean causal-LM loss of a batch and the number of tokens it averages. When the head is
/// a plain frozen projection, the head and the cross-entropy run as one chunked op: the
/// `[tokens, vocab]` logits and their gradient are never materialised (49,152 columns for
/// SmolLM2: 200 MB per 1,024 tokens in f32, several times over in backward).
pub fn batch_loss(model: &PeftModel, batch: &Batch) -> Result<(Tensor, usize)> {
    let fused = model.hidden_for_loss(batch.forward())?;
    if let Some((hidden, head)) = fused {
        return fused_head_loss(&hidden, &head, &batch.labels);
    }
    logits_loss(model, batch)
}

/// The batch's mean loss (as [`batch_loss`]), the number of tokens it averages, and the
/// gradients of `loss · count · weight` for `params` (in their order; `None` where none
/// arrives). The layers `checkpointing` names (`true`: all) have their activations recomputed
/// in backward instead of kept (models with a prompt-learning method or an adapted head take
/// the ordinary path).
pub fn batch_gradients(
    model: &PeftModel,
    batch: &Batch,
    weight: f64,
    params: &[Var],
    checkpointing: impl Into<Checkpointing>,
) -> Result<(f64, usize, Vec<Option<Tensor>>)> {
    // Layer by layer (recomputed where `checkpointing` says, else kept and freed as the
    // backward passes each layer): candle's own backward would keep every activation until
    // it ends.
    if let Some((ck, head)) = model.hidden_for_loss_layered(batch.forward(), checkpointing)? {
        let (loss, count) = fused_head_loss(&ck.hidden, &head, &batch.labels)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = (loss * (count as f64 * weight))?;
        let grads = model.backward_checkpointed(ck, &scaled, params)?;
        return Ok((value, count, grads));
    }
    let (loss, count) = batch_loss(model, batch)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = (loss * (count as f64 * weight))?.backward()?;
    // Detached: candle keeps leaf gradients attached to the graph (and its activations).
    let grads = params
        .iter()
        .map(|v| store.get(v.as_tensor()).map(Tensor::detach))
        .collect();
    Ok((value, count, grads))
}

/// The frozen head fused into a chunked cross-entropy over next-token labels.
fn fused_head_loss(hidden: &Tensor, head: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let t = hidden.dim(1)?;
    if t < 2 {
        return Err(Error::InvalidArgument(
            "a causal-LM loss needs at least 2 positions".into(),
        ));
    }
    let h = hidden.narrow(1, 0, t - 1)?;
    let labels = labels.narrow(1, 1, t - 1)?.contiguous()?;
    let head = head.to_dtype(h.dtype())?;
    peft_kernels::fused_linear_cross_entropy(
        &h,
        &head,
        &labels,
        peft_kernels::cross_entropy::DEFAULT_CHUNK,
    )
    .map_err(|e| match e.to_string() {
        m if m.contains("ignored") => Error::InvalidArgument(m),
        _ => Error::Candle(e),
    })
}

fn logits_loss(model: &PeftModel, batch: &Batch) -> Result<(Tensor, usize)> {
    let logits = model.logits(batch.forward())?;
    causal_lm_loss(&logits, &batch.labels)
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

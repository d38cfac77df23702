//! Direct preference optimisation (TRL's `DPOTrainer`): sigmoid, IPO, hinge and robust
//! losses; the reference model is the same model with its adapters disabled (no second copy
//! of the weights), or reference log-probs computed once before training.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::args::TrainingArgs;
use super::history::{LogEntry, RunHistory};
use super::optim::{clip_grad_norm, Optimizer};
use super::schedule::Schedule;
use crate::data::dataset::{field_str, BatchOrder};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Forward};
use crate::notebook::{self, LinePlot, ProgressBar};
use crate::peft::PeftModel;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `−log σ(β·Δ)`
    Sigmoid,
    /// `(Δ_avg − 1/(2β))²` with log-ratios averaged per completion token
    Ipo,
    /// `relu(1 − β·Δ)`
    Hinge,
    /// `(−(1−ε) log σ(β·Δ) + ε log σ(−β·Δ)) / (1 − 2ε)`, ε = label_smoothing
    Robust,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub label_smoothing: f64,
    /// Compute the reference log-probs once before training instead of every step.
    pub precompute_ref_log_probs: bool,
    /// prompt + completion are truncated to this many tokens (the prompt keeps its end).
    pub max_length: usize,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            max_length: 1024,
        }
    }
}

/// TRL's logged DPO metrics (means over the pairs of a batch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoMetrics {
    pub loss: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// Summed log-probs per sequence, as four `[pairs]` tensors, plus completion token counts.
pub struct PairLogps<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub reference_chosen: &'a Tensor,
    pub reference_rejected: &'a Tensor,
    pub chosen_tokens: &'a [usize],
    pub rejected_tokens: &'a [usize],
}

/// The DPO loss (mean over pairs, differentiable in the policy log-probs) and its metrics.
pub fn dpo_loss(l: &PairLogps<'_>, config: &DpoConfig) -> Result<(Tensor, DpoMetrics)> {
    let beta = config.beta;
    let eps = config.label_smoothing;
    let chosen_ratio = (l.policy_chosen - l.reference_chosen.detach())?;
    let rejected_ratio = (l.policy_rejected - l.reference_rejected.detach())?;
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let log_sigmoid = |x: &Tensor| -> Result<Tensor> {
        // log σ(x) = −softplus(−x), computed stably as min(x, 0) − log(1 + exp(−|x|))
        let neg_abs = x.abs()?.neg()?;
        Ok((x.minimum(0.0)? - (neg_abs.exp()? + 1.0)?.log()?)?)
    };
    let losses = match config.loss_type {
        DpoLossType::Sigmoid => log_sigmoid(&(&delta * beta)?)?.neg()?,
        DpoLossType::Hinge => ((&delta * -beta)? + 1.0)?.relu()?,
        DpoLossType::Ipo => {
            let dev = delta.device();
            let counts = |c: &[usize]| -> Result<Tensor> {
                let v: Vec<f32> = c.iter().map(|&n| n.max(1) as f32).collect();
                Ok(Tensor::from_vec(v, c.len(), dev)?.to_dtype(delta.dtype())?)
            };
            let avg = ((&chosen_ratio / counts(l.chosen_tokens)?)?
                - (&rejected_ratio / counts(l.rejected_tokens)?)?)?;
            (avg - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLossType::Robust => {
            if !(0.0..0.5).contains(&eps) {
                return Err(Error::Config(format!(
                    "robust DPO needs label_smoothing in [0, 0.5), got {eps}"
                )));
            }
            let bd = (&delta * beta)?;
            let a = (log_sigmoid(&bd)? * -(1.0 - eps))?;
            let b = (log_sigmoid(&bd.neg()?)? * eps)?;
            ((a + b)? / (1.0 - 2.0 * eps))?
        }
    };
    let loss = losses.mean_all()?;
    let host =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let rc: Vec<f64> = host(&chosen_ratio)?.iter().map(|x| beta * x).collect();
    let rr: Vec<f64> = host(&rejected_ratio)?.iter().map(|x| beta * x).collect();
    let n = rc.len().max(1) as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let metrics = DpoMetrics {
        loss: loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?,
        rewards_chosen: mean(&rc),
        rewards_rejected: mean(&rr),
        rewards_accuracies: rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / n,
        rewards_margins: rc.iter().zip(&rr).map(|(c, r)| c - r).sum::<f64>() / n,
        logps_chosen: mean(&host(l.policy_chosen)?),
        logps_rejected: mean(&host(l.policy_rejected)?),
    };
    Ok((loss, metrics))
}

/// Summed log-probs of the completion tokens of each row: `logits [b, t, v]`, `ids [b, t]`,
/// `completion [b][t]` (1 where token t belongs to the completion). Returns `[b]`.
pub fn sequence_logps(logits: &Tensor, ids: &[Vec<u32>], completion: &[Vec<u8>]) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let dev = logits.device();
    let mut index = Vec::with_capacity(b * (t - 1));
    let mut weight = Vec::with_capacity(b * (t - 1));
    for r in 0..b {
        for j in 0..t - 1 {
            index.push(ids[r][j + 1]);
            weight.push(completion[r][j + 1] as f32);
        }
    }
    let lp = candle_nn::ops::log_softmax(
        &logits
            .narrow(1, 0, t - 1)?
            .to_dtype(DType::F32)?
            .reshape((b * (t - 1), v))?,
        D::Minus1,
    )?;
    let picked = lp
        .gather(&Tensor::from_vec(index, (b * (t - 1), 1), dev)?, 1)?
        .squeeze(1)?;
    let w = Tensor::from_vec(weight, b * (t - 1), dev)?;
    Ok(peft_kernels::frozen::mul_const(&picked, &w)?
        .reshape((b, t - 1))?
        .sum(1)?)
}

/// `[chosen; rejected]` ids and attention mask as tensors, the same ids and completion masks
/// on the host, and the completion token count of each row.
type ConcatBatch = (Tensor, Tensor, Vec<Vec<u32>>, Vec<Vec<u8>>, Vec<usize>);

/// Summed policy log-probs per row, with the batch they came from.
type BatchLogps = (
    Tensor,
    Vec<usize>,
    Tensor,
    Tensor,
    Vec<Vec<u32>>,
    Vec<Vec<u8>>,
);

/// One tokenized preference pair.
#[derive(Debug, Clone)]
struct Pair {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    /// Reference log-probs when precomputed: (chosen, rejected).
    reference: Option<(f32, f32)>,
}

pub struct DpoTrainer {
    model: PeftModel,
    tokenizer: Tokenizer,
    args: TrainingArgs,
    config: DpoConfig,
    pairs: Vec<Pair>,
    optimizer: Optimizer,
    schedule: Schedule,
    global_step: usize,
    log: Vec<(LogEntry, DpoMetrics)>,
    pad_id: u32,
    /// Which pairs each micro-batch holds.
    order: BatchOrder,
}

impl DpoTrainer {
    /// `dataset` rows: `prompt`, `chosen`, `rejected` (strings). EOS is appended to both
    /// completions, as TRL does.
    pub fn new(
        model: PeftModel,
        tokenizer: Tokenizer,
        dataset: &Dataset,
        args: TrainingArgs,
        config: DpoConfig,
    ) -> Result<Self> {
        let args = args.validated()?;
        if dataset.is_empty() {
            return Err(Error::InvalidArgument(
                "the preference dataset is empty".into(),
            ));
        }
        if config.beta.is_nan() || config.beta <= 0.0 {
            return Err(Error::Config(format!(
                "beta must be positive, got {}",
                config.beta
            )));
        }
        let eos = tokenizer.eos_token_id();
        let mut pairs = vec![];
        for (i, row) in dataset.rows().iter().enumerate() {
            let field = |k: &str| {
                field_str(row, k).map_err(|e| Error::InvalidArgument(format!("row {i}: {e}")))
            };
            let prompt = tokenizer.encode(field("prompt")?, true)?;
            let completion = |k: &str| -> Result<Vec<u32>> {
                let mut ids = tokenizer.encode(field(k)?, false)?;
                ids.extend(eos);
                Ok(ids)
            };
            let (chosen, rejected) = (completion("chosen")?, completion("rejected")?);
            let keep = config
                .max_length
                .saturating_sub(chosen.len().max(rejected.len()))
                .max(1);
            let prompt = prompt[prompt.len().saturating_sub(keep)..].to_vec();
            pairs.push(Pair {
                prompt,
                chosen,
                rejected,
                reference: None,
            });
        }
        let params = model.trainable_vars();
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "the model has no trainable parameters: add an adapter first".into(),
            ));
        }
        let optimizer = args.optimizer(params)?;
        let schedule = args.schedule(pairs.len());
        let pad_id = tokenizer.eos_token_id().unwrap_or(0);
        let order = BatchOrder::new(pairs.len(), args.per_device_train_batch_size, args.seed);
        let mut trainer = DpoTrainer {
            order,
            model,
            tokenizer,
            args,
            config,
            pairs,
            optimizer,
            schedule,
            global_step: 0,
            log: vec![],
            pad_id,
        };
        if trainer.config.precompute_ref_log_probs {
            trainer.precompute_reference()?;
        }
        Ok(trainer)
    }

    pub fn model(&self) -> &PeftModel {
        &self.model
    }

    pub fn into_model(self) -> PeftModel {
        self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Every logged step with TRL's metrics.
    pub fn metrics(&self) -> &[(LogEntry, DpoMetrics)] {
        &self.log
    }

    pub fn history(&self) -> RunHistory {
        RunHistory {
            name: self.args.run_name(),
            entries: self.log.iter().map(|(e, _)| e.clone()).collect(),
        }
    }

    /// `[chosen rows; rejected rows]` padded, with completion masks (TRL's concatenated batch).
    fn batch(&self, pairs: &[&Pair], device: &Device) -> Result<ConcatBatch> {
        let mut rows: Vec<(Vec<u32>, Vec<u8>)> = vec![];
        for which in 0..2 {
            for p in pairs {
                let completion = if which == 0 { &p.chosen } else { &p.rejected };
                let ids: Vec<u32> = p.prompt.iter().chain(completion).copied().collect();
                let mask = std::iter::repeat_n(0u8, p.prompt.len())
                    .chain(std::iter::repeat_n(1, completion.len()))
                    .collect();
                rows.push((ids, mask));
            }
        }
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let counts = rows
            .iter()
            .map(|r| r.1.iter().map(|&m| m as usize).sum())
            .collect();
        let mut ids = vec![];
        let mut completion = vec![];
        let mut attn = vec![];
        for (r, m) in rows {
            let pad = t - r.len();
            attn.extend(std::iter::repeat_n(1u32, r.len()).chain(std::iter::repeat_n(0, pad)));
            ids.push(
                r.into_iter()
                    .chain(std::iter::repeat_n(self.pad_id, pad))
                    .collect::<Vec<_>>(),
            );
            completion.push(
                m.into_iter()
                    .chain(std::iter::repeat_n(0, pad))
                    .collect::<Vec<_>>(),
            );
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let b = ids.len();
        Ok((
            Tensor::from_vec(flat, (b, t), device)?,
            Tensor::from_vec(attn, (b, t), device)?,
            ids,
            completion,
            counts,
        ))
    }

    fn logps(&self, pairs: &[&Pair], device: &Device) -> Result<BatchLogps> {
        let (ids_t, attn, ids, completion, counts) = self.batch(pairs, device)?;
        let logits = self
            .model
            .logits(Forward::ids(&ids_t).with_attention_mask(&attn))?;
        Ok((
            sequence_logps(&logits, &ids, &completion)?,
            counts,
            ids_t,
            attn,
            ids,
            completion,
        ))
    }

    fn precompute_reference(&mut self) -> Result<()> {
        let device = self.model.device().clone();
        let bs = self.args.per_device_train_batch_size;
        let mut refs = vec![];
        for chunk in self.pairs.chunks(bs) {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let lp = self
                .model
                .with_adapters_disabled(|_| self.logps(&pairs, &device))?
                .0
                .detach();
            let v = lp.to_vec1::<f32>()?;
            let n = chunk.len();
            refs.extend((0..n).map(|i| (v[i], v[n + i])));
        }
        for (p, r) in self.pairs.iter_mut().zip(refs) {
            p.reference = Some(r);
        }
        Ok(())
    }

    /// Trains for the configured steps (stops early, keeping updates, on a notebook interrupt).
    pub fn train(&mut self) -> Result<RunHistory> {
        let device = self.model.device().clone();
        let total = self.schedule.total_steps;
        let accum = self.args.gradient_accumulation_steps;
        let mut progress = ProgressBar::new(total as u64, "DPO");
        let mut plot = LinePlot::new("DPO").y_label("loss / reward margin");
        let per_epoch = self.order.per_epoch();
        self.model.train();
        while self.global_step < total {
            if notebook::interrupted() {
                break;
            }
            let started = Instant::now();
            let params: Vec<Var> = self
                .optimizer
                .params()
                .iter()
                .map(|(_, v)| v.clone())
                .collect();
            let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
            let mut sums = DpoMetrics::default();
            let mut tokens = 0;
            for k in 0..accum {
                let index = self.global_step * accum + k;
                let picked = self.order.indices(index).to_vec();
                let pairs: Vec<&Pair> = picked.iter().map(|&i| &self.pairs[i]).collect();
                let m = pairs.len();
                let (policy, counts, ids_t, attn, ids, completion) = self.logps(&pairs, &device)?;
                tokens += ids.iter().map(Vec::len).sum::<usize>();
                let reference = match pairs
                    .iter()
                    .map(|p| p.reference)
                    .collect::<Option<Vec<_>>>()
                {
                    Some(r) => {
                        let v: Vec<f32> =
                            r.iter().map(|x| x.0).chain(r.iter().map(|x| x.1)).collect();
                        Tensor::from_vec(v, 2 * m, &device)?
                    }
                    None => self
                        .model
                        .with_adapters_disabled(|model| -> Result<Tensor> {
                            let logits = model
                                .logits(Forward::ids(&ids_t).with_attention_mask(&attn))?
                                .detach();
                            sequence_logps(&logits, &ids, &completion)
                        })?,
                };
                let logps = PairLogps {
                    policy_chosen: &policy.narrow(0, 0, m)?,
                    policy_rejected: &policy.narrow(0, m, m)?,
                    reference_chosen: &reference.narrow(0, 0, m)?,
                    reference_rejected: &reference.narrow(0, m, m)?,
                    chosen_tokens: &counts[..m],
                    rejected_tokens: &counts[m..],
                };
                let (loss, metrics) = dpo_loss(&logps, &self.config)?;
                let step_grads = (loss / accum as f64)?.backward()?;
                // Detached: candle keeps leaf gradients attached to the graph (and its
                // activations) until they are dropped.
                for (slot, var) in grads.iter_mut().zip(&params) {
                    if let Some(g) = step_grads.get(var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?.detach(),
                            None => g.detach(),
                        });
                    }
                }
                add_metrics(&mut sums, &metrics, 1.0 / accum as f64);
            }
            if !sums.loss.is_finite() {
                self.model.eval();
                return Err(Error::InvalidArgument(format!(
                    "the DPO loss is {} at step {}",
                    sums.loss,
                    self.global_step + 1
                )));
            }
            let grad_norm = clip_grad_norm(&mut grads, self.args.max_grad_norm)?;
            let lr = self.schedule.lr(self.global_step);
            self.optimizer.set_lr(lr);
            self.optimizer.step(&grads)?;
            self.global_step += 1;
            let entry = LogEntry {
                step: self.global_step,
                loss: sums.loss,
                learning_rate: lr,
                grad_norm,
                tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                epoch: (self.global_step * accum) as f64 / per_epoch as f64,
                eval_loss: None,
            };
            plot.push("loss", entry.step as f64, sums.loss);
            plot.push("rewards/margins", entry.step as f64, sums.rewards_margins);
            progress.set_position(
                entry.step as u64,
                &[
                    ("loss", sums.loss),
                    ("acc", sums.rewards_accuracies),
                    ("margin", sums.rewards_margins),
                ],
            );
            if !notebook::in_kernel()
                && self.args.logging_steps > 0
                && entry.step.is_multiple_of(self.args.logging_steps)
            {
                println!(
                    "{{'loss': {:.4}, 'rewards/chosen': {:.4}, 'rewards/rejected': {:.4}, 'rewards/accuracies': {:.2}, 'rewards/margins': {:.4}, 'logps/chosen': {:.3}, 'logps/rejected': {:.3}}}",
                    sums.loss, sums.rewards_chosen, sums.rewards_rejected, sums.rewards_accuracies, sums.rewards_margins, sums.logps_chosen, sums.logps_rejected
                );
            }
            self.log.push((entry, sums));
        }
        self.model.eval();
        self.model.release_training_buffers();
        progress.finish();
        plot.finish();
        let history = self.history();
        history.save(&self.args.output_dir)?;
        Ok(history)
    }
}

fn add_metrics(acc: &mut DpoMetrics, m: &DpoMetrics, w: f64) {
    acc.loss += w * m.loss;
    acc.rewards_chosen += w * m.rewards_chosen;
    acc.rewards_rejected += w * m.rewards_rejected;
    acc.rewards_accuracies += w * m.rewards_accuracies;
    acc.rewards_margins += w * m.rewards_margins;
    acc.logps_chosen += w * m.logps_chosen;
    acc.logps_rejected += w * m.logps_rejected;
}

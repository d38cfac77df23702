//! Direct preference optimisation (TRL's `DPOTrainer`): sigmoid, IPO, hinge and robust
//! losses; the reference model is the same model with its adapters disabled (no second copy
//! of the weights), or reference log-probs computed once before training.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::args::TrainingArgs;
use super::history::LogEntry;
use super::trainer::{pad_id, Objective, StepResult, Trainer};
use crate::data::dataset::field_str;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Forward};
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

/// The DPO trainer: the training loop with [`Dpo`]'s loss.
pub type DpoTrainer = Trainer<Dpo>;

/// DPO's objective: tokenized preference pairs and the loss settings.
#[derive(Debug)]
pub struct Dpo {
    config: DpoConfig,
    pairs: Vec<Pair>,
    pad_id: u32,
}

/// TRL's names of the logged DPO metrics, in [`DpoMetrics`]' order after the loss.
const METRIC_NAMES: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

impl DpoMetrics {
    fn named(&self) -> BTreeMap<String, f64> {
        let values = [
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
        ];
        METRIC_NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| (n.to_string(), v))
            .collect()
    }

    fn from_entry(entry: &LogEntry) -> Self {
        let get = |n: &str| entry.metrics.get(n).copied().unwrap_or(f64::NAN);
        DpoMetrics {
            loss: entry.loss,
            rewards_chosen: get(METRIC_NAMES[0]),
            rewards_rejected: get(METRIC_NAMES[1]),
            rewards_accuracies: get(METRIC_NAMES[2]),
            rewards_margins: get(METRIC_NAMES[3]),
            logps_chosen: get(METRIC_NAMES[4]),
            logps_rejected: get(METRIC_NAMES[5]),
        }
    }
}

impl Trainer<Dpo> {
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
        let objective = Dpo {
            config,
            pairs,
            pad_id: pad_id(&tokenizer),
        };
        let mut trainer = Trainer::with_objective(model, tokenizer, args, objective)?;
        if trainer.objective.config.precompute_ref_log_probs {
            let batch = trainer.core.args.per_device_train_batch_size;
            trainer
                .objective
                .precompute_reference(&trainer.core.model, batch)?;
        }
        Ok(trainer)
    }

    /// Every logged step with TRL's metrics.
    pub fn metrics(&self) -> Vec<(LogEntry, DpoMetrics)> {
        self.state()
            .log_history
            .iter()
            .map(|e| (e.clone(), DpoMetrics::from_entry(e)))
            .collect()
    }
}

impl Dpo {
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

    fn logps(&self, model: &PeftModel, pairs: &[&Pair]) -> Result<BatchLogps> {
        let (ids_t, attn, ids, completion, counts) = self.batch(pairs, model.device())?;
        let logits = model.logits(Forward::ids(&ids_t).with_attention_mask(&attn))?;
        Ok((
            sequence_logps(&logits, &ids, &completion)?,
            counts,
            ids_t,
            attn,
            ids,
            completion,
        ))
    }

    fn precompute_reference(&mut self, model: &PeftModel, batch: usize) -> Result<()> {
        let mut refs = vec![];
        for chunk in self.pairs.chunks(batch.max(1)) {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let lp = model
                .with_adapters_disabled(|m| self.logps(m, &pairs))?
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
}

impl Objective for Dpo {
    fn units(&self) -> usize {
        self.pairs.len()
    }

    /// The mean of the micro-batches' DPO losses, and TRL's metrics averaged the same way.
    fn step(
        &mut self,
        model: &PeftModel,
        micro_batches: &[Vec<usize>],
        params: &[Var],
        _args: &TrainingArgs,
    ) -> Result<StepResult> {
        if rayon::current_thread_index().is_none() {
            // On the pool with spinning helpers, as `sft::batch_gradients`.
            return crate::threads::on_pool_with_spinning_helpers(|| {
                self.step(model, micro_batches, params, _args)
            });
        }
        let accum = micro_batches.len().max(1);
        let device = model.device().clone();
        let mut out = StepResult {
            grads: vec![None; params.len()],
            ..Default::default()
        };
        let mut sums = DpoMetrics::default();
        for picked in micro_batches {
            let pairs: Vec<&Pair> = picked.iter().map(|&i| &self.pairs[i]).collect();
            let m = pairs.len();
            let (policy, counts, ids_t, attn, ids, completion) = self.logps(model, &pairs)?;
            out.tokens += ids.iter().map(Vec::len).sum::<usize>();
            out.samples += m;
            let reference = match pairs
                .iter()
                .map(|p| p.reference)
                .collect::<Option<Vec<_>>>()
            {
                Some(r) => {
                    let v: Vec<f32> = r.iter().map(|x| x.0).chain(r.iter().map(|x| x.1)).collect();
                    Tensor::from_vec(v, 2 * m, &device)?
                }
                None => model.with_adapters_disabled(|model| -> Result<Tensor> {
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
            let store = (loss / accum as f64)?.backward()?;
            crate::grads::accumulate(&mut out.grads, params, &store)?;
            add_metrics(&mut sums, &metrics, 1.0 / accum as f64);
        }
        out.loss = sums.loss;
        out.metrics = sums.named();
        Ok(out)
    }

    fn plotted_metrics(&self) -> &'static [&'static str] {
        &["rewards/margins", "rewards/accuracies"]
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

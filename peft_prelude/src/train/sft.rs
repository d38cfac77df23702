//! Supervised fine-tuning (TRL's `SFTTrainer`): the causal-LM loss over the completion
//! tokens of tokenized examples (padded or packed), as an [`Objective`] of the one training
//! loop ([`Trainer`]: accumulation, clipping, schedule, logging, checkpoints, live curve).

use candle_core::{DType, Device, Tensor, Var};

use super::args::TrainingArgs;
use super::loss::causal_lm_loss;
use super::trainer::{pad_id, Objective, StepResult, Trainer};
use crate::data::collate::{pack_examples, packed_batch, pad_batch, Batch, PackedRow};
use crate::data::tokenize::{tokenize_dataset, Example, TokenizeOptions};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Checkpointing, FrozenHead};
use crate::peft::PeftModel;
use crate::tokenizer::Tokenizer;

/// The SFT trainer: the training loop with [`Sft`]'s loss.
pub type SftTrainer = Trainer<Sft>;

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

/// SFT's objective: tokenized examples (or packed rows), an optional evaluation set.
#[derive(Debug)]
pub struct Sft {
    train: Units,
    eval: Option<Vec<Example>>,
    pad_id: u32,
}

impl Trainer<Sft> {
    /// Tokenizes `dataset` (rows with `prompt`/`completion`, `messages`, or
    /// `args.dataset_text_field`) and prepares the optimizer for the model's active adapter.
    pub fn new(
        model: PeftModel,
        tokenizer: Tokenizer,
        dataset: &Dataset,
        args: TrainingArgs,
    ) -> Result<Self> {
        let args = args.validated()?;
        let examples = tokenize_dataset(dataset, &tokenizer, &tokenize_options(&args))?;
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
        let objective = Sft {
            train,
            eval: None,
            pad_id: pad_id(&tokenizer),
        };
        Trainer::with_objective(model, tokenizer, args, objective)
    }

    /// Adds an evaluation set (its loss is logged every `eval_steps`).
    pub fn with_eval_dataset(mut self, dataset: &Dataset) -> Result<Self> {
        let options = tokenize_options(&self.core.args);
        self.objective.eval = Some(tokenize_dataset(dataset, &self.core.tokenizer, &options)?);
        Ok(self)
    }
}

fn tokenize_options(args: &TrainingArgs) -> TokenizeOptions {
    TokenizeOptions {
        max_seq_length: args.max_seq_length,
        completion_only_loss: args.completion_only_loss,
        text_field: args.dataset_text_field.clone(),
    }
}

impl Sft {
    /// The units `picked` as one padded (or packed) batch.
    fn batch(&self, picked: &[usize], device: &Device) -> Result<Batch> {
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
}

impl Objective for Sft {
    fn units(&self) -> usize {
        self.train.len()
    }

    fn step(
        &mut self,
        model: &PeftModel,
        micro_batches: &[Vec<usize>],
        params: &[Var],
        args: &TrainingArgs,
    ) -> Result<StepResult> {
        let device = model.device().clone();
        let batches = micro_batches
            .iter()
            .map(|picked| self.batch(picked, &device))
            .collect::<Result<Vec<_>>>()?;
        let label_tokens: usize = batches.iter().map(|b| b.num_label_tokens).sum();
        let mut out = StepResult {
            grads: vec![None; params.len()],
            ..Default::default()
        };
        let mut loss_sum = 0f64;
        for batch in &batches {
            out.tokens += batch.num_tokens;
            if batch.num_label_tokens == 0 {
                continue;
            }
            // Hugging Face's accumulation: every token of the step weighs the same.
            let (loss, count, grads) = batch_gradients(
                model,
                batch,
                1.0 / label_tokens.max(1) as f64,
                params,
                args.checkpointing(),
            )?;
            loss_sum += loss * count as f64;
            crate::grads::add(&mut out.grads, grads)?;
            out.samples += batch.input_ids.dim(0)?;
        }
        out.loss = loss_sum / label_tokens.max(1) as f64;
        Ok(out)
    }

    /// Mean loss over the evaluation set (token-weighted).
    fn evaluate(&mut self, model: &PeftModel, args: &TrainingArgs) -> Option<Result<f64>> {
        let eval = self.eval.as_ref()?;
        let run = || -> Result<f64> {
            model.eval();
            let device = model.device().clone();
            let (mut sum, mut count) = (0f64, 0usize);
            for chunk in eval.chunks(args.per_device_train_batch_size) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let batch = pad_batch(&refs, self.pad_id, &device)?;
                if batch.num_label_tokens == 0 {
                    continue;
                }
                let logits = model.logits(batch.forward())?;
                let (loss, n) = causal_lm_loss(&logits.detach(), &batch.labels)?;
                sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
                count += n;
            }
            Ok(sum / count.max(1) as f64)
        };
        Some(run())
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
    let checkpointing = checkpointing.into();
    if rayon::current_thread_index().is_none() {
        // On a pool worker, the other workers spinning between the step's parallel loops
        // instead of parking (SmolLM2 step: f32 +13-15%, NF4 +15-21% tokens/s; peak RSS
        // unchanged with the allocator's single arena, `crate::threads`).
        return crate::threads::on_pool_with_spinning_helpers(|| {
            batch_gradients(model, batch, weight, params, checkpointing)
        });
    }
    // Layer by layer (recomputed where `checkpointing` says, else kept and freed as the
    // backward passes each layer): candle's own backward would keep every activation until
    // it ends.
    if let Some((ck, head)) = model.hidden_for_loss_layered(batch.forward(), checkpointing)? {
        let (loss, count) = fused_head_loss(&ck.hidden, &head, &batch.labels)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = (loss * (count as f64 * weight))?;
        let grads = model.backward_checkpointed(ck, scaled, params)?;
        return Ok((value, count, grads));
    }
    let (loss, count) = batch_loss(model, batch)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = (loss * (count as f64 * weight))?.backward()?;
    let mut grads = vec![None; params.len()];
    crate::grads::accumulate(&mut grads, params, &store)?;
    Ok((value, count, grads))
}

/// The frozen head fused into a chunked cross-entropy over next-token labels (on integer
/// products where the head holds them).
fn fused_head_loss(hidden: &Tensor, head: &FrozenHead, labels: &Tensor) -> Result<(Tensor, usize)> {
    let t = hidden.dim(1)?;
    if t < 2 {
        return Err(Error::InvalidArgument(
            "a causal-LM loss needs at least 2 positions".into(),
        ));
    }
    let h = hidden.narrow(1, 0, t - 1)?;
    let labels = labels.narrow(1, 1, t - 1)?.contiguous()?;
    let weight = head.weight.to_dtype(h.dtype())?;
    match &head.int8 {
        Some(products) if h.dtype() == DType::F32 => {
            peft_kernels::fused_linear_cross_entropy_int8(&h, &weight, products, &labels)
        }
        _ => peft_kernels::fused_linear_cross_entropy(
            &h,
            &weight,
            &labels,
            peft_kernels::cross_entropy::DEFAULT_CHUNK,
        ),
    }
    .map_err(|e| match e.to_string() {
        m if m.contains("ignored") => Error::InvalidArgument(m),
        _ => Error::Candle(e),
    })
}

fn logits_loss(model: &PeftModel, batch: &Batch) -> Result<(Tensor, usize)> {
    let logits = model.logits(batch.forward())?;
    causal_lm_loss(&logits, &batch.labels)
}

//! `PeftModel`: a base model with named adapters, saved and loaded in PEFT's format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::bottleneck::{BottleneckBlock, NonLinearity};
use super::config::{LoraInit, PeftConfig, PromptLearningCommon, TargetModules};
use super::ia3::Ia3Linear;
use super::lora::{LoraInitKind, LoraLinear};
use super::prompt::{PromptEncoder, PromptLearning};
use super::saved::{SavedEmbedding, SavedLinear};
use super::switch::AdapterSwitch;
use super::targets::{pattern_value, select};
use crate::error::{Error, Result};
use crate::model::forward::Input;
use crate::model::{
    CausalLm, Checkpointed, Checkpointing, Forward, FrozenLinear, KvCache, Linear, Model,
    ModelConfig,
};
use crate::rng::Rng;

/// PEFT's name for the adapter `get_peft_model` creates.
pub const DEFAULT_ADAPTER: &str = "default";

/// A base model with adapters. It is a [`CausalLm`] of its own (generation, the trainers and
/// evaluation take it as it is, adapters acting); [`model`](Self::model) is the bare base.
#[derive(Debug)]
pub struct PeftModel {
    model: Model,
    configs: BTreeMap<String, PeftConfig>,
    switch: AdapterSwitch,
    prompts: BTreeMap<String, PromptLearning>,
    seed: u64,
}

/// Wraps `model` and adds `config` as the adapter "default" (Hugging Face's `get_peft_model`).
pub fn get_peft_model(model: Model, config: impl Into<PeftConfig>) -> Result<PeftModel> {
    let mut peft = PeftModel::new(model);
    peft.add_adapter(DEFAULT_ADAPTER, config)?;
    Ok(peft)
}

/// What [`PeftModel::run`] returns.
#[derive(Clone, Copy)]
enum Output {
    /// Every position, the virtual tokens' first (PEFT's `forward`).
    WithVirtual,
    /// The input's positions.
    Input,
    /// The input's last position, `[batch, vocab]`.
    Last,
}

impl CausalLm for PeftModel {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn dtype(&self) -> DType {
        self.model.dtype()
    }

    fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    fn logits(&self, args: Forward<'_>) -> Result<Tensor> {
        self.run(args, Output::Input)
    }

    fn last_logits(&self, args: Forward<'_>) -> Result<Tensor> {
        self.run(args, Output::Last)
    }
}

impl PeftModel {
    /// A model without adapters yet; initialisation is seeded with 42 unless [`with_seed`](Self::with_seed).
    pub fn new(model: Model) -> Self {
        PeftModel {
            model,
            configs: BTreeMap::new(),
            switch: AdapterSwitch::new(DEFAULT_ADAPTER),
            prompts: BTreeMap::new(),
            seed: 42,
        }
    }

    /// The seed for the next adapter's initial weights (Unsloth's `random_state`).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The base model. Replacing its linears by hand may detach adapters.
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// The configuration of adapter `adapter` (PEFT's `peft_config[adapter]`).
    pub fn peft_config(&self, adapter: &str) -> Option<&PeftConfig> {
        self.configs.get(adapter)
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    pub fn active_adapter(&self) -> String {
        self.switch.get().active
    }

    /// Makes `name` the adapter that acts (and trains).
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        if !self.configs.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "no adapter named `{name}` (have: {})",
                self.adapter_names().join(", ")
            )));
        }
        self.switch.update(|s| s.active = name.to_string());
        Ok(())
    }

    pub fn enable_adapters(&self) {
        self.switch.update(|s| s.enabled = true);
    }

    pub fn disable_adapters(&self) {
        self.switch.update(|s| s.enabled = false);
    }

    pub fn adapters_enabled(&self) -> bool {
        self.switch.get().enabled
    }

    /// Runs `f` with every adapter off (the base model), then restores the previous state.
    /// DPO's reference model is this: no second copy of the weights.
    pub fn with_adapters_disabled<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        let before = self.switch.get().enabled;
        self.disable_adapters();
        let r = f(self);
        self.switch.update(|s| s.enabled = before);
        r
    }

    /// Training mode: dropout on.
    pub fn train(&self) {
        self.switch.update(|s| s.training = true);
    }

    /// Inference mode: dropout off.
    pub fn eval(&self) {
        self.switch.update(|s| s.training = false);
    }

    /// Frees what only training uses: the integer products of quantized bases (about 2.25
    /// bytes per base weight, built at the first training batch; see
    /// `quant::set_integer_products`). The trainers call this when a run ends; the next
    /// training batch builds them again.
    pub fn release_training_buffers(&self) {
        for p in self.model.linear_paths() {
            if let Some(l) = self
                .model
                .linear(&p)
                .ok()
                .and_then(|l| l.as_any().downcast_ref::<LoraLinear>())
            {
                l.release_integer_products();
            }
        }
    }

    fn acting_prompt(&self) -> Option<&PromptLearning> {
        let (name, _) = self.switch.acting()?;
        self.prompts.get(&name)
    }

    /// Logits for `ids: [batch, seq]`. With prompt tuning or P-tuning the virtual tokens'
    /// positions come first (`[batch, n + seq, vocab]`, as PEFT returns them); generation and
    /// the trainers use [`CausalLm::logits`], which gives the input's positions only.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_masked(ids, None)
    }

    /// [`forward`](Self::forward) with a padding mask `[batch, seq]`.
    pub fn forward_masked(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.run(token_inputs(ids, mask, None, None), Output::WithVirtual)
    }

    /// Logits `[batch, seq, vocab]` aligned with `ids` (virtual prompt positions dropped), for
    /// losses; `positions` / `segments` describe packed sequences.
    pub fn forward_for_loss(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        segments: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(token_inputs(ids, mask, positions, segments), Output::Input)
    }

    /// The forward pass with the acting adapter: LoRA-like methods act inside the base's
    /// layers; prompt tuning and P-tuning put their virtual tokens in front of the input when
    /// a sequence starts (no cache, or an empty one); prefix tuning puts its key/value
    /// prefixes into the cache (a temporary one without a cache). The virtual tokens take
    /// positions `0..n`, so explicit position ids (which count from the input) move by `n`.
    fn run(&self, args: Forward<'_>, output: Output) -> Result<Tensor> {
        let Some(prompt) = self.acting_prompt() else {
            return match output {
                Output::Last => self.model.forward_last(args),
                Output::Input | Output::WithVirtual => self.model.forward_with(args),
            };
        };
        let (batch, seq) = args.batch_and_len()?;
        let Forward {
            input,
            attention_mask,
            position_ids,
            segment_ids,
            cache,
        } = args;
        if segment_ids.is_some() {
            return Err(Error::InvalidArgument(
                "packed sequences are not supported with prompt-learning adapters; set packing = false".into(),
            ));
        }
        let n = prompt.num_virtual_tokens();
        let starts = cache.as_deref().is_none_or(|c| c.seen() == 0);
        let shifted = position_ids
            .map(|p| shift_positions(p, n, batch, seq))
            .transpose()?;
        if let PromptLearning::Prefix { .. } = prompt {
            let mut own_cache;
            let cache = match cache {
                Some(c) => {
                    if starts {
                        *c = prompt.prefix_cache(&self.model, batch)?;
                    }
                    c
                }
                None => {
                    own_cache = prompt.prefix_cache(&self.model, batch)?;
                    &mut own_cache
                }
            };
            let args = Forward {
                input,
                attention_mask,
                position_ids: shifted.as_ref(),
                segment_ids: None,
                cache: Some(cache),
            };
            return match output {
                Output::Last => self.model.forward_last(args),
                Output::Input | Output::WithVirtual => self.model.forward_with(args),
            };
        }
        if !starts {
            // Decoding after the virtual tokens went into the cache.
            let args = Forward {
                input,
                attention_mask,
                position_ids: shifted.as_ref(),
                segment_ids: None,
                cache,
            };
            return match output {
                Output::Last => self.model.forward_last(args),
                Output::Input | Output::WithVirtual => self.model.forward_with(args),
            };
        }
        let virtual_tokens = prompt.prompt_embeddings()?.to_dtype(self.model.dtype())?;
        let (_, h) = virtual_tokens.dims2()?;
        let front = virtual_tokens.unsqueeze(0)?.broadcast_as((batch, n, h))?;
        let tokens = match input {
            Input::Ids(ids) => self.model.embed(ids)?,
            Input::Embeds(e) => e.to_dtype(self.model.dtype())?,
        };
        let embeds = Tensor::cat(&[&front, &tokens], 1)?;
        let mask = attention_mask
            .map(|m| -> Result<Tensor> {
                let ones = Tensor::ones((batch, n), m.dtype(), m.device())?;
                Ok(Tensor::cat(&[&ones, m], 1)?)
            })
            .transpose()?;
        let positions = shifted
            .map(|p| -> Result<Tensor> {
                let front: Vec<u32> = (0..batch).flat_map(|_| 0..n as u32).collect();
                let front = Tensor::from_vec(front, (batch, n), p.device())?;
                Ok(Tensor::cat(&[&front, &p], 1)?)
            })
            .transpose()?;
        let args = Forward {
            input: Input::Embeds(&embeds),
            attention_mask: mask.as_ref(),
            position_ids: positions.as_ref(),
            segment_ids: None,
            cache,
        };
        match output {
            Output::Last => self.model.forward_last(args),
            Output::WithVirtual => self.model.forward_with(args),
            Output::Input => Ok(self.model.forward_with(args)?.narrow(1, n, seq)?),
        }
    }

    /// Final-norm hidden states aligned with `ids` (virtual prompt positions dropped) and the
    /// frozen head weight, when the head carries no adapter: a loss can then be computed
    /// without materialising the logits. `None` when the head must run as a module.
    pub fn hidden_for_loss(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        segments: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(head) = self.model.frozen_head_weight() else {
            return Ok(None);
        };
        let (batch, seq) = ids.dims2()?;
        let hidden = match self.acting_prompt() {
            None => self
                .model
                .hidden_states(token_inputs(ids, mask, positions, segments))?,
            // Prompt-learning methods keep the logits path (they are small and rare).
            Some(_) => return Ok(None),
        };
        debug_assert_eq!(hidden.dims()[..2], [batch, seq]);
        Ok(Some((hidden, head.clone())))
    }

    /// [`hidden_for_loss`](Self::hidden_for_loss) with gradient checkpointing (see
    /// [`Model::hidden_states_checkpointed`]); finish with
    /// [`backward_checkpointed`](Self::backward_checkpointed). `None` where
    /// `hidden_for_loss` is `None`.
    pub fn hidden_for_loss_checkpointed(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        segments: Option<&Tensor>,
    ) -> Result<Option<(Checkpointed, Tensor)>> {
        self.hidden_for_loss_layered(ids, mask, positions, segments, true)
    }

    /// The layer-by-layer forward for a loss: the layers `checkpointing` names are recomputed
    /// in the backward (gradient checkpointing, see [`Model::hidden_states_checkpointed`]);
    /// the others keep their graph, freed layer by layer in
    /// [`backward_checkpointed`](Self::backward_checkpointed) (see
    /// [`Model::hidden_states_segmented`]). `true`/`false` mean all/none. `None` where
    /// `hidden_for_loss` is `None`.
    pub fn hidden_for_loss_layered(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        segments: Option<&Tensor>,
        checkpointing: impl Into<Checkpointing>,
    ) -> Result<Option<(Checkpointed, Tensor)>> {
        let Some(head) = self.model.frozen_head_weight() else {
            return Ok(None);
        };
        if self.acting_prompt().is_some() {
            return Ok(None);
        }
        let args = token_inputs(ids, mask, positions, segments);
        let ck = self
            .model
            .hidden_states_layered(args, checkpointing.into())?;
        Ok(Some((ck, head)))
    }

    /// The gradients of `loss` for `vars` after a checkpointed forward.
    pub fn backward_checkpointed(
        &self,
        ck: Checkpointed,
        loss: &Tensor,
        vars: &[Var],
    ) -> Result<Vec<Option<Tensor>>> {
        self.model.backward_checkpointed(ck, loss, vars)
    }

    /// Adds an adapter. LoRA and IA³ wrap the targeted projections; prompt-learning methods
    /// add virtual tokens or prefixes; bottleneck adapters hook into the decoder blocks.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<PeftConfig>) -> Result<()> {
        let mut config = config.into();
        if self.configs.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "an adapter named `{name}` exists already"
            )));
        }
        if let Some(existing) = self.configs.values().next() {
            let mixes_prompt = existing.is_prompt_learning() || config.is_prompt_learning();
            if mixes_prompt && existing.peft_type() != config.peft_type() {
                return Err(Error::InvalidArgument(format!(
                    "cannot add a {} adapter to a model with a {} adapter",
                    config.peft_type(),
                    existing.peft_type()
                )));
            }
        }
        let mut rng = Rng::new(self.seed ^ hash(name));
        match &mut config {
            PeftConfig::Lora(c) => self.add_lora(name, c, &mut rng)?,
            PeftConfig::Ia3(c) => self.add_ia3(name, c)?,
            PeftConfig::PromptTuning(c) => {
                fill_prompt_defaults(&mut c.prompt, &self.model, false)?;
                let p = self.init_prompt_tuning(c, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
            }
            PeftConfig::PTuning(c) => {
                fill_prompt_defaults(&mut c.prompt, &self.model, false)?;
                let p = self.init_p_tuning(c, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
            }
            PeftConfig::PrefixTuning(c) => {
                fill_prompt_defaults(&mut c.prompt, &self.model, true)?;
                let p = self.init_prefix(c, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
            }
            PeftConfig::Bottleneck(c) => self.add_bottleneck(name, c, &mut rng)?,
        }
        self.configs.insert(name.to_string(), config);
        if self.configs.len() == 1 {
            self.switch.update(|s| s.active = name.to_string());
        }
        Ok(())
    }

    fn add_lora(&mut self, name: &str, c: &super::config::LoraConfig, rng: &mut Rng) -> Result<()> {
        if c.r == 0 {
            return Err(Error::Config("LoRA rank r must be positive (got 0)".into()));
        }
        if !(0.0..1.0).contains(&c.lora_dropout) {
            return Err(Error::Config(format!(
                "lora_dropout must be in [0, 1), got {}",
                c.lora_dropout
            )));
        }
        if c.fan_in_fan_out {
            return Err(Error::Config(
                "fan_in_fan_out is for GPT-2's Conv1D; Mistral/Llama use Linear".into(),
            ));
        }
        let init = match &c.init_lora_weights {
            LoraInit::Bool(true) => LoraInitKind::Default,
            LoraInit::Bool(false) => LoraInitKind::Random,
            LoraInit::Named(n) if n == "gaussian" => LoraInitKind::Gaussian,
            LoraInit::Named(n) => {
                return Err(Error::Config(format!(
                "init_lora_weights `{n}` is not supported (supported: true, false, \"gaussian\")"
            )))
            }
        };
        let targets = c
            .target_modules
            .clone()
            .unwrap_or_else(|| TargetModules::names(&["q_proj", "v_proj"]));
        let paths = self.select(
            &targets,
            c.exclude_modules.as_ref(),
            c.layers_to_transform.as_ref(),
        )?;
        for path in paths {
            let r = pattern_value(&c.rank_pattern, &path)?.unwrap_or(c.r);
            if r == 0 {
                return Err(Error::Config(format!(
                    "rank_pattern gives r = 0 for {path}"
                )));
            }
            let alpha = pattern_value(&c.alpha_pattern, &path)?.unwrap_or(c.lora_alpha);
            let scaling = if c.use_rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            let switch = self.switch.clone();
            self.wrap::<LoraLinear>(
                &path,
                |base| LoraLinear::new(base, switch),
                |l| l.add_adapter(name, r, scaling, c.lora_dropout, c.use_dora, init, rng),
            )?;
        }
        self.add_saved_modules(name, c.modules_to_save.as_deref().unwrap_or_default())
    }

    /// `modules_to_save`: trainable full copies of the output head and/or the token
    /// embeddings for this adapter.
    fn add_saved_modules(&mut self, name: &str, modules: &[String]) -> Result<()> {
        for m in modules {
            if m == "lm_head" || m.ends_with(".lm_head") {
                let switch = self.switch.clone();
                self.wrap::<SavedLinear>(
                    "lm_head",
                    |base| SavedLinear::new(base, switch),
                    |l| l.add_copy(name),
                )?;
            } else if m == "embed_tokens" || m.ends_with(".embed_tokens") {
                if self.model.embed_override().is_none() {
                    let saved = SavedEmbedding::new(self.switch.clone());
                    self.model.set_embed_override(Some(Box::new(saved)));
                }
                let table = self.model.embed_tokens().clone();
                let saved = self
                    .model
                    .embed_override_mut()
                    .and_then(|o| o.as_any_mut().downcast_mut::<SavedEmbedding>())
                    .ok_or_else(|| {
                        Error::InvalidArgument("the embedding is replaced by something else".into())
                    })?;
                saved.add_copy(name, &table)?;
            } else {
                return Err(Error::UnknownModule {
                    name: m.clone(),
                    close_matches: vec!["lm_head".into(), "embed_tokens".into()],
                });
            }
        }
        Ok(())
    }

    fn add_ia3(&mut self, name: &str, c: &super::config::Ia3Config) -> Result<()> {
        let targets = c
            .target_modules
            .clone()
            .unwrap_or_else(|| TargetModules::names(&["k_proj", "v_proj", "down_proj"]));
        let feedforward = c
            .feedforward_modules
            .clone()
            .unwrap_or_else(|| TargetModules::names(&["down_proj"]));
        let ff = super::targets::Matcher::new(&feedforward)?;
        let paths = self.select(&targets, c.exclude_modules.as_ref(), None)?;
        for path in paths {
            let is_ff = ff.matches(&path);
            let switch = self.switch.clone();
            self.wrap::<Ia3Linear>(
                &path,
                |base| Ia3Linear::new(base, is_ff, switch),
                |l| {
                    if l.is_feedforward() != is_ff {
                        return Err(Error::Config(format!(
                            "{path} is a feed-forward module in one IA3 adapter and not in another"
                        )));
                    }
                    l.add_adapter(name)
                },
            )?;
        }
        self.add_saved_modules(name, c.modules_to_save.as_deref().unwrap_or_default())
    }

    fn add_bottleneck(
        &mut self,
        name: &str,
        c: &super::config::BottleneckConfig,
        rng: &mut Rng,
    ) -> Result<()> {
        if c.reduction_factor == 0 || c.reduction_factor > self.model.config().hidden_size {
            return Err(Error::Config(format!(
                "reduction_factor must be in 1..={} (hidden_size), got {}",
                self.model.config().hidden_size,
                c.reduction_factor
            )));
        }
        if !c.mh_adapter && !c.output_adapter {
            return Err(Error::Config(
                "a bottleneck adapter needs mh_adapter or output_adapter".into(),
            ));
        }
        let act = NonLinearity::parse(&c.non_linearity)?;
        let hidden = self.model.config().hidden_size;
        let width = hidden / c.reduction_factor;
        let device = self.model.device().clone();
        let dtype = super::param_dtype(self.model.dtype());
        let switch = self.switch.clone();
        for (i, layer) in self.model.layers_mut().iter_mut().enumerate() {
            if c.leave_out.contains(&i) {
                continue;
            }
            let slots = [
                (c.mh_adapter, &mut layer.attn_adapter),
                (c.output_adapter, &mut layer.mlp_adapter),
            ];
            for (wanted, slot) in slots {
                if !wanted {
                    continue;
                }
                let block =
                    slot.get_or_insert_with(|| Box::new(BottleneckBlock::new(switch.clone())));
                let block = block
                    .as_any_mut()
                    .downcast_mut::<BottleneckBlock>()
                    .ok_or_else(|| {
                        Error::InvalidArgument("layer has another kind of block adapter".into())
                    })?;
                block.add_adapter(
                    name,
                    hidden,
                    width,
                    act,
                    c.scaling,
                    c.is_parallel,
                    &c.init_weights,
                    dtype,
                    rng,
                    &device,
                )?;
            }
        }
        Ok(())
    }

    fn init_prompt_tuning(
        &self,
        c: &super::config::PromptTuningConfig,
        rng: &mut Rng,
    ) -> Result<PromptLearning> {
        let n = c.prompt.num_virtual_tokens;
        let dim = c
            .prompt
            .token_dim
            .unwrap_or(self.model.config().hidden_size);
        let device = self.model.device();
        let dtype = super::param_dtype(self.model.dtype());
        let table = match c.prompt_tuning_init.as_str() {
            "RANDOM" => Tensor::from_vec(rng.normal(n * dim, 0.0, 1.0), (n, dim), device)?,
            "SAMPLE_VOCAB" => {
                let vocab = self.model.config().vocab_size;
                let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
                let ids = Tensor::new(ids.as_slice(), device)?;
                self.model.embed_tokens().index_select(&ids, 0)?
            }
            "TEXT" => {
                return Err(Error::Config(
                    "prompt_tuning_init TEXT needs token ids: use PeftModel::init_prompt_from_ids after adding the adapter with RANDOM".into(),
                ))
            }
            other => {
                return Err(Error::Config(format!(
                    "prompt_tuning_init `{other}` (supported: RANDOM, SAMPLE_VOCAB, TEXT)"
                )))
            }
        };
        Ok(PromptLearning::Prompt {
            embeddings: Var::from_tensor(&table.to_dtype(dtype)?)?,
        })
    }

    /// Prompt tuning's TEXT initialisation: the virtual tokens start as the embeddings of
    /// `ids` (the tokenized init text), repeated or truncated to the number of virtual tokens.
    pub fn init_prompt_from_ids(&mut self, adapter: &str, ids: &[u32]) -> Result<()> {
        let Some(PromptLearning::Prompt { embeddings }) = self.prompts.get(adapter) else {
            return Err(Error::InvalidArgument(format!(
                "`{adapter}` is not a prompt-tuning adapter"
            )));
        };
        if ids.is_empty() {
            return Err(Error::InvalidArgument("the init text has no tokens".into()));
        }
        let n = embeddings.dim(0)?;
        let ids: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
        let ids = Tensor::new(ids.as_slice(), self.model.device())?;
        let table = self
            .model
            .embed_tokens()
            .index_select(&ids, 0)?
            .to_dtype(embeddings.dtype())?;
        embeddings.set(&table)?;
        if let Some(PeftConfig::PromptTuning(c)) = self.configs.get_mut(adapter) {
            c.prompt_tuning_init = "TEXT".into();
        }
        Ok(())
    }

    fn init_p_tuning(
        &self,
        c: &super::config::PromptEncoderConfig,
        rng: &mut Rng,
    ) -> Result<PromptLearning> {
        let n = c.prompt.num_virtual_tokens;
        let dim = c
            .prompt
            .token_dim
            .unwrap_or(self.model.config().hidden_size);
        let hidden = c.encoder_hidden_size.unwrap_or(dim);
        let device = self.model.device();
        let dtype = super::param_dtype(self.model.dtype());
        let table = Tensor::from_vec(rng.normal(n * dim, 0.0, 1.0), (n, dim), device)?;
        let embedding = Var::from_tensor(&table.to_dtype(dtype)?)?;
        let encoder = match c.encoder_reparameterization_type.as_str() {
            "MLP" => PromptEncoder::mlp(dim, hidden, dtype, rng, device)?,
            "LSTM" => PromptEncoder::lstm(dim, hidden, c.encoder_num_layers, dtype, rng, device)?,
            other => {
                return Err(Error::Config(format!(
                    "encoder_reparameterization_type `{other}` (supported: MLP, LSTM)"
                )))
            }
        };
        Ok(PromptLearning::Encoded {
            embedding,
            encoder: Some(encoder),
        })
    }

    fn init_prefix(
        &self,
        c: &super::config::PrefixTuningConfig,
        rng: &mut Rng,
    ) -> Result<PromptLearning> {
        let n = c.prompt.num_virtual_tokens;
        let cfg = self.model.config();
        let dim = c
            .prompt
            .token_dim
            .unwrap_or(cfg.num_key_value_heads * cfg.head_dim);
        let layers = c.prompt.num_layers.unwrap_or(cfg.num_hidden_layers);
        let width = layers * 2 * dim;
        let device = self.model.device();
        let dtype = super::param_dtype(self.model.dtype());
        let zero = c.init_weights.as_deref() == Some("zero");
        let mut init = |n_el: usize, shape: (usize, usize)| -> Result<Var> {
            let v = if zero {
                vec![0.0; n_el]
            } else {
                rng.normal(n_el, 0.0, 1.0)
            };
            Ok(Var::from_tensor(
                &Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?,
            )?)
        };
        if c.prefix_projection {
            let hidden = c.encoder_hidden_size.unwrap_or(dim);
            let embedding = init(n * dim, (n, dim))?;
            let projection = [
                super::prompt::TrainableLinear::new(dim, hidden, dtype, rng, device)?,
                super::prompt::TrainableLinear::new(hidden, width, dtype, rng, device)?,
            ];
            Ok(PromptLearning::Prefix {
                embedding,
                projection: Some(projection),
            })
        } else {
            let embedding = init(n * width, (n, width))?;
            Ok(PromptLearning::Prefix {
                embedding,
                projection: None,
            })
        }
    }

    fn select(
        &self,
        targets: &TargetModules,
        exclude: Option<&TargetModules>,
        layers: Option<&super::config::LayerIndices>,
    ) -> Result<Vec<String>> {
        let candidates = self.model.linear_paths();
        select(&candidates, targets, exclude, layers, &|name| {
            // A bare name like "q_prj": suggest among the short names too.
            let short: Vec<String> = crate::model::paths::ATTENTION_PROJECTIONS
                .iter()
                .chain(crate::model::paths::MLP_PROJECTIONS.iter())
                .map(|s| s.to_string())
                .chain(["lm_head".to_string()])
                .collect();
            if name.contains('.') {
                self.model.unknown_module(name)
            } else {
                let mut close: Vec<String> =
                    short.iter().filter(|s| similar(name, s)).cloned().collect();
                if close.is_empty() {
                    close = short;
                }
                Error::UnknownModule {
                    name: name.to_string(),
                    close_matches: close,
                }
            }
        })
    }

    /// Wraps the linear at `path` in `T` (unless it already is one) and calls `add` on it.
    fn wrap<T: Linear + 'static>(
        &mut self,
        path: &str,
        make: impl FnOnce(Box<dyn Linear>) -> T,
        add: impl FnOnce(&mut T) -> Result<()>,
    ) -> Result<()> {
        self.model.replace_linear(path, |old| {
            let mut layer: Box<T> = if old.as_any().is::<T>() {
                old.into_any().downcast::<T>().expect("type checked above")
            } else {
                Box::new(make(old))
            };
            match add(&mut layer) {
                Ok(()) => Ok(layer),
                Err(e) => Err((layer, e)),
            }
        })
    }

    fn each_linear<T: 'static>(&self) -> Vec<(String, &T)> {
        self.model
            .linear_paths()
            .into_iter()
            .filter_map(|p| {
                let l = self.model.linear(&p).ok()?;
                l.as_any().downcast_ref::<T>().map(|t| (p, t))
            })
            .collect()
    }

    fn each_linear_mut<T: 'static>(
        &mut self,
        mut f: impl FnMut(&str, &mut T) -> Result<()>,
    ) -> Result<()> {
        for p in self.model.linear_paths() {
            let mut result = Ok(());
            self.model.replace_linear(&p, |mut l| {
                if let Some(t) = l.as_any_mut().downcast_mut::<T>() {
                    result = f(&p, t);
                }
                Ok(l)
            })?;
            result?;
        }
        Ok(())
    }

    /// The adapter's parameters with the names PEFT saves them under
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `prompt_embeddings`
    /// is the *output* of an encoder, so prompt methods list their encoder's parameters).
    pub fn adapter_vars(&self, adapter: &str) -> Vec<(String, Var)> {
        let mut vars = vec![];
        for (path, l) in self.each_linear::<LoraLinear>() {
            if let Some(a) = l.adapters().get(adapter) {
                vars.push((
                    format!("base_model.model.{path}.lora_A.weight"),
                    a.a.clone(),
                ));
                vars.push((
                    format!("base_model.model.{path}.lora_B.weight"),
                    a.b.clone(),
                ));
                if let Some(m) = &a.magnitude {
                    vars.push((
                        format!("base_model.model.{path}.lora_magnitude_vector"),
                        m.clone(),
                    ));
                }
            }
        }
        for (path, l) in self.each_linear::<Ia3Linear>() {
            if let Some(v) = l.adapters().get(adapter) {
                vars.push((format!("base_model.model.{path}.ia3_l"), v.clone()));
            }
        }
        for (i, layer) in self.model.layers().iter().enumerate() {
            for (slot, name) in [
                (&layer.attn_adapter, "attention_adapter"),
                (&layer.mlp_adapter, "output_adapter"),
            ] {
                let Some(block) = slot
                    .as_ref()
                    .and_then(|b| b.as_any().downcast_ref::<BottleneckBlock>())
                else {
                    continue;
                };
                if let Some(b) = block.adapter(adapter) {
                    let p = format!("base_model.model.model.layers.{i}.{name}");
                    for (part, l) in [("adapter_down", &b.down), ("adapter_up", &b.up)] {
                        vars.push((format!("{p}.{part}.weight"), l.weight.clone()));
                        vars.push((format!("{p}.{part}.bias"), l.bias.clone()));
                    }
                }
            }
        }
        if let Some(p) = self.prompts.get(adapter) {
            vars.extend(p.named_vars(adapter));
        }
        for (_, l) in self.each_linear::<SavedLinear>() {
            if let Some(w) = l.copy(adapter) {
                vars.push(("base_model.model.lm_head.weight".to_string(), w.clone()));
            }
        }
        let saved_embedding = self
            .model
            .embed_override()
            .and_then(|o| o.as_any().downcast_ref::<SavedEmbedding>());
        if let Some(t) = saved_embedding.and_then(|e| e.copies.get(adapter)) {
            let name = "base_model.model.model.embed_tokens.weight".to_string();
            vars.push((name, t.clone()));
        }
        vars
    }

    /// Sets the adapter's parameters from tensors keyed by [`adapter_vars`](Self::adapter_vars)
    /// names (checkpoints, or a P-tuning encoder trained elsewhere). Every parameter must be
    /// present with its shape. Returns how many were set.
    pub fn set_adapter_vars(
        &self,
        adapter: &str,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<usize> {
        let vars = self.adapter_vars(adapter);
        for (name, var) in &vars {
            let t = tensors.get(name).ok_or_else(|| {
                Error::InvalidArgument(format!("no value for parameter `{name}`"))
            })?;
            if t.dims() != var.dims() {
                return Err(Error::InvalidArgument(format!(
                    "parameter `{name}` has shape {:?}, the value {:?}",
                    var.dims(),
                    t.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(vars.len())
    }

    /// The active adapter's trainable parameters, by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.adapter_vars(&self.active_adapter())
    }

    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// PEFT's line: `trainable params: X || all params: Y || trainable%: Z`.
    pub fn trainable_parameters_line(&self) -> String {
        let trainable = self.num_trainable_parameters();
        let all = self.model.num_parameters() + trainable;
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(trainable),
            thousands(all),
            100.0 * trainable as f64 / all.max(1) as f64
        )
    }

    /// Prints [`trainable_parameters_line`](Self::trainable_parameters_line).
    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters_line());
    }

    /// Merges the active LoRA/IA³ adapter into the base weights (it keeps existing and can be
    /// unmerged).
    pub fn merge_adapter(&mut self) -> Result<()> {
        let name = self.active_adapter();
        match self.configs.get(&name) {
            Some(PeftConfig::Lora(_)) => {
                let quantized = self
                    .each_linear::<LoraLinear>()
                    .iter()
                    .any(|(_, l)| l.adapters().contains_key(&name) && l.base().is_quantized());
                if quantized {
                    // PEFT's warning for bitsandbytes layers (once, not per layer): the sum
                    // is re-quantized.
                    eprintln!(
                        "UserWarning: Merge lora module to 4-bit linear may get different generations due to rounding errors."
                    );
                }
                self.each_linear_mut::<LoraLinear>(|_, l| {
                    if l.adapters().contains_key(&name) {
                        l.merge(&name)?;
                    }
                    Ok(())
                })
            }
            Some(PeftConfig::Ia3(_)) => self.each_linear_mut::<Ia3Linear>(|_, l| {
                if l.adapters().contains_key(&name) {
                    l.merge(&name)?;
                }
                Ok(())
            }),
            Some(other) => Err(Error::InvalidArgument(format!(
                "{} adapters cannot be merged into the weights (only LORA and IA3)",
                other.peft_type()
            ))),
            None => Err(Error::InvalidArgument("no adapter to merge".into())),
        }
    }

    /// Undoes [`merge_adapter`](Self::merge_adapter).
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        self.each_linear_mut::<LoraLinear>(|_, l| l.unmerge())?;
        self.each_linear_mut::<Ia3Linear>(|_, l| l.unmerge())
    }

    /// Merges the active adapter and returns the plain base model (PEFT's `merge_and_unload`).
    pub fn merge_and_unload(mut self) -> Result<Model> {
        self.merge_adapter()?;
        let active = self.active_adapter();
        let mut model = self.model;
        // modules_to_save: the trained copies become the weights.
        let embedding = model
            .embed_override()
            .and_then(|o| o.as_any().downcast_ref::<SavedEmbedding>())
            .and_then(|e| e.copies.get(&active))
            .map(|v| v.as_tensor().detach());
        if let Some(table) = embedding {
            let dtype = model.dtype();
            model.set_embed_tokens(table.to_dtype(dtype)?)?;
        }
        model.set_embed_override(None);
        for p in model.linear_paths() {
            model.replace_linear(&p, |l| {
                if l.as_any().is::<SavedLinear>() {
                    let saved = l.into_any().downcast::<SavedLinear>().expect("checked");
                    return Ok(match saved.copy(&active).map(|v| v.as_tensor().detach()) {
                        Some(w) => Box::new(FrozenLinear::new(w, None)),
                        None => saved.into_base(),
                    });
                }
                if l.as_any().is::<LoraLinear>() {
                    Ok(l.into_any()
                        .downcast::<LoraLinear>()
                        .expect("checked")
                        .into_base())
                } else if l.as_any().is::<Ia3Linear>() {
                    Ok(l.into_any()
                        .downcast::<Ia3Linear>()
                        .expect("checked")
                        .into_base())
                } else {
                    Ok(l)
                }
            })?;
        }
        Ok(model)
    }

    /// Drops every adapter without merging (PEFT's `unload`).
    pub fn unload(self) -> Model {
        let mut model = self.model;
        model.set_embed_override(None);
        for p in model.linear_paths() {
            let _ = model.replace_linear(&p, |l| {
                if l.as_any().is::<SavedLinear>() {
                    let saved = l.into_any().downcast::<SavedLinear>().expect("checked");
                    return Ok(saved.into_base());
                }
                if l.as_any().is::<LoraLinear>() {
                    Ok(l.into_any()
                        .downcast::<LoraLinear>()
                        .expect("checked")
                        .into_base())
                } else if l.as_any().is::<Ia3Linear>() {
                    Ok(l.into_any()
                        .downcast::<Ia3Linear>()
                        .expect("checked")
                        .into_base())
                } else {
                    Ok(l)
                }
            });
        }
        for layer in model.layers_mut() {
            layer.attn_adapter = None;
            layer.mlp_adapter = None;
        }
        model
    }

    /// The tensors PEFT would save for `adapter`, by saved name.
    pub fn adapter_state_dict(&self, adapter: &str) -> Result<Vec<(String, Tensor)>> {
        if let Some(p) = self.prompts.get(adapter) {
            return Ok(vec![(
                "prompt_embeddings".to_string(),
                p.prompt_embeddings()?.detach(),
            )]);
        }
        Ok(self
            .adapter_vars(adapter)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` for every adapter
    /// (`default` into `dir`, others into `dir/<name>`, as PEFT does). Each file is written
    /// to a temporary name and renamed, so a crash never leaves a half-written adapter.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        for name in self.configs.keys() {
            let target = if name == DEFAULT_ADAPTER {
                dir.as_ref().to_path_buf()
            } else {
                dir.as_ref().join(name)
            };
            self.save_adapter(name, &target)?;
        }
        Ok(())
    }

    /// Saves one adapter into `dir`.
    pub fn save_adapter(&self, adapter: &str, dir: &Path) -> Result<()> {
        let mut config = self
            .configs
            .get(adapter)
            .ok_or_else(|| Error::InvalidArgument(format!("no adapter named `{adapter}`")))?
            .clone();
        config.common_mut().inference_mode = true;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self.adapter_state_dict(adapter)?;
        super::io::write_safetensors_atomic(&dir.join("adapter_model.safetensors"), &tensors)?;
        let json = serde_json::to_string_pretty(&config.to_json())
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the config: {e}")))?;
        super::io::write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
    }

    /// Loads a saved adapter (ours or Python PEFT's) onto `model` as "default".
    pub fn from_pretrained(model: Model, dir: impl AsRef<Path>) -> Result<Self> {
        let mut peft = PeftModel::new(model);
        peft.load_adapter(dir, DEFAULT_ADAPTER)?;
        Ok(peft)
    }

    /// Loads a saved adapter under `name`.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let dir = dir.as_ref();
        let config_path = dir.join("adapter_config.json");
        let config = PeftConfig::from_file(&config_path)?;
        check_prompt_config_fits(&config, &self.model, &config_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = super::io::read_safetensors(&weights_path)?;
        self.add_adapter(name, config)?;
        let result = self.load_state_dict(name, &tensors, &weights_path);
        if result.is_err() {
            self.delete_adapter(name);
        }
        result
    }

    fn load_state_dict(
        &mut self,
        name: &str,
        tensors: &BTreeMap<String, Tensor>,
        path: &PathBuf,
    ) -> Result<()> {
        let shape_error = |key: &str, expected: &[usize], got: &[usize]| Error::ShapeMismatch {
            path: path.clone(),
            name: key.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        };
        if let Some(prompt) = self.prompts.get_mut(name) {
            let t = tensors
                .get("prompt_embeddings")
                .ok_or_else(|| Error::MissingTensor {
                    path: path.clone(),
                    name: "prompt_embeddings".into(),
                })?;
            let expected = prompt.prompt_embeddings()?.dims().to_vec();
            if t.dims() != expected.as_slice() {
                return Err(shape_error("prompt_embeddings", &expected, t.dims()));
            }
            return prompt.load_prompt_embeddings(&t.to_device(self.model.device())?);
        }
        let expected = self.adapter_vars(name);
        for (key, var) in &expected {
            let t = tensors.get(key).ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: key.clone(),
            })?;
            if t.dims() != var.dims() {
                return Err(shape_error(key, var.dims(), t.dims()));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        let known: std::collections::HashSet<&String> = expected.iter().map(|(k, _)| k).collect();
        if let Some(extra) = tensors.keys().find(|k| !known.contains(k)) {
            return Err(Error::corrupt(
                path,
                format!("tensor `{extra}` does not belong to any module this adapter targets on this model"),
            ));
        }
        Ok(())
    }

    /// Removes an adapter and its parameters.
    pub fn delete_adapter(&mut self, name: &str) {
        self.configs.remove(name);
        self.prompts.remove(name);
        let _ = self.each_linear_mut::<LoraLinear>(|_, l| {
            l.remove_adapter(name);
            Ok(())
        });
        let _ = self.each_linear_mut::<Ia3Linear>(|_, l| {
            l.remove_adapter(name);
            Ok(())
        });
        let _ = self.each_linear_mut::<SavedLinear>(|_, l| {
            l.copies.remove(name);
            Ok(())
        });
        if let Some(e) = self
            .model
            .embed_override_mut()
            .and_then(|o| o.as_any_mut().downcast_mut::<SavedEmbedding>())
        {
            e.copies.remove(name);
        }
        for layer in self.model.layers_mut() {
            for slot in [&mut layer.attn_adapter, &mut layer.mlp_adapter] {
                if let Some(b) = slot
                    .as_mut()
                    .and_then(|b| b.as_any_mut().downcast_mut::<BottleneckBlock>())
                {
                    b.remove_adapter(name);
                }
            }
        }
        if self.active_adapter() == name {
            if let Some(first) = self.configs.keys().next().cloned() {
                self.switch.update(|s| s.active = first);
            }
        }
    }
}

/// A forward pass over token ids with the optional padding mask, positions and segments.
fn token_inputs<'a>(
    ids: &'a Tensor,
    mask: Option<&'a Tensor>,
    positions: Option<&'a Tensor>,
    segments: Option<&'a Tensor>,
) -> Forward<'a> {
    Forward::ids(ids).with_optional(mask, positions, segments)
}

/// Position ids `[batch, seq]` counted from the input, moved past `n` virtual tokens (u32).
fn shift_positions(positions: &Tensor, n: usize, batch: usize, seq: usize) -> Result<Tensor> {
    if positions.dims() != [batch, seq] {
        return Err(Error::InvalidArgument(format!(
            "position_ids has shape {:?}, expected [{batch}, {seq}]",
            positions.dims()
        )));
    }
    let rows: Vec<u32> = positions
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|p| p + n as u32)
        .collect();
    Ok(Tensor::from_vec(rows, (batch, seq), positions.device())?)
}

/// Fills the model-dependent prompt-learning fields as PEFT's `_prepare_prompt_learning_config`
/// does (for grouped-query models, prefixes are kv_heads · head_dim wide).
fn fill_prompt_defaults(p: &mut PromptLearningCommon, model: &Model, prefix: bool) -> Result<()> {
    let c = model.config();
    if p.num_virtual_tokens == 0 {
        return Err(Error::Config("num_virtual_tokens must be positive".into()));
    }
    p.num_layers.get_or_insert(c.num_hidden_layers);
    p.num_transformer_submodules.get_or_insert(1);
    if prefix {
        p.token_dim
            .get_or_insert(c.num_key_value_heads * c.head_dim);
        p.num_attention_heads.get_or_insert(c.num_key_value_heads);
    } else {
        p.token_dim.get_or_insert(c.hidden_size);
        p.num_attention_heads.get_or_insert(c.num_attention_heads);
    }
    Ok(())
}

/// A saved prompt-learning adapter must have been made for a model of this shape.
fn check_prompt_config_fits(config: &PeftConfig, model: &Model, path: &Path) -> Result<()> {
    let c = model.config();
    let (p, want_dim) = match config {
        PeftConfig::PromptTuning(x) => (&x.prompt, c.hidden_size),
        PeftConfig::PTuning(x) => (&x.prompt, c.hidden_size),
        PeftConfig::PrefixTuning(x) => (&x.prompt, c.num_key_value_heads * c.head_dim),
        _ => return Ok(()),
    };
    if let Some(d) = p.token_dim.filter(|d| *d != want_dim) {
        return Err(Error::corrupt(
            path,
            format!("token_dim is {d}, this model needs {want_dim}"),
        ));
    }
    if let Some(l) = p.num_layers.filter(|l| *l != c.num_hidden_layers) {
        return Err(Error::corrupt(
            path,
            format!("num_layers is {l}, this model has {}", c.num_hidden_layers),
        ));
    }
    Ok(())
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn similar(a: &str, b: &str) -> bool {
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    common >= 2 || b.contains(a) || a.contains(b)
}

/// `1234567` → `1,234,567` (PEFT prints with `{:,d}`).
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

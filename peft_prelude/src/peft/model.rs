//! `PeftModel`: a base model with named adapters, saved and loaded in PEFT's format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::config::PeftConfig;
use super::ia3::Ia3Linear;
use super::inject::{each_linear, each_linear_mut};
use super::lora::LoraLinear;
use super::prompt::PromptLearning;
use super::saved::{SavedEmbedding, SavedLinear};
use super::switch::AdapterSwitch;
use super::{bottleneck, ia3, lora, saved};
use crate::error::{Error, Result};
use crate::model::forward::Input;
use crate::model::{
    CausalLm, Checkpointed, Checkpointing, Forward, FrozenHead, FrozenLinear, KvCache, Linear,
    Model, ModelConfig,
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
    get_peft_model_with(model, config.into())
}

fn get_peft_model_with(model: Model, config: PeftConfig) -> Result<PeftModel> {
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
        self.model.release_integer_head();
    }

    fn acting_prompt(&self) -> Option<&PromptLearning> {
        let (name, _) = self.switch.acting()?;
        self.prompts.get(&name)
    }

    /// Logits for `ids: [batch, seq]`. With prompt tuning or P-tuning the virtual tokens'
    /// positions come first (`[batch, n + seq, vocab]`, as PEFT returns them); generation and
    /// the trainers use [`CausalLm::logits`], which gives the input's positions only.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(Forward::ids(ids))
    }

    /// [`forward`](Self::forward) with any arguments (a padding mask, a cache …), virtual
    /// positions included as PEFT returns them.
    pub fn forward_with(&self, args: Forward<'_>) -> Result<Tensor> {
        self.run(args, Output::WithVirtual)
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

    /// Final-norm hidden states `[batch, seq, hidden]` (with their whole graph) and the frozen
    /// head weight, when the head carries no adapter and no prompt method acts: a loss can
    /// then fuse the head into the cross-entropy, never materialising the logits. `None`: the
    /// loss must go through [`CausalLm::logits`].
    pub fn hidden_for_loss(&self, args: Forward<'_>) -> Result<Option<(Tensor, FrozenHead)>> {
        match (
            self.model.frozen_head(self.switch.get().training),
            self.acting_prompt(),
        ) {
            (Some(head), None) => Ok(Some((self.model.hidden_states(args)?, head))),
            // Prompt-learning methods keep the logits path (they are small and rare).
            _ => Ok(None),
        }
    }

    /// [`hidden_for_loss`](Self::hidden_for_loss) layer by layer, for
    /// [`backward_checkpointed`](Self::backward_checkpointed): the layers `checkpointing`
    /// names are recomputed in the backward (gradient checkpointing), the others keep their
    /// graph, freed layer by layer (see [`Model::hidden_states_layered`]); `true`/`false` mean
    /// all/none.
    pub fn hidden_for_loss_layered(
        &self,
        args: Forward<'_>,
        checkpointing: impl Into<Checkpointing>,
    ) -> Result<Option<(Checkpointed, FrozenHead)>> {
        match (
            self.model.frozen_head(self.switch.get().training),
            self.acting_prompt(),
        ) {
            (Some(head), None) => Ok(Some((
                self.model
                    .hidden_states_layered(args, checkpointing.into())?,
                head,
            ))),
            _ => Ok(None),
        }
    }

    /// The gradients of `loss` for `vars` after a checkpointed forward.
    pub fn backward_checkpointed(
        &self,
        ck: Checkpointed,
        loss: Tensor,
        vars: &[Var],
    ) -> Result<Vec<Option<Tensor>>> {
        self.model.backward_checkpointed(ck, loss, vars)
    }

    /// Adds an adapter. LoRA and IA³ wrap the targeted projections; prompt-learning methods
    /// add virtual tokens or prefixes; bottleneck adapters hook into the decoder blocks.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<PeftConfig>) -> Result<()> {
        self.add_adapter_config(name, config.into())
    }

    fn add_adapter_config(&mut self, name: &str, mut config: PeftConfig) -> Result<()> {
        config.check_limits().map_err(Error::Config)?;
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
        let (model, switch) = (&mut self.model, &self.switch);
        let saved_modules = match &mut config {
            PeftConfig::Lora(c) => {
                lora::add(model, switch, name, c, &mut rng)?;
                c.modules_to_save.clone()
            }
            PeftConfig::Ia3(c) => {
                ia3::add(model, switch, name, c)?;
                c.modules_to_save.clone()
            }
            PeftConfig::PromptTuning(c) => {
                let p = PromptLearning::prompt_tuning(c, model, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
                None
            }
            PeftConfig::PTuning(c) => {
                let p = PromptLearning::p_tuning(c, model, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
                None
            }
            PeftConfig::PrefixTuning(c) => {
                let p = PromptLearning::prefix_tuning(c, model, &mut rng)?;
                self.prompts.insert(name.to_string(), p);
                None
            }
            PeftConfig::Bottleneck(c) => {
                bottleneck::add(model, switch, name, c, &mut rng)?;
                None
            }
        };
        saved::add(
            &mut self.model,
            &self.switch,
            name,
            saved_modules.as_deref().unwrap_or_default(),
        )?;
        self.configs.insert(name.to_string(), config);
        if self.configs.len() == 1 {
            self.switch.update(|s| s.active = name.to_string());
        }
        Ok(())
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

    /// The adapter's parameters with the names PEFT saves them under
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `prompt_embeddings`
    /// is the *output* of an encoder, so prompt methods list their encoder's parameters).
    pub fn adapter_vars(&self, adapter: &str) -> Vec<(String, Var)> {
        let model = &self.model;
        let mut vars = lora::named_vars(model, adapter);
        vars.extend(ia3::named_vars(model, adapter));
        vars.extend(bottleneck::named_vars(model, adapter));
        if let Some(p) = self.prompts.get(adapter) {
            vars.extend(p.named_vars(adapter));
        }
        vars.extend(saved::named_vars(model, adapter));
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
                let quantized = each_linear::<LoraLinear>(&self.model)
                    .iter()
                    .any(|(_, l)| l.adapters().contains_key(&name) && l.base().is_quantized());
                if quantized {
                    // PEFT's warning for bitsandbytes layers (once, not per layer): the sum
                    // is re-quantized.
                    eprintln!(
                        "UserWarning: Merge lora module to 4-bit linear may get different generations due to rounding errors."
                    );
                }
                each_linear_mut::<LoraLinear>(&mut self.model, |_, l| {
                    if l.adapters().contains_key(&name) {
                        l.merge(&name)?;
                    }
                    Ok(())
                })
            }
            Some(PeftConfig::Ia3(_)) => each_linear_mut::<Ia3Linear>(&mut self.model, |_, l| {
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
        each_linear_mut::<LoraLinear>(&mut self.model, |_, l| l.unmerge())?;
        each_linear_mut::<Ia3Linear>(&mut self.model, |_, l| l.unmerge())
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
        self.save_pretrained_at(dir.as_ref())
    }

    fn save_pretrained_at(&self, dir: &Path) -> Result<()> {
        for name in self.configs.keys() {
            let target = if name == DEFAULT_ADAPTER {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            self.save_adapter(name, &target)?;
        }
        Ok(())
    }

    /// Saves one adapter into `dir`.
    pub fn save_adapter(&self, adapter: &str, dir: impl AsRef<Path>) -> Result<()> {
        self.save_adapter_at(adapter, dir.as_ref())
    }

    fn save_adapter_at(&self, adapter: &str, dir: &Path) -> Result<()> {
        let mut config = self
            .configs
            .get(adapter)
            .ok_or_else(|| Error::InvalidArgument(format!("no adapter named `{adapter}`")))?
            .clone();
        config.common_mut().inference_mode = true;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self.adapter_state_dict(adapter)?;
        super::io::write_safetensors_atomic(dir.join("adapter_model.safetensors"), &tensors)?;
        let json = serde_json::to_string_pretty(&config.to_json())
            .map_err(|e| Error::InvalidArgument(format!("cannot serialise the config: {e}")))?;
        super::io::write_atomic(dir.join("adapter_config.json"), json.as_bytes())
    }

    /// Loads a saved adapter (ours or Python PEFT's) onto `model` as "default".
    pub fn from_pretrained(model: Model, dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained_at(model, dir.as_ref())
    }

    fn from_pretrained_at(model: Model, dir: &Path) -> Result<Self> {
        let mut peft = PeftModel::new(model);
        peft.load_adapter(dir, DEFAULT_ADAPTER)?;
        Ok(peft)
    }

    /// Loads a saved adapter under `name`.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        self.load_adapter_at(dir.as_ref(), name)
    }

    fn load_adapter_at(&mut self, dir: &Path, name: &str) -> Result<()> {
        let config_path = dir.join("adapter_config.json");
        let config = PeftConfig::from_file(&config_path)?;
        super::prompt::check_config_fits(&config, &self.model, &config_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = super::io::read_safetensors(&weights_path)?;
        // A configuration the model cannot take is the file's fault: name it.
        self.add_adapter(name, config).map_err(|e| match e {
            Error::Config(what) | Error::InvalidArgument(what) => {
                Error::corrupt(&config_path, what)
            }
            Error::UnknownModule { .. } | Error::Candle(_) => {
                Error::corrupt(&config_path, e.to_string())
            }
            other => other,
        })?;
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
        lora::remove(&mut self.model, name);
        ia3::remove(&mut self.model, name);
        saved::remove(&mut self.model, name);
        bottleneck::remove(&mut self.model, name);
        if self.active_adapter() == name {
            if let Some(first) = self.configs.keys().next().cloned() {
                self.switch.update(|s| s.active = first);
            }
        }
    }
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

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
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

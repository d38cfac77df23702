//! Prompt-learning methods: virtual tokens in front of the input (prompt tuning, P-tuning)
//! or learned key/value prefixes in every attention layer (prefix tuning).

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use super::config::{
    PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptLearningCommon, PromptTuningConfig,
};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::rng::Rng;

/// A trainable dense layer `y = x Wᵀ + b` (PyTorch `nn.Linear` init).
#[derive(Debug, Clone)]
pub struct TrainableLinear {
    pub weight: Var,
    pub bias: Var,
}

impl TrainableLinear {
    pub fn new(
        in_f: usize,
        out_f: usize,
        dtype: DType,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_f as f64).sqrt();
        let w = Tensor::from_vec(
            rng.uniform(out_f * in_f, -bound, bound),
            (out_f, in_f),
            device,
        )?;
        let b = Tensor::from_vec(rng.uniform(out_f, -bound, bound), out_f, device)?;
        Ok(TrainableLinear {
            weight: Var::from_tensor(&w.to_dtype(dtype)?)?,
            bias: Var::from_tensor(&b.to_dtype(dtype)?)?,
        })
    }

    /// `x: [.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_f = x.dim(D::Minus1)?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        let x = x.to_dtype(self.weight.dtype())?.reshape(((), in_f))?;
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?
            .reshape(dims)?)
    }

    fn named(&self, prefix: &str) -> Vec<(String, Var)> {
        vec![
            (format!("{prefix}.weight"), self.weight.clone()),
            (format!("{prefix}.bias"), self.bias.clone()),
        ]
    }
}

/// One LSTM layer direction's parameters (PyTorch's layout: gates i, f, g, o stacked).
#[derive(Debug, Clone)]
pub struct LstmCell {
    w_ih: Var,
    w_hh: Var,
    b_ih: Var,
    b_hh: Var,
}

impl LstmCell {
    fn new(
        input: usize,
        hidden: usize,
        dtype: DType,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut v = |rows: usize, cols: usize| -> Result<Var> {
            let shape: Vec<usize> = if cols == 0 {
                vec![rows]
            } else {
                vec![rows, cols]
            };
            let n = rows * cols.max(1);
            let t = Tensor::from_vec(rng.uniform(n, -bound, bound), shape, device)?;
            Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
        };
        Ok(LstmCell {
            w_ih: v(4 * hidden, input)?,
            w_hh: v(4 * hidden, hidden)?,
            b_ih: v(4 * hidden, 0)?,
            b_hh: v(4 * hidden, 0)?,
        })
    }

    /// Runs over `x: [steps, input]` in the given order; returns `[steps, hidden]` in input order.
    fn run(&self, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let steps = x.dim(0)?;
        let hidden = self.w_hh.dim(1)?;
        let device = x.device();
        let mut h = Tensor::zeros((1, hidden), x.dtype(), device)?;
        let mut c = Tensor::zeros((1, hidden), x.dtype(), device)?;
        let pre = x
            .matmul(&self.w_ih.as_tensor().t()?)?
            .broadcast_add(self.b_ih.as_tensor())?
            .broadcast_add(self.b_hh.as_tensor())?;
        let mut outs = vec![None; steps];
        let order: Vec<usize> = if reverse {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        for t in order {
            let gates = (pre.narrow(0, t, 1)? + h.matmul(&self.w_hh.as_tensor().t()?)?)?;
            let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, hidden)?)?;
            let f = candle_nn::ops::sigmoid(&gates.narrow(1, hidden, hidden)?)?;
            let g = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            outs[t] = Some(h.clone());
        }
        let outs: Vec<Tensor> = outs
            .into_iter()
            .map(|o| o.expect("every step ran"))
            .collect();
        Ok(Tensor::cat(&outs, 0)?)
    }
}

/// P-tuning's prompt encoder.
#[derive(Debug, Clone)]
pub enum PromptEncoder {
    /// `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)`
    Mlp([TrainableLinear; 3]),
    /// Bidirectional LSTM(d, h, layers), then `Linear(2h, 2h) → ReLU → Linear(2h, d)`.
    Lstm {
        layers: Vec<(LstmCell, LstmCell)>,
        head: [TrainableLinear; 2],
    },
}

impl PromptEncoder {
    pub fn mlp(
        dim: usize,
        hidden: usize,
        dtype: DType,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Ok(PromptEncoder::Mlp([
            TrainableLinear::new(dim, hidden, dtype, rng, device)?,
            TrainableLinear::new(hidden, hidden, dtype, rng, device)?,
            TrainableLinear::new(hidden, dim, dtype, rng, device)?,
        ]))
    }

    pub fn lstm(
        dim: usize,
        hidden: usize,
        num_layers: usize,
        dtype: DType,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let mut layers = vec![];
        for l in 0..num_layers.max(1) {
            let input = if l == 0 { dim } else { 2 * hidden };
            layers.push((
                LstmCell::new(input, hidden, dtype, rng, device)?,
                LstmCell::new(input, hidden, dtype, rng, device)?,
            ));
        }
        Ok(PromptEncoder::Lstm {
            layers,
            head: [
                TrainableLinear::new(2 * hidden, 2 * hidden, dtype, rng, device)?,
                TrainableLinear::new(2 * hidden, dim, dtype, rng, device)?,
            ],
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            PromptEncoder::Mlp([a, b, c]) => c.forward(&b.forward(&a.forward(x)?.relu()?)?.relu()?),
            PromptEncoder::Lstm { layers, head } => {
                let mut h = x.clone();
                for (fwd, bwd) in layers {
                    h = Tensor::cat(&[&fwd.run(&h, false)?, &bwd.run(&h, true)?], D::Minus1)?;
                }
                head[1].forward(&head[0].forward(&h)?.relu()?)
            }
        }
    }

    /// Parameters under PEFT's module names (`mlp_head.0.weight`, `lstm_head.weight_ih_l0`, …).
    fn named(&self, prefix: &str) -> Vec<(String, Var)> {
        match self {
            PromptEncoder::Mlp(ls) => ls
                .iter()
                .zip([0, 2, 4])
                .flat_map(|(l, i)| l.named(&format!("{prefix}.mlp_head.{i}")))
                .collect(),
            PromptEncoder::Lstm { layers, head } => {
                let mut v = vec![];
                for (l, (f, b)) in layers.iter().enumerate() {
                    for (cell, suffix) in [(f, ""), (b, "_reverse")] {
                        for (name, var) in [
                            ("weight_ih", &cell.w_ih),
                            ("weight_hh", &cell.w_hh),
                            ("bias_ih", &cell.b_ih),
                            ("bias_hh", &cell.b_hh),
                        ] {
                            v.push((
                                format!("{prefix}.lstm_head.{name}_l{l}{suffix}"),
                                var.clone(),
                            ));
                        }
                    }
                }
                v.extend(head[0].named(&format!("{prefix}.mlp_head.0")));
                v.extend(head[1].named(&format!("{prefix}.mlp_head.2")));
                v
            }
        }
    }
}

/// A prompt-learning adapter's trainable state.
#[derive(Debug, Clone)]
pub enum PromptLearning {
    /// Virtual token embeddings `[n, hidden]`, used as they are.
    Prompt { embeddings: Var },
    /// P-tuning: `encoder(embedding)` gives the virtual tokens. After loading a saved
    /// adapter (which holds only the encoder's output) `encoder` is `None`.
    Encoded {
        embedding: Var,
        encoder: Option<PromptEncoder>,
    },
    /// Prefix tuning: `[n, layers · 2 · kv_heads · head_dim]`, optionally through the projection
    /// `Linear(d, h) → tanh → Linear(h, layers · 2 · d)` from an embedding `[n, d]`.
    Prefix {
        embedding: Var,
        projection: Option<[TrainableLinear; 2]>,
    },
}

impl PromptLearning {
    pub fn num_virtual_tokens(&self) -> usize {
        match self {
            PromptLearning::Prompt { embeddings: e }
            | PromptLearning::Encoded { embedding: e, .. }
            | PromptLearning::Prefix { embedding: e, .. } => e.dim(0).unwrap_or(0),
        }
    }

    /// What PEFT saves as `prompt_embeddings`: the virtual tokens (or prefixes) after any
    /// encoder or projection.
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        match self {
            PromptLearning::Prompt { embeddings } => Ok(embeddings.as_tensor().clone()),
            PromptLearning::Encoded { embedding, encoder } => match encoder {
                Some(enc) => enc.forward(embedding.as_tensor()),
                None => Ok(embedding.as_tensor().clone()),
            },
            PromptLearning::Prefix {
                embedding,
                projection,
            } => match projection {
                Some([a, b]) => b.forward(&a.forward(embedding.as_tensor())?.tanh()?),
                None => Ok(embedding.as_tensor().clone()),
            },
        }
    }

    /// Trainable parameters with PEFT's in-memory names.
    pub fn named_vars(&self, adapter: &str) -> Vec<(String, Var)> {
        let p = format!("prompt_encoder.{adapter}");
        match self {
            PromptLearning::Prompt { embeddings } => {
                vec![(format!("{p}.embedding.weight"), embeddings.clone())]
            }
            PromptLearning::Encoded { embedding, encoder } => {
                let mut v = vec![(format!("{p}.embedding.weight"), embedding.clone())];
                if let Some(enc) = encoder {
                    v.extend(enc.named(&p));
                }
                v
            }
            PromptLearning::Prefix {
                embedding,
                projection,
            } => {
                let mut v = vec![(format!("{p}.embedding.weight"), embedding.clone())];
                if let Some([a, b]) = projection {
                    v.extend(a.named(&format!("{p}.transform.0")));
                    v.extend(b.named(&format!("{p}.transform.2")));
                }
                v
            }
        }
    }

    /// Replaces the state with saved `prompt_embeddings` (as PEFT does on load: encoders and
    /// projections are not saved, their output is).
    pub fn load_prompt_embeddings(&mut self, t: &Tensor) -> Result<()> {
        let var = Var::from_tensor(&t.to_dtype(super::param_dtype(t.dtype()))?)?;
        *self = match self {
            PromptLearning::Prompt { .. } => PromptLearning::Prompt { embeddings: var },
            PromptLearning::Encoded { .. } => PromptLearning::Encoded {
                embedding: var,
                encoder: None,
            },
            PromptLearning::Prefix { .. } => PromptLearning::Prefix {
                embedding: var,
                projection: None,
            },
        };
        Ok(())
    }

    /// For prefix tuning: the per-layer `(key, value)` prefixes `[batch, kv_heads, n, head_dim]`
    /// in a cache, ready for a forward pass. Layout (PEFT): `[n, 2·layers, kv_heads, head_dim]`,
    /// index `2l` = layer l's keys, `2l + 1` its values.
    pub fn prefix_cache(&self, model: &Model, batch: usize) -> Result<KvCache> {
        let c = model.config();
        let n = self.num_virtual_tokens();
        let (layers, kvh, d) = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
        let table = self.prompt_embeddings()?.to_dtype(model.dtype())?;
        let expected = layers * 2 * kvh * d;
        if table.dims() != [n, expected] {
            return Err(Error::InvalidArgument(format!(
                "prefix has shape {:?}, the model needs [{n}, {expected}] (layers·2·kv_heads·head_dim)",
                table.dims()
            )));
        }
        let table = table.reshape((n, 2 * layers, kvh, d))?;
        let mut prefix = Vec::with_capacity(layers);
        for l in 0..layers {
            let pick = |i: usize| -> Result<Tensor> {
                let t = table
                    .narrow(1, i, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .unsqueeze(0)?;
                Ok(t.broadcast_as((batch, kvh, n, d))?.contiguous()?)
            };
            prefix.push((pick(2 * l)?, pick(2 * l + 1)?));
        }
        KvCache::from_prefix(prefix, c.sliding_window)
    }
}

impl PromptLearning {
    /// Prompt tuning's virtual tokens, initialised as `c.prompt_tuning_init` says (the
    /// model-dependent config fields filled in first).
    pub(crate) fn prompt_tuning(
        c: &mut PromptTuningConfig,
        model: &Model,
        rng: &mut Rng,
    ) -> Result<Self> {
        fill_prompt_defaults(&mut c.prompt, model, false)?;
        let n = c.prompt.num_virtual_tokens;
        let device = model.device();
        let table = match c.prompt_tuning_init.as_str() {
            "RANDOM" => random_tokens(&c.prompt, model, rng)?,
            "SAMPLE_VOCAB" => {
                let vocab = model.config().vocab_size;
                let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
                let ids = Tensor::new(ids.as_slice(), device)?;
                model.embed_tokens().index_select(&ids, 0)?
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
        let dtype = super::param_dtype(model.dtype());
        Ok(PromptLearning::Prompt {
            embeddings: Var::from_tensor(&table.to_dtype(dtype)?)?,
        })
    }

    /// P-tuning's embedding and prompt encoder (MLP or LSTM).
    pub(crate) fn p_tuning(
        c: &mut PromptEncoderConfig,
        model: &Model,
        rng: &mut Rng,
    ) -> Result<Self> {
        fill_prompt_defaults(&mut c.prompt, model, false)?;
        let table = random_tokens(&c.prompt, model, rng)?;
        let dim = table.dim(1)?;
        let hidden = c.encoder_hidden_size.unwrap_or(dim);
        let device = model.device();
        let dtype = super::param_dtype(model.dtype());
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

    /// Prefix tuning's per-layer key/value prefixes (through a projection when asked).
    pub(crate) fn prefix_tuning(
        c: &mut PrefixTuningConfig,
        model: &Model,
        rng: &mut Rng,
    ) -> Result<Self> {
        fill_prompt_defaults(&mut c.prompt, model, true)?;
        let n = c.prompt.num_virtual_tokens;
        let cfg = model.config();
        let dim = c
            .prompt
            .token_dim
            .unwrap_or(cfg.num_key_value_heads * cfg.head_dim);
        let layers = c.prompt.num_layers.unwrap_or(cfg.num_hidden_layers);
        let width = layers * 2 * dim;
        let device = model.device();
        let dtype = super::param_dtype(model.dtype());
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
                TrainableLinear::new(dim, hidden, dtype, rng, device)?,
                TrainableLinear::new(hidden, width, dtype, rng, device)?,
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
}

/// A virtual-token table `[n, token_dim]` drawn from N(0, 1) (PEFT's `nn.Embedding` init),
/// sized by the filled-in config.
fn random_tokens(p: &PromptLearningCommon, model: &Model, rng: &mut Rng) -> Result<Tensor> {
    let n = p.num_virtual_tokens;
    let dim = p.token_dim.unwrap_or(model.config().hidden_size);
    Ok(Tensor::from_vec(
        rng.normal(n * dim, 0.0, 1.0),
        (n, dim),
        model.device(),
    )?)
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
pub(crate) fn check_config_fits(config: &PeftConfig, model: &Model, path: &Path) -> Result<()> {
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

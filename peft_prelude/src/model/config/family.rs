//! Each family's own `config.json` keys, read into a [`Variant`]: which keys a family reads,
//! with transformers' class defaults where a key is absent. A key a family reads is taken out
//! of the config's leftovers, so that the check for unimplemented arithmetic
//! (`unsupported_arithmetic`) refuses it in every family that does not read it.

use serde_json::{Map, Value};

use super::{Architecture, ConfigProblem, HfConfigJson};
use crate::model::rope_scaling::RopeScaling;
use crate::model::variant::{Activation, AttentionBias, LayerKind, Variant};

/// What a family's keys decide besides the shapes.
pub(super) struct FamilySettings {
    pub rope_theta: f64,
    pub sliding_window: Option<usize>,
    pub variant: Variant,
}

type Leftovers = Map<String, Value>;

/// Reads `architecture`'s keys from `raw` (taking them out of `rest`).
pub(super) fn read(
    architecture: Architecture,
    raw: &HfConfigJson,
    rest: &mut Leftovers,
) -> Result<FamilySettings, ConfigProblem> {
    use Architecture::*;
    let gemma = matches!(architecture, Gemma2 | Gemma3);
    let activation = activation(raw, rest, gemma)?;
    let (rope_theta, rope_scaling, local_rope) = rope(architecture, raw, rest)?;
    let bias_on = take_bool(rest, "attention_bias")?;
    let attention_bias = match architecture {
        // Qwen 2 hard-codes a bias on q, k and v (and none on o).
        Qwen2 => AttentionBias::Qkv,
        _ if bias_on => AttentionBias::QkvO,
        _ => AttentionBias::None,
    };
    let (layer_types, sliding_window) = layers(architecture, raw, rest)?;
    let mut variant = Variant {
        attention_bias,
        qk_norm: matches!(architecture, Qwen3 | Gemma3),
        activation,
        layer_types,
        rope_scaling,
        local_rope,
        fused_projections: architecture == Phi3,
        ..Variant::default()
    };
    if gemma {
        variant.norm_unit_offset = true;
        variant.scale_embeddings = true;
        variant.sandwich_norms = true;
        // transformers' class defaults apply to absent keys; an explicit null turns them off.
        let (attn_cap, final_cap) = match architecture {
            Gemma2 => (Some(50.0), Some(30.0)),
            _ => (None, None),
        };
        variant.attn_logit_softcapping = take_f64(rest, "attn_logit_softcapping", attn_cap)?;
        variant.final_logit_softcapping = take_f64(rest, "final_logit_softcapping", final_cap)?;
        variant.query_pre_attn_scalar = take_f64(rest, "query_pre_attn_scalar", Some(256.0))?;
        for (name, value) in [
            ("attn_logit_softcapping", variant.attn_logit_softcapping),
            ("final_logit_softcapping", variant.final_logit_softcapping),
            ("query_pre_attn_scalar", variant.query_pre_attn_scalar),
        ] {
            if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(ConfigProblem::Invalid(format!(
                    "{name} must be a positive number, not {value:?}"
                )));
            }
        }
    }
    Ok(FamilySettings {
        rope_theta,
        sliding_window,
        variant,
    })
}

/// The MLP activation: `hidden_act` (Gemma: `hidden_activation`, which transformers reads
/// instead) must be what the family's block computes.
fn activation(
    raw: &HfConfigJson,
    rest: &mut Leftovers,
    gemma: bool,
) -> Result<Activation, ConfigProblem> {
    let hidden_activation = rest.remove("hidden_activation");
    let name = if gemma {
        match hidden_activation {
            Some(Value::String(s)) => Some(s),
            Some(Value::Null) | None => raw.hidden_act.clone(),
            Some(other) => {
                return Err(ConfigProblem::Invalid(format!(
                    "hidden_activation {other} (expected a string)"
                )))
            }
        }
    } else {
        if let Some(v) = hidden_activation.filter(|v| !v.is_null() && v.as_str() != Some("silu")) {
            return Err(ConfigProblem::Unsupported(format!(
                "hidden_activation {v} (expected silu)"
            )));
        }
        raw.hidden_act.clone()
    };
    match (name.as_deref(), gemma) {
        (None | Some("silu"), false) => Ok(Activation::Silu),
        (None | Some("gelu_pytorch_tanh") | Some("gelu_tanh"), true) => Ok(Activation::GeluTanh),
        (Some(other), _) => Err(ConfigProblem::Unsupported(format!(
            "hidden_act `{other}` (expected {})",
            if gemma { "gelu_pytorch_tanh" } else { "silu" }
        ))),
    }
}

/// RoPE base and scaling: transformers v5's `rope_parameters` (one object, or one per layer
/// type for Gemma 3), v4's top-level `rope_theta` with `rope_scaling`, and Gemma 3 v4's
/// `rope_local_base_freq`.
#[allow(clippy::type_complexity)]
fn rope(
    architecture: Architecture,
    raw: &HfConfigJson,
    rest: &mut Leftovers,
) -> Result<(f64, RopeScaling, Option<(f64, RopeScaling)>), ConfigProblem> {
    let max_pos = raw.max_position_embeddings;
    let local_base = rest.remove("rope_local_base_freq");
    // Phi-3's top-level `original_max_position_embeddings` wins over the RoPE object's.
    let original_max = rest.remove("original_max_position_embeddings");
    let parse = |field: &str, v: &Value| -> Result<(Option<f64>, RopeScaling), ConfigProblem> {
        let mut v = v.clone();
        if let (Some(max), Some(map)) = (&original_max, v.as_object_mut()) {
            if architecture == Architecture::Phi3 && !max.is_null() {
                map.insert("original_max_position_embeddings".into(), max.clone());
            }
        }
        let v = &v;
        if let Some(map) = v.as_object() {
            for key in ["partial_rotary_factor", "mrope_section"] {
                match map.get(key) {
                    None | Some(Value::Null) => {}
                    Some(v) if key == "partial_rotary_factor" && v.as_f64() == Some(1.0) => {}
                    Some(v) => {
                        return Err(ConfigProblem::Unsupported(format!(
                            "{field}.{key} {v} (not implemented)"
                        )))
                    }
                }
            }
        }
        let theta = v.get("rope_theta").and_then(Value::as_f64);
        let scaling =
            RopeScaling::from_json(field, v, max_pos).map_err(ConfigProblem::Unsupported)?;
        Ok((theta, scaling))
    };
    let per_layer_type = raw
        .rope_parameters
        .as_ref()
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let (theta, scaling, local) = if let Some(p) = per_layer_type {
        let (theta, scaling) = match p.get("full_attention") {
            Some(full) => parse("rope_parameters.full_attention", full)?,
            None => (None, RopeScaling::Default),
        };
        let local = p
            .get("sliding_attention")
            .map(|s| parse("rope_parameters.sliding_attention", s))
            .transpose()?;
        (theta, scaling, local)
    } else {
        let mut theta = None;
        let mut scaling = RopeScaling::Default;
        for (field, value) in [
            ("rope_parameters", &raw.rope_parameters),
            ("rope_scaling", &raw.rope_scaling),
        ] {
            if let Some(v) = value.as_ref().filter(|v| !v.is_null()) {
                let (t, s) = parse(field, v)?;
                theta = theta.or(t);
                if s != RopeScaling::Default {
                    scaling = s;
                }
            }
        }
        (theta, scaling, None)
    };
    // transformers 5 reads the RoPE object first; a top-level `rope_theta` is the v4 spelling.
    let theta = theta.or(raw.rope_theta).unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ConfigProblem::Invalid(format!(
            "rope_theta must be a positive number, not {theta}"
        )));
    }
    let local = match architecture {
        Architecture::Gemma3 => {
            let (local_theta, local_scaling) = local.unwrap_or((None, RopeScaling::Default));
            let base = local_theta
                .or_else(|| local_base.as_ref().and_then(Value::as_f64))
                .unwrap_or(10_000.0);
            Some((base, local_scaling))
        }
        _ => None,
    };
    Ok((theta, scaling, local))
}

/// Which layers slide, and the window. transformers v5 writes `layer_types`; older configs
/// imply them: Mistral slides everywhere when it has a window, Qwen from `max_window_layers`
/// on when `use_sliding_window`, Gemma 2 every other layer, Gemma 3 all but every sixth.
fn layers(
    architecture: Architecture,
    raw: &HfConfigJson,
    rest: &mut Leftovers,
) -> Result<(Vec<LayerKind>, Option<usize>), ConfigProblem> {
    use Architecture::*;
    let n = raw.num_hidden_layers;
    let use_sliding = take_bool_or(rest, "use_sliding_window", true)?;
    let max_window_layers = rest.remove("max_window_layers");
    let pattern = rest.remove("sliding_window_pattern");
    let window = match architecture {
        Qwen2 | Qwen3 if !use_sliding => None,
        _ => raw.sliding_window,
    };
    let explicit = match rest.remove("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let kinds = items
                .iter()
                .map(|v| match v.as_str() {
                    Some("full_attention") => Ok(LayerKind::Full),
                    Some("sliding_attention") => Ok(LayerKind::Sliding),
                    _ => Err(ConfigProblem::Unsupported(format!(
                        "layer_types entry {v} (supported: full_attention, sliding_attention)"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if kinds.len() != n {
                return Err(ConfigProblem::Invalid(format!(
                    "layer_types has {} entries for {n} layers",
                    kinds.len()
                )));
            }
            Some(kinds)
        }
        Some(other) => {
            return Err(ConfigProblem::Invalid(format!(
                "layer_types {other} (expected a list)"
            )))
        }
    };
    let kinds = match explicit {
        Some(kinds) => kinds,
        None => match architecture {
            Mistral | Llama | Phi3 => vec![],
            Qwen2 | Qwen3 => {
                let from = max_window_layers.and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                (0..n)
                    .map(|i| match window.is_some() && i >= from {
                        true => LayerKind::Sliding,
                        false => LayerKind::Full,
                    })
                    .collect()
            }
            Gemma2 => (0..n)
                .map(|i| match (i + 1) % 2 {
                    0 => LayerKind::Full,
                    _ => LayerKind::Sliding,
                })
                .collect(),
            Gemma3 => {
                let every = pattern.and_then(|v| v.as_u64()).unwrap_or(6).max(1) as usize;
                (0..n)
                    .map(|i| match (i + 1) % every {
                        0 => LayerKind::Full,
                        _ => LayerKind::Sliding,
                    })
                    .collect()
            }
        },
    };
    let slides = kinds.contains(&LayerKind::Sliding) || (kinds.is_empty() && window.is_some());
    if slides && window.is_none() {
        return Err(ConfigProblem::Invalid(
            "layer_types has sliding_attention layers but sliding_window is not set".into(),
        ));
    }
    // A window only matters where a layer slides.
    let window = window.filter(|_| slides);
    // Every layer alike: the uniform form (Mistral's), which lets the KV cache drop old keys.
    let kinds = if kinds.iter().all(|k| *k == LayerKind::Sliding) || !slides {
        vec![]
    } else {
        kinds
    };
    Ok((kinds, window))
}

fn take_bool(rest: &mut Leftovers, key: &str) -> Result<bool, ConfigProblem> {
    take_bool_or(rest, key, false)
}

fn take_bool_or(rest: &mut Leftovers, key: &str, default: bool) -> Result<bool, ConfigProblem> {
    match rest.remove(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => Err(ConfigProblem::Invalid(format!(
            "{key} {other} (expected true or false)"
        ))),
    }
}

/// A number that may be absent (the class default), null (off) or a number.
fn take_f64(
    rest: &mut Leftovers,
    key: &str,
    default: Option<f64>,
) -> Result<Option<f64>, ConfigProblem> {
    match rest.remove(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ConfigProblem::Invalid(format!(
            "{key} {other} (expected a number or null)"
        ))),
    }
}

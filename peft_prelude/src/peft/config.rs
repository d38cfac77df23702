//! Adapter configurations with Hugging Face PEFT's field names and defaults, read from and
//! written to PEFT's `adapter_config.json` (sorted keys; unknown keys ignored on read).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{read_json, Error, Result};

/// Which modules a method applies to: exact names or suffixes, a regex (full match), or
/// `"all-linear"` (every projection except the output head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    /// A regular expression matched against the whole module path, or `"all-linear"`.
    Pattern(String),
}

impl TargetModules {
    pub fn names<S: AsRef<str>>(names: &[S]) -> Self {
        TargetModules::Names(names.iter().map(|s| s.as_ref().to_string()).collect())
    }

    pub fn all_linear() -> Self {
        TargetModules::Pattern("all-linear".into())
    }
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (both random), `"gaussian"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraInit {
    Bool(bool),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    One(usize),
    Many(Vec<usize>),
}

impl LayerIndices {
    pub fn contains(&self, i: usize) -> bool {
        match self {
            LayerIndices::One(x) => *x == i,
            LayerIndices::Many(v) => v.contains(&i),
        }
    }
}

/// Fields every PEFT config carries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonConfig {
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
}

fn default_task_type() -> String {
    "CAUSAL_LM".into()
}

/// `LoraConfig` (rsLoRA and DoRA are flags, as in PEFT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// `None`: the architecture's default (`q_proj`, `v_proj` for Mistral and Llama).
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    /// "none" | "all" | "lora_only" (Mistral/Llama projections have no bias, so only "none"
    /// changes nothing; the others are accepted and have nothing to train).
    pub bias: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init_lora_weights: LoraInit,
    pub layers_to_transform: Option<LayerIndices>,
    pub layers_pattern: Option<Value>,
    /// regex → rank for matching modules
    pub rank_pattern: BTreeMap<String, usize>,
    /// regex → alpha for matching modules
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Whole modules trained and saved as well, e.g. `lm_head`, `embed_tokens`.
    pub modules_to_save: Option<Vec<String>>,
    pub fan_in_fan_out: bool,
    #[serde(default = "default_task_type")]
    pub task_type: String,
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            fan_in_fan_out: false,
            task_type: default_task_type(),
            common: CommonConfig::default(),
        }
    }
}

impl LoraConfig {
    /// The Unsloth/Colab setting: rank `r`, alpha, every projection of every decoder layer
    /// (q, k, v, o, gate, up, down; Phi-3's fused qkv and gate_up): PEFT's `all-linear`, which
    /// leaves out the output head, so the same line serves every model family.
    pub fn all_projections(r: usize, lora_alpha: f64) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::all_linear()),
            ..Default::default()
        }
    }
}

/// `IA3Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    /// `None`: `k_proj`, `v_proj`, `down_proj`.
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    /// Targets whose *input* is scaled (`None`: `down_proj`); the others scale their output.
    pub feedforward_modules: Option<TargetModules>,
    pub init_ia3_weights: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub fan_in_fan_out: bool,
    #[serde(default = "default_task_type")]
    pub task_type: String,
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config {
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            init_ia3_weights: true,
            modules_to_save: None,
            fan_in_fan_out: false,
            task_type: default_task_type(),
            common: CommonConfig::default(),
        }
    }
}

/// Fields of PEFT's `PromptLearningConfig`; the model-dependent ones are filled in by
/// `get_peft_model` when left `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptLearningCommon {
    pub num_virtual_tokens: usize,
    pub token_dim: Option<usize>,
    pub num_transformer_submodules: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_task_type")]
    pub task_type: String,
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Default for PromptLearningCommon {
    fn default() -> Self {
        PromptLearningCommon {
            num_virtual_tokens: 8,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            modules_to_save: None,
            task_type: default_task_type(),
            common: CommonConfig::default(),
        }
    }
}

/// `PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptTuningConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningCommon,
    /// "RANDOM" | "SAMPLE_VOCAB" | "TEXT"
    pub prompt_tuning_init: String,
    pub prompt_tuning_init_text: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        PromptTuningConfig {
            prompt: PromptLearningCommon::default(),
            prompt_tuning_init: "RANDOM".into(),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
        }
    }
}

/// `PromptEncoderConfig` (P-tuning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptEncoderConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningCommon,
    /// "MLP" | "LSTM"
    pub encoder_reparameterization_type: String,
    /// `None`: token_dim
    pub encoder_hidden_size: Option<usize>,
    pub encoder_num_layers: usize,
    pub encoder_dropout: f64,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        PromptEncoderConfig {
            prompt: PromptLearningCommon::default(),
            encoder_reparameterization_type: "MLP".into(),
            encoder_hidden_size: None,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
        }
    }
}

/// `PrefixTuningConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixTuningConfig {
    #[serde(flatten)]
    pub prompt: PromptLearningCommon,
    pub prefix_projection: bool,
    /// Width of the projection MLP's hidden layer (`None`: token_dim).
    pub encoder_hidden_size: Option<usize>,
    /// `None` or "zero".
    pub init_weights: Option<String>,
}

/// Bottleneck adapters (Houlsby, Pfeiffer, parallel), named as AdapterHub's `BnConfig`.
/// Python PEFT has no such method; saved with our own `peft_type` "BOTTLENECK".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BottleneckConfig {
    /// An adapter after the attention block (Houlsby has one, Pfeiffer does not).
    pub mh_adapter: bool,
    /// An adapter after the MLP block.
    pub output_adapter: bool,
    /// hidden_size / reduction_factor = bottleneck width.
    pub reduction_factor: usize,
    /// "relu" | "swish" (= silu) | "gelu" | "tanh"
    pub non_linearity: String,
    /// Parallel to the block (He et al.) instead of after it.
    pub is_parallel: bool,
    pub scaling: f64,
    /// "bert" (N(0, 0.01²) down and up, so near identity) | "mam_adapter" (Kaiming down, zero up)
    pub init_weights: String,
    pub leave_out: Vec<usize>,
    #[serde(default = "default_task_type")]
    pub task_type: String,
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Default for BottleneckConfig {
    /// AdapterHub's `SeqBnConfig` (Pfeiffer).
    fn default() -> Self {
        Self::pfeiffer()
    }
}

impl BottleneckConfig {
    /// `SeqBnConfig`: after the MLP only, relu, reduction 16.
    pub fn pfeiffer() -> Self {
        BottleneckConfig {
            mh_adapter: false,
            output_adapter: true,
            reduction_factor: 16,
            non_linearity: "relu".into(),
            is_parallel: false,
            scaling: 1.0,
            init_weights: "bert".into(),
            leave_out: vec![],
            task_type: default_task_type(),
            common: CommonConfig::default(),
        }
    }

    /// `DoubleSeqBnConfig`: after attention and after the MLP, swish, reduction 16.
    pub fn houlsby() -> Self {
        BottleneckConfig {
            mh_adapter: true,
            non_linearity: "swish".into(),
            ..Self::pfeiffer()
        }
    }

    /// `ParBnConfig`: parallel to the MLP, relu, reduction 2, scaling 4, mam init.
    pub fn parallel() -> Self {
        BottleneckConfig {
            reduction_factor: 2,
            is_parallel: true,
            scaling: 4.0,
            init_weights: "mam_adapter".into(),
            ..Self::pfeiffer()
        }
    }
}

/// One adapter's configuration, tagged by PEFT's `peft_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    PromptTuning(PromptTuningConfig),
    PTuning(PromptEncoderConfig),
    PrefixTuning(PrefixTuningConfig),
    Bottleneck(BottleneckConfig),
}

impl From<LoraConfig> for PeftConfig {
    fn from(c: LoraConfig) -> Self {
        PeftConfig::Lora(c)
    }
}
impl From<Ia3Config> for PeftConfig {
    fn from(c: Ia3Config) -> Self {
        PeftConfig::Ia3(c)
    }
}
impl From<PromptTuningConfig> for PeftConfig {
    fn from(c: PromptTuningConfig) -> Self {
        PeftConfig::PromptTuning(c)
    }
}
impl From<PromptEncoderConfig> for PeftConfig {
    fn from(c: PromptEncoderConfig) -> Self {
        PeftConfig::PTuning(c)
    }
}
impl From<PrefixTuningConfig> for PeftConfig {
    fn from(c: PrefixTuningConfig) -> Self {
        PeftConfig::PrefixTuning(c)
    }
}
impl From<BottleneckConfig> for PeftConfig {
    fn from(c: BottleneckConfig) -> Self {
        PeftConfig::Bottleneck(c)
    }
}

/// PEFT's `peft_type` strings.
pub const PEFT_TYPES: [&str; 6] = [
    "LORA",
    "IA3",
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "BOTTLENECK",
];

impl PeftConfig {
    pub fn peft_type(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "LORA",
            PeftConfig::Ia3(_) => "IA3",
            PeftConfig::PromptTuning(_) => "PROMPT_TUNING",
            PeftConfig::PTuning(_) => "P_TUNING",
            PeftConfig::PrefixTuning(_) => "PREFIX_TUNING",
            PeftConfig::Bottleneck(_) => "BOTTLENECK",
        }
    }

    pub fn is_prompt_learning(&self) -> bool {
        matches!(
            self,
            PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_)
        )
    }

    pub fn common_mut(&mut self) -> &mut CommonConfig {
        match self {
            PeftConfig::Lora(c) => &mut c.common,
            PeftConfig::Ia3(c) => &mut c.common,
            PeftConfig::PromptTuning(c) => &mut c.prompt.common,
            PeftConfig::PTuning(c) => &mut c.prompt.common,
            PeftConfig::PrefixTuning(c) => &mut c.prompt.common,
            PeftConfig::Bottleneck(c) => &mut c.common,
        }
    }

    /// The JSON PEFT writes: the fields above plus the constant keys PEFT always has, sorted.
    pub fn to_json(&self) -> Value {
        let mut v = match self {
            PeftConfig::Lora(c) => {
                let mut v = to_map(c);
                v.insert("lora_alpha".into(), number(c.lora_alpha));
                for (k, d) in [
                    ("auto_mapping", Value::Null),
                    ("layer_replication", Value::Null),
                    ("loftq_config", json!({})),
                    ("megatron_config", Value::Null),
                    ("megatron_core", json!("megatron.core")),
                    ("lora_bias", json!(false)),
                ] {
                    v.entry(k).or_insert(d);
                }
                let alphas: Map<String, Value> = c
                    .alpha_pattern
                    .iter()
                    .map(|(k, a)| (k.clone(), number(*a)))
                    .collect();
                v.insert("alpha_pattern".into(), Value::Object(alphas));
                v
            }
            PeftConfig::Ia3(c) => {
                let mut v = to_map(c);
                v.insert("auto_mapping".into(), Value::Null);
                v
            }
            PeftConfig::PromptTuning(c) => with_auto_mapping(to_map(c)),
            PeftConfig::PTuning(c) => with_auto_mapping(to_map(c)),
            PeftConfig::PrefixTuning(c) => with_auto_mapping(to_map(c)),
            PeftConfig::Bottleneck(c) => to_map(c),
        };
        v.insert("peft_type".into(), json!(self.peft_type()));
        // serde_json's Map is a BTreeMap here: keys come out sorted, as PEFT writes them.
        Value::Object(v)
    }

    /// Parses an adapter_config.json text. Unknown keys are ignored; an unknown `peft_type`
    /// is an error that lists the supported ones.
    pub fn from_json(value: &Value) -> std::result::Result<Self, String> {
        // PEFT writes `null` for a field left unset (`"task_type": null` when get_peft_model was
        // given no task type): the same as the field's default, which an absent key gives.
        let value = &match value {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        };
        let ty = value
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or("no `peft_type`")?;
        let parse = |what: &str| -> String { format!("invalid {what} config") };
        let cfg = match ty {
            "LORA" => {
                reject_unsupported_lora_features(value)?;
                PeftConfig::Lora(
                    serde_json::from_value(value.clone())
                        .map_err(|e| format!("{}: {e}", parse("LoRA")))?,
                )
            }
            "IA3" => PeftConfig::Ia3(
                serde_json::from_value(value.clone())
                    .map_err(|e| format!("{}: {e}", parse("IA3")))?,
            ),
            "PROMPT_TUNING" => PeftConfig::PromptTuning(
                serde_json::from_value(value.clone())
                    .map_err(|e| format!("{}: {e}", parse("prompt tuning")))?,
            ),
            "P_TUNING" => PeftConfig::PTuning(
                serde_json::from_value(value.clone())
                    .map_err(|e| format!("{}: {e}", parse("P-tuning")))?,
            ),
            "PREFIX_TUNING" => PeftConfig::PrefixTuning(
                serde_json::from_value(value.clone())
                    .map_err(|e| format!("{}: {e}", parse("prefix tuning")))?,
            ),
            "BOTTLENECK" => PeftConfig::Bottleneck(
                serde_json::from_value(value.clone())
                    .map_err(|e| format!("{}: {e}", parse("bottleneck")))?,
            ),
            other => {
                return Err(format!(
                    "unsupported peft_type `{other}` (supported: {})",
                    PEFT_TYPES.join(", ")
                ))
            }
        };
        Ok(cfg)
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value: Value = read_json(path)?;
        let config = Self::from_json(&value).map_err(|what| Error::corrupt(path, what))?;
        config
            .check_limits()
            .map_err(|what| Error::corrupt(path, what))?;
        Ok(config)
    }

    /// Every size a configuration asks for, against stated limits far above any real adapter
    /// (ranks of 2^16, 2^16 virtual tokens): a file asking for more is corrupt or hostile, and
    /// is refused before anything sized by it is allocated or multiplied.
    pub fn check_limits(&self) -> std::result::Result<(), String> {
        const RANK: usize = 1 << 16;
        const WIDTH: usize = 1 << 17;
        let at_most = |name: &str, v: usize, limit: usize| {
            if v > limit {
                Err(format!("{name} is {v}, above the limit of {limit}"))
            } else {
                Ok(())
            }
        };
        let positive_width = |name: &str, v: Option<usize>| match v {
            Some(0) => Err(format!("{name} must be positive")),
            Some(v) => at_most(name, v, WIDTH),
            None => Ok(()),
        };
        // Scales (alpha / r, a bottleneck's scaling) beyond 10^6 overflow a forward pass.
        let finite = |name: &str, v: f64| {
            if v.is_finite() && v.abs() <= 1e6 {
                Ok(())
            } else {
                Err(format!("{name} must be a number within ±10^6, got {v}"))
            }
        };
        let prompt = |p: &PromptLearningCommon| -> std::result::Result<(), String> {
            at_most("num_virtual_tokens", p.num_virtual_tokens, RANK)?;
            positive_width("token_dim", p.token_dim)?;
            at_most(
                "num_transformer_submodules",
                p.num_transformer_submodules.unwrap_or(1),
                2,
            )?;
            at_most(
                "num_attention_heads",
                p.num_attention_heads.unwrap_or(1),
                1 << 12,
            )?;
            at_most("num_layers", p.num_layers.unwrap_or(1), 1 << 12)
        };
        match self {
            PeftConfig::Lora(c) => {
                at_most("r", c.r, RANK)?;
                for (k, v) in &c.rank_pattern {
                    at_most(&format!("rank_pattern[{k}]"), *v, RANK)?;
                }
                finite("lora_alpha", c.lora_alpha)?;
                for (k, v) in &c.alpha_pattern {
                    finite(&format!("alpha_pattern[{k}]"), *v)?;
                }
                Ok(())
            }
            PeftConfig::Ia3(_) => Ok(()),
            PeftConfig::PromptTuning(c) => prompt(&c.prompt),
            PeftConfig::PTuning(c) => {
                prompt(&c.prompt)?;
                positive_width("encoder_hidden_size", c.encoder_hidden_size)?;
                at_most("encoder_num_layers", c.encoder_num_layers, 64)
            }
            PeftConfig::PrefixTuning(c) => {
                prompt(&c.prompt)?;
                positive_width("encoder_hidden_size", c.encoder_hidden_size)
            }
            PeftConfig::Bottleneck(c) => {
                if c.reduction_factor == 0 {
                    return Err("reduction_factor must be positive".into());
                }
                at_most("reduction_factor", c.reduction_factor, WIDTH)?;
                finite("scaling", c.scaling)
            }
        }
    }
}

/// LoRA variants PEFT can save that this crate does not implement. Loading one as plain LoRA
/// would give silently wrong outputs, so a key set to anything but its off value (after nulls
/// are dropped) is an error that names it.
const UNSUPPORTED_LORA_FEATURES: [(&str, &str); 7] = [
    ("lora_bias", "a trained bias on B"),
    ("use_qalora", "QA-LoRA's pooled adapters"),
    ("layer_replication", "replicated layers"),
    ("target_parameters", "LoRA on bare parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
];

fn reject_unsupported_lora_features(value: &Value) -> std::result::Result<(), String> {
    for (key, what) in UNSUPPORTED_LORA_FEATURES {
        let off = match value.get(key) {
            None | Some(Value::Bool(false)) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if !off {
            return Err(format!(
                "`{key}` is set ({what}), which this LoRA implementation does not support"
            ));
        }
    }
    Ok(())
}

fn to_map<T: Serialize>(c: &T) -> Map<String, Value> {
    match serde_json::to_value(c) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn with_auto_mapping(mut m: Map<String, Value>) -> Map<String, Value> {
    m.insert("auto_mapping".into(), Value::Null);
    m
}

/// Writes whole numbers as JSON integers (PEFT writes `"lora_alpha": 16`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_json_round_trip_with_peft_key_names() {
        let mut c = LoraConfig::all_projections(16, 16.0);
        c.use_rslora = true;
        let cfg = PeftConfig::Lora(c.clone());
        let v = cfg.to_json();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["lora_alpha"], json!(16));
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["init_lora_weights"], json!(true));
        let text = serde_json::to_string(&v).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "sorted keys: {text}");
        assert_eq!(PeftConfig::from_json(&v).unwrap(), cfg);
    }

    /// What PEFT 0.21.2 saves for `get_peft_model(model, LoraConfig(...))` without a task type:
    /// `null` for every unset field, `task_type` among them.
    const PEFT_SAVED_WITHOUT_TASK_TYPE: &str =
        include_str!("testdata/peft-0.21.2-lora-no-task-type.json");

    #[test]
    fn pefts_nulls_read_as_defaults() {
        let v: Value = serde_json::from_str(PEFT_SAVED_WITHOUT_TASK_TYPE).unwrap();
        assert!(v["task_type"].is_null() && v["layers_to_transform"].is_null());
        match PeftConfig::from_json(&v).unwrap() {
            PeftConfig::Lora(c) => {
                assert_eq!((c.r, c.lora_alpha), (8, 16.0));
                assert_eq!(c.task_type, "CAUSAL_LM");
                assert_eq!(c.layers_to_transform, None);
                assert_eq!(c.init_lora_weights, LoraInit::Bool(false));
                match c.target_modules {
                    Some(TargetModules::Names(n)) => assert_eq!(n.len(), 7),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lora_variants_we_do_not_implement_are_refused_by_name() {
        let base: Value = serde_json::from_str(PEFT_SAVED_WITHOUT_TASK_TYPE).unwrap();
        for (key, on) in [
            ("lora_bias", json!(true)),
            ("use_qalora", json!(true)),
            ("layer_replication", json!([[0, 4], [2, 6]])),
            ("target_parameters", json!(["mlp.experts.gate_up_proj"])),
            ("trainable_token_indices", json!([0, 1])),
            ("alora_invocation_tokens", json!([1, 2])),
            ("arrow_config", json!({"top_k": 3})),
        ] {
            let mut v = base.clone();
            v[key] = on;
            let e = PeftConfig::from_json(&v).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        // Their off values (false, [], {}, null) are plain LoRA.
        let mut v = base.clone();
        v["target_parameters"] = json!([]);
        v["loftq_config"] = json!({});
        assert!(PeftConfig::from_json(&v).is_ok());
    }

    #[test]
    fn unknown_keys_are_ignored_and_unknown_types_refused() {
        let v = json!({"peft_type": "LORA", "r": 4, "some_future_key": {"x": 1}, "target_modules": "all-linear"});
        match PeftConfig::from_json(&v).unwrap() {
            PeftConfig::Lora(c) => {
                assert_eq!(c.r, 4);
                assert_eq!(c.target_modules, Some(TargetModules::all_linear()));
            }
            other => panic!("{other:?}"),
        }
        let err = PeftConfig::from_json(&json!({"peft_type": "VERA"})).unwrap_err();
        assert!(err.contains("VERA") && err.contains("LORA"), "{err}");
    }
}

//! Which module paths a method applies to, with PEFT's matching rules.

use regex::Regex;

use super::config::{LayerIndices, TargetModules};
use crate::error::{Error, Result};
use crate::model::Architecture;

/// A compiled `target_modules` / `exclude_modules` rule.
#[derive(Debug)]
pub enum Matcher {
    /// A path matches if it equals a name or ends with `.name`.
    Names(Vec<String>),
    /// Full match of the whole path.
    Regex(Regex),
    /// Every linear layer except the output head.
    AllLinear,
}

impl Matcher {
    pub fn new(t: &TargetModules) -> Result<Self> {
        Ok(match t {
            TargetModules::Names(names) => Matcher::Names(names.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            TargetModules::Pattern(p) => Matcher::Regex(
                Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::Config(format!("target_modules regex `{p}`: {e}")))?,
            ),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Matcher::Regex(r) => r.is_match(path),
            Matcher::AllLinear => path != "lm_head",
        }
    }
}

/// PEFT's default target modules of a method for a model family (its
/// `TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`), used when a config names none. Phi-3
/// has no entry there (its projections are fused): PEFT asks for `target_modules`, so do we.
pub fn default_targets(method: DefaultFor, architecture: Architecture) -> Result<TargetModules> {
    use Architecture::*;
    let names: &[&str] = match (method, architecture) {
        (_, Phi3) => {
            return Err(Error::Config(format!(
                "{method:?} has no default target_modules for {} (PEFT has none either): name \
                 them, e.g. [\"qkv_proj\", \"o_proj\", \"gate_up_proj\", \"down_proj\"] or \
                 \"all-linear\"",
                architecture.model_type()
            )))
        }
        (DefaultFor::Lora, _) => &["q_proj", "v_proj"],
        (DefaultFor::Ia3, Mistral | Llama) => &["k_proj", "v_proj", "down_proj"],
        (DefaultFor::Ia3, Qwen2 | Qwen3 | Gemma2 | Gemma3) => &["q_proj", "v_proj", "down_proj"],
        (DefaultFor::Ia3Feedforward, _) => &["down_proj"],
    };
    Ok(TargetModules::names(names))
}

/// Which default [`default_targets`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultFor {
    Lora,
    Ia3,
    /// IA³'s `feedforward_modules`.
    Ia3Feedforward,
}

/// The layer index in `model.layers.{i}.…`, if any.
pub fn layer_index(path: &str) -> Option<usize> {
    path.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Selects the paths among `candidates` that a method targets. Fails when nothing matches
/// (naming the closest candidates) or when a listed name matches no module at all.
pub fn select(
    candidates: &[String],
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
    layers: Option<&LayerIndices>,
    suggest: &dyn Fn(&str) -> Error,
) -> Result<Vec<String>> {
    let target = Matcher::new(targets)?;
    let exclude = exclude.map(Matcher::new).transpose()?;
    if let TargetModules::Names(names) = targets {
        for n in names {
            let single = Matcher::Names(vec![n.clone()]);
            if !candidates.iter().any(|c| single.matches(c)) {
                return Err(suggest(n));
            }
        }
    }
    let selected: Vec<String> = candidates
        .iter()
        .filter(|p| target.matches(p))
        .filter(|p| !exclude.as_ref().is_some_and(|e| e.matches(p)))
        .filter(|p| layers.is_none_or(|l| layer_index(p).is_some_and(|i| l.contains(i))))
        .cloned()
        .collect();
    if selected.is_empty() {
        return Err(Error::Config(format!(
            "target_modules {targets:?} matches none of the model's modules (e.g. {})",
            candidates
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(selected)
}

/// PEFT's rank_pattern / alpha_pattern lookup: the first pattern (in key order) that matches
/// the end of the path at a module boundary.
pub fn pattern_value<T: Copy>(
    patterns: &std::collections::BTreeMap<String, T>,
    path: &str,
) -> Result<Option<T>> {
    for (pattern, value) in patterns {
        let re = Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$"))
            .map_err(|e| Error::Config(format!("pattern `{pattern}`: {e}")))?;
        if re.is_match(path) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<String> {
        let mut v = vec![];
        for i in 0..3 {
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                v.push(format!("model.layers.{i}.self_attn.{n}"));
            }
            for n in ["gate_proj", "up_proj", "down_proj"] {
                v.push(format!("model.layers.{i}.mlp.{n}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    fn no_suggest(n: &str) -> Error {
        Error::Config(format!("unknown {n}"))
    }

    #[test]
    fn names_regex_all_linear_exclude_and_layers() {
        let p = paths();
        let s = select(
            &p,
            &TargetModules::names(&["q_proj", "v_proj"]),
            None,
            None,
            &no_suggest,
        )
        .unwrap();
        assert_eq!(s.len(), 6);
        let s = select(&p, &TargetModules::all_linear(), None, None, &no_suggest).unwrap();
        assert_eq!(s.len(), 21);
        let s = select(
            &p,
            &TargetModules::Pattern(r".*\.(q|k)_proj".into()),
            Some(&TargetModules::names(&["model.layers.0.self_attn.k_proj"])),
            Some(&LayerIndices::Many(vec![0, 2])),
            &no_suggest,
        )
        .unwrap();
        assert_eq!(
            s,
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.self_attn.k_proj"
            ]
        );
        let err = select(
            &p,
            &TargetModules::names(&["qkv_proj"]),
            None,
            None,
            &no_suggest,
        )
        .unwrap_err();
        assert!(err.to_string().contains("qkv_proj"));
    }

    #[test]
    fn rank_pattern_matches_suffixes_at_module_boundaries() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("q_proj".to_string(), 16usize);
        m.insert(r"layers\.2\.mlp\.down_proj".to_string(), 2);
        assert_eq!(
            pattern_value(&m, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(16)
        );
        assert_eq!(
            pattern_value(&m, "model.layers.2.mlp.down_proj").unwrap(),
            Some(2)
        );
        assert_eq!(
            pattern_value(&m, "model.layers.1.mlp.down_proj").unwrap(),
            None
        );
        assert_eq!(
            pattern_value(&m, "model.layers.0.self_attn.xq_proj").unwrap(),
            None
        );
    }
}

//! RoPE frequency scaling, as Hugging Face transformers (5.24) computes it for the rope types
//! `default`, `linear`, `dynamic`, `yarn`, `llama3` and `longrope`.
//!
//! The formulas follow `transformers/modeling_rope_utils.py` step by step. transformers builds
//! `inv_freq` as a float32 tensor, and some of its float32 roundings are amplified: the exponent
//! `2i/dim` is rounded before `θ^x` (its error is multiplied by ln θ), and the yarn and llama3
//! blends mix frequencies that differ by the scaling factor. Exact f64 math lands up to 4 float32
//! ulps (3.8e-7 relative) from transformers on the test fixture, more for larger θ, and since
//! `pos · inv_freq` is an angle, a relative error r is an angle error of r·pos·inv_freq at large
//! positions. So the math is done in f64 but each value transformers holds in float32 is rounded
//! to f32 (`f32r`) at the same step; that reproduces transformers' buffer bit for bit except
//! where torch's float32 `pow` is itself one ulp off.

use serde_json::{Map, Value};
use std::f64::consts::PI;

/// The rope types [`RopeScaling::from_json`] accepts, for error messages.
const SUPPORTED: &str = "default, linear, dynamic, yarn, llama3, longrope";

/// How RoPE frequencies are scaled, as read from `rope_parameters` (transformers v5) or
/// `rope_scaling` (v4).
///
/// Values that transformers derives from other config fields (a missing
/// `original_max_position_embeddings`, yarn's and longrope's default attention factor, a null
/// yarn `factor`) are resolved by [`RopeScaling::from_json`], so each variant holds exactly what
/// [`RopeScaling::inv_freq`] needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// `inv_freq[i] = 1 / θ^(2i/dim)`.
    #[default]
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: θ grows with the sequence length once it exceeds `original_max_positions`.
    Dynamic {
        factor: f64,
        /// The config's `max_position_embeddings`: transformers' dynamic NTK uses that (not
        /// `original_max_position_embeddings`) as the length up to which θ is unchanged.
        original_max_positions: usize,
    },
    /// YaRN: a per-frequency blend of interpolated (`/ factor`) and unscaled frequencies, with a
    /// linear ramp between the dims that rotate `beta_fast` and `beta_slow` times over
    /// `original_max_positions`, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_positions: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Round the ramp's bounds outward to whole dims (floor/ceil).
        truncate: bool,
        attention_factor: f64,
    },
    /// Llama 3.1: frequencies whose wavelength exceeds `original_max_positions / low_freq_factor`
    /// are divided by `factor`, those with wavelengths below `original_max_positions /
    /// high_freq_factor` are kept, and the ones in between are interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: usize,
    },
    /// LongRoPE (Phi-3): per-frequency divisors, `short_factor` while the sequence fits in
    /// `original_max_positions` and `long_factor` beyond, with cos/sin scaled by
    /// `attention_factor` in both cases.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_positions: usize,
        attention_factor: f64,
    },
    /// Per-frequency divisors as GGUF stores Llama 3's scaling (llama.cpp's `rope_freqs`
    /// tensor, computed by its converter from the `llama3` parameters): frequency `i` is
    /// divided by `factors[i]`.
    Factors { factors: Vec<f64> },
}

impl RopeScaling {
    /// Parses the rope object (`{"rope_type": "llama3", "factor": 8.0, ...}`, also the v4 key
    /// `type`; `rope_type` wins when both are present, and neither means `default`). A JSON `null`
    /// (a v4 `"rope_scaling": null`) is [`RopeScaling::Default`].
    ///
    /// `field` is the config key it came from ("rope_parameters" / "rope_scaling"), for messages;
    /// `max_position_embeddings` is the config's value, used where transformers falls back to it:
    /// dynamic's threshold, a missing `original_max_position_embeddings` (yarn, llama3, longrope),
    /// and a missing or null `factor` (longrope; for yarn only a null one) taken as
    /// `max_position_embeddings / original_max_position_embeddings`.
    ///
    /// Not handled here: Phi-3 configs keep `original_max_position_embeddings` at the top level of
    /// the config, and transformers then lets it override the rope object's; a caller loading such
    /// a config should copy it into the object first. Model-specific renames (Phi-3's `su`,
    /// Qwen2-VL's `mrope`) are also the caller's business.
    ///
    /// Keys that are not about scaling (`rope_theta`, `partial_rotary_factor`) and unknown keys
    /// are ignored. Errors name the field: an unknown rope type (with the supported list), a
    /// missing or mistyped required key, a factor that is not finite and > 0.
    pub fn from_json(
        field: &str,
        value: &Value,
        max_position_embeddings: usize,
    ) -> Result<Self, String> {
        let map = match value {
            Value::Null => return Ok(RopeScaling::Default),
            Value::Object(map) => map,
            other => return Err(format!("{field}: expected an object, got {other}")),
        };
        // transformers: `rope_parameters.get("rope_type", rope_parameters.get("type", "default"))`.
        let named = ["rope_type", "type"]
            .into_iter()
            .find_map(|key| Some((key, map.get(key).filter(|v| !v.is_null())?)));
        let rope_type = match named {
            None => "default",
            Some((_, Value::String(t))) => t.as_str(),
            Some((key, other)) => {
                return Err(format!("{field}.{key}: expected a string, got {other}"))
            }
        };
        let p = Params {
            field,
            rope_type,
            map,
        };
        let max_positions = max_position_embeddings;

        Ok(match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: p.required_positive("factor")?,
            },
            "dynamic" => {
                if max_positions == 0 {
                    return Err(format!(
                        "{field}: dynamic needs the config's max_position_embeddings > 0"
                    ));
                }
                RopeScaling::Dynamic {
                    factor: p.required_positive("factor")?,
                    original_max_positions: max_positions,
                }
            }
            "yarn" => {
                let original_max = p.original_max(max_positions)?;
                // The key must be there (transformers' validation requires it), but a null
                // value means "derive it from the context lengths" (DeepSeek-style configs).
                let factor = match p.number("factor")? {
                    Some(factor) => factor,
                    None if map.contains_key("factor") => {
                        max_positions as f64 / original_max as f64
                    }
                    None => return Err(p.missing("factor")),
                };
                p.check_positive("factor", factor)?;
                // An explicit attention factor wins; otherwise YaRN's 0.1·ln(s) + 1, or the
                // DeepSeek ratio when both mscale and mscale_all_dim are set and non-zero.
                let attention_factor = match p.positive("attention_factor")? {
                    Some(a) => a,
                    None => match (p.number("mscale")?, p.number("mscale_all_dim")?) {
                        (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_positions: original_max,
                    // Python's `x or default`: null and 0 both take the default.
                    beta_fast: p.number("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: p.number("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    // `.get("truncate", True)`: absent is true, but an explicit null is falsy.
                    truncate: match map.get("truncate") {
                        None => true,
                        Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(other) => return Err(p.mistyped("truncate", "a boolean", other)),
                    },
                    attention_factor,
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: p.required_positive("factor")?,
                low_freq_factor: p.required_positive("low_freq_factor")?,
                high_freq_factor: p.required_positive("high_freq_factor")?,
                original_max_positions: p.original_max(max_positions)?,
            },
            "longrope" => {
                let original_max = p.original_max(max_positions)?;
                let factor = match p.positive("factor")? {
                    Some(factor) => factor,
                    None => max_positions as f64 / original_max as f64,
                };
                let attention_factor = match p.positive("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original_max as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: p.factor_list("short_factor")?,
                    long_factor: p.factor_list("long_factor")?,
                    original_max_positions: original_max,
                    attention_factor,
                }
            }
            other => {
                return Err(format!(
                    "{field}.rope_type: unsupported RoPE type {other:?} (supported: {SUPPORTED})"
                ))
            }
        })
    }

    /// Inverse frequencies for `rotary_dim` rotated dims (length `rotary_dim / 2`) and the
    /// attention scaling applied to cos and sin (1.0 except yarn/longrope), for a forward pass
    /// whose sequence length is `seq_len` (only dynamic and longrope depend on it).
    ///
    /// `rotary_dim` is `head_dim` times `partial_rotary_factor`, truncated as Python's `int()`
    /// does (`(head_dim as f64 * partial) as usize`); it must be even and > 0. `theta` is
    /// `rope_theta`.
    ///
    /// `seq_len` is transformers' `max(position_ids) + 1`: the largest position in the pass plus
    /// one, over the whole batch, including cached positions (a decode step at position 4096 has
    /// `seq_len` 4097, not 1).
    ///
    /// * longrope uses `long_factor` when `seq_len > original_max_positions`, otherwise
    ///   `short_factor`; transformers decides this afresh in every pass, as here.
    /// * dynamic uses θ' = θ·(factor·L/max − (factor − 1))^(dim/(dim−2)) with
    ///   L = `seq_len`, and θ unchanged when `seq_len <= max`. transformers' module is stateful:
    ///   it recomputes only when `seq_len` exceeds the largest length seen so far and resets to θ
    ///   only when `seq_len < max`. This function gives the same frequencies for a pass over
    ///   positions `0..seq_len` in a fresh module, and for any run where lengths only grow
    ///   (prefill, then decode steps). To reproduce a stateful sequence of passes exactly, pass
    ///   `running` where `running = seq_len` if `seq_len < max` and
    ///   `running = max(previous running, seq_len)` otherwise.
    ///
    /// # Panics
    /// If `rotary_dim` is odd or 0, or (longrope) a factor list's length is not `rotary_dim / 2`;
    /// [`RopeScaling::check_rotary_dim`] reports these as errors beforehand.
    pub fn inv_freq(&self, rotary_dim: usize, theta: f64, seq_len: usize) -> (Vec<f64>, f64) {
        if let Err(e) = self.check_rotary_dim(rotary_dim) {
            panic!("{e}");
        }
        let dim = rotary_dim as f64;
        match self {
            RopeScaling::Default => (inverse(&pos_freqs(rotary_dim, theta)), 1.0),
            RopeScaling::Linear { factor } => {
                let inv = inverse(&pos_freqs(rotary_dim, theta));
                (inv.iter().map(|f| f32r(f / f32r(*factor))).collect(), 1.0)
            }
            RopeScaling::Dynamic {
                factor,
                original_max_positions,
            } => {
                if seq_len <= *original_max_positions {
                    return (inverse(&pos_freqs(rotary_dim, theta)), 1.0);
                }
                // transformers evaluates this on the float32 tensor `max(position_ids) + 1`,
                // so every step is a float32 op.
                let (len, max) = (f32r(seq_len as f64), f32r(*original_max_positions as f64));
                let ratio = f32r(f32r(f32r(*factor) * len) / max);
                let growth = f32r(ratio - f32r(factor - 1.0));
                let scaled = f32r(growth.powf(dim / (dim - 2.0))); // a Python-float exponent stays f64
                let base = f32r(f32r(theta) * scaled);
                (inverse(&pos_freqs(rotary_dim, base)), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let pos = pos_freqs(rotary_dim, theta);
                // The dim (fractional) at which a frequency turns `rotations` times over the
                // original context; in f64, as transformers' Python math does.
                let correction_dim = |rotations: f64| {
                    (dim * (*original_max_positions as f64 / (rotations * 2.0 * PI)).ln())
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001; // transformers' guard against a zero-width ramp
                }
                let inv = pos.iter().enumerate().map(|(i, p)| {
                    let extrapolation = f32r(1.0 / p);
                    let interpolation = f32r(1.0 / f32r(f32r(*factor) * p));
                    let ramp = f32r(f32r(i as f64 - f32r(low)) / f32r(high - low)).clamp(0.0, 1.0);
                    // Weight of the unscaled frequency: 1 below `low` (fast dims), 0 above `high`.
                    let keep = f32r(1.0 - ramp);
                    f32r(f32r(interpolation * f32r(1.0 - keep)) + f32r(extrapolation * keep))
                });
                (inv.collect(), *attention_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let old_len = *original_max_positions as f64;
                // transformers compares the float32 wavelengths with these as float32 scalars.
                let low_freq_wavelen = f32r(old_len / low_freq_factor);
                let high_freq_wavelen = f32r(old_len / high_freq_factor);
                let factor32 = f32r(*factor);
                let inv = inverse(&pos_freqs(rotary_dim, theta)).into_iter().map(|f| {
                    let wavelen = f32r(f32r(2.0 * PI) / f);
                    if wavelen > low_freq_wavelen {
                        f32r(f / factor32)
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = f32r(f32r(old_len) / wavelen);
                        let smooth = f32r(smooth - f32r(*low_freq_factor));
                        let smooth = f32r(smooth / f32r(high_freq_factor - low_freq_factor));
                        let scaled = f32r(f32r(f32r(1.0 - smooth) * f) / factor32);
                        f32r(scaled + f32r(smooth * f))
                    }
                });
                (inv.collect(), 1.0)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_positions,
                attention_factor,
            } => {
                let factors = if seq_len > *original_max_positions {
                    long_factor
                } else {
                    short_factor
                };
                let pos = pos_freqs(rotary_dim, theta);
                let inv = factors
                    .iter()
                    .zip(&pos)
                    .map(|(ext, p)| f32r(1.0 / f32r(f32r(*ext) * p)));
                (inv.collect(), *attention_factor)
            }
            RopeScaling::Factors { factors } => {
                let inv = inverse(&pos_freqs(rotary_dim, theta));
                let scaled = inv.iter().zip(factors).map(|(f, d)| f32r(f / f32r(*d)));
                (scaled.collect(), 1.0)
            }
        }
    }

    /// Whether `inv_freq` depends on `seq_len` (dynamic, longrope), so that cos/sin tables must be
    /// rebuilt (or chosen) per forward pass rather than once.
    pub fn depends_on_length(&self) -> bool {
        matches!(
            self,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// Checks that [`RopeScaling::inv_freq`] can work with `rotary_dim`: even and > 0, and for
    /// longrope, factor lists of `rotary_dim / 2` entries (transformers only warns about a
    /// mismatch, then fails or broadcasts in torch).
    pub fn check_rotary_dim(&self, rotary_dim: usize) -> Result<(), String> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(format!(
                "RoPE needs an even, non-zero rotary dimension, got {rotary_dim}"
            ));
        }
        let lists: Vec<(&str, &Vec<f64>)> = match self {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                ..
            } => vec![("short_factor", short_factor), ("long_factor", long_factor)],
            RopeScaling::Factors { factors } => vec![("rope_freqs", factors)],
            _ => vec![],
        };
        {
            for (name, list) in lists {
                if list.len() != rotary_dim / 2 {
                    return Err(format!(
                        "{name} has {} entries, but the rotary dimension {rotary_dim} \
                         needs {}",
                        list.len(),
                        rotary_dim / 2
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Rounds to the nearest f32 and back: the value transformers holds in a float32 tensor at this
/// step. (For one `+ − × ÷` of f32 operands, computing in f64 and rounding once gives exactly the
/// float32 result.)
fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// `theta^(2i/dim)` for `i` in `0..dim/2`, as transformers' `base ** (arange(0, dim, 2).float() /
/// dim)`: the exponent and the power are float32 (the rounded exponent is what matters: its error
/// is multiplied by ln θ).
fn pos_freqs(rotary_dim: usize, theta: f64) -> Vec<f64> {
    (0..rotary_dim / 2)
        .map(|i| {
            let exponent = f32r((2 * i) as f64 / rotary_dim as f64);
            f32r(f32r(theta).powf(exponent))
        })
        .collect()
}

/// `1.0 / pos_freqs`, in float32.
fn inverse(pos_freqs: &[f64]) -> Vec<f64> {
    pos_freqs.iter().map(|p| f32r(1.0 / p)).collect()
}

/// YaRN's `get_mscale`: the attention temperature for scale `s`, `0.1·mscale·ln(s) + 1`, and 1
/// when not extending (`s <= 1`).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The rope object being parsed, for typed look-ups with messages that name the field.
struct Params<'a> {
    field: &'a str,
    rope_type: &'a str,
    map: &'a Map<String, Value>,
}

impl Params<'_> {
    fn missing(&self, key: &str) -> String {
        let what = if self.map.contains_key(key) {
            "null"
        } else {
            "missing"
        };
        format!("{}.{key}: {what} ({} needs it)", self.field, self.rope_type)
    }

    fn mistyped(&self, key: &str, expected: &str, got: &Value) -> String {
        format!("{}.{key}: expected {expected}, got {got}", self.field)
    }

    /// A number, or `None` when absent or null (transformers' `.get(key)` then `is None`).
    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(format!("{}.{key}: must be finite, got {n}", self.field)),
            },
            Some(other) => Err(self.mistyped(key, "a number", other)),
        }
    }

    fn check_positive(&self, key: &str, x: f64) -> Result<f64, String> {
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(format!(
                "{}.{key}: must be a finite number > 0, got {x}",
                self.field
            ))
        }
    }

    /// An optional number that, when given, must be finite and > 0.
    fn positive(&self, key: &str) -> Result<Option<f64>, String> {
        self.number(key)?
            .map(|x| self.check_positive(key, x))
            .transpose()
    }

    fn required_positive(&self, key: &str) -> Result<f64, String> {
        self.positive(key)?.ok_or_else(|| self.missing(key))
    }

    /// `original_max_position_embeddings`, defaulting to the config's `max_position_embeddings`
    /// as transformers' `standardize_rope_params` does. A whole number > 0 (`4096.0` is accepted:
    /// transformers only uses it in float arithmetic).
    fn original_max(&self, max_position_embeddings: usize) -> Result<usize, String> {
        let key = "original_max_position_embeddings";
        let value = match self.number(key)? {
            None => max_position_embeddings as f64,
            Some(x) if x.fract() == 0.0 => x,
            Some(x) => {
                return Err(format!(
                    "{}.{key}: must be a whole number, got {x}",
                    self.field
                ))
            }
        };
        if value < 1.0 {
            return Err(format!(
                "{}.{key}: must be > 0, got {value} (when absent, the config's \
                 max_position_embeddings is used)",
                self.field
            ));
        }
        Ok(value as usize)
    }

    /// A required list of finite numbers > 0 (longrope's per-frequency divisors).
    fn factor_list(&self, key: &str) -> Result<Vec<f64>, String> {
        let items = match self.map.get(key) {
            None | Some(Value::Null) => return Err(self.missing(key)),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.mistyped(key, "a list of numbers", other)),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_f64() {
                Some(x) => self.check_positive(&format!("{key}[{i}]"), x),
                None => Err(self.mistyped(&format!("{key}[{i}]"), "a number", item)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/families/rope_scaling.json"
    ));

    /// Every case of the fixture, produced by transformers' rotary embedding after a forward pass
    /// over positions `0..seq_len` (see `generate_rope_scaling.py`).
    #[test]
    fn matches_transformers() {
        let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 40, "fixture has only {} cases", cases.len());
        let mut worst = (0.0f64, String::new());
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let max_pos = case["max_position_embeddings"].as_u64().unwrap() as usize;
            let scaling = RopeScaling::from_json("rope_parameters", &case["rope"], max_pos)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let rotary_dim = case["rotary_dim"].as_u64().unwrap() as usize;
            let theta = case["theta"].as_f64().unwrap();
            let seq_len = case["seq_len"].as_u64().unwrap() as usize;
            let (inv, attention) = scaling.inv_freq(rotary_dim, theta, seq_len);

            let expected: Vec<f64> = case["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(inv.len(), expected.len(), "{name}: length");
            for (i, (got, want)) in inv.iter().zip(&expected).enumerate() {
                let rel = (got - want).abs() / want.abs();
                assert!(
                    rel <= 1e-6,
                    "{name}: inv_freq[{i}] = {got}, transformers {want} (rel {rel:e})"
                );
                // Stricter: the float32 mirroring reproduces transformers' buffer except where
                // torch's float32 pow is itself off by an ulp. (Plain f64 math would be up to
                // 4 ulps, 3.8e-7, away on these cases, and more for larger θ.)
                let ulps = ((*got as f32).to_bits() as i64 - (*want as f32).to_bits() as i64).abs();
                assert!(
                    ulps <= 1,
                    "{name}: inv_freq[{i}] = {got}, transformers {want} ({ulps} f32 ulps)"
                );
                if rel > worst.0 {
                    worst = (rel, format!("{name}[{i}]"));
                }
            }
            let want = case["attention_scaling"].as_f64().unwrap();
            let rel = (attention - want).abs() / want;
            assert!(
                rel <= 1e-6,
                "{name}: attention scaling {attention}, transformers {want}"
            );
        }
        println!(
            "{} cases; worst inv_freq relative error {:e} at {}",
            cases.len(),
            worst.0,
            worst.1
        );
    }

    fn parse(value: Value) -> Result<RopeScaling, String> {
        RopeScaling::from_json("rope_parameters", &value, 4096)
    }

    #[test]
    fn unknown_type_is_named() {
        let err = parse(json!({"rope_type": "su", "factor": 2.0})).unwrap_err();
        assert!(err.contains("\"su\""), "{err}");
        assert!(err.contains("rope_parameters.rope_type"), "{err}");
        assert!(err.contains(SUPPORTED), "{err}");
        let err = parse(json!({"type": "mrope"})).unwrap_err();
        assert!(err.contains("\"mrope\""), "{err}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let err =
            parse(json!({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
                .unwrap_err();
        assert_eq!(err, "rope_parameters.factor: missing (llama3 needs it)");
        let err = parse(json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}))
            .unwrap_err();
        assert_eq!(
            err,
            "rope_parameters.low_freq_factor: missing (llama3 needs it)"
        );
        let err =
            RopeScaling::from_json("rope_scaling", &json!({"type": "linear"}), 4096).unwrap_err();
        assert_eq!(err, "rope_scaling.factor: missing (linear needs it)");
        let err = parse(json!({"rope_type": "linear", "factor": null})).unwrap_err();
        assert_eq!(err, "rope_parameters.factor: null (linear needs it)");
        let err = parse(json!({"rope_type": "yarn"})).unwrap_err();
        assert_eq!(err, "rope_parameters.factor: missing (yarn needs it)");
        let err = parse(json!({"rope_type": "longrope", "short_factor": [1.0]})).unwrap_err();
        assert_eq!(
            err,
            "rope_parameters.long_factor: missing (longrope needs it)"
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let err = parse(json!({"rope_type": "linear", "factor": "2"})).unwrap_err();
        assert!(
            err.starts_with("rope_parameters.factor: expected a number"),
            "{err}"
        );
        for bad in [json!(0.0), json!(-2.0)] {
            let err = parse(json!({"rope_type": "dynamic", "factor": bad})).unwrap_err();
            assert!(
                err.starts_with("rope_parameters.factor: must be a finite number > 0"),
                "{err}"
            );
        }
        let err = parse(json!({"rope_type": "yarn", "factor": 4.0, "truncate": "no"})).unwrap_err();
        assert!(
            err.starts_with("rope_parameters.truncate: expected a boolean"),
            "{err}"
        );
        let err = parse(json!({"rope_type": "longrope", "short_factor": [1.0, -1.0], "long_factor": [1.0, 1.0]}))
            .unwrap_err();
        assert!(
            err.starts_with("rope_parameters.short_factor[1]: must be"),
            "{err}"
        );
        let err = parse(
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096.5}),
        )
        .unwrap_err();
        assert!(
            err.starts_with("rope_parameters.original_max_position_embeddings"),
            "{err}"
        );
        let err = parse(json!([1, 2])).unwrap_err();
        assert!(
            err.starts_with("rope_parameters: expected an object"),
            "{err}"
        );
    }

    #[test]
    fn parsing_defaults_and_extra_keys() {
        assert_eq!(parse(Value::Null).unwrap(), RopeScaling::Default);
        assert_eq!(
            parse(json!({"rope_theta": 1e6, "partial_rotary_factor": 0.5})).unwrap(),
            RopeScaling::Default
        );
        // `rope_type` wins over the v4 `type`; unknown keys are ignored.
        assert_eq!(
            parse(json!({"rope_type": "linear", "type": "dynamic", "factor": 2, "foo": [1]}))
                .unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        // Yarn defaults: original max from the config, betas 32/1, truncation on, 0.1·ln(s) + 1.
        assert_eq!(
            parse(json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": null, "beta_slow": 0}))
                .unwrap(),
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
            }
        );
        // An explicit null `truncate` is falsy in transformers.
        let yarn = parse(json!({"rope_type": "yarn", "factor": 4.0, "truncate": null})).unwrap();
        assert!(matches!(
            yarn,
            RopeScaling::Yarn {
                truncate: false,
                ..
            }
        ));
        // Dynamic's threshold is the config's max_position_embeddings, not the rope object's.
        assert_eq!(
            parse(json!({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 99})).unwrap(),
            RopeScaling::Dynamic { factor: 2.0, original_max_positions: 4096 }
        );
    }

    #[test]
    fn length_dependence() {
        let dynamic = parse(json!({"rope_type": "dynamic", "factor": 2.0})).unwrap();
        assert!(dynamic.depends_on_length());
        assert_eq!(
            dynamic.inv_freq(64, 1e4, 10),
            dynamic.inv_freq(64, 1e4, 4096)
        );
        assert_ne!(
            dynamic.inv_freq(64, 1e4, 4096),
            dynamic.inv_freq(64, 1e4, 4097)
        );
        assert_eq!(
            dynamic.inv_freq(64, 1e4, 100),
            RopeScaling::Default.inv_freq(64, 1e4, 100)
        );
        for fixed in [
            RopeScaling::Default,
            RopeScaling::Linear { factor: 2.0 },
            parse(json!({"rope_type": "yarn", "factor": 4.0})).unwrap(),
        ] {
            assert!(!fixed.depends_on_length());
        }
        let longrope = RopeScaling::LongRope {
            short_factor: vec![1.0; 4],
            long_factor: vec![2.0; 4],
            original_max_positions: 100,
            attention_factor: 1.0,
        };
        assert!(longrope.depends_on_length());
        assert_eq!(longrope.inv_freq(8, 1e4, 100).0[0], 1.0);
        assert_eq!(longrope.inv_freq(8, 1e4, 101).0[0], 0.5);
        assert!(longrope.check_rotary_dim(8).is_ok());
        assert!(longrope
            .check_rotary_dim(16)
            .unwrap_err()
            .contains("short_factor has 4 entries"));
        assert!(RopeScaling::Default.check_rotary_dim(7).is_err());
    }
}

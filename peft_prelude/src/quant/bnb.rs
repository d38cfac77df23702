//! bitsandbytes' serialized 4-bit layout, as `Linear4bit._save_to_state_dict` writes it for a
//! projection `P`: `P.weight` (u8 `[n/2, 1]`, packed codes), `P.weight.absmax` (f32, or u8
//! with double quantization), `P.weight.quant_map` (f32 `[16]`), with double quantization
//! `P.weight.nested_absmax` (f32) and `P.weight.nested_quant_map` (f32 `[256]`), and
//! `P.weight.quant_state.bitsandbytes__nf4` (u8, UTF-8 JSON: quant_type, blocksize, dtype,
//! shape, nested_blocksize, nested_offset).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_kernels::nf4::{Absmax, Nf4Matrix};

use super::nf4_weight::Nf4Weight;
use crate::error::{Error, Result};
use crate::model::weights::WeightSource;

/// The quant-state key suffixes bitsandbytes writes, by quant type.
const NF4_STATE: &str = "quant_state.bitsandbytes__nf4";
const FP4_STATE: &str = "quant_state.bitsandbytes__fp4";

#[derive(Debug, serde::Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f32>,
}

/// Whether the tensor `name` (`P.weight`) is stored in bitsandbytes' 4-bit layout.
pub fn is_bnb_4bit(source: &dyn WeightSource, name: &str) -> bool {
    [
        ".absmax",
        ".quant_map",
        &format!(".{NF4_STATE}"),
        &format!(".{FP4_STATE}"),
    ]
    .iter()
    .any(|s| source.contains(&format!("{name}{s}")))
        || source.dtype(name) == Some(DType::U8)
}

/// Reads a bitsandbytes NF4 projection whose config shape is `expected = [out, in]`; its
/// outputs will be in `dtype`.
pub fn load_nf4(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
    dtype: DType,
) -> Result<Nf4Weight> {
    let state_name = format!("{name}.{NF4_STATE}");
    if source.contains(&format!("{name}.{FP4_STATE}")) {
        return Err(Error::unsupported(
            source.file_of(name),
            format!("bitsandbytes quant type fp4 of `{name}` (only nf4 is supported)"),
        ));
    }
    let state = read_state(source, &state_name)?;
    if state.quant_type != "nf4" {
        return Err(Error::unsupported(
            source.file_of(&state_name),
            format!(
                "quant_type `{}` in `{state_name}` (only nf4 is supported)",
                state.quant_type
            ),
        ));
    }
    if state.shape != expected {
        return Err(Error::ShapeMismatch {
            path: source.file_of(&state_name),
            name: format!("{state_name} (shape)"),
            expected: expected.to_vec(),
            got: state.shape.clone(),
        });
    }
    let n: usize = expected.iter().product();
    let (rows, cols) = (expected[0], expected[1]);
    let packed = tensor(source, name, DType::U8, n.div_ceil(2))?;
    if state.blocksize == 0 {
        return Err(Error::corrupt(
            source.file_of(&state_name),
            format!("`{state_name}`: blocksize 0"),
        ));
    }
    let blocks = n.div_ceil(state.blocksize);
    let quant_map =
        tensor(source, &format!("{name}.quant_map"), DType::F32, 16)?.to_vec1::<f32>()?;
    let absmax_name = format!("{name}.absmax");
    let absmax = match (state.nested_offset, state.nested_blocksize) {
        (Some(offset), Some(nested_blocksize)) if nested_blocksize > 0 => Absmax::Nested {
            codes: tensor(source, &absmax_name, DType::U8, blocks)?.to_vec1::<u8>()?,
            code_map: tensor(source, &format!("{name}.nested_quant_map"), DType::F32, 256)?.to_vec1::<f32>()?,
            nested_absmax: tensor(
                source,
                &format!("{name}.nested_absmax"),
                DType::F32,
                blocks.div_ceil(nested_blocksize),
            )?
            .to_vec1::<f32>()?,
            nested_blocksize,
            offset,
        },
        (None, None) => Absmax::Plain(tensor(source, &absmax_name, DType::F32, blocks)?.to_vec1::<f32>()?),
        _ => {
            return Err(Error::corrupt(
                source.file_of(&state_name),
                format!("`{state_name}` has only one of nested_offset / nested_blocksize (or a zero block size)"),
            ))
        }
    };
    let code: [f32; 16] = quant_map.try_into().expect("length checked by `tensor`");
    let matrix = Nf4Matrix::new(packed, absmax, code, state.blocksize, rows, cols)
        .map_err(|e| Error::corrupt(source.file_of(name), format!("`{name}`: {e}")))?;
    Ok(Nf4Weight::from_matrix(matrix, dtype))
}

fn read_state(source: &dyn WeightSource, state_name: &str) -> Result<QuantState> {
    if !source.contains(state_name) {
        return Err(Error::MissingTensor {
            path: source.file_of(state_name),
            name: state_name.to_string(),
        });
    }
    let bytes = source
        .load(state_name, DType::U8, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::corrupt(
            source.file_of(state_name),
            format!("`{state_name}` is not a bitsandbytes quant state: {e}"),
        )
    })
}

/// Loads `name` as a flat CPU tensor of `len` elements stored as `dtype` (no conversion: a
/// float where codes are expected is a corrupt checkpoint, not something to round).
fn tensor(source: &dyn WeightSource, name: &str, dtype: DType, len: usize) -> Result<Tensor> {
    if !source.contains(name) {
        return Err(Error::MissingTensor {
            path: source.file_of(name),
            name: name.to_string(),
        });
    }
    if let Some(stored) = source.dtype(name) {
        if stored != dtype {
            return Err(Error::corrupt(
                source.file_of(name),
                format!("tensor `{name}` is {stored:?}, expected {dtype:?}"),
            ));
        }
    }
    let shape = source.shape(name)?;
    let count: usize = shape.iter().product();
    if count != len {
        let expected = if shape.len() == 2 {
            vec![len, 1]
        } else {
            vec![len]
        };
        return Err(Error::ShapeMismatch {
            path: source.file_of(name),
            name: name.to_string(),
            expected,
            got: shape,
        });
    }
    Ok(source.load(name, dtype, &Device::Cpu)?.flatten_all()?)
}

/// What config.json's `quantization_config` says, when it names bitsandbytes.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub load_in_4bit: bool,
    pub quant_type: String,
    pub double_quant: bool,
}

impl BnbConfig {
    /// `Ok(None)` when config.json has no bitsandbytes `quantization_config`; an error for
    /// settings we cannot load (8-bit, fp4).
    pub fn from_config_json(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let v: serde_json::Value = crate::error::read_json(path)?;
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some("bitsandbytes") {
            return Ok(None);
        }
        let flag = |k: &str| q.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
        let config = BnbConfig {
            load_in_4bit: flag("load_in_4bit") || flag("_load_in_4bit"),
            quant_type: q
                .get("bnb_4bit_quant_type")
                .and_then(|t| t.as_str())
                .unwrap_or("fp4")
                .to_string(),
            double_quant: flag("bnb_4bit_use_double_quant"),
        };
        if flag("load_in_8bit") || flag("_load_in_8bit") {
            return Err(Error::unsupported(
                path,
                "bitsandbytes 8-bit checkpoints (load_in_8bit)",
            ));
        }
        if config.load_in_4bit && config.quant_type != "nf4" {
            return Err(Error::unsupported(
                path,
                format!(
                    "bitsandbytes 4-bit quant type `{}` (only nf4 is supported)",
                    config.quant_type
                ),
            ));
        }
        Ok(Some(config))
    }
}

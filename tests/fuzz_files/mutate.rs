//! Seeded mutations of the files we read: blind ones (truncation, byte flips, a word set to an
//! extreme value) and ones that know the format (every count, length, offset, dimension and
//! type id of a GGUF header; any node of a JSON document; a safetensors header's JSON).

/// The prelude's seeded generator (splitmix64) with the helpers a mutator needs: a case is
/// reproduced from its seed alone.
pub struct Rng(peft_prelude::rng::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(peft_prelude::rng::Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The values a size, count or offset field is set to: the edges where arithmetic wraps.
pub const EXTREMES: [u64; 12] = [
    0,
    1,
    2,
    3,
    7,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0x4000_0000_0000_0000,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// A field of a binary file: where it is and how wide (bytes, little-endian).
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub offset: usize,
    pub width: usize,
    pub what: &'static str,
}

pub fn set_field(bytes: &mut [u8], field: Field, value: u64) {
    let le = value.to_le_bytes();
    bytes[field.offset..field.offset + field.width].copy_from_slice(&le[..field.width]);
}

/// One blind mutation of any file; returns what was done.
pub fn blind(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    if bytes.is_empty() {
        bytes.extend_from_slice(b"\0");
        return "empty file given a NUL".into();
    }
    // Header regions matter most: half the positions fall in the first 4 KiB.
    let pos = |rng: &mut Rng, len: usize| {
        if rng.chance(50) {
            rng.below(len.min(4096))
        } else {
            rng.below(len)
        }
    };
    match rng.below(5) {
        0 => {
            let at = pos(rng, bytes.len());
            bytes.truncate(at);
            format!("truncated to {at} bytes")
        }
        1 | 2 => {
            let n = 1 + rng.below(4);
            let mut at = vec![];
            for _ in 0..n {
                let p = pos(rng, bytes.len());
                bytes[p] ^= 1 << rng.below(8);
                at.push(p);
            }
            format!("bit flips at {at:?}")
        }
        3 => {
            let width = *rng.pick(&[2usize, 4, 8]);
            if bytes.len() < width {
                bytes.clear();
                return "emptied".into();
            }
            let p = pos(rng, bytes.len() - width + 1);
            let v = *rng.pick(&EXTREMES);
            set_field(
                bytes,
                Field {
                    offset: p,
                    width,
                    what: "word",
                },
                v,
            );
            format!("{width}-byte word at {p} set to {v:#x}")
        }
        _ => {
            let n = 1 + rng.below(64);
            let p = pos(rng, bytes.len());
            let end = (p + n).min(bytes.len());
            bytes.drain(p..end);
            format!("removed bytes {p}..{end}")
        }
    }
}

/// One mutation of a JSON document: a node replaced by an extreme number, a value of another
/// type, deep nesting or a huge string; a key removed; or the text itself damaged.
pub fn json(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return blind(bytes, rng);
    };
    if rng.chance(15) {
        return blind(bytes, rng);
    }
    let mut paths = vec![];
    collect_paths(&doc, &mut vec![], &mut paths);
    // Prefer scalars that look like sizes: numbers are where lengths and counts live.
    let numeric: Vec<&Vec<String>> = paths
        .iter()
        .filter(|p| node(&doc, p).is_some_and(|v| v.is_number()))
        .collect();
    let path = if !numeric.is_empty() && rng.chance(50) {
        (*rng.pick(&numeric)).clone()
    } else {
        rng.pick(&paths).clone()
    };
    let what;
    if !path.is_empty() && rng.chance(12) {
        let (last, parent) = path.split_last().unwrap();
        match node_mut(&mut doc, parent) {
            Some(serde_json::Value::Object(m)) => {
                m.remove(last);
            }
            Some(serde_json::Value::Array(a)) => {
                let i: usize = last.parse().unwrap();
                a.remove(i);
            }
            _ => {}
        }
        what = format!("removed {}", path.join("."));
    } else {
        let replacement = replacement(rng);
        what = format!("{} = {}", path.join("."), short(&replacement));
        if let Some(slot) = node_mut(&mut doc, &path) {
            *slot = replacement;
        }
    }
    *bytes = serde_json::to_vec(&doc).unwrap();
    if rng.chance(5) {
        // Nesting deeper than any parser should follow, in place of the whole document's
        // first value.
        let depth = 100_000;
        let mut nested = "[".repeat(depth).into_bytes();
        nested.extend(std::iter::repeat_n(b']', depth));
        *bytes = nested;
        return format!("{depth}-deep nesting");
    }
    what
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}... ({} chars)", &s[..40], s.len())
    } else {
        s
    }
}

fn replacement(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(14) {
        0..=4 => json!(*rng.pick(&EXTREMES)),
        5 => json!(-1),
        6 => json!((*rng.pick(&EXTREMES) as i64)
            .checked_abs()
            .map_or(i64::MIN, |v| -v)),
        7 => json!(*rng.pick(&[1e308, -1e308, 1e-320, 0.5, -0.0, 1.5e19])),
        8 => json!("x"),
        9 => json!(null),
        10 => json!(true),
        11 => json!([]),
        12 => json!({}),
        _ => json!("ab".repeat(100_000 + rng.below(1000))),
    }
}

fn collect_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                collect_paths(x, at, out);
                at.pop();
            }
        }
        serde_json::Value::Array(a) => {
            // Long arrays (vocabularies, merges): a sample keeps paths proportionate.
            let step = (a.len() / 16).max(1);
            for i in (0..a.len()).step_by(step) {
                at.push(i.to_string());
                collect_paths(&a[i], at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a serde_json::Value, path: &[String]) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(v, |v, k| match v {
        serde_json::Value::Object(m) => m.get(k),
        serde_json::Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => None,
    })
}

fn node_mut<'a>(
    v: &'a mut serde_json::Value,
    path: &[String],
) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(v, |v, k| match v {
        serde_json::Value::Object(m) => m.get_mut(k),
        serde_json::Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Every count, length, offset, dimension and type id of a GGUF file's header and tensor
/// table (and the integer values of its metadata), found by walking the format.
pub fn gguf_fields(b: &[u8]) -> Vec<Field> {
    let mut out = vec![];
    let mut p = 0usize;
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as u64;
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
    let f = |offset, width, what| Field {
        offset,
        width,
        what,
    };
    if b.len() < 24 {
        return out;
    }
    out.push(f(4, 4, "version"));
    out.push(f(8, 8, "tensor_count"));
    out.push(f(16, 8, "metadata_kv_count"));
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    p += 24;
    let scalar_width = |t: u64| match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    // Returns the position after a string, recording its length field.
    let string = |p: usize, out: &mut Vec<Field>| -> Option<usize> {
        let len = u64_at(p) as usize;
        out.push(f(p, 8, "string length"));
        p.checked_add(8)?.checked_add(len).filter(|&e| e <= b.len())
    };
    for _ in 0..n_kv {
        let Some(after_key) = string(p, &mut out) else {
            return out;
        };
        p = after_key;
        if p + 4 > b.len() {
            return out;
        }
        out.push(f(p, 4, "value type"));
        let t = u32_at(p);
        p += 4;
        if t == 8 {
            let Some(e) = string(p, &mut out) else {
                return out;
            };
            p = e;
        } else if t == 9 {
            out.push(f(p, 4, "array item type"));
            let it = u32_at(p);
            out.push(f(p + 4, 8, "array length"));
            let n = u64_at(p + 4);
            p += 12;
            for i in 0..n {
                if it == 8 {
                    let mut sink = vec![];
                    let Some(e) = string(p, if i < 4 { &mut out } else { &mut sink }) else {
                        return out;
                    };
                    p = e;
                } else if let Some(w) = scalar_width(it) {
                    if i < 4 && matches!(it, 4 | 5 | 10 | 11) {
                        out.push(f(p, w, "array item"));
                    }
                    p += w;
                } else {
                    return out;
                }
            }
        } else if let Some(w) = scalar_width(t) {
            if matches!(t, 4 | 5 | 10 | 11) {
                out.push(f(p, w, "integer value"));
            }
            p += w;
        } else {
            return out;
        }
        if p > b.len() {
            return out;
        }
    }
    for _ in 0..n_tensors {
        let Some(e) = string(p, &mut out) else {
            return out;
        };
        p = e;
        if p + 4 > b.len() {
            return out;
        }
        out.push(f(p, 4, "n_dims"));
        let n_dims = u32_at(p) as usize;
        p += 4;
        for _ in 0..n_dims.min(8) {
            out.push(f(p, 8, "dimension"));
            p += 8;
        }
        if p + 12 > b.len() {
            return out;
        }
        out.push(f(p, 4, "tensor type"));
        out.push(f(p + 4, 8, "tensor offset"));
        p += 12;
    }
    out
}

/// A GGUF mutation: usually a header field set to an extreme, else a blind one.
pub fn gguf(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    let fields = gguf_fields(bytes);
    if fields.is_empty() || rng.chance(30) {
        return blind(bytes, rng);
    }
    let field = *rng.pick(&fields);
    let v = match field.what {
        "tensor type" | "value type" | "array item type" if rng.chance(50) => rng.below(48) as u64,
        "tensor offset" if rng.chance(50) => {
            // Misaligned, overlapping or past the end, by a little.
            let old = u64::from_le_bytes(
                bytes[field.offset..field.offset + 8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            old.wrapping_add(*rng.pick(&[1u64, 4, 16, 32, 1024, u64::MAX - 31]))
        }
        _ => *rng.pick(&EXTREMES),
    };
    set_field(bytes, field, v);
    format!("{} at {} set to {v:#x}", field.what, field.offset)
}

/// A safetensors mutation: the header's length, its JSON (re-framed so the change is read),
/// or a blind one.
pub fn safetensors(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    if bytes.len() < 8 || rng.chance(25) {
        return blind(bytes, rng);
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if rng.chance(15) || n + 8 > bytes.len() {
        let v = *rng.pick(&EXTREMES);
        bytes[..8].copy_from_slice(&v.to_le_bytes());
        return format!("header length set to {v:#x}");
    }
    let mut header = bytes[8..8 + n].to_vec();
    let data = bytes[8 + n..].to_vec();
    let what = if rng.chance(30) {
        safetensors_entry(&mut header, rng)
    } else {
        json(&mut header, rng)
    };
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    *bytes = out;
    format!("header: {what}")
}

/// A safetensors header entry made to lie: shape, offsets or dtype changed, or a duplicate.
fn safetensors_entry(header: &mut Vec<u8>, rng: &mut Rng) -> String {
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice(header) else {
        return "unparsable header".into();
    };
    let names: Vec<String> = m.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return "no tensors".into();
    }
    let name = rng.pick(&names).clone();
    let entry = m.get_mut(&name).unwrap();
    let what = match rng.below(4) {
        0 => {
            let dt = *rng.pick(&[
                "F16", "BF16", "I8", "U8", "F64", "I64", "BOOL", "F8_E4M3", "Q4",
            ]);
            entry["dtype"] = dt.into();
            format!("{name}: dtype {dt}")
        }
        1 => {
            if let Some(shape) = entry["shape"].as_array_mut() {
                if shape.is_empty() || rng.chance(30) {
                    shape.push((*rng.pick(&EXTREMES)).into());
                } else {
                    let i = rng.below(shape.len());
                    shape[i] = (*rng.pick(&EXTREMES)).into();
                }
            }
            format!("{name}: shape {}", entry["shape"])
        }
        2 => {
            if let Some(offsets) = entry["data_offsets"].as_array_mut() {
                let i = rng.below(2).min(offsets.len().saturating_sub(1));
                if !offsets.is_empty() {
                    let old = offsets[i].as_u64().unwrap_or(0);
                    offsets[i] = (*rng.pick(&[
                        0,
                        old.wrapping_add(1),
                        old.wrapping_sub(4),
                        old.wrapping_add(4),
                        u64::MAX,
                    ]))
                    .into();
                }
            }
            format!("{name}: data_offsets {}", entry["data_offsets"])
        }
        _ => {
            // Two names for the same bytes.
            let copy = entry.clone();
            let other = rng.pick(&names).clone();
            m.insert(other.clone(), copy);
            format!("{other}: the entry of {name}")
        }
    };
    *header = serde_json::to_vec(&serde_json::Value::Object(m)).unwrap();
    what
}

/// Whether a safetensors file kept its length and header and changed only in its tensor data.
pub fn only_tensor_data_changed(original: &[u8], mutated: &[u8]) -> bool {
    if original.len() != mutated.len() || original.len() < 8 {
        return false;
    }
    let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    original[..header_end.min(original.len())] == mutated[..header_end.min(mutated.len())]
}

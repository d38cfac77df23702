//! The NF4 quantizer, bit-exact with bitsandbytes' CPU `quantize_4bit` (blocks of 64, nearest
//! code by midpoints, first element in the high nibble) and its double quantization of the
//! block absmax values (8-bit signed dynamic map in blocks of 256 through a 65536-entry lookup
//! table, plus the mean as offset).

use peft_kernels::nf4::{Absmax, NF4_CODE};

use super::dynamic_map::dynamic_map_signed;
use rayon::prelude::*;

/// bitsandbytes' default NF4 block size.
pub const BLOCKSIZE: usize = 64;
/// Block size of the second (8-bit) quantization of the absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Packed codes (`ceil(n / 2)` bytes) and one absmax per block of `blocksize` elements.
pub fn quantize_blocks(data: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints(&NF4_CODE);
    let code_of = |v: f32, inv: f32| -> u8 {
        let s = (v * inv).clamp(-1.0, 1.0);
        // torch.bucketize(right=False): the number of midpoints strictly below the value
        // (the midpoints ascend, so a binary search counts them).
        mids.partition_point(|&m| m < s) as u8
    };
    let absmax: Vec<f32> = data
        .par_chunks(blocksize)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    // Blocks of an even length pack independently; chunks of whole blocks run in parallel.
    let per_task = blocksize * (16_384 / blocksize).max(1);
    let per_task = if blocksize.is_multiple_of(2) {
        per_task
    } else {
        data.len().max(1)
    };
    let mut packed = vec![0u8; data.len().div_ceil(2)];
    packed
        .par_chunks_mut(per_task / 2 + per_task % 2)
        .zip(data.par_chunks(per_task))
        .enumerate()
        .for_each(|(task, (out, xs))| {
            let first_block = task * per_task / blocksize;
            for (i, pair) in xs.chunks(2).enumerate() {
                let q = |j: usize| -> u8 {
                    let b = first_block + (2 * i + j) / blocksize;
                    code_of(pair[j], 1.0 / absmax[b].max(1e-38))
                };
                let hi = q(0);
                let lo = if pair.len() == 2 { q(1) } else { 0 };
                out[i] = (hi << 4) | lo;
            }
        });
    (packed, absmax)
}

/// bitsandbytes' double quantization of block absmax values: subtract the mean, then 8-bit
/// blockwise quantization with the signed dynamic map (its CPU kernel's lookup-table rule).
pub fn double_quantize(absmax: &[f32], nested_blocksize: usize) -> Absmax {
    let offset = mean_f32(absmax);
    let v: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let code_map = dynamic_map_signed();
    let lut = lookup_table(&code_map);
    let nested_absmax: Vec<f32> = v
        .chunks(nested_blocksize)
        .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
        .collect();
    let codes = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let amax = nested_absmax[i / nested_blocksize];
            if amax == 0.0 {
                return 0;
            }
            let s = (x * (1.0 / amax)).clamp(-1.0, 1.0);
            let idx = ((s + 1.0) * 0.5 * 65535.0 + 0.5) as u16;
            lut[idx as usize]
        })
        .collect();
    Absmax::Nested {
        codes,
        code_map,
        nested_absmax,
        nested_blocksize,
        offset,
    }
}

/// `torch.mean` of an f32 vector as bitsandbytes gets it: torch's CPU sum (a cascade of f32
/// partial sums over 8-lane vectors, AVX2), then one f32 division. Bit-exact for vectors that
/// torch reduces on one thread (up to 32768 values, i.e. layers up to 2M parameters); larger
/// ones may differ from a multi-threaded torch in the last bit of the offset.
fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    torch_sum_f32(v) / v.len() as f32
}

const SUM_LANES: usize = 8;

fn torch_sum_f32(x: &[f32]) -> f32 {
    let n = x.len();
    if n < SUM_LANES {
        return row_sum(x, 1, n)[0];
    }
    let vectors = n / SUM_LANES;
    let lanes = row_sum(&x[..vectors * SUM_LANES], SUM_LANES, vectors);
    let mut total = 0f32;
    for &t in &x[vectors * SUM_LANES..] {
        total += t;
    }
    for l in lanes {
        total += l;
    }
    total
}

/// torch's `row_sum`: `size` elements of `width` lanes, four interleaved accumulators.
fn row_sum(x: &[f32], width: usize, size: usize) -> Vec<f32> {
    let rows = size / 4;
    let mut acc = multi_row_sum(x, width, rows);
    for i in rows * 4..size {
        add_lanes(&mut acc[0], &x[i * width..(i + 1) * width]);
    }
    for k in 1..4 {
        let other = std::mem::take(&mut acc[k]);
        add_lanes(&mut acc[0], &other);
    }
    acc.swap_remove(0)
}

/// torch's `multi_row_sum`: rows of 4 elements summed into 4 levels of accumulators that are
/// folded upwards every `2^level_power` rows.
fn multi_row_sum(x: &[f32], width: usize, rows: usize) -> Vec<Vec<f32>> {
    const LEVELS: usize = 4;
    let ceil_log2 = |n: usize| {
        if n <= 1 {
            0
        } else {
            (usize::BITS - (n - 1).leading_zeros()) as usize
        }
    };
    let power = 4.max(ceil_log2(rows) / LEVELS);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = vec![vec![vec![0f32; width]; 4]; LEVELS];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                let e = (i * 4 + k) * width;
                add_lanes(a, &x[e..e + width]);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(above[0].iter_mut()) {
                add_lanes(upper, lower);
                lower.fill(0.0);
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            let e = (i * 4 + k) * width;
            add_lanes(a, &x[e..e + width]);
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, upper) in first[0].iter_mut().zip(level) {
            add_lanes(a, upper);
        }
    }
    acc.swap_remove(0)
}

fn add_lanes(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect()
}

/// The CPU kernel's table: entry `i` is the number of code midpoints strictly below
/// `-1 + 2i/65535` (f32), i.e. the code nearest to that grid point.
fn lookup_table(code: &[f32]) -> Vec<u8> {
    let mids = midpoints(code);
    (0..65536u32)
        .map(|i| {
            let x = -1.0f32 + 2.0f32 * i as f32 / 65535.0f32;
            mids.partition_point(|&m| m < x) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_the_first_element_in_the_high_nibble() {
        let (packed, absmax) = quantize_blocks(&[-1.0, 1.0, 0.0, 0.5, 0.25], 4);
        assert_eq!(absmax, vec![1.0, 0.25]);
        // -1 → 0, 1 → 15, 0 → 7, 0.5 → 12 (nearest to 0.5626 vs 0.4407); 0.25/0.25 = 1 → 15.
        assert_eq!(packed, vec![0x0F, 0x7C, 0xF0]);
    }

    /// The binary searches in `quantize_blocks` and `lookup_table` count the midpoints below
    /// a value only if the code books ascend.
    #[test]
    fn both_code_books_ascend() {
        for code in [NF4_CODE.to_vec(), dynamic_map_signed()] {
            assert!(code.windows(2).all(|w| w[0] < w[1]), "{code:?}");
        }
    }

    #[test]
    fn torch_sum_matches_plain_sums_on_exact_values() {
        // Small integers add exactly in any order.
        for n in [0, 3, 8, 100, 1000, 70_000] {
            let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let expected: f32 = v.iter().map(|&x| x as f64).sum::<f64>() as f32;
            assert_eq!(torch_sum_f32(&v), expected, "n = {n}");
        }
    }

    #[test]
    fn dynamic_map_is_sorted_signed_and_complete() {
        let m = dynamic_map_signed();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*m.last().unwrap(), 1.0);
        assert!(m.contains(&0.0));
    }
}

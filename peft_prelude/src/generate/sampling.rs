//! Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

use super::config::GenerationConfig;
pub use crate::rng::Rng;

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token already in the sequence has
/// its logit divided by the penalty if positive, multiplied if negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            if done.insert(id) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
}

/// Index of the largest logit (the first one on ties, as torch's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token for one sequence.
pub fn sample(logits: &mut [f32], seen: &[u32], cfg: &GenerationConfig, rng: &mut Rng) -> u32 {
    apply_repetition_penalty(logits, seen, cfg.repetition_penalty);
    if !cfg.do_sample {
        return argmax(logits);
    }
    let inv_t = 1.0 / cfg.temperature as f32;
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l * inv_t))
        .collect();
    if candidates.is_empty() {
        return argmax(logits);
    }
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    if cfg.top_k > 0 {
        candidates.truncate(cfg.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|(_, l)| ((l - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return candidates[i].0;
        }
        r -= p;
    }
    candidates[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(do_sample: bool, top_k: usize, top_p: f64, temperature: f64) -> GenerationConfig {
        GenerationConfig {
            do_sample,
            top_k,
            top_p,
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(
            sample(&mut l, &[], &cfg(false, 0, 1.0, 1.0), &mut Rng::new(0)),
            1
        );
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_the_support() {
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            let mut l = vec![0.0, 5.0, 4.9, -3.0];
            assert_eq!(sample(&mut l, &[], &cfg(true, 1, 1.0, 1.0), &mut rng), 1);
        }
        // probabilities ≈ [0.0035, 0.522, 0.472, 0.0002]: top_p 0.9 keeps tokens 1 and 2,
        // top_p 0.5 keeps token 1 alone (its mass already reaches 0.5, as transformers does).
        let mut counts = [0usize; 4];
        for _ in 0..2000 {
            let mut l = vec![0.0, 5.0, 4.9, -3.0];
            counts[sample(&mut l, &[], &cfg(true, 0, 0.9, 1.0), &mut rng) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[3], 0, "{counts:?}");
        assert!(counts[1] > 900 && counts[2] > 800, "{counts:?}");
        for _ in 0..200 {
            let mut l = vec![0.0, 5.0, 4.9, -3.0];
            assert_eq!(sample(&mut l, &[], &cfg(true, 0, 0.5, 1.0), &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // logits ln(1), ln(3): expect a 1:3 split
        let mut rng = Rng::new(1);
        let mut ones = 0;
        for _ in 0..4000 {
            let mut l = vec![0.0, 3f32.ln()];
            ones += sample(&mut l, &[], &cfg(true, 0, 1.0, 1.0), &mut rng) as usize;
        }
        let frac = ones as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }
}

//! Token sampling from logits: repeat penalty, greedy, top-k, temperature, top-p, min-p,
//! with a seeded generator so equal seeds give equal outputs.

use flywheel_api::{SamplingParams, TokenLogprob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Picks the next token from a logits vector.
pub struct Sampler {
    p: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `p.seed`.
    pub fn new(p: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(p.seed);
        Self { p, rng }
    }

    /// Chooses a token; `history` is the prompt and generated tokens so far (for the repeat penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        self.pick(logits)
    }

    /// Whether top-k, top-p or min-p cut the distribution (they rank tokens against each other,
    /// so removing tokens first changes what they keep). Greedy never counts as cutting.
    pub fn truncates(&self) -> bool {
        let greedy = self.p.temperature == 0.0 || self.p.top_k == 1;
        !greedy && (self.p.top_k > 0 || self.p.top_p < 1.0 || self.p.min_p > 0.0)
    }

    /// Applies the repeat penalty to the logits of tokens in the recent `history`.
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        repeat_penalty(logits, history, self.p.repeat_last_n, self.p.repeat_penalty);
    }

    /// Chooses a token from already penalized logits (greedy, or top-k, temperature, top-p and
    /// min-p, then a seeded draw).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.p.temperature == 0.0 || self.p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.p.top_k > 0 && self.p.top_k < cand.len() {
            cand.truncate(self.p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|(_, l)| ((l - max) / self.p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.p.min_p > 0.0 {
            let floor = probs[0] * self.p.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[keep - 1].0
    }
}

/// Divides the positive logits (multiplies the negative ones) of the distinct tokens among the
/// last `last_n` of `history` by `penalty`, as llama.cpp's repeat penalty does.
pub fn repeat_penalty(logits: &mut [f32], history: &[u32], last_n: usize, penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &t in &history[history.len().saturating_sub(last_n)..] {
        if let Some(l) = logits.get_mut(t as usize).filter(|_| seen.insert(t)) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// The log-probability of `tok` under `softmax(logits)` and the `top` most likely tokens,
/// most likely first (ties by id). Masked logits (-inf) get no probability.
pub fn token_logprob(logits: &[f32], tok: u32, top: usize) -> TokenLogprob {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: over a 150k vocabulary f32 loses digits the 1e-3 contract needs.
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    let log_z = max as f64 + sum.ln();
    let lp = |l: f32| {
        if l.is_finite() {
            (l as f64 - log_z) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() || (best.len() == top && l <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprob {
        token: tok,
        logprob: lp(logits
            .get(tok as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)),
        top: best.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 7,
        }
    }

    #[test]
    fn greedy_is_argmax_and_top_k_one_is_greedy() {
        let mut l = vec![0.1, 2.0, -1.0, 1.9];
        assert_eq!(Sampler::new(params(0.0)).sample(&mut l.clone(), &[]), 1);
        let p = SamplingParams {
            top_k: 1,
            ..params(1.0)
        };
        assert_eq!(Sampler::new(p).sample(&mut l, &[]), 1);
    }

    #[test]
    fn equal_seeds_give_equal_sequences_and_sampling_follows_probabilities() {
        let logits = vec![1.0f32, 1.0, 1.0, 1.0];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..200)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        let counts = draw(3).iter().fold([0usize; 4], |mut c, &t| {
            c[t as usize] += 1;
            c
        });
        assert!(
            counts.iter().all(|&c| c > 25),
            "uniform logits should hit every token: {counts:?}"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ≈ [0.64, 0.24, 0.09, 0.03]
        let logits = vec![3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.6,
            ..params(1.0)
        });
        assert!((0..100).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.3,
            ..params(1.0)
        });
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) <= 1));
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) <= 1));
    }

    #[test]
    fn logprobs_are_a_normalized_log_softmax_with_sorted_alternatives() {
        let logits = vec![1.0f32, 3.0, f32::NEG_INFINITY, 3.0, 0.5];
        let lp = token_logprob(&logits, 4, 3);
        let total: f32 = [1.0f32, 3.0, 3.0, 0.5]
            .iter()
            .map(|l| (l + lp.logprob - 0.5).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 0],
            "sorted, ties by id"
        );
        assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 > lp.top[2].1);
        assert!((lp.top[0].1 - (lp.logprob + 2.5)).abs() < 1e-5);
        assert_eq!(token_logprob(&logits, 2, 0).logprob, f32::NEG_INFINITY);
        assert!(token_logprob(&logits, 2, 0).top.is_empty());
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let mut l = vec![2.0f32, 1.9];
        let p = SamplingParams {
            repeat_penalty: 1.5,
            ..params(0.0)
        };
        assert_eq!(Sampler::new(p).sample(&mut l, &[0]), 1);
    }
}

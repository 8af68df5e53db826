//! The learning-rate schedule (warmup, then cosine, linear or constant) and the seeded data
//! order: shuffling and greedy packing of examples into sequences.

use flywheel_peft::splitmix;

use crate::data::Example;
use crate::recipe::{Recipe, ScheduleKind};

/// The learning rate at 0-based step `s` of `total` under the recipe's schedule.
pub fn lr_at(recipe: &Recipe, total: usize, s: usize) -> f64 {
    let sch = &recipe.schedule;
    let peak = recipe.optimizer.lr;
    let warm = if sch.warmup_steps > 0 {
        sch.warmup_steps
    } else {
        (sch.warmup_ratio * total as f64).round() as usize
    };
    if s < warm {
        return peak * (s + 1) as f64 / warm as f64;
    }
    let decay_steps = total.saturating_sub(warm).max(1);
    let progress = ((s - warm) as f64 / decay_steps as f64).min(1.0);
    let floor = sch.min_lr_ratio;
    let f = match sch.kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => floor + (1.0 - floor) * (1.0 - progress),
        ScheduleKind::Cosine => {
            floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    peak * f
}

/// Fisher–Yates with a SplitMix stream.
pub(super) fn shuffle(v: &mut [usize], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Greedy packing of shuffled examples into sequences of at most `max_len` tokens.
pub(super) fn pack(examples: Vec<Example>, max_len: usize, seed: u64) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut order, seed ^ 0x9AC0);
    let mut out: Vec<Example> = Vec::new();
    let mut cur = Example {
        ids: Vec::new(),
        loss: Vec::new(),
    };
    for i in order {
        let e = &examples[i];
        if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() > max_len {
            out.push(std::mem::replace(
                &mut cur,
                Example {
                    ids: Vec::new(),
                    loss: Vec::new(),
                },
            ));
        }
        cur.ids.extend_from_slice(&e.ids);
        // The first token of a packed example is not predicted from the previous example.
        cur.loss.push(false);
        cur.loss.extend_from_slice(&e.loss[1..]);
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_and_decay() {
        let mut r = Recipe::default();
        r.optimizer.lr = 1.0;
        r.schedule.warmup_steps = 4;
        let lr: Vec<f64> = (0..14).map(|s| lr_at(&r, 14, s)).collect();
        assert_eq!(&lr[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!(lr.windows(2).skip(4).all(|w| w[1] <= w[0]), "{lr:?}");
        assert!(lr[13] < 0.05);
        r.schedule.kind = ScheduleKind::Linear;
        assert!((lr_at(&r, 14, 9) - 0.5).abs() < 1e-9);
        r.schedule.kind = ScheduleKind::Constant;
        assert_eq!(lr_at(&r, 14, 13), 1.0);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<usize> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 3);
        shuffle(&mut b, 3);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn packing_respects_the_length_and_keeps_targets() {
        let ex = |n: usize| Example {
            ids: (0..n as u32).collect(),
            loss: (0..n).map(|i| i >= n / 2).collect(),
        };
        let packed = pack(vec![ex(4), ex(5), ex(6), ex(3)], 10, 1);
        assert!(packed.iter().all(|e| e.ids.len() <= 10));
        assert_eq!(packed.iter().map(|e| e.ids.len()).sum::<usize>(), 18);
        assert!(packed.len() < 4);
    }
}

//! Statistics: percentile-bootstrap confidence intervals of a mean, and McNemar's exact test
//! of two configurations answering the same questions.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Percentile bootstrap 95% interval of the mean of `values` with `resamples` resamples from a seeded `StdRng` (ChaCha); empty -> (0, 0), one value v -> (v, v).
///
/// Deterministic for a seed. The bounds are the 2.5th and 97.5th percentiles (linear
/// interpolation) of the resampled means; with `resamples == 0` both bounds are the mean.
pub fn bootstrap_ci(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let n = values.len();
    match values {
        [] => return (0.0, 0.0),
        [v] => return (*v, *v),
        _ => {}
    }
    if resamples == 0 {
        let mean = values.iter().sum::<f64>() / n as f64;
        return (mean, mean);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let sum: f64 = (0..n).map(|_| values[rng.random_range(0..n)]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    (percentile(&means, 0.025), percentile(&means, 0.975))
}

/// The `p`-quantile (0..=1) of sorted, non-empty `sorted` with linear interpolation.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    let pos = p * last as f64;
    let lo = (pos.floor() as usize).min(last);
    let hi = (pos.ceil() as usize).min(last);
    let (a, b) = (
        sorted.get(lo).copied().unwrap_or(0.0),
        sorted.get(hi).copied().unwrap_or(0.0),
    );
    if lo == hi {
        a
    } else {
        a + (b - a) * (pos - lo as f64)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_examples() {
        assert_eq!(bootstrap_ci(&[], 100, 1), (0.0, 0.0));
        assert_eq!(bootstrap_ci(&[0.7], 100, 1), (0.7, 0.7));
        assert_eq!(bootstrap_ci(&[1.0; 20], 500, 3), (1.0, 1.0));
        let values: Vec<f64> = (0..50)
            .map(|i| if i % 3 == 0 { 1.0 } else { 0.0 })
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let a = bootstrap_ci(&values, 1000, 42);
        assert_eq!(a, bootstrap_ci(&values, 1000, 42));
        assert_ne!(a, bootstrap_ci(&values, 1000, 43));
        assert!(a.0 < mean && mean < a.1, "{a:?} around {mean}");
        assert!(a.0 >= 0.0 && a.1 <= 1.0);
        assert_eq!(bootstrap_ci(&[1.0, 3.0], 0, 1), (2.0, 2.0));
        let _ = bootstrap_ci(&[f64::NAN, 1.0], 10, 1);
    }
}

/// McNemar's exact test (two-sided): the p-value that two configurations right and wrong on the
/// same questions differ, from the discordant pairs only: `b` questions only the first got
/// right, `c` only the second. It is the binomial test of `min(b, c)` successes in `b + c`
/// trials at one half, doubled and capped at 1; no discordant pair gives 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // ln C(n, i) - n ln 2, summed over i <= k in log space (n may run to thousands).
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - ln2n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod mcnemar_tests {
    use super::mcnemar_exact;

    #[test]
    fn hand_computed_cases() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // n = 1: 2 * 1/2 = 1.
        assert_eq!(mcnemar_exact(1, 0), 1.0);
        // b = 0, c = 5: 2 * (1/2)^5 = 1/16.
        assert!(close(mcnemar_exact(0, 5), 0.0625));
        assert!(close(mcnemar_exact(5, 0), 0.0625));
        // b = 1, c = 9: 2 * (1 + 10) / 1024.
        assert!(close(mcnemar_exact(1, 9), 22.0 / 1024.0));
        // b = 2, c = 8: 2 * (1 + 10 + 45) / 1024.
        assert!(close(mcnemar_exact(8, 2), 112.0 / 1024.0));
        // Balanced: capped at 1.
        assert_eq!(mcnemar_exact(6, 6), 1.0);
        // Large n stays finite and tiny: 0 vs 2000.
        let p = mcnemar_exact(0, 2000);
        assert!((0.0..1e-300).contains(&p));
        // b = 40, c = 60: scipy.stats.binomtest(40, 100).pvalue = 0.056887933640980...
        assert!((mcnemar_exact(40, 60) - 0.056_887_933_640_98).abs() < 1e-9);
    }
}

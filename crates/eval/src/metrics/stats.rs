//! Statistics: percentile-bootstrap confidence intervals of a mean.

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

//! Ranked-list retrieval metrics, the one implementation `flywheel rag eval` and the eval
//! harness's retrieval rungs share: the rank of the first relevant item, nDCG, recall@k and
//! reciprocal rank, and Ragas context precision. Inputs are relevance flags in rank order.

/// The rank (from 1) of the first relevant item among the first `cutoff` of `relevant`.
pub fn first_relevant(relevant: &[bool], cutoff: usize) -> Option<usize> {
    relevant.iter().take(cutoff).position(|&g| g).map(|p| p + 1)
}

/// nDCG@`cutoff` with binary relevance, against an ideal list holding `gold_total` relevant
/// items (0.0 when there are none).
pub fn ndcg(relevant: &[bool], gold_total: usize, cutoff: usize) -> f64 {
    let dcg: f64 = relevant
        .iter()
        .take(cutoff)
        .enumerate()
        .filter(|(_, &g)| g)
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum();
    let ideal: f64 = (0..gold_total.min(cutoff))
        .map(|i| 1.0 / ((i + 2) as f64).log2())
        .sum();
    if ideal > 0.0 {
        dcg / ideal
    } else {
        0.0
    }
}

/// Ragas context precision: sum over ranks k of precision@k · v_k divided by the number of relevant items; 0.0 when nothing is relevant, None for an empty list.
pub fn context_precision(relevant: &[bool]) -> Option<f64> {
    if relevant.is_empty() {
        return None;
    }
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (i, &r) in relevant.iter().enumerate() {
        if r {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    Some(if hits == 0 { 0.0 } else { sum / hits as f64 })
}

/// Recall@k and reciprocal rank of the first relevant item among the first `k` of `ranked` (gold flags in rank order), given the number of gold items in total.
///
/// recall = relevant found in the first k / gold_total (0 when gold_total is 0, at most 1);
/// rr = 1/rank of the first relevant item within the first k, else 0.
pub fn recall_and_rr(ranked: &[bool], k: usize, gold_total: usize) -> (f64, f64) {
    let top = &ranked[..k.min(ranked.len())];
    let found = top.iter().filter(|&&r| r).count();
    let recall = if gold_total == 0 {
        0.0
    } else {
        (found as f64 / gold_total as f64).min(1.0)
    };
    let rr = top
        .iter()
        .position(|&r| r)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64);
    (recall, rr)
}
#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn first_relevant_and_ndcg_examples() {
        assert_eq!(first_relevant(&[false, true, true], 10), Some(2));
        assert_eq!(first_relevant(&[false, true], 1), None);
        assert_eq!(first_relevant(&[], 10), None);
        assert!(close(ndcg(&[true], 1, 10), 1.0));
        assert!(close(ndcg(&[false, false], 0, 10), 0.0));
        // Relevant at rank 2 of 1 gold: (1/log2 3) / 1.
        assert!(close(ndcg(&[false, true], 1, 10), 1.0 / 3f64.log2()));
    }

    #[test]
    fn context_precision_examples() {
        assert_eq!(context_precision(&[]), None);
        assert_eq!(context_precision(&[false, false]), Some(0.0));
        assert_eq!(context_precision(&[true, true]), Some(1.0));
        // Relevant at ranks 1 and 3: (1/1 + 2/3) / 2 = 5/6.
        assert!(close(
            context_precision(&[true, false, true]).unwrap_or(-1.0),
            5.0 / 6.0
        ));
        // Relevant at rank 2 only: (1/2) / 1.
        assert!(close(
            context_precision(&[false, true, false]).unwrap_or(-1.0),
            0.5
        ));
    }

    #[test]
    fn recall_and_rr_examples() {
        let ranked = [false, true, false, true];
        assert_eq!(recall_and_rr(&ranked, 1, 2), (0.0, 0.0));
        assert_eq!(recall_and_rr(&ranked, 2, 2), (0.5, 0.5));
        assert_eq!(recall_and_rr(&ranked, 10, 2), (1.0, 0.5));
        assert_eq!(recall_and_rr(&ranked, 4, 4), (0.5, 0.5));
        assert_eq!(recall_and_rr(&ranked, 4, 0), (0.0, 0.5));
        assert_eq!(recall_and_rr(&[], 5, 3), (0.0, 0.0));
        assert_eq!(recall_and_rr(&[true, true], 2, 1), (1.0, 1.0));
        assert_eq!(recall_and_rr(&[true], 0, 1), (0.0, 0.0));
    }
}

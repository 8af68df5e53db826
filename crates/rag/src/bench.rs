//! The query-latency benchmark behind `flywheel rag bench-latency` (and so
//! scripts/bench-rag.sh): p50/p95 search latency per mode over a [`crate::synthetic`] store,
//! with queries embedded for real.

use std::path::Path;
use std::time::Instant;

use flywheel_runtime::EmbeddingModel;
use serde::Serialize;

use crate::synthetic::{synthetic, synthetic_queries};
use crate::{DenseIndex, Mode, Result, SearchOptions, Searcher, Store};

/// The modes measured, in order.
pub const MODES: [Mode; 3] = [Mode::Dense, Mode::Bm25, Mode::Hybrid];

/// Seed of the synthetic stores' chunks and vectors.
const STORE_SEED: u64 = 7;
/// Seed of the synthetic queries.
const QUERY_SEED: u64 = 11;

/// One store size and mode: what [`LatencyBench::measure`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// Chunks in the store.
    pub chunks: usize,
    /// The search mode's name.
    pub mode: &'static str,
    /// Queries timed.
    pub queries: usize,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 95th-percentile latency, milliseconds.
    pub p95_ms: f64,
    /// Whether an HNSW graph answered the dense part.
    pub hnsw: bool,
    /// Seconds it took to build the store, when it was built by this run (not reused).
    pub store_build_s: Option<f64>,
}

/// A synthetic store of one size, opened for timing queries against it.
pub struct LatencyBench {
    chunks: usize,
    store: Store,
    dense: DenseIndex,
    build_s: Option<f64>,
    queries: Vec<String>,
}

impl LatencyBench {
    /// Builds (or reuses) `dir/synthetic-{chunks}.sqlite` with `dim`-wide vectors and an HNSW
    /// graph from `ann_threshold` chunks on (as `rag index` does), and makes `queries`
    /// synthetic queries.
    pub fn open(
        dir: &Path,
        chunks: usize,
        dim: usize,
        ann_threshold: usize,
        queries: usize,
    ) -> Result<Self> {
        let path = dir.join(format!("synthetic-{chunks}.sqlite"));
        let t = Instant::now();
        let built = synthetic(&path, chunks, dim, ann_threshold, STORE_SEED)?;
        let build_s = built.then(|| t.elapsed().as_secs_f64());
        let store = Store::open_existing(&path)?;
        let dense = DenseIndex::load(&store)?;
        Ok(Self {
            chunks,
            store,
            dense,
            build_s,
            queries: synthetic_queries(queries, QUERY_SEED),
        })
    }

    /// Times every query once in `mode` (top 10), after one warm-up query.
    pub fn measure(&self, embedder: &EmbeddingModel, mode: Mode) -> Result<LatencyRow> {
        let searcher = Searcher::new(&self.store, &self.dense, embedder);
        let opts = SearchOptions {
            mode,
            top_k: 10,
            ..SearchOptions::default()
        };
        searcher.search(&self.queries[0], &opts)?;
        let mut times = Vec::with_capacity(self.queries.len());
        for q in &self.queries {
            let t = Instant::now();
            let r = searcher.search(q, &opts)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            std::hint::black_box(r);
        }
        times.sort_by(f64::total_cmp);
        Ok(LatencyRow {
            chunks: self.chunks,
            mode: mode.name(),
            queries: times.len(),
            p50_ms: percentile(&times, 0.5),
            p95_ms: percentile(&times, 0.95),
            hnsw: self.dense.has_ann(),
            store_build_s: self.build_s,
        })
    }
}

/// The `p` quantile (0..=1) of sorted `times`, to the nearest rank. Panics when empty.
fn percentile(times: &[f64], p: f64) -> f64 {
    times[((times.len() as f64 - 1.0) * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let t: Vec<f64> = (1..=21).map(f64::from).collect();
        assert_eq!(percentile(&t, 0.5), 11.0);
        assert_eq!(percentile(&t, 0.95), 20.0);
        assert_eq!(percentile(&[4.0], 0.95), 4.0);
    }
}

//! Search: dense (exact SIMD scan, or HNSW above a size threshold), BM25 (SQLite FTS5), hybrid
//! by reciprocal-rank fusion, metadata filters, MMR diversity, HyDE, query decomposition and
//! reranking. The dense side sits behind [`DenseBackend`] so a networked vector database can
//! take the embedded index's place.

use std::collections::{HashMap, HashSet};

use flywheel_api::RetrievedChunk;
use flywheel_runtime::EmbeddingModel;
use serde::{Deserialize, Serialize};

use crate::llm::{Llm, Reranker};
use crate::store::{Store, Vectors};
use crate::{Error, Result};

/// Which ranking a search uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cosine similarity of embeddings.
    Dense,
    /// BM25 over words (SQLite FTS5, Porter stemming).
    Bm25,
    /// Dense and BM25 fused by reciprocal rank.
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(Self::Dense),
            "bm25" => Ok(Self::Bm25),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(Error::BadOption {
                option: "mode",
                reason: format!("`{s}` (expected dense, bm25 or hybrid)"),
            }),
        }
    }
}

impl Mode {
    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Bm25 => "bm25",
            Self::Hybrid => "hybrid",
        }
    }
}

/// Metadata filters; all must hold. Written `key=glob`: `path=guides/*`, `kind=html`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    path: Option<globset::GlobMatcher>,
    kind: Option<globset::GlobMatcher>,
    text: Vec<String>,
}

impl Filter {
    /// Parses filters such as `path=guides/*` or `kind=markdown`.
    pub fn parse(specs: &[String]) -> Result<Self> {
        let mut f = Filter::default();
        for spec in specs {
            let (key, pat) = spec.split_once('=').ok_or_else(|| Error::BadOption {
                option: "filter",
                reason: format!("`{spec}` is not key=pattern (e.g. path=guides/*)"),
            })?;
            let glob = globset::GlobBuilder::new(pat.trim())
                .literal_separator(false)
                .build()
                .map_err(|e| Error::BadOption {
                    option: "filter",
                    reason: format!("`{spec}`: {e}"),
                })?
                .compile_matcher();
            match key.trim() {
                "path" => f.path = Some(glob),
                "kind" => f.kind = Some(glob),
                other => {
                    return Err(Error::BadOption {
                        option: "filter",
                        reason: format!("unknown key `{other}` in `{spec}` (known: path, kind)"),
                    })
                }
            }
            f.text.push(spec.clone());
        }
        Ok(f)
    }

    /// True when no filter is set.
    pub fn is_empty(&self) -> bool {
        self.path.is_none() && self.kind.is_none()
    }

    /// The documents of `store` that pass, or `None` when there is no filter.
    pub fn allowed_docs(&self, store: &Store) -> Result<Option<Vec<i64>>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut ids: Vec<i64> = store
            .documents()?
            .into_values()
            .filter(|d| {
                self.path.as_ref().is_none_or(|g| g.is_match(&d.path))
                    && self.kind.as_ref().is_none_or(|g| g.is_match(&d.kind))
            })
            .map(|d| d.id)
            .collect();
        ids.sort_unstable();
        Ok(Some(ids))
    }
}

/// A dense vector index: exact, approximate, or remote.
pub trait DenseBackend {
    /// The `k` chunks most similar to `query` (a unit vector), best first, as
    /// `(chunk id, cosine)`; `allowed` limits the documents considered.
    fn search(&self, query: &[f32], k: usize, allowed: Option<&HashSet<i64>>) -> Vec<(i64, f32)>;
    /// The stored vector of a chunk, when the backend keeps vectors locally (MMR uses it).
    fn vector(&self, chunk: i64) -> Option<&[f32]>;
    /// How many vectors are indexed.
    fn len(&self) -> usize;
    /// True when nothing is indexed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A point of the HNSW graph: a unit vector, distance `1 − cosine`.
#[derive(Clone, Serialize, Deserialize)]
pub struct AnnPoint(pub Vec<f32>);

impl instant_distance::Point for AnnPoint {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - flywheel_kernels::dot_f32(&self.0, &other.0)
    }
}

/// The HNSW map type stored in a store.
pub type AnnMap = instant_distance::HnswMap<AnnPoint, i64>;

/// Builds an HNSW graph over `v` (deterministic for a given store).
pub fn build_ann(v: &Vectors) -> AnnMap {
    let points: Vec<AnnPoint> = (0..v.ids.len())
        .map(|i| AnnPoint(v.data[i * v.dim..(i + 1) * v.dim].to_vec()))
        .collect();
    instant_distance::Builder::default()
        .seed(0x5eed)
        .ef_search(128)
        .build(points, v.ids.clone())
}

/// The embedded dense index: every vector in memory (exact scan), plus the stored HNSW graph
/// when the store has one.
pub struct DenseIndex {
    v: Vectors,
    row_of: HashMap<i64, usize>,
    ann: Option<AnnMap>,
}

impl DenseIndex {
    /// Loads the vectors (and HNSW graph, if any) of a store.
    pub fn load(store: &Store) -> Result<Self> {
        let v = store.vectors()?;
        let ann = match store.ann_blob()? {
            Some(blob) => {
                Some(
                    bincode::deserialize::<AnnMap>(&blob).map_err(|e| Error::Store {
                        path: store.path().display().to_string(),
                        reason: format!(
                            "stored HNSW graph is unreadable ({e}); re-run `rag index --rebuild`"
                        ),
                    })?,
                )
            }
            None => None,
        };
        Ok(Self::from_vectors(v, ann))
    }

    /// An index over the given vectors.
    pub fn from_vectors(v: Vectors, ann: Option<AnnMap>) -> Self {
        let row_of = v.ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Self { v, row_of, ann }
    }

    /// Whether an HNSW graph answers unfiltered queries.
    pub fn has_ann(&self) -> bool {
        self.ann.is_some()
    }

    /// Exact top-k by a scan over every (allowed) vector.
    pub fn search_exact(
        &self,
        q: &[f32],
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Vec<(i64, f32)> {
        let d = self.v.dim;
        if d == 0 || q.len() != d {
            return Vec::new();
        }
        let mut scored: Vec<(f32, usize)> = (0..self.v.ids.len())
            .filter(|&i| allowed.is_none_or(|a| a.contains(&self.v.docs[i])))
            .map(|i| {
                (
                    flywheel_kernels::dot_f32(q, &self.v.data[i * d..(i + 1) * d]),
                    i,
                )
            })
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        let cmp = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < scored.len() {
            scored.select_nth_unstable_by(k - 1, cmp);
            scored.truncate(k);
        }
        scored.sort_by(cmp);
        scored
            .into_iter()
            .map(|(s, i)| (self.v.ids[i], s))
            .collect()
    }
}

impl DenseBackend for DenseIndex {
    fn search(&self, q: &[f32], k: usize, allowed: Option<&HashSet<i64>>) -> Vec<(i64, f32)> {
        match (&self.ann, allowed) {
            // Filtered queries scan exactly: a graph walk cannot skip filtered-out nodes cheaply.
            (Some(ann), None) => {
                let mut s = instant_distance::Search::default();
                ann.search(&AnnPoint(q.to_vec()), &mut s)
                    .take(k)
                    .map(|m| (*m.value, 1.0 - m.distance))
                    .collect()
            }
            _ => self.search_exact(q, k, allowed),
        }
    }

    fn vector(&self, chunk: i64) -> Option<&[f32]> {
        let d = self.v.dim;
        self.row_of
            .get(&chunk)
            .map(|&i| &self.v.data[i * d..(i + 1) * d])
    }

    fn len(&self) -> usize {
        self.v.ids.len()
    }
}

/// Reciprocal-rank fusion: each list adds `1 / (k + rank)` (rank from 1) to its items' scores.
/// Ties keep the order of first appearance.
pub fn rrf(lists: &[Vec<i64>], k: f32) -> Vec<(i64, f32)> {
    let mut score: HashMap<i64, (f32, usize)> = HashMap::new();
    let mut seen = 0usize;
    for list in lists {
        for (r, &id) in list.iter().enumerate() {
            let e = score.entry(id).or_insert_with(|| {
                seen += 1;
                (0.0, seen)
            });
            e.0 += 1.0 / (k + (r + 1) as f32);
        }
    }
    let mut out: Vec<(i64, f32, usize)> =
        score.into_iter().map(|(id, (s, o))| (id, s, o)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    out.into_iter().map(|(id, s, _)| (id, s)).collect()
}

/// Maximal marginal relevance: picks `k` of `candidates` (with their relevance), trading
/// relevance against similarity to what is already picked; `lambda = 1` is pure relevance.
pub fn mmr(
    candidates: &[(i64, f32)],
    vector: &dyn Fn(i64) -> Option<Vec<f32>>,
    k: usize,
    lambda: f32,
) -> Vec<(i64, f32)> {
    let vecs: Vec<Option<Vec<f32>>> = candidates.iter().map(|(id, _)| vector(*id)).collect();
    let mut picked: Vec<usize> = Vec::new();
    let mut left: Vec<usize> = (0..candidates.len()).collect();
    while picked.len() < k && !left.is_empty() {
        let (pos, _) = left
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                let redundancy = picked
                    .iter()
                    .filter_map(|&j| match (&vecs[i], &vecs[j]) {
                        (Some(a), Some(b)) => Some(flywheel_kernels::dot_f32(a, b)),
                        _ => None,
                    })
                    .fold(0.0f32, f32::max);
                (pos, lambda * candidates[i].1 - (1.0 - lambda) * redundancy)
            })
            .fold((0usize, f32::NEG_INFINITY), |best, c| {
                if c.1 > best.1 {
                    c
                } else {
                    best
                }
            });
        picked.push(left.remove(pos));
    }
    picked.into_iter().map(|i| candidates[i]).collect()
}

/// How to search.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// The ranking.
    pub mode: Mode,
    /// How many results.
    pub top_k: usize,
    /// Add a hypothetical answer's embedding to the query's (needs a generator).
    pub hyde: bool,
    /// Split a multi-part question into sub-questions and fuse their results (needs a generator).
    pub decompose: bool,
    /// Rerank the top candidates by the generator's yes/no relevance judgement.
    pub rerank: bool,
    /// How many candidates the reranker sees.
    pub rerank_candidates: usize,
    /// MMR diversity: `Some(lambda)` in [0, 1].
    pub mmr: Option<f32>,
    /// Metadata filters.
    pub filter: Filter,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Hybrid,
            top_k: 5,
            hyde: false,
            decompose: false,
            rerank: false,
            rerank_candidates: 20,
            mmr: None,
            filter: Filter::default(),
        }
    }
}

/// What a search found, and how.
#[derive(Debug, Clone, Default)]
pub struct SearchResult {
    /// The passages, best first.
    pub hits: Vec<RetrievedChunk>,
    /// The hypothetical answer HyDE embedded.
    pub hyde_text: Option<String>,
    /// The sub-questions searched (decomposition), when there was more than one.
    pub sub_queries: Vec<String>,
    /// The query's unit embedding (the HyDE-combined one when HyDE ran); empty for BM25 alone.
    pub query_vector: Vec<f32>,
}

/// Chunk ids with scores, best first.
type Ranked = Vec<(i64, f32)>;

/// Searches one store with one embedding model and, optionally, a generator.
pub struct Searcher<'a> {
    store: &'a Store,
    dense: &'a dyn DenseBackend,
    embedder: &'a EmbeddingModel,
    llm: Option<&'a Llm<'a>>,
    reranker: Option<&'a dyn Reranker>,
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl<'a> Searcher<'a> {
    /// A searcher over `store` using `dense` for vectors and `embedder` for queries.
    pub fn new(
        store: &'a Store,
        dense: &'a dyn DenseBackend,
        embedder: &'a EmbeddingModel,
    ) -> Self {
        Self {
            store,
            dense,
            embedder,
            llm: None,
            reranker: None,
        }
    }

    /// Adds the generator used by HyDE and decomposition.
    pub fn with_llm(mut self, llm: &'a Llm<'a>) -> Self {
        self.llm = Some(llm);
        self
    }

    /// Adds the reranker.
    pub fn with_reranker(mut self, r: &'a dyn Reranker) -> Self {
        self.reranker = Some(r);
        self
    }

    /// The store searched.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// The unit embedding of a query.
    pub fn embed_query(&self, text: &str) -> Result<Vec<f32>> {
        self.embed_one(text)
    }

    /// Cosine similarity of a query vector to a stored chunk (when vectors are local).
    pub fn similarity(&self, query: &[f32], chunk: i64) -> Option<f32> {
        self.dense
            .vector(chunk)
            .filter(|v| v.len() == query.len())
            .map(|v| flywheel_kernels::dot_f32(query, v))
    }

    fn embed_one(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self
            .embedder
            .embed_batch(&[text])?
            .pop()
            .expect("one text gives one vector"))
    }

    /// One query's ranked chunk ids (before rerank/MMR) and its query vector.
    fn rank(
        &self,
        query: &str,
        hyde: Option<&str>,
        mode: Mode,
        n: usize,
        allowed: Option<&HashSet<i64>>,
        allowed_vec: Option<&[i64]>,
    ) -> Result<(Ranked, Vec<f32>)> {
        let mut qv = Vec::new();
        let dense = if mode != Mode::Bm25 {
            qv = self.embed_one(query)?;
            if let Some(h) = hyde {
                let hv = self.embed_one(h)?;
                qv.iter_mut().zip(&hv).for_each(|(a, b)| *a += b);
                normalize(&mut qv);
            }
            self.dense.search(&qv, n, allowed)
        } else {
            Vec::new()
        };
        let bm25 = if mode != Mode::Dense {
            self.store.bm25(query, n, allowed_vec)?
        } else {
            Vec::new()
        };
        let ranked = match mode {
            Mode::Dense => dense,
            Mode::Bm25 => bm25,
            Mode::Hybrid => rrf(
                &[
                    dense.iter().map(|x| x.0).collect(),
                    bm25.iter().map(|x| x.0).collect(),
                ],
                60.0,
            ),
        };
        Ok((ranked, qv))
    }

    /// Runs a search.
    pub fn search(&self, query: &str, opts: &SearchOptions) -> Result<SearchResult> {
        if opts.top_k == 0 {
            return Err(Error::BadOption {
                option: "top-k",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(l) = opts.mmr {
            if !(0.0..=1.0).contains(&l) {
                return Err(Error::BadOption {
                    option: "mmr",
                    reason: format!("{l} (must be in [0, 1])"),
                });
            }
        }
        let need_llm = opts.hyde || opts.decompose;
        let llm = match (need_llm, self.llm) {
            (true, None) => {
                return Err(Error::BadOption {
                    option: if opts.hyde { "hyde" } else { "decompose" },
                    reason: "needs a generator model (--model)".into(),
                })
            }
            (_, l) => l,
        };
        if opts.rerank && self.reranker.is_none() {
            return Err(Error::BadOption {
                option: "rerank",
                reason: "needs a generator model (--model) or another reranker".into(),
            });
        }
        let allowed_vec = opts.filter.allowed_docs(self.store)?;
        let allowed: Option<HashSet<i64>> =
            allowed_vec.as_ref().map(|v| v.iter().copied().collect());
        let n = (opts.top_k * 4).max(50).max(if opts.rerank {
            opts.rerank_candidates
        } else {
            0
        });
        let mut result = SearchResult::default();
        let queries = match (opts.decompose, llm) {
            (true, Some(l)) => l.decompose(query)?,
            _ => vec![query.to_string()],
        };
        if queries.len() > 1 {
            result.sub_queries = queries.clone();
        }
        let mut lists = Vec::new();
        for (qi, q) in queries.iter().enumerate() {
            let hyde = match (opts.hyde && opts.mode != Mode::Bm25, llm) {
                (true, Some(l)) => Some(l.hyde(q)?),
                _ => None,
            };
            let (ranked, qv) = self.rank(
                q,
                hyde.as_deref(),
                opts.mode,
                n,
                allowed.as_ref(),
                allowed_vec.as_deref(),
            )?;
            if qi == 0 {
                result.hyde_text = hyde;
                result.query_vector = qv;
            }
            lists.push(ranked);
        }
        let mut ranked: Vec<(i64, f32)> = if lists.len() == 1 {
            lists.pop().expect("one list")
        } else {
            rrf(
                &lists
                    .iter()
                    .map(|l| l.iter().map(|x| x.0).collect())
                    .collect::<Vec<_>>(),
                60.0,
            )
        };
        if opts.rerank {
            let reranker = self.reranker.expect("checked above");
            ranked.truncate(opts.rerank_candidates.max(opts.top_k));
            let ids: Vec<i64> = ranked.iter().map(|x| x.0).collect();
            let chunks = self.store.chunks(&ids)?;
            let passages: Vec<String> = chunks
                .iter()
                .map(|c| passage_text(&c.heading, &c.text))
                .collect();
            let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
            let scores = reranker.score(query, &refs)?;
            let mut order: Vec<(usize, f32)> = scores.into_iter().enumerate().collect();
            // Stable: equal relevance keeps the retrieval order.
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            ranked = order
                .into_iter()
                .map(|(i, s)| (chunks[i].chunk_id, s))
                .collect();
        }
        if let Some(lambda) = opts.mmr {
            let qv = if result.query_vector.is_empty() {
                self.embed_one(query)?
            } else {
                result.query_vector.clone()
            };
            let dense = self.dense;
            let rel: Vec<(i64, f32)> = ranked
                .iter()
                .take(opts.top_k * 4)
                .map(|&(id, _)| {
                    (
                        id,
                        dense
                            .vector(id)
                            .map_or(0.0, |v| flywheel_kernels::dot_f32(&qv, v)),
                    )
                })
                .collect();
            ranked = mmr(
                &rel,
                &|id| dense.vector(id).map(<[f32]>::to_vec),
                opts.top_k,
                lambda,
            );
        }
        ranked.truncate(opts.top_k);
        let ids: Vec<i64> = ranked.iter().map(|x| x.0).collect();
        let mut hits = self.store.chunks(&ids)?;
        for (h, (_, s)) in hits.iter_mut().zip(&ranked) {
            h.score = *s;
        }
        result.hits = hits;
        Ok(result)
    }
}

/// A [`Searcher`] with fixed options, as the api's [`flywheel_api::Retriever`] (what the
/// evaluation harness and other callers that only know the trait use).
pub struct StoreRetriever<'a> {
    /// The searcher.
    pub searcher: Searcher<'a>,
    /// Options for every query (`top_k` is taken from each call).
    pub options: SearchOptions,
}

impl flywheel_api::Retriever for StoreRetriever<'_> {
    type Error = Error;
    fn retrieve(&mut self, query: &str, top_k: usize) -> Result<Vec<RetrievedChunk>> {
        let opts = SearchOptions {
            top_k,
            ..self.options.clone()
        };
        Ok(self.searcher.search(query, &opts)?.hits)
    }
}

/// The text a chunk is embedded and judged as: its heading trail, a blank line, its text.
pub fn passage_text(heading: &str, text: &str) -> String {
    if heading.is_empty() {
        text.to_string()
    } else {
        format!("{heading}\n\n{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_matches_hand_computed_scores() {
        let fused = rrf(&[vec![1, 2, 3], vec![3, 1]], 60.0);
        let s = |r: f32| 1.0 / (60.0 + r);
        let want = [(1, s(1.0) + s(2.0)), (3, s(3.0) + s(1.0)), (2, s(2.0))];
        assert_eq!(fused.len(), 3);
        for ((id, score), (wid, wscore)) in fused.iter().zip(want) {
            assert_eq!(*id, wid);
            assert!((score - wscore).abs() < 1e-7);
        }
        // Equal scores keep first-appearance order.
        let tie = rrf(&[vec![7, 8], vec![8, 7]], 60.0);
        assert_eq!(tie.iter().map(|x| x.0).collect::<Vec<_>>(), vec![7, 8]);
    }

    #[test]
    fn exact_search_and_filters_by_document() {
        let v = Vectors {
            ids: vec![10, 11, 12],
            docs: vec![1, 1, 2],
            dim: 2,
            data: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
        };
        let idx = DenseIndex::from_vectors(v, None);
        let hits = idx.search(&[0.8, 0.6], 3, None);
        assert_eq!(
            hits.iter().map(|h| h.0).collect::<Vec<_>>(),
            vec![12, 10, 11]
        );
        assert!((hits[0].1 - 0.96).abs() < 1e-6);
        let only2: HashSet<i64> = [2].into_iter().collect();
        assert_eq!(
            idx.search(&[0.8, 0.6], 3, Some(&only2))
                .iter()
                .map(|h| h.0)
                .collect::<Vec<_>>(),
            vec![12]
        );
    }

    #[test]
    fn ann_agrees_with_exact_search() {
        let (n, d) = (600usize, 16usize);
        let mut seed = 3u64;
        let mut data = Vec::new();
        for _ in 0..n {
            let mut v: Vec<f32> = (0..d)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            normalize(&mut v);
            data.extend(v);
        }
        let v = Vectors {
            ids: (0..n as i64).collect(),
            docs: vec![0; n],
            dim: d,
            data,
        };
        let ann = build_ann(&v);
        let idx = DenseIndex::from_vectors(v.clone(), Some(ann));
        let mut agree = 0;
        for q in 0..50 {
            let query = &v.data[q * d..(q + 1) * d];
            let exact = idx.search_exact(query, 10, None);
            let approx = idx.search(query, 10, None);
            assert_eq!(
                approx[0].0, q as i64,
                "a point is its own nearest neighbour"
            );
            agree += approx
                .iter()
                .filter(|a| exact.iter().any(|e| e.0 == a.0))
                .count();
        }
        assert!(
            agree as f32 / 500.0 > 0.9,
            "recall@10 of HNSW vs exact: {agree}/500"
        );
    }

    #[test]
    fn mmr_skips_near_duplicates() {
        let vecs: HashMap<i64, Vec<f32>> = [
            (1, vec![1.0, 0.0]),
            (2, vec![1.0, 0.0]),
            (3, vec![0.0, 1.0]),
        ]
        .into_iter()
        .collect();
        let cands = [(1, 0.9), (2, 0.89), (3, 0.5)];
        let pure = mmr(&cands, &|id| vecs.get(&id).cloned(), 2, 1.0);
        assert_eq!(pure.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let diverse = mmr(&cands, &|id| vecs.get(&id).cloned(), 2, 0.5);
        assert_eq!(diverse.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn filters_parse_and_name_bad_keys() {
        assert!(Filter::parse(&["path=guides/*".into()]).is_ok());
        let e = Filter::parse(&["author=me".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("author"), "{e}");
        let e = Filter::parse(&["nonsense".into()]).unwrap_err().to_string();
        assert!(e.contains("key=pattern"), "{e}");
    }
}

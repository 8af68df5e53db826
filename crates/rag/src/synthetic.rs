//! Synthetic stores for latency benchmarks: `n` chunks of Zipf-distributed pseudo-words with
//! random unit vectors, written through the same store code as a real index run.

use std::path::Path;

use crate::search::build_ann;
use crate::store::{NewChunk, Store};
use crate::{Error, Result};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.unit().max(1e-7), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

const SYLLABLES: [&str; 10] = ["ka", "lo", "mi", "ne", "ru", "ta", "si", "po", "ve", "da"];
const VOCAB: f32 = 20_000.0;

fn word(rng: &mut Rng) -> String {
    // Log-uniform rank ≈ Zipf with exponent 1.
    let mut r = (rng.unit() * VOCAB.ln()).exp() as usize;
    let mut w = String::new();
    loop {
        w.push_str(SYLLABLES[r % 10]);
        r /= 10;
        if r == 0 {
            break;
        }
    }
    w
}

/// Builds (or reuses, when one with `n` chunks exists) a synthetic store at `path`.
/// Returns whether it was built now.
pub fn synthetic(
    path: &Path,
    n: usize,
    dim: usize,
    ann_threshold: usize,
    seed: u64,
) -> Result<bool> {
    if path.is_file() {
        let s = Store::open(path)?;
        if s.meta("synthetic_chunks")?.as_deref() == Some(&n.to_string()) {
            return Ok(false);
        }
        drop(s);
        std::fs::remove_file(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let mut store = Store::open(path)?;
    let mut rng = Rng(seed.max(1));
    let w = store.writer()?;
    let per_doc = 100;
    let mut done = 0;
    let mut doc = 0;
    while done < n {
        let count = per_doc.min(n - done);
        let mut text = String::new();
        let mut chunks = Vec::with_capacity(count);
        for ord in 0..count {
            let start = text.len();
            let words: Vec<String> = (0..120).map(|_| word(&mut rng)).collect();
            text.push_str(&words.join(" "));
            let end = text.len();
            text.push_str("\n\n");
            let mut v: Vec<f32> = (0..dim).map(|_| rng.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            chunks.push(NewChunk {
                ord,
                span: (start, end),
                lines: (2 * ord + 1, 2 * ord + 1),
                heading: format!("Synthetic {doc} › Part {ord}"),
                text: text[start..end].to_string(),
                vector: v,
            });
        }
        w.put_document(
            &format!("doc{doc:06}.txt"),
            "text",
            &format!("synthetic-{doc}"),
            text.len(),
            None,
            &text,
            &chunks,
        )?;
        done += count;
        doc += 1;
    }
    w.set_meta("generation", "1")?;
    w.set_meta("synthetic_chunks", &n.to_string())?;
    let vectors = w.vectors()?;
    let ann = if n >= ann_threshold.max(1) {
        let blob = bincode::serialize(&build_ann(&vectors)).map_err(|e| Error::Store {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Some(blob)
    } else {
        None
    };
    w.set_ann(1, ann.as_deref())?;
    w.commit()?;
    Ok(true)
}

/// `n` queries of four to eight pseudo-words from the same distribution.
pub fn synthetic_queries(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed.max(1));
    (0..n)
        .map(|_| {
            let k = 4 + (rng.next() % 5) as usize;
            (0..k).map(|_| word(&mut rng)).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

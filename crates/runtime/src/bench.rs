//! Speed and memory measurements behind `flywheel bench` (and so scripts/bench-generate.sh):
//! prefill and decode tokens/s of a decoder, sentences/s of an embedder, and the process's peak
//! resident memory.

use flywheel_api::{GenerateRequest, NullSink, SamplingParams, TokenSink};
use serde::Serialize;

use crate::{EmbeddingModel, Result, TextModel};

/// The text repeated (and cut at a token boundary) to make a prompt of the asked length.
pub const BENCH_TEXT: &str = "The history of computing is a story of abstraction layered upon abstraction. \
Early machines were programmed by rewiring panels; later, stored programs let the same hardware run many tasks. \
Compilers translated human-readable code into instructions, operating systems shared the processor among programs, \
and networks connected machines across the world. Each step hid complexity below and exposed new possibilities above. ";

/// What [`generate`] measured: medians over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// Sequences generated together.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt_tokens: usize,
    /// Tokens the first sequence generated in the last repeat.
    pub generated_tokens: usize,
    /// Prompt tokens per second, summed over the batch.
    pub prefill_tok_s: f64,
    /// Decoded tokens per second (the first generated token excluded), summed over the batch.
    pub decode_tok_s: f64,
    /// The process's peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// What [`embed`] measured: the median over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedBench {
    /// Sentences embedded per repeat.
    pub sentences: usize,
    /// Sentences per second.
    pub sentences_per_s: f64,
    /// The process's peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// Measures prefill and decode speed like llama-bench: a `prompt_tokens` prompt cut from
/// [`BENCH_TEXT`], greedy, and EOS does not end the run, so every repeat decodes `gen_tokens`.
/// `batch` sequences (at least one) are generated together from the same prompt; `repeats`
/// (at least one) runs are made and the medians reported. With a `grammar` every row is
/// constrained to it, and a row ends early once the grammar is complete.
pub fn generate(
    tm: &TextModel,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeats: usize,
    batch: usize,
    grammar: Option<flywheel_api::Grammar>,
) -> Result<GenerateBench> {
    let batch = batch.max(1);
    let mut text = String::new();
    let mut ids = vec![];
    while ids.len() < prompt_tokens {
        text.push_str(BENCH_TEXT);
        ids = tm.tokenizer().encode(&text, false)?;
    }
    ids.truncate(prompt_tokens);
    let mut req = GenerateRequest::new(String::new(), gen_tokens);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    req.grammar = grammar;
    let (mut pre, mut dec, mut produced) = (vec![], vec![], 0);
    let requests: Vec<(Vec<u32>, &GenerateRequest)> =
        (0..batch).map(|_| (ids.clone(), &req)).collect();
    for _ in 0..repeats.max(1) {
        let mut sinks: Vec<NullSink> = (0..batch).map(|_| NullSink).collect();
        let mut sinks: Vec<&mut dyn TokenSink> =
            sinks.iter_mut().map(|s| s as &mut dyn TokenSink).collect();
        let outs = tm.generate_ids(&requests, &mut sinks)?;
        // The sequences share one prefill and one decode loop: the first one's timings are the
        // batch's.
        let t = &outs[0].timings;
        pre.push((batch * ids.len()) as f64 / t.prefill_s);
        produced = outs[0].usage.completion_tokens;
        let decoded: usize = outs
            .iter()
            .map(|o| o.usage.completion_tokens.saturating_sub(1).max(1))
            .sum();
        dec.push(decoded as f64 / t.decode_s.max(1e-9));
    }
    Ok(GenerateBench {
        batch,
        prompt_tokens: ids.len(),
        generated_tokens: produced,
        prefill_tok_s: median(pre),
        decode_tok_s: median(dec),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Measures embedding speed over `lines`, `batch_size` sentences per batch: one warm-up batch,
/// then `repeats` (at least one) passes over all of them; the median is reported.
pub fn embed(
    em: &EmbeddingModel,
    lines: &[&str],
    batch_size: usize,
    repeats: usize,
) -> Result<EmbedBench> {
    em.embed_all(&lines[..lines.len().min(batch_size)], batch_size)?; // warm-up
    let mut rates = vec![];
    for _ in 0..repeats.max(1) {
        let t = std::time::Instant::now();
        em.embed_all(lines, batch_size)?;
        rates.push(lines.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(EmbedBench {
        sentences: lines.len(),
        sentences_per_s: median(rates),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The compute pool's size as configured: `RAYON_NUM_THREADS` (which
/// [`crate::threads::configure`] sets), else [`crate::threads::default_threads`].
pub fn pool_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(crate::threads::default_threads)
}

/// The process's peak resident memory in MiB (`VmHWM` of /proc/self/status; 0 where there is
/// none).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The median of `v` (the upper one of an even count). Panics on an empty `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_and_the_upper_of_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
        assert_eq!(median(vec![7.5]), 7.5);
    }

    #[test]
    fn peak_rss_is_not_negative() {
        assert!(peak_rss_mib() >= 0.0);
    }
}

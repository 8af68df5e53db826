//! Several samples of one prompt from one prefill: the prompt's KV cache is computed once and
//! copied into each sample's own cache, then the samples decode together as a batch of
//! single-row caches (execution voting draws its candidates this way).

use super::*;
use flywheel_models::{Cache, DecodeScratch};

/// What [`TextModel::generate_samples`] returns.
#[derive(Debug)]
pub struct Samples {
    /// One output per seed, in the seeds' order.
    pub outputs: Vec<GenerateOutput>,
    /// Prompt tokens run through the model: the prompt's length, once for all samples.
    pub prefill_tokens: usize,
}

impl TextModel {
    /// One sample of `req` per seed (its sampling with that seed), all from one prefill of the
    /// prompt. On the host decode path (CPU, f32) each sample equals `generate` of `req` with
    /// that seed alone (tested); elsewhere it is the same computation batched differently.
    /// Memory: one KV cache of prompt plus `max_tokens` per seed.
    pub fn generate_samples(&self, req: &GenerateRequest, seeds: &[u64]) -> Result<Samples> {
        check_request(req)?;
        let ids = self.encode_prompt(&req.prompt)?;
        self.check_prompt(&ids)?;
        let window = self.model.config().max_position_embeddings;
        let reqs: Vec<GenerateRequest> = seeds
            .iter()
            .map(|&seed| {
                let mut r = req.clone();
                r.sampling.seed = seed;
                r
            })
            .collect();
        // The grammar is compiled once; each row gets its own copy of the matcher.
        let constraint = req
            .grammar
            .as_ref()
            .map(|g| self.compile_grammar(g))
            .transpose()?;
        let mut rows: Vec<RowState> = Vec::with_capacity(reqs.len());
        for r in &reqs {
            let mut row = RowState::new(
                &self.tokenizer,
                ids.clone(),
                r,
                r.max_tokens.min(window - ids.len()),
            );
            if let Some(c) = &constraint {
                row.constrain(c.clone());
            }
            rows.push(row);
        }
        let device = self.model.device();
        let t0 = Instant::now();
        let mut cache = self.model.new_cache(vec![0]);
        let input = Tensor::from_slice(&ids, (1, ids.len()), device)?;
        let first = flywheel_models::on_pool(device, || {
            self.model.forward(&input, &mut cache, Logits::Last)
        })?
        .flatten_all()?
        .to_vec1::<f32>()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let budget = rows.iter().map(|r| r.budget()).max().unwrap_or(0);
        let mut caches: Vec<Cache> = rows
            .iter()
            .map(|_| {
                let mut c = cache.clone();
                c.reserve(budget);
                c
            })
            .collect();
        drop(cache);
        let mut sink = flywheel_api::NullSink;
        // A row may be finished before its first token (no budget, or a grammar that admits
        // only the empty output): like `generate`, it gets none.
        for row in rows.iter_mut().filter(|r| r.finish.is_none()) {
            let tok = row.sample(&mut first.clone())?;
            row.step(tok, &self.eos, &mut sink)?;
        }
        let mut scratch = DecodeScratch::default();
        loop {
            let live: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].finish.is_none())
                .collect();
            if live.is_empty() {
                break;
            }
            let next: Vec<u32> = live
                .iter()
                .map(|&i| *rows[i].tokens.last().expect("a token was sampled"))
                .collect();
            let mut live_caches: Vec<&mut Cache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| rows[*i].finish.is_none())
                .map(|(_, c)| c)
                .collect();
            let (model, sc) = (&self.model, &mut scratch);
            let stepped = flywheel_models::on_pool(device, || {
                model.decode_into(&next, &mut live_caches, sc)
            })?;
            let logits: Vec<Vec<f32>> = if stepped {
                let vocab = scratch.vocab();
                scratch
                    .logits()
                    .chunks_exact(vocab)
                    .map(<[f32]>::to_vec)
                    .collect()
            } else {
                flywheel_models::on_pool(device, || {
                    self.model.decode_step(&next, &mut live_caches)
                })?
                .to_vec2::<f32>()?
            };
            for (&i, mut l) in live.iter().zip(logits) {
                let tok = rows[i].sample(&mut l)?;
                rows[i].step(tok, &self.eos, &mut sink)?;
            }
        }
        let timings = Timings {
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        };
        Ok(Samples {
            outputs: rows.into_iter().map(|r| r.output(timings)).collect(),
            prefill_tokens: ids.len(),
        })
    }
}

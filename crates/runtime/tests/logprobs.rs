//! Token log-probabilities: what generation reports equals a separate teacher-forced forward
//! pass over the same tokens (the distribution before temperature), alternatives are sorted and
//! hold the sampled token when it ranks among them, a grammar's mask is applied before they are
//! read, and the engine reports the same figures as the generation loop.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use flywheel_api::{GenerateRequest, Grammar, SamplingParams, TokenLogprob};
use flywheel_models::{Architecture, Logits};
use flywheel_runtime::engine::{Event, Job};
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf};
use flywheel_runtime::{Engine, EngineConfig, LoadOptions, TextModel};

fn tiny(dtype: GgmlDType) -> anyhow::Result<(tempfile::TempDir, TextModel)> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(Architecture::Llama);
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &cfg, &tiny_weights(&cfg, 21)?, dtype)?;
    let tm = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    Ok((dir, tm))
}

/// log p(token_j | prompt, tokens_<j) for each generated token, from one forward pass over the
/// whole sequence.
fn teacher_forced(tm: &TextModel, prompt: &[u32], tokens: &[u32]) -> anyhow::Result<Vec<f64>> {
    let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let model = tm.model();
    let mut cache = model.new_cache(vec![0]);
    let input = Tensor::from_vec(seq.clone(), (1, seq.len()), model.device())?;
    let logits = model
        .forward(&input, &mut cache, Logits::All)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(j, &t)| {
            let row = &logits[prompt.len() - 1 + j];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            row[t as usize] as f64 - max - z.ln()
        })
        .collect())
}

fn check_top(lps: &[TokenLogprob], n: usize) {
    for lp in lps {
        assert_eq!(lp.top.len(), n, "{lp:?}");
        assert!(
            lp.top.windows(2).all(|w| w[0].1 >= w[1].1),
            "sorted: {lp:?}"
        );
        let last = lp.top.last().map_or(f32::INFINITY, |t| t.1);
        if lp.logprob > last {
            assert!(
                lp.top.iter().any(|t| t.0 == lp.token),
                "sampled token missing: {lp:?}"
            );
        }
        if let Some(t) = lp.top.iter().find(|t| t.0 == lp.token) {
            assert_eq!(t.1, lp.logprob);
        }
    }
}

#[test]
fn reported_logprobs_match_a_teacher_forced_pass() -> anyhow::Result<()> {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
        let (_d, tm) = tiny(dtype)?;
        let prompt = "the cat sat on";
        let ids = tm.encode_prompt(prompt)?;
        for sampling in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 1.7, // logprobs are read before temperature
                top_p: 1.0,
                min_p: 0.0,
                seed: 3,
                ..SamplingParams::default()
            },
        ] {
            let mut req = GenerateRequest::new(prompt, 16);
            req.sampling = sampling.clone();
            req.ignore_eos = true;
            req.logprobs = Some(5);
            let out = tm.generate(&req, &mut flywheel_api::NullSink)?;
            let lps = out.logprobs.as_ref().expect("asked for logprobs");
            assert_eq!(lps.len(), out.tokens.len());
            assert_eq!(lps.iter().map(|l| l.token).collect::<Vec<_>>(), out.tokens);
            check_top(lps, 5);
            let want = teacher_forced(&tm, &ids, &out.tokens)?;
            let got: f64 = lps.iter().map(|l| l.logprob as f64).sum();
            let want_sum: f64 = want.iter().sum();
            // With f32 weights both passes do the same arithmetic: the 1e-3 contract. With
            // quantized weights the one-token decode step quantizes its activations to 8 bits
            // and the batched pass does not (as in llama.cpp), so they differ by about 0.01
            // per token; a wrong distribution would differ by far more.
            let tol = match dtype {
                GgmlDType::F32 => 1e-3,
                _ => 0.02 * out.tokens.len() as f64,
            };
            assert!(
                (got - want_sum).abs() < tol,
                "{dtype:?} {sampling:?}: reported {got}, teacher-forced {want_sum}"
            );
            // Without the request, nothing is reported and the output is the same.
            req.logprobs = None;
            let plain = tm.generate(&req, &mut flywheel_api::NullSink)?;
            assert!(plain.logprobs.is_none());
            assert_eq!(plain.tokens, out.tokens);
        }
    }
    Ok(())
}

#[test]
fn a_grammar_masks_before_logprobs_are_read() -> anyhow::Result<()> {
    let (_d, tm) = tiny(GgmlDType::Q8_0)?;
    let prompt = "x y";
    let ids = tm.encode_prompt(prompt)?;
    let mut req = GenerateRequest::new(prompt, 12).with_grammar(Grammar::Regex("[ab]{6}".into()));
    req.sampling = SamplingParams::greedy();
    req.logprobs = Some(3);
    let out = tm.generate(&req, &mut flywheel_api::NullSink)?;
    assert!(
        out.text.chars().all(|c| c == 'a' || c == 'b'),
        "{:?}",
        out.text
    );
    let lps = out.logprobs.unwrap();
    check_top(&lps, 3.min(lps[0].top.len()));
    let raw = teacher_forced(&tm, &ids, &out.tokens)?;
    for (lp, raw) in lps.iter().zip(raw) {
        // Renormalised over the allowed tokens: never less likely than unconstrained.
        assert!(lp.logprob as f64 >= raw - 1e-4, "{lp:?} vs {raw}");
        for &(t, _) in &lp.top {
            let text = tm.tokenizer().decode(&[t], false)?;
            assert!(
                !text.is_empty() && text.chars().all(|c| c == 'a' || c == 'b'),
                "a refused token ranked: {t} {text:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_engine_reports_what_the_generation_loop_reports() -> anyhow::Result<()> {
    let (_d, tm) = tiny(GgmlDType::Q8_0)?;
    let tm = Arc::new(tm);
    let prompt = "one two three";
    let mut req = GenerateRequest::new(prompt, 10);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    req.logprobs = Some(2);
    let want = tm.generate(&req, &mut flywheel_api::NullSink)?;
    let engine = Engine::start(tm.clone(), EngineConfig::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(Job {
            prompt: tm.encode_prompt(prompt)?,
            max_tokens: 10,
            stop: vec![],
            sampling: SamplingParams::greedy(),
            adapter: None,
            ignore_eos: true,
            constraint: None,
            logprobs: Some(2),
            events: tx,
        })
        .map_err(|_| anyhow::anyhow!("busy"))?;
    let mut got = vec![];
    loop {
        match rx.blocking_recv() {
            Some(Event::Token { logprob, .. }) => got.extend(logprob),
            Some(Event::Done { .. }) => break,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    engine.shutdown();
    let want = want.logprobs.unwrap();
    assert_eq!(got.len(), want.len(), "one entry per token");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.token, w.token);
        assert!((g.logprob - w.logprob).abs() < 1e-4, "{g:?} vs {w:?}");
    }
    Ok(())
}

//! Grammar-constrained decoding on tiny random models: whatever the weights want, the output
//! follows the grammar (regex, JSON schema) and ends with `stop` when the grammar is complete;
//! `max_tokens` still ends it with `length`; bad grammars are typed errors naming their kind;
//! greedy output that already follows a grammar is unchanged by it; constrained and
//! unconstrained rows share a batch (generate_batch and the engine) without changing each other.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use flywheel_api::{FinishReason, GenerateOutput, GenerateRequest, Grammar, SamplingParams};
use flywheel_models::Architecture;
use flywheel_runtime::engine::{Event, Job};
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf};
use flywheel_runtime::{Engine, EngineConfig, Error, LoadOptions, TextModel};

/// A tiny random model (Q8_0 GGUF, weights from `seed`); the folder lives with the guard.
fn tiny(arch: Architecture, seed: u64) -> anyhow::Result<(tempfile::TempDir, TextModel)> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(arch);
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &cfg, &tiny_weights(&cfg, seed)?, GgmlDType::Q8_0)?;
    let tm = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    Ok((dir, tm))
}

fn run(tm: &TextModel, req: &GenerateRequest) -> anyhow::Result<GenerateOutput> {
    Ok(tm.generate(req, &mut flywheel_api::NullSink)?)
}

/// Greedy, temperature-only (rejection then masked redraw) and the default top-p/min-p
/// sampling (mask first), with a few seeds each.
fn samplings() -> Vec<SamplingParams> {
    let mut all = vec![SamplingParams::greedy()];
    for seed in 0..6 {
        all.push(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..SamplingParams::default()
        });
        all.push(SamplingParams {
            seed,
            ..SamplingParams::default()
        });
    }
    all
}

fn is_abc(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 4 && b[..3].iter().all(|c| matches!(c, b'a' | b'b')) && b[3] == b'c'
}

/// A regex matching exactly `text`.
fn exactly(text: &str) -> String {
    text.chars()
        .map(|c| format!("\\x{{{:x}}}", c as u32))
        .collect()
}

#[test]
fn a_regex_constraint_always_matches_and_ends_with_stop() -> anyhow::Result<()> {
    for arch in [Architecture::Qwen2, Architecture::Llama] {
        let (_d, tm) = tiny(arch, 3)?;
        for sampling in samplings() {
            let mut req =
                GenerateRequest::new("he said", 40).with_grammar(Grammar::Regex("[ab]{3}c".into()));
            req.sampling = sampling.clone();
            let out = run(&tm, &req)?;
            assert!(is_abc(&out.text), "{arch:?} {sampling:?}: {:?}", out.text);
            assert_eq!(out.finish_reason, FinishReason::Stop, "{sampling:?}");
            assert_eq!(out.tokens.len(), 4, "one byte token each: {:?}", out.tokens);
        }
    }
    Ok(())
}

#[test]
fn a_json_schema_constraint_gives_json_with_the_required_keys() -> anyhow::Result<()> {
    let schema = r#"{"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                       "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": false}"#;
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    for sampling in samplings() {
        let mut req =
            GenerateRequest::new("{", 48).with_grammar(Grammar::JsonSchema(schema.into()));
        req.sampling = sampling.clone();
        let out = run(&tm, &req)?;
        assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
        let v: serde_json::Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|e| panic!("{sampling:?}: {:?} is not JSON: {e}", out.text));
        let o = v.as_object().expect("an object");
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 2, "{:?}", out.text);
        assert!(o["n"].as_u64().is_some_and(|n| n <= 999), "{:?}", out.text);
        assert!(o["ok"].is_boolean(), "{:?}", out.text);
        assert!(
            !out.text.contains(' '),
            "compact by default: {:?}",
            out.text
        );
    }
    // `JsonObject` is any object.
    let mut req = GenerateRequest::new("{", 48).with_grammar(Grammar::JsonObject);
    req.sampling = SamplingParams::greedy();
    let out = run(&tm, &req)?;
    assert!(out.text.starts_with('{'), "{:?}", out.text);
    if out.finish_reason == FinishReason::Stop {
        assert!(serde_json::from_str::<serde_json::Value>(&out.text)?.is_object());
    }
    Ok(())
}

#[test]
fn max_tokens_ends_a_constrained_row_with_length() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    let mut req = GenerateRequest::new("he", 2).with_grammar(Grammar::Regex("[ab]{3}c".into()));
    req.sampling = SamplingParams::greedy();
    let out = run(&tm, &req)?;
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.tokens.len(), 2);
    assert!(
        out.text.bytes().all(|c| matches!(c, b'a' | b'b')),
        "{:?}",
        out.text
    );
    Ok(())
}

#[test]
fn a_grammar_of_only_the_empty_string_generates_nothing() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    for g in [
        Grammar::Regex(String::new()),
        Grammar::Lark(r#"start: """#.into()),
    ] {
        let mut req = GenerateRequest::new("he", 8).with_grammar(g.clone());
        req.ignore_eos = true;
        let out = run(&tm, &req)?;
        assert_eq!(out.text, "", "{g:?}");
        assert_eq!(out.finish_reason, FinishReason::Stop, "{g:?}");
        assert!(
            out.tokens.iter().all(|t| tm.eos_ids().contains(t)),
            "{g:?}: {:?}",
            out.tokens
        );
    }
    Ok(())
}

#[test]
fn bad_grammars_are_refused_before_generating_naming_the_kind() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    for (g, kind) in [
        (Grammar::Regex("[ab".into()), "regex"),
        (Grammar::Lark("start: missing_rule".into()), "lark"),
        (Grammar::JsonSchema(r#"{"type": 7}"#.into()), "json_schema"),
        (Grammar::JsonSchema("not json".into()), "json_schema"),
    ] {
        let req = GenerateRequest::new("he", 4).with_grammar(g.clone());
        match tm.generate(&req, &mut flywheel_api::NullSink) {
            Err(e @ Error::Grammar { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("invalid {kind} grammar: ")), "{msg}");
                assert!(
                    msg.len() > format!("invalid {kind} grammar: ").len() + 3,
                    "{msg}"
                );
            }
            other => panic!("{g:?}: {other:?}"),
        }
        // A batch with one bad grammar fails as a whole, before any work.
        let ok = GenerateRequest::new("he", 4);
        assert!(matches!(
            tm.generate_batch(&[ok, req]),
            Err(Error::Grammar { .. })
        ));
    }
    Ok(())
}

#[test]
fn greedy_output_that_follows_the_grammar_is_unchanged_by_it() -> anyhow::Result<()> {
    // Prompts whose unconstrained greedy output is valid UTF-8 text without special tokens
    // (found by looking; random weights mostly emit stray bytes): one ends with EOS, one with
    // the length limit.
    for (seed, prompt, finish) in [(3, "a", FinishReason::Stop), (6, "a", FinishReason::Length)] {
        let (_d, tm) = tiny(Architecture::Qwen2, seed)?;
        let mut req = GenerateRequest::new(prompt, 16);
        req.sampling = SamplingParams::greedy();
        let free = run(&tm, &req)?;
        assert_eq!(free.finish_reason, finish, "{:?}", free.text);
        assert!(
            free.tokens
                .iter()
                .all(|&t| t < 128 || t == 256 || t == 257 || t == 260),
            "the fixture moved: {:?}",
            free.tokens
        );
        // Any text: identical, EOS included.
        let any = run(
            &tm,
            &req.clone().with_grammar(Grammar::Regex("(.|\n)*".into())),
        )?;
        assert_eq!(
            any,
            GenerateOutput {
                timings: any.timings,
                ..free.clone()
            }
        );
        // Exactly that text: identical up to the last text token, where the grammar is done.
        let exact = run(
            &tm,
            &req.clone()
                .with_grammar(Grammar::Regex(exactly(&free.text))),
        )?;
        assert_eq!(exact.text, free.text);
        let text_tokens: Vec<u32> = free.tokens.iter().copied().filter(|&t| t != 260).collect();
        assert_eq!(exact.tokens, text_tokens);
        assert_eq!(exact.finish_reason, FinishReason::Stop);
    }
    Ok(())
}

#[test]
fn constrained_and_free_rows_share_a_batch_unchanged() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    let greedy = |prompt: &str, max| {
        let mut r = GenerateRequest::new(prompt, max);
        r.sampling = SamplingParams::greedy();
        r
    };
    let schema = r#"{"type":"object","properties":{"n":{"type":"integer","minimum":0,"maximum":99}},
        "required":["n"],"additionalProperties":false}"#;
    let reqs = vec![
        greedy("x y z", 12),
        greedy("he said", 30).with_grammar(Grammar::JsonSchema(schema.into())),
        GenerateRequest {
            sampling: SamplingParams {
                seed: 5,
                ..SamplingParams::default()
            },
            ..greedy("{", 20).with_grammar(Grammar::Regex("[ab]{3}c".into()))
        },
        greedy("hello", 10),
    ];
    let batch = tm.generate_batch(&reqs)?;
    for (req, got) in reqs.iter().zip(&batch) {
        let alone = run(&tm, req)?;
        assert_eq!(got.tokens, alone.tokens, "{:?}", req.prompt);
        assert_eq!(got.text, alone.text);
        assert_eq!(got.finish_reason, alone.finish_reason);
    }
    assert!(is_abc(&batch[2].text), "{:?}", batch[2].text);
    Ok(())
}

/// Runs jobs through the engine together; returns each one's text and finish reason.
fn engine_run(
    tm: &Arc<TextModel>,
    jobs: Vec<(Vec<u32>, SamplingParams, Option<Grammar>)>,
) -> anyhow::Result<Vec<(String, FinishReason)>> {
    let engine = Engine::start(tm.clone(), EngineConfig::default());
    let mut rxs = vec![];
    for (prompt, sampling, grammar) in jobs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let constraint = grammar.map(|g| tm.compile_grammar(&g)).transpose()?;
        let job = Job {
            prompt,
            max_tokens: 24,
            stop: vec![],
            sampling,
            adapter: None,
            ignore_eos: false,
            constraint,
            logprobs: None,
            events: tx,
        };
        engine.submit(job).map_err(|_| anyhow::anyhow!("busy"))?;
        rxs.push(rx);
    }
    let mut out = vec![];
    for mut rx in rxs {
        let mut text = String::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { text: t, .. }) => text.push_str(&t),
                Some(Event::Done { finish, .. }) => {
                    out.push((text, finish));
                    break;
                }
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
    }
    engine.shutdown();
    Ok(out)
}

#[test]
fn the_engine_runs_constrained_and_free_jobs_in_one_batch() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Qwen2, 3)?;
    let tm = Arc::new(tm);
    let regex = Grammar::Regex("[ab]{3}c".into());
    let sampled = SamplingParams {
        seed: 11,
        ..SamplingParams::default()
    };
    let jobs = vec![
        (tm.encode_prompt("x y z")?, SamplingParams::greedy(), None),
        (
            tm.encode_prompt("he said")?,
            SamplingParams::greedy(),
            Some(regex.clone()),
        ),
        (tm.encode_prompt("{")?, sampled.clone(), Some(regex.clone())),
    ];
    let together = engine_run(&tm, jobs.clone())?;
    for (i, job) in jobs.into_iter().enumerate() {
        let alone = engine_run(&tm, vec![job])?;
        assert_eq!(together[i], alone[0], "job {i}");
    }
    for (text, finish) in &together[1..] {
        assert!(is_abc(text), "{text:?}");
        assert_eq!(*finish, FinishReason::Stop);
    }
    Ok(())
}

#[test]
fn samples_from_one_prefill_equal_each_seed_alone() -> anyhow::Result<()> {
    let (_d, tm) = tiny(Architecture::Llama, 4)?;
    let schema = r#"{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}"#;
    for grammar in [None, Some(Grammar::JsonSchema(schema.into()))] {
        let mut req = GenerateRequest::new("the cat sat", 24);
        req.sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            ..SamplingParams::default()
        };
        req.grammar = grammar.clone();
        let seeds = [3u64, 11, 3, 42];
        let s = tm.generate_samples(&req, &seeds)?;
        // One prefill for all: the prompt's tokens ran once, not once per sample.
        assert_eq!(s.prefill_tokens, tm.encode_prompt(&req.prompt)?.len());
        assert_eq!(s.outputs.len(), seeds.len());
        for (seed, out) in seeds.iter().zip(&s.outputs) {
            let mut alone = req.clone();
            alone.sampling.seed = *seed;
            let want = run(&tm, &alone)?;
            assert_eq!(out.tokens, want.tokens, "seed {seed}, grammar {grammar:?}");
            assert_eq!(out.finish_reason, want.finish_reason);
        }
        assert_eq!(
            s.outputs[0].tokens, s.outputs[2].tokens,
            "same seed, same sample"
        );
        // No budget: no token, as `generate` gives none.
        let mut none = req.clone();
        none.max_tokens = 0;
        let s0 = tm.generate_samples(&none, &seeds)?;
        assert_eq!(s0.outputs[0].tokens, run(&tm, &none)?.tokens);
        assert!(s0.outputs.iter().all(|o| o.tokens.is_empty()));
        assert!(
            s.outputs.iter().any(|o| o.tokens != s.outputs[0].tokens),
            "different seeds should not all agree at temperature 0.9"
        );
    }
    Ok(())
}

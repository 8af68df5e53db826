//! Quality checks on the real default models (fetched by scripts/fetch-models.sh) against
//! references produced by the peer implementations (fixtures under tests/fixtures/, each with
//! the script that made it under scripts/fixtures/):
//! - the GGUF-metadata tokenizer encodes and decodes exactly like llama.cpp;
//! - greedy output matches llama.cpp's first 32 tokens on most prompts;
//! - SmolLM2 knows the capital of France, Qwen2.5-Coder starts its SQL with SELECT;
//! - SmolLM2 under a JSON schema gives JSON that validates; a grammar its greedy answer already
//!   follows changes nothing;
//! - MiniLM vectors match sentence-transformers.
//!
//! These tests fail (not skip) when the models are missing. Set FLYWHEEL_SKIP_REAL_MODELS=1 to
//! skip them deliberately on a machine without the models.

use flywheel_api::{ChatMessage, FinishReason, GenerateRequest, Grammar, SamplingParams};
use flywheel_runtime::{EmbeddingModel, LoadOptions, TextModel};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn skip() -> bool {
    std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1")
}

fn model_path(rel: &str) -> String {
    let p = root().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first (or set FLYWHEEL_SKIP_REAL_MODELS=1)",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

const SMOLLM: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN: &str = "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

fn smollm() -> &'static TextModel {
    static M: OnceLock<TextModel> = OnceLock::new();
    M.get_or_init(|| {
        TextModel::load(&model_path(SMOLLM), &LoadOptions::default()).expect("load SmolLM2")
    })
}

fn qwen() -> &'static TextModel {
    static M: OnceLock<TextModel> = OnceLock::new();
    M.get_or_init(|| {
        TextModel::load(&model_path(QWEN), &LoadOptions::default()).expect("load Qwen2.5-Coder")
    })
}

fn fixture(name: &str) -> Value {
    let p = root().join("tests/fixtures").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tokenizer(tm: &TextModel, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "fixture has too few cases");
    let mut failures = vec![];
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tm.tokenizer().encode(text, false).unwrap();
        if got != want {
            failures.push(format!(
                "encode {text:?}:\n  llama.cpp {want:?}\n  flywheel  {got:?}"
            ));
            continue;
        }
        let decoded = tm.tokenizer().decode(&got, false).unwrap();
        if let Some(d) = c["decoded"].as_str() {
            if decoded != d {
                failures.push(format!(
                    "decode {text:?}: llama.cpp {d:?}, flywheel {decoded:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    if skip() {
        return;
    }
    check_tokenizer(smollm(), "tokenizer-smollm2.json");
}

#[test]
fn qwen_tokenizer_matches_llama_cpp() {
    if skip() {
        return;
    }
    check_tokenizer(qwen(), "tokenizer-qwen2.5-coder.json");
}

fn greedy(max: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(String::new(), max);
    r.sampling = SamplingParams::greedy();
    r
}

/// One fixture prompt: its ids, llama.cpp's greedy continuation, llama.cpp's top-1 minus top-2
/// logit at each continuation token, and the rendered prompt.
struct GreedyCase {
    prompt: Vec<u32>,
    want: Vec<u32>,
    margins: Vec<f64>,
    text: String,
}

fn greedy_cases(file: &str) -> Vec<GreedyCase> {
    let fx = fixture("greedy-llamacpp.json");
    let cases: Vec<GreedyCase> = fx["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["model_file"].as_str() == Some(file))
        .map(|c| GreedyCase {
            prompt: ids_of(&c["prompt_ids"]),
            want: ids_of(&c["generated_ids"]),
            margins: c["top2_margins"]
                .as_array()
                .expect("top2_margins")
                .iter()
                .map(|m| m.as_f64().expect("a margin"))
                .collect(),
            text: c["prompt_text"].as_str().unwrap().to_string(),
        })
        .collect();
    assert_eq!(cases.len(), 5, "{file}: expected 5 prompts in the fixture");
    for c in &cases {
        assert_eq!(c.margins.len(), c.want.len(), "{file}: a margin per token");
    }
    cases
}

/// Where llama.cpp's own top two logits are closer than this, the token is a near-tie: each
/// engine's quantization noise (0.12–0.18 logits, standard deviation, measured on SmolLM2) can
/// pick either one.
const NEAR_TIE: f64 = 0.3;

/// Free-running greedy generation against llama.cpp's: how many prompts give its first 32 tokens
/// exactly, and for the others where they part and how close llama.cpp's own choice was there.
/// A divergence at a token llama.cpp was sure of (margin >= [`NEAR_TIE`]) is returned apart.
fn free_running_agreement(file: &str, tm: &TextModel) -> (usize, Vec<String>, Vec<String>) {
    let (mut agree, mut near_ties, mut sure) = (0, vec![], vec![]);
    for GreedyCase {
        prompt,
        want,
        margins,
        text,
    } in greedy_cases(file)
    {
        // Our tokenizer gives llama.cpp's prompt ids from the rendered text.
        assert_eq!(tm.tokenizer().encode(&text, false).unwrap(), prompt);
        let req = greedy(want.len());
        let out = tm
            .generate_ids(&[(prompt, &req)], &mut [&mut flywheel_api::NullSink])
            .unwrap()
            .remove(0);
        let n = want.len().min(32);
        if out.tokens.len() >= n && out.tokens[..n] == want[..n] {
            agree += 1;
            continue;
        }
        let first = out
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        let margin = margins.get(first).copied().unwrap_or(f64::INFINITY);
        let line = format!(
            "{:?}: first difference at token {first}, where llama.cpp's top two logits are {margin:.3} apart",
            text.lines().nth(3).unwrap_or("")
        );
        if margin < NEAR_TIE {
            near_ties.push(line);
        } else {
            sure.push(line);
        }
    }
    (agree, near_ties, sure)
}

/// Qwen2.5-Coder: free-running, flywheel parts from llama.cpp only where llama.cpp itself was
/// at a near-tie (no engine reproduces another's token there: the matmuls round differently),
/// and it gives llama.cpp's first 32 tokens on most prompts.
#[test]
fn qwen_greedy_tokens_match_llama_cpp_on_most_prompts() {
    if skip() {
        return;
    }
    let (agree, near_ties, sure) = free_running_agreement(QWEN, qwen());
    assert!(
        sure.is_empty(),
        "parted from llama.cpp where it was sure:\n{}",
        sure.join("\n")
    );
    assert!(
        agree >= 3,
        "identical first 32 tokens on {agree}/5 prompts\n{}",
        near_ties.join("\n")
    );
    eprintln!("{QWEN}: identical on {agree}/5\n{}", near_ties.join("\n"));
}

/// SmolLM2-135M at Q4_1 sits at near-ties (top-2 logits within 0.1) where each engine's
/// quantization noise (about one logit from the exact f32 result, the same size for llama.cpp
/// and for flywheel) decides the token, so the count of identical free-running prompts is
/// reported, not asserted; asserted is that each one parts only at a near-tie. It is a test of bit-exactness there, not of correctness: with activations quantized to Q8
/// per matmul, a one-ulp change upstream moves these logits by 0.12–0.18 (standard deviation,
/// measured), as much as flywheel and llama.cpp differ, and llama.cpp itself gives the fixture's
/// first 32 tokens on only 2/5 prompts with its flash attention and 0/5 with an f32 KV cache
/// (`scripts/fixtures/llamacpp_self_agreement.py`).
/// What is asserted for both models: teacher-forced on llama.cpp's continuation, llama.cpp's
/// token is our argmax at >= 90% of positions, and never more than 0.5 logits below our best
/// nor outside our top 3. A real defect (RoPE, permutation, a kernel) fails this by far.
#[test]
fn llama_cpp_continuations_are_our_greedy_choices() {
    if skip() {
        return;
    }
    for (file, tm) in [(SMOLLM, smollm()), (QWEN, qwen())] {
        let (mut top1, mut total) = (0, 0);
        for GreedyCase {
            prompt,
            want: gen,
            text,
            ..
        } in greedy_cases(file)
        {
            let all: Vec<u32> = prompt.iter().chain(&gen).cloned().collect();
            let mut cache = tm.model().new_cache(vec![0]);
            let ids = candle_core::Tensor::new(all.as_slice(), &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = tm
                .model()
                .forward(&ids, &mut cache, flywheel_models::Logits::All)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let rows = logits.to_vec2::<f32>().unwrap();
            for (j, &t) in gen.iter().enumerate() {
                let row = &rows[prompt.len() - 1 + j];
                let best = row.iter().cloned().fold(f32::MIN, f32::max);
                let rank = row.iter().filter(|&&x| x > row[t as usize]).count();
                let gap = best - row[t as usize];
                assert!(rank < 3 && gap <= 0.5, "{file}: {:?} token {j}: llama.cpp's choice has rank {rank}, {gap:.2} below our best", text.lines().nth(3));
                top1 += usize::from(rank == 0);
                total += 1;
            }
        }
        assert!(
            top1 * 10 >= total * 9,
            "{file}: llama.cpp's token is our argmax at {top1}/{total} positions"
        );
        eprintln!("{file}: teacher-forced top-1 agreement {top1}/{total}");
    }
    // Free-running SmolLM2 parts from llama.cpp early (see above), but only at near-ties.
    let (agree, near_ties, sure) = free_running_agreement(SMOLLM, smollm());
    assert!(
        sure.is_empty(),
        "{SMOLLM}: parted from llama.cpp where it was sure:\n{}",
        sure.join("\n")
    );
    eprintln!(
        "{SMOLLM}: free-running identical first 32 tokens on {agree}/5 prompts\n{}",
        near_ties.join("\n")
    );
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    if skip() {
        return;
    }
    // With the template's built-in system prompt ("…named SmolLM, trained by Hugging Face") the
    // Q4_1 model answers "L'Étoile, la Cité…" in llama.cpp too (tests/fixtures/greedy-llamacpp.json);
    // with a plain system prompt both engines answer "The capital of France is Paris."
    let tm = smollm();
    let prompt = tm
        .render_chat(&[
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "What is the capital of France?"),
        ])
        .unwrap();
    let mut req = greedy(48);
    req.prompt = prompt;
    let out = tm.generate(&req, &mut flywheel_api::NullSink).unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
}

#[test]
fn smollm2_fills_a_json_schema_under_a_grammar() {
    if skip() {
        return;
    }
    let tm = smollm();
    let prompt = tm
        .render_chat(&[
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new(
                "user",
                "Invent a person and describe them as a JSON object with their name and age.",
            ),
        ])
        .unwrap();
    let schema = r#"{"type": "object",
        "properties": {"name": {"type": "string"},
                       "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": false}"#;
    let mut req = greedy(64).with_grammar(Grammar::JsonSchema(schema.into()));
    req.prompt = prompt;
    let out = tm.generate(&req, &mut flywheel_api::NullSink).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
    let v: Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", out.text));
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 2, "{:?}", out.text);
    let name = o["name"].as_str().expect("name is a string");
    assert!(!name.trim().is_empty(), "{:?}", out.text);
    let age = o["age"].as_i64().expect("age is an integer");
    assert!((0..=150).contains(&age), "{:?}", out.text);
}

#[test]
fn smollm2_greedy_answer_is_unchanged_by_a_grammar_it_already_follows() {
    if skip() {
        return;
    }
    // The whole 49k vocabulary's token bytes decode like the tokenizer decodes each id.
    let tm = smollm();
    let compiler = tm.grammar_compiler().unwrap();
    let tok = tm.tokenizer();
    for id in 0..tok.vocab_size() as u32 {
        let bytes = compiler.token(id);
        if bytes.first() == Some(&0xFF) {
            assert!(tok.special_tokens().values().any(|&s| s == id), "id {id}");
            continue;
        }
        let want = tok.decode(&[id], false).unwrap();
        assert_eq!(String::from_utf8_lossy(bytes), want, "id {id}");
    }
    let prompt = tm
        .render_chat(&[
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "What is the capital of France?"),
        ])
        .unwrap();
    let mut req = greedy(48);
    req.prompt = prompt;
    let free = tm.generate(&req, &mut flywheel_api::NullSink).unwrap();
    assert_eq!(
        free.finish_reason,
        FinishReason::Stop,
        "ends with <|im_end|>"
    );
    let any = req.clone().with_grammar(Grammar::Regex("(.|\n)*".into()));
    let out = tm.generate(&any, &mut flywheel_api::NullSink).unwrap();
    assert_eq!((&out.tokens, &out.text), (&free.tokens, &free.text));
    assert_eq!(out.finish_reason, FinishReason::Stop);
}

#[test]
fn qwen_coder_answers_with_a_select() {
    if skip() {
        return;
    }
    let tm = qwen();
    let q = "Given the SQLite schema:\nCREATE TABLE singer (singer_id INT, name TEXT, country TEXT, age INT);\n\
             Write one SQL query that answers: How many singers are from France? Reply with the SQL only.";
    let prompt = tm
        .render_chat(&[
            ChatMessage::new("system", "You are a text-to-SQL assistant."),
            ChatMessage::new("user", q),
        ])
        .unwrap();
    let mut req = greedy(64);
    req.prompt = prompt;
    let out = tm.generate(&req, &mut flywheel_api::NullSink).unwrap();
    let sql = out
        .text
        .trim()
        .trim_start_matches("```sql")
        .trim_start_matches("```")
        .trim();
    assert!(
        sql.to_uppercase().starts_with("SELECT"),
        "answer: {:?}",
        out.text
    );
    assert!(
        sql.to_lowercase().contains("singer"),
        "answer: {:?}",
        out.text
    );
}

#[test]
fn minilm_matches_sentence_transformers() {
    if skip() {
        return;
    }
    let fx = fixture("minilm-reference.json");
    let em = EmbeddingModel::load(
        &model_path("models/all-minilm-l6-v2"),
        &LoadOptions::default(),
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases
        .iter()
        .map(|c| c["sentence"].as_str().unwrap())
        .collect();
    // Batched (padded) and alone must both match the reference.
    let batched = em.embed_all(&texts, 4).unwrap();
    for (c, v) in cases.iter().zip(&batched) {
        let want: Vec<f32> = c["vector"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(v.len(), want.len());
        let cos: f32 = v.iter().zip(&want).map(|(a, b)| a * b).sum();
        let norm: f32 = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
        assert!(cos >= 0.999, "{:?}: cosine {cos}", c["sentence"]);
        let alone = em
            .embed_batch(&[c["sentence"].as_str().unwrap()])
            .unwrap()
            .remove(0);
        let d = alone
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "padding changed the vector by {d}");
    }
}

#[test]
fn info_describes_the_default_model() {
    if skip() {
        return;
    }
    let i = smollm().info();
    assert_eq!(i.architecture, "llama");
    assert!(i.tensor_types.contains_key("Q4_1"), "{:?}", i.tensor_types);
    assert_eq!(i.context_length, 8192);
    assert!(i
        .chat_template
        .as_deref()
        .unwrap_or("")
        .contains("<|im_start|>"));
    assert!(
        (130_000_000..140_000_000).contains(&i.parameters),
        "{}",
        i.parameters
    );
    assert!(
        i.eos_tokens.iter().any(|t| t == "<|im_end|>"),
        "{:?}",
        i.eos_tokens
    );
}

/// flywheel's kernels (integer matmul, prefill GEMM, fused host attention) against the
/// reference path (candle's quantized matmul and tensor attention) on the same GGUF: greedy
/// tokens on the fixture prompts. The two paths round activations differently (ties to even vs
/// away from zero), so a near-tie may flip a token; where the sequences part, the reference's
/// token must be within 0.5 logits of our best at that point (a real defect is off by far more),
/// and Qwen must give identical tokens on at least 4 of 5 prompts.
#[test]
fn greedy_tokens_match_the_candle_reference_path() {
    if skip() {
        return;
    }
    for (file, tm, n) in [(SMOLLM, smollm(), 24usize), (QWEN, qwen(), 16)] {
        let mut identical = 0;
        for GreedyCase { prompt, text, .. } in greedy_cases(file) {
            let req = greedy(n);
            let run = || {
                tm.generate_ids(
                    &[(prompt.clone(), &req)],
                    &mut [&mut flywheel_api::NullSink],
                )
                .unwrap()
                .remove(0)
                .tokens
            };
            let reference = flywheel_models::with_reference_kernels(run);
            let ours = run();
            let same = ours
                .iter()
                .zip(&reference)
                .take_while(|(a, b)| a == b)
                .count();
            if ours == reference {
                identical += 1;
                continue;
            }
            if same == reference.len() {
                // The reference stopped (end of text) where we went on: a divergence without a
                // reference token to look up.
                eprintln!(
                    "{file}: {:?} the reference ends at token {same}",
                    text.lines().nth(3)
                );
                continue;
            }
            // At the first difference: how far below our best is the reference's token?
            let ctx: Vec<u32> = prompt.iter().chain(&reference[..same]).cloned().collect();
            let mut cache = tm.model().new_cache(vec![0]);
            let ids = candle_core::Tensor::new(ctx.as_slice(), &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let row = tm
                .model()
                .forward(&ids, &mut cache, flywheel_models::Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let best = row.iter().cloned().fold(f32::MIN, f32::max);
            let gap = best - row[reference[same] as usize];
            eprintln!(
                "{file}: {:?} parts from the reference at token {same} (gap {gap:.3})",
                text.lines().nth(3)
            );
            assert!(
                gap <= 0.5,
                "{file}: {:?} token {same}: the reference's choice is {gap:.2} below our best",
                text.lines().nth(3)
            );
        }
        eprintln!("{file}: identical greedy tokens on {identical}/5 prompts");
        // SmolLM2 at Q4_1 generates through near-ties (see above), so most of its prompts may
        // part at a gap of ~0.1 logits; Qwen's margins are wide.
        let min = if file == QWEN { 4 } else { 1 };
        assert!(
            identical >= min,
            "{file}: identical on only {identical}/5 prompts"
        );
    }
}

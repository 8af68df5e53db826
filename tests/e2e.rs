//! End-to-end tests of the `flywheel` binary: each runs the real command line as a user would,
//! on tiny models written to a temp folder (seconds), plus a few on the real default models.

use candle_core::quantized::GgmlDType;
use flywheel_models::Architecture;
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_hf_folder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

// The tests are grouped in files under tests/e2e/, compiled into this one test binary.
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/rag_eval.rs"]
mod rag_eval;
#[path = "e2e/serve.rs"]
mod serve;
#[path = "e2e/sql.rs"]
mod sql;
#[path = "e2e/train.rs"]
mod train;

fn flywheel(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flywheel"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn flywheel");
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a clean failure: non-zero exit, an `error:` line containing every needle, no panic.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.lines().any(|l| l.starts_with("error:")), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn tiny_gguf(dir: &Path, arch: Architecture) -> PathBuf {
    let cfg = tiny_config(arch);
    let p = dir.join(format!("{}.gguf", arch.name()));
    write_gguf(&p, &cfg, &tiny_weights(&cfg, 1).unwrap(), GgmlDType::Q8_0).unwrap();
    p
}

#[test]
fn info_generate_tokenize_on_a_tiny_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Qwen2);
    let ms = m.to_str().unwrap();
    let out = flywheel(&["info", ms], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("architecture:   qwen2")
            && s.contains("Q8_0")
            && s.contains("context length: 64"),
        "{s}"
    );
    assert!(s.contains("<|im_start|>"), "chat template shown: {s}");

    let out = flywheel(
        &[
            "generate",
            "-m",
            ms,
            "-p",
            "hello",
            "--max-tokens",
            "7",
            "--temperature",
            "0",
            "--json",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(v["tokens"].as_array().unwrap().len() <= 7);
    assert_eq!(v["usage"]["prompt_tokens"], 4); // "he" "l" "l" "o"
    let again = flywheel(
        &[
            "generate",
            "-m",
            ms,
            "-p",
            "hello",
            "--max-tokens",
            "7",
            "--temperature",
            "0",
            "--json",
        ],
        None,
        &[],
    );
    let w: serde_json::Value = serde_json::from_str(text(&again.stdout).trim()).unwrap();
    assert_eq!(
        (&v["tokens"], &v["text"]),
        (&w["tokens"], &w["text"]),
        "greedy output must be reproducible"
    );

    let out = flywheel(
        &[
            "generate",
            "-m",
            ms,
            "-p",
            "hi",
            "--chat",
            "--max-tokens",
            "3",
            "--seed",
            "3",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = flywheel(
        &["tokenize", "-m", ms, "--json", " he<|im_start|>x"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[257,258,120]");
}

#[test]
fn chat_reads_turns_and_commands_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let out = flywheel(
        &[
            "chat",
            "-m",
            m.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        Some("hello\n/reset\n/system be brief\nhi again\n/quit\nnever read\n"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("[history cleared]") && err.contains("[system prompt set"),
        "{err}"
    );
    assert_eq!(
        text(&out.stdout).lines().count(),
        2,
        "two answers: {:?}",
        text(&out.stdout)
    );
}

#[test]
fn hf_folder_loads_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let folder = dir.path().join("tiny-hf");
    write_hf_folder(&folder, &cfg, &tiny_weights(&cfg, 2).unwrap(), 2).unwrap();
    let out = flywheel(&["info", folder.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hf-folder"));
}

#[test]
fn bad_input_fails_cleanly_with_the_name_of_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let ms = m.to_str().unwrap();
    // Missing file.
    let out = flywheel(
        &["generate", "-m", "no/such/model.gguf", "-p", "x"],
        None,
        &[],
    );
    assert_fails_with(&out, &["no/such/model.gguf", "no such file"]);
    // Prompt longer than the context.
    let long = "x".repeat(200);
    let out = flywheel(&["generate", "-m", ms, "-p", &long], None, &[]);
    assert_fails_with(&out, &["200 tokens", "context is 64"]);
    // Out-of-range sampling flag.
    let out = flywheel(
        &["generate", "-m", ms, "-p", "x", "--top-p", "0"],
        None,
        &[],
    );
    assert_fails_with(&out, &["top_p"]);
    // Truncated GGUF.
    let bytes = std::fs::read(&m).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = flywheel(&["info", cut.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["cut.gguf"]);
    // Unknown architecture in a GGUF.
    let odd = dir.path().join("odd.gguf");
    let patched: Vec<u8> = {
        let needle = b"llama";
        let mut b = bytes.clone();
        let at = b.windows(needle.len()).position(|w| w == needle).unwrap();
        b[at..at + 5].copy_from_slice(b"lxama");
        b
    };
    std::fs::write(&odd, patched).unwrap();
    let out = flywheel(&["info", odd.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["odd.gguf"]);
    // A chat with a model that has no chat template is refused clearly (the HF folder has one,
    // so strip it).
    let cfg = tiny_config(Architecture::Llama);
    let folder = dir.path().join("notemplate");
    write_hf_folder(&folder, &cfg, &tiny_weights(&cfg, 2).unwrap(), 1).unwrap();
    std::fs::write(folder.join("tokenizer_config.json"), "{}").unwrap();
    let out = flywheel(
        &[
            "generate",
            "-m",
            folder.to_str().unwrap(),
            "-p",
            "x",
            "--chat",
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["no chat template"]);
    // Malformed JSON side file: named with line and column.
    std::fs::write(
        folder.join("tokenizer_config.json"),
        "{\n \"chat_template\": oops\n}",
    )
    .unwrap();
    let out = flywheel(&["info", folder.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["tokenizer_config.json", "line 2"]);
    // Unknown device.
    let out = flywheel(
        &["generate", "-m", ms, "-p", "x", "--device", "tpu"],
        None,
        &[],
    );
    assert_fails_with(&out, &["tpu"]);
}

#[test]
fn hub_id_offline_and_not_cached_is_a_clear_message_not_a_hang() {
    let home = tempfile::tempdir().unwrap();
    let out = flywheel(
        &[
            "generate",
            "-m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "-p",
            "x",
        ],
        None,
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", home.path().to_str().unwrap()),
        ],
    );
    assert_fails_with(
        &out,
        &[
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "HF_HUB_OFFLINE",
            "not in the Hugging Face cache",
        ],
    );
}

fn real(rel: &str) -> Option<String> {
    if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        return None;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-models.sh",
        p.display()
    );
    Some(p.to_string_lossy().into_owned())
}

#[test]
fn real_default_models_through_the_cli() {
    let Some(chat) = real("models/smollm2-135m-instruct") else {
        return;
    };
    // First contact, as the README's first command: `flywheel chat` on the default model with
    // no flags takes its manifest's system prompt and sampling, and answers sensibly.
    let out = flywheel(
        &["chat", "--model", chat.as_str()],
        Some("What is the capital of France?\n"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "{}", text(&out.stdout));
    let paris = [
        "generate",
        "-m",
        chat.as_str(),
        "--chat",
        "--system",
        "You are a helpful assistant.",
        "-p",
        "What is the capital of France?",
        "--temperature",
        "0",
    ];
    let out = flywheel(&[&paris[..], &["--max-tokens", "40"]].concat(), None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "{}", text(&out.stdout));
    // A stop string ends generation and is not printed.
    let out = flywheel(
        &[&paris[..], &["--stop", "Paris", "--json"]].concat(),
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["text"], "The capital of France is ");
    assert_eq!(v["finish_reason"], "stop");

    let Some(emb) = real("models/all-minilm-l6-v2") else {
        return;
    };
    let out = flywheel(
        &["embed", "-m", &emb],
        Some("A cat sits on the mat.\nA kitten rests on a rug.\nStock prices fell sharply.\n"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let v: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            r["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(v[0].len(), 384);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.2,
        "related sentences must be closer"
    );
    assert_eq!(rows[2]["index"], 2);

    let out = flywheel(&["info", &emb], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bert"), "{}", text(&out.stdout));
}

/// A model manifest under models/ (the file scripts/fetch-models.sh reads).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Manifest {
    name: String,
    kind: String,
    format: String,
    license: String,
    upstream: String,
    source: Vec<Source>,
    output: ManifestOutput,
    #[serde(default)]
    defaults: Option<flywheel_runtime::ModelDefaults>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Source {
    registry: String,
    package: String,
    version: String,
    member: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestOutput {
    file: String,
    sha256: String,
}

#[test]
fn every_model_manifest_is_valid_and_its_model_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let mut names = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let m: Manifest = toml::from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            Some(m.name.as_str()),
            p.file_stem().and_then(|s| s.to_str()),
            "{}: name",
            p.display()
        );
        assert!(
            ["decoder", "embedder"].contains(&m.kind.as_str()),
            "{}: kind",
            p.display()
        );
        assert!(
            ["gguf", "hf-folder"].contains(&m.format.as_str()),
            "{}: format",
            p.display()
        );
        assert!(
            !m.source.is_empty()
                && m.source
                    .iter()
                    .all(|s| s.registry == "pypi" && !s.version.is_empty())
        );
        assert!(
            m.output.sha256.len() == 64 && m.output.sha256.chars().all(|c| c.is_ascii_hexdigit())
        );
        if m.format == "hf-folder" {
            assert_eq!(
                m.source.len(),
                1,
                "{}: a folder comes from one package",
                p.display()
            );
        }
        names.push(m.name.clone());
        // With the weights present, `flywheel info` loads the model the manifest describes.
        if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
            continue;
        }
        let folder = dir.join(&m.name);
        assert!(
            folder.join(&m.output.file).is_file(),
            "{} missing: run scripts/fetch-models.sh",
            m.output.file
        );
        let out = flywheel(&["info", folder.to_str().unwrap()], None, &[]);
        assert!(out.status.success(), "{}: {}", m.name, text(&out.stderr));
    }
    names.sort();
    assert_eq!(
        names,
        [
            "all-minilm-l6-v2",
            "qwen2.5-coder-0.5b-instruct",
            "smollm2-135m-instruct"
        ]
    );
}

/// A tiny GGUF with a long context and no reachable end-of-sequence token.
fn long_tiny_gguf(dir: &Path) -> PathBuf {
    let mut cfg = tiny_config(Architecture::Llama);
    cfg.max_position_embeddings = 4096;
    cfg.eos_token_ids = vec![300];
    let w = tiny_weights(&cfg, 3).unwrap();
    let p = dir.join("long.gguf");
    write_gguf(&p, &cfg, &w, GgmlDType::Q8_0).unwrap();
    p
}

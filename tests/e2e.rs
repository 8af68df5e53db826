//! End-to-end tests of the `flywheel` binary: each runs the real command line as a user would,
//! on tiny models written to a temp folder (seconds), plus a few on the real default models.

use candle_core::quantized::GgmlDType;
use flywheel_models::Architecture;
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_hf_folder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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

#[test]
fn lora_train_resume_generate_with_adapter_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = ["he", "ab", "ba", "aha", "eh", "hab"]
        .iter()
        .map(|w| format!("{{\"prompt\":\"{w}\",\"completion\":\"{w}{w}\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = dir.path().join("run");
    let recipe = dir.path().join("r.toml");
    let write_recipe = |extra: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalid_split = 0.3\nmax_seq_len = 64\n[lora]\ntarget_modules = \"all-linear\"\n[optimizer]\nlr = 0.01\n[batch]\nsize = 2\nmax_steps = 4\n[checkpoint]\nevery = 2\n[output]\ndir = \"{}\"\n{extra}",
                m.display(),
                data.display(),
                run.display()
            ),
        )
        .unwrap()
    };
    // A typo in the recipe is named with its line.
    write_recipe("[eval]\nevry = 3\n");
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["evry", "r.toml"]);
    write_recipe("");
    let out = flywheel(
        &["lora-train", recipe.to_str().unwrap(), "--dry-run"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(plan["total_steps"], 4);
    assert_eq!(plan["adapted_modules"], 14);
    assert_eq!(
        plan["train_examples"].as_u64().unwrap() + plan["valid_examples"].as_u64().unwrap(),
        6
    );
    assert!(!run.exists(), "a dry run writes nothing");
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("done: 4 steps") && err.contains("trainable parameters"),
        "{err}"
    );
    let adapter = run.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    // Running the finished run again without --resume is refused; with --resume it is a no-op.
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["--resume"]);
    let out = flywheel(
        &["lora-train", recipe.to_str().unwrap(), "--resume"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Generation with the adapter differs from the base (B moved away from zero).
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--prompt",
            "he",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = flywheel(&args, None, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        v["tokens"].clone()
    };
    let base = gen(&[]);
    let tuned = gen(&["--adapter", adapter.to_str().unwrap()]);
    assert_ne!(base, tuned);
    // Merge writes a Hugging Face folder that generates what base + adapter generates.
    let merged = dir.path().join("merged");
    let out = flywheel(
        &[
            "merge",
            "-m",
            m.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    let out = flywheel(&["info", merged.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A missing adapter folder is named.
    let out = flywheel(
        &[
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--adapter",
            "no/such/adapter",
            "--prompt",
            "x",
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["no/such/adapter"]);
}

#[test]
fn ctrl_c_during_lora_train_saves_a_checkpoint_and_says_how_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, "{\"prompt\":\"he\",\"completion\":\"hehe\"}\n{\"prompt\":\"ab\",\"completion\":\"abab\"}\n").unwrap();
    let run = dir.path().join("run");
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[batch]\nsize = 2\nmax_steps = 1000000\n[checkpoint]\nevery = 0\n[output]\ndir = \"{}\"\n",
            m.display(),
            data.display(),
            run.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["lora-train", recipe.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then interrupt it like a user pressing Ctrl-C.
    let metrics = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.lines().count() >= 3) {
        assert!(t0.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("--resume") && err.contains("stopped at step"),
        "{err}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    assert!(ckpts[0].starts_with("step-"));
    assert!(
        !run.join("adapter").exists(),
        "an interrupted run writes no final adapter"
    );
}

/// A running `flywheel serve`; killed on drop if still running.
struct Server {
    child: Option<std::process::Child>,
    url: String,
}

impl Server {
    /// Starts the server with `--port 0` and waits for its readiness line.
    fn start(args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flywheel serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(300))
            .expect("the server never said it was listening");
        let url = line
            .strip_prefix("flywheel serve: listening on ")
            .unwrap_or_else(|| panic!("unexpected readiness line {line:?}"))
            .to_string();
        Server {
            child: Some(child),
            url,
        }
    }

    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the process to exit (at most `secs`).
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed().as_secs() > secs {
                let _ = child.kill();
                panic!("the server did not exit within {secs} s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 POST over a plain socket; returns the whole response as text.
fn http_post(addr: &str, path: &str, body: &str, on_first_bytes: impl FnOnce()) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    on_first_bytes();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    format!("{}{rest}", first[0] as char)
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

#[test]
fn serve_finishes_running_requests_on_sigterm_and_cancels_them_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let m = long_tiny_gguf(dir.path());
    let body = r#"{"model":"long","prompt":"hello","max_tokens":1500,"temperature":0,"stream":true,"ignore_eos":true}"#;
    for (grace, want) in [
        ("30", "\"finish_reason\":\"length\""),
        ("0", "\"finish_reason\":\"cancelled\""),
    ] {
        let mut server =
            Server::start(&["--model", m.to_str().unwrap(), "--shutdown-grace-s", grace]);
        let addr = server.addr();
        let reply = http_post(&addr, "/v1/completions", body, || server.signal("-TERM"));
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.contains(want),
            "grace {grace}: no {want} in the stream"
        );
        assert!(
            reply.contains("data: [DONE]"),
            "grace {grace}: stream not closed cleanly"
        );
        let status = server.wait(60);
        assert!(status.success(), "grace {grace}: exit status {status}");
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "still accepting connections after shutdown"
        );
    }
}

#[test]
fn serve_refuses_bad_startup_options_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let ms = m.to_str().unwrap();
    let out = flywheel(
        &["serve", "--model", ms, "--adapter", "noequals"],
        None,
        &[],
    );
    assert_fails_with(&out, &["--adapter noequals", "NAME=FOLDER"]);
    let out = flywheel(
        &[
            "serve",
            "--model",
            ms,
            "--adapter",
            "x=/nonexistent/adapter",
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["--adapter x=/nonexistent/adapter"]);
    let out = flywheel(&["serve", "--model", "/nonexistent/model.gguf"], None, &[]);
    assert_fails_with(&out, &["/nonexistent/model.gguf"]);
    let out = flywheel(
        &["serve", "--model", ms, "--adapters-dir", "/nonexistent/dir"],
        None,
        &[],
    );
    assert_fails_with(&out, &["--adapters-dir /nonexistent/dir"]);
}

/// The official Python `openai` client against a real server on a real socket: SmolLM2 with
/// a PEFT adapter, MiniLM embeddings, hot load and unload, 32 batched requests over the base
/// and three adapters, API key.
#[test]
fn serve_works_with_the_official_openai_client() {
    let (Some(model), Some(embedder)) = (
        real("models/smollm2-135m-instruct"),
        real("models/all-minilm-l6-v2"),
    ) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-client/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup-test-client.sh",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    // Four distinct adapters: the PEFT fixture, and copies with B scaled.
    let fixture = flywheel_peft::Adapter::load(
        &root.join("tests/fixtures/peft-adapter-smollm2"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    for (name, factor) in [("fx", 1.0), ("fx2", 3.0), ("fx3", -2.0), ("hot-src", 0.5)] {
        let mut a = fixture.clone();
        for (_, b) in a.weights.values_mut() {
            *b = (&*b * factor).unwrap();
        }
        a.save(&dir.path().join(name), "smollm2").unwrap();
    }
    let ad = |n: &str| format!("{n}={}", dir.path().join(n).display());
    let server = Server::start(&[
        "--model",
        &model,
        "--adapter",
        &ad("fx"),
        "--adapter",
        &ad("fx2"),
        "--adapter",
        &ad("fx3"),
        "--adapters-dir",
        dir.path().to_str().unwrap(),
        "--embedding-model",
        &embedder,
        "--api-key",
        "test-key",
    ]);
    let out = Command::new(&python)
        .arg(root.join("tests/fixtures/openai_client_check.py"))
        .args([
            "--base-url",
            &format!("{}/v1", server.url),
            "--adapter",
            "fx",
            "--hot-load-path",
            "hot-src",
            "--embedding-model",
            "all-minilm-l6-v2",
            "--api-key",
            "test-key",
            "--batch-models",
            "fx,fx2,fx3",
        ])
        .output()
        .unwrap();
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "{report}");
    assert!(report.contains("ok batched_equals_alone"), "{report}");
    assert!(
        report.contains("ok hot_load") && report.contains("ok embeddings"),
        "{report}"
    );
}

/// A folder of `n` small Markdown pages (page i mentions topic i) and a tiny BERT embedder.
fn rag_corpus(dir: &Path, n: usize, version: &str) -> (PathBuf, PathBuf) {
    let docs = dir.join("docs");
    for i in 0..n {
        let sub = if i % 2 == 0 { "guides" } else { "ref" };
        let p = docs.join(sub).join(format!("page{i:02}.md"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            &p,
            format!("# Page {i}\n\nTopic{i} is explained here ({version}).\n\n## Details\n\nMore about topic{i} and its options.\n"),
        )
        .unwrap();
    }
    let bert = dir.join("bert");
    if !bert.exists() {
        flywheel_runtime::testing::write_tiny_bert_folder(&bert, 9).unwrap();
    }
    (docs, bert)
}

#[test]
fn rag_index_search_ask_eval_and_a_killed_index_run_leaves_the_store_intact() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (docs, bert) = rag_corpus(dir.path(), 30, "v1");
    let store = dir.path().join("kb.sqlite");
    let (s, d, b) = (
        store.to_str().unwrap(),
        docs.to_str().unwrap(),
        bert.to_str().unwrap(),
    );
    let out = flywheel(
        &["rag", "index", "--store", s, "--embedder", b, d],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["added"], 30, "{report}");
    let before = flywheel_rag::Store::open(&store).unwrap();
    let old_text = before.document_text("guides/page00.md").unwrap().unwrap();
    let old_chunks = before.chunk_count().unwrap();
    drop(before);

    // Change 10 pages and add 5, then kill -9 an index run while it is inside its transaction.
    let (docs, _) = rag_corpus(dir.path(), 10, "v2");
    for i in 30..35 {
        std::fs::write(
            docs.join(format!("guides/new{i}.md")),
            format!("# New {i}\n\nfresh text {i}\n"),
        )
        .unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["rag", "index", "--store", s, "--embedder", b, d])
        .env("FLYWHEEL_TEST_PAUSE_AFTER_DOCS", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .expect("index run ended before pausing")
            .unwrap();
        if line.contains("paused inside the index transaction") {
            break;
        }
        seen.push(line);
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let st = flywheel_rag::Store::open(&store).unwrap();
    st.check().unwrap();
    assert_eq!(
        st.documents().unwrap().len(),
        30,
        "the killed run changed the store"
    );
    assert_eq!(
        st.document_text("guides/page00.md").unwrap().unwrap(),
        old_text
    );
    assert_eq!(st.chunk_count().unwrap(), old_chunks);
    drop(st);

    // A normal run afterwards applies the changes.
    let out = flywheel(&["rag", "index", "--store", s, d], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&report["added"], &report["updated"], &report["unchanged"]),
        (&5.into(), &10.into(), &20.into()),
        "{report}"
    );

    // Search: BM25 finds the page that names the topic; filters hold; JSON lines parse.
    let out = flywheel(
        &[
            "rag",
            "search",
            "--store",
            s,
            "--mode",
            "bm25",
            "--json",
            "--filter",
            "path=ref/*",
            "topic7 options",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hits: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!hits.is_empty());
    assert_eq!(hits[0]["path"], "ref/page07.md");
    assert!(hits
        .iter()
        .all(|h| h["path"].as_str().unwrap().starts_with("ref/")));

    // Ask: an answer with a source list from the store; a missing store is a clear error.
    let model = long_tiny_gguf(dir.path());
    let out = flywheel(
        &[
            "rag",
            "ask",
            "--store",
            s,
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--min-similarity",
            "0",
            "--json",
            "what is topic3?",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let context = answer["context"].as_array().unwrap();
    assert!(!context.is_empty());
    for c in context {
        assert!(c["path"].as_str().unwrap().ends_with(".md"));
    }
    let out = flywheel(
        &["rag", "search", "--store", "/nonexistent/kb.sqlite", "q"],
        None,
        &[],
    );
    assert_fails_with(&out, &["/nonexistent/kb.sqlite", "rag index"]);
    let out = flywheel(
        &["rag", "search", "--store", s, "--mode", "semantic", "q"],
        None,
        &[],
    );
    assert_fails_with(&out, &["--mode", "semantic"]);

    // Eval: a table per mode from a question file with gold sections.
    let q = dir.path().join("q.jsonl");
    std::fs::write(
        &q,
        "{\"id\":\"1\",\"question\":\"topic5 options\",\"path\":\"ref/page05.md\",\"heading\":\"Details\"}\n{\"id\":\"2\",\"question\":\"topic12\",\"path\":\"guides/page12.md\",\"heading\":\"Page 12\"}\n",
    )
    .unwrap();
    let out = flywheel(
        &[
            "rag",
            "eval",
            "--store",
            s,
            "--questions",
            q.to_str().unwrap(),
            "--modes",
            "dense,bm25,hybrid",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for m in ["| dense |", "| bm25 |", "| hybrid |", "recall@5"] {
        assert!(table.contains(m), "{table}");
    }
    let bm25_row = table.lines().find(|l| l.starts_with("| bm25 |")).unwrap();
    assert!(
        bm25_row.contains("| 2 | 1.000 |"),
        "BM25 should find both gold sections first: {table}"
    );
}

#[test]
fn eval_ladder_on_the_real_models_writes_reports_compares_and_rejects_bad_specs() {
    let (Some(chat), Some(emb)) = (
        real("models/smollm2-135m-instruct"),
        real("models/all-minilm-l6-v2"),
    ) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = |rel: &str| root.join(rel).display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let spec = format!(
        r#"
name = "e2e-sql"
task = "sql"
output = "{out}"
[dataset]
path = "{test}"
limit = 3
prompt = "prompt"
reference = "completion"
db_id = "db_id"
db_dir = "{db}"
[model]
path = "{chat}"
[embedder]
path = "{emb}"
[examples]
path = "{train}"
answer = "completion"
[defaults]
max_tokens = 48
[[rungs]]
name = "prompt only"
[[rungs]]
name = "retrieved few-shot + self-correction"
few_shot = {{ k = 2, select = "question" }}
self_correct = {{ max_retries = 1 }}
"#,
        out = run_dir.display(),
        test = data("data/sql/test.jsonl"),
        db = data("data/sql/db"),
        train = data("data/sql/train.jsonl"),
    );
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let out = flywheel(&["eval", "run", spec_path.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = text(&out.stdout);
    assert!(
        md.contains("| prompt only |") && md.contains("execution_accuracy"),
        "{md}"
    );
    for f in [
        "report.md",
        "report.html",
        "ladder.png",
        "results.jsonl",
        "summary.json",
    ] {
        assert!(run_dir.join(f).exists(), "{f}");
    }
    let results = std::fs::read_to_string(run_dir.join("results.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let s = &l["scores"]["execution_accuracy"];
        assert!(s == 0.0 || s == 1.0, "{l}");
        assert!(l["prompt"].as_str().unwrap().contains("CREATE TABLE"));
    }
    // A second call finds everything done and rewrites nothing.
    let again = flywheel(&["eval", "run", spec_path.to_str().unwrap()], None, &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("6 results from an earlier run"));
    assert_eq!(
        std::fs::read_to_string(run_dir.join("results.jsonl")).unwrap(),
        results
    );
    // Reports rewrite from the results; two runs compare question by question.
    std::fs::remove_file(run_dir.join("report.html")).unwrap();
    let rep = flywheel(&["eval", "report", run_dir.to_str().unwrap()], None, &[]);
    assert!(rep.status.success() && run_dir.join("report.html").exists());
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(run_dir.join("results.jsonl"), copy.join("results.jsonl")).unwrap();
    let cmp = flywheel(
        &[
            "eval",
            "compare",
            run_dir.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert!(cmp.status.success(), "{}", text(&cmp.stderr));
    assert!(text(&cmp.stdout).contains("| copy / prompt only |"));

    // Bad specs fail with the key or file named.
    std::fs::write(&spec_path, spec.replace("limit = 3", "limit = 3\nlimt = 4")).unwrap();
    let bad = flywheel(&["eval", "run", spec_path.to_str().unwrap()], None, &[]);
    assert_fails_with(&bad, &["limt"]);
    std::fs::write(
        &spec_path,
        spec.replace("data/sql/test.jsonl", "data/sql/nope.jsonl")
            .replace(
                &run_dir.display().to_string(),
                &dir.path().join("run2").display().to_string(),
            ),
    )
    .unwrap();
    let bad = flywheel(&["eval", "run", spec_path.to_str().unwrap()], None, &[]);
    assert_fails_with(&bad, &["nope.jsonl"]);
}

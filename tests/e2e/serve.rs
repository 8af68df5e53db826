//! `flywheel serve` as a process: graceful shutdown, bad startup options, and the official
//! `openai` Python client against it.

use super::*;

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
fn a_client_that_stalls_before_its_request_head_is_disconnected() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let server = Server::start(&["--model", m.to_str().unwrap(), "--header-timeout-s", "1"]);
    let addr = server.addr();
    // Half a request head, then nothing: the server hangs up after about a second.
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(stalled, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
    stalled
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = stalled.read_to_end(&mut buf); // EOF (or a reset) once the server closes it
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(15),
        "a stalled connection was held for {:?}",
        t0.elapsed()
    );
    // A whole request is still served (here: POST on a GET endpoint, a 405 with a JSON body).
    let reply = http_post(&addr, "/health", "", || {});
    assert!(
        reply.starts_with("HTTP/1.1 405") && reply.contains("method_not_allowed"),
        "{reply}"
    );
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
    let report = client_check(
        &server,
        &[
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
        ],
    );
    assert!(report.contains("ok batched_equals_alone"), "{report}");
    assert!(
        report.contains("ok hot_load") && report.contains("ok embeddings"),
        "{report}"
    );
    // Structured output through `chat.completions.parse(response_format=PydanticModel)`,
    // random schemas checked by the `jsonschema` package, tool calls (required, named,
    // streamed, the round trip) and logprobs.
    for check in ["structured_parse", "random_schemas", "tools", "logprobs"] {
        assert!(report.contains(&format!("ok {check}")), "{report}");
    }
}

/// The same client checks of structured output, tools and logprobs on Qwen2.5-Coder, whose
/// chat template renders tools itself (SmolLM2's does not: the fallback system text).
#[test]
fn qwen_structured_output_tools_and_logprobs_through_the_openai_client() {
    let Some(model) = real("models/qwen2.5-coder-0.5b-instruct") else {
        return;
    };
    let server = Server::start(&["--model", &model]);
    let report = client_check(
        &server,
        &[
            "--only",
            "model_list,structured_parse,tools,logprobs",
            "--timeout",
            "300",
        ],
    );
    for check in ["model_list", "structured_parse", "tools", "logprobs"] {
        assert!(report.contains(&format!("ok {check}")), "{report}");
    }
}

/// Runs tests/fixtures/openai_client_check.py (the official `openai` client) against `server`
/// with `args`; asserts it passed and returns its report.
fn client_check(server: &Server, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-client/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup-test-client.sh",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("tests/fixtures/openai_client_check.py"))
        .args(["--base-url", &format!("{}/v1", server.url)])
        .args(args)
        .output()
        .unwrap();
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "{report}");
    report
}

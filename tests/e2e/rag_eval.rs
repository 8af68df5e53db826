//! `flywheel rag` (index, search, ask, eval; a killed index run) and `flywheel eval` on the
//! real models.

use super::*;

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

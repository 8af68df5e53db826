//! The ladder end to end on tiny random models and toy tasks: a text-to-SQL ladder with every
//! rung kind (fixed, question-retrieved and HyDE few-shot, a LoRA adapter, self-correction), a
//! RAG ladder with the local judge; every report file written; re-runs identical; an
//! interrupted run (with a torn last line) resumes to the same results file.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flywheel_eval::runner::{normalize_sql, Quiet, RESULTS_FILE};
use flywheel_eval::{run, EvalSpec, Observer, ResultRecord, RunOptions};
use flywheel_models::Architecture;
use flywheel_peft::{LoraConfig, LoraHook};
use flywheel_rag::{index_folder, IndexOptions, Store};
use flywheel_runtime::testing::{
    tiny_config, tiny_weights, write_hf_folder, write_tiny_bert_folder,
};
use flywheel_runtime::{EmbeddingModel, LoadOptions, ModelFormat, TextModel};

struct Toy {
    dir: tempfile::TempDir,
}

impl Toy {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

/// Models, a SQLite database, a SQL dataset, an example store, documents and their store.
fn toy() -> Toy {
    let t = Toy {
        dir: tempfile::tempdir().unwrap(),
    };
    let mut cfg = tiny_config(Architecture::Llama);
    cfg.max_position_embeddings = 4096;
    let w = tiny_weights(&cfg, 11).unwrap();
    write_hf_folder(&t.p("model"), &cfg, &w, 1).unwrap();
    write_tiny_bert_folder(&t.p("bert"), 5).unwrap();

    // A random adapter (B non-zero, so it changes the output).
    let lcfg = LoraConfig {
        r: 4,
        alpha: 64.0,
        ..LoraConfig::default()
    };
    let hook = LoraHook::for_config(&lcfg);
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: Some(DType::F32),
    };
    let _m = TextModel::load_with_hook(
        &ModelFormat::resolve(t.p("model").to_str().unwrap()).unwrap(),
        &opts,
        &hook,
    )
    .unwrap();
    let tr = hook
        .init_trainable(&lcfg, 3, DType::F32, &Device::Cpu)
        .unwrap();
    let mut a = tr.snapshot("test").unwrap();
    for (_, (_, b)) in a.weights.iter_mut() {
        *b = Tensor::randn(0f32, 1.0, b.dims(), &Device::Cpu).unwrap();
    }
    a.save(&t.p("adapter"), "tiny").unwrap();

    // The database and the questions.
    std::fs::create_dir_all(t.p("db")).unwrap();
    let conn = rusqlite::Connection::open(t.p("db/shop.sqlite")).unwrap();
    conn.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);
         INSERT INTO items VALUES (1, 'pen', 1.5), (2, 'book', 12.0), (3, 'lamp', 30.0);",
    )
    .unwrap();
    drop(conn);
    let qs = [
        ("How many items are there?", "SELECT count(*) FROM items"),
        ("List all item names.", "SELECT name FROM items"),
        (
            "What is the most expensive item?",
            "SELECT name FROM items ORDER BY price DESC LIMIT 1",
        ),
        ("What is the average price?", "SELECT avg(price) FROM items"),
    ];
    let lines: Vec<String> = qs
        .iter()
        .enumerate()
        .map(|(i, (q, sql))| {
            serde_json::json!({
                "id": format!("q{i}"),
                "question": q,
                "prompt": format!("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);\n\nQuestion: {q}\n"),
                "sql": sql,
                "db_id": "shop",
            })
            .to_string()
        })
        .collect();
    write(&t.p("sql.jsonl"), &lines.join("\n"));
    let shots = [
        ("How many users are there?", "SELECT count(*) FROM users"),
        ("List all user names.", "SELECT name FROM users"),
        (
            "Which city has most users?",
            "SELECT city FROM users GROUP BY city ORDER BY count(*) DESC LIMIT 1",
        ),
        (
            "What is the oldest user's age?",
            "SELECT max(age) FROM users",
        ),
        ("Show the average age.", "SELECT avg(age) FROM users"),
        (
            "How many orders were placed?",
            "SELECT count(*) FROM orders",
        ),
    ];
    let lines: Vec<String> = shots
        .iter()
        .map(|(q, a)| serde_json::json!({"question": q, "answer": a}).to_string())
        .collect();
    write(&t.p("shots.jsonl"), &lines.join("\n"));

    // Documents, their store, and RAG questions with gold sections.
    write(
        &t.p("docs/install.md"),
        "# Installing\n\nUse pip to install packages: pip install requests.\n",
    );
    write(
        &t.p("docs/debug.md"),
        "# Debugging\n\nThe pdb module is the standard debugger. Call breakpoint() to stop.\n",
    );
    let embedder =
        EmbeddingModel::load(t.p("bert").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let mut store = Store::open(&t.p("kb.sqlite")).unwrap();
    index_folder(
        &mut store,
        &t.p("docs"),
        &embedder,
        &IndexOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let rag = [
        (
            "How do I install a package?",
            "Use pip install.",
            "install.md",
            "Installing",
        ),
        (
            "What is the standard debugger?",
            "The pdb module.",
            "debug.md",
            "Debugging",
        ),
        (
            "How do I stop in the debugger?",
            "Call breakpoint().",
            "debug.md",
            "Debugging",
        ),
    ];
    let lines: Vec<String> = rag
        .iter()
        .enumerate()
        .map(|(i, (q, a, p, h))| {
            serde_json::json!({"id": format!("r{i}"), "question": q, "answer": a, "path": p, "heading": h})
                .to_string()
        })
        .collect();
    write(&t.p("rag.jsonl"), &lines.join("\n"));
    t
}

fn sql_spec(t: &Toy, out: &str) -> EvalSpec {
    let text = format!(
        r#"
name = "toy-sql"
task = "sql"
output = "{out}"
[dataset]
path = "{data}"
id = "id"
prompt = "prompt"
reference = "sql"
db_id = "db_id"
db_dir = "{db}"
[model]
path = "{model}"
[embedder]
path = "{bert}"
[examples]
path = "{shots}"
[defaults]
max_tokens = 12
[[rungs]]
name = "prompt only"
[[rungs]]
name = "few-shot"
few_shot = {{ k = 2 }}
[[rungs]]
name = "retrieved few-shot"
few_shot = {{ k = 2, select = "question" }}
[[rungs]]
name = "hyde few-shot"
few_shot = {{ k = 2, select = "hyde" }}
[[rungs]]
name = "lora"
adapter = "{adapter}"
[[rungs]]
name = "lora + examples + self-correction"
adapter = "{adapter}"
few_shot = {{ k = 2, select = "question" }}
self_correct = {{ max_retries = 2, draws = 3 }}
[[rungs]]
name = "base again"
"#,
        out = t.p(out).display(),
        data = t.p("sql.jsonl").display(),
        db = t.p("db").display(),
        model = t.p("model").display(),
        bert = t.p("bert").display(),
        shots = t.p("shots.jsonl").display(),
        adapter = t.p("adapter").display(),
    );
    EvalSpec::parse(&text, "toy-sql.toml").unwrap()
}

fn read_results(dir: &Path) -> Vec<ResultRecord> {
    std::fs::read_to_string(dir.join(RESULTS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct StopAfter(usize);
impl Observer for StopAfter {
    fn example_done(&mut self, _r: &ResultRecord) -> ControlFlow<()> {
        self.0 -= 1;
        if self.0 == 0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

#[test]
fn sql_ladder_runs_every_rung_writes_reports_and_resumes_identically() {
    let t = toy();
    let spec = sql_spec(&t, "run-a");
    let out = run(&spec, &RunOptions::default(), &mut Quiet).unwrap();
    assert!(out.complete);
    assert_eq!(out.written, 7 * 4);
    for f in [
        "report.md",
        "report.html",
        "ladder.png",
        "results.jsonl",
        "timings.jsonl",
        "summary.json",
        "spec.toml",
    ] {
        let len = std::fs::metadata(out.dir.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    let png = std::fs::read(out.dir.join("ladder.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let md = std::fs::read_to_string(out.dir.join("report.md")).unwrap();
    for rung in [
        "prompt only",
        "hyde few-shot",
        "lora + examples + self-correction",
    ] {
        assert!(md.contains(&format!("| {rung} |")), "{md}");
    }
    assert!(md.contains("execution_accuracy") && md.contains("syntax error"));
    let html = std::fs::read_to_string(out.dir.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("<table>"));

    let rs = read_results(&out.dir);
    let by = |rung: &str| -> Vec<&ResultRecord> { rs.iter().filter(|r| r.rung == rung).collect() };
    // Every answer was executed and scored; a wrong one says why.
    for r in &rs {
        assert!(r.scores.contains_key("execution_accuracy"), "{r:?}");
        assert_eq!(r.correct == Some(false), r.error_class.is_some(), "{r:?}");
        assert!(r.prompt_tokens > 0 && !r.prompt.is_empty());
    }
    // Fixed few-shot shows the same examples to every question; retrieved ones are chosen per
    // question, and the prompt holds them.
    let fixed = by("few-shot");
    assert!(fixed
        .iter()
        .all(|r| r.examples.len() == 2 && r.examples == fixed[0].examples));
    for r in by("retrieved few-shot") {
        assert_eq!(r.examples.len(), 2);
        assert!(r.examples.iter().all(|q| r.prompt.contains(q.as_str())));
    }
    assert!(by("hyde few-shot").iter().all(|r| r.draft.is_some()));
    // The adapter changes the answers; the rung after it is the base model again.
    let (base, lora, again) = (by("prompt only"), by("lora"), by("base again"));
    assert!(base.iter().zip(&lora).any(|(a, b)| a.output != b.output));
    assert!(base.iter().zip(&again).all(|(a, b)| a.output == b.output));
    // Self-correction: every attempt but the last got feedback; a failing answer was retried
    // until the limit.
    let mut retried = 0;
    for r in by("lora + examples + self-correction") {
        assert!(!r.attempts.is_empty());
        let (last, rest) = r.attempts.split_last().unwrap();
        assert!(last.feedback.is_none());
        assert!(rest.iter().all(|a| a.feedback.is_some()));
        assert!(r.attempts.len() <= 3, "{}", r.attempts.len());
        // A retry that repeats an earlier attempt's SQL was drawn again, up to `draws` times.
        assert_eq!(r.attempts[0].draws, 1);
        for (i, a) in r.attempts.iter().enumerate().skip(1) {
            assert!((1..=3).contains(&a.draws), "{a:?}");
            let repeats = r.attempts[..i]
                .iter()
                .any(|b| normalize_sql(&b.sql) == normalize_sql(&a.sql));
            assert!(!repeats || a.draws == 3, "{a:?}");
            // The retry restates the task with every earlier error (the default feedback).
            assert!(a
                .prompt
                .contains("Earlier answers to this question were wrong"));
            for b in &r.attempts[..i] {
                let first_line = b.feedback.as_deref().unwrap().lines().next().unwrap();
                assert!(
                    a.prompt.contains(first_line),
                    "{first_line} not in {}",
                    a.prompt
                );
            }
        }
        retried += r.attempts.len() - 1;
    }
    assert!(retried > 0, "no answer was retried");

    // Determinism: a second run of the same spec writes the same results file.
    let first = std::fs::read(out.dir.join(RESULTS_FILE)).unwrap();
    let spec_b = sql_spec(&t, "run-b");
    run(&spec_b, &RunOptions::default(), &mut Quiet).unwrap();
    assert_eq!(
        std::fs::read(t.p("run-b").join(RESULTS_FILE)).unwrap(),
        first
    );

    // Interrupted after 9 answers, a torn line added, then resumed: the same file again.
    let spec_c = sql_spec(&t, "run-c");
    let part = run(&spec_c, &RunOptions::default(), &mut StopAfter(9)).unwrap();
    assert!(!part.complete);
    assert_eq!(part.written, 9);
    assert!(!t.p("run-c/report.md").exists());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.p("run-c").join(RESULTS_FILE))
            .unwrap();
        f.write_all(b"{\"rung\": \"few-shot\", \"id\": \"q1\", \"pro")
            .unwrap();
    }
    let rest = run(&spec_c, &RunOptions::default(), &mut Quiet).unwrap();
    assert!(rest.complete);
    assert_eq!((rest.resumed, rest.written), (9, 19));
    assert_eq!(
        std::fs::read(t.p("run-c").join(RESULTS_FILE)).unwrap(),
        first
    );

    // A changed rung is redone, the others are kept; a shorter limit reuses what is there.
    let mut changed = sql_spec(&t, "run-c");
    changed.rungs[1].max_tokens = Some(5);
    let re = run(&changed, &RunOptions::default(), &mut Quiet).unwrap();
    assert!(re.complete);
    assert_eq!((re.resumed, re.written), (24, 4));
    let rc = read_results(&t.p("run-c"));
    assert_eq!(rc.len(), 28);
    assert!(rc
        .iter()
        .filter(|r| r.rung == "few-shot")
        .all(|r| r.completion_tokens <= 5));
    let mut shorter = sql_spec(&t, "run-c");
    shorter.rungs[1].max_tokens = Some(5);
    shorter.dataset.limit = 2;
    let sh = run(&shorter, &RunOptions::default(), &mut Quiet).unwrap();
    assert_eq!((sh.resumed, sh.written), (14, 0));
    let md = std::fs::read_to_string(t.p("run-c/report.md")).unwrap();
    assert!(md.contains("(2 questions)"), "{md}");
    // Another seed (shared by every rung) is refused unless asked to start over.
    let mut reseeded = sql_spec(&t, "run-c");
    reseeded.seed = 7;
    let e = run(&reseeded, &RunOptions::default(), &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("--fresh"), "{e}");
    let fresh = run(&reseeded, &RunOptions { fresh: true }, &mut Quiet).unwrap();
    assert!(fresh.complete && fresh.resumed == 0);

    // Comparison of two runs lists every configuration.
    let cmp = flywheel_eval::compare(&t.p("run-a"), &t.p("run-c")).unwrap();
    assert!(
        cmp.contains("| run-a / lora |") && cmp.contains("| run-c / prompt only |"),
        "{cmp}"
    );
}

#[test]
fn training_data_copies_a_rungs_prompts_with_retrieved_examples() {
    let t = toy();
    let spec = sql_spec(&t, "unused");
    let mut input = spec.dataset.clone();
    input.path = t.p("shots.jsonl");
    input.id = None;
    input.prompt = None;
    input.reference = Some("answer".into());
    input.db_id = None;
    let out = t.p("train-rag.jsonl");
    let n = flywheel_eval::runner::make_training_data(&spec, "retrieved few-shot", &input, &out)
        .unwrap();
    assert_eq!(n, 6);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let shots: Vec<serde_json::Value> = std::fs::read_to_string(t.p("shots.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (line, shot) in lines.iter().zip(&shots) {
        let prompt = line["prompt"].as_str().unwrap();
        let q = shot["question"].as_str().unwrap();
        assert_eq!(line["completion"], shot["answer"]);
        // Two other examples are shown, never the question's own answer.
        assert_eq!(prompt.matches("\nSQL: ").count(), 2, "{prompt}");
        assert!(
            !prompt.contains(&format!("Question: {q}\nSQL:")),
            "{prompt}"
        );
        assert!(prompt.ends_with(q), "{prompt}");
    }
    let e = flywheel_eval::runner::make_training_data(&spec, "hyde few-shot", &input, &out)
        .unwrap_err();
    assert!(e.to_string().contains("HyDE"), "{e}");
}

#[test]
fn rag_ladder_scores_retrieval_and_counts_what_the_judge_cannot_score() {
    let t = toy();
    let text = format!(
        r#"
name = "toy-rag"
task = "rag"
output = "{out}"
[dataset]
path = "{data}"
id = "id"
reference = "answer"
gold_path = "path"
gold_heading = "heading"
[model]
path = "{model}"
[embedder]
path = "{bert}"
[judge]
method = "generate"
[defaults]
max_tokens = 10
[[rungs]]
name = "no context"
[[rungs]]
name = "rag"
retrieval = {{ store = "{store}", top_k = 2, mode = "hybrid" }}
"#,
        out = t.p("rag-run").display(),
        data = t.p("rag.jsonl").display(),
        model = t.p("model").display(),
        bert = t.p("bert").display(),
        store = t.p("kb.sqlite").display(),
    );
    let spec = EvalSpec::parse(&text, "toy-rag.toml").unwrap();
    let out = run(&spec, &RunOptions::default(), &mut Quiet).unwrap();
    assert!(out.complete);
    let rs = read_results(&out.dir);
    assert_eq!(rs.len(), 6);
    for r in &rs {
        assert!(r.scores.values().all(|v| v.is_finite()), "{r:?}");
        for m in ["token_f1", "rouge_l", "exact_match"] {
            assert!(r.scores.contains_key(m));
        }
        // Each judge metric is either a number or a counted reason, never missing.
        for m in [
            "faithfulness",
            "answer_relevancy",
            "context_precision",
            "context_recall",
        ] {
            assert!(
                r.scores.contains_key(m) != r.unscored.contains_key(m),
                "{m}: {r:?}"
            );
        }
        if r.rung == "rag" {
            assert!(!r.context.is_empty() && r.scores.contains_key("recall_at_k"));
            assert!(r.context.iter().all(|c| c.gold.is_some()));
        } else {
            assert!(r.context.is_empty());
            assert_eq!(
                r.unscored.get("faithfulness").map(String::as_str),
                Some("no context")
            );
        }
    }
    // With both docs indexed and two passages retrieved, each gold section is found.
    assert!(rs
        .iter()
        .filter(|r| r.rung == "rag")
        .all(|r| r.scores["recall_at_k"] == 1.0));
    let md = std::fs::read_to_string(out.dir.join("report.md")).unwrap();
    assert!(
        md.contains("Not scored") && md.contains("not retrieved"),
        "{md}"
    );
    // Without passages faithfulness cannot be scored at all: the rung says so, not "0%".
    assert!(md.contains("| no context | not scored |"), "{md}");
}

#[test]
fn a_run_folder_in_use_is_refused_naming_its_holder() {
    let t = toy();
    let spec = sql_spec(&t, "run-locked");
    // Another process (here: a lock this test holds) is writing the folder.
    let held = flywheel_api::lock::FolderLock::folder(&spec.output_dir()).unwrap();
    let err = run(&spec, &RunOptions::default(), &mut Quiet)
        .expect_err("a second run on the folder is refused")
        .to_string();
    assert!(
        err.contains("run-locked") && err.contains("in use"),
        "{err}"
    );
    assert!(
        !spec.output_dir().join("results.jsonl").exists(),
        "nothing written"
    );
    drop(held);
}

#[test]
fn schema_rows_sql_constraint_and_execution_voting_rungs() {
    let t = toy();
    let text = format!(
        r#"
name = "toy-sql-rungs"
task = "sql"
output = "{out}"
[dataset]
path = "{data}"
id = "id"
reference = "sql"
db_id = "db_id"
db_dir = "{db}"
[model]
path = "{model}"
[embedder]
path = "{bert}"
[examples]
path = "{shots}"
[defaults]
max_tokens = 24
template = "{{% for e in examples %}}Q: {{{{ e.question }}}}\nSQL: {{{{ e.answer }}}}\n{{% endfor %}}{{{{ schema }}}}\n\nQuestion: {{{{ question }}}}\n"
[[rungs]]
name = "schema"
[[rungs]]
name = "schema + rows"
sample_rows = 2
[[rungs]]
name = "constrained"
constrain = "sql"
[[rungs]]
name = "vote"
vote = {{ n = 4 }}
[[rungs]]
name = "constrained vote"
constrain = "sql"
vote = {{ n = 3, temperature = 1.0 }}
[[rungs]]
name = "skeleton few-shot"
few_shot = {{ k = 2, select = "skeleton" }}
"#,
        out = t.p("run-rungs").display(),
        data = t.p("sql.jsonl").display(),
        db = t.p("db").display(),
        model = t.p("model").display(),
        bert = t.p("bert").display(),
        shots = t.p("shots.jsonl").display(),
    );
    let spec = EvalSpec::parse(&text, "toy-sql-rungs.toml").unwrap();
    let out = run(&spec, &RunOptions::default(), &mut Quiet).unwrap();
    assert!(out.complete);
    let rs = read_results(&out.dir);
    let by = |rung: &str| -> Vec<&ResultRecord> { rs.iter().filter(|r| r.rung == rung).collect() };
    let create =
        "CREATE TABLE \"items\" (\"id\" INTEGER PRIMARY KEY, \"name\" TEXT, \"price\" REAL);";
    for r in by("schema") {
        assert!(
            r.prompt.contains(create) && !r.prompt.contains("rows from"),
            "{}",
            r.prompt
        );
    }
    for r in by("schema + rows") {
        assert!(
            r.prompt.contains(
                "2 rows from \"items\":\nid\tname\tprice\n1\tpen\t1.5\n2\tbook\t12.0\n*/"
            ),
            "{}",
            r.prompt
        );
    }
    // Under the grammar a query never names a table or column the database lacks.
    let conn = rusqlite::Connection::open(t.p("db/shop.sqlite")).unwrap();
    let grammar = flywheel_eval::sql::DbSchema::read(&conn, 0)
        .unwrap()
        .grammar();
    for r in by("constrained").into_iter().chain(by("constrained vote")) {
        assert_ne!(
            r.error_class.map(|c| format!("{c:?}")),
            Some("Sql(WrongTableOrColumn)".into()),
            "{r:?}"
        );
        if r.error_class.is_none() || r.correct == Some(true) {
            assert!(
                flywheel_runtime::constraint::text_matches(&grammar, r.output.trim()).unwrap(),
                "{}",
                r.output
            );
        }
    }
    // Voting: every sample recorded, the prediction is the winner's, one prefill per question.
    for (vote, plain, n) in [
        ("vote", "schema", 4),
        ("constrained vote", "constrained", 3),
    ] {
        for (v, p) in by(vote).into_iter().zip(by(plain)) {
            assert_eq!(v.votes.len(), n, "{v:?}");
            assert!(v.votes.iter().any(|s| s.sql == v.prediction), "{v:?}");
            assert_eq!(v.prompt_tokens, p.prompt_tokens, "one prefill");
            assert_eq!(
                v.completion_tokens,
                v.votes.iter().map(|s| s.tokens).sum::<usize>()
            );
        }
    }
    // Skeleton few-shot: a draft first, then two examples (never the question's own) in the
    // prompt.
    for r in by("skeleton few-shot") {
        assert!(r.draft.is_some(), "{r:?}");
        assert_eq!(r.examples.len(), 2, "{r:?}");
        for q in &r.examples {
            assert!(r.prompt.contains(&format!("Q: {q}\nSQL: ")), "{}", r.prompt);
        }
    }
    // Deterministic: a second run gives the same votes.
    let again = flywheel_eval::EvalSpec::parse(
        &text.replace("run-rungs", "run-rungs-2"),
        "toy-sql-rungs.toml",
    )
    .unwrap();
    let out2 = run(&again, &RunOptions::default(), &mut Quiet).unwrap();
    let rs2 = read_results(&out2.dir);
    for (a, b) in rs.iter().zip(&rs2) {
        assert_eq!((&a.votes, &a.prediction), (&b.votes, &b.prediction));
        assert_eq!(a.examples, b.examples);
    }
}

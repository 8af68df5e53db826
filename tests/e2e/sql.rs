//! Text-to-SQL on real models: `flywheel sql ask` on a database it has never seen (no
//! preparation step), and the grounded ladder spec (schema rows, grammar, vote, self-correction)
//! on a few held-out questions, with every report file written and every rung paired.

use super::*;

#[test]
fn sql_ask_answers_from_a_fresh_database_and_refuses_bad_input() {
    let Some(model) = real("models/qwen2.5-coder-0.5b-instruct") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);
         INSERT INTO items VALUES (1, 'pen', 1.5), (2, 'book', 12.0), (3, 'lamp', 30.0);",
    )
    .unwrap();
    drop(conn);
    let db_s = db.to_str().unwrap();
    let out = flywheel(
        &[
            "sql",
            "ask",
            "--db",
            db_s,
            "How many items are there?",
            "-m",
            &model,
            "--json",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"], serde_json::json!([["3"]]), "{v}");
    assert!(
        v["sql"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("from items"),
        "{v}"
    );
    // The text form prints the query, then the result as a table; a vote says how many agreed.
    let out = flywheel(
        &[
            "sql",
            "ask",
            "--db",
            db_s,
            "What is the name of the most expensive item?",
            "-m",
            &model,
            "--vote",
            "3",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("lamp") && shown.contains("(1 row)"),
        "{shown}"
    );
    assert!(
        text(&out.stderr).contains("of 3 samples agree"),
        "{}",
        text(&out.stderr)
    );
    // Bad input: a missing database, an unknown constraint.
    let missing = dir.path().join("nope.sqlite");
    let out = flywheel(
        &[
            "sql",
            "ask",
            "--db",
            missing.to_str().unwrap(),
            "q",
            "-m",
            &model,
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["nope.sqlite", "no such file"]);
    let out = flywheel(
        &[
            "sql",
            "ask",
            "--db",
            db_s,
            "q",
            "-m",
            &model,
            "--constrain",
            "json",
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["--constrain", "json"]);
}

#[test]
fn the_grounded_sql_ladder_runs_on_a_few_questions_with_every_report() {
    let Some(_) = real("models/qwen2.5-coder-0.5b-instruct") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // The shipped spec, with its paths made absolute and its output in the temporary folder.
    let shipped = std::fs::read_to_string(root.join("evals/sql-grounded.toml")).unwrap();
    let abs = |rel: &str| root.join(rel).display().to_string();
    let spec = shipped
        .replace("\"data/sql/", &format!("\"{}/", abs("data/sql")))
        .replace("\"models/", &format!("\"{}/", abs("models")))
        .replace(
            "seed = 42",
            &format!("seed = 42\noutput = \"{}\"", run_dir.display()),
        );
    let spec_path = dir.path().join("grounded.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let out = flywheel(
        &["eval", "run", spec_path.to_str().unwrap(), "--limit", "2"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "report.md",
        "report.html",
        "ladder.png",
        "results.jsonl",
        "summary.json",
    ] {
        let len = std::fs::metadata(run_dir.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        md.contains("paired vs previous") && md.contains("McNemar"),
        "{md}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2 * 5);
    let mut columns = std::collections::HashSet::new();
    for e in std::fs::read_dir(root.join("data/sql/db")).unwrap() {
        let conn = rusqlite::Connection::open(e.unwrap().path()).unwrap();
        let mut st = conn
            .prepare("SELECT p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'")
            .unwrap();
        let names = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
        columns.extend(names.map(|n| n.unwrap().to_lowercase()));
    }
    for l in &lines {
        let rung = l["rung"].as_str().unwrap();
        let prompt = l["prompt"].as_str().unwrap();
        assert!(prompt.contains("CREATE TABLE"), "{prompt}");
        assert_eq!(
            rung != "schema only",
            prompt.contains("3 rows from"),
            "{rung}"
        );
        if rung.starts_with("+ execution vote") {
            assert_eq!(l["votes"].as_array().map(Vec::len), Some(5), "{l}");
        }
        if rung != "schema only" && rung != "+ 3 sample rows" {
            // Under the grammar no name the databases lack can be written: a name error is
            // a real column out of scope (`T2.age` where age is another table's), never a
            // table or column that exists nowhere.
            let error = l["error"].as_str().unwrap_or_default();
            assert!(!error.contains("no such table"), "{l}");
            if let Some(name) = error.strip_prefix("no such column: ") {
                let bare = name.rsplit('.').next().unwrap().to_lowercase();
                assert!(columns.contains(&bare), "{bare} exists nowhere: {l}");
            }
        }
    }
}

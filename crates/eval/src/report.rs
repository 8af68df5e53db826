//! Reports of a run: per-rung summaries (primary metric with a 95% bootstrap interval, every
//! other metric, unscored counts, token cost, latency, error breakdown), written as
//! `report.md`, a self-contained `report.html` with the ladder chart, `ladder.png` and
//! `summary.json`; and the per-question comparison of two runs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::chart::{self, Bar};
use crate::metrics::{bootstrap_ci, mcnemar_exact, SqlErrorClass};
use crate::records::{
    read_jsonl_repair, ErrorClass, ResultRecord, Timing, RESULTS_FILE, TIMINGS_FILE,
};
use crate::spec::{EvalSpec, Task};
use crate::Result;

/// Bootstrap resamples for the intervals.
const RESAMPLES: usize = 2000;

/// What one rung achieved.
#[derive(Debug, Clone, Serialize)]
pub struct RungSummary {
    /// The rung.
    pub name: String,
    /// Questions answered.
    pub questions: usize,
    /// Questions whose primary metric was scored.
    pub scored: usize,
    /// Mean of the primary metric over scored questions.
    pub primary: f64,
    /// 95% bootstrap interval of that mean.
    pub ci: (f64, f64),
    /// Mean and count of every metric.
    pub metrics: BTreeMap<String, (f64, usize)>,
    /// Per metric, how many questions could not be scored.
    pub unscored: BTreeMap<String, usize>,
    /// Wrong answers by class.
    pub errors: BTreeMap<ErrorClass, usize>,
    /// Mean prompt tokens per question (every generation of the answer).
    pub prompt_tokens: f64,
    /// Mean generated tokens per question.
    pub completion_tokens: f64,
    /// Mean seconds per question.
    pub seconds_mean: f64,
    /// Median seconds per question.
    pub seconds_p50: f64,
    /// Paired against the rung before it (the previous scored one), on a right/wrong metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_previous: Option<Paired>,
    /// Paired against the first scored rung.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_first: Option<Paired>,
}

/// Two rungs on the same questions, when the primary metric is right/wrong (0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Paired {
    /// Questions scored by both.
    pub questions: usize,
    /// Right here, wrong in the other rung.
    pub gained: usize,
    /// Wrong here, right in the other rung.
    pub lost: usize,
    /// McNemar's exact two-sided p-value.
    pub p_value: f64,
}

/// `a` against `b` on the questions both scored, by id; `None` when the metric is not 0/1 on
/// them or no question is shared.
fn paired(records: &[ResultRecord], a: &str, b: &str, primary: &str) -> Option<Paired> {
    let scores = |rung: &str| -> BTreeMap<&str, f64> {
        records
            .iter()
            .filter(|r| r.rung == rung)
            .filter_map(|r| Some((r.id.as_str(), *r.scores.get(primary)?)))
            .collect()
    };
    let (sa, sb) = (scores(a), scores(b));
    let (mut n, mut gained, mut lost) = (0, 0, 0);
    for (id, x) in &sa {
        let Some(y) = sb.get(id) else { continue };
        if ![0.0, 1.0].contains(x) || ![0.0, 1.0].contains(y) {
            return None;
        }
        n += 1;
        match (*x == 1.0, *y == 1.0) {
            (true, false) => gained += 1,
            (false, true) => lost += 1,
            _ => {}
        }
    }
    (n > 0).then(|| Paired {
        questions: n,
        gained,
        lost,
        p_value: mcnemar_exact(gained, lost),
    })
}

/// `p` for a report: gains, losses and the p-value.
fn paired_text(p: Option<Paired>) -> String {
    match p {
        None => "—".into(),
        Some(p) => format!("+{} / −{}, p = {}", p.gained, p.lost, p_text(p.p_value)),
    }
}

fn p_text(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Summaries per rung, in `order` (rungs not in `order` follow in order of appearance).
pub fn summarize(
    records: &[ResultRecord],
    timings: &[Timing],
    order: &[String],
    primary: &str,
    seed: u64,
) -> Vec<RungSummary> {
    let mut names: Vec<String> = order.to_vec();
    for r in records {
        if !names.contains(&r.rung) {
            names.push(r.rung.clone());
        }
    }
    let mut rows = names
        .iter()
        .filter_map(|name| {
            let rs: Vec<&ResultRecord> = records.iter().filter(|r| &r.rung == name).collect();
            if rs.is_empty() {
                return None;
            }
            let prim: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.scores.get(primary).copied())
                .collect();
            let mut metrics: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut unscored: BTreeMap<String, usize> = BTreeMap::new();
            let mut errors: BTreeMap<ErrorClass, usize> = BTreeMap::new();
            for r in &rs {
                for (k, v) in &r.scores {
                    metrics.entry(k.clone()).or_default().push(*v);
                }
                for k in r.unscored.keys() {
                    *unscored.entry(k.clone()).or_default() += 1;
                }
                if let Some(c) = r.error_class {
                    *errors.entry(c).or_default() += 1;
                }
            }
            let mut secs: Vec<f64> = timings
                .iter()
                .filter(|t| &t.rung == name)
                .map(|t| t.seconds)
                .collect();
            Some(RungSummary {
                name: name.clone(),
                questions: rs.len(),
                scored: prim.len(),
                primary: mean(&prim),
                ci: bootstrap_ci(&prim, RESAMPLES, seed),
                metrics: metrics
                    .into_iter()
                    .map(|(k, v)| (k, (mean(&v), v.len())))
                    .collect(),
                unscored,
                errors,
                prompt_tokens: mean(
                    &rs.iter()
                        .map(|r| r.prompt_tokens as f64)
                        .collect::<Vec<_>>(),
                ),
                completion_tokens: mean(
                    &rs.iter()
                        .map(|r| r.completion_tokens as f64)
                        .collect::<Vec<_>>(),
                ),
                seconds_mean: mean(&secs),
                seconds_p50: median(&mut secs),
                vs_previous: None,
                vs_first: None,
            })
        })
        .collect::<Vec<_>>();
    // Paired tests, each rung against the scored rung before it and the first scored rung.
    let mut first: Option<String> = None;
    let mut prev: Option<String> = None;
    for r in rows.iter_mut() {
        if r.scored == 0 {
            continue;
        }
        r.vs_previous = prev
            .as_deref()
            .and_then(|p| paired(records, &r.name, p, primary));
        r.vs_first = first
            .as_deref()
            .filter(|f| Some(*f) != prev.as_deref())
            .and_then(|f| paired(records, &r.name, f, primary));
        first.get_or_insert_with(|| r.name.clone());
        prev = Some(r.name.clone());
    }
    rows
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// The classes of wrong answers a task reports, in display order.
fn error_columns(task: Task, rows: &[RungSummary]) -> Vec<ErrorClass> {
    use ErrorClass as E;
    use SqlErrorClass as S;
    let fixed: &[ErrorClass] = match task {
        Task::Sql => &[
            E::Sql(S::SyntaxError),
            E::Sql(S::WrongTableOrColumn),
            E::Sql(S::WrongResult),
            E::Sql(S::EmptyResult),
            E::Sql(S::NoSql),
            E::Sql(S::Timeout),
            E::Sql(S::OtherError),
        ],
        Task::Rag => &[
            E::NotRetrieved,
            E::Unfaithful,
            E::RetrievedWrong,
            E::NoRetrieval,
        ],
        Task::Qa => &[E::WrongAnswer],
    };
    let mut cols: Vec<ErrorClass> = fixed.to_vec();
    for r in rows {
        for k in r.errors.keys() {
            if !cols.contains(k) {
                cols.push(*k);
            }
        }
    }
    cols
}

/// A one-paragraph reading of the error breakdown of the last rung.
fn next_step(task: Task, rows: &[RungSummary]) -> String {
    let Some(last) = rows.last() else {
        return String::new();
    };
    let Some((class, n)) = last.errors.iter().max_by_key(|(_, n)| **n) else {
        return format!("`{}` answered every scored question correctly.", last.name);
    };
    let advice = advice(task, *class);
    format!(
        "In the last rung (`{}`), the most common error is **{class}** ({n} of {} questions): {advice}.",
        last.name, last.questions
    )
}

/// What to try next when `class` is the commonest error of a `task`.
fn advice(task: Task, class: ErrorClass) -> &'static str {
    use ErrorClass as E;
    use SqlErrorClass as S;
    match (task, class) {
        (Task::Sql, E::Sql(S::SyntaxError | S::NoSql)) => {
            "the model does not yet produce the output format reliably: model optimisation (a LoRA on the task's format) or self-correction helps most"
        }
        (Task::Sql, E::Sql(S::WrongTableOrColumn)) => {
            "the model misreads the schema: schema-grounded examples (context) and execution feedback (self-correction) target this"
        }
        (Task::Sql, E::Sql(S::EmptyResult | S::WrongResult)) => {
            "the queries run but answer another question: the model lacks the task's reasoning; more relevant examples (context) or fine-tuning on similar questions (model) are the next steps"
        }
        (Task::Rag, E::NotRetrieved) => {
            "the answer is not in the retrieved context: context optimisation (retrieval: chunking, hybrid search, HyDE, rerank) comes first"
        }
        (Task::Rag, E::Unfaithful) => {
            "the context holds the answer but the model does not use it faithfully: model optimisation (fine-tune on grounded answers) or a stronger generator"
        }
        (Task::Sql, E::Sql(S::Timeout | S::OtherError))
        | (Task::Qa | Task::Rag, E::Sql(_))
        | (Task::Sql | Task::Qa, E::NotRetrieved | E::Unfaithful)
        | (_, E::Generation | E::WrongAnswer | E::NoRetrieval | E::RetrievedWrong) => {
            "look at the per-question results to see which way to go"
        }
    }
}

fn markdown(spec: &EvalSpec, rows: &[RungSummary]) -> String {
    let primary = spec.primary_metric();
    let mut others: Vec<String> = Vec::new();
    for r in rows {
        for k in r.metrics.keys() {
            if *k != primary && !others.contains(k) {
                others.push(k.clone());
            }
        }
    }
    let mut s = format!(
        "# Eval `{}`\n\nTask `{}`, model `{}`, dataset `{}` ({} questions), seed {}. Primary metric: **{primary}** (mean over scored questions, 95% bootstrap interval).\n\n",
        spec.name,
        serde_json::to_value(spec.task).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        spec.model.path,
        spec.dataset.path.display(),
        rows.first().map_or(0, |r| r.questions),
        spec.seed
    );
    s.push_str(&format!(
        "| rung | {primary} | 95% CI | Δ vs previous | paired vs previous | paired vs first |"
    ));
    for o in &others {
        s.push_str(&format!(" {o} |"));
    }
    s.push_str(
        " prompt tok | output tok | s/question (mean / p50) | unscored |\n|---|---|---|---|",
    );
    s.push_str(&"---|".repeat(others.len() + 6));
    s.push('\n');
    let mut prev: Option<f64> = None;
    for r in rows {
        let delta = prev.map_or("—".to_string(), |p| {
            format!("{:+.1} pts", (r.primary - p) * 100.0)
        });
        if r.scored == 0 {
            s.push_str(&format!("| {} | not scored | — | — | — | — |", r.name));
        } else {
            s.push_str(&format!(
                "| {} | **{}** | {}–{} | {delta} | {} | {} |",
                r.name,
                pct(r.primary),
                pct(r.ci.0),
                pct(r.ci.1),
                paired_text(r.vs_previous),
                paired_text(r.vs_first),
            ));
        }
        for o in &others {
            match r.metrics.get(o) {
                Some((m, _)) => s.push_str(&format!(" {} |", pct(*m))),
                None => s.push_str(" — |"),
            }
        }
        let unscored: usize = r.unscored.values().sum();
        s.push_str(&format!(
            " {:.0} | {:.1} | {:.2} / {:.2} | {} |\n",
            r.prompt_tokens, r.completion_tokens, r.seconds_mean, r.seconds_p50, unscored
        ));
        if r.scored > 0 {
            prev = Some(r.primary);
        }
    }
    if rows.iter().any(|r| r.vs_previous.is_some()) {
        s.push_str("\nPaired columns: questions this rung got right that the other got wrong (+), and the reverse (−), with McNemar's exact two-sided p-value on those discordant questions; p < 0.05 marks a change unlikely to be chance on this question set.\n");
    }
    let cols = error_columns(spec.task, rows);
    s.push_str("\n## Errors per rung\n\n| rung | wrong |");
    for c in &cols {
        s.push_str(&format!(" {c} |"));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(cols.len()));
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "| {} | {} |",
            r.name,
            r.errors.values().sum::<usize>()
        ));
        for c in &cols {
            s.push_str(&format!(" {} |", r.errors.get(c).copied().unwrap_or(0)));
        }
        s.push('\n');
    }
    let unscored: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.unscored
                .iter()
                .map(move |(k, n)| format!("`{}` {k}: {n}", r.name))
        })
        .collect();
    if !unscored.is_empty() {
        s.push_str(&format!(
            "\nNot scored (no context, no statements, unreadable verdict, failing gold query): {}.\n",
            unscored.join("; ")
        ));
    }
    s.push_str(&format!(
        "\n## Next step\n\n{}\n",
        next_step(spec.task, rows)
    ));
    s
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Markdown tables to HTML tables (the report's own subset: headings, paragraphs, tables).
fn md_to_html(md: &str) -> String {
    let mut out = String::new();
    let mut in_table = false;
    for line in md.lines() {
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
                continue;
            }
            if !in_table {
                out.push_str("<table>\n");
                in_table = true;
                out.push_str("<tr>");
                for c in &cells {
                    out.push_str(&format!("<th>{}</th>", inline(c)));
                }
                out.push_str("</tr>\n");
                continue;
            }
            out.push_str("<tr>");
            for c in &cells {
                out.push_str(&format!("<td>{}</td>", inline(c)));
            }
            out.push_str("</tr>\n");
            continue;
        }
        if in_table {
            out.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("## ") {
            out.push_str(&format!("<h2>{}</h2>\n", inline(h)));
        } else if let Some(h) = line.strip_prefix("# ") {
            out.push_str(&format!("<h1>{}</h1>\n", inline(h)));
        } else if !line.trim().is_empty() {
            out.push_str(&format!("<p>{}</p>\n", inline(line)));
        }
    }
    if in_table {
        out.push_str("</table>\n");
    }
    out
}

/// `**bold**` and `` `code` `` of one line, escaped.
fn inline(s: &str) -> String {
    let e = html_escape(s);
    let mut out = String::new();
    let (mut bold, mut code) = (false, false);
    let mut rest = e.as_str();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("**") {
            out.push_str(if bold { "</b>" } else { "<b>" });
            bold = !bold;
            rest = r;
        } else if let Some(r) = rest.strip_prefix('`') {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
            rest = r;
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if code {
        out.push_str("</code>");
    }
    if bold {
        out.push_str("</b>");
    }
    out
}

fn html(spec: &EvalSpec, md: &str, svg: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}code{{background:#f3f3f3;padding:0 3px}}</style></head>\n<body>\n{}\n<h2>Ladder</h2>\n{svg}\n</body></html>\n",
        html_escape(&spec.name),
        md_to_html(md)
    )
}

/// Reads a run folder's results and timings.
pub fn read_run(dir: &Path) -> Result<(Vec<ResultRecord>, Vec<Timing>)> {
    let results = dir.join(RESULTS_FILE);
    if !results.exists() {
        return Err(crate::Error::Io {
            path: results.display().to_string(),
            reason: "no results file: is this a run folder?".into(),
        });
    }
    Ok((
        read_jsonl_repair(&results)?,
        read_jsonl_repair(&dir.join(TIMINGS_FILE))?,
    ))
}

/// Writes report.md, report.html, ladder.png and summary.json into the run folder.
pub fn write_reports(dir: &Path, spec: &EvalSpec) -> Result<Vec<RungSummary>> {
    let (mut records, mut timings) = read_run(dir)?;
    let order: Vec<String> = spec.resolved_rungs().into_iter().map(|r| r.name).collect();
    // Only this spec's rungs and questions (a run folder may hold more from a longer run).
    let ids: std::collections::HashSet<String> = crate::data::read_dataset(&spec.dataset)?
        .into_iter()
        .map(|e| e.id)
        .collect();
    records.retain(|r| order.contains(&r.rung) && ids.contains(&r.id));
    timings.retain(|t| order.contains(&t.rung) && ids.contains(&t.id));
    let primary = spec.primary_metric();
    let rows = summarize(&records, &timings, &order, &primary, spec.seed);
    let md = markdown(spec, &rows);
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: r.name.clone(),
            value: r.primary,
            ci: r.ci,
        })
        .collect();
    let title = format!("{}: {primary} per rung", spec.name);
    let svg = chart::svg(&bars, &title, &primary);
    crate::atomic_write(&dir.join("report.md"), md.as_bytes())?;
    crate::atomic_write(&dir.join("report.html"), html(spec, &md, &svg).as_bytes())?;
    crate::atomic_write(&dir.join("ladder.png"), &chart::png(&bars, &title))?;
    crate::atomic_write(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&rows)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(rows)
}

/// A markdown comparison of two runs: every rung's accuracy on the questions both runs share,
/// then each question that some configuration gets right and another gets wrong.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let (ra, _) = read_run(a)?;
    let (rb, _) = read_run(b)?;
    let label = |dir: &Path, fallback: &str| {
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| fallback.to_string())
    };
    let (la, mut lb) = (label(a, "a"), label(b, "b"));
    if la == lb {
        lb.push_str(" (b)");
    }
    // Configurations in order: every rung of a, then every rung of b.
    let mut configs: Vec<(String, String)> = Vec::new();
    for (lbl, rs) in [(&la, &ra), (&lb, &rb)] {
        for r in rs {
            let c = (lbl.clone(), r.rung.clone());
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
    }
    let mut verdict: BTreeMap<(String, String, String), Option<bool>> = BTreeMap::new();
    let mut questions: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (lbl, rs) in [(&la, &ra), (&lb, &rb)] {
        for r in rs {
            verdict.insert((lbl.clone(), r.rung.clone(), r.id.clone()), r.correct);
            if !questions.contains_key(&r.id) {
                order.push(r.id.clone());
            }
            questions
                .entry(r.id.clone())
                .or_insert_with(|| r.question.clone());
        }
    }
    let shared: Vec<&String> = order
        .iter()
        .filter(|id| ra.iter().any(|r| &r.id == *id) && rb.iter().any(|r| &r.id == *id))
        .collect();
    let mut s = format!(
        "# Comparison: `{la}` vs `{lb}`\n\n{} questions in both runs.\n\n| configuration | right | wrong | not scored |\n|---|---|---|---|\n",
        shared.len()
    );
    for (run, rung) in &configs {
        let (mut right, mut wrong, mut none) = (0, 0, 0);
        for id in &shared {
            match verdict.get(&(run.clone(), rung.clone(), (*id).clone())) {
                Some(Some(true)) => right += 1,
                Some(Some(false)) => wrong += 1,
                _ => none += 1,
            }
        }
        s.push_str(&format!(
            "| {run} / {rung} | {right} | {wrong} | {none} |\n"
        ));
    }
    s.push_str("\n## Questions where configurations disagree\n\n| question |");
    for (run, rung) in &configs {
        s.push_str(&format!(" {run} / {rung} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(configs.len()));
    s.push('\n');
    let mut disagreements = 0;
    for id in &shared {
        let marks: Vec<Option<bool>> = configs
            .iter()
            .map(|(run, rung)| {
                verdict
                    .get(&(run.clone(), rung.clone(), (*id).clone()))
                    .copied()
                    .flatten()
            })
            .collect();
        let any_right = marks.contains(&Some(true));
        let any_wrong = marks.contains(&Some(false));
        if !(any_right && any_wrong) {
            continue;
        }
        disagreements += 1;
        let q: String = questions[*id].chars().take(80).collect();
        s.push_str(&format!("| {id}: {} |", q.replace('|', "\\|")));
        for m in marks {
            s.push_str(match m {
                Some(true) => " ✔ |",
                Some(false) => " ✘ |",
                None => " — |",
            });
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "\n{disagreements} of {} questions are answered right by some configuration and wrong by another.\n",
        shared.len()
    ));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(errors: &[(ErrorClass, usize)]) -> RungSummary {
        RungSummary {
            name: "last".into(),
            questions: 10,
            scored: 10,
            primary: 0.5,
            ci: (0.4, 0.6),
            metrics: BTreeMap::new(),
            unscored: BTreeMap::new(),
            errors: errors.iter().copied().collect(),
            prompt_tokens: 0.0,
            completion_tokens: 0.0,
            seconds_mean: 0.0,
            seconds_p50: 0.0,
            vs_previous: None,
            vs_first: None,
        }
    }

    fn record(rung: &str, id: usize, right: bool) -> ResultRecord {
        serde_json::from_value(serde_json::json!({
            "rung": rung, "id": format!("q{id}"), "question": "?", "prompt": "", "output": "",
            "prediction": "", "scores": {"execution_accuracy": f64::from(u8::from(right))},
            "prompt_tokens": 1, "completion_tokens": 1,
        }))
        .unwrap()
    }

    #[test]
    fn each_rung_is_paired_with_the_one_before_and_the_first() {
        // 20 questions: `b` gains 9 and loses 1 against `a`; `c` equals `b` but for one more loss.
        let mut recs = Vec::new();
        for i in 0..20 {
            let a = i < 5;
            let b = (i < 4) || (5..14).contains(&i);
            let c = b && i != 13;
            recs.push(record("a", i, a));
            recs.push(record("b", i, b));
            recs.push(record("c", i, c));
        }
        // `d` was not scored at all and is skipped; `e` is compared with `c` and with `a`.
        for i in 0..20 {
            recs.push(record("e", i, true));
        }
        let order: Vec<String> = ["a", "b", "c", "e"].iter().map(|s| s.to_string()).collect();
        let rows = summarize(&recs, &[], &order, "execution_accuracy", 1);
        assert_eq!(rows[0].vs_previous, None);
        let p = rows[1].vs_previous.unwrap();
        assert_eq!((p.questions, p.gained, p.lost), (20, 9, 1));
        assert!((p.p_value - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(rows[1].vs_first, None, "the first is the previous");
        let p = rows[2].vs_previous.unwrap();
        assert_eq!((p.gained, p.lost, p.p_value), (0, 1, 1.0));
        let p = rows[2].vs_first.unwrap();
        assert_eq!((p.gained, p.lost), (8, 1));
        let p = rows[3].vs_first.unwrap();
        assert_eq!((p.gained, p.lost), (15, 0));
        assert_eq!(paired_text(rows[3].vs_first), "+15 / −0, p = <0.001");
        // A metric that is not right/wrong is not paired.
        let mut cont = recs.clone();
        cont[0].scores.insert("execution_accuracy".into(), 0.5);
        let rows = summarize(&cont, &[], &order, "execution_accuracy", 1);
        assert_eq!(rows[1].vs_previous, None);
        assert_eq!(paired_text(rows[3].vs_first), "—");
    }

    #[test]
    fn next_step_reads_the_commonest_error_class() {
        let sql = |c| ErrorClass::Sql(c);
        let rows = [summary(&[
            (sql(SqlErrorClass::SyntaxError), 2),
            (sql(SqlErrorClass::WrongTableOrColumn), 3),
        ])];
        let text = next_step(Task::Sql, &rows);
        assert!(
            text.starts_with("In the last rung (`last`), the most common error is **wrong table/column** (3 of 10 questions): the model misreads the schema"),
            "{text}"
        );
        // A tie goes to the class whose label sorts last, as it did when labels were the keys.
        let rows = [summary(&[
            (ErrorClass::NotRetrieved, 2),
            (ErrorClass::Unfaithful, 2),
        ])];
        assert!(next_step(Task::Rag, &rows).contains("**retrieved but unfaithful**"));
        assert_eq!(
            advice(Task::Sql, sql(SqlErrorClass::Timeout)),
            "look at the per-question results to see which way to go"
        );
        assert_eq!(
            next_step(Task::Qa, &[summary(&[])]),
            "`last` answered every scored question correctly."
        );
        // Classes a task does not list get their own column after the task's own.
        let cols = error_columns(Task::Qa, &[summary(&[(ErrorClass::Generation, 1)])]);
        assert_eq!(cols, vec![ErrorClass::WrongAnswer, ErrorClass::Generation]);
    }
}

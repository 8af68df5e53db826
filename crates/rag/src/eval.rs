//! Retrieval evaluation: questions with a gold section (document path + heading), searched in
//! several modes; recall@1/5/10, MRR@10 and nDCG@10 per mode, as a markdown table.

use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::search::{SearchOptions, Searcher};
use crate::{Error, Result};

/// One evaluation question. Extra fields in the file are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalQuestion {
    /// A unique id.
    pub id: String,
    /// The question as a user would ask it.
    pub question: String,
    /// The gold document's path, relative to the indexed folder.
    pub path: String,
    /// The gold section's heading (the last element of a relevant chunk's heading trail).
    pub heading: String,
}

/// Reads questions from a JSONL file; errors name the file and line.
pub fn read_questions(path: &Path) -> Result<Vec<EvalQuestion>> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let q: EvalQuestion = serde_json::from_str(&line).map_err(|e| Error::BadInput {
            file: path.display().to_string(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(q);
    }
    Ok(out)
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a chunk (path, heading trail) belongs to the question's gold section.
pub fn is_gold(path: &str, heading: &str, q: &EvalQuestion) -> bool {
    path == q.path && norm(heading.rsplit(" › ").next().unwrap_or("")) == norm(&q.heading)
}

/// Metrics of one mode.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeMetrics {
    /// The mode's name (`dense`, `hybrid+hyde`…).
    pub name: String,
    /// Questions evaluated.
    pub questions: usize,
    /// Questions whose gold section has no chunk in the store.
    pub gold_missing: usize,
    /// Share of questions with a gold chunk in the top 1.
    pub recall_at_1: f64,
    /// … in the top 5.
    pub recall_at_5: f64,
    /// … in the top 10.
    pub recall_at_10: f64,
    /// Mean reciprocal rank of the first gold chunk (0 beyond rank 10).
    pub mrr: f64,
    /// nDCG@10 with every gold chunk relevant.
    pub ndcg_at_10: f64,
    /// Median seconds per query.
    pub p50_s: f64,
}

/// Scores of one ranked list: (rank of first gold from 1, nDCG@10).
pub fn score_ranking(gold: &[bool], gold_total: usize) -> (Option<usize>, f64) {
    (
        crate::metrics::first_relevant(gold, 10),
        crate::metrics::ndcg(gold, gold_total, 10),
    )
}

/// Evaluates one search configuration over all questions (top 10 each).
pub fn evaluate(
    searcher: &Searcher<'_>,
    questions: &[EvalQuestion],
    name: &str,
    opts: &SearchOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<ModeMetrics> {
    let mut opts = opts.clone();
    opts.top_k = 10;
    let mut m = ModeMetrics {
        name: name.to_string(),
        questions: questions.len(),
        ..Default::default()
    };
    let mut times = Vec::with_capacity(questions.len());
    for (i, q) in questions.iter().enumerate() {
        let gold_total = searcher
            .store()
            .headings_of(&q.path)?
            .iter()
            .filter(|h| is_gold(&q.path, h, q))
            .count();
        if gold_total == 0 {
            m.gold_missing += 1;
        }
        let t = Instant::now();
        let found = searcher.search(&q.question, &opts)?;
        times.push(t.elapsed().as_secs_f64());
        let gold: Vec<bool> = found
            .hits
            .iter()
            .map(|h| is_gold(&h.path, &h.heading, q))
            .collect();
        let (first, ndcg) = score_ranking(&gold, gold_total);
        if let Some(r) = first {
            m.recall_at_1 += (r <= 1) as u8 as f64;
            m.recall_at_5 += (r <= 5) as u8 as f64;
            m.recall_at_10 += 1.0;
            m.mrr += 1.0 / r as f64;
        }
        m.ndcg_at_10 += ndcg;
        progress(i + 1);
    }
    let n = questions.len().max(1) as f64;
    m.recall_at_1 /= n;
    m.recall_at_5 /= n;
    m.recall_at_10 /= n;
    m.mrr /= n;
    m.ndcg_at_10 /= n;
    times.sort_by(f64::total_cmp);
    m.p50_s = times.get(times.len() / 2).copied().unwrap_or(0.0);
    Ok(m)
}

/// The metrics as a markdown table.
pub fn markdown_table(rows: &[ModeMetrics]) -> String {
    let mut s = String::from(
        "| mode | questions | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | p50 query |\n|---|---|---|---|---|---|---|---|\n",
    );
    for m in rows {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} ms |\n",
            m.name,
            m.questions,
            m.recall_at_1,
            m.recall_at_5,
            m.recall_at_10,
            m.mrr,
            m.ndcg_at_10,
            m.p50_s * 1000.0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_scores_match_hand_computation() {
        // Gold at ranks 2 and 4, three gold chunks exist.
        let (first, ndcg) = score_ranking(&[false, true, false, true, false], 3);
        assert_eq!(first, Some(2));
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((ndcg - dcg / idcg).abs() < 1e-12);
        assert_eq!(score_ranking(&[false; 12], 2), (None, 0.0));
        // Gold only beyond rank 10 counts for nothing.
        let mut late = vec![false; 11];
        late[10] = true;
        assert_eq!(score_ranking(&late, 1), (None, 0.0));
        assert_eq!(score_ranking(&[true], 1), (Some(1), 1.0));
    }

    #[test]
    fn gold_matches_the_last_heading_of_the_trail() {
        let q = EvalQuestion {
            id: "x".into(),
            question: "Is there a debugger?".into(),
            path: "faq/programming.html".into(),
            heading: "Is there a  debugger?".into(),
        };
        assert!(is_gold(
            "faq/programming.html",
            "Programming FAQ › General › Is there a debugger?",
            &q
        ));
        assert!(!is_gold(
            "faq/general.html",
            "Programming FAQ › General › Is there a debugger?",
            &q
        ));
        assert!(!is_gold(
            "faq/programming.html",
            "Programming FAQ › Is there a debugger? › Details",
            &q
        ));
    }

    #[test]
    fn question_files_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"question\":\"q\",\"path\":\"p\",\"heading\":\"h\",\"extra\":1}\n\n{\"id\":\"b\"}\n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(e.contains("q.jsonl") && e.contains("line 3"), "{e}");
    }
}

//! Execution voting: several sampled queries are run read-only and grouped by their results;
//! the largest group of queries that ran and returned rows wins.
//!
//! Rules, in order: a group of non-empty results beats any group of empty results, which beats
//! failed queries; within a kind, the larger group wins; a tie goes to the group whose first
//! member came first (so the outcome depends only on the samples' order, never on a hash). When
//! every sample failed, the first non-empty query wins (or the first sample).

use serde::{Deserialize, Serialize};

use crate::metrics::{Cell, ExecError};

/// What running one sample gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleClass {
    /// It ran and returned rows.
    Rows,
    /// It ran and returned nothing.
    Empty,
    /// It did not run (or there was no query).
    Error,
}

/// One voted sample, as recorded per question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteSample {
    /// The SQL extracted from the sample.
    pub sql: String,
    /// What running it gave.
    pub class: SampleClass,
    /// Its group (samples with equal results share one; errors each stand alone).
    pub group: usize,
    /// Tokens it generated.
    pub tokens: usize,
}

/// The vote over one question's samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// Every sample with its class and group.
    pub samples: Vec<VoteSample>,
    /// The winning sample (the first member of the winning group).
    pub winner: usize,
    /// Samples in the winning group.
    pub votes: usize,
}

/// A result as voting compares it: rows sorted unless order matters.
fn key(rows: &[Vec<Cell>], ordered: bool) -> Vec<Vec<Cell>> {
    let mut k = rows.to_vec();
    if !ordered {
        k.sort();
    }
    k
}

/// A sample's result: its rows and whether their order matters (a top-level ORDER BY), or why
/// it did not run.
pub type SampleResult = Result<(Vec<Vec<Cell>>, bool), ExecError>;

/// Each generated sample's SQL, tokens and result, run read-only on `conn` (at most `max_rows`
/// rows each, interrupted after `timeout`): what [`vote`] takes.
pub fn run_samples(
    conn: &rusqlite::Connection,
    outputs: &[flywheel_api::GenerateOutput],
    timeout: std::time::Duration,
    max_rows: usize,
) -> Vec<(String, usize, SampleResult)> {
    outputs
        .iter()
        .map(|o| {
            let sql = crate::metrics::extract_sql(&o.text);
            let result = crate::metrics::execute(conn, &sql, timeout, max_rows)
                .map(|(rows, _)| (rows, crate::metrics::has_top_level_order_by(&sql)));
            (sql, o.usage.completion_tokens, result)
        })
        .collect()
}

/// Votes over `samples`: each one's SQL, tokens generated, and result.
pub fn vote(samples: &[(String, usize, SampleResult)]) -> Vote {
    let mut groups: Vec<(Vec<Vec<Cell>>, Vec<usize>)> = Vec::new();
    let mut out = Vec::with_capacity(samples.len());
    let mut next_alone = usize::MAX;
    for (i, (sql, tokens, result)) in samples.iter().enumerate() {
        let (class, group) = match result {
            Ok((rows, ordered)) if !sql.trim().is_empty() => {
                let k = key(rows, *ordered);
                let g = match groups.iter().position(|(gk, _)| *gk == k) {
                    Some(g) => g,
                    None => {
                        groups.push((k, Vec::new()));
                        groups.len() - 1
                    }
                };
                groups[g].1.push(i);
                let class = if rows.is_empty() {
                    SampleClass::Empty
                } else {
                    SampleClass::Rows
                };
                (class, g)
            }
            _ => {
                // Errors are never grouped; they get ids after every result group.
                next_alone -= 1;
                (SampleClass::Error, next_alone)
            }
        };
        out.push(VoteSample {
            sql: sql.clone(),
            class,
            group,
            tokens: *tokens,
        });
    }
    // Renumber the lone errors after the result groups, in sample order.
    let errors = out.iter_mut().filter(|s| s.class == SampleClass::Error);
    for (n, s) in (groups.len()..).zip(errors) {
        s.group = n;
    }
    let best = groups
        .iter()
        .enumerate()
        .max_by(|(ga, a), (gb, b)| {
            let rank = |(k, m): &(Vec<Vec<Cell>>, Vec<usize>)| (!k.is_empty(), m.len());
            // Larger rank wins; on a tie the earlier group (smaller first member) wins.
            rank(a)
                .cmp(&rank(b))
                .then_with(|| b.1[0].cmp(&a.1[0]))
                .then_with(|| gb.cmp(ga))
        })
        .map(|(_, g)| g);
    let (winner, votes) = match best {
        Some((_, members)) => (members[0], members.len()),
        None => (
            out.iter()
                .position(|s| !s.sql.trim().is_empty())
                .unwrap_or(0),
            0,
        ),
    };
    Vote {
        samples: out,
        winner,
        votes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SqlErrorClass;

    fn rows(v: &[i64]) -> SampleResult {
        Ok((
            v.iter()
                .map(|&x| vec![crate::metrics::num_cell(x as f64)])
                .collect(),
            false,
        ))
    }
    fn err() -> SampleResult {
        Err(ExecError {
            class: SqlErrorClass::WrongTableOrColumn,
            message: "no such column: x".into(),
        })
    }
    fn s(sql: &str, r: SampleResult) -> (String, usize, SampleResult) {
        (sql.into(), 5, r)
    }

    #[test]
    fn the_largest_group_of_equal_results_wins_whatever_the_order_of_rows() {
        let v = vote(&[
            s("a", rows(&[1])),
            s("b", rows(&[2, 3])),
            s("c", rows(&[3, 2])),
            s("d", err()),
        ]);
        assert_eq!((v.winner, v.votes), (1, 2));
        let groups: Vec<usize> = v.samples.iter().map(|x| x.group).collect();
        assert_eq!(groups, vec![0, 1, 1, 2]);
        assert_eq!(v.samples[3].class, SampleClass::Error);
    }

    #[test]
    fn rows_beat_empty_results_beat_errors_and_ties_go_to_the_earliest() {
        // Three empty results outvote nothing: one non-empty result still wins.
        let v = vote(&[
            s("e1", rows(&[])),
            s("e2", rows(&[])),
            s("e3", rows(&[])),
            s("r", rows(&[7])),
        ]);
        assert_eq!((v.winner, v.votes), (3, 1));
        // A tie between two groups of two: the group seen first wins, in either order of sizes.
        let v = vote(&[
            s("x", rows(&[1])),
            s("y", rows(&[2])),
            s("y2", rows(&[2])),
            s("x2", rows(&[1])),
        ]);
        assert_eq!((v.winner, v.votes), (0, 2));
        // Empty results beat errors.
        let v = vote(&[s("bad", err()), s("e", rows(&[]))]);
        assert_eq!((v.winner, v.votes), (1, 1));
        // All failed: the first sample with a query.
        let v = vote(&[s("", err()), s("bad", err())]);
        assert_eq!((v.winner, v.votes), (1, 0));
        assert_eq!(vote(&[]).winner, 0);
    }

    #[test]
    fn ordered_results_differ_by_order() {
        let ordered = |v: &[i64]| rows(v).map(|(r, _)| (r, true));
        let v = vote(&[
            s("a", ordered(&[1, 2])),
            s("b", ordered(&[2, 1])),
            s("c", ordered(&[2, 1])),
        ]);
        assert_eq!((v.winner, v.votes), (1, 2));
    }

    #[test]
    fn voting_is_deterministic() {
        let input = || {
            vec![
                s("a", rows(&[1])),
                s("b", err()),
                s("c", rows(&[1])),
                s("d", rows(&[4])),
            ]
        };
        assert_eq!(vote(&input()), vote(&input()));
    }
}

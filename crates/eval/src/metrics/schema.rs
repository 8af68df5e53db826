//! Schema hints: the tables and columns of a database, and what to tell a model after SQLite
//! refused a table or column name (the closest names, then the whole schema).

/// The tables of a database (creation order, SQLite's own left out) with their columns.
pub fn schema_columns(conn: &rusqlite::Connection) -> Result<Vec<(String, Vec<String>)>, String> {
    let read = || -> rusqlite::Result<Vec<(String, Vec<String>)>> {
        let mut tables = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )?;
        let names: Vec<String> = tables
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut cols = conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
        names
            .into_iter()
            .map(|t| {
                let c = cols
                    .query_map([&t], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((t, c))
            })
            .collect()
    };
    read().map_err(|e| format!("cannot read the schema: {e}"))
}

/// What to tell a model after SQLite refused a name (`no such table`, `no such column`,
/// `ambiguous column name`): the names in the database closest to the refused one (at most
/// three, by edit distance ignoring case and underscores), or for an ambiguous column the tables
/// that have it, then every table with its columns. `None` for any other error, or when the
/// schema cannot be read.
pub fn schema_hint(conn: &rusqlite::Connection, message: &str) -> Option<String> {
    // ASCII lowering keeps byte offsets, so `at` indexes `message` too.
    let lower = message.to_ascii_lowercase();
    let (kind, at) = [
        "no such table:",
        "no such column:",
        "ambiguous column name:",
    ]
    .iter()
    .enumerate()
    .find_map(|(i, p)| lower.find(p).map(|at| (i, at + p.len())))?;
    let refused = message.get(at..)?.trim();
    // `main.t` or `T1.col`: the last part is the name SQLite could not resolve.
    let name = refused
        .rsplit('.')
        .next()
        .unwrap_or(refused)
        .trim_matches(['"', '`', '\'', '[', ']']);
    let schema = schema_columns(conn).ok()?;
    if schema.is_empty() {
        return None;
    }
    let norm = |s: &str| s.to_lowercase().replace(['_', ' '], "");
    // Plurals are the commonest near miss (`country` for `countries`).
    let singular = |s: &str| {
        if let Some(stem) = s.strip_suffix("ies") {
            format!("{stem}y")
        } else {
            s.strip_suffix('s').unwrap_or(s).to_string()
        }
    };
    let wanted = norm(name);
    let first = match kind {
        2 => {
            let having: Vec<String> = schema
                .iter()
                .filter(|(_, c)| c.iter().any(|c| norm(c) == wanted))
                .map(|(t, _)| format!("{t}.{name}"))
                .collect();
            (!having.is_empty()).then(|| {
                format!(
                    "Qualify the column with its table: {}.",
                    having.join(" or ")
                )
            })
        }
        _ => {
            let candidates: Vec<String> = if kind == 0 {
                schema.iter().map(|(t, _)| t.clone()).collect()
            } else {
                schema
                    .iter()
                    .flat_map(|(t, c)| c.iter().map(move |c| format!("{t}.{c}")))
                    .collect()
            };
            let mut scored: Vec<(usize, usize, &String)> = candidates
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let bare = norm(c.rsplit('.').next().unwrap_or(c));
                    let d = strsim::levenshtein(&wanted, &bare)
                        .min(strsim::levenshtein(&singular(&wanted), &singular(&bare)));
                    let contains = (wanted.len() >= 3 && bare.contains(&wanted))
                        || (bare.len() >= 3 && wanted.contains(&bare));
                    let close = d <= (wanted.chars().count() / 3).max(1);
                    (close || contains).then_some((d, i, c))
                })
                .collect();
            scored.sort();
            let near: Vec<&str> = scored.iter().take(3).map(|(_, _, c)| c.as_str()).collect();
            (!near.is_empty()).then(|| {
                format!(
                    "Names in this database close to {name}: {}.",
                    near.join(", ")
                )
            })
        }
    };
    let listing: Vec<String> = schema
        .iter()
        .map(|(t, c)| format!("{t}({})", c.join(", ")))
        .collect();
    let all = format!("The tables and their columns: {}.", listing.join("; "));
    Some(match first {
        Some(f) => format!("{f}\n{all}"),
        None => all,
    })
}
/// What self-correction tells a model about `sql` on `conn`: no query, SQLite's error with
/// [`schema_hint`], or an empty result; `None` when it ran and returned rows.
pub fn sql_feedback(
    conn: &rusqlite::Connection,
    sql: &str,
    timeout: std::time::Duration,
) -> Option<String> {
    if sql.trim().is_empty() {
        return Some("Your reply contained no SQL query.".to_string());
    }
    match super::execute(conn, sql, timeout, 1) {
        Err(e) => {
            let mut fb = format!("The query failed with this SQLite error: {}", e.message);
            if let Some(hint) = schema_hint(conn, &e.message) {
                fb.push('\n');
                fb.push_str(&hint);
            }
            Some(fb)
        }
        Ok((rows, _)) if rows.is_empty() => Some("The query ran but returned no rows.".to_string()),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::execute;
    use proptest::prelude::*;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);

    /// The hint follows SQLite's own messages: each query below fails, and the hint names the
    /// closest names and lists the schema; other errors get none.
    #[test]
    fn schema_hints_name_the_closest_tables_and_columns() {
        let conn = rusqlite::Connection::open_in_memory().expect("in-memory db");
        conn.execute_batch(
            "CREATE TABLE continents (ContId INTEGER PRIMARY KEY, Continent TEXT);
             CREATE TABLE countries (CountryId INTEGER PRIMARY KEY, CountryName TEXT,
                                     Continent INTEGER);
             CREATE TABLE car_makers (Id INTEGER PRIMARY KEY, Maker TEXT, Country TEXT);",
        )
        .expect("create tables");
        let schema = schema_columns(&conn).expect("schema");
        assert_eq!(
            schema,
            vec![
                (
                    "continents".to_string(),
                    vec!["ContId".into(), "Continent".into()]
                ),
                (
                    "countries".to_string(),
                    vec!["CountryId".into(), "CountryName".into(), "Continent".into()]
                ),
                (
                    "car_makers".to_string(),
                    vec!["Id".into(), "Maker".into(), "Country".into()]
                ),
            ]
        );
        let listing = "The tables and their columns: continents(ContId, Continent); \
countries(CountryId, CountryName, Continent); car_makers(Id, Maker, Country).";
        let hint_for = |sql: &str| {
            let e = execute(&conn, sql, T, 1).expect_err("the query fails");
            schema_hint(&conn, &e.message)
        };
        assert_eq!(
            hint_for("SELECT country_name FROM countries").as_deref(),
            Some(format!("Names in this database close to country_name: countries.CountryName, car_makers.Country.\n{listing}").as_str())
        );
        assert_eq!(
            hint_for("SELECT T2.maker FROM countries AS T2").as_deref(),
            Some(
                format!("Names in this database close to maker: car_makers.Maker.\n{listing}")
                    .as_str()
            )
        );
        assert_eq!(
            hint_for("SELECT count(*) FROM country").as_deref(),
            Some(
                format!("Names in this database close to country: countries.\n{listing}").as_str()
            )
        );
        assert_eq!(
            hint_for("SELECT Continent FROM continents JOIN countries").as_deref(),
            Some(format!("Qualify the column with its table: continents.Continent or countries.Continent.\n{listing}").as_str())
        );
        // Nothing close: the listing alone.
        assert_eq!(
            hint_for("SELECT horsepower FROM car_makers").as_deref(),
            Some(listing)
        );
        assert_eq!(hint_for("SELEC 1"), None);
        assert_eq!(schema_hint(&conn, "datatype mismatch"), None);
        // An empty database has nothing to list.
        let empty = rusqlite::Connection::open_in_memory().expect("in-memory db");
        assert_eq!(schema_hint(&empty, "no such table: t"), None);
    }

    proptest! {
        #[test]
        fn schema_hint_never_panics(
            prefix in "\\PC{0,8}",
            kind in 0usize..3,
            name in "\\PC{0,24}",
        ) {
            let conn = rusqlite::Connection::open_in_memory().expect("in-memory db");
            conn.execute_batch("CREATE TABLE \"İt_ems\" (\"naMe\" TEXT, ID INTEGER);")
                .expect("create table");
            let p = ["no such table: ", "No such column: ", "ambiguous column name: "][kind];
            let hint = schema_hint(&conn, &format!("{prefix}{p}{name}"));
            prop_assert!(hint.is_some_and(|h| h.contains("İt_ems(naMe, ID)")));
        }
    }
}

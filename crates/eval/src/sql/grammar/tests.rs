//! The SQL grammar against the prepared Spider-derived data (every gold query parses under its
//! database's grammar; the same queries with one made-up table or column never do), random
//! schemas with odd names (keywords, spaces, quotes, non-ASCII), and assorted SQLite.

use std::collections::HashMap;

use flywheel_api::Grammar;
use flywheel_runtime::constraint::{byte_compiler, Constraint};

use super::{sql_grammar, GrammarTable};

fn data() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sql")
}

/// Grammars compiled once over single bytes; texts checked against copies.
struct Checker;

impl Checker {
    fn over_bytes() -> Self {
        Checker
    }

    fn matcher(&self, grammar: &str) -> Result<Constraint, String> {
        byte_compiler("lark")
            .and_then(|c| c.compile(&Grammar::Lark(grammar.to_string())))
            .map_err(|e| e.to_string())
    }

    fn accepts(m: &Constraint, text: &str) -> bool {
        m.accepts_text(text)
    }

    fn check(&self, grammar: &str, text: &str) -> bool {
        Self::accepts(&self.matcher(grammar).expect("grammar compiles"), text)
    }
}

fn schema_of(db: &str) -> Vec<GrammarTable> {
    let conn = rusqlite::Connection::open(data().join("db").join(format!("{db}.sqlite"))).unwrap();
    let mut st = conn
        .prepare("SELECT name FROM sqlite_master WHERE type='table'")
        .unwrap();
    let names: Vec<String> = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let mut st = conn
                .prepare(&format!(
                    "PRAGMA table_info(\"{}\")",
                    name.replace('"', "\"\"")
                ))
                .unwrap();
            let columns = st
                .query_map([], |r| r.get::<_, String>(1))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            GrammarTable { name, columns }
        })
        .collect()
}

/// (split, db_id, gold query)
fn gold() -> Vec<(String, String, String)> {
    let mut out = vec![];
    for split in ["train", "valid", "test"] {
        let text = std::fs::read_to_string(data().join(format!("{split}.jsonl")))
            .expect("data/sql is missing: run scripts/prepare-sql-data.sh");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push((
                split.to_string(),
                v["db_id"].as_str().unwrap().to_string(),
                v["completion"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn matchers(c: &Checker) -> HashMap<String, (Vec<GrammarTable>, Constraint)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(data().join("db")).unwrap() {
        let p = e.unwrap().path();
        let db = p.file_stem().unwrap().to_str().unwrap().to_string();
        let schema = schema_of(&db);
        let m = c.matcher(&sql_grammar(&schema)).unwrap();
        out.insert(db, (schema, m));
    }
    out
}

#[test]
fn gold_queries_are_accepted() {
    let c = Checker::over_bytes();
    let ms = matchers(&c);
    let gold = gold();
    let mut failed = vec![];
    for (split, db, q) in &gold {
        if !Checker::accepts(&ms[db].1, q) {
            failed.push(format!("{split} {db}: {q}"));
        }
    }
    println!("accepted {}/{}", gold.len() - failed.len(), gold.len());
    for f in &failed {
        println!("REJECTED {f}");
    }
    assert!(failed.is_empty(), "{} rejected", failed.len());
}

/// Word spans (start, end) outside quotes and brackets in `q`.
fn words(q: &str) -> Vec<(usize, usize)> {
    let b = q.as_bytes();
    let (mut i, mut out) = (0, vec![]);
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' || c == b'`' || c == b'[' {
            let close = if c == b'[' { b']' } else { c };
            i += 1;
            while i < b.len() && b[i] != close {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn gold_queries_with_a_made_up_name_are_rejected() {
    let c = Checker::over_bytes();
    let ms = matchers(&c);
    let (mut tried, mut wrongly) = (0, vec![]);
    for (_, db, q) in gold() {
        let (schema, m) = &ms[&db];
        let known = |w: &str, tables: bool| {
            schema.iter().any(|t| {
                if tables {
                    t.name.eq_ignore_ascii_case(w)
                } else {
                    t.columns.iter().any(|c| c.eq_ignore_ascii_case(w))
                }
            })
        };
        let ws = words(&q);
        for (k, &(s, e)) in ws.iter().enumerate() {
            let w = &q[s..e];
            let next = q[e..].trim_start().chars().next();
            let prev = k.checked_sub(1).map(|j| &q[ws[j].0..ws[j].1]);
            if next == Some('.')
                || next == Some('(')
                || prev.is_some_and(|p| p.eq_ignore_ascii_case("as"))
            {
                continue; // qualifier, function, alias: any identifier is fine there
            }
            if !known(w, true) && !known(w, false) {
                continue;
            }
            for made_up in [format!("{w}_x"), format!("zq{w}"), "wibble".to_string()] {
                let bad = format!("{}{made_up}{}", &q[..s], &q[e..]);
                tried += 1;
                if Checker::accepts(m, &bad) {
                    wrongly.push(bad);
                }
            }
        }
    }
    println!(
        "rejected {}/{tried} queries with a made-up name",
        tried - wrongly.len()
    );
    for w in &wrongly {
        println!("ACCEPTED {w}");
    }
    assert!(wrongly.is_empty());
}

/// A tiny deterministic RNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn plain_word(r: &mut Rng) -> String {
    let n = 1 + r.below(10);
    let mut s: String = (0..n)
        .map(|i| {
            let set: &[u8] = if i == 0 {
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
            } else {
                b"abcdefghijklmnopqrstuvwxyz0123456789_ABCXYZ"
            };
            *r.pick(set) as char
        })
        .collect();
    if r.below(3) == 0 {
        s = format!("{s}_{}", r.below(100));
    }
    s
}

fn odd_name(r: &mut Rng) -> String {
    match r.below(10) {
        0 => r
            .pick(&[
                "order", "select", "group", "Key", "from", "TABLE", "where", "count", "date",
            ])
            .to_string(),
        1 => format!("{} {}", plain_word(r), plain_word(r)),
        2 => format!("{}\"q", plain_word(r)),
        3 => format!("{}`b]", plain_word(r)),
        4 => format!("{}{}", r.below(100), plain_word(r)),
        5 => format!("Ünï{}", plain_word(r)),
        6 => format!("{}(x)", plain_word(r)),
        _ => plain_word(r),
    }
}

/// A spelling SQLite accepts for `name` (random quoting and letter case).
fn spell(r: &mut Rng, name: &str, dq_ok: bool) -> String {
    let cased: String = name
        .chars()
        .map(|c| {
            if r.below(2) == 0 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let plain = cased
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii())
        && cased
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii())
        && !["order", "select", "group", "key", "from", "table", "where"]
            .contains(&name.to_ascii_lowercase().as_str());
    loop {
        match r.below(4) {
            0 if plain => return cased,
            1 if dq_ok => return format!("\"{}\"", cased.replace('"', "\"\"")),
            2 => return format!("`{}`", cased.replace('`', "``")),
            3 if !cased.contains(']') => return format!("[{cased}]"),
            _ => {}
        }
    }
}

#[test]
fn random_schemas_accept_their_names_and_refuse_others() {
    let c = Checker::over_bytes();
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut bad) = (0, 0);
    let mut failures = vec![];
    for _ in 0..40 {
        let mut tables = vec![];
        for _ in 0..1 + r.below(5) {
            let cols = (0..1 + r.below(6)).map(|_| odd_name(&mut r)).collect();
            tables.push(GrammarTable {
                name: odd_name(&mut r),
                columns: cols,
            });
        }
        let m = c
            .matcher(&sql_grammar(&tables))
            .unwrap_or_else(|e| panic!("{e}\n{tables:?}"));
        let lower = |s: &str| s.to_ascii_lowercase();
        let known: Vec<String> = tables
            .iter()
            .flat_map(|t| std::iter::once(lower(&t.name)).chain(t.columns.iter().map(|c| lower(c))))
            .collect();
        for t in &tables {
            for col in &t.columns {
                for _ in 0..3 {
                    let (ts, cs, cq) = (
                        spell(&mut r, &t.name, true),
                        spell(&mut r, col, false),
                        spell(&mut r, col, true),
                    );
                    for q in [
                        format!("SELECT {cs} FROM {ts}"),
                        format!("select x.{cq}, count(*) from {ts} as x where {cs} > 1 group by x.{cq} order by {cs} desc limit 3"),
                        format!("SELECT * FROM {ts} JOIN {ts} t2 USING ({cq})"),
                        format!("SELECT {cq} FROM {ts}"),
                    ] {
                        ok += 1;
                        if !Checker::accepts(&m, &q) {
                            failures.push(format!("REFUSED {q}"));
                        }
                    }
                }
            }
            // made-up names in table and column positions
            for _ in 0..5 {
                let u = plain_word(&mut r);
                if known.contains(&lower(&u))
                    || ["true", "false", "null"].contains(&lower(&u).as_str())
                {
                    continue;
                }
                let (ts, col) = (spell(&mut r, &t.name, true), r.pick(&t.columns).clone());
                let cs = spell(&mut r, &col, false);
                for q in [
                    format!("SELECT * FROM {u}"),
                    format!("SELECT * FROM \"{u}\""),
                    format!("SELECT * FROM [{u}]"),
                    format!("SELECT {u} FROM {ts}"),
                    format!("SELECT `{u}` FROM {ts}"),
                    format!("SELECT x.{u} FROM {ts} x"),
                    format!("SELECT x.\"{u}\" FROM {ts} x"),
                    format!("SELECT {cs} FROM {ts} WHERE {u} = 1"),
                    format!("SELECT {cs} FROM {ts} ORDER BY {u}"),
                    format!("SELECT * FROM {ts} JOIN {ts} USING ({u})"),
                    format!("SELECT {cs} FROM {ts} x JOIN {u} y ON x.{cs} = y.{cs}"),
                ] {
                    bad += 1;
                    if Checker::accepts(&m, &q) {
                        failures.push(format!("ACCEPTED {q}"));
                    }
                }
            }
        }
    }
    println!("{ok} valid and {bad} invalid queries over random schemas");
    for f in &failures {
        println!("{f}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}

#[test]
fn assorted_sqlite() {
    let c = Checker::over_bytes();
    let schema = schema_of("world_1");
    let g = sql_grammar(&schema);
    let m = c.matcher(&g).unwrap();
    let good = [
        "select * from city;",
        "SELECT DISTINCT c.Name AS n, [city].\"Population\" pop FROM city AS c LEFT OUTER JOIN country co ON c.CountryCode = co.Code WHERE NOT c.Population BETWEEN 1 AND 2e3 AND co.Name NOT LIKE 'A%' ORDER BY 1 DESC, c.name ASC LIMIT 5 OFFSET 2",
        "SELECT count(DISTINCT Language), max(Percentage) FROM countrylanguage GROUP BY CountryCode HAVING count(*) > 2 LIMIT 1, 2",
        "SELECT Name FROM country WHERE Code IN (SELECT CountryCode FROM countrylanguage) OR Code NOT IN ('a', \"b\") AND NOT EXISTS (SELECT 1 FROM city)",
        "SELECT CASE WHEN Population IS NOT NULL THEN 'x' || Name ELSE -1 END, CAST(Population AS REAL), (SELECT max(Population) FROM city) FROM city",
        "SELECT CASE Continent WHEN 'Asia' THEN 1 END FROM country UNION ALL SELECT 2 INTERSECT SELECT 3 EXCEPT SELECT 4",
        "SELECT t.* FROM (SELECT Name FROM city) AS t CROSS JOIN country, city c2 INNER JOIN city USING (ID, \"Name\")",
        "SELECT abs(-1), round(avg(Population), 2), strftime('%Y', 'now'), coalesce(NULL, 1), substr(Name, 1, 2), lower(`Name`) FROM city WHERE Population % 2 = 0 AND Population IS NULL AND Name <> '' AND Name == 'x' AND Name != 'y' AND Population >= 3 AND Population <= .5",
        "SELECT\n  Name\nFROM\n  city\nWHERE\n  ID = 1 ;",
        "SELECT 1",
        "  SELECT 1 \n",
        "SELECT(Name) FROM city",
        "SELECT Name FROM city WHERE Name='x'",
        "SELECT Name FROM city WHERE Name IS NOT NULL AND ID NOTNULL OR ID ISNULL OR ID NOT NULL",
        "SELECT -ID, +ID, ~ID, ID | 1 & 2 << 3 >> 4, x'00ff' FROM city",
        "SELECT Name COLLATE NOCASE FROM city ORDER BY Name COLLATE nocase DESC NULLS LAST",
        "SELECT * FROM city WHERE Name LIKE 'a!%' ESCAPE '!' OR Name GLOB 'A*'",
        "SELECT count(*) FROM city WHERE ID IN ()",
        "SELECT * FROM (city JOIN country ON city.CountryCode = country.Code)",
        "VALUES (1, 2), (3, 4)",
        "SELECT cast(ID AS VARCHAR(20)), cast(ID AS DOUBLE PRECISION) FROM city",
        "SELECT Name FROM city WHERE \"unknown\" = 1",
        "SELECT count(*) AS cnt FROM city GROUP BY CountryCode ORDER BY \"cnt\" DESC",
        "SELECT 'it''s', \"say \"\"hi\"\"\" FROM city",
    ];
    let bad = [
        "SELECT * FROM towns",
        "SELECT Nme FROM city",
        "SELECT city.Nme FROM city",
        "SELECT count(*) AS cnt FROM city GROUP BY CountryCode ORDER BY cnt DESC",
        "SELECT * FROM city WHERE",
        "SELECT * FROM city city city",
        "SELECT * FROM city AS select",
        "DELETE FROM city",
        "SELECT Name FROM city;;",
        "SELECT sum(*) FROM city",
        "SELECT Name_x FROM city",
        "SELECT * FROM city_x",
        "SELECT c.Name2 FROM city c",
        "SELECT Name FROM city WHERE NameOR 1",
        "SELECT Name FROM city WHERE ID = 1AND Name = 'x'",
        "SELECT Name FROM city LIMIT 1OFFSET 2",
        // valid SQLite, refused on purpose or for simplicity (see the module doc)
        "SELECT count(*)FROM city",
        "SELECT Name FROM city WHERE Name = 'x'AND ID = 1",
        "SELECT count(*) AS n FROM city ORDER BY n",
        "SELECT Name FROM city c WHERE c . Name = 'x'",
        "SELECT rowid FROM city",
        "SELECT Name FROM city -- comment",
        "WITH t AS (SELECT 1) SELECT * FROM t",
        "SELECT Name FROM city c WHERE c.Nam = 1",
        "SELECT Name FROM city JOIN country USING (Nam)",
    ];
    for q in good {
        assert!(Checker::accepts(&m, q), "refused: {q}");
    }
    for q in bad {
        assert!(!Checker::accepts(&m, q), "accepted: {q}");
    }
    assert!(c.check(&sql_grammar(&[]), "SELECT 1 + 1"));
    assert!(!c.check(&sql_grammar(&[]), "SELECT a FROM b"));
}

#[test]
fn odd_names_compile_and_match_exactly() {
    let c = Checker::over_bytes();
    let names = [
        "", "a\\b", "x\ny", "😀", "\u{7f}", "a\"i", "select", "/*", "a/b", "$x", "x$", "[x]", "`",
        "Ünï", "ünï",
    ];
    let tables: Vec<GrammarTable> = names
        .iter()
        .map(|n| GrammarTable {
            name: n.to_string(),
            columns: vec![n.to_string(), format!("c{n}")],
        })
        .collect();
    let m = c.matcher(&sql_grammar(&tables)).unwrap();
    for n in names {
        let q = format!(
            "SELECT `{}` FROM \"{}\"",
            n.replace('`', "``"),
            n.replace('"', "\"\"")
        );
        assert!(Checker::accepts(&m, &q), "refused {q:?}");
        let q = format!("SELECT t.`c{}` FROM [{}] AS t", n.replace('`', "``"), n);
        assert!(n.contains(']') || Checker::accepts(&m, &q), "refused {q:?}");
    }
    assert!(Checker::accepts(&m, "SELECT x$ FROM `x$`"));
    assert!(
        !Checker::accepts(&m, "SELECT $x FROM `x$`"),
        "not a plain identifier"
    );
    assert!(
        Checker::accepts(&m, "SELECT `ÜNï`, `üNï` FROM `😀`"),
        "ASCII letters in either case"
    );
    assert!(
        !Checker::accepts(&m, "SELECT `ÜnÏ` FROM `😀`"),
        "non-ASCII letters match exactly"
    );
    assert!(
        !Checker::accepts(&m, "SELECT * FROM select"),
        "keywords need quotes"
    );
    assert!(Checker::accepts(&m, "SELECT * FROM \"SELECT\""));
    // A schema without columns, and one without tables.
    let m = c
        .matcher(&sql_grammar(&[GrammarTable {
            name: "t".into(),
            columns: vec![],
        }]))
        .unwrap();
    assert!(Checker::accepts(&m, "SELECT * FROM t"));
    assert!(!Checker::accepts(&m, "SELECT a FROM t"));
}

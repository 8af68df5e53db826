//! A SQLite database described for a prompt: its tables with declared (or inferred) column
//! types, primary and foreign keys and a few sample rows, rendered as `CREATE TABLE` text.
//!
//! The text is what the `{{ schema }}` template variable holds: one compact statement per table
//! (`CREATE TABLE "t" ("a" INTEGER PRIMARY KEY, "b" TEXT REFERENCES "u"("id"));`), each followed
//! with `sample_rows > 0` by a comment holding that many rows (Rajkumar et al. 2022's format,
//! the one Qwen's Spider evaluation uses). A column the DDL declares no type for gets the type
//! its stored values have.

use rusqlite::types::ValueRef;

/// Longest cell shown in a sample row (characters); longer ones are cut with `…`.
const CELL_CHARS: usize = 40;
/// Values read to infer an undeclared column's type.
const INFER_ROWS: usize = 200;

/// One column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// The declared type, or the type inferred from its values (`""` when neither is known).
    pub sql_type: String,
    /// Whether the type was inferred (the DDL declares none).
    pub inferred: bool,
    /// The column it references (`table`, `column`), when it is a foreign key.
    pub references: Option<(String, String)>,
}

/// One table.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Its name.
    pub name: String,
    /// Its columns, in order.
    pub columns: Vec<Column>,
    /// Its primary key's columns, in key order.
    pub primary_key: Vec<String>,
    /// Sample rows, as text (`NULL` for nulls).
    pub rows: Vec<Vec<String>>,
}

/// The tables of a database.
#[derive(Debug, Clone, PartialEq)]
pub struct DbSchema {
    /// The tables, in creation order (SQLite's own left out).
    pub tables: Vec<Table>,
}

/// `name` quoted as a SQLite identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The type of a value as SQLite stores it.
fn storage_class(v: ValueRef<'_>) -> Option<&'static str> {
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(_) => Some("INTEGER"),
        ValueRef::Real(_) => Some("REAL"),
        ValueRef::Text(_) => Some("TEXT"),
        ValueRef::Blob(_) => Some("BLOB"),
    }
}

/// A value as a sample-row cell: one line, cut to [`CELL_CHARS`].
fn cell(v: ValueRef<'_>) -> String {
    let s = match v {
        ValueRef::Null => return "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(r) => format!("{r:?}"),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
    };
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() > CELL_CHARS {
        let cut: String = one_line.chars().take(CELL_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

impl DbSchema {
    /// Reads the schema of `conn` with the first `sample_rows` rows of each table (as SQLite
    /// returns them).
    pub fn read(conn: &rusqlite::Connection, sample_rows: usize) -> Result<Self, String> {
        Self::read_inner(conn, sample_rows).map_err(|e| format!("cannot read the schema: {e}"))
    }

    fn read_inner(conn: &rusqlite::Connection, sample_rows: usize) -> rusqlite::Result<Self> {
        let mut st = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY rowid",
        )?;
        let names: Vec<String> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut tables = Vec::with_capacity(names.len());
        for name in names {
            tables.push(read_table(conn, &name, sample_rows)?);
        }
        Ok(Self { tables })
    }

    /// The `CREATE TABLE` text of every table, with its sample rows when it has any.
    pub fn render(&self) -> String {
        self.tables
            .iter()
            .map(Table::render)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The grammar of SQLite `SELECT` queries over these tables and columns (Lark).
    pub fn grammar(&self) -> flywheel_api::Grammar {
        let tables: Vec<super::GrammarTable> = self
            .tables
            .iter()
            .map(|t| super::GrammarTable {
                name: t.name.clone(),
                columns: t.columns.iter().map(|c| c.name.clone()).collect(),
            })
            .collect();
        flywheel_api::Grammar::Lark(super::sql_grammar(&tables))
    }

    /// Every table and column name.
    pub fn names(&self) -> Vec<String> {
        self.tables
            .iter()
            .flat_map(|t| std::iter::once(&t.name).chain(t.columns.iter().map(|c| &c.name)))
            .cloned()
            .collect()
    }

    /// The table named `name` (case-insensitive, as SQLite matches names).
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

fn read_table(conn: &rusqlite::Connection, name: &str, sample: usize) -> rusqlite::Result<Table> {
    // (name, declared type, pk position)
    let mut st = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let cols: Vec<(String, String, i64)> = st
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut fk = conn.prepare(
        "SELECT \"from\", \"table\", \"to\" FROM pragma_foreign_key_list(?1) ORDER BY id, seq",
    )?;
    let fks: Vec<(String, String, Option<String>)> = fk
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut pk: Vec<(i64, String)> = cols
        .iter()
        .filter(|c| c.2 > 0)
        .map(|c| (c.2, c.0.clone()))
        .collect();
    pk.sort();
    let primary_key: Vec<String> = pk.into_iter().map(|(_, n)| n).collect();
    let mut columns: Vec<Column> = cols
        .into_iter()
        .map(|(cname, decl, _)| {
            let references = fks
                .iter()
                .find(|f| f.0 == cname)
                .map(|f| (f.1.clone(), f.2.clone().unwrap_or_default()));
            Column {
                name: cname,
                sql_type: decl.trim().to_string(),
                inferred: false,
                references,
            }
        })
        .collect();
    // A foreign key to the referenced table's primary key may leave `to` empty.
    for c in &mut columns {
        if let Some((t, to)) = &mut c.references {
            if to.is_empty() {
                let target: Vec<String> = conn
                    .prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")?
                    .query_map([t.as_str()], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                *to = target.into_iter().next().unwrap_or_default();
            }
        }
    }
    let q = quote_ident(name);
    for c in columns.iter_mut().filter(|c| c.sql_type.is_empty()) {
        let sql = format!(
            "SELECT {col} FROM {q} WHERE {col} IS NOT NULL LIMIT {INFER_ROWS}",
            col = quote_ident(&c.name)
        );
        let mut st = conn.prepare(&sql)?;
        let mut rows = st.query([])?;
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(r) = rows.next()? {
            if let Some(k) = storage_class(r.get_ref(0)?) {
                if !seen.contains(&k) {
                    seen.push(k);
                }
            }
        }
        c.sql_type = match seen.as_slice() {
            [] => String::new(),
            [one] => one.to_string(),
            s if s.iter().all(|k| matches!(*k, "INTEGER" | "REAL")) => "REAL".into(),
            _ => "TEXT".into(),
        };
        c.inferred = !c.sql_type.is_empty();
    }
    let mut rows = Vec::new();
    if sample > 0 {
        let mut st = conn.prepare(&format!("SELECT * FROM {q} LIMIT {sample}"))?;
        let n = st.column_count();
        let mut it = st.query([])?;
        while let Some(r) = it.next()? {
            rows.push(
                (0..n)
                    .map(|i| r.get_ref(i).map(cell))
                    .collect::<rusqlite::Result<_>>()?,
            );
        }
    }
    Ok(Table {
        name: name.to_string(),
        columns,
        primary_key,
        rows,
    })
}

impl Table {
    /// This table's `CREATE TABLE` statement, then its sample rows as a comment.
    pub fn render(&self) -> String {
        let mut parts: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let mut s = quote_ident(&c.name);
                if !c.sql_type.is_empty() {
                    s.push(' ');
                    s.push_str(&c.sql_type);
                }
                if self.primary_key.len() == 1 && self.primary_key[0] == c.name {
                    s.push_str(" PRIMARY KEY");
                }
                if let Some((t, col)) = &c.references {
                    s.push_str(&format!(
                        " REFERENCES {}({})",
                        quote_ident(t),
                        quote_ident(col)
                    ));
                }
                s
            })
            .collect();
        if self.primary_key.len() > 1 {
            let keys: Vec<String> = self.primary_key.iter().map(|k| quote_ident(k)).collect();
            parts.push(format!("PRIMARY KEY ({})", keys.join(", ")));
        }
        let mut out = format!(
            "CREATE TABLE {} ({});",
            quote_ident(&self.name),
            parts.join(", ")
        );
        if !self.rows.is_empty() {
            let header: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
            out.push_str(&format!(
                "\n/*\n{} rows from {}:\n{}\n",
                self.rows.len(),
                quote_ident(&self.name),
                header.join("\t")
            ));
            for r in &self.rows {
                out.push_str(&r.join("\t"));
                out.push('\n');
            }
            out.push_str("*/");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> rusqlite::Connection {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            r#"CREATE TABLE owner (id INTEGER PRIMARY KEY, "full name" TEXT, note);
               CREATE TABLE pet (pet_id, owner_id REFERENCES owner, kind VARCHAR(20),
                                 weight, "odd""name" TEXT, PRIMARY KEY (pet_id, kind));
               INSERT INTO owner VALUES (1, 'Ann Lee', NULL), (2, 'Bo', 'tab	and
newline'), (3, 'Cy', 'x');
               INSERT INTO pet VALUES (10, 1, 'dog', 12, 'a'), (11, 2, 'cat', 4.5, NULL),
                                      (12, 2, 'fish', NULL, 'this cell is far longer than forty characters in all');"#,
        )
        .unwrap();
        c
    }

    #[test]
    fn create_table_text_with_inferred_types_keys_and_quoting() {
        let s = DbSchema::read(&db(), 0).unwrap();
        assert_eq!(
            s.render(),
            "CREATE TABLE \"owner\" (\"id\" INTEGER PRIMARY KEY, \"full name\" TEXT, \"note\" TEXT);\n\
             CREATE TABLE \"pet\" (\"pet_id\" INTEGER, \"owner_id\" INTEGER REFERENCES \"owner\"(\"id\"), \
             \"kind\" VARCHAR(20), \"weight\" REAL, \"odd\"\"name\" TEXT, PRIMARY KEY (\"pet_id\", \"kind\"));"
        );
        let pet = s.table("PET").unwrap();
        assert!(pet.columns[0].inferred && !pet.columns[2].inferred);
    }

    #[test]
    fn sample_rows_follow_each_table_one_line_per_row() {
        let s = DbSchema::read(&db(), 2).unwrap();
        let text = s.render();
        assert!(
            text.contains("/*\n2 rows from \"owner\":\nid\tfull name\tnote\n1\tAnn Lee\tNULL\n2\tBo\ttab and newline\n*/"),
            "{text}"
        );
        let all = DbSchema::read(&db(), 5).unwrap().render();
        assert!(all.contains("3 rows from \"pet\""), "{all}");
        assert!(
            all.contains("12\t2\tfish\tNULL\tthis cell is far longer than forty char…"),
            "{all}"
        );
    }

    #[test]
    fn the_shipped_databases_render_as_their_prompts_do() {
        // The Spider-derived data's prompts were rendered by scripts/sql_data.py; with no sample
        // rows the Rust text must be the same, so old and new prompts compare like for like.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sql");
        let text = std::fs::read_to_string(dir.join("test.jsonl"))
            .expect("data/sql/test.jsonl is missing: run scripts/prepare-sql-data.sh");
        let mut checked = 0;
        for line in text.lines().take(400) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let db = dir
                .join("db")
                .join(format!("{}.sqlite", v["db_id"].as_str().unwrap()));
            let conn = rusqlite::Connection::open(&db).unwrap();
            let schema = DbSchema::read(&conn, 0).unwrap().render();
            assert!(
                v["prompt"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("\n\n{schema}\n\n")),
                "{}: {schema}",
                v["db_id"]
            );
            checked += 1;
        }
        assert!(checked > 0);
    }
}

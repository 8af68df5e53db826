//! Schema-constrained SQLite `SELECT` grammars (PICARD-style) in llguidance's Lark dialect.
//!
//! [`sql_grammar`] turns a database schema into a grammar that accepts SQLite `SELECT` queries
//! whose table names and column references are the schema's own; an LLM decoding under it
//! cannot name a table or a column that does not exist.
//!
//! Design notes:
//! - Every table name, and every column reference, is **one lexeme** (a regex terminal built
//!   from the alternatives of all names): `TABLE`, `COLREF` (`col` or `qualifier.col`, the
//!   qualifier being any identifier: a table name or an alias) and `USING_COL`. One terminal
//!   per kind keeps the Earley parser's work per identifier constant and lets the lexer's DFA
//!   do the choosing (it compiles and masks faster than a rule with one alternative per name).
//!   Names match with ASCII letters in either case (as SQLite compares identifiers), in every
//!   spelling: bare (only plain identifiers that are not SQLite keywords), `"name"`,
//!   `` `name` `` and `[name]` (quote characters doubled inside quotes).
//! - A double-quoted word in an expression is accepted whatever it holds: SQLite reads `"x"`
//!   as the column `x` if there is one, else as the string `'x'`. So an unqualified `"name"`
//!   needs no column alternative of its own, and `"unknown"` is a string literal, as in SQLite.
//! - Aliases (of tables, subqueries and result columns) and column qualifiers are any
//!   identifier that is not a keyword, or any quoted one. An alias is never a column, though:
//!   `ORDER BY cnt` for `count(*) AS cnt` is refused, since the grammar cannot know which
//!   aliases a query defined and accepting any word there would let made-up columns through;
//!   write the expression, its ordinal (`ORDER BY 2`) or `ORDER BY "cnt"` (which SQLite
//!   resolves to the alias). Likewise a `FROM` subquery's columns can only be referred to by
//!   the real column names they carry.
//! - Whitespace: llguidance's lexer is greedy and never backtracks, so every lexeme carries
//!   the whitespace before it, and a keyword or alias that follows a name, a number or a
//!   keyword requires it (see `spaced_keywords`): that is what makes `name_x` a made-up
//!   column rather than the column `name` with the alias `_x`.
//! - Expressions are stratified by SQLite's operator precedence, so each query has one parse.
//!
//! Not covered (refused): `WITH` (a CTE name is no table of the schema), window functions,
//! `IN table`, `rowid` (unless listed as a column), bare keywords SQLite would take as names
//! (`key`, `match`: quote them), schema-qualified tables (`main.t`), comments, a keyword glued
//! to a preceding `)` or quote (`count(*)FROM`), and functions outside `FUNCTIONS`.
//! Accepted though SQLite refuses: a word glued to a keyword before it (`SELECTname`), and
//! functions called with the wrong number of arguments. Any word may start an expression
//! (as the qualifier of `alias.col`), but only a column of the schema may end it.

/// One table of a schema as the grammar sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarTable {
    /// The table's name as SQLite stores it.
    pub name: String,
    /// The names of its columns.
    pub columns: Vec<String>,
}

/// SQLite's keywords (`sqlite3_keyword_name`); none of them is an unquoted identifier here.
const KEYWORDS: &str =
    "abort action add after all alter always analyze and as asc attach autoincrement before \
    begin between by cascade case cast check collate column commit conflict constraint create \
    cross current current_date current_time current_timestamp database default deferrable \
    deferred delete desc detach distinct do drop each else end escape except exclude exclusive \
    exists explain fail filter first following for foreign from full generated glob group \
    groups having if ignore immediate in index indexed initially inner insert instead \
    intersect into is isnull join key last left like limit match materialized natural no not \
    nothing notnull null nulls of offset on or order others outer over partition plan pragma \
    preceding primary query raise range recursive references regexp reindex release rename \
    replace restrict returning right rollback row rows savepoint select set table temp \
    temporary then ties to transaction trigger unbounded union unique update using vacuum \
    values view virtual when where window with without";

/// Functions a query may call: SQLite's core, date/time, math and aggregate functions.
const FUNCTIONS: &str =
    "count sum avg min max total group_concat string_agg abs length octet_length lower upper \
    round substr substring trim ltrim rtrim replace instr coalesce ifnull nullif iif if \
    strftime date time datetime julianday unixepoch timediff typeof random randomblob printf \
    format char hex unhex unicode quote zeroblob glob like likely unlikely sign ceil ceiling \
    floor trunc sqrt pow power exp ln log log10 log2 mod pi concat concat_ws soundex \
    last_insert_rowid changes total_changes";

/// Whether SQLite reads `name` unquoted as this identifier: identifier characters only, not
/// starting with a digit, and not a keyword.
fn is_plain(name: &str) -> bool {
    let mut chars = name.chars();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii();
    matches!(chars.next(), Some(c) if ident(c) && c != '$' && !c.is_ascii_digit())
        && chars.all(ident)
        && !KEYWORDS.split(' ').any(|k| k.eq_ignore_ascii_case(name))
}

/// `text` as a Lark regex matching it with ASCII letters in either case (as SQLite compares
/// identifiers; other characters match exactly). Every byte that could end or confuse the
/// regex is escaped.
fn lit(text: &str) -> String {
    let mut out = String::with_capacity(4 * text.len() + 2);
    out.push('/');
    for c in text.chars() {
        match c {
            c if c.is_ascii_alphabetic() => {
                out.extend(['[', c.to_ascii_lowercase(), c.to_ascii_uppercase(), ']'])
            }
            c if c.is_ascii_digit() || c == '_' || c == ' ' || !c.is_ascii() => out.push(c),
            c if c.is_ascii_graphic() => out.extend(['\\', c]),
            c => out.push_str(&format!("\\x{{{:x}}}", c as u32)),
        }
    }
    out.push('/');
    out
}

/// The spellings of identifier `name`: bare (if plain), `"…"` (if `dq`), `` `…` `` and
/// `[…]` (if it holds no `]`), each as a Lark regex.
fn spellings(name: &str, dq: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(4);
    if is_plain(name) {
        out.push(lit(name));
    }
    if dq {
        out.push(lit(&format!("\"{}\"", name.replace('"', "\"\""))));
    }
    out.push(lit(&format!("`{}`", name.replace('`', "``"))));
    if !name.contains(']') {
        out.push(lit(&format!("[{name}]")));
    }
    out
}

/// Distinct names, compared as SQLite compares identifiers (ASCII case-insensitively).
fn distinct<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names
        .filter(|n| seen.insert(n.to_ascii_lowercase()))
        .map(String::as_str)
        .collect()
}

/// The Lark grammar (llguidance dialect, `start` rule) of SQLite SELECT queries over `tables`.
///
/// Identifiers in table position must be one of `tables`; bare or qualified column references
/// must name one of their columns (any table's: the grammar does not check which table is in
/// scope). An empty schema yields a grammar of table-less queries (`SELECT 1 + 1`).
pub fn sql_grammar(tables: &[GrammarTable]) -> String {
    let table_names = distinct(tables.iter().map(|t| &t.name));
    let column_names = distinct(tables.iter().flat_map(|t| &t.columns));
    let alts = |names: &[&str], dq: bool| -> String {
        let forms: Vec<String> = names.iter().flat_map(|n| spellings(n, dq)).collect();
        forms.join("\n    | ")
    };
    // Rules that depend on whether the schema has tables / columns at all.
    let mut prim = vec!["literal", "func_e", "case_e", "cast_e", "\"(\" exprs \")\""];
    prim.extend(["\"(\" query \")\"", "\"exists\"i \"(\" query \")\""]);
    let mut source = vec!["\"(\" query \")\" alias?", "\"(\" join_src \")\""];
    let mut join_cons = vec!["\" on\"i expr"];
    let (table, colref, colname) = ("TABLE", "COLREF", "USING_COL");
    let using = format!("\" using\"i \"(\" {colname} (\",\" {colname})* \")\"");
    let table_alt = format!("{table} alias?");
    if !table_names.is_empty() {
        source.insert(0, &table_alt);
    }
    if !column_names.is_empty() {
        prim.insert(1, colref);
        join_cons.push(&using);
    }
    let mut rules = String::from(STATIC_RULES);
    rules.push_str(&format!("prim: {}\n", prim.join(" | ")));
    rules.push_str(&format!("source: {}\n", source.join(" | ")));
    rules.push_str(&format!("join_cons: {}\n", join_cons.join(" | ")));
    let mut g = spaced_keywords(&rules);
    g.push_str(STATIC_TERMINALS);
    g.push_str(&format!("KEYWORD: /(?i:{})/\n", KEYWORDS.replace(' ', "|")));
    g.push_str(&format!(
        "FUNC: WS0 /(?i:{})/\n",
        FUNCTIONS.replace(' ', "|")
    ));
    // Names: tables, column references (bare or qualified), column names (in USING).
    if !table_names.is_empty() {
        g.push_str(&format!("TABLE: WS0 ({})\n", alts(&table_names, true)));
    }
    if !column_names.is_empty() {
        g.push_str(&format!(
            "COLREF: WS0 (COLBARE | QUAL \".\" COLNAME)\nUSING_COL: WS0 COLNAME\n\
             COLBARE: {}\nCOLNAME: {}\n",
            alts(&column_names, false),
            alts(&column_names, true)
        ));
    }
    g
}

/// Turns keyword literals into lexemes that carry their leading whitespace: `" kw"i` (after
/// a name, a number or a keyword: SQLite needs whitespace between two words) into
/// `/[ \t\r\n\f]+(?i:kw)/`, and `"kw"i` (which may follow punctuation) into
/// `/[ \t\r\n\f]*(?i:kw)/`; punctuation `"("` into `/[ \t\r\n\f]*\(/`.
///
/// Why: llguidance's lexer is greedy and does not backtrack. A made-up `name_x` would lex
/// as the column `name` then `_x` unless nothing may follow a name without whitespace; and a
/// word that may follow a keyword must then also carry its whitespace (`WS0` in the
/// terminals), or ` A` in `SELECT Age` would be taken as the start of ` ALL`. So every lexeme
/// holds the whitespace before it (`%ignore` is left with trailing whitespace only).
fn spaced_keywords(rules: &str) -> String {
    let mut out = String::with_capacity(rules.len() * 2);
    let mut rest = rules;
    while let Some(i) = rest.find('"') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let spaced = after.starts_with(' ');
        let word = &after[spaced as usize..];
        let n = word
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(word.len());
        if n > 0 && word[n..].starts_with("\"i") {
            let ws = if spaced { '+' } else { '*' };
            out.push_str(&format!("/[ \\t\\r\\n\\f]{ws}(?i:{})/", &word[..n]));
            rest = &word[n + 2..];
        } else {
            // Punctuation: also one lexeme with the whitespace before it.
            let end = after.find('"').unwrap_or(after.len());
            out.push_str("/[ \\t\\r\\n\\f]*");
            for c in after[..end].chars() {
                out.push('\\');
                out.push(c);
            }
            out.push('/');
            rest = after.get(end + 1..).unwrap_or("");
        }
    }
    out.push_str(rest);
    out
}

/// The schema-independent rules (keyword literals: see [`spaced_keywords`]).
const STATIC_RULES: &str = r#"start: query ";"?
query: select_core (compound_op select_core)* order_by? limit?
compound_op: " union"i " all"i? | " intersect"i | " except"i
select_core: "select"i (" distinct"i | " all"i)? result_col ("," result_col)* from_clause? where? group_by? having?
    | "values"i "(" exprs ")" ("," "(" exprs ")")*
result_col: "*" | QSTAR | expr alias?
alias: " as"i ALIAS_AS | IMPLICIT_ALIAS
from_clause: " from"i join_src
join_src: source (join_op source join_cons?)*
join_op: "," | " natural"i? join_kind? " join"i
join_kind: " left"i " outer"i? | " right"i " outer"i? | " full"i " outer"i? | " inner"i | " cross"i
where: " where"i expr
group_by: " group"i " by"i exprs
having: " having"i expr
order_by: " order"i " by"i ordering ("," ordering)*
ordering: expr (" collate"i COLLATION)? (" asc"i | " desc"i)? (" nulls"i (" first"i | " last"i))?
limit: " limit"i expr ((" offset"i | ",") expr)?
exprs: expr ("," expr)*
expr: or_e
or_e: and_e | or_e " or"i and_e
and_e: not_e | and_e " and"i not_e
not_e: eq_e | "not"i not_e
eq_e: cmp_e
    | eq_e EQ_OP cmp_e
    | eq_e " is"i " not"i? (" distinct"i " from"i)? cmp_e
    | eq_e " not"i? LIKE_OP cmp_e (" escape"i cmp_e)?
    | eq_e " not"i? " in"i "(" (query | exprs)? ")"
    | eq_e " not"i? " between"i cmp_e " and"i cmp_e
    | eq_e (" isnull"i | " notnull"i | " not"i " null"i)
cmp_e: bit_e | cmp_e CMP_OP bit_e
bit_e: add_e | bit_e BIT_OP add_e
add_e: mul_e | add_e ADD_OP mul_e
mul_e: cat_e | mul_e MUL_OP cat_e
cat_e: un_e | cat_e CAT_OP un_e
un_e: UN_OP un_e | prim (" collate"i COLLATION)?
literal: NUM | STRING | DQSTRING | BLOB | "null"i | "true"i | "false"i
    | "current_date"i | "current_time"i | "current_timestamp"i
func_e: FUNC "(" ("distinct"i? exprs)? ")" | "count"i "(" "*" ")"
case_e: "case"i expr? (" when"i expr " then"i expr)+ (" else"i expr)? " end"i
cast_e: "cast"i "(" expr " as"i TYPE_NAME+ ("(" snum ("," snum)? ")")? ")"
snum: UN_OP? NUM
"#;

/// The schema-independent terminals. `WS0` (optional whitespace) starts every terminal the
/// rules use but `IMPLICIT_ALIAS`, which follows a name and so needs whitespace (`WS`).
const STATIC_TERMINALS: &str = r#"%ignore /[ \t\r\n\f]+/
WS: /[ \t\r\n\f]+/
WS0: /[ \t\r\n\f]*/
EQ_OP: WS0 ("=" | "==" | "!=" | "<>")
LIKE_OP: /[ \t\r\n\f]+(?i:like|glob|regexp|match)/
CMP_OP: WS0 ("<" | "<=" | ">" | ">=")
BIT_OP: WS0 ("&" | "|" | "<<" | ">>")
ADD_OP: WS0 ("+" | "-")
MUL_OP: WS0 ("*" | "/" | "%")
CAT_OP: WS0 ("||" | "->" | "->>")
UN_OP: WS0 ("-" | "+" | "~")
NUM: WS0 /[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?|0[xX][0-9a-fA-F]+/
STR: /'([^']|'')*'/
STRING: WS0 STR
DQSTRING: WS0 /"([^"]|"")*"/
BLOB: WS0 /[xX]'([0-9a-fA-F][0-9a-fA-F])*'/
TYPE_NAME: WS0 /[A-Za-z_][A-Za-z0-9_]*/
IDENT: /([A-Za-z_]|[^\x00-\x7F])([A-Za-z0-9_$]|[^\x00-\x7F])*/ & ~KEYWORD
COLLATION: WS0 IDENT
QIDENT: /"([^"]|"")*"|`([^`]|``)*`|\[[^\]]*\]/
QUAL: IDENT | QIDENT
ALIAS: IDENT | QIDENT | STR
ALIAS_AS: WS0 ALIAS
IMPLICIT_ALIAS: WS ALIAS
QSTAR: WS0 QUAL "." "*"
"#;

#[cfg(test)]
mod tests;

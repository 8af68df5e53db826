#!/usr/bin/env python3
"""Extract the question/answer pairs of the Python FAQ pages (Sphinx HTML) into JSONL.

Input:  data/python-doc/faq/*.html (built by scripts/prepare-faq-data.sh; faq/index.html skipped)
Output: data/python-faq/questions.jsonl, one JSON object per line, written atomically:
    {"id": "faq/programming.html#section-id", "question": "...", "answer": "...",
     "path": "faq/programming.html", "section_id": "section-id", "heading": "...",
     "trail": ["Programming FAQ", "General Questions", "<question>"]}

The Sphinx 3.11 HTML nests one <section id="..."> per heading; the first child of a section
is its heading <h1>..<h6> (sometimes preceded by an empty <span id="..."> label target):

    <section id="general-questions">
    <h2><a class="toc-backref" href="#id3" role="doc-backlink">General Questions</a><a
        class="headerlink" href="#general-questions" title="Permalink to this heading">¶</a></h2>
    <section id="is-there-a-source-code-level-debugger-...">
    <h3><a class="toc-backref" ...>Is there a source code level debugger ...?</a><a
        class="headerlink" href="#is-there-..." title="Permalink to this heading">¶</a></h3>
    <p>...answer...</p>
    </section>

An FAQ entry is a LEAF section (no <section> inside it) below the page's h1 with a non-empty
body (gui.html has an empty h2 "General GUI Questions" leaf, skipped). On most pages the
entries are h3 under h2 category sections; on design.html, extending.html, windows.html and
installed.html some or all entries are h2 directly under the h1. The "¶" permalink anchor
(<a class="headerlink">) is dropped from headings and bodies; whitespace is collapsed.

Entries are sorted by page (file name) then document order. Standard library only.
Usage: scripts/extract_faq.py [--doc DIR] [--out FILE] [--tree]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# Elements whose boundaries separate words: a space is emitted at their start and end so that
# "<p>a</p><p>b</p>" becomes "a b" and not "ab". Inline elements (a, code, span, em) emit nothing.
BLOCKS = {"p", "div", "pre", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "td", "th",
          "blockquote", "br", "hr", "section", "nav", "figure", "figcaption", "caption",
          "thead", "tbody", "aside"} | HEADINGS
SKIP = {"script", "style"}
VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
        "track", "wbr"}


def collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class Section:
    def __init__(self, sid: str, parent: "Section | None"):
        self.id = sid
        self.parent = parent
        self.children: list[Section] = []
        self.level = 0           # 1..6 from the heading tag, 0 if none seen
        self.heading_parts: list[str] = []
        self.body_parts: list[str] = []  # text after the heading, sub-sections included
        self.order = 0

    @property
    def heading(self) -> str:
        return collapse("".join(self.heading_parts))

    @property
    def body(self) -> str:
        return collapse("".join(self.body_parts))


class FaqParser(HTMLParser):
    """Builds the <section> tree of the page's main body with heading and body text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.roots: list[Section] = []
        self.stack: list[Section] = []   # open sections, innermost last
        self.tags: list[tuple[str, str]] = []  # open non-void elements: (tag, role)
        self.in_heading: Section | None = None
        self.heading_tag = ""
        self.skip_depth = 0                # >0 inside headerlink anchors / script / style
        self.count = 0

    # -- text routing ------------------------------------------------------------------------
    def emit(self, text: str) -> None:
        if self.skip_depth or not self.stack:
            return
        if self.in_heading is not None:
            self.in_heading.heading_parts.append(text)
        # body text goes to every open section (a parent's body contains its sub-sections);
        # a section's own heading is not part of its own body, but is part of its ancestors'.
        for s in self.stack:
            if s is not self.in_heading:
                s.body_parts.append(text)

    # -- parser callbacks ---------------------------------------------------------------------
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in VOID:
            if tag in BLOCKS:
                self.emit(" ")
            return
        role = ""
        if self.skip_depth:
            role = "skip"
        elif tag in SKIP or (tag == "a" and "headerlink" in (a.get("class") or "").split()):
            role = "skip"
        elif tag == "section":
            parent = self.stack[-1] if self.stack else None
            s = Section(a.get("id") or "", parent)
            self.count += 1
            s.order = self.count
            (parent.children if parent else self.roots).append(s)
            self.emit(" ")
            self.stack.append(s)
            role = "section"
        elif tag in HEADINGS and self.stack and self.stack[-1].level == 0 and self.in_heading is None:
            s = self.stack[-1]
            s.level = int(tag[1])
            self.emit(" ")
            self.in_heading = s
            self.heading_tag = tag
            role = "heading"
        self.tags.append((tag, role))
        if role == "skip":
            self.skip_depth += 1
        elif tag in BLOCKS and role != "heading" and role != "section":
            self.emit(" ")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        # pop up to the matching open tag (tolerates unclosed <p>/<li> etc.)
        for i in range(len(self.tags) - 1, -1, -1):
            if self.tags[i][0] == tag:
                break
        else:
            return  # stray end tag
        while len(self.tags) > i:
            t, role = self.tags.pop()
            if role == "skip":
                self.skip_depth -= 1
            elif role == "section":
                self.emit(" ")
                self.stack.pop()
            elif role == "heading":
                self.in_heading = None
                self.emit(" ")
            elif t in BLOCKS:
                self.emit(" ")

    def handle_data(self, data):
        self.emit(data)


def walk(sections: list[Section]):
    for s in sections:
        yield s
        yield from walk(s.children)


def trail_of(s: Section) -> list[str]:
    out = []
    while s is not None:
        out.append(s.heading)
        s = s.parent
    return out[::-1]


def parse_page(path: Path) -> list[Section]:
    p = FaqParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    if p.stack:
        raise ValueError(f"{path}: {len(p.stack)} unclosed <section> elements")
    return p.roots


def entries_of(rel: str, roots: list[Section]) -> list[dict]:
    out = []
    for s in walk(roots):
        if s.parent is None or s.children:
            continue  # the page (h1) section, or a category section that holds questions
        if not s.body:
            continue  # an empty leaf: gui.html's "General GUI Questions" category has no entries
        q = s.heading
        out.append({
            "id": f"{rel}#{s.id}",
            "question": q,
            "answer": s.body,
            "path": rel,
            "section_id": s.id,
            "heading": q,
            "trail": trail_of(s),
        })
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", type=Path, default=root / "data" / "python-doc",
                    help="HTML documentation root (holds faq/)")
    ap.add_argument("--out", type=Path, default=root / "data" / "python-faq" / "questions.jsonl")
    ap.add_argument("--tree", action="store_true", help="print the section tree of each page and exit")
    args = ap.parse_args()

    pages = sorted(p for p in (args.doc / "faq").glob("*.html") if p.name != "index.html")
    if not pages:
        sys.exit(f"extract_faq: error: no FAQ pages under {args.doc / 'faq'}")

    all_entries: list[dict] = []
    per_page: list[tuple[str, int]] = []
    odd: list[str] = []
    for page in pages:
        rel = page.relative_to(args.doc).as_posix()
        roots = parse_page(page)
        if args.tree:
            print(f"== {rel}")
            for s in walk(roots):
                depth = len(trail_of(s)) - 1
                leaf = "" if s.children else "  *"
                print(f"{'  ' * depth}h{s.level} #{s.id}: {s.heading}{leaf}")
            continue
        if len(roots) != 1 or roots[0].level != 1:
            odd.append(f"{rel}: expected one top-level <section> with an <h1>, got {len(roots)}")
        for s in walk(roots):
            if s.level == 0:
                odd.append(f"{rel}#{s.id}: section without a heading")
            if not s.id:
                odd.append(f"{rel}: section without id: {s.heading!r}")
        ents = entries_of(rel, roots)
        for e in ents:
            if not e["question"].rstrip().endswith("?"):
                odd.append(f"{e['id']}: heading does not end with '?' (kept): {e['question']!r}")
        for s in walk(roots):
            if s.parent is not None and not s.children and not s.body:
                odd.append(f"{rel}#{s.id}: empty leaf section skipped: {s.heading!r}")
        per_page.append((rel, len(ents)))
        all_entries.extend(ents)
    if args.tree:
        return 0

    seen: dict[str, int] = {}
    for e in all_entries:
        seen[e["id"]] = seen.get(e["id"], 0) + 1
    dups = sorted(k for k, v in seen.items() if v > 1)
    if dups:
        sys.exit(f"extract_faq: error: duplicate ids: {dups}")

    write_atomic(args.out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in all_entries))

    for rel, n in per_page:
        print(f"extract_faq: {rel:<24} {n:>4} entries")
    for o in odd:
        print(f"extract_faq: note: {o}")
    print(f"extract_faq: {len(per_page)} pages, {len(all_entries)} entries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

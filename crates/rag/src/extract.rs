//! Text extraction: plain text, Markdown and HTML become one string of text plus the headings
//! and paragraph boundaries found in it. Chunk spans point into this extracted text.
//!
//! HTML: tags are removed, `script`/`style`/`head`/`nav`-like content is dropped, entities are
//! decoded, whitespace is collapsed outside `<pre>`, block elements end a paragraph, `h1`–`h6`
//! become headings (Sphinx's `¶` permalinks are dropped). Markdown: ATX headings (`# Title`)
//! become headings, blank lines separate paragraphs; the text itself stays byte-identical to
//! the file so spans point at the file's bytes. Plain text: blank lines separate paragraphs.

/// What kind of document a file is, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// `.txt` and extension-less text.
    Text,
    /// `.md`, `.markdown`.
    Markdown,
    /// `.html`, `.htm`.
    Html,
}

impl DocKind {
    /// The kind for a file name, or `None` when the extension is not one flywheel indexes.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "rst" => Some(Self::Text),
            "md" | "markdown" => Some(Self::Markdown),
            "html" | "htm" | "xhtml" => Some(Self::Html),
            _ => None,
        }
    }

    /// The name stored with the document.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
        }
    }
}

/// A heading found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heading {
    /// 1 for a title, 2 for a section, …
    pub level: u8,
    /// The heading's text.
    pub title: String,
    /// Byte offset in the extracted text where the heading's section starts.
    pub at: usize,
}

/// A document's extracted text with its structure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The text that chunks are cut from.
    pub text: String,
    /// Headings in document order.
    pub headings: Vec<Heading>,
    /// Byte offsets where a paragraph (or other block) starts.
    pub paragraph_starts: Vec<usize>,
    /// The document's title (HTML `<title>` or its first heading), when it has one.
    pub title: Option<String>,
}

impl Extracted {
    /// The heading trail (outermost first) in force at byte offset `at`.
    pub fn trail_at(&self, at: usize) -> Vec<&str> {
        let mut trail: Vec<&Heading> = Vec::new();
        for h in self.headings.iter().take_while(|h| h.at <= at) {
            while trail.last().is_some_and(|t| t.level >= h.level) {
                trail.pop();
            }
            trail.push(h);
        }
        trail.into_iter().map(|h| h.title.as_str()).collect()
    }
}

/// Extracts the text of a document of the given kind.
pub fn extract(kind: DocKind, content: &str) -> Extracted {
    match kind {
        DocKind::Text => plain(content, false),
        DocKind::Markdown => plain(content, true),
        DocKind::Html => html(content),
    }
}

fn plain(content: &str, markdown: bool) -> Extracted {
    let mut out = Extracted {
        text: content.to_string(),
        ..Default::default()
    };
    let mut at = 0usize;
    let mut prev_blank = true;
    let mut in_fence = false;
    for line in content.split_inclusive('\n') {
        let trimmed = line.trim();
        if markdown && (trimmed.starts_with("```") || trimmed.starts_with("~~~")) {
            in_fence = !in_fence;
        }
        let blank = trimmed.is_empty();
        if !blank && prev_blank {
            out.paragraph_starts.push(at);
        }
        if markdown && !in_fence && trimmed.starts_with('#') {
            let level = trimmed.chars().take_while(|&c| c == '#').count();
            let rest = &trimmed[level..];
            if (1..=6).contains(&level) && (rest.is_empty() || rest.starts_with(' ')) {
                let title = rest.trim().trim_end_matches('#').trim().to_string();
                if !title.is_empty() {
                    if out.paragraph_starts.last() != Some(&at) {
                        out.paragraph_starts.push(at);
                    }
                    out.headings.push(Heading {
                        level: level as u8,
                        title,
                        at,
                    });
                }
            }
        }
        prev_blank = blank;
        at += line.len();
    }
    out.title = out.headings.first().map(|h| h.title.clone());
    out
}

/// Elements whose whole content is dropped.
const SKIP: &[&str] = &[
    "script", "style", "head", "noscript", "template", "svg", "nav", "footer",
];
/// Elements that end a paragraph.
const BLOCK: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "aside",
    "header",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "table",
    "tr",
    "td",
    "th",
    "pre",
    "blockquote",
    "br",
    "hr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "figure",
    "figcaption",
    "body",
    "html",
];

struct HtmlWriter {
    out: Extracted,
    /// A paragraph break is pending before the next text.
    pending_break: bool,
    /// A space is pending before the next text (collapsed whitespace).
    pending_space: bool,
}

impl HtmlWriter {
    fn push_text(&mut self, s: &str, pre: bool) {
        for ch in s.chars() {
            if ch == '¶' {
                continue;
            }
            if !pre && ch.is_whitespace() {
                if !self.out.text.is_empty() {
                    self.pending_space = true;
                }
                continue;
            }
            if self.pending_break {
                if !self.out.text.is_empty() {
                    let t = &mut self.out.text;
                    while t.ends_with(' ') {
                        t.pop();
                    }
                    t.push_str("\n\n");
                }
                self.out.paragraph_starts.push(self.out.text.len());
                self.pending_break = false;
                self.pending_space = false;
            } else if self.pending_space {
                self.out.text.push(' ');
                self.pending_space = false;
            }
            self.out.text.push(ch);
        }
    }
}

fn html(content: &str) -> Extracted {
    let mut w = HtmlWriter {
        out: Extracted::default(),
        pending_break: true,
        pending_space: false,
    };
    // The element whose content is being dropped, and how deeply it is nested in itself.
    let mut skip: Option<(String, usize)> = None;
    let mut pre_depth = 0usize;
    let mut heading: Option<(u8, usize)> = None; // level, byte offset where its text begins
    let mut title: Option<String> = None;
    let mut in_title = false;
    let mut i = 0usize;
    let bytes = content.as_bytes();
    while i < bytes.len() {
        if bytes[i] == b'<' {
            // Comments, doctype, CDATA.
            if content[i..].starts_with("<!--") {
                i = content[i..].find("-->").map_or(bytes.len(), |e| i + e + 3);
                continue;
            }
            if content[i..].starts_with("<!") || content[i..].starts_with("<?") {
                i = content[i..].find('>').map_or(bytes.len(), |e| i + e + 1);
                continue;
            }
            let Some(end) = find_tag_end(&content[i..]) else {
                // A stray '<' that opens no tag: keep it as text.
                if skip.is_none() {
                    w.push_text("<", pre_depth > 0);
                }
                i += 1;
                continue;
            };
            let tag = &content[i + 1..i + end];
            i += end + 1;
            let closing = tag.starts_with('/');
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect::<String>()
                .to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            let self_closing = tag.ends_with('/') || VOID.contains(&name.as_str());
            if let Some((root, depth)) = skip.as_mut() {
                let mut done = false;
                if *root == name && !self_closing {
                    if closing {
                        *depth -= 1;
                        done = *depth == 0;
                    } else {
                        *depth += 1;
                    }
                }
                if name == "title" && root == "head" {
                    in_title = !closing;
                }
                if done {
                    skip = None;
                }
                continue;
            }
            if !closing && !self_closing && (SKIP.contains(&name.as_str()) || is_chrome(tag)) {
                skip = Some((name, 1));
                continue;
            }
            if name == "pre" {
                pre_depth = if closing {
                    pre_depth.saturating_sub(1)
                } else {
                    pre_depth + 1
                };
            }
            if BLOCK.contains(&name.as_str()) {
                w.pending_break = true;
            }
            let level = match name.as_str() {
                "h1" => Some(1u8),
                "h2" => Some(2),
                "h3" => Some(3),
                "h4" => Some(4),
                "h5" => Some(5),
                "h6" => Some(6),
                _ => None,
            };
            if let Some(level) = level {
                if !closing {
                    // The heading's paragraph starts at the next text written.
                    heading = Some((level, usize::MAX));
                } else if let Some((lvl, start)) = heading.take() {
                    if start != usize::MAX {
                        let t = w.out.text[start..].trim().to_string();
                        if !t.is_empty() {
                            w.out.headings.push(Heading {
                                level: lvl,
                                title: t,
                                at: start,
                            });
                        }
                    }
                }
            }
            continue;
        }
        let next = content[i..].find('<').map_or(bytes.len(), |e| i + e);
        let raw = &content[i..next];
        i = next;
        if in_title {
            let t = decode_entities(raw);
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            title = Some(match title.take() {
                Some(prev) => format!("{prev}{t}"),
                None => t,
            });
            continue;
        }
        if skip.is_some() {
            continue;
        }
        let text = decode_entities(raw);
        let before = w.out.text.len();
        w.push_text(&text, pre_depth > 0);
        if let Some((_, start)) = heading.as_mut() {
            if *start == usize::MAX && w.out.text.len() > before {
                // The first character written belongs to the heading; find where it began.
                let written = &w.out.text[before..];
                let lead = written.len() - written.trim_start().len();
                *start = before + lead;
            }
        }
    }
    // Headings keep the paragraph start that was pushed just before their text.
    w.out.title = title
        .map(|t| t.replace('¶', "").trim().to_string())
        .filter(|t| !t.is_empty())
        .or_else(|| w.out.headings.first().map(|h| h.title.clone()));
    w.out
}

/// Elements that never have content or a closing tag.
const VOID: &[&str] = &[
    "br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr",
];

/// Page chrome (navigation bars, sidebars) that documentation generators wrap in plain `div`s.
fn is_chrome(tag: &str) -> bool {
    let t = tag.to_ascii_lowercase();
    t.contains("role=\"navigation\"")
        || ["sphinxsidebar", "related", "footer", "headerlink"]
            .iter()
            .any(|c| t.contains(&format!("class=\"{c}")) || t.contains(&format!(" {c}\"")))
}

/// Where the tag that starts at `s[0] == '<'` ends (index of its `>`), honouring quoted
/// attribute values; `None` when `<` does not open a tag.
fn find_tag_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let first = *b.get(1)?;
    if !(first.is_ascii_alphabetic() || first == b'/') {
        return None;
    }
    let mut quote: Option<u8> = None;
    for (k, &c) in b.iter().enumerate().skip(1) {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if c == b'>' => return Some(k),
            None => {}
        }
    }
    None
}

/// Decodes the HTML character references that documentation pages use.
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let end = rest.as_bytes().iter().take(12).position(|&b| b == b';');
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let ch = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                "ndash" => Some('–'),
                "mdash" => Some('—'),
                "hellip" => Some('…'),
                "copy" => Some('©'),
                "para" | "pilcrow" => Some('¶'),
                "lsquo" => Some('‘'),
                "rsquo" => Some('’'),
                "ldquo" => Some('“'),
                "rdquo" => Some('”'),
                _ if name.starts_with("#x") || name.starts_with("#X") => {
                    u32::from_str_radix(&name[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if name.starts_with('#') => name[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            }?;
            Some((ch, e + 1))
        });
        match decoded {
            Some((ch, len)) => {
                out.push(ch);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_drops_tags_scripts_and_permalinks() {
        let doc = r##"<!DOCTYPE html><html><head><title>Programming FAQ &#8212; Python</title>
<style>p { color: red }</style><script>var x = "<p>no</p>";</script></head>
<body><section id="general"><h1>Programming FAQ<a class="headerlink" href="#x" title="Link">¶</a></h1>
<section id="q1"><h3>Is there a debugger?<a class="headerlink" href="#q1">¶</a></h3>
<p>Yes &amp; it is called <code>pdb</code>.</p>
<pre>import pdb
pdb.set_trace()</pre>
</section></section></body></html>"##;
        let e = extract(DocKind::Html, doc);
        assert_eq!(e.title.as_deref(), Some("Programming FAQ — Python"));
        assert!(!e.text.contains("color"), "{}", e.text);
        assert!(!e.text.contains("var x"), "{}", e.text);
        assert!(!e.text.contains('¶'));
        assert!(e.text.contains("Yes & it is called pdb."), "{}", e.text);
        assert!(e.text.contains("import pdb\npdb.set_trace()"), "{}", e.text);
        let titles: Vec<_> = e
            .headings
            .iter()
            .map(|h| (h.level, h.title.as_str()))
            .collect();
        assert_eq!(
            titles,
            vec![(1, "Programming FAQ"), (3, "Is there a debugger?")]
        );
        for h in &e.headings {
            assert!(e.text[h.at..].starts_with(&h.title));
        }
        let at = e.text.find("pdb.set_trace").unwrap();
        assert_eq!(
            e.trail_at(at),
            vec!["Programming FAQ", "Is there a debugger?"]
        );
    }

    #[test]
    fn markdown_keeps_bytes_and_finds_headings() {
        let doc = "# Guide\n\nIntro text.\n\n## Install\n\nRun it.\n```\n# not a heading\n```\n";
        let e = extract(DocKind::Markdown, doc);
        assert_eq!(e.text, doc);
        let titles: Vec<_> = e.headings.iter().map(|h| h.title.as_str()).collect();
        assert_eq!(titles, vec!["Guide", "Install"]);
        assert_eq!(
            e.trail_at(doc.find("Run it").unwrap()),
            vec!["Guide", "Install"]
        );
        assert!(e.paragraph_starts.contains(&doc.find("Intro").unwrap()));
    }

    #[test]
    fn entities_decode_and_bad_ones_survive() {
        assert_eq!(
            decode_entities("a &lt;b&gt; &#x41;&#66; &bogus; &"),
            "a <b> AB &bogus; &"
        );
        assert_eq!(decode_entities("&lt;module ‘x’&gt;"), "<module ‘x’>");
    }
}

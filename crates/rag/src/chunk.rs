//! Chunking by tokens of the embedding model: a document's sections (text between headings)
//! are cut into windows of at most `max_tokens` tokens that overlap by `overlap_tokens`, ending
//! at a paragraph start when one lies in the second half of the window. A chunk never crosses a
//! heading. Every chunk is a contiguous byte span of the extracted text, so nothing is lost
//! (every token lies in some chunk) and a span always points at the chunk's exact bytes.

use crate::extract::Extracted;

/// How documents are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkConfig {
    /// The most tokens (of the embedding model) in a chunk.
    pub max_tokens: usize,
    /// Tokens shared by consecutive chunks of one section.
    pub overlap_tokens: usize,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            max_tokens: 192,
            overlap_tokens: 32,
        }
    }
}

impl ChunkConfig {
    /// Checks the settings and names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens < 8 {
            return Err(format!(
                "chunk max_tokens = {} (must be >= 8)",
                self.max_tokens
            ));
        }
        if self.overlap_tokens * 2 > self.max_tokens {
            return Err(format!(
                "chunk overlap_tokens = {} must be at most half of max_tokens = {}",
                self.overlap_tokens, self.max_tokens
            ));
        }
        Ok(())
    }
}

/// One piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Byte span in the extracted text.
    pub start: usize,
    /// End of the byte span (exclusive).
    pub end: usize,
    /// 1-based first line.
    pub line_start: usize,
    /// 1-based last line.
    pub line_end: usize,
    /// The heading trail joined by ` › `.
    pub heading: String,
    /// How many tokens the chunk holds.
    pub tokens: usize,
}

/// Text tokenized in one call at most (bytes): a long section is cut into windows at
/// whitespace, so a 50 MB file with no headings is not tokenized whole (the tokenizer's
/// per-token records took gigabytes).
const TOKENIZE_WINDOW: usize = 64 * 1024;

/// The non-empty token spans of `section`, tokenized window by window (spans stay relative to
/// `section`). A window ends at the last whitespace before [`TOKENIZE_WINDOW`] bytes, so no
/// word is cut (a window with no whitespace is cut at a character boundary).
fn windowed_offsets(
    section: &str,
    token_offsets: &mut dyn FnMut(&str) -> Vec<(usize, usize)>,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < section.len() {
        let mut end = (start + TOKENIZE_WINDOW).min(section.len());
        if end < section.len() {
            while !section.is_char_boundary(end) {
                end -= 1;
            }
            if let Some(ws) = section[start..end].rfind(char::is_whitespace) {
                if ws > 0 {
                    end = start + ws;
                }
            }
        }
        out.extend(
            token_offsets(&section[start..end])
                .into_iter()
                .filter(|(a, b)| b > a)
                .map(|(a, b)| (a + start, b + start)),
        );
        start = end;
    }
    out
}

/// Cuts `doc` into chunks. `token_offsets` maps a piece of text to the byte spans of its tokens
/// (the embedding model's tokenizer); `budget_for` gives the token budget of a section given its
/// heading trail (so the trail, which is embedded with the chunk, fits the model's window).
pub fn chunk_document(
    doc: &Extracted,
    cfg: &ChunkConfig,
    token_offsets: &mut dyn FnMut(&str) -> Vec<(usize, usize)>,
    budget_for: &mut dyn FnMut(&str) -> usize,
) -> Vec<Chunk> {
    let text = &doc.text;
    // Section boundaries: the document start and every heading.
    let mut bounds: Vec<usize> = std::iter::once(0)
        .chain(doc.headings.iter().map(|h| h.at))
        .chain(std::iter::once(text.len()))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_of = |byte: usize| line_starts.partition_point(|&s| s <= byte);
    let mut chunks = Vec::new();
    for w in bounds.windows(2) {
        let (s0, s1) = (w[0], w[1]);
        let section = &text[s0..s1];
        if section.trim().is_empty() {
            continue;
        }
        let heading = doc.trail_at(s0).join(" › ");
        let max = budget_for(&heading).clamp(8, cfg.max_tokens.max(8));
        let overlap = cfg.overlap_tokens.min(max / 2);
        let toks = windowed_offsets(section, token_offsets);
        if toks.is_empty() {
            continue;
        }
        // Token indices where a paragraph starts (preferred cut points).
        let para: Vec<usize> = doc
            .paragraph_starts
            .iter()
            .filter(|&&p| p > s0 && p < s1)
            .map(|&p| toks.partition_point(|t| t.0 + s0 < p))
            .collect();
        let mut i = 0usize;
        loop {
            let mut j = (i + max).min(toks.len());
            if j < toks.len() {
                if let Some(&p) = para.iter().rev().find(|&&p| p > i + max / 2 && p <= j) {
                    j = p;
                }
            }
            let start = s0 + toks[i].0;
            let end = s0 + toks[j - 1].1;
            chunks.push(Chunk {
                start,
                end,
                line_start: line_of(start),
                line_end: line_of(end.saturating_sub(1).max(start)),
                heading: heading.clone(),
                tokens: j - i,
            });
            if j >= toks.len() {
                break;
            }
            i = if j - i > overlap { j - overlap } else { j };
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_sections_are_tokenized_in_windows_with_the_same_spans() {
        let text = "héllo wörld lorem ipsum ".repeat(12_000); // about 300 kB
        let mut calls = 0;
        let mut counting = |t: &str| {
            calls += 1;
            assert!(t.len() <= TOKENIZE_WINDOW);
            words(t)
        };
        let windowed = windowed_offsets(&text, &mut counting);
        assert!(calls >= 4, "{calls}");
        assert_eq!(windowed, words(&text));
    }
    use crate::extract::{extract, DocKind};

    /// A whitespace tokenizer: each word is one token.
    fn words(s: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in s.char_indices() {
            match (c.is_whitespace(), start) {
                (true, Some(st)) => {
                    out.push((st, i));
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        if let Some(st) = start {
            out.push((st, s.len()));
        }
        out
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn random_markdown(seed: &mut u64) -> String {
        let vocab = [
            "alpha",
            "beta",
            "gamma",
            "δέλτα",
            "epsilon",
            "zeta",
            "ü",
            "x1",
            "long-word",
        ];
        let mut s = String::new();
        for _ in 0..(lcg(seed) % 12) {
            match lcg(seed) % 6 {
                0 => s.push_str(&format!(
                    "{} Heading {}\n\n",
                    "#".repeat(1 + (lcg(seed) % 3) as usize),
                    lcg(seed) % 100
                )),
                1 => s.push('\n'),
                _ => {
                    for _ in 0..(lcg(seed) % 80) {
                        s.push_str(vocab[(lcg(seed) % vocab.len() as u64) as usize]);
                        s.push(if lcg(seed).is_multiple_of(9) {
                            '\n'
                        } else {
                            ' '
                        });
                    }
                    s.push_str("\n\n");
                }
            }
        }
        s
    }

    #[test]
    fn chunks_lose_no_text_respect_overlap_and_spans() {
        let mut seed = 7u64;
        for case in 0..300 {
            let doc = random_markdown(&mut seed);
            let cfg = ChunkConfig {
                max_tokens: 8 + (lcg(&mut seed) % 40) as usize,
                overlap_tokens: (lcg(&mut seed) % 5) as usize,
            };
            let ex = extract(DocKind::Markdown, &doc);
            let chunks = chunk_document(&ex, &cfg, &mut words, &mut |_| usize::MAX);
            // Spans point at the right bytes and lines.
            for c in &chunks {
                let t = &ex.text[c.start..c.end];
                assert_eq!(t.trim(), t, "case {case}: span has edge whitespace");
                assert!(c.tokens <= cfg.max_tokens, "case {case}");
                assert_eq!(words(t).len(), c.tokens, "case {case}: token count");
                let line = ex.text[..c.start].matches('\n').count() + 1;
                assert_eq!(line, c.line_start, "case {case}");
                assert!(c.line_end >= c.line_start);
            }
            // No text lost: every word of the document lies inside some chunk.
            for (a, b) in words(&ex.text) {
                assert!(
                    chunks.iter().any(|c| c.start <= a && b <= c.end),
                    "case {case}: word {:?} at {a} not in any chunk",
                    &ex.text[a..b]
                );
            }
            // Overlap: consecutive chunks of one section share exactly `overlap` tokens.
            for w in chunks.windows(2) {
                if w[0].heading == w[1].heading && w[1].start < w[0].end {
                    let shared = words(&ex.text[w[1].start..w[0].end]).len();
                    assert_eq!(
                        shared,
                        cfg.overlap_tokens.min(cfg.max_tokens / 2),
                        "case {case}"
                    );
                }
            }
            // A chunk never crosses a heading.
            for h in &ex.headings {
                assert!(
                    chunks.iter().all(|c| !(c.start < h.at && h.at < c.end)),
                    "case {case}"
                );
            }
        }
    }

    #[test]
    fn cuts_prefer_paragraph_starts() {
        let doc = format!("{}\n\n{}", "a ".repeat(7).trim(), "b ".repeat(7).trim());
        let ex = extract(DocKind::Text, &doc);
        let cfg = ChunkConfig {
            max_tokens: 10,
            overlap_tokens: 0,
        };
        let chunks = chunk_document(&ex, &cfg, &mut words, &mut |_| usize::MAX);
        let texts: Vec<&str> = chunks.iter().map(|c| &doc[c.start..c.end]).collect();
        assert_eq!(texts, vec!["a a a a a a a", "b b b b b b b"]);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = ChunkConfig {
            max_tokens: 10,
            overlap_tokens: 6,
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("overlap_tokens"), "{e}");
    }
}

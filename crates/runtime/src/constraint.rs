//! Grammar-constrained decoding with llguidance: the token trie from the model's tokenizer, and
//! a per-row matcher.
//!
//! - [`GrammarCompiler`] holds llguidance's `ParserFactory` over a token trie built from the
//!   model's tokenizer: every id below the logits width maps to its bytes (byte-level BPE and
//!   SentencePiece byte-fallback vocabularies); special tokens and padding ids up to the logits
//!   width get llguidance's special marker, so no grammar but a Lark one that names them ever
//!   allows them. Building it walks the whole vocabulary (about 0.4 s for 152k tokens in a
//!   release build), so `TextModel` builds it on first use and keeps it.
//! - [`Constraint`] is one row's matcher: the generation loop ([`crate::generate::RowState`])
//!   asks it whether a sampled token is allowed, for the mask of allowed tokens when it is not,
//!   and feeds it every accepted token. The row ends when the grammar admits nothing more; an
//!   end-of-sequence token is only allowed where the grammar is complete.
//!
//! JSON schemas compile with compact whitespace (`"x-guidance": {"whitespace_flexible": false}`)
//! unless the schema sets `x-guidance` itself: a model may otherwise emit unbounded runs of
//! spaces and newlines between tokens, which the grammar would have to accept.

use std::collections::HashMap;
use std::sync::Arc;

use flywheel_api::Grammar;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie, TokenId};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// GPT-2's byte-level alphabet, inverted: printable character → the byte it stands for.
fn byte_level_chars() -> HashMap<char, u8> {
    crate::tokenizer::bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c, b as u8))
        .collect()
}

/// How a tokenizer's vocabulary entries map to bytes (byte-level BPE, or SentencePiece with
/// byte fallback).
pub struct VocabBytes<'a> {
    tok: &'a tokenizers::Tokenizer,
    /// Added tokens: id → (content, special).
    added: HashMap<u32, (String, bool)>,
    /// GPT-2's byte-level alphabet, inverted; `None` for a byte-fallback vocabulary.
    chars: Option<HashMap<char, u8>>,
}

impl<'a> VocabBytes<'a> {
    /// Reads the tokenizer's decoder; anything but byte-level or byte-fallback is an error.
    pub fn new(tok: &'a tokenizers::Tokenizer) -> Result<Self> {
        let decoder = serde_json::to_string(&tok.get_decoder()).unwrap_or_default();
        let byte_level = decoder.contains("\"ByteLevel\"");
        if !byte_level && !decoder.contains("\"ByteFallback\"") {
            return Err(Error::Tokenizer {
                file: "(token bytes)".into(),
                reason: format!(
                    "grammars and logprobs need a byte-level BPE or byte-fallback tokenizer; this one decodes with {decoder}"
                ),
            });
        }
        let added = tok
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, a)| (id, (a.content, a.special)))
            .collect();
        Ok(Self {
            tok,
            added,
            chars: byte_level.then(byte_level_chars),
        })
    }

    /// The bytes of `id`, and whether it is special: a special token, an id the tokenizer
    /// does not have, or an entry that is not text (its bytes are then its name).
    pub fn get(&self, id: u32) -> (Vec<u8>, bool) {
        let (w, special) = match (self.added.get(&id), self.tok.id_to_token(id)) {
            (Some((content, special)), _) => (content.as_bytes().to_vec(), *special),
            (None, Some(s)) => match &self.chars {
                Some(chars) => match s.chars().map(|c| chars.get(&c).copied()).collect() {
                    Some(b) => (b, false),
                    None => (s.into_bytes(), true),
                },
                None if s.len() == 6 && s.starts_with("<0x") && s.ends_with('>') => {
                    match u8::from_str_radix(&s[3..5], 16) {
                        Ok(b) => (vec![b], false),
                        Err(_) => (s.into_bytes(), true),
                    }
                }
                None => (s.replace('\u{2581}', " ").into_bytes(), false),
            },
            (None, None) => (vec![], true),
        };
        if w.is_empty() {
            (format!("<[{id}]>").into_bytes(), true)
        } else {
            (w, special)
        }
    }
}

/// The bytes of every id below `width` (the logits width). Special tokens, ids the tokenizer
/// does not have (padding of the embedding matrix) and entries that are not text get the
/// special-token marker, which no grammar reaches by its text.
pub fn token_bytes(tok: &tokenizers::Tokenizer, width: usize) -> Result<Vec<Vec<u8>>> {
    let vocab = VocabBytes::new(tok)?;
    Ok((0..width as u32)
        .map(|id| match vocab.get(id) {
            (w, true) => [&[TokTrie::SPECIAL_TOKEN_MARKER], &w[..]].concat(),
            (w, false) => w,
        })
        .collect())
}

/// Compiles grammars for one model: llguidance's parser factory over the model's token trie.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// The trie of `tok` padded to `width` ids (the logits width); `eos` are all the ids that
    /// end generation (end of text and end of turn), allowed wherever the grammar is complete.
    pub fn new(tok: &Tokenizer, width: usize, eos: &[u32]) -> Result<Self> {
        Self::from_words(token_bytes(tok.inner(), width)?, eos)
    }

    /// A compiler over single bytes, with no model: token `b` is byte `b` (0xFF, which UTF-8
    /// never holds, is special) and 256 ends the text. [`Self::check`] matches text with it.
    pub fn over_bytes() -> Result<Self> {
        let mut words: Vec<Vec<u8>> = (0..=255u8)
            .map(|b| if b == 0xFF { vec![0xFF, b'?'] } else { vec![b] })
            .collect();
        words.push(b"\xFF<eos>".to_vec());
        Self::from_words(words, &[256])
    }

    /// Whether `text` is a complete sentence of `grammar`, for a compiler from
    /// [`Self::over_bytes`] (errors: the grammar does not compile).
    pub fn check(&self, grammar: &Grammar, text: &str) -> Result<bool> {
        Ok(self.compile(grammar)?.accepts_text(text))
    }

    fn from_words(words: Vec<Vec<u8>>, eos: &[u32]) -> Result<Self> {
        let width = words.len();
        let eos: Vec<TokenId> = eos
            .iter()
            .copied()
            .filter(|&e| (e as usize) < width)
            .collect();
        let Some(&first) = eos.first() else {
            return Err(Error::Tokenizer {
                file: "(constrained decoding)".into(),
                reason: "the model has no end-of-sequence token within its logits".into(),
            });
        };
        let info = TokRxInfo::new(width as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        // Not canonical: llguidance then never forces a tokenization, so the mask is every
        // token that keeps the output valid (what `RowState::sample` relies on).
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| Error::Tokenizer {
            file: "(constrained decoding)".into(),
            reason: format!("{e:#}"),
        })?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// The bytes of token `id` as the grammar sees them (special tokens start with 0xFF).
    pub fn token(&self, id: u32) -> &[u8] {
        self.factory.tok_env().tok_trie().token(id)
    }

    /// Compiles `grammar` into a fresh matcher for one row.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let kind = grammar.kind();
        let bad = |reason: String| Error::Grammar { kind, reason };
        let top = match grammar {
            Grammar::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| bad(format!("the schema is not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| bad(format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(bad(e));
        }
        Ok(Constraint { matcher, kind })
    }
}

/// Whether `text` is a complete sentence of `grammar`, checked byte by byte with no model (one
/// byte-level compiler per process). Errors: the grammar does not compile.
pub fn text_matches(grammar: &Grammar, text: &str) -> Result<bool> {
    byte_compiler(grammar.kind())?.check(grammar, text)
}

/// The process's byte-level compiler ([`GrammarCompiler::over_bytes`]); `kind` names the
/// grammar in the error if it cannot be built. Compile a grammar once with it and check many
/// texts with [`Constraint::accepts_text`].
pub fn byte_compiler(kind: &'static str) -> Result<&'static GrammarCompiler> {
    static BYTES: std::sync::OnceLock<std::result::Result<GrammarCompiler, String>> =
        std::sync::OnceLock::new();
    match BYTES.get_or_init(|| GrammarCompiler::over_bytes().map_err(|e| e.to_string())) {
        Ok(c) => Ok(c),
        Err(reason) => Err(Error::Grammar {
            kind,
            reason: reason.clone(),
        }),
    }
}

/// Compact separators unless the schema chooses its own llguidance options.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// The token that would extend a verbatim loop at the end of `generated`: the last 16 tokens,
/// or the last 8 repeats of a cycle of 2 to 8 tokens, all the same cycle. `None` when the
/// output does not end in such a loop.
pub fn loop_continuation(generated: &[u32]) -> Option<u32> {
    (1..=8usize).find_map(|p| {
        let span = (8 * p).max(16);
        let n = generated.len();
        if n < span {
            return None;
        }
        let tail = &generated[n - span..];
        tail.iter()
            .skip(p)
            .zip(tail)
            .all(|(a, b)| a == b)
            .then(|| generated[n - p])
    })
}

/// One row's grammar matcher. Clone it before use to constrain several rows to one grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    kind: &'static str,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("kind", &self.kind)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Constraint {
    fn failed(&self, e: impl std::fmt::Display) -> Error {
        Error::Constraint {
            kind: self.kind,
            reason: self.matcher.get_error().unwrap_or_else(|| format!("{e:#}")),
        }
    }

    /// The grammar's kind (`json_schema`, `regex`…).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether `tok` may come next (cheap: the matcher's state does not change).
    pub fn allows(&mut self, tok: u32) -> Result<bool> {
        match self.matcher.validate_tokens(&[tok]) {
            Ok(n) => Ok(n == 1),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Sets the logit of every token the grammar refuses here to -inf.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = match self.matcher.compute_mask() {
            Ok(m) => m,
            Err(e) => return Err(self.failed(e)),
        };
        mask.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        // Ids past the trie (a logits row wider than the model's) are never allowed either.
        if let Some(rest) = logits.get_mut(mask.len()..) {
            rest.fill(f32::NEG_INFINITY);
        }
        Ok(())
    }

    /// Advances the matcher past an accepted token.
    pub fn consume(&mut self, tok: u32) -> Result<()> {
        self.matcher.consume_token(tok).map_err(|e| self.failed(e))
    }

    /// The grammar admits nothing more (complete, or ended by an end-of-sequence token).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether a fresh copy of this matcher takes all of `text` byte by byte and is then
    /// complete: for a matcher from a byte-level compiler ([`GrammarCompiler::over_bytes`]).
    pub fn accepts_text(&self, text: &str) -> bool {
        let mut m = self.matcher.clone();
        let toks: Vec<TokenId> = text.bytes().map(TokenId::from).collect();
        matches!(m.validate_tokens(&toks), Ok(n) if n == toks.len())
            && m.consume_tokens(&toks).is_ok()
            && m.is_accepting().unwrap_or(false)
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    /// The tiny test vocabulary (byte-level BPE with two merges and ChatML specials).
    fn tiny_tokenizer() -> Tokenizer {
        let (tokens, types, merges) = crate::testing::tiny_vocab();
        let arr = |v: Vec<Value>| Value::Array(v);
        let md: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("qwen2".into())),
            (
                "tokenizer.ggml.tokens",
                arr(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                arr(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges",
                arr(merges.into_iter().map(Value::String).collect()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Tokenizer::from_gguf(&md, "tiny").unwrap()
    }

    #[test]
    fn the_byte_level_alphabet_is_gpt2s() {
        let map = byte_level_chars();
        for (b, c) in crate::testing::bytes_to_unicode().iter().enumerate() {
            assert_eq!(map[c], b as u8);
        }
    }

    #[test]
    fn loops_are_spotted_at_the_end_only() {
        assert_eq!(loop_continuation(&[7; 16]), Some(7));
        assert_eq!(loop_continuation(&[7; 15]), None);
        let mut cycle: Vec<u32> = [1, 2, 3].repeat(8);
        assert_eq!(loop_continuation(&cycle), Some(1));
        cycle.push(1);
        assert_eq!(loop_continuation(&cycle), Some(2));
        cycle.push(9);
        assert_eq!(loop_continuation(&cycle), None);
        // Seven repeats of a pair are not yet a loop; an array of a few equal items is not.
        assert_eq!(loop_continuation(&[4, 5].repeat(7)), None);
        assert_eq!(loop_continuation(&[0, 11, 0, 11, 0, 11, 0]), None);
    }

    #[test]
    fn token_bytes_round_trip_through_the_tokenizer() {
        let tok = tiny_tokenizer();
        let words = token_bytes(tok.inner(), 300).unwrap();
        assert_eq!(words.len(), 300);
        for (id, w) in words.iter().enumerate() {
            let id = id as u32;
            if id >= 258 {
                assert_eq!(w[0], TokTrie::SPECIAL_TOKEN_MARKER, "id {id}: {w:?}");
                continue;
            }
            assert_eq!(
                String::from_utf8_lossy(w),
                tok.decode(&[id], false).unwrap(),
                "id {id}"
            );
        }
        assert_eq!(words[256], b"he");
        assert_eq!(words[257], b" he");
        assert_eq!(&words[259][1..], b"<|im_end|>");
        // Whole texts: the concatenated bytes of their tokens are the text.
        for text in ["he said: hello, héllo 🙂\n\tok", "{\"a\": [1, 2]}"] {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| words[i as usize].clone())
                .collect();
            assert_eq!(bytes, text.as_bytes());
        }
    }

    #[test]
    fn padding_and_special_ids_are_never_allowed_and_eos_only_when_complete() {
        let tok = tiny_tokenizer();
        let g = GrammarCompiler::new(&tok, 300, &[259, 260]).unwrap();
        let mut c = g.compile(&Grammar::Regex("(.|\n)*".into())).unwrap();
        let mut logits = vec![0.0f32; 300];
        c.mask_logits(&mut logits).unwrap();
        let allowed: Vec<usize> = (0..300).filter(|&i| logits[i].is_finite()).collect();
        assert!(allowed.iter().all(|&i| i < 258 || i == 259 || i == 260));
        assert!(allowed.contains(&259) && allowed.contains(&260));
        assert!((261..300).all(|i| !c.allows(i).unwrap()));
        assert!(!c.allows(258).unwrap(), "<|im_start|> is special");
        let mut c = g.compile(&Grammar::Regex("ab".into())).unwrap();
        assert!(
            !c.allows(259).unwrap(),
            "EOS before the grammar is complete"
        );
        c.consume(b'a' as u32).unwrap();
        let mut logits = vec![0.0f32; 300];
        c.mask_logits(&mut logits).unwrap();
        let allowed: Vec<usize> = (0..300).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(allowed, vec![b'b' as usize]);
        c.consume(b'b' as u32).unwrap();
        assert!(c.is_finished(), "nothing can follow `ab`");
    }

    #[test]
    fn the_mask_is_exactly_the_tokens_that_validate() {
        // `RowState::sample` accepts a sampled token when it validates and otherwise redraws
        // from the mask; that is exact only if the two agree on every token.
        let tok = tiny_tokenizer();
        let g = GrammarCompiler::new(&tok, 261, &[259, 260]).unwrap();
        let schema = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":4},
            "n":{"type":"integer"}},"required":["name","n"],"additionalProperties":false}"#;
        for grammar in [
            Grammar::JsonSchema(schema.into()),
            Grammar::Regex("he(llo|y) [0-9]{2}".into()),
        ] {
            let mut c = g.compile(&grammar).unwrap();
            let mut state = 7u64;
            for _ in 0..40 {
                if c.is_finished() {
                    break;
                }
                let mut logits = vec![0.0f32; 261];
                c.mask_logits(&mut logits).unwrap();
                let allowed: Vec<u32> = (0..261u32)
                    .filter(|&i| logits[i as usize].is_finite())
                    .collect();
                for t in 0..261u32 {
                    assert_eq!(c.allows(t).unwrap(), allowed.contains(&t), "token {t}");
                }
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick = allowed[(state >> 33) as usize % allowed.len()];
                c.consume(pick).unwrap();
            }
        }
    }

    #[test]
    fn text_is_checked_against_a_grammar_byte_by_byte() {
        let schema = r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}"#;
        let g = Grammar::JsonSchema(schema.into());
        assert!(text_matches(&g, r#"{"a":3}"#).unwrap());
        assert!(!text_matches(&g, r#"{"a":"3"}"#).unwrap());
        assert!(!text_matches(&g, r#"{"a":3"#).unwrap(), "incomplete");
        let lark = Grammar::Lark("start: \"SELECT \" NAME\nNAME: /[a-z]+/".into());
        assert!(text_matches(&lark, "SELECT name").unwrap());
        assert!(!text_matches(&lark, "SELECT Name").unwrap());
        assert!(!text_matches(&lark, "SELECT ñ").unwrap(), "multi-byte text");
        assert!(text_matches(&Grammar::Regex("(".into()), "x").is_err());
    }

    #[test]
    fn bad_grammars_are_typed_errors_naming_their_kind() {
        let tok = tiny_tokenizer();
        let g = GrammarCompiler::new(&tok, 261, &[259]).unwrap();
        for (grammar, kind) in [
            (Grammar::Regex("a(b".into()), "regex"),
            (Grammar::Lark("start: foo".into()), "lark"),
            (
                Grammar::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
                "json_schema",
            ),
            (Grammar::JsonSchema("{not json".into()), "json_schema"),
        ] {
            match g.compile(&grammar) {
                Err(e @ Error::Grammar { kind: k, .. }) => {
                    assert_eq!(k, kind);
                    let msg = e.to_string();
                    assert!(msg.contains(kind), "{msg}");
                }
                other => panic!("{grammar:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn constraint_is_send() {
        fn send<T: Send>() {}
        send::<Constraint>();
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GrammarCompiler>();
    }
}

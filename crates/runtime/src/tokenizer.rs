//! Tokenizers: from a Hugging Face `tokenizer.json`, or built from a GGUF file's `tokenizer.ggml.*`
//! metadata the way llama.cpp builds it (byte-level BPE with the pre-tokenizer regexes llama.cpp
//! uses for each `tokenizer.ggml.pre`), plus incremental detokenisation for streaming.

use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel as ByteLevelPre;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

/// GPT-2's pre-tokenizer regex (llama.cpp's default for byte-level BPE).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's regex (single digits, newline handling).
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's regex (digits in groups of up to three).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre` value.
fn pre_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" => vec![GPT2_REGEX],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", GPT2_REGEX]
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => vec![QWEN2_REGEX],
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            vec![LLAMA3_REGEX]
        }
        _ => return None,
    })
}

/// A tokenizer with the model's BOS policy.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding a raw (non-template) prompt.
    add_bos: bool,
    bos_id: Option<u32>,
    /// Tokens of type "control" / special, by text.
    special: HashMap<String, u32>,
    /// How it was built, for `flywheel info`.
    kind: String,
    warnings: Vec<String>,
}

fn tok_err(file: &str, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        file: file.to_string(),
        reason: reason.into(),
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: &std::path::Path, bos: Option<&str>, add_bos: bool) -> Result<Self> {
        let file = path.display().to_string();
        // The tokenizers crate panics on some malformed files (found by the fuzz tests): a
        // panic while reading is an error naming the file, like any other malformed input.
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|p| {
                let why = crate::panic_text(p);
                tok_err(&file, format!("malformed tokenizer file ({why})"))
            })?
            .map_err(|e| tok_err(&file, e.to_string()))?;
        let special: HashMap<String, u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        let bos_id = bos.and_then(|b| inner.token_to_id(b));
        Ok(Self {
            inner,
            add_bos: add_bos && bos_id.is_some(),
            bos_id,
            special,
            kind: "tokenizer.json".into(),
            warnings: vec![],
        })
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf(md: &HashMap<String, Value>, file: &str) -> Result<Self> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| tok_err(file, format!("missing metadata `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|_| tok_err(file, "`tokenizer.ggml.model` is not a string"))?
            .clone();
        if model != "gpt2" {
            return Err(tok_err(
                file,
                format!(
                    "tokenizer.ggml.model = `{model}` is not supported yet (supported: gpt2 byte-level BPE); \
                     load the model from a Hugging Face folder with tokenizer.json instead"
                ),
            ));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            match get(k)? {
                Value::Array(a) => a
                    .iter()
                    .map(|v| {
                        v.to_string()
                            .cloned()
                            .map_err(|_| tok_err(file, format!("`{k}` holds a non-string")))
                    })
                    .collect(),
                _ => Err(tok_err(file, format!("`{k}` is not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        tok_err(
                            file,
                            format!("tokenizer.ggml.merges[{i}] = `{m}` has no space"),
                        )
                    })
            })
            .collect::<Result<_>>()?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| tok_err(file, format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let mut warnings = vec![];
        let regexes = pre_regexes(&pre).unwrap_or_else(|| {
            warnings.push(format!(
                "tokenizer.ggml.pre = `{pre}` is not known to flywheel; using the GPT-2 pre-tokenizer (tokens may differ from llama.cpp)"
            ));
            vec![GPT2_REGEX]
        });
        let mut seq: Vec<PreTokenizerWrapper> = Vec::new();
        for r in regexes {
            let split = Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(file, format!("bad pre-tokenizer regex: {e}")))?;
            seq.push(split.into());
        }
        seq.push(ByteLevelPre::new(false, false, false).into());
        inner.with_pre_tokenizer(Some(Sequence::new(seq)));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // Control (3) and user-defined (4) tokens are matched verbatim before BPE, as llama.cpp does
        // when parsing special tokens. Control tokens are special (decoding drops them);
        // user-defined ones are text (Qwen2.5's `<tool_call>`), as llama.cpp renders them.
        let mut special = HashMap::new();
        let mut added = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if *ty == 3 || *ty == 4 {
                special.insert(t.clone(), i as u32);
                added.push(AddedToken::from(t.clone(), *ty == 3));
            }
        }
        inner
            .add_special_tokens(added)
            .map_err(|e| tok_err(file, format!("cannot add special tokens: {e}")))?;
        let bos_id = md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok());
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            inner,
            add_bos: add_bos && bos_id.is_some(),
            bos_id,
            special,
            kind: format!("gguf gpt2 BPE (pre = {pre})"),
            warnings,
        })
    }

    /// Encodes text. Special-token markup (`<|im_start|>`…) becomes its token. With
    /// `add_special`, BOS is prepended where the model asks for it (raw prompts; a rendered chat
    /// template already carries its own BOS text).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err("(encode)", e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err("(decode)", e.to_string()))
    }

    /// The text of one token as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token text (vocabulary entry or special token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Special tokens by text.
    pub fn special_tokens(&self) -> &HashMap<String, u32> {
        &self.special
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token id, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether raw prompts get a BOS token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// A description of how the tokenizer was built.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Things the user should know (an unknown pre-tokenizer, …).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters.
/// A token that ends inside a multi-byte character yields nothing until the character completes.
pub struct IncrementalDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'a> IncrementalDecoder<'a> {
    /// A decoder with no tokens yet.
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = self.tok.decode(&self.ids[self.prefix..], true)?;
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && after.is_char_boundary(before.len())
        {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end (an incomplete character), decoded lossily.
    pub fn flush(&mut self) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = self.tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or("").to_string())
    }
}

/// GPT-2's byte → printable character map used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).expect("valid code point");
    }
    out
}

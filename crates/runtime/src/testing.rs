//! Tiny models on disk, for tests and benchmarks: a seeded random decoder written as a GGUF file
//! (llama.cpp names, Q/K rows permuted the way llama.cpp's converter does, a byte-level BPE
//! vocabulary in the metadata) or as a Hugging Face folder with sharded safetensors.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use flywheel_models::weights::{hf_to_gguf_name, MemoryWeights};
use flywheel_models::{Architecture, DecoderConfig};
use std::collections::HashMap;
use std::path::Path;

use crate::{Error, Result};

const CHATML: &str = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}";

pub use crate::tokenizer::bytes_to_unicode;

/// The tiny vocabulary: 256 byte tokens, two merges ("he", "Ġhe"), and ChatML control tokens.
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    let mut types = vec![1; 256];
    tokens.push("he".into());
    tokens.push("Ġhe".into());
    types.extend([1, 1]);
    for t in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        tokens.push(t.into());
        types.push(3);
    }
    (tokens, types, vec!["h e".into(), "Ġ he".into()])
}

/// A tiny config matching [`tiny_vocab`] (vocabulary of 261 tokens).
pub fn tiny_config(arch: Architecture) -> DecoderConfig {
    DecoderConfig {
        arch,
        vocab_size: 261,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        attention_bias: arch == Architecture::Qwen2,
        tie_word_embeddings: arch == Architecture::Llama,
        bos_token_id: None,
        eos_token_ids: vec![259],
    }
}

/// llama.cpp's converter permutation of Q/K rows (HF half-split → interleaved rotary layout).
fn llama_cpp_permute(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let t = t.reshape((n_head, 2, rows / n_head / 2, rest))?;
    Ok(t.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Writes `w` (Hugging Face names, f32) as a GGUF file; matrices in `quant`, vectors in F32.
pub fn write_gguf(
    path: &Path,
    cfg: &DecoderConfig,
    w: &MemoryWeights,
    quant: GgmlDType,
) -> Result<()> {
    let arch = cfg.arch.name();
    let (tokens, types, merges) = tiny_vocab();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            format!("{arch}.embedding_length"),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            format!("{arch}.block_count"),
            Value::U32(cfg.num_layers as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(cfg.num_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(cfg.eos_token_ids[0]),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ];
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = w.tensors.keys().collect();
    names.sort();
    let mut qs: Vec<(String, QTensor)> = vec![];
    for name in names {
        let mut t = w.tensors[name].to_dtype(DType::F32)?;
        if cfg.arch == Architecture::Llama {
            if name.contains("self_attn.q_proj.") {
                t = llama_cpp_permute(&t, cfg.num_heads)?;
            } else if name.contains("self_attn.k_proj.") {
                t = llama_cpp_permute(&t, cfg.num_kv_heads)?;
            }
        }
        let gguf = hf_to_gguf_name(name).ok_or_else(|| Error::NotAModel {
            path: path.display().to_string(),
            reason: format!("no GGUF name for `{name}`"),
        })?;
        let dtype = if t.rank() == 2 { quant } else { GgmlDType::F32 };
        qs.push((gguf, QTensor::quantize(&t, dtype)?));
    }
    let tmp = path.with_extension("gguf.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::Io {
        path: tmp.display().to_string(),
        error: e,
    })?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        error: e,
    })?;
    Ok(())
}

/// Writes `w` as a Hugging Face folder: config.json, `shards` safetensors files with an index,
/// tokenizer.json (the tiny byte-level BPE) and tokenizer_config.json with a ChatML template.
pub fn write_hf_folder(
    dir: &Path,
    cfg: &DecoderConfig,
    w: &MemoryWeights,
    shards: usize,
) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        error: e,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config = cfg.to_hf_json();
    let write = |p: &Path, s: String| std::fs::write(p, s).map_err(|e| io(p, e));
    write(&dir.join("config.json"), config.to_string())?;
    let tok_cfg = serde_json::json!({"chat_template": CHATML, "eos_token": "<|endoftext|>", "add_bos_token": false});
    write(&dir.join("tokenizer_config.json"), tok_cfg.to_string())?;
    // The tokenizer.json is the GGUF-metadata tokenizer, saved in Hugging Face's format.
    let (tokens, types, merges) = tiny_vocab();
    let md: HashMap<String, Value> = [
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
    ]
    .into_iter()
    .collect();
    let tok = crate::Tokenizer::from_gguf(&md, "(tiny)")?;
    let tok_path = dir.join("tokenizer.json");
    tok.inner()
        .save(&tok_path, false)
        .map_err(|e| Error::Tokenizer {
            file: tok_path.display().to_string(),
            reason: e.to_string(),
        })?;
    let mut names: Vec<&String> = w.tensors.keys().collect();
    names.sort();
    let per = names.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards <= 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let map: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), w.tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&map, dir.join(&file))?;
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        write(&dir.join("model.safetensors.index.json"), index.to_string())?;
    }
    Ok(())
}

/// Seeded random weights for [`tiny_config`].
pub fn tiny_weights(cfg: &DecoderConfig, seed: u64) -> Result<MemoryWeights> {
    Ok(MemoryWeights::random_decoder(
        cfg,
        seed,
        &Device::Cpu,
        DType::F32,
    )?)
}

/// Writes a seeded random BERT sentence encoder (hidden 32, 2 layers, 4 heads, WordPiece over
/// letters, digits, punctuation and a few whole words; mean pooling; 128-token window) as a
/// sentence-transformers folder, for retrieval tests that need an embedder in milliseconds.
pub fn write_tiny_bert_folder(dir: &Path, seed: u64) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        error: e,
    };
    std::fs::create_dir_all(dir.join("1_Pooling")).map_err(|e| io(dir, e))?;
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in ('a'..='z').chain('0'..='9') {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    for p in [
        ".", ",", "?", "!", ":", ";", "(", ")", "-", "'", "\"", "/", "_", "=", "[", "]",
    ] {
        vocab.push(p.to_string());
    }
    for w in [
        "the", "python", "install", "debugger", "file", "list", "how", "what", "is", "do",
    ] {
        vocab.push(w.to_string());
    }
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    let added: Vec<serde_json::Value> = vocab[..5]
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": map}
    });
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, tok.to_string()).map_err(|e| io(&tok_path, e))?;
    let (h, layers, inter, max_pos) = (32usize, 2usize, 64usize, 160usize);
    let config = serde_json::json!({
        "model_type": "bert", "vocab_size": vocab.len(), "hidden_size": h,
        "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": inter,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": max_pos, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": null
    });
    let write = |p: &Path, s: String| std::fs::write(p, s).map_err(|e| io(p, e));
    write(&dir.join("config.json"), config.to_string())?;
    write(
        &dir.join("1_Pooling/config.json"),
        serde_json::json!({"word_embedding_dimension": h, "pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}).to_string(),
    )?;
    write(
        &dir.join("sentence_bert_config.json"),
        serde_json::json!({"max_seq_length": 128, "do_lower_case": false}).to_string(),
    )?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                offset + scale * (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| -> Result<()> {
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let v = vocab.len();
    put(
        "embeddings.word_embeddings.weight".into(),
        vec![v, h],
        rand(v * h, 1.0, 0.0),
    )?;
    put(
        "embeddings.position_embeddings.weight".into(),
        vec![max_pos, h],
        rand(max_pos * h, 0.2, 0.0),
    )?;
    put(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        rand(2 * h, 0.2, 0.0),
    )?;
    put(
        "embeddings.LayerNorm.weight".into(),
        vec![h],
        rand(h, 0.1, 1.0),
    )?;
    put(
        "embeddings.LayerNorm.bias".into(),
        vec![h],
        rand(h, 0.1, 0.0),
    )?;
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (name, o, i) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inter, h),
            ("output.dense", h, inter),
        ] {
            let scale = 1.0 / (i as f32).sqrt();
            put(
                format!("{p}.{name}.weight"),
                vec![o, i],
                rand(o * i, scale, 0.0),
            )?;
            put(format!("{p}.{name}.bias"), vec![o], rand(o, 0.05, 0.0))?;
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(format!("{p}.{name}.weight"), vec![h], rand(h, 0.1, 1.0))?;
            put(format!("{p}.{name}.bias"), vec![h], rand(h, 0.1, 0.0))?;
        }
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let _ = DType::F32;
    Ok(())
}

/// Reports a test that cannot run here (a CPU without the feature it tests, or
/// `FLYWHEEL_SKIP_REAL_MODELS=1`): to stderr, and as a line appended to the file
/// `FLYWHEEL_SKIP_LOG` names, which `scripts/test.sh` sets, counts and prints, since cargo's
/// harness can only report such a test as passed.
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
    if let Ok(path) = std::env::var("FLYWHEEL_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// Seeded mutation fuzzing (not coverage-guided): `cases` variants of the valid input `seed`,
/// each with a few random edits in its first `span` bytes (all of it when `span` is 0): a
/// flipped bit, a byte set to 0x00, 0xFF or a random value, a byte inserted or removed, or the
/// input cut short. The same `rng_seed` gives the same cases.
pub fn mutations(seed: &[u8], cases: usize, span: usize, rng_seed: u64) -> Vec<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    (0..cases)
        .map(|_| {
            let mut v = seed.to_vec();
            for _ in 0..rng.random_range(1..=4) {
                let limit = if span == 0 {
                    v.len()
                } else {
                    span.min(v.len())
                };
                if limit == 0 {
                    break;
                }
                let at = rng.random_range(0..limit);
                match rng.random_range(0..7) {
                    0 => v[at] ^= 1 << rng.random_range(0..8),
                    1 => v[at] = 0,
                    2 => v[at] = 0xFF,
                    3 => v[at] = rng.random(),
                    4 => v.insert(at, rng.random()),
                    5 => {
                        v.remove(at);
                    }
                    _ => v.truncate(at),
                }
            }
            v
        })
        .collect()
}

/// Runs `f`, turning a panic into an error naming `case` (fuzz tests assert there is none).
pub fn no_panic<T>(case: &str, f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| format!("{case}: panicked: {}", crate::panic_text(p)))
}

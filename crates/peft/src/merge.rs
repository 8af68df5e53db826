//! Folding a LoRA adapter into its base model and writing a Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that transformers, vLLM, llama.cpp's converter and flywheel load.
//! A GGUF base is dequantized on the way out; the folder is written under a temporary name and
//! renamed into place, so a failed merge leaves nothing half-written.

use candle_core::{DType, Device, Tensor};
use flywheel_models::{DecoderConfig, GgufWeights, SafetensorsWeights, Weights};
use flywheel_runtime::{LoadOptions, ModelFormat, TextModel};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use crate::adapter::{write_safetensors, Adapter};
use crate::lora::LoraHook;
use crate::{atomic_write, write_json_atomic, Error, Result};

/// What [`merge`] wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// The output folder.
    pub out: PathBuf,
    /// Projections that received an adapter update.
    pub merged_modules: usize,
    /// Tensors written.
    pub tensors: usize,
}

/// Merges `adapter_dir` into the model `model_spec` and writes a Hugging Face folder at `out`
/// with weights in `dtype` (f32, bf16 or f16). `out` must not exist yet.
pub fn merge(
    model_spec: &str,
    adapter_dir: &Path,
    out: &Path,
    dtype: DType,
) -> Result<MergeSummary> {
    if out.exists() {
        return Err(Error::Config {
            field: "--out".into(),
            reason: format!("{} already exists; choose a new folder", out.display()),
        });
    }
    let dev = Device::Cpu;
    let adapter = Adapter::load(adapter_dir, &dev, DType::F32)?;
    let fmt = ModelFormat::resolve(model_spec)?;
    let hook = LoraHook::for_config(&adapter.config);
    let opts = LoadOptions {
        device: dev.clone(),
        dtype: Some(DType::F32),
    };
    let model = TextModel::load_with_hook(&fmt, &opts, &hook)?;
    hook.install(&adapter)?;
    let cfg = model.model().config().clone();
    let weights: Box<dyn Weights> = match &fmt {
        ModelFormat::Gguf(p) => {
            let mut w = GgufWeights::open(p, &dev, DType::F32)?;
            if cfg.arch == flywheel_models::Architecture::Llama {
                w.set_unpermute_qk(cfg.num_heads, cfg.num_kv_heads);
            }
            Box::new(w)
        }
        ModelFormat::HfFolder(p) => {
            let files = flywheel_runtime::load::safetensors_files(p)?;
            Box::new(SafetensorsWeights::open(&files, &dev, DType::F32)?)
        }
    };
    let installed = hook.installed();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut merged_modules = 0;
    for (name, shape) in tensor_names(&cfg) {
        let mut t = weights.tensor(&name, &shape)?;
        if let Some(module) = name.strip_suffix(".weight") {
            if let Some(Some(p)) = installed.get(module) {
                let delta =
                    (p.b.to_dtype(DType::F32)?
                        .matmul(&p.a.to_dtype(DType::F32)?)?
                        * p.scale)?;
                t = (t + delta)?;
                merged_modules += 1;
            }
        }
        tensors.push((name, t.to_dtype(dtype)?));
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "merged".into())
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
    let tok = model.tokenizer();
    let token_text = |id: u32| {
        tok.id_to_token(id)
            .map(Value::String)
            .unwrap_or(Value::Null)
    };
    let eos_ids = model.eos_ids().to_vec();
    atomic_write(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&hf_config(&cfg, dtype, &eos_ids))
            .expect("json")
            .as_bytes(),
    )?;
    let tok_json = tok.inner().to_string(true).map_err(|e| Error::Config {
        field: "tokenizer".into(),
        reason: format!("cannot serialise the tokenizer: {e}"),
    })?;
    atomic_write(&tmp.join("tokenizer.json"), tok_json.as_bytes())?;
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
        "add_bos_token": tok.adds_bos(),
        "bos_token": tok.bos_id().map(token_text).unwrap_or(Value::Null),
        "eos_token": cfg.eos_token_ids.first().copied().or(eos_ids.first().copied()).map(token_text).unwrap_or(Value::Null),
    });
    if let Some(src) = &model.info().chat_template {
        tc["chat_template"] = Value::String(src.clone());
    }
    write_json_atomic(&tmp.join("tokenizer_config.json"), &tc)?;
    let gen = json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos_ids,
    });
    write_json_atomic(&tmp.join("generation_config.json"), &gen)?;
    if let Ok(rec) = std::fs::read(adapter_dir.join(crate::adapter::RECORD_FILE)) {
        atomic_write(&tmp.join(crate::adapter::RECORD_FILE), &rec)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        merged_modules,
        tensors: tensors.len(),
    })
}

/// Every tensor of a decoder under Hugging Face names, with its shape.
pub fn tensor_names(cfg: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// A Hugging Face `config.json` for `cfg`: the model's own keys plus the class name and dtype;
/// `eos` stands in when the config names no EOS token.
pub fn hf_config(cfg: &DecoderConfig, dtype: DType, eos: &[u32]) -> Value {
    use flywheel_models::Architecture;
    let class = match cfg.arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let mut v = if cfg.eos_token_ids.is_empty() {
        DecoderConfig {
            eos_token_ids: eos.to_vec(),
            ..cfg.clone()
        }
        .to_hf_json()
    } else {
        cfg.to_hf_json()
    };
    v["architectures"] = json!([class]);
    v["torch_dtype"] = json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    v
}

//! Folding a LoRA adapter into its base model and writing a Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that transformers, vLLM, llama.cpp's converter and flywheel load.
//! A GGUF base is dequantized on the way out; the folder is written under a temporary name and
//! renamed into place, so a failed merge leaves nothing half-written.

use candle_core::{DType, Device};
use flywheel_models::{GgufWeights, SafetensorsWeights, Weights};
use flywheel_peft::adapter::{write_safetensors, Adapter, RECORD_FILE};
use flywheel_peft::merge::{fold_adapter, hf_config};
use flywheel_peft::LoraHook;
use flywheel_runtime::{LoadOptions, ModelFormat, TextModel};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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
    let (tensors, merged_modules) = fold_adapter(weights.as_ref(), &cfg, &hook, dtype)?;
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
    if let Ok(rec) = std::fs::read(adapter_dir.join(RECORD_FILE)) {
        atomic_write(&tmp.join(RECORD_FILE), &rec)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        merged_modules,
        tensors: tensors.len(),
    })
}

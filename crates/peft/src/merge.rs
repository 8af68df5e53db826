//! Folding a LoRA adapter into its base weights: the merged tensors under Hugging Face names
//! and the `config.json` that describes them. Writing the folder (with the tokenizer) is
//! `flywheel_train::merge`, which loads the model.

use candle_core::{DType, Tensor};
use flywheel_models::{DecoderConfig, Weights};
use serde_json::{json, Value};

use crate::lora::LoraHook;
use crate::Result;

/// Every base tensor of `cfg` read from `weights`, with the adapter installed in `hook` folded
/// in (`W + scale · B·A`) and converted to `dtype`; also the number of projections updated.
pub fn fold_adapter(
    weights: &dyn Weights,
    cfg: &DecoderConfig,
    hook: &LoraHook,
    dtype: DType,
) -> Result<(Vec<(String, Tensor)>, usize)> {
    let installed = hook.installed();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut merged_modules = 0;
    for (name, shape) in tensor_names(cfg) {
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
    Ok((tensors, merged_modules))
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

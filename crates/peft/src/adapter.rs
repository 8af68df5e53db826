//! Adapters on disk in the Hugging Face PEFT layout: `adapter_config.json` +
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` /
//! `.lora_B.weight`, so PEFT, vLLM and mistral.rs load what flywheel trains and flywheel loads
//! what PEFT trains. A provenance record (`flywheel_adapter.json`) travels beside it.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{LoraConfig, TargetModules};
use crate::{atomic_write, Error, Result};

/// Key prefix PEFT puts in front of module names.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// flywheel's provenance record.
pub const RECORD_FILE: &str = "flywheel_adapter.json";

/// A LoRA adapter: its shape and its `(A, B)` factors by module name (`model.layers.N.…`).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Rank, alpha, targets.
    pub config: LoraConfig,
    /// `(A (r, in), B (out, r))` per module, f32.
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
    /// `base_model_name_or_path` from the config, if any.
    pub base_model: Option<String>,
    /// Where it came from (for error messages).
    pub origin: String,
}

/// How an adapter was made; saved as `flywheel_adapter.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// flywheel version that trained it.
    pub flywheel_version: String,
    /// The base model as given in the recipe.
    pub base_model: String,
    /// sha256 of the base model's weight file(s).
    pub base_model_sha256: String,
    /// The recipe, as TOML text.
    pub recipe: String,
    /// sha256 of each data file.
    pub data_sha256: BTreeMap<String, String>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Tokens that carried loss.
    pub trained_tokens: usize,
    /// Mean training loss over the last logged window.
    pub final_train_loss: Option<f64>,
    /// The last evaluation loss.
    pub final_eval_loss: Option<f64>,
    /// Examples dropped or truncated for length, by policy.
    pub overlong_examples: usize,
    /// UTC time the adapter was written (RFC 3339).
    pub created: String,
}

impl Adapter {
    /// The scale for factors of rank `r` under this config.
    pub fn scale_for(&self, r: usize) -> f64 {
        let cfg = LoraConfig {
            r,
            ..self.config.clone()
        };
        cfg.scale()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created),
    /// each atomically.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let leaves = self.config.target_modules.leaves();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "use_rslora": self.config.use_rslora,
            "target_modules": leaves,
            "layers_to_transform": if self.config.layers_to_transform.is_empty() {
                Value::Null
            } else {
                json!(self.config.layers_to_transform)
            },
            "layers_pattern": Value::Null,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": Value::Null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "revision": Value::Null,
        });
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        atomic_write(&dir.join(CONFIG_FILE), text.as_bytes())?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, (a, b)) in &self.weights {
            tensors.push((
                format!("{PEFT_PREFIX}{name}.lora_A.weight"),
                a.to_dtype(DType::F32)?.contiguous()?,
            ));
            tensors.push((
                format!("{PEFT_PREFIX}{name}.lora_B.weight"),
                b.to_dtype(DType::F32)?.contiguous()?,
            ));
        }
        write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)
    }

    /// Reads a PEFT LoRA adapter folder onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let origin = dir.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Adapter {
            path: cfg_path.display().to_string(),
            reason: format!("invalid JSON: {e}"),
        })?;
        let field_err = |field: &str, reason: &str| Error::Adapter {
            path: cfg_path.display().to_string(),
            reason: format!("field `{field}`: {reason}"),
        };
        match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(field_err(
                    "peft_type",
                    &format!("`{other}` is not supported (only LORA)"),
                ))
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| field_err("r", "missing or not an integer"))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        for (key, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
            if v.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(field_err(
                    key,
                    &format!("{what} adapters are not supported"),
                ));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if v.get(key)
                .and_then(Value::as_object)
                .is_some_and(|o| !o.is_empty())
            {
                return Err(field_err(key, "per-module ranks/alphas are not supported"));
            }
        }
        let targets = match v.get("target_modules") {
            Some(Value::String(s)) => TargetModules::One(s.clone()),
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            ),
            _ => TargetModules::Names(Vec::new()),
        };
        let layers = v
            .get("layers_to_transform")
            .map(|l| match l {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect(),
                Value::Number(n) => n.as_u64().map(|x| vec![x as usize]).unwrap_or_default(),
                _ => Vec::new(),
            })
            .unwrap_or_default();
        let config = LoraConfig {
            r,
            alpha,
            dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            target_modules: targets,
            layers_to_transform: layers,
        };
        let wpath = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&wpath).map_err(|e| Error::io(&wpath, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Adapter {
            path: wpath.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut a_map = BTreeMap::new();
        let mut b_map = BTreeMap::new();
        for (key, view) in st.tensors() {
            let (module, which) = parse_peft_key(&key).ok_or_else(|| Error::Adapter {
                path: wpath.display().to_string(),
                reason: format!("unexpected tensor `{key}` (only LoRA A/B factors are supported)"),
            })?;
            let t = tensor_from_view(&view, device)
                .map_err(|e| Error::Adapter {
                    path: wpath.display().to_string(),
                    reason: format!("`{key}`: {e}"),
                })?
                .to_dtype(dtype)?;
            if which == 'A' {
                a_map.insert(module, t);
            } else {
                b_map.insert(module, t);
            }
        }
        // PEFT's `rank_pattern` gives some modules their own rank; otherwise every factor
        // has the config's `r`.
        let per_module_ranks = v
            .get("rank_pattern")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty());
        let mut weights = BTreeMap::new();
        for (module, a) in a_map {
            let b = b_map.remove(&module).ok_or_else(|| Error::Adapter {
                path: wpath.display().to_string(),
                reason: format!("`{module}` has lora_A but no lora_B"),
            })?;
            let (ra, rb) = (a.dims().first().copied(), b.dims().get(1).copied());
            if a.rank() != 2 || b.rank() != 2 || ra != rb {
                return Err(Error::Adapter {
                    path: wpath.display().to_string(),
                    reason: format!(
                        "`{module}`: lora_A {:?} and lora_B {:?} do not share a rank",
                        a.dims(),
                        b.dims()
                    ),
                });
            }
            if !per_module_ranks && ra != Some(r) {
                return Err(Error::Adapter {
                    path: cfg_path.display().to_string(),
                    reason: format!(
                        "`r` is {r}, but `{module}` has rank {} in {WEIGHTS_FILE}",
                        ra.unwrap_or(0)
                    ),
                });
            }
            weights.insert(module, (a, b));
        }
        if let Some(module) = b_map.keys().next() {
            return Err(Error::Adapter {
                path: wpath.display().to_string(),
                reason: format!("`{module}` has lora_B but no lora_A"),
            });
        }
        if weights.is_empty() {
            return Err(Error::Adapter {
                path: wpath.display().to_string(),
                reason: "holds no LoRA factors".into(),
            });
        }
        Ok(Self {
            config,
            weights,
            base_model: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            origin,
        })
    }
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` →
/// (`model.layers.0.self_attn.q_proj`, `'A'`); also accepts PEFT's `.lora_A.default.weight`.
pub fn parse_peft_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(m) = rest.strip_suffix(".lora_A") {
        Some((m.to_string(), 'A'))
    } else {
        rest.strip_suffix(".lora_B").map(|m| (m.to_string(), 'B'))
    }
}

/// A candle tensor from a safetensors view (f32, f16, bf16).
pub fn tensor_from_view(
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let shape = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
        safetensors::Dtype::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        safetensors::Dtype::F16 => {
            let v: Vec<half::f16> = data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        safetensors::Dtype::BF16 => {
            let v: Vec<half::bf16> = data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        other => return Err(format!("dtype {other:?} is not supported")),
    };
    t.map_err(|e| e.to_string())
}

/// Writes named tensors (f32, f16 or bf16) as one safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (
                "F32",
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            DType::F16 => (
                "F16",
                t.flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                "BF16",
                t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(Error::Config {
                    field: "dtype".into(),
                    reason: format!("cannot write {other:?} tensors"),
                })
            }
        };
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for b in blobs {
        out.extend_from_slice(&b);
    }
    atomic_write(path, &out)
}

/// Reads every tensor of a safetensors file (f32/f16/bf16) onto `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Adapter {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (k, view) in st.tensors() {
        let t = tensor_from_view(&view, device).map_err(|e| Error::Adapter {
            path: path.display().to_string(),
            reason: format!("`{k}`: {e}"),
        })?;
        out.insert(k, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_parse() {
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight"),
            Some(("model.layers.3.mlp.up_proj".into(), 'B'))
        );
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"),
            None
        );
    }
}

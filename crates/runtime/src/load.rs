//! Finding and loading models: a GGUF file (or a folder holding one), a Hugging Face folder
//! (config.json, safetensors or a sharded index, tokenizer.json, tokenizer_config.json,
//! generation_config.json), or a hub id fetched through hf-hub into the Hugging Face cache.

use candle_core::{DType, Device};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where and how to run a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The compute device.
    pub device: Device,
    /// Activation / dense-weight dtype; `None` picks f32 on CPU and bf16 on GPUs.
    pub dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
        }
    }
}

impl LoadOptions {
    /// The dtype to use for `format`.
    pub fn resolved_dtype(&self) -> DType {
        self.dtype.unwrap_or(if self.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        })
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    let unavailable = |reason: &str| Error::Device {
        device: s.to_string(),
        reason: reason.to_string(),
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| unavailable("expected cuda:N with N a number"))
                })
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                return Err(unavailable(
                    "this flywheel was built without the `cuda` feature",
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| unavailable(&e.to_string()))
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(unavailable(
                    "this flywheel was built without the `metal` feature",
                ));
            }
            Device::new_metal(0).map_err(|e| unavailable(&e.to_string()))
        }
        _ => Err(unavailable("expected cpu, cuda, cuda:N or metal")),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(Error::Invalid(flywheel_api::ApiError::InvalidField {
            field: "dtype",
            reason: format!("`{s}` is not one of f32, bf16, f16"),
        })),
    }
}

/// A located model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face model folder.
    HfFolder(PathBuf),
}

impl ModelFormat {
    /// Resolves a user's `--model` argument: a GGUF file, a folder, or a hub id (`owner/name`).
    pub fn resolve(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_file() {
            return Ok(Self::Gguf(p.to_path_buf()));
        }
        if p.is_dir() {
            if p.join("config.json").is_file() {
                return Ok(Self::HfFolder(p.to_path_buf()));
            }
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::Io {
                    path: spec.to_string(),
                    error: e,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "gguf"))
                .collect();
            ggufs.sort();
            return match ggufs.len() {
                1 => Ok(Self::Gguf(ggufs.remove(0))),
                0 => Err(Error::NotAModel {
                    path: spec.to_string(),
                    reason: "the folder has neither config.json nor a .gguf file".into(),
                }),
                _ => Err(Error::NotAModel {
                    path: spec.to_string(),
                    reason: format!(
                        "the folder has several .gguf files; name one: {}",
                        ggufs
                            .iter()
                            .map(|g| g.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
            };
        }
        // `owner/name` whose `owner` is a local folder (`models/typo`) is a mistyped path,
        // not a hub id: "no such file", without a network lookup.
        let owner_is_local = spec
            .split('/')
            .next()
            .is_some_and(|o| Path::new(o).is_dir());
        if looks_like_hub_id(spec) && !owner_is_local {
            return hub::fetch(spec).map(Self::HfFolder);
        }
        Err(Error::NotFound {
            path: spec.to_string(),
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfFolder(p) => p,
        }
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The hub path: hf-hub into the Hugging Face cache, honouring `HF_HOME` and `HF_HUB_OFFLINE`.
pub mod hub {
    use super::*;
    use hf_hub::{Cache, Repo};

    const FILES: &[&str] = &["config.json", "tokenizer.json"];
    const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];

    fn offline() -> bool {
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
    }

    /// Returns the snapshot folder of `id`, downloading what is missing unless offline.
    pub fn fetch(id: &str) -> Result<PathBuf> {
        let err = |reason: String| Error::Hub {
            id: id.to_string(),
            reason,
        };
        let cache = Cache::from_env();
        let cached = cache.model(id.to_string());
        if offline() {
            let config = cached.get("config.json").ok_or_else(|| {
                err(format!(
                    "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache ({}); \
                     download it on a connected machine or pass a local folder",
                    cache.path().display()
                ))
            })?;
            let dir = config
                .parent()
                .expect("a cached file has a parent")
                .to_path_buf();
            for f in FILES {
                if cached.get(f).is_none() {
                    return Err(err(format!(
                        "HF_HUB_OFFLINE is set and `{f}` is not in the cache"
                    )));
                }
            }
            return Ok(dir);
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let repo = api.repo(Repo::model(id.to_string()));
        let mut dir = None;
        for f in FILES {
            let p = repo.get(f).map_err(|e| {
                err(format!(
                    "cannot fetch `{f}`: {e} (set HF_HUB_OFFLINE=1 to use the cache only)"
                ))
            })?;
            dir = p.parent().map(Path::to_path_buf);
        }
        for f in OPTIONAL {
            // Optional side files: a repository without them still loads (defaults apply).
            let _ = repo.get(f);
        }
        match repo.get("model.safetensors.index.json") {
            Ok(index) => {
                for shard in super::shards_of_index(&index)? {
                    repo.get(&shard)
                        .map_err(|e| err(format!("cannot fetch `{shard}`: {e}")))?;
                }
            }
            Err(_) => {
                repo.get("model.safetensors")
                    .map_err(|e| err(format!("cannot fetch `model.safetensors`: {e}")))?;
            }
        }
        dir.ok_or_else(|| err("no files".into()))
    }
}

/// The shard file names listed in a `model.safetensors.index.json`.
pub fn shards_of_index(index: &Path) -> Result<Vec<String>> {
    let text = read_text(index)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadJson {
        file: index.display().to_string(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::BadJson {
            file: index.display().to_string(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// The safetensors files of an HF folder: `model.safetensors` or every shard of the index.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let files: Vec<PathBuf> = shards_of_index(&index)?
            .iter()
            .map(|s| dir.join(s))
            .collect();
        for f in &files {
            if !f.is_file() {
                return Err(Error::NotAModel {
                    path: index.display().to_string(),
                    reason: format!("lists shard `{}`, which is missing", f.display()),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::NotAModel {
        path: dir.display().to_string(),
        reason: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// sha256 of a model's weights: of the file itself (GGUF, or a lone safetensors file), or of its
/// safetensors files' digests concatenated in order (a single file's digest is returned as is).
pub fn model_sha(path: &Path) -> Result<String> {
    let sha = |p: &Path| {
        flywheel_api::files::sha256_file(p).map_err(|e| Error::Io {
            path: p.display().to_string(),
            error: e,
        })
    };
    if path.is_file() {
        return sha(path);
    }
    let mut all = String::new();
    for f in safetensors_files(path)? {
        all.push_str(&sha(&f)?);
    }
    if all.len() == 64 {
        return Ok(all);
    }
    Ok(flywheel_api::files::sha256_hex(all.as_bytes()))
}

/// Reads a text file, mapping errors to the file's name.
pub fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::Io {
        path: p.display().to_string(),
        error: e,
    })
}

/// Reads an optional JSON file (`Ok(None)` when absent).
pub fn read_json_opt(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = read_text(p)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadJson {
            file: p.display().to_string(),
            reason: e.to_string(),
        })
}

/// What `flywheel info` prints about a model.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ModelInfo {
    /// Where the model was loaded from.
    pub path: String,
    /// `gguf` or `hf-folder`.
    pub format: String,
    /// Architecture name.
    pub architecture: String,
    /// Parameter count.
    pub parameters: usize,
    /// Tensor storage types with their tensor counts.
    pub tensor_types: BTreeMap<String, usize>,
    /// Context length (0 for encoders without one).
    pub context_length: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads / key-value heads.
    pub heads: (usize, usize),
    /// Vocabulary size.
    pub vocab_size: usize,
    /// How the tokenizer was built.
    pub tokenizer: String,
    /// End-of-generation tokens.
    pub eos_tokens: Vec<String>,
    /// The chat template source, if any.
    pub chat_template: Option<String>,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model:          {}", self.path)?;
        writeln!(f, "format:         {}", self.format)?;
        writeln!(f, "architecture:   {}", self.architecture)?;
        writeln!(
            f,
            "parameters:     {} ({:.1} M)",
            self.parameters,
            self.parameters as f64 / 1e6
        )?;
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        writeln!(f, "tensor types:   {}", types.join(", "))?;
        if self.context_length > 0 {
            writeln!(f, "context length: {}", self.context_length)?;
        }
        writeln!(f, "hidden size:    {}", self.hidden_size)?;
        writeln!(f, "layers:         {}", self.layers)?;
        writeln!(f, "heads:          {} (kv {})", self.heads.0, self.heads.1)?;
        writeln!(f, "vocabulary:     {}", self.vocab_size)?;
        writeln!(f, "tokenizer:      {}", self.tokenizer)?;
        if !self.eos_tokens.is_empty() {
            writeln!(f, "stop tokens:    {}", self.eos_tokens.join(" "))?;
        }
        match &self.chat_template {
            Some(t) => writeln!(f, "chat template:\n{}", indent(t))?,
            None => writeln!(f, "chat template:  (none)")?,
        }
        for w in &self.warnings {
            writeln!(f, "warning:        {w}")?;
        }
        Ok(())
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("models/x/y"));
        assert!(!looks_like_hub_id("./x"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("plain"));
    }

    #[test]
    fn a_mistyped_path_under_a_local_folder_is_not_a_hub_lookup() {
        // Tests run in the crate's folder, where `src` exists: `src/typo` reads like
        // `owner/name` but is a mistyped path.
        assert!(looks_like_hub_id("src/typo"));
        let err = ModelFormat::resolve("src/typo").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[test]
    fn missing_path_is_not_found() {
        let err = ModelFormat::resolve("/definitely/not/here.gguf").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("/definitely/not/here.gguf"));
    }

    #[test]
    fn devices_and_dtypes_parse_with_clear_errors() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda"), "{e}");
        if !cfg!(feature = "cuda") {
            assert!(parse_device("cuda")
                .unwrap_err()
                .to_string()
                .contains("`cuda` feature"));
        }
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("int3")
            .unwrap_err()
            .to_string()
            .contains("dtype"));
    }
}

//! The named-adapter registry: adapters loaded from PEFT folders, checked against the base
//! model, named, and replaced or removed at run time. Each loaded version is immutable and shared by
//! `Arc`, so the base weights exist once whatever the number of adapters, and a request keeps
//! the version it started with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use serde_json::{json, Value};

use crate::adapter::RECORD_FILE;
use crate::{Adapter, AdapterRecord, LoraHook, RoutedAdapter};

/// Why the registry refused a folder, a name or an adapter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The folder run-time loads are confined to cannot be opened.
    #[error("--adapters-dir {dir}: {reason}")]
    AdaptersDir {
        /// The folder as given.
        dir: String,
        /// The OS error.
        reason: String,
    },
    /// Run-time loading was not enabled (no adapters folder).
    #[error("loading adapters at run time is off: start the server with --adapters-dir DIR")]
    RuntimeLoadsOff,
    /// The requested folder does not exist under the adapters folder.
    #[error("adapter folder `{requested}` does not exist under the adapters directory")]
    NoSuchFolder {
        /// The path as requested.
        requested: String,
    },
    /// The requested path leads outside the adapters folder.
    #[error("`{requested}` is outside the adapters directory")]
    OutsideDir {
        /// The path as requested.
        requested: String,
    },
    /// The requested path is not a folder.
    #[error("`{requested}` is not a folder")]
    NotAFolder {
        /// The path as requested.
        requested: String,
    },
    /// The name cannot name an adapter.
    #[error("adapter name `{name}` must be 1-64 characters of letters, digits, `-`, `_`, `.`")]
    BadName {
        /// The name as given.
        name: String,
    },
    /// The adapter does not fit the model (shapes, files, or its base model's sha256).
    #[error("adapter `{name}` refused: {reason}")]
    Refused {
        /// The name it was to be served under.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Computes the base model's sha256 (or `None` when it cannot be read).
pub type BaseSha = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// One loaded adapter version.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// The name requests select it by.
    pub name: String,
    /// The folder it was read from.
    pub path: PathBuf,
    /// The factors, checked against the model.
    pub routed: Arc<RoutedAdapter>,
    /// What `GET /v1/models` shows about it: config, provenance record, load time.
    pub info: Value,
}

/// The adapters of one served model.
pub struct Registry {
    hook: Arc<LoraHook>,
    model_sha: BaseSha,
    dtype: candle_core::DType,
    device: candle_core::Device,
    dir: Option<PathBuf>,
    base_sha: Arc<OnceLock<Option<String>>>,
    map: RwLock<BTreeMap<String, Arc<LoadedAdapter>>>,
}

/// Whether `name` can name an adapter.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Registry {
    /// A registry over the model loaded through `hook`, whose weights' sha256 `model_sha`
    /// computes; `dir` is the only folder run-time loads may read from (none: they are off).
    pub fn new(
        hook: Arc<LoraHook>,
        model_sha: BaseSha,
        device: candle_core::Device,
        dtype: candle_core::DType,
        dir: Option<PathBuf>,
    ) -> Result<Self, RegistryError> {
        let dir = match dir {
            Some(d) => Some(d.canonicalize().map_err(|e| RegistryError::AdaptersDir {
                dir: d.display().to_string(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        // The base model's sha256 (checked against adapters' provenance records) is computed
        // in the background, so the first run-time load does not pay for hashing the model.
        let base_sha = Arc::new(OnceLock::new());
        {
            let (cell, sha) = (base_sha.clone(), model_sha.clone());
            std::thread::spawn(move || {
                cell.get_or_init(|| sha());
            });
        }
        Ok(Self {
            hook,
            model_sha,
            dtype,
            device,
            dir,
            base_sha,
            map: RwLock::new(BTreeMap::new()),
        })
    }

    /// The folder run-time loads are confined to.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The adapter named `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedAdapter>> {
        self.map.read().expect("poisoned").get(name).cloned()
    }

    /// Every loaded adapter, by name.
    pub fn list(&self) -> Vec<Arc<LoadedAdapter>> {
        self.map
            .read()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// The names of the loaded adapters.
    pub fn names(&self) -> Vec<String> {
        self.map.read().expect("poisoned").keys().cloned().collect()
    }

    /// Resolves a run-time load request's path: relative to the adapters folder, and never
    /// outside it (symbolic links and `..` included).
    pub fn confine(&self, requested: &str) -> Result<PathBuf, RegistryError> {
        let Some(dir) = &self.dir else {
            return Err(RegistryError::RuntimeLoadsOff);
        };
        let p = Path::new(requested);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        };
        let requested = requested.to_string();
        let canon = joined
            .canonicalize()
            .map_err(|_| RegistryError::NoSuchFolder {
                requested: requested.clone(),
            })?;
        if !canon.starts_with(dir) {
            return Err(RegistryError::OutsideDir { requested });
        }
        if !canon.is_dir() {
            return Err(RegistryError::NotAFolder { requested });
        }
        Ok(canon)
    }

    fn base_sha(&self) -> Option<&str> {
        self.base_sha.get_or_init(|| (self.model_sha)()).as_deref()
    }

    /// Reads and checks the adapter in `path` (blocking: call off the async threads). The
    /// adapter is refused when its shapes do not fit the model or when its provenance record
    /// names a different base model file (sha256).
    pub fn read(&self, name: &str, path: &Path) -> Result<LoadedAdapter, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName {
                name: name.to_string(),
            });
        }
        let t0 = Instant::now();
        // Clients see where an adapter came from without the server's own folder layout:
        // relative to the adapters folder, or the folder's name; errors say it the same way.
        let shown = self
            .dir
            .as_ref()
            .and_then(|d| path.strip_prefix(d).ok())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let full = path.display().to_string();
        let dir = self.dir.as_ref().map(|d| d.display().to_string());
        let bad = |reason: String| {
            // Whole paths only: the folder itself, or the adapters folder followed by a
            // separator (never `/` alone, nor a sibling such as `<dir>2`).
            let mut reason = if full.len() > 1 {
                reason.replace(&full, &shown)
            } else {
                reason
            };
            if let Some(d) = dir.as_deref().filter(|d| d.len() > 1) {
                let sep = std::path::MAIN_SEPARATOR;
                reason = reason.replace(&format!("{d}{sep}"), &format!("<adapters-dir>{sep}"));
            }
            RegistryError::Refused {
                name: name.to_string(),
                reason,
            }
        };
        let adapter =
            Adapter::load(path, &self.device, self.dtype).map_err(|e| bad(e.to_string()))?;
        let record: Option<AdapterRecord> = std::fs::read_to_string(path.join(RECORD_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(r) = &record {
            if !r.base_model_sha256.is_empty() {
                if let Some(sha) = self.base_sha() {
                    if sha != r.base_model_sha256 {
                        return Err(bad(format!(
                            "it was trained on a different base model (sha256 {}…, this server runs {}…)",
                            r.base_model_sha256.get(..12).unwrap_or(&r.base_model_sha256),
                            sha.get(..12).unwrap_or(sha)
                        )));
                    }
                }
            }
        }
        let routed = self
            .hook
            .prepare(&adapter, self.dtype)
            .map_err(|e| bad(e.to_string()))?;
        let info = json!({
            "path": shown,
            "r": adapter.config.r,
            "lora_alpha": adapter.config.alpha,
            "use_rslora": adapter.config.use_rslora,
            "modules": routed.pairs.len(),
            "parameters": routed.parameters,
            "base_model": adapter.base_model,
            "record": record,
            "load_ms": t0.elapsed().as_secs_f64() * 1e3,
        });
        Ok(LoadedAdapter {
            name: name.to_string(),
            path: path.to_path_buf(),
            routed: Arc::new(routed),
            info,
        })
    }

    /// Makes `adapter` the version served under its name (replacing any previous one; running
    /// requests keep theirs).
    pub fn insert(&self, adapter: LoadedAdapter) -> Arc<LoadedAdapter> {
        let a = Arc::new(adapter);
        self.map
            .write()
            .expect("poisoned")
            .insert(a.name.clone(), a.clone());
        a
    }

    /// Removes the adapter named `name`; running requests that use it finish with it.
    pub fn remove(&self, name: &str) -> Option<Arc<LoadedAdapter>> {
        self.map.write().expect("poisoned").remove(name)
    }
}

//! A model's defaults, read from its manifest as an Ollama Modelfile carries them: the system
//! prompt, sampling and stop strings the CLI and the server use unless a flag or a request
//! field says otherwise.
//!
//! The manifest of weights in `models/<name>/` is `models/<name>.toml` (the file
//! `scripts/fetch-models.sh` reads); only its `[defaults]` table is read here, strictly:
//!
//! ```toml
//! [defaults]
//! system = "You are a helpful assistant."
//! temperature = 0.2
//! top_p = 0.9
//! stop = ["</s>"]
//! ```

use std::path::{Path, PathBuf};

use flywheel_api::{ApiError, SamplingParams};
use serde::Deserialize;

use crate::{Error, Result};

/// The `[defaults]` of a model manifest. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// The system message of a chat that has none.
    pub system: Option<String>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k (0 = off).
    pub top_k: Option<usize>,
    /// Min-p (0 = off).
    pub min_p: Option<f32>,
    /// Repeat penalty (1 = off).
    pub repeat_penalty: Option<f32>,
    /// The most tokens a reply generates.
    pub max_tokens: Option<usize>,
    /// Stop strings used when a request gives none.
    #[serde(default)]
    pub stop: Vec<String>,
    /// The manifest these came from (set when read).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    defaults: Option<ModelDefaults>,
}

impl ModelDefaults {
    /// The manifest next to the weights at `weights` (a GGUF file in `models/<name>/`, or the
    /// folder itself), if there is one: `models/<name>.toml`.
    pub fn manifest_for(weights: &Path) -> Option<PathBuf> {
        let folder = if weights.is_dir() {
            weights
        } else {
            weights.parent()?
        };
        let name = folder.file_name()?.to_str()?;
        let path = folder.with_file_name(format!("{name}.toml"));
        path.is_file().then_some(path)
    }

    /// Reads and checks the `[defaults]` of the manifest at `path` (none: all empty). Errors
    /// name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Manifest {
            file: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut d = m.defaults.unwrap_or_default();
        d.sampling(SamplingParams::default())
            .validate()
            .map_err(|e| match e {
                ApiError::InvalidField { field, reason } => {
                    bad(format!("defaults.{field}: {reason}"))
                }
            })?;
        if d.max_tokens == Some(0) {
            return Err(bad("defaults.max_tokens: must be at least 1".into()));
        }
        d.source = Some(path.to_path_buf());
        Ok(d)
    }

    /// The defaults for the weights at `weights`: its manifest's, or none.
    pub fn for_weights(weights: &Path) -> Result<Self> {
        match Self::manifest_for(weights) {
            Some(p) => Self::read(&p),
            None => Ok(Self::default()),
        }
    }

    /// `base` with the fields these defaults set replaced.
    pub fn sampling(&self, base: SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_found_next_to_the_weights_and_checked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let weights = dir.path().join("tiny");
        std::fs::create_dir(&weights)?;
        std::fs::write(weights.join("m.gguf"), b"")?;
        assert_eq!(
            ModelDefaults::for_weights(&weights.join("m.gguf"))?,
            ModelDefaults::default()
        );
        let manifest = dir.path().join("tiny.toml");
        std::fs::write(
            &manifest,
            "name = \"tiny\"\n[[source]]\nregistry = \"pypi\"\n[defaults]\nsystem = \"Be brief.\"\ntemperature = 0.2\nstop = [\"END\"]\n",
        )?;
        let d = ModelDefaults::for_weights(&weights.join("m.gguf"))?;
        assert_eq!(d.system.as_deref(), Some("Be brief."));
        assert_eq!(d.stop, vec!["END".to_string()]);
        assert_eq!(d.source.as_deref(), Some(manifest.as_path()));
        assert_eq!(
            ModelDefaults::for_weights(&weights)?,
            d,
            "the folder finds it too"
        );
        let s = d.sampling(SamplingParams::greedy());
        assert_eq!((s.temperature, s.top_p), (0.2, 1.0));
        for (body, needle) in [
            ("[defaults]\ntemprature = 0.2\n", "temprature"),
            ("[defaults]\ntop_p = 2.0\n", "defaults.top_p"),
            ("[defaults]\nmax_tokens = 0\n", "defaults.max_tokens"),
            ("[defaults]\nsystem = 3\n", "system"),
        ] {
            std::fs::write(&manifest, body)?;
            let err = ModelDefaults::for_weights(&weights)
                .expect_err(body)
                .to_string();
            assert!(err.contains("tiny.toml") && err.contains(needle), "{err}");
        }
        Ok(())
    }
}

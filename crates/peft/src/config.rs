//! The shape of an adapter: which modules it targets (PEFT's names), its rank and scale.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The projections of a Llama-family block, in PEFT's names.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which modules get an adapter: a list of leaf names, or PEFT's `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Leaf names such as `q_proj`, or the single word `all-linear`.
    Names(Vec<String>),
    /// `"all-linear"` or a single leaf name.
    One(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl TargetModules {
    /// The leaf names this selects.
    pub fn leaves(&self) -> Vec<String> {
        let list: Vec<String> = match self {
            TargetModules::Names(v) => v.clone(),
            TargetModules::One(s) => vec![s.clone()],
        };
        if list.iter().any(|s| s == "all-linear") {
            return ALL_LINEAR.iter().map(|s| s.to_string()).collect();
        }
        list
    }
}

/// The shape of an adapter: which modules, what rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r` of the update `B·A`.
    pub r: usize,
    /// `alpha`; the update is scaled by `alpha / r` (`alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Rank-stabilised scaling `alpha / √r`.
    pub use_rslora: bool,
    /// Modules to adapt: names from `q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj`,
    /// or `"all-linear"`.
    pub target_modules: TargetModules,
    /// Only these layer indices get adapters (all layers when empty).
    pub layers_to_transform: Vec<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::default(),
            layers_to_transform: Vec::new(),
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A·x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks ranges and names; errors name the field (prefixed by `section`).
    pub fn validate(&self, section: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Error::Config {
            field: format!("{section}.{field}"),
            reason,
        };
        if self.r == 0 {
            return Err(bad("r", "must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad("alpha", format!("must be > 0, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        let leaves = self.target_modules.leaves();
        if leaves.is_empty() {
            return Err(bad("target_modules", "names no module".into()));
        }
        for l in &leaves {
            if !ALL_LINEAR.contains(&l.as_str()) {
                return Err(bad(
                    "target_modules",
                    format!(
                        "unknown module `{l}` (expected one of {} or \"all-linear\")",
                        ALL_LINEAR.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the projection `name` (e.g. `model.layers.3.self_attn.q_proj`) gets an adapter.
    pub fn selects(&self, name: &str) -> bool {
        let Some((layer, leaf)) = split_module_name(name) else {
            return false;
        };
        self.target_modules.leaves().iter().any(|l| l == leaf)
            && (self.layers_to_transform.is_empty() || self.layers_to_transform.contains(&layer))
    }
}

/// `model.layers.3.self_attn.q_proj` → `(3, "q_proj")`; `None` for names outside the blocks.
pub fn split_module_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let leaf = tail.rsplit('.').next()?;
    Some((idx.parse().ok()?, leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_selection() {
        assert_eq!(
            split_module_name("model.layers.12.mlp.down_proj"),
            Some((12, "down_proj"))
        );
        assert_eq!(split_module_name("lm_head"), None);
        let cfg = LoraConfig {
            target_modules: TargetModules::One("all-linear".into()),
            layers_to_transform: vec![1],
            ..Default::default()
        };
        assert!(cfg.selects("model.layers.1.mlp.up_proj"));
        assert!(!cfg.selects("model.layers.0.mlp.up_proj"));
        assert!(!cfg.selects("lm_head"));
        let bad = LoraConfig {
            target_modules: TargetModules::Names(vec!["qproj".into()]),
            ..Default::default()
        };
        let e = bad.validate("lora").unwrap_err().to_string();
        assert!(
            e.contains("lora.target_modules") && e.contains("qproj"),
            "{e}"
        );
    }
}

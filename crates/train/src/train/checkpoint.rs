//! Checkpoints of a training run: the adapter, the optimizer moments and the run state, written
//! atomically under `checkpoints/step-NNNNNN/`, and exact resume from the newest one.

use super::*;

/// Saved with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    step: usize,
    total_steps: usize,
    trained_tokens: usize,
    recent_losses: Vec<f64>,
    last_eval: Option<f64>,
    fingerprint: String,
}

impl Trainer {
    /// Removes what a run killed mid-write left: `checkpoints/.step-NNNNNN.tmp` folders and
    /// `.adapter.tmp` (complete checkpoints and adapters are only ever renamed into place).
    pub(super) fn remove_partial_checkpoints(&self) -> Result<()> {
        let dirs = [self.run_dir.join("checkpoints"), self.run_dir.clone()];
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let partial = (name.starts_with(".step-") && name.ends_with(".tmp"))
                    || name == ".adapter.tmp";
                if partial && e.path().is_dir() {
                    std::fs::remove_dir_all(e.path()).map_err(|err| Error::io(&e.path(), err))?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn checkpoints(&self) -> Result<Vec<(usize, PathBuf)>> {
        let dir = self.run_dir.join("checkpoints");
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
                if e.path().join("state.json").is_file() {
                    out.push((n, e.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Names of the AdamW moments in `optimizer.safetensors`, in [`TrainableAdapter::vars`] order.
    pub(super) fn moment_names(&self) -> Vec<String> {
        self.adapter
            .params
            .keys()
            .flat_map(|k| [format!("{k}.A"), format!("{k}.B")])
            .collect()
    }

    pub(super) fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.run_dir.join("checkpoints");
        let final_dir = dir.join(format!("step-{:06}", self.step));
        let tmp = dir.join(format!(".step-{:06}.tmp", self.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.adapter
            .snapshot(&tmp.display().to_string())?
            .save(&tmp, &self.recipe.model.path)?;
        let names = self.moment_names();
        let mut tensors = Vec::new();
        for (name, mo) in names.iter().zip(&self.moments) {
            tensors.push((format!("{name}.m"), mo.m.to_dtype(DType::F32)?));
            tensors.push((format!("{name}.v"), mo.v.to_dtype(DType::F32)?));
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), &tensors)?;
        let state = CheckpointState {
            step: self.step,
            total_steps: self.total_steps,
            trained_tokens: self.trained_tokens,
            recent_losses: self.recent_losses.clone(),
            last_eval: self.last_eval,
            fingerprint: self.fingerprint.clone(),
        };
        write_json_atomic(&tmp.join("state.json"), &state)?;
        replace_dir(&tmp, &final_dir)?;
        let all = self.checkpoints()?;
        let keep = self.recipe.checkpoint.keep;
        if all.len() > keep {
            for (_, p) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(final_dir)
    }

    pub(super) fn resume(&mut self) -> Result<()> {
        let Some((_, dir)) = self.checkpoints()?.pop() else {
            return Err(Error::Checkpoint {
                path: self.run_dir.join("checkpoints").display().to_string(),
                reason: "no checkpoint to resume from".into(),
            });
        };
        let bad = |reason: String| Error::Checkpoint {
            path: dir.display().to_string(),
            reason,
        };
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
        if state.fingerprint != self.fingerprint {
            return Err(bad("the recipe's model, data, lora, optimizer, schedule or batch settings (or the data or model files) changed since this checkpoint; resume needs the same run".into()));
        }
        let saved = flywheel_peft::Adapter::load(&dir, &self.device, DType::F32)?;
        let moments = read_safetensors(&dir.join("optimizer.safetensors"), &self.device)?;
        for (name, (a, b)) in &self.adapter.params {
            let (sa, sb) = saved
                .weights
                .get(name)
                .ok_or_else(|| bad(format!("no factors for `{name}`")))?;
            a.set(&sa.to_dtype(a.dtype())?)?;
            b.set(&sb.to_dtype(b.dtype())?)?;
        }
        let names = self.moment_names();
        for (name, mo) in names.iter().zip(self.moments.iter_mut()) {
            let get = |s: &str| {
                moments
                    .get(&format!("{name}.{s}"))
                    .cloned()
                    .ok_or_else(|| bad(format!("optimizer state lacks `{name}.{s}`")))
            };
            mo.m = get("m")?.to_dtype(mo.m.dtype())?;
            mo.v = get("v")?.to_dtype(mo.v.dtype())?;
        }
        self.step = state.step;
        self.total_steps = state.total_steps;
        self.trained_tokens = state.trained_tokens;
        self.recent_losses = state.recent_losses;
        self.last_eval = state.last_eval;
        // Metrics logged after the checkpoint belong to the lost part of the run.
        let mpath = self.run_dir.join("metrics.jsonl");
        if let Ok(text) = std::fs::read_to_string(&mpath) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= state.step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            atomic_write(&mpath, kept.as_bytes())?;
        }
        Ok(())
    }
}

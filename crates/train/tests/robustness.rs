//! What a careless user or a hostile file does to training: two runs on one folder, a fresh run
//! over a killed one, and seeded mutation fuzzing of the data readers and the recipe parser
//! (errors, never a panic).

use candle_core::quantized::GgmlDType;
use flywheel_models::Architecture;
use flywheel_runtime::testing::{mutations, no_panic, tiny_config, tiny_weights, write_gguf};
use flywheel_runtime::{LoadOptions, TextModel};
use flywheel_train::data::{load_file, DataOptions, Overlong};
use flywheel_train::{Recipe, Trainer};
use std::path::{Path, PathBuf};

fn tiny_gguf(dir: &Path) -> anyhow::Result<PathBuf> {
    let cfg = tiny_config(Architecture::Llama);
    let p = dir.join("tiny.gguf");
    write_gguf(&p, &cfg, &tiny_weights(&cfg, 4)?, GgmlDType::Q8_0)?;
    Ok(p)
}

/// A four-step recipe over a copy task, writing into `dir/run`.
fn recipe_text(dir: &Path, model: &Path) -> anyhow::Result<String> {
    let data = dir.join("train.jsonl");
    let lines: Vec<String> = ["he", "ab", "ba", "hehe"]
        .iter()
        .map(|w| serde_json::json!({"prompt": w, "completion": format!("{w}{w}")}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n"))?;
    Ok(format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalid_split = 0.0\nmax_seq_len = 32\n\
         [lora]\nr = 2\nalpha = 4\ntarget_modules = \"all-linear\"\n[batch]\nsize = 2\n\
         max_steps = 4\n[output]\ndir = \"{}\"\n",
        model.display(),
        data.display(),
        dir.join("run").display()
    ))
}

#[test]
fn one_run_per_folder_and_no_fresh_run_over_a_killed_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_gguf(dir.path())?;
    let recipe = Recipe::parse(&recipe_text(dir.path(), &model)?, "tiny.toml")?;
    let run = dir.path().join("run");
    // Another process (here: a lock this test holds) is writing the folder.
    let held = flywheel_api::lock::FolderLock::folder(&run)?;
    let e = Trainer::new(recipe.clone(), false)?
        .run(&mut |_: &flywheel_train::TrainEvent| {}, None)
        .expect_err("a second run on the folder is refused")
        .to_string();
    assert!(
        e.contains("in use") && e.contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(
        !run.join("metrics.jsonl").exists(),
        "the refused run wrote nothing"
    );
    drop(held);
    // A run killed mid-checkpoint left a partial one: the next run removes it.
    std::fs::create_dir_all(run.join("checkpoints/.step-000010.tmp"))?;
    Trainer::new(recipe.clone(), false)?.run(&mut |_: &flywheel_train::TrainEvent| {}, Some(0))?;
    assert!(!run.join("checkpoints/.step-000010.tmp").exists());
    // It left metrics but no checkpoint: a fresh run is refused (it would append to them).
    std::fs::write(run.join("metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\n")?;
    let e = Trainer::new(recipe, false)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("metrics.jsonl") && e.contains("--resume"), "{e}");
    Ok(())
}

#[test]
fn mutated_data_files_and_recipes_never_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model_path = tiny_gguf(dir.path())?;
    let model = TextModel::load(model_path.to_str().unwrap(), &LoadOptions::default())?;
    let opts = DataOptions {
        chat: true,
        system: None,
        train_on_inputs: false,
        max_seq_len: 32,
        overlong: Overlong::Drop,
    };
    let seeds = [
        "{\"prompt\":\"hi\",\"completion\":\"he\"}\n{\"prompt\":\"ab\",\"completion\":\"ba\"}\n",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"he\"}]}\n",
        "{\"instruction\":\"say\",\"input\":\"\",\"output\":\"he\"}\n",
        "{\"text\":\"hello there\"}\n",
    ];
    // Bytes that are not UTF-8 are named by line and column, like any bad record.
    let bad = dir.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"text\":\"ok\"}\n{\"text\":\"caf\xe9\"}\n")?;
    let e = load_file(&bad, &model, &opts).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:2:", bad.display()))
            && e.contains("not UTF-8")
            && e.contains("column 13"),
        "{e}"
    );
    let case = dir.path().join("case.jsonl");
    for (s, seed) in seeds.iter().enumerate() {
        for (i, m) in mutations(seed.as_bytes(), 150, 0, s as u64)
            .into_iter()
            .enumerate()
        {
            std::fs::write(&case, &m)?;
            if let Err(p) = no_panic(&format!("data {s} case {i}"), || {
                load_file(&case, &model, &opts)
            }) {
                anyhow::bail!("{p}: {:?}", String::from_utf8_lossy(&m));
            }
        }
    }
    let recipe = recipe_text(dir.path(), &model_path)?;
    for (i, m) in mutations(recipe.as_bytes(), 400, 0, 99)
        .into_iter()
        .enumerate()
    {
        let text = String::from_utf8_lossy(&m);
        if let Err(p) = no_panic(&format!("recipe case {i}"), || {
            Recipe::parse(&text, "fuzz.toml")
        }) {
            anyhow::bail!("{p}: {text:?}");
        }
    }
    Ok(())
}

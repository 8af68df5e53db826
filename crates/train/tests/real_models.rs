//! The committed quickstart recipe on the real SmolLM2-135M-Instruct (Q4_1 GGUF, trained in
//! place): 30 examples of a tag format the base model cannot guess. Exact match on the 20
//! held-out examples must rise clearly above the base model's; the adapter must also survive a
//! PEFT save/load and a merge.
//!
//! Fails (not skips) when the model is missing; FLYWHEEL_SKIP_REAL_MODELS=1 skips explicitly.

use flywheel_api::{ChatMessage, GenerateRequest, NullSink, SamplingParams};
use flywheel_peft::{Adapter, LoraHook};
use flywheel_runtime::{DType, Device, LoadOptions, ModelFormat, TextModel};
use flywheel_train::{Recipe, Trainer};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn greedy_exact_match(
    model: &TextModel,
    system: &str,
    rows: &[(String, String)],
) -> anyhow::Result<(usize, Vec<String>)> {
    let mut hits = 0;
    let mut outs = Vec::new();
    for (prompt, want) in rows {
        let text = model.render_chat(&[
            ChatMessage::new("system", system),
            ChatMessage::new("user", prompt.as_str()),
        ])?;
        let req = GenerateRequest {
            prompt: text,
            max_tokens: 40,
            stop: vec![],
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            ignore_eos: false,
            grammar: None,
            logprobs: None,
        };
        let out = model.generate(&req, &mut NullSink)?;
        if out.text.trim() == want.trim() {
            hits += 1;
        }
        outs.push(out.text);
    }
    Ok((hits, outs))
}

#[test]
fn quickstart_lora_teaches_smollm2_a_format() -> anyhow::Result<()> {
    if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        flywheel_runtime::testing::skip(
            "quickstart_lora_teaches_smollm2_a_format",
            "FLYWHEEL_SKIP_REAL_MODELS=1",
        );
        return Ok(());
    }
    let root = root();
    std::env::set_current_dir(&root)?; // the recipe's paths are relative to the repository
    let model_dir = root.join("models/smollm2-135m-instruct");
    assert!(
        model_dir.is_dir(),
        "{} is missing: run scripts/fetch-models.sh first (or set FLYWHEEL_SKIP_REAL_MODELS=1)",
        model_dir.display()
    );
    let mut recipe = Recipe::load(&root.join("recipes/quickstart.toml"))?;
    let run = tempfile::tempdir()?;
    recipe.output.dir = run.path().join("quickstart");
    let system = recipe.data.system.clone().unwrap_or_default();
    let summary =
        Trainer::new(recipe, false)?.run(&mut |_: &flywheel_train::TrainEvent| {}, None)?;
    let adapter_dir = summary
        .adapter_dir
        .clone()
        .expect("finished run writes the adapter");
    eprintln!("{summary:?}");
    assert!(summary.final_eval_loss.unwrap() < 0.2, "{summary:?}");

    let rows: Vec<(String, String)> =
        std::fs::read_to_string(root.join("recipes/data/quickstart/test.jsonl"))?
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["prompt"].as_str().unwrap().to_string(),
                    v["completion"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    assert_eq!(rows.len(), 20);

    // The base model and the same model with the saved (PEFT-format) adapter loaded from disk.
    let spec = model_dir.to_str().unwrap();
    let base = TextModel::load(spec, &LoadOptions::default())?;
    let (base_hits, base_out) = greedy_exact_match(&base, &system, &rows)?;
    let adapter = Adapter::load(&adapter_dir, &Device::Cpu, DType::F32)?;
    let hook = LoraHook::for_config(&adapter.config);
    let tuned =
        TextModel::load_with_hook(&ModelFormat::resolve(spec)?, &LoadOptions::default(), &hook)?;
    hook.install(&adapter)?;
    let (tuned_hits, tuned_out) = greedy_exact_match(&tuned, &system, &rows)?;
    eprintln!("exact match: base {base_hits}/20, LoRA {tuned_hits}/20");
    eprintln!("base: {:?}\nLoRA: {:?}", &base_out[..3], &tuned_out[..3]);
    assert!(
        base_hits <= 2,
        "the base model should not know the format: {base_out:?}"
    );
    assert!(
        tuned_hits >= 16,
        "LoRA exact match {tuned_hits}/20: {tuned_out:?}"
    );
    // Swapping the adapter out at run time restores the base model's behaviour.
    hook.clear();
    let (cleared_hits, cleared_out) = greedy_exact_match(&tuned, &system, &rows[..4])?;
    assert_eq!(cleared_out, base_out[..4].to_vec());
    assert!(cleared_hits <= base_hits);
    Ok(())
}

/// The text-to-SQL data of scripts/prepare-sql-data.sh loads for the recipe's model: every
/// record fits the recipe's sequence length and only SQL tokens carry loss.
#[test]
fn sql_data_loads_for_the_sql_recipe() -> anyhow::Result<()> {
    if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        flywheel_runtime::testing::skip(
            "sql_data_loads_for_the_sql_recipe",
            "FLYWHEEL_SKIP_REAL_MODELS=1",
        );
        return Ok(());
    }
    let root = root();
    let recipe = Recipe::load(&root.join("recipes/sql.toml"))?;
    let model_path = root.join(&recipe.model.path);
    let valid = root.join("data/sql/valid.jsonl");
    assert!(
        model_path.exists() && valid.is_file(),
        "run scripts/fetch-models.sh and scripts/prepare-sql-data.sh first (or set FLYWHEEL_SKIP_REAL_MODELS=1)"
    );
    let model = TextModel::load(model_path.to_str().unwrap(), &LoadOptions::default())?;
    let opts = flywheel_train::data::DataOptions {
        chat: recipe.data.chat,
        system: recipe.data.system.clone(),
        train_on_inputs: false,
        max_seq_len: recipe.data.max_seq_len,
        overlong: recipe.data.overlong,
    };
    let (examples, stats, format) = flywheel_train::data::load_file(&valid, &model, &opts)?;
    assert_eq!(format, flywheel_train::data::Format::PromptCompletion);
    assert_eq!(stats.records, 96);
    assert_eq!(stats.dropped_overlong, 0, "{stats:?}");
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&valid)?.lines().next().unwrap())?;
    let answer: Vec<u32> = examples[0]
        .ids
        .iter()
        .zip(&examples[0].loss)
        .filter(|(_, &l)| l)
        .map(|(&t, _)| t)
        .collect();
    let text = model.tokenizer().decode(&answer, true)?;
    assert_eq!(text.trim(), first["completion"].as_str().unwrap());
    Ok(())
}

/// An adapter made by Hugging Face PEFT (scripts/fixtures/make_peft_adapter_fixture.py) loads
/// into flywheel and reproduces the logits transformers computed with it.
#[test]
fn peft_made_adapter_reproduces_transformers_logits() -> anyhow::Result<()> {
    if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        flywheel_runtime::testing::skip(
            "peft_made_adapter_reproduces_transformers_logits",
            "FLYWHEEL_SKIP_REAL_MODELS=1",
        );
        return Ok(());
    }
    let root = root();
    let fixture = root.join("tests/fixtures/peft-adapter-smollm2");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json"))?)?;
    let gguf = root.join("models/smollm2-135m-instruct");
    assert!(
        gguf.is_dir(),
        "run scripts/fetch-models.sh first (or set FLYWHEEL_SKIP_REAL_MODELS=1)"
    );
    // The fixture's base: the GGUF dequantized to a dense f32 folder (merge of an all-zero adapter).
    let tmp = tempfile::tempdir()?;
    let peft = Adapter::load(&fixture, &Device::Cpu, DType::F32)?;
    let mut zero = peft.clone();
    for (_, b) in zero.weights.values_mut() {
        *b = b.zeros_like()?;
    }
    let zero_dir = tmp.path().join("zero");
    zero.save(&zero_dir, "smollm2")?;
    let dense = tmp.path().join("dense");
    flywheel_train::merge::merge(gguf.to_str().unwrap(), &zero_dir, &dense, DType::F32)?;

    let hook = LoraHook::for_config(&peft.config);
    let model = TextModel::load_with_hook(
        &ModelFormat::resolve(dense.to_str().unwrap())?,
        &LoadOptions::default(),
        &hook,
    )?;
    let ids: Vec<u32> = expected["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        model.encode_prompt(expected["prompt"].as_str().unwrap())?,
        ids
    );
    let logits_at = |model: &TextModel| -> anyhow::Result<Vec<Vec<f32>>> {
        let t = candle_core::Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
        let mut cache = model.model().new_cache(vec![0]);
        let all = model
            .model()
            .forward(&t, &mut cache, flywheel_models::Logits::All)?
            .squeeze(0)?;
        let mut out = Vec::new();
        for p in expected["positions"].as_array().unwrap() {
            let row = all.get(p.as_u64().unwrap() as usize)?.to_vec1::<f32>()?;
            out.push(
                expected["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| row[t.as_u64().unwrap() as usize])
                    .collect(),
            );
        }
        Ok(out)
    };
    let want = |key: &str| -> Vec<Vec<f32>> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let base = logits_at(&model)?;
    assert!(
        max_diff(&base, &want("base")) < 5e-4,
        "base logits differ from transformers"
    );
    hook.install(&peft)?;
    let tuned = logits_at(&model)?;
    let d = max_diff(&tuned, &want("tuned"));
    let effect = max_diff(&want("tuned"), &want("base"));
    eprintln!(
        "flywheel vs transformers with the PEFT adapter: max |diff| {d}; adapter effect {effect}"
    );
    assert!(effect > 0.1, "the fixture adapter must matter");
    assert!(d < 5e-4, "logits with the PEFT adapter differ by {d}");
    Ok(())
}

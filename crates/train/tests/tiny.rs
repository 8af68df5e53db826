//! LoRA on tiny random models (seconds): gradients against finite differences, zero-B identity,
//! merge equivalence, PEFT save/load, data masks and errors, one step lowering the loss, and exact
//! resume.

use candle_core::{DType, Device, Tensor};
use flywheel_models::{Architecture, GgmlDType, Logits};
use flywheel_peft::lora::{LoraConfig, LoraHook, TargetModules};
use flywheel_peft::Adapter;
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_hf_folder};
use flywheel_runtime::{LoadOptions, ModelFormat, TextModel};
use flywheel_train::data::{load_file, DataOptions, Example, Overlong};
use flywheel_train::train::batch_nll;
use flywheel_train::{Recipe, Trainer};
use std::path::{Path, PathBuf};

/// The device of the tests that also run on a GPU (`FLYWHEEL_TEST_DEVICE`, CPU by default).
fn dev() -> Device {
    flywheel_models::test_device()
}

fn lora_cfg(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        target_modules: TargetModules::One("all-linear".into()),
        ..Default::default()
    }
}

/// A tiny model on disk: an f32 Hugging Face folder, or a quantized GGUF file.
fn tiny_model(dir: &Path, quant: Option<GgmlDType>) -> anyhow::Result<PathBuf> {
    let cfg = tiny_config(Architecture::Llama);
    let w = tiny_weights(&cfg, 11)?;
    Ok(match quant {
        None => {
            let p = dir.join("hf");
            write_hf_folder(&p, &cfg, &w, 1)?;
            p
        }
        Some(q) => {
            let p = dir.join("tiny.gguf");
            write_gguf(&p, &cfg, &w, q)?;
            p
        }
    })
}

fn load(path: &Path, hook: &LoraHook) -> anyhow::Result<TextModel> {
    Ok(TextModel::load_with_hook(
        &ModelFormat::resolve(path.to_str().unwrap())?,
        &LoadOptions {
            device: dev(),
            dtype: Some(DType::F32),
        },
        hook,
    )?)
}

fn example(model: &TextModel, prompt: &str, answer: &str) -> anyhow::Result<Example> {
    let mut ids = model.encode_prompt(&format!(
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ))?;
    let n = ids.len();
    ids.extend(
        model
            .tokenizer()
            .encode(&format!("{answer}<|im_end|>\n"), false)?,
    );
    let loss = (0..ids.len()).map(|i| i >= n).collect();
    Ok(Example { ids, loss })
}

/// Fills every B with small random values so gradients reach A too.
fn randomise_b(adapter: &flywheel_peft::TrainableAdapter, seed: u64) -> anyhow::Result<()> {
    for (i, (_, (_, b))) in adapter.params.iter().enumerate() {
        let t = Tensor::randn(0f32, 0.05, b.dims(), &dev())?;
        let _ = seed + i as u64;
        b.set(&t)?;
    }
    Ok(())
}

fn scalar(t: &Tensor) -> anyhow::Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

fn gradient_check(quant: Option<GgmlDType>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), quant)?;
    let hook = LoraHook::for_config(&lora_cfg(2));
    let model = load(&path, &hook)?;
    let adapter = hook.init_trainable(&lora_cfg(2), 1, DType::F32, &dev())?;
    randomise_b(&adapter, 3)?;
    let ex = [
        example(&model, "hello", "he he")?,
        example(&model, "abc", "cab")?,
    ];
    let refs: Vec<&Example> = ex.iter().collect();
    let loss = batch_nll(&model, &refs, &dev())?;
    let grads = loss.backward()?;
    let mut checked = 0;
    for (name, (a, b)) in &adapter.params {
        for (which, v) in [("A", a), ("B", b)] {
            let g = grads
                .get(v.as_tensor())
                .expect("every factor gets a gradient");
            let flat = g.flatten_all()?.to_vec1::<f32>()?;
            // The coordinate with the largest gradient of this factor.
            let (idx, &gmax) = flat
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                .unwrap();
            let orig = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let eps = 2e-3f32;
            let at = |delta: f32| -> anyhow::Result<f64> {
                let mut p = orig.clone();
                p[idx] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &dev())?)?;
                scalar(&batch_nll(&model, &refs, &dev())?)
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps as f64);
            v.set(&Tensor::from_vec(orig, v.dims(), &dev())?)?;
            let g = gmax as f64;
            assert!(
                (fd - g).abs() <= 0.03 * g.abs() + 2e-3,
                "{name}.{which}[{idx}]: analytic {g} vs finite difference {fd} (quant {quant:?})"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 7 * 2, "2 layers x 7 projections x (A, B)");
    Ok(())
}

#[test]
fn lora_gradients_match_finite_differences_dense_base() -> anyhow::Result<()> {
    gradient_check(None)
}

#[test]
fn lora_gradients_match_finite_differences_quantized_base() -> anyhow::Result<()> {
    gradient_check(Some(GgmlDType::Q8_0))?;
    gradient_check(Some(GgmlDType::Q4_1))
}

fn all_logits(model: &TextModel, ids: &[u32]) -> anyhow::Result<Tensor> {
    let t = Tensor::from_slice(ids, (1, ids.len()), &dev())?;
    let mut cache = model.model().new_cache(vec![0]);
    Ok(model.model().forward(&t, &mut cache, Logits::All)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn zero_b_leaves_logits_unchanged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for quant in [None, Some(GgmlDType::Q4_1)] {
        let path = tiny_model(dir.path(), quant)?;
        let plain = TextModel::load(
            path.to_str().unwrap(),
            &LoadOptions {
                device: dev(),
                dtype: Some(DType::F32),
            },
        )?;
        let hook = LoraHook::for_config(&lora_cfg(4));
        let model = load(&path, &hook)?;
        let ids = model.encode_prompt("hello there")?;
        let base = all_logits(&plain, &ids)?;
        // Installed (inference) adapter with B = 0: bit-identical.
        let adapter = hook.init_trainable(&lora_cfg(4), 5, DType::F32, &dev())?;
        let frozen = adapter.snapshot("test")?;
        hook.install(&frozen)?;
        assert_eq!(max_abs_diff(&base, &all_logits(&model, &ids)?)?, 0.0);
        // The wrappers are really there: a non-zero B changes the logits.
        let mut moved = frozen.clone();
        for (_, b) in moved.weights.values_mut() {
            *b = (b.ones_like()? * 0.1)?;
        }
        hook.install(&moved)?;
        assert!(max_abs_diff(&base, &all_logits(&model, &ids)?)? > 1e-3);
        hook.clear();
        assert_eq!(max_abs_diff(&base, &all_logits(&model, &ids)?)?, 0.0);
    }
    Ok(())
}

/// A batch whose rows use different adapters (ranks 4 and 2, and none), computed by the fused
/// mixed-adapter op, equals each row run alone with its adapter installed.
#[test]
fn fused_mixed_adapter_batch_equals_each_row_alone() -> anyhow::Result<()> {
    use flywheel_peft::lora::{with_fused_routing, with_routing, Routing};
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), None)?;
    let hook = LoraHook::for_config(&lora_cfg(4));
    let model = load(&path, &hook)?;
    let mut adapters = vec![];
    for (r, seed) in [(4, 5), (2, 6)] {
        let a = hook.init_trainable(&lora_cfg(r), seed, DType::F32, &dev())?;
        randomise_b(&a, seed)?;
        adapters.push(a.snapshot("test")?);
    }
    hook.clear();
    let prompts = ["hello there", "abc abc", "the cab"];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.encode_prompt(p))
        .collect::<Result<_, _>>()?;
    let n = ids.iter().map(Vec::len).min().unwrap();
    let flat: Vec<u32> = ids.iter().flat_map(|v| v[..n].to_vec()).collect();
    let routed: Vec<_> = adapters
        .iter()
        .map(|a| hook.prepare(a, DType::F32).map(std::sync::Arc::new))
        .collect::<Result<_, _>>()?;
    let routing = Routing {
        groups: vec![(routed[0].clone(), vec![0]), (routed[1].clone(), vec![2])],
    };
    let batch = with_routing(routing, || {
        with_fused_routing(|| -> anyhow::Result<Tensor> {
            let t = Tensor::from_vec(flat.clone(), (3, n), &dev())?;
            let mut cache = model.model().new_cache(vec![0, 0, 0]);
            Ok(model.model().forward(&t, &mut cache, Logits::All)?)
        })
    })?;
    for (row, adapter) in [(0, Some(&adapters[0])), (1, None), (2, Some(&adapters[1]))] {
        hook.clear();
        let base = all_logits(&model, &ids[row][..n])?.squeeze(0)?;
        if let Some(a) = adapter {
            hook.install(a)?;
        }
        let alone = all_logits(&model, &ids[row][..n])?.squeeze(0)?;
        let got = batch.get(row)?;
        let d = max_abs_diff(&got, &alone)?;
        assert!(d < 1e-4, "row {row}: max diff {d}");
        // The adapted rows really differ from the base model.
        assert_eq!(
            max_abs_diff(&base, &alone)? > 1e-3,
            adapter.is_some(),
            "row {row}"
        );
    }
    hook.clear();
    Ok(())
}

/// The host decode step's logits after a short prompt, or `None` when the model declines it.
fn host_step(m: &TextModel, ids: &[u32]) -> anyhow::Result<Option<Vec<f32>>> {
    let mut cache = m.model().new_cache(vec![0]);
    let t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    m.model().forward(&t, &mut cache, Logits::Last)?;
    let mut s = flywheel_models::DecodeScratch::default();
    let ran = m.model().decode_into(&[5], &mut [&mut cache], &mut s)?;
    Ok(ran.then(|| s.logits().to_vec()))
}

/// The tensor path's logits for the same step as [`host_step`] (the token after the prompt).
fn tensor_step(m: &TextModel, ids: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut cache = m.model().new_cache(vec![0]);
    let t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    m.model().forward(&t, &mut cache, Logits::Last)?;
    let next = Tensor::new(&[5u32], &Device::Cpu)?.unsqueeze(0)?;
    let l = m.model().forward(&next, &mut cache, Logits::Last)?;
    Ok(l.flatten_all()?.to_vec1::<f32>()?)
}

/// The host decode step adds fixed LoRA updates (installed or routed per row) with the tensor
/// path's arithmetic, bit for bit, and declines trainable ones.
#[test]
fn the_host_decode_step_adds_fixed_adapters_bit_for_bit() -> anyhow::Result<()> {
    use flywheel_peft::lora::{with_routing, Routing};
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), Some(GgmlDType::Q4_0))?;
    let plain = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    let hook = LoraHook::for_config(&lora_cfg(4));
    let model = load(&path, &hook)?;
    let ids = model.encode_prompt("hello there")?;
    let base = host_step(&plain, &ids)?.expect("a plain GGUF model takes the host step");
    // Wrapped, nothing installed: the step runs and computes the base model.
    assert_eq!(host_step(&model, &ids)?.as_deref(), Some(&base[..]));
    // Trainable factors (a run in progress): the step declines. (The unit test
    // `fixed_factors_forward_with_the_host_arithmetic` checks the arithmetic to the last bit;
    // here the Q8_0 quantization of each quantized layer's input would hide a last-bit change.)
    let cfg = LoraConfig {
        alpha: 7.0,
        ..lora_cfg(5)
    };
    let adapter = hook.init_trainable(&cfg, 5, DType::F32, &Device::Cpu)?;
    randomise_b(&adapter, 9)?;
    assert_eq!(host_step(&model, &ids)?, None);
    // Installed fixed factors: the step runs, equals the tensor path, and differs from the base.
    let frozen = adapter.snapshot("test")?;
    hook.install(&frozen)?;
    let adapted = tensor_step(&model, &ids)?;
    assert_eq!(host_step(&model, &ids)?.as_deref(), Some(&adapted[..]));
    let moved = adapted
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the adapter changes the logits ({moved})");
    hook.clear();
    assert_eq!(host_step(&model, &ids)?.as_deref(), Some(&base[..]));
    // Routed per row: the same bits as the routed tensor path; an empty routing is the base.
    let routed = std::sync::Arc::new(hook.prepare(&frozen, DType::F32)?);
    let one = || Routing {
        groups: vec![(routed.clone(), vec![0])],
    };
    let via_tensors = with_routing(one(), || tensor_step(&model, &ids))?;
    let via_host = with_routing(one(), || host_step(&model, &ids))?;
    assert_eq!(via_host.as_deref(), Some(&via_tensors[..]));
    // Installed and routed use one arithmetic below 16 positions (this prompt is shorter).
    assert_eq!(via_tensors, adapted);
    let none = with_routing(Routing::default(), || host_step(&model, &ids))?;
    assert_eq!(none.as_deref(), Some(&base[..]));
    Ok(())
}

#[test]
fn adapters_save_in_peft_layout_and_round_trip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), None)?;
    let mut cfg = lora_cfg(3);
    cfg.use_rslora = true;
    cfg.layers_to_transform = vec![1];
    let hook = LoraHook::for_config(&cfg);
    let _model = load(&path, &hook)?;
    let adapter = hook.init_trainable(&cfg, 9, DType::F32, &Device::Cpu)?;
    randomise_b(&adapter, 1)?;
    let saved = adapter.snapshot("test")?;
    let out = dir.path().join("adapter");
    saved.save(&out, "tiny")?;
    let st = flywheel_peft::adapter::read_safetensors(
        &out.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    assert!(st.contains_key("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert!(
        !st.keys().any(|k| k.contains("layers.0.")),
        "layers_to_transform = [1]"
    );
    assert_eq!(st.len(), 14);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 3);
    assert_eq!(cfg_json["use_rslora"], true);
    let back = Adapter::load(&out, &Device::Cpu, DType::F32)?;
    assert_eq!(
        back.config.target_modules.leaves(),
        saved.config.target_modules.leaves()
    );
    assert_eq!(
        (back.config.r, back.config.alpha, back.config.use_rslora),
        (3, 6.0, true)
    );
    assert_eq!(back.config.layers_to_transform, vec![1]);
    assert_eq!(back.weights.len(), saved.weights.len());
    for (k, (a, b)) in &saved.weights {
        let (a2, b2) = &back.weights[k];
        assert_eq!(max_abs_diff(a, a2)?, 0.0);
        assert_eq!(max_abs_diff(b, b2)?, 0.0);
    }
    assert!((back.scale_for(3) - 6.0 / 3f64.sqrt()).abs() < 1e-12);
    // An adapter for modules the model lacks is refused by name.
    let mut wrong = back.clone();
    let (a, b) = wrong.weights.values().next().unwrap().clone();
    wrong
        .weights
        .insert("model.layers.7.self_attn.q_proj".into(), (a, b));
    let e = hook.install(&wrong).unwrap_err().to_string();
    assert!(e.contains("model.layers.7.self_attn.q_proj"), "{e}");
    // A config whose `r` differs from the tensors' rank is refused, naming both.
    let mut cfg_json = cfg_json;
    cfg_json["r"] = serde_json::json!(8);
    std::fs::write(out.join("adapter_config.json"), cfg_json.to_string())?;
    let e = Adapter::load(&out, &Device::Cpu, DType::F32)
        .expect_err("r 8 over rank-3 tensors is refused")
        .to_string();
    assert!(e.contains("`r` is 8") && e.contains("rank 3"), "{e}");
    Ok(())
}

#[test]
fn merged_folder_equals_base_plus_adapter() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for quant in [None, Some(GgmlDType::Q8_0)] {
        let sub = dir.path().join(format!("{quant:?}"));
        std::fs::create_dir_all(&sub)?;
        let path = tiny_model(&sub, quant)?;
        let cfg = lora_cfg(4);
        let hook = LoraHook::for_config(&cfg);
        let model = load(&path, &hook)?;
        let adapter = hook.init_trainable(&cfg, 2, DType::F32, &Device::Cpu)?;
        randomise_b(&adapter, 2)?;
        let frozen = adapter.snapshot("test")?;
        hook.install(&frozen)?;
        let adir = sub.join("adapter");
        frozen.save(&adir, "tiny")?;
        let ids = model.encode_prompt("hello abc")?;
        let unmerged = all_logits(&model, &ids)?;
        let out = sub.join("merged");
        let s = flywheel_train::merge::merge(path.to_str().unwrap(), &adir, &out, DType::F32)?;
        assert_eq!(s.merged_modules, 14);
        let merged = TextModel::load(out.to_str().unwrap(), &LoadOptions::default())?;
        assert_eq!(
            merged.encode_prompt("hello abc")?,
            ids,
            "tokenizer survives the merge"
        );
        assert!(merged.chat_template().is_some());
        let m = all_logits(&merged, &ids)?;
        let rms = |t: &Tensor| -> anyhow::Result<f32> {
            Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
        };
        let reference = if quant.is_none() {
            unmerged.clone()
        } else {
            // A quantized base runs llama.cpp's 8-bit activation arithmetic; the merged folder is
            // plain f32. Compare against the dequantized base (a merge of an all-zero adapter)
            // with the adapter applied at run time.
            let zero_dir = sub.join("zero-adapter");
            let mut zero = frozen.clone();
            for (_, b) in zero.weights.values_mut() {
                *b = b.zeros_like()?;
            }
            zero.save(&zero_dir, "tiny")?;
            let deq = sub.join("dequantized");
            flywheel_train::merge::merge(path.to_str().unwrap(), &zero_dir, &deq, DType::F32)?;
            let hook2 = LoraHook::for_config(&cfg);
            let deq_model = load(&deq, &hook2)?;
            hook2.install(&frozen)?;
            all_logits(&deq_model, &ids)?
        };
        let rel = rms(&(&reference - &m)?)? / rms(&reference)?;
        let tol = 1e-5;
        assert!(
            rel <= tol,
            "{quant:?}: merged vs unmerged relative RMS {rel}"
        );
        // ... while the adapter's own effect is far larger than that tolerance.
        hook.clear();
        let base = all_logits(&model, &ids)?;
        let effect = rms(&(&unmerged - &base)?)? / rms(&unmerged)?;
        assert!(effect > 1e-2, "{quant:?}: adapter effect {effect}");
        // Merging into an existing folder is refused.
        assert!(
            flywheel_train::merge::merge(path.to_str().unwrap(), &adir, &out, DType::F32).is_err()
        );
    }
    Ok(())
}

fn data_opts(train_on_inputs: bool) -> DataOptions {
    DataOptions {
        chat: true,
        system: None,
        train_on_inputs,
        max_seq_len: 64,
        overlong: Overlong::Drop,
    }
}

#[test]
fn prompt_tokens_carry_no_loss_and_formats_are_detected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), None)?;
    let model = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    let files = [
        ("pc.jsonl", r#"{"prompt":"hi","completion":"he"}"#),
        (
            "chat.jsonl",
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"he"}]}"#,
        ),
        (
            "alpaca.jsonl",
            r#"{"instruction":"hi","input":"","output":"he"}"#,
        ),
    ];
    let mut seen = Vec::new();
    for (name, line) in files {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{line}\n\n"))?;
        let (ex, stats, _) = load_file(&p, &model, &data_opts(false))?;
        assert_eq!(stats.records, 1);
        let e = &ex[0];
        // The answer "he" + "<|im_end|>" + "\n": 1 merged token + 1 special + 1 newline.
        let answer: Vec<u32> = model.tokenizer().encode("he<|im_end|>\n", false)?;
        let n = e.ids.len();
        assert_eq!(&e.ids[n - answer.len()..], &answer[..]);
        assert!(e.loss[n - answer.len()..].iter().all(|&b| b));
        assert!(
            e.loss[..n - answer.len()].iter().all(|&b| !b),
            "prompt tokens carry no loss"
        );
        seen.push(e.clone());
        let (all, _, _) = load_file(&p, &model, &data_opts(true))?;
        assert!(all[0].loss.iter().all(|&b| b));
    }
    assert_eq!(
        seen[0], seen[1],
        "prompt/completion renders as the equivalent chat"
    );
    assert_eq!(seen[0], seen[2], "alpaca renders as the equivalent chat");
    // The loss counts the answer tokens only: compare with a hand computation on all logits.
    let e = &seen[0];
    let nll = batch_nll(&model, &[e], &Device::Cpu)?.to_scalar::<f32>()? as f64;
    let logits = all_logits(&model, &e.ids)?.squeeze(0)?;
    let lsm = candle_nn_free_log_softmax(&logits)?;
    let mut want = 0f64;
    for p in 0..e.ids.len() - 1 {
        if e.loss[p + 1] {
            want -= lsm[p][e.ids[p + 1] as usize] as f64;
        }
    }
    assert!((nll - want).abs() < 1e-3 * want.abs(), "{nll} vs {want}");
    Ok(())
}

fn candle_nn_free_log_softmax(logits: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            r.iter().map(|x| x - lse).collect()
        })
        .collect())
}

#[test]
fn malformed_data_lines_are_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_model(dir.path(), None)?;
    let model = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    let cases = [
        (
            "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\": \"a\", \n",
            2,
            "invalid JSON",
        ),
        (
            "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"text\":\"x\"}\n",
            2,
            "line 1",
        ),
        ("{\"foo\":1}\n", 1, "unrecognised"),
        (
            "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]}\n",
            1,
            "no assistant",
        ),
        (
            "{\"messages\":[{\"role\":\"bot\",\"content\":\"a\"}]}\n",
            1,
            "unknown role",
        ),
        ("{\"prompt\":\"a\",\"completion\":3}\n", 1, "completion"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&p, text)?;
        let e = load_file(&p, &model, &data_opts(false))
            .unwrap_err()
            .to_string();
        let want = format!("{}:{line}:", p.display());
        assert!(e.starts_with(&want) && e.contains(what), "case {i}: {e}");
    }
    Ok(())
}

/// A recipe for the tiny model training on a tiny copy task.
fn tiny_recipe(dir: &Path, model: &Path, run: &str, steps: usize) -> anyhow::Result<Recipe> {
    let data = dir.join("train.jsonl");
    if !data.exists() {
        let words = ["he", "ab", "ba", "hehe", "ah", "eh", "bab", "aha"];
        let lines: Vec<String> = words
            .iter()
            .map(|w| serde_json::json!({"prompt": w, "completion": format!("{w}{w}")}).to_string())
            .collect();
        std::fs::write(&data, lines.join("\n"))?;
    }
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
train = "{data}"
valid_split = 0.25
max_seq_len = 64
[lora]
r = 4
alpha = 8
dropout = 0.1
target_modules = "all-linear"
[optimizer]
lr = 0.01
[schedule]
warmup_steps = 2
[batch]
size = 2
grad_accum = 2
max_steps = {steps}
seed = 7
[eval]
every = 2
[checkpoint]
every = 2
keep = 2
[output]
dir = "{run}"
"#,
        model = model.display(),
        data = data.display(),
        run = dir.join(run).display(),
    );
    Ok(Recipe::parse(&text, "tiny.toml")?)
}

#[test]
fn one_step_lowers_the_loss_on_a_fixed_batch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for quant in [None, Some(GgmlDType::Q4_0)] {
        let sub = dir.path().join(format!("{quant:?}"));
        std::fs::create_dir_all(&sub)?;
        let model = tiny_model(&sub, quant)?;
        // Two examples and a batch of two: the first step sees exactly this batch.
        std::fs::write(
            sub.join("train.jsonl"),
            "{\"prompt\":\"he\",\"completion\":\"hehe\"}\n{\"prompt\":\"ab\",\"completion\":\"abab\"}\n",
        )?;
        let mut recipe = tiny_recipe(&sub, &model, "run", 1)?;
        recipe.data.valid_split = 0.0;
        recipe.lora.dropout = 0.0;
        recipe.schedule.warmup_steps = 0;
        recipe.batch.grad_accum = 1;
        recipe.optimizer.lr = 1e-3;
        let mut t = Trainer::new(recipe, false)?;
        assert_eq!(t.train_examples().len(), 2);
        let loss_now = |t: &Trainer| -> anyhow::Result<f64> {
            let refs: Vec<&Example> = t.train_examples().iter().collect();
            let n: usize = refs.iter().map(|e| e.target_count()).sum();
            Ok(scalar(&batch_nll(t.model(), &refs, &Device::Cpu)?)? / n as f64)
        };
        let before = loss_now(&t)?;
        let mut logged = Vec::new();
        let summary = t.run(
            &mut |e: &flywheel_train::TrainEvent| {
                if let flywheel_train::TrainEvent::Step(m) = e {
                    logged.push(m.loss);
                }
            },
            None,
        )?;
        let after = loss_now(&t)?;
        assert_eq!(summary.steps, 1);
        assert!(
            (logged[0] - before).abs() < 1e-4 * before,
            "the step's loss is the batch loss"
        );
        assert!(after < before - 1e-3, "{quant:?}: loss {before} -> {after}");
        // The run folder has what a user expects.
        let run = sub.join("run");
        for f in [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/flywheel_adapter.json",
            "metrics.jsonl",
            "loss.svg",
            "recipe.toml",
            "summary.json",
        ] {
            assert!(run.join(f).is_file(), "missing {f}");
        }
    }
    Ok(())
}

#[test]
fn resume_gives_the_same_adapter_as_an_uninterrupted_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_model(dir.path(), Some(GgmlDType::Q8_0))?;
    let full = tiny_recipe(dir.path(), &model, "full", 6)?;
    Trainer::new(full, false)?.run(&mut |_: &flywheel_train::TrainEvent| {}, None)?;
    let part = tiny_recipe(dir.path(), &model, "part", 6)?;
    let s = Trainer::new(part.clone(), false)?
        .run(&mut |_: &flywheel_train::TrainEvent| {}, Some(3))?;
    assert_eq!(s.steps, 3);
    assert!(
        s.adapter_dir.is_none(),
        "an unfinished run writes no final adapter"
    );
    // Starting again without --resume would overwrite the run: refused.
    let e = Trainer::new(part.clone(), false)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let mut resumed = Trainer::new(part, true)?;
    assert_eq!(resumed.step(), 3);
    let s = resumed.run(&mut |_: &flywheel_train::TrainEvent| {}, None)?;
    assert_eq!(s.steps, 6);
    let a = Adapter::load(&dir.path().join("full/adapter"), &Device::Cpu, DType::F32)?;
    let b = Adapter::load(&dir.path().join("part/adapter"), &Device::Cpu, DType::F32)?;
    let mut moved = 0f32;
    for (k, (a1, b1)) in &a.weights {
        let (a2, b2) = &b.weights[k];
        assert!(max_abs_diff(a1, a2)? <= 1e-6, "{k}.A differs after resume");
        assert!(max_abs_diff(b1, b2)? <= 1e-6, "{k}.B differs after resume");
        moved = moved.max(b1.abs()?.max_all()?.to_scalar::<f32>()?);
    }
    assert!(moved > 0.0, "training moved B away from zero");
    // Metrics of both runs agree step by step.
    let steps = |run: &str| -> anyhow::Result<Vec<String>> {
        Ok(
            std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl"))?
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!(
                        "{} {:.6} {:.6}",
                        v["step"],
                        v["loss"].as_f64().unwrap_or(-1.0),
                        v["eval_loss"].as_f64().unwrap_or(-1.0)
                    )
                })
                .collect(),
        )
    };
    assert_eq!(steps("full")?, steps("part")?);
    // Only the newest `keep = 2` checkpoints remain.
    let ck: Vec<_> = std::fs::read_dir(dir.path().join("part/checkpoints"))?.collect();
    assert_eq!(ck.len(), 2);
    Ok(())
}

#[test]
fn committed_recipes_parse_and_validate() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            Recipe::load(&p).map_err(|e| anyhow::anyhow!("{e}"))?;
            n += 1;
        }
    }
    assert!(
        n >= 2,
        "recipes/sql.toml and recipes/quickstart.toml at least"
    );
    Ok(())
}

#[test]
fn a_diverging_run_stops_with_a_clear_message_and_keeps_its_checkpoint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_model(dir.path(), None)?;
    let mut recipe = tiny_recipe(dir.path(), &model, "run", 6)?;
    recipe.optimizer.lr = 1e30;
    recipe.optimizer.max_grad_norm = 0.0;
    recipe.schedule.warmup_steps = 0;
    recipe.checkpoint.every = 1;
    let e = Trainer::new(recipe, false)?
        .run(&mut |_: &flywheel_train::TrainEvent| {}, None)
        .expect_err("an lr of 1e30 must diverge")
        .to_string();
    assert!(e.contains("became") && e.contains("at step"), "{e}");
    assert!(dir.path().join("run/checkpoints/step-000001").is_dir());
    Ok(())
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for quant in [None, Some(GgmlDType::Q4_1)] {
        let sub = dir.path().join(format!("{quant:?}"));
        std::fs::create_dir_all(&sub)?;
        let model = tiny_model(&sub, quant)?;
        let mut adapters = Vec::new();
        for (i, ckpt) in [false, true].into_iter().enumerate() {
            let mut r = tiny_recipe(&sub, &model, &format!("run{i}"), 3)?;
            r.batch.gradient_checkpointing = ckpt;
            let s = Trainer::new(r, false)?.run(&mut |_: &flywheel_train::TrainEvent| {}, None)?;
            adapters.push(Adapter::load(
                &s.adapter_dir.unwrap(),
                &Device::Cpu,
                DType::F32,
            )?);
        }
        for (k, (a1, b1)) in &adapters[0].weights {
            let (a2, b2) = &adapters[1].weights[k];
            assert!(max_abs_diff(a1, a2)? < 1e-5, "{quant:?} {k}.A");
            assert!(max_abs_diff(b1, b2)? < 1e-5, "{quant:?} {k}.B");
            assert!(b1.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        }
    }
    Ok(())
}

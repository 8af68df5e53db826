//! Loading round trips on tiny random models: GGUF (Q8_0 / Q4_0, with llama.cpp's Q/K permutation)
//! and sharded Hugging Face folders give the logits of the in-memory dense model; the GGUF
//! tokenizer and chat template work; bad files give errors that name the file.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use flywheel_api::{GenerateRequest, SamplingParams};
use flywheel_models::{Architecture, DecoderModel, Logits, NoHook};
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_hf_folder};
use flywheel_runtime::{LoadOptions, TextModel};

fn logits(m: &DecoderModel, seq: &[u32]) -> anyhow::Result<Tensor> {
    let mut c = m.new_cache(vec![0]);
    Ok(m.forward(
        &Tensor::new(seq, &Device::Cpu)?.unsqueeze(0)?,
        &mut c,
        Logits::All,
    )?
    .squeeze(0)?)
}

fn cosine(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a.flatten_all()?;
    let b = b.flatten_all()?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb))
}

/// A tiny random model (seed 3) written as Q8_0 GGUF to a temp folder and loaded back; the
/// folder lives as long as the returned guard.
fn tiny_gguf_model(arch: Architecture) -> anyhow::Result<(tempfile::TempDir, TextModel)> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(arch);
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &cfg, &tiny_weights(&cfg, 3)?, GgmlDType::Q8_0)?;
    let tm = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
    Ok((dir, tm))
}

const SEQ: [u32; 9] = [10, 200, 33, 256, 257, 70, 71, 5, 120];

/// A 40-token prompt (long enough for the prefill GEMM path) then 10 decode steps on fixed tokens
/// (the integer kernels and the fused host attention; fixed, so two models that would pick
/// different greedy tokens at a near-tie still see the same sequence); returns every logit.
fn prefill_and_decode(m: &DecoderModel) -> anyhow::Result<Vec<f32>> {
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 261).collect();
    let mut c = m.new_cache(vec![0]);
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut last = m.forward(&ids, &mut c, Logits::Last)?;
    let mut all = last.flatten_all()?.to_vec1::<f32>()?;
    for step in 0..10u32 {
        let next = [(step * 53 + 7) % 261];
        last = m.forward(
            &Tensor::new(&next, &Device::Cpu)?.unsqueeze(0)?,
            &mut c,
            Logits::Last,
        )?;
        all.extend(last.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(all)
}

#[test]
fn every_kernel_block_type_runs_the_model_and_results_do_not_depend_on_the_thread_count(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Hidden 256 and intermediate 512, so the K-quants (256-element blocks) fit every matrix.
    let mut cfg = tiny_config(Architecture::Qwen2);
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.head_dim = 64;
    let w = tiny_weights(&cfg, 5)?;
    for quant in [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let path = dir.path().join(format!("{quant:?}.gguf"));
        write_gguf(&path, &cfg, &w, quant)?;
        let tm = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
        let runs: Vec<Vec<f32>> = [1usize, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
                pool.install(|| prefill_and_decode(tm.model()))
            })
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(runs[0], runs[1], "{quant:?}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "{quant:?}: 1 vs 3 threads");
        // The quantized model tracks the dense model on the same quantize→dequantize weights.
        let mut wq = w.clone();
        for t in wq.tensors.values_mut() {
            if t.rank() == 2 {
                *t = QTensor::quantize(t, quant)?.dequantize(&Device::Cpu)?;
            }
        }
        let dense = DecoderModel::load(&wq, &cfg, &NoHook)?;
        let want = Tensor::new(prefill_and_decode(&dense)?, &Device::Cpu)?;
        let got = Tensor::new(runs[0].clone(), &Device::Cpu)?;
        let c = cosine(&want, &got)?;
        assert!(c > 0.995, "{quant:?}: cosine to the dense model {c}");
    }
    Ok(())
}

#[test]
fn gguf_round_trip_matches_the_dense_model() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let cfg = tiny_config(arch);
        let w = tiny_weights(&cfg, 11)?;
        for quant in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            // The reference is the dense model on the same quantize→dequantize weights, so the
            // comparison measures loading (names, Q/K permutation, block layout), not quantization
            // loss; what is left is the 8-bit quantization of activations inside the kernels.
            let mut wq = w.clone();
            for t in wq.tensors.values_mut() {
                if t.rank() == 2 {
                    *t = QTensor::quantize(t, quant)?.dequantize(&Device::Cpu)?;
                }
            }
            let want = logits(&DecoderModel::load(&wq, &cfg, &NoHook)?, &SEQ)?;
            // Without the Q/K un-permutation this cosine drops to ~0.64 (measured), so 0.999 tells them apart.
            let min_cos = 0.999;
            let path = dir.path().join(format!("{}-{quant:?}.gguf", arch.name()));
            write_gguf(&path, &cfg, &w, quant)?;
            let tm = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())?;
            assert_eq!(tm.model().config().arch, arch);
            let types = &tm.info().tensor_types;
            assert!(
                types.get(&format!("{quant:?}")).is_some_and(|&n| n > 0),
                "{types:?}"
            );
            let got = logits(tm.model(), &SEQ)?;
            let c = cosine(&want, &got)?;
            assert!(c > min_cos, "{arch:?} {quant:?}: logits cosine {c}");
        }
    }
    Ok(())
}

#[test]
fn sharded_hf_folder_matches_the_dense_model_exactly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let cfg = tiny_config(arch);
        let w = tiny_weights(&cfg, 5)?;
        let want = logits(&DecoderModel::load(&w, &cfg, &NoHook)?, &SEQ)?;
        let folder = dir.path().join(arch.name());
        write_hf_folder(&folder, &cfg, &w, 3)?;
        assert!(folder.join("model-00002-of-00003.safetensors").is_file());
        let tm = TextModel::load(folder.to_str().unwrap(), &LoadOptions::default())?;
        let got = logits(tm.model(), &SEQ)?;
        let d = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{arch:?}: max diff {d}");
        assert_eq!(tm.info().format, "hf-folder");
        // A missing shard is named.
        std::fs::remove_file(folder.join("model-00002-of-00003.safetensors"))?;
        let err = TextModel::load(folder.to_str().unwrap(), &LoadOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
    }
    Ok(())
}

#[test]
fn gguf_tokenizer_chat_template_and_generation_work_end_to_end() -> anyhow::Result<()> {
    let (_dir, tm) = tiny_gguf_model(Architecture::Qwen2)?;
    let tok = tm.tokenizer();
    // Merges apply, control tokens are matched whole, bytes round-trip.
    assert_eq!(tok.encode("he", false)?, vec![256]);
    assert_eq!(tok.encode(" he<|im_end|>", false)?, vec![257, 259]);
    let text = "héllo wörld ☃ 1234\n\tend";
    let ids = tok.encode(text, false)?;
    assert_eq!(tok.decode(&ids, false)?, text);
    let prompt = tm.render_chat(&[flywheel_api::ChatMessage::new("user", "hi")])?;
    assert_eq!(
        prompt,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Greedy generation is deterministic, respects max_tokens, and batch equals single.
    let mut req = GenerateRequest::new(prompt, 12);
    req.sampling = SamplingParams::greedy();
    let a = tm.generate(&req, &mut flywheel_api::NullSink)?;
    let b = tm.generate(&req, &mut flywheel_api::NullSink)?;
    assert_eq!(a.tokens, b.tokens);
    assert!(a.tokens.len() <= 12 && !a.tokens.is_empty());
    let mut other = req.clone();
    other.prompt = "abc".into();
    let batch = tm.generate_batch(&[req.clone(), other.clone()])?;
    assert_eq!(batch[0].tokens, a.tokens);
    assert_eq!(
        batch[1].tokens,
        tm.generate(&other, &mut flywheel_api::NullSink)?.tokens
    );
    // Streaming pieces add up to the final text.
    let mut streamed = String::new();
    let mut sampled = req.clone();
    sampled.sampling = SamplingParams {
        seed: 9,
        ..SamplingParams::default()
    };
    let out = tm.generate(&sampled, &mut |p: &str, _t: u32| {
        streamed.push_str(p);
        std::ops::ControlFlow::Continue(())
    })?;
    assert_eq!(streamed, out.text);
    Ok(())
}

#[test]
fn prompt_longer_than_the_context_is_refused() -> anyhow::Result<()> {
    let (_dir, tm) = tiny_gguf_model(Architecture::Llama)?;
    let req = GenerateRequest::new("x".repeat(100), 4);
    let err = tm
        .generate(&req, &mut flywheel_api::NullSink)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("100 tokens") && err.contains("context is 64"),
        "{err}"
    );
    // A prompt that fits but leaves little room ends with `length`, not an error.
    let req = GenerateRequest::new("x".repeat(60), 50);
    let out = tm.generate(&req, &mut flywheel_api::NullSink)?;
    assert!(out.tokens.len() <= 4, "{}", out.tokens.len());
    Ok(())
}

#[test]
fn truncated_and_corrupt_files_are_named_in_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(Architecture::Llama);
    let w = tiny_weights(&cfg, 3)?;
    // Truncated GGUF: tensor data cut off.
    let path = dir.path().join("cut.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::Q8_0)?;
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3])?;
    let err = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    // Checked when the file is opened: the first tensor whose data is cut off is named.
    assert!(
        err.contains("cut.gguf") && err.contains("runs past the end of the file"),
        "{err}"
    );
    // Header cut short.
    std::fs::write(&path, &bytes[..100])?;
    let err = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cut.gguf") && err.contains("GGUF"), "{err}");
    // Not a GGUF at all.
    std::fs::write(&path, b"hello world, not a model")?;
    let err = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cut.gguf"), "{err}");
    // Unsupported block type: patch the first tensor's type id to 16 (IQ2_XXS).
    let path = dir.path().join("iq.gguf");
    write_gguf(&path, &cfg, &w, GgmlDType::Q8_0)?;
    let mut bytes = std::fs::read(&path)?;
    let name = b"blk.0.attn_k.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in header")
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into()?) as usize;
    let ty = at + 4 + 8 * n_dims;
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, &bytes)?;
    let err = TextModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("iq.gguf") && err.contains("16"), "{err}");
    // Truncated safetensors.
    let folder = dir.path().join("hf");
    write_hf_folder(&folder, &cfg, &w, 1)?;
    let st = folder.join("model.safetensors");
    let bytes = std::fs::read(&st)?;
    std::fs::write(&st, &bytes[..bytes.len() / 2])?;
    let err = TextModel::load(folder.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // Unknown architecture.
    let folder2 = dir.path().join("hf2");
    write_hf_folder(&folder2, &cfg, &w, 1)?;
    let c = std::fs::read_to_string(folder2.join("config.json"))?.replace("\"llama\"", "\"mamba\"");
    std::fs::write(folder2.join("config.json"), c)?;
    let err = TextModel::load(folder2.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mamba") && err.contains("config.json"),
        "{err}"
    );
    let _ = DType::F32;
    Ok(())
}

#[test]
fn streaming_never_splits_a_character() -> anyhow::Result<()> {
    // The tiny vocabulary is byte-level: "é" and "☃" are two and three tokens.
    let (_dir, tm) = tiny_gguf_model(Architecture::Qwen2)?;
    let text = "hé ☃!";
    let ids = tm.tokenizer().encode(text, false)?;
    assert_eq!(ids.len(), 1 + 2 + 1 + 3 + 1, "{ids:?}");
    let mut dec = flywheel_runtime::tokenizer::IncrementalDecoder::new(tm.tokenizer());
    let pieces: Vec<String> = ids.iter().map(|&i| dec.push(i)).collect::<Result<_, _>>()?;
    assert_eq!(pieces, vec!["h", "", "é", " ", "", "", "☃", "!"]);
    assert_eq!(dec.flush()?, "");
    // An incomplete character at the end is released (lossily) by flush.
    let mut dec = flywheel_runtime::tokenizer::IncrementalDecoder::new(tm.tokenizer());
    assert_eq!(dec.push(ids[1])?, "");
    assert_eq!(dec.flush()?, "\u{FFFD}");
    Ok(())
}

#[test]
fn packed_cpu_encoder_matches_the_padded_candle_encoder() {
    use flywheel_runtime::EmbeddingModel;
    let dir = tempfile::tempdir().unwrap();
    flywheel_runtime::testing::write_tiny_bert_folder(dir.path(), 5).unwrap();
    let em = EmbeddingModel::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let texts = [
        "how do I install python?",
        "a",
        "the debugger is called pdb; it stops at breakpoints (and more) 123",
        "what is a list comprehension, and when should I use one instead of a loop?",
    ];
    // Packed path (no padding) vs candle's padded path, per text and as one batch.
    let packed = em.embed_all(&texts, 8).unwrap();
    let padded = em.embed_padded(&texts).unwrap();
    assert_eq!(packed.len(), texts.len());
    for (i, (a, b)) in packed.iter().zip(&padded).enumerate() {
        assert_eq!(a.len(), 32);
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "text {i}: packed and padded differ by {d}");
        let n: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    // Distinct texts give distinct vectors (the model is not degenerate).
    let cos: f32 = packed[0].iter().zip(&packed[2]).map(|(x, y)| x * y).sum();
    assert!(cos < 0.999, "{cos}");
}

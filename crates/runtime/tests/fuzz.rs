//! Seeded mutation fuzzing of the model loader: GGUF files with random edits in their header
//! (metadata, tensor index) and HF folders with edited config and tokenizer files load or fail
//! with an error; none panics, none allocates without bound (that would abort the process).

use candle_core::quantized::GgmlDType;
use flywheel_models::Architecture;
use flywheel_runtime::testing::{
    mutations, no_panic, tiny_config, tiny_weights, write_gguf, write_hf_folder,
};
use flywheel_runtime::{LoadOptions, TextModel};

#[test]
fn mutated_gguf_headers_never_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(Architecture::Llama);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, &tiny_weights(&cfg, 1)?, GgmlDType::Q8_0)?;
    let bytes = std::fs::read(&good)?;
    let case = dir.path().join("case.gguf");
    let (mut loaded, mut refused) = (0, 0);
    for (i, m) in mutations(&bytes, 300, 4096, 7).into_iter().enumerate() {
        std::fs::write(&case, &m)?;
        let r = no_panic(&format!("case {i}"), || {
            TextModel::load(case.to_str().unwrap(), &LoadOptions::default()).map(|tm| {
                // What loads must also run.
                let _ = tm.generate(
                    &flywheel_api::GenerateRequest::new("hi", 2),
                    &mut flywheel_api::NullSink,
                );
            })
        });
        match r {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(_)) => refused += 1,
            Err(panic) => anyhow::bail!("{panic}"),
        }
    }
    assert!(
        refused > 0,
        "mutations that break the header must be refused ({loaded} loaded)"
    );
    Ok(())
}

#[test]
fn mutated_hf_config_and_tokenizer_files_never_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(Architecture::Qwen2);
    let good = dir.path().join("good");
    write_hf_folder(&good, &cfg, &tiny_weights(&cfg, 2)?, 1)?;
    for (file, cases) in [
        ("config.json", 150),
        ("tokenizer_config.json", 150),
        ("tokenizer.json", 60),
    ] {
        let bytes = std::fs::read(good.join(file))?;
        for (i, m) in mutations(&bytes, cases, 0, 11).into_iter().enumerate() {
            let case = dir.path().join(format!("case-{file}-{i}"));
            std::fs::create_dir(&case)?;
            for e in std::fs::read_dir(&good)? {
                let e = e?;
                std::fs::copy(e.path(), case.join(e.file_name()))?;
            }
            std::fs::write(case.join(file), &m)?;
            let r = no_panic(&format!("{file} case {i}"), || {
                TextModel::load(case.to_str().unwrap(), &LoadOptions::default()).map(|_| ())
            });
            if let Err(panic) = r {
                anyhow::bail!("{panic}");
            }
            std::fs::remove_dir_all(&case)?;
        }
    }
    Ok(())
}

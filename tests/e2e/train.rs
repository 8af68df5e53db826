//! LoRA training through the CLI: train, resume, generate with the adapter, merge; Ctrl-C
//! saving a checkpoint.

use super::*;

#[test]
fn lora_train_resume_generate_with_adapter_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = ["he", "ab", "ba", "aha", "eh", "hab"]
        .iter()
        .map(|w| format!("{{\"prompt\":\"{w}\",\"completion\":\"{w}{w}\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = dir.path().join("run");
    let recipe = dir.path().join("r.toml");
    let write_recipe = |extra: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalid_split = 0.3\nmax_seq_len = 64\n[lora]\ntarget_modules = \"all-linear\"\n[optimizer]\nlr = 0.01\n[batch]\nsize = 2\nmax_steps = 4\n[checkpoint]\nevery = 2\n[output]\ndir = \"{}\"\n{extra}",
                m.display(),
                data.display(),
                run.display()
            ),
        )
        .unwrap()
    };
    // A typo in the recipe is named with its line.
    write_recipe("[eval]\nevry = 3\n");
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["evry", "r.toml"]);
    write_recipe("");
    let out = flywheel(
        &["lora-train", recipe.to_str().unwrap(), "--dry-run"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(plan["total_steps"], 4);
    assert_eq!(plan["adapted_modules"], 14);
    assert_eq!(
        plan["train_examples"].as_u64().unwrap() + plan["valid_examples"].as_u64().unwrap(),
        6
    );
    assert!(!run.exists(), "a dry run writes nothing");
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("done: 4 steps") && err.contains("trainable parameters"),
        "{err}"
    );
    let adapter = run.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    // Running the finished run again without --resume is refused; with --resume it is a no-op.
    let out = flywheel(&["lora-train", recipe.to_str().unwrap()], None, &[]);
    assert_fails_with(&out, &["--resume"]);
    let out = flywheel(
        &["lora-train", recipe.to_str().unwrap(), "--resume"],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Generation with the adapter differs from the base (B moved away from zero).
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--prompt",
            "he",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = flywheel(&args, None, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        v["tokens"].clone()
    };
    let base = gen(&[]);
    let tuned = gen(&["--adapter", adapter.to_str().unwrap()]);
    assert_ne!(base, tuned);
    // Merge writes a Hugging Face folder that generates what base + adapter generates.
    let merged = dir.path().join("merged");
    let out = flywheel(
        &[
            "merge",
            "-m",
            m.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    let out = flywheel(&["info", merged.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A missing adapter folder is named.
    let out = flywheel(
        &[
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--adapter",
            "no/such/adapter",
            "--prompt",
            "x",
        ],
        None,
        &[],
    );
    assert_fails_with(&out, &["no/such/adapter"]);
}

#[test]
fn ctrl_c_during_lora_train_saves_a_checkpoint_and_says_how_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gguf(dir.path(), Architecture::Llama);
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, "{\"prompt\":\"he\",\"completion\":\"hehe\"}\n{\"prompt\":\"ab\",\"completion\":\"abab\"}\n").unwrap();
    let run = dir.path().join("run");
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[batch]\nsize = 2\nmax_steps = 1000000\n[checkpoint]\nevery = 0\n[output]\ndir = \"{}\"\n",
            m.display(),
            data.display(),
            run.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["lora-train", recipe.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then interrupt it like a user pressing Ctrl-C.
    let metrics = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.lines().count() >= 3) {
        assert!(t0.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("--resume") && err.contains("stopped at step"),
        "{err}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    assert!(ckpts[0].starts_with("step-"));
    assert!(
        !run.join("adapter").exists(),
        "an interrupted run writes no final adapter"
    );
}

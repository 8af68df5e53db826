//! A hostile model file cannot drive the terminal; careless flags get clear errors or
//! warnings; a mistyped local path is never looked up on the hub.

use super::*;

#[test]
fn model_text_is_printed_escaped_and_careless_flags_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let model = dir.path().join("evil");
    write_hf_folder(&model, &cfg, &tiny_weights(&cfg, 3).unwrap(), 1).unwrap();
    // A chat template that would retitle the terminal, clear it and fake a message.
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J{% for m in messages %}{{ m.content }}{% endfor %}";
    let cfg_path = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    tc["chat_template"] = serde_json::json!(evil);
    std::fs::write(&cfg_path, tc.to_string()).unwrap();
    let m = model.to_str().unwrap();
    let out = flywheel(&["info", m], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
    assert!(shown.contains("\\u{1b}]0;pwned"), "{shown}");

    // Flags that could only be mistakes.
    let gen = |extra: &[&str]| {
        flywheel(
            &[&["generate", "-m", m, "-p", "hi"][..], extra].concat(),
            None,
            &[],
        )
    };
    assert_fails_with(&gen(&["--max-tokens", "0"]), &["--max-tokens"]);
    assert_fails_with(&gen(&["--stop", ""]), &["--stop"]);
    let out = gen(&["--max-tokens", "2", "--threads", "4096"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--threads 4096"),
        "{}",
        text(&out.stderr)
    );

    // An OS error is said once, not once per layer of the error chain.
    let out = flywheel(&["lora-train", "/nonexistent/recipe.toml"], None, &[]);
    assert_fails_with(&out, &["/nonexistent/recipe.toml"]);
    assert_eq!(
        text(&out.stderr).matches("os error 2").count(),
        1,
        "{}",
        text(&out.stderr)
    );

    // `src/typo` (run from the crate folder, where `src` exists) reads like `owner/name`
    // but is a mistyped path: "no such file", without asking the hub.
    let out = flywheel(&["info", "src/typo"], None, &[("HF_HUB_OFFLINE", "1")]);
    assert_fails_with(&out, &["src/typo", "no such file"]);
    assert!(!text(&out.stderr).contains("hub"), "{}", text(&out.stderr));
}

//! A model manifest's `[defaults]` apply to requests that leave the fields out: the system
//! message of a chat without one, the sampling, the stop strings; a request's own fields win.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_defaults_fill_what_a_request_leaves_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny_config(Architecture::Llama);
    std::fs::create_dir(dir.path().join("m"))?;
    let model = dir.path().join("m/tiny.gguf");
    write_gguf(&model, &cfg, &tiny_weights(&cfg, 5)?, GgmlDType::Q8_0)?;
    std::fs::write(
        dir.path().join("m.toml"),
        "name = \"m\"\n[defaults]\nsystem = \"Be brief.\"\ntemperature = 0.0\nmax_tokens = 5\n",
    )?;
    let mut sc = ServeConfig::new(model.to_str().unwrap());
    sc.name = Some("tiny".into());
    let state = build_state(&sc)?;
    assert_eq!(state.model.defaults().system.as_deref(), Some("Be brief."));
    let app = router(state);
    let user = json!({"role": "user", "content": "hello there"});
    let plain = |seed: u64| json!({"model": "tiny", "seed": seed, "messages": [user.clone()]});
    let (s, a) = post(&app, "/v1/chat/completions", plain(1)).await;
    assert_eq!(s, StatusCode::OK, "{a}");
    // Greedy by default: any seed gives the same text; max_tokens from the manifest.
    let (_, b) = post(&app, "/v1/chat/completions", plain(2)).await;
    assert_eq!(text_of(&a), text_of(&b));
    assert!(
        a["usage"]["completion_tokens"].as_u64().unwrap() <= 5,
        "{a}"
    );
    // The manifest's system message is the prompt's: the same prompt as when sent explicitly.
    let explicit = json!({"model": "tiny", "messages": [
        {"role": "system", "content": "Be brief."}, user.clone()]});
    let (_, e) = post(&app, "/v1/chat/completions", explicit).await;
    assert_eq!(e["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"]);
    assert_eq!(text_of(&e), text_of(&a));
    // A request's own system message replaces it.
    let own = json!({"model": "tiny", "messages": [
        {"role": "system", "content": "Answer at length, with many words."}, user]});
    let (_, o) = post(&app, "/v1/chat/completions", own).await;
    assert_ne!(o["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"]);
    // A bad manifest stops the server from starting, naming the file and the key.
    std::fs::write(dir.path().join("m.toml"), "[defaults]\ntemperature = -1\n")?;
    let err = build_state(&sc)
        .err()
        .expect("a bad manifest is refused")
        .to_string();
    assert!(
        err.contains("m.toml") && err.contains("defaults.temperature"),
        "{err}"
    );
    Ok(())
}

//! `flywheel generate` and `flywheel chat`: the sampling flags, streaming text to stdout, and
//! the interactive chat loop.

use anyhow::{Context, Result};
use clap::Args;
use flywheel_api::{ChatMessage, GenerateRequest, SamplingParams, TokenSink};
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

use crate::args::ModelArgs;
use flywheel_runtime::ModelDefaults;

/// Sampling flags. One left out takes the model manifest's default (`[defaults]` in
/// `models/<name>.toml`), then the built-in one shown.
#[derive(Args, Clone)]
struct SamplingArgs {
    /// The most tokens to generate [default: 256].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Softmax temperature (0 = greedy) [default: 0.7].
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass [default: 0.95].
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off) [default: 0].
    #[arg(long)]
    top_k: Option<usize>,
    /// Minimum probability relative to the top token [default: 0.05].
    #[arg(long)]
    min_p: Option<f32>,
    /// Repeat penalty over the last 64 tokens (1 = off) [default: 1].
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop string (repeatable); none given takes the manifest's.
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    /// The request for `prompt`: flags first, then the model's defaults, then built-ins.
    fn request(&self, prompt: String, d: &ModelDefaults) -> Result<GenerateRequest> {
        let base = d.sampling(SamplingParams::default());
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            repeat_last_n: 64,
            seed: self.seed,
        };
        sampling.validate()?;
        anyhow::ensure!(
            self.max_tokens != Some(0),
            "--max-tokens must be at least 1"
        );
        anyhow::ensure!(
            self.stop.iter().all(|s| !s.is_empty()),
            "--stop must not be empty (it would match everywhere)"
        );
        let stop = if self.stop.is_empty() {
            d.stop.clone()
        } else {
            self.stop.clone()
        };
        Ok(GenerateRequest {
            prompt,
            max_tokens: self.max_tokens.or(d.max_tokens).unwrap_or(256),
            stop,
            sampling,
            ignore_eos: false,
            grammar: None,
            logprobs: None,
        })
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt ("-" reads stdin).
    #[arg(long, short)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat); default: the model manifest's `system`, if any.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print a JSON summary (text, tokens, finish reason, usage, speed) instead of streaming.
    #[arg(long)]
    json: bool,
    /// With --json: each generated token's log-probability and its N most likely
    /// alternatives (0–20), from the distribution it was drawn from (after the repeat penalty
    /// and any grammar, before temperature and truncation).
    #[arg(long, value_name = "N", requires = "json", value_parser = clap::value_parser!(u8).range(0..=20))]
    logprobs: Option<u8>,
    /// Print speed figures to stderr after the text.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    grammar: GrammarArgs,
}

/// A grammar the whole output must follow (at most one).
#[derive(Args, Clone, Default)]
#[group(multiple = false)]
struct GrammarArgs {
    /// Constrain the output to JSON that follows this JSON Schema file (compact JSON unless the
    /// schema sets llguidance's `x-guidance` options).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to this regular expression (the whole output matches it).
    #[arg(long, value_name = "RE")]
    regex: Option<String>,
    /// Constrain the output to this Lark grammar file (llguidance's dialect; `start` rule).
    #[arg(long, value_name = "FILE.lark")]
    grammar: Option<std::path::PathBuf>,
}

impl GrammarArgs {
    /// The grammar asked for, with the file read (errors name the file).
    fn grammar(&self) -> Result<Option<flywheel_api::Grammar>> {
        use flywheel_api::Grammar;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(if let Some(p) = &self.json_schema {
            let text = read(p)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", p.display()))?;
            anyhow::ensure!(
                v.is_object(),
                "{}: a JSON Schema must be a JSON object",
                p.display()
            );
            Some(Grammar::JsonSchema(text))
        } else if let Some(re) = &self.regex {
            Some(Grammar::Regex(re.clone()))
        } else if let Some(p) = &self.grammar {
            Some(Grammar::Lark(read(p)?))
        } else {
            None
        })
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message; default: the model manifest's `system`, if any.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Streams text to stdout as it arrives.
struct Printer;

impl TokenSink for Printer {
    fn on_text(&mut self, piece: &str, _token: u32) -> ControlFlow<()> {
        let mut out = std::io::stdout().lock();
        if out
            .write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return ControlFlow::Break(()); // stdout closed (e.g. piped into head)
        }
        ControlFlow::Continue(())
    }
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = if a.prompt == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?
    } else {
        a.prompt.clone()
    };
    // Check the flags before loading the model.
    a.sampling
        .request(String::new(), &ModelDefaults::default())?;
    let grammar = a.grammar.grammar()?;
    let tm = a.model.load_text()?;
    if let Some(g) = &grammar {
        let flag = match g {
            flywheel_api::Grammar::JsonSchema(_) => "--json-schema",
            flywheel_api::Grammar::Regex(_) => "--regex",
            _ => "--grammar",
        };
        tm.compile_grammar(g).with_context(|| flag)?;
    }
    let defaults = tm.defaults().clone();
    let prompt = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = a.system.as_ref().or(defaults.system.as_ref()) {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", prompt));
        tm.render_chat(&msgs)?
    } else {
        prompt
    };
    let req = GenerateRequest {
        grammar,
        logprobs: a.logprobs.map(usize::from),
        ..a.sampling.request(prompt, &defaults)?
    };
    let out = if a.json {
        tm.generate(&req, &mut flywheel_api::NullSink)?
    } else {
        let out = tm.generate(&req, &mut Printer)?;
        println!();
        out
    };
    let speed = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    if a.json {
        let v = serde_json::json!({
            "text": out.text,
            "tokens": out.tokens,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
            "prefill_tok_s": speed(out.usage.prompt_tokens, out.timings.prefill_s),
            "decode_tok_s": speed(out.usage.completion_tokens.saturating_sub(1), out.timings.decode_s),
        });
        let mut v = v;
        if let Some(lps) = &out.logprobs {
            v["logprobs"] = logprobs_json(&tm, lps)?;
        }
        println!("{v}");
    } else if a.stats {
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s; finish: {:?}]",
            out.usage.prompt_tokens,
            speed(out.usage.prompt_tokens, out.timings.prefill_s),
            out.usage.completion_tokens,
            speed(
                out.usage.completion_tokens.saturating_sub(1),
                out.timings.decode_s
            ),
            out.finish_reason
        );
    }
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    a.sampling
        .request(String::new(), &ModelDefaults::default())?;
    let tm = a.model.load_text()?;
    let interactive = std::io::stdin().is_terminal();
    let mut system = a.system.clone().or_else(|| tm.defaults().system.clone());
    let mut history: Vec<ChatMessage> = vec![];
    if interactive {
        eprintln!(
            "flywheel chat — {} ({}). /reset, /system TEXT, /quit",
            tm.info().path,
            tm.info().architecture
        );
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                eprintln!("[history cleared]");
                continue;
            }
            s if s.starts_with("/system") => {
                let text = s["/system".len()..].trim();
                system = (!text.is_empty()).then(|| text.to_string());
                history.clear();
                eprintln!(
                    "[system prompt {}; history cleared]",
                    if system.is_some() { "set" } else { "removed" }
                );
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let mut msgs = vec![];
        if let Some(s) = &system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.extend(history.iter().cloned());
        let req = a.sampling.request(tm.render_chat(&msgs)?, tm.defaults())?;
        match tm.generate(&req, &mut Printer) {
            Ok(out) => {
                println!();
                history.push(ChatMessage::new("assistant", out.text));
            }
            Err(e) => {
                // Keep the session: drop the turn that failed (e.g. the context is full).
                history.pop();
                eprintln!("error: {e}");
                if !interactive {
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

/// Per-token log-probabilities for `--json`: id, text, log-probability, and the alternatives.
fn logprobs_json(
    tm: &flywheel_runtime::TextModel,
    lps: &[flywheel_api::TokenLogprob],
) -> Result<serde_json::Value> {
    let vocab = flywheel_runtime::constraint::VocabBytes::new(tm.tokenizer().inner())?;
    let text = |id: u32| String::from_utf8_lossy(&vocab.get(id).0).into_owned();
    Ok(lps
        .iter()
        .map(|lp| {
            let top: Vec<serde_json::Value> = lp
                .top
                .iter()
                .map(|&(id, l)| serde_json::json!({"id": id, "text": text(id), "logprob": l}))
                .collect();
            serde_json::json!({"id": lp.token, "text": text(lp.token), "logprob": lp.logprob,
                               "top_logprobs": top})
        })
        .collect())
}

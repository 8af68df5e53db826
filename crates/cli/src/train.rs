//! `flywheel lora-train` and `flywheel merge`: a recipe's training run with a progress bar and
//! a Ctrl-C checkpoint, and folding an adapter into its base model.

use anyhow::{Context, Result};
use flywheel_runtime::parse_dtype;
use flywheel_train::TrainEvent;
use indicatif::{ProgressBar, ProgressStyle};

use crate::progress;

pub fn lora_train(
    recipe_path: &str,
    resume: bool,
    dry_run: bool,
    threads: Option<usize>,
) -> Result<()> {
    crate::args::configure_threads(threads)?;
    flywheel_runtime::threads::single_malloc_arena();
    let recipe = flywheel_train::Recipe::load(std::path::Path::new(recipe_path))?;
    eprintln!("loading {} and the data ...", recipe.model.path);
    let mut trainer = flywheel_train::Trainer::new(recipe, resume)?;
    if dry_run {
        let s = trainer.data_stats();
        println!(
            "{}",
            serde_json::json!({
                "train_examples": trainer.train_examples().len(),
                "train_tokens": s.tokens,
                "answer_tokens": s.target_tokens,
                "dropped_overlong": s.dropped_overlong,
                "truncated": s.truncated,
                "valid_examples": trainer.valid_count(),
                "trainable_parameters": trainer.adapter().parameter_count(),
                "adapted_modules": trainer.adapter().params.len(),
                "total_steps": trainer.total_steps(),
                "start_step": trainer.step(),
            })
        );
        return Ok(());
    }
    let stop = trainer.stop_flag();
    let presses = std::sync::atomic::AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let bar = ProgressBar::hidden();
    let mut ticker = progress::Ticker::new(progress::PLAIN_EVERY);
    let started = std::time::Instant::now();
    let mut observer = |e: &TrainEvent| match e {
        TrainEvent::Started {
            total_steps,
            start_step,
            trainable,
            train,
            valid_examples,
        } => {
            eprintln!(
                "{} training examples ({} tokens, {} answer tokens; {} dropped, {} truncated for length), {} validation; {} trainable parameters; {} steps{}",
                train.kept,
                train.tokens,
                train.target_tokens,
                train.dropped_overlong,
                train.truncated,
                valid_examples,
                trainable,
                total_steps,
                if *start_step > 0 { format!(", resuming at step {start_step}") } else { String::new() }
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(*total_steps as u64);
            bar.set_position(*start_step as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("valid template"),
            );
        }
        TrainEvent::Step(m) => {
            let msg = format!(
                "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
                m.loss, m.lr, m.grad_norm, m.tokens_per_s
            );
            bar.set_position(m.step as u64);
            let last = bar.length().is_some_and(|n| m.step as u64 >= n);
            if ticker.due(&bar, last) {
                eprintln!(
                    "step {}/{} {msg} ({} elapsed)",
                    m.step,
                    bar.length().unwrap_or(0),
                    indicatif::HumanDuration(started.elapsed())
                );
            }
            bar.set_message(msg);
        }
        TrainEvent::Eval { step, loss } => {
            progress::say(&bar, format!("step {step}: eval loss {loss:.4}"));
        }
        TrainEvent::Checkpoint { step, path } => {
            progress::say(&bar, format!("step {step}: checkpoint {}", path.display()));
        }
    };
    let s = trainer.run(&mut observer, None)?;
    bar.finish_and_clear();
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    if s.interrupted {
        eprintln!(
            "stopped at step {}/{}; continue with: flywheel lora-train {recipe_path} --resume",
            s.steps, s.total_steps
        );
    } else {
        eprintln!(
            "done: {} steps, train loss {}, eval loss {}; adapter in {}; metrics and loss.svg in {}",
            s.steps,
            fmt(s.final_train_loss),
            fmt(s.final_eval_loss),
            s.adapter_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            s.run_dir.display()
        );
    }
    Ok(())
}

pub fn merge(model: &str, adapter: &str, out: &str, dtype: &str) -> Result<()> {
    let s = flywheel_train::merge::merge(
        model,
        std::path::Path::new(adapter),
        std::path::Path::new(out),
        parse_dtype(dtype)?,
    )?;
    eprintln!(
        "merged {} projections; wrote {} tensors to {}",
        s.merged_modules,
        s.tensors,
        s.out.display()
    );
    Ok(())
}

//! Flag groups shared by several subcommands: where compute runs (`--device`, `--dtype`,
//! `--threads`) and which model to load (`--model`, `--adapter`), resolved into library options.

use anyhow::{bail, Context, Result};
use clap::Args;
use flywheel_runtime::{parse_device, parse_dtype, LoadOptions, ModelFormat, TextModel};

/// `--device`, `--dtype` and `--threads`.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPUs).
    #[arg(long)]
    pub dtype: Option<String>,
    /// CPU threads (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl DeviceArgs {
    /// Sizes the compute pool and parses the device and dtype.
    pub fn load_options(&self) -> Result<LoadOptions> {
        load_options(&self.device, self.dtype.as_deref(), self.threads)
    }
}

/// Sizes the compute pool from `--threads` (physical cores unless told otherwise; candle reads
/// the same variable as rayon) and parses the device and dtype.
pub fn load_options(
    device: &str,
    dtype: Option<&str>,
    threads: Option<usize>,
) -> Result<LoadOptions> {
    configure_threads(threads)?;
    Ok(LoadOptions {
        device: parse_device(device)?,
        dtype: dtype.map(parse_dtype).transpose()?,
    })
}

/// Checks `--threads` and sizes the compute pool with it.
pub fn configure_threads(threads: Option<usize>) -> Result<()> {
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let available = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = threads.map(|t| {
        let (n, warning) = flywheel_runtime::threads::cap(t, available);
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        n
    });
    flywheel_runtime::threads::configure(threads);
    Ok(())
}

/// A decoder (or embedder) to load, with an optional LoRA adapter, and where to run it.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a model folder, or a hub id (owner/name).
    #[arg(long, short)]
    pub model: String,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A LoRA adapter folder (Hugging Face PEFT layout) applied on top of the model.
    #[arg(long)]
    pub adapter: Option<String>,
}

impl ModelArgs {
    /// Loads the decoder, with the adapter installed when one is given.
    pub fn load_text(&self) -> Result<TextModel> {
        let opts = self.device.load_options()?;
        let Some(dir) = &self.adapter else {
            return TextModel::load(&self.model, &opts)
                .with_context(|| format!("cannot load model `{}`", self.model));
        };
        let adapter = flywheel_peft::Adapter::load(
            std::path::Path::new(dir),
            &opts.device,
            opts.resolved_dtype(),
        )?;
        let hook = flywheel_peft::LoraHook::for_config(&adapter.config);
        let tm = TextModel::load_with_hook(&ModelFormat::resolve(&self.model)?, &opts, &hook)
            .with_context(|| format!("cannot load model `{}`", self.model))?;
        hook.install(&adapter)
            .with_context(|| format!("adapter {dir} does not fit model `{}`", self.model))?;
        Ok(tm)
    }
}

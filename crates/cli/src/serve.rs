//! `flywheel serve`: the server's flags, resolved into a `ServeConfig`, and the tokio runtime
//! that runs the OpenAI-compatible endpoint until SIGINT/SIGTERM.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;

use crate::args::DeviceArgs;

#[derive(Args, Clone)]
// The shared --threads help, worded for the server.
#[command(mut_arg("threads", |a| a.help("CPU threads for compute (default: physical cores)")))]
pub struct ServeArgs {
    /// The base model: GGUF file, folder or hub id.
    #[arg(long, short)]
    model: String,
    /// The name requests use for the base model (default: the folder or file name).
    #[arg(long)]
    name: Option<String>,
    /// An adapter to serve, as NAME=FOLDER (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The only folder `POST /v1/adapters` may load from (run-time loading is off without it).
    #[arg(long)]
    adapters_dir: Option<String>,
    /// A sentence-embedding model folder for /v1/embeddings.
    #[arg(long)]
    embedding_model: Option<String>,
    /// A retrieval store (`flywheel rag index`): chat requests with a `retrieval` object get
    /// its passages as context and the response lists them as `sources`.
    #[arg(long, value_name = "STORE")]
    rag: Option<std::path::PathBuf>,
    /// Address to bind (127.0.0.1 keeps the server local).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the URL printed at startup has it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: the FLYWHEEL_API_KEY variable, if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests waiting for a slot; more get HTTP 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_s: u64,
    /// Seconds a client may take to send a request's head; slower ones are disconnected.
    #[arg(long, default_value_t = 30)]
    header_timeout_s: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let load = a.device.load_options()?;
    let mut cfg = flywheel_serve::ServeConfig::new(&a.model);
    cfg.name = a.name;
    for spec in &a.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: expected NAME=FOLDER");
        };
        cfg.adapters.push((name.to_string(), dir.into()));
    }
    cfg.adapters_dir = a.adapters_dir.map(Into::into);
    cfg.embedding_model = a.embedding_model;
    cfg.rag = a.rag;
    cfg.load = load;
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    cfg.engine.max_batch = a.max_batch;
    cfg.engine.max_queue = a.max_queue;
    cfg.api_key = a
        .api_key
        .or_else(|| std::env::var("FLYWHEEL_API_KEY").ok())
        .filter(|k| !k.is_empty());
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.shutdown_grace = std::time::Duration::from_secs(a.shutdown_grace_s);
    anyhow::ensure!(
        a.header_timeout_s >= 1,
        "--header-timeout-s must be at least 1"
    );
    cfg.header_read_timeout = std::time::Duration::from_secs(a.header_timeout_s);
    eprintln!("loading {} ...", a.model);
    let state = flywheel_serve::build_state(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let adapters = state.registry.names();
        eprintln!(
            "model `{}`; adapters: {}{}",
            state.name,
            if adapters.is_empty() {
                "none".to_string()
            } else {
                adapters.join(", ")
            },
            match state.registry.dir() {
                Some(d) => format!("; run-time loads from {}", d.display()),
                None => String::new(),
            }
        );
        if let Some((name, _)) = &state.embedder {
            eprintln!("embedding model `{name}`");
        }
        println!("flywheel serve: listening on http://{addr}");
        std::io::stdout().flush()?;
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
            eprintln!("shutting down: finishing running requests ...");
        };
        flywheel_serve::serve(
            listener,
            state,
            shutdown,
            cfg.shutdown_grace,
            cfg.header_read_timeout,
        )
        .await?;
        eprintln!("stopped");
        Ok::<_, anyhow::Error>(())
    })
}

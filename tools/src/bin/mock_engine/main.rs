//! mock-engine: an OpenAI/vLLM-compatible fake LLM server used by the
//! gateway's integration tests and benchmarks.
//!
//! Prints the bound address as the first line of stdout; logs go to stderr.

mod body;
mod guard;
mod inference;
mod kvcache;
mod request;
mod router;
mod sched;
mod sse;
mod state;
mod tokens;
mod validate;
mod wire;
mod ws;

use std::error::Error;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::body::MockBody;
use crate::state::{Config, Engine, State};

type BoxError = Box<dyn Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    name = "mock-engine",
    about = "OpenAI-compatible fake LLM engine (vLLM flavoured) for tests and benchmarks"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Served model name (repeatable). Default: mock-model.
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Instance name sent in `x-mock-instance` (default: the bound address).
    #[arg(long)]
    name: Option<String>,
    /// Delay before the first byte of a completion/chat response.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    ttft_ms: u64,
    /// Delay between streamed tokens (a request's `x-mock-token-interval-us`
    /// header overrides it).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    token_interval_ms: u64,
    /// Completion tokens per response (capped by max_tokens).
    #[arg(long, default_value_t = 8)]
    tokens: u32,
    /// Fail every inference request with this status (or, with --error-rate,
    /// the injected failures).
    #[arg(long, value_name = "CODE")]
    fail_status: Option<u16>,
    /// Fraction (0.0-1.0) of inference requests that fail.
    #[arg(long, value_name = "F")]
    error_rate: Option<f64>,
    /// Seed for --error-rate.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Abort the connection after N content chunks of a streamed response.
    #[arg(long, value_name = "N")]
    drop_after_chunks: Option<u32>,
    /// Never answer inference requests.
    #[arg(long)]
    hang: bool,
    /// Start with /health answering 503.
    #[arg(long)]
    unhealthy: bool,
    /// Use vLLM's older flat error body shape.
    #[arg(long)]
    flat_errors: bool,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Scheduler: at most N inference requests run (prefill and generate) at
    /// once; the others wait in a FIFO queue (`vllm:num_requests_waiting`).
    /// A stream holds its slot until it ends. Default: unlimited.
    #[arg(long, value_name = "N")]
    max_running: Option<usize>,
    /// Prefix cache: an LRU of 16-token blocks holding N tokens (0: off).
    /// Tokens are whitespace-separated words (see kvcache.rs).
    #[arg(long, default_value_t = 0, value_name = "N")]
    prefix_cache_tokens: u64,
    /// Prefill time per uncached prompt token, added to --ttft-ms (a
    /// request's `x-mock-prefill-us-per-token` header overrides it).
    #[arg(long, default_value_t = 0, value_name = "US")]
    prefill_us_per_token: u64,
    /// How `/metrics` answers: normal (vLLM names, real state), garbage
    /// (200, not Prometheus text), missing (404) or hang (never answers).
    #[arg(long, value_enum, default_value = "normal")]
    metrics_mode: state::MetricsMode,
}

/// Counts a connection as closed when its task ends (normally or not).
struct ConnGuard(Arc<State>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_closed
            .fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("mock-engine: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), BoxError> {
    if let Some(rate) = cli.error_rate {
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!("--error-rate must be within 0.0..=1.0, got {rate}").into());
        }
    }
    if cli.max_running == Some(0) {
        return Err("--max-running must be at least 1".into());
    }
    if cli.prefix_cache_tokens > 0 && cli.prefix_cache_tokens < kvcache::BLOCK_TOKENS {
        return Err(format!(
            "--prefix-cache-tokens must be 0 (off) or at least one block ({} tokens)",
            kvcache::BLOCK_TOKENS
        )
        .into());
    }
    if let Some(code) = cli.fail_status {
        if hyper::StatusCode::from_u16(code).is_err() {
            return Err(format!("--fail-status {code} is not a valid HTTP status").into());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    let res = rt.block_on(serve(cli));
    rt.shutdown_timeout(Duration::from_millis(200));
    res
}

async fn shutdown_signal() -> Result<(), BoxError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received, exiting"),
        r = tokio::signal::ctrl_c() => {
            r?;
            log::info!("SIGINT received, exiting");
        }
    }
    Ok(())
}

async fn serve(cli: Cli) -> Result<(), BoxError> {
    let listener = TcpListener::bind(&cli.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addr}")?;
        out.flush()?;
    }
    let name = cli.name.clone().unwrap_or_else(|| addr.to_string());
    let instance = HeaderValue::from_str(&name).map_err(|e| format!("bad --name: {e}"))?;
    let models = if cli.models.is_empty() {
        vec!["mock-model".to_owned()]
    } else {
        cli.models.clone()
    };
    let cfg = Config {
        instance,
        ttft: Duration::from_millis(cli.ttft_ms),
        token_interval: Duration::from_millis(cli.token_interval_ms),
        tokens: cli.tokens,
        fail_status: cli.fail_status,
        error_rate: cli.error_rate,
        drop_after_chunks: cli.drop_after_chunks,
        hang: cli.hang,
        flat_errors: cli.flat_errors,
        start_unix: tokens::unix_now(),
        prefill_per_token: Duration::from_micros(cli.prefill_us_per_token),
        metrics_mode: cli.metrics_mode,
    };
    let engine = Engine {
        max_running: cli.max_running,
        prefix_cache_tokens: cli.prefix_cache_tokens,
    };
    let state = Arc::new(State::new(cfg, models, !cli.unhealthy, cli.seed, engine));
    log::info!(
        "mock-engine {name} listening on {addr} (models {:?}, {} threads, max running {}, prefix cache {} tokens)",
        state
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        cli.threads.max(1),
        cli.max_running
            .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        state.cache().capacity_tokens(),
    );

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = &mut shutdown => return r,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => spawn_connection(state.clone(), stream),
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

fn spawn_connection(state: Arc<State>, stream: TcpStream) {
    state
        .counters
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("set_nodelay failed: {e}");
    }
    tokio::spawn(async move {
        let _guard = ConnGuard(state.clone());
        let svc = service_fn(move |req| {
            let st = state.clone();
            async move {
                let inference = matches!(
                    request::route(req.method(), req.uri().path()),
                    request::Route::Inference(_)
                );
                if inference && st.reset_inference.load(Ordering::Relaxed) {
                    // `POST /mock/fault {"reset": true}`: close the connection
                    // before any response byte, as an engine that crashed
                    st.counters.requests.fetch_add(1, Ordering::Relaxed);
                    return Err::<Response<MockBody>, std::io::Error>(std::io::Error::other(
                        "reset by /mock/fault",
                    ));
                }
                Ok(router::handle(st, req).await)
            }
        });
        let mut builder = http1::Builder::new();
        builder.keep_alive(true);
        if let Err(e) = builder
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
            .await
        {
            log::debug!("connection ended with error: {e}");
        }
    });
}

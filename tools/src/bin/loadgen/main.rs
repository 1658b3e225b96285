//! loadgen: the load generator of the performance ladder (load-tests/ladder.py)
//! for what wrk cannot measure: streaming time to first token, per-chunk
//! delay against the mock engine's send stamps, coalesced chunks, abort
//! propagation, thousands of held-open streams, and fixed-rate latency.
//!
//! One thread (a current-thread Tokio runtime), raw HTTP/1.1 on keep-alive
//! connections; every result is one JSON line on stdout.

mod abort;
mod http;
mod load;
mod sse;
mod stats;
mod stream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::http::{Error, Target};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator for infergate's performance ladder"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Req {
    /// Target URL, http://IP:port/path.
    #[arg(long)]
    url: String,
    /// Request body (JSON).
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body from a file.
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

const STREAM_BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
const CHAT_BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;

impl Req {
    fn build(&self, default_body: &str) -> Result<(Target, Vec<u8>), Error> {
        let target = Target::parse(&self.url)?;
        let body = match (&self.body, &self.body_file) {
            (Some(b), _) => b.clone().into_bytes(),
            (None, Some(f)) => std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?,
            (None, None) => default_body.as_bytes().to_vec(),
        };
        let request = target.post(&body, &self.headers);
        Ok((target, request))
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Streaming requests from N concurrent clients: TTFT, per-chunk delay, coalescing.
    Stream {
        #[command(flatten)]
        req: Req,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Two token chunks in one read count as coalesced when the mock's
        /// stamps are at least this far apart.
        #[arg(long, default_value_t = 1000)]
        coalesce_gap_us: u64,
    },
    /// Hold N streams open (after their first token) until a line on stdin.
    Hold {
        #[command(flatten)]
        req: Req,
        #[arg(long)]
        streams: usize,
        #[arg(long, default_value_t = 256)]
        connect_concurrency: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        ready_timeout: Duration,
    },
    /// Serve as the upstream on --listen and time client abort -> upstream close.
    Abort {
        #[command(flatten)]
        req: Req,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        ready_timeout: Duration,
    },
    /// Non-streaming requests: at a fixed rate (--rate) or closed loop.
    Load {
        #[command(flatten)]
        req: Req,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Requests per second (open loop); without it, closed loop.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        warmup: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<(), Error> {
    let out = match cmd {
        Cmd::Stream {
            req,
            streams,
            duration,
            warmup,
            coalesce_gap_us,
        } => {
            let (target, request) = req.build(STREAM_BODY)?;
            stream::run_stream(stream::StreamOpts {
                target,
                request,
                streams,
                duration,
                warmup,
                coalesce_gap_us,
            })
            .await
        }
        Cmd::Hold {
            req,
            streams,
            connect_concurrency,
            ready_timeout,
        } => {
            let (target, request) = req.build(STREAM_BODY)?;
            return stream::run_hold(stream::HoldOpts {
                target,
                request,
                streams,
                connect_concurrency,
                ready_timeout,
            })
            .await;
        }
        Cmd::Abort {
            req,
            listen,
            count,
            ready_timeout,
        } => {
            let (target, request) = req.build(STREAM_BODY)?;
            abort::run_abort(listen, target, request, count, ready_timeout).await?
        }
        Cmd::Load {
            req,
            connections,
            rate,
            duration,
            warmup,
        } => {
            let (target, request) = req.build(CHAT_BODY)?;
            load::run_load(load::LoadOpts {
                target,
                request,
                connections,
                rate,
                duration,
                warmup,
            })
            .await
        }
    };
    println!("{out}");
    Ok(())
}

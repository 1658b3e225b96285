//! passthrough: the smallest Pingora proxy, the floor of one hop for a
//! Pingora gateway in the performance ladder (load-tests/ladder.py).
//!
//! It forwards every request, unchanged and unread, to one upstream over
//! pooled keep-alive HTTP/1.1 connections and streams the response back. No
//! routing, no filters, no metrics, no access log: whatever infergate costs
//! above this is infergate's own work, not Pingora's.
//!
//! usage: passthrough --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--threads N] [--read-buffer BYTES]
//! Prints `passthrough listening on http://ADDR` once the listener accepts.

/// The same allocator as infergate, so the ladder's gap between the two is
/// infergate's own work, not a difference of allocators.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

#[derive(Parser, Debug)]
#[command(
    name = "passthrough",
    about = "Minimal Pingora pass-through proxy (benchmark floor)"
)]
struct Cli {
    /// Address to listen on (a concrete port).
    #[arg(long)]
    listen: SocketAddr,
    /// The one upstream, host:port.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Read buffer of each client connection in bytes (Pingora's default is
    /// 64 KiB); to price that buffer in the memory-per-stream scenario.
    #[arg(long)]
    read_buffer: Option<usize>,
}

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        // keep pooled upstream connections as infergate does (its default)
        peer.options.idle_timeout = Some(Duration::from_secs(4));
        Ok(Box::new(peer))
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    // as infergate does (src/main.rs)
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let conf = ServerConf {
        threads: cli.threads.max(1),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        Passthrough {
            upstream: cli.upstream,
        },
    );
    let mut listener = ListenerConfig::tcp(cli.listen.to_string());
    if let Some(read) = cli.read_buffer {
        listener = listener.l4_buffer(L4BufferSettings::default().read(read));
    }
    proxy.add_listener(listener);
    server.add_service(proxy);
    let listen = cli.listen;
    std::thread::spawn(move || {
        for _ in 0..600 {
            if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                println!("passthrough listening on http://{listen}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::error!("the listener on {listen} never accepted a connection");
    });
    server.run_forever();
}

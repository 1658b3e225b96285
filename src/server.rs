//! Building and running the Pingora server from a validated config.

use crate::config::Config;
use crate::health::Supervisor;
use crate::proxy::Gateway;
use crate::state::{AppState, Live};
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Port 0 means "any free port": take one from the OS now, so the address
/// can be announced, and keep holding it (bound with `SO_REUSEPORT`, not
/// listening, so it receives no connection) until Pingora's own listener,
/// also `SO_REUSEPORT`, has bound it: the port can never go to another socket
/// in between. A fixed port is probed (bound and released), so a port in use
/// fails the start with a clear error instead of Pingora's retry loop, and
/// keeps its usual exclusive bind.
fn concrete_listen(addr: SocketAddr) -> std::io::Result<(SocketAddr, Option<socket2::Socket>)> {
    if addr.port() != 0 {
        let probe = TcpListener::bind(addr)?;
        return Ok((probe.local_addr()?, None));
    }
    let hold = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    hold.set_reuse_port(true)?;
    hold.bind(&addr.into())?;
    let bound = hold
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the bound address is not an IP address"))?;
    Ok((bound, Some(hold)))
}

/// How `infergate` was started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file (reloads read it again).
    pub config_path: Option<std::path::PathBuf>,
    /// Take the listening sockets over from a running infergate (`--upgrade`):
    /// it hands them over when it gets SIGQUIT.
    pub upgrade: bool,
}

/// Run until SIGTERM/SIGINT/SIGQUIT. Never returns normally (the process exits).
pub fn run(mut config: Config, options: RunOptions) -> Result<(), String> {
    // ports held until Pingora has bound them (port 0), released once listening
    let mut holds = Vec::new();
    // an upgrade takes over sockets that are bound already: no probing
    let mut concrete = |addr: SocketAddr| -> Result<SocketAddr, String> {
        if options.upgrade {
            if addr.port() == 0 {
                return Err(format!(
                    "--upgrade needs fixed ports: {addr} has port 0 (the running gateway's port cannot be known)"
                ));
            }
            return Ok(addr);
        }
        let (bound, hold) =
            concrete_listen(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
        holds.extend(hold.map(|h| (bound, h)));
        Ok(bound)
    };
    let listen = concrete(config.server.listen)?;
    config.server.listen = listen;
    if let Some(admin) = config.server.admin_listen {
        config.server.admin_listen = Some(concrete(admin)?);
    }
    if let Some(metrics) = config.server.metrics_listen {
        let same_as_admin = config.server.admin_listen.filter(|a| *a == metrics);
        let metrics = match same_as_admin {
            Some(a) => a,
            None => concrete(metrics)?,
        };
        config.server.metrics_listen = Some(metrics);
    }
    let admin_listen = config.server.admin_listen;
    let metrics_listen = config
        .server
        .metrics_listen
        .filter(|m| Some(*m) != admin_listen);
    let app = AppState::new(config)?;
    if let Some(auth) = &app.auth {
        crate::state::spawn_keys_watcher(auth, app.metrics.clone())?;
    }
    let conf = ServerConf {
        threads: app.config.server.threads,
        grace_period_seconds: Some(app.config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(app.config.server.grace_period.as_secs().max(1)),
        upgrade_sock: app.config.server.upgrade_sock.clone(),
        work_stealing: app.config.server.work_stealing,
        ..ServerConf::default()
    };
    first_health_checks(&app)?;
    let live = Live::new(app, options.config_path.clone());
    let live_for_signals = live.clone();
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    let server_config = &live.current().config.server;
    let max_connections = server_config.max_connections.unwrap_or_else(|| {
        crate::proxy::connections::default_max_connections(server_config.connection_reserve)
    });
    let metrics = live.current().metrics.clone();
    let limit = std::sync::Arc::new(crate::proxy::connections::ConnectionLimit::new(
        max_connections,
        metrics.connections_open.clone(),
        metrics.connections_rejected.clone(),
    ));
    log::info!(
        "server.listen takes up to {max_connections} client connections (fd limit {}, reserve {})",
        crate::proxy::connections::soft_fd_limit()
            .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
        server_config.connection_reserve
    );
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        Gateway::new(live.clone(), Some(limit.clone())),
    );
    proxy.set_connection_filter(limit);
    let held: Vec<SocketAddr> = holds.iter().map(|(addr, _)| *addr).collect();
    // No L4 read buffer on the client side (Pingora's default is 64 KiB per connection):
    // Pingora reads the socket straight into its request header and body buffers, so an idle
    // stream does not hold a buffer it never uses. There is no TLS listener, whose 16 KiB
    // record reads are what that buffer is for. docs/performance.md.
    let add = |service: &mut pingora_core::services::listening::Service<_>, addr: SocketAddr| {
        let mut endpoint =
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::default().read(0));
        if held.contains(&addr) {
            let mut options = pingora_core::listeners::TcpSocketOptions::default();
            options.so_reuseport = Some(true);
            endpoint = endpoint.tcp_socket_options(options);
        }
        service.add_listener(endpoint);
    };
    add(&mut proxy, listen);
    server.add_service(proxy);
    // the side listeners (admin, metrics) are not counted against
    // max_connections: they stay reachable when the main listener is full
    if admin_listen.is_some() || metrics_listen.is_some() {
        let mut side = pingora_proxy::http_proxy_service(
            &server.configuration,
            Gateway::new(live.clone(), None),
        );
        for addr in admin_listen.iter().chain(metrics_listen.iter()) {
            add(&mut side, *addr);
        }
        server.add_service(side);
    }
    let engines_stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    server.add_service(background_service(
        "engine manager",
        EngineManager {
            engines: live.current().engines.clone(),
            stopped: engines_stopped.clone(),
        },
    ));
    server.add_service(background_service(
        "gpu monitor",
        GpuPoller {
            gpu: live.current().gpu.clone(),
        },
    ));
    server.add_service(background_service(
        "limits warnings",
        LimitsWarnings { live: live.clone() },
    ));
    server.add_service(background_service(
        "config reloader",
        crate::reload::Reloader { live: live.clone() },
    ));
    watch_for_handover(&server, live.clone())?;
    exit_when_idle(&server, live.clone(), engines_stopped)?;
    server.add_service(background_service("pool supervisor", Supervisor { live }));
    // the main listener's line first: scripts read the first line
    let mut announce = vec![(listen, "")];
    announce.extend(admin_listen.map(|a| (a, "admin ")));
    announce.extend(metrics_listen.map(|a| (a, "metrics ")));
    announce_when_listening(announce, holds);
    server.run(pingora_core::server::RunArgs {
        shutdown_signal: Box::new(Signals {
            live: live_for_signals,
        }),
    });
    std::process::exit(0)
}

/// Quota-store write failures and the like, reported off the request path
/// every 2 s; follows reloads, stops with the server.
struct LimitsWarnings {
    live: std::sync::Arc<Live>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for LimitsWarnings {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Some(limits) = self.live.current().limits.clone() {
                for warning in limits.take_warnings() {
                    log::warn!("limits: {warning}");
                }
            }
        }
    }
}

/// GPU state through NVML, read every few seconds until shutdown.
struct GpuPoller {
    gpu: std::sync::Arc<crate::gpu::GpuMonitor>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for GpuPoller {
    async fn start(&self, shutdown: pingora_core::server::ShutdownWatch) {
        self.gpu.poll(shutdown).await;
    }
}

/// The engine manager (start, watch, unload, stop at exit), noting when it
/// has stopped every engine so an idle shutdown may end the process.
struct EngineManager {
    engines: std::sync::Arc<crate::engines::Engines>,
    stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for EngineManager {
    async fn start(&self, shutdown: pingora_core::server::ShutdownWatch) {
        self.engines.clone().supervise(shutdown).await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Pingora's Unix signals, with `server.drain_delay` before a SIGTERM stops
/// the listeners: meanwhile `/health/ready` answers 503 and every response
/// says `Connection: close`, so load balancers and clients move away while
/// requests are still served.
struct Signals {
    live: std::sync::Arc<Live>,
}

#[async_trait::async_trait]
impl pingora_core::server::ShutdownSignalWatch for Signals {
    async fn recv(&self) -> pingora_core::server::ShutdownSignal {
        use pingora_core::server::ShutdownSignal;
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install the signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = term.recv() => {
                let app = self.live.current();
                let delay = app.config.server.drain_delay;
                if delay.is_zero() {
                    return ShutdownSignal::GracefulTerminate;
                }
                log::info!(
                    "SIGTERM: readiness 503 and Connection: close for {} s (server.drain_delay) before draining",
                    delay.as_secs_f64()
                );
                self.live
                    .closing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                app.start_draining(delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => ShutdownSignal::GracefulTerminate,
                    _ = int.recv() => ShutdownSignal::FastShutdown,
                }
            }
        }
    }
}

/// How long after the listeners stop a graceful shutdown waits at least
/// before it may end early: a request already on its way when they stopped
/// is still read for up to 1 s (vendor/README.md, patch 2).
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(1500);

/// Pingora sleeps the whole grace period after a graceful shutdown (SIGTERM,
/// or the end of an upgrade's handover) starts, even with nothing to wait
/// for. End the process as soon as no request is in flight (streams and
/// WebSocket tunnels included) and the engines are stopped; the grace
/// period stays the upper bound.
fn exit_when_idle(
    server: &Server,
    live: std::sync::Arc<Live>,
    engines_stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    use pingora_core::server::ExecutionPhase;
    use std::sync::atomic::Ordering;
    let mut phases = server.watch_execution_phase();
    std::thread::Builder::new()
        .name("exit-when-idle".into())
        .spawn(move || {
            loop {
                match phases.blocking_recv() {
                    Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
            let started = std::time::Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(20));
                if started.elapsed() < SHUTDOWN_SETTLE {
                    continue;
                }
                let app = live.current();
                if app.metrics.http_active.get() > 0 || !engines_stopped.load(Ordering::Acquire) {
                    continue;
                }
                log::info!(
                    "graceful shutdown: nothing in flight {} ms after the listeners stopped; exiting",
                    started.elapsed().as_millis()
                );
                app.access_log.flush_before_exit(Duration::from_secs(2));
                crate::logging::flush_before_exit(Duration::from_secs(1));
                std::process::exit(0);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the idle-exit watch: {e}"))
}

/// From the moment an upgrade starts handing the listeners over (SIGQUIT) or
/// a shutdown starts, answer every request with `Connection: close`. Pingora
/// keeps this process accepting for 5 s after the handover and then closes
/// idle keep-alive connections; a client that reused one just then would see
/// a reset. Closing each connection after its response moves the clients to
/// new connections (which the new process accepts) before that.
fn watch_for_handover(server: &Server, live: std::sync::Arc<Live>) -> Result<(), String> {
    use pingora_core::server::ExecutionPhase;
    let mut phases = server.watch_execution_phase();
    std::thread::Builder::new()
        .name("handover-watch".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout
                    | ExecutionPhase::GracefulTerminate
                    | ExecutionPhase::ShutdownStarted,
                ) => {
                    live.closing
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    log::info!("closing client connections after their current response");
                    return;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the handover watch: {e}"))
}

/// One round of health checks before the listeners open, so the first
/// requests (after a start, or right after an upgrade's socket handover)
/// find their backends already checked instead of getting 503s. Bounded by
/// each pool's health-check timeout.
fn first_health_checks(app: &AppState) -> Result<(), String> {
    if app.router.pools().is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the first health checks: {e}"))?;
    runtime.block_on(async {
        for pool in app.router.pools() {
            if let Err(e) = pool.warm_up().await {
                log::error!("pool {}: loading backends failed: {e}", pool.name());
                continue;
            }
            log::info!(
                "pool {}: {}/{} backends healthy after the first check",
                pool.name(),
                pool.healthy_count(),
                pool.backend_states().len()
            );
        }
    });
    Ok(())
}

/// Print the ready line once the listener accepts connections, so tests and
/// scripts learn readiness (and a port-0 address) from the process itself.
fn announce_when_listening(
    listeners: Vec<(SocketAddr, &'static str)>,
    holds: Vec<(SocketAddr, socket2::Socket)>,
) {
    std::thread::spawn(move || {
        // Pingora's listeners accept: the held ports may go now
        let _holds = holds;
        'next: for (addr, what) in listeners {
            for _ in 0..600 {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    println!("infergate {what}listening on http://{addr}");
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    continue 'next;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            log::error!("the listener on {addr} never accepted a connection");
        }
    });
}

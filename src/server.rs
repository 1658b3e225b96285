//! Building and running the Pingora server from a validated config.

use crate::config::Config;
use crate::health::Supervisor;
use crate::proxy::Gateway;
use crate::state::AppState;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Port 0 means "any free port": reserve one from the OS now, so the address
/// can be announced. (Pingora binds its own socket; the gap between releasing
/// ours and its bind is microseconds.)
fn concrete_listen(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = TcpListener::bind(addr)?;
    probe.local_addr()
}

/// Run until SIGTERM/SIGINT. Never returns normally (Pingora exits the process).
pub fn run(mut config: Config) -> Result<(), String> {
    let listen = concrete_listen(config.server.listen)
        .map_err(|e| format!("cannot bind {}: {e}", config.server.listen))?;
    if let Some(admin) = config.server.admin_listen {
        let admin = concrete_listen(admin).map_err(|e| format!("cannot bind {admin}: {e}"))?;
        config.server.admin_listen = Some(admin);
    }
    if let Some(metrics) = config.server.metrics_listen {
        let same_as_admin = config.server.admin_listen.filter(|a| *a == metrics);
        let metrics = match same_as_admin {
            Some(a) => a,
            None => concrete_listen(metrics).map_err(|e| format!("cannot bind {metrics}: {e}"))?,
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
        if auth.config().watch {
            let watcher_app = app.clone();
            auth.spawn_watcher(Box::new(move |outcome| {
                let result = if outcome.is_ok() {
                    "success"
                } else {
                    "failure"
                };
                watcher_app
                    .metrics
                    .config_reloads
                    .with_label_values(&["keys", result])
                    .inc();
                match outcome {
                    Ok(report) => {
                        log::info!(
                            "keys/users files changed: reloaded {} keys, {} users",
                            report.keys,
                            report.users
                        );
                        for warning in &report.warnings {
                            log::warn!("{warning}");
                        }
                    }
                    Err(reason) => {
                        log::error!(
                        "keys/users files changed but reloading failed, nothing changed: {reason}"
                    )
                    }
                }
            }))?;
        }
    }
    let conf = ServerConf {
        threads: app.config.server.threads,
        grace_period_seconds: Some(app.config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(app.config.server.grace_period.as_secs().max(1)),
        ..ServerConf::default()
    };
    if let Some(limits) = app.limits.clone() {
        // quota-store write failures and the like, reported off the request path
        std::thread::Builder::new()
            .name("limits-warnings".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(2));
                for warning in limits.take_warnings() {
                    log::warn!("limits: {warning}");
                }
            })
            .map_err(|e| format!("cannot start the limits warning thread: {e}"))?;
    }
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let mut proxy =
        pingora_proxy::http_proxy_service(&server.configuration, Gateway { app: app.clone() });
    proxy.add_tcp(&listen.to_string());
    for side in admin_listen.iter().chain(metrics_listen.iter()) {
        proxy.add_tcp(&side.to_string());
    }
    server.add_service(proxy);
    if !app.engines.is_empty() {
        server.add_service(background_service(
            "engine manager",
            crate::engines::EngineService {
                engines: app.engines.clone(),
            },
        ));
    }
    server.add_service(background_service("pool supervisor", Supervisor { app }));
    // the main listener's line first: scripts read the first line
    let mut announce = vec![(listen, "")];
    announce.extend(admin_listen.map(|a| (a, "admin ")));
    announce.extend(metrics_listen.map(|a| (a, "metrics ")));
    announce_when_listening(announce);
    server.run_forever();
}

/// Print the ready line once the listener accepts connections, so tests and
/// scripts learn readiness (and a port-0 address) from the process itself.
fn announce_when_listening(listeners: Vec<(SocketAddr, &'static str)>) {
    std::thread::spawn(move || {
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

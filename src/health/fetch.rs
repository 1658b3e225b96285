//! One small HTTP GET to a backend, for the background services (model
//! discovery, engine metrics): bounded in time and size, on the gateway's
//! pooled upstream connector, and the connection goes back to the pool.

use pingora_core::connectors::http::v1::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;

/// How long a fetched connection may idle in the pool.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The background services' own connection pool, apart from the proxy's
/// (a scrape every 250 ms must not take or race for request connections).
pub fn connector() -> &'static Connector {
    static CONNECTOR: std::sync::OnceLock<Connector> = std::sync::OnceLock::new();
    CONNECTOR.get_or_init(|| Connector::new(None))
}

/// `GET path` on `address`: the body of a 200 answer, or why not.
pub async fn get(
    connector: &Connector,
    address: SocketAddr,
    path: &str,
    limit: Duration,
    max_body: usize,
) -> Result<Vec<u8>, String> {
    let work = async {
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout = Some(limit);
        peer.options.idle_timeout = Some(KEEPALIVE);
        let (mut session, _) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| e.to_string())?;
        let mut req =
            RequestHeader::build("GET", path.as_bytes(), None).map_err(|e| e.to_string())?;
        req.insert_header("host", address.to_string())
            .map_err(|e| e.to_string())?;
        req.insert_header("user-agent", "infergate")
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| e.to_string())?;
        session.finish_body().await.map_err(|e| e.to_string())?;
        session.read_response().await.map_err(|e| e.to_string())?;
        let status = session.get_status().map(|s| s.as_u16());
        let mut body = Vec::new();
        while let Some(chunk) = session.read_body_bytes().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > max_body {
                return Err(format!("answer larger than {max_body} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        if status != Some(200) {
            return Err(format!("status {}", status.unwrap_or(0)));
        }
        if session.is_body_done() {
            connector
                .release_http_session(session, &peer, Some(KEEPALIVE))
                .await;
        }
        Ok(body)
    };
    timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {} ms", limit.as_millis()))?
}

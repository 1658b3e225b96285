//! One small HTTP exchange with an engine for the gateway's own purposes
//! (model discovery, engine metrics, a managed engine's readiness probe and
//! LoRA calls): bounded in time and size, on a connection pool of its own
//! (not the proxy's), and the connection goes back to the pool. The one
//! HTTP client of the background work; requests use `proxy::forward`.

use pingora_core::connectors::http::v1::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;

/// Why a fetch got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: Box<pingora_error::Error>,
    },
    #[error("cannot build the request to {address}: {source}")]
    Request {
        address: SocketAddr,
        source: Box<pingora_error::Error>,
    },
    #[error("writing to {address} failed: {source}")]
    Write {
        address: SocketAddr,
        source: Box<pingora_error::Error>,
    },
    #[error("reading the answer of {address} failed: {source}")]
    Read {
        address: SocketAddr,
        source: Box<pingora_error::Error>,
    },
    #[error("the answer of {address} is larger than {max_body} bytes")]
    TooLarge {
        address: SocketAddr,
        max_body: usize,
    },
    #[error("no answer from {address} within {} ms", .limit.as_millis())]
    Timeout {
        address: SocketAddr,
        limit: Duration,
    },
    /// Only from [`get`]: an answer other than 200.
    #[error("status {status}")]
    Status { status: u16 },
}

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
    address: SocketAddr,
    path: &str,
    limit: Duration,
    max_body: usize,
) -> Result<Vec<u8>, FetchError> {
    match exchange("GET", address, path, None, limit, max_body).await? {
        (200, body) => Ok(body),
        (status, _) => Err(FetchError::Status { status }),
    }
}

/// `method path` on `address` with an optional JSON `body`: the answer's
/// status and body (at most `max_body` bytes), or why there was none.
pub async fn exchange(
    method: &str,
    address: SocketAddr,
    path: &str,
    body: Option<&[u8]>,
    limit: Duration,
    max_body: usize,
) -> Result<(u16, Vec<u8>), FetchError> {
    let connect = |source| FetchError::Connect { address, source };
    let request = |source| FetchError::Request { address, source };
    let write = |source| FetchError::Write { address, source };
    let read = |source| FetchError::Read { address, source };
    let work = async {
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout = Some(limit);
        peer.options.idle_timeout = Some(KEEPALIVE);
        let connector = connector();
        let (mut session, _) = connector.get_http_session(&peer).await.map_err(connect)?;
        let mut req = RequestHeader::build(method, path.as_bytes(), None).map_err(request)?;
        let header = |req: &mut RequestHeader, name: &'static str, value: String| {
            req.insert_header(name, value).map_err(request)
        };
        header(&mut req, "host", address.to_string())?;
        header(&mut req, "user-agent", "infergate".to_string())?;
        if let Some(body) = body {
            header(&mut req, "content-type", "application/json".to_string())?;
            header(&mut req, "content-length", body.len().to_string())?;
        }
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(write)?;
        if let Some(body) = body {
            session.write_body(body).await.map_err(write)?;
        }
        session.finish_body().await.map_err(write)?;
        session.read_response().await.map_err(read)?;
        let status = session.get_status().map_or(0, |s| s.as_u16());
        let mut answer = Vec::new();
        while let Some(chunk) = session.read_body_bytes().await.map_err(read)? {
            if answer.len() + chunk.len() > max_body {
                return Err(FetchError::TooLarge { address, max_body });
            }
            answer.extend_from_slice(&chunk);
        }
        if session.is_body_done() {
            connector
                .release_http_session(session, &peer, Some(KEEPALIVE))
                .await;
        }
        Ok((status, answer))
    };
    timeout(limit, work)
        .await
        .map_err(|_| FetchError::Timeout { address, limit })?
}

//! A minimal HTTP/1.1 client over a raw `TcpStream`: it writes one prebuilt
//! request and parses the response incrementally, so the caller sees every
//! `read(2)` boundary with its own timestamp (what proves or disproves that a
//! proxy coalesced two chunks into one delivery).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `http://host:port/path` split into the address to connect to and the path.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .parse::<SocketAddr>()
            .map_err(|e| format!("{url}: the host must be IP:port ({e})"))?;
        Ok(Target {
            addr,
            host: host.to_owned(),
            path: path.to_owned(),
        })
    }

    /// A POST with a JSON body and extra header lines (`Name: value`).
    pub fn post(&self, body: &[u8], headers: &[String]) -> Vec<u8> {
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.path,
            self.host,
            body.len()
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

pub async fn connect(addr: SocketAddr) -> Result<TcpStream, Error> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Head,
    /// Content-Length body with this many bytes left.
    Length(usize),
    /// Chunked: expecting a size line.
    ChunkSize,
    /// Chunked: this many data bytes left in the current chunk.
    ChunkData(usize),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// After the zero-size chunk: trailers up to the empty line.
    Trailer,
    /// Read until the peer closes (no length, not chunked).
    UntilClose,
    Done,
}

/// Incremental response parser: feed it bytes as they are read, get body
/// bytes back through a callback.
pub struct Response {
    phase: Phase,
    buf: Vec<u8>,
    pub status: u16,
    pub keep_alive: bool,
}

impl Default for Response {
    fn default() -> Self {
        Self::new()
    }
}

impl Response {
    pub fn new() -> Self {
        Response {
            phase: Phase::Head,
            buf: Vec::with_capacity(4096),
            status: 0,
            keep_alive: true,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Feed newly read bytes (`None` = the peer closed); `on_body` gets body
    /// bytes in order. Errors on a malformed response or an early close.
    pub fn feed(
        &mut self,
        data: Option<&[u8]>,
        on_body: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        let Some(data) = data else {
            if self.phase == Phase::UntilClose {
                self.phase = Phase::Done;
                return Ok(());
            }
            return Err(format!("connection closed mid-response ({:?})", self.phase).into());
        };
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            match self.phase {
                Phase::Done => break,
                Phase::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        break;
                    };
                    let head = rest[..end].to_vec();
                    self.parse_head(&head)?;
                    pos += end + 4;
                }
                Phase::Length(0) => self.phase = Phase::Done,
                Phase::Length(n) => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = n.min(rest.len());
                    on_body(&rest[..take]);
                    pos += take;
                    self.phase = Phase::Length(n - take);
                }
                Phase::UntilClose => {
                    on_body(rest);
                    pos += rest.len();
                    break;
                }
                Phase::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&rest[..end])?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16)
                        .map_err(|e| format!("bad chunk size {hex:?}: {e}"))?;
                    pos += end + 2;
                    self.phase = if size == 0 {
                        Phase::Trailer
                    } else {
                        Phase::ChunkData(size)
                    };
                }
                Phase::ChunkData(n) => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = n.min(rest.len());
                    on_body(&rest[..take]);
                    pos += take;
                    self.phase = if take == n {
                        Phase::ChunkEnd
                    } else {
                        Phase::ChunkData(n - take)
                    };
                }
                Phase::ChunkEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    pos += 2;
                    self.phase = Phase::ChunkSize;
                }
                Phase::Trailer => {
                    let Some(end) = find(rest, b"\r\n") else {
                        break;
                    };
                    pos += end + 2;
                    if end == 0 {
                        self.phase = Phase::Done;
                    }
                }
            }
        }
        self.buf.drain(..pos);
        Ok(())
    }

    fn parse_head(&mut self, head: &[u8]) -> Result<(), Error> {
        let text = std::str::from_utf8(head)?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        self.status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                self.keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }
        self.phase = if chunked {
            Phase::ChunkSize
        } else if let Some(n) = length {
            Phase::Length(n)
        } else if self.status == 204 || self.status == 304 || self.status / 100 == 1 {
            Phase::Done
        } else {
            self.keep_alive = false;
            Phase::UntilClose
        };
        Ok(())
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Write `req` and read one whole response, discarding the body. Returns the
/// status and whether the connection may be reused.
pub async fn roundtrip(
    stream: &mut TcpStream,
    req: &[u8],
    buf: &mut [u8],
) -> Result<(u16, bool), Error> {
    stream.write_all(req).await?;
    let mut resp = Response::new();
    while !resp.is_done() {
        let n = stream.read(buf).await?;
        let data = if n == 0 { None } else { Some(&buf[..n]) };
        resp.feed(data, &mut |_| {})?;
        if n == 0 && !resp.is_done() {
            return Err("connection closed".into());
        }
    }
    Ok((resp.status, resp.keep_alive))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_split_anywhere() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut r = Response::new();
            let mut body = Vec::new();
            r.feed(Some(&wire[..split]), &mut |b| body.extend_from_slice(b))
                .unwrap();
            r.feed(Some(&wire[split..]), &mut |b| body.extend_from_slice(b))
                .unwrap();
            assert!(r.is_done(), "split {split}");
            assert_eq!(body, b"hello world");
            assert_eq!(r.status, 200);
        }
    }

    #[test]
    fn content_length_and_close() {
        let mut r = Response::new();
        let mut body = Vec::new();
        r.feed(
            Some(b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc"),
            &mut |b| body.extend_from_slice(b),
        )
        .unwrap();
        assert!(r.is_done());
        assert!(!r.keep_alive);
        assert_eq!((r.status, &body[..]), (404, &b"abc"[..]));
        let mut r = Response::new();
        r.feed(Some(b"HTTP/1.1 200 OK\r\n\r\nxy"), &mut |_| {})
            .unwrap();
        assert!(!r.is_done());
        r.feed(None, &mut |_| {}).unwrap();
        assert!(r.is_done());
    }

    #[test]
    fn targets_parse() {
        let t = Target::parse("http://127.0.0.1:8080/v1/chat/completions").unwrap();
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert!(Target::parse("https://x/").is_err());
    }
}

//! Token usage as the engine reports it, read off the response on its way to
//! the client without delaying it.
//!
//! - Non-streaming JSON: `usage` of the body (kept whole up to 1 MiB; past
//!   that the tail is searched for the last `"usage"` key).
//! - SSE: `usage` of the chunk that carries one (OpenAI sends it in a final
//!   chunk whose `choices` is empty when `stream_options.include_usage`).
//!   When the gateway added `include_usage` itself, that usage-only chunk is
//!   removed, so the client receives exactly the events it would have got.
//!   Content chunks are counted, to estimate completion tokens when the
//!   stream ends without usage (client disconnect).
//!
//! Pure: bytes in, bytes out; the proxy feeds it chunks.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Tokens one request used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct TokenCounts {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

const JSON_KEEP: usize = 1 << 20;
const TAIL_KEEP: usize = 16 << 10;
/// An SSE event longer than this is passed through without being inspected.
const EVENT_KEEP: usize = 1 << 20;

pub struct UsageTap {
    mode: Mode,
    usage: Option<TokenCounts>,
    /// SSE events carrying a delta (≈ tokens for engines that stream one token per event).
    content_events: u64,
}

enum Mode {
    Json { buf: Vec<u8>, overflowed: bool },
    Sse { pending: BytesMut, strip: bool },
    Off,
}

impl UsageTap {
    /// A tap for a non-streaming JSON response.
    pub fn json() -> Self {
        UsageTap::with(Mode::Json {
            buf: Vec::new(),
            overflowed: false,
        })
    }

    /// A tap for an SSE response; `strip_usage_chunk` when the gateway added
    /// `include_usage` and the client must not see the usage-only chunk.
    pub fn sse(strip_usage_chunk: bool) -> Self {
        UsageTap::with(Mode::Sse {
            pending: BytesMut::new(),
            strip: strip_usage_chunk,
        })
    }

    /// A tap that looks at nothing (responses that are neither).
    pub fn off() -> Self {
        UsageTap::with(Mode::Off)
    }

    fn with(mode: Mode) -> Self {
        UsageTap {
            mode,
            usage: None,
            content_events: 0,
        }
    }

    /// Look at one chunk; returns what to send to the client (the chunk
    /// itself unless a usage-only chunk is being removed).
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.mode {
            Mode::Off => chunk,
            Mode::Json { buf, overflowed } => {
                buf.extend_from_slice(&chunk);
                if buf.len() > JSON_KEEP {
                    *overflowed = true;
                    let cut = buf.len() - TAIL_KEEP;
                    buf.drain(..cut);
                }
                chunk
            }
            Mode::Sse { pending, strip } => {
                let strip = *strip;
                if !strip {
                    // pass the chunk through as is; inspect complete events
                    pending.extend_from_slice(&chunk);
                    let mut found = None;
                    let mut content = 0;
                    while let Some(end) = event_end(pending) {
                        let event = pending.split_to(end);
                        inspect_event(&event, &mut found, &mut content);
                    }
                    if pending.len() > EVENT_KEEP {
                        pending.clear();
                    }
                    self.content_events += content;
                    if found.is_some() {
                        self.usage = found;
                    }
                    return chunk;
                }
                if pending.is_empty() && !contains(&chunk, b"\"usage\"") {
                    // the common case: whole events without usage
                    if let Some(end) = last_event_end(&chunk) {
                        self.content_events += count_content(&chunk[..end]);
                        pending.extend_from_slice(&chunk[end..]);
                        return chunk.slice(..end);
                    }
                }
                pending.extend_from_slice(&chunk);
                let mut out = BytesMut::new();
                let mut found = None;
                let mut content = 0;
                while let Some(end) = event_end(pending) {
                    let event = pending.split_to(end);
                    if inspect_event(&event, &mut found, &mut content) == Kind::UsageOnly {
                        continue; // the client did not ask for it
                    }
                    out.extend_from_slice(&event);
                }
                if pending.len() > EVENT_KEEP {
                    // not an event stream we understand: stop holding bytes back
                    out.extend_from_slice(pending);
                    pending.clear();
                }
                self.content_events += content;
                if found.is_some() {
                    self.usage = found;
                }
                out.freeze()
            }
        }
    }

    /// Bytes still held back when the engine's body ended (an unterminated
    /// last event): the client gets them as they were.
    pub fn flush(&mut self) -> Option<Bytes> {
        match &mut self.mode {
            Mode::Sse {
                pending,
                strip: true,
            } if !pending.is_empty() => Some(pending.split().freeze()),
            _ => None,
        }
    }

    /// The usage the engine reported, if it did.
    pub fn usage(&mut self) -> Option<TokenCounts> {
        if let Mode::Json { buf, overflowed } = &mut self.mode {
            if self.usage.is_none() && !buf.is_empty() {
                self.usage = if *overflowed {
                    usage_in_tail(buf)
                } else {
                    usage_in_body(buf).or_else(|| usage_in_tail(buf))
                };
                buf.clear();
            }
        }
        self.usage
    }

    /// Content events seen so far (an estimate of completion tokens).
    pub fn content_events(&self) -> u64 {
        self.content_events
    }
}

#[derive(PartialEq, Eq)]
enum Kind {
    Other,
    UsageOnly,
}

/// Read one complete SSE event: note usage and content.
fn inspect_event(event: &[u8], found: &mut Option<TokenCounts>, content: &mut u64) -> Kind {
    if !contains(event, b"\"usage\"") {
        *content += count_content(event);
        return Kind::Other;
    }
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        usage: Option<TokenCounts>,
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    let Some(data) = event_data(event) else {
        return Kind::Other;
    };
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
        return Kind::Other;
    };
    let has_choices = chunk.choices.as_ref().is_some_and(|c| !c.is_empty());
    if has_choices {
        *content += 1;
    }
    match chunk.usage {
        Some(usage) => {
            *found = Some(usage);
            if has_choices {
                Kind::Other
            } else {
                Kind::UsageOnly
            }
        }
        None => Kind::Other,
    }
}

/// Events with a delta in them (one per streamed token on vLLM and friends).
fn count_content(events: &[u8]) -> u64 {
    let mut n = 0;
    let mut rest = events;
    while let Some(at) = find(rest, b"\"delta\"").or_else(|| find(rest, b"\"text\"")) {
        n += 1;
        // one per event: skip to the end of this event
        let after = &rest[at..];
        match event_end(after) {
            Some(end) => rest = &after[end..],
            None => break,
        }
    }
    n
}

/// The `data:` payload of a one-line-data event.
fn event_data(event: &[u8]) -> Option<&[u8]> {
    let text = event.trim_ascii();
    for line in text.split(|&b| b == b'\n' || b == b'\r') {
        let line = line.trim_ascii();
        if let Some(rest) = line.strip_prefix(b"data:") {
            return Some(rest.trim_ascii());
        }
    }
    None
}

/// End (exclusive) of the first complete event: after a blank line. Lines
/// end in CRLF, LF or CR, mixed as the SSE spec allows (`\r\n\n`, `\n\r\n`
/// and `\r\r` end an event too). A CR at the very end is taken as a whole
/// line ending: if an LF follows in the next chunk, it reads as an empty
/// line, which SSE ignores.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = true;
    while i < buf.len() {
        match buf[i] {
            b'\n' | b'\r' => {
                let len = if buf[i] == b'\r' && buf.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                if line_start {
                    return Some(i + len);
                }
                line_start = true;
                i += len;
            }
            _ => {
                line_start = false;
                i += 1;
            }
        }
    }
    None
}

/// End (exclusive) of the last complete event in `buf`.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut end = None;
    let mut at = 0;
    while let Some(next) = event_end(&buf[at..]) {
        at += next;
        end = Some(at);
    }
    end
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn usage_in_body(body: &[u8]) -> Option<TokenCounts> {
    #[derive(Deserialize)]
    struct Body {
        usage: Option<TokenCounts>,
    }
    serde_json::from_slice::<Body>(body).ok()?.usage
}

/// The value after the last `"usage"` key, for bodies too large to keep.
fn usage_in_tail(tail: &[u8]) -> Option<TokenCounts> {
    let at = rfind(tail, b"\"usage\"")?;
    let rest = tail[at + 7..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<TokenCounts>();
    values.next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn feed(tap: &mut UsageTap, chunks: &[&str]) -> String {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(c.as_bytes())));
        }
        if let Some(rest) = tap.flush() {
            out.extend_from_slice(&rest);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn json_usage_is_read() {
        let mut tap = UsageTap::json();
        let body = r#"{"id":"x","choices":[{"message":{"content":"\"usage\""}}],"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}"#;
        let (a, b) = body.split_at(40);
        feed(&mut tap, &[a, b]);
        assert_eq!(
            tap.usage(),
            Some(TokenCounts {
                prompt_tokens: 12,
                completion_tokens: 4
            })
        );
    }

    #[test]
    fn huge_json_usage_is_found_in_the_tail() {
        let mut tap = UsageTap::json();
        let filler = "x".repeat(3 << 20);
        let body =
            format!(r#"{{"data":["{filler}"],"usage":{{"prompt_tokens":9,"total_tokens":9}}}}"#);
        for piece in body.as_bytes().chunks(64 << 10) {
            tap.on_chunk(Bytes::copy_from_slice(piece));
        }
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(9));
    }

    #[test]
    fn sse_usage_chunk_is_removed_when_the_gateway_asked_for_it() {
        let mut tap = UsageTap::sse(true);
        let out = feed(&mut tap, &[CONTENT, CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{CONTENT}{DONE}"));
        assert_eq!(tap.usage().map(|u| u.completion_tokens), Some(3));
        assert_eq!(tap.content_events(), 2);
    }

    #[test]
    fn sse_passes_everything_when_the_client_asked_for_usage() {
        let mut tap = UsageTap::sse(false);
        let out = feed(&mut tap, &[CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{USAGE}{DONE}"));
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(5));
    }

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let mut tap = UsageTap::sse(true);
        let all = format!("{CONTENT}{USAGE}{DONE}");
        let bytes = all.as_bytes();
        let mut out = Vec::new();
        for piece in bytes.chunks(7) {
            out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(piece)));
        }
        assert_eq!(String::from_utf8_lossy(&out), format!("{CONTENT}{DONE}"));
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(5));
        // passive mode sees the same usage from the same pieces
        let mut passive = UsageTap::sse(false);
        for piece in bytes.chunks(7) {
            passive.on_chunk(Bytes::copy_from_slice(piece));
        }
        assert_eq!(passive.usage().map(|u| u.prompt_tokens), Some(5));
    }

    #[test]
    fn mixed_and_cr_line_endings_end_events_too() {
        // found by the fuzz target sse_usage: `\r\n\n` and `\r`-only endings
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let content = r#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
        for (a, b) in [("\r\n\n", "\n\r\n"), ("\r\r", "\r\r"), ("\n\n", "\r\n\r\n")] {
            let mut tap = UsageTap::sse(true);
            let stream = format!("{content}{a}{usage}{b}data: [DONE]{a}");
            let out = feed(&mut tap, &[&stream[..10], &stream[10..]]);
            assert_eq!(out, format!("{content}{a}data: [DONE]{a}"), "{a:?} {b:?}");
            assert_eq!(tap.usage().map(|u| u.completion_tokens), Some(4));
            assert_eq!(tap.content_events(), 1);
        }
    }

    #[test]
    fn unterminated_tail_is_flushed_unchanged() {
        let mut tap = UsageTap::sse(true);
        let out = feed(&mut tap, &[CONTENT, "data: {\"partial\""]);
        assert_eq!(out, format!("{CONTENT}data: {{\"partial\""));
    }

    #[test]
    fn usage_on_a_content_chunk_is_kept_visible() {
        // some engines put usage on the last content chunk: never drop content
        let mut tap = UsageTap::sse(true);
        let last = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let out = feed(&mut tap, &[last, DONE]);
        assert_eq!(out, format!("{last}{DONE}"));
        assert_eq!(tap.usage().map(|u| u.completion_tokens), Some(2));
    }
}

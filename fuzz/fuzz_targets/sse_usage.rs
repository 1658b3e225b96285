//! The response usage tap (`src/usage.rs`): SSE streams and JSON bodies.
//!
//! Input: a mode byte (`s`: SSE with the usage-only chunk stripped, `p`: SSE
//! passed through, `j`: JSON body; other values pick by their low bits), a
//! chunk-size byte (0: one chunk), then the response body, fed in chunks of
//! that size.
//!
//! Checks: JSON and pass-through SSE reach the client byte for byte; when
//! stripping, what the client gets is a subsequence of the stream (bytes
//! removed, none added or reordered), and the same events (as an SSE parser
//! reads them) and usage come out however the body is cut into chunks.

#![no_main]

use bytes::Bytes;
use infergate::usage::{TokenCounts, UsageTap};
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Strip,
    Pass,
    Json,
}

fn run(mode: Mode, body: &[u8], chunk: usize) -> (Vec<u8>, Option<TokenCounts>, u64) {
    let mut tap = match mode {
        Mode::Strip => UsageTap::sse(true),
        Mode::Pass => UsageTap::sse(false),
        Mode::Json => UsageTap::json(),
    };
    let mut out = Vec::with_capacity(body.len());
    let mut usage_seen = None;
    for piece in body.chunks(chunk.max(1)) {
        out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(piece)));
        // reading usage mid-stream must not disturb the stream
        if matches!(mode, Mode::Strip | Mode::Pass) {
            usage_seen = tap.usage().or(usage_seen);
        }
    }
    if let Some(rest) = tap.flush() {
        out.extend_from_slice(&rest);
    }
    let usage = tap.usage();
    if usage_seen.is_some() {
        assert!(usage.is_some());
    }
    (out, usage, tap.content_events())
}

/// The events a client's SSE parser sees: lines end at CRLF, LF or CR; a
/// blank line ends an event; blank lines between events mean nothing, so
/// which side of a removed event they fall on does not matter.
fn events(stream: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut events = Vec::new();
    let mut current = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        let line = &rest[..end];
        let mut next = end;
        if rest.get(end) == Some(&b'\r') && rest.get(end + 1) == Some(&b'\n') {
            next += 2;
        } else if end < rest.len() {
            next += 1;
        }
        if line.is_empty() {
            if !current.is_empty() {
                events.push(std::mem::take(&mut current));
            }
        } else {
            current.push(line);
        }
        rest = &rest[next..];
    }
    if !current.is_empty() {
        events.push(current);
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let [mode, chunk, body @ ..] = data else {
        return;
    };
    let mode = match mode {
        b's' => Mode::Strip,
        b'p' => Mode::Pass,
        b'j' => Mode::Json,
        m => [Mode::Strip, Mode::Pass, Mode::Json][usize::from(m % 3)],
    };
    let chunk = if *chunk == 0 {
        body.len()
    } else {
        usize::from(*chunk)
    };
    let (out, usage, _) = run(mode, body, chunk);
    match mode {
        Mode::Pass | Mode::Json => assert_eq!(out, body, "{mode:?} changed the body"),
        Mode::Strip => {
            // the output is the input minus some whole events: a subsequence
            // made of runs that each end where an event ends
            let mut rest = body;
            let mut i = 0;
            while i < out.len() {
                let at = rest
                    .iter()
                    .position(|&b| b == out[i])
                    .unwrap_or_else(|| panic!("output byte {i} is not in the input"));
                rest = &rest[at + 1..];
                i += 1;
            }
            assert!(out.len() <= body.len());
            let (whole, whole_usage, _) = run(mode, body, body.len());
            assert_eq!(
                events(&out),
                events(&whole),
                "chunks of {chunk} changed the events the client gets"
            );
            assert_eq!(usage, whole_usage, "chunks of {chunk} changed the usage");
        }
    }
    if let Mode::Pass = mode {
        let (_, whole_usage, _) = run(mode, body, body.len());
        assert_eq!(usage, whole_usage, "chunks of {chunk} changed the usage");
    }
});

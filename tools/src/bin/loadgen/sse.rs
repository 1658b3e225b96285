//! Splitting a response body into SSE events and reading the mock engine's
//! stamps off them without a JSON parse (cheap enough for 5,000 streams).

/// What one `data:` event of the mock engine is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// A content chunk `tok{index}`, with the mock's send time (µs since the
    /// Unix epoch, CLOCK_REALTIME) when stamped.
    Token { index: u32, sent_us: Option<u64> },
    /// `[DONE]`.
    Done,
    /// Anything else (role chunk, usage chunk, comments, errors).
    Other,
}

pub fn classify(event: &[u8]) -> Event {
    if event.starts_with(b"data: [DONE]") {
        return Event::Done;
    }
    let index = after(event, b"\"content\":\"tok")
        .or_else(|| after(event, b"\"text\":\"tok"))
        .and_then(leading_u64);
    match index {
        Some(i) => Event::Token {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            sent_us: after(event, b"\"mock_sent_us\":").and_then(leading_u64),
        },
        None => Event::Other,
    }
}

fn after<'a>(hay: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
    crate::http::find(hay, needle).map(|i| &hay[i + needle.len()..])
}

fn leading_u64(s: &[u8]) -> Option<u64> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&s[..digits]).ok()?.parse().ok()
}

/// Accumulates body bytes and hands out complete events (`\n\n`-terminated).
#[derive(Default)]
pub struct Splitter {
    pending: Vec<u8>,
}

impl Splitter {
    pub fn push(&mut self, data: &[u8], on_event: &mut dyn FnMut(&[u8])) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(i) = crate::http::find(&self.pending[start..], b"\n\n") {
            on_event(&self.pending[start..start + i]);
            start += i + 2;
        }
        self.pending.drain(..start);
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_mock_chunks() {
        let tok = br#"data: {"id":"x","choices":[{"index":0,"delta":{"content":"tok12 "}}],"mock_sent_us":1700000000123456}"#;
        assert_eq!(
            classify(tok),
            Event::Token {
                index: 12,
                sent_us: Some(1_700_000_000_123_456)
            }
        );
        let role =
            br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}],"mock_sent_us":5}"#;
        assert_eq!(classify(role), Event::Other);
        assert_eq!(classify(b"data: [DONE]"), Event::Done);
        let text = br#"data: {"choices":[{"text":"tok0 "}]}"#;
        assert_eq!(
            classify(text),
            Event::Token {
                index: 0,
                sent_us: None
            }
        );
    }

    #[test]
    fn splits_across_pushes() {
        let mut s = Splitter::default();
        let mut got = Vec::new();
        s.push(b"data: a\n\ndata: b\n", &mut |e| got.push(e.to_vec()));
        s.push(b"\ndata: c", &mut |e| got.push(e.to_vec()));
        assert_eq!(got, vec![b"data: a".to_vec(), b"data: b".to_vec()]);
    }
}

//! Serializable OpenAI/vLLM wire shapes and SSE event formatting.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Chat,
    Completion,
}

#[derive(Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    pub content: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum ChoiceChunk<'a> {
    Chat {
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    },
    Completion {
        index: u32,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    },
}

#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChoiceChunk<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub mock_sent_us: u64,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Format one SSE event: `data: <json>\n\n`.
pub fn sse_event<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut buf, value).is_err() {
        buf.truncate(6);
        buf.extend_from_slice(b"{}");
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

#[derive(Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Choice<'a> {
    Chat {
        index: u32,
        message: Message<'a>,
        logprobs: Option<()>,
        finish_reason: &'static str,
    },
    Text {
        index: u32,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: &'static str,
    },
}

#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: Usage,
}

#[derive(Serialize)]
pub struct EmbeddingItem {
    pub object: &'static str,
    pub index: usize,
    pub embedding: [f32; 8],
}

#[derive(Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Serialize)]
pub struct EmbeddingList<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub data: Vec<EmbeddingItem>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sse_event_format() {
        let ev = sse_event(&serde_json::json!({"a": 1}));
        assert_eq!(&ev[..], b"data: {\"a\":1}\n\n");
        assert_eq!(DONE_EVENT, b"data: [DONE]\n\n");
    }

    #[test]
    fn chunk_shape() {
        let choice = ChoiceChunk::Chat {
            index: 0,
            delta: Delta {
                role: None,
                content: "tok0 ",
            },
            logprobs: None,
            finish_reason: Some("length"),
        };
        let ev = sse_event(&Chunk {
            id: "chatcmpl-x",
            object: "chat.completion.chunk",
            created: 1,
            model: "m",
            choices: &[choice],
            usage: None,
            mock_sent_us: 5,
        });
        let s = std::str::from_utf8(&ev).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            s.strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["choices"][0]["delta"]["content"], "tok0 ");
        assert_eq!(json["choices"][0]["finish_reason"], "length");
        assert!(json["choices"][0]["delta"].get("role").is_none());
        assert_eq!(json["mock_sent_us"], 5);
        assert!(json.get("usage").is_none());
    }
}

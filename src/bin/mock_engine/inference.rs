//! Chat completions, text completions and embeddings.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::body::{error_response, json_response, MockBody};
use crate::sse::{Kind, SseStream, StreamParams, Usage};
use crate::state::InflightGuard;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Cheap deterministic prompt-token estimate: characters / 4, at least 1.
pub fn tokens_from_chars(chars: usize) -> u64 {
    ((chars / 4) as u64).max(1)
}

/// Characters of a chat message `content` (string or array of parts).
fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.chars().count(),
                Value::Object(o) => o.get("text").map(content_chars).unwrap_or(0),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

pub fn chat_prompt_tokens(messages: Option<&Value>) -> u64 {
    let chars = match messages {
        Some(Value::Array(msgs)) => msgs
            .iter()
            .map(|m| m.get("content").map(content_chars).unwrap_or(0))
            .sum(),
        _ => 0,
    };
    tokens_from_chars(chars)
}

/// Prompt tokens of one completion prompt / embedding input: a string
/// (chars / 4) or an array of token ids (its length).
fn single_input_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => tokens_from_chars(s.chars().count()),
        Value::Array(ids) => (ids.len() as u64).max(1),
        _ => 1,
    }
}

/// Split an OpenAI `prompt` / `input` into its individual inputs.
fn split_inputs(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) if items.iter().any(|i| i.is_string() || i.is_array()) => {
            items.iter().collect()
        }
        other => vec![other],
    }
}

pub fn completion_prompt_tokens(prompt: Option<&Value>) -> u64 {
    match prompt {
        Some(p) => split_inputs(p)
            .into_iter()
            .map(single_input_tokens)
            .sum::<u64>()
            .max(1),
        None => 1,
    }
}

/// 8 deterministic floats in [-1, 1] derived from the SHA-256 of the input.
pub fn embedding_for(input: &Value) -> [f32; 8] {
    let digest = match input {
        Value::String(s) => Sha256::digest(s.as_bytes()),
        other => Sha256::digest(other.to_string().as_bytes()),
    };
    let mut out = [0f32; 8];
    for (i, chunk) in digest.chunks_exact(4).enumerate().take(8) {
        let n = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        out[i] = ((f64::from(n) / f64::from(u32::MAX)) * 2.0 - 1.0) as f32;
    }
    out
}

fn completion_tokens(default: u32, req: &Value) -> u32 {
    let cap = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|k| req.get(*k).and_then(Value::as_u64))
        .min();
    let n = match cap {
        Some(c) => u64::from(default).min(c) as u32,
        None => default,
    };
    n.max(1)
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Choice<'a> {
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
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: [f32; 8],
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

/// Produce the response for a parsed, validated inference request. `model`
/// is the index of a served model.
pub async fn respond(
    endpoint: Endpoint,
    req: &Value,
    model: usize,
    mut guard: InflightGuard,
) -> Response<MockBody> {
    let state = guard.state().clone();
    let cfg = &state.cfg;
    let Some(stats) = state.models.get(model) else {
        guard.finish();
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "model index out of range",
            "InternalServerError",
            None,
            cfg.flat_errors,
        );
    };
    guard.set_model(model);
    let model_name = stats.name.as_str();
    let created = unix_now();

    if endpoint == Endpoint::Embeddings {
        let Some(input) = req.get("input") else {
            guard.finish();
            return error_response(
                StatusCode::BAD_REQUEST,
                "'input' is required",
                "BadRequestError",
                Some("input"),
                cfg.flat_errors,
            );
        };
        let inputs = split_inputs(input);
        let prompt_tokens: u64 = inputs.iter().map(|i| single_input_tokens(i)).sum();
        let data = inputs
            .iter()
            .enumerate()
            .map(|(index, i)| EmbeddingItem {
                object: "embedding",
                index,
                embedding: embedding_for(i),
            })
            .collect();
        stats
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        let id = random_id("embd-");
        let resp = json_response(
            StatusCode::OK,
            &EmbeddingList {
                id: &id,
                object: "list",
                created,
                data,
                model: model_name,
                usage: EmbeddingUsage {
                    prompt_tokens,
                    total_tokens: prompt_tokens,
                },
            },
        );
        guard.finish();
        return resp;
    }

    let (prompt_tokens, kind, id) = match endpoint {
        Endpoint::Chat => (
            chat_prompt_tokens(req.get("messages")),
            Kind::Chat,
            random_id("chatcmpl-"),
        ),
        _ => (
            completion_prompt_tokens(req.get("prompt")),
            Kind::Completion,
            random_id("cmpl-"),
        ),
    };
    let ctokens = completion_tokens(cfg.tokens, req);
    stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::Relaxed);
    stats
        .generation_tokens
        .fetch_add(u64::from(ctokens), Ordering::Relaxed);

    if !cfg.ttft.is_zero() {
        tokio::time::sleep(cfg.ttft).await;
    }

    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let include_usage = req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let params = StreamParams {
            kind,
            id,
            created,
            model: model_name.to_owned(),
            prompt_tokens,
            completion_tokens: ctokens,
            include_usage,
            drop_after: cfg.drop_after_chunks,
            interval: cfg.token_interval,
        };
        let mut resp = Response::new(MockBody::Stream(Box::new(SseStream::new(params, guard))));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }

    let mut text = String::with_capacity(ctokens as usize * 6);
    for i in 0..ctokens {
        if i > 0 {
            text.push(' ');
        }
        let _ = write!(text, "tok{i}");
    }
    let choice = match kind {
        Kind::Chat => Choice::Chat {
            index: 0,
            message: Message {
                role: "assistant",
                content: &text,
            },
            logprobs: None,
            finish_reason: "length",
        },
        Kind::Completion => Choice::Text {
            index: 0,
            text: &text,
            logprobs: None,
            finish_reason: "length",
        },
    };
    let body = Completion {
        id: &id,
        object: match kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        },
        created,
        model: model_name,
        choices: [choice],
        usage: Usage::new(prompt_tokens, u64::from(ctokens)),
    };
    let resp = match serde_json::to_vec(&body) {
        Ok(v) => crate::body::full(StatusCode::OK, &crate::body::JSON, Bytes::from(v)),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            "InternalServerError",
            None,
            cfg.flat_errors,
        ),
    };
    guard.finish();
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_estimates() {
        assert_eq!(tokens_from_chars(0), 1);
        assert_eq!(tokens_from_chars(3), 1);
        assert_eq!(tokens_from_chars(40), 10);
        let msgs = json!([
            {"role": "system", "content": "abcdefgh"},
            {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}
        ]);
        assert_eq!(chat_prompt_tokens(Some(&msgs)), 4);
        assert_eq!(chat_prompt_tokens(None), 1);
        assert_eq!(completion_prompt_tokens(Some(&json!("abcdefghijkl"))), 3);
        assert_eq!(
            completion_prompt_tokens(Some(&json!(["abcd", "abcdefgh"]))),
            3
        );
        assert_eq!(completion_prompt_tokens(Some(&json!([1, 2, 3, 4, 5]))), 5);
    }

    #[test]
    fn max_tokens_caps() {
        assert_eq!(completion_tokens(8, &json!({})), 8);
        assert_eq!(completion_tokens(8, &json!({"max_tokens": 3})), 3);
        assert_eq!(
            completion_tokens(8, &json!({"max_completion_tokens": 100})),
            8
        );
        assert_eq!(
            completion_tokens(8, &json!({"max_tokens": 5, "max_completion_tokens": 2})),
            2
        );
        assert_eq!(completion_tokens(8, &json!({"max_tokens": null})), 8);
    }

    #[test]
    fn embeddings_are_deterministic() {
        let a = embedding_for(&json!("hello"));
        let b = embedding_for(&json!("hello"));
        let c = embedding_for(&json!("world"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(split_inputs(&json!(["a", "b"])).len(), 2);
        assert_eq!(split_inputs(&json!([1, 2, 3])).len(), 1);
    }
}

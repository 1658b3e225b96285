//! Chat completions, text completions and embeddings.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::body::{error_response, json_response, MockBody};
use crate::guard::InflightGuard;
use crate::sse::{SseStream, StreamParams};
use crate::tokens::{
    chat_prompt_tokens, completion_prompt_tokens, completion_tokens, embedding_for, random_id,
    single_input_tokens, split_inputs, unix_now,
};
use crate::wire::{
    Choice, Completion, EmbeddingItem, EmbeddingList, EmbeddingUsage, Kind, Message, Usage,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

/// Produce the response for an inference request that passed
/// [`crate::validate`]. `model` is the index of a served model.
/// `interval`: the gap between streamed tokens for this request (the
/// `x-mock-token-interval-us` header, else `--token-interval-ms`).
pub async fn respond(
    endpoint: Endpoint,
    req: &Value,
    model: usize,
    interval: std::time::Duration,
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

    let stream = req
        .get("stream")
        .and_then(|v| crate::validate::lax_bool(v).ok())
        .unwrap_or(false);
    if stream {
        let include_usage = req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(|v| crate::validate::lax_bool(v).ok())
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
            interval,
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

//! Chat completions, text completions and embeddings.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::body::{error_response, json_response, MockBody};
use crate::guard::InflightGuard;
use crate::kvcache::{prompt_sequences, Sequence, BLOCK_TOKENS};
use crate::sse::{SseStream, StreamParams};
use crate::state::{ModelStats, State};
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

/// The engine's prompt tokens for this request (see [`crate::kvcache`]).
static X_MOCK_PROMPT_TOKENS: HeaderName = HeaderName::from_static("x-mock-prompt-tokens");
/// Of those, the tokens its cached prefix covered.
static X_MOCK_CACHED_TOKENS: HeaderName = HeaderName::from_static("x-mock-cached-tokens");

/// Per-request timing.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Gap between streamed tokens (the `x-mock-token-interval-us` header,
    /// else `--token-interval-ms`).
    pub interval: Duration,
    /// Prefill time per uncached prompt token (the
    /// `x-mock-prefill-us-per-token` header, else `--prefill-us-per-token`).
    pub prefill_per_token: Duration,
}

/// What prefill found: the engine's prompt tokens and the cached ones.
#[derive(Clone, Copy, Debug, Default)]
struct Prefilled {
    tokens: u64,
    cached: u64,
}

/// Wait for a running slot, then prefill: look the prompt up in the prefix
/// cache, take `base` + `per_token` × uncached tokens, then insert its full
/// blocks. The slot stays in `guard` until the response ends.
async fn schedule_and_prefill(
    state: &Arc<State>,
    stats: &ModelStats,
    model: usize,
    seqs: &[Sequence],
    base: Duration,
    per_token: Duration,
    guard: &mut InflightGuard,
) -> Prefilled {
    let slot = crate::sched::acquire(state, model).await;
    guard.hold(slot);
    let on = state.cache_on;
    let mut p = Prefilled {
        tokens: seqs.iter().map(|s| s.tokens).sum(),
        cached: 0,
    };
    if on {
        let cache = state.cache();
        for seq in seqs {
            // As vLLM: a fully cached prompt still computes its last token,
            // so at most (tokens - 1) tokens' full blocks can hit.
            let usable = usize::try_from(seq.tokens.saturating_sub(1) / BLOCK_TOKENS)
                .unwrap_or(usize::MAX)
                .min(seq.blocks.len());
            p.cached += cache.match_prefix(&seq.blocks[..usable]) as u64 * BLOCK_TOKENS;
        }
    }
    let c = &state.counters;
    c.prompt_tokens.fetch_add(p.tokens, Ordering::Relaxed);
    c.cached_prompt_tokens
        .fetch_add(p.cached, Ordering::Relaxed);
    if on {
        stats.cache_queries.fetch_add(p.tokens, Ordering::Relaxed);
        stats.cache_hits.fetch_add(p.cached, Ordering::Relaxed);
    }
    let uncached = u32::try_from(p.tokens.saturating_sub(p.cached)).unwrap_or(u32::MAX);
    let wait = base.saturating_add(per_token.saturating_mul(uncached));
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if on {
        let mut cache = state.cache();
        for seq in seqs {
            cache.insert(&seq.blocks);
        }
    }
    p
}

fn add_token_headers(resp: &mut Response<MockBody>, p: Prefilled) {
    let h = resp.headers_mut();
    h.insert(X_MOCK_PROMPT_TOKENS.clone(), HeaderValue::from(p.tokens));
    h.insert(X_MOCK_CACHED_TOKENS.clone(), HeaderValue::from(p.cached));
}

/// Produce the response for an inference request that passed
/// [`crate::validate`]. `model` is the index of a served model; `asked` the
/// model name the request used (a served model or a LoRA adapter; `None`
/// for the first served model).
pub async fn respond(
    endpoint: Endpoint,
    req: &Value,
    model: usize,
    asked: Option<&str>,
    timing: Timing,
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
    let hashing = state.cache_on;
    let seqs = || prompt_sequences(endpoint, req, asked.unwrap_or(model_name), hashing);

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
        let seqs = seqs();
        let pre = schedule_and_prefill(
            &state,
            stats,
            model,
            &seqs,
            Duration::ZERO,
            timing.prefill_per_token,
            &mut guard,
        )
        .await;
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
        let mut resp = json_response(
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
        add_token_headers(&mut resp, pre);
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

    let pre = schedule_and_prefill(
        &state,
        stats,
        model,
        &seqs(),
        cfg.ttft,
        timing.prefill_per_token,
        &mut guard,
    )
    .await;

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
            interval: timing.interval,
        };
        let mut resp = Response::new(MockBody::Stream(Box::new(SseStream::new(params, guard))));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        add_token_headers(&mut resp, pre);
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
    let mut resp = match serde_json::to_vec(&body) {
        Ok(v) => crate::body::full(StatusCode::OK, &crate::body::JSON, Bytes::from(v)),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            "InternalServerError",
            None,
            cfg.flat_errors,
        ),
    };
    add_token_headers(&mut resp, pre);
    guard.finish();
    resp
}

//! Pure helpers: prompt-token estimates, completion-token caps, ids and
//! deterministic embeddings.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sha2::{Digest, Sha256};

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
pub fn content_chars(content: &Value) -> usize {
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
pub fn single_input_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => tokens_from_chars(s.chars().count()),
        Value::Array(ids) => (ids.len() as u64).max(1),
        _ => 1,
    }
}

/// Split an OpenAI `prompt` / `input` into its individual inputs.
pub fn split_inputs(v: &Value) -> Vec<&Value> {
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

pub fn completion_tokens(default: u32, req: &Value) -> u32 {
    let cap = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|k| req.get(*k).and_then(|v| crate::validate::lax_int(v).ok()))
        .map(|n| u64::try_from(n.max(0)).unwrap_or(u64::MAX))
        .min();
    let n = match cap {
        Some(c) => u64::from(default).min(c) as u32,
        None => default,
    };
    n.max(1)
}

pub fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
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

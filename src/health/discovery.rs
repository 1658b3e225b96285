//! Model discovery: ask each healthy backend which models it serves.

use crate::state::AppState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;

/// Rebuild the discovered model → pool table from every pool that allows it.
pub async fn refresh(app: &AppState) {
    let previous = app.router.discovered();
    let mut table = HashMap::new();
    for (index, pool) in app.router.pools().iter().enumerate() {
        if !pool.config.discover_models {
            continue;
        }
        let addresses: Vec<SocketAddr> = pool.serving_backends().map(|s| s.address).collect();
        if addresses.is_empty() {
            // pool down: keep what it served, so clients get 503 + Retry-After
            // (retryable) rather than 404 model_not_found (not retried)
            for (model, &pool_index) in previous.iter() {
                if pool_index == index {
                    table.entry(model.clone()).or_insert(index);
                }
            }
            continue;
        }
        for address in addresses {
            match fetch_models(address, pool.config.health_check.timeout).await {
                Ok(models) => {
                    for m in models {
                        table.entry(m).or_insert(index);
                    }
                }
                Err(e) => log::debug!("model discovery on {address} failed: {e}"),
            }
        }
    }
    app.router.set_discovered(table);
}

async fn fetch_models(
    address: SocketAddr,
    limit: Duration,
) -> Result<Vec<String>, crate::fetch::FetchError> {
    let body = crate::fetch::get(address, "/v1/models", limit, MAX_MODELS_BODY).await?;
    Ok(parse_model_ids(&body))
}

/// `data[].id` of an OpenAI model list (llama.cpp also sends an Ollama-style `models`).
pub fn parse_model_ids(body: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    value["data"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|m| m["id"].as_str())
                .filter(|id| !id.is_empty() && id.len() <= 256)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_from_openai_lists_and_ignores_garbage() {
        let ids = parse_model_ids(
            br#"{"object":"list","data":[{"id":"a"},{"id":"b"},{"x":1}],"models":[{"name":"a"}]}"#,
        );
        assert_eq!(ids, vec!["a", "b"]);
        assert!(parse_model_ids(b"<html>").is_empty());
    }
}

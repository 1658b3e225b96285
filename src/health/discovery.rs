//! Model discovery: ask each healthy backend which models it serves.

use crate::state::AppState;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;

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
            match fetch_models(app, address, pool.config.health_check.timeout).await {
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
    app: &AppState,
    address: SocketAddr,
    limit: Duration,
) -> Result<Vec<String>, String> {
    let work = async {
        let peer = HttpPeer::new(address, false, String::new());
        let (mut session, _) = app
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| e.to_string())?;
        let mut req =
            RequestHeader::build("GET", b"/v1/models", None).map_err(|e| e.to_string())?;
        req.insert_header("host", address.to_string())
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| e.to_string())?;
        session.finish_body().await.map_err(|e| e.to_string())?;
        session.read_response().await.map_err(|e| e.to_string())?;
        if session.get_status().map(|s| s.as_u16()) != Some(200) {
            return Err(format!("status {:?}", session.get_status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_body_bytes().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_MODELS_BODY {
                return Err("models list too large".to_string());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(parse_model_ids(&body))
    };
    timeout(limit, work)
        .await
        .map_err(|_| "timed out".to_string())?
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

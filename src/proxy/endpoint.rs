//! Which endpoint a request line names. Pure: method + path in, decision out.

use crate::errors::GatewayError;
pub use crate::path::PathPolicy;
use infergate_filters::Access;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// chat/completions, completions, embeddings: body `model` routes.
    Inference(&'static str),
    ListModels,
    GetModel(String),
    GatewayHealth,
    /// Kubernetes liveness: the process serves.
    Live,
    /// Kubernetes readiness: config loaded and a backend can take traffic.
    Ready,
    /// Backends and their counters (InfiniLM router's `/services`).
    Services,
    /// Totals and per-backend counters (InfiniLM router's `/stats`).
    Stats,
    /// A path on the user allowlist ([`PathPolicy`]) other than the three
    /// above: body `model` if there is one, else the default pool.
    OtherV1,
    /// An engine's own management endpoint (LoRA load/unload, cache reset,
    /// sleep, profiling, …): any `/v1/*` path not on the user allowlist, and
    /// the engine-internal paths outside `/v1` that [`PathPolicy`] lists.
    /// Admin role only; forwarded like [`Endpoint::OtherV1`].
    EngineInternal,
    /// A WebSocket upgrade (`Upgrade: websocket`), proxied to a pool's backend.
    WebSocket,
    /// `POST /user/user_login`: email + password → JWT (seed 004).
    Login,
    /// `POST /admin/reload-keys`: reload the API keys and users files.
    AdminReloadKeys,
    AdminReload,
    /// `GET /admin/usage`: each principal's quota, usage and in-flight requests.
    AdminUsage,
    /// `GET /metrics`: Prometheus exposition.
    Metrics,
    /// `POST /admin/models/{id}/load`: start a managed engine (seed 000).
    AdminModelLoad(String),
    /// `POST /admin/models/{id}/unload`: stop a managed engine (seed 000).
    AdminModelUnload(String),
    /// `GET /admin/engines`: every managed engine's state.
    AdminEngines,
    /// `POST /admin/models/{base}/lora`: load a LoRA adapter (seed 003).
    AdminLoraLoad(String),
    /// `DELETE /admin/models/{base}/lora/{name}`: unload one.
    AdminLoraUnload(String, String),
}

impl Endpoint {
    /// Closed set of labels for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Inference(name) => name,
            Endpoint::ListModels => "models",
            Endpoint::GetModel(_) => "model",
            Endpoint::GatewayHealth => "health",
            Endpoint::Live => "health_live",
            Endpoint::Ready => "health_ready",
            Endpoint::Services => "services",
            Endpoint::Stats => "stats",
            Endpoint::OtherV1 => "other",
            Endpoint::EngineInternal => "engine_internal",
            Endpoint::WebSocket => "websocket",
            Endpoint::Login => "login",
            Endpoint::AdminReloadKeys => "admin_reload_keys",
            Endpoint::AdminReload => "admin_reload",
            Endpoint::AdminUsage => "admin_usage",
            Endpoint::Metrics => "metrics",
            Endpoint::AdminModelLoad(_) => "admin_model_load",
            Endpoint::AdminModelUnload(_) => "admin_model_unload",
            Endpoint::AdminEngines => "admin_engines",
            Endpoint::AdminLoraLoad(_) => "admin_lora_load",
            Endpoint::AdminLoraUnload(..) => "admin_lora_unload",
        }
    }

    /// What the caller must prove.
    pub fn access(&self) -> Access {
        match self {
            Endpoint::Inference(_)
            | Endpoint::ListModels
            | Endpoint::GetModel(_)
            | Endpoint::OtherV1
            | Endpoint::WebSocket => Access::Api,
            Endpoint::Login => Access::Login,
            Endpoint::AdminReloadKeys
            | Endpoint::AdminReload
            | Endpoint::AdminUsage
            | Endpoint::AdminModelLoad(_)
            | Endpoint::AdminModelUnload(_)
            | Endpoint::AdminEngines
            | Endpoint::AdminLoraLoad(_)
            | Endpoint::AdminLoraUnload(..)
            | Endpoint::EngineInternal => Access::Admin,
            Endpoint::GatewayHealth
            | Endpoint::Live
            | Endpoint::Ready
            | Endpoint::Services
            | Endpoint::Stats
            | Endpoint::Metrics => Access::Public,
        }
    }
}

/// Access for a path that did not classify (404/405): an unknown `/admin/*`
/// path still asks for the admin role, so the admin surface is not mapped by
/// anonymous probing; `/v1/*` asks for a key.
pub fn access_for_path(path: &str) -> Access {
    if path == "/admin" || path.starts_with("/admin/") {
        Access::Admin
    } else if path.starts_with("/v1/") {
        Access::Api
    } else {
        Access::Public
    }
}

const INFERENCE: &[(&str, &str)] = &[
    ("/v1/chat/completions", "chat_completions"),
    ("/chat/completions", "chat_completions"),
    ("/v1/completions", "completions"),
    ("/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/embeddings", "embeddings"),
];

/// Classify a normalised path (see [`crate::path::normalize`]).
pub fn classify(method: &str, path: &str, policy: &PathPolicy) -> Result<Endpoint, GatewayError> {
    let path = path.split('?').next().unwrap_or(path);
    let trimmed = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    if let Some((_, name)) = INFERENCE.iter().find(|(p, _)| *p == trimmed) {
        return match method {
            "POST" => Ok(Endpoint::Inference(name)),
            _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
        };
    }
    let get_only = |endpoint: Endpoint| match method {
        "GET" | "HEAD" => Ok(endpoint),
        _ => Err(GatewayError::MethodNotAllowed { allow: "GET" }),
    };
    match trimmed {
        "/v1/models" | "/models" => return get_only(Endpoint::ListModels),
        "/health" => return get_only(Endpoint::GatewayHealth),
        "/health/live" => return get_only(Endpoint::Live),
        "/health/ready" => return get_only(Endpoint::Ready),
        "/services" => return get_only(Endpoint::Services),
        "/stats" => return get_only(Endpoint::Stats),
        "/admin/usage" => return get_only(Endpoint::AdminUsage),
        "/metrics" => return get_only(Endpoint::Metrics),
        "/admin/engines" => return get_only(Endpoint::AdminEngines),
        "/user/user_login" => {
            return match method {
                "POST" => Ok(Endpoint::Login),
                _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            }
        }
        "/admin/reload" => {
            return match method {
                "POST" => Ok(Endpoint::AdminReload),
                _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            }
        }
        "/admin/reload-keys" => {
            return match method {
                "POST" => Ok(Endpoint::AdminReloadKeys),
                _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            }
        }
        _ => {}
    }
    if let Some(rest) = trimmed.strip_prefix("/admin/models/") {
        if let Some(base) = rest.strip_suffix("/lora") {
            return match method {
                "POST" => Ok(Endpoint::AdminLoraLoad(percent_decode(base))),
                _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            };
        }
        if let Some((base, name)) = rest.split_once("/lora/") {
            return match method {
                "DELETE" => Ok(Endpoint::AdminLoraUnload(
                    percent_decode(base),
                    percent_decode(name),
                )),
                _ => Err(GatewayError::MethodNotAllowed { allow: "DELETE" }),
            };
        }
        let action = rest
            .strip_suffix("/load")
            .map(|id| Endpoint::AdminModelLoad(percent_decode(id)))
            .or_else(|| {
                rest.strip_suffix("/unload")
                    .map(|id| Endpoint::AdminModelUnload(percent_decode(id)))
            });
        if let Some(endpoint) = action {
            return match method {
                "POST" => Ok(endpoint),
                _ => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            };
        }
    }
    for prefix in ["/v1/models/", "/models/"] {
        if let Some(id) = trimmed.strip_prefix(prefix) {
            return get_only(Endpoint::GetModel(percent_decode(id)));
        }
    }
    if policy.user_may_reach(trimmed) {
        return Ok(Endpoint::OtherV1);
    }
    if trimmed.starts_with("/v1/") || policy.is_engine_internal(trimmed) {
        return Ok(Endpoint::EngineInternal);
    }
    Err(GatewayError::UnknownPath {
        path: trimmed.to_string(),
    })
}

/// `%2F` → `/` etc. for ids in paths, with the gateway's one decoding
/// ([`infergate_filters::percent::decode`]); an id that does not decode is
/// kept as written (it then names nothing and gets a 404).
pub(crate) fn percent_decode(text: &str) -> String {
    infergate_filters::percent::decode(text).unwrap_or_else(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_paths_with_and_without_v1() {
        assert_eq!(
            classify("POST", "/v1/chat/completions", &PathPolicy::default()),
            Ok(Endpoint::Inference("chat_completions"))
        );
        assert_eq!(
            classify("POST", "/chat/completions?x=1", &PathPolicy::default()),
            Ok(Endpoint::Inference("chat_completions"))
        );
        assert_eq!(
            classify("POST", "/embeddings", &PathPolicy::default()),
            Ok(Endpoint::Inference("embeddings"))
        );
        assert_eq!(
            classify("GET", "/v1/completions", &PathPolicy::default()),
            Err(GatewayError::MethodNotAllowed { allow: "POST" })
        );
    }

    #[test]
    fn model_paths_and_others() {
        assert_eq!(
            classify("GET", "/models", &PathPolicy::default()),
            Ok(Endpoint::ListModels)
        );
        assert_eq!(
            classify("GET", "/v1/models/Qwen%2FQwen2", &PathPolicy::default()),
            Ok(Endpoint::GetModel("Qwen/Qwen2".into()))
        );
        assert_eq!(
            classify("GET", "/v1/models/org/name", &PathPolicy::default()),
            Ok(Endpoint::GetModel("org/name".into()))
        );
        assert_eq!(
            classify("DELETE", "/v1/models", &PathPolicy::default()),
            Err(GatewayError::MethodNotAllowed { allow: "GET" })
        );
        assert_eq!(
            classify("POST", "/v1/audio/speech", &PathPolicy::default()),
            Ok(Endpoint::OtherV1)
        );
        assert!(matches!(
            classify("GET", "/etc/passwd", &PathPolicy::default()),
            Err(GatewayError::UnknownPath { .. })
        ));
    }

    #[test]
    fn engine_internal_paths_need_the_admin_role() {
        let policy = PathPolicy::default();
        for path in [
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/v1/some_future_internal_route",
            "/reset_prefix_cache",
            "/sleep",
            "/wake_up",
            "/collective_rpc",
            "/start_profile",
            "/server_info",
        ] {
            let endpoint = classify("POST", path, &policy);
            assert_eq!(endpoint, Ok(Endpoint::EngineInternal), "{path}");
            assert_eq!(Endpoint::EngineInternal.access(), Access::Admin);
        }
        for path in [
            "/v1/responses",
            "/v1/responses/abc",
            "/tokenize",
            "/v1/rerank",
        ] {
            assert_eq!(
                classify("POST", path, &policy),
                Ok(Endpoint::OtherV1),
                "{path}"
            );
        }
        assert!(matches!(
            classify("POST", "/not_listed", &policy),
            Err(GatewayError::UnknownPath { .. })
        ));
    }

    #[test]
    fn configured_entries_extend_the_lists() {
        let policy = PathPolicy::new(&["/v1/audio/*".into()], &["/custom_admin".into()]);
        assert_eq!(
            classify("POST", "/v1/audio/new_thing", &policy),
            Ok(Endpoint::OtherV1)
        );
        assert_eq!(
            classify("POST", "/v1/audio", &policy),
            Ok(Endpoint::EngineInternal)
        );
        assert_eq!(
            classify("POST", "/custom_admin", &policy),
            Ok(Endpoint::EngineInternal)
        );
        assert!(crate::path::check_policy_entry("/v1/x/*").is_ok());
        assert!(crate::path::check_policy_entry("/v1/../x").is_err());
        assert!(crate::path::check_policy_entry("v1/x").is_err());
        assert!(crate::path::check_policy_entry("/v1/*/x").is_err());
    }

    #[test]
    fn percent_decoding_tolerates_bad_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%41"), "A");
    }
}

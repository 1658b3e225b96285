//! Routing seam: which pool serves a model, and which backend takes an attempt.
//!
//! Owns the model → pool table (configured names, aliases, and models the
//! background discovery found on healthy backends). Never reads a body or a
//! socket: the proxy hands it a model name and gets a decision back.

pub mod eject;
mod load;
mod pool;
mod prefix;
pub mod queue;
pub mod signals;

pub use load::{EngineLoad, Scraped};
pub use pool::{
    BackendState, Decision, Dispatch, Hints, InflightGuard, Picked, Pool, Principal, Refusal,
    Ticket, Want,
};
pub use prefix::{PrefixIndex, PromptKey, ENTRY_BYTES, MAX_BACKENDS as PREFIX_MAX_BACKENDS};

use crate::config::Config;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a model name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub pool: usize,
    /// The name to send upstream when the client used an alias.
    pub rewrite_to: Option<String>,
}

pub struct Router {
    pools: Vec<Arc<Pool>>,
    configured: HashMap<String, Route>,
    /// Models found on backends' `/v1/models`, refreshed in the background.
    discovered: ArcSwap<HashMap<String, usize>>,
    default_pool: Option<usize>,
}

impl Router {
    pub fn new(config: &Config) -> std::io::Result<Self> {
        Self::build(config, None)
    }

    /// The router for a reloaded config: a pool whose config is unchanged is
    /// the same `Arc<Pool>` (health state, counters and in-flight slots
    /// carry on); a new or changed pool is built fresh and takes traffic
    /// after its first passing health check.
    pub fn rebuild(config: &Config, previous: &Router) -> std::io::Result<Self> {
        Self::build(config, Some(previous))
    }

    /// Keep the previous router's discovered models whose pool still exists
    /// (by name), until the next discovery refresh.
    pub fn carry_discovered(&self, previous: &Router) {
        let table = previous
            .discovered
            .load()
            .iter()
            .filter_map(|(model, &index)| {
                let name = previous.pools.get(index)?.name();
                let now = self.pools.iter().position(|p| p.name() == name)?;
                Some((model.clone(), now))
            })
            .collect();
        self.set_discovered(table);
    }

    fn build(config: &Config, previous: Option<&Router>) -> std::io::Result<Self> {
        let mut pools = Vec::new();
        let mut configured = HashMap::new();
        for (i, pc) in config.pools.iter().enumerate() {
            for m in &pc.models {
                configured.insert(
                    m.clone(),
                    Route {
                        pool: i,
                        rewrite_to: None,
                    },
                );
            }
            for (alias, target) in &pc.aliases {
                configured.insert(
                    alias.clone(),
                    Route {
                        pool: i,
                        rewrite_to: Some(target.clone()),
                    },
                );
            }
            let same = previous.and_then(|r| r.pools.iter().find(|p| p.config == *pc));
            match same {
                Some(pool) => pools.push(pool.clone()),
                None => pools.push(Pool::new(pc.clone())?),
            }
        }
        let default_pool = config
            .routing
            .default_pool
            .as_ref()
            .and_then(|name| config.pools.iter().position(|p| &p.name == name));
        Ok(Router {
            pools,
            configured,
            discovered: ArcSwap::from_pointee(HashMap::new()),
            default_pool,
        })
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    pub fn pool(&self, index: usize) -> Option<&Arc<Pool>> {
        self.pools.get(index)
    }

    pub fn default_pool(&self) -> Option<usize> {
        self.default_pool
    }

    /// Resolve a client's model name: configured names and aliases first, then
    /// names discovered on a pool's backends.
    pub fn resolve_pool(&self, model: &str) -> Option<Route> {
        if let Some(route) = self.configured.get(model) {
            return Some(route.clone());
        }
        self.discovered.load().get(model).map(|&pool| Route {
            pool,
            rewrite_to: None,
        })
    }

    pub fn is_configured(&self, model: &str) -> bool {
        self.configured.contains_key(model)
    }

    /// Replace the discovered table (background refresh).
    pub fn set_discovered(&self, table: HashMap<String, usize>) {
        self.discovered.store(Arc::new(table));
    }

    pub fn discovered(&self) -> Arc<HashMap<String, usize>> {
        self.discovered.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let yaml = r#"
pools:
  - name: chat
    models: ["tiny-chat"]
    aliases: { chat-latest: tiny-chat }
    backends: ["127.0.0.1:1"]
  - name: embed
    models: ["mini"]
    backends: ["127.0.0.1:2"]
routing: { default_pool: embed }
"#;
        let config = crate::config::parse_str(yaml).unwrap_or_else(|e| {
            unreachable!("test config is valid: {e:?}");
        });
        Router::new(&config).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn resolves_models_and_aliases_to_their_pool() {
        let r = router();
        assert_eq!(
            r.resolve_pool("tiny-chat"),
            Some(Route {
                pool: 0,
                rewrite_to: None
            })
        );
        assert_eq!(
            r.resolve_pool("chat-latest"),
            Some(Route {
                pool: 0,
                rewrite_to: Some("tiny-chat".into())
            })
        );
        assert_eq!(r.resolve_pool("mini").map(|r| r.pool), Some(1));
        assert_eq!(r.resolve_pool("nope"), None);
        assert_eq!(r.default_pool(), Some(1));
    }

    #[test]
    fn discovered_models_route_after_configured_ones() {
        let r = router();
        r.set_discovered(HashMap::from([
            ("found".to_string(), 1),
            ("tiny-chat".to_string(), 1),
        ]));
        assert_eq!(r.resolve_pool("found").map(|r| r.pool), Some(1));
        assert_eq!(r.resolve_pool("tiny-chat").map(|r| r.pool), Some(0));
    }

    #[test]
    fn unchecked_backends_take_no_traffic() {
        let r = router();
        let pool = r.pool(0).map(|p| p.pick_backend(None, &[]).is_none());
        assert_eq!(pool, Some(true));
    }
}

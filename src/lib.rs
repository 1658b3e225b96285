//! infergate: an OpenAI-compatible gateway for self-hosted LLM engines.
//!
//! Map of the seams and the Pingora hooks that call them:
//!
//! | hook (src/proxy)      | seam                 | what it decides                           |
//! |-----------------------|----------------------|-------------------------------------------|
//! | `request_filter`      | `proxy::endpoint`    | which endpoint the path names, its access |
//! |                       | `infergate-filters`  | request id, CORS, identity (`on_request`) |
//! |                       | `catalog`            | `/v1/models`, `/health` answered locally  |
//! |                       | `proxy::read_body`   | whole body, size limit, 100-continue      |
//! |                       | `body`               | `model` and its alias rewrite             |
//! |                       | `routing`            | model → pool → backend (health, balance)  |
//! |                       | `infergate-filters`  | model access, limits (`on_admit`)         |
//! |                       | `proxy::admin`       | login, `/admin/*`                         |
//! |                       | `proxy::forward`     | upstream exchange, streaming, failover    |
//! |                       | `usage`              | token usage read off the response         |
//! | `logging`             | `proxy` (access log) | one line per request, settles usage       |
//! | background services   | `health`             | pool supervisor: checks, model discovery  |
//! | (`server`)            | `reload`             | config reload (file watch, SIGHUP)        |
//! |                       | `infergate-filters`  | limits warnings (store reachability)      |
//! |                       | `gpu`                | GPU monitor (NVML polling)                |
//! |                       | `engines`            | engine manager: preload, idle unload, stop|
//!
//! `config` turns YAML into a validated [`config::Config`]; `errors` maps every
//! client-visible error to its status and OpenAI body.

pub mod access_log;
pub mod batch_writer;
pub mod body;
pub mod body_budget;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod engines;
pub mod errors;
pub mod fetch;
pub mod gpu;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod model_stats;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod rotate;
pub mod routing;
pub mod server;
pub mod state;
pub mod usage;

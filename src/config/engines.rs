//! The `engines:` section: engine processes infergate starts, watches and
//! stops itself (seed 000's vLLM manager, seed 003's vLLM/SGLang managers).
//!
//! ```yaml
//! engines:
//!   port_range: "18100-18199"
//!   log_dir: /var/log/infergate/engines
//!   gpu: { source: fake, fake_gpus: [{ id: 0, memory_mb: 24576 }] }
//!   models:
//!     - name: qwen
//!       kind: vllm
//!       path: /models/qwen
//!       gpus: [0]
//!       gpu_memory_mb: 16000
//!       idle_ttl: 30m
//! ```

use super::duration::parse_duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngines {
    pub port_range: Option<String>,
    pub log_dir: Option<String>,
    pub log_max_bytes: Option<u64>,
    pub log_max_files: Option<usize>,
    pub stop_grace: Option<String>,
    pub on_exit: Option<String>,
    pub python: Option<String>,
    pub gpu: Option<RawGpu>,
    #[serde(default)]
    pub models: Vec<RawManagedModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpu {
    pub source: Option<String>,
    #[serde(default)]
    pub fake_gpus: Vec<RawFakeGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFakeGpu {
    pub id: u32,
    pub memory_mb: u64,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManagedModel {
    pub name: String,
    pub kind: String,
    pub path: Option<String>,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    #[serde(default)]
    pub gpus: Vec<u32>,
    pub gpu_memory_mb: Option<u64>,
    pub startup_timeout: Option<String>,
    pub health_path: Option<String>,
    pub idle_ttl: Option<String>,
    pub preload: Option<bool>,
    pub max_restarts: Option<u32>,
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub lora: Vec<RawLora>,
    pub enable_lora: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    pub name: String,
    pub path: String,
}

/// How infergate treats its engines when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    Stop,
    Leave,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GpuSource {
    /// Real GPUs through NVML (the default); without NVML nothing is known
    /// and admission does not check memory.
    Nvml,
    /// Declared GPUs (tests, demos): usage is the sum of the running
    /// engines' `gpu_memory_mb`.
    Fake(Vec<FakeGpu>),
    /// No memory accounting.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FakeGpu {
    pub id: u32,
    pub name: String,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Vllm,
    Sglang,
    LlamaCpp,
    Infinilm,
    Command,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::LlamaCpp => "llama_cpp",
            EngineKind::Infinilm => "infinilm",
            EngineKind::Command => "command",
        }
    }

    /// The command a kind runs when the model gives none. `{python}`,
    /// `{path}`, `{name}`, `{host}`, `{port}` are filled in at start.
    pub fn template(self) -> Option<Vec<&'static str>> {
        match self {
            EngineKind::Vllm => Some(vec![
                "{python}",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "{path}",
                "--served-model-name",
                "{name}",
                "--host",
                "{host}",
                "--port",
                "{port}",
            ]),
            EngineKind::Sglang => Some(vec![
                "{python}",
                "-m",
                "sglang.launch_server",
                "--model-path",
                "{path}",
                "--served-model-name",
                "{name}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--enable-metrics",
            ]),
            EngineKind::LlamaCpp => Some(vec![
                "llama-server",
                "-m",
                "{path}",
                "--alias",
                "{name}",
                "--host",
                "{host}",
                "--port",
                "{port}",
            ]),
            // InfiniLM has no public launcher: give `command`
            EngineKind::Infinilm | EngineKind::Command => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedModel {
    pub name: String,
    pub kind: EngineKind,
    pub path: Option<String>,
    /// Program and arguments with placeholders (template or `command`), then `args`.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
    pub gpus: Vec<u32>,
    pub gpu_memory_mb: u64,
    pub startup_timeout: Duration,
    pub health_path: String,
    pub idle_ttl: Option<Duration>,
    pub preload: bool,
    pub max_restarts: u32,
    pub aliases: BTreeMap<String, String>,
    /// LoRA adapters loaded after every start: (name, path).
    pub lora: Vec<(String, String)>,
    /// The engine accepts adapters (vLLM: `--enable-lora`, runtime updates on).
    pub enable_lora: bool,
}

#[cfg(test)]
impl ManagedModel {
    /// A `kind: command` model running `true`, for unit tests.
    pub(crate) fn for_tests(
        name: &str,
        gpus: Vec<u32>,
        gpu_memory_mb: u64,
        idle_ttl: Option<Duration>,
    ) -> ManagedModel {
        ManagedModel {
            name: name.to_string(),
            kind: EngineKind::Command,
            path: None,
            command: vec!["true".to_string()],
            env: vec![],
            workdir: None,
            gpus,
            gpu_memory_mb,
            startup_timeout: Duration::from_secs(1),
            health_path: "/health".to_string(),
            idle_ttl,
            preload: false,
            max_restarts: 0,
            aliases: Default::default(),
            lora: vec![],
            enable_lora: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnginesConfig {
    pub ports: (u16, u16),
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: usize,
    pub stop_grace: Duration,
    pub on_exit: OnExit,
    pub python: String,
    pub gpu: GpuSource,
    pub models: Vec<ManagedModel>,
}

impl Default for EnginesConfig {
    fn default() -> Self {
        EnginesConfig {
            ports: (18100, 18199),
            log_dir: PathBuf::from("logs/engines"),
            log_max_bytes: 50 * 1024 * 1024,
            log_max_files: 5,
            stop_grace: Duration::from_secs(30),
            on_exit: OnExit::Stop,
            python: "python3".to_string(),
            gpu: GpuSource::Nvml,
            models: Vec::new(),
        }
    }
}

/// Validate `engines:`; every problem goes to `err(path, message)`.
pub fn validate(raw: RawEngines, err: &mut dyn FnMut(String, String)) -> EnginesConfig {
    let mut out = EnginesConfig::default();
    let duration = |path: &str,
                    text: Option<&String>,
                    default: Duration,
                    err: &mut dyn FnMut(String, String)| match text {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|e| {
            err(path.to_string(), e);
            default
        }),
    };
    if let Some(range) = &raw.port_range {
        match parse_range(range) {
            Some(r) => out.ports = r,
            None => err(
                "engines.port_range".into(),
                format!("`{range}` is not a port range; write e.g. \"18100-18199\""),
            ),
        }
    }
    if let Some(dir) = raw.log_dir {
        out.log_dir = PathBuf::from(dir);
    }
    if let Some(n) = raw.log_max_bytes {
        out.log_max_bytes = n;
    }
    if let Some(n) = raw.log_max_files {
        out.log_max_files = n;
    }
    out.stop_grace = duration(
        "engines.stop_grace",
        raw.stop_grace.as_ref(),
        out.stop_grace,
        err,
    );
    match raw.on_exit.as_deref() {
        None | Some("stop") => {}
        Some("leave") => out.on_exit = OnExit::Leave,
        Some(other) => err(
            "engines.on_exit".into(),
            format!("`{other}` is not an exit policy; use stop or leave"),
        ),
    }
    if let Some(python) = raw.python {
        out.python = python;
    }
    if let Some(gpu) = raw.gpu {
        out.gpu = match gpu.source.as_deref() {
            None | Some("nvml") => GpuSource::Nvml,
            Some("none") => GpuSource::None,
            Some("fake") => {
                if gpu.fake_gpus.is_empty() {
                    err(
                        "engines.gpu.fake_gpus".into(),
                        "source: fake needs at least one entry like { id: 0, memory_mb: 24576 }"
                            .into(),
                    );
                }
                GpuSource::Fake(
                    gpu.fake_gpus
                        .into_iter()
                        .map(|g| FakeGpu {
                            id: g.id,
                            name: g.name.unwrap_or_else(|| format!("fake-gpu-{}", g.id)),
                            memory_mb: g.memory_mb,
                        })
                        .collect(),
                )
            }
            Some(other) => {
                err(
                    "engines.gpu.source".into(),
                    format!("`{other}` is not a GPU source; use nvml, fake or none"),
                );
                GpuSource::None
            }
        };
    }
    let mut names = std::collections::HashSet::new();
    for (i, m) in raw.models.into_iter().enumerate() {
        let at = |key: &str| format!("engines.models[{i}].{key}");
        let kind = match m.kind.as_str() {
            "vllm" => EngineKind::Vllm,
            "sglang" => EngineKind::Sglang,
            "llama_cpp" => EngineKind::LlamaCpp,
            "infinilm" => EngineKind::Infinilm,
            "command" => EngineKind::Command,
            other => {
                err(
                    at("kind"),
                    format!("`{other}` is not an engine kind; use vllm, sglang, llama_cpp, infinilm or command"),
                );
                EngineKind::Command
            }
        };
        if m.name.is_empty() {
            err(at("name"), "must not be empty".into());
        }
        for name in std::iter::once(&m.name)
            .chain(m.aliases.keys())
            .chain(m.lora.iter().map(|l| &l.name))
        {
            if !names.insert(name.clone()) {
                err(
                    at("name"),
                    format!("`{name}` is used by two managed models"),
                );
            }
        }
        for (alias, target) in &m.aliases {
            if target != &m.name {
                err(
                    format!("engines.models[{i}].aliases.{alias}"),
                    format!("points to `{target}`, but this engine serves `{}`", m.name),
                );
            }
        }
        let mut command: Vec<String> = match (&m.command, kind.template()) {
            (Some(c), _) if !c.is_empty() => c.clone(),
            (Some(_), _) => {
                err(at("command"), "must not be empty".into());
                Vec::new()
            }
            (None, Some(t)) => t.into_iter().map(str::to_string).collect(),
            (None, None) => {
                err(
                    at("command"),
                    format!("kind `{}` has no built-in command: give `command: [program, args...]` with {{port}}", kind.as_str()),
                );
                Vec::new()
            }
        };
        let needs_path = command.iter().any(|a| a.contains("{path}"));
        if needs_path && m.path.is_none() {
            err(
                at("path"),
                format!("kind `{}` needs the model's `path`", kind.as_str()),
            );
        }
        if !command.is_empty() && !command.iter().any(|a| a.contains("{port}")) {
            err(
                at("command"),
                "the command must pass the port infergate chose: include {port}".into(),
            );
        }
        let enable_lora = m.enable_lora.unwrap_or(!m.lora.is_empty());
        if enable_lora && !matches!(kind, EngineKind::Vllm | EngineKind::Command) {
            err(
                at("lora"),
                format!(
                    "LoRA adapters are supported for kind vllm (and command), not `{}`",
                    kind.as_str()
                ),
            );
        }
        let mut env: Vec<(String, String)> = m.env.into_iter().collect();
        if kind == EngineKind::Vllm {
            // vLLM reports usage statistics home unless told not to
            for (k, v) in [("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")] {
                if !env.iter().any(|(name, _)| name == k) {
                    env.push((k.to_string(), v.to_string()));
                }
            }
        }
        if enable_lora && kind == EngineKind::Vllm {
            command.push("--enable-lora".to_string());
            env.push((
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING".to_string(),
                "True".to_string(),
            ));
        }
        command.extend(m.args);
        let health_path = m.health_path.unwrap_or_else(|| "/health".to_string());
        if !health_path.starts_with('/') {
            err(at("health_path"), "must start with `/`".into());
        }
        let gpu_memory_mb = m.gpu_memory_mb.unwrap_or(0);
        if let GpuSource::Fake(gpus) = &out.gpu {
            for id in &m.gpus {
                if !gpus.iter().any(|g| g.id == *id) {
                    err(
                        at("gpus"),
                        format!("GPU {id} is not among engines.gpu.fake_gpus"),
                    );
                }
            }
        }
        if gpu_memory_mb > 0 && m.gpus.is_empty() {
            err(
                at("gpus"),
                "gpu_memory_mb is set: say which GPUs, e.g. gpus: [0]".into(),
            );
        }
        out.models.push(ManagedModel {
            name: m.name,
            kind,
            path: m.path,
            command,
            env,
            workdir: m.workdir.map(PathBuf::from),
            gpus: m.gpus,
            gpu_memory_mb,
            startup_timeout: duration(
                &at("startup_timeout"),
                m.startup_timeout.as_ref(),
                Duration::from_secs(600),
                err,
            ),
            health_path,
            idle_ttl: match m.idle_ttl.as_deref() {
                None | Some("never") => None,
                Some(t) => Some(duration(
                    &at("idle_ttl"),
                    Some(&t.to_string()),
                    Duration::from_secs(1800),
                    err,
                )),
            },
            preload: m.preload.unwrap_or(false),
            max_restarts: m.max_restarts.unwrap_or(3),
            aliases: m.aliases,
            lora: m.lora.into_iter().map(|l| (l.name, l.path)).collect(),
            enable_lora,
        });
    }
    let (lo, hi) = out.ports;
    if lo == 0 || hi < lo {
        err(
            "engines.port_range".into(),
            "must be low-high with 0 < low <= high".into(),
        );
    } else if usize::from(hi - lo) + 1 < out.models.len() {
        err(
            "engines.port_range".into(),
            format!(
                "{} ports for {} managed models; widen it",
                hi - lo + 1,
                out.models.len()
            ),
        );
    }
    out
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let (a, b) = text.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

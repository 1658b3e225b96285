//! GPU state through NVML (`nvml-wrapper`), polled by a background service
//! (`GpuMonitor::poll`, stopped on shutdown) into a snapshot that `/health`
//! and `/metrics` read without touching the driver.
//!
//! Without NVML (no NVIDIA driver, as on CI machines) the snapshot says why,
//! one warning is logged, and everything else works.

use arc_swap::ArcSwap;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// How often GPU state is read.
const POLL_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuMemory {
    pub total_mb: u64,
    pub used_mb: u64,
    pub free_mb: u64,
    /// What a new engine could allocate: NVML's free memory (reserved
    /// memory is already excluded).
    pub available_mb: u64,
}

/// One GPU, in seed 000's shape.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuInfo {
    pub id: u32,
    pub name: String,
    pub temperature: Option<f64>,
    pub utilization_percent: Option<f64>,
    pub memory: GpuMemory,
    pub power_draw_w: Option<f64>,
    pub power_limit_w: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    pub gpus: Vec<GpuInfo>,
    /// GPU memory (MB) per process using a GPU, summed over GPUs, for
    /// attributing memory to managed engines.
    pub processes: Vec<(u32, u64)>,
    /// Why there is no GPU data, when there is none.
    pub unavailable: Option<String>,
}

pub struct GpuMonitor {
    snapshot: ArcSwap<GpuSnapshot>,
}

impl GpuMonitor {
    /// A monitor whose snapshot says nothing has been read yet;
    /// [`GpuMonitor::poll`] (a background service) keeps it current.
    pub fn new() -> Arc<GpuMonitor> {
        Arc::new(GpuMonitor {
            snapshot: ArcSwap::from_pointee(GpuSnapshot {
                unavailable: Some("GPU state has not been read yet".to_string()),
                ..GpuSnapshot::default()
            }),
        })
    }

    pub fn snapshot(&self) -> Arc<GpuSnapshot> {
        self.snapshot.load_full()
    }

    fn unavailable(&self, reason: String) {
        self.snapshot.store(Arc::new(GpuSnapshot {
            unavailable: Some(reason),
            ..GpuSnapshot::default()
        }));
    }

    /// Read GPU state every `POLL_EVERY` until `shutdown`. NVML calls block
    /// (a slow driver can take tens of ms), so each read runs on the
    /// runtime's blocking pool, never on a worker that serves requests.
    pub async fn poll(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let nvml = match tokio::task::spawn_blocking(Nvml::init).await {
            Ok(Ok(nvml)) => Arc::new(nvml),
            Ok(Err(e)) => {
                let reason = format!("NVML is not available ({e}); no NVIDIA GPU state");
                log::warn!("{reason}; GPU fields in /health and /metrics stay empty");
                self.unavailable(reason);
                return;
            }
            Err(e) => {
                self.unavailable(format!("the NVML reader failed: {e}"));
                return;
            }
        };
        loop {
            let reader = nvml.clone();
            match tokio::task::spawn_blocking(move || read(&reader)).await {
                Ok(snapshot) => self.snapshot.store(Arc::new(snapshot)),
                Err(e) => self.unavailable(format!("the NVML reader failed: {e}")),
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Each GPU's total memory (id, MB), read once through NVML (for
/// `--check`); why not, without NVML or without a GPU.
pub fn read_totals() -> Result<Vec<(u32, u64)>, String> {
    let nvml = Nvml::init().map_err(|e| format!("NVML is not available ({e})"))?;
    let snapshot = read(&nvml);
    if let Some(reason) = snapshot.unavailable {
        return Err(reason);
    }
    Ok(snapshot
        .gpus
        .iter()
        .map(|g| (g.id, g.memory.total_mb))
        .collect())
}

fn read(nvml: &Nvml) -> GpuSnapshot {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            return GpuSnapshot {
                unavailable: Some(format!("NVML could not count GPUs: {e}")),
                ..GpuSnapshot::default()
            }
        }
    };
    let mb = |bytes: u64| bytes / (1024 * 1024);
    let mut gpus = Vec::new();
    let mut processes: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for id in 0..count {
        let Ok(device) = nvml.device_by_index(id) else {
            continue;
        };
        let Ok(memory) = device.memory_info() else {
            continue;
        };
        for p in device.running_compute_processes().unwrap_or_default() {
            if let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                *processes.entry(p.pid).or_default() += mb(bytes);
            }
        }
        gpus.push(GpuInfo {
            id,
            name: device.name().unwrap_or_else(|_| "unknown".to_string()),
            temperature: device
                .temperature(TemperatureSensor::Gpu)
                .ok()
                .map(f64::from),
            utilization_percent: device.utilization_rates().ok().map(|u| f64::from(u.gpu)),
            memory: GpuMemory {
                total_mb: mb(memory.total),
                used_mb: mb(memory.used),
                free_mb: mb(memory.free),
                available_mb: mb(memory.free),
            },
            power_draw_w: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            power_limit_w: device
                .enforced_power_limit()
                .ok()
                .map(|mw| f64::from(mw) / 1000.0),
        });
    }
    let unavailable = gpus.is_empty().then(|| "NVML found no GPU".to_string());
    GpuSnapshot {
        gpus,
        processes: processes.into_iter().collect(),
        unavailable,
    }
}

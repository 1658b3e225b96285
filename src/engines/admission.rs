//! GPU admission: whether a model fits on its GPUs, and which idle
//! engines to unload (least recently used first) to make it fit. Pure
//! functions of what the registry knows, so they are tested here.

use crate::config::engines::{EnginesConfig, GpuSource, ManagedModel};

/// One GPU a model would use, as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuRoom {
    pub id: u32,
    /// The GPU's total memory (MB), when known.
    pub total_mb: Option<u64>,
    /// Memory (MB) free for the model now, before any unloading.
    pub free_mb: u64,
}

/// An engine eviction could unload (running, no request in flight): the
/// GPUs it holds, its declared memory on each, and when it was last used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evictable {
    pub gpus: Vec<u32>,
    pub memory_mb: u64,
    /// Unix milliseconds of its last request start or end.
    pub last_used_ms: u64,
}

/// Why a model cannot be admitted, whatever is unloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Infeasible {
    /// It needs more than the GPU has in total: it never fits there.
    LargerThanGpu { gpu: u32, total_mb: u64 },
    /// Free memory plus everything unloading idle engines would free is
    /// still short of what it needs.
    CannotFree {
        gpu: u32,
        free_mb: u64,
        freeable_mb: u64,
    },
}

impl Infeasible {
    /// The `detail` of [`EngineError::NoGpuMemory`] for a model needing `need` MB.
    pub fn describe(&self, need: u64) -> String {
        match self {
            Infeasible::LargerThanGpu { gpu, total_mb } => format!(
                "it needs {need} MB of GPU memory but GPU {gpu} has {total_mb} MB in total, so it can never be loaded there (nothing was unloaded); lower its gpu_memory_mb or give it a larger GPU"
            ),
            Infeasible::CannotFree {
                gpu,
                free_mb,
                freeable_mb: 0,
            } => format!(
                "GPU {gpu} needs {need} MB but has {free_mb} MB free, and no idle model on it can be unloaded; retry later or unload a model"
            ),
            Infeasible::CannotFree {
                gpu,
                free_mb,
                freeable_mb,
            } => format!(
                "GPU {gpu} needs {need} MB but has {free_mb} MB free, and unloading every idle model on it would free only {freeable_mb} MB more (nothing was unloaded); retry later or unload a model"
            ),
        }
    }
}

/// The admission decision for a model needing `need` MB on each GPU of
/// `rooms`, with `candidates` the engines eviction may unload.
///
/// Feasibility comes first, so nothing is unloaded for a model that cannot
/// fit anyway: on every GPU, `need` must be at most its total (when known),
/// and at most its free memory plus the declared memory of every candidate
/// on it. Then, while some GPU (in `rooms` order) is short, the least
/// recently used candidate on that GPU not chosen yet is chosen, and its
/// memory counts as freed on every GPU it holds.
///
/// Returns the indices into `candidates` to unload, in order (empty when the
/// model fits already).
pub fn plan_admission(
    need: u64,
    rooms: &[GpuRoom],
    candidates: &[Evictable],
) -> Result<Vec<usize>, Infeasible> {
    for room in rooms {
        if let Some(total_mb) = room.total_mb {
            if need > total_mb {
                return Err(Infeasible::LargerThanGpu {
                    gpu: room.id,
                    total_mb,
                });
            }
        }
    }
    let freeable = |gpu: u32| -> u64 {
        candidates
            .iter()
            .filter(|c| c.gpus.contains(&gpu))
            .map(|c| c.memory_mb)
            .fold(0, u64::saturating_add)
    };
    for room in rooms {
        let freeable_mb = freeable(room.id);
        if room.free_mb.saturating_add(freeable_mb) < need {
            return Err(Infeasible::CannotFree {
                gpu: room.id,
                free_mb: room.free_mb,
                freeable_mb,
            });
        }
    }
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| candidates[i].last_used_ms);
    let mut free: Vec<u64> = rooms.iter().map(|r| r.free_mb).collect();
    let mut chosen: Vec<usize> = Vec::new();
    while let Some(short) = rooms.iter().zip(&free).position(|(_, &f)| f < need) {
        let gpu = rooms[short].id;
        let next = order.iter().copied().find(|&i| {
            !chosen.contains(&i) && candidates[i].memory_mb > 0 && candidates[i].gpus.contains(&gpu)
        });
        let Some(victim) = next else {
            // cannot happen after the check above; refuse rather than loop
            return Err(Infeasible::CannotFree {
                gpu,
                free_mb: rooms[short].free_mb,
                freeable_mb: freeable(gpu),
            });
        };
        for (room, f) in rooms.iter().zip(free.iter_mut()) {
            if candidates[victim].gpus.contains(&room.id) {
                *f = f.saturating_add(candidates[victim].memory_mb);
            }
        }
        chosen.push(victim);
    }
    Ok(chosen)
}

/// `--check` warnings: each managed model whose `gpu_memory_mb` exceeds the
/// total of one of its GPUs, as `totals` (GPU id, MB) say; `source` names
/// where the totals come from.
pub fn oversized_models(
    models: &[ManagedModel],
    totals: &[(u32, u64)],
    source: &str,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, model) in models.iter().enumerate() {
        for gpu in &model.gpus {
            let Some(&(_, total)) = totals.iter().find(|(id, _)| id == gpu) else {
                continue;
            };
            if model.gpu_memory_mb > total {
                warnings.push(format!(
                    "engines.models[{i}].gpu_memory_mb: `{}` needs {} MB but GPU {gpu} has {total} MB in total ({source}); it can never be loaded there",
                    model.name, model.gpu_memory_mb
                ));
            }
        }
    }
    warnings
}

/// [`oversized_models`] for `config`: totals from `fake_gpus`, or from NVML
/// when it can be read (not at all without a driver, or with `source: none`).
pub fn gpu_fit_warnings(config: &EnginesConfig) -> Vec<String> {
    if !config.models.iter().any(|m| m.gpu_memory_mb > 0) {
        return Vec::new();
    }
    match &config.gpu {
        GpuSource::None => Vec::new(),
        GpuSource::Fake(gpus) => {
            let totals: Vec<(u32, u64)> = gpus.iter().map(|g| (g.id, g.memory_mb)).collect();
            oversized_models(&config.models, &totals, "engines.gpu.fake_gpus")
        }
        GpuSource::Nvml => match crate::gpu::read_totals() {
            Ok(totals) => oversized_models(&config.models, &totals, "NVML"),
            Err(_) => Vec::new(),
        },
    }
}

/// GPU memory of the processes in `pgid`'s process group (an engine and its
/// workers), from NVML's per-process list; `None` when none of them uses a GPU.
pub(super) fn measured_gpu_memory(processes: &[(u32, u64)], pgid: u32) -> Option<u64> {
    let mut total = None;
    for &(pid, mb) in processes {
        let group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // the fields after the `(comm)`: state, ppid, pgrp
                let rest = stat.rsplit_once(')')?.1;
                rest.split_whitespace().nth(2)?.parse::<u32>().ok()
            });
        if pid == pgid || group == Some(pgid) {
            *total.get_or_insert(0) += mb;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: u32, total_mb: u64, free_mb: u64) -> GpuRoom {
        GpuRoom {
            id,
            total_mb: Some(total_mb),
            free_mb,
        }
    }

    fn idle(gpus: &[u32], memory_mb: u64, last_used_ms: u64) -> Evictable {
        Evictable {
            gpus: gpus.to_vec(),
            memory_mb,
            last_used_ms,
        }
    }

    #[test]
    fn a_model_larger_than_the_gpu_is_refused_before_any_eviction() {
        // the H200 of issue #13: one idle 16 GB model running
        let rooms = [room(0, 143_771, 127_771)];
        let candidates = [idle(&[0], 16_000, 1)];
        let why = plan_admission(200_000, &rooms, &candidates).unwrap_err();
        assert_eq!(
            why,
            Infeasible::LargerThanGpu {
                gpu: 0,
                total_mb: 143_771
            }
        );
        let text = why.describe(200_000);
        assert!(
            text.contains("200000 MB") && text.contains("GPU 0 has 143771 MB in total"),
            "{text}"
        );
        // the total of every GPU of the model counts, not only the first
        let rooms = [room(0, 80_000, 80_000), room(1, 40_000, 40_000)];
        assert_eq!(
            plan_admission(50_000, &rooms, &[]),
            Err(Infeasible::LargerThanGpu {
                gpu: 1,
                total_mb: 40_000
            })
        );
    }

    #[test]
    fn refused_when_unloading_every_idle_engine_would_not_free_enough() {
        // 24 GB: 4 GB free, two idle engines of 4 GB (a busy one is not a candidate)
        let rooms = [room(0, 24_000, 4_000)];
        let candidates = [idle(&[0], 4_000, 1), idle(&[0], 4_000, 2)];
        let why = plan_admission(16_000, &rooms, &candidates).unwrap_err();
        assert_eq!(
            why,
            Infeasible::CannotFree {
                gpu: 0,
                free_mb: 4_000,
                freeable_mb: 8_000
            }
        );
        let text = why.describe(16_000);
        assert!(
            text.contains("needs 16000 MB")
                && text.contains("4000 MB free")
                && text.contains("only 8000 MB"),
            "{text}"
        );
        // an engine on another GPU frees nothing here
        let candidates = [idle(&[1], 20_000, 1)];
        let why = plan_admission(16_000, &rooms, &candidates).unwrap_err();
        assert_eq!(
            why,
            Infeasible::CannotFree {
                gpu: 0,
                free_mb: 4_000,
                freeable_mb: 0
            }
        );
        assert!(why
            .describe(16_000)
            .contains("no idle model on it can be unloaded"));
    }

    #[test]
    fn evicts_exactly_the_least_recently_used_engines_needed() {
        // 8 GB free; needs 16 GB: the two least recently used 4 GB engines go
        let rooms = [room(0, 24_000, 8_000)];
        let candidates = [
            idle(&[0], 4_000, 300), // most recent: stays
            idle(&[0], 4_000, 100), // least recent
            idle(&[0], 4_000, 200),
        ];
        assert_eq!(plan_admission(16_000, &rooms, &candidates), Ok(vec![1, 2]));
        // a large LRU engine alone is enough
        let candidates = [idle(&[0], 4_000, 200), idle(&[0], 16_000, 100)];
        assert_eq!(plan_admission(16_000, &rooms, &candidates), Ok(vec![1]));
        // two GPUs: an engine on both frees memory on both
        let rooms = [room(0, 24_000, 0), room(1, 24_000, 8_000)];
        let candidates = [
            idle(&[1], 8_000, 50),
            idle(&[0, 1], 16_000, 100),
            idle(&[0], 16_000, 200),
        ];
        assert_eq!(plan_admission(16_000, &rooms, &candidates), Ok(vec![1]));
    }

    #[test]
    fn measured_memory_sums_the_engines_process_group_only() {
        let me = std::process::id();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let group: u32 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse().ok())
            .unwrap();
        // this test process is in `group`; pid 0 never exists
        let processes = [(me, 300), (0, 50)];
        assert_eq!(measured_gpu_memory(&processes, group), Some(300));
        // the group leader itself counts even without its /proc entry read
        assert_eq!(measured_gpu_memory(&[(0, 50)], 0), Some(50));
        // no process of the group on a GPU: nothing measured (not 0)
        assert_eq!(measured_gpu_memory(&processes, u32::MAX), None);
    }

    #[test]
    fn nothing_is_evicted_when_the_model_fits_already() {
        let rooms = [room(0, 24_000, 16_000)];
        let candidates = [idle(&[0], 8_000, 1)];
        assert_eq!(plan_admission(16_000, &rooms, &candidates), Ok(vec![]));
        // nothing known about the GPU (no NVML): no decision blocks
        assert_eq!(plan_admission(16_000, &[], &candidates), Ok(vec![]));
        // a total NVML cannot say does not block either
        let unknown = [GpuRoom {
            id: 0,
            total_mb: None,
            free_mb: 20_000,
        }];
        assert_eq!(plan_admission(16_000, &unknown, &[]), Ok(vec![]));
    }

    #[test]
    fn check_warns_about_models_larger_than_their_gpu() {
        let model = |name: &str, gpus: Vec<u32>, gpu_memory_mb: u64| {
            ManagedModel::for_tests(name, gpus, gpu_memory_mb, None)
        };
        let models = [
            model("fits", vec![0], 16_000),
            model("huge", vec![0], 200_000),
            model("unknown-gpu", vec![7], 200_000),
        ];
        let warnings = oversized_models(&models, &[(0, 143_771)], "NVML");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("engines.models[1]")
                && warnings[0].contains("`huge` needs 200000 MB")
                && warnings[0].contains("GPU 0 has 143771 MB in total"),
            "{warnings:?}"
        );
    }
}

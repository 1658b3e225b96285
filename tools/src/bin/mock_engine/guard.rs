//! Per-request accounting: active/completed/cancelled counters and the
//! per-model running gauge.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::state::State;

/// Tracks one in-flight inference request. Created when the request arrives;
/// moved into the streaming body for streamed responses. If dropped without
/// `finish`/`dropped_by_server`, the client went away: counts as cancelled.
pub struct InflightGuard {
    state: Arc<State>,
    model: Option<usize>,
    streaming: bool,
    done: bool,
}

impl InflightGuard {
    pub fn new(state: Arc<State>) -> Self {
        state.counters.requests.fetch_add(1, Ordering::Relaxed);
        state.counters.active.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            state,
            model: None,
            streaming: false,
            done: false,
        }
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Attribute this request to a served model (for vllm:num_requests_running).
    pub fn set_model(&mut self, idx: usize) {
        if self.model.is_none() {
            if let Some(m) = self.state.models.get(idx) {
                m.running.fetch_add(1, Ordering::Relaxed);
                self.model = Some(idx);
            }
        }
    }

    pub fn set_streaming(&mut self) {
        self.streaming = true;
    }

    fn close(&mut self) {
        self.done = true;
        self.state.counters.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = self.model.and_then(|i| self.state.models.get(i)) {
            m.running.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The response was fully produced.
    pub fn finish(mut self) {
        self.finish_in_place();
    }

    pub fn finish_in_place(&mut self) {
        if !self.done {
            self.close();
            self.state
                .counters
                .completed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The server deliberately aborted the stream (--drop-after-chunks).
    pub fn dropped_by_server(&mut self) {
        if !self.done {
            self.close();
            let c = &self.state.counters;
            c.dropped_streams.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.close();
            let c = &self.state.counters;
            c.cancelled.fetch_add(1, Ordering::Relaxed);
            if self.streaming {
                c.aborted_streams.fetch_add(1, Ordering::Relaxed);
            }
            log::debug!("request cancelled (streaming: {})", self.streaming);
        }
    }
}

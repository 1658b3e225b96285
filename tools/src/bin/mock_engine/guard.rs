//! Per-request accounting: active/completed/cancelled counters, and the
//! running slot a request holds once the scheduler lets it run.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::sched::RunSlot;
use crate::state::State;

/// Tracks one in-flight inference request. Created when the request arrives;
/// moved into the streaming body for streamed responses. If dropped without
/// `finish`/`dropped_by_server`, the client went away: counts as cancelled.
pub struct InflightGuard {
    state: Arc<State>,
    model: Option<usize>,
    streaming: bool,
    done: bool,
    /// Held from the end of the queue to the end of the response.
    slot: Option<RunSlot>,
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
            slot: None,
        }
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Attribute this request to a served model.
    pub fn set_model(&mut self, idx: usize) {
        if self.model.is_none() && idx < self.state.models.len() {
            self.model = Some(idx);
        }
    }

    /// Keep the request's running slot until the request ends.
    pub fn hold(&mut self, slot: RunSlot) {
        self.slot = Some(slot);
    }

    pub fn set_streaming(&mut self) {
        self.streaming = true;
    }

    /// Called after the outcome is counted, so whoever sees the next queued
    /// request run also sees this one's outcome.
    fn close(&mut self) {
        self.done = true;
        self.state.counters.active.fetch_sub(1, Ordering::Relaxed);
        // frees the running slot for the next queued request
        self.slot = None;
    }

    /// The response was fully produced.
    pub fn finish(mut self) {
        self.finish_in_place();
    }

    pub fn finish_in_place(&mut self) {
        if !self.done {
            self.state
                .counters
                .completed
                .fetch_add(1, Ordering::Relaxed);
            self.close();
        }
    }

    /// The server deliberately aborted the stream (--drop-after-chunks).
    pub fn dropped_by_server(&mut self) {
        if !self.done {
            let c = &self.state.counters;
            c.dropped_streams.fetch_add(1, Ordering::Relaxed);
            self.close();
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if !self.done {
            let c = &self.state.counters;
            c.cancelled.fetch_add(1, Ordering::Relaxed);
            if self.streaming {
                c.aborted_streams.fetch_add(1, Ordering::Relaxed);
            }
            self.close();
            log::debug!("request cancelled (streaming: {})", self.streaming);
        }
    }
}

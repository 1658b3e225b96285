//! The engine's scheduler: at most `--max-running` requests run (prefill and
//! generate) at once; the others wait in a FIFO queue.
//!
//! The queue is tokio's fair semaphore: permits go to waiters in the order
//! they asked. A waiter whose client disconnects is dropped with its request
//! future, which takes it out of the queue at once, so it never runs.
//! A running request holds its [`RunSlot`] until its response is complete
//! (for a stream, until the last event or until the client leaves).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::State;

/// Scheduler state and its gauges (global; per-model gauges live in
/// [`crate::state::ModelStats`]).
pub struct Scheduler {
    /// `None`: unlimited (no queue).
    slots: Option<Arc<Semaphore>>,
    pub running: AtomicI64,
    /// The highest `running` ever seen (`/mock/stats` `max_active`).
    pub max_running_seen: AtomicI64,
    pub queued: AtomicI64,
    pub max_queued: AtomicI64,
    /// Requests that got a running slot.
    pub started: AtomicU64,
}

impl Scheduler {
    pub fn new(max_running: Option<usize>) -> Self {
        Scheduler {
            slots: max_running.map(|n| Arc::new(Semaphore::new(n))),
            running: AtomicI64::new(0),
            max_running_seen: AtomicI64::new(0),
            queued: AtomicI64::new(0),
            max_queued: AtomicI64::new(0),
            started: AtomicU64::new(0),
        }
    }
}

/// Counts a request as waiting while it exists.
struct Waiting {
    state: Arc<State>,
    model: usize,
}

impl Waiting {
    fn new(state: Arc<State>, model: usize) -> Self {
        let s = &state.sched;
        let now = s.queued.fetch_add(1, Ordering::Relaxed) + 1;
        s.max_queued.fetch_max(now, Ordering::Relaxed);
        if let Some(m) = state.models.get(model) {
            m.waiting.fetch_add(1, Ordering::Relaxed);
        }
        Waiting { state, model }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.state.sched.queued.fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = self.state.models.get(self.model) {
            m.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A running request's slot: counted in `running` (global and per model)
/// while it lives; its permit goes to the next waiter when dropped.
pub struct RunSlot {
    state: Arc<State>,
    model: usize,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        // Before the permit is released (fields drop after this body), so
        // `running` never exceeds the limit.
        self.state.sched.running.fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = self.state.models.get(self.model) {
            m.running.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Wait for a running slot (FIFO behind earlier requests).
pub async fn acquire(state: &Arc<State>, model: usize) -> RunSlot {
    let permit = match &state.sched.slots {
        None => None,
        Some(sem) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let _waiting = Waiting::new(state.clone(), model);
                // A closed semaphore (never closed here) would run unlimited.
                sem.clone().acquire_owned().await.ok()
            }
        },
    };
    let s = &state.sched;
    let now = s.running.fetch_add(1, Ordering::Relaxed) + 1;
    s.max_running_seen.fetch_max(now, Ordering::Relaxed);
    s.started.fetch_add(1, Ordering::Relaxed);
    if let Some(m) = state.models.get(model) {
        m.running.fetch_add(1, Ordering::Relaxed);
    }
    RunSlot {
        state: state.clone(),
        model,
        _permit: permit,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::Engine;
    use std::time::Duration;

    fn state(max_running: Option<usize>) -> Arc<State> {
        Arc::new(State::for_tests(
            &["m"],
            Engine {
                max_running,
                prefix_cache_tokens: 0,
            },
        ))
    }

    fn gauges(st: &State) -> (i64, i64, i64, i64) {
        let s = &st.sched;
        (
            s.running.load(Ordering::Relaxed),
            s.queued.load(Ordering::Relaxed),
            st.models[0].running.load(Ordering::Relaxed),
            st.models[0].waiting.load(Ordering::Relaxed),
        )
    }

    /// Poll until `cond` or a deadline (the tasks run on the same runtime).
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn unlimited_never_queues() {
        let st = state(None);
        let slots: Vec<RunSlot> = futures_join(&st, 5).await;
        assert_eq!(gauges(&st), (5, 0, 5, 0));
        drop(slots);
        assert_eq!(gauges(&st), (0, 0, 0, 0));
        assert_eq!(st.sched.max_running_seen.load(Ordering::Relaxed), 5);
        assert_eq!(st.sched.max_queued.load(Ordering::Relaxed), 0);
    }

    async fn futures_join(st: &Arc<State>, n: usize) -> Vec<RunSlot> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(acquire(st, 0).await);
        }
        v
    }

    #[tokio::test]
    async fn waiters_run_in_order_as_slots_free() {
        let st = state(Some(2));
        let a = acquire(&st, 0).await;
        let b = acquire(&st, 0).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (st2, order, tx) = (st.clone(), order.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let slot = acquire(&st2, 0).await;
                order.lock().unwrap().push(i);
                let _ = tx.send(slot);
            }));
            // queue them one after the other
            let want = i + 1;
            until("queued", || st.sched.queued.load(Ordering::Relaxed) == want).await;
        }
        assert_eq!(gauges(&st), (2, 3, 2, 3));
        drop(a);
        let first = rx.recv().await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec![0]);
        assert_eq!(gauges(&st), (2, 2, 2, 2));
        drop(b);
        drop(first);
        let s1 = rx.recv().await.unwrap();
        let s2 = rx.recv().await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(gauges(&st), (2, 0, 2, 0));
        drop((s1, s2));
        assert_eq!(gauges(&st), (0, 0, 0, 0));
        assert_eq!(st.sched.max_running_seen.load(Ordering::Relaxed), 2);
        assert_eq!(st.sched.max_queued.load(Ordering::Relaxed), 3);
        assert_eq!(st.sched.started.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue_and_never_runs() {
        let st = state(Some(1));
        let a = acquire(&st, 0).await;
        let st2 = st.clone();
        let waiter = tokio::spawn(async move {
            let _slot = acquire(&st2, 0).await;
        });
        until("queued", || st.sched.queued.load(Ordering::Relaxed) == 1).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(gauges(&st), (1, 0, 1, 0));
        drop(a);
        assert_eq!(gauges(&st), (0, 0, 0, 0));
        assert_eq!(st.sched.started.load(Ordering::Relaxed), 1);
        // the slot it would have had is free
        let _c = acquire(&st, 0).await;
        assert_eq!(st.sched.started.load(Ordering::Relaxed), 2);
    }
}

//! The prefix index stays within its memory budget, measured by the
//! allocator (not by the index's own arithmetic): 100,000 distinct
//! conversations through a 4 MiB index.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use infergate::routing::{PrefixIndex, PromptKey, ENTRY_BYTES};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Counts the bytes live on the heap (this test binary only).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn index_memory_stays_under_its_budget_with_100k_distinct_prompts() {
    let budget: u64 = 4 * 1024 * 1024;
    let index = PrefixIndex::new(budget, 10_000);
    let before = LIVE.load(Ordering::Relaxed);
    let mut peak = 0isize;
    for i in 0..100_000u64 {
        // a distinct ~1 KiB conversation (8 blocks of 128 bytes) and session
        let prompt = format!("[{{\"role\":\"system\",\"content\":\"conversation {i:<1000}\"}}]");
        let session = i.to_le_bytes();
        let key = PromptKey::new(&[b"m"], prompt.as_bytes(), 128).with_session(Some(&session));
        drop(prompt);
        index.route(&key, |_| Some((i % 8) as usize));
        drop(key);
        if i % 1000 == 0 {
            peak = peak.max(LIVE.load(Ordering::Relaxed) - before);
        }
    }
    let held = LIVE.load(Ordering::Relaxed) - before;
    peak = peak.max(held);
    let (entries, accounted, evictions) = index.usage();
    assert!(
        evictions > 0,
        "the budget was never reached: {entries} entries, {accounted} bytes"
    );
    assert!(
        accounted <= budget,
        "accounted {accounted} > budget {budget}"
    );
    assert!(
        peak as u64 <= budget,
        "the index held {peak} bytes at its peak, over its {budget}-byte budget"
    );
    // the per-entry bound the metrics report is an upper bound of reality
    assert!(
        held as u64 <= entries * ENTRY_BYTES,
        "{held} > {entries} × {ENTRY_BYTES}"
    );
    eprintln!(
        "100k conversations: {entries} entries, {held} bytes held (peak {peak}), {accounted} accounted, {evictions} evicted"
    );
}

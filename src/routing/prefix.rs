//! The prefix index of a `prefix_aware` pool: which backend was sent which
//! prompt prefix, so the next turn of a conversation goes where its prefix is
//! most likely still in the engine's KV cache.
//!
//! A prompt is the bytes the engine will render the prompt from — a chat's
//! `messages` array as the client sent it (system, history, new turn, in
//! order), a completion's `prompt` — cut into blocks of `block_bytes`. Block
//! *i*'s hash chains block *i − 1*'s, and block 0's is seeded with the model
//! (or LoRA adapter) name and the `tools` the request declares, so a block
//! matches only after the same whole prefix on the same model. The index maps
//! a block hash to the set of backends it was sent to (a bit mask), in an LRU
//! bounded by `index_bytes`; a backend that restarts or fails its health
//! checks loses its bits. It is approximate by design (SGLang's router and
//! llm-d's approximate scorer work the same way): an engine may have evicted
//! a block the index still lists, and the index never sees other clients.

use lru::LruCache;
use std::sync::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Backends a prefix-aware pool can tell apart (bits of the mask).
pub use crate::config::PREFIX_MAX_BACKENDS as MAX_BACKENDS;

/// Upper bound of the heap one entry costs: the LRU node (key, value, two
/// links: 32 bytes) plus its share of the hash table (16 bytes and a control
/// byte per bucket; under eviction churn the table holds up to ≈ 4.6 buckets
/// per live entry, as deletions leave tombstones and a rehash doubles it:
/// ≈ 78 bytes). Measured with the real allocator in
/// `tests/prefix_index_memory.rs` (≈ 85 bytes per entry at 100k conversations).
pub const ENTRY_BYTES: u64 = 112;

/// The block hashes of one request's prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptKey {
    pub blocks: Vec<u64>,
    pub block_bytes: usize,
    /// The session the request belongs to (header or user), hashed.
    pub session: Option<u64>,
}

impl PromptKey {
    /// Hash `prompt` in blocks of `block_bytes` (full blocks only: the tail
    /// is the part most likely to differ next turn), seeded with `seed`
    /// (model name, tools).
    pub fn new(seed: &[&[u8]], prompt: &[u8], block_bytes: usize) -> PromptKey {
        let mut h = 0u64;
        for part in seed {
            h = xxh3_64_with_seed(part, h);
        }
        let block_bytes = block_bytes.max(1);
        let blocks = prompt
            .chunks_exact(block_bytes)
            .map(|block| {
                h = xxh3_64_with_seed(block, h);
                h
            })
            .collect();
        PromptKey {
            blocks,
            block_bytes,
            session: None,
        }
    }

    pub fn with_session(mut self, session: Option<&[u8]>) -> PromptKey {
        self.session = session.map(|s| xxh3_64_with_seed(s, 0x5e55_1011));
        self
    }
}

/// What the index knows about a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Match {
    /// Backends (by position) holding the longest matching prefix.
    pub holders: u64,
    /// Full blocks matched.
    pub blocks: usize,
    /// The backend this request's session last went to.
    pub session: Option<usize>,
}

struct Inner {
    blocks: LruCache<u64, u64>,
    sessions: LruCache<u64, u8>,
    evictions: u64,
}

pub struct PrefixIndex {
    inner: Mutex<Inner>,
    budget_bytes: u64,
    max_sessions: usize,
}

impl PrefixIndex {
    pub fn new(budget_bytes: u64, max_sessions: usize) -> PrefixIndex {
        PrefixIndex {
            inner: Mutex::new(Inner {
                blocks: LruCache::unbounded(),
                sessions: LruCache::unbounded(),
                evictions: 0,
            }),
            budget_bytes,
            max_sessions: max_sessions.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Look the prompt up, let `choose` pick a backend position from what
    /// was found, and record that the prompt went there — under one lock.
    pub fn route<F>(&self, key: &PromptKey, choose: F) -> Option<usize>
    where
        F: FnOnce(Match) -> Option<usize>,
    {
        let mut inner = self.lock();
        let mut found = Match::default();
        let mut mask = u64::MAX;
        for hash in &key.blocks {
            match inner.blocks.peek(hash) {
                Some(&holders) if holders & mask != 0 => {
                    mask &= holders;
                    found.blocks += 1;
                }
                _ => break,
            }
        }
        if found.blocks > 0 {
            found.holders = mask;
        }
        if let Some(session) = key.session {
            found.session = inner.sessions.peek(&session).map(|&b| usize::from(b));
        }
        let chosen = choose(found)?;
        if chosen >= MAX_BACKENDS {
            return Some(chosen);
        }
        let bit = 1u64 << chosen;
        for &hash in &key.blocks {
            match inner.blocks.get_mut(&hash) {
                Some(holders) => *holders |= bit,
                None => {
                    inner.blocks.push(hash, bit);
                }
            }
        }
        if let Some(session) = key.session {
            // positions are < MAX_BACKENDS (64), so they fit a byte
            inner.sessions.push(session, chosen as u8);
            while inner.sessions.len() > self.max_sessions {
                inner.sessions.pop_lru();
            }
        }
        self.evict(&mut inner);
        Some(chosen)
    }

    fn evict(&self, inner: &mut Inner) {
        let max_entries = (self.budget_bytes / ENTRY_BYTES) as usize;
        while inner.blocks.len() + inner.sessions.len() > max_entries {
            if inner.blocks.pop_lru().is_none() && inner.sessions.pop_lru().is_none() {
                break;
            }
            inner.evictions += 1;
        }
    }

    /// The backend at `position` lost its cache (restart, failed health
    /// checks): drop it from every entry.
    pub fn forget_backend(&self, position: usize) {
        if position >= MAX_BACKENDS {
            return;
        }
        let bit = 1u64 << position;
        let mut inner = self.lock();
        for (_, holders) in inner.blocks.iter_mut() {
            *holders &= !bit;
        }
        inner.blocks.retain(|_, holders| *holders != 0);
        inner
            .sessions
            .retain(|_, &mut b| usize::from(b) != position);
    }

    /// (entries, bytes by the [`ENTRY_BYTES`] bound, evictions so far).
    pub fn usage(&self) -> (u64, u64, u64) {
        let inner = self.lock();
        let entries = (inner.blocks.len() + inner.sessions.len()) as u64;
        (entries, entries * ENTRY_BYTES, inner.evictions)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> PromptKey {
        PromptKey::new(&[b"model"], text.as_bytes(), 16)
    }

    #[test]
    fn a_longer_conversation_matches_its_earlier_turn() {
        let index = PrefixIndex::new(1 << 20, 100);
        let turn1 = "[{\"role\":\"system\",\"content\":\"you are a helpful bot\"},{\"role\":\"user\",\"content\":\"hi\"}";
        let turn2 = format!("{turn1},{{\"role\":\"assistant\",\"content\":\"hello\"}}]");
        assert_eq!(
            index.route(&key(turn1), |m| {
                assert_eq!(m.blocks, 0);
                Some(2)
            }),
            Some(2)
        );
        index.route(&key(&turn2), |m| {
            assert_eq!(m.holders, 1 << 2);
            assert_eq!(m.blocks, turn1.len() / 16);
            Some(2)
        });
        // another model: no match
        let other = PromptKey::new(&[b"lora-b"], turn2.as_bytes(), 16);
        index.route(&other, |m| {
            assert_eq!(m.blocks, 0);
            None
        });
    }

    #[test]
    fn the_longest_prefix_wins_and_holders_narrow() {
        let index = PrefixIndex::new(1 << 20, 100);
        let base = "x".repeat(64);
        index.route(&key(&base), |_| Some(0));
        let longer = format!("{base}{}", "y".repeat(64));
        index.route(&key(&longer), |m| {
            assert_eq!((m.holders, m.blocks), (1, 4));
            Some(1)
        });
        index.route(&key(&format!("{longer}z")), |m| {
            assert_eq!((m.holders, m.blocks), (0b10, 8));
            None
        });
        index.route(&key(&base), |m| {
            assert_eq!((m.holders, m.blocks), (0b11, 4));
            None
        });
        index.forget_backend(1);
        index.route(&key(&longer), |m| {
            assert_eq!((m.holders, m.blocks), (1, 4));
            None
        });
    }

    #[test]
    fn sessions_are_remembered_and_bounded() {
        let index = PrefixIndex::new(1 << 20, 2);
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            index.route(&key("").with_session(Some(s.as_bytes())), |_| Some(i));
        }
        index.route(&key("").with_session(Some(b"c")), |m| {
            assert_eq!(m.session, Some(2));
            None
        });
        index.route(&key("").with_session(Some(b"a")), |m| {
            assert_eq!(m.session, None, "evicted: max_sessions is 2");
            None
        });
    }

    #[test]
    fn stays_within_its_budget() {
        let budget = 64 * 1024;
        let index = PrefixIndex::new(budget, 10);
        for i in 0..10_000 {
            index.route(&key(&format!("{i:064}")), |_| Some(i % 3));
        }
        let (entries, bytes, evictions) = index.usage();
        assert!(bytes <= budget, "{bytes} > {budget}");
        assert_eq!(entries, budget / ENTRY_BYTES);
        assert!(evictions > 0);
    }
}

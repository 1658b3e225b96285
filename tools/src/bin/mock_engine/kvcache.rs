//! The engine's prompt tokens and its prefix cache (vLLM's automatic prefix
//! caching, simplified).
//!
//! **Tokens.** The mock has no tokenizer: a prompt's tokens are the
//! whitespace-separated words of the prompt as the engine would see it.
//! - chat: the messages in order; each contributes a role marker (one token,
//!   hashed apart from words, so a word `user` never equals the marker), then
//!   the words of its content (a string, or the `text` of each text part; any
//!   other part, e.g. an image, and each tool call count as one token each:
//!   their JSON). A follow-up turn (same system prompt and history + a new
//!   message) thus extends the previous turn's token sequence.
//! - completions: the prompt's words; a list of token ids is those ids; a
//!   list of prompts is one sequence per prompt (as vLLM runs them).
//! - embeddings: the input, like a completion prompt.
//!
//! This count is the scheduler's and the cache's view (`/mock/stats`
//! `prompt_tokens`, the `vllm:prefix_cache_*` counters). The `usage` in
//! responses and `vllm:prompt_tokens_total` keep the older estimate
//! (characters / 4) that gateway tests settle quotas against.
//!
//! **Blocks.** Tokens are grouped in blocks of [`BLOCK_TOKENS`]; only full
//! blocks are cached. Block *i*'s hash covers block *i − 1*'s hash and its own
//! tokens, and block 0's covers the model name the request used (a LoRA
//! adapter's name when it asked for one), so a block matches only after the
//! same whole prefix on the same model/adapter.
//!
//! **Cache.** An LRU set of block hashes holding at most
//! `capacity tokens / 16` blocks. A prompt's cached prefix is the longest run
//! of its leading blocks present in the cache. After prefill every full block
//! of the prompt is inserted or refreshed, the first block becoming the most
//! recently used and the last the least (as vLLM frees a sequence's blocks
//! tail first), so eviction takes the tails of prompts before their shared
//! prefixes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

use crate::inference::Endpoint;

/// Tokens per KV-cache block (vLLM's default block size).
pub const BLOCK_TOKENS: u64 = 16;

/// One prompt token as hashed: tagged by kind so kinds never collide.
#[derive(Clone, Copy, Debug)]
pub enum Tok<'a> {
    Word(&'a str),
    Id(i64),
    Role(&'a str),
    /// A non-text content part or a tool call, as its JSON.
    Opaque(&'a str),
}

impl Tok<'_> {
    fn hash_into(&self, h: &mut DefaultHasher) {
        match self {
            Tok::Word(w) => {
                0u8.hash(h);
                w.hash(h);
            }
            Tok::Id(n) => {
                1u8.hash(h);
                n.hash(h);
            }
            Tok::Role(r) => {
                2u8.hash(h);
                r.hash(h);
            }
            Tok::Opaque(s) => {
                3u8.hash(h);
                s.hash(h);
            }
        }
    }
}

/// Counts one sequence's tokens and, when asked, hashes its full blocks.
pub struct BlockHasher {
    hashing: bool,
    parent: u64,
    cur: DefaultHasher,
    in_block: u64,
    tokens: u64,
    hashes: Vec<u64>,
}

impl BlockHasher {
    /// `root`: what block 0's hash chains from (the model or adapter name).
    pub fn new(root: &str, hashing: bool) -> Self {
        let mut h = DefaultHasher::new();
        "mock-engine prefix root".hash(&mut h);
        root.hash(&mut h);
        let parent = h.finish();
        BlockHasher {
            hashing,
            parent,
            cur: Self::block_start(parent),
            in_block: 0,
            tokens: 0,
            hashes: Vec::new(),
        }
    }

    fn block_start(parent: u64) -> DefaultHasher {
        let mut h = DefaultHasher::new();
        parent.hash(&mut h);
        h
    }

    pub fn push(&mut self, tok: Tok<'_>) {
        self.tokens += 1;
        if !self.hashing {
            return;
        }
        tok.hash_into(&mut self.cur);
        self.in_block += 1;
        if self.in_block == BLOCK_TOKENS {
            let hash = self.cur.finish();
            self.hashes.push(hash);
            self.parent = hash;
            self.cur = Self::block_start(hash);
            self.in_block = 0;
        }
    }

    pub fn push_words(&mut self, text: &str) {
        for w in text.split_whitespace() {
            self.push(Tok::Word(w));
        }
    }

    pub fn finish(self) -> Sequence {
        Sequence {
            tokens: self.tokens,
            blocks: self.hashes,
        }
    }
}

/// One prompt sequence: its token count and the hashes of its full blocks
/// (empty when the cache is off).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: u64,
    pub blocks: Vec<u64>,
}

/// The prompt sequences of a validated request. `root` names the model or
/// adapter; `hashing` is whether the cache is on (else only counts).
pub fn prompt_sequences(
    endpoint: Endpoint,
    req: &Value,
    root: &str,
    hashing: bool,
) -> Vec<Sequence> {
    match endpoint {
        Endpoint::Chat => {
            let mut b = BlockHasher::new(root, hashing);
            if let Some(Value::Array(msgs)) = req.get("messages") {
                for m in msgs {
                    chat_message(m, &mut b);
                }
            }
            vec![b.finish()]
        }
        Endpoint::Completions => prompts(req.get("prompt"), root, hashing),
        Endpoint::Embeddings => prompts(req.get("input"), root, hashing),
    }
}

fn chat_message(m: &Value, b: &mut BlockHasher) {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    b.push(Tok::Role(role));
    match m.get("content") {
        Some(Value::String(s)) => b.push_words(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p {
                    Value::String(s) => b.push_words(s),
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(t)) => b.push_words(t),
                        _ => b.push(Tok::Opaque(&p.to_string())),
                    },
                    other => b.push(Tok::Opaque(&other.to_string())),
                }
            }
        }
        _ => {}
    }
    if let Some(Value::Array(calls)) = m.get("tool_calls") {
        for c in calls {
            b.push(Tok::Opaque(&c.to_string()));
        }
    }
}

/// A completion prompt / embedding input: one sequence per prompt.
fn prompts(v: Option<&Value>, root: &str, hashing: bool) -> Vec<Sequence> {
    let Some(v) = v else {
        return vec![Sequence::default()];
    };
    crate::tokens::split_inputs(v)
        .into_iter()
        .map(|one| {
            let mut b = BlockHasher::new(root, hashing);
            match one {
                Value::String(s) => b.push_words(s),
                Value::Array(ids) => {
                    for id in ids {
                        match id.as_i64() {
                            Some(n) => b.push(Tok::Id(n)),
                            None => b.push(Tok::Opaque(&id.to_string())),
                        }
                    }
                }
                _ => {}
            }
            b.finish()
        })
        .collect()
}

/// LRU set of block hashes.
pub struct PrefixCache {
    capacity_blocks: usize,
    /// block hash → its last-use stamp
    blocks: HashMap<u64, u64>,
    /// last-use stamp → block hash (first = least recently used)
    lru: BTreeMap<u64, u64>,
    clock: u64,
    evictions: u64,
}

impl PrefixCache {
    pub fn new(capacity_tokens: u64) -> Self {
        PrefixCache {
            capacity_blocks: usize::try_from(capacity_tokens / BLOCK_TOKENS).unwrap_or(usize::MAX),
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            evictions: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity_blocks > 0
    }

    /// Leading blocks of `hashes` present in the cache.
    pub fn match_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.blocks.contains_key(h))
            .count()
    }

    /// Insert or refresh `hashes` (a sequence's full blocks, in order), then
    /// evict least recently used blocks beyond the capacity.
    pub fn insert(&mut self, hashes: &[u64]) {
        if !self.enabled() {
            return;
        }
        // Last block first: the first block ends up most recently used.
        for h in hashes.iter().rev() {
            self.clock += 1;
            if let Some(old) = self.blocks.insert(*h, self.clock) {
                self.lru.remove(&old);
            }
            self.lru.insert(self.clock, *h);
        }
        while self.blocks.len() > self.capacity_blocks {
            let Some((_, h)) = self.lru.pop_first() else {
                break;
            };
            self.blocks.remove(&h);
            self.evictions += 1;
        }
    }

    /// Tokens held (full blocks × 16).
    pub fn cached_tokens(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK_TOKENS
    }

    pub fn capacity_tokens(&self) -> u64 {
        self.capacity_blocks as u64 * BLOCK_TOKENS
    }

    /// Cached tokens / capacity, 0 when the cache is off.
    pub fn usage(&self) -> f64 {
        if self.enabled() {
            self.cached_tokens() as f64 / self.capacity_tokens() as f64
        } else {
            0.0
        }
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(n: usize, tag: &str) -> String {
        (0..n)
            .map(|i| format!("{tag}{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn seq(text: &str) -> Sequence {
        let mut b = BlockHasher::new("m", true);
        b.push_words(text);
        b.finish()
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        assert_eq!(seq("").tokens, 0);
        assert!(seq(&words(15, "w")).blocks.is_empty());
        let s = seq(&words(40, "w"));
        assert_eq!(s.tokens, 40);
        assert_eq!(s.blocks.len(), 2);
        // whitespace of any kind separates, runs of it count once
        assert_eq!(seq(" a\tb\n\nc  ").tokens, 3);
        // counting only: no hashes
        let mut b = BlockHasher::new("m", false);
        b.push_words(&words(40, "w"));
        assert_eq!(
            b.finish(),
            Sequence {
                tokens: 40,
                blocks: vec![]
            }
        );
    }

    #[test]
    fn block_hashes_chain_the_whole_prefix() {
        let a = seq(&words(48, "w"));
        let same = seq(&words(48, "w"));
        assert_eq!(a, same, "deterministic");
        // one changed token changes its block and every block after it
        let mut t: Vec<String> = (0..48).map(|i| format!("w{i}")).collect();
        t[0] = "changed".into();
        let changed = seq(&t.join(" "));
        assert_ne!(a.blocks[0], changed.blocks[0]);
        assert_ne!(a.blocks[1], changed.blocks[1], "block 1 chains block 0");
        assert_ne!(a.blocks[2], changed.blocks[2]);
        // the same tokens in block 1 after a different block 0 differ too
        let other = seq(&format!("{} {}", words(16, "x"), words(32, "w")));
        let shifted = seq(&format!("{} {}", words(16, "y"), words(32, "w")));
        assert_ne!(other.blocks[1], shifted.blocks[1]);
        assert_ne!(other.blocks[2], shifted.blocks[2]);
        // a longer prompt with the same start shares the leading blocks
        let longer = seq(&format!("{} tail words here", words(48, "w")));
        assert_eq!(&longer.blocks[..3], &a.blocks[..]);
        // a different model or adapter shares nothing
        let mut b = BlockHasher::new("adapter", true);
        b.push_words(&words(48, "w"));
        let adapter = b.finish();
        assert!(adapter.blocks.iter().all(|h| !a.blocks.contains(h)));
    }

    #[test]
    fn roles_are_not_words() {
        let r =
            |msgs: Value| prompt_sequences(Endpoint::Chat, &json!({"messages": msgs}), "m", true);
        let a = r(json!([{"role": "user", "content": words(15, "w")}]));
        let b = r(json!([{"role": "assistant", "content": words(15, "w")}]));
        assert_eq!(a[0].tokens, 16);
        assert_ne!(a[0].blocks, b[0].blocks);
        // the word "user" is not the role marker
        let c = r(json!([{"role": "system", "content": format!("user {}", words(14, "w"))}]));
        assert_eq!(c[0].tokens, 16);
        let d = r(
            json!([{"role": "system", "content": ""}, {"role": "user", "content": words(14, "w")}]),
        );
        assert_eq!(d[0].tokens, 16);
        assert_ne!(c[0].blocks, d[0].blocks);
    }

    #[test]
    fn a_follow_up_turn_extends_the_conversation() {
        let sys = json!({"role": "system", "content": words(30, "s")});
        let u1 = json!({"role": "user", "content": [{"type": "text", "text": words(20, "u")}]});
        let first = prompt_sequences(Endpoint::Chat, &json!({"messages": [sys, u1]}), "m", true);
        let follow = prompt_sequences(
            Endpoint::Chat,
            &json!({"messages": [sys, u1, {"role": "assistant", "content": "ok"},
                                 {"role": "user", "content": "and then?"}]}),
            "m",
            true,
        );
        assert_eq!(first[0].tokens, 52);
        assert_eq!(follow[0].tokens, 52 + 2 + 3);
        assert_eq!(first[0].blocks.len(), 3);
        assert_eq!(&follow[0].blocks[..3], &first[0].blocks[..]);
        // images and tool calls count one token each
        let img = prompt_sequences(
            Endpoint::Chat,
            &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                                 {"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}]}),
            "m",
            true,
        );
        assert_eq!(img[0].tokens, 4);
    }

    #[test]
    fn completion_prompts_and_embedding_inputs() {
        let c =
            |p: Value| prompt_sequences(Endpoint::Completions, &json!({"prompt": p}), "m", true);
        assert_eq!(c(json!("a b c"))[0].tokens, 3);
        let ids: Vec<i64> = (0..32).collect();
        let s = c(json!(ids));
        assert_eq!((s.len(), s[0].tokens, s[0].blocks.len()), (1, 32, 2));
        let multi = c(json!(["a b", "c d e"]));
        assert_eq!(
            multi.iter().map(|s| s.tokens).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(c(json!([[1, 2], [3]])).len(), 2);
        let e = prompt_sequences(Endpoint::Embeddings, &json!({"input": "x y"}), "m", true);
        assert_eq!(e[0].tokens, 2);
        // ids and their decimal words are different tokens
        let w = c(json!((0..16)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")));
        let i = c(json!((0..16).collect::<Vec<i64>>()));
        assert_ne!(w[0].blocks, i[0].blocks);
    }

    #[test]
    fn longest_prefix_match() {
        let mut cache = PrefixCache::new(1024);
        assert!(cache.enabled());
        let a = seq(&words(64, "w"));
        assert_eq!(cache.match_prefix(&a.blocks), 0);
        cache.insert(&a.blocks[..2]);
        assert_eq!(cache.match_prefix(&a.blocks), 2);
        cache.insert(&a.blocks);
        assert_eq!(cache.match_prefix(&a.blocks), 4);
        assert_eq!(cache.cached_tokens(), 64);
        // a hole stops the match even if later blocks are present
        let mut holed = a.blocks.clone();
        holed[1] = 7;
        assert_eq!(cache.match_prefix(&holed), 1);
        let b = seq(&words(64, "x"));
        assert_eq!(cache.match_prefix(&b.blocks), 0);
        assert!((cache.usage() - 64.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn lru_eviction_takes_the_oldest_and_tails_first() {
        // 6 blocks
        let mut cache = PrefixCache::new(96 + 5);
        assert_eq!(cache.capacity_tokens(), 96);
        let a = seq(&words(64, "a"));
        let b = seq(&words(64, "b"));
        cache.insert(&a.blocks);
        cache.insert(&b.blocks);
        // a's two tail blocks went; its prefix stays
        assert_eq!(cache.evictions(), 2);
        assert_eq!(cache.match_prefix(&a.blocks), 2);
        assert_eq!(cache.match_prefix(&b.blocks), 4);
        assert_eq!(cache.usage(), 1.0);
        // refreshing a makes b the oldest
        cache.insert(&a.blocks);
        assert_eq!(cache.match_prefix(&a.blocks), 4);
        assert_eq!(cache.match_prefix(&b.blocks), 2);
        // a prompt bigger than the cache keeps its leading blocks
        let big = seq(&words(160, "c"));
        cache.insert(&big.blocks);
        assert_eq!(cache.match_prefix(&big.blocks), 6);
        assert_eq!(cache.match_prefix(&a.blocks), 0);
        assert_eq!(cache.cached_tokens(), 96);
    }

    #[test]
    fn an_off_cache_holds_nothing() {
        let mut cache = PrefixCache::new(15);
        assert!(!cache.enabled());
        let a = seq(&words(64, "a"));
        cache.insert(&a.blocks);
        assert_eq!(cache.match_prefix(&a.blocks), 0);
        assert_eq!(cache.usage(), 0.0);
    }
}

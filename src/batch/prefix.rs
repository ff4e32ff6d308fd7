//! The prefix cache: the KV of recent prompts, least recently used out first. A position's
//! keys and values depend on the tokens up to it alone, so any common prefix of a cached
//! prompt and a new one can be copied instead of prefilled.

use super::Budget;
use crate::llama::{KvCache, LlamaModel};

struct Entry {
    tokens: Vec<u32>,
    kv: KvCache,
    last_used: u64,
}

#[derive(Default)]
pub(super) struct PrefixCache {
    entries: Vec<Entry>,
    clock: u64,
}

/// Shorter common prefixes are not worth a lookup's copy (and would churn the cache).
const MIN_PREFIX: usize = 8;

impl PrefixCache {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.kv.bytes()).sum()
    }

    /// Copies the longest cached prefix of `ids` (at most `ids.len() - 1` positions: the last
    /// prompt token is always run, for its logits) into `kv`; returns its length.
    pub(super) fn restore(&mut self, ids: &[u32], kv: &mut KvCache) -> usize {
        let limit = ids.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common(&e.tokens, ids).min(limit)))
            .max_by_key(|&(_, n)| n);
        match best {
            Some((i, n)) if n >= MIN_PREFIX => {
                self.clock += 1;
                let e = &mut self.entries[i];
                e.last_used = self.clock;
                kv.copy_prefix(&e.kv, n);
                n
            }
            _ => 0,
        }
    }

    /// Keeps the KV of prompt `ids` (in `kv`, positions `0..ids.len()`), within `max_bytes`
    /// of cache and the engine's budget; older entries go first. Entries it extends are
    /// dropped; an entry that already covers it is only marked used.
    pub(super) fn insert(
        &mut self,
        m: &LlamaModel,
        ids: &[u32],
        kv: &KvCache,
        budget: &Budget,
        max_bytes: usize,
    ) {
        if ids.len() < MIN_PREFIX {
            return;
        }
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| common(&e.tokens, ids) == ids.len())
        {
            e.last_used = self.clock;
            return;
        }
        let superseded: Vec<usize> = (0..self.entries.len())
            .filter(|&i| common(&self.entries[i].tokens, ids) == self.entries[i].tokens.len())
            .collect();
        for i in superseded.into_iter().rev() {
            budget.release(self.entries.swap_remove(i).kv.bytes());
        }
        let bytes = m.kv_bytes(ids.len());
        if bytes > max_bytes {
            return;
        }
        while self.bytes() + bytes > max_bytes || !budget.try_acquire(bytes) {
            if !self.evict_lru(budget) {
                return;
            }
        }
        let Ok(mut copy) = m.try_new_kv(ids.len()) else {
            budget.release(bytes);
            return;
        };
        copy.copy_prefix(kv, ids.len());
        self.entries.push(Entry {
            tokens: ids.to_vec(),
            kv: copy,
            last_used: self.clock,
        });
    }

    /// Drops the least recently used entry, giving its bytes back; false if there is none.
    pub(super) fn evict_lru(&mut self, budget: &Budget) -> bool {
        let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used) else {
            return false;
        };
        budget.release(self.entries.swap_remove(i).kv.bytes());
        true
    }

    /// Gives every entry's bytes back (the scheduler is stopping).
    pub(super) fn clear(&mut self, budget: &Budget) {
        while self.evict_lru(budget) {}
    }
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

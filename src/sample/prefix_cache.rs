//! Prompt KV kept between sampling requests of one sampling session, so a prompt that
//! starts like an earlier one (the same question sampled again, the next turn of a
//! conversation, a long context scored against several completions) prefills only the
//! tokens after the shared prefix.
//!
//! Entries belong to an [`Owner`], a sampling session: one tenant and one frozen snapshot
//! of weights. A lookup only ever sees its own owner's entries, so KV never crosses tenants
//! or weights (new weights are a new sampling session). The cache holds at most its budget
//! of bytes; past it, entries of owners that are gone leave first, then the least recently
//! used. It never runs the model: callers hand it KV they computed.

use crate::error::Result;
use crate::model::KvCache;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Whose KV an entry is: a weak handle on the sampling session, compared by identity. The
/// handle keeps the session's allocation (not its weights) alive, so no later session can
/// take its address while an entry names it.
#[derive(Clone)]
pub struct Owner(Weak<dyn Any + Send + Sync>);

impl Owner {
    pub fn of<T: Any + Send + Sync>(a: &Arc<T>) -> Owner {
        let w: Weak<T> = Arc::downgrade(a);
        Owner(w)
    }

    fn addr(&self) -> usize {
        self.0.as_ptr() as *const () as usize
    }

    pub fn same(&self, other: &Owner) -> bool {
        self.addr() == other.addr()
    }

    fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Owner({:#x})", self.addr())
    }
}

struct Entry {
    owner: Owner,
    /// The tokens whose KV `kv` holds (`kv.len` of them).
    tokens: Vec<u32>,
    kv: KvCache,
    bytes: usize,
    last_used: u64,
}

/// The longest common prefix of two token rows.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Bounded, least-recently-used store of prompt KV (see the module docs).
pub struct PrefixCache {
    budget: usize,
    used: usize,
    tick: u64,
    next: u64,
    entries: HashMap<u64, Entry>,
    by_owner: HashMap<usize, Vec<u64>>,
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0: it keeps nothing).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            used: 0,
            tick: 0,
            next: 0,
            entries: HashMap::new(),
            by_owner: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes held now (at most the budget).
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether an entry of `bytes` could be kept at all.
    pub fn fits(&self, bytes: usize) -> bool {
        bytes <= self.budget
    }

    fn owned<'a>(&'a self, owner: &'a Owner) -> impl Iterator<Item = (u64, &'a Entry)> + 'a {
        self.by_owner
            .get(&owner.addr())
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id).map(|e| (*id, e)))
            .filter(move |(_, e)| e.owner.same(owner))
    }

    /// The best entry of `owner` for `tokens`: its id and how many tokens it serves (at
    /// most `max`).
    fn best(&self, owner: &Owner, tokens: &[u32], max: usize) -> Option<(u64, usize)> {
        self.owned(owner)
            .map(|(id, e)| (id, common_prefix(&e.tokens, tokens).min(max)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(id, n)| (n, std::cmp::Reverse(id)))
    }

    /// How many leading tokens of `tokens` the cache could serve `owner` (at most `max`).
    pub fn peek(&self, owner: &Owner, tokens: &[u32], max: usize) -> usize {
        self.best(owner, tokens, max).map_or(0, |b| b.1)
    }

    /// The KV of the longest cached prefix of `tokens` (at most `max` tokens), copied for
    /// the caller to extend; `None` when nothing matches.
    pub fn lookup(&mut self, owner: &Owner, tokens: &[u32], max: usize) -> Result<Option<KvCache>> {
        let Some((id, n)) = self.best(owner, tokens, max) else {
            return Ok(None);
        };
        self.tick += 1;
        let Some(e) = self.entries.get_mut(&id) else {
            return Ok(None);
        };
        e.last_used = self.tick;
        Ok(Some(e.kv.prefix(n)?))
    }

    /// Keep the KV of `tokens` (`kv` holds `tokens.len()` positions) for `owner`, made by
    /// `make` only when worth keeping: not when an entry already holds these tokens (or
    /// more), nor when it alone is over the budget. Entries it extends are dropped.
    pub fn insert_with(
        &mut self,
        owner: &Owner,
        tokens: &[u32],
        kv_bytes: usize,
        make: impl FnOnce() -> Result<KvCache>,
    ) -> Result<()> {
        let bytes = kv_bytes.saturating_add(tokens.len() * 4);
        if tokens.is_empty() || !self.fits(bytes) {
            return Ok(());
        }
        self.tick += 1;
        let mut stale = Vec::new();
        for (id, e) in self.owned(owner) {
            if e.tokens.starts_with(tokens) {
                stale.clear();
                stale.push((id, true));
                break;
            }
            if tokens.starts_with(&e.tokens) {
                stale.push((id, false));
            }
        }
        if let Some(&(id, true)) = stale.first() {
            if let Some(e) = self.entries.get_mut(&id) {
                e.last_used = self.tick;
            }
            return Ok(());
        }
        for (id, _) in stale {
            self.remove(id);
        }
        while self.used + bytes > self.budget {
            if !self.evict_one() {
                break;
            }
        }
        let kv = make()?;
        if kv.len != tokens.len() {
            return Ok(());
        }
        let id = self.next;
        self.next += 1;
        self.used += bytes;
        self.by_owner.entry(owner.addr()).or_default().push(id);
        self.entries.insert(
            id,
            Entry {
                owner: owner.clone(),
                tokens: tokens.to_vec(),
                kv,
                bytes,
                last_used: self.tick,
            },
        );
        Ok(())
    }

    fn remove(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        self.used -= e.bytes;
        let addr = e.owner.addr();
        if let Some(ids) = self.by_owner.get_mut(&addr) {
            ids.retain(|&x| x != id);
            if ids.is_empty() {
                self.by_owner.remove(&addr);
            }
        }
    }

    /// Drop one entry: of an owner that is gone if any, else the least recently used.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .min_by_key(|(_, e)| (e.owner.alive(), e.last_used))
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                self.remove(id);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host-form cache of `len` positions whose values encode (position, layer).
    fn kv(len: usize) -> KvCache {
        let mut c = KvCache::default();
        c.hk = vec![(0..len * 2).map(|i| i as f32).collect()];
        c.hv = vec![(0..len * 2).map(|i| -(i as f32)).collect()];
        c.len = len;
        c
    }

    #[test]
    fn serves_the_longest_prefix_of_its_own_owner_only() {
        let (a, b) = (Arc::new(1u8), Arc::new(2u8));
        let (oa, ob) = (Owner::of(&a), Owner::of(&b));
        let mut c = PrefixCache::new(1 << 20);
        c.insert_with(&oa, &[1, 2, 3, 4], kv(4).bytes(), || Ok(kv(4)))
            .unwrap();
        assert_eq!(c.peek(&oa, &[1, 2, 3, 9], 10), 3);
        assert_eq!(c.peek(&oa, &[1, 2, 3, 4, 5], 4), 4);
        assert_eq!(c.peek(&oa, &[1, 2, 3, 4, 5], 2), 2);
        assert_eq!(
            c.peek(&ob, &[1, 2, 3, 4], 10),
            0,
            "another owner sees nothing"
        );
        let got = c.lookup(&oa, &[1, 2, 7], 10).unwrap().unwrap();
        assert_eq!(got.len, 2);
        assert_eq!(got.hk[0], vec![0.0, 1.0, 2.0, 3.0]);
        // An entry that extends another replaces it; one already covered is not added.
        c.insert_with(&oa, &[1, 2, 3, 4, 5, 6], kv(6).bytes(), || Ok(kv(6)))
            .unwrap();
        assert_eq!(c.len(), 1);
        c.insert_with(&oa, &[1, 2, 3], kv(3).bytes(), || panic!("not made"))
            .unwrap();
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn stays_within_its_budget_and_evicts_the_gone_first() {
        let per = kv(4).bytes() + 16;
        let mut c = PrefixCache::new(per * 2);
        let (a, b) = (Arc::new(1u8), Arc::new(2u8));
        let (oa, ob) = (Owner::of(&a), Owner::of(&b));
        c.insert_with(&oa, &[1, 1, 1, 1], kv(4).bytes(), || Ok(kv(4)))
            .unwrap();
        c.insert_with(&ob, &[2, 2, 2, 2], kv(4).bytes(), || Ok(kv(4)))
            .unwrap();
        // a's entry is the more recent; b goes away.
        c.lookup(&oa, &[1, 1], 2).unwrap();
        drop(b);
        c.insert_with(&oa, &[3, 3, 3, 3], kv(4).bytes(), || Ok(kv(4)))
            .unwrap();
        assert!(c.used_bytes() <= per * 2);
        assert_eq!(
            c.peek(&oa, &[1, 1, 1, 1], 4),
            4,
            "the live owner's entry stays"
        );
        assert_eq!(c.peek(&oa, &[3, 3, 3, 3], 4), 4);
        // Nothing bigger than the whole budget is kept.
        c.insert_with(&oa, &[9; 40], kv(40).bytes(), || panic!("not made"))
            .unwrap();
        assert_eq!(c.peek(&oa, &[9; 40], 40), 0);
    }
}

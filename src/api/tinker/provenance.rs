//! Provenance: which sampled sequence each token of a training datum came from, and the
//! record the server keeps of sequences sampled with `record_stability_info`.
//!
//! A sampled sequence is recorded (its prompt, its sampled tokens, the sampler's logprob of
//! each) under a *scope*: the tenant and the Tinker session that sampled it. A training
//! datum names recorded sequences through provenance spans that tile its model input and
//! its targets ([`Provenance`]); [`RecordStore::resolve`] checks the spans against the
//! record (every token must be the one recorded) and turns them into the `recorded:` loss
//! inputs ([`crate::train::loss::RECORDED_LOGPROBS`], [`crate::train::loss::RECORDED_SAMPLED`]).
//!
//! Bounds ([`RecordLimits`]): a record lives `ttl` after its last use (recording it or a
//! training request naming it); a scope holds at most `per_scope` records and the store at
//! most `max_bytes`; past either, the least recently used records go first. A record
//! that is gone reads as unknown, and the error says why it may be gone. This module never
//! decides scopes: its caller (the Tinker layer) names them and drops them with their
//! sessions.

use crate::error::{Error, Result};
use crate::jobs::TenantId;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest `sequence_id` a span may name (ours are about 30 bytes).
pub const MAX_SEQUENCE_ID_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Positions of the named request's prompt.
    Prompt,
    /// Positions of the named sequence's sampled tokens.
    Sampled,
}

/// A run of consecutive datum positions that are positions `[offset, offset + length)` of
/// a recorded sequence's prompt or sampled tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub kind: SpanKind,
    pub sequence_id: String,
    pub offset: u64,
    pub length: u64,
}

/// A datum's provenance: runs tiling its model input, and runs tiling its targets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Provenance {
    pub model_input: Vec<Span>,
    pub targets: Vec<Span>,
}

/// What is recorded of one sampled sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceRecord {
    /// The request's prompt, shared by the request's sequences.
    pub prompt: Arc<[u32]>,
    pub tokens: Vec<u32>,
    /// The sampler's logprob of each sampled token (temperature 1, before filtering).
    pub logprobs: Vec<f32>,
}

impl SequenceRecord {
    /// Bytes it holds (the shared prompt counted whole for every sequence: an upper bound).
    fn bytes(&self, id: &str) -> usize {
        4 * (self.prompt.len() + self.tokens.len() + self.logprobs.len()) + id.len() + 96
    }
}

/// Who a record belongs to: the tenant and the Tinker session that sampled it.
pub type Scope = (TenantId, String);

#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    /// Most records one scope (Tinker session) holds.
    pub per_scope: usize,
    /// Most bytes all records hold together.
    pub max_bytes: usize,
    /// A record is dropped this long after its last use.
    pub ttl: Duration,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            per_scope: 16_384,
            max_bytes: 1 << 30,
            ttl: Duration::from_secs(86_400),
        }
    }
}

type Key = (Scope, String);

struct Entry {
    rec: Arc<SequenceRecord>,
    tick: u64,
    last_use: Instant,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Every record by its last use (ticks grow with time): the front is the stalest.
    lru: BTreeMap<u64, Key>,
    /// Per scope, its records by last use.
    scopes: HashMap<Scope, BTreeMap<u64, String>>,
    bytes: usize,
    tick: u64,
    evicted: u64,
}

impl Inner {
    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&e.tick);
        if let Some(s) = self.scopes.get_mut(&key.0) {
            s.remove(&e.tick);
            if s.is_empty() {
                self.scopes.remove(&key.0);
            }
        }
        self.bytes -= e.bytes;
        Some(e)
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Mark `key` used now.
    fn touch(&mut self, key: &Key, now: Instant) {
        let t = self.next_tick();
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut e.tick, t);
        e.last_use = now;
        self.lru.remove(&old);
        self.lru.insert(t, key.clone());
        if let Some(s) = self.scopes.get_mut(&key.0) {
            s.remove(&old);
            s.insert(t, key.1.clone());
        }
    }
}

/// The records of sampled sequences, bounded as [`RecordLimits`] says.
pub struct RecordStore {
    limits: RecordLimits,
    inner: Mutex<Inner>,
}

impl Default for RecordStore {
    fn default() -> Self {
        Self::new(RecordLimits::default())
    }
}

impl RecordStore {
    pub fn new(limits: RecordLimits) -> Self {
        RecordStore {
            limits,
            inner: Mutex::default(),
        }
    }

    pub fn limits(&self) -> RecordLimits {
        self.limits
    }

    /// Record a sequence under `scope`, evicting the least recently used records past the
    /// scope's count or the store's bytes. A record larger than the whole store is not kept.
    pub fn record(&self, scope: &Scope, id: String, rec: Arc<SequenceRecord>) {
        let bytes = rec.bytes(&id);
        if bytes > self.limits.max_bytes {
            tracing::warn!(sequence = %id, bytes, "sequence larger than the record store; not recorded");
            return;
        }
        let now = Instant::now();
        let mut g = self.inner.lock();
        let key = (scope.clone(), id);
        g.remove(&key);
        let tick = g.next_tick();
        g.lru.insert(tick, key.clone());
        g.scopes
            .entry(scope.clone())
            .or_default()
            .insert(tick, key.1.clone());
        g.bytes += bytes;
        g.entries.insert(
            key,
            Entry {
                rec,
                tick,
                last_use: now,
                bytes,
            },
        );
        let mut evicted = 0u64;
        while g.scopes.get(scope).map_or(0, BTreeMap::len) > self.limits.per_scope {
            let Some((_, oldest)) = g.scopes.get(scope).and_then(|s| s.first_key_value()) else {
                break;
            };
            let k = (scope.clone(), oldest.clone());
            g.remove(&k);
            evicted += 1;
        }
        while g.bytes > self.limits.max_bytes {
            let Some((_, k)) = g.lru.first_key_value() else {
                break;
            };
            let k = k.clone();
            g.remove(&k);
            evicted += 1;
        }
        if evicted > 0 {
            g.evicted += evicted;
            tracing::info!(
                session = %scope.1,
                evicted,
                "recorded sequences evicted (least recently used first) to stay within \
                 LORAPLEX_MAX_RECORDED_SEQUENCES_PER_SESSION / LORAPLEX_MAX_RECORDED_BYTES"
            );
        }
    }

    /// The record of `id` in `scope`, if it is there and fresh; marks it used.
    pub fn get(&self, scope: &Scope, id: &str) -> Option<Arc<SequenceRecord>> {
        let now = Instant::now();
        let mut g = self.inner.lock();
        let key = (scope.clone(), id.to_owned());
        let last = g.entries.get(&key)?.last_use;
        if now.duration_since(last) > self.limits.ttl {
            g.remove(&key);
            return None;
        }
        g.touch(&key, now);
        g.entries.get(&key).map(|e| e.rec.clone())
    }

    /// Drop every record of `scope` (its session ended).
    pub fn drop_scope(&self, scope: &Scope) -> usize {
        let mut g = self.inner.lock();
        let ids: Vec<String> = g
            .scopes
            .get(scope)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        for id in &ids {
            g.remove(&(scope.clone(), id.clone()));
        }
        ids.len()
    }

    /// Drop records unused for longer than the time to live; returns how many went.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut g = self.inner.lock();
        let mut n = 0;
        loop {
            let Some((_, k)) = g.lru.first_key_value() else {
                break;
            };
            let k = k.clone();
            let stale = g
                .entries
                .get(&k)
                .is_some_and(|e| now.duration_since(e.last_use) > self.limits.ttl);
            if !stale {
                break;
            }
            g.remove(&k);
            n += 1;
        }
        n
    }

    /// Records held, in all and in `scope`.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn scope_len(&self, scope: &Scope) -> usize {
        self.inner.lock().scopes.get(scope).map_or(0, BTreeMap::len)
    }

    /// Bytes the records hold (as counted against `max_bytes`).
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Records evicted to stay within the limits since start.
    pub fn evicted(&self) -> u64 {
        self.inner.lock().evicted
    }

    /// Check a datum's provenance against the records of `scope` and return, per target,
    /// the sampler's logprob (0 for prompt tokens) and whether it is a sampled token (1/0).
    /// `field` names the datum (`data[3]`) in errors.
    pub fn resolve(
        &self,
        scope: &Scope,
        field: &str,
        model_input: &[u32],
        targets: &[u32],
        prov: &Provenance,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut cache: HashMap<&str, Arc<SequenceRecord>> = HashMap::new();
        let mut logprobs = vec![0f32; targets.len()];
        let mut sampled = vec![0f32; targets.len()];
        for (list, spans, tokens) in [
            ("model_input_spans", &prov.model_input, model_input),
            ("loss_fn_input_spans", &prov.targets, targets),
        ] {
            let what = if list == "model_input_spans" {
                "model_input"
            } else {
                "loss_fn_inputs[\"target_tokens\"]"
            };
            let covered = spans
                .iter()
                .try_fold(0u64, |a, s| a.checked_add(s.length))
                .unwrap_or(u64::MAX);
            if covered != tokens.len() as u64 {
                return Err(Error::invalid(
                    format!("{field}.{list}"),
                    format!(
                        "the spans cover {covered} positions but {what} has {}; they must \
                         tile it exactly",
                        tokens.len()
                    ),
                ));
            }
            let mut pos = 0usize;
            for (j, s) in spans.iter().enumerate() {
                let f = format!("{field}.{list}[{j}]");
                let rec = match cache.get(s.sequence_id.as_str()) {
                    Some(r) => r.clone(),
                    None => {
                        let r = self
                            .get(scope, &s.sequence_id)
                            .ok_or_else(|| self.unknown(field, list, j, &s.sequence_id))?;
                        cache.insert(&s.sequence_id, r.clone());
                        r
                    }
                };
                let source: &[u32] = match s.kind {
                    SpanKind::Prompt => &rec.prompt,
                    SpanKind::Sampled => &rec.tokens,
                };
                let end = s.offset.checked_add(s.length).unwrap_or(u64::MAX);
                if end > source.len() as u64 {
                    return Err(Error::invalid(
                        f,
                        format!(
                            "positions {}..{end} of sequence {:?}'s {} but it has {}",
                            s.offset,
                            s.sequence_id,
                            kind_name(s.kind),
                            source.len()
                        ),
                    ));
                }
                // Both fit in usize: end ≤ source.len() and pos + length ≤ tokens.len().
                let (off, len) = (s.offset as usize, s.length as usize);
                let claimed = &source[off..off + len];
                let here = &tokens[pos..pos + len];
                if let Some(m) = (0..len).find(|&m| claimed[m] != here[m]) {
                    return Err(Error::invalid(
                        f,
                        format!(
                            "{what}[{}] is token {} but position {} of sequence {:?}'s {} is {}",
                            pos + m,
                            here[m],
                            off + m,
                            s.sequence_id,
                            kind_name(s.kind),
                            claimed[m]
                        ),
                    ));
                }
                if list == "loss_fn_input_spans" && s.kind == SpanKind::Sampled {
                    // A record has a logprob per token (the recorder keeps no other).
                    let Some(q) = rec.logprobs.get(off..off + len) else {
                        return Err(Error::invalid(f, "the record has no sampler logprobs"));
                    };
                    logprobs[pos..pos + len].copy_from_slice(q);
                    sampled[pos..pos + len].fill(1.0);
                }
                pos += len;
            }
        }
        Ok((logprobs, sampled))
    }

    fn unknown(&self, field: &str, list: &str, j: usize, id: &str) -> Error {
        Error::invalid(
            format!("{field}.{list}[{j}].sequence_id"),
            format!(
                "{id:?} names no sequence recorded in this session: sample with \
                 record_stability_info=True in the same session as the training run. A record \
                 lasts {} s after its last use, and a session keeps at most {} of them \
                 (LORAPLEX_RECORDED_TTL_S, LORAPLEX_MAX_RECORDED_SEQUENCES_PER_SESSION; the \
                 least recently used go first)",
                self.limits.ttl.as_secs(),
                self.limits.per_scope
            ),
        )
    }
}

fn kind_name(k: SpanKind) -> &'static str {
    match k {
        SpanKind::Prompt => "prompt",
        SpanKind::Sampled => "sampled tokens",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        (TenantId("t".into()), s.into())
    }

    fn rec(prompt: &[u32], tokens: &[u32]) -> Arc<SequenceRecord> {
        Arc::new(SequenceRecord {
            prompt: prompt.into(),
            tokens: tokens.to_vec(),
            logprobs: tokens.iter().map(|&t| -(t as f32) / 10.0).collect(),
        })
    }

    fn span(kind: SpanKind, id: &str, offset: u64, length: u64) -> Span {
        Span {
            kind,
            sequence_id: id.into(),
            offset,
            length,
        }
    }

    #[test]
    fn resolve_checks_tokens_and_fills_sampler_logprobs() {
        let st = RecordStore::default();
        st.record(&scope("s"), "f-0".into(), rec(&[1, 2, 3], &[7, 8, 9]));
        // Full sequence 1 2 3 7 8 9: input 1 2 3 7 8, targets 2 3 7 8 9.
        let prov = Provenance {
            model_input: vec![
                span(SpanKind::Prompt, "f-0", 0, 3),
                span(SpanKind::Sampled, "f-0", 0, 2),
            ],
            targets: vec![
                span(SpanKind::Prompt, "f-0", 1, 2),
                span(SpanKind::Sampled, "f-0", 0, 3),
            ],
        };
        let (lp, m) = st
            .resolve(
                &scope("s"),
                "data[0]",
                &[1, 2, 3, 7, 8],
                &[2, 3, 7, 8, 9],
                &prov,
            )
            .unwrap();
        assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(lp, vec![0.0, 0.0, -0.7, -0.8, -0.9]);
        // Another session's scope does not see it; a wrong token is named.
        let e = st
            .resolve(
                &scope("other"),
                "data[0]",
                &[1, 2, 3, 7, 8],
                &[2, 3, 7, 8, 9],
                &prov,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model_input_spans[0].sequence_id") && e.contains("f-0"),
            "{e}"
        );
        let e = st
            .resolve(
                &scope("s"),
                "data[0]",
                &[1, 2, 3, 7, 8],
                &[2, 3, 7, 5, 9],
                &prov,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loss_fn_input_spans[1]") && e.contains("is token 5"),
            "{e}"
        );
        let short = Provenance {
            targets: vec![span(SpanKind::Sampled, "f-0", 0, 3)],
            ..prov.clone()
        };
        let e = st
            .resolve(
                &scope("s"),
                "data[0]",
                &[1, 2, 3, 7, 8],
                &[2, 3, 7, 8, 9],
                &short,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("cover 3 positions"), "{e}");
        let past = Provenance {
            targets: vec![
                span(SpanKind::Prompt, "f-0", 1, 2),
                span(SpanKind::Sampled, "f-0", u64::MAX, 3),
            ],
            ..prov
        };
        assert!(st
            .resolve(
                &scope("s"),
                "data[0]",
                &[1, 2, 3, 7, 8],
                &[2, 3, 7, 8, 9],
                &past
            )
            .is_err());
    }

    #[test]
    fn the_store_stays_within_its_limits_least_recently_used_first() {
        let st = RecordStore::new(RecordLimits {
            per_scope: 3,
            max_bytes: 10 * 1024,
            ttl: Duration::from_secs(60),
        });
        for i in 0..4 {
            st.record(&scope("a"), format!("a-{i}"), rec(&[1], &[2]));
        }
        assert_eq!(st.scope_len(&scope("a")), 3);
        assert!(st.get(&scope("a"), "a-0").is_none(), "the oldest went");
        // Using a-1 makes a-2 the least recently used.
        assert!(st.get(&scope("a"), "a-1").is_some());
        st.record(&scope("a"), "a-4".into(), rec(&[1], &[2]));
        assert!(st.get(&scope("a"), "a-2").is_none());
        assert!(st.get(&scope("a"), "a-1").is_some());
        // Bytes: one big record pushes out the stalest of any scope.
        let before = st.len();
        st.record(&scope("b"), "b-0".into(), rec(&vec![0; 2000], &[1]));
        assert!(st.bytes() <= 10 * 1024);
        assert!(st.len() <= before + 1);
        assert!(st.get(&scope("b"), "b-0").is_some());
        assert!(st.evicted() >= 2);
        // Too big for the store at all: not kept.
        st.record(&scope("b"), "b-1".into(), rec(&vec![0; 5000], &[1]));
        assert!(st.get(&scope("b"), "b-1").is_none());
        assert!(st.drop_scope(&scope("a")) > 0);
        assert_eq!(st.scope_len(&scope("a")), 0);
    }

    #[test]
    fn records_expire_after_their_last_use() {
        let st = RecordStore::new(RecordLimits {
            ttl: Duration::from_millis(150),
            ..RecordLimits::default()
        });
        st.record(&scope("a"), "x".into(), rec(&[1], &[2]));
        st.record(&scope("a"), "y".into(), rec(&[1], &[2]));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            st.get(&scope("a"), "x").is_some(),
            "a use restarts the clock"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(st.expire(), 1, "y expired, x was used 100 ms ago");
        assert!(st.get(&scope("a"), "x").is_some());
        std::thread::sleep(Duration::from_millis(200));
        assert!(st.get(&scope("a"), "x").is_none());
        assert!(st.is_empty());
        assert_eq!(st.bytes(), 0);
    }
}

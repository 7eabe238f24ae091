//! The Tinker wire protocol (`/api/v1/...`), as the official `tinker` SDK 0.38.0 speaks it
//! (../shared/docs/tinker-api.md). Owns what exists only at this layer: Tinker sessions
//! and their heartbeats, the SDK's idempotency keys (per-session counters), the mapping of
//! `tinker://` paths to checkpoints, and how results are rendered (protobuf for forward,
//! forward_backward and sample; JSON otherwise). Model work goes to the engine.
//!
//! Parts: [`session`] (client config, sessions, telemetry, capabilities), [`training`]
//! (models, forward_backward, optim_step, saving and loading checkpoints), [`runs`]
//! (training runs and checkpoints as the RestClient and the `tinker` CLI see them: list,
//! describe, delete, expire, publish, copy), [`download`] (signed checkpoint download
//! links), [`sampling`] (sampling sessions, asample), [`futures`] (retrieve_future),
//! [`provenance`] (sequences recorded at sampling time for `stable_reinforce`, and the
//! spans that name them).
//!
//! What this layer keeps, and what bounds each part of it: [`TinkerState`].

pub mod download;
pub mod futures;
pub mod provenance;
pub mod runs;
pub mod sampling;
pub mod session;
pub mod training;

use super::error::{ApiError, ApiResult};
use super::Shared;
use crate::jobs::{FutureId, TenantId};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Most seq_ids remembered per window ([`SeqWindow`]) for idempotent retries. The SDK
/// retries a request within seconds; a retry older than the window is treated as new.
pub const SEQ_WINDOW: usize = 1024;

pub use crate::jobs::metadata::MAX_USER_METADATA_BYTES;

/// Longest `display_name` a session keeps (bytes).
pub const MAX_DISPLAY_NAME_BYTES: usize = 256;

/// The most recent [`SEQ_WINDOW`] seq_ids and what each was answered with; inserting one
/// more forgets the lowest.
#[derive(Debug)]
pub struct SeqWindow<V> {
    map: BTreeMap<u64, V>,
}

impl<V> Default for SeqWindow<V> {
    fn default() -> Self {
        SeqWindow {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Clone> SeqWindow<V> {
    pub fn get(&self, seq: u64) -> Option<V> {
        self.map.get(&seq).cloned()
    }

    pub fn insert(&mut self, seq: u64, v: V) {
        self.map.insert(seq, v);
        while self.map.len() > SEQ_WINDOW {
            self.map.pop_first();
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A Tinker session: the unit the SDK heartbeats and closes. Everything in it goes with
/// it; the lists hold only what is live (an unloaded or failed model leaves them).
pub struct SessionInfo {
    pub tenant: TenantId,
    pub created: SystemTime,
    pub last_heartbeat: Mutex<Instant>,
    pub user_metadata: Option<crate::jobs::UserMetadata>,
    pub display_name: Option<String>,
    /// Training models and sampling sessions created in it, released with it.
    pub models: Mutex<Vec<String>>,
    pub samplers: Mutex<Vec<String>>,
    /// model_seq_id → the create future and the model, for idempotent retries.
    pub model_creates: Mutex<SeqWindow<(FutureId, String)>>,
    /// sampling_session_seq_id → the sampling session, for idempotent retries.
    pub sampler_creates: Mutex<SeqWindow<String>>,
}

impl SessionInfo {
    pub fn new(
        tenant: TenantId,
        created: SystemTime,
        user_metadata: Option<crate::jobs::UserMetadata>,
        display_name: Option<String>,
        models: Vec<String>,
    ) -> Self {
        SessionInfo {
            tenant,
            created,
            last_heartbeat: Mutex::new(Instant::now()),
            user_metadata,
            display_name,
            models: Mutex::new(models),
            samplers: Mutex::new(Vec::new()),
            model_creates: Mutex::default(),
            sampler_creates: Mutex::default(),
        }
    }
}

/// What this layer remembers besides the engine's state, and what bounds it:
/// - `sessions`: ended by `session/finish` or after `LORAPLEX_SESSION_TIMEOUT_S` without
///   a heartbeat ([`reap_sessions`]); at most `LORAPLEX_MAX_SESSIONS_PER_TENANT` per
///   tenant and `LORAPLEX_MAX_SESSIONS` in all. Each holds its idempotency windows
///   ([`SEQ_WINDOW`] entries each), its live models and sampling sessions.
/// - `samples` and `sampler_paths`, per sampling session: removed when the session that
///   owns the sampling session is released; `samples` keeps a [`SEQ_WINDOW`] of seq_ids.
/// - `records`, sequences sampled with `record_stability_info`, per session: bounded by
///   [`provenance::RecordLimits`] (count per session, bytes in all, time since last use)
///   and dropped with their session.
///
/// - `copies`: the answers of the last [`MAX_COPY_KEYS`] `copy_weights` calls by their
///   `X-Idempotency-Key`, so a retried copy makes no second copy.
///
/// How a result renders is in the stored job output, never here; a training run's last
/// request time is on the engine's model entry.
#[derive(Default)]
pub struct TinkerState {
    pub sessions: DashMap<String, SessionInfo>,
    /// Sampling session → its asample seq_ids' futures and sample counts, for retries.
    pub samples: DashMap<String, Mutex<SeqWindow<(FutureId, usize)>>>,
    /// Sampling session → the checkpoint path it was created from, if any.
    pub sampler_paths: DashMap<String, Option<String>>,
    /// What `stable_reinforce` needs of sampled sequences, per (tenant, session).
    pub records: Arc<provenance::RecordStore>,
    /// (tenant, idempotency key) → the tinker path a copy_weights call made.
    pub copies: Mutex<Recent<(TenantId, String), String>>,
}

/// Idempotency keys of copy_weights calls remembered (the SDK retries within minutes).
pub const MAX_COPY_KEYS: usize = 4096;

/// The last [`MAX_COPY_KEYS`] entries inserted; one more forgets the oldest.
pub struct Recent<K, V> {
    map: std::collections::HashMap<K, V>,
    order: std::collections::VecDeque<K>,
}

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Recent {
            map: Default::default(),
            order: Default::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Recent<K, V> {
    pub fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).cloned()
    }

    pub fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > MAX_COPY_KEYS {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl TinkerState {
    pub fn new(records: provenance::RecordLimits) -> Self {
        TinkerState {
            records: Arc::new(provenance::RecordStore::new(records)),
            ..Default::default()
        }
    }

    /// The session, if it exists and belongs to `tenant`.
    pub fn session(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> ApiResult<dashmap::mapref::one::Ref<'_, String, SessionInfo>> {
        match self.sessions.get(id) {
            Some(s) if &s.tenant == tenant => Ok(s),
            _ => Err(ApiError::not_found("session", id)),
        }
    }

    /// Forget a sampling session (released, or never to be used again).
    pub fn forget_sampler(&self, id: &str) {
        self.samples.remove(id);
        self.sampler_paths.remove(id);
    }
}

/// Close sessions that stopped heartbeating, releasing their models and samplers.
pub async fn reap_sessions(state: Shared) {
    let timeout = Duration::from_secs(state.cfg.session_timeout_s.max(1));
    let mut tick = tokio::time::interval(timeout.min(Duration::from_secs(30)));
    loop {
        tick.tick().await;
        let stale: Vec<String> = state
            .tinker
            .sessions
            .iter()
            .filter(|s| s.last_heartbeat.lock().elapsed() > timeout)
            .map(|s| s.key().clone())
            .collect();
        for id in stale {
            tracing::info!(session = %id, "session stopped heartbeating; releasing it");
            session::release(&state, &id).await;
        }
        let n = state.tinker.records.expire();
        if n > 0 {
            tracing::info!(
                records = n,
                "recorded sequences unused for LORAPLEX_RECORDED_TTL_S dropped"
            );
        }
    }
}

/// Every `LORAPLEX_EXPIRY_SWEEP_MS`, delete checkpoints past their time to live: out of
/// the cache, then off the disk. (Lookups already hide them once expired.)
pub async fn sweep_expired_checkpoints(state: Shared) {
    let every = Duration::from_millis(state.cfg.expiry_sweep_ms.max(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (tenant, c) in state.engine.registry().take_expired_checkpoints() {
            tracing::info!(tenant = %tenant, checkpoint = %c.name, "checkpoint expired; deleting it");
            if let Some(p) = state.engine.registry().persist().cloned() {
                let r = tokio::task::spawn_blocking(move || p.delete_checkpoint(&tenant, &c)).await;
                if let Ok(Err(e)) = r {
                    tracing::error!(error = %e, "cannot delete an expired checkpoint");
                }
            }
        }
    }
}

/// A checkpoint's tinker path and its parts: `tinker://<model>/<segment>/<name>`.
pub struct TinkerPath {
    pub model: String,
    pub segment: String,
    pub name: String,
}

impl TinkerPath {
    pub fn parse(path: &str) -> ApiResult<TinkerPath> {
        let bad = || {
            ApiError::invalid(
                "path",
                format!(
                    "{path:?} is not a tinker://<model>/<weights|sampler_weights|external_weights>/<name> path"
                ),
            )
        };
        let rest = path.strip_prefix("tinker://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [m, seg, n]
                if !m.is_empty()
                    && !n.is_empty()
                    && crate::store::checkpoint::CheckpointKind::from_segment(seg).is_some() =>
            {
                Ok(TinkerPath {
                    model: (*m).to_owned(),
                    segment: (*seg).to_owned(),
                    name: (*n).to_owned(),
                })
            }
            _ => Err(bad()),
        }
    }

    /// The engine's checkpoint name (unique per tenant).
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.model, self.segment, self.name)
    }

    pub fn from_key(key: &str) -> String {
        format!("tinker://{key}")
    }
}

/// A checkpoint name chosen by a user: what the checkpoint store accepts as a directory
/// name, and not the name reserved for automatic checkpoints.
pub fn check_name(field: &str, name: &str) -> ApiResult<()> {
    crate::store::checkpoint::check_name(field, name).map_err(crate::Error::from)?;
    if name.starts_with(crate::store::durable::AUTO_CHECKPOINT) {
        return Err(ApiError::invalid(
            field,
            format!(
                "names starting with {:?} are reserved for automatic checkpoints",
                crate::store::durable::AUTO_CHECKPOINT
            ),
        ));
    }
    Ok(())
}

/// RFC 3339 UTC time, e.g. `2026-11-27T01:02:03.456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_740_123_456);
        assert_eq!(rfc3339(t), "2026-11-27T00:42:03.456Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_seq_window_keeps_the_most_recent_seq_ids() {
        let mut w = SeqWindow::default();
        for q in (0..3 * SEQ_WINDOW as u64).rev() {
            w.insert(q, q * 2);
        }
        assert_eq!(w.len(), SEQ_WINDOW);
        // Inserted highest first: the window keeps the highest.
        assert_eq!(
            w.get(3 * SEQ_WINDOW as u64 - 1),
            Some(6 * SEQ_WINDOW as u64 - 2)
        );
        assert_eq!(w.get(0), None);
        w.insert(u64::MAX, 1);
        assert_eq!(w.len(), SEQ_WINDOW);
        assert_eq!(w.get(u64::MAX), Some(1));
    }

    #[test]
    fn recent_keeps_the_newest_keys() {
        let mut r = Recent::default();
        for i in 0..MAX_COPY_KEYS + 10 {
            r.insert(i, i * 2);
        }
        r.insert(MAX_COPY_KEYS + 9, 0);
        assert_eq!(r.len(), MAX_COPY_KEYS);
        assert_eq!(r.get(&0), None);
        assert_eq!(r.get(&(MAX_COPY_KEYS + 9)), Some(0));
        assert_eq!(r.get(&10), Some(20));
    }

    #[test]
    fn tinker_paths_parse_and_refuse() {
        let p = TinkerPath::parse("tinker://s1:train:0/weights/step-3").unwrap();
        assert_eq!(
            (p.model.as_str(), p.segment.as_str(), p.name.as_str()),
            ("s1:train:0", "weights", "step-3")
        );
        assert_eq!(
            TinkerPath::from_key(&p.key()),
            "tinker://s1:train:0/weights/step-3"
        );
        assert!(TinkerPath::parse("tinker://s1/external_weights/x").is_ok());
        for bad in [
            "s1/weights/x",
            "tinker://s1/other/x",
            "tinker://s1/weights",
            "tinker://s1/weights/a/b",
        ] {
            assert!(TinkerPath::parse(bad).is_err(), "{bad}");
        }
    }
}

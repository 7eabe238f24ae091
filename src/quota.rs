//! Per-tenant quotas and rate limits: what one tenant may hold (training runs, sampling
//! sessions, jobs queued, checkpoint bytes, plugins) and how fast it may call. Owns the
//! limits (defaults from [`QuotaConfig`], per-tenant overrides from the keys file), the
//! request token buckets, and the two refusals: [`Error::QuotaExceeded`] for a hard limit
//! (403, naming the quota and its limit) and [`Error::RateLimited`] for a transient one
//! (429 with Retry-After, which the SDK retries).
//!
//! Usage is not counted here: callers pass what the tenant holds now, read from the maps
//! that hold it (the registry, the engine's job counters, the plugin table), so the numbers
//! are right after a restart. Nothing here blocks or sleeps, and the bucket map stays
//! bounded however many tenants (development-mode keys) call: a full bucket carries no
//! information and is dropped.

use crate::config::QuotaConfig;
use crate::error::{Error, Result};
use crate::jobs::TenantId;
use dashmap::DashMap;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One limit, by the name the API, the keys file and the errors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    TrainingRuns,
    SamplingSessions,
    QueuedJobs,
    RequestsPerSecond,
    RequestBurst,
    CheckpointBytes,
    Plugins,
    PluginBytes,
}

impl Quota {
    pub const ALL: [Quota; 8] = [
        Quota::TrainingRuns,
        Quota::SamplingSessions,
        Quota::QueuedJobs,
        Quota::RequestsPerSecond,
        Quota::RequestBurst,
        Quota::CheckpointBytes,
        Quota::Plugins,
        Quota::PluginBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Quota::TrainingRuns => "training_runs",
            Quota::SamplingSessions => "sampling_sessions",
            Quota::QueuedJobs => "queued_jobs",
            Quota::RequestsPerSecond => "requests_per_second",
            Quota::RequestBurst => "request_burst",
            Quota::CheckpointBytes => "checkpoint_bytes",
            Quota::Plugins => "plugins",
            Quota::PluginBytes => "plugin_bytes",
        }
    }

    pub fn parse(name: &str) -> Option<Quota> {
        Quota::ALL.into_iter().find(|q| q.name() == name)
    }
}

/// Every limit of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits([u64; 8]);

impl Limits {
    pub fn get(&self, q: Quota) -> u64 {
        self.0[q as usize]
    }

    pub fn set(&mut self, q: Quota, v: u64) {
        self.0[q as usize] = v;
    }
}

impl From<&QuotaConfig> for Limits {
    fn from(c: &QuotaConfig) -> Self {
        let mut l = Limits([0; 8]);
        l.set(Quota::TrainingRuns, c.training_runs);
        l.set(Quota::SamplingSessions, c.sampling_sessions);
        l.set(Quota::QueuedJobs, c.queued_jobs);
        l.set(Quota::RequestsPerSecond, c.requests_per_second);
        l.set(Quota::RequestBurst, c.request_burst);
        l.set(Quota::CheckpointBytes, c.checkpoint_bytes);
        l.set(Quota::Plugins, c.plugins);
        l.set(Quota::PluginBytes, c.plugin_bytes);
        l
    }
}

/// Per-tenant overrides from a keys file: the `quota=value` fields after `key tenant`.
/// Lines without any are skipped; an unknown quota or a value that is not a number is an
/// error naming the line.
pub fn overrides_from_keys(
    text: &str,
    defaults: &QuotaConfig,
) -> std::result::Result<HashMap<TenantId, Limits>, String> {
    let mut out: HashMap<TenantId, Limits> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut parts = line.split_whitespace();
        let (Some(_key), Some(tenant)) = (parts.next(), parts.next()) else {
            continue;
        };
        // The operator flag is the keys file's, not a quota (crate::auth).
        for field in parts.filter(|f| *f != crate::auth::OPERATOR_FLAG) {
            let bad = |why: &str| format!("line {}: {field:?}: {why}", n + 1);
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| bad("expected quota=value"))?;
            let q = Quota::parse(k).ok_or_else(|| {
                let names: Vec<_> = Quota::ALL.iter().map(|q| q.name()).collect();
                bad(&format!("unknown quota; known: {}", names.join(", ")))
            })?;
            let v: u64 = v.parse().map_err(|_| bad("not a whole number"))?;
            out.entry(TenantId(tenant.to_owned()))
                .or_insert_with(|| Limits::from(defaults))
                .set(q, v);
        }
    }
    Ok(out)
}

/// Buckets kept before idle (full) ones are swept out.
const SWEEP_ABOVE: usize = 1024;
/// Hard cap on buckets: past it, even partly drained buckets go (their tenants are
/// forgiven a little; memory stays bounded).
const MAX_BUCKETS: usize = 65_536;

/// A token bucket: `tokens` at `at`, refilled at the tenant's rate up to its burst.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * rate).min(burst)
    }
}

/// The limits of every tenant and the request buckets.
pub struct Quotas {
    defaults: Limits,
    overrides: RwLock<HashMap<TenantId, Limits>>,
    buckets: DashMap<TenantId, Bucket>,
    requests: AtomicU64,
}

impl Quotas {
    pub fn new(cfg: &QuotaConfig) -> Quotas {
        Quotas {
            defaults: Limits::from(cfg),
            overrides: RwLock::new(HashMap::new()),
            buckets: DashMap::new(),
            requests: AtomicU64::new(0),
        }
    }

    /// Replace the per-tenant overrides (from the keys file, at start-up).
    pub fn set_overrides(&self, o: HashMap<TenantId, Limits>) {
        *self.overrides.write() = o;
    }

    /// The tenant's limits: its override, or the defaults.
    pub fn limits(&self, tenant: &TenantId) -> Limits {
        self.overrides
            .read()
            .get(tenant)
            .copied()
            .unwrap_or(self.defaults)
    }

    pub fn limit(&self, tenant: &TenantId, q: Quota) -> u64 {
        self.limits(tenant).get(q)
    }

    /// Refuse with [`Error::QuotaExceeded`] unless `used + requested` fits the tenant's
    /// limit on `q`.
    pub fn check(&self, tenant: &TenantId, q: Quota, used: u64, requested: u64) -> Result<()> {
        let limit = self.limit(tenant, q);
        if used.saturating_add(requested) > limit {
            return Err(Error::QuotaExceeded {
                quota: q.name(),
                limit,
                used,
                requested,
            });
        }
        Ok(())
    }

    /// A new job for a tenant that has `held` jobs queued or running: refused with
    /// [`Error::RateLimited`] at its limit (jobs finish, so a retry will get in).
    pub fn check_queued(&self, tenant: &TenantId, held: u64, retry_after_ms: u64) -> Result<()> {
        let limit = self.limit(tenant, Quota::QueuedJobs);
        if held >= limit {
            return Err(Error::RateLimited {
                quota: Quota::QueuedJobs.name(),
                limit,
                retry_after_ms,
            });
        }
        Ok(())
    }

    /// Take one request from the tenant's bucket, or say how long until one is there.
    pub fn admit_request(&self, tenant: &TenantId) -> Result<()> {
        let l = self.limits(tenant);
        let rate = l.get(Quota::RequestsPerSecond) as f64;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = (l.get(Quota::RequestBurst) as f64).max(1.0);
        let now = Instant::now();
        let admitted = {
            let mut b = self.buckets.entry(tenant.clone()).or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            let level = b.level(now, rate, burst);
            if level >= 1.0 {
                *b = Bucket {
                    tokens: level - 1.0,
                    at: now,
                };
                Ok(())
            } else {
                *b = Bucket {
                    tokens: level,
                    at: now,
                };
                Err(((1.0 - level) / rate * 1000.0).ceil() as u64)
            }
        };
        self.sweep(now);
        admitted.map_err(|ms| Error::RateLimited {
            quota: Quota::RequestsPerSecond.name(),
            limit: l.get(Quota::RequestsPerSecond),
            retry_after_ms: ms.max(1),
        })
    }

    /// Requests the tenant could send at once now.
    pub fn requests_available(&self, tenant: &TenantId) -> u64 {
        let l = self.limits(tenant);
        let (rate, burst) = (
            l.get(Quota::RequestsPerSecond) as f64,
            l.get(Quota::RequestBurst) as f64,
        );
        match self.buckets.get(tenant) {
            Some(b) if rate > 0.0 => b.level(Instant::now(), rate, burst).floor() as u64,
            _ => burst as u64,
        }
    }

    /// Buckets held now (for tests of the bound).
    pub fn buckets_held(&self) -> usize {
        self.buckets.len()
    }

    /// Now and then, drop the buckets that refilled: a full bucket is what a new one is.
    fn sweep(&self, now: Instant) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let len = self.buckets.len();
        if len <= SWEEP_ABOVE || (n % 256 != 0 && len <= MAX_BUCKETS) {
            return;
        }
        self.buckets.retain(|t, b| {
            let l = self.limits(t);
            let (rate, burst) = (
                l.get(Quota::RequestsPerSecond) as f64,
                (l.get(Quota::RequestBurst) as f64).max(1.0),
            );
            b.level(now, rate, burst) < burst
        });
        if self.buckets.len() > MAX_BUCKETS {
            self.buckets.clear();
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas::new(&QuotaConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u64, burst: u64) -> QuotaConfig {
        QuotaConfig {
            requests_per_second: rate,
            request_burst: burst,
            ..QuotaConfig::default()
        }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_refuses_with_a_retry_delay() {
        let q = Quotas::new(&cfg(10, 3));
        let t = TenantId::from("a");
        for _ in 0..3 {
            q.admit_request(&t).unwrap();
        }
        match q.admit_request(&t) {
            Err(Error::RateLimited {
                quota,
                limit,
                retry_after_ms,
            }) => {
                assert_eq!((quota, limit), ("requests_per_second", 10));
                assert!((1..=100).contains(&retry_after_ms), "{retry_after_ms}");
            }
            other => panic!("expected rate limited, got {other:?}"),
        }
        // Another tenant has its own bucket.
        q.admit_request(&TenantId::from("b")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120));
        q.admit_request(&t).unwrap();
    }

    #[test]
    fn idle_buckets_are_dropped_so_many_keys_stay_bounded() {
        let q = Quotas::new(&cfg(1_000_000, 2));
        for i in 0..20_000 {
            q.admit_request(&TenantId(format!("dev-{i}"))).unwrap();
        }
        // At a million per second a bucket refills within microseconds: sweeps keep the
        // map near the sweep threshold, far below one bucket per key.
        assert!(
            q.buckets_held() <= SWEEP_ABOVE + 256,
            "{}",
            q.buckets_held()
        );
    }

    #[test]
    fn hard_quotas_name_themselves_and_their_limit() {
        let q = Quotas::new(&QuotaConfig {
            training_runs: 2,
            ..QuotaConfig::default()
        });
        let t = TenantId::from("a");
        q.check(&t, Quota::TrainingRuns, 1, 1).unwrap();
        let e = q.check(&t, Quota::TrainingRuns, 2, 1).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("training_runs") && msg.contains("limited to 2"),
            "{msg}"
        );
        assert_eq!(e.class().status, 403);
        let e = q.check_queued(&t, 256, 500).unwrap_err();
        assert_eq!((e.class().status, e.retry_after_ms()), (429, Some(500)));
    }

    #[test]
    fn keys_file_overrides_one_tenant_and_refuses_unknown_quotas() {
        let d = QuotaConfig::default();
        let o = overrides_from_keys(
            "k1 alice training_runs=3 plugins=0 # small\nk2 bob\nk3 alice\n",
            &d,
        )
        .unwrap();
        let q = Quotas::new(&d);
        q.set_overrides(o);
        let a = q.limits(&TenantId::from("alice"));
        assert_eq!(a.get(Quota::TrainingRuns), 3);
        assert_eq!(a.get(Quota::Plugins), 0);
        assert_eq!(a.get(Quota::QueuedJobs), d.queued_jobs);
        assert_eq!(q.limits(&TenantId::from("bob")), Limits::from(&d));
        assert!(overrides_from_keys("k alice nope=1\n", &d).is_err());
        assert!(overrides_from_keys("k alice plugins=x\n", &d).is_err());
        assert!(overrides_from_keys("k alice plugins\n", &d).is_err());
    }
}

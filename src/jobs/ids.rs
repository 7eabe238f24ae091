//! Names of things the engine hands out: tenants, models (adapters), futures, sampling
//! sessions. Newtypes so that a future id can never be passed where a model id belongs.
//! Generated ids are unique within a process and unlikely to repeat across restarts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A fresh id, e.g. `model-0195f3a2c4d1e001`.
            pub fn generate() -> Self {
                $name(format!(concat!($prefix, "-{:016x}"), next_raw()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

string_id!(
    /// Who owns a model, a future or a session. Lookups by another tenant see NotFound.
    TenantId,
    "tenant"
);
string_id!(
    /// A training model: one LoRA adapter with its optimizer state.
    AdapterId,
    "model"
);
string_id!(
    /// A job's handle: pending → running → done | failed.
    FutureId,
    "future"
);
string_id!(
    /// A sampling session: a frozen snapshot of an adapter, or the base model.
    SessionId,
    "sampler"
);

/// Process-unique 64-bit values: a counter scrambled with the start time.
fn next_raw() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static BASE: OnceLock<u64> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // High bits from the start time keep restarts apart; low bits count.
    (base << 24) ^ n
}

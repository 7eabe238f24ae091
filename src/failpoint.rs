//! Failure injection: named places in the code that panic when a test arms them, so tests
//! can prove that a panic fails only the request or job it happened in.
//!
//! Disarmed (always, unless a test or `LORAPLEX_FAILPOINTS` arms one) a place costs one
//! relaxed atomic load. Places: `api.request` (inside every authenticated handler, at the
//! tenant extractor), `job.batch` (a training batch on a worker lane), `job.sample_step`
//! (a decoding step of the sampling lane), `job.task` (a job that runs as its own task:
//! create model, sampling session, ...).
//!
//! `LORAPLEX_FAILPOINTS=name[:count],...` arms places in a real `loraplex serve` (each
//! fires `count` times, default once); it is read once, at start-up.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

static ANY: AtomicBool = AtomicBool::new(false);
static ARMED: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Make `name` panic the next `times` times it is reached.
pub fn arm(name: &str, times: u64) {
    let mut a = ARMED.lock();
    a.get_or_insert_with(HashMap::new)
        .insert(name.to_owned(), times);
    ANY.store(true, Ordering::Release);
}

/// Arm the places named in `LORAPLEX_FAILPOINTS` (`name[:count],...`).
pub fn arm_from_env() {
    let Ok(spec) = std::env::var("LORAPLEX_FAILPOINTS") else {
        return;
    };
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, times) = match item.split_once(':') {
            Some((n, c)) => (n, c.parse().unwrap_or(1)),
            None => (item, 1),
        };
        tracing::warn!(failpoint = name, times, "failpoint armed");
        arm(name, times);
    }
}

/// Panic here if `name` is armed.
pub fn hit(name: &str) {
    if !ANY.load(Ordering::Acquire) {
        return;
    }
    let fire = {
        let mut a = ARMED.lock();
        match a.as_mut().and_then(|m| m.get_mut(name)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    if fire {
        panic!("failpoint {name} fired");
    }
}

/// How many more times `name` will fire.
pub fn remaining(name: &str) -> u64 {
    ARMED
        .lock()
        .as_ref()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0)
}

//! API keys and tenants. A request's `X-API-Key` (the header the Tinker SDK sends) names
//! its tenant; everything a tenant creates is looked up with its tenant id, so another
//! tenant's ids answer "not found". Keys come from a keys file in a real deployment; without
//! one, development mode makes every distinct key a tenant of its own. A key marked
//! `operator` in the keys file also opens the console's operator view (every tenant's
//! figures); development mode has no operator. This module never stores keys anywhere
//! but in memory, and never logs them.

use crate::error::{Error, Result};
use crate::jobs::TenantId;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Longest key accepted, so a hostile header cannot cost much hashing.
const MAX_KEY_LEN: usize = 512;

pub enum Auth {
    /// Every distinct key is its own tenant, named by a hash of the key.
    Development,
    /// Only listed keys; several keys may share a tenant. `operators`: the keys marked
    /// `operator`.
    Keys {
        keys: HashMap<String, TenantId>,
        operators: HashSet<String>,
    },
}

/// The field that marks an operator's key in the keys file.
pub const OPERATOR_FLAG: &str = "operator";

impl Auth {
    /// Parse a keys file: one `key tenant` pair per line, optionally followed by the
    /// tenant's quotas (`training_runs=4 ...`) and the word `operator`, `#` comments,
    /// blank lines.
    pub fn from_file(path: &Path) -> Result<Auth> {
        let text = std::fs::read_to_string(path)?;
        Self::parse(&text).map_err(|e| Error::invalid(path.display().to_string(), e))
    }

    pub fn parse(text: &str) -> std::result::Result<Auth, String> {
        let mut keys = HashMap::new();
        let mut operators = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            // Fields after the tenant are its quotas (`name=value`, [`crate::quota`]) and
            // the operator flag.
            let (key, tenant) = (parts.next(), parts.next());
            let rest: Vec<&str> = parts.collect();
            match (key, tenant) {
                (Some(key), Some(tenant))
                    if rest.iter().all(|f| f.contains('=') || *f == OPERATOR_FLAG) =>
                {
                    keys.insert(key.to_owned(), TenantId(tenant.to_owned()));
                    if rest.contains(&OPERATOR_FLAG) {
                        operators.insert(key.to_owned());
                    }
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `key tenant [quota=value ...] [operator]`",
                        n + 1
                    ))
                }
            }
        }
        if keys.is_empty() {
            return Err("no keys".into());
        }
        Ok(Auth::Keys { keys, operators })
    }

    /// The tenant a key belongs to, if any.
    pub fn tenant(&self, key: &str) -> Option<TenantId> {
        let key = key.trim();
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return None;
        }
        match self {
            Auth::Development => {
                let h = Sha256::digest(key.as_bytes());
                Some(TenantId(format!("dev-{}", &hex::encode(h)[..16])))
            }
            Auth::Keys { keys, .. } => keys.get(key).cloned(),
        }
    }

    /// Whether `key` is an operator's (listed with `operator` in the keys file).
    pub fn is_operator(&self, key: &str) -> bool {
        match self {
            Auth::Development => false,
            Auth::Keys { operators, .. } => operators.contains(key.trim()),
        }
    }

    pub fn is_development(&self) -> bool {
        matches!(self, Auth::Development)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_mode_gives_each_key_its_own_tenant() {
        let a = Auth::Development;
        assert_eq!(a.tenant("tml-a"), a.tenant("tml-a"));
        assert_ne!(a.tenant("tml-a"), a.tenant("tml-b"));
        assert_eq!(a.tenant(""), None);
        assert_eq!(a.tenant(&"x".repeat(1000)), None);
    }

    #[test]
    fn keys_file_maps_keys_and_refuses_others() {
        let a = Auth::parse("# team keys\ntml-1 alice\ntml-2 alice # laptop\ntml-3 bob\n").unwrap();
        assert_eq!(a.tenant("tml-1"), Some(TenantId("alice".into())));
        assert_eq!(a.tenant("tml-2"), Some(TenantId("alice".into())));
        assert_eq!(a.tenant("tml-3"), Some(TenantId("bob".into())));
        assert_eq!(a.tenant("tml-4"), None);
        assert!(Auth::parse("just-a-key\n").is_err());
        assert!(Auth::parse("tml-1 alice plugins=2\n").is_ok());
        assert!(Auth::parse("tml-1 alice bob\n").is_err());
        assert!(Auth::parse("# nothing\n").is_err());
    }

    #[test]
    fn an_operator_flag_marks_only_its_key() {
        let a = Auth::parse(
            "tml-1 alice plugins=2\ntml-2 ops operator\ntml-3 bob operator plugins=1\n",
        )
        .unwrap();
        assert_eq!(a.tenant("tml-2"), Some(TenantId("ops".into())));
        assert!(a.is_operator("tml-2") && a.is_operator("tml-3"));
        assert!(!a.is_operator("tml-1") && !a.is_operator("tml-4"));
        assert!(!Auth::Development.is_operator("tml-2"));
        assert!(Auth::parse("tml-1 alice admin\n").is_err());
    }
}

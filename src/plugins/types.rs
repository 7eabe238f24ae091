//! The small value types shared by the plugin host's API: plugin ids and
//! kinds, and config values. No wasmtime types appear here.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A plugin's identity: the lowercase hex sha256 of its component bytes.
/// The same bytes always give the same id, whoever uploads them; ownership is
/// tracked outside the host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PluginId(pub String);

impl PluginId {
    /// The id of a component's bytes.
    pub fn of(bytes: &[u8]) -> Self {
        PluginId(hex::encode(Sha256::digest(bytes)))
    }

    /// True when this looks like an id (64 lowercase hex digits), so it can
    /// safely name a file.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() == 64
            && self
                .0
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl fmt::Display for PluginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// `loraplex:plugin/loss-plugin`: a custom loss.
    Loss,
    /// `loraplex:plugin/sampler-plugin`: a custom sampling policy.
    Sampler,
}

impl PluginKind {
    /// The WIT world's name.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Loss => "loraplex:plugin/loss-plugin@0.1.0",
            PluginKind::Sampler => "loraplex:plugin/sampler-plugin@0.1.0",
        }
    }

    /// The interface the world exports, as it appears in a component.
    pub(crate) fn export_name(self) -> &'static str {
        match self {
            PluginKind::Loss => "loraplex:plugin/loss@0.1.0",
            PluginKind::Sampler => "loraplex:plugin/sampler@0.1.0",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Loss => "loss",
            PluginKind::Sampler => "sampler",
        })
    }
}

/// One value of a request's config (`loss_fn_config_v2`, sampling config): the same type
/// the training path uses.
pub use crate::train::loss::ConfigValue;

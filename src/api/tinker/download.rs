//! Checkpoint download through expiring URLs, as the SDK's `get_external_weights_urls` and
//! `tinker checkpoint download` use them: the owner asks (with its API key) for one URL per
//! file of the checkpoint's Hugging Face PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`); anyone holding a URL fetches the file with a plain GET,
//! no key, until the URL expires.
//!
//! A URL carries its own authority: the tenant, the checkpoint, the file and the expiry,
//! signed with HMAC-SHA256 under a server key ([`UrlSigner`]) kept in the data directory
//! (`url-signing.key`, made once with 32 random bytes), so links survive restarts and only
//! this server can mint them. A link does not outlive its checkpoint: the file is rendered
//! from the checkpoint when it is fetched. This module never accepts a link it did not sign
//! and never serves a file that is not one of the adapter's.

use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{Path, Tenant};
use crate::api::Shared;
use crate::error::{Error, Result};
use crate::jobs::TenantId;
use crate::store::peft::{PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path as FsPath;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The files of a PEFT adapter, the only names a link may carry.
pub const FILES: [&str; 2] = [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE];

/// The signing key's file in the data directory.
pub const KEY_FILE: &str = "url-signing.key";

/// Longest token accepted (hex doubles the tenant and the checkpoint name, each well under
/// 1 KiB); anything longer is not ours.
const MAX_TOKEN_LEN: usize = 4096;

const KEY_LEN: usize = 32;

/// Signs and checks download links with a server-held key.
pub struct UrlSigner {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(..)")
    }
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key` (at most one block long).
fn hmac_sha256(key: &[u8; KEY_LEN], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..KEY_LEN].copy_from_slice(key);
    let pad = |b: u8| block.map(|k| k ^ b);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Equal without an early exit, so a forger learns nothing from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl UrlSigner {
    pub fn with_key(key: [u8; KEY_LEN]) -> Self {
        UrlSigner { key }
    }

    /// The key in `dir/url-signing.key`, made (32 random bytes, owner-only) if missing.
    pub fn load_or_create(dir: &FsPath) -> Result<Self> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(b) => {
                let key: [u8; KEY_LEN] = b.as_slice().try_into().map_err(|_| {
                    Error::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not {KEY_LEN} bytes", path.display()),
                    ))
                })?;
                Ok(UrlSigner { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                getrandom::fill(&mut key).map_err(|e| {
                    Error::Unavailable(format!("no randomness for the signing key: {e}"))
                })?;
                write_private(&path, &key)?;
                Ok(UrlSigner { key })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn mac(&self, tenant: &str, name: &str, file: &str, expires: u64) -> [u8; 32] {
        let msg = format!("loraplex-download-v1\n{expires}\n{tenant}\n{name}\n{file}");
        hmac_sha256(&self.key, msg.as_bytes())
    }

    /// A token for `file` of `tenant`'s checkpoint `name`, good until `expires` (Unix s).
    pub fn sign(&self, tenant: &TenantId, name: &str, file: &str, expires: u64) -> String {
        format!(
            "{expires}.{}.{}.{}",
            hex::encode(tenant.as_str()),
            hex::encode(name),
            hex::encode(self.mac(tenant.as_str(), name, file, expires))
        )
    }

    /// The tenant and checkpoint a token names for `file`, if this server signed it and it
    /// has not expired at `now`.
    pub fn verify(&self, token: &str, file: &str, now: SystemTime) -> Result<(TenantId, String)> {
        let bad = || Error::Forbidden("the download link is invalid or has expired".into());
        if token.len() > MAX_TOKEN_LEN {
            return Err(bad());
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [exp, tenant, name, mac] = parts[..] else {
            return Err(bad());
        };
        let expires: u64 = exp.parse().map_err(|_| bad())?;
        let text = |h: &str| hex::decode(h).ok().and_then(|b| String::from_utf8(b).ok());
        let (tenant, name) = (text(tenant).ok_or_else(bad)?, text(name).ok_or_else(bad)?);
        let mac = hex::decode(mac).map_err(|_| bad())?;
        if !same(&mac, &self.mac(&tenant, &name, file, expires)) {
            return Err(bad());
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now >= expires {
            return Err(bad());
        }
        Ok((TenantId(tenant), name))
    }
}

/// Write a new file readable by its owner only, durably.
fn write_private(path: &FsPath, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Where clients reach this server: `LORAPLEX_PUBLIC_URL`, else `http://` and the Host
/// the request was sent to, else the listen address.
fn base_url(s: &Shared, headers: &HeaderMap) -> String {
    if let Some(u) = &s.cfg.public_url {
        return u.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| s.cfg.addr.to_string());
    format!("http://{host}")
}

/// `GET /api/v1/training_runs/{id}/checkpoints/{kind}/{name}/external_weights_urls`: a
/// signed URL per file of the checkpoint's PEFT adapter, for its owner only.
pub async fn external_weights_urls(
    State(s): State<Shared>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let key = format!("{id}/{kind}/{name}");
    s.engine.registry().checkpoint_entry(&tenant, &key)?;
    let ttl = Duration::from_secs(s.cfg.download_url_ttl_s.max(1));
    let expires = SystemTime::now() + ttl;
    let exp = expires
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = base_url(&s, &headers);
    let urls: serde_json::Map<String, Value> = FILES
        .iter()
        .map(|f| {
            let token = s.url_signer.sign(&tenant, &key, f, exp);
            (
                (*f).to_owned(),
                Value::String(format!("{base}/api/v1/download/{token}/{f}")),
            )
        })
        .collect();
    tracing::info!(checkpoint = %key, "download links signed");
    Ok(axum::Json(json!({
        "urls": urls,
        "expires": super::rfc3339(UNIX_EPOCH + Duration::from_secs(exp)),
    })))
}

/// `GET /api/v1/download/{token}/{file}` (no API key): one file of a checkpoint's PEFT
/// adapter, if the token is a live link this server signed for that file.
pub async fn download(
    State(s): State<Shared>,
    Path((token, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let Some(&file) = FILES.iter().find(|f| **f == file) else {
        return Err(ApiError::not_found("file", file));
    };
    let (tenant, name) = s.url_signer.verify(&token, file, SystemTime::now())?;
    let c = s.engine.registry().checkpoint_entry(&tenant, &name)?;
    let base = c.base.clone();
    let state = s.engine.checkpoint_state(c).await?;
    let bytes = tokio::task::spawn_blocking(move || {
        crate::store::peft::peft_files(&state.weights, &base).map(|files| {
            files
                .into_iter()
                .find(|(n, _)| *n == file)
                .map(|(_, b)| b)
                .unwrap_or_default()
        })
    })
    .await
    .map_err(|e| Error::Unavailable(format!("export panicked: {e}")))?
    .map_err(Error::from)?;
    tracing::info!(checkpoint = %name, file, bytes = bytes.len(), "checkpoint file downloaded");
    let ctype = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: key "Jefe". HMAC zero-pads the key to a block, so "Jefe" and "Jefe"
        // followed by zeros are the same key.
        let key = *b"Jefe\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn links_verify_only_as_signed_and_until_they_expire() {
        let s = UrlSigner::with_key([7; KEY_LEN]);
        let t = TenantId("tenant-a".into());
        let name = "s1:train:0/external_weights/final";
        let tok = s.sign(&t, name, PEFT_WEIGHTS_FILE, 2_000);
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let (tenant, n) = s.verify(&tok, PEFT_WEIGHTS_FILE, at(1_999)).unwrap();
        assert_eq!((tenant.as_str(), n.as_str()), ("tenant-a", name));
        assert!(
            s.verify(&tok, PEFT_WEIGHTS_FILE, at(2_000)).is_err(),
            "expired"
        );
        assert!(
            s.verify(&tok, PEFT_CONFIG_FILE, at(10)).is_err(),
            "other file"
        );
        let other = UrlSigner::with_key([8; KEY_LEN]);
        assert!(
            other.verify(&tok, PEFT_WEIGHTS_FILE, at(10)).is_err(),
            "other key"
        );
        // A later expiry, or another tenant, breaks the signature.
        let forged = tok.replacen("2000.", "9999.", 1);
        assert!(s.verify(&forged, PEFT_WEIGHTS_FILE, at(10)).is_err());
        let parts: Vec<&str> = tok.split('.').collect();
        let swapped = format!(
            "{}.{}.{}.{}",
            parts[0],
            hex::encode("tenant-b"),
            parts[2],
            parts[3]
        );
        assert!(s.verify(&swapped, PEFT_WEIGHTS_FILE, at(10)).is_err());
        for junk in ["", "a.b.c.d", "1.zz.zz.zz", &"9".repeat(5000)] {
            assert!(s.verify(junk, PEFT_WEIGHTS_FILE, at(10)).is_err(), "{junk}");
        }
    }

    #[test]
    fn the_key_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = UrlSigner::load_or_create(dir.path()).unwrap();
        let b = UrlSigner::load_or_create(dir.path()).unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, [0; KEY_LEN]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

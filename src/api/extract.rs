//! Extractors whose rejections are JSON errors like every other failure: the tenant from
//! the API key, JSON bodies and protobuf bodies. They read at most the router's body
//! limit and name what was wrong (missing field, wrong type, bad encoding).

use super::error::ApiError;
use super::Shared;
use crate::jobs::TenantId;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// The caller's tenant, from `X-API-Key` (or `Authorization: Bearer <key>`). Every
/// authenticated request takes one token from its tenant's bucket here: over the rate it
/// is answered 429 with Retry-After before its body is read ([`crate::quota`]).
pub struct Tenant(pub TenantId);

impl FromRequestParts<Shared> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        crate::failpoint::hit("api.request");
        let h = &parts.headers;
        let key = h
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                h.get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .ok_or(ApiError::Unauthorized)?;
        let tenant = state.auth.tenant(key).ok_or(ApiError::Unauthorized)?;
        state.engine.quotas().admit_request(&tenant)?;
        Ok(Tenant(tenant))
    }
}

async fn body_bytes(req: Request, state: &Shared) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status().as_u16() == 413 => ApiError::TooLarge {
            limit: state.cfg.max_body_bytes,
        },
        other => ApiError::Malformed(other.body_text()),
    })
}

/// A JSON body. Unknown fields are ignored (the SDK may add some); a missing or mistyped
/// field is a 400 naming it.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::Malformed("empty body; expected JSON".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::Malformed(format!("invalid JSON: {inner}"))
        } else {
            ApiError::Malformed(format!("invalid JSON at {path}: {inner}"))
        }
    })
}

/// A protobuf body (`application/x-protobuf`), zstd-compressed bodies refused clearly.
pub struct Proto<T>(pub T);

impl<T: prost::Message + Default> FromRequest<Shared> for Proto<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        if let Some(enc) = req.headers().get(axum::http::header::CONTENT_ENCODING) {
            if enc.as_bytes() != b"identity" {
                return Err(ApiError::Malformed(format!(
                    "Content-Encoding {enc:?} is not supported; send the protobuf uncompressed"
                )));
            }
        }
        let bytes = body_bytes(req, state).await?;
        T::decode(bytes)
            .map(Proto)
            .map_err(|e| ApiError::Malformed(format!("invalid protobuf: {e}")))
    }
}

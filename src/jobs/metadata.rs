//! `user_metadata`: the string map a Tinker client attaches to a session, a training run or
//! a checkpoint (the cookbook keeps its `renderer_name` there). Stored with its object and
//! returned by every route that describes it; never interpreted.
//!
//! Bounded: at most [`MAX_USER_METADATA_BYTES`] serialized. Values are kept as strings, as
//! every SDK response type (`dict[str, str]`) reads them back; the request types take any
//! JSON value, so a number, a boolean, null or a nested value is kept as its JSON text
//! (`3` → `"3"`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Largest `user_metadata` kept, serialized as JSON (bytes).
pub const MAX_USER_METADATA_BYTES: usize = 16 << 10;

/// A validated `user_metadata` map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserMetadata(pub BTreeMap<String, String>);

impl UserMetadata {
    /// From a request field: absent or `null` is `None`; an object is kept with its values
    /// as strings (see the module); anything else, or more than
    /// [`MAX_USER_METADATA_BYTES`], is refused, naming `field`.
    pub fn from_json(field: &str, v: Option<Value>) -> Result<Option<UserMetadata>> {
        let map = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(Error::invalid(
                    field,
                    format!("must be an object, not {}", kind(&other)),
                ))
            }
        };
        let mut out = BTreeMap::new();
        let mut size = 2usize;
        for (k, v) in map {
            let s = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            // Key and value quoted, a colon and a comma; escapes make it longer, which
            // the exact check below catches.
            size = size.saturating_add(k.len() + s.len() + 6);
            if size > MAX_USER_METADATA_BYTES {
                break;
            }
            out.insert(k, s);
        }
        let m = UserMetadata(out);
        let exact = serde_json::to_vec(&m).map_or(usize::MAX, |b| b.len());
        if size > MAX_USER_METADATA_BYTES || exact > MAX_USER_METADATA_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "{} bytes serialized; at most {MAX_USER_METADATA_BYTES}",
                    size.max(exact)
                ),
            ));
        }
        Ok(Some(m))
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.0).unwrap_or(Value::Null)
    }
}

/// `Some(m)` as a JSON object, `None` as null.
pub fn metadata_json(m: Option<&UserMetadata>) -> Value {
    m.map_or(Value::Null, UserMetadata::to_json)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_only_and_bounded() {
        assert_eq!(UserMetadata::from_json("m", None).unwrap(), None);
        assert_eq!(
            UserMetadata::from_json("m", Some(Value::Null)).unwrap(),
            None
        );
        let m = UserMetadata::from_json("m", Some(json!({"renderer_name": "llama3"})))
            .unwrap()
            .unwrap();
        assert_eq!(m.to_json(), json!({"renderer_name": "llama3"}));
        let m = UserMetadata::from_json(
            "m",
            Some(json!({"step": 3, "ok": true, "none": null, "deep": {"a": [1]}})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            m.to_json(),
            json!({"step": "3", "ok": "true", "none": "null", "deep": "{\"a\":[1]}"})
        );
        let e = UserMetadata::from_json("user_metadata", Some(json!([1]))).unwrap_err();
        assert!(
            e.to_string().contains("user_metadata") && e.to_string().contains("an array"),
            "{e}"
        );
        let big = "x".repeat(MAX_USER_METADATA_BYTES);
        let e = UserMetadata::from_json("user_metadata", Some(json!({"a": big}))).unwrap_err();
        assert!(e.to_string().contains("at most 16384"), "{e}");
        // Escapes count: 3000 quotes serialize to 6000 bytes each.
        let q = "\"".repeat(3000);
        let e = UserMetadata::from_json("m", Some(json!({"a": q, "b": q, "c": q}))).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }
}

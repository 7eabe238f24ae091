//! The Tinker wire as the tests that drive a real `loraplex serve` speak it: JSON calls
//! with the tenant key, polling a future to its end, and protobuf forward_backward requests
//! on next-token data cut from [`SEQ`].

use super::server::http;
use loraplex::api::proto::{self, chunk, tensor};
use prost::Message;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The tenant key the wire tests use (each test runs its own server).
pub const KEY: &str = "tml-wire";
pub use super::http::SEQ;

pub fn post(port: u16, path: &str, v: Value) -> (u16, Value) {
    let (s, _, b) = http(
        port,
        "POST",
        path,
        KEY,
        "application/json",
        v.to_string().as_bytes(),
    );
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

pub fn get(port: u16, path: &str) -> (u16, Value) {
    let (s, _, b) = http(port, "GET", path, KEY, "", b"");
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// Poll a future to its end: JSON (or a failure) as a Value, or protobuf bytes.
pub fn retrieve(port: u16, id: &str) -> Result<Value, Vec<u8>> {
    loop {
        let (s, h, b) = http(
            port,
            "POST",
            "/api/v1/retrieve_future",
            KEY,
            "application/json",
            json!({"request_id": id}).to_string().as_bytes(),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        if h.iter()
            .any(|(k, v)| k == "content-type" && v.contains("protobuf"))
        {
            return Err(b);
        }
        let v: Value = serde_json::from_slice(&b).expect("json");
        if v["type"] != "try_again" {
            return Ok(v);
        }
    }
}

pub fn datum(n_rows: usize) -> proto::Datum {
    let tokens: Vec<i32> = SEQ.iter().cycle().take(n_rows).copied().collect();
    let n = tokens.len() - 1;
    proto::Datum {
        model_input: vec![proto::Chunk {
            chunk: Some(chunk::Chunk::EncodedText(proto::EncodedTextChunk {
                tokens: proto::write_i32(tokens[..n].iter().copied()),
            })),
        }],
        loss_fn_inputs: [
            (
                "target_tokens".to_owned(),
                proto::Tensor {
                    encoding: Some(tensor::Encoding::Dense(proto::write_i64(
                        tokens[1..].iter().map(|&t| t as i64),
                    ))),
                    dtype: proto::DType::Int64 as i32,
                    shape: vec![n as i64],
                },
            ),
            (
                "weights".to_owned(),
                proto::Tensor {
                    encoding: Some(tensor::Encoding::Dense(proto::write_f32(vec![1.0; n]))),
                    dtype: proto::DType::Float32 as i32,
                    shape: vec![n as i64],
                },
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

pub fn fb(port: u16, model: &str, seq: i32, forward_only: bool, data: Vec<proto::Datum>) -> String {
    let req = proto::ForwardBackwardRequest {
        model_id: model.into(),
        seq_id: seq,
        data,
        loss_fn: "cross_entropy".into(),
        forward_only,
        loss_fn_config_v2: HashMap::new(),
        ..Default::default()
    };
    let (s, _, b) = http(
        port,
        "POST",
        "/api/v1/forward_backward",
        KEY,
        "application/x-protobuf",
        &req.encode_to_vec(),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).expect("json");
    v["request_id"].as_str().expect("request id").to_owned()
}

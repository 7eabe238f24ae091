//! The Tinker SDK's protobuf messages (package `tinker_public`), written out with prost's
//! derives so the build needs no `protoc`; field numbers follow the SDK's descriptor
//! (../shared/docs/tinker-api.md, Appendix A). Also the little-endian array codecs the
//! byte fields use. Only the wire format lives here: what the messages mean is in
//! `tinker::training` and `tinker::sampling`.

use crate::error::{Error, Result};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StopReason {
    Stop = 0,
    Length = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DType {
    Unspecified = 0,
    Float32 = 1,
    Int64 = 2,
    Int32 = 3,
    Bfloat16 = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SampleResponse {
    #[prost(message, repeated, tag = "1")]
    pub sequences: Vec<SampledSequence>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub prompt_logprobs: Option<Vec<u8>>,
    #[prost(message, optional, tag = "3")]
    pub topk_prompt_logprobs: Option<TopkLogprobs>,
    #[prost(int32, tag = "4")]
    pub prompt_cache_hit_tokens: i32,
    #[prost(message, optional, tag = "5")]
    pub target_prompt_logprobs: Option<Tensor>,
    #[prost(message, optional, tag = "6")]
    pub prompt_alt_tokens: Option<PromptAltTokens>,
}

/// Draws of `prompt_alt_tokens_k`: int64 ids and float32 logprobs, both `[len(prompt) - 1, k]`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PromptAltTokens {
    #[prost(message, optional, tag = "1")]
    pub tokens: Option<Tensor>,
    #[prost(message, optional, tag = "2")]
    pub logprobs: Option<Tensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SampledSequence {
    #[prost(enumeration = "StopReason", tag = "1")]
    pub stop_reason: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub tokens: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub logprobs: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub topk_sampled_logprobs: Option<TopkLogprobs>,
}

/// Row-major `length × k` token ids (int32) and logprobs (float32).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TopkLogprobs {
    #[prost(bytes = "vec", tag = "1")]
    pub token_ids: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub logprobs: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub k: u32,
    #[prost(uint32, tag = "4")]
    pub length: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SparseCsr {
    #[prost(bytes = "vec", tag = "1")]
    pub values: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub crow_indices: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub col_indices: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tensor {
    #[prost(oneof = "tensor::Encoding", tags = "1, 2")]
    pub encoding: Option<tensor::Encoding>,
    #[prost(enumeration = "DType", tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub shape: Vec<i64>,
}

pub mod tensor {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Encoding {
        #[prost(bytes, tag = "1")]
        Dense(Vec<u8>),
        #[prost(message, tag = "2")]
        SparseCsr(super::SparseCsr),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchedTensor {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// int64[N+1] byte offsets into `data`.
    #[prost(bytes = "vec", tag = "2")]
    pub offsets: Vec<u8>,
    #[prost(enumeration = "DType", tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub trailing_shape: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayRecord {
    #[prost(string, tag = "1")]
    pub type_tag: String,
    #[prost(map = "string, message", tag = "2")]
    pub fields: HashMap<String, BatchedTensor>,
    #[prost(int64, tag = "3")]
    pub num_datums: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardOutput {
    #[prost(string, tag = "1")]
    pub loss_fn_output_type: String,
    #[prost(message, repeated, tag = "2")]
    pub loss_fn_outputs: Vec<ArrayRecord>,
    #[prost(map = "string, double", tag = "3")]
    pub metrics: HashMap<String, f64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardRequest {
    #[prost(string, tag = "1")]
    pub model_id: String,
    #[prost(int32, tag = "2")]
    pub seq_id: i32,
    #[prost(message, repeated, tag = "3")]
    pub data: Vec<Datum>,
    #[prost(string, tag = "4")]
    pub loss_fn: String,
    #[prost(map = "string, double", tag = "5")]
    pub loss_fn_config: HashMap<String, f64>,
    #[prost(bool, tag = "6")]
    pub forward_only: bool,
    #[prost(map = "string, message", tag = "7")]
    pub loss_fn_config_v2: HashMap<String, LossConfigValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LossConfigValue {
    #[prost(oneof = "loss_config_value::Value", tags = "1, 2")]
    pub value: Option<loss_config_value::Value>,
}

pub mod loss_config_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(double, tag = "1")]
        Number(f64),
        #[prost(string, tag = "2")]
        Text(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Datum {
    #[prost(message, repeated, tag = "1")]
    pub model_input: Vec<Chunk>,
    #[prost(map = "string, message", tag = "2")]
    pub loss_fn_inputs: HashMap<String, Tensor>,
    /// Provenance (`Datum.with_provenance`): runs tiling `model_input`...
    #[prost(message, repeated, tag = "3")]
    pub model_input_spans: Vec<ProvenanceSpan>,
    /// ... and runs tiling `loss_fn_inputs["target_tokens"]`.
    #[prost(message, repeated, tag = "4")]
    pub loss_fn_input_spans: Vec<ProvenanceSpan>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProvenanceSpan {
    #[prost(oneof = "provenance_span::Span", tags = "1, 2")]
    pub span: Option<provenance_span::Span>,
}

pub mod provenance_span {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Span {
        /// Positions of the prompt of the request that sampled the named sequence.
        #[prost(message, tag = "1")]
        PromptTokens(super::SpanRun),
        /// Positions of the named sequence's sampled tokens.
        #[prost(message, tag = "2")]
        SampledTokens(super::SpanRun),
    }
}

/// `PromptProvenanceSpan` and `SampledProvenanceSpan`: the same three fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanRun {
    #[prost(string, tag = "1")]
    pub sequence_id: String,
    #[prost(int64, tag = "2")]
    pub offset: i64,
    #[prost(int64, tag = "3")]
    pub length: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(oneof = "chunk::Chunk", tags = "1, 2, 3")]
    pub chunk: Option<chunk::Chunk>,
}

pub mod chunk {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Chunk {
        #[prost(message, tag = "1")]
        EncodedText(super::EncodedTextChunk),
        #[prost(message, tag = "2")]
        Image(super::OpaqueChunk),
        #[prost(message, tag = "3")]
        Dmel(super::OpaqueChunk),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedTextChunk {
    /// int32[]
    #[prost(bytes = "vec", tag = "1")]
    pub tokens: Vec<u8>,
}

/// Image and dmel chunks: decoded only far enough to refuse them with a clear error.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpaqueChunk {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

// --- little-endian arrays -------------------------------------------------------------

fn chunks<'a, const N: usize>(
    field: &str,
    bytes: &'a [u8],
) -> Result<impl Iterator<Item = [u8; N]> + 'a> {
    if bytes.len() % N != 0 {
        return Err(Error::invalid(
            field,
            format!(
                "{} bytes is not a whole number of {N}-byte values",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| <[u8; N]>::try_from(c).unwrap_or([0; N])))
}

pub fn read_i32(field: &str, bytes: &[u8]) -> Result<Vec<i32>> {
    Ok(chunks::<4>(field, bytes)?.map(i32::from_le_bytes).collect())
}

pub fn read_i64(field: &str, bytes: &[u8]) -> Result<Vec<i64>> {
    Ok(chunks::<8>(field, bytes)?.map(i64::from_le_bytes).collect())
}

pub fn read_f32(field: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(chunks::<4>(field, bytes)?.map(f32::from_le_bytes).collect())
}

pub fn write_i32(v: impl IntoIterator<Item = i32>) -> Vec<u8> {
    v.into_iter().flat_map(i32::to_le_bytes).collect()
}

pub fn write_i64(v: impl IntoIterator<Item = i64>) -> Vec<u8> {
    v.into_iter().flat_map(i64::to_le_bytes).collect()
}

pub fn write_f32(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn arrays_round_trip_and_reject_ragged_bytes() {
        let v = vec![1.5f32, -2.0, f32::NAN];
        let back = read_f32("x", &write_f32(v.clone())).unwrap();
        assert_eq!(back[..2], v[..2]);
        assert!(back[2].is_nan());
        assert_eq!(read_i64("x", &write_i64([7, -1])).unwrap(), vec![7, -1]);
        let e = read_i32("data[0].tokens", &[1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("data[0].tokens"), "{e}");
    }

    #[test]
    fn request_encodes_and_decodes() {
        let mut r = ForwardBackwardRequest {
            model_id: "s:train:0".into(),
            seq_id: 3,
            loss_fn: "cross_entropy".into(),
            ..Default::default()
        };
        r.data.push(Datum {
            model_input: vec![Chunk {
                chunk: Some(chunk::Chunk::EncodedText(EncodedTextChunk {
                    tokens: write_i32([1, 2, 3]),
                })),
            }],
            loss_fn_input_spans: vec![ProvenanceSpan {
                span: Some(provenance_span::Span::SampledTokens(SpanRun {
                    sequence_id: "future-1-0".into(),
                    offset: 0,
                    length: 3,
                })),
            }],
            ..Default::default()
        });
        let back = ForwardBackwardRequest::decode(&*r.encode_to_vec()).unwrap();
        assert_eq!(back, r);
    }
}

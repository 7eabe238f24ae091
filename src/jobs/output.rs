//! What a finished job hands back: its output ([`JobOutput`], with a sampling job's
//! [`SampleOutput`]) or why it failed ([`JobFailure`]). The job types and their futures
//! both use these; this module imports neither.

use super::ids::{AdapterId, SessionId};
use crate::error::{Category, Error};
use crate::lora::optim::StepReport;
use crate::sample::prompt::{AltTokens, TargetLogprobs};
pub use crate::sample::SampledSeq;
use crate::train::WorkResult;

/// The result of a finished job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum JobOutput {
    ForwardBackward(WorkResult),
    OptimStep(StepReport),
    Saved { name: String },
    Loaded { name: String, model: AdapterId },
    ModelCreated(AdapterId),
    ModelUnloaded(AdapterId),
    SamplingSession(SessionId),
    Sample(SampleOutput),
}

/// Why a job failed: a message for the caller and whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobFailure {
    pub message: String,
    pub category: Category,
}

impl From<&Error> for JobFailure {
    fn from(e: &Error) -> Self {
        JobFailure {
            message: e.to_string(),
            category: e.category(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleOutput {
    pub sequences: Vec<SampledSeq>,
    /// With `prompt_logprobs`: for prompt tokens 1.., log p(token | earlier tokens).
    pub prompt_logprobs: Option<Vec<f32>>,
    /// With `prompt_top_logprobs`: per prompt position after the first, the most likely
    /// (token, logprob), best first.
    pub prompt_top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
    /// The request's `prompt_logprobs_last_n`, for rendering (see [`SampleRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs_last_n: Option<usize>,
    /// With `target_prompt_logprobs`: the logprob of each id it named, in its layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_prompt_logprobs: Option<TargetLogprobs>,
    /// With `prompt_alt_tokens_k`: the draws and their logprobs, `[len(prompt) - 1, k]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_alt_tokens: Option<AltTokens>,
    /// Prompt tokens whose KV came from the prefix cache: counted once for the request, as
    /// its samples share one prompt.
    #[serde(default)]
    pub prompt_cache_hit_tokens: usize,
    /// The served base model that sampled it, by name: its tokens are that base's
    /// (a text rendering decodes them with its tokenizer). `None` in results stored before
    /// a server had several bases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
}

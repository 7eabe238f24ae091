//! Chat templates: renders a conversation with the model's own Jinja template (from GGUF
//! metadata or `tokenizer_config.json`) and marks which tokens belong to assistant turns,
//! so a loss can be put on the assistant's tokens only.

use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A rendered conversation: tokens and, per token, whether it was produced by the assistant.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    pub tokens: Vec<u32>,
    pub assistant_mask: Vec<bool>,
}

impl ChatTemplate {
    pub fn new(source: String, tok: &TextTokenizer) -> Self {
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        ChatTemplate {
            source,
            bos_token: name(tok.bos_token_id),
            eos_token: name(tok.eos_token_id),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// Render and tokenize, marking the assistant's tokens. Each message's span is found by
    /// rendering the conversation prefix by prefix, which works for any template whose
    /// rendering of a prefix is a prefix of the whole (true of ChatML and Llama 3).
    pub fn render_tokens(&self, tok: &TextTokenizer, messages: &[Message]) -> Result<RenderedChat> {
        let mut tokens = Vec::new();
        let mut assistant_mask = Vec::new();
        let mut prev = String::new();
        for i in 0..messages.len() {
            let text = self.render(&messages[..=i], false)?;
            let Some(piece) = text.strip_prefix(prev.as_str()) else {
                return Err(Error::Template(
                    "template renders a prefix of the conversation differently; cannot mark assistant tokens".into(),
                ));
            };
            let ids = tok.encode(piece)?;
            let is_asst = messages[i].role == "assistant";
            if is_asst {
                // The role header ("<|im_start|>assistant\n") is prompt, not target: find it by
                // rendering the generation prompt for the preceding turns.
                let header = self.render(&messages[..i], true)?;
                let head_len = header
                    .strip_prefix(prev.as_str())
                    .map(|h| tok.encode(h).map(|v| v.len()))
                    .transpose()?
                    .unwrap_or(0)
                    .min(ids.len());
                assistant_mask.extend((0..ids.len()).map(|j| j >= head_len));
            } else {
                assistant_mask.extend(std::iter::repeat_n(false, ids.len()));
            }
            tokens.extend(ids);
            prev = text;
        }
        Ok(RenderedChat {
            tokens,
            assistant_mask,
        })
    }
}

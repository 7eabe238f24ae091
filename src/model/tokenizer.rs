//! Text ↔ token ids. Builds a byte-level BPE tokenizer from GGUF metadata by hand (candle's
//! `from_gguf` adds a prefix space and is wrong for SmolLM2) or loads `tokenizer.json`.
//! Never adds BOS on its own: callers (chat rendering, the API) decide.

use super::weights::TokenizerSource;
use crate::error::{Error, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF `token_type` value of control tokens (`<|im_start|>` and friends).
const GGUF_TOKEN_CONTROL: i32 = 3;
const GGUF_TOKEN_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextTokenizer {
    pub fn from_source(src: &TokenizerSource) -> Result<Self> {
        if let Some(path) = &src.tokenizer_json {
            let inner = Tokenizer::from_file(path).map_err(tok_err)?;
            let named = |n: &Option<String>| n.as_deref().and_then(|n| inner.token_to_id(n));
            return Ok(TextTokenizer {
                bos_token_id: src.bos_token_id.or_else(|| named(&src.special_names.0)),
                eos_token_id: src.eos_token_id.or_else(|| named(&src.special_names.1)),
                inner,
            });
        }
        let (Some(tokens), Some(merges)) = (&src.gguf_tokens, &src.gguf_merges) else {
            return Err(Error::Tokenizer(
                "no tokenizer: neither tokenizer.json nor GGUF tokens and merges".into(),
            ));
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if let Some(types) = &src.gguf_token_types {
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| **t == GGUF_TOKEN_CONTROL || **t == GGUF_TOKEN_USER_DEFINED)
                .filter_map(|(i, t)| {
                    tokens
                        .get(i)
                        .map(|s| AddedToken::from(s.clone(), *t == GGUF_TOKEN_CONTROL))
                })
                .collect();
            inner.add_special_tokens(specials).map_err(tok_err)?;
        }
        Ok(TextTokenizer {
            inner,
            bos_token_id: src.bos_token_id,
            eos_token_id: src.eos_token_id,
        })
    }

    /// Encode without adding BOS/EOS; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Save as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }
}

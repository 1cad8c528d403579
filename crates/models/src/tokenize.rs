//! Tokenizers: a Hugging Face `tokenizer.json` for BERT models, and a byte-level BPE rebuilt
//! from GGUF metadata (tokens, merges, token types, chat template) for Llama-family models.

use tokenizers::{
    AddedToken, Tokenizer, TruncationParams,
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{BPE, Vocab},
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence},
};

use crate::{ModelError, Result, gguf::GgufFile};

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// WordPiece tokenizer of a BERT model: adds `[CLS]`/`[SEP]`, truncates to `max_len` tokens,
/// never pads (the engine batches sequences of different lengths itself).
pub struct BertTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl BertTokenizer {
    pub fn from_json(bytes: &[u8], max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(tok_err)?;
        Ok(Self { inner, max_len })
    }

    /// The most tokens [`Self::encode`] returns (longer texts are truncated).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Byte-level BPE tokenizer of a Llama-family GGUF, with its chat template.
pub struct LlamaTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: EOS and the chat end-of-turn marker when present.
    pub stop: Vec<u32>,
    pub add_bos: bool,
    vocab_size: usize,
}

impl LlamaTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
        let types = gguf
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        // llama.cpp's `smollm`/`gpt2` pre-tokenisers: digits one by one, then the GPT-2 regex.
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);
        let id_of = |key: &str| gguf.get_u32(key).ok();
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = tokens.iter().position(|t| *t == marker) {
                stop.push(id as u32);
            }
        }
        let add_bos = matches!(
            gguf.get("tokenizer.ggml.add_bos_token"),
            Some(crate::gguf::MetaValue::Bool(true))
        );
        Ok(Self {
            inner,
            chat_template: gguf
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
            bos,
            eos,
            stop,
            add_bos,
            vocab_size: tokens.len(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised. A BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(self.inner.encode(text, false).map_err(tok_err)?.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Renders the GGUF's chat template for one user message with the generation prompt.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat_prompt_messages(&[("user", user)])
    }

    /// The prompt for a conversation of `(role, content)` messages, ending with the
    /// assistant's turn, through the model's chat template.
    pub fn chat_prompt_messages(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let token = |id: Option<u32>| {
            id.and_then(|id| self.inner.id_to_token(id))
                .unwrap_or_default()
        };
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages
                        .iter()
                        .map(|(role, content)| minijinja::context! { role => role, content => content })
                        .collect::<Vec<_>>(),
                    add_generation_prompt => true,
                    bos_token => token(self.bos),
                    eos_token => token(self.eos),
                })
            })
            .map_err(|e| ModelError::Template(e.to_string()))
    }
}

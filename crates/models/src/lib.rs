//! # tabula-models
//!
//! The two model families Tabula serves, written once against [`tabula_engine::Backend`]:
//! a BERT encoder (all-MiniLM-L6-v2: sentence embeddings) and a Llama decoder (SmolLM2: text
//! generation with a KV cache). This crate owns the file formats (safetensors, GGUF), the
//! tokenizers (Hugging Face `tokenizer.json`, or rebuilt from GGUF metadata with its chat
//! template), the catalogue of known models with their checksums, and the layer-range shards
//! with their activation byte format ([`activations`]).
//!
//! It must not depend on any network, process or CLI code: everything here builds for
//! `wasm32-unknown-unknown`, and files come in as bytes.

pub mod activations;
pub mod bert;
pub mod catalog;
pub mod exact;
pub mod gguf;
pub mod llama;
mod safetensors_io;
pub use safetensors_io::merge_shards;
pub mod sampling;
pub mod tokenize;

pub use activations::Activations;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Engine(#[from] tabula_engine::EngineError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model file: {0}")]
    Format(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("activations: {0}")]
    Activations(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What a model file holds, once checked ([`llama::inspect`], [`bert::inspect`]): the numbers
/// `tabula models add` and `models list` show.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSummary {
    /// `llama`, `qwen2`, `gemma3`, `bert`, …
    pub architecture: String,
    pub parameters: u64,
    pub layers: usize,
    pub vocab_size: usize,
    /// Positions (tokens) the model takes.
    pub context_length: usize,
    /// Resident weights in fast precision (f32).
    pub fast_bytes: u64,
    /// Resident weights in exact precision, about: int8 values plus a scale pair per 32.
    pub exact_bytes: u64,
}

/// Decodes little-endian f32 bytes.
pub(crate) fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

//! # tabula-models
pub mod gguf;

//! # tabula-web
//!
//! The browser build of Tabula: wasm-bindgen bindings that load a model from bytes the page
//! fetched and run it on WebGPU (through `wgpu`) or on the wasm CPU path. This crate owns only
//! the JavaScript boundary (argument conversion with `serde-wasm-bindgen`, errors as JS
//! exceptions); the model code is `tabula-models`, unchanged. It must not grow logic of its own
//! that the native build lacks.

use serde::Serialize;
use tabula_engine::{
    Backend,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::bert::SentenceEmbedder;
use wasm_bindgen::prelude::*;

enum Engine {
    Cpu(SentenceEmbedder<CpuBackend>),
    Gpu(Box<GpuBackend>, SentenceEmbedder<GpuBackend>),
}

/// A sentence-embedding model resident in the page.
#[wasm_bindgen]
pub struct Embedder {
    engine: Engine,
    device: String,
}

#[derive(Serialize)]
struct EmbeddingOut {
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

#[wasm_bindgen]
impl Embedder {
    /// Loads a BERT sentence-embedding model from its three files. `backend` is `"gpu"`
    /// (WebGPU; fails if the browser offers no adapter) or `"cpu"` (wasm).
    pub async fn load(
        config_json: &[u8],
        safetensors: &[u8],
        tokenizer_json: &[u8],
        backend: &str,
    ) -> Result<Embedder, JsError> {
        match backend {
            "cpu" => {
                let model =
                    SentenceEmbedder::load(&CpuBackend, config_json, safetensors, tokenizer_json)
                        .map_err(js_err)?;
                Ok(Embedder {
                    engine: Engine::Cpu(model),
                    device: CpuBackend.describe(),
                })
            }
            "gpu" => {
                let gpu = GpuBackend::new(AdapterChoice::Any).await.map_err(js_err)?;
                let model = SentenceEmbedder::load(&gpu, config_json, safetensors, tokenizer_json)
                    .map_err(js_err)?;
                let device = gpu.describe();
                Ok(Embedder {
                    engine: Engine::Gpu(Box::new(gpu), model),
                    device,
                })
            }
            other => Err(JsError::new(&format!(
                "unknown backend `{other}` (expected \"gpu\" or \"cpu\")"
            ))),
        }
    }

    /// The device in use, e.g. `"cpu"` or the WebGPU adapter's name.
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.device.clone()
    }

    /// Embeds an array of strings: returns `[{input_ids, embedding}]` in input order.
    pub async fn embed(&self, texts: JsValue) -> Result<JsValue, JsError> {
        let texts: Vec<String> = serde_wasm_bindgen::from_value(texts)
            .map_err(|e| JsError::new(&format!("expected an array of strings: {e}")))?;
        let out = match &self.engine {
            Engine::Cpu(m) => m.embed(&CpuBackend, &texts).await,
            Engine::Gpu(gpu, m) => m.embed(gpu.as_ref(), &texts).await,
        }
        .map_err(js_err)?;
        let out: Vec<EmbeddingOut> = out
            .into_iter()
            .map(|e| EmbeddingOut {
                input_ids: e.input_ids,
                embedding: e.vector,
            })
            .collect();
        serde_wasm_bindgen::to_value(&out).map_err(js_err)
    }
}

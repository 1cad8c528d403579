//! # tabula-web
//!
//! The browser build of Tabula, through wasm-bindgen. Two things live here:
//! - The model bindings (`Embedder`, `ExactEmbedder`, `ExactDecoder`). They load a model from
//!   bytes the page fetched and run it on WebGPU (through `wgpu`) or on the wasm CPU path.
//! - [`Volunteer`], the browser worker, driven by `www/worker.js`: protocol frames, signatures,
//!   unit execution and pipeline stages (`member`), with the page doing only I/O.
//! - [`Computer`], a compute worker of the volunteer's pool (one per thread its throttle
//!   allows): the executor alone; the `Volunteer` keeps the key and the one session.
//! - [`PeerConnection`], the document's half of a stage's WebRTC link (`rtc`): browsers give
//!   `RTCPeerConnection` to documents only, and the data channel moves to the Web Worker.
//!
//! The model code is `tabula-models` and the unit executor is `tabula-worker`'s, unchanged, so
//! a browser computes the same bits as a native worker. This crate owns the JavaScript boundary
//! (argument conversion with `serde-wasm-bindgen`, errors as JS exceptions) and the browser
//! session's state. It must not grow model or verification logic that the native build lacks.

mod computer;
mod member;
mod rtc;
mod volunteer;

pub use computer::Computer;
pub use rtc::PeerConnection;
pub use volunteer::Volunteer;

use serde::Serialize;
use tabula_engine::{
    Backend,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::{
    bert::SentenceEmbedder,
    exact::{ExactEmbedder as ExactBertEmbedder, ExactFile, ExactLlama},
    sampling::ExactSampler,
};
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

/// Opens the backend named by `backend`: `"gpu"` (WebGPU) or `"cpu"` (wasm).
async fn open_gpu_or_cpu(backend: &str) -> Result<Option<GpuBackend>, JsError> {
    match backend {
        "cpu" => Ok(None),
        "gpu" => Ok(Some(
            GpuBackend::new(AdapterChoice::Any).await.map_err(js_err)?,
        )),
        other => Err(JsError::new(&format!(
            "unknown backend `{other}` (expected \"gpu\" or \"cpu\")"
        ))),
    }
}

/// One of a model's two homes: the wasm CPU path or WebGPU.
enum OnDevice<C, G> {
    Cpu(C),
    Gpu(Box<GpuBackend>, G),
}

#[derive(Serialize)]
struct ExactEmbeddingOut {
    input_ids: Vec<u32>,
    /// The unit vector in Q15 (scale 2^-15).
    q15: Vec<i32>,
    sha256: String,
}

/// MiniLM in exact precision: the same bits as the native build, on WebGPU or wasm.
#[wasm_bindgen]
pub struct ExactEmbedder {
    model: OnDevice<ExactBertEmbedder<CpuBackend>, ExactBertEmbedder<GpuBackend>>,
    device: String,
}

#[wasm_bindgen]
impl ExactEmbedder {
    /// Loads the quantised file (checked against `sha256`, the hash in its name) and the
    /// tokenizer on `"gpu"` or `"cpu"`.
    pub async fn load(
        quantised: &[u8],
        sha256: &str,
        tokenizer_json: &[u8],
        backend: &str,
    ) -> Result<ExactEmbedder, JsError> {
        let file = ExactFile::open(quantised, sha256).map_err(js_err)?;
        Ok(match open_gpu_or_cpu(backend).await? {
            None => ExactEmbedder {
                model: OnDevice::Cpu(
                    ExactBertEmbedder::load(&CpuBackend, &file, tokenizer_json).map_err(js_err)?,
                ),
                device: CpuBackend.describe(),
            },
            Some(gpu) => {
                let model = ExactBertEmbedder::load(&gpu, &file, tokenizer_json).map_err(js_err)?;
                let device = gpu.describe();
                ExactEmbedder {
                    model: OnDevice::Gpu(Box::new(gpu), model),
                    device,
                }
            }
        })
    }

    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.device.clone()
    }

    /// Embeds an array of strings: `[{input_ids, q15, sha256}]` in input order.
    pub async fn embed(&self, texts: JsValue) -> Result<JsValue, JsError> {
        let texts: Vec<String> = serde_wasm_bindgen::from_value(texts)
            .map_err(|e| JsError::new(&format!("expected an array of strings: {e}")))?;
        let out = match &self.model {
            OnDevice::Cpu(m) => m.embed(&CpuBackend, &texts).await,
            OnDevice::Gpu(gpu, m) => m.embed(gpu.as_ref(), &texts).await,
        }
        .map_err(js_err)?;
        let out: Vec<ExactEmbeddingOut> = out
            .into_iter()
            .map(|e| ExactEmbeddingOut {
                input_ids: e.input_ids,
                q15: e.q15,
                sha256: e.sha256,
            })
            .collect();
        serde_wasm_bindgen::to_value(&out).map_err(js_err)
    }
}

#[derive(Serialize)]
struct ExactGenerationOut {
    ids: Vec<u32>,
    logits_sha256: Vec<String>,
}

/// A Llama decoder (SmolLM2) in exact precision, driven by token ids.
#[wasm_bindgen]
pub struct ExactDecoder {
    model: OnDevice<ExactLlama<CpuBackend>, ExactLlama<GpuBackend>>,
    device: String,
}

#[wasm_bindgen]
impl ExactDecoder {
    pub async fn load(
        quantised: &[u8],
        sha256: &str,
        backend: &str,
    ) -> Result<ExactDecoder, JsError> {
        let file = ExactFile::open(quantised, sha256).map_err(js_err)?;
        Ok(match open_gpu_or_cpu(backend).await? {
            None => ExactDecoder {
                model: OnDevice::Cpu(ExactLlama::load(&CpuBackend, &file).map_err(js_err)?),
                device: CpuBackend.describe(),
            },
            Some(gpu) => {
                let model = ExactLlama::load(&gpu, &file).map_err(js_err)?;
                let device = gpu.describe();
                ExactDecoder {
                    model: OnDevice::Gpu(Box::new(gpu), model),
                    device,
                }
            }
        })
    }

    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.device.clone()
    }

    /// Continues `prompt_ids` by `max_tokens` tokens (no stop tokens: the ids are all there
    /// is) with exact sampling: `temperature` 0 is greedy; otherwise temperature/top-p with
    /// `seed`, the same tokens as the native `tabula generate --precision exact`. Returns
    /// `{ids, logits_sha256}`.
    pub async fn generate(
        &self,
        prompt_ids: Vec<u32>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
    ) -> Result<JsValue, JsError> {
        let mut sampler = ExactSampler::new(temperature, top_p, seed);
        let (steps, _) = match &self.model {
            OnDevice::Cpu(m) => {
                m.generate(
                    &CpuBackend,
                    &prompt_ids,
                    max_tokens,
                    &mut sampler,
                    &[],
                    |_| {},
                )
                .await
            }
            OnDevice::Gpu(gpu, m) => {
                m.generate(
                    gpu.as_ref(),
                    &prompt_ids,
                    max_tokens,
                    &mut sampler,
                    &[],
                    |_| {},
                )
                .await
            }
        }
        .map_err(js_err)?;
        let out = ExactGenerationOut {
            ids: steps.iter().map(|s| s.token).collect(),
            logits_sha256: steps.into_iter().map(|s| s.logits_sha256).collect(),
        };
        serde_wasm_bindgen::to_value(&out).map_err(js_err)
    }
}

/// Runs every exact-precision op on WebGPU and on the wasm CPU path and returns the ops whose
/// bits differ (an empty array when all agree). `portable_dot` avoids `dot4I8Packed`.
#[wasm_bindgen]
pub async fn exact_selfcheck(portable_dot: bool) -> Result<JsValue, JsError> {
    let mut gpu = GpuBackend::new(AdapterChoice::Any).await.map_err(js_err)?;
    if portable_dot {
        gpu.use_portable_dot();
    }
    let diffs = tabula_engine::exact::selfcheck::compare_with_cpu(&gpu)
        .await
        .map_err(js_err)?;
    serde_wasm_bindgen::to_value(&SelfCheck {
        diffs,
        packed_dot: gpu.has_packed_dot(),
    })
    .map_err(js_err)
}

/// Every int8 matrix kernel of this build (scalar, and relaxed SIMD in `pkg-relaxed`) against
/// the scalar one: `{kernels, diffs}` (no diffs when all agree).
#[wasm_bindgen]
pub fn cpu_kernels_selfcheck() -> Result<JsValue, JsError> {
    use tabula_engine::exact::kernels::Kernel;
    let diffs = tabula_engine::exact::selfcheck::compare_cpu_kernels().map_err(js_err)?;
    let kernels: Vec<&str> = Kernel::supported_all()
        .into_iter()
        .map(Kernel::name)
        .collect();
    #[derive(Serialize)]
    struct KernelCheck<'a> {
        kernels: Vec<&'a str>,
        diffs: Vec<String>,
    }
    serde_wasm_bindgen::to_value(&KernelCheck { kernels, diffs }).map_err(js_err)
}

#[derive(Serialize)]
struct SelfCheck {
    diffs: Vec<String>,
    packed_dot: bool,
}

/// Whether this build uses wasm relaxed SIMD for int8 dot products (the `pkg-relaxed` build);
/// the results are the same bits either way.
#[wasm_bindgen]
pub fn uses_relaxed_simd() -> bool {
    cfg!(target_feature = "relaxed-simd")
}

//! Llama-family decoder from GGUF (architectures `llama`, which Mistral files use too, `qwen2`
//! and `gemma3`): RMSNorm, rotary embeddings, grouped-query attention with any ratio and a KV
//! cache, optional Q/K/V biases (Qwen2), SwiGLU, tied or separate output head.
//!
//! Gemma 3 (as Hugging Face's `Gemma3ForCausalLM` and llama.cpp's `gemma3` graph) adds, per
//! layer: RMSNorm of each query and key head before the rotation (`attn_q_norm`,
//! `attn_k_norm`), RMSNorm of the attention and feed-forward outputs before the residual adds
//! (`post_attention_norm`, `post_ffw_norm`), GeGLU with GELU's tanh form instead of SwiGLU,
//! and sliding-window attention (512 positions, rotary base 10 000) on five layers of every
//! six, the sixth global (base `rope.freq_base`); the embeddings are scaled by √dim. Its GGUF
//! norm weights already hold Gemma's `1 + w`, so every norm here is `x̂ · w`.
//!
//! Weights come from GGUF and are dequantised to f32 at load ("fast" precision). Rotary pairs:
//! a `llama` GGUF stores Q and K rows permuted for llama.cpp's adjacent-pair layout (values 2i
//! and 2i + 1 of a head rotate together), which is what [`tabula_engine::Backend::rope`]
//! implements. A `qwen2` GGUF keeps Hugging Face's layout (values i and i + head_dim/2): its Q
//! and K rows (and biases) are interleaved at load ([`interleave_rope_rows`]) into the
//! adjacent-pair layout. Q·K is the same under one permutation of both, so one rotary kernel
//! serves both families.
//!
//! Shapes: x `[seq, dim]`; Wq `[heads·head_dim, dim]`, Wk/Wv `[kv_heads·head_dim, dim]`, Wo
//! `[dim, heads·head_dim]`, gate/up `[ffn, dim]`, down `[dim, ffn]`.

use std::ops::Range;

use tabula_engine::{AttentionParams, Backend, Shaped, rope_freqs};

use crate::{
    ModelError, Result,
    activations::{Hidden, check_range},
    gguf::{GgufFile, TensorInfo},
    sampling::Sampler,
    tokenize::LlamaTokenizer,
};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub context_length: usize,
    /// RoPE scaling as the GGUF states it: a divisor of each rotary pair's frequency
    /// (`head_dim / 2` of them), from a linear `rope.scaling.factor` (the same for every pair),
    /// Llama 3.1's `rope_freqs.weight`, or YaRN's blend of the two; `None` when unscaled.
    /// Global layers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_factors: Option<Vec<f32>>,
    /// A factor on every query·key score besides `1/√head_dim`: YaRN's attention factor
    /// squared (it scales the rotated queries and keys both); 1 otherwise.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub score_factor: f32,
    /// Gemma 3's additions; `None` for Llama and Qwen2.
    #[serde(default)]
    pub gemma: Option<GemmaConfig>,
}

/// What Gemma 3 adds to a Llama layer stack (see the module doc).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GemmaConfig {
    /// Positions a sliding-window layer's queries see (their own and the ones before).
    pub sliding_window: usize,
    /// Every `pattern`-th layer (1-based) is global, the others slide.
    pub pattern: usize,
    /// Rotary base of the sliding-window layers (`rope_theta` is the global layers').
    pub local_rope_theta: f32,
    /// Factor on the token embeddings entering layer 0: √dim.
    pub embed_scale: f32,
}

/// The most a RoPE scaling factor may be (Llama 3.1 uses 8; YaRN files 4–40).
const MAX_ROPE_FACTOR: f32 = 1024.0;

fn one() -> f32 {
    1.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
}

/// YaRN (arXiv 2309.00071) as llama.cpp's `rope_yarn` and transformers' `_compute_yarn_
/// parameters` compute it: pairs that turn fewer than `beta_slow` times over the original
/// context are interpolated (frequency / `factor`), those turning more than `beta_fast` times
/// keep theirs, a linear ramp between; returns each pair's divisor and the attention factor
/// `0.1·ln(factor) + 1` that multiplies the rotated queries and keys.
pub fn yarn(
    theta: f64,
    head_dim: usize,
    factor: f64,
    original_context: f64,
    beta_fast: f64,
    beta_slow: f64,
) -> (Vec<f32>, f64) {
    let d = head_dim as f64;
    let dim_of = |rotations: f64| {
        d * (original_context / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let low = dim_of(beta_fast).floor().max(0.0);
    let high = dim_of(beta_slow).ceil().min(d - 1.0);
    let span = if high == low { 0.001 } else { high - low };
    let divisors = (0..head_dim / 2)
        .map(|i| {
            let extrapolated = 1.0 - ((i as f64 - low) / span).clamp(0.0, 1.0);
            (1.0 / ((1.0 - extrapolated) / factor + extrapolated)) as f32
        })
        .collect();
    let attention = if factor > 1.0 {
        0.1 * factor.ln() + 1.0
    } else {
        1.0
    };
    (divisors, attention)
}

/// RoPE scaling as a GGUF states it, as a divisor per rotary pair and a factor on the
/// scores: `rope.scaling.type` `linear` (or the older `rope.scale_linear`) divides every
/// frequency by its factor; `yarn` blends interpolated and original frequencies ([`yarn`])
/// and scales the scores; a `rope_freqs.weight` tensor (Llama 3.1's converter writes it)
/// divides each by its own. None, or a factor of 1, is `None`. Other types (LongRoPE) are
/// refused by name.
fn rope_factors(
    gguf: &GgufFile,
    bytes: &[u8],
    key: &dyn Fn(&str) -> String,
    head_dim: usize,
    theta: f32,
) -> Result<(Option<Vec<f32>>, f32)> {
    let check = |what: &str, f: f32| {
        if f.is_finite() && (1.0 / MAX_ROPE_FACTOR..=MAX_ROPE_FACTOR).contains(&f) {
            Ok(f)
        } else {
            Err(ModelError::Format(format!(
                "{what} {f} is not a RoPE scaling factor (1/{MAX_ROPE_FACTOR} to {MAX_ROPE_FACTOR})"
            )))
        }
    };
    let scaling = gguf.get_str(&key("rope.scaling.type")).unwrap_or("none");
    let factor = gguf
        .get_f32(&key("rope.scaling.factor"))
        .or_else(|_| gguf.get_f32(&key("rope.scale_linear")))
        .ok()
        .filter(|&f| f != 0.0 && f != 1.0);
    let linear = match (scaling, factor) {
        (_, None) | ("none", _) => None,
        ("linear", Some(f)) => Some(check("rope.scaling.factor", f)?),
        ("yarn", Some(f)) => {
            let f = check("rope.scaling.factor", f)?;
            // Settings that change YaRN's attention factor or ramp in ways the two references
            // disagree on are refused rather than guessed.
            for (name, default) in [
                ("rope.scaling.attn_factor", 1.0),
                ("rope.scaling.yarn_attn_factor", 1.0),
                ("rope.scaling.yarn_ext_factor", 1.0),
                ("rope.scaling.yarn_log_multiplier", 0.0),
            ] {
                if let Ok(v) = gguf.get_f32(&key(name))
                    && v != default
                    && !(name.ends_with("ext_factor") && v < 0.0)
                {
                    return Err(ModelError::Format(format!(
                        "YaRN with {name} = {v} is not supported (only {default})"
                    )));
                }
            }
            let original = gguf
                .get_u32(&key("rope.scaling.original_context_length"))
                .map_err(|_| {
                    ModelError::Format(
                        "YaRN scaling without rope.scaling.original_context_length".into(),
                    )
                })?;
            if original == 0 {
                return Err(ModelError::Format(
                    "rope.scaling.original_context_length is 0".into(),
                ));
            }
            let beta = |name: &str, default: f32| -> Result<f64> {
                let b = gguf.get_f32(&key(name)).unwrap_or(default);
                if b.is_finite() && (1e-3..=1e4).contains(&b) {
                    Ok(f64::from(b))
                } else {
                    Err(ModelError::Format(format!("{name} {b} is out of range")))
                }
            };
            if gguf.tensor("rope_freqs.weight").is_some() {
                return Err(ModelError::Format(
                    "YaRN scaling and rope_freqs.weight together are not supported".into(),
                ));
            }
            let (divisors, attention) = yarn(
                f64::from(theta),
                head_dim,
                f64::from(f),
                f64::from(original),
                beta("rope.scaling.yarn_beta_fast", 32.0)?,
                beta("rope.scaling.yarn_beta_slow", 1.0)?,
            );
            return Ok((Some(divisors), (attention * attention) as f32));
        }
        (other, Some(f)) => {
            return Err(ModelError::Format(format!(
                "RoPE scaling `{}` (factor {f}) is not supported: linear, YaRN and Llama 3.1's \
                 per-frequency factors (`rope_freqs.weight`) are",
                other.escape_debug()
            )));
        }
    };
    let tensor = match gguf.tensor("rope_freqs.weight") {
        None => None,
        Some(_) => {
            shaped(gguf, "rope_freqs.weight", &[head_dim / 2])?;
            let f = gguf.tensor_f32(bytes, "rope_freqs.weight")?;
            Some(
                f.into_iter()
                    .map(|f| check("rope_freqs.weight holds", f))
                    .collect::<Result<Vec<f32>>>()?,
            )
        }
    };
    let factors = match (linear, tensor) {
        (None, factors) => factors,
        (Some(l), None) => Some(vec![l; head_dim / 2]),
        (Some(l), Some(f)) => Some(f.into_iter().map(|f| f * l).collect()),
    };
    Ok((factors, 1.0))
}

/// The GGUF architectures this decoder reads (`general.architecture`).
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "gemma3"];

/// Whether a GGUF architecture stores rotary pairs (i, i + head_dim/2) in its Q and K rows,
/// which [`interleave_rope_rows`] moves into the engine's adjacent-pair layout.
pub(crate) fn neox_rope(arch: &str) -> bool {
    arch == "qwen2" || arch == "gemma3"
}

/// Gemma 3's sliding-window pattern: five local layers, then a global one (llama.cpp's
/// `swa_pattern` 6, Hugging Face's `sliding_window_pattern`).
const GEMMA_PATTERN: usize = 6;
/// Gemma 3's rotary base on sliding-window layers (Hugging Face's `rope_local_base_freq`;
/// llama.cpp fixes it the same way when the GGUF does not say).
const GEMMA_LOCAL_ROPE_THETA: f32 = 10_000.0;

impl LlamaConfig {
    /// The configuration a GGUF states (`bytes`: the file `gguf` was parsed from, for RoPE
    /// factors stored as a tensor).
    pub fn from_gguf(gguf: &GgufFile, bytes: &[u8]) -> Result<Self> {
        let arch = gguf.get_str("general.architecture")?;
        if !ARCHITECTURES.contains(&arch) {
            return Err(ModelError::Format(format!(
                "architecture `{arch}` is not supported: this decoder reads {} (Mistral files \
                 are `llama`)",
                ARCHITECTURES.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let dim = gguf.get_u32(&key("embedding_length"))? as usize;
        let heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let kv_heads = gguf
            .get_u32(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::Format(format!(
                "inconsistent heads: {heads} heads, {kv_heads} KV heads, width {dim}"
            )));
        }
        // A head's width: stated (`key_length`), else the width over the heads.
        let head_dim = match gguf.get_u32(&key("attention.key_length")) {
            Ok(k) => k as usize,
            Err(_) if dim.is_multiple_of(heads) => dim / heads,
            Err(_) => {
                return Err(ModelError::Format(format!(
                    "width {dim} is not a multiple of {heads} heads and no key_length is given"
                )));
            }
        };
        if let Ok(v) = gguf.get_u32(&key("attention.value_length"))
            && v as usize != head_dim
        {
            return Err(ModelError::Format(format!(
                "value heads of {v} differ from key heads of {head_dim}: not supported"
            )));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::Format(format!(
                "a head of {head_dim} values cannot be rotated in pairs"
            )));
        }
        if let Ok(n) = gguf.get_u32(&key("rope.dimension_count"))
            && n as usize != head_dim
        {
            return Err(ModelError::Format(format!(
                "rotary embeddings on {n} of {head_dim} values per head are not supported (the \
                 whole head only)"
            )));
        }
        let rope_theta = gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0);
        let (rope_factors, score_factor) = rope_factors(gguf, bytes, &key, head_dim, rope_theta)?;
        if arch == "gemma3" && score_factor != 1.0 {
            return Err(ModelError::Format(
                "YaRN scaling on gemma3 is not supported".into(),
            ));
        }
        let gemma = if arch == "gemma3" {
            let window = gguf.get_u32(&key("attention.sliding_window"))? as usize;
            if window == 0 {
                return Err(ModelError::Format("a sliding window of 0 positions".into()));
            }
            Some(GemmaConfig {
                sliding_window: window,
                pattern: GEMMA_PATTERN,
                local_rope_theta: gguf
                    .get_f32(&key("rope.freq_base_swa"))
                    .unwrap_or(GEMMA_LOCAL_ROPE_THETA),
                embed_scale: (dim as f32).sqrt(),
            })
        } else {
            None
        };
        let vocab_size = gguf
            .tensor("token_embd.weight")
            .map(|t| t.shape_row_major()[0])
            .ok_or_else(|| ModelError::Format("missing tensor token_embd.weight".into()))?;
        Ok(Self {
            vocab_size,
            dim,
            layers: gguf.get_u32(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            ffn_dim: gguf.get_u32(&key("feed_forward_length"))? as usize,
            rms_eps: gguf
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta,
            context_length: gguf
                .get_u32(&key("context_length"))
                .map(|v| v as usize)
                .unwrap_or(2048),
            rope_factors,
            score_factor,
            gemma,
        })
    }

    /// The sliding window of layer `i` (`None`: it sees every earlier position) and its rotary
    /// frequencies (a global layer's scaled as the file states, a sliding one's never, as
    /// llama.cpp and transformers do).
    pub fn layer_attention(&self, i: usize) -> (Option<usize>, Vec<f64>) {
        match &self.gemma {
            Some(g) if !(i + 1).is_multiple_of(g.pattern) => (
                Some(g.sliding_window),
                rope_freqs(f64::from(g.local_rope_theta), self.head_dim, None),
            ),
            _ => (None, self.global_rope_freqs()),
        }
    }

    /// The rotary frequencies of the global layers (scaled as the file states).
    pub fn global_rope_freqs(&self) -> Vec<f64> {
        rope_freqs(
            f64::from(self.rope_theta),
            self.head_dim,
            self.rope_factors.as_deref(),
        )
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The width of all query heads together (Wq's rows, Wo's columns).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Tensor `name` of `gguf`, which must have `shape` (row-major).
pub(crate) fn shaped<'g>(
    gguf: &'g GgufFile,
    name: &str,
    shape: &[usize],
) -> Result<&'g TensorInfo> {
    let info = gguf
        .tensor(name)
        .ok_or_else(|| ModelError::Format(format!("missing tensor `{name}`")))?;
    if info.shape_row_major() != shape {
        return Err(ModelError::Format(format!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            info.shape_row_major()
        )));
    }
    Ok(info)
}

/// Checks that the decoder can load `gguf` without loading it: a supported architecture and
/// configuration, a tokenizer it reads, and every tensor it needs present, with its shape and a
/// type it dequantises. Each failure names the tensor (or key) and what is supported.
pub fn inspect(gguf: &GgufFile, bytes: &[u8]) -> Result<crate::ModelSummary> {
    let c = LlamaConfig::from_gguf(gguf, bytes)?;
    LlamaTokenizer::from_gguf(gguf)?;
    let (d, q, kv, ffn, vocab) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim, c.vocab_size);
    let mut parameters = 0u64;
    let mut check = |name: &str, shape: &[usize]| -> Result<()> {
        let info = shaped(gguf, name, shape)?;
        if !info.dtype.can_dequantise() {
            return Err(crate::gguf::GgufError::UnsupportedDequant {
                name: name.into(),
                dtype: info.dtype,
            }
            .into());
        }
        parameters += info.numel();
        Ok(())
    };
    check("token_embd.weight", &[vocab, d])?;
    check("output_norm.weight", &[d])?;
    if gguf.tensor("output.weight").is_some() {
        check("output.weight", &[vocab, d])?;
    }
    for i in 0..c.layers {
        for (name, shape) in [
            ("attn_norm", vec![d]),
            ("attn_q", vec![q, d]),
            ("attn_k", vec![kv, d]),
            ("attn_v", vec![kv, d]),
            ("attn_output", vec![d, q]),
            ("ffn_norm", vec![d]),
            ("ffn_gate", vec![ffn, d]),
            ("ffn_up", vec![ffn, d]),
            ("ffn_down", vec![d, ffn]),
        ] {
            check(&format!("blk.{i}.{name}.weight"), &shape)?;
        }
        for (name, n) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
            let bias = format!("blk.{i}.{name}.bias");
            if gguf.tensor(&bias).is_some() {
                check(&bias, &[n])?;
            }
        }
        if c.gemma.is_some() {
            for (name, n) in
                GEMMA_NORMS.map(|(name, head)| (name, if head { c.head_dim } else { d }))
            {
                check(&format!("blk.{i}.{name}.weight"), &[n])?;
            }
        }
    }
    Ok(crate::ModelSummary {
        architecture: gguf.get_str("general.architecture")?.to_string(),
        parameters,
        layers: c.layers,
        vocab_size: vocab,
        context_length: c.context_length,
        fast_bytes: parameters.saturating_mul(4),
        exact_bytes: parameters.saturating_add(parameters / 4),
    })
}

/// Reorders the rows of a Q or K projection (`rows` of `cols` values; or a bias, `cols` 1)
/// stored with rotary pairs (i, i + head_dim/2) into the adjacent-pair layout (2i, 2i + 1) the
/// engine rotates: within each head, row 2i takes row i and row 2i + 1 takes row
/// i + head_dim/2. Applied to both Q and K, it leaves every Q·K product unchanged.
pub fn interleave_rope_rows(w: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    assert!(
        head_dim.is_multiple_of(2) && cols > 0,
        "pairs need an even head"
    );
    assert!(
        w.len().is_multiple_of(cols * head_dim),
        "whole heads of whole rows"
    );
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(w.len());
    for head in w.chunks_exact(cols * head_dim) {
        for i in 0..half {
            out.extend_from_slice(&head[i * cols..(i + 1) * cols]);
            out.extend_from_slice(&head[(i + half) * cols..(i + half + 1) * cols]);
        }
    }
    debug_assert_eq!(out.len(), w.len());
    out
}

/// Gemma 3's extra norms per layer: name, and whether it spans one head (else the width).
const GEMMA_NORMS: [(&str, bool); 4] = [
    ("attn_q_norm", true),
    ("attn_k_norm", true),
    ("post_attention_norm", false),
    ("post_ffw_norm", false),
];

/// Gemma 3's norms of one layer.
struct GemmaNorms<B: Backend> {
    /// Over each query / key head, in the engine's rotary layout.
    q: B::Tensor,
    k: B::Tensor,
    /// Over the attention and feed-forward outputs.
    post_attention: B::Tensor,
    post_ffw: B::Tensor,
}

struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    wq: B::Tensor,
    wk: B::Tensor,
    wv: B::Tensor,
    /// Q/K/V biases (Qwen2), all or none.
    qkv_bias: Option<[B::Tensor; 3]>,
    wo: B::Tensor,
    ffn_norm: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    down: B::Tensor,
    gemma: Option<GemmaNorms<B>>,
}

/// A `[rows, cols]` matrix (the token embeddings, the output head) held as blocks of rows
/// that each fit one tensor of the backend: Gemma 3's 262 144 × 640 table is 671 MB in f32,
/// and a GPU storage binding is often 128 MiB. One block where it fits.
struct RowBlocks<B: Backend> {
    /// Rows `[i · block_rows, (i + 1) · block_rows)` in block `i`; the last may be shorter.
    blocks: Vec<B::Tensor>,
    block_rows: usize,
    rows: usize,
    cols: usize,
}

impl<B: Backend> RowBlocks<B> {
    fn upload(backend: &B, data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        assert_eq!(data.len(), rows * cols, "a whole matrix");
        let block_rows = (backend.max_tensor_values() / cols.max(1)).clamp(1, rows.max(1));
        let blocks = data
            .chunks(block_rows * cols)
            .map(|c| backend.upload(c, &[c.len() / cols, cols]))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            blocks,
            block_rows,
            rows,
            cols,
        })
    }

    /// Rows `ids`: `[ids.len(), cols]`.
    fn gather(&self, backend: &B, ids: &[u32]) -> Result<B::Tensor> {
        if let [block] = self.blocks.as_slice() {
            return Ok(backend.embedding(block, ids)?);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.rows
            )));
        }
        let mut out = backend.zeros(&[ids.len(), self.cols])?;
        for (r, &id) in ids.iter().enumerate() {
            let (b, row) = (id as usize / self.block_rows, id as usize % self.block_rows);
            let one = backend.embedding(&self.blocks[b], &[row as u32])?;
            backend.write_rows(&mut out, r, &one)?;
        }
        Ok(out)
    }

    /// `x · selfᵀ` for one row `x: [1, cols]`: `[1, rows]` (any number of rows in one block).
    fn linear(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        if let [block] = self.blocks.as_slice() {
            return Ok(backend.linear(x, block, None)?);
        }
        if x.as_matrix() != (1, self.cols) {
            return Err(ModelError::Input(format!(
                "a split head takes one row of {}, got {:?}",
                self.cols,
                x.shape()
            )));
        }
        // Each block's products, as a column, into the rows of one column; then one row.
        let mut out = backend.zeros(&[self.rows, 1])?;
        for (b, block) in self.blocks.iter().enumerate() {
            let part = backend.linear(x, block, None)?;
            let n = part.numel();
            backend.write_rows(
                &mut out,
                b * self.block_rows,
                &backend.reshape(&part, &[n, 1])?,
            )?;
        }
        Ok(backend.reshape(&out, &[1, self.rows])?)
    }
}

/// Layers `range` of a Llama model on one backend, plus the token embeddings when the range
/// starts at 0 and the output head when it ends at the last layer.
pub struct LlamaModel<B: Backend> {
    pub config: LlamaConfig,
    range: Range<usize>,
    token_embd: Option<RowBlocks<B>>,
    output_norm: Option<B::Tensor>,
    /// `None` with tied embeddings (the head reuses `token_embd`).
    output: Option<RowBlocks<B>>,
    layers: Vec<Layer<B>>,
    /// Each layer's sliding window and rotary frequencies (`LlamaConfig::layer_attention`),
    /// computed once at load.
    attention: Vec<(Option<usize>, Vec<f32>)>,
}

/// Keys and values of past positions for the layers of one shard.
pub struct KvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<B: Backend> LlamaModel<B> {
    pub fn load(backend: &B, gguf: &GgufFile, bytes: &[u8]) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf, bytes)?;
        let n = config.layers;
        Self::load_layers(backend, gguf, bytes, 0..n)
    }

    pub fn load_layers(
        backend: &B,
        gguf: &GgufFile,
        bytes: &[u8],
        range: Range<usize>,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf, bytes)?;
        if range.start > range.end || range.end > config.layers {
            return Err(ModelError::Input(format!(
                "layer range {range:?} outside 0..{}",
                config.layers
            )));
        }
        let neox = neox_rope(gguf.get_str("general.architecture")?);
        let hd = config.head_dim;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            shaped(gguf, name, shape)?;
            Ok(gguf.tensor_f32(bytes, name)?)
        };
        let load = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            Ok(backend.upload(&get(name, shape)?, shape)?)
        };
        // A Q or K projection (or its bias: one column), in the engine's rotary layout.
        let load_rotated = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            let w = get(name, shape)?;
            let cols = shape.get(1).copied().unwrap_or(1);
            let w = if neox {
                interleave_rope_rows(&w, cols, hd)
            } else {
                w
            };
            Ok(backend.upload(&w, shape)?)
        };
        let (d, q, kv, ffn, vocab) = (
            config.dim,
            config.q_dim(),
            config.kv_dim(),
            config.ffn_dim,
            config.vocab_size,
        );
        let is_last = range.end == config.layers;
        let blocks = |name: &str| -> Result<RowBlocks<B>> {
            RowBlocks::upload(backend, &get(name, &[vocab, d])?, vocab, d)
        };
        let token_embd = if range.start == 0 || (is_last && gguf.tensor("output.weight").is_none())
        {
            Some(blocks("token_embd.weight")?)
        } else {
            None
        };
        let output = if is_last && gguf.tensor("output.weight").is_some() {
            Some(blocks("output.weight")?)
        } else {
            None
        };
        let output_norm = if is_last {
            Some(load("output_norm.weight", &[d])?)
        } else {
            None
        };
        let layers = range
            .clone()
            .map(|i| {
                let t =
                    |name: &str, shape: &[usize]| load(&format!("blk.{i}.{name}.weight"), shape);
                let bias = |name: &str| format!("blk.{i}.{name}.bias");
                let has_bias =
                    ["attn_q", "attn_k", "attn_v"].map(|n| gguf.tensor(&bias(n)).is_some());
                let qkv_bias = match has_bias {
                    [false, false, false] => None,
                    [true, true, true] => Some([
                        load_rotated(&bias("attn_q"), &[q])?,
                        load_rotated(&bias("attn_k"), &[kv])?,
                        load(&bias("attn_v"), &[kv])?,
                    ]),
                    _ => {
                        return Err(ModelError::Format(format!(
                            "layer {i} has biases on some of Q, K and V but not all"
                        )));
                    }
                };
                let gemma = match config.gemma {
                    Some(_) => Some(GemmaNorms {
                        q: load_rotated(&format!("blk.{i}.attn_q_norm.weight"), &[hd])?,
                        k: load_rotated(&format!("blk.{i}.attn_k_norm.weight"), &[hd])?,
                        post_attention: t("post_attention_norm", &[d])?,
                        post_ffw: t("post_ffw_norm", &[d])?,
                    }),
                    None => None,
                };
                Ok(Layer {
                    gemma,
                    attn_norm: t("attn_norm", &[d])?,
                    wq: load_rotated(&format!("blk.{i}.attn_q.weight"), &[q, d])?,
                    wk: load_rotated(&format!("blk.{i}.attn_k.weight"), &[kv, d])?,
                    wv: t("attn_v", &[kv, d])?,
                    qkv_bias,
                    wo: t("attn_output", &[d, q])?,
                    ffn_norm: t("ffn_norm", &[d])?,
                    gate: t("ffn_gate", &[ffn, d])?,
                    up: t("ffn_up", &[ffn, d])?,
                    down: t("ffn_down", &[d, ffn])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let attention = range
            .clone()
            .map(|i| {
                let (window, freqs) = config.layer_attention(i);
                (window, freqs.into_iter().map(|f| f as f32).collect())
            })
            .collect();
        Ok(Self {
            config,
            range,
            token_embd,
            output_norm,
            output,
            layers,
            attention,
        })
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// An empty KV cache for this shard's layers holding up to `capacity` positions.
    pub fn new_cache(&self, backend: &B, capacity: usize) -> Result<KvCache<B>> {
        let capacity = capacity.clamp(1, self.config.context_length.max(1));
        let shape = [capacity, self.config.kv_dim()];
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(backend.zeros(&shape)?);
            v.push(backend.zeros(&shape)?);
        }
        Ok(KvCache { k, v, capacity })
    }

    /// Embeddings of `ids` at positions `pos_offset..`: the hidden states entering layer 0.
    pub fn embed_tokens(&self, backend: &B, ids: &[u32], pos_offset: usize) -> Result<Hidden<B>> {
        let table = self.token_embd.as_ref().filter(|_| self.range.start == 0);
        let table = table.ok_or_else(|| {
            ModelError::Input("this shard does not hold the embeddings (layer 0)".into())
        })?;
        if ids.is_empty() {
            return Err(ModelError::Input("no tokens".into()));
        }
        let mut x = table.gather(backend, ids)?;
        if let Some(g) = &self.config.gemma {
            x = backend.scale(&x, g.embed_scale)?;
        }
        Ok(Hidden {
            x,
            layer: 0,
            seq: ids.len(),
            lens: vec![ids.len() as u32],
            pos_offset,
        })
    }

    /// Runs this shard's layers on `h` (one sequence), appending its keys and values to `cache`.
    pub fn run_layers(
        &self,
        backend: &B,
        h: Hidden<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Hidden<B>> {
        let c = &self.config;
        check_range(&self.range, c.layers, h.layer, h.x.as_matrix().1, c.dim)?;
        if h.lens.len() != 1 {
            return Err(ModelError::Input(
                "the decoder runs one sequence at a time".into(),
            ));
        }
        let n = h.seq;
        let total = h.pos_offset + n;
        if total > cache.capacity || cache.k.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "{total} positions exceed the KV cache of {}",
                cache.capacity
            )));
        }
        let params = AttentionParams {
            batch: 1,
            q_len: n,
            kv_rows: cache.capacity,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            causal: true,
            pos_offset: h.pos_offset,
            window: None,
        };
        // Each head of `t` ([n, heads·head_dim]) normalised by `gamma` ([head_dim]).
        let head_norm = |t: &B::Tensor, gamma: &B::Tensor| -> Result<B::Tensor> {
            let (rows, cols) = t.as_matrix();
            let heads = backend.reshape(t, &[rows * cols / c.head_dim, c.head_dim])?;
            let normed = backend.rms_norm(&heads, gamma, c.rms_eps)?;
            Ok(backend.reshape(&normed, &[rows, cols])?)
        };
        let mut x = h.x;
        for (i, layer) in self.layers.iter().enumerate() {
            let (window, freqs) = &self.attention[i];
            let a = backend.rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let [bq, bk, bv] = match &layer.qkv_bias {
                Some([q, k, v]) => [Some(q), Some(k), Some(v)],
                None => [None; 3],
            };
            let mut q = backend.linear(&a, &layer.wq, bq)?;
            let mut k = backend.linear(&a, &layer.wk, bk)?;
            if let Some(g) = &layer.gemma {
                q = head_norm(&q, &g.q)?;
                k = head_norm(&k, &g.k)?;
            }
            let mut q = backend.rope(&q, c.head_dim, h.pos_offset, freqs)?;
            if c.score_factor != 1.0 {
                q = backend.scale(&q, c.score_factor)?;
            }
            let k = backend.rope(&k, c.head_dim, h.pos_offset, freqs)?;
            let v = backend.linear(&a, &layer.wv, bv)?;
            backend.write_rows(&mut cache.k[i], h.pos_offset, &k)?;
            backend.write_rows(&mut cache.v[i], h.pos_offset, &v)?;
            let params = AttentionParams {
                window: *window,
                ..params
            };
            let att = backend.attention(&q, &cache.k[i], &cache.v[i], &[total as u32], &params)?;
            let mut att = backend.linear(&att, &layer.wo, None)?;
            if let Some(g) = &layer.gemma {
                att = backend.rms_norm(&att, &g.post_attention, c.rms_eps)?;
            }
            x = backend.add(&x, &att)?;
            let f = backend.rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let (gate, up) = (
                backend.linear(&f, &layer.gate, None)?,
                backend.linear(&f, &layer.up, None)?,
            );
            let g = match &layer.gemma {
                Some(_) => backend.gelu_tanh_mul(&gate, &up)?,
                None => backend.silu_mul(&gate, &up)?,
            };
            let mut down = backend.linear(&g, &layer.down, None)?;
            if let Some(g) = &layer.gemma {
                down = backend.rms_norm(&down, &g.post_ffw, c.rms_eps)?;
            }
            x = backend.add(&x, &down)?;
        }
        Ok(Hidden {
            x,
            layer: self.range.end,
            ..h
        })
    }

    /// Logits of the last row of the final hidden states: `[1, vocab]`, still on the device.
    pub fn head(&self, backend: &B, h: &Hidden<B>) -> Result<B::Tensor> {
        if h.layer != self.config.layers {
            return Err(ModelError::Input(format!(
                "the head needs the output of the last layer, got layer {}",
                h.layer
            )));
        }
        let norm = self
            .output_norm
            .as_ref()
            .ok_or_else(|| ModelError::Input("this shard does not hold the output head".into()))?;
        let w = self
            .output
            .as_ref()
            .or(self.token_embd.as_ref())
            .ok_or_else(|| ModelError::Input("no output weights".into()))?;
        let last = backend.slice_rows(&h.x, h.seq - 1, 1)?;
        w.linear(
            backend,
            &backend.rms_norm(&last, norm, self.config.rms_eps)?,
        )
    }
}

/// Tokenizer + full model: text generation.
pub struct Generator<B: Backend> {
    pub model: LlamaModel<B>,
    pub tokenizer: LlamaTokenizer,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-sequence / end-of-turn token.
    Stop,
    /// `max_tokens` were produced.
    Length,
}

impl<B: Backend> Generator<B> {
    pub fn load(backend: &B, gguf_bytes: &[u8]) -> Result<Self> {
        let gguf = GgufFile::parse(gguf_bytes)?;
        let tokenizer = LlamaTokenizer::from_gguf(&gguf)?;
        let model = LlamaModel::load(backend, &gguf, gguf_bytes)?;
        if tokenizer.vocab_size() > model.config.vocab_size {
            return Err(ModelError::Format(format!(
                "tokenizer has {} tokens, the embedding table {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        Ok(Self { model, tokenizer })
    }

    /// Prompt ids for `prompt`, through the chat template when `chat`.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            self.tokenizer.encode(&self.tokenizer.chat_prompt(prompt)?)
        } else {
            self.tokenizer.encode(prompt)
        }
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id as
    /// soon as it is chosen. A stop token ends generation: it is the last id returned (as
    /// Hugging Face's `generate` does) but is not passed to `on_token`.
    pub async fn generate(
        &self,
        backend: &B,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, Finish)> {
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.model.config.vocab_size
            )));
        }
        let capacity = prompt.len() + max_tokens;
        if capacity > self.model.config.context_length {
            return Err(ModelError::Input(format!(
                "{} prompt tokens + {max_tokens} new tokens exceed the model's context of {}",
                prompt.len(),
                self.model.config.context_length
            )));
        }
        let mut cache = self.model.new_cache(backend, capacity)?;
        let mut out = Vec::new();
        let mut next_input = prompt.to_vec();
        let mut pos = 0;
        while out.len() < max_tokens {
            let h = self.model.embed_tokens(backend, &next_input, pos)?;
            let h = self.model.run_layers(backend, h, &mut cache)?;
            let logits = backend.read(&self.model.head(backend, &h)?).await?;
            pos += next_input.len();
            let token = sampler.pick(&logits);
            if self.tokenizer.stop.contains(&token) {
                out.push(token);
                return Ok((out, Finish::Stop));
            }
            out.push(token);
            on_token(token);
            next_input = vec![token];
        }
        Ok((out, Finish::Length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Head width 16, base 10 000, original context 64: pair 0 turns more than 32 times and
    /// keeps its frequency, pairs from 3 on turn less than once and are divided by the factor,
    /// pairs 1 and 2 are on the ramp between (the same numbers transformers computes).
    #[test]
    fn yarn_keeps_fast_pairs_interpolates_slow_ones_and_ramps_between() {
        let (divisors, attention) = yarn(10_000.0, 16, 4.0, 64.0, 32.0, 1.0);
        let want = [1.0, 4.0 / 3.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0];
        for (got, want) in divisors.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{divisors:?}");
        }
        assert!((attention - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // No stretch, no attention factor.
        assert_eq!(yarn(10_000.0, 16, 1.0, 64.0, 32.0, 1.0).1, 1.0);
    }

    #[test]
    fn interleaving_takes_each_heads_halves_in_turns() {
        // Two heads of 4 rows, 2 columns: row r holds [r, r].
        let w: Vec<f32> = (0..8).flat_map(|r| [r as f32; 2]).collect();
        let rows: Vec<f32> = interleave_rope_rows(&w, 2, 4)
            .chunks(2)
            .map(|r| r[0])
            .collect();
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        // A bias (one column) the same way.
        assert_eq!(
            interleave_rope_rows(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1, 6),
            [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
    }

    /// Q·K is unchanged when both are interleaved the same way.
    #[test]
    fn interleaving_both_projections_keeps_every_dot_product() {
        // Small integers: every sum is exact in any order.
        let q: Vec<f32> = (0..16).map(|i| (i % 5) as f32 - 2.0).collect();
        let k: Vec<f32> = (0..16).map(|i| (i * 3 % 7) as f32).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (qi, ki) = (
            interleave_rope_rows(&q, 1, 8),
            interleave_rope_rows(&k, 1, 8),
        );
        assert_ne!(qi, q);
        assert_eq!(dot(&q, &k), dot(&qi, &ki));
    }
}

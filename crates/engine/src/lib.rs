//! # tabula-engine
//!
//! The numeric core of Tabula: f32 tensors and the handful of transformer ops the models need
//! (linear layers, norms, activations, rotary embeddings, attention, pooling), behind one
//! [`Backend`] trait with two implementations: [`cpu::CpuBackend`], the reference (SIMD GEMM via
//! `matrixmultiply`), and [`gpu::GpuBackend`], WGSL kernels on `wgpu` (Vulkan/Metal/DX12 natively,
//! WebGPU in browsers). Model code is written once against the trait.
//!
//! This crate owns numbers and devices only. It must not know about any model, file format,
//! tokenizer or network: those live in `tabula-models` and above. It builds for
//! `wasm32-unknown-unknown` from the same source.
//!
//! On the GPU backend every tensor lives in a device buffer and ops only record compute passes;
//! the only way back to the host is [`Backend::read`], so a whole forward pass runs without a
//! readback until the caller asks for its result.

pub mod cpu;
pub mod exact;
pub mod gpu;
mod ops;

pub use ops::erf;

use std::future::Future;

/// Errors from the engine. Shapes are checked on every op so that a bad model file or a bad
/// shard input becomes a precise error, never an out-of-bounds panic.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error(
        "no GPU adapter available ({0}); on Debian install mesa-vulkan-drivers for a software Vulkan device, or use --backend cpu"
    )]
    NoAdapter(String),
    #[error("GPU error: {0}")]
    Gpu(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> EngineError {
    EngineError::Shape {
        op,
        detail: detail.into(),
    }
}

/// Geometry of one attention call.
///
/// `q` holds `batch * q_len` rows of `heads * head_dim` values. `k` and `v` hold `batch *
/// kv_rows` rows of `kv_heads * head_dim` values (grouped-query attention when `kv_heads <
/// heads`): sequence `b` owns rows `[b * kv_rows, b * kv_rows + kv_lens[b])`, the rest is
/// padding (or free KV-cache space) and is never read. Query row `i` of a sequence sits at
/// absolute position `pos_offset + i`; with `causal` it only sees keys at positions `<=` its own,
/// and with a `window` of `w` (sliding-window attention, causal only) only the last `w` of those:
/// positions `> p - w` for a query at `p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionParams {
    pub batch: usize,
    pub q_len: usize,
    pub kv_rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub pos_offset: usize,
    /// Sliding window: `None` sees every earlier position. `Some(w)` needs `causal` and `w > 0`.
    pub window: Option<usize>,
}

impl AttentionParams {
    /// The first key row a query at absolute position `pos` sees (0 without a window).
    pub fn first_visible(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    pub(crate) fn validate(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
        kv_lens: &[u32],
    ) -> Result<()> {
        let op = "attention";
        if self.heads == 0
            || self.kv_heads == 0
            || self.head_dim == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err(shape_err(op, format!("bad head layout {self:?}")));
        }
        if let Some(w) = self.window
            && (w == 0 || !self.causal)
        {
            return Err(shape_err(
                op,
                format!("a sliding window of {w} needs causal attention and at least one key"),
            ));
        }
        if q != [self.batch * self.q_len, self.heads * self.head_dim] {
            return Err(shape_err(
                op,
                format!(
                    "q is {q:?}, expected {:?}",
                    [self.batch * self.q_len, self.heads * self.head_dim]
                ),
            ));
        }
        let kv = [self.batch * self.kv_rows, self.kv_heads * self.head_dim];
        if k != kv || v != kv {
            return Err(shape_err(op, format!("k {k:?} / v {v:?}, expected {kv:?}")));
        }
        if kv_lens.len() != self.batch
            || kv_lens.iter().any(|&l| l as usize > self.kv_rows || l == 0)
        {
            return Err(shape_err(
                op,
                format!("kv_lens {kv_lens:?} for {} rows per sequence", self.kv_rows),
            ));
        }
        Ok(())
    }
}

/// A tensor's shape, row-major.
pub trait Shaped {
    fn shape(&self) -> &[usize];
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    /// Rows and columns when viewed as a matrix whose last dimension is the column.
    fn as_matrix(&self) -> (usize, usize) {
        let s = self.shape();
        let cols = *s.last().unwrap_or(&1);
        (self.numel().checked_div(cols).unwrap_or(0), cols)
    }
}

/// The op interface every model is written against.
///
/// Tensors are immutable values except through [`Backend::write_rows`], which exists for KV
/// caches. Matrices are row-major; "rows" are tokens and "columns" are features.
pub trait Backend {
    type Tensor: Clone + Shaped + std::fmt::Debug;

    /// Human-readable device description, e.g. "cpu" or "llvmpipe (Vulkan)".
    fn describe(&self) -> String;
    /// The most values one tensor may hold here (a GPU's storage binding limit: 128 MiB on
    /// lavapipe and by default in browsers). Larger matrices are split by their users.
    fn max_tensor_values(&self) -> usize {
        usize::MAX
    }
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// Copies a tensor back to the host. The only device-to-host transfer.
    fn read(&self, t: &Self::Tensor) -> impl Future<Output = Result<Vec<f32>>>;

    /// `x · wᵀ + b` for `x: [m, k]`, `w: [n, k]`, `b: [n]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// LayerNorm over the last dimension.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// RMSNorm over the last dimension.
    fn rms_norm(&self, x: &Self::Tensor, gamma: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// GELU with the exact (erf) form, as BERT uses.
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `gelu(linear(x, w, b))`: a backend may apply the GELU in place on the fresh product
    /// (the CPU does: one allocation and one pass over a large tensor fewer).
    fn linear_gelu(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.gelu(&self.linear(x, w, b)?)
    }
    /// `silu(gate) * up`, the SwiGLU gate.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `gelu_tanh(gate) * up`, the GeGLU gate (Gemma), with GELU's tanh approximation
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    fn gelu_tanh_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x · s`, every value.
    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<Self::Tensor>;
    /// The same values under another shape with as many of them (no copy where the backend
    /// shares storage): e.g. `[rows, heads·head_dim]` as `[rows·heads, head_dim]` to normalise
    /// each head.
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Rows of `table` picked by `ids`: `[ids.len(), dim]`.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// Rotary embedding on adjacent pairs `(x[2i], x[2i+1])` of each head (GGUF/llama.cpp
    /// layout); row `r` is at position `pos_offset + r`, and pair `i` of a head turns by the
    /// angle `(pos_offset + r) · freqs[i]` (`freqs`: `head_dim / 2` frequencies, see
    /// [`rope_freqs`]).
    fn rope(
        &self,
        x: &Self::Tensor,
        head_dim: usize,
        pos_offset: usize,
        freqs: &[f32],
    ) -> Result<Self::Tensor>;
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        kv_lens: &[u32],
        params: &AttentionParams,
    ) -> Result<Self::Tensor>;
    /// Overwrites rows `[row, row + src.rows)` of `dst` with `src`.
    fn write_rows(&self, dst: &mut Self::Tensor, row: usize, src: &Self::Tensor) -> Result<()>;
    /// Rows `[start, start + count)` of `x`.
    fn slice_rows(&self, x: &Self::Tensor, start: usize, count: usize) -> Result<Self::Tensor>;
    /// Mean over the first `lens[b]` rows of each block of `seq` rows: `[batch, dim]`.
    fn mean_pool(&self, x: &Self::Tensor, seq: usize, lens: &[u32]) -> Result<Self::Tensor>;
}

pub(crate) fn check_same(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(shape_err(op, format!("{a:?} vs {b:?}")))
    }
}

pub(crate) fn check_linear(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
) -> Result<(usize, usize, usize)> {
    let op = "linear";
    if x.len() != 2 || w.len() != 2 || x[1] != w[1] {
        return Err(shape_err(op, format!("x {x:?} · w{w:?}ᵀ")));
    }
    if let Some(b) = b
        && b != [w[0]]
    {
        return Err(shape_err(op, format!("bias {b:?} for {} outputs", w[0])));
    }
    Ok((x[0], x[1], w[0]))
}

pub(crate) fn check_pool(x: &[usize], seq: usize, lens: &[u32]) -> Result<(usize, usize)> {
    let rows = x.first().copied().unwrap_or(0);
    if x.len() != 2
        || seq == 0
        || rows != seq * lens.len()
        || lens.iter().any(|&l| l == 0 || l as usize > seq)
    {
        return Err(shape_err(
            "mean_pool",
            format!("x {x:?}, seq {seq}, lens {lens:?}"),
        ));
    }
    Ok((lens.len(), x[1]))
}

pub(crate) fn check_rope(x: &[usize], head_dim: usize, freqs: &[f32]) -> Result<()> {
    if x.len() != 2
        || head_dim == 0
        || !head_dim.is_multiple_of(2)
        || !x[1].is_multiple_of(head_dim)
        || freqs.len() != head_dim / 2
    {
        return Err(shape_err(
            "rope",
            format!("x {x:?}, head_dim {head_dim}, {} frequencies", freqs.len()),
        ));
    }
    Ok(())
}

/// The rotary frequencies of a head of `head_dim` values: pair `i` turns by
/// `theta^(-2i / head_dim) / factors[i]` per position (`factors`: RoPE scaling's divisors,
/// one per pair, e.g. a linear factor for every pair; `None` for none). In f64, so the f32
/// paths and the exact tables start from the same numbers.
pub fn rope_freqs(theta: f64, head_dim: usize, factors: Option<&[f32]>) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let base = theta.powf(-2.0 * i as f64 / head_dim as f64);
            match factors {
                Some(f) => base / f64::from(f[i]),
                None => base,
            }
        })
        .collect()
}

pub(crate) fn check_reshape(from: &[usize], to: &[usize]) -> Result<()> {
    if from.iter().product::<usize>() != to.iter().product::<usize>() {
        return Err(shape_err(
            "reshape",
            format!("{from:?} has not as many values as {to:?}"),
        ));
    }
    Ok(())
}

/// Rows and columns of `src` when written at `row` of `dst`.
pub(crate) fn check_write_rows(dst: &[usize], row: usize, src: &[usize]) -> Result<(usize, usize)> {
    let (rows, cols) = (
        dst.first().copied().unwrap_or(0),
        dst.get(1).copied().unwrap_or(0),
    );
    let (n, src_cols) = (
        src.first().copied().unwrap_or(0),
        src.get(1).copied().unwrap_or(0),
    );
    if dst.len() != 2
        || src.len() != 2
        || cols != src_cols
        || row.checked_add(n).is_none_or(|end| end > rows)
    {
        return Err(shape_err(
            "write_rows",
            format!("{src:?} at row {row} into {dst:?}"),
        ));
    }
    Ok((n, cols))
}

/// Columns of `x` when rows `[start, start + count)` are taken.
pub(crate) fn check_slice_rows(x: &[usize], start: usize, count: usize) -> Result<usize> {
    let rows = x.first().copied().unwrap_or(0);
    if x.len() != 2 || start.checked_add(count).is_none_or(|end| end > rows) {
        return Err(shape_err(
            "slice_rows",
            format!("rows {start}..{start}+{count} of {x:?}"),
        ));
    }
    Ok(x[1])
}

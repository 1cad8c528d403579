//! Exact precision for both model families: the quantised model file, the quantiser that
//! writes it, and the integer-only forward passes ([`ExactEmbedder`], [`ExactGenerator`]).
//!
//! The quantised file is a safetensors file of `i32` tensors (int8 values packed four to a
//! word) with one metadata entry, `tabula`, holding an [`ExactHeader`] as JSON. It is
//! *content-addressed*: its name is `<model>.exact.<sha256 of the bytes>.safetensors`, and
//! [`ExactFile::open`] refuses bytes whose hash differs from the name, so every volunteer
//! computes with the same integers. Quantising is deterministic: the same source file gives
//! the same bytes, hence the same name.

mod bert;
#[cfg(not(target_arch = "wasm32"))]
mod disk;
mod llama;
mod pieces;
mod quantize;

pub use bert::{ExactBert, ExactEmbedder, ExactEmbedding};
pub use llama::{ExactCache, ExactGenerator, ExactLlama, ExactStep, StageInput, StageOutput};
pub use pieces::{
    MAX_PIECES, Piece, PieceInfo, split_pieces, stage_pieces, stage_ranges, stage_slice,
};
pub use quantize::{quantize_bert, quantize_llama};

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tabula_engine::exact::{
    ActTable, ExactBackend, QMatrix, QNorm, RopeTable, ScoreScale, WeightLayout,
};

use crate::{ModelError, Result, bert::BertConfig, catalog::sha256_hex, llama::LlamaConfig};

/// Identifies the file format.
pub const FORMAT: &str = "tabula-exact";
/// Bumped whenever the integer specification or the tensor layout changes.
pub const VERSION: u32 = 1;
/// The metadata key holding the header.
const HEADER_KEY: &str = "tabula";

/// The architecture and its configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ExactArch {
    Bert(BertConfig),
    Llama(LlamaConfig),
}

/// Everything about a quantised model that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExactHeader {
    pub format: String,
    pub version: u32,
    /// Catalogue name of the model, e.g. `all-MiniLM-L6-v2`.
    pub model: String,
    /// SHA-256 of the weights file this was quantised from.
    pub source_sha256: String,
    /// Fractional bits of every Fx value.
    pub frac_bits: u32,
    /// Inputs of linear layers are quantised in groups of this many values.
    pub group: usize,
    /// Weights and embedding rows have one scale per block of this many values; `None`: one
    /// scale per row (per output channel).
    pub weight_group: Option<usize>,
    pub config: ExactArch,
    /// Layout of the activation table (GELU for BERT, SiLU for Llama).
    pub act_lo: i32,
    pub act_step_shift: u32,
    pub act_len: usize,
    /// The attention score constant `(M, E)`.
    pub score_mult: i32,
    pub score_exp: i32,
    /// Positions in the rotary table (Llama only).
    pub rope_positions: usize,
    /// Set in a piece of a file cut by [`split_pieces`]; absent in a whole file (whose bytes,
    /// hence whose name, this field does not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece: Option<PieceInfo>,
}

/// The file name of a quantised model with content hash `sha256`.
pub fn exact_file_name(model: &str, sha256: &str) -> String {
    format!("{model}.exact.{sha256}.safetensors")
}

/// The content hash in a file name written by [`exact_file_name`], if it is one for `model`.
pub fn hash_in_name<'a>(model: &str, file_name: &'a str) -> Option<&'a str> {
    let hash = file_name
        .strip_prefix(model)?
        .strip_prefix(".exact.")?
        .strip_suffix(".safetensors")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// A parsed, hash-checked quantised model: one whole file, or the pieces of one (see
/// [`split_pieces`]) that a pipeline stage needs. Tensors are looked up across all of them.
pub struct ExactFile<'a> {
    /// The model's header (for pieces: the whole file's, with `piece` cleared).
    pub header: ExactHeader,
    tensors: Vec<Tensors<'a>>,
}

/// Where a file's tensors are read from.
enum Tensors<'a> {
    /// Bytes in memory (the browser, pipeline pieces).
    Memory(safetensors::SafeTensors<'a>),
    /// A whole file on disk, read a tensor at a time ([`ExactFile::open_path`]).
    #[cfg(not(target_arch = "wasm32"))]
    Disk(disk::DiskTensors),
}

/// One tensor's type, shape and little-endian bytes (borrowed from memory, or read from disk).
pub(crate) struct Tensor<'a> {
    pub(crate) dtype: safetensors::Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: std::borrow::Cow<'a, [u8]>,
}

fn hash_mismatch(actual: &str, expected_sha256: &str) -> ModelError {
    ModelError::Format(format!(
        "quantised model file hashes to {actual}, but its name says {expected_sha256}: \
         it is corrupt or was modified; delete it and run `tabula models quantize`"
    ))
}

/// Parses and checks the header of one file or piece whose bytes hash to `expected_sha256`.
fn read_header(bytes: &[u8], expected_sha256: &str) -> Result<ExactHeader> {
    let actual = sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(hash_mismatch(&actual, expected_sha256));
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelError::Safetensors(e.to_string()))?;
    header_of(&meta)
}

/// The [`ExactHeader`] in a file's safetensors metadata, checked.
fn header_of(meta: &safetensors::tensor::Metadata) -> Result<ExactHeader> {
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .ok_or_else(|| ModelError::Format("not a Tabula quantised model (no header)".into()))?;
    let header: ExactHeader = serde_json::from_str(json)
        .map_err(|e| ModelError::Format(format!("quantised model header: {e}")))?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(ModelError::Format(format!(
            "quantised model is {} v{}, this build reads {FORMAT} v{VERSION}; run `tabula models quantize`",
            header.format, header.version
        )));
    }
    if !(7..=20).contains(&header.frac_bits)
        || header.group == 0
        || !header.group.is_multiple_of(4)
        || header
            .weight_group
            .is_some_and(|g| g == 0 || !g.is_multiple_of(header.group))
        || header.act_step_shift == 0
        || header.act_step_shift > 30
    {
        return Err(ModelError::Format(
            "quantised model header out of range".into(),
        ));
    }
    Ok(header)
}

fn deserialize(bytes: &[u8]) -> Result<safetensors::SafeTensors<'_>> {
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))
}

impl<'a> ExactFile<'a> {
    /// Parses `bytes`, which must hash to `expected_sha256` (the hash in the file name).
    pub fn open(bytes: &'a [u8], expected_sha256: &str) -> Result<Self> {
        let header = read_header(bytes, expected_sha256)?;
        if header.piece.is_some() {
            return Err(ModelError::Format(
                "this is one piece of a quantised model, not the whole file".into(),
            ));
        }
        Ok(Self {
            header,
            tensors: vec![Tensors::Memory(deserialize(bytes)?)],
        })
    }

    /// Opens the whole file at `path`, which must hash to `expected_sha256`, reading each
    /// tensor from disk when a model loads it: a model loaded this way never shares memory
    /// with the whole file's bytes.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_path(path: &std::path::Path, expected_sha256: &str) -> Result<ExactFile<'static>> {
        let tensors = disk::DiskTensors::open(path, expected_sha256)?;
        let header = header_of(&tensors.meta)?;
        if header.piece.is_some() {
            return Err(ModelError::Format(
                "this is one piece of a quantised model, not the whole file".into(),
            ));
        }
        Ok(ExactFile {
            header,
            tensors: vec![Tensors::Disk(tensors)],
        })
    }

    /// Parses pieces of one model (each `(bytes, sha256)`), which must all come from the same
    /// whole file. Which pieces a stage needs is [`stage_pieces`]; a missing one shows up as a
    /// missing tensor when the stage loads.
    pub fn open_pieces(pieces: &[(&'a [u8], &str)]) -> Result<Self> {
        if pieces.is_empty() || pieces.len() > MAX_PIECES {
            return Err(ModelError::Format(format!(
                "{} pieces given; a model has 1 to {MAX_PIECES}",
                pieces.len()
            )));
        }
        let mut common: Option<(ExactHeader, PieceInfo)> = None;
        let mut names = std::collections::HashSet::new();
        let mut tensors = Vec::with_capacity(pieces.len());
        for (bytes, sha) in pieces {
            let mut header = read_header(bytes, sha)?;
            let info = header.piece.take().ok_or_else(|| {
                ModelError::Format("a whole quantised model file was given as a piece".into())
            })?;
            if !names.insert(info.name.clone()) {
                return Err(ModelError::Format(format!(
                    "piece `{}` given twice",
                    info.name
                )));
            }
            match &common {
                None => common = Some((header, info)),
                Some((h, first)) => {
                    if *h != header || first.whole_sha256 != info.whole_sha256 {
                        return Err(ModelError::Format(format!(
                            "piece `{}` belongs to model file {}, piece `{}` to {}",
                            info.name, info.whole_sha256, first.name, first.whole_sha256
                        )));
                    }
                }
            }
            tensors.push(Tensors::Memory(deserialize(bytes)?));
        }
        let (header, _) = common.expect("at least one piece");
        Ok(Self { header, tensors })
    }

    /// The tensor `name`, in whichever file or piece holds it.
    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        self.tensors
            .iter()
            .find_map(|t| match t {
                Tensors::Memory(st) => st.tensor(name).ok().map(|v| {
                    Ok(Tensor {
                        dtype: v.dtype(),
                        shape: v.shape().to_vec(),
                        data: std::borrow::Cow::Borrowed(v.data()),
                    })
                }),
                #[cfg(not(target_arch = "wasm32"))]
                Tensors::Disk(d) => d.read(name),
            })
            .unwrap_or_else(|| {
                Err(ModelError::Format(format!(
                    "tensor `{name}` not found (a piece of the model is missing)"
                )))
            })
    }

    /// The names of every tensor in every file or piece.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .iter()
            .flat_map(|t| match t {
                Tensors::Memory(st) => st
                    .names()
                    .into_iter()
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                #[cfg(not(target_arch = "wasm32"))]
                Tensors::Disk(d) => d.meta.offset_keys(),
            })
            .collect();
        names.sort();
        names
    }

    /// The `i32` tensor `name`, which must have `len` values.
    pub(crate) fn ints(&self, name: &str, len: usize) -> Result<Vec<i32>> {
        let t = self.tensor(name)?;
        if t.dtype != safetensors::Dtype::I32 || t.data.len() != 4 * len {
            return Err(ModelError::Format(format!(
                "tensor `{name}` is {:?} {:?}, expected {len} i32 values",
                t.dtype, t.shape
            )));
        }
        Ok(t.data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| match t {
            Tensors::Memory(st) => st.tensor(name).is_ok(),
            #[cfg(not(target_arch = "wasm32"))]
            Tensors::Disk(d) => d.meta.info(name).is_some(),
        })
    }

    pub(crate) fn upload<B: ExactBackend>(
        &self,
        backend: &B,
        name: &str,
        shape: &[usize],
    ) -> Result<B::Int> {
        let data = self.ints(name, shape.iter().product())?;
        Ok(backend.upload_int_vec(data, shape)?)
    }

    /// Blocks per row of a `cols`-wide weight.
    pub(crate) fn weight_blocks(&self, cols: usize) -> Result<usize> {
        let g = self.header.weight_group.unwrap_or(cols).min(cols);
        if !cols.is_multiple_of(g) || !cols.is_multiple_of(4) {
            return Err(ModelError::Format(format!(
                "{cols} columns do not split into blocks of {g}"
            )));
        }
        Ok(cols / g)
    }

    /// An int8 matrix `[rows, cols]` stored as `{name}.q` and `{name}.requant` (+ `.bias`).
    pub(crate) fn matrix<B: ExactBackend>(
        &self,
        backend: &B,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<QMatrix<B::Int>> {
        let blocks = self.weight_blocks(cols)?;
        let raw = QMatrix {
            rows,
            cols,
            group: cols / blocks,
            data: self.upload(backend, &format!("{name}.q"), &[rows, cols / 4])?,
            requant: self.upload(backend, &format!("{name}.requant"), &[rows, blocks, 2])?,
            bias: if bias {
                Some(self.upload(backend, &format!("{name}.bias"), &[rows])?)
            } else {
                None
            },
            layout: WeightLayout::Rows,
        };
        Ok(backend.prepare_qmatrix(raw)?)
    }

    pub(crate) fn norm<B: ExactBackend>(
        &self,
        backend: &B,
        name: &str,
        cols: usize,
        beta: bool,
    ) -> Result<QNorm<B::Int>> {
        Ok(QNorm {
            gamma: self.upload(backend, &format!("{name}.gamma"), &[cols])?,
            beta: if beta {
                Some(self.upload(backend, &format!("{name}.beta"), &[cols])?)
            } else {
                None
            },
        })
    }

    pub(crate) fn act_table<B: ExactBackend>(&self, backend: &B) -> Result<ActTable<B::Int>> {
        let h = &self.header;
        Ok(ActTable {
            table: self.upload(backend, "act", &[h.act_len + 1])?,
            len: h.act_len,
            lo: h.act_lo,
            step_shift: h.act_step_shift,
        })
    }

    /// The rotary table `name` (`rope`; Gemma's sliding-window layers have `rope_local`).
    pub(crate) fn rope_table<B: ExactBackend>(
        &self,
        backend: &B,
        name: &str,
        head_dim: usize,
    ) -> Result<RopeTable<B::Int>> {
        let positions = self.header.rope_positions;
        Ok(RopeTable {
            table: self.upload(backend, name, &[positions * head_dim])?,
            positions,
            head_dim,
        })
    }

    pub(crate) fn score_scale(&self) -> ScoreScale {
        ScoreScale {
            mult: self.header.score_mult,
            exp: self.header.score_exp,
        }
    }
}

/// Tensors being written: name, values, shape.
#[derive(Default)]
pub(crate) struct ExactWriter {
    tensors: Vec<(String, Vec<i32>, Vec<usize>)>,
}

impl ExactWriter {
    pub(crate) fn put(&mut self, name: impl Into<String>, data: Vec<i32>, shape: &[usize]) {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        self.tensors.push((name.into(), data, shape.to_vec()));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The file's bytes and their SHA-256.
    pub(crate) fn finish(self, header: &ExactHeader) -> Result<(Vec<u8>, String)> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .into_iter()
            .map(|(n, d, s)| (n, d.iter().flat_map(|v| v.to_le_bytes()).collect(), s))
            .collect();
        let views = bytes
            .iter()
            .map(|(n, d, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, s.clone(), d)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::Safetensors(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let json = serde_json::to_string(header)
            .map_err(|e| ModelError::Format(format!("header: {e}")))?;
        // One metadata key, so the header's bytes do not depend on hash-map order.
        let meta = HashMap::from([(HEADER_KEY.to_string(), json)]);
        let out = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| ModelError::Safetensors(e.to_string()))?;
        let hash = sha256_hex(&out);
        Ok((out, hash))
    }
}

/// Integer L2 normalisation of a pooled embedding: `round(v · 2^15 / ‖v‖)`, exactly, in
/// 128-bit integers (host code, identical on every platform). The result is a unit vector in
/// Q15 (`1.0 = 32768`).
pub fn l2_normalize_q15(v: &[i32]) -> Vec<i32> {
    let sum: u128 = v.iter().map(|&x| (x.unsigned_abs() as u128).pow(2)).sum();
    if sum == 0 {
        return vec![0; v.len()];
    }
    v.iter()
        .map(|&x| {
            // round(sqrt(y)) = (floor(sqrt(4y)) + 1) / 2, and floor(sqrt(floor(z))) = floor(sqrt(z)).
            let y4 = ((x.unsigned_abs() as u128).pow(2) << 32) / sum;
            let r = isqrt_u128(y4).div_ceil(2) as i32;
            if x < 0 { -r } else { r }
        })
        .collect()
}

fn isqrt_u128(n: u128) -> u128 {
    if n < 2 {
        return n;
    }
    // Newton's method from above converges to the floor root.
    let mut x = 1u128 << (128 - n.leading_zeros()).div_ceil(2);
    loop {
        let y = (x + n / x) / 2;
        if y >= x {
            return x;
        }
        x = y;
    }
}

/// SHA-256 of integers as little-endian bytes: how exact outputs are compared.
pub fn hash_ints(values: &[i32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    sha256_hex(&bytes)
}

/// Packs int8 values four to a little-endian word (the layout the kernels read).
pub(crate) fn pack_i8(values: &[i8]) -> Vec<i32> {
    values
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_hash() {
        let h = "ab".repeat(32);
        let name = exact_file_name("m", &h);
        assert_eq!(hash_in_name("m", &name), Some(h.as_str()));
        assert_eq!(hash_in_name("other", &name), None);
        assert_eq!(hash_in_name("m", "m.exact.abc.safetensors"), None);
    }

    #[test]
    fn q15_normalisation_is_a_rounded_unit_vector() {
        assert_eq!(l2_normalize_q15(&[3, 4]), vec![19661, 26214]);
        assert_eq!(l2_normalize_q15(&[0, -7]), vec![0, -32768]);
        assert_eq!(l2_normalize_q15(&[0, 0]), vec![0, 0]);
        let v: Vec<i32> = (0..384).map(|i| (i * 7919 % 2001) - 1000).collect();
        let q = l2_normalize_q15(&v);
        let norm: f64 = q
            .iter()
            .map(|&x| (x as f64 / 32768.0).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        for n in [0u128, 1, 2, 3, 4, 15, 16, 17, u64::MAX as u128, u128::MAX] {
            let r = isqrt_u128(n);
            assert!(r * r <= n && (r + 1).checked_mul(r + 1).is_none_or(|s| s > n));
        }
    }

    #[test]
    fn packing_puts_the_first_value_in_the_low_byte() {
        assert_eq!(pack_i8(&[1, -1, 0, 2]), vec![0x0200_ff01]);
    }
}

//! GGUF (v2 and v3) reader.
//!
//! The reader works on a byte slice holding the whole file (typically a
//! memory map or a `Vec<u8>` read from disk). [`GgufFile::parse`] decodes the
//! header, the metadata key/value pairs and the tensor descriptors, and checks
//! that every tensor's data lies inside the slice; tensor data is then
//! borrowed with [`GgufFile::tensor_bytes`] or dequantised to `f32` with
//! [`GgufFile::tensor_f32`].
//!
//! The files are untrusted input, so the parser never panics, uses checked
//! arithmetic for every offset and size, and never allocates from a length
//! field before checking that the bytes it describes exist.
//!
//! Layout (little endian):
//!
//! ```text
//! magic "GGUF" | u32 version | u64 tensor_count | u64 metadata_kv_count
//! metadata_kv_count × { string key | u32 value_type | value }
//! tensor_count × { string name | u32 n_dims | n_dims × u64 dim | u32 ggml_type | u64 offset }
//! padding to `general.alignment` (default 32)
//! data section (tensor offsets are relative to its start)
//! ```
//!
//! A string is a `u64` byte length followed by UTF-8 bytes; an array value is
//! a `u32` element type, a `u64` element count and the elements.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;

/// Default alignment of the data section and tensor offsets.
pub const DEFAULT_ALIGNMENT: u32 = 32;

/// Largest nesting of arrays accepted: an array of arrays (depth 2) is fine,
/// an array of arrays of arrays is rejected.
pub const MAX_ARRAY_DEPTH: usize = 2;

/// Upper bound on the number of array elements (summed over all metadata
/// arrays, nested ones included). Every element costs a `MetaValue` (32 bytes)
/// in memory, so this bounds the memory the metadata can make us allocate.
/// Real files stay far below it (a 256k-token vocabulary plus scores, token
/// types and merges is about 1M elements).
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 1 << 24;

/// Upper bound on the tensor count.
pub const MAX_TENSORS: u64 = 1 << 20;

/// Upper bound on the metadata key/value count.
pub const MAX_METADATA_KVS: u64 = 1 << 20;

/// Largest number of dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Smallest possible encoded metadata entry: empty key (8), type (4), u8 value (1).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoded tensor info: empty name (8), n_dims (4), one
/// dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Errors produced while reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file ends before a field that must be there.
    #[error(
        "truncated GGUF: needed {needed} bytes for {what} at offset {offset}, file has {file_len}"
    )]
    Truncated {
        what: &'static str,
        needed: u64,
        offset: u64,
        file_len: u64,
    },

    /// The first four bytes are not `GGUF`.
    #[error("bad GGUF magic {found:02x?} at offset 0, expected \"GGUF\" [47, 47, 55, 46]")]
    BadMagic { found: [u8; 4] },

    /// Only versions 2 and 3 are read.
    /// `hint` is empty or explains the likely cause (big-endian file).
    #[error("unsupported GGUF version {version} at offset 4 (supported: 2, 3){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },

    /// A metadata value (or array element) type id outside 0..=12.
    #[error("unknown metadata value type {type_id} at offset {offset}")]
    UnknownValueType { type_id: u32, offset: u64 },

    /// A key or tensor name is not valid UTF-8.
    #[error("invalid UTF-8 in {what} at offset {offset}")]
    InvalidUtf8 { what: &'static str, offset: u64 },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key `{key}` at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },

    /// The same tensor name appears twice.
    #[error("duplicate tensor name `{name}` at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },

    /// A count, length or nesting depth is larger than the file can hold or
    /// than this reader accepts.
    #[error("GGUF limit exceeded: {what} is {value} at offset {offset}, limit is {limit}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        limit: u64,
        offset: u64,
    },

    /// `general.alignment` is zero or not a power of two.
    #[error("invalid general.alignment {value}: must be a nonzero power of two")]
    InvalidAlignment { value: u64 },

    /// A tensor descriptor is malformed (dimension count, dimension size,
    /// offset alignment, ...).
    #[error("invalid tensor info for `{name}` at offset {offset}: {reason}")]
    InvalidTensorInfo {
        name: String,
        offset: u64,
        reason: String,
    },

    /// The tensor's ggml type id is not known, so its size cannot be computed.
    #[error("tensor `{name}` has unknown ggml type id {type_id}, its data size cannot be computed")]
    UnknownTensorType { name: String, type_id: u32 },

    /// The innermost dimension of a block-quantised tensor is not a multiple
    /// of the block size.
    #[error(
        "tensor `{name}` of type {dtype}: innermost dimension {dim} is not a multiple of the block size {block}"
    )]
    BlockMisaligned {
        name: String,
        dtype: GgmlType,
        dim: u64,
        block: u64,
    },

    /// The tensor's data range (absolute offsets) is not inside the file.
    #[error("tensor `{name}` data [{start}, {end}) outside the file of {file_len} bytes")]
    TensorOutOfBounds {
        name: String,
        start: u128,
        end: u128,
        file_len: u64,
    },

    /// No tensor with that name.
    #[error("tensor `{name}` not found")]
    TensorNotFound { name: String },

    /// The tensor's type cannot be dequantised by this reader.
    #[error("unsupported tensor type {dtype} for dequantisation (tensor `{name}`)")]
    UnsupportedDequant { name: String, dtype: GgmlType },

    /// A size does not fit this platform's `usize`.
    #[error("{what} of {value} bytes does not fit in memory on this platform")]
    TooLarge { what: &'static str, value: u64 },

    /// A metadata key that was asked for is absent.
    #[error("missing GGUF metadata key `{key}`")]
    MissingKey { key: String },

    /// A metadata key has a value of another type than asked for.
    #[error("GGUF metadata key `{key}` has type {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        expected: &'static str,
        found: String,
    },

    /// A metadata integer does not fit the requested integer type.
    #[error("GGUF metadata key `{key}`: value {value} does not fit in {target}")]
    ValueOutOfRange {
        key: String,
        value: String,
        target: &'static str,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Short name of the value's type, as used in error messages
    /// (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// The value as an `i128` if it is an integer of any width.
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// ggml tensor element type.
///
/// The variants are the types this reader can dequantise; every other ggml
/// type id is kept as [`GgmlType::Other`] (its data size is still known for
/// the standard ggml types, see [`GgmlType::block_layout`]).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q6_K,
    Other(u32),
}

/// ggml type traits: (id, name, elements per block, bytes per block), as in
/// ggml's `type_traits` table. Removed/deprecated ids (4, 5, 31..=33,
/// 36..=38) are absent.
const TYPE_TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
];

const GGML_TYPE_BF16: u32 = 30;

impl GgmlType {
    /// Maps a ggml type id to a `GgmlType`.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            14 => GgmlType::Q6_K,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q6_K => 14,
            GgmlType::Other(id) => id,
        }
    }

    fn traits(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        let id = self.id();
        TYPE_TABLE.iter().find(|t| t.0 == id)
    }

    /// ggml's name of the type (`"Q4_K"`), if it is a known ggml type.
    pub fn name(self) -> Option<&'static str> {
        self.traits().map(|t| t.1)
    }

    /// `(elements per block, bytes per block)` for known ggml types;
    /// `(1, size)` for the plain element types.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        self.traits().map(|t| (t.2, t.3))
    }

    /// Whether [`GgufFile::tensor_f32`] can dequantise this type.
    pub fn can_dequantise(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q8_0
                | GgmlType::Q6_K
        ) || self.id() == GGML_TYPE_BF16
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.id()),
        }
    }
}

/// A tensor descriptor.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dimensions; saturates at
    /// `u64::MAX`, which cannot happen for a tensor accepted by
    /// [`GgufFile::parse`]).
    pub fn numel(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> Result<u64, GgufError> {
        let (block, block_bytes) =
            self.dtype
                .block_layout()
                .ok_or_else(|| GgufError::UnknownTensorType {
                    name: self.name.clone(),
                    type_id: self.dtype.id(),
                })?;
        let inner = self.dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(GgufError::BlockMisaligned {
                name: self.name.clone(),
                dtype: self.dtype,
                dim: inner,
                block,
            });
        }
        let overflow = || GgufError::InvalidTensorInfo {
            name: self.name.clone(),
            offset: 0,
            reason: format!("data size of dims {:?} overflows u64", self.dims),
        };
        let row_bytes = (inner / block).checked_mul(block_bytes).ok_or_else(overflow)?;
        self.dims
            .iter()
            .skip(1)
            .try_fold(row_bytes, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)
    }

    /// The dimensions in row-major order (outermost first), e.g.
    /// `[rows, cols]` for a matrix: `dims` reversed.
    pub fn shape_row_major(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }
}

/// A parsed GGUF file: header, metadata and tensor descriptors. Tensor data
/// stays in the byte slice that was parsed.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the (aligned) data section.
    pub data_offset: usize,
}

/// Bounds-checked little-endian reader over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what,
            needed: n,
            offset: self.pos as u64,
            file_len: self.bytes.len() as u64,
        };
        if n > self.remaining() {
            return Err(truncated());
        }
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let offset = self.pos as u64;
        let file_len = self.bytes.len() as u64;
        let slice = self.take(N as u64, what)?;
        <[u8; N]>::try_from(slice).map_err(|_| GgufError::Truncated {
            what,
            needed: N as u64,
            offset,
            file_len,
        })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Raw bytes of a length-prefixed string. The length is checked against
    /// the remaining bytes before anything is allocated.
    fn string_bytes(
        &mut self,
        len_what: &'static str,
        what: &'static str,
    ) -> Result<(&'a [u8], u64), GgufError> {
        let len = self.u64(len_what)?;
        let offset = self.offset();
        Ok((self.take(len, what)?, offset))
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn string_strict(
        &mut self,
        len_what: &'static str,
        what: &'static str,
    ) -> Result<String, GgufError> {
        let (raw, offset) = self.string_bytes(len_what, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { what, offset })
    }
}

/// State shared while reading the metadata.
struct MetaCtx {
    /// Array elements still allowed (see [`MAX_TOTAL_ARRAY_ELEMENTS`]).
    array_budget: u64,
    /// Metadata strings that were not valid UTF-8 (replaced lossily).
    lossy_strings: u64,
    first_lossy_offset: Option<u64>,
}

/// Smallest encoded size of a value of metadata type `type_id`, or `None` for
/// an unknown type.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn read_value(
    r: &mut Reader<'_>,
    type_id: u32,
    type_offset: u64,
    depth: usize,
    ctx: &mut MetaCtx,
) -> Result<MetaValue, GgufError> {
    Ok(match type_id {
        0 => MetaValue::U8(r.u8("u8 value")?),
        1 => MetaValue::I8(r.u8("i8 value")? as i8),
        2 => MetaValue::U16(r.u16("u16 value")?),
        3 => MetaValue::I16(r.u16("i16 value")? as i16),
        4 => MetaValue::U32(r.u32("u32 value")?),
        5 => MetaValue::I32(r.u32("i32 value")? as i32),
        6 => MetaValue::F32(f32::from_bits(r.u32("f32 value")?)),
        7 => MetaValue::Bool(r.u8("bool value")? != 0),
        8 => {
            let (raw, offset) = r.string_bytes("string length", "string bytes")?;
            let s = match std::str::from_utf8(raw) {
                Ok(s) => s.to_owned(),
                Err(_) => {
                    ctx.lossy_strings += 1;
                    ctx.first_lossy_offset.get_or_insert(offset);
                    String::from_utf8_lossy(raw).into_owned()
                }
            };
            MetaValue::String(s)
        }
        9 => {
            let array_offset = r.offset();
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::LimitExceeded {
                    what: "array nesting depth",
                    value: depth as u64 + 1,
                    limit: MAX_ARRAY_DEPTH as u64,
                    offset: type_offset,
                });
            }
            let elem_type = r.u32("array element type")?;
            let min = min_value_size(elem_type).ok_or(GgufError::UnknownValueType {
                type_id: elem_type,
                offset: array_offset,
            })?;
            let count_offset = r.offset();
            let count = r.u64("array length")?;
            let remaining = r.remaining();
            // Every element needs at least `min` bytes: refuse counts the
            // rest of the file cannot hold before allocating anything.
            let needed = count.checked_mul(min).ok_or(GgufError::LimitExceeded {
                what: "array length",
                value: count,
                limit: remaining / min,
                offset: count_offset,
            })?;
            if needed > remaining {
                return Err(GgufError::Truncated {
                    what: "array elements",
                    needed,
                    offset: r.offset(),
                    file_len: r.file_len(),
                });
            }
            if count > ctx.array_budget {
                return Err(GgufError::LimitExceeded {
                    what: "total number of metadata array elements",
                    value: MAX_TOTAL_ARRAY_ELEMENTS - ctx.array_budget + count,
                    limit: MAX_TOTAL_ARRAY_ELEMENTS,
                    offset: count_offset,
                });
            }
            ctx.array_budget -= count;
            // `count <= remaining bytes`, so it fits in usize.
            let mut items = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for _ in 0..count {
                items.push(read_value(r, elem_type, array_offset, depth + 1, ctx)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(r.u64("u64 value")?),
        11 => MetaValue::I64(r.u64("i64 value")? as i64),
        12 => MetaValue::F64(f64::from_bits(r.u64("f64 value")?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                type_id,
                offset: type_offset,
            });
        }
    })
}

/// Absolute byte range of `t`'s data in a file of `file_len` bytes whose data
/// section starts at `data_offset`.
fn data_range(t: &TensorInfo, data_offset: usize, file_len: usize) -> Result<Range<usize>, GgufError> {
    let len = t.byte_len()?;
    let start = data_offset as u128 + t.offset as u128;
    let end = start + len as u128;
    if end > file_len as u128 {
        return Err(GgufError::TensorOutOfBounds {
            name: t.name.clone(),
            start,
            end,
            file_len: file_len as u64,
        });
    }
    // Both are <= file_len, so they fit in usize.
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    let end = usize::try_from(end).unwrap_or(usize::MAX);
    Ok(start..end)
}

impl GgufFile {
    /// Parses the header, metadata and tensor descriptors of a GGUF v2/v3
    /// file and checks that every tensor's data lies inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader::new(bytes);

        let magic = r.array::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            let swapped = version.swap_bytes();
            let hint = if swapped == 2 || swapped == 3 {
                "; this looks like a big-endian GGUF file, which is not supported"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { version, hint });
        }
        let tensor_count_offset = r.offset();
        let tensor_count = r.u64("tensor count")?;
        let kv_count_offset = r.offset();
        let kv_count = r.u64("metadata key-value count")?;

        // Cap the counts by what the rest of the file could possibly hold.
        let remaining = r.remaining();
        let kv_limit = (remaining / MIN_KV_BYTES).min(MAX_METADATA_KVS);
        if kv_count > kv_limit {
            return Err(GgufError::LimitExceeded {
                what: "metadata key-value count",
                value: kv_count,
                limit: kv_limit,
                offset: kv_count_offset,
            });
        }
        let tensor_limit = ((remaining - kv_count * MIN_KV_BYTES) / MIN_TENSOR_INFO_BYTES)
            .min(MAX_TENSORS);
        if tensor_count > tensor_limit {
            return Err(GgufError::LimitExceeded {
                what: "tensor count",
                value: tensor_count,
                limit: tensor_limit,
                offset: tensor_count_offset,
            });
        }

        // Metadata.
        let mut ctx = MetaCtx {
            array_budget: MAX_TOTAL_ARRAY_ELEMENTS,
            lossy_strings: 0,
            first_lossy_offset: None,
        };
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key_offset = r.offset();
            let key = r.string_strict("metadata key length", "metadata key")?;
            let type_offset = r.offset();
            let type_id = r.u32("metadata value type")?;
            let value = read_value(&mut r, type_id, type_offset, 0, &mut ctx)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey {
                    key,
                    offset: key_offset,
                });
            }
            metadata.insert(key, value);
        }
        if ctx.lossy_strings > 0 {
            tracing::warn!(
                count = ctx.lossy_strings,
                first_offset = ctx.first_lossy_offset,
                "GGUF metadata strings with invalid UTF-8 were decoded lossily"
            );
        }

        let alignment = match metadata.get("general.alignment") {
            None => u64::from(DEFAULT_ALIGNMENT),
            Some(v) => {
                let value = v.as_integer().ok_or_else(|| GgufError::WrongKeyType {
                    key: "general.alignment".into(),
                    expected: "u32",
                    found: v.type_name().into(),
                })?;
                match u32::try_from(value) {
                    Ok(a) if a != 0 && a.is_power_of_two() => u64::from(a),
                    _ => {
                        return Err(GgufError::InvalidAlignment {
                            value: u64::try_from(value).unwrap_or(0),
                        });
                    }
                }
            }
        };

        // Tensor descriptors.
        let mut tensors = Vec::with_capacity(usize::try_from(tensor_count.min(4096)).unwrap_or(0));
        let mut seen: HashSet<String> = HashSet::new();
        for _ in 0..tensor_count {
            let info_offset = r.offset();
            let name = r.string_strict("tensor name length", "tensor name")?;
            let n_dims_offset = r.offset();
            let n_dims = r.u32("tensor dimension count")?;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(GgufError::InvalidTensorInfo {
                    name,
                    offset: n_dims_offset,
                    reason: format!("dimension count {n_dims} is outside 1..={MAX_DIMS}"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let dim_offset = r.offset();
                let d = r.u64("tensor dimension")?;
                if d > i64::MAX as u64 {
                    return Err(GgufError::InvalidTensorInfo {
                        name,
                        offset: dim_offset,
                        reason: format!("dimension {d} is larger than i64::MAX"),
                    });
                }
                dims.push(d);
            }
            let dtype = GgmlType::from_id(r.u32("tensor type")?);
            let offset = r.u64("tensor data offset")?;
            if dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none() {
                return Err(GgufError::InvalidTensorInfo {
                    name,
                    offset: n_dims_offset,
                    reason: format!("element count of dims {dims:?} overflows u64"),
                });
            }
            if !seen.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    name,
                    offset: info_offset,
                });
            }
            if offset % alignment != 0 {
                return Err(GgufError::InvalidTensorInfo {
                    name,
                    offset: info_offset,
                    reason: format!(
                        "data offset {offset} is not a multiple of the alignment {alignment}"
                    ),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
            });
        }

        // The data section starts at the next multiple of the alignment.
        let end_of_infos = r.offset();
        let data_offset_u64 = end_of_infos
            .checked_add(alignment - 1)
            .map(|v| v & !(alignment - 1))
            .ok_or(GgufError::TooLarge {
                what: "data section offset",
                value: end_of_infos,
            })?;
        let data_offset = usize::try_from(data_offset_u64).map_err(|_| GgufError::TooLarge {
            what: "data section offset",
            value: data_offset_u64,
        })?;

        for t in &tensors {
            data_range(t, data_offset, bytes.len())?;
        }

        tracing::debug!(
            version,
            tensors = tensors.len(),
            metadata = metadata.len(),
            alignment,
            data_offset,
            "parsed GGUF"
        );

        Ok(GgufFile {
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    /// The descriptor of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_or_err(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name).ok_or_else(|| GgufError::TensorNotFound { name: name.into() })
    }

    /// The raw data of tensor `name` inside `bytes` (the slice that was
    /// parsed). The range is checked again against `bytes`.
    pub fn tensor_bytes<'a>(&self, bytes: &'a [u8], name: &str) -> Result<&'a [u8], GgufError> {
        let t = self.tensor_or_err(name)?;
        let range = data_range(t, self.data_offset, bytes.len())?;
        let (start, end) = (range.start, range.end);
        bytes.get(range).ok_or_else(|| GgufError::TensorOutOfBounds {
            name: t.name.clone(),
            start: start as u128,
            end: end as u128,
            file_len: bytes.len() as u64,
        })
    }

    /// Tensor `name` converted to `f32`, in ggml element order (`dims[0]`
    /// fastest). Supports F32, F16, BF16, Q4_0, Q4_1, Q8_0 and Q6_K, with the
    /// same arithmetic as ggml's `dequantize_row_*`.
    pub fn tensor_f32(&self, bytes: &[u8], name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor_or_err(name)?;
        let data = self.tensor_bytes(bytes, name)?;
        dequantize(t, data)
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn get_or_err(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get_or_err(key)? {
            MetaValue::String(s) => Ok(s),
            other => Err(wrong_type(key, "string", other)),
        }
    }

    /// An integer value of any integer type that fits in `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.get_or_err(key)?;
        let i = v
            .as_integer()
            .ok_or_else(|| wrong_type(key, "integer", v))?;
        u32::try_from(i).map_err(|_| GgufError::ValueOutOfRange {
            key: key.into(),
            value: i.to_string(),
            target: "u32",
        })
    }

    /// An `f32` or `f64` value (the latter rounded to `f32`).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.get_or_err(key)? {
            MetaValue::F32(v) => Ok(*v),
            MetaValue::F64(v) => Ok(*v as f32),
            other => Err(wrong_type(key, "f32 or f64", other)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let items = self.get_array(key, "array of string")?;
        items
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                other => Err(GgufError::WrongKeyType {
                    key: key.into(),
                    expected: "array of string",
                    found: format!("array of {}", other.type_name()),
                }),
            })
            .collect()
    }

    /// An array of integers (of any integer type) that all fit in `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let items = self.get_array(key, "array of integer")?;
        items
            .iter()
            .map(|v| {
                let i = v.as_integer().ok_or_else(|| GgufError::WrongKeyType {
                    key: key.into(),
                    expected: "array of integer",
                    found: format!("array of {}", v.type_name()),
                })?;
                i32::try_from(i).map_err(|_| GgufError::ValueOutOfRange {
                    key: key.into(),
                    value: i.to_string(),
                    target: "i32",
                })
            })
            .collect()
    }

    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue], GgufError> {
        match self.get_or_err(key)? {
            MetaValue::Array(items) => Ok(items),
            other => Err(wrong_type(key, expected, other)),
        }
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongKeyType {
        key: key.into(),
        expected,
        found: found.type_name().into(),
    }
}

/// IEEE 754 binary16 → binary32 (exact; subnormals, infinities and NaNs
/// included, NaN payloads preserved).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: man × 2^-24. Normalise the mantissa: shift it left
            // until its leading one reaches bit 10, adjusting the exponent.
            let shift = man.leading_zeros() - 21; // 1..=10
            let man = (man << shift) & 0x03ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (man << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 → binary32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    match b.get(i..i + 2) {
        Some(&[lo, hi]) => f16_to_f32(u16::from_le_bytes([lo, hi])),
        _ => 0.0,
    }
}

const Q8_0_BYTES: usize = 34;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q6_K_BYTES: usize = 210;

/// Converts the data of `t` to f32. `data.len()` must equal `t.byte_len()`.
fn dequantize(t: &TensorInfo, data: &[u8]) -> Result<Vec<f32>, GgufError> {
    let numel = t.numel();
    let n = usize::try_from(numel).map_err(|_| GgufError::TooLarge {
        what: "dequantised tensor",
        value: numel.saturating_mul(4),
    })?;
    let expected = t.byte_len()?;
    if data.len() as u64 != expected {
        return Err(GgufError::TensorOutOfBounds {
            name: t.name.clone(),
            start: 0,
            end: u128::from(expected),
            file_len: data.len() as u64,
        });
    }
    let mut out: Vec<f32> = Vec::with_capacity(n);
    match t.dtype {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            data.chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        GgmlType::Other(GGML_TYPE_BF16) => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(Q8_0_BYTES) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(Q4_0_BYTES) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| f32::from((q & 0x0f) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(Q4_1_BYTES) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q6_K => {
            for b in data.chunks_exact(Q6_K_BYTES) {
                dequantize_q6_k_block(b, &mut out);
            }
        }
        dtype => {
            return Err(GgufError::UnsupportedDequant {
                name: t.name.clone(),
                dtype,
            });
        }
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

/// One Q6_K super-block (256 values): `ql[128]`, `qh[64]`, `scales[16]` (i8),
/// `d` (f16); mirrors ggml's `dequantize_row_q6_K`.
fn dequantize_q6_k_block(b: &[u8], out: &mut Vec<f32>) {
    let (Some(ql), Some(qh), Some(sc)) = (b.get(0..128), b.get(128..192), b.get(192..208)) else {
        return;
    };
    let d = f16_at(b, 208);
    let mut y = [0f32; 256];
    for half in 0..2 {
        let ql = &ql[64 * half..64 * half + 64];
        let qh = &qh[32 * half..32 * half + 32];
        let sc = &sc[8 * half..8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
    }
    out.extend_from_slice(&y);
}

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
    InvalidAlignment { value: i128 },

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

    /// The tensor's data size does not fit in a `u64`.
    #[error("tensor `{name}` with dims {dims:?}: data size overflows u64")]
    TensorTooLarge { name: String, dims: Vec<u64> },

    /// No tensor with that name.
    #[error("tensor `{name}` not found")]
    TensorNotFound { name: String },

    /// The tensor's type cannot be dequantised by this reader.
    #[error(
        "tensor `{name}` is {dtype}, which this reader cannot dequantise (it reads F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K)"
    )]
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
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
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
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
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
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
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
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4_K
                | GgmlType::Q5_K
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
        let overflow = || GgufError::TensorTooLarge {
            name: self.name.clone(),
            dims: self.dims.clone(),
        };
        let row_bytes = (inner / block)
            .checked_mul(block_bytes)
            .ok_or_else(overflow)?;
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
fn data_range(
    t: &TensorInfo,
    data_offset: usize,
    file_len: usize,
) -> Result<Range<usize>, GgufError> {
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
        let tensor_limit =
            ((remaining - kv_count * MIN_KV_BYTES) / MIN_TENSOR_INFO_BYTES).min(MAX_TENSORS);
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
                        return Err(GgufError::InvalidAlignment { value });
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
            if dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
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
        self.tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound { name: name.into() })
    }

    /// The raw data of tensor `name` inside `bytes` (the slice that was
    /// parsed). The range is checked again against `bytes`.
    pub fn tensor_bytes<'a>(&self, bytes: &'a [u8], name: &str) -> Result<&'a [u8], GgufError> {
        let t = self.tensor_or_err(name)?;
        let range = data_range(t, self.data_offset, bytes.len())?;
        let (start, end) = (range.start, range.end);
        bytes
            .get(range)
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                start: start as u128,
                end: end as u128,
                file_len: bytes.len() as u64,
            })
    }

    /// Tensor `name` converted to `f32`, in ggml element order (`dims[0]`
    /// fastest). Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, with the
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

    /// An array of `f32` (or `f64`, rounded) values.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let items = self.get_array(key, "array of f32")?;
        items
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Ok(*x),
                MetaValue::F64(x) => Ok(*x as f32),
                other => Err(GgufError::WrongKeyType {
                    key: key.into(),
                    expected: "array of f32",
                    found: format!("array of {}", other.type_name()),
                }),
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
const Q5_0_BYTES: usize = 22;
const Q5_1_BYTES: usize = 24;
const Q4_K_BYTES: usize = 144;
const Q5_K_BYTES: usize = 176;
const Q6_K_BYTES: usize = 210;
// The block sizes above are ggml's (`TYPE_TABLE`).
const _: () = assert!(Q5_0_BYTES == 2 + 4 + 16 && Q5_1_BYTES == 2 + 2 + 4 + 16);
const _: () = assert!(Q4_K_BYTES == 2 + 2 + 12 + 128 && Q5_K_BYTES == 2 + 2 + 12 + 32 + 128);
const _: () = assert!(Q6_K_BYTES == 128 + 64 + 16 + 2);

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
        GgmlType::Q5_0 => {
            for b in data.chunks_exact(Q5_0_BYTES) {
                dequantize_q5_block(f16_at(b, 0), None, &b[2..], &mut out);
            }
        }
        GgmlType::Q5_1 => {
            for b in data.chunks_exact(Q5_1_BYTES) {
                dequantize_q5_block(f16_at(b, 0), Some(f16_at(b, 2)), &b[4..], &mut out);
            }
        }
        GgmlType::Q4_K => {
            for b in data.chunks_exact(Q4_K_BYTES) {
                dequantize_q45_k_block(b, false, &mut out);
            }
        }
        GgmlType::Q5_K => {
            for b in data.chunks_exact(Q5_K_BYTES) {
                dequantize_q45_k_block(b, true, &mut out);
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

/// One Q5_0 (`min` None: `q - 16` times `d`) or Q5_1 (`q * d + min`) block of 32 values:
/// `rest` is `qh` (u32, bit j the fifth bit of value j) then `qs[16]` (value j in the low
/// nibble of byte j, value j + 16 in the high one); mirrors ggml's `dequantize_row_q5_0/1`.
fn dequantize_q5_block(d: f32, min: Option<f32>, rest: &[u8], out: &mut Vec<f32>) {
    let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let qs = &rest[4..20];
    let value = |q: u8| match min {
        None => f32::from(q as i8 - 16) * d,
        Some(m) => f32::from(q) * d + m,
    };
    out.extend((0..16).map(|j| value((qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4))));
    out.extend((0..16).map(|j| value((qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4))));
}

/// Scale and min of sub-block `j` (0..8) from a K-quant's 12 packed bytes: 6 bits each,
/// sub-blocks 4..7 split between the low nibbles of bytes 8..11 and the top bits of 0..7;
/// ggml's `get_scale_min_k4`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One Q4_K (`five_bits` false) or Q5_K super-block of 256 values: `d`, `dmin` (f16),
/// `scales[12]`, then for Q5_K `qh[32]`, then `qs[128]`. Four groups of 64 values, each 32
/// bytes of `qs` (low nibbles: sub-block 2g, high: 2g + 1); Q5_K's fifth bit comes from the
/// same 32 `qh` bytes for every group (bit 2g for the low nibbles, 2g + 1 for the high ones).
/// `value = d·scale·q − dmin·min`; mirrors ggml's `dequantize_row_q4_K` / `_q5_K`.
fn dequantize_q45_k_block(b: &[u8], five_bits: bool, out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if five_bits {
        (Some(&b[16..48]), &b[48..176])
    } else {
        (None, &b[16..144])
    };
    let high = |l: usize, bit: usize| qh.map_or(0, |qh| ((qh[l] >> bit) & 1) << 4);
    for g in 0..4 {
        let q = &qs[32 * g..32 * g + 32];
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        out.extend((0..32).map(|l| d1 * f32::from((q[l] & 0x0f) | high(l, 2 * g)) - m1));
        out.extend((0..32).map(|l| d2 * f32::from((q[l] >> 4) | high(l, 2 * g + 1)) - m2));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every quantised type against gguf-py (llama.cpp's Python reader) on random blocks
    /// (`tests/fixtures/make_ggml_dequant.py`), bit for bit.
    #[test]
    fn every_quantised_type_dequantises_to_gguf_py_s_bits() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/ggml-dequant.json"
        )))
        .unwrap();
        let cases = fixture.as_array().unwrap();
        let mut seen = Vec::new();
        for case in cases {
            let name = case["type"].as_str().unwrap();
            let dtype = GgmlType::from_id(case["id"].as_u64().unwrap() as u32);
            assert_eq!(dtype.name(), Some(name));
            assert!(dtype.can_dequantise(), "{name}");
            let hex = case["bytes"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let t = TensorInfo {
                name: name.into(),
                dims: vec![case["elements"].as_u64().unwrap()],
                dtype,
                offset: 0,
            };
            let got = dequantize(&t, &bytes).unwrap();
            let want: Vec<u32> = case["f32_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| u32::from_str_radix(b.as_str().unwrap(), 16).unwrap())
                .collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    *w,
                    "{name} value {i}: {g} against gguf-py's {}",
                    f32::from_bits(*w)
                );
            }
            seen.push(name.to_string());
        }
        for name in [
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
        ] {
            assert!(seen.iter().any(|s| s == name), "{name} has no fixture");
        }
    }

    // ---------------------------------------------------------------------
    // Test-only GGUF writer.
    // ---------------------------------------------------------------------

    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }
        fn u16(&mut self, v: u16) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64).raw(s.as_bytes())
        }
        fn header(&mut self, version: u32, n_tensors: u64, n_kv: u64) -> &mut Self {
            self.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv)
        }
        fn value(&mut self, v: &MetaValue) -> &mut Self {
            match v {
                MetaValue::U8(x) => self.u8(*x),
                MetaValue::I8(x) => self.u8(*x as u8),
                MetaValue::U16(x) => self.u16(*x),
                MetaValue::I16(x) => self.u16(*x as u16),
                MetaValue::U32(x) => self.u32(*x),
                MetaValue::I32(x) => self.u32(*x as u32),
                MetaValue::F32(x) => self.u32(x.to_bits()),
                MetaValue::Bool(x) => self.u8(u8::from(*x)),
                MetaValue::String(s) => self.str(s),
                MetaValue::Array(items) => {
                    // Element type of an empty array: u8.
                    self.u32(items.first().map_or(0, type_id))
                        .u64(items.len() as u64);
                    for it in items {
                        self.value(it);
                    }
                    self
                }
                MetaValue::U64(x) => self.u64(*x),
                MetaValue::I64(x) => self.u64(*x as u64),
                MetaValue::F64(x) => self.u64(x.to_bits()),
            }
        }
        fn kv(&mut self, key: &str, v: &MetaValue) -> &mut Self {
            self.str(key).u32(type_id(v)).value(v)
        }
        fn pad_to(&mut self, alignment: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(alignment) {
                self.0.push(0);
            }
            self
        }
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    struct T {
        name: &'static str,
        dims: Vec<u64>,
        type_id: u32,
        data: Vec<u8>,
        /// Written instead of the computed offset when set.
        offset_override: Option<u64>,
    }

    fn t(name: &'static str, dims: &[u64], type_id: u32, data: Vec<u8>) -> T {
        T {
            name,
            dims: dims.to_vec(),
            type_id,
            data,
            offset_override: None,
        }
    }

    /// Builds a GGUF file. Tensor data is laid out in order, each tensor
    /// aligned; nothing follows the last tensor's data.
    fn build(version: u32, kvs: &[(&str, MetaValue)], tensors: &[T], alignment: usize) -> Vec<u8> {
        let mut w = W::default();
        w.header(version, tensors.len() as u64, kvs.len() as u64);
        for (k, v) in kvs {
            w.kv(k, v);
        }
        let mut offsets = Vec::new();
        let mut off = 0usize;
        for t in tensors {
            off = off.div_ceil(alignment) * alignment;
            offsets.push(off);
            off += t.data.len();
        }
        for (t, &o) in tensors.iter().zip(&offsets) {
            w.str(t.name).u32(t.dims.len() as u32);
            for &d in &t.dims {
                w.u64(d);
            }
            w.u32(t.type_id).u64(t.offset_override.unwrap_or(o as u64));
        }
        w.pad_to(alignment);
        let base = w.0.len();
        for (t, &o) in tensors.iter().zip(&offsets) {
            w.0.resize(base + o, 0);
            w.raw(&t.data);
        }
        w.0
    }

    /// Exact f32 → f16 for values representable as normal f16 (or zero).
    fn f16(v: f32) -> u16 {
        if v == 0.0 {
            return if v.is_sign_negative() { 0x8000 } else { 0 };
        }
        let b = v.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
        assert!((1..31).contains(&exp), "{v} not a normal f16");
        assert_eq!(b & 0x1fff, 0, "{v} not exact in f16");
        let h = sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16;
        assert_eq!(f16_to_f32(h), v);
        h
    }

    fn f32_data(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f16_data(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    const F32_VALUES: [f32; 6] = [0.5, -1.0, 2.25, 3.0, -4.5, 1e-3];
    const F16_BITS: [u16; 6] = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000];

    /// Q8_0, two blocks: block 0 d=0.5 q[j]=j-16; block 1 d=0.25 q[j]=8j-128.
    fn q8_0_data() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&f16(0.5).to_le_bytes());
        d.extend((0..32).map(|j| (j as i8 - 16) as u8));
        d.extend_from_slice(&f16(0.25).to_le_bytes());
        d.extend((0..32).map(|j: i32| (8 * j - 128) as i8 as u8));
        d
    }

    /// Q4_1, one block: d=0.5, m=-1, low nibble of qs[j] = j, high = 15-j.
    fn q4_1_data() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&f16(0.5).to_le_bytes());
        d.extend_from_slice(&f16(-1.0).to_le_bytes());
        d.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        d
    }

    /// Q4_0, one block: d=2, low nibble of qs[j] = j, high = (j+3)&15.
    fn q4_0_data() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&f16(2.0).to_le_bytes());
        d.extend((0..16u8).map(|j| j | (((j + 3) & 15) << 4)));
        d
    }

    /// Packs one Q6_K block from 256 six-bit quants (0..64), 16 scales and
    /// d, following the block layout: element e = 128h + 32k + l (k < 4)
    /// has its low 4 bits in ql[64h + l + 32(k&1)] (low nibble for k < 2,
    /// high nibble otherwise), its top 2 bits in qh[32h + l] bits 2k..2k+1,
    /// and scale scales[8h + 2k + l/16].
    fn q6_k_block(q: &[u8; 256], scales: &[i8; 16], d: f32) -> Vec<u8> {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (e, &v) in q.iter().enumerate() {
            assert!(v < 64);
            let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let lo = v & 15;
            let hi = v >> 4;
            let qli = 64 * h + l + 32 * (k & 1);
            ql[qli] |= if k < 2 { lo } else { lo << 4 };
            qh[32 * h + l] |= hi << (2 * k);
        }
        let mut b = Vec::with_capacity(210);
        b.extend_from_slice(&ql);
        b.extend_from_slice(&qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend_from_slice(&f16(d).to_le_bytes());
        b
    }

    fn q6_k_expected(q: &[u8; 256], scales: &[i8; 16], d: f32) -> Vec<f32> {
        (0..256)
            .map(|e| {
                let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
                let sc = scales[8 * h + 2 * k + l / 16];
                d * f32::from(sc) * f32::from(q[e] as i8 - 32)
            })
            .collect()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn q6_k_inputs() -> ([u8; 256], [i8; 16], f32) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut q = [0u8; 256];
        for v in &mut q {
            *v = rng.below(64) as u8;
        }
        // Pin the extremes.
        q[0] = 0;
        q[255] = 63;
        let mut scales = [0i8; 16];
        for s in &mut scales {
            *s = rng.next() as i8;
        }
        scales[0] = -128;
        scales[15] = 127;
        (q, scales, 0.125)
    }

    fn metadata() -> Vec<(&'static str, MetaValue)> {
        use MetaValue::*;
        vec![
            ("general.architecture", String("llama".into())),
            ("general.name", String("tiny test".into())),
            ("general.file_type", U16(3)),
            ("llama.block_count", U32(2)),
            ("llama.context_length", U64(2048)),
            ("llama.embedding_length", I32(64)),
            ("llama.rope.freq_base", F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", F64(1e-5)),
            ("test.u8", U8(200)),
            ("test.i8", I8(-5)),
            ("test.i16", I16(-300)),
            ("test.i64", I64(-7)),
            ("test.bool", Bool(true)),
            (
                "tokenizer.ggml.tokens",
                Array(vec![
                    String("<s>".into()),
                    String("</s>".into()),
                    String("hello".into()),
                    String("wörld".into()),
                    String("".into()),
                ]),
            ),
            (
                "tokenizer.ggml.token_type",
                Array(vec![I32(1), I32(3), I32(1), I32(1), I32(-1)]),
            ),
            (
                "tokenizer.ggml.scores",
                Array(vec![F32(0.0), F32(-1.5), F32(-2.0), F32(-3.0), F32(-4.0)]),
            ),
            ("test.u8_array", Array(vec![U8(1), U8(255)])),
            ("test.big_u64_array", Array(vec![U64(1), U64(1 << 40)])),
            ("test.empty_array", Array(vec![])),
            (
                "test.nested",
                Array(vec![Array(vec![U8(1), U8(2)]), Array(vec![U8(3)])]),
            ),
        ]
    }

    fn tensors() -> Vec<T> {
        let (q, s, d) = q6_k_inputs();
        vec![
            t("f32", &[3, 2], 0, f32_data(&F32_VALUES)),
            t("f16", &[6], 1, f16_data(&F16_BITS)),
            t("q8", &[32, 2], 8, q8_0_data()),
            t("q41", &[32], 3, q4_1_data()),
            t("q40", &[32], 2, q4_0_data()),
            t("q6k", &[256], 14, q6_k_block(&q, &s, d)),
            // Q3_K (id 11): known size (110 bytes per 256), not dequantisable.
            t("q3k", &[256], 11, vec![0x11; 110]),
        ]
    }

    fn valid_file() -> Vec<u8> {
        build(3, &metadata(), &tensors(), 32)
    }

    // ---------------------------------------------------------------------
    // Parsing and values.
    // ---------------------------------------------------------------------

    #[test]
    fn gguf_parses_synthetic_file() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.data_offset % 32, 0);
        let expected: BTreeMap<String, MetaValue> = metadata()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(g.metadata, expected);
        let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["f32", "f16", "q8", "q41", "q40", "q6k", "q3k"]);

        let f = g.tensor("f32").unwrap();
        assert_eq!(f.dims, [3, 2]);
        assert_eq!(f.dtype, GgmlType::F32);
        assert_eq!(f.numel(), 6);
        assert_eq!(f.byte_len().unwrap(), 24);
        assert_eq!(f.shape_row_major(), [2, 3]);
        assert_eq!(f.offset, 0);

        let q8 = g.tensor("q8").unwrap();
        assert_eq!(q8.dtype, GgmlType::Q8_0);
        assert_eq!(q8.byte_len().unwrap(), 68);
        assert_eq!(g.tensor("q41").unwrap().byte_len().unwrap(), 20);
        assert_eq!(g.tensor("q6k").unwrap().byte_len().unwrap(), 210);
        let q3k = g.tensor("q3k").unwrap();
        assert_eq!(q3k.dtype, GgmlType::Other(11));
        assert_eq!(q3k.dtype.to_string(), "Q3_K");
        assert_eq!(q3k.byte_len().unwrap(), 110);
        assert!(g.tensor("nope").is_none());

        // The last tensor ends exactly at the end of the file.
        let last = g.tensors.last().unwrap();
        assert_eq!(
            g.data_offset as u64 + last.offset + last.byte_len().unwrap(),
            bytes.len() as u64
        );
        for t in &g.tensors {
            assert_eq!(t.offset % 32, 0);
            let raw = g.tensor_bytes(&bytes, &t.name).unwrap();
            assert_eq!(raw.len() as u64, t.byte_len().unwrap());
        }
        assert_eq!(g.tensor_bytes(&bytes, "q3k").unwrap(), &[0x11u8; 110][..]);
    }

    #[test]
    fn gguf_metadata_getters() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get("llama.block_count"), Some(&MetaValue::U32(2)));
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_u32("llama.context_length").unwrap(), 2048);
        assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 64);
        assert_eq!(g.get_u32("general.file_type").unwrap(), 3);
        assert_eq!(g.get_u32("test.u8").unwrap(), 200);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(
            g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            1e-5f64 as f32
        );
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["<s>", "</s>", "hello", "wörld", ""]
        );
        assert_eq!(
            g.get_i32_array("tokenizer.ggml.token_type").unwrap(),
            [1, 3, 1, 1, -1]
        );
        assert_eq!(g.get_i32_array("test.u8_array").unwrap(), [1, 255]);
        assert_eq!(
            g.get_i32_array("test.empty_array").unwrap(),
            Vec::<i32>::new()
        );
        assert_eq!(
            g.get_str_array("test.empty_array").unwrap(),
            Vec::<&str>::new()
        );
        assert_eq!(g.get("test.bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(g.get("test.i64"), Some(&MetaValue::I64(-7)));
        assert!(g.get("missing").is_none());

        // Errors.
        let e = g.get_str("missing").unwrap_err();
        assert!(matches!(e, GgufError::MissingKey { .. }), "{e}");
        assert_eq!(e.to_string(), "missing GGUF metadata key `missing`");
        let e = g.get_u32("general.architecture").unwrap_err();
        assert_eq!(
            e.to_string(),
            "GGUF metadata key `general.architecture` has type string, expected integer"
        );
        let e = g.get_u32("test.i8").unwrap_err();
        assert!(matches!(e, GgufError::ValueOutOfRange { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "GGUF metadata key `test.i8`: value -5 does not fit in u32"
        );
        assert!(matches!(
            g.get_f32("llama.block_count"),
            Err(GgufError::WrongKeyType { .. })
        ));
        assert!(matches!(
            g.get_str("llama.block_count"),
            Err(GgufError::WrongKeyType { .. })
        ));
        let e = g.get_str_array("tokenizer.ggml.token_type").unwrap_err();
        assert_eq!(
            e.to_string(),
            "GGUF metadata key `tokenizer.ggml.token_type` has type array of i32, expected array of string"
        );
        assert!(matches!(
            g.get_i32_array("tokenizer.ggml.tokens"),
            Err(GgufError::WrongKeyType { .. })
        ));
        assert!(matches!(
            g.get_i32_array("tokenizer.ggml.scores"),
            Err(GgufError::WrongKeyType { .. })
        ));
        assert!(matches!(
            g.get_i32_array("test.big_u64_array"),
            Err(GgufError::ValueOutOfRange { .. })
        ));
        assert!(matches!(
            g.get_str_array("general.architecture"),
            Err(GgufError::WrongKeyType { .. })
        ));
        assert!(matches!(
            g.get_i32_array("missing"),
            Err(GgufError::MissingKey { .. })
        ));
    }

    #[test]
    fn gguf_dequantises_f32_f16() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.tensor_f32(&bytes, "f32").unwrap(), F32_VALUES);
        let h = g.tensor_f32(&bytes, "f16").unwrap();
        assert_eq!(h[..4], [1.0, -2.0, 0.5, 65504.0]);
        assert_eq!(h[4], 5.960_464_5e-8); // 2^-24, smallest subnormal
        assert_eq!(h[5], 0.0);
        assert!(h[5].is_sign_negative());
    }

    #[test]
    fn gguf_dequantises_q8_0() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        let v = g.tensor_f32(&bytes, "q8").unwrap();
        assert_eq!(v.len(), 64);
        // Block 0: d = 0.5, q = j - 16.
        assert_eq!(v[0], -8.0);
        assert_eq!(v[1], -7.5);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[31], 7.5);
        // Block 1: d = 0.25, q = 8j - 128.
        assert_eq!(v[32], -32.0);
        assert_eq!(v[33], -30.0);
        assert_eq!(v[48], 0.0);
        assert_eq!(v[63], 30.0);
        for j in 0..32 {
            assert_eq!(v[j], (j as f32 - 16.0) * 0.5);
            assert_eq!(v[32 + j], 2.0 * j as f32 - 32.0);
        }
    }

    #[test]
    fn gguf_dequantises_q4_1_and_q4_0() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        let v = g.tensor_f32(&bytes, "q41").unwrap();
        // d = 0.5, m = -1: v[j] = 0.5 j - 1, v[j+16] = 0.5 (15 - j) - 1.
        let expected: Vec<f32> = (0..16)
            .map(|j| 0.5 * j as f32 - 1.0)
            .chain((0..16).map(|j| 0.5 * (15 - j) as f32 - 1.0))
            .collect();
        assert_eq!(v, expected);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 6.5);
        assert_eq!(v[16], 6.5);
        assert_eq!(v[31], -1.0);

        let v = g.tensor_f32(&bytes, "q40").unwrap();
        // d = 2: v[j] = 2 (j - 8), v[j+16] = 2 (((j + 3) & 15) - 8).
        assert_eq!(v[0], -16.0);
        assert_eq!(v[15], 14.0);
        assert_eq!(v[16], -10.0);
        assert_eq!(v[28], 14.0);
        assert_eq!(v[29], -16.0);
        for j in 0..16 {
            assert_eq!(v[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(v[16 + j], 2.0 * (((j + 3) & 15) as f32 - 8.0));
        }
    }

    #[test]
    fn gguf_dequantises_q6_k() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        let v = g.tensor_f32(&bytes, "q6k").unwrap();
        let (q, s, d) = q6_k_inputs();
        assert_eq!(v, q6_k_expected(&q, &s, d));
        // q[0] = 0 with scale -128: 0.125 * -128 * -32.
        assert_eq!(v[0], 512.0);
        // q[255] = 63 with scale 127: 0.125 * 127 * 31.
        assert_eq!(v[255], 492.125);
    }

    #[test]
    fn gguf_tensor_f32_errors() {
        let bytes = valid_file();
        let g = GgufFile::parse(&bytes).unwrap();
        let e = g.tensor_f32(&bytes, "q3k").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor `q3k` is Q3_K, which this reader cannot dequantise (it reads F32, F16, BF16, \
             Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K)"
        );
        let e = g.tensor_f32(&bytes, "nope").unwrap_err();
        assert!(matches!(e, GgufError::TensorNotFound { .. }), "{e}");
        // A shorter slice than the one parsed is checked again.
        let e = g
            .tensor_bytes(&bytes[..bytes.len() - 1], "q3k")
            .unwrap_err();
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
        assert!(g.tensor_f32(&bytes[..bytes.len() - 1], "q3k").is_err());
    }

    #[test]
    fn gguf_f16_conversion() {
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert!(f16_to_f32(0x8000).is_sign_negative());
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14)); // smallest normal
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24)); // smallest subnormal
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24)); // largest subnormal
        assert_eq!(f16_to_f32(0x8200), -512.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert!(f16_to_f32(0x7c01).is_nan());
        assert!(f16_to_f32(0xfe00).is_nan());
        // Every finite f16 equals sign × mantissa × 2^exponent.
        for h in 0..=u16::MAX {
            let exp = i32::from((h >> 10) & 0x1f);
            let man = f64::from(h & 0x3ff);
            if exp == 31 {
                continue;
            }
            let mag = if exp == 0 {
                man * 2f64.powi(-24)
            } else {
                (1024.0 + man) * 2f64.powi(exp - 25)
            };
            let want = if h & 0x8000 != 0 { -mag } else { mag };
            assert_eq!(f64::from(f16_to_f32(h)), want, "{h:#06x}");
        }
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
    }

    #[test]
    fn gguf_accepts_v2_and_custom_alignment() {
        let mut kvs = metadata();
        kvs.push(("general.alignment", MetaValue::U32(64)));
        let bytes = build(2, &kvs, &tensors(), 64);
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.version, 2);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.tensor_f32(&bytes, "f32").unwrap(), F32_VALUES);
        assert_eq!(g.tensor_f32(&bytes, "q41").unwrap()[15], 6.5);

        // No metadata, no tensors.
        let bytes = build(3, &[], &[], 32);
        let g = GgufFile::parse(&bytes).unwrap();
        assert!(g.metadata.is_empty() && g.tensors.is_empty());
    }

    // ---------------------------------------------------------------------
    // Errors.
    // ---------------------------------------------------------------------

    fn parse_err(bytes: &[u8]) -> GgufError {
        match GgufFile::parse(bytes) {
            Ok(_) => panic!("parse unexpectedly succeeded"),
            Err(e) => e,
        }
    }

    #[test]
    fn gguf_rejects_bad_magic_and_version() {
        let mut bytes = valid_file();
        bytes[3] = b'X';
        let e = parse_err(&bytes);
        assert!(
            matches!(e, GgufError::BadMagic { found } if &found == b"GGUX"),
            "{e}"
        );
        assert!(e.to_string().starts_with("bad GGUF magic"), "{e}");

        for version in [0u32, 1, 4, 0x0300_0000] {
            let mut bytes = valid_file();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let e = parse_err(&bytes);
            assert!(
                matches!(e, GgufError::UnsupportedVersion { version: v, .. } if v == version),
                "{e}"
            );
        }
        let mut bytes = valid_file();
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_err(&bytes).to_string().contains("big-endian"));
        let mut bytes = valid_file();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_err(&bytes).to_string(),
            "unsupported GGUF version 1 at offset 4 (supported: 2, 3)"
        );
    }

    #[test]
    fn gguf_rejects_truncated_header() {
        let bytes = valid_file();
        let e = parse_err(&bytes[..10]);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "tensor count",
                    needed: 8,
                    offset: 8,
                    file_len: 10
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "truncated GGUF: needed 8 bytes for tensor count at offset 8, file has 10"
        );
        assert_eq!(
            parse_err(&bytes[..2]).to_string(),
            "truncated GGUF: needed 4 bytes for magic at offset 0, file has 2"
        );
        assert_eq!(
            parse_err(&bytes[..20]).to_string(),
            "truncated GGUF: needed 8 bytes for metadata key-value count at offset 16, file has 20"
        );
        assert!(matches!(parse_err(&[]), GgufError::Truncated { .. }));
    }

    #[test]
    fn gguf_rejects_unknown_value_types() {
        let mut w = W::default();
        w.header(3, 0, 1).str("k").u32(13).u64(0);
        let e = parse_err(&w.0);
        // 24-byte header + 8-byte key length + 1-byte key.
        assert!(
            matches!(
                e,
                GgufError::UnknownValueType {
                    type_id: 13,
                    offset: 33
                }
            ),
            "{e}"
        );
        assert_eq!(e.to_string(), "unknown metadata value type 13 at offset 33");

        let mut w = W::default();
        w.header(3, 0, 1).str("k").u32(9).u32(77).u64(1).u64(0);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::UnknownValueType {
                    type_id: 77,
                    offset: 37
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn gguf_rejects_oversized_lengths_before_allocating() {
        // Key length far larger than the file.
        let mut w = W::default();
        w.header(3, 0, 1).u64(u64::MAX).u32(0).u8(0);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "metadata key",
                    needed: u64::MAX,
                    offset: 32,
                    ..
                }
            ),
            "{e}"
        );

        // String value length larger than the file.
        let mut w = W::default();
        w.header(3, 0, 1).str("k").u32(8).u64(1 << 40).raw(b"abc");
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "string bytes",
                    ..
                }
            ),
            "{e}"
        );

        // u8 array with an absurd count.
        let mut w = W::default();
        w.header(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(0)
            .u64(u64::MAX / 2)
            .raw(&[0; 16]);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "array elements",
                    ..
                }
            ),
            "{e}"
        );

        // u64 array whose byte size overflows.
        let mut w = W::default();
        w.header(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(10)
            .u64(u64::MAX / 4)
            .raw(&[0; 16]);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::LimitExceeded {
                    what: "array length",
                    ..
                }
            ),
            "{e}"
        );

        // Array of strings whose count exceeds what 8-byte lengths could fit.
        let mut w = W::default();
        w.header(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(8)
            .u64(3)
            .u64(0)
            .u64(0);
        assert!(matches!(parse_err(&w.0), GgufError::Truncated { .. }));

        // Counts in the header larger than the file could hold.
        let mut w = W::default();
        w.header(3, 0, u64::MAX).raw(&[0; 64]);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::LimitExceeded {
                    what: "metadata key-value count",
                    offset: 16,
                    limit: 4,
                    ..
                }
            ),
            "{e}"
        );
        let mut w = W::default();
        w.header(3, 1 << 40, 0).raw(&[0; 64]);
        let e = parse_err(&w.0);
        assert!(
            matches!(
                e,
                GgufError::LimitExceeded {
                    what: "tensor count",
                    offset: 8,
                    limit: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "GGUF limit exceeded: tensor count is 1099511627776 at offset 8, limit is 2"
        );
    }

    #[test]
    fn gguf_limits_array_nesting() {
        use MetaValue::*;
        let depth2 = Array(vec![Array(vec![U8(1)])]);
        let bytes = build(3, &[("ok", depth2.clone())], &[], 32);
        assert_eq!(GgufFile::parse(&bytes).unwrap().get("ok"), Some(&depth2));

        let depth3 = Array(vec![Array(vec![Array(vec![U8(1)])])]);
        let bytes = build(3, &[("deep", depth3)], &[], 32);
        let e = parse_err(&bytes);
        assert!(
            matches!(
                e,
                GgufError::LimitExceeded {
                    what: "array nesting depth",
                    value: 3,
                    limit: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn gguf_rejects_duplicates() {
        use MetaValue::*;
        let bytes = build(3, &[("a", U8(1)), ("a", U8(2))], &[], 32);
        assert!(matches!(parse_err(&bytes), GgufError::DuplicateKey { key, .. } if key == "a"));

        let ts = [
            t("w", &[1], 0, f32_data(&[1.0])),
            t("w", &[1], 0, f32_data(&[2.0])),
        ];
        let bytes = build(3, &[], &ts, 32);
        let e = parse_err(&bytes);
        assert!(
            matches!(e, GgufError::DuplicateTensor { ref name, .. } if name == "w"),
            "{e}"
        );
    }

    #[test]
    fn gguf_rejects_bad_tensor_infos() {
        // Data beyond the end of the file.
        let mut ts = vec![t("w", &[4], 0, f32_data(&[1.0; 4]))];
        ts[0].offset_override = Some(64);
        let bytes = build(3, &[], &ts, 32);
        let e = parse_err(&bytes);
        let data_offset = 64u128; // 24 header + 8+1 name + 4 + 8 + 4 + 8 = 57 -> 64
        assert!(
            matches!(e, GgufError::TensorOutOfBounds { start, end, .. } if start == data_offset + 64 && end == data_offset + 80),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "tensor `w` data [128, 144) outside the file of {} bytes",
                bytes.len()
            )
        );

        // Offset that overflows when added to the data offset.
        let mut ts = vec![t("w", &[4], 0, f32_data(&[1.0; 4]))];
        ts[0].offset_override = Some(u64::MAX - 31);
        let e = parse_err(&build(3, &[], &ts, 32));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

        // Misaligned offset.
        let mut ts = vec![t("w", &[4], 0, f32_data(&[1.0; 4]))];
        ts[0].offset_override = Some(4);
        let e = parse_err(&build(3, &[], &ts, 32));
        assert!(matches!(e, GgufError::InvalidTensorInfo { .. }), "{e}");
        assert!(
            e.to_string().contains("not a multiple of the alignment 32"),
            "{e}"
        );

        // Dimension counts outside 1..=4.
        for dims in [&[][..], &[1, 1, 1, 1, 1][..]] {
            let e = parse_err(&build(3, &[], &[t("w", dims, 0, f32_data(&[1.0]))], 32));
            assert!(matches!(e, GgufError::InvalidTensorInfo { .. }), "{e}");
        }

        // Element count overflow.
        let e = parse_err(&build(
            3,
            &[],
            &[t("w", &[1 << 40, 1 << 40], 0, vec![])],
            32,
        ));
        assert!(matches!(e, GgufError::InvalidTensorInfo { .. }), "{e}");

        // Element count fits, byte size does not.
        let e = parse_err(&build(3, &[], &[t("w", &[1 << 61, 4], 0, vec![])], 32));
        assert!(matches!(e, GgufError::TensorTooLarge { .. }), "{e}");

        // Huge but non-overflowing dims: out of bounds, not an allocation.
        let e = parse_err(&build(
            3,
            &[],
            &[t("w", &[1 << 20, 1 << 20], 0, vec![])],
            32,
        ));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

        // Innermost dim not a multiple of the block size.
        let e = parse_err(&build(3, &[], &[t("w", &[16, 2], 8, vec![0; 34])], 32));
        assert!(
            matches!(
                e,
                GgufError::BlockMisaligned {
                    dim: 16,
                    block: 32,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "tensor `w` of type Q8_0: innermost dimension 16 is not a multiple of the block size 32"
        );

        // Unknown ggml type id.
        let e = parse_err(&build(3, &[], &[t("w", &[4], 200, vec![0; 16])], 32));
        assert!(
            matches!(e, GgufError::UnknownTensorType { type_id: 200, .. }),
            "{e}"
        );

        // Tensor name not UTF-8.
        let mut bytes = build(3, &[], &[t("w", &[1], 0, f32_data(&[1.0]))], 32);
        bytes[32] = 0xff; // the name byte
        assert!(matches!(
            parse_err(&bytes),
            GgufError::InvalidUtf8 {
                what: "tensor name",
                offset: 32
            }
        ));
    }

    #[test]
    fn gguf_rejects_bad_alignment() {
        use MetaValue::*;
        for (v, ok) in [
            (U32(0), false),
            (U32(3), false),
            (U32(48), false),
            (U32(16), true),
            (U8(8), true),
            (I32(-32), false),
        ] {
            let bytes = build(3, &[("general.alignment", v.clone())], &[], 16);
            let r = GgufFile::parse(&bytes);
            assert_eq!(r.is_ok(), ok, "{v:?}: {r:?}");
            if !ok {
                assert!(matches!(r, Err(GgufError::InvalidAlignment { .. })));
            }
            if v == I32(-32) {
                assert_eq!(
                    r.unwrap_err().to_string(),
                    "invalid general.alignment -32: must be a nonzero power of two"
                );
            }
        }
        let bytes = build(3, &[("general.alignment", String("32".into()))], &[], 32);
        assert!(matches!(parse_err(&bytes), GgufError::WrongKeyType { .. }));
    }

    #[test]
    fn gguf_decodes_invalid_utf8_values_lossily() {
        let mut w = W::default();
        w.header(3, 0, 1).str("k").u32(8).u64(2).raw(&[b'a', 0xff]);
        let g = GgufFile::parse(&w.0).unwrap();
        assert_eq!(g.get_str("k").unwrap(), "a\u{fffd}");
        // Keys must be valid UTF-8.
        let mut w = W::default();
        w.header(3, 0, 1).u64(1).u8(0xff).u32(0).u8(0);
        assert!(matches!(
            parse_err(&w.0),
            GgufError::InvalidUtf8 {
                what: "metadata key",
                offset: 32
            }
        ));
    }

    // ---------------------------------------------------------------------
    // Robustness.
    // ---------------------------------------------------------------------

    fn exercise(bytes: &[u8]) {
        if let Ok(g) = GgufFile::parse(bytes) {
            for t in &g.tensors {
                let _ = t.byte_len();
                let _ = t.shape_row_major();
                let _ = g.tensor_bytes(bytes, &t.name);
                if let Ok(v) = g.tensor_f32(bytes, &t.name) {
                    assert_eq!(v.len() as u64, t.numel());
                }
            }
            for key in g.metadata.keys() {
                let _ = g.get_str(key);
                let _ = g.get_u32(key);
                let _ = g.get_f32(key);
                let _ = g.get_str_array(key);
                let _ = g.get_i32_array(key);
            }
        }
    }

    #[test]
    fn gguf_every_truncation_fails_cleanly() {
        let bytes = valid_file();
        GgufFile::parse(&bytes).unwrap();
        for len in 0..bytes.len() {
            assert!(
                GgufFile::parse(&bytes[..len]).is_err(),
                "truncated to {len} parsed"
            );
        }
    }

    #[test]
    fn gguf_random_mutations_never_panic() {
        let original = valid_file();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut bytes = original.clone();
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] = match rng.below(4) {
                    0 => 0xff,
                    1 => 0,
                    2 => bytes[i] ^ (1 << rng.below(8)),
                    _ => rng.next() as u8,
                };
            }
            if rng.below(8) == 0 {
                let len = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(len);
            }
            if GgufFile::parse(&bytes).is_ok() {
                parsed += 1;
            }
            exercise(&bytes);
        }
        // Most mutations hit tensor data or values and still parse.
        assert!(parsed > 1000, "only {parsed} mutated files parsed");
    }
}

//! A quantised model file read from disk one tensor at a time (native only), so loading never
//! holds the whole file and the model in memory together: the file's bytes are hashed as a
//! stream, its safetensors header is parsed and checked against the file's length, and each
//! tensor's bytes are read when the model asks for them.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use safetensors::tensor::Metadata;

use super::Tensor;
use crate::{ModelError, Result};

/// The most header bytes read (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The tensors of one safetensors file on disk.
pub(crate) struct DiskTensors {
    /// Read under the lock: a seek and a read make one tensor's read.
    file: Mutex<std::fs::File>,
    pub(crate) meta: Metadata,
    /// Offset of the first tensor byte in the file (after the length and the header).
    data_start: u64,
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Format(format!("{}: {e}", path.display()))
}

impl DiskTensors {
    /// Opens `path`, whose bytes must hash to `expected_sha256`, and parses its header.
    pub(crate) fn open(path: &Path, expected_sha256: &str) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        let actual = crate::catalog::sha256_hex_reader(&mut file).map_err(|e| io(path, e))?;
        if !actual.eq_ignore_ascii_case(expected_sha256) {
            return Err(super::hash_mismatch(&actual, expected_sha256));
        }
        let len = file.metadata().map_err(|e| io(path, e))?.len();
        file.seek(SeekFrom::Start(0)).map_err(|e| io(path, e))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| ModelError::Safetensors("the file is shorter than a header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n.saturating_add(8) > len {
            return Err(ModelError::Safetensors(format!(
                "a header of {n} bytes does not fit a file of {len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| io(path, e))?;
        let header = std::str::from_utf8(&header)
            .map_err(|e| ModelError::Safetensors(format!("header: {e}")))?;
        // Deserialising checks that the tensors' offsets are contiguous and match their shapes.
        let meta: Metadata = serde_json::from_str(header)
            .map_err(|e| ModelError::Safetensors(format!("header: {e}")))?;
        if meta.data_len() as u64 != len - 8 - n {
            return Err(ModelError::Safetensors(format!(
                "the header describes {} bytes of tensors, the file holds {}",
                meta.data_len(),
                len - 8 - n
            )));
        }
        Ok(Self {
            file: Mutex::new(file),
            meta,
            data_start: 8 + n,
        })
    }

    /// Tensor `name`, read from the file; `None` when the file has no such tensor.
    pub(crate) fn read(&self, name: &str) -> Option<Result<Tensor<'static>>> {
        let info = self.meta.info(name)?;
        let (start, end) = info.data_offsets;
        let mut data = vec![0u8; end - start];
        let mut read = || -> std::io::Result<()> {
            let mut file = self
                .file
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            file.seek(SeekFrom::Start(self.data_start + start as u64))?;
            file.read_exact(&mut data)
        };
        Some(
            read()
                .map(|()| Tensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    data: std::borrow::Cow::Owned(data),
                })
                .map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}"))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of two `i32` tensors.
    fn file_bytes() -> Vec<u8> {
        let a: Vec<u8> = (0..6i32).flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = (100..104i32).flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "a",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2, 3], &a)
                    .unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![4], &b).unwrap(),
            ),
        ];
        safetensors::tensor::serialize(views, None).unwrap()
    }

    fn open(bytes: &[u8]) -> Result<DiskTensors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        DiskTensors::open(&path, &crate::catalog::sha256_hex(bytes))
    }

    #[test]
    fn tensors_are_read_from_disk_as_they_are_in_memory() {
        let bytes = file_bytes();
        let disk = open(&bytes).unwrap();
        let memory = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in ["a", "b"] {
            let t = disk.read(name).unwrap().unwrap();
            let view = memory.tensor(name).unwrap();
            assert_eq!(
                (t.dtype, t.shape.as_slice(), &*t.data),
                (view.dtype(), view.shape(), view.data())
            );
        }
        assert!(disk.read("c").is_none());
        assert_eq!(
            crate::catalog::sha256_hex_reader(bytes.as_slice()).unwrap(),
            crate::catalog::sha256_hex(&bytes)
        );
    }

    /// Hostile or damaged files: each gets a precise error, never a panic or a huge read.
    #[test]
    fn a_damaged_file_is_refused_with_what_is_wrong() {
        let good = file_bytes();
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_string();
        let with_header = |h: &str| {
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h.as_bytes());
            b.extend_from_slice(&good[8 + n..]);
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("shorter than a header", good[..5].to_vec()),
            ("does not fit", {
                let mut b = good.clone();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
            ("does not fit", {
                let mut b = good.clone();
                b[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
                b
            }),
            ("the file holds", good[..good.len() - 4].to_vec()),
            ("the file holds", [good.as_slice(), &[0; 4]].concat()),
            ("header", with_header(&header.replace('{', "["))),
            ("header", with_header(&header.replace("[4]", "[5]"))),
            ("header", with_header(&header.replace("I32", "Q9"))),
        ];
        for (expected, bytes) in cases {
            let err = open(&bytes).err().expect(expected).to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &good).unwrap();
        let err = DiskTensors::open(&path, &"0".repeat(64))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("hashes to"), "{err}");
        let err = DiskTensors::open(&dir.path().join("missing"), &"0".repeat(64))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}

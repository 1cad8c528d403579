//! Reading f32 tensors out of a safetensors file with shape checks.

use safetensors::{Dtype, SafeTensors};

use crate::{ModelError, Result, f32_from_le};

pub(crate) struct SafetensorsFile<'a> {
    inner: SafeTensors<'a>,
}

impl<'a> SafetensorsFile<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self> {
        let inner =
            SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
        Ok(Self { inner })
    }

    /// The tensor `name`, checked to have shape `shape` and a type [`Self::f32`] reads.
    fn view(&self, name: &str, shape: &[usize]) -> Result<safetensors::tensor::TensorView<'a>> {
        let view = self.inner.tensor(name).map_err(|e| {
            ModelError::Safetensors(format!("tensor `{name}` is missing or unreadable: {e}"))
        })?;
        if view.shape() != shape {
            return Err(ModelError::Safetensors(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(ModelError::Safetensors(format!(
                "tensor `{name}` has unsupported dtype {:?} (supported: F32, F16, BF16)",
                view.dtype()
            )));
        }
        Ok(view)
    }

    /// Checks the tensor `name` as [`Self::f32`] would, without converting it.
    pub(crate) fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.view(name, shape).map(|_| ())
    }

    /// The tensor `name` as f32, checking that its shape is `shape`.
    pub(crate) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.view(name, shape)?;
        match view.dtype() {
            Dtype::F32 => Ok(f32_from_le(view.data())),
            Dtype::F16 => Ok(view
                .data()
                .chunks_exact(2)
                .map(|c| crate::gguf::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect()),
            Dtype::BF16 => Ok(view
                .data()
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect()),
            other => unreachable!("view() admits F32, F16 and BF16, not {other:?}"),
        }
    }
}

impl SafetensorsFile<'_> {
    pub(crate) fn has(&self, name: &str) -> bool {
        self.inner.tensor(name).is_ok()
    }
}

/// The most files a sharded checkpoint may be split into.
pub const MAX_SHARDS: usize = 256;
/// The most tensors a sharded checkpoint's index may name.
pub const MAX_INDEXED_TENSORS: usize = 1 << 20;

/// One safetensors file from a checkpoint saved in shards (`model.safetensors.index.json`,
/// whose `weight_map` names the shard of every tensor, and the shards `read` returns by file
/// name). Every tensor is checked to be in the shard the index names, and every tensor of a
/// shard to be in the index, so nothing is silently dropped or taken twice; a shard's name must
/// be a plain file name (`*.safetensors`, no folder), so the index cannot reach outside its
/// directory. The caller bounds the shards' total size through `read`.
pub fn merge_shards(
    index: &[u8],
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let bad =
        |what: String| ModelError::Safetensors(format!("model.safetensors.index.json: {what}"));
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| bad(e.to_string()))?;
    let map = index.weight_map;
    if map.is_empty() || map.len() > MAX_INDEXED_TENSORS {
        return Err(bad(format!(
            "its weight_map names {} tensors (1 to {MAX_INDEXED_TENSORS})",
            map.len()
        )));
    }
    let shards: std::collections::BTreeSet<&str> = map.values().map(String::as_str).collect();
    if shards.len() > MAX_SHARDS {
        return Err(bad(format!(
            "{} shards, more than {MAX_SHARDS}",
            shards.len()
        )));
    }
    for shard in &shards {
        let plain = !shard.is_empty()
            && shard.ends_with(".safetensors")
            && !shard.contains(['/', '\\', '\0'])
            && !shard.starts_with('.');
        if !plain {
            return Err(bad(format!(
                "shard `{}` is not a file of the model directory (a plain name ending in \
                 .safetensors)",
                shard.chars().take(100).collect::<String>()
            )));
        }
    }
    let bytes: Vec<(&str, Vec<u8>)> = shards
        .iter()
        .map(|shard| Ok((*shard, read(shard)?)))
        .collect::<Result<_>>()?;
    let mut tensors = Vec::with_capacity(map.len());
    for (shard, data) in &bytes {
        let file = SafeTensors::deserialize(data)
            .map_err(|e| ModelError::Safetensors(format!("shard {shard}: {e}")))?;
        for (name, view) in file.tensors() {
            match map.get(&name) {
                Some(listed) if listed == shard => tensors.push((name, view)),
                Some(listed) => {
                    return Err(bad(format!(
                        "tensor `{name}` is in {shard}, but the index puts it in {listed}"
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "tensor `{name}` of {shard} is not in the index"
                    )));
                }
            }
        }
    }
    if tensors.len() != map.len() {
        let found: std::collections::HashSet<&str> =
            tensors.iter().map(|(n, _)| n.as_str()).collect();
        let (name, shard) = map
            .iter()
            .find(|(n, _)| !found.contains(n.as_str()))
            .expect("fewer tensors found than indexed, each found one indexed once");
        return Err(bad(format!(
            "tensor `{name}` is not in {shard}, where the index puts it"
        )));
    }
    safetensors::serialize(tensors, None).map_err(|e| ModelError::Safetensors(e.to_string()))
}

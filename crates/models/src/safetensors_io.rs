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

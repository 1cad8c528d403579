//! Hidden states between layer-range shards, and their byte format.
//!
//! A shard running layers `[a, b)` of a model takes the hidden states *entering* layer `a` and
//! returns those *entering* layer `b` (layer `n` meaning "after the last layer, before the
//! head"). The bytes are little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TBLA` |
//! | 4 | 2 | format version, `1` |
//! | 6 | 2 | element type, `0` = f32 |
//! | 8 | 4 | `layer`: index of the next layer to run |
//! | 12 | 4 | `batch`: number of sequences |
//! | 16 | 4 | `seq`: rows per sequence (padded length) |
//! | 20 | 4 | `hidden`: values per row |
//! | 24 | 4 | `pos_offset`: absolute position of row 0 (decoders with a KV cache) |
//! | 28 | 4·batch | `lens`: valid rows of each sequence, `1..=seq` |
//! | … | 4·batch·seq·hidden | the rows, sequence-major, f32 |
//!
//! Decoding checks every size against the buffer and against [`MAX_VALUES`] before allocating.

use crate::{ModelError, Result, f32_from_le};

const MAGIC: &[u8; 4] = b"TBLA";
const VERSION: u16 = 1;
const HEADER: usize = 28;
/// Upper bound on `batch * seq * hidden` accepted from the wire (1 GiB of f32).
pub const MAX_VALUES: usize = 1 << 28;

/// Hidden states of a batch of sequences at a layer boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    pub layer: u32,
    pub seq: u32,
    pub hidden: u32,
    pub pos_offset: u32,
    pub lens: Vec<u32>,
    /// `lens.len() * seq * hidden` values.
    pub data: Vec<f32>,
}

fn err(msg: impl Into<String>) -> ModelError {
    ModelError::Activations(msg.into())
}

impl Activations {
    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Checks the internal consistency of the fields.
    pub fn validate(&self) -> Result<()> {
        let (seq, hidden) = (self.seq as usize, self.hidden as usize);
        if self.lens.is_empty() || seq == 0 || hidden == 0 {
            return Err(err(format!(
                "empty activations (batch {}, seq {seq}, hidden {hidden})",
                self.lens.len()
            )));
        }
        if let Some(bad) = self.lens.iter().find(|&&l| l == 0 || l > self.seq) {
            return Err(err(format!("sequence length {bad} outside 1..={seq}")));
        }
        let values = self
            .lens
            .len()
            .checked_mul(seq)
            .and_then(|v| v.checked_mul(hidden))
            .filter(|&v| v <= MAX_VALUES)
            .ok_or_else(|| {
                err(format!(
                    "{} × {seq} × {hidden} values exceed the limit of {MAX_VALUES}",
                    self.lens.len()
                ))
            })?;
        if self.data.len() != values {
            return Err(err(format!(
                "{} values for {} × {seq} × {hidden}",
                self.data.len(),
                self.lens.len()
            )));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 4 * (self.lens.len() + self.data.len()));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        for v in [
            self.layer,
            self.lens.len() as u32,
            self.seq,
            self.hidden,
            self.pos_offset,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for l in &self.lens {
            out.extend_from_slice(&l.to_le_bytes());
        }
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER {
            return Err(err(format!(
                "{} bytes is shorter than the {HEADER}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(err("bad magic (expected `TBLA`)"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        if u16_at(4) != VERSION {
            return Err(err(format!("unsupported version {}", u16_at(4))));
        }
        if u16_at(6) != 0 {
            return Err(err(format!("unsupported element type {}", u16_at(6))));
        }
        let (layer, batch, seq, hidden, pos_offset) = (
            u32_at(8),
            u32_at(12) as usize,
            u32_at(16),
            u32_at(20),
            u32_at(24),
        );
        let values = batch
            .checked_mul(seq as usize)
            .and_then(|v| v.checked_mul(hidden as usize))
            .filter(|&v| v <= MAX_VALUES)
            .ok_or_else(|| {
                err(format!(
                    "{batch} × {seq} × {hidden} values exceed the limit of {MAX_VALUES}"
                ))
            })?;
        let expected = HEADER + 4 * batch + 4 * values;
        if bytes.len() != expected {
            return Err(err(format!(
                "{} bytes, expected {expected} for {batch} × {seq} × {hidden}",
                bytes.len()
            )));
        }
        let lens = (0..batch).map(|b| u32_at(HEADER + 4 * b)).collect();
        let data = f32_from_le(&bytes[HEADER + 4 * batch..]);
        let out = Self {
            layer,
            seq,
            hidden,
            pos_offset,
            lens,
            data,
        };
        out.validate()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Activations {
        Activations {
            layer: 3,
            seq: 2,
            hidden: 3,
            pos_offset: 5,
            lens: vec![2, 1],
            data: (0..12).map(|v| v as f32 * 0.5).collect(),
        }
    }

    #[test]
    fn round_trips() {
        let a = sample();
        assert_eq!(Activations::from_bytes(&a.to_bytes()).unwrap(), a);
    }

    #[test]
    fn rejects_every_truncation_and_corrupt_headers() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            assert!(
                Activations::from_bytes(&bytes[..n]).is_err(),
                "truncated to {n}"
            );
        }
        let mut huge = bytes.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            Activations::from_bytes(&huge)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        let mut zero_len = bytes.clone();
        zero_len[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert!(Activations::from_bytes(&zero_len).is_err());
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(Activations::from_bytes(&magic).is_err());
    }
}

/// Hidden states kept on a backend between layers: the in-process counterpart of
/// [`Activations`], converted with [`Hidden::to_activations`] / [`Hidden::from_activations`].
#[derive(Debug)]
pub struct Hidden<B: tabula_engine::Backend> {
    /// `[batch * seq, hidden]`.
    pub x: B::Tensor,
    pub layer: usize,
    pub seq: usize,
    pub lens: Vec<u32>,
    pub pos_offset: usize,
}

// Manual impl: a derive would demand `B: Clone`, but only the tensor handle is cloned.
impl<B: tabula_engine::Backend> Clone for Hidden<B> {
    fn clone(&self) -> Self {
        Self {
            x: self.x.clone(),
            layer: self.layer,
            seq: self.seq,
            lens: self.lens.clone(),
            pos_offset: self.pos_offset,
        }
    }
}

impl<B: tabula_engine::Backend> Hidden<B> {
    pub async fn to_activations(&self, backend: &B) -> Result<Activations> {
        use tabula_engine::Shaped;
        let hidden = self.x.as_matrix().1;
        Ok(Activations {
            layer: self.layer as u32,
            seq: self.seq as u32,
            hidden: hidden as u32,
            pos_offset: self.pos_offset as u32,
            lens: self.lens.clone(),
            data: backend.read(&self.x).await?,
        })
    }

    pub fn from_activations(backend: &B, a: &Activations) -> Result<Self> {
        a.validate()?;
        let rows = a.batch() * a.seq as usize;
        Ok(Self {
            x: backend.upload(&a.data, &[rows, a.hidden as usize])?,
            layer: a.layer as usize,
            seq: a.seq as usize,
            lens: a.lens.clone(),
            pos_offset: a.pos_offset as usize,
        })
    }
}

/// Checks that a shard for `range` of a model with `layers` layers can take `hidden`.
pub(crate) fn check_range(
    range: &std::ops::Range<usize>,
    layers: usize,
    at: usize,
    hidden: usize,
    want_hidden: usize,
) -> Result<()> {
    if range.start > range.end || range.end > layers {
        return Err(err(format!("layer range {range:?} outside 0..{layers}")));
    }
    if at != range.start {
        return Err(err(format!(
            "activations are at layer {at}, this shard starts at layer {}",
            range.start
        )));
    }
    if hidden != want_hidden {
        return Err(err(format!(
            "activations have width {hidden}, the model {want_hidden}"
        )));
    }
    Ok(())
}

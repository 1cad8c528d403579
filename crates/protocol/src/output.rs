//! The output of a unit: its canonical bytes (what is hashed and signed) and how two outputs
//! are compared. Exact outputs agree when their bytes are equal; fast outputs within the
//! tolerance documented on [`UnitOutput::agrees`].

use serde::{Deserialize, Serialize};

use crate::{Hash, Precision, ProtocolError, Task};

/// What a worker computed for a [`Task`]. Encoded with postcard, which is deterministic, so an
/// honest output has exactly one byte string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum UnitOutput {
    /// Exact embeddings: `q15[s * dim + i]` is component `i` of sequence `s`, in units of 2^-15.
    ExactEmbeddings { dim: u32, q15: Vec<i32> },
    /// Fast (f32) embeddings, laid out like the exact ones.
    FastEmbeddings { dim: u32, values: Vec<f32> },
    /// Generated token ids (a final stop token included when `stopped`), and in exact precision
    /// the SHA-256 of each step's integer logits.
    Generation {
        tokens: Vec<u32>,
        stopped: bool,
        logits_sha256: Vec<Hash>,
    },
}

/// Cosine similarity two fast embeddings of one sequence must reach to agree.
pub const FAST_EMBEDDING_MIN_COSINE: f64 = 0.9999;
/// How far apart the lengths of two fast embeddings of one sequence may be, relatively, to
/// agree (a model that does not normalise: a scaled vector has the cosine of the true one).
pub const FAST_EMBEDDING_MAX_NORM_RATIO: f64 = 1e-3;

impl UnitOutput {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("outputs always serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        match postcard::take_from_bytes(bytes) {
            Ok((out, [])) => Ok(out),
            Ok((_, rest)) => Err(ProtocolError::Malformed(format!(
                "{} trailing bytes after the output",
                rest.len()
            ))),
            Err(e) => Err(ProtocolError::Malformed(format!("output: {e}"))),
        }
    }

    /// Checks that this output has the shape `task` calls for, with `dim` the embedding width
    /// of the task's model. A wrong shape is a wrong answer, never a crash further on.
    pub fn check_shape(&self, task: &Task, dim: usize) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Malformed(m));
        match (task, self) {
            (
                Task::Embed {
                    sequences,
                    precision: Precision::Exact,
                    ..
                },
                UnitOutput::ExactEmbeddings { dim: d, q15 },
            ) => {
                if *d as usize != dim || q15.len() != sequences.len() * dim {
                    return bad(format!("{} values of width {d}", q15.len()));
                }
                if q15.iter().any(|v| v.unsigned_abs() > 1 << 15) {
                    return bad("a Q15 component outside [-1, 1]".into());
                }
            }
            (
                Task::Embed {
                    sequences,
                    precision: Precision::Fast,
                    ..
                },
                UnitOutput::FastEmbeddings { dim: d, values },
            ) => {
                if *d as usize != dim || values.len() != sequences.len() * dim {
                    return bad(format!("{} values of width {d}", values.len()));
                }
                if values.iter().any(|v| !v.is_finite()) {
                    return bad("a non-finite embedding component".into());
                }
            }
            (
                Task::Generate {
                    precision,
                    max_tokens,
                    stop,
                    ..
                },
                UnitOutput::Generation {
                    tokens,
                    stopped,
                    logits_sha256,
                },
            ) => {
                let n = tokens.len();
                if n == 0 || n > *max_tokens as usize {
                    return bad(format!("{n} tokens for max_tokens {max_tokens}"));
                }
                let want_hashes = match precision {
                    Precision::Exact => n,
                    Precision::Fast => 0,
                };
                if logits_sha256.len() != want_hashes {
                    return bad(format!(
                        "{} logit hashes for {n} tokens",
                        logits_sha256.len()
                    ));
                }
                let last_stops = stop.contains(&tokens[n - 1]);
                if *stopped != last_stops || (!stopped && n != *max_tokens as usize) {
                    return bad("the finish does not match the tokens".into());
                }
            }
            _ => return bad("the output is not of the task's kind".into()),
        }
        Ok(())
    }

    /// Whether two outputs of one task agree. Exact outputs must be equal (they are compared by
    /// hash before this is needed); fast embeddings agree when every sequence's vectors have a
    /// cosine of at least [`FAST_EMBEDDING_MIN_COSINE`] and lengths within
    /// [`FAST_EMBEDDING_MAX_NORM_RATIO`]; fast generations when the tokens are
    /// the same (f32 logits that differ in the last bits can flip a near-tie; a flip is
    /// refereed like any disagreement).
    pub fn agrees(&self, other: &UnitOutput) -> bool {
        match (self, other) {
            (
                UnitOutput::FastEmbeddings {
                    dim: a_dim,
                    values: a,
                },
                UnitOutput::FastEmbeddings {
                    dim: b_dim,
                    values: b,
                },
            ) => {
                let dim = *a_dim as usize;
                a_dim == b_dim
                    && a.len() == b.len()
                    && dim > 0
                    && a.chunks_exact(dim).zip(b.chunks_exact(dim)).all(|(x, y)| {
                        cosine(x, y) >= FAST_EMBEDDING_MIN_COSINE
                            && (norm(x) - norm(y)).abs()
                                <= FAST_EMBEDDING_MAX_NORM_RATIO * norm(x).max(norm(y))
                    })
            }
            (
                UnitOutput::Generation {
                    tokens: a,
                    stopped: sa,
                    logits_sha256: ha,
                },
                UnitOutput::Generation {
                    tokens: b,
                    stopped: sb,
                    logits_sha256: hb,
                },
            ) => a == b && sa == sb && ha == hb,
            (a, b) => a == b,
        }
    }
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bytes, FileRef, ModelRef};

    fn embed_task(precision: Precision, n: usize) -> Task {
        Task::Embed {
            model: ModelRef {
                name: "m".into(),
                files: vec![FileRef {
                    role: "exact".into(),
                    sha256: Bytes::default(),
                    size: 1,
                }],
            },
            precision,
            sequences: vec![vec![1, 2]; n],
        }
    }

    #[test]
    fn shapes_are_checked() {
        let t = embed_task(Precision::Exact, 2);
        let ok = UnitOutput::ExactEmbeddings {
            dim: 3,
            q15: vec![1, 2, 3, 4, 5, 6],
        };
        ok.check_shape(&t, 3).unwrap();
        assert!(ok.check_shape(&t, 4).is_err());
        assert!(ok.check_shape(&embed_task(Precision::Exact, 3), 3).is_err());
        assert!(ok.check_shape(&embed_task(Precision::Fast, 2), 3).is_err());
        let too_big = UnitOutput::ExactEmbeddings {
            dim: 3,
            q15: vec![1, 2, 3, 4, 5, 40000],
        };
        assert!(too_big.check_shape(&t, 3).is_err());
        let nan = UnitOutput::FastEmbeddings {
            dim: 1,
            values: vec![f32::NAN, 1.0],
        };
        assert!(nan.check_shape(&embed_task(Precision::Fast, 2), 1).is_err());
    }

    #[test]
    fn fast_embeddings_agree_within_tolerance_only() {
        let a = UnitOutput::FastEmbeddings {
            dim: 2,
            values: vec![0.6, 0.8, 1.0, 0.0],
        };
        let close = UnitOutput::FastEmbeddings {
            dim: 2,
            values: vec![0.6001, 0.7999, 1.0, 0.0001],
        };
        let far = UnitOutput::FastEmbeddings {
            dim: 2,
            values: vec![0.6, 0.8, 0.0, 1.0],
        };
        // The same direction, 2 % longer: a model that does not normalise would differ.
        let scaled = UnitOutput::FastEmbeddings {
            dim: 2,
            values: vec![0.612, 0.816, 1.02, 0.0],
        };
        assert!(a.agrees(&close));
        assert!(!a.agrees(&far));
        assert!(!a.agrees(&scaled));
        assert_eq!(UnitOutput::decode(&a.encode()).unwrap(), a);
        assert!(UnitOutput::decode(&[9, 9, 9]).is_err());
    }
}

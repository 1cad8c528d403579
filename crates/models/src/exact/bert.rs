//! BERT in exact precision: the same graph as [`crate::bert`], in integers. Every op is
//! row-independent except attention, which only reads a sequence's own rows, so a text's
//! embedding does not depend on what it was batched with.

use tabula_engine::{
    AttentionParams,
    exact::{ActTable, ExactBackend, QMatrix, QNorm, ScoreScale},
};

use super::{ExactArch, ExactFile, hash_ints, l2_normalize_q15};
use crate::{
    ModelError, Result,
    bert::{BertConfig, Pooling, batches_by_length, max_pool},
    tokenize::BertTokenizer,
};

struct Layer<T> {
    q: QMatrix<T>,
    k: QMatrix<T>,
    v: QMatrix<T>,
    attn_out: QMatrix<T>,
    ln1: QNorm<T>,
    ffn_in: QMatrix<T>,
    ffn_out: QMatrix<T>,
    ln2: QNorm<T>,
}

/// A quantised BERT encoder on one backend.
pub struct ExactBert<B: ExactBackend> {
    pub config: BertConfig,
    frac: u32,
    group: usize,
    word: QMatrix<B::Int>,
    position: B::Int,
    /// `None` when the model has no token types.
    token_type: Option<B::Int>,
    ln: QNorm<B::Int>,
    gelu: ActTable<B::Int>,
    score: ScoreScale,
    layers: Vec<Layer<B::Int>>,
}

impl<B: ExactBackend> ExactBert<B> {
    pub fn load(backend: &B, file: &ExactFile<'_>) -> Result<Self> {
        let ExactArch::Bert(config) = &file.header.config else {
            return Err(ModelError::Format("not a BERT model".into()));
        };
        let c = config.clone();
        let h = c.hidden_size;
        let ffn = c.intermediate_size;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let m = |name: &str, rows, cols| {
                    file.matrix(backend, &format!("layer.{i}.{name}"), rows, cols, true)
                };
                Ok(Layer {
                    q: m("q", h, h)?,
                    k: m("k", h, h)?,
                    v: m("v", h, h)?,
                    attn_out: m("attn_out", h, h)?,
                    ln1: file.norm(backend, &format!("layer.{i}.ln1"), h, true)?,
                    ffn_in: m("ffn_in", ffn, h)?,
                    ffn_out: m("ffn_out", h, ffn)?,
                    ln2: file.norm(backend, &format!("layer.{i}.ln2"), h, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            frac: file.header.frac_bits,
            group: file.header.group,
            word: file.matrix(backend, "embeddings.word", c.vocab_size, h, false)?,
            position: file.upload(
                backend,
                "embeddings.position",
                &[c.max_position_embeddings, h],
            )?,
            token_type: match c.type_vocab_size {
                0 => None,
                types => Some(file.upload(backend, "embeddings.token_type", &[types, h])?),
            },
            ln: file.norm(backend, "embeddings.ln", h, true)?,
            gelu: file.act_table(backend)?,
            score: file.score_scale(),
            layers,
            config: c,
        })
    }

    /// Pooled (not yet normalised) Fx embeddings of a batch of token sequences, pooled as the
    /// model asks (integer mean, the `[CLS]` row, or the integer maximum: each the same bits
    /// on every backend).
    pub async fn pooled(&self, backend: &B, batch: &[Vec<u32>]) -> Result<Vec<Vec<i32>>> {
        let c = &self.config;
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        if batch.is_empty() || batch.iter().any(Vec::is_empty) {
            return Err(ModelError::Input(
                "every sequence needs at least one token".into(),
            ));
        }
        if seq > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{seq} tokens exceed the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let mut ids = Vec::with_capacity(batch.len() * seq);
        for s in batch {
            ids.extend_from_slice(s);
            ids.resize(ids.len() + seq - s.len(), 0);
        }
        let positions: Vec<u32> = (0..batch.len()).flat_map(|_| 0..seq as u32).collect();
        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
        let mut x = backend.add_int(
            &backend.qembedding(&self.word, &ids)?,
            &backend.gather_int(&self.position, &positions)?,
        )?;
        if let Some(token_type) = &self.token_type {
            let types = vec![0u32; ids.len()];
            x = backend.add_int(&x, &backend.gather_int(token_type, &types)?)?;
        }
        let mut x = backend.norm_int(&x, &self.ln, self.frac)?;
        let heads = c.num_attention_heads;
        let hd = c.hidden_size / heads;
        let params = AttentionParams {
            batch: batch.len(),
            q_len: seq,
            kv_rows: seq,
            heads,
            kv_heads: heads,
            head_dim: hd,
            causal: false,
            pos_offset: 0,
            window: None,
        };
        for l in &self.layers {
            let xq = backend.quantize(&x, self.group)?;
            let q = backend.quantize(&backend.qlinear(&xq, &l.q)?, hd)?;
            let k = backend.quantize(&backend.qlinear(&xq, &l.k)?, hd)?;
            let v = backend.quantize(&backend.qlinear(&xq, &l.v)?, hd)?;
            let a = backend.attention_int(&q, &k, &v, &lens, &params, self.score)?;
            let a = backend.qlinear(&backend.quantize(&a, self.group)?, &l.attn_out)?;
            x = backend.norm_int(&backend.add_int(&a, &x)?, &l.ln1, self.frac)?;
            let f = backend.qlinear(&backend.quantize(&x, self.group)?, &l.ffn_in)?;
            let f = backend.act_int(&f, &self.gelu)?;
            let f = backend.qlinear(&backend.quantize(&f, self.group)?, &l.ffn_out)?;
            x = backend.norm_int(&backend.add_int(&f, &x)?, &l.ln2, self.frac)?;
        }
        let dim = c.hidden_size;
        let rows = |values: Vec<i32>| values.chunks_exact(dim).map(<[i32]>::to_vec).collect();
        Ok(match c.pooling {
            Pooling::Mean => rows(
                backend
                    .read_int(&backend.mean_pool_int(&x, seq, &lens)?)
                    .await?,
            ),
            Pooling::Cls => {
                let first: Vec<u32> = (0..batch.len()).map(|b| (b * seq) as u32).collect();
                rows(backend.read_int(&backend.gather_int(&x, &first)?).await?)
            }
            Pooling::Max => max_pool(&backend.read_int(&x).await?, dim, seq, &lens, i32::max),
        })
    }
}

impl<B: ExactBackend> ExactBert<B> {
    /// Sentence embeddings of token sequences, in input order, `batch_size` per forward pass
    /// at most (batched by length; batching never changes bits). Needs no tokenizer: this is
    /// what a worker runs on the token ids of a unit.
    pub async fn embed_ids(
        &self,
        backend: &B,
        ids: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<ExactEmbedding>> {
        let mut out = vec![None; ids.len()];
        for chunk in &batches_by_length(ids, batch_size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, pooled) in chunk.iter().zip(self.pooled(backend, &batch).await?) {
                let q15 = if self.config.normalize {
                    l2_normalize_q15(&pooled)
                } else {
                    fx_to_q15(&pooled, self.frac)
                };
                out[i] = Some(ExactEmbedding {
                    input_ids: ids[i].clone(),
                    sha256: hash_ints(&q15),
                    q15,
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Fx values with `frac` fractional bits in Q15, rounded half away from zero (host code).
fn fx_to_q15(v: &[i32], frac: u32) -> Vec<i32> {
    v.iter()
        .map(|&x| {
            let x = i64::from(x);
            let q = match frac.checked_sub(15) {
                Some(0) => x,
                Some(shift) => x.signum() * ((x.abs() + (1i64 << (shift - 1))) >> shift),
                None => x << (15 - frac),
            };
            q.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
        })
        .collect()
}

/// One text embedded in exact precision.
#[derive(Clone, Debug, PartialEq)]
pub struct ExactEmbedding {
    pub input_ids: Vec<u32>,
    /// The sentence vector in Q15: component `i` is `q15[i] / 32768` (a unit vector when the
    /// model normalises).
    pub q15: Vec<i32>,
    /// SHA-256 of `q15` as little-endian `i32`s: what redundant executions compare.
    pub sha256: String,
}

impl ExactEmbedding {
    /// The scale of [`Self::q15`]: `2^-15`.
    pub const SCALE: f64 = 1.0 / 32768.0;

    pub fn to_f32(&self) -> Vec<f32> {
        self.q15
            .iter()
            .map(|&v| (v as f64 * Self::SCALE) as f32)
            .collect()
    }
}

/// Tokenizer + exact BERT: texts in, integer sentence embeddings out.
pub struct ExactEmbedder<B: ExactBackend> {
    pub model: ExactBert<B>,
    pub tokenizer: BertTokenizer,
    pub batch_size: usize,
}

impl<B: ExactBackend> ExactEmbedder<B> {
    pub fn load(backend: &B, file: &ExactFile<'_>, tokenizer_json: &[u8]) -> Result<Self> {
        let model = ExactBert::load(backend, file)?;
        let max_len = model.config.max_tokens();
        Ok(Self {
            model,
            tokenizer: BertTokenizer::from_json(tokenizer_json, max_len)?,
            batch_size: 32,
        })
    }

    /// Embeds token sequences in input order (batched by length; batching never changes bits).
    pub async fn embed_ids(&self, backend: &B, ids: &[Vec<u32>]) -> Result<Vec<ExactEmbedding>> {
        self.model.embed_ids(backend, ids, self.batch_size).await
    }

    pub async fn embed(
        &self,
        backend: &B,
        texts: &[impl AsRef<str>],
    ) -> Result<Vec<ExactEmbedding>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(backend, &ids).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fx_values_round_half_away_from_zero_into_q15() {
        assert_eq!(
            super::fx_to_q15(&[3, -3, 2, -2, 1, 0], 16),
            [2, -2, 1, -1, 1, 0]
        );
        assert_eq!(super::fx_to_q15(&[7, -7], 15), [7, -7]);
        assert_eq!(super::fx_to_q15(&[7, -7], 14), [14, -14]);
        assert_eq!(super::fx_to_q15(&[i32::MAX], 10), [i32::MAX]);
    }
}

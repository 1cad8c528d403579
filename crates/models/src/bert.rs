//! BERT encoder (all-MiniLM-L6-v2 and other BERT safetensors) for sentence embeddings:
//! embeddings → N post-LayerNorm transformer layers → mean pooling over the real tokens → L2
//! normalisation, as sentence-transformers computes it.

use std::ops::Range;

use serde::Deserialize;
use tabula_engine::{AttentionParams, Backend, Shaped};

use crate::{
    ModelError, Result,
    activations::{Hidden, check_range},
    safetensors_io::SafetensorsFile,
    tokenize::BertTokenizer,
};

/// The fields of a Hugging Face BERT `config.json` that the forward pass needs.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let c: Self = serde_json::from_slice(bytes)
            .map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
        if c.hidden_size == 0
            || c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads)
        {
            return Err(ModelError::Format(format!(
                "config.json: {} heads do not divide width {}",
                c.num_attention_heads, c.hidden_size
            )));
        }
        if c.hidden_act != "gelu" {
            return Err(ModelError::Format(format!(
                "config.json: activation `{}` is not supported (gelu only)",
                c.hidden_act
            )));
        }
        Ok(c)
    }
}

struct Embeddings<B: Backend> {
    word: B::Tensor,
    position: B::Tensor,
    token_type: B::Tensor,
    ln_gamma: B::Tensor,
    ln_beta: B::Tensor,
}

struct Layer<B: Backend> {
    q: (B::Tensor, B::Tensor),
    k: (B::Tensor, B::Tensor),
    v: (B::Tensor, B::Tensor),
    attn_out: (B::Tensor, B::Tensor),
    ln1: (B::Tensor, B::Tensor),
    ffn_in: (B::Tensor, B::Tensor),
    ffn_out: (B::Tensor, B::Tensor),
    ln2: (B::Tensor, B::Tensor),
}

/// The weights of layers `range` of a BERT model (plus the embeddings when the range starts at
/// layer 0), resident on one backend.
pub struct BertModel<B: Backend> {
    pub config: BertConfig,
    range: Range<usize>,
    embeddings: Option<Embeddings<B>>,
    layers: Vec<Layer<B>>,
}

impl<B: Backend> BertModel<B> {
    /// Loads all layers.
    pub fn load(backend: &B, safetensors: &[u8], config: BertConfig) -> Result<Self> {
        let n = config.num_hidden_layers;
        Self::load_layers(backend, safetensors, config, 0..n)
    }

    /// Loads only what layers `range` need.
    pub fn load_layers(
        backend: &B,
        safetensors: &[u8],
        config: BertConfig,
        range: Range<usize>,
    ) -> Result<Self> {
        if range.start > range.end || range.end > config.num_hidden_layers {
            return Err(ModelError::Input(format!(
                "layer range {range:?} outside 0..{}",
                config.num_hidden_layers
            )));
        }
        let file = SafetensorsFile::parse(safetensors)?;
        let h = config.hidden_size;
        // sentence-transformers checkpoints have no `bert.` prefix; Hugging Face ones do.
        let prefix = if file.has("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let load = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            Ok(backend.upload(&file.f32(&format!("{prefix}{name}"), shape)?, shape)?)
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<(B::Tensor, B::Tensor)> {
            Ok((
                load(&format!("{name}.weight"), &[out, inp])?,
                load(&format!("{name}.bias"), &[out])?,
            ))
        };
        let norm = |name: &str| -> Result<(B::Tensor, B::Tensor)> {
            Ok((
                load(&format!("{name}.weight"), &[h])?,
                load(&format!("{name}.bias"), &[h])?,
            ))
        };
        let embeddings = if range.start == 0 {
            let (ln_gamma, ln_beta) = norm("embeddings.LayerNorm")?;
            Some(Embeddings {
                word: load("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
                position: load(
                    "embeddings.position_embeddings.weight",
                    &[config.max_position_embeddings, h],
                )?,
                token_type: load(
                    "embeddings.token_type_embeddings.weight",
                    &[config.type_vocab_size, h],
                )?,
                ln_gamma,
                ln_beta,
            })
        } else {
            None
        };
        let ffn = config.intermediate_size;
        let layers = range
            .clone()
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    q: linear(&format!("{p}.attention.self.query"), h, h)?,
                    k: linear(&format!("{p}.attention.self.key"), h, h)?,
                    v: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    ln1: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    ffn_in: linear(&format!("{p}.intermediate.dense"), ffn, h)?,
                    ffn_out: linear(&format!("{p}.output.dense"), h, ffn)?,
                    ln2: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            range,
            embeddings,
            layers,
        })
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Token, position and type embeddings of a padded batch: the hidden states entering
    /// layer 0. Needs a model loaded from layer 0.
    pub fn embed_tokens(&self, backend: &B, batch: &[Vec<u32>]) -> Result<Hidden<B>> {
        let e = self.embeddings.as_ref().ok_or_else(|| {
            ModelError::Input("this shard does not hold the embeddings (layer 0)".into())
        })?;
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        if batch.is_empty() || batch.iter().any(Vec::is_empty) {
            return Err(ModelError::Input(
                "every sequence needs at least one token".into(),
            ));
        }
        if seq > self.config.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{seq} tokens exceed the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let mut ids = Vec::with_capacity(batch.len() * seq);
        for seq_ids in batch {
            ids.extend_from_slice(seq_ids);
            ids.resize(ids.len() + seq - seq_ids.len(), 0);
        }
        let positions: Vec<u32> = (0..batch.len()).flat_map(|_| 0..seq as u32).collect();
        let types = vec![0u32; ids.len()];
        let x = backend.add(
            &backend.embedding(&e.word, &ids)?,
            &backend.embedding(&e.position, &positions)?,
        )?;
        let x = backend.add(&x, &backend.embedding(&e.token_type, &types)?)?;
        let x = backend.layer_norm(&x, &e.ln_gamma, &e.ln_beta, self.config.layer_norm_eps)?;
        Ok(Hidden {
            x,
            layer: 0,
            seq,
            lens: batch.iter().map(|s| s.len() as u32).collect(),
            pos_offset: 0,
        })
    }

    /// Runs every loaded layer on `h`, which must be at this shard's first layer.
    pub fn run_layers(&self, backend: &B, h: Hidden<B>) -> Result<Hidden<B>> {
        let c = &self.config;
        check_range(
            &self.range,
            c.num_hidden_layers,
            h.layer,
            h.x.as_matrix().1,
            c.hidden_size,
        )?;
        let heads = c.num_attention_heads;
        let params = AttentionParams {
            batch: h.lens.len(),
            q_len: h.seq,
            kv_rows: h.seq,
            heads,
            kv_heads: heads,
            head_dim: c.hidden_size / heads,
            causal: false,
            pos_offset: 0,
            window: None,
        };
        // The texts of a batch are padded to the longest, but only attention needs that
        // layout: every other op works row by row. So the rows are packed down to the real
        // tokens, which saves the linear layers (most of the work) from computing padding, and
        // attention gets its padded view through a row gather (`embedding` with row indices).
        let layout = RowLayout::new(h.seq, &h.lens);
        let gather = |t: &B::Tensor, rows: &Option<Vec<u32>>| match rows {
            Some(rows) => backend.embedding(t, rows),
            None => Ok(t.clone()),
        };
        let mut x = gather(&h.x, &layout.to_packed)?;
        for layer in &self.layers {
            let q = backend.linear(&x, &layer.q.0, Some(&layer.q.1))?;
            let k = backend.linear(&x, &layer.k.0, Some(&layer.k.1))?;
            let v = backend.linear(&x, &layer.v.0, Some(&layer.v.1))?;
            let (q, k, v) = (
                gather(&q, &layout.to_padded)?,
                gather(&k, &layout.to_padded)?,
                gather(&v, &layout.to_padded)?,
            );
            let a = backend.attention(&q, &k, &v, &h.lens, &params)?;
            let a = gather(&a, &layout.to_packed)?;
            let a = backend.linear(&a, &layer.attn_out.0, Some(&layer.attn_out.1))?;
            x = backend.layer_norm(
                &backend.add(&a, &x)?,
                &layer.ln1.0,
                &layer.ln1.1,
                c.layer_norm_eps,
            )?;
            let f = backend.linear_gelu(&x, &layer.ffn_in.0, Some(&layer.ffn_in.1))?;
            let f = backend.linear(&f, &layer.ffn_out.0, Some(&layer.ffn_out.1))?;
            x = backend.layer_norm(
                &backend.add(&f, &x)?,
                &layer.ln2.0,
                &layer.ln2.1,
                c.layer_norm_eps,
            )?;
        }
        Ok(Hidden {
            x: gather(&x, &layout.to_padded)?,
            layer: self.range.end,
            ..h
        })
    }

    /// Sentence embeddings from the final hidden states: mean over each sequence's real
    /// tokens, then L2 normalisation.
    pub async fn pool(&self, backend: &B, h: &Hidden<B>) -> Result<Vec<Vec<f32>>> {
        if h.layer != self.config.num_hidden_layers {
            return Err(ModelError::Input(format!(
                "pooling needs the output of the last layer, got layer {}",
                h.layer
            )));
        }
        let pooled = backend.mean_pool(&h.x, h.seq, &h.lens)?;
        let dim = pooled.as_matrix().1;
        let values = backend.read(&pooled).await?;
        Ok(values.chunks_exact(dim).map(l2_normalize).collect())
    }
}

/// Row maps between a padded batch (`seq` rows per text) and its real tokens packed end to end.
/// Both are `None` when no text is padded.
struct RowLayout {
    /// For each packed row, its row in the padded batch.
    to_packed: Option<Vec<u32>>,
    /// For each padded row, a packed row: its own token, or for padding the text's last token
    /// (any real row would do: attention masks padded keys, and padded queries are dropped).
    to_padded: Option<Vec<u32>>,
}

impl RowLayout {
    fn new(seq: usize, lens: &[u32]) -> Self {
        if lens.iter().all(|&l| l as usize == seq) {
            return Self {
                to_packed: None,
                to_padded: None,
            };
        }
        let mut to_packed = Vec::new();
        let mut to_padded = Vec::with_capacity(lens.len() * seq);
        for (b, &len) in lens.iter().enumerate() {
            let first = to_packed.len() as u32;
            to_packed.extend((0..len).map(|t| (b * seq) as u32 + t));
            to_padded.extend((0..seq as u32).map(|t| first + t.min(len.max(1) - 1)));
        }
        Self {
            to_packed: Some(to_packed),
            to_padded: Some(to_padded),
        }
    }
}

/// `v / max(‖v‖, 1e-12)`, as `torch.nn.functional.normalize`.
pub fn l2_normalize(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// One embedded text.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub input_ids: Vec<u32>,
    pub vector: Vec<f32>,
}

/// Tokenizer + BERT model: texts in, sentence embeddings out.
pub struct SentenceEmbedder<B: Backend> {
    pub model: BertModel<B>,
    pub tokenizer: BertTokenizer,
    /// Sequences per forward pass.
    pub batch_size: usize,
}

/// Groups sequences (by index) into forward passes: longest first, at most `batch_size` per
/// pass, and a pass closes early once padding to its longest sequence would exceed 64 tokens
/// per slot, so one long text does not make 31 short ones pay for 256 positions.
pub(crate) fn batches_by_length(ids: &[Vec<u32>], batch_size: usize) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let budget = batch_size * 64;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match batches.last_mut() {
            Some(b)
                if b.len() < batch_size
                    && ids[b[0]].len() * (b.len() + 1) <= budget.max(ids[b[0]].len()) =>
            {
                b.push(i)
            }
            _ => batches.push(vec![i]),
        }
    }
    batches
}

impl<B: Backend> BertModel<B> {
    /// Mean-pooled, L2-normalised sentence embeddings of token sequences, in input order, at
    /// most `batch_size` per forward pass. Needs no tokenizer (a worker gets token ids).
    pub async fn embed_ids(
        &self,
        backend: &B,
        ids: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in &batches_by_length(ids, batch_size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let h = self.run_layers(backend, self.embed_tokens(backend, &batch)?)?;
            for (&i, v) in chunk.iter().zip(self.pool(backend, &h).await?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

/// Maximum tokens per text, as sentence-transformers' `max_seq_length` for MiniLM.
pub const MAX_SEQ_LEN: usize = 256;

impl<B: Backend> SentenceEmbedder<B> {
    /// From the three files of a BERT sentence-embedding model.
    pub fn load(
        backend: &B,
        config_json: &[u8],
        safetensors: &[u8],
        tokenizer_json: &[u8],
    ) -> Result<Self> {
        let config = BertConfig::from_json(config_json)?;
        let max_len = MAX_SEQ_LEN.min(config.max_position_embeddings);
        Ok(Self {
            model: BertModel::load(backend, safetensors, config)?,
            tokenizer: BertTokenizer::from_json(tokenizer_json, max_len)?,
            batch_size: 32,
        })
    }

    pub fn tokenize(&self, texts: &[impl AsRef<str>]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect()
    }

    /// Embeds token sequences in input order. Sequences are grouped by length so that padding
    /// stays small.
    pub async fn embed_ids(&self, backend: &B, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.model.embed_ids(backend, ids, self.batch_size).await
    }

    pub async fn embed(&self, backend: &B, texts: &[impl AsRef<str>]) -> Result<Vec<Embedding>> {
        let ids = self.tokenize(texts)?;
        let vectors = self.embed_ids(backend, &ids).await?;
        Ok(ids
            .into_iter()
            .zip(vectors)
            .map(|(input_ids, vector)| Embedding { input_ids, vector })
            .collect())
    }
}

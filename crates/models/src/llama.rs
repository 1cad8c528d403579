//! Llama-family decoder (SmolLM2 and other GGUF Llama models): RMSNorm, rotary embeddings,
//! grouped-query attention with a KV cache, SwiGLU, tied or separate output head.
//!
//! Weights come from GGUF and are dequantised to f32 at load ("fast" precision). GGUF stores Q
//! and K rows permuted for llama.cpp's adjacent-pair rotary layout, which is the layout
//! [`tabula_engine::Backend::rope`] implements, so no un-permuting is needed.

use std::ops::Range;

use tabula_engine::{AttentionParams, Backend, Shaped};

use crate::{
    ModelError, Result,
    activations::{Hidden, check_range},
    gguf::GgufFile,
    sampling::Sampler,
    tokenize::LlamaTokenizer,
};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Format(format!(
                "architecture `{arch}` is not supported (llama only)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let dim = gguf.get_u32(&key("embedding_length"))? as usize;
        let heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let kv_heads = gguf
            .get_u32(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(heads);
        if heads == 0
            || kv_heads == 0
            || !dim.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
        {
            return Err(ModelError::Format(format!(
                "inconsistent heads: {heads} heads, {kv_heads} KV heads, width {dim}"
            )));
        }
        let vocab_size = gguf
            .tensor("token_embd.weight")
            .map(|t| t.shape_row_major()[0])
            .ok_or_else(|| ModelError::Format("missing tensor token_embd.weight".into()))?;
        Ok(Self {
            vocab_size,
            dim,
            layers: gguf.get_u32(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim: dim / heads,
            ffn_dim: gguf.get_u32(&key("feed_forward_length"))? as usize,
            rms_eps: gguf
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            context_length: gguf
                .get_u32(&key("context_length"))
                .map(|v| v as usize)
                .unwrap_or(2048),
        })
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    wq: B::Tensor,
    wk: B::Tensor,
    wv: B::Tensor,
    wo: B::Tensor,
    ffn_norm: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    down: B::Tensor,
}

/// Layers `range` of a Llama model on one backend, plus the token embeddings when the range
/// starts at 0 and the output head when it ends at the last layer.
pub struct LlamaModel<B: Backend> {
    pub config: LlamaConfig,
    range: Range<usize>,
    token_embd: Option<B::Tensor>,
    output_norm: Option<B::Tensor>,
    /// `None` with tied embeddings (the head reuses `token_embd`).
    output: Option<B::Tensor>,
    layers: Vec<Layer<B>>,
}

/// Keys and values of past positions for the layers of one shard.
pub struct KvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<B: Backend> LlamaModel<B> {
    pub fn load(backend: &B, gguf: &GgufFile, bytes: &[u8]) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf)?;
        let n = config.layers;
        Self::load_layers(backend, gguf, bytes, 0..n)
    }

    pub fn load_layers(
        backend: &B,
        gguf: &GgufFile,
        bytes: &[u8],
        range: Range<usize>,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(gguf)?;
        if range.start > range.end || range.end > config.layers {
            return Err(ModelError::Input(format!(
                "layer range {range:?} outside 0..{}",
                config.layers
            )));
        }
        let load = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            let info = gguf
                .tensor(name)
                .ok_or_else(|| ModelError::Format(format!("missing tensor `{name}`")))?;
            if info.shape_row_major() != shape {
                return Err(ModelError::Format(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    info.shape_row_major()
                )));
            }
            Ok(backend.upload(&gguf.tensor_f32(bytes, name)?, shape)?)
        };
        let (d, kv, ffn, vocab) = (
            config.dim,
            config.kv_dim(),
            config.ffn_dim,
            config.vocab_size,
        );
        let is_last = range.end == config.layers;
        let token_embd = if range.start == 0 || (is_last && gguf.tensor("output.weight").is_none())
        {
            Some(load("token_embd.weight", &[vocab, d])?)
        } else {
            None
        };
        let output = if is_last && gguf.tensor("output.weight").is_some() {
            Some(load("output.weight", &[vocab, d])?)
        } else {
            None
        };
        let output_norm = if is_last {
            Some(load("output_norm.weight", &[d])?)
        } else {
            None
        };
        let layers = range
            .clone()
            .map(|i| {
                let t =
                    |name: &str, shape: &[usize]| load(&format!("blk.{i}.{name}.weight"), shape);
                Ok(Layer {
                    attn_norm: t("attn_norm", &[d])?,
                    wq: t("attn_q", &[d, d])?,
                    wk: t("attn_k", &[kv, d])?,
                    wv: t("attn_v", &[kv, d])?,
                    wo: t("attn_output", &[d, d])?,
                    ffn_norm: t("ffn_norm", &[d])?,
                    gate: t("ffn_gate", &[ffn, d])?,
                    up: t("ffn_up", &[ffn, d])?,
                    down: t("ffn_down", &[d, ffn])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            range,
            token_embd,
            output_norm,
            output,
            layers,
        })
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// An empty KV cache for this shard's layers holding up to `capacity` positions.
    pub fn new_cache(&self, backend: &B, capacity: usize) -> Result<KvCache<B>> {
        let capacity = capacity.clamp(1, self.config.context_length.max(1));
        let shape = [capacity, self.config.kv_dim()];
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(backend.zeros(&shape)?);
            v.push(backend.zeros(&shape)?);
        }
        Ok(KvCache { k, v, capacity })
    }

    /// Embeddings of `ids` at positions `pos_offset..`: the hidden states entering layer 0.
    pub fn embed_tokens(&self, backend: &B, ids: &[u32], pos_offset: usize) -> Result<Hidden<B>> {
        let table = self.token_embd.as_ref().filter(|_| self.range.start == 0);
        let table = table.ok_or_else(|| {
            ModelError::Input("this shard does not hold the embeddings (layer 0)".into())
        })?;
        if ids.is_empty() {
            return Err(ModelError::Input("no tokens".into()));
        }
        Ok(Hidden {
            x: backend.embedding(table, ids)?,
            layer: 0,
            seq: ids.len(),
            lens: vec![ids.len() as u32],
            pos_offset,
        })
    }

    /// Runs this shard's layers on `h` (one sequence), appending its keys and values to `cache`.
    pub fn run_layers(
        &self,
        backend: &B,
        h: Hidden<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Hidden<B>> {
        let c = &self.config;
        check_range(&self.range, c.layers, h.layer, h.x.as_matrix().1, c.dim)?;
        if h.lens.len() != 1 {
            return Err(ModelError::Input(
                "the decoder runs one sequence at a time".into(),
            ));
        }
        let n = h.seq;
        let total = h.pos_offset + n;
        if total > cache.capacity || cache.k.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "{total} positions exceed the KV cache of {}",
                cache.capacity
            )));
        }
        let params = AttentionParams {
            batch: 1,
            q_len: n,
            kv_rows: cache.capacity,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            causal: true,
            pos_offset: h.pos_offset,
        };
        let mut x = h.x;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = backend.rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = backend.rope(
                &backend.linear(&a, &layer.wq, None)?,
                c.head_dim,
                h.pos_offset,
                c.rope_theta,
            )?;
            let k = backend.rope(
                &backend.linear(&a, &layer.wk, None)?,
                c.head_dim,
                h.pos_offset,
                c.rope_theta,
            )?;
            let v = backend.linear(&a, &layer.wv, None)?;
            backend.write_rows(&mut cache.k[i], h.pos_offset, &k)?;
            backend.write_rows(&mut cache.v[i], h.pos_offset, &v)?;
            let att = backend.attention(&q, &cache.k[i], &cache.v[i], &[total as u32], &params)?;
            x = backend.add(&x, &backend.linear(&att, &layer.wo, None)?)?;
            let f = backend.rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let g = backend.silu_mul(
                &backend.linear(&f, &layer.gate, None)?,
                &backend.linear(&f, &layer.up, None)?,
            )?;
            x = backend.add(&x, &backend.linear(&g, &layer.down, None)?)?;
        }
        Ok(Hidden {
            x,
            layer: self.range.end,
            ..h
        })
    }

    /// Logits of the last row of the final hidden states: `[1, vocab]`, still on the device.
    pub fn head(&self, backend: &B, h: &Hidden<B>) -> Result<B::Tensor> {
        if h.layer != self.config.layers {
            return Err(ModelError::Input(format!(
                "the head needs the output of the last layer, got layer {}",
                h.layer
            )));
        }
        let norm = self
            .output_norm
            .as_ref()
            .ok_or_else(|| ModelError::Input("this shard does not hold the output head".into()))?;
        let w = self
            .output
            .as_ref()
            .or(self.token_embd.as_ref())
            .ok_or_else(|| ModelError::Input("no output weights".into()))?;
        let last = backend.slice_rows(&h.x, h.seq - 1, 1)?;
        Ok(backend.linear(
            &backend.rms_norm(&last, norm, self.config.rms_eps)?,
            w,
            None,
        )?)
    }
}

/// Tokenizer + full model: text generation.
pub struct Generator<B: Backend> {
    pub model: LlamaModel<B>,
    pub tokenizer: LlamaTokenizer,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-sequence / end-of-turn token.
    Stop,
    /// `max_tokens` were produced.
    Length,
}

impl<B: Backend> Generator<B> {
    pub fn load(backend: &B, gguf_bytes: &[u8]) -> Result<Self> {
        let gguf = GgufFile::parse(gguf_bytes)?;
        let tokenizer = LlamaTokenizer::from_gguf(&gguf)?;
        let model = LlamaModel::load(backend, &gguf, gguf_bytes)?;
        if tokenizer.vocab_size() > model.config.vocab_size {
            return Err(ModelError::Format(format!(
                "tokenizer has {} tokens, the embedding table {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        Ok(Self { model, tokenizer })
    }

    /// Prompt ids for `prompt`, through the chat template when `chat`.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            self.tokenizer.encode(&self.tokenizer.chat_prompt(prompt)?)
        } else {
            self.tokenizer.encode(prompt)
        }
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id as
    /// soon as it is chosen. A stop token ends generation: it is the last id returned (as
    /// Hugging Face's `generate` does) but is not passed to `on_token`.
    pub async fn generate(
        &self,
        backend: &B,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, Finish)> {
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.model.config.vocab_size
            )));
        }
        let capacity = prompt.len() + max_tokens;
        if capacity > self.model.config.context_length {
            return Err(ModelError::Input(format!(
                "{} prompt tokens + {max_tokens} new tokens exceed the model's context of {}",
                prompt.len(),
                self.model.config.context_length
            )));
        }
        let mut cache = self.model.new_cache(backend, capacity)?;
        let mut out = Vec::new();
        let mut next_input = prompt.to_vec();
        let mut pos = 0;
        while out.len() < max_tokens {
            let h = self.model.embed_tokens(backend, &next_input, pos)?;
            let h = self.model.run_layers(backend, h, &mut cache)?;
            let logits = backend.read(&self.model.head(backend, &h)?).await?;
            pos += next_input.len();
            let token = sampler.pick(&logits);
            if self.tokenizer.stop.contains(&token) {
                out.push(token);
                return Ok((out, Finish::Stop));
            }
            out.push(token);
            on_token(token);
            next_input = vec![token];
        }
        Ok((out, Finish::Length))
    }
}

//! Llama in exact precision: the graph of [`crate::llama`] in integers. The KV cache holds Fx
//! keys and values; they are quantised per (row, head) when read, so a row's cached value never
//! depends on how the prompt was split into steps.

use std::ops::Range;

use tabula_engine::{
    AttentionParams, Shaped,
    exact::{ActTable, ExactBackend, QActs, QMatrix, QNorm, RopeTable, ScoreScale, WeightLayout},
};

use super::{ExactArch, ExactFile, hash_ints};
use crate::{
    ModelError, Result,
    llama::{Finish, LlamaConfig},
    sampling::ExactSampler,
    tokenize::LlamaTokenizer,
};

struct Layer<T> {
    attn_norm: QNorm<T>,
    wq: QMatrix<T>,
    wk: QMatrix<T>,
    wv: QMatrix<T>,
    wo: QMatrix<T>,
    ffn_norm: QNorm<T>,
    gate: QMatrix<T>,
    up: QMatrix<T>,
    down: QMatrix<T>,
    gemma: Option<GemmaNorms<T>>,
}

/// Gemma 3's extra norms of one layer (see [`crate::llama`]).
struct GemmaNorms<T> {
    /// Over each query / key head, in the engine's rotary layout.
    q: QNorm<T>,
    k: QNorm<T>,
    post_attention: QNorm<T>,
    post_ffw: QNorm<T>,
}

/// The last stage's final norm and output matrix.
struct Head<T> {
    norm: QNorm<T>,
    output: QRows<T>,
}

/// A `[rows, cols]` int8 matrix (the token embeddings, the output head) held as blocks of
/// rows that each fit one tensor of the backend: Gemma 3's 262 144 × 640 table is 168 MB, a
/// GPU storage binding often 128 MiB. Every output value is computed as with one block, so
/// the bits do not depend on the split.
struct QRows<T> {
    /// Rows `[i · block_rows, (i + 1) · block_rows)` in block `i`; the last may be shorter.
    blocks: Vec<QMatrix<T>>,
    block_rows: usize,
    rows: usize,
}

impl<T: Clone + Shaped> QRows<T> {
    /// Matrix `name` of `file` (`name.q`) with the requantisation `requant` (`name.requant`,
    /// or the tied head's `output.requant` over the embedding rows).
    fn load<B: ExactBackend<Int = T>>(
        backend: &B,
        file: &ExactFile<'_>,
        name: &str,
        requant: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let scales = file.weight_blocks(cols)?;
        let words = cols / 4;
        let block_rows = (backend.max_int_values() / words.max(1)).clamp(1, rows.max(1));
        let data = file.ints(&format!("{name}.q"), rows * words)?;
        let requant = file.ints(requant, rows * scales * 2)?;
        let blocks = data
            .chunks(block_rows * words)
            .zip(requant.chunks(block_rows * scales * 2))
            .map(|(d, r)| {
                let n = d.len() / words;
                Ok(backend.prepare_qmatrix(QMatrix {
                    rows: n,
                    cols,
                    group: cols / scales,
                    data: backend.upload_int(d, &[n, words])?,
                    requant: backend.upload_int(r, &[n, scales, 2])?,
                    bias: None,
                    layout: WeightLayout::Rows,
                })?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            block_rows,
            rows,
        })
    }

    /// The same int8 rows (shared, not copied) with the requantisation `requant`: a tied
    /// head over the embedding rows.
    fn with_requant<B: ExactBackend<Int = T>>(
        &self,
        backend: &B,
        file: &ExactFile<'_>,
        requant: &str,
    ) -> Result<Self> {
        let cols = self.blocks[0].cols;
        let scales = file.weight_blocks(cols)?;
        let all = file.ints(requant, self.rows * scales * 2)?;
        let blocks = self
            .blocks
            .iter()
            .zip(all.chunks(self.block_rows * scales * 2))
            .map(|(block, r)| {
                let r = backend.upload_int(r, &[block.rows, scales, 2])?;
                Ok(backend.with_requant(block, r)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks, ..*self })
    }

    /// Rows `ids`, requantised to Fx: `[ids.len(), cols]`.
    fn embed<B: ExactBackend<Int = T>>(&self, backend: &B, ids: &[u32]) -> Result<T> {
        if let [block] = self.blocks.as_slice() {
            return Ok(backend.qembedding(block, ids)?);
        }
        let cols = self.blocks[0].cols;
        let mut out = backend.zeros_int(&[ids.len(), cols])?;
        for (r, &id) in ids.iter().enumerate() {
            let (b, row) = (id as usize / self.block_rows, id as usize % self.block_rows);
            let one = backend.qembedding(&self.blocks[b], &[row as u32])?;
            backend.write_rows_int(&mut out, r, &one)?;
        }
        Ok(out)
    }

    /// `x · selfᵀ` for one quantised row `x`: `[1, rows]` Fx (any rows with one block).
    fn linear<B: ExactBackend<Int = T>>(&self, backend: &B, x: &QActs<T>) -> Result<T> {
        if let [block] = self.blocks.as_slice() {
            return Ok(backend.qlinear(x, block)?);
        }
        if x.rows != 1 {
            return Err(ModelError::Input(format!(
                "a split head takes one row, got {}",
                x.rows
            )));
        }
        let mut out = backend.zeros_int(&[self.rows, 1])?;
        for (b, block) in self.blocks.iter().enumerate() {
            let part = backend.qlinear(x, block)?;
            let n = part.numel();
            let column = backend.reshape_int(&part, &[n, 1])?;
            backend.write_rows_int(&mut out, b * self.block_rows, &column)?;
        }
        Ok(backend.reshape_int(&out, &[1, self.rows])?)
    }
}

/// A quantised Llama decoder on one backend: the whole model, or one pipeline stage of it
/// (a contiguous range of layers; the first stage embeds tokens, the last computes logits).
pub struct ExactLlama<B: ExactBackend> {
    pub config: LlamaConfig,
    pub frac: u32,
    group: usize,
    /// The layers this instance runs; `0..config.layers` for the whole model.
    range: Range<usize>,
    /// Present exactly when `range.start == 0`.
    token_embd: Option<QRows<B::Int>>,
    /// Present exactly when `range.end == config.layers`.
    head: Option<Head<B::Int>>,
    /// The gate's activation: SiLU, or GELU's tanh form for Gemma.
    act: ActTable<B::Int>,
    rope: RopeTable<B::Int>,
    /// Gemma's sliding-window layers' rotary table (their own base).
    rope_local: Option<RopeTable<B::Int>>,
    score: ScoreScale,
    layers: Vec<Layer<B::Int>>,
}

/// What a stage takes in: token ids (first stage) or the hidden rows of the previous stage.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    Tokens(&'a [u32]),
    /// `rows × dim` Fx values, row-major.
    Hidden {
        rows: usize,
        values: &'a [i32],
    },
}

/// What a stage gives out: the hidden rows for the next stage, or the last row's logits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageOutput {
    /// `rows × dim` Fx values, row-major.
    Hidden(Vec<i32>),
    /// The Fx logits of the last position.
    Logits(Vec<i32>),
}

/// Keys and values of past positions, per layer, in Fx.
pub struct ExactCache<T> {
    k: Vec<T>,
    v: Vec<T>,
    capacity: usize,
}

impl<B: ExactBackend> ExactLlama<B> {
    /// Loads the whole model.
    pub fn load(backend: &B, file: &ExactFile<'_>) -> Result<Self> {
        let layers = match &file.header.config {
            ExactArch::Llama(c) => c.layers,
            ExactArch::Bert(_) => return Err(ModelError::Format("not a Llama model".into())),
        };
        Self::load_stage(backend, file, 0..layers)
    }

    /// Loads the stage running layers `range` (from the whole file or from the stage's pieces).
    pub fn load_stage(backend: &B, file: &ExactFile<'_>, range: Range<usize>) -> Result<Self> {
        let ExactArch::Llama(config) = &file.header.config else {
            return Err(ModelError::Format("not a Llama model".into()));
        };
        let c = config.clone();
        if range.is_empty() || range.end > c.layers {
            return Err(ModelError::Input(format!(
                "layers {}..{} are not a stage of a {}-layer model",
                range.start, range.end, c.layers
            )));
        }
        let (d, q, kv, ffn, vocab) = (
            c.dim,
            c.q_dim(),
            c.kv_heads * c.head_dim,
            c.ffn_dim,
            c.vocab_size,
        );
        let token_embd = if range.start == 0 {
            Some(QRows::load(
                backend,
                file,
                "token_embd",
                "token_embd.requant",
                vocab,
                d,
            )?)
        } else {
            None
        };
        let head = if range.end == c.layers {
            let output = if file.has("output.q") {
                QRows::load(backend, file, "output", "output.requant", vocab, d)?
            } else {
                // Tied: the embedding rows with the head's own requantisation.
                match &token_embd {
                    Some(table) => table.with_requant(backend, file, "output.requant")?,
                    None => QRows::load(backend, file, "token_embd", "output.requant", vocab, d)?,
                }
            };
            Some(Head {
                norm: file.norm(backend, "output_norm", d, false)?,
                output,
            })
        } else {
            None
        };
        let layers = range
            .clone()
            .map(|i| {
                // Q/K/V may carry biases (Qwen2); the file says.
                let m = |name: &str, rows, cols| {
                    let name = format!("layer.{i}.{name}");
                    let bias = file.has(&format!("{name}.bias"));
                    file.matrix(backend, &name, rows, cols, bias)
                };
                let norm = |name: &str, cols| {
                    file.norm(backend, &format!("layer.{i}.{name}"), cols, false)
                };
                let gemma = match c.gemma {
                    Some(_) => Some(GemmaNorms {
                        q: norm("q_norm", c.head_dim)?,
                        k: norm("k_norm", c.head_dim)?,
                        post_attention: norm("post_attn_norm", d)?,
                        post_ffw: norm("post_ffw_norm", d)?,
                    }),
                    None => None,
                };
                Ok(Layer {
                    gemma,
                    attn_norm: file.norm(backend, &format!("layer.{i}.attn_norm"), d, false)?,
                    wq: m("wq", q, d)?,
                    wk: m("wk", kv, d)?,
                    wv: m("wv", kv, d)?,
                    wo: m("wo", d, q)?,
                    ffn_norm: file.norm(backend, &format!("layer.{i}.ffn_norm"), d, false)?,
                    gate: m("gate", ffn, d)?,
                    up: m("up", ffn, d)?,
                    down: m("down", d, ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            frac: file.header.frac_bits,
            group: file.header.group,
            range,
            token_embd,
            head,
            act: file.act_table(backend)?,
            rope: file.rope_table(backend, "rope", c.head_dim)?,
            rope_local: match c.gemma {
                Some(_) => Some(file.rope_table(backend, "rope_local", c.head_dim)?),
                None => None,
            },
            score: file.score_scale(),
            layers,
            config: c,
        })
    }

    /// The layers this instance runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this is the whole model (first and last stage at once).
    pub fn is_whole(&self) -> bool {
        self.range.start == 0 && self.range.end == self.config.layers
    }

    /// The longest sequence this model can run (its context, bounded by the rotary table).
    pub fn max_positions(&self) -> usize {
        self.rope.positions.min(self.config.context_length)
    }

    pub fn new_cache(&self, backend: &B, capacity: usize) -> Result<ExactCache<B::Int>> {
        let capacity = capacity.clamp(1, self.max_positions());
        let shape = [capacity, self.config.kv_heads * self.config.head_dim];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in &self.layers {
            k.push(backend.zeros_int(&shape)?);
            v.push(backend.zeros_int(&shape)?);
        }
        Ok(ExactCache { k, v, capacity })
    }

    /// Runs `ids` at positions `pos..` and returns the Fx logits of the last one (whole
    /// model only).
    pub async fn step(
        &self,
        backend: &B,
        ids: &[u32],
        pos: usize,
        cache: &mut ExactCache<B::Int>,
    ) -> Result<Vec<i32>> {
        match self
            .step_stage(backend, StageInput::Tokens(ids), pos, cache)
            .await?
        {
            StageOutput::Logits(logits) => Ok(logits),
            StageOutput::Hidden(_) => Err(ModelError::Input(
                "this stage does not end the model; it has no logits".into(),
            )),
        }
    }

    /// Runs this stage's layers on `input` at positions `pos..`, extending `cache`. Running
    /// the stages of a model one after the other, each on the previous one's output, gives
    /// the bits of [`Self::step`] on the whole model.
    pub async fn step_stage(
        &self,
        backend: &B,
        input: StageInput<'_>,
        pos: usize,
        cache: &mut ExactCache<B::Int>,
    ) -> Result<StageOutput> {
        let c = &self.config;
        let mut x = match (input, &self.token_embd) {
            (StageInput::Tokens(ids), Some(table)) => {
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
                    return Err(ModelError::Input(format!(
                        "token id {bad} outside the vocabulary of {}",
                        c.vocab_size
                    )));
                }
                if ids.is_empty() {
                    return Err(ModelError::Input("a step needs at least one token".into()));
                }
                table.embed(backend, ids)?
            }
            (StageInput::Hidden { rows, values }, None) => {
                if rows == 0 || rows.checked_mul(c.dim) != Some(values.len()) {
                    return Err(ModelError::Input(format!(
                        "{} hidden values are not {rows} rows of {}",
                        values.len(),
                        c.dim
                    )));
                }
                backend.upload_int(values, &[rows, c.dim])?
            }
            (StageInput::Tokens(_), None) => {
                return Err(ModelError::Input(format!(
                    "the stage of layers {}..{} takes hidden rows, not tokens",
                    self.range.start, self.range.end
                )));
            }
            (StageInput::Hidden { .. }, Some(_)) => {
                return Err(ModelError::Input(
                    "the first stage takes tokens, not hidden rows".into(),
                ));
            }
        };
        let n = match input {
            StageInput::Tokens(ids) => ids.len(),
            StageInput::Hidden { rows, .. } => rows,
        };
        let total = match pos.checked_add(n) {
            Some(t) if t <= cache.capacity && cache.k.len() == self.layers.len() => t,
            _ => {
                return Err(ModelError::Input(format!(
                    "{n} positions after {pos} exceed the KV cache of {} (or the cache is another stage's)",
                    cache.capacity
                )));
            }
        };
        let hd = c.head_dim;
        let params = AttentionParams {
            batch: 1,
            q_len: n,
            kv_rows: total,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: hd,
            causal: true,
            pos_offset: pos,
            window: None,
        };
        // Each head of `t` ([n, heads·head_dim]) normalised by `norm` ([head_dim]).
        let head_norm = |t: &B::Int, norm: &QNorm<B::Int>| -> Result<B::Int> {
            let (rows, cols) = t.as_matrix();
            let heads = backend.reshape_int(t, &[rows * cols / hd, hd])?;
            let normed = backend.norm_int(&heads, norm, self.frac)?;
            Ok(backend.reshape_int(&normed, &[rows, cols])?)
        };
        for (i, l) in self.layers.iter().enumerate() {
            let (window, _) = c.layer_attention(self.range.start + i);
            let rope = match (&self.rope_local, window) {
                (Some(local), Some(_)) => local,
                _ => &self.rope,
            };
            let a =
                backend.quantize(&backend.norm_int(&x, &l.attn_norm, self.frac)?, self.group)?;
            let mut q = backend.qlinear(&a, &l.wq)?;
            let mut k = backend.qlinear(&a, &l.wk)?;
            if let Some(g) = &l.gemma {
                q = head_norm(&q, &g.q)?;
                k = head_norm(&k, &g.k)?;
            }
            let q = backend.rope_int(&q, rope, pos)?;
            let k = backend.rope_int(&k, rope, pos)?;
            let v = backend.qlinear(&a, &l.wv)?;
            backend.write_rows_int(&mut cache.k[i], pos, &k)?;
            backend.write_rows_int(&mut cache.v[i], pos, &v)?;
            let keys = backend.quantize(&backend.slice_rows_int(&cache.k[i], 0, total)?, hd)?;
            let values = backend.quantize(&backend.slice_rows_int(&cache.v[i], 0, total)?, hd)?;
            let q = backend.quantize(&q, hd)?;
            let params = AttentionParams { window, ..params };
            let att =
                backend.attention_int(&q, &keys, &values, &[total as u32], &params, self.score)?;
            let mut o = backend.qlinear(&backend.quantize(&att, self.group)?, &l.wo)?;
            if let Some(g) = &l.gemma {
                o = backend.norm_int(&o, &g.post_attention, self.frac)?;
            }
            x = backend.add_int(&x, &o)?;
            let f = backend.quantize(&backend.norm_int(&x, &l.ffn_norm, self.frac)?, self.group)?;
            let g = backend.act_int(&backend.qlinear(&f, &l.gate)?, &self.act)?;
            let u = backend.qlinear(&f, &l.up)?;
            let gu = backend.mul_int(&g, &u, self.frac as i32)?;
            let mut down = backend.qlinear(&backend.quantize(&gu, self.group)?, &l.down)?;
            if let Some(g) = &l.gemma {
                down = backend.norm_int(&down, &g.post_ffw, self.frac)?;
            }
            x = backend.add_int(&x, &down)?;
        }
        let Some(Head {
            norm: output_norm,
            output,
        }) = &self.head
        else {
            return Ok(StageOutput::Hidden(backend.read_int(&x).await?));
        };
        let last = backend.slice_rows_int(&x, n - 1, 1)?;
        let h = backend.quantize(
            &backend.norm_int(&last, output_norm, self.frac)?,
            self.group,
        )?;
        Ok(StageOutput::Logits(
            backend.read_int(&output.linear(backend, &h)?).await?,
        ))
    }

    /// Generates up to `max_tokens` after `prompt`. A token in `stop` ends generation: it is
    /// the last step returned but is not passed to `on_token`.
    pub async fn generate(
        &self,
        backend: &B,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut ExactSampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<ExactStep>, Finish)> {
        let vocab = self.config.vocab_size;
        if !self.is_whole() {
            return Err(ModelError::Input(
                "one stage of a pipeline cannot generate alone".into(),
            ));
        }
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        let capacity = prompt.len() + max_tokens;
        if capacity > self.max_positions() {
            return Err(ModelError::Input(format!(
                "{} prompt tokens + {max_tokens} new tokens exceed the model's context of {}",
                prompt.len(),
                self.max_positions()
            )));
        }
        let mut cache = self.new_cache(backend, capacity)?;
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        let mut pos = 0;
        while out.len() < max_tokens {
            let logits = self.step(backend, &next, pos, &mut cache).await?;
            pos += next.len();
            let token = sampler.pick(&logits, self.frac);
            out.push(ExactStep {
                token,
                logits_sha256: hash_ints(&logits),
            });
            if stop.contains(&token) {
                return Ok((out, Finish::Stop));
            }
            on_token(token);
            next = vec![token];
        }
        Ok((out, Finish::Length))
    }
}

/// One generated token in exact precision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactStep {
    pub token: u32,
    /// SHA-256 of the step's integer logits (little-endian `i32`s).
    pub logits_sha256: String,
}

/// Tokenizer + exact Llama: text generation whose every logit is reproducible bit for bit.
pub struct ExactGenerator<B: ExactBackend> {
    pub model: ExactLlama<B>,
    pub tokenizer: LlamaTokenizer,
}

impl<B: ExactBackend> ExactGenerator<B> {
    pub fn new(model: ExactLlama<B>, tokenizer: LlamaTokenizer) -> Result<Self> {
        if tokenizer.vocab_size() > model.config.vocab_size {
            return Err(ModelError::Format(format!(
                "tokenizer has {} tokens, the model {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        Ok(Self { model, tokenizer })
    }

    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            self.tokenizer.encode(&self.tokenizer.chat_prompt(prompt)?)
        } else {
            self.tokenizer.encode(prompt)
        }
    }

    /// Like [`crate::llama::Generator::generate`], with exact arithmetic and sampling; each
    /// step also reports the hash of its logits.
    pub async fn generate(
        &self,
        backend: &B,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut ExactSampler,
        on_token: impl FnMut(u32),
    ) -> Result<(Vec<ExactStep>, Finish)> {
        self.model
            .generate(
                backend,
                prompt,
                max_tokens,
                sampler,
                &self.tokenizer.stop,
                on_token,
            )
            .await
    }
}

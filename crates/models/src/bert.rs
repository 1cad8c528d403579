//! BERT encoder (all-MiniLM-L6-v2 and other BERT safetensors) for sentence embeddings:
//! embeddings → N post-LayerNorm transformer layers → pooling over the real tokens (mean, the
//! `[CLS]` row or the maximum) → L2 normalisation when the model asks for it, as
//! sentence-transformers computes it.

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
    /// How token vectors become one sentence vector: sentence-transformers' `1_Pooling`, which
    /// `tabula models add` writes into the config it registers (absent: mean).
    #[serde(
        default,
        rename = "tabula_pooling",
        skip_serializing_if = "Pooling::is_mean"
    )]
    pub pooling: Pooling,
    /// Whether the sentence vector is L2-normalised (sentence-transformers' `Normalize`
    /// module; absent: yes, as all-MiniLM-L6-v2 does).
    #[serde(
        default = "yes",
        rename = "tabula_normalize",
        skip_serializing_if = "is_true"
    )]
    pub normalize: bool,
    /// The most tokens a text keeps (sentence-transformers' `max_seq_length`; absent:
    /// [`MAX_SEQ_LEN`]), never more than the model's positions.
    #[serde(
        default,
        rename = "tabula_max_seq_length",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_seq_length: Option<usize>,
}

/// Pooling of a sentence-embedding model's token vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over the text's tokens.
    #[default]
    Mean,
    /// The first token's (`[CLS]`) vector.
    Cls,
    /// The component-wise maximum over the text's tokens.
    Max,
}

impl Pooling {
    fn is_mean(&self) -> bool {
        *self == Pooling::Mean
    }
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
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
        let limits = [
            ("vocab_size", c.vocab_size, MAX_VOCAB),
            ("hidden_size", c.hidden_size, MAX_WIDTH),
            ("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS),
            ("intermediate_size", c.intermediate_size, MAX_WIDTH * 8),
            (
                "max_position_embeddings",
                c.max_position_embeddings,
                MAX_POSITIONS,
            ),
            ("type_vocab_size", c.type_vocab_size, MAX_TYPES),
        ];
        for (key, value, max) in limits {
            let least = usize::from(!matches!(key, "type_vocab_size"));
            if value < least || value > max {
                return Err(ModelError::Format(format!(
                    "config.json: {key} {value} is outside {least}..={max}"
                )));
            }
        }
        if c.max_seq_length == Some(0) {
            return Err(ModelError::Format(
                "config.json: tabula_max_seq_length must be at least 1".into(),
            ));
        }
        Ok(c)
    }

    /// The most tokens a text keeps: the model's `max_seq_length` (else [`MAX_SEQ_LEN`]),
    /// at most its positions.
    pub fn max_tokens(&self) -> usize {
        self.max_seq_length
            .unwrap_or(MAX_SEQ_LEN)
            .min(self.max_position_embeddings)
    }

    /// Weights of the encoder: embeddings and every layer's matrices, biases and norms.
    pub fn parameters(&self) -> u64 {
        let (h, f) = (self.hidden_size as u64, self.intermediate_size as u64);
        let embeddings =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) as u64 * h
                + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h;
        embeddings + self.num_hidden_layers as u64 * layer
    }
}

/// Bounds on a BERT config (BERT-large is 1024 wide, 24 layers, 512 positions).
const MAX_VOCAB: usize = 1 << 20;
const MAX_WIDTH: usize = 8192;
const MAX_LAYERS: usize = 256;
const MAX_POSITIONS: usize = 1 << 16;
const MAX_TYPES: usize = 1024;

/// `bert.` when the tensors are a Hugging Face `BertModel`'s, else nothing (sentence-
/// transformers checkpoints have no prefix).
pub(crate) fn tensor_prefix(file: &SafetensorsFile<'_>) -> &'static str {
    if file.has("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

/// The `config.json` a BERT directory is registered with, and what it parses to: the model's
/// own (of `model_type` `bert`, else refused by name) with the sentence-transformers settings
/// written in as `tabula_*` keys, and `type_vocab_size` 0 when `safetensors` holds no
/// token-type embeddings. A worker needs no other file than this, the weights and the
/// tokenizer.
pub fn registered_config(
    config_json: &[u8],
    modules: &SentenceModules,
    safetensors: &[u8],
) -> Result<(Vec<u8>, BertConfig)> {
    let mut config: serde_json::Value = serde_json::from_slice(config_json)
        .map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
    let map = config
        .as_object_mut()
        .ok_or_else(|| ModelError::Format("config.json is not a JSON object".into()))?;
    let model_type = map
        .get("model_type")
        .and_then(|t| t.as_str())
        .unwrap_or("(none)");
    if model_type != "bert" {
        return Err(ModelError::Format(format!(
            "config.json: model_type `{}` is not supported: a Hugging Face directory must hold a \
             BERT model (model_type `bert`); add a Llama, Mistral, Qwen2 or Gemma 3 model as a \
             GGUF file",
            model_type.escape_debug()
        )));
    }
    map.insert("tabula_pooling".into(), pooling_json(modules.pooling));
    map.insert("tabula_normalize".into(), modules.normalize.into());
    match modules.max_seq_length {
        Some(n) => map.insert("tabula_max_seq_length".into(), n.into()),
        None => map.remove("tabula_max_seq_length"),
    };
    if !has_token_type_embeddings(safetensors) {
        // A checkpoint without token-type embeddings: a token adds nothing for its type.
        map.insert("type_vocab_size".into(), 0.into());
    }
    let bytes = serde_json::to_vec_pretty(&config).expect("a JSON value serialises");
    let parsed = BertConfig::from_json(&bytes)?;
    Ok((bytes, parsed))
}

fn pooling_json(p: Pooling) -> serde_json::Value {
    serde_json::to_value(p).expect("an enum of unit variants serialises")
}

/// Whether a safetensors file holds token-type embeddings (under either naming); `false` for
/// a file that does not parse.
pub fn has_token_type_embeddings(safetensors: &[u8]) -> bool {
    SafetensorsFile::parse(safetensors).is_ok_and(|file| {
        let prefix = tensor_prefix(&file);
        file.has(&format!("{prefix}embeddings.token_type_embeddings.weight"))
    })
}

/// Every tensor the encoder reads (without the prefix), with its shape: the embeddings
/// (token types only when `type_vocab_size` is not 0), then each layer's.
pub fn tensor_shapes(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            vec![c.max_position_embeddings, h],
        ),
    ];
    if c.type_vocab_size > 0 {
        out.push((
            "embeddings.token_type_embeddings.weight".to_string(),
            vec![c.type_vocab_size, h],
        ));
    }
    for part in ["weight", "bias"] {
        out.push((format!("embeddings.LayerNorm.{part}"), vec![h]));
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (_, name, rows, cols) in layer_linears(h, f) {
            out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            out.push((format!("{p}.{name}.bias"), vec![rows]));
        }
        for (_, name) in LAYER_NORMS {
            for part in ["weight", "bias"] {
                out.push((format!("{p}.{name}.{part}"), vec![h]));
            }
        }
    }
    out
}

/// A layer's linear maps for hidden width `h` and feed-forward width `f`, in the order the
/// encoder applies them: short name (the exact file's), the checkpoint's name (under
/// `encoder.layer.N.`, with `.weight` and `.bias`), rows, columns.
pub fn layer_linears(h: usize, f: usize) -> [(&'static str, &'static str, usize, usize); 6] {
    [
        ("q", "attention.self.query", h, h),
        ("k", "attention.self.key", h, h),
        ("v", "attention.self.value", h, h),
        ("attn_out", "attention.output.dense", h, h),
        ("ffn_in", "intermediate.dense", f, h),
        ("ffn_out", "output.dense", h, f),
    ]
}

/// A layer's two LayerNorms: short name, the checkpoint's name (`.weight` and `.bias`).
pub const LAYER_NORMS: [(&str, &str); 2] = [
    ("ln1", "attention.output.LayerNorm"),
    ("ln2", "output.LayerNorm"),
];

/// Checks that the encoder can load `safetensors` with `config` without loading it: every
/// tensor present with its shape and a type it reads. Each failure names the tensor.
pub fn inspect(config: &BertConfig, safetensors: &[u8]) -> Result<crate::ModelSummary> {
    let file = SafetensorsFile::parse(safetensors)?;
    let prefix = tensor_prefix(&file);
    let heads = config.num_attention_heads;
    if !(config.hidden_size / heads).is_multiple_of(4) {
        return Err(ModelError::Format(format!(
            "config.json: heads of {} values cannot be quantised for exact precision (a multiple \
             of 4 is needed)",
            config.hidden_size / heads
        )));
    }
    for (name, shape) in tensor_shapes(config) {
        file.check(&format!("{prefix}{name}"), &shape)?;
    }
    let parameters = config.parameters();
    Ok(crate::ModelSummary {
        architecture: "bert".into(),
        parameters,
        layers: config.num_hidden_layers,
        vocab_size: config.vocab_size,
        context_length: config.max_tokens(),
        fast_bytes: parameters.saturating_mul(4),
        exact_bytes: parameters.saturating_add(parameters / 4),
    })
}

/// What a sentence-transformers directory adds to a BERT checkpoint: its pooling, whether
/// it normalises, and its longest text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentenceModules {
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: Option<usize>,
}

/// Reads `modules.json` and the files it points to (`1_Pooling/config.json`,
/// `sentence_bert_config.json`) through `read` (a path relative to the model directory →
/// its bytes, `None` when absent). Without `modules.json` the directory is a plain Hugging
/// Face model: mean pooling without normalisation, as sentence-transformers loads one.
/// A module other than Transformer, Pooling and Normalize, a pooling mode other than one of
/// mean, CLS and max, or a path leaving the directory is refused by name.
pub fn sentence_modules(read: &dyn Fn(&str) -> Result<Option<Vec<u8>>>) -> Result<SentenceModules> {
    #[derive(Deserialize)]
    struct Module {
        #[serde(default)]
        path: String,
        #[serde(rename = "type")]
        kind: String,
    }
    let json = |name: &str, bytes: &[u8]| -> Result<serde_json::Value> {
        serde_json::from_slice(bytes).map_err(|e| ModelError::Format(format!("{name}: {e}")))
    };
    let mut out = SentenceModules {
        pooling: Pooling::Mean,
        normalize: false,
        max_seq_length: None,
    };
    if let Some(bytes) = read("sentence_bert_config.json")? {
        let v = json("sentence_bert_config.json", &bytes)?;
        if let Some(n) = v.get("max_seq_length").filter(|n| !n.is_null()) {
            out.max_seq_length = Some(
                n.as_u64()
                    .filter(|&n| (1..=MAX_POSITIONS as u64).contains(&n))
                    .ok_or_else(|| {
                        ModelError::Format(format!(
                            "sentence_bert_config.json: max_seq_length {n} is not a count of \
                             tokens in 1..={MAX_POSITIONS}"
                        ))
                    })? as usize,
            );
        }
    }
    let Some(bytes) = read("modules.json")? else {
        return Ok(out);
    };
    let modules: Vec<Module> = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Format(format!("modules.json: {e}")))?;
    if modules.len() > 16 {
        return Err(ModelError::Format(format!(
            "modules.json lists {} modules; a BERT sentence model has at most 3",
            modules.len()
        )));
    }
    for m in modules {
        let kind = m.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Normalize" => out.normalize = true,
            "Pooling" => {
                let plain = !m.path.is_empty()
                    && m.path != "."
                    && m.path != ".."
                    && m.path
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                if !plain {
                    return Err(ModelError::Format(format!(
                        "modules.json: the pooling module's path `{}` is not a folder of the \
                         model directory",
                        m.path.escape_debug()
                    )));
                }
                let name = format!("{}/config.json", m.path);
                let bytes = read(&name)?.ok_or_else(|| {
                    ModelError::Format(format!("modules.json names {name}, which is missing"))
                })?;
                let v = json(&name, &bytes)?;
                let modes: Vec<&str> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, on)| k.starts_with("pooling_mode_") && on.as_bool() == Some(true))
                    .map(|(k, _)| k.trim_start_matches("pooling_mode_"))
                    .collect();
                out.pooling = match modes.as_slice() {
                    ["mean_tokens"] => Pooling::Mean,
                    ["cls_token"] => Pooling::Cls,
                    ["max_tokens"] => Pooling::Max,
                    _ => {
                        return Err(ModelError::Format(format!(
                            "{name}: pooling {} is not supported: one of mean_tokens, cls_token \
                             and max_tokens",
                            if modes.is_empty() {
                                "by no mode".to_string()
                            } else {
                                format!("by {}", modes.join(" + "))
                            }
                        )));
                    }
                };
            }
            other => {
                return Err(ModelError::Format(format!(
                    "modules.json: module `{other}` ({}) is not supported: only Transformer, \
                     Pooling and Normalize",
                    m.kind
                )));
            }
        }
    }
    Ok(out)
}

struct Embeddings<B: Backend> {
    word: B::Tensor,
    position: B::Tensor,
    /// `None` when the model has no token types (`type_vocab_size` 0).
    token_type: Option<B::Tensor>,
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
        let prefix = tensor_prefix(&file);
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
                token_type: match config.type_vocab_size {
                    0 => None,
                    types => Some(load(
                        "embeddings.token_type_embeddings.weight",
                        &[types, h],
                    )?),
                },
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
                let [q, k, v, attn_out, ffn_in, ffn_out] = layer_linears(h, ffn)
                    .map(|(_, name, rows, cols)| linear(&format!("{p}.{name}"), rows, cols));
                let [ln1, ln2] = LAYER_NORMS.map(|(_, name)| norm(&format!("{p}.{name}")));
                Ok(Layer {
                    q: q?,
                    k: k?,
                    v: v?,
                    attn_out: attn_out?,
                    ln1: ln1?,
                    ffn_in: ffn_in?,
                    ffn_out: ffn_out?,
                    ln2: ln2?,
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
        let mut x = backend.add(
            &backend.embedding(&e.word, &ids)?,
            &backend.embedding(&e.position, &positions)?,
        )?;
        if let Some(token_type) = &e.token_type {
            // Every token is of type 0: a sentence-embedding input is one segment.
            let types = vec![0u32; ids.len()];
            x = backend.add(&x, &backend.embedding(token_type, &types)?)?;
        }
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

    /// Sentence embeddings from the final hidden states: each sequence's real tokens pooled
    /// as the model asks ([`Pooling`]), then L2-normalised when it asks for that.
    pub async fn pool(&self, backend: &B, h: &Hidden<B>) -> Result<Vec<Vec<f32>>> {
        if h.layer != self.config.num_hidden_layers {
            return Err(ModelError::Input(format!(
                "pooling needs the output of the last layer, got layer {}",
                h.layer
            )));
        }
        let dim = self.config.hidden_size;
        let pooled: Vec<Vec<f32>> = match self.config.pooling {
            Pooling::Mean => {
                let pooled = backend.mean_pool(&h.x, h.seq, &h.lens)?;
                let values = backend.read(&pooled).await?;
                values.chunks_exact(dim).map(<[f32]>::to_vec).collect()
            }
            Pooling::Cls => {
                let rows: Vec<u32> = (0..h.lens.len()).map(|b| (b * h.seq) as u32).collect();
                let values = backend.read(&backend.embedding(&h.x, &rows)?).await?;
                values.chunks_exact(dim).map(<[f32]>::to_vec).collect()
            }
            Pooling::Max => {
                let values = backend.read(&h.x).await?;
                max_pool(&values, dim, h.seq, &h.lens, f32::max)
            }
        };
        Ok(if self.config.normalize {
            pooled.iter().map(|v| l2_normalize(v)).collect()
        } else {
            pooled
        })
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

/// The component-wise maximum of each sequence's first `lens[b]` rows of a padded batch
/// (`seq` rows of `dim` per sequence), as sentence-transformers' max pooling.
pub(crate) fn max_pool<T: Copy>(
    x: &[T],
    dim: usize,
    seq: usize,
    lens: &[u32],
    max: impl Fn(T, T) -> T,
) -> Vec<Vec<T>> {
    lens.iter()
        .enumerate()
        .map(|(b, &len)| {
            let rows = &x[b * seq * dim..(b * seq + len as usize) * dim];
            let mut out = rows[..dim].to_vec();
            for row in rows.chunks_exact(dim).skip(1) {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = max(*o, v);
                }
            }
            out
        })
        .collect()
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
        let max_len = config.max_tokens();
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

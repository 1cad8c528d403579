//! The quantiser: fp32 (or GGUF-dequantised) weights in, the integers of exact precision out.
//! This is the only place where floating point meets exact mode, and it runs once per model:
//! every volunteer then loads the same content-addressed integers.
//!
//! - Weights: symmetric int8 per output channel, `q = round(w · 127 / max|w|)`.
//! - Requantisation: the channel's scale times the 1/127 of the activation step, as `(M, E)`.
//! - Biases, LayerNorm betas, position embeddings: Fx (`round(v · 2^F)`); gammas: Q16.
//! - GELU (BERT) / SiLU (Llama) tables and the rotary table, from `f64` math.
//!
//! `F`, the fixed-point fraction, is 16 for BERT and 12 for Llama, whose residual stream
//! holds activations near ±25 000 (SmolLM2) that must fit an `i32`.

use tabula_engine::exact::{NORM_FRAC, Q_MAX, SCORE_FRAC, split_scale};

use super::{ExactArch, ExactHeader, ExactWriter, FORMAT, VERSION, pack_i8};
use crate::{
    ModelError, Result,
    bert::BertConfig,
    catalog::sha256_hex,
    gguf::GgufFile,
    llama::{LlamaConfig, interleave_rope_rows, neox_rope, shaped},
    safetensors_io::SafetensorsFile,
};

const BERT_FRAC: u32 = 16;
const LLAMA_FRAC: u32 = 12;
/// Table entries per unit of x: 64 for GELU on [-8, 8), 32 for SiLU on [-16, 16).
const GELU_STEPS_LOG2: u32 = 6;
const SILU_STEPS_LOG2: u32 = 5;
const ACT_LEN: usize = 1024;
/// Linear-layer inputs are quantised in groups of 32 values (as llama.cpp's Q8_0), so an
/// outlier only coarsens its own group.
const ACT_GROUP: usize = 32;
/// Weight scales: BERT has one per output channel. Llama has one per output channel and
/// 32-value block, the block structure of its GGUF source (Q4_1/Q8_0 blocks are 32 wide):
/// with one scale per channel, SmolLM2's first 8 greedy tokens matched fp32 on only 3 of
/// the 6 fixture prompts (a torch simulation of both schemes agrees), and 2 of 6 with
/// activation groups of 16 instead of 32; see BENCHMARKS.md.
const BERT_WEIGHT_GROUP: Option<usize> = None;
const LLAMA_WEIGHT_GROUP: Option<usize> = Some(32);
/// The rotary table covers at most this many positions.
const MAX_ROPE_POSITIONS: usize = 8192;
/// The widest attention head of the exact kernels (Gemma 3's 256).
const MAX_HEAD_DIM: usize = 256;

fn fx(v: f32, frac: u32) -> i32 {
    (v as f64 * f64::from(1u32 << frac))
        .round()
        .clamp(-(i32::MAX as f64), i32::MAX as f64) as i32
}

fn fx_all(v: &[f32], frac: u32) -> Vec<i32> {
    v.iter().map(|&x| fx(x, frac)).collect()
}

/// Symmetric int8 of `w: [rows, cols]` with one scale per block of `group` values of a row
/// (`group >= cols`: per row): packed values and each block's scale `max|w| / 127` (0 for an
/// all-zero block).
fn quantize_rows(w: &[f32], cols: usize, group: Option<usize>) -> Result<(Vec<i32>, Vec<f64>)> {
    let group = group.unwrap_or(cols).min(cols);
    if cols == 0
        || !cols.is_multiple_of(4)
        || group == 0
        || !cols.is_multiple_of(group)
        || !w.len().is_multiple_of(cols)
    {
        return Err(ModelError::Format(format!(
            "cannot quantise a matrix of {} values with {cols} columns in blocks of {group}",
            w.len()
        )));
    }
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / group);
    for row in w.chunks_exact(group) {
        // f32::max skips NaN, so check every value.
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if row.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Format("weights contain NaN or infinity".into()));
        }
        let scale = amax as f64 / Q_MAX as f64;
        q.extend(row.iter().map(|&v| {
            if scale == 0.0 {
                0
            } else {
                (v as f64 / scale).round().clamp(-127.0, 127.0) as i8
            }
        }));
        scales.push(scale);
    }
    Ok((pack_i8(&q), scales))
}

/// `(M, E)` pairs for `scales[r] · factor`; zero scales get a valid multiplier (their rows
/// are all zero, so any multiplier gives 0).
fn requant(scales: &[f64], factor: f64) -> Result<Vec<i32>> {
    let mut out = Vec::with_capacity(2 * scales.len());
    for &s in scales {
        let (m, e) = if s == 0.0 {
            (1 << 30, 62)
        } else {
            split_scale(s * factor)?
        };
        out.extend([m, e]);
    }
    Ok(out)
}

/// A linear layer `w: [rows, cols]` (+ bias) under `name`.
fn put_linear(
    out: &mut ExactWriter,
    name: &str,
    w: &[f32],
    (rows, cols, group): (usize, usize, Option<usize>),
    bias: Option<(&[f32], u32)>,
) -> Result<()> {
    let (q, scales) = quantize_rows(w, cols, group)?;
    let blocks = scales.len() / rows;
    out.put(format!("{name}.q"), q, &[rows, cols / 4]);
    out.put(
        format!("{name}.requant"),
        requant(&scales, 1.0 / Q_MAX as f64)?,
        &[rows, blocks, 2],
    );
    if let Some((b, frac)) = bias {
        out.put(format!("{name}.bias"), fx_all(b, frac), &[rows]);
    }
    Ok(())
}

fn put_norm(out: &mut ExactWriter, name: &str, gamma: &[f32], beta: Option<(&[f32], u32)>) {
    out.put(
        format!("{name}.gamma"),
        fx_all(gamma, NORM_FRAC),
        &[gamma.len()],
    );
    if let Some((b, frac)) = beta {
        out.put(format!("{name}.beta"), fx_all(b, frac), &[b.len()]);
    }
}

/// An activation table of `ACT_LEN + 1` entries from `lo` with `2^steps_log2` entries per unit.
fn act_table(f: impl Fn(f64) -> f64, lo: f64, steps_log2: u32, frac: u32) -> Vec<i32> {
    (0..=ACT_LEN)
        .map(|i| {
            let x = lo + i as f64 / f64::from(1u32 << steps_log2);
            (f(x) * f64::from(1u32 << frac)).round() as i32
        })
        .collect()
}

/// `factor · log2(e) / (sqrt(head_dim) · 127² · 2^(2F)) · 2^SCORE_FRAC` (`factor`: YaRN's
/// score factor, else 1).
fn score_scale(head_dim: usize, frac: u32, factor: f64) -> Result<(i32, i32)> {
    split_scale(
        factor * std::f64::consts::LOG2_E / ((head_dim as f64).sqrt() * (Q_MAX * Q_MAX) as f64)
            * 2f64.powi(SCORE_FRAC as i32 - 2 * frac as i32),
    )
    .map_err(ModelError::from)
}

fn erf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is too coarse for a table; use the series / continued
    // fraction split, accurate to ~1e-15 on the table's range.
    if x.abs() < 2.5 {
        let mut sum = x;
        let mut term = x;
        let x2 = x * x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), then erf = 1 - erfc.
        let ax = x.abs();
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for n in 1..300 {
            let an = n as f64 / 2.0;
            d = ax + an * d;
            d = 1.0 / d;
            c = ax + an / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc).copysign(x)
    }
}

/// Quantises a BERT model (safetensors + config.json).
pub fn quantize_bert(
    model: &str,
    config_json: &[u8],
    safetensors: &[u8],
) -> Result<(Vec<u8>, String)> {
    let config = BertConfig::from_json(config_json)?;
    let file = SafetensorsFile::parse(safetensors)?;
    let f = BERT_FRAC;
    let h = config.hidden_size;
    let ffn = config.intermediate_size;
    let heads = config.num_attention_heads;
    if heads == 0 || !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(4) {
        return Err(ModelError::Format(format!(
            "{h} hidden units in {heads} heads cannot be quantised per head"
        )));
    }
    let prefix = crate::bert::tensor_prefix(&file);
    let get = |name: &str, shape: &[usize]| file.f32(&format!("{prefix}{name}"), shape);
    let mut out = ExactWriter::default();

    let wg = BERT_WEIGHT_GROUP;
    let word = get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
    let (q, scales) = quantize_rows(&word, h, wg)?;
    out.put("embeddings.word.q", q, &[config.vocab_size, h / 4]);
    out.put(
        "embeddings.word.requant",
        requant(&scales, f64::from(1u32 << f))?,
        &[config.vocab_size, scales.len() / config.vocab_size, 2],
    );
    let pos = get(
        "embeddings.position_embeddings.weight",
        &[config.max_position_embeddings, h],
    )?;
    out.put(
        "embeddings.position",
        fx_all(&pos, f),
        &[config.max_position_embeddings, h],
    );
    if config.type_vocab_size > 0 {
        let types = get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        out.put(
            "embeddings.token_type",
            fx_all(&types, f),
            &[config.type_vocab_size, h],
        );
    }
    put_norm(
        &mut out,
        "embeddings.ln",
        &get("embeddings.LayerNorm.weight", &[h])?,
        Some((&get("embeddings.LayerNorm.bias", &[h])?, f)),
    );
    for i in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (short, long, rows, cols) in crate::bert::layer_linears(h, ffn) {
            let w = get(&format!("{p}.{long}.weight"), &[rows, cols])?;
            let b = get(&format!("{p}.{long}.bias"), &[rows])?;
            put_linear(
                &mut out,
                &format!("layer.{i}.{short}"),
                &w,
                (rows, cols, wg),
                Some((&b, f)),
            )?;
        }
        for (short, long) in crate::bert::LAYER_NORMS {
            put_norm(
                &mut out,
                &format!("layer.{i}.{short}"),
                &get(&format!("{p}.{long}.weight"), &[h])?,
                Some((&get(&format!("{p}.{long}.bias"), &[h])?, f)),
            );
        }
    }
    let gelu = |x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let lo = -8.0;
    out.put(
        "act",
        act_table(gelu, lo, GELU_STEPS_LOG2, f),
        &[ACT_LEN + 1],
    );
    let (score_mult, score_exp) = score_scale(h / heads, f, 1.0)?;
    let header = ExactHeader {
        format: FORMAT.into(),
        version: VERSION,
        model: model.into(),
        source_sha256: sha256_hex(safetensors),
        frac_bits: f,
        group: ACT_GROUP,
        weight_group: wg,
        config: ExactArch::Bert(config),
        act_lo: fx(lo as f32, f),
        act_step_shift: f - GELU_STEPS_LOG2,
        act_len: ACT_LEN,
        score_mult,
        score_exp,
        rope_positions: 0,
        piece: None,
    };
    out.finish(&header)
}

/// Quantises a Llama model from its GGUF file (blocks dequantised, then int8 per channel).
pub fn quantize_llama(model: &str, gguf_bytes: &[u8]) -> Result<(Vec<u8>, String)> {
    let gguf = GgufFile::parse(gguf_bytes)?;
    let config = LlamaConfig::from_gguf(&gguf, gguf_bytes)?;
    // Qwen2's and Gemma's Q and K rows (and biases, and Gemma's head norms) go into the
    // engine's rotary layout here, once: the exact file holds them interleaved (see
    // `llama::interleave_rope_rows`).
    let neox = neox_rope(gguf.get_str("general.architecture")?);
    let f = LLAMA_FRAC;
    let (d, kv, ffn, vocab, hd) = (
        config.dim,
        config.kv_heads * config.head_dim,
        config.ffn_dim,
        config.vocab_size,
        config.head_dim,
    );
    if !hd.is_multiple_of(4) || hd > MAX_HEAD_DIM {
        return Err(ModelError::Format(format!(
            "head size {hd} is not supported in exact precision (multiples of 4 up to \
             {MAX_HEAD_DIM})"
        )));
    }
    let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        shaped(&gguf, name, shape)?;
        Ok(gguf.tensor_f32(gguf_bytes, name)?)
    };
    let mut out = ExactWriter::default();
    let wg = LLAMA_WEIGHT_GROUP;
    let embd = get("token_embd.weight", &[vocab, d])?;
    let (q, scales) = quantize_rows(&embd, d, wg)?;
    let blocks = scales.len() / vocab;
    out.put("token_embd.q", q, &[vocab, d / 4]);
    // Gemma scales the embeddings entering layer 0 by √dim: folded into their
    // requantisation (the tied head keeps its own, unscaled).
    let embed_scale = config
        .gemma
        .as_ref()
        .map_or(1.0, |g| f64::from(g.embed_scale));
    out.put(
        "token_embd.requant",
        requant(&scales, f64::from(1u32 << f) * embed_scale)?,
        &[vocab, blocks, 2],
    );
    if gguf.tensor("output.weight").is_some() {
        let w = get("output.weight", &[vocab, d])?;
        put_linear(&mut out, "output", &w, (vocab, d, wg), None)?;
    } else {
        // Tied head: the same int8 rows, with the linear layer's requantisation.
        out.put(
            "output.requant",
            requant(&scales, 1.0 / Q_MAX as f64)?,
            &[vocab, blocks, 2],
        );
    }
    put_norm(
        &mut out,
        "output_norm",
        &get("output_norm.weight", &[d])?,
        None,
    );
    for i in 0..config.layers {
        let t = |name: &str, shape: &[usize]| get(&format!("blk.{i}.{name}.weight"), shape);
        for (short, long, rows, cols) in [
            ("wq", "attn_q", config.q_dim(), d),
            ("wk", "attn_k", kv, d),
            ("wv", "attn_v", kv, d),
            ("wo", "attn_output", d, config.q_dim()),
            ("gate", "ffn_gate", ffn, d),
            ("up", "ffn_up", ffn, d),
            ("down", "ffn_down", d, ffn),
        ] {
            let rotated = matches!(short, "wq" | "wk");
            let rotate = |w: Vec<f32>, cols: usize| {
                if neox && rotated {
                    interleave_rope_rows(&w, cols, hd)
                } else {
                    w
                }
            };
            let bias_name = format!("blk.{i}.{long}.bias");
            let bias = match gguf.tensor(&bias_name) {
                Some(_) if matches!(short, "wq" | "wk" | "wv") => {
                    Some(rotate(get(&bias_name, &[rows])?, 1))
                }
                Some(_) => {
                    return Err(ModelError::Format(format!(
                        "a bias on `{long}` is not supported (Q, K and V only)"
                    )));
                }
                None => None,
            };
            put_linear(
                &mut out,
                &format!("layer.{i}.{short}"),
                &rotate(t(long, &[rows, cols])?, cols),
                (rows, cols, wg),
                bias.as_deref().map(|b| (b, f)),
            )?;
        }
        put_norm(
            &mut out,
            &format!("layer.{i}.attn_norm"),
            &t("attn_norm", &[d])?,
            None,
        );
        put_norm(
            &mut out,
            &format!("layer.{i}.ffn_norm"),
            &t("ffn_norm", &[d])?,
            None,
        );
        if config.gemma.is_some() {
            for (short, long, n) in [
                ("q_norm", "attn_q_norm", hd),
                ("k_norm", "attn_k_norm", hd),
                ("post_attn_norm", "post_attention_norm", d),
                ("post_ffw_norm", "post_ffw_norm", d),
            ] {
                let gamma = t(long, &[n])?;
                let gamma = if n == hd {
                    interleave_rope_rows(&gamma, 1, hd)
                } else {
                    gamma
                };
                put_norm(&mut out, &format!("layer.{i}.{short}"), &gamma, None);
            }
        }
    }
    // The gate's activation: SiLU (SwiGLU), or GELU's tanh form (Gemma's GeGLU) on BERT's grid.
    let (lo, steps_log2) = if config.gemma.is_some() {
        let gelu_tanh = |x: f64| {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        };
        out.put(
            "act",
            act_table(gelu_tanh, -8.0, GELU_STEPS_LOG2, f),
            &[ACT_LEN + 1],
        );
        (-8.0, GELU_STEPS_LOG2)
    } else {
        let silu = |x: f64| x / (1.0 + (-x).exp());
        out.put(
            "act",
            act_table(silu, -16.0, SILU_STEPS_LOG2, f),
            &[ACT_LEN + 1],
        );
        (-16.0, SILU_STEPS_LOG2)
    };
    let positions = config.context_length.clamp(1, MAX_ROPE_POSITIONS);
    let rope_table = |freqs: &[f64]| {
        let mut rope = Vec::with_capacity(positions * hd);
        for pos in 0..positions {
            for &freq in freqs {
                let angle = pos as f64 * freq;
                rope.push((angle.cos() * f64::from(1u32 << 30)).round() as i32);
                rope.push((angle.sin() * f64::from(1u32 << 30)).round() as i32);
            }
        }
        rope
    };
    out.put(
        "rope",
        rope_table(&config.global_rope_freqs()),
        &[positions * hd],
    );
    if let Some(g) = &config.gemma {
        out.put(
            "rope_local",
            rope_table(&tabula_engine::rope_freqs(
                f64::from(g.local_rope_theta),
                hd,
                None,
            )),
            &[positions * hd],
        );
    }
    let (score_mult, score_exp) = score_scale(hd, f, f64::from(config.score_factor))?;
    let header = ExactHeader {
        format: FORMAT.into(),
        version: VERSION,
        model: model.into(),
        source_sha256: sha256_hex(gguf_bytes),
        frac_bits: f,
        group: ACT_GROUP,
        weight_group: wg,
        config: ExactArch::Llama(config),
        act_lo: fx(lo as f32, f),
        act_step_shift: f - steps_log2,
        act_len: ACT_LEN,
        score_mult,
        score_exp,
        rope_positions: positions,
        piece: None,
    };
    out.finish(&header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn rows_quantise_to_the_full_int8_range() {
        let (q, s) = quantize_rows(&[0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0], 4, None).unwrap();
        assert_eq!(
            q,
            pack_i8(&[64, -127, 32, 0])
                .into_iter()
                .chain([0])
                .collect::<Vec<_>>()
        );
        assert_eq!(s, vec![1.0 / 127.0, 0.0]);
        assert!(quantize_rows(&[f32::NAN, 0.0, 0.0, 0.0], 4, None).is_err());
        assert!(quantize_rows(&[0.0; 6], 3, None).is_err());
        let (_, s) = quantize_rows(&[1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0], 8, Some(4)).unwrap();
        assert_eq!(s, vec![1.0 / 127.0, 0.5 / 127.0]);
    }
}

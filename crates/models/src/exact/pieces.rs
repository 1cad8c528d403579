//! A quantised decoder cut into content-addressed pieces, so that a pipeline stage downloads,
//! checks and caches only the layers it runs.
//!
//! A Llama file splits into `tables` (activation and rotary tables, needed by every stage),
//! `embed` (the token embedding, for the first stage), `head` (final norm and output matrix,
//! for the last stage; a model with tied embeddings gets its own copy of the table there, so
//! the last stage never needs `embed`) and one `layer.{i}` per layer. Each piece is a
//! safetensors file with the whole file's header plus a [`PieceInfo`] naming the piece and the
//! whole file it came from, and is addressed by its own SHA-256. Cutting is deterministic: the
//! same whole file always gives the same pieces.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{ExactArch, ExactFile, ExactWriter};
use crate::{ModelError, Result};

/// The most pieces a model may have (layers + 3), bounding what a stage may ask for.
pub const MAX_PIECES: usize = 1024;

/// What a piece is, written into its header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceInfo {
    /// `tables`, `embed`, `head` or `layer.{i}`.
    pub name: String,
    /// SHA-256 of the whole file the piece was cut from.
    pub whole_sha256: String,
}

/// One piece's bytes and their SHA-256.
#[derive(Clone, Debug)]
pub struct Piece {
    pub name: String,
    pub sha256: String,
    pub bytes: Vec<u8>,
}

/// The piece a tensor of a Llama file belongs to.
fn piece_of(tensor: &str) -> Option<String> {
    if tensor == "act" || tensor == "rope" || tensor == "rope_local" {
        return Some("tables".into());
    }
    if tensor.starts_with("token_embd.") {
        return Some("embed".into());
    }
    if tensor.starts_with("output.") || tensor.starts_with("output_norm.") {
        return Some("head".into());
    }
    let rest = tensor.strip_prefix("layer.")?;
    let (index, _) = rest.split_once('.')?;
    let i: usize = index.parse().ok()?;
    (i.to_string() == index).then(|| format!("layer.{i}"))
}

/// Cuts a whole quantised Llama file (`bytes`, hashing to `sha256`) into its pieces, in the
/// order `tables`, `embed`, `head`, `layer.0`, `layer.1`, ….
pub fn split_pieces(bytes: &[u8], sha256: &str) -> Result<Vec<Piece>> {
    let file = ExactFile::open(bytes, sha256)?;
    let ExactArch::Llama(config) = &file.header.config else {
        return Err(ModelError::Format(
            "only decoder (Llama) models are cut into pipeline pieces".into(),
        ));
    };
    if config.layers == 0 || config.layers + 3 > MAX_PIECES {
        return Err(ModelError::Format(format!(
            "{} layers: a model cut into pieces has 1 to {}",
            config.layers,
            MAX_PIECES - 3
        )));
    }
    let mut order = vec!["tables".to_string(), "embed".into(), "head".into()];
    order.extend((0..config.layers).map(|i| format!("layer.{i}")));
    let mut writers: Vec<ExactWriter> = order.iter().map(|_| ExactWriter::default()).collect();
    for name in &file.names() {
        let piece = piece_of(name)
            .ok_or_else(|| ModelError::Format(format!("tensor `{name}` belongs to no piece")))?;
        let slot = order
            .iter()
            .position(|p| *p == piece)
            .ok_or_else(|| ModelError::Format(format!("tensor `{name}`: no layer {piece}")))?;
        let shape = file.tensor(name)?.shape;
        let data = file.ints(name, shape.iter().product())?;
        writers[slot].put(name.clone(), data, &shape);
    }
    // Tied embeddings: the head carries its own copy of the table as `output.q`, which loads
    // to the same matrix as the embedding with the output's requantisation.
    if !file.has("output.q") {
        let shape = file.tensor("token_embd.q")?.shape;
        let data = file.ints("token_embd.q", shape.iter().product())?;
        writers[2].put("output.q", data, &shape);
    }
    let mut pieces = Vec::with_capacity(order.len());
    for (name, writer) in order.into_iter().zip(writers) {
        if writer.is_empty() {
            return Err(ModelError::Format(format!(
                "the model has no `{name}` tensors"
            )));
        }
        let mut header = file.header.clone();
        header.piece = Some(PieceInfo {
            name: name.clone(),
            whole_sha256: sha256.to_ascii_lowercase(),
        });
        let (bytes, sha256) = writer.finish(&header)?;
        pieces.push(Piece {
            name,
            sha256,
            bytes,
        });
    }
    Ok(pieces)
}

/// The pieces a stage running layers `range` of a `layers`-layer model needs.
pub fn stage_pieces(layers: usize, range: &Range<usize>) -> Vec<String> {
    let mut names = vec!["tables".to_string()];
    if range.start == 0 {
        names.push("embed".into());
    }
    if range.end == layers {
        names.push("head".into());
    }
    names.extend(range.clone().map(|i| format!("layer.{i}")));
    names
}

/// The pieces (as `(bytes, sha256)` for [`super::ExactFile::open_pieces`]) that the stage
/// running layers `range` needs, taken from all of a model's `pieces`.
pub fn stage_slice<'a>(
    pieces: &'a [Piece],
    layers: usize,
    range: &Range<usize>,
) -> Vec<(&'a [u8], &'a str)> {
    let wanted = stage_pieces(layers, range);
    pieces
        .iter()
        .filter(|p| wanted.contains(&p.name))
        .map(|p| (p.bytes.as_slice(), p.sha256.as_str()))
        .collect()
}

/// `layers` cut into `stages` contiguous ranges of (nearly) equal length, longer ones first.
pub fn stage_ranges(layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    if stages == 0 || stages > layers {
        return Err(ModelError::Input(format!(
            "{stages} stages for {layers} layers: a pipeline has 1 to {layers} stages"
        )));
    }
    let (base, extra) = (layers / stages, layers % stages);
    let mut start = 0;
    let ranges: Vec<Range<usize>> = (0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect();
    assert_eq!(start, layers, "stage ranges cover every layer");
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_map_to_their_pieces() {
        assert_eq!(piece_of("act").as_deref(), Some("tables"));
        assert_eq!(piece_of("token_embd.requant").as_deref(), Some("embed"));
        assert_eq!(piece_of("output_norm.gamma").as_deref(), Some("head"));
        assert_eq!(piece_of("layer.12.wq.q").as_deref(), Some("layer.12"));
        assert_eq!(piece_of("layer.012.wq.q"), None);
        assert_eq!(piece_of("layer.x.wq"), None);
        assert_eq!(piece_of("other"), None);
    }

    #[test]
    fn ranges_cover_the_layers_in_order() {
        for layers in 1..40 {
            for stages in 1..=layers {
                let r = stage_ranges(layers, stages).unwrap();
                assert_eq!(r.len(), stages);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[stages - 1].end, layers);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
        assert!(stage_ranges(30, 0).is_err());
        assert!(stage_ranges(3, 4).is_err());
        assert_eq!(stage_ranges(30, 3).unwrap(), vec![0..10, 10..20, 20..30]);
    }

    #[test]
    fn stages_ask_for_their_layers_and_ends() {
        assert_eq!(
            stage_pieces(4, &(0..2)),
            ["tables", "embed", "layer.0", "layer.1"]
        );
        assert_eq!(
            stage_pieces(4, &(2..4)),
            ["tables", "head", "layer.2", "layer.3"]
        );
        assert_eq!(
            stage_pieces(1, &(0..1)),
            ["tables", "embed", "head", "layer.0"]
        );
    }
}

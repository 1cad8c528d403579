//! The frame codec: the protocol version as two little-endian bytes, then the message in
//! postcard. The size bound is checked before any decoding, so an oversized frame costs
//! nothing, and postcard never allocates more than the frame holds.

use serde::{Serialize, de::DeserializeOwned};

use crate::{PROTOCOL_VERSION, ProtocolError};

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let out = PROTOCOL_VERSION.to_le_bytes().to_vec();
    postcard::to_extend(message, out).expect("protocol messages always serialise")
}

/// Decodes one frame of at most `limit` bytes. Trailing bytes are an error, so a frame has
/// exactly one meaning.
pub fn decode<T: DeserializeOwned>(frame: &[u8], limit: usize) -> Result<T, ProtocolError> {
    if frame.len() > limit {
        return Err(ProtocolError::TooLarge {
            size: frame.len(),
            limit,
        });
    }
    let (version, body) = frame.split_at_checked(2).ok_or(ProtocolError::Truncated)?;
    let version = u16::from_le_bytes([version[0], version[1]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: version });
    }
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(message)
}

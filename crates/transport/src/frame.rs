//! Messages cut into chunks that fit any data channel, and put back together with every
//! length checked before anything is allocated.
//!
//! A chunk is a 16-byte header, four little-endian `u32`s — the message's sequence number,
//! the chunk's index, the message's chunk count and its total length — and then at most
//! [`CHUNK_PAYLOAD`] bytes. Every chunk but the last is full. Chunks arrive in order (the
//! channel is ordered and reliable); anything else is a broken or hostile sender, and the
//! reassembler drops that message and waits for the next one's first chunk.

use crate::TransportError;

/// Bytes of a chunk's header.
pub const HEADER: usize = 16;
/// The largest chunk on the wire: the default SCTP message size every WebRTC stack accepts.
pub const MAX_CHUNK: usize = 64 << 10;
/// Payload bytes in a full chunk.
pub const CHUNK_PAYLOAD: usize = MAX_CHUNK - HEADER;
/// The largest message any link carries (a prefill's activations of a large model).
pub const MAX_MESSAGE: usize = 64 << 20;

const _: () = assert!(MAX_MESSAGE.div_ceil(CHUNK_PAYLOAD) < u32::MAX as usize);
const _: () = assert!(MAX_MESSAGE < u32::MAX as usize);

/// The chunks of message number `seq`.
pub fn chunks(seq: u32, message: &[u8]) -> Result<Vec<Vec<u8>>, TransportError> {
    if message.len() > MAX_MESSAGE {
        return Err(TransportError::TooLarge {
            size: message.len(),
            limit: MAX_MESSAGE,
        });
    }
    let count = message.len().div_ceil(CHUNK_PAYLOAD).max(1);
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let body = &message[(index * CHUNK_PAYLOAD).min(message.len())
            ..((index + 1) * CHUNK_PAYLOAD).min(message.len())];
        let mut chunk = Vec::with_capacity(HEADER + body.len());
        for field in [seq, index as u32, count as u32, message.len() as u32] {
            chunk.extend_from_slice(&field.to_le_bytes());
        }
        chunk.extend_from_slice(body);
        debug_assert!(chunk.len() <= MAX_CHUNK);
        out.push(chunk);
    }
    Ok(out)
}

/// Puts chunks back into messages of at most `limit` bytes.
#[derive(Debug)]
pub struct Reassembler {
    limit: usize,
    /// The message being assembled: its sequence number, chunk count, total length, the next
    /// chunk index expected and the bytes so far. Invariant: `bytes.len() == next ×
    /// CHUNK_PAYLOAD ≤ total` while `next < count`.
    current: Option<Partial>,
    /// After a broken message, chunks are dropped until one with index 0.
    skipping: bool,
}

#[derive(Debug)]
struct Partial {
    seq: u32,
    count: u32,
    total: usize,
    next: u32,
    bytes: Vec<u8>,
}

impl Reassembler {
    pub fn new(limit: usize) -> Self {
        assert!(
            limit <= MAX_MESSAGE,
            "a link's limit is at most MAX_MESSAGE"
        );
        Self {
            limit,
            current: None,
            skipping: false,
        }
    }

    /// Takes one chunk: `Ok(Some(message))` when it completes one, `Ok(None)` when more are
    /// needed, an error when the chunk breaks the format (that message is dropped).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Option<Vec<u8>>, TransportError> {
        let result = self.accept(chunk);
        if result.is_err() {
            self.current = None;
            self.skipping = true;
        }
        result
    }

    fn accept(&mut self, chunk: &[u8]) -> Result<Option<Vec<u8>>, TransportError> {
        let bad = |m: String| Err(TransportError::Malformed(m));
        if chunk.len() < HEADER || chunk.len() > MAX_CHUNK {
            return bad(format!(
                "a chunk of {} bytes ({HEADER} to {MAX_CHUNK})",
                chunk.len()
            ));
        }
        let field = |i: usize| u32::from_le_bytes(chunk[4 * i..4 * i + 4].try_into().unwrap());
        let (seq, index, count, total) = (field(0), field(1), field(2), field(3) as usize);
        let body = &chunk[HEADER..];
        if self.skipping {
            if index != 0 {
                return Ok(None);
            }
            self.skipping = false;
        }
        if index == 0 {
            if let Some(p) = &self.current {
                return bad(format!(
                    "message {} was cut off after {} of {} chunks by message {seq}",
                    p.seq, p.next, p.count
                ));
            }
            if total > self.limit {
                return Err(TransportError::TooLarge {
                    size: total,
                    limit: self.limit,
                });
            }
            if count as usize != total.div_ceil(CHUNK_PAYLOAD).max(1) {
                return bad(format!("{count} chunks announced for {total} bytes"));
            }
            self.current = Some(Partial {
                seq,
                count,
                total,
                next: 0,
                // Grown as chunks arrive: a header alone never reserves the whole message.
                bytes: Vec::with_capacity(total.min(16 * CHUNK_PAYLOAD)),
            });
        }
        let Some(p) = &mut self.current else {
            return bad(format!("chunk {index} of message {seq} without its start"));
        };
        if seq != p.seq || index != p.next || count != p.count || total != p.total {
            return bad(format!(
                "chunk {index}/{count} of message {seq} ({total} bytes) where chunk {}/{} of message {} ({} bytes) was due",
                p.next, p.count, p.seq, p.total
            ));
        }
        let want = if index + 1 == count {
            total - index as usize * CHUNK_PAYLOAD
        } else {
            CHUNK_PAYLOAD
        };
        if body.len() != want {
            return bad(format!(
                "chunk {index} of message {seq} carries {} bytes, not {want}",
                body.len()
            ));
        }
        p.bytes.extend_from_slice(body);
        p.next += 1;
        if p.next < p.count {
            return Ok(None);
        }
        let done = self.current.take().expect("a message is being assembled");
        assert_eq!(done.bytes.len(), done.total);
        Ok(Some(done.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(len: usize) {
        let message: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let chunks = chunks(7, &message).unwrap();
        assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK));
        let mut r = Reassembler::new(MAX_MESSAGE);
        let (last, rest) = chunks.split_last().unwrap();
        for c in rest {
            assert_eq!(r.push(c).unwrap(), None);
        }
        assert_eq!(r.push(last).unwrap().unwrap(), message);
    }

    #[test]
    fn messages_of_any_length_come_back_whole() {
        for len in [
            0,
            1,
            CHUNK_PAYLOAD - 1,
            CHUNK_PAYLOAD,
            CHUNK_PAYLOAD + 1,
            3 * CHUNK_PAYLOAD,
            1 << 20,
        ] {
            roundtrip(len);
        }
    }

    #[test]
    fn broken_chunks_are_refused_and_the_next_message_still_arrives() {
        let big = vec![1u8; 3 * CHUNK_PAYLOAD];
        let good = chunks(1, &big).unwrap();
        let next = chunks(2, b"next").unwrap();
        let header = |seq: u32, index: u32, count: u32, total: u32| {
            let mut c = Vec::new();
            for f in [seq, index, count, total] {
                c.extend_from_slice(&f.to_le_bytes());
            }
            c
        };
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("short", vec![vec![0; 3]]),
            ("over the limit", vec![header(1, 0, 1, 2 << 20)]),
            ("wrong count", vec![header(1, 0, 5, 10)]),
            ("no start", vec![good[1].clone()]),
            ("gap", vec![good[0].clone(), good[2].clone()]),
            ("cut off", vec![good[0].clone(), next[0].clone()]),
            (
                "short body",
                vec![{
                    let mut c = header(1, 0, 1, 10);
                    c.extend_from_slice(&[0; 4]);
                    c
                }],
            ),
            ("oversized chunk", vec![vec![0; MAX_CHUNK + 1]]),
        ];
        for (what, sequence) in cases {
            let mut r = Reassembler::new(1 << 20);
            let errors = sequence
                .iter()
                .map(|c| r.push(c))
                .filter(|x| x.is_err())
                .count();
            assert_eq!(errors, 1, "{what}: one error");
            // Leftover chunks of the broken message are dropped; the next message arrives.
            for c in &good[1..] {
                assert_eq!(r.push(c).unwrap(), None, "{what}");
            }
            assert_eq!(r.push(&next[0]).unwrap().unwrap(), b"next", "{what}");
        }
        assert!(matches!(
            chunks(1, &vec![0; MAX_MESSAGE + 1]),
            Err(TransportError::TooLarge { .. })
        ));
    }
}

//! Links between pipeline stages: one stage's activations to the next.
//!
//! This crate owns the [`Link`] trait — send and receive whole messages, bounded and
//! length-checked ([`frame`]) — and its implementations: [`native::RtcLink`] over a WebRTC
//! data channel (the `webrtc` crate; signalling as [`tabula_protocol::Signal`]s, which the
//! caller carries over its worker socket), and [`ChannelLink`], the same chunks over a pair of
//! channels, which is how a stage talks through the coordinator's relay when no direct path
//! comes up. The browser's implementation (`RTCPeerConnection` through `web-sys`) lives in
//! `tabula-web` and speaks the same chunk format.
//!
//! A link moves opaque bytes: what a message means, and checking it against its sender's
//! signed hash, is the stage's business. This crate must not depend on models, the worker or
//! the coordinator.

pub mod frame;
#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod native;

use std::sync::atomic::{AtomicU32, Ordering};

use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt, lock::Mutex};

pub use frame::{MAX_CHUNK, MAX_MESSAGE};

/// What can go wrong on a link.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    #[error("a message of {size} bytes exceeds this link's limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed chunk: {0}")]
    Malformed(String),
    #[error("signalling: {0}")]
    Signalling(String),
    #[error("no direct connection within {0} ms")]
    Timeout(u64),
    #[error("the link is closed")]
    Closed,
    #[error("WebRTC: {0}")]
    Rtc(String),
}

/// How a link's bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A peer-to-peer data channel.
    Direct,
    /// Through the coordinator.
    Relayed,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
        }
    }
}

/// One stage's connection to a neighbour: whole messages in order, each at most the
/// receiver's limit. A chunk that breaks the format costs the message it belongs to (the
/// receiver gets an error for it) and nothing after it.
// The browser's futures are not `Send`, so the trait promises nothing about it.
#[allow(async_fn_in_trait)]
pub trait Link {
    fn path(&self) -> Path;
    /// Sends one message of at most [`MAX_MESSAGE`] bytes.
    async fn send(&self, message: &[u8]) -> Result<(), TransportError>;
    /// The next message, or why there is none: a broken one (`Malformed`, `TooLarge`; the
    /// link goes on) or `Closed` (for good).
    async fn recv(&self) -> Result<Vec<u8>, TransportError>;
    async fn close(&self);
}

/// A [`Link`] over a pair of channels carrying chunks: the relay path (the worker's socket
/// loop forwards the chunks to and from the coordinator) and tests.
pub struct ChannelLink {
    out: Mutex<mpsc::Sender<Vec<u8>>>,
    inbox: Mutex<(mpsc::Receiver<Vec<u8>>, frame::Reassembler)>,
    seq: AtomicU32,
    path: Path,
}

impl ChannelLink {
    /// A link sending chunks into `out` and reading them from `inbox`; messages over `limit`
    /// bytes are refused.
    pub fn new(
        out: mpsc::Sender<Vec<u8>>,
        inbox: mpsc::Receiver<Vec<u8>>,
        limit: usize,
        path: Path,
    ) -> Self {
        Self {
            out: Mutex::new(out),
            inbox: Mutex::new((inbox, frame::Reassembler::new(limit))),
            seq: AtomicU32::new(0),
            path,
        }
    }

    /// Two ends joined to each other (tests, and a stage talking to itself).
    pub fn pair(limit: usize) -> (Self, Self) {
        let (a_out, b_in) = mpsc::channel(16);
        let (b_out, a_in) = mpsc::channel(16);
        (
            Self::new(a_out, a_in, limit, Path::Relayed),
            Self::new(b_out, b_in, limit, Path::Relayed),
        )
    }
}

impl Link for ChannelLink {
    fn path(&self) -> Path {
        self.path
    }

    async fn send(&self, message: &[u8]) -> Result<(), TransportError> {
        let chunks = frame::chunks(self.seq.fetch_add(1, Ordering::Relaxed), message)?;
        let mut out = self.out.lock().await;
        for c in chunks {
            out.send(c).await.map_err(|_| TransportError::Closed)?;
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        let mut guard = self.inbox.lock().await;
        let (inbox, reassembler) = &mut *guard;
        loop {
            let chunk = inbox.next().await.ok_or(TransportError::Closed)?;
            if let Some(message) = reassembler.push(&chunk)? {
                return Ok(message);
            }
        }
    }

    async fn close(&self) {
        self.out.lock().await.close_channel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_channel_pair_carries_messages_both_ways_and_refuses_oversized_ones() {
        {
            let (a, b) = ChannelLink::pair(1 << 20);
            let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            a.send(&big).await.unwrap();
            b.send(b"back").await.unwrap();
            assert_eq!(b.recv().await.unwrap(), big);
            assert_eq!(a.recv().await.unwrap(), b"back");
            // Over the receiver's limit: an error for that message, then the link goes on.
            let huge = vec![0u8; (1 << 20) + 1];
            let send = async {
                a.send(&huge).await.unwrap();
                a.send(b"after").await.unwrap();
            };
            let recv = async {
                assert!(matches!(
                    b.recv().await,
                    Err(TransportError::TooLarge { .. })
                ));
                assert_eq!(b.recv().await.unwrap(), b"after");
            };
            futures_util::future::join(send, recv).await;
            a.close().await;
            assert_eq!(b.recv().await, Err(TransportError::Closed));
        }
    }
}

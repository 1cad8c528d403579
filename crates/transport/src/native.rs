//! [`RtcLink`]: a [`Link`] over one ordered, reliable WebRTC data channel, with the `webrtc`
//! crate. Signalling goes out and comes in as [`Signal`]s; the caller carries them (the
//! worker over its socket to the coordinator, which hands them to the peer). Garbage from the
//! peer is refused with a precise error: a bad SDP ends the attempt (the caller falls back
//! to the relay), a bad ICE candidate is counted and skipped.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use rtc::{
    ice::mdns::MulticastDnsMode, peer_connection::configuration::setting_engine::SctpMaxMessageSize,
};
use tabula_protocol::Signal;
use tokio::{
    sync::{Mutex, mpsc, oneshot, watch},
    task::JoinHandle,
};
use webrtc::{
    data_channel::{DataChannel, DataChannelEvent},
    peer_connection::{
        PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
        RTCIceCandidateInit, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
        RTCSessionDescription, SettingEngineBuilder,
    },
};

use crate::{Link, Path, TransportError, frame};

/// Which side of the handshake a peer plays: the upstream stage offers, the downstream one
/// answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Offerer,
    Answerer,
}

/// How a link is made.
#[derive(Clone, Debug)]
pub struct RtcOptions {
    /// UDP addresses to gather candidates on. An explicit `127.0.0.1:0` is needed for
    /// loopback (a wildcard expands to the interfaces' addresses and skips loopback).
    pub bind: Vec<SocketAddr>,
    /// How long to wait for the data channel to open before giving up (the caller then
    /// relays through the coordinator).
    pub connect_timeout: Duration,
    /// The largest message this end accepts.
    pub limit: usize,
}

impl Default for RtcOptions {
    fn default() -> Self {
        Self {
            bind: vec![
                SocketAddr::from(([127, 0, 0, 1], 0)),
                SocketAddr::from(([0, 0, 0, 0], 0)),
            ],
            connect_timeout: Duration::from_secs(5),
            limit: frame::MAX_MESSAGE,
        }
    }
}

/// The most ICE candidates taken from one peer; the rest are counted as rejected.
pub const MAX_REMOTE_CANDIDATES: usize = 32;

/// The longest SDP or candidate text quoted back in an error.
const QUOTE: usize = 80;

fn rtc_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Rtc(e.to_string())
}

fn quote(text: &str) -> String {
    let mut q: String = text.chars().take(QUOTE).collect();
    if q.len() < text.len() {
        q.push('…');
    }
    format!("{q:?}")
}

struct Handler {
    signals: mpsc::UnboundedSender<Signal>,
    state: watch::Sender<RTCPeerConnectionState>,
    channels: mpsc::UnboundedSender<Arc<dyn DataChannel>>,
}

// Callbacks run on the connection's driver task: nothing in them may wait.
#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json().map(|c| serde_json::to_string(&c)) {
            Ok(Ok(json)) => {
                let _ = self.signals.send(Signal::Candidate { json });
            }
            Ok(Err(e)) => tracing::warn!("local ICE candidate: {e}"),
            Err(e) => tracing::warn!("local ICE candidate: {e}"),
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "peer connection");
        let _ = self.state.send(state);
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let _ = self.channels.send(channel);
    }
}

/// A connected data channel to one peer.
pub struct RtcLink {
    pc: Arc<dyn PeerConnection>,
    dc: Arc<dyn DataChannel>,
    inbox: Mutex<mpsc::Receiver<Result<Vec<u8>, TransportError>>>,
    seq: AtomicU32,
    rejected: Arc<AtomicU32>,
    tasks: Vec<JoinHandle<()>>,
}

impl RtcLink {
    /// ICE candidates from the peer that were refused (malformed or unusable) and skipped.
    pub fn rejected_candidates(&self) -> u32 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// Sets the peer's SDP (an offer when the peer is the offerer), with the reason when the
/// text is refused.
async fn set_remote(
    pc: &Arc<dyn PeerConnection>,
    sdp: String,
    peer: Role,
) -> Result<(), TransportError> {
    let what = match peer {
        Role::Offerer => "offer",
        Role::Answerer => "answer",
    };
    let quoted = quote(&sdp);
    let desc = match peer {
        Role::Offerer => RTCSessionDescription::offer(sdp),
        Role::Answerer => RTCSessionDescription::answer(sdp),
    }
    .map_err(|e| TransportError::Signalling(format!("the peer's SDP {what} {quoted}: {e}")))?;
    pc.set_remote_description(desc)
        .await
        .map_err(|e| TransportError::Signalling(format!("the peer's SDP {what}: {e}")))
}

/// Applies the peer's signals to `pc` until `incoming` ends. A bad SDP is fatal (reported
/// on `fatal`); a bad candidate is counted and skipped.
async fn apply_signals(
    pc: Arc<dyn PeerConnection>,
    role: Role,
    mut incoming: mpsc::Receiver<Signal>,
    out: mpsc::UnboundedSender<Signal>,
    rejected: Arc<AtomicU32>,
    fatal: oneshot::Sender<TransportError>,
) {
    let mut have_remote = false;
    let mut early: Vec<RTCIceCandidateInit> = Vec::new();
    // Candidates accepted (applied or waiting for the remote description).
    let mut taken = 0usize;
    let mut fatal = Some(fatal);
    let mut fail = |e: TransportError| {
        if let Some(f) = fatal.take() {
            let _ = f.send(e);
        }
    };
    while let Some(signal) = incoming.recv().await {
        if let Err(e) = signal.validate() {
            if matches!(signal, Signal::Candidate { .. }) {
                rejected.fetch_add(1, Ordering::Relaxed);
            } else {
                fail(TransportError::Signalling(e.to_string()));
            }
            continue;
        }
        let result: Result<(), TransportError> = async {
            match (signal, role) {
                (Signal::Offer { sdp }, Role::Answerer) if !have_remote => {
                    set_remote(&pc, sdp, Role::Offerer).await?;
                    have_remote = true;
                    let answer = pc.create_answer(None).await.map_err(rtc_err)?;
                    let _ = out.send(Signal::Answer {
                        sdp: answer.sdp.clone(),
                    });
                    pc.set_local_description(answer).await.map_err(rtc_err)?;
                }
                (Signal::Answer { sdp }, Role::Offerer) if !have_remote => {
                    set_remote(&pc, sdp, Role::Answerer).await?;
                    have_remote = true;
                }
                (Signal::Candidate { json }, _) => {
                    match serde_json::from_str::<RTCIceCandidateInit>(&json) {
                        // A peer offers a handful of candidates; past the cap it is flooding.
                        Ok(_) if taken >= MAX_REMOTE_CANDIDATES => {
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(c) if have_remote => {
                            taken += 1;
                            if let Err(e) = pc.add_ice_candidate(c).await {
                                rejected.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    "refused the peer's ICE candidate {}: {e}",
                                    quote(&json)
                                );
                            }
                        }
                        Ok(c) => {
                            taken += 1;
                            early.push(c);
                        }
                        Err(e) => {
                            rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "refused the peer's ICE candidate {}: {e}",
                                quote(&json)
                            );
                        }
                    }
                }
                (signal, role) => {
                    return Err(TransportError::Signalling(format!(
                        "unexpected {} for the {role:?}",
                        match signal {
                            Signal::Offer { .. } => "offer",
                            Signal::Answer { .. } => "answer",
                            Signal::Candidate { .. } => "candidate",
                        }
                    )));
                }
            }
            if have_remote {
                for c in early.drain(..) {
                    if pc.add_ice_candidate(c).await.is_err() {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("signalling: {e}");
            fail(e);
        }
    }
    // Unheard once the link is up; before that, the attempt cannot go on.
    fail(TransportError::Signalling(
        "the peer stopped signalling before the connection was made".into(),
    ));
}

/// Reads the data channel: reports it open, reassembles messages into `inbox` (waiting when
/// the receiver is slow, which holds the peer back), and ends when the channel or the
/// connection does.
async fn read_channel(
    dc: Arc<dyn DataChannel>,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    limit: usize,
    open: oneshot::Sender<()>,
    inbox: mpsc::Sender<Result<Vec<u8>, TransportError>>,
) {
    let mut open = Some(open);
    let mut reassembler = frame::Reassembler::new(limit);
    loop {
        let event = tokio::select! {
            e = dc.poll() => e,
            changed = state.changed() => {
                let gone = matches!(
                    *state.borrow(),
                    RTCPeerConnectionState::Disconnected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                );
                if changed.is_err() || gone {
                    return;
                }
                continue;
            }
        };
        match event {
            None | Some(DataChannelEvent::OnClose) => return,
            Some(DataChannelEvent::OnOpen) => {
                if let Some(o) = open.take() {
                    let _ = o.send(());
                }
            }
            Some(DataChannelEvent::OnMessage(m)) => match reassembler.push(&m.data) {
                Ok(None) => {}
                Ok(Some(message)) => {
                    if inbox.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("data channel: {e}");
                    if inbox.send(Err(e)).await.is_err() {
                        return;
                    }
                }
            },
            Some(_) => {}
        }
    }
}

/// Connects to one peer: `out` carries this side's signals to it, `incoming` brings its
/// signals here. Returns once the data channel is open, or fails within
/// `options.connect_timeout` with the reason (a bad SDP from the peer, a failed connection,
/// or the timeout).
pub async fn connect(
    role: Role,
    out: mpsc::UnboundedSender<Signal>,
    incoming: mpsc::Receiver<Signal>,
    options: RtcOptions,
) -> Result<RtcLink, TransportError> {
    let (state_tx, mut state_rx) = watch::channel(RTCPeerConnectionState::New);
    let (channels_tx, mut channels_rx) = mpsc::unbounded_channel();
    let handler = Handler {
        signals: out.clone(),
        state: state_tx,
        channels: channels_tx,
    };
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(256 << 10))
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(settings)
        .with_handler(Arc::new(handler))
        .with_udp_addrs(options.bind.clone())
        .with_data_channel_send_buffer_limit(4 << 20)
        .build()
        .await
        .map_err(rtc_err)?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let rejected = Arc::new(AtomicU32::new(0));
    let (fatal_tx, mut fatal_rx) = oneshot::channel();
    let mut tasks = vec![tokio::spawn(apply_signals(
        pc.clone(),
        role,
        incoming,
        out.clone(),
        rejected.clone(),
        fatal_tx,
    ))];
    let reader_state = pc_state(&state_rx);
    let setup = async {
        let dc = match role {
            Role::Offerer => {
                let dc = pc
                    .create_data_channel("tabula", None)
                    .await
                    .map_err(rtc_err)?;
                let offer = pc.create_offer(None).await.map_err(rtc_err)?;
                let sdp = offer.sdp.clone();
                // Set before it is sent, or the answer could arrive first. Candidates gathered
                // meanwhile reach the peer before the offer; it keeps them until then.
                pc.set_local_description(offer).await.map_err(rtc_err)?;
                let _ = out.send(Signal::Offer { sdp });
                dc
            }
            Role::Answerer => loop {
                tokio::select! {
                    dc = channels_rx.recv() => break dc.ok_or(TransportError::Closed)?,
                    _ = state_rx.changed() => {
                        if matches!(*state_rx.borrow(), RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                            return Err(TransportError::Rtc("the connection failed".into()));
                        }
                    }
                }
            },
        };
        Ok::<_, TransportError>(dc)
    };
    let result = tokio::time::timeout(options.connect_timeout, async {
        let dc = tokio::select! {
            dc = setup => dc?,
            e = &mut fatal_rx => return Err(e.unwrap_or(TransportError::Closed)),
        };
        let (open_tx, open_rx) = oneshot::channel();
        let (inbox_tx, inbox_rx) = mpsc::channel(8);
        let reader = tokio::spawn(read_channel(
            dc.clone(),
            reader_state,
            options.limit,
            open_tx,
            inbox_tx,
        ));
        tokio::select! {
            opened = open_rx => {
                opened.map_err(|_| TransportError::Rtc("the data channel closed before it opened".into()))?;
            }
            e = &mut fatal_rx => {
                reader.abort();
                return Err(e.unwrap_or(TransportError::Closed));
            }
        }
        Ok((dc, reader, inbox_rx))
    })
    .await;
    match result {
        Ok(Ok((dc, reader, inbox))) => {
            tasks.push(reader);
            Ok(RtcLink {
                pc,
                dc,
                inbox: Mutex::new(inbox),
                seq: AtomicU32::new(0),
                rejected,
                tasks,
            })
        }
        Ok(Err(e)) => {
            shut(&pc, &tasks).await;
            Err(e)
        }
        Err(_) => {
            shut(&pc, &tasks).await;
            Err(TransportError::Timeout(
                options.connect_timeout.as_millis() as u64
            ))
        }
    }
}

fn pc_state(
    rx: &watch::Receiver<RTCPeerConnectionState>,
) -> watch::Receiver<RTCPeerConnectionState> {
    let mut rx = rx.clone();
    rx.mark_unchanged();
    rx
}

async fn shut(pc: &Arc<dyn PeerConnection>, tasks: &[JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
    // Dropping a peer connection does not stop its driver: close it, or its sockets stay.
    let _ = pc.close().await;
}

impl Link for RtcLink {
    fn path(&self) -> Path {
        Path::Direct
    }

    async fn send(&self, message: &[u8]) -> Result<(), TransportError> {
        for chunk in frame::chunks(self.seq.fetch_add(1, Ordering::Relaxed), message)? {
            self.dc
                .send(BytesMut::from(&chunk[..]))
                .await
                .map_err(|e| match e {
                    webrtc::error::Error::ErrDataChannelClosed
                    | webrtc::error::Error::ErrConnectionClosed => TransportError::Closed,
                    e => rtc_err(e),
                })?;
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        self.inbox
            .lock()
            .await
            .recv()
            .await
            .unwrap_or(Err(TransportError::Closed))
    }

    async fn close(&self) {
        let _ = self.dc.close().await;
        shut(&self.pc, &self.tasks).await;
    }
}

impl Drop for RtcLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pc = self.pc.clone();
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

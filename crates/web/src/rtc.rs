//! WebRTC between pipeline stages in the browser, through `web-sys`.
//!
//! Chromium offers `RTCPeerConnection` only to documents, not to Web Workers, but it lets a
//! document hand an `RTCDataChannel` to a worker (a transferable object). So the two halves
//! live on two sides of `postMessage`:
//! - [`PeerConnection`] runs in the document (the volunteer page, or the extension's
//!   offscreen document): offer or answer, ICE candidates in and out, and it hands the data
//!   channel over as soon as it exists (before it opens, as a transfer requires);
//! - [`DataChannelLink`] runs in the volunteer's Web Worker: a [`Link`] over that channel, in
//!   `tabula-transport`'s chunk format, so a browser stage and a native one (the `webrtc`
//!   crate) speak the same bytes.
//!
//! Everything the peer sends is bounded: the protocol bounds signals before they get here,
//! candidates are capped per connection, each message is reassembled under the receiver's
//! limit and the bytes waiting to be read are capped.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    rc::Rc,
};

use futures_channel::oneshot;
use futures_util::{FutureExt, lock::Mutex, pin_mut};
use serde::Deserialize;
use tabula_transport::{Link, MAX_CHUNK, Path, TransportError, frame};
use wasm_bindgen::{JsCast, prelude::*};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelState, RtcDataChannelType,
    RtcIceCandidateInit, RtcPeerConnection, RtcPeerConnectionIceEvent, RtcSdpType,
    RtcSessionDescriptionInit,
};

use crate::js_err;

/// The most ICE candidates taken from one peer; a peer offers a handful.
const MAX_PEER_CANDIDATES: usize = 32;
/// The label of the one data channel between two stages (the native side uses the same).
const LABEL: &str = "tabula";
/// Bytes queued in the browser's send buffer before `send` waits for it to drain.
const SEND_HIGH_WATER: u32 = 1 << 20;
const SEND_LOW_WATER: u32 = 256 << 10;
const _: () = assert!(SEND_LOW_WATER < SEND_HIGH_WATER && MAX_CHUNK as u32 <= SEND_LOW_WATER);

fn rtc_err(e: JsValue) -> TransportError {
    TransportError::Rtc(
        e.as_string()
            .or_else(|| {
                e.dyn_ref::<js_sys::Error>()
                    .map(|e| String::from(e.message()))
            })
            .unwrap_or_else(|| format!("{e:?}")),
    )
}

/// `RTCIceCandidateInit` as `RTCIceCandidate.toJSON()` and the native side write it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CandidateJson {
    candidate: String,
    sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex")]
    sdp_m_line_index: Option<u16>,
}

struct PeerState {
    pc: RtcPeerConnection,
    offerer: bool,
    /// The peer's description was applied; candidates before it wait in `early`.
    have_remote: Cell<bool>,
    early: RefCell<Vec<RtcIceCandidateInit>>,
    /// Candidates taken from the peer. Invariant: ≤ [`MAX_PEER_CANDIDATES`].
    candidates: Cell<usize>,
    /// `on_signal(kind, text)`: `kind` is `offer`, `answer` or `candidate`.
    on_signal: js_sys::Function,
}

/// One `RTCPeerConnection` to a neighbouring stage, in the document.
#[wasm_bindgen]
pub struct PeerConnection {
    state: Rc<PeerState>,
    _on_ice: Closure<dyn FnMut(RtcPeerConnectionIceEvent)>,
    _on_channel: Option<Closure<dyn FnMut(RtcDataChannelEvent)>>,
}

#[wasm_bindgen]
impl PeerConnection {
    /// A connection where this side `offerer`s (the upstream stage) or answers. This side's
    /// signals go to `on_signal(kind, text)`; the data channel goes to `on_channel(channel)`
    /// as soon as it exists, unopened, so the caller can transfer it to the worker in the
    /// same task. An offerer then calls [`PeerConnection::start`].
    pub fn create(
        offerer: bool,
        on_signal: js_sys::Function,
        on_channel: js_sys::Function,
    ) -> Result<PeerConnection, JsError> {
        let pc = RtcPeerConnection::new().map_err(|e| js_err(rtc_err(e)))?;
        let state = Rc::new(PeerState {
            pc,
            offerer,
            have_remote: Cell::new(false),
            early: RefCell::new(Vec::new()),
            candidates: Cell::new(0),
            on_signal,
        });
        let on_ice = {
            let state = state.clone();
            Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(
                move |event: RtcPeerConnectionIceEvent| {
                    let Some(candidate) = event.candidate() else {
                        return; // gathering is complete
                    };
                    if candidate.candidate().is_empty() {
                        return;
                    }
                    if let Ok(json) = js_sys::JSON::stringify(&candidate.to_json()) {
                        let _ = state.on_signal.call2(
                            &JsValue::NULL,
                            &"candidate".into(),
                            &json.into(),
                        );
                    }
                },
            )
        };
        state
            .pc
            .set_onicecandidate(Some(on_ice.as_ref().unchecked_ref()));
        let on_channel_event = if offerer {
            let channel = state.pc.create_data_channel(LABEL);
            on_channel
                .call1(&JsValue::NULL, &channel)
                .map_err(|e| js_err(rtc_err(e)))?;
            None
        } else {
            let closure = Closure::<dyn FnMut(RtcDataChannelEvent)>::new(
                move |event: RtcDataChannelEvent| {
                    let channel = event.channel();
                    if channel.label() == LABEL {
                        let _ = on_channel.call1(&JsValue::NULL, &channel);
                    } else {
                        channel.close(); // not ours to carry
                    }
                },
            );
            state
                .pc
                .set_ondatachannel(Some(closure.as_ref().unchecked_ref()));
            Some(closure)
        };
        Ok(PeerConnection {
            state,
            _on_ice: on_ice,
            _on_channel: on_channel_event,
        })
    }

    /// The offerer's offer, sent through `on_signal`.
    pub async fn start(&self) -> Result<(), JsError> {
        let s = &self.state;
        if !s.offerer {
            return Err(JsError::new("only the offering side starts"));
        }
        let offer = JsFuture::from(s.pc.create_offer())
            .await
            .map_err(|e| js_err(rtc_err(e)))?;
        let sdp = js_sys::Reflect::get(&offer, &"sdp".into())
            .ok()
            .and_then(|v| v.as_string())
            .ok_or_else(|| JsError::new("the browser made an offer without SDP"))?;
        let init = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
        init.set_sdp(&sdp);
        JsFuture::from(s.pc.set_local_description(&init))
            .await
            .map_err(|e| js_err(rtc_err(e)))?;
        s.on_signal
            .call2(&JsValue::NULL, &"offer".into(), &sdp.into())
            .map_err(|e| js_err(rtc_err(e)))?;
        Ok(())
    }

    /// Applies one signal from the peer (`kind` as in `on_signal`). Call them in the order
    /// they came. A malformed or unexpected signal is an error and changes nothing; a
    /// candidate past the cap is refused.
    pub async fn signal(&self, kind: &str, text: &str) -> Result<(), JsError> {
        let s = &self.state;
        match (kind, s.offerer) {
            ("offer", false) | ("answer", true) if !s.have_remote.get() => {
                let (remote, local) = if s.offerer {
                    (RtcSdpType::Answer, None)
                } else {
                    (RtcSdpType::Offer, Some(RtcSdpType::Answer))
                };
                let init = RtcSessionDescriptionInit::new(remote);
                init.set_sdp(text);
                JsFuture::from(s.pc.set_remote_description(&init))
                    .await
                    .map_err(|e| js_err(rtc_err(e)))?;
                s.have_remote.set(true);
                if let Some(local) = local {
                    let answer = JsFuture::from(s.pc.create_answer())
                        .await
                        .map_err(|e| js_err(rtc_err(e)))?;
                    let sdp = js_sys::Reflect::get(&answer, &"sdp".into())
                        .ok()
                        .and_then(|v| v.as_string())
                        .ok_or_else(|| JsError::new("the browser made an answer without SDP"))?;
                    let init = RtcSessionDescriptionInit::new(local);
                    init.set_sdp(&sdp);
                    JsFuture::from(s.pc.set_local_description(&init))
                        .await
                        .map_err(|e| js_err(rtc_err(e)))?;
                    s.on_signal
                        .call2(&JsValue::NULL, &"answer".into(), &sdp.into())
                        .map_err(|e| js_err(rtc_err(e)))?;
                }
                let early = std::mem::take(&mut *s.early.borrow_mut());
                for c in early {
                    // A candidate this browser cannot use (the native side's mDNS-less
                    // addresses are fine; a hostile one may not be) costs only itself.
                    if let Err(e) = JsFuture::from(
                        s.pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&c)),
                    )
                    .await
                    {
                        tracing::info!("skipped a peer's ICE candidate: {:?}", rtc_err(e));
                    }
                }
                Ok(())
            }
            ("candidate", _) => {
                if s.candidates.get() >= MAX_PEER_CANDIDATES {
                    return Err(JsError::new(&format!(
                        "the peer sent more than {MAX_PEER_CANDIDATES} ICE candidates"
                    )));
                }
                let parsed: CandidateJson = serde_json::from_str(text)
                    .map_err(|e| JsError::new(&format!("a malformed ICE candidate: {e}")))?;
                s.candidates.set(s.candidates.get() + 1);
                let init = RtcIceCandidateInit::new(&parsed.candidate);
                init.set_sdp_mid(parsed.sdp_mid.as_deref());
                init.set_sdp_m_line_index(parsed.sdp_m_line_index);
                if !s.have_remote.get() {
                    s.early.borrow_mut().push(init);
                    return Ok(());
                }
                JsFuture::from(s.pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init)))
                    .await
                    .map_err(|e| js_err(rtc_err(e)))?;
                Ok(())
            }
            (kind, offerer) => Err(JsError::new(&format!(
                "an unexpected `{kind}` signal for the {} side{}",
                if offerer { "offering" } else { "answering" },
                if s.have_remote.get() {
                    " (the peer's description is already set)"
                } else {
                    ""
                }
            ))),
        }
    }

    /// `RTCPeerConnection.connectionState`, for the page's diagnostics.
    #[wasm_bindgen(js_name = connectionState)]
    pub fn connection_state(&self) -> String {
        format!("{:?}", self.state.pc.connection_state()).to_lowercase()
    }

    pub fn close(&self) {
        self.state.pc.close();
    }
}

/// What the channel's event handlers share with the link.
struct Shared {
    /// Chunks received and not read yet, and their bytes. Invariant: `queued_bytes` is the
    /// sum of the chunks' lengths and ≤ the link's `max_queued`.
    inbox: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// The peer sent more than the link holds, or the channel closed: no more chunks.
    ended: Option<TransportError>,
    /// Woken when a chunk arrives or the channel ends.
    readable: Option<oneshot::Sender<()>>,
    /// Woken when the send buffer drains or the channel ends.
    writable: Option<oneshot::Sender<()>>,
    /// Woken when the channel opens or ends.
    opened: Option<oneshot::Sender<()>>,
}

impl Shared {
    fn wake(&mut self) {
        if let Some(w) = self.readable.take() {
            let _ = w.send(());
        }
        if let Some(w) = self.writable.take() {
            let _ = w.send(());
        }
        if let Some(w) = self.opened.take() {
            let _ = w.send(());
        }
    }
}

/// A [`Link`] over a data channel a [`PeerConnection`] handed to this worker.
pub struct DataChannelLink {
    channel: RtcDataChannel,
    shared: Rc<RefCell<Shared>>,
    reassembler: Mutex<frame::Reassembler>,
    seq: Cell<u32>,
    _handlers: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl DataChannelLink {
    /// Takes over `channel` at once (in the task it arrived in, so that nothing it receives
    /// goes unheard). Messages over `limit` bytes are refused; a peer that sends more than
    /// twice that before it is read is cut off.
    pub fn attach(channel: RtcDataChannel, limit: usize) -> Self {
        channel.set_binary_type(RtcDataChannelType::Arraybuffer);
        channel.set_buffered_amount_low_threshold(SEND_LOW_WATER);
        let max_queued = limit.saturating_mul(2).max(4 * MAX_CHUNK);
        let shared = Rc::new(RefCell::new(Shared {
            inbox: VecDeque::new(),
            queued_bytes: 0,
            ended: None,
            readable: None,
            writable: None,
            opened: None,
        }));
        let on_message = {
            let shared = shared.clone();
            Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
                let Some(event) = event.dyn_ref::<MessageEvent>() else {
                    return;
                };
                let mut s = shared.borrow_mut();
                if s.ended.is_some() {
                    return;
                }
                let data = event.data();
                let Some(buffer) = data.dyn_ref::<js_sys::ArrayBuffer>() else {
                    s.ended = Some(TransportError::Malformed(
                        "the peer sent text on a binary channel".into(),
                    ));
                    s.wake();
                    return;
                };
                let len = buffer.byte_length() as usize;
                if s.queued_bytes + len > max_queued {
                    s.ended = Some(TransportError::TooLarge {
                        size: s.queued_bytes + len,
                        limit: max_queued,
                    });
                } else {
                    s.queued_bytes += len;
                    s.inbox.push_back(js_sys::Uint8Array::new(buffer).to_vec());
                }
                s.wake();
            })
        };
        let on_end = {
            let shared = shared.clone();
            Closure::<dyn FnMut(JsValue)>::new(move |_| {
                let mut s = shared.borrow_mut();
                s.ended.get_or_insert(TransportError::Closed);
                s.wake();
            })
        };
        let on_low = {
            let shared = shared.clone();
            Closure::<dyn FnMut(JsValue)>::new(move |_| {
                if let Some(w) = shared.borrow_mut().writable.take() {
                    let _ = w.send(());
                }
            })
        };
        let on_open = {
            let shared = shared.clone();
            Closure::<dyn FnMut(JsValue)>::new(move |_| {
                if let Some(w) = shared.borrow_mut().opened.take() {
                    let _ = w.send(());
                }
            })
        };
        channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        channel.set_onclose(Some(on_end.as_ref().unchecked_ref()));
        channel.set_onerror(Some(on_end.as_ref().unchecked_ref()));
        channel.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
        channel.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        DataChannelLink {
            channel,
            shared,
            reassembler: Mutex::new(frame::Reassembler::new(limit)),
            seq: Cell::new(0),
            _handlers: vec![on_message, on_end, on_low, on_open],
        }
    }

    /// Waits at most `wait_ms` for the channel to open; on a timeout it is closed.
    pub async fn wait_open(&self, wait_ms: u32) -> Result<(), TransportError> {
        loop {
            match self.channel.ready_state() {
                RtcDataChannelState::Open => return Ok(()),
                RtcDataChannelState::Connecting => {}
                _ => return Err(TransportError::Closed),
            }
            if let Some(e) = &self.shared.borrow().ended {
                return Err(e.clone());
            }
            let (tx, opened) = oneshot::channel::<()>();
            self.shared.borrow_mut().opened = Some(tx);
            let timeout = sleep(wait_ms).fuse();
            let opened = opened.fuse();
            pin_mut!(timeout, opened);
            futures_util::select! {
                _ = opened => {}
                () = timeout => {
                    self.channel.close();
                    return Err(TransportError::Timeout(u64::from(wait_ms)));
                }
            }
        }
    }
}

impl Drop for DataChannelLink {
    fn drop(&mut self) {
        for clear in [
            RtcDataChannel::set_onmessage,
            RtcDataChannel::set_onclose,
            RtcDataChannel::set_onerror,
            RtcDataChannel::set_onbufferedamountlow,
            RtcDataChannel::set_onopen,
        ] {
            clear(&self.channel, None);
        }
        self.channel.close();
    }
}

impl Link for DataChannelLink {
    fn path(&self) -> Path {
        Path::Direct
    }

    async fn send(&self, message: &[u8]) -> Result<(), TransportError> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        for chunk in frame::chunks(seq, message)? {
            loop {
                if let Some(e) = &self.shared.borrow().ended {
                    return Err(e.clone());
                }
                if self.channel.ready_state() != RtcDataChannelState::Open {
                    return Err(TransportError::Closed);
                }
                if self.channel.buffered_amount() <= SEND_HIGH_WATER {
                    break;
                }
                let (tx, rx) = oneshot::channel();
                self.shared.borrow_mut().writable = Some(tx);
                let _ = rx.await;
            }
            self.channel.send_with_u8_array(&chunk).map_err(rtc_err)?;
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        let mut reassembler = self.reassembler.lock().await;
        loop {
            let chunk = {
                let mut s = self.shared.borrow_mut();
                match s.inbox.pop_front() {
                    Some(chunk) => {
                        s.queued_bytes -= chunk.len();
                        Some(chunk)
                    }
                    None => None,
                }
            };
            if let Some(chunk) = chunk {
                if let Some(message) = reassembler.push(&chunk)? {
                    return Ok(message);
                }
                continue;
            }
            let wake = {
                let mut s = self.shared.borrow_mut();
                if let Some(e) = &s.ended {
                    return Err(e.clone());
                }
                let (tx, rx) = oneshot::channel();
                s.readable = Some(tx);
                rx
            };
            let _ = wake.await;
        }
    }

    async fn close(&self) {
        self.channel.close();
    }
}

/// Resolves after `ms` milliseconds (the global `setTimeout`, in a document or a worker).
pub async fn sleep(ms: u32) {
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        let set_timeout = js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match set_timeout {
            Some(f) => {
                let _ = f.call2(&JsValue::NULL, &resolve, &JsValue::from(ms));
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = JsFuture::from(promise).await;
}

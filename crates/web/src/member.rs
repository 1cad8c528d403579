//! A browser tab's part in a pipeline session: the same stage as a native worker's
//! (`tabula-worker`'s [`StageRunner`] and [`MemberCore`]), with the browser's I/O. Its links
//! are [`DataChannelLink`]s that the document opened (see [`crate::rtc`]), with the
//! coordinator's relay always beside them; its frames go out through the page's socket (a JS
//! `send` function). A stage computes where the page's units do: on WebGPU when the page
//! has an adapter (its own device, so a unit computing meanwhile is not in its way), else on
//! the wasm CPU path; exact bits are the same on every backend.

use std::{cell::RefCell, collections::VecDeque, rc::Rc};

use futures_channel::mpsc;
use futures_util::{FutureExt, StreamExt, pin_mut};
use tabula_engine::{
    cpu::CpuBackend,
    exact::ExactBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::exact::ExactFile;
use tabula_protocol::{
    Activation, Identity, PublicKey, SessionId, StageOrder, ToCoordinator, encode, sha256,
};
use tabula_transport::{ChannelLink, Path};
use tabula_worker::{
    WorkerError,
    stage::{
        MAX_ACTIVATION_FRAME, MemberCore, StageOut, StagePlan, StageRunner, decode_activation,
    },
};
use wasm_bindgen::prelude::*;

use crate::rtc::{DataChannelLink, sleep};

/// Relayed chunks from one neighbour waiting to be read; past this the neighbour floods and
/// its chunks are dropped (the message they belong to breaks, the link goes on).
const RELAY_BACKLOG: usize = 64;

/// What the page hands a running member.
pub(crate) enum StageMsg {
    /// The first stage's input for `step`.
    Input { step: u32, tokens: Vec<u32> },
    /// Send the retained outputs up to `step`.
    History { step: u32 },
    /// A chunk `peer` relayed through the coordinator.
    Relay { peer: PublicKey, chunk: Vec<u8> },
    /// The data channel to `peer`, attached (its handlers set) as it arrived.
    Channel {
        peer: PublicKey,
        link: DataChannelLink,
    },
    /// The coordinator ended the session for this member.
    End,
}

/// The session this page serves, from the order until it ends.
pub(crate) struct StageSlot {
    pub order: StageOrder,
    pub inbox: mpsc::UnboundedSender<StageMsg>,
    /// Taken by [`run`] when the page supplies the pieces.
    pub receiver: Option<mpsc::UnboundedReceiver<StageMsg>>,
    /// `Date.now()` when the order came: the direct paths get `direct_ms` from then.
    pub ordered_ms: f64,
}

/// A neighbour, and the sender that feeds its relay link the chunks the coordinator relays.
struct Neighbour {
    link: tabula_worker::stage::Neighbour<DataChannelLink>,
    relay_in: mpsc::Sender<Vec<u8>>,
}

/// Sends one frame through the page's socket.
fn send_frame(send: &js_sys::Function, frame: &ToCoordinator) {
    let bytes = js_sys::Uint8Array::from(encode(frame).as_slice());
    if let Err(e) = send.call1(&JsValue::NULL, &bytes) {
        tracing::warn!("the page could not send a frame: {e:?}");
    }
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// Runs the stage of `slot`'s order on the `pieces` the page fetched (in the order's order),
/// on WebGPU when `gpu`, until the coordinator ends the session or something fails. A
/// failure is reported to the coordinator, which rebuilds the pipeline without this page.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    gpu: bool,
    order: StageOrder,
    ordered_ms: f64,
    identity: Rc<Identity>,
    pieces: Vec<Vec<u8>>,
    inbox: mpsc::UnboundedReceiver<StageMsg>,
    send: js_sys::Function,
) -> Result<(), WorkerError> {
    let session: SessionId = order.session;
    let reply = send.clone();
    let result = if gpu {
        match GpuBackend::new(AdapterChoice::Any).await {
            Ok(backend) => run_on(&backend, order, ordered_ms, identity, pieces, inbox, send).await,
            Err(e) => Err(WorkerError::Model(format!("WebGPU for the stage: {e}"))),
        }
    } else {
        run_on(
            &CpuBackend,
            order,
            ordered_ms,
            identity,
            pieces,
            inbox,
            send,
        )
        .await
    };
    if let Err(e) = &result {
        tracing::warn!(%session, "pipeline stage: {e}");
        send_frame(
            &reply,
            &ToCoordinator::StageFailed {
                session,
                reason: e.to_string().chars().take(1000).collect(),
            },
        );
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_on<B: ExactBackend>(
    backend: &B,
    order: StageOrder,
    ordered_ms: f64,
    identity: Rc<Identity>,
    pieces: Vec<Vec<u8>>,
    mut inbox: mpsc::UnboundedReceiver<StageMsg>,
    send: js_sys::Function,
) -> Result<(), WorkerError> {
    order.validate()?;
    let session = order.session;
    if pieces.len() != order.model.files.len() {
        return Err(WorkerError::File(format!(
            "{} pieces supplied, {} ordered",
            pieces.len(),
            order.model.files.len()
        )));
    }
    let mut named = Vec::with_capacity(pieces.len());
    for (bytes, f) in pieces.iter().zip(&order.model.files) {
        if sha256(bytes) != f.sha256 {
            return Err(WorkerError::File(format!(
                "piece {} hashes to {}",
                f.sha256,
                sha256(bytes)
            )));
        }
        named.push((bytes.as_slice(), f.sha256.to_hex()));
    }
    let pieces_ref: Vec<(&[u8], &str)> = named.iter().map(|(b, h)| (*b, h.as_str())).collect();
    let plan = StagePlan::from_order(&order);
    let mut runner = {
        let file = ExactFile::open_pieces(&pieces_ref)?;
        StageRunner::load(backend, &file, plan)?
    };
    drop(pieces_ref);
    drop(named);
    drop(pieces);

    let relay = |peer: PublicKey| {
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(RELAY_BACKLOG);
        let send = send.clone();
        wasm_bindgen_futures::spawn_local(async move {
            while let Some(chunk) = out_rx.next().await {
                send_frame(
                    &send,
                    &ToCoordinator::Relay {
                        session,
                        peer,
                        chunk,
                    },
                );
            }
        });
        Neighbour {
            link: tabula_worker::stage::Neighbour {
                peer,
                direct: None,
                relay: ChannelLink::new(out_tx, in_rx, MAX_ACTIVATION_FRAME, Path::Relayed),
            },
            relay_in: in_tx,
        }
    };
    let mut up = order.upstream.map(relay);
    let mut down = order.downstream.map(relay);
    let mut inputs: VecDeque<(u32, Vec<u32>)> = VecDeque::new();
    let mut history_asks: Vec<u32> = Vec::new();
    // Routes one message; `false` when the session is over.
    let route = |msg: StageMsg,
                 up: &mut Option<Neighbour>,
                 down: &mut Option<Neighbour>,
                 inputs: &mut VecDeque<(u32, Vec<u32>)>,
                 history_asks: &mut Vec<u32>,
                 channels: &mut Vec<(PublicKey, DataChannelLink)>|
     -> bool {
        match msg {
            StageMsg::Input { step, tokens } => inputs.push_back((step, tokens)),
            StageMsg::History { step } => history_asks.push(step),
            StageMsg::Relay { peer, chunk } => {
                match [up.as_mut(), down.as_mut()]
                    .into_iter()
                    .flatten()
                    .find(|n| n.link.peer == peer)
                {
                    Some(n) => {
                        if n.relay_in.try_send(chunk).is_err() {
                            tracing::warn!(%peer, "a neighbour relays faster than it is read; chunk dropped");
                        }
                    }
                    None => {
                        tracing::warn!(%peer, "a relayed chunk from a peer that is not a neighbour; dropped")
                    }
                }
            }
            StageMsg::Channel { peer, link } => channels.push((peer, link)),
            StageMsg::End => return false,
        }
        true
    };

    // Direct channels that open within `direct_ms` of the order are used; the document
    // opened them while the pieces downloaded.
    let mut channels: Vec<(PublicKey, DataChannelLink)> = Vec::new();
    let wanted = usize::from(up.is_some()) + usize::from(down.is_some());
    let deadline = ordered_ms + f64::from(order.direct_ms);
    let mut linked = 0;
    while order.direct_ms > 0 && linked < wanted {
        // Channels that arrived: wait for each to open, within what is left of the window.
        while let Some((peer, link)) = channels.pop() {
            let left = (deadline - now_ms()).max(0.0) as u32;
            match link.wait_open(left).await {
                Ok(()) => {
                    if let Some(n) = [up.as_mut(), down.as_mut()]
                        .into_iter()
                        .flatten()
                        .find(|n| n.link.peer == peer && n.link.direct.is_none())
                    {
                        n.link.direct = Some(link);
                        linked += 1;
                    }
                }
                Err(e) => {
                    tracing::info!(%peer, "no direct path ({e}); relaying through the coordinator")
                }
            }
        }
        if linked >= wanted {
            break;
        }
        let left = deadline - now_ms();
        if left <= 0.0 {
            break;
        }
        let msg = inbox.next().fuse();
        let timeout = sleep(left as u32).fuse();
        pin_mut!(msg, timeout);
        futures_util::select! {
            m = msg => match m {
                Some(m) => {
                    if !route(m, &mut up, &mut down, &mut inputs, &mut history_asks, &mut channels) {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
            () = timeout => break,
        }
    }
    drop(channels);
    send_frame(
        &send,
        &ToCoordinator::StageUp {
            session,
            downstream: down.as_ref().map(|n| n.link.path()),
        },
    );

    let mut core = MemberCore::new(runner.plan());
    let mut late_channels = Vec::new();
    loop {
        for step in history_asks.drain(..) {
            for frame in core.history(step) {
                send_frame(&send, &frame);
            }
        }
        // Channels that come up after the window are not used: both sides have settled
        // on the relay by then.
        late_channels.clear();
        enum Input {
            Tokens(Vec<u32>),
            Hidden(Activation),
        }
        let input = if let Some((step, tokens)) = inputs.pop_front() {
            core.check_tokens(step, runner.step())?;
            Input::Tokens(tokens)
        } else {
            let got = {
                let msg = inbox.next().fuse();
                let from_up = async {
                    match &up {
                        Some(n) => n.link.recv().await,
                        None => futures_util::future::pending().await,
                    }
                }
                .fuse();
                pin_mut!(msg, from_up);
                futures_util::select! {
                    m = msg => Err(m),
                    b = from_up => Ok(b),
                }
            };
            match got {
                Err(Some(m)) => {
                    if !route(
                        m,
                        &mut up,
                        &mut down,
                        &mut inputs,
                        &mut history_asks,
                        &mut late_channels,
                    ) {
                        return Ok(());
                    }
                    continue;
                }
                Err(None) => return Ok(()),
                Ok(bytes) => {
                    let bytes = bytes
                        .map_err(|e| WorkerError::Connection(format!("upstream link: {e}")))?;
                    Input::Hidden(decode_activation(&bytes)?)
                }
            }
        };
        let (result, received) = match input {
            Input::Tokens(t) => (runner.run_tokens(backend, &identity, &t).await?, None),
            Input::Hidden(a) => (
                runner
                    .run_activation(backend, &identity, &a)
                    .await
                    .map_err(|e| WorkerError::Task(format!("upstream activation: {e}")))?,
                Some(a.commit),
            ),
        };
        let report = core.report(&result, received);
        if let StageOut::Activation(a) = result {
            let link = down
                .as_mut()
                .ok_or_else(|| WorkerError::Task("an activation from the last stage".into()))?;
            link.link
                .send(&encode(&a))
                .await
                .map_err(|e| WorkerError::Connection(format!("downstream link: {e}")))?;
            core.sent(a);
        }
        send_frame(&send, &ToCoordinator::StageStep { session, report });
    }
}

/// Keeps the slot's state reachable from the volunteer.
pub(crate) type Slot = Rc<RefCell<Option<StageSlot>>>;

/// Forwards into a slot's inbox; `false` when the member is gone.
pub(crate) fn deliver(slot: &Slot, session: &SessionId, msg: StageMsg) -> bool {
    let slot = slot.borrow();
    match slot.as_ref() {
        Some(s) if s.order.session == *session => s.inbox.unbounded_send(msg).is_ok(),
        _ => false,
    }
}

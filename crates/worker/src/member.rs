//! A native worker's part in a pipeline session: the stage the coordinator ordered
//! ([`StageOrder`]), run as a task beside the unit loop. It fetches only its stage's pieces,
//! links to its neighbours over WebRTC data channels (signalling through the worker socket)
//! or, when no direct path comes up in time, through the coordinator's relay, then computes
//! step after step and reports each step's signed commitment. It keeps the outputs it sent,
//! so that the coordinator can re-execute the next stage from them when pipelines disagree.
//!
//! The member talks to the socket loop through two channels only: [`MemberMsg`]s in (what the
//! coordinator sent for this session) and [`ToCoordinator`] frames out.

use std::{sync::Arc, time::Duration};

use tabula_engine::{
    Backend,
    cpu::CpuBackend,
    exact::ExactBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::exact::ExactFile;
use tabula_protocol::{
    Activation, Identity, PublicKey, SessionId, Signal, StageOrder, ToCoordinator, encode,
};
use tabula_transport::{
    ChannelLink, MAX_MESSAGE, Path,
    native::{Role, RtcLink, RtcOptions, connect},
};
use tokio::sync::mpsc;

use crate::{
    FileSource, WorkerError,
    stage::{
        MAX_ACTIVATION_FRAME, MemberCore, StageOut, StagePlan, StageRunner, decode_activation,
    },
};

/// What the socket loop hands a member (the worker core's routing of the coordinator's
/// frames for its session).
pub use crate::core::MemberInput as MemberMsg;

/// How a member links to its neighbours.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// Try a direct data channel first (`false`: relay through the coordinator at once, as a
    /// worker behind a firewall that blocks UDP would end up doing).
    pub direct: bool,
    /// Compute the stage on a wgpu device (its own) instead of the CPU; exact bits are the
    /// same either way.
    pub gpu: bool,
    pub rtc: RtcOptions,
    /// Lie in one of the ways an attacker would (tests of the coordinator's defences only;
    /// no command-line option sets it).
    #[doc(hidden)]
    pub tamper: Option<Tamper>,
}

impl Default for MemberOptions {
    fn default() -> Self {
        Self {
            direct: true,
            gpu: false,
            rtc: RtcOptions::default(),
            tamper: None,
        }
    }
}

/// The lies a test's malicious stage tells.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Computes wrong: one activation byte flipped (and signed as if right); the last stage
    /// answers another token.
    FlipOutput,
    /// Signs an input hash it was not given.
    WrongInputHash,
    /// Reports a commitment that is not its own for this step (its upstream's, or its own of
    /// the step before).
    Replay,
    /// Sends bytes that do not hash to what it signed.
    CorruptSend,
    /// Signals garbage: an SDP that does not parse, candidates that are not JSON.
    GarbageSignals,
    /// Takes every stage and fails it at once (a griefer with free keys).
    FailStages,
    /// Sends an activation larger than any receiver takes (signed as if right).
    Oversize,
    /// Computes nothing: zero activations (signed as if right), and as the last stage the
    /// next token id instead of its own; every later token goes wrong.
    Garble,
}

/// Applies `t` to a step's result; returns the bytes to send instead of the signed ones, if
/// any.
fn tamper(t: Tamper, identity: &Identity, result: &mut StageOut) -> Option<Vec<u8>> {
    let resign = |c: &tabula_protocol::StageCommit, input, output| {
        identity.stage_commit(c.session, c.step, c.stage, input, output)
    };
    match (t, result) {
        // Each liar lies its own way (the byte and the token depend on its key): two
        // liars telling the same lie at the same position of both pipelines would agree,
        // which no comparison of replicas can catch (see ARCHITECTURE.md).
        (Tamper::FlipOutput, StageOut::Activation(a)) => {
            let at = usize::from(identity.public().0[0]) % a.data.len();
            a.data[at] ^= 1;
            a.commit = resign(
                &a.commit,
                a.commit.input_hash,
                tabula_protocol::sha256(&a.data),
            );
            None
        }
        (Tamper::FlipOutput, StageOut::Token { token, .. }) => {
            *token ^= 1 + u32::from(identity.public().0[0] % 16);
            None
        }
        (Tamper::WrongInputHash, StageOut::Activation(a)) => {
            a.commit = resign(
                &a.commit,
                tabula_protocol::sha256(b"not my input"),
                a.commit.output_hash,
            );
            None
        }
        (Tamper::WrongInputHash, StageOut::Token { commit, .. }) => {
            *commit = resign(
                commit,
                tabula_protocol::sha256(b"not my input"),
                commit.output_hash,
            );
            None
        }
        // Only the report lies (see the caller); what goes downstream is right.
        (Tamper::Replay, _) => None,
        (Tamper::CorruptSend, StageOut::Activation(a)) => {
            let mut bytes = a.data.clone();
            bytes[0] ^= 1;
            Some(bytes)
        }
        (Tamper::Oversize, StageOut::Activation(_)) => Some(vec![0; MAX_ACTIVATION_FRAME]),
        (Tamper::Garble, StageOut::Activation(a)) => {
            a.data.fill(0);
            a.commit = resign(
                &a.commit,
                a.commit.input_hash,
                tabula_protocol::sha256(&a.data),
            );
            None
        }
        (Tamper::Garble, StageOut::Token { token, .. }) => {
            *token = token.wrapping_add(1) % 49_152;
            None
        }
        (Tamper::CorruptSend | Tamper::Oversize, StageOut::Token { .. })
        | (Tamper::GarbageSignals | Tamper::FailStages, _) => None,
    }
}

/// A running member: its inbox, and the task (aborted when dropped).
pub struct Member {
    pub inbox: mpsc::UnboundedSender<MemberMsg>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const _: () = assert!(MAX_ACTIVATION_FRAME <= MAX_MESSAGE);
const _: () = assert!(tabula_protocol::MAX_RELAY_CHUNK == tabula_transport::MAX_CHUNK);

/// Starts a member for `order`; what it sends the coordinator goes into `out`.
pub fn spawn(
    order: StageOrder,
    identity: Arc<Identity>,
    files: Arc<dyn FileSource + Send + Sync>,
    out: mpsc::UnboundedSender<ToCoordinator>,
    options: MemberOptions,
) -> Member {
    let (inbox, rx) = mpsc::unbounded_channel();
    let session = order.session;
    let task = tokio::spawn(async move {
        let result = if options.gpu {
            let device = tokio::task::spawn_blocking(|| {
                pollster::block_on(GpuBackend::new(AdapterChoice::Any))
            })
            .await;
            match device {
                Ok(Ok(backend)) => {
                    tracing::info!(%session, device = %backend.describe(), "the stage computes on the GPU");
                    run(
                        Arc::new(backend),
                        order,
                        identity,
                        files,
                        out.clone(),
                        rx,
                        options,
                    )
                    .await
                }
                Ok(Err(e)) => Err(WorkerError::Model(format!("a GPU for the stage: {e}"))),
                Err(e) => Err(WorkerError::Model(format!("a GPU for the stage: {e}"))),
            }
        } else {
            run(
                Arc::new(CpuBackend),
                order,
                identity,
                files,
                out.clone(),
                rx,
                options,
            )
            .await
        };
        if let Err(e) = result {
            tracing::warn!(%session, "pipeline stage: {e}");
            let _ = out.send(ToCoordinator::StageFailed {
                session,
                reason: e.to_string().chars().take(1000).collect(),
            });
        }
    });
    Member { inbox, task }
}

type Neighbour = crate::stage::Neighbour<RtcLink>;

async fn run<B>(
    backend: Arc<B>,
    order: StageOrder,
    identity: Arc<Identity>,
    files: Arc<dyn FileSource + Send + Sync>,
    out: mpsc::UnboundedSender<ToCoordinator>,
    mut inbox: mpsc::UnboundedReceiver<MemberMsg>,
    options: MemberOptions,
) -> Result<(), WorkerError>
where
    B: ExactBackend + Send + Sync + 'static,
    StageRunner<B>: Send,
{
    order.validate()?;
    if options.tamper == Some(Tamper::FailStages) {
        return Err(WorkerError::Task("this stage fails on purpose".into()));
    }
    let session = order.session;
    let plan = StagePlan::from_order(&order);
    // Loading (a download, then parsing) and linking go on together; signals and relayed
    // chunks that arrive meanwhile are routed by the loop below.
    let load = {
        let files = files.clone();
        let model = order.model.clone();
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || -> Result<StageRunner<B>, WorkerError> {
            let mut bytes = Vec::with_capacity(model.files.len());
            for f in &model.files {
                bytes.push((files.read(f)?, f.sha256.to_hex()));
                if tabula_protocol::sha256(&bytes.last().expect("pushed").0) != f.sha256 {
                    return Err(WorkerError::File(format!("piece {} is corrupt", f.sha256)));
                }
            }
            let pieces: Vec<(&[u8], &str)> = bytes
                .iter()
                .map(|(b, h)| (b.as_slice(), h.as_str()))
                .collect();
            let file = ExactFile::open_pieces(&pieces)?;
            StageRunner::load(&*backend, &file, plan)
        })
    };
    let wait = Duration::from_millis(u64::from(order.direct_ms));
    // Signals and relayed chunks that arrive while the links come up go to them through
    // these; afterwards relayed chunks keep flowing the same way.
    let (up_early_tx, up_early) = mpsc::unbounded_channel::<MemberMsg>();
    let (down_early_tx, down_early) = mpsc::unbounded_channel::<MemberMsg>();
    let mut inputs: std::collections::VecDeque<(u32, Vec<u32>)> = Default::default();
    let mut history_asks: Vec<u32> = Vec::new();
    let route = |msg: MemberMsg,
                 inputs: &mut std::collections::VecDeque<(u32, Vec<u32>)>,
                 history_asks: &mut Vec<u32>| match msg {
        MemberMsg::Input { step, tokens } => inputs.push_back((step, tokens)),
        MemberMsg::History { step } => history_asks.push(step),
        m @ (MemberMsg::Signal { .. } | MemberMsg::Relay { .. }) => {
            let peer = match &m {
                MemberMsg::Signal { peer, .. } | MemberMsg::Relay { peer, .. } => *peer,
                _ => unreachable!("matched above"),
            };
            if Some(peer) == order.upstream {
                let _ = up_early_tx.send(m);
            } else if Some(peer) == order.downstream {
                let _ = down_early_tx.send(m);
            } else {
                tracing::warn!(%peer, "a signal from a peer that is not a neighbour; dropped");
            }
        }
    };
    let (runner, up_link, down_link) = {
        let (up_sig_tx, up_sig_rx) = mpsc::channel::<Signal>(64);
        let (down_sig_tx, down_sig_rx) = mpsc::channel::<Signal>(64);
        let (up_relay_tx, up_relay_rx) = futures_channel::mpsc::channel::<Vec<u8>>(64);
        let (down_relay_tx, down_relay_rx) = futures_channel::mpsc::channel::<Vec<u8>>(64);
        let forward = |mut early: mpsc::UnboundedReceiver<MemberMsg>,
                       sig: mpsc::Sender<Signal>,
                       mut relay: futures_channel::mpsc::Sender<Vec<u8>>| async move {
            while let Some(m) = early.recv().await {
                match m {
                    MemberMsg::Signal { signal, .. } => {
                        let _ = sig.send(signal).await;
                    }
                    MemberMsg::Relay { chunk, .. } => {
                        use futures_util::SinkExt;
                        if relay.send(chunk).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        };
        let fwd_up = tokio::spawn(forward(up_early, up_sig_tx, up_relay_tx));
        let fwd_down = tokio::spawn(forward(down_early, down_sig_tx, down_relay_tx));
        let up = async {
            match order.upstream {
                Some(peer) => Some(
                    link_with(
                        Role::Answerer,
                        session,
                        peer,
                        &out,
                        &options,
                        wait,
                        up_sig_rx,
                        up_relay_rx,
                    )
                    .await,
                ),
                None => None,
            }
        };
        let down = async {
            match order.downstream {
                Some(peer) => Some(
                    link_with(
                        Role::Offerer,
                        session,
                        peer,
                        &out,
                        &options,
                        wait,
                        down_sig_rx,
                        down_relay_rx,
                    )
                    .await,
                ),
                None => None,
            }
        };
        let setup = async { tokio::join!(load, up, down) };
        tokio::pin!(setup);
        let (loaded, up, down) = loop {
            tokio::select! {
                done = &mut setup => break done,
                msg = inbox.recv() => match msg {
                    Some(m) => route(m, &mut inputs, &mut history_asks),
                    None => return Ok(()),
                },
            }
        };
        // The forwarders keep carrying relayed chunks for the life of the session; they end
        // when `route` (and its senders) goes away with this function.
        drop((fwd_up, fwd_down));
        let runner = loaded.map_err(|e| WorkerError::Model(format!("stage load: {e}")))??;
        (runner, up, down)
    };
    let mut down_link = down_link;
    let _ = out.send(ToCoordinator::StageUp {
        session,
        downstream: down_link.as_ref().map(Neighbour::path),
    });
    let mut runner = Some(runner);
    // This member's commitment of the step before (for the replay attack of tests).
    let mut last_commit: Option<tabula_protocol::StageCommit> = None;
    let mut core = MemberCore::new(runner.as_ref().expect("loaded").plan());
    let last = order.downstream.is_none();
    loop {
        for step in history_asks.drain(..) {
            for frame in core.history(step) {
                let _ = out.send(frame);
            }
        }
        // The next input: tokens for the first stage, an activation otherwise.
        enum Input {
            Tokens(Vec<u32>),
            Hidden(Activation),
        }
        let input = if let Some((step, tokens)) = inputs.pop_front() {
            core.check_tokens(step, runner.as_ref().map_or(0, StageRunner::step))?;
            Input::Tokens(tokens)
        } else {
            tokio::select! {
                msg = inbox.recv() => {
                    match msg {
                        Some(m) => route(m, &mut inputs, &mut history_asks),
                        None => return Ok(()),
                    }
                    continue;
                }
                bytes = async { up_link.as_ref().expect("guarded").recv().await }, if up_link.is_some() => {
                    let bytes = bytes.map_err(|e| WorkerError::Connection(format!("upstream link: {e}")))?;
                    let activation: Activation = decode_activation(&bytes)?;
                    Input::Hidden(activation)
                }
            }
        };
        let mut r = runner
            .take()
            .expect("the runner is put back after each step");
        let id = identity.clone();
        let backend = backend.clone();
        let (r, result, received) = tokio::task::spawn_blocking(move || {
            let backend = &*backend;
            match input {
                Input::Tokens(t) => {
                    let res = pollster::block_on(r.run_tokens(backend, &id, &t));
                    (r, res, None)
                }
                Input::Hidden(a) => {
                    let res = pollster::block_on(r.run_activation(backend, &id, &a))
                        .map_err(|e| WorkerError::Task(format!("upstream activation: {e}")));
                    (r, res, Some(a.commit))
                }
            }
        })
        .await
        .map_err(|e| WorkerError::Model(format!("stage step: {e}")))?;
        runner = Some(r);
        let mut result = result?;
        let mut sent_data: Option<Vec<u8>> = None;
        if let Some(t) = options.tamper {
            sent_data = tamper(t, &identity, &mut result);
        }
        let mut report = core.report(&result, received.clone());
        if options.tamper == Some(Tamper::Replay)
            && let Some(replayed) = received.or_else(|| last_commit.clone())
        {
            report.commit = replayed;
        }
        last_commit = Some(result.commit().clone());
        if let StageOut::Activation(a) = result {
            debug_assert!(!last);
            let link = down_link
                .as_mut()
                .expect("a stage with output has a downstream");
            let mut wire = a.clone();
            if let Some(data) = sent_data {
                wire.data = data;
            }
            link.send(&encode(&wire))
                .await
                .map_err(|e| WorkerError::Connection(format!("downstream link: {e}")))?;
            core.sent(a);
        }
        let _ = out.send(ToCoordinator::StageStep { session, report });
    }
}

#[allow(clippy::too_many_arguments)]
async fn link_with(
    role: Role,
    session: SessionId,
    peer: PublicKey,
    out: &mpsc::UnboundedSender<ToCoordinator>,
    options: &MemberOptions,
    wait: Duration,
    incoming: mpsc::Receiver<Signal>,
    relay_inbox: futures_channel::mpsc::Receiver<Vec<u8>>,
) -> Neighbour {
    let (relay_out, mut relay_chunks) = futures_channel::mpsc::channel::<Vec<u8>>(16);
    let relay = ChannelLink::new(relay_out, relay_inbox, MAX_ACTIVATION_FRAME, Path::Relayed);
    {
        let out = out.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(chunk) = relay_chunks.next().await {
                if out
                    .send(ToCoordinator::Relay {
                        session,
                        peer,
                        chunk,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    if !options.direct || wait.is_zero() {
        return Neighbour {
            peer,
            direct: None,
            relay,
        };
    }
    let (signals_out, mut outgoing) = mpsc::unbounded_channel::<Signal>();
    {
        let out = out.clone();
        let garbage = options.tamper == Some(Tamper::GarbageSignals);
        tokio::spawn(async move {
            while let Some(mut signal) = outgoing.recv().await {
                if garbage {
                    signal = match signal {
                        Signal::Offer { .. } => Signal::Offer {
                            sdp: "v=0\r\nnot an offer".into(),
                        },
                        Signal::Answer { .. } => Signal::Answer {
                            sdp: "v=0\r\nnot an answer".into(),
                        },
                        Signal::Candidate { .. } => Signal::Candidate {
                            json: "{not json".into(),
                        },
                    };
                }
                if out
                    .send(ToCoordinator::Signal {
                        session,
                        peer,
                        signal,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    let mut rtc = options.rtc.clone();
    rtc.connect_timeout = wait;
    rtc.limit = MAX_ACTIVATION_FRAME;
    let direct = match connect(role, signals_out, incoming, rtc).await {
        Ok(direct) => Some(direct),
        Err(e) => {
            tracing::info!(%peer, "no direct path ({e}); relaying through the coordinator");
            None
        }
    };
    Neighbour {
        peer,
        direct,
        relay,
    }
}

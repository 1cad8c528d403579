//! The browser volunteer: the worker loop's protocol and compute, driven by `www/worker.js`
//! in a Web Worker. JavaScript owns only the I/O the page must do itself (the WebSocket, the
//! key's IndexedDB record, the weight cache, timers); everything that decides what a frame
//! means, signs, hashes or computes is here, in the same crates the native worker uses
//! (`tabula-protocol` frames and signatures, `tabula-worker`'s executor), so a browser result
//! is bit-identical to a native one in exact precision.
//!
//! State is kept in `RefCell`s and no borrow is held across an `await`: frames keep arriving
//! (heartbeat replies, receipts, an extra assignment) while a unit computes on the GPU.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    rc::Rc,
};

use serde::Serialize;
use tabula_engine::{
    cpu::CpuBackend,
    exact::{ExactBackend, selfcheck::Calibration},
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_protocol::{
    Address, FileRef, Hash, Identity, LeaseId, MAX_COORDINATOR_FRAME, Precision, PublicKey, Signal,
    Task, ToCoordinator, ToWorker, UnitOutput, decode, encode,
};
use tabula_worker::{
    Executor, FileSource, WorkerError,
    core::{CoreOptions, Meaning, MemberInput, WorkerCore},
    stage::MAX_ACTIVATION_FRAME,
};
use wasm_bindgen::prelude::*;

use crate::{
    js_err,
    member::{self, Slot, StageMsg, StageSlot},
    rtc::DataChannelLink,
};

enum AnyExecutor {
    Cpu(Executor<CpuBackend>),
    Gpu(Box<Executor<GpuBackend>>),
}

impl AnyExecutor {
    fn needed_files(&self, task: &Task) -> Vec<FileRef> {
        match self {
            AnyExecutor::Cpu(e) => e.needed_files(task),
            AnyExecutor::Gpu(e) => e.needed_files(task),
        }
    }

    async fn run(
        &mut self,
        task: &Task,
        files: &dyn FileSource,
    ) -> Result<UnitOutput, WorkerError> {
        match self {
            AnyExecutor::Cpu(e) => e.run_async(task, files).await,
            AnyExecutor::Gpu(e) => e.run_async(task, files).await,
        }
    }
}

/// Model files handed over by the page for one unit, each given out once.
pub(crate) struct Supplied(pub(crate) RefCell<HashMap<Hash, Vec<u8>>>);

impl FileSource for Supplied {
    fn read(&self, file: &FileRef) -> Result<Vec<u8>, WorkerError> {
        self.0.borrow_mut().remove(&file.sha256).ok_or_else(|| {
            WorkerError::File(format!(
                "the page did not supply {} file {}",
                file.role, file.sha256
            ))
        })
    }
}

/// What a coordinator frame asks of the page, as a plain JS object (`kind` plus fields).
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum FrameEvent {
    /// Send `reply` (the signed login).
    #[serde(rename_all = "camelCase")]
    Challenge {
        reply: Vec<u8>,
    },
    #[serde(rename_all = "camelCase")]
    Welcome {
        heartbeat_ms: u32,
        credit_micro: u64,
    },
    /// A unit to compute: fetch `files` (those not loaded yet), then call `run`; or, with a
    /// pool of compute workers (`setThreads`), hand `taskFrame(lease)` to one and give its
    /// output to `submitFrame(lease, …)`.
    #[serde(rename_all = "camelCase")]
    Assign {
        lease: String,
        model: String,
        precision: &'static str,
        files: Vec<FileOut>,
        deadline_ms: u64,
    },
    /// A unit arrived while another is in progress: send `reply` (its release).
    #[serde(rename_all = "camelCase")]
    Busy {
        reply: Vec<u8>,
    },
    #[serde(rename_all = "camelCase")]
    NoWork {
        retry_ms: u32,
    },
    Accepted,
    Rejected {
        reason: String,
    },
    /// A receipt that verifies under the coordinator's key and names this worker.
    #[serde(rename_all = "camelCase")]
    Credited {
        credit_micro: u64,
        unit: String,
    },
    /// A receipt that does not verify or is someone else's: ignored.
    BadReceipt,
    /// A pipeline stage this page does not take (it logged in without stages): send `reply`
    /// (the refusal), and the coordinator places someone else.
    #[serde(rename_all = "camelCase")]
    Decline {
        reply: Vec<u8>,
    },
    /// A pipeline message handled inside (or for a session this page is not in): nothing
    /// to do.
    Ignored,
    /// Join a pipeline session: open a peer connection to each of `peers` when `direct`
    /// (the document does; `offerer` says which side offers), fetch `files` (the stage's
    /// pieces), then call `runStage`.
    #[serde(rename_all = "camelCase")]
    Stage {
        session: String,
        stage: u16,
        stages: u16,
        layers: (u32, u32),
        files: Vec<FileOut>,
        peers: Vec<PeerOut>,
        direct: bool,
    },
    /// Signalling from the neighbour `peer`: hand it to that peer connection.
    #[serde(rename_all = "camelCase")]
    Signal {
        session: String,
        peer: String,
        /// `offer`, `answer` or `candidate`.
        signal: &'static str,
        text: String,
    },
    /// The session is over for this page: close its peer connections.
    #[serde(rename_all = "camelCase")]
    StageEnd {
        session: String,
    },
    PayoutLinked {
        address: String,
    },
    /// The coordinator ends the session (it closes the socket); with `retry` the worker
    /// reconnects with backoff, else it stops: see `ToWorker::Error`.
    Error {
        message: String,
        retry: bool,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerOut {
    peer: String,
    offerer: bool,
}

#[derive(Serialize)]
pub(crate) struct FileOut {
    role: String,
    sha256: String,
    size: u64,
}

impl From<FileRef> for FileOut {
    fn from(f: FileRef) -> Self {
        FileOut {
            role: f.role,
            sha256: f.sha256.to_hex(),
            size: f.size,
        }
    }
}

/// One browser volunteer: its key, its compute device and its session state.
#[wasm_bindgen]
pub struct Volunteer {
    identity: Rc<Identity>,
    device: String,
    /// The protocol state shared with the native worker (`tabula-worker`'s core): the unit
    /// held (one at a time here), the session served, the totals.
    core: Rc<RefCell<WorkerCore>>,
    /// Taken out while a unit computes, so a frame handled meanwhile never waits on it.
    executor: Rc<RefCell<Option<AnyExecutor>>>,
    /// Whether `executor` is the GPU's (read here, since the executor is away mid-unit).
    on_gpu: bool,
    /// Whether stages try direct data channels (else they relay through the coordinator).
    stage_direct: Cell<bool>,
    /// The pipeline session this page serves, if any (one at a time).
    stage: Slot,
}

#[wasm_bindgen]
impl Volunteer {
    /// A volunteer with the 32-byte ed25519 `seed` the page keeps in IndexedDB. `backend` is
    /// `"gpu"` (WebGPU; fails without an adapter), `"cpu"` (wasm) or `"auto"` (WebGPU when the
    /// browser offers an adapter, else the CPU; exact results are the same bits either way).
    pub async fn create(seed: &[u8], backend: &str, agent: &str) -> Result<Volunteer, JsError> {
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| JsError::new("the worker key must be 32 bytes"))?;
        let (executor, device) = match backend {
            "cpu" => (
                cpu_executor(),
                format!("{}, as chosen in the settings", cpu_label()),
            ),
            "gpu" => {
                let gpu = GpuBackend::new(AdapterChoice::Any).await.map_err(js_err)?;
                let label = format!("GPU ({}), as chosen in the settings", gpu.adapter_label());
                (gpu_executor(gpu), label)
            }
            "auto" => calibrated().await.map_err(js_err)?,
            other => {
                return Err(JsError::new(&format!(
                    "unknown backend `{other}`: use gpu, cpu or auto"
                )));
            }
        };
        let identity = Rc::new(Identity::from_seed(seed));
        let core = WorkerCore::new(
            identity.public(),
            CoreOptions {
                // The device in a word or two: the explanation is for the page only.
                agent: format!(
                    "{agent} {}",
                    match &executor {
                        AnyExecutor::Cpu(_) => "wasm-cpu",
                        AnyExecutor::Gpu(_) => "webgpu",
                    }
                ),
                precisions: vec![Precision::Exact, Precision::Fast],
                stages: false,
                max_model_mb: 0,
                // One unit at a time: the page's throttle rests between units.
                units_held: 1,
                parallel: 1,
                memberships: 1,
            },
        );
        Ok(Volunteer {
            identity,
            device,
            on_gpu: matches!(executor, AnyExecutor::Gpu(_)),
            core: Rc::new(RefCell::new(core)),
            executor: Rc::new(RefCell::new(Some(executor))),
            stage_direct: Cell::new(true),
            stage: Rc::new(RefCell::new(None)),
        })
    }

    /// Offers this page for pipeline stages of at most `budget_mb` MB of weights (0: no
    /// stages); `direct` false relays every activation through the coordinator. Takes effect
    /// at the next login.
    #[wasm_bindgen(js_name = setStages)]
    pub fn set_stages(&self, budget_mb: u32, direct: bool) {
        self.core.borrow_mut().set_stages(budget_mb > 0, budget_mb);
        self.stage_direct.set(direct);
    }

    /// Runs the stage the last `stage` event ordered, on the pieces it listed (`files`, in
    /// that order), until the session ends for this page. Frames go out through
    /// `send(Uint8Array)`. A failure is reported to the coordinator (it rebuilds the
    /// pipeline without this page) and rethrown.
    #[wasm_bindgen(js_name = runStage)]
    pub async fn run_stage(
        &self,
        files: Vec<js_sys::Uint8Array>,
        send: js_sys::Function,
    ) -> Result<(), JsError> {
        let (order, ordered_ms, receiver) = {
            let mut slot = self.stage.borrow_mut();
            let slot = slot
                .as_mut()
                .ok_or_else(|| JsError::new("no pipeline stage is ordered"))?;
            let receiver = slot
                .receiver
                .take()
                .ok_or_else(|| JsError::new("the ordered stage is already running"))?;
            (slot.order.clone(), slot.ordered_ms, receiver)
        };
        let session = order.session;
        let result = member::run(
            self.device.starts_with("WebGPU"),
            order,
            ordered_ms,
            self.identity.clone(),
            files.iter().map(|f| f.to_vec()).collect(),
            receiver,
            send,
        )
        .await;
        let mut slot = self.stage.borrow_mut();
        if slot.as_ref().is_some_and(|s| s.order.session == session) {
            *slot = None;
        }
        self.core.borrow_mut().member_stopped(&session);
        result.map_err(js_err)
    }

    /// Gives up the ordered stage before it runs (its pieces did not download); returns the
    /// frame that tells the coordinator, or `undefined` when no stage is waiting.
    #[wasm_bindgen(js_name = abandonStage)]
    pub fn abandon_stage(&self, reason: &str) -> Option<Vec<u8>> {
        let slot = self.stage.borrow_mut().take()?;
        self.core.borrow_mut().member_stopped(&slot.order.session);
        Some(encode(&ToCoordinator::StageFailed {
            session: slot.order.session,
            reason: reason.chars().take(1000).collect(),
        }))
    }

    /// Ends this page's part in its pipeline session, if any (stop pressed, socket closed):
    /// `runStage` returns. The coordinator learns it from the closed socket and rebuilds.
    #[wasm_bindgen(js_name = endStage)]
    pub fn end_stage(&self) {
        self.core.borrow_mut().disconnected();
        if let Some(slot) = self.stage.borrow_mut().take() {
            let _ = slot.inbox.unbounded_send(StageMsg::End);
        }
    }

    /// The data channel the document opened to `peer` (hex) of the current session, handed
    /// over before it opens. Call it in the task it arrived in.
    #[wasm_bindgen(js_name = attachChannel)]
    pub fn attach_channel(
        &self,
        session: &str,
        peer: &str,
        channel: web_sys::RtcDataChannel,
    ) -> Result<(), JsError> {
        let (session, peer) = parse_link(session, peer)?;
        let link = DataChannelLink::attach(channel, MAX_ACTIVATION_FRAME);
        if !member::deliver(&self.stage, &session, StageMsg::Channel { peer, link }) {
            return Err(JsError::new("no such pipeline session on this page"));
        }
        Ok(())
    }

    /// The frame carrying this page's signal (`kind` offer, answer or candidate) to `peer`.
    #[wasm_bindgen(js_name = signalFrame)]
    pub fn signal_frame(
        &self,
        session: &str,
        peer: &str,
        kind: &str,
        text: &str,
    ) -> Result<Vec<u8>, JsError> {
        let (session, peer) = parse_link(session, peer)?;
        let text = text.to_string();
        let signal = match kind {
            "offer" => Signal::Offer { sdp: text },
            "answer" => Signal::Answer { sdp: text },
            "candidate" => Signal::Candidate { json: text },
            other => return Err(JsError::new(&format!("unknown signal kind `{other}`"))),
        };
        signal.validate().map_err(js_err)?;
        Ok(encode(&ToCoordinator::Signal {
            session,
            peer,
            signal,
        }))
    }

    /// What the device caps a pipeline stage at, MB: the largest buffer the WebGPU device
    /// allocates (a stage computes on it); `undefined` on the wasm CPU path, which only the
    /// device's memory bounds.
    #[wasm_bindgen(js_name = stageLimitMb)]
    pub fn stage_limit_mb(&self) -> Option<u32> {
        match self.executor.borrow().as_ref()? {
            AnyExecutor::Gpu(e) => {
                Some((e.backend().max_buffer_bytes() >> 20).min(u64::from(u32::MAX)) as u32)
            }
            AnyExecutor::Cpu(_) => None,
        }
    }

    /// The WebGPU adapter's description, or `"cpu (wasm)"`.
    pub fn device(&self) -> String {
        self.device.clone()
    }

    /// This volunteer's public key, hex: its identity in the ledger.
    #[wasm_bindgen(js_name = publicKey)]
    pub fn public_key(&self) -> String {
        self.identity.public().to_hex()
    }

    /// Interprets one binary frame from the coordinator; see the `kind`s of the returned object.
    #[wasm_bindgen(js_name = onFrame)]
    pub fn on_frame(&self, frame: &[u8]) -> Result<JsValue, JsError> {
        let event = self.handle(decode(frame, MAX_COORDINATOR_FRAME).map_err(js_err)?)?;
        serde_wasm_bindgen::to_value(&event).map_err(js_err)
    }

    /// The frame asking for a unit.
    #[wasm_bindgen(js_name = readyFrame)]
    pub fn ready_frame(&self) -> Vec<u8> {
        encode(&ToCoordinator::Ready)
    }

    #[wasm_bindgen(js_name = heartbeatFrame)]
    pub fn heartbeat_frame(&self) -> Vec<u8> {
        encode(&ToCoordinator::Heartbeat)
    }

    /// Gives a unit back (stop pressed, page hidden, unit failed): the one under `lease`, or
    /// else the oldest computing; `undefined` when there is none. Call until `undefined` to
    /// give back every unit.
    #[wasm_bindgen(js_name = releaseFrame)]
    pub fn release_frame(&self, lease: Option<String>) -> Option<Vec<u8>> {
        let mut core = self.core.borrow_mut();
        let lease = match lease {
            Some(hex) => LeaseId::from_hex(&hex).ok()?,
            None => core.computing()?.lease,
        };
        core.release(lease).map(|frame| encode(&frame))
    }

    /// Computes up to `threads` units at once on a pool of compute workers (the page's
    /// throttle), on the CPU only: a GPU computes one unit at a time, and so does one thread
    /// (in this worker, with `run`). Returns the number taken; takes effect at once (units
    /// beyond a lower number finish first).
    #[wasm_bindgen(js_name = setThreads)]
    pub fn set_threads(&self, threads: u32) -> u32 {
        let threads = if self.on_gpu { 1 } else { threads as usize };
        self.core.borrow_mut().set_parallel(threads) as u32
    }

    /// How many more units this worker would hold now (a `Ready` frame each).
    #[wasm_bindgen(js_name = wantsUnits)]
    pub fn wants_units(&self) -> u32 {
        self.core.borrow().wants_units() as u32
    }

    /// The task of the unit computing under `lease`, encoded for a compute worker's
    /// [`Computer::run`](crate::Computer::run).
    #[wasm_bindgen(js_name = taskFrame)]
    pub fn task_frame(&self, lease: &str) -> Result<Vec<u8>, JsError> {
        let lease = LeaseId::from_hex(lease).map_err(js_err)?;
        let core = self.core.borrow();
        let a = core
            .computing_unit(lease)
            .ok_or_else(|| JsError::new("no unit computes under this lease"))?;
        Ok(encode(&a.task))
    }

    /// The signed `Submit` frame for the unit under `lease`, from the output a compute worker
    /// returned (checked to decode as a unit output before it is signed).
    #[wasm_bindgen(js_name = submitFrame)]
    pub fn submit_frame(&self, lease: &str, output: &[u8]) -> Result<Vec<u8>, JsError> {
        let lease = LeaseId::from_hex(lease).map_err(js_err)?;
        UnitOutput::decode(output).map_err(js_err)?;
        self.core
            .borrow_mut()
            .submit(&self.identity, lease, output.to_vec())
            .map(|frame| encode(&frame))
            .ok_or_else(|| JsError::new("the unit was released while it computed"))
    }

    /// Links an EVM payout address (`0x` + 40 hex digits) to this key, signed.
    #[wasm_bindgen(js_name = payoutFrame)]
    pub fn payout_frame(&self, address: &str) -> Result<Vec<u8>, JsError> {
        let hex = address
            .strip_prefix("0x")
            .or_else(|| address.strip_prefix("0X"))
            .ok_or_else(|| JsError::new("a payout address starts with 0x"))?;
        let address = Address::from_hex(hex)
            .map_err(|_| JsError::new("a payout address is 0x followed by 40 hex digits"))?;
        Ok(encode(&ToCoordinator::LinkPayout {
            address,
            signature: self.identity.sign_payout(&address),
        }))
    }

    /// Computes the unit under `lease` in this worker and returns its signed `Submit` frame.
    /// `files` holds the bytes of the files the `assign` event listed, in that order (the
    /// executor checks each hash). On an error the unit stays held: send
    /// `releaseFrame(lease)`.
    pub async fn run(
        &self,
        lease: &str,
        files: Vec<js_sys::Uint8Array>,
    ) -> Result<Vec<u8>, JsError> {
        let lease = LeaseId::from_hex(lease).map_err(js_err)?;
        let assignment = self
            .core
            .borrow()
            .computing_unit(lease)
            .cloned()
            .ok_or_else(|| JsError::new("no unit is assigned under this lease"))?;
        let needed = self.needed_files(&assignment.task);
        if files.len() != needed.len() {
            return Err(JsError::new(&format!(
                "{} files supplied, {} needed",
                files.len(),
                needed.len()
            )));
        }
        let supplied = Supplied(RefCell::new(
            needed
                .iter()
                .zip(&files)
                .map(|(f, bytes)| (f.sha256, bytes.to_vec()))
                .collect(),
        ));
        let mut executor = self
            .executor
            .borrow_mut()
            .take()
            .ok_or_else(|| JsError::new("a unit is already computing"))?;
        let result = executor.run(&assignment.task, &supplied).await;
        *self.executor.borrow_mut() = Some(executor);
        let output = result.map_err(js_err)?;
        // A release (stop pressed) while computing wins: the lease is no longer ours to answer.
        self.core
            .borrow_mut()
            .submit(&self.identity, assignment.lease, output.encode())
            .map(|frame| encode(&frame))
            .ok_or_else(|| JsError::new("the unit was released while it computed"))
    }
}

impl Volunteer {
    fn handle(&self, message: ToWorker) -> Result<FrameEvent, JsError> {
        let meaning = self.core.borrow_mut().on_frame(&self.identity, message);
        Ok(match meaning {
            Meaning::Login(login) => FrameEvent::Challenge {
                reply: encode(&login),
            },
            Meaning::Welcome {
                heartbeat_ms,
                credit_micro,
            } => FrameEvent::Welcome {
                heartbeat_ms,
                credit_micro,
            },
            Meaning::Unit => {
                let mut core = self.core.borrow_mut();
                let a = core
                    .next_unit()
                    .cloned()
                    .ok_or_else(|| JsError::new("a unit was held while another computed"))?;
                drop(core);
                FrameEvent::Assign {
                    lease: a.lease.to_hex(),
                    model: a.task.model().name.clone(),
                    precision: a.task.precision().as_str(),
                    files: self
                        .needed_files(&a.task)
                        .into_iter()
                        .map(FileOut::from)
                        .collect(),
                    deadline_ms: a.deadline_ms,
                }
            }
            // The page sets no model budget, so a unit is never too large for it.
            Meaning::GiveBack(release) | Meaning::TooLarge { release, .. } => FrameEvent::Busy {
                reply: encode(&release),
            },
            Meaning::NoWork { retry_ms } => FrameEvent::NoWork { retry_ms },
            Meaning::Verdict { accepted: true, .. } => FrameEvent::Accepted,
            Meaning::Verdict { reason, .. } => FrameEvent::Rejected {
                reason: reason.unwrap_or_default(),
            },
            Meaning::Credited { credit_micro, unit } => FrameEvent::Credited {
                credit_micro,
                unit: unit.to_hex(),
            },
            Meaning::BadReceipt => FrameEvent::BadReceipt,
            Meaning::PayoutLinked(address) => FrameEvent::PayoutLinked {
                address: format!("0x{}", address.to_hex()),
            },
            Meaning::Ended { message, retry } => FrameEvent::Error { message, retry },
            Meaning::JoinStage(order) => self.stage_order(order),
            Meaning::DeclineStage(refusal) => FrameEvent::Decline {
                reply: encode(&refusal),
            },
            Meaning::ToMember(session, input) => match input {
                MemberInput::Input { step, tokens } => {
                    member::deliver(&self.stage, &session, StageMsg::Input { step, tokens });
                    FrameEvent::Ignored
                }
                MemberInput::History { step } => {
                    member::deliver(&self.stage, &session, StageMsg::History { step });
                    FrameEvent::Ignored
                }
                MemberInput::Relay { peer, chunk } => {
                    member::deliver(&self.stage, &session, StageMsg::Relay { peer, chunk });
                    FrameEvent::Ignored
                }
                MemberInput::Signal { peer, signal } => {
                    let neighbour = self.stage.borrow().as_ref().is_some_and(|s| {
                        s.order.session == session
                            && (s.order.upstream == Some(peer) || s.order.downstream == Some(peer))
                    });
                    if !neighbour {
                        FrameEvent::Ignored
                    } else {
                        let (kind, text) = match signal {
                            Signal::Offer { sdp } => ("offer", sdp),
                            Signal::Answer { sdp } => ("answer", sdp),
                            Signal::Candidate { json } => ("candidate", json),
                        };
                        FrameEvent::Signal {
                            session: session.to_hex(),
                            peer: peer.to_hex(),
                            signal: kind,
                            text,
                        }
                    }
                }
            },
            Meaning::EndStage(session) => {
                let mut slot = self.stage.borrow_mut();
                if slot.as_ref().is_some_and(|s| s.order.session == session)
                    && let Some(s) = slot.take()
                {
                    let _ = s.inbox.unbounded_send(StageMsg::End);
                }
                FrameEvent::StageEnd {
                    session: session.to_hex(),
                }
            }
            Meaning::Ignored => FrameEvent::Ignored,
        })
    }

    /// A stage order the core took: the page opens its peer connections and fetches its
    /// pieces, then calls `runStage`.
    fn stage_order(&self, order: tabula_protocol::StageOrder) -> FrameEvent {
        let session = order.session;
        let mut peers = Vec::new();
        if let Some(up) = order.upstream {
            // The upstream stage offers the channel; this page answers it.
            peers.push(PeerOut {
                peer: up.to_hex(),
                offerer: false,
            });
        }
        if let Some(down) = order.downstream {
            peers.push(PeerOut {
                peer: down.to_hex(),
                offerer: true,
            });
        }
        let (inbox, receiver) = futures_channel::mpsc::unbounded();
        let event = FrameEvent::Stage {
            session: session.to_hex(),
            stage: order.stage,
            stages: order.stages,
            layers: order.layers,
            files: order
                .model
                .files
                .iter()
                .cloned()
                .map(FileOut::from)
                .collect(),
            peers,
            direct: self.stage_direct.get() && order.direct_ms > 0,
        };
        tracing::info!(%session, stage = order.stage, stages = order.stages, "joining a pipeline");
        *self.stage.borrow_mut() = Some(StageSlot {
            order,
            inbox,
            receiver: Some(receiver),
            ordered_ms: js_sys::Date::now(),
        });
        event
    }

    /// The files of `task`'s model that the executor has not loaded yet.
    fn needed_files(&self, task: &Task) -> Vec<FileRef> {
        self.executor
            .borrow()
            .as_ref()
            .map(|e| e.needed_files(task))
            .unwrap_or_default()
    }
}

fn cpu_executor() -> AnyExecutor {
    AnyExecutor::Cpu(Executor::new(CpuBackend))
}

fn cpu_label() -> String {
    if cfg!(target_feature = "relaxed-simd") {
        "CPU (wasm, relaxed SIMD)".to_string()
    } else {
        "CPU (wasm)".to_string()
    }
}

fn gpu_executor(backend: GpuBackend) -> AnyExecutor {
    AnyExecutor::Gpu(Box::new(Executor::new(backend)))
}

/// The best of three timed [`Calibration`] runs after a warm-up (shader compilation, first
/// allocations), in milliseconds.
async fn calibration_ms<B: ExactBackend>(backend: &B) -> tabula_engine::Result<f64> {
    Calibration::new(backend)?
        .best_ms(backend, js_sys::Date::now)
        .await
}

/// `auto`: a short exact workload on the WebGPU adapter (when there is one) and on the wasm
/// CPU path; the page computes on the faster one and says why. A software adapter
/// (SwiftShader) is usually many times slower than the CPU it runs on, and loses.
async fn calibrated() -> tabula_engine::Result<(AnyExecutor, String)> {
    let gpu = match GpuBackend::new(AdapterChoice::Any).await {
        Ok(gpu) => gpu,
        Err(e) => {
            tracing::info!("no WebGPU adapter ({e}); using the CPU");
            let why = format!("{}: this browser has no WebGPU adapter", cpu_label());
            return Ok((cpu_executor(), why));
        }
    };
    let cpu_ms = calibration_ms(&CpuBackend).await?;
    let gpu_ms = calibration_ms(&gpu).await?;
    tracing::info!(cpu_ms, gpu_ms, adapter = %gpu.adapter_label(), "calibrated");
    Ok(if gpu_ms < cpu_ms {
        let why = format!(
            "GPU ({}): {:.1}× the speed of this computer's CPU in a test ({gpu_ms:.0} ms against \
             {cpu_ms:.0} ms)",
            gpu.adapter_label(),
            cpu_ms / gpu_ms
        );
        (gpu_executor(gpu), why)
    } else {
        let why = format!(
            "{}: {:.1}× the speed of this browser's GPU ({}) in a test ({cpu_ms:.0} ms against \
             {gpu_ms:.0} ms)",
            cpu_label(),
            gpu_ms / cpu_ms,
            gpu.adapter_label()
        );
        (cpu_executor(), why)
    })
}

/// A session and a peer as the page names them (hex).
fn parse_link(
    session: &str,
    peer: &str,
) -> Result<(tabula_protocol::SessionId, PublicKey), JsError> {
    let session = tabula_protocol::SessionId::from_hex(session)
        .map_err(|e| JsError::new(&format!("session: {e}")))?;
    let peer = PublicKey::from_hex(peer).map_err(|e| JsError::new(&format!("peer: {e}")))?;
    Ok((session, peer))
}

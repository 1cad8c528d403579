//! The browser volunteer: the worker loop's protocol and compute, driven by `www/worker.js`
//! in a Web Worker. JavaScript owns only the I/O the page must do itself (the WebSocket, the
//! key's IndexedDB record, the weight cache, timers); everything that decides what a frame
//! means, signs, hashes or computes is here, in the same crates the native worker uses
//! (`tabula-protocol` frames and signatures, `tabula-worker`'s executor), so a browser result
//! is bit-identical to a native one in exact precision.
//!
//! State is kept in `RefCell`s and no borrow is held across an `await`: frames keep arriving
//! (heartbeat replies, receipts, an extra assignment) while a unit computes on the GPU.

use std::{cell::RefCell, collections::HashMap, rc::Rc};

use serde::Serialize;
use tabula_engine::{
    Backend,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_protocol::{
    Address, Assignment, FileRef, Hash, Identity, MAX_COORDINATOR_FRAME, Precision, Task,
    ToCoordinator, ToWorker, UnitOutput, decode, encode,
};
use tabula_worker::{Executor, FileSource, WorkerError};
use wasm_bindgen::prelude::*;

use crate::js_err;

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
struct Supplied(RefCell<HashMap<Hash, Vec<u8>>>);

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
    /// A unit to compute: fetch `files` (those not loaded yet), then call `run`.
    #[serde(rename_all = "camelCase")]
    Assign {
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
    /// A pipeline message for a session this page is not in: nothing to do.
    Ignored,
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
struct FileOut {
    role: String,
    sha256: String,
    size: u64,
}

struct Session {
    /// The unit being computed, from its assignment until its result or release is sent.
    current: Option<Assignment>,
}

/// One browser volunteer: its key, its compute device and its session state.
#[wasm_bindgen]
pub struct Volunteer {
    identity: Identity,
    device: String,
    precisions: Vec<Precision>,
    agent: String,
    session: Rc<RefCell<Session>>,
    /// Taken out while a unit computes, so a frame handled meanwhile never waits on it.
    executor: Rc<RefCell<Option<AnyExecutor>>>,
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
            "cpu" => cpu_executor(),
            "gpu" => gpu_executor().await.map_err(js_err)?,
            "auto" => match gpu_executor().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::info!("no WebGPU adapter ({e}); using the CPU");
                    cpu_executor()
                }
            },
            other => {
                return Err(JsError::new(&format!(
                    "unknown backend `{other}`: use gpu, cpu or auto"
                )));
            }
        };
        Ok(Volunteer {
            identity: Identity::from_seed(seed),
            agent: format!("{agent} {device}"),
            device,
            precisions: vec![Precision::Exact, Precision::Fast],
            session: Rc::new(RefCell::new(Session { current: None })),
            executor: Rc::new(RefCell::new(Some(executor))),
        })
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

    /// Gives the current unit back (stop pressed, page hidden, unit failed); `undefined` when
    /// there is none.
    #[wasm_bindgen(js_name = releaseFrame)]
    pub fn release_frame(&self) -> Option<Vec<u8>> {
        let current = self.session.borrow_mut().current.take()?;
        Some(encode(&ToCoordinator::Release {
            lease: current.lease,
        }))
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

    /// Computes the current unit and returns its signed `Submit` frame. `files` holds the bytes
    /// of the files the `assign` event listed, in that order (the executor checks each hash).
    /// On an error the unit stays current: send `releaseFrame()`.
    pub async fn run(&self, files: Vec<js_sys::Uint8Array>) -> Result<Vec<u8>, JsError> {
        let assignment = self
            .session
            .borrow()
            .current
            .clone()
            .ok_or_else(|| JsError::new("no unit is assigned"))?;
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
        let mut session = self.session.borrow_mut();
        // A release (stop pressed) while computing wins: the lease is no longer ours to answer.
        if session.current.as_ref().map(|a| a.lease) != Some(assignment.lease) {
            return Err(JsError::new("the unit was released while it computed"));
        }
        session.current = None;
        Ok(encode(&ToCoordinator::Submit(self.identity.submission(
            assignment.lease,
            assignment.unit,
            output.encode(),
        ))))
    }
}

impl Volunteer {
    fn handle(&self, message: ToWorker) -> Result<FrameEvent, JsError> {
        Ok(match message {
            ToWorker::Challenge { nonce, coordinator } => FrameEvent::Challenge {
                reply: encode(&ToCoordinator::Login {
                    key: self.identity.public(),
                    signature: self.identity.sign_login(&nonce, &coordinator),
                    agent: self.agent.clone(),
                    precisions: self.precisions.clone(),
                    stages: false,
                    max_model_mb: 0,
                }),
            },
            ToWorker::Welcome {
                heartbeat_ms,
                credit_micro,
            } => FrameEvent::Welcome {
                heartbeat_ms,
                credit_micro,
            },
            ToWorker::Assign(a) => {
                let mut session = self.session.borrow_mut();
                if session.current.is_some() {
                    FrameEvent::Busy {
                        reply: encode(&ToCoordinator::Release { lease: a.lease }),
                    }
                } else {
                    let event = FrameEvent::Assign {
                        model: a.task.model().name.clone(),
                        precision: a.task.precision().as_str(),
                        files: self
                            .needed_files(&a.task)
                            .into_iter()
                            .map(|f| FileOut {
                                role: f.role,
                                sha256: f.sha256.to_hex(),
                                size: f.size,
                            })
                            .collect(),
                        deadline_ms: a.deadline_ms,
                    };
                    session.current = Some(a);
                    event
                }
            }
            ToWorker::NoWork { retry_ms } => FrameEvent::NoWork { retry_ms },
            ToWorker::Accepted { .. } => FrameEvent::Accepted,
            ToWorker::Rejected { reason, .. } => FrameEvent::Rejected { reason },
            ToWorker::Credited(receipt) => {
                if receipt.verify().is_ok() && receipt.worker == self.identity.public() {
                    FrameEvent::Credited {
                        credit_micro: receipt.credit_micro,
                        unit: receipt.unit.to_hex(),
                    }
                } else {
                    FrameEvent::BadReceipt
                }
            }
            ToWorker::PayoutLinked { address } => FrameEvent::PayoutLinked {
                address: format!("0x{}", address.to_hex()),
            },
            ToWorker::Error { message, retry } => FrameEvent::Error { message, retry },
            ToWorker::Stage(order) => FrameEvent::Decline {
                reply: encode(&ToCoordinator::StageFailed {
                    session: order.session,
                    reason: "this worker takes no pipeline stages".into(),
                }),
            },
            ToWorker::StageInput { .. }
            | ToWorker::Signal { .. }
            | ToWorker::Relay { .. }
            | ToWorker::StageHistory { .. }
            | ToWorker::StageEnd { .. } => FrameEvent::Ignored,
        })
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

fn cpu_executor() -> (AnyExecutor, String) {
    (
        AnyExecutor::Cpu(Executor::new(CpuBackend)),
        "cpu (wasm)".to_string(),
    )
}

async fn gpu_executor() -> Result<(AnyExecutor, String), tabula_engine::EngineError> {
    let backend = GpuBackend::new(AdapterChoice::Any).await?;
    let device = format!("WebGPU: {}", backend.describe());
    Ok((AnyExecutor::Gpu(Box::new(Executor::new(backend))), device))
}

//! The Tabula worker: takes a unit, computes it, signs the result, submits it.
//!
//! [`core`] is the worker's protocol logic with no I/O (what each coordinator frame means and
//! what goes back), driven by the native loop and by the browser's `Volunteer` alike.
//! [`exec`] is the pure part, a unit in and its canonical output out, shared with the
//! coordinator (which re-executes units to referee disputes); [`stage`] is the same for one
//! stage of a pipeline session (layers in, signed activations out). The `native` feature adds the
//! volunteer loop of a native process ([`native`]): the WebSocket session with login,
//! heartbeats and leases, content-addressed weight downloads and the key file. This crate
//! must not depend on the coordinator or on the browser build; the browser worker reuses
//! [`exec`], [`stage`] (with its I/O-free `MemberCore` and `Neighbour`) and the protocol,
//! with its own transport. [`member`] runs a native worker's pipeline stage: its links to the
//! neighbouring stages and its steps.

pub mod core;
pub mod exec;
pub mod keyfile;
#[cfg(feature = "native")]
pub mod member;
#[cfg(feature = "native")]
pub mod native;
pub mod stage;

pub use exec::{Executor, FileSource};

/// What can go wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("model: {0}")]
    Model(String),
    #[error("protocol: {0}")]
    Protocol(#[from] tabula_protocol::ProtocolError),
    #[error("invalid task: {0}")]
    Task(String),
    #[error("weights: {0}")]
    File(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("connection: {0}")]
    Connection(String),
    /// The coordinator refused this worker for good (banned key, other protocol version).
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<tabula_models::ModelError> for WorkerError {
    fn from(e: tabula_models::ModelError) -> Self {
        match e {
            tabula_models::ModelError::Input(m) => WorkerError::Task(m),
            e => WorkerError::Model(e.to_string()),
        }
    }
}

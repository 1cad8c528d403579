//! The Tabula wire protocol between workers (native or browser) and the coordinator.
//!
//! This crate owns the messages that cross the worker socket, their binary codec (a version
//! prefix + postcard, with a hard size bound checked before decoding), the content hashes, and
//! every ed25519-signed statement: the login answer to a challenge, a result (unit, lease,
//! output hash), a payout-address link and the coordinator's credit receipt. It builds for
//! wasm32 and must not depend on tensors, models, networking or an async runtime: the worker,
//! the browser build and the coordinator all speak through it, so it stays small and pure.

mod bytes;
mod codec;
mod output;
pub mod sign;

pub use bytes::{Bytes, ParseBytesError};
pub use codec::{decode, encode};
pub use output::{FAST_EMBEDDING_MIN_COSINE, UnitOutput};
pub use sign::{Identity, SignerKey, receipt_message, verify};

use serde::{Deserialize, Serialize};

/// The version every frame starts with. A peer speaking another version is refused with a
/// message naming both.
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame a worker may send (results carry their outputs).
pub const MAX_WORKER_FRAME: usize = 4 << 20;
/// The largest frame the coordinator sends (a unit's task).
pub const MAX_COORDINATOR_FRAME: usize = 1 << 20;

/// How many bytes a worker socket reads at a time, on either side. WebSocket libraries
/// (tungstenite) zero this much of their read buffer before every read, so their 128 KiB
/// default cost more CPU than decoding the frames of a busy coordinator; a frame larger than
/// this is still read whole (the buffer grows to the frame's announced length).
pub const SOCKET_READ_BUFFER: usize = 16 << 10;

/// A SHA-256 digest.
pub type Hash = Bytes<32>;
/// An ed25519 public key.
pub type PublicKey = Bytes<32>;
/// An ed25519 signature.
pub type Signature = Bytes<64>;
/// A lease: one worker's right to compute one unit until a deadline. Random, so it tells a
/// worker nothing about the unit or its other replicas.
pub type LeaseId = Bytes<16>;
/// An EVM address.
pub type Address = Bytes<20>;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Hash {
    use sha2::Digest;
    Bytes(sha2::Sha256::digest(data).into())
}

/// The errors of decoding and checking protocol data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("frame too short to hold a version")]
    Truncated,
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version { got: u16 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("invalid public key")]
    BadKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("invalid task: {0}")]
    InvalidTask(String),
}

/// How a unit is computed, and hence how replicas are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Integer-only inference: replicas agree bit for bit, compared by output hash.
    Exact,
    /// f32 inference: replicas agree within a documented tolerance.
    Fast,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        }
    }
}

/// One content-addressed file a task needs, served by the coordinator at
/// `/v1/weights/{sha256}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// What the file is to the model: `exact`, `safetensors`, `config`, `tokenizer` or `gguf`.
    pub role: String,
    pub sha256: Hash,
    pub size: u64,
}

/// The model a task runs: its catalogue name and the exact bytes it computes with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub files: Vec<FileRef>,
}

impl ModelRef {
    /// The model's weights as a worker holds them: the bytes of its files (what `--max-model-mb`
    /// and a pipeline stage's budget are measured against).
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.size)
            .fold(0, u64::saturating_add)
    }
}

/// What a worker takes: units of these precisions, of models whose weights
/// ([`ModelRef::bytes`]) fit its budget. Sent at login, applied by the coordinator when it
/// leases and by the worker when a unit arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Takes {
    pub precisions: Vec<Precision>,
    /// MiB of model weights at most; 0: no limit.
    pub max_model_mb: u32,
}

impl Takes {
    /// Exact units of any size (what a worker that says nothing takes).
    pub fn exact() -> Self {
        Self {
            precisions: vec![Precision::Exact],
            max_model_mb: 0,
        }
    }

    /// Whether `task` is of a precision taken and of a model that fits.
    pub fn admits(&self, task: &Task) -> bool {
        self.precisions.contains(&task.precision()) && self.fits(task.model())
    }

    /// Whether `model`'s weights fit the budget.
    pub fn fits(&self, model: &ModelRef) -> bool {
        self.max_model_mb == 0 || model.bytes() <= u64::from(self.max_model_mb) << 20
    }
}

/// Limits on a task, enforced by both sides.
pub const MAX_SEQUENCES: usize = 64;
pub const MAX_SEQUENCE_TOKENS: usize = 512;
pub const MAX_NEW_TOKENS: u32 = 2048;
pub const MAX_STOP_TOKENS: usize = 16;
pub const MAX_NAME: usize = 128;
pub const MAX_FILES: usize = 8;

/// What a unit asks a worker to compute. Token ids, not text: the coordinator tokenises, so a
/// worker needs no tokenizer and every replica starts from the same integers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Sentence embeddings of a few token sequences.
    Embed {
        model: ModelRef,
        precision: Precision,
        sequences: Vec<Vec<u32>>,
    },
    /// A continuation of one prompt.
    Generate {
        model: ModelRef,
        precision: Precision,
        prompt: Vec<u32>,
        max_tokens: u32,
        /// Thousandths; 0 is greedy.
        temperature_milli: u32,
        /// Q16; 65536 keeps every token.
        top_p_q16: u32,
        seed: u64,
        stop: Vec<u32>,
    },
}

impl Task {
    pub fn model(&self) -> &ModelRef {
        match self {
            Task::Embed { model, .. } | Task::Generate { model, .. } => model,
        }
    }

    pub fn precision(&self) -> Precision {
        match self {
            Task::Embed { precision, .. } | Task::Generate { precision, .. } => *precision,
        }
    }

    /// Checks the bounds a receiver relies on; the model-specific checks (vocabulary, context)
    /// happen where the model is known.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::InvalidTask(m));
        let model = self.model();
        if model.name.is_empty() || model.name.len() > MAX_NAME {
            return bad(format!("model name of {} bytes", model.name.len()));
        }
        if model.files.is_empty() || model.files.len() > MAX_FILES {
            return bad(format!("{} model files", model.files.len()));
        }
        if model.files.iter().any(|f| f.role.len() > MAX_NAME) {
            return bad("file role too long".into());
        }
        match self {
            Task::Embed { sequences, .. } => {
                if sequences.is_empty() || sequences.len() > MAX_SEQUENCES {
                    return bad(format!(
                        "{} sequences (1 to {MAX_SEQUENCES})",
                        sequences.len()
                    ));
                }
                if let Some(s) = sequences
                    .iter()
                    .find(|s| s.is_empty() || s.len() > MAX_SEQUENCE_TOKENS)
                {
                    return bad(format!(
                        "a sequence of {} tokens (1 to {MAX_SEQUENCE_TOKENS})",
                        s.len()
                    ));
                }
            }
            Task::Generate {
                prompt,
                max_tokens,
                top_p_q16,
                stop,
                ..
            } => {
                if prompt.is_empty() || prompt.len() > MAX_SEQUENCE_TOKENS * 4 {
                    return bad(format!("a prompt of {} tokens", prompt.len()));
                }
                if *max_tokens == 0 || *max_tokens > MAX_NEW_TOKENS {
                    return bad(format!("max_tokens {max_tokens} (1 to {MAX_NEW_TOKENS})"));
                }
                if *top_p_q16 > 65536 {
                    return bad(format!("top_p_q16 {top_p_q16} above 65536"));
                }
                if stop.len() > MAX_STOP_TOKENS {
                    return bad(format!("{} stop tokens", stop.len()));
                }
            }
        }
        Ok(())
    }

    /// The digest a result statement binds: every replica of a unit computes the same task,
    /// so it is the same for all of them.
    pub fn digest(&self) -> Hash {
        sha256(&postcard::to_allocvec(self).expect("tasks always serialise"))
    }
}

/// A unit handed to one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub lease: LeaseId,
    /// [`Task::digest`] of `task`.
    pub unit: Hash,
    /// Unix milliseconds after which the lease is void and the unit goes to someone else.
    pub deadline_ms: u64,
    pub task: Task,
}

/// A worker's answer to an assignment, signed over [`sign::result_message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    pub lease: LeaseId,
    pub unit: Hash,
    pub output_hash: Hash,
    pub output: Vec<u8>,
    pub signature: Signature,
}

/// The coordinator's signed statement that a worker earned credit for a verified unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub coordinator: PublicKey,
    pub worker: PublicKey,
    pub unit: Hash,
    pub lease: LeaseId,
    pub output_hash: Hash,
    /// Millionths of a credit (1 credit = 1 GFLOP of verified work).
    pub credit_micro: u64,
    pub issued_ms: u64,
    pub signature: Signature,
}

/// A pipeline session: one generation run by stages on several workers.
pub type SessionId = Bytes<16>;

/// A stage's signed statement about one step of a session: from this input it computed this
/// output. Signed over [`sign::stage_message`], so it names its signer, and a commitment
/// replayed under another key, step or stage fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCommit {
    pub session: SessionId,
    pub step: u32,
    pub stage: u16,
    /// SHA-256 of the input (token ids as little-endian `u32`s for the first stage, the
    /// previous stage's output bytes otherwise).
    pub input_hash: Hash,
    /// SHA-256 of the output (hidden rows as little-endian `i32`s; the logits for the last
    /// stage).
    pub output_hash: Hash,
    pub signature: Signature,
}

/// The largest activation message (a prefill of the longest prompt on a wide model).
pub const MAX_ACTIVATION: usize = 48 << 20;

/// One stage's output on its way to the next stage, with the sender's commitment to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub commit: StageCommit,
    /// Positions (rows) the data holds.
    pub rows: u32,
    /// `rows × dim` little-endian `i32`s.
    pub data: Vec<u8>,
}

impl Activation {
    /// What a receiving stage checks before it uses the data: the sender's signature, the
    /// session, step and stage it expects, the shape, and that the bytes hash to what was
    /// signed.
    pub fn check(
        &self,
        sender: &sign::SignerKey,
        session: &SessionId,
        step: u32,
        stage: u16,
        dim: usize,
    ) -> Result<(), ProtocolError> {
        let c = &self.commit;
        if c.session != *session || c.step != step || c.stage != stage {
            return Err(ProtocolError::Malformed(format!(
                "activation for session {} step {} stage {}, expected {session} step {step} stage {stage}",
                c.session, c.step, c.stage
            )));
        }
        let want = (self.rows as usize)
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4))
            .filter(|&n| n > 0 && n <= MAX_ACTIVATION);
        if want != Some(self.data.len()) {
            return Err(ProtocolError::Malformed(format!(
                "{} activation bytes are not {} rows of {dim} values",
                self.data.len(),
                self.rows
            )));
        }
        c.verify(sender)?;
        if sha256(&self.data) != c.output_hash {
            return Err(ProtocolError::Malformed(
                "activation bytes do not hash to the sender's signed output hash".into(),
            ));
        }
        Ok(())
    }
}

/// The longest SDP a peer may send (a data-channel-only offer is about 1 KiB).
pub const MAX_SDP: usize = 16 << 10;
/// The longest ICE candidate (JSON of an `RTCIceCandidateInit`).
pub const MAX_CANDIDATE: usize = 1 << 10;

/// WebRTC signalling between two peers, carried by the coordinator over their worker sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// An SDP offer (the text of `RTCSessionDescription.sdp`).
    Offer { sdp: String },
    /// The SDP answer to an offer.
    Answer { sdp: String },
    /// One trickled ICE candidate: the JSON of an `RTCIceCandidateInit`, as the browser's
    /// `RTCIceCandidate.toJSON()` writes it.
    Candidate { json: String },
}

impl Signal {
    /// Bounds and character checks; the WebRTC stack parses what passes.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let (what, text, limit, newlines) = match self {
            Signal::Offer { sdp } => ("SDP offer", sdp, MAX_SDP, true),
            Signal::Answer { sdp } => ("SDP answer", sdp, MAX_SDP, true),
            Signal::Candidate { json } => ("ICE candidate", json, MAX_CANDIDATE, false),
        };
        if text.is_empty() || text.len() > limit {
            return Err(ProtocolError::Malformed(format!(
                "{what} of {} bytes (1 to {limit})",
                text.len()
            )));
        }
        if text
            .chars()
            .any(|c| c.is_control() && !(newlines && (c == '\r' || c == '\n')))
        {
            return Err(ProtocolError::Malformed(format!(
                "{what} contains a control character"
            )));
        }
        Ok(())
    }
}

/// The most stages a pipeline has.
pub const MAX_STAGES: u16 = 64;

/// A worker's place in a pipeline session: which layers it runs, who its neighbours are and
/// how to sample. The coordinator sends one per member; the member loads the stage's pieces,
/// connects to its neighbours (the upstream one offers) and reports [`ToCoordinator::StageUp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOrder {
    pub session: SessionId,
    /// 0 for the first stage.
    pub stage: u16,
    pub stages: u16,
    /// The model's layers `[start, end)` this stage runs.
    pub layers: (u32, u32),
    /// The model's name and the stage's pieces (role `piece`), each fetched and checked by
    /// its SHA-256 like any weights file.
    pub model: ModelRef,
    /// The most positions the session reaches (prompt + new tokens).
    pub capacity: u32,
    /// The session step this stage starts at: 0, or the step a rebuilt pipeline joins at
    /// (its first input is then the prompt and every token agreed so far).
    pub first_step: u32,
    pub temperature_milli: u32,
    pub top_p_q16: u32,
    pub seed: u64,
    /// The stage before this one (it offers the data channel); `None` exactly for stage 0.
    pub upstream: Option<PublicKey>,
    /// The stage after this one; `None` exactly for the last stage.
    pub downstream: Option<PublicKey>,
    /// How long to try for a direct data channel before relaying through the coordinator.
    pub direct_ms: u32,
}

impl StageOrder {
    /// The bounds and the consistency a member relies on.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::InvalidTask(m));
        let (start, end) = self.layers;
        if self.stages == 0 || self.stages > MAX_STAGES || self.stage >= self.stages {
            return bad(format!("stage {} of {}", self.stage, self.stages));
        }
        if start >= end {
            return bad(format!("layers {start}..{end}"));
        }
        if (self.stage == 0) != self.upstream.is_none()
            || (self.stage + 1 == self.stages) != self.downstream.is_none()
        {
            return bad(
                "only the first stage has no upstream and only the last no downstream".into(),
            );
        }
        if self.capacity == 0
            || self.capacity as usize > MAX_SEQUENCE_TOKENS * 4 + MAX_NEW_TOKENS as usize
        {
            return bad(format!("a capacity of {} positions", self.capacity));
        }
        if self.top_p_q16 > 65536 {
            return bad(format!("top_p_q16 {} above 65536", self.top_p_q16));
        }
        let model = &self.model;
        if model.name.is_empty() || model.name.len() > MAX_NAME {
            return bad(format!("model name of {} bytes", model.name.len()));
        }
        if model.files.is_empty() || model.files.len() > MAX_STAGE_PIECES {
            return bad(format!("{} pieces", model.files.len()));
        }
        Ok(())
    }
}

/// The most pieces one stage loads (tables, embed, head and its layers).
pub const MAX_STAGE_PIECES: usize = 512;

/// The largest relayed chunk: one chunk of `tabula-transport`'s framing, which asserts the
/// two agree.
pub const MAX_RELAY_CHUNK: usize = 64 << 10;

/// How a member's links to its neighbours came up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkPath {
    /// A peer-to-peer data channel.
    Direct,
    /// Through the coordinator.
    Relayed,
}

impl LinkPath {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkPath::Direct => "direct",
            LinkPath::Relayed => "relayed",
        }
    }
}

/// A member's report of one step: its signed commitment, the upstream commitment its input
/// came with (so an upstream stage that signed two different outputs is caught by its own
/// signatures), and the last stage's sampled token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    pub commit: StageCommit,
    pub received: Option<StageCommit>,
    pub token: Option<u32>,
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first frame: sign it to log in.
    Challenge {
        nonce: Bytes<32>,
        coordinator: PublicKey,
    },
    /// Login accepted.
    Welcome {
        heartbeat_ms: u32,
        /// Credit verified so far, in millionths.
        credit_micro: u64,
    },
    Assign(Assignment),
    /// Nothing to do now: ask again after `retry_ms`.
    NoWork {
        retry_ms: u32,
    },
    /// The result was stored; it is credited once verified.
    Accepted {
        lease: LeaseId,
    },
    /// The result was refused (late lease, bad signature, wrong shape...).
    Rejected {
        lease: LeaseId,
        reason: String,
    },
    /// A verified unit earned credit.
    Credited(Receipt),
    /// A payout-address link was stored.
    PayoutLinked {
        address: Address,
    },
    /// The session ends (the coordinator closes the socket after sending it) or a request
    /// was refused. `retry` says whether reconnecting can help: true when the socket went
    /// silent or the coordinator had a passing failure, false for a banned key, a bad login
    /// or a broken client, which the same worker would only repeat.
    Error {
        message: String,
        retry: bool,
    },
    /// Join a pipeline session as one of its stages.
    Stage(StageOrder),
    /// The first stage's input for `step`: the prompt (and, after a rebuild, the tokens
    /// agreed so far) at the session's first step, then the agreed token of each step.
    StageInput {
        session: SessionId,
        step: u32,
        tokens: Vec<u32>,
    },
    /// Signalling from the neighbour `peer` of the session.
    Signal {
        session: SessionId,
        peer: PublicKey,
        signal: Signal,
    },
    /// A chunk the neighbour `peer` relayed through the coordinator.
    Relay {
        session: SessionId,
        peer: PublicKey,
        chunk: Vec<u8>,
    },
    /// Send the coordinator this stage's outputs of steps `0..=step`, one
    /// [`ToCoordinator::StageOutput`] each: it re-executes the next stage from them.
    StageHistory {
        session: SessionId,
        step: u32,
    },
    /// The session is over for this member (finished, rebuilt without it, or cancelled).
    StageEnd {
        session: SessionId,
    },
}

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// The answer to [`ToWorker::Challenge`], signed over [`sign::login_message`].
    Login {
        key: PublicKey,
        signature: Signature,
        /// Free text such as `tabula-cli/0.1.0 cpu`, shown in logs and the ledger.
        agent: String,
        /// The precisions this worker computes.
        precisions: Vec<Precision>,
        /// Whether it takes pipeline stages ([`ToWorker::Stage`]).
        stages: bool,
        /// The most model weights it holds, in MiB; 0 declares no limit.
        max_model_mb: u32,
    },
    /// Ask for a unit.
    Ready,
    Heartbeat,
    Submit(Submission),
    /// Give a lease back unfinished (the worker is stopping): it is re-issued at once.
    Release {
        lease: LeaseId,
    },
    /// Link the address that on-chain credit goes to, signed over [`sign::payout_message`].
    LinkPayout {
        address: Address,
        signature: Signature,
    },
    /// The stage is loaded and linked to its neighbours.
    StageUp {
        session: SessionId,
        /// How the link to the downstream stage came up (`None` for the last stage).
        downstream: Option<LinkPath>,
    },
    /// One step computed.
    StageStep {
        session: SessionId,
        report: StageReport,
    },
    /// One retained output, answering [`ToWorker::StageHistory`].
    StageOutput {
        session: SessionId,
        activation: Activation,
    },
    /// The member cannot go on (a failed load, a broken link, an activation that did not
    /// check); the coordinator rebuilds the pipeline.
    StageFailed {
        session: SessionId,
        reason: String,
    },
    /// Signalling for the neighbour `peer` in the session.
    Signal {
        session: SessionId,
        peer: PublicKey,
        signal: Signal,
    },
    /// A chunk for the neighbour `peer`, to relay.
    Relay {
        session: SessionId,
        peer: PublicKey,
        chunk: Vec<u8>,
    },
}

impl ToCoordinator {
    /// Bounds a worker-sent frame must respect beyond its size.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            ToCoordinator::Login {
                agent, precisions, ..
            } if agent.len() > MAX_NAME || precisions.len() > 4 => Err(ProtocolError::Malformed(
                "login agent or precision list too long".into(),
            )),
            // A NUL byte is text to postcard and to SQLite but not to PostgreSQL, which refused
            // it inside a shared journal commit; no control character belongs in a name.
            ToCoordinator::Login { agent, .. } if agent.chars().any(char::is_control) => Err(
                ProtocolError::Malformed("login agent contains a control character".into()),
            ),
            ToCoordinator::Signal { signal, .. } => signal.validate(),
            ToCoordinator::Relay { chunk, .. }
                if chunk.is_empty() || chunk.len() > MAX_RELAY_CHUNK =>
            {
                Err(ProtocolError::Malformed(format!(
                    "a relayed chunk of {} bytes (1 to {MAX_RELAY_CHUNK})",
                    chunk.len()
                )))
            }
            ToCoordinator::StageFailed { reason, .. } if reason.len() > 1024 => Err(
                ProtocolError::Malformed("a failure reason over 1 KiB".into()),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(agent: &str) -> ToCoordinator {
        ToCoordinator::Login {
            key: Default::default(),
            signature: Default::default(),
            agent: agent.to_string(),
            precisions: vec![Precision::Exact],
            stages: false,
            max_model_mb: 0,
        }
    }

    #[test]
    fn signals_are_bounded_text() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n".to_string();
        assert!(Signal::Offer { sdp: sdp.clone() }.validate().is_ok());
        assert!(Signal::Answer { sdp }.validate().is_ok());
        let json = r#"{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host"}"#.to_string();
        assert!(Signal::Candidate { json }.validate().is_ok());
        for bad in [
            Signal::Offer { sdp: String::new() },
            Signal::Offer {
                sdp: "v".repeat(MAX_SDP + 1),
            },
            Signal::Answer { sdp: "a\0b".into() },
            Signal::Candidate {
                json: "x\ny".into(),
            },
            Signal::Candidate {
                json: "c".repeat(MAX_CANDIDATE + 1),
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }

    fn order() -> StageOrder {
        StageOrder {
            session: Bytes([1; 16]),
            stage: 1,
            stages: 3,
            layers: (10, 20),
            model: ModelRef {
                name: "m".into(),
                files: vec![FileRef {
                    role: "piece".into(),
                    sha256: Bytes([2; 32]),
                    size: 1,
                }],
            },
            capacity: 64,
            first_step: 0,
            temperature_milli: 0,
            top_p_q16: 65536,
            seed: 0,
            upstream: Some(Bytes([3; 32])),
            downstream: Some(Bytes([4; 32])),
            direct_ms: 5000,
        }
    }

    #[test]
    fn stage_orders_are_consistent_and_bounded() {
        assert!(order().validate().is_ok());
        type Spoil = fn(&mut StageOrder);
        let bad: [(&str, Spoil); 10] = [
            ("stage past the count", |o| o.stage = 3),
            ("no stages", |o| o.stages = 0),
            ("too many stages", |o| o.stages = MAX_STAGES + 1),
            ("empty layer range", |o| o.layers = (5, 5)),
            ("a middle stage without upstream", |o| o.upstream = None),
            ("a middle stage without downstream", |o| o.downstream = None),
            ("a first stage with an upstream", |o| o.stage = 0),
            ("no capacity", |o| o.capacity = 0),
            ("top-p above one", |o| o.top_p_q16 = 65537),
            ("no pieces", |o| o.model.files.clear()),
        ];
        for (what, spoil) in bad {
            let mut o = order();
            spoil(&mut o);
            assert!(o.validate().is_err(), "{what} accepted");
        }
    }

    #[test]
    fn relayed_chunks_and_failure_reasons_are_bounded() {
        let relay = |n: usize| ToCoordinator::Relay {
            session: Bytes([1; 16]),
            peer: Bytes([2; 32]),
            chunk: vec![0; n],
        };
        assert!(relay(1).validate().is_ok());
        assert!(relay(MAX_RELAY_CHUNK).validate().is_ok());
        assert!(relay(0).validate().is_err());
        assert!(relay(MAX_RELAY_CHUNK + 1).validate().is_err());
        let failed = |n: usize| ToCoordinator::StageFailed {
            session: Bytes([1; 16]),
            reason: "x".repeat(n),
        };
        assert!(failed(1024).validate().is_ok());
        assert!(failed(1025).validate().is_err());
        let signal = ToCoordinator::Signal {
            session: Bytes([1; 16]),
            peer: Bytes([2; 32]),
            signal: Signal::Offer { sdp: String::new() },
        };
        assert!(signal.validate().is_err(), "an empty SDP");
    }

    #[test]
    fn login_agents_with_control_characters_or_too_long_are_refused() {
        assert!(login("tabula-worker 0.1 (linux)").validate().is_ok());
        for bad in [
            "a\0b".to_string(),
            "line\nbreak".into(),
            "\u{7f}".into(),
            "x".repeat(MAX_NAME + 1),
        ] {
            assert!(login(&bad).validate().is_err(), "{bad:?} accepted");
        }
    }
}

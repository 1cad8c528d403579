//! One stage of a pipeline session: a contiguous range of an exact Llama's layers with its own
//! KV cache for the whole generation. The first stage takes token ids, every later one the
//! previous stage's [`Activation`] (checked against that stage's signed commitment before
//! use); each step it signs a [`StageCommit`] to what it computed. The last stage samples the
//! next token with the exact sampler, so every honest pipeline picks the same one.
//!
//! No I/O: the caller moves activations (a `tabula-transport` link) and commitments (the
//! worker socket). The coordinator runs the same code to referee a disputed stage.

use std::ops::Range;

use tabula_engine::exact::ExactBackend;
use tabula_models::{
    exact::{ExactCache, ExactFile, ExactLlama, StageInput, StageOutput},
    sampling::ExactSampler,
};
use tabula_protocol::{
    Activation, Hash, Identity, LinkPath, MAX_ACTIVATION, PublicKey, SessionId, StageCommit,
    StageOrder, StageReport, ToCoordinator, sha256, sign::SignerKey,
};
use tabula_transport::{ChannelLink, Link, TransportError};

use crate::WorkerError;

/// A stage's place in a session, as the coordinator plans it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    pub session: SessionId,
    /// 0 for the first stage.
    pub stage: u16,
    pub layers: Range<usize>,
    /// The most positions the session reaches (prompt + new tokens).
    pub capacity: usize,
    /// The key of the stage before this one; `None` exactly for the first stage.
    pub upstream: Option<PublicKey>,
    /// The session's step this stage starts at: 0, or the step a rebuilt pipeline joins at
    /// (its first input is then the prompt and every token agreed so far).
    pub first_step: u32,
    /// The exact sampler's parameters (used by the last stage).
    pub temperature_milli: u32,
    pub top_p_q16: u32,
    pub seed: u64,
}

impl StagePlan {
    /// The plan of a (validated) order.
    pub fn from_order(order: &StageOrder) -> Self {
        Self {
            session: order.session,
            stage: order.stage,
            layers: order.layers.0 as usize..order.layers.1 as usize,
            capacity: order.capacity as usize,
            upstream: order.upstream,
            first_step: order.first_step,
            temperature_milli: order.temperature_milli,
            top_p_q16: order.top_p_q16,
            seed: order.seed,
        }
    }
}

/// What a step produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageOut {
    /// Hidden rows for the next stage, with this stage's commitment to them.
    Activation(Activation),
    /// The last stage's next token; the commitment's output hash is the logits'.
    Token { token: u32, commit: StageCommit },
}

impl StageOut {
    pub fn commit(&self) -> &StageCommit {
        match self {
            StageOut::Activation(a) => &a.commit,
            StageOut::Token { commit, .. } => commit,
        }
    }
}

/// The hash a first stage commits to as its input: the token ids as little-endian `u32`s.
pub fn tokens_hash(tokens: &[u32]) -> Hash {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    sha256(&bytes)
}

fn ints_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A loaded stage and its state in one session.
pub struct StageRunner<B: ExactBackend> {
    plan: StagePlan,
    model: ExactLlama<B>,
    cache: ExactCache<B::Int>,
    upstream: Option<SignerKey>,
    sampler: ExactSampler,
    /// Positions in the cache. Invariant: `pos ≤ plan.capacity`.
    pos: usize,
    /// The next step's number.
    step: u32,
}

impl<B: ExactBackend> StageRunner<B> {
    /// Loads the plan's layers from `file` (the whole model or the stage's pieces).
    pub fn load(backend: &B, file: &ExactFile<'_>, plan: StagePlan) -> Result<Self, WorkerError> {
        let model = ExactLlama::load_stage(backend, file, plan.layers.clone())?;
        let first = plan.layers.start == 0;
        if first != plan.upstream.is_none() || first != (plan.stage == 0) {
            return Err(WorkerError::Task(
                "stage 0 starts the model and has no upstream stage; every other stage has one"
                    .into(),
            ));
        }
        if plan.capacity == 0 || plan.capacity > model.max_positions() {
            return Err(WorkerError::Task(format!(
                "a session of {} positions; this model runs 1 to {}",
                plan.capacity,
                model.max_positions()
            )));
        }
        let upstream = plan.upstream.as_ref().map(SignerKey::parse).transpose()?;
        let cache = model.new_cache(backend, plan.capacity)?;
        let sampler = ExactSampler::from_parts(plan.temperature_milli, plan.top_p_q16, plan.seed)
            .after_picks(u64::from(plan.first_step));
        let step = plan.first_step;
        Ok(Self {
            plan,
            model,
            cache,
            upstream,
            sampler,
            pos: 0,
            step,
        })
    }

    pub fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// The number of the next step.
    pub fn step(&self) -> u32 {
        self.step
    }

    /// Width of a hidden row.
    pub fn dim(&self) -> usize {
        self.model.config.dim
    }

    /// Runs the first stage on `tokens` (the prompt at step 0, then one token a step).
    pub async fn run_tokens(
        &mut self,
        backend: &B,
        identity: &Identity,
        tokens: &[u32],
    ) -> Result<StageOut, WorkerError> {
        if self.upstream.is_some() {
            return Err(WorkerError::Task(format!(
                "stage {} takes activations, not tokens",
                self.plan.stage
            )));
        }
        self.run(
            backend,
            identity,
            StageInput::Tokens(tokens),
            tokens_hash(tokens),
        )
        .await
    }

    /// Runs a later stage on the previous stage's activation, which must be for this step,
    /// signed by the upstream key and hash to what it signed.
    pub async fn run_activation(
        &mut self,
        backend: &B,
        identity: &Identity,
        activation: &Activation,
    ) -> Result<StageOut, WorkerError> {
        let Some(upstream) = &self.upstream else {
            return Err(WorkerError::Task(
                "the first stage takes tokens, not activations".into(),
            ));
        };
        activation.check(
            upstream,
            &self.plan.session,
            self.step,
            self.plan.stage - 1,
            self.dim(),
        )?;
        debug_assert!(activation.data.len() <= MAX_ACTIVATION);
        let values: Vec<i32> = activation
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let input = StageInput::Hidden {
            rows: activation.rows as usize,
            values: &values,
        };
        let input_hash = activation.commit.output_hash;
        self.run(backend, identity, input, input_hash).await
    }

    async fn run(
        &mut self,
        backend: &B,
        identity: &Identity,
        input: StageInput<'_>,
        input_hash: Hash,
    ) -> Result<StageOut, WorkerError> {
        let rows = match input {
            StageInput::Tokens(t) => t.len(),
            StageInput::Hidden { rows, .. } => rows,
        };
        let out = self
            .model
            .step_stage(backend, input, self.pos, &mut self.cache)
            .await?;
        let commit = |output_hash| {
            identity.stage_commit(
                self.plan.session,
                self.step,
                self.plan.stage,
                input_hash,
                output_hash,
            )
        };
        let result = match out {
            StageOutput::Hidden(h) => {
                let data = ints_bytes(&h);
                StageOut::Activation(Activation {
                    commit: commit(sha256(&data)),
                    rows: rows as u32,
                    data,
                })
            }
            StageOutput::Logits(logits) => {
                let token = self.sampler.pick(&logits, self.model.frac);
                StageOut::Token {
                    token,
                    commit: commit(sha256(&ints_bytes(&logits))),
                }
            }
        };
        self.pos += rows;
        self.step += 1;
        assert!(self.pos <= self.plan.capacity, "the cache bounds positions");
        Ok(result)
    }
}

/// The largest encoded activation a neighbour may send: the data and its commitment.
pub const MAX_ACTIVATION_FRAME: usize = MAX_ACTIVATION + 4096;

/// An activation as it travels between stages (a bare postcard frame with the protocol
/// version in front), checked against [`MAX_ACTIVATION_FRAME`] before anything is decoded.
pub fn decode_activation(bytes: &[u8]) -> Result<Activation, WorkerError> {
    Ok(tabula_protocol::decode(bytes, MAX_ACTIVATION_FRAME)?)
}

/// The part of a member that is the same natively and in the browser, with no I/O: which
/// input a step takes, the signed report of a step, and the outputs it sent downstream, kept
/// for the coordinator's re-execution of the next stage. The native member (`member.rs`)
/// and the browser's (`tabula-web`) drive it from their own links and sockets.
#[derive(Debug)]
pub struct MemberCore {
    session: SessionId,
    /// This stage has an upstream stage (it takes activations, never tokens).
    has_upstream: bool,
    /// Outputs sent downstream. Invariant: their steps strictly increase.
    sent: Vec<Activation>,
}

impl MemberCore {
    pub fn new(plan: &StagePlan) -> Self {
        Self {
            session: plan.session,
            has_upstream: plan.upstream.is_some(),
            sent: Vec::new(),
        }
    }

    /// Checks the coordinator's token input for `step` against the step the runner expects:
    /// only a first stage takes tokens, in order.
    pub fn check_tokens(&self, step: u32, expected: u32) -> Result<(), WorkerError> {
        if self.has_upstream || step != expected {
            return Err(WorkerError::Task(format!(
                "input for step {step}; this stage expects step {expected} from upstream"
            )));
        }
        Ok(())
    }

    /// The report of a step: what this stage signed, and the commitment it received (`None`
    /// for the first stage, whose input is the coordinator's tokens).
    pub fn report(&self, result: &StageOut, received: Option<StageCommit>) -> StageReport {
        StageReport {
            commit: result.commit().clone(),
            received,
            token: match result {
                StageOut::Token { token, .. } => Some(*token),
                StageOut::Activation(_) => None,
            },
        }
    }

    /// Keeps an output that went downstream.
    pub fn sent(&mut self, activation: Activation) {
        assert!(
            self.sent
                .last()
                .is_none_or(|last| last.commit.step < activation.commit.step),
            "outputs are kept in step order"
        );
        self.sent.push(activation);
    }

    /// The coordinator's [`tabula_protocol::ToWorker::StageHistory`]: every output sent up to
    /// `step`, one frame each.
    pub fn history(&self, step: u32) -> impl Iterator<Item = ToCoordinator> + '_ {
        self.sent
            .iter()
            .take_while(move |a| a.commit.step <= step)
            .map(|a| ToCoordinator::StageOutput {
                session: self.session,
                activation: a.clone(),
            })
    }
}

/// A member's link to one neighbouring stage: a direct data channel when one came up (`D`: the
/// `webrtc` crate's natively, the browser's in `tabula-web`), and the coordinator's relay,
/// which is always there (the peer may have fallen back to it while this side's channel came
/// up). Sends go direct while that works, then through the relay for good.
pub struct Neighbour<D: Link> {
    pub peer: PublicKey,
    pub direct: Option<D>,
    pub relay: ChannelLink,
}

impl<D: Link> Neighbour<D> {
    pub fn path(&self) -> LinkPath {
        match self.direct {
            Some(_) => LinkPath::Direct,
            None => LinkPath::Relayed,
        }
    }

    pub async fn send(&mut self, message: &[u8]) -> Result<(), TransportError> {
        if let Some(direct) = &self.direct {
            match direct.send(message).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(peer = %self.peer, "data channel failed ({e}); relaying through the coordinator");
                    self.direct = None;
                }
            }
        }
        self.relay.send(message).await
    }

    /// The next message from either path. Cancel-safe: neither link loses a chunk when the
    /// other wins.
    pub async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        use futures_util::FutureExt;
        match &self.direct {
            Some(direct) => {
                let a = direct.recv().fuse();
                let b = self.relay.recv().fuse();
                futures_util::pin_mut!(a, b);
                futures_util::select! {
                    m = a => m,
                    m = b => m,
                }
            }
            None => self.relay.recv().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(upstream: Option<PublicKey>) -> StagePlan {
        StagePlan {
            session: SessionId::from_hex("00112233445566778899aabbccddeeff").unwrap(),
            stage: u16::from(upstream.is_some()),
            layers: 0..1,
            capacity: 8,
            upstream,
            first_step: 0,
            temperature_milli: 0,
            top_p_q16: 65536,
            seed: 0,
        }
    }

    fn activation(id: &Identity, plan: &StagePlan, step: u32) -> Activation {
        let data = vec![step as u8; 8];
        Activation {
            commit: id.stage_commit(plan.session, step, 0, sha256(b"in"), sha256(&data)),
            rows: 1,
            data,
        }
    }

    #[test]
    fn a_member_answers_history_up_to_the_step_asked_and_takes_tokens_only_in_order() {
        let id = Identity::from_seed([7; 32]);
        let first = plan(None);
        let mut core = MemberCore::new(&first);
        for step in 0..4 {
            core.sent(activation(&id, &first, step));
        }
        let steps = |upto| -> Vec<u32> {
            core.history(upto)
                .map(|f| match f {
                    ToCoordinator::StageOutput {
                        activation,
                        session,
                    } => {
                        assert_eq!(session, first.session);
                        activation.commit.step
                    }
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(steps(2), [0, 1, 2]);
        assert_eq!(steps(9), [0, 1, 2, 3]);
        assert!(core.check_tokens(4, 4).is_ok());
        assert!(core.check_tokens(5, 4).is_err(), "a skipped step");
        assert!(core.check_tokens(3, 4).is_err(), "a replayed step");
        // A later stage takes activations from upstream, never tokens from the coordinator.
        let later = MemberCore::new(&plan(Some(id.public())));
        assert!(later.check_tokens(0, 0).is_err());
    }

    #[test]
    #[should_panic(expected = "step order")]
    fn outputs_are_kept_in_step_order() {
        let id = Identity::from_seed([7; 32]);
        let p = plan(None);
        let mut core = MemberCore::new(&p);
        core.sent(activation(&id, &p, 1));
        core.sent(activation(&id, &p, 1));
    }
}

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
    Activation, Hash, Identity, MAX_ACTIVATION, PublicKey, SessionId, StageCommit, sha256,
    sign::SignerKey,
};

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

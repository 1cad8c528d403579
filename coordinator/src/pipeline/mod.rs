//! Pipeline sessions: one generation run by a model's layers cut into stages on several
//! workers, by two disjoint pipelines compared at every step.
//!
//! This module owns the registry of workers that take stages ([`Pipelines`]: their sockets,
//! networks, memory budgets and the session each serves), the routing of signalling and
//! relayed chunks between the neighbours of a session (and only between them), and the
//! driver of a session ([`run_session`]): placement, feeding the first stages, judging each
//! step ([`judge`]), re-executing the first divergent stage from its agreed input when
//! pipelines disagree, rebuilding a pipeline whose member left, lied or stalled, and settling
//! credit per stage. It must not know about HTTP: the API hands it a [`SessionSpec`] and
//! reads agreed tokens from a channel.

pub mod judge;

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tabula_engine::cpu::CpuBackend;
use tabula_models::exact::{ExactFile, stage_pieces, stage_ranges};
use tabula_protocol::{
    Activation, Bytes, FileRef, Hash, LinkPath, MAX_STAGES, ModelRef, PublicKey, SessionId, Signal,
    StageOrder, StageReport, Task, ToWorker, UnitOutput,
};
use tabula_worker::stage::{StageOut, StagePlan, StageRunner, tokens_hash};
use tokio::sync::mpsc;

use self::judge::{Reported, StepVerdict};
use crate::{
    db::random_bytes,
    models::ServedModel,
    scheduler::{Assurance, State},
};

/// When a generation request runs as a pipeline session (`tabula serve --pipeline`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PipelineMode {
    /// Never: every generation is a unit on one worker.
    Off,
    /// When no connected worker can hold the model whole (by its declared budget).
    #[default]
    Auto,
    /// Always, with this many stages (tests, benchmarks).
    Stages(u16),
}

impl std::str::FromStr for PipelineMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(PipelineMode::Off),
            "auto" => Ok(PipelineMode::Auto),
            n => match n.parse::<u16>() {
                Ok(n) if (1..=MAX_STAGES).contains(&n) => Ok(PipelineMode::Stages(n)),
                _ => Err(format!(
                    "`{s}` is not off, auto or a stage count from 1 to {MAX_STAGES}"
                )),
            },
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct PipelineMetrics {
    pub sessions_started: AtomicU64,
    pub sessions_finished: AtomicU64,
    pub sessions_failed: AtomicU64,
    pub steps_agreed: AtomicU64,
    pub stage_disputes: AtomicU64,
    pub stage_liars: AtomicU64,
    pub rebuilds: AtomicU64,
    /// Stages of lone trusted pipelines re-executed at random.
    pub spot_checks: AtomicU64,
    pub links_direct: AtomicU64,
    pub links_relayed: AtomicU64,
    pub relayed_bytes: AtomicU64,
    /// Sessions the coordinator re-executed whole (`referee` assurance, audits).
    pub audits: AtomicU64,
    /// Of those, sessions whose agreed result was wrong.
    pub audit_catches: AtomicU64,
    /// Members that failed, left or stalled a session.
    pub stage_failures: AtomicU64,
    /// Keys put in a cooldown for failing sessions again and again.
    pub cooldowns: AtomicU64,
}

/// What the registry remembers of a key's stage work, across its connections: keys are free,
/// so a key that takes stages and fails them (a false budget, a failure on purpose, a tab that
/// keeps closing) would otherwise cost every session it is placed in a rebuild, for nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StageRecord {
    /// Sessions it served to their end.
    finished: u32,
    /// Sessions it failed, left or stalled since it last finished one.
    failures: u32,
    /// Not placed before this.
    cooldown_until: Option<std::time::Instant>,
}

/// Which keys placement takes first. Workers with a record of finished sessions and no
/// failure since come first, newcomers next, keys that failed since they last finished one
/// last: a fresh key is placed only when the proven are all busy, and a proven key that
/// fails a session loses its place in the queue, which it earns back only by finishing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    Proven,
    New,
    Failing,
}

impl StageRecord {
    fn standing(&self) -> Standing {
        match (self.finished, self.failures) {
            (_, f) if f > 0 => Standing::Failing,
            (0, _) => Standing::New,
            _ => Standing::Proven,
        }
    }

    fn cooling(&self, now: std::time::Instant) -> bool {
        self.cooldown_until.is_some_and(|t| now < t)
    }
}

/// Failures in a row before a key's first cooldown; each further one doubles it.
const FAILURES_BEFORE_COOLDOWN: u32 = 2;
const COOLDOWN: Duration = Duration::from_secs(10 * 60);
const MAX_COOLDOWN: Duration = Duration::from_secs(24 * 60 * 60);
/// Keys whose records are kept; past it, records without a cooldown are forgotten first.
const MAX_RECORDS: usize = 1 << 16;
const _: () =
    assert!(COOLDOWN.as_secs() <= MAX_COOLDOWN.as_secs() && FAILURES_BEFORE_COOLDOWN >= 1);

/// A worker that takes stages.
struct Volunteer {
    tx: mpsc::UnboundedSender<ToWorker>,
    prefix: Arc<str>,
    /// MiB; 0: no limit declared.
    budget_mb: u32,
    /// The session it serves. Invariant: `Some` exactly while a session's placement holds it.
    session: Option<SessionId>,
    /// Caught lying: never placed again (its key is struck or banned; a banned key's next
    /// login is refused).
    barred: bool,
}

/// What a member sent about its session.
#[derive(Debug)]
pub enum Event {
    Up { downstream: Option<LinkPath> },
    Step(StageReport),
    Output(Activation),
    Failed(String),
    Left,
}

struct Entry {
    events: mpsc::UnboundedSender<(PublicKey, Event)>,
    /// Directed pairs of neighbours that may signal and relay to each other.
    links: HashSet<(PublicKey, PublicKey)>,
    /// Bytes each member relayed or signalled, against `relay_limit`.
    relayed: HashMap<PublicKey, u64>,
    relay_limit: u64,
    /// The member whose retained outputs the session is waiting for, if any.
    history_from: Option<PublicKey>,
}

/// The registry of stage workers and running sessions.
#[derive(Default)]
pub struct Pipelines {
    volunteers: Mutex<HashMap<PublicKey, Volunteer>>,
    sessions: Mutex<HashMap<SessionId, Entry>>,
    /// Invariant: at most [`MAX_RECORDS`] entries.
    records: Mutex<HashMap<PublicKey, StageRecord>>,
    pub metrics: PipelineMetrics,
}

/// Sessions one coordinator drives at once.
pub const MAX_SESSIONS: usize = 256;

impl Pipelines {
    fn volunteers(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Volunteer>> {
        self.volunteers.lock().expect("pipeline volunteers lock")
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry>> {
        self.sessions.lock().expect("pipeline sessions lock")
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, StageRecord>> {
        self.records.lock().expect("pipeline records lock")
    }

    /// `key` failed, left or stalled a session: it drops behind newcomers, and after
    /// [`FAILURES_BEFORE_COOLDOWN`] in a row it is not placed for a while (doubling).
    fn record_failure(&self, key: &PublicKey) {
        self.metrics.stage_failures.fetch_add(1, Ordering::Relaxed);
        let mut records = self.records();
        if records.len() >= MAX_RECORDS && !records.contains_key(key) {
            let now = std::time::Instant::now();
            let forget = records
                .iter()
                .find(|(_, r)| !r.cooling(now))
                .map(|(k, _)| *k);
            match forget {
                Some(k) => records.remove(&k),
                None => return, // every record is a cooldown: keep them
            };
        }
        let r = records.entry(*key).or_default();
        r.failures = r.failures.saturating_add(1);
        if r.failures >= FAILURES_BEFORE_COOLDOWN {
            let doublings = (r.failures - FAILURES_BEFORE_COOLDOWN).min(16);
            let cooldown = COOLDOWN.saturating_mul(1 << doublings).min(MAX_COOLDOWN);
            r.cooldown_until = Some(std::time::Instant::now() + cooldown);
            self.metrics.cooldowns.fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker = %key, failures = r.failures, minutes = cooldown.as_secs() / 60,
                "a stage worker keeps failing sessions: not placed for a while");
        }
        debug_assert!(records.len() <= MAX_RECORDS);
    }

    /// `keys` served a session to its end.
    fn record_finished(&self, keys: &[PublicKey]) {
        let mut records = self.records();
        for key in keys {
            if records.len() >= MAX_RECORDS && !records.contains_key(key) {
                continue; // a newcomer's first success waits for room
            }
            let r = records.entry(*key).or_default();
            r.finished = r.finished.saturating_add(1);
            r.failures = 0;
            r.cooldown_until = None;
        }
    }
    /// A logged-in worker that takes stages.
    pub fn join(
        &self,
        key: PublicKey,
        tx: mpsc::UnboundedSender<ToWorker>,
        prefix: Arc<str>,
        budget_mb: u32,
    ) {
        // A second connection of the same key replaces the first; a session it served
        // hears that the member left.
        if let Some(old) = self.volunteers().insert(
            key,
            Volunteer {
                tx,
                prefix,
                budget_mb,
                session: None,
                barred: false,
            },
        ) && let Some(session) = old.session
        {
            self.event(&key, &session, Event::Left);
        }
    }

    /// The worker's connection ended.
    pub fn leave(&self, key: &PublicKey) {
        let gone = {
            let mut v = self.volunteers();
            match v.get(key) {
                Some(w) if w.tx.is_closed() => v.remove(key),
                _ => None,
            }
        };
        if let Some(session) = gone.and_then(|w| w.session) {
            self.event(key, &session, Event::Left);
        }
    }

    /// Whether `key` serves a session now (it then gets no units).
    pub fn busy(&self, key: &PublicKey) -> bool {
        self.volunteers()
            .get(key)
            .is_some_and(|v| v.session.is_some())
    }

    /// Workers that take stages, and the budgets they declared.
    pub fn budgets(&self) -> Vec<u32> {
        self.volunteers().values().map(|v| v.budget_mb).collect()
    }

    /// Hands a member's message to its session, if it is a member of it. A retained output
    /// (megabytes) is taken only from the member the session asked for them, while it waits
    /// for them: anyone else's are dropped here, before they can pile up.
    pub fn event(&self, from: &PublicKey, session: &SessionId, event: Event) {
        let sessions = self.sessions();
        if let Some(entry) = sessions.get(session)
            && entry.links.iter().any(|(a, _)| a == from)
            && (!matches!(event, Event::Output(_)) || entry.history_from == Some(*from))
        {
            let _ = entry.events.send((*from, event));
        }
    }

    /// Takes retained outputs from `from` only (or from nobody).
    fn expect_outputs(&self, session: &SessionId, from: Option<PublicKey>) {
        if let Some(entry) = self.sessions().get_mut(session) {
            entry.history_from = from;
        }
    }

    /// Forwards signalling or a relayed chunk from `from` to its neighbour `to`. Refused
    /// (with the reason) for anyone who is not that neighbour, and past the relay limit.
    pub fn forward(
        &self,
        from: &PublicKey,
        session: &SessionId,
        to: &PublicKey,
        payload: Forward,
    ) -> Result<(), String> {
        let mut sessions = self.sessions();
        let Some(entry) = sessions.get_mut(session) else {
            return Err(format!("no session {session} here"));
        };
        if !entry.links.contains(&(*from, *to)) {
            return Err(format!("{to} is not your neighbour in session {session}"));
        }
        // Signalling counts against the same allowance as relayed chunks: neither may grow
        // a neighbour's socket queue without bound.
        let bytes = match &payload {
            Forward::Relay(chunk) => chunk.len(),
            Forward::Signal(Signal::Offer { sdp } | Signal::Answer { sdp }) => sdp.len(),
            Forward::Signal(Signal::Candidate { json }) => json.len(),
        } as u64;
        let used = entry.relayed.entry(*from).or_default();
        *used += bytes;
        if *used > entry.relay_limit {
            return Err(format!(
                "relayed more than the session's {} bytes",
                entry.relay_limit
            ));
        }
        if let Forward::Relay(_) = &payload {
            self.metrics
                .relayed_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        drop(sessions);
        let message = match payload {
            Forward::Signal(signal) => ToWorker::Signal {
                session: *session,
                peer: *from,
                signal,
            },
            Forward::Relay(chunk) => ToWorker::Relay {
                session: *session,
                peer: *from,
                chunk,
            },
        };
        if let Some(v) = self.volunteers().get(to) {
            let _ = v.tx.send(message);
        }
        Ok(())
    }

    fn send(&self, to: &PublicKey, message: ToWorker) {
        if let Some(v) = self.volunteers().get(to) {
            let _ = v.tx.send(message);
        }
    }

    /// Takes one worker per stage: free, not in `avoid`, each from a network no other member
    /// of the session uses, with a budget that holds its stage; chosen at random, so no
    /// worker picks its position or its partners.
    fn place(
        &self,
        session: SessionId,
        need_mb: &[u32],
        avoid: &HashSet<PublicKey>,
        avoid_prefixes: &HashSet<Arc<str>>,
        pool: Option<&HashSet<PublicKey>>,
    ) -> Option<Vec<PublicKey>> {
        let records = self.records().clone();
        let now = std::time::Instant::now();
        let record = |k: &PublicKey| records.get(k).copied().unwrap_or_default();
        let mut volunteers = self.volunteers();
        let mut free: Vec<(PublicKey, Arc<str>, u32)> = volunteers
            .iter()
            .filter(|(k, v)| {
                v.session.is_none()
                    && !v.barred
                    && !avoid.contains(*k)
                    && pool.is_none_or(|p| p.contains(*k))
                    && !avoid_prefixes.contains(&v.prefix)
                    && !v.tx.is_closed()
                    && !record(k).cooling(now)
            })
            .map(|(k, v)| (*k, v.prefix.clone(), v.budget_mb))
            .collect();
        // Fisher–Yates with the OS's randomness, then the proven first (a stable sort keeps
        // the order random within each standing).
        for i in (1..free.len()).rev() {
            let j = (u64::from_le_bytes(random_bytes::<8>()) % (i as u64 + 1)) as usize;
            free.swap(i, j);
        }
        free.sort_by_key(|(k, _, _)| record(k).standing());
        // The largest stages first: a worker with a big budget is not spent on a small stage
        // that anyone could hold.
        let mut order: Vec<usize> = (0..need_mb.len()).collect();
        order.sort_by_key(|&s| std::cmp::Reverse(need_mb[s]));
        let mut chosen: Vec<Option<PublicKey>> = vec![None; need_mb.len()];
        let mut used: HashSet<Arc<str>> = HashSet::new();
        for s in order {
            let need = need_mb[s];
            let pick = free.iter().position(|(_, prefix, budget)| {
                !used.contains(prefix) && (*budget == 0 || *budget >= need)
            })?;
            let (key, prefix, _) = free.remove(pick); // keeps the order: the proven first
            used.insert(prefix);
            chosen[s] = Some(key);
        }
        let chosen: Vec<PublicKey> = chosen
            .into_iter()
            .map(|k| k.expect("every stage placed"))
            .collect();
        for key in &chosen {
            volunteers
                .get_mut(key)
                .expect("chosen from the map")
                .session = Some(session);
        }
        Some(chosen)
    }

    /// Frees `keys` from `session` (they get no more of its messages).
    fn free(&self, session: &SessionId, keys: &[PublicKey]) {
        let mut volunteers = self.volunteers();
        for key in keys {
            if let Some(v) = volunteers.get_mut(key)
                && v.session == Some(*session)
            {
                v.session = None;
                let _ = v.tx.send(ToWorker::StageEnd { session: *session });
            }
        }
    }

    /// Never places `key` again while it is connected.
    fn bar(&self, key: &PublicKey) {
        if let Some(v) = self.volunteers().get_mut(key) {
            v.barred = true;
        }
    }

    fn prefix(&self, key: &PublicKey) -> Option<Arc<str>> {
        self.volunteers().get(key).map(|v| v.prefix.clone())
    }
}

/// What [`Pipelines::forward`] carries.
pub enum Forward {
    Signal(Signal),
    Relay(Vec<u8>),
}

/// A generation to run as a pipeline session.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub job_id: String,
    pub unit_id: String,
    /// The unit's task (its digest names the credit receipts).
    pub task: Task,
    pub model: String,
    pub stages: usize,
    pub pipelines: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub temperature_milli: u32,
    pub top_p_q16: u32,
    pub seed: u64,
    pub stop: Vec<u32>,
    /// How long to wait for enough free workers, and for a stalled step.
    pub placement_wait: Duration,
    pub direct_ms: u32,
    /// The only workers that may serve it (its API key's pool), if limited.
    pub pool: Option<HashSet<PublicKey>>,
    /// How hard the result is checked: `standard` (the pipelines compared at every step; a
    /// trusted pipeline may run alone, spot-checked; `--audit-rate` of sessions re-executed
    /// whole by the coordinator at the end), `high` (at least three pipelines, never alone)
    /// or `referee` (besides the pipelines, the coordinator computes the whole generation
    /// itself and its output is the one delivered).
    pub assurance: Assurance,
}

impl SessionSpec {
    /// The session of a generation `task`, its prompt, sampling and stop tokens taken from
    /// the task itself (so the two cannot differ); `None` for any other task.
    #[allow(clippy::too_many_arguments)]
    pub fn for_task(
        task: Task,
        job_id: String,
        unit_id: String,
        stages: usize,
        pipelines: usize,
        placement_wait: Duration,
        direct_ms: u32,
        pool: Option<HashSet<PublicKey>>,
    ) -> Option<Self> {
        let Task::Generate {
            model,
            prompt,
            max_tokens,
            temperature_milli,
            top_p_q16,
            seed,
            stop,
            ..
        } = task.clone()
        else {
            return None;
        };
        Some(Self {
            job_id,
            unit_id,
            task,
            model: model.name,
            stages,
            pipelines,
            prompt,
            max_tokens,
            temperature_milli,
            top_p_q16,
            seed,
            stop,
            placement_wait,
            direct_ms,
            pool,
            assurance: Assurance::Standard,
        })
    }

    /// Applies a request's assurance: `high` and `referee` never run a pipeline alone, and
    /// `high` runs at least three.
    pub fn with_assurance(mut self, assurance: Assurance) -> Self {
        if assurance == Assurance::High {
            self.pipelines = self.pipelines.max(3);
        }
        self.assurance = assurance;
        self
    }
}

/// How a session ended well.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub output: UnitOutput,
    pub links_direct: u64,
    pub links_relayed: u64,
    pub disputes: u64,
    pub liars: Vec<PublicKey>,
    pub rebuilds: u64,
}

/// One pipeline of a session.
struct Pipe {
    keys: Vec<PublicKey>,
    /// The step its stages started at.
    base: u32,
    up: Vec<bool>,
    fed: bool,
    reports: Vec<Option<StageReport>>,
    /// Each stage's output hash at every agreed step since `base`.
    history: Vec<Vec<Hash>>,
    /// Rows each stage computed at the current step.
    rows: usize,
    /// When the current step (or the pipeline's start) began.
    since: tokio::time::Instant,
}

/// A stage's share of the model: its pieces' MiB, and GFLOP per position.
fn stage_costs(
    model: &ServedModel,
    layers: usize,
    ranges: &[Range<usize>],
) -> (Vec<u32>, Vec<f64>) {
    let size = |name: &str| {
        model
            .pieces
            .iter()
            .find(|p| p.name == name)
            .map_or(0, |p| p.size)
    };
    let mut mb = Vec::new();
    let mut gflop = Vec::new();
    for r in ranges {
        let names = stage_pieces(layers, r);
        let bytes: u64 = names.iter().map(|n| size(n)).sum();
        mb.push(bytes.div_ceil(1 << 20) as u32);
        // Int8 weights: a byte is a parameter; the embedding is a lookup, not products.
        let computed: u64 = names
            .iter()
            .filter(|n| n.starts_with("layer.") || n.as_str() == "head")
            .map(|n| size(n))
            .sum();
        gflop.push(2.0 * computed as f64 / 1e9);
    }
    (mb, gflop)
}

/// The stage count `mode` asks for `model` given the budgets of the stage workers
/// connected now (`None`: run it as a unit). `whole_fits` says whether some worker can
/// hold the model whole.
pub fn stages_for(
    mode: PipelineMode,
    model: &ServedModel,
    layers: usize,
    budgets: &[u32],
    whole_fits: bool,
    pipelines: usize,
) -> Option<usize> {
    match mode {
        PipelineMode::Off => None,
        PipelineMode::Stages(n) => Some((n as usize).min(layers)),
        PipelineMode::Auto if whole_fits => None,
        PipelineMode::Auto => (2..=layers.min(MAX_STAGES as usize)).find(|&n| {
            let Ok(ranges) = stage_ranges(layers, n) else {
                return false;
            };
            let (need, _) = stage_costs(model, layers, &ranges);
            let biggest = need.iter().copied().max().unwrap_or(0);
            budgets.iter().filter(|&&b| b == 0 || b >= biggest).count() >= n * pipelines
        }),
    }
}

/// Runs one session to its end. Agreed tokens go to `tokens` as they are agreed; the
/// outcome is settled (credit, strikes, the job's output) before this returns. A session
/// that fails marks its job failed (it no longer counts against its owner's quota).
pub async fn run_session(
    state: Arc<State>,
    spec: SessionSpec,
    tokens: mpsc::UnboundedSender<u32>,
) -> Result<Outcome, String> {
    let job = spec.job_id.clone();
    let result = drive_session(state.clone(), spec, tokens).await;
    if let Err(why) = &result
        && let Err(e) = state.fail_pipeline_job(&job, why).await
    {
        tracing::error!(job, "marking a failed pipeline job: {e}");
    }
    result
}

async fn drive_session(
    state: Arc<State>,
    spec: SessionSpec,
    tokens: mpsc::UnboundedSender<u32>,
) -> Result<Outcome, String> {
    let session: SessionId = Bytes(random_bytes::<16>());
    let pipelines = &state.pipelines;
    if pipelines.sessions().len() >= MAX_SESSIONS {
        return Err(format!(
            "{MAX_SESSIONS} pipeline sessions are running; retry later"
        ));
    }
    let (events_tx, events) = mpsc::unbounded_channel();
    let model = state
        .registry()
        .find(&spec.model)
        .cloned()
        .ok_or_else(|| format!("model {} is not served", spec.model))?;
    let crate::models::ModelKind::Generation { layers, dim, .. } = model.kind else {
        return Err("not a generation model".into());
    };
    let capacity = spec.prompt.len() + spec.max_tokens as usize;
    pipelines.sessions().insert(
        session,
        Entry {
            events: events_tx,
            links: HashSet::new(),
            relayed: HashMap::new(),
            // Every activation of the session twice over (a rebuild resends the prefill).
            relay_limit: (capacity * dim * 4 * 2 + (4 << 20)) as u64,
            history_from: None,
        },
    );
    pipelines
        .metrics
        .sessions_started
        .fetch_add(1, Ordering::Relaxed);
    let mut driver = Driver {
        state: state.clone(),
        session,
        spec,
        layers,
        dim,
        capacity,
        events,
        deferred: Default::default(),
        tokens_tx: tokens,
        pipes: Vec::new(),
        ranges: Vec::new(),
        need_mb: Vec::new(),
        gflop: Vec::new(),
        excluded: HashSet::new(),
        excluded_prefixes: HashSet::new(),
        liars: Vec::new(),
        tokens: Vec::new(),
        logits: Vec::new(),
        credit: HashMap::new(),
        rebuilds: 0,
        disputes: 0,
        direct: 0,
        relayed: 0,
        spot: None,
        spot_checks: 0,
        held: Vec::new(),
        restart: false,
        audits: 0,
    };
    let result = driver.run().await;
    let members: Vec<PublicKey> = driver.pipes.iter().flat_map(|p| p.keys.clone()).collect();
    pipelines.free(&session, &members);
    pipelines.sessions().remove(&session);
    match &result {
        Ok(_) => pipelines
            .metrics
            .sessions_finished
            .fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(%session, "pipeline session failed: {e}");
            pipelines
                .metrics
                .sessions_failed
                .fetch_add(1, Ordering::Relaxed)
        }
    };
    result
}

/// Rebuilds one session may take before it gives up.
const MAX_REBUILDS_PER_STAGE: u64 = 3;
/// How long a pipeline may take to load and link before its first step.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

struct Driver {
    state: Arc<State>,
    session: SessionId,
    spec: SessionSpec,
    layers: usize,
    dim: usize,
    capacity: usize,
    events: mpsc::UnboundedReceiver<(PublicKey, Event)>,
    /// Events that arrived while a dispute was being settled, to handle next.
    deferred: std::collections::VecDeque<(PublicKey, Event)>,
    tokens_tx: mpsc::UnboundedSender<u32>,
    pipes: Vec<Pipe>,
    ranges: Vec<Range<usize>>,
    need_mb: Vec<u32>,
    gflop: Vec<f64>,
    /// Keys that may not serve this session again: liars, and members that left or stalled.
    excluded: HashSet<PublicKey>,
    /// Networks of members that failed, left or stalled: another key from there could be the
    /// same griefer, so none serves this session again.
    excluded_prefixes: HashSet<Arc<str>>,
    liars: Vec<PublicKey>,
    tokens: Vec<u32>,
    /// The agreed last stage's output hash (the logits) of every step.
    logits: Vec<Hash>,
    /// GFLOP of agreed work per member.
    credit: HashMap<PublicKey, f64>,
    rebuilds: u64,
    disputes: u64,
    direct: u64,
    relayed: u64,
    /// A lone trusted pipeline's pending spot check: (step, stage).
    spot: Option<(u32, usize)>,
    spot_checks: u64,
    /// Agreed tokens of a lone pipeline, held until its spot check passes (or, under
    /// `referee` assurance, until the coordinator's own run has confirmed or replaced them).
    held: Vec<u32>,
    /// Set when a spot check failed: the session starts over at step 0.
    restart: bool,
    /// Whole-session re-executions by the coordinator (`referee` assurance and audits).
    audits: u64,
}

/// A uniform draw in [0, 1) from the OS's randomness.
fn unit_random() -> f64 {
    (u64::from_le_bytes(random_bytes::<8>()) >> 11) as f64 / (1u64 << 53) as f64
}

/// The (step, stage) a lone pipeline's spot check re-executes: uniform over the steps a
/// session may reach and its stages. A session that ends sooner is checked at its last
/// step.
fn spot_check(max_tokens: u32, stages: usize) -> (u32, usize) {
    let r = u64::from_le_bytes(random_bytes::<8>());
    let step = (r % u64::from(max_tokens.max(1))) as u32;
    let stage = ((r >> 32) % stages.max(1) as u64) as usize;
    (step, stage)
}

impl Driver {
    fn pipelines(&self) -> &Pipelines {
        &self.state.pipelines
    }

    async fn run(&mut self) -> Result<Outcome, String> {
        let model = self
            .state
            .registry()
            .find(&self.spec.model)
            .cloned()
            .ok_or("the model went away")?;
        self.ranges = stage_ranges(self.layers, self.spec.stages).map_err(|e| e.to_string())?;
        (self.need_mb, self.gflop) = stage_costs(&model, self.layers, &self.ranges);
        self.add_pipe(0).await?;
        // A pipeline of long-clean workers runs alone, but for a random share of sessions
        // (`--spot-check-rate`), with one stage of one step re-executed at random; it cannot
        // tell which.
        let trusted = self.spec.assurance == Assurance::Standard
            && self.pipes[0].keys.iter().all(|k| self.state.long_clean(k));
        if self.spec.pipelines > 1 && trusted && unit_random() >= self.state.config.spot_check_rate
        {
            self.spot = Some(spot_check(self.spec.max_tokens, self.spec.stages));
        } else {
            for _ in 1..self.spec.pipelines {
                self.add_pipe(0).await?;
            }
        }
        let mut step: u32 = 0;
        loop {
            self.feed(step);
            if self
                .pipes
                .iter()
                .all(|p| p.reports.iter().all(Option::is_some))
            {
                match self.judge(step).await? {
                    Some(token) => {
                        if self.spec.stop.contains(&token)
                            || self.tokens.len() >= self.spec.max_tokens as usize
                        {
                            return self.finish(self.spec.stop.contains(&token)).await;
                        }
                        step += 1;
                        for p in &mut self.pipes {
                            p.reports.iter_mut().for_each(|r| *r = None);
                            p.fed = false;
                            p.since = tokio::time::Instant::now();
                        }
                    }
                    None => {
                        if std::mem::take(&mut self.restart) {
                            step = 0;
                        }
                    }
                }
                continue;
            }
            let deadline = self
                .pipes
                .iter()
                .map(|p| {
                    p.since
                        + if p.up.iter().all(|&u| u) {
                            STEP_TIMEOUT
                        } else {
                            START_TIMEOUT
                        }
                })
                .min()
                .expect("a session has pipelines");
            if let Some((from, event)) = self.deferred.pop_front() {
                self.on_event(step, from, event).await?;
                continue;
            }
            tokio::select! {
                event = self.events.recv() => {
                    let Some((from, event)) = event else {
                        return Err("the session's event channel closed".into());
                    };
                    self.on_event(step, from, event).await?;
                }
                _ = tokio::time::sleep_until(deadline) => self.on_stall(step).await?,
            }
        }
    }

    /// Adds a pipeline and places it to start at `step`.
    async fn add_pipe(&mut self, step: u32) -> Result<(), String> {
        self.pipes.push(Pipe {
            keys: Vec::new(),
            base: step,
            up: Vec::new(),
            fed: false,
            reports: Vec::new(),
            history: Vec::new(),
            rows: 0,
            since: tokio::time::Instant::now(),
        });
        self.place(self.pipes.len() - 1, step).await
    }

    /// A lone trusted pipeline whose spot check is due at `step` (or whose generation ends
    /// before it): re-executes the chosen stage. A lie there convicts the stage, and the
    /// session goes on with two pipelines. `true` when the step stands.
    async fn spot_check_due(&mut self, step: u32, token: u32) -> Result<bool, String> {
        let Some((at, stage)) = self.spot else {
            return Ok(true);
        };
        let ends = self.spec.stop.contains(&token)
            || self.tokens.len() + 1 >= self.spec.max_tokens as usize;
        if step < at && !ends {
            return Ok(true);
        }
        self.spot = None;
        self.spot_checks += 1;
        self.pipelines()
            .metrics
            .spot_checks
            .fetch_add(1, Ordering::Relaxed);
        let base = self.pipes[0].base;
        let (hash, want) = self.replay(step, stage, base, &[0]).await?;
        let r = self.pipes[0].reports[stage]
            .as_ref()
            .expect("all reports are in");
        if r.commit.output_hash == hash && (want.is_none() || r.token == want) {
            // The tokens held back until now go out.
            for t in std::mem::take(&mut self.held) {
                let _ = self.tokens_tx.send(t);
            }
            return Ok(true);
        }
        let liar = self.pipes[0].keys[stage];
        tracing::warn!(session = %self.session, %liar, stage, step, "a spot check caught a trusted stage");
        self.convict(liar).await?;
        self.start_over().await?;
        Ok(false)
    }

    /// A lone pipeline caught lying: nothing it computed can be trusted, so the generation
    /// starts over at step 0, checked by two pipelines (none of its tokens reached the
    /// requester: they were held for the spot check).
    async fn start_over(&mut self) -> Result<(), String> {
        self.spot = None;
        self.held.clear();
        self.tokens.clear();
        self.logits.clear();
        self.credit.clear();
        self.restart = true;
        self.rebuild(0, 0).await
    }

    /// The position of `key` now, if it is a member.
    fn position(&self, key: &PublicKey) -> Option<(usize, usize)> {
        self.pipes
            .iter()
            .enumerate()
            .find_map(|(p, pipe)| pipe.keys.iter().position(|k| k == key).map(|s| (p, s)))
    }

    async fn on_event(&mut self, step: u32, from: PublicKey, event: Event) -> Result<(), String> {
        let Some((p, s)) = self.position(&from) else {
            return Ok(());
        };
        match event {
            Event::Up { downstream } => {
                self.pipes[p].up[s] = true;
                match downstream {
                    Some(LinkPath::Direct) => {
                        self.direct += 1;
                        self.pipelines()
                            .metrics
                            .links_direct
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(LinkPath::Relayed) => {
                        self.relayed += 1;
                        self.pipelines()
                            .metrics
                            .links_relayed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            // A member reports once per step, in order, and a rebuilt pipeline's old members
            // never serve the session again: whatever a member reports while its slot is
            // empty is its report for this step (one for another step or stage is judged a
            // lie).
            Event::Step(report) => {
                if self.pipes[p].reports[s].is_none() {
                    self.pipes[p].reports[s] = Some(report);
                }
            }
            // Outputs are read by the referee; one arriving otherwise is dropped.
            Event::Output(_) => {}
            Event::Failed(reason) => {
                tracing::info!(session = %self.session, member = %from, "a stage failed: {reason}");
                self.drop_member(from);
                // A complaint about the upstream's data cannot be proven either way: neither
                // serves this session again, and neither is struck.
                if reason.starts_with("upstream") && s > 0 {
                    self.excluded.insert(self.pipes[p].keys[s - 1]);
                }
                self.rebuild(p, step).await?;
            }
            Event::Left => {
                tracing::info!(session = %self.session, member = %from, "a stage left");
                self.drop_member(from);
                self.rebuild(p, step).await?;
            }
        }
        Ok(())
    }

    /// A member that failed, left or stalled: it and its network never serve this session
    /// again, and its record says so. (An upstream it blamed is excluded too, but not
    /// charged: a complaint proves nothing, and charging it would let a griefer push honest
    /// workers into a cooldown.)
    fn drop_member(&mut self, key: PublicKey) {
        self.excluded.insert(key);
        if let Some(prefix) = self.pipelines().prefix(&key) {
            self.excluded_prefixes.insert(prefix);
        }
        self.pipelines().record_failure(&key);
    }

    /// A step that took too long: the first member of each late pipeline that has not
    /// reported while its upstream has is left out (not struck), and its pipeline rebuilt.
    async fn on_stall(&mut self, step: u32) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        for p in 0..self.pipes.len() {
            let pipe = &self.pipes[p];
            let limit = if pipe.up.iter().all(|&u| u) {
                STEP_TIMEOUT
            } else {
                START_TIMEOUT
            };
            if pipe.since + limit > now {
                continue;
            }
            let late = match pipe.up.iter().position(|&u| !u) {
                Some(s) => s,
                None => pipe.reports.iter().position(Option::is_none).unwrap_or(0),
            };
            let key = pipe.keys[late];
            tracing::info!(session = %self.session, member = %key, "a stage stalled");
            self.drop_member(key);
            self.rebuild(p, step).await?;
        }
        Ok(())
    }

    /// Sends each linked pipeline's first stage its input for `step`.
    fn feed(&mut self, step: u32) {
        for p in 0..self.pipes.len() {
            let pipe = &self.pipes[p];
            if pipe.fed || !pipe.up.iter().all(|&u| u) {
                continue;
            }
            let input = self.input(p, step);
            let first = pipe.keys[0];
            self.pipes[p].rows = input.len();
            self.pipes[p].fed = true;
            self.pipes[p].since = tokio::time::Instant::now();
            self.pipelines().send(
                &first,
                ToWorker::StageInput {
                    session: self.session,
                    step,
                    tokens: input,
                },
            );
        }
    }

    /// The tokens pipeline `p`'s first stage takes at `step`: the prompt and the tokens
    /// agreed so far at its first step, then the last agreed token.
    fn input(&self, p: usize, step: u32) -> Vec<u32> {
        if step == self.pipes[p].base {
            let mut all = self.spec.prompt.clone();
            all.extend_from_slice(&self.tokens[..step as usize]);
            all
        } else {
            vec![self.tokens[step as usize - 1]]
        }
    }

    /// Places (or re-places) pipeline `p` to start at `step`.
    async fn place(&mut self, p: usize, step: u32) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.spec.placement_wait;
        let keys = loop {
            let mut avoid = self.excluded.clone();
            let mut avoid_prefixes = self.excluded_prefixes.clone();
            for (q, pipe) in self.pipes.iter().enumerate() {
                if q != p {
                    for k in &pipe.keys {
                        avoid.insert(*k);
                        if let Some(prefix) = self.pipelines().prefix(k) {
                            avoid_prefixes.insert(prefix);
                        }
                    }
                }
            }
            if let Some(keys) = self.pipelines().place(
                self.session,
                &self.need_mb,
                &avoid,
                &avoid_prefixes,
                self.spec.pool.as_ref(),
            ) {
                break keys;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "too few workers{} take pipeline stages: {} stages × {} pipelines need {} on distinct networks (stages of up to {} MiB)",
                    if self.spec.pool.is_some() {
                        " of this API key's pool"
                    } else {
                        ""
                    },
                    self.spec.stages,
                    self.spec.pipelines,
                    self.spec.stages * self.spec.pipelines,
                    self.need_mb.iter().max().copied().unwrap_or(0)
                ));
            }
            // Events of members of other pipelines keep arriving meanwhile; they wait.
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let model = self
            .state
            .registry()
            .find(&self.spec.model)
            .cloned()
            .ok_or("the model went away")?;
        {
            let mut sessions = self.pipelines().sessions();
            let entry = sessions
                .get_mut(&self.session)
                .expect("the session is open");
            for w in keys.windows(2) {
                entry.links.insert((w[0], w[1]));
                entry.links.insert((w[1], w[0]));
            }
            // A one-stage pipeline's member still reports.
            entry.links.insert((keys[0], keys[0]));
            entry
                .links
                .insert((keys[keys.len() - 1], keys[keys.len() - 1]));
        }
        let stages = keys.len();
        for (s, key) in keys.iter().enumerate() {
            let range = &self.ranges[s];
            let files: Vec<FileRef> = stage_pieces(self.layers, range)
                .iter()
                .filter_map(|name| model.pieces.iter().find(|p| &p.name == name))
                .filter_map(|p| {
                    Some(FileRef {
                        role: "piece".into(),
                        sha256: Hash::from_hex(&p.sha256).ok()?,
                        size: p.size,
                    })
                })
                .collect();
            let order = StageOrder {
                session: self.session,
                stage: s as u16,
                stages: stages as u16,
                layers: (range.start as u32, range.end as u32),
                model: ModelRef {
                    name: model.name.clone(),
                    files,
                },
                capacity: self.capacity as u32,
                first_step: step,
                temperature_milli: self.spec.temperature_milli,
                top_p_q16: self.spec.top_p_q16,
                seed: self.spec.seed,
                upstream: (s > 0).then(|| keys[s - 1]),
                downstream: (s + 1 < stages).then(|| keys[s + 1]),
                direct_ms: self.spec.direct_ms,
            };
            self.pipelines().send(key, ToWorker::Stage(order));
        }
        let pipe = &mut self.pipes[p];
        pipe.keys = keys;
        pipe.base = step;
        pipe.up = vec![false; stages];
        pipe.fed = false;
        pipe.reports = vec![None; stages];
        pipe.history = vec![Vec::new(); stages];
        pipe.since = tokio::time::Instant::now();
        Ok(())
    }

    /// Ends pipeline `p`'s members' part and places a new one at `step`.
    async fn rebuild(&mut self, p: usize, step: u32) -> Result<(), String> {
        self.rebuilds += 1;
        self.pipelines()
            .metrics
            .rebuilds
            .fetch_add(1, Ordering::Relaxed);
        if self.rebuilds > MAX_REBUILDS_PER_STAGE * (self.spec.stages * self.spec.pipelines) as u64
        {
            return Err(format!(
                "the session's pipelines were rebuilt {} times; giving up",
                self.rebuilds - 1
            ));
        }
        let old = std::mem::take(&mut self.pipes[p].keys);
        // None of them serves this session again: a message of its old position still on
        // its way would otherwise be taken for one of its new position.
        self.excluded.extend(old.iter().copied());
        {
            let mut sessions = self.pipelines().sessions();
            if let Some(entry) = sessions.get_mut(&self.session) {
                entry
                    .links
                    .retain(|(a, b)| !old.contains(a) && !old.contains(b));
            }
        }
        self.pipelines().free(&self.session, &old);
        self.place(p, step).await?;
        // A lone pipeline that lost a member is no longer all trusted: from here on a second
        // pipeline checks it.
        if self.pipes.len() < self.spec.pipelines {
            // A member that left (not one caught lying: see `start_over`) leaves its earlier
            // steps standing; their tokens go out now.
            self.spot = None;
            for t in std::mem::take(&mut self.held) {
                let _ = self.tokens_tx.send(t);
            }
            while self.pipes.len() < self.spec.pipelines {
                self.add_pipe(step).await?;
            }
        }
        Ok(())
    }

    /// Judges a step whose reports are all in: `Some(token)` when agreed, `None` when a
    /// pipeline was rebuilt and the step runs again there.
    async fn judge(&mut self, step: u32) -> Result<Option<u32>, String> {
        let inputs: Vec<Hash> = (0..self.pipes.len())
            .map(|p| tokens_hash(&self.input(p, step)))
            .collect();
        let reports: Vec<Vec<Reported>> = self
            .pipes
            .iter()
            .map(|pipe| {
                pipe.keys
                    .iter()
                    .zip(&pipe.reports)
                    .map(|(k, r)| Reported {
                        key: *k,
                        report: r.clone().expect("all reports are in"),
                    })
                    .collect()
            })
            .collect();
        match judge::judge(&self.session, step, &inputs, &reports) {
            StepVerdict::Agreed { token } => {
                if !self.spot_check_due(step, token).await? {
                    return Ok(None);
                }
                for pipe in &mut self.pipes {
                    for (s, key) in pipe.keys.iter().enumerate() {
                        *self.credit.entry(*key).or_default() += self.gflop[s] * pipe.rows as f64;
                        let out = pipe.reports[s].as_ref().expect("in").commit.output_hash;
                        pipe.history[s].push(out);
                    }
                }
                let last = reports[0].len() - 1;
                self.logits.push(reports[0][last].report.commit.output_hash);
                self.tokens.push(token);
                // A lone pipeline's tokens wait for its spot check, and a refereed session's
                // for the coordinator's own run.
                if self.spot.is_some() || self.spec.assurance == Assurance::Referee {
                    self.held.push(token);
                } else {
                    let _ = self.tokens_tx.send(token);
                }
                self.pipelines()
                    .metrics
                    .steps_agreed
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Some(token))
            }
            StepVerdict::Proven {
                pipeline,
                stage,
                why,
            } => {
                let liar = self.pipes[pipeline].keys[stage];
                tracing::warn!(session = %self.session, %liar, stage, "a stage lied: {why}");
                self.convict(liar).await?;
                if self.spot.is_some() {
                    self.start_over().await?;
                } else {
                    self.rebuild(pipeline, step).await?;
                }
                Ok(None)
            }
            StepVerdict::Diverged { stage } => {
                self.disputes += 1;
                self.pipelines()
                    .metrics
                    .stage_disputes
                    .fetch_add(1, Ordering::Relaxed);
                // The first divergent stage, re-executed once per group of pipelines that
                // started together: usually this finds the liar.
                let mut caught: Vec<(usize, usize)> = self
                    .referee(step, stage)
                    .await?
                    .into_iter()
                    .map(|p| (p, stage))
                    .collect();
                // A colluder further down a convicted pipeline computed on the liar's output;
                // each later stage there is re-executed from what it was actually sent.
                for p in caught.iter().map(|&(p, _)| p).collect::<Vec<_>>() {
                    for s in self.chain_check(step, p, stage + 1).await {
                        caught.push((p, s));
                    }
                }
                // Pipelines that started at different steps (one was rebuilt) agree on no
                // stage's input, so only their tokens compare: each chain is re-executed
                // from its first stage until its liar is found.
                if caught.is_empty() {
                    for p in 0..self.pipes.len() {
                        for s in self.chain_check(step, p, 0).await {
                            caught.push((p, s));
                        }
                    }
                }
                if caught.is_empty() {
                    return Err(format!(
                        "pipelines disagree at step {step} stage {stage} and the re-execution matched every stage"
                    ));
                }
                let mut rebuilt = Vec::new();
                for (p, s) in caught {
                    let liar = self.pipes[p].keys[s];
                    tracing::warn!(session = %self.session, %liar, stage = s, step, "re-execution caught a stage");
                    self.convict(liar).await?;
                    if !rebuilt.contains(&p) {
                        rebuilt.push(p);
                    }
                }
                for p in rebuilt {
                    self.rebuild(p, step).await?;
                }
                Ok(None)
            }
        }
    }

    async fn convict(&mut self, liar: PublicKey) -> Result<(), String> {
        self.excluded.insert(liar);
        self.pipelines().bar(&liar);
        self.liars.push(liar);
        self.credit.remove(&liar);
        self.pipelines()
            .metrics
            .stage_liars
            .fetch_add(1, Ordering::Relaxed);
        self.state
            .strike_stage_liar(&liar)
            .await
            .map_err(|e| e.to_string())
    }

    /// Re-executes stage `stage` of step `step` from its agreed input, once per group of
    /// pipelines that started at the same step; returns the pipelines whose member there
    /// computed something else.
    async fn referee(&mut self, step: u32, stage: usize) -> Result<Vec<usize>, String> {
        let mut liars = Vec::new();
        let mut bases: Vec<u32> = self.pipes.iter().map(|p| p.base).collect();
        bases.sort_unstable();
        bases.dedup();
        for base in bases {
            let group: Vec<usize> = (0..self.pipes.len())
                .filter(|&p| self.pipes[p].base == base)
                .collect();
            let (hash, token) = self.replay(step, stage, base, &group).await?;
            for p in group {
                let r = self.pipes[p].reports[stage].as_ref().expect("in");
                if r.commit.output_hash != hash || (token.is_some() && r.token != token) {
                    liars.push(p);
                }
            }
        }
        Ok(liars)
    }

    /// Re-executes pipeline `p`'s stages from `from` on, each from the outputs its own
    /// predecessor sent; returns those whose report differs. Stops at a stage whose inputs
    /// cannot be had (its predecessor does not send them).
    async fn chain_check(&mut self, step: u32, p: usize, from: usize) -> Vec<usize> {
        let mut liars = Vec::new();
        for s in from..self.pipes[p].keys.len() {
            let base = self.pipes[p].base;
            match self.replay(step, s, base, &[p]).await {
                Ok((hash, token)) => {
                    let r = self.pipes[p].reports[s]
                        .as_ref()
                        .expect("all reports are in");
                    if r.commit.output_hash != hash || (token.is_some() && r.token != token) {
                        liars.push(s);
                    }
                }
                Err(e) => {
                    tracing::info!(session = %self.session, stage = s, "cannot re-execute: {e}");
                    break;
                }
            }
        }
        liars
    }

    /// The output hash (and, for the last stage, the token) stage `stage` computes at `step`
    /// when it started at `base`, from inputs fetched from a predecessor in `group`.
    async fn replay(
        &mut self,
        step: u32,
        stage: usize,
        base: u32,
        group: &[usize],
    ) -> Result<(Hash, Option<u32>), String> {
        enum Inputs {
            Tokens(Vec<Vec<u32>>),
            Hidden(PublicKey, Vec<Activation>),
        }
        let inputs = if stage == 0 {
            Inputs::Tokens((base..=step).map(|k| self.input(group[0], k)).collect())
        } else {
            let mut found = None;
            for &p in group {
                let up = self.pipes[p].keys[stage - 1];
                if let Some(list) = self.fetch_history(p, stage - 1, step).await {
                    found = Some((up, list));
                    break;
                }
            }
            let (up, list) = found.ok_or_else(|| {
                format!("no predecessor of stage {stage} sent its outputs for re-execution")
            })?;
            Inputs::Hidden(up, list)
        };
        let model = self
            .state
            .registry()
            .find(&self.spec.model)
            .cloned()
            .ok_or("the model went away")?;
        let exact = model.model_ref(tabula_protocol::Precision::Exact);
        let file = exact.files.first().ok_or("no exact file")?;
        let path = self
            .state
            .registry()
            .path(&file.sha256)
            .ok_or("the exact file is missing")?
            .clone();
        let sha = file.sha256.to_hex();
        let plan = StagePlan {
            session: self.session,
            stage: stage as u16,
            layers: self.ranges[stage].clone(),
            capacity: self.capacity,
            upstream: match &inputs {
                Inputs::Tokens(_) => None,
                Inputs::Hidden(up, _) => Some(*up),
            },
            first_step: base,
            temperature_milli: self.spec.temperature_milli,
            top_p_q16: self.spec.top_p_q16,
            seed: self.spec.seed,
        };
        // The re-execution's own commitments are never sent: any key signs them.
        let identity = tabula_protocol::Identity::from_seed(random_bytes::<32>());
        tokio::task::spawn_blocking(move || -> Result<(Hash, Option<u32>), String> {
            let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
            let file = ExactFile::open(&bytes, &sha).map_err(|e| e.to_string())?;
            let backend = CpuBackend;
            let mut runner = StageRunner::load(&backend, &file, plan).map_err(|e| e.to_string())?;
            let mut last = None;
            match inputs {
                Inputs::Tokens(list) => {
                    for t in list {
                        last = Some(
                            pollster::block_on(runner.run_tokens(&backend, &identity, &t))
                                .map_err(|e| e.to_string())?,
                        );
                    }
                }
                Inputs::Hidden(_, list) => {
                    for a in list {
                        last = Some(
                            pollster::block_on(runner.run_activation(&backend, &identity, &a))
                                .map_err(|e| e.to_string())?,
                        );
                    }
                }
            }
            let out = last.ok_or("nothing to re-execute")?;
            Ok(match out {
                StageOut::Activation(a) => (a.commit.output_hash, None),
                StageOut::Token { token, commit } => (commit.output_hash, Some(token)),
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Asks pipeline `p`'s stage `s` for its outputs from its first step to `step`, each
    /// checked against its signature and the hash it reported at that step. `None` when it
    /// does not answer in time or answers wrong.
    async fn fetch_history(&mut self, p: usize, s: usize, step: u32) -> Option<Vec<Activation>> {
        let key = self.pipes[p].keys[s];
        let base = self.pipes[p].base;
        // The outputs it committed to up to `step`: agreed ones, and the report of the step
        // being judged when `step` is that one.
        let want = (step.checked_sub(base)? + 1) as usize;
        let mut expected: Vec<Hash> = self.pipes[p].history[s].clone();
        if expected.len() < want {
            expected.push(self.pipes[p].reports[s].as_ref()?.commit.output_hash);
        }
        expected.truncate(want);
        if expected.len() != want {
            return None;
        }
        let signer = tabula_protocol::SignerKey::parse(&key).ok()?;
        self.pipelines().expect_outputs(&self.session, Some(key));
        let got = self
            .collect_history(key, signer, s, base, &expected, step)
            .await;
        self.pipelines().expect_outputs(&self.session, None);
        got
    }

    async fn collect_history(
        &mut self,
        key: PublicKey,
        signer: tabula_protocol::SignerKey,
        s: usize,
        base: u32,
        expected: &[Hash],
        step: u32,
    ) -> Option<Vec<Activation>> {
        self.pipelines().send(
            &key,
            ToWorker::StageHistory {
                session: self.session,
                step,
            },
        );
        let mut got: Vec<Activation> = Vec::new();
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while got.len() < expected.len() {
            let (from, event) = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            // Other members' events wait until the dispute is settled.
            let a = match event {
                Event::Output(a) if from == key => a,
                Event::Output(_) => continue,
                other => {
                    self.deferred.push_back((from, other));
                    continue;
                }
            };
            let k = base + got.len() as u32;
            if a.check(&signer, &self.session, k, s as u16, self.dim)
                .is_err()
                || a.commit.output_hash != expected[got.len()]
            {
                tracing::warn!(session = %self.session, member = %key, "an output for re-execution did not check");
                return None;
            }
            got.push(a);
        }
        Some(got)
    }

    /// The coordinator computes the whole generation itself (its referee, on the exact file)
    /// and compares it with what the pipelines agreed. Where they differ, the first step that
    /// differs is re-executed stage by stage from the pipelines' agreed inputs; the first
    /// stage whose output differs from what its members agreed convicts them, in every
    /// pipeline that ran that step. The coordinator's tokens are the answer either way.
    /// Returns whether the generation stopped on a stop token.
    async fn referee_whole(&mut self, stopped: bool) -> Result<bool, String> {
        self.audits += 1;
        self.pipelines()
            .metrics
            .audits
            .fetch_add(1, Ordering::Relaxed);
        let output = self
            .state
            .execute_as_referee(self.spec.task.clone())
            .await
            .map_err(|e| format!("the coordinator's own run: {e}"))?;
        let UnitOutput::Generation {
            tokens,
            stopped: own_stop,
            logits_sha256,
        } = output
        else {
            return Err("the coordinator's own run gave no generation".into());
        };
        let differs = (0..self.tokens.len().max(tokens.len())).find(|&k| {
            self.tokens.get(k) != tokens.get(k) || self.logits.get(k) != logits_sha256.get(k)
        });
        let Some(k) = differs else {
            return Ok(stopped);
        };
        self.pipelines()
            .metrics
            .audit_catches
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(session = %self.session, step = k, "the pipelines agreed on a result the coordinator's own run does not give");
        if k < self.tokens.len() {
            let step = k as u32;
            // The pipelines that ran step `k`, by the step they started at.
            let ran: Vec<usize> = (0..self.pipes.len())
                .filter(|&p| self.pipes[p].base <= step)
                .collect();
            if let Some(&first) = ran.first() {
                let base = self.pipes[first].base;
                let group: Vec<usize> = ran
                    .iter()
                    .copied()
                    .filter(|&p| self.pipes[p].base == base)
                    .collect();
                let agreed_token = self.tokens[k];
                for stage in 0..self.spec.stages {
                    let agreed = self.pipes[first].history[stage][(step - base) as usize];
                    match self.replay(step, stage, base, &group).await {
                        Ok((hash, want))
                            if hash == agreed && want.is_none_or(|t| t == agreed_token) =>
                        {
                            continue;
                        }
                        Ok(_) => {
                            for &p in &group {
                                let liar = self.pipes[p].keys[stage];
                                tracing::warn!(session = %self.session, %liar, stage, step, "caught by the coordinator's own run");
                                self.convict(liar).await?;
                            }
                        }
                        Err(e) => {
                            tracing::info!(session = %self.session, stage, "cannot re-execute: {e}");
                        }
                    }
                    break;
                }
            }
        }
        self.tokens = tokens;
        self.logits = logits_sha256;
        // Held tokens (a refereed session's) were never sent: the right ones go instead. An
        // audited session's went out as they were agreed; its outcome corrects them (the API
        // tells a streaming requester).
        if self.spec.assurance == Assurance::Referee {
            self.held = self.tokens.clone();
        }
        Ok(own_stop)
    }

    async fn finish(&mut self, mut stopped: bool) -> Result<Outcome, String> {
        let whole = match self.spec.assurance {
            Assurance::Referee => true,
            // An audit: two pipelines that agree can still both be wrong (colluders at the
            // same position of both, telling the same lie), which only a re-execution finds.
            Assurance::Standard | Assurance::High => unit_random() < self.state.config.audit_rate,
        };
        if whole {
            stopped = self.referee_whole(stopped).await?;
        }
        for t in std::mem::take(&mut self.held) {
            let _ = self.tokens_tx.send(t);
        }
        let served: Vec<PublicKey> = self
            .pipes
            .iter()
            .flat_map(|p| p.keys.clone())
            .filter(|k| !self.liars.contains(k))
            .collect();
        self.pipelines().record_finished(&served);
        let output = UnitOutput::Generation {
            tokens: self.tokens.clone(),
            stopped,
            logits_sha256: self.logits.clone(),
        };
        let credits: Vec<(PublicKey, i64)> = self
            .credit
            .iter()
            .map(|(k, gflop)| (*k, (gflop * 1e6).round() as i64))
            .collect();
        self.state
            .settle_session(crate::scheduler::SessionSettlement {
                job_id: self.spec.job_id.clone(),
                unit_id: self.spec.unit_id.clone(),
                digest: self.spec.task.digest(),
                output: output.encode(),
                credits,
            })
            .await
            .map_err(|e| e.to_string())?;
        let row = [
            self.spec.stages as i64,
            self.pipes.len() as i64,
            self.direct as i64,
            self.relayed as i64,
            self.disputes as i64,
            self.liars.len() as i64,
            self.rebuilds as i64,
        ];
        if let Err(e) = self.state.record_session(&self.spec.job_id, row).await {
            tracing::warn!("recording a pipeline session: {e}");
        }
        Ok(Outcome {
            output,
            links_direct: self.direct,
            links_relayed: self.relayed,
            disputes: self.disputes,
            liars: self.liars.clone(),
            rebuilds: self.rebuilds,
        })
    }
}

#[cfg(test)]
mod tests {
    use tabula_protocol::{Identity, Signal};

    use super::*;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public()
    }

    /// A session of members `a → b` with `limit` bytes of relaying each; returns the
    /// registry, the session's event receiver and each member's socket receiver.
    #[allow(clippy::type_complexity)]
    fn session(
        limit: u64,
    ) -> (
        Pipelines,
        SessionId,
        mpsc::UnboundedReceiver<(PublicKey, Event)>,
        Vec<mpsc::UnboundedReceiver<ToWorker>>,
    ) {
        let p = Pipelines::default();
        let mut sockets = Vec::new();
        for seed in 1..=3 {
            let (tx, rx) = mpsc::unbounded_channel();
            p.join(key(seed), tx, format!("net{seed}").into(), 0);
            sockets.push(rx);
        }
        let id: SessionId = Bytes([9; 16]);
        let (events, rx) = mpsc::unbounded_channel();
        p.sessions().insert(
            id,
            Entry {
                events,
                links: [(key(1), key(2)), (key(2), key(1))].into_iter().collect(),
                relayed: HashMap::new(),
                relay_limit: limit,
                history_from: None,
            },
        );
        (p, id, rx, sockets)
    }

    #[test]
    fn only_neighbours_signal_or_relay_and_only_within_their_allowance() {
        let (p, id, _events, mut sockets) = session(100);
        let chunk = |n| Forward::Relay(vec![0; n]);
        assert!(p.forward(&key(1), &id, &key(2), chunk(60)).is_ok());
        assert!(matches!(
            sockets[1].try_recv(),
            Ok(ToWorker::Relay { peer, .. }) if peer == key(1)
        ));
        // Not a neighbour (a member of no link, and a link that does not exist).
        assert!(p.forward(&key(3), &id, &key(2), chunk(1)).is_err());
        assert!(p.forward(&key(1), &id, &key(3), chunk(1)).is_err());
        // Another session.
        assert!(
            p.forward(&key(1), &Bytes([8; 16]), &key(2), chunk(1))
                .is_err()
        );
        // Signalling counts against the same allowance as chunks.
        let sdp = Forward::Signal(Signal::Offer {
            sdp: "v".repeat(30),
        });
        assert!(p.forward(&key(1), &id, &key(2), sdp).is_ok());
        assert!(
            p.forward(&key(1), &id, &key(2), chunk(20)).is_err(),
            "past 100 bytes"
        );
        assert!(
            sockets[2].try_recv().is_err(),
            "nothing reached the outsider"
        );
    }

    #[test]
    fn outputs_are_taken_only_from_the_member_asked_for_them() {
        let (p, id, mut events, _sockets) = session(100);
        let output = || {
            Event::Output(Activation {
                commit: Identity::from_seed([1; 32]).stage_commit(
                    id,
                    0,
                    0,
                    Default::default(),
                    Default::default(),
                ),
                rows: 1,
                data: vec![0; 4],
            })
        };
        p.event(&key(1), &id, output());
        assert!(events.try_recv().is_err(), "nobody asked");
        p.expect_outputs(&id, Some(key(2)));
        p.event(&key(1), &id, output());
        assert!(events.try_recv().is_err(), "someone else was asked");
        p.event(&key(2), &id, output());
        assert!(events.try_recv().is_ok());
        // Other events from members pass; from outsiders they do not.
        p.event(&key(1), &id, Event::Failed("x".into()));
        assert!(events.try_recv().is_ok());
        p.event(&key(3), &id, Event::Failed("x".into()));
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn placement_takes_distinct_networks_budgets_and_pools() {
        let p = Pipelines::default();
        let mut keep = Vec::new();
        for (seed, net, budget) in [(1, "a", 0), (2, "a", 0), (3, "b", 50), (4, "c", 200)] {
            let (tx, rx) = mpsc::unbounded_channel();
            p.join(key(seed), tx, net.into(), budget);
            keep.push(rx);
        }
        let none = HashSet::new();
        let nets = HashSet::new();
        // Three stages need three networks: a, b, c; stage 1 needs 100 MiB, which b lacks.
        assert!(
            p.place(Bytes([1; 16]), &[10, 100, 10], &none, &nets, None)
                .is_some()
        );
        for _ in 0..20 {
            p.free(&Bytes([1; 16]), &[key(1), key(2), key(3), key(4)]);
            let chosen = p
                .place(Bytes([1; 16]), &[10, 100, 10], &none, &nets, None)
                .unwrap();
            assert_ne!(
                chosen[1],
                key(3),
                "a budget of 50 MiB holds no 100 MiB stage"
            );
            let prefixes: HashSet<_> = chosen.iter().map(|k| p.prefix(k).unwrap()).collect();
            assert_eq!(prefixes.len(), 3);
        }
        p.free(&Bytes([1; 16]), &[key(1), key(2), key(3), key(4)]);
        // A pool without network c cannot fill three stages.
        let pool: HashSet<_> = [key(1), key(2), key(3)].into_iter().collect();
        assert!(
            p.place(Bytes([2; 16]), &[1, 1, 1], &none, &nets, Some(&pool))
                .is_none()
        );
        // A barred key is never placed.
        p.bar(&key(4));
        assert!(
            p.place(Bytes([3; 16]), &[1, 1, 1], &none, &nets, None)
                .is_none()
        );
    }

    /// The griefer's attack: take stages and fail them (a false budget, a refusal, a closed
    /// socket), with keys that cost nothing. Proven workers are placed before newcomers, a
    /// key that failed since its last finished session after them, and a key that keeps
    /// failing is not placed at all for a while.
    #[test]
    fn placement_takes_the_proven_first_and_cools_down_keys_that_keep_failing() {
        let p = Pipelines::default();
        let mut keep = Vec::new();
        for seed in 1..=4 {
            let (tx, rx) = mpsc::unbounded_channel();
            p.join(key(seed), tx, format!("net{seed}").into(), 0);
            keep.push(rx);
        }
        let (none, nets) = (HashSet::new(), HashSet::new());
        let all = [key(1), key(2), key(3), key(4)];
        let place_two = |p: &Pipelines| {
            let chosen = p.place(Bytes([9; 16]), &[1, 1], &none, &nets, None);
            p.free(&Bytes([9; 16]), &all);
            chosen.map(|c| c.into_iter().collect::<HashSet<_>>())
        };
        // Keys 1 and 2 finished a session: they are taken whenever they are free.
        p.record_finished(&[key(1), key(2)]);
        for _ in 0..20 {
            assert_eq!(place_two(&p), Some([key(1), key(2)].into()));
        }
        // Key 1 fails one: newcomers (3, 4) now come before it, so it is placed only when
        // one of them is busy.
        p.record_failure(&key(1));
        for _ in 0..20 {
            let chosen = place_two(&p).unwrap();
            assert!(
                chosen.contains(&key(2)) && !chosen.contains(&key(1)),
                "{chosen:?}"
            );
        }
        // A second failure in a row: not placed at all, even when nobody else is free.
        p.record_failure(&key(1));
        assert_eq!(p.metrics.cooldowns.load(Ordering::Relaxed), 1);
        let only_one: HashSet<_> = [key(1)].into_iter().collect();
        assert!(
            p.place(Bytes([8; 16]), &[1], &none, &nets, Some(&only_one))
                .is_none(),
            "a key in its cooldown is not placed"
        );
        // Finishing a session (after the cooldown) clears the record.
        p.record_finished(&[key(1)]);
        assert_eq!(
            p.records().get(&key(1)).unwrap().standing(),
            Standing::Proven
        );
        assert!(
            p.place(Bytes([8; 16]), &[1], &none, &nets, Some(&only_one))
                .is_some()
        );
    }
}

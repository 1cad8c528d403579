//! The scheduler's memory: every unit still in play, its leases and results, the reputation of
//! every worker seen since start, the progress of running jobs, and a pool of recently verified
//! units for canaries. All decisions (which unit a worker gets, whether results agree, who is
//! credited or struck) are made here, synchronously, under one lock; each returns the row
//! writes that record it ([`Write`]), which the caller appends to the journal before releasing
//! the lock and commits before telling anyone. The database stays the truth across restarts:
//! [`Book::load`] rebuilds this memory from it.
//!
//! A unit leaves memory once it is verified, holds no active lease or result waiting for
//! judgement, waits for no audit and has left the canary pool; a lease leaves with its unit.
//! Workers stay (a record is a few dozen bytes; logins of new keys are rate-limited).
//!
//! Every choice an attacker could exploit is random ([`Entropy`]): which unit a worker gets
//! (placement), which units are audited, which leases are canaries and which canary. The book
//! does no I/O and reads no clock: the time comes in [`Ctx::now`], the randomness from its own
//! [`Entropy`], so the simulation (`tests/simulation.rs`) replays a seed exactly.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, atomic::Ordering},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sqlx::Row;
use tabula_protocol::{
    Assignment, Hash, Identity, LeaseId, Precision, PublicKey, Receipt, Submission, Takes, Task,
    UnitOutput,
};

use super::{Assurance, Metrics, Verdict};
use crate::{
    Config, CoordinatorError,
    db::{Db, Flavor, ordered_bytes},
    journal::{CreditRow, JobRow, LeaseRow, UnitRow, WorkerRow, Write, parameter_list, values_sql},
};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// The columns [`unit_from_row`] reads.
const UNIT_COLUMNS: &str = "id, job_id, seq, task, digest, credit_micro, replicas, quorum, status, output, output_hash, verified_by, verified_ms, audit, assurance";

/// Units with a referee-confirmed output kept for canaries.
const CANARY_POOL: usize = 256;
/// Grants draw at random among this many of the oldest units a worker may take, so a worker
/// cannot choose its unit (or its partner) by timing its request.
const PLACEMENT_WINDOW: usize = 64;
/// Audits waiting for the referee beyond which random audits are skipped (forced audits, of a
/// disagreement with a verified unit or of a caught liar's units, always wait their turn).
const AUDIT_QUEUE: usize = 4096;
/// How long an orphaned lease (its worker's connection ended) stays valid at most: a worker
/// that reconnects may still submit, a hoarder's units come back soon.
const ORPHAN_GRACE_MS: i64 = 30_000;
const _: () = assert!(PLACEMENT_WINDOW > 1 && CANARY_POOL > 0 && AUDIT_QUEUE > 0);

/// The book's randomness: the operating system's in production (a worker must not predict
/// its placement, an audit or a canary), a seeded generator in the simulation.
#[derive(Clone, Default)]
pub enum Entropy {
    #[default]
    Os,
    /// SplitMix64 state: reproducible, and predictable, so only for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Seeded(u64),
}

impl Entropy {
    pub fn next_u64(&mut self) -> u64 {
        match self {
            Entropy::Os => u64::from_le_bytes(crate::db::random_bytes::<8>()),
            Entropy::Seeded(state) => {
                *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "a draw from nothing");
        (self.next_u64() % n as u64) as usize
    }

    /// A new lease id: ordered by time first, like every id the coordinator makes.
    fn lease_id(&mut self, now: i64) -> LeaseId {
        match self {
            Entropy::Os => tabula_protocol::Bytes(ordered_bytes()),
            Entropy::Seeded(_) => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(now as u64).to_be_bytes());
                id[8..].copy_from_slice(&self.next_u64().to_be_bytes());
                tabula_protocol::Bytes(id)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnitStatus {
    Open,
    Referee,
    Verified,
}

impl UnitStatus {
    fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Open => "open",
            UnitStatus::Referee => "referee",
            UnitStatus::Verified => "verified",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "open" => UnitStatus::Open,
            "referee" => UnitStatus::Referee,
            "verified" => UnitStatus::Verified,
            other => return Err(CoordinatorError::Corrupt(format!("unit status `{other}`"))),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseState {
    Active,
    Submitted,
    Correct,
    Wrong,
    Released,
    Expired,
}

impl LeaseState {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Submitted => "submitted",
            LeaseState::Correct => crate::journal::CORRECT,
            LeaseState::Wrong => "wrong",
            LeaseState::Released => "released",
            LeaseState::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "active" => LeaseState::Active,
            "submitted" => LeaseState::Submitted,
            "correct" => LeaseState::Correct,
            "wrong" => LeaseState::Wrong,
            "released" => LeaseState::Released,
            "expired" => LeaseState::Expired,
            other => return Err(CoordinatorError::Corrupt(format!("lease state `{other}`"))),
        })
    }
}

#[derive(Clone)]
pub(super) struct Unit {
    id: String,
    job_id: String,
    seq: i64,
    task: Arc<Task>,
    digest: Hash,
    credit_micro: i64,
    replicas: i64,
    quorum: i64,
    status: UnitStatus,
    output: Option<Arc<Vec<u8>>>,
    output_hash: Option<String>,
    /// `quorum` (trusted workers agreed), `solo` (one trusted worker), `referee` (the
    /// coordinator computed it), `audited` (a quorum or solo output the referee confirmed) or
    /// `audit` (a quorum or solo output the referee found wrong and replaced).
    verified_by: Option<&'static str>,
    verified_ms: Option<i64>,
    /// Every lease ever issued on the unit, oldest first.
    leases: Vec<LeaseId>,
    in_canary_pool: bool,
    /// Verified and waiting in [`Book::audits`] for the referee to re-execute it. Stored, so
    /// a restart does not forget an audit.
    audit: bool,
    /// Never changes after the job is created.
    assurance: Assurance,
    /// The only workers (hex keys) that may compute it, when its API key is limited to a
    /// pool; such a unit is never a canary (its input would reach workers outside the pool).
    pool: Option<Arc<std::collections::HashSet<String>>>,
}

impl Unit {
    /// Limits the unit to `pool`'s workers.
    pub(super) fn with_pool(
        mut self,
        pool: Option<Arc<std::collections::HashSet<String>>>,
    ) -> Self {
        self.pool = pool;
        self
    }

    fn admits(&self, worker: &str) -> bool {
        self.pool.as_ref().is_none_or(|p| p.contains(worker))
    }

    /// A unit of a job just created.
    pub(super) fn new(
        id: String,
        job_id: String,
        seq: i64,
        task: Task,
        credit_micro: i64,
        assurance: Assurance,
        config: &Config,
    ) -> Self {
        let replicas = assurance.replicas(config);
        Unit {
            id,
            job_id,
            seq,
            digest: task.digest(),
            task: Arc::new(task),
            credit_micro,
            replicas: i64::from(replicas),
            // High assurance: every replica must agree; otherwise two agreeing suffice.
            quorum: i64::from(match assurance {
                Assurance::High => replicas,
                Assurance::Standard | Assurance::Referee => replicas.min(2),
            }),
            status: UnitStatus::Open,
            output: None,
            output_hash: None,
            verified_by: None,
            verified_ms: None,
            leases: Vec::new(),
            in_canary_pool: false,
            audit: false,
            assurance,
            pool: None,
        }
    }

    /// Whether the referee computed or confirmed its output: only such units become canaries.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    fn referee_confirmed(&self) -> bool {
        matches!(self.verified_by, Some("referee" | "audited" | "audit"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseKind {
    Replica,
    Canary,
}

#[derive(Clone)]
pub(super) struct Lease {
    id: LeaseId,
    unit: String,
    worker: String,
    prefix: String,
    kind: LeaseKind,
    state: LeaseState,
    issued_ms: i64,
    deadline_ms: i64,
    output_hash: Option<String>,
    output: Option<Arc<Vec<u8>>>,
    signature: Option<String>,
    submitted_ms: Option<i64>,
    /// Its worker's connection ended while it was active: expiring it is no strike.
    orphaned: bool,
}

impl Lease {
    fn row(&self) -> LeaseRow {
        LeaseRow {
            id: self.id.to_hex(),
            unit_id: self.unit.clone(),
            worker: self.worker.clone(),
            prefix: self.prefix.clone(),
            kind: match self.kind {
                LeaseKind::Replica => "replica",
                LeaseKind::Canary => "canary",
            },
            state: self.state.as_str(),
            issued_ms: self.issued_ms,
            deadline_ms: self.deadline_ms,
            output_hash: self.output_hash.clone(),
            output: self.output.as_ref().map(|o| B64.encode(o.as_slice())),
            signature: self.signature.clone(),
            submitted_ms: self.submitted_ms,
        }
    }

    /// Still counts as one of its unit's replicas (or as having seen the unit).
    fn holds(&self) -> bool {
        !matches!(self.state, LeaseState::Released | LeaseState::Expired)
    }
}

/// A worker's standing.
#[derive(Clone, Debug, Default)]
pub(super) struct WorkerRecord {
    pub verified: i64,
    pub clean_streak: i64,
    pub strikes: i64,
    /// Leases it abandoned: expired (connected or not) or given back. Past
    /// `abandon_allowance + verified / 4` it gets no more units.
    pub expired: i64,
    pub banned: bool,
}

#[derive(Clone)]
struct JobProgress {
    units_total: i64,
    units_verified: i64,
}

/// Why a worker gets no unit now, whatever is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    Banned,
    /// It holds as many active leases as its standing allows.
    KeyLeases,
    /// In probation, it has [`Book::unjudged_cap`] results waiting for a verdict.
    Unjudged,
    /// Its network holds `max_leases_per_prefix` active leases.
    NetworkLeases,
    /// It gave back or abandoned more leases than its allowance.
    Abandoned,
}

/// Why the referee re-executes a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RefereeWork {
    /// Its results disagree, or come from workers still in probation: a job waits for it.
    Dispute,
    /// It was verified without the referee; the audit checks after the fact.
    Audit,
}

/// A unit for the referee to re-execute.
pub(super) struct RefereeJob {
    pub unit: String,
    pub task: Task,
    pub work: RefereeWork,
}

/// What a decision did, beyond its writes: receipts to push once committed, whether a job
/// finished (waiting requests look again) or a unit went to the referee.
#[derive(Default)]
pub(super) struct Effects {
    pub writes: Vec<Write>,
    pub receipts: Vec<Receipt>,
    /// Only a finished job wakes the requests waiting for jobs: waking them for every
    /// verified unit made each of them read its job's status from the database hundreds of
    /// times a second under load.
    pub job_done: bool,
    pub referee: bool,
    /// Workers an audit caught (banned now): every unit they helped verify inside the audit
    /// window is to be audited too ([`Book::add_for_audit`]).
    pub caught: Vec<String>,
}

impl Effects {
    /// Adds what another decision of the same turn did.
    pub fn absorb(&mut self, other: Effects) {
        self.writes.extend(other.writes);
        self.receipts.extend(other.receipts);
        self.job_done |= other.job_done;
        self.referee |= other.referee;
        self.caught.extend(other.caught);
    }
}

/// What the book needs from the coordinator to decide.
pub(super) struct Ctx<'a> {
    pub config: &'a Config,
    /// The time of the decision, in milliseconds since the epoch.
    pub now: i64,
    pub identity: &'a Identity,
    pub metrics: &'a Metrics,
    /// The embedding width of a task's model (0 for generation), for the shape check.
    pub output_dim: &'a dyn Fn(&Task) -> usize,
}

/// A submission's fate, decided in memory.
pub(super) enum SubmitOutcome {
    /// The lease is not in memory: the caller looks in the database (a replay of an old
    /// result, or a made-up lease) and calls [`Book::reject`].
    NotInMemory,
    Decided(Verdict, Effects),
}

#[derive(Clone, Default)]
pub(super) struct Book {
    units: HashMap<String, Unit>,
    /// Open units with a replica slot free, by issue order: what `grant` looks through. Units
    /// whose every slot is out stay out of it, so a grant does not walk past every unit in
    /// flight. [`Book::refresh_leasable`] keeps it true wherever a unit's leases, replicas or
    /// status change.
    leasable: BTreeSet<(i64, String)>,
    /// Units waiting for the referee, by issue order.
    referee: BTreeSet<(i64, String)>,
    /// Verified units waiting for an audit (after `referee`), by issue order.
    audits: BTreeSet<(i64, String)>,
    leases: HashMap<LeaseId, Lease>,
    workers: HashMap<String, WorkerRecord>,
    jobs: HashMap<String, JobProgress>,
    /// Units whose output the referee computed or confirmed, for canaries, in no order: a
    /// canary is drawn at random, and a full pool replaces a random member.
    canaries: Vec<String>,
    /// Active leases by worker and by network prefix (absent at zero), for the lease caps.
    /// Kept exact wherever a lease becomes or stops being active.
    active_by_worker: HashMap<String, u32>,
    active_by_prefix: HashMap<String, u32>,
    /// Results waiting for a verdict (leases in the submitted state) by worker, absent at
    /// zero: a key in probation gets no unit past [`Book::unjudged_cap`] of them. Kept exact
    /// wherever a lease enters or leaves the submitted state.
    submitted_by_worker: HashMap<String, u32>,
    entropy: Entropy,
}

impl Book {
    // ----- loading -----

    /// Rebuilds the book from the database: open and refereed units, verified units that still
    /// have active leases, the newest verified units (canaries), all their leases, the
    /// workers holding those leases, and running jobs.
    pub(super) async fn load(db: &Db) -> Result<Book> {
        let mut book = Book::default();
        let mut rows = sqlx::query(&format!(
            "SELECT {UNIT_COLUMNS} FROM units WHERE status IN ('open', 'referee')"
        ))
        .fetch_all(&db.pool)
        .await?;
        rows.extend(
            sqlx::query(&format!(
                "SELECT {UNIT_COLUMNS} FROM units WHERE status = 'verified' AND id IN (SELECT unit_id FROM leases WHERE state = 'active')"
            ))
            .fetch_all(&db.pool)
            .await?,
        );
        let pool = sqlx::query(&format!(
            "SELECT {UNIT_COLUMNS} FROM units WHERE status = 'verified' AND verified_by IN ('referee', 'audited', 'audit') AND job_id NOT IN (SELECT job_id FROM job_pools) ORDER BY verified_ms DESC LIMIT {CANARY_POOL}"
        ))
        .fetch_all(&db.pool)
        .await?;
        // Audits that were waiting when the coordinator stopped.
        let audits = sqlx::query(&format!(
            "SELECT {UNIT_COLUMNS} FROM units WHERE status = 'verified' AND audit = 1 ORDER BY seq LIMIT {AUDIT_QUEUE}"
        ))
        .fetch_all(&db.pool)
        .await?;
        for row in &rows {
            let unit = unit_from_row(row)?;
            book.units.insert(unit.id.clone(), unit);
        }
        for row in &audits {
            let unit = unit_from_row(row)?;
            let key = (unit.seq, unit.id.clone());
            book.units.entry(unit.id.clone()).or_insert(unit).audit = true;
            book.audits.insert(key);
        }
        // The canary pool: the newest units whose output the referee computed or confirmed.
        for row in &pool {
            let unit = unit_from_row(row)?;
            let id = unit.id.clone();
            book.units.entry(id.clone()).or_insert(unit).in_canary_pool = true;
            book.canaries.push(id);
        }
        for u in book.units.values() {
            if u.status == UnitStatus::Referee {
                book.referee.insert((u.seq, u.id.clone()));
            }
        }
        // Pools of the units' jobs (one per job, shared by its units).
        let mut pools: HashMap<String, Arc<std::collections::HashSet<String>>> = HashMap::new();
        for row in sqlx::query(
            "SELECT job_id, worker FROM job_pools WHERE job_id IN (SELECT id FROM jobs WHERE status = 'running')",
        )
        .fetch_all(&db.pool)
        .await?
        {
            let job: String = row.try_get("job_id")?;
            let worker: String = row.try_get("worker")?;
            Arc::make_mut(pools.entry(job).or_default()).insert(worker);
        }
        for u in book.units.values_mut() {
            u.pool = pools.get(&u.job_id).cloned();
        }
        let unit_ids: Vec<String> = book.units.keys().cloned().collect();
        for lease in load_leases(db, &unit_ids).await? {
            if let Some(u) = book.units.get_mut(&lease.unit) {
                u.leases.push(lease.id);
            }
            book.leases.insert(lease.id, lease);
        }
        for row in sqlx::query("SELECT lease_id FROM orphaned_leases")
            .fetch_all(&db.pool)
            .await?
        {
            let id: String = row.try_get("lease_id")?;
            if let Ok(id) = LeaseId::from_hex(&id)
                && let Some(l) = book.leases.get_mut(&id)
                && l.state == LeaseState::Active
            {
                l.orphaned = true;
            }
        }
        let mut keys: Vec<String> = book.leases.values().map(|l| l.worker.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        for chunk in keys.chunks(500) {
            let sql = format!(
                "SELECT key, verified, clean_streak, strikes, expired, banned FROM workers WHERE key IN ({})",
                parameter_list(db.flavor.first_parameter(), chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(k.as_str());
            }
            for row in q.fetch_all(&db.pool).await? {
                book.workers
                    .insert(row.try_get("key")?, worker_from_row(&row)?);
            }
        }
        for row in
            sqlx::query("SELECT id, units_total, units_verified FROM jobs WHERE status = 'running'")
                .fetch_all(&db.pool)
                .await?
        {
            book.jobs.insert(
                row.try_get("id")?,
                JobProgress {
                    units_total: row.try_get("units_total")?,
                    units_verified: row.try_get("units_verified")?,
                },
            );
        }
        // With the leases loaded: which units have a slot free, who holds what.
        let ids: Vec<String> = book.units.keys().cloned().collect();
        for id in &ids {
            book.refresh_leasable(id);
        }
        let active: Vec<(String, String)> = book
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active)
            .map(|l| (l.worker.clone(), l.prefix.clone()))
            .collect();
        for (worker, prefix) in active {
            book.count_active(&worker, &prefix, true);
        }
        let submitted: Vec<String> = book
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Submitted)
            .map(|l| l.worker.clone())
            .collect();
        for worker in submitted {
            book.count_submitted(&worker, true);
        }
        tracing::info!(
            units = book.units.len(),
            leases = book.leases.len(),
            workers = book.workers.len(),
            jobs = book.jobs.len(),
            "scheduler state loaded"
        );
        Ok(book)
    }

    /// Adds a job's units, committed to the database just before.
    pub(super) fn add_job(&mut self, job_id: &str, units: Vec<Unit>) {
        self.jobs.insert(
            job_id.to_string(),
            JobProgress {
                units_total: units.len() as i64,
                units_verified: 0,
            },
        );
        for u in units {
            let id = u.id.clone();
            self.units.insert(id.clone(), u);
            self.refresh_leasable(&id);
        }
    }

    /// Puts `unit_id` in [`Book::leasable`] or takes it out, as it is now: open with a replica
    /// slot free, or not.
    fn refresh_leasable(&mut self, unit_id: &str) {
        let Some(u) = self.units.get(unit_id) else {
            return;
        };
        let key = (u.seq, u.id.clone());
        if u.status == UnitStatus::Open && self.slots_used(u) < u.replicas {
            self.leasable.insert(key);
        } else {
            self.leasable.remove(&key);
        }
    }

    /// Counts a lease of `worker` from `prefix` becoming active (`up`) or leaving that state.
    fn count_active(&mut self, worker: &str, prefix: &str, up: bool) {
        for (map, key) in [
            (&mut self.active_by_worker, worker),
            (&mut self.active_by_prefix, prefix),
        ] {
            if up {
                *map.entry(key.to_string()).or_insert(0) += 1;
            } else {
                let n = map.get_mut(key).expect("an active lease was counted");
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    /// Counts a result of `worker` entering the submitted state (`up`) or leaving it (judged).
    fn count_submitted(&mut self, worker: &str, up: bool) {
        let map = &mut self.submitted_by_worker;
        if up {
            *map.entry(worker.to_string()).or_insert(0) += 1;
        } else {
            let n = map.get_mut(worker).expect("a submitted result was counted");
            *n -= 1;
            if *n == 0 {
                map.remove(worker);
            }
        }
    }

    /// Uses seeded randomness (the simulation), from now on.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn seed(&mut self, seed: u64) {
        self.entropy = Entropy::Seeded(seed);
    }

    pub(super) fn worker(&self, key: &str) -> Option<&WorkerRecord> {
        self.workers.get(key)
    }

    /// Remembers a worker loaded from the database, unless it is known already (the copy here
    /// may be newer).
    pub(super) fn add_worker(&mut self, key: &str, record: WorkerRecord) -> &WorkerRecord {
        self.workers.entry(key.to_string()).or_insert(record)
    }

    // ----- leases -----

    /// Whether `worker` may not take `unit`: it holds or answered a lease on it, it gave one
    /// back or let one expire (a released unit is never offered to that key again, so
    /// releasing cannot be used to pick a unit), or its network holds one.
    fn seen(&self, unit: &Unit, worker: &str, prefix: &str) -> bool {
        unit.leases.iter().any(|id| {
            self.leases
                .get(id)
                .is_some_and(|l| l.worker == worker || (l.holds() && l.prefix == prefix))
        })
    }

    /// Replica slots in use: leases issued and not given back (released or expired), whether
    /// still running or answered (a wrong answer uses its slot too).
    fn slots_used(&self, unit: &Unit) -> i64 {
        self.count_replicas(unit, Lease::holds)
    }

    /// Replica leases still running.
    fn running(&self, unit: &Unit) -> i64 {
        self.count_replicas(unit, |l| l.state == LeaseState::Active)
    }

    fn count_replicas(&self, unit: &Unit, keep: impl Fn(&Lease) -> bool) -> i64 {
        unit.leases
            .iter()
            .filter(|id| {
                self.leases
                    .get(id)
                    .is_some_and(|l| l.kind == LeaseKind::Replica && keep(l))
            })
            .count() as i64
    }

    fn trusted(ctx: &Ctx, w: &WorkerRecord) -> bool {
        w.clean_streak >= i64::from(ctx.config.probation_units)
    }

    /// Results a key in probation may have waiting for a verdict (finding 7). Every unit one
    /// of its results is in ends with the referee, so this bounds what a fresh key costs the
    /// referee before its first verdict (a lie bans it); at the cap its units still waiting
    /// for replicas go to the referee at once ([`Book::refer_if_capped`]).
    fn unjudged_cap(ctx: &Ctx) -> u32 {
        ctx.config.probation_units.max(1)
    }

    /// Whether `worker` is in probation with [`Book::unjudged_cap`] results unjudged.
    fn at_unjudged_cap(&self, ctx: &Ctx, worker: &str, record: &WorkerRecord) -> bool {
        !Self::trusted(ctx, record)
            && self.submitted_by_worker.get(worker).copied().unwrap_or(0) >= Self::unjudged_cap(ctx)
    }

    /// Why `worker` may hold no more leases now, if it may not: a ban, its cap of active
    /// leases (one during probation), its results waiting for a verdict during probation, its
    /// network's cap, or too many leases abandoned.
    fn limited(&self, ctx: &Ctx, worker: &str, prefix: &str) -> Option<Limit> {
        let record = self.workers.get(worker)?;
        let cap = if Self::trusted(ctx, record) {
            ctx.config.max_leases_per_key
        } else {
            ctx.config.probation_leases
        };
        if record.banned {
            Some(Limit::Banned)
        } else if self.active_by_worker.get(worker).copied().unwrap_or(0) >= cap {
            Some(Limit::KeyLeases)
        } else if self.at_unjudged_cap(ctx, worker, record) {
            Some(Limit::Unjudged)
        } else if self.active_by_prefix.get(prefix).copied().unwrap_or(0)
            >= ctx.config.max_leases_per_prefix
        {
            Some(Limit::NetworkLeases)
        } else if record.expired > i64::from(ctx.config.abandon_allowance) + record.verified / 4 {
            Some(Limit::Abandoned)
        } else {
            None
        }
    }

    /// Leases a unit to `worker` (from network `prefix`): a canary now and then, else a unit
    /// drawn at random among the oldest open units it may take. `None` when nothing is open for
    /// it or it is at one of its limits ([`Book::limited`]).
    pub(super) fn grant(
        &mut self,
        ctx: &Ctx,
        worker: &str,
        prefix: &str,
        takes: &Takes,
    ) -> Option<(Assignment, Effects)> {
        if let Some(limit) = self.limited(ctx, worker, prefix) {
            if limit != Limit::Banned {
                ctx.metrics.grants_limited.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let streak = self.workers.get(worker)?.clean_streak;
        let allowed = |u: &Unit| takes.admits(&u.task) && u.admits(worker);
        // A known-answer canary: a unit the referee computed or confirmed, drawn at random
        // from the pool, which this worker never saw.
        let canary = if !self.canaries.is_empty() && self.entropy.unit() < ctx.config.canary_rate {
            let start = self.entropy.below(self.canaries.len());
            let n = self.canaries.len();
            (0..n).map(|i| &self.canaries[(start + i) % n]).find(|id| {
                let u = &self.units[*id];
                allowed(u) && !self.seen(u, worker, prefix)
            })
        } else {
            None
        }
        .cloned();
        let (unit_id, kind) = match canary {
            Some(id) => (id, LeaseKind::Canary),
            None => {
                // Random placement among the oldest units this worker may take: two
                // colluders asking together share a unit only by chance.
                let candidates: Vec<&String> = self
                    .leasable
                    .iter()
                    .filter_map(|(_, id)| {
                        let u = &self.units[id];
                        (allowed(u) && !self.seen(u, worker, prefix)).then_some(id)
                    })
                    .take(PLACEMENT_WINDOW)
                    .collect();
                if candidates.is_empty() {
                    return None;
                }
                let id = candidates[self.entropy.below(candidates.len())].clone();
                (id, LeaseKind::Replica)
            }
        };
        let mut effects = Effects::default();
        let now = ctx.now;
        let lease_id = self.entropy.lease_id(now);
        if kind == LeaseKind::Replica {
            // Adaptive replication: a long-clean worker runs a fresh unit alone, except for a
            // random fraction of spot checks; solo units are audited like quorum ones. It
            // cannot tell which.
            let fresh = self.units[&unit_id].leases.is_empty();
            if streak >= i64::from(ctx.config.solo_after)
                && fresh
                && self.units[&unit_id].assurance == Assurance::Standard
                && self.entropy.unit() >= ctx.config.spot_check_rate
            {
                let u = self.units.get_mut(&unit_id).expect("chosen above");
                u.replicas = 1;
                u.quorum = 1;
                // Not journaled now: the unit row is written with its verdict. A restart before
                // that finds the configured replication in the database, which only errs on
                // the side of more checking, and saves a row write for most units under load.
                ctx.metrics.units_solo.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            ctx.metrics.leases_canary.fetch_add(1, Ordering::Relaxed);
        }
        let lease = Lease {
            id: lease_id,
            unit: unit_id.clone(),
            worker: worker.to_string(),
            prefix: prefix.to_string(),
            kind,
            state: LeaseState::Active,
            issued_ms: now,
            deadline_ms: now + ctx.config.lease_ms as i64,
            output_hash: None,
            output: None,
            signature: None,
            submitted_ms: None,
            orphaned: false,
        };
        effects.writes.push(Write::Lease(lease.row()));
        let u = self.units.get_mut(&unit_id).expect("chosen above");
        u.leases.push(lease_id);
        let assignment = Assignment {
            lease: lease_id,
            unit: u.digest,
            deadline_ms: lease.deadline_ms as u64,
            task: (*u.task).clone(),
        };
        self.leases.insert(lease_id, lease);
        self.count_active(worker, prefix, true);
        self.refresh_leasable(&unit_id);
        ctx.metrics.leases_granted.fetch_add(1, Ordering::Relaxed);
        Some((assignment, effects))
    }

    /// Moves an active lease out of the active state (to `state`), keeping the counts.
    fn deactivate(&mut self, id: &LeaseId, state: LeaseState) {
        let lease = self.leases.get_mut(id).expect("a lease in memory");
        assert_eq!(lease.state, LeaseState::Active, "only an active lease ends");
        assert_ne!(state, LeaseState::Active);
        lease.state = state;
        let (worker, prefix) = (lease.worker.clone(), lease.prefix.clone());
        self.count_active(&worker, &prefix, false);
        if state == LeaseState::Submitted {
            self.count_submitted(&worker, true);
        }
    }

    /// Moves a submitted result to its verdict (`Correct` or `Wrong`), keeping the counts.
    fn judge(&mut self, id: &LeaseId, state: LeaseState, effects: &mut Effects) {
        assert!(matches!(state, LeaseState::Correct | LeaseState::Wrong));
        let lease = self.leases.get_mut(id).expect("a result in memory");
        assert_eq!(
            lease.state,
            LeaseState::Submitted,
            "only a result is judged"
        );
        lease.state = state;
        let worker = lease.worker.clone();
        self.count_submitted(&worker, false);
        effects.writes.push(Write::LeaseState {
            id: id.to_hex(),
            state: state.as_str(),
        });
    }

    /// Moves an active lease to `state` (released or expired), freeing its replica slot.
    fn end_lease(&mut self, id: &LeaseId, state: LeaseState, effects: &mut Effects) {
        if !self.leases.contains_key(id) {
            return;
        }
        self.deactivate(id, state);
        effects.writes.push(Write::LeaseState {
            id: id.to_hex(),
            state: state.as_str(),
        });
        let lease = self.leases.get_mut(id).expect("present");
        if std::mem::take(&mut lease.orphaned) {
            effects.writes.push(Write::Unorphan { lease: id.to_hex() });
        }
        let unit = lease.unit.clone();
        // Its slot is free again.
        self.refresh_leasable(&unit);
        self.evict_if_done(&unit);
    }

    /// Gives a lease back unfinished: its unit is re-issued at once, never to this key again,
    /// and the lease counts against the key's allowance of abandoned leases.
    pub(super) fn release(&mut self, ctx: &Ctx, worker: &str, lease: &LeaseId) -> Effects {
        let mut effects = Effects::default();
        if self
            .leases
            .get(lease)
            .is_some_and(|l| l.state == LeaseState::Active && l.worker == worker)
        {
            self.end_lease(lease, LeaseState::Released, &mut effects);
            if let Some(w) = self.workers.get_mut(worker) {
                w.expired += 1;
            }
            self.write_worker(worker, &mut effects);
            ctx.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        }
        effects
    }

    /// Marks the active leases of `worker` as orphaned: its connection ended without an
    /// answer. They stay active for a short grace (a reconnecting worker can still submit),
    /// and expiring them is no strike, but it counts as abandoned.
    pub(super) fn orphan(&mut self, ctx: &Ctx, worker: &str) -> Effects {
        let mut effects = Effects::default();
        let now = ctx.now;
        let grace = ORPHAN_GRACE_MS.min(ctx.config.lease_ms as i64);
        for l in self.leases.values_mut() {
            if l.worker == worker && l.state == LeaseState::Active && !l.orphaned {
                l.orphaned = true;
                if l.deadline_ms > now + grace {
                    l.deadline_ms = now + grace;
                    effects.writes.push(Write::Lease(l.row()));
                }
                effects.writes.push(Write::Orphan {
                    lease: l.id.to_hex(),
                    since_ms: now,
                });
            }
        }
        effects
    }

    /// Expires overdue leases: their units go to other workers; the holder's streak resets,
    /// and it takes a strike unless the lease was orphaned.
    pub(super) fn expire(&mut self, ctx: &Ctx) -> Effects {
        let mut effects = Effects::default();
        let mut overdue: Vec<(LeaseId, String, bool)> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active && l.deadline_ms < ctx.now)
            .map(|l| (l.id, l.worker.clone(), l.orphaned))
            .collect();
        // In id order, not the map's: the same decisions whatever the hasher.
        overdue.sort_unstable_by_key(|(id, ..)| *id);
        for (id, worker, orphaned) in overdue {
            self.end_lease(&id, LeaseState::Expired, &mut effects);
            ctx.metrics.leases_expired.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = self.workers.get_mut(&worker) {
                w.expired += 1;
                w.clean_streak = 0;
            }
            if orphaned {
                self.write_worker(&worker, &mut effects);
            } else {
                self.strike(ctx, &worker, &mut effects);
            }
        }
        // Units whose newest result has waited `replica_wait_ms` for another replica with none
        // running: no worker that may take them came (too few connected, or every one has
        // seen them), so the referee finishes them rather than let their jobs wait forever.
        let cutoff = ctx.now - ctx.config.replica_wait_ms as i64;
        let stalled: Vec<String> = self
            .leasable
            .iter()
            .filter_map(|(_, id)| {
                let u = &self.units[id];
                let newest = u
                    .leases
                    .iter()
                    .map(|l| &self.leases[l])
                    .filter(|l| l.state == LeaseState::Submitted)
                    .map(|l| l.submitted_ms.unwrap_or(l.issued_ms))
                    .max()?;
                (newest < cutoff && self.running(u) == 0).then(|| id.clone())
            })
            .collect();
        for id in stalled {
            tracing::info!(
                unit = id,
                "no replica came in time: the referee finishes it"
            );
            ctx.metrics.units_stalled.fetch_add(1, Ordering::Relaxed);
            self.send_to_referee(&id, &mut effects);
        }
        effects
    }

    // ----- results -----

    /// Judges a submission whose signature check (`signature`) was done outside the lock.
    pub(super) fn submit(
        &mut self,
        ctx: &Ctx,
        worker: &str,
        s: &Submission,
        signature: std::result::Result<(), String>,
    ) -> SubmitOutcome {
        let Some(lease) = self.leases.get(&s.lease) else {
            return SubmitOutcome::NotInMemory;
        };
        if lease.worker != worker {
            // A replay of someone else's result.
            let (v, e) = self.reject(ctx, worker, "this lease belongs to another worker", true);
            return SubmitOutcome::Decided(v, e);
        }
        if lease.state != LeaseState::Active {
            let reason = format!("the lease is {}", lease.state.as_str());
            let (v, e) = self.reject(ctx, worker, &reason, false);
            return SubmitOutcome::Decided(v, e);
        }
        let unit_id = lease.unit.clone();
        let unit = &self.units[&unit_id];
        let problem = if s.unit != unit.digest {
            Some("the result names another unit".to_string())
        } else if let Err(e) = signature {
            Some(format!("the signature does not verify: {e}"))
        } else {
            UnitOutput::decode(&s.output)
                .and_then(|o| o.check_shape(&unit.task, (ctx.output_dim)(&unit.task)))
                .err()
                .map(|e| format!("malformed output: {e}"))
        };
        let mut effects = Effects::default();
        self.deactivate(
            &s.lease,
            if problem.is_some() {
                LeaseState::Wrong
            } else {
                LeaseState::Submitted
            },
        );
        let lease = self.leases.get_mut(&s.lease).expect("looked up above");
        if std::mem::take(&mut lease.orphaned) {
            effects.writes.push(Write::Unorphan {
                lease: s.lease.to_hex(),
            });
        }
        let verdict = if let Some(reason) = problem {
            // The replica slot stays used (a bad result is a result); `evaluate` adds a
            // replica once every slot has answered.
            effects.writes.push(Write::LeaseState {
                id: s.lease.to_hex(),
                state: LeaseState::Wrong.as_str(),
            });
            self.strike(ctx, worker, &mut effects);
            ctx.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.results_rejected.fetch_add(1, Ordering::Relaxed);
            Verdict::Rejected(reason)
        } else {
            lease.output_hash = Some(s.output_hash.to_hex());
            lease.output = Some(Arc::new(s.output.clone()));
            lease.signature = Some(s.signature.to_hex());
            lease.submitted_ms = Some(ctx.now);
            effects.writes.push(Write::Lease(lease.row()));
            Verdict::Accepted
        };
        self.evaluate(ctx, &unit_id, &mut effects);
        self.refer_if_capped(ctx, worker, &mut effects);
        self.evict_if_done(&unit_id);
        SubmitOutcome::Decided(verdict, effects)
    }

    /// A key in probation at [`Book::unjudged_cap`] gets no unit until a verdict; its units
    /// still open (waiting for replicas) go to the referee now, which they would reach anyway
    /// (a result in probation never counts towards a quorum), so it never waits on other keys
    /// in probation that wait in turn. The unit's other leases run on, and their results are
    /// judged against the referee's output.
    fn refer_if_capped(&mut self, ctx: &Ctx, worker: &str, effects: &mut Effects) {
        if !self
            .workers
            .get(worker)
            .is_some_and(|w| self.at_unjudged_cap(ctx, worker, w))
        {
            return;
        }
        // Reached once per verdict at most (the key gets no unit until then), so a walk of the
        // leases in memory is paid once per probation result, not per request.
        let mut units: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.worker == worker && l.state == LeaseState::Submitted)
            .map(|l| l.unit.clone())
            .filter(|u| {
                self.units
                    .get(u)
                    .is_some_and(|u| u.status == UnitStatus::Open)
            })
            .collect();
        units.sort_unstable();
        units.dedup();
        for unit in units {
            self.send_to_referee(&unit, effects);
        }
    }

    /// Rejects a submission, with a strike when `strike`.
    pub(super) fn reject(
        &mut self,
        ctx: &Ctx,
        worker: &str,
        reason: &str,
        strike: bool,
    ) -> (Verdict, Effects) {
        let mut effects = Effects::default();
        if strike {
            self.strike(ctx, worker, &mut effects);
        }
        ctx.metrics.results_rejected.fetch_add(1, Ordering::Relaxed);
        (Verdict::Rejected(reason.to_string()), effects)
    }

    fn write_worker(&self, key: &str, effects: &mut Effects) {
        match self.workers.get(key) {
            Some(w) => effects.writes.push(Write::Worker(WorkerRow {
                key: key.to_string(),
                verified: w.verified,
                clean_streak: w.clean_streak,
                strikes: w.strikes,
                expired: w.expired,
                banned: w.banned,
            })),
            // Every lease's worker is loaded (at login or with the lease), so this is a bug,
            // not a state to write zeros over.
            None => tracing::error!(worker = key, "a worker missing from the scheduler's memory"),
        }
    }

    fn strike(&mut self, ctx: &Ctx, key: &str, effects: &mut Effects) {
        if let Some(w) = self.workers.get_mut(key) {
            w.strikes += 1;
            w.clean_streak = 0;
            w.banned |= w.strikes >= i64::from(ctx.config.ban_after);
        }
        self.write_worker(key, effects);
    }

    fn agree(precision: Precision, a_hash: &str, a: &[u8], b_hash: &str, b: &[u8]) -> bool {
        if a_hash == b_hash {
            return true;
        }
        match precision {
            Precision::Exact => false,
            Precision::Fast => match (UnitOutput::decode(a), UnitOutput::decode(b)) {
                (Ok(x), Ok(y)) => x.agrees(&y),
                _ => false,
            },
        }
    }

    /// The submitted (not yet judged) results of a unit, by worker then lease.
    fn results(&self, unit: &Unit) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = unit
            .leases
            .iter()
            .filter(|id| {
                self.leases
                    .get(id)
                    .is_some_and(|l| l.state == LeaseState::Submitted)
            })
            .copied()
            .collect();
        ids.sort_by(|a, b| (&self.leases[a].worker, a).cmp(&(&self.leases[b].worker, b)));
        ids
    }

    /// Advances a unit after a result: verified by a quorum of trusted workers, sent to the
    /// referee, or given another replica. A result for a verified unit (a canary, a late
    /// replica) is judged against its output when it agrees, and by an audit when it does not.
    fn evaluate(&mut self, ctx: &Ctx, unit_id: &str, effects: &mut Effects) {
        let unit = &self.units[unit_id];
        let precision = unit.task.precision();
        match unit.status {
            UnitStatus::Verified => {
                let canonical = unit.output.clone().unwrap_or_default();
                let hash = unit.output_hash.clone().unwrap_or_default();
                let disagreement = self.results(unit).iter().any(|id| {
                    let l = &self.leases[id];
                    !Self::agree(
                        precision,
                        &hash,
                        &canonical,
                        l.output_hash.as_deref().unwrap_or_default(),
                        l.output.as_deref().map(Vec::as_slice).unwrap_or_default(),
                    )
                });
                if disagreement {
                    // The stored output may be the wrong one (a quorum of liars): only the
                    // referee decides, and the results wait for it.
                    self.queue_audit(unit_id, true, effects);
                } else if !unit.audit {
                    self.settle_results(ctx, unit_id, &canonical, &hash, effects);
                }
                return;
            }
            UnitStatus::Referee => return,
            UnitStatus::Open => {}
        }
        let results = self.results(unit);
        let output = |id: &LeaseId| {
            let l = &self.leases[id];
            (
                l.output_hash.as_deref().unwrap_or_default(),
                l.output.as_deref().map(Vec::as_slice).unwrap_or_default(),
            )
        };
        let mut groups: Vec<Vec<LeaseId>> = Vec::new();
        for id in &results {
            let (hash, out) = output(id);
            match groups.iter_mut().find(|g| {
                let (first_hash, first) = output(&g[0]);
                Self::agree(precision, first_hash, first, hash, out)
            }) {
                Some(g) => g.push(*id),
                None => groups.push(vec![*id]),
            }
        }
        if groups.len() > 1 {
            // Two well-formed answers differ: someone lied. A majority proves nothing (two
            // colluders outvote one honest worker), so the referee settles it, and nobody is
            // struck before it has.
            self.send_to_referee(unit_id, effects);
            return;
        }
        if let Some(group) = groups.first()
            && group.len() as i64 >= unit.quorum
        {
            // Accepted without the referee only when every member is past probation: a
            // fresh key agreeing with a trusted one may be that key's partner.
            let all_trusted = group.iter().all(|id| {
                self.workers
                    .get(&self.leases[id].worker)
                    .is_some_and(|w| Self::trusted(ctx, w))
            });
            if all_trusted && unit.assurance != Assurance::Referee {
                let (hash, out) = output(&group[0]);
                let (hash, out) = (hash.to_string(), out.to_vec());
                let by = if unit.quorum == 1 { "solo" } else { "quorum" };
                self.verify_unit(ctx, unit_id, out, hash, by, effects);
                if self.entropy.unit() < ctx.config.audit_rate {
                    self.queue_audit(unit_id, false, effects);
                }
            } else {
                self.send_to_referee(unit_id, effects);
            }
            return;
        }
        let active = self.running(unit);
        let wrong = unit
            .leases
            .iter()
            .filter(|id| self.leases[*id].state == LeaseState::Wrong)
            .count() as i64;
        if active == 0 && results.len() as i64 + wrong >= unit.replicas {
            if unit.replicas < i64::from(ctx.config.max_replicas) {
                let u = self.units.get_mut(unit_id).expect("evaluated");
                u.replicas += 1;
                u.quorum = u.quorum.max(i64::from(ctx.config.replicas.min(2)));
                effects.writes.push(Write::Unit(unit_row(u)));
                self.refresh_leasable(unit_id);
            } else {
                self.send_to_referee(unit_id, effects);
            }
        }
    }

    fn send_to_referee(&mut self, unit_id: &str, effects: &mut Effects) {
        let u = self.units.get_mut(unit_id).expect("a unit in memory");
        if u.status != UnitStatus::Open {
            return;
        }
        u.status = UnitStatus::Referee;
        self.leasable.remove(&(u.seq, u.id.clone()));
        self.referee.insert((u.seq, u.id.clone()));
        effects.writes.push(Write::Unit(unit_row(u)));
        effects.referee = true;
    }

    /// Puts a verified unit in the audit queue: at random (`forced` false, skipped when the
    /// queue is full) or because a result disagrees with it or a liar helped verify it.
    fn queue_audit(&mut self, unit_id: &str, forced: bool, effects: &mut Effects) {
        let Some(u) = self.units.get_mut(unit_id) else {
            return;
        };
        if u.status != UnitStatus::Verified || u.audit {
            return;
        }
        if !forced && self.audits.len() >= AUDIT_QUEUE {
            return;
        }
        u.audit = true;
        self.audits.insert((u.seq, u.id.clone()));
        effects.writes.push(Write::Unit(unit_row(u)));
        effects.referee = true;
    }

    /// Marks a unit verified with `output`, credits agreeing results, strikes the others and
    /// advances its job.
    fn verify_unit(
        &mut self,
        ctx: &Ctx,
        unit_id: &str,
        output: Vec<u8>,
        hash: String,
        by: &'static str,
        effects: &mut Effects,
    ) {
        let now = ctx.now;
        let u = self.units.get_mut(unit_id).expect("a unit in memory");
        if u.status == UnitStatus::Verified {
            return;
        }
        self.leasable.remove(&(u.seq, u.id.clone()));
        self.referee.remove(&(u.seq, u.id.clone()));
        u.status = UnitStatus::Verified;
        let output = Arc::new(output);
        u.output = Some(output.clone());
        u.output_hash = Some(hash.clone());
        u.verified_by = Some(by);
        u.verified_ms = Some(now);
        effects.writes.push(Write::Unit(unit_row(u)));
        ctx.metrics.units_verified.fetch_add(1, Ordering::Relaxed);
        let job_id = u.job_id.clone();
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.units_verified += 1;
            let done = job.units_verified >= job.units_total;
            effects.writes.push(Write::Job(JobRow {
                id: job_id.clone(),
                units_verified: job.units_verified,
                status: if done { "done" } else { "running" },
                finished_ms: done.then_some(now),
            }));
            if done {
                self.jobs.remove(&job_id);
                effects.job_done = true;
            }
        }
        self.settle_results(ctx, unit_id, &output, &hash, effects);
        if by == "referee" {
            self.add_canary(unit_id);
        }
    }

    /// Puts a unit whose output the referee computed or confirmed into the canary pool; a
    /// full pool gives up a random member.
    fn add_canary(&mut self, unit_id: &str) {
        let u = self.units.get_mut(unit_id).expect("a unit in memory");
        if u.in_canary_pool || u.pool.is_some() {
            return;
        }
        u.in_canary_pool = true;
        if self.canaries.len() < CANARY_POOL {
            self.canaries.push(unit_id.to_string());
            return;
        }
        let i = self.entropy.below(self.canaries.len());
        let old = std::mem::replace(&mut self.canaries[i], unit_id.to_string());
        if let Some(u) = self.units.get_mut(&old) {
            u.in_canary_pool = false;
        }
        self.evict_if_done(&old);
    }

    /// Credits every submitted result of a unit that agrees with the canonical output and
    /// strikes every one that does not. A key with no verified unit yet is banned at its first
    /// proven lie: a fresh key has nothing to lose, and each of its lies costs the referee.
    fn settle_results(
        &mut self,
        ctx: &Ctx,
        unit_id: &str,
        canonical: &[u8],
        canonical_hash: &str,
        effects: &mut Effects,
    ) {
        let unit = &self.units[unit_id];
        let precision = unit.task.precision();
        let (digest, credit_micro) = (unit.digest, earned_credit(unit, canonical));
        for id in self.results(unit) {
            let lease = &self.leases[&id];
            let agrees = Self::agree(
                precision,
                canonical_hash,
                canonical,
                lease.output_hash.as_deref().unwrap_or_default(),
                lease
                    .output
                    .as_deref()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
            let worker = lease.worker.clone();
            if agrees {
                let Ok(worker_key) = PublicKey::from_hex(&worker) else {
                    tracing::error!(worker, "a lease held by an unreadable worker key");
                    continue;
                };
                let mut receipt = Receipt {
                    coordinator: ctx.identity.public(),
                    worker: worker_key,
                    unit: digest,
                    lease: id,
                    output_hash: lease
                        .output_hash
                        .as_deref()
                        .and_then(|h| Hash::from_hex(h).ok())
                        .unwrap_or_default(),
                    credit_micro: credit_micro.max(0) as u64,
                    issued_ms: ctx.now as u64,
                    signature: Default::default(),
                };
                ctx.identity.sign_receipt(&mut receipt);
                self.judge(&id, LeaseState::Correct, effects);
                effects.writes.push(Write::Credit(CreditRow {
                    worker: worker.clone(),
                    unit_id: unit_id.to_string(),
                    lease_id: id.to_hex(),
                    credit_micro,
                    receipt: serde_json::to_string(&receipt).expect("a receipt serialises"),
                    issued_ms: receipt.issued_ms as i64,
                }));
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.verified += 1;
                    w.clean_streak += 1;
                }
                self.write_worker(&worker, effects);
                effects.receipts.push(receipt);
            } else {
                self.judge(&id, LeaseState::Wrong, effects);
                if self.workers.get(&worker).is_some_and(|w| w.verified == 0) {
                    self.ban(&worker, effects);
                } else {
                    self.strike(ctx, &worker, effects);
                }
                ctx.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker, unit = unit_id, "wrong result");
            }
        }
    }

    /// A pipeline session's end: its unit verified with `output`, its job done, each member
    /// credited for its agreed work with a signed receipt. The session's liars were struck
    /// when caught ([`Book::strike_stage_liar`]).
    pub(super) fn settle_session(
        &mut self,
        ctx: &Ctx,
        s: &super::SessionSettlement,
        lease_ids: &[LeaseId],
    ) -> Effects {
        let mut effects = Effects::default();
        let output_hash = tabula_protocol::sha256(&s.output);
        effects.writes.push(Write::Unit(UnitRow {
            id: s.unit_id.clone(),
            replicas: 0,
            quorum: 0,
            status: UnitStatus::Verified.as_str(),
            output: Some(B64.encode(&s.output)),
            output_hash: Some(output_hash.to_hex()),
            verified_by: Some("pipeline"),
            verified_ms: Some(ctx.now),
            audit: false,
        }));
        effects.writes.push(Write::Job(JobRow {
            id: s.job_id.clone(),
            units_verified: 1,
            status: "done",
            finished_ms: Some(ctx.now),
        }));
        for ((worker, credit_micro), lease) in s.credits.iter().zip(lease_ids) {
            let key = worker.to_hex();
            if !self.workers.contains_key(&key) {
                tracing::error!(
                    worker = key,
                    "a stage member missing from the scheduler's memory"
                );
                continue;
            }
            let mut receipt = Receipt {
                coordinator: ctx.identity.public(),
                worker: *worker,
                unit: s.digest,
                lease: *lease,
                output_hash,
                credit_micro: (*credit_micro).max(0) as u64,
                issued_ms: ctx.now as u64,
                signature: Default::default(),
            };
            ctx.identity.sign_receipt(&mut receipt);
            effects.writes.push(Write::Credit(CreditRow {
                worker: key.clone(),
                unit_id: s.unit_id.clone(),
                lease_id: lease.to_hex(),
                credit_micro: *credit_micro,
                receipt: serde_json::to_string(&receipt).expect("a receipt serialises"),
                issued_ms: receipt.issued_ms as i64,
            }));
            if let Some(w) = self.workers.get_mut(&key) {
                w.verified += 1;
                w.clean_streak += 1;
            }
            self.write_worker(&key, &mut effects);
            effects.receipts.push(receipt);
        }
        effects.job_done = true;
        effects
    }

    /// A stage member caught lying: a key with nothing verified yet is banned, any other
    /// struck (banned at `ban_after`).
    pub(super) fn strike_stage_liar(&mut self, ctx: &Ctx, key: &str) -> Effects {
        let mut effects = Effects::default();
        if self.workers.get(key).is_some_and(|w| w.verified == 0) {
            self.ban(key, &mut effects);
        } else {
            self.strike(ctx, key, &mut effects);
        }
        ctx.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
        effects
    }

    fn ban(&mut self, key: &str, effects: &mut Effects) {
        if let Some(w) = self.workers.get_mut(key) {
            w.strikes += 1;
            w.clean_streak = 0;
            w.banned = true;
        }
        self.write_worker(key, effects);
    }

    /// Forgets a verified unit and its leases once nothing can change it any more.
    fn evict_if_done(&mut self, unit_id: &str) {
        let Some(u) = self.units.get(unit_id) else {
            return;
        };
        if u.status != UnitStatus::Verified
            || u.in_canary_pool
            || u.audit
            || u.leases.iter().any(|id| {
                matches!(
                    self.leases[id].state,
                    LeaseState::Active | LeaseState::Submitted
                )
            })
        {
            return;
        }
        let u = self.units.remove(unit_id).expect("present");
        for id in u.leases {
            self.leases.remove(&id);
        }
    }

    // ----- referee -----

    /// What the referee does next: the oldest unit waiting for it (a job waits on those),
    /// else the oldest audit.
    pub(super) fn next_for_referee(&self) -> Option<RefereeJob> {
        let ((_, id), work) = match self.referee.first() {
            Some(first) => (first, RefereeWork::Dispute),
            None => (self.audits.first()?, RefereeWork::Audit),
        };
        Some(RefereeJob {
            unit: id.clone(),
            task: (*self.units[id].task).clone(),
            work,
        })
    }

    /// The referee's output (`hash` its SHA-256) for `job`. `None` when the unit no longer
    /// waits for it.
    pub(super) fn judged(
        &mut self,
        ctx: &Ctx,
        job: &RefereeJob,
        output: Vec<u8>,
        hash: String,
    ) -> Option<Effects> {
        match job.work {
            RefereeWork::Dispute => self.refereed(ctx, &job.unit, output, hash),
            RefereeWork::Audit => self.audited(ctx, &job.unit, output, hash),
        }
    }

    /// The referee's output for a disputed unit: it becomes the canonical one.
    fn refereed(
        &mut self,
        ctx: &Ctx,
        unit_id: &str,
        output: Vec<u8>,
        hash: String,
    ) -> Option<Effects> {
        if self.units.get(unit_id)?.status != UnitStatus::Referee {
            return None;
        }
        let mut effects = Effects::default();
        self.verify_unit(ctx, unit_id, output, hash, "referee", &mut effects);
        self.evict_if_done(unit_id);
        Some(effects)
    }

    /// The referee's output for a unit it audited. When it agrees with the stored output the
    /// unit is confirmed (and may become a canary); when not, every worker credited for the
    /// stored output signed a wrong result that was accepted: each is banned and its other
    /// units are to be audited ([`Effects::caught`]), the unit takes the referee's output,
    /// and results waiting for the audit are judged against it.
    fn audited(
        &mut self,
        ctx: &Ctx,
        unit_id: &str,
        output: Vec<u8>,
        hash: String,
    ) -> Option<Effects> {
        let u = self.units.get_mut(unit_id)?;
        if !u.audit {
            return None;
        }
        u.audit = false;
        self.audits.remove(&(u.seq, u.id.clone()));
        let mut effects = Effects::default();
        let precision = u.task.precision();
        let stored = u.output.clone().unwrap_or_default();
        let stored_hash = u.output_hash.clone().unwrap_or_default();
        ctx.metrics.units_audited.fetch_add(1, Ordering::Relaxed);
        if Self::agree(precision, &stored_hash, &stored, &hash, &output) {
            if u.verified_by != Some("referee") {
                u.verified_by = Some("audited");
            }
            effects.writes.push(Write::Unit(unit_row(u)));
            self.add_canary(unit_id);
        } else {
            ctx.metrics.audits_failed.fetch_add(1, Ordering::Relaxed);
            let liars: Vec<String> = u
                .leases
                .iter()
                .filter(|id| self.leases[*id].state == LeaseState::Correct)
                .map(|id| self.leases[id].worker.clone())
                .collect();
            tracing::warn!(
                unit = unit_id,
                ?liars,
                "an audit found a wrong verified output"
            );
            let u = self.units.get_mut(unit_id).expect("present");
            u.output = Some(Arc::new(output.clone()));
            u.output_hash = Some(hash.clone());
            u.verified_by = Some("audit");
            effects.writes.push(Write::Unit(unit_row(u)));
            for liar in liars {
                if !self.workers.get(&liar).is_some_and(|w| w.banned) {
                    ctx.metrics.workers_caught.fetch_add(1, Ordering::Relaxed);
                    effects.caught.push(liar.clone());
                }
                self.ban(&liar, &mut effects);
            }
            self.add_canary(unit_id);
        }
        let canonical = self.units[unit_id].output.clone().unwrap_or_default();
        let canonical_hash = self.units[unit_id].output_hash.clone().unwrap_or_default();
        self.settle_results(ctx, unit_id, &canonical, &canonical_hash, &mut effects);
        self.evict_if_done(unit_id);
        Some(effects)
    }

    /// Audits the verified units `ids` that a caught liar helped verify: those already in
    /// memory as they are, the others from `loaded` (read from the database with their
    /// finished leases).
    pub(super) fn add_for_audit(
        &mut self,
        ids: &[String],
        loaded: Vec<Unit>,
        leases: Vec<Lease>,
    ) -> Effects {
        let mut effects = Effects::default();
        // Active leases of a verified unit only matter to their holders; an audit judges the
        // finished ones. Grouped by unit first: this runs under the book lock.
        let mut by_unit: HashMap<String, Vec<Lease>> = HashMap::new();
        for l in leases {
            if l.state != LeaseState::Active {
                by_unit.entry(l.unit.clone()).or_default().push(l);
            }
        }
        for mut u in loaded {
            if self.units.contains_key(&u.id) {
                continue;
            }
            let leases = by_unit.remove(&u.id).unwrap_or_default();
            u.leases = leases.iter().map(|l| l.id).collect();
            for l in leases {
                self.leases.entry(l.id).or_insert(l);
            }
            self.units.insert(u.id.clone(), u);
        }
        for id in ids {
            if self
                .units
                .get(id)
                .is_some_and(|u| u.verified_by != Some("referee"))
            {
                self.queue_audit(id, true, &mut effects);
            }
            // Loaded but not to be audited (refereed already): nothing keeps it.
            self.evict_if_done(id);
        }
        effects
    }

    // ----- inspection (tests, metrics) -----

    /// Panics unless every index agrees with the units and leases it summarises: `leasable`
    /// holds exactly the open units with a slot free, `referee` the refereed units, `audits`
    /// the units waiting for an audit, the active counts the active leases, the canary pool
    /// its members; every unit's leases exist and name it. O(memory): for tests and the
    /// simulation, after every decision.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(super) fn check_invariants(&self) {
        let leasable: BTreeSet<(i64, String)> = self
            .units
            .values()
            .filter(|u| u.status == UnitStatus::Open && self.slots_used(u) < u.replicas)
            .map(|u| (u.seq, u.id.clone()))
            .collect();
        assert_eq!(self.leasable, leasable, "leasable");
        let referee: BTreeSet<(i64, String)> = self
            .units
            .values()
            .filter(|u| u.status == UnitStatus::Referee)
            .map(|u| (u.seq, u.id.clone()))
            .collect();
        assert_eq!(self.referee, referee, "referee queue");
        let audits: BTreeSet<(i64, String)> = self
            .units
            .values()
            .filter(|u| u.audit)
            .map(|u| (u.seq, u.id.clone()))
            .collect();
        assert_eq!(self.audits, audits, "audit queue");
        assert!(
            self.units
                .values()
                .all(|u| !u.audit || u.status == UnitStatus::Verified),
            "only verified units are audited"
        );
        let mut by_worker: HashMap<String, u32> = HashMap::new();
        let mut by_prefix: HashMap<String, u32> = HashMap::new();
        for l in self.leases.values() {
            let u = self
                .units
                .get(&l.unit)
                .expect("a lease's unit is in memory");
            assert!(u.leases.contains(&l.id), "a unit lists its leases");
            if l.state == LeaseState::Active {
                *by_worker.entry(l.worker.clone()).or_default() += 1;
                *by_prefix.entry(l.prefix.clone()).or_default() += 1;
            }
        }
        assert_eq!(self.active_by_worker, by_worker, "active leases by worker");
        let mut submitted: HashMap<String, u32> = HashMap::new();
        for l in self.leases.values() {
            if l.state == LeaseState::Submitted {
                *submitted.entry(l.worker.clone()).or_default() += 1;
            }
        }
        assert_eq!(
            self.submitted_by_worker, submitted,
            "results waiting by worker"
        );
        assert_eq!(self.active_by_prefix, by_prefix, "active leases by prefix");
        for u in self.units.values() {
            assert!(
                u.leases.iter().all(|id| self.leases.contains_key(id)),
                "every lease of a unit is in memory"
            );
        }
        let pool: BTreeSet<&String> = self.canaries.iter().collect();
        assert_eq!(pool.len(), self.canaries.len(), "a canary is pooled once");
        for u in self.units.values() {
            assert_eq!(u.in_canary_pool, pool.contains(&u.id), "canary flags");
        }
        assert!(self.canaries.len() <= CANARY_POOL);
        for id in &self.canaries {
            let u = &self.units[id];
            assert!(
                u.status == UnitStatus::Verified && u.referee_confirmed(),
                "canaries come only from refereed or audited units"
            );
        }
    }

    pub(super) fn units_in_memory(&self) -> usize {
        self.units.len()
    }

    /// Units waiting for the referee: disputes (a job waits on them), then audits.
    pub(super) fn referee_backlog(&self) -> (usize, usize) {
        (self.referee.len(), self.audits.len())
    }
}

/// The units `worker` was credited for since `since_ms` (at most `limit`, newest first), with
/// their leases: what is to be audited once the worker is caught lying.
pub(super) async fn load_for_audit(
    db: &Db,
    worker: &str,
    since_ms: i64,
    limit: i64,
) -> Result<(Vec<String>, Vec<Unit>, Vec<Lease>)> {
    let rows = sqlx::query(&format!(
        "SELECT {UNIT_COLUMNS} FROM units WHERE status = 'verified' AND id IN
         (SELECT unit_id FROM credits WHERE worker = $1 AND issued_ms >= $2)
         ORDER BY verified_ms DESC LIMIT $3"
    ))
    .bind(worker)
    .bind(since_ms)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    let units = rows.iter().map(unit_from_row).collect::<Result<Vec<_>>>()?;
    let ids: Vec<String> = units.iter().map(|u| u.id.clone()).collect();
    let leases = load_leases(db, &ids).await?;
    Ok((ids, units, leases))
}

/// Every lease of the units `unit_ids`, oldest first within each query of 500 units.
async fn load_leases(db: &Db, unit_ids: &[String]) -> Result<Vec<Lease>> {
    let mut leases = Vec::new();
    for chunk in unit_ids.chunks(500) {
        let sql = format!(
            "SELECT id, unit_id, worker, prefix, kind, state, issued_ms, deadline_ms, output_hash, output, signature, submitted_ms FROM leases WHERE unit_id IN ({}) ORDER BY issued_ms, id",
            parameter_list(db.flavor.first_parameter(), chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        for row in q.fetch_all(&db.pool).await? {
            leases.push(lease_from_row(&row)?);
        }
    }
    Ok(leases)
}

/// Inserts the units of a new job (many per statement: a 2 048-input request is a handful of
/// round trips).
pub(super) async fn insert_units(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    flavor: Flavor,
    job_id: &str,
    precision: Precision,
    units: &[Unit],
) -> Result<()> {
    const ROWS: usize = 200;
    for (chunk_index, chunk) in units.chunks(ROWS).enumerate() {
        let sql = values_sql(
            "INSERT INTO units (id, job_id, idx, seq, precision, task, digest, credit_micro, replicas, quorum, live, status, output, output_hash, verified_by, verified_ms, audit, assurance)",
            &[
                "$", "$", "$", "$", "$", "$", "$", "$", "$", "$", "0", "'open'", "NULL", "NULL",
                "NULL", "NULL", "0", "$",
            ],
            chunk.len(),
            "",
            flavor.first_parameter(),
        );
        let mut q = sqlx::query(&sql);
        for (i, u) in chunk.iter().enumerate() {
            q = q
                .bind(u.id.clone())
                .bind(job_id.to_string())
                .bind((chunk_index * ROWS + i) as i64)
                .bind(u.seq)
                .bind(precision.as_str())
                .bind(B64.encode(tabula_protocol::encode(u.task.as_ref())))
                .bind(u.digest.to_hex())
                .bind(u.credit_micro)
                .bind(u.replicas)
                .bind(u.quorum)
                .bind(u.assurance.as_str());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// What a unit's verified `output` earns each agreeing worker: its credit, which a generation
/// unit was priced at for `max_tokens`, scaled to the tokens it produced (a model that stops
/// early computed less).
fn earned_credit(unit: &Unit, output: &[u8]) -> i64 {
    if let Task::Generate {
        prompt, max_tokens, ..
    } = unit.task.as_ref()
        && let Ok(UnitOutput::Generation { tokens, .. }) = UnitOutput::decode(output)
    {
        let planned = prompt.len() as i64 + i64::from(*max_tokens);
        let used = prompt.len() as i64 + (tokens.len() as i64).min(i64::from(*max_tokens));
        return unit.credit_micro.saturating_mul(used) / planned.max(1);
    }
    unit.credit_micro
}

fn unit_row(u: &Unit) -> UnitRow {
    UnitRow {
        id: u.id.clone(),
        replicas: u.replicas,
        quorum: u.quorum,
        status: u.status.as_str(),
        output: u.output.as_ref().map(|o| B64.encode(o.as_slice())),
        output_hash: u.output_hash.clone(),
        verified_by: u.verified_by,
        verified_ms: u.verified_ms,
        audit: u.audit,
    }
}

fn corrupt(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Corrupt(e.to_string())
}

fn unit_from_row(row: &sqlx::any::AnyRow) -> Result<Unit> {
    let task: String = row.try_get("task")?;
    let task: Task = tabula_protocol::decode(&B64.decode(task).map_err(corrupt)?, usize::MAX)
        .map_err(corrupt)?;
    let output: Option<String> = row.try_get("output")?;
    Ok(Unit {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        seq: row.try_get("seq")?,
        task: Arc::new(task),
        digest: Hash::from_hex(&row.try_get::<String, _>("digest")?).map_err(corrupt)?,
        credit_micro: row.try_get("credit_micro")?,
        replicas: row.try_get("replicas")?,
        quorum: row.try_get("quorum")?,
        status: UnitStatus::parse(&row.try_get::<String, _>("status")?)?,
        output: output
            .map(|o| B64.decode(o).map(Arc::new))
            .transpose()
            .map_err(corrupt)?,
        output_hash: row.try_get("output_hash")?,
        verified_by: match row.try_get::<Option<String>, _>("verified_by")?.as_deref() {
            Some("referee") => Some("referee"),
            Some("solo") => Some("solo"),
            Some("audited") => Some("audited"),
            Some("audit") => Some("audit"),
            Some(_) => Some("quorum"),
            None => None,
        },
        verified_ms: row.try_get("verified_ms")?,
        leases: Vec::new(),
        in_canary_pool: false,
        // Put back in the audit queue by `Book::load`.
        audit: false,
        // Units stored before assurance levels existed have none: standard.
        assurance: match row.try_get::<Option<String>, _>("assurance")?.as_deref() {
            None => Assurance::Standard,
            Some(a) => Assurance::parse(a).ok_or_else(|| corrupt(format!("assurance `{a}`")))?,
        },
        // Set by `Book::load` from `job_pools`.
        pool: None,
    })
}

fn lease_from_row(row: &sqlx::any::AnyRow) -> Result<Lease> {
    let output: Option<String> = row.try_get("output")?;
    Ok(Lease {
        id: LeaseId::from_hex(&row.try_get::<String, _>("id")?).map_err(corrupt)?,
        unit: row.try_get("unit_id")?,
        worker: row.try_get("worker")?,
        prefix: row.try_get("prefix")?,
        kind: match row.try_get::<String, _>("kind")?.as_str() {
            "canary" => LeaseKind::Canary,
            _ => LeaseKind::Replica,
        },
        state: LeaseState::parse(&row.try_get::<String, _>("state")?)?,
        issued_ms: row.try_get("issued_ms")?,
        deadline_ms: row.try_get("deadline_ms")?,
        output_hash: row.try_get("output_hash")?,
        output: output
            .map(|o| B64.decode(o).map(Arc::new))
            .transpose()
            .map_err(corrupt)?,
        signature: row.try_get("signature")?,
        submitted_ms: row.try_get("submitted_ms")?,
        orphaned: false,
    })
}

pub(super) fn worker_from_row(row: &sqlx::any::AnyRow) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        verified: row.try_get("verified")?,
        clean_streak: row.try_get("clean_streak")?,
        strikes: row.try_get("strikes")?,
        expired: row.try_get("expired")?,
        banned: row.try_get::<i64, _>("banned")? != 0,
    })
}

/// What the book's tests and the simulation share: embedding units of width [`DIM`], their
/// outputs, and a decision context.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// The embedding width of every test task.
    pub const DIM: usize = 4;

    /// An exact embedding output whose every value is `v`.
    pub fn output(v: i32) -> Vec<u8> {
        UnitOutput::ExactEmbeddings {
            dim: DIM as u32,
            q15: vec![v; DIM],
        }
        .encode()
    }

    fn dim(_: &Task) -> usize {
        DIM
    }

    impl<'a> Ctx<'a> {
        /// A context for deciding at `now` on test tasks.
        pub fn for_tests(
            config: &'a Config,
            now: i64,
            identity: &'a Identity,
            metrics: &'a Metrics,
        ) -> Self {
            Ctx {
                config,
                now,
                identity,
                metrics,
                output_dim: &dim,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tabula_protocol::{ModelRef, SignerKey, Submission};

    use super::*;
    use crate::{db::now_ms, journal::Journal};

    use super::testing::{DIM, output};

    fn config() -> Config {
        Config {
            replicas: 2,
            max_replicas: 4,
            probation_units: 0,
            solo_after: 1_000,
            canary_rate: 0.0,
            ban_after: 3,
            ..Config::default()
        }
    }

    fn task(n: u32) -> Task {
        Task::Embed {
            model: ModelRef {
                name: "all-MiniLM-L6-v2".into(),
                files: Vec::new(),
            },
            precision: Precision::Exact,
            sequences: vec![vec![101, n, 102]],
        }
    }

    struct Bench {
        config: Config,
        identity: Identity,
        metrics: Metrics,
        book: Book,
        writes: Vec<Write>,
        /// The clock of every decision.
        now: i64,
    }

    impl Bench {
        fn new(config: Config) -> Self {
            let mut book = Book::default();
            // The same draws (placement, audits, canaries) on every run.
            book.seed(1);
            Bench {
                config,
                identity: Identity::from_seed([9; 32]),
                metrics: Metrics::default(),
                book,
                writes: Vec::new(),
                now: now_ms(),
            }
        }

        /// Runs a decision with a context, keeping its writes.
        fn run<T>(&mut self, f: impl FnOnce(&mut Book, &Ctx) -> (T, Effects)) -> T {
            let ctx = Ctx::for_tests(&self.config, self.now, &self.identity, &self.metrics);
            let (value, effects) = f(&mut self.book, &ctx);
            self.writes.extend(effects.writes);
            self.book.check_invariants();
            value
        }

        fn add_job(&mut self, job: &str, tasks: &[Task]) -> Vec<String> {
            self.add_job_at(job, tasks, Assurance::Standard)
        }

        fn add_job_at(&mut self, job: &str, tasks: &[Task], assurance: Assurance) -> Vec<String> {
            let units: Vec<Unit> = tasks
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Unit::new(
                        format!("{job}-unit{i}"),
                        job.into(),
                        i as i64,
                        t.clone(),
                        1_000,
                        assurance,
                        &self.config,
                    )
                })
                .collect();
            let ids = units.iter().map(|u| u.id.clone()).collect();
            self.book.add_job(job, units);
            self.book.check_invariants();
            ids
        }

        fn worker(&mut self, seed: u8) -> (Identity, String) {
            let id = Identity::from_seed([seed; 32]);
            let key = id.public().to_hex();
            self.book.add_worker(&key, WorkerRecord::default());
            (id, key)
        }

        fn grant(&mut self, key: &str, prefix: &str) -> Option<Assignment> {
            self.grant_taking(key, prefix, &Takes::exact())
        }

        fn grant_taking(&mut self, key: &str, prefix: &str, takes: &Takes) -> Option<Assignment> {
            self.run(|b, ctx| match b.grant(ctx, key, prefix, takes) {
                Some((a, e)) => (Some(a), e),
                None => (None, Effects::default()),
            })
        }

        fn submit(&mut self, who: &Identity, a: &Assignment, out: Vec<u8>) -> Verdict {
            let s: Submission = who.submission(a.lease, a.unit, out);
            let signature = s
                .verify(&SignerKey::parse(&who.public()).unwrap())
                .map_err(|e| e.to_string());
            let key = who.public().to_hex();
            self.run(|b, ctx| match b.submit(ctx, &key, &s, signature) {
                SubmitOutcome::Decided(v, e) => (v, e),
                SubmitOutcome::NotInMemory => panic!("the lease is in memory"),
            })
        }

        fn record(&self, key: &str) -> WorkerRecord {
            self.book.workers[key].clone()
        }
    }

    /// A worker with a model budget is leased no unit of a model whose weights exceed it (it
    /// would refuse it, and the unit would come back to it again and again); one without a
    /// budget, or with room, takes it.
    #[test]
    fn a_unit_goes_only_to_workers_whose_budget_holds_its_model() {
        let mut t = Bench::new(config());
        let mut big = task(1);
        let Task::Embed { model, .. } = &mut big else {
            unreachable!("task() is an embedding")
        };
        model.files.push(tabula_protocol::FileRef {
            role: "exact".into(),
            sha256: tabula_protocol::Bytes([7; 32]),
            size: 300 << 20,
        });
        t.add_job("job", &[big]);
        let (_, small) = t.worker(1);
        let (_, roomy) = t.worker(2);
        let (_, unlimited) = t.worker(3);
        let budget = |mb| Takes {
            precisions: vec![Precision::Exact],
            max_model_mb: mb,
        };
        assert!(t.grant_taking(&small, "net-1", &budget(299)).is_none());
        assert!(t.grant_taking(&roomy, "net-2", &budget(300)).is_some());
        assert!(t.grant_taking(&unlimited, "net-3", &budget(0)).is_some());
    }

    #[test]
    fn replicas_go_to_distinct_workers_and_networks() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1)]);
        let (_, a) = t.worker(1);
        let (_, b) = t.worker(2);
        let (_, c) = t.worker(3);
        let first = t.grant(&a, "net-1").expect("a unit");
        assert!(t.grant(&a, "net-9").is_none(), "the same key twice");
        assert!(t.grant(&b, "net-1").is_none(), "the same network twice");
        let second = t.grant(&c, "net-2").expect("the second replica");
        assert_eq!(first.unit, second.unit);
        assert!(t.grant(&b, "net-3").is_none(), "a third replica of two");
    }

    #[test]
    fn agreement_verifies_credits_and_finishes_the_job() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        assert!(matches!(t.submit(&ia, &la, output(7)), Verdict::Accepted));
        assert_eq!(t.metrics.units_verified.load(Ordering::Relaxed), 0);
        assert!(matches!(t.submit(&ib, &lb, output(7)), Verdict::Accepted));
        assert_eq!(t.metrics.units_verified.load(Ordering::Relaxed), 1);
        for key in [&a, &b] {
            assert_eq!(t.record(key).verified, 1);
            assert_eq!(t.record(key).clean_streak, 1);
        }
        let credits = t
            .writes
            .iter()
            .filter(|w| matches!(w, Write::Credit(_)))
            .count();
        assert_eq!(credits, 2);
        assert!(
            t.writes
                .iter()
                .any(|w| matches!(w, Write::Job(j) if j.status == "done" && j.units_verified == 1))
        );
        // Verified by a quorum, never by the referee: not a canary.
        assert!(t.book.canaries.is_empty());
    }

    /// The referee's verdict on the next unit waiting for it (`truth` as its output).
    fn referee(t: &mut Bench, truth: i32) -> bool {
        let Some(job) = t.book.next_for_referee() else {
            return false;
        };
        let out = output(truth);
        let hash = tabula_protocol::sha256(&out).to_hex();
        t.run(|b, ctx| ((), b.judged(ctx, &job, out, hash).unwrap_or_default()));
        true
    }

    #[test]
    fn a_disagreement_goes_to_the_referee_and_only_the_liar_is_struck() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        t.submit(&ia, &la, output(7));
        t.submit(&ib, &lb, output(8));
        // No majority decides: two colluders would outvote an honest worker.
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Referee);
        assert_eq!(t.record(&a).strikes + t.record(&b).strikes, 0);
        assert!(referee(&mut t, 7));
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Verified);
        assert_eq!(t.record(&a).verified, 1);
        assert_eq!((t.record(&a).strikes, t.record(&b).strikes), (0, 1));
        // A fresh key's first proven lie bans it: it has nothing to lose, and each lie costs
        // the referee.
        assert!(t.record(&b).banned);
        // A refereed unit is a canary from now on.
        assert_eq!(t.book.canaries, vec!["job-unit0".to_string()]);
    }

    #[test]
    fn replays_forgeries_and_bad_shapes_are_rejected_with_a_strike() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1), task(2)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        let la = t.grant(&a, "net-1").unwrap();
        // b replays a's signed result for a's lease.
        let replay = ia.submission(la.lease, la.unit, output(7));
        let verdict = t.run(|book, ctx| match book.submit(ctx, &b, &replay, Ok(())) {
            SubmitOutcome::Decided(v, e) => (v, e),
            SubmitOutcome::NotInMemory => unreachable!(),
        });
        assert!(matches!(verdict, Verdict::Rejected(r) if r.contains("another worker")));
        assert_eq!(t.record(&b).strikes, 1);
        // A signature by someone else.
        let lb = t.grant(&b, "net-2").unwrap();
        let forged = ia.submission(lb.lease, lb.unit, output(7));
        let verdict = t.run(|book, ctx| {
            let signature = forged
                .verify(&SignerKey::parse(&ib.public()).unwrap())
                .map_err(|e| e.to_string());
            match book.submit(ctx, &b, &forged, signature) {
                SubmitOutcome::Decided(v, e) => (v, e),
                SubmitOutcome::NotInMemory => unreachable!(),
            }
        });
        assert!(matches!(verdict, Verdict::Rejected(r) if r.contains("signature")));
        assert_eq!(t.record(&b).strikes, 2);
        // A wrong shape (two values of width 4 for one sequence).
        let bad = UnitOutput::ExactEmbeddings {
            dim: DIM as u32,
            q15: vec![0; 2 * DIM],
        }
        .encode();
        assert!(matches!(t.submit(&ia, &la, bad), Verdict::Rejected(r) if r.contains("malformed")));
        assert_eq!(t.record(&a).strikes, 1);
        // The lease is now spent.
        assert!(
            matches!(t.submit(&ia, &la, output(7)), Verdict::Rejected(r) if r == "the lease is wrong")
        );
        assert_eq!(t.record(&a).strikes, 1, "a spent lease is no strike");
    }

    #[test]
    fn an_orphaned_lease_expires_without_a_strike() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1), task(2)]);
        let (_, a) = t.worker(1);
        let (_, b) = t.worker(2);
        t.grant(&a, "net-1").unwrap();
        t.grant(&b, "net-2").unwrap();
        t.run(|book, ctx| ((), book.orphan(ctx, &a)));
        t.now += 10 * t.config.lease_ms as i64;
        t.run(|book, ctx| ((), book.expire(ctx)));
        assert_eq!(t.metrics.leases_expired.load(Ordering::Relaxed), 2);
        assert_eq!((t.record(&a).expired, t.record(&a).strikes), (1, 0));
        assert_eq!((t.record(&b).expired, t.record(&b).strikes), (1, 1));
        // Both units are open again, for anyone.
        let (_, c) = t.worker(3);
        assert!(t.grant(&c, "net-3").is_some());
        assert!(
            t.grant(&a, "net-1").is_some(),
            "an expired lease frees its holder too"
        );
    }

    #[test]
    fn a_long_clean_worker_runs_fresh_units_alone() {
        let mut t = Bench::new(Config {
            solo_after: 0,
            spot_check_rate: 0.0,
            ..config()
        });
        t.add_job("job", &[task(1)]);
        let (ia, a) = t.worker(1);
        let la = t.grant(&a, "net-1").unwrap();
        assert_eq!(t.book.units["job-unit0"].replicas, 1);
        t.submit(&ia, &la, output(3));
        assert!(t.writes.iter().any(|w| matches!(w, Write::Unit(u)
                if u.status == "verified" && u.verified_by == Some("solo"))));
        assert_eq!(t.metrics.units_solo.load(Ordering::Relaxed), 1);
    }

    /// `high`: no unit alone, however clean the worker, and three workers on distinct
    /// networks must all agree.
    #[test]
    fn high_assurance_needs_three_agreeing_workers_and_never_one() {
        let mut t = Bench::new(Config {
            solo_after: 0,
            spot_check_rate: 0.0,
            audit_rate: 0.0,
            ..config()
        });
        t.add_job_at("job", &[task(1)], Assurance::High);
        let mut ids = Vec::new();
        for n in 1..=3u8 {
            let (id, key) = t.worker(n);
            trusted(&mut t, &key, 500);
            let lease = t.grant(&key, &format!("net-{n}")).expect("a replica");
            ids.push((id, lease));
        }
        assert_eq!(t.book.units["job-unit0"].replicas, 3, "not run alone");
        for (i, (id, lease)) in ids.iter().enumerate() {
            t.submit(id, lease, output(7));
            let verified = t.metrics.units_verified.load(Ordering::Relaxed);
            assert_eq!(
                verified,
                u64::from(i == 2),
                "verified only once all three agree"
            );
        }
        assert_eq!(t.metrics.units_solo.load(Ordering::Relaxed), 0);
    }

    /// `referee`: even trusted workers that agree are checked by the referee before the output
    /// is delivered, and they are credited when the referee agrees.
    #[test]
    fn referee_assurance_refers_every_unit() {
        let mut t = Bench::new(Config {
            audit_rate: 0.0,
            ..config()
        });
        t.add_job_at("job", &[task(1)], Assurance::Referee);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        trusted(&mut t, &a, 500);
        trusted(&mut t, &b, 500);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        t.submit(&ia, &la, output(7));
        t.submit(&ib, &lb, output(7));
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Referee);
        assert!(referee(&mut t, 7));
        let u = &t.book.units["job-unit0"];
        assert_eq!(
            (u.status, u.verified_by),
            (UnitStatus::Verified, Some("referee"))
        );
        assert_eq!((t.record(&a).verified, t.record(&b).verified), (501, 501));
    }

    fn trusted(t: &mut Bench, key: &str, verified: i64) {
        let w = t.book.workers.get_mut(key).unwrap();
        w.verified = verified;
        w.clean_streak = verified;
    }

    fn tasks(n: u32) -> Vec<Task> {
        (0..n).map(task).collect()
    }

    /// Finding 1: grants went first-come to the oldest unit, so two keys asking back to back
    /// always shared it. Now a unit is drawn among the oldest the worker may take.
    #[test]
    fn two_keys_asking_together_share_a_unit_only_by_chance() {
        let mut shared = 0;
        for trial in 0..200 {
            let mut t = Bench::new(config());
            t.book.seed(trial);
            t.add_job("job", &tasks(32));
            let (_, a) = t.worker(1);
            let (_, b) = t.worker(2);
            let la = t.grant(&a, "net-1").unwrap();
            let lb = t.grant(&b, "net-2").unwrap();
            shared += u32::from(la.unit == lb.unit);
        }
        // About 1 in 32 (first-come: 200 of 200).
        assert!(shared <= 20, "{shared} of 200 trials shared a unit");
    }

    /// Finding 3 and pair-seeking: a released unit never comes back to the key, releases
    /// count against it, and past its allowance it gets nothing.
    #[test]
    fn releases_cost_a_key_and_never_return_its_unit() {
        let mut t = Bench::new(Config {
            abandon_allowance: 2,
            ..config()
        });
        t.add_job("one", &[task(1)]);
        let (_, a) = t.worker(1);
        let l = t.grant(&a, "net-1").unwrap();
        t.run(|b, ctx| ((), b.release(ctx, &a, &l.lease)));
        assert!(
            t.grant(&a, "net-1").is_none(),
            "the released unit came back"
        );
        assert_eq!(t.record(&a).expired, 1);
        t.add_job("many", &tasks(10));
        for _ in 0..2 {
            let l = t.grant(&a, "net-1").unwrap();
            t.run(|b, ctx| ((), b.release(ctx, &a, &l.lease)));
        }
        assert!(
            t.grant(&a, "net-1").is_none(),
            "released past its allowance"
        );
        assert_eq!(t.metrics.grants_limited.load(Ordering::Relaxed), 1);
        let (_, b) = t.worker(2);
        assert!(t.grant(&b, "net-2").is_some(), "others are served");
    }

    /// Findings 3 and 7: a fresh key holds one unit at a time; a trusted key at most
    /// `max_leases_per_key`, and one network at most `max_leases_per_prefix` together.
    #[test]
    fn lease_caps_per_key_during_probation_and_per_network() {
        let mut t = Bench::new(Config {
            probation_units: 3,
            max_leases_per_key: 3,
            max_leases_per_prefix: 4,
            ..config()
        });
        t.add_job("job", &tasks(20));
        let (_, fresh) = t.worker(1);
        assert!(t.grant(&fresh, "net-1").is_some());
        assert!(
            t.grant(&fresh, "net-1").is_none(),
            "probation: one at a time"
        );
        let (_, a) = t.worker(2);
        let (_, b) = t.worker(3);
        trusted(&mut t, &a, 10);
        trusted(&mut t, &b, 10);
        let held: usize = (0..5).filter(|_| t.grant(&a, "net-2").is_some()).count();
        assert_eq!(held, 3, "a trusted key's cap");
        let more: usize = (0..5).filter(|_| t.grant(&b, "net-2").is_some()).count();
        assert_eq!(more, 1, "the network's cap");
        assert!(
            t.grant(&b, "net-3").is_some(),
            "another network is not capped"
        );
    }

    /// An orphaned lease (the connection ended) expires after a short grace, not a whole
    /// lease period, so a hoarder that drops its connection frees its units soon.
    #[test]
    fn an_orphaned_lease_comes_back_after_a_short_grace() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1)]);
        let (_, a) = t.worker(1);
        t.grant(&a, "net-1").unwrap();
        t.run(|b, ctx| ((), b.orphan(ctx, &a)));
        t.now += ORPHAN_GRACE_MS + 1;
        t.run(|b, ctx| ((), b.expire(ctx)));
        assert_eq!(t.metrics.leases_expired.load(Ordering::Relaxed), 1);
        assert_eq!((t.record(&a).expired, t.record(&a).strikes), (1, 0));
    }

    /// Finding 1: a trusted key paired with a fresh partner no longer verifies a unit by
    /// their agreement alone; the referee checks, and both are caught.
    #[test]
    fn a_trusted_key_and_a_fresh_partner_are_refereed() {
        let mut t = Bench::new(Config {
            probation_units: 3,
            ..config()
        });
        t.add_job("job", &[task(1)]);
        let (it, tk) = t.worker(1);
        let (ic, c) = t.worker(2);
        trusted(&mut t, &tk, 4);
        let lt = t.grant(&tk, "net-1").unwrap();
        let lc = t.grant(&c, "net-2").unwrap();
        t.submit(&it, &lt, output(0));
        t.submit(&ic, &lc, output(0));
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Referee);
        assert!(referee(&mut t, 5));
        assert_eq!(t.record(&tk).strikes, 1);
        assert!(t.record(&c).banned, "a fresh key's first proven lie");
        assert!(!t.writes.iter().any(|w| matches!(w, Write::Credit(_))));
    }

    /// Findings 1 and 14: an audit re-executes a verified unit; a trusted quorum (or a solo
    /// worker) that lied is banned, reported for the audit of its other units, and the unit
    /// takes the referee's output.
    #[test]
    fn an_audit_catches_a_lying_quorum_and_bans_its_members() {
        let mut t = Bench::new(Config {
            audit_rate: 1.0,
            ..config()
        });
        t.add_job("job", &[task(1)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        trusted(&mut t, &a, 50);
        trusted(&mut t, &b, 50);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        t.submit(&ia, &la, output(0));
        t.submit(&ib, &lb, output(0));
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Verified);
        assert!(t.book.units["job-unit0"].audit, "audited at rate 1");
        assert!(t.book.canaries.is_empty(), "not a canary before its audit");
        let job = t.book.next_for_referee().unwrap();
        assert_eq!(job.work, RefereeWork::Audit);
        let truth = output(9);
        let hash = tabula_protocol::sha256(&truth).to_hex();
        let caught = t.run(|book, ctx| {
            let e = book.judged(ctx, &job, truth.clone(), hash.clone()).unwrap();
            (e.caught.clone(), e)
        });
        assert_eq!(caught.len(), 2);
        assert!(t.record(&a).banned && t.record(&b).banned);
        let u = &t.book.units["job-unit0"];
        assert_eq!(u.output_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(u.verified_by, Some("audit"));
        assert_eq!(t.metrics.audits_failed.load(Ordering::Relaxed), 1);
    }

    /// Finding 2: canaries come only from units the referee computed or confirmed, and a
    /// result that disagrees with a verified unit waits for an audit instead of a strike.
    #[test]
    fn a_poisoned_unit_is_never_a_canary_and_a_disagreement_waits_for_an_audit() {
        let mut t = Bench::new(Config {
            replicas: 3,
            canary_rate: 1.0,
            ..config()
        });
        // Two colluders make a quorum of 2 of 3 with a wrong answer while the third replica,
        // honest, still computes.
        t.add_job("poisoned", &[task(1)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        let (ih, h) = t.worker(3);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        let lh = t.grant(&h, "net-3").unwrap();
        t.submit(&ia, &la, output(0));
        t.submit(&ib, &lb, output(0));
        assert_eq!(t.book.units["poisoned-unit0"].status, UnitStatus::Verified);
        assert!(t.book.canaries.is_empty(), "a quorum's output is no canary");
        let (_, other) = t.worker(4);
        assert!(t.grant(&other, "net-4").is_none(), "no canary, no work");
        // The honest late answer disagrees: an audit, no strike.
        t.submit(&ih, &lh, output(9));
        assert_eq!(t.record(&h).strikes, 0, "struck before the referee spoke");
        assert!(t.book.units["poisoned-unit0"].audit);
        assert!(referee(&mut t, 9));
        assert_eq!(t.record(&h).strikes, 0);
        assert_eq!(t.record(&h).verified, 1, "the honest answer is credited");
        assert!(t.record(&a).banned && t.record(&b).banned);
        // Now confirmed by the referee, it is a canary, and the next worker gets it.
        assert_eq!(t.book.canaries, vec!["poisoned-unit0".to_string()]);
        assert!(t.grant(&other, "net-4").is_some());
        assert_eq!(t.metrics.leases_canary.load(Ordering::Relaxed), 1);
    }

    /// Finding 7: two fresh keys answering the same zeros as fast as they can, with the
    /// referee slower than they are (it runs only once they get no more units), cost it at
    /// most `--probation-units` units each, not every unit of the job (32 of 32 on 3e934b0).
    #[test]
    fn two_fresh_liars_cost_the_referee_a_few_units_each() {
        let mut t = Bench::new(Config {
            probation_units: 3,
            ..config()
        });
        t.add_job("job", &tasks(32));
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        loop {
            let mut granted = false;
            for (id, key, net) in [(&ia, &a, "net-1"), (&ib, &b, "net-2")] {
                if let Some(l) = t.grant(key, net) {
                    t.submit(id, &l, output(0));
                    granted = true;
                }
            }
            if !granted {
                break;
            }
        }
        let waiting = t.book.referee.len();
        assert!(waiting <= 6, "{waiting} units wait for the referee");
        assert!(waiting >= 1);
        let mut refereed = 0;
        while referee(&mut t, 5) {
            refereed += 1;
        }
        assert!(t.record(&a).banned && t.record(&b).banned);
        assert!(refereed <= 6, "the referee ran {refereed} units");
        assert!(t.grant(&a, "net-1").is_none() && t.grant(&b, "net-2").is_none());
    }

    /// Finding 7, the other side: keys in probation at their cap of unjudged results, each
    /// waiting for a replica only the other could give, are not left waiting on each other:
    /// their units go to the referee, the verdicts credit them, and they work on.
    #[test]
    fn keys_in_probation_at_their_cap_do_not_wait_on_each_other() {
        let mut t = Bench::new(Config {
            probation_units: 2,
            ..config()
        });
        t.add_job("job", &tasks(8));
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        // Each answers units the other has not seen (honestly: 7), until the cap stops it.
        let mut answered = 0;
        for (id, key, net) in [(&ia, &a, "net-1"), (&ib, &b, "net-2")] {
            while let Some(l) = t.grant(key, net) {
                t.submit(id, &l, output(7));
                answered += 1;
            }
        }
        assert_eq!(answered, 4, "two each");
        assert!(
            t.grant(&a, "net-1").is_none() && t.grant(&b, "net-2").is_none(),
            "both at the cap"
        );
        assert_eq!(t.book.referee.len(), 4, "capped units went to the referee");
        while referee(&mut t, 7) {}
        assert!(t.record(&a).verified >= 1 && t.record(&b).verified >= 1);
        assert!(!t.record(&a).banned && !t.record(&b).banned);
        assert!(
            t.grant(&a, "net-1").is_some() || t.grant(&b, "net-2").is_some(),
            "judged: work goes on"
        );
    }

    /// A worker alone (the only one connected, or every other has seen the unit): its result
    /// waits `replica_wait_ms` for another replica, then the referee finishes the unit; a
    /// unit with a replica still running is left to it.
    #[test]
    fn a_unit_no_replica_comes_for_goes_to_the_referee() {
        let mut t = Bench::new(Config {
            lease_ms: 1_000_000,
            replica_wait_ms: 60_000,
            ..config()
        });
        t.add_job("job", &tasks(2));
        let (ia, a) = t.worker(1);
        let (ic, c) = t.worker(3);
        for _ in 0..2 {
            let l = t.grant(&a, "net-1").unwrap();
            t.submit(&ia, &l, output(7));
        }
        let lc = t.grant(&c, "net-3").unwrap();
        t.now += 30_000;
        t.run(|b, ctx| ((), b.expire(ctx)));
        assert!(t.book.referee.is_empty(), "refereed before the wait");
        t.now += 60_000;
        t.run(|b, ctx| ((), b.expire(ctx)));
        assert_eq!(t.book.referee.len(), 1, "only the unit nobody runs");
        assert_eq!(t.metrics.units_stalled.load(Ordering::Relaxed), 1);
        assert!(
            !t.book
                .referee
                .iter()
                .any(|(_, id)| t.book.leases[&lc.lease].unit == *id)
        );
        t.submit(&ic, &lc, output(7));
        assert!(referee(&mut t, 7));
        assert_eq!(t.record(&a).verified, 2, "both its results are credited");
        assert_eq!(t.metrics.units_verified.load(Ordering::Relaxed), 2);
    }

    /// Finding 15: a generation that stops early earns the tokens it produced, not the
    /// `max_tokens` it was priced at.
    #[test]
    fn generation_credit_counts_the_tokens_produced() {
        let unit = Unit::new(
            "u".into(),
            "j".into(),
            0,
            Task::Generate {
                model: ModelRef {
                    name: "m".into(),
                    files: Vec::new(),
                },
                precision: Precision::Exact,
                prompt: vec![1, 2],
                max_tokens: 8,
                temperature_milli: 0,
                top_p_q16: 65536,
                seed: 0,
                stop: vec![2],
            },
            1_000,
            Assurance::Standard,
            &config(),
        );
        let out = |n: usize| {
            UnitOutput::Generation {
                tokens: vec![5; n],
                stopped: n < 8,
                logits_sha256: vec![Default::default(); n],
            }
            .encode()
        };
        assert_eq!(earned_credit(&unit, &out(2)), 400);
        assert_eq!(earned_credit(&unit, &out(8)), 1_000);
        assert_eq!(earned_credit(&unit, &out(0)), 200);
    }

    /// What must survive a restart, in a comparable form.
    fn summary(book: &Book) -> Vec<String> {
        let mut out: Vec<String> = book
            .units
            .values()
            .map(|u| {
                let mut leases: Vec<String> = u
                    .leases
                    .iter()
                    .map(|id| {
                        let l = &book.leases[id];
                        format!(
                            "{}:{}:{}:{}",
                            l.worker,
                            l.state.as_str(),
                            l.orphaned,
                            l.deadline_ms
                        )
                    })
                    .collect();
                leases.sort();
                format!(
                    "unit {} {} r{} q{} {:?} {:?}",
                    u.id,
                    u.status.as_str(),
                    u.replicas,
                    u.quorum,
                    u.output_hash,
                    leases
                )
            })
            .collect();
        out.extend(
            book.workers
                .iter()
                .map(|(k, w)| format!("worker {k} {w:?}")),
        );
        out.extend(
            book.jobs
                .iter()
                .map(|(id, j)| format!("job {id} {}/{}", j.units_verified, j.units_total)),
        );
        out.sort();
        out
    }

    /// Every decision goes through the real journal into SQLite; the book loaded back from
    /// the database must equal the one in memory (what a restart after `kill -9` relies on).
    #[tokio::test]
    async fn the_database_holds_what_memory_decided() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), None).await.unwrap());
        let journal = Journal::spawn(db.clone());
        // Every quorum is audited: a waiting audit must survive the restart too.
        let mut t = Bench::new(Config {
            audit_rate: 1.0,
            ..config()
        });
        // Three jobs of a unit each, in the database and in memory (added one at a time below,
        // so that random placement has one unit to choose from).
        for n in 0..3 {
            let job = format!("job{n}");
            let mut tx = db.pool.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO jobs (id, kind, model, precision, idempotency_key, units_total, units_verified, status, created_ms, finished_ms)
                 VALUES ($1, 'embeddings', 'm', 'exact', NULL, 1, 0, 'running', 0, NULL)",
            )
            .bind(&job)
            .execute(&mut *tx)
            .await
            .unwrap();
            let unit = Unit::new(
                format!("{job}-unit0"),
                job.clone(),
                0,
                task(n as u32),
                1_000,
                Assurance::Standard,
                &t.config,
            );
            insert_units(&mut tx, db.flavor, &job, Precision::Exact, &[unit])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let workers: Vec<(Identity, String)> = (1..=4).map(|n| t.worker(n)).collect();
        for (_, key) in &workers {
            t.writes.push(Write::WorkerSeen {
                key: key.clone(),
                agent: "test".into(),
                now_ms: 1,
            });
        }
        let (ia, a) = &workers[0];
        let (ib, b) = &workers[1];
        let (ic, c) = &workers[2];
        let (_, d) = &workers[3];
        // Unit 0: a and b agree. Unit 1: a and c disagree (the referee is wanted).
        // Unit 2: d holds it and its connection ends.
        t.add_job("job0", &[task(0)]);
        let a0 = t.grant(a, "net-a").unwrap();
        let b0 = t.grant(b, "net-b").unwrap();
        t.add_job("job1", &[task(1)]);
        let a1 = t.grant(a, "net-a").unwrap();
        let c1 = t.grant(c, "net-c").unwrap();
        t.add_job("job2", &[task(2)]);
        let d2 = t.grant(d, "net-d").unwrap();
        assert_eq!(a0.unit, b0.unit);
        assert_eq!(a1.unit, c1.unit);
        assert_ne!(d2.unit, a1.unit);
        journal
            .append(std::mem::take(&mut t.writes))
            .committed()
            .await
            .unwrap();
        t.submit(ia, &a0, output(1));
        t.submit(ib, &b0, output(1));
        t.submit(ia, &a1, output(2));
        journal
            .append(std::mem::take(&mut t.writes))
            .committed()
            .await
            .unwrap();
        t.submit(ic, &c1, output(3));
        t.run(|book, ctx| ((), book.orphan(ctx, d)));
        journal
            .append(std::mem::take(&mut t.writes))
            .committed()
            .await
            .unwrap();
        let loaded = Book::load(&db).await.unwrap();
        // The loaded book knows only the workers holding leases of units it loaded.
        let mut expected = summary(&t.book);
        let loaded_summary = summary(&loaded);
        // Nor verified units that hold no active lease and are no canaries (kept in memory
        // until their results are judged or evicted).
        expected.retain(|line| {
            !(line.starts_with("worker") || line.contains(" verified "))
                || loaded_summary.contains(line)
        });
        assert_eq!(loaded_summary, expected);
        assert_eq!(loaded.leasable, t.book.leasable);
        assert_eq!(loaded.audits, t.book.audits);
        assert_eq!(loaded.audits.len(), 1, "unit 0's audit is remembered");
        assert!(loaded.units[&loaded.audits.first().unwrap().1].audit);
        loaded.check_invariants();
        assert!(
            loaded_summary.iter().any(|l| l.contains(" referee ")),
            "{loaded_summary:#?}"
        );
        assert!(
            loaded_summary.iter().any(|l| l.contains(":active:true:")),
            "{loaded_summary:#?}"
        );
        assert!(loaded_summary.iter().any(|l| l.starts_with("job job1 0/1")));
        assert!(!loaded_summary.iter().any(|l| l.starts_with("job job0")));
        let credits: i64 = sqlx::query("SELECT COUNT(*) AS n FROM credits")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(credits, 2);
    }
}

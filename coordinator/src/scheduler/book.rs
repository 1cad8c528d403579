//! The scheduler's memory: every unit still in play, its leases and results, the reputation of
//! every worker seen since start, the progress of running jobs, and a pool of recently verified
//! units for canaries. All decisions (which unit a worker gets, whether results agree, who is
//! credited or struck) are made here, synchronously, under one lock; each returns the row
//! writes that record it ([`Write`]), which the caller appends to the journal before releasing
//! the lock and commits before telling anyone. The database stays the truth across restarts:
//! [`Book::load`] rebuilds this memory from it.
//!
//! A unit leaves memory once it is verified, holds no active lease and has left the canary
//! pool; a lease leaves with its unit. Workers stay (a record is a few dozen bytes).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sqlx::Row;
use tabula_protocol::{
    Assignment, Hash, Identity, LeaseId, Precision, PublicKey, Receipt, Submission, Task,
    UnitOutput,
};

use super::{Metrics, Verdict};
use crate::{
    Config, CoordinatorError,
    db::{Db, Flavor, now_ms, ordered_bytes, random_unit},
    journal::{CreditRow, JobRow, LeaseRow, UnitRow, WorkerRow, Write, parameter_list, values_sql},
};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Verified units kept for canaries.
const CANARY_POOL: usize = 256;

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
    verified_by: Option<&'static str>,
    verified_ms: Option<i64>,
    /// Every lease ever issued on the unit, oldest first.
    leases: Vec<LeaseId>,
    in_canary_pool: bool,
}

impl Unit {
    /// A unit of a job just created.
    pub(super) fn new(
        id: String,
        job_id: String,
        seq: i64,
        task: Task,
        credit_micro: i64,
        config: &Config,
    ) -> Self {
        Unit {
            id,
            job_id,
            seq,
            digest: task.digest(),
            task: Arc::new(task),
            credit_micro,
            replicas: i64::from(config.replicas),
            quorum: i64::from(config.replicas.min(2)),
            status: UnitStatus::Open,
            output: None,
            output_hash: None,
            verified_by: None,
            verified_ms: None,
            leases: Vec::new(),
            in_canary_pool: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseKind {
    Replica,
    Canary,
}

struct Lease {
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
    pub expired: i64,
    pub banned: bool,
}

struct JobProgress {
    units_total: i64,
    units_verified: i64,
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
}

impl Effects {
    /// Adds what another decision of the same turn did.
    pub fn absorb(&mut self, other: Effects) {
        self.writes.extend(other.writes);
        self.receipts.extend(other.receipts);
        self.job_done |= other.job_done;
        self.referee |= other.referee;
    }
}

/// What the book needs from the coordinator to decide.
pub(super) struct Ctx<'a> {
    pub config: &'a Config,
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

#[derive(Default)]
pub(super) struct Book {
    units: HashMap<String, Unit>,
    /// Open units with a replica slot free, by issue order: what `grant` looks through. Units
    /// whose every slot is out stay out of it, so a grant does not walk past every unit in
    /// flight. [`Book::refresh_leasable`] keeps it true wherever a unit's leases, replicas or
    /// status change.
    leasable: BTreeSet<(i64, String)>,
    /// Units waiting for the referee, by issue order.
    referee: BTreeSet<(i64, String)>,
    leases: HashMap<LeaseId, Lease>,
    workers: HashMap<String, WorkerRecord>,
    jobs: HashMap<String, JobProgress>,
    /// Recently verified units, newest last.
    canaries: VecDeque<String>,
}

impl Book {
    // ----- loading -----

    /// Rebuilds the book from the database: open and refereed units, verified units that still
    /// have active leases, the newest verified units (canaries), all their leases, the
    /// workers holding those leases, and running jobs.
    pub(super) async fn load(db: &Db) -> Result<Book> {
        let mut book = Book::default();
        const UNIT_COLUMNS: &str = "id, job_id, seq, task, digest, credit_micro, replicas, quorum, status, output, output_hash, verified_by, verified_ms";
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
            "SELECT {UNIT_COLUMNS} FROM units WHERE status = 'verified' ORDER BY verified_ms DESC LIMIT {CANARY_POOL}"
        ))
        .fetch_all(&db.pool)
        .await?;
        for row in &rows {
            let unit = unit_from_row(row)?;
            book.units.insert(unit.id.clone(), unit);
        }
        // The canary pool: the newest verified units, oldest first.
        for row in pool.iter().rev() {
            let unit = unit_from_row(row)?;
            let id = unit.id.clone();
            book.units.entry(id.clone()).or_insert(unit).in_canary_pool = true;
            book.canaries.push_back(id);
        }
        for u in book.units.values() {
            if u.status == UnitStatus::Referee {
                book.referee.insert((u.seq, u.id.clone()));
            }
        }
        let unit_ids: Vec<String> = book.units.keys().cloned().collect();
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
                let lease = lease_from_row(&row)?;
                if let Some(u) = book.units.get_mut(&lease.unit) {
                    u.leases.push(lease.id);
                }
                book.leases.insert(lease.id, lease);
            }
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
        // With the leases loaded: which units have a slot free.
        let ids: Vec<String> = book.units.keys().cloned().collect();
        for id in &ids {
            book.refresh_leasable(id);
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

    pub(super) fn worker(&self, key: &str) -> Option<&WorkerRecord> {
        self.workers.get(key)
    }

    /// Remembers a worker loaded from the database, unless it is known already (the copy here
    /// may be newer).
    pub(super) fn add_worker(&mut self, key: &str, record: WorkerRecord) -> &WorkerRecord {
        self.workers.entry(key.to_string()).or_insert(record)
    }

    // ----- leases -----

    fn seen(&self, unit: &Unit, worker: &str, prefix: &str) -> bool {
        unit.leases.iter().any(|id| {
            self.leases
                .get(id)
                .is_some_and(|l| l.holds() && (l.worker == worker || l.prefix == prefix))
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

    /// Leases a unit to `worker` (from network `prefix`): a canary now and then, else the
    /// oldest open unit it may take. `None` when nothing is open for it.
    pub(super) fn grant(
        &mut self,
        ctx: &Ctx,
        worker: &str,
        prefix: &str,
        precisions: &[Precision],
    ) -> Option<(Assignment, Effects)> {
        let record = self.workers.get(worker)?;
        if record.banned {
            return None;
        }
        let streak = record.clean_streak;
        let allowed = |u: &Unit| precisions.contains(&u.task.precision());
        // A known-answer canary: a unit verified before, which this worker never saw.
        let canary = (random_unit() < ctx.config.canary_rate)
            .then(|| {
                self.canaries.iter().rev().find(|id| {
                    let u = &self.units[*id];
                    allowed(u) && !self.seen(u, worker, prefix)
                })
            })
            .flatten()
            .cloned();
        let (unit_id, kind) = match canary {
            Some(id) => (id, LeaseKind::Canary),
            None => {
                let id = self.leasable.iter().find_map(|(_, id)| {
                    let u = &self.units[id];
                    (self.slots_used(u) < u.replicas && allowed(u) && !self.seen(u, worker, prefix))
                        .then(|| id.clone())
                })?;
                (id, LeaseKind::Replica)
            }
        };
        let mut effects = Effects::default();
        let now = now_ms();
        let lease_id: LeaseId = tabula_protocol::Bytes(ordered_bytes());
        if kind == LeaseKind::Replica {
            // Adaptive replication: a long-clean worker runs a fresh unit alone, except for a
            // random fraction of spot checks. It cannot tell which.
            let fresh = self.units[&unit_id].leases.is_empty();
            if streak >= i64::from(ctx.config.solo_after)
                && fresh
                && random_unit() >= ctx.config.spot_check_rate
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
        self.refresh_leasable(&unit_id);
        ctx.metrics.leases_granted.fetch_add(1, Ordering::Relaxed);
        Some((assignment, effects))
    }

    /// Moves an active lease to `state` (released or expired), freeing its replica slot.
    fn end_lease(&mut self, id: &LeaseId, state: LeaseState, effects: &mut Effects) {
        let Some(lease) = self.leases.get_mut(id) else {
            return;
        };
        lease.state = state;
        effects.writes.push(Write::LeaseState {
            id: id.to_hex(),
            state: state.as_str(),
        });
        if std::mem::take(&mut lease.orphaned) {
            effects.writes.push(Write::Unorphan { lease: id.to_hex() });
        }
        let unit = lease.unit.clone();
        // Its slot is free again.
        self.refresh_leasable(&unit);
        self.evict_if_done(&unit);
    }

    /// Gives a lease back unfinished: its unit is re-issued at once, without penalty.
    pub(super) fn release(&mut self, ctx: &Ctx, worker: &str, lease: &LeaseId) -> Effects {
        let mut effects = Effects::default();
        if self
            .leases
            .get(lease)
            .is_some_and(|l| l.state == LeaseState::Active && l.worker == worker)
        {
            self.end_lease(lease, LeaseState::Released, &mut effects);
            ctx.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        }
        effects
    }

    /// Marks the active leases of `worker` as orphaned: its connection ended without an
    /// answer. They stay active (a reconnecting worker can still submit), but expiring them
    /// is not held against the worker.
    pub(super) fn orphan(&mut self, worker: &str) -> Effects {
        let mut effects = Effects::default();
        let now = now_ms();
        for l in self.leases.values_mut() {
            if l.worker == worker && l.state == LeaseState::Active && !l.orphaned {
                l.orphaned = true;
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
    pub(super) fn expire(&mut self, ctx: &Ctx, now: i64) -> Effects {
        let mut effects = Effects::default();
        let overdue: Vec<(LeaseId, String, bool)> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active && l.deadline_ms < now)
            .map(|l| (l.id, l.worker.clone(), l.orphaned))
            .collect();
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
        let lease = self.leases.get_mut(&s.lease).expect("looked up above");
        if std::mem::take(&mut lease.orphaned) {
            effects.writes.push(Write::Unorphan {
                lease: s.lease.to_hex(),
            });
        }
        let verdict = if let Some(reason) = problem {
            // The replica slot stays used (a bad result is a result); `evaluate` adds a
            // replica once every slot has answered.
            lease.state = LeaseState::Wrong;
            effects.writes.push(Write::LeaseState {
                id: s.lease.to_hex(),
                state: LeaseState::Wrong.as_str(),
            });
            self.strike(ctx, worker, &mut effects);
            ctx.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.results_rejected.fetch_add(1, Ordering::Relaxed);
            Verdict::Rejected(reason)
        } else {
            lease.state = LeaseState::Submitted;
            lease.output_hash = Some(s.output_hash.to_hex());
            lease.output = Some(Arc::new(s.output.clone()));
            lease.signature = Some(s.signature.to_hex());
            lease.submitted_ms = Some(now_ms());
            effects.writes.push(Write::Lease(lease.row()));
            Verdict::Accepted
        };
        self.evaluate(ctx, &unit_id, &mut effects);
        self.evict_if_done(&unit_id);
        SubmitOutcome::Decided(verdict, effects)
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

    /// Advances a unit after a result: verified by a trusted quorum, sent to the referee, or
    /// given another replica.
    fn evaluate(&mut self, ctx: &Ctx, unit_id: &str, effects: &mut Effects) {
        let unit = &self.units[unit_id];
        let precision = unit.task.precision();
        match unit.status {
            UnitStatus::Verified => {
                // A late replica or a canary: judged against the canonical output.
                let canonical = unit.output.clone().unwrap_or_default();
                let hash = unit.output_hash.clone().unwrap_or_default();
                self.settle_results(ctx, unit_id, &canonical, &hash, effects);
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
        if let Some(best) = groups.iter().max_by_key(|g| g.len())
            && best.len() as i64 >= unit.quorum
        {
            let trusted = best.iter().any(|id| {
                self.workers
                    .get(&self.leases[id].worker)
                    .is_some_and(|w| w.clean_streak >= i64::from(ctx.config.probation_units))
            });
            if trusted {
                let (hash, out) = output(&best[0]);
                let (hash, out) = (hash.to_string(), out.to_vec());
                self.verify_unit(ctx, unit_id, out, hash, "quorum", effects);
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
        let now = now_ms();
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
        // Into the canary pool, pushing the oldest out.
        let u = self.units.get_mut(unit_id).expect("a unit in memory");
        u.in_canary_pool = true;
        self.canaries.push_back(unit_id.to_string());
        if self.canaries.len() > CANARY_POOL
            && let Some(old) = self.canaries.pop_front()
        {
            if let Some(u) = self.units.get_mut(&old) {
                u.in_canary_pool = false;
            }
            self.evict_if_done(&old);
        }
    }

    /// Credits every submitted result of a unit that agrees with the canonical output and
    /// strikes every one that does not.
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
        let (digest, credit_micro) = (unit.digest, unit.credit_micro);
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
                    issued_ms: now_ms() as u64,
                    signature: Default::default(),
                };
                ctx.identity.sign_receipt(&mut receipt);
                self.leases.get_mut(&id).expect("a result").state = LeaseState::Correct;
                effects.writes.push(Write::LeaseState {
                    id: id.to_hex(),
                    state: LeaseState::Correct.as_str(),
                });
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
                self.leases.get_mut(&id).expect("a result").state = LeaseState::Wrong;
                effects.writes.push(Write::LeaseState {
                    id: id.to_hex(),
                    state: LeaseState::Wrong.as_str(),
                });
                self.strike(ctx, &worker, effects);
                ctx.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker, unit = unit_id, "wrong result");
            }
        }
    }

    /// Forgets a verified unit and its leases once nothing can change it any more.
    fn evict_if_done(&mut self, unit_id: &str) {
        let Some(u) = self.units.get(unit_id) else {
            return;
        };
        if u.status != UnitStatus::Verified
            || u.in_canary_pool
            || u.leases
                .iter()
                .any(|id| self.leases[id].state == LeaseState::Active)
        {
            return;
        }
        let u = self.units.remove(unit_id).expect("present");
        for id in u.leases {
            self.leases.remove(&id);
        }
    }

    // ----- referee -----

    /// The oldest unit waiting for the referee, with its task.
    pub(super) fn next_for_referee(&self) -> Option<(String, Task)> {
        let (_, id) = self.referee.first()?;
        Some((id.clone(), (*self.units[id].task).clone()))
    }

    /// The referee's output for a unit: it becomes the canonical one.
    pub(super) fn refereed(
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

    // ----- inspection (tests, metrics) -----

    pub(super) fn units_in_memory(&self) -> usize {
        self.units.len()
    }
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
            "INSERT INTO units (id, job_id, idx, seq, precision, task, digest, credit_micro, replicas, quorum, live, status, output, output_hash, verified_by, verified_ms)",
            &[
                "$", "$", "$", "$", "$", "$", "$", "$", "$", "$", "0", "'open'", "NULL", "NULL",
                "NULL", "NULL",
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
                .bind(u.quorum);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
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
            Some(_) => Some("quorum"),
            None => None,
        },
        verified_ms: row.try_get("verified_ms")?,
        leases: Vec::new(),
        in_canary_pool: false,
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

#[cfg(test)]
mod tests {
    use tabula_protocol::{ModelRef, SignerKey, Submission};

    use super::*;
    use crate::journal::Journal;

    const DIM: usize = 4;

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

    fn output(v: i32) -> Vec<u8> {
        UnitOutput::ExactEmbeddings {
            dim: DIM as u32,
            q15: vec![v; DIM],
        }
        .encode()
    }

    struct Bench {
        config: Config,
        identity: Identity,
        metrics: Metrics,
        book: Book,
        writes: Vec<Write>,
    }

    impl Bench {
        fn new(config: Config) -> Self {
            Bench {
                config,
                identity: Identity::from_seed([9; 32]),
                metrics: Metrics::default(),
                book: Book::default(),
                writes: Vec::new(),
            }
        }

        /// Runs a decision with a context, keeping its writes.
        fn run<T>(&mut self, f: impl FnOnce(&mut Book, &Ctx) -> (T, Effects)) -> T {
            let dim = |_: &Task| DIM;
            let ctx = Ctx {
                config: &self.config,
                identity: &self.identity,
                metrics: &self.metrics,
                output_dim: &dim,
            };
            let (value, effects) = f(&mut self.book, &ctx);
            self.writes.extend(effects.writes);
            self.assert_leasable_is_exact();
            value
        }

        /// After every decision, `leasable` holds exactly the open units with a slot free: a
        /// unit missing from it would never be leased again, one too many would only cost
        /// time.
        fn assert_leasable_is_exact(&self) {
            let b = &self.book;
            let expected: BTreeSet<(i64, String)> = b
                .units
                .values()
                .filter(|u| u.status == UnitStatus::Open && b.slots_used(u) < u.replicas)
                .map(|u| (u.seq, u.id.clone()))
                .collect();
            assert_eq!(b.leasable, expected);
        }

        fn add_job(&mut self, job: &str, tasks: &[Task]) -> Vec<String> {
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
                        &self.config,
                    )
                })
                .collect();
            let ids = units.iter().map(|u| u.id.clone()).collect();
            self.book.add_job(job, units);
            self.assert_leasable_is_exact();
            ids
        }

        fn worker(&mut self, seed: u8) -> (Identity, String) {
            let id = Identity::from_seed([seed; 32]);
            let key = id.public().to_hex();
            self.book.add_worker(&key, WorkerRecord::default());
            (id, key)
        }

        fn grant(&mut self, key: &str, prefix: &str) -> Option<Assignment> {
            self.run(
                |b, ctx| match b.grant(ctx, key, prefix, &[Precision::Exact]) {
                    Some((a, e)) => (Some(a), e),
                    None => (None, Effects::default()),
                },
            )
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
        // Verified and answered: only the canary pool keeps it.
        assert!(t.book.canaries.iter().any(|id| id == "job-unit0"));
    }

    #[test]
    fn a_disagreement_adds_a_replica_and_the_odd_one_out_is_struck() {
        let mut t = Bench::new(config());
        t.add_job("job", &[task(1)]);
        let (ia, a) = t.worker(1);
        let (ib, b) = t.worker(2);
        let (ic, c) = t.worker(3);
        let la = t.grant(&a, "net-1").unwrap();
        let lb = t.grant(&b, "net-2").unwrap();
        t.submit(&ia, &la, output(7));
        t.submit(&ib, &lb, output(8));
        assert_eq!(t.book.units["job-unit0"].replicas, 3);
        let lc = t.grant(&c, "net-3").expect("the tie-breaker");
        t.submit(&ic, &lc, output(7));
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Verified);
        assert_eq!(t.record(&a).verified, 1);
        assert_eq!(t.record(&c).verified, 1);
        assert_eq!(t.record(&b).strikes, 1);
        assert_eq!(t.record(&b).verified, 0);
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
        t.run(|book, _| ((), book.orphan(&a)));
        let later = now_ms() + 10 * t.config.lease_ms as i64;
        t.run(|book, ctx| ((), book.expire(ctx, later)));
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
        assert_eq!(t.book.units["job-unit0"].status, UnitStatus::Verified);
        assert_eq!(t.metrics.units_solo.load(Ordering::Relaxed), 1);
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
        let mut t = Bench::new(config());
        // Three units of a job, in the database and in memory.
        let tasks: Vec<Task> = (0..3).map(task).collect();
        let ids = t.add_job("job", &tasks);
        {
            let mut tx = db.pool.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO jobs (id, kind, model, precision, idempotency_key, units_total, units_verified, status, created_ms, finished_ms)
                 VALUES ('job', 'embeddings', 'm', 'exact', NULL, 3, 0, 'running', 0, NULL)",
            )
            .execute(&mut *tx)
            .await
            .unwrap();
            let units: Vec<&Unit> = ids.iter().map(|id| &t.book.units[id]).collect();
            let copies: Vec<Unit> = units
                .iter()
                .map(|u| {
                    Unit::new(
                        u.id.clone(),
                        "job".into(),
                        u.seq,
                        (*u.task).clone(),
                        1_000,
                        &t.config,
                    )
                })
                .collect();
            insert_units(&mut tx, db.flavor, "job", Precision::Exact, &copies)
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
        // Unit 0: a and b agree. Unit 1: a and c disagree (a third replica is wanted).
        // Unit 2: d holds it and its connection ends.
        let a0 = t.grant(a, "net-a").unwrap();
        let b0 = t.grant(b, "net-b").unwrap();
        let a1 = t.grant(a, "net-a").unwrap();
        let c1 = t.grant(c, "net-c").unwrap();
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
        t.run(|book, _| ((), book.orphan(d)));
        journal
            .append(std::mem::take(&mut t.writes))
            .committed()
            .await
            .unwrap();
        let loaded = Book::load(&db).await.unwrap();
        // The loaded book knows only the workers holding leases of units it loaded.
        let mut expected = summary(&t.book);
        let loaded_summary = summary(&loaded);
        expected.retain(|line| !line.starts_with("worker") || loaded_summary.contains(line));
        assert_eq!(loaded_summary, expected);
        assert_eq!(loaded.leasable, t.book.leasable);
        assert!(
            loaded_summary.iter().any(|l| l.contains("r3")),
            "{loaded_summary:#?}"
        );
        assert!(
            loaded_summary.iter().any(|l| l.contains(":active:true:")),
            "{loaded_summary:#?}"
        );
        assert!(loaded_summary.iter().any(|l| l.starts_with("job job 1/3")));
        let credits: i64 = sqlx::query("SELECT COUNT(*) AS n FROM credits")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(credits, 2);
    }
}

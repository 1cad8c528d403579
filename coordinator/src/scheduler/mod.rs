//! Jobs, units, leases, verification and credit.
//!
//! The life of a unit: `open` (leased to up to `replicas` distinct workers: distinct keys and
//! network prefixes) → results arrive and are grouped by agreement → a group of `quorum`
//! results with at least one trusted member makes it `verified` (agreeing workers are
//! credited, the others struck); all results in without a quorum adds a replica, up to
//! `max_replicas`, then `referee`: the coordinator re-executes it and its output is the
//! canonical one. A quorum of untrusted (probationary) workers is refereed too.
//!
//! Decisions are made in memory ([`book`]) under one lock and recorded through the
//! [`journal`](crate::journal), which commits every decision waiting into one transaction;
//! a worker hears of a decision (its lease, its verdict, its receipt) only once it is
//! committed, so a `kill -9` at any point leaves the database with either the old state or the
//! new one, and a restart rebuilds the memory from it. One coordinator process owns a
//! database ([`crate::db::Db::claim`]).

mod book;

#[cfg(test)]
mod sim;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sqlx::Row;
use tabula_engine::cpu::CpuBackend;
use tabula_protocol::{
    Address, Assignment, Identity, LeaseId, Precision, PublicKey, Receipt, SignerKey, Submission,
    Takes, Task, ToWorker, UnitOutput,
};
use tabula_worker::{Executor, exec::ExecutorThread};
use tokio::sync::{Notify, mpsc};

use self::book::{Book, Ctx, Effects, SubmitOutcome, Unit};
use crate::{
    Config, CoordinatorError,
    db::{Db, now_ms, ordered_id, random_id},
    journal::{Journal, Pending, Write},
    models::{Models, Registry, RegistryFiles},
};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub leases_granted: AtomicU64,
    pub leases_canary: AtomicU64,
    pub units_solo: AtomicU64,
    /// Units the referee finished because no replica came within `replica_wait_ms`.
    pub units_stalled: AtomicU64,
    pub leases_expired: AtomicU64,
    pub leases_released: AtomicU64,
    /// Grants refused at a limit: a key's or a network's lease cap, or its abandoned leases.
    pub grants_limited: AtomicU64,
    /// Logins of new keys refused by a network's rate limit.
    pub logins_limited: AtomicU64,
    /// Verified units the referee re-executed after the fact, and those it found wrong.
    pub units_audited: AtomicU64,
    pub audits_failed: AtomicU64,
    /// Workers banned because an audit caught them.
    pub workers_caught: AtomicU64,
    pub results_submitted: AtomicU64,
    pub results_rejected: AtomicU64,
    pub results_wrong: AtomicU64,
    pub units_verified: AtomicU64,
    pub units_refereed: AtomicU64,
    pub workers_connected: AtomicU64,
    pub jobs_created: AtomicU64,
}

pub struct State {
    /// Itself, for the tasks it starts from a decision.
    me: std::sync::Weak<State>,
    pub config: Config,
    pub db: Arc<Db>,
    pub identity: Identity,
    /// The models served: [`State::registry`] is the one current now.
    pub models: Arc<Models>,
    pub metrics: Metrics,
    /// Woken whenever a job finishes (requests waiting for their jobs look again).
    pub job_done: Notify,
    referee_wake: Notify,
    referee: ExecutorThread,
    /// The credit contract and the settled ledger.
    pub settlement: Arc<crate::settlement::Settlement>,
    /// Connected sessions by worker key, for pushing receipts, with what each takes.
    sessions: Mutex<HashMap<PublicKey, Vec<Attached>>>,
    /// Logins of new keys per network in the current minute: (minute, count).
    new_key_logins: Mutex<HashMap<String, (i64, u32)>>,
    /// Units in play, leases, workers, running jobs: where decisions are made.
    book: Mutex<Book>,
    journal: Journal,
    /// The last journal failure the book was reloaded after.
    reloaded_after: tokio::sync::Mutex<u64>,
    /// Workers that take pipeline stages, and the sessions running on them.
    pub pipelines: crate::pipeline::Pipelines,
}

/// A pipeline session's job, unit and the pool of workers it is limited to.
pub struct PipelineJob {
    pub job: String,
    pub unit: String,
    pub pool: Option<std::collections::HashSet<PublicKey>>,
}

/// What [`State::create_pipeline_job`] did.
pub enum PipelineCreated {
    New(PipelineJob),
    /// The idempotency key names this job, made from the same request.
    Existing(String),
}

/// The `jobs` row of a new job of `units_total` units.
async fn insert_job_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    job: &NewJob<'_>,
    units_total: i64,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO jobs (id, kind, model, precision, idempotency_key, units_total, units_verified, status, created_ms, finished_ms, owner, fingerprint)
         VALUES ($1, $2, $3, $4, $5, $6, 0, 'running', $7, NULL, $8, $9)",
    )
    .bind(id)
    .bind(job.kind)
    .bind(job.model)
    .bind(job.precision.as_str())
    .bind(job.idempotency_key)
    .bind(units_total)
    .bind(now)
    .bind(job.owner)
    .bind(job.fingerprint)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stores a job's pool (its API key's) for a restart.
async fn insert_pool(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &str,
    pool: Option<&std::collections::HashSet<String>>,
) -> Result<()> {
    for worker in pool.into_iter().flatten() {
        sqlx::query("INSERT INTO job_pools (job_id, worker) VALUES ($1, $2)")
            .bind(job)
            .bind(worker)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// What a finished pipeline session settles ([`State::settle_session`]).
pub struct SessionSettlement {
    pub job_id: String,
    pub unit_id: String,
    /// The digest of the session's task (what its receipts name).
    pub digest: tabula_protocol::Hash,
    /// The encoded [`UnitOutput`].
    pub output: Vec<u8>,
    /// Each member's credit, in millionths.
    pub credits: Vec<(PublicKey, i64)>,
}

/// Networks the login limiter remembers at most.
const MAX_LIMITED_NETWORKS: usize = 100_000;

/// How hard a job's results are checked, chosen per request (`"assurance"` in the body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Assurance {
    /// `--replicas` workers agree (a long-clean worker may run a unit alone, spot-checked),
    /// and `--audit-rate` of accepted units is re-executed by the referee afterwards.
    #[default]
    Standard,
    /// Never alone: at least three workers on distinct networks (at most `--max-replicas`)
    /// must all agree.
    High,
    /// The referee re-executes every unit and its output is the one delivered; the workers'
    /// agreeing results are still credited, wrong ones struck.
    Referee,
}

impl Assurance {
    pub fn as_str(self) -> &'static str {
        match self {
            Assurance::Standard => "standard",
            Assurance::High => "high",
            Assurance::Referee => "referee",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "standard" => Assurance::Standard,
            "high" => Assurance::High,
            "referee" => Assurance::Referee,
            _ => return None,
        })
    }

    /// Replicas a unit starts with under `config`.
    pub fn replicas(self, config: &Config) -> u32 {
        match self {
            Assurance::High => config.replicas.max(3).min(config.max_replicas),
            Assurance::Standard | Assurance::Referee => config.replicas,
        }
    }
}

/// A job to create, but for its tasks.
pub struct NewJob<'a> {
    /// `embeddings` or `completion`.
    pub kind: &'a str,
    pub model: &'a str,
    pub precision: Precision,
    /// Who may see it ([`crate::api::owner_of`] of its API key).
    pub owner: &'a str,
    /// The request's Idempotency-Key, scoped to its API key.
    pub idempotency_key: Option<&'a str>,
    /// SHA-256 of the request's endpoint and body: the idempotency key's request.
    pub fingerprint: Option<&'a str>,
    pub assurance: Assurance,
}

/// Why a job was not created.
#[derive(Debug)]
pub enum JobRefused {
    /// Its idempotency key names job `.0`, made from another request.
    Conflict(String),
    /// Its owner has `queued` units in running jobs; the job would pass `limit`.
    Quota { queued: u64, limit: u64 },
    /// Its owner has `queued` units at `referee` assurance not verified yet; the job would
    /// pass `limit` (`--max-referee-units`).
    RefereeQuota { queued: u64, limit: u64 },
}

/// What happened to a submitted result.
pub enum Verdict {
    /// Stored; credited once the unit is verified.
    Accepted,
    Rejected(String),
}

fn decode_b64(s: &str) -> Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|e| CoordinatorError::Corrupt(format!("base64: {e}")))
}

impl State {
    /// The scheduler over `db`, its memory loaded from it.
    pub async fn new(
        config: Config,
        db: Db,
        identity: Identity,
        models: Arc<Models>,
        settlement: Arc<crate::settlement::Settlement>,
    ) -> Result<Arc<Self>> {
        let db = Arc::new(db);
        // Pipeline sessions live in memory: the jobs of those a restart cut short failed.
        sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_ms = $1
             WHERE status = 'running' AND id IN (SELECT job_id FROM units WHERE status = 'pipeline')",
        )
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
        let book = Book::load(&db).await?;
        let files: Arc<dyn tabula_worker::FileSource + Send + Sync> =
            Arc::new(RegistryFiles(models.clone()));
        let referee = ExecutorThread::spawn(|| Ok(Executor::new(CpuBackend)), files);
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            config,
            journal: Journal::spawn(db.clone()),
            db,
            identity,
            models,
            metrics: Metrics::default(),
            job_done: Notify::new(),
            referee_wake: Notify::new(),
            referee,
            settlement,
            sessions: Mutex::new(HashMap::new()),
            new_key_logins: Mutex::new(HashMap::new()),
            book: Mutex::new(book),
            reloaded_after: tokio::sync::Mutex::new(0),
            pipelines: crate::pipeline::Pipelines::default(),
        }))
    }

    /// Starts lease expiry, epoch posting (an epoch left unposted by a crash at once, then one
    /// every `epoch_minutes`) and the referee.
    pub fn start_background_tasks(self: &Arc<Self>) {
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = state.expire_leases().await {
                    tracing::error!("expiring leases: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let state = self.clone();
        tokio::spawn(async move {
            // An epoch built before a crash is posted at once, with the same root.
            if let Err(e) = state.settlement.recover(&state.db).await {
                tracing::error!("posting an epoch built before the restart: {e}");
            }
            if state.config.epoch_minutes == 0.0 {
                return;
            }
            let period = Duration::from_secs_f64(state.config.epoch_minutes * 60.0);
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = state.settlement.post_epoch(&state.db).await {
                    tracing::error!("posting an epoch: {e}");
                }
            }
        });
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                match state.referee_one().await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::error!("refereeing: {e}"),
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), state.referee_wake.notified())
                    .await;
            }
        });
    }

    // ----- deciding and committing -----

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("the scheduler's book lock")
    }

    /// Runs `decide` on the book and appends its writes to the journal under the same lock,
    /// then waits for their commit and only then acts on the effects (receipts, wake-ups).
    async fn decide<T>(&self, decide: impl FnOnce(&mut Book, &Ctx) -> (T, Effects)) -> Result<T> {
        let (value, pending, effects) = {
            let output_dim = |task: &Task| self.output_dim(task);
            let ctx = Ctx {
                config: &self.config,
                now: now_ms(),
                identity: &self.identity,
                metrics: &self.metrics,
                output_dim: &output_dim,
            };
            let mut book = self.book();
            let (value, mut effects) = decide(&mut book, &ctx);
            // Every index agrees with what it indexes, after every decision (debug builds:
            // it walks the whole book).
            #[cfg(debug_assertions)]
            book.check_invariants();
            let pending = self.journal.append(std::mem::take(&mut effects.writes));
            (value, pending, effects)
        };
        self.commit(pending).await?;
        if !effects.receipts.is_empty() {
            self.push(effects.receipts);
        }
        if effects.job_done {
            self.job_done.notify_waiters();
        }
        if effects.referee {
            self.referee_wake.notify_one();
        }
        for liar in effects.caught {
            self.audit_units_of(liar);
        }
        Ok(value)
    }

    /// Waits for a journal entry; after a failed batch, reloads the book from the database
    /// (memory holds decisions the database refused) before the journal takes entries again.
    async fn commit(&self, pending: Pending) -> Result<()> {
        let Err(e) = pending.committed().await else {
            return Ok(());
        };
        let mut reloaded = self.reloaded_after.lock().await;
        if *reloaded < e.failure {
            match Book::load(&self.db).await {
                Ok(fresh) => {
                    let mut book = self.book();
                    *book = fresh;
                    self.journal.reset();
                    *reloaded = e.failure;
                    tracing::warn!("the scheduler reloaded its state from the database");
                }
                Err(load) => tracing::error!("reloading the scheduler's state: {load}"),
            }
        }
        Err(e.into())
    }

    /// The models served now (a request keeps the one it started with).
    pub fn registry(&self) -> Arc<Registry> {
        self.models.current()
    }

    // ----- sessions -----

    pub fn attach(
        &self,
        worker: PublicKey,
        tx: mpsc::UnboundedSender<ToWorker>,
        takes: Arc<Takes>,
    ) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .entry(worker)
            .or_default()
            .push((tx, takes));
        self.metrics
            .workers_connected
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn detach(&self, worker: &PublicKey) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(list) = sessions.get_mut(worker) {
            list.retain(|(tx, _)| !tx.is_closed());
            if list.is_empty() {
                sessions.remove(worker);
            }
        }
        self.metrics
            .workers_connected
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Session senders held for pushing receipts (for `/metrics`): the sessions open now, and
    /// never more once they have closed (finding 5: each closed session's sender stayed).
    pub fn session_senders(&self) -> usize {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Whether a session open now would be leased `task` (its precision taken, its model
    /// within the worker's budget): `None` when no worker is connected at all.
    pub fn some_worker_takes(&self, task: &Task) -> Option<Result<(), Unplaceable>> {
        let sessions = self.sessions.lock().expect("sessions lock");
        let mut takes = sessions
            .values()
            .flatten()
            .map(|(_, takes)| takes)
            .peekable();
        takes.peek()?;
        let mut largest_budget_mb = Some(0u32);
        let mut precision_taken = false;
        for t in takes {
            if t.admits(task) {
                return Some(Ok(()));
            }
            if t.precisions.contains(&task.precision()) {
                precision_taken = true;
                // Not unlimited (0), or it would have admitted the task.
                largest_budget_mb = largest_budget_mb.map(|m| m.max(t.max_model_mb));
            }
        }
        Some(Err(Unplaceable {
            precision: task.precision(),
            model_mb: task.model().bytes().div_ceil(1 << 20),
            largest_budget_mb: largest_budget_mb.filter(|_| precision_taken),
        }))
    }

    fn push(&self, receipts: Vec<Receipt>) {
        let sessions = self.sessions.lock().expect("sessions lock");
        for r in receipts {
            if let Some(list) = sessions.get(&r.worker) {
                for (tx, _) in list {
                    let _ = tx.send(ToWorker::Credited(r.clone()));
                }
            }
        }
    }

    // ----- workers -----

    /// Records a login from `network` (an address's /24 or /48, `--local` or not); returns the
    /// worker's verified credit, or why it is refused and whether trying again later may help.
    /// A key never seen before takes one of its network's `new_keys_per_minute` (keys are
    /// free: each new one is a row and a probation's worth of referee work).
    pub async fn login(
        &self,
        worker: &PublicKey,
        agent: &str,
        network: &str,
    ) -> Result<Result<u64, (String, bool)>> {
        let key = worker.to_hex();
        let known = self.book().worker(&key).is_some()
            || sqlx::query("SELECT 1 FROM workers WHERE key = $1")
                .bind(&key)
                .fetch_optional(&self.db.pool)
                .await?
                .is_some();
        if !known && !self.new_key_allowed(network) {
            self.metrics.logins_limited.fetch_add(1, Ordering::Relaxed);
            return Ok(Err((
                format!(
                    "too many new worker keys from your network ({} a minute); keep your key file and log in again in a minute",
                    self.config.new_keys_per_minute
                ),
                true,
            )));
        }
        let seen = Write::WorkerSeen {
            key: key.clone(),
            agent: agent.to_string(),
            now_ms: now_ms(),
        };
        let pending = self.journal.append(vec![seen]);
        self.commit(pending).await?;
        let record = self.known_worker(&key).await?;
        if record.banned {
            return Ok(Err((
                format!(
                    "this worker key is banned after {} wrong or abandoned results",
                    record.strikes
                ),
                false,
            )));
        }
        Ok(Ok(self.credit_of_worker(&key).await? as u64))
    }

    /// Takes one of `network`'s logins of new keys for this minute, if any is left.
    fn new_key_allowed(&self, network: &str) -> bool {
        let minute = now_ms() / 60_000;
        let mut logins = self.new_key_logins.lock().expect("login limiter lock");
        if logins.len() >= MAX_LIMITED_NETWORKS && !logins.contains_key(network) {
            // Bounded memory: forget the networks of earlier minutes; when this minute alone
            // has that many (an IPv6 attacker has networks to spare), new ones wait.
            logins.retain(|_, (m, _)| *m == minute);
            if logins.len() >= MAX_LIMITED_NETWORKS {
                return false;
            }
        }
        let entry = logins.entry(network.to_string()).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        if entry.1 >= self.config.new_keys_per_minute {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// The standing of a logged-in worker, loaded into the book if it is not there (after a
    /// login, or after the book was reloaded while the worker stayed connected).
    async fn known_worker(&self, key: &str) -> Result<book::WorkerRecord> {
        if let Some(r) = self.book().worker(key) {
            return Ok(r.clone());
        }
        let row = sqlx::query(
            "SELECT verified, clean_streak, strikes, expired, banned FROM workers WHERE key = $1",
        )
        .bind(key)
        .fetch_one(&self.db.pool)
        .await?;
        let loaded = book::worker_from_row(&row)?;
        Ok(self.book().add_worker(key, loaded).clone())
    }

    async fn credit_of_worker(&self, key: &str) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT CAST(COALESCE(SUM(credit_micro), 0) AS BIGINT) AS c FROM credits WHERE worker = $1",
        )
        .bind(key)
        .fetch_one(&self.db.pool)
        .await?
        .try_get("c")?)
    }

    pub async fn link_payout(&self, worker: &PublicKey, address: &Address) -> Result<()> {
        let pending = self.journal.append(vec![Write::Payout {
            key: worker.to_hex(),
            address: format!("0x{}", address.to_hex()),
        }]);
        self.commit(pending).await
    }

    // ----- jobs -----

    /// Creates `job` of `tasks` (each with its credit in millionths), or returns the existing
    /// job with the same idempotency key; refused when that key's job was made from another
    /// request (its fingerprint differs) or the owner has too many units queued.
    pub async fn create_job(
        &self,
        job: NewJob<'_>,
        tasks: Vec<(Task, i64)>,
    ) -> Result<Result<String, JobRefused>> {
        let _w = self.db.write().await;
        match self.admit(&job, tasks.len() as u64).await? {
            Ok(Some(existing)) => return Ok(Ok(existing)),
            Ok(None) => {}
            Err(refused) => return Ok(Err(refused)),
        }
        let NewJob {
            kind,
            precision,
            owner,
            assurance,
            ..
        } = job;
        let pool = self.db.api_key_pool(owner).await?.map(Arc::new);
        let id = random_id(kind);
        let now = now_ms();
        let units: Vec<Unit> = tasks
            .into_iter()
            .enumerate()
            .map(|(idx, (task, credit))| {
                Unit::new(
                    ordered_id("unit"),
                    id.clone(),
                    now * 4096 + idx as i64,
                    task,
                    credit,
                    assurance,
                    &self.config,
                )
                .with_pool(pool.clone())
            })
            .collect();
        let mut tx = self.db.pool.begin().await?;
        insert_pool(&mut tx, &id, pool.as_deref()).await?;
        insert_job_row(&mut tx, &id, &job, units.len() as i64, now).await?;
        book::insert_units(&mut tx, self.db.flavor, &id, precision, &units).await?;
        tx.commit().await?;
        self.book().add_job(&id, units);
        self.metrics.jobs_created.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(id))
    }

    /// Whether `job` (of `units` units) may be created: `Some(id)` when its idempotency key
    /// names a job made from the same request (a retry), a refusal when it names another
    /// request's or the owner's quotas are full. Called under the database write lock.
    async fn admit(
        &self,
        job: &NewJob<'_>,
        units: u64,
    ) -> Result<Result<Option<String>, JobRefused>> {
        if let Some(k) = job.idempotency_key
            && let Some(row) =
                sqlx::query("SELECT id, fingerprint FROM jobs WHERE idempotency_key = $1")
                    .bind(k)
                    .fetch_optional(&self.db.pool)
                    .await?
        {
            let id: String = row.try_get("id")?;
            let stored: Option<String> = row.try_get("fingerprint")?;
            return Ok(match (stored.as_deref(), job.fingerprint) {
                (Some(a), Some(b)) if a != b => Err(JobRefused::Conflict(id)),
                _ => Ok(Some(id)),
            });
        }
        let queued: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(units_total - units_verified), 0) AS BIGINT) AS q FROM jobs WHERE owner = $1 AND status = 'running'",
        )
        .bind(job.owner)
        .fetch_one(&self.db.pool)
        .await?
        .try_get("q")?;
        if queued as u64 + units > self.config.max_queued_units {
            return Ok(Err(JobRefused::Quota {
                queued: queued as u64,
                limit: self.config.max_queued_units,
            }));
        }
        if job.assurance == Assurance::Referee {
            // Each such unit costs the coordinator's own compute: a quota of its own.
            let refereed: i64 = sqlx::query(
                "SELECT COUNT(*) AS q FROM units WHERE assurance = 'referee' AND status <> 'verified'
                 AND job_id IN (SELECT id FROM jobs WHERE owner = $1 AND status = 'running')",
            )
            .bind(job.owner)
            .fetch_one(&self.db.pool)
            .await?
            .try_get("q")?;
            if refereed as u64 + units > self.config.max_referee_units {
                return Ok(Err(JobRefused::RefereeQuota {
                    queued: refereed as u64,
                    limit: self.config.max_referee_units,
                }));
            }
        }
        Ok(Ok(None))
    }

    /// The job and unit rows of a pipeline session. The unit's status is `pipeline`, which
    /// no grant or restart looks at: the session driver settles it ([`Self::settle_session`]).
    pub async fn create_pipeline_job(
        &self,
        job: NewJob<'_>,
        task: &Task,
        credit_micro: i64,
    ) -> Result<Result<PipelineCreated, JobRefused>> {
        let pool = self.db.api_key_pool(job.owner).await?;
        let _w = self.db.write().await;
        match self.admit(&job, 1).await? {
            Ok(Some(existing)) => return Ok(Ok(PipelineCreated::Existing(existing))),
            Ok(None) => {}
            Err(refused) => return Ok(Err(refused)),
        }
        let id = random_id(job.kind);
        let unit = ordered_id("unit");
        let now = now_ms();
        let mut tx = self.db.pool.begin().await?;
        insert_job_row(&mut tx, &id, &job, 1, now).await?;
        sqlx::query(
            "INSERT INTO units (id, job_id, idx, seq, precision, task, digest, credit_micro, replicas, quorum, live, status, output, output_hash, verified_by, verified_ms, audit, assurance)
             VALUES ($1, $2, 0, $3, $4, $5, $6, $7, 0, 0, 0, 'pipeline', NULL, NULL, NULL, NULL, 0, $8)",
        )
        .bind(&unit)
        .bind(&id)
        .bind(now * 4096)
        .bind(job.precision.as_str())
        .bind(B64.encode(tabula_protocol::encode(task)))
        .bind(task.digest().to_hex())
        .bind(credit_micro)
        .bind(job.assurance.as_str())
        .execute(&mut *tx)
        .await?;
        insert_pool(&mut tx, &id, pool.as_ref()).await?;
        tx.commit().await?;
        self.metrics.jobs_created.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(PipelineCreated::New(PipelineJob {
            job: id,
            unit,
            pool: pool.map(|p| {
                p.iter()
                    .filter_map(|k| PublicKey::from_hex(k).ok())
                    .collect()
            }),
        })))
    }

    /// Settles a finished pipeline session: its output, its job, its members' credit.
    pub async fn settle_session(&self, s: SessionSettlement) -> Result<()> {
        let leases: Vec<LeaseId> = s
            .credits
            .iter()
            .map(|_| tabula_protocol::Bytes(crate::db::random_bytes::<16>()))
            .collect();
        self.decide(|book, ctx| ((), book.settle_session(ctx, &s, &leases)))
            .await
    }

    /// Marks a pipeline session's job failed: its session ended without a result (or the
    /// coordinator restarted under it: sessions live in memory only).
    pub async fn fail_pipeline_job(&self, job_id: &str, why: &str) -> Result<()> {
        tracing::warn!(job = job_id, "pipeline job failed: {why}");
        let _w = self.db.write().await;
        sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_ms = $1 WHERE id = $2 AND status = 'running'",
        )
        .bind(now_ms())
        .bind(job_id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records how a finished pipeline session ran, for `/v1/jobs`.
    pub async fn record_session(&self, job_id: &str, row: [i64; 7]) -> Result<()> {
        let _w = self.db.write().await;
        sqlx::query(
            "INSERT INTO pipeline_sessions (job_id, stages, pipelines, links_direct, links_relayed, disputes, liars, rebuilds)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job_id)
        .bind(row[0])
        .bind(row[1])
        .bind(row[2])
        .bind(row[3])
        .bind(row[4])
        .bind(row[5])
        .bind(row[6])
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Whether `key` has the clean record (`--solo-after`) that lets a pipeline of such
    /// workers run alone, spot-checked.
    pub fn long_clean(&self, key: &PublicKey) -> bool {
        self.book()
            .worker(&key.to_hex())
            .is_some_and(|w| !w.banned && w.clean_streak >= i64::from(self.config.solo_after))
    }

    /// Strikes a stage member caught lying (banned if it had nothing verified).
    pub async fn strike_stage_liar(&self, key: &PublicKey) -> Result<()> {
        let key = key.to_hex();
        self.decide(|book, ctx| ((), book.strike_stage_liar(ctx, &key)))
            .await
    }

    /// The status of a job (`running` or `done`), if it exists.
    pub async fn job_status(&self, id: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?
            .map(|row| row.try_get("status"))
            .transpose()?)
    }

    /// How many of `ids` are done: one query per 500 jobs, not one per job (a batch of
    /// 50 000 lines is checked on every `GET /v1/batches/{id}`).
    pub async fn jobs_done(&self, ids: &[&str]) -> Result<usize> {
        let mut done = 0;
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT COUNT(*) AS n FROM jobs WHERE status = 'done' AND id IN ({})",
                crate::journal::parameter_list(self.db.flavor.first_parameter(), chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            let n: i64 = q.fetch_one(&self.db.pool).await?.try_get("n")?;
            done += usize::try_from(n).unwrap_or(0);
        }
        Ok(done)
    }

    /// The most recent jobs of `owner` (at most `limit`), newest first, with their progress.
    pub async fn recent_jobs(&self, owner: &str, limit: i64) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT id, kind, model, precision, status, units_total, units_verified, created_ms, finished_ms,
                    p.stages, p.pipelines, p.links_direct, p.links_relayed, p.disputes, p.liars, p.rebuilds
             FROM jobs LEFT JOIN pipeline_sessions p ON p.job_id = jobs.id
             WHERE owner = $1 ORDER BY created_ms DESC, id LIMIT $2",
        )
        .bind(owner)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "object": "job",
                    "id": r.try_get::<String, _>("id")?,
                    "kind": r.try_get::<String, _>("kind")?,
                    "model": r.try_get::<String, _>("model")?,
                    "precision": r.try_get::<String, _>("precision")?,
                    "status": r.try_get::<String, _>("status")?,
                    "units_total": r.try_get::<i64, _>("units_total")?,
                    "units_verified": r.try_get::<i64, _>("units_verified")?,
                    "created_ms": r.try_get::<i64, _>("created_ms")?,
                    "finished_ms": r.try_get::<Option<i64>, _>("finished_ms")?,
                    "pipeline": match r.try_get::<Option<i64>, _>("stages")? {
                        None => serde_json::Value::Null,
                        Some(stages) => serde_json::json!({
                            "stages": stages,
                            "pipelines": r.try_get::<Option<i64>, _>("pipelines")?,
                            "links_direct": r.try_get::<Option<i64>, _>("links_direct")?,
                            "links_relayed": r.try_get::<Option<i64>, _>("links_relayed")?,
                            "disputes": r.try_get::<Option<i64>, _>("disputes")?,
                            "liars": r.try_get::<Option<i64>, _>("liars")?,
                            "rebuilds": r.try_get::<Option<i64>, _>("rebuilds")?,
                        }),
                    },
                }))
            })
            .collect()
    }

    /// The verified outputs of a finished job, in unit order.
    pub async fn job_outputs(&self, id: &str) -> Result<Vec<UnitOutput>> {
        let rows = sqlx::query("SELECT output FROM units WHERE job_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let output: Option<String> = r.try_get("output")?;
                let bytes = decode_b64(&output.ok_or_else(|| {
                    CoordinatorError::Corrupt("a unit of a finished job has no output".into())
                })?)?;
                UnitOutput::decode(&bytes).map_err(|e| CoordinatorError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Waits until job `id` is done (or `timeout`); returns whether it is.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.job_done.notified();
            match self.job_status(id).await? {
                Some(status) if status == "done" => return Ok(true),
                Some(status) if status == "failed" => return Ok(false),
                Some(_) => {}
                None => return Ok(false),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
    }

    // ----- leases -----

    /// Leases up to `units` units to `worker` (from network `prefix`) in one decision: fewer,
    /// or none, when nothing more is open for it.
    pub async fn grant(
        &self,
        worker: &PublicKey,
        prefix: &str,
        takes: &Takes,
        units: usize,
    ) -> Result<Vec<Assignment>> {
        let key = worker.to_hex();
        self.known_worker(&key).await?;
        self.decide(|book, ctx| {
            let mut granted = Vec::new();
            let mut effects = Effects::default();
            while granted.len() < units {
                let Some((assignment, more)) = book.grant(ctx, &key, prefix, takes) else {
                    break;
                };
                granted.push(assignment);
                effects.absorb(more);
            }
            (granted, effects)
        })
        .await
    }

    /// Gives a lease back unfinished: the unit is re-issued at once, without penalty.
    pub async fn release(&self, worker: &PublicKey, lease: &LeaseId) -> Result<()> {
        let key = worker.to_hex();
        self.decide(|book, ctx| ((), book.release(ctx, &key, lease)))
            .await
    }

    /// Marks the active leases of `worker` as orphaned: its connection ended without an answer
    /// (a volunteer closed the tab, a network dropped). They stay active, so a native worker
    /// that reconnects can still submit, but expiring them is not held against the worker.
    /// A hoarder gains nothing from this: it earns no credit, and to orphan a lease it has to
    /// drop and redo its login.
    pub async fn orphan_leases(&self, worker: &PublicKey) -> Result<()> {
        let key = worker.to_hex();
        self.decide(|book, ctx| ((), book.orphan(ctx, &key))).await
    }

    /// Expires overdue leases: their units go to other workers, and the holder takes a strike
    /// unless its connection had ended (an orphaned lease: the streak still resets).
    pub async fn expire_leases(&self) -> Result<()> {
        self.decide(|book, ctx| ((), book.expire(ctx))).await
    }

    // ----- results -----

    /// Checks and stores results of `worker` in one decision, then advances their units.
    /// The verdicts are in the order of `results`.
    pub async fn submit(&self, worker: &SignerKey, results: &[Submission]) -> Result<Vec<Verdict>> {
        self.metrics
            .results_submitted
            .fetch_add(results.len() as u64, Ordering::Relaxed);
        let key = worker.public().to_hex();
        self.known_worker(&key).await?;
        // The expensive checks (hash and ed25519, the run of results at once) run outside
        // the lock.
        let signatures: Vec<_> = worker
            .verify_results(results)
            .into_iter()
            .map(|checked| checked.map_err(|e| e.to_string()))
            .collect();
        let decided = self
            .decide(|book, ctx| {
                let mut effects = Effects::default();
                let verdicts = results
                    .iter()
                    .zip(signatures)
                    .map(
                        |(s, signature)| match book.submit(ctx, &key, s, signature) {
                            SubmitOutcome::Decided(v, more) => {
                                effects.absorb(more);
                                Some(v)
                            }
                            SubmitOutcome::NotInMemory => None,
                        },
                    )
                    .collect::<Vec<_>>();
                (verdicts, effects)
            })
            .await?;
        let mut verdicts = Vec::with_capacity(results.len());
        for (s, verdict) in results.iter().zip(decided) {
            verdicts.push(match verdict {
                Some(v) => v,
                None => self.reject_stale(&key, s).await?,
            });
        }
        Ok(verdicts)
    }

    /// The verdict on a result whose lease is no longer in memory: finished long ago, or never
    /// issued.
    async fn reject_stale(&self, key: &str, s: &Submission) -> Result<Verdict> {
        let row = sqlx::query("SELECT worker, state FROM leases WHERE id = $1")
            .bind(s.lease.to_hex())
            .fetch_optional(&self.db.pool)
            .await?;
        let (reason, strike) = match row {
            None => ("unknown lease".to_string(), true),
            Some(r) if r.try_get::<String, _>("worker")? != key => {
                ("this lease belongs to another worker".to_string(), true)
            }
            Some(r) => (
                format!("the lease is {}", r.try_get::<String, _>("state")?),
                false,
            ),
        };
        self.decide(|book, ctx| book.reject(ctx, key, &reason, strike))
            .await
    }

    fn output_dim(&self, task: &Task) -> usize {
        match self.registry().find(&task.model().name).map(|m| &m.kind) {
            Some(crate::models::ModelKind::Embedding { dim, .. }) => *dim,
            _ => 0,
        }
    }

    /// Audits, in the background, the units a caught liar was credited for inside the audit
    /// window (its newest 4 096, what the audit queue holds): the liar's partners in wrong
    /// quorums are caught in turn.
    fn audit_units_of(&self, liar: String) {
        let Some(state) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let since = now_ms() - state.config.audit_window_ms as i64;
            let result = async {
                let (ids, units, leases) =
                    book::load_for_audit(&state.db, &liar, since, 4_096).await?;
                let n = ids.len();
                state
                    .decide(|book, _| ((), book.add_for_audit(&ids, units, leases)))
                    .await?;
                Ok::<_, CoordinatorError>(n)
            }
            .await;
            match result {
                Ok(n) => tracing::warn!(worker = liar, units = n, "auditing a caught liar's units"),
                Err(e) => tracing::error!(worker = liar, "loading a caught liar's units: {e}"),
            }
        });
    }

    /// Computes `task` on the referee (the coordinator's own executor, one task at a time,
    /// shared with unit refereeing): a pipeline session under `referee` assurance or audited.
    pub async fn execute_as_referee(&self, task: Task) -> Result<UnitOutput> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.referee.submit(
            task,
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
        )?;
        Ok(answer
            .await
            .map_err(|_| CoordinatorError::Config("the referee thread stopped".into()))??)
    }

    /// Re-executes one unit waiting for the referee (or an audit). Returns whether there was
    /// one.
    async fn referee_one(&self) -> Result<bool> {
        let Some(job) = self.book().next_for_referee() else {
            return Ok(false);
        };
        tracing::info!(unit = %job.unit, work = ?job.work, "refereeing");
        let output = self.execute_as_referee(job.task.clone()).await?.encode();
        let hash = tabula_protocol::sha256(&output).to_hex();
        let judged = self
            .decide(|book, ctx| match book.judged(ctx, &job, output, hash) {
                Some(effects) => (true, effects),
                None => (false, Effects::default()),
            })
            .await?;
        // Audits have their own counter (`units_audited`).
        if judged && job.work == book::RefereeWork::Dispute {
            self.metrics.units_refereed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Units held in the scheduler's memory (for `/metrics`).
    pub fn units_in_memory(&self) -> usize {
        self.book().units_in_memory()
    }

    /// Units waiting for the referee: disputes, then audits (for `/metrics`).
    pub fn referee_backlog(&self) -> (usize, usize) {
        self.book().referee_backlog()
    }

    /// The journal's commit counters (for `/metrics`).
    pub fn journal_stats(&self) -> &crate::journal::JournalStats {
        &self.journal.stats
    }

    // ----- ledger -----

    /// The ledger entry of a worker key or a payout address (`0x…`).
    pub async fn ledger(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let (filter, value) = if let Ok(key) = PublicKey::from_hex(id) {
            ("w.key = $1", key.to_hex())
        } else if id.starts_with("0x") && Address::from_hex(id).is_ok() {
            ("w.payout = $1", id.to_ascii_lowercase())
        } else {
            return Ok(None);
        };
        let workers = sqlx::query(&format!(
            "SELECT w.key, w.payout, w.agent, w.verified, w.strikes, w.expired, w.banned, w.clean_streak FROM workers w WHERE {filter}"
        ))
        .bind(&value)
        .fetch_all(&self.db.pool)
        .await?;
        if workers.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::new();
        let (mut verified_total, mut pending_total) = (0i64, 0i64);
        for w in &workers {
            let key: String = w.try_get("key")?;
            let verified = self.credit_of_worker(&key).await?;
            let pending: i64 = sqlx::query(
                "SELECT CAST(COALESCE(SUM(u.credit_micro), 0) AS BIGINT) AS c FROM leases l JOIN units u ON u.id = l.unit_id WHERE l.worker = $1 AND l.state = 'submitted'",
            )
            .bind(&key)
            .fetch_one(&self.db.pool)
            .await?
            .try_get("c")?;
            let receipts = sqlx::query(
                "SELECT receipt FROM credits WHERE worker = $1 ORDER BY issued_ms DESC LIMIT 100",
            )
            .bind(&key)
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(|r| {
                let text: String = r.try_get("receipt")?;
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|e| CoordinatorError::Corrupt(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
            verified_total += verified;
            pending_total += pending;
            entries.push(serde_json::json!({
                "worker": key,
                "payout_address": w.try_get::<Option<String>, _>("payout")?,
                "agent": w.try_get::<String, _>("agent")?,
                "verified_credit": verified as f64 / 1e6,
                "verified_credit_micro": verified,
                "pending_credit": pending as f64 / 1e6,
                "units_verified": w.try_get::<i64, _>("verified")?,
                "strikes": w.try_get::<i64, _>("strikes")?,
                "expired_leases": w.try_get::<i64, _>("expired")?,
                "banned": w.try_get::<i64, _>("banned")? != 0,
                "recent_receipts": receipts,
            }));
        }
        Ok(Some(serde_json::json!({
            "object": "ledger_entry",
            "id": id,
            "verified_credit": verified_total as f64 / 1e6,
            "verified_credit_micro": verified_total,
            "pending_credit": pending_total as f64 / 1e6,
            "coordinator_key": self.identity.public().to_hex(),
            "workers": entries,
        })))
    }

    /// Every worker with its credit.
    pub async fn ledger_list(&self) -> Result<serde_json::Value> {
        let rows = sqlx::query(
            "SELECT w.key, w.payout, w.verified, w.strikes, w.banned,
                CAST(COALESCE((SELECT SUM(c.credit_micro) FROM credits c WHERE c.worker = w.key), 0) AS BIGINT) AS credit
             FROM workers w ORDER BY credit DESC LIMIT 1000",
        )
        .fetch_all(&self.db.pool)
        .await?;
        let data = rows
            .iter()
            .map(|r| {
                let credit: i64 = r.try_get("credit")?;
                Ok(serde_json::json!({
                    "worker": r.try_get::<String, _>("key")?,
                    "payout_address": r.try_get::<Option<String>, _>("payout")?,
                    "verified_credit": credit as f64 / 1e6,
                    "units_verified": r.try_get::<i64, _>("verified")?,
                    "strikes": r.try_get::<i64, _>("strikes")?,
                    "banned": r.try_get::<i64, _>("banned")? != 0,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(serde_json::json!({ "object": "list", "data": data }))
    }
}

/// A session open now: where its pushes go, and what its worker takes.
type Attached = (mpsc::UnboundedSender<ToWorker>, Arc<Takes>);

/// Why no connected worker would be leased a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unplaceable {
    pub precision: Precision,
    /// The size of the task's model files.
    pub model_mb: u64,
    /// The largest `--max-model-mb` among the workers that take this precision (`None`:
    /// no connected worker takes it).
    pub largest_budget_mb: Option<u32>,
}

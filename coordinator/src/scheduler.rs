//! Jobs, units, leases, verification and credit: every state change is one database
//! transaction, so a `kill -9` at any point leaves either the old state or the new one.
//!
//! The life of a unit: `open` (leased to up to `replicas` distinct workers: distinct keys and
//! network prefixes) → results arrive and are grouped by agreement → a group of `quorum`
//! results with at least one trusted member makes it `verified` (agreeing workers are
//! credited, the others struck); all results in without a quorum adds a replica, up to
//! `max_replicas`, then `referee`: the coordinator re-executes it and its output is the
//! canonical one. A quorum of untrusted (probationary) workers is refereed too.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use sqlx::{Any, Row, Transaction};
use tabula_engine::cpu::CpuBackend;
use tabula_protocol::{
    Address, Assignment, Hash, Identity, LeaseId, Precision, PublicKey, Receipt, Submission, Task,
    ToWorker, UnitOutput,
};
use tabula_worker::{Executor, exec::ExecutorThread};
use tokio::sync::{Notify, mpsc};

use crate::{
    Config, CoordinatorError,
    db::{Db, now_ms, random_bytes, random_id, random_unit},
    models::{Registry, RegistryFiles},
};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub leases_granted: AtomicU64,
    pub leases_canary: AtomicU64,
    pub units_solo: AtomicU64,
    pub leases_expired: AtomicU64,
    pub leases_released: AtomicU64,
    pub results_submitted: AtomicU64,
    pub results_rejected: AtomicU64,
    pub results_wrong: AtomicU64,
    pub units_verified: AtomicU64,
    pub units_refereed: AtomicU64,
    pub workers_connected: AtomicU64,
    pub jobs_created: AtomicU64,
}

pub struct State {
    pub config: Config,
    pub db: Db,
    pub identity: Identity,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// Woken whenever a unit is verified (requests waiting for their jobs look again).
    pub progress: Notify,
    referee_wake: Notify,
    referee: ExecutorThread,
    /// The credit contract and the settled ledger.
    pub settlement: Arc<crate::settlement::Settlement>,
    /// Connected sessions by worker key, for pushing receipts.
    sessions: Mutex<HashMap<PublicKey, Vec<mpsc::UnboundedSender<ToWorker>>>>,
}

/// What happened to a submitted result.
pub enum Verdict {
    /// Stored; credited once the unit is verified.
    Accepted,
    Rejected(String),
}

struct UnitRow {
    id: String,
    job_id: String,
    task: Task,
    digest: Hash,
    credit_micro: i64,
    replicas: i64,
    quorum: i64,
    status: String,
    output_hash: Option<String>,
    output: Option<Vec<u8>>,
}

struct ResultRow {
    lease: String,
    worker: String,
    output_hash: String,
    output: Vec<u8>,
}

/// A PostgreSQL deadlock or serialisation failure: the transaction rolled back and can run
/// again.
fn is_transient(e: &CoordinatorError) -> bool {
    match e {
        CoordinatorError::Db(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

fn decode_b64(s: &str) -> Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|e| CoordinatorError::Corrupt(format!("base64: {e}")))
}

fn decode_task(s: &str) -> Result<Task> {
    postcard_task(&decode_b64(s)?)
}

/// The assignment of `lease` on the unit in `row` (its `task` and `digest` columns).
fn assignment(row: &sqlx::any::AnyRow, lease: LeaseId, deadline_ms: i64) -> Result<Assignment> {
    Ok(Assignment {
        lease,
        unit: Hash::from_hex(&row.try_get::<String, _>("digest")?)
            .map_err(|e| CoordinatorError::Corrupt(e.to_string()))?,
        deadline_ms: deadline_ms as u64,
        task: decode_task(&row.try_get::<String, _>("task")?)?,
    })
}

fn postcard_task(bytes: &[u8]) -> Result<Task> {
    tabula_protocol::decode(bytes, usize::MAX)
        .map_err(|e| CoordinatorError::Corrupt(format!("stored task: {e}")))
}

impl State {
    pub fn new(
        config: Config,
        db: Db,
        identity: Identity,
        registry: Arc<Registry>,
        settlement: Arc<crate::settlement::Settlement>,
    ) -> Arc<Self> {
        let files: Arc<dyn tabula_worker::FileSource + Send + Sync> =
            Arc::new(RegistryFiles(registry.clone()));
        let referee = ExecutorThread::spawn(|| Ok(Executor::new(CpuBackend)), files);
        Arc::new(Self {
            config,
            db,
            identity,
            registry,
            metrics: Metrics::default(),
            progress: Notify::new(),
            referee_wake: Notify::new(),
            referee,
            settlement,
            sessions: Mutex::new(HashMap::new()),
        })
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

    // ----- sessions -----

    pub fn attach(&self, worker: PublicKey, tx: mpsc::UnboundedSender<ToWorker>) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .entry(worker)
            .or_default()
            .push(tx);
        self.metrics
            .workers_connected
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn detach(&self, worker: &PublicKey) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(list) = sessions.get_mut(worker) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                sessions.remove(worker);
            }
        }
        self.metrics
            .workers_connected
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn push(&self, receipts: Vec<Receipt>) {
        let sessions = self.sessions.lock().expect("sessions lock");
        for r in receipts {
            if let Some(list) = sessions.get(&r.worker) {
                for tx in list {
                    let _ = tx.send(ToWorker::Credited(r.clone()));
                }
            }
        }
    }

    // ----- workers -----

    /// Records a login; returns the worker's verified credit, or why it is refused.
    pub async fn login(&self, worker: &PublicKey, agent: &str) -> Result<Result<u64, String>> {
        let key = worker.to_hex();
        let now = now_ms();
        {
            let _w = self.db.write().await;
            sqlx::query(
                "INSERT INTO workers (key, payout, agent, verified, clean_streak, strikes, expired, banned, first_seen_ms, last_seen_ms)
                 VALUES ($1, NULL, $2, 0, 0, 0, 0, 0, $3, $3)
                 ON CONFLICT (key) DO UPDATE SET agent = $2, last_seen_ms = $3",
            )
            .bind(&key)
            .bind(agent)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        }
        let row = sqlx::query("SELECT banned, strikes FROM workers WHERE key = $1")
            .bind(&key)
            .fetch_one(&self.db.pool)
            .await?;
        if row.try_get::<i64, _>("banned")? != 0 {
            return Ok(Err(format!(
                "this worker key is banned after {} wrong or abandoned results",
                row.try_get::<i64, _>("strikes")?
            )));
        }
        Ok(Ok(self.credit_of_worker(&key).await? as u64))
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
        let _w = self.db.write().await;
        sqlx::query("UPDATE workers SET payout = $1 WHERE key = $2")
            .bind(format!("0x{}", address.to_hex()))
            .bind(worker.to_hex())
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    // ----- jobs -----

    /// Creates a job of `tasks` (each with its credit in millionths), or returns the existing
    /// job with the same idempotency key.
    pub async fn create_job(
        &self,
        kind: &str,
        model: &str,
        precision: Precision,
        tasks: Vec<(Task, i64)>,
        idempotency_key: Option<&str>,
    ) -> Result<String> {
        let _w = self.db.write().await;
        if let Some(k) = idempotency_key
            && let Some(row) = sqlx::query("SELECT id FROM jobs WHERE idempotency_key = $1")
                .bind(k)
                .fetch_optional(&self.db.pool)
                .await?
        {
            return Ok(row.try_get("id")?);
        }
        let id = random_id(kind);
        let now = now_ms();
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, kind, model, precision, idempotency_key, units_total, units_verified, status, created_ms, finished_ms)
             VALUES ($1, $2, $3, $4, $5, $6, 0, 'running', $7, NULL)",
        )
        .bind(&id)
        .bind(kind)
        .bind(model)
        .bind(precision.as_str())
        .bind(idempotency_key)
        .bind(tasks.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for (idx, (task, credit)) in tasks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO units (id, job_id, idx, seq, precision, task, digest, credit_micro, replicas, quorum, live, status, output, output_hash, verified_by, verified_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 'open', NULL, NULL, NULL, NULL)",
            )
            .bind(random_id("unit"))
            .bind(&id)
            .bind(idx as i64)
            .bind(now * 4096 + idx as i64)
            .bind(precision.as_str())
            .bind(B64.encode(tabula_protocol::encode(task)))
            .bind(task.digest().to_hex())
            .bind(*credit)
            .bind(i64::from(self.config.replicas))
            .bind(i64::from(self.config.replicas.min(2)))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.metrics.jobs_created.fetch_add(1, Ordering::Relaxed);
        Ok(id)
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

    /// The most recent jobs (at most `limit`), newest first, with their progress.
    pub async fn recent_jobs(&self, limit: i64) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT id, kind, model, precision, status, units_total, units_verified, created_ms, finished_ms
             FROM jobs ORDER BY created_ms DESC, id LIMIT $1",
        )
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
            let notified = self.progress.notified();
            match self.job_status(id).await? {
                Some(status) if status == "done" => return Ok(true),
                Some(_) => {}
                None => return Ok(false),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            // Another coordinator sharing the database does not wake us: poll as well.
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
    }

    // ----- leases -----

    fn precision_list(precisions: &[Precision]) -> String {
        let list: Vec<String> = precisions
            .iter()
            .map(|p| format!("'{}'", p.as_str()))
            .collect();
        if list.is_empty() {
            "''".into()
        } else {
            list.join(", ")
        }
    }

    /// Leases a unit to `worker` (from network `prefix`), or `None` when nothing is open for it.
    pub async fn grant(
        &self,
        worker: &PublicKey,
        prefix: &str,
        precisions: &[Precision],
    ) -> Result<Option<Assignment>> {
        let mut attempt = 0;
        loop {
            match self.grant_once(worker, prefix, precisions).await {
                Err(e) if attempt < 5 && is_transient(&e) => attempt += 1,
                other => return other,
            }
        }
    }

    async fn grant_once(
        &self,
        worker: &PublicKey,
        prefix: &str,
        precisions: &[Precision],
    ) -> Result<Option<Assignment>> {
        let key = worker.to_hex();
        let precisions = Self::precision_list(precisions);
        let _w = self.db.write().await;
        let mut tx = self.db.pool.begin().await?;
        let worker_row = sqlx::query("SELECT clean_streak, banned FROM workers WHERE key = $1")
            .bind(&key)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(worker_row) = worker_row else {
            return Ok(None);
        };
        if worker_row.try_get::<i64, _>("banned")? != 0 {
            return Ok(None);
        }
        let streak: i64 = worker_row.try_get("clean_streak")?;
        // Distinct replicas: no worker (or network) that holds or answered this unit. A lease
        // that was released or expired does not count, or a unit whose every candidate once
        // dropped it would never be issued again.
        let not_seen = "NOT EXISTS (SELECT 1 FROM leases l WHERE l.unit_id = units.id AND (l.worker = $1 OR l.prefix = $2) AND l.state NOT IN ('released', 'expired'))";
        let now = now_ms();
        let deadline = now + self.config.lease_ms as i64;
        let lease: LeaseId = tabula_protocol::Bytes(random_bytes());
        // A known-answer canary: a unit verified before, which this worker never saw.
        if random_unit() < self.config.canary_rate {
            let sql = format!(
                "SELECT id, task, digest FROM units WHERE status = 'verified' AND precision IN ({precisions}) AND {not_seen} ORDER BY verified_ms DESC LIMIT 1"
            );
            if let Some(row) = sqlx::query(&sql)
                .bind(&key)
                .bind(prefix)
                .fetch_optional(&mut *tx)
                .await?
            {
                let unit_id: String = row.try_get("id")?;
                self.insert_lease(
                    &mut tx, &lease, &unit_id, &key, prefix, "canary", now, deadline,
                )
                .await?;
                tx.commit().await?;
                self.metrics.leases_granted.fetch_add(1, Ordering::Relaxed);
                self.metrics.leases_canary.fetch_add(1, Ordering::Relaxed);
                return assignment(&row, lease, deadline).map(Some);
            }
        }
        let sql = format!(
            "SELECT id, task, digest, live FROM units WHERE status = 'open' AND live < replicas AND precision IN ({precisions}) AND {not_seen} ORDER BY seq LIMIT 1{}",
            self.db.skip_locked()
        );
        let Some(row) = sqlx::query(&sql)
            .bind(&key)
            .bind(prefix)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let unit_id: String = row.try_get("id")?;
        let live: i64 = row.try_get("live")?;
        // Adaptive replication: a long-clean worker runs a fresh unit alone, except for a
        // random fraction of spot checks. It cannot tell which.
        let solo = streak >= i64::from(self.config.solo_after)
            && live == 0
            && random_unit() >= self.config.spot_check_rate;
        let updated = if solo {
            sqlx::query(
                "UPDATE units SET live = live + 1, replicas = 1, quorum = 1 WHERE id = $1 AND live = 0 AND NOT EXISTS (SELECT 1 FROM leases WHERE unit_id = $1)",
            )
            .bind(&unit_id)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query("UPDATE units SET live = live + 1 WHERE id = $1 AND live < replicas")
                .bind(&unit_id)
                .execute(&mut *tx)
                .await?
        };
        if updated.rows_affected() != 1 {
            return Ok(None);
        }
        if solo {
            self.metrics.units_solo.fetch_add(1, Ordering::Relaxed);
        }
        self.insert_lease(
            &mut tx, &lease, &unit_id, &key, prefix, "replica", now, deadline,
        )
        .await?;
        tx.commit().await?;
        self.metrics.leases_granted.fetch_add(1, Ordering::Relaxed);
        assignment(&row, lease, deadline).map(Some)
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_lease(
        &self,
        tx: &mut Transaction<'_, Any>,
        lease: &LeaseId,
        unit_id: &str,
        worker: &str,
        prefix: &str,
        kind: &str,
        now: i64,
        deadline: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO leases (id, unit_id, worker, prefix, kind, state, issued_ms, deadline_ms, output_hash, output, signature, submitted_ms)
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, NULL, NULL, NULL, NULL)",
        )
        .bind(lease.to_hex())
        .bind(unit_id)
        .bind(worker)
        .bind(prefix)
        .bind(kind)
        .bind(now)
        .bind(deadline)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Gives a lease back unfinished: the unit is re-issued at once, without penalty.
    pub async fn release(&self, worker: &PublicKey, lease: &LeaseId) -> Result<bool> {
        let _w = self.db.write().await;
        let mut tx = self.db.pool.begin().await?;
        let done = self
            .end_lease(&mut tx, &lease.to_hex(), Some(&worker.to_hex()), "released")
            .await?;
        tx.commit().await?;
        if done {
            self.metrics.leases_released.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// Moves an active lease to `state` and frees its replica slot.
    async fn end_lease(
        &self,
        tx: &mut Transaction<'_, Any>,
        lease: &str,
        worker: Option<&str>,
        state: &str,
    ) -> Result<bool> {
        let Some(row) = sqlx::query(
            "SELECT unit_id, worker, kind FROM leases WHERE id = $1 AND state = 'active'",
        )
        .bind(lease)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(false);
        };
        let owner: String = row.try_get("worker")?;
        if worker.is_some_and(|w| w != owner) {
            return Ok(false);
        }
        sqlx::query("UPDATE leases SET state = $1 WHERE id = $2")
            .bind(state)
            .bind(lease)
            .execute(&mut **tx)
            .await?;
        if row.try_get::<String, _>("kind")? == "replica" {
            sqlx::query("UPDATE units SET live = live - 1 WHERE id = $1")
                .bind(row.try_get::<String, _>("unit_id")?)
                .execute(&mut **tx)
                .await?;
        }
        Ok(true)
    }

    /// Marks the active leases of `worker` as orphaned: its connection ended without an answer
    /// (a volunteer closed the tab, a network dropped). They stay active, so a native worker
    /// that reconnects can still submit, but expiring them is not held against the worker.
    /// A hoarder gains nothing from this: it earns no credit, and to orphan a lease it has to
    /// drop and redo its login.
    pub async fn orphan_leases(&self, worker: &PublicKey) -> Result<()> {
        let _w = self.db.write().await;
        // Housekeeping first: marks of leases that ended since (submitted after a reconnect,
        // released) are no longer needed.
        sqlx::query(
            "DELETE FROM orphaned_leases WHERE lease_id NOT IN (SELECT id FROM leases WHERE state = 'active')",
        )
        .execute(&self.db.pool)
        .await?;
        sqlx::query(
            "INSERT INTO orphaned_leases (lease_id, since_ms)
             SELECT id, $2 FROM leases WHERE worker = $1 AND state = 'active'
             ON CONFLICT DO NOTHING",
        )
        .bind(worker.to_hex())
        .bind(now_ms())
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Expires overdue leases: their units go to other workers, and the holder takes a strike
    /// unless its connection had ended (an orphaned lease: the streak still resets).
    pub async fn expire_leases(&self) -> Result<()> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT id, worker FROM leases WHERE state = 'active' AND deadline_ms < $1 ORDER BY worker LIMIT 500",
        )
        .bind(now)
        .fetch_all(&self.db.pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let _w = self.db.write().await;
        let mut tx = self.db.pool.begin().await?;
        for row in rows {
            let lease: String = row.try_get("id")?;
            let worker: String = row.try_get("worker")?;
            if self.end_lease(&mut tx, &lease, None, "expired").await? {
                self.metrics.leases_expired.fetch_add(1, Ordering::Relaxed);
                sqlx::query(
                    "UPDATE workers SET expired = expired + 1, clean_streak = 0 WHERE key = $1",
                )
                .bind(&worker)
                .execute(&mut *tx)
                .await?;
                let orphaned = sqlx::query("DELETE FROM orphaned_leases WHERE lease_id = $1")
                    .bind(&lease)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
                if !orphaned {
                    self.strike(&mut tx, &worker).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn strike(&self, tx: &mut Transaction<'_, Any>, worker: &str) -> Result<()> {
        sqlx::query(
            "UPDATE workers SET strikes = strikes + 1, clean_streak = 0,
             banned = CASE WHEN strikes + 1 >= $1 THEN 1 ELSE banned END WHERE key = $2",
        )
        .bind(i64::from(self.config.ban_after))
        .bind(worker)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    // ----- results -----

    /// Checks and stores a result, then advances its unit.
    pub async fn submit(&self, worker: &PublicKey, s: &Submission) -> Result<Verdict> {
        self.metrics
            .results_submitted
            .fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        loop {
            match self.submit_once(worker, s).await {
                Err(e) if attempt < 5 && is_transient(&e) => attempt += 1,
                other => return other,
            }
        }
    }

    async fn submit_once(&self, worker: &PublicKey, s: &Submission) -> Result<Verdict> {
        let key = worker.to_hex();
        let lease = s.lease.to_hex();
        let _w = self.db.write().await;
        let mut tx = self.db.pool.begin().await?;
        // Results for one unit are judged one at a time: on PostgreSQL, two replicas committing
        // together would each miss the other's result and leave the unit without a verdict.
        if let Some(unit) = sqlx::query("SELECT unit_id FROM leases WHERE id = $1")
            .bind(&lease)
            .fetch_optional(&mut *tx)
            .await?
        {
            self.lock_unit(&mut tx, &unit.try_get::<String, _>("unit_id")?)
                .await?;
        }
        let row = sqlx::query(
            "SELECT l.worker, l.state, l.unit_id, u.task, u.digest FROM leases l JOIN units u ON u.id = l.unit_id WHERE l.id = $1",
        )
        .bind(&lease)
        .fetch_optional(&mut *tx)
        .await?;
        let reject = |reason: String| {
            self.metrics
                .results_rejected
                .fetch_add(1, Ordering::Relaxed);
            Ok(Verdict::Rejected(reason))
        };
        let Some(row) = row else {
            self.strike(&mut tx, &key).await?;
            tx.commit().await?;
            return reject("unknown lease".into());
        };
        let owner: String = row.try_get("worker")?;
        if owner != key {
            // A replay of someone else's result.
            self.strike(&mut tx, &key).await?;
            tx.commit().await?;
            return reject("this lease belongs to another worker".into());
        }
        let state: String = row.try_get("state")?;
        if state != "active" {
            return reject(format!("the lease is {state}"));
        }
        let task = decode_task(&row.try_get::<String, _>("task")?)?;
        let digest: String = row.try_get("digest")?;
        let problem = if s.unit.to_hex() != digest {
            Some("the result names another unit".to_string())
        } else if let Err(e) = s.verify(worker) {
            Some(format!("the signature does not verify: {e}"))
        } else {
            UnitOutput::decode(&s.output)
                .and_then(|o| o.check_shape(&task, self.output_dim(&task)))
                .err()
                .map(|e| format!("malformed output: {e}"))
        };
        if let Some(reason) = problem {
            // The replica slot stays used (a bad result is a result); `evaluate` adds a
            // replica once every slot has answered.
            sqlx::query("UPDATE leases SET state = 'wrong' WHERE id = $1")
                .bind(&lease)
                .execute(&mut *tx)
                .await?;
            self.strike(&mut tx, &key).await?;
            self.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
            let unit_id: String = row.try_get("unit_id")?;
            let receipts = self.evaluate(&mut tx, &unit_id).await?;
            tx.commit().await?;
            self.after_commit(receipts);
            return reject(reason);
        }
        sqlx::query(
            "UPDATE leases SET state = 'submitted', output_hash = $1, output = $2, signature = $3, submitted_ms = $4 WHERE id = $5",
        )
        .bind(s.output_hash.to_hex())
        .bind(B64.encode(&s.output))
        .bind(s.signature.to_hex())
        .bind(now_ms())
        .bind(&lease)
        .execute(&mut *tx)
        .await?;
        let unit_id: String = row.try_get("unit_id")?;
        let receipts = self.evaluate(&mut tx, &unit_id).await?;
        tx.commit().await?;
        self.after_commit(receipts);
        Ok(Verdict::Accepted)
    }

    /// Locks a unit's row until the transaction ends (PostgreSQL; SQLite's writers are
    /// already serialised by [`Db::write`]).
    async fn lock_unit(&self, tx: &mut Transaction<'_, Any>, unit_id: &str) -> Result<()> {
        if self.db.flavor == crate::db::Flavor::Postgres {
            sqlx::query("SELECT id FROM units WHERE id = $1 FOR UPDATE")
                .bind(unit_id)
                .fetch_optional(&mut **tx)
                .await?;
        }
        Ok(())
    }

    fn after_commit(&self, receipts: Option<Vec<Receipt>>) {
        match receipts {
            Some(r) => {
                self.push(r);
                self.progress.notify_waiters();
            }
            None => self.referee_wake.notify_one(),
        }
    }

    fn output_dim(&self, task: &Task) -> usize {
        match self.registry.find(&task.model().name).map(|m| &m.kind) {
            Some(crate::models::ModelKind::Embedding { dim, .. }) => *dim,
            _ => 0,
        }
    }

    async fn load_unit(&self, tx: &mut Transaction<'_, Any>, unit_id: &str) -> Result<UnitRow> {
        let row = sqlx::query(
            "SELECT id, job_id, task, digest, credit_micro, replicas, quorum, status, output_hash, output FROM units WHERE id = $1",
        )
        .bind(unit_id)
        .fetch_one(&mut **tx)
        .await?;
        let output: Option<String> = row.try_get("output")?;
        Ok(UnitRow {
            id: row.try_get("id")?,
            job_id: row.try_get("job_id")?,
            task: decode_task(&row.try_get::<String, _>("task")?)?,
            digest: Hash::from_hex(&row.try_get::<String, _>("digest")?)
                .map_err(|e| CoordinatorError::Corrupt(e.to_string()))?,
            credit_micro: row.try_get("credit_micro")?,
            replicas: row.try_get("replicas")?,
            quorum: row.try_get("quorum")?,
            status: row.try_get("status")?,
            output_hash: row.try_get("output_hash")?,
            output: output.map(|o| decode_b64(&o)).transpose()?,
        })
    }

    async fn results(
        &self,
        tx: &mut Transaction<'_, Any>,
        unit_id: &str,
    ) -> Result<Vec<ResultRow>> {
        let rows = sqlx::query(
            "SELECT id, worker, output_hash, output FROM leases WHERE unit_id = $1 AND state = 'submitted' ORDER BY worker, id",
        )
        .bind(unit_id)
        .fetch_all(&mut **tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ResultRow {
                    lease: r.try_get("id")?,
                    worker: r.try_get("worker")?,
                    output_hash: r
                        .try_get::<Option<String>, _>("output_hash")?
                        .unwrap_or_default(),
                    output: decode_b64(
                        &r.try_get::<Option<String>, _>("output")?
                            .unwrap_or_default(),
                    )?,
                })
            })
            .collect()
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

    /// Advances a unit after a result. Returns the receipts to push, or `None` when the unit
    /// went to the referee.
    async fn evaluate(
        &self,
        tx: &mut Transaction<'_, Any>,
        unit_id: &str,
    ) -> Result<Option<Vec<Receipt>>> {
        let unit = self.load_unit(tx, unit_id).await?;
        let precision = unit.task.precision();
        match unit.status.as_str() {
            "verified" => {
                // A late replica or a canary: judged against the canonical output.
                let canonical = unit.output.clone().unwrap_or_default();
                let hash = unit.output_hash.clone().unwrap_or_default();
                return self
                    .settle_results(tx, &unit, &canonical, &hash)
                    .await
                    .map(Some);
            }
            "open" => {}
            _ => return Ok(Some(Vec::new())),
        }
        let results = self.results(tx, unit_id).await?;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, r) in results.iter().enumerate() {
            match groups.iter_mut().find(|g| {
                let first = &results[g[0]];
                Self::agree(
                    precision,
                    &first.output_hash,
                    &first.output,
                    &r.output_hash,
                    &r.output,
                )
            }) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        let best = groups.iter().max_by_key(|g| g.len());
        if let Some(best) = best
            && best.len() as i64 >= unit.quorum
        {
            let mut trusted = false;
            for &i in best {
                let streak: i64 = sqlx::query("SELECT clean_streak FROM workers WHERE key = $1")
                    .bind(&results[i].worker)
                    .fetch_one(&mut **tx)
                    .await?
                    .try_get("clean_streak")?;
                trusted |= streak >= i64::from(self.config.probation_units);
            }
            if trusted {
                let first = &results[best[0]];
                let (output, hash) = (first.output.clone(), first.output_hash.clone());
                return self
                    .verify_unit(tx, &unit, &output, &hash, "quorum")
                    .await
                    .map(Some);
            }
            self.to_referee(tx, &unit.id).await?;
            return Ok(None);
        }
        let active: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM leases WHERE unit_id = $1 AND state = 'active' AND kind = 'replica'",
        )
        .bind(unit_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?;
        let wrong: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM leases WHERE unit_id = $1 AND state = 'wrong'")
                .bind(unit_id)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?;
        if active == 0 && results.len() as i64 + wrong >= unit.replicas {
            if unit.replicas < i64::from(self.config.max_replicas) {
                sqlx::query("UPDATE units SET replicas = replicas + 1, quorum = $1 WHERE id = $2")
                    .bind(unit.quorum.max(i64::from(self.config.replicas.min(2))))
                    .bind(unit_id)
                    .execute(&mut **tx)
                    .await?;
            } else {
                self.to_referee(tx, unit_id).await?;
                return Ok(None);
            }
        }
        Ok(Some(Vec::new()))
    }

    async fn to_referee(&self, tx: &mut Transaction<'_, Any>, unit_id: &str) -> Result<()> {
        sqlx::query("UPDATE units SET status = 'referee' WHERE id = $1 AND status = 'open'")
            .bind(unit_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Marks a unit verified with `output`, credits agreeing results, strikes the others and
    /// advances its job.
    async fn verify_unit(
        &self,
        tx: &mut Transaction<'_, Any>,
        unit: &UnitRow,
        output: &[u8],
        hash: &str,
        by: &str,
    ) -> Result<Vec<Receipt>> {
        let updated = sqlx::query(
            "UPDATE units SET status = 'verified', output = $1, output_hash = $2, verified_by = $3, verified_ms = $4 WHERE id = $5 AND status <> 'verified'",
        )
        .bind(B64.encode(output))
        .bind(hash)
        .bind(by)
        .bind(now_ms())
        .bind(&unit.id)
        .execute(&mut **tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(Vec::new());
        }
        self.metrics.units_verified.fetch_add(1, Ordering::Relaxed);
        sqlx::query("UPDATE jobs SET units_verified = units_verified + 1 WHERE id = $1")
            .bind(&unit.job_id)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "UPDATE jobs SET status = 'done', finished_ms = $1 WHERE id = $2 AND units_verified = units_total AND status = 'running'",
        )
        .bind(now_ms())
        .bind(&unit.job_id)
        .execute(&mut **tx)
        .await?;
        self.settle_results(tx, unit, output, hash).await
    }

    /// Credits every submitted result of `unit` that agrees with the canonical output and
    /// strikes every one that does not.
    async fn settle_results(
        &self,
        tx: &mut Transaction<'_, Any>,
        unit: &UnitRow,
        canonical: &[u8],
        canonical_hash: &str,
    ) -> Result<Vec<Receipt>> {
        let precision = unit.task.precision();
        let mut receipts = Vec::new();
        for r in self.results(tx, &unit.id).await? {
            if Self::agree(
                precision,
                canonical_hash,
                canonical,
                &r.output_hash,
                &r.output,
            ) {
                receipts.push(self.credit(tx, unit, &r).await?);
            } else {
                sqlx::query("UPDATE leases SET state = 'wrong' WHERE id = $1")
                    .bind(&r.lease)
                    .execute(&mut **tx)
                    .await?;
                self.strike(tx, &r.worker).await?;
                self.metrics.results_wrong.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %r.worker, unit = %unit.id, "wrong result");
            }
        }
        Ok(receipts)
    }

    async fn credit(
        &self,
        tx: &mut Transaction<'_, Any>,
        unit: &UnitRow,
        r: &ResultRow,
    ) -> Result<Receipt> {
        let corrupt =
            |e: tabula_protocol::ParseBytesError| CoordinatorError::Corrupt(e.to_string());
        let mut receipt = Receipt {
            coordinator: self.identity.public(),
            worker: PublicKey::from_hex(&r.worker).map_err(corrupt)?,
            unit: unit.digest,
            lease: LeaseId::from_hex(&r.lease).map_err(corrupt)?,
            output_hash: Hash::from_hex(&r.output_hash).map_err(corrupt)?,
            credit_micro: unit.credit_micro.max(0) as u64,
            issued_ms: now_ms() as u64,
            signature: Default::default(),
        };
        self.identity.sign_receipt(&mut receipt);
        sqlx::query("UPDATE leases SET state = 'correct' WHERE id = $1")
            .bind(&r.lease)
            .execute(&mut **tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO credits (worker, unit_id, lease_id, credit_micro, receipt, issued_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&r.worker)
        .bind(&unit.id)
        .bind(&r.lease)
        .bind(unit.credit_micro)
        .bind(serde_json::to_string(&receipt).map_err(|e| CoordinatorError::Corrupt(e.to_string()))?)
        .bind(receipt.issued_ms as i64)
        .execute(&mut **tx)
        .await?;
        if inserted.rows_affected() == 1 {
            sqlx::query(
                "UPDATE workers SET verified = verified + 1, clean_streak = clean_streak + 1 WHERE key = $1",
            )
            .bind(&r.worker)
            .execute(&mut **tx)
            .await?;
        }
        Ok(receipt)
    }

    /// Re-executes one unit waiting for the referee. Returns whether there was one.
    async fn referee_one(&self) -> Result<bool> {
        let Some(row) =
            sqlx::query("SELECT id, task FROM units WHERE status = 'referee' ORDER BY seq LIMIT 1")
                .fetch_optional(&self.db.pool)
                .await?
        else {
            return Ok(false);
        };
        let unit_id: String = row.try_get("id")?;
        let task = decode_task(&row.try_get::<String, _>("task")?)?;
        tracing::info!(unit = %unit_id, "refereeing");
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.referee.submit(
            task,
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
        )?;
        let output = answer
            .await
            .map_err(|_| CoordinatorError::Config("the referee thread stopped".into()))??
            .encode();
        let hash = tabula_protocol::sha256(&output).to_hex();
        let _w = self.db.write().await;
        let mut tx = self.db.pool.begin().await?;
        self.lock_unit(&mut tx, &unit_id).await?;
        let unit = self.load_unit(&mut tx, &unit_id).await?;
        if unit.status != "referee" {
            return Ok(true);
        }
        let receipts = self
            .verify_unit(&mut tx, &unit, &output, &hash, "referee")
            .await?;
        tx.commit().await?;
        self.metrics.units_refereed.fetch_add(1, Ordering::Relaxed);
        self.push(receipts);
        self.progress.notify_waiters();
        Ok(true)
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

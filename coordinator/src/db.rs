//! Storage: one schema and one set of queries for SQLite (the zero-config default, in WAL mode)
//! and PostgreSQL, through sqlx's `Any` driver. Only portable SQL is used: `$n` parameters,
//! `TEXT` and `BIGINT` columns (bytes are stored as hex or base64), ids made here rather than
//! by the database. SQLite allows one writer at a time, so writes take [`Db::write`]'s lock
//! there instead of failing with `SQLITE_BUSY`; PostgreSQL runs them concurrently.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sqlx::{AnyPool, any::AnyPoolOptions};
use tokio::sync::{Mutex, MutexGuard};

use crate::CoordinatorError;

/// The most workers an API key's pool names.
pub const MAX_POOL: usize = 1024;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS api_keys (
        key_hash TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        created_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        precision TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        units_total BIGINT NOT NULL,
        units_verified BIGINT NOT NULL,
        status TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        finished_ms BIGINT)",
    // `live` is no longer maintained (always 0): the scheduler counts a unit's replica slots
    // from its leases, in memory. Kept so that existing databases need no migration.
    "CREATE TABLE IF NOT EXISTS units (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        precision TEXT NOT NULL,
        task TEXT NOT NULL,
        digest TEXT NOT NULL,
        credit_micro BIGINT NOT NULL,
        replicas BIGINT NOT NULL,
        quorum BIGINT NOT NULL,
        live BIGINT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        output_hash TEXT,
        verified_by TEXT,
        verified_ms BIGINT)",
    // Only the unfinished units: what a restart looks for (`Book::load`). An index of every
    // unit by status took an entry for each verification, and grew with every unit ever run.
    "DROP INDEX IF EXISTS units_open",
    "CREATE INDEX IF NOT EXISTS units_unfinished ON units (seq) WHERE status IN ('open', 'referee')",
    "CREATE INDEX IF NOT EXISTS units_job ON units (job_id, idx)",
    "CREATE TABLE IF NOT EXISTS leases (
        id TEXT PRIMARY KEY,
        unit_id TEXT NOT NULL,
        worker TEXT NOT NULL,
        prefix TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        issued_ms BIGINT NOT NULL,
        deadline_ms BIGINT NOT NULL,
        output_hash TEXT,
        output TEXT,
        signature TEXT,
        submitted_ms BIGINT)",
    "CREATE INDEX IF NOT EXISTS leases_unit ON leases (unit_id)",
    // Only the active leases: what a restart looks for (`Book::load`). An index of every
    // lease by state would be rewritten at every state change for nothing.
    "DROP INDEX IF EXISTS leases_state",
    "CREATE INDEX IF NOT EXISTS leases_active ON leases (unit_id) WHERE state = 'active'",
    // A worker's results waiting for agreement (its pending credit in the ledger). Indexing
    // every lease by worker dirtied a page per worker in each commit.
    "DROP INDEX IF EXISTS leases_worker",
    "CREATE INDEX IF NOT EXISTS leases_pending ON leases (worker) WHERE state = 'submitted'",
    // Active leases whose worker's connection ended (a closed tab, a lost network): when they
    // expire the worker takes no strike.
    "CREATE TABLE IF NOT EXISTS orphaned_leases (
        lease_id TEXT PRIMARY KEY,
        since_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS workers (
        key TEXT PRIMARY KEY,
        payout TEXT,
        agent TEXT NOT NULL,
        verified BIGINT NOT NULL,
        clean_streak BIGINT NOT NULL,
        strikes BIGINT NOT NULL,
        expired BIGINT NOT NULL,
        banned BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS credits (
        worker TEXT NOT NULL,
        unit_id TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        credit_micro BIGINT NOT NULL,
        receipt TEXT NOT NULL,
        issued_ms BIGINT NOT NULL,
        PRIMARY KEY (worker, unit_id))",
    // The primary key's prefix serves lookups by worker; a second index only cost writes.
    "DROP INDEX IF EXISTS credits_worker",
    // Settlement (settlement.rs): each credit of a worker with a payout address, copied once
    // into the epoch that first put it on-chain, with the address it went to.
    "CREATE TABLE IF NOT EXISTS settled (
        worker TEXT NOT NULL,
        unit_id TEXT NOT NULL,
        payout TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        credit_micro BIGINT NOT NULL,
        PRIMARY KEY (worker, unit_id))",
    "CREATE INDEX IF NOT EXISTS settled_payout ON settled (payout, epoch)",
    "CREATE TABLE IF NOT EXISTS epochs (
        epoch BIGINT PRIMARY KEY,
        root TEXT NOT NULL,
        total_micro BIGINT NOT NULL,
        contributors BIGINT NOT NULL,
        settled_units BIGINT NOT NULL,
        contract TEXT NOT NULL,
        built_ms BIGINT NOT NULL,
        tx_hash TEXT,
        posted_ms BIGINT)",
    "CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        content TEXT NOT NULL,
        created_ms BIGINT NOT NULL)",
    // An API key limited to a pool of worker keys (hex): its jobs run only there.
    "CREATE TABLE IF NOT EXISTS api_key_pools (
        key_hash TEXT NOT NULL,
        worker TEXT NOT NULL,
        PRIMARY KEY (key_hash, worker))",
    // The pool of each job of such a key, for a restart.
    "CREATE TABLE IF NOT EXISTS job_pools (
        job_id TEXT NOT NULL,
        worker TEXT NOT NULL,
        PRIMARY KEY (job_id, worker))",
    // How each pipeline session ran (`/v1/jobs` shows it beside its job).
    "CREATE TABLE IF NOT EXISTS pipeline_sessions (
        job_id TEXT PRIMARY KEY,
        stages BIGINT NOT NULL,
        pipelines BIGINT NOT NULL,
        links_direct BIGINT NOT NULL,
        links_relayed BIGINT NOT NULL,
        disputes BIGINT NOT NULL,
        liars BIGINT NOT NULL,
        rebuilds BIGINT NOT NULL)",
    // One row, rewritten by `/healthz` to prove the database still takes writes.
    "CREATE TABLE IF NOT EXISTS health (
        id BIGINT PRIMARY KEY,
        checked_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        status TEXT NOT NULL,
        entries TEXT NOT NULL,
        metadata TEXT NOT NULL,
        output_file_id TEXT,
        error_file_id TEXT,
        created_ms BIGINT NOT NULL,
        completed_ms BIGINT)",
];

/// Columns added after a table was first shipped: (table, column, type). Added when missing,
/// so databases made by earlier versions keep working.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // The API key (its SHA-256) that created a job: `/v1/jobs` lists only the caller's.
    ("jobs", "owner", "TEXT"),
    // SHA-256 of a job's endpoint and body, checked when its Idempotency-Key comes again.
    ("jobs", "fingerprint", "TEXT"),
    // 1 while a verified unit waits for an audit: a restart puts it back in the queue.
    ("units", "audit", "BIGINT NOT NULL DEFAULT 0"),
    // `standard`, `high` or `referee` (NULL before assurance levels: standard).
    ("units", "assurance", "TEXT"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Sqlite,
    Postgres,
}

impl Flavor {
    /// How a statement numbers its parameters, for [`crate::journal::values_sql`] and
    /// [`crate::journal::parameter_list`]: PostgreSQL needs `$1, $2, …`; SQLite gets anonymous
    /// `?`, because it finds a numbered parameter's name by a linear scan, so binding n numbered
    /// parameters costs n² (a 200-unit insert of 2 000 parameters spent more time binding than
    /// writing).
    pub fn first_parameter(self) -> Option<usize> {
        match self {
            Flavor::Sqlite => None,
            Flavor::Postgres => Some(1),
        }
    }
}

pub struct Db {
    pub pool: AnyPool,
    pub flavor: Flavor,
    /// The SQLite database file, which the journal opens a connection of its own on.
    pub sqlite_path: Option<PathBuf>,
    /// The PostgreSQL URL, which the journal opens a connection of its own with.
    pub postgres_url: Option<String>,
    write_lock: Mutex<()>,
    /// The last write probe of [`Db::check_writes`] and when it ran: `/healthz` needs no key,
    /// so callers within [`HEALTH_PROBE_EVERY`] share one probe instead of each taking the
    /// write lock.
    health: Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// What [`Db::claim`] holds until the process ends.
    owner: std::sync::Mutex<Option<Owner>>,
}

/// Proof that this process is the database's coordinator: a locked file next to SQLite's data,
/// or a PostgreSQL session holding an advisory lock. Both end with the process, `kill -9`
/// included, so a restart can claim again at once.
enum Owner {
    File(#[allow(dead_code)] std::fs::File),
    Session(#[allow(dead_code)] sqlx::AnyConnection),
}

/// The PostgreSQL advisory lock key of a coordinator (any fixed number; "TABULA" in ASCII).
const OWNER_LOCK_KEY: i64 = 0x5441_4255_4c41;

impl Db {
    /// Opens (creating if needed) the database: `database_url` when given (`postgres://…` or
    /// `sqlite://…`), else `data_dir/tabula.db`.
    pub async fn open(
        data_dir: &Path,
        database_url: Option<&str>,
    ) -> Result<Self, CoordinatorError> {
        sqlx::any::install_default_drivers();
        let url = match database_url {
            Some(u) => u.to_string(),
            None => {
                std::fs::create_dir_all(data_dir).map_err(|e| {
                    CoordinatorError::Config(format!("cannot create {}: {e}", data_dir.display()))
                })?;
                format!("sqlite://{}?mode=rwc", data_dir.join("tabula.db").display())
            }
        };
        let flavor = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Flavor::Postgres
        } else if url.starts_with("sqlite:") {
            Flavor::Sqlite
        } else {
            return Err(CoordinatorError::Config(format!(
                "unsupported database URL `{url}`: use postgres://… or sqlite://…"
            )));
        };
        let sqlite_path = match flavor {
            Flavor::Sqlite => Some(sqlite_file(&url)?),
            Flavor::Postgres => None,
        };
        let postgres_url = (flavor == Flavor::Postgres).then(|| url.clone());
        let pool = AnyPoolOptions::new()
            .max_connections(match flavor {
                Flavor::Sqlite => 4,
                Flavor::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if flavor == Flavor::Sqlite {
                        // WAL: readers never block the writer; NORMAL sync is durable across a
                        // process crash (kill -9), which is what the coordinator must survive.
                        for pragma in [
                            "PRAGMA journal_mode=WAL",
                            "PRAGMA synchronous=NORMAL",
                            "PRAGMA busy_timeout=10000",
                            // Statement journals (each upsert of a batch may need undoing
                            // alone) in memory rather than in temporary files.
                            "PRAGMA temp_store=MEMORY",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .before_acquire(move |conn, _| {
                Box::pin(async move {
                    if flavor != Flavor::Sqlite {
                        return Ok(true);
                    }
                    // A write that failed in a transaction (a full disk) can leave SQLite's
                    // transaction open under a connection that goes back to the pool, and with
                    // it the write lock: every later writer then waits out its busy timeout
                    // ("database is locked") until a restart. A connection that cannot begin
                    // a transaction is inside one: it is closed, which rolls it back.
                    if sqlx::query("BEGIN").execute(&mut *conn).await.is_err() {
                        tracing::warn!(
                            "a database connection was left inside a transaction; closing it"
                        );
                        return Ok(false);
                    }
                    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
                    Ok(true)
                })
            })
            .connect(&url)
            .await
            .map_err(|e| CoordinatorError::Config(format!("cannot open database {url}: {e}")))?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        for (table, column, kind) in ADDED_COLUMNS {
            let sql = match flavor {
                Flavor::Postgres => {
                    format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                }
                Flavor::Sqlite => format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"),
            };
            match sqlx::query(&sql).execute(&pool).await {
                Ok(_) => {}
                // SQLite has no IF NOT EXISTS for columns: the column is there already.
                Err(e) if e.to_string().contains("duplicate column") => {}
                Err(e) => return Err(e.into()),
            }
        }
        // What the per-key quota counts: a requester's running jobs.
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS jobs_owner_running ON jobs (owner) WHERE status = 'running'",
        )
        .execute(&pool)
        .await?;
        Ok(Self {
            pool,
            flavor,
            sqlite_path,
            postgres_url,
            write_lock: Mutex::new(()),
            health: Mutex::new(None),
            owner: std::sync::Mutex::new(None),
        })
    }

    /// Makes this process the one coordinator of the database, or says which is. The scheduler
    /// decides in memory, so two coordinators on one database would lease the same units.
    /// (`tabula chain` and `tabula keys` may still open it beside the coordinator: they touch
    /// neither units nor leases.)
    pub async fn claim(&self, data_dir: &Path) -> Result<(), CoordinatorError> {
        let owner = match self.flavor {
            Flavor::Sqlite => {
                let path = data_dir.join("coordinator.lock");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        CoordinatorError::Config(format!("cannot open {}: {e}", path.display()))
                    })?;
                if file.try_lock().is_err() {
                    return Err(CoordinatorError::Config(format!(
                        "another coordinator is running on {} (it holds {}): stop it, or give this one its own --data-dir",
                        data_dir.display(),
                        path.display()
                    )));
                }
                Owner::File(file)
            }
            Flavor::Postgres => {
                let mut session = self.pool.acquire().await?.detach();
                let got: bool = sqlx::Row::try_get(
                    &sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
                        .bind(OWNER_LOCK_KEY)
                        .fetch_one(&mut session)
                        .await?,
                    "got",
                )?;
                if !got {
                    return Err(CoordinatorError::Config(
                        "another coordinator is running on this PostgreSQL database: stop it, or give this one its own database".into(),
                    ));
                }
                Owner::Session(session)
            }
        };
        *self.owner.lock().expect("owner lock") = Some(owner);
        Ok(())
    }

    /// Whether the database takes writes now: rewrites the `health` row and, on SQLite,
    /// checks the free space of the disk under it (a small write can still land in the WAL's
    /// reused pages while every larger one fails). `Err` says what fails, for `/healthz`.
    /// One probe serves every caller for [`HEALTH_PROBE_EVERY`]; callers arriving while it
    /// runs wait for it.
    pub async fn check_writes(&self) -> Result<(), String> {
        let mut last = self.health.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < HEALTH_PROBE_EVERY
        {
            return result.clone();
        }
        let result = self.probe_writes().await;
        *last = Some((std::time::Instant::now(), result.clone()));
        result
    }

    async fn probe_writes(&self) -> Result<(), String> {
        if let Some(free) = self.free_bytes()
            && free < MIN_FREE_BYTES
        {
            return Err(format!(
                "the disk under the database is full ({} KiB free); free space and the coordinator resumes by itself",
                free / 1024
            ));
        }
        let sql = format!(
            "INSERT INTO health (id, checked_ms) VALUES ({}) \
             ON CONFLICT (id) DO UPDATE SET checked_ms = excluded.checked_ms",
            crate::journal::parameter_list(self.flavor.first_parameter(), 2)
        );
        let _w = self.write().await;
        sqlx::query(&sql)
            .bind(1i64)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| {
                let e = CoordinatorError::from(e);
                if is_storage_full(&e) {
                    format!("the database is full: {e}; free space and the coordinator resumes by itself")
                } else {
                    format!("the database refuses writes: {e}")
                }
            })
    }

    /// Free bytes on the filesystem of the SQLite database; `None` on PostgreSQL (its disk is
    /// the server's) or where the platform cannot tell.
    pub fn free_bytes(&self) -> Option<u64> {
        #[cfg(unix)]
        {
            let dir = self.sqlite_path.as_deref()?.parent()?;
            let stat = rustix::fs::statvfs(dir).ok()?;
            Some(stat.f_bavail.saturating_mul(stat.f_frsize))
        }
        #[cfg(not(unix))]
        {
            None
        }
    }

    /// Serialises writers on SQLite (its single-writer rule) and is free on PostgreSQL.
    pub async fn write(&self) -> Option<MutexGuard<'_, ()>> {
        match self.flavor {
            Flavor::Sqlite => Some(self.write_lock.lock().await),
            Flavor::Postgres => None,
        }
    }
}

impl Db {
    /// Creates a requester API key; only its SHA-256 is stored.
    /// A new API key; with `pool`, its jobs run only on those workers.
    pub async fn create_api_key(
        &self,
        label: &str,
        pool: &[tabula_protocol::PublicKey],
    ) -> Result<String, CoordinatorError> {
        if pool.len() > MAX_POOL {
            return Err(CoordinatorError::Config(format!(
                "a pool of {} workers; at most {MAX_POOL}",
                pool.len()
            )));
        }
        let key = format!("tbl-{}", hex::encode(random_bytes::<24>()));
        let hash = tabula_protocol::sha256(key.as_bytes()).to_hex();
        let _w = self.write().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO api_keys (key_hash, label, created_ms) VALUES ($1, $2, $3)")
            .bind(&hash)
            .bind(label)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        for worker in pool {
            sqlx::query(
                "INSERT INTO api_key_pools (key_hash, worker) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&hash)
            .bind(worker.to_hex())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(key)
    }

    /// The pool of worker keys (hex) an API key's jobs are limited to (`owner` is the key's
    /// hash); `None` when it has none.
    pub async fn api_key_pool(
        &self,
        owner: &str,
    ) -> Result<Option<std::collections::HashSet<String>>, CoordinatorError> {
        let rows = sqlx::query("SELECT worker FROM api_key_pools WHERE key_hash = $1")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            rows.iter()
                .map(|r| sqlx::Row::try_get::<String, _>(r, "worker"))
                .collect::<Result<_, _>>()?,
        ))
    }

    pub async fn api_key_valid(&self, key: &str) -> Result<bool, CoordinatorError> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM api_keys WHERE key_hash = $1")
                .bind(tabula_protocol::sha256(key.as_bytes()).to_hex())
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }
}

/// The file of a `sqlite:` URL (`sqlite://path?options` or `sqlite:path`). An in-memory
/// database is refused: the coordinator's connections must all see the same data.
fn sqlite_file(url: &str) -> Result<PathBuf, CoordinatorError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.contains(":memory:") {
        return Err(CoordinatorError::Config(format!(
            "`{url}` is not a database file: give sqlite://PATH (the coordinator's connections \
             must share one database)"
        )));
    }
    Ok(PathBuf::from(path))
}

/// A PostgreSQL deadlock or serialisation failure: the transaction rolled back and can run
/// again.
pub fn is_transient(e: &CoordinatorError) -> bool {
    match e {
        CoordinatorError::Db(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// The database or the disk under it is full (SQLite's `SQLITE_FULL`, PostgreSQL's
/// `disk_full`, or `ENOSPC` from a file): the request may succeed once space is freed.
pub fn is_storage_full(e: &CoordinatorError) -> bool {
    const ENOSPC: i32 = 28;
    match e {
        CoordinatorError::Db(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("13" | "53100"))
        }
        CoordinatorError::Db(sqlx::Error::Io(io)) => io.raw_os_error() == Some(ENOSPC),
        CoordinatorError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code == rusqlite::ErrorCode::DiskFull
        }
        CoordinatorError::Journal(j) => j.storage_full,
        _ => false,
    }
}

/// Free space below which `/healthz` reports the SQLite data directory as failing: enough for
/// a large job's rows and a WAL checkpoint.
pub const MIN_FREE_BYTES: u64 = 8 << 20;

/// How long one write probe of `/healthz` answers for (see [`Db::check_writes`]): at most one
/// probe write a second, however often it is asked.
pub const HEALTH_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the OS random source");
    out
}

/// Ids that sort by creation: 6 bytes of milliseconds, 4 of a process-wide counter, the rest
/// random. Rows keyed by them (and index entries on them) land at the end of their B-trees, so
/// a commit dirties a few pages instead of one random page per row: with random ids, SQLite
/// wrote some 75 KB of pages per verified unit under load.
pub fn ordered_bytes<const N: usize>() -> [u8; N] {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut out = random_bytes::<N>();
    let ms = (now_ms() as u64).to_be_bytes();
    let count = COUNTER
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_be_bytes();
    for (o, b) in out.iter_mut().zip(ms[2..].iter().chain(count.iter())) {
        *o = *b;
    }
    out
}

/// An [`ordered_bytes`] id with a readable prefix, e.g. `unit_019ac…`.
pub fn ordered_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(ordered_bytes::<12>()))
}

/// A random id with a readable prefix, e.g. `job_3f9c…`.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(random_bytes::<12>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file_and_memory_is_refused() {
        let file = |url| sqlite_file(url).unwrap();
        assert_eq!(
            file("sqlite:///data/t.db?mode=rwc"),
            PathBuf::from("/data/t.db")
        );
        assert_eq!(file("sqlite://rel/t.db"), PathBuf::from("rel/t.db"));
        assert_eq!(file("sqlite:t.db"), PathBuf::from("t.db"));
        for url in ["sqlite::memory:", "sqlite://", "sqlite://?mode=memory"] {
            let e = sqlite_file(url).unwrap_err().to_string();
            assert!(e.contains("not a database file"), "{url}: {e}");
        }
    }

    /// `/healthz` needs no key: a flood of it makes one probe write a second, not one each.
    #[tokio::test]
    async fn health_probes_are_shared_for_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), None).await.unwrap();
        let checked = async || -> i64 {
            sqlx::Row::try_get(
                &sqlx::query("SELECT checked_ms FROM health WHERE id = 1")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap(),
                "checked_ms",
            )
            .unwrap()
        };
        db.check_writes().await.unwrap();
        let first = checked().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        for _ in 0..100 {
            db.check_writes().await.unwrap();
        }
        assert_eq!(checked().await, first, "a probe write within the second");
        tokio::time::sleep(HEALTH_PROBE_EVERY).await;
        db.check_writes().await.unwrap();
        assert!(checked().await > first, "no probe after the second");
    }

    #[test]
    fn ordered_ids_sort_by_creation_and_stay_unique() {
        let ids: Vec<String> = (0..10_000).map(|_| ordered_id("unit")).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        let bytes: Vec<[u8; 16]> = (0..10_000).map(|_| ordered_bytes()).collect();
        assert!(
            bytes.windows(2).all(|w| w[0] < w[1]),
            "lease ids out of order"
        );
        // The tail stays random: two ids of the same millisecond and count would still differ.
        assert_ne!(ordered_bytes::<16>()[10..], ordered_bytes::<16>()[10..]);
        assert_eq!(ids[0].len(), "unit_".len() + 24);
    }
}

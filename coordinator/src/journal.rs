//! The scheduler's write-ahead path to the database: group commit.
//!
//! The scheduler decides in memory ([`crate::scheduler`]) and describes each decision as a list
//! of row writes ([`Write`]). It appends them here *while it still holds its book lock*, so
//! the journal sees decisions in the order they were made. One writer task takes every entry
//! that is waiting, folds writes to the same row into the last one, and commits them in one
//! transaction, however many workers asked: on PostgreSQL a few multi-row statements (one per
//! table and kind), on SQLite the same statements row by row, each prepared once; either way
//! on the journal's own connection and thread ([`JournalThread`]). Each caller waits for the commit of
//! its entry before it answers anyone: a worker is never told about a lease, a verdict or a
//! credit that a `kill -9` could still undo.
//!
//! When a batch of several entries fails, its entries are committed again one at a time, in
//! order, so one entry's bad row fails only itself and the entries after it (decided on its
//! state), never those before. When an entry fails, the journal is *poisoned*: the scheduler's memory now holds decisions
//! the database does not, so every later entry fails too until [`Journal::reset`] (the
//! scheduler reloads its book from the database first). Nothing half-written is ever built on.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use sqlx::{Any, AnyConnection, Connection, any::AnyArguments, query::Query};
use tokio::sync::{mpsc, oneshot};

use crate::{CoordinatorError, db::Db};

/// Rows per multi-row statement: far below PostgreSQL's 65 535 bound parameters with the
/// widest row (a lease, 12 columns). (SQLite runs the statements row by row anyway.)
const ROWS_PER_STATEMENT: usize = 400;
/// Entries per transaction: bounds one commit's size when a crowd arrives at once.
const ENTRIES_PER_BATCH: usize = 4096;

/// The state of a lease whose result agreed with its unit's verified output. Such a lease
/// keeps its output hash but not its output: the unit holds the same bytes, and writing them
/// twice per replica would double what the database writes per unit.
pub const CORRECT: &str = "correct";

/// A lease row, written whole (on grant and when its result arrives).
#[derive(Clone, Debug)]
pub struct LeaseRow {
    pub id: String,
    pub unit_id: String,
    pub worker: String,
    pub prefix: String,
    pub kind: &'static str,
    pub state: &'static str,
    pub issued_ms: i64,
    pub deadline_ms: i64,
    pub output_hash: Option<String>,
    /// Base64.
    pub output: Option<String>,
    pub signature: Option<String>,
    pub submitted_ms: Option<i64>,
}

/// The mutable columns of a unit (its task and credit never change after the job is created).
#[derive(Clone, Debug)]
pub struct UnitRow {
    pub id: String,
    pub replicas: i64,
    pub quorum: i64,
    pub status: &'static str,
    /// Base64, once verified.
    pub output: Option<String>,
    pub output_hash: Option<String>,
    pub verified_by: Option<&'static str>,
    pub verified_ms: Option<i64>,
    /// Waiting for an audit.
    pub audit: bool,
}

/// A worker's reputation counters.
#[derive(Clone, Debug)]
pub struct WorkerRow {
    pub key: String,
    pub verified: i64,
    pub clean_streak: i64,
    pub strikes: i64,
    pub expired: i64,
    pub banned: bool,
}

/// A job's progress.
#[derive(Clone, Debug)]
pub struct JobRow {
    pub id: String,
    pub units_verified: i64,
    pub status: &'static str,
    pub finished_ms: Option<i64>,
}

/// A credit with its signed receipt (JSON).
#[derive(Clone, Debug)]
pub struct CreditRow {
    pub worker: String,
    pub unit_id: String,
    pub lease_id: String,
    pub credit_micro: i64,
    pub receipt: String,
    pub issued_ms: i64,
}

/// One row change. Later writes to the same row in a batch replace earlier ones.
#[derive(Clone, Debug)]
pub enum Write {
    Lease(LeaseRow),
    /// Only the state of a lease whose full row was written before.
    LeaseState {
        id: String,
        state: &'static str,
    },
    Unit(UnitRow),
    Worker(WorkerRow),
    /// A login: the worker row is created if new, its agent and last-seen time updated.
    WorkerSeen {
        key: String,
        agent: String,
        now_ms: i64,
    },
    Payout {
        key: String,
        address: String,
    },
    Job(JobRow),
    Credit(CreditRow),
    Orphan {
        lease: String,
        since_ms: i64,
    },
    Unorphan {
        lease: String,
    },
}

/// Why an entry was not committed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the database refused a batch of scheduler writes (failure {failure}): {message}")]
pub struct JournalError {
    /// Counts the journal's failures; the scheduler reloads once per failure.
    pub failure: u64,
    pub message: String,
    /// The database or its disk was full ([`crate::db::is_storage_full`]).
    pub storage_full: bool,
}

impl From<JournalError> for CoordinatorError {
    fn from(e: JournalError) -> Self {
        CoordinatorError::Journal(e)
    }
}

enum Message {
    Entry {
        writes: Vec<Write>,
        done: oneshot::Sender<Result<(), JournalError>>,
    },
    Reset,
}

/// Counters for `/metrics`: how well commits are grouped and what they cost.
#[derive(Default)]
pub struct JournalStats {
    pub batches: AtomicU64,
    pub entries: AtomicU64,
    pub commit_us: AtomicU64,
}

/// The handle the scheduler appends through.
pub struct Journal {
    tx: mpsc::UnboundedSender<Message>,
    pub stats: Arc<JournalStats>,
}

/// The commit of one appended entry, to be awaited after the book lock is released.
pub struct Pending(Option<oneshot::Receiver<Result<(), JournalError>>>);

impl Pending {
    /// Nothing to wait for (an entry with no writes).
    pub fn none() -> Self {
        Pending(None)
    }

    pub async fn committed(self) -> Result<(), JournalError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| {
                Err(JournalError {
                    failure: u64::MAX,
                    message: "the journal writer stopped".into(),
                    storage_full: false,
                })
            }),
        }
    }
}

impl Journal {
    /// Starts the writer task on `db`.
    pub fn spawn(db: Arc<Db>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(JournalStats::default());
        tokio::spawn(writer(db, rx, stats.clone()));
        Self { tx, stats }
    }

    /// Queues `writes` as one entry. Call it while holding the lock under which they were
    /// decided, so entries reach the database in decision order.
    pub fn append(&self, writes: Vec<Write>) -> Pending {
        if writes.is_empty() {
            return Pending::none();
        }
        let (done, rx) = oneshot::channel();
        // If the writer is gone, `done` is dropped with the message and waiting for the entry
        // says so: a decision is never taken as committed when it was not.
        let _ = self.tx.send(Message::Entry { writes, done });
        Pending(Some(rx))
    }

    /// Ends a poisoning: entries appended after this are written again. Call it under the
    /// book lock, after the book was reloaded from the database.
    pub fn reset(&self) {
        let _ = self.tx.send(Message::Reset);
    }
}

async fn writer(db: Arc<Db>, mut rx: mpsc::UnboundedReceiver<Message>, stats: Arc<JournalStats>) {
    let mut connection = Writer { thread: None };
    let mut failures = 0u64;
    // `Some(storage_full)` of the failure that poisoned the journal, until the reset.
    let mut poisoned: Option<bool> = None;
    let mut waiting: Option<Message> = None;
    loop {
        let first = match waiting.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let mut entries = Vec::new();
        let mut message = Some(first);
        while let Some(m) = message.take() {
            match m {
                Message::Reset => {
                    if entries.is_empty() {
                        poisoned = None;
                    } else {
                        // Entries before the reset belong to the old book.
                        waiting = Some(Message::Reset);
                        break;
                    }
                }
                Message::Entry { writes, done } => entries.push((writes, done)),
            }
            if entries.len() >= ENTRIES_PER_BATCH {
                break;
            }
            message = rx.try_recv().ok();
        }
        if entries.is_empty() {
            continue;
        }
        let results = if let Some(storage_full) = poisoned {
            let refused = JournalError {
                failure: failures,
                message: "an earlier batch failed; the scheduler is reloading".into(),
                storage_full,
            };
            vec![Err(refused); entries.len()]
        } else {
            let started = Instant::now();
            let batch = Arc::new(Batch::of(
                entries.iter().flat_map(|(w, _)| w.iter().cloned()),
            ));
            let committed = commit_with_retries(&mut connection, &db, &batch).await;
            let results = match committed {
                Ok(()) => vec![Ok(()); entries.len()],
                // One entry's bad row must not fail the others: commit them one at a time,
                // in order, up to the first that fails.
                Err(e) if entries.len() > 1 => {
                    tracing::warn!(
                        "committing {} scheduler entries together failed ({e}); committing them one at a time",
                        entries.len()
                    );
                    let mut results = Vec::with_capacity(entries.len());
                    for (writes, _) in &entries {
                        if let Some(Err(e)) = results.last() {
                            results.push(Err(JournalError::clone(e)));
                            continue;
                        }
                        let one = Arc::new(Batch::of(writes.iter().cloned()));
                        results.push(
                            match commit_with_retries(&mut connection, &db, &one).await {
                                Ok(()) => Ok(()),
                                Err(e) => Err(failed(&mut failures, &mut poisoned, 1, &e)),
                            },
                        );
                    }
                    results
                }
                Err(e) => vec![Err(failed(&mut failures, &mut poisoned, entries.len(), &e))],
            };
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            stats
                .commit_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            results
        };
        assert_eq!(results.len(), entries.len(), "one result per entry");
        for ((_, done), result) in entries.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }
}

/// Records a failed commit of `entries` entries: the journal is poisoned until the reset.
fn failed(
    failures: &mut u64,
    poisoned: &mut Option<bool>,
    entries: usize,
    e: &CoordinatorError,
) -> JournalError {
    *failures += 1;
    let storage_full = crate::db::is_storage_full(e);
    *poisoned = Some(storage_full);
    tracing::error!("committing {entries} scheduler entries: {e}");
    JournalError {
        failure: *failures,
        message: e.to_string(),
        storage_full,
    }
}

async fn commit_with_retries(
    writer: &mut Writer,
    db: &Db,
    batch: &Arc<Batch>,
) -> Result<(), CoordinatorError> {
    let mut attempt = 0;
    loop {
        match writer.commit(db, batch).await {
            Err(e) if attempt < 5 && crate::db::is_transient(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// The writes of one transaction, folded per row.
#[derive(Default)]
struct Batch {
    leases: BTreeMap<String, LeaseWrite>,
    units: BTreeMap<String, UnitRow>,
    workers: BTreeMap<String, WorkerRow>,
    seen: BTreeMap<String, (String, i64)>,
    payouts: BTreeMap<String, String>,
    jobs: BTreeMap<String, JobRow>,
    credits: Vec<CreditRow>,
    /// `Some(since)`: orphaned; `None`: no longer.
    orphans: BTreeMap<String, Option<i64>>,
}

enum LeaseWrite {
    Full(Box<LeaseRow>),
    State(&'static str),
}

impl Batch {
    fn of(writes: impl IntoIterator<Item = Write>) -> Self {
        let mut batch = Batch::default();
        for w in writes {
            batch.add(w);
        }
        batch
    }

    fn add(&mut self, write: Write) {
        match write {
            Write::Lease(row) => {
                self.leases
                    .insert(row.id.clone(), LeaseWrite::Full(Box::new(row)));
            }
            Write::LeaseState { id, state } => match self.leases.get_mut(&id) {
                Some(LeaseWrite::Full(row)) => {
                    row.state = state;
                    if state == CORRECT {
                        row.output = None;
                    }
                }
                _ => {
                    self.leases.insert(id, LeaseWrite::State(state));
                }
            },
            Write::Unit(row) => {
                self.units.insert(row.id.clone(), row);
            }
            Write::Worker(row) => {
                self.workers.insert(row.key.clone(), row);
            }
            Write::WorkerSeen { key, agent, now_ms } => {
                self.seen.insert(key, (agent, now_ms));
            }
            Write::Payout { key, address } => {
                self.payouts.insert(key, address);
            }
            Write::Job(row) => {
                self.jobs.insert(row.id.clone(), row);
            }
            Write::Credit(row) => self.credits.push(row),
            Write::Orphan { lease, since_ms } => {
                self.orphans.insert(lease, Some(since_ms));
            }
            Write::Unorphan { lease } => {
                self.orphans.insert(lease, None);
            }
        }
    }

    /// The batch as statements, each writing many rows of one table.
    fn statements(&self) -> Vec<Statement<'_>> {
        let mut out = Vec::new();
        // Logins first: every other worker write updates a row a login created.
        let seen: Vec<_> = self.seen.iter().collect();
        Statement::rows(
            &mut out,
            "INSERT INTO workers (key, payout, agent, verified, clean_streak, strikes, expired, banned, first_seen_ms, last_seen_ms)",
            &["$", "NULL", "$", "0", "0", "0", "0", "0", "$", "$"],
            "ON CONFLICT (key) DO UPDATE SET agent = excluded.agent, last_seen_ms = excluded.last_seen_ms",
            &seen,
            |(key, (agent, now)), v| {
                v.extend([text(key), text(agent), Value::Int(*now), Value::Int(*now)])
            },
        );
        let full: Vec<&LeaseRow> = self
            .leases
            .values()
            .filter_map(|w| match w {
                LeaseWrite::Full(row) => Some(row.as_ref()),
                LeaseWrite::State(_) => None,
            })
            .collect();
        Statement::rows(
            &mut out,
            "INSERT INTO leases (id, unit_id, worker, prefix, kind, state, issued_ms, deadline_ms, output_hash, output, signature, submitted_ms)",
            &["$"; 12],
            "ON CONFLICT (id) DO UPDATE SET state = excluded.state, deadline_ms = excluded.deadline_ms, \
             output_hash = excluded.output_hash, output = excluded.output, signature = excluded.signature, \
             submitted_ms = excluded.submitted_ms",
            &full,
            |r, v| {
                v.extend([
                    text(&r.id),
                    text(&r.unit_id),
                    text(&r.worker),
                    text(&r.prefix),
                    text(r.kind),
                    text(r.state),
                    Value::Int(r.issued_ms),
                    Value::Int(r.deadline_ms),
                    opt_text(r.output_hash.as_deref()),
                    opt_text(r.output.as_deref()),
                    opt_text(r.signature.as_deref()),
                    opt_int(r.submitted_ms),
                ])
            },
        );
        // A state change of a lease written in an earlier batch: an upsert whose insert half
        // never happens (the row exists), which is how one statement updates many rows on
        // both databases.
        let states: Vec<(&String, &'static str)> = self
            .leases
            .iter()
            .filter_map(|(id, w)| match w {
                LeaseWrite::State(s) => Some((id, *s)),
                LeaseWrite::Full(_) => None,
            })
            .collect();
        Statement::rows(
            &mut out,
            "INSERT INTO leases (id, unit_id, worker, prefix, kind, state, issued_ms, deadline_ms)",
            &["$", "''", "''", "''", "''", "$", "0", "0"],
            "ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
             output = CASE WHEN excluded.state = 'correct' THEN NULL ELSE leases.output END",
            &states,
            |(id, state), v| v.extend([text(id), text(state)]),
        );
        let units: Vec<&UnitRow> = self.units.values().collect();
        Statement::rows(
            &mut out,
            "INSERT INTO units (id, job_id, idx, seq, precision, task, digest, credit_micro, replicas, quorum, live, status, output, output_hash, verified_by, verified_ms, audit)",
            &[
                "$", "''", "0", "0", "''", "''", "''", "0", "$", "$", "0", "$", "$", "$", "$", "$",
                "$",
            ],
            "ON CONFLICT (id) DO UPDATE SET replicas = excluded.replicas, quorum = excluded.quorum, \
             status = excluded.status, output = excluded.output, output_hash = excluded.output_hash, \
             verified_by = excluded.verified_by, verified_ms = excluded.verified_ms, audit = excluded.audit",
            &units,
            |r, v| {
                v.extend([
                    text(&r.id),
                    Value::Int(r.replicas),
                    Value::Int(r.quorum),
                    text(r.status),
                    opt_text(r.output.as_deref()),
                    opt_text(r.output_hash.as_deref()),
                    opt_text(r.verified_by),
                    opt_int(r.verified_ms),
                    Value::Int(i64::from(r.audit)),
                ])
            },
        );
        let workers: Vec<&WorkerRow> = self.workers.values().collect();
        Statement::rows(
            &mut out,
            "INSERT INTO workers (key, payout, agent, verified, clean_streak, strikes, expired, banned, first_seen_ms, last_seen_ms)",
            &["$", "NULL", "''", "$", "$", "$", "$", "$", "0", "0"],
            "ON CONFLICT (key) DO UPDATE SET verified = excluded.verified, clean_streak = excluded.clean_streak, \
             strikes = excluded.strikes, expired = excluded.expired, banned = excluded.banned",
            &workers,
            |r, v| {
                v.extend([
                    text(&r.key),
                    Value::Int(r.verified),
                    Value::Int(r.clean_streak),
                    Value::Int(r.strikes),
                    Value::Int(r.expired),
                    Value::Int(i64::from(r.banned)),
                ])
            },
        );
        for (key, address) in &self.payouts {
            out.push(Statement {
                sql: Sql::Plain("UPDATE workers SET payout = $1 WHERE key = $2"),
                values: vec![text(address), text(key)],
            });
        }
        let jobs: Vec<&JobRow> = self.jobs.values().collect();
        Statement::rows(
            &mut out,
            "INSERT INTO jobs (id, kind, model, precision, idempotency_key, units_total, units_verified, status, created_ms, finished_ms)",
            &["$", "''", "''", "''", "NULL", "0", "$", "$", "0", "$"],
            "ON CONFLICT (id) DO UPDATE SET units_verified = excluded.units_verified, \
             status = excluded.status, finished_ms = excluded.finished_ms",
            &jobs,
            |r, v| {
                v.extend([
                    text(&r.id),
                    Value::Int(r.units_verified),
                    text(r.status),
                    opt_int(r.finished_ms),
                ])
            },
        );
        let credits: Vec<&CreditRow> = self.credits.iter().collect();
        Statement::rows(
            &mut out,
            "INSERT INTO credits (worker, unit_id, lease_id, credit_micro, receipt, issued_ms)",
            &["$"; 6],
            "ON CONFLICT DO NOTHING",
            &credits,
            |r, v| {
                v.extend([
                    text(&r.worker),
                    text(&r.unit_id),
                    text(&r.lease_id),
                    Value::Int(r.credit_micro),
                    text(&r.receipt),
                    Value::Int(r.issued_ms),
                ])
            },
        );
        let (marked, cleared): (Vec<_>, Vec<_>) =
            self.orphans.iter().partition(|(_, since)| since.is_some());
        Statement::rows(
            &mut out,
            "INSERT INTO orphaned_leases (lease_id, since_ms)",
            &["$", "$"],
            "ON CONFLICT DO NOTHING",
            &marked,
            |(lease, since), v| v.extend([text(lease), Value::Int(since.unwrap_or_default())]),
        );
        for chunk in cleared.chunks(ROWS_PER_STATEMENT) {
            out.push(Statement {
                sql: Sql::DeleteIn {
                    head: "DELETE FROM orphaned_leases WHERE lease_id IN",
                    count: chunk.len(),
                },
                values: chunk.iter().map(|(lease, _)| text(lease)).collect(),
            });
        }
        out
    }
}

/// One bound value, borrowed from the batch (outputs are not copied again).
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Text(&'a str),
    Int(i64),
    NullText,
    NullInt,
}

fn text(s: &str) -> Value<'_> {
    Value::Text(s)
}

fn opt_text(s: Option<&str>) -> Value<'_> {
    s.map_or(Value::NullText, Value::Text)
}

fn opt_int<'a>(n: Option<i64>) -> Value<'a> {
    n.map_or(Value::NullInt, Value::Int)
}

enum Sql {
    /// `head VALUES (…), (…) tail`: `"$"` columns are parameters, others constants.
    Rows {
        head: &'static str,
        columns: &'static [&'static str],
        rows: usize,
        tail: &'static str,
    },
    DeleteIn {
        head: &'static str,
        count: usize,
    },
    Plain(&'static str),
}

/// One statement of a batch: many rows of one table on PostgreSQL, or run row by row
/// ([`Statement::one_row`]) on SQLite.
struct Statement<'a> {
    sql: Sql,
    values: Vec<Value<'a>>,
}

impl<'a> Statement<'a> {
    /// Pushes statements writing `items` (at most [`ROWS_PER_STATEMENT`] rows each).
    fn rows<T>(
        out: &mut Vec<Statement<'a>>,
        head: &'static str,
        columns: &'static [&'static str],
        tail: &'static str,
        items: &[T],
        mut values: impl FnMut(&T, &mut Vec<Value<'a>>),
    ) {
        for chunk in items.chunks(ROWS_PER_STATEMENT) {
            let mut v = Vec::with_capacity(chunk.len() * columns.len());
            for item in chunk {
                values(item, &mut v);
            }
            out.push(Statement {
                sql: Sql::Rows {
                    head,
                    columns,
                    rows: chunk.len(),
                    tail,
                },
                values: v,
            });
        }
    }

    /// The SQL text, its parameters numbered from `first`, or anonymous (`?`) with `None`.
    fn render(&self, first: Option<usize>) -> String {
        match &self.sql {
            Sql::Rows {
                head,
                columns,
                rows,
                tail,
            } => values_sql(head, columns, *rows, tail, first),
            Sql::DeleteIn { head, count } => format!("{head} ({})", parameter_list(first, *count)),
            Sql::Plain(sql) => match first {
                Some(1) => (*sql).to_string(),
                _ => {
                    // `$1`, `$2`… in order, renumbered.
                    let mut out = String::new();
                    let mut n = 0;
                    let mut chars = sql.chars().peekable();
                    while let Some(c) = chars.next() {
                        if c == '$' {
                            while chars.peek().is_some_and(char::is_ascii_digit) {
                                chars.next();
                            }
                            out.push_str(&placeholder(first, n));
                            n += 1;
                        } else {
                            out.push(c);
                        }
                    }
                    out
                }
            },
        }
    }
}

/// The `i`-th parameter from `first` (`$n`), or `?` when anonymous. SQLite finds a numbered
/// parameter's name by a linear scan, so a statement of n numbered parameters binds in n²;
/// anonymous ones bind in order.
fn placeholder(first: Option<usize>, i: usize) -> String {
    match first {
        Some(first) => format!("${}", first + i),
        None => "?".to_string(),
    }
}

impl Statement<'_> {
    /// The statement for one of its rows, with anonymous parameters, and how many values
    /// each row binds: the form the SQLite writer prepares once and runs row by row.
    fn one_row(&self) -> (String, usize) {
        match &self.sql {
            Sql::Rows {
                head,
                columns,
                tail,
                ..
            } => (
                values_sql(head, columns, 1, tail, None),
                columns.iter().filter(|c| **c == "$").count(),
            ),
            Sql::DeleteIn { head, .. } => (format!("{head} (?)"), 1),
            Sql::Plain(_) => (self.render(None), self.values.len()),
        }
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Int(n) => ValueRef::Integer(n),
            Value::NullText | Value::NullInt => ValueRef::Null,
        }))
    }
}

fn bind_all<'q>(
    mut q: Query<'q, Any, AnyArguments<'q>>,
    values: &[Value<'q>],
) -> Query<'q, Any, AnyArguments<'q>> {
    for v in values {
        q = match *v {
            Value::Text(s) => q.bind(s),
            Value::Int(n) => q.bind(n),
            Value::NullText => q.bind(None::<String>),
            Value::NullInt => q.bind(None::<i64>),
        };
    }
    q
}

/// The writer's thread with its connection, started at the first batch and kept.
struct Writer {
    thread: Option<JournalThread>,
}

impl Writer {
    async fn commit(&mut self, db: &Db, batch: &Arc<Batch>) -> Result<(), CoordinatorError> {
        let _w = db.write().await;
        let thread = match (&mut self.thread, &db.sqlite_path, &db.postgres_url) {
            (Some(thread), ..) => thread,
            (None, Some(path), _) => self.thread.insert(JournalThread::sqlite(path.clone())),
            (None, None, Some(url)) => self.thread.insert(JournalThread::postgres(url.clone())),
            (None, None, None) => {
                return Err(CoordinatorError::Config(
                    "the journal has no database to write to".into(),
                ));
            }
        };
        thread.commit(batch.clone()).await
    }
}

/// A batch for the journal's thread, and where to say whether it committed.
type JournalJob = (Arc<Batch>, oneshot::Sender<Result<(), CoordinatorError>>);

/// The journal's own database connection, on a thread of its own that commits one batch at a
/// time as one transaction.
///
/// - SQLite: single-row statements prepared once per connection. SQLite compiles a statement
///   per row of a multi-row `VALUES` list, so sending it the batch as text made it parse and
///   compile every row of every commit; a cached statement only binds and steps. (Through
///   sqlx each statement would be a round trip to its connection thread; here the whole batch
///   is one.)
/// - PostgreSQL: one multi-row statement per table, on a single-threaded runtime. A
///   transaction is a round trip per statement (`BEGIN`, one per table, `COMMIT`), and on the
///   server's shared runtime the journal resumed after each one only when a worker thread was
///   free from the sessions: under load `BEGIN` alone took 3 ms of a 9.5 ms commit. Here
///   nothing else runs, so each reply is taken up at once (commits of 7.4 ms).
///
/// If the thread cannot start, every commit fails (its reply channel is dropped), which
/// poisons the journal and says why in the log.
struct JournalThread {
    jobs: std::sync::mpsc::Sender<JournalJob>,
}

impl JournalThread {
    fn sqlite(path: std::path::PathBuf) -> Self {
        Self::spawn(move |rx| {
            let mut conn: Option<rusqlite::Connection> = None;
            while let Ok((batch, done)) = rx.recv() {
                let result = match &mut conn {
                    Some(c) => commit_rows(c, &batch),
                    None => open_sqlite(&path).and_then(|c| commit_rows(conn.insert(c), &batch)),
                };
                if result.is_err() {
                    // Broken or mid-transaction: open afresh next time.
                    conn = None;
                }
                let _ = done.send(result.map_err(CoordinatorError::from));
            }
        })
    }

    fn postgres(url: String) -> Self {
        Self::spawn(move |rx| {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return tracing::error!("cannot start the journal's runtime: {e}"),
            };
            runtime.block_on(async move {
                let mut conn: Option<AnyConnection> = None;
                // Waiting for the next batch blocks the thread, which is fine: nothing else
                // runs on this runtime, and the connection is only driven while committing.
                while let Ok((batch, done)) = rx.recv() {
                    let result = match &mut conn {
                        Some(c) => commit_postgres(c, &batch.statements()).await,
                        None => match AnyConnection::connect(&url).await {
                            Ok(c) => commit_postgres(conn.insert(c), &batch.statements()).await,
                            Err(e) => Err(e.into()),
                        },
                    };
                    if result.is_err() {
                        // Broken or mid-transaction: start afresh next time.
                        conn = None;
                    }
                    let _ = done.send(result);
                }
            });
        })
    }

    fn spawn(run: impl FnOnce(std::sync::mpsc::Receiver<JournalJob>) + Send + 'static) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel();
        if let Err(e) = std::thread::Builder::new()
            .name("tabula-journal".into())
            .spawn(move || run(rx))
        {
            tracing::error!("cannot start the journal's thread: {e}");
        }
        Self { jobs }
    }

    async fn commit(&self, batch: Arc<Batch>) -> Result<(), CoordinatorError> {
        let (done, rx) = oneshot::channel();
        let gone = || CoordinatorError::Config("the journal's thread stopped".into());
        self.jobs.send((batch, done)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn open_sqlite(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    // As the pool's connections (`Db::open`): WAL with NORMAL sync survives a `kill -9`.
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn commit_rows(conn: &mut rusqlite::Connection, batch: &Batch) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for statement in batch.statements() {
        let (sql, per_row) = statement.one_row();
        let mut prepared = tx.prepare_cached(&sql)?;
        for row in statement.values.chunks(per_row.max(1)) {
            prepared.execute(rusqlite::params_from_iter(row))?;
        }
    }
    // Dropped without a commit (an error above), the transaction rolls back.
    tx.commit()
}

/// PostgreSQL: one transaction, one statement per table (its protocol takes one statement
/// per parameterised query).
async fn commit_postgres(
    conn: &mut AnyConnection,
    statements: &[Statement<'_>],
) -> Result<(), CoordinatorError> {
    let mut tx = conn.begin().await?;
    for s in statements {
        let sql = s.render(Some(1));
        bind_all(sqlx::query(&sql), &s.values)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// `count` parameters from `first`, comma-separated (`$1, $2, …` or `?, ?, …`).
pub(crate) fn parameter_list(first: Option<usize>, count: usize) -> String {
    (0..count)
        .map(|i| placeholder(first, i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `head VALUES (…), (…) tail` for `rows` rows whose columns are `columns`: `"$"` is the
/// next parameter (see [`placeholder`]), anything else is written as it is (a constant).
pub(crate) fn values_sql(
    head: &str,
    columns: &[&str],
    rows: usize,
    tail: &str,
    first: Option<usize>,
) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns.len() * 7);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            if *c == "$" {
                sql.push_str(&placeholder(first, n));
                n += 1;
            } else {
                sql.push_str(c);
            }
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(tail);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_sql_numbers_parameters_across_rows() {
        assert_eq!(
            values_sql(
                "INSERT INTO t (a, b, c)",
                &["$", "0", "$"],
                2,
                "ON CONFLICT DO NOTHING",
                Some(7)
            ),
            "INSERT INTO t (a, b, c) VALUES ($7, 0, $8), ($9, 0, $10) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            values_sql("INSERT INTO t (a, b)", &["$", "$"], 2, "", None),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) "
        );
        let plain = Statement {
            sql: Sql::Plain("UPDATE t SET a = $1 WHERE b = $2"),
            values: Vec::new(),
        };
        assert_eq!(plain.render(None), "UPDATE t SET a = ? WHERE b = ?");
        assert_eq!(plain.render(Some(4)), "UPDATE t SET a = $4 WHERE b = $5");
    }

    /// The SQLite writer runs each statement row by row: one row's SQL and its share of the
    /// values.
    #[test]
    fn one_row_of_each_statement_kind() {
        let rows = Statement {
            sql: Sql::Rows {
                head: "INSERT INTO t (a, b, c)",
                columns: &["$", "0", "$"],
                rows: 3,
                tail: "ON CONFLICT DO NOTHING",
            },
            values: vec![Value::Int(1); 6],
        };
        assert_eq!(
            rows.one_row(),
            (
                "INSERT INTO t (a, b, c) VALUES (?, 0, ?) ON CONFLICT DO NOTHING".into(),
                2
            )
        );
        let delete = Statement {
            sql: Sql::DeleteIn {
                head: "DELETE FROM t WHERE a IN",
                count: 4,
            },
            values: vec![Value::Int(1); 4],
        };
        assert_eq!(delete.one_row(), ("DELETE FROM t WHERE a IN (?)".into(), 1));
        let plain = Statement {
            sql: Sql::Plain("UPDATE t SET a = $1 WHERE b = $2"),
            values: vec![Value::Int(1); 2],
        };
        assert_eq!(
            plain.one_row(),
            ("UPDATE t SET a = ? WHERE b = ?".into(), 2)
        );
    }

    fn worker_row(key: &str, strikes: i64) -> Write {
        Write::Worker(WorkerRow {
            key: key.into(),
            verified: 0,
            clean_streak: 0,
            strikes,
            expired: 0,
            banned: false,
        })
    }

    /// After a failed batch nothing is written until `reset`, so no later decision is built on
    /// one the database refused; after it, writing resumes.
    #[tokio::test]
    async fn a_failed_batch_poisons_the_journal_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), None).await.unwrap());
        let journal = Journal::spawn(db.clone());
        let seen = |key: &str| Write::WorkerSeen {
            key: key.into(),
            agent: "test".into(),
            now_ms: 1,
        };
        journal.append(vec![seen("a")]).committed().await.unwrap();
        // The database refuses the next batch (its table is gone).
        sqlx::query("ALTER TABLE credits RENAME TO credits_away")
            .execute(&db.pool)
            .await
            .unwrap();
        let credit = Write::Credit(CreditRow {
            worker: "a".into(),
            unit_id: "u".into(),
            lease_id: "l".into(),
            credit_micro: 1,
            receipt: "{}".into(),
            issued_ms: 1,
        });
        let failed = journal
            .append(vec![worker_row("a", 1), credit])
            .committed()
            .await
            .unwrap_err();
        assert_eq!(failed.failure, 1);
        sqlx::query("ALTER TABLE credits_away RENAME TO credits")
            .execute(&db.pool)
            .await
            .unwrap();
        // Valid, but decided on the refused state: refused too.
        let poisoned = journal.append(vec![worker_row("a", 2)]).committed().await;
        assert!(poisoned.is_err());
        let strikes = || async {
            sqlx::Row::try_get::<i64, _>(
                &sqlx::query("SELECT strikes FROM workers WHERE key = 'a'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap(),
                "strikes",
            )
            .unwrap()
        };
        assert_eq!(strikes().await, 0, "a write of the failed batch landed");
        journal.reset();
        journal
            .append(vec![worker_row("a", 3)])
            .committed()
            .await
            .unwrap();
        assert_eq!(strikes().await, 3);
    }

    /// A batch that fails is committed again entry by entry: the entries before the bad one
    /// land, the bad one and those decided after it do not.
    #[tokio::test]
    async fn a_bad_entry_fails_only_itself_and_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), None).await.unwrap());
        // The database refuses one row (as PostgreSQL refuses a NUL in text).
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON workers WHEN NEW.agent = 'bad' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let journal = Journal::spawn(db.clone());
        let seen = |key: &str, agent: &str| Write::WorkerSeen {
            key: key.into(),
            agent: agent.into(),
            now_ms: 1,
        };
        // Appended together, before the writer runs: one batch.
        let pending: Vec<Pending> = [("a", "ok"), ("b", "ok"), ("c", "bad"), ("d", "ok")]
            .into_iter()
            .map(|(k, agent)| journal.append(vec![seen(k, agent)]))
            .collect();
        let mut results = Vec::new();
        for p in pending {
            results.push(p.committed().await.is_ok());
        }
        assert_eq!(results, [true, true, false, false]);
        let keys: Vec<String> = sqlx::query("SELECT key FROM workers ORDER BY key")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| sqlx::Row::try_get(r, "key").unwrap())
            .collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(journal.stats.batches.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn later_writes_to_a_row_replace_earlier_ones() {
        let mut batch = Batch::default();
        let lease = LeaseRow {
            id: "l1".into(),
            unit_id: "u".into(),
            worker: "w".into(),
            prefix: "p".into(),
            kind: "replica",
            state: "active",
            issued_ms: 1,
            deadline_ms: 2,
            output_hash: None,
            output: None,
            signature: None,
            submitted_ms: None,
        };
        batch.add(Write::Lease(lease));
        batch.add(Write::LeaseState {
            id: "l1".into(),
            state: "correct",
        });
        batch.add(Write::LeaseState {
            id: "l2".into(),
            state: "expired",
        });
        batch.add(Write::Orphan {
            lease: "l2".into(),
            since_ms: 5,
        });
        batch.add(Write::Unorphan { lease: "l2".into() });
        match &batch.leases["l1"] {
            LeaseWrite::Full(row) => assert_eq!(row.state, "correct"),
            LeaseWrite::State(_) => panic!("the full row was lost"),
        }
        assert!(matches!(batch.leases["l2"], LeaseWrite::State("expired")));
        assert_eq!(batch.orphans["l2"], None);
    }
}

//! The Tabula coordinator.
//!
//! It owns the requester API (OpenAI-compatible HTTP, [`api`]), the worker sockets ([`ws`]),
//! the scheduler that cuts jobs into units and leases them to distinct workers, the verifier
//! that accepts a unit when independent results agree (or after re-executing it itself), and
//! the credit ledger with signed receipts ([`scheduler`]), all stored through [`db`] in SQLite
//! or PostgreSQL; pipeline sessions (a model's layers split across workers, two pipelines
//! compared step by step) are planned, routed and judged in [`pipeline`]. It computes only to
//! referee, through `tabula-worker`'s executor; it must not
//! depend on the browser build or the CLI.

pub mod api;
pub mod batch;
pub mod db;
pub mod journal;
pub mod models;
pub mod net;
pub mod pipeline;
pub mod scheduler;
pub mod server;
pub mod settlement;
pub mod site;
pub mod ws;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tabula_protocol::Identity;

pub use models::{ModelSource, ModelWatch};

/// Everything that can go wrong inside the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// From the journal's own SQLite connection.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("model: {0}")]
    Model(#[from] tabula_models::ModelError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Worker(#[from] tabula_worker::WorkerError),
    #[error("chain: {0}")]
    Chain(#[from] tabula_chain::ChainError),
    #[error("{0}")]
    Journal(journal::JournalError),
}

/// How the coordinator runs; every field has a working default.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Workers each unit goes to at first.
    pub replicas: u32,
    /// A unit whose results keep disagreeing gets more replicas up to this, then is refereed.
    pub max_replicas: u32,
    /// Units a worker must have verified (with no wrong answer since) before its agreement
    /// counts without a referee; until then agreeing results are re-executed by the
    /// coordinator, so a pair of new colluders cannot outvote the truth.
    pub probation_units: u32,
    /// Clean units after which a worker may run units unreplicated.
    pub solo_after: u32,
    /// Fraction of a trusted worker's units still replicated (spot checks).
    pub spot_check_rate: f64,
    /// Fraction of leases that are known-answer canaries (already verified units).
    pub canary_rate: f64,
    /// Wrong or expired results after which a key is banned.
    pub ban_after: u32,
    /// Fraction of units verified without the referee (by a quorum of trusted workers, or
    /// solo) that the referee re-executes after the fact. A caught liar is banned, its
    /// partners in the wrong quorum too, and every unit they helped verify in the audit
    /// window is audited in turn.
    pub audit_rate: f64,
    /// Credit settles on-chain only once it is this old (its audit window closed), and never
    /// for a banned worker.
    pub audit_window_ms: u64,
    /// Active leases one key may hold once past probation (`--units-in-flight` is at most 16).
    pub max_leases_per_key: u32,
    /// Active leases one key may hold during probation: its results cost the referee, so a
    /// fresh key gets one unit at a time.
    pub probation_leases: u32,
    /// Active leases all keys of one network prefix may hold together.
    pub max_leases_per_prefix: u32,
    /// Leases a key may give back or abandon (released, or expired after its connection
    /// ended) beyond a quarter of its verified units; past it the key gets no more units.
    pub abandon_allowance: u32,
    /// Keys never seen before that may log in from one network prefix per minute.
    pub new_keys_per_minute: u32,
    /// Units one API key may have queued (in running jobs) at once.
    pub max_queued_units: u64,
    /// Units at `referee` assurance one API key may have waiting at once: each is computed by
    /// the coordinator itself.
    pub max_referee_units: u64,
    pub lease_ms: u64,
    /// How long a unit's newest result waits for the unit's other replicas, with no lease on
    /// it running, before the referee finishes it: no other worker could take it in that time
    /// (too few connected, or all have seen it), and a job must not wait forever.
    pub replica_wait_ms: u64,
    pub heartbeat_ms: u32,
    /// Sequences per embedding unit.
    pub unit_sequences: usize,
    /// Loopback workers count as distinct network prefixes (a one-machine cluster).
    pub local: bool,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`--trusted-proxy`); behind
    /// one, every worker would otherwise share the proxy's network.
    pub trusted_proxies: Vec<net::Cidr>,
    /// Sockets open at once; 0 derives the cap from the open-file limit ([`server::Limits`]).
    pub max_connections: usize,
    /// Sockets open at once from one address (an IPv4 address or an IPv6 /64), trusted proxies
    /// excepted.
    pub max_connections_per_address: usize,
    /// The time a request's head may take to arrive, also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout_ms: u64,
    /// How long a synchronous API request waits for its job.
    pub request_timeout_ms: u64,
    /// The static site served under `/` (the volunteer page); `None` serves a note instead.
    pub www_dir: Option<PathBuf>,
    /// An EVM JSON-RPC endpoint for the credit contract; `None` runs the embedded EVM, whose
    /// state lives in the data directory.
    pub chain_rpc: Option<String>,
    /// The credit contract on `chain_rpc`; `None` deploys it once and remembers it.
    pub chain_contract: Option<tabula_chain::Address>,
    /// The chain key's file; `None` means `data_dir/chain.key`, created on first start.
    pub chain_key_file: Option<PathBuf>,
    /// The chain key itself (64 hex digits), which wins over the file.
    pub chain_key: Option<String>,
    /// Minutes between epochs (a root posted when there is new credit; fractions allowed);
    /// 0 posts only on demand (`tabula chain post-epoch`).
    pub epoch_minutes: f64,
    /// When a generation runs as pipeline stages on several workers.
    pub pipeline: pipeline::PipelineMode,
    /// Disjoint pipelines that run each session and are compared at every step.
    pub pipeline_replicas: u32,
    /// How long stages try for a direct WebRTC path before relaying through the coordinator.
    pub pipeline_direct_ms: u32,
    /// How long a session waits for enough free stage workers before it fails.
    pub pipeline_wait_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("tabula-data"),
            database_url: None,
            replicas: 2,
            max_replicas: 4,
            probation_units: 3,
            solo_after: 200,
            spot_check_rate: 0.02,
            canary_rate: 0.01,
            ban_after: 3,
            audit_rate: 0.05,
            audit_window_ms: 30 * 60_000,
            max_leases_per_key: 16,
            probation_leases: 1,
            max_leases_per_prefix: 256,
            abandon_allowance: 16,
            new_keys_per_minute: 60,
            max_queued_units: 20_000,
            max_referee_units: 1_000,
            lease_ms: 120_000,
            replica_wait_ms: 120_000,
            heartbeat_ms: 5_000,
            unit_sequences: 4,
            local: false,
            trusted_proxies: Vec::new(),
            max_connections: 0,
            max_connections_per_address: 256,
            header_timeout_ms: 20_000,
            request_timeout_ms: 600_000,
            www_dir: site::default_www_dir(),
            chain_rpc: None,
            chain_contract: None,
            chain_key_file: None,
            chain_key: None,
            epoch_minutes: 60.0,
            pipeline: pipeline::PipelineMode::Auto,
            pipeline_replicas: 2,
            pipeline_direct_ms: 5_000,
            pipeline_wait_ms: 30_000,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |m: &str| Err(CoordinatorError::Config(m.into()));
        if self.replicas == 0 || self.replicas > 16 {
            return bad("--replicas must be between 1 and 16");
        }
        if self.max_replicas < self.replicas || self.max_replicas > 32 {
            return bad("--max-replicas must be at least --replicas and at most 32");
        }
        if !(0.0..=1.0).contains(&self.spot_check_rate)
            || !(0.0..=1.0).contains(&self.canary_rate)
            || !(0.0..=1.0).contains(&self.audit_rate)
        {
            return bad("rates must be between 0 and 1");
        }
        if self.max_leases_per_key == 0
            || self.probation_leases == 0
            || self.probation_leases > self.max_leases_per_key
            || self.max_leases_per_prefix < self.max_leases_per_key
        {
            return bad(
                "lease caps must be at least 1, --probation-leases at most --max-leases-per-key, and --max-leases-per-prefix at least --max-leases-per-key",
            );
        }
        if self.audit_window_ms > 30 * 24 * 3_600_000 {
            return bad("--audit-window-minutes must be between 0 and 43200 (30 days)");
        }
        if self.max_connections_per_address == 0 || self.max_connections_per_address > 1 << 20 {
            return bad("--max-connections-per-address must be between 1 and 1048576");
        }
        if self.max_connections > 1 << 20 {
            return bad(
                "--max-connections must be at most 1048576 (0 picks it from the open-file limit)",
            );
        }
        if !(1000..=3_600_000).contains(&self.header_timeout_ms) {
            return bad("--header-timeout-secs must be between 1 and 3600");
        }
        if self.lease_ms < 1000 {
            return bad("--lease-secs must be at least 1");
        }
        if !(1000..=86_400_000).contains(&self.replica_wait_ms) {
            return bad("--replica-wait-secs must be between 1 and 86400");
        }
        if !(0.0..=7.0 * 24.0 * 60.0).contains(&self.epoch_minutes)
            || (self.epoch_minutes > 0.0 && self.epoch_minutes < 1.0 / 60.0)
        {
            return bad(
                "--epoch-minutes must be 0 (on demand only) or between 1/60 (a second) and 10080 (a week)",
            );
        }
        if self.unit_sequences == 0 || self.unit_sequences > tabula_protocol::MAX_SEQUENCES {
            return bad("--unit-sequences must be between 1 and 64");
        }
        if !(1..=4).contains(&self.pipeline_replicas) {
            return bad("--pipeline-replicas must be between 1 and 4");
        }
        if self.pipeline_direct_ms > 60_000 {
            return bad("--pipeline-direct-secs must be at most 60");
        }
        if !(1000..=3_600_000).contains(&self.pipeline_wait_ms) {
            return bad("--pipeline-wait-secs must be between 1 and 3600");
        }
        Ok(())
    }
}

/// Loads the coordinator's receipt-signing key from `data_dir/coordinator.key`, creating it
/// on first start.
pub fn coordinator_identity(data_dir: &std::path::Path) -> Result<Identity, CoordinatorError> {
    Ok(tabula_worker::keyfile::load_or_create(
        &data_dir.join("coordinator.key"),
        db::random_bytes::<32>,
    )?)
}

/// Runs the coordinator until `shutdown` resolves, serving `sources` and, with `watch`, the
/// models added while it runs.
pub async fn serve(
    config: Config,
    sources: Vec<ModelSource>,
    watch: Option<ModelWatch>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    let db = db::Db::open(&config.data_dir, config.database_url.as_deref()).await?;
    let identity = coordinator_identity(&config.data_dir)?;
    let models = Arc::new(models::Models::new(models::Registry::load(&sources)?));
    let settlement = Arc::new(settlement::Settlement::open(&config).await?);
    settlement.check_chain(&db).await?;
    db.claim(&config.data_dir).await?;
    let state = scheduler::State::new(config.clone(), db, identity, models, settlement).await?;
    state.start_background_tasks();
    if let Some(watch) = watch {
        tokio::spawn(models::watch(state.models.clone(), watch));
    }
    let open_files = server::raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            CoordinatorError::Config(format!("cannot listen on {}: {e}", config.listen))
        })?;
    tracing::info!(
        address = %config.listen,
        database = ?state.db.flavor,
        models = ?state.registry().names(),
        "coordinator listening"
    );
    let limits = server::Limits {
        max_connections: config.max_connections,
        max_per_address: config.max_connections_per_address,
        header_timeout: std::time::Duration::from_millis(config.header_timeout_ms),
        trusted_proxies: config.trusted_proxies.clone(),
    };
    server::serve(listener, api::router(state), limits, open_files, shutdown)
        .await
        .map_err(|e| CoordinatorError::Config(format!("server: {e}")))
}

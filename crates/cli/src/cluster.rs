//! `tabula serve`, `tabula keys create` and `tabula worker`: the coordinator and a volunteer
//! worker, with defaults that work with zero configuration on one machine.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use tabula_coordinator::{Config, ModelSource, db::Db};
use tabula_engine::cpu::CpuBackend;
use tabula_models::catalog;
use tabula_protocol::{Address, Precision};
use tabula_worker::{
    Executor,
    native::{self, WorkerEvent, WorkerOptions},
};

use crate::{BackendChoice, Precision as CliPrecision};

/// `$TABULA_DATA`, else `$XDG_DATA_HOME/tabula`, else `~/.local/share/tabula`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tabula");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/share/tabula")
}

/// Where the coordinator keeps its state.
#[derive(Args)]
pub struct StoreArgs {
    /// The coordinator's data dir: the SQLite database, its keys, the embedded chain
    /// [default: $XDG_DATA_HOME/tabula or ~/.local/share/tabula].
    #[arg(long, env = "TABULA_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Use this database instead of SQLite in the data dir, e.g. postgres://user@host/db.
    #[arg(long, env = "TABULA_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl StoreArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TABULA_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    chain: crate::chain::ChainOptions,
    /// Minutes between epochs: the credit of linked payout addresses goes on-chain as one
    /// Merkle root (only when there is new credit; fractions allowed). 0: only `tabula chain
    /// post-epoch`.
    #[arg(long, env = "TABULA_EPOCH_MINUTES", default_value_t = 60.0)]
    epoch_minutes: f64,
    /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models].
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Serve only these models (comma-separated names, from the catalogue or added with
    /// `tabula models add`) [default: every model in the models directory, and each model
    /// added there while serving, from the moment `models add` finishes].
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// The volunteer page's directory, served at / [default: ./www, else the source tree's
    /// www/ (build it with `npm run build`)].
    #[arg(long, env = "TABULA_WWW")]
    www: Option<PathBuf>,
    /// Workers each unit goes to.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Most workers a disputed unit goes to before the coordinator referees it.
    #[arg(long, default_value_t = 4)]
    max_replicas: u32,
    /// Verified units before a worker's agreement counts without a referee.
    #[arg(long, default_value_t = 3)]
    probation_units: u32,
    /// Clean units after which a worker may run units unreplicated.
    #[arg(long, default_value_t = 200)]
    solo_after: u32,
    /// Fraction of a trusted worker's units still replicated (on top of --audit-rate).
    #[arg(long, default_value_t = 0.02)]
    spot_check_rate: f64,
    /// Fraction of leases that are known-answer canaries (units the referee computed or
    /// confirmed).
    #[arg(long, default_value_t = 0.01)]
    canary_rate: f64,
    /// Wrong or abandoned results after which a worker key is banned.
    #[arg(long, default_value_t = 3)]
    ban_after: u32,
    /// Fraction of units verified without the referee (trusted quorum or solo) that the
    /// coordinator re-executes after the fact; a caught liar is banned and everything it
    /// helped verify in the audit window is audited too.
    #[arg(long, default_value_t = 0.05)]
    audit_rate: f64,
    /// Units one worker key may hold at once after probation.
    #[arg(long, default_value_t = 16)]
    max_leases_per_key: u32,
    /// Units one worker key may hold at once during probation.
    #[arg(long, default_value_t = 1)]
    probation_leases: u32,
    /// Units all worker keys of one network (/24 or /48) may hold at once.
    #[arg(long, default_value_t = 256)]
    max_leases_per_prefix: u32,
    /// Units a worker key may give back or abandon, beyond a quarter of its verified units,
    /// before it gets no more.
    #[arg(long, default_value_t = 16)]
    abandon_allowance: u32,
    /// Worker keys never seen before that may log in from one network per minute.
    #[arg(long, default_value_t = 60)]
    new_keys_per_minute: u32,
    /// Units one API key may have queued in running jobs at once (more: HTTP 429).
    #[arg(long, default_value_t = 20_000)]
    max_queued_units: u64,
    /// Units at "referee" assurance (the coordinator re-executes each itself) one API key may
    /// have waiting at once (more: HTTP 429).
    #[arg(long, default_value_t = 1_000)]
    max_referee_units: u64,
    /// Seconds a worker has to return a unit before it goes to another.
    #[arg(long, default_value_t = 120)]
    lease_secs: u64,
    /// Seconds a unit's results wait for its other replicas (with none running) before the
    /// coordinator finishes it itself: a cluster with too few workers still answers.
    #[arg(long, default_value_t = 120)]
    replica_wait_secs: u64,
    /// Sequences per embedding unit.
    #[arg(long, default_value_t = 4)]
    unit_sequences: usize,
    /// Seconds an API request waits for its verified result.
    #[arg(long, default_value_t = 600)]
    request_timeout_secs: u64,
    /// A one-machine cluster: workers on loopback count as distinct networks.
    #[arg(long)]
    local: bool,
    /// A reverse proxy (an address or a network, like 10.0.0.0/8) whose X-Forwarded-For
    /// header names the real client; repeat for several. Without it, every worker behind the
    /// proxy has the proxy's address and no unit finds a second replica.
    #[arg(long, value_name = "CIDR")]
    trusted_proxy: Vec<tabula_coordinator::net::Cidr>,
    /// Connections open at once; past it a new one is answered 503 and closed. 0 takes the
    /// open-file limit (raised to its maximum at start) less 256.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Connections open at once from one address (an IPv6 /64 counts as one); past it a new
    /// one is answered 429 and closed. Trusted proxies are exempt.
    #[arg(long, default_value_t = 256)]
    max_connections_per_address: usize,
    /// Seconds a request's headers may take to arrive, also how long an idle keep-alive
    /// connection stays open (slow or silent clients are disconnected after it).
    #[arg(long, default_value_t = 20)]
    header_timeout_secs: u64,
    /// When a generation runs as pipeline stages spread over several workers (activations
    /// over WebRTC between them): `auto` when no connected worker can hold the model whole
    /// (by its --max-model-mb), `off` never, or a number of stages for every exact
    /// single-prompt generation.
    #[arg(long, default_value = "auto", value_parser = parse_pipeline)]
    pipeline: tabula_coordinator::pipeline::PipelineMode,
    /// Disjoint pipelines (distinct workers and networks at every stage) that run each
    /// session and are compared at every token.
    #[arg(long, default_value_t = 2)]
    pipeline_replicas: u32,
    /// Seconds stages try for a direct WebRTC data channel before relaying activations
    /// through the coordinator.
    #[arg(long, default_value_t = 5)]
    pipeline_direct_secs: u32,
    /// Seconds a pipeline session waits for enough free stage workers (to start, or to
    /// replace one that left) before it fails with HTTP 503.
    #[arg(long, default_value_t = 30)]
    pipeline_wait_secs: u64,
}

fn parse_pipeline(s: &str) -> Result<tabula_coordinator::pipeline::PipelineMode, String> {
    s.parse()
}

/// The models present in `dir` (the catalogue's, then those `tabula models add` registered),
/// each with its exact-precision file (quantised now if missing).
///
/// With `only`, just those names (an unknown one is an error listing the models there are),
/// and only those are quantised.
pub fn model_sources(dir: &std::path::Path, only: Option<&[String]>) -> Result<Vec<ModelSource>> {
    let wanted =
        |name: &str| only.is_none_or(|names| names.iter().any(|n| n.eq_ignore_ascii_case(name)));
    let added = crate::added::registered(dir)?;
    if let Some(names) = only {
        for name in names {
            let known = catalog::ALL
                .iter()
                .any(|s| s.name.eq_ignore_ascii_case(name))
                || added.iter().any(|a| a.name.eq_ignore_ascii_case(name));
            if !known {
                let there: Vec<&str> = catalog::ALL
                    .iter()
                    .map(|s| s.name)
                    .chain(added.iter().map(|a| a.name.as_str()))
                    .collect();
                bail!(
                    "--models names `{name}`, which is neither in the catalogue nor added (known: \
                     {}; `tabula models add` registers a file of your own)",
                    there.join(", ")
                );
            }
        }
    }
    let mut sources = Vec::new();
    for spec in catalog::ALL.iter().filter(|s| wanted(s.name)) {
        if spec.files.iter().any(|f| !dir.join(f.local_path).exists()) {
            tracing::warn!("{} is not in {}; not serving it", spec.name, dir.display());
            continue;
        }
        let exact = crate::quantize::exact_file(dir, spec)?;
        sources.push(ModelSource::catalogue(spec, dir, exact));
    }
    for added in added.into_iter().filter(|a| wanted(&a.name)) {
        let files = added.files(dir);
        if let Some((path, _)) = files.iter().find(|(path, _)| !path.exists()) {
            tracing::warn!(
                "{} ({}) is missing; not serving it",
                added.name,
                path.display()
            );
            continue;
        }
        let exact = crate::added::exact_file(dir, &added)?;
        sources.push(ModelSource {
            name: added.name.clone(),
            family: match added.family {
                crate::added::AddedFamily::Llama => catalog::Family::Llama,
                crate::added::AddedFamily::Bert => catalog::Family::Bert,
            },
            files,
            dir: dir.join("added"),
            exact,
        });
    }
    if sources.is_empty() {
        bail!(
            "no models in {}: run `tabula models fetch --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    Ok(sources)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let data_dir = args.store.data_dir();
    let config = Config {
        listen: args.listen,
        data_dir: data_dir.clone(),
        database_url: args.store.database_url.clone(),
        epoch_minutes: args.epoch_minutes,
        pipeline: args.pipeline,
        pipeline_replicas: args.pipeline_replicas,
        pipeline_direct_ms: args.pipeline_direct_secs.saturating_mul(1000),
        pipeline_wait_ms: args.pipeline_wait_secs.saturating_mul(1000),
        replicas: args.replicas,
        max_replicas: args.max_replicas,
        probation_units: args.probation_units,
        solo_after: args.solo_after,
        spot_check_rate: args.spot_check_rate,
        canary_rate: args.canary_rate,
        ban_after: args.ban_after,
        audit_rate: args.audit_rate,
        max_leases_per_key: args.max_leases_per_key,
        probation_leases: args.probation_leases,
        max_leases_per_prefix: args.max_leases_per_prefix,
        abandon_allowance: args.abandon_allowance,
        new_keys_per_minute: args.new_keys_per_minute,
        max_queued_units: args.max_queued_units,
        max_referee_units: args.max_referee_units,
        lease_ms: args.lease_secs.saturating_mul(1000),
        replica_wait_ms: args.replica_wait_secs.saturating_mul(1000),
        unit_sequences: args.unit_sequences,
        local: args.local,
        trusted_proxies: args.trusted_proxy.clone(),
        max_connections: args.max_connections,
        max_connections_per_address: args.max_connections_per_address,
        header_timeout_ms: args.header_timeout_secs.saturating_mul(1000),
        request_timeout_ms: args.request_timeout_secs.saturating_mul(1000),
        www_dir: args.www.or_else(tabula_coordinator::site::default_www_dir),
        ..args.chain.apply(Config::default())?
    };
    config.validate()?;
    let models_dir = crate::models_dir(args.models_dir);
    let sources = model_sources(&models_dir, args.models.as_deref())?;
    // Without --models, every model is served: those added later too.
    let watch = args
        .models
        .is_none()
        .then(|| tabula_coordinator::ModelWatch {
            file: crate::added::registry_path(&models_dir),
            load: Box::new(move || model_sources(&models_dir, None).map_err(|e| format!("{e:#}"))),
        });
    eprintln!(
        "tabula coordinator on http://{} (data in {}{})",
        config.listen,
        data_dir.display(),
        if config.local { ", local cluster" } else { "" }
    );
    eprintln!(
        "  workers: tabula worker --coordinator http://{}   API keys: tabula keys create",
        config.listen
    );
    runtime()?.block_on(async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping");
        };
        tabula_coordinator::serve(config, sources, watch, shutdown).await
    })?;
    Ok(())
}

#[derive(Args)]
pub struct KeysArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// A label to remember the key by.
    #[arg(long, default_value = "")]
    label: String,
    /// Limit the key's jobs to these workers (their public keys, as `tabula worker` prints
    /// them, comma-separated): a private pool for data that must not reach strangers.
    #[arg(long, value_delimiter = ',', value_name = "WORKER_KEY")]
    workers: Vec<String>,
}

/// `tabula keys create`: prints a new API key on stdout.
pub fn create_key(args: KeysArgs) -> Result<()> {
    let data_dir = args.store.data_dir();
    let pool = args
        .workers
        .iter()
        .map(|w| {
            tabula_protocol::PublicKey::from_hex(w.trim()).map_err(|_| {
                anyhow::anyhow!(
                    "--workers: `{w}` is not a worker key (64 hex digits, as `tabula worker` prints it)"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let key = runtime()?.block_on(async {
        let db = Db::open(&data_dir, args.store.database_url.as_deref()).await?;
        db.create_api_key(&args.label, &pool).await
    })?;
    println!("{key}");
    Ok(())
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "TABULA_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    coordinator: String,
    /// Where this worker keeps its key and its weight cache [default: <data dir>/worker].
    #[arg(long, env = "TABULA_WORKER_STATE")]
    state_dir: Option<PathBuf>,
    /// EVM address that on-chain credit goes to (0x + 40 hex digits).
    #[arg(long)]
    payout: Option<String>,
    /// Where units compute. `auto` times a short exact test on the GPU (when wgpu finds one)
    /// and on the CPU, and computes on the faster (a software adapter such as lavapipe loses
    /// to the CPU it runs on).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: WorkerBackend,
    /// Which units to take: exact (compared by hash) or fast (compared with a tolerance).
    #[arg(long, value_enum, default_value = "exact")]
    precision: CliPrecision,
    /// Stop after this many units (default: run until Ctrl-C).
    #[arg(long)]
    max_units: Option<u64>,
    /// Units to hold at once: one computing, the rest leased and waiting, so the next unit
    /// is already here when one finishes. More hides a slow link to the coordinator; fewer
    /// keeps less work waiting if you stop (waiting units are given back on Ctrl-C).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=native::MAX_UNITS_IN_FLIGHT as i64))]
    units_in_flight: u32,
    /// Compute threads: units computed side by side, each thread with its own copy of the
    /// model (MiniLM: 23 MB in exact precision, SmolLM2: 135 MB). At least this many units
    /// are held. [default: every core with `--backend cpu`, 1 with `--backend gpu`]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=tabula_worker::exec::MAX_THREADS as i64))]
    threads: Option<u32>,
    /// The most model weights this worker holds, in MiB (0: no limit). The coordinator leases
    /// it no unit of a larger model (the worker refuses one if it comes), and splits such a
    /// model into pipeline stages that fit (with `--pipeline auto`).
    #[arg(long, default_value_t = 0)]
    max_model_mb: u32,
    /// Do not take pipeline stages (a share of a model too large for one worker, linked to
    /// other workers over WebRTC).
    #[arg(long)]
    no_stages: bool,
    /// How a pipeline stage reaches its neighbours: `auto` tries a direct WebRTC data channel
    /// and relays through the coordinator if none comes up; `relay` always relays (for a
    /// network that blocks UDP).
    #[arg(long, value_enum, default_value = "auto")]
    stage_links: StageLinks,
}

/// `tabula worker --backend`.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
enum WorkerBackend {
    /// The faster of the GPU and the CPU in a short exact test.
    Auto,
    /// The CPU (SIMD GEMM, int8 kernels).
    Cpu,
    /// wgpu: Vulkan/Metal/DX12 (a software Vulkan device such as lavapipe works too).
    Gpu,
}

/// `--backend auto`: the [`Calibration`](tabula_engine::exact::selfcheck::Calibration)
/// workload timed on the GPU wgpu finds (if any) and on one CPU thread; the faster computes.
/// Returns the choice and why, for the start line.
fn calibrate() -> Result<(BackendChoice, String)> {
    use tabula_engine::exact::selfcheck::Calibration;
    let gpu = match crate::run::gpu_backend() {
        Ok(gpu) => gpu,
        Err(e) => return Ok((BackendChoice::Cpu, format!("no GPU adapter ({e})"))),
    };
    let t0 = std::time::Instant::now();
    let now = || t0.elapsed().as_secs_f64() * 1000.0;
    let cpu_ms = pollster::block_on(Calibration::new(&CpuBackend)?.best_ms(&CpuBackend, now))?;
    let gpu_ms = pollster::block_on(Calibration::new(&gpu)?.best_ms(&gpu, now))?;
    Ok(faster(cpu_ms, gpu_ms, &gpu.adapter_label()))
}

/// The faster of the CPU and the GPU named `adapter`, given each one's time for the same
/// test, and why in words; a tie goes to the CPU.
fn faster(cpu_ms: f64, gpu_ms: f64, adapter: &str) -> (BackendChoice, String) {
    if gpu_ms < cpu_ms {
        (
            BackendChoice::Gpu,
            format!(
                "the GPU ({adapter}) ran a short exact test {:.1}× as fast as one CPU thread \
                 ({gpu_ms:.0} ms against {cpu_ms:.0} ms)",
                cpu_ms / gpu_ms
            ),
        )
    } else {
        (
            BackendChoice::Cpu,
            format!(
                "one CPU thread ran a short exact test {:.1}× as fast as the GPU ({adapter}) \
                 ({cpu_ms:.0} ms against {gpu_ms:.0} ms)",
                gpu_ms / cpu_ms
            ),
        )
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StageLinks {
    Auto,
    Relay,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| default_data_dir().join("worker"));
    let payout = args
        .payout
        .as_deref()
        .map(|p| {
            Address::from_hex(p).map_err(|_| {
                anyhow::anyhow!(
                    "--payout `{p}` is not an EVM address (0x followed by 40 hex digits)"
                )
            })
        })
        .transpose()?;
    native::socket_url(&args.coordinator)?;
    let identity = native::load_or_create_identity(&state_dir)?;
    let precision = match args.precision {
        CliPrecision::Exact => Precision::Exact,
        CliPrecision::Fast => Precision::Fast,
    };
    let backend = match args.backend {
        WorkerBackend::Cpu => BackendChoice::Cpu,
        WorkerBackend::Gpu => BackendChoice::Gpu,
        WorkerBackend::Auto => {
            eprintln!("timing a short exact test on the GPU and the CPU…");
            let (backend, why) = calibrate()?;
            eprintln!(
                "computing on the {}: {why}",
                if backend == BackendChoice::Gpu {
                    "GPU"
                } else {
                    "CPU"
                }
            );
            backend
        }
    };
    let backend_name = match backend {
        BackendChoice::Cpu => "cpu",
        BackendChoice::Gpu => "gpu",
    };
    let threads = match (args.threads, backend) {
        (Some(n), _) => n as usize,
        (None, BackendChoice::Cpu) => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(tabula_worker::exec::MAX_THREADS),
        (None, BackendChoice::Gpu) => 1,
    };
    let kernel = tabula_engine::exact::kernels::Kernel::active();
    if precision == Precision::Exact && matches!(backend, BackendChoice::Cpu) {
        // Every int8 kernel this processor has must give the reference's bits, or this
        // worker's exact results would be struck as lies.
        let diffs = tabula_engine::exact::selfcheck::compare_cpu_kernels()?;
        if !diffs.is_empty() {
            anyhow::bail!(
                "this processor's int8 kernels disagree with the reference ({}), so its exact \
                 results would be struck; `--precision fast` still works. Please report it with \
                 the output of `lscpu`",
                diffs.join("; ")
            );
        }
    }
    eprintln!(
        "worker {} → {} ({backend_name}, {} precision, {threads} compute thread{}, int8 kernel \
         {kernel}); key in {}",
        identity.public(),
        args.coordinator,
        precision.as_str(),
        if threads == 1 { "" } else { "s" },
        state_dir.display()
    );
    let options = WorkerOptions {
        coordinator: args.coordinator,
        state_dir,
        precisions: vec![precision],
        payout,
        agent: format!("tabula-cli/{} {backend_name}", env!("CARGO_PKG_VERSION")),
        max_units: args.max_units,
        units_in_flight: args.units_in_flight as usize,
        threads,
        stages: !args.no_stages,
        max_model_mb: args.max_model_mb,
        member: tabula_worker::member::MemberOptions {
            direct: matches!(args.stage_links, StageLinks::Auto),
            // A stage computes where the worker's units do.
            gpu: matches!(backend, BackendChoice::Gpu),
            ..Default::default()
        },
    };
    let runtime = runtime()?;
    let stats = runtime.block_on(async move {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("\nstopping: releasing the current unit");
            let _ = stop_tx.send(true);
        });
        let display = tokio::spawn(show_progress(events));
        let result = match backend {
            BackendChoice::Cpu => {
                native::run(
                    || Ok(Executor::new(CpuBackend)),
                    identity,
                    options,
                    events_tx,
                    stop,
                )
                .await
            }
            BackendChoice::Gpu => {
                native::run(
                    || {
                        let gpu = crate::run::gpu_backend()
                            .map_err(|e| tabula_worker::WorkerError::Model(e.to_string()))?;
                        Ok(Executor::new(gpu))
                    },
                    identity,
                    options,
                    events_tx,
                    stop,
                )
                .await
            }
        };
        let _ = display.await;
        result
    })?;
    eprintln!(
        "done: {} units submitted, {} accepted, {} rejected; verified credit {:.3}",
        stats.submitted,
        stats.accepted,
        stats.rejected,
        stats.credit_micro as f64 / 1e6
    );
    Ok(())
}

async fn show_progress(mut events: tokio::sync::mpsc::UnboundedReceiver<WorkerEvent>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("connecting");
    let (mut units, mut credit, mut last_ms) = (0u64, 0u64, 0u64);
    while let Some(event) = events.recv().await {
        let status = match event {
            WorkerEvent::Connected { credit_micro } => {
                credit = credit_micro;
                "connected".to_string()
            }
            WorkerEvent::Disconnected { error, retry_in } => {
                format!(
                    "disconnected ({error}); retrying in {:.1} s",
                    retry_in.as_secs_f64()
                )
            }
            WorkerEvent::Computing { model } => format!("computing a {model} unit"),
            WorkerEvent::Submitted { millis } => {
                units += 1;
                last_ms = millis;
                "submitted".into()
            }
            WorkerEvent::Accepted => "waiting for work".into(),
            WorkerEvent::Rejected { reason } => format!("result rejected: {reason}"),
            WorkerEvent::Credited { credit_micro } => {
                credit = credit_micro;
                "credited".into()
            }
            WorkerEvent::PayoutLinked { address } => format!("payout address 0x{address} linked"),
        };
        bar.set_message(format!(
            "{units} units · credit {:.3} verified · last unit {:.2} s · {status}",
            credit as f64 / 1e6,
            last_ms as f64 / 1000.0
        ));
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_faster_device_computes_and_the_reason_names_both_times() {
        for (cpu_ms, gpu_ms, choice, words) in [
            (
                40.0,
                4.0,
                BackendChoice::Gpu,
                "10.0× as fast as one CPU thread (4 ms against 40 ms)",
            ),
            (
                4.0,
                100.0,
                BackendChoice::Cpu,
                "25.0× as fast as the GPU (Vulkan: llvmpipe, software) (4 ms against 100 ms)",
            ),
            (5.0, 5.0, BackendChoice::Cpu, "1.0× as fast"),
        ] {
            let (chosen, why) = faster(cpu_ms, gpu_ms, "Vulkan: llvmpipe, software");
            assert_eq!(chosen, choice, "{why}");
            assert!(why.contains(words), "{why:?} lacks {words:?}");
        }
    }
}

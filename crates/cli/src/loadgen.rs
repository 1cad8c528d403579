//! `tabula bench-coordinator`: the coordinator under load. Starts a coordinator in this
//! process (SQLite in a temporary dir, or `--database-url`), floods it with embedding units
//! through the real HTTP API, and runs simulated workers over the real worker socket that
//! answer every unit correctly (each distinct task is computed once, for real, then reused), so
//! what is measured is the coordinator: leases, result checks, verification, credit, all in
//! the database. Reports verified units per second and the lease latency percentiles.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tabula_coordinator::{Config, db::Db};
use tabula_engine::cpu::CpuBackend;
use tabula_protocol::{
    Hash, Identity, MAX_COORDINATOR_FRAME, Precision, ToCoordinator, ToWorker, decode, encode,
};
use tabula_worker::{Executor, exec::ExecutorThread, native::WeightCache};
use tokio_tungstenite::tungstenite::{self, Message};

#[derive(Args)]
pub struct LoadArgs {
    /// Simulated workers (each its own key and connection).
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Units to verify (one short sequence each, `--replicas` results per unit).
    #[arg(long, default_value_t = 20_000)]
    units: usize,
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Clean units after which a simulated worker may run units alone (adaptive replication).
    #[arg(long, default_value_t = 200)]
    solo_after: u32,
    /// Run against this database instead of SQLite in a temporary dir (e.g. a PostgreSQL URL;
    /// give it an empty database).
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    models_dir: Option<std::path::PathBuf>,
    /// Run the coordinator as its own process (`tabula serve`) and report its CPU time per
    /// verified unit apart from the simulated workers'.
    #[arg(long)]
    separate_process: bool,
    /// Units each simulated worker keeps asked for at once (1 to 16), like
    /// `tabula worker --units-in-flight K` (1 by default) or a worker batching units on a GPU:
    /// it answers each burst of units together, all results first, then as many `Ready`s.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    in_flight: u32,
}

/// CPU time (user + system, all threads) of process `pid` (`"self"` for this one), from
/// `/proc`; `None` where that is not available.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ: 100 on every Linux that exposes `/proc` to user space.
    Some(ticks / 100.0)
}

/// One task's encoded output, filled once.
type AnswerCell = tokio::sync::OnceCell<Arc<Vec<u8>>>;

struct Shared {
    /// Each distinct task's answer, computed once: the first worker to need it computes it
    /// while the others wait for the same cell.
    answers: Mutex<HashMap<Hash, Arc<AnswerCell>>>,
    executor: ExecutorThread,
    latencies_us: Mutex<Vec<u64>>,
    submitted: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    async fn answer(&self, unit: Hash, task: tabula_protocol::Task) -> Result<Arc<Vec<u8>>> {
        let cell = self
            .answers
            .lock()
            .expect("lock")
            .entry(unit)
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.executor.submit(
                task,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )?;
            Ok(Arc::new(rx.await.context("executor stopped")??.encode()))
        })
        .await
        .cloned()
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A frame from the coordinator as a message: `None` for control frames.
fn worker_message(frame: Option<Result<Message, tungstenite::Error>>) -> Result<Option<ToWorker>> {
    match frame {
        Some(Ok(Message::Binary(b))) => Ok(Some(decode(&b, MAX_COORDINATOR_FRAME)?)),
        Some(Ok(_)) => Ok(None),
        other => bail!("socket closed: {other:?}"),
    }
}

async fn simulated_worker(url: String, shared: Arc<Shared>, in_flight: usize) -> Result<()> {
    let me = Identity::from_seed(tabula_coordinator::db::random_bytes());
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(tabula_protocol::SOCKET_READ_BUFFER);
    // No Nagle, like `tabula worker`.
    let (socket, _) =
        tokio_tungstenite::connect_async_with_config(&url, Some(config), true).await?;
    let (mut tx, mut rx) = socket.split();
    async fn next(rx: &mut futures_util::stream::SplitStream<Socket>) -> Result<ToWorker> {
        loop {
            if let Some(m) = worker_message(rx.next().await)? {
                return Ok(m);
            }
        }
    }
    let ToWorker::Challenge { nonce, coordinator } = next(&mut rx).await? else {
        bail!("no challenge")
    };
    let login = ToCoordinator::Login {
        key: me.public(),
        signature: me.sign_login(&nonce, &coordinator),
        agent: "bench-coordinator".into(),
        precisions: vec![Precision::Exact],
        stages: false,
        max_model_mb: 0,
    };
    tx.send(Message::Binary(encode(&login).into())).await?;
    let ToWorker::Welcome { .. } = next(&mut rx).await? else {
        bail!("not welcomed")
    };
    let ready = || Message::Binary(encode(&ToCoordinator::Ready).into());
    // When each unanswered `Ready` was sent, oldest first: the coordinator answers them in
    // order, each with a unit or "no work".
    let mut asked = std::collections::VecDeque::new();
    for _ in 0..in_flight {
        tx.feed(ready()).await?;
        asked.push_back(Instant::now());
    }
    tx.flush().await?;
    while !shared.stop.load(Ordering::Relaxed) {
        // Whatever arrived together is answered together, like `tabula worker` sending its
        // next `Ready` right behind its result.
        let mut burst = vec![next(&mut rx).await?];
        while let Some(frame) = rx.next().now_or_never() {
            burst.extend(worker_message(frame)?);
        }
        let (mut results, mut readies, mut wait_ms) = (Vec::new(), 0, None);
        for message in burst {
            match message {
                ToWorker::Assign(a) => {
                    if let Some(at) = asked.pop_front() {
                        let latency = Instant::elapsed(&at).as_micros() as u64;
                        shared.latencies_us.lock().expect("lock").push(latency);
                    }
                    let output = shared.answer(a.unit, a.task).await?;
                    results.push(me.submission(a.lease, a.unit, output.as_ref().clone()));
                    readies += 1;
                }
                ToWorker::NoWork { retry_ms } => {
                    asked.pop_front();
                    readies += 1;
                    wait_ms = Some(u64::from(retry_ms).min(50));
                }
                _ => {}
            }
        }
        if let Some(ms) = wait_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        shared
            .submitted
            .fetch_add(results.len() as u64, Ordering::Relaxed);
        // Results first, then the `Ready`s: the coordinator decides each run of one kind
        // together.
        for s in results {
            tx.feed(Message::Binary(encode(&ToCoordinator::Submit(s)).into()))
                .await?;
        }
        for _ in 0..readies {
            tx.feed(ready()).await?;
            asked.push_back(Instant::now());
        }
        tx.flush().await?;
    }
    Ok(())
}

/// A child process killed when this is dropped (the bench's own coordinator).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The body of `GET url`.
pub(crate) fn http_get(url: &str) -> Result<String> {
    Ok(ureq::get(url).call()?.body_mut().read_to_string()?)
}

pub fn bench_coordinator(args: LoadArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = Config {
        listen: ([127, 0, 0, 1], port).into(),
        data_dir: dir.path().to_path_buf(),
        database_url: args.database_url.clone(),
        replicas: args.replicas,
        max_replicas: args.replicas.max(2) + 2,
        probation_units: 0,
        solo_after: args.solo_after,
        canary_rate: 0.0,
        unit_sequences: 1,
        local: true,
        // Every simulated worker and request comes from 127.0.0.1.
        max_connections_per_address: args.workers + 64,
        ..Config::default()
    };
    let base = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let db = Db::open(&config.data_dir, config.database_url.as_deref()).await?;
        let key = db.create_api_key("bench", &[]).await?;
        drop(db);
        let database = if config.database_url.is_some() { "postgresql" } else { "sqlite" };
        // The coordinator in its own process, with the settings of `config`; killed on drop.
        let mut server: Option<std::process::Child> = None;
        if args.separate_process {
            let mut serve = std::process::Command::new(std::env::current_exe()?);
            serve.arg("serve").arg("--listen").arg(config.listen.to_string());
            serve.arg("--data-dir").arg(&config.data_dir).arg("--local");
            for (flag, value) in [
                ("--replicas", config.replicas.to_string()),
                ("--max-replicas", config.max_replicas.to_string()),
                ("--probation-units", config.probation_units.to_string()),
                ("--solo-after", config.solo_after.to_string()),
                ("--canary-rate", config.canary_rate.to_string()),
                ("--unit-sequences", config.unit_sequences.to_string()),
            ] {
                serve.arg(flag).arg(value);
            }
            if let Some(url) = &config.database_url {
                serve.arg("--database-url").arg(url);
            }
            if let Some(dir) = &args.models_dir {
                serve.arg("--models-dir").arg(dir);
            }
            serve.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            server = Some(serve.spawn().context("starting `tabula serve`")?);
        } else {
            let sources = crate::cluster::model_sources(&crate::models_dir(args.models_dir.clone()), None)?;
            tokio::spawn(tabula_coordinator::serve(config, sources, None, std::future::pending()));
        }
        let server = KillOnDrop(server);
        let started = Instant::now();
        while http_get(&format!("{base}/healthz")).is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the coordinator did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let state_dir = dir.path().join("worker");
        let cache: Arc<WeightCache> = Arc::new(WeightCache::new(&state_dir, &base));
        let shared = Arc::new(Shared {
            answers: Mutex::new(HashMap::new()),
            executor: ExecutorThread::spawn(|| Ok(Executor::new(CpuBackend)), cache),
            latencies_us: Mutex::new(Vec::new()),
            submitted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        // Requests of 2048 one-sequence inputs each, all posted at once (the API call returns
        // when its job is verified).
        let bar = indicatif::ProgressBar::new(args.units as u64)
            .with_message(format!("verifying units on {database}"));
        let mut requests = Vec::new();
        let mut left = args.units;
        while left > 0 {
            let count = left.min(2048);
            left -= count;
            // The same eight texts in every request: the simulated workers compute eight
            // answers for real, at the start, instead of competing with the coordinator for
            // the two cores all along (which workers on their own machines would not). The
            // coordinator's work does not depend on it: every unit is its own row, lease and
            // credit whatever its text.
            let inputs: Vec<String> = (0..count).map(|i| format!("load test item {}", i % 8)).collect();
            let (url, key) = (format!("{base}/v1/embeddings"), key.clone());
            requests.push(tokio::task::spawn_blocking(move || -> Result<()> {
                // base64, as the official openai Python client asks for by default.
                let body = serde_json::json!({ "model": "all-MiniLM-L6-v2", "input": inputs, "encoding_format": "base64" });
                ureq::post(&url)
                    .header("authorization", &format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .send(body.to_string().as_bytes())?;
                Ok(())
            }));
        }
        let url = format!("ws://127.0.0.1:{port}/v1/worker");
        let workers: Vec<_> = (0..args.workers)
            .map(|_| tokio::spawn(simulated_worker(url.clone(), shared.clone(), args.in_flight as usize)))
            .collect();
        let server_pid = server.0.as_ref().map(|c| c.id().to_string());
        let cpu_at_start = (
            server_pid.as_deref().and_then(cpu_seconds),
            cpu_seconds("self"),
        );
        let t0 = Instant::now();
        let mut verified_at_start = None;
        loop {
            let text = http_get(&format!("{base}/metrics"))?;
            let verified = metric(&text, "tabula_units_verified_total");
            let start = *verified_at_start.get_or_insert(verified);
            bar.set_position(verified - start);
            if verified >= args.units as u64 {
                break;
            }
            if workers.iter().all(|w| w.is_finished()) {
                bail!("every simulated worker stopped");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu_at_end = (
            server_pid.as_deref().and_then(cpu_seconds),
            cpu_seconds("self"),
        );
        bar.finish_and_clear();
        shared.stop.store(true, Ordering::Relaxed);
        for r in requests {
            r.await??;
        }
        if let ((Some(s0), Some(l0)), (Some(s1), Some(l1))) = (cpu_at_start, cpu_at_end) {
            let per_unit_us = (s1 - s0) / args.units as f64 * 1e6;
            println!(
                "coordinator process: {:.1} s of CPU, {per_unit_us:.0} µs per verified unit \
                 ({:.0} verified units/s per busy core); load generator: {:.1} s of CPU",
                s1 - s0,
                1e6 / per_unit_us,
                l1 - l0,
            );
        }
        let mut lat = shared.latencies_us.lock().expect("lock").clone();
        lat.sort_unstable();
        let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64 / 1000.0;
        let results = shared.submitted.load(Ordering::Relaxed);
        let text = http_get(&format!("{base}/metrics"))?;
        let (batches, entries, commit_us) = (
            metric(&text, "tabula_journal_batches_total"),
            metric(&text, "tabula_journal_entries_total"),
            metric(&text, "tabula_journal_commit_microseconds_total"),
        );
        println!(
            "journal: {batches} transactions, {:.1} decisions each, {:.2} ms per commit",
            entries as f64 / batches.max(1) as f64,
            commit_us as f64 / 1000.0 / batches.max(1) as f64
        );
        let (rejected, solo) = (
            metric(&text, "tabula_results_rejected_total"),
            metric(&text, "tabula_units_solo_total"),
        );
        println!(
            "{database}: {} units verified ({} results, {} simulated workers with {} in flight each, {} replicas) in {elapsed:.1} s: \
             {:.0} verified units/s, {:.0} results/s; lease latency p50 {:.2} ms, p99 {:.2} ms; \
             {solo} units ran unreplicated, {rejected} results rejected \
             (BOINC's published single-server figure: ~100 tasks/s)",
            args.units,
            results,
            args.workers,
            args.in_flight,
            args.replicas,
            args.units as f64 / elapsed,
            results as f64 / elapsed,
            pct(0.5),
            pct(0.99),
        );
        drop(server);
        Ok(())
    })
}

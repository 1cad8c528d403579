//! A real cluster on loopback: `tabula serve` and `tabula worker` processes, adversarial
//! workers speaking the protocol in-process, the OpenAI API over HTTP. On SQLite always, and
//! on PostgreSQL at `TABULA_TEST_POSTGRES_URL` (CI starts one; without it the PostgreSQL
//! tests fail, unless `TABULA_TEST_NO_POSTGRES=1` says on purpose that this machine has none).

mod common;

use std::{
    io::Read,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tabula_protocol::{
    Bytes, Identity, MAX_COORDINATOR_FRAME, Receipt, Task, ToCoordinator, ToWorker, UnitOutput,
    decode, encode,
};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_tabula");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A database for one test: a fresh PostgreSQL database, or SQLite in the data dir.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavor {
    Sqlite,
    Postgres,
}

fn postgres_url() -> Option<String> {
    match std::env::var("TABULA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("TABULA_TEST_NO_POSTGRES").as_deref() == Ok("1") => None,
        _ => panic!(
            "set TABULA_TEST_POSTGRES_URL=postgres://user:pass@host/db (a superuser, to create \
             a database per test), or TABULA_TEST_NO_POSTGRES=1 to skip PostgreSQL on purpose"
        ),
    }
}

/// Creates an empty database next to the one in `base` and returns its URL.
fn fresh_postgres(base: &str) -> String {
    let name = format!("tabula_test_{}", hex::encode(rand_bytes::<6>()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(base)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
    });
    let (prefix, _) = base.rsplit_once('/').expect("a database URL ends with /DB");
    format!("{prefix}/{name}")
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    database_url: Option<String>,
    serve: Option<Child>,
    workers: Vec<Child>,
    serve_args: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(self.serve.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start(flavor: Flavor, extra: &[&str]) -> Option<Self> {
        let database_url = match flavor {
            Flavor::Sqlite => None,
            Flavor::Postgres => Some(fresh_postgres(&postgres_url()?)),
        };
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            database_url,
            serve: None,
            workers: Vec::new(),
            serve_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        c.start_serve();
        Some(c)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn base_args(&self) -> Vec<String> {
        let mut args = vec!["--data-dir".into(), self.data_dir().display().to_string()];
        if let Some(url) = &self.database_url {
            args.extend(["--database-url".into(), url.clone()]);
        }
        args
    }

    fn start_serve(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("serve.log")).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .args(self.base_args())
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--local"])
            .args(&self.serve_args)
            .env("TABULA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.serve = Some(child);
        let started = Instant::now();
        while get(self.port, "/healthz").0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the coordinator did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the worker processes, so the ledger holds still while a test reads it (workers
    /// keep taking canary units after a job is done).
    fn stop_workers(&mut self) {
        for c in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn kill_serve(&mut self) {
        let mut child = self.serve.take().unwrap();
        // SIGKILL: no shutdown path runs.
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn api_key(&self) -> String {
        self.api_key_with(&[])
    }

    fn api_key_with(&self, extra: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["keys", "create"])
            .args(self.base_args())
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts an honest worker process; returns its public key.
    fn add_worker(&mut self, n: usize) -> String {
        self.add_worker_with(n, &[])
    }

    fn add_worker_with(&mut self, n: usize, extra: &[&str]) -> String {
        let state = self.dir.path().join(format!("worker{n}"));
        let log = std::fs::File::create(self.dir.path().join(format!("worker{n}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "worker",
                "--coordinator",
                &format!("http://127.0.0.1:{}", self.port),
            ])
            .args(["--state-dir", &state.display().to_string()])
            .args(extra)
            .env("TABULA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(child);
        let key_file = state.join("worker.key");
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&key_file)
                && let Ok(seed) = Bytes::<32>::from_hex(text.trim())
            {
                return Identity::from_seed(seed.0).public().to_hex();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "worker {n} made no key"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn request(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .new_agent();
    let result = match body {
        Some(b) => {
            let mut r = agent.post(&url).header("content-type", "application/json");
            if let Some(k) = key {
                r = r.header("authorization", &format!("Bearer {k}"));
            }
            for (h, v) in headers {
                r = r.header(*h, *v);
            }
            r.send(b.to_string().as_bytes())
        }
        None => {
            assert_eq!(method, "GET");
            let mut r = agent.get(&url);
            if let Some(k) = key {
                r = r.header("authorization", &format!("Bearer {k}"));
            }
            r.call()
        }
    };
    match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let mut text = String::new();
            resp.body_mut()
                .as_reader()
                .read_to_string(&mut text)
                .unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(_) => (0, Value::Null),
    }
}

fn get(port: u16, path: &str) -> (u16, Value) {
    request(port, "GET", path, None, None, &[])
}

fn post(port: u16, path: &str, key: &str, body: Value) -> (u16, Value) {
    request(port, "POST", path, Some(key), Some(&body), &[])
}

/// The crate's directory: cargo's `CARGO_MANIFEST_DIR` when it runs this test binary, so a
/// test binary reused from a build in another checkout (a shared target directory) still
/// reads this checkout's files; the directory it was built in otherwise.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixture_texts() -> Vec<String> {
    let path = manifest_dir().join("../../tests/fixtures/minilm.jsonl");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The exact embeddings of `texts` computed locally by `tabula embed`, as the API returns
/// them (q15 / 32768 as f32).
fn local_embeddings(texts: &[String]) -> Vec<Vec<f32>> {
    local_embeddings_in(texts, "exact")
}

fn local_embeddings_in(texts: &[String], precision: &str) -> Vec<Vec<f32>> {
    let mut child = Command::new(BIN)
        .args([
            "embed",
            "--model",
            "all-MiniLM-L6-v2",
            "--precision",
            precision,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for t in texts {
            writeln!(stdin, "{t}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            match v["embedding_q15"].as_array() {
                Some(q15) => q15
                    .iter()
                    .map(|x| (x.as_i64().unwrap() as f64 / 32768.0) as f32)
                    .collect(),
                None => v["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

fn local_generation(prompt: &str, max_tokens: u32, temperature: &str, seed: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "generate",
            "--model",
            "SmolLM2-135M-Instruct",
            "--precision",
            "exact",
            "--json",
        ])
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()])
        .args(["--temperature", temperature, "--seed", seed])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    v["text"].as_str().unwrap().to_string()
}

fn api_embeddings(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not an embeddings response: {v}"))
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn ledger(port: u16, key: &str) -> Value {
    let (status, v) = get(port, &format!("/v1/ledger/{key}"));
    assert_eq!(status, 200, "{v}");
    v
}

/// Checks a worker's receipts: each verifies under the coordinator's key, names this worker,
/// covers a distinct unit, and together they add up to its verified credit.
fn check_receipts(entry: &Value) {
    let w = &entry["workers"][0];
    let receipts: Vec<Receipt> = serde_json::from_value(w["recent_receipts"].clone()).unwrap();
    let mut units = std::collections::HashSet::new();
    let mut total = 0u64;
    for r in &receipts {
        r.verify().expect("a receipt that verifies");
        assert_eq!(r.worker.to_hex(), w["worker"].as_str().unwrap());
        assert_eq!(
            r.coordinator.to_hex(),
            entry["coordinator_key"].as_str().unwrap()
        );
        assert!(units.insert(r.unit), "two receipts for one unit");
        total += r.credit_micro;
    }
    // The ledger lists the 100 newest receipts: only then do they add up to all the credit.
    let credit = w["verified_credit_micro"].as_u64().unwrap();
    if receipts.len() < 100 {
        assert_eq!(total, credit, "receipts must add up to the credit");
    } else {
        assert!(total <= credit, "receipts add up to more than the credit");
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Evil {
    /// Well-formed outputs full of random values.
    Random,
    /// All-zero outputs.
    Zeros,
    /// Two of these return the same wrong answer for the same unit.
    Colluder,
    /// Signs its results with a key other than the one it logged in with.
    Forger,
    /// Takes leases and never answers.
    Sleeper,
    /// Re-sends another worker's signed result.
    Replayer,
}

/// A well-formed but wrong output for `task`, derived from `seed` bytes.
fn wrong_output(task: &Task, seed: &[u8; 32], zeros: bool) -> UnitOutput {
    let pick = |i: usize| {
        if zeros {
            0
        } else {
            seed[i % 32] as i32 * 97 - 12000
        }
    };
    match task {
        Task::Embed { sequences, .. } => UnitOutput::ExactEmbeddings {
            dim: 384,
            q15: (0..sequences.len() * 384).map(pick).collect(),
        },
        Task::Generate { max_tokens, .. } => UnitOutput::Generation {
            tokens: (0..*max_tokens as usize)
                .map(|i| pick(i).unsigned_abs() % 1000 + 1000)
                .collect(),
            stopped: false,
            logits_sha256: (0..*max_tokens as usize)
                .map(|i| Bytes([pick(i) as u8; 32]))
                .collect(),
        },
    }
}

type SocketStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type SocketTx = futures_util::stream::SplitSink<SocketStream, Message>;
type SocketRx = futures_util::stream::SplitStream<SocketStream>;

/// The next protocol message from the coordinator; `None` once the socket ends.
async fn next_message(rx: &mut SocketRx) -> Option<ToWorker> {
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                return Some(decode::<ToWorker>(&b, MAX_COORDINATOR_FRAME).unwrap());
            }
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// Opens the worker socket and sends a signed login as `me` (computing exact precision);
/// returns the socket and the coordinator's answer.
async fn try_log_in(
    port: u16,
    me: &Identity,
    agent: &str,
) -> (SocketTx, SocketRx, Option<ToWorker>) {
    try_log_in_via(port, me, agent, None).await
}

/// [`try_log_in`] through a reverse proxy that says the client is `forwarded_for` (an
/// `X-Forwarded-For` header, which the coordinator believes only from a `--trusted-proxy`).
async fn try_log_in_via(
    port: u16,
    me: &Identity,
    agent: &str,
    forwarded_for: Option<&str>,
) -> (SocketTx, SocketRx, Option<ToWorker>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{port}/v1/worker")
        .into_client_request()
        .unwrap();
    if let Some(client) = forwarded_for {
        request
            .headers_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut tx, mut rx) = socket.split();
    let Some(ToWorker::Challenge { nonce, coordinator }) = next_message(&mut rx).await else {
        panic!("no challenge")
    };
    let login = ToCoordinator::Login {
        key: me.public(),
        signature: me.sign_login(&nonce, &coordinator),
        agent: agent.to_string(),
        precisions: vec![tabula_protocol::Precision::Exact],
        stages: false,
        max_model_mb: 0,
    };
    tx.send(Message::Binary(encode(&login).into()))
        .await
        .unwrap();
    let answer = next_message(&mut rx).await;
    (tx, rx, answer)
}

/// Logs in as `me` (see [`try_log_in`]), which must be welcome.
async fn log_in(port: u16, me: &Identity, agent: &str) -> (SocketTx, SocketRx) {
    let (tx, rx, answer) = try_log_in(port, me, agent).await;
    assert!(
        matches!(answer, Some(ToWorker::Welcome { .. })),
        "{answer:?}"
    );
    (tx, rx)
}

/// An adversarial worker. Returns its public key once it has logged in; runs until `stop`.
async fn adversary(
    port: u16,
    evil: Evil,
    captured: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    mut replay: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<String>,
) {
    let me = Identity::from_seed(rand_bytes());
    let other = Identity::from_seed(rand_bytes());
    let (mut tx, mut rx) = log_in(port, &me, &format!("adversary {evil:?}")).await;
    let mut next = async || next_message(&mut rx).await;
    let _ = ready.send(me.public().to_hex());
    // The colluders agree on a secret: the wrong answer is a function of the unit alone.
    let shared_secret = [7u8; 32];
    let send = async |tx: &mut futures_util::stream::SplitSink<_, Message>, m: &ToCoordinator| {
        let _ = tx.send(Message::Binary(encode(m).into())).await;
    };
    if evil == Evil::Replayer {
        // Placement is random, so the frame to replay may come late: keep the session alive
        // (a silent session is closed after the heartbeat timeout) until it does.
        let replay = replay.as_mut().unwrap();
        let frame = loop {
            tokio::select! {
                frame = replay.recv() => break frame.unwrap(),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    send(&mut tx, &ToCoordinator::Heartbeat).await;
                }
            }
        };
        let _ = tx.send(Message::Binary(frame.into())).await;
        // Wait for the verdict, then idle.
        let _ = tokio::time::timeout(Duration::from_secs(10), next()).await;
        let _ = stop.changed().await;
        return;
    }
    send(&mut tx, &ToCoordinator::Ready).await;
    loop {
        let message = tokio::select! {
            _ = stop.changed() => return,
            m = next() => match m { Some(m) => m, None => return },
        };
        match message {
            ToWorker::Assign(a) => {
                if evil == Evil::Sleeper {
                    // Hoard: ask for more, answer nothing.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    send(&mut tx, &ToCoordinator::Ready).await;
                    continue;
                }
                let seed = match evil {
                    Evil::Colluder => {
                        let mut s = a.unit.0;
                        s.iter_mut().zip(shared_secret).for_each(|(x, k)| *x ^= k);
                        s
                    }
                    _ => rand_bytes(),
                };
                let output = wrong_output(&a.task, &seed, evil == Evil::Zeros).encode();
                let signer = if evil == Evil::Forger { &other } else { &me };
                let submission = signer.submission(a.lease, a.unit, output);
                let frame = encode(&ToCoordinator::Submit(submission));
                // Whichever adversary answers first gives the replayer a frame to replay.
                let _ = captured.send(frame.clone());
                let _ = tx.send(Message::Binary(frame.into())).await;
            }
            ToWorker::NoWork { retry_ms } => {
                tokio::time::sleep(Duration::from_millis(u64::from(retry_ms))).await;
                send(&mut tx, &ToCoordinator::Ready).await;
            }
            ToWorker::Accepted { .. } | ToWorker::Rejected { .. } => {
                send(&mut tx, &ToCoordinator::Ready).await;
            }
            ToWorker::Error { .. } => return,
            _ => {}
        }
    }
}

fn honest_workers_and_adversaries(flavor: Flavor) {
    let Some(mut cluster) = Cluster::start(flavor, &["--lease-secs", "20"]) else {
        return;
    };
    let port = cluster.port;
    let key = cluster.api_key();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Finding 4: a login whose agent holds a NUL byte (PostgreSQL refuses it in text) is
    // refused on its own, and a thousand of them neither fail the journal nor reload the
    // scheduler (the honest job below still finishes).
    rt.block_on(async {
        for i in 0..1000 {
            let me = Identity::from_seed(rand_bytes());
            match try_log_in(port, &me, &format!("evil\0agent {i}")).await.2 {
                Some(ToWorker::Error { message, retry }) => {
                    assert!(message.contains("control character"), "{message}");
                    assert!(!retry);
                }
                other => panic!("a NUL agent got {other:?}"),
            }
        }
    });
    assert_eq!(get(port, "/healthz").0, 200);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (captured_tx, mut captured_rx) = tokio::sync::mpsc::unbounded_channel();
    let (replay_tx, replay_rx) = tokio::sync::mpsc::unbounded_channel();
    // Forward the first captured colluder frame to the replayer.
    rt.spawn(async move {
        if let Some(frame) = captured_rx.recv().await {
            let _ = replay_tx.send(frame);
        }
    });
    let mut adversaries = Vec::new();
    let mut replay_rx = Some(replay_rx);
    for evil in [
        Evil::Random,
        Evil::Zeros,
        Evil::Colluder,
        Evil::Colluder,
        Evil::Forger,
        Evil::Sleeper,
        Evil::Replayer,
    ] {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let replay = if evil == Evil::Replayer {
            replay_rx.take()
        } else {
            None
        };
        rt.spawn(adversary(
            port,
            evil,
            captured_tx.clone(),
            replay,
            stop.clone(),
            ready_tx,
        ));
        adversaries.push((evil, rt.block_on(ready_rx).unwrap()));
    }
    let honest: Vec<String> = (0..3).map(|n| cluster.add_worker(n)).collect();

    let texts = fixture_texts();
    let expected = local_embeddings(&texts);
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    let got = api_embeddings(&body);
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g, e,
            "text {i}: the verified embedding differs from the local exact one"
        );
    }

    let prompt = "The quick brown fox";
    let expected_text = local_generation(prompt, 8, "0.8", "3");
    let (status, body) = post(
        port,
        "/v1/completions",
        &key,
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": 3 }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), expected_text);

    // Placement is random and a fresh key holds one unit at a time, so an adversary may not
    // have drawn a unit yet: small jobs keep coming until every one was caught (the sleeper
    // when its lease runs out, 20 s after it took one).
    let struck = |key: &String| {
        ledger(port, key)["workers"][0]["strikes"]
            .as_i64()
            .unwrap_or(0)
            >= 1
    };
    let started = Instant::now();
    for round in 0.. {
        if adversaries.iter().all(|(_, key)| struck(key))
            || started.elapsed() > Duration::from_secs(240)
        {
            break;
        }
        let text = vec![texts[round % texts.len()].clone()];
        let (status, body) = post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": text }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(api_embeddings(&body), local_embeddings(&text));
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = stop_tx.send(true);
    for (evil, adversary) in &adversaries {
        let entry = ledger(port, adversary);
        let w = &entry["workers"][0];
        assert_eq!(
            w["verified_credit_micro"], 0,
            "{evil:?} earned credit: {entry}"
        );
        assert!(
            w["strikes"].as_i64().unwrap() >= 1,
            "{evil:?} was not caught: {entry}\n{}",
            cluster.log()
        );
    }
    cluster.stop_workers();
    let mut honest_credit = 0;
    for h in &honest {
        let entry = ledger(port, h);
        let w = &entry["workers"][0];
        assert_eq!(w["strikes"], 0, "an honest worker was struck: {entry}");
        check_receipts(&entry);
        honest_credit += w["verified_credit_micro"].as_u64().unwrap();
    }
    assert!(honest_credit > 0, "no honest worker was credited");
}

#[test]
fn sqlite_honest_workers_and_adversaries() {
    honest_workers_and_adversaries(Flavor::Sqlite);
}

#[test]
fn postgres_honest_workers_and_adversaries() {
    honest_workers_and_adversaries(Flavor::Postgres);
}

fn metric(port: u16, name: &str) -> u64 {
    let (_, m) = get(port, "/metrics");
    m.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Adaptive replication and canaries: once workers have a clean record, some units run
/// unreplicated and some leases are known-answer canaries, and the job's answer is still the
/// exact one. A worker started with `--payout` is found in the ledger under that address.
#[test]
fn adaptive_replication_canaries_and_payout() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--solo-after",
            "3",
            "--spot-check-rate",
            "0",
            "--canary-rate",
            "0.3",
            "--probation-units",
            "1",
            "--unit-sequences",
            "1",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let address = "0x00000000000000000000000000000000000a11ce";
    let paid = cluster.add_worker_with(0, &["--payout", address]);
    for n in 1..3 {
        cluster.add_worker(n);
    }
    let texts = fixture_texts();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    assert!(
        metric(port, "tabula_units_solo_total") > 0,
        "no unit ran unreplicated"
    );
    assert!(
        metric(port, "tabula_leases_canary_total") > 0,
        "no canary was issued"
    );
    // Stronger assurance per request: `high` never runs a unit alone (these workers are past
    // `--solo-after` now), `referee` has the coordinator re-execute every unit.
    // (Other texts each time: a receipt names its task, which must not repeat.)
    let solo = metric(port, "tabula_units_solo_total");
    let texts: Vec<String> = fixture_texts()
        .iter()
        .map(|t| format!("high: {t}"))
        .collect();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts, "assurance": "high" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    assert_eq!(
        metric(port, "tabula_units_solo_total"),
        solo,
        "a high unit ran alone"
    );
    let refereed = metric(port, "tabula_units_refereed_total");
    let texts: Vec<String> = fixture_texts()
        .iter()
        .map(|t| format!("referee: {t}"))
        .collect();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts, "assurance": "referee" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    assert!(
        metric(port, "tabula_units_refereed_total") >= refereed + texts.len() as u64,
        "the referee did not run every unit"
    );
    cluster.stop_workers();
    let entry = ledger(port, address);
    assert_eq!(entry["workers"][0]["worker"], paid.as_str(), "{entry}");
    assert!(
        entry["verified_credit_micro"].as_u64().unwrap() > 0,
        "{entry}"
    );
    check_receipts(&entry);
}

/// `kill -9` of the coordinator in the middle of a job: after a restart on the same data, the
/// job finishes (the requester retries with its Idempotency-Key) with every unit, and no
/// worker is credited twice for a unit.
fn survives_kill_9(flavor: Flavor) {
    let Some(mut cluster) =
        Cluster::start(flavor, &["--lease-secs", "10", "--unit-sequences", "1"])
    else {
        return;
    };
    let port = cluster.port;
    let key = cluster.api_key();
    let honest: Vec<String> = (0..2).map(|n| cluster.add_worker(n)).collect();
    let texts = fixture_texts();
    let body = json!({ "model": "all-MiniLM-L6-v2", "input": texts });
    let send = {
        let (key, body) = (key.clone(), body.clone());
        move || {
            request(
                port,
                "POST",
                "/v1/embeddings",
                Some(&key),
                Some(&body),
                &[("idempotency-key", "job-1")],
            )
        }
    };
    let first = std::thread::spawn(send.clone());
    // Wait until some but not all units are verified.
    let started = Instant::now();
    loop {
        let (_, m) = get(port, "/metrics");
        let text = m.as_str().unwrap_or_default().to_string();
        let verified: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tabula_units_verified_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if verified >= 3 {
            assert!(
                verified < texts.len() as u64,
                "the job finished before the kill"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One coordinator per database: a second one is refused, and says what to do.
    let second = Command::new(BIN)
        .arg("serve")
        .args(cluster.base_args())
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--local"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second coordinator started");
    assert!(said.contains("another coordinator is running"), "{said}");
    // The claim dies with the process: the restart after kill -9 takes it at once.
    cluster.kill_serve();
    let _ = first.join();
    cluster.start_serve();
    let (status, v) = send();
    assert_eq!(status, 200, "{v}\n{}", cluster.log());
    let got = api_embeddings(&v);
    assert_eq!(
        got,
        local_embeddings(&texts),
        "the job after the restart differs"
    );
    cluster.stop_workers();
    for h in &honest {
        let entry = ledger(port, h);
        check_receipts(&entry);
    }
}

#[test]
fn sqlite_survives_kill_9() {
    survives_kill_9(Flavor::Sqlite);
}

#[test]
fn postgres_survives_kill_9() {
    survives_kill_9(Flavor::Postgres);
}

/// Garbage on the worker socket and bad API requests get clear errors; the server keeps
/// serving.
#[test]
fn bad_input_gets_errors_and_the_server_keeps_serving() {
    // A fresh key holds one unit at a time by default; this flooding worker asks for fifty.
    let cluster = Cluster::start(
        Flavor::Sqlite,
        &["--max-leases-per-key", "64", "--probation-leases", "64"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A socket that never logs in is told, after the login timeout, that it may retry:
        // silence is a network's failure, not a broken client's.
        let silent = tokio::spawn(async move {
            let (mut socket, _) =
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/worker"))
                    .await
                    .unwrap();
            let _challenge = socket.next().await;
            let answer = tokio::time::timeout(Duration::from_secs(30), socket.next()).await;
            match answer {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    decode::<ToWorker>(&b, MAX_COORDINATOR_FRAME).unwrap()
                }
                other => panic!("a silent socket got {other:?}"),
            }
        });
        // A logged-in worker that sends many requests without reading gets every reply, in
        // the order it asked: the session decides requests in order while their commits are
        // still pending, and stops reading while too many wait. Leases wait for a commit and
        // the payout refusal does not, so out-of-order replies would show.
        {
            let api_key = key.clone();
            std::thread::spawn(move || {
                let input: Vec<String> = (0..240).map(|i| format!("flood {i}")).collect();
                // Never answered in full (the flooding worker computes nothing); it ends with
                // the cluster.
                post(
                    port,
                    "/v1/embeddings",
                    &api_key,
                    json!({ "model": "all-MiniLM-L6-v2", "input": input }),
                );
            });
            while metric(port, "tabula_units_in_memory") < 60 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let me = Identity::from_seed([4; 32]);
            let (mut tx, mut rx) = log_in(port, &me, "flood").await;
            let mut frames = Vec::new();
            frames.extend((0..25).map(|_| encode(&ToCoordinator::Ready)));
            frames.push(encode(&ToCoordinator::LinkPayout {
                address: Bytes([0xab; 20]),
                signature: Bytes([0; 64]),
            }));
            frames.extend((0..25).map(|_| encode(&ToCoordinator::Ready)));
            for f in frames {
                tx.send(Message::Binary(f.into())).await.unwrap();
            }
            let mut replies = Vec::new();
            let mut assigned = Vec::new();
            for _ in 0..51 {
                let reply = tokio::time::timeout(Duration::from_secs(10), next_message(&mut rx))
                    .await
                    .expect("a reply within 10 s")
                    .expect("the socket stays open");
                replies.push(match reply {
                    ToWorker::Assign(a) => {
                        assigned.push((a.lease, a.unit));
                        "lease"
                    }
                    ToWorker::Error { .. } => "error",
                    other => panic!("unexpected {other:?}"),
                });
            }
            let mut expected = vec!["lease"; 25];
            expected.push("error");
            expected.extend(["lease"; 25]);
            assert_eq!(replies, expected);
            // Results sent in one burst are decided together (in groups), yet each gets its own
            // verdict, in the order sent: here every other one carries a forged signature, the
            // rest an output of the wrong shape.
            let mut sent = Vec::new();
            for (i, (lease, unit)) in assigned.iter().enumerate() {
                let mut result = me.submission(*lease, *unit, vec![1, 2, 3]);
                if i % 2 == 1 {
                    result.signature = Bytes([7; 64]);
                }
                tx.feed(Message::Binary(
                    encode(&ToCoordinator::Submit(result)).into(),
                ))
                .await
                .unwrap();
                sent.push(*lease);
            }
            tx.flush().await.unwrap();
            let mut verdicts = Vec::new();
            while verdicts.len() < sent.len() {
                let reply = tokio::time::timeout(Duration::from_secs(10), next_message(&mut rx))
                    .await
                    .expect("a verdict within 10 s")
                    .expect("the socket stays open");
                match reply {
                    ToWorker::Rejected { lease, reason } => verdicts.push((lease, reason)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            let leases: Vec<_> = verdicts.iter().map(|(lease, _)| *lease).collect();
            assert_eq!(leases, sent, "verdicts out of order");
            for (i, (_, reason)) in verdicts.iter().enumerate() {
                let forged = reason.contains("signature does not verify");
                assert_eq!(forged, i % 2 == 1, "verdict {i}: {reason}");
            }
        }
        let valid = encode(&ToCoordinator::Ready);
        let mut frames: Vec<Vec<u8>> = vec![vec![], vec![1], vec![0xff; 64], valid.clone()];
        // Mutations of a real login frame.
        let me = Identity::from_seed([3; 32]);
        let login = encode(&ToCoordinator::Login {
            key: me.public(),
            signature: Bytes([0; 64]),
            agent: "x".repeat(50),
            precisions: vec![],
            stages: false,
            max_model_mb: 0,
        });
        for i in 0..login.len() {
            let mut f = login.clone();
            f[i] ^= 0x5a;
            frames.push(f);
        }
        frames.push(vec![0u8; tabula_protocol::MAX_WORKER_FRAME + 1]);
        for frame in frames {
            let (mut socket, _) =
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/worker"))
                    .await
                    .unwrap();
            let _challenge = socket.next().await;
            let _ = socket.send(Message::Binary(frame.into())).await;
            // The coordinator answers with an error and closes; it never hangs. A broken
            // frame is the client's fault: retrying would not help, and the error says so.
            let answer = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
            let Ok(answer) = answer else {
                panic!("the coordinator hung on a bad frame");
            };
            if let Some(Ok(Message::Binary(b))) = answer {
                match decode::<ToWorker>(&b, MAX_COORDINATOR_FRAME) {
                    Ok(ToWorker::Error { retry, message }) => {
                        assert!(!retry, "a bad frame was answered {message:?} with retry")
                    }
                    other => panic!("a bad frame was answered {other:?}"),
                }
            }
        }
        match silent.await.unwrap() {
            ToWorker::Error { retry, message } => {
                assert!(retry, "a silent socket was refused for good: {message}")
            }
            other => panic!("a silent socket got {other:?}"),
        }
    });
    assert_eq!(get(port, "/healthz").0, 200);

    let bad: Vec<(Value, &str)> = vec![
        (json!({ "input": "x" }), "model"),
        (json!({ "model": "all-MiniLM-L6-v2" }), "input"),
        (json!({ "model": "all-MiniLM-L6-v2", "input": [] }), "input"),
        (
            json!({ "model": "all-MiniLM-L6-v2", "input": [1, 2, 99999999] }),
            "input",
        ),
        (
            json!({ "model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "hex" }),
            "encoding_format",
        ),
        (
            json!({ "model": "all-MiniLM-L6-v2", "input": "x", "assurance": "total" }),
            "assurance",
        ),
        (
            json!({ "model": "all-MiniLM-L6-v2", "input": "x", "assurance": 3 }),
            "assurance",
        ),
        (
            json!({ "model": "SmolLM2-135M-Instruct", "input": "x" }),
            "model",
        ),
        (
            json!({ "model": "all-MiniLM-L6-v2", "input": "x".repeat(100_000) }),
            "input",
        ),
    ];
    for (body, param) in bad {
        let (status, v) = post(port, "/v1/embeddings", &key, body.clone());
        assert!((400..500).contains(&status), "{body}: {status} {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    for body in [
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 0 }),
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "hi", "temperature": -1 }),
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "hi", "n": 3 }),
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 100000 }),
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": {"a": 1} }),
    ] {
        let (status, v) = post(port, "/v1/completions", &key, body.clone());
        assert_eq!(status, 400, "{body}: {v}");
    }
    let (status, v) = post(
        port,
        "/v1/chat/completions",
        &key,
        json!({ "model": "SmolLM2-135M-Instruct", "messages": [{"role": "wizard", "content": "x"}] }),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        port,
        "/v1/embeddings",
        "wrong-key",
        json!({ "model": "all-MiniLM-L6-v2", "input": "x" }),
    );
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(get(port, "/v1/ledger/nonsense").0, 404);
    assert_eq!(get(port, "/v1/weights/00").0, 400);
    assert_eq!(get(port, &format!("/v1/weights/{}", "0".repeat(64))).0, 404);
    assert_eq!(get(port, "/nope").0, 404);
    let (status, spec) = get(port, "/openapi.json");
    assert_eq!(status, 200);
    assert!(spec["paths"]["/v1/embeddings"].is_object());
    assert_eq!(get(port, "/healthz").0, 200);
}

/// Findings 11, 12 and 13: a requester sees only its own jobs, an Idempotency-Key reused with
/// another body is a conflict (409), not the first request's answer, and a key's queued units
/// are bounded (429).
#[test]
fn jobs_belong_to_their_key_and_idempotency_keys_to_their_request() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--probation-units",
            "0",
            "--max-queued-units",
            "4",
            "--max-referee-units",
            "2",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let (alice, bob) = (cluster.api_key(), cluster.api_key());
    // Finding 13: a key may queue only so many units (here 4; 20 texts are 5 units).
    let many: Vec<String> = (0..20).map(|i| format!("text {i}")).collect();
    let (status, v) = post(
        port,
        "/v1/embeddings",
        &alice,
        json!({ "model": "all-MiniLM-L6-v2", "input": many }),
    );
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queued-units"),
        "{v}"
    );
    // And fewer at "referee" assurance, which the coordinator computes itself (12 texts are
    // 3 units of 4; 2 are allowed).
    let (status, v) = post(
        port,
        "/v1/embeddings",
        &alice,
        json!({ "model": "all-MiniLM-L6-v2", "input": many[..12], "assurance": "referee" }),
    );
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["param"], "assurance", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-referee-units"),
        "{v}"
    );
    cluster.add_worker(0);
    cluster.add_worker(1);
    let body = json!({ "model": "all-MiniLM-L6-v2", "input": ["A man is eating food."] });
    let idem = [("idempotency-key", "alice-1")];
    let (status, first) = request(
        port,
        "POST",
        "/v1/embeddings",
        Some(&alice),
        Some(&body),
        &idem,
    );
    assert_eq!(status, 200, "{first}");
    let (status, again) = request(
        port,
        "POST",
        "/v1/embeddings",
        Some(&alice),
        Some(&body),
        &idem,
    );
    assert_eq!(
        (status, api_embeddings(&again)),
        (200, api_embeddings(&first))
    );
    let other = json!({ "model": "all-MiniLM-L6-v2", "input": ["Something else entirely."] });
    let (status, conflict) = request(
        port,
        "POST",
        "/v1/embeddings",
        Some(&alice),
        Some(&other),
        &idem,
    );
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_key_reused");
    // Bob's key with the same Idempotency-Key is another request altogether.
    let (status, bobs) = request(
        port,
        "POST",
        "/v1/embeddings",
        Some(&bob),
        Some(&other),
        &idem,
    );
    assert_eq!(status, 200, "{bobs}");
    let list = |key: &str| {
        let (status, v) = request(port, "GET", "/v1/jobs", Some(key), None, &[]);
        assert_eq!(status, 200, "{v}");
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (alices, bobs_jobs) = (list(&alice), list(&bob));
    // One job each (the repeated request was the same job), neither sees the other's.
    assert_eq!(alices.len(), 1, "{alices:?}");
    assert_eq!(bobs_jobs.len(), 1, "{bobs_jobs:?}");
    assert_ne!(alices, bobs_jobs);
}

/// Findings 3 and 5, with many free keys: a network brings only `--new-keys-per-minute` new
/// keys (a known key still logs in), and a fresh key gets one unit however many it asks for.
#[test]
fn new_keys_are_rationed_per_network_and_hold_one_unit() {
    let cluster = Cluster::start(Flavor::Sqlite, &["--new-keys-per-minute", "3"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    // Work that no honest worker will take: units to hoard.
    std::thread::spawn(move || {
        let input: Vec<String> = (0..40).map(|i| format!("hoard {i}")).collect();
        post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": input }),
        );
    });
    while metric(port, "tabula_units_in_memory") < 10 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let keys: Vec<Identity> = (0..4).map(|_| Identity::from_seed(rand_bytes())).collect();
        for me in &keys[..3] {
            let (mut tx, mut rx) = log_in(port, me, "hoarder").await;
            for _ in 0..5 {
                tx.send(Message::Binary(encode(&ToCoordinator::Ready).into()))
                    .await
                    .unwrap();
            }
            let mut assigned = 0;
            for _ in 0..5 {
                match next_message(&mut rx).await {
                    Some(ToWorker::Assign(_)) => assigned += 1,
                    Some(ToWorker::NoWork { .. }) => {}
                    other => panic!("a Ready was answered {other:?}"),
                }
            }
            assert_eq!(assigned, 1, "a fresh key holds one unit at a time");
        }
        let (_, _, refused) = try_log_in(port, &keys[3], "one too many").await;
        match refused {
            Some(ToWorker::Error { message, retry }) => {
                assert!(message.contains("too many new worker keys"), "{message}");
                assert!(retry, "the limit passes: trying later helps");
            }
            other => panic!("a fourth new key got {other:?}"),
        }
        // Keys it knows are not new.
        let _session = log_in(port, &keys[0], "back again").await;
    });
    // At least once per key (Readys that arrive together are decided as one request).
    assert!(metric(port, "tabula_grants_limited_total") >= 3);
    assert_eq!(metric(port, "tabula_logins_limited_total"), 1);
}

/// Finding 7 with real processes: two fresh keys that agree on a wrong answer for every unit
/// and answer as fast as the socket allows, while the referee takes its time over each
/// generation. On 3e934b0 they answered every unit of a 32-unit job and the referee
/// re-executed 32 of 32 before their ban (without the cap below, 16 of these 16). Now a key
/// in probation with `--probation-units` (3) results unjudged gets no unit until a verdict,
/// and its first lie bans it: the referee runs at most 3 units for each.
#[test]
fn two_fresh_liars_cost_the_referee_a_few_units_not_the_job() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &[]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Question {i}: why is the sky"))
        .collect();
    let requests: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (key, prompt) = (key.clone(), prompt.clone());
            std::thread::spawn(move || {
                post(
                    port,
                    "/v1/completions",
                    &key,
                    json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 24, "temperature": 0 }),
                )
            })
        })
        .collect();
    while metric(port, "tabula_units_in_memory") < 16 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let liars: Vec<String> = (0..2)
        .map(|_| {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let (captured, _) = tokio::sync::mpsc::unbounded_channel();
            rt.spawn(adversary(
                port,
                Evil::Colluder,
                captured,
                None,
                stop.clone(),
                ready_tx,
            ));
            rt.block_on(ready_rx).unwrap()
        })
        .collect();
    let started = Instant::now();
    while !liars
        .iter()
        .all(|k| ledger(port, k)["workers"][0]["banned"] == json!(true))
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the liars were not banned: {:?}\n{}",
            liars.iter().map(|k| ledger(port, k)).collect::<Vec<_>>(),
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing else is connected: every unit the referee runs now is one the liars answered.
    while metric(port, "tabula_referee_disputes_waiting") > 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let refereed = metric(port, "tabula_units_refereed_total");
    assert!(
        (1..=6).contains(&refereed),
        "the referee ran {refereed} units for two fresh liars"
    );
    // Honest workers finish the job with the truth.
    for n in 0..2 {
        cluster.add_worker(n);
    }
    let answers: Vec<(u16, Value)> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
    }
    assert_eq!(
        answers[0].1["choices"][0]["text"].as_str().unwrap(),
        local_generation(&prompts[0], 24, "0", "0")
    );
    let _ = stop_tx.send(true);
    cluster.stop_workers();
}

/// Finding 16 with real processes: behind a reverse proxy every worker came from the proxy's
/// address, so no unit found a second replica. With `--trusted-proxy` the client named in
/// `X-Forwarded-For` is the worker's network: for rationing new keys and for keeping a unit's
/// replicas on distinct networks. The same header from anyone else is ignored.
#[test]
fn workers_behind_a_trusted_proxy_are_told_apart_by_their_forwarded_address() {
    let cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--trusted-proxy",
            "127.0.0.1/32",
            "--new-keys-per-minute",
            "2",
            "--canary-rate",
            "0",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let job = std::thread::spawn(move || {
        post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": ["behind a proxy"] }),
        )
    });
    while metric(port, "tabula_units_in_memory") < 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let welcome = |answer: &Option<ToWorker>| matches!(answer, Some(ToWorker::Welcome { .. }));
        let ids: Vec<Identity> = (0..4).map(|_| Identity::from_seed(rand_bytes())).collect();
        // Two new keys a minute from 198.51.100.0/24, whatever address the proxy has.
        let (mut a_tx, mut a_rx, answer) =
            try_log_in_via(port, &ids[0], "a", Some("198.51.100.7")).await;
        assert!(welcome(&answer), "{answer:?}");
        let (mut b_tx, mut b_rx, answer) =
            try_log_in_via(port, &ids[1], "b", Some("192.0.2.1, 198.51.100.9")).await;
        assert!(welcome(&answer), "{answer:?}");
        let (_, _, refused) = try_log_in_via(port, &ids[2], "e", Some("198.51.100.20")).await;
        match refused {
            Some(ToWorker::Error { message, .. }) => {
                assert!(message.contains("too many new worker keys"), "{message}")
            }
            other => panic!("a third new key from one network got {other:?}"),
        }
        let (mut c_tx, mut c_rx, answer) =
            try_log_in_via(port, &ids[3], "c", Some("203.0.113.4")).await;
        assert!(welcome(&answer), "another network: {answer:?}");
        let ready = encode(&ToCoordinator::Ready);
        // The unit goes to a; b shares a's network, so it may not be the second replica; c may.
        a_tx.send(Message::Binary(ready.clone().into()))
            .await
            .unwrap();
        let Some(ToWorker::Assign(first)) = next_message(&mut a_rx).await else {
            panic!("a got no unit")
        };
        b_tx.send(Message::Binary(ready.clone().into()))
            .await
            .unwrap();
        assert!(
            matches!(next_message(&mut b_rx).await, Some(ToWorker::NoWork { .. })),
            "a second replica on the first one's network"
        );
        c_tx.send(Message::Binary(ready.clone().into()))
            .await
            .unwrap();
        let Some(ToWorker::Assign(second)) = next_message(&mut c_rx).await else {
            panic!("c (another network) got no unit")
        };
        assert_eq!(
            first.unit, second.unit,
            "the second replica of the one unit"
        );
        // Both answer the truth; the unit is verified and the request answered.
        let compute = HonestCompute::new(&cluster.dir.path().join("proxied"), port);
        let truth = compute.output(first.task.clone()).await;
        for (me, tx, rx, lease) in [
            (&ids[0], &mut a_tx, &mut a_rx, &first),
            (&ids[3], &mut c_tx, &mut c_rx, &second),
        ] {
            let submit =
                ToCoordinator::Submit(me.submission(lease.lease, lease.unit, truth.clone()));
            tx.send(Message::Binary(encode(&submit).into()))
                .await
                .unwrap();
            loop {
                match next_message(rx).await {
                    Some(ToWorker::Accepted { .. }) => break,
                    Some(ToWorker::Rejected { reason, .. }) => panic!("{reason}"),
                    Some(_) => continue,
                    None => panic!("the session ended"),
                }
            }
        }
    });
    let (status, answer) = job.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        api_embeddings(&answer),
        local_embeddings(&["behind a proxy".to_string()])
    );
    drop(cluster);

    // Without --trusted-proxy the header is the client's word, and is ignored: every key here
    // comes from 127.0.0.0/24, which has one new key a minute.
    let cluster = Cluster::start(Flavor::Sqlite, &["--new-keys-per-minute", "1"]).unwrap();
    let port = cluster.port;
    rt.block_on(async {
        let ids: Vec<Identity> = (0..2).map(|_| Identity::from_seed(rand_bytes())).collect();
        let (_, _, answer) = try_log_in_via(port, &ids[0], "x", Some("198.51.100.7")).await;
        assert!(
            matches!(answer, Some(ToWorker::Welcome { .. })),
            "{answer:?}"
        );
        let (_, _, answer) = try_log_in_via(port, &ids[1], "y", Some("203.0.113.4")).await;
        assert!(
            matches!(answer, Some(ToWorker::Error { .. })),
            "a spoofed header chose the network: {answer:?}"
        );
    });
}

/// Finding 15 with real processes: a generation was credited at prompt + `max_tokens` even
/// when the model stopped early, so a requester's generous `max_tokens` paid workers for
/// tokens nobody computed. The same chat message with `max_tokens` 32 and 256 stops after the
/// same few tokens, and now earns each worker the same credit (priced at `max_tokens`, the
/// second would earn about five times the first).
#[test]
fn generation_credit_counts_the_tokens_produced() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &["--canary-rate", "0"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers = [cluster.add_worker(0), cluster.add_worker(1)];
    let credit = || -> i64 {
        workers
            .iter()
            .map(|w| {
                ledger(port, w)["verified_credit_micro"]
                    .as_i64()
                    .unwrap_or(0)
            })
            .sum()
    };
    let mut earned = Vec::new();
    for max_tokens in [32, 256] {
        let before = credit();
        let (status, body) = post(
            port,
            "/v1/chat/completions",
            &key,
            json!({ "model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{ "role": "user", "content": "Reply with one word: is water wet?" }] }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        let produced = body["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(produced < 16, "{body}");
        earned.push(credit() - before);
    }
    assert!(earned[0] > 0, "{earned:?}");
    // Equal but for rounding (a micro-credit per receipt).
    assert!(
        (earned[0] - earned[1]).abs() <= 4,
        "credit followed max_tokens: {earned:?}"
    );
    cluster.stop_workers();
}

/// Resident memory of a process, in KiB (`VmRSS` in /proc).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Finding 5 with real processes: every closed session of a fresh key left its sender in the
/// coordinator (about 8 KB each; 60 000 logins grew it from 138 to 571 MiB). Now 4 000 logins
/// of fresh keys, each closed at once, leave no sender behind and the coordinator's memory
/// where it was, give or take its caches (on 3e934b0 the senders alone were about 32 MiB).
#[test]
fn logins_that_close_leave_nothing_behind() {
    let cluster = Cluster::start(Flavor::Sqlite, &["--new-keys-per-minute", "100000"]).unwrap();
    let port = cluster.port;
    let pid = cluster.serve.as_ref().unwrap().id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let logins = |n: usize| {
        rt.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    tokio::spawn(async move {
                        for _ in 0..n / 8 {
                            let me = Identity::from_seed(rand_bytes());
                            let (mut tx, rx, answer) = try_log_in(port, &me, "short visit").await;
                            assert!(
                                matches!(answer, Some(ToWorker::Welcome { .. })),
                                "{answer:?}"
                            );
                            let _ = tx.close().await;
                            drop(rx);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    let settled = || {
        let started = Instant::now();
        while metric(port, "tabula_session_senders") > 0
            || metric(port, "tabula_workers_connected") > 0
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "closed sessions are still held: {} senders",
                metric(port, "tabula_session_senders")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Warm up (allocator arenas, database pages), then measure.
    logins(800);
    settled();
    let before = rss_kib(pid);
    logins(4000);
    settled();
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "4 000 closed logins grew the coordinator by {grown} KiB"
    );
    // It still serves.
    assert_eq!(get(port, "/healthz").0, 200);
}

/// One worker alone: each unit waits for a second worker that never comes. After
/// `--replica-wait-secs` with no other lease running, the referee finishes the unit, so a
/// small cluster (or one whose other workers left or were banned) still answers.
#[test]
fn a_lone_worker_gets_its_units_finished_by_the_referee() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &["--replica-wait-secs", "2"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let worker = cluster.add_worker(0);
    let texts: Vec<String> = (0..6).map(|i| format!("alone {i}")).collect();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    assert!(metric(port, "tabula_units_stalled_total") >= 1);
    cluster.stop_workers();
    let entry = ledger(port, &worker);
    assert!(
        entry["workers"][0]["units_verified"].as_u64().unwrap() >= 1,
        "{entry}"
    );
    assert_eq!(entry["workers"][0]["strikes"], 0, "{entry}");
}

/// A generation model's exact file is served as per-layer pieces: the listing names each
/// with its SHA-256, every piece downloads and hashes to its name, and the pieces of one stage
/// load that stage (and only its layers); embedding models and unknown names get errors.
#[test]
fn generation_models_are_served_as_pieces_a_stage_can_load_alone() {
    use tabula_models::exact::{ExactFile, ExactLlama, stage_pieces, stage_ranges};
    let cluster = Cluster::start(Flavor::Sqlite, &[]).unwrap();
    let port = cluster.port;
    let (status, listing) = get(port, "/v1/models/SmolLM2-135M-Instruct/pieces");
    assert_eq!(status, 200, "{listing}");
    let layers = listing["layers"].as_u64().unwrap() as usize;
    let pieces = listing["pieces"].as_array().unwrap();
    assert_eq!(pieces.len(), layers + 3, "{listing}");
    let download = |sha: &str| {
        let mut bytes = Vec::new();
        ureq::get(&format!("http://127.0.0.1:{port}/v1/weights/{sha}"))
            .call()
            .unwrap()
            .body_mut()
            .as_reader()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    };
    let last = stage_ranges(layers, 2).unwrap()[1].clone();
    let wanted = stage_pieces(layers, &last);
    let mut mine = Vec::new();
    for p in pieces {
        let (name, sha) = (p["name"].as_str().unwrap(), p["sha256"].as_str().unwrap());
        if !wanted.iter().any(|w| w == name) {
            continue;
        }
        let bytes = download(sha);
        assert_eq!(bytes.len() as u64, p["size"].as_u64().unwrap(), "{name}");
        assert_eq!(tabula_models::catalog::sha256_hex(&bytes), sha, "{name}");
        mine.push((bytes, sha.to_string()));
    }
    assert_eq!(mine.len(), wanted.len());
    let refs: Vec<(&[u8], &str)> = mine
        .iter()
        .map(|(b, s)| (b.as_slice(), s.as_str()))
        .collect();
    let file = ExactFile::open_pieces(&refs).unwrap();
    let stage =
        ExactLlama::load_stage(&tabula_engine::cpu::CpuBackend, &file, last.clone()).unwrap();
    assert_eq!(stage.range(), last);
    // The first stage's layers are not in the last stage's pieces.
    assert!(ExactLlama::load_stage(&tabula_engine::cpu::CpuBackend, &file, 0..1).is_err());

    let (status, body) = get(port, "/v1/models/all-MiniLM-L6-v2/pieces");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embedding model"),
        "{body}"
    );
    let (status, body) = get(port, "/v1/models/no-such-model/pieces");
    assert_eq!(status, 404, "{body}");
}

/// What a connection from `from` (a loopback address) hears within `wait`: `Some(status)` when
/// the server answers without being asked (a refusal over a cap), `None` when it holds the
/// connection open in silence. The socket is returned with it, to keep it open.
async fn open_idle(port: u16, from: &str, wait: Duration) -> (tokio::net::TcpStream, Option<u16>) {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    let heard = match tokio::time::timeout(wait, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => std::str::from_utf8(&head[9..12]).unwrap().parse().ok(),
        Ok(Err(_)) => Some(0),
        Err(_) => None,
    };
    (stream, heard)
}

/// Waits until the server closes `stream` (reads end or fail), at most `within`; returns
/// whether it did.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Computes tasks exactly as `tabula worker` does, in this process (weights fetched from the
/// coordinator into `dir`): what an adversary needs to earn a clean record first.
struct HonestCompute(tabula_worker::exec::ExecutorThread);

impl HonestCompute {
    fn new(dir: &std::path::Path, port: u16) -> Self {
        let cache = std::sync::Arc::new(tabula_worker::native::WeightCache::new(
            dir,
            &format!("http://127.0.0.1:{port}"),
        ));
        HonestCompute(tabula_worker::exec::ExecutorThread::spawn(
            || Ok(tabula_worker::Executor::new(tabula_engine::cpu::CpuBackend)),
            cache,
        ))
    }

    async fn output(&self, task: Task) -> Vec<u8> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .submit(
                task,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .unwrap();
        rx.await.unwrap().unwrap().encode()
    }
}

/// What a group of turncoats shares out of band: how many of its `size` members have their
/// clean record (they lie once all have), and for each unit a member took, whether the group
/// answers it honestly (decided by the first to take it, followed by the others).
#[derive(Default)]
struct Group {
    trusted: std::sync::atomic::AtomicUsize,
    size: usize,
    /// Once trusted, lie on one unit in `lie_one_in` at random (0 or 1: on every unit). A
    /// patient liar that keeps answering honestly in between rebuilds the clean streak a
    /// paired lie cost it, and so gets units alone again.
    lie_one_in: u8,
    honest: std::sync::Mutex<std::collections::HashMap<[u8; 32], bool>>,
}

/// A worker written from the protocol that answers honestly until it has been credited
/// `honest_credits` times and so have all of its `group` (they coordinate out of band), then
/// answers `lie(unit, task)`. Returns its key once logged in (through `ready`) and runs until
/// `stop` or the end of its session (a ban).
async fn turncoat(
    port: u16,
    compute: std::sync::Arc<HonestCompute>,
    honest_credits: usize,
    group: std::sync::Arc<Group>,
    lie: fn(&Bytes<32>, &Task) -> Vec<u8>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<String>,
) {
    let me = Identity::from_seed(rand_bytes());
    let (mut tx, mut rx) = log_in(port, &me, "turncoat").await;
    let _ = ready.send(me.public().to_hex());
    let send = async |tx: &mut SocketTx, m: &ToCoordinator| {
        let _ = tx.send(Message::Binary(encode(m).into())).await;
    };
    send(&mut tx, &ToCoordinator::Ready).await;
    let mut credits = 0;
    loop {
        let message = tokio::select! {
            _ = stop.changed() => return,
            m = next_message(&mut rx) => match m { Some(m) => m, None => return },
        };
        match message {
            ToWorker::Assign(a) => {
                let honest = *group
                    .honest
                    .lock()
                    .unwrap()
                    .entry(a.unit.0)
                    .or_insert_with(|| {
                        group.trusted.load(std::sync::atomic::Ordering::SeqCst) < group.size
                            || !rand_bytes::<1>()[0].is_multiple_of(group.lie_one_in.max(1))
                    });
                let output = if honest {
                    compute.output(a.task.clone()).await
                } else {
                    lie(&a.unit, &a.task)
                };
                let submission = me.submission(a.lease, a.unit, output);
                send(&mut tx, &ToCoordinator::Submit(submission)).await;
            }
            ToWorker::Credited(_) => {
                credits += 1;
                if credits == honest_credits {
                    group
                        .trusted
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            ToWorker::NoWork { retry_ms } => {
                tokio::time::sleep(Duration::from_millis(u64::from(retry_ms))).await;
                send(&mut tx, &ToCoordinator::Ready).await;
            }
            ToWorker::Accepted { .. } | ToWorker::Rejected { .. } => {
                send(&mut tx, &ToCoordinator::Ready).await;
            }
            ToWorker::Error { .. } => return,
            _ => {}
        }
    }
}

/// Repeats the request `body` with its Idempotency-Key until the job answers the local exact
/// embeddings of `texts` (audits replace a liar's outputs after the job has finished), at
/// most 120 s.
fn until_outputs_are_exact(
    cluster: &Cluster,
    key: &str,
    body: &Value,
    idem: &[(&str, &str)],
    texts: &[String],
) {
    let expected = local_embeddings(texts);
    let started = Instant::now();
    loop {
        let (status, again) = request(
            cluster.port,
            "POST",
            "/v1/embeddings",
            Some(key),
            Some(body),
            idem,
        );
        assert_eq!(status, 200, "{again}");
        if api_embeddings(&again) == expected {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job still holds a liar's outputs\n{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The colluders' shared wrong answer: a function of the unit alone.
fn collude(unit: &Bytes<32>, task: &Task) -> Vec<u8> {
    let mut seed = unit.0;
    seed.iter_mut().for_each(|x| *x ^= 7);
    wrong_output(task, &seed, false).encode()
}

/// Findings 1 and 14 with real processes: two keys earn a clean record together, then answer
/// the same wrong output whenever they share a unit (here always: they are the only workers).
/// On 3e934b0 their quorum was accepted and nothing looked again. Now an audit re-executes a
/// quorum, bans both, and replaces the output; their other units are audited too, so the job
/// ends up holding only correct outputs, and their credit never settles.
#[test]
fn a_colluding_pair_is_caught_by_audits_and_its_outputs_replaced() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--probation-units",
            "1",
            "--audit-rate",
            "1",
            "--canary-rate",
            "0",
            "--unit-sequences",
            "1",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compute = std::sync::Arc::new(HonestCompute::new(
        &cluster.dir.path().join("turncoats"),
        port,
    ));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let group = std::sync::Arc::new(Group {
        size: 2,
        ..Group::default()
    });
    let pair: Vec<String> = (0..2)
        .map(|_| {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            rt.spawn(turncoat(
                port,
                compute.clone(),
                1,
                group.clone(),
                collude,
                stop.clone(),
                ready_tx,
            ));
            rt.block_on(ready_rx).unwrap()
        })
        .collect();
    let texts: Vec<String> = fixture_texts()
        .iter()
        .map(|t| format!("pair: {t}"))
        .collect();
    let idem = [("idempotency-key", "pair-job")];
    let body = json!({ "model": "all-MiniLM-L6-v2", "input": texts });
    let first_request = {
        let (key, body) = (key.clone(), body.clone());
        std::thread::spawn(move || {
            request(
                port,
                "POST",
                "/v1/embeddings",
                Some(&key),
                Some(&body),
                &idem,
            )
        })
    };
    // Both are caught once their first wrong quorum is audited.
    let banned = |k: &String| ledger(port, k)["workers"][0]["banned"] == json!(true);
    let started = Instant::now();
    while !pair.iter().all(banned) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the pair was not caught: {:?}\n{}",
            pair.iter().map(|k| ledger(port, k)).collect::<Vec<_>>(),
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        metric(port, "tabula_audits_failed_total") >= 1,
        "{}",
        cluster.log()
    );
    // Honest workers finish the job; every output the pair had verified is audited and replaced.
    for n in 0..2 {
        cluster.add_worker(n);
    }
    let (status, first) = first_request.join().unwrap();
    assert_eq!(status, 200, "{first}");
    until_outputs_are_exact(&cluster, &key, &body, &idem, &texts);
    let _ = stop_tx.send(true);
    cluster.stop_workers();
    for k in &pair {
        let entry = ledger(port, k);
        assert_eq!(entry["workers"][0]["banned"], true, "{entry}");
    }
}

/// Finding 2 with real processes: canaries were the newest verified units, so a unit a
/// colluding pair got verified with a wrong output became a canary, and honest workers that
/// answered it correctly were struck and banned. Now canaries come only from units the
/// referee computed or confirmed. Here a trusted pair poisons units unchecked (no audits),
/// then honest workers meet canaries at every other lease and are never struck.
#[test]
fn a_colluding_pair_cannot_poison_the_canaries() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--probation-units",
            "1",
            "--audit-rate",
            "0",
            "--canary-rate",
            "0.5",
            "--unit-sequences",
            "1",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compute = std::sync::Arc::new(HonestCompute::new(
        &cluster.dir.path().join("poisoners"),
        port,
    ));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let group = std::sync::Arc::new(Group {
        size: 2,
        ..Group::default()
    });
    for _ in 0..2 {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        rt.spawn(turncoat(
            port,
            compute.clone(),
            1,
            group.clone(),
            collude,
            stop.clone(),
            ready_tx,
        ));
        rt.block_on(ready_rx).unwrap();
    }
    // Alone, the pair shares every unit: honest through probation (refereed: the canary
    // pool), then agreeing on lies that a trusted quorum verifies.
    let texts: Vec<String> = (0..12).map(|i| format!("poisoned {i}")).collect();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    let wrong = api_embeddings(&body)
        .iter()
        .zip(local_embeddings(&texts))
        .filter(|(got, truth)| **got != *truth)
        .count();
    assert!(wrong >= 1, "the pair poisoned nothing");
    // The pair leaves before new work comes (a unit it took would wait for its lease to end).
    let _ = stop_tx.send(true);
    while metric(port, "tabula_workers_connected") > 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Honest workers now: half their leases are canaries.
    let honest = [cluster.add_worker(0), cluster.add_worker(1)];
    for round in 0..3 {
        let texts: Vec<String> = (0..8)
            .map(|i| format!("after the poison {round}.{i}"))
            .collect();
        let (status, body) = post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    }
    assert!(metric(port, "tabula_leases_canary_total") >= 1);
    for w in &honest {
        let entry = ledger(port, w);
        assert_eq!(entry["workers"][0]["strikes"], 0, "{entry}");
        assert_eq!(entry["workers"][0]["banned"], false, "{entry}");
    }
    cluster.stop_workers();
}

/// A sleeper's wrong answer: any well-formed output but the truth.
fn sleep_lie(unit: &Bytes<32>, task: &Task) -> Vec<u8> {
    wrong_output(task, &unit.0, true).encode()
}

/// Finding 14 with real processes: a key honest long enough to run units alone, then lying.
/// On 3e934b0 its solo lies were accepted and only a spot check could catch one. Now every
/// solo unit may be audited (here all are), which bans it and replaces what it verified.
#[test]
fn a_sleeper_that_lies_once_it_runs_alone_is_caught_by_an_audit() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--probation-units",
            "1",
            "--solo-after",
            "2",
            "--spot-check-rate",
            "0",
            "--audit-rate",
            "1",
            "--canary-rate",
            "0",
            // Strikes from disagreements alone would take a while: it is the audits that catch it.
            "--ban-after",
            "50",
            "--unit-sequences",
            "1",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    // Two honest workers: once the sleeper is banned, a unit one of them answered still finds
    // a second worker for its quorum.
    cluster.add_worker(0);
    cluster.add_worker(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compute = std::sync::Arc::new(HonestCompute::new(
        &cluster.dir.path().join("sleeper"),
        port,
    ));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // It lies on half its units: a lie next to the honest worker costs it its clean streak
    // (a strike), and honest units in between earn it back, until it lies on a unit alone.
    let group = std::sync::Arc::new(Group {
        size: 1,
        lie_one_in: 2,
        ..Group::default()
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    rt.spawn(turncoat(port, compute, 3, group, sleep_lie, stop, ready_tx));
    let sleeper = rt.block_on(ready_rx).unwrap();
    let texts: Vec<String> = (0..24).map(|i| format!("sleeper text {i}")).collect();
    let idem = [("idempotency-key", "sleeper-job")];
    let body = json!({ "model": "all-MiniLM-L6-v2", "input": texts });
    let (status, first) = request(
        port,
        "POST",
        "/v1/embeddings",
        Some(&key),
        Some(&body),
        &idem,
    );
    assert_eq!(status, 200, "{first}");
    // Placement is random: under load the honest worker may take most units, so work keeps
    // coming until the sleeper has lied alone and been caught.
    let started = Instant::now();
    for round in 0.. {
        if ledger(port, &sleeper)["workers"][0]["banned"] == json!(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the sleeper was not caught: {}\n{}",
            ledger(port, &sleeper),
            cluster.log()
        );
        let more: Vec<String> = (0..4).map(|i| format!("more work {round}.{i}")).collect();
        let (status, body) = post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": more }),
        );
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        metric(port, "tabula_units_solo_total") >= 1,
        "no unit ran alone"
    );
    assert!(
        metric(port, "tabula_audits_failed_total") >= 1,
        "no audit caught a solo lie\n{}",
        cluster.log()
    );
    // What it verified alone is replaced by the referee's output.
    until_outputs_are_exact(&cluster, &key, &body, &idem, &texts);
    let _ = stop_tx.send(true);
    cluster.stop_workers();
}

/// Finding 6: idle, slow and too many connections. Attackers come from other loopback
/// addresses (127.0.0.2 and up) than the honest client (127.0.0.1).
#[test]
fn idle_slow_and_surplus_connections_are_cut() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--header-timeout-secs",
            "15",
            "--max-connections",
            "90",
            "--max-connections-per-address",
            "40",
            "--replicas",
            "1",
        ],
    )
    .unwrap();
    let port = cluster.port;
    // The soft open-file limit was raised to the hard one.
    let pid = cluster.serve.as_ref().unwrap().id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        files[3], files[4],
        "soft and hard open-file limits: {limits}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let wait = Duration::from_millis(2500);
        let open_many = |from: &'static str, n: usize| {
            futures_util::future::join_all((0..n).map(move |_| open_idle(port, from, wait)))
        };
        let count = |v: &[(tokio::net::TcpStream, Option<u16>)], s: Option<u16>| {
            v.iter().filter(|(_, h)| *h == s).count()
        };
        // One address: 40 idle connections are held, the other 60 are refused with a 429.
        let mut first = open_many("127.0.0.2", 100).await;
        assert_eq!(count(&first, None), 40, "held from one address");
        assert_eq!(count(&first, Some(429)), 60, "refused from one address");
        // The honest client still gets in.
        assert_eq!(get(port, "/healthz").0, 200);
        // Two more addresses fill the server's cap of 90: the surplus hears a 503.
        let second = open_many("127.0.0.3", 40).await;
        assert_eq!(count(&second, None), 40);
        let third = open_many("127.0.0.4", 20).await;
        assert_eq!(count(&third, None), 10, "held up to the server's cap");
        assert_eq!(
            count(&third, Some(503)),
            10,
            "refused over the server's cap"
        );
        // Silent connections are closed once the header timeout (15 s) has passed, which
        // frees their places.
        for (stream, heard) in &mut first {
            if heard.is_none() {
                assert!(
                    closed_by_server(stream, Duration::from_secs(30)).await,
                    "an idle connection was kept open"
                );
            }
        }
        drop((first, second, third));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_again, heard) = open_idle(port, "127.0.0.2", Duration::from_millis(300)).await;
        assert_eq!(heard, None, "a freed place is taken again");

        // Slowloris: a header line every half second never completes a request in time.
        let (mut slow, _) = open_idle(port, "127.0.0.5", Duration::from_millis(10)).await;
        let started = Instant::now();
        let trickle = async {
            use tokio::io::AsyncWriteExt;
            let _ = slow
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                .await;
            for i in 0.. {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if slow
                    .write_all(format!("x-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                if started.elapsed() > Duration::from_secs(45) {
                    panic!("a slow client kept its connection for 45 s");
                }
            }
        };
        trickle.await;

        // Keep-alive: after its answer, an idle connection is closed too.
        let (mut kept, _) = open_idle(port, "127.0.0.6", Duration::from_millis(10)).await;
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            kept.read_exact(&mut head).await.unwrap();
            assert_eq!(&head[9..12], b"200");
        }
        assert!(closed_by_server(&mut kept, Duration::from_secs(30)).await);
    });

    // A worker's socket is upgraded and outlives the header timeout: it still computes.
    let key = cluster.api_key();
    cluster.add_worker(0);
    std::thread::sleep(Duration::from_secs(17));
    let texts = vec!["held past the header timeout".to_string()];
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
}

/// A coordinator whose data directory is a 48 MiB tmpfs of its own (a private mount namespace,
/// `unshare -rm`, so no root is needed), driven through a shell that fills and frees the disk
/// on command. Returns the cluster (its `serve` is the shell; the coordinator dies with it)
/// and the shell's command line in and answers out, after the first answer: an API key.
fn cluster_on_a_small_disk() -> (
    Cluster,
    std::process::ChildStdin,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    String,
) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let port = free_port();
    let script = r#"
        set -e
        mount -t tmpfs -o size=48m tmpfs "$DISK"
        "$BIN" keys create --data-dir "$DISK/data"
        setpriv --pdeathsig KILL "$BIN" serve --data-dir "$DISK/data" --listen "127.0.0.1:$PORT" \
            --local --replicas 1 2>"$LOG" &
        while read -r command; do
            case "$command" in
                fill) dd if=/dev/zero of="$DISK/filler" bs=64k 2>/dev/null || true; echo filled ;;
                free) rm -f "$DISK/filler"; echo freed ;;
            esac
        done
    "#;
    let mut child = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("DISK", &disk)
        .env("BIN", BIN)
        .env("PORT", port.to_string())
        .env("LOG", dir.path().join("serve.log"))
        .env("TABULA_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("unshare (util-linux) runs the coordinator in a mount namespace of its own");
    let stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let key = lines
        .next()
        .expect("the shell in a private mount namespace printed an API key (is unshare -rm allowed here?)")
        .unwrap();
    let cluster = Cluster {
        dir,
        port,
        database_url: None,
        serve: Some(child),
        workers: Vec::new(),
        serve_args: Vec::new(),
    };
    let started = Instant::now();
    while get(port, "/healthz").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the coordinator did not come up: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (cluster, stdin, lines, key)
}

/// Finding 10: the disk fills, then space comes back. Requests fail with a clear error while
/// it is full, `/healthz` says writes are failing, and once space returns the same process
/// serves again with no restart.
#[test]
fn a_full_disk_is_reported_and_survived_without_a_restart() {
    use std::io::Write;
    let (mut cluster, mut shell, mut answers, key) = cluster_on_a_small_disk();
    let port = cluster.port;
    let mut command = |c: &str| {
        writeln!(shell, "{c}").unwrap();
        answers.next().unwrap().unwrap()
    };
    cluster.add_worker(0);
    let embed = |text: &str| {
        post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": [text] }),
        )
    };
    let (status, body) = embed("before the disk fills");
    assert_eq!(status, 200, "{body}");

    assert_eq!(command("fill"), "filled");
    for i in 0..3 {
        let (status, body) = embed(&format!("on a full disk {i}"));
        assert_eq!(status, 503, "{body}\n{}", cluster.log());
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("full"), "{message}");
    }
    // One probe answers `/healthz` for a second: the failure shows within it.
    let started = Instant::now();
    let health = loop {
        let (status, health) = get(port, "/healthz");
        if status == 503 {
            break health;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{health}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health["status"], "failing", "{health}");
    assert!(
        health["database_writes"].as_str().unwrap().contains("full"),
        "{health}"
    );

    assert_eq!(command("free"), "freed");
    let started = Instant::now();
    while get(port, "/healthz").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the coordinator did not recover once space came back: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let texts = vec!["after space came back".to_string()];
    let (status, body) = embed(&texts[0]);
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(api_embeddings(&body), local_embeddings(&texts));
    cluster.stop_workers();
}

/// Finding 3 with real processes: a key that takes units and gives them back (or drops its
/// connection and logs in again) hoarded for free on 3e934b0. Now each release counts against
/// the key, a released unit never comes back to it, and past its allowance it gets nothing,
/// across reconnections.
#[test]
fn a_hoarder_that_releases_and_reconnects_runs_out_of_units() {
    let cluster = Cluster::start(Flavor::Sqlite, &["--abandon-allowance", "2"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    std::thread::spawn(move || {
        let input: Vec<String> = (0..40).map(|i| format!("hoarded {i}")).collect();
        post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "all-MiniLM-L6-v2", "input": input }),
        );
    });
    while metric(port, "tabula_units_in_memory") < 10 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let me = Identity::from_seed(rand_bytes());
        let mut units = std::collections::HashSet::new();
        let ready = async |tx: &mut SocketTx, rx: &mut SocketRx| {
            tx.send(Message::Binary(encode(&ToCoordinator::Ready).into()))
                .await
                .unwrap();
            next_message(rx).await
        };
        // Within its allowance (2, and nothing verified): three units, each given back.
        for round in 0..3u64 {
            let (mut tx, mut rx) = log_in(port, &me, "hoarder").await;
            let Some(ToWorker::Assign(a)) = ready(&mut tx, &mut rx).await else {
                panic!("no unit in round {round}")
            };
            assert!(units.insert(a.unit), "a released unit came back");
            tx.send(Message::Binary(
                encode(&ToCoordinator::Release { lease: a.lease }).into(),
            ))
            .await
            .unwrap();
            while metric(port, "tabula_leases_released_total") < round + 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Reconnect between rounds: a new session forgets nothing.
            let _ = tx.close().await;
        }
        let (mut tx, mut rx) = log_in(port, &me, "hoarder").await;
        match ready(&mut tx, &mut rx).await {
            Some(ToWorker::NoWork { .. }) => {}
            other => panic!("a key past its allowance got {other:?}"),
        }
    });
    assert!(metric(port, "tabula_leases_released_total") >= 3);
    assert!(metric(port, "tabula_grants_limited_total") >= 1);
}

/// The official `openai` Python client against a real cluster: embeddings, completions, chat
/// (streamed too), typed errors and the Batch API (`tests/openai_client.py`). Needs the
/// `openai` package importable from `python3` (or from `$TABULA_PYLIB`, where
/// `tests/run-all.sh` installs it).
#[test]
fn openai_python_client() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &[]).unwrap();
    let key = cluster.api_key();
    for n in 0..2 {
        cluster.add_worker(n);
    }
    let script = manifest_dir().join("../../tests/openai_client.py");
    let mut python = Command::new("python3");
    python
        .arg(script)
        .args([&format!("http://127.0.0.1:{}", cluster.port), &key]);
    if let Some(lib) = std::env::var_os("TABULA_PYLIB") {
        python.env("PYTHONPATH", lib);
    }
    let out = python.output().expect("python3");
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}\ncoordinator log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.log()
    );
}

/// Fast (f32) precision: workers that compute in f32 are compared with a tolerance, and the
/// verified answer is within it of a local f32 run.
#[test]
fn fast_precision_agrees_within_tolerance() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &[]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    for n in 0..2 {
        cluster.add_worker_with(n, &["--precision", "fast"]);
    }
    let texts: Vec<String> = fixture_texts().into_iter().take(8).collect();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts, "precision": "fast" }),
    );
    assert_eq!(status, 200, "{body}");
    let local = local_embeddings_in(&texts, "fast");
    for (g, e) in api_embeddings(&body).iter().zip(&local) {
        let dot: f64 = g
            .iter()
            .zip(e)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        assert!(
            dot >= tabula_protocol::FAST_EMBEDDING_MIN_COSINE,
            "cosine {dot}"
        );
    }
}

/// Ctrl-C on a worker in the middle of a unit gives its lease back at once (the lease is
/// long, so only the release can free the unit in time), and another worker finishes the job.
#[test]
fn ctrl_c_releases_the_lease() {
    let mut cluster =
        Cluster::start(Flavor::Sqlite, &["--lease-secs", "3600", "--replicas", "1"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    cluster.add_worker(0);
    let request = std::thread::spawn(move || {
        post(
            port,
            "/v1/completions",
            &key,
            json!({ "model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0 }),
        )
    });
    wait_for_metric(
        &cluster,
        "tabula_leases_granted_total",
        |n| n > 0,
        60,
        "no lease",
    );
    std::thread::sleep(Duration::from_millis(300));
    interrupt_worker(&mut cluster, 0);
    // The release crossed the socket before the worker exited; the coordinator may still be
    // committing it.
    wait_for_metric(
        &cluster,
        "tabula_leases_released_total",
        |n| n == 1,
        10,
        "the lease was not released",
    );
    cluster.add_worker(1);
    let (status, body) = request.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["text"].as_str().unwrap(),
        local_generation("Once upon a time", 60, "0", "0")
    );
}

/// Waits until the coordinator's metric `name` satisfies `done`; fails saying `what`, with the
/// cluster's log, after `within_secs`.
fn wait_for_metric(
    cluster: &Cluster,
    name: &str,
    done: impl Fn(u64) -> bool,
    within_secs: u64,
    what: &str,
) {
    let started = Instant::now();
    while !done(metric(cluster.port, name)) {
        assert!(
            started.elapsed() < Duration::from_secs(within_secs),
            "{what}: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends Ctrl-C (SIGINT) to worker `n` and waits for it to exit cleanly.
fn interrupt_worker(cluster: &mut Cluster, n: usize) {
    let pid = cluster.workers[n].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = cluster.workers[n].wait().unwrap();
    assert!(
        status.success(),
        "the worker did not stop cleanly: {status}"
    );
}

/// A worker holding several units computes them in turn and, on Ctrl-C, gives back the ones
/// waiting as well as the one it was computing: another worker finishes every request.
#[test]
fn a_worker_holding_several_units_gives_them_all_back_on_ctrl_c() {
    // Leases short enough that a unit asked for at the very moment of the Ctrl-C (granted,
    // never delivered) comes back within the test; long enough not to expire otherwise.
    // A fresh key holds one unit at a time by default; this one is to hold three.
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--lease-secs",
            "30",
            "--replicas",
            "1",
            "--probation-leases",
            "4",
            "--request-timeout-secs",
            "240",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    cluster.add_worker_with(0, &["--units-in-flight", "3"]);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let key = key.clone();
            std::thread::spawn(move || {
                post(
                    port,
                    "/v1/completions",
                    &key,
                    json!({ "model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0 }),
                )
            })
        })
        .collect();
    wait_for_metric(
        &cluster,
        "tabula_leases_granted_total",
        |n| n >= 3,
        60,
        "the worker did not take three units",
    );
    std::thread::sleep(Duration::from_millis(300));
    interrupt_worker(&mut cluster, 0);
    // One unit computing and at least one waiting: a worker holding one unit releases one.
    wait_for_metric(
        &cluster,
        "tabula_leases_released_total",
        |n| n >= 2,
        10,
        "the waiting units were not given back",
    );
    cluster.add_worker_with(1, &["--units-in-flight", "2"]);
    let expected = local_generation("Once upon a time", 40, "0", "0");
    for request in requests {
        let (status, body) = request.join().unwrap();
        let workers: String = (0..2)
            .map(|n| {
                std::fs::read_to_string(cluster.dir.path().join(format!("worker{n}.log")))
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(status, 200, "{body}\n{}\n{workers}", cluster.log());
        assert_eq!(body["choices"][0]["text"].as_str().unwrap(), expected);
    }
    assert_eq!(
        metric(port, "tabula_results_rejected_total"),
        0,
        "{}",
        cluster.log()
    );
}

use tabula_chain::anvil::{Anvil, DEV_KEY as ANVIL_KEY};

/// Runs `tabula chain <args…>` on the cluster's data with `chain` (the chain flags) and
/// `env`; returns (success, stdout, stderr).
fn chain_cli(
    cluster: &Cluster,
    chain: &[String],
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut command = Command::new(BIN);
    command
        .arg("chain")
        .args(args)
        .args(cluster.base_args())
        .args(chain)
        .envs(env.iter().copied());
    if chain.iter().any(|a| a == "--chain-rpc") {
        // The server reads anvil's key from a file, the CLI from the environment: both ways
        // are exercised.
        command.env("TABULA_CHAIN_KEY", ANVIL_KEY);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The root and posted time of `epoch` as the coordinator's database holds it.
fn stored_epoch(cluster: &Cluster, epoch: i64) -> Option<(String, Option<i64>)> {
    use sqlx::Row;
    let url = cluster.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            cluster.data_dir().join("tabula.db").display()
        )
    });
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("SELECT root, posted_ms FROM epochs WHERE epoch = $1")
            .bind(epoch)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .map(|r| (r.get("root"), r.get("posted_ms")))
    })
}

/// `POST /v1/ledger/claim/{address}`: the coordinator claims for the address.
fn relay_claim(port: u16, address: &str) -> (u16, Value) {
    request(
        port,
        "POST",
        &format!("/v1/ledger/claim/{address}"),
        None,
        Some(&json!({})),
        &[],
    )
}

/// An embeddings job over `texts`, answered with the exact reference.
fn run_job(cluster: &Cluster, key: &str, texts: &[String]) {
    let (status, body) = post(
        cluster.port,
        "/v1/embeddings",
        key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(texts));
}

/// On-chain credit end to end: verified credit of two payout addresses settles into epoch 1
/// (one root), each address proves and claims exactly its ledger credit (relayed through the
/// API and through `tabula chain claim`), `tabula chain verify` agrees, and an epoch built
/// when the process dies before posting (`kill -9` at that point) is posted after the restart
/// with the same root, exactly once.
fn settles_on_chain(flavor: Flavor, anvil: Option<&Anvil>) {
    // Credit settles at once here (the audit window is tested on its own).
    let (mut chain, mut serve_chain): (Vec<String>, Vec<String>) = (
        vec!["--audit-window-minutes".into(), "0".into()],
        Vec::new(),
    );
    let dir = tempfile::tempdir().unwrap();
    if let Some(anvil) = anvil {
        let key_file = dir.path().join("anvil.key");
        std::fs::write(&key_file, ANVIL_KEY).unwrap();
        chain.extend(["--chain-rpc".into(), anvil.url.clone()]);
        serve_chain = vec!["--chain-key-file".into(), key_file.display().to_string()];
    }
    let mut serve_args: Vec<&str> = vec!["--epoch-minutes", "0", "--probation-units", "0"];
    serve_args.extend(chain.iter().chain(&serve_chain).map(String::as_str));
    let Some(mut cluster) = Cluster::start(flavor, &serve_args) else {
        return;
    };
    let port = cluster.port;
    let key = cluster.api_key();
    let (alice, bob) = (
        "0x00000000000000000000000000000000000a11ce",
        "0x0000000000000000000000000000000000000b0b",
    );
    cluster.add_worker_with(0, &["--payout", alice]);
    cluster.add_worker_with(1, &["--payout", bob]);
    let texts = fixture_texts();
    run_job(&cluster, &key, &texts[..8]);
    cluster.stop_workers();

    let (status, body) = get(port, &format!("/v1/ledger/proof/{alice}"));
    assert_eq!(status, 404, "no epoch yet: {body}");
    let (ok, out, err) = chain_cli(&cluster, &chain, &["post-epoch"], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("epoch 1: root 0x"), "{out}");
    assert!(out.contains("2 addresses"), "{out}");

    let (status, listing) = get(port, "/v1/ledger/epochs/latest");
    assert_eq!(status, 200, "{listing}");
    let entries: Vec<tabula_chain::merkle::Entry> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| tabula_chain::merkle::Entry {
            account: e[0].as_str().unwrap().parse().unwrap(),
            amount: e[1].as_str().unwrap().parse().unwrap(),
        })
        .collect();
    let rebuilt = tabula_chain::merkle::CreditTree::build(&entries).unwrap();
    assert_eq!(
        rebuilt.root().to_string(),
        listing["root"].as_str().unwrap()
    );

    for (address, relay_by_api) in [(alice, true), (bob, false)] {
        let credit = ledger(port, address)["verified_credit_micro"]
            .as_u64()
            .unwrap();
        assert!(credit > 0);
        let (status, proof) = get(port, &format!("/v1/ledger/proof/{address}"));
        assert_eq!(status, 200, "{proof}");
        assert_eq!(proof["epoch"], 1);
        assert_eq!(proof["cumulative_amount"], credit.to_string(), "{proof}");
        assert_eq!(proof["on_chain"]["balance_micro"], "0", "{proof}");
        let hashes: Vec<tabula_chain::B256> = proof["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().parse().unwrap())
            .collect();
        let entry = tabula_chain::merkle::Entry {
            account: address.parse().unwrap(),
            amount: tabula_chain::U256::from(credit),
        };
        assert!(tabula_chain::merkle::verify(
            &rebuilt.root(),
            &entry,
            &hashes
        ));
        if relay_by_api {
            // Finding 8: claims for one address at once sent a second, reverting (and paid
            // for) transaction, answered 500. Now one is in flight per address: exactly one
            // claims, the others are told to retry or find nothing left.
            let claims: Vec<(u16, Value)> = (0..6)
                .map(|_| {
                    let address = address.to_string();
                    std::thread::spawn(move || relay_claim(port, &address))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let mut sent = 0;
            for (status, claim) in &claims {
                match status {
                    200 if claim["claimed_now"].as_str() == Some(&credit.to_string()) => {
                        assert!(claim["gas_used"].as_u64().unwrap() > 21_000, "{claim}");
                        sent += 1;
                    }
                    200 => assert_eq!(claim["claimed_now"], Value::Null, "{claim}"),
                    429 => assert_eq!(claim["error"]["code"], "claim_in_progress", "{claim}"),
                    _ => panic!("a concurrent claim got {status}: {claim}"),
                }
            }
            assert_eq!(sent, 1, "{claims:?}");
            // A second claim sends nothing: everything proven is claimed.
            let (status, again) = relay_claim(port, address);
            assert_eq!(status, 200, "{again}");
            assert_eq!(again["claimed_now"], Value::Null, "{again}");
        } else {
            let (ok, out, err) = chain_cli(&cluster, &chain, &["claim", "--address", address], &[]);
            assert!(ok, "{out}{err}");
            assert!(out.contains("claimed"), "{out}");
        }
        let (_, after) = get(port, &format!("/v1/ledger/proof/{address}"));
        assert_eq!(
            after["on_chain"]["balance_micro"],
            credit.to_string(),
            "{after}"
        );
        assert_eq!(
            after["on_chain"]["claimed_micro"],
            credit.to_string(),
            "{after}"
        );
    }
    let (status, bad) = get(port, "/v1/ledger/proof/0x1234");
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("40 hex digits")
    );
    let (ok, out, err) = chain_cli(&cluster, &chain, &["verify"], &[]);
    assert!(ok && out.contains("all three agree"), "{out}{err}");
    if let Some(anvil) = anvil {
        // An auditor with nothing but the public listing and the chain.
        let auditor = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args([
                "chain",
                "verify",
                "--coordinator",
                &format!("http://127.0.0.1:{port}"),
            ])
            .args(["--chain-rpc", &anvil.url])
            .args(["--data-dir", &auditor.path().display().to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("all three agree"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // More credit, then a crash between building epoch 2 and posting it.
    cluster.add_worker_with(2, &["--payout", alice]);
    cluster.add_worker_with(3, &["--payout", bob]);
    run_job(&cluster, &key, &texts[8..16]);
    cluster.stop_workers();
    let (ok, out, err) = chain_cli(
        &cluster,
        &chain,
        &["post-epoch"],
        &[("TABULA_FAULT", "crash-after-epoch-build")],
    );
    assert!(!ok, "the fault point must kill the process: {out}{err}");
    let (root, posted) = stored_epoch(&cluster, 2).expect("epoch 2 was built");
    assert_eq!(posted, None, "epoch 2 must not be posted yet");
    let (status, _) = get(port, "/v1/ledger/epochs/2");
    assert_eq!(status, 404);
    // Restart the coordinator (kill -9): it posts the epoch it finds built, with its root.
    cluster.kill_serve();
    cluster.start_serve();
    let started = Instant::now();
    let listing = loop {
        let (status, listing) = get(port, "/v1/ledger/epochs/2");
        if status == 200 {
            break listing;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "epoch 2 was not posted after the restart: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listing["root"].as_str().unwrap(), root);
    assert!(stored_epoch(&cluster, 2).unwrap().1.is_some());
    let (ok, out, err) = chain_cli(&cluster, &chain, &["post-epoch"], &[]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("no new credit to settle since epoch 2"),
        "{out}"
    );
    let (ok, out, err) = chain_cli(&cluster, &chain, &["status"], &[]);
    assert!(ok && out.contains("on-chain latest epoch: 2"), "{out}{err}");
    let (ok, out, err) = chain_cli(&cluster, &chain, &["verify"], &[]);
    assert!(ok && out.contains("all three agree"), "{out}{err}");
    // Epoch 2 pays only the difference.
    let credit = ledger(port, alice)["verified_credit_micro"]
        .as_u64()
        .unwrap();
    let (_, before) = get(port, &format!("/v1/ledger/proof/{alice}"));
    assert_eq!(before["cumulative_amount"], credit.to_string(), "{before}");
    let claimed_before: u64 = before["on_chain"]["claimed_micro"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, claim) = relay_claim(port, alice);
    assert_eq!(status, 200, "{claim}");
    assert_eq!(
        claim["claimed_now"],
        (credit - claimed_before).to_string(),
        "{claim}"
    );
    assert_eq!(
        claim["on_chain"]["balance_micro"],
        credit.to_string(),
        "{claim}"
    );

    // Periodic epochs: restarted with a three-second period, the coordinator posts epoch 3 by
    // itself once new credit is verified.
    cluster.kill_serve();
    let at = cluster
        .serve_args
        .iter()
        .position(|a| a == "--epoch-minutes")
        .unwrap();
    cluster.serve_args[at + 1] = "0.05".into();
    cluster.start_serve();
    cluster.add_worker_with(4, &["--payout", alice]);
    cluster.add_worker_with(5, &["--payout", bob]);
    run_job(&cluster, &key, &texts[16..24]);
    let started = Instant::now();
    while get(port, "/v1/ledger/epochs/3").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no epoch was posted on schedule: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Finding 9: the embedded chain's state file is lost. A fresh contract would appear at the
    // same address with no epochs (balances 0, the next epoch unpostable, claims 500); the
    // coordinator refuses to start instead, and says how to recover.
    if anvil.is_none() {
        cluster.kill_serve();
        std::fs::remove_file(cluster.data_dir().join("chain").join("state.json")).unwrap();
        let mut serve = Command::new(BIN)
            .arg("serve")
            .args(cluster.base_args())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--local"])
            .args(&cluster.serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = serve.kill();
                panic!("the coordinator started on a chain that lost its epochs");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        serve
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "{err}");
        assert!(
            err.contains("state.json") && err.contains("epoch 3"),
            "{err}"
        );
    }
}

#[test]
fn settles_on_the_embedded_chain() {
    settles_on_chain(Flavor::Sqlite, None);
}

#[test]
fn settles_on_anvil() {
    let anvil = Anvil::start();
    settles_on_chain(Flavor::Sqlite, Some(&anvil));
}

#[test]
fn postgres_settles_on_the_embedded_chain() {
    settles_on_chain(Flavor::Postgres, None);
}

/// The server-sent events of a streaming request, as JSON (`[DONE]` as a string), each with
/// the time it arrived after the request was sent.
fn stream_events(port: u16, key: &str, path: &str, body: Value) -> Vec<(Duration, Value)> {
    use std::io::BufRead;
    let started = Instant::now();
    let response = ureq::post(&format!("http://127.0.0.1:{port}{path}"))
        .header("authorization", &format!("Bearer {key}"))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    let mut events = Vec::new();
    for line in std::io::BufReader::new(response.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let v = serde_json::from_str(data).unwrap_or(Value::String(data.to_string()));
            events.push((started.elapsed(), v));
        }
    }
    events
}

/// Asks `cluster` for a greedy completion of `prompt` and checks it is what `tabula generate
/// --precision exact` says.
fn completes_like_the_whole_model(cluster: &Cluster, key: &str, prompt: &str, max_tokens: u32) {
    let (status, body) = post(
        cluster.port,
        "/v1/completions",
        key,
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 }),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(
        body["choices"][0]["text"].as_str().unwrap(),
        local_generation(prompt, max_tokens, "0", "0")
    );
}

/// Waits until `n` workers that take stages are connected.
fn wait_for_workers(cluster: &Cluster, n: u64) {
    let started = Instant::now();
    while metric(cluster.port, "tabula_workers_connected") < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} workers did not connect: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 17: SmolLM2 cut into three exact stages on six native workers (two disjoint
/// pipelines), activations over WebRTC data channels on loopback. Greedy and seeded-sampling
/// completions equal `tabula generate --precision exact` token for token; a streamed chat
/// arrives token by token; `/v1/jobs` and `/metrics` show the stages; every stage worker is
/// credited with receipts that verify.
#[test]
fn three_stages_on_six_workers_generate_what_the_whole_model_does() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "3", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers: Vec<String> = (0..6).map(|n| cluster.add_worker(n)).collect();
    wait_for_workers(&cluster, 6);
    let prompt = "The three primary colours are";
    for (temperature, seed) in [(0.0, 0u64), (0.8, 7)] {
        let want = local_generation(prompt, 20, &temperature.to_string(), &seed.to_string());
        let (status, body) = post(
            port,
            "/v1/completions",
            &key,
            json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 20,
                    "temperature": temperature, "seed": seed }),
        );
        assert_eq!(status, 200, "{body}\n{}", cluster.log());
        assert_eq!(
            body["choices"][0]["text"].as_str().unwrap(),
            want,
            "temperature {temperature}"
        );
    }
    // Streaming: the text arrives in several deltas, and they add up to the whole answer.
    let chat = json!({ "model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
                       "messages": [{ "role": "user", "content": "Name three fruits." }] });
    let (status, whole) = post(port, "/v1/chat/completions", &key, chat.clone());
    assert_eq!(status, 200, "{whole}");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = stream_events(port, &key, "/v1/chat/completions", streamed);
    assert_eq!(events.last().unwrap().1, "[DONE]", "{events:?}");
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| e["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(deltas.len() >= 5, "one delta per agreed token: {deltas:?}");
    assert_eq!(
        deltas.concat(),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // The first token arrives well before the last.
    let first = events
        .iter()
        .find(|(_, e)| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .unwrap()
        .0;
    assert!(first < events.last().unwrap().0, "{events:?}");

    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    let jobs = jobs["data"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    for job in jobs {
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["pipeline"]["stages"], 3, "{job}");
        assert_eq!(job["pipeline"]["pipelines"], 2, "{job}");
        assert_eq!(job["pipeline"]["links_direct"], 4, "{job}");
        assert_eq!(job["pipeline"]["liars"], 0, "{job}");
    }
    assert_eq!(metric(port, "tabula_pipeline_sessions_finished_total"), 4);
    assert!(metric(port, "tabula_pipeline_steps_agreed_total") >= 4 * 5);
    assert_eq!(metric(port, "tabula_pipeline_links_relayed_total"), 0);
    assert_eq!(metric(port, "tabula_pipeline_relayed_bytes_total"), 0);
    cluster.stop_workers();
    for w in &workers {
        let entry = ledger(port, w);
        assert!(
            entry["verified_credit_micro"].as_i64().unwrap() > 0,
            "every stage is credited: {entry}"
        );
        check_receipts(&entry);
    }
}

/// A stage worker in this process that lies with `tamper`; stops when the sender is dropped
/// (or set). Returns its key.
fn lying_stage_worker(
    cluster: &Cluster,
    n: usize,
    tamper: tabula_worker::member::Tamper,
) -> (String, tokio::sync::watch::Sender<bool>) {
    lying_stage_worker_in(cluster, cluster.dir.path().join(format!("liar{n}")), tamper)
}

/// [`lying_stage_worker`] with the key in `state_dir` (a key with a history: a sleeper).
fn lying_stage_worker_in(
    cluster: &Cluster,
    state_dir: PathBuf,
    tamper: tabula_worker::member::Tamper,
) -> (String, tokio::sync::watch::Sender<bool>) {
    use tabula_worker::native::{WorkerOptions, load_or_create_identity, run};
    let identity = load_or_create_identity(&state_dir).unwrap();
    let key = identity.public().to_hex();
    let options = WorkerOptions {
        coordinator: format!("http://127.0.0.1:{}", cluster.port),
        state_dir,
        precisions: vec![tabula_protocol::Precision::Exact],
        payout: None,
        agent: format!("liar {tamper:?}"),
        max_units: None,
        units_in_flight: 1,
        threads: 1,
        stages: true,
        max_model_mb: 0,
        member: tabula_worker::member::MemberOptions {
            tamper: Some(tamper),
            ..Default::default()
        },
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let (events, _keep) = tokio::sync::mpsc::unbounded_channel();
            let _ = run(
                || Ok(tabula_worker::Executor::new(tabula_engine::cpu::CpuBackend)),
                identity,
                options,
                events,
                stop,
            )
            .await;
        });
    });
    (key, stop_tx)
}

/// Issue 17: griefers. Keys are free, so a worker can take stages and fail them (a false
/// budget, a refusal, a closed tab) to cost every session it is placed in a rebuild. The two
/// griefers here are placed (the first four stage workers fill the first session), fail
/// their stages, and honest spares rebuild the session: the answer is the whole model's.
/// After it, the workers that finished are proven and are placed before anyone else, so the
/// next sessions run without a rebuild and the griefers get no more stages.
#[test]
fn griefers_that_take_stages_and_fail_them_cost_one_rebuild_each_and_then_no_more() {
    use tabula_worker::member::Tamper;
    let prompt = "Water boils at";
    let want = local_generation(prompt, 8, "0", "0");
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "2", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let mut honest: Vec<String> = (0..2).map(|n| cluster.add_worker(n)).collect();
    let griefers: Vec<(String, _)> = (0..2)
        .map(|i| lying_stage_worker(&cluster, i, Tamper::FailStages))
        .collect();
    wait_for_workers(&cluster, 4);
    let body = json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8, "temperature": 0 });
    let ask = {
        let (key, body) = (key.clone(), body.clone());
        std::thread::spawn(move || post(port, "/v1/completions", &key, body))
    };
    // Spares for the rebuilds, once the four are placed.
    std::thread::sleep(Duration::from_millis(500));
    for n in 0..4 {
        honest.push(cluster.add_worker(10 + n));
    }
    let (status, answer) = ask.join().unwrap();
    assert_eq!(status, 200, "{answer}\n{}", cluster.log());
    assert_eq!(answer["choices"][0]["text"].as_str().unwrap(), want);
    // Both were placed; a griefer whose partner failed first was dropped with it before its
    // own failure arrived.
    let failures = metric(port, "tabula_pipeline_stage_failures_total");
    assert!(
        (1..=2).contains(&failures),
        "{failures} failures\n{}",
        cluster.log()
    );
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert!(jobs["data"][0]["pipeline"]["rebuilds"].as_i64().unwrap() >= 1);
    for _ in 0..2 {
        let (status, again) = post(port, "/v1/completions", &key, body.clone());
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["choices"][0]["text"].as_str().unwrap(), want);
        let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
        assert_eq!(
            jobs["data"][0]["pipeline"]["rebuilds"],
            0,
            "the proven are placed first\n{}",
            cluster.log()
        );
    }
    assert_eq!(
        metric(port, "tabula_pipeline_stage_failures_total"),
        failures,
        "no griefer was placed again"
    );
    for (griefer, _) in &griefers {
        // Failing is not lying: no strike, and no credit either.
        assert_eq!(strikes(port, griefer), (0, false));
        assert_eq!(
            ledger(port, griefer)["verified_credit_micro"]
                .as_i64()
                .unwrap_or(0),
            0
        );
    }
    cluster.stop_workers();
}

/// Issue 17: what agreeing pipelines miss. Pipelines compared step by step cannot see a lie
/// every one of them tells (colluders at the same position of both), nor anything in a
/// pipeline that runs alone. With `"assurance": "referee"` the coordinator computes the whole
/// generation itself and delivers its own tokens; with `--audit-rate` it does that for a share
/// of sessions. Here a single pipeline (`--pipeline-replicas 1`) holds a stage that lies: the
/// coordinator's own run finds the lying stage, strikes it and answers right; streamed, the
/// requester is told that the text it got was wrong, with the verified text.
#[test]
fn the_coordinators_own_run_catches_a_lie_that_no_comparison_sees() {
    use tabula_worker::member::Tamper;
    let prompt = "Water boils at";
    let want = local_generation(prompt, 8, "0", "0");
    for (audit_rate, assurance, stream) in [("0", "referee", false), ("1", "standard", true)] {
        let mut cluster = Cluster::start(
            Flavor::Sqlite,
            &[
                "--pipeline",
                "2",
                "--pipeline-replicas",
                "1",
                "--canary-rate",
                "0",
                "--audit-rate",
                audit_rate,
            ],
        )
        .unwrap();
        let port = cluster.port;
        let key = cluster.api_key();
        let _honest = cluster.add_worker(0);
        // A lie that changes the tokens wherever the liar sits (a flipped activation byte at
        // the first stage may leave them as they are: then only the logits differ, the
        // streamed text was right, and there is nothing to tell the requester).
        let (liar, _stop) = lying_stage_worker(&cluster, 0, Tamper::Garble);
        wait_for_workers(&cluster, 2);
        let body = json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8,
                           "temperature": 0, "assurance": assurance, "stream": stream });
        if stream {
            let events = stream_events(port, &key, "/v1/completions", body);
            let error = events
                .iter()
                .find_map(|(_, e)| e.get("error").cloned())
                .unwrap_or_else(|| panic!("no error event: {events:?}\n{}", cluster.log()));
            assert_eq!(error["code"], "pipeline_audit_failed", "{error}");
            assert!(
                error["message"].as_str().unwrap().contains(&want),
                "{error}"
            );
        } else {
            let (status, answer) = post(port, "/v1/completions", &key, body);
            assert_eq!(status, 200, "{answer}\n{}", cluster.log());
            assert_eq!(answer["choices"][0]["text"].as_str().unwrap(), want);
        }
        assert_eq!(metric(port, "tabula_pipeline_audits_total"), 1);
        assert_eq!(metric(port, "tabula_pipeline_audit_catches_total"), 1);
        let (struck, banned) = strikes(port, &liar);
        assert!(
            struck > 0 && banned,
            "{assurance}: the lying stage is found and struck\n{}",
            cluster.log()
        );
        // The job's verified output is the coordinator's.
        let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
        assert_eq!(jobs["data"][0]["status"], "done", "{jobs}");
        cluster.stop_workers();
    }
}

/// Issue 17: a stage computes where the worker's units do. Workers started with `--backend
/// gpu` (lavapipe here) run their stages on wgpu, next to CPU stages in the same pipelines,
/// and the tokens are still the whole model's: exact bits are the same on every backend.
#[test]
fn stages_on_gpu_workers_compute_on_wgpu_next_to_cpu_stages() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "2", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let key = cluster.api_key();
    for n in 0..2 {
        cluster.add_worker_with(n, &["--backend", "gpu"]);
    }
    for n in 2..4 {
        cluster.add_worker(n);
    }
    wait_for_workers(&cluster, 4);
    // Four workers for two pipelines of two stages: every one of them is placed.
    completes_like_the_whole_model(&cluster, &key, "The three primary colours are", 8);
    for n in 0..2 {
        let log =
            std::fs::read_to_string(cluster.dir.path().join(format!("worker{n}.log"))).unwrap();
        assert!(
            log.contains("the stage computes on the GPU"),
            "worker {n}:\n{log}"
        );
    }
    cluster.stop_workers();
}

/// The number of `/v1/ledger/{key}`'s strikes and whether it is banned.
fn strikes(port: u16, key: &str) -> (i64, bool) {
    let entry = ledger(port, key);
    let w = &entry["workers"][0];
    (
        w["strikes"].as_i64().unwrap_or(0),
        w["banned"].as_bool().unwrap_or(false),
    )
}

/// Issue 17: stages that lie. Each round starts a cluster whose six first stage workers
/// include the liars (so they are placed), asks for a completion, and adds honest spares for
/// the rebuilds. The answer is still the whole model's; a liar proven by re-execution or by
/// its own signatures is struck (banned: it had nothing verified) and gets no credit; a
/// stage whose sent bytes do not match its signature costs the session a rebuild and nobody
/// a strike (which of the two lied cannot be proven); garbage signalling costs only the
/// direct path.
#[test]
fn lying_stages_are_found_struck_and_the_answer_is_still_right() {
    use tabula_worker::member::Tamper;
    let prompt = "Water boils at";
    let want = local_generation(prompt, 12, "0", "0");
    let rounds: [(&[Tamper], bool); 6] = [
        (&[Tamper::FlipOutput, Tamper::FlipOutput], true),
        (&[Tamper::WrongInputHash], true),
        (&[Tamper::Replay], true),
        (&[Tamper::CorruptSend], false),
        // Garbage SDP and ICE: the neighbours' WebRTC stack refuses it with an error, the
        // link falls back to the relay, and the session goes on.
        (&[Tamper::GarbageSignals], false),
        // An activation over the receiver's limit: refused from its first chunk's header
        // (nothing that size is allocated), the receiver says why, the pipeline is rebuilt.
        (&[Tamper::Oversize], false),
    ];
    for (liars, struck) in rounds {
        let mut cluster = Cluster::start(
            Flavor::Sqlite,
            &["--pipeline", "3", "--canary-rate", "0", "--audit-rate", "0"],
        )
        .unwrap();
        let port = cluster.port;
        let key = cluster.api_key();
        let mut honest: Vec<String> = (0..6 - liars.len())
            .map(|n| cluster.add_worker(n))
            .collect();
        let evil: Vec<(String, _)> = liars
            .iter()
            .enumerate()
            .map(|(i, t)| lying_stage_worker(&cluster, i, *t))
            .collect();
        wait_for_workers(&cluster, 6);
        let ask = std::thread::spawn(move || {
            post(
                port,
                "/v1/completions",
                &key,
                json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12, "temperature": 0 }),
            )
        });
        // Spares for the rebuilds, once the six are placed.
        std::thread::sleep(Duration::from_millis(500));
        for n in 0..6 {
            honest.push(cluster.add_worker(10 + n));
        }
        let (status, body) = ask.join().unwrap();
        assert_eq!(status, 200, "{liars:?}: {body}\n{}", cluster.log());
        assert_eq!(
            body["choices"][0]["text"].as_str().unwrap(),
            want,
            "{liars:?}"
        );
        let mut earned = 0;
        for (liar, _) in &evil {
            let (strikes, banned) = strikes(port, liar);
            assert_eq!(
                (strikes > 0, banned),
                (struck, struck),
                "{liars:?}: liar {liar}\n{}",
                cluster.log()
            );
            earned += ledger(port, liar)["verified_credit_micro"]
                .as_i64()
                .unwrap_or(0);
        }
        match liars {
            _ if struck => {
                assert_eq!(earned, 0, "a liar earns nothing");
                assert!(metric(port, "tabula_pipeline_stage_liars_total") >= liars.len() as u64);
            }
            // Its computation is right and is credited; only the direct path is lost.
            [Tamper::GarbageSignals] => {
                assert_eq!(metric(port, "tabula_pipeline_stage_liars_total"), 0);
                assert!(metric(port, "tabula_pipeline_links_relayed_total") >= 1);
            }
            // A last stage sends nothing, so there it cannot corrupt anything and is
            // credited like anyone; anywhere else its pipeline is rebuilt without it.
            _ => {
                assert_eq!(metric(port, "tabula_pipeline_stage_liars_total"), 0);
                assert!(
                    earned > 0 || metric(port, "tabula_pipeline_rebuilds_total") >= 1,
                    "{}",
                    cluster.log()
                );
                if metric(port, "tabula_pipeline_rebuilds_total") >= 1 {
                    assert_eq!(earned, 0, "a sender of corrupt bytes earns nothing");
                    if liars == [Tamper::Oversize] {
                        // The receiver's reason, as the coordinator logged it.
                        assert!(
                            cluster.log().contains("exceeds this link's limit"),
                            "{}",
                            cluster.log()
                        );
                    }
                }
            }
        }
        if liars.contains(&Tamper::FlipOutput) {
            assert!(metric(port, "tabula_pipeline_stage_disputes_total") >= 1);
        }
        cluster.stop_workers();
        for w in &honest {
            assert_eq!(
                strikes(port, w),
                (0, false),
                "honest {w} struck:\n{}",
                cluster.log()
            );
        }
        drop(evil);
    }
}

/// Issue 17: a stage killed with `kill -9` mid-generation (streaming, so the kill lands
/// between tokens): the coordinator rebuilds its pipeline from the prompt and the tokens
/// agreed so far, the answer is the whole model's, and the worker that left is not struck.
/// Then the same with direct paths off: every activation is relayed, same tokens.
#[test]
fn a_stage_killed_mid_generation_is_replaced_and_relayed_links_give_the_same_tokens() {
    let prompt = "Once upon a time, in a small village,";
    let want = local_generation(prompt, 40, "0", "0");
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "3", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers: Vec<String> = (0..6).map(|n| cluster.add_worker(n)).collect();
    wait_for_workers(&cluster, 6);
    let body = json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 40,
                       "temperature": 0, "stream": true });
    let stream = {
        let key = key.clone();
        std::thread::spawn(move || stream_events(port, &key, "/v1/completions", body))
    };
    // Spares, then a kill once tokens flow.
    let spares: Vec<String> = (0..4).map(|n| cluster.add_worker(10 + n)).collect();
    let started = Instant::now();
    while metric(port, "tabula_pipeline_steps_agreed_total") < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A worker that serves the session (its log says it joined; a spare may have connected
    // before the placement and taken a place instead).
    let victim = (0..cluster.workers.len())
        .find(|n| {
            let name = if *n < 6 { *n } else { 10 + n - 6 };
            std::fs::read_to_string(cluster.dir.path().join(format!("worker{name}.log")))
                .is_ok_and(|log| log.contains("joining a pipeline"))
        })
        .expect("a worker that joined the session");
    cluster.workers[victim].kill().unwrap();
    cluster.workers[victim].wait().unwrap();
    let events = stream.join().unwrap();
    let text: String = events
        .iter()
        .filter_map(|(_, e)| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want, "{events:?}\n{}", cluster.log());
    assert!(
        metric(port, "tabula_pipeline_rebuilds_total") >= 1,
        "{}",
        cluster.log()
    );
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert!(
        jobs["data"][0]["pipeline"]["rebuilds"].as_i64().unwrap() >= 1,
        "{jobs}"
    );
    let victim_key = if victim < 6 {
        workers[victim].clone()
    } else {
        spares[victim - 6].clone()
    };
    assert_eq!(strikes(port, &victim_key), (0, false));
    cluster.stop_workers();
    drop(cluster);

    // Direct paths blocked: every link relayed through the coordinator.
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "3", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    for n in 0..6 {
        cluster.add_worker_with(n, &["--stage-links", "relay"]);
    }
    wait_for_workers(&cluster, 6);
    let (status, body) = post(
        port,
        "/v1/completions",
        &key,
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 40, "temperature": 0 }),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(metric(port, "tabula_pipeline_links_direct_total"), 0);
    assert_eq!(metric(port, "tabula_pipeline_links_relayed_total"), 4);
    assert!(metric(port, "tabula_pipeline_relayed_bytes_total") > 0);
    cluster.stop_workers();
}

/// Issue 17: workers that declare a memory budget too small for the whole model
/// (`--max-model-mb`) get it split into stages that fit, with the default `--pipeline auto`.
#[test]
fn a_model_larger_than_every_budget_is_split_automatically() {
    let mut cluster =
        Cluster::start(Flavor::Sqlite, &["--canary-rate", "0", "--audit-rate", "0"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    // SmolLM2's exact file is 170 MiB; two stages need about 100 MiB each, three about 78.
    for n in 0..6 {
        cluster.add_worker_with(n, &["--max-model-mb", "80"]);
    }
    wait_for_workers(&cluster, 6);
    let prompt = "The capital of France is";
    completes_like_the_whole_model(&cluster, &key, prompt, 8);
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert_eq!(jobs["data"][0]["pipeline"]["stages"], 3, "{jobs}");
    cluster.stop_workers();
}

/// Issue 17: an API key limited to a pool of workers (`tabula keys create --workers`) has its
/// jobs run only on them, pipeline sessions and units alike; workers outside the pool compute
/// nothing of it and earn nothing. A key that is not a worker key is refused with a message
/// that says what one looks like.
#[test]
fn a_key_limited_to_a_pool_runs_only_on_its_workers() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "3", "--canary-rate", "0", "--audit-rate", "0"],
    )
    .unwrap();
    let port = cluster.port;
    let pool: Vec<String> = (0..6).map(|n| cluster.add_worker(n)).collect();
    let outsiders: Vec<String> = (6..9).map(|n| cluster.add_worker(n)).collect();
    wait_for_workers(&cluster, 9);
    let key = cluster.api_key_with(&["--workers", &pool.join(",")]);
    let prompt = "A short poem about the sea:";
    completes_like_the_whole_model(&cluster, &key, prompt, 10);
    let texts = fixture_texts();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts[..8] }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(api_embeddings(&body), local_embeddings(&texts[..8]));
    cluster.stop_workers();
    let earned = |w: &String| {
        ledger(port, w)["verified_credit_micro"]
            .as_i64()
            .unwrap_or(0)
    };
    for w in &outsiders {
        assert_eq!(earned(w), 0, "an outsider computed for a pooled key");
    }
    assert!(pool.iter().map(earned).sum::<i64>() > 0);

    let out = Command::new(BIN)
        .args(["keys", "create", "--workers", "abc"])
        .args(cluster.base_args())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`abc` is not a worker key"), "{err}");
}

/// Issue 17: once its workers have a clean record (`--solo-after`), a pipeline runs alone and
/// one random stage of one random step is re-executed (its tokens are held until then). A
/// sleeper — a key that earned that record, then lies — is caught by the spot check, struck,
/// and the generation starts over with two pipelines: the answer is still the whole
/// model's, and no token of the liar's reached the requester.
#[test]
fn a_trusted_pipeline_runs_alone_and_its_spot_check_catches_a_sleeper() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--pipeline",
            "1",
            "--solo-after",
            "1",
            "--spot-check-rate",
            "0",
            "--canary-rate",
            "0",
            "--audit-rate",
            "0",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let sleeper = cluster.add_worker(0);
    cluster.add_worker(1);
    wait_for_workers(&cluster, 2);
    let prompt = "The moon is";
    let want = local_generation(prompt, 12, "0", "0");
    let complete = move |port: u16, key: &str| {
        post(
            port,
            "/v1/completions",
            key,
            json!({ "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12, "temperature": 0 }),
        )
    };
    let last_job = |key: &str| {
        let (_, jobs) = request(port, "GET", "/v1/jobs", Some(key), None, &[]);
        jobs["data"][0]["pipeline"].clone()
    };
    // Fresh keys: two pipelines. Then both keys are long-clean: one pipeline, spot-checked.
    for pipelines in [2, 1] {
        let (status, body) = complete(port, &key);
        assert_eq!(status, 200, "{body}\n{}", cluster.log());
        assert_eq!(body["choices"][0]["text"].as_str().unwrap(), want);
        assert_eq!(last_job(&key)["pipelines"], pipelines, "{}", cluster.log());
    }
    assert_eq!(metric(port, "tabula_pipeline_spot_checks_total"), 1);

    // The first key turns liar and is the only worker when the next request comes.
    cluster.stop_workers();
    let started = Instant::now();
    while metric(port, "tabula_workers_connected") > 0 {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (liar, _stop) = lying_stage_worker_in(
        &cluster,
        cluster.dir.path().join("worker0"),
        tabula_worker::member::Tamper::FlipOutput,
    );
    assert_eq!(liar, sleeper);
    wait_for_workers(&cluster, 1);
    let ask = {
        let key = key.clone();
        std::thread::spawn(move || complete(port, &key))
    };
    std::thread::sleep(Duration::from_millis(500));
    cluster.add_worker(10);
    cluster.add_worker(11);
    let (status, body) = ask.join().unwrap();
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(metric(port, "tabula_pipeline_spot_checks_total"), 2);
    let job = last_job(&key);
    assert_eq!(
        (job["pipelines"].clone(), job["liars"].clone()),
        (json!(2), json!(1)),
        "{job}"
    );
    assert!(strikes(port, &sleeper).0 >= 1, "the sleeper is struck");
    cluster.stop_workers();
}

/// Issue 17: a session that cannot be placed (too few stage workers) fails within
/// `--pipeline-wait-secs` with a 503 that says why and what is missing; its job is marked
/// failed (so it no longer counts against the key's quota), and the coordinator serves on.
#[test]
fn a_session_without_enough_workers_fails_with_a_clear_error() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "3", "--pipeline-wait-secs", "2"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    for n in 0..2 {
        cluster.add_worker(n);
    }
    wait_for_workers(&cluster, 2);
    let (status, body) = post(
        port,
        "/v1/completions",
        &key,
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4 }),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "pipeline_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("too few workers take pipeline stages") && message.contains("need 6"),
        "{message}"
    );
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert_eq!(jobs["data"][0]["status"], "failed", "{jobs}");
    assert_eq!(metric(port, "tabula_pipeline_sessions_failed_total"), 1);
    assert_eq!(get(port, "/healthz").0, 200);
}

/// Memory honesty, with pipelines off: a request for a model that every connected worker
/// declared too large for its budget, or in a precision none of them computes, is refused at
/// once with what to do, instead of waiting for its timeout; a model that fits still runs,
/// and no job is left behind by the refused ones.
#[test]
fn a_request_no_connected_worker_can_take_is_refused_with_what_to_do() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &["--pipeline", "off", "--request-timeout-secs", "120"],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    for n in 0..2 {
        cluster.add_worker_with(n, &["--max-model-mb", "50"]);
    }
    wait_for_workers(&cluster, 2);
    let started = Instant::now();
    let (status, body) = post(
        port,
        "/v1/completions",
        &key,
        json!({ "model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4 }),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_worker_fits", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("SmolLM2-135M-Instruct in exact precision")
            && message.contains("largest budget a worker declared is 50 MiB")
            && message.contains("--pipeline auto"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused at once, not at the timeout"
    );
    let texts = fixture_texts()[..2].to_vec();
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts, "precision": "fast" }),
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no connected worker computes fast precision"),
        "{body}"
    );
    // MiniLM's exact file (23 MiB) fits the budget.
    let (status, body) = post(
        port,
        "/v1/embeddings",
        &key,
        json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1, "{jobs}");
    cluster.stop_workers();
}

/// Models of the user's own, added with `tabula models add` (a random Qwen2 GGUF made now by
/// `tests/fixtures/make_llama_family.py`, and a random BERT directory with CLS pooling by
/// `make_bert_dirs.py`, with `gguf` and `numpy` from `$TABULA_PYLIB`): the BERT is added
/// before `serve` starts, the Qwen2 while it runs, and `serve` (no `--models`: every model
/// there) serves it from then on without a restart. `/v1/models` lists both, and a completion
/// and embeddings for them are computed by two workers in exact precision, and embeddings by
/// two more in fast precision, verified and credited; the embeddings are transformers'
/// (`bert-random.json`). An unknown `--models`
/// name is refused.
#[test]
fn a_model_added_by_the_user_is_served_verified_and_credited() {
    let work = tempfile::tempdir().unwrap();
    let (made, models) = (work.path().join("made"), work.path().join("models"));
    common::make_random_ggufs(&manifest_dir(), &made);
    let dir = models.display().to_string();
    common::make_random_bert_dirs(&manifest_dir(), &made);
    let add = |path: &str, name: &str| {
        let add = Command::new(BIN)
            .args(["models", "add", &made.join(path).display().to_string()])
            .args(["--name", name, "--dir", &dir])
            .output()
            .unwrap();
        assert!(
            add.status.success(),
            "{}",
            String::from_utf8_lossy(&add.stderr)
        );
    };
    add("bert-cls", "my-bert");

    let refused = Command::new(BIN)
        .args([
            "serve",
            "--local",
            "--models-dir",
            &dir,
            "--models",
            "nobody",
        ])
        .args([
            "--data-dir",
            &work.path().join("refused").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--models names `nobody`") && err.contains("my-bert"),
        "{err}"
    );

    let mut cluster = Cluster::start(Flavor::Sqlite, &["--models-dir", &dir]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers: Vec<String> = (0..4)
        .map(|n| match n {
            0 | 1 => cluster.add_worker(n),
            _ => cluster.add_worker_with(n, &["--precision", "fast"]),
        })
        .collect();
    wait_for_workers(&cluster, 4);
    let served = || {
        let (status, listed) = get(port, "/v1/models");
        assert_eq!(status, 200, "{listed}");
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(served(), ["my-bert"]);
    let completion =
        json!({ "model": "my-qwen", "prompt": "abc", "max_tokens": 4, "temperature": 0 });
    let (status, body) = post(port, "/v1/completions", &key, completion.clone());
    assert_eq!(status, 404, "not added yet: {body}");
    add("qwen2-gqa4.gguf", "my-qwen");
    let started = Instant::now();
    while served().len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the model added while serving is not served: {}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(served(), ["my-bert", "my-qwen"]);
    let (status, body) = post(port, "/v1/completions", &key, completion);
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_dir().join("../../tests/fixtures/bert-random.json"))
            .unwrap(),
    )
    .unwrap();
    let reference = &reference["bert-cls"];
    // Exact precision on the first two workers, fast on the other two.
    for (precision, min_cosine) in [("exact", 0.998), ("fast", 0.99999)] {
        let (status, body) = post(
            port,
            "/v1/embeddings",
            &key,
            json!({ "model": "my-bert", "input": reference["texts"], "precision": precision }),
        );
        assert_eq!(status, 200, "{body}\n{}", cluster.log());
        let got = api_embeddings(&body);
        let want = reference["embeddings"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let w: Vec<f64> = w
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            // Both are unit vectors (the model normalises): the dot product is the cosine.
            let c: f64 = g.iter().zip(&w).map(|(a, b)| f64::from(*a) * b).sum();
            assert!(
                c >= min_cosine,
                "{precision}, text {i}: cosine {c} with transformers' CLS vector"
            );
        }
    }
    cluster.stop_workers();
    assert_credited_without_strikes(port, &workers);
}

/// Gemma 3 270M (the second generation family) through the cluster: an OpenAI completion is
/// computed in exact precision by two workers whose results agree, and both are credited.
#[test]
fn gemma_is_served_verified_and_credited() {
    let mut cluster = Cluster::start(Flavor::Sqlite, &["--models", "gemma-3-270m"]).unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers: Vec<String> = (0..2).map(|n| cluster.add_worker(n)).collect();
    gemma_completes_like_the_reference(&cluster, &key);
    cluster.stop_workers();
    assert_credited_without_strikes(port, &workers);
}

/// Gemma 3 as pipeline stages: its exact file (376 MiB) fits no worker's 300 MiB budget,
/// so `--pipeline auto` cuts it in two stages (the first holds the embedding table and the
/// rotary tables of both kinds of layer, sliding and global; the last the head), run by two
/// disjoint pipelines linked over WebRTC; the tokens are the whole model's, every stage
/// worker is credited and none is struck.
#[test]
fn gemma_larger_than_every_budget_runs_as_stages() {
    let mut cluster = Cluster::start(
        Flavor::Sqlite,
        &[
            "--models",
            "gemma-3-270m",
            "--canary-rate",
            "0",
            "--audit-rate",
            "0",
        ],
    )
    .unwrap();
    let port = cluster.port;
    let key = cluster.api_key();
    let workers: Vec<String> = (0..4)
        .map(|n| cluster.add_worker_with(n, &["--max-model-mb", "300"]))
        .collect();
    wait_for_workers(&cluster, 4);
    gemma_completes_like_the_reference(&cluster, &key);
    let (_, jobs) = request(port, "GET", "/v1/jobs", Some(&key), None, &[]);
    assert_eq!(jobs["data"][0]["pipeline"]["stages"], 2, "{jobs}");
    assert_eq!(jobs["data"][0]["pipeline"]["liars"], 0, "{jobs}");
    cluster.stop_workers();
    assert_credited_without_strikes(port, &workers);
}

/// A greedy completion of Gemma 3 270M through `cluster`: the f32 reference continues " the
/// capital of the" (tests/fixtures/gemma3.jsonl), and exact precision agrees on these tokens.
fn gemma_completes_like_the_reference(cluster: &Cluster, key: &str) {
    let (status, body) = post(
        cluster.port,
        "/v1/completions",
        key,
        json!({
            "model": "gemma-3-270m",
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0
        }),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.log());
    assert_eq!(body["choices"][0]["text"], " the capital of the", "{body}");
}

/// Each of `workers` earned verified credit and no strike.
fn assert_credited_without_strikes(port: u16, workers: &[String]) {
    for w in workers {
        let entry = ledger(port, w);
        assert_eq!(entry["workers"][0]["strikes"], 0, "{entry}");
        assert!(
            entry["workers"][0]["verified_credit_micro"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{entry}"
        );
    }
}

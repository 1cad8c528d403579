//! The native volunteer loop: connect, log in with the worker's key, take units, compute them
//! on a blocking thread while heartbeats keep the session alive, submit signed results, and
//! reconnect with exponential backoff. On shutdown an unfinished lease is released, so the
//! unit goes straight to another worker instead of waiting for the lease to expire.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tabula_engine::{Backend, exact::ExactBackend};
use tabula_protocol::{
    Address, FileRef, Hash, Identity, LeaseId, MAX_COORDINATOR_FRAME, Precision, SessionId,
    ToCoordinator, ToWorker, decode, encode,
};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

use crate::{
    Executor, FileSource, WorkerError,
    core::{CoreOptions, Meaning, WorkerCore, session_ended},
    exec::ExecutorThread,
};

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's base URL, `http://host:port`.
    pub coordinator: String,
    /// Holds the key (`worker.key`) and the weight cache (`weights/`).
    pub state_dir: PathBuf,
    pub precisions: Vec<Precision>,
    pub payout: Option<Address>,
    /// Shown by the coordinator, e.g. `tabula-cli/0.1.0 cpu`.
    pub agent: String,
    /// Stop after this many submitted units (tests, benchmarks); `None` runs until shutdown.
    pub max_units: Option<u64>,
    /// Units held at once (1 to [`MAX_UNITS_IN_FLIGHT`]): one computing, the others leased
    /// and waiting their turn, so that the next unit is already here when one finishes
    /// instead of a round trip to the coordinator later.
    pub units_in_flight: usize,
    /// Compute threads: units computed side by side, each on its own thread with its own
    /// copy of the models (1 to [`crate::exec::MAX_THREADS`]). At least `units_in_flight`
    /// units are held, so that each thread has one.
    pub threads: usize,
    /// Take pipeline stages ([`crate::member`]).
    pub stages: bool,
    /// The most model weights this worker holds, in MiB (0: no limit declared); the
    /// coordinator gives it only stages (or models) that fit.
    pub max_model_mb: u32,
    /// How a stage links to its neighbours.
    pub member: crate::member::MemberOptions,
}

/// The most units a worker holds at once ([`WorkerOptions::units_in_flight`]).
pub const MAX_UNITS_IN_FLIGHT: usize = crate::core::MAX_UNITS_HELD;

/// What the loop reports, for a progress display.
#[derive(Clone, Debug)]
pub enum WorkerEvent {
    Connected { credit_micro: u64 },
    Disconnected { error: String, retry_in: Duration },
    Computing { model: String },
    Submitted { millis: u64 },
    Accepted,
    Rejected { reason: String },
    Credited { credit_micro: u64 },
    PayoutLinked { address: Address },
}

/// Loads the worker's key from `state_dir/worker.key`, creating it on first use.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Identity, WorkerError> {
    crate::keyfile::load_or_create(&state_dir.join("worker.key"), || {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS random source");
        seed
    })
}

/// The weight cache: `state_dir/weights/<sha256>`, filled from the coordinator's
/// `/v1/weights/<sha256>` and checked before it is kept.
pub struct WeightCache {
    dir: PathBuf,
    base_url: String,
    /// Held while a file is looked up and, when missing, downloaded: compute threads asking
    /// for the same weights at once download them once, and the others read the kept file.
    filling: std::sync::Mutex<()>,
}

/// The largest weights file a worker downloads.
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

impl WeightCache {
    pub fn new(state_dir: &Path, base_url: &str) -> Self {
        Self {
            dir: state_dir.join("weights"),
            base_url: base_url.trim_end_matches('/').to_string(),
            filling: std::sync::Mutex::new(()),
        }
    }

    fn path(&self, f: &FileRef) -> PathBuf {
        self.dir.join(f.sha256.to_hex())
    }

    /// The path of `f` in the cache, downloaded first when it is missing or corrupt. The
    /// download streams to disk through the hash, so it never holds the file in memory.
    fn fill(&self, f: &FileRef) -> Result<PathBuf, WorkerError> {
        // A poisoned lock only means another thread's download failed: the file is checked
        // here anyway.
        let _filling = self
            .filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path(f);
        match std::fs::File::open(&path) {
            Ok(file) => {
                if tabula_models::catalog::sha256_hex_reader(file)? == f.sha256.to_hex() {
                    return Ok(path);
                }
                tracing::warn!(file = %f.sha256, "cached weights are corrupt; downloading again");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if f.size > MAX_WEIGHTS_BYTES {
            return Err(WorkerError::File(format!("{} bytes is too large", f.size)));
        }
        let url = format!("{}/v1/weights/{}", self.base_url, f.sha256);
        tracing::info!(%url, size = f.size, "downloading weights");
        let mut response = ureq::get(&url)
            .call()
            .map_err(|e| WorkerError::File(format!("GET {url}: {e}")))?;
        std::fs::create_dir_all(&self.dir)?;
        // A name of this process's own: another worker sharing the state directory may be
        // writing the same file.
        let tmp = path.with_extension(format!("{}.partial", std::process::id()));
        let written = (|| -> Result<Hash, WorkerError> {
            let mut out = HashingWriter {
                file: std::io::BufWriter::new(std::fs::File::create(&tmp)?),
                hasher: sha2::Sha256::default(),
                written: 0,
            };
            let mut body = response.body_mut().with_config().limit(f.size + 1).reader();
            std::io::copy(&mut body, &mut out)
                .map_err(|e| WorkerError::File(format!("GET {url}: {e}")))?;
            use std::io::Write;
            out.file.flush()?;
            if out.written != f.size {
                return Err(WorkerError::File(format!(
                    "{url} sent {} bytes, expected {}; not kept",
                    out.written, f.size
                )));
            }
            use sha2::Digest;
            Ok(tabula_protocol::Bytes(out.hasher.finalize().into()))
        })();
        let actual = match written {
            Ok(actual) => actual,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if actual != f.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(WorkerError::File(format!(
                "{url} sent a file hashing to {actual}; not kept"
            )));
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// Writes to a file and hashes what it wrote.
struct HashingWriter {
    file: std::io::BufWriter<std::fs::File>,
    hasher: sha2::Sha256,
    written: u64,
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl FileSource for WeightCache {
    fn read(&self, f: &FileRef) -> Result<Vec<u8>, WorkerError> {
        Ok(std::fs::read(self.fill(f)?)?)
    }

    fn local_path(&self, f: &FileRef) -> Result<Option<PathBuf>, WorkerError> {
        self.fill(f).map(Some)
    }
}

/// The socket URL for a coordinator base URL.
pub fn socket_url(coordinator: &str) -> Result<String, WorkerError> {
    let base = coordinator.trim_end_matches('/');
    let rest = if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_string()
    } else {
        return Err(WorkerError::Connection(format!(
            "`{coordinator}` is not a coordinator URL; use http://HOST:PORT"
        )));
    };
    Ok(format!("{rest}/v1/worker"))
}

/// The HTTP base URL for a coordinator URL given as http(s) or ws(s).
fn http_url(coordinator: &str) -> String {
    let base = coordinator.trim_end_matches('/');
    if let Some(r) = base.strip_prefix("ws://") {
        format!("http://{r}")
    } else if let Some(r) = base.strip_prefix("wss://") {
        format!("https://{r}")
    } else {
        base.to_string()
    }
}

enum End {
    Shutdown,
    Finished,
}

pub use crate::core::Stats;

/// Runs the volunteer loop until `shutdown` turns true (or `max_units` are submitted).
/// `make_executor` runs once on each compute thread.
pub async fn run<B, F>(
    make_executor: F,
    identity: Identity,
    options: WorkerOptions,
    events: mpsc::UnboundedSender<WorkerEvent>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Stats, WorkerError>
where
    B: Backend + ExactBackend,
    F: Fn() -> Result<Executor<B>, WorkerError> + Send + Sync + 'static,
{
    let url = socket_url(&options.coordinator)?;
    let cache = Arc::new(WeightCache::new(
        &options.state_dir,
        &http_url(&options.coordinator),
    ));
    let executor = ExecutorThread::spawn_pool(make_executor, cache.clone(), options.threads);
    let files: Arc<dyn FileSource + Send + Sync> = cache.clone();
    let identity = Arc::new(identity);
    let mut core = WorkerCore::new(
        identity.public(),
        CoreOptions {
            agent: options.agent.clone(),
            precisions: options.precisions.clone(),
            stages: options.stages,
            max_model_mb: options.max_model_mb,
            units_held: options.units_in_flight,
            parallel: options.threads,
            memberships: crate::core::MAX_MEMBERSHIPS,
        },
    );
    let mut backoff = Duration::from_millis(500);
    let mut running = Running::default();
    loop {
        if *shutdown.borrow() {
            return Ok(core.stats);
        }
        let session = Session {
            url: &url,
            options: &options,
            identity: identity.clone(),
            executor: &executor,
            files: files.clone(),
            events: &events,
        };
        let ended = session
            .run(&mut core, &mut running, &mut shutdown, &mut backoff)
            .await;
        // The coordinator rebuilds the pipelines this worker served without it.
        core.disconnected();
        match ended {
            Ok(End::Shutdown | End::Finished) => return Ok(core.stats),
            Err(e @ WorkerError::Refused(_)) => return Err(e),
            Err(e) => {
                let _ = events.send(WorkerEvent::Disconnected {
                    error: e.to_string(),
                    retry_in: backoff,
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(core.stats),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

struct Session<'a> {
    url: &'a str,
    options: &'a WorkerOptions,
    identity: Arc<Identity>,
    executor: &'a ExecutorThread,
    files: Arc<dyn FileSource + Send + Sync>,
    events: &'a mpsc::UnboundedSender<WorkerEvent>,
}

type Computation = tokio::sync::oneshot::Receiver<Result<Vec<u8>, WorkerError>>;

/// The computations of the units the core says are computing: each one's lease, when it
/// started and the executor's answer to come. They outlive a session: when the connection
/// drops mid-unit, the computations go on and their results are submitted after
/// reconnecting, and the units waiting in the core are computed after them (a lease is bound
/// to the worker's key, not to the connection).
#[derive(Default)]
struct Running(Vec<(LeaseId, std::time::Instant, Computation)>);

impl Running {
    /// Starts the core's next units while it has compute threads free.
    fn start_next(
        &mut self,
        core: &mut WorkerCore,
        executor: &ExecutorThread,
        events: &mpsc::UnboundedSender<WorkerEvent>,
    ) -> Result<(), WorkerError> {
        while let Some(a) = core.next_unit() {
            let _ = events.send(WorkerEvent::Computing {
                model: a.task.model().name.clone(),
            });
            let (reply, handle) = tokio::sync::oneshot::channel();
            executor.submit(
                a.task.clone(),
                Box::new(move |r| {
                    let _ = reply.send(r.map(|o| o.encode()));
                }),
            )?;
            self.0.push((a.lease, std::time::Instant::now(), handle));
        }
        Ok(())
    }

    /// The next computation to finish: its lease, start and answer. Pending while none runs.
    async fn next_done(
        &mut self,
    ) -> (
        LeaseId,
        std::time::Instant,
        Result<Result<Vec<u8>, WorkerError>, tokio::sync::oneshot::error::RecvError>,
    ) {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let (done, at, _) =
            futures_util::future::select_all(self.0.iter_mut().map(|(_, _, h)| h)).await;
        let (lease, started, _) = self.0.remove(at);
        (lease, started, done)
    }
}

impl Session<'_> {
    async fn run(
        self,
        core: &mut WorkerCore,
        running: &mut Running,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> Result<End, WorkerError> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_COORDINATOR_FRAME))
            .max_frame_size(Some(MAX_COORDINATOR_FRAME))
            .read_buffer_size(tabula_protocol::SOCKET_READ_BUFFER);
        let (socket, _) =
            tokio_tungstenite::connect_async_with_config(self.url, Some(config), true)
                .await
                .map_err(|e| WorkerError::Connection(format!("{}: {e}", self.url)))?;
        let (mut tx, mut rx) = socket.split();
        let conn =
            |e: tokio_tungstenite::tungstenite::Error| WorkerError::Connection(e.to_string());
        macro_rules! send {
            ($msg:expr) => {
                tx.send(Message::Binary(encode(&$msg).into()))
                    .await
                    .map_err(conn)?
            };
        }
        let first = next_message(&mut rx).await?;
        if !matches!(first, ToWorker::Challenge { .. }) {
            return Err(WorkerError::Connection("expected a login challenge".into()));
        }
        let Meaning::Login(login) = core.on_frame(&self.identity, first) else {
            unreachable!("a challenge means a login");
        };
        send!(login);
        let heartbeat_ms = match core.on_frame(&self.identity, next_message(&mut rx).await?) {
            Meaning::Welcome {
                heartbeat_ms,
                credit_micro,
            } => {
                let _ = self.events.send(WorkerEvent::Connected { credit_micro });
                heartbeat_ms
            }
            Meaning::Ended { message, retry } => return Err(session_ended(message, retry)),
            other => {
                return Err(WorkerError::Connection(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
        };
        *backoff = Duration::from_millis(500);
        if let Some(address) = self.options.payout {
            send!(ToCoordinator::LinkPayout {
                address,
                signature: self.identity.sign_payout(&address),
            });
        }
        // `Ready`s sent in this session and not yet answered (each gets an `Assign` or a
        // `NoWork`, in order).
        let mut asked = 0usize;
        let max_units = self.options.max_units;
        let done_submitting =
            |core: &WorkerCore| max_units.is_some_and(|m| core.stats.submitted >= m);
        let decided = |core: &WorkerCore| {
            max_units.is_some_and(|m| core.stats.accepted + core.stats.rejected >= m)
        };
        // Asks for as many units as fit beside those held and those asked for.
        macro_rules! ask {
            () => {
                if !done_submitting(core) {
                    while core.wants_units() > asked {
                        send!(ToCoordinator::Ready);
                        asked += 1;
                    }
                }
            };
        }
        ask!();
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms.max(100))));
        let mut ask_again: Option<tokio::time::Instant> = None;
        // Pipeline stages this worker serves, by session; dropped (and stopped) with the
        // connection, since the coordinator rebuilds a pipeline whose member went away.
        let mut members: std::collections::HashMap<SessionId, crate::member::Member> =
            Default::default();
        let (member_out, mut from_members) = mpsc::unbounded_channel::<ToCoordinator>();
        loop {
            tokio::select! {
                Some(frame) = from_members.recv() => {
                    if let ToCoordinator::StageFailed { session, .. } = &frame {
                        members.remove(session);
                        core.member_stopped(session);
                    }
                    send!(frame);
                }
                _ = shutdown.changed() => {
                    running.0.clear();
                    for release in core.release_all() {
                        send!(release);
                    }
                    let _ = tx.send(Message::Close(None)).await;
                    return Ok(End::Shutdown);
                }
                _ = heartbeat.tick() => send!(ToCoordinator::Heartbeat),
                _ = async { tokio::time::sleep_until(ask_again.expect("guarded")).await }, if ask_again.is_some() => {
                    ask_again = None;
                    ask!();
                }
                (lease, started, done) = running.next_done() => {
                    match done {
                        Ok(Ok(output)) => {
                            if let Some(submit) = core.submit(&self.identity, lease, output) {
                                send!(submit);
                            }
                            let _ = self.events.send(WorkerEvent::Submitted {
                                millis: started.elapsed().as_millis() as u64,
                            });
                            if done_submitting(core) {
                                // Units fetched ahead go back; then wait for the verdict on
                                // the last unit before leaving.
                                for release in core.release_all() {
                                    send!(release);
                                }
                                continue;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("unit failed: {e}");
                            if let Some(release) = core.release(lease) {
                                send!(release);
                            }
                        }
                        Err(_) => {
                            return Err(WorkerError::Model("the executor thread stopped".into()));
                        }
                    }
                    running.start_next(core, self.executor, self.events)?;
                    // While an earlier `NoWork` waits out its delay, the coordinator has
                    // nothing to give: ask when the delay is over.
                    if ask_again.is_none() {
                        ask!();
                    }
                }
                message = next_message(&mut rx) => {
                    let message = message?;
                    let assignment = matches!(message, ToWorker::Assign(_));
                    if assignment {
                        asked = asked.saturating_sub(1);
                        if done_submitting(core) {
                            // Not wanted any more: give it back at once.
                            if let ToWorker::Assign(a) = message {
                                send!(ToCoordinator::Release { lease: a.lease });
                            }
                            continue;
                        }
                    }
                    match core.on_frame(&self.identity, message) {
                        Meaning::Unit => running.start_next(core, self.executor, self.events)?,
                        Meaning::GiveBack(release) | Meaning::DeclineStage(release) => send!(release),
                        Meaning::TooLarge { release, why } => {
                            tracing::warn!("{why}");
                            send!(release)
                        }
                        Meaning::NoWork { retry_ms } => {
                            asked = asked.saturating_sub(1);
                            ask_again.get_or_insert(tokio::time::Instant::now() + Duration::from_millis(u64::from(retry_ms)));
                        }
                        Meaning::Verdict { accepted, reason } => {
                            let _ = self.events.send(match reason {
                                Some(reason) if !accepted => {
                                    tracing::warn!("result rejected: {reason}");
                                    WorkerEvent::Rejected { reason }
                                }
                                _ => WorkerEvent::Accepted,
                            });
                            if decided(core) {
                                let _ = tx.send(Message::Close(None)).await;
                                return Ok(End::Finished);
                            }
                        }
                        Meaning::Credited { .. } => {
                            let _ = self.events.send(WorkerEvent::Credited { credit_micro: core.stats.credit_micro });
                        }
                        Meaning::BadReceipt => tracing::warn!("ignoring a receipt that does not verify"),
                        Meaning::PayoutLinked(address) => {
                            let _ = self.events.send(WorkerEvent::PayoutLinked { address });
                        }
                        Meaning::Ended { message, retry } => return Err(session_ended(message, retry)),
                        Meaning::JoinStage(order) => {
                            tracing::info!(session = %order.session, stage = order.stage, stages = order.stages, "joining a pipeline");
                            members.insert(order.session, crate::member::spawn(
                                order,
                                self.identity.clone(),
                                self.files.clone(),
                                member_out.clone(),
                                self.options.member.clone(),
                            ));
                        }
                        Meaning::ToMember(session, input) => {
                            if let Some(m) = members.get(&session) {
                                let _ = m.inbox.send(input);
                            }
                        }
                        Meaning::EndStage(session) => {
                            members.remove(&session);
                        }
                        other @ (Meaning::Login(_) | Meaning::Welcome { .. } | Meaning::Ignored) => {
                            tracing::debug!("ignoring {other:?}");
                        }
                    }
                }
            }
        }
    }
}

async fn next_message<S>(rx: &mut S) -> Result<ToWorker, WorkerError>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(frame))) => {
                return Ok(decode(&frame, MAX_COORDINATOR_FRAME)?);
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(WorkerError::Connection(format!(
                    "the coordinator closed the connection{}",
                    frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(WorkerError::Connection(e.to_string())),
            None => return Err(WorkerError::Connection("connection closed".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Compute threads that need the same weights at once (each loads its own model) download
    /// them once; none fails because another is writing the same file.
    #[test]
    fn threads_asking_for_the_same_weights_at_once_download_them_once() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let file = FileRef {
            role: "exact".into(),
            sha256: tabula_protocol::sha256(&body),
            size: body.len() as u64,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        {
            let (body, served) = (body.clone(), served.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { return };
                    let (body, served) = (body.clone(), served.clone());
                    std::thread::spawn(move || {
                        let mut head = [0u8; 1024];
                        let _ = stream.read(&mut head);
                        served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        // Slowly, so that the downloads would overlap.
                        for chunk in body.chunks(20_000) {
                            std::thread::sleep(Duration::from_millis(20));
                            let _ = stream.write_all(chunk);
                        }
                    });
                }
            });
        }
        let state = tempfile::tempdir().unwrap();
        let cache = Arc::new(WeightCache::new(
            state.path(),
            &format!("http://127.0.0.1:{port}"),
        ));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (cache, file) = (cache.clone(), file.clone());
                std::thread::spawn(move || cache.read(&file))
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.join().unwrap().unwrap(), body);
        }
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
        let kept: Vec<_> = std::fs::read_dir(state.path().join("weights"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept, vec![file.sha256.to_hex()], "no partial file is left");
    }
}

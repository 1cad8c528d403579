//! Runs one [`Task`] to its [`UnitOutput`]: the part of a worker that computes. The
//! coordinator runs the same code to referee, so an honest worker and the referee cannot
//! disagree about the encoding.

use std::collections::HashMap;

use tabula_engine::{Backend, exact::ExactBackend};
use tabula_models::{
    bert::{BertConfig, BertModel},
    catalog::sha256_hex,
    exact::{ExactArch, ExactBert, ExactFile, ExactLlama},
    llama::{Finish, Generator},
    sampling::{ExactSampler, Sampler},
};
use tabula_protocol::{FileRef, Hash, ModelRef, Precision, Task, UnitOutput};

use crate::WorkerError;

/// Where the bytes of a content-addressed file come from (a cache dir, a download, the
/// coordinator's model dir). The executor checks every file's hash itself.
pub trait FileSource {
    fn read(&self, file: &FileRef) -> Result<Vec<u8>, WorkerError>;

    /// Where `file` lies on disk, fetched first if need be, for a loader that reads it a
    /// piece at a time (and checks its hash); `None` where files are only in memory.
    fn local_path(&self, _file: &FileRef) -> Result<Option<std::path::PathBuf>, WorkerError> {
        Ok(None)
    }
}

enum Loaded<B: Backend + ExactBackend> {
    ExactBert(ExactBert<B>),
    ExactLlama(ExactLlama<B>),
    FastBert(BertModel<B>),
    FastLlama(Box<Generator<B>>),
}

/// Computes tasks on one backend, keeping each model it has loaded.
pub struct Executor<B: Backend + ExactBackend> {
    backend: B,
    models: HashMap<Vec<Hash>, Loaded<B>>,
    /// Sequences per forward pass for embeddings (never changes exact bits).
    pub batch_size: usize,
}

impl<B: Backend + ExactBackend> Executor<B> {
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            models: HashMap::new(),
            batch_size: 32,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The files `task` needs that are not loaded yet: none once its model is resident. A
    /// worker that fetches weights itself (the browser) asks this before [`Self::run_async`].
    pub fn needed_files(&self, task: &Task) -> Vec<FileRef> {
        if self.models.contains_key(&model_key(task.model())) {
            return Vec::new();
        }
        let model = task.model();
        let by_role = |role: &str| model.files.iter().find(|f| f.role == role);
        let roles: &[&str] = match task.precision() {
            Precision::Exact => &["exact"],
            Precision::Fast if by_role("gguf").is_some() => &["gguf"],
            Precision::Fast => &["config", "safetensors"],
        };
        roles.iter().filter_map(|r| by_role(r).cloned()).collect()
    }

    /// Validates `task` and computes it, blocking until the backend is done (native threads).
    pub fn run(&mut self, task: &Task, files: &dyn FileSource) -> Result<UnitOutput, WorkerError> {
        pollster::block_on(self.run_async(task, files))
    }

    /// Validates `task` and computes it. The browser awaits this: WebGPU results only arrive
    /// through the page's event loop, which a blocking wait would never let run.
    pub async fn run_async(
        &mut self,
        task: &Task,
        files: &dyn FileSource,
    ) -> Result<UnitOutput, WorkerError> {
        task.validate()?;
        let key = model_key(task.model());
        if !self.models.contains_key(&key) {
            let loaded = load(&self.backend, task, files)?;
            self.models.insert(key.clone(), loaded);
        }
        let model = &self.models[&key];
        let backend = &self.backend;
        match (task, model) {
            (Task::Embed { sequences, .. }, Loaded::ExactBert(m)) => {
                check_vocab(sequences.iter().flatten(), m.config.vocab_size)?;
                let out = m.embed_ids(backend, sequences, self.batch_size).await?;
                Ok(UnitOutput::ExactEmbeddings {
                    dim: m.config.hidden_size as u32,
                    q15: out.into_iter().flat_map(|e| e.q15).collect(),
                })
            }
            (Task::Embed { sequences, .. }, Loaded::FastBert(m)) => {
                check_vocab(sequences.iter().flatten(), m.config.vocab_size)?;
                let out = m.embed_ids(backend, sequences, self.batch_size).await?;
                Ok(UnitOutput::FastEmbeddings {
                    dim: m.config.hidden_size as u32,
                    values: out.into_iter().flatten().collect(),
                })
            }
            (
                Task::Generate {
                    prompt,
                    max_tokens,
                    temperature_milli,
                    top_p_q16,
                    seed,
                    stop,
                    ..
                },
                Loaded::ExactLlama(m),
            ) => {
                check_vocab(prompt, m.config.vocab_size)?;
                let mut sampler = ExactSampler::from_parts(*temperature_milli, *top_p_q16, *seed);
                let (steps, finish) = m
                    .generate(
                        backend,
                        prompt,
                        *max_tokens as usize,
                        &mut sampler,
                        stop,
                        |_| {},
                    )
                    .await?;
                let logits_sha256 = steps
                    .iter()
                    .map(|s| Hash::from_hex(&s.logits_sha256))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| WorkerError::Model(e.to_string()))?;
                Ok(UnitOutput::Generation {
                    tokens: steps.iter().map(|s| s.token).collect(),
                    stopped: finish == Finish::Stop,
                    logits_sha256,
                })
            }
            (
                Task::Generate {
                    prompt,
                    max_tokens,
                    temperature_milli,
                    top_p_q16,
                    seed,
                    ..
                },
                Loaded::FastLlama(g),
            ) => {
                check_vocab(prompt, g.model.config.vocab_size)?;
                let mut sampler = Sampler::new(
                    *temperature_milli as f32 / 1000.0,
                    *top_p_q16 as f32 / 65536.0,
                    *seed,
                );
                // Fast generation stops on the model's own stop tokens; the coordinator puts the
                // same list in the task, which the output's shape check holds it to.
                let (tokens, finish) = g
                    .generate(backend, prompt, *max_tokens as usize, &mut sampler, |_| {})
                    .await?;
                Ok(UnitOutput::Generation {
                    tokens,
                    stopped: finish == Finish::Stop,
                    logits_sha256: Vec::new(),
                })
            }
            _ => Err(WorkerError::Unsupported(format!(
                "model {} cannot run this task",
                task.model().name
            ))),
        }
    }
}

/// Loaded models are keyed by the hashes of all their files.
fn model_key(model: &ModelRef) -> Vec<Hash> {
    model.files.iter().map(|f| f.sha256).collect()
}

fn check_vocab<'a>(
    ids: impl IntoIterator<Item = &'a u32>,
    vocab: usize,
) -> Result<(), WorkerError> {
    match ids.into_iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(WorkerError::Task(format!(
            "token id {bad} outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Reads a file and checks it hashes to its reference.
fn read_checked(files: &dyn FileSource, f: &FileRef) -> Result<Vec<u8>, WorkerError> {
    let bytes = files.read(f)?;
    let actual = sha256_hex(&bytes);
    if actual != f.sha256.to_hex() {
        return Err(WorkerError::File(format!(
            "{} file {} hashes to {actual}",
            f.role, f.sha256
        )));
    }
    Ok(bytes)
}

fn load<B: Backend + ExactBackend>(
    backend: &B,
    task: &Task,
    files: &dyn FileSource,
) -> Result<Loaded<B>, WorkerError> {
    let model = task.model();
    let role = |r: &str| {
        model
            .files
            .iter()
            .find(|f| f.role == r)
            .ok_or_else(|| WorkerError::Task(format!("model {} has no `{r}` file", model.name)))
    };
    tracing::info!(model = %model.name, precision = task.precision().as_str(), "loading model");
    match task.precision() {
        Precision::Exact => {
            let f = role("exact")?;
            let load = |file: &ExactFile<'_>| -> Result<Loaded<B>, WorkerError> {
                Ok(match &file.header.config {
                    ExactArch::Bert(_) => Loaded::ExactBert(ExactBert::load(backend, file)?),
                    ExactArch::Llama(_) => Loaded::ExactLlama(ExactLlama::load(backend, file)?),
                })
            };
            // From disk a tensor at a time where the file is there: the whole file's bytes
            // and the model are never in memory together.
            #[cfg(not(target_arch = "wasm32"))]
            if let Some(path) = files.local_path(f)? {
                return load(&ExactFile::open_path(&path, &f.sha256.to_hex())?);
            }
            let bytes = read_checked(files, f)?;
            load(&ExactFile::open(&bytes, &f.sha256.to_hex())?)
        }
        Precision::Fast => {
            if let Ok(f) = role("gguf") {
                let bytes = read_checked(files, f)?;
                return Ok(Loaded::FastLlama(Box::new(Generator::load(
                    backend, &bytes,
                )?)));
            }
            let config = BertConfig::from_json(&read_checked(files, role("config")?)?)?;
            let weights = read_checked(files, role("safetensors")?)?;
            Ok(Loaded::FastBert(BertModel::load(
                backend, &weights, config,
            )?))
        }
    }
}

/// A reply to a task sent to an [`ExecutorThread`].
pub type Reply = Box<dyn FnOnce(Result<UnitOutput, WorkerError>) + Send>;

/// Threads that each own a backend and its loaded models (GPU handles and models stay on
/// one thread; only tasks and outputs cross), taking the tasks sent to them in order: with
/// `threads` of them, that many tasks compute side by side.
#[derive(Clone)]
pub struct ExecutorThread {
    jobs: std::sync::mpsc::Sender<(Task, Reply)>,
}

/// The most compute threads a worker runs.
pub const MAX_THREADS: usize = crate::core::MAX_PARALLEL;

impl ExecutorThread {
    /// Starts one thread; `make` runs on it once. If `make` fails, every task gets its error.
    pub fn spawn<B, F>(make: F, files: std::sync::Arc<dyn FileSource + Send + Sync>) -> Self
    where
        B: Backend + ExactBackend,
        F: Fn() -> Result<Executor<B>, WorkerError> + Send + Sync + 'static,
    {
        Self::spawn_pool(make, files, 1)
    }

    /// Starts `threads` threads (1 to [`MAX_THREADS`]), each with its own executor from
    /// `make`, sharing one queue.
    pub fn spawn_pool<B, F>(
        make: F,
        files: std::sync::Arc<dyn FileSource + Send + Sync>,
        threads: usize,
    ) -> Self
    where
        B: Backend + ExactBackend,
        F: Fn() -> Result<Executor<B>, WorkerError> + Send + Sync + 'static,
    {
        let (jobs, queue) = std::sync::mpsc::channel::<(Task, Reply)>();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        let make = std::sync::Arc::new(make);
        for i in 0..threads.clamp(1, MAX_THREADS) {
            let (queue, make, files) = (queue.clone(), make.clone(), files.clone());
            std::thread::Builder::new()
                .name(format!("tabula-executor-{i}"))
                .spawn(move || {
                    // The lock is held only to take the next task, never while computing.
                    let next = || queue.lock().ok()?.recv().ok();
                    let mut executor = match make() {
                        Ok(e) => e,
                        Err(e) => {
                            let message = e.to_string();
                            while let Some((_, reply)) = next() {
                                reply(Err(WorkerError::Model(message.clone())));
                            }
                            return;
                        }
                    };
                    while let Some((task, reply)) = next() {
                        reply(executor.run(&task, files.as_ref()));
                    }
                })
                .expect("spawning an executor thread");
        }
        Self { jobs }
    }

    /// Queues `task`; `reply` runs on the executor thread with the result.
    pub fn submit(&self, task: Task, reply: Reply) -> Result<(), WorkerError> {
        self.jobs
            .send((task, reply))
            .map_err(|_| WorkerError::Model("the executor thread stopped".into()))
    }
}

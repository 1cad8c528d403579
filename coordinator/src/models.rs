//! The models the coordinator serves: their tokenizers (requests are tokenised here, so units
//! carry token ids), the content-addressed files workers download, and the FLOPs a token
//! costs (credit is pre-assigned from them).

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tabula_models::{
    bert::BertConfig,
    catalog::{Family, ModelSpec},
    gguf::GgufFile,
    llama::LlamaConfig,
    tokenize::{BertTokenizer, LlamaTokenizer},
};
use tabula_protocol::{FileRef, Hash, ModelRef, Precision};
use tabula_worker::{FileSource, WorkerError};

use crate::CoordinatorError;

/// A model's files on the coordinator's disk, as the CLI found (and if needed quantised) them:
/// a model of the catalogue, or one added with `tabula models add`.
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub name: String,
    pub family: Family,
    /// Its source files: path and SHA-256 (checked when the CLI found them).
    pub files: Vec<(PathBuf, String)>,
    /// Where its pipeline pieces are kept (`dir/pieces/<exact sha256>/`).
    pub dir: PathBuf,
    /// The exact-precision file and the SHA-256 in its name.
    pub exact: (PathBuf, String),
}

impl ModelSource {
    /// A model of the catalogue, its files in `dir`.
    pub fn catalogue(spec: &ModelSpec, dir: &std::path::Path, exact: (PathBuf, String)) -> Self {
        Self {
            name: spec.name.into(),
            family: spec.family,
            files: spec
                .files
                .iter()
                .map(|f| (dir.join(f.local_path), f.sha256.to_string()))
                .collect(),
            dir: dir.to_path_buf(),
            exact,
        }
    }
}

pub enum ModelKind {
    Embedding {
        tokenizer: Box<BertTokenizer>,
        dim: usize,
        vocab: usize,
    },
    Generation {
        tokenizer: Box<LlamaTokenizer>,
        vocab: usize,
        context: usize,
        layers: usize,
        /// Width of a hidden row (what one position of an activation holds).
        dim: usize,
    },
}

pub struct ServedModel {
    pub name: String,
    pub kind: ModelKind,
    exact: ModelRef,
    fast: ModelRef,
    /// A generation model's exact file cut into per-layer pieces (`tabula_models::exact::
    /// split_pieces`), in the order `tables`, `embed`, `head`, `layer.0`, …; each is served
    /// at `/v1/weights/{sha256}` like any file. Empty for embedding models.
    pub pieces: Vec<ServedPiece>,
    /// 2 × weights used per token, in GFLOP.
    pub gflop_per_token: f64,
}

/// One piece of a model's exact file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServedPiece {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// The pieces of the exact file `exact` (path, SHA-256), kept in `dir/pieces/<exact sha>/`
/// (one file per piece, named by its own SHA-256, and `manifest.json` written last). Made
/// once; a later start reads the manifest.
fn pieces(
    dir: &std::path::Path,
    exact: &(PathBuf, String),
) -> Result<Vec<(ServedPiece, PathBuf)>, CoordinatorError> {
    let err = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        CoordinatorError::Config(format!("pipeline pieces {}: {e}", what.display()))
    };
    let folder = dir.join("pieces").join(&exact.1);
    let manifest = folder.join("manifest.json");
    let located = |list: Vec<ServedPiece>| {
        list.into_iter()
            .map(|p| {
                let path = folder.join(&p.sha256);
                (p, path)
            })
            .collect::<Vec<_>>()
    };
    if let Ok(text) = std::fs::read(&manifest) {
        if let Ok(list) = serde_json::from_slice::<Vec<ServedPiece>>(&text) {
            let all = located(list);
            let intact = all.iter().all(|(p, path)| {
                p.sha256.len() == 64
                    && p.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    && std::fs::metadata(path).is_ok_and(|m| m.len() == p.size)
            });
            if intact && !all.is_empty() {
                return Ok(all);
            }
        }
        tracing::warn!(
            "{} is damaged; cutting the pieces again",
            manifest.display()
        );
    }
    let bytes = std::fs::read(&exact.0).map_err(|e| err(&exact.0, &e))?;
    let cut = tabula_models::exact::split_pieces(&bytes, &exact.1)?;
    std::fs::create_dir_all(&folder).map_err(|e| err(&folder, &e))?;
    let mut list = Vec::with_capacity(cut.len());
    for piece in cut {
        let path = folder.join(&piece.sha256);
        let tmp = folder.join(format!("{}.{}.partial", piece.sha256, std::process::id()));
        std::fs::write(&tmp, &piece.bytes).map_err(|e| err(&tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, &e))?;
        list.push(ServedPiece {
            name: piece.name,
            sha256: piece.sha256,
            size: piece.bytes.len() as u64,
        });
    }
    let tmp = folder.join(format!("manifest.json.{}.partial", std::process::id()));
    let json = serde_json::to_vec_pretty(&list).expect("pieces serialise");
    std::fs::write(&tmp, json).map_err(|e| err(&tmp, &e))?;
    std::fs::rename(&tmp, &manifest).map_err(|e| err(&manifest, &e))?;
    tracing::info!(pieces = list.len(), dir = %folder.display(), "cut the exact file into pipeline pieces");
    remove_stale_pieces(dir);
    Ok(located(list))
}

/// Removes the pieces of exact files that are no longer in `dir` (a `tabula models quantize`
/// of a newer format left the old file's pieces behind): each folder under `dir/pieces` is
/// named by the SHA-256 of the exact file it was cut from.
fn remove_stale_pieces(dir: &std::path::Path) {
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    let present: std::collections::HashSet<String> = files
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_suffix(".safetensors")?;
            let (_, hash) = rest.rsplit_once(".exact.")?;
            Some(hash.to_string())
        })
        .collect();
    let Ok(folders) = std::fs::read_dir(dir.join("pieces")) else {
        return;
    };
    for folder in folders.flatten() {
        let name = folder.file_name().to_string_lossy().into_owned();
        let hashlike = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if hashlike && !present.contains(&name) {
            match std::fs::remove_dir_all(folder.path()) {
                Ok(()) => {
                    tracing::info!(folder = %folder.path().display(), "removed the pieces of an exact file that is gone")
                }
                Err(e) => {
                    tracing::warn!(folder = %folder.path().display(), "removing stale pieces: {e}")
                }
            }
        }
    }
}

impl ServedModel {
    pub fn model_ref(&self, precision: Precision) -> ModelRef {
        match precision {
            Precision::Exact => self.exact.clone(),
            Precision::Fast => self.fast.clone(),
        }
    }
}

/// Every served model, and the path behind each content hash. Never changed once built: a
/// model added while the coordinator runs makes a new one ([`Registry::extended`]) that
/// replaces it in [`Models`].
#[derive(Default)]
pub struct Registry {
    pub models: Vec<Arc<ServedModel>>,
    paths: HashMap<Hash, PathBuf>,
}

/// The registry served now. Requests take the one current when they start and keep it to
/// their end, so a model added meanwhile changes nothing under them.
pub struct Models(std::sync::RwLock<Arc<Registry>>);

impl Models {
    pub fn new(registry: Registry) -> Self {
        Self(std::sync::RwLock::new(Arc::new(registry)))
    }

    pub fn current(&self) -> Arc<Registry> {
        self.0.read().expect("models lock").clone()
    }

    /// Serves `sources` besides the models served now (those of a name already served are
    /// left as they are: a name keeps its files while the coordinator runs). Returns the
    /// names added.
    pub fn add(&self, sources: &[ModelSource]) -> Result<Vec<String>, CoordinatorError> {
        let current = self.current();
        let new: Vec<ModelSource> = sources
            .iter()
            .filter(|s| current.find(&s.name).is_none())
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(Vec::new());
        }
        // Loaded outside the lock (it reads the files); one writer at a time is the caller's.
        let next = current.extended(&new)?;
        *self.0.write().expect("models lock") = Arc::new(next);
        Ok(new.into_iter().map(|s| s.name).collect())
    }
}

fn file_ref(role: &str, path: &std::path::Path, sha256: &str) -> Result<FileRef, CoordinatorError> {
    let size = std::fs::metadata(path)
        .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?
        .len();
    Ok(FileRef {
        role: role.into(),
        sha256: Hash::from_hex(sha256)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?,
        size,
    })
}

impl Registry {
    pub fn load(sources: &[ModelSource]) -> Result<Self, CoordinatorError> {
        Self::default().extended(sources)
    }

    /// This registry with `sources` served too (after the models it has).
    pub fn extended(&self, sources: &[ModelSource]) -> Result<Self, CoordinatorError> {
        let mut models = self.models.clone();
        let mut paths = self.paths.clone();
        for source in sources {
            let name = source.name.as_str();
            let local = |suffix: &str| {
                source
                    .files
                    .iter()
                    .find(|(path, _)| path.to_string_lossy().ends_with(suffix))
                    .map(|(path, sha)| (path.clone(), sha.as_str()))
                    .ok_or_else(|| CoordinatorError::Config(format!("{name} has no {suffix}")))
            };
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    CoordinatorError::Config(format!(
                        "cannot read {}: {e}; run `tabula models fetch`",
                        path.display()
                    ))
                })
            };
            let mut add = |role: &str, (path, sha): (PathBuf, &str)| {
                let r = file_ref(role, &path, sha)?;
                paths.insert(r.sha256, path);
                Ok::<_, CoordinatorError>(r)
            };
            let exact = ModelRef {
                name: name.into(),
                files: vec![add("exact", (source.exact.0.clone(), &source.exact.1))?],
            };
            let mut served_pieces = Vec::new();
            let (kind, fast, params) = match source.family {
                Family::Bert => {
                    let config = BertConfig::from_json(&read(&local("config.json")?.0)?)?;
                    let tokenizer = BertTokenizer::from_json(
                        &read(&local("tokenizer.json")?.0)?,
                        config.max_tokens(),
                    )?;
                    let fast = ModelRef {
                        name: name.into(),
                        files: vec![
                            add("config", local("config.json")?)?,
                            add("safetensors", local("model.safetensors")?)?,
                        ],
                    };
                    let (h, f) = (config.hidden_size, config.intermediate_size);
                    let params = config.num_hidden_layers * (4 * h * h + 2 * h * f);
                    let kind = ModelKind::Embedding {
                        tokenizer: Box::new(tokenizer),
                        dim: h,
                        vocab: config.vocab_size,
                    };
                    (kind, fast, params)
                }
                Family::Llama => {
                    let (path, sha) = local(".gguf")?;
                    let bytes = read(&path)?;
                    let gguf = GgufFile::parse(&bytes).map_err(tabula_models::ModelError::from)?;
                    let config = LlamaConfig::from_gguf(&gguf, &bytes)?;
                    let tokenizer = LlamaTokenizer::from_gguf(&gguf)?;
                    let fast = ModelRef {
                        name: name.into(),
                        files: vec![add("gguf", (path.clone(), sha))?],
                    };
                    let (d, kv) = (config.dim, config.kv_heads * config.head_dim);
                    let per_layer = d * (config.heads * config.head_dim) * 2
                        + 2 * d * kv
                        + 3 * d * config.ffn_dim;
                    let params = config.layers * per_layer + config.vocab_size * d;
                    let kind = ModelKind::Generation {
                        tokenizer: Box::new(tokenizer),
                        vocab: config.vocab_size,
                        context: config.context_length,
                        layers: config.layers,
                        dim: config.dim,
                    };
                    for (piece, path) in pieces(&source.dir, &source.exact)? {
                        let r = file_ref("piece", &path, &piece.sha256)?;
                        paths.insert(r.sha256, path);
                        served_pieces.push(piece);
                    }
                    (kind, fast, params)
                }
            };
            models.push(Arc::new(ServedModel {
                name: name.into(),
                kind,
                exact,
                fast,
                pieces: served_pieces,
                gflop_per_token: 2.0 * params as f64 / 1e9,
            }));
        }
        Ok(Self { models, paths })
    }

    pub fn find(&self, name: &str) -> Option<&Arc<ServedModel>> {
        self.models
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// The path of the served file with this hash.
    pub fn path(&self, sha256: &Hash) -> Option<&PathBuf> {
        self.paths.get(sha256)
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }
}

/// How often [`watch`] looks at its file.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the coordinator finds models added while it runs (`tabula models add`).
pub struct ModelWatch {
    /// A file that changes whenever a model is added (looked at every [`WATCH_INTERVAL`]).
    pub file: PathBuf,
    /// The models there are now. It may quantise a new model, so it runs on a blocking
    /// thread; models already served are not loaded again.
    pub load: Box<dyn Fn() -> Result<Vec<ModelSource>, String> + Send + Sync>,
}

/// Serves each model `watch` finds that is not served yet, from the moment it is found.
/// A model that fails to load is logged and left out; the next change tries again.
pub async fn watch(models: Arc<Models>, watch: ModelWatch) {
    let stamp = |file: &std::path::Path| {
        std::fs::metadata(file)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&watch.file);
    let watch = Arc::new(watch);
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = stamp(&watch.file);
        if now == seen {
            continue;
        }
        seen = now;
        let (w, m) = (watch.clone(), models.clone());
        let added = tokio::task::spawn_blocking(move || {
            let sources = (w.load)()?;
            m.add(&sources).map_err(|e| e.to_string())
        })
        .await;
        match added {
            Ok(Ok(names)) => {
                for model in names {
                    tracing::info!(model, "serving a model added while running");
                }
            }
            Ok(Err(e)) => tracing::warn!("a model added while running is not served: {e}"),
            Err(e) => tracing::error!("loading added models: {e}"),
        }
    }
}

/// Reads served files for the referee.
pub struct RegistryFiles(pub Arc<Models>);

impl FileSource for RegistryFiles {
    fn read(&self, file: &FileRef) -> Result<Vec<u8>, WorkerError> {
        let registry = self.0.current();
        let path = registry
            .path(&file.sha256)
            .ok_or_else(|| WorkerError::File(format!("no served file {}", file.sha256)))?;
        Ok(std::fs::read(path)?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pieces_of_exact_files_that_are_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (current, old) = ("a".repeat(64), "b".repeat(64));
        std::fs::write(
            dir.path()
                .join(format!("SmolLM2-135M-Instruct.exact.{current}.safetensors")),
            b"x",
        )
        .unwrap();
        for folder in [&current, &old, &"not-a-hash".to_string()] {
            std::fs::create_dir_all(dir.path().join("pieces").join(folder)).unwrap();
        }
        super::remove_stale_pieces(dir.path());
        let pieces = dir.path().join("pieces");
        assert!(pieces.join(&current).exists());
        assert!(!pieces.join(&old).exists());
        assert!(
            pieces.join("not-a-hash").exists(),
            "only folders named by a hash go"
        );
    }
}

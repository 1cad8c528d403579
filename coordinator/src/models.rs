//! The models the coordinator serves: their tokenizers (requests are tokenised here, so units
//! carry token ids), the content-addressed files workers download, and the FLOPs a token
//! costs (credit is pre-assigned from them).

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tabula_models::{
    bert::{BertConfig, MAX_SEQ_LEN},
    catalog::{Family, ModelSpec},
    gguf::GgufFile,
    llama::LlamaConfig,
    tokenize::{BertTokenizer, LlamaTokenizer},
};
use tabula_protocol::{FileRef, Hash, ModelRef, Precision};
use tabula_worker::{FileSource, WorkerError};

use crate::CoordinatorError;

/// A model's files on the coordinator's disk, as the CLI found (and if needed quantised) them.
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub spec: &'static ModelSpec,
    pub dir: PathBuf,
    /// The exact-precision file and the SHA-256 in its name.
    pub exact: (PathBuf, String),
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
    },
}

pub struct ServedModel {
    pub name: String,
    pub kind: ModelKind,
    exact: ModelRef,
    fast: ModelRef,
    /// 2 × weights used per token, in GFLOP.
    pub gflop_per_token: f64,
}

impl ServedModel {
    pub fn model_ref(&self, precision: Precision) -> ModelRef {
        match precision {
            Precision::Exact => self.exact.clone(),
            Precision::Fast => self.fast.clone(),
        }
    }
}

/// Every served model, and the path behind each content hash.
pub struct Registry {
    pub models: Vec<ServedModel>,
    paths: HashMap<Hash, PathBuf>,
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
        let mut models = Vec::new();
        let mut paths = HashMap::new();
        for source in sources {
            let spec = source.spec;
            let local = |suffix: &str| {
                spec.files
                    .iter()
                    .find(|f| f.local_path.ends_with(suffix))
                    .map(|f| (source.dir.join(f.local_path), f.sha256))
                    .ok_or_else(|| {
                        CoordinatorError::Config(format!("{} has no {suffix}", spec.name))
                    })
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
                name: spec.name.into(),
                files: vec![add("exact", (source.exact.0.clone(), &source.exact.1))?],
            };
            let (kind, fast, params) = match spec.family {
                Family::Bert => {
                    let config = BertConfig::from_json(&read(&local("config.json")?.0)?)?;
                    let tokenizer = BertTokenizer::from_json(
                        &read(&local("tokenizer.json")?.0)?,
                        MAX_SEQ_LEN.min(config.max_position_embeddings),
                    )?;
                    let fast = ModelRef {
                        name: spec.name.into(),
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
                    let config = LlamaConfig::from_gguf(&gguf)?;
                    let tokenizer = LlamaTokenizer::from_gguf(&gguf)?;
                    let fast = ModelRef {
                        name: spec.name.into(),
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
                    };
                    (kind, fast, params)
                }
            };
            models.push(ServedModel {
                name: spec.name.into(),
                kind,
                exact,
                fast,
                gflop_per_token: 2.0 * params as f64 / 1e9,
            });
        }
        Ok(Self { models, paths })
    }

    pub fn find(&self, name: &str) -> Option<&ServedModel> {
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

/// Reads served files for the referee.
pub struct RegistryFiles(pub Arc<Registry>);

impl FileSource for RegistryFiles {
    fn read(&self, file: &FileRef) -> Result<Vec<u8>, WorkerError> {
        let path = self
            .0
            .path(&file.sha256)
            .ok_or_else(|| WorkerError::File(format!("no served file {}", file.sha256)))?;
        Ok(std::fs::read(path)?)
    }
}

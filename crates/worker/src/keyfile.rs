//! Key files: an ed25519 seed as 64 hex digits, readable by its owner only. The worker keeps
//! its identity this way and the coordinator its receipt-signing key.

use std::path::Path;

use tabula_protocol::{Bytes, Identity};

use crate::WorkerError;

/// Loads the key at `path`; on first use creates it from `fresh_seed` (drawn from the OS by
/// the caller), written to a temporary file with mode 0600 and renamed into place.
pub fn load_or_create(
    path: &Path,
    fresh_seed: impl FnOnce() -> [u8; 32],
) -> Result<Identity, WorkerError> {
    Ok(Identity::from_seed(load_or_create_secret(
        path, fresh_seed,
    )?))
}

/// The 32 secret bytes behind [`load_or_create`], for keys of other kinds (the coordinator's
/// secp256k1 chain key uses the same file format). A leading `0x` is accepted.
pub fn load_or_create_secret(
    path: &Path,
    fresh_secret: impl FnOnce() -> [u8; 32],
) -> Result<[u8; 32], WorkerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text.trim();
            let seed =
                Bytes::<32>::from_hex(text.strip_prefix("0x").unwrap_or(text)).map_err(|e| {
                    WorkerError::File(format!("{} is not a key file: {e}", path.display()))
                })?;
            Ok(seed.0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let seed = fresh_secret();
            let tmp = path.with_extension("partial");
            write_private(&tmp, Bytes(seed).to_hex().as_bytes())?;
            std::fs::rename(&tmp, path)?;
            tracing::info!(path = %path.display(), "created a new key");
            Ok(seed)
        }
        Err(e) => Err(e.into()),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(data)
}

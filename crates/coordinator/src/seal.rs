//! Job env values never reach the job store in plain text: they may be secrets (CUBE sends
//! `CHRIS_USER_TOKEN`), and a database is copied, backed up and queried by people who
//! should not read them. The store keeps the spec with its env values blanked, and the
//! full env list sealed here (XChaCha20-Poly1305, bound to the job id) under a key that
//! lives beside the coordinator, not in the database.
//!
//! Losing the key loses the env values of jobs not yet run (they cannot be dispatched);
//! everything else in the store stays readable. Back the key up with the database.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use chacha20poly1305::aead::{Aead as _, Generate as _, Payload};
use chacha20poly1305::{Key, KeyInit as _, XChaCha20Poly1305, XNonce};

use crate::error::{Error, Result};

const NONCE_BYTES: usize = 24;

/// Seals and opens job env lists. Cheap to clone.
#[derive(Clone)]
pub struct EnvSealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for EnvSealer {
    /// Shows nothing of the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvSealer(<key>)")
    }
}

impl EnvSealer {
    /// Reads the key at `path` (64 hex digits), or creates it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let refuse =
            |reason: String| Error::Config(format!("env key {}: {reason}", path.display()));
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_key(path).map_err(|e| refuse(format!("cannot create: {e}")))?
            }
            Err(e) => return Err(refuse(e.to_string())),
        };
        let mode = std::fs::metadata(path)
            .map_err(|e| refuse(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the env key is readable by other users; chmod 600 it"
            );
        }
        let bytes = decode_hex(text.trim())
            .ok_or_else(|| refuse("must hold 64 hexadecimal digits (a 32-byte key)".into()))?;
        Ok(Self::from_key(bytes))
    }

    /// A sealer over a key held in memory (tests, or a key from elsewhere).
    pub fn from_key(key: [u8; 32]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(&Key::from(key)),
        }
    }

    /// Seals `env` (the spec's `KEY=VALUE` entries) for job `job_id`: a fresh nonce, then
    /// the entries joined by NUL (which no entry may hold), encrypted and authenticated.
    pub fn seal(&self, job_id: &str, env: &[String]) -> Result<Vec<u8>> {
        let nonce = XNonce::try_generate()
            .map_err(|e| Error::Sealing(format!("no randomness from the system: {e}")))?;
        let plain = env.join("\0");
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain.as_bytes(),
                    aad: job_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Sealing("cannot encrypt the env".into()))?;
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`EnvSealer::seal`] made for `job_id`. Fails on another key, another
    /// job's row, or altered bytes.
    pub fn open(&self, job_id: &str, sealed: &[u8]) -> Result<Vec<String>> {
        let wrong = || {
            Error::Sealing(format!(
                "the env of job `{job_id}` cannot be opened with this key (another key, or altered data)"
            ))
        };
        if sealed.len() < NONCE_BYTES {
            return Err(wrong());
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let nonce = <[u8; NONCE_BYTES]>::try_from(nonce).map_err(|_| wrong())?;
        let nonce = XNonce::from(nonce);
        let plain = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: job_id.as_bytes(),
                },
            )
            .map_err(|_| wrong())?;
        let plain = String::from_utf8(plain).map_err(|_| wrong())?;
        if plain.is_empty() {
            return Ok(Vec::new());
        }
        Ok(plain.split('\0').map(str::to_owned).collect())
    }
}

/// Writes a fresh random key, refusing to replace one that appeared meanwhile.
fn create_key(path: &Path) -> std::io::Result<String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let key = <[u8; 32]>::try_generate().map_err(std::io::Error::other)?;
    let text: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{text}\n").as_bytes())?;
    file.sync_all()?;
    tracing::info!(
        path = %path.display(),
        "created the key that seals job env values; back it up with the database"
    );
    Ok(text)
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_job() {
        let sealer = EnvSealer::from_key([7; 32]);
        let env = vec!["CHRIS_USER_TOKEN=s3cret=x".to_owned(), "EMPTY=".to_owned()];
        let sealed = sealer.seal("job-1", &env).expect("seal");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(sealer.open("job-1", &sealed).expect("open"), env);
        assert!(
            sealer.open("job-2", &sealed).is_err(),
            "bound to the job id"
        );
        assert!(EnvSealer::from_key([8; 32]).open("job-1", &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(sealer.open("job-1", &altered).is_err());
        assert_ne!(
            sealer.seal("job-1", &env).expect("seal"),
            sealed,
            "fresh nonce"
        );
        let empty = sealer.seal("job-1", &[]).expect("seal");
        assert!(sealer.open("job-1", &empty).expect("open").is_empty());
    }

    #[test]
    fn key_file_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/env.key");
        let first = EnvSealer::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = first.seal("j", &["A=1".to_owned()]).expect("seal");
        let again = EnvSealer::load_or_create(&path).expect("read");
        assert_eq!(again.open("j", &sealed).expect("open"), ["A=1"]);
        std::fs::write(&path, "not hex").expect("write");
        let error = EnvSealer::load_or_create(&path).expect_err("bad key");
        assert!(error.to_string().contains("64 hexadecimal"), "{error}");
    }
}

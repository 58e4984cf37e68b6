//! Grants: bearer tokens that say which store paths their holder may read or write, until
//! when. The coordinator mints one per job and direction, so a site can read only its own
//! jobs' inputs and write only their outputs; an operator mints broader ones by hand.
//!
//! A token is `dg1.<payload>.<mac>`: the payload is base64url JSON, the MAC is a keyed
//! BLAKE3 hash of it under a key derived from a secret shared with the coordinator.
//! Tokens are never logged.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::path::StorePath;

const PREFIX: &str = "dg1";
const KEY_CONTEXT: &str = "chris-dispatch broker grant v1";
/// Shortest secret accepted: a guessable key would let anyone mint grants.
pub const MIN_SECRET_BYTES: usize = 16;

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who holds it (a job id, a site, an operator): for logs and audit.
    pub sub: String,
    /// Store paths (and everything below them) the holder may read; `""` is the whole store.
    #[serde(default)]
    pub read: Vec<String>,
    /// Store paths (and everything below them) the holder may write, and read.
    #[serde(default)]
    pub write: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Download, stat, list.
    Read,
    /// Upload, delete, stage into.
    Write,
}

impl Grant {
    /// True if the grant covers `access` to `path`.
    pub fn allows(&self, access: Access, path: &StorePath) -> bool {
        let covers = |prefixes: &[String]| {
            prefixes
                .iter()
                .any(|p| StorePath::from_api(p).is_ok_and(|prefix| path.starts_with(&prefix)))
        };
        match access {
            Access::Read => covers(&self.read) || covers(&self.write),
            Access::Write => covers(&self.write),
        }
    }

    /// Fails with a message naming the path unless the grant covers it.
    pub fn check(&self, access: Access, path: &StorePath) -> Result<()> {
        if self.allows(access, path) {
            return Ok(());
        }
        let verb = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        Err(Error::PermissionDenied(format!(
            "the grant for `{}` does not allow to {verb} `{path}`; ask the coordinator for a grant that covers it",
            self.sub
        )))
    }
}

/// The key grants are signed with.
#[derive(Clone)]
pub struct GrantKey([u8; 32]);

impl std::fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantKey(..)")
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl GrantKey {
    /// Derives the key from a shared secret (trailing whitespace ignored, so a secret file
    /// may end in a newline).
    pub fn from_secret(secret: &[u8]) -> Result<Self> {
        let secret = secret.trim_ascii_end();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::invalid(
                "grant_key",
                format!(
                    "the secret has {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
                    secret.len()
                ),
            ));
        }
        Ok(Self(blake3::derive_key(KEY_CONTEXT, secret)))
    }

    /// Signs a grant.
    pub fn mint(&self, grant: &Grant) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(grant).unwrap_or_default());
        let mac = blake3::keyed_hash(&self.0, payload.as_bytes());
        format!(
            "{PREFIX}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(mac.as_bytes())
        )
    }

    /// A grant for `sub` that expires `ttl` from now.
    pub fn mint_for(
        &self,
        sub: &str,
        read: &[&str],
        write: &[&str],
        ttl: std::time::Duration,
    ) -> String {
        self.mint(&Grant {
            sub: sub.to_owned(),
            read: read.iter().map(|s| (*s).to_owned()).collect(),
            write: write.iter().map(|s| (*s).to_owned()).collect(),
            exp: now_unix() + ttl.as_secs(),
        })
    }

    /// Checks a token's signature and expiry.
    pub fn verify(&self, token: &str) -> Result<Grant> {
        let invalid = || {
            Error::Unauthenticated("invalid grant: it was not issued with this broker's key".into())
        };
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(payload), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| invalid())?;
        let expected = blake3::keyed_hash(&self.0, payload.as_bytes());
        // blake3::Hash compares in constant time.
        if mac.len() != 32 || expected != blake3::Hash::from_slice(&mac).map_err(|_| invalid())? {
            return Err(invalid());
        }
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?;
        let grant: Grant = serde_json::from_slice(&json).map_err(|_| invalid())?;
        if grant.exp <= now_unix() {
            return Err(Error::Unauthenticated(format!(
                "the grant for `{}` has expired; ask the coordinator for a new one",
                grant.sub
            )));
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grants_cover_only_their_paths_and_expire() {
        let key = GrantKey::from_secret(b"0123456789abcdef-secret\n").unwrap();
        let token = key.mint_for(
            "job-1",
            &["key-job-1/incoming"],
            &["key-job-1/outgoing"],
            Duration::from_secs(60),
        );
        let grant = key.verify(&token).unwrap();
        let p = |s| StorePath::from_api(s).unwrap();
        assert!(grant.allows(Access::Read, &p("key-job-1/incoming/a")));
        assert!(!grant.allows(Access::Write, &p("key-job-1/incoming/a")));
        assert!(grant.allows(Access::Write, &p("key-job-1/outgoing")));
        assert!(grant.allows(Access::Read, &p("key-job-1/outgoing/x")));
        assert!(!grant.allows(Access::Read, &p("key-job-10/incoming")));
        assert!(!grant.allows(Access::Read, &p("key-job-1")));

        let other = GrantKey::from_secret(b"another secret of 16+ bytes").unwrap();
        assert!(matches!(
            other.verify(&token),
            Err(Error::Unauthenticated(_))
        ));
        let mut tampered = token.clone();
        tampered.insert(5, 'x');
        assert!(key.verify(&tampered).is_err());
        let expired = key.mint(&Grant { exp: 1, ..grant });
        assert!(
            key.verify(&expired)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        assert!(GrantKey::from_secret(b"short").is_err());
    }
}

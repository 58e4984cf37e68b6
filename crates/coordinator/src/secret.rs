//! The secrets the coordinator hands out: join tokens and site credentials. Each is 32
//! random bytes from the operating system, shown once (in the answer that creates it) and
//! stored only as a BLAKE3 hash under a context naming what it is for, so a token can
//! never pass for a credential. A 256-bit random secret cannot be guessed from its hash,
//! which is why a fast hash is enough here where a password would need a slow one.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::Generate as _;

use crate::error::{Error, Result};

/// What a secret is for: the hash context, and the prefix that makes it recognisable in
/// a file (and by secret scanners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A one-time join token (`CreateJoinToken`).
    JoinToken,
    /// A site's long-lived credential (`Register`).
    SiteCredential,
}

impl Purpose {
    const fn context(self) -> &'static str {
        match self {
            Self::JoinToken => "chris-dispatch coordinator join token v1",
            Self::SiteCredential => "chris-dispatch coordinator site credential v1",
        }
    }

    const fn prefix(self) -> &'static str {
        match self {
            Self::JoinToken => "djt1_",
            Self::SiteCredential => "dsc1_",
        }
    }
}

/// A fresh secret for `purpose`.
pub fn generate(purpose: Purpose) -> Result<String> {
    let bytes = <[u8; 32]>::try_generate()
        .map_err(|e| Error::Sealing(format!("no randomness from the system: {e}")))?;
    Ok(format!(
        "{}{}",
        purpose.prefix(),
        URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The hash stored for `secret`.
pub fn hash(purpose: Purpose, secret: &str) -> [u8; 32] {
    blake3::derive_key(purpose.context(), secret.trim().as_bytes())
}

/// True when `presented` is the secret whose hash is `stored`, compared in constant time.
pub fn matches(purpose: Purpose, stored: &[u8], presented: &str) -> bool {
    let Ok(stored) = <[u8; 32]>::try_from(stored) else {
        return false;
    };
    // blake3::Hash compares in constant time.
    blake3::Hash::from_bytes(stored) == blake3::Hash::from_bytes(hash(purpose, presented))
}

/// A random id (not a secret) with a prefix, e.g. `site-3f2a...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_only_match_their_own_hash() -> Result<()> {
        let token = generate(Purpose::JoinToken)?;
        let other = generate(Purpose::JoinToken)?;
        assert_ne!(token, other);
        assert!(token.starts_with("djt1_") && token.len() > 40, "{token}");
        let stored = hash(Purpose::JoinToken, &token);
        assert!(matches(Purpose::JoinToken, &stored, &token));
        assert!(matches(Purpose::JoinToken, &stored, &format!("{token}\n")));
        assert!(!matches(Purpose::JoinToken, &stored, &other));
        assert!(
            !matches(Purpose::SiteCredential, &stored, &token),
            "a token never passes for a credential"
        );
        assert!(!matches(Purpose::JoinToken, &stored[..16], &token));
        Ok(())
    }
}

//! pfcon's login tokens: HS256 JSON Web Tokens carrying `pfcon_user` and `exp`, signed
//! with `SECRET_KEY`, valid for two days. CUBE treats them as opaque and sends them back
//! as `Authorization: Bearer <token>`; the refusals use pfcon's exact words, which CUBE
//! and pfcon's own tests look for.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// How long a token lasts, as pfcon issues them.
pub const TOKEN_LIFETIME_SECONDS: u64 = 2 * 24 * 3600;

/// Why a request's token was refused, in pfcon's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// A header that is not `Bearer <token>`.
    BadHeader,
    /// A well-signed token past its `exp`.
    Expired,
    /// Anything else: garbage, a bad signature, a token of another key.
    Invalid,
}

impl Refusal {
    /// The message pfcon answers 401 with.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "Missing authorization header.",
            Refusal::BadHeader => "Invalid authorization header.",
            Refusal::Expired => "Expired authorization token.",
            Refusal::Invalid => "Invalid authorization token.",
        }
    }
}

/// Issues and checks tokens with one key.
#[derive(Clone)]
pub struct Tokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    /// Tokens signed with `secret_key`.
    pub fn new(secret_key: &str) -> Self {
        Self {
            key: secret_key.as_bytes().to_vec(),
        }
    }

    fn sign(&self, signing_input: &str) -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(signing_input.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// A token for `user`, issued at `now` (seconds since the epoch).
    pub fn issue(&self, user: &str, now: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "pfcon_user": user,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.sign(&signing_input));
        format!("{signing_input}.{signature}")
    }

    /// Admits the `Authorization` header `header` at `now`, or says why not.
    pub fn check(&self, header: Option<&str>, now: u64) -> Result<(), Refusal> {
        let header = header.ok_or(Refusal::Missing)?;
        let token = header.strip_prefix("Bearer ").ok_or(Refusal::BadHeader)?;
        let mut parts = token.trim().split('.');
        let (Some(head), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Invalid);
        };
        let presented = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Refusal::Invalid)?;
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.key).map_err(|_| Refusal::Invalid)?;
        mac.update(format!("{head}.{payload}").as_bytes());
        mac.verify_slice(&presented).map_err(|_| Refusal::Invalid)?;
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).map_err(|_| Refusal::Invalid)?)
                .map_err(|_| Refusal::Invalid)?;
        if header["alg"] != "HS256" {
            return Err(Refusal::Invalid);
        }
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(payload)
                .map_err(|_| Refusal::Invalid)?,
        )
        .map_err(|_| Refusal::Invalid)?;
        match claims["exp"].as_u64() {
            Some(exp) if exp > now => Ok(()),
            Some(_) => Err(Refusal::Expired),
            None => Err(Refusal::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_token_it_issued_is_admitted_until_it_expires() {
        let tokens = Tokens::new("secret");
        let token = tokens.issue("pfcon", NOW);
        let header = format!("Bearer {token}");
        assert_eq!(tokens.check(Some(&header), NOW), Ok(()));
        assert_eq!(
            tokens.check(Some(&header), NOW + TOKEN_LIFETIME_SECONDS - 1),
            Ok(())
        );
        assert_eq!(
            tokens.check(Some(&header), NOW + TOKEN_LIFETIME_SECONDS),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn refusals_use_pfcons_words() {
        let tokens = Tokens::new("secret");
        let other = Tokens::new("another secret").issue("pfcon", NOW);
        let tampered = {
            let token = tokens.issue("pfcon", NOW);
            let (rest, _) = token.rsplit_once('.').unwrap_or_default();
            format!("{rest}.AAAA")
        };
        let cases = [
            (None, Refusal::Missing, "Missing authorization header."),
            (
                Some("Token abc".to_owned()),
                Refusal::BadHeader,
                "Invalid authorization header.",
            ),
            (
                Some("Bearer garbage".to_owned()),
                Refusal::Invalid,
                "Invalid authorization token.",
            ),
            (
                Some(format!("Bearer {other}")),
                Refusal::Invalid,
                "Invalid authorization token.",
            ),
            (
                Some(format!("Bearer {tampered}")),
                Refusal::Invalid,
                "Invalid authorization token.",
            ),
        ];
        for (header, refusal, message) in cases {
            assert_eq!(
                tokens.check(header.as_deref(), NOW),
                Err(refusal),
                "{header:?}"
            );
            assert_eq!(refusal.message(), message);
        }
    }

    #[test]
    fn tokens_are_standard_hs256_jwts() {
        // The RFC 7515 shape: three base64url parts, header naming HS256, the claims
        // pfcon puts in, and an HMAC-SHA256 signature any JWT library verifies.
        let token = Tokens::new("k").issue("pfcon", NOW);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(claims["pfcon_user"], "pfcon");
        assert_eq!(claims["exp"], NOW + TOKEN_LIFETIME_SECONDS);
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).map(|s| s.len()), Ok(32));
    }
}

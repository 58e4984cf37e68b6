//! The broker's configuration: defaults, then a TOML file, then `DISPATCH_BROKER_*`
//! environment variables, then command-line flags, checked once at start.
//!
//! The environment is passed in as a map so tests never touch the process environment.
//! A nested key is spelled with `__` in the environment: `DISPATCH_BROKER_LIMITS__MAX_ENTRIES`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::grant::GrantKey;
use crate::tar_decode::ArchiveLimits;
use crate::transfer::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Prefix of the environment variables the broker reads.
pub const ENV_PREFIX: &str = "DISPATCH_BROKER_";
/// Variables with the prefix that are not configuration keys: the config file's path,
/// and the broker address the `push`/`pull` commands use.
const ENV_NOT_KEYS: [&str; 2] = ["CONFIG", "URI"];

/// Everything the broker can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Version of this file's format; only 1 exists.
    pub version: u32,
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// The storeBase directory this broker fronts.
    pub store_root: PathBuf,
    /// File holding the secret grants are signed with (shared with the coordinator).
    pub grant_key_file: Option<PathBuf>,
    /// Serve without checking grants. Only for a broker on loopback used by one person.
    pub insecure_no_auth: bool,
    /// Chunk size when a client does not choose one, in bytes.
    pub default_chunk_size: u32,
    /// What an incoming archive may contain.
    pub limits: ArchiveLimits,
    /// Flush the filesystem before reporting a transfer done, so a power loss cannot
    /// lose what was acknowledged.
    pub sync_on_commit: bool,
    /// How long in-flight transfers get to checkpoint after SIGTERM, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Bytes received between two saves of a transfer's journal: what a crash can cost to
    /// resend, against one small file write per save.
    pub checkpoint_bytes: u64,
    /// Interrupted transfers not resumed within this many hours are removed at start.
    pub transfer_ttl_hours: u64,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            version: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            store_root: PathBuf::from("/var/local/storeBase"),
            grant_key_file: None,
            insecure_no_auth: false,
            default_chunk_size: DEFAULT_CHUNK_SIZE,
            limits: ArchiveLimits::default(),
            sync_on_commit: true,
            shutdown_grace_seconds: 30,
            checkpoint_bytes: crate::transfer::DEFAULT_CHECKPOINT_BYTES,
            transfer_ttl_hours: 48,
            log_json: false,
        }
    }
}

pub use dispatch_service::ConfigError;

impl BrokerConfig {
    /// Layers defaults, the file (if any), the environment and the flag overrides (each a
    /// dotted key and a TOML value), then checks the result.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &[(String, toml::Value)],
    ) -> Result<Self, ConfigError> {
        let layers = dispatch_service::Layers {
            file,
            env,
            env_prefix: ENV_PREFIX,
            env_not_keys: &ENV_NOT_KEYS,
            overrides,
        };
        let config: Self = dispatch_service::load(&layers)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != 1 {
            return Err(ConfigError(format!(
                "version {} is not supported; use version = 1",
                self.version
            )));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.default_chunk_size) {
            return Err(ConfigError(format!(
                "default_chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.default_chunk_size
            )));
        }
        if self.grant_key_file.is_none() && !self.insecure_no_auth {
            return Err(ConfigError(
                "no grant_key_file: give --grant-key-file (a file with a secret of 16+ bytes shared with the coordinator), or --insecure-no-auth for a private loopback broker".into(),
            ));
        }
        if self.limits.max_expansion_ratio == 0 || self.limits.max_entries == 0 {
            return Err(ConfigError(
                "limits.max_expansion_ratio and limits.max_entries must be above 0".into(),
            ));
        }
        Ok(())
    }

    /// The grant key, read from `grant_key_file`; `None` when auth is off.
    pub fn grant_key(&self) -> Result<Option<GrantKey>, ConfigError> {
        let Some(path) = &self.grant_key_file else {
            return Ok(None);
        };
        let secret = std::fs::read(path)
            .map_err(|e| ConfigError(format!("grant_key_file {}: {e}", path.display())))?;
        GrantKey::from_secret(&secret)
            .map(Some)
            .map_err(|e| ConfigError(format!("grant_key_file {}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "store_root = \"/from/file\"\ninsecure_no_auth = true\n[limits]\nmax_entries = 10\n",
        )
        .unwrap();
        let env = BTreeMap::from([
            (
                "DISPATCH_BROKER_LIMITS__MAX_ENTRIES".to_owned(),
                "20".to_owned(),
            ),
            (
                "DISPATCH_BROKER_LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
            (
                "DISPATCH_BROKER_URI".to_owned(),
                "http://elsewhere".to_owned(),
            ),
        ]);
        let flags = [(
            "store_root".to_owned(),
            toml::Value::String("/from/flag".into()),
        )];
        let config = BrokerConfig::load(Some(&file), &env, &flags).unwrap();
        assert_eq!(config.store_root, PathBuf::from("/from/flag"));
        assert_eq!(config.limits.max_entries, 20);
        assert_eq!(config.listen.port(), 9999);

        let env = BTreeMap::from([("DISPATCH_BROKER_LIMTS__MAX".to_owned(), "1".to_owned())]);
        let err = BrokerConfig::load(Some(&file), &env, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limts"), "{err}");
    }

    #[test]
    fn refuses_to_start_without_auth_unless_told() {
        let err = BrokerConfig::load(None, &BTreeMap::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("grant_key_file"), "{err}");
    }
}

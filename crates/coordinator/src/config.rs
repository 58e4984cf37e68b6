//! The coordinator's configuration: defaults, then a TOML file, then
//! `DISPATCH_COORDINATOR_*` environment variables, then flags (dispatch_service::load).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name of the SQLite database file in `data_dir` when no `database_url` is given.
pub const SQLITE_FILE: &str = "coordinator.db";
/// Name of the env-sealing key in `data_dir` when no `env_key_file` is given.
pub const ENV_KEY_FILE: &str = "env.key";

/// Everything the coordinator can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Version of this file's format; only 1 exists.
    pub version: u32,
    /// Address of the gRPC API.
    pub listen: SocketAddr,
    /// Where the coordinator keeps its own files: the SQLite database (unless
    /// `database_url` names another), and the key sealing job env values.
    pub data_dir: PathBuf,
    /// `postgres://user:password@host/db` to keep jobs in PostgreSQL, or
    /// `sqlite://path`; empty: SQLite in `data_dir/coordinator.db`.
    pub database_url: String,
    /// The key that seals job env values in the store; empty: `data_dir/env.key`,
    /// created on first start. Keep it with the database's backups.
    pub env_key_file: Option<PathBuf>,
    /// File holding the bearer token clients must present.
    pub token_file: Option<PathBuf>,
    /// Serve the API without a token (a private coordinator on loopback).
    pub insecure_no_auth: bool,
    /// Seconds calls get to finish after SIGTERM; watch streams end at once, asking
    /// their clients to resume elsewhere.
    pub shutdown_grace_seconds: u64,
    /// Log JSON lines instead of text.
    pub log_json: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            version: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data_dir: PathBuf::from("/var/lib/dispatch-coordinator"),
            database_url: String::new(),
            env_key_file: None,
            token_file: None,
            insecure_no_auth: false,
            shutdown_grace_seconds: 30,
            log_json: false,
        }
    }
}

/// Which database holds the jobs, as the URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL (which may hold a password: never log it whole).
    Postgres(String),
}

impl Database {
    /// The database named by `url`, or SQLite in `data_dir` when `url` is empty.
    pub fn from_url(url: &str, data_dir: &Path) -> Result<Self> {
        if url.is_empty() {
            return Ok(Self::Sqlite(data_dir.join(SQLITE_FILE)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                return Err(Error::Config(
                    "database_url: an SQLite URL must name a file (jobs must outlive the process)"
                        .into(),
                ));
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        Err(Error::Config(format!(
            "database_url: `{}` is neither postgres://... nor sqlite://...; leave it empty for SQLite in data_dir",
            redact_url(url)
        )))
    }

    /// How to name the database in logs: the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite {}", path.display()),
            Self::Postgres(url) => redact_url(url),
        }
    }
}

impl CoordinatorConfig {
    /// Checks what serde cannot: the version and the database URL.
    pub fn check(&self) -> Result<()> {
        if self.version != 1 {
            return Err(Error::Config(format!(
                "version {} is not known; this coordinator reads version 1",
                self.version
            )));
        }
        self.database()?;
        Ok(())
    }

    /// The database the jobs live in.
    pub fn database(&self) -> Result<Database> {
        Database::from_url(&self.database_url, &self.data_dir)
    }

    /// Where the env-sealing key is.
    pub fn env_key_path(&self) -> PathBuf {
        self.env_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ENV_KEY_FILE))
    }

    /// The configuration as `--print-config` shows it: the database password hidden.
    pub fn redacted(&self) -> Self {
        Self {
            database_url: redact_url(&self.database_url),
            ..self.clone()
        }
    }
}

/// `scheme://user:secret@host/...` becomes `scheme://user:***@host/...`; a
/// `password=` query parameter is hidden too.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(start) = out.find("password=") {
        let value_start = start + "password=".len();
        let value_end = out[value_start..]
            .find('&')
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..value_end, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn defaults_env_and_flags_layer() {
        let env = BTreeMap::from([
            (
                "DISPATCH_COORDINATOR_DATA_DIR".to_owned(),
                "/srv/coord".to_owned(),
            ),
            (
                "DISPATCH_COORDINATOR_INSECURE_NO_AUTH".to_owned(),
                "true".to_owned(),
            ),
            (
                "DISPATCH_COORDINATOR_CONFIG".to_owned(),
                "/etc/x.toml".to_owned(),
            ),
        ]);
        let overrides = [(
            "listen".to_owned(),
            toml::Value::String("127.0.0.1:0".into()),
        )];
        let config: CoordinatorConfig = dispatch_service::load(&dispatch_service::Layers {
            file: None,
            env: &env,
            env_prefix: "DISPATCH_COORDINATOR_",
            env_not_keys: &["CONFIG"],
            overrides: &overrides,
        })
        .expect("config");
        assert_eq!(config.data_dir, PathBuf::from("/srv/coord"));
        assert!(config.insecure_no_auth);
        assert_eq!(config.listen.port(), 0);
        assert_eq!(
            config.database().expect("db"),
            Database::Sqlite(PathBuf::from("/srv/coord/coordinator.db"))
        );
        assert_eq!(config.env_key_path(), PathBuf::from("/srv/coord/env.key"));
        config.check().expect("valid");

        let env = BTreeMap::from([(
            "DISPATCH_COORDINATOR_DATABSE_URL".to_owned(),
            "x".to_owned(),
        )]);
        let error = dispatch_service::load::<CoordinatorConfig>(&dispatch_service::Layers {
            file: None,
            env: &env,
            env_prefix: "DISPATCH_COORDINATOR_",
            env_not_keys: &[],
            overrides: &[],
        })
        .expect_err("misspelt key");
        assert!(error.to_string().contains("databse_url"), "{error}");
    }

    #[test]
    fn database_urls() {
        let dir = Path::new("/data");
        assert_eq!(
            Database::from_url("postgresql://u:p@h/db", dir).expect("pg"),
            Database::Postgres("postgresql://u:p@h/db".into())
        );
        assert_eq!(
            Database::from_url("sqlite:///var/x.db?mode=rwc", dir).expect("sqlite"),
            Database::Sqlite(PathBuf::from("/var/x.db"))
        );
        assert!(Database::from_url("sqlite::memory:", dir).is_err());
        let error = Database::from_url("mysql://u:hunter2@h/db", dir).expect_err("mysql");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let config = CoordinatorConfig {
            version: 2,
            ..CoordinatorConfig::default()
        };
        assert!(config.check().is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://dispatch:hunter2@db.example:5432/jobs?sslmode=require"),
            "postgres://dispatch:***@db.example:5432/jobs?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/jobs?user=u&password=hunter2&x=1"),
            "postgres://db/jobs?user=u&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://dispatch@db/jobs"),
            "postgres://dispatch@db/jobs"
        );
        assert_eq!(redact_url(""), "");
    }
}

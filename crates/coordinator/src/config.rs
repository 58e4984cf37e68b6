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
    /// How sites join, heartbeat, and are given up on.
    pub sites: SitesConfig,
    /// The hub broker sites stage through and clients upload to and download from, and
    /// the key its grants are signed with.
    pub hub_broker: HubBrokerConfig,
    /// How the scheduler places queued jobs.
    pub scheduler: SchedulerConfig,
    /// pfcon's REST API, for CUBE (off unless `pfcon.listen` is set).
    pub pfcon: crate::pfcon::PfconConfig,
}

/// What happens to the jobs of a site that stopped answering (missed its heartbeats
/// without saying goodbye).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossPolicy {
    /// Keep them as they are and mark nothing: the site is expected back (a partition, a
    /// maintenance), and reconciles them when it is.
    Wait,
    /// Put them back in the queue as a new attempt, to run elsewhere; if the site comes
    /// back it is told to remove the old attempt. A job the site was still running during
    /// a partition may then have run at two sites for a while, but never reports twice:
    /// the old attempt's reports are refused.
    Requeue,
    /// End them LOST (reason SITE_LOST).
    Fail,
}

/// The `[sites]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SitesConfig {
    /// Managers send a heartbeat this often, in seconds.
    pub heartbeat_seconds: u32,
    /// A site is marked unreachable after this many heartbeat intervals without a word.
    pub unreachable_after_heartbeats: u32,
    /// What happens to an unreachable site's jobs.
    pub loss_policy: LossPolicy,
    /// How long a join token stays usable when its creator says nothing, in seconds.
    pub join_token_ttl_seconds: u32,
    /// A site must send a first report on a lease (or decline it) within this many
    /// seconds, or the job is taken back and placed again.
    pub lease_seconds: u32,
    /// Managers resend a status report not acknowledged after this many seconds.
    pub status_resend_seconds: u32,
    /// Largest log chunk a site sends in one message.
    pub max_log_chunk_bytes: u32,
}

impl Default for SitesConfig {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 10,
            unreachable_after_heartbeats: 3,
            loss_policy: LossPolicy::Requeue,
            join_token_ttl_seconds: 3600,
            lease_seconds: 60,
            status_resend_seconds: 30,
            max_log_chunk_bytes: 64 * 1024,
        }
    }
}

impl SitesConfig {
    /// How long a site may stay silent before it is unreachable.
    pub fn unreachable_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            u64::from(self.heartbeat_seconds) * u64::from(self.unreachable_after_heartbeats),
        )
    }
}

/// How bytes travel between the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireCompression {
    /// As they are (loopback, fast networks).
    None,
    /// Gzip per chunk (slow links).
    Gzip,
}

/// How a site broker moves a job's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageMethod {
    /// Link when the site shares the hub's filesystem, else transfer.
    Auto,
    /// Always link (the site must share the hub's filesystem).
    Link,
    /// Always over the wire.
    Transfer,
}

/// The `[hub_broker]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubBrokerConfig {
    /// The hub broker as sites and clients dial it, e.g. `http://hub.example.org:7443`;
    /// empty: no hub broker (jobs are sent without a staging plan, and uploads and
    /// outputs are refused).
    pub uri: String,
    /// PEM of the CA that signs the hub broker's certificate, handed to sites.
    pub ca_pem_file: Option<PathBuf>,
    /// Server name in the hub broker's certificate when it differs from the URI's host.
    pub tls_server_name: String,
    /// The secret shared with the hub broker, which grants are signed with (required
    /// with `uri`).
    pub grant_key_file: Option<PathBuf>,
    /// How long a grant works, in seconds; sites ask for fresh ones when theirs run out.
    pub grant_ttl_seconds: u32,
    /// How long an upload reservation waits to be used by a submission, in seconds.
    pub upload_ttl_seconds: u32,
    /// Compression between the brokers.
    pub compression: WireCompression,
    /// How site brokers move data.
    pub stage_method: StageMethod,
}

impl Default for HubBrokerConfig {
    fn default() -> Self {
        Self {
            uri: String::new(),
            ca_pem_file: None,
            tls_server_name: String::new(),
            grant_key_file: None,
            grant_ttl_seconds: 3600,
            upload_ttl_seconds: 24 * 3600,
            compression: WireCompression::None,
            stage_method: StageMethod::Auto,
        }
    }
}

/// The `[scheduler]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Placements committed in one transaction.
    pub batch: u32,
    /// Queued jobs looked at in one round, at most (those that fit nowhere are passed
    /// over, so a large queue cannot hide the jobs that do fit).
    pub scan_limit: u32,
    /// A round runs at least this often even when nothing nudges the scheduler, in
    /// milliseconds.
    pub interval_millis: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            batch: 256,
            scan_limit: 5000,
            interval_millis: 1000,
        }
    }
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
            sites: SitesConfig::default(),
            hub_broker: HubBrokerConfig::default(),
            scheduler: SchedulerConfig::default(),
            pfcon: crate::pfcon::PfconConfig::default(),
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
        let sites = &self.sites;
        if sites.heartbeat_seconds == 0 || sites.unreachable_after_heartbeats < 2 {
            return Err(Error::Config(
                "sites: heartbeat_seconds must be at least 1 and unreachable_after_heartbeats at least 2"
                    .into(),
            ));
        }
        if sites.lease_seconds == 0 || sites.join_token_ttl_seconds == 0 {
            return Err(Error::Config(
                "sites: lease_seconds and join_token_ttl_seconds must be at least 1".into(),
            ));
        }
        let broker = &self.hub_broker;
        if !broker.uri.is_empty() && broker.grant_key_file.is_none() {
            return Err(Error::Config(
                "hub_broker.grant_key_file is required with hub_broker.uri: the coordinator signs the grants sites and clients present to the hub broker".into(),
            ));
        }
        if broker.grant_ttl_seconds < 60 || broker.upload_ttl_seconds < 60 {
            return Err(Error::Config(
                "hub_broker: grant_ttl_seconds and upload_ttl_seconds must be at least 60".into(),
            ));
        }
        self.pfcon.check()?;
        if self.pfcon.is_enabled() && broker.uri.is_empty() {
            return Err(Error::Config(
                "pfcon.listen needs a hub broker (hub_broker.uri): CUBE's inputs and outputs pass through its store".into(),
            ));
        }
        if self.scheduler.batch == 0 || self.scheduler.scan_limit == 0 {
            return Err(Error::Config(
                "scheduler: batch and scan_limit must be at least 1".into(),
            ));
        }
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
            pfcon: self.pfcon.redacted(),
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

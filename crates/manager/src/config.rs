//! The manager's configuration: defaults, then a TOML file, then `DISPATCH_MANAGER_*`
//! environment variables (pfcon's names too: `CONTAINER_USER`, `JOB_LABELS`, ...), then
//! flags. Backend-specific settings live in a table named after the backend (`[docker]`,
//! `[local]`, `[slurm]`, `[swarm]`, `[kubernetes]`), handed as is to that backend, which
//! checks them itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the manager can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerConfig {
    /// Version of this file's format; only 1 exists.
    pub version: u32,
    /// Address of the manager's own gRPC API.
    pub listen: SocketAddr,
    /// This replica's id: labels everything it creates, so it must be stable across
    /// restarts and unique among the replicas sharing one engine.
    pub manager_id: String,
    /// The compute backend: docker, podman, swarm, kubernetes, openshift, slurm or local.
    pub backend: String,
    /// The site's storeBase: each job runs on `key-<job_id>/incoming` and `outgoing`.
    pub store_root: PathBuf,
    /// Where the manager keeps what the engine cannot hold (cancellations).
    pub state_dir: PathBuf,
    /// File holding the bearer token API clients must present.
    pub token_file: Option<PathBuf>,
    /// Serve the API without a token (a private manager on loopback).
    pub insecure_no_auth: bool,
    /// pfcon's `CONTAINER_USER`: `uid:gid`, either part a number or a range `lo-hi`
    /// picked at random per job; empty: the image's user.
    pub container_user: String,
    /// pfcon's `ENABLE_HOME_WORKAROUND`: add `HOME=/tmp` for plugins that need a
    /// writable home under an arbitrary uid.
    pub enable_home_workaround: bool,
    /// pfcon's `JOB_LABELS`: extra labels on everything created.
    pub job_labels: BTreeMap<String, String>,
    /// Longest a job may run when its spec sets no limit, in seconds; 0: no default limit.
    pub default_time_limit_seconds: u64,
    /// Seconds the API gets to finish calls after SIGTERM (jobs keep running).
    pub shutdown_grace_seconds: u64,
    /// Log JSON lines instead of text.
    pub log_json: bool,
    /// Settings of the docker backend (see that crate).
    pub docker: toml::Table,
    /// Settings of the local backend (see that crate).
    pub local: toml::Table,
    /// Settings of the slurm backend (see that crate); `--slurm-config` can supply them
    /// from a file of their own instead.
    pub slurm: toml::Table,
    /// Settings of the swarm backend (see that crate).
    pub swarm: toml::Table,
    /// Settings of the kubernetes backend, used for `openshift` too (see that crate).
    pub kubernetes: toml::Table,
    /// How this manager joins a hub (the coordinator) and stages through its site
    /// broker; off while `hub.coordinator_uri` is empty.
    pub hub: HubConfig,
}

/// The `[hub]` table: the site session the manager opens to the coordinator.
///
/// Secrets (the join token, the site credential, the site broker's grant) are read from
/// files, never given inline, so they appear neither in `--print-config` nor in logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// The coordinator's `SiteRegistry`, e.g. `http://hub.example.org:7440`; empty: the
    /// manager serves only its own API and joins no hub.
    pub coordinator_uri: String,
    /// File holding the one-time join token, read only while the site has no credential.
    pub join_token_file: Option<PathBuf>,
    /// Where the site credential is kept once the hub has issued it (mode 0600); unset:
    /// `<state_dir>/site-credential.json`.
    pub credential_file: Option<PathBuf>,
    /// Name suggested to the hub when joining; empty: the manager id.
    pub site_name: String,
    /// The site broker that fronts `store_root` and stages jobs' data with the hub broker;
    /// empty: this site takes only jobs that need no staging.
    pub site_broker_uri: String,
    /// File holding the grant the manager presents to its site broker (it must allow
    /// writing `key-*` areas and reading outputs).
    pub site_broker_grant_file: Option<PathBuf>,
    /// Labels advertised to the hub, matched by jobs' `placement.site_labels`.
    pub site_labels: BTreeMap<String, String>,
    /// Jobs from the hub this manager runs at once; 0: bounded by resources only.
    pub max_concurrent_jobs: u32,
    /// Heartbeat interval used until the hub sends its own, in seconds.
    pub heartbeat_seconds: u32,
    /// Longest wait between reconnects, in seconds (the wait doubles from
    /// `reconnect_initial_millis`, with jitter, up to this).
    pub reconnect_max_seconds: u32,
    /// First wait before reconnecting after a dropped session, in milliseconds.
    pub reconnect_initial_millis: u64,
    /// How often a running job's state is looked at, in milliseconds.
    pub job_poll_millis: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            coordinator_uri: String::new(),
            join_token_file: None,
            credential_file: None,
            site_name: String::new(),
            site_broker_uri: String::new(),
            site_broker_grant_file: None,
            site_labels: BTreeMap::new(),
            max_concurrent_jobs: 0,
            heartbeat_seconds: 10,
            reconnect_max_seconds: 30,
            reconnect_initial_millis: 500,
            job_poll_millis: 500,
        }
    }
}

impl HubConfig {
    /// True when a coordinator is configured.
    pub fn is_enabled(&self) -> bool {
        !self.coordinator_uri.trim().is_empty()
    }
}

impl ManagerConfig {
    /// Where the site credential lives: `hub.credential_file`, else in the state dir.
    pub fn credential_file(&self) -> PathBuf {
        self.hub
            .credential_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("site-credential.json"))
    }
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            version: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            manager_id: "manager-1".into(),
            backend: "docker".into(),
            store_root: PathBuf::from("/var/local/storeBase"),
            state_dir: PathBuf::from("/var/lib/dispatch-manager"),
            token_file: None,
            insecure_no_auth: false,
            container_user: String::new(),
            enable_home_workaround: false,
            job_labels: BTreeMap::new(),
            default_time_limit_seconds: 0,
            shutdown_grace_seconds: 30,
            log_json: false,
            docker: toml::Table::new(),
            local: toml::Table::new(),
            slurm: toml::Table::new(),
            swarm: toml::Table::new(),
            kubernetes: toml::Table::new(),
            hub: HubConfig::default(),
        }
    }
}

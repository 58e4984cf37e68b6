//! The manager's configuration: defaults, then a TOML file, then `DISPATCH_MANAGER_*`
//! environment variables (pfcon's names too: `CONTAINER_USER`, `JOB_LABELS`, ...), then
//! flags. Backend-specific settings live in a table named after the backend
//! (`[docker]`, `[local]`), handed as is to that backend, which checks them itself.

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
    /// The compute backend: docker, podman, local (swarm, kubernetes, slurm later).
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
        }
    }
}

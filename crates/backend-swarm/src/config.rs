//! The `[swarm]` table of the manager's configuration.

use dispatch_backend_docker::PullPolicy;
use serde::{Deserialize, Serialize};

/// The network name that means "no network": jobs go on [`ISOLATED_NETWORK`].
pub const NO_NETWORK: &str = "none";
/// The internal (no outside access) swarm-scoped bridge network this backend creates and
/// attaches jobs to when [`SwarmConfig::network`] is `none`: Swarm cannot attach a
/// service to the engine's `none` network.
pub const ISOLATED_NETWORK: &str = "chris-dispatch-isolated";

/// Settings of the swarm backend, read from the manager's `[swarm]` table.
///
/// ```toml
/// [swarm]
/// host = "unix:///var/run/docker.sock"
/// network = "none"
/// pull_policy = "never"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmConfig {
    /// The address of a swarm **manager** node's engine: `unix:///var/run/docker.sock`,
    /// `tcp://host:2375` or `http://host:2375`. `None`: the `DOCKER_HOST` environment
    /// variable, else Docker's local socket. Killing a job and removing its containers
    /// is done through this engine, so it should also be where the jobs run (a one-node
    /// swarm, or the manager node of a small one; see the crate's docs).
    pub host: Option<String>,
    /// Network the jobs' tasks are attached to. `none` (default): the internal bridge
    /// network [`ISOLATED_NETWORK`], created on connect if missing, which has no route
    /// out (jobs on one node can reach each other on it, unlike the docker backend's
    /// `none`). Any other value names an existing network a swarm service may use
    /// (`bridge`, `host`, an overlay network); empty: no attachment, the engine's
    /// default bridge.
    pub network: String,
    /// When to pull a job's image on the engine at `host` before the service is made.
    /// An image already there is used as it is, without asking any registry (the
    /// service's image is never resolved to a digest). Other nodes pull for themselves.
    pub pull_policy: PullPolicy,
    /// Longest a pull may take before the job fails with "image not found", in seconds.
    pub pull_timeout_seconds: u64,
    /// Set no CPU or memory limits or reservations (pfcon's `IGNORE_LIMITS`).
    pub ignore_limits: bool,
    /// Also reserve the job's CPU and memory (the swarm scheduler then places a task only
    /// on a node with that much unreserved, and a job that fits nowhere stays QUEUED,
    /// saying why). False: limits only, as pfcon does.
    pub reserve_resources: bool,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            host: None,
            network: NO_NETWORK.into(),
            pull_policy: PullPolicy::IfNotPresent,
            pull_timeout_seconds: 60,
            ignore_limits: false,
            reserve_resources: true,
        }
    }
}

impl SwarmConfig {
    /// Reads the manager's `[swarm]` table; unknown keys are refused.
    pub fn from_table(table: toml::Table) -> Result<Self, toml::de::Error> {
        table.try_into()
    }

    /// The engine address to use: the configured one, else `DOCKER_HOST` as `env` gives
    /// it (injected, so tests need not touch the process environment), else Docker's
    /// local socket.
    pub fn resolve_host(&self, env: impl Fn(&str) -> Option<String>) -> String {
        dispatch_backend_docker::resolve_host(self.host.as_deref(), env)
    }

    /// The network to attach job tasks to, if any.
    pub(crate) fn job_network(&self) -> Option<&str> {
        match self.network.as_str() {
            "" => None,
            NO_NETWORK => Some(ISOLATED_NETWORK),
            name => Some(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_empty_table() {
        let config = SwarmConfig::from_table(toml::Table::new()).unwrap();
        assert_eq!(config, SwarmConfig::default());
        assert_eq!(config.job_network(), Some(ISOLATED_NETWORK));
        assert!(config.reserve_resources);
        assert_eq!(config.pull_policy, PullPolicy::IfNotPresent);
    }

    #[test]
    fn reads_every_field() {
        let table: toml::Table = toml::from_str(
            r#"
            host = "tcp://10.0.0.1:2375"
            network = "jobs"
            pull_policy = "never"
            pull_timeout_seconds = 5
            ignore_limits = true
            reserve_resources = false
            "#,
        )
        .unwrap();
        let config = SwarmConfig::from_table(table).unwrap();
        assert_eq!(
            config,
            SwarmConfig {
                host: Some("tcp://10.0.0.1:2375".into()),
                network: "jobs".into(),
                pull_policy: PullPolicy::Never,
                pull_timeout_seconds: 5,
                ignore_limits: true,
                reserve_resources: false,
            }
        );
        assert_eq!(config.job_network(), Some("jobs"));
        let default_bridge = SwarmConfig {
            network: String::new(),
            ..SwarmConfig::default()
        };
        assert_eq!(default_bridge.job_network(), None);
    }

    #[test]
    fn refuses_unknown_keys() {
        let unknown: toml::Table = toml::from_str("replicas = 2").unwrap();
        let error = SwarmConfig::from_table(unknown).unwrap_err().to_string();
        assert!(error.contains("replicas"), "{error}");
    }

    #[test]
    fn host_comes_from_config_then_environment_then_default() {
        let env = |key: &str| (key == "DOCKER_HOST").then(|| "tcp://10.0.0.1:2375".to_owned());
        let configured = SwarmConfig {
            host: Some("unix:///tmp/d.sock".into()),
            ..SwarmConfig::default()
        };
        assert_eq!(configured.resolve_host(env), "unix:///tmp/d.sock");
        assert_eq!(
            SwarmConfig::default().resolve_host(env),
            "tcp://10.0.0.1:2375"
        );
        assert_eq!(
            SwarmConfig::default().resolve_host(|_| None),
            dispatch_backend_docker::DEFAULT_HOST
        );
    }
}

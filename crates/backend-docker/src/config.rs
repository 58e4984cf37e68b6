//! The `[docker]` table of the manager's configuration.

use serde::{Deserialize, Serialize};

/// Docker's own local socket, used when neither the config nor `DOCKER_HOST` names one.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Settings of the docker backend, read from the manager's `[docker]` table.
///
/// ```toml
/// [docker]
/// host = "unix:///run/podman/podman.sock"
/// kind = "podman"
/// pull_policy = "never"
/// ignore_limits = true
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine's address: `unix:///var/run/docker.sock`, `tcp://host:2375` or
    /// `http://host:2375`. A Podman engine is reached through its Docker-compatible socket
    /// (`podman system service`), e.g. `unix:///run/podman/podman.sock`. `None`: the
    /// `DOCKER_HOST` environment variable, else [`DEFAULT_HOST`].
    pub host: Option<String>,
    /// Which engine answers on `host`; reported in the capabilities, and Podman needs one
    /// more workaround (see [`EngineKind::Podman`]).
    pub kind: EngineKind,
    /// When to pull a job's image.
    pub pull_policy: PullPolicy,
    /// Longest a pull may take before the job fails with "image not found", in seconds.
    pub pull_timeout_seconds: u64,
    /// pfcon's `IGNORE_LIMITS`: set no CPU or memory limit (GPUs are still requested).
    /// For rootless engines without cgroup delegation, which refuse limits.
    pub ignore_limits: bool,
    /// pfcon's `SHM_SIZE`: size of the job's `/dev/shm`, in MiB; `None`: the engine's
    /// default (64 MiB on Docker).
    pub shm_size_mib: Option<u64>,
    /// Network mode of job containers. Default `none`: a ChRIS plugin reads
    /// `/share/incoming` and writes `/share/outgoing`, and needs no network for that, so by
    /// default a job can neither reach the site's internal services nor send data out.
    /// Sites whose plugins fetch things (models, reference data) set `bridge` or a named
    /// network. (pfcon leaves plugin containers on the engine's default bridge.)
    pub network: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: None,
            kind: EngineKind::Docker,
            pull_policy: PullPolicy::IfNotPresent,
            pull_timeout_seconds: 60,
            ignore_limits: false,
            shm_size_mib: None,
            network: "none".into(),
        }
    }
}

impl DockerConfig {
    /// Reads the manager's `[docker]` table; unknown keys are refused.
    pub fn from_table(table: toml::Table) -> Result<Self, toml::de::Error> {
        table.try_into()
    }

    /// The engine address to use: the configured one, else `DOCKER_HOST` as `env` gives
    /// it (injected, so tests need not touch the process environment), else
    /// [`DEFAULT_HOST`].
    pub fn resolve_host(&self, env: impl Fn(&str) -> Option<String>) -> String {
        resolve_host(self.host.as_deref(), env)
    }
}

/// The engine address to use: `configured`, else `DOCKER_HOST` as `env` gives it, else
/// [`DEFAULT_HOST`]; shared by every backend that talks to a Docker API.
pub fn resolve_host(configured: Option<&str>, env: impl Fn(&str) -> Option<String>) -> String {
    configured
        .map(str::to_owned)
        .or_else(|| env("DOCKER_HOST").filter(|host| !host.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_HOST.to_owned())
}

/// The engine behind the Docker API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Docker Engine.
    #[default]
    Docker,
    /// Podman through its Docker-compatible socket. Its default ulimits may exceed what
    /// a host without `CAP_SYS_RESOURCE` allows, so jobs get an explicit `nproc` limit
    /// too. (Podman never sets `State.OOMKilled`; dockerd misses it now and then too, so
    /// on either engine an exit code of 137 under a memory limit, without a kill by this
    /// backend, is read as an out-of-memory kill.)
    Podman,
}

/// When to pull a job's image from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Never: the image must already be in the engine.
    Never,
    /// Only when the engine does not have it.
    #[default]
    IfNotPresent,
    /// Before every job, so a moving tag (`latest`) is always fresh; a failed pull fails
    /// the job even if an older copy is present.
    Always,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_empty_table() {
        let config = DockerConfig::from_table(toml::Table::new()).unwrap();
        assert_eq!(config, DockerConfig::default());
        assert_eq!(config.network, "none");
        assert_eq!(config.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(config.pull_timeout_seconds, 60);
    }

    #[test]
    fn reads_every_field() {
        let table: toml::Table = toml::from_str(
            r#"
            host = "unix:///run/podman/podman.sock"
            kind = "podman"
            pull_policy = "never"
            pull_timeout_seconds = 5
            ignore_limits = true
            shm_size_mib = 256
            network = "bridge"
            "#,
        )
        .unwrap();
        let config = DockerConfig::from_table(table).unwrap();
        assert_eq!(
            config,
            DockerConfig {
                host: Some("unix:///run/podman/podman.sock".into()),
                kind: EngineKind::Podman,
                pull_policy: PullPolicy::Never,
                pull_timeout_seconds: 5,
                ignore_limits: true,
                shm_size_mib: Some(256),
                network: "bridge".into(),
            }
        );
    }

    #[test]
    fn refuses_unknown_keys_and_values() {
        let unknown: toml::Table = toml::from_str("hots = 'x'").unwrap();
        let error = DockerConfig::from_table(unknown).unwrap_err().to_string();
        assert!(error.contains("hots"), "{error}");
        let bad_policy: toml::Table = toml::from_str("pull_policy = 'sometimes'").unwrap();
        assert!(DockerConfig::from_table(bad_policy).is_err());
    }

    #[test]
    fn host_comes_from_config_then_environment_then_default() {
        let env = |key: &str| (key == "DOCKER_HOST").then(|| "tcp://10.0.0.1:2375".to_owned());
        let no_env = |_: &str| None;
        let configured = DockerConfig {
            host: Some("unix:///tmp/d.sock".into()),
            ..DockerConfig::default()
        };
        assert_eq!(configured.resolve_host(env), "unix:///tmp/d.sock");
        assert_eq!(
            DockerConfig::default().resolve_host(env),
            "tcp://10.0.0.1:2375"
        );
        assert_eq!(DockerConfig::default().resolve_host(no_env), DEFAULT_HOST);
    }
}

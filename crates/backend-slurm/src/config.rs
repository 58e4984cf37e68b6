//! The `[slurm]` settings of the manager.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dispatch_manager::BackendError;

/// How the batch script runs the plugin on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// `docker run`: the container lives under the node's Docker daemon, outside the Slurm
    /// job's cgroup, so the job's CPU and memory limits are also given to Docker.
    #[default]
    Docker,
    /// `podman run`, as Docker (Podman never flags an OOM kill: an exit code of 137 under
    /// the memory limit, the job not cancelled, is read as one).
    Podman,
    /// `apptainer exec` on the image (a `.sif` path, or `docker://...`, see
    /// [`SlurmConfig::apptainer_image_prefix`]); it runs inside the job's cgroup, where
    /// Slurm enforces the limits.
    Apptainer,
    /// `singularity exec`, as Apptainer.
    Singularity,
    /// No container: the command runs directly on the node, with the node's programs, the
    /// image ignored, `/share/incoming` and `/share/outgoing` in arguments rewritten to the
    /// job's directories. For trusted plugins installed on the nodes.
    None,
}

impl Runtime {
    /// The runtime's program, unless configured otherwise.
    pub fn default_program(self) -> Option<&'static str> {
        match self {
            Runtime::Docker => Some("docker"),
            Runtime::Podman => Some("podman"),
            Runtime::Apptainer => Some("apptainer"),
            Runtime::Singularity => Some("singularity"),
            Runtime::None => None,
        }
    }

    /// True for runtimes whose containers a daemon runs outside the job's cgroup.
    pub fn is_daemon(self) -> bool {
        matches!(self, Runtime::Docker | Runtime::Podman)
    }

    /// The name in configuration and messages.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Apptainer => "apptainer",
            Runtime::Singularity => "singularity",
            Runtime::None => "none",
        }
    }
}

/// Settings of the Slurm backend, read from the manager's `[slurm]` table.
///
/// ```toml
/// [slurm]
/// job_dir = "/scratch/chris/dispatch-jobs"   # shared with the compute nodes
/// runtime = "apptainer"
/// partition = "short"
/// account = "chris"
/// extra_sbatch_args = ["--constraint=avx2"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// Where each job's batch script, output and exit code live (`<job_dir>/<job-id>/`).
    /// It must be on a file system the compute nodes share (they write the output there)
    /// and stable across restarts. `None`: `<state_dir>/slurm`.
    pub job_dir: Option<PathBuf>,
    /// The `slurm.conf` the tools read (sets `SLURM_CONF` for them); `None`: the tools'
    /// own default (`SLURM_CONF` of the manager's environment, else `/etc/slurm`).
    pub slurm_conf: Option<PathBuf>,
    /// Directory holding `sbatch`, `squeue`, `scontrol`, `scancel`, `sinfo` (and `sacct`);
    /// `None`: found on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// How the plugin runs on the node.
    pub runtime: Runtime,
    /// The runtime's program (a name on the node's `PATH` or a path); `None`: `docker`,
    /// `podman`, `apptainer` or `singularity`.
    pub runtime_program: Option<String>,
    /// Extra arguments to the runtime's `run`/`exec`, before the image.
    pub runtime_args: Vec<String>,
    /// Network of Docker and Podman containers (`none`: no network, as the docker
    /// backend's default).
    pub network: String,
    /// What Apptainer/Singularity put before an image that is not a path (`docker://`).
    pub apptainer_image_prefix: String,
    /// Check at submit, on this host, that the image exists (`docker image inspect`; an
    /// Apptainer image given as a path must exist): a job whose image is missing is then
    /// refused at once instead of failing on the node. Turn off where this host cannot
    /// see the nodes' images.
    pub check_image: bool,
    /// MiB added to the Slurm job's `--mem` for the runtime's own client (the `docker run`
    /// process lives in the job's cgroup while its container does not); `None`: 64 for
    /// Docker and Podman, 0 otherwise.
    pub runtime_memory_overhead_mib: Option<u64>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// More `sbatch` arguments, each one word (`--constraint=avx2`, `--reservation=x`).
    pub extra_sbatch_args: Vec<String>,
    /// Ask `sacct` about jobs that `squeue` and `scontrol` no longer know (they forget a
    /// job `MinJobAge` seconds after it ended); needs Slurm's accounting (slurmdbd).
    pub use_sacct: bool,
    /// Longest any one Slurm command may take, in seconds.
    pub command_timeout_seconds: u64,
    /// How often `squeue` may be asked about this manager's jobs, in milliseconds: every
    /// status call in that interval shares one answer, so slurmctld sees one query per
    /// interval however many jobs and callers there are.
    pub query_interval_millis: u64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            job_dir: None,
            slurm_conf: None,
            bin_dir: None,
            runtime: Runtime::Docker,
            runtime_program: None,
            runtime_args: Vec::new(),
            network: "none".into(),
            apptainer_image_prefix: "docker://".into(),
            check_image: true,
            runtime_memory_overhead_mib: None,
            partition: None,
            account: None,
            qos: None,
            extra_sbatch_args: Vec::new(),
            use_sacct: false,
            command_timeout_seconds: 30,
            query_interval_millis: 500,
        }
    }
}

impl SlurmConfig {
    /// Reads the manager's `[slurm]` table; unknown keys are refused. `default_job_dir`
    /// applies when the table names none.
    pub fn from_table(table: toml::Table, default_job_dir: &Path) -> Result<Self, BackendError> {
        let mut config: Self = table
            .try_into()
            .map_err(|e| BackendError::Engine(format!("invalid [slurm] configuration: {e}")))?;
        if config.job_dir.is_none() {
            config.job_dir = Some(default_job_dir.to_owned());
        }
        Ok(config)
    }

    /// The runtime's program.
    pub fn runtime_program(&self) -> Option<String> {
        self.runtime_program
            .clone()
            .or_else(|| self.runtime.default_program().map(str::to_owned))
    }

    /// MiB added to `--mem` for the runtime's client.
    pub fn memory_overhead_mib(&self) -> u64 {
        self.runtime_memory_overhead_mib
            .unwrap_or(if self.runtime.is_daemon() { 64 } else { 0 })
    }

    /// A Slurm tool, from `bin_dir` or `PATH`.
    pub fn tool(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// Checks what serde cannot: names that end up on command lines.
    pub fn check(&self) -> Result<(), BackendError> {
        let word = |field: &'static str, value: &Option<String>| match value {
            Some(v) if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == ',') => {
                Err(BackendError::Unsupported {
                    field,
                    reason: format!("`{v}` must be one word without commas"),
                })
            }
            _ => Ok(()),
        };
        word("slurm.partition", &self.partition)?;
        word("slurm.account", &self.account)?;
        word("slurm.qos", &self.qos)?;
        if let Some(bad) = self
            .extra_sbatch_args
            .iter()
            .find(|arg| !arg.starts_with('-'))
        {
            return Err(BackendError::Unsupported {
                field: "slurm.extra_sbatch_args",
                reason: format!(
                    "`{bad}` is not an option: give each option as one word, e.g. \
                     \"--constraint=avx2\""
                ),
            });
        }
        if self.command_timeout_seconds == 0 {
            return Err(BackendError::Unsupported {
                field: "slurm.command_timeout_seconds",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_gives_the_defaults_and_the_default_job_dir() {
        let config = SlurmConfig::from_table(toml::Table::new(), Path::new("/s/slurm")).unwrap();
        assert_eq!(config.job_dir.as_deref(), Some(Path::new("/s/slurm")));
        assert_eq!(config.runtime, Runtime::Docker);
        assert_eq!(config.memory_overhead_mib(), 64);
        assert_eq!(config.runtime_program().as_deref(), Some("docker"));
        assert_eq!(config.tool("sbatch"), PathBuf::from("sbatch"));
        config.check().unwrap();
    }

    #[test]
    fn reads_every_field_and_refuses_unknown_ones() {
        let table: toml::Table = toml::from_str(
            r#"
            job_dir = "/scratch/jobs"
            slurm_conf = "/etc/slurm-test/slurm.conf"
            bin_dir = "/opt/slurm/bin"
            runtime = "apptainer"
            runtime_program = "/opt/apptainer/bin/apptainer"
            runtime_args = ["--writable-tmpfs"]
            partition = "short"
            account = "chris"
            qos = "normal"
            extra_sbatch_args = ["--constraint=avx2"]
            use_sacct = true
            check_image = false
            "#,
        )
        .unwrap();
        let config = SlurmConfig::from_table(table, Path::new("/unused")).unwrap();
        assert_eq!(config.job_dir.as_deref(), Some(Path::new("/scratch/jobs")));
        assert_eq!(config.runtime, Runtime::Apptainer);
        assert_eq!(config.memory_overhead_mib(), 0);
        assert_eq!(
            config.tool("squeue"),
            PathBuf::from("/opt/slurm/bin/squeue")
        );
        config.check().unwrap();
        let unknown: toml::Table = toml::from_str("partiton = 'x'").unwrap();
        let error = SlurmConfig::from_table(unknown, Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("partiton"), "{error}");
    }

    #[test]
    fn names_on_command_lines_are_checked() {
        let config = SlurmConfig {
            partition: Some("a b".into()),
            ..SlurmConfig::default()
        };
        assert!(config.check().is_err());
        let config = SlurmConfig {
            extra_sbatch_args: vec!["avx2".into()],
            ..SlurmConfig::default()
        };
        let error = config.check().unwrap_err().to_string();
        assert!(error.contains("extra_sbatch_args"), "{error}");
    }
}

//! What the Slurm backend's tests share: the cluster `scripts/setup-slurm.sh` started
//! (found through `SLURM_CONF`: without it the tests fail, never skip), and the engine's
//! own account of a job, read with Slurm's and Docker's command-line tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use dispatch_backend_slurm::{Runtime, SlurmBackend, SlurmConfig};

/// The test cluster's `slurm.conf`, from `SLURM_CONF`.
pub fn slurm_conf() -> Result<PathBuf> {
    let Some(conf) = std::env::var_os("SLURM_CONF").filter(|v| !v.is_empty()) else {
        bail!(
            "SLURM_CONF is not set: these tests need the one-node Slurm cluster of \
             scripts/setup-slurm.sh; run `eval \"$(scripts/setup-slurm.sh)\"` first \
             (scripts/test.sh does)"
        );
    };
    let conf = PathBuf::from(conf);
    ensure!(
        conf.is_file(),
        "SLURM_CONF names {}, which is no file",
        conf.display()
    );
    Ok(conf)
}

/// Settings for a backend on the test cluster with `runtime`, its jobs under `job_dir`.
pub fn config(runtime: Runtime, job_dir: &Path) -> Result<SlurmConfig> {
    Ok(SlurmConfig {
        job_dir: Some(job_dir.to_owned()),
        slurm_conf: Some(slurm_conf()?),
        runtime,
        ..SlurmConfig::default()
    })
}

/// Opens a backend.
pub fn open(manager_id: &str, config: SlurmConfig) -> Result<SlurmBackend> {
    Ok(SlurmBackend::open(manager_id, config)?)
}

/// Runs a Slurm tool on the test cluster and returns its stdout.
pub fn slurm(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .env("SLURM_CONF", slurm_conf()?)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Slurm jobs of `manager_id` for `job_id` that have not ended (`id state` each).
pub fn active_slurm_jobs(manager_id: &str, job_id: &str) -> Result<Vec<String>> {
    let comment = format!("chris-dispatch:{manager_id}:{job_id}");
    let listed = slurm("squeue", &["--noheader", "--format=%i|%T|%k"])?;
    Ok(listed
        .lines()
        .filter(|line| line.ends_with(&format!("|{comment}")))
        .map(str::to_owned)
        .collect())
}

/// `scontrol show job` as key=value pairs (first occurrence of each key).
pub fn scontrol_job(slurm_id: &str) -> Result<std::collections::HashMap<String, String>> {
    let text = slurm("scontrol", &["--oneliner", "show", "job", slurm_id])?;
    let mut pairs = std::collections::HashMap::new();
    for word in text.split_whitespace() {
        if let Some((key, value)) = word.split_once('=') {
            pairs
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
    }
    Ok(pairs)
}

/// Runs the docker CLI and returns its stdout.
pub fn docker(args: &[&str]) -> Result<String> {
    dispatch_testkit::engine_cli::run(dispatch_testkit::images::Engine::Docker, args)
}

/// A partition of its own on the test node in which at most `cpus` CPUs are used at once,
/// so that a job can be held pending for resources whatever other tests run; deleted on
/// drop.
pub struct Partition {
    pub name: String,
}

impl Partition {
    pub fn create(cpus: u32) -> Result<Self> {
        let name = format!(
            "dispatch-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        slurm(
            "scontrol",
            &[
                "create",
                &format!("PartitionName={name}"),
                "Nodes=localhost",
                &format!("MaxCPUsPerNode={cpus}"),
                "State=UP",
            ],
        )
        .context("creating a test partition (the tests run as root, as scontrol create needs)")?;
        Ok(Self { name })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let name = format!("PartitionName={}", self.name);
        if let Err(error) = slurm("scontrol", &["delete", &name]) {
            eprintln!("cannot delete test partition {}: {error:#}", self.name);
        }
    }
}

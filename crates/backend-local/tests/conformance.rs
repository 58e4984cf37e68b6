//! The local backend passes the backend conformance suite with plain processes (limits
//! through cgroups, which this machine gives to root).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use dispatch_backend_local::{LocalBackend, LocalConfig};
use dispatch_manager::ManagerConfig;
use dispatch_testkit::TestDir;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::plugin_host_path;

/// The uid:gid jobs run as: not the manager's, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);

struct LocalHarness {
    _dir: TestDir,
    config: ManagerConfig,
}

impl LocalHarness {
    async fn new() -> Result<Self> {
        let dir = TestDir::new("conformance-local")?;
        let mut config = conformance::base_config("local", dir.path())?;
        config.container_user = format!("{}:{}", USER.0, USER.1);
        Ok(Self { _dir: dir, config })
    }

    fn job_dir(&self, job_id: &str) -> PathBuf {
        self.config.state_dir.join("local").join(job_id)
    }

    /// The job's record as the backend wrote it: the engine's own account here.
    fn record(&self, job_id: &str) -> Result<serde_json::Value> {
        let path = self.job_dir(job_id).join("state.json");
        let text =
            std::fs::read(&path).with_context(|| format!("no record at {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    fn cgroups(&self, job_id: &str) -> Result<Vec<PathBuf>> {
        let record = self.record(job_id)?;
        let cgroups = record["cgroups"]
            .as_array()
            .context("no cgroups in the record")?;
        Ok(cgroups
            .iter()
            .filter_map(|c| c.as_str())
            .map(PathBuf::from)
            .collect())
    }
}

fn read_number(path: &Path) -> Result<i64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .split_whitespace()
        .next()
        .context("empty file")?
        .parse()?)
}

#[async_trait::async_trait]
impl Harness for LocalHarness {
    fn name(&self) -> &str {
        "local"
    }

    fn image(&self) -> String {
        "ignored/by-the-local-backend:1".into()
    }

    fn plugin(&self, name: &str) -> Vec<String> {
        let script = plugin_host_path(name)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        vec!["/bin/sh".into(), script]
    }

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let settings = LocalConfig::new(self.config.state_dir.join("local"));
        let backend = LocalBackend::open(&self.config.manager_id, settings)?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        let mut observed = ObservedLimits {
            cpu_millicores: 0,
            memory_mib: 0,
        };
        for cgroup in self.cgroups(job_id)? {
            let v1_memory = cgroup.join("memory.limit_in_bytes");
            let v1_quota = cgroup.join("cpu.cfs_quota_us");
            if v1_memory.exists() {
                observed.memory_mib = (read_number(&v1_memory)? >> 20) as u64;
            }
            if v1_quota.exists() {
                let quota = read_number(&v1_quota)?;
                let period = read_number(&cgroup.join("cpu.cfs_period_us"))?;
                observed.cpu_millicores = (quota * 1000 / period.max(1)) as u32;
            }
            if cgroup.join("memory.max").exists() {
                observed.memory_mib = (read_number(&cgroup.join("memory.max"))? >> 20) as u64;
            }
            if cgroup.join("cpu.max").exists() {
                let text = std::fs::read_to_string(cgroup.join("cpu.max"))?;
                let mut parts = text.split_whitespace();
                let quota: i64 = parts.next().context("cpu.max")?.parse()?;
                let period: i64 = parts.next().context("cpu.max")?.parse()?;
                observed.cpu_millicores = (quota * 1000 / period.max(1)) as u32;
            }
        }
        Ok(observed)
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        let mut left = Vec::new();
        let dir = self.job_dir(job_id);
        if dir.exists() {
            left.push(format!("state dir {}", dir.display()));
        }
        let cgroup_root = Path::new("/sys/fs/cgroup");
        for controller in ["memory", "cpu", "unified"] {
            let cgroup = cgroup_root
                .join(controller)
                .join("chris-dispatch")
                .join(&self.config.manager_id)
                .join(job_id);
            if cgroup.exists() {
                left.push(format!("cgroup {}", cgroup.display()));
            }
        }
        Ok(left)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }

    fn runs_images(&self) -> bool {
        false
    }
}

mod local_processes {
    dispatch_testkit::conformance_tests!(super::LocalHarness::new());
}

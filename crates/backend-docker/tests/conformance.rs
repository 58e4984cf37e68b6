//! The docker backend passes the backend conformance suite against the real Docker engine
//! (`scripts/setup-engines.sh` makes sure one answers; a missing engine fails these tests).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use dispatch_backend_docker::{DockerBackend, DockerConfig};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::TestDir;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};

/// The uid:gid jobs run as: not the engine's, not root, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);

struct DockerHarness {
    _dir: TestDir,
    config: ManagerConfig,
    image: String,
}

impl DockerHarness {
    async fn new() -> Result<Self> {
        let dir = TestDir::new("conformance-docker")?;
        let mut config = conformance::base_config("docker", dir.path())?;
        config.container_user = format!("{}:{}", USER.0, USER.1);
        let image = ensure_test_image_async(Engine::Docker).await?;
        Ok(Self {
            _dir: dir,
            config,
            image,
        })
    }

    /// Runs the docker CLI: the engine's own account, independent of the backend's code.
    fn docker(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .args(args)
            .output()
            .context("cannot run the docker CLI")?;
        anyhow::ensure!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn containers(&self, job_id: &str) -> Result<Vec<String>> {
        let job = format!("label={}={job_id}", labels::JOB_ID);
        let manager = format!("label={}={}", labels::MANAGER_ID, self.config.manager_id);
        let listed = self.docker(&[
            "ps",
            "-a",
            "--filter",
            &job,
            "--filter",
            &manager,
            "--format",
            "{{.ID}} {{.Names}} {{.Status}}",
        ])?;
        Ok(listed.lines().map(str::to_owned).collect())
    }
}

#[async_trait::async_trait]
impl Harness for DockerHarness {
    fn name(&self) -> &str {
        "docker"
    }

    fn image(&self) -> String {
        self.image.clone()
    }

    fn plugin(&self, name: &str) -> Vec<String> {
        vec!["/bin/sh".into(), format!("/plugins/{name}")]
    }

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let backend =
            DockerBackend::connect(&self.config.manager_id, DockerConfig::default()).await?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        let containers = self.containers(job_id)?;
        let id = containers
            .first()
            .and_then(|line| line.split(' ').next())
            .context("no container for the job")?;
        let out = self.docker(&[
            "inspect",
            "--format",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            id,
        ])?;
        let mut parts = out.split_whitespace();
        let nano: u64 = parts.next().context("no NanoCpus")?.parse()?;
        let memory: u64 = parts.next().context("no Memory")?.parse()?;
        Ok(ObservedLimits {
            cpu_millicores: (nano / 1_000_000) as u32,
            memory_mib: memory >> 20,
        })
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        self.containers(job_id)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }
}

mod docker_engine {
    dispatch_testkit::conformance_tests!(super::DockerHarness::new());
}

//! The swarm backend passes the backend conformance suite against a real one-node swarm
//! (`scripts/setup-engines.sh` makes sure a Docker engine answers, `scripts/setup-swarm.sh`
//! makes it a swarm manager; a missing engine or swarm fails these tests).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dispatch_backend_swarm::{SwarmBackend, SwarmConfig};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::TestDir;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};

/// The uid:gid jobs run as: not the engine's, not root, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);

struct SwarmHarness {
    _dir: TestDir,
    config: ManagerConfig,
    image: String,
}

impl SwarmHarness {
    async fn new() -> Result<Self> {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"])
            .context("no Docker engine answers: run `eval \"$(scripts/setup-engines.sh)\"` and `eval \"$(scripts/setup-swarm.sh)\"`")?;
        if state.trim() != "active true" {
            bail!(
                "the Docker engine is not a swarm manager (swarm state and control: `{}`): \
                 run `eval \"$(scripts/setup-swarm.sh)\"` first",
                state.trim()
            );
        }
        let dir = TestDir::new("conformance-swarm")?;
        let mut config = conformance::base_config("swarm", dir.path())?;
        config.backend = "swarm".into();
        config.container_user = format!("{}:{}", USER.0, USER.1);
        let image = ensure_test_image_async(Engine::Docker).await?;
        Ok(Self {
            _dir: dir,
            config,
            image,
        })
    }

    /// The filters that find what this harness's manager made for `job_id`.
    fn filters(&self, job_id: &str) -> [String; 4] {
        [
            "--filter".into(),
            format!("label={}={job_id}", labels::JOB_ID),
            "--filter".into(),
            format!("label={}={}", labels::MANAGER_ID, self.config.manager_id),
        ]
    }

    /// The job's task containers on this engine, as `id name status` lines.
    fn containers(&self, job_id: &str) -> Result<Vec<String>> {
        let mut args = vec!["ps".to_owned(), "-a".into()];
        args.extend(self.filters(job_id));
        args.extend(["--format".into(), "{{.ID}} {{.Names}} {{.Status}}".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(docker(&args)?.lines().map(str::to_owned).collect())
    }

    /// The job's services, as `service id name` lines.
    fn services(&self, job_id: &str) -> Result<Vec<String>> {
        let mut args = vec!["service".to_owned(), "ls".into()];
        args.extend(self.filters(job_id));
        args.extend(["--format".into(), "service {{.ID}} {{.Name}}".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(docker(&args)?.lines().map(str::to_owned).collect())
    }
}

/// Runs the docker CLI: the engine's own account, independent of the backend's code.
fn docker(args: &[&str]) -> Result<String> {
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

#[async_trait::async_trait]
impl Harness for SwarmHarness {
    fn name(&self) -> &str {
        "swarm"
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
        let backend = SwarmBackend::connect(&self.config.manager_id, SwarmConfig::default())
            .await
            .context("connecting to the swarm (scripts/setup-swarm.sh sets one up)")?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    /// What the engine applied to the task's container (not what the service asks for).
    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        let containers = self.containers(job_id)?;
        let id = containers
            .first()
            .and_then(|line| line.split(' ').next())
            .context("no container for the job")?;
        let out = docker(&[
            "inspect",
            "--format",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            id,
        ])?;
        let mut parts = out.split_whitespace();
        let nano: u64 = parts.next().context("no NanoCpus")?.parse()?;
        let memory: u64 = parts.next().context("no Memory")?.parse()?;
        Ok(ObservedLimits {
            cpu_millicores: u32::try_from(nano / 1_000_000)?,
            memory_mib: memory >> 20,
        })
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        let mut left = self.services(job_id)?;
        left.extend(self.containers(job_id)?);
        Ok(left)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }
}

mod swarm_engine {
    dispatch_testkit::conformance_tests!(super::SwarmHarness::new());
}

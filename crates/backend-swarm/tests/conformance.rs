//! The swarm backend passes the backend conformance suite against a real one-node swarm
//! (`scripts/setup-engines.sh` makes sure a Docker engine answers, `scripts/setup-swarm.sh`
//! makes it a swarm manager; a missing engine or swarm fails these tests).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dispatch_backend_swarm::{SwarmBackend, SwarmConfig};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use dispatch_testkit::{TestDir, engine_cli};

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
        engine_cli::labelled_containers(
            Engine::Docker,
            &[
                (labels::JOB_ID, job_id),
                (labels::MANAGER_ID, &self.config.manager_id),
            ],
        )
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
    engine_cli::run(Engine::Docker, args)
}

#[async_trait::async_trait]
impl Harness for SwarmHarness {
    fn name(&self) -> &str {
        "swarm"
    }

    fn image(&self) -> String {
        self.image.clone()
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
        engine_cli::container_limits(Engine::Docker, &self.containers(job_id)?)
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

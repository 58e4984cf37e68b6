//! The docker backend passes the backend conformance suite against the real Docker engine
//! (`scripts/setup-engines.sh` makes sure one answers; a missing engine fails these tests).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use dispatch_backend_docker::{DockerBackend, DockerConfig};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use dispatch_testkit::{TestDir, engine_cli};

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

    fn containers(&self, job_id: &str) -> Result<Vec<String>> {
        engine_cli::labelled_containers(
            Engine::Docker,
            &[
                (labels::JOB_ID, job_id),
                (labels::MANAGER_ID, &self.config.manager_id),
            ],
        )
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

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let backend =
            DockerBackend::connect(&self.config.manager_id, DockerConfig::default()).await?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        engine_cli::container_limits(Engine::Docker, &self.containers(job_id)?)
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

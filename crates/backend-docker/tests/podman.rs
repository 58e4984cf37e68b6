//! The docker backend passes the backend conformance suite on Podman, through Podman's
//! Docker-compatible socket (`podman system service`), as a RHEL site runs it.
//!
//! `scripts/setup-podman.sh` installs Podman, writes the containers.conf it needs here and
//! starts the service; it exports `DISPATCH_TEST_PODMAN_HOST`. Where Podman cannot start
//! containers, the script says why, and the test command prints that reason and leaves
//! these cases out (`--skip podman_engine`), so they are never counted as passed. Run
//! without the variable, every case fails, naming the script.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use dispatch_backend_docker::{DockerBackend, DockerConfig, EngineKind};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use dispatch_testkit::{TestDir, engine_cli};

/// The uid:gid jobs run as: not root, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);

struct PodmanHarness {
    _dir: TestDir,
    config: ManagerConfig,
    image: String,
    host: String,
}

impl PodmanHarness {
    async fn new() -> Result<Self> {
        let host = std::env::var("DISPATCH_TEST_PODMAN_HOST").context(
            "DISPATCH_TEST_PODMAN_HOST is not set: run `eval \"$(scripts/setup-podman.sh)\"` \
             first (scripts/test.sh does)",
        )?;
        let dir = TestDir::new("conformance-podman")?;
        let mut config = conformance::base_config("podman", dir.path())?;
        config.container_user = format!("{}:{}", USER.0, USER.1);
        let image = ensure_test_image_async(Engine::Podman).await?;
        Ok(Self {
            _dir: dir,
            config,
            image,
            host,
        })
    }

    fn containers(&self, job_id: &str) -> Result<Vec<String>> {
        engine_cli::labelled_containers(
            Engine::Podman,
            &[
                (labels::JOB_ID, job_id),
                (labels::MANAGER_ID, &self.config.manager_id),
            ],
        )
    }
}

#[async_trait::async_trait]
impl Harness for PodmanHarness {
    fn name(&self) -> &str {
        "podman"
    }

    fn image(&self) -> String {
        self.image.clone()
    }

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let settings = DockerConfig {
            host: Some(self.host.clone()),
            kind: EngineKind::Podman,
            ..DockerConfig::default()
        };
        let backend = DockerBackend::connect(&self.config.manager_id, settings).await?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        engine_cli::container_limits(Engine::Podman, &self.containers(job_id)?)
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        self.containers(job_id)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }

    fn reports_oom_kills(&self) -> bool {
        false
    }
}

mod podman_engine {
    dispatch_testkit::conformance_tests!(super::PodmanHarness::new());
}

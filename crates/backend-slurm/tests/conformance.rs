//! The Slurm backend passes the backend conformance suite on the one-node cluster of
//! `scripts/setup-slurm.sh` (found through `SLURM_CONF`; without it these tests fail),
//! each job a Slurm batch job running the test plugin with `docker run`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use dispatch_backend_slurm::Runtime;
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use dispatch_testkit::{TestDir, engine_cli};

/// The uid:gid jobs run as: not the engine's, not root, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);

struct SlurmHarness {
    _dir: TestDir,
    config: ManagerConfig,
    image: String,
}

impl SlurmHarness {
    async fn new() -> Result<Self> {
        common::slurm_conf()?;
        let dir = TestDir::new("conformance-slurm")?;
        let mut config = conformance::base_config("slurm", dir.path())?;
        config.container_user = format!("{}:{}", USER.0, USER.1);
        let image = ensure_test_image_async(Engine::Docker).await?;
        Ok(Self {
            _dir: dir,
            config,
            image,
        })
    }

    fn job_dir(&self) -> PathBuf {
        self.config.state_dir.join("slurm")
    }

    /// The job's containers (`id name status`), by the labels the batch script gives them.
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
impl Harness for SlurmHarness {
    fn name(&self) -> &str {
        "slurm"
    }

    fn image(&self) -> String {
        self.image.clone()
    }

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let settings = common::config(Runtime::Docker, &self.job_dir())?;
        let backend = common::open(&self.config.manager_id, settings)?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    /// Docker applies the exact limits to the container (Slurm allocates whole CPUs:
    /// `slurm.rs` checks those); the container appears a moment after Slurm starts the job.
    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let containers = loop {
            let containers = self.containers(job_id)?;
            if !containers.is_empty() {
                break containers;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no container for the job within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        engine_cli::container_limits(Engine::Docker, &containers)
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        let mut left = common::active_slurm_jobs(&self.config.manager_id, job_id)?
            .into_iter()
            .map(|line| format!("slurm job {line}"))
            .collect::<Vec<_>>();
        let dir = self.job_dir().join(job_id);
        if dir.exists() {
            left.push(format!("job dir {}", dir.display()));
        }
        left.extend(
            self.containers(job_id)?
                .into_iter()
                .map(|c| format!("container {c}")),
        );
        Ok(left)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }
}

mod slurm_cluster {
    dispatch_testkit::conformance_tests!(super::SlurmHarness::new());
}

//! The kubernetes backend passes the backend conformance suite against the project's
//! **fake** Kubernetes API server (`tests/fake/`), whose fake kubelet runs each pod's
//! container on the real Docker engine (`scripts/setup-engines.sh` makes sure one
//! answers; a missing engine fails these tests). This is not a test on Kubernetes: see
//! the fake's own doc for what it does and does not do as a real cluster would.

mod fake;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use dispatch_backend_docker::{DockerBackend, DockerConfig, PullPolicy};
use dispatch_backend_kubernetes::names::label_value;
use dispatch_backend_kubernetes::{KubernetesBackend, KubernetesConfig};
use dispatch_manager::ManagerConfig;
use dispatch_manager::backend::labels;
use dispatch_testkit::conformance::{self, Harness, ObservedLimits, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use dispatch_testkit::{TestDir, engine_cli};

use fake::FakeApiServer;

/// The uid:gid jobs run as: not the engine's, not root, so ownership is really checked.
const USER: (u32, u32) = (4321, 4322);
const NAMESPACE: &str = "dispatch-test";
const PVC: &str = "storebase";

struct KubernetesHarness {
    _dir: TestDir,
    config: ManagerConfig,
    image: String,
    server: FakeApiServer,
}

impl KubernetesHarness {
    async fn new() -> Result<Self> {
        let dir = TestDir::new("conformance-kubernetes")?;
        let mut config = conformance::base_config("kubernetes", dir.path())?;
        config.container_user = format!("{}:{}", USER.0, USER.1);
        let image = ensure_test_image_async(Engine::Docker).await?;
        // The fake kubelet's own Docker backend; no registry here, so no pulls.
        let kubelet_id = format!(
            "fake-kubelet-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let docker = DockerBackend::connect(
            &kubelet_id,
            DockerConfig {
                pull_policy: PullPolicy::Never,
                ..DockerConfig::default()
            },
        )
        .await
        .context("the fake kubelet needs the Docker engine (run scripts/setup-engines.sh)")?;
        // The PVC is the test directory; the manager's store root is `store/` in it.
        let server =
            FakeApiServer::start(NAMESPACE, PVC, dir.path().to_owned(), docker, &kubelet_id)
                .await?;
        Ok(Self {
            _dir: dir,
            config,
            image,
            server,
        })
    }

    fn backend_config(&self) -> KubernetesConfig {
        KubernetesConfig {
            api_url: Some(self.server.url.clone()),
            namespace: Some(NAMESPACE.into()),
            pvc_name: PVC.into(),
            pvc_store_path: "store".into(),
            termination_grace_seconds: 1,
            ..KubernetesConfig::default()
        }
    }

    /// The fake kubelet's containers for the job: `id name status` each.
    fn containers(&self, job_id: &str) -> Result<Vec<String>> {
        let kubelet = self.server.cluster().kubelet.kubelet_id();
        engine_cli::labelled_containers(
            Engine::Docker,
            &[
                (labels::JOB_ID, &label_value(job_id)),
                (labels::MANAGER_ID, kubelet),
            ],
        )
    }
}

#[async_trait::async_trait]
impl Harness for KubernetesHarness {
    fn name(&self) -> &str {
        "kubernetes"
    }

    fn image(&self) -> String {
        self.image.clone()
    }

    fn store_root(&self) -> PathBuf {
        self.config.store_root.clone()
    }

    async fn start_manager(&self) -> Result<RunningManager> {
        let backend = KubernetesBackend::connect(
            &self.config.manager_id,
            &self.config.store_root,
            self.backend_config(),
        )
        .await?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }

    /// The limits of the container the fake kubelet made from the Job's pod, as Docker
    /// applies them (`docker inspect`): the Job spec as stored by the fake API server
    /// went through the kubelet to the engine.
    async fn limits(&self, job_id: &str) -> Result<ObservedLimits> {
        engine_cli::container_limits(Engine::Docker, &self.containers(job_id)?)
    }

    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>> {
        let mut left = self.server.objects_of(job_id);
        left.extend(self.containers(job_id)?);
        Ok(left)
    }

    fn container_user(&self) -> Option<(u32, u32)> {
        Some(USER)
    }
}

mod fake_api_server_and_docker_engine {
    dispatch_testkit::conformance_tests!(super::KubernetesHarness::new());
}

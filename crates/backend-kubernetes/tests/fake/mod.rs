//! A **fake** Kubernetes API server and a **fake** kubelet, for testing the kubernetes
//! backend where no real cluster can run (backends.md: no kube-apiserver, k3s, kind or
//! kwok can be installed on the project's machines). Nothing here is Kubernetes; passing
//! against it is not "tested on Kubernetes".
//!
//! [`FakeApiServer`] serves, on a loopback port, exactly the routes the backend uses, as
//! the real API server answers them (JSON of the real `k8s-openapi` types, `Status`
//! errors with reason and code, uids, resource versions, label validation):
//!
//! - `GET /version`;
//! - `batch/v1` Jobs: create (409 `AlreadyExists`, 422 `Invalid` for bad names, labels,
//!   annotations, restart policy), get (404 `NotFound`), list with `labelSelector`
//!   (`k=v`, `k==v`, `k!=v`, `k`, `!k`), merge-patch, delete with `propagationPolicy`
//!   (`Background`, `Foreground`, and Kubernetes' default for Jobs, `Orphan`) and a uid
//!   precondition (409 `Conflict`);
//! - pods: list with `labelSelector`, get, delete, and `pods/{name}/log` with
//!   `container`, `tailLines` and `follow` (400 `BadRequest` while the container waits
//!   to start, as the real server answers);
//! - not served: watches (`watch=true` answers 400; the backend polls), field
//!   selectors, pagination (`limit`/`continue`), server-side apply, other resources.
//!
//! Its **Job controller** (one loop) acts as the real one does for what the backend
//! relies on: one pod per `parallelism` (created once: `backoffLimit` 0 is all the backend
//! uses), pods labelled `job-name`/`controller-uid` and owned by the Job; status counts;
//! `Complete`, `Failed` (`BackoffLimitExceeded`, `DeadlineExceeded` from
//! `activeDeadlineSeconds`) and `Suspended` conditions; active pods deleted on failure
//! and on `suspend`; `ttlSecondsAfterFinished`; garbage collection of pods after a
//! `Background` delete.
//!
//! Its **kubelet** runs each pod's one container on the real Docker engine through
//! `dispatch_backend_docker::DockerBackend`: the PVC's sub-paths map to directories under
//! the host directory given for the claim; cpu and memory limits, `runAsUser` and
//! `runAsGroup`, env and command go to the container; `runAsNonRoot` is checked against
//! the image's user (`CreateContainerConfigError`); a missing image is `ErrImagePull`, then
//! `ImagePullBackOff`; an ended container is `terminated` with its exit code and reason
//! (`Completed`, `Error`, `OOMKilled`). It does not apply the other security settings
//! (the Docker backend drops all capabilities and forbids privilege escalation anyway),
//! the `/dev/shm` volume, node selectors, tolerations or image pull secrets, nor does it
//! honour grace periods: a deleted pod's container is killed at once.

// Each test file includes this module and uses part of it.
#![allow(dead_code)]

mod api;
mod kubelet;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_backend_docker::DockerBackend;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub use kubelet::FakeKubelet;

/// The objects the fake holds, one namespace's worth (others answer empty or 404).
#[derive(Default)]
pub struct Objects {
    /// Last resource version handed out.
    pub resource_version: u64,
    /// Jobs by name.
    pub jobs: BTreeMap<String, Job>,
    /// Pods by name.
    pub pods: BTreeMap<String, Pod>,
    /// Uids of Jobs whose pods have been created.
    pub spawned: std::collections::HashSet<String>,
}

impl Objects {
    /// The next resource version, as the text the API shows.
    pub fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

/// The fake cluster's state, shared by the API routes, the controller and the kubelet.
pub struct Cluster {
    /// The one namespace served.
    pub namespace: String,
    objects: Mutex<Objects>,
    /// Wakes the controller after a change.
    pub changed: Notify,
    /// Runs pods' containers.
    pub kubelet: FakeKubelet,
    /// Requests served, by `METHOD path` (no query), for tests of what the backend asks.
    requests: Mutex<HashMap<String, usize>>,
}

impl Cluster {
    /// Locks the objects.
    pub fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_request(&self, key: String) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
    }
}

/// A fake Kubernetes API server on a loopback port, with its Job controller and kubelet
/// (see the module's doc). Stops when dropped.
pub struct FakeApiServer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its address.
    pub address: SocketAddr,
    cluster: Arc<Cluster>,
    tasks: JoinSet<()>,
}

impl FakeApiServer {
    /// Serves namespace `namespace`, with the claim `pvc_name` backed by `pvc_host_dir`;
    /// pods run as containers through `docker`, labelled with `kubelet_id`.
    pub async fn start(
        namespace: &str,
        pvc_name: &str,
        pvc_host_dir: PathBuf,
        docker: DockerBackend,
        kubelet_id: &str,
    ) -> Result<Self> {
        let cluster = Arc::new(Cluster {
            namespace: namespace.to_owned(),
            objects: Mutex::new(Objects::default()),
            changed: Notify::new(),
            kubelet: FakeKubelet::new(
                docker,
                kubelet_id,
                HashMap::from([(pvc_name.to_owned(), pvc_host_dir)]),
            ),
            requests: Mutex::new(HashMap::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake API server")?;
        let address = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        let router = api::router(Arc::clone(&cluster));
        tasks.spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                eprintln!("fake API server stopped: {error}");
            }
        });
        let controller = Arc::clone(&cluster);
        tasks.spawn(async move { kubelet::run_controller(controller).await });
        Ok(Self {
            url: format!("http://{address}"),
            address,
            cluster,
            tasks,
        })
    }

    /// The cluster's state, to look at what the backend made.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The stored Job named `name`.
    pub fn job(&self, name: &str) -> Option<Job> {
        self.cluster.objects().jobs.get(name).cloned()
    }

    /// Every stored Job and pod whose annotation holds `job_id`, one line each.
    pub fn objects_of(&self, job_id: &str) -> Vec<String> {
        let objects = self.cluster.objects();
        let of = |annotations: Option<&BTreeMap<String, String>>| {
            annotations
                .and_then(|a| a.get(dispatch_backend_kubernetes::names::ANNOTATION_JOB_ID))
                .is_some_and(|id| id == job_id)
        };
        let jobs = objects
            .jobs
            .values()
            .filter(|job| of(job.metadata.annotations.as_ref()))
            .map(|job| format!("job {}", job.metadata.name.clone().unwrap_or_default()));
        let pods = objects
            .pods
            .values()
            .filter(|pod| of(pod.metadata.annotations.as_ref()))
            .map(|pod| format!("pod {}", pod.metadata.name.clone().unwrap_or_default()));
        jobs.chain(pods).collect()
    }

    /// How many requests `METHOD /path` were served.
    pub fn requests(&self, key: &str) -> usize {
        self.cluster
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `check` holds of the objects, for at most `within`.
    pub async fn wait_until(
        &self,
        within: Duration,
        check: impl Fn(&Objects) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if check(&self.cluster.objects()) {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the fake cluster did not get there within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.tasks.abort_all();
        self.cluster.kubelet.abort_all();
    }
}

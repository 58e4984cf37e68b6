//! The kubernetes backend: runs each job as one `batch/v1` Job on Kubernetes or
//! OpenShift, as pfcon's `kubernetesmgr.py` does (pfcon-api.md §4.3), without its bugs
//! (§9 item 4: see [`observe`](crate::observe)).
//!
//! It owns the Jobs it creates: each is named after its job id (made a DNS-1123 label,
//! see [`names`]), labelled with the job id and this manager's id, and annotated with the
//! exact id and labels. It must never read, stop or delete a Job without both the
//! `managed-by` and `manager-id` labels of its own and the job id it was asked about.
//!
//! Storage is the site's one storeBase PVC, mounted twice with sub-paths computed from
//! the job's directories relative to the manager's `store_root` (pman#227/#228).
//!
//! **Verified only against the project's fake API server** (`tests/fake/`), which serves
//! the routes used here and runs pods' containers on Docker; never against a real
//! cluster. The routes and verbs used: Jobs create, get, list (by label), patch (kill),
//! delete (propagation Background); pods list (by `job-name`), get, `log` (tail,
//! follow); `/version`.
//!
//! `kill` suspends the Job (`spec.suspend: true`, which makes the Job controller delete
//! its running pods) and marks it with an annotation, after saving the job's log into
//! another annotation: the pods, and with them the log Kubernetes keeps, go away with the
//! stop, while the Job stays as the record until `remove` (a suspended Job never
//! finishes, so `ttlSecondsAfterFinished` does not collect it).

pub mod config;
pub mod names;
pub mod observe;
pub mod spec;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dispatch_manager::backend::{BackendCapabilities, LogStream};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{BackendKind, CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};
use futures::{AsyncBufRead, AsyncReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, Preconditions,
};

pub use crate::config::{ConfigError, KubernetesConfig, Toleration};
use crate::names::{ANNOTATION_KILLED_AT, ANNOTATION_LOG_SNAPSHOT, job_name};
use crate::observe::{has_started, is_owned, job_id_of, observe, pods_of, was_killed};
use crate::spec::{CONTAINER_NAME, job_manifest, owned_selector};

/// How long connecting (and the first call) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `submit` looks at a new Job's pod, and a followed log at a pod not started.
const POLL: Duration = Duration::from_millis(250);
/// Largest log kept in the Job when it is killed: annotations of one object may not
/// exceed 256 KiB together.
const MAX_LOG_SNAPSHOT: usize = 128 * 1024;

/// Jobs as `batch/v1` Jobs in one namespace of one cluster.
#[derive(Clone)]
pub struct KubernetesBackend {
    client: Client,
    jobs: Api<Job>,
    pods: Api<Pod>,
    namespace: String,
    /// The API server's address, for error messages.
    api_url: String,
    manager_id: String,
    store_root: PathBuf,
    config: Arc<KubernetesConfig>,
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("api_url", &self.api_url)
            .field("namespace", &self.namespace)
            .field("manager_id", &self.manager_id)
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// Connects to the cluster `config` names (an API URL, a kubeconfig, else what
    /// `kube::Config::infer` finds: `KUBECONFIG`, `~/.kube/config`, or the in-cluster
    /// service account), and checks that it answers and that this account may list Jobs.
    pub async fn connect(
        manager_id: &str,
        store_root: &Path,
        config: KubernetesConfig,
    ) -> Result<Self, BackendError> {
        if manager_id.is_empty() {
            return Err(BackendError::Unsupported {
                field: "manager_id",
                reason: "cannot be empty: it labels every Job this manager creates".into(),
            });
        }
        config.check().map_err(|error| BackendError::Unsupported {
            field: error.key,
            reason: error.reason,
        })?;
        let client_config = client_config(&config).await?;
        let api_url = client_config.cluster_url.to_string();
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client_config.default_namespace.clone());
        let client = Client::try_from(client_config).map_err(|error| {
            BackendError::Engine(format!(
                "cannot make a Kubernetes client for {api_url}: {}",
                describe(&error)
            ))
        })?;
        let backend = Self {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client.clone(), &namespace),
            client,
            namespace,
            api_url,
            manager_id: manager_id.to_owned(),
            store_root: store_root.to_owned(),
            config: Arc::new(config),
        };
        // Fail at start, not at the first job: the API answers, and RBAC lets us list.
        let probe = async {
            backend
                .client
                .apiserver_version()
                .await
                .map_err(|e| backend.api_error("reading the API server's version", e))?;
            backend
                .jobs
                .list(&ListParams::default().labels(&owned_selector(manager_id)))
                .await
                .map_err(|e| backend.api_error("listing this manager's Jobs", e))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, probe)
            .await
            .map_err(|_| {
                BackendError::Engine(format!(
                    "the Kubernetes API at {} did not answer within {} s",
                    backend.api_url,
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        Ok(backend)
    }

    /// The settings in force.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The namespace jobs run in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client, for tests and tools that need more than the trait.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A client error as a [`BackendError`], saying what was being done.
    fn api_error(&self, action: &str, error: kube::Error) -> BackendError {
        match error {
            kube::Error::Api(status) => {
                let hint = if status.is_forbidden() {
                    " (check the Role bound to this manager's service account: \
                     deploy/kubernetes/rbac.yaml)"
                } else {
                    ""
                };
                BackendError::Engine(format!(
                    "{action} in namespace {}: the API server answered {} {}: {}{hint}",
                    self.namespace, status.code, status.reason, status.message
                ))
            }
            other => BackendError::Engine(format!(
                "{action}: cannot talk to the Kubernetes API at {}: {}",
                self.api_url,
                describe(&other)
            )),
        }
    }

    /// The Job of `job_id` if it exists and is this manager's.
    async fn get_owned(&self, job_id: &JobId) -> Result<Option<Job>, BackendError> {
        let name = job_name(job_id.as_str());
        let job = self
            .jobs
            .get_opt(&name)
            .await
            .map_err(|e| self.api_error(&format!("reading Job {name}"), e))?;
        Ok(job.filter(|job| {
            is_owned(job, &self.manager_id) && job_id_of(job).as_ref() == Some(job_id)
        }))
    }

    /// The pods of `job`.
    async fn pods_of(&self, job: &Job) -> Result<Vec<Pod>, BackendError> {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await
            .map_err(|e| self.api_error(&format!("listing the pods of Job {name}"), e))?;
        Ok(pods_of(job, &pods.items).into_iter().cloned().collect())
    }

    async fn observe_job(&self, job: &Job) -> Result<Option<Observed>, BackendError> {
        let pods = self.pods_of(job).await?;
        Ok(observe(job, &pods.iter().collect::<Vec<_>>()))
    }

    /// After creating a Job: watches its pod for an image that cannot be pulled, for at
    /// most `image_check_seconds`, so that a missing image fails `submit` (and the Job
    /// is deleted) as it does on Docker. A pod that runs, ends, or waits for a node is
    /// returned at once.
    async fn settle_new_job(
        &self,
        job: &JobRequest,
        created: Job,
    ) -> Result<Observed, BackendError> {
        let name = created.metadata.name.clone().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(self.config.image_check_seconds);
        let mut current = created;
        loop {
            let pods = self.pods_of(&current).await?;
            let pod_refs: Vec<&Pod> = pods.iter().collect();
            let observed = observe(&current, &pod_refs).ok_or_else(|| {
                BackendError::Engine(format!("Job {name} lost its job-id annotation"))
            })?;
            if observed.state == JobState::Failed && observed.reason == ReasonCode::ImageNotFound {
                tracing::info!(job_id = %job.job_id, reason = %observed.message, "image cannot be pulled; deleting the Job");
                self.delete_job(&current).await?;
                return Err(BackendError::ImageNotFound {
                    image: job.image.clone(),
                    reason: observed.message,
                });
            }
            let unschedulable = pods
                .first()
                .is_some_and(|pod| observe::waiting_reason(pod).starts_with("Unschedulable"));
            if observed.state != JobState::Queued || unschedulable || Instant::now() >= deadline {
                return Ok(observed);
            }
            tokio::time::sleep(POLL).await;
            current = match self.jobs.get_opt(&name).await {
                Ok(Some(job)) => job,
                Ok(None) => {
                    return Err(BackendError::Engine(format!(
                        "Job {name} disappeared right after it was created"
                    )));
                }
                Err(e) => return Err(self.api_error(&format!("reading Job {name}"), e)),
            };
        }
    }

    /// Deletes the Job, its pods in the background; false if it was gone.
    async fn delete_job(&self, job: &Job) -> Result<bool, BackendError> {
        let name = job.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            // Never a Job made anew under the same name since it was read.
            preconditions: Some(Preconditions {
                uid: job.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match self.jobs.delete(&name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
            // The uid precondition failed: another Job by that name, not ours to delete.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
            Err(e) => Err(self.api_error(&format!("deleting Job {name}"), e)),
        }
    }

    /// The log of every started pod of the job (the last `tail` lines of them all), and a
    /// line saying so for each pod not started yet; for a killed job, the log saved when
    /// it was killed.
    async fn log_text(
        &self,
        job: &Job,
        pods: &[Pod],
        tail: Option<u32>,
    ) -> Result<String, BackendError> {
        if was_killed(job) {
            return Ok(last_lines(&saved_log(job), tail));
        }
        let job_id = job_id_of(job).map(|id| id.to_string()).unwrap_or_default();
        if pods.is_empty() {
            let observed = observe(job, &[]);
            let why = observed.map_or_else(String::new, |o| o.message);
            return Ok(last_lines(&not_started(&job_id, &why), tail));
        }
        let mut text = String::new();
        for pod in pods {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            if !has_started(pod) {
                text.push_str(&not_started(&job_id, &observe::waiting_reason(pod)));
                continue;
            }
            let params = LogParams {
                container: Some(CONTAINER_NAME.into()),
                tail_lines: tail.map(i64::from),
                ..LogParams::default()
            };
            match self.pods.logs(name, &params).await {
                Ok(log) => text.push_str(&log),
                // Deleted meanwhile (a kill, the TTL).
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(e) => return Err(self.api_error(&format!("reading the log of pod {name}"), e)),
            }
        }
        Ok(last_lines(&text, tail))
    }
}

/// The line a log gets for a pod that has not started (pman#226: not an error, and not
/// Kubernetes' raw 400).
fn not_started(job_id: &str, why: &str) -> String {
    format!("[dispatch] job {job_id} has not started yet: {why}\n")
}

/// The log `kill` saved in the Job.
fn saved_log(job: &Job) -> String {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LOG_SNAPSHOT))
        .cloned()
        .unwrap_or_default()
}

/// The last `tail` lines of `text` (all with `None`).
fn last_lines(text: &str, tail: Option<u32>) -> String {
    let Some(tail) = tail else {
        return text.to_owned();
    };
    if tail == 0 {
        return String::new();
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    let starts: Vec<usize> = std::iter::once(0)
        .chain(body.match_indices('\n').map(|(at, _)| at + 1))
        .collect();
    let keep = usize::try_from(tail).unwrap_or(usize::MAX);
    if starts.len() <= keep {
        return text.to_owned();
    }
    text[starts[starts.len() - keep]..].to_owned()
}

/// At most [`MAX_LOG_SNAPSHOT`] bytes of the end of `text`, cut at a line.
fn snapshot_of(text: &str) -> String {
    if text.len() <= MAX_LOG_SNAPSHOT {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_LOG_SNAPSHOT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    let cut = cut.find('\n').map_or(cut, |at| &cut[at + 1..]);
    format!("[dispatch] (earlier output not kept)\n{cut}")
}

/// The client configuration `config` asks for.
async fn client_config(config: &KubernetesConfig) -> Result<kube::Config, BackendError> {
    let unreachable = |what: &str, why: String| {
        BackendError::Engine(format!(
            "cannot configure the Kubernetes client from {what}: {why}; set [kubernetes] \
             api_url or kubeconfig, or run the manager in the cluster with a service account"
        ))
    };
    if let Some(url) = &config.api_url {
        let mut client_config = kube::Config::new(
            url.parse()
                .map_err(|e| unreachable("api_url", format!("`{url}`: {e}")))?,
        );
        client_config.auth_info.token_file = config
            .token_file
            .as_ref()
            .map(|path| path.display().to_string());
        client_config.root_cert_file = config.ca_file.clone();
        return Ok(client_config);
    }
    let options = kube::config::KubeConfigOptions {
        context: config.context.clone(),
        ..kube::config::KubeConfigOptions::default()
    };
    if let Some(path) = &config.kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| unreachable(&path.display().to_string(), describe(&e)))?;
        return kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| unreachable(&path.display().to_string(), describe(&e)));
    }
    if config.context.is_some() {
        return kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| unreachable("the kubeconfig", describe(&e)));
    }
    kube::Config::infer()
        .await
        .map_err(|e| unreachable("the environment", describe(&e)))
}

/// An error with its chain of causes.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Where a followed log is.
enum Follow {
    /// Waiting for the Job's pods to exist.
    Start,
    /// Pods whose logs are still to come, in order.
    Pods(VecDeque<String>),
    /// Streaming one pod's log; then the rest.
    Streaming(Pin<Box<dyn AsyncBufRead + Send>>, VecDeque<String>),
    /// Nothing more.
    Done,
}

/// What a followed log needs to find its pods again.
struct FollowSource {
    backend: KubernetesBackend,
    job_id: JobId,
    tail: Option<u32>,
}

impl FollowSource {
    /// One step: the next piece of log and the state after it, or `None` at the end.
    async fn next(&self, mut state: Follow) -> Option<(Result<Bytes, BackendError>, Follow)> {
        loop {
            state = match state {
                Follow::Done => return None,
                Follow::Start => match self.start().await {
                    Ok(Ok(pods)) => Follow::Pods(pods),
                    Ok(Err(text)) if text.is_empty() => Follow::Done,
                    Ok(Err(text)) => return Some((Ok(Bytes::from(text)), Follow::Done)),
                    Err(error) => return Some((Err(error), Follow::Done)),
                },
                Follow::Pods(mut pods) => {
                    let pod = pods.pop_front()?;
                    match self.open(&pod).await {
                        Ok(Some(reader)) => Follow::Streaming(reader, pods),
                        Ok(None) => Follow::Pods(pods),
                        Err(error) => return Some((Err(error), Follow::Done)),
                    }
                }
                Follow::Streaming(mut reader, pods) => {
                    let mut buffer = vec![0; 16 * 1024];
                    match reader.read(&mut buffer).await {
                        Ok(0) => Follow::Pods(pods),
                        Ok(n) => {
                            buffer.truncate(n);
                            return Some((
                                Ok(Bytes::from(buffer)),
                                Follow::Streaming(reader, pods),
                            ));
                        }
                        Err(error) => {
                            let error = BackendError::Engine(format!(
                                "reading the log of job {} from {}: {error}",
                                self.job_id, self.backend.api_url
                            ));
                            return Some((Err(error), Follow::Done));
                        }
                    }
                }
            };
        }
    }

    /// Waits for the Job's pods; `Err(text)`: no pod will run, and `text` is the whole log
    /// (a killed job's saved log, or why it never ran).
    async fn start(&self) -> Result<Result<VecDeque<String>, String>, BackendError> {
        loop {
            let Some(job) = self.backend.get_owned(&self.job_id).await? else {
                return Ok(Err(String::new()));
            };
            if was_killed(&job) {
                return Ok(Err(last_lines(&saved_log(&job), self.tail)));
            }
            let pods = self.backend.pods_of(&job).await?;
            if !pods.is_empty() {
                return Ok(Ok(pods
                    .iter()
                    .filter_map(|pod| pod.metadata.name.clone())
                    .collect()));
            }
            if let Some(observed) = observe(&job, &[])
                && observed.is_finished()
            {
                let why = not_started(self.job_id.as_str(), &observed.message);
                return Ok(Err(last_lines(&why, self.tail)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the pod's container to start and opens its followed log; `None` when
    /// the pod went away or will never start.
    async fn open(
        &self,
        pod: &str,
    ) -> Result<Option<Pin<Box<dyn AsyncBufRead + Send>>>, BackendError> {
        let backend = &self.backend;
        loop {
            let current = backend
                .pods
                .get_opt(pod)
                .await
                .map_err(|e| backend.api_error(&format!("reading pod {pod}"), e))?;
            let Some(current) = current else {
                return Ok(None);
            };
            if has_started(&current) {
                break;
            }
            // A pod whose image cannot be pulled never starts: the job has ended.
            let job = backend.get_owned(&self.job_id).await?;
            let finished = match &job {
                Some(job) => {
                    was_killed(job) || observe(job, &[&current]).is_some_and(|o| o.is_finished())
                }
                None => true,
            };
            if finished {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
        let params = LogParams {
            container: Some(CONTAINER_NAME.into()),
            follow: true,
            tail_lines: self.tail.map(i64::from),
            ..LogParams::default()
        };
        match backend.pods.log_stream(pod, &params).await {
            Ok(reader) => Ok(Some(Box::pin(reader))),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
            Err(e) => Err(backend.api_error(&format!("following the log of pod {pod}"), e)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for KubernetesBackend {
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError> {
        let version = self
            .client
            .apiserver_version()
            .await
            .map_err(|e| self.api_error("reading the API server's version", e))?;
        let flavour = if self.config.openshift {
            "OpenShift"
        } else {
            "Kubernetes"
        };
        Ok(BackendCapabilities {
            kind: BackendKind::Kubernetes,
            cpu: CpuMillis(self.config.cpu_millicores),
            memory: MemoryMib(self.config.memory_mib),
            gpus: self.config.gpus,
            max_workers: self.config.max_workers,
            version: format!(
                "{flavour} {} ({}), namespace {}",
                version.git_version, version.platform, self.namespace
            ),
        })
    }

    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError> {
        let manifest = job_manifest(job, &self.config, &self.store_root)?;
        let name = manifest.metadata.name.clone().unwrap_or_default();
        let created = match self.jobs.create(&PostParams::default(), &manifest).await {
            Ok(created) => created,
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                return Err(BackendError::AlreadyExists(job.job_id.to_string()));
            }
            Err(e) => return Err(self.api_error(&format!("creating Job {name}"), e)),
        };
        tracing::debug!(job_id = %job.job_id, job = name, "job created");
        self.settle_new_job(job, created).await
    }

    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        match self.get_owned(job_id).await? {
            Some(job) => self.observe_job(&job).await,
            None => Ok(None),
        }
    }

    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let job = self
            .get_owned(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        if !follow {
            let pods = self.pods_of(&job).await?;
            let text = self.log_text(&job, &pods, tail_lines).await?;
            let chunk = (!text.is_empty()).then(|| Ok(Bytes::from(text)));
            return Ok(Box::pin(futures::stream::iter(chunk)));
        }
        let source = Arc::new(FollowSource {
            backend: self.clone(),
            job_id: job_id.clone(),
            tail: tail_lines,
        });
        let stream = futures::stream::unfold(Follow::Start, move |state| {
            let source = Arc::clone(&source);
            async move { source.next(state).await }
        });
        Ok(stream.boxed())
    }

    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError> {
        let job = self
            .get_owned(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let pods = self.pods_of(&job).await?;
        let observed = observe(&job, &pods.iter().collect::<Vec<_>>());
        if observed.is_none_or(|o| o.is_finished()) {
            return Ok(());
        }
        // The pods go with the stop, and their logs with them: keep the log in the Job.
        let log = match self.log_text(&job, &pods, None).await {
            Ok(text) => snapshot_of(&text),
            Err(error) => {
                format!("[dispatch] the log could not be saved when the job was stopped: {error}\n")
            }
        };
        let name = job.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({
            "metadata": {
                "annotations": {
                    ANNOTATION_KILLED_AT: k8s_openapi::jiff::Timestamp::now().to_string(),
                    ANNOTATION_LOG_SNAPSHOT: log,
                },
            },
            "spec": { "suspend": true },
        });
        match self
            .jobs
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            // Removed meanwhile: nothing left to stop.
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(self.api_error(&format!("stopping Job {name}"), e)),
        }
    }

    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError> {
        match self.get_owned(job_id).await? {
            Some(job) => self.delete_job(&job).await,
            None => Ok(false),
        }
    }

    async fn list_owned(&self) -> Result<Vec<Observed>, BackendError> {
        let selector = owned_selector(&self.manager_id);
        let params = ListParams::default().labels(&selector);
        let jobs = self
            .jobs
            .list(&params)
            .await
            .map_err(|e| self.api_error("listing this manager's Jobs", e))?;
        // One list of pods for all, by the same labels (the pod template carries them).
        let pods = self
            .pods
            .list(&params)
            .await
            .map_err(|e| self.api_error("listing this manager's pods", e))?;
        let mut observed: Vec<Observed> = jobs
            .items
            .iter()
            .filter(|job| is_owned(job, &self.manager_id))
            .filter_map(|job| observe(job, &pods_of(job, &pods.items)))
            .collect();
        observed.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_count_lines_from_the_end() {
        let text = "a\nb\nc\n";
        assert_eq!(last_lines(text, None), text);
        assert_eq!(last_lines(text, Some(0)), "");
        assert_eq!(last_lines(text, Some(2)), "b\nc\n");
        assert_eq!(last_lines(text, Some(5)), text);
        assert_eq!(last_lines("a\nb", Some(1)), "b");
        assert_eq!(last_lines("", Some(3)), "");
    }

    #[test]
    fn snapshots_keep_the_end_at_a_line() {
        assert_eq!(snapshot_of("short\n"), "short\n");
        let long: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
        let kept = snapshot_of(&long);
        assert!(kept.len() <= MAX_LOG_SNAPSHOT + 64);
        assert!(kept.starts_with("[dispatch] (earlier output not kept)\nline "));
        assert!(kept.ends_with("line 39999\n"));
    }
}

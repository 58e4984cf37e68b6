//! The fake cluster's Job controller and kubelet (see the parent module): one loop that
//! makes pods for Jobs, starts their containers on Docker, and writes back what happened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use dispatch_backend_docker::DockerBackend;
use dispatch_manager::backend::{INCOMING_MOUNT, LogStream, OUTGOING_MOUNT, UserId, labels};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};
use k8s_openapi::api::batch::v1::{Job, JobCondition};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use tokio::task::JoinSet;

use super::Cluster;

/// How often the controller looks even without a change.
const TICK: Duration = Duration::from_millis(100);
/// How long `ErrImagePull` shows before `ImagePullBackOff`.
const BACKOFF_AFTER: Duration = Duration::from_secs(1);

/// Runs pods' containers through the Docker backend.
pub struct FakeKubelet {
    docker: Arc<DockerBackend>,
    /// The manager id the Docker backend labels containers with.
    kubelet_id: String,
    /// Claim name -> host directory.
    claims: HashMap<String, PathBuf>,
    /// Container starts and removals under way.
    tasks: Mutex<JoinSet<()>>,
    /// Pods whose containers are being started.
    starting: Mutex<HashSet<String>>,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn time_of(time: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(time).ok().map(Time)
}

/// `500m`, `2`, `1.5` as millicores.
fn parse_cpu(text: &str) -> Option<u32> {
    if let Some(millis) = text.strip_suffix('m') {
        return millis.parse().ok();
    }
    let cores: f64 = text.parse().ok()?;
    Some((cores * 1000.0).round() as u32)
}

/// `100Mi`, `2Gi`, `1048576` as MiB.
fn parse_memory(text: &str) -> Option<u64> {
    if let Some(mib) = text.strip_suffix("Mi") {
        return mib.parse().ok();
    }
    if let Some(gib) = text.strip_suffix("Gi") {
        return gib.parse::<u64>().ok().map(|g| g * 1024);
    }
    text.parse::<u64>().ok().map(|bytes| bytes >> 20)
}

impl FakeKubelet {
    pub fn new(docker: DockerBackend, kubelet_id: &str, claims: HashMap<String, PathBuf>) -> Self {
        Self {
            docker: Arc::new(docker),
            kubelet_id: kubelet_id.to_owned(),
            claims,
            tasks: Mutex::new(JoinSet::new()),
            starting: Mutex::new(HashSet::new()),
        }
    }

    /// The manager id its containers carry.
    pub fn kubelet_id(&self) -> &str {
        &self.kubelet_id
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // Reap what has finished, so the set does not grow.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Stops every task, and removes every container it started (a test that ends while
    /// jobs run leaves nothing in the engine).
    pub fn abort_all(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
        let filter = format!("label={}={}", labels::MANAGER_ID, self.kubelet_id);
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }

    /// A deleted pod: its container is killed and removed (at once: no grace period).
    pub fn forget(&self, pod: &Pod) {
        let Some(id) = pod
            .metadata
            .name
            .as_deref()
            .and_then(|n| JobId::parse(n).ok())
        else {
            return;
        };
        let docker = Arc::clone(&self.docker);
        self.spawn(async move {
            if let Err(error) = docker.remove(&id).await {
                eprintln!("fake kubelet: removing the container of pod {id}: {error}");
            }
        });
    }

    /// The container's log.
    pub async fn logs(
        &self,
        pod: &str,
        tail: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let id = JobId::parse(pod).map_err(|e| BackendError::Engine(e.to_string()))?;
        self.docker.logs(&id, tail, follow).await
    }

    /// The request the Docker backend runs for `pod`, or the waiting reason and message
    /// the real kubelet would show instead.
    async fn container_request(&self, pod: &Pod) -> Result<JobRequest, (String, String)> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let refuse = |reason: &str, message: String| Err((reason.to_owned(), message));
        let Some(spec) = pod.spec.as_ref() else {
            return refuse(
                "RunContainerError",
                "fake kubelet: a pod without a spec".into(),
            );
        };
        let Some(container) = spec.containers.first() else {
            return refuse("RunContainerError", "fake kubelet: no container".into());
        };
        let image = container.image.clone().unwrap_or_default();
        let mut command = container.command.clone().unwrap_or_default();
        command.extend(container.args.clone().unwrap_or_default());
        if command.is_empty() {
            return refuse(
                "RunContainerError",
                "fake kubelet: only containers with a command are run here".into(),
            );
        }
        let limits = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let cpu = limits
            .get("cpu")
            .and_then(|q| parse_cpu(&q.0))
            .unwrap_or(1000);
        let memory = limits
            .get("memory")
            .and_then(|q| parse_memory(&q.0))
            .unwrap_or(1024);

        // Volumes: only the PVC, at the two mounts the backend uses, with their modes.
        let claims: HashMap<&str, &str> = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .map(|c| (v.name.as_str(), c.claim_name.as_str()))
            })
            .collect();
        let mut incoming = None;
        let mut outgoing = None;
        for mount in container.volume_mounts.iter().flatten() {
            let Some(claim) = claims.get(mount.name.as_str()) else {
                continue;
            };
            let Some(root) = self.claims.get(*claim) else {
                return refuse(
                    "CreateContainerConfigError",
                    format!("persistentvolumeclaim \"{claim}\" not found"),
                );
            };
            let sub_path = mount.sub_path.clone().unwrap_or_default();
            if Path::new(&sub_path).is_absolute() || sub_path.split('/').any(|p| p == "..") {
                return refuse(
                    "CreateContainerConfigError",
                    format!(
                        "failed to prepare subPath for volumeMount \"{}\": subPath {sub_path} is not a relative path inside the volume",
                        mount.name
                    ),
                );
            }
            let host = root.join(&sub_path);
            // As the real kubelet: a missing sub-path directory is created.
            if let Err(error) = std::fs::create_dir_all(&host) {
                return refuse(
                    "CreateContainerConfigError",
                    format!(
                        "failed to create subPath directory {}: {error}",
                        host.display()
                    ),
                );
            }
            let read_only = mount.read_only == Some(true);
            match mount.mount_path.as_str() {
                INCOMING_MOUNT if read_only => incoming = Some(host),
                OUTGOING_MOUNT if !read_only => outgoing = Some(host),
                other => {
                    return refuse(
                        "RunContainerError",
                        format!(
                            "fake kubelet: the Docker backend mounts only {INCOMING_MOUNT} read-only and {OUTGOING_MOUNT} read-write, not {other} (read-only {read_only})"
                        ),
                    );
                }
            }
        }
        let Some(outgoing) = outgoing else {
            return refuse(
                "RunContainerError",
                format!("fake kubelet: pod {name} mounts no {OUTGOING_MOUNT}"),
            );
        };

        let security = container.security_context.clone().unwrap_or_default();
        let user = match (security.run_as_user, security.run_as_group) {
            (Some(uid), gid) => Some(UserId {
                uid: u32::try_from(uid).unwrap_or(u32::MAX),
                gid: gid.map_or(0, |g| u32::try_from(g).unwrap_or(u32::MAX)),
            }),
            (None, _) => None,
        };
        if user.is_none() && security.run_as_non_root == Some(true) {
            // The image's own user decides, as on a real node.
            let image_user = self
                .docker
                .docker()
                .inspect_image(&image)
                .await
                .ok()
                .and_then(|i| i.config.and_then(|c| c.user))
                .unwrap_or_default();
            if image_user.is_empty() || image_user == "root" || image_user.starts_with("0") {
                return refuse(
                    "CreateContainerConfigError",
                    "container has runAsNonRoot and image will run as root".into(),
                );
            }
        }
        if user.is_some_and(|u| u.uid == 0) && security.run_as_non_root == Some(true) {
            return refuse(
                "CreateContainerConfigError",
                "container's runAsUser breaks non-root policy".into(),
            );
        }
        let mut container_labels: BTreeMap<String, String> =
            pod.metadata.labels.clone().unwrap_or_default();
        container_labels.insert(labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into());
        container_labels.insert(labels::MANAGER_ID.into(), self.kubelet_id.clone());
        let job_id = JobId::parse(&name)
            .map_err(|e| ("RunContainerError".to_owned(), format!("pod name: {e}")))?;
        Ok(JobRequest {
            job_id,
            image,
            command,
            env: container
                .env
                .iter()
                .flatten()
                .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
                .collect(),
            cpu: CpuMillis(cpu),
            memory: MemoryMib(memory),
            gpus: 0,
            workers: 1,
            time_limit: None,
            incoming,
            outgoing,
            user,
            labels: container_labels,
        })
    }
}

/// A waiting container state.
fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: (!message.is_empty()).then(|| message.to_owned()),
        }),
        ..ContainerState::default()
    }
}

fn set_container_state(pod: &mut Pod, state: ContainerState, phase: &str) {
    let image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.phase = Some(phase.into());
    status.container_statuses = Some(vec![ContainerStatus {
        name,
        image,
        ready: state.running.is_some(),
        started: Some(state.running.is_some()),
        state: Some(state),
        ..ContainerStatus::default()
    }]);
}

fn container_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()
}

fn is_active(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn condition(kind: &str, reason: &str, message: &str) -> JobCondition {
    JobCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(now()),
        last_transition_time: Some(now()),
    }
}

fn has_condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn finished_at(job: &Job) -> Option<SystemTime> {
    let status = job.status.as_ref()?;
    status
        .conditions
        .iter()
        .flatten()
        .filter(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
        .find_map(|c| c.last_transition_time.as_ref())
        .map(|t| SystemTime::from(t.0))
}

/// A new pod for `job`, as the Job controller makes it.
fn new_pod(job: &Job, version: String) -> Pod {
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let mut base = job_name.clone();
    base.truncate(57);
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
    let spec = job.spec.clone().unwrap_or_default();
    let template_meta = spec.template.metadata.clone().unwrap_or_default();
    let mut pod_spec = spec.template.spec.clone().unwrap_or_default();
    pod_spec.node_name = Some("fake-node".into());
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{base}-{suffix}")),
            namespace: job.metadata.namespace.clone(),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            resource_version: Some(version),
            creation_timestamp: Some(now()),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: job_name,
                uid: job.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                last_transition_time: Some(now()),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    };
    set_container_state(&mut pod, waiting("ContainerCreating", ""), "Pending");
    pod
}

/// What one pass of the controller decided to do outside the lock.
#[derive(Default)]
struct Work {
    start: Vec<Pod>,
    remove: Vec<Pod>,
    poll: Vec<String>,
}

/// The Job controller and the kubelet's status loop.
pub async fn run_controller(cluster: Arc<Cluster>) {
    loop {
        let work = reconcile(&cluster);
        for pod in work.remove {
            cluster.kubelet.forget(&pod);
        }
        for pod in work.start {
            start_pod(&cluster, pod);
        }
        for name in work.poll {
            poll_pod(&cluster, &name).await;
        }
        tokio::select! {
            () = cluster.changed.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One pass over the Jobs and pods, under the lock.
fn reconcile(cluster: &Cluster) -> Work {
    let mut work = Work::default();
    let mut objects = cluster.objects();
    let names: Vec<String> = objects.jobs.keys().cloned().collect();
    for name in names {
        let Some(mut job) = objects.jobs.get(&name).cloned() else {
            continue;
        };
        let before = job.clone();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let spec = job.spec.clone().unwrap_or_default();
        let owned: Vec<String> = objects
            .pods
            .iter()
            .filter(|(_, pod)| {
                pod.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let finished = has_condition(&job, "Complete") || has_condition(&job, "Failed");
        if finished {
            // ttlSecondsAfterFinished: the Job and its pods go.
            if let (Some(ttl), Some(at)) = (spec.ttl_seconds_after_finished, finished_at(&job))
                && at + Duration::from_secs(u64::try_from(ttl).unwrap_or(0)) <= SystemTime::now()
            {
                objects.jobs.remove(&name);
                for pod in owned {
                    if let Some(pod) = objects.pods.remove(&pod) {
                        work.remove.push(pod);
                    }
                }
                objects.next_version();
            }
            continue;
        }
        let status = job.status.get_or_insert_with(Default::default);
        let suspended = spec.suspend == Some(true);
        let delete_active = |objects: &mut super::Objects, work: &mut Work| {
            for pod in &owned {
                if objects.pods.get(pod).is_some_and(is_active)
                    && let Some(pod) = objects.pods.remove(pod)
                {
                    work.remove.push(pod);
                }
            }
        };
        if suspended {
            delete_active(&mut objects, &mut work);
            let status = job.status.get_or_insert_with(Default::default);
            status.active = Some(0);
            if !has_condition(&job, "Suspended") {
                job.status
                    .get_or_insert_with(Default::default)
                    .conditions
                    .get_or_insert_with(Vec::new)
                    .push(condition("Suspended", "JobSuspended", "Job suspended"));
            }
        } else {
            if status.start_time.is_none() {
                status.start_time = Some(now());
            }
            let start = status
                .start_time
                .as_ref()
                .map(|t| SystemTime::from(t.0))
                .unwrap_or_else(SystemTime::now);
            if !objects.spawned.contains(&uid) {
                objects.spawned.insert(uid.clone());
                for _ in 0..spec.parallelism.unwrap_or(1).max(0) {
                    let version = objects.next_version();
                    let pod = new_pod(&job, version);
                    let pod_name = pod.metadata.name.clone().unwrap_or_default();
                    objects.pods.insert(pod_name, pod);
                }
            }
            let pods: Vec<&Pod> = objects
                .pods
                .values()
                .filter(|pod| {
                    pod.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == uid)
                })
                .collect();
            let phase = |pod: &&Pod| pod.status.as_ref().and_then(|s| s.phase.clone());
            let succeeded = pods
                .iter()
                .filter(|p| phase(p).as_deref() == Some("Succeeded"))
                .count();
            let failed = pods
                .iter()
                .filter(|p| phase(p).as_deref() == Some("Failed"))
                .count();
            let active = pods.len() - succeeded - failed;
            let ready = pods
                .iter()
                .filter(|p| container_state(p).is_some_and(|s| s.running.is_some()))
                .count();
            let status = job.status.get_or_insert_with(Default::default);
            status.active = Some(i32::try_from(active).unwrap_or(i32::MAX));
            status.ready = Some(i32::try_from(ready).unwrap_or(i32::MAX));
            status.succeeded = Some(i32::try_from(succeeded).unwrap_or(i32::MAX));
            status.failed = Some(i32::try_from(failed).unwrap_or(i32::MAX));
            let deadline_passed = spec.active_deadline_seconds.is_some_and(|seconds| {
                start + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
                    <= SystemTime::now()
            });
            let backoff_limit = usize::try_from(spec.backoff_limit.unwrap_or(6)).unwrap_or(0);
            let completions = usize::try_from(spec.completions.unwrap_or(1)).unwrap_or(1);
            if failed > backoff_limit || deadline_passed {
                let (reason, message) = if deadline_passed && failed <= backoff_limit {
                    (
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    )
                } else {
                    (
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    )
                };
                let conditions = status.conditions.get_or_insert_with(Vec::new);
                conditions.push(condition("FailureTarget", reason, message));
                conditions.push(condition("Failed", reason, message));
                delete_active(&mut objects, &mut work);
                let status = job.status.get_or_insert_with(Default::default);
                status.active = Some(0);
            } else if succeeded >= completions {
                let conditions = status.conditions.get_or_insert_with(Vec::new);
                conditions.push(condition(
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ));
                conditions.push(condition(
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ));
                status.completion_time = Some(now());
            }
        }
        if job != before {
            job.metadata.resource_version = Some(objects.next_version());
            objects.jobs.insert(name, job);
        }
    }

    // The kubelet's side: start new pods, poll running ones, back off pulls.
    let starting = cluster
        .kubelet
        .starting
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut changed = Vec::new();
    for (name, pod) in &objects.pods {
        let state = container_state(pod);
        let waiting_reason = state
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone());
        match waiting_reason.as_deref() {
            Some("ContainerCreating") if !starting.contains(name) => work.start.push(pod.clone()),
            Some("ErrImagePull") => {
                let since = pod
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("fake.dispatch/err-image-pull-at"))
                    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                    .map(SystemTime::from);
                if since.is_some_and(|t| t + BACKOFF_AFTER <= SystemTime::now()) {
                    let image = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.containers.first())
                        .and_then(|c| c.image.clone())
                        .unwrap_or_default();
                    let mut pod = pod.clone();
                    set_container_state(
                        &mut pod,
                        waiting(
                            "ImagePullBackOff",
                            &format!("Back-off pulling image \"{image}\""),
                        ),
                        "Pending",
                    );
                    changed.push(pod);
                }
            }
            _ => {}
        }
        if state.is_some_and(|s| s.running.is_some()) {
            work.poll.push(name.clone());
        }
    }
    for pod in changed {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut pod = pod;
        pod.metadata.resource_version = Some(objects.next_version());
        objects.pods.insert(name, pod);
    }
    for pod in &work.start {
        cluster
            .kubelet
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pod.metadata.name.clone().unwrap_or_default());
    }
    work
}

/// Writes `update` into the stored pod, if it is still there (a pod deleted meanwhile
/// stays deleted); false if it was gone.
fn update_pod(cluster: &Cluster, name: &str, update: impl FnOnce(&mut Pod)) -> bool {
    let mut objects = cluster.objects();
    let version = objects.next_version();
    let Some(pod) = objects.pods.get_mut(name) else {
        return false;
    };
    update(pod);
    pod.metadata.resource_version = Some(version);
    drop(objects);
    cluster.changed.notify_one();
    true
}

/// Starts the pod's container in the background, then records how that went.
fn start_pod(cluster: &Arc<Cluster>, pod: Pod) {
    let task_cluster = Arc::clone(cluster);
    cluster.kubelet.spawn(async move {
        let cluster = task_cluster;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let outcome = match cluster.kubelet.container_request(&pod).await {
            Err(waiting_state) => Err(waiting_state),
            Ok(request) => match cluster.kubelet.docker.submit(&request).await {
                Ok(observed) => Ok(observed),
                Err(BackendError::ImageNotFound { image, reason }) => Err((
                    "ErrImagePull".to_owned(),
                    format!("failed to pull and unpack image \"{image}\": {reason}"),
                )),
                Err(error) => Err(("RunContainerError".to_owned(), error.to_string())),
            },
        };
        let still_there = update_pod(&cluster, &name, |pod| match &outcome {
            Ok(observed) => apply_observed(pod, observed),
            Err((reason, message)) => {
                if reason == "ErrImagePull" {
                    pod.metadata
                        .annotations
                        .get_or_insert_with(BTreeMap::new)
                        .insert(
                            "fake.dispatch/err-image-pull-at".into(),
                            k8s_openapi::jiff::Timestamp::now().to_string(),
                        );
                }
                set_container_state(pod, waiting(reason, message), "Pending");
            }
        });
        cluster
            .kubelet
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        if !still_there && outcome.is_ok() {
            // Deleted while starting: the container must not outlive its pod.
            cluster.kubelet.forget(&pod);
        }
    });
}

/// The pod's status from what Docker says of its container.
fn apply_observed(pod: &mut Pod, observed: &Observed) {
    let started = observed
        .started_at
        .and_then(time_of)
        .or_else(|| Some(now()));
    match observed.state {
        JobState::Queued => {}
        JobState::Running => set_container_state(
            pod,
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: started,
                }),
                ..ContainerState::default()
            },
            "Running",
        ),
        _ => {
            let exit_code =
                observed
                    .exit_code
                    .unwrap_or(if observed.state == JobState::Succeeded {
                        0
                    } else {
                        1
                    });
            let reason = if observed.reason == ReasonCode::OomKilled {
                "OOMKilled"
            } else if exit_code == 0 {
                "Completed"
            } else {
                "Error"
            };
            let phase = if exit_code == 0 && observed.reason != ReasonCode::OomKilled {
                "Succeeded"
            } else {
                "Failed"
            };
            set_container_state(
                pod,
                ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code,
                        reason: Some(reason.into()),
                        started_at: started,
                        finished_at: observed
                            .finished_at
                            .and_then(time_of)
                            .or_else(|| Some(now())),
                        container_id: Some(format!("docker://{}", observed.backend_name)),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                },
                phase,
            );
        }
    }
}

/// Asks Docker how a running pod's container is, and writes it back.
async fn poll_pod(cluster: &Arc<Cluster>, name: &str) {
    let Ok(id) = JobId::parse(name) else {
        return;
    };
    match cluster.kubelet.docker.status(&id).await {
        Ok(Some(observed)) if observed.state != JobState::Running => {
            update_pod(cluster, name, |pod| apply_observed(pod, &observed));
        }
        Ok(Some(_)) => {}
        // The container vanished under a running pod: the node lost it.
        Ok(None) => {
            update_pod(cluster, name, |pod| {
                let status = pod.status.get_or_insert_with(PodStatus::default);
                status.phase = Some("Failed".into());
                status.reason = Some("ContainerMissing".into());
                status.message = Some("fake kubelet: the container is gone".into());
                status.container_statuses = None;
            });
        }
        Err(error) => eprintln!("fake kubelet: inspecting the container of {name}: {error}"),
    }
}

//! A Job and its pods as an [`Observed`]: pure, so every state and reason is checked by
//! unit tests on typed objects.
//!
//! What pman got wrong and this must not (pfcon-api.md §9 item 4): a finished Job is
//! always SUCCEEDED or FAILED with its exit code, never "undefined" (pman#225); an OOM
//! kill says so (pman#206); an image that cannot be pulled is an image failure as soon as
//! the pod says so (pman#234); a pod still being created is QUEUED with what Kubernetes
//! says (pman#226).

use std::collections::BTreeMap;
use std::time::SystemTime;

use dispatch_manager::Observed;
use dispatch_manager::backend::labels;
use dispatch_proto::job::JobId;
use dispatch_proto::v1::{JobState, ReasonCode};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerState, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::names::{ANNOTATION_JOB_ID, ANNOTATION_KILLED_AT, ANNOTATION_LABELS, label_value};

/// Waiting reasons that mean the image cannot be had.
const IMAGE_FAILURES: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];
/// Waiting reasons that mean the container cannot be made as specified; Kubernetes
/// retries them, but with a fixed spec they do not heal.
const CONFIG_FAILURES: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

fn to_time(time: &Time) -> SystemTime {
    SystemTime::from(time.0)
}

/// Whether the Job is ours: labelled as managed by the suite for `manager_id`, and
/// carrying a job id.
pub fn is_owned(job: &Job, manager_id: &str) -> bool {
    let Some(labels) = job.metadata.labels.as_ref() else {
        return false;
    };
    labels.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGED_BY_VALUE)
        && labels.get(labels::MANAGER_ID) == Some(&label_value(manager_id))
        && job_id_of(job).is_some()
}

/// The exact job id the Job was created for.
pub fn job_id_of(job: &Job) -> Option<JobId> {
    job.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_JOB_ID)
        .and_then(|id| JobId::parse(id).ok())
}

/// Whether `kill` stopped the Job.
pub fn was_killed(job: &Job) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_KILLED_AT))
}

/// The pods of `job` among `pods`: those it controls (by owner uid), so a Job created
/// anew under the same name never reads an old one's pods. Sorted by name.
pub fn pods_of<'a>(job: &Job, pods: &'a [Pod]) -> Vec<&'a Pod> {
    let Some(uid) = job.metadata.uid.as_deref() else {
        return Vec::new();
    };
    let mut owned: Vec<&Pod> = pods
        .iter()
        .filter(|pod| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|owner| owner.uid == uid)
        })
        .collect();
    owned.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    owned
}

/// The state of the pod's job container (its first).
fn container_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()
}

/// Whether the pod's container has started (its log can be read).
pub fn has_started(pod: &Pod) -> bool {
    container_state(pod).is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

/// Whether the pod's container has ended.
pub fn has_ended(pod: &Pod) -> bool {
    container_state(pod).is_some_and(|s| s.terminated.is_some())
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"))
}

/// Why a pod that has not started waits, in Kubernetes' words.
pub fn waiting_reason(pod: &Pod) -> String {
    if let Some(waiting) = container_state(pod).and_then(|s| s.waiting.as_ref()) {
        let reason = waiting.reason.as_deref().unwrap_or("Waiting");
        return match waiting.message.as_deref() {
            Some(message) if !message.is_empty() => format!("{reason}: {message}"),
            _ => reason.to_owned(),
        };
    }
    let status = pod.status.as_ref();
    if let Some(unscheduled) = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return format!(
            "{}: {}",
            unscheduled.reason.as_deref().unwrap_or("Unschedulable"),
            unscheduled
                .message
                .as_deref()
                .unwrap_or("not scheduled yet")
        );
    }
    status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into())
}

/// A condition of the Job that is `True`.
fn true_condition<'a>(
    job: &'a Job,
    kind: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")
}

/// What a state comes with.
struct Outcome {
    state: JobState,
    reason: ReasonCode,
    exit_code: Option<i32>,
    message: String,
}

impl Outcome {
    fn new(state: JobState, reason: ReasonCode, exit_code: Option<i32>, message: String) -> Self {
        Self {
            state,
            reason,
            exit_code,
            message,
        }
    }
}

/// How a pod whose container ended failed, if it did.
fn pod_failure(pod: &Pod) -> Option<Outcome> {
    let status = pod.status.as_ref()?;
    if let Some(terminated) = container_state(pod).and_then(|s| s.terminated.as_ref()) {
        let reason = terminated.reason.as_deref().unwrap_or("Error");
        let detail = terminated
            .message
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(|m| format!("{reason}: {m}"))
            .unwrap_or_else(|| reason.to_owned());
        if reason == "OOMKilled" {
            return Some(Outcome::new(
                JobState::Failed,
                ReasonCode::OomKilled,
                Some(terminated.exit_code),
                detail,
            ));
        }
        if terminated.exit_code != 0 {
            return Some(Outcome::new(
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(terminated.exit_code),
                format!("{detail} (exit code {})", terminated.exit_code),
            ));
        }
        return None;
    }
    if status.phase.as_deref() == Some("Failed") {
        // Failed without a terminated container: the node took it back (eviction,
        // deadline, a lost node).
        let reason = status.reason.as_deref().unwrap_or("Failed");
        let message = format!(
            "{reason}: {}",
            status.message.as_deref().unwrap_or("the pod failed")
        );
        let code = match reason {
            "Evicted" | "Preempting" => ReasonCode::Preempted,
            "DeadlineExceeded" => ReasonCode::TimeLimit,
            "NodeLost" | "Shutdown" | "Terminated" => ReasonCode::NodeFail,
            _ => ReasonCode::BackendError,
        };
        return Some(Outcome::new(JobState::Failed, code, None, message));
    }
    None
}

/// The container of a pod that will never start, if one will not: its image cannot be
/// pulled, or it cannot be created as specified.
fn pod_cannot_start(pod: &Pod) -> Option<Outcome> {
    let waiting = container_state(pod)?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    let message = format!(
        "{reason}: {}",
        waiting.message.as_deref().unwrap_or("no detail")
    );
    if IMAGE_FAILURES.contains(&reason) {
        return Some(Outcome::new(
            JobState::Failed,
            ReasonCode::ImageNotFound,
            None,
            message,
        ));
    }
    if CONFIG_FAILURES.contains(&reason) {
        return Some(Outcome::new(
            JobState::Failed,
            ReasonCode::BackendError,
            None,
            message,
        ));
    }
    None
}

/// The state of a Job with its pods, with a reason for every end.
fn outcome(job: &Job, pods: &[&Pod]) -> Outcome {
    let status = job.status.clone().unwrap_or_default();
    let completions = job
        .spec
        .as_ref()
        .and_then(|s| s.completions)
        .unwrap_or(1)
        .max(1);
    let first_failure = || pods.iter().find_map(|pod| pod_failure(pod));

    if true_condition(job, "Complete").is_some() {
        return Outcome::new(
            JobState::Succeeded,
            ReasonCode::ExitCode,
            Some(0),
            "Completed".into(),
        );
    }
    if was_killed(job) {
        // Stopped by `kill`: whatever the container did after, this is why it ended.
        let exit_code = first_failure().and_then(|f| f.exit_code);
        return Outcome::new(
            JobState::Failed,
            ReasonCode::Cancelled,
            exit_code,
            "stopped by the manager (the Job is suspended)".into(),
        );
    }
    if let Some(failed) = true_condition(job, "Failed") {
        let condition_reason = failed.reason.as_deref().unwrap_or("Failed");
        let condition_message = failed.message.as_deref().unwrap_or("the Job failed");
        if condition_reason == "DeadlineExceeded" {
            return Outcome::new(
                JobState::Failed,
                ReasonCode::TimeLimit,
                first_failure().and_then(|f| f.exit_code),
                format!("{condition_reason}: {condition_message}"),
            );
        }
        if let Some(failure) = first_failure() {
            return failure;
        }
        if let Some(never) = pods.iter().find_map(|pod| pod_cannot_start(pod)) {
            return never;
        }
        // The failed pod is gone (deleted, or garbage-collected): the Job's words are all
        // there is.
        return Outcome::new(
            JobState::Failed,
            ReasonCode::BackendError,
            None,
            format!("{condition_reason}: {condition_message}"),
        );
    }
    // The Job controller lags behind its pods: a failed pod fails the Job (backoffLimit
    // is 0), and a pod that can never start will not either.
    if let Some(failure) = first_failure() {
        return failure;
    }
    if let Some(never) = pods.iter().find_map(|pod| pod_cannot_start(pod)) {
        return never;
    }
    let succeeded_pods = pods
        .iter()
        .filter(|pod| {
            container_state(pod)
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0)
        })
        .count();
    let succeeded = usize::try_from(status.succeeded.unwrap_or(0).max(0)).unwrap_or(0);
    let needed = usize::try_from(completions).unwrap_or(1);
    if succeeded_pods.max(succeeded) >= needed {
        return Outcome::new(
            JobState::Succeeded,
            ReasonCode::ExitCode,
            Some(0),
            "Completed".into(),
        );
    }
    if status.failed.unwrap_or(0) > 0 {
        return Outcome::new(
            JobState::Failed,
            ReasonCode::BackendError,
            None,
            "a pod failed and its record is gone".into(),
        );
    }
    if pods
        .iter()
        .any(|pod| container_state(pod).is_some_and(|s| s.running.is_some()))
        || succeeded_pods > 0
    {
        return Outcome::new(
            JobState::Running,
            ReasonCode::Unspecified,
            None,
            "running".into(),
        );
    }
    let message = match pods.first() {
        Some(pod) => waiting_reason(pod),
        None if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) => {
            "the Job is suspended".into()
        }
        None => "waiting for the Job controller to create a pod".into(),
    };
    Outcome::new(JobState::Queued, ReasonCode::Unspecified, None, message)
}

/// When the first container started, and when the job ended.
fn times(job: &Job, pods: &[&Pod], finished: bool) -> (Option<SystemTime>, Option<SystemTime>) {
    let states: Vec<&ContainerState> = pods.iter().filter_map(|pod| container_state(pod)).collect();
    let started = states
        .iter()
        .filter_map(|s| {
            s.running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| s.terminated.as_ref().and_then(|t| t.started_at.as_ref()))
        })
        .map(to_time)
        .min();
    if !finished {
        return (started, None);
    }
    let status = job.status.as_ref();
    let condition_time = ["Complete", "Failed"]
        .iter()
        .filter_map(|kind| true_condition(job, kind))
        .find_map(|c| c.last_transition_time.as_ref());
    let killed_at = job
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_KILLED_AT))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(SystemTime::from);
    let last_exit = states
        .iter()
        .filter_map(|s| s.terminated.as_ref().and_then(|t| t.finished_at.as_ref()))
        .map(to_time)
        .max();
    let finished_at = status
        .and_then(|s| s.completion_time.as_ref())
        .or(condition_time)
        .map(to_time)
        .or(killed_at)
        .or(last_exit)
        .or_else(|| job.metadata.creation_timestamp.as_ref().map(to_time))
        // A job that never started (an image failure) still ended at some time.
        .or_else(|| Some(SystemTime::now()));
    // Never end before starting (clocks of different nodes).
    let started = match (started, finished_at) {
        (Some(s), Some(f)) if s > f => Some(f),
        (s, _) => s,
    };
    (started, finished_at)
}

/// What the Job and its pods say of the job, or `None` if the Job carries no job id.
pub fn observe(job: &Job, pods: &[&Pod]) -> Option<Observed> {
    let job_id = job_id_of(job)?;
    let outcome = outcome(job, pods);
    let finished = matches!(outcome.state, JobState::Succeeded | JobState::Failed);
    let (started_at, finished_at) = times(job, pods, finished);
    let container = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first());
    let mut command = container
        .and_then(|c| c.command.clone())
        .unwrap_or_default();
    command.extend(container.and_then(|c| c.args.clone()).unwrap_or_default());
    let exact_labels: Option<BTreeMap<String, String>> = job
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LABELS))
        .and_then(|text| serde_json::from_str(text).ok());
    Some(Observed {
        job_id,
        state: outcome.state,
        reason: outcome.reason,
        exit_code: outcome.exit_code,
        message: outcome.message,
        image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
        command,
        started_at,
        finished_at,
        backend_name: job.metadata.name.clone().unwrap_or_default(),
        labels: exact_labels
            .or_else(|| job.metadata.labels.clone())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use k8s_openapi::api::batch::v1::{JobCondition, JobSpec, JobStatus};
    use k8s_openapi::api::core::v1::{
        Container, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, PodCondition, PodSpec, PodStatus, PodTemplateSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    pub(crate) fn job() -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some("chris-jid-7".into()),
                uid: Some("uid-1".into()),
                creation_timestamp: Some(at(1_700_000_000)),
                labels: Some(BTreeMap::from([
                    (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
                    (labels::MANAGER_ID.into(), "m1".into()),
                ])),
                annotations: Some(BTreeMap::from([
                    (ANNOTATION_JOB_ID.into(), "Chris_JID.7".into()),
                    (
                        ANNOTATION_LABELS.into(),
                        r#"{"org.chrisproject.dispatch.manager-id":"m1","x y":"z"}"#.into(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                completions: Some(1),
                parallelism: Some(1),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "job".into(),
                            image: Some("localhost/x:1".into()),
                            command: Some(vec!["sh".into(), "-c".into()]),
                            args: Some(vec!["exit 3".into()]),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: Some(JobStatus {
                start_time: Some(at(1_700_000_001)),
                ..JobStatus::default()
            }),
        }
    }

    pub(crate) fn pod(state: ContainerState, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("chris-jid-7-abcde".into()),
                owner_references: Some(vec![OwnerReference {
                    uid: "uid-1".into(),
                    name: "chris-jid-7".into(),
                    kind: "Job".into(),
                    api_version: "batch/v1".into(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "job".into(),
                    state: Some(state),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn waiting(reason: &str, message: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            ..ContainerState::default()
        }
    }

    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(at(1_700_000_010)),
            }),
            ..ContainerState::default()
        }
    }

    fn terminated(exit_code: i32, reason: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                reason: Some(reason.into()),
                started_at: Some(at(1_700_000_010)),
                finished_at: Some(at(1_700_000_020)),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }
    }

    fn with_condition(mut job: Job, kind: &str, reason: &str, message: &str) -> Job {
        let status = job.status.get_or_insert_with(JobStatus::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(JobCondition {
                type_: kind.into(),
                status: "True".into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                last_transition_time: Some(at(1_700_000_021)),
                ..JobCondition::default()
            });
        if kind == "Complete" {
            status.completion_time = Some(at(1_700_000_021));
            status.succeeded = Some(1);
        } else {
            status.failed = Some(1);
        }
        job
    }

    fn seen(job: &Job, pods: &[Pod]) -> Observed {
        let pods: Vec<&Pod> = pods_of(job, pods);
        observe(job, &pods).unwrap()
    }

    fn summary(o: &Observed) -> (JobState, ReasonCode, Option<i32>) {
        (o.state, o.reason, o.exit_code)
    }

    #[test]
    fn a_new_job_is_queued_until_its_container_runs() {
        let none = seen(&job(), &[]);
        assert_eq!(
            summary(&none),
            (JobState::Queued, ReasonCode::Unspecified, None)
        );
        assert!(none.message.contains("Job controller"), "{}", none.message);
        let creating = seen(&job(), &[pod(waiting("ContainerCreating", ""), "Pending")]);
        assert_eq!(creating.state, JobState::Queued);
        assert_eq!(creating.message, "ContainerCreating");
        assert_eq!(creating.started_at, None);
        let run = seen(&job(), &[pod(running(), "Running")]);
        assert_eq!(
            summary(&run),
            (JobState::Running, ReasonCode::Unspecified, None)
        );
        assert_eq!(
            run.started_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_010))
        );
        assert_eq!(run.finished_at, None);
    }

    #[test]
    fn an_unschedulable_pod_is_queued_with_the_schedulers_words() {
        let mut pending = pod(ContainerState::default(), "Pending");
        if let Some(status) = pending.status.as_mut() {
            status.container_statuses = None;
            status.conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
                ..PodCondition::default()
            }]);
        }
        let queued = seen(&job(), &[pending]);
        assert_eq!(queued.state, JobState::Queued);
        assert!(
            queued.message.starts_with("Unschedulable: 0/3 nodes"),
            "{}",
            queued.message
        );
    }

    #[test]
    fn a_finished_job_is_succeeded_or_failed_with_its_exit_code_never_undefined() {
        let done = with_condition(job(), "Complete", "CompletionsReached", "");
        let ok = seen(&done, &[pod(terminated(0, "Completed"), "Succeeded")]);
        assert_eq!(
            summary(&ok),
            (JobState::Succeeded, ReasonCode::ExitCode, Some(0))
        );
        assert_eq!(
            ok.finished_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_021))
        );
        // pman#225: the pods are gone (TTL, GC), the Job still says how it ended.
        assert_eq!(seen(&done, &[]).state, JobState::Succeeded);

        let failed = with_condition(
            job(),
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        );
        let exit3 = seen(&failed, &[pod(terminated(3, "Error"), "Failed")]);
        assert_eq!(
            summary(&exit3),
            (JobState::Failed, ReasonCode::ExitCode, Some(3))
        );
        assert!(exit3.finished_at.is_some());
        let gone = seen(&failed, &[]);
        assert_eq!(
            summary(&gone),
            (JobState::Failed, ReasonCode::BackendError, None)
        );
        assert!(
            gone.message.contains("BackoffLimitExceeded"),
            "{}",
            gone.message
        );
    }

    #[test]
    fn a_failed_pod_fails_the_job_before_the_controller_says_so() {
        let exit3 = seen(&job(), &[pod(terminated(3, "Error"), "Failed")]);
        assert_eq!(
            summary(&exit3),
            (JobState::Failed, ReasonCode::ExitCode, Some(3))
        );
        // A pod that ended 0 while the Job is not yet Complete: succeeded too.
        let ok = seen(&job(), &[pod(terminated(0, "Completed"), "Succeeded")]);
        assert_eq!(ok.state, JobState::Succeeded);
    }

    #[test]
    fn oom_kills_are_reported() {
        let failed = with_condition(job(), "Failed", "BackoffLimitExceeded", "");
        let oom = seen(&failed, &[pod(terminated(137, "OOMKilled"), "Failed")]);
        assert_eq!(
            summary(&oom),
            (JobState::Failed, ReasonCode::OomKilled, Some(137))
        );
        assert!(oom.message.contains("OOMKilled"), "{}", oom.message);
    }

    #[test]
    fn image_failures_fail_at_once() {
        for reason in IMAGE_FAILURES {
            let bad = seen(
                &job(),
                &[pod(
                    waiting(reason, "pull access denied for localhost/x"),
                    "Pending",
                )],
            );
            assert_eq!(
                summary(&bad),
                (JobState::Failed, ReasonCode::ImageNotFound, None),
                "{reason}"
            );
            assert!(bad.message.starts_with(reason), "{}", bad.message);
            assert!(bad.finished_at.is_some());
        }
        let config = seen(
            &job(),
            &[pod(
                waiting(
                    "CreateContainerConfigError",
                    "container has runAsNonRoot and image will run as root",
                ),
                "Pending",
            )],
        );
        assert_eq!(
            summary(&config),
            (JobState::Failed, ReasonCode::BackendError, None)
        );
        assert!(config.message.contains("runAsNonRoot"));
    }

    #[test]
    fn a_deadline_is_a_time_limit() {
        let late = with_condition(
            job(),
            "Failed",
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        );
        let seen_late = seen(&late, &[]);
        assert_eq!(
            summary(&seen_late),
            (JobState::Failed, ReasonCode::TimeLimit, None)
        );
        assert!(seen_late.message.contains("DeadlineExceeded"));
        // Evicted and node-lost pods.
        let mut evicted = pod(ContainerState::default(), "Failed");
        if let Some(status) = evicted.status.as_mut() {
            status.container_statuses = None;
            status.reason = Some("Evicted".into());
            status.message = Some("The node was low on resource: memory.".into());
        }
        assert_eq!(seen(&job(), &[evicted]).reason, ReasonCode::Preempted);
    }

    #[test]
    fn a_killed_job_is_failed_cancelled_unless_it_had_completed() {
        let mut killed = job();
        if let Some(a) = killed.metadata.annotations.as_mut() {
            a.insert(ANNOTATION_KILLED_AT.into(), "2023-11-14T22:13:30Z".into());
        }
        killed.spec.as_mut().unwrap().suspend = Some(true);
        let stopped = seen(&killed, &[]);
        assert_eq!(
            summary(&stopped),
            (JobState::Failed, ReasonCode::Cancelled, None)
        );
        assert_eq!(
            stopped.finished_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_010))
        );
        let done_first = with_condition(killed, "Complete", "CompletionsReached", "");
        assert_eq!(seen(&done_first, &[]).state, JobState::Succeeded);
    }

    #[test]
    fn the_record_carries_what_was_run_and_the_exact_labels() {
        let o = seen(&job(), &[]);
        assert_eq!(o.job_id.as_str(), "Chris_JID.7");
        assert_eq!(o.backend_name, "chris-jid-7");
        assert_eq!(o.image, "localhost/x:1");
        assert_eq!(o.command, ["sh", "-c", "exit 3"]);
        assert_eq!(o.labels.get("x y").map(String::as_str), Some("z"));
    }

    #[test]
    fn ownership_needs_both_labels_and_a_job_id() {
        assert!(is_owned(&job(), "m1"));
        assert!(!is_owned(&job(), "m2"));
        let mut anonymous = job();
        anonymous.metadata.annotations = None;
        assert!(!is_owned(&anonymous, "m1"));
        assert!(observe(&anonymous, &[]).is_none());
        let mut foreign = job();
        if let Some(l) = foreign.metadata.labels.as_mut() {
            l.insert(labels::MANAGED_BY.into(), "someone-else".into());
        }
        assert!(!is_owned(&foreign, "m1"));
    }

    #[test]
    fn only_the_jobs_own_pods_count() {
        let mut stranger = pod(terminated(3, "Error"), "Failed");
        if let Some(owners) = stranger.metadata.owner_references.as_mut() {
            owners[0].uid = "uid-of-an-older-job".into();
        }
        assert_eq!(seen(&job(), &[stranger]).state, JobState::Queued);
    }
}

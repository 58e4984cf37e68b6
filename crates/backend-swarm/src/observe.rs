//! What Swarm says of a job's service, its task and the task's container, in the suite's
//! terms: pure, so each task state is checked by unit tests without a swarm.

use std::collections::HashMap;
use std::time::SystemTime;

use bollard::models::{ContainerInspectResponse, Service, Task, TaskState, TaskStatus};
use dispatch_backend_docker::parse_time;
use dispatch_manager::Observed;
use dispatch_manager::backend::labels;
use dispatch_proto::job::JobId;
use dispatch_proto::v1::{JobState, ReasonCode};

/// The exit code of a process killed by SIGKILL, which is how the kernel's OOM killer ends
/// a container.
const SIGKILL_EXIT_CODE: i32 = 137;

/// Whether labels mark a service as created by the suite for this manager.
pub(crate) fn is_owned(labels: Option<&HashMap<String, String>>, manager_id: &str) -> bool {
    labels.is_some_and(|labels| {
        labels.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGED_BY_VALUE)
            && labels.get(labels::MANAGER_ID).map(String::as_str) == Some(manager_id)
    })
}

/// The service's labels.
pub(crate) fn service_labels(service: &Service) -> Option<&HashMap<String, String>> {
    service.spec.as_ref().and_then(|spec| spec.labels.as_ref())
}

/// The job a service runs, from its job id label (the service's name may be derived from
/// the id, see [`crate::spec::service_name`]).
pub(crate) fn service_job_id(service: &Service) -> Option<JobId> {
    let id = service_labels(service)?.get(labels::JOB_ID)?;
    JobId::parse(id).ok()
}

/// Whether the task can change no more.
pub(crate) fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::COMPLETE
            | TaskState::FAILED
            | TaskState::REJECTED
            | TaskState::SHUTDOWN
            | TaskState::REMOVE
            | TaskState::ORPHANED
    )
}

/// The task that says how the job went: the newest one (a job service has one task per
/// run, and restart condition `none` makes no other).
pub(crate) fn current_task(tasks: &[Task]) -> Option<&Task> {
    tasks.iter().max_by_key(|task| {
        (
            task.created_at
                .as_ref()
                .and_then(|_| text_field(*task, "CreatedAt"))
                .and_then(|text| parse_time(&text)),
            task.version.as_ref().and_then(|version| version.index),
        )
    })
}

/// The container id of a task, once the engine made one.
pub(crate) fn task_container_id(task: &Task) -> Option<&str> {
    task.status
        .as_ref()
        .and_then(|status| status.container_status.as_ref())
        .and_then(|container| container.container_id.as_deref())
        .filter(|id| !id.is_empty())
}

/// A timestamp field of a model as RFC 3339 text, whatever type bollard's features give
/// its dates (a string, chrono or time): serialised, it is always text.
fn text_field(model: &impl serde::Serialize, field: &str) -> Option<String> {
    let value = serde_json::to_value(model).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

fn status_time(status: &TaskStatus) -> Option<SystemTime> {
    text_field(status, "Timestamp").and_then(|text| parse_time(&text))
}

/// What the engine says of the job, or `None` when the service has no valid job id
/// label.
///
/// `container` is the task's container as the local engine inspects it (`None` when the
/// task has none yet, or it runs on another node): it gives exact start and end times and
/// the `OOMKilled` flag. Like the docker backend, an exit code of 137 under a memory
/// limit without a kill by this backend (`killed_by_us`) is read as an out-of-memory kill
/// even when the flag is false.
pub(crate) fn observe(
    service: &Service,
    task: Option<&Task>,
    container: Option<&ContainerInspectResponse>,
    killed_by_us: bool,
) -> Option<Observed> {
    let job_id = service_job_id(service)?;
    let spec = service.spec.as_ref();
    let container_spec = spec
        .and_then(|spec| spec.task_template.as_ref())
        .and_then(|template| template.container_spec.as_ref());
    let command = container_spec
        .map(|c| {
            c.command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let memory_limited = spec
        .and_then(|spec| spec.task_template.as_ref())
        .and_then(|template| template.resources.as_ref())
        .and_then(|resources| resources.limits.as_ref())
        .and_then(|limits| limits.memory_bytes)
        .is_some_and(|bytes| bytes > 0);
    let outcome = outcome(task, container, memory_limited, killed_by_us);
    let (started_at, finished_at) = times(task, container, outcome.state);
    Some(Observed {
        job_id,
        state: outcome.state,
        reason: outcome.reason,
        exit_code: outcome.exit_code,
        message: outcome.message,
        image: container_spec
            .and_then(|c| c.image.clone())
            .unwrap_or_default(),
        command,
        started_at,
        finished_at,
        backend_name: spec.and_then(|s| s.name.clone()).unwrap_or_default(),
        labels: service_labels(service)
            .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    })
}

/// When the job started and ended: the container's own times when the local engine has
/// it, else the task's status time (the time of its last change) for the state it is in.
fn times(
    task: Option<&Task>,
    container: Option<&ContainerInspectResponse>,
    state: JobState,
) -> (Option<SystemTime>, Option<SystemTime>) {
    let container_state = container.and_then(|c| c.state.as_ref());
    let finished_at = container_state
        .and_then(|s| s.finished_at.as_deref())
        .and_then(parse_time);
    // As in the docker backend: a job of a few milliseconds can have StartedAt after its
    // FinishedAt, and it cannot have started after it finished.
    let started_at = container_state
        .and_then(|s| s.started_at.as_deref())
        .and_then(parse_time)
        .map(|started| finished_at.map_or(started, |finished| started.min(finished)));
    let status_at = task.and_then(|t| t.status.as_ref()).and_then(status_time);
    match state {
        JobState::Queued => (None, None),
        JobState::Running => (started_at.or(status_at), None),
        _ => (started_at, finished_at.or(status_at)),
    }
}

struct Outcome {
    state: JobState,
    reason: ReasonCode,
    exit_code: Option<i32>,
    message: String,
}

fn outcome(
    task: Option<&Task>,
    container: Option<&ContainerInspectResponse>,
    memory_limited: bool,
    killed_by_us: bool,
) -> Outcome {
    let outcome = |state, reason, exit_code, message| Outcome {
        state,
        reason,
        exit_code,
        message,
    };
    let Some(task) = task else {
        return outcome(
            JobState::Queued,
            ReasonCode::Unspecified,
            None,
            "no task yet: the swarm has not scheduled the job".into(),
        );
    };
    let status = task.status.clone().unwrap_or_default();
    let state = status.state.unwrap_or_default();
    let error = status.err.clone().filter(|e| !e.is_empty());
    let task_message = status.message.clone().filter(|m| !m.is_empty());
    // `failed: task: non-zero exit (3)`, `rejected: No such image: x`, `pending: no
    // suitable node (insufficient resources on 1 node)`.
    let mut message = state.to_string();
    if let Some(detail) = error.as_ref().or(task_message.as_ref()) {
        message.push_str(": ");
        message.push_str(detail);
    }
    let task_exit_code = status
        .container_status
        .as_ref()
        .and_then(|c| c.exit_code)
        .and_then(|code| i32::try_from(code).ok());
    let container_state = container.and_then(|c| c.state.as_ref());
    let exit_code = container_state
        .and_then(|s| s.exit_code)
        .and_then(|code| i32::try_from(code).ok())
        .or(task_exit_code);
    let oom_flag = container_state.is_some_and(|s| s.oom_killed == Some(true));
    let started = container_state
        .is_some_and(|s| s.started_at.as_deref().and_then(parse_time).is_some())
        || task_container_id(task).is_some();

    use TaskState as S;
    match state {
        S::NEW
        | S::ALLOCATED
        | S::PENDING
        | S::ASSIGNED
        | S::ACCEPTED
        | S::PREPARING
        | S::READY
        | S::STARTING => outcome(JobState::Queued, ReasonCode::Unspecified, None, message),
        S::RUNNING => outcome(JobState::Running, ReasonCode::Unspecified, None, message),
        S::COMPLETE => outcome(JobState::Succeeded, ReasonCode::ExitCode, Some(0), message),
        S::FAILED | S::SHUTDOWN => {
            let code = exit_code.filter(|_| started);
            match code {
                Some(code) if oom_flag => {
                    message.push_str(" (OOMKilled)");
                    outcome(JobState::Failed, ReasonCode::OomKilled, Some(code), message)
                }
                Some(SIGKILL_EXIT_CODE) if memory_limited && !killed_by_us => {
                    message.push_str(" (exit code 137 under a memory limit: taken as OOMKilled)");
                    outcome(
                        JobState::Failed,
                        ReasonCode::OomKilled,
                        Some(SIGKILL_EXIT_CODE),
                        message,
                    )
                }
                // The swarm stopped the task (its service was changed or removed, its
                // node drained): killed, not ended by itself.
                _ if state == S::SHUTDOWN => {
                    outcome(JobState::Failed, ReasonCode::Cancelled, code, message)
                }
                Some(code) if code != 0 => {
                    outcome(JobState::Failed, ReasonCode::ExitCode, Some(code), message)
                }
                // Failed without an exit code of its own: the container could not be
                // created or started (a bad mount, a missing executable).
                _ => outcome(
                    JobState::Failed,
                    ReasonCode::BackendError,
                    code.filter(|&c| c != 0),
                    message,
                ),
            }
        }
        S::REJECTED => {
            let reason = if error
                .as_deref()
                .is_some_and(|e| e.contains("No such image") || e.contains("pull access denied"))
            {
                ReasonCode::ImageNotFound
            } else {
                ReasonCode::BackendError
            };
            outcome(JobState::Failed, reason, None, message)
        }
        // `remove`: on its way out with its service; `orphaned`: its node has been
        // unreachable too long for the swarm to know.
        S::REMOVE | S::ORPHANED => {
            outcome(JobState::Lost, ReasonCode::NodeFail, exit_code, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{
        ContainerState, ContainerStatus, Limit, ObjectVersion, ServiceSpec, TaskSpec,
        TaskSpecContainerSpec, TaskSpecResources,
    };
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn service() -> Service {
        let labels = HashMap::from([
            (
                labels::MANAGED_BY.to_owned(),
                labels::MANAGED_BY_VALUE.to_owned(),
            ),
            (labels::MANAGER_ID.to_owned(), "m1".to_owned()),
            (labels::JOB_ID.to_owned(), "chris-jid.7".to_owned()),
        ]);
        Service {
            id: Some("svc1".into()),
            spec: Some(ServiceSpec {
                name: Some("chris-jid-7-0123456789abcdef".into()),
                labels: Some(labels),
                task_template: Some(TaskSpec {
                    container_spec: Some(TaskSpecContainerSpec {
                        image: Some("localhost/x:1".into()),
                        command: Some(vec!["sh".into(), "-c".into()]),
                        args: Some(vec!["exit 3".into()]),
                        ..TaskSpecContainerSpec::default()
                    }),
                    resources: Some(TaskSpecResources {
                        limits: Some(Limit {
                            memory_bytes: Some(32 << 20),
                            ..Limit::default()
                        }),
                        ..TaskSpecResources::default()
                    }),
                    ..TaskSpec::default()
                }),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn task(state: TaskState, exit_code: i64, err: &str) -> Task {
        serde_json::from_value(serde_json::json!({
            "ID": "t1",
            "CreatedAt": "2024-05-01T10:00:00.1Z",
            "Version": {"Index": 10},
            "Status": {
                "Timestamp": "2024-05-01T10:00:02Z",
                "State": state.to_string(),
                "Message": "started",
                "Err": err,
                "ContainerStatus": {
                    "ContainerID": if state == TaskState::REJECTED { "" } else { "c1" },
                    "ExitCode": exit_code
                }
            }
        }))
        .unwrap()
    }

    fn container(exit_code: i64, oom: bool) -> ContainerInspectResponse {
        ContainerInspectResponse {
            state: Some(ContainerState {
                exit_code: Some(exit_code),
                oom_killed: Some(oom),
                started_at: Some("2024-05-01T10:00:00.5Z".into()),
                finished_at: Some("2024-05-01T10:00:01.5Z".into()),
                ..ContainerState::default()
            }),
            ..ContainerInspectResponse::default()
        }
    }

    fn seen(
        task: &Task,
        container: Option<&ContainerInspectResponse>,
    ) -> (JobState, ReasonCode, Option<i32>) {
        let o = observe(&service(), Some(task), container, false).unwrap();
        (o.state, o.reason, o.exit_code)
    }

    #[test]
    fn task_states_map_as_pfcon_maps_them() {
        use TaskState as S;
        for queued in [
            S::NEW,
            S::ALLOCATED,
            S::PENDING,
            S::ASSIGNED,
            S::ACCEPTED,
            S::PREPARING,
            S::READY,
            S::STARTING,
        ] {
            assert_eq!(
                seen(&task(queued, 0, ""), None),
                (JobState::Queued, ReasonCode::Unspecified, None),
                "{queued}"
            );
        }
        assert_eq!(
            seen(&task(S::RUNNING, 0, ""), None),
            (JobState::Running, ReasonCode::Unspecified, None)
        );
        assert_eq!(
            seen(&task(S::COMPLETE, 0, ""), None),
            (JobState::Succeeded, ReasonCode::ExitCode, Some(0))
        );
        assert_eq!(
            seen(&task(S::FAILED, 3, "task: non-zero exit (3)"), None),
            (JobState::Failed, ReasonCode::ExitCode, Some(3))
        );
        assert_eq!(seen(&task(S::ORPHANED, 0, ""), None).0, JobState::Lost);
    }

    #[test]
    fn no_task_yet_is_queued() {
        let o = observe(&service(), None, None, false).unwrap();
        assert_eq!(o.state, JobState::Queued);
        assert!(o.message.contains("no task yet"), "{}", o.message);
    }

    #[test]
    fn the_record_carries_what_was_run() {
        let failed = task(TaskState::FAILED, 3, "task: non-zero exit (3)");
        let o = observe(&service(), Some(&failed), Some(&container(3, false)), false).unwrap();
        assert_eq!(o.job_id.as_str(), "chris-jid.7");
        assert_eq!(o.backend_name, "chris-jid-7-0123456789abcdef");
        assert_eq!(o.image, "localhost/x:1");
        assert_eq!(o.command, ["sh", "-c", "exit 3"]);
        assert_eq!(o.message, "failed: task: non-zero exit (3)");
        assert_eq!(
            o.labels.get(labels::MANAGER_ID).map(String::as_str),
            Some("m1")
        );
        assert_eq!(
            o.started_at,
            Some(UNIX_EPOCH + Duration::new(1_714_557_600, 500_000_000))
        );
        assert_eq!(
            o.finished_at,
            Some(UNIX_EPOCH + Duration::new(1_714_557_601, 500_000_000))
        );
        // Without the container (another node): the task's own time.
        let o = observe(&service(), Some(&failed), None, false).unwrap();
        assert_eq!(o.started_at, None);
        assert_eq!(
            o.finished_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_714_557_602))
        );
        let running = task(TaskState::RUNNING, 0, "");
        let o = observe(&service(), Some(&running), None, false).unwrap();
        assert_eq!(
            o.started_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_714_557_602))
        );
        assert_eq!(o.finished_at, None);
    }

    #[test]
    fn oom_by_flag_or_by_exit_code_unless_we_killed_it() {
        let failed = task(TaskState::FAILED, 137, "task: non-zero exit (137)");
        assert_eq!(
            seen(&failed, Some(&container(137, true))),
            (JobState::Failed, ReasonCode::OomKilled, Some(137))
        );
        assert_eq!(
            seen(&failed, None),
            (JobState::Failed, ReasonCode::OomKilled, Some(137))
        );
        let killed = observe(
            &service(),
            Some(&failed),
            Some(&container(137, false)),
            true,
        )
        .unwrap();
        assert_eq!(
            (killed.reason, killed.exit_code),
            (ReasonCode::ExitCode, Some(137))
        );
        let mut unlimited = service();
        if let Some(template) = unlimited
            .spec
            .as_mut()
            .and_then(|s| s.task_template.as_mut())
        {
            template.resources = None;
        }
        let o = observe(&unlimited, Some(&failed), None, false).unwrap();
        assert_eq!(o.reason, ReasonCode::ExitCode);
    }

    #[test]
    fn rejected_and_shutdown_say_why() {
        let rejected = task(TaskState::REJECTED, 0, "No such image: localhost/nope:1");
        let o = observe(&service(), Some(&rejected), None, false).unwrap();
        assert_eq!(
            (o.state, o.reason, o.exit_code),
            (JobState::Failed, ReasonCode::ImageNotFound, None)
        );
        assert_eq!(o.message, "rejected: No such image: localhost/nope:1");
        let other = task(TaskState::REJECTED, 0, "invalid mount config");
        assert_eq!(seen(&other, None).1, ReasonCode::BackendError);
        let shutdown = task(TaskState::SHUTDOWN, 143, "");
        assert_eq!(
            seen(&shutdown, None),
            (JobState::Failed, ReasonCode::Cancelled, Some(143))
        );
        let broken = task(
            TaskState::FAILED,
            0,
            "starting container failed: no such file",
        );
        assert_eq!(
            seen(&broken, None),
            (JobState::Failed, ReasonCode::BackendError, None)
        );
    }

    #[test]
    fn the_newest_task_counts() {
        let mut old = task(TaskState::FAILED, 3, "");
        old.created_at = serde_json::from_value(serde_json::json!("2024-05-01T09:00:00Z")).unwrap();
        old.version = Some(ObjectVersion { index: Some(99) });
        let new = task(TaskState::RUNNING, 0, "");
        let tasks = [old, new.clone()];
        assert_eq!(
            current_task(&tasks).and_then(|t| t.status.clone()),
            new.status
        );
        assert_eq!(current_task(&[]), None);
        assert_eq!(task_container_id(&new), Some("c1"));
        let _ = ContainerStatus::default();
    }

    #[test]
    fn ownership_needs_both_labels() {
        let s = service();
        assert!(is_owned(service_labels(&s), "m1"));
        assert!(!is_owned(service_labels(&s), "m2"));
        assert!(!is_owned(None, "m1"));
    }
}

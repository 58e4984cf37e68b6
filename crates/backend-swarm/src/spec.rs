//! A [`JobRequest`] as the body of Docker's `POST /services/create`: pure, so every
//! setting is checked by unit tests without a swarm.

use std::collections::HashMap;

use bollard::models::{
    Limit, Mount, MountType, NetworkAttachmentConfig, ResourceObject, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicatedJob, TaskSpec, TaskSpecContainerSpec, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use dispatch_manager::BackendError;
use dispatch_manager::backend::{INCOMING_MOUNT, JobRequest, OUTGOING_MOUNT};
use dispatch_proto::job::JobId;

use crate::config::SwarmConfig;

/// Longest service name Swarm accepts (a DNS label).
const MAX_SERVICE_NAME: usize = 63;
/// Hex digits of the hash in a derived service name.
const HASH_DIGITS: usize = 16;

/// Whether Swarm accepts `name` for a service: a DNS label, `[a-zA-Z0-9]` then runs of
/// `-`/`_` each followed by more alphanumerics (no `.`, no trailing `-` or `_`), at most
/// 63 characters (swarmkit's `name must be valid as a DNS name component`).
pub(crate) fn is_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_SERVICE_NAME
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// The service of `job_id`: the id itself, as the docker backend names containers, when
/// Swarm accepts it; otherwise (a `.`, a trailing `-`/`_`, more than 63 characters, all
/// of which job ids may have) the id's readable part and a hash of the whole id, so every
/// valid job id can run and the same id always finds the same service. The job id
/// label stays the authority: a service whose label names another job is not this job's.
pub(crate) fn service_name(job_id: &JobId) -> String {
    let id = job_id.as_str();
    if is_service_name(id) {
        return id.to_owned();
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    let mut readable: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    readable.truncate(MAX_SERVICE_NAME - HASH_DIGITS - 1);
    let readable = readable.trim_end_matches('-');
    format!("{readable}-{}", &hash.as_str()[..HASH_DIGITS])
}

/// Checks that the request fits one Swarm job service.
pub(crate) fn check_request(job: &JobRequest) -> Result<(), BackendError> {
    if job.workers != 1 {
        return Err(BackendError::Unsupported {
            field: "workers",
            reason: format!(
                "Compute environment only supports number_of_workers=1, got number_of_workers={}",
                job.workers
            ),
        });
    }
    if job.gpus > 0 {
        return Err(BackendError::Unsupported {
            field: "gpus",
            reason: format!(
                "the swarm backend cannot give a job GPUs (asked for {}): Swarm hands out \
                 GPUs only as generic resources each node's engine must advertise \
                 (node-generic-resources in daemon.json), which this backend does not \
                 configure or discover; run GPU jobs with the docker or kubernetes backend",
                job.gpus
            ),
        });
    }
    if job.command.is_empty() {
        return Err(BackendError::Unsupported {
            field: "command",
            reason: "cannot be empty".into(),
        });
    }
    Ok(())
}

/// The create body for `job`, as pfcon's `swarmmgr.py` builds it (pfcon-api.md §4.2),
/// with what pfcon leaves out:
/// - mode `replicated-job` with one completion and restart condition `none`: the job
///   runs once, and its task stays with its exit code (pfcon makes a replicated service
///   that Swarm would restart unless told not to);
/// - every label on the service **and** on the container, so both the service and the
///   task's container are found by label (pfcon sets none);
/// - the command replaces the image's entrypoint (`Command` = the whole command), so it
///   runs exactly as given, as in the docker backend;
/// - CPU and memory as limits, and (with [`SwarmConfig::reserve_resources`]) as
///   reservations, so the scheduler never overcommits a node;
/// - all capabilities dropped; ulimits are the engine's defaults (the docker backend
///   raises `nofile` to the host's hard limit, which a swarm manager cannot read for
///   the node a task lands on);
/// - `user` is `uid:gid`; no TTY, so stdout and stderr stay apart in the logs;
/// - stop grace period 0 s: a job is stopped by a kill, not asked to stop.
pub(crate) fn service_spec(job: &JobRequest, name: &str, config: &SwarmConfig) -> ServiceSpec {
    let mut mounts = Vec::with_capacity(2);
    if let Some(incoming) = &job.incoming {
        mounts.push(bind(incoming, INCOMING_MOUNT, true));
    }
    mounts.push(bind(&job.outgoing, OUTGOING_MOUNT, false));
    let labels: HashMap<String, String> = job
        .labels
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();

    let nano_cpus = i64::try_from(job.cpu.nano_cpus()).unwrap_or(i64::MAX);
    let memory_bytes = i64::try_from(job.memory.bytes()).unwrap_or(i64::MAX);
    let resources = (!config.ignore_limits).then(|| TaskSpecResources {
        limits: Some(Limit {
            nano_cpus: Some(nano_cpus),
            memory_bytes: Some(memory_bytes),
            pids: None,
        }),
        reservations: config.reserve_resources.then_some(ResourceObject {
            nano_cpus: Some(nano_cpus),
            memory_bytes: Some(memory_bytes),
            generic_resources: None,
        }),
        ..TaskSpecResources::default()
    });

    let container = TaskSpecContainerSpec {
        image: Some(job.image.clone()),
        labels: Some(labels.clone()),
        command: Some(job.command.clone()),
        args: Some(Vec::new()),
        env: Some(
            job.env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
        ),
        user: job.user.map(|user| format!("{}:{}", user.uid, user.gid)),
        tty: Some(false),
        mounts: Some(mounts),
        stop_grace_period: Some(0),
        capability_drop: Some(vec!["ALL".to_owned()]),
        ..TaskSpecContainerSpec::default()
    };

    ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources,
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                max_attempts: Some(0),
                ..TaskSpecRestartPolicy::default()
            }),
            networks: config.job_network().map(|network| {
                vec![NetworkAttachmentConfig {
                    target: Some(network.to_owned()),
                    ..NetworkAttachmentConfig::default()
                }]
            }),
            ..TaskSpec::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated_job: Some(ServiceSpecModeReplicatedJob {
                max_concurrent: Some(1),
                total_completions: Some(1),
            }),
            ..ServiceSpecMode::default()
        }),
        ..ServiceSpec::default()
    }
}

fn bind(source: &std::path::Path, target: &str, read_only: bool) -> Mount {
    Mount {
        source: Some(source.to_string_lossy().into_owned()),
        target: Some(target.to_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Mount::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use dispatch_manager::backend::{UserId, labels};
    use dispatch_proto::job::{CpuMillis, MemoryMib};

    use super::*;

    fn request() -> JobRequest {
        JobRequest {
            job_id: JobId::parse("chris-jid-42").unwrap(),
            image: "fnndsc/pl-simpledsapp:2.1.0".into(),
            command: vec![
                "simpledsapp".into(),
                "--prefix".into(),
                "le".into(),
                INCOMING_MOUNT.into(),
                OUTGOING_MOUNT.into(),
            ],
            env: vec![("A".into(), "1".into()), ("HOME".into(), "/tmp".into())],
            cpu: CpuMillis(1500),
            memory: MemoryMib(300),
            gpus: 0,
            workers: 1,
            time_limit: None,
            incoming: Some(PathBuf::from("/store/key-chris-jid-42/incoming")),
            outgoing: PathBuf::from("/store/key-chris-jid-42/outgoing"),
            user: Some(UserId {
                uid: 1001,
                gid: 1002,
            }),
            labels: BTreeMap::from([
                (labels::JOB_ID.into(), "chris-jid-42".into()),
                (labels::MANAGER_ID.into(), "m1".into()),
                ("site.example/team".into(), "imaging".into()),
            ]),
        }
    }

    #[test]
    fn the_spec_carries_every_setting() {
        let spec = service_spec(&request(), "chris-jid-42", &SwarmConfig::default());
        assert_eq!(spec.name.as_deref(), Some("chris-jid-42"));
        let mode = spec.mode.unwrap();
        assert_eq!(
            mode.replicated_job,
            Some(ServiceSpecModeReplicatedJob {
                max_concurrent: Some(1),
                total_completions: Some(1)
            })
        );
        assert_eq!(
            (mode.replicated, mode.global, mode.global_job),
            (None, None, None)
        );
        let service_labels = spec.labels.unwrap();
        assert_eq!(service_labels.len(), 3);
        assert_eq!(service_labels["site.example/team"], "imaging");

        let task = spec.task_template.unwrap();
        assert_eq!(
            task.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        let resources = task.resources.unwrap();
        let limits = resources.limits.unwrap();
        assert_eq!(limits.nano_cpus, Some(1_500_000_000));
        assert_eq!(limits.memory_bytes, Some(300 << 20));
        let reservations = resources.reservations.unwrap();
        assert_eq!(reservations.nano_cpus, Some(1_500_000_000));
        assert_eq!(reservations.memory_bytes, Some(300 << 20));
        assert_eq!(
            task.networks.unwrap()[0].target.as_deref(),
            Some(crate::config::ISOLATED_NETWORK)
        );

        let container = task.container_spec.unwrap();
        assert_eq!(
            container.image.as_deref(),
            Some("fnndsc/pl-simpledsapp:2.1.0")
        );
        assert_eq!(container.command, Some(request().command));
        assert_eq!(container.args, Some(Vec::new()));
        assert_eq!(
            container.env,
            Some(vec!["A=1".to_owned(), "HOME=/tmp".into()])
        );
        assert_eq!(container.user.as_deref(), Some("1001:1002"));
        assert_eq!(container.labels, Some(service_labels));
        assert_eq!(container.tty, Some(false));
        assert_eq!(container.stop_grace_period, Some(0));
        assert_eq!(container.capability_drop, Some(vec!["ALL".to_owned()]));
        let mounts = container.mounts.unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].target.as_deref(), Some(INCOMING_MOUNT));
        assert_eq!(
            mounts[0].source.as_deref(),
            Some("/store/key-chris-jid-42/incoming")
        );
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].target.as_deref(), Some(OUTGOING_MOUNT));
        assert_eq!(mounts[1].read_only, Some(false));
        assert!(mounts.iter().all(|m| m.typ == Some(MountType::BIND)));
    }

    #[test]
    fn the_spec_serialises_as_the_engine_expects() {
        let spec = service_spec(&request(), "chris-jid-42", &SwarmConfig::default());
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["Mode"],
            serde_json::json!({"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}})
        );
        assert_eq!(json["TaskTemplate"]["RestartPolicy"]["Condition"], "none");
        assert_eq!(
            json["TaskTemplate"]["ContainerSpec"]["Mounts"][0]["Type"],
            "bind"
        );
    }

    #[test]
    fn no_inputs_no_user_no_limits_no_network() {
        let mut job = request();
        job.incoming = None;
        job.user = None;
        let config = SwarmConfig {
            ignore_limits: true,
            network: String::new(),
            ..SwarmConfig::default()
        };
        let task = service_spec(&job, "x", &config).task_template.unwrap();
        assert_eq!(task.resources, None);
        assert_eq!(task.networks, None);
        let container = task.container_spec.unwrap();
        assert_eq!(container.user, None);
        let mounts = container.mounts.unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target.as_deref(), Some(OUTGOING_MOUNT));
    }

    #[test]
    fn limits_without_reservations_when_asked() {
        let config = SwarmConfig {
            reserve_resources: false,
            network: "bridge".into(),
            ..SwarmConfig::default()
        };
        let task = service_spec(&request(), "x", &config)
            .task_template
            .unwrap();
        let resources = task.resources.unwrap();
        assert!(resources.limits.is_some());
        assert_eq!(resources.reservations, None);
        assert_eq!(task.networks.unwrap()[0].target.as_deref(), Some("bridge"));
    }

    #[test]
    fn gpus_and_workers_are_refused_with_the_field() {
        let mut job = request();
        job.gpus = 1;
        match check_request(&job) {
            Err(BackendError::Unsupported { field, reason }) => {
                assert_eq!(field, "gpus");
                assert!(reason.contains("generic resources"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let mut job = request();
        job.workers = 2;
        assert!(matches!(
            check_request(&job),
            Err(BackendError::Unsupported {
                field: "workers",
                ..
            })
        ));
        assert!(check_request(&request()).is_ok());
    }

    #[test]
    fn service_names_follow_swarm_rules_and_are_stable() {
        for good in ["a1", "chris-jid-42", "a_b", "a--b", "A"] {
            assert!(is_service_name(good), "{good}");
            assert_eq!(service_name(&JobId::parse(good).unwrap()), good);
        }
        for bad in ["", "a.b", "a-", "a_", "-a", &"x".repeat(64)] {
            assert!(!is_service_name(bad), "{bad}");
        }
        for id in ["a.b", "a-", "x_", &"y".repeat(128), "v1.2.3-", "1.."] {
            let job_id = JobId::parse(id).unwrap();
            let name = service_name(&job_id);
            assert!(is_service_name(&name), "{id} -> {name}");
            assert_eq!(name, service_name(&job_id), "stable");
        }
        assert_ne!(
            service_name(&JobId::parse("a.b").unwrap()),
            service_name(&JobId::parse("a_b.").unwrap())
        );
        assert!(service_name(&JobId::parse("a.b").unwrap()).starts_with("a-b-"));
    }
}

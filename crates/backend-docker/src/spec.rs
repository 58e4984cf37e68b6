//! A [`JobRequest`] as the body of Docker's `POST /containers/create`: pure, so every
//! setting is checked by unit tests without an engine.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, ResourcesUlimits,
    RestartPolicy, RestartPolicyNameEnum,
};
use dispatch_manager::BackendError;
use dispatch_manager::backend::{INCOMING_MOUNT, JobRequest, OUTGOING_MOUNT};

use crate::config::DockerConfig;

/// Largest `nofile` limit given to jobs, whatever the host allows (the kernel's usual
/// `fs.nr_open`).
const NOFILE_CEILING: u64 = 1 << 20;
/// Largest `nproc` limit given to jobs on Podman.
const NPROC_CEILING: u64 = 32_768;

/// Whether `name` is a name Docker accepts for a container (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`,
/// the stricter of Docker's and Podman's rules). Checked before a job id goes into a URL
/// path, so an id can never name another API route or carry a query string.
pub(crate) fn is_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks that the request fits a single Docker container, as pfcon checks it.
pub(crate) fn check_request(job: &JobRequest) -> Result<(), BackendError> {
    if job.workers != 1 {
        // pfcon's own words (dockermgr.py), which CUBE shows its users.
        return Err(BackendError::Unsupported {
            field: "workers",
            reason: format!(
                "Compute environment only supports number_of_workers=1, got number_of_workers={}",
                job.workers
            ),
        });
    }
    if !is_container_name(job.job_id.as_str()) {
        return Err(BackendError::Unsupported {
            field: "job_id",
            reason: format!(
                "`{}` cannot name a Docker container: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]+",
                job.job_id
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

/// Resource limits read from the host once, at connect: the limits a job's processes get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostLimits {
    /// The host's hard `nofile` limit, if known.
    pub nofile_hard: Option<u64>,
    /// The host's hard `nproc` limit, if known.
    pub nproc_hard: Option<u64>,
}

impl HostLimits {
    /// The limits of this process, which the engine on this host shares (a remote engine
    /// may differ; these are then merely modest).
    pub(crate) fn of_this_process() -> Self {
        use rustix::process::{Resource, getrlimit};
        Self {
            nofile_hard: getrlimit(Resource::Nofile).maximum,
            nproc_hard: getrlimit(Resource::Nproc).maximum,
        }
    }

    /// Ulimits for job containers. `nofile` is raised to the hard limit (soft = hard):
    /// imaging tools open many files, and the engine's default soft limit (1024 on many
    /// hosts) is too low for them; going above the host's hard limit would make the
    /// runtime's `setrlimit` fail where `CAP_SYS_RESOURCE` is dropped, so it is capped
    /// there. On Podman `nproc` is set the same way, as its built-in default exceeds what
    /// such hosts allow.
    pub(crate) fn ulimits(&self, config: &DockerConfig) -> Vec<ResourcesUlimits> {
        let limit = |name: &str, value: u64| {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            ResourcesUlimits {
                name: Some(name.to_owned()),
                soft: Some(value),
                hard: Some(value),
            }
        };
        let mut ulimits = vec![limit(
            "nofile",
            self.nofile_hard
                .map_or(NOFILE_CEILING, |hard| hard.min(NOFILE_CEILING)),
        )];
        if config.kind == crate::config::EngineKind::Podman {
            ulimits.push(limit(
                "nproc",
                self.nproc_hard
                    .map_or(NPROC_CEILING, |hard| hard.min(NPROC_CEILING)),
            ));
        }
        ulimits
    }
}

/// The create body for `job`.
///
/// Differences from pfcon, on purpose:
/// - memory is a **hard** limit (`Memory`, with `MemorySwap` equal so no swap on top):
///   the job is killed past it and reported OOM_KILLED. pfcon sets only the soft
///   `MemoryReservation`, which the kernel enforces only under host memory pressure, so
///   a job could take the whole host;
/// - the command replaces the image's entrypoint (entrypoint = the first word, cmd = the
///   rest), so it runs exactly as given; pfcon sets only `Cmd`, behind any entrypoint the
///   image declares;
/// - all capabilities are dropped and `no-new-privileges` is set: a plugin reads and
///   writes files and needs no privilege;
/// - `user` is `uid:gid` (the primary group), where pfcon adds gid as a supplementary
///   group only;
/// - inputs and outputs are `bind` mounts, which fail if the host directory is missing,
///   where pfcon's `Binds` would silently create an empty root-owned one;
/// - the network is [`DockerConfig::network`] (`none` by default).
pub(crate) fn container_body(
    job: &JobRequest,
    config: &DockerConfig,
    host: &HostLimits,
) -> ContainerCreateBody {
    let (entrypoint, cmd) = match job.command.split_first() {
        Some((first, rest)) => (vec![first.clone()], rest.to_vec()),
        None => (Vec::new(), Vec::new()),
    };
    let mut mounts = Vec::with_capacity(2);
    if let Some(incoming) = &job.incoming {
        mounts.push(bind(incoming, INCOMING_MOUNT, true));
    }
    mounts.push(bind(&job.outgoing, OUTGOING_MOUNT, false));

    let (nano_cpus, memory) = if config.ignore_limits {
        (None, None)
    } else {
        (
            Some(i64::try_from(job.cpu.nano_cpus()).unwrap_or(i64::MAX)),
            Some(i64::try_from(job.memory.bytes()).unwrap_or(i64::MAX)),
        )
    };
    let device_requests = (job.gpus > 0).then(|| {
        // As `docker run --gpus N` and pfcon: no driver named, so the engine picks the one
        // that offers the `gpu` capability (nvidia's, or a CDI driver).
        vec![DeviceRequest {
            count: Some(i64::from(job.gpus)),
            capabilities: Some(vec![vec!["gpu".to_owned()]]),
            ..DeviceRequest::default()
        }]
    });

    let host_config = HostConfig {
        mounts: Some(mounts),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: Some(0),
        }),
        network_mode: Some(config.network.clone()),
        nano_cpus,
        memory,
        memory_swap: memory,
        device_requests,
        shm_size: config
            .shm_size_mib
            .map(|mib| i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        ulimits: Some(host.ulimits(config)),
        ..HostConfig::default()
    };

    ContainerCreateBody {
        image: Some(job.image.clone()),
        entrypoint: Some(entrypoint),
        cmd: Some(cmd),
        env: Some(
            job.env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
        ),
        user: job.user.map(|user| format!("{}:{}", user.uid, user.gid)),
        labels: Some(
            job.labels
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect::<HashMap<_, _>>(),
        ),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
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

/// The `fromImage` and `tag` of a pull of `image`. A reference without tag or digest
/// means `latest`, as the docker CLI reads it: sent bare, the engine would pull every tag
/// of the repository.
pub(crate) fn pull_reference(image: &str) -> (String, Option<String>) {
    let last_component = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last_component.contains(':') {
        (image.to_owned(), None)
    } else {
        (image.to_owned(), Some("latest".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use dispatch_manager::backend::UserId;
    use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};

    use super::*;
    use crate::config::EngineKind;

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
            labels: BTreeMap::from([(
                "org.chrisproject.dispatch.job-id".into(),
                "chris-jid-42".into(),
            )]),
        }
    }

    fn limits() -> HostLimits {
        HostLimits {
            nofile_hard: Some(20_000),
            nproc_hard: None,
        }
    }

    #[test]
    fn the_body_carries_every_setting() {
        let body = container_body(&request(), &DockerConfig::default(), &limits());
        assert_eq!(body.image.as_deref(), Some("fnndsc/pl-simpledsapp:2.1.0"));
        assert_eq!(body.entrypoint, Some(vec!["simpledsapp".to_owned()]));
        assert_eq!(
            body.cmd,
            Some(vec![
                "--prefix".to_owned(),
                "le".into(),
                INCOMING_MOUNT.into(),
                OUTGOING_MOUNT.into()
            ])
        );
        assert_eq!(body.env, Some(vec!["A=1".to_owned(), "HOME=/tmp".into()]));
        assert_eq!(body.user.as_deref(), Some("1001:1002"));
        assert_eq!(
            body.labels
                .as_ref()
                .and_then(|l| l.get("org.chrisproject.dispatch.job-id")),
            Some(&"chris-jid-42".to_owned())
        );
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(300 << 20));
        assert_eq!(host.memory_swap, Some(300 << 20));
        assert_eq!(host.memory_reservation, None);
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(host.device_requests, None);
        assert_eq!(host.shm_size, None);
        assert_eq!(host.binds, None);
        let mounts = host.mounts.unwrap();
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
        let ulimits = host.ulimits.unwrap();
        assert_eq!(ulimits.len(), 1);
        assert_eq!(ulimits[0].name.as_deref(), Some("nofile"));
        assert_eq!(
            (ulimits[0].soft, ulimits[0].hard),
            (Some(20_000), Some(20_000))
        );
    }

    #[test]
    fn a_single_word_command_has_an_empty_cmd() {
        let mut job = request();
        job.command = vec!["true".into()];
        let body = container_body(&job, &DockerConfig::default(), &limits());
        assert_eq!(body.entrypoint, Some(vec!["true".to_owned()]));
        assert_eq!(body.cmd, Some(Vec::new()));
    }

    #[test]
    fn no_inputs_means_one_mount_and_no_user_means_the_image_user() {
        let mut job = request();
        job.incoming = None;
        job.user = None;
        let body = container_body(&job, &DockerConfig::default(), &limits());
        assert_eq!(body.user, None);
        let mounts = body.host_config.unwrap().mounts.unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target.as_deref(), Some(OUTGOING_MOUNT));
    }

    #[test]
    fn ignore_limits_drops_cpu_and_memory_but_keeps_gpus() {
        let mut job = request();
        job.gpus = 2;
        let config = DockerConfig {
            ignore_limits: true,
            shm_size_mib: Some(512),
            network: "bridge".into(),
            ..DockerConfig::default()
        };
        let host = container_body(&job, &config, &limits())
            .host_config
            .unwrap();
        assert_eq!(
            (host.nano_cpus, host.memory, host.memory_swap),
            (None, None, None)
        );
        let gpus = host.device_requests.unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].count, Some(2));
        assert_eq!(gpus[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
        assert_eq!(host.shm_size, Some(512 << 20));
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
    }

    #[test]
    fn ulimits_stay_within_the_host_and_podman_gets_nproc() {
        let podman = DockerConfig {
            kind: EngineKind::Podman,
            ..DockerConfig::default()
        };
        let unlimited = HostLimits {
            nofile_hard: None,
            nproc_hard: Some(96_365),
        };
        let ulimits = unlimited.ulimits(&podman);
        assert_eq!(ulimits.len(), 2);
        assert_eq!(ulimits[0].hard, Some(1 << 20));
        assert_eq!(ulimits[1].name.as_deref(), Some("nproc"));
        assert_eq!(ulimits[1].hard, Some(32_768));
        let low = HostLimits {
            nofile_hard: Some(4096),
            nproc_hard: Some(1000),
        };
        let ulimits = low.ulimits(&podman);
        assert_eq!((ulimits[0].soft, ulimits[1].soft), (Some(4096), Some(1000)));
    }

    #[test]
    fn more_than_one_worker_is_refused_in_pfcons_words() {
        let mut job = request();
        job.workers = 3;
        let error = check_request(&job).unwrap_err();
        assert!(matches!(
            error,
            BackendError::Unsupported {
                field: "workers",
                ..
            }
        ));
        assert_eq!(
            error.to_string(),
            "workers: Compute environment only supports number_of_workers=1, got number_of_workers=3"
        );
        assert!(check_request(&request()).is_ok());
    }

    #[test]
    fn container_names_are_checked() {
        for good in ["chris-jid-42", "a1", "A_b.c-d", "0x"] {
            assert!(is_container_name(good), "{good}");
        }
        for bad in [
            "", "a", "-a", ".a", "_a", "a b", "a?x=1", "a%2F", "a:b", "é1",
        ] {
            assert!(!is_container_name(bad), "{bad}");
        }
        let mut job = request();
        // A valid job id (checked at the door) that is still too short for a Docker name.
        job.job_id = JobId::parse("a").unwrap();
        let error = check_request(&job).unwrap_err();
        assert!(matches!(
            error,
            BackendError::Unsupported {
                field: "job_id",
                ..
            }
        ));
    }

    #[test]
    fn a_bare_image_is_pulled_as_latest() {
        assert_eq!(
            pull_reference("busybox"),
            ("busybox".into(), Some("latest".into()))
        );
        assert_eq!(
            pull_reference("localhost:5000/fnndsc/pl-x"),
            ("localhost:5000/fnndsc/pl-x".into(), Some("latest".into()))
        );
        assert_eq!(
            pull_reference("localhost:5000/pl-x:1.0"),
            ("localhost:5000/pl-x:1.0".into(), None)
        );
        assert_eq!(
            pull_reference("ghcr.io/x/y@sha256:abcd"),
            ("ghcr.io/x/y@sha256:abcd".into(), None)
        );
    }
}

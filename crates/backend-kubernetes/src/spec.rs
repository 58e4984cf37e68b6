//! A [`JobRequest`] as a `batch/v1` Job: pure, so every setting is checked by unit tests
//! on the typed object, without a cluster.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use dispatch_manager::BackendError;
use dispatch_manager::backend::{INCOMING_MOUNT, JobRequest, OUTGOING_MOUNT, labels};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::KubernetesConfig;
use crate::names::{ANNOTATION_JOB_ID, ANNOTATION_LABELS, job_name, label_key, label_value};

/// The one container of a job's pods.
pub const CONTAINER_NAME: &str = "job";
/// The volume holding storeBase (the configured PVC).
pub const STORE_VOLUME: &str = "storebase";
/// The memory-backed `/dev/shm` volume, when `shm_size_mib` is set.
pub const SHM_VOLUME: &str = "dshm";

/// `path` as a relative path with only normal components (`""` for none), or `None` if
/// it is absolute or climbs out with `..`.
pub fn clean_relative(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// The sub-path in the PVC of `host_dir`, a directory under the manager's `store_root`:
/// `pvc_store_path` joined with its path relative to `store_root`.
pub fn sub_path(
    field: &'static str,
    host_dir: &Path,
    store_root: &Path,
    pvc_store_path: &str,
) -> Result<String, BackendError> {
    let unsupported = |reason: String| BackendError::Unsupported { field, reason };
    let relative = host_dir.strip_prefix(store_root).map_err(|_| {
        unsupported(format!(
            "{} is not under the store root {}: the kubernetes backend mounts only the \
             storeBase PVC",
            host_dir.display(),
            store_root.display()
        ))
    })?;
    let relative = relative
        .to_str()
        .and_then(clean_relative)
        .ok_or_else(|| unsupported(format!("{} is not a plain path", host_dir.display())))?;
    let base = clean_relative(pvc_store_path)
        .ok_or_else(|| unsupported(format!("pvc_store_path `{pvc_store_path}` is not relative")))?;
    Ok(match (base.is_empty(), relative.is_empty()) {
        (true, _) => relative,
        (false, true) => base,
        (false, false) => format!("{base}/{relative}"),
    })
}

/// Checks that the request can be a Job.
pub fn check_request(job: &JobRequest, config: &KubernetesConfig) -> Result<(), BackendError> {
    if job.command.is_empty() {
        return Err(BackendError::Unsupported {
            field: "command",
            reason: "cannot be empty".into(),
        });
    }
    if job.workers == 0 || job.workers > config.max_workers {
        return Err(BackendError::Unsupported {
            field: "workers",
            reason: format!(
                "Compute environment only supports number_of_workers up to {}, got \
                 number_of_workers={}",
                config.max_workers, job.workers
            ),
        });
    }
    if job.image.is_empty() {
        return Err(BackendError::Unsupported {
            field: "image",
            reason: "cannot be empty".into(),
        });
    }
    Ok(())
}

/// The labels of the Job and its pods: every request label, made valid (the exact ones
/// are in the [`ANNOTATION_LABELS`] annotation).
pub fn k8s_labels(job: &JobRequest) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = job
        .labels
        .iter()
        .map(|(key, value)| (label_key(key), label_value(value)))
        .collect();
    // Always there, whatever the request carried: they are how jobs are found.
    out.insert(labels::JOB_ID.into(), label_value(job.job_id.as_str()));
    out
}

/// The selector of every Job (and pod) `manager_id` owns.
pub fn owned_selector(manager_id: &str) -> String {
    format!(
        "{}={},{}={}",
        labels::MANAGED_BY,
        labels::MANAGED_BY_VALUE,
        labels::MANAGER_ID,
        label_value(manager_id)
    )
}

/// Environment in order, a later duplicate winning (as in the request), each name once.
fn env_vars(env: &[(String, String)]) -> Vec<EnvVar> {
    let mut out: Vec<EnvVar> = Vec::with_capacity(env.len());
    for (name, value) in env {
        out.retain(|var| &var.name != name);
        out.push(EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        });
    }
    out
}

/// The Job for `job`.
///
/// As pfcon's `kubernetesmgr.py` (pfcon-api.md §4.3), and differently on purpose:
/// - requests equal limits (pfcon sets limits only; Kubernetes then copies them, but a
///   namespace LimitRange could lower the requests), so the pod is `Guaranteed`;
/// - the security context is OpenShift's `restricted-v2` (non-root, no privilege
///   escalation, no capabilities, seccomp `RuntimeDefault`), with `runAsUser` and
///   `runAsGroup` only when a user is given (and never with `openshift`), so an SCC may
///   assign its arbitrary uid;
/// - job pods get no service account token and no service links: a plugin reads and
///   writes files and has no business with the API;
/// - the command replaces the image's entrypoint (`command`, no `args`), as on Docker;
/// - the exact job id and labels are annotations, the labels their valid forms.
pub fn job_manifest(
    job: &JobRequest,
    config: &KubernetesConfig,
    store_root: &Path,
) -> Result<Job, BackendError> {
    check_request(job, config)?;
    let name = job_name(job.job_id.as_str());
    let k8s_labels = k8s_labels(job);
    let exact_labels = serde_json::to_string(&job.labels)
        .map_err(|e| BackendError::Engine(format!("encoding the labels: {e}")))?;
    let annotations = BTreeMap::from([
        (ANNOTATION_JOB_ID.to_owned(), job.job_id.to_string()),
        (ANNOTATION_LABELS.to_owned(), exact_labels),
    ]);

    let mut mounts = Vec::with_capacity(3);
    if let Some(incoming) = &job.incoming {
        mounts.push(VolumeMount {
            name: STORE_VOLUME.into(),
            mount_path: INCOMING_MOUNT.into(),
            sub_path: Some(sub_path(
                "incoming",
                incoming,
                store_root,
                &config.pvc_store_path,
            )?),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let outgoing = sub_path(
        "outgoing",
        &job.outgoing,
        store_root,
        &config.pvc_store_path,
    )?;
    if outgoing.is_empty() {
        // pfcon#162: an output mount without a sub-path would hand the job the whole PVC.
        return Err(BackendError::Unsupported {
            field: "outgoing",
            reason: "is the PVC's root: a job may write only its own area".into(),
        });
    }
    mounts.push(VolumeMount {
        name: STORE_VOLUME.into(),
        mount_path: OUTGOING_MOUNT.into(),
        sub_path: Some(outgoing),
        read_only: Some(false),
        ..VolumeMount::default()
    });
    let mut volumes = vec![Volume {
        name: STORE_VOLUME.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: config.pvc_name.clone(),
            read_only: Some(false),
        }),
        ..Volume::default()
    }];
    if let Some(mib) = config.shm_size_mib {
        mounts.push(VolumeMount {
            name: SHM_VOLUME.into(),
            mount_path: "/dev/shm".into(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: SHM_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity(format!("{mib}Mi"))),
            }),
            ..Volume::default()
        });
    }

    let mut resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity(format!("{}m", job.cpu.0))),
        ("memory".to_owned(), Quantity(format!("{}Mi", job.memory.0))),
    ]);
    if job.gpus > 0 {
        resources.insert(config.gpu_resource.clone(), Quantity(job.gpus.to_string()));
    }
    let user = job.user.filter(|_| !config.openshift);
    let security = SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        run_as_user: user.map(|u| i64::from(u.uid)),
        run_as_group: user.map(|u| i64::from(u.gid)),
        ..SecurityContext::default()
    };
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(job.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(job.command.clone()),
        env: Some(env_vars(&job.env)),
        resources: Some(ResourceRequirements {
            limits: Some(resources.clone()),
            requests: Some(resources),
            ..ResourceRequirements::default()
        }),
        security_context: Some(security),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        volumes: Some(volumes),
        node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
        tolerations: (!config.tolerations.is_empty()).then(|| {
            config
                .tolerations
                .iter()
                .map(|t| Toleration {
                    key: t.key.clone(),
                    operator: t.operator.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    toleration_seconds: t.toleration_seconds,
                })
                .collect()
        }),
        image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
            config
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        service_account_name: config.service_account.clone(),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(config.termination_grace_seconds),
        ..PodSpec::default()
    };
    let workers = i32::try_from(job.workers).unwrap_or(i32::MAX);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(k8s_labels.clone()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            parallelism: Some(workers),
            completions: Some(workers),
            ttl_seconds_after_finished: config.ttl_seconds_after_finished,
            active_deadline_seconds: config.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(k8s_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use dispatch_manager::backend::UserId;
    use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};

    use super::*;
    use crate::config::Toleration as ConfigToleration;

    pub(crate) fn request() -> JobRequest {
        JobRequest {
            job_id: JobId::parse("chris-jid-42").unwrap(),
            image: "fnndsc/pl-simpledsapp:2.1.0".into(),
            command: vec![
                "simpledsapp".into(),
                INCOMING_MOUNT.into(),
                OUTGOING_MOUNT.into(),
            ],
            env: vec![
                ("A".into(), "1".into()),
                ("B".into(), "2".into()),
                ("A".into(), "3".into()),
            ],
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
                (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
                (labels::MANAGER_ID.into(), "site a/1".into()),
                (labels::JOB_ID.into(), "chris-jid-42".into()),
                ("team name".into(), "neuro".into()),
            ]),
        }
    }

    fn manifest(job: &JobRequest, config: &KubernetesConfig) -> Job {
        job_manifest(job, config, Path::new("/store")).unwrap()
    }

    fn pod(job: &Job) -> &PodSpec {
        job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn the_job_carries_every_setting() {
        let job = manifest(&request(), &KubernetesConfig::default());
        assert_eq!(job.metadata.name.as_deref(), Some("chris-jid-42"));
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!((spec.parallelism, spec.completions), (Some(1), Some(1)));
        assert_eq!(spec.ttl_seconds_after_finished, Some(86_400));
        assert_eq!(spec.active_deadline_seconds, Some(604_800));
        let pod = pod(&job);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.termination_grace_period_seconds, Some(10));
        assert_eq!(pod.node_selector, None);
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("fnndsc/pl-simpledsapp:2.1.0")
        );
        assert_eq!(
            container.command.as_deref(),
            Some(
                &[
                    "simpledsapp".to_owned(),
                    INCOMING_MOUNT.into(),
                    OUTGOING_MOUNT.into()
                ][..]
            )
        );
        assert_eq!(container.args, None);
        let env: Vec<(&str, &str)> = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_deref().unwrap()))
            .collect();
        assert_eq!(env, [("B", "2"), ("A", "3")]);
        let resources = container.resources.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits["cpu"].0, "1500m");
        assert_eq!(limits["memory"].0, "300Mi");
        assert!(!limits.contains_key("nvidia.com/gpu"));
        assert_eq!(resources.requests, resources.limits);
    }

    #[test]
    fn the_security_context_is_openshift_safe() {
        let job = manifest(&request(), &KubernetesConfig::default());
        let security = pod(&job).containers[0].security_context.clone().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(
            (security.run_as_user, security.run_as_group),
            (Some(1001), Some(1002))
        );
        assert_eq!(security.privileged, None);

        // No user: none set, so the image's (non-root) user or an SCC's uid runs it.
        let mut no_user = request();
        no_user.user = None;
        let security = pod(&manifest(&no_user, &KubernetesConfig::default())).containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!((security.run_as_user, security.run_as_group), (None, None));
        assert_eq!(security.run_as_non_root, Some(true));

        // OpenShift: never, even with a user.
        let openshift = KubernetesConfig {
            openshift: true,
            ..KubernetesConfig::default()
        };
        let security = pod(&manifest(&request(), &openshift)).containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!((security.run_as_user, security.run_as_group), (None, None));
    }

    #[test]
    fn one_pvc_with_sub_paths_relative_to_the_store_root() {
        let config = KubernetesConfig {
            pvc_name: "site-store".into(),
            pvc_store_path: "./sites/a/".into(),
            ..KubernetesConfig::default()
        };
        let job = manifest(&request(), &config);
        let pod = pod(&job);
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "site-store"
        );
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_path, INCOMING_MOUNT);
        assert_eq!(
            mounts[0].sub_path.as_deref(),
            Some("sites/a/key-chris-jid-42/incoming")
        );
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].mount_path, OUTGOING_MOUNT);
        assert_eq!(
            mounts[1].sub_path.as_deref(),
            Some("sites/a/key-chris-jid-42/outgoing")
        );
        assert_eq!(mounts[1].read_only, Some(false));
        assert!(mounts.iter().all(|m| m.name == STORE_VOLUME));

        // The PVC's root is the store root: sub-paths are the relative paths.
        let job = manifest(&request(), &KubernetesConfig::default());
        let mounts = pod_mounts(&job);
        assert_eq!(
            mounts[0].sub_path.as_deref(),
            Some("key-chris-jid-42/incoming")
        );

        // pfcon's test_plugin_job_kubernetes_pvc_sub_path: in fslink mode a plugin reads
        // `key-<jid>/incoming` and writes straight into the user's output dir.
        let mut fslink = request();
        fslink.outgoing = PathBuf::from("/store/home/bob/feeds/21/pl-copy_21/data");
        let mounts = pod_mounts(&manifest(&fslink, &KubernetesConfig::default()));
        assert_eq!(
            mounts[0].sub_path.as_deref(),
            Some("key-chris-jid-42/incoming")
        );
        assert_eq!(
            mounts[1].sub_path.as_deref(),
            Some("home/bob/feeds/21/pl-copy_21/data")
        );

        // No inputs: one mount.
        let mut no_inputs = request();
        no_inputs.incoming = None;
        assert_eq!(
            pod_mounts(&manifest(&no_inputs, &KubernetesConfig::default())).len(),
            1
        );
    }

    fn pod_mounts(job: &Job) -> Vec<VolumeMount> {
        pod(job).containers[0].volume_mounts.clone().unwrap()
    }

    #[test]
    fn paths_outside_the_store_root_or_at_its_root_are_refused() {
        let mut outside = request();
        outside.outgoing = PathBuf::from("/elsewhere/outgoing");
        let error =
            job_manifest(&outside, &KubernetesConfig::default(), Path::new("/store")).unwrap_err();
        assert!(
            matches!(
                error,
                BackendError::Unsupported {
                    field: "outgoing",
                    ..
                }
            ),
            "{error}"
        );
        let mut climbing = request();
        climbing.incoming = Some(PathBuf::from("/store/../etc"));
        assert!(
            job_manifest(&climbing, &KubernetesConfig::default(), Path::new("/store")).is_err()
        );
        let mut root = request();
        root.outgoing = PathBuf::from("/store");
        let error =
            job_manifest(&root, &KubernetesConfig::default(), Path::new("/store")).unwrap_err();
        assert!(error.to_string().contains("root"), "{error}");
        // The PVC root as the input mount is allowed (pfcon's `""`).
        let mut root_inputs = request();
        root_inputs.incoming = Some(PathBuf::from("/store"));
        let mounts = pod_mounts(&manifest(&root_inputs, &KubernetesConfig::default()));
        assert_eq!(mounts[0].sub_path.as_deref(), Some(""));
    }

    #[test]
    fn workers_gpus_shm_and_scheduling_options() {
        let mut job = request();
        job.workers = 3;
        job.gpus = 2;
        let config = KubernetesConfig {
            shm_size_mib: Some(512),
            node_selector: BTreeMap::from([("gpu".into(), "a100".into())]),
            tolerations: vec![ConfigToleration {
                key: Some("gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..ConfigToleration::default()
            }],
            image_pull_secrets: vec!["regcred".into()],
            service_account: Some("chris-job".into()),
            image_pull_policy: Some("IfNotPresent".into()),
            ttl_seconds_after_finished: None,
            active_deadline_seconds: Some(3600),
            ..KubernetesConfig::default()
        };
        let manifest = manifest(&job, &config);
        let spec = manifest.spec.as_ref().unwrap();
        assert_eq!((spec.parallelism, spec.completions), (Some(3), Some(3)));
        assert_eq!(spec.ttl_seconds_after_finished, None);
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        let pod = pod(&manifest);
        let container = &pod.containers[0];
        let limits = container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "2");
        assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
        let shm = &pod.volumes.as_ref().unwrap()[1];
        assert_eq!(shm.name, SHM_VOLUME);
        let empty_dir = shm.empty_dir.as_ref().unwrap();
        assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
        assert_eq!(empty_dir.size_limit.as_ref().unwrap().0, "512Mi");
        assert!(
            container
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/dev/shm" && m.name == SHM_VOLUME)
        );
        assert_eq!(pod.node_selector.as_ref().unwrap()["gpu"], "a100");
        let toleration = &pod.tolerations.as_ref().unwrap()[0];
        assert_eq!(toleration.operator.as_deref(), Some("Exists"));
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert_eq!(pod.service_account_name.as_deref(), Some("chris-job"));

        let mut too_many = request();
        too_many.workers = 17;
        let error =
            job_manifest(&too_many, &KubernetesConfig::default(), Path::new("/store")).unwrap_err();
        assert!(
            matches!(
                error,
                BackendError::Unsupported {
                    field: "workers",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn labels_are_valid_and_the_exact_ones_kept() {
        let mut job = request();
        job.job_id = JobId::parse("Chris_JID.42").unwrap();
        job.labels
            .insert(labels::JOB_ID.into(), "Chris_JID.42".into());
        let manifest = manifest(&job, &KubernetesConfig::default());
        let name = manifest.metadata.name.clone().unwrap();
        assert!(crate::names::is_dns_label(&name), "{name}");
        let job_labels = manifest.metadata.labels.clone().unwrap();
        for (key, value) in &job_labels {
            assert!(crate::names::is_label_key(key), "{key}");
            assert!(crate::names::is_label_value(value), "{value}");
        }
        assert_eq!(job_labels[labels::JOB_ID], "Chris_JID.42");
        assert_eq!(job_labels[labels::MANAGER_ID], label_value("site a/1"));
        assert_eq!(job_labels[labels::MANAGED_BY], labels::MANAGED_BY_VALUE);
        assert_eq!(job_labels[&label_key("team name")], "neuro");
        let annotations = manifest.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[ANNOTATION_JOB_ID], "Chris_JID.42");
        let exact: BTreeMap<String, String> =
            serde_json::from_str(&annotations[ANNOTATION_LABELS]).unwrap();
        assert_eq!(exact, job.labels);
        // The pods carry the same labels, so they are found by the same selector.
        let template = manifest.spec.unwrap().template.metadata.unwrap();
        assert_eq!(template.labels.unwrap(), job_labels);
        assert_eq!(
            owned_selector("site a/1"),
            format!(
                "{}={},{}={}",
                labels::MANAGED_BY,
                labels::MANAGED_BY_VALUE,
                labels::MANAGER_ID,
                label_value("site a/1")
            )
        );
    }

    #[test]
    fn the_manifest_serialises_as_the_api_expects() {
        let json =
            serde_json::to_value(manifest(&request(), &KubernetesConfig::default())).unwrap();
        assert_eq!(json["apiVersion"], "batch/v1");
        assert_eq!(json["kind"], "Job");
        assert_eq!(json["spec"]["backoffLimit"], 0);
        assert_eq!(
            json["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"]
                ["type"],
            "RuntimeDefault"
        );
    }
}

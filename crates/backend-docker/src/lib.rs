//! The docker backend: runs each job as one container on a Docker Engine, or on Podman
//! through its Docker-compatible socket, as pfcon's `dockermgr.py` does (pfcon-api.md
//! §4.1), with tighter defaults (a hard memory limit, no capabilities, no network).
//!
//! It owns the containers it creates: each is named after its job id and labelled with
//! the job id and this manager's id (the labels come in the [`JobRequest`]). It must never
//! read, kill or remove a container without both `managed-by` and `manager-id` labels of
//! its own, and never builds an engine URL from a job id that is not a valid container
//! name.
//!
//! Long calls are bounded here: an image pull by [`DockerConfig::pull_timeout_seconds`];
//! a followed log stream ends when the container stops, or when the caller drops it.

mod compat;
mod config;
pub mod engine;
mod observe;
mod spec;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptions, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use dispatch_manager::backend::{BackendCapabilities, LogStream, labels};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{BackendKind, CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::JobState;
use futures::{StreamExt, TryStreamExt};

pub use crate::config::{DEFAULT_HOST, DockerConfig, EngineKind, PullPolicy, resolve_host};
use crate::engine::{EngineAddress, ImagePolicy, describe, status_code};
// Docker API helpers the swarm backend (same engine API) shares.
pub use crate::observe::parse_time;
use crate::observe::{container_name, is_owned, observe};

use crate::spec::{HostLimits, check_request, container_body, is_container_name};

/// How many containers `list_owned` inspects at once.
const INSPECT_CONCURRENCY: usize = 8;

/// Jobs as containers on one Docker (or Podman) engine.
#[derive(Debug)]
pub struct DockerBackend {
    docker: Docker,
    /// The engine's address, for error messages.
    host: String,
    manager_id: String,
    config: DockerConfig,
    host_limits: HostLimits,
    /// Containers this process killed, so that their exit code 137 is not taken for an
    /// out-of-memory kill (see [`EngineKind`]). Forgotten on restart, when the manager's
    /// own record of cancellations takes over.
    killed: Mutex<HashSet<String>>,
}

impl DockerBackend {
    /// Connects to the engine `config` names (else `DOCKER_HOST`, else the local socket),
    /// and agrees on an API version both sides speak (Docker 20.10 speaks 1.41).
    pub async fn connect(manager_id: &str, config: DockerConfig) -> Result<Self, BackendError> {
        if manager_id.is_empty() {
            return Err(BackendError::Unsupported {
                field: "manager_id",
                reason: "cannot be empty: it labels every container this manager creates".into(),
            });
        }
        let host = config.resolve_host(|key| std::env::var(key).ok());
        let docker = engine::connect(EngineAddress {
            host: &host,
            kind: kind_name(config.kind),
            table: "docker",
            host_field: "docker.host",
        })
        .await?;

        let backend = Self {
            docker,
            host,
            manager_id: manager_id.to_owned(),
            host_limits: HostLimits::of_this_process(),
            config,
            killed: Mutex::new(HashSet::new()),
        };
        backend.warn_on_kind_mismatch().await;
        Ok(backend)
    }

    /// The settings in force.
    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The engine client, for tests and tools that need more than the trait.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Podman and Docker differ in what this backend must work around (see
    /// [`EngineKind::Podman`]); say so when the configured kind is not the engine's.
    async fn warn_on_kind_mismatch(&self) {
        let Ok(version) = self.docker.version().await else {
            return;
        };
        let is_podman = version
            .components
            .iter()
            .flatten()
            .any(|component| component.name.to_ascii_lowercase().contains("podman"));
        let configured_podman = self.config.kind == EngineKind::Podman;
        if is_podman != configured_podman {
            tracing::warn!(
                host = %self.host,
                configured = kind_name(self.config.kind),
                engine_is_podman = is_podman,
                "the engine is not the kind configured in [docker] kind"
            );
        }
    }

    /// A bollard error as a [`BackendError`], saying what was being done.
    fn engine_error(&self, action: &str, error: &DockerError) -> BackendError {
        engine::engine_error(&self.host, action, error)
    }

    fn was_killed_by_us(&self, name: &str) -> bool {
        self.killed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    fn remember_kill(&self, name: &str, killed: bool) {
        let mut set = self
            .killed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if killed {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    fn observe(&self, inspect: &ContainerInspectResponse) -> Option<Observed> {
        let killed = container_name(inspect).is_some_and(|name| self.was_killed_by_us(name));
        observe(inspect, killed)
    }

    /// Inspects a container, by name or id, also when the engine is Podman (see
    /// [`compat`]).
    async fn inspect_container(&self, id: &str) -> Result<ContainerInspectResponse, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Err(error) => compat::inspect_from_error(&error).ok_or(error),
            inspected => inspected,
        }
    }

    /// The container of `job_id` if it exists and is this manager's: named exactly after
    /// the job (inspect also matches ID prefixes) and labelled as ours.
    async fn inspect_owned(
        &self,
        job_id: &JobId,
    ) -> Result<Option<ContainerInspectResponse>, BackendError> {
        if !is_container_name(job_id.as_str()) {
            return Ok(None);
        }
        match self.inspect_container(job_id.as_str()).await {
            Ok(inspect) => {
                let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
                let ours = container_name(&inspect) == Some(job_id.as_str())
                    && is_owned(labels, &self.manager_id);
                Ok(ours.then_some(inspect))
            }
            Err(error) if status_code(&error) == Some(404) => Ok(None),
            Err(error) => {
                Err(self.engine_error(&format!("inspecting container `{job_id}`"), &error))
            }
        }
    }

    /// Inspects a container we just created or listed, by its id.
    async fn observe_by_id(&self, id: &str) -> Result<Option<Observed>, BackendError> {
        match self.inspect_container(id).await {
            Ok(inspect) => {
                let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
                if is_owned(labels, &self.manager_id) {
                    Ok(self.observe(&inspect))
                } else {
                    Ok(None)
                }
            }
            Err(error) if status_code(&error) == Some(404) => Ok(None),
            Err(error) => Err(self.engine_error(&format!("inspecting container {id}"), &error)),
        }
    }

    /// Makes sure the engine has `image`, pulling it as the pull policy allows, within the
    /// pull timeout.
    async fn ensure_image(&self, image: &str) -> Result<(), BackendError> {
        let policy = ImagePolicy {
            pull: self.config.pull_policy,
            timeout: Duration::from_secs(self.config.pull_timeout_seconds),
            table: "docker",
        };
        engine::ensure_image(&self.docker, &self.host, image, policy).await
    }

    /// After a failed start: the container's own state says what happened if it can
    /// (a runtime error recorded as a failure, or a start that did happen); a container
    /// left merely created is removed, so that a retry can create it afresh.
    async fn settle_failed_start(
        &self,
        job: &JobRequest,
        id: &str,
        error: &DockerError,
    ) -> Result<Observed, BackendError> {
        let start_error = self.engine_error(&format!("starting container `{}`", job.job_id), error);
        match self.observe_by_id(id).await {
            Ok(Some(observed)) if observed.state != JobState::Queued => Ok(observed),
            Ok(Some(_)) => {
                let options = RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build();
                if let Err(remove_error) = self.docker.remove_container(id, Some(options)).await {
                    let error = describe(&remove_error);
                    tracing::warn!(
                        job_id = %job.job_id,
                        error,
                        "could not remove a container that failed to start"
                    );
                }
                Err(start_error)
            }
            // Gone, or the engine cannot say: leave it to the manager's reconciliation.
            Ok(None) | Err(_) => Err(start_error),
        }
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|error| self.engine_error("reading the engine's info", &error))?;
        let version = self
            .docker
            .version()
            .await
            .map_err(|error| self.engine_error("reading the engine's version", &error))?;
        let cores = u32::try_from(info.ncpu.unwrap_or(0).max(0)).unwrap_or(u32::MAX);
        let memory_bytes = u64::try_from(info.mem_total.unwrap_or(0).max(0)).unwrap_or(0);
        Ok(BackendCapabilities {
            kind: match self.config.kind {
                EngineKind::Docker => BackendKind::Docker,
                EngineKind::Podman => BackendKind::Podman,
            },
            cpu: CpuMillis(cores.saturating_mul(1000)),
            memory: MemoryMib(memory_bytes >> 20),
            // GPUs are requested per job (device requests) but not discovered: an engine
            // does not say how many it can hand out.
            gpus: 0,
            max_workers: 1,
            version: format!(
                "{} {} (API {})",
                kind_name(self.config.kind),
                version.version.as_deref().unwrap_or("unknown"),
                version.api_version.as_deref().unwrap_or("unknown")
            ),
        })
    }

    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError> {
        check_request(job)?;
        self.ensure_image(&job.image).await?;
        let name = job.job_id.as_str();
        let body = container_body(job, &self.config, &self.host_limits);
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let created = match self.docker.create_container(Some(options), body).await {
            Ok(created) => created,
            Err(error) => {
                if compat::is_name_conflict(&error) {
                    return Err(BackendError::AlreadyExists(name.to_owned()));
                }
                return Err(match status_code(&error) {
                    // The image went away between the check and the create.
                    Some(404) => BackendError::ImageNotFound {
                        image: job.image.clone(),
                        reason: server_message(&error),
                    },
                    _ => self.engine_error(&format!("creating container `{name}`"), &error),
                });
            }
        };
        for warning in &created.warnings {
            tracing::warn!(job_id = name, warning, "engine warning on create");
        }
        self.remember_kill(name, false);
        if let Err(error) = self.docker.start_container(&created.id, None).await {
            return self.settle_failed_start(job, &created.id, &error).await;
        }
        self.observe_by_id(&created.id).await?.ok_or_else(|| {
            BackendError::Engine(format!(
                "container `{name}` disappeared right after it was started"
            ))
        })
    }

    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        Ok(self
            .inspect_owned(job_id)
            .await?
            .and_then(|inspect| self.observe(&inspect)))
    }

    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let inspect = self
            .inspect_owned(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let id = inspect.id.unwrap_or_else(|| job_id.to_string());
        let tail = tail_lines.map_or_else(|| "all".to_owned(), |lines| lines.to_string());
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        let host = self.host.clone();
        let job = job_id.to_string();
        let stream = self.docker.logs(&id, Some(options)).map(move |item| {
            item.map(bollard::container::LogOutput::into_bytes)
                .map_err(|error| {
                    BackendError::Engine(format!(
                        "reading the logs of container `{job}` from {host}: {}",
                        describe(&error)
                    ))
                })
        });
        Ok(Box::pin(stream))
    }

    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError> {
        let inspect = self
            .inspect_owned(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let state = inspect.state.as_ref();
        let running = state.is_some_and(|s| {
            s.running == Some(true) || s.paused == Some(true) || s.restarting == Some(true)
        });
        if !running {
            return Ok(());
        }
        let id = inspect.id.as_deref().unwrap_or(job_id.as_str());
        self.remember_kill(job_id.as_str(), true);
        match self
            .docker
            .kill_container(id, None::<KillContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            // Ended (409: not running) or removed (404) meanwhile: nothing left to kill.
            Err(error) if matches!(status_code(&error), Some(409 | 404)) => Ok(()),
            Err(error) => Err(self.engine_error(&format!("killing container `{job_id}`"), &error)),
        }
    }

    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError> {
        let Some(inspect) = self.inspect_owned(job_id).await? else {
            return Ok(false);
        };
        let id = inspect.id.as_deref().unwrap_or(job_id.as_str());
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let removed = match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => true,
            Err(error) if status_code(&error) == Some(404) => false,
            // 409: a removal is already in progress.
            Err(error) if status_code(&error) == Some(409) => true,
            Err(error) => {
                return Err(self.engine_error(&format!("removing container `{job_id}`"), &error));
            }
        };
        self.remember_kill(job_id.as_str(), false);
        Ok(removed)
    }

    async fn list_owned(&self) -> Result<Vec<Observed>, BackendError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
                format!("{}={}", labels::MANAGER_ID, self.manager_id),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        // The list lacks exit codes and the OOM flag: inspect each, a few at a time.
        let ids: Vec<String> = match self.docker.list_containers(Some(options)).await {
            Ok(summaries) => summaries
                .into_iter()
                .filter_map(|summary| summary.id)
                .collect(),
            Err(error) => compat::ids_from_error(&error)
                .ok_or_else(|| self.engine_error("listing containers", &error))?,
        };
        let observed: Vec<Option<Observed>> = futures::stream::iter(ids)
            .map(|id| async move { self.observe_by_id(&id).await })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .try_collect()
            .await?;
        let mut observed: Vec<Observed> = observed.into_iter().flatten().collect();
        observed.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(observed)
    }
}

fn kind_name(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Docker => "Docker",
        EngineKind::Podman => "Podman",
    }
}

fn server_message(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => describe(other),
    }
}

/// Whether `image` can only be an image reference: the characters of
/// `[registry[:port]/]name[:tag][@digest]` and no empty, `.` or `..` path component, so it
/// cannot change the engine URL it goes in.
pub(crate) fn is_image_reference(image: &str) -> bool {
    image
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
        && image
            .split('/')
            .all(|component| !matches!(component, "" | "." | ".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_are_checked_before_they_reach_a_url() {
        for good in [
            "busybox",
            "localhost:5000/a/b:1.0",
            "ghcr.io/fnndsc/pl-x@sha256:0a1b",
        ] {
            assert!(is_image_reference(good), "{good}");
        }
        for bad in [
            "",
            "a b",
            "x?y=1",
            "x#y",
            "../../containers/json",
            "a//b",
            "/a",
        ] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }
}

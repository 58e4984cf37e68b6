//! The swarm backend: runs each job as one Docker Swarm service in `replicated-job` mode
//! (one task, one completion, never restarted), as pfcon's `swarmmgr.py` runs a job
//! (pfcon-api.md §4.2), with what pfcon lacks: labels on the service and its container,
//! exit codes and out-of-memory kills told apart, a kill that keeps the job's record and
//! logs, and jobs isolated from the network by default.
//!
//! It owns the services it creates: each is named after its job id (or, where Swarm's
//! stricter name rule refuses the id, after a stable hash of it) and labelled with the job
//! id and this manager's id. It must never read, kill or remove a service without both
//! `managed-by` and `manager-id` labels of its own, and never builds an engine URL from a
//! name that is not a valid service name.
//!
//! It talks to one engine, a swarm manager. Killing a job stops its task's container and
//! removing one removes its containers through that same engine, so jobs whose tasks land
//! on other nodes can be watched, logged and removed, but not killed (the swarm has no
//! "stop this task" call that keeps the task's record; see [`Backend::kill`] below).
//!
//! Long calls are bounded here: an image pull by [`SwarmConfig::pull_timeout_seconds`];
//! a followed log stream ends when the job's task ends, or when the caller drops it.

mod config;
mod observe;
mod spec;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerInspectResponse, LocalNodeState, NetworkCreateRequest, NodeSpecAvailabilityEnum,
    NodeState, Service, ServiceSpec, Task,
};
use bollard::query_parameters::{
    InspectNetworkOptions, KillContainerOptions, ListServicesOptionsBuilder,
    ListTasksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bytes::Bytes;
use dispatch_backend_docker::engine::{self, EngineAddress, ImagePolicy, describe, status_code};
use dispatch_manager::backend::{BackendCapabilities, LogStream, labels};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{BackendKind, CpuMillis, JobId, MemoryMib};
use futures::{Stream, StreamExt, TryStreamExt};

pub use crate::config::{ISOLATED_NETWORK, NO_NETWORK, SwarmConfig};
use crate::observe::{
    current_task, is_owned, is_terminal, observe, service_job_id, service_labels, task_container_id,
};
use crate::spec::{check_request, is_service_name, service_name, service_spec};

/// How many services `list_owned` looks at at once.
const INSPECT_CONCURRENCY: usize = 8;
/// How often a followed log checks whether the job has ended.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Once the job has ended, how long a followed log waits for more output before it ends:
/// the task's end reaches the swarm's store after its container's last write, so what is
/// left is already on its way.
const FOLLOW_DRAIN_IDLE: Duration = Duration::from_secs(1);
/// How long a kill waits for a queued task to get a container to kill.
const KILL_START_WAIT: Duration = Duration::from_secs(15);
/// How often a kill looks for the task's container.
const KILL_POLL: Duration = Duration::from_millis(100);

/// Jobs as one-shot services on a Docker Swarm.
#[derive(Debug)]
pub struct SwarmBackend {
    docker: Docker,
    /// The engine's address, for error messages.
    host: String,
    manager_id: String,
    config: SwarmConfig,
    /// Services (by id) whose task this process killed, so that their exit code 137 is
    /// not taken for an out-of-memory kill. Forgotten on restart, when the manager's own
    /// record of cancellations takes over.
    killed: Mutex<HashSet<String>>,
}

impl SwarmBackend {
    /// Connects to the engine `config` names (else `DOCKER_HOST`, else the local socket),
    /// agrees on an API version both sides speak (Docker 20.10 speaks 1.41), checks that
    /// the engine is a swarm manager, and with `network = "none"` makes sure the isolated
    /// network exists.
    pub async fn connect(manager_id: &str, config: SwarmConfig) -> Result<Self, BackendError> {
        if manager_id.is_empty() {
            return Err(BackendError::Unsupported {
                field: "manager_id",
                reason: "cannot be empty: it labels every service this manager creates".into(),
            });
        }
        let host = config.resolve_host(|key| std::env::var(key).ok());
        let docker = engine::connect(EngineAddress {
            host: &host,
            kind: "Docker",
            table: "swarm",
            host_field: "swarm.host",
        })
        .await?;

        let backend = Self {
            docker,
            host,
            manager_id: manager_id.to_owned(),
            config,
            killed: Mutex::new(HashSet::new()),
        };
        backend.check_swarm_manager().await?;
        backend.ensure_isolated_network().await?;
        Ok(backend)
    }

    /// The settings in force.
    pub fn config(&self) -> &SwarmConfig {
        &self.config
    }

    /// The engine client, for tests and tools that need more than the trait.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The engine must be a manager of an active swarm: only managers take service calls.
    async fn check_swarm_manager(&self) -> Result<(), BackendError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|error| self.engine_error("reading the engine's info", &error))?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm.local_node_state.unwrap_or(LocalNodeState::EMPTY);
        if state != LocalNodeState::ACTIVE {
            let error = swarm
                .error
                .filter(|e| !e.is_empty())
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            return Err(BackendError::Engine(format!(
                "the Docker engine at {} is not in a swarm (its swarm state is `{state}`{error}): \
                 run `docker swarm init` on it (for a one-node test swarm: `docker swarm init \
                 --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377`, which \
                 scripts/setup-swarm.sh does), or point [swarm] host at a swarm manager",
                self.host
            )));
        }
        if swarm.control_available != Some(true) {
            return Err(BackendError::Engine(format!(
                "the Docker engine at {} is a swarm worker, not a manager: services can only \
                 be created through a manager; point [swarm] host at a manager node (`docker \
                 node ls` on one lists them), or promote this node (`docker node promote`)",
                self.host
            )));
        }
        Ok(())
    }

    /// With `network = "none"`: creates the internal bridge network jobs go on, unless it
    /// exists. Swarm cannot attach a service to the engine's `none` network; an internal
    /// network has no route out.
    async fn ensure_isolated_network(&self) -> Result<(), BackendError> {
        if self.config.network != NO_NETWORK {
            return Ok(());
        }
        if self.swarm_has_network(ISOLATED_NETWORK).await? {
            return Ok(());
        }
        self.create_isolated_network().await
    }

    /// Creates the isolated network; fine if it exists by the time the engine refuses.
    async fn create_isolated_network(&self) -> Result<(), BackendError> {
        let request = NetworkCreateRequest {
            name: ISOLATED_NETWORK.to_owned(),
            driver: Some("bridge".into()),
            scope: Some("swarm".into()),
            internal: Some(true),
            labels: Some(HashMap::from([(
                labels::MANAGED_BY.to_owned(),
                labels::MANAGED_BY_VALUE.to_owned(),
            )])),
            ..NetworkCreateRequest::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => {
                tracing::info!(
                    network = ISOLATED_NETWORK,
                    "created the jobs' isolated network"
                );
                Ok(())
            }
            // Another manager (or test) made it meanwhile.
            Err(_) if self.swarm_has_network(ISOLATED_NETWORK).await? => Ok(()),
            Err(error) => Err(self.engine_error(
                &format!(
                    "creating the isolated network `{ISOLATED_NETWORK}` (or set [swarm] network)"
                ),
                &error,
            )),
        }
    }

    /// Whether `error` says the isolated network this backend attaches jobs to is gone.
    fn lost_isolated_network(&self, error: &DockerError) -> bool {
        self.config.network == NO_NETWORK
            && matches!(error, DockerError::DockerResponseServerError { message, .. }
                if message.contains(ISOLATED_NETWORK) && message.contains("not found"))
    }

    /// Whether the swarm itself has the network: asked with scope `swarm`, as the engine
    /// may still list a network of a swarm it has left (seen after `docker swarm leave`
    /// and `init`), which services cannot use.
    async fn swarm_has_network(&self, name: &str) -> Result<bool, BackendError> {
        let options = InspectNetworkOptions {
            verbose: false,
            scope: Some("swarm".into()),
        };
        match self.docker.inspect_network(name, Some(options)).await {
            Ok(network) => Ok(network.scope.as_deref() == Some("swarm")),
            Err(error) if status_code(&error) == Some(404) => Ok(false),
            Err(error) => Err(self.engine_error(&format!("inspecting network `{name}`"), &error)),
        }
    }

    /// A bollard error as a [`BackendError`], saying what was being done.
    fn engine_error(&self, action: &str, error: &DockerError) -> BackendError {
        engine::engine_error(&self.host, action, error)
    }

    fn was_killed_by_us(&self, service_id: &str) -> bool {
        self.killed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(service_id)
    }

    fn remember_kill(&self, service_id: &str, killed: bool) {
        let mut set = self
            .killed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if killed {
            set.insert(service_id.to_owned());
        } else {
            set.remove(service_id);
        }
    }

    /// The service of `job_id` if it exists and is this manager's: named as this backend
    /// names it (inspect also matches ID prefixes), labelled as ours and with this job id.
    async fn find_service(&self, job_id: &JobId) -> Result<Option<Service>, BackendError> {
        let name = service_name(job_id);
        if !is_service_name(&name) {
            return Ok(None);
        }
        match self.docker.inspect_service(&name, None).await {
            Ok(service) => {
                let named = service.spec.as_ref().and_then(|s| s.name.as_deref()) == Some(&name);
                let ours = named
                    && is_owned(service_labels(&service), &self.manager_id)
                    && service_job_id(&service).as_ref() == Some(job_id);
                Ok(ours.then_some(service))
            }
            Err(error) if status_code(&error) == Some(404) => Ok(None),
            Err(error) => Err(self.engine_error(&format!("inspecting service `{name}`"), &error)),
        }
    }

    /// The tasks of a service, by its id (a name would also match a removed service's
    /// leftovers under a later one of the same name).
    async fn tasks(&self, service_id: &str) -> Result<Vec<Task>, BackendError> {
        tasks_of(&self.docker, service_id).await.map_err(|error| {
            self.engine_error(
                &format!("listing the tasks of service {service_id}"),
                &error,
            )
        })
    }

    /// The container on the local engine, or `None` when it has none by that id (gone,
    /// or on another node).
    async fn local_container(
        &self,
        id: &str,
    ) -> Result<Option<ContainerInspectResponse>, BackendError> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => Ok(Some(inspect)),
            Err(error) if status_code(&error) == Some(404) => Ok(None),
            Err(error) => Err(self.engine_error(&format!("inspecting container {id}"), &error)),
        }
    }

    /// What the engine says of a service of ours.
    async fn observe_service(&self, service: &Service) -> Result<Option<Observed>, BackendError> {
        let Some(service_id) = service.id.as_deref() else {
            return Ok(None);
        };
        let tasks = self.tasks(service_id).await?;
        let task = current_task(&tasks);
        let container = match task.and_then(task_container_id) {
            Some(id) => self.local_container(id).await?,
            None => None,
        };
        Ok(observe(
            service,
            task,
            container.as_ref(),
            self.was_killed_by_us(service_id),
        ))
    }

    /// Makes sure the manager node's engine has `image`, pulling it as the pull policy
    /// allows, within the pull timeout. An image the engine has is used without asking any
    /// registry; other nodes pull for themselves.
    async fn ensure_image(&self, image: &str) -> Result<(), BackendError> {
        let policy = ImagePolicy {
            pull: self.config.pull_policy,
            timeout: Duration::from_secs(self.config.pull_timeout_seconds),
            table: "swarm",
        };
        engine::ensure_image(&self.docker, &self.host, image, policy).await
    }

    /// The current task of a service once it has a container or has ended, waiting up to
    /// [`KILL_START_WAIT`] for a queued one to start.
    async fn task_to_kill(
        &self,
        job_id: &JobId,
        service_id: &str,
    ) -> Result<Option<Task>, BackendError> {
        let deadline = tokio::time::Instant::now() + KILL_START_WAIT;
        loop {
            let tasks = self.tasks(service_id).await?;
            if let Some(task) = current_task(&tasks) {
                let state = task
                    .status
                    .as_ref()
                    .and_then(|s| s.state)
                    .unwrap_or_default();
                if is_terminal(state) {
                    return Ok(None);
                }
                if task_container_id(task).is_some() {
                    return Ok(Some(task.clone()));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::Engine(format!(
                    "job `{job_id}` has not started within {} s (its task is still queued in \
                     the swarm), and a queued swarm task cannot be stopped while keeping its \
                     record: remove the job instead",
                    KILL_START_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(KILL_POLL).await;
        }
    }
}

#[async_trait::async_trait]
impl Backend for SwarmBackend {
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError> {
        let nodes = self
            .docker
            .list_nodes(None)
            .await
            .map_err(|error| self.engine_error("listing the swarm's nodes", &error))?;
        let version = self
            .docker
            .version()
            .await
            .map_err(|error| self.engine_error("reading the engine's version", &error))?;
        // What the scheduler may place tasks on: nodes that are up and not paused or
        // drained.
        let usable = nodes.iter().filter(|node| {
            let ready = node.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY);
            let active = node.spec.as_ref().and_then(|s| s.availability)
                == Some(NodeSpecAvailabilityEnum::ACTIVE);
            ready && active
        });
        let (mut nano_cpus, mut memory_bytes, mut count) = (0u64, 0u64, 0usize);
        for node in usable {
            let resources = node.description.as_ref().and_then(|d| d.resources.as_ref());
            let positive = |value: Option<i64>| u64::try_from(value.unwrap_or(0)).unwrap_or(0);
            nano_cpus = nano_cpus.saturating_add(positive(resources.and_then(|r| r.nano_cpus)));
            memory_bytes =
                memory_bytes.saturating_add(positive(resources.and_then(|r| r.memory_bytes)));
            count += 1;
        }
        Ok(BackendCapabilities {
            kind: BackendKind::Swarm,
            cpu: CpuMillis(u32::try_from(nano_cpus / 1_000_000).unwrap_or(u32::MAX)),
            memory: MemoryMib(memory_bytes >> 20),
            // Swarm has GPUs only as generic resources, which this backend does not use.
            gpus: 0,
            max_workers: 1,
            version: format!(
                "Docker Swarm, {count} usable node(s) of {}; manager engine {} (API {})",
                nodes.len(),
                version.version.as_deref().unwrap_or("unknown"),
                version.api_version.as_deref().unwrap_or("unknown")
            ),
        })
    }

    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError> {
        check_request(job)?;
        self.ensure_image(&job.image).await?;
        let name = service_name(&job.job_id);
        let spec: ServiceSpec = service_spec(job, &name, &self.config);
        let mut created = self.docker.create_service(spec.clone(), None).await;
        if let Err(error) = &created
            && self.lost_isolated_network(error)
        {
            // Removed since connect (`docker network prune` removes it between jobs):
            // make it again, once.
            tracing::warn!(
                network = ISOLATED_NETWORK,
                "the jobs' network is gone; making it again"
            );
            self.create_isolated_network().await?;
            created = self.docker.create_service(spec, None).await;
        }
        let created = match created {
            Ok(created) => created,
            Err(error) if status_code(&error) == Some(409) => {
                return Err(BackendError::AlreadyExists(job.job_id.to_string()));
            }
            Err(error) => {
                return Err(self.engine_error(&format!("creating service `{name}`"), &error));
            }
        };
        for warning in created.warnings.iter().flatten() {
            tracing::warn!(job_id = %job.job_id, warning, "engine warning on create");
        }
        let id = created.id.unwrap_or(name);
        self.remember_kill(&id, false);
        let service = self
            .docker
            .inspect_service(&id, None)
            .await
            .map_err(|error| self.engine_error(&format!("inspecting service {id}"), &error))?;
        self.observe_service(&service).await?.ok_or_else(|| {
            BackendError::Engine(format!(
                "service `{id}` of job `{}` lost its labels right after it was created",
                job.job_id
            ))
        })
    }

    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        match self.find_service(job_id).await? {
            Some(service) => self.observe_service(&service).await,
            None => Ok(None),
        }
    }

    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let service = self
            .find_service(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let service_id = service
            .id
            .clone()
            .ok_or_else(|| BackendError::Engine(format!("service of job `{job_id}` has no id")))?;
        // A job that has ended needs no following: a plain read has all its output and
        // ends by itself.
        let follow = follow
            && !job_has_ended(&self.docker, &service_id)
                .await
                .map_err(|error| self.engine_error("listing the job's tasks", &error))?;
        let tail = tail_lines.map_or_else(|| "all".to_owned(), |lines| lines.to_string());
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        let host = self.host.clone();
        let job = job_id.to_string();
        let stream = self
            .docker
            .service_logs(&service_id, Some(options))
            .map(move |item| {
                item.map(bollard::container::LogOutput::into_bytes)
                    .map_err(|error| {
                        BackendError::Engine(format!(
                            "reading the logs of job `{job}` from {host}: {}",
                            describe(&error)
                        ))
                    })
            });
        if !follow {
            return Ok(Box::pin(stream));
        }
        // Swarm's service logs follow the service, not the task: they never end by
        // themselves. End them once the job has ended and its last output has come.
        let ended = wait_until_ended(self.docker.clone(), service_id);
        Ok(Box::pin(follow_until(Box::pin(stream), Box::pin(ended))))
    }

    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError> {
        let service = self
            .find_service(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let Some(service_id) = service.id.as_deref() else {
            return Ok(());
        };
        let Some(task) = self.task_to_kill(job_id, service_id).await? else {
            // Ended already.
            return Ok(());
        };
        let Some(container) = task_container_id(&task) else {
            return Ok(());
        };
        // The swarm has no call that stops one task and keeps it: removing or updating
        // the service would drop or replace it. Killing the task's container ends the task
        // as `failed` (exit 137) with its logs kept, which is what a kill means here.
        self.remember_kill(service_id, true);
        match self
            .docker
            .kill_container(container, None::<KillContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            // Ended meanwhile: nothing left to kill.
            Err(error) if status_code(&error) == Some(409) => Ok(()),
            Err(error) if status_code(&error) == Some(404) => {
                let node = task.node_id.as_deref().unwrap_or("unknown");
                Err(BackendError::Engine(format!(
                    "job `{job_id}` runs on swarm node {node}, not on the engine at {} this \
                     backend talks to, so its container cannot be killed from here; remove \
                     the job to stop it",
                    self.host
                )))
            }
            Err(error) => {
                Err(self.engine_error(&format!("killing the container of job `{job_id}`"), &error))
            }
        }
    }

    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError> {
        let Some(service) = self.find_service(job_id).await? else {
            return Ok(false);
        };
        let Some(service_id) = service.id.clone() else {
            return Ok(false);
        };
        let containers: Vec<String> = self
            .tasks(&service_id)
            .await?
            .iter()
            .filter_map(task_container_id)
            .map(str::to_owned)
            .collect();
        let removed = match self.docker.delete_service(&service_id).await {
            Ok(()) => true,
            Err(error) if status_code(&error) == Some(404) => false,
            Err(error) => {
                return Err(
                    self.engine_error(&format!("removing the service of job `{job_id}`"), &error)
                );
            }
        };
        // The swarm removes a removed service's containers only when it gets round to it
        // (minutes, seen on Docker 20.10); remove those on this engine now, killing a
        // running one. Those on other nodes are left to their own engines.
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        for container in containers {
            match self
                .docker
                .remove_container(&container, Some(options.clone()))
                .await
            {
                Ok(()) => {}
                Err(error) if matches!(status_code(&error), Some(404 | 409)) => {}
                Err(error) => {
                    return Err(self.engine_error(
                        &format!("removing container {container} of job `{job_id}`"),
                        &error,
                    ));
                }
            }
        }
        self.remember_kill(&service_id, false);
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
        let options = ListServicesOptionsBuilder::new().filters(&filters).build();
        let services = self
            .docker
            .list_services(Some(options))
            .await
            .map_err(|error| self.engine_error("listing services", &error))?;
        let ours = services
            .into_iter()
            .filter(|service| is_owned(service_labels(service), &self.manager_id));
        let observed: Vec<Option<Observed>> = futures::stream::iter(ours)
            .map(|service| async move { self.observe_service(&service).await })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .try_collect()
            .await?;
        let mut observed: Vec<Observed> = observed.into_iter().flatten().collect();
        observed.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(observed)
    }
}

/// The tasks of the service with id `service_id`.
async fn tasks_of(docker: &Docker, service_id: &str) -> Result<Vec<Task>, DockerError> {
    let filters = HashMap::from([("service", vec![service_id.to_owned()])]);
    let options = ListTasksOptionsBuilder::new().filters(&filters).build();
    docker.list_tasks(Some(options)).await
}

/// Whether the job's task has ended (or the service is gone, so it never will run).
async fn job_has_ended(docker: &Docker, service_id: &str) -> Result<bool, DockerError> {
    match docker.inspect_service(service_id, None).await {
        Err(error) if status_code(&error) == Some(404) => return Ok(true),
        Err(error) => return Err(error),
        Ok(_) => {}
    }
    let tasks = tasks_of(docker, service_id).await?;
    Ok(current_task(&tasks)
        .and_then(|task| task.status.as_ref())
        .and_then(|status| status.state)
        .is_some_and(is_terminal))
}

/// Resolves once the job has ended, checking every [`FOLLOW_POLL`]; an engine that cannot
/// be asked is asked again (the log stream itself reports a lost engine).
async fn wait_until_ended(docker: Docker, service_id: String) {
    loop {
        match job_has_ended(&docker, &service_id).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => {
                tracing::debug!(service_id, error = %describe(&error), "cannot tell whether a followed job ended");
            }
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

type LogItems = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send>>;
type Ended = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// `logs` until `ended` resolves, then what still comes without a pause of
/// [`FOLLOW_DRAIN_IDLE`].
fn follow_until(logs: LogItems, ended: Ended) -> impl Stream<Item = Result<Bytes, BackendError>> {
    struct Following {
        logs: LogItems,
        ended: Option<Ended>,
    }
    futures::stream::unfold(
        Following {
            logs,
            ended: Some(ended),
        },
        |mut state| async move {
            loop {
                let Some(ended) = state.ended.as_mut() else {
                    let item = next_within(&mut state.logs, FOLLOW_DRAIN_IDLE).await?;
                    return Some((item, state));
                };
                tokio::select! {
                    item = state.logs.next() => return item.map(|item| (item, state)),
                    () = ended => state.ended = None,
                }
            }
        },
    )
}

/// The stream's next item, or `None` when it ends or pauses for `idle`.
async fn next_within(logs: &mut LogItems, idle: Duration) -> Option<Result<Bytes, BackendError>> {
    tokio::time::timeout(idle, logs.next()).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_followed_log_ends_after_the_job_once_output_pauses() {
        let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Bytes, BackendError>>();
        let (end, ended) = futures::channel::oneshot::channel::<()>();
        let logs: LogItems = Box::pin(receiver);
        let ended: Ended = Box::pin(async move {
            let _ = ended.await;
        });
        sender
            .unbounded_send(Ok(Bytes::from_static(b"one\n")))
            .unwrap();
        let mut followed = Box::pin(follow_until(logs, ended));
        assert_eq!(followed.next().await.unwrap().unwrap(), "one\n");
        end.send(()).unwrap();
        // Output still on its way after the end is passed on...
        sender
            .unbounded_send(Ok(Bytes::from_static(b"two\n")))
            .unwrap();
        assert_eq!(followed.next().await.unwrap().unwrap(), "two\n");
        // ... and a pause ends the stream, though the engine's stream stays open.
        assert!(followed.next().await.is_none());
        drop(sender);
    }
}

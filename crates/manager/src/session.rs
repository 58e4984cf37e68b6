//! The site session: the manager's side of the lease protocol with the coordinator
//! (`dispatch.v1.SiteRegistry`).
//!
//! The site dials out, so a site behind a firewall opens no port. A [`SiteSession`] joins
//! the hub once with a join token (keeping the credential it gets in a 0600 file), then
//! holds one `Session` stream open: it says hello with the backend's capabilities,
//! heartbeats at the hub's interval, advertises its free capacity whenever it changes,
//! and runs what the hub leases to it (stage in through the site broker, run on the
//! backend, stage out, report), cancels, removes, relays logs and reports what the backend
//! really has. When the stream drops it reconnects with exponential backoff and jitter and
//! sends again every status report the hub has not acknowledged (see [`outbox`]); when
//! the manager stops it says goodbye and leaves its jobs running, to be picked up again at
//! the next start.
//!
//! It must never run two attempts of one job at once, never report a job going backwards,
//! never drop a status report before the hub has acknowledged it, and never log a secret
//! (join token, site credential, grants, job env).

mod identity;
mod lease;
pub mod outbox;
mod staging;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use dispatch_proto::v1::site_registry_client::SiteRegistryClient;
use dispatch_proto::v1::{self as pb, JobState, hub_message, site_message};
use dispatch_proto::{JobId, JobSpec};

pub use identity::SiteIdentity;

use crate::config::ManagerConfig;
use crate::error::{Error, Result};
use crate::manager::Manager;
use lease::{JobControl, LeaseRun};
use outbox::{AttemptKey, Outbox};
use staging::SiteBroker;

/// The version of the site protocol this manager speaks (`SiteHello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
/// How long the hub has to answer hello.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a goodbye waits for the hub to close the stream.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);
/// Messages queued for the hub before senders wait.
const OUTBOUND_QUEUE: usize = 256;
/// Jobs per page of a reconcile report.
const RECONCILE_PAGE: usize = 500;
/// Largest log chunk when the hub does not say.
const DEFAULT_LOG_CHUNK: usize = 64 * 1024;
/// Resend interval for unacknowledged reports when the hub does not say.
const DEFAULT_RESEND: Duration = Duration::from_secs(30);
/// Largest gRPC message either way.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How the hub asked the session to behave.
#[derive(Debug, Clone, Copy)]
struct Settings {
    heartbeat: Duration,
    max_log_chunk: usize,
    resend_after: Duration,
}

impl Settings {
    fn apply(&mut self, config: &pb::SessionConfig) {
        if config.heartbeat_interval_seconds > 0 {
            self.heartbeat = Duration::from_secs(u64::from(config.heartbeat_interval_seconds));
        }
        if config.max_log_chunk_bytes > 0 {
            self.max_log_chunk = config.max_log_chunk_bytes as usize;
        }
        if config.status_resend_seconds > 0 {
            self.resend_after = Duration::from_secs(u64::from(config.status_resend_seconds));
        }
    }
}

/// What the session task and the lease runs share.
struct Shared {
    config: Arc<ManagerConfig>,
    manager: Arc<Manager>,
    outbox: Outbox,
    broker: Option<SiteBroker>,
    /// Leases being run, by job id.
    jobs: Mutex<HashMap<String, JobControl>>,
    next_run_id: AtomicU64,
    /// Lease runs waiting for `GrantsIssued`.
    grant_waiters: Mutex<HashMap<AttemptKey, Vec<oneshot::Sender<pb::StagingPlan>>>>,
    /// Every task the session starts; waited for at shutdown.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Poked when free capacity may have changed.
    capacity_changed: Notify,
    settings: Mutex<Settings>,
    /// The site broker's store id, once known.
    store_id: Mutex<Option<String>>,
    poll: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn message(message: site_message::Message) -> pb::SiteMessage {
    pb::SiteMessage {
        message: Some(message),
    }
}

fn decline(
    job_id: &str,
    attempt: u32,
    reason: pb::DeclineReason,
    detail: String,
) -> pb::LeaseDeclined {
    pb::LeaseDeclined {
        job_id: job_id.to_owned(),
        attempt,
        reason: reason as i32,
        message: detail,
    }
}

impl Shared {
    /// Starts a named task owned by the session; a panic in it is logged with its name
    /// instead of vanishing.
    fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                tracing::error!(task = name, "site session task panicked");
            }
        });
    }

    fn settings(&self) -> Settings {
        *lock(&self.settings)
    }

    /// The backend's capabilities as advertised to the hub, and its free capacity now:
    /// what the backend has free, less what leases not yet in the backend set aside.
    async fn capacity(&self) -> Result<(pb::Capabilities, pb::CapacityUpdate)> {
        let response = self.manager.capabilities().await?;
        let mut capabilities = response.capabilities.unwrap_or_default();
        let hub = &self.config.hub;
        capabilities.labels = hub
            .site_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        capabilities.max_concurrent_jobs = hub.max_concurrent_jobs;
        capabilities.site_store_id = self.store_id().await;
        let mut free = response.free.unwrap_or_default();
        let (active, reserved) = {
            let jobs = lock(&self.jobs);
            let mut reserved = pb::Resources::default();
            for job in jobs.values().filter(|j| !j.is_in_backend()) {
                reserved.cpu_millicores += job.reserved.cpu_millicores;
                reserved.memory_mib += job.reserved.memory_mib;
                reserved.gpus += job.reserved.gpus;
            }
            (jobs.len() as u32, reserved)
        };
        free.cpu_millicores = free.cpu_millicores.saturating_sub(reserved.cpu_millicores);
        free.memory_mib = free.memory_mib.saturating_sub(reserved.memory_mib);
        free.gpus = free.gpus.saturating_sub(reserved.gpus);
        let free_job_slots = hub.max_concurrent_jobs.saturating_sub(active);
        Ok((
            capabilities,
            pb::CapacityUpdate {
                free: Some(free),
                free_job_slots,
                active_jobs: active,
            },
        ))
    }

    async fn store_id(&self) -> String {
        if let Some(id) = lock(&self.store_id).clone() {
            return id;
        }
        let Some(broker) = &self.broker else {
            return String::new();
        };
        let found = broker.store_id().await.unwrap_or_default();
        if !found.is_empty() {
            *lock(&self.store_id) = Some(found.clone());
        }
        found
    }

    /// Takes a lease, or says why not. Checked in order: a spec this site can read, not
    /// draining, not already running it, able to run it at all, room for it now.
    async fn accept_lease(
        self: &Arc<Self>,
        lease: pb::RunJobCommand,
    ) -> std::result::Result<(), pb::LeaseDeclined> {
        let raw_id = lease
            .spec
            .as_ref()
            .map(|s| s.job_id.clone())
            .unwrap_or_default();
        let attempt = lease.attempt;
        let unsupported =
            |detail: String| decline(&raw_id, attempt, pb::DeclineReason::Unsupported, detail);
        let spec = lease
            .spec
            .clone()
            .ok_or_else(|| unsupported("spec: is required".into()))
            .and_then(|wire| {
                JobSpec::try_from(wire).map_err(|e| unsupported(format!("spec.{e}")))
            })?;
        let job_id = spec.job_id().to_string();
        if self.shutdown.is_cancelled() {
            return Err(decline(
                &job_id,
                attempt,
                pb::DeclineReason::Draining,
                "the manager is shutting down".into(),
            ));
        }
        if let Some(running) = lock(&self.jobs).get(&job_id)
            && running.attempt == attempt
        {
            tracing::info!(job = %job_id, attempt, "lease already being run; ignoring the repeat");
            return Ok(());
        }
        let (capabilities, capacity) = self.capacity().await.map_err(|e| {
            decline(
                &job_id,
                attempt,
                pb::DeclineReason::NoCapacity,
                format!("cannot read the backend's capacity: {e}"),
            )
        })?;
        if let Some(detail) = self.cannot_run(&spec, &lease, &capabilities) {
            return Err(unsupported(detail));
        }
        if let Some(detail) = self.no_room(&spec, &capacity) {
            return Err(decline(
                &job_id,
                attempt,
                pb::DeclineReason::NoCapacity,
                detail,
            ));
        }
        self.outbox.record_lease(&lease).await.map_err(|e| {
            decline(
                &job_id,
                attempt,
                pb::DeclineReason::NoCapacity,
                format!("cannot record the lease: {e}"),
            )
        })?;
        self.run_lease(spec, &lease);
        Ok(())
    }

    /// Starts the run of a lease, stopping a run of an older attempt of the same job.
    fn run_lease(self: &Arc<Self>, spec: JobSpec, lease: &pb::RunJobCommand) {
        let reserved = pb::Resources {
            cpu_millicores: spec.cpu().0,
            memory_mib: spec.memory().0,
            gpus: spec.gpus(),
        };
        let id = self.next_run_id.fetch_add(1, Ordering::SeqCst);
        let control = JobControl::new(id, lease.attempt, reserved, self.shutdown.child_token());
        let replaced = lock(&self.jobs).insert(spec.job_id().to_string(), control.clone());
        if let Some(old) = replaced {
            tracing::info!(job = %spec.job_id(), old_attempt = old.attempt, attempt = lease.attempt,
                "a newer attempt replaces the one being run");
            old.stop.cancel();
        }
        let run = LeaseRun::new(self.clone(), spec, lease, control);
        self.spawn("lease", run.run());
        self.capacity_changed.notify_one();
    }

    /// Why this site can never run the job as written, if it cannot.
    fn cannot_run(
        &self,
        spec: &JobSpec,
        lease: &pb::RunJobCommand,
        capabilities: &pb::Capabilities,
    ) -> Option<String> {
        if spec.workers().get() > capabilities.max_workers.max(1) {
            return Some(format!(
                "workers: this site runs at most {} per job, the job asks for {}",
                capabilities.max_workers,
                spec.workers()
            ));
        }
        let largest = capabilities.max_per_job.unwrap_or_default();
        if spec.cpu().0 > largest.cpu_millicores
            || spec.memory().0 > largest.memory_mib
            || spec.gpus() > largest.gpus
        {
            return Some(format!(
                "limits: the largest job here is {} millicores, {} MiB, {} GPUs",
                largest.cpu_millicores, largest.memory_mib, largest.gpus
            ));
        }
        let mode = pb::StorageMode::from(spec.storage_mode()) as i32;
        if !capabilities.storage_modes.contains(&mode) {
            return Some(format!(
                "storage_mode: this site does not serve {:?}",
                spec.storage_mode()
            ));
        }
        let staged = lease.staging.as_ref().is_some_and(|plan| {
            plan.hub_inputs
                .as_ref()
                .is_some_and(|i| !i.input_dirs.is_empty())
                || !plan.hub_output_path.is_empty()
        });
        if staged && self.broker.is_none() {
            return Some("staging: this site has no site broker configured".into());
        }
        None
    }

    /// Why there is no room for the job now, if there is none.
    fn no_room(&self, spec: &JobSpec, capacity: &pb::CapacityUpdate) -> Option<String> {
        let max = self.config.hub.max_concurrent_jobs;
        if max > 0 && capacity.active_jobs >= max {
            return Some(format!(
                "this manager already runs {} of its {max} jobs",
                capacity.active_jobs
            ));
        }
        let free = capacity.free.unwrap_or_default();
        if spec.cpu().0 > free.cpu_millicores
            || spec.memory().0 > free.memory_mib
            || spec.gpus() > free.gpus
        {
            return Some(format!(
                "free now: {} millicores, {} MiB, {} GPUs",
                free.cpu_millicores, free.memory_mib, free.gpus
            ));
        }
        None
    }

    /// Drops a finished run from the active set (unless a newer run took its place).
    fn forget_active(&self, job_id: &str, run_id: u64) {
        let mut jobs = lock(&self.jobs);
        if jobs.get(job_id).is_some_and(|j| j.id == run_id) {
            jobs.remove(job_id);
        }
        drop(jobs);
        self.capacity_changed.notify_one();
    }

    /// Cancels a job in the backend in a task of its own (a cancel waits for the engine).
    fn cancel_in_backend(self: &Arc<Self>, job_id: &JobId, message: Option<String>) {
        let shared = self.clone();
        let job_id = job_id.clone();
        let message = message.unwrap_or_default();
        self.spawn("cancel", async move {
            match shared.manager.cancel(&job_id, &message).await {
                Ok(status) => {
                    tracing::info!(job = %job_id, state = ?status.state(), "job cancelled in the backend");
                }
                Err(Error::NotFound(_)) => {}
                Err(error) => tracing::warn!(job = %job_id, %error, "cannot cancel the job"),
            }
        });
    }

    /// A receiver that gets the plan with fresh grants once the hub sends them.
    fn wait_for_grants(&self, job_id: &str, attempt: u32) -> oneshot::Receiver<pb::StagingPlan> {
        let (tx, rx) = oneshot::channel();
        lock(&self.grant_waiters)
            .entry((job_id.to_owned(), attempt))
            .or_default()
            .push(tx);
        rx
    }

    /// Picks up, after a restart, every lease whose attempt had not ended.
    async fn resume_open_leases(self: &Arc<Self>) {
        for open in self.outbox.open_leases().await {
            let lease = open.lease;
            let Some(spec) = lease.spec.clone().and_then(|s| JobSpec::try_from(s).ok()) else {
                continue;
            };
            tracing::info!(job = %spec.job_id(), attempt = lease.attempt, reported = ?open.reported,
                "resuming a lease from before the restart");
            self.run_lease(spec, &lease);
        }
    }
}

/// The manager's side of the site protocol, running until [`shutdown`](Self::shutdown).
/// Dropping it stops it too, without waiting.
pub struct SiteSession {
    shared: Arc<Shared>,
}

impl Drop for SiteSession {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn read_secret(path: &std::path::Path, what: &str) -> Result<String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| Error::Server(format!("{what} {}: {e}", path.display())))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(Error::Server(format!("{what} {} is empty", path.display())));
    }
    Ok(secret)
}

impl SiteSession {
    /// Checks the `[hub]` settings, opens the outbox, resumes the leases a previous run
    /// left unfinished, and starts joining the hub in the background.
    pub async fn start(config: Arc<ManagerConfig>, manager: Arc<Manager>) -> Result<Self> {
        let hub = &config.hub;
        if !hub.is_enabled() {
            return Err(Error::Server(
                "hub.coordinator_uri is not set: this manager joins no hub".into(),
            ));
        }
        Endpoint::from_shared(hub.coordinator_uri.clone()).map_err(|e| {
            Error::Server(format!(
                "hub.coordinator_uri `{}`: {e}",
                hub.coordinator_uri
            ))
        })?;
        let broker = if hub.site_broker_uri.is_empty() {
            None
        } else {
            let grant_file = hub.site_broker_grant_file.as_ref().ok_or_else(|| {
                Error::Server("hub.site_broker_grant_file is required with a site broker".into())
            })?;
            let grant = read_secret(grant_file, "hub.site_broker_grant_file").await?;
            Some(SiteBroker::new(hub.site_broker_uri.clone(), grant))
        };
        let credential_file = config.credential_file();
        let joined = tokio::fs::try_exists(&credential_file)
            .await
            .unwrap_or(false);
        if !joined && hub.join_token_file.is_none() {
            return Err(Error::Server(format!(
                "this site has not joined the hub (no {}): give hub.join_token_file (--join-token-file) with a token from `dispatch site token create`",
                credential_file.display()
            )));
        }
        let outbox = Outbox::open(&config.state_dir).await?;
        let settings = Settings {
            heartbeat: Duration::from_secs(u64::from(hub.heartbeat_seconds.max(1))),
            max_log_chunk: DEFAULT_LOG_CHUNK,
            resend_after: DEFAULT_RESEND,
        };
        let shared = Arc::new(Shared {
            poll: Duration::from_millis(hub.job_poll_millis.max(10)),
            config: config.clone(),
            manager,
            outbox,
            broker,
            jobs: Mutex::new(HashMap::new()),
            next_run_id: AtomicU64::new(1),
            grant_waiters: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            capacity_changed: Notify::new(),
            settings: Mutex::new(settings),
            store_id: Mutex::new(None),
        });
        shared.resume_open_leases().await;
        shared.spawn("site session", run_sessions(shared.clone()));
        Ok(Self { shared })
    }

    /// A token that stops the session when cancelled (e.g. by the shutdown signal).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Says goodbye to the hub and stops: lease runs stop watching (their jobs keep
    /// running in the backend and are picked up at the next start).
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the session has stopped (after its shutdown token was cancelled).
    pub async fn wait(&self) {
        self.shared.shutdown.cancelled().await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        tracing::info!("site session stopped");
    }
}

/// Waits between reconnects: doubling from the first wait up to a cap, each wait drawn
/// between half and all of the current step so many sites do not reconnect in step.
struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let random = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as u32;
        half + half.mul_f64(f64::from(random) / 1_000_000.0)
    }

    fn reset(&mut self) {
        self.step = self.initial;
    }

    fn exhaust(&mut self) {
        self.step = self.max;
    }
}

/// How one attempt at a session ended.
enum Ended {
    /// The manager is stopping.
    Shutdown,
    /// The connection failed or dropped; try again soon.
    Dropped { accepted: bool, reason: String },
    /// The hub refused this site (bad token or credential); try again slowly, in case an
    /// operator fixes it.
    Refused(String),
}

fn ended_by(status: &tonic::Status, accepted: bool) -> Ended {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            Ended::Refused(status.message().to_owned())
        }
        code => Ended::Dropped {
            accepted,
            reason: format!("{} ({code:?})", status.message()),
        },
    }
}

/// The session's life: join if needed, connect, run, and reconnect until shutdown.
async fn run_sessions(shared: Arc<Shared>) {
    let hub = &shared.config.hub;
    let mut backoff = Backoff::new(
        Duration::from_millis(hub.reconnect_initial_millis.max(1)),
        Duration::from_secs(u64::from(hub.reconnect_max_seconds.max(1))),
    );
    loop {
        let ended = match ensure_registered(&shared).await {
            Ok(identity) => open_session(&shared, &identity).await,
            Err(ended) => ended,
        };
        match ended {
            Ended::Shutdown => break,
            Ended::Dropped { accepted, reason } => {
                if accepted {
                    backoff.reset();
                }
                tracing::warn!(%reason, hub = %hub.coordinator_uri, "site session unavailable");
            }
            Ended::Refused(reason) => {
                backoff.exhaust();
                tracing::error!(%reason, hub = %hub.coordinator_uri,
                    "the hub refused this site; check its join token or credential");
            }
        }
        let wait = backoff.next_wait();
        tracing::info!(wait_ms = wait.as_millis() as u64, "reconnecting to the hub");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.shutdown.cancelled() => break,
        }
    }
    shared.outbox.disconnect().await;
}

async fn connect(uri: &str) -> std::result::Result<Channel, String> {
    Endpoint::from_shared(uri.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))
}

fn client(channel: Channel) -> SiteRegistryClient<Channel> {
    SiteRegistryClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The stored identity, or a new one from the hub for the join token.
async fn ensure_registered(shared: &Arc<Shared>) -> std::result::Result<SiteIdentity, Ended> {
    let path = shared.config.credential_file();
    let stored = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || identity::load(&path)).await
    };
    match stored {
        Ok(Ok(Some(identity))) => {
            if identity.coordinator_uri != shared.config.hub.coordinator_uri {
                tracing::warn!(site = %identity.site_id, issued_by = %identity.coordinator_uri,
                    hub = %shared.config.hub.coordinator_uri,
                    "the site credential was issued for another hub address");
            }
            return Ok(identity);
        }
        Ok(Ok(None)) => {}
        Ok(Err(error)) => {
            return Err(Ended::Refused(format!(
                "cannot read the site credential {}: {error}",
                path.display()
            )));
        }
        Err(error) => {
            return Err(Ended::Dropped {
                accepted: false,
                reason: error.to_string(),
            });
        }
    }
    let token_file = shared.config.hub.join_token_file.as_ref().ok_or_else(|| {
        Ended::Refused(format!(
            "the site has not joined (no {}) and hub.join_token_file is not set",
            path.display()
        ))
    })?;
    let join_token = read_secret(token_file, "hub.join_token_file")
        .await
        .map_err(|e| Ended::Refused(e.to_string()))?;
    let request_id = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || identity::pending_request_id(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Ended::Refused(format!("cannot record the registration: {e}")))?
    };
    let (capabilities, _) = shared.capacity().await.map_err(|e| Ended::Dropped {
        accepted: false,
        reason: format!("cannot read the backend's capabilities: {e}"),
    })?;
    let hub = &shared.config.hub;
    let channel = tokio::select! {
        channel = connect(&hub.coordinator_uri) => channel,
        () = shared.shutdown.cancelled() => return Err(Ended::Shutdown),
    }
    .map_err(|reason| Ended::Dropped {
        accepted: false,
        reason,
    })?;
    let site_name = if hub.site_name.is_empty() {
        shared.config.manager_id.clone()
    } else {
        hub.site_name.clone()
    };
    tracing::info!(hub = %hub.coordinator_uri, %request_id, site_name = %site_name, "joining the hub");
    let request = pb::RegisterRequest {
        join_token,
        site_name,
        manager_id: shared.config.manager_id.clone(),
        capabilities: Some(capabilities),
        request_id,
    };
    let mut registry = client(channel);
    let response = tokio::select! {
        response = registry.register(request) => response,
        () = shared.shutdown.cancelled() => return Err(Ended::Shutdown),
    }
    .map_err(|status| ended_by(&status, false))?
    .into_inner();
    if response.site_id.is_empty() || response.site_credential.is_empty() {
        return Err(Ended::Dropped {
            accepted: false,
            reason: "the hub's registration answer lacks a site id or credential".into(),
        });
    }
    let identity = SiteIdentity {
        site_id: response.site_id,
        site_credential: response.site_credential,
        coordinator_uri: hub.coordinator_uri.clone(),
    };
    let stored = {
        let (path, identity) = (path.clone(), identity.clone());
        tokio::task::spawn_blocking(move || {
            identity::store(&path, &identity)?;
            identity::clear_request_id(&path)
        })
        .await
    };
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            // Not stored: the next try repeats the registration under the same request
            // id, which the hub answers with this same site.
            return Err(Ended::Refused(format!(
                "cannot store the site credential at {}: {error}",
                path.display()
            )));
        }
        Err(error) => {
            return Err(Ended::Dropped {
                accepted: false,
                reason: error.to_string(),
            });
        }
    }
    if let Some(config) = &response.config {
        lock(&shared.settings).apply(config);
    }
    tracing::info!(site = %identity.site_id, credential_file = %path.display(), "joined the hub");
    Ok(identity)
}

/// Opens one session and runs it until it ends.
async fn open_session(shared: &Arc<Shared>, identity: &SiteIdentity) -> Ended {
    let hub_uri = &shared.config.hub.coordinator_uri;
    let channel = tokio::select! {
        channel = connect(hub_uri) => channel,
        () = shared.shutdown.cancelled() => return Ended::Shutdown,
    };
    let channel = match channel {
        Ok(channel) => channel,
        Err(reason) => {
            return Ended::Dropped {
                accepted: false,
                reason,
            };
        }
    };
    let (capabilities, capacity) = match shared.capacity().await {
        Ok(found) => found,
        Err(error) => {
            return Ended::Dropped {
                accepted: false,
                reason: format!("cannot read the backend's capabilities: {error}"),
            };
        }
    };
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let hello = pb::SiteHello {
        site_id: identity.site_id.clone(),
        site_credential: identity.site_credential.clone(),
        manager_id: shared.config.manager_id.clone(),
        capabilities: Some(capabilities),
        capacity: Some(capacity),
        protocol_version: PROTOCOL_VERSION,
    };
    let _ = tx.send(message(site_message::Message::Hello(hello))).await;
    let mut registry = client(channel);
    let opened = tokio::select! {
        opened = registry.session(ReceiverStream::new(rx)) => opened,
        () = shared.shutdown.cancelled() => return Ended::Shutdown,
    };
    let mut inbound = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => return ended_by(&status, false),
    };
    let first = tokio::select! {
        first = tokio::time::timeout(ACCEPT_TIMEOUT, inbound.message()) => first,
        () = shared.shutdown.cancelled() => return Ended::Shutdown,
    };
    let accepted = match first {
        Ok(Ok(Some(pb::HubMessage {
            message: Some(hub_message::Message::Accepted(accepted)),
        }))) => accepted,
        Ok(Ok(Some(_))) => {
            return Ended::Dropped {
                accepted: false,
                reason: "the hub's first message was not `accepted`".into(),
            };
        }
        Ok(Ok(None)) => {
            return Ended::Dropped {
                accepted: false,
                reason: "the hub closed the session before accepting it".into(),
            };
        }
        Ok(Err(status)) => return ended_by(&status, false),
        Err(_) => {
            return Ended::Dropped {
                accepted: false,
                reason: format!("no answer to hello within {} s", ACCEPT_TIMEOUT.as_secs()),
            };
        }
    };
    if let Some(config) = &accepted.config {
        lock(&shared.settings).apply(config);
    }
    tracing::info!(session = %accepted.session_id, site = %identity.site_id,
        heartbeat_s = shared.settings().heartbeat.as_secs(), "site session open");
    let connection = Connection::new(shared.clone(), tx, capacity);
    connection.run(inbound).await
}

/// One open session stream.
struct Connection {
    shared: Arc<Shared>,
    /// The stream to the hub; taken at goodbye so the stream closes.
    tx: Option<mpsc::Sender<pb::SiteMessage>>,
    /// Ends this session's log relays.
    cancel: CancellationToken,
    /// Log relays by the hub's request id.
    logs: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    last_capacity: pb::CapacityUpdate,
    heartbeat: tokio::time::Interval,
}

fn heartbeat_interval(every: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

impl Connection {
    fn new(
        shared: Arc<Shared>,
        tx: mpsc::Sender<pb::SiteMessage>,
        capacity: pb::CapacityUpdate,
    ) -> Self {
        let heartbeat = heartbeat_interval(shared.settings().heartbeat);
        Self {
            cancel: shared.shutdown.child_token(),
            shared,
            tx: Some(tx),
            logs: Arc::new(Mutex::new(HashMap::new())),
            last_capacity: capacity,
            heartbeat,
        }
    }

    async fn send(&self, message: site_message::Message) {
        if let Some(tx) = &self.tx {
            // A closed stream shows on the inbound side, which ends the session.
            let _ = tx.send(self::message(message)).await;
        }
    }

    async fn run(mut self, mut inbound: tonic::Streaming<pb::HubMessage>) -> Ended {
        if let Some(tx) = &self.tx {
            let resent = self.shared.outbox.connect(tx.clone()).await;
            if resent > 0 {
                tracing::info!(reports = resent, "unacknowledged status reports sent again");
            }
        }
        self.send_reconcile(0).await;
        let ended = loop {
            tokio::select! {
                () = self.shared.shutdown.cancelled() => break self.say_goodbye(&mut inbound).await,
                received = inbound.message() => {
                    if let ControlFlow::Break(ended) = self.on_inbound(received).await {
                        break ended;
                    }
                }
                _ = self.heartbeat.tick() => self.on_heartbeat_tick().await,
                () = self.shared.capacity_changed.notified() => self.send_capacity_if_changed().await,
            }
        };
        self.shared.outbox.disconnect().await;
        self.cancel.cancel();
        ended
    }

    async fn say_goodbye(&mut self, inbound: &mut tonic::Streaming<pb::HubMessage>) -> Ended {
        self.shared.outbox.disconnect().await;
        self.cancel.cancel();
        self.send(site_message::Message::Goodbye(pb::SiteGoodbye {
            message: "the manager is shutting down; its jobs keep running".into(),
        }))
        .await;
        // Closing our side lets the hub end the stream once it has read the goodbye.
        self.tx = None;
        let drained = tokio::time::timeout(GOODBYE_WAIT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        tracing::info!(closed_by_hub = drained.is_ok(), "said goodbye to the hub");
        Ended::Shutdown
    }

    async fn on_inbound(
        &mut self,
        received: std::result::Result<Option<pb::HubMessage>, tonic::Status>,
    ) -> ControlFlow<Ended> {
        match received {
            Ok(Some(pb::HubMessage {
                message: Some(message),
            })) => {
                self.on_hub_message(message).await;
                ControlFlow::Continue(())
            }
            Ok(Some(pb::HubMessage { message: None })) => ControlFlow::Continue(()),
            Ok(None) => ControlFlow::Break(Ended::Dropped {
                accepted: true,
                reason: "the hub closed the session".into(),
            }),
            Err(status) => ControlFlow::Break(ended_by(&status, true)),
        }
    }

    async fn on_hub_message(&mut self, message: hub_message::Message) {
        use hub_message::Message as M;
        match message {
            M::Accepted(_) => tracing::warn!("the hub accepted the session twice; ignoring"),
            M::RunJob(lease) => self.on_run_job(lease).await,
            M::CancelJob(command) => self.on_cancel_job(command),
            M::RemoveJob(command) => self.on_remove_job(command),
            M::FollowLogs(command) => self.on_follow_logs(command),
            M::StopLogs(command) => self.on_stop_logs(&command),
            M::StatusAck(ack) => {
                if let Err(error) = self.shared.outbox.ack(&ack).await {
                    tracing::warn!(job = %ack.job_id, %error, "cannot record an acknowledgement");
                }
            }
            M::Config(config) => self.on_config(&config),
            M::Grants(grants) => self.on_grants(grants).await,
            M::ReconcileRequest(request) => self.send_reconcile(request.request_id).await,
            M::RotateCredential(rotation) => self.on_rotate_credential(rotation).await,
            M::Heartbeat(_) => tracing::trace!("hub heartbeat"),
        }
    }

    async fn on_run_job(&mut self, lease: pb::RunJobCommand) {
        let job = lease.spec.as_ref().map(|s| s.job_id.clone());
        tracing::info!(job = ?job, attempt = lease.attempt, lease_s = lease.lease_seconds,
            staged = lease.staging.is_some(), "lease received");
        if let Err(declined) = self.shared.accept_lease(lease).await {
            tracing::info!(job = %declined.job_id, attempt = declined.attempt,
                reason = ?declined.reason(), detail = %declined.message, "lease declined");
            self.send(site_message::Message::Declined(declined)).await;
        }
        self.send_capacity_if_changed().await;
    }

    fn on_cancel_job(&self, command: pb::CancelJobCommand) {
        let Ok(job_id) = JobId::parse(&command.job_id) else {
            tracing::warn!(job = %command.job_id, "cancel for an invalid job id; ignoring");
            return;
        };
        let message = if command.message.is_empty() {
            "cancelled by the hub".to_owned()
        } else {
            command.message.clone()
        };
        tracing::info!(job = %job_id, attempt = command.attempt, "cancel received");
        let running = lock(&self.shared.jobs).get(job_id.as_str()).cloned();
        match running {
            Some(run) if command.attempt == 0 || run.attempt == command.attempt => {
                run.set_cancelled(message.clone());
                // The message is set before looking where the run is, and the run marks
                // itself in the backend before looking for a message: one of the two
                // sends the cancel to the backend, whose CANCELLED the watch reports.
                if run.is_in_backend() {
                    self.shared.cancel_in_backend(&job_id, Some(message));
                } else {
                    run.abort.cancel();
                }
            }
            Some(run) => {
                tracing::info!(job = %job_id, attempt = command.attempt, running = run.attempt,
                    "cancel for another attempt than the one running; ignoring");
            }
            None => {
                let shared = self.shared.clone();
                self.shared.spawn(
                    "cancel",
                    cancel_unwatched(shared, job_id, command.attempt, message),
                );
            }
        }
    }

    fn on_remove_job(&self, command: pb::RemoveJobCommand) {
        let Ok(job_id) = JobId::parse(&command.job_id) else {
            tracing::warn!(job = %command.job_id, "remove for an invalid job id; ignoring");
            return;
        };
        tracing::info!(job = %job_id, attempt = command.attempt,
            staging_area = command.remove_staging_area, "remove received");
        {
            let mut jobs = lock(&self.shared.jobs);
            if jobs
                .get(job_id.as_str())
                .is_some_and(|run| command.attempt == 0 || run.attempt == command.attempt)
                && let Some(run) = jobs.remove(job_id.as_str())
            {
                run.stop.cancel();
            }
        }
        let shared = self.shared.clone();
        self.shared
            .spawn("remove", remove_job(shared, job_id, command));
    }

    fn on_follow_logs(&self, command: pb::FollowLogsCommand) {
        let Some(tx) = self.tx.clone() else {
            return;
        };
        let token = self.cancel.child_token();
        lock(&self.logs).insert(command.request_id, token.clone());
        let relay = LogRelay {
            shared: self.shared.clone(),
            tx,
            token,
            logs: self.logs.clone(),
            max_chunk: self.shared.settings().max_log_chunk.max(1),
        };
        self.shared.spawn("logs", relay.run(command));
    }

    fn on_stop_logs(&self, command: &pb::StopLogsCommand) {
        if let Some(token) = lock(&self.logs).remove(&command.request_id) {
            token.cancel();
        }
    }

    fn on_config(&mut self, config: &pb::SessionConfig) {
        let before = self.shared.settings().heartbeat;
        lock(&self.shared.settings).apply(config);
        let after = self.shared.settings().heartbeat;
        if after != before {
            self.heartbeat = heartbeat_interval(after);
        }
        tracing::info!(heartbeat_s = after.as_secs(), "session settings changed");
    }

    async fn on_grants(&self, grants: pb::GrantsIssued) {
        match self.shared.outbox.update_grants(&grants).await {
            Ok(Some(plan)) => {
                let waiters = lock(&self.shared.grant_waiters)
                    .remove(&(grants.job_id.clone(), grants.attempt))
                    .unwrap_or_default();
                for waiter in waiters {
                    let _ = waiter.send(plan.clone());
                }
                tracing::info!(job = %grants.job_id, attempt = grants.attempt, "fresh broker grants received");
            }
            Ok(None) => {
                tracing::info!(job = %grants.job_id, attempt = grants.attempt, "grants for a lease not held here; ignoring");
            }
            Err(error) => {
                tracing::warn!(job = %grants.job_id, %error, "cannot record fresh grants");
            }
        }
    }

    async fn on_rotate_credential(&self, rotation: pb::CredentialRotation) {
        let path = self.shared.config.credential_file();
        let rotated = tokio::task::spawn_blocking(move || {
            let mut identity = identity::load(&path)?.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no stored credential")
            })?;
            identity.site_credential = rotation.site_credential;
            identity::store(&path, &identity)
        })
        .await;
        match rotated {
            Ok(Ok(())) => tracing::info!("site credential rotated; used from the next hello"),
            Ok(Err(error)) => tracing::error!(%error, "cannot store the rotated site credential"),
            Err(error) => tracing::error!(%error, "cannot store the rotated site credential"),
        }
    }

    async fn on_heartbeat_tick(&mut self) {
        self.send(site_message::Message::Heartbeat(pb::SessionHeartbeat {
            sent_at: Some(SystemTime::now().into()),
        }))
        .await;
        let resent = self
            .shared
            .outbox
            .resend_stale(self.shared.settings().resend_after)
            .await;
        if resent > 0 {
            tracing::info!(
                reports = resent,
                "status reports still unacknowledged; sent again"
            );
        }
        // The backend's own view changes as jobs end; refresh it with each heartbeat.
        self.send_capacity_if_changed().await;
    }

    async fn send_capacity_if_changed(&mut self) {
        let capacity = match self.shared.capacity().await {
            Ok((_, capacity)) => capacity,
            Err(error) => {
                tracing::warn!(%error, "cannot read the backend's capacity");
                return;
            }
        };
        if capacity != self.last_capacity {
            tracing::debug!(
                active = capacity.active_jobs,
                slots = capacity.free_job_slots,
                "capacity changed"
            );
            self.last_capacity = capacity;
            self.send(site_message::Message::Capacity(capacity)).await;
        }
    }

    /// Reports what the backend holds of the hub's jobs (those started under an attempt;
    /// jobs started through the manager's own API are not the hub's to reconcile), plus
    /// leases still staging in, which the backend does not hold yet.
    async fn send_reconcile(&self, request_id: u64) {
        let owned = match self.shared.manager.list_own().await {
            Ok(owned) => owned,
            Err(error) => {
                tracing::warn!(%error, request_id, "cannot list the backend's jobs for a reconcile report");
                return;
            }
        };
        let mut jobs: Vec<pb::BackendJobStatus> =
            owned.into_iter().filter(|j| j.attempt > 0).collect();
        let staging: Vec<(String, JobControl)> = lock(&self.shared.jobs)
            .iter()
            .filter(|(_, run)| !run.is_in_backend())
            .map(|(id, run)| (id.clone(), run.clone()))
            .collect();
        for (job_id, run) in staging {
            if jobs.iter().any(|j| j.job_id == job_id) {
                continue;
            }
            let state = match self.shared.outbox.reported(&job_id, run.attempt).await {
                JobState::Unspecified => JobState::Queued,
                state => state,
            };
            jobs.push(pb::BackendJobStatus {
                job_id,
                attempt: run.attempt,
                state: state as i32,
                pfcon_status: state.pfcon_status() as i32,
                manager_id: self.shared.config.manager_id.clone(),
                ..Default::default()
            });
        }
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        tracing::info!(request_id, jobs = jobs.len(), "sending a reconcile report");
        let pages: Vec<&[pb::BackendJobStatus]> = if jobs.is_empty() {
            vec![&[]]
        } else {
            jobs.chunks(RECONCILE_PAGE).collect()
        };
        let last = pages.len() - 1;
        for (index, page) in pages.into_iter().enumerate() {
            self.send(site_message::Message::Reconcile(pb::ReconcileReport {
                request_id,
                jobs: page.to_vec(),
                complete: index == last,
            }))
            .await;
        }
    }
}

/// A cancel for a job no lease run watches (e.g. one whose lease was never resumed):
/// cancelled in the backend, and the outcome reported under the attempt.
async fn cancel_unwatched(shared: Arc<Shared>, job_id: JobId, attempt: u32, message: String) {
    let status = match shared.manager.status(&job_id).await {
        Ok(status) if attempt != 0 && status.attempt != 0 && status.attempt != attempt => {
            tracing::info!(job = %job_id, attempt, held = status.attempt,
                "cancel for an attempt the backend does not hold; ignoring");
            return;
        }
        Ok(_) => shared.manager.cancel(&job_id, &message).await,
        Err(error) => Err(error),
    };
    let report = match status {
        Ok(status) => status,
        Err(Error::NotFound(_)) => pb::BackendJobStatus {
            job_id: job_id.to_string(),
            attempt,
            state: JobState::Cancelled as i32,
            reason: Some(pb::StateReason {
                code: pb::ReasonCode::Cancelled as i32,
                message: format!("{message} (the job was not running at this site)"),
                exit_code: None,
            }),
            pfcon_status: JobState::Cancelled.pfcon_status() as i32,
            manager_id: shared.config.manager_id.clone(),
            ..Default::default()
        },
        Err(error) => {
            tracing::warn!(job = %job_id, %error, "cannot cancel the job");
            return;
        }
    };
    if attempt == 0 {
        return;
    }
    let mut report = report;
    report.attempt = attempt;
    if let Err(error) = shared.outbox.report(report, None).await {
        tracing::error!(job = %job_id, %error, "cannot record a status report");
    }
}

/// Removes what the backend holds for a job (unless it holds another attempt) and forgets
/// the attempt's reports.
async fn remove_job(shared: Arc<Shared>, job_id: JobId, command: pb::RemoveJobCommand) {
    let held = shared.manager.status(&job_id).await.ok();
    let other_attempt = held
        .as_ref()
        .is_some_and(|s| command.attempt != 0 && s.attempt != 0 && s.attempt != command.attempt);
    if other_attempt {
        tracing::info!(job = %job_id, attempt = command.attempt,
            held = held.as_ref().map(|s| s.attempt), "the backend holds another attempt; not removing it");
    } else {
        match shared
            .manager
            .remove(&job_id, command.remove_staging_area)
            .await
        {
            Ok(removed) => tracing::info!(job = %job_id, removed, "job removed"),
            Err(error) => tracing::warn!(job = %job_id, %error, "cannot remove the job"),
        }
    }
    let attempt = (command.attempt != 0).then_some(command.attempt);
    if let Err(error) = shared.outbox.forget(job_id.as_str(), attempt).await {
        tracing::warn!(job = %job_id, %error, "cannot forget the job's reports");
    }
    shared.capacity_changed.notify_one();
}

/// Relays a job's log to the hub for one `FollowLogsCommand`.
struct LogRelay {
    shared: Arc<Shared>,
    tx: mpsc::Sender<pb::SiteMessage>,
    token: CancellationToken,
    logs: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    max_chunk: usize,
}

impl LogRelay {
    async fn run(self, command: pb::FollowLogsCommand) {
        let request_id = command.request_id;
        tracing::info!(job = %command.job_id, request_id, follow = command.follow, "relaying a job's log");
        tokio::select! {
            () = self.relay(&command) => {}
            () = self.token.cancelled() => {
                tracing::debug!(request_id, "log relay stopped");
            }
        }
        lock(&self.logs).remove(&request_id);
    }

    async fn relay(&self, command: &pb::FollowLogsCommand) {
        let chunks = match JobId::parse(&command.job_id) {
            Ok(job_id) => {
                self.shared
                    .manager
                    .logs(&job_id, command.tail_lines, command.follow)
                    .await
            }
            Err(e) => Err(Error::InvalidSpec(e)),
        };
        let mut chunks = match chunks {
            Ok(chunks) => chunks,
            Err(error) => {
                tracing::warn!(job = %command.job_id, %error, "cannot read the job's log");
                self.send_eof(command).await;
                return;
            }
        };
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    tracing::warn!(job = %command.job_id, %error, "the job's log broke off");
                    self.send_eof(command).await;
                    return;
                }
            };
            let eof = chunk.eof;
            if !self.send_chunk(command.request_id, chunk).await || eof {
                return;
            }
        }
    }

    /// Sends a chunk, cut to the hub's largest; false once the session is gone.
    async fn send_chunk(&self, request_id: u64, chunk: pb::LogChunk) -> bool {
        let mut data = chunk.data.clone();
        loop {
            let piece = data.split_to(data.len().min(self.max_chunk));
            let last = data.is_empty();
            let piece_chunk = pb::LogChunk {
                data: piece,
                eof: chunk.eof && last,
                ..chunk.clone()
            };
            let sent = self
                .tx
                .send(message(site_message::Message::Logs(pb::LogData {
                    request_id,
                    chunk: Some(piece_chunk),
                })))
                .await;
            if sent.is_err() {
                return false;
            }
            if last {
                return true;
            }
        }
    }

    async fn send_eof(&self, command: &pb::FollowLogsCommand) {
        let chunk = pb::LogChunk {
            job_id: command.job_id.clone(),
            eof: true,
            ..Default::default()
        };
        self.send_chunk(command.request_id, chunk).await;
    }
}

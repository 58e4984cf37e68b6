//! The manager's policy over a backend, decided once for every engine: what a replayed
//! submit means, how a cancel and a time limit are told apart from a failure, how long a
//! job may run, and what a job's status says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use dispatch_proto::v1::{self as pb, JobState, ReasonCode};
use dispatch_proto::{JobId, JobSpec};

use crate::backend::{Backend, LogStream, Observed, labels};
use crate::config::ManagerConfig;
use crate::error::{Error, Result};
use crate::ledger::{Ledger, Stopped};
use crate::request::{Planner, extra_labels};

/// How often a job's state is looked at while the manager waits for it to change.
const POLL: Duration = Duration::from_millis(200);
/// How long a cancel waits for the engine to report the job stopped.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// A stream of a job's log chunks.
pub type LogChunks = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LogChunk>> + Send>>;

/// The manager over one backend. Shared as `Arc<Manager>`.
pub struct Manager {
    backend: Arc<dyn Backend>,
    planner: Planner,
    ledger: Ledger,
    manager_id: String,
    /// One lock per job id, so two schedules of one id never both create it.
    locks: Mutex<HashMap<JobId, Arc<tokio::sync::Mutex<()>>>>,
    /// The time-limit watch of each job that has one.
    deadlines: Mutex<HashMap<JobId, tokio::task::AbortHandle>>,
    /// Largest number of workers the engine takes (fixed for its life).
    max_workers: u32,
    myself: Weak<Manager>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Ok(deadlines) = self.deadlines.lock() {
            for handle in deadlines.values() {
                handle.abort();
            }
        }
    }
}

fn is_finished(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

impl Manager {
    /// A manager over `backend`; re-arms the time limits of the jobs it already owns, so a
    /// restart loses none.
    pub async fn start(config: &ManagerConfig, backend: Arc<dyn Backend>) -> Result<Arc<Self>> {
        let planner = Planner::new(config)?;
        let ledger = Ledger::open(&config.state_dir)?;
        let max_workers = backend.capabilities().await?.max_workers;
        let manager = Arc::new_cyclic(|myself| Self {
            backend,
            planner,
            ledger,
            manager_id: config.manager_id.clone(),
            locks: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(HashMap::new()),
            max_workers,
            myself: myself.clone(),
        });
        let owned = manager.backend.list_owned().await?;
        let mut rearmed = 0;
        for job in owned {
            if !job.is_finished() && manager.arm_deadline(&job) {
                rearmed += 1;
            }
        }
        tracing::info!(manager = %manager.manager_id, rearmed, "manager started");
        Ok(manager)
    }

    fn lock_for(&self, job_id: &JobId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(job_id.clone()).or_default().clone()
    }

    /// Starts a job, or returns the one already there: a job that is active or succeeded
    /// is a replay (`false`); one that failed, was cancelled or lost is removed and started
    /// again, as pfcon does.
    pub async fn schedule(&self, spec: &JobSpec) -> Result<(pb::BackendJobStatus, bool)> {
        self.schedule_attempt(spec, 0).await
    }

    /// [`schedule`](Self::schedule) for one attempt of a hub's job, labelled with it so a
    /// restarted manager reports under it. `0` is local use. A job the backend holds
    /// under another attempt is one the hub has moved on from: it is removed and the job
    /// started afresh, so no two attempts of a job ever run here at once.
    pub async fn schedule_attempt(
        &self,
        spec: &JobSpec,
        attempt: u32,
    ) -> Result<(pb::BackendJobStatus, bool)> {
        if spec.workers().get() > self.max_workers {
            return Err(Error::Unsupported {
                field: "workers".into(),
                reason: format!(
                    "Compute environment only supports number_of_workers={}, got {}",
                    self.max_workers,
                    spec.workers()
                ),
            });
        }
        let lock = self.lock_for(spec.job_id());
        let held = lock.lock().await;
        let result = self.schedule_locked(spec, attempt).await;
        drop(held);
        drop(lock);
        self.forget_idle_locks();
        result
    }

    /// Drops the locks nobody holds or waits for, so the map does not grow with every job.
    fn forget_idle_locks(&self) {
        if let Ok(mut locks) = self.locks.lock() {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
    }

    async fn schedule_locked(
        &self,
        spec: &JobSpec,
        attempt: u32,
    ) -> Result<(pb::BackendJobStatus, bool)> {
        if let Some(existing) = self.backend.status(spec.job_id()).await? {
            let status = self.to_status(existing);
            let state = status.state();
            let same_attempt = attempt == 0 || status.attempt == attempt;
            if same_attempt && (!is_finished(state) || state == JobState::Succeeded) {
                return Ok((status, false));
            }
            tracing::info!(job = %spec.job_id(), ?state, held_attempt = status.attempt, attempt,
                "rescheduling a job that ended without success or under another attempt");
            self.disarm_deadline(spec.job_id());
            self.backend.remove(spec.job_id()).await?;
        }
        self.ledger.forget(spec.job_id())?;
        let mut request = self.planner.plan(spec)?;
        if attempt > 0 {
            request
                .labels
                .insert(labels::ATTEMPT.into(), attempt.to_string());
        }
        let observed = match self.backend.submit(&request).await {
            Ok(observed) => observed,
            // Another replica (or a call before a crash) created it meanwhile: a replay.
            Err(crate::BackendError::AlreadyExists(_)) => {
                let existing = self.backend.status(spec.job_id()).await?.ok_or_else(|| {
                    Error::Backend(format!("job `{}` exists and vanished", spec.job_id()))
                })?;
                return Ok((self.to_status(existing), false));
            }
            Err(error) => return Err(error.into()),
        };
        tracing::info!(job = %spec.job_id(), image = %request.image, "job scheduled");
        self.arm_deadline(&observed);
        Ok((self.to_status(observed), true))
    }

    /// This replica's id.
    pub fn manager_id(&self) -> &str {
        &self.manager_id
    }

    /// The job's status now.
    pub async fn status(&self, job_id: &JobId) -> Result<pb::BackendJobStatus> {
        let observed = self.observe(job_id).await?;
        Ok(self.to_status(observed))
    }

    async fn observe(&self, job_id: &JobId) -> Result<Observed> {
        self.backend
            .status(job_id)
            .await?
            .ok_or_else(|| Error::NotFound(job_id.to_string()))
    }

    /// The job's log: the last `tail_lines` lines, then (with `follow`) new output until
    /// the job ends; always closed by a chunk marked `eof`.
    pub async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogChunks> {
        self.observe(job_id).await?;
        let stream: LogStream = self.backend.logs(job_id, tail_lines, follow).await?;
        let id = job_id.to_string();
        let eof_id = id.clone();
        let chunks = stream
            .map(move |piece| {
                piece.map_err(Error::from).map(|data| pb::LogChunk {
                    job_id: id.clone(),
                    stream: pb::LogStream::Unspecified as i32,
                    data,
                    time: None,
                    eof: false,
                })
            })
            .chain(futures::stream::once(async move {
                Ok(pb::LogChunk {
                    job_id: eof_id,
                    eof: true,
                    ..Default::default()
                })
            }));
        Ok(Box::pin(chunks))
    }

    /// Stops a job and records it cancelled; a finished job is left as it is.
    pub async fn cancel(&self, job_id: &JobId, message: &str) -> Result<pb::BackendJobStatus> {
        let observed = self.observe(job_id).await?;
        if observed.is_finished() {
            return Ok(self.to_status(observed));
        }
        let message = if message.is_empty() {
            "cancelled by a client".to_owned()
        } else {
            message.to_owned()
        };
        self.ledger
            .record(job_id, &Stopped::Cancelled { message })?;
        self.backend.kill(job_id).await?;
        self.disarm_deadline(job_id);
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let observed = self.observe(job_id).await?;
            if observed.is_finished() || tokio::time::Instant::now() >= deadline {
                return Ok(self.to_status(observed));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Removes what the engine holds for the job (killing it if it runs), and with
    /// `staging_area` its `key-<job_id>` directory too. False when there was nothing.
    pub async fn remove(&self, job_id: &JobId, staging_area: bool) -> Result<bool> {
        let lock = self.lock_for(job_id);
        let held = lock.lock().await;
        let result = self.remove_locked(job_id, staging_area).await;
        drop(held);
        drop(lock);
        self.forget_idle_locks();
        result
    }

    async fn remove_locked(&self, job_id: &JobId, staging_area: bool) -> Result<bool> {
        self.disarm_deadline(job_id);
        let removed = self.backend.remove(job_id).await?;
        self.ledger.forget(job_id)?;
        if staging_area {
            let key = self.planner.key_dir(&job_id.storage_key());
            match std::fs::remove_dir_all(&key) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Storage {
                        path: key.display().to_string(),
                        reason: e.to_string(),
                    });
                }
                _ => {}
            }
        }
        Ok(removed)
    }

    /// Every job this manager owns, by job id.
    pub async fn list_own(&self) -> Result<Vec<pb::BackendJobStatus>> {
        let mut jobs: Vec<_> = self
            .backend
            .list_owned()
            .await?
            .into_iter()
            .map(|o| self.to_status(o))
            .collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(jobs)
    }

    /// What the backend offers, and what of it is free now.
    pub async fn capabilities(&self) -> Result<pb::ManagerCapabilitiesResponse> {
        let caps = self.backend.capabilities().await?;
        let mut used = pb::Resources::default();
        for job in self.backend.list_owned().await? {
            if job.is_finished() {
                continue;
            }
            let number = |key: &str| {
                job.labels
                    .get(key)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            used.cpu_millicores += number(extra_labels::CPU) as u32;
            used.memory_mib += number(extra_labels::MEMORY);
            used.gpus += number(extra_labels::GPUS) as u32;
        }
        let total = pb::Resources {
            cpu_millicores: caps.cpu.0,
            memory_mib: caps.memory.0,
            gpus: caps.gpus,
        };
        let free = pb::Resources {
            cpu_millicores: total.cpu_millicores.saturating_sub(used.cpu_millicores),
            memory_mib: total.memory_mib.saturating_sub(used.memory_mib),
            gpus: total.gpus.saturating_sub(used.gpus),
        };
        Ok(pb::ManagerCapabilitiesResponse {
            manager_id: self.manager_id.clone(),
            site_id: String::new(),
            capabilities: Some(pb::Capabilities {
                backend_kind: pb::BackendKind::from(caps.kind) as i32,
                total: Some(total),
                max_per_job: Some(total),
                labels: Default::default(),
                storage_modes: vec![
                    pb::StorageMode::Zipfile as i32,
                    pb::StorageMode::Filesystem as i32,
                    pb::StorageMode::Fslink as i32,
                ],
                max_workers: caps.max_workers,
                max_concurrent_jobs: 0,
                max_time_limit_seconds: 0,
                manager_version: env!("CARGO_PKG_VERSION").into(),
                backend_version: caps.version,
                site_store_id: String::new(),
            }),
            free: Some(free),
        })
    }

    /// The job's status as the engine has it, corrected by what the manager knows: a job
    /// it killed reports the cancel or the time limit, not the kill's exit code.
    pub fn to_status(&self, observed: Observed) -> pb::BackendJobStatus {
        let stopped = self.ledger.get(&observed.job_id);
        let engine_failed = matches!(observed.state, JobState::Failed | JobState::Lost);
        let (state, code, reason_message) = match (observed.state, stopped) {
            (state, Some(Stopped::Cancelled { message })) if engine_failed => {
                let _ = state;
                (JobState::Cancelled, ReasonCode::Cancelled, message)
            }
            (_, Some(Stopped::TimeLimit { seconds })) if engine_failed => (
                JobState::Failed,
                ReasonCode::TimeLimit,
                format!("stopped after its time limit of {seconds} s"),
            ),
            (state, _) => (state, observed.reason, observed.message.clone()),
        };
        let attempt = observed
            .labels
            .get(labels::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        pb::BackendJobStatus {
            job_id: observed.job_id.to_string(),
            attempt,
            state: state as i32,
            reason: Some(pb::StateReason {
                code: code as i32,
                message: reason_message,
                exit_code: observed.exit_code,
            }),
            pfcon_status: state.pfcon_status() as i32,
            image: observed.image,
            command: observed.command,
            timestamp: observed.finished_at.or(observed.started_at).map(timestamp),
            message: observed.message,
            manager_id: self.manager_id.clone(),
            backend_name: observed.backend_name,
        }
    }

    /// Watches the job's time limit, if it has one; true if a watch was armed.
    fn arm_deadline(&self, job: &Observed) -> bool {
        let Some(seconds) = job
            .labels
            .get(labels::TIME_LIMIT)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return false;
        };
        let Some(manager) = self.myself.upgrade() else {
            return false;
        };
        let job_id = job.job_id.clone();
        let watched = job_id.clone();
        let task = tokio::spawn(async move {
            watch_deadline(manager, watched, Duration::from_secs(seconds)).await
        });
        if let Ok(mut deadlines) = self.deadlines.lock()
            && let Some(previous) = deadlines.insert(job_id, task.abort_handle())
        {
            previous.abort();
        }
        true
    }

    fn disarm_deadline(&self, job_id: &JobId) {
        if let Ok(mut deadlines) = self.deadlines.lock()
            && let Some(handle) = deadlines.remove(job_id)
        {
            handle.abort();
        }
    }
}

/// Kills the job once it has run for `limit`, recording why first. Holds the manager
/// only while it looks, so a dropped manager is not kept alive by its watches.
async fn watch_deadline(manager: Arc<Manager>, job_id: JobId, limit: Duration) {
    let weak = Arc::downgrade(&manager);
    drop(manager);
    loop {
        let Some(manager) = weak.upgrade() else {
            return;
        };
        let observed = match manager.backend.status(&job_id).await {
            Ok(Some(observed)) => observed,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(job = %job_id, %error, "cannot check a job's time limit; will retry");
                drop(manager);
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if observed.is_finished() {
            return;
        }
        // Counted from the start when the engine says, else from when the job was seen
        // queued (an image pull may take a while before it starts).
        let ran = observed
            .started_at
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if observed.started_at.is_some() && ran >= limit {
            tracing::info!(job = %job_id, limit_seconds = limit.as_secs(), "time limit reached; stopping the job");
            let stopped = Stopped::TimeLimit {
                seconds: limit.as_secs(),
            };
            if let Err(error) = manager.ledger.record(&job_id, &stopped) {
                tracing::warn!(job = %job_id, %error, "cannot record a time limit");
            }
            if let Err(error) = manager.backend.kill(&job_id).await {
                tracing::warn!(job = %job_id, %error, "cannot stop a job past its time limit");
            }
            return;
        }
        let wait = if observed.started_at.is_some() {
            (limit - ran).max(POLL)
        } else {
            POLL
        };
        drop(manager);
        tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
    }
}

//! One job attempt the hub leased to this site, run to its end: stage the inputs in
//! through the site broker, schedule it on the backend, watch it, stage the outputs out,
//! and report each step through the outbox. It runs apart from the session, so a dropped
//! stream loses nothing: reports wait in the outbox for the next session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use dispatch_proto::job::StorageMode;
use dispatch_proto::v1::{self as pb, JobState, ReasonCode};
use dispatch_proto::{JobId, JobSpec};

use super::Shared;
use super::outbox::progress_rank;
use super::staging::StageError;
use crate::error::Error;

/// How long before its grants expire a stage asks for fresh ones.
const GRANT_MARGIN: Duration = Duration::from_secs(30);
/// How long to wait for `GrantsIssued` after asking.
const GRANT_WAIT: Duration = Duration::from_secs(30);
/// Requests for fresh grants before a stage gives up on them.
const GRANT_TRIES: u32 = 4;
/// Tries of a schedule the backend failed for a reason that may pass.
const SCHEDULE_ATTEMPTS: u32 = 3;

/// What the session holds of a running lease, to cancel or stop it.
#[derive(Clone)]
pub struct JobControl {
    /// Tells this run apart from a later one of the same job.
    pub id: u64,
    /// The attempt being run.
    pub attempt: u32,
    /// Stops the run without a report (shutdown, removal, a newer attempt).
    pub stop: CancellationToken,
    /// Interrupts the run before the backend has the job (stage-in, schedule): a hub's
    /// cancel then, reported as CANCELLED. A child of `stop`. Once the job is in the
    /// backend a cancel goes there instead, and the watch reports what the backend says,
    /// so a cancel racing the schedule is never lost.
    pub abort: CancellationToken,
    /// Set once the backend holds the job: a cancel then goes to the backend, whose
    /// answer the run reports.
    pub in_backend: Arc<AtomicBool>,
    /// Why the hub cancelled the job, once it has.
    pub cancel_message: Arc<Mutex<Option<String>>>,
    /// Resources set aside while the job is not yet in the backend (which counts it
    /// from then on).
    pub reserved: pb::Resources,
}

impl JobControl {
    /// A control for a new run of `attempt` needing `reserved`.
    pub fn new(id: u64, attempt: u32, reserved: pb::Resources, stop: CancellationToken) -> Self {
        Self {
            id,
            attempt,
            abort: stop.child_token(),
            stop,
            in_backend: Arc::new(AtomicBool::new(false)),
            cancel_message: Arc::new(Mutex::new(None)),
            reserved,
        }
    }

    /// Whether the backend holds the job yet.
    pub fn is_in_backend(&self) -> bool {
        self.in_backend.load(Ordering::SeqCst)
    }

    /// Records a cancel from the hub.
    pub fn set_cancelled(&self, message: String) {
        if let Ok(mut slot) = self.cancel_message.lock() {
            slot.get_or_insert(message);
        }
    }

    fn cancelled(&self) -> Option<String> {
        self.cancel_message.lock().ok().and_then(|m| m.clone())
    }
}

/// The run of one lease.
pub struct LeaseRun {
    shared: Arc<Shared>,
    job_id: JobId,
    spec: JobSpec,
    attempt: u32,
    plan: Option<pb::StagingPlan>,
    control: JobControl,
}

/// A manager error as the reason a job failed before it ran.
fn failure_reason(error: &Error) -> ReasonCode {
    match error {
        Error::ImageNotFound { .. } => ReasonCode::ImageNotFound,
        Error::InvalidSpec(_) | Error::Unsupported { .. } => ReasonCode::InvalidSpec,
        _ => ReasonCode::BackendError,
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl LeaseRun {
    /// A run of `lease` (whose spec was checked by the caller).
    pub fn new(
        shared: Arc<Shared>,
        spec: JobSpec,
        lease: &pb::RunJobCommand,
        control: JobControl,
    ) -> Self {
        Self {
            shared,
            job_id: spec.job_id().clone(),
            spec,
            attempt: lease.attempt,
            plan: lease.staging.clone(),
            control,
        }
    }

    /// Runs the lease until its final report, or until stopped.
    pub async fn run(mut self) {
        tracing::info!(job = %self.job_id, attempt = self.attempt, "lease started");
        self.drive().await;
        self.shared
            .forget_active(self.job_id.as_str(), self.control.id);
        tracing::debug!(job = %self.job_id, attempt = self.attempt, "lease run ended");
    }

    async fn drive(&mut self) {
        if !self.held_by_backend().await {
            let reported = self
                .shared
                .outbox
                .reported(self.job_id.as_str(), self.attempt)
                .await;
            if progress_rank(reported) >= progress_rank(JobState::Running) {
                // It ran here before a restart, and the backend no longer has it.
                let lost = self.synthetic(
                    JobState::Lost,
                    ReasonCode::BackendError,
                    "the backend no longer has the job",
                );
                self.report(lost, None).await;
                return;
            }
            if !self.start().await {
                return;
            }
        }
        let Some(ended) = self.watch().await else {
            return;
        };
        self.finish(ended).await;
    }

    /// True if the backend already runs this attempt (a lease resumed after a restart,
    /// or sent twice).
    async fn held_by_backend(&self) -> bool {
        match self.shared.manager.status(&self.job_id).await {
            Ok(status) if status.attempt == self.attempt => {
                self.control.in_backend.store(true, Ordering::SeqCst);
                tracing::info!(job = %self.job_id, attempt = self.attempt, state = ?status.state(),
                    "the backend already holds this attempt; watching it");
                true
            }
            _ => false,
        }
    }

    fn staged(&self) -> Option<&pb::StagingPlan> {
        // FILESYSTEM jobs read and write the hub's shared filesystem in place.
        if self.spec.storage_mode() == StorageMode::Filesystem {
            return None;
        }
        self.plan.as_ref()
    }

    fn needs_stage_in(&self) -> bool {
        self.staged()
            .and_then(|p| p.hub_inputs.as_ref())
            .is_some_and(|i| !i.input_dirs.is_empty())
    }

    /// Store-relative outputs of the job at this site, if they go to the hub.
    fn stage_out_source(&self) -> Option<String> {
        let plan = self.staged()?;
        if plan.hub_output_path.is_empty() {
            return None;
        }
        let source = match (self.spec.storage_mode(), self.spec.output_dir()) {
            (StorageMode::Fslink, Some(dir)) => dir.as_str().to_owned(),
            _ => format!("{}/outgoing", self.job_id.storage_key()),
        };
        let same_place =
            source == plan.hub_output_path && plan.method() != pb::StageMethod::Transfer;
        if same_place {
            // FSLINK on the hub's own filesystem: the outputs are already where they go.
            return None;
        }
        Some(source)
    }

    /// A status the backend cannot give yet (or any more).
    fn synthetic(&self, state: JobState, code: ReasonCode, message: &str) -> pb::BackendJobStatus {
        pb::BackendJobStatus {
            job_id: self.job_id.to_string(),
            attempt: self.attempt,
            state: state as i32,
            reason: Some(pb::StateReason {
                code: code as i32,
                message: message.to_owned(),
                exit_code: None,
            }),
            pfcon_status: state.pfcon_status() as i32,
            image: self.spec.image().to_owned(),
            command: self.spec.command(),
            timestamp: None,
            message: message.to_owned(),
            manager_id: self.shared.manager.manager_id().to_owned(),
            backend_name: String::new(),
        }
    }

    async fn report(&self, mut status: pb::BackendJobStatus, outputs: Option<pb::TreeSummary>) {
        // A job started through the local API carries attempt 0; the hub's is the lease's.
        status.attempt = self.attempt;
        if let Err(error) = self.shared.outbox.report(status, outputs).await {
            tracing::error!(job = %self.job_id, attempt = self.attempt, %error,
                "cannot record a status report; it will not survive a restart");
        }
    }

    /// Stage in and schedule. False when the run ended (reported) or was stopped.
    async fn start(&mut self) -> bool {
        let first = if self.needs_stage_in() {
            JobState::StagingIn
        } else {
            JobState::Queued
        };
        self.report(self.synthetic(first, ReasonCode::Unspecified, ""), None)
            .await;
        if self.needs_stage_in() {
            match self.stage(&Direction::Inputs).await {
                Ok(result) => {
                    let method = result.method();
                    let summary = result.summary.unwrap_or_default();
                    tracing::info!(job = %self.job_id, attempt = self.attempt,
                        files = summary.files, bytes = summary.file_bytes,
                        ?method, "inputs staged in");
                }
                Err(StageError::Stopped) => return self.stopped_before_backend().await,
                Err(error) => {
                    tracing::warn!(job = %self.job_id, attempt = self.attempt, %error, "stage-in failed");
                    let failed = self.synthetic(
                        JobState::Failed,
                        ReasonCode::StagingFailed,
                        &format!("inputs could not be staged in: {error}"),
                    );
                    self.report(failed, None).await;
                    return false;
                }
            }
        }
        if self.control.abort.is_cancelled() {
            return self.stopped_before_backend().await;
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let scheduled = tokio::select! {
                scheduled = self.shared.manager.schedule_attempt(&self.spec, self.attempt) => scheduled,
                () = self.control.abort.cancelled() => return self.stopped_before_backend().await,
            };
            match scheduled {
                Ok((status, created)) => {
                    self.control.in_backend.store(true, Ordering::SeqCst);
                    self.shared.capacity_changed.notify_one();
                    tracing::info!(job = %self.job_id, attempt = self.attempt, created,
                        state = ?status.state(), "job scheduled on the backend");
                    if self.control.cancelled().is_some() {
                        // The cancel came while the backend was creating it.
                        self.shared
                            .cancel_in_backend(&self.job_id, self.control.cancelled());
                    }
                    return true;
                }
                Err(Error::Backend(reason)) if tries < SCHEDULE_ATTEMPTS => {
                    tracing::warn!(job = %self.job_id, attempt = self.attempt, %reason, "backend failed to schedule; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(tries))) => {}
                        () = self.control.abort.cancelled() => return self.stopped_before_backend().await,
                    }
                }
                Err(error) => {
                    tracing::warn!(job = %self.job_id, attempt = self.attempt, %error, "job could not be scheduled");
                    let failed = self.synthetic(
                        JobState::Failed,
                        failure_reason(&error),
                        &error.to_string(),
                    );
                    self.report(failed, None).await;
                    return false;
                }
            }
        }
    }

    /// The run was stopped before the backend had the job: a hub's cancel is reported; a
    /// shutdown or removal is not (a restart resumes the lease, a removal forgets it).
    async fn stopped_before_backend(&self) -> bool {
        if let Some(message) = self.control.cancelled() {
            // The schedule may have been cut short after the backend created the job.
            self.shared
                .cancel_in_backend(&self.job_id, Some(message.clone()));
            let cancelled = self.synthetic(JobState::Cancelled, ReasonCode::Cancelled, &message);
            self.report(cancelled, None).await;
        }
        false
    }

    /// Reports the job's progress until it ends; `None` when stopped first.
    async fn watch(&self) -> Option<pb::BackendJobStatus> {
        let poll = self.shared.poll;
        loop {
            match self.shared.manager.status(&self.job_id).await {
                Ok(status) if self.attempt != 0 && status.attempt != self.attempt => {
                    tracing::info!(job = %self.job_id, attempt = self.attempt, held = status.attempt,
                        "the backend now runs another attempt; no longer watching this one");
                    return None;
                }
                Ok(status) if status.state().is_terminal() => return Some(status),
                Ok(status) => self.report(status, None).await,
                Err(Error::NotFound(_)) => {
                    let status = match self.control.cancelled() {
                        Some(message) => {
                            self.synthetic(JobState::Cancelled, ReasonCode::Cancelled, &message)
                        }
                        None => self.synthetic(
                            JobState::Lost,
                            ReasonCode::BackendError,
                            "the backend no longer has the job",
                        ),
                    };
                    return Some(status);
                }
                Err(error) => {
                    tracing::warn!(job = %self.job_id, %error, "cannot read the job's state; will retry");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = self.control.stop.cancelled() => return None,
            }
        }
    }

    /// Stages the outputs out (unless cancelled or lost) and sends the terminal report.
    async fn finish(&mut self, mut ended: pb::BackendJobStatus) {
        let mut outputs = None;
        // Outputs written before a failure are staged out too: CUBE registers them.
        let wanted = matches!(ended.state(), JobState::Succeeded | JobState::Failed);
        if let Some(source) = self.stage_out_source().filter(|_| wanted) {
            let mut staging = ended.clone();
            staging.state = JobState::StagingOut as i32;
            staging.pfcon_status = JobState::StagingOut.pfcon_status() as i32;
            if let Some(reason) = staging.reason.as_mut() {
                reason.code = ReasonCode::Unspecified as i32;
            }
            self.report(staging, None).await;
            match self.stage(&Direction::Outputs(source)).await {
                Ok(result) => {
                    let method = result.method();
                    let summary = result.summary.unwrap_or_default();
                    tracing::info!(job = %self.job_id, attempt = self.attempt,
                        files = summary.files, bytes = summary.file_bytes, skipped = summary.skipped,
                        ?method, "outputs staged out");
                    outputs = Some(summary);
                }
                // Shutting down: the next start stages out again and reports then.
                Err(StageError::Stopped) => return,
                Err(error) => {
                    tracing::warn!(job = %self.job_id, attempt = self.attempt, %error, "stage-out failed");
                    let note = format!("outputs could not be staged out: {error}");
                    if ended.state() == JobState::Succeeded {
                        let exit_code = ended.reason.as_ref().and_then(|r| r.exit_code);
                        ended.state = JobState::Failed as i32;
                        ended.pfcon_status = JobState::Failed.pfcon_status() as i32;
                        ended.reason = Some(pb::StateReason {
                            code: ReasonCode::StagingFailed as i32,
                            message: note,
                            exit_code,
                        });
                    } else if let Some(reason) = ended.reason.as_mut() {
                        reason.message = format!("{}; {note}", reason.message);
                    }
                }
            }
        }
        tracing::info!(job = %self.job_id, attempt = self.attempt, state = ?ended.state(),
            reason = ?ended.reason.as_ref().map(|r| r.code()),
            exit_code = ?ended.reason.as_ref().and_then(|r| r.exit_code), "job attempt ended");
        self.report(ended, outputs).await;
    }

    /// Runs one stage through the site broker, asking the hub for fresh grants first when
    /// those in hand are about to expire, and once more if the hub broker refuses one as
    /// expired.
    async fn stage(&mut self, direction: &Direction) -> Result<pb::StageResult, StageError> {
        let Some(broker) = self.shared.broker.clone() else {
            return Err(StageError::Failed(
                "this site has no site broker (hub.site_broker_uri)".into(),
            ));
        };
        if self.plan.as_ref().is_some_and(expires_soon) {
            self.refresh_grants(direction).await;
        }
        let mut refreshed = false;
        loop {
            let plan = self.plan.clone().unwrap_or_default();
            let job = self.job_id.as_str();
            let stop = self.token_for(direction);
            let result = match direction {
                Direction::Inputs => broker.stage_in(job, &plan, stop).await,
                Direction::Outputs(source) => {
                    broker.stage_out(job, &plan, source.clone(), stop).await
                }
            };
            match result {
                Err(StageError::GrantExpired(reason)) if !refreshed => {
                    refreshed = true;
                    if !self.refresh_grants(direction).await {
                        return Err(StageError::GrantExpired(reason));
                    }
                }
                other => return other,
            }
        }
    }

    /// What interrupts a stage: before the backend has the job a hub's cancel does too.
    fn token_for(&self, direction: &Direction) -> &CancellationToken {
        match direction {
            Direction::Inputs => &self.control.abort,
            Direction::Outputs(_) => &self.control.stop,
        }
    }

    /// Asks the hub for fresh grants (over the session, when one is open) and waits for
    /// them; true once the plan holds them.
    async fn refresh_grants(&mut self, direction: &Direction) -> bool {
        let wire = match direction {
            Direction::Inputs => pb::GrantDirection::Inputs,
            Direction::Outputs(_) => pb::GrantDirection::Outputs,
        };
        for _ in 0..GRANT_TRIES {
            let waiter = self
                .shared
                .wait_for_grants(self.job_id.as_str(), self.attempt);
            let request = pb::SiteMessage {
                message: Some(pb::site_message::Message::GrantRequest(pb::GrantRequest {
                    job_id: self.job_id.to_string(),
                    attempt: self.attempt,
                    direction: wire as i32,
                })),
            };
            let asked = self.shared.outbox.send_now(request).await;
            tracing::info!(job = %self.job_id, attempt = self.attempt, direction = ?wire, asked,
                "asking the hub for fresh broker grants");
            let answer = tokio::select! {
                answer = tokio::time::timeout(GRANT_WAIT, waiter) => answer,
                () = self.token_for(direction).cancelled() => return false,
            };
            if let Ok(Ok(plan)) = answer {
                self.plan = Some(plan);
                return true;
            }
        }
        false
    }
}

/// Which way a stage moves data, and for outputs from where.
#[derive(Debug, Clone)]
enum Direction {
    /// From the hub into `key-<job_id>/incoming`.
    Inputs,
    /// From this store-relative directory to the hub.
    Outputs(String),
}

/// True when the plan's grants expire within [`GRANT_MARGIN`].
fn expires_soon(plan: &pb::StagingPlan) -> bool {
    plan.grants_expire_at
        .as_ref()
        .is_some_and(|t| t.seconds < now_unix() + GRANT_MARGIN.as_secs() as i64)
}

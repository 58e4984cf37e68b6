//! The seam between the manager and a compute engine: the [`Backend`] trait, what it is
//! given ([`JobRequest`]) and what it reports ([`Observed`]).
//!
//! A backend turns a request into the engine's unit of work (container, service,
//! Kubernetes Job, Slurm job, process), labels everything it creates with the job id and
//! the manager id so a restarted manager finds it again, and reports what the engine says
//! in the suite's terms. Policy (idempotent submits, time limits, what a cancel means)
//! lives in the manager, once, not in each backend.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::Stream;

use dispatch_proto::job::{BackendKind, CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};

/// Where a job's inputs are mounted, read-only, in its container.
pub const INCOMING_MOUNT: &str = "/share/incoming";
/// Where a job writes its outputs, in its container.
pub const OUTGOING_MOUNT: &str = "/share/outgoing";

/// Label keys every backend puts on what it creates (as labels, annotations, a Slurm
/// comment, or a state file).
pub mod labels {
    /// Marks what the suite created, so nothing else is ever touched.
    pub const MANAGED_BY: &str = "org.chrisproject.dispatch.managed-by";
    /// The value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "chris-dispatch";
    /// The job's id.
    pub const JOB_ID: &str = "org.chrisproject.dispatch.job-id";
    /// The kind of job (`plugin`): pfcon distinguishes plugin jobs from its op jobs.
    pub const JOB_KIND: &str = "org.chrisproject.dispatch.job-kind";
    /// The manager that owns it.
    pub const MANAGER_ID: &str = "org.chrisproject.dispatch.manager-id";
    /// The coordinator's attempt number.
    pub const ATTEMPT: &str = "org.chrisproject.dispatch.attempt";
    /// The job's time limit in seconds, so a restarted manager can enforce it.
    pub const TIME_LIMIT: &str = "org.chrisproject.dispatch.time-limit-seconds";
}

/// A user id and group id to run a job as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserId {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Everything a backend needs to run one job, already checked and resolved by the
/// manager: backends do not re-validate, and do not decide policy.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    /// The job's id; backends name their unit of work after it.
    pub job_id: JobId,
    /// The image to run.
    pub image: String,
    /// The full command, built as pfcon builds it; it refers to [`INCOMING_MOUNT`] and
    /// [`OUTGOING_MOUNT`], which a backend without containers maps to the host paths.
    pub command: Vec<String>,
    /// Environment, in order (a later duplicate wins).
    pub env: Vec<(String, String)>,
    /// CPU limit.
    pub cpu: CpuMillis,
    /// Memory limit: a hard limit, the job is killed past it.
    pub memory: MemoryMib,
    /// GPUs.
    pub gpus: u32,
    /// Parallel workers (1 everywhere but Kubernetes).
    pub workers: u32,
    /// Wall-clock limit; the manager enforces it where the backend does not.
    pub time_limit: Option<Duration>,
    /// Host directory mounted read-only at [`INCOMING_MOUNT`]; `None`: no inputs.
    pub incoming: Option<PathBuf>,
    /// Host directory mounted read-write at [`OUTGOING_MOUNT`].
    pub outgoing: PathBuf,
    /// Who the job runs as; `None`: the image's (or the engine's) default.
    pub user: Option<UserId>,
    /// Every label to put on what is created: the suite's own (see [`labels`]) and the
    /// operator's.
    pub labels: BTreeMap<String, String>,
}

/// What the engine says of a job, mapped to the suite's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The job.
    pub job_id: JobId,
    /// Its state as far as the engine knows: QUEUED (created, not started), RUNNING,
    /// SUCCEEDED, FAILED, or LOST when the engine cannot say.
    pub state: JobState,
    /// Why, when it ended otherwise than by exiting 0.
    pub reason: ReasonCode,
    /// The exit code, once it exited.
    pub exit_code: Option<i32>,
    /// The engine's own words (`exited`, `OOMKilled`, a pull error...).
    pub message: String,
    /// The image.
    pub image: String,
    /// The command as run.
    pub command: Vec<String>,
    /// When it started, once it has.
    pub started_at: Option<SystemTime>,
    /// When it ended, once it has.
    pub finished_at: Option<SystemTime>,
    /// The engine's name for it (container name, process id...).
    pub backend_name: String,
    /// The labels it was created with.
    pub labels: BTreeMap<String, String>,
}

impl Observed {
    /// True once the job can change no more.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
        )
    }
}

/// What an engine offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCapabilities {
    /// The kind of engine.
    pub kind: BackendKind,
    /// CPU it can give to jobs at once.
    pub cpu: CpuMillis,
    /// Memory it can give to jobs at once.
    pub memory: MemoryMib,
    /// GPUs it can give to jobs at once.
    pub gpus: u32,
    /// Largest number of workers one job may have.
    pub max_workers: u32,
    /// The engine's version, for diagnosis.
    pub version: String,
}

/// A job's output as it comes: raw bytes (stdout and stderr interleaved), decoded by the
/// reader with UTF-8 replacement.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send>>;

/// Why a backend call failed, in terms a caller acts on.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The image is not present and cannot be pulled.
    #[error("image `{image}` is not available: {reason}")]
    ImageNotFound {
        /// The image.
        image: String,
        /// What the engine said.
        reason: String,
    },
    /// A job with this id already exists in the engine.
    #[error("job `{0}` already exists in the backend")]
    AlreadyExists(String),
    /// The engine has no such job.
    #[error("job `{0}` is not known to the backend")]
    NotFound(String),
    /// The request asks for what this engine cannot do (e.g. workers > 1 on Docker).
    #[error("{field}: {reason}")]
    Unsupported {
        /// The request field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The engine cannot be reached or failed.
    #[error("backend: {0}")]
    Engine(String),
    /// A local operation (files, processes) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One compute engine. Implementations are cheap to share (`Arc<dyn Backend>`), must
/// tolerate concurrent calls, and must never touch what they did not create.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What the engine is and offers.
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError>;

    /// Creates and starts the job. Fails with [`BackendError::AlreadyExists`] if the engine
    /// has one by that id (the manager decides what a replay means), and with
    /// [`BackendError::ImageNotFound`] promptly when the image cannot be had.
    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError>;

    /// What the engine says of the job now, or `None` if it has no such job.
    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError>;

    /// The job's output: the last `tail_lines` lines (all when `None`), then with
    /// `follow` what comes next, until the job ends.
    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError>;

    /// Kills the job if it runs; keeps its record and logs. A job already ended is left
    /// as it is.
    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError>;

    /// Removes everything the engine holds for the job, killing it first if it runs.
    /// Returns false when there was nothing.
    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError>;

    /// Every job this manager created in the engine (found by label), in any state.
    async fn list_owned(&self) -> Result<Vec<Observed>, BackendError>;
}

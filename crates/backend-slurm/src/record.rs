//! What the backend keeps in each job's directory beside Slurm's files: the job as
//! submitted (`record.json`), and its end once seen (`final.json`), so a job is still
//! known after Slurm has forgotten it (`MinJobAge` seconds after its end).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use dispatch_proto::v1::{JobState, ReasonCode};

use crate::script::{EXIT_FILE, OOM_FILE};
use crate::slurm::EndFiles;

/// The job as submitted.
pub(crate) const RECORD_FILE: &str = "record.json";
/// The job's end, once seen.
pub(crate) const FINAL_FILE: &str = "final.json";

/// The job as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub version: u32,
    pub job_id: String,
    pub manager_id: String,
    /// Slurm's id for it.
    pub slurm_job_id: String,
    pub image: String,
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// The container runtime applies the memory limit itself (see `slurm::outcome`).
    pub runtime_limits_memory: bool,
    pub submitted_at: SystemTime,
}

/// How the job ended, as first seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FinalRecord {
    pub slurm_job_id: String,
    /// A `JobState` number.
    pub state: i32,
    /// A `ReasonCode` number.
    pub reason: i32,
    pub exit_code: Option<i32>,
    pub message: String,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
}

impl FinalRecord {
    pub(crate) fn state(&self) -> JobState {
        JobState::try_from(self.state).unwrap_or(JobState::Lost)
    }

    pub(crate) fn reason(&self) -> ReasonCode {
        ReasonCode::try_from(self.reason).unwrap_or(ReasonCode::BackendError)
    }
}

/// Reads a JSON file; `None` when it is missing. An unreadable one is an error.
pub(crate) async fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a record this backend wrote: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a JSON file atomically (a temporary file renamed over it).
pub(crate) async fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

/// What the script left: the plugin's exit code and the runtime's OOM flag.
pub(crate) async fn end_files(dir: &Path) -> EndFiles {
    let exit_code = match tokio::fs::read_to_string(dir.join(EXIT_FILE)).await {
        Ok(text) => text.trim().parse().ok(),
        Err(_) => None,
    };
    let oom = tokio::fs::try_exists(dir.join(OOM_FILE))
        .await
        .unwrap_or(false);
    EndFiles { exit_code, oom }
}

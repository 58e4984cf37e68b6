//! What the manager knows of a job that the engine cannot hold: that the manager itself
//! killed it, and why (a cancel, or its time limit). Written to disk before the kill, so
//! a manager restarted in between still reports the job as cancelled or timed out, not as
//! a plain failure.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use dispatch_proto::JobId;

use crate::error::{Error, Result};

/// Why the manager stopped a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stopped {
    /// A client cancelled it.
    Cancelled {
        /// What the client said.
        message: String,
    },
    /// It ran past its time limit.
    TimeLimit {
        /// The limit, in seconds.
        seconds: u64,
    },
}

/// One JSON file per job under `<state_dir>/jobs/`.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    /// Opens (creating) the ledger in `state_dir`.
    pub fn open(state_dir: &std::path::Path) -> Result<Self> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::Storage {
            path: dir.display().to_string(),
            reason: format!("cannot create the manager's state dir: {e}"),
        })?;
        Ok(Self { dir })
    }

    fn path(&self, job_id: &JobId) -> PathBuf {
        // Job ids are single path components (JobId guarantees it).
        self.dir.join(format!("{job_id}.json"))
    }

    /// Records why a job is being stopped; the first reason recorded wins.
    pub fn record(&self, job_id: &JobId, stopped: &Stopped) -> Result<()> {
        if self.get(job_id).is_some() {
            return Ok(());
        }
        let path = self.path(job_id);
        let storage = |e: std::io::Error| Error::Storage {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(stopped).map_err(|e| storage(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(storage)?;
        std::fs::rename(&tmp, &path).map_err(storage)
    }

    /// Why the manager stopped the job, if it did.
    pub fn get(&self, job_id: &JobId) -> Option<Stopped> {
        let text = std::fs::read(self.path(job_id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Forgets the job (it was removed, or is being started afresh).
    pub fn forget(&self, job_id: &JobId) -> Result<()> {
        match std::fs::remove_file(self.path(job_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Storage {
                path: self.path(job_id).display().to_string(),
                reason: e.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

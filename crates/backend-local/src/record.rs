//! A job's record: `<state_dir>/<job_id>/state.json`, the local backend's equivalent of a
//! container's labels and inspect data, and the only thing a restarted manager has to find
//! its jobs again.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use dispatch_manager::backend::Observed;
use dispatch_proto::JobId;
use dispatch_proto::v1::{JobState, ReasonCode};

/// The record's file name in the job's directory.
pub(crate) const STATE_FILE: &str = "state.json";
/// The job's output (stdout and stderr together).
pub(crate) const LOG_FILE: &str = "output.log";
/// Where the wrapper writes the job's exit code.
pub(crate) const EXIT_FILE: &str = "exit";

/// The message of a job whose end a restarted manager could not observe.
pub(crate) const EXIT_UNKNOWN: &str =
    "the manager restarted while the job ran; its exit status could not be read";
/// The message of a job whose manager stopped between creating its record and starting it.
pub(crate) const NEVER_STARTED: &str = "the manager stopped while starting the job";

/// How the job's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Exit {
    /// The wrapper exited with this code: the job's own (128 + N when a signal killed it),
    /// or the wrapper's 125 when it never started the job.
    Code {
        /// The code.
        code: i32,
    },
    /// The wrapper itself was killed by this signal (a kill of the process group).
    Signal {
        /// The signal number.
        signal: i32,
    },
    /// Nobody could tell.
    Unknown {
        /// Why not.
        message: String,
    },
}

/// Who the job runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordedUser {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Everything known about one job, persisted on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// Format of this file; only 1 exists.
    pub format: u32,
    /// The job's id.
    pub job_id: String,
    /// The manager that started it: a manager only ever touches its own.
    pub manager_id: String,
    /// The labels it was submitted with.
    pub labels: BTreeMap<String, String>,
    /// The image asked for (ignored: the job runs on the host).
    pub image: String,
    /// The command as submitted, with container paths.
    pub command: Vec<String>,
    /// The command as run, with host paths (lossy where a path is not UTF-8).
    pub host_command: Vec<String>,
    /// Memory limit, MiB.
    pub memory_mib: u64,
    /// CPU limit, millicores.
    pub cpu_millis: u32,
    /// Who it runs as, when not the manager's own user.
    pub user: Option<RecordedUser>,
    /// Its cgroups, memory first; empty without cgroups.
    pub cgroups: Vec<PathBuf>,
    /// The wrapper's pid (also the process group id).
    pub pid: Option<u32>,
    /// The wrapper's start time (`/proc/<pid>/stat` field 22), to tell it from a later
    /// process with the same pid.
    pub process_start_ticks: Option<u64>,
    /// The boot the start time counts from.
    pub boot_id: Option<String>,
    /// When it started.
    pub started_at: Option<SystemTime>,
    /// When it ended; set once, with `exit`.
    pub finished_at: Option<SystemTime>,
    /// How it ended.
    pub exit: Option<Exit>,
    /// The kernel's OOM killer killed a process of the job.
    pub oom_killed: bool,
    /// The backend was asked to kill it (recorded before the signal is sent).
    pub killed: bool,
}

impl JobRecord {
    /// The record format written by this version.
    pub const FORMAT: u32 = 1;

    /// The exit code to report: the wrapper's, or 128 + N for a signal (as a shell, and
    /// Docker, report it).
    fn exit_code(&self) -> Option<i32> {
        match self.exit.as_ref()? {
            Exit::Code { code } => Some(*code),
            Exit::Signal { signal } => Some(128 + signal),
            Exit::Unknown { .. } => None,
        }
    }

    /// The job in the suite's terms.
    pub fn to_observed(&self, job_id: &JobId) -> Observed {
        let (state, reason, exit_code, message) = self.state();
        Observed {
            job_id: job_id.clone(),
            state,
            reason,
            exit_code,
            message,
            image: self.image.clone(),
            command: self.command.clone(),
            started_at: self.started_at,
            finished_at: self.finished_at,
            backend_name: match self.pid {
                Some(pid) => format!("pid {pid}"),
                None => "not started".into(),
            },
            labels: self.labels.clone(),
        }
    }

    fn state(&self) -> (JobState, ReasonCode, Option<i32>, String) {
        let Some(exit) = self.finished_at.and(self.exit.as_ref()) else {
            return match self.pid {
                None => (
                    JobState::Queued,
                    ReasonCode::Unspecified,
                    None,
                    "created".into(),
                ),
                Some(_) => (
                    JobState::Running,
                    ReasonCode::Unspecified,
                    None,
                    "running".into(),
                ),
            };
        };
        let code = self.exit_code();
        // A job that met the OOM killer but still exited 0 coped with it (a child was
        // killed, not the job): it succeeded.
        if self.oom_killed && code != Some(0) {
            let message = format!(
                "OOMKilled: over its memory limit of {} MiB",
                self.memory_mib
            );
            return (JobState::Failed, ReasonCode::OomKilled, code, message);
        }
        match exit {
            Exit::Code { code: 0 } => (
                JobState::Succeeded,
                ReasonCode::ExitCode,
                Some(0),
                "exited with 0".into(),
            ),
            // It exited by itself before (or despite) a kill: its own code is the truth.
            Exit::Code { code } => (
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(*code),
                format!("exited with {code}"),
            ),
            // Killed by us: the manager knows why (cancel, time limit) and says so.
            Exit::Signal { .. } | Exit::Unknown { .. } if self.killed => (
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(code.unwrap_or(128 + 9)),
                "killed".into(),
            ),
            Exit::Signal { signal } => (
                JobState::Failed,
                ReasonCode::ExitCode,
                code,
                format!("killed by signal {signal}"),
            ),
            Exit::Unknown { message } => (
                JobState::Lost,
                ReasonCode::BackendError,
                None,
                message.clone(),
            ),
        }
    }
}

/// Writes the record atomically: a temporary file, synced, renamed over the old one. Only
/// the manager's user can read it (labels and commands are not for everyone).
pub(crate) fn write(dir: &Path, record: &JobRecord) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Reads a record.
pub(crate) fn read(dir: &Path) -> io::Result<JobRecord> {
    let text = std::fs::read(dir.join(STATE_FILE))?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The exit code the wrapper recorded, if it did.
pub(crate) fn read_exit_file(dir: &Path) -> Option<(i32, Option<SystemTime>)> {
    let path = dir.join(EXIT_FILE);
    let code = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    Some((code, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        JobRecord {
            format: JobRecord::FORMAT,
            job_id: "j1".into(),
            manager_id: "m1".into(),
            labels: BTreeMap::from([("k".into(), "v".into())]),
            image: "fnndsc/pl-simpledsapp".into(),
            command: vec!["simpledsapp".into(), "/share/outgoing".into()],
            host_command: vec!["simpledsapp".into(), "/store/out".into()],
            memory_mib: 64,
            cpu_millis: 1000,
            user: None,
            cgroups: vec![],
            pid: Some(42),
            process_start_ticks: Some(7),
            boot_id: Some("b".into()),
            started_at: Some(SystemTime::UNIX_EPOCH),
            finished_at: None,
            exit: None,
            oom_killed: false,
            killed: false,
        }
    }

    fn ended(exit: Exit, oom_killed: bool, killed: bool) -> (JobState, ReasonCode, Option<i32>) {
        let r = JobRecord {
            finished_at: Some(SystemTime::UNIX_EPOCH),
            exit: Some(exit),
            oom_killed,
            killed,
            ..record()
        };
        let o = r.to_observed(&JobId::parse("j1").unwrap());
        (o.state, o.reason, o.exit_code)
    }

    #[test]
    fn states_map_to_the_suite() {
        let id = JobId::parse("j1").unwrap();
        let running = record().to_observed(&id);
        assert_eq!(running.state, JobState::Running);
        assert_eq!(running.backend_name, "pid 42");
        assert_eq!(running.command, record().command);
        let queued = JobRecord {
            pid: None,
            ..record()
        };
        assert_eq!(queued.to_observed(&id).state, JobState::Queued);

        use {JobState as S, ReasonCode as R};
        assert_eq!(
            ended(Exit::Code { code: 0 }, false, false),
            (S::Succeeded, R::ExitCode, Some(0))
        );
        assert_eq!(
            ended(Exit::Code { code: 3 }, false, false),
            (S::Failed, R::ExitCode, Some(3))
        );
        assert_eq!(
            ended(Exit::Code { code: 137 }, true, false),
            (S::Failed, R::OomKilled, Some(137))
        );
        assert_eq!(
            ended(Exit::Code { code: 0 }, true, false),
            (S::Succeeded, R::ExitCode, Some(0))
        );
        assert_eq!(
            ended(Exit::Signal { signal: 9 }, false, true),
            (S::Failed, R::ExitCode, Some(137))
        );
        assert_eq!(
            ended(Exit::Code { code: 0 }, false, true),
            (S::Succeeded, R::ExitCode, Some(0))
        );
        assert_eq!(
            ended(Exit::Signal { signal: 15 }, false, false),
            (S::Failed, R::ExitCode, Some(143))
        );
        assert_eq!(
            ended(
                Exit::Unknown {
                    message: EXIT_UNKNOWN.into()
                },
                false,
                false
            ),
            (S::Lost, R::BackendError, None)
        );
        assert_eq!(
            ended(
                Exit::Unknown {
                    message: EXIT_UNKNOWN.into()
                },
                false,
                true
            ),
            (S::Failed, R::ExitCode, Some(137))
        );
    }

    #[test]
    fn records_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record();
        write(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path()).unwrap(), r);
        r.exit = Some(Exit::Signal { signal: 9 });
        write(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path()).unwrap(), r);
        assert!(!dir.path().join("state.json.tmp").exists());
    }
}

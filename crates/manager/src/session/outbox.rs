//! The durable outbox of status reports. Each job attempt the hub leased to this site has
//! one file, `<state_dir>/outbox/<attempt>-<job_id>.json` (0600: the lease in it carries
//! the job's env and broker grants), holding the lease, the last sequence number used,
//! and every report the hub has not yet acknowledged.
//!
//! A report is written there before it is sent, numbered 1, 2, 3... per (job, attempt),
//! and only a state further along than the last one reported is reported at all, so the
//! hub sees each attempt move forward once and in order. Reports stay until the hub acks
//! them; a new session sends them all again, and a report left unacknowledged for the
//! hub's resend interval is sent again on the same session. Once the terminal report is
//! acknowledged the attempt has nothing more to say and its file goes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};

use dispatch_proto::v1::{self as pb, JobState};

use super::identity::write_private;
use crate::error::{Error, Result};

/// Where a state sits in a job's life, so a report is sent only when the job moves on.
pub fn progress_rank(state: JobState) -> u8 {
    match state {
        JobState::Unspecified => 0,
        JobState::Queued => 1,
        JobState::StagingIn => 2,
        JobState::Running => 3,
        JobState::StagingOut => 4,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost => 5,
    }
}

/// One job attempt's reports: a job id and an attempt number.
pub type AttemptKey = (String, u32);

/// The file of one attempt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AttemptFile {
    job_id: String,
    attempt: u32,
    /// Last sequence number given to a report.
    last_sequence: u64,
    /// Highest sequence the hub acknowledged.
    acked: u64,
    /// The state of the latest report (`JobState` as a number).
    reported_state: i32,
    /// The lease, protobuf then base64: what a restarted manager resumes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
    /// Reports not yet acknowledged, protobuf then base64, by sequence.
    pending: BTreeMap<u64, String>,
}

impl AttemptFile {
    fn reported(&self) -> JobState {
        JobState::try_from(self.reported_state).unwrap_or(JobState::Unspecified)
    }

    fn lease(&self) -> Option<pb::RunJobCommand> {
        let bytes = BASE64.decode(self.lease.as_ref()?).ok()?;
        pb::RunJobCommand::decode(bytes.as_slice()).ok()
    }

    fn finished(&self) -> bool {
        self.reported().is_terminal() && self.pending.is_empty()
    }
}

struct Attempt {
    file: AttemptFile,
    /// When each pending report was last sent on the current session.
    sent_at: HashMap<u64, Instant>,
}

#[derive(Default)]
struct State {
    /// The session's outbound stream while one is open.
    link: Option<mpsc::Sender<pb::SiteMessage>>,
    attempts: HashMap<AttemptKey, Attempt>,
}

/// A lease found in the outbox whose attempt has not ended.
#[derive(Debug, Clone)]
pub struct OpenLease {
    /// The lease as the hub sent it (grants refreshed since, if any).
    pub lease: pb::RunJobCommand,
    /// The state last reported for it.
    pub reported: JobState,
}

/// The outbox. One per site session owner; cheap to share behind an `Arc`.
pub struct Outbox {
    dir: PathBuf,
    /// An async lock: held across a report's write and send, so reports of one attempt
    /// reach the wire in sequence order, and a replay never races a live report.
    state: Mutex<State>,
}

fn storage(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Storage {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn status_message(report: pb::StatusReport) -> pb::SiteMessage {
    pb::SiteMessage {
        message: Some(pb::site_message::Message::Status(report)),
    }
}

fn decode_report(encoded: &str) -> Option<pb::StatusReport> {
    let bytes = BASE64.decode(encoded).ok()?;
    pb::StatusReport::decode(bytes.as_slice()).ok()
}

async fn blocking<T: Send + 'static>(
    path: PathBuf,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| storage(&path, e))?
        .map_err(|e| storage(&path, e))
}

impl Outbox {
    /// Opens (creating) the outbox under `state_dir`, loading every attempt left there.
    pub async fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("outbox");
        let scan = dir.clone();
        let files = blocking(dir.clone(), move || {
            std::fs::create_dir_all(&scan)?;
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&scan)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    let parsed = std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<AttemptFile>(&b).ok());
                    match parsed {
                        Some(file) => files.push(file),
                        None => tracing::warn!(path = %path.display(), "ignoring an unreadable outbox file"),
                    }
                }
            }
            Ok(files)
        })
        .await?;
        let mut state = State::default();
        for file in files {
            let key = (file.job_id.clone(), file.attempt);
            state.attempts.insert(
                key,
                Attempt {
                    file,
                    sent_at: HashMap::new(),
                },
            );
        }
        tracing::debug!(attempts = state.attempts.len(), "outbox opened");
        Ok(Self {
            dir,
            state: Mutex::new(state),
        })
    }

    fn path(&self, job_id: &str, attempt: u32) -> PathBuf {
        // Job ids are single path components (JobId guarantees it).
        self.dir.join(format!("{attempt}-{job_id}.json"))
    }

    async fn persist(&self, file: &AttemptFile) -> Result<()> {
        let path = self.path(&file.job_id, file.attempt);
        let bytes = serde_json::to_vec(file).map_err(|e| storage(&path, e))?;
        let target = path.clone();
        blocking(path, move || write_private(&target, &bytes)).await
    }

    async fn delete(&self, job_id: &str, attempt: u32) -> Result<()> {
        let path = self.path(job_id, attempt);
        let target = path.clone();
        blocking(path, move || match std::fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }

    /// Records a lease before any work on it starts, so a restart resumes it. A lease
    /// already recorded keeps its reports and sequence numbers.
    pub async fn record_lease(&self, lease: &pb::RunJobCommand) -> Result<JobState> {
        let job_id = lease
            .spec
            .as_ref()
            .map(|s| s.job_id.clone())
            .unwrap_or_default();
        let mut state = self.state.lock().await;
        let attempt = state
            .attempts
            .entry((job_id.clone(), lease.attempt))
            .or_insert_with(|| Attempt {
                file: AttemptFile {
                    job_id,
                    attempt: lease.attempt,
                    ..AttemptFile::default()
                },
                sent_at: HashMap::new(),
            });
        attempt.file.lease = Some(BASE64.encode(lease.encode_to_vec()));
        let reported = attempt.file.reported();
        let file = attempt.file.clone();
        self.persist(&file).await?;
        Ok(reported)
    }

    /// Replaces the grants of a recorded lease (after `GrantsIssued`).
    pub async fn update_grants(
        &self,
        grants: &pb::GrantsIssued,
    ) -> Result<Option<pb::StagingPlan>> {
        let mut state = self.state.lock().await;
        let key = (grants.job_id.clone(), grants.attempt);
        let Some(attempt) = state.attempts.get_mut(&key) else {
            return Ok(None);
        };
        let Some(mut lease) = attempt.file.lease() else {
            return Ok(None);
        };
        let Some(plan) = lease.staging.as_mut() else {
            return Ok(None);
        };
        if !grants.input_grant.is_empty() {
            plan.input_grant = grants.input_grant.clone();
        }
        if !grants.output_grant.is_empty() {
            plan.output_grant = grants.output_grant.clone();
        }
        if grants.expires_at.is_some() {
            plan.grants_expire_at = grants.expires_at;
        }
        let plan = plan.clone();
        attempt.file.lease = Some(BASE64.encode(lease.encode_to_vec()));
        let file = attempt.file.clone();
        self.persist(&file).await?;
        Ok(Some(plan))
    }

    /// Reports `status` for its (job, attempt) if it is further along than the state last
    /// reported: numbers it, writes it, then sends it if a session is open. Returns its
    /// sequence, or `None` when it was not news.
    pub async fn report(
        &self,
        status: pb::BackendJobStatus,
        outputs: Option<pb::TreeSummary>,
    ) -> Result<Option<u64>> {
        let key = (status.job_id.clone(), status.attempt);
        let mut state = self.state.lock().await;
        let attempt = state
            .attempts
            .entry(key.clone())
            .or_insert_with(|| Attempt {
                file: AttemptFile {
                    job_id: key.0.clone(),
                    attempt: key.1,
                    ..AttemptFile::default()
                },
                sent_at: HashMap::new(),
            });
        if progress_rank(status.state()) <= progress_rank(attempt.file.reported()) {
            return Ok(None);
        }
        let sequence = attempt.file.last_sequence + 1;
        let report = pb::StatusReport {
            sequence,
            observed_at: Some(SystemTime::now().into()),
            outputs,
            status: Some(status.clone()),
        };
        attempt.file.last_sequence = sequence;
        attempt.file.reported_state = status.state;
        attempt
            .file
            .pending
            .insert(sequence, BASE64.encode(report.encode_to_vec()));
        let file = attempt.file.clone();
        self.persist(&file).await?;
        tracing::info!(job = %key.0, attempt = key.1, sequence, state = ?status.state(),
            reason = ?status.reason.as_ref().map(|r| r.code()), "job state reported");
        let link = state.link.clone();
        if let Some(link) = link
            && link.send(status_message(report)).await.is_ok()
            && let Some(attempt) = state.attempts.get_mut(&key)
        {
            attempt.sent_at.insert(sequence, Instant::now());
        }
        Ok(Some(sequence))
    }

    /// The hub stored an attempt's reports up to `up_to`: they are forgotten, and with the
    /// terminal one the whole attempt.
    pub async fn ack(&self, ack: &pb::StatusAck) -> Result<()> {
        let key = (ack.job_id.clone(), ack.attempt);
        let mut state = self.state.lock().await;
        let Some(attempt) = state.attempts.get_mut(&key) else {
            return Ok(());
        };
        let before = attempt.file.pending.len();
        attempt
            .file
            .pending
            .retain(|sequence, _| *sequence > ack.up_to_sequence);
        attempt
            .sent_at
            .retain(|sequence, _| *sequence > ack.up_to_sequence);
        attempt.file.acked = attempt.file.acked.max(ack.up_to_sequence);
        if attempt.file.pending.len() == before {
            return Ok(());
        }
        if attempt.file.finished() {
            state.attempts.remove(&key);
            tracing::debug!(job = %key.0, attempt = key.1, "every report of the attempt acknowledged");
            return self.delete(&key.0, key.1).await;
        }
        let file = attempt.file.clone();
        self.persist(&file).await
    }

    /// A session opened: from now on reports go to `link`, and every unacknowledged one
    /// is sent again first, in order.
    pub async fn connect(&self, link: mpsc::Sender<pb::SiteMessage>) -> usize {
        let mut state = self.state.lock().await;
        state.link = Some(link.clone());
        let mut keys: Vec<AttemptKey> = state.attempts.keys().cloned().collect();
        keys.sort();
        let mut resent = 0;
        for key in keys {
            let Some(attempt) = state.attempts.get_mut(&key) else {
                continue;
            };
            attempt.sent_at.clear();
            for (sequence, encoded) in &attempt.file.pending {
                let Some(report) = decode_report(encoded) else {
                    continue;
                };
                if link.send(status_message(report)).await.is_err() {
                    return resent;
                }
                attempt.sent_at.insert(*sequence, Instant::now());
                resent += 1;
            }
        }
        resent
    }

    /// The session closed: reports wait in the outbox for the next one.
    pub async fn disconnect(&self) {
        self.state.lock().await.link = None;
    }

    /// Sends again the reports sent longer than `after` ago and still not acknowledged.
    pub async fn resend_stale(&self, after: Duration) -> usize {
        let mut state = self.state.lock().await;
        let Some(link) = state.link.clone() else {
            return 0;
        };
        let mut resent = 0;
        for attempt in state.attempts.values_mut() {
            for (sequence, encoded) in &attempt.file.pending {
                let stale = attempt
                    .sent_at
                    .get(sequence)
                    .is_none_or(|at| at.elapsed() >= after);
                if !stale {
                    continue;
                }
                let Some(report) = decode_report(encoded) else {
                    continue;
                };
                if link.send(status_message(report)).await.is_err() {
                    return resent;
                }
                attempt.sent_at.insert(*sequence, Instant::now());
                resent += 1;
            }
        }
        resent
    }

    /// Sends a message now if a session is open; false otherwise.
    pub async fn send_now(&self, message: pb::SiteMessage) -> bool {
        let link = self.state.lock().await.link.clone();
        match link {
            Some(link) => link.send(message).await.is_ok(),
            None => false,
        }
    }

    /// The state last reported for an attempt.
    pub async fn reported(&self, job_id: &str, attempt: u32) -> JobState {
        let state = self.state.lock().await;
        state
            .attempts
            .get(&(job_id.to_owned(), attempt))
            .map_or(JobState::Unspecified, |a| a.file.reported())
    }

    /// Leases whose attempt has not reached a terminal state: what a restarted manager
    /// picks up again.
    pub async fn open_leases(&self) -> Vec<OpenLease> {
        let state = self.state.lock().await;
        let mut open: Vec<OpenLease> = state
            .attempts
            .values()
            .filter(|a| !a.file.reported().is_terminal())
            .filter_map(|a| {
                Some(OpenLease {
                    lease: a.file.lease()?,
                    reported: a.file.reported(),
                })
            })
            .collect();
        open.sort_by_key(|o| {
            (
                o.lease.spec.as_ref().map(|s| s.job_id.clone()),
                o.lease.attempt,
            )
        });
        open
    }

    /// Forgets an attempt (`None`: every attempt of the job), reports and all: the hub
    /// removed the job.
    pub async fn forget(&self, job_id: &str, attempt: Option<u32>) -> Result<()> {
        let mut state = self.state.lock().await;
        let keys: Vec<AttemptKey> = state
            .attempts
            .keys()
            .filter(|(job, number)| job == job_id && attempt.is_none_or(|a| a == *number))
            .cloned()
            .collect();
        for key in keys {
            state.attempts.remove(&key);
            self.delete(&key.0, key.1).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(job: &str, attempt: u32, state: JobState) -> pb::BackendJobStatus {
        pb::BackendJobStatus {
            job_id: job.into(),
            attempt,
            state: state as i32,
            ..Default::default()
        }
    }

    fn sequences(messages: &[pb::SiteMessage]) -> Vec<(String, u64)> {
        messages
            .iter()
            .filter_map(|m| match &m.message {
                Some(pb::site_message::Message::Status(r)) => {
                    Some((r.status.as_ref()?.job_id.clone(), r.sequence))
                }
                _ => None,
            })
            .collect()
    }

    fn drain(rx: &mut mpsc::Receiver<pb::SiteMessage>) -> Vec<pb::SiteMessage> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    #[tokio::test]
    async fn reports_are_numbered_kept_until_acked_and_survive_a_restart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| storage(Path::new("tmp"), e))?;
        let outbox = Outbox::open(dir.path()).await?;
        let lease = pb::RunJobCommand {
            spec: Some(pb::JobSpec {
                job_id: "j1".into(),
                ..Default::default()
            }),
            attempt: 2,
            ..Default::default()
        };
        outbox.record_lease(&lease).await?;
        assert_eq!(
            outbox
                .report(status("j1", 2, JobState::Queued), None)
                .await?,
            Some(1)
        );
        assert_eq!(
            outbox
                .report(status("j1", 2, JobState::Running), None)
                .await?,
            Some(2)
        );
        assert_eq!(
            outbox
                .report(status("j1", 2, JobState::Queued), None)
                .await?,
            None,
            "a job never goes back"
        );

        let (tx, mut rx) = mpsc::channel(16);
        assert_eq!(outbox.connect(tx.clone()).await, 2);
        assert_eq!(
            sequences(&drain(&mut rx)),
            [("j1".into(), 1), ("j1".into(), 2)]
        );
        outbox
            .ack(&pb::StatusAck {
                job_id: "j1".into(),
                attempt: 2,
                up_to_sequence: 1,
            })
            .await?;
        outbox
            .report(status("j1", 2, JobState::Succeeded), None)
            .await?;
        assert_eq!(sequences(&drain(&mut rx)), [("j1".into(), 3)]);
        assert_eq!(outbox.resend_stale(Duration::ZERO).await, 2);
        drain(&mut rx);

        // A restart finds the unacknowledged reports and the sequence where it was.
        drop(outbox);
        let outbox = Outbox::open(dir.path()).await?;
        assert!(outbox.open_leases().await.is_empty(), "the attempt ended");
        let (tx, mut rx) = mpsc::channel(16);
        assert_eq!(outbox.connect(tx).await, 2);
        assert_eq!(
            sequences(&drain(&mut rx)),
            [("j1".into(), 2), ("j1".into(), 3)]
        );
        outbox
            .ack(&pb::StatusAck {
                job_id: "j1".into(),
                attempt: 2,
                up_to_sequence: 3,
            })
            .await?;
        assert!(
            std::fs::read_dir(dir.path().join("outbox"))
                .map_err(|e| storage(dir.path(), e))?
                .next()
                .is_none(),
            "an acknowledged terminal attempt leaves nothing behind"
        );
        Ok(())
    }
}

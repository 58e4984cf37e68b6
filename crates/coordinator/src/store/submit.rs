//! Group commit for submissions. Every `SubmitJob` is written by one task, the writer,
//! which takes whatever submissions are waiting (up to [`MAX_BATCH`]) into one
//! transaction. What bounds an unbatched writer is the sync at each commit (about a
//! millisecond on an ordinary disk, so about a thousand submissions a second whatever the
//! SQL costs); a batch pays it once. The batch grows by itself under load, since the
//! submissions that arrive while one batch syncs make up the next, and stays at one when
//! calls come one at a time, so a lone submission waits for nobody.
//!
//! Nobody is answered before the transaction holding their job has committed. New jobs
//! (ids named once in the batch and not stored: nearly every submission) are inserted a
//! few hundred to a statement, skipping ids already stored; with SQLite every statement is
//! a round trip to the connection's thread, so once the sync is shared it is statements
//! per job, not rows, that a batch costs. Any other submission (a replay, a retry, an id
//! sent twice at once) runs in a savepoint of its own: one that is refused (another spec
//! under a known id, a deleted job) or fails is rolled back alone and the rest of the
//! batch commits. Job rows are written first and the batch's events after them, keeping
//! the lock order every writer follows (job rows, then the event log). If the batch as a
//! whole fails, each submission is written again in a transaction of its own, so none can
//! sink the others.
//!
//! Submissions of one id in one batch see each other, in the order they arrived, as they
//! would one transaction after another.

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use sqlx::Row as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use dispatch_proto::{JobSpec, v1};

use super::{
    Details, JobRecord, JobTimes, ROWS_PER_STATEMENT, Sql, Store, Submitted, Tx, TxError,
    UnixMicros, WRITE_ATTEMPTS, record_events, replace_labels, select_job, spec_differences,
    update_job_row,
};
use crate::error::{Error, Result};
use crate::state::{self, Reason, Status, Transition};

/// Submissions written in one transaction, at most: enough to spread one sync over any
/// burst, few enough that a batch still commits in milliseconds.
const MAX_BATCH: usize = 512;
/// Submissions waiting for the writer; callers beyond that wait to hand theirs over.
const QUEUE: usize = 4096;

/// A submission, checked and sealed, waiting for the writer.
pub(super) struct Submission {
    /// The spec as accepted.
    pub(super) spec: JobSpec,
    /// On the wire, with its env values (compared with a stored job's on a replay).
    pub(super) wire: v1::JobSpec,
    /// On the wire, env values blanked: what is stored and shown.
    pub(super) shown: v1::JobSpec,
    /// `shown`, encoded.
    pub(super) encoded: Vec<u8>,
    /// The env values, sealed.
    pub(super) sealed: Vec<u8>,
    /// Start a failed job again.
    pub(super) retry_if_failed: bool,
}

/// A submission in the writer's queue, with where its answer goes once it is committed
/// (or refused).
pub(super) type Queued = (Submission, oneshot::Sender<Result<Submitted>>);

/// The queue of submissions to the writer.
pub(super) fn queue() -> (mpsc::Sender<Queued>, mpsc::Receiver<Queued>) {
    mpsc::channel(QUEUE)
}

/// What a submission did inside the batch, before its event is written.
struct Staged {
    job: JobRecord,
    /// A row was written (a new job or a new attempt): it needs an event.
    changed: bool,
}

/// The writer: the one task that writes submissions, until the store closes.
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) queue: mpsc::Receiver<Queued>,
    pub(super) closing: CancellationToken,
}

impl Writer {
    /// Writes batches until the store closes; what is queued by then is still written.
    pub(super) async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closed = false;
        loop {
            tokio::select! {
                biased;
                () = self.closing.cancelled(), if !closed => {
                    // New submissions are refused from now; those queued are written.
                    self.queue.close();
                    closed = true;
                }
                received = self.queue.recv_many(&mut batch, MAX_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    self.store.write_submissions(std::mem::take(&mut batch)).await;
                }
            }
        }
        tracing::debug!("job store writer stopped");
    }
}

impl Store {
    /// A submission as the writer takes it: the spec on the wire, its env values sealed,
    /// and the blanked copy that is stored, encoded.
    pub(super) fn prepare_submission(
        &self,
        spec: &JobSpec,
        retry_if_failed: bool,
    ) -> Result<Submission> {
        let wire = v1::JobSpec::from(spec);
        let sealed = self.inner.sealer.seal(spec.job_id().as_str(), &wire.env)?;
        let mut shown = wire.clone();
        shown.redact_env();
        let encoded = shown.encode_to_vec();
        Ok(Submission {
            spec: spec.clone(),
            wire,
            shown,
            encoded,
            sealed,
            retry_if_failed,
        })
    }

    /// Hands a submission to the writer and waits for its answer, which comes after the
    /// commit.
    pub(super) async fn submit_through_writer(&self, submission: Submission) -> Result<Submitted> {
        let (reply, answer) = oneshot::channel();
        let handed = !self.inner.closing.is_cancelled()
            && self
                .inner
                .submissions
                .send((submission, reply))
                .await
                .is_ok();
        if !handed {
            return Err(Error::Unavailable(
                "the job store is closing; submit the job again".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Unavailable(
                "the job store stopped before answering; submit the job again (a replay is safe)"
                    .into(),
            ))
        })
    }

    /// Writes one batch and answers each caller.
    async fn write_submissions(&self, queued: Vec<Queued>) {
        let (batch, replies): (Vec<Submission>, Vec<_>) = queued.into_iter().unzip();
        let outcomes = match self.write_batch(&batch).await {
            Ok(outcomes) => outcomes,
            Err(error) if batch.len() == 1 => vec![Err(error)],
            Err(error) => {
                tracing::warn!(%error, submissions = batch.len(),
                    "a batch of submissions could not commit; writing them one at a time");
                let mut outcomes = Vec::with_capacity(batch.len());
                for submission in &batch {
                    let outcome = match self.write_batch(std::slice::from_ref(submission)).await {
                        Ok(mut one) => one.pop().unwrap_or_else(|| {
                            Err(Error::Store("a submission went unanswered".into()))
                        }),
                        Err(error) => Err(error),
                    };
                    outcomes.push(outcome);
                }
                outcomes
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that went away meanwhile has its job stored all the same; its
            // retry is a replay.
            let _ = reply.send(outcome);
        }
    }

    /// One transaction for `batch`: the outcome of each submission, or an error when the
    /// transaction itself failed (nothing of it is then committed).
    async fn write_batch(&self, batch: &[Submission]) -> Result<Vec<Result<Submitted>>> {
        let now = UnixMicros::now();
        let mut tx = self.inner.write.begin().await?;
        let mut named: HashMap<&str, usize> = HashMap::new();
        for submission in batch {
            *named.entry(submission.spec.job_id().as_str()).or_default() += 1;
        }
        // Ids named once are inserted together where they are new; the rest (replays,
        // retries, an id sent twice at once) are staged one at a time, in order.
        let (once, mut one_by_one): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| named.get(batch[i].spec.job_id().as_str()) == Some(&1));
        let mut staged: Vec<Option<Result<Staged>>> = (0..batch.len()).map(|_| None).collect();
        if !once.is_empty() {
            let submissions: Vec<&Submission> = once.iter().map(|&i| &batch[i]).collect();
            // A failure here fails the batch, whose submissions are then written one per
            // transaction.
            let inserted = match insert_new_jobs(&mut tx, &submissions, now).await {
                Ok(inserted) => inserted,
                Err(TxError::Conflict) => {
                    return Err(Error::Store("new jobs conflicted with a stored one".into()));
                }
                Err(TxError::Fail(error)) => return Err(error),
            };
            for i in once {
                if inserted.contains(batch[i].spec.job_id().as_str()) {
                    staged[i] = Some(Ok(Staged {
                        job: new_record(&batch[i], now),
                        changed: true,
                    }));
                } else {
                    one_by_one.push(i);
                }
            }
            one_by_one.sort_unstable();
        }
        for i in one_by_one {
            staged[i] = Some(self.stage_in_savepoint(&mut tx, &batch[i], now).await?);
        }
        let mut staged: Vec<Result<Staged>> = staged
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| Err(Error::Store("a submission was not staged".into())))
            })
            .collect();
        let changed: Vec<&mut JobRecord> = staged
            .iter_mut()
            .filter_map(|outcome| match outcome {
                Ok(Staged { job, changed: true }) => Some(job),
                _ => None,
            })
            .collect();
        let newest = match record_events(&mut tx, changed, now, now).await {
            Ok(newest) => newest,
            Err(TxError::Conflict) => return Err(Error::Store("the event log conflicted".into())),
            Err(TxError::Fail(error)) => return Err(error),
        };
        tx.commit().await?;
        if let Some(sequence) = newest {
            self.publish(sequence);
        }
        // A replay of a job written earlier in this batch read the row before its event
        // was numbered: it shows the event's sequence, as a later transaction would.
        let mut written: HashMap<String, u64> = HashMap::new();
        let mut outcomes = Vec::with_capacity(staged.len());
        for outcome in staged {
            outcomes.push(outcome.map(|Staged { mut job, changed }| {
                let id = job.job_id.to_string();
                if changed {
                    written.insert(id, job.sequence);
                } else if let Some(sequence) = written.get(&id) {
                    job.sequence = *sequence;
                }
                Submitted {
                    job,
                    created: changed,
                }
            }));
        }
        Ok(outcomes)
    }

    /// Stages one submission in a savepoint of its own: kept when it succeeds, rolled
    /// back when it is refused or fails (the outcome is then its error), tried again when
    /// another writer changed the job in between. The outer error is the transaction's.
    async fn stage_in_savepoint(
        &self,
        tx: &mut Tx,
        submission: &Submission,
        now: UnixMicros,
    ) -> Result<Result<Staged>> {
        for _ in 0..WRITE_ATTEMPTS {
            plain(tx, "SAVEPOINT submission").await?;
            let outcome = self.stage(tx, submission, now).await;
            if outcome.is_err() {
                plain(tx, "ROLLBACK TO SAVEPOINT submission").await?;
            }
            plain(tx, "RELEASE SAVEPOINT submission").await?;
            match outcome {
                Ok(staged) => return Ok(Ok(staged)),
                Err(TxError::Conflict) => continue,
                Err(TxError::Fail(error)) => return Ok(Err(error)),
            }
        }
        Ok(Err(Error::Contended(submission.spec.job_id().to_string())))
    }

    /// A submission's rows: a new job inserted QUEUED; a failed one started again (with
    /// `retry_if_failed`); or, for a replay, nothing. Its event comes later.
    async fn stage(
        &self,
        tx: &mut Tx,
        submission: &Submission,
        now: UnixMicros,
    ) -> Result<Staged, TxError> {
        let spec = &submission.spec;
        let id = spec.job_id();
        let Some(stored) = select_job(&mut **tx, id.as_str()).await? else {
            if insert_new_jobs(tx, &[submission], now).await?.is_empty() {
                // Stored by another writer since it was read (PostgreSQL): read it again.
                return Err(TxError::Conflict);
            }
            return Ok(Staged {
                job: new_record(submission, now),
                changed: true,
            });
        };
        if submission.retry_if_failed && stored.status.state.is_retryable() {
            if stored.times.deleted.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "job `{id}` was deleted; purge it (DeleteJob with purge) to submit it again"
                ))
                .into());
            }
            let applied = state::apply(
                &stored.status,
                &Transition::Retry {
                    reason: Reason::new(
                        v1::ReasonCode::Requeued,
                        format!(
                            "resubmitted after attempt {} ended {}",
                            stored.status.attempt, stored.status.state
                        ),
                    ),
                },
            )
            .map_err(|refusal| Error::IllegalTransition {
                job_id: id.to_string(),
                refusal,
            })?;
            // The new attempt runs the spec just sent.
            let updated = sqlx::query(
                "UPDATE jobs SET spec = $1, env_sealed = $2, auid = $3, priority = $4, \
                 revision = revision + 1 WHERE job_id = $5 AND revision = $6",
            )
            .bind(submission.encoded.clone())
            .bind(submission.sealed.clone())
            .bind(spec.auid().to_owned())
            .bind(i64::from(spec.priority()))
            .bind(id.as_str().to_owned())
            .bind(stored.revision)
            .execute(&mut **tx)
            .await?;
            if updated.rows_affected() != 1 {
                return Err(TxError::Conflict);
            }
            replace_labels(tx, id.as_str(), spec.labels()).await?;
            let stored = JobRecord {
                spec: submission.shown.clone(),
                revision: stored.revision + 1,
                ..stored
            };
            let job = update_job_row(tx, &stored, applied, now, now, &Details::default()).await?;
            return Ok(Staged { job, changed: true });
        }
        let env_sealed: Vec<u8> = sqlx::query("SELECT env_sealed FROM jobs WHERE job_id = $1")
            .bind(id.as_str().to_owned())
            .fetch_one(&mut **tx)
            .await?
            .try_get("env_sealed")?;
        let mut stored_wire = stored.spec.clone();
        stored_wire.env = self.inner.sealer.open(id.as_str(), &env_sealed)?;
        let differs = spec_differences(&stored_wire, &submission.wire);
        if !differs.is_empty() {
            return Err(Error::AlreadyExists {
                job_id: id.to_string(),
                differs,
            }
            .into());
        }
        Ok(Staged {
            job: stored,
            changed: false,
        })
    }
}

/// A statement without values (savepoints).
async fn plain(tx: &mut Tx, statement: &'static str) -> Result<()> {
    sqlx::query(statement).execute(&mut **tx).await?;
    Ok(())
}

/// Inserts the jobs among `submissions` whose ids are not stored, QUEUED on their first
/// attempt, with their labels, a few hundred to a statement (their events are numbered
/// with the batch's); an id already stored is left as it is. Returns the ids inserted. A
/// new id has no labels yet (a purge removes a job's labels with it).
async fn insert_new_jobs(
    tx: &mut Tx,
    submissions: &[&Submission],
    now: UnixMicros,
) -> Result<HashSet<String>, TxError> {
    let status = Status::submitted();
    let mut inserted = HashSet::with_capacity(submissions.len());
    for chunk in submissions.chunks(ROWS_PER_STATEMENT) {
        let mut rows = Sql::new(
            "INSERT INTO jobs (job_id, spec, env_sealed, auid, priority, state, reason_code, \
             reason_message, exit_code, message, site_id, manager_id, attempt, sequence, \
             revision, cancel_requested_at, cancel_message, outputs, created_at, updated_at, \
             queued_at, staging_in_at, running_at, staging_out_at, finished_at, deleted_at) \
             VALUES ",
        );
        for (i, submission) in chunk.iter().enumerate() {
            if i > 0 {
                rows.push(", ");
            }
            let spec = &submission.spec;
            rows.push("(");
            rows.bind_text(spec.job_id().as_str());
            rows.push(", ");
            rows.bind_bytes(submission.encoded.clone());
            rows.push(", ");
            rows.bind_bytes(submission.sealed.clone());
            rows.push(", ");
            rows.bind_text(spec.auid());
            rows.push(", ");
            rows.bind_int(i64::from(spec.priority()));
            rows.push(", ");
            rows.bind_text(status.state.as_str());
            rows.push(", ");
            rows.bind_text(status.reason.code.as_str_name());
            rows.push(", '', NULL, '', NULL, NULL, ");
            rows.bind_int(i64::from(status.attempt));
            rows.push(", 0, 1, NULL, NULL, NULL, ");
            for n in 0..3 {
                if n > 0 {
                    rows.push(", ");
                }
                rows.bind_int(now.0);
            }
            rows.push(", NULL, NULL, NULL, NULL, NULL)");
        }
        rows.push(" ON CONFLICT (job_id) DO NOTHING RETURNING job_id");
        for row in rows.fetch_all(&mut **tx).await? {
            inserted.insert(row.try_get::<String, _>("job_id")?);
        }
    }
    let labels: Vec<[&str; 3]> = submissions
        .iter()
        .filter(|submission| inserted.contains(submission.spec.job_id().as_str()))
        .flat_map(|submission| {
            let id = submission.spec.job_id().as_str();
            submission
                .spec
                .labels()
                .iter()
                .map(move |(key, value)| [id, key, value])
        })
        .collect();
    for chunk in labels.chunks(ROWS_PER_STATEMENT) {
        let mut rows = Sql::new("INSERT INTO job_labels (job_id, label_key, label_value) VALUES ");
        for (i, row) in chunk.iter().enumerate() {
            if i > 0 {
                rows.push(", ");
            }
            rows.list(row, |sql, value| sql.bind_text(value));
        }
        rows.execute(&mut **tx).await?;
    }
    Ok(inserted)
}

/// The record [`insert_new_jobs`] stores, as reading it back would give it (the sequence
/// is set once the batch's events are numbered).
fn new_record(submission: &Submission, now: UnixMicros) -> JobRecord {
    JobRecord {
        job_id: submission.spec.job_id().clone(),
        spec: submission.shown.clone(),
        status: Status::submitted(),
        sequence: 0,
        message: String::new(),
        cancel_requested: None,
        outputs: None,
        times: JobTimes {
            created: now,
            updated: now,
            queued: now,
            staging_in: None,
            running: None,
            staging_out: None,
            finished: None,
            deleted: None,
        },
        revision: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Database;
    use crate::seal::EnvSealer;
    use dispatch_proto::JobId;

    fn spec(id: &str, image: &str) -> JobSpec {
        JobSpec::try_from(v1::JobSpec {
            job_id: id.into(),
            image: image.into(),
            entrypoint: vec!["run".into()],
            plugin_type: v1::PluginType::Fs.into(),
            env: vec!["TOKEN=secret".into()],
            cpu_millicores: 100,
            memory_mib: 64,
            workers: 1,
            storage_mode: v1::StorageMode::Zipfile.into(),
            labels: [("feed".to_owned(), id.to_owned())].into(),
            ..v1::JobSpec::default()
        })
        .expect("a valid spec")
    }

    fn id(raw: &str) -> JobId {
        JobId::parse(raw).expect("a valid id")
    }

    #[tokio::test]
    async fn one_batch_answers_each_submission_as_one_transaction_each_would() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let database = Database::Sqlite(dir.path().join("coordinator.db"));
        let store = Store::open(&database, EnvSealer::from_key([7; 32])).await?;
        let stored = store.submit(&spec("stored", "img:1"), false).await?;
        let batch = [
            ("new-a", "img:1"),
            ("new-b", "img:1"),
            ("new-a", "img:1"),
            ("stored", "img:1"),
            ("stored", "img:2"),
            ("new-a", "img:2"),
            ("new-c", "img:1"),
        ]
        .iter()
        .map(|(id, image)| store.prepare_submission(&spec(id, image), false))
        .collect::<Result<Vec<_>>>()?;
        let outcomes = store.write_batch(&batch).await?;
        let created = |i: usize| -> Result<Submitted> {
            outcomes[i]
                .as_ref()
                .map(Clone::clone)
                .map_err(|e| Error::Store(format!("submission {i}: {e}")))
        };
        let (a, b, c) = (created(0)?, created(1)?, created(6)?);
        assert!(a.created && b.created && c.created);
        assert!(a.job.sequence < b.job.sequence && b.job.sequence < c.job.sequence);
        assert_eq!(store.head(), c.job.sequence, "published after the commit");
        // Each answer is the record as stored, sequence included.
        for answer in [&a, &b, &c] {
            assert_eq!(store.get(&answer.job.job_id).await?, answer.job);
        }
        // The second `new-a` saw the first: a replay, with the first's event.
        let replay = created(2)?;
        assert!(!replay.created);
        assert_eq!(replay.job, a.job);
        let replay = created(3)?;
        assert!(!replay.created);
        assert_eq!(replay.job, stored.job);
        // Another spec under a known id is refused alone.
        for refused in [4, 5] {
            assert!(
                matches!(&outcomes[refused], Err(Error::AlreadyExists { differs, .. }) if differs == &["image"]),
                "{:?}",
                outcomes[refused]
            );
        }
        assert_eq!(store.job_events(&id("new-a")).await?.len(), 1);
        assert_eq!(store.job_events(&id("stored")).await?.len(), 1);
        // Labels were stored with the rows.
        let labelled = store
            .list(
                &super::super::JobFilter {
                    labels: dispatch_proto::job::Labels::parse(
                        "labels",
                        [("feed".to_owned(), "new-b".to_owned())].into(),
                    )
                    .map_err(Error::from)?,
                    ..super::super::JobFilter::default()
                },
                10,
                None,
            )
            .await?;
        assert_eq!(labelled.jobs, [b.job]);
        store.close().await;
        Ok(())
    }
}

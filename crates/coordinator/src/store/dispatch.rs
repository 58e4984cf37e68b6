//! The job store as the scheduler and the site sessions use it: the queue in placement
//! order, placements committed in batches, and sites' status reports applied once each.

use std::collections::HashMap;

use sqlx::Row as _;

use dispatch_proto::{JobId, JobSpec, v1};

use super::{
    Details, JobRecord, Sql, Store, Tx, TxError, UnixMicros, WRITE_ATTEMPTS, Written, decode_spec,
    job_from_row, record_event, record_events, select_job, to_i64, to_u64, update_job_row,
};
use crate::error::{Error, Result};
use crate::state::{self, JobState, Reason, SiteRef, Transition};

/// A queued job, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    /// Its id.
    pub job_id: JobId,
    /// The attempt a placement would start.
    pub attempt: u32,
    /// Its spec, checked (env values blanked: the scheduler needs none).
    pub spec: JobSpec,
    key: QueueKey,
}

/// A position in the queue's order (priority high to low, then oldest first), so the
/// scheduler can read on past jobs that fit nowhere without reading them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKey {
    priority: i64,
    created: i64,
    job_id: String,
}

impl QueuedJob {
    /// Where the next page of the queue starts after this job.
    pub fn key(&self) -> &QueueKey {
        &self.key
    }
}

/// One placement to commit: a queued job, on the attempt the scheduler read, at a site.
#[derive(Debug, Clone)]
pub struct PlacementOrder {
    /// The job.
    pub job_id: JobId,
    /// The attempt read when it was chosen; a job that moved on since is skipped.
    pub attempt: u32,
    /// Where it goes.
    pub site: SiteRef,
}

/// A placement committed.
pub type Placed = JobRecord;

/// What a site's status report did.
#[derive(Debug, Clone)]
pub enum ReportOutcome {
    /// Its sequence was at or below the last one applied for the attempt: already stored.
    Replay,
    /// Stored (the state changed when the report said something new).
    Applied {
        /// The job as it now is.
        job: JobRecord,
        /// True when the report moved the job on.
        changed: bool,
    },
    /// About an attempt the hub has moved on from, a job placed elsewhere, or a job not
    /// stored at all: the site should let go of it.
    Stale {
        /// The job, if it is stored.
        job: Option<JobRecord>,
    },
    /// The hub already ended this attempt (the site-loss policy, a cancel that could not
    /// wait): nothing changes, and a site still running it should stop.
    Ended {
        /// The job as it is.
        job: JobRecord,
    },
}

/// The states a report of `reported` walks a job through from `current`, within one
/// attempt. A fast job may end between two looks of its manager, so a report can skip
/// states; the hub then records the ones passed through, in order, so every watcher sees
/// the same legal path. Nothing for a report that is not news (the lease accepted, the
/// same state again, or a state the job is already past).
fn report_path(current: JobState, reported: JobState) -> Vec<JobState> {
    use JobState::*;
    match (current, reported) {
        (StagingIn, Running) => vec![Running],
        (StagingIn, StagingOut) => vec![Running, StagingOut],
        (StagingIn, Succeeded) => vec![Running, Succeeded],
        (Running, StagingOut) => vec![StagingOut],
        (StagingIn | Running | StagingOut, end) if end.is_terminal() => vec![end],
        _ => Vec::new(),
    }
}

/// A report's reason as the state machine's.
fn reason_of(status: &v1::BackendJobStatus) -> Reason {
    let reason = status.reason.clone().unwrap_or_default();
    Reason {
        code: v1::ReasonCode::try_from(reason.code).unwrap_or(v1::ReasonCode::BackendError),
        message: reason.message,
        exit_code: reason.exit_code,
    }
}

async fn last_applied(tx: &mut Tx, job_id: &str, attempt: u32) -> Result<u64> {
    let row = sqlx::query(
        "SELECT last_sequence FROM report_sequences WHERE job_id = $1 AND attempt = $2",
    )
    .bind(job_id.to_owned())
    .bind(i64::from(attempt))
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(row) => to_u64(
            row.try_get("last_sequence")?,
            "report_sequences.last_sequence",
        ),
        None => Ok(0),
    }
}

async fn record_applied(
    tx: &mut Tx,
    job_id: &str,
    attempt: u32,
    sequence: u64,
) -> Result<(), TxError> {
    sqlx::query(
        "INSERT INTO report_sequences (job_id, attempt, last_sequence) VALUES ($1, $2, $3) \
         ON CONFLICT (job_id, attempt) DO UPDATE SET last_sequence = excluded.last_sequence",
    )
    .bind(job_id.to_owned())
    .bind(i64::from(attempt))
    .bind(to_i64(sequence))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Queued jobs in placement order (highest priority first, then oldest), at most
    /// `limit`, after `after` when given.
    pub async fn queued_jobs(
        &self,
        after: Option<&QueueKey>,
        limit: u32,
    ) -> Result<Vec<QueuedJob>> {
        let mut sql = Sql::new(
            "SELECT job_id, attempt, spec, priority, created_at FROM jobs WHERE state = 'QUEUED'",
        );
        if let Some(key) = after {
            sql.push(" AND (priority < ");
            sql.bind_int(key.priority);
            sql.push(" OR (priority = ");
            sql.bind_int(key.priority);
            sql.push(" AND (created_at > ");
            sql.bind_int(key.created);
            sql.push(" OR (created_at = ");
            sql.bind_int(key.created);
            sql.push(" AND job_id > ");
            sql.bind_text(&key.job_id);
            sql.push("))))");
        }
        sql.push(" ORDER BY priority DESC, created_at, job_id LIMIT ");
        sql.bind_int(i64::from(limit));
        let rows = sql.fetch_all(&self.inner.read).await?;
        let mut queued = Vec::with_capacity(rows.len());
        for row in &rows {
            let raw_id: String = row.try_get("job_id")?;
            let key = QueueKey {
                priority: row.try_get("priority")?,
                created: row.try_get("created_at")?,
                job_id: raw_id.clone(),
            };
            let parsed = JobId::parse(&raw_id)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    let spec = decode_spec(
                        &row.try_get::<Vec<u8>, _>("spec")
                            .map_err(|e| e.to_string())?,
                    )
                    .map_err(|e| e.to_string())?;
                    let spec = JobSpec::try_from(spec).map_err(|e| e.to_string())?;
                    Ok((id, spec))
                });
            let (job_id, spec) = match parsed {
                Ok(parsed) => parsed,
                Err(error) => {
                    // Only a database edited by hand (or rules tightened since) gets here;
                    // the job stays queued where an operator can see it.
                    tracing::error!(job = %raw_id, %error, "a queued job cannot be read; skipping it");
                    continue;
                }
            };
            let attempt = u32::try_from(row.try_get::<i64, _>("attempt")?)
                .map_err(|_| Error::Corrupt(format!("job `{raw_id}`: attempt")))?;
            queued.push(QueuedJob {
                job_id,
                attempt,
                spec,
                key,
            });
        }
        Ok(queued)
    }

    /// Commits placements (QUEUED to STAGING_IN at a site) in one transaction: one sync
    /// for a whole batch. A job that changed since the scheduler read it (cancelled,
    /// placed by another coordinator replica) is left out. Returns the jobs placed.
    pub async fn place(&self, orders: &[PlacementOrder]) -> Result<Vec<Placed>> {
        if orders.is_empty() {
            return Ok(Vec::new());
        }
        let now = UnixMicros::now();
        let mut tx = self.inner.write.begin().await?;
        let mut placed = Vec::with_capacity(orders.len());
        // Every job row first, the event log after (see `update_job_row`).
        for order in orders {
            let Some(stored) = select_job(&mut *tx, order.job_id.as_str()).await? else {
                continue;
            };
            let transition = Transition::Enter {
                to: JobState::StagingIn,
                reason: Reason::progress(),
                attempt: Some(order.attempt),
                site: Some(order.site.clone()),
            };
            let Ok(applied) = state::apply(&stored.status, &transition) else {
                continue;
            };
            match update_job_row(&mut tx, &stored, applied, now, now, &Details::default()).await {
                Ok(job) => placed.push(job),
                Err(TxError::Conflict) => continue,
                Err(TxError::Fail(error)) => return Err(error),
            }
        }
        let newest = match record_events(&mut tx, placed.iter_mut().collect(), now, now).await {
            Ok(newest) => newest,
            Err(TxError::Conflict) => return Err(Error::Store("the event log conflicted".into())),
            Err(TxError::Fail(error)) => return Err(error),
        };
        tx.commit().await?;
        if let Some(sequence) = newest {
            self.publish(sequence);
        }
        Ok(placed)
    }

    /// Applies one status report from site `site_id`, once: a report at or below the
    /// last sequence applied for its (job, attempt) is a replay and changes nothing. The
    /// states it passes, the sequence and the backend's word are stored in one
    /// transaction, so an acknowledgement sent after this returns is never premature.
    pub async fn apply_report(
        &self,
        site_id: &str,
        report: &v1::StatusReport,
    ) -> Result<ReportOutcome> {
        let status = report.status.clone().unwrap_or_default();
        let id = JobId::parse(&status.job_id)
            .map_err(|e| Error::InvalidArgument(e.within("status.job_id")))?;
        let outcome = write_with_retries!(self, id, |tx| self
            .try_apply_report(tx, site_id, &id, report, &status));
        Ok(outcome)
    }

    async fn try_apply_report(
        &self,
        tx: &mut Tx,
        site_id: &str,
        id: &JobId,
        report: &v1::StatusReport,
        status: &v1::BackendJobStatus,
    ) -> Result<Written<ReportOutcome>, TxError> {
        let attempt = status.attempt;
        if report.sequence <= last_applied(tx, id.as_str(), attempt).await? {
            return Ok(Written::quiet(ReportOutcome::Replay));
        }
        let Some(stored) = select_job(&mut **tx, id.as_str()).await? else {
            return Ok(Written::quiet(ReportOutcome::Stale { job: None }));
        };
        let here = stored
            .status
            .site
            .as_ref()
            .is_some_and(|s| s.site_id == site_id);
        if stored.status.attempt != attempt || !here {
            return Ok(Written::quiet(ReportOutcome::Stale { job: Some(stored) }));
        }
        record_applied(tx, id.as_str(), attempt, report.sequence).await?;
        if stored.status.state.is_terminal() {
            return Ok(Written::quiet(ReportOutcome::Ended { job: stored }));
        }
        let reported = v1::JobState::try_from(status.state)
            .ok()
            .and_then(|s| JobState::try_from(s).ok());
        let path = reported.map_or_else(Vec::new, |r| report_path(stored.status.state, r));
        let now = UnixMicros::now();
        let observed = report
            .observed_at
            .as_ref()
            .map_or(now, UnixMicros::from_proto);
        let mut job = stored;
        let mut written = Vec::with_capacity(path.len());
        let last = path.len().saturating_sub(1);
        for (index, to) in path.iter().enumerate() {
            let reason = if index == last {
                reason_of(status)
            } else {
                Reason::progress()
            };
            let transition = Transition::Enter {
                to: *to,
                reason,
                attempt: Some(attempt),
                site: None,
            };
            let applied = state::apply(&job.status, &transition).map_err(|refusal| {
                Error::IllegalTransition {
                    job_id: id.to_string(),
                    refusal,
                }
            })?;
            let details = Details {
                message: Some(status.message.clone()).filter(|m| !m.is_empty()),
                outputs: if index == last {
                    report.outputs.clone()
                } else {
                    None
                },
            };
            job = update_job_row(tx, &job, applied, now, observed, &details).await?;
            written.push(job.clone());
        }
        let mut sequence = None;
        for step in &written {
            let event = record_event(tx, step, observed, now).await?;
            sequence = Some(event);
            job.sequence = event;
        }
        let changed = !written.is_empty();
        if !changed && !status.message.is_empty() && status.message != job.message {
            // Not news for the state machine, but the backend's latest word.
            sqlx::query(
                "UPDATE jobs SET message = $1, revision = revision + 1 WHERE job_id = $2 AND revision = $3",
            )
            .bind(status.message.clone())
            .bind(id.as_str().to_owned())
            .bind(job.revision)
            .execute(&mut **tx)
            .await
            .map_err(TxError::from)
            .and_then(|done| {
                if done.rows_affected() == 1 {
                    Ok(())
                } else {
                    Err(TxError::Conflict)
                }
            })?;
            job.message.clone_from(&status.message);
            job.revision += 1;
        }
        Ok(Written {
            value: ReportOutcome::Applied { job, changed },
            sequence,
        })
    }

    /// Jobs placed at a site and not yet ended.
    pub async fn placed_at_site(&self, site_id: &str) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE site_id = $1 AND state IN ('STAGING_IN', 'RUNNING', 'STAGING_OUT')"
        ))
        .bind(site_id.to_owned())
        .fetch_all(&self.inner.read)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The stored jobs among `ids`, by id.
    pub async fn jobs_by_ids(&self, ids: &[String]) -> Result<HashMap<String, JobRecord>> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(200) {
            let mut sql = Sql::new(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE job_id IN ("
            ));
            for (i, id) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_text(id);
            }
            sql.push(")");
            for row in sql.fetch_all(&self.inner.read).await? {
                let job = job_from_row(&row)?;
                found.insert(job.job_id.to_string(), job);
            }
        }
        Ok(found)
    }

    /// True when any job is queued (a heartbeat's `work_pending`).
    pub async fn any_queued(&self) -> Result<bool> {
        Ok(
            sqlx::query("SELECT 1 FROM jobs WHERE state = 'QUEUED' LIMIT 1")
                .fetch_optional(&self.inner.read)
                .await?
                .is_some(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_walk_only_legal_paths_forward() {
        use JobState::*;
        assert_eq!(report_path(StagingIn, Queued), []);
        assert_eq!(report_path(StagingIn, StagingIn), []);
        assert_eq!(report_path(StagingIn, Running), [Running]);
        assert_eq!(report_path(StagingIn, Succeeded), [Running, Succeeded]);
        assert_eq!(report_path(StagingIn, StagingOut), [Running, StagingOut]);
        assert_eq!(report_path(StagingIn, Failed), [Failed]);
        assert_eq!(report_path(Running, Running), []);
        assert_eq!(report_path(StagingOut, Running), [], "never backwards");
        assert_eq!(report_path(StagingOut, Succeeded), [Succeeded]);
        assert_eq!(report_path(Succeeded, Failed), []);
        // Every path is legal in the state machine.
        for from in JobState::ALL {
            for to in JobState::ALL {
                let mut at = from;
                for step in report_path(from, to) {
                    assert!(at.may_enter(step), "{from} -> {to}: {at} -> {step}");
                    at = step;
                }
            }
        }
    }
}

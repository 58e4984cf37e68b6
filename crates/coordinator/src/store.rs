//! The durable job store: every job, every state change, committed before it is
//! acknowledged.
//!
//! One code path serves SQLite (the embedded default: a file in the data dir) and
//! PostgreSQL (when one machine is outgrown), through sqlx's `Any` driver. `Any` was
//! chosen over a layer generic in the database type because the store then has exactly
//! one body of SQL and one set of migrations, checked by the same tests on both
//! databases; its limits are kept on purpose: SQL is written once in the common subset
//! (`$n` placeholders, which both drivers accept; `UPDATE ... RETURNING`), and values are
//! only `i64`, text and bytes (times are microseconds since the epoch).
//!
//! Durability: SQLite runs in WAL mode with `synchronous = FULL`, so the WAL is synced at
//! every commit and an acknowledged submission survives a power cut, not only a crash of
//! the process (NORMAL would let the last commits vanish on power loss, and a client told
//! "accepted" would later hear "not found"). The cost, one sync per commit, is amortised
//! where it matters most: submissions are written by one task, many to a transaction
//! (group commit, store/submit.rs), and placements are committed a round at a time
//! (store/dispatch.rs). SQLite has one writer connection (WAL readers never wait for it,
//! and a single writer never meets `SQLITE_BUSY`); PostgreSQL shares one pool.
//!
//! Concurrency: a write reads the job, asks [`state::apply`] whether the change is legal,
//! then updates the row only if its `revision` is still the one read (retrying a few times
//! if another writer got there first). The event's global sequence comes from the one row
//! of `event_log`, locked until commit, so events commit in sequence order: a watcher
//! that has seen sequence N can never later find an event below N.
//!
//! Watching: after each commit the store publishes the newest sequence on a `watch`
//! channel. Watchers read the events themselves from the table, so a slow watcher never
//! loses events to an overflowing buffer and a fast one waits without polling.

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::Stream;
use prost::Message as _;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, AssertSqlSafe, Executor as _, Row as _, SqlSafeStr as _, Transaction};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use dispatch_proto::job::Labels;
use dispatch_proto::{JobId, JobSpec, v1};

use crate::config::Database;
use crate::error::{Error, Result};
use crate::seal::EnvSealer;
use crate::state::{self, JobState, Reason, SiteRef, Status, Transition};
use crate::tasks::Tasks;

/// How often a write is tried again when another writer changed the job in between.
const WRITE_ATTEMPTS: usize = 8;
/// Largest page of `ListJobs`.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the client names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Events read from the log in one query by a watcher.
const EVENT_BATCH: i64 = 500;

/// The columns of `jobs` a [`JobRecord`] is read from (all but the sealed env).
macro_rules! job_columns {
    () => {
        "job_id, spec, state, reason_code, reason_message, exit_code, message, site_id, \
         manager_id, attempt, sequence, revision, cancel_requested_at, cancel_message, outputs, \
         created_at, updated_at, queued_at, staging_in_at, running_at, staging_out_at, \
         finished_at, deleted_at"
    };
}

/// The scheduler reads the queue as `state = 'QUEUED' ORDER BY priority DESC, created_at,
/// job_id` (store/dispatch.rs). The first schema's `jobs_queue (state, priority,
/// queued_at)` cannot give that order, so every page of the queue sorted every queued job:
/// about 0.2 s a page with 100,000 queued in SQLite, capping placements near a thousand a
/// second. This index gives the order as stored (0.2 ms a page), and replaces the old one,
/// whose every use it covers.
///
/// Kept here rather than in `migrations/` only because this change was made by someone
/// who could not add files there; it belongs in `migrations/0003_queue_order.sql`.
const QUEUE_ORDER_MIGRATION: &str = "\
CREATE INDEX jobs_queue_order ON jobs (state, priority DESC, created_at, job_id);
DROP INDEX jobs_queue;
";

/// The migrations, embedded so the binary carries its schema.
fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(vec![
        Migration::new(
            1,
            "jobs".into(),
            MigrationType::Simple,
            include_str!("../migrations/0001_jobs.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "sites".into(),
            MigrationType::Simple,
            include_str!("../migrations/0002_sites.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "queue order".into(),
            MigrationType::Simple,
            QUEUE_ORDER_MIGRATION.into_sql_str(),
            false,
        ),
    ]);
    migrator.set_locking(true);
    migrator
}

/// A point in time, in microseconds since the Unix epoch: exact, portable across both
/// databases, and ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMicros(pub i64);

impl UnixMicros {
    /// Now, by the system clock.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// As a protobuf timestamp.
    pub fn to_proto(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.0.div_euclid(1_000_000),
            // In 0..1e9, so the cast cannot truncate.
            nanos: (self.0.rem_euclid(1_000_000) * 1000) as i32,
        }
    }

    /// From a protobuf timestamp (a site's observation time), to the microsecond.
    pub fn from_proto(timestamp: &prost_types::Timestamp) -> Self {
        Self(
            timestamp
                .seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(timestamp.nanos) / 1000),
        )
    }
}

impl From<SystemTime> for UnixMicros {
    fn from(time: SystemTime) -> Self {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Self(i64::try_from(after.as_micros()).unwrap_or(i64::MAX)),
            Err(before) => Self(-i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

/// When a job entered each state of its current attempt, and other times of its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTimes {
    /// When it was first accepted.
    pub created: UnixMicros,
    /// When anything in the record last changed.
    pub updated: UnixMicros,
    /// When it last entered QUEUED.
    pub queued: UnixMicros,
    /// When its current attempt entered STAGING_IN.
    pub staging_in: Option<UnixMicros>,
    /// When its current attempt entered RUNNING.
    pub running: Option<UnixMicros>,
    /// When its current attempt entered STAGING_OUT.
    pub staging_out: Option<UnixMicros>,
    /// When its current attempt ended.
    pub finished: Option<UnixMicros>,
    /// When a client deleted it.
    pub deleted: Option<UnixMicros>,
}

/// A stored job, as clients may see it (env values blanked).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub job_id: JobId,
    /// The spec as accepted, env values blanked.
    pub spec: v1::JobSpec,
    /// Its state, reason, attempt and placement.
    pub status: Status,
    /// Sequence of its latest event.
    pub sequence: u64,
    /// Latest word from the backend.
    pub message: String,
    /// When a client asked to cancel it while placed, and why; cleared by a new attempt.
    pub cancel_requested: Option<(UnixMicros, String)>,
    /// What stage-out delivered.
    pub outputs: Option<v1::TreeSummary>,
    /// Its times.
    pub times: JobTimes,
    revision: i64,
}

impl JobRecord {
    /// The job on the wire, as `GetJob` answers it.
    pub fn to_wire(&self) -> v1::Job {
        // The stored spec passed the door when it was accepted; building the command
        // again from it cannot fail unless the rules tightened since, and then the
        // record is still shown, without a command.
        let command = JobSpec::try_from(self.spec.clone())
            .map(|spec| spec.command())
            .unwrap_or_default();
        let site = self.status.site.as_ref();
        v1::Job {
            spec: Some(self.spec.clone()),
            state: v1::JobState::from(self.status.state).into(),
            reason: Some(v1::StateReason::from(&self.status.reason)),
            site_id: site.map(|s| s.site_id.clone()).unwrap_or_default(),
            manager_id: site.map(|s| s.manager_id.clone()).unwrap_or_default(),
            attempt: self.status.attempt,
            sequence: self.sequence,
            command,
            message: self.message.clone(),
            submitted_at: Some(self.times.created.to_proto()),
            staging_in_at: self.times.staging_in.map(UnixMicros::to_proto),
            running_at: self.times.running.map(UnixMicros::to_proto),
            staging_out_at: self.times.staging_out.map(UnixMicros::to_proto),
            finished_at: self.times.finished.map(UnixMicros::to_proto),
            updated_at: Some(self.times.updated.to_proto()),
            outputs: self.outputs.clone(),
            deleted_at: self.times.deleted.map(UnixMicros::to_proto),
        }
    }
}

/// One stored state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Its place in the global log.
    pub sequence: u64,
    /// The job that changed.
    pub job_id: String,
    /// The attempt it belongs to.
    pub attempt: u32,
    /// The state entered.
    pub state: JobState,
    /// Why.
    pub reason: Reason,
    /// Where the job was placed, if anywhere.
    pub site_id: Option<String>,
    /// When the state was entered.
    pub occurred_at: UnixMicros,
}

impl EventRecord {
    /// The event on the wire, as `WatchJobs` streams it.
    pub fn to_wire(&self) -> v1::JobEvent {
        v1::JobEvent {
            job_id: self.job_id.clone(),
            sequence: self.sequence,
            state: v1::JobState::from(self.state).into(),
            reason: Some(v1::StateReason::from(&self.reason)),
            time: Some(self.occurred_at.to_proto()),
            site_id: self.site_id.clone().unwrap_or_default(),
            attempt: self.attempt,
        }
    }
}

/// What a submission did.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The stored job.
    pub job: JobRecord,
    /// True when something new started: a new job, or a new attempt of a failed one.
    /// False for a replay of a job already stored.
    pub created: bool,
}

/// What a deletion did.
#[derive(Debug, Clone)]
pub struct Deleted {
    /// The job after the deletion; `None` when purged.
    pub job: Option<JobRecord>,
    /// True when the record is gone.
    pub purged: bool,
}

/// Which jobs to list. Filters combine with AND.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only jobs in one of these states; empty: any.
    pub states: Vec<JobState>,
    /// Only jobs carrying all of these labels.
    pub labels: Labels,
    /// Only jobs placed at this site.
    pub site_id: Option<String>,
    /// Only jobs of this user.
    pub auid: Option<String>,
}

/// Where a page of `ListJobs` starts: just after this job in newest-first order. A
/// position in the order rather than an offset, so pages do not shift when jobs are
/// added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    created: i64,
    job_id: String,
}

impl PageKey {
    /// The opaque token handed to clients.
    pub fn to_token(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.created, self.job_id))
    }

    /// Reads a token made by [`PageKey::to_token`].
    pub fn from_token(token: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (created, job_id) = raw.split_once(':')?;
        let job_id = JobId::parse(job_id).ok()?;
        Some(Self {
            created: created.parse().ok()?,
            job_id: job_id.into(),
        })
    }
}

/// One page of jobs.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<JobRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageKey>,
}

/// Which events to stream. Filters combine with AND.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only these jobs; empty: all.
    pub job_ids: Vec<String>,
    /// Only events entering one of these states; empty: any.
    pub states: Vec<JobState>,
    /// Only jobs carrying all of these labels.
    pub labels: Labels,
    /// Only events of jobs placed at this site.
    pub site_id: Option<String>,
}

/// The durable job store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections that write: one for SQLite, the shared pool for PostgreSQL.
    write: AnyPool,
    /// Submissions to the writer that commits them in batches (store/submit.rs).
    submissions: mpsc::Sender<submit::Queued>,
    /// Cancelled when the store closes: the writer finishes what is queued and stops.
    closing: CancellationToken,
    /// The writer.
    tasks: Tasks,
    /// Connections that only read.
    read: AnyPool,
    sealer: EnvSealer,
    /// The newest committed event sequence.
    head: watch::Sender<u64>,
    /// Events up to this sequence were pruned.
    pruned_through: AtomicU64,
    described: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("database", &self.inner.described)
            .finish_non_exhaustive()
    }
}

/// What went wrong inside one try of a write.
enum TxError {
    /// Another writer changed the job in between: try again.
    Conflict,
    /// Give up with this error.
    Fail(Error),
}

impl From<Error> for TxError {
    fn from(error: Error) -> Self {
        Self::Fail(error)
    }
}

impl From<sqlx::Error> for TxError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            // Two writers inserting one job id at once (PostgreSQL): the loser reads the
            // winner's row on its next try.
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict,
            _ => Self::Fail(error.into()),
        }
    }
}

type Tx = Transaction<'static, Any>;

/// What a successful write try hands back: its result and the newest event it wrote.
struct Written<T> {
    value: T,
    sequence: Option<u64>,
}

impl<T> Written<T> {
    fn quiet(value: T) -> Self {
        Self {
            value,
            sequence: None,
        }
    }
}

/// Runs one write operation (`$try`, an expression using the transaction `$tx`) until it
/// commits or fails for good, then publishes the event it wrote. A macro rather than a
/// function because the operation borrows the transaction across awaits.
macro_rules! write_with_retries {
    ($store:expr, $job:expr, |$tx:ident| $try:expr) => {{
        let store: &Store = $store;
        let mut outcome = None;
        for _ in 0..WRITE_ATTEMPTS {
            let mut tx = store.inner.write.begin().await?;
            let $tx = &mut tx;
            match $try.await {
                Ok(written) => {
                    tx.commit().await?;
                    outcome = Some(written);
                    break;
                }
                // Dropping the transaction rolls it back.
                Err(TxError::Conflict) => continue,
                Err(TxError::Fail(error)) => return Err(error),
            }
        }
        match outcome {
            Some(Written { value, sequence }) => {
                if let Some(sequence) = sequence {
                    store.publish(sequence);
                }
                value
            }
            None => return Err(Error::Contended($job.to_string())),
        }
    }};
}

mod dispatch;
mod sites;
mod submit;

pub use dispatch::{Placed, PlacementOrder, QueueKey, QueuedJob, ReportOutcome};
pub use sites::{NewJoinToken, Registered, Registration, SiteHealth, SiteRecord, UploadRecord};

impl Store {
    /// Opens (creating if need be) the database, brings its schema up to date, and
    /// reads where the event log stands.
    pub async fn open(database: &Database, sealer: EnvSealer) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (write, read) = match database {
            Database::Sqlite(path) => open_sqlite(path).await?,
            Database::Postgres(url) => {
                let options = AnyConnectOptions::from_str(url)
                    .map_err(|e| Error::Config(format!("database_url: {e}")))?;
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!("cannot reach {}: {e}", database.describe()))
                    })?;
                (pool.clone(), pool)
            }
        };
        migrator()
            .run(&write)
            .await
            .map_err(|e| Error::Store(format!("migrating {}: {e}", database.describe())))?;
        let row = sqlx::query("SELECT last_sequence, pruned_through FROM event_log WHERE id = 1")
            .fetch_one(&read)
            .await?;
        let head = to_u64(row.try_get("last_sequence")?, "event_log.last_sequence")?;
        let pruned = to_u64(row.try_get("pruned_through")?, "event_log.pruned_through")?;
        let (submissions, queue) = submit::queue();
        let store = Self {
            inner: Arc::new(Inner {
                write,
                submissions,
                closing: CancellationToken::new(),
                tasks: Tasks::new(),
                read,
                sealer,
                head: watch::Sender::new(head),
                pruned_through: AtomicU64::new(pruned),
                described: database.describe(),
            }),
        };
        let writer = submit::Writer {
            store: store.clone(),
            queue,
            closing: store.inner.closing.clone(),
        };
        store.inner.tasks.spawn("job store writer", writer.run());
        Ok(store)
    }

    /// Writes the submissions already handed over, refuses new ones, and closes every
    /// connection (SQLite then folds its WAL back into the database file).
    pub async fn close(&self) {
        self.inner.closing.cancel();
        self.inner.tasks.close_and_wait().await;
        self.inner.read.close().await;
        self.inner.write.close().await;
    }

    /// Accepts a checked spec. A new id is stored QUEUED. A known id with the same spec is
    /// a replay and returns the stored job; with another spec it is refused. With
    /// `retry_if_failed`, a job that ended FAILED, CANCELLED or LOST is started again as a
    /// new attempt, with the spec just sent (what pfcon does when CUBE resubmits).
    ///
    /// The submission is committed with whatever others are being submitted at the time
    /// (group commit, store/submit.rs), and this returns only once it is.
    pub async fn submit(&self, spec: &JobSpec, retry_if_failed: bool) -> Result<Submitted> {
        let submission = self.prepare_submission(spec, retry_if_failed)?;
        self.submit_through_writer(submission).await
    }

    /// One job, as stored.
    pub async fn get(&self, id: &JobId) -> Result<JobRecord> {
        select_job(&self.inner.read, id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// The spec to hand a site: the accepted spec with its real env values.
    pub async fn run_spec(&self, id: &JobId) -> Result<JobSpec> {
        let row = sqlx::query("SELECT spec, env_sealed FROM jobs WHERE job_id = $1")
            .bind(id.as_str().to_owned())
            .fetch_optional(&self.inner.read)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let mut wire = decode_spec(&row.try_get::<Vec<u8>, _>("spec")?)?;
        wire.env = self
            .inner
            .sealer
            .open(id.as_str(), &row.try_get::<Vec<u8>, _>("env_sealed")?)?;
        JobSpec::try_from(wire).map_err(|e| Error::Corrupt(format!("job `{id}` spec: {e}")))
    }

    /// Jobs, newest first, filtered, at most `page_size` of them after `after`.
    pub async fn list(
        &self,
        filter: &JobFilter,
        page_size: u32,
        after: Option<&PageKey>,
    ) -> Result<JobPage> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut sql = Sql::new(concat!("SELECT ", job_columns!(), " FROM jobs WHERE 1 = 1"));
        if !filter.states.is_empty() {
            sql.push(" AND state IN (");
            for (i, state) in filter.states.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_text(state.as_str());
            }
            sql.push(")");
        }
        if let Some(site_id) = &filter.site_id {
            sql.push(" AND site_id = ");
            sql.bind_text(site_id);
        }
        if let Some(auid) = &filter.auid {
            sql.push(" AND auid = ");
            sql.bind_text(auid);
        }
        sql.labels("jobs.job_id", &filter.labels);
        if let Some(key) = after {
            sql.push(" AND (created_at < ");
            sql.bind_int(key.created);
            sql.push(" OR (created_at = ");
            sql.bind_int(key.created);
            sql.push(" AND job_id < ");
            sql.bind_text(&key.job_id);
            sql.push("))");
        }
        sql.push(" ORDER BY created_at DESC, job_id DESC LIMIT ");
        sql.bind_int(i64::from(size) + 1);
        let rows = sql.fetch_all(&self.inner.read).await?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        let next = if jobs.len() > size as usize {
            jobs.truncate(size as usize);
            jobs.last().map(|job| PageKey {
                created: job.times.created.0,
                job_id: job.job_id.to_string(),
            })
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    /// Applies a state change (a placement, a site's report, a requeue, an end decided
    /// at the hub) and records its event, in one transaction. `observed_at` is when the
    /// site saw the change; `None`: now.
    pub async fn transition(
        &self,
        id: &JobId,
        transition: Transition,
        observed_at: Option<UnixMicros>,
    ) -> Result<JobRecord> {
        let job = write_with_retries!(self, id, |tx| self.try_transition(
            tx,
            id,
            &transition,
            observed_at
        ));
        Ok(job)
    }

    async fn try_transition(
        &self,
        tx: &mut Tx,
        id: &JobId,
        transition: &Transition,
        observed_at: Option<UnixMicros>,
    ) -> Result<Written<JobRecord>, TxError> {
        let stored = select_job(&mut **tx, id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let applied = state::apply(&stored.status, transition).map_err(|refusal| {
            Error::IllegalTransition {
                job_id: id.to_string(),
                refusal,
            }
        })?;
        let now = UnixMicros::now();
        let (job, sequence) =
            write_change(tx, &stored, applied, now, observed_at.unwrap_or(now)).await?;
        Ok(Written {
            value: job,
            sequence: Some(sequence),
        })
    }

    /// Cancels a job for a client: a queued one ends CANCELLED at once; for a placed one
    /// the request is recorded (its site is told to stop and confirms later); a finished
    /// one is returned unchanged.
    pub async fn cancel(&self, id: &JobId, message: &str) -> Result<JobRecord> {
        let job = write_with_retries!(self, id, |tx| self.try_cancel(tx, id, message));
        Ok(job)
    }

    async fn try_cancel(
        &self,
        tx: &mut Tx,
        id: &JobId,
        message: &str,
    ) -> Result<Written<JobRecord>, TxError> {
        let stored = select_job(&mut **tx, id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        cancel_in(tx, stored, message).await
    }

    /// Cleans up after a job for a client: cancels it if still active and marks it
    /// deleted (its site's cleanup follows); with `purge`, forgets the record and its
    /// events, which needs the job to have ended. A purge of an id not stored answers
    /// `purged` (a replay after a lost response).
    pub async fn delete(&self, id: &JobId, purge: bool) -> Result<Deleted> {
        let deleted = write_with_retries!(self, id, |tx| self.try_delete(tx, id, purge));
        Ok(deleted)
    }

    async fn try_delete(
        &self,
        tx: &mut Tx,
        id: &JobId,
        purge: bool,
    ) -> Result<Written<Deleted>, TxError> {
        let Some(stored) = select_job(&mut **tx, id.as_str()).await? else {
            if purge {
                return Ok(Written::quiet(Deleted {
                    job: None,
                    purged: true,
                }));
            }
            return Err(Error::NotFound(id.to_string()).into());
        };
        let Written {
            value: mut job,
            sequence,
        } = cancel_in(tx, stored, "deleted by a client").await?;
        if purge {
            if !job.status.state.is_terminal() {
                return Err(Error::FailedPrecondition(format!(
                    "job `{id}` is still {} at site `{}`; its cancel is requested: purge it once it has ended",
                    job.status.state,
                    job.status.site.as_ref().map_or("", |s| s.site_id.as_str())
                ))
                .into());
            }
            for statement in [
                "DELETE FROM job_events WHERE job_id = $1",
                "DELETE FROM job_labels WHERE job_id = $1",
                "DELETE FROM report_sequences WHERE job_id = $1",
            ] {
                sqlx::query(statement)
                    .bind(id.as_str().to_owned())
                    .execute(&mut **tx)
                    .await?;
            }
            let removed = sqlx::query("DELETE FROM jobs WHERE job_id = $1 AND revision = $2")
                .bind(id.as_str().to_owned())
                .bind(job.revision)
                .execute(&mut **tx)
                .await?;
            if removed.rows_affected() != 1 {
                return Err(TxError::Conflict);
            }
            return Ok(Written {
                value: Deleted {
                    job: None,
                    purged: true,
                },
                sequence,
            });
        }
        if job.times.deleted.is_none() {
            let now = UnixMicros::now();
            let updated = sqlx::query(
                "UPDATE jobs SET deleted_at = $1, updated_at = $1, revision = revision + 1 \
                 WHERE job_id = $2 AND revision = $3",
            )
            .bind(now.0)
            .bind(id.as_str().to_owned())
            .bind(job.revision)
            .execute(&mut **tx)
            .await?;
            if updated.rows_affected() != 1 {
                return Err(TxError::Conflict);
            }
            job.times.deleted = Some(now);
            job.times.updated = now;
            job.revision += 1;
        }
        Ok(Written {
            value: Deleted {
                job: Some(job),
                purged: false,
            },
            sequence,
        })
    }

    /// The newest committed event sequence, as last published.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// Events up to this sequence have been pruned from the log.
    pub fn pruned_through(&self) -> u64 {
        self.inner.pruned_through.load(Ordering::SeqCst)
    }

    /// Told the newest committed sequence after every commit that wrote events.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    fn publish(&self, sequence: u64) {
        self.inner.head.send_if_modified(|head| {
            let newer = sequence > *head;
            if newer {
                *head = sequence;
            }
            newer
        });
    }

    /// Stored events with `after < sequence <= up_to` that pass `filter`, oldest first,
    /// at most `limit`.
    pub async fn events(
        &self,
        after: u64,
        up_to: u64,
        filter: &EventFilter,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let mut sql = Sql::new(
            "SELECT sequence, job_id, attempt, state, reason_code, reason_message, exit_code, \
             site_id, occurred_at FROM job_events WHERE sequence > ",
        );
        sql.bind_int(to_i64(after));
        sql.push(" AND sequence <= ");
        sql.bind_int(to_i64(up_to));
        if !filter.job_ids.is_empty() {
            sql.push(" AND job_id IN (");
            for (i, job_id) in filter.job_ids.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_text(job_id);
            }
            sql.push(")");
        }
        if !filter.states.is_empty() {
            sql.push(" AND state IN (");
            for (i, state) in filter.states.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_text(state.as_str());
            }
            sql.push(")");
        }
        if let Some(site_id) = &filter.site_id {
            sql.push(" AND site_id = ");
            sql.bind_text(site_id);
        }
        sql.labels("job_events.job_id", &filter.labels);
        sql.push(" ORDER BY sequence LIMIT ");
        sql.bind_int(limit);
        let rows = sql.fetch_all(&self.inner.read).await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Every stored event of one job, oldest first (for tests and diagnostics).
    pub async fn job_events(&self, id: &JobId) -> Result<Vec<EventRecord>> {
        let filter = EventFilter {
            job_ids: vec![id.to_string()],
            ..EventFilter::default()
        };
        self.events(0, u64::MAX >> 1, &filter, i64::MAX).await
    }

    /// Forgets the events up to `sequence` (never past the newest), so the log does not
    /// grow forever; watchers asking for them afterwards are told they are gone. Returns
    /// how many were removed.
    pub async fn prune_events_through(&self, sequence: u64) -> Result<u64> {
        let mut tx = self.inner.write.begin().await?;
        let row = sqlx::query("SELECT last_sequence, pruned_through FROM event_log WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let head = to_u64(row.try_get("last_sequence")?, "event_log.last_sequence")?;
        let pruned = to_u64(row.try_get("pruned_through")?, "event_log.pruned_through")?;
        let through = sequence.min(head);
        if through <= pruned {
            return Ok(0);
        }
        let removed = sqlx::query("DELETE FROM job_events WHERE sequence <= $1")
            .bind(to_i64(through))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE event_log SET pruned_through = $1 WHERE id = 1")
            .bind(to_i64(through))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.inner
            .pruned_through
            .fetch_max(through, Ordering::SeqCst);
        Ok(removed)
    }

    /// Checks that the events after `after` can be streamed: none of them pruned, and
    /// `after` not beyond the newest event (a client holding a sequence from another
    /// store would otherwise wait forever).
    pub fn check_replay_from(&self, after: u64) -> Result<()> {
        let pruned = self.pruned_through();
        if after < pruned {
            return Err(Error::OutOfRange(format!(
                "events up to sequence {pruned} were pruned from the log; list the jobs to catch up, then watch from sequence {pruned}"
            )));
        }
        let head = self.head();
        if after > head {
            return Err(Error::OutOfRange(format!(
                "after_sequence {after} is beyond the newest event ({head}); it comes from another coordinator's log"
            )));
        }
        Ok(())
    }

    /// Stored events after `after` that pass `filter`, then new ones as they are
    /// committed, until `stop` is cancelled (the stream then ends with UNAVAILABLE, so the
    /// client resumes from the last sequence it saw) or the events it needs are pruned
    /// (OUT_OF_RANGE).
    pub fn follow(
        &self,
        after: u64,
        filter: EventFilter,
        stop: CancellationToken,
    ) -> impl Stream<Item = Result<EventRecord>> + Send + 'static {
        let feed = Feed {
            store: self.clone(),
            filter,
            last: after,
            buffer: VecDeque::new(),
            head: self.subscribe(),
            stop,
            done: false,
        };
        futures::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        })
    }
}

/// A watcher's position in the event log.
struct Feed {
    store: Store,
    filter: EventFilter,
    /// Every event up to here has been looked at.
    last: u64,
    buffer: VecDeque<EventRecord>,
    head: watch::Receiver<u64>,
    stop: CancellationToken,
    done: bool,
}

impl Feed {
    async fn next(&mut self) -> Option<Result<EventRecord>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.buffer.pop_front() {
                return Some(Ok(event));
            }
            if self.store.pruned_through() > self.last {
                self.done = true;
                return Some(Err(Error::OutOfRange(format!(
                    "events after sequence {} were pruned before this watcher read them; list the jobs to catch up",
                    self.last
                ))));
            }
            // Everything up to the published head is committed (events commit in
            // sequence order), so reading up to it misses nothing.
            let head = *self.head.borrow_and_update();
            if head > self.last {
                match self
                    .store
                    .events(self.last, head, &self.filter, EVENT_BATCH)
                    .await
                {
                    Ok(events) => {
                        self.last = match events.last() {
                            Some(event) if events.len() as i64 == EVENT_BATCH => event.sequence,
                            _ => head,
                        };
                        self.buffer.extend(events);
                        continue;
                    }
                    Err(error) => {
                        self.done = true;
                        return Some(Err(error));
                    }
                }
            }
            let last = self.last;
            tokio::select! {
                changed = self.head.wait_for(|head| *head > last) => {
                    if changed.is_err() {
                        self.done = true;
                        return Some(Err(Error::Unavailable("the job store closed".into())));
                    }
                }
                () = self.stop.cancelled() => {
                    self.done = true;
                    return Some(Err(Error::Unavailable(format!(
                        "the coordinator is shutting down; watch again with after_sequence {last}"
                    ))));
                }
            }
        }
    }
}

/// Cancels `stored` within `tx` (see [`Store::cancel`]).
async fn cancel_in(
    tx: &mut Tx,
    stored: JobRecord,
    message: &str,
) -> Result<Written<JobRecord>, TxError> {
    let state = stored.status.state;
    if state.is_terminal() {
        return Ok(Written::quiet(stored));
    }
    if state == JobState::Queued {
        let applied = state::apply(
            &stored.status,
            &Transition::Enter {
                to: JobState::Cancelled,
                reason: Reason::cancelled(message),
                attempt: None,
                site: None,
            },
        )
        .map_err(|refusal| Error::IllegalTransition {
            job_id: stored.job_id.to_string(),
            refusal,
        })?;
        let now = UnixMicros::now();
        let (job, sequence) = write_change(tx, &stored, applied, now, now).await?;
        return Ok(Written {
            value: job,
            sequence: Some(sequence),
        });
    }
    // Placed: the site must stop it first. Recorded once; later requests change nothing.
    if stored.cancel_requested.is_some() {
        return Ok(Written::quiet(stored));
    }
    let now = UnixMicros::now();
    let message = Reason::cancelled(message).message;
    let updated = sqlx::query(
        "UPDATE jobs SET cancel_requested_at = $1, cancel_message = $2, updated_at = $1, \
         revision = revision + 1 WHERE job_id = $3 AND revision = $4",
    )
    .bind(now.0)
    .bind(message.clone())
    .bind(stored.job_id.as_str().to_owned())
    .bind(stored.revision)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(TxError::Conflict);
    }
    let mut job = stored;
    job.status.cancel_requested = true;
    job.cancel_requested = Some((now, message));
    job.times.updated = now;
    job.revision += 1;
    Ok(Written::quiet(job))
}

/// Sets a job's labels to `labels`.
async fn replace_labels(tx: &mut Tx, id: &str, labels: &Labels) -> Result<(), TxError> {
    sqlx::query("DELETE FROM job_labels WHERE job_id = $1")
        .bind(id.to_owned())
        .execute(&mut **tx)
        .await?;
    insert_labels(tx, id, labels).await
}

/// Gives a job that has none the labels `labels`.
async fn insert_labels(tx: &mut Tx, id: &str, labels: &Labels) -> Result<(), TxError> {
    if labels.is_empty() {
        return Ok(());
    }
    let mut sql = Sql::new("INSERT INTO job_labels (job_id, label_key, label_value) VALUES ");
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.push("(");
        sql.bind_text(id);
        sql.push(", ");
        sql.bind_text(key);
        sql.push(", ");
        sql.bind_text(value);
        sql.push(")");
    }
    sql.execute(&mut **tx).await?;
    Ok(())
}

/// What a site's report adds to a state change besides the state: the backend's latest
/// word and, with the terminal report, what stage-out delivered.
#[derive(Debug, Clone, Default)]
struct Details {
    message: Option<String>,
    outputs: Option<v1::TreeSummary>,
}

/// Writes an accepted change to `stored` and its event: the only place a job's state is
/// written after it was inserted. Returns the job as it now is and the event's sequence.
async fn write_change(
    tx: &mut Tx,
    stored: &JobRecord,
    applied: state::Applied,
    now: UnixMicros,
    occurred_at: UnixMicros,
) -> Result<(JobRecord, u64), TxError> {
    let job = update_job_row(tx, stored, applied, now, occurred_at, &Details::default()).await?;
    let sequence = record_event(tx, &job, occurred_at, now).await?;
    let job = JobRecord { sequence, ..job };
    Ok((job, sequence))
}

/// The first half of [`write_change`]: the job's row, under the revision read (taking the
/// row's lock). Writers that change several jobs in one transaction update every row
/// first and take event sequences after, so the lock order (job rows, then the event log)
/// is the same in every writer and two never wait for each other in a circle.
async fn update_job_row(
    tx: &mut Tx,
    stored: &JobRecord,
    applied: state::Applied,
    now: UnixMicros,
    occurred_at: UnixMicros,
    details: &Details,
) -> Result<JobRecord, TxError> {
    let status = applied.status;
    let mut times = stored.times.clone();
    let mut outputs = stored.outputs.clone();
    let mut message = stored.message.clone();
    let mut cancel_requested = stored.cancel_requested.clone();
    if applied.new_attempt {
        // A new attempt starts afresh: what the old one did is in the event log.
        times.staging_in = None;
        times.running = None;
        times.staging_out = None;
        times.finished = None;
        outputs = None;
        message.clear();
        cancel_requested = None;
    }
    if let Some(said) = &details.message {
        message.clone_from(said);
    }
    if details.outputs.is_some() {
        outputs.clone_from(&details.outputs);
    }
    match status.state {
        JobState::Queued => times.queued = occurred_at,
        JobState::StagingIn => times.staging_in = Some(occurred_at),
        JobState::Running => times.running = Some(occurred_at),
        JobState::StagingOut => times.staging_out = Some(occurred_at),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost => {
            times.finished = Some(occurred_at);
        }
    }
    times.updated = now;
    let site = status.site.as_ref();
    // Taken first: the job's row lock before the event log's, in every writer, so two
    // writers never wait for each other in a circle.
    let updated = sqlx::query(
        "UPDATE jobs SET state = $1, reason_code = $2, reason_message = $3, exit_code = $4, \
         message = $5, site_id = $6, manager_id = $7, attempt = $8, revision = revision + 1, \
         cancel_requested_at = $9, cancel_message = $10, outputs = $11, updated_at = $12, \
         queued_at = $13, staging_in_at = $14, running_at = $15, staging_out_at = $16, \
         finished_at = $17 WHERE job_id = $18 AND revision = $19",
    )
    .bind(status.state.as_str())
    .bind(status.reason.code.as_str_name())
    .bind(status.reason.message.clone())
    .bind(status.reason.exit_code.map(i64::from))
    .bind(message.clone())
    .bind(site.map(|s| s.site_id.clone()))
    .bind(site.map(|s| s.manager_id.clone()))
    .bind(i64::from(status.attempt))
    .bind(cancel_requested.as_ref().map(|(at, _)| at.0))
    .bind(cancel_requested.as_ref().map(|(_, why)| why.clone()))
    .bind(outputs.as_ref().map(prost::Message::encode_to_vec))
    .bind(times.updated.0)
    .bind(times.queued.0)
    .bind(times.staging_in.map(|t| t.0))
    .bind(times.running.map(|t| t.0))
    .bind(times.staging_out.map(|t| t.0))
    .bind(times.finished.map(|t| t.0))
    .bind(stored.job_id.as_str().to_owned())
    .bind(stored.revision)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(TxError::Conflict);
    }
    Ok(JobRecord {
        job_id: stored.job_id.clone(),
        spec: stored.spec.clone(),
        status,
        sequence: stored.sequence,
        message,
        cancel_requested,
        outputs,
        times,
        revision: stored.revision + 1,
    })
}

/// The second half of [`write_change`]: the event of the state `job` is now in, under
/// the next sequence. Returns the sequence.
async fn record_event(
    tx: &mut Tx,
    job: &JobRecord,
    occurred_at: UnixMicros,
    now: UnixMicros,
) -> Result<u64, TxError> {
    let sequence = next_sequence(tx).await?;
    sqlx::query("UPDATE jobs SET sequence = $1 WHERE job_id = $2")
        .bind(to_i64(sequence))
        .bind(job.job_id.as_str().to_owned())
        .execute(&mut **tx)
        .await?;
    insert_event(
        tx,
        job.job_id.as_str(),
        &job.status,
        sequence,
        occurred_at,
        now,
    )
    .await?;
    Ok(sequence)
}

/// Rows written by one multi-row statement, at most: well within both databases' limits
/// on bound values (SQLite's 32,766, PostgreSQL's 65,535) for any table here.
const ROWS_PER_STATEMENT: usize = 200;

/// The events of the states `jobs` are now in, numbered in order with one step of the
/// event log (its row locked until the transaction ends, as in [`next_sequence`]) and
/// written a few hundred to a statement; each job's `sequence` is set to its event's.
/// Writers that change several jobs call this once every job row is written. Returns the
/// newest sequence, if any event was written.
async fn record_events(
    tx: &mut Tx,
    mut jobs: Vec<&mut JobRecord>,
    occurred_at: UnixMicros,
    now: UnixMicros,
) -> Result<Option<u64>, TxError> {
    let Ok(count) = i64::try_from(jobs.len()) else {
        return Err(Error::Store("too many events for one transaction".into()).into());
    };
    if count == 0 {
        return Ok(None);
    }
    let row = sqlx::query(
        "UPDATE event_log SET last_sequence = last_sequence + $1 WHERE id = 1 \
         RETURNING last_sequence",
    )
    .bind(count)
    .fetch_one(&mut **tx)
    .await?;
    let newest = to_u64(row.try_get("last_sequence")?, "event_log.last_sequence")?;
    let first = newest + 1 - count.unsigned_abs();
    for (sequence, job) in (first..).zip(jobs.iter_mut()) {
        job.sequence = sequence;
    }
    for chunk in jobs.chunks(ROWS_PER_STATEMENT) {
        let mut numbered = Sql::new("UPDATE jobs SET sequence = CASE job_id");
        for job in chunk {
            numbered.push(" WHEN ");
            numbered.bind_text(job.job_id.as_str());
            numbered.push(" THEN CAST(");
            numbered.bind_int(to_i64(job.sequence));
            numbered.push(" AS BIGINT)");
        }
        numbered.push(" END WHERE job_id IN ");
        numbered.list(chunk, |sql, job| sql.bind_text(job.job_id.as_str()));
        numbered.execute(&mut **tx).await?;
        let mut events = Sql::new(
            "INSERT INTO job_events (sequence, job_id, attempt, state, reason_code, \
             reason_message, exit_code, site_id, occurred_at, recorded_at) VALUES ",
        );
        for (i, job) in chunk.iter().enumerate() {
            if i > 0 {
                events.push(", ");
            }
            let status = &job.status;
            events.push("(");
            events.bind_int(to_i64(job.sequence));
            events.push(", ");
            events.bind_text(job.job_id.as_str());
            events.push(", ");
            events.bind_int(i64::from(status.attempt));
            events.push(", ");
            events.bind_text(status.state.as_str());
            events.push(", ");
            events.bind_text(status.reason.code.as_str_name());
            events.push(", ");
            events.bind_text(&status.reason.message);
            events.push(", ");
            events.bind_optional_int(status.reason.exit_code.map(i64::from));
            events.push(", ");
            events.bind_optional_text(status.site.as_ref().map(|s| s.site_id.clone()));
            events.push(", ");
            events.bind_int(occurred_at.0);
            events.push(", ");
            events.bind_int(now.0);
            events.push(")");
        }
        events.execute(&mut **tx).await?;
    }
    Ok(Some(newest))
}

/// Takes the next event sequence. The row stays locked until the transaction ends, which
/// is what makes events commit in sequence order.
async fn next_sequence(tx: &mut Tx) -> Result<u64, TxError> {
    let row = sqlx::query(
        "UPDATE event_log SET last_sequence = last_sequence + 1 WHERE id = 1 \
         RETURNING last_sequence",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(to_u64(
        row.try_get("last_sequence")?,
        "event_log.last_sequence",
    )?)
}

async fn insert_event(
    tx: &mut Tx,
    job_id: &str,
    status: &Status,
    sequence: u64,
    occurred_at: UnixMicros,
    recorded_at: UnixMicros,
) -> Result<(), TxError> {
    sqlx::query(
        "INSERT INTO job_events (sequence, job_id, attempt, state, reason_code, reason_message, \
         exit_code, site_id, occurred_at, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(to_i64(sequence))
    .bind(job_id.to_owned())
    .bind(i64::from(status.attempt))
    .bind(status.state.as_str())
    .bind(status.reason.code.as_str_name())
    .bind(status.reason.message.clone())
    .bind(status.reason.exit_code.map(i64::from))
    .bind(status.site.as_ref().map(|s| s.site_id.clone()))
    .bind(occurred_at.0)
    .bind(recorded_at.0)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn select_job<'e>(
    executor: impl sqlx::Executor<'e, Database = Any>,
    id: &str,
) -> Result<Option<JobRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE job_id = $1"
    ))
    .bind(id.to_owned())
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    let text = |name: &str| -> Result<String> { Ok(row.try_get::<String, _>(name)?) };
    let optional_text =
        |name: &str| -> Result<Option<String>> { Ok(row.try_get::<Option<String>, _>(name)?) };
    let int = |name: &str| -> Result<i64> { Ok(row.try_get::<i64, _>(name)?) };
    let time = |name: &str| -> Result<Option<UnixMicros>> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(UnixMicros))
    };
    let job_id = text("job_id")?;
    let corrupt = |what: &str| Error::Corrupt(format!("job `{job_id}`: {what}"));
    let id = JobId::parse(&job_id).map_err(|e| corrupt(&e.to_string()))?;
    let spec = decode_spec(&row.try_get::<Vec<u8>, _>("spec")?)?;
    let state = JobState::from_str(&text("state")?).map_err(|e| corrupt(&e))?;
    let reason = reason_from(
        &text("reason_code")?,
        text("reason_message")?,
        row.try_get::<Option<i64>, _>("exit_code")?,
    )
    .map_err(|e| corrupt(&e))?;
    let site = optional_text("site_id")?.map(|site_id| SiteRef {
        site_id,
        manager_id: optional_text("manager_id")
            .ok()
            .flatten()
            .unwrap_or_default(),
    });
    let cancel_requested = match time("cancel_requested_at")? {
        Some(at) => Some((at, optional_text("cancel_message")?.unwrap_or_default())),
        None => None,
    };
    let outputs = row
        .try_get::<Option<Vec<u8>>, _>("outputs")?
        .map(|bytes| v1::TreeSummary::decode(bytes.as_slice()))
        .transpose()
        .map_err(|e| corrupt(&format!("outputs: {e}")))?;
    let attempt = u32::try_from(int("attempt")?).map_err(|_| corrupt("attempt"))?;
    Ok(JobRecord {
        status: Status {
            state,
            reason,
            attempt,
            site,
            cancel_requested: cancel_requested.is_some(),
        },
        sequence: to_u64(int("sequence")?, "jobs.sequence")?,
        message: text("message")?,
        cancel_requested,
        outputs,
        times: JobTimes {
            created: UnixMicros(int("created_at")?),
            updated: UnixMicros(int("updated_at")?),
            queued: UnixMicros(int("queued_at")?),
            staging_in: time("staging_in_at")?,
            running: time("running_at")?,
            staging_out: time("staging_out_at")?,
            finished: time("finished_at")?,
            deleted: time("deleted_at")?,
        },
        revision: int("revision")?,
        job_id: id,
        spec,
    })
}

fn event_from_row(row: &AnyRow) -> Result<EventRecord> {
    let sequence = to_u64(row.try_get("sequence")?, "job_events.sequence")?;
    let corrupt = |what: String| Error::Corrupt(format!("event {sequence}: {what}"));
    let state = JobState::from_str(&row.try_get::<String, _>("state")?).map_err(corrupt)?;
    let reason = reason_from(
        &row.try_get::<String, _>("reason_code")?,
        row.try_get("reason_message")?,
        row.try_get::<Option<i64>, _>("exit_code")?,
    )
    .map_err(corrupt)?;
    let attempt = u32::try_from(row.try_get::<i64, _>("attempt")?)
        .map_err(|_| Error::Corrupt(format!("event {sequence}: attempt")))?;
    Ok(EventRecord {
        sequence,
        job_id: row.try_get("job_id")?,
        attempt,
        state,
        reason,
        site_id: row.try_get("site_id")?,
        occurred_at: UnixMicros(row.try_get("occurred_at")?),
    })
}

fn reason_from(code: &str, message: String, exit_code: Option<i64>) -> Result<Reason, String> {
    let code =
        v1::ReasonCode::from_str_name(code).ok_or_else(|| format!("reason code `{code}`"))?;
    let exit_code = exit_code
        .map(i32::try_from)
        .transpose()
        .map_err(|_| "exit code".to_owned())?;
    Ok(Reason {
        code,
        message,
        exit_code,
    })
}

fn decode_spec(bytes: &[u8]) -> Result<v1::JobSpec> {
    v1::JobSpec::decode(bytes).map_err(|e| Error::Corrupt(format!("spec: {e}")))
}

fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Corrupt(format!("{what} is negative")))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The names of the spec fields that differ, for a refused resubmission (never values:
/// env values may be secrets).
fn spec_differences(stored: &v1::JobSpec, new: &v1::JobSpec) -> Vec<&'static str> {
    let mut differs = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            differs.push(name);
        }
    };
    check("image", stored.image == new.image);
    check("entrypoint", stored.entrypoint == new.entrypoint);
    check("args", stored.args == new.args);
    check(
        "args_path_flags",
        stored.args_path_flags == new.args_path_flags,
    );
    check("plugin_type", stored.plugin_type == new.plugin_type);
    check("env", stored.env == new.env);
    check(
        "cpu_millicores",
        stored.cpu_millicores == new.cpu_millicores,
    );
    check("memory_mib", stored.memory_mib == new.memory_mib);
    check("gpus", stored.gpus == new.gpus);
    check("workers", stored.workers == new.workers);
    check("auid", stored.auid == new.auid);
    check("storage_mode", stored.storage_mode == new.storage_mode);
    check("inputs", stored.inputs == new.inputs);
    check("output_dir", stored.output_dir == new.output_dir);
    check("labels", stored.labels == new.labels);
    check(
        "time_limit_seconds",
        stored.time_limit_seconds == new.time_limit_seconds,
    );
    check("priority", stored.priority == new.priority);
    check("placement", stored.placement == new.placement);
    differs
}

/// WAL pages past which the commit that crosses them copies the WAL into the database
/// file (SQLite's `wal_autocheckpoint`), before anyone in its batch is answered. SQLite's
/// default, 1,000 pages, came every few dozen batches at a few pages a job, and those
/// checkpoints made most of the submission latency's p99 (17 ms against 6 ms in the load
/// benchmark). Ten times more means rarer, larger checkpoints and less copying in all
/// (a page written by many commits is copied once), for a WAL of up to about 40 MiB.
/// Checkpointing on a connection of its own instead was tried and was worse: its syncs
/// landed beside the writer's, several times a second.
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// SQLite: the file (created if missing) in WAL mode, one writer connection syncing every
/// commit, and read-only connections beside it.
async fn open_sqlite(path: &Path) -> Result<(AnyPool, AnyPool)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", parent.display())))?;
    }
    let url = sqlite_url(path)?;
    let options =
        AnyConnectOptions::from_str(&url).map_err(|e| Error::Config(format!("{url}: {e}")))?;
    let unavailable =
        |e: sqlx::Error| Error::Unavailable(format!("sqlite {}: {e}", path.display()));
    // A connection to a local file cannot go stale as a network one can: no ping before
    // each use (with SQLite every statement, a ping too, is a round trip to the
    // connection's thread).
    let write = AnyPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA synchronous = FULL").await?;
                // Statement journals (a savepoint's, a multi-row statement's) in memory
                // rather than a temporary file created and removed for every batch.
                conn.execute("PRAGMA temp_store = MEMORY").await?;
                conn.execute(AssertSqlSafe(format!(
                    "PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}"
                )))
                .await?;
                Ok(())
            })
        })
        .connect_with(options.clone())
        .await
        .map_err(unavailable)?;
    // WAL is a property of the file, set once; changing it needs the only connection.
    let mode: String = sqlx::query("PRAGMA journal_mode = WAL")
        .fetch_one(&write)
        .await?
        .try_get(0)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Store(format!(
            "sqlite {}: cannot switch to WAL (journal mode stays {mode}); is it on a network filesystem?",
            path.display()
        )));
    }
    let read = AnyPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // A write through a reader would be a bug: make it fail loudly.
                conn.execute("PRAGMA query_only = ON").await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(unavailable)?;
    Ok((write, read))
}

/// `sqlite://<path>?mode=rwc`, with the characters the URL parser would misread escaped.
fn sqlite_url(path: &Path) -> Result<String> {
    let text = path.to_str().ok_or_else(|| {
        Error::Config(format!("the database path {} is not UTF-8", path.display()))
    })?;
    let mut url = String::from("sqlite://");
    for c in text.chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url.push_str("?mode=rwc");
    Ok(url)
}

/// A statement built from fixed text and bound values, with `$n` placeholders (which
/// both SQLite and PostgreSQL read); no value is ever spliced into the text.
struct Sql {
    text: String,
    binds: Vec<Bind>,
}

enum Bind {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    OptionalInt(Option<i64>),
    OptionalText(Option<String>),
}

impl Sql {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            binds: Vec::new(),
        }
    }

    fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn bind_int(&mut self, value: i64) {
        self.binds.push(Bind::Int(value));
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    fn bind_text(&mut self, value: &str) {
        self.binds.push(Bind::Text(value.to_owned()));
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    fn bind_bytes(&mut self, value: Vec<u8>) {
        self.binds.push(Bind::Bytes(value));
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    fn bind_optional_int(&mut self, value: Option<i64>) {
        self.binds.push(Bind::OptionalInt(value));
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    fn bind_optional_text(&mut self, value: Option<String>) {
        self.binds.push(Bind::OptionalText(value));
        self.text.push_str(&format!("${}", self.binds.len()));
    }

    /// `(`, each value bound by `bind` with commas between, `)`: one row of a multi-row
    /// insert, or an `IN` list.
    fn list<T>(&mut self, values: impl IntoIterator<Item = T>, mut bind: impl FnMut(&mut Self, T)) {
        self.push("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            bind(self, value);
        }
        self.push(")");
    }

    /// Keeps rows whose job (named by `job_column`) carries every label of `labels`.
    fn labels(&mut self, job_column: &str, labels: &Labels) {
        for (key, value) in labels.iter() {
            self.push(" AND EXISTS (SELECT 1 FROM job_labels WHERE job_labels.job_id = ");
            self.push(job_column);
            self.push(" AND label_key = ");
            self.bind_text(key);
            self.push(" AND label_value = ");
            self.bind_text(value);
            self.push(")");
        }
    }

    fn query(self) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        let mut query = sqlx::query(AssertSqlSafe(self.text));
        for bind in self.binds {
            query = match bind {
                Bind::Int(value) => query.bind(value),
                Bind::Text(value) => query.bind(value),
                Bind::Bytes(value) => query.bind(value),
                Bind::OptionalInt(value) => query.bind(value),
                Bind::OptionalText(value) => query.bind(value),
            };
        }
        query
    }

    async fn fetch_all<'e>(
        self,
        executor: impl sqlx::Executor<'e, Database = Any>,
    ) -> Result<Vec<AnyRow>> {
        Ok(self.query().fetch_all(executor).await?)
    }

    async fn execute<'e>(self, executor: impl sqlx::Executor<'e, Database = Any>) -> Result<()> {
        self.query().execute(executor).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_junk() {
        let key = PageKey {
            created: 1_700_000_000_123_456,
            job_id: "chris-jid-7".into(),
        };
        assert_eq!(PageKey::from_token(&key.to_token()), Some(key));
        assert_eq!(PageKey::from_token("not a token"), None);
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1:../x");
        assert_eq!(PageKey::from_token(&forged), None);
    }

    #[test]
    fn times_convert_to_protobuf() {
        let t = UnixMicros(1_500_000);
        assert_eq!(
            t.to_proto(),
            prost_types::Timestamp {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(UnixMicros::from_proto(&t.to_proto()), t);
        let before = UnixMicros(-1);
        assert_eq!(
            before.to_proto(),
            prost_types::Timestamp {
                seconds: -1,
                nanos: 999_999_000
            }
        );
        assert_eq!(UnixMicros::from_proto(&before.to_proto()), before);
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_and_syncs_every_commit() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let database = Database::Sqlite(dir.path().join("a dir/coordinator.db"));
        let store = Store::open(&database, EnvSealer::from_key([0; 32])).await?;
        let synchronous: i64 = sqlx::query("PRAGMA synchronous")
            .fetch_one(&store.inner.write)
            .await?
            .try_get(0)?;
        assert_eq!(synchronous, 2, "FULL");
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&store.inner.read)
            .await?
            .try_get(0)?;
        assert_eq!(mode, "wal");
        let through_reader = sqlx::query("DELETE FROM jobs")
            .execute(&store.inner.read)
            .await;
        assert!(through_reader.is_err(), "readers cannot write");
        store.close().await;
        Ok(())
    }

    #[test]
    fn sqlite_urls_escape_what_the_parser_reads() {
        assert_eq!(
            sqlite_url(Path::new("/data/a?b#c%d.db")).expect("url"),
            "sqlite:///data/a%3Fb%23c%25d.db?mode=rwc"
        );
    }
}

//! The Slurm backend: each job is one Slurm batch job, submitted with `sbatch` from the
//! host the manager runs on (an HPC login node, say), whose script runs the plugin through
//! a container runtime on the node (`docker run`, `podman run`, `apptainer exec`, or the
//! command itself: see [`Runtime`]), with the same mounts and command as every backend.
//!
//! It owns the Slurm jobs it submits and their directories (`<job_dir>/<job-id>/`: the
//! batch script, Slurm's output file, the exit code the script writes, and this backend's
//! records). A job is this manager's when its Slurm comment is
//! `chris-dispatch:<manager-id>:<job-id>` (its name is the job id), so a restarted manager
//! finds its jobs again with `squeue`. It must never cancel, read or remove a Slurm job
//! without that comment, nor a directory outside `job_dir`.
//!
//! # Resources
//!
//! CPU millicores become `--cpus-per-task` rounded up (Slurm allocates whole CPUs),
//! memory `--mem`, GPUs `--gres=gpu:N`, a time limit `--time` in minutes rounded up (the
//! manager stops the job at the exact limit; Slurm's is the backstop); partition,
//! account, QoS and extra flags come from [`SlurmConfig`]. Docker and Podman run their
//! containers outside the job's cgroup, so the exact CPU and memory limits are given to
//! them too, and the job's `--mem` gets room for the runtime's client
//! ([`SlurmConfig::runtime_memory_overhead_mib`]).
//!
//! # What it reports
//!
//! State comes from `squeue` (one query per [`SlurmConfig::query_interval_millis`] for all
//! of the manager's jobs, however many callers ask), exit codes from the exit file the
//! script writes or `scontrol`, and `sacct` once Slurm has forgotten a job, where
//! accounting exists ([`SlurmConfig::use_sacct`]). PENDING (with Slurm's reason in the
//! message, e.g. `PENDING (Resources)`) is QUEUED; RUNNING is RUNNING; COMPLETED is
//! SUCCEEDED; FAILED is FAILED with `EXIT_CODE` (or `OOM_KILLED` when the runtime flagged
//! it, or exit code 137 under a runtime memory limit); OUT_OF_MEMORY is `OOM_KILLED`;
//! TIMEOUT `TIME_LIMIT`; CANCELLED `CANCELLED`; NODE_FAIL `NODE_FAIL`; PREEMPTED
//! `PREEMPTED`. The first end seen is recorded in the job's directory, so it is still
//! reported once Slurm has forgotten the job; a job that Slurm forgot before its end was
//! seen, and that left no exit code, is LOST.
//!
//! Logs are Slurm's output file (so the job directory must be on a file system the
//! nodes share with this host); a followed log ends once the job has.
//!
//! A job's environment may hold secrets: it never goes on a command line a user of a
//! shared node could read with `ps` (Docker and Podman read it from an env file only its
//! owner can read, Apptainer from `APPTAINERENV_*` variables set by the batch script, whose
//! directory is private), except values with line breaks, which an env file cannot hold.
//!
//! The command-line tools are the only interface: they work on every Slurm a site runs.
//! `slurmrestd` is not used.

mod config;
mod logs;
mod record;
mod script;
mod slurm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dispatch_manager::backend::{
    Backend, BackendCapabilities, BackendError, JobRequest, LogStream, Observed, labels,
};
use dispatch_proto::JobId;
use dispatch_proto::job::{BackendKind, CpuMillis, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};

pub use crate::config::{Runtime, SlurmConfig};
use crate::record::{FINAL_FILE, FinalRecord, JobRecord, RECORD_FILE, read_json, write_json};
use crate::script::{OUTPUT_FILE, SCRIPT_FILE};
use crate::slurm::{SQUEUE_FORMAT, SlurmJob, Tools};

/// How long `kill` waits for Slurm to report the job ended.
const KILL_WAIT: Duration = Duration::from_secs(20);
/// How often `kill` looks.
const KILL_POLL: Duration = Duration::from_millis(250);

/// Jobs as Slurm batch jobs. See the crate documentation.
pub struct SlurmBackend {
    inner: Arc<Inner>,
}

struct Inner {
    manager_id: String,
    config: Arc<SlurmConfig>,
    job_dir: PathBuf,
    tools: Tools,
    euid: u32,
    /// The last `squeue` of this manager's jobs; held across a refresh, so callers wait for
    /// one query instead of each making their own.
    queue: tokio::sync::Mutex<QueueSnapshot>,
}

#[derive(Default)]
struct QueueSnapshot {
    taken: Option<Instant>,
    /// Slurm jobs by our job id (a job id may have several: an old ended one beside its
    /// resubmission).
    jobs: HashMap<String, Vec<SlurmJob>>,
}

impl SlurmBackend {
    /// Opens the backend for `manager_id` (it marks every Slurm job's comment): checks the
    /// settings and creates the job directory. Slurm itself is first asked in
    /// [`Backend::capabilities`], which the manager calls at start.
    pub fn open(manager_id: &str, config: SlurmConfig) -> Result<Self, BackendError> {
        check_manager_id(manager_id)?;
        config.check()?;
        let job_dir = config
            .job_dir
            .clone()
            .ok_or_else(|| BackendError::Unsupported {
                field: "slurm.job_dir",
                reason: "must be set (the manager defaults it to <state_dir>/slurm)".into(),
            })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&job_dir)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create [slurm] job_dir {}: {e}", job_dir.display()),
                )
            })?;
        // The batch script runs in the job's directory on a node: every path it names must
        // be absolute.
        let job_dir = std::path::absolute(&job_dir)?;
        let config = Arc::new(config);
        tracing::info!(
            manager_id,
            job_dir = %job_dir.display(),
            runtime = config.runtime.name(),
            partition = config.partition.as_deref().unwrap_or("(default)"),
            "slurm backend: jobs are submitted with sbatch"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                manager_id: manager_id.to_owned(),
                tools: Tools::new(config.clone()),
                config,
                job_dir,
                euid: rustix::process::geteuid().as_raw(),
                queue: tokio::sync::Mutex::new(QueueSnapshot::default()),
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &SlurmConfig {
        &self.inner.config
    }

    /// Where job `job_id`'s files are.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.inner.job_dir.join(job_id)
    }

    /// Slurm's id of the job, when this backend has one for it.
    pub async fn slurm_job_id(&self, job_id: &JobId) -> Result<Option<String>, BackendError> {
        Ok(self.inner.locate(job_id).await?.map(|found| found.slurm.id))
    }
}

/// A manager id goes into Slurm comments (`:`-separated) and file names.
fn check_manager_id(manager_id: &str) -> Result<(), BackendError> {
    let ok = !manager_id.is_empty()
        && manager_id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && manager_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BackendError::Unsupported {
            field: "manager_id",
            reason: format!(
                "`{manager_id}` cannot mark Slurm jobs: use letters, digits, `_`, `.` and `-`, \
                 starting with a letter or digit"
            ),
        })
    }
}

/// A job as found: its record (if its directory has one) and its Slurm job.
struct Found {
    record: Option<JobRecord>,
    slurm: SlurmJob,
}

impl Inner {
    fn dir(&self, job_id: &str) -> PathBuf {
        self.job_dir.join(job_id)
    }

    async fn record(&self, job_id: &str) -> Result<Option<JobRecord>, BackendError> {
        let record: Option<JobRecord> = read_json(&self.dir(job_id).join(RECORD_FILE)).await?;
        Ok(record.filter(|r| r.manager_id == self.manager_id && r.job_id == job_id))
    }

    /// This manager's Slurm jobs, by job id: from a `squeue` at most
    /// `query_interval_millis` old, or a new one (`fresh`: always a new one).
    async fn queue(&self, fresh: bool) -> Result<HashMap<String, Vec<SlurmJob>>, BackendError> {
        let mut snapshot = self.queue.lock().await;
        let interval = Duration::from_millis(self.config.query_interval_millis);
        let current = snapshot.taken.is_some_and(|at| at.elapsed() < interval);
        if fresh || !current {
            let args = [
                "--noheader".to_owned(),
                "--states=all".to_owned(),
                // `--me` would do, from Slurm 20.11 on.
                format!("--user={}", self.euid),
                format!("--format={SQUEUE_FORMAT}"),
            ];
            let text = self.tools.run("squeue", &args).await?;
            let prefix = script::comment_prefix(&self.manager_id);
            let mut jobs: HashMap<String, Vec<SlurmJob>> = HashMap::new();
            for job in text.lines().filter_map(slurm::parse_squeue_line) {
                let Some(job_id) = job.comment.strip_prefix(&prefix) else {
                    continue;
                };
                if job_id != job.name || JobId::parse(job_id).is_err() {
                    continue;
                }
                jobs.entry(job_id.to_owned()).or_default().push(job);
            }
            snapshot.jobs = jobs;
            snapshot.taken = Some(Instant::now());
        }
        Ok(snapshot.jobs.clone())
    }

    /// Forgets the last `squeue`, so the next status sees a change just made.
    async fn invalidate(&self) {
        self.queue.lock().await.taken = None;
    }

    /// `scontrol show job <id>`, if Slurm still knows it and it is ours.
    async fn scontrol(
        &self,
        slurm_id: &str,
        job_id: &str,
    ) -> Result<Option<SlurmJob>, BackendError> {
        let args = [
            "--oneliner".to_owned(),
            "show".to_owned(),
            "job".to_owned(),
            slurm_id.to_owned(),
        ];
        let ran = self.tools.run_raw("scontrol", &args).await?;
        if !ran.success {
            if ran.stderr.contains("Invalid job id") {
                return Ok(None);
            }
            return Err(slurm::failed("scontrol", &args, &ran));
        }
        let expected = script::comment(&self.manager_id, job_id);
        Ok(slurm::parse_scontrol(&ran.stdout).filter(|job| job.comment == expected))
    }

    /// `sacct` for a job Slurm's controller has forgotten, where configured.
    async fn sacct(&self, slurm_id: &str, job_id: &str) -> Result<Option<SlurmJob>, BackendError> {
        if !self.config.use_sacct {
            return Ok(None);
        }
        let args = [
            "--parsable2".to_owned(),
            "--noheader".to_owned(),
            "--allocations".to_owned(),
            format!("--jobs={slurm_id}"),
            "--format=JobID,State,ExitCode,Start,End,JobName,Comment".to_owned(),
        ];
        let text = self.tools.run("sacct", &args).await?;
        let expected = script::comment(&self.manager_id, job_id);
        Ok(slurm::parse_sacct(&text, slurm_id)
            .filter(|job| job.comment == expected || job.comment.is_empty()))
    }

    /// The job's Slurm job: the record's, else the newest one Slurm has under the job id
    /// (a job whose directory is gone only while it has not ended: its end was removed).
    async fn locate(&self, job_id: &JobId) -> Result<Option<Found>, BackendError> {
        let id = job_id.as_str();
        let record = self.record(id).await?;
        let queue = self.queue(false).await?;
        let candidates = queue.get(id).cloned().unwrap_or_default();
        if let Some(record) = record {
            if let Some(slurm) = candidates.into_iter().find(|j| j.id == record.slurm_job_id) {
                return Ok(Some(Found {
                    record: Some(record),
                    slurm,
                }));
            }
            // Submitted after the last squeue, or forgotten by the controller.
            let asked = match self.scontrol(&record.slurm_job_id, id).await? {
                Some(slurm) => Some(slurm),
                None => self.sacct(&record.slurm_job_id, id).await?,
            };
            return Ok(Some(Found {
                slurm: asked.unwrap_or_else(|| SlurmJob {
                    id: record.slurm_job_id.clone(),
                    ..SlurmJob::default()
                }),
                record: Some(record),
            }));
        }
        let dir_exists = tokio::fs::try_exists(self.dir(id)).await.unwrap_or(false);
        let newest = candidates
            .into_iter()
            .filter(|job| dir_exists || !slurm::is_terminal(&job.state))
            .max_by_key(|job| job.id.parse::<u64>().unwrap_or(0));
        Ok(newest.map(|slurm| Found {
            record: None,
            slurm,
        }))
    }

    /// What Slurm and the job's files say of the job now; `None`: no such job.
    async fn observe(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        let dir = self.dir(job_id.as_str());
        let finished: Option<FinalRecord> = read_json(&dir.join(FINAL_FILE)).await?;
        if let Some(finished) = finished {
            let record = self.record(job_id.as_str()).await?;
            return Ok(Some(observed_from_final(
                job_id,
                record.as_ref(),
                &finished,
                &self.manager_id,
            )));
        }
        let Some(found) = self.locate(job_id).await? else {
            return Ok(None);
        };
        let Found { record, mut slurm } = found;
        let files = record::end_files(&dir).await;
        if slurm.state.is_empty() {
            // Slurm no longer knows the job: its end is what the script left.
            let message = format!(
                "Slurm no longer knows job {} (it forgets ended jobs after MinJobAge)",
                slurm.id
            );
            let outcome = match files.exit_code {
                Some(0) => slurm::Outcome {
                    state: JobState::Succeeded,
                    reason: ReasonCode::ExitCode,
                    exit_code: Some(0),
                    message,
                },
                Some(code) => slurm::Outcome {
                    state: JobState::Failed,
                    reason: if files.oom {
                        ReasonCode::OomKilled
                    } else {
                        ReasonCode::ExitCode
                    },
                    exit_code: Some(code),
                    message,
                },
                None => slurm::Outcome {
                    state: JobState::Lost,
                    reason: ReasonCode::BackendError,
                    exit_code: None,
                    message: format!("{message}, and it left no exit code"),
                },
            };
            return Ok(Some(
                self.finish(job_id, record.as_ref(), &slurm, outcome).await,
            ));
        }
        if slurm::is_terminal(&slurm.state) && slurm.exit.is_none() && files.exit_code.is_none() {
            // squeue has no exit codes.
            if let Some(asked) = self.scontrol(&slurm.id, job_id.as_str()).await? {
                slurm = asked;
            }
        }
        let runtime_limits_memory = record
            .as_ref()
            .map_or(self.config.runtime.is_daemon(), |r| r.runtime_limits_memory);
        let outcome = slurm::outcome(&slurm, files, runtime_limits_memory);
        if slurm::is_terminal(&slurm.state) {
            return Ok(Some(
                self.finish(job_id, record.as_ref(), &slurm, outcome).await,
            ));
        }
        Ok(Some(observed(
            job_id,
            record.as_ref(),
            &slurm,
            outcome,
            &self.manager_id,
        )))
    }

    /// An ended job: records its end (so it outlives Slurm's memory of it) and reports it.
    async fn finish(
        &self,
        job_id: &JobId,
        record: Option<&JobRecord>,
        slurm: &SlurmJob,
        outcome: slurm::Outcome,
    ) -> Observed {
        let seen = observed(job_id, record, slurm, outcome, &self.manager_id);
        if record.is_some() {
            let finished = FinalRecord {
                slurm_job_id: slurm.id.clone(),
                state: seen.state as i32,
                reason: seen.reason as i32,
                exit_code: seen.exit_code,
                message: seen.message.clone(),
                started_at: seen.started_at,
                finished_at: seen.finished_at,
            };
            let path = self.dir(job_id.as_str()).join(FINAL_FILE);
            if let Err(error) = write_json(&path, &finished).await {
                tracing::warn!(job_id = %job_id, %error, "cannot record the job's end");
            }
        }
        seen
    }

    async fn check_image(&self, image: &str) -> Result<(), BackendError> {
        if !self.config.check_image {
            return Ok(());
        }
        let missing = |reason: String| BackendError::ImageNotFound {
            image: image.to_owned(),
            reason,
        };
        match self.config.runtime {
            Runtime::None => Ok(()),
            Runtime::Apptainer | Runtime::Singularity => {
                let reference = script::apptainer_image(image, &self.config);
                if reference.contains("://")
                    || tokio::fs::try_exists(&reference).await.unwrap_or(false)
                {
                    Ok(())
                } else {
                    Err(missing(format!("no image file {reference} on this host")))
                }
            }
            Runtime::Docker | Runtime::Podman => {
                let program = self.config.runtime_program().unwrap_or_default();
                let mut command = tokio::process::Command::new(&program);
                command
                    .args(["image", "inspect", "--format", "{{.Id}}", image])
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                let timeout = Duration::from_secs(self.config.command_timeout_seconds);
                let output = tokio::time::timeout(timeout, command.output())
                    .await
                    .map_err(|_| {
                        BackendError::Engine(format!(
                            "`{program} image inspect {image}` did not answer within {} s",
                            timeout.as_secs()
                        ))
                    })?
                    .map_err(|error| {
                        BackendError::Engine(format!(
                            "cannot run `{program}` to check the image ({error}); install it \
                             on this host or set [slurm] check_image = false"
                        ))
                    })?;
                if output.status.success() {
                    return Ok(());
                }
                let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                let lower = said.to_ascii_lowercase();
                if lower.contains("no such")
                    || lower.contains("not known")
                    || lower.contains("not found")
                {
                    Err(missing(format!(
                        "{program} on this host does not have it: {said}"
                    )))
                } else {
                    Err(BackendError::Engine(format!(
                        "`{program} image inspect {image}` failed: {said}"
                    )))
                }
            }
        }
    }

    /// True for a job directory a submit left behind without a job: no record, no Slurm
    /// job, and older than any submit in progress can be (a crash between claiming the
    /// directory and recording the job).
    async fn is_debris(&self, job_id: &JobId) -> Result<bool, BackendError> {
        let dir = self.dir(job_id.as_str());
        if tokio::fs::try_exists(dir.join(RECORD_FILE)).await? {
            return Ok(false);
        }
        let age = tokio::fs::metadata(&dir)
            .await?
            .modified()
            .ok()
            .and_then(|at| at.elapsed().ok())
            .unwrap_or_default();
        // A submit in progress runs the image check and sbatch, each within the timeout.
        let in_progress =
            Duration::from_secs(self.config.command_timeout_seconds.saturating_mul(3));
        if age < in_progress {
            return Ok(false);
        }
        Ok(self.locate(job_id).await?.is_none())
    }

    /// Sends `scancel` and waits until Slurm reports the job ended.
    async fn cancel_and_wait(&self, job_id: &JobId, slurm_id: &str) -> Result<(), BackendError> {
        let args = [slurm_id.to_owned()];
        let ran = self.tools.run_raw("scancel", &args).await?;
        if !ran.success
            && !ran.stderr.contains("already completing or completed")
            && !ran.stderr.contains("Invalid job id")
        {
            return Err(slurm::failed("scancel", &args, &ran));
        }
        self.invalidate().await;
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            match self.observe(job_id).await? {
                Some(seen) if !seen.is_finished() => {}
                _ => return Ok(()),
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Engine(format!(
                    "Slurm job {slurm_id} (job `{job_id}`) was cancelled but had not ended {} s later",
                    KILL_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(KILL_POLL).await;
        }
    }
}

fn base_labels(job_id: &JobId, manager_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (labels::MANAGER_ID.to_owned(), manager_id.to_owned()),
        (labels::JOB_ID.to_owned(), job_id.to_string()),
    ])
}

fn observed(
    job_id: &JobId,
    record: Option<&JobRecord>,
    slurm: &SlurmJob,
    outcome: slurm::Outcome,
    manager_id: &str,
) -> Observed {
    let terminal = matches!(
        outcome.state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    );
    // For a pending job squeue's start time is an estimate, and a running job's end time
    // its time limit: only what has happened is reported.
    let started_at = if outcome.state == JobState::Queued {
        None
    } else {
        slurm.start
    };
    let finished_at = if terminal {
        slurm.end.or(started_at).or_else(|| Some(SystemTime::now()))
    } else {
        None
    };
    let started_at = match (started_at, finished_at) {
        (Some(start), Some(end)) if start > end => Some(end),
        (start, _) => start,
    };
    Observed {
        job_id: job_id.clone(),
        state: outcome.state,
        reason: outcome.reason,
        exit_code: outcome.exit_code,
        message: outcome.message,
        image: record.map(|r| r.image.clone()).unwrap_or_default(),
        command: record.map(|r| r.command.clone()).unwrap_or_default(),
        started_at,
        finished_at,
        backend_name: format!("slurm job {}", slurm.id),
        labels: record.map_or_else(|| base_labels(job_id, manager_id), |r| r.labels.clone()),
    }
}

fn observed_from_final(
    job_id: &JobId,
    record: Option<&JobRecord>,
    finished: &FinalRecord,
    manager_id: &str,
) -> Observed {
    Observed {
        job_id: job_id.clone(),
        state: finished.state(),
        reason: finished.reason(),
        exit_code: finished.exit_code,
        message: finished.message.clone(),
        image: record.map(|r| r.image.clone()).unwrap_or_default(),
        command: record.map(|r| r.command.clone()).unwrap_or_default(),
        started_at: finished.started_at,
        finished_at: finished.finished_at,
        backend_name: format!("slurm job {}", finished.slurm_job_id),
        labels: record.map_or_else(|| base_labels(job_id, manager_id), |r| r.labels.clone()),
    }
}

/// What an `sbatch` refusal means for the caller.
fn sbatch_refused(error: BackendError) -> BackendError {
    let BackendError::Engine(text) = &error else {
        return error;
    };
    let never_fits = [
        "Requested node configuration is not available",
        "More processors requested than permitted",
        "Memory required by task is not available",
        "Requested time limit is invalid",
        "Invalid generic resource",
    ];
    let bad_setting = ["Invalid partition", "Invalid account", "Invalid qos"];
    if never_fits.iter().any(|needle| text.contains(needle)) {
        BackendError::Unsupported {
            field: "resources",
            reason: format!("the cluster can never run the job as asked: {text}"),
        }
    } else if bad_setting.iter().any(|needle| text.contains(needle)) {
        BackendError::Unsupported {
            field: "slurm",
            reason: format!("check [slurm] partition, account and qos: {text}"),
        }
    } else {
        error
    }
}

#[async_trait::async_trait]
impl Backend for SlurmBackend {
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError> {
        let inner = &self.inner;
        let mut args = vec!["--noheader".to_owned(), "--format=%n|%c|%m|%G".to_owned()];
        if let Some(partition) = &inner.config.partition {
            args.push(format!("--partition={partition}"));
        }
        let text = inner.tools.run("sinfo", &args).await?;
        let mut seen = BTreeSet::new();
        let (mut cpus, mut memory, mut gpus) = (0u64, 0u64, 0u64);
        for line in text.lines() {
            let fields: Vec<&str> = line.split('|').collect();
            if fields.len() < 4 || !seen.insert(fields[0].trim().to_owned()) {
                continue;
            }
            cpus += fields[1].trim().parse::<u64>().unwrap_or(0);
            memory += fields[2]
                .trim()
                .trim_end_matches('+')
                .parse::<u64>()
                .unwrap_or(0);
            gpus += gpu_count(fields[3]);
        }
        if seen.is_empty() {
            return Err(BackendError::Engine(format!(
                "`sinfo` lists no node{}: check [slurm] partition",
                inner
                    .config
                    .partition
                    .as_deref()
                    .map(|p| format!(" in partition `{p}`"))
                    .unwrap_or_default()
            )));
        }
        let version = inner.tools.run("sinfo", &["--version".to_owned()]).await?;
        Ok(BackendCapabilities {
            kind: BackendKind::Slurm,
            cpu: CpuMillis(u32::try_from(cpus.saturating_mul(1000)).unwrap_or(u32::MAX)),
            memory: MemoryMib(memory),
            gpus: u32::try_from(gpus).unwrap_or(u32::MAX),
            max_workers: 1,
            version: format!(
                "{} (runtime {})",
                version.trim(),
                inner.config.runtime.name()
            ),
        })
    }

    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError> {
        let inner = &self.inner;
        // The node resolves no path against this process's working directory.
        let mut job = job.clone();
        job.outgoing = std::path::absolute(&job.outgoing)?;
        job.incoming = job
            .incoming
            .as_deref()
            .map(std::path::absolute)
            .transpose()?;
        let job = &job;
        script::check_request(job, &inner.config)?;
        let dir = inner.dir(job.job_id.as_str());
        let body = script::batch_script(job, &inner.config, &inner.manager_id, &dir, inner.euid)?;
        inner.check_image(&job.image).await?;
        // Creating the directory claims the id, also against a concurrent submit.
        match tokio::fs::DirBuilder::new().mode(0o700).create(&dir).await {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !inner.is_debris(&job.job_id).await? {
                    return Err(BackendError::AlreadyExists(job.job_id.to_string()));
                }
                tracing::warn!(path = %dir.display(), "removing the directory a submit left without a job (a crash?)");
                tokio::fs::remove_dir_all(&dir).await?;
                tokio::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .await?;
            }
            other => other?,
        }
        let submitted = self.submit_in(job, &dir, &body).await;
        if submitted.is_err()
            && let Err(error) = tokio::fs::remove_dir_all(&dir).await
        {
            tracing::warn!(path = %dir.display(), %error, "cannot remove a failed job's directory");
        }
        submitted
    }

    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        self.inner.observe(job_id).await
    }

    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let inner = self.inner.clone();
        if inner.observe(job_id).await?.is_none() {
            return Err(BackendError::NotFound(job_id.to_string()));
        }
        let watched = job_id.clone();
        let ended: logs::EndedCheck = Box::new(move || {
            let inner = inner.clone();
            let job_id = watched.clone();
            Box::pin(async move {
                Ok(inner
                    .observe(&job_id)
                    .await?
                    .is_none_or(|seen| seen.is_finished()))
            })
        });
        logs::stream(
            self.job_dir(job_id.as_str()).join(OUTPUT_FILE),
            tail_lines,
            follow,
            ended,
        )
        .await
    }

    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError> {
        let inner = &self.inner;
        let seen = inner
            .observe(job_id)
            .await?
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        if seen.is_finished() {
            return Ok(());
        }
        let Some(found) = inner.locate(job_id).await? else {
            return Ok(());
        };
        inner.cancel_and_wait(job_id, &found.slurm.id).await?;
        tracing::info!(job_id = %job_id, slurm_job_id = %found.slurm.id, "job cancelled in Slurm");
        Ok(())
    }

    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError> {
        let inner = &self.inner;
        let dir = inner.dir(job_id.as_str());
        let seen = inner.observe(job_id).await?;
        let dir_exists = tokio::fs::try_exists(&dir).await.unwrap_or(false);
        if seen.is_none() && !dir_exists {
            return Ok(false);
        }
        if seen.as_ref().is_some_and(|seen| !seen.is_finished())
            && let Some(found) = inner.locate(job_id).await?
        {
            inner.cancel_and_wait(job_id, &found.slurm.id).await?;
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BackendError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot remove the job's directory {}: {e}", dir.display()),
                )));
            }
            _ => {}
        }
        inner.invalidate().await;
        tracing::info!(job_id = %job_id, "job removed");
        Ok(true)
    }

    async fn list_owned(&self) -> Result<Vec<Observed>, BackendError> {
        let inner = &self.inner;
        let queue = inner.queue(true).await?;
        let mut ids: BTreeSet<String> = queue.keys().cloned().collect();
        let mut entries = tokio::fs::read_dir(&inner.job_dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            if let Some(name) = entry.file_name().to_str()
                && entry.file_type().await?.is_dir()
            {
                ids.insert(name.to_owned());
            }
        }
        let mut owned = Vec::new();
        for id in ids {
            let Ok(job_id) = JobId::parse(&id) else {
                continue;
            };
            if let Some(seen) = inner.observe(&job_id).await? {
                owned.push(seen);
            }
        }
        Ok(owned)
    }
}

impl SlurmBackend {
    /// Writes the script, submits it and records the job; the directory exists.
    async fn submit_in(
        &self,
        job: &JobRequest,
        dir: &Path,
        body: &str,
    ) -> Result<Observed, BackendError> {
        let inner = &self.inner;
        let script_path = dir.join(SCRIPT_FILE);
        write_private(&script_path, body.as_bytes(), 0o700).await?;
        if let Some(env) = script::env_file(job, &inner.config) {
            write_private(&dir.join(script::ENV_FILE), env.as_bytes(), 0o600).await?;
        }
        let mut args = script::sbatch_args(job, &inner.config, &inner.manager_id, dir);
        args.push(script_path.display().to_string());
        let stdout = inner
            .tools
            .run("sbatch", &args)
            .await
            .map_err(sbatch_refused)?;
        let slurm_id = slurm::parse_sbatch(&stdout).ok_or_else(|| {
            BackendError::Engine(format!("`sbatch --parsable` printed no job id: {stdout:?}"))
        })?;
        let record = JobRecord {
            version: 1,
            job_id: job.job_id.to_string(),
            manager_id: inner.manager_id.clone(),
            slurm_job_id: slurm_id.clone(),
            image: job.image.clone(),
            command: job.command.clone(),
            labels: job.labels.clone(),
            runtime_limits_memory: inner.config.runtime.is_daemon(),
            submitted_at: SystemTime::now(),
        };
        if let Err(error) = write_json(&dir.join(RECORD_FILE), &record).await {
            // Without its record the job would run unseen: take it back.
            let _ = inner
                .tools
                .run_raw("scancel", std::slice::from_ref(&slurm_id))
                .await;
            return Err(BackendError::Io(io::Error::new(
                error.kind(),
                format!(
                    "cannot record Slurm job {slurm_id} in {}: {error}",
                    dir.display()
                ),
            )));
        }
        inner.invalidate().await;
        tracing::info!(job_id = %job.job_id, slurm_job_id = %slurm_id, "job submitted");
        let pending = SlurmJob {
            id: slurm_id,
            state: "PENDING".into(),
            reason: "submitted".into(),
            ..SlurmJob::default()
        };
        let outcome = slurm::outcome(&pending, slurm::EndFiles::default(), false);
        Ok(observed(
            &job.job_id,
            Some(&record),
            &pending,
            outcome,
            &inner.manager_id,
        ))
    }
}

/// Writes a file only its owner may read (it may hold the job's secrets).
async fn write_private(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .await?;
    file.write_all(bytes).await?;
    file.flush().await?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).await
}

/// GPUs in `sinfo`'s `%G`: `gpu:2`, `gpu:a100:4(S:0-1)`, `gpu:2,mps:100`, `(null)`.
fn gpu_count(gres: &str) -> u64 {
    gres.split(',')
        .filter(|item| item.trim().starts_with("gpu"))
        .filter_map(|item| {
            let item = item.split('(').next().unwrap_or("");
            item.rsplit(':').next()?.trim().parse::<u64>().ok()
        })
        .sum()
}

impl std::fmt::Debug for SlurmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlurmBackend")
            .field("manager_id", &self.inner.manager_id)
            .field("job_dir", &self.inner.job_dir)
            .field("runtime", &self.inner.config.runtime)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_counted_from_gres() {
        assert_eq!(gpu_count("(null)"), 0);
        assert_eq!(gpu_count("gpu:2"), 2);
        assert_eq!(gpu_count("gpu:a100:4(S:0-1)"), 4);
        assert_eq!(gpu_count("gpu:2,mps:100"), 2);
        assert_eq!(gpu_count("gpu:a:1,gpu:b:2"), 3);
    }

    #[test]
    fn manager_ids_must_fit_a_comment() {
        check_manager_id("conformance-slurm-1a2b").unwrap();
        for bad in ["", "a:b", "a b", "-a", "a/b"] {
            assert!(check_manager_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sbatch_refusals_name_the_cause() {
        let refused = sbatch_refused(BackendError::Engine(
            "`sbatch ...` failed (exit 1): sbatch: error: Batch job submission failed: Requested node configuration is not available".into(),
        ));
        assert!(matches!(
            refused,
            BackendError::Unsupported {
                field: "resources",
                ..
            }
        ));
        let refused = sbatch_refused(BackendError::Engine(
            "... Invalid partition name specified".into(),
        ));
        assert!(matches!(
            refused,
            BackendError::Unsupported { field: "slurm", .. }
        ));
    }
}

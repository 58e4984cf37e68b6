//! The local backend: each job is a plain child process of the manager, on the manager's
//! host, with the same contract as a container backend. It is the embedded default where
//! no container engine runs.
//!
//! # No isolation
//!
//! **A job gets no isolation whatsoever.** It runs on the host's file system (it can read
//! and write whatever the manager's user can), in the host's network, process and IPC
//! namespaces, with the manager's privileges, or those of [`JobRequest::user`] when the
//! manager runs as root. The image is ignored: the command runs with the host's programs.
//! Use it for trusted plugins on a machine of one's own, never for untrusted code.
//!
//! The one exception is a guard against accidents, not a boundary: when the manager runs
//! as root (and util-linux's `unshare`, `mount` and `setpriv` are there), each job gets a
//! private mount namespace in which its incoming directory is bound read-only, as a
//! container's `/share/incoming` is ([`LocalConfig::read_only_incoming`]). A job running as
//! root could remount it; elsewhere jobs can write their inputs.
//!
//! # What it does give
//!
//! - Paths: arguments naming `/share/incoming` and `/share/outgoing` (or files under
//!   them) are rewritten to the job's host directories; the job starts in its outgoing
//!   directory, with a clean environment (`PATH=/usr/local/bin:/usr/bin:/bin` plus the
//!   job's variables: nothing of the manager's leaks in), stdin on `/dev/null`, and stdout
//!   and stderr appended, in order, to one log file.
//! - Limits: where a cgroup memory controller can be written (cgroup v1 at
//!   `/sys/fs/cgroup/memory`, or cgroup v2), each job gets its cgroup
//!   `<root>/chris-dispatch/<manager-id>/<job-id>` with a hard memory limit and no swap
//!   past it, and a CFS CPU quota where the CPU controller can be written. A job killed
//!   there by the OOM killer is reported FAILED with `OOM_KILLED`. Without cgroups memory
//!   is limited by `ulimit -v` (address space, not resident memory: programs that reserve
//!   much virtual memory may fail early), a job over it fails in its own way, and that is
//!   reported as an ordinary exit code; the CPU limit is then not enforced.
//!   [`Backend::capabilities`] says which applies (`local (cgroup v1|v2|none)`).
//! - Users: with [`JobRequest::user`] set and the manager running as root, the job runs
//!   as that uid and gid (no supplementary groups: `setpriv` in a mount namespace, else
//!   the process's own uid and gid); a manager not running as root refuses any other user
//!   than its own.
//! - Restarts: a job's record lives in `<state_dir>/<job-id>/state.json` (written
//!   atomically, beside `output.log` and the `exit` file), so a backend opened again on
//!   the same state directory finds its manager's jobs, still running or ended, and tells
//!   a job's process from a stranger that reused its pid by the process's start time (and
//!   the boot id). A job still running is then polled through `/proc` until it ends; its
//!   exit code comes from the `exit` file the wrapper writes. Where that file could not be
//!   written (a job running as another user who cannot reach the state directory) a job
//!   that ended while no backend watched is reported LOST (`BACKEND_ERROR`).
//!
//! # What it reports
//!
//! QUEUED before the process starts; RUNNING; SUCCEEDED on exit 0; FAILED with
//! `EXIT_CODE` and the code otherwise (a job killed by signal N shows 128 + N, as from a
//! shell or Docker; 127 for a command not found); FAILED with `OOM_KILLED` when the OOM
//! killer struck in the job's cgroup and it did not exit 0; FAILED with message `killed`
//! (exit code 137) after [`Backend::kill`], which the manager maps to a cancel or a time
//! limit; LOST when the end could not be observed. `backend_name` is `pid <n>`.
//!
//! # How a job is started
//!
//! Without `unsafe` code there is no hook between `fork` and `exec`, so a small `/bin/sh`
//! wrapper does what such a hook would (see `src/command.rs`): the manager moves it into the
//! job's cgroups, then tells it to go; it runs the job, stays its parent, and writes the
//! exit code to a file a restarted manager can read. The wrapper leads its own process
//! group, which holds the job and its children: a kill is a SIGKILL to the group (and to
//! every process left in the job's cgroups).
//!
//! This crate must never touch a process, cgroup or file that it did not create for a
//! job of its own manager id.

mod cgroup;
mod command;
mod logs;
mod procfs;
mod record;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use dispatch_manager::backend::{
    Backend, BackendCapabilities, BackendError, JobRequest, LogStream, Observed,
};
use dispatch_proto::JobId;
use dispatch_proto::job::{BackendKind, CpuMillis, MemoryMib};

use crate::cgroup::Cgroups;
use crate::command::{Namespace, NamespaceTools, Wrapper};
use crate::record::{EXIT_FILE, Exit, JobRecord, LOG_FILE, RecordedUser};

/// The `PATH` every job starts with (a job's own `PATH` replaces it).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How often a job the manager did not start itself (found again after a restart) is
/// checked for having ended.
const FOREIGN_POLL: Duration = Duration::from_millis(250);

/// How long `open` waits for the manager's lock.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// How long `kill` and `remove` wait for a killed job's end to be recorded.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Whether jobs are put in cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UseCgroups {
    /// Use cgroups when a memory controller can be written; otherwise fall back to
    /// `ulimit -v`, with a warning.
    #[default]
    Auto,
    /// Use cgroups, and refuse to open without them.
    Always,
    /// Never use cgroups: memory is limited by `ulimit -v`, CPU not at all.
    Never,
}

/// Whether jobs see their incoming directory read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadOnlyIncoming {
    /// When the manager runs as root and util-linux's `unshare`, `mount` and `setpriv` work;
    /// otherwise jobs can write their inputs, with a warning.
    #[default]
    Auto,
    /// Always, and refuse to open where it cannot be done.
    Always,
    /// Never: jobs run in the manager's own mount namespace.
    Never,
}

/// The `[local]` table of the manager's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Where each job's record, log and exit code live (`<state_dir>/<job-id>/`). Must be
    /// stable across restarts: it is how a restarted manager finds its jobs.
    pub state_dir: PathBuf,
    /// The cgroup directory under which `chris-dispatch/<manager-id>/<job-id>` cgroups are
    /// made (a delegated subtree); default: the memory controller's mount (cgroup v1) or
    /// the cgroup2 mount.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Whether to use cgroups (`auto`, `always`, `never`).
    #[serde(default)]
    pub use_cgroups: UseCgroups,
    /// Whether to give each job a private mount namespace in which its incoming directory
    /// is read-only (`auto`, `always`, `never`).
    #[serde(default)]
    pub read_only_incoming: ReadOnlyIncoming,
}

impl LocalConfig {
    /// A configuration with defaults but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            cgroup_root: None,
            use_cgroups: UseCgroups::Auto,
            read_only_incoming: ReadOnlyIncoming::Auto,
        }
    }

    /// Reads the manager's `[local]` table; `default_state_dir` applies when the table
    /// names none (the manager passes a directory under its own state directory).
    pub fn from_table(table: &toml::Table, default_state_dir: &Path) -> Result<Self, BackendError> {
        let mut table = table.clone();
        if !table.contains_key("state_dir") {
            let default = default_state_dir.to_str().ok_or_else(|| {
                BackendError::Engine(format!(
                    "[local] state_dir: default {} is not UTF-8",
                    default_state_dir.display()
                ))
            })?;
            table.insert("state_dir".into(), toml::Value::String(default.into()));
        }
        table
            .try_into()
            .map_err(|e| BackendError::Engine(format!("invalid [local] configuration: {e}")))
    }
}

/// Plain local processes behind the [`Backend`] trait. See the crate documentation, and
/// mind that it isolates nothing.
///
/// One backend at a time may manage a manager id's jobs in a state directory (a lock file
/// there makes sure). Dropping it stops its watcher tasks but not its jobs: a backend
/// opened again on the same state directory picks them up.
pub struct LocalBackend {
    shared: Arc<Shared>,
    /// Reapers and watchers, one per running job; aborted on drop.
    tasks: Mutex<JoinSet<()>>,
    runtime: tokio::runtime::Handle,
}

/// What the backend and its tasks share.
struct Shared {
    manager_id: String,
    state_dir: PathBuf,
    cgroups: Cgroups,
    /// Set when jobs run in a private mount namespace with read-only inputs.
    namespace: Option<NamespaceTools>,
    boot_id: String,
    euid: u32,
    egid: u32,
    cpu: CpuMillis,
    jobs: Mutex<HashMap<JobId, Arc<JobEntry>>>,
    /// Held (`flock`) while this backend lives: two backends managing the same jobs would
    /// both reap and kill them.
    _lock: std::fs::File,
}

/// One job this backend knows.
struct JobEntry {
    job_id: JobId,
    dir: PathBuf,
    /// The record; held across its write to disk, so writes never reorder.
    record: tokio::sync::Mutex<JobRecord>,
    /// Turns true once the end is recorded (and the job's processes are gone).
    ended: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn blocking_failed(e: tokio::task::JoinError) -> BackendError {
    BackendError::Engine(format!("a blocking task failed: {e}"))
}

impl LocalBackend {
    /// Opens the backend for `manager_id` (which names its cgroups and marks its records):
    /// creates the state directory, sets up cgroups as configured, and finds the jobs
    /// recorded there by an earlier backend of the same manager id, watching those still
    /// running.
    ///
    /// Must be called within a tokio runtime (its tasks run there). It blocks, as a
    /// start-up step: file I/O (one small file per recorded job), and up to a second's
    /// wait for the manager's lock in the state directory.
    pub fn open(manager_id: &str, config: LocalConfig) -> Result<Self, BackendError> {
        check_manager_id(manager_id)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BackendError::Engine("the local backend must be opened within a tokio runtime".into())
        })?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create state_dir {}: {e}",
                    config.state_dir.display()
                ),
            )
        })?;
        let lock = lock_manager(&config.state_dir, manager_id)?;
        let cgroups = Cgroups::detect(
            config.use_cgroups,
            config.cgroup_root.as_deref(),
            manager_id,
        )
        .map_err(|reason| BackendError::Unsupported {
            field: "use_cgroups",
            reason,
        })?;
        let euid = rustix::process::geteuid().as_raw();
        let namespace = namespace_tools(config.read_only_incoming, euid)?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let shared = Arc::new(Shared {
            manager_id: manager_id.to_owned(),
            state_dir: config.state_dir,
            cgroups,
            namespace,
            boot_id: procfs::boot_id()?,
            euid,
            egid: rustix::process::getegid().as_raw(),
            cpu: CpuMillis(u32::try_from(cores.saturating_mul(1000)).unwrap_or(u32::MAX)),
            jobs: Mutex::new(HashMap::new()),
            _lock: lock,
        });
        tracing::info!(
            manager_id,
            state_dir = %shared.state_dir.display(),
            cgroups = shared.cgroups.version_name(),
            read_only_incoming = shared.namespace.is_some(),
            "local backend: jobs run as host processes, without isolation"
        );
        let backend = Self {
            shared,
            tasks: Mutex::new(JoinSet::new()),
            runtime,
        };
        backend.rediscover()?;
        Ok(backend)
    }

    /// Loads every record of this manager from the state directory. A job whose process
    /// still runs is watched until it ends; one that ended while no backend watched gets
    /// its end recorded now.
    fn rediscover(&self) -> Result<(), BackendError> {
        for dir_entry in std::fs::read_dir(&self.shared.state_dir)? {
            let dir = dir_entry?.path();
            if !dir.join(record::STATE_FILE).exists() {
                continue;
            }
            let mut rec = match record::read(&dir) {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "skipping an unreadable job record");
                    continue;
                }
            };
            if rec.manager_id != self.shared.manager_id {
                continue;
            }
            let Some(job_id) = JobId::parse(&rec.job_id)
                .ok()
                .filter(|id| dir.file_name().is_some_and(|name| name == id.as_str()))
            else {
                tracing::warn!(path = %dir.display(), "skipping a job record that does not match its directory");
                continue;
            };
            let running = rec.finished_at.is_none() && self.still_running(&rec)?;
            if rec.finished_at.is_none() && !running {
                finish_record(&dir, &mut rec, None, false);
            }
            let entry = Arc::new(JobEntry {
                job_id: job_id.clone(),
                dir,
                record: tokio::sync::Mutex::new(rec),
                ended: watch::Sender::new(!running),
            });
            lock(&self.shared.jobs).insert(job_id.clone(), entry.clone());
            if running {
                tracing::info!(job_id = %job_id, "found a running job again");
                self.spawn_task(watch_foreign(entry));
            }
        }
        Ok(())
    }

    /// True when the record's process is the one running now (same boot, same start).
    fn still_running(&self, rec: &JobRecord) -> io::Result<bool> {
        let (Some(pid), Some(ticks)) = (rec.pid, rec.process_start_ticks) else {
            return Ok(false);
        };
        if rec.boot_id.as_deref() != Some(self.shared.boot_id.as_str()) {
            return Ok(false);
        }
        Ok(procfs::same_process_running(
            procfs::stat_blocking(pid)?,
            ticks,
        ))
    }

    fn spawn_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        // Collect finished tasks, so the set holds only live ones.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "a job watcher panicked");
            }
        }
        tasks.spawn_on(task, &self.runtime);
    }

    fn entry(&self, job_id: &JobId) -> Option<Arc<JobEntry>> {
        lock(&self.shared.jobs).get(job_id).cloned()
    }

    /// Refuses what this backend cannot do.
    fn check_request(&self, job: &JobRequest) -> Result<(), BackendError> {
        if job.workers > 1 {
            return Err(BackendError::Unsupported {
                field: "workers",
                reason: format!(
                    "the local backend runs one process per job, not {}",
                    job.workers
                ),
            });
        }
        if job.gpus > 0 {
            return Err(BackendError::Unsupported {
                field: "gpus",
                reason: "the local backend offers no GPUs".into(),
            });
        }
        if job.command.is_empty() {
            return Err(BackendError::Unsupported {
                field: "command",
                reason: "cannot be empty".into(),
            });
        }
        if let Some(user) = job.user
            && self.shared.euid != 0
            && (user.uid, user.gid) != (self.shared.euid, self.shared.egid)
        {
            return Err(BackendError::Unsupported {
                field: "user",
                reason: format!(
                    "the local backend can run a job as {}:{} only when the manager runs as \
                     root; it runs as {}:{}",
                    user.uid, user.gid, self.shared.euid, self.shared.egid
                ),
            });
        }
        Ok(())
    }

    /// The user to switch to: only as root, and only to another user.
    fn switch_user(&self, job: &JobRequest) -> Option<RecordedUser> {
        let user = job.user?;
        let other = (user.uid, user.gid) != (self.shared.euid, self.shared.egid);
        (self.shared.euid == 0 && other).then_some(RecordedUser {
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// Starts the job in `dir`, which the caller created (and removes on error).
    async fn start(&self, job: &JobRequest, dir: &Path) -> Result<Arc<JobEntry>, BackendError> {
        let user = self.switch_user(job);
        // Without a namespace the wrapper itself runs as the job's user.
        let wrapper_user = user.filter(|_| self.shared.namespace.is_none());
        let log = {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || prepare_job_dir(&dir, wrapper_user))
                .await
                .map_err(blocking_failed)??
        };
        let limits = cgroup::Limits {
            memory_bytes: job.memory.bytes(),
            cpu_millis: job.cpu.get(),
        };
        let cgroups = {
            let (cgroups, id) = (self.shared.cgroups.clone(), job.job_id.to_string());
            tokio::task::spawn_blocking(move || cgroup::create_job_cgroups(&cgroups, &id, limits))
                .await
                .map_err(blocking_failed)??
        };
        let result = self.spawn_job(job, dir, user, log, cgroups.clone()).await;
        if result.is_err() {
            let failed = tokio::task::spawn_blocking(move || cgroup::remove(&cgroups))
                .await
                .unwrap_or_default();
            for (path, error) in failed {
                tracing::warn!(path = %path.display(), %error, "cannot remove a cgroup");
            }
        }
        result
    }

    async fn spawn_job(
        &self,
        job: &JobRequest,
        dir: &Path,
        user: Option<RecordedUser>,
        log: std::fs::File,
        cgroups: Vec<PathBuf>,
    ) -> Result<Arc<JobEntry>, BackendError> {
        let args =
            command::map_container_paths(&job.command, job.incoming.as_deref(), &job.outgoing);
        // Without cgroups `ulimit -v` is the only memory limit there is.
        let vm_limit_kib = cgroups
            .is_empty()
            .then(|| job.memory.get().saturating_mul(1024));
        let mut rec = JobRecord {
            format: JobRecord::FORMAT,
            job_id: job.job_id.to_string(),
            manager_id: self.shared.manager_id.clone(),
            labels: job.labels.clone(),
            image: job.image.clone(),
            command: job.command.clone(),
            host_command: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            memory_mib: job.memory.get(),
            cpu_millis: job.cpu.get(),
            user,
            cgroups: cgroups.clone(),
            pid: None,
            process_start_ticks: None,
            boot_id: Some(self.shared.boot_id.clone()),
            started_at: None,
            finished_at: None,
            exit: None,
            oom_killed: false,
            killed: false,
        };
        write_record(dir, &rec).await?;

        let exit_file = dir.join(EXIT_FILE);
        let wrapper = Wrapper {
            exit_file: &exit_file,
            memory_limit_kib: vm_limit_kib,
            namespace: self.shared.namespace.as_ref().map(|tools| Namespace {
                tools,
                incoming: job.incoming.as_deref(),
                user: user.map(|u| (u.uid, u.gid)),
            }),
        };
        let (program, wrapper_args) = wrapper.command_line();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(wrapper_args)
            .args(&args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(job.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&job.outgoing)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        // In a namespace the wrapper stays root and `setpriv` switches for the job alone.
        if let (Some(user), None) = (user, &self.shared.namespace) {
            cmd.uid(user.uid).gid(user.gid);
        }
        let started_at = SystemTime::now();
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the job (in {}): {e}", job.outgoing.display()),
            )
        })?;
        let placed = self.place(&child, &cgroups).await;
        let (pid, ticks) = match placed {
            Ok(placed) => placed,
            Err(e) => {
                // The wrapper has not run the job yet; it dies waiting for the go line.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        rec.pid = Some(pid);
        rec.process_start_ticks = Some(ticks);
        rec.started_at = Some(started_at);
        if let Err(e) = write_record(dir, &rec).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        if let Some(mut stdin) = child.stdin.take() {
            // A failure here means the wrapper is gone already: the reaper records how.
            if let Err(e) = stdin.write_all(b"go\n").await {
                tracing::warn!(job_id = %job.job_id, error = %e, "cannot start the job's wrapper");
            }
        }
        let entry = Arc::new(JobEntry {
            job_id: job.job_id.clone(),
            dir: dir.to_owned(),
            record: tokio::sync::Mutex::new(rec),
            ended: watch::Sender::new(false),
        });
        lock(&self.shared.jobs).insert(job.job_id.clone(), entry.clone());
        self.spawn_task(reap_child(entry.clone(), child));
        Ok(entry)
    }

    /// The wrapper's pid and start time, once it is in the job's cgroups.
    async fn place(
        &self,
        child: &tokio::process::Child,
        cgroups: &[PathBuf],
    ) -> Result<(u32, u64), BackendError> {
        let pid = child
            .id()
            .ok_or_else(|| BackendError::Engine("the job's wrapper exited at once".into()))?;
        let stat = procfs::stat(pid)
            .await?
            .ok_or_else(|| BackendError::Engine("the job's wrapper exited at once".into()))?;
        let cgroups = cgroups.to_vec();
        tokio::task::spawn_blocking(move || cgroup::join(&cgroups, pid))
            .await
            .map_err(blocking_failed)??;
        Ok((pid, stat.start_ticks))
    }

    /// Sends SIGKILL to the job's process group and everything in its cgroups, after
    /// recording that it was killed. Returns false when it had ended already.
    async fn signal_kill(&self, entry: &JobEntry) -> Result<bool, BackendError> {
        let mut rec = entry.record.lock().await;
        if rec.finished_at.is_some() {
            return Ok(false);
        }
        let (Some(pid), Some(ticks)) = (rec.pid, rec.process_start_ticks) else {
            return Ok(false);
        };
        if !rec.killed {
            rec.killed = true;
            write_record(&entry.dir, &rec).await?;
        }
        // Only while the wrapper is still the process we started does its pid name our
        // process group; the cgroups are ours whatever happened.
        let ours = procfs::same_process_running(procfs::stat(pid).await?, ticks);
        let cgroups = rec.cgroups.clone();
        tokio::task::spawn_blocking(move || {
            if ours {
                kill_group(pid);
            }
            cgroup::kill_all(&cgroups);
        })
        .await
        .map_err(blocking_failed)?;
        Ok(true)
    }
}

/// The tools for read-only inputs, as configured: only root can make mount namespaces.
fn namespace_tools(
    mode: ReadOnlyIncoming,
    euid: u32,
) -> Result<Option<NamespaceTools>, BackendError> {
    if mode == ReadOnlyIncoming::Never {
        return Ok(None);
    }
    let found = if euid == 0 {
        NamespaceTools::find().and_then(|tools| tools.probe().map(|()| tools))
    } else {
        Err("the manager does not run as root".into())
    };
    match (found, mode) {
        (Ok(tools), _) => Ok(Some(tools)),
        (Err(reason), ReadOnlyIncoming::Always) => Err(BackendError::Unsupported {
            field: "read_only_incoming",
            reason,
        }),
        (Err(reason), _) => {
            tracing::warn!(%reason, "jobs can write into their incoming directories");
            Ok(None)
        }
    }
}

/// A manager id names a cgroup directory and marks records: one safe path component.
fn check_manager_id(manager_id: &str) -> Result<(), BackendError> {
    let bad = manager_id.is_empty()
        || manager_id.starts_with('.')
        || manager_id.contains('/')
        || manager_id.chars().any(char::is_control);
    if bad {
        return Err(BackendError::Unsupported {
            field: "manager_id",
            reason: format!(
                "`{manager_id}` cannot name a directory: it must be non-empty, without `/` or \
                 control characters, and not start with `.`"
            ),
        });
    }
    Ok(())
}

/// Takes this manager's lock in the state directory (`.<manager-id>.lock`: job ids never
/// start with `.`), or fails if another backend holds it.
fn lock_manager(state_dir: &Path, manager_id: &str) -> Result<std::fs::File, BackendError> {
    let path = state_dir.join(format!(".{manager_id}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    // A child forked by another thread of this process shares the lock until it execs:
    // a backend dropped and opened again in one process may find it held for a moment.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(BackendError::Engine(format!(
                    "another local backend of manager `{manager_id}` is using {}",
                    state_dir.display()
                )));
            }
            Err(e) => return Err(BackendError::Io(e.into())),
        }
    }
}

/// Makes the job's directory private (or traversable only, when the wrapper runs as
/// another user who must reach its exit file) and opens its log.
fn prepare_job_dir(dir: &Path, user: Option<RecordedUser>) -> io::Result<std::fs::File> {
    let mode = if user.is_some() { 0o711 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if let Some(user) = user {
        let exit_file = dir.join(EXIT_FILE);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&exit_file)?;
        std::os::unix::fs::chown(&exit_file, Some(user.uid), Some(user.gid))?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dir.join(LOG_FILE))
}

async fn write_record(dir: &Path, rec: &JobRecord) -> Result<(), BackendError> {
    let (dir, rec) = (dir.to_owned(), rec.clone());
    tokio::task::spawn_blocking(move || record::write(&dir, &rec))
        .await
        .map_err(blocking_failed)?
        .map_err(BackendError::from)
}

/// SIGKILL to a process group; a group already gone is no error.
fn kill_group(pgid: u32) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "cannot kill the job's process group"),
    }
}

/// Records how the job ended: kills what it left behind, reads its exit code and OOM
/// count, removes its cgroups and writes the record. `waited`: the wrapper's status when
/// this manager is its parent. `just_ended`: the wrapper ended moments ago, so its pid
/// still names the job's process group (not so for a job found ended at start-up, whose
/// pid may belong to anyone by now).
fn finish_record(dir: &Path, rec: &mut JobRecord, waited: Option<ExitStatus>, just_ended: bool) {
    use std::os::unix::process::ExitStatusExt;

    if let (Some(pid), true) = (rec.pid, just_ended) {
        kill_group(pid);
        // A signal takes effect when its process next runs: wait for that, so that once
        // the end is recorded no process of the job runs (the cgroups are emptied below).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while procfs::group_running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    cgroup::kill_all(&rec.cgroups);
    rec.oom_killed = cgroup::oom_killed(&rec.cgroups);
    let from_file = record::read_exit_file(dir);
    let exit = match (&from_file, waited) {
        (Some((code, _)), _) => Exit::Code { code: *code },
        (None, Some(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code { code },
            (None, Some(signal)) => Exit::Signal { signal },
            (None, None) => Exit::Unknown {
                message: format!("the job's wrapper ended with {status}"),
            },
        },
        (None, None) if rec.pid.is_none() => Exit::Unknown {
            message: record::NEVER_STARTED.into(),
        },
        (None, None) => Exit::Unknown {
            message: record::EXIT_UNKNOWN.into(),
        },
    };
    rec.exit = Some(exit);
    for (path, error) in cgroup::remove(&rec.cgroups) {
        tracing::warn!(path = %path.display(), %error, "cannot remove the job's cgroup");
    }
    // A job found ended at start-up ended when it wrote its exit code, if it did.
    let written = from_file.and_then(|(_, written)| written);
    rec.finished_at = Some(match (just_ended, written) {
        (false, Some(written)) => written,
        _ => SystemTime::now(),
    });
    if let Err(e) = record::write(dir, rec) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot record the job's end");
    }
}

/// Records the end of a job, once its wrapper has ended.
async fn record_end(entry: &JobEntry, waited: Option<ExitStatus>) {
    let mut rec = entry.record.lock().await;
    let (dir, mut updated) = (entry.dir.clone(), rec.clone());
    let finished = tokio::task::spawn_blocking(move || {
        finish_record(&dir, &mut updated, waited, true);
        updated
    })
    .await;
    match finished {
        Ok(updated) => *rec = updated,
        Err(e) => {
            tracing::error!(job_id = %entry.job_id, error = %e, "recording the job's end failed")
        }
    }
    let observed = rec.to_observed(&entry.job_id);
    drop(rec);
    tracing::debug!(job_id = %entry.job_id, state = ?observed.state, message = %observed.message, "job ended");
    entry.ended.send_replace(true);
}

/// Waits for a job this backend started, then records its end.
async fn reap_child(entry: Arc<JobEntry>, mut child: tokio::process::Child) {
    let waited = match child.wait().await {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::warn!(job_id = %entry.job_id, error = %e, "cannot wait for the job");
            None
        }
    };
    record_end(&entry, waited).await;
}

/// Polls a job an earlier backend started (its exit status is not ours to wait for) until
/// its process is gone, then records its end from the exit file.
async fn watch_foreign(entry: Arc<JobEntry>) {
    let (pid, ticks) = {
        let rec = entry.record.lock().await;
        (rec.pid, rec.process_start_ticks)
    };
    let (Some(pid), Some(ticks)) = (pid, ticks) else {
        return;
    };
    loop {
        tokio::time::sleep(FOREIGN_POLL).await;
        match procfs::stat(pid).await {
            Ok(stat) if procfs::same_process_running(stat, ticks) => {}
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(job_id = %entry.job_id, pid, error = %e, "cannot read the job's process status")
            }
        }
    }
    record_end(&entry, None).await;
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    async fn capabilities(&self) -> Result<BackendCapabilities, BackendError> {
        let meminfo = tokio::fs::read_to_string("/proc/meminfo").await?;
        let memory = procfs::parse_mem_total(&meminfo)
            .ok_or_else(|| BackendError::Engine("no MemTotal in /proc/meminfo".into()))?;
        Ok(BackendCapabilities {
            kind: BackendKind::Local,
            cpu: self.shared.cpu,
            memory: MemoryMib(memory >> 20),
            gpus: 0,
            max_workers: 1,
            version: format!("local (cgroup {})", self.shared.cgroups.version_name()),
        })
    }

    async fn submit(&self, job: &JobRequest) -> Result<Observed, BackendError> {
        self.check_request(job)?;
        let exists = || BackendError::AlreadyExists(job.job_id.to_string());
        if self.entry(&job.job_id).is_some() {
            return Err(exists());
        }
        // Creating the directory claims the id, also against a concurrent submit.
        let dir = self.shared.state_dir.join(job.job_id.as_str());
        match tokio::fs::DirBuilder::new().mode(0o700).create(&dir).await {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
            other => other?,
        }
        tracing::debug!(job_id = %job.job_id, image = %job.image, "the local backend ignores the image: the job runs on the host");
        match self.start(job, &dir).await {
            Ok(entry) => {
                let rec = entry.record.lock().await;
                tracing::info!(job_id = %job.job_id, pid = rec.pid, "job started");
                Ok(rec.to_observed(&job.job_id))
            }
            Err(e) => {
                if let Err(cleanup) = tokio::fs::remove_dir_all(&dir).await {
                    tracing::warn!(path = %dir.display(), error = %cleanup, "cannot remove a failed job's directory");
                }
                Err(e)
            }
        }
    }

    async fn status(&self, job_id: &JobId) -> Result<Option<Observed>, BackendError> {
        let Some(entry) = self.entry(job_id) else {
            return Ok(None);
        };
        let rec = entry.record.lock().await;
        Ok(Some(rec.to_observed(job_id)))
    }

    async fn logs(
        &self,
        job_id: &JobId,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, BackendError> {
        let entry = self
            .entry(job_id)
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        logs::stream(
            entry.dir.join(LOG_FILE),
            tail_lines,
            follow,
            entry.ended.subscribe(),
        )
        .await
    }

    async fn kill(&self, job_id: &JobId) -> Result<(), BackendError> {
        let entry = self
            .entry(job_id)
            .ok_or_else(|| BackendError::NotFound(job_id.to_string()))?;
        let mut ended = entry.ended.subscribe();
        if self.signal_kill(&entry).await? {
            tracing::info!(job_id = %job_id, "job killed");
        }
        // Wait for the end to be recorded, so a status right after says so.
        if tokio::time::timeout(KILL_WAIT, ended.wait_for(|ended| *ended))
            .await
            .is_err()
        {
            return Err(BackendError::Engine(format!(
                "job `{job_id}` was sent SIGKILL but had not ended {} s later",
                KILL_WAIT.as_secs()
            )));
        }
        Ok(())
    }

    async fn remove(&self, job_id: &JobId) -> Result<bool, BackendError> {
        let Some(entry) = self.entry(job_id) else {
            return Ok(false);
        };
        self.kill(job_id).await?;
        let rec = entry.record.lock().await;
        let cgroups = rec.cgroups.clone();
        let failed = tokio::task::spawn_blocking(move || cgroup::remove(&cgroups))
            .await
            .map_err(blocking_failed)?;
        if let Some((path, error)) = failed.into_iter().next() {
            return Err(BackendError::Engine(format!(
                "cannot remove cgroup {}: {error}",
                path.display()
            )));
        }
        match tokio::fs::remove_dir_all(&entry.dir).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        lock(&self.shared.jobs).remove(job_id);
        drop(rec);
        tracing::info!(job_id = %job_id, "job removed");
        Ok(true)
    }

    async fn list_owned(&self) -> Result<Vec<Observed>, BackendError> {
        let entries: Vec<_> = lock(&self.shared.jobs).values().cloned().collect();
        let mut observed = Vec::with_capacity(entries.len());
        for entry in entries {
            observed.push(entry.record.lock().await.to_observed(&entry.job_id));
        }
        observed.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(observed)
    }
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("manager_id", &self.shared.manager_id)
            .field("state_dir", &self.shared.state_dir)
            .field("cgroups", &self.shared.cgroups)
            .finish_non_exhaustive()
    }
}

//! The conformance suite every manager backend runs: the same cases, the same assertions,
//! through the manager's own gRPC API (`dispatch.v1.Manager`), so Docker, Podman, local
//! processes (and later Swarm, Kubernetes, Slurm) keep one set of promises.
//!
//! A backend's test file implements [`Harness`] (how to start a manager over a fresh
//! backend instance, and how to ask its engine what it really did) and lists the cases
//! with [`conformance_tests!`](crate::conformance_tests), one `#[tokio::test]` each, or
//! calls [`run_all`]. Every case makes its own job ids (`<harness name>-<case>-<random>`),
//! starts its own manager, and removes its jobs (staging area included) whether it passes
//! or not; with `RETAIN_TMP=1` a failed case keeps its staging areas for a look.
//!
//! One harness serves one test: cases in [`run_all`] run one after another, because they
//! share the harness's manager id and state directory. Separate tests each build their own
//! harness (with its own manager id) and run in parallel.
//!
//! The one allowed difference between backends is [`Harness::runs_images`]: for a
//! backend that runs no images (local processes), [`image_missing_fails_fast`] checks
//! instead that the image is ignored, as documented. Engines that
//! cannot flag an OOM kill (Podman) say so with [`Harness::reports_oom_kills`], and the
//! OOM case then takes exit code 137 as the sign (backends.md).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

use dispatch_manager::{Backend, ManagerConfig};
use dispatch_proto::v1::{self as pb, JobState, PfconStatus, PluginType, ReasonCode};
use pb::manager_client::ManagerClient;

/// How often a wait polls `GetJob`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest any single call may take (Schedule included: test images are local).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a job may take to start running.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a short job may take from Schedule to its end.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a kill (cancel, time limit) may take to show as the job's end.
const KILL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long after Schedule a job with a 2 s time limit must have been stopped.
const TIME_LIMIT_DEADLINE: Duration = Duration::from_secs(15);
/// How long a missing image may take to be refused.
const MISSING_IMAGE_DEADLINE: Duration = Duration::from_secs(20);

/// Limits the engine itself reports for a running job (not what the manager says it asked
/// for): `docker inspect`, cgroup files, `scontrol show job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedLimits {
    /// CPU limit, in thousandths of a core.
    pub cpu_millicores: u32,
    /// Memory limit, in MiB.
    pub memory_mib: u64,
}

/// What the suite needs from a backend's test file.
#[async_trait::async_trait]
pub trait Harness: Send + Sync {
    /// A short name for the backend (`docker`, `local`), used in job ids.
    fn name(&self) -> &str;

    /// The image holding the test plugins (see [`crate::images::ensure_test_image`]);
    /// anything for a backend that runs no images.
    fn image(&self) -> String;

    /// The entrypoint that runs the named plugin (`copy.sh`, ...): by default the script in
    /// the test image (`["/bin/sh", "/plugins/copy.sh"]`); a backend without containers
    /// gives the host path of the script (see [`crate::images::plugin_host_path`]).
    fn plugin(&self, name: &str) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            format!("{}/{name}", crate::images::PLUGINS_IN_IMAGE),
        ]
    }

    /// The manager's `store_root`, where jobs' `key-<job_id>` areas are.
    fn store_root(&self) -> PathBuf;

    /// Starts a manager in this process on a port-0 listener over a fresh backend
    /// instance, with the same manager id, store root and state directory every time (so a
    /// second start is a restart), e.g. with [`RunningManager::start`].
    async fn start_manager(&self) -> Result<RunningManager>;

    /// The job's CPU and memory limits as the engine reports them.
    async fn limits(&self, job_id: &str) -> Result<ObservedLimits>;

    /// What the engine still holds for the job (containers, processes, state files,
    /// cgroups), one description each; empty once it is removed.
    async fn leftovers(&self, job_id: &str) -> Result<Vec<String>>;

    /// The `uid:gid` the harness configured (`container_user`), to check who owns the
    /// outputs; `None` when jobs run as the image's (or the manager's) user.
    fn container_user(&self) -> Option<(u32, u32)>;

    /// False for a backend that runs no images (local processes): the one difference the
    /// suite allows; [`image_missing_fails_fast`] then checks the image is ignored.
    fn runs_images(&self) -> bool {
        true
    }

    /// False for an engine that never flags an OOM kill (Podman reports `OOMKilled`
    /// false): [`oom_reported`] then also takes a failure with exit code 137.
    fn reports_oom_kills(&self) -> bool {
        true
    }
}

/// A manager serving in this process, on a listener bound before it started.
pub struct RunningManager {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// Its address.
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl RunningManager {
    /// Serves `dispatch_manager::server::run` for `config` over `backend` on a fresh
    /// loopback listener. The suite's client sends no token, so this turns
    /// `insecure_no_auth` on (and drops any `token_file`).
    pub async fn start(mut config: ManagerConfig, backend: Arc<dyn Backend>) -> Result<Self> {
        config.insecure_no_auth = true;
        config.token_file = None;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            dispatch_manager::server::run(Arc::new(config), backend, listener, async move {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| e.to_string())
        });
        Ok(Self::from_parts(address, stop, task))
    }

    /// A manager some other way started: `stop` triggers its shutdown, `task` ends when it
    /// has stopped.
    pub fn from_parts(
        address: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), String>>,
    ) -> Self {
        Self {
            uri: format!("http://{address}"),
            address,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client of it.
    pub async fn client(&mut self) -> Result<ManagerClient<Channel>> {
        match ManagerClient::connect(self.uri.clone()).await {
            Ok(client) => Ok(client),
            Err(error) => Err(self.explain(anyhow!("cannot connect to {}: {error}", self.uri))),
        }
    }

    /// Replaces `error` by the server's own failure when the server has already ended
    /// (a manager that could not start drops its listener, and callers only see a refused
    /// connection).
    async fn explain_async(&mut self, error: anyhow::Error) -> anyhow::Error {
        let Some(task) = self.task.as_mut() else {
            return error;
        };
        // A failed start ends the task at once; give it a moment to get there.
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(server))) => {
                self.task = None;
                anyhow!("the manager failed: {server} (the call said: {error})")
            }
            Ok(Ok(Ok(()))) => {
                self.task = None;
                anyhow!("the manager stopped by itself (the call said: {error})")
            }
            Ok(Err(join)) => {
                self.task = None;
                anyhow!("the manager panicked: {join} (the call said: {error})")
            }
            Err(_) => error,
        }
    }

    fn explain(&mut self, error: anyhow::Error) -> anyhow::Error {
        match self.task.as_ref() {
            Some(task) if task.is_finished() => {
                anyhow!("the manager is not serving (see its log): {error}")
            }
            _ => error,
        }
    }

    /// Triggers the shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(CALL_TIMEOUT, task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(server))) => bail!("the manager failed: {server}"),
            Ok(Err(join)) => bail!("the manager panicked: {join}"),
            Err(_) => bail!("the manager did not stop within {CALL_TIMEOUT:?}"),
        }
    }
}

impl Drop for RunningManager {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A manager configuration for a harness: `store/` and `state/` under `dir` (created),
/// manager id `conformance-<name>-<random>` (unique, so parallel tests sharing one engine
/// never see each other's jobs), no token, a short shutdown grace. Keep the returned
/// config and start every manager of the harness with it.
pub fn base_config(name: &str, dir: &Path) -> Result<ManagerConfig> {
    let store_root = dir.join("store");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&store_root)?;
    std::fs::create_dir_all(&state_dir)?;
    Ok(ManagerConfig {
        manager_id: format!("conformance-{}-{}", slug(name), random_suffix()),
        backend: name.to_owned(),
        store_root,
        state_dir,
        insecure_no_auth: true,
        token_file: None,
        shutdown_grace_seconds: 5,
        ..ManagerConfig::default()
    })
}

/// Polls `GetJob` every [`POLL_INTERVAL`] until the job is in one of `wanted`, failing
/// at once if it ends in another state, or after `within`, saying what it last saw.
pub async fn wait_for_state(
    client: &mut ManagerClient<Channel>,
    job_id: &str,
    wanted: &[JobState],
    within: Duration,
) -> Result<pb::BackendJobStatus> {
    let mut last: Option<pb::BackendJobStatus> = None;
    let polling = async {
        loop {
            let status = client
                .get_job(pb::ManagerGetJobRequest {
                    job_id: job_id.to_owned(),
                })
                .await
                .map_err(|s| anyhow!("GetJob {job_id:?}: {}", show(&s)))?
                .into_inner();
            if wanted.contains(&status.state()) {
                return Ok(status);
            }
            if is_terminal(status.state()) {
                bail!(
                    "job {job_id:?} ended as {} while waiting for {wanted:?}",
                    describe(&status)
                );
            }
            last = Some(status);
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    match tokio::time::timeout(within, polling).await {
        Ok(outcome) => outcome,
        Err(_) => bail!(
            "job {job_id:?} did not reach {wanted:?} within {within:?}; last seen: {}",
            last.as_ref().map_or_else(|| "nothing".to_owned(), describe)
        ),
    }
}

/// Every job `ListOwn` returns, all pages.
pub async fn list_own(client: &mut ManagerClient<Channel>) -> Result<Vec<pb::BackendJobStatus>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    for _ in 0..1000 {
        let page = call(
            "ListOwn",
            client.list_own(pb::ManagerListOwnRequest {
                page: Some(pb::PageRequest {
                    page_size: 100,
                    page_token: page_token.clone(),
                }),
                states: Vec::new(),
            }),
        )
        .await?;
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        ensure!(
            page.next_page_token != page_token,
            "ListOwn returned the same page token twice"
        );
        page_token = page.next_page_token;
    }
    bail!("ListOwn did not end within 1000 pages")
}

/// A job's log as one `Logs` call gave it.
#[derive(Debug, Clone, Default)]
pub struct LogRead {
    /// Every chunk's bytes, decoded with replacement.
    pub text: String,
    /// A chunk said `eof`.
    pub eof: bool,
    /// Chunks received.
    pub chunks: usize,
}

impl LogRead {
    /// The text's lines.
    pub fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }
}

/// Reads the job's log (`tail_lines`, `follow`) until the stream ends, checking that each
/// chunk names the job and that none follows an `eof` chunk; fails after `within`, with
/// what it had so far.
pub async fn read_logs(
    client: &mut ManagerClient<Channel>,
    job_id: &str,
    tail_lines: Option<u32>,
    follow: bool,
    within: Duration,
) -> Result<LogRead> {
    let mut read = LogRead::default();
    let reading = async {
        let mut stream = client
            .logs(pb::ManagerLogsRequest {
                job_id: job_id.to_owned(),
                tail_lines,
                follow,
            })
            .await
            .map_err(|s| anyhow!("Logs {job_id:?}: {}", show(&s)))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| anyhow!("Logs {job_id:?} stream: {}", show(&s)))?
        {
            ensure!(
                !read.eof,
                "Logs {job_id:?} sent a chunk after the eof chunk"
            );
            ensure!(
                chunk.job_id == job_id,
                "Logs {job_id:?} sent a chunk of job {:?}",
                chunk.job_id
            );
            bytes.extend_from_slice(&chunk.data);
            read.text = String::from_utf8_lossy(&bytes).into_owned();
            read.chunks += 1;
            read.eof |= chunk.eof;
        }
        Ok(())
    };
    match tokio::time::timeout(within, reading).await {
        Ok(outcome) => outcome?,
        Err(_) => bail!(
            "Logs {job_id:?} (tail {tail_lines:?}, follow {follow}) did not end within \
             {within:?}; got so far:\n{}",
            read.text
        ),
    }
    Ok(read)
}

// ---------------------------------------------------------------------------------------
// The cases.

/// A boxed case, for [`run_all`].
type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// Runs every case, one after another, and fails listing each case that failed.
pub async fn run_all(h: &dyn Harness) -> Result<()> {
    let cases: Vec<(&str, CaseFuture<'_>)> = crate::conformance_tests!(@list calls (h));
    let mut failed = Vec::new();
    for (name, case) in cases {
        let started = Instant::now();
        match case.await {
            Ok(()) => eprintln!(
                "conformance {}: {name} ok ({:?})",
                h.name(),
                started.elapsed()
            ),
            Err(error) => {
                eprintln!("conformance {}: {name} FAILED: {error:#}", h.name());
                failed.push(format!("{name}: {error:#}"));
            }
        }
    }
    ensure!(
        failed.is_empty(),
        "{} conformance case(s) failed for {}:\n{}",
        failed.len(),
        h.name(),
        failed.join("\n")
    );
    Ok(())
}

/// A DS plugin copies its inputs to its outputs: the job succeeds (pfcon's
/// `finishedSuccessfully`), runs the command pfcon builds, its outputs are the inputs
/// (owned by the configured user), and its log has what the plugin printed.
pub async fn success_with_outputs(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "ok").await?;
    let outcome = success_with_outputs_body(&mut case).await;
    case.close(outcome).await
}

async fn success_with_outputs_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("copy");
    let inputs: BTreeMap<&str, &str> = [
        ("a.txt", "alpha\n"),
        ("sub/b.txt", "beta\n"),
        (".hidden", "hidden\n"),
        ("with space.txt", "spaced\n"),
    ]
    .into();
    let incoming = case.incoming(&id);
    for (path, content) in &inputs {
        let file = incoming.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
    }
    let mut spec = case.spec(&id, "copy.sh", PluginType::Ds, &["--dir", "home/u/uploads"]);
    spec.args_path_flags = vec!["--dir".into()];
    let scheduled = case.schedule(spec.clone()).await?;
    ensure!(scheduled.created, "a new job must come back created");
    let status = scheduled.status.context("Schedule answered no status")?;
    ensure!(
        status.job_id == id,
        "Schedule answered job {:?}",
        status.job_id
    );
    let mut command = spec.entrypoint.clone();
    command.extend(
        [
            "--dir",
            "/share/incoming",
            "/share/incoming",
            "/share/outgoing",
        ]
        .map(String::from),
    );
    ensure!(
        status.command == command,
        "the command must be pfcon's: expected {command:?}, got {:?}",
        status.command
    );

    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    ensure!(
        done.image == spec.image,
        "status image {:?}, expected {:?}",
        done.image,
        spec.image
    );

    let outgoing = case.outgoing(&id);
    let listing = file_contents(&outgoing)?;
    for (path, content) in &inputs {
        ensure!(
            listing.get(*path).map(String::as_str) == Some(*content),
            "outgoing {path:?}: expected {content:?}, got {:?} (outgoing holds {:?})",
            listing.get(*path),
            listing.keys().collect::<Vec<_>>()
        );
    }
    let run: serde_json::Value = serde_json::from_str(
        listing
            .get("run.json")
            .context("the plugin wrote no run.json")?,
    )
    .context("run.json")?;
    if let Some((uid, gid)) = case.h.container_user() {
        ensure!(
            run["uid"] == uid && run["gid"] == gid,
            "the plugin ran as {}:{}, expected {uid}:{gid}",
            run["uid"],
            run["gid"]
        );
        for (path, (owner, group)) in owners(&outgoing)? {
            ensure!(
                (owner, group) == (uid, gid),
                "outgoing {path:?} is owned by {owner}:{group}, expected {uid}:{gid}"
            );
        }
    }

    let logs = case.logs(&id, None, false).await?;
    ensure!(
        logs.text.contains("copy: copied 4 files"),
        "the log lacks the plugin's output:\n{}",
        logs.text
    );
    Ok(())
}

/// A plugin exiting 3 fails with reason EXIT_CODE 3 (pfcon's `finishedWithError`).
pub async fn failure_with_exit_code(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "exit").await?;
    let outcome = failure_with_exit_code_body(&mut case).await;
    case.close(outcome).await
}

async fn failure_with_exit_code_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("exit3");
    let spec = case.spec(&id, "exit.sh", PluginType::Fs, &["--code", "3"]);
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Failed], FINISH_TIMEOUT)
        .await?;
    let reason = done.reason.clone().unwrap_or_default();
    ensure!(
        reason.code() == ReasonCode::ExitCode && reason.exit_code == Some(3),
        "expected reason EXIT_CODE 3, got {}",
        describe(&done)
    );
    check_finished(&done, PfconStatus::FinishedWithError)?;
    let logs = case.logs(&id, None, false).await?;
    ensure!(
        logs.text.contains("exit: exiting with code 3"),
        "the log lacks the plugin's output:\n{}",
        logs.text
    );
    Ok(())
}

/// A plugin that outgrows a 32 MiB memory limit is killed and reported OOM_KILLED.
pub async fn oom_reported(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "oom").await?;
    let outcome = oom_reported_body(&mut case).await;
    case.close(outcome).await
}

async fn oom_reported_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("hog");
    let mut spec = case.spec(&id, "hog.sh", PluginType::Fs, &["--mib", "256"]);
    spec.memory_mib = 32;
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Failed], FINISH_TIMEOUT)
        .await?;
    let reason = done.reason.clone().unwrap_or_default();
    let flagged = reason.code() == ReasonCode::OomKilled;
    let by_exit_code = !case.h.reports_oom_kills()
        && matches!(reason.code(), ReasonCode::OomKilled | ReasonCode::ExitCode)
        && reason.exit_code == Some(137);
    ensure!(
        flagged || by_exit_code,
        "expected reason OOM_KILLED, got {}",
        describe(&done)
    );
    check_finished(&done, PfconStatus::FinishedWithError)?;
    Ok(())
}

/// A job past its `time_limit_seconds` is killed by the manager and fails TIME_LIMIT.
pub async fn time_limit_enforced(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "tlimit").await?;
    let outcome = time_limit_enforced_body(&mut case).await;
    case.close(outcome).await
}

async fn time_limit_enforced_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("sleep");
    let mut spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    spec.time_limit_seconds = 2;
    let scheduled_at = Instant::now();
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Failed], TIME_LIMIT_DEADLINE)
        .await
        .context("a job with a 2 s time limit must be stopped within 15 s of Schedule")?;
    ensure!(
        done.reason.clone().unwrap_or_default().code() == ReasonCode::TimeLimit,
        "expected reason TIME_LIMIT, got {}",
        describe(&done)
    );
    check_finished(&done, PfconStatus::FinishedWithError)?;
    eprintln!(
        "time limit: stopped {:?} after Schedule",
        scheduled_at.elapsed()
    );
    // The job really stopped: its log is complete and has no "done".
    let logs = case.logs(&id, None, true).await?;
    ensure!(
        logs.text.contains("started") && !logs.text.contains("done"),
        "log of a job killed at its time limit:\n{}",
        logs.text
    );
    Ok(())
}

/// Cancel stops a running job: CANCELLED (reason CANCELLED, pfcon `finishedWithError`),
/// the engine no longer runs it (a followed log ends), its log stays readable, and a
/// second Cancel changes nothing.
pub async fn cancel_running(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "cancel").await?;
    let outcome = cancel_running_body(&mut case).await;
    case.close(outcome).await
}

async fn cancel_running_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("sleep");
    let spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    case.schedule(spec).await?;
    case.wait_for_state(&id, &[JobState::Running], START_TIMEOUT)
        .await?;
    // Running is not yet printing: cancel once the plugin has said it started.
    case.wait_for_log(&id, "started", START_TIMEOUT).await?;
    let cancelled = case.cancel(&id).await?;
    ensure!(
        cancelled.state() == JobState::Cancelled,
        "Cancel answered {}",
        describe(&cancelled)
    );
    let followed = tokio::time::timeout(KILL_TIMEOUT, case.logs(&id, None, true))
        .await
        .map_err(|_| {
            anyhow!(
                "a followed log of a cancelled job must end within {KILL_TIMEOUT:?}: it still runs"
            )
        })??;
    ensure!(followed.eof, "a followed log must end with an eof chunk");
    ensure!(
        followed.text.contains("started") && !followed.text.contains("done"),
        "log of a cancelled job:\n{}",
        followed.text
    );
    let status = case.get(&id).await?;
    ensure!(
        status.state() == JobState::Cancelled
            && status.reason.clone().unwrap_or_default().code() == ReasonCode::Cancelled,
        "expected CANCELLED with reason CANCELLED, got {}",
        describe(&status)
    );
    check_finished(&status, PfconStatus::FinishedWithError)?;
    let again = case.cancel(&id).await?;
    ensure!(
        again.state() == JobState::Cancelled,
        "a second Cancel answered {}",
        describe(&again)
    );
    Ok(())
}

/// A followed log gives every line in order and ends with eof after the job; afterwards a
/// tail of 5 gives the last 5 lines, and a tail of 0 none.
pub async fn logs_tail_and_follow(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "logs").await?;
    let outcome = logs_tail_and_follow_body(&mut case).await;
    case.close(outcome).await
}

async fn logs_tail_and_follow_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("chatty");
    let spec = case.spec(&id, "chatty.sh", PluginType::Fs, &["--lines", "30"]);
    case.schedule(spec).await?;
    let all: Vec<String> = (1..=30).map(|i| format!("line {i}")).collect();
    // Followed from right after Schedule, while the job is queued or running.
    let followed = case.logs(&id, None, true).await?;
    ensure!(followed.eof, "a followed log must end with an eof chunk");
    ensure!(
        followed.lines() == all,
        "followed log, expected line 1 to line 30 in order:\n{}",
        followed.text
    );
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    let tail = case.logs(&id, Some(5), false).await?;
    ensure!(
        tail.lines() == all[25..],
        "tail 5, expected lines 26 to 30:\n{}",
        tail.text
    );
    let none = case.logs(&id, Some(0), false).await?;
    ensure!(none.text.is_empty(), "tail 0 gave:\n{}", none.text);
    let whole = case.logs(&id, None, false).await?;
    ensure!(whole.lines() == all, "whole log:\n{}", whole.text);
    Ok(())
}

/// A plugin cannot write, change or remove anything in `/share/incoming`.
pub async fn input_mount_read_only(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "ro").await?;
    let outcome = input_mount_read_only_body(&mut case).await;
    case.close(outcome).await
}

async fn input_mount_read_only_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("readonly");
    let incoming = case.incoming(&id);
    std::fs::create_dir_all(&incoming)?;
    std::fs::write(incoming.join("existing.txt"), "original\n")?;
    let before = file_contents(&incoming)?;
    let spec = case.spec(&id, "readonly.sh", PluginType::Ds, &[]);
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    let report = std::fs::read_to_string(case.outgoing(&id).join("readonly.txt"))
        .context("the plugin wrote no readonly.txt")?;
    ensure!(
        report.trim() == "incoming: read-only",
        "the plugin could write its inputs: {}",
        report.trim()
    );
    let after = file_contents(&incoming)?;
    ensure!(
        after == before,
        "incoming changed: before {before:?}, after {after:?}"
    );
    Ok(())
}

/// A job's CPU (500 millicores) and memory (100 MiB) limits are what the engine applies.
pub async fn limits_visible(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "limits").await?;
    let outcome = limits_visible_body(&mut case).await;
    case.close(outcome).await
}

async fn limits_visible_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("sleep");
    let mut spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    spec.cpu_millicores = 500;
    spec.memory_mib = 100;
    case.schedule(spec).await?;
    case.wait_for_state(&id, &[JobState::Running], START_TIMEOUT)
        .await?;
    let observed = case.h.limits(&id).await.context("reading the limits")?;
    let expected = ObservedLimits {
        cpu_millicores: 500,
        memory_mib: 100,
    };
    ensure!(
        observed == expected,
        "the engine applies {observed:?}, expected {expected:?}"
    );
    case.cancel(&id).await?;
    Ok(())
}

/// Schedule is idempotent on the job id: a replay of an active or succeeded job returns it
/// (created false, listed once); a failed one is started again; of two concurrent
/// Schedules of one new id exactly one creates it.
pub async fn idempotent_submit(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "idem").await?;
    let outcome = idempotent_submit_body(&mut case).await;
    case.close(outcome).await
}

async fn idempotent_submit_body(case: &mut Case<'_>) -> Result<()> {
    // Active.
    let id = case.new_job_id("running");
    let spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    ensure!(
        case.schedule(spec.clone()).await?.created,
        "the first Schedule must create the job"
    );
    let replay = case.schedule(spec.clone()).await?;
    ensure!(
        !replay.created,
        "a replay of an active job must not create it"
    );
    ensure!(
        replay.status.as_ref().is_some_and(|s| s.job_id == id),
        "the replay answered {:?}",
        replay.status
    );
    let listed = list_own(&mut case.client).await?;
    let count = listed.iter().filter(|job| job.job_id == id).count();
    ensure!(count == 1, "ListOwn lists the job {count} times");
    case.cancel(&id).await?;

    // Succeeded.
    let id = case.new_job_id("done");
    let spec = case.spec(&id, "exit.sh", PluginType::Fs, &["--code", "0"]);
    case.schedule(spec.clone()).await?;
    case.wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    let replay = case.schedule(spec).await?;
    ensure!(
        !replay.created,
        "a replay of a succeeded job must not run it again"
    );
    let state = replay.status.as_ref().map(pb::BackendJobStatus::state);
    ensure!(
        state == Some(JobState::Succeeded),
        "the replay of a succeeded job answered {state:?}"
    );

    // Failed: removed and started again.
    let id = case.new_job_id("failed");
    let spec = case.spec(&id, "exit.sh", PluginType::Fs, &["--code", "3"]);
    case.schedule(spec.clone()).await?;
    case.wait_for_state(&id, &[JobState::Failed], FINISH_TIMEOUT)
        .await?;
    let replay = case.schedule(spec).await?;
    ensure!(
        replay.created,
        "a replay of a failed job must start it again"
    );
    case.wait_for_state(&id, &[JobState::Failed], FINISH_TIMEOUT)
        .await?;

    // Concurrent.
    let id = case.new_job_id("race");
    let spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    let request = |spec: pb::JobSpec| pb::ManagerScheduleRequest {
        spec: Some(spec),
        staging: None,
        attempt: 0,
    };
    let (mut first, mut second) = (case.client.clone(), case.client.clone());
    let (a, b) = tokio::time::timeout(CALL_TIMEOUT, async {
        tokio::join!(
            first.schedule(request(spec.clone())),
            second.schedule(request(spec.clone()))
        )
    })
    .await
    .context("two concurrent Schedules did not answer in time")?;
    let a = a.map_err(|s| anyhow!("concurrent Schedule: {}", show(&s)))?;
    let b = b.map_err(|s| anyhow!("concurrent Schedule: {}", show(&s)))?;
    let created = [a.get_ref().created, b.get_ref().created];
    ensure!(
        created.iter().filter(|c| **c).count() == 1,
        "two concurrent Schedules of one id: created {created:?}, expected exactly one"
    );
    let listed = list_own(&mut case.client).await?;
    let count = listed.iter().filter(|job| job.job_id == id).count();
    ensure!(count == 1, "ListOwn lists the raced job {count} times");
    case.cancel(&id).await?;
    Ok(())
}

/// A manager restarted over the same engine finds a running job (GetJob, ListOwn) and
/// sees it through to its end.
pub async fn restart_finds_job(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "restart").await?;
    let outcome = restart_finds_job_body(&mut case).await;
    case.close(outcome).await
}

async fn restart_finds_job_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("sleep");
    // Long enough to outlast the restart, short enough to end soon after.
    let spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "8"]);
    case.schedule(spec).await?;
    case.wait_for_state(&id, &[JobState::Running], START_TIMEOUT)
        .await?;
    case.restart_manager().await?;
    let found = case
        .get(&id)
        .await
        .context("the restarted manager must know the job")?;
    ensure!(
        found.state() == JobState::Running,
        "after the restart the job is {}",
        describe(&found)
    );
    let listed = list_own(&mut case.client).await?;
    ensure!(
        listed.iter().filter(|job| job.job_id == id).count() == 1,
        "the restarted manager's ListOwn lacks the job: {:?}",
        listed.iter().map(|job| &job.job_id).collect::<Vec<_>>()
    );
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    Ok(())
}

/// A manager restarted while a job runs still stops it at its time limit.
pub async fn time_limit_survives_restart(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "tlrestart").await?;
    let outcome = time_limit_survives_restart_body(&mut case).await;
    case.close(outcome).await
}

async fn time_limit_survives_restart_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("sleep");
    let mut spec = case.spec(&id, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    spec.time_limit_seconds = 4;
    case.schedule(spec).await?;
    case.wait_for_state(&id, &[JobState::Running], START_TIMEOUT)
        .await?;
    case.restart_manager().await?;
    let done = case
        .wait_for_state(&id, &[JobState::Failed], KILL_TIMEOUT)
        .await
        .context("the restarted manager must still stop the job at its time limit")?;
    ensure!(
        done.reason.clone().unwrap_or_default().code() == ReasonCode::TimeLimit,
        "expected reason TIME_LIMIT, got {}",
        describe(&done)
    );
    Ok(())
}

/// Remove (of a finished and of a running job) leaves nothing: GetJob NOT_FOUND, not in
/// ListOwn, nothing in the engine, no staging area; a second Remove answers false.
pub async fn removal_leaves_nothing(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "remove").await?;
    let outcome = removal_leaves_nothing_body(&mut case).await;
    case.close(outcome).await
}

async fn removal_leaves_nothing_body(case: &mut Case<'_>) -> Result<()> {
    let finished = case.new_job_id("finished");
    let spec = case.spec(&finished, "exit.sh", PluginType::Fs, &["--code", "0"]);
    case.schedule(spec).await?;
    case.wait_for_state(&finished, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    let running = case.new_job_id("running");
    let spec = case.spec(&running, "sleep.sh", PluginType::Fs, &["--seconds", "60"]);
    case.schedule(spec).await?;
    case.wait_for_state(&running, &[JobState::Running], START_TIMEOUT)
        .await?;

    for id in [finished, running] {
        ensure!(
            case.remove(&id, true).await?,
            "Remove of {id:?} answered removed=false"
        );
        match case
            .client
            .get_job(pb::ManagerGetJobRequest { job_id: id.clone() })
            .await
        {
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => bail!("GetJob after Remove: {}", show(&status)),
            Ok(status) => bail!("GetJob after Remove found {}", describe(status.get_ref())),
        }
        let listed = list_own(&mut case.client).await?;
        ensure!(
            !listed.iter().any(|job| job.job_id == id),
            "ListOwn still lists {id:?} after Remove"
        );
        // Allow an engine that deletes in the background a moment to finish.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = case.h.leftovers(&id).await?;
            if left.is_empty() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "after Remove the engine still holds for {id:?}: {left:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let area = case.h.store_root().join(format!("key-{id}"));
        ensure!(
            !area.exists(),
            "Remove with remove_staging_area left {}",
            area.display()
        );
        ensure!(
            !case.remove(&id, true).await?,
            "a second Remove of {id:?} must answer removed=false"
        );
    }
    Ok(())
}

/// Schedule refuses a bad spec with INVALID_ARGUMENT naming the field (workers beyond the
/// backend's maximum: FAILED_PRECONDITION or INVALID_ARGUMENT), and creates nothing.
pub async fn bad_input_named(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "bad").await?;
    let outcome = bad_input_named_body(&mut case).await;
    case.close(outcome).await
}

async fn bad_input_named_body(case: &mut Case<'_>) -> Result<()> {
    const INVALID: &[Code] = &[Code::InvalidArgument];
    const UNSUPPORTED: &[Code] = &[Code::FailedPrecondition, Code::InvalidArgument];
    let max_workers = case
        .capabilities
        .capabilities
        .as_ref()
        .map_or(1, |c| c.max_workers.max(1));
    type Change = Box<dyn Fn(&mut pb::JobSpec)>;
    let changes: Vec<(&str, Change, &[Code], &str)> = vec![
        (
            "empty entrypoint",
            Box::new(|s| s.entrypoint.clear()),
            INVALID,
            "entrypoint",
        ),
        (
            "empty image",
            Box::new(|s| s.image.clear()),
            INVALID,
            "image",
        ),
        (
            "unknown plugin type 99",
            Box::new(|s| s.plugin_type = 99),
            INVALID,
            "plugin_type",
        ),
        (
            "unset plugin type",
            Box::new(|s| s.plugin_type = 0),
            INVALID,
            "plugin_type",
        ),
        (
            "memory_mib 0",
            Box::new(|s| s.memory_mib = 0),
            INVALID,
            "memory_mib",
        ),
        (
            "cpu_millicores 0",
            Box::new(|s| s.cpu_millicores = 0),
            INVALID,
            "cpu_millicores",
        ),
        (
            "cpu_millicores 10^9",
            Box::new(|s| s.cpu_millicores = 1_000_000_000),
            INVALID,
            "cpu_millicores",
        ),
        (
            "memory_mib 2^40 (an exbibyte)",
            Box::new(|s| s.memory_mib = 1 << 40),
            INVALID,
            "memory_mib",
        ),
        (
            "env without =",
            Box::new(|s| s.env = vec!["NOEQUALS".into()]),
            INVALID,
            "env",
        ),
        (
            "time limit over 30 days",
            Box::new(|s| s.time_limit_seconds = 31 * 24 * 3600),
            INVALID,
            "time_limit_seconds",
        ),
        (
            "workers past the backend's maximum",
            Box::new(move |s| s.workers = max_workers + 1),
            UNSUPPORTED,
            "workers",
        ),
    ];
    // Every bad input is tried, and every mismatch reported at once.
    let mut wrong = Vec::new();
    for (what, change, codes, field) in changes {
        let id = case.new_job_id("bad");
        let mut spec = case.spec(&id, "exit.sh", PluginType::Fs, &[]);
        change(&mut spec);
        if let Err(error) = expect_refused(case, spec, codes, field).await {
            wrong.push(format!("a spec with {what}: {error:#}"));
            continue;
        }
        match case
            .client
            .get_job(pb::ManagerGetJobRequest { job_id: id.clone() })
            .await
        {
            Err(status) if status.code() == Code::NotFound => {}
            other => wrong.push(format!("a refused spec ({what}) left a job: {other:?}")),
        }
    }
    // Ids that are not one plain name: `a/b` is not a single path component, `a b` no
    // engine's name (pfcon strips a leading `/`, so `/x` alone is fine).
    let long = "x".repeat(129);
    for bad_id in ["a/b", "a b", "", "/", ".hidden", "a\nb", long.as_str()] {
        let spec = case.spec(bad_id, "exit.sh", PluginType::Fs, &[]);
        if let Err(error) = expect_refused(case, spec, INVALID, "job_id").await {
            if error.to_string().starts_with(ACCEPTED) {
                // It runs: remove it with the others.
                case.jobs.push(bad_id.to_owned());
            }
            wrong.push(format!("job id {bad_id:?}: {error:#}"));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} bad input(s) not refused as expected:\n  {}",
        wrong.len(),
        wrong.join("\n  ")
    );
    Ok(())
}

/// How [`expect_refused`]'s error starts when the spec was accepted.
const ACCEPTED: &str = "accepted";

async fn expect_refused(
    case: &mut Case<'_>,
    spec: pb::JobSpec,
    codes: &[Code],
    field: &str,
) -> Result<()> {
    let answer = tokio::time::timeout(
        CALL_TIMEOUT,
        case.client.schedule(pb::ManagerScheduleRequest {
            spec: Some(spec),
            staging: None,
            attempt: 0,
        }),
    )
    .await
    .context("Schedule did not answer")?;
    match answer {
        Ok(accepted) => bail!("{ACCEPTED}: {:?}", accepted.get_ref().status),
        Err(status) => {
            ensure!(
                codes.contains(&status.code()) && status.message().contains(field),
                "expected {codes:?} naming `{field}`, got {}",
                show(&status)
            );
            Ok(())
        }
    }
}

/// An image that is missing and cannot be pulled is refused within 20 s with
/// FAILED_PRECONDITION naming the image; a backend that runs no images
/// ([`Harness::runs_images`]) runs the job regardless.
pub async fn image_missing_fails_fast(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "noimage").await?;
    let outcome = if h.runs_images() {
        image_missing_fails_fast_body(&mut case).await
    } else {
        image_is_ignored_body(&mut case).await
    };
    case.close(outcome).await
}

/// Where no images run (local processes), the image is documented as ignored: a job
/// naming one that exists nowhere runs all the same.
async fn image_is_ignored_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("noimage");
    let mut spec = case.spec(&id, "exit.sh", PluginType::Fs, &["--code", "0"]);
    spec.image = "localhost/no-such-image:1".into();
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_finished(&done, PfconStatus::FinishedSuccessfully)
}

async fn image_missing_fails_fast_body(case: &mut Case<'_>) -> Result<()> {
    const MISSING: &str = "localhost/no-such-image:1";
    let id = case.new_job_id("noimage");
    let mut spec = case.spec(&id, "exit.sh", PluginType::Fs, &[]);
    spec.image = MISSING.into();
    let answer = tokio::time::timeout(
        MISSING_IMAGE_DEADLINE,
        case.client.schedule(pb::ManagerScheduleRequest {
            spec: Some(spec),
            staging: None,
            attempt: 0,
        }),
    )
    .await
    .map_err(|_| {
        anyhow!("Schedule with a missing image did not answer within {MISSING_IMAGE_DEADLINE:?}")
    })?;
    match answer {
        Ok(accepted) => bail!(
            "Schedule with a missing image was accepted: {:?}",
            accepted.get_ref().status
        ),
        Err(status) => ensure!(
            status.code() == Code::FailedPrecondition && status.message().contains(MISSING),
            "expected FAILED_PRECONDITION naming {MISSING}, got {}",
            show(&status)
        ),
    }
    Ok(())
}

/// The manager passes outputs as the plugin wrote them (filtering links is the broker's
/// business): symlinks and `.chrislink` files are in `outgoing` after success. This is
/// also the fixture the broker's link tests stage out.
pub async fn links_not_passed(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "links").await?;
    let outcome = links_not_passed_body(&mut case).await;
    case.close(outcome).await
}

async fn links_not_passed_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("links");
    let spec = case.spec(&id, "links.sh", PluginType::Fs, &[]);
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    let outgoing = case.outgoing(&id);
    ensure!(std::fs::read_to_string(outgoing.join("data.txt"))? == "plain data\n");
    ensure!(std::fs::read_link(outgoing.join("data-link"))? == Path::new("data.txt"));
    ensure!(std::fs::read_link(outgoing.join("etc-link"))? == Path::new("/etc"));
    ensure!(
        std::fs::read_to_string(outgoing.join("feed.chrislink"))? == "home/someone/feeds/feed_1"
    );
    Ok(())
}

/// A plugin writing 300 files leaves all 300 in `outgoing`.
pub async fn many_outputs(h: &dyn Harness) -> Result<()> {
    let mut case = Case::open(h, "many").await?;
    let outcome = many_outputs_body(&mut case).await;
    case.close(outcome).await
}

async fn many_outputs_body(case: &mut Case<'_>) -> Result<()> {
    let id = case.new_job_id("many");
    let spec = case.spec(&id, "many.sh", PluginType::Fs, &["--files", "300"]);
    case.schedule(spec).await?;
    let done = case
        .wait_for_state(&id, &[JobState::Succeeded], FINISH_TIMEOUT)
        .await?;
    check_succeeded(&done)?;
    let listing = file_contents(&case.outgoing(&id))?;
    ensure!(
        listing.len() == 300,
        "outgoing holds {} files",
        listing.len()
    );
    for i in 1..=300 {
        let name = format!("file-{i:06}.txt");
        ensure!(
            listing.get(&name).map(String::as_str) == Some(format!("file {i}\n").as_str()),
            "outgoing {name}: {:?}",
            listing.get(&name)
        );
    }
    Ok(())
}

/// One `#[tokio::test]` per conformance case, each with a harness of its own:
///
/// ```text
/// mod docker_engine {
///     dispatch_testkit::conformance_tests!(crate::DockerHarness::new());
/// }
/// ```
///
/// The argument is an expression giving a future of `anyhow::Result<H>` with `H:
/// Harness`; it is evaluated once per test. The calling crate needs `tokio` (with
/// `macros` and `rt-multi-thread`) and `anyhow`.
#[macro_export]
macro_rules! conformance_tests {
    // The one list of cases.
    (@list $mode:ident $args:tt) => {
        $crate::conformance_tests! { @$mode $args
            success_with_outputs
            failure_with_exit_code
            oom_reported
            time_limit_enforced
            cancel_running
            logs_tail_and_follow
            input_mount_read_only
            limits_visible
            idempotent_submit
            restart_finds_job
            time_limit_survives_restart
            removal_leaves_nothing
            bad_input_named
            image_missing_fails_fast
            links_not_passed
            many_outputs
        }
    };
    (@tests ($make:expr) $($case:ident)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> ::anyhow::Result<()> {
                let harness = $make.await?;
                $crate::conformance::$case(&harness).await
            }
        )*
    };
    (@calls ($h:expr) $($case:ident)*) => {
        vec![$((
            stringify!($case),
            Box::pin($crate::conformance::$case($h)) as $crate::conformance::__CaseFuture<'_>,
        )),*]
    };
    // The public form; after the internal ones, so `@...` never reaches the expr parser.
    ($make:expr) => {
        $crate::conformance_tests!(@list tests ($make));
    };
}

#[doc(hidden)]
pub type __CaseFuture<'a> = CaseFuture<'a>;

// ---------------------------------------------------------------------------------------
// What the cases share.

/// One case's manager, client and jobs; removes the jobs when closed.
struct Case<'h> {
    h: &'h dyn Harness,
    label: &'static str,
    manager: Option<RunningManager>,
    client: ManagerClient<Channel>,
    capabilities: pb::ManagerCapabilitiesResponse,
    jobs: Vec<String>,
}

impl<'h> Case<'h> {
    async fn open(h: &'h dyn Harness, label: &'static str) -> Result<Self> {
        let (manager, client, capabilities) = connect(h).await?;
        Ok(Self {
            h,
            label,
            manager: Some(manager),
            client,
            capabilities,
            jobs: Vec::new(),
        })
    }

    /// A fresh job id, removed when the case closes.
    fn new_job_id(&mut self, what: &str) -> String {
        let mut name = slug(self.h.name());
        name.truncate(40);
        let id = format!("{name}-{}-{what}-{}", self.label, random_suffix());
        self.jobs.push(id.clone());
        id
    }

    fn spec(
        &self,
        job_id: &str,
        plugin: &str,
        plugin_type: PluginType,
        args: &[&str],
    ) -> pb::JobSpec {
        pb::JobSpec {
            job_id: job_id.to_owned(),
            image: self.h.image(),
            entrypoint: self.h.plugin(plugin),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            plugin_type: plugin_type.into(),
            env: vec![format!("CONFORMANCE_CASE={}", self.label)],
            cpu_millicores: 1000,
            memory_mib: 256,
            workers: 1,
            auid: "conformance".into(),
            storage_mode: pb::StorageMode::Zipfile.into(),
            ..pb::JobSpec::default()
        }
    }

    fn incoming(&self, job_id: &str) -> PathBuf {
        self.h.store_root().join(format!("key-{job_id}/incoming"))
    }

    fn outgoing(&self, job_id: &str) -> PathBuf {
        self.h.store_root().join(format!("key-{job_id}/outgoing"))
    }

    async fn schedule(&mut self, spec: pb::JobSpec) -> Result<pb::ManagerScheduleResponse> {
        let job_id = spec.job_id.clone();
        let answer = call(
            &format!("Schedule {job_id:?}"),
            self.client.schedule(pb::ManagerScheduleRequest {
                spec: Some(spec),
                staging: None,
                attempt: 0,
            }),
        )
        .await;
        match answer {
            Ok(answer) => Ok(answer),
            Err(error) => Err(self.explain(error).await),
        }
    }

    async fn get(&mut self, job_id: &str) -> Result<pb::BackendJobStatus> {
        call(
            &format!("GetJob {job_id:?}"),
            self.client.get_job(pb::ManagerGetJobRequest {
                job_id: job_id.to_owned(),
            }),
        )
        .await
    }

    async fn cancel(&mut self, job_id: &str) -> Result<pb::BackendJobStatus> {
        call(
            &format!("Cancel {job_id:?}"),
            self.client.cancel(pb::ManagerCancelRequest {
                job_id: job_id.to_owned(),
                message: "cancelled by the conformance suite".into(),
            }),
        )
        .await
    }

    async fn remove(&mut self, job_id: &str, staging: bool) -> Result<bool> {
        let answer = call(
            &format!("Remove {job_id:?}"),
            self.client.remove(pb::ManagerRemoveRequest {
                job_id: job_id.to_owned(),
                remove_staging_area: staging,
            }),
        )
        .await?;
        Ok(answer.removed)
    }

    async fn wait_for_state(
        &mut self,
        job_id: &str,
        wanted: &[JobState],
        within: Duration,
    ) -> Result<pb::BackendJobStatus> {
        wait_for_state(&mut self.client, job_id, wanted, within).await
    }

    async fn logs(&mut self, job_id: &str, tail: Option<u32>, follow: bool) -> Result<LogRead> {
        let within = if follow { FINISH_TIMEOUT } else { CALL_TIMEOUT };
        read_logs(&mut self.client, job_id, tail, follow, within).await
    }

    /// Polls the job's whole log every [`POLL_INTERVAL`] until it contains `needle`.
    async fn wait_for_log(&mut self, job_id: &str, needle: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.logs(job_id, None, false).await?;
            if log.text.contains(needle) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the log of {job_id:?} did not show {needle:?} within {within:?}; it has:\n{}",
                log.text
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the manager (letting it drain) and starts a new one over a new backend.
    async fn restart_manager(&mut self) -> Result<()> {
        if let Some(manager) = self.manager.take() {
            manager.stop().await.context("stopping the manager")?;
        }
        let (manager, client, capabilities) =
            connect(self.h).await.context("restarting the manager")?;
        self.manager = Some(manager);
        self.client = client;
        self.capabilities = capabilities;
        Ok(())
    }

    async fn explain(&mut self, error: anyhow::Error) -> anyhow::Error {
        match self.manager.as_mut() {
            Some(manager) if manager.task.as_ref().is_some_and(JoinHandle::is_finished) => {
                manager.explain_async(error).await
            }
            _ => error,
        }
    }

    /// Removes every job the case made (with its staging area, unless `RETAIN_TMP=1` and
    /// the case failed), stops the manager, and returns the case's outcome (or, when the
    /// case passed, the clean-up's).
    async fn close(mut self, outcome: Result<()>) -> Result<()> {
        let retain = outcome.is_err() && std::env::var_os("RETAIN_TMP").is_some_and(|v| v == "1");
        let mut problems = Vec::new();
        if self.manager.is_none() {
            match connect(self.h).await {
                Ok((manager, client, _)) => {
                    self.manager = Some(manager);
                    self.client = client;
                }
                Err(error) => problems.push(format!("starting a manager to clean up: {error:#}")),
            }
        }
        if self.manager.is_some() {
            for id in std::mem::take(&mut self.jobs) {
                if let Err(error) = self.remove(&id, !retain).await {
                    problems.push(format!("{error:#}"));
                } else if retain {
                    eprintln!(
                        "RETAIN_TMP: keeping {}",
                        self.h.store_root().join(format!("key-{id}")).display()
                    );
                }
            }
        }
        if let Some(manager) = self.manager.take()
            && let Err(error) = manager.stop().await
        {
            problems.push(format!("{error:#}"));
        }
        match outcome {
            Err(error) => {
                if !problems.is_empty() {
                    eprintln!(
                        "conformance {} {}: clean-up after the failure also failed: {}",
                        self.h.name(),
                        self.label,
                        problems.join("; ")
                    );
                }
                Err(error)
            }
            Ok(()) if problems.is_empty() => Ok(()),
            Ok(()) => bail!("clean-up failed: {}", problems.join("; ")),
        }
    }
}

/// Starts a manager through the harness and checks it serves (Capabilities).
async fn connect(
    h: &dyn Harness,
) -> Result<(
    RunningManager,
    ManagerClient<Channel>,
    pb::ManagerCapabilitiesResponse,
)> {
    let mut manager = tokio::time::timeout(CALL_TIMEOUT, h.start_manager())
        .await
        .map_err(|_| anyhow!("the harness did not start a manager within {CALL_TIMEOUT:?}"))?
        .context("starting a manager")?;
    let mut client = manager.client().await?;
    let capabilities = match call(
        "Capabilities",
        client.capabilities(pb::ManagerCapabilitiesRequest {}),
    )
    .await
    {
        Ok(capabilities) => capabilities,
        Err(error) => return Err(manager.explain_async(error).await),
    };
    Ok((manager, client, capabilities))
}

/// Runs one unary call under [`CALL_TIMEOUT`], naming it in errors.
async fn call<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => bail!("{what}: {}", show(&status)),
        Err(_) => bail!("{what} did not answer within {CALL_TIMEOUT:?}"),
    }
}

fn check_succeeded(status: &pb::BackendJobStatus) -> Result<()> {
    ensure!(
        status.state() == JobState::Succeeded,
        "expected SUCCEEDED, got {}",
        describe(status)
    );
    let reason = status.reason.clone().unwrap_or_default();
    ensure!(
        matches!(
            reason.code(),
            ReasonCode::Unspecified | ReasonCode::ExitCode
        ) && reason.exit_code.unwrap_or(0) == 0,
        "a success with reason {}",
        describe(status)
    );
    check_finished(status, PfconStatus::FinishedSuccessfully)
}

fn check_finished(status: &pb::BackendJobStatus, pfcon: PfconStatus) -> Result<()> {
    ensure!(
        status.pfcon_status() == pfcon,
        "expected pfcon status {pfcon:?}, got {}",
        describe(status)
    );
    ensure!(
        status.timestamp.is_some(),
        "a finished job must carry pfcon's timestamp: {}",
        describe(status)
    );
    Ok(())
}

fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

/// A status in one line, for failure messages.
pub fn describe(status: &pb::BackendJobStatus) -> String {
    let reason = status.reason.clone().unwrap_or_default();
    format!(
        "{:?} (reason {:?}, exit code {:?}, {:?}; pfcon {:?}; engine says {:?})",
        status.state(),
        reason.code(),
        reason.exit_code,
        reason.message,
        status.pfcon_status(),
        status.message
    )
}

fn show(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Every regular file under `root` (relative path -> content), symlinks left out.
fn file_contents(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                let content = String::from_utf8_lossy(&std::fs::read(&path)?).into_owned();
                out.insert(rel, content);
            }
        }
    }
    Ok(out)
}

/// Owner and group of every entry under `root`.
fn owners(root: &Path) -> Result<Vec<(String, (u32, u32))>> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path.clone());
            }
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push((rel, (meta.uid(), meta.gid())));
        }
    }
    Ok(out)
}

/// `name` reduced to `[a-z0-9-]`.
fn slug(name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug.trim_matches('-');
    if slug.is_empty() {
        "backend".to_owned()
    } else {
        slug.to_owned()
    }
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_safe_and_unique() {
        assert_eq!(slug("Docker (podman)"), "docker--podman");
        assert_eq!(slug("--"), "backend");
        assert_ne!(random_suffix(), random_suffix());
    }

    #[test]
    fn the_case_list_names_every_case() {
        // Building the futures runs nothing; it checks that each listed name is a case.
        struct Nothing;
        #[async_trait::async_trait]
        impl Harness for Nothing {
            fn name(&self) -> &str {
                "nothing"
            }
            fn image(&self) -> String {
                String::new()
            }
            fn plugin(&self, _: &str) -> Vec<String> {
                Vec::new()
            }
            fn store_root(&self) -> PathBuf {
                PathBuf::new()
            }
            async fn start_manager(&self) -> Result<RunningManager> {
                bail!("not here")
            }
            async fn limits(&self, _: &str) -> Result<ObservedLimits> {
                bail!("not here")
            }
            async fn leftovers(&self, _: &str) -> Result<Vec<String>> {
                bail!("not here")
            }
            fn container_user(&self) -> Option<(u32, u32)> {
                None
            }
        }
        let h: &dyn Harness = &Nothing;
        let cases: Vec<(&str, CaseFuture<'_>)> = crate::conformance_tests!(@list calls (h));
        assert_eq!(cases.len(), 16);
    }
}

//! The local backend against real processes. Tests named `..._needs_cgroup` need a
//! writable cgroup memory controller (root on this project's machines) and fail without
//! one; `..._as_root` tests check the refusal instead when not run as root.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;

use dispatch_backend_local::{LocalBackend, LocalConfig, ReadOnlyIncoming, UseCgroups};
use dispatch_manager::backend::{
    Backend, BackendError, JobRequest, LogStream, Observed, UserId, labels,
};
use dispatch_proto::JobId;
use dispatch_proto::job::{BackendKind, CpuMillis, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};

/// One test's state directory, job directories and manager id.
struct Fixture {
    tmp: tempfile::TempDir,
    manager_id: String,
    state_dir: PathBuf,
    use_cgroups: UseCgroups,
    read_only_incoming: ReadOnlyIncoming,
}

impl Fixture {
    fn new(use_cgroups: UseCgroups) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let state_dir = tmp.path().join("state");
        Ok(Self {
            manager_id: format!("test-{}", uuid::Uuid::new_v4()),
            state_dir,
            tmp,
            use_cgroups,
            read_only_incoming: ReadOnlyIncoming::Auto,
        })
    }

    fn config(&self) -> LocalConfig {
        LocalConfig {
            use_cgroups: self.use_cgroups,
            read_only_incoming: self.read_only_incoming,
            ..LocalConfig::new(&self.state_dir)
        }
    }

    fn open(&self) -> Result<LocalBackend> {
        Ok(LocalBackend::open(&self.manager_id, self.config())?)
    }

    /// A request for `command` with fresh incoming and outgoing directories.
    fn request(&self, name: &str, command: &[&str]) -> Result<JobRequest> {
        let job_id = JobId::parse(&format!("{name}-{}", uuid::Uuid::new_v4()))?;
        let key = self.tmp.path().join(job_id.storage_key());
        let (incoming, outgoing) = (key.join("incoming"), key.join("outgoing"));
        std::fs::create_dir_all(&incoming)?;
        std::fs::create_dir_all(&outgoing)?;
        Ok(JobRequest {
            labels: BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
                (labels::JOB_ID.into(), job_id.to_string()),
                (labels::MANAGER_ID.into(), self.manager_id.clone()),
            ]),
            job_id,
            image: "localhost/busybox:test".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: vec![],
            cpu: CpuMillis(1000),
            memory: MemoryMib(256),
            gpus: 0,
            workers: 1,
            time_limit: None,
            incoming: Some(incoming),
            outgoing,
            user: None,
        })
    }

    fn job_dir(&self, job_id: &JobId) -> PathBuf {
        self.state_dir.join(job_id.as_str())
    }

    fn cgroups_of(&self, job_id: &JobId) -> Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string(self.job_dir(job_id).join("state.json"))?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        Ok(value["cgroups"]
            .as_array()
            .context("no cgroups in state.json")?
            .iter()
            .filter_map(|p| p.as_str().map(PathBuf::from))
            .collect())
    }
}

impl Drop for Fixture {
    /// Kills what a failed test left running and removes this manager's cgroups (a job's
    /// own cgroup goes when it ends: normally only the manager's empty ones are left).
    fn drop(&mut self) {
        for job in std::fs::read_dir(&self.state_dir).into_iter().flatten() {
            let Ok(job) = job else { continue };
            let Ok(text) = std::fs::read_to_string(job.path().join("state.json")) else {
                continue;
            };
            let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if state["finished_at"].is_null()
                && let Some(pid) = state["pid"].as_i64()
                && running(u32::try_from(pid).unwrap_or(0))
                && let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            for cgroup in state["cgroups"].as_array().into_iter().flatten() {
                let Some(cgroup) = cgroup.as_str() else {
                    continue;
                };
                let procs = std::fs::read_to_string(Path::new(cgroup).join("cgroup.procs"));
                for pid in procs.unwrap_or_default().lines() {
                    if let Some(pid) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
                for _ in 0..50 {
                    if std::fs::remove_dir(cgroup).is_ok() || !Path::new(cgroup).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for controller in ["memory", "cpu"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("chris-dispatch")
                .join(&self.manager_id);
            let _ = std::fs::remove_dir(dir);
        }
    }
}

async fn wait_finished(backend: &LocalBackend, job_id: &JobId) -> Result<Observed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let observed = backend.status(job_id).await?.context("job unknown")?;
        if observed.is_finished() {
            return Ok(observed);
        }
        if Instant::now() > deadline {
            bail!("job {job_id} still {:?} after 30 s", observed.state);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_for_file(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("{} did not appear", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn text(mut stream: LogStream) -> Result<String> {
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8(bytes)?)
}

/// True while `pid` runs (a zombie has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
    })
}

fn pid_of(observed: &Observed) -> Result<u32> {
    Ok(observed
        .backend_name
        .strip_prefix("pid ")
        .context("backend name is not `pid N`")?
        .parse()?)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[tokio::test]
async fn echo_job_succeeds_with_its_logs_in_order() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let job = fx.request("echo", &["sh", "-c", "echo one; echo two >&2; echo three"])?;
    let submitted = backend.submit(&job).await?;
    assert!(matches!(
        submitted.state,
        JobState::Running | JobState::Succeeded
    ));
    assert!(submitted.started_at.is_some());
    assert_eq!(submitted.image, job.image);
    assert_eq!(submitted.command, job.command);
    assert_eq!(submitted.labels, job.labels);

    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.reason, ReasonCode::ExitCode);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.finished_at >= done.started_at);
    assert_eq!(pid_of(&done)?, pid_of(&submitted)?);

    let all = text(backend.logs(&job.job_id, None, false).await?).await?;
    assert_eq!(all, "one\ntwo\nthree\n");
    let tail = text(backend.logs(&job.job_id, Some(2), false).await?).await?;
    assert_eq!(tail, "two\nthree\n");
    let none = text(backend.logs(&job.job_id, Some(0), false).await?).await?;
    assert_eq!(none, "");
    // Following an ended job gives what there is, then ends.
    let followed = text(backend.logs(&job.job_id, Some(1), true).await?).await?;
    assert_eq!(followed, "three\n");

    let owned = backend.list_owned().await?;
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].job_id, job.job_id);
    assert!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test]
async fn following_a_running_job_streams_until_it_ends() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let job = fx.request(
        "follow",
        &[
            "sh",
            "-c",
            "echo first; sleep 0.5; echo second; sleep 0.3; echo third",
        ],
    )?;
    backend.submit(&job).await?;
    let started = Instant::now();
    let mut stream = backend.logs(&job.job_id, None, true).await?;
    let mut seen = String::new();
    while let Some(chunk) = stream.next().await {
        seen.push_str(std::str::from_utf8(&chunk?)?);
        if seen == "first\n" {
            // The first line comes before the job ends.
            assert_eq!(
                backend.status(&job.job_id).await?.map(|o| o.state),
                Some(JobState::Running)
            );
        }
    }
    assert_eq!(seen, "first\nsecond\nthird\n");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(wait_finished(&backend, &job.job_id).await?.exit_code == Some(0));
    Ok(())
}

#[tokio::test]
async fn environment_is_clean_and_the_job_starts_in_outgoing() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let mut job = fx.request("env", &["sh", "-c", "env | sort; pwd"])?;
    job.env = vec![
        ("A".into(), "1".into()),
        ("B".into(), "x y".into()),
        ("A".into(), "2".into()),
    ];
    backend.submit(&job).await?;
    assert_eq!(
        wait_finished(&backend, &job.job_id).await?.state,
        JobState::Succeeded
    );
    let out = text(backend.logs(&job.job_id, None, false).await?).await?;
    let mut lines: Vec<&str> = out.lines().collect();
    let cwd = lines.pop().context("no pwd")?;
    assert_eq!(Path::new(cwd).canonicalize()?, job.outgoing.canonicalize()?);
    // The shell adds PWD (and dash nothing else); nothing of the test's environment.
    lines.retain(|l| !l.starts_with("PWD="));
    assert_eq!(lines, ["A=2", "B=x y", "PATH=/usr/local/bin:/usr/bin:/bin"]);
    Ok(())
}

#[tokio::test]
async fn exit_code_3_is_a_failure_with_its_code() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let job = fx.request("exit3", &["sh", "-c", "echo bye; exit 3"])?;
    backend.submit(&job).await?;
    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(
        (done.state, done.reason, done.exit_code),
        (JobState::Failed, ReasonCode::ExitCode, Some(3))
    );
    assert_eq!(done.message, "exited with 3");

    let missing = fx.request("missing", &["no-such-program-anywhere"])?;
    backend.submit(&missing).await?;
    let done = wait_finished(&backend, &missing.job_id).await?;
    assert_eq!((done.state, done.exit_code), (JobState::Failed, Some(127)));
    Ok(())
}

const MEMORY_HOG: &[&str] = &[
    "sh",
    "-c",
    r#"x=$(head -c 200000000 /dev/zero | tr "\0" x)"#,
];

#[tokio::test]
async fn memory_hog_is_oom_killed_needs_cgroup() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Always)?;
    let backend = fx.open()?;
    let caps = backend.capabilities().await?;
    assert!(
        caps.version.starts_with("local (cgroup v"),
        "{}",
        caps.version
    );
    let mut job = fx.request("oom", MEMORY_HOG)?;
    job.memory = MemoryMib(32);
    backend.submit(&job).await?;
    let cgroups = fx.cgroups_of(&job.job_id)?;
    assert!(!cgroups.is_empty());
    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert_eq!(done.reason, ReasonCode::OomKilled, "{done:?}");
    assert_eq!(done.exit_code, Some(137));
    // The cgroup goes when the job ends.
    for dir in cgroups {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

#[tokio::test]
async fn cgroup_limits_are_set_needs_cgroup() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Always)?;
    let backend = fx.open()?;
    let mut job = fx.request("limits", &["sleep", "30"])?;
    job.memory = MemoryMib(48);
    job.cpu = CpuMillis(500);
    backend.submit(&job).await?;
    let cgroups = fx.cgroups_of(&job.job_id)?;
    let observed = backend.status(&job.job_id).await?.context("unknown")?;
    let pid = pid_of(&observed)?;
    let memory = &cgroups[0];
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file));
    if memory.join("memory.limit_in_bytes").exists() {
        assert_eq!(read(memory, "memory.limit_in_bytes")?.trim(), "50331648");
        assert!(
            read(memory, "cgroup.procs")?
                .lines()
                .any(|l| l == pid.to_string())
        );
        if let Some(cpu) = cgroups.get(1) {
            assert_eq!(read(cpu, "cpu.cfs_quota_us")?.trim(), "50000");
            assert_eq!(read(cpu, "cpu.cfs_period_us")?.trim(), "100000");
        }
    } else {
        assert_eq!(read(memory, "memory.max")?.trim(), "50331648");
    }
    assert!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test]
async fn without_cgroups_memory_is_limited_by_ulimit() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Never)?;
    let backend = fx.open()?;
    let caps = backend.capabilities().await?;
    assert_eq!(caps.version, "local (cgroup none)");
    assert_eq!(caps.kind, BackendKind::Local);
    let mut job = fx.request("ulimit", MEMORY_HOG)?;
    job.memory = MemoryMib(32);
    backend.submit(&job).await?;
    assert!(fx.cgroups_of(&job.job_id)?.is_empty());
    let done = wait_finished(&backend, &job.job_id).await?;
    // Over `ulimit -v` a program fails in its own way: reported as its exit code.
    assert_eq!(
        (done.state, done.reason),
        (JobState::Failed, ReasonCode::ExitCode)
    );
    assert_ne!(done.exit_code, Some(0));
    Ok(())
}

/// Kills a job with a background child (and, with cgroups, a grandchild that left the
/// process group with `setsid`), and checks they are all gone.
async fn kill_case(use_cgroups: UseCgroups) -> Result<()> {
    let fx = Fixture::new(use_cgroups)?;
    let backend = fx.open()?;
    let script = match use_cgroups {
        UseCgroups::Always => {
            r#"echo started; sleep 100 & echo $! > "$1"; setsid sleep 100 & echo $! > "$2"; sleep 100"#
        }
        _ => r#"echo started; sleep 100 & echo $! > "$1"; echo $! > "$2"; sleep 100"#,
    };
    let job = fx.request(
        "kill",
        &[
            "sh",
            "-c",
            script,
            "sh",
            "/share/outgoing/child.pid",
            "/share/outgoing/escaped.pid",
        ],
    )?;
    backend.submit(&job).await?;
    let child: u32 = wait_for_file(&job.outgoing.join("child.pid"))
        .await?
        .trim()
        .parse()?;
    let escaped: u32 = wait_for_file(&job.outgoing.join("escaped.pid"))
        .await?
        .trim()
        .parse()?;
    let wrapper = pid_of(&backend.status(&job.job_id).await?.context("unknown")?)?;
    assert!(running(child) && running(escaped) && running(wrapper));

    backend.kill(&job.job_id).await?;
    // kill returns once the end is recorded.
    let done = backend.status(&job.job_id).await?.context("unknown")?;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.message, "killed");
    assert_eq!(done.exit_code, Some(137));
    assert!(!running(wrapper), "the wrapper survived");
    assert!(!running(child), "the job's background child survived");
    assert!(!running(escaped), "the job's setsid child survived");
    // Its record and logs stay.
    assert_eq!(
        text(backend.logs(&job.job_id, None, false).await?).await?,
        "started\n"
    );
    // Killing an ended job leaves it as it is.
    backend.kill(&job.job_id).await?;
    assert_eq!(backend.status(&job.job_id).await?, Some(done));
    Ok(())
}

#[tokio::test]
async fn kill_takes_the_whole_process_group() -> Result<()> {
    kill_case(UseCgroups::Never).await
}

#[tokio::test]
async fn kill_takes_the_whole_cgroup_needs_cgroup() -> Result<()> {
    kill_case(UseCgroups::Always).await
}

#[tokio::test]
async fn one_backend_at_a_time_manages_a_manager_id() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let first = fx.open()?;
    let err = fx.open().expect_err("two backends for one manager id");
    assert!(err.to_string().contains("another local backend"), "{err}");
    drop(first);
    fx.open()?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_backend_finds_its_jobs_again() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let first = fx.open()?;
    let ok = fx.request("again-ok", &["sh", "-c", "sleep 1.5; echo done"])?;
    let five = fx.request("again-5", &["sh", "-c", "sleep 1.5; exit 5"])?;
    let quick = fx.request("again-quick", &["sh", "-c", "exit 7"])?;
    for job in [&ok, &five, &quick] {
        first.submit(job).await?;
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = fx.open()?;
    for job in [&ok, &five] {
        let observed = second.status(&job.job_id).await?.context("job forgotten")?;
        assert_eq!(observed.state, JobState::Running, "{observed:?}");
        assert_eq!(observed.labels, job.labels);
    }
    // One that ended while no backend watched is found ended, with its code.
    let quick_done = second
        .status(&quick.job_id)
        .await?
        .context("job forgotten")?;
    assert_eq!(
        (quick_done.state, quick_done.exit_code),
        (JobState::Failed, Some(7))
    );

    let done = wait_finished(&second, &ok.job_id).await?;
    assert_eq!(
        (done.state, done.reason, done.exit_code),
        (JobState::Succeeded, ReasonCode::ExitCode, Some(0))
    );
    assert_eq!(
        text(second.logs(&ok.job_id, None, false).await?).await?,
        "done\n"
    );
    let done = wait_finished(&second, &five.job_id).await?;
    assert_eq!((done.state, done.exit_code), (JobState::Failed, Some(5)));
    assert_eq!(second.list_owned().await?.len(), 3);

    // Another manager sharing the state directory sees none of them.
    let other = LocalBackend::open(&format!("{}-other", fx.manager_id), fx.config())?;
    assert!(other.list_owned().await?.is_empty());
    assert_eq!(other.status(&ok.job_id).await?, None);
    assert!(!other.remove(&ok.job_id).await?);
    assert!(fx.job_dir(&ok.job_id).exists());
    let _ = std::fs::remove_dir(format!(
        "/sys/fs/cgroup/memory/chris-dispatch/{}-other",
        fx.manager_id
    ));
    let _ = std::fs::remove_dir(format!(
        "/sys/fs/cgroup/cpu/chris-dispatch/{}-other",
        fx.manager_id
    ));
    Ok(())
}

#[tokio::test]
async fn a_restarted_backend_can_kill_a_job_it_did_not_start() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let first = fx.open()?;
    let job = fx.request("foreign-kill", &["sleep", "100"])?;
    first.submit(&job).await?;
    drop(first);
    let second = fx.open()?;
    let pid = pid_of(&second.status(&job.job_id).await?.context("forgotten")?)?;
    second.kill(&job.job_id).await?;
    let done = second.status(&job.job_id).await?.context("forgotten")?;
    assert_eq!(
        (done.state, done.message.as_str()),
        (JobState::Failed, "killed")
    );
    assert!(!running(pid));
    assert!(second.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test]
async fn remove_leaves_no_state_no_cgroup_and_no_process() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let job = fx.request("remove", &["sleep", "100"])?;
    backend.submit(&job).await?;
    let pid = pid_of(&backend.status(&job.job_id).await?.context("unknown")?)?;
    let cgroups = fx.cgroups_of(&job.job_id)?;
    for dir in &cgroups {
        assert!(dir.exists());
    }
    assert!(running(pid));

    assert!(backend.remove(&job.job_id).await?);
    assert!(!fx.job_dir(&job.job_id).exists());
    for dir in &cgroups {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(!running(pid));
    assert_eq!(backend.status(&job.job_id).await?, None);
    assert!(backend.list_owned().await?.is_empty());
    assert!(!backend.remove(&job.job_id).await?);
    assert!(matches!(
        backend.kill(&job.job_id).await,
        Err(BackendError::NotFound(_))
    ));
    assert!(matches!(
        backend.logs(&job.job_id, None, false).await,
        Err(BackendError::NotFound(_))
    ));
    // The id can be used again.
    let again = JobRequest {
        command: vec!["true".into()],
        ..job.clone()
    };
    backend.submit(&again).await?;
    assert_eq!(
        wait_finished(&backend, &job.job_id).await?.state,
        JobState::Succeeded
    );
    assert!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test]
async fn share_paths_map_to_the_job_directories() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let job = fx.request(
        "paths",
        &[
            "sh",
            "-c",
            r#"cat "$1" > "$2""#,
            "sh",
            "/share/incoming/in.txt",
            "/share/outgoing/out.txt",
        ],
    )?;
    let incoming = job.incoming.clone().context("no incoming")?;
    std::fs::write(incoming.join("in.txt"), "hello from incoming\n")?;
    backend.submit(&job).await?;
    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(
        std::fs::read_to_string(job.outgoing.join("out.txt"))?,
        "hello from incoming\n"
    );
    // The observed command is the one submitted, with container paths.
    assert_eq!(done.command, job.command);
    Ok(())
}

/// Runs a job as 1000:1000 and checks who owns its outputs. `namespace`: through
/// `setpriv` in a mount namespace, or as the wrapper's own uid and gid.
async fn user_case(read_only_incoming: ReadOnlyIncoming) -> Result<()> {
    let mut fx = Fixture::new(UseCgroups::Auto)?;
    fx.read_only_incoming = read_only_incoming;
    let backend = fx.open()?;
    let mut job = fx.request(
        "user",
        &[
            "sh",
            "-c",
            r#"id -u > "$1"; id -g >> "$1"; id -G >> "$1""#,
            "sh",
            "/share/outgoing/ids",
        ],
    )?;
    job.user = Some(UserId {
        uid: 1000,
        gid: 1000,
    });
    if !is_root() {
        let me = rustix::process::geteuid().as_raw();
        job.user = Some(UserId {
            uid: me + 1,
            gid: me + 1,
        });
        let err = backend
            .submit(&job)
            .await
            .expect_err("a non-root manager switched users");
        assert!(
            matches!(err, BackendError::Unsupported { field: "user", .. }),
            "{err}"
        );
        return Ok(());
    }
    // The job's user must reach its outgoing directory, as in a container.
    std::fs::set_permissions(fx.tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    for dir in [job.outgoing.parent().context("no parent")?, &job.outgoing] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    }
    backend.submit(&job).await?;
    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let ids = job.outgoing.join("ids");
    assert_eq!(std::fs::read_to_string(&ids)?, "1000\n1000\n1000\n");
    let meta = std::fs::metadata(&ids)?;
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    // The wrapper recorded the exit code for a restarted manager.
    assert_eq!(
        std::fs::read_to_string(fx.job_dir(&job.job_id).join("exit"))?,
        "0\n"
    );
    Ok(())
}

#[tokio::test]
async fn jobs_run_as_the_requested_user_as_root() -> Result<()> {
    user_case(ReadOnlyIncoming::Auto).await
}

#[tokio::test]
async fn jobs_run_as_the_requested_user_without_namespace_as_root() -> Result<()> {
    user_case(ReadOnlyIncoming::Never).await
}

#[tokio::test]
async fn incoming_is_read_only_as_root() -> Result<()> {
    let mut fx = Fixture::new(UseCgroups::Auto)?;
    fx.read_only_incoming = ReadOnlyIncoming::Always;
    if !is_root() {
        let err = LocalBackend::open(&fx.manager_id, fx.config())
            .expect_err("read-only inputs without root");
        assert!(
            matches!(
                err,
                BackendError::Unsupported {
                    field: "read_only_incoming",
                    ..
                }
            ),
            "{err}"
        );
        return Ok(());
    }
    let backend = fx.open()?;
    let job = fx.request(
        "readonly",
        &[
            "sh",
            "-c",
            r#"echo new > "$1/new.txt"; echo more >> "$1/in.txt"; rm -f "$1/in.txt"; echo ok > "$2/out.txt""#,
            "sh",
            "/share/incoming",
            "/share/outgoing",
        ],
    )?;
    let incoming = job.incoming.clone().context("no incoming")?;
    std::fs::write(incoming.join("in.txt"), "input\n")?;
    backend.submit(&job).await?;
    let done = wait_finished(&backend, &job.job_id).await?;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(std::fs::read_to_string(incoming.join("in.txt"))?, "input\n");
    assert!(!incoming.join("new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(job.outgoing.join("out.txt"))?,
        "ok\n"
    );
    let log = text(backend.logs(&job.job_id, None, false).await?).await?;
    assert!(log.contains("Read-only file system"), "{log}");
    // The read-only mount was the job's alone.
    std::fs::write(incoming.join("after.txt"), "host can write\n")?;
    Ok(())
}

#[tokio::test]
async fn requests_beyond_the_backend_are_refused() -> Result<()> {
    let fx = Fixture::new(UseCgroups::Auto)?;
    let backend = fx.open()?;
    let caps = backend.capabilities().await?;
    assert_eq!((caps.max_workers, caps.gpus), (1, 0));
    assert!(caps.cpu.get() >= 1000 && caps.memory.get() > 0);

    let mut job = fx.request("workers", &["true"])?;
    job.workers = 2;
    let err = backend.submit(&job).await.expect_err("workers accepted");
    assert!(matches!(
        err,
        BackendError::Unsupported {
            field: "workers",
            ..
        }
    ));
    assert!(!fx.job_dir(&job.job_id).exists());

    let job = fx.request("twice", &["sleep", "0.2"])?;
    backend.submit(&job).await?;
    let err = backend.submit(&job).await.expect_err("submitted twice");
    assert!(matches!(err, BackendError::AlreadyExists(_)));
    wait_finished(&backend, &job.job_id).await?;

    // A job whose outgoing directory is missing cannot start; nothing is left.
    let mut job = fx.request("nodir", &["true"])?;
    job.outgoing = fx.tmp.path().join("does-not-exist");
    assert!(backend.submit(&job).await.is_err());
    assert!(!fx.job_dir(&job.job_id).exists());
    assert_eq!(backend.status(&job.job_id).await?, None);

    assert!(matches!(
        LocalBackend::open("../escape", fx.config()),
        Err(BackendError::Unsupported {
            field: "manager_id",
            ..
        })
    ));
    Ok(())
}

#[test]
fn config_reads_the_local_table() -> Result<()> {
    let table: toml::Table = toml::from_str("use_cgroups = \"never\"\ncgroup_root = \"/x\"")?;
    let config = LocalConfig::from_table(&table, Path::new("/var/lib/m/local"))?;
    assert_eq!(config.state_dir, PathBuf::from("/var/lib/m/local"));
    assert_eq!(config.use_cgroups, UseCgroups::Never);
    assert_eq!(config.cgroup_root, Some(PathBuf::from("/x")));

    let table: toml::Table = toml::from_str("state_dir = \"/s\"")?;
    let config = LocalConfig::from_table(&table, Path::new("/d"))?;
    assert_eq!(config, LocalConfig::new("/s"));

    let table: toml::Table = toml::from_str("state_dri = \"/s\"")?;
    assert!(LocalConfig::from_table(&table, Path::new("/d")).is_err());
    Ok(())
}

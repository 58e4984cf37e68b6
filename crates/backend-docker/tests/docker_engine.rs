//! The docker backend against a real Docker engine (`DOCKER_HOST`, else
//! `/var/run/docker.sock`): every test here needs one, and fails without it.
//!
//! No image can be pulled on the project's machines, so the set-up builds a tiny busybox
//! image from the host's `/bin/busybox` (Debian's `busybox-static`). Each test uses its
//! own manager id and job ids, so tests run in parallel, and a guard removes everything
//! labelled with that manager id when the test ends, passed or failed.
//!
//! To run them on Podman: `DOCKER_HOST=unix://<podman.sock> DISPATCH_TEST_ENGINE_KIND=podman`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use dispatch_backend_docker::{DockerBackend, DockerConfig, EngineKind, PullPolicy};
use dispatch_manager::backend::{INCOMING_MOUNT, OUTGOING_MOUNT, UserId, labels};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{BackendKind, CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};
use futures::StreamExt;
use tokio::sync::OnceCell;

/// The image every test runs.
const TEST_IMAGE: &str = "localhost/dispatch-backend-docker-test:latest";
/// Longest any test job is expected to take.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

static IMAGE: OnceCell<()> = OnceCell::const_new();

/// Builds [`TEST_IMAGE`] once per test binary: `FROM scratch`, busybox, and its applets
/// installed as links in `/bin` (the classic builder: no BuildKit).
async fn test_image() {
    IMAGE
        .get_or_init(|| async {
            let busybox = Path::new("/bin/busybox");
            assert!(
                busybox.exists(),
                "/bin/busybox is missing: run `apt-get install -y busybox-static` \
                 (the docker backend's tests build their image from it)"
            );
            let dockerfile = "FROM scratch\n\
                COPY busybox /bin/busybox\n\
                RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
                ENV PATH=/bin\n\
                CMD [\"/bin/sh\"]\n";
            let mut context = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(dockerfile.len() as u64);
            header.set_mode(0o644);
            context
                .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
                .expect("a tar entry");
            context
                .append_path_with_name(busybox, "busybox")
                .expect("/bin/busybox in the build context");
            let context = context.into_inner().expect("the build context");

            let docker = engine().await;
            let options = BuildImageOptions {
                dockerfile: "Dockerfile".into(),
                t: Some(TEST_IMAGE.into()),
                rm: true,
                forcerm: true,
                networkmode: Some("none".into()),
                version: BuilderVersion::BuilderV1,
                ..BuildImageOptions::default()
            };
            let mut build = docker.build_image(
                options,
                None,
                Some(bollard::body_full(bytes::Bytes::from(context))),
            );
            while let Some(step) = build.next().await {
                if let Err(error) = step {
                    panic!("building {TEST_IMAGE} failed: {error}");
                }
            }
        })
        .await;
}

/// The kind of engine at `DOCKER_HOST`: `DISPATCH_TEST_ENGINE_KIND`, else Docker.
fn engine_kind() -> EngineKind {
    match std::env::var("DISPATCH_TEST_ENGINE_KIND").as_deref() {
        Ok("podman") => EngineKind::Podman,
        _ => EngineKind::Docker,
    }
}

async fn engine() -> Docker {
    Docker::connect_with_defaults()
        .expect("a Docker client")
        .negotiate_version()
        .await
        .expect("a Docker engine at DOCKER_HOST or /var/run/docker.sock: these tests need one")
}

/// One test's manager: its backend, a scratch directory, and the clean-up guard.
struct Site {
    backend: DockerBackend,
    manager_id: String,
    dir: PathBuf,
}

impl Site {
    async fn new(config: DockerConfig) -> Self {
        test_image().await;
        let manager_id = format!("test-{}", uuid::Uuid::new_v4().simple());
        let backend = DockerBackend::connect(&manager_id, config)
            .await
            .expect("connect");
        let dir = std::env::temp_dir().join(format!("dispatch-backend-docker-{manager_id}"));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Self {
            backend,
            manager_id,
            dir,
        }
    }

    async fn start() -> Self {
        Self::new(Self::config()).await
    }

    /// A config for the engine under test.
    fn config() -> DockerConfig {
        DockerConfig {
            kind: engine_kind(),
            ..DockerConfig::default()
        }
    }

    /// A request for `command` with fresh, world-writable storage directories.
    fn job(&self, name: &str, command: &[&str]) -> JobRequest {
        let id = format!("{name}-{}", &self.manager_id[5..13]);
        let job_id = JobId::parse(&id).expect("a valid job id");
        let incoming = self.dir.join(&id).join("incoming");
        let outgoing = self.dir.join(&id).join("outgoing");
        for dir in [&incoming, &outgoing] {
            std::fs::create_dir_all(dir).expect("a storage directory");
            set_mode(dir, 0o777);
        }
        JobRequest {
            job_id: job_id.clone(),
            image: TEST_IMAGE.into(),
            command: command.iter().map(|word| (*word).to_owned()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            cpu: CpuMillis(500),
            memory: MemoryMib(128),
            gpus: 0,
            workers: 1,
            time_limit: None,
            incoming: Some(incoming),
            outgoing,
            user: None,
            labels: BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
                (labels::MANAGER_ID.into(), self.manager_id.clone()),
                (labels::JOB_ID.into(), id),
                (labels::JOB_KIND.into(), "plugin".into()),
            ]),
        }
    }

    /// Waits for the job to end: follows its logs (which end when it stops), then reads
    /// its status until the engine has recorded the exit.
    async fn wait_finished(&self, job_id: &JobId) -> Observed {
        let deadline = Instant::now() + JOB_DEADLINE;
        let mut logs = self
            .backend
            .logs(job_id, Some(0), true)
            .await
            .expect("a log stream");
        while tokio::time::timeout_at(deadline.into(), logs.next())
            .await
            .expect("the job ended in time")
            .is_some()
        {}
        loop {
            let observed = self
                .backend
                .status(job_id)
                .await
                .expect("a status")
                .expect("the job exists");
            if observed.is_finished() {
                return observed;
            }
            assert!(Instant::now() < deadline, "job still {:?}", observed.state);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn all_logs(&self, job_id: &JobId, tail: Option<u32>, follow: bool) -> String {
        let mut stream = self
            .backend
            .logs(job_id, tail, follow)
            .await
            .expect("a log stream");
        let mut text = Vec::new();
        while let Some(chunk) = tokio::time::timeout(JOB_DEADLINE, stream.next())
            .await
            .expect("logs before the deadline")
        {
            text.extend_from_slice(&chunk.expect("a log chunk"));
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Drop for Site {
    /// Removes every container labelled with this manager id, and the scratch directory,
    /// even when the test failed (on a thread of its own: the test's runtime may be gone).
    fn drop(&mut self) {
        let manager_id = self.manager_id.clone();
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(remove_containers_of(&manager_id))
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!("could not remove the containers of {}", self.manager_id);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn remove_containers_of(manager_id: &str) -> std::io::Result<()> {
    let docker = engine().await;
    let filters = std::collections::HashMap::from([(
        "label",
        vec![format!("{}={manager_id}", labels::MANAGER_ID)],
    )]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .map_err(std::io::Error::other)?;
    for id in containers.into_iter().filter_map(|c| c.id) {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        docker
            .remove_container(&id, Some(options))
            .await
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("permissions set");
}

#[tokio::test]
async fn engine_runs_a_job_reports_its_logs_and_removes_it() {
    let site = Site::start().await;
    let job = site.job(
        "echo",
        &[
            "sh",
            "-c",
            // stdout and stderr reach the log through two pipes: the pause keeps their
            // order certain.
            "echo \"$GREETING from $0\"; echo oops >&2; sleep 0.2; cat /share/incoming/in.txt; \
             echo result > /share/outgoing/out.txt",
            "the-job",
        ],
    );
    std::fs::write(
        job.incoming.as_ref().unwrap().join("in.txt"),
        "input line\n",
    )
    .unwrap();

    let submitted = site.backend.submit(&job).await.unwrap();
    assert_eq!(submitted.job_id, job.job_id);
    assert_eq!(submitted.backend_name, job.job_id.as_str());
    assert_eq!(submitted.image, TEST_IMAGE);
    assert_eq!(submitted.command, job.command);
    assert!(
        matches!(submitted.state, JobState::Running | JobState::Succeeded),
        "{submitted:?}"
    );
    // The engine adds the image's own labels (Podman's builder sets one).
    for (key, value) in &job.labels {
        assert_eq!(submitted.labels.get(key), Some(value), "{key}");
    }

    let done = site.wait_finished(&job.job_id).await;
    assert_eq!(
        (done.state, done.reason, done.exit_code),
        (JobState::Succeeded, ReasonCode::ExitCode, Some(0))
    );
    assert_eq!(done.message, "exited");
    let (started, finished) = (done.started_at.unwrap(), done.finished_at.unwrap());
    assert!(started <= finished);
    assert_eq!(
        std::fs::read_to_string(job.outgoing.join("out.txt")).unwrap(),
        "result\n"
    );

    let logs = site.all_logs(&job.job_id, None, false).await;
    for line in ["hello from the-job", "oops", "input line"] {
        assert!(logs.contains(line), "{line:?} not in {logs:?}");
    }
    let last = site.all_logs(&job.job_id, Some(1), false).await;
    assert_eq!(last, "input line\n", "all: {logs:?}");
    assert_eq!(site.all_logs(&job.job_id, Some(0), false).await, "");
    // Following an ended job gives what there is, then ends.
    assert_eq!(
        site.all_logs(&job.job_id, Some(1), true).await,
        "input line\n"
    );

    assert!(site.backend.remove(&job.job_id).await.unwrap());
    assert!(site.backend.status(&job.job_id).await.unwrap().is_none());
    assert!(!site.backend.remove(&job.job_id).await.unwrap());
    assert!(matches!(
        site.backend.logs(&job.job_id, None, false).await,
        Err(BackendError::NotFound(_))
    ));
}

#[tokio::test]
async fn engine_follows_logs_until_the_job_ends() {
    let site = Site::start().await;
    let job = site.job(
        "follow",
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4; do echo line$i; sleep 0.3; done",
        ],
    );
    site.backend.submit(&job).await.unwrap();
    let started = Instant::now();
    let logs = site.all_logs(&job.job_id, None, true).await;
    assert_eq!(logs, "line1\nline2\nline3\nline4\n");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "the stream waited for the job"
    );
    let done = site.wait_finished(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded);
}

#[tokio::test]
async fn engine_reports_a_non_zero_exit_as_failed() {
    let site = Site::start().await;
    let job = site.job("exit3", &["sh", "-c", "echo bad >&2; exit 3"]);
    site.backend.submit(&job).await.unwrap();
    let done = site.wait_finished(&job.job_id).await;
    assert_eq!(
        (done.state, done.reason, done.exit_code),
        (JobState::Failed, ReasonCode::ExitCode, Some(3))
    );
    assert_eq!(site.all_logs(&job.job_id, None, false).await, "bad\n");
}

#[tokio::test]
async fn engine_reports_a_memory_hog_as_oom_killed() {
    let site = Site::start().await;
    let mut job = site.job(
        "oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
        ],
    );
    job.memory = MemoryMib(32);
    site.backend.submit(&job).await.unwrap();
    let done = site.wait_finished(&job.job_id).await;
    assert_eq!(
        (done.state, done.reason),
        (JobState::Failed, ReasonCode::OomKilled),
        "{done:?}"
    );
    assert_eq!(done.exit_code, Some(137));
    // dockerd sets its OOMKilled flag, but not always (see `observe`): either way it is
    // reported as OOM_KILLED.
    assert!(done.message.contains("OOMKilled"), "{}", done.message);
}

#[tokio::test]
async fn engine_refuses_a_missing_image_quickly() {
    let pull_timeout = Duration::from_secs(20);
    let site = Site::new(DockerConfig {
        pull_timeout_seconds: pull_timeout.as_secs(),
        ..Site::config()
    })
    .await;
    let mut job = site.job("noimage", &["true"]);
    job.image = "localhost/does-not-exist:1".into();
    let started = Instant::now();
    let error = site.backend.submit(&job).await.unwrap_err();
    assert!(
        started.elapsed() < pull_timeout,
        "took {:?}",
        started.elapsed()
    );
    match &error {
        BackendError::ImageNotFound { image, .. } => {
            assert_eq!(image, "localhost/does-not-exist:1")
        }
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    let text = error.to_string();
    assert!(
        text.contains("localhost/does-not-exist:1") && text.contains("pull failed"),
        "{text}"
    );
    eprintln!("{text}");
    assert!(site.backend.status(&job.job_id).await.unwrap().is_none());

    // With pull_policy = never there is not even an attempt.
    let never = Site::new(DockerConfig {
        pull_policy: PullPolicy::Never,
        ..Site::config()
    })
    .await;
    let mut job = never.job("noimage", &["true"]);
    job.image = "localhost/does-not-exist:1".into();
    let error = never.backend.submit(&job).await.unwrap_err();
    assert!(error.to_string().contains("never"), "{error}");
    // A present image needs no pull either.
    let job = never.job("present", &["true"]);
    never.backend.submit(&job).await.unwrap();
}

#[tokio::test]
async fn engine_applies_limits_user_mounts_and_security_settings() {
    let site = Site::start().await;
    let mut job = site.job("settings", &["sleep", "30"]);
    job.cpu = CpuMillis(250);
    job.memory = MemoryMib(64);
    job.user = Some(UserId {
        uid: 1234,
        gid: 5678,
    });
    let submitted = site.backend.submit(&job).await.unwrap();
    assert_eq!(submitted.state, JobState::Running);
    assert!(submitted.started_at.is_some());
    assert!(submitted.finished_at.is_none());

    let inspect = site
        .backend
        .docker()
        .inspect_container(job.job_id.as_str(), None)
        .await
        .unwrap();
    let config = inspect.config.unwrap();
    assert_eq!(config.user.as_deref(), Some("1234:5678"));
    assert_eq!(config.entrypoint, Some(vec!["sleep".to_owned()]));
    assert_eq!(config.cmd, Some(vec!["30".to_owned()]));
    assert!(config.env.unwrap().contains(&"GREETING=hello".to_owned()));
    let host = inspect.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(250_000_000));
    assert_eq!(host.memory, Some(64 << 20));
    // Docker keeps `ALL`; Podman lists what it dropped (the container's view is checked in
    // `engine_runs_jobs_as_the_given_user_without_capabilities`).
    let cap_drop = host.cap_drop.unwrap_or_default();
    assert!(
        cap_drop == ["ALL"]
            || ["CHOWN", "DAC_OVERRIDE", "SETUID"]
                .iter()
                .all(|c| cap_drop.iter().any(|d| d == c)),
        "{cap_drop:?}"
    );
    assert!(
        host.security_opt
            .unwrap()
            .iter()
            .any(|opt| opt.starts_with("no-new-privileges"))
    );
    assert_ne!(host.readonly_rootfs, Some(true));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.privileged, Some(false));
    let nofile = host
        .ulimits
        .unwrap()
        .into_iter()
        // Podman names it RLIMIT_NOFILE.
        .find(|u| matches!(u.name.as_deref(), Some("nofile" | "RLIMIT_NOFILE")))
        .unwrap();
    assert!(
        nofile.soft.unwrap() >= 1024 && nofile.soft == nofile.hard,
        "{nofile:?}"
    );
    let mounts = inspect.mounts.unwrap();
    let mount = |target: &str| {
        mounts
            .iter()
            .find(|m| m.destination.as_deref() == Some(target))
            .unwrap()
    };
    assert_eq!(mount(INCOMING_MOUNT).rw, Some(false));
    assert_eq!(mount(OUTGOING_MOUNT).rw, Some(true));
    assert_eq!(
        mount(INCOMING_MOUNT).source.as_deref(),
        job.incoming.as_deref().and_then(Path::to_str)
    );

    // The container's own view: the user, and no capabilities at all.
    let owned = site.backend.list_owned().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].state, JobState::Running);

    // Kill keeps the container and its record; a second kill is a no-op.
    site.backend.kill(&job.job_id).await.unwrap();
    let killed = site.wait_finished(&job.job_id).await;
    assert_eq!(
        (killed.state, killed.exit_code),
        (JobState::Failed, Some(137))
    );
    assert_eq!(killed.reason, ReasonCode::ExitCode);
    site.backend.kill(&job.job_id).await.unwrap();
    assert!(site.backend.remove(&job.job_id).await.unwrap());
    assert!(matches!(
        site.backend.kill(&job.job_id).await,
        Err(BackendError::NotFound(_))
    ));
}

#[tokio::test]
async fn engine_runs_jobs_as_the_given_user_without_capabilities() {
    let site = Site::start().await;
    let mut job = site.job(
        "whoami",
        &[
            "sh",
            "-c",
            "id -u; id -g; grep CapEff /proc/self/status; touch /share/incoming/x",
        ],
    );
    job.user = Some(UserId {
        uid: 1234,
        gid: 5678,
    });
    site.backend.submit(&job).await.unwrap();
    let done = site.wait_finished(&job.job_id).await;
    let logs = site.all_logs(&job.job_id, None, false).await;
    for line in ["1234\n", "5678\n", "CapEff:\t0000000000000000\n"] {
        assert!(logs.contains(line), "{line:?} not in {logs:?}");
    }
    assert!(
        logs.contains("Read-only file system"),
        "incoming is read-only: {logs}"
    );
    assert_eq!(done.exit_code, Some(1));
}

#[tokio::test]
async fn engine_lists_and_touches_only_this_managers_containers() {
    let mine = Site::start().await;
    let theirs = Site::start().await;
    let my_job = mine.job("mine", &["sleep", "30"]);
    let their_job = theirs.job("theirs", &["sleep", "30"]);
    mine.backend.submit(&my_job).await.unwrap();
    theirs.backend.submit(&their_job).await.unwrap();

    let listed: Vec<JobId> = mine
        .backend
        .list_owned()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.job_id)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&my_job.job_id));
    let listed: Vec<JobId> = theirs
        .backend
        .list_owned()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.job_id)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&their_job.job_id));

    assert!(
        mine.backend
            .status(&their_job.job_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        mine.backend.kill(&their_job.job_id).await,
        Err(BackendError::NotFound(_))
    ));
    assert!(matches!(
        mine.backend.logs(&their_job.job_id, None, false).await,
        Err(BackendError::NotFound(_))
    ));
    assert!(!mine.backend.remove(&their_job.job_id).await.unwrap());
    let still = theirs
        .backend
        .status(&their_job.job_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.state, JobState::Running);

    // A (valid) job id that cannot be a container name never reaches the engine.
    let odd = JobId::parse("a").unwrap();
    assert!(mine.backend.status(&odd).await.unwrap().is_none());
    assert!(!mine.backend.remove(&odd).await.unwrap());
}

#[tokio::test]
async fn engine_refuses_a_second_job_under_one_id() {
    let site = Site::start().await;
    let job = site.job("twice", &["sleep", "30"]);
    site.backend.submit(&job).await.unwrap();
    match site.backend.submit(&job).await {
        Err(BackendError::AlreadyExists(name)) => assert_eq!(name, job.job_id.as_str()),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(site.backend.list_owned().await.unwrap().len(), 1);
}

#[tokio::test]
async fn engine_reports_a_command_that_cannot_start_as_failed() {
    let site = Site::start().await;
    let job = site.job("nocommand", &["/no/such/program", "arg"]);
    match site.backend.submit(&job).await {
        // Docker records the runtime's error in the container, which stays as a failure.
        Ok(observed) => {
            assert_eq!(observed.state, JobState::Failed, "{observed:?}");
            assert_eq!(observed.reason, ReasonCode::BackendError);
            assert!(
                observed.message.contains("/no/such/program"),
                "{}",
                observed.message
            );
            let again = site.backend.status(&job.job_id).await.unwrap().unwrap();
            assert_eq!(again.state, JobState::Failed);
        }
        // Podman leaves no trace of it in the container: the submit fails and the
        // container is removed, so a retry starts afresh.
        Err(BackendError::Engine(message)) if engine_kind() == EngineKind::Podman => {
            assert!(message.contains("/no/such/program"), "{message}");
            assert!(site.backend.status(&job.job_id).await.unwrap().is_none());
        }
        Err(other) => panic!("expected a failed job, got {other:?}"),
    }
}

#[tokio::test]
async fn engine_refuses_what_one_container_cannot_do() {
    let site = Site::start().await;
    let mut job = site.job("workers", &["true"]);
    job.workers = 2;
    let error = site.backend.submit(&job).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "workers: Compute environment only supports number_of_workers=1, got number_of_workers=2"
    );
    assert!(site.backend.status(&job.job_id).await.unwrap().is_none());
}

#[tokio::test]
async fn engine_capabilities_describe_the_engine() {
    let site = Site::start().await;
    let capabilities = site.backend.capabilities().await.unwrap();
    let (kind, name) = match engine_kind() {
        EngineKind::Docker => (BackendKind::Docker, "Docker "),
        EngineKind::Podman => (BackendKind::Podman, "Podman "),
    };
    assert_eq!(capabilities.kind, kind);
    assert!(capabilities.cpu.get() >= 1000 && capabilities.cpu.get() % 1000 == 0);
    assert!(capabilities.memory.get() > 0);
    assert_eq!((capabilities.gpus, capabilities.max_workers), (0, 1));
    assert!(
        capabilities.version.starts_with(name) && capabilities.version.contains("(API 1."),
        "{}",
        capabilities.version
    );
}

#[tokio::test]
async fn engine_absent_at_the_configured_host_is_named_in_the_error() {
    let config = DockerConfig {
        host: Some("unix:///nonexistent/docker.sock".into()),
        ..DockerConfig::default()
    };
    let error = DockerBackend::connect("m1", config).await.unwrap_err();
    let text = error.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("unix:///nonexistent/docker.sock") && text.contains("DOCKER_HOST"),
        "{text}"
    );
    let config = DockerConfig {
        host: Some("tcp://127.0.0.1:1".into()),
        ..DockerConfig::default()
    };
    let error = DockerBackend::connect("m1", config).await.unwrap_err();
    eprintln!("{error}");
    assert!(error.to_string().contains("tcp://127.0.0.1:1"), "{error}");
    let config = DockerConfig {
        host: Some("ftp://x".into()),
        ..DockerConfig::default()
    };
    let error = DockerBackend::connect("m1", config).await.unwrap_err();
    assert!(
        matches!(
            error,
            BackendError::Unsupported {
                field: "docker.host",
                ..
            }
        ),
        "{error}"
    );
}

//! The kubernetes backend's own promises, beyond the shared suite, against the project's
//! **fake** API server and its fake kubelet on the real Docker engine (a missing engine
//! fails these tests): what pman got wrong on Kubernetes (pfcon-api.md §9 item 4), kill
//! keeping the record and the log, ownership by label, the Job controller's deadline,
//! parallel workers. Not a test on Kubernetes: see `tests/fake/mod.rs`.

mod fake;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dispatch_backend_docker::{DockerBackend, DockerConfig, PullPolicy};
use dispatch_backend_kubernetes::names::{ANNOTATION_KILLED_AT, ANNOTATION_LOG_SNAPSHOT};
use dispatch_backend_kubernetes::{KubernetesBackend, KubernetesConfig};
use dispatch_manager::backend::{INCOMING_MOUNT, OUTGOING_MOUNT, UserId, labels};
use dispatch_manager::{Backend, BackendError, JobRequest, Observed};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{JobState, ReasonCode};
use dispatch_testkit::TestDir;
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use futures::StreamExt;

use fake::FakeApiServer;

const NAMESPACE: &str = "dispatch-test";
const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    dir: TestDir,
    server: FakeApiServer,
    image: String,
}

fn random() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

impl Setup {
    async fn new() -> Result<Self> {
        let dir = TestDir::new("kubernetes-fake-api")?;
        std::fs::create_dir_all(dir.path().join("store"))?;
        let image = ensure_test_image_async(Engine::Docker).await?;
        let kubelet_id = format!("fake-kubelet-{}", random());
        let docker = DockerBackend::connect(
            &kubelet_id,
            DockerConfig {
                pull_policy: PullPolicy::Never,
                ..DockerConfig::default()
            },
        )
        .await
        .context("the fake kubelet needs the Docker engine (run scripts/setup-engines.sh)")?;
        let server = FakeApiServer::start(
            NAMESPACE,
            "storebase",
            dir.path().to_owned(),
            docker,
            &kubelet_id,
        )
        .await?;
        Ok(Self { dir, server, image })
    }

    fn config(&self) -> KubernetesConfig {
        KubernetesConfig {
            api_url: Some(self.server.url.clone()),
            namespace: Some(NAMESPACE.into()),
            pvc_store_path: "store".into(),
            termination_grace_seconds: 1,
            image_check_seconds: 10,
            ..KubernetesConfig::default()
        }
    }

    fn store_root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    async fn backend(
        &self,
        manager_id: &str,
        config: KubernetesConfig,
    ) -> Result<KubernetesBackend> {
        Ok(KubernetesBackend::connect(manager_id, &self.store_root(), config).await?)
    }

    fn request(&self, manager_id: &str, plugin: &str, args: &[&str]) -> JobRequest {
        let id = format!("k8s-{}-{}", plugin.trim_end_matches(".sh"), random());
        let key = self.store_root().join(format!("key-{id}"));
        let mut command = vec!["/bin/sh".to_owned(), format!("/plugins/{plugin}")];
        command.extend(args.iter().map(|a| (*a).to_owned()));
        command.extend([INCOMING_MOUNT.to_owned(), OUTGOING_MOUNT.to_owned()]);
        JobRequest {
            job_id: JobId::parse(&id).unwrap_or_else(|e| panic!("{e}")),
            image: self.image.clone(),
            command,
            env: Vec::new(),
            cpu: CpuMillis(500),
            memory: MemoryMib(128),
            gpus: 0,
            workers: 1,
            time_limit: None,
            incoming: Some(key.join("incoming")),
            outgoing: key.join("outgoing"),
            user: Some(UserId {
                uid: 4321,
                gid: 4322,
            }),
            labels: BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
                (labels::MANAGER_ID.into(), manager_id.into()),
                (labels::JOB_ID.into(), id),
                ("operator label with spaces".into(), "and/a value".into()),
            ]),
        }
    }
}

async fn wait_for(
    backend: &KubernetesBackend,
    id: &JobId,
    check: impl Fn(&Observed) -> bool,
) -> Result<Observed> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = backend.status(id).await?.context("the job is gone")?;
        if check(&seen) {
            return Ok(seen);
        }
        ensure!(
            Instant::now() < deadline,
            "gave up waiting; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn read_log(
    backend: &KubernetesBackend,
    id: &JobId,
    tail: Option<u32>,
    follow: bool,
) -> Result<String> {
    let mut stream = backend.logs(id, tail, follow).await?;
    let mut bytes = Vec::new();
    let reading = async {
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok::<_, BackendError>(())
    };
    tokio::time::timeout(WAIT, reading)
        .await
        .context("the log did not end")??;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_submit_is_already_exists_and_labels_round_trip() -> Result<()> {
    let setup = Setup::new().await?;
    let backend = setup.backend("m-exists", setup.config()).await?;
    let job = setup.request("m-exists", "exit.sh", &["--code", "0"]);
    let first = backend.submit(&job).await?;
    // The operator's label is not a valid Kubernetes key or value, yet comes back exact.
    ensure!(
        first.labels == job.labels,
        "labels came back as {:?}",
        first.labels
    );
    match backend.submit(&job).await {
        Err(BackendError::AlreadyExists(id)) => ensure!(id == job.job_id.as_str()),
        other => bail!("a second submit answered {other:?}"),
    }
    let done = wait_for(&backend, &job.job_id, Observed::is_finished).await?;
    ensure!(
        (done.state, done.reason, done.exit_code)
            == (JobState::Succeeded, ReasonCode::ExitCode, Some(0)),
        "{done:?}"
    );
    ensure!(backend.remove(&job.job_id).await?);
    ensure!(
        !backend.remove(&job.job_id).await?,
        "a second remove found something"
    );
    ensure!(backend.status(&job.job_id).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_fails_submit_and_leaves_no_job() -> Result<()> {
    let setup = Setup::new().await?;
    let backend = setup.backend("m-image", setup.config()).await?;
    let mut job = setup.request("m-image", "exit.sh", &[]);
    job.image = "localhost/no-such-image:1".into();
    let started = Instant::now();
    match backend.submit(&job).await {
        Err(BackendError::ImageNotFound { image, reason }) => {
            ensure!(image == job.image);
            ensure!(reason.starts_with("ErrImagePull"), "reason: {reason}");
        }
        other => bail!("submit answered {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    setup
        .server
        .wait_until(WAIT, |o| o.jobs.is_empty() && o.pods.is_empty())
        .await
        .context("the Job and its pod must be deleted")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_suspends_the_job_and_keeps_its_record_and_log() -> Result<()> {
    let setup = Setup::new().await?;
    let backend = setup.backend("m-kill", setup.config()).await?;
    let job = setup.request("m-kill", "sleep.sh", &["--seconds", "60"]);
    backend.submit(&job).await?;
    wait_for(&backend, &job.job_id, |o| o.state == JobState::Running).await?;
    let deadline = Instant::now() + WAIT;
    while !read_log(&backend, &job.job_id, None, false)
        .await?
        .contains("started")
    {
        ensure!(
            Instant::now() < deadline,
            "the plugin never said it started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    backend.kill(&job.job_id).await?;
    let name = dispatch_backend_kubernetes::names::job_name(job.job_id.as_str());
    ensure!(
        setup.server.requests(&format!(
            "PATCH /apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}"
        )) == 1,
        "kill must be one merge patch of the Job"
    );
    let stored = setup
        .server
        .job(&name)
        .context("the Job must stay as the record")?;
    ensure!(stored.spec.as_ref().and_then(|s| s.suspend) == Some(true));
    let annotations = stored.metadata.annotations.clone().unwrap_or_default();
    ensure!(annotations.contains_key(ANNOTATION_KILLED_AT));
    ensure!(annotations[ANNOTATION_LOG_SNAPSHOT].contains("started"));
    let seen = backend
        .status(&job.job_id)
        .await?
        .context("gone after kill")?;
    ensure!(
        (seen.state, seen.reason) == (JobState::Failed, ReasonCode::Cancelled),
        "{seen:?}"
    );
    ensure!(seen.finished_at.is_some());
    // The Job controller deletes the running pod; the log stays readable from the Job.
    setup
        .server
        .wait_until(WAIT, |o| o.pods.is_empty())
        .await
        .context("suspend must delete the running pod")?;
    let log = read_log(&backend, &job.job_id, None, true).await?;
    ensure!(log.contains("started") && !log.contains("done"), "{log}");
    ensure!(
        read_log(&backend, &job.job_id, Some(0), false)
            .await?
            .is_empty()
    );
    // A second kill changes nothing.
    backend.kill(&job.job_id).await?;
    ensure!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_another_manager_are_not_seen_or_touched() -> Result<()> {
    let setup = Setup::new().await?;
    let mine = setup.backend("m-mine", setup.config()).await?;
    let theirs = setup
        .backend("m-theirs/with a slash", setup.config())
        .await?;
    let my_job = setup.request("m-mine", "sleep.sh", &["--seconds", "30"]);
    let their_job = setup.request("m-theirs/with a slash", "sleep.sh", &["--seconds", "30"]);
    mine.submit(&my_job).await?;
    theirs.submit(&their_job).await?;
    let listed: Vec<String> = mine
        .list_owned()
        .await?
        .into_iter()
        .map(|o| o.job_id.to_string())
        .collect();
    ensure!(
        listed == [my_job.job_id.to_string()],
        "mine lists {listed:?}"
    );
    let listed: Vec<String> = theirs
        .list_owned()
        .await?
        .into_iter()
        .map(|o| o.job_id.to_string())
        .collect();
    ensure!(
        listed == [their_job.job_id.to_string()],
        "theirs lists {listed:?}"
    );
    ensure!(mine.status(&their_job.job_id).await?.is_none());
    ensure!(!mine.remove(&their_job.job_id).await?);
    ensure!(matches!(
        mine.kill(&their_job.job_id).await,
        Err(BackendError::NotFound(_))
    ));
    ensure!(theirs.status(&their_job.job_id).await?.is_some());
    ensure!(mine.remove(&my_job.job_id).await?);
    ensure!(theirs.remove(&their_job.job_id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_deadline_is_reported_as_a_time_limit() -> Result<()> {
    let setup = Setup::new().await?;
    let config = KubernetesConfig {
        active_deadline_seconds: Some(2),
        ..setup.config()
    };
    let backend = setup.backend("m-deadline", config).await?;
    let job = setup.request("m-deadline", "sleep.sh", &["--seconds", "60"]);
    backend.submit(&job).await?;
    let done = wait_for(&backend, &job.job_id, Observed::is_finished).await?;
    ensure!(
        (done.state, done.reason) == (JobState::Failed, ReasonCode::TimeLimit),
        "{done:?}"
    );
    ensure!(
        done.message.contains("DeadlineExceeded"),
        "{}",
        done.message
    );
    ensure!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_as_parallel_pods_and_all_their_logs_are_read() -> Result<()> {
    let setup = Setup::new().await?;
    let backend = setup.backend("m-workers", setup.config()).await?;
    let mut job = setup.request("m-workers", "chatty.sh", &["--lines", "3"]);
    job.workers = 2;
    backend.submit(&job).await?;
    let done = wait_for(&backend, &job.job_id, Observed::is_finished).await?;
    ensure!(done.state == JobState::Succeeded, "{done:?}");
    let name = dispatch_backend_kubernetes::names::job_name(job.job_id.as_str());
    let pods = setup.server.cluster().objects().pods.len();
    ensure!(pods == 2, "{pods} pods for 2 workers");
    let stored = setup.server.job(&name).context("no Job")?;
    let spec = stored.spec.context("no spec")?;
    ensure!((spec.parallelism, spec.completions) == (Some(2), Some(2)));
    let log = read_log(&backend, &job.job_id, None, false).await?;
    ensure!(log.matches("line 3").count() == 2, "{log}");
    let followed = read_log(&backend, &job.job_id, None, true).await?;
    ensure!(followed.matches("line 1").count() == 2, "{followed}");
    let tail = read_log(&backend, &job.job_id, Some(2), false).await?;
    ensure!(tail.lines().count() == 2, "{tail}");
    ensure!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_image_without_a_user_fails_clearly_under_run_as_non_root() -> Result<()> {
    let setup = Setup::new().await?;
    let backend = setup.backend("m-nonroot", setup.config()).await?;
    let mut job = setup.request("m-nonroot", "exit.sh", &[]);
    // The test image has no USER: it would run as root, which runAsNonRoot forbids.
    job.user = None;
    backend.submit(&job).await?;
    let done = wait_for(&backend, &job.job_id, Observed::is_finished).await?;
    ensure!(
        (done.state, done.reason) == (JobState::Failed, ReasonCode::BackendError),
        "{done:?}"
    );
    ensure!(done.message.contains("runAsNonRoot"), "{}", done.message);
    // Its log says why it never ran, rather than failing.
    let log = read_log(&backend, &job.job_id, None, false).await?;
    ensure!(
        log.contains("has not started yet") && log.contains("runAsNonRoot"),
        "{log}"
    );
    let followed = read_log(&backend, &job.job_id, None, true).await?;
    ensure!(
        followed.is_empty() || followed.contains("runAsNonRoot"),
        "{followed}"
    );
    ensure!(backend.remove(&job.job_id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_does_not_answer_fails_connect() -> Result<()> {
    let setup = Setup::new().await?;
    let nowhere = KubernetesConfig {
        api_url: Some("http://127.0.0.1:9".into()),
        ..setup.config()
    };
    let error = setup
        .backend("m-connect", nowhere)
        .await
        .err()
        .context("connect to nothing must fail")?;
    ensure!(error.to_string().contains("127.0.0.1:9"), "{error}");
    Ok(())
}

//! What only a Slurm cluster does, on the one-node cluster of `scripts/setup-slurm.sh`
//! (found through `SLURM_CONF`; without it these tests fail): resources as Slurm sees
//! them, a job pending for resources, Slurm's own time limit (TIMEOUT), Slurm's memory
//! limit (OUT_OF_MEMORY, through the cluster's task/cgroup plugin), and a manager restarted
//! while one job runs and another is pending.
//!
//! Most run jobs without a container (`runtime = "none"`, the host's programs), so that
//! Slurm itself, not Docker, enforces the limits; the restart runs through the manager and
//! `docker run` as the conformance suite does. Slurm schedules on a one-second tick: each
//! test runs few jobs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dispatch_backend_slurm::{Runtime, SlurmBackend};
use dispatch_manager::backend::{Backend, JobRequest, Observed, labels};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::{self as pb, JobState, ReasonCode};
use dispatch_testkit::TestDir;
use dispatch_testkit::conformance::{self, RunningManager};
use dispatch_testkit::images::{Engine, ensure_test_image_async, plugin_host_path};

const POLL: Duration = Duration::from_millis(200);

fn new_id(what: &str) -> JobId {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    JobId::parse(&format!("slurm-{what}-{suffix}")).expect("a valid job id")
}

fn manager_id(what: &str) -> String {
    format!(
        "slurm-test-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A job running `command` on the host, its directories under `dir`.
fn request(dir: &Path, job_id: &JobId, manager_id: &str, command: &[&str]) -> Result<JobRequest> {
    let key = dir.join(format!("key-{job_id}"));
    let outgoing = key.join("outgoing");
    std::fs::create_dir_all(&outgoing)?;
    Ok(JobRequest {
        job_id: job_id.clone(),
        image: "ignored/without-a-runtime:1".into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![("SLURM_TEST".into(), "1".into())],
        cpu: CpuMillis(1000),
        memory: MemoryMib(64),
        gpus: 0,
        workers: 1,
        time_limit: None,
        incoming: None,
        outgoing,
        user: None,
        labels: BTreeMap::from([
            (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
            (labels::MANAGER_ID.into(), manager_id.to_owned()),
            (labels::JOB_ID.into(), job_id.to_string()),
        ]),
    })
}

/// Polls the backend until the job is in `wanted`, failing if it ends otherwise.
async fn wait_for(
    backend: &SlurmBackend,
    job_id: &JobId,
    wanted: &[JobState],
    within: Duration,
    also: impl Fn(&Observed) -> bool,
) -> Result<Observed> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        let seen = backend
            .status(job_id)
            .await?
            .with_context(|| format!("the backend does not know {job_id}"))?;
        if wanted.contains(&seen.state) && also(&seen) {
            return Ok(seen);
        }
        if seen.is_finished() && !wanted.contains(&seen.state) {
            bail!("{job_id} ended as {seen:?} while waiting for {wanted:?}");
        }
        if Instant::now() >= deadline {
            bail!("{job_id} did not reach {wanted:?} within {within:?}; last seen {last:?}");
        }
        last = Some(seen);
        tokio::time::sleep(POLL).await;
    }
}

async fn log_text(backend: &SlurmBackend, job_id: &JobId) -> Result<String> {
    use futures::StreamExt;
    let mut stream = backend.logs(job_id, None, false).await?;
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Removes the jobs whatever the test's outcome, and returns that outcome.
async fn clean_up(backend: &SlurmBackend, jobs: &[&JobId], outcome: Result<()>) -> Result<()> {
    for job in jobs {
        if let Err(error) = backend.remove(job).await {
            eprintln!("cannot remove {job}: {error}");
        }
    }
    outcome
}

/// CPU rounded up to whole CPUs, memory, time limit in minutes, name and comment are what
/// Slurm holds; a killed job is reported cancelled and removed leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_resources_name_and_comment() -> Result<()> {
    let dir = TestDir::new("slurm-resources")?;
    let manager = manager_id("res");
    let backend = common::open(&manager, common::config(Runtime::None, &dir.join("jobs"))?)?;
    let id = new_id("res");
    let mut job = request(
        dir.path(),
        &id,
        &manager,
        &["/bin/sh", "-c", "echo started; sleep 60"],
    )?;
    job.cpu = CpuMillis(1500);
    job.memory = MemoryMib(100);
    job.time_limit = Some(Duration::from_secs(90));
    let outcome = async {
        backend.submit(&job).await?;
        wait_for(
            &backend,
            &id,
            &[JobState::Running],
            Duration::from_secs(30),
            |_| true,
        )
        .await?;
        let slurm_id = backend
            .slurm_job_id(&id)
            .await?
            .context("no Slurm job id")?;
        let seen = common::scontrol_job(&slurm_id)?;
        let get = |key: &str| seen.get(key).map(String::as_str).unwrap_or("");
        ensure!(
            get("NumCPUs") == "2",
            "1500 millicores must be 2 CPUs: {seen:?}"
        );
        ensure!(get("MinMemoryNode") == "100M", "memory: {seen:?}");
        ensure!(
            get("TimeLimit") == "00:02:00",
            "90 s must be 2 minutes: {seen:?}"
        );
        ensure!(get("JobName") == id.as_str(), "name: {seen:?}");
        ensure!(
            get("Comment") == format!("chris-dispatch:{manager}:{id}"),
            "comment: {seen:?}"
        );
        let listed = backend.list_owned().await?;
        ensure!(
            listed.iter().any(|job| job.job_id == id),
            "list_owned lacks the job"
        );

        backend.kill(&id).await?;
        let killed = backend.status(&id).await?.context("gone after kill")?;
        ensure!(
            killed.state == JobState::Failed && killed.reason == ReasonCode::Cancelled,
            "a killed job: {killed:?}"
        );
        ensure!(killed.message.starts_with("CANCELLED"), "{killed:?}");
        ensure!(backend.remove(&id).await?, "remove answered false");
        ensure!(backend.status(&id).await?.is_none(), "status after remove");
        ensure!(
            !backend.job_dir(id.as_str()).exists(),
            "the job dir is left"
        );
        ensure!(common::active_slurm_jobs(&manager, id.as_str())?.is_empty());
        ensure!(!backend.remove(&id).await?, "a second remove answered true");
        Ok(())
    }
    .await;
    clean_up(&backend, &[&id], outcome).await
}

/// A job asking for a CPU while another job holds the only one its partition may use
/// stays QUEUED with Slurm's reason `Resources`, and runs once that CPU is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_job_pending_for_resources() -> Result<()> {
    let dir = TestDir::new("slurm-pending")?;
    let partition = common::Partition::create(1)?;
    let manager = manager_id("pend");
    let mut config = common::config(Runtime::None, &dir.join("jobs"))?;
    config.partition = Some(partition.name.clone());
    let backend = common::open(&manager, config)?;
    let (holder, waiter) = (new_id("holder"), new_id("waiter"));
    let outcome = async {
        backend
            .submit(&request(
                dir.path(),
                &holder,
                &manager,
                &["/bin/sh", "-c", "sleep 60"],
            )?)
            .await?;
        wait_for(
            &backend,
            &holder,
            &[JobState::Running],
            Duration::from_secs(30),
            |_| true,
        )
        .await?;
        let waiting = request(
            dir.path(),
            &waiter,
            &manager,
            &["/bin/sh", "-c", "echo waiter ran"],
        )?;
        backend.submit(&waiting).await?;
        let pending = wait_for(
            &backend,
            &waiter,
            &[JobState::Queued],
            Duration::from_secs(20),
            |seen| seen.message.contains("Resources"),
        )
        .await?;
        ensure!(
            pending.started_at.is_none(),
            "a pending job has no start: {pending:?}"
        );
        eprintln!("pending: {}", pending.message);
        backend.kill(&holder).await?;
        let done = wait_for(
            &backend,
            &waiter,
            &[JobState::Succeeded],
            Duration::from_secs(30),
            |_| true,
        )
        .await?;
        ensure!(done.exit_code == Some(0), "{done:?}");
        let log = log_text(&backend, &waiter).await?;
        ensure!(log.contains("waiter ran"), "log: {log}");
        Ok(())
    }
    .await;
    let outcome = clean_up(&backend, &[&holder, &waiter], outcome).await;
    drop(partition);
    outcome
}

/// A job past its Slurm time limit (`--time`, here without a manager to stop it first)
/// is ended by Slurm and reported FAILED with TIME_LIMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_timeout_is_time_limit() -> Result<()> {
    let dir = TestDir::new("slurm-timeout")?;
    let manager = manager_id("timeout");
    let backend = common::open(&manager, common::config(Runtime::None, &dir.join("jobs"))?)?;
    let id = new_id("timeout");
    let mut job = request(
        dir.path(),
        &id,
        &manager,
        &["/bin/sh", "-c", "echo started; sleep 600; echo done"],
    )?;
    job.time_limit = Some(Duration::from_secs(60));
    let outcome = async {
        let started = Instant::now();
        backend.submit(&job).await?;
        // Slurm looks at time limits every 30 s or so: a minute's limit ends within two.
        let ended = wait_for(
            &backend,
            &id,
            &[JobState::Failed],
            Duration::from_secs(150),
            |_| true,
        )
        .await?;
        ensure!(
            ended.reason == ReasonCode::TimeLimit && ended.message.starts_with("TIMEOUT"),
            "expected TIMEOUT as TIME_LIMIT: {ended:?}"
        );
        eprintln!("TIMEOUT after {:?}", started.elapsed());
        let log = log_text(&backend, &id).await?;
        ensure!(
            log.contains("started") && !log.contains("done"),
            "log: {log}"
        );
        Ok(())
    }
    .await;
    clean_up(&backend, &[&id], outcome).await
}

/// A job over its `--mem` is killed by Slurm's cgroup memory limit and reported FAILED
/// with OOM_KILLED (Slurm's OUT_OF_MEMORY). This needs the cluster's task/cgroup plugin
/// (scripts/setup-slurm.sh); under task/none Slurm enforces no memory limit, and this test
/// fails saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_memory_limit_is_out_of_memory() -> Result<()> {
    let conf = std::fs::read_to_string(common::slurm_conf()?)?;
    ensure!(
        conf.lines()
            .any(|line| line.trim() == "TaskPlugin=task/cgroup"),
        "the test cluster runs without TaskPlugin=task/cgroup, so Slurm enforces no memory \
         limit: scripts/setup-slurm.sh started it with task/none (DISPATCH_SLURM_CGROUP=no, \
         or slurmd refused cgroups: see what the script said)"
    );
    let dir = TestDir::new("slurm-oom")?;
    let manager = manager_id("oom");
    let backend = common::open(&manager, common::config(Runtime::None, &dir.join("jobs"))?)?;
    let id = new_id("oom");
    let hog = plugin_host_path("hog.sh")?.display().to_string();
    let mut job = request(
        dir.path(),
        &id,
        &manager,
        &["/bin/sh", &hog, "--mib", "256", "/share/outgoing"],
    )?;
    job.memory = MemoryMib(32);
    let outcome = async {
        backend.submit(&job).await?;
        let ended = wait_for(
            &backend,
            &id,
            &[JobState::Failed],
            Duration::from_secs(60),
            |_| true,
        )
        .await?;
        ensure!(
            ended.reason == ReasonCode::OomKilled && ended.message.starts_with("OUT_OF_MEMORY"),
            "expected OUT_OF_MEMORY as OOM_KILLED: {ended:?}"
        );
        let log = log_text(&backend, &id).await?;
        ensure!(
            log.contains("hog: allocating") && !log.contains("survived"),
            "log: {log}"
        );
        Ok(())
    }
    .await;
    clean_up(&backend, &[&id], outcome).await
}

/// With `docker run` the job's environment reaches the container through an env file
/// only its owner can read, never through the batch script or a command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_docker_env_stays_off_command_lines() -> Result<()> {
    let dir = TestDir::new("slurm-env")?;
    let manager = manager_id("env");
    let backend = common::open(
        &manager,
        common::config(Runtime::Docker, &dir.join("jobs"))?,
    )?;
    let id = new_id("env");
    let mut job = request(
        dir.path(),
        &id,
        &manager,
        &["/bin/sh", "-c", "echo \"secret=$SECRET\""],
    )?;
    job.image = ensure_test_image_async(Engine::Docker).await?;
    job.env = vec![("SECRET".into(), "s3cr3t value's".into())];
    let outcome = async {
        backend.submit(&job).await?;
        let script = std::fs::read_to_string(backend.job_dir(id.as_str()).join("job.sh"))?;
        ensure!(
            !script.contains("s3cr3t"),
            "the script holds the secret:\n{script}"
        );
        let env_file = backend.job_dir(id.as_str()).join("env");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&env_file)?.permissions());
        ensure!(mode & 0o077 == 0, "the env file is mode {mode:o}");
        wait_for(
            &backend,
            &id,
            &[JobState::Succeeded],
            Duration::from_secs(60),
            |_| true,
        )
        .await?;
        let log = log_text(&backend, &id).await?;
        ensure!(log.contains("secret=s3cr3t value's"), "log: {log}");
        Ok(())
    }
    .await;
    clean_up(&backend, &[&id], outcome).await
}

fn spec(job_id: &str, image: &str, plugin: &str, args: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        job_id: job_id.to_owned(),
        image: image.to_owned(),
        entrypoint: vec!["/bin/sh".into(), format!("/plugins/{plugin}")],
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        plugin_type: pb::PluginType::Fs.into(),
        cpu_millicores: 1000,
        memory_mib: 64,
        workers: 1,
        auid: "slurm-test".into(),
        storage_mode: pb::StorageMode::Zipfile.into(),
        ..pb::JobSpec::default()
    }
}

struct Restart {
    _dir: TestDir,
    config: dispatch_manager::ManagerConfig,
    partition: String,
}

impl Restart {
    async fn start(&self) -> Result<RunningManager> {
        let mut settings = common::config(Runtime::Docker, &self.config.state_dir.join("slurm"))?;
        settings.partition = Some(self.partition.clone());
        let backend = common::open(&self.config.manager_id, settings)?;
        RunningManager::start(self.config.clone(), Arc::new(backend)).await
    }
}

async fn get(
    client: &mut pb::manager_client::ManagerClient<tonic::transport::Channel>,
    id: &str,
) -> Result<pb::BackendJobStatus> {
    Ok(client
        .get_job(pb::ManagerGetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetJob {id}: {s}"))?
        .into_inner())
}

/// A manager stopped while one job runs and another is pending for resources, and started
/// again over a new backend, finds both in their states (GetJob, ListOwn), and sees them
/// through: the running one cancelled, the pending one then run to success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slurm_manager_restart_with_pending_and_running_jobs() -> Result<()> {
    let dir = TestDir::new("slurm-restart")?;
    let partition = common::Partition::create(1)?;
    let config = conformance::base_config("slurm-restart", dir.path())?;
    let image = ensure_test_image_async(Engine::Docker).await?;
    let restart = Restart {
        _dir: dir,
        config,
        partition: partition.name.clone(),
    };
    let (running, pending) = (new_id("running"), new_id("pending"));
    let mut manager = Some(restart.start().await?);
    let mut client = manager.as_mut().context("no manager")?.client().await?;
    let outcome = async {
        for (id, plugin, args) in [
            (&running, "sleep.sh", &["--seconds", "60"][..]),
            (&pending, "exit.sh", &["--code", "0"][..]),
        ] {
            client
                .schedule(pb::ManagerScheduleRequest {
                    spec: Some(spec(id.as_str(), &image, plugin, args)),
                    staging: None,
                    attempt: 0,
                })
                .await
                .map_err(|s| anyhow::anyhow!("Schedule {id}: {s}"))?;
            if id == &running {
                conformance::wait_for_state(
                    &mut client,
                    id.as_str(),
                    &[JobState::Running],
                    Duration::from_secs(60),
                )
                .await?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = get(&mut client, pending.as_str()).await?;
            if status.state() == JobState::Queued && status.message.contains("Resources") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the second job is not pending for resources: {status:?}"
            );
            tokio::time::sleep(POLL).await;
        }

        if let Some(stopping) = manager.take() {
            stopping.stop().await?;
        }
        let restarted = manager.insert(restart.start().await?);
        client = restarted.client().await?;
        let found_running = get(&mut client, running.as_str()).await?;
        let found_pending = get(&mut client, pending.as_str()).await?;
        ensure!(
            found_running.state() == JobState::Running,
            "after the restart: {found_running:?}"
        );
        ensure!(
            found_pending.state() == JobState::Queued,
            "after the restart: {found_pending:?}"
        );
        ensure!(
            found_running.command.first().map(String::as_str) == Some("/bin/sh"),
            "the restarted manager knows the command: {found_running:?}"
        );
        let listed = conformance::list_own(&mut client).await?;
        for id in [&running, &pending] {
            ensure!(
                listed
                    .iter()
                    .filter(|job| job.job_id == id.as_str())
                    .count()
                    == 1,
                "ListOwn: {listed:?}"
            );
        }
        let cancelled = client
            .cancel(pb::ManagerCancelRequest {
                job_id: running.to_string(),
                message: "test".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("Cancel: {s}"))?
            .into_inner();
        ensure!(
            cancelled.state() == JobState::Cancelled,
            "Cancel answered {cancelled:?}"
        );
        conformance::wait_for_state(
            &mut client,
            pending.as_str(),
            &[JobState::Succeeded],
            Duration::from_secs(60),
        )
        .await?;
        Ok(())
    }
    .await;
    for id in [&running, &pending] {
        if let Err(error) = client
            .remove(pb::ManagerRemoveRequest {
                job_id: id.to_string(),
                remove_staging_area: true,
            })
            .await
        {
            eprintln!("cannot remove {id}: {error}");
        }
    }
    if let Some(manager) = manager {
        manager.stop().await?;
    }
    drop(partition);
    outcome
}

//! What the conformance suite does not see: labels on the service and on its container,
//! the isolated network, job ids Swarm cannot use as service names, refusals. Against the
//! real swarm (`scripts/setup-swarm.sh`); a missing swarm fails these tests.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dispatch_backend_swarm::{ISOLATED_NETWORK, SwarmBackend, SwarmConfig};
use dispatch_manager::backend::{JobRequest, labels};
use dispatch_manager::{Backend, BackendError};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::JobState;
use dispatch_testkit::TestDir;
use dispatch_testkit::images::{Engine, ensure_test_image_async};
use futures::StreamExt;

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run the docker CLI")?;
    ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn suffix() -> String {
    format!("{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    // Unique enough across parallel tests: the clock's nanoseconds and the thread id.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

async fn connect(manager_id: &str) -> Result<SwarmBackend> {
    SwarmBackend::connect(manager_id, SwarmConfig::default())
        .await
        .context("connecting to the swarm: run `eval \"$(scripts/setup-swarm.sh)\"` first")
}

fn request(
    dir: &TestDir,
    job_id: &str,
    manager_id: &str,
    image: &str,
    script: &str,
) -> Result<JobRequest> {
    let outgoing = dir.join(&format!("{job_id}-out"));
    std::fs::create_dir_all(&outgoing)?;
    Ok(JobRequest {
        job_id: JobId::parse(job_id)?,
        image: image.to_owned(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("GREETING".into(), "hello".into())],
        cpu: CpuMillis(500),
        memory: MemoryMib(64),
        gpus: 0,
        workers: 1,
        time_limit: None,
        incoming: None,
        outgoing,
        user: None,
        labels: BTreeMap::from([
            (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
            (labels::MANAGER_ID.into(), manager_id.into()),
            (labels::JOB_ID.into(), job_id.into()),
            ("site.example.team".into(), "imaging".into()),
        ]),
    })
}

async fn wait_finished(
    backend: &SwarmBackend,
    job_id: &JobId,
) -> Result<dispatch_manager::Observed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let observed = backend.status(job_id).await?.context("the job vanished")?;
        if observed.is_finished() {
            return Ok(observed);
        }
        ensure!(
            Instant::now() < deadline,
            "not finished in 60 s: {observed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn labels_network_and_a_job_id_swarm_cannot_name() -> Result<()> {
    let dir = TestDir::new("swarm-engine")?;
    let image = ensure_test_image_async(Engine::Docker).await?;
    let manager_id = format!("swarm-engine-{}", suffix());
    let backend = connect(&manager_id).await?;
    // A `.` and a trailing `-`: fine as a job id, not as a service name.
    let id = format!("v1.2-{}-", suffix());
    let job = request(
        &dir,
        &id,
        &manager_id,
        &image,
        "echo \"$GREETING\"; if wget -q -T 2 -O /dev/null http://1.1.1.1/ 2>/dev/null; then echo online; else echo offline; fi",
    )?;
    let submitted = backend.submit(&job).await?;
    let outcome = async {
        ensure!(submitted.job_id.as_str() == id, "{submitted:?}");
        ensure!(
            submitted.backend_name != id && submitted.backend_name.starts_with("v1-2-"),
            "{}",
            submitted.backend_name
        );
        let done = wait_finished(&backend, &job.job_id).await?;
        ensure!(done.state == JobState::Succeeded, "{done:?}");
        let logs: Vec<_> = backend
            .logs(&job.job_id, None, false)
            .await?
            .collect()
            .await;
        let text: String = logs
            .into_iter()
            .map(|chunk| chunk.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect::<Result<_, _>>()?;
        ensure!(text == "hello\noffline\n", "log: {text:?}");

        let name = &done.backend_name;
        let service_labels = docker(&[
            "service",
            "inspect",
            name,
            "--format",
            "{{json .Spec.Labels}}",
        ])?;
        let container = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.swarm.service.name={name}"),
        ])?;
        let container = container.lines().next().context("no task container")?;
        let container_labels =
            docker(&["inspect", container, "--format", "{{json .Config.Labels}}"])?;
        for (key, value) in &job.labels {
            let pair = format!("\"{key}\":\"{value}\"");
            ensure!(
                service_labels.contains(&pair),
                "service lacks {pair}: {service_labels}"
            );
            ensure!(
                container_labels.contains(&pair),
                "container lacks {pair}: {container_labels}"
            );
        }
        let networks = docker(&[
            "inspect",
            container,
            "--format",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        ])?;
        ensure!(networks.trim() == ISOLATED_NETWORK, "networks: {networks}");

        let listed = backend.list_owned().await?;
        ensure!(
            listed.len() == 1 && listed[0].job_id == job.job_id,
            "{listed:?}"
        );
        // Another manager's backend sees nothing of it.
        let other = connect(&format!("other-{}", suffix())).await?;
        ensure!(other.status(&job.job_id).await?.is_none());
        ensure!(!other.remove(&job.job_id).await?);
        Ok(())
    }
    .await;
    let removed = backend.remove(&job.job_id).await;
    outcome?;
    ensure!(removed?, "remove answered false");
    ensure!(backend.status(&job.job_id).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn a_killed_job_keeps_its_record_and_log() -> Result<()> {
    let dir = TestDir::new("swarm-engine")?;
    let image = ensure_test_image_async(Engine::Docker).await?;
    let manager_id = format!("swarm-engine-{}", suffix());
    let backend = connect(&manager_id).await?;
    let id = format!("kill-{}", suffix());
    let job = request(
        &dir,
        &id,
        &manager_id,
        &image,
        "echo started; sleep 60; echo done",
    )?;
    backend.submit(&job).await?;
    let outcome = async {
        // Killed at once, while it may still be queued: the kill waits for its container.
        backend.kill(&job.job_id).await?;
        let done = wait_finished(&backend, &job.job_id).await?;
        ensure!(
            done.state == JobState::Failed && done.exit_code == Some(137),
            "{done:?}"
        );
        ensure!(
            done.reason != dispatch_proto::v1::ReasonCode::OomKilled,
            "a kill is no OOM: {done:?}"
        );
        // Killing an ended job changes nothing.
        backend.kill(&job.job_id).await?;
        let logs: Vec<_> = backend.logs(&job.job_id, None, true).await?.collect().await;
        ensure!(logs.iter().all(Result::is_ok), "{logs:?}");
        Ok(())
    }
    .await;
    backend.remove(&job.job_id).await?;
    outcome
}

#[tokio::test]
async fn gpus_are_refused_and_a_missing_image_is_not_found() -> Result<()> {
    let dir = TestDir::new("swarm-engine")?;
    let manager_id = format!("swarm-engine-{}", suffix());
    let backend = connect(&manager_id).await?;
    let mut job = request(
        &dir,
        &format!("gpu-{}", suffix()),
        &manager_id,
        "localhost/x:1",
        "true",
    )?;
    job.gpus = 1;
    match backend.submit(&job).await {
        Err(BackendError::Unsupported { field: "gpus", .. }) => {}
        other => bail!("expected gpus Unsupported, got {other:?}"),
    }
    job.gpus = 0;
    job.image = "localhost/no-such-image:1".into();
    let started = Instant::now();
    match backend.submit(&job).await {
        Err(BackendError::ImageNotFound { image, .. }) => ensure!(image == job.image),
        other => bail!("expected ImageNotFound, got {other:?}"),
    }
    ensure!(started.elapsed() < Duration::from_secs(20));
    ensure!(
        backend.status(&job.job_id).await?.is_none(),
        "a refused job left a service"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_engine_is_named() -> Result<()> {
    let config = SwarmConfig {
        host: Some("unix:///nonexistent/dispatch-test.sock".into()),
        ..SwarmConfig::default()
    };
    match SwarmBackend::connect("m", config).await {
        Err(BackendError::Engine(message)) => {
            ensure!(
                message.contains("/nonexistent/dispatch-test.sock"),
                "{message}"
            );
            Ok(())
        }
        other => bail!("expected an engine error, got {:?}", other.map(|_| ())),
    }
}

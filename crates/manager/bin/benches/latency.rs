//! Latency of a trivial job through the manager against a bare `docker run --rm`, in one
//! run, interleaved, on the real Docker engine.
//!
//! - **manager**: `Schedule` of busybox `true` through the manager's gRPC API (in-process
//!   server over the docker backend), `Logs` with follow until the job ends, `GetJob`
//!   (it must say SUCCEEDED), then `Remove`: a job run and cleaned up, as a client sees it.
//! - **docker run**: `docker run --rm --network none` of the same image and command with
//!   the same two bind mounts, as a real process (the CLI included, as a user pays it).
//!
//! It prints the median and p95 of each and the ratio of the medians. Environment:
//! `BENCH_JOBS` (50) jobs of each; `BENCH_ENFORCE=1` exits 1 when the median ratio is over
//! the 1.25.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use dispatch_proto::v1 as pb;
use dispatch_proto::v1::manager_client::ManagerClient;
use dispatch_testkit::TestDir;
use dispatch_testkit::images::{Engine, ensure_test_image};

const TARGET_RATIO: f64 = 1.25;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn spec(job_id: &str, image: &str) -> pb::JobSpec {
    pb::JobSpec {
        job_id: job_id.into(),
        image: image.into(),
        entrypoint: vec!["/bin/true".into()],
        plugin_type: pb::PluginType::Fs as i32,
        cpu_millicores: 1000,
        memory_mib: 64,
        workers: 1,
        storage_mode: pb::StorageMode::Zipfile as i32,
        ..Default::default()
    }
}

async fn through_manager(
    client: &mut ManagerClient<tonic::transport::Channel>,
    job_id: &str,
    image: &str,
) -> Result<Duration> {
    let started = Instant::now();
    let request = pb::ManagerScheduleRequest {
        spec: Some(spec(job_id, image)),
        staging: None,
        attempt: 0,
    };
    client.schedule(request).await?;
    let mut logs = client
        .logs(pb::ManagerLogsRequest {
            job_id: job_id.into(),
            tail_lines: None,
            follow: true,
        })
        .await?
        .into_inner();
    while logs.message().await?.is_some() {}
    let status = client
        .get_job(pb::ManagerGetJobRequest {
            job_id: job_id.into(),
        })
        .await?
        .into_inner();
    ensure!(
        status.state() == pb::JobState::Succeeded,
        "job {job_id} ended {:?}",
        status.state()
    );
    client
        .remove(pb::ManagerRemoveRequest {
            job_id: job_id.into(),
            remove_staging_area: false,
        })
        .await?;
    Ok(started.elapsed())
}

fn docker_run(
    image: &str,
    incoming: &std::path::Path,
    outgoing: &std::path::Path,
) -> Result<Duration> {
    let started = Instant::now();
    let status = std::process::Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/share/incoming:ro", incoming.display()))
        .arg("-v")
        .arg(format!("{}:/share/outgoing", outgoing.display()))
        .args(["--entrypoint", "/bin/true", image])
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run the docker CLI")?;
    ensure!(status.success(), "docker run failed: {status}");
    Ok(started.elapsed())
}

fn report(name: &str, times: &mut [Duration]) -> Duration {
    times.sort();
    let median = percentile(times, 0.5);
    println!(
        "{name:<12} median {:>7.1} ms   p95 {:>7.1} ms   min {:>7.1} ms   max {:>7.1} ms",
        median.as_secs_f64() * 1e3,
        percentile(times, 0.95).as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    median
}

#[tokio::main]
async fn main() -> Result<()> {
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let image = ensure_test_image(Engine::Docker)?;
    let dir = TestDir::new("latency")?;
    let store = dir.join("store");
    std::fs::create_dir_all(&store)?;
    let config = dispatch_manager::ManagerConfig {
        manager_id: format!("bench-{}", std::process::id()),
        backend: "docker".into(),
        store_root: store.clone(),
        state_dir: dir.join("state"),
        insecure_no_auth: true,
        ..Default::default()
    };
    let docker =
        dispatch_backend_docker::DockerBackend::connect(&config.manager_id, Default::default())
            .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dispatch_manager::server::run(
        Arc::new(config),
        Arc::new(docker),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = ManagerClient::connect(format!("http://{address}")).await?;
    let (incoming, outgoing) = (dir.join("incoming"), dir.join("outgoing"));
    std::fs::create_dir_all(&incoming)?;
    std::fs::create_dir_all(&outgoing)?;

    // One warm-up of each: the first container start pays for caches the rest share.
    through_manager(&mut client, "bench-warmup", &image).await?;
    docker_run(&image, &incoming, &outgoing)?;
    let (mut managed, mut raw) = (Vec::with_capacity(jobs), Vec::with_capacity(jobs));
    for i in 0..jobs {
        managed.push(through_manager(&mut client, &format!("bench-{i}"), &image).await?);
        raw.push(docker_run(&image, &incoming, &outgoing)?);
    }
    let _ = stop.send(());
    match server.await? {
        Ok(()) => {}
        Err(error) => bail!("manager: {error}"),
    }

    println!("\n== a trivial job: manager gRPC vs docker run --rm ({jobs} each, interleaved) ==");
    let manager_median = report("manager", &mut managed);
    let docker_median = report("docker run", &mut raw);
    let ratio = manager_median.as_secs_f64() / docker_median.as_secs_f64();
    println!("median ratio manager/docker run: {ratio:.2}");
    let verdict = if ratio <= TARGET_RATIO {
        "PASS"
    } else {
        "FAIL"
    };
    println!("{verdict} median ratio {ratio:.2} <= {TARGET_RATIO}");
    if verdict == "FAIL" && std::env::var("BENCH_ENFORCE").is_ok_and(|v| v == "1") {
        std::process::exit(1);
    }
    Ok(())
}

//! Submit-to-running latency on the Slurm cluster `SLURM_CONF` names (scripts/setup-slurm.sh
//! starts one): through the backend (`submit`, then `status` until RUNNING) against a bare
//! `sbatch --wrap` polled with `squeue`, in the same run, alternating, one job at a time.
//!
//!   eval "$(scripts/setup-slurm.sh)"; cargo bench -p dispatch-backend-slurm --bench latency
//!
//! Environment: `DISPATCH_BENCH_ROUNDS` (default 8) rounds of each.
//!
//! The jobs run `sleep` without a container (`runtime = "none"`), so the figures are
//! Slurm's and the backend's, not a container runtime's start-up. slurmctld starts jobs
//! on its scheduling pass (about once a second here), which dominates both.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dispatch_backend_slurm::{Runtime, SlurmBackend, SlurmConfig};
use dispatch_manager::backend::{Backend, JobRequest, labels};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};
use dispatch_proto::v1::JobState;

/// How often both sides look.
const POLL: Duration = Duration::from_millis(20);
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn slurm(conf: &str, tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `sbatch --wrap`, then `squeue` every [`POLL`] until RUNNING.
fn bare_sbatch(conf: &str) -> Result<Duration> {
    let started = Instant::now();
    let id = slurm(
        conf,
        "sbatch",
        &[
            "--parsable",
            "--mem=64",
            "--output=/dev/null",
            "--wrap",
            "sleep 30",
        ],
    )?;
    let id = id.split(';').next().unwrap_or_default().to_owned();
    let elapsed = loop {
        let state = slurm(
            conf,
            "squeue",
            &["--noheader", "--states=all", "--format=%T", "--jobs", &id],
        )?;
        if state == "RUNNING" {
            break started.elapsed();
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("bare job {id} not running within {START_TIMEOUT:?}: {state}");
        }
        std::thread::sleep(POLL);
    };
    slurm(conf, "scancel", &[&id])?;
    // As the backend's remove does: wait for the end, so no job is still completing when
    // the next one is submitted (slurmctld holds back scheduling on a completing node).
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        let state = slurm(
            conf,
            "squeue",
            &["--noheader", "--states=all", "--format=%T", "--jobs", &id],
        )?;
        if !matches!(state.as_str(), "RUNNING" | "COMPLETING" | "PENDING") {
            break;
        }
        std::thread::sleep(POLL);
    }
    Ok(elapsed)
}

/// `submit`, then `status` every [`POLL`] until RUNNING.
async fn through_backend(
    backend: &SlurmBackend,
    dir: &std::path::Path,
    round: usize,
) -> Result<Duration> {
    let job_id = JobId::parse(&format!("bench-{round}-{}", std::process::id()))?;
    let outgoing = dir.join(format!("key-{job_id}/outgoing"));
    std::fs::create_dir_all(&outgoing)?;
    let job = JobRequest {
        job_id: job_id.clone(),
        image: "ignored:1".into(),
        command: vec!["/bin/sh".into(), "-c".into(), "sleep 30".into()],
        env: Vec::new(),
        cpu: CpuMillis(1000),
        memory: MemoryMib(64),
        gpus: 0,
        workers: 1,
        time_limit: None,
        incoming: None,
        outgoing,
        user: None,
        labels: BTreeMap::from([(labels::JOB_ID.into(), job_id.to_string())]),
    };
    let started = Instant::now();
    backend.submit(&job).await?;
    let elapsed = loop {
        let seen = backend.status(&job_id).await?.context("the job vanished")?;
        if seen.state == JobState::Running {
            break started.elapsed();
        }
        if started.elapsed() > START_TIMEOUT || seen.is_finished() {
            bail!("job {job_id} not running within {START_TIMEOUT:?}: {seen:?}");
        }
        tokio::time::sleep(POLL).await;
    };
    backend.remove(&job_id).await?;
    Ok(elapsed)
}

fn summary(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<Duration>() / u32::try_from(times.len()).unwrap_or(1);
    println!(
        "{name:<44} n={:<3} median {:>7.0} ms  mean {:>7.0} ms  min {:>7.0} ms  max {:>7.0} ms",
        times.len(),
        ms(median),
        ms(mean),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; this bench takes no arguments of its own.
    let conf = std::env::var("SLURM_CONF")
        .context("SLURM_CONF is not set: run `eval \"$(scripts/setup-slurm.sh)\"` first")?;
    let rounds: usize = std::env::var("DISPATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir()?;
    let open = |interval: u64| -> Result<SlurmBackend> {
        Ok(SlurmBackend::open(
            &format!("bench-{interval}-{}", std::process::id()),
            SlurmConfig {
                job_dir: Some(dir.path().join(format!("jobs-{interval}"))),
                slurm_conf: Some(conf.clone().into()),
                runtime: Runtime::None,
                query_interval_millis: interval,
                ..SlurmConfig::default()
            },
        )?)
    };
    let default_interval = SlurmConfig::default().query_interval_millis;
    let backend = open(default_interval)?;
    let eager = open(POLL.as_millis() as u64)?;
    let (mut bare, mut default, mut fast) = (Vec::new(), Vec::new(), Vec::new());
    let settle = || tokio::time::sleep(Duration::from_secs(1));
    for round in 0..rounds {
        bare.push(bare_sbatch(&conf)?);
        settle().await;
        default.push(through_backend(&backend, dir.path(), round).await?);
        settle().await;
        fast.push(through_backend(&eager, dir.path(), round).await?);
        settle().await;
    }
    println!(
        "submit to RUNNING, polled every {} ms, {rounds} rounds alternating:",
        POLL.as_millis()
    );
    summary("bare sbatch + squeue", bare);
    summary(
        &format!("SlurmBackend (query_interval_millis {default_interval})"),
        default,
    );
    summary(
        &format!("SlurmBackend (query_interval_millis {})", POLL.as_millis()),
        fast,
    );
    Ok(())
}

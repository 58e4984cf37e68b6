//! The backend against a fake Slurm (named so): shell scripts standing in for `sbatch`,
//! `squeue`, `scontrol` and `sinfo` that fail, hang or print nonsense, to check that the
//! backend never panics on odd output and that its errors name the command and what to
//! do. No cluster is needed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Result, ensure};
use dispatch_backend_slurm::{Runtime, SlurmBackend, SlurmConfig};
use dispatch_manager::backend::{Backend, BackendError, JobRequest};
use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};

/// Writes an executable `name` into `bin` running `body` with /bin/sh.
fn fake_tool(bin: &Path, name: &str, body: &str) -> Result<()> {
    let path = bin.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn backend(dir: &Path, timeout_seconds: u64) -> Result<SlurmBackend> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    Ok(SlurmBackend::open(
        "fake-slurm",
        SlurmConfig {
            job_dir: Some(dir.join("jobs")),
            bin_dir: Some(bin),
            runtime: Runtime::None,
            command_timeout_seconds: timeout_seconds,
            ..SlurmConfig::default()
        },
    )?)
}

fn job(dir: &Path, id: &str) -> Result<JobRequest> {
    let outgoing = dir.join(format!("key-{id}/outgoing"));
    std::fs::create_dir_all(&outgoing)?;
    Ok(JobRequest {
        job_id: JobId::parse(id)?,
        image: "ignored:1".into(),
        command: vec!["/bin/true".into()],
        env: Vec::new(),
        cpu: CpuMillis(1000),
        memory: MemoryMib(64),
        gpus: 0,
        workers: 1,
        time_limit: None,
        incoming: None,
        outgoing,
        user: None,
        labels: BTreeMap::new(),
    })
}

#[tokio::test]
async fn a_missing_tool_is_named_with_what_to_install() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = backend(dir.path(), 5)?;
    let error = backend.capabilities().await.unwrap_err().to_string();
    ensure!(
        error.contains("sinfo` was not found") && error.contains("slurm-client"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn an_sbatch_refusal_says_why_and_leaves_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = backend(dir.path(), 5)?;
    let bin = dir.path().join("bin");
    fake_tool(
        &bin,
        "sbatch",
        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2; exit 1",
    )?;
    let error = backend
        .submit(&job(dir.path(), "refused-1")?)
        .await
        .unwrap_err();
    ensure!(
        matches!(&error, BackendError::Unsupported { field: "slurm", reason } if reason.contains("Invalid partition")),
        "{error:?}"
    );
    ensure!(
        !backend.job_dir("refused-1").exists(),
        "a refused job left its directory"
    );

    fake_tool(&bin, "sbatch", "echo 'Submitted batch job, or so'")?;
    let error = backend
        .submit(&job(dir.path(), "noid-1")?)
        .await
        .unwrap_err();
    ensure!(error.to_string().contains("printed no job id"), "{error}");
    ensure!(
        !backend.job_dir("noid-1").exists(),
        "a failed job left its directory"
    );

    fake_tool(
        &bin,
        "sbatch",
        "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2; exit 1",
    )?;
    let error = backend
        .submit(&job(dir.path(), "down-1")?)
        .await
        .unwrap_err();
    let text = error.to_string();
    ensure!(
        matches!(error, BackendError::Engine(_))
            && text.contains("sbatch --parsable")
            && text.contains("is slurmctld running"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn nonsense_from_squeue_and_scontrol_is_no_job() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = backend(dir.path(), 5)?;
    let bin = dir.path().join("bin");
    fake_tool(
        &bin,
        "squeue",
        "printf '%s\\n' '' '|||' 'garbage' '1|RUNNING' '7|RUNNING|x|y|not-other|chris-dispatch:fake-slurm:other|None' \
         '8|RUNNING|1|2|n|chris-dispatch:fake-slurm:bad/id|None' '\\377\\376'",
    )?;
    fake_tool(&bin, "scontrol", "echo 'JobId= JobState=?? ExitCode=:'")?;
    let unknown = JobId::parse("unknown-1")?;
    ensure!(backend.status(&unknown).await?.is_none());
    // A name that is not the job id in the comment is not ours either.
    ensure!(backend.status(&JobId::parse("other")?).await?.is_none());
    let owned = backend.list_owned().await?;
    ensure!(owned.is_empty(), "{owned:?}");
    Ok(())
}

#[tokio::test]
async fn a_hung_tool_times_out_naming_itself() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = backend(dir.path(), 1)?;
    fake_tool(&dir.path().join("bin"), "squeue", "exec sleep 30")?;
    let started = std::time::Instant::now();
    let error = backend.list_owned().await.unwrap_err().to_string();
    ensure!(
        error.contains("squeue") && error.contains("did not answer within 1 s"),
        "{error}"
    );
    ensure!(started.elapsed() < std::time::Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
async fn a_directory_left_by_a_crashed_submit_is_reclaimed_once_old() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = backend(dir.path(), 5)?;
    let bin = dir.path().join("bin");
    fake_tool(&bin, "sbatch", "echo 42")?;
    fake_tool(&bin, "squeue", "exit 0")?;
    fake_tool(
        &bin,
        "scontrol",
        "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
    )?;
    let left = backend.job_dir("crashed-1");
    std::fs::create_dir_all(&left)?;
    // Young: a submit may be writing it now.
    let error = backend
        .submit(&job(dir.path(), "crashed-1")?)
        .await
        .unwrap_err();
    ensure!(matches!(error, BackendError::AlreadyExists(_)), "{error:?}");
    let aged = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&left)
        .status()?;
    ensure!(aged.success());
    let submitted = backend.submit(&job(dir.path(), "crashed-1")?).await?;
    ensure!(submitted.backend_name == "slurm job 42", "{submitted:?}");
    ensure!(left.join("record.json").exists());
    Ok(())
}

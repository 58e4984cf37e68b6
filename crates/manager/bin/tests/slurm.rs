//! `dispatch-manager --backend slurm` as an operator runs it, on the one-node cluster of
//! `scripts/setup-slurm.sh` (found through `SLURM_CONF`; without it this test fails): the
//! slurm settings from the config's `[slurm]` table and `--slurm-config`, a job end to end as a Slurm batch job, and a
//! clean stop on SIGTERM that leaves no job behind.

#![cfg(feature = "slurm")]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dispatch_proto::v1 as pb;
use dispatch_proto::v1::manager_client::ManagerClient;
use dispatch_testkit::{ServiceBinary, TestDir};

const MANAGER: &str = env!("CARGO_BIN_EXE_dispatch-manager");

#[tokio::test]
async fn slurm_backend_runs_a_job_from_the_binary() -> Result<()> {
    let Some(slurm_conf) = std::env::var_os("SLURM_CONF").filter(|v| !v.is_empty()) else {
        bail!(
            "SLURM_CONF is not set: run `eval \"$(scripts/setup-slurm.sh)\"` first (scripts/test.sh does)"
        );
    };
    let dir = TestDir::new("manager-binary-slurm")?;
    std::fs::create_dir_all(dir.join("store"))?;
    // The `[slurm]` table of the manager's file, with `--slurm-config` laid over it: the
    // job runs without a container (the node's /bin/sh, here this host's) only if the
    // file's `runtime = "none"` wins over the table's `docker`, which could not run the
    // image `ignored:1`.
    std::fs::write(
        dir.join("manager.toml"),
        format!(
            "[slurm]\nslurm_conf = {:?}\nruntime = \"docker\"\n",
            slurm_conf.to_string_lossy()
        ),
    )?;
    std::fs::write(dir.join("slurm.toml"), "[slurm]\nruntime = \"none\"\n")?;
    let mut command = Command::new(MANAGER);
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "slurm",
            "--insecure-no-auth",
        ])
        .arg("--manager-id")
        .arg(format!("binary-slurm-{}", std::process::id()))
        .arg("--store-root")
        .arg(dir.join("store"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--config")
        .arg(dir.join("manager.toml"))
        .arg("--slurm-config")
        .arg(dir.join("slurm.toml"));
    let mut manager = ServiceBinary::spawn(command, "manager serving", dir.join("manager.log"))?;
    let mut client = ManagerClient::connect(manager.uri.clone()).await?;
    let capabilities = client
        .capabilities(pb::ManagerCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities
        .context("no capabilities")?;
    assert_eq!(capabilities.backend_kind, pb::BackendKind::Slurm as i32);
    assert!(
        capabilities.backend_version.contains("slurm"),
        "{capabilities:?}"
    );

    let job_id = "chris-jid-slurm-1";
    // An FS plugin gets the output directory as its last argument: `$0` of `sh -c`.
    let spec = pb::JobSpec {
        job_id: job_id.into(),
        image: "ignored:1".into(),
        entrypoint: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello from slurm; echo written > \"$0/hello.txt\"".into(),
        ],
        plugin_type: pb::PluginType::Fs as i32,
        cpu_millicores: 500,
        memory_mib: 64,
        workers: 1,
        storage_mode: pb::StorageMode::Zipfile as i32,
        ..Default::default()
    };
    client
        .schedule(pb::ManagerScheduleRequest {
            spec: Some(spec),
            staging: None,
            attempt: 0,
        })
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = client
            .get_job(pb::ManagerGetJobRequest {
                job_id: job_id.into(),
            })
            .await?
            .into_inner();
        if status.state() == pb::JobState::Succeeded || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        status.state(),
        pb::JobState::Succeeded,
        "{status:?}\n{}",
        manager.log()
    );
    assert!(status.backend_name.starts_with("slurm job "), "{status:?}");
    let written =
        std::fs::read_to_string(dir.join(&format!("store/key-{job_id}/outgoing/hello.txt")))?;
    assert_eq!(written, "written\n");
    let mut logs = client
        .logs(pb::ManagerLogsRequest {
            job_id: job_id.into(),
            tail_lines: None,
            follow: false,
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await? {
        text.extend_from_slice(&chunk.data);
    }
    assert!(
        String::from_utf8_lossy(&text).contains("hello from slurm"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    let removed = client
        .remove(pb::ManagerRemoveRequest {
            job_id: job_id.into(),
            remove_staging_area: true,
        })
        .await?
        .into_inner();
    assert!(removed.removed);
    assert!(!dir.join(&format!("state/slurm/{job_id}")).exists());
    assert!(
        manager.terminate()?,
        "SIGTERM must stop the manager cleanly:\n{}",
        manager.log()
    );
    Ok(())
}

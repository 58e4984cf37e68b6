//! The `dispatch-manager` binary joined to a hub (a fake coordinator): it registers with
//! the join token from its flag, runs a leased job on the local backend, serves its own
//! API meanwhile, refuses to start with neither a credential nor a token, and on SIGTERM
//! says goodbye to the hub and exits cleanly.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_proto::v1::{self as pb, site_message};
use dispatch_testkit::fake_coordinator::{FakeCoordinator, FakeCoordinatorOptions};
use dispatch_testkit::images::plugin_host_path;
use dispatch_testkit::{ServiceBinary, TestDir};

const MANAGER: &str = env!("CARGO_BIN_EXE_dispatch-manager");
const WAIT: Duration = Duration::from_secs(30);

fn command(dir: &TestDir, hub: &FakeCoordinator) -> Command {
    let mut command = Command::new(MANAGER);
    command
        .args([
            "--backend",
            "local",
            "--listen",
            "127.0.0.1:0",
            "--manager-id",
        ])
        .arg(format!("hub-binary-test-{}", std::process::id()))
        .arg("--store-root")
        .arg(dir.join("store"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--insecure-no-auth")
        .arg("--coordinator-uri")
        .arg(&hub.uri)
        .env("DISPATCH_MANAGER_HUB__RECONNECT_INITIAL_MILLIS", "50")
        .env("DISPATCH_MANAGER_HUB__JOB_POLL_MILLIS", "50")
        .env("DISPATCH_MANAGER_HUB__SITE_LABELS__REGION", "test");
    command
}

#[tokio::test]
async fn joins_the_hub_runs_a_lease_and_says_goodbye_on_sigterm() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("manager-hub-binary")?;
    std::fs::create_dir_all(dir.join("store"))?;

    // Neither a credential nor a token: a clear error at start, not a silent retry loop.
    let refused = command(&dir, &hub).output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("join-token-file"), "{stderr}");

    std::fs::write(dir.join("join-token"), hub.join_token())?;
    let mut joined = command(&dir, &hub);
    joined.arg("--join-token-file").arg(dir.join("join-token"));
    let mut manager = ServiceBinary::spawn(joined, "manager serving", dir.join("manager.log"))?;
    let hello = hub.wait_for_session(1, WAIT).await?;
    let labels = hello.capabilities.context("no capabilities")?.labels;
    assert_eq!(labels.get("region").map(String::as_str), Some("test"));

    let script = plugin_host_path("exit.sh")?;
    let spec = pb::JobSpec {
        job_id: "hub-job-1".into(),
        image: "ignored:1".into(),
        entrypoint: vec!["/bin/sh".into(), script.display().to_string()],
        args: vec!["--code".into(), "3".into()],
        plugin_type: pb::PluginType::Fs as i32,
        cpu_millicores: 100,
        memory_mib: 64,
        workers: 1,
        storage_mode: pb::StorageMode::Zipfile as i32,
        ..Default::default()
    };
    hub.run_job(pb::RunJobCommand {
        spec: Some(spec),
        attempt: 1,
        staging: None,
        lease_seconds: 60,
    })
    .await?;
    let failed = hub
        .wait_for_state("hub-job-1", pb::JobState::Failed, WAIT)
        .await?;
    let reason = failed.status.and_then(|s| s.reason).context("no reason")?;
    assert_eq!(reason.code(), pb::ReasonCode::ExitCode);
    assert_eq!(reason.exit_code, Some(3));

    assert!(manager.terminate()?, "exits cleanly on SIGTERM");
    hub.wait_for("a goodbye", WAIT, |received| {
        received
            .iter()
            .find(|r| matches!(r.message, site_message::Message::Goodbye(_)))
            .cloned()
    })
    .await?;
    let log = manager.log();
    assert!(log.contains("joined the hub"), "{log}");
    assert!(
        !log.contains(hub.join_token()),
        "the join token must never be logged"
    );
    if let Some(credential) = hub.credential() {
        assert!(
            !log.contains(&credential),
            "the credential must never be logged"
        );
    }
    hub.stop().await
}

//! The `dispatch-coordinator` binary as an operator runs it: configuration, concise
//! errors, a token, a crash (SIGKILL) that loses nothing acknowledged, and SIGTERM.

mod common;

use std::process::Command;

use anyhow::{Context as _, Result};
use tonic::Request;

use dispatch_proto::v1;
use dispatch_proto::v1::coordinator_client::CoordinatorClient;
use dispatch_testkit::{ServiceBinary, TestDir};

const COORDINATOR: &str = env!("CARGO_BIN_EXE_dispatch-coordinator");
const TOKEN: &str = "binary-test-token-0123456789";

fn command(dir: &TestDir) -> Command {
    let mut command = Command::new(COORDINATOR);
    command
        .env_remove("DISPATCH_COORDINATOR_CONFIG")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--token-file")
        .arg(dir.join("token"));
    command
}

fn authorized<T>(message: T) -> Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    Ok(request)
}

#[test]
fn print_config_hides_the_database_password() -> Result<()> {
    let dir = TestDir::new("coordinator-config")?;
    let output = command(&dir)
        .env(
            "DISPATCH_COORDINATOR_DATABASE_URL",
            "postgres://dispatch:hunter2@db.example/jobs",
        )
        .arg("--print-config")
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("version = 1"), "{stdout}");
    assert!(
        stdout.contains("postgres://dispatch:***@db.example/jobs"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
    Ok(())
}

#[test]
fn refusals_are_one_line() -> Result<()> {
    let dir = TestDir::new("coordinator-refusals")?;
    // No token file and no --insecure-no-auth.
    let output = Command::new(COORDINATOR)
        .env_remove("DISPATCH_COORDINATOR_CONFIG")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .output()?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(!output.status.success());
    assert!(
        stderr.starts_with("error: configuration: no token_file"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let output = command(&dir)
        .args(["--database-url", "mysql://u:pw@h/db"])
        .output()?;
    let stderr = String::from_utf8(output.stderr)?;
    assert!(!output.status.success());
    assert!(stderr.contains("neither postgres://"), "{stderr}");
    assert!(!stderr.contains(":pw@"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn a_crash_loses_nothing_acknowledged() -> Result<()> {
    let dir = TestDir::new("coordinator-binary")?;
    std::fs::write(dir.join("token"), format!("{TOKEN}\n"))?;
    let mut coordinator =
        ServiceBinary::spawn(command(&dir), "coordinator serving", dir.join("first.log"))?;
    let mut client = CoordinatorClient::connect(coordinator.uri.clone()).await?;
    let refused = client
        .get_job(v1::GetJobRequest {
            job_id: "job-1".into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let answer = client
            .submit_job(authorized(v1::SubmitJobRequest {
                spec: Some(common::spec(&format!("job-{i}"))),
                ..Default::default()
            })?)
            .await?
            .into_inner();
        acknowledged.push(answer.job.context("job")?);
    }
    coordinator.kill()?;

    let mut successor =
        ServiceBinary::spawn(command(&dir), "coordinator serving", dir.join("second.log"))?;
    let mut client = CoordinatorClient::connect(successor.uri.clone()).await?;
    for job in &acknowledged {
        let id = job
            .spec
            .as_ref()
            .map(|s| s.job_id.clone())
            .unwrap_or_default();
        let stored = client
            .get_job(authorized(v1::GetJobRequest { job_id: id })?)
            .await?
            .into_inner();
        assert_eq!(&stored, job);
    }
    assert!(successor.terminate()?, "exits cleanly on SIGTERM");
    assert!(
        successor.log().contains("coordinator stopped"),
        "{}",
        successor.log()
    );
    // The log never shows env values.
    assert!(!successor.log().contains("tok-secret-value"));
    assert!(!coordinator.log().contains("tok-secret-value"));
    Ok(())
}

//! The `dispatch` command against a real coordinator binary, as a user runs it.

use std::process::{Command, Output};

use anyhow::Result;
use dispatch_testkit::{ServiceBinary, TestDir, workspace_binary};

const DISPATCH: &str = env!("CARGO_BIN_EXE_dispatch");
const TOKEN: &str = "cli-test-token-long-enough";

struct Hub {
    _dir: TestDir,
    coordinator: ServiceBinary,
}

fn start() -> Result<Hub> {
    let dir = TestDir::new("cli")?;
    std::fs::write(dir.join("token"), TOKEN)?;
    let mut command = Command::new(workspace_binary("dispatch-coordinator")?);
    command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--token-file")
        .arg(dir.join("token"));
    let coordinator =
        ServiceBinary::spawn(command, "coordinator serving", dir.join("coordinator.log"))?;
    Ok(Hub {
        _dir: dir,
        coordinator,
    })
}

impl Hub {
    fn dispatch(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(DISPATCH)
            .args(args)
            .env("DISPATCH_COORDINATOR", &self.coordinator.uri)
            .env("DISPATCH_TOKEN", TOKEN)
            .output()?)
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn submit_show_cancel_watch_and_delete_a_job() -> Result<()> {
    let hub = start()?;
    let submitted = hub.dispatch(&[
        "submit",
        "--job-id",
        "cli-job-1",
        "--image",
        "busybox:1",
        "--type",
        "fs",
        "--",
        "/bin/true",
    ])?;
    assert!(submitted.status.success(), "{}", text(&submitted));
    assert_eq!(
        String::from_utf8_lossy(&submitted.stdout).trim(),
        "cli-job-1"
    );

    let again = hub.dispatch(&[
        "submit",
        "--job-id",
        "cli-job-1",
        "--image",
        "busybox:1",
        "--type",
        "fs",
        "--",
        "/bin/true",
    ])?;
    assert!(
        again.status.success() && text(&again).contains("already exists"),
        "{}",
        text(&again)
    );

    let status = hub.dispatch(&["--json", "status", "cli-job-1"])?;
    let job: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(
        job["command"],
        serde_json::json!(["/bin/true", "/share/outgoing"])
    );

    let listed = hub.dispatch(&["list", "--state", "queued"])?;
    assert!(text(&listed).contains("cli-job-1"), "{}", text(&listed));

    let cancelled = hub.dispatch(&["cancel", "cli-job-1"])?;
    assert!(
        text(&cancelled).contains("cancelled"),
        "{}",
        text(&cancelled)
    );
    let watched = hub.dispatch(&["watch", "cli-job-1", "--until-done"])?;
    let events = text(&watched);
    assert!(
        events.contains("queued") && events.contains("cancelled"),
        "{events}"
    );

    let deleted = hub.dispatch(&["delete", "cli-job-1", "--purge"])?;
    assert!(text(&deleted).contains("purged"), "{}", text(&deleted));
    let gone = hub.dispatch(&["status", "cli-job-1"])?;
    assert!(
        !gone.status.success() && text(&gone).contains("NotFound"),
        "{}",
        text(&gone)
    );
    Ok(())
}

#[test]
fn errors_say_what_to_fix() -> Result<()> {
    let hub = start()?;
    let bad_env = hub.dispatch(&[
        "submit",
        "--image",
        "busybox:1",
        "--env",
        "NOEQUALS",
        "--",
        "/bin/true",
    ])?;
    assert!(!bad_env.status.success());
    assert!(text(&bad_env).contains("env"), "{}", text(&bad_env));

    let no_token = Command::new(DISPATCH)
        .args(["list"])
        .env("DISPATCH_COORDINATOR", &hub.coordinator.uri)
        .env_remove("DISPATCH_TOKEN")
        .output()?;
    assert!(
        !no_token.status.success() && text(&no_token).contains("Unauthenticated"),
        "{}",
        text(&no_token)
    );

    let unreachable = Command::new(DISPATCH)
        .args(["--coordinator", "http://127.0.0.1:1", "list"])
        .output()?;
    assert!(
        text(&unreachable).contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{}",
        text(&unreachable)
    );
    Ok(())
}

//! The `dispatch-manager` binary as an operator runs it: flags, token, a job end to end on
//! the local backend, and a clean stop on SIGTERM.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_proto::v1 as pb;
use dispatch_proto::v1::manager_client::ManagerClient;
use dispatch_testkit::{ServiceBinary, TestDir};
use tonic::Code;

const MANAGER: &str = env!("CARGO_BIN_EXE_dispatch-manager");
const TOKEN: &str = "a-test-token-of-enough-length";

fn command(dir: &TestDir) -> Command {
    let mut command = Command::new(MANAGER);
    command
        .args(["--listen", "127.0.0.1:0", "--manager-id"])
        .arg(format!("binary-test-{}", std::process::id()))
        .arg("--store-root")
        .arg(dir.join("store"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(dir.join("token"));
    command
}

fn local(dir: &TestDir) -> Command {
    let mut command = command(dir);
    command.args(["--backend", "local"]);
    command
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn runs_a_job_behind_its_token_and_stops_cleanly() -> Result<()> {
    let dir = TestDir::new("manager-binary")?;
    std::fs::create_dir_all(dir.join("store"))?;
    std::fs::write(dir.join("token"), format!("{TOKEN}\n"))?;
    let mut manager =
        ServiceBinary::spawn(local(&dir), "manager serving", dir.join("manager.log"))?;
    let mut client = ManagerClient::connect(manager.uri.clone()).await?;

    let refused = client
        .capabilities(pb::ManagerCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "{}",
        refused.message()
    );
    let wrong = client
        .capabilities(authorized(
            pb::ManagerCapabilitiesRequest {},
            "not-the-token-at-all",
        ))
        .await;
    assert_eq!(wrong.unwrap_err().code(), Code::Unauthenticated);
    let capabilities = client
        .capabilities(authorized(pb::ManagerCapabilitiesRequest {}, TOKEN))
        .await?
        .into_inner();
    let kind = capabilities
        .capabilities
        .context("no capabilities")?
        .backend_kind;
    assert_eq!(kind, pb::BackendKind::Local as i32);

    let spec = pb::JobSpec {
        job_id: "chris-jid-1".into(),
        image: "ignored:1".into(),
        entrypoint: vec!["/bin/echo".into(), "hello from the binary".into()],
        plugin_type: pb::PluginType::Fs as i32,
        cpu_millicores: 500,
        memory_mib: 64,
        workers: 1,
        storage_mode: pb::StorageMode::Zipfile as i32,
        ..Default::default()
    };
    let request = pb::ManagerScheduleRequest {
        spec: Some(spec),
        staging: None,
        attempt: 0,
    };
    let scheduled = client
        .schedule(authorized(request, TOKEN))
        .await?
        .into_inner();
    assert!(scheduled.created);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client
            .get_job(authorized(
                pb::ManagerGetJobRequest {
                    job_id: "chris-jid-1".into(),
                },
                TOKEN,
            ))
            .await?
            .into_inner();
        if status.state() == pb::JobState::Succeeded || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.state(), pb::JobState::Succeeded, "{status:?}");
    let mut logs = client
        .logs(authorized(
            pb::ManagerLogsRequest {
                job_id: "chris-jid-1".into(),
                tail_lines: None,
                follow: false,
            },
            TOKEN,
        ))
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await? {
        text.extend_from_slice(&chunk.data);
    }
    // The local backend maps /share/outgoing to the job's real directory.
    let expected = format!(
        "hello from the binary {}",
        dir.join("store/key-chris-jid-1/outgoing")
            .canonicalize()?
            .display()
    );
    assert!(
        String::from_utf8_lossy(&text).contains(&expected),
        "{}",
        String::from_utf8_lossy(&text)
    );
    client
        .remove(authorized(
            pb::ManagerRemoveRequest {
                job_id: "chris-jid-1".into(),
                remove_staging_area: true,
            },
            TOKEN,
        ))
        .await?;
    assert!(!dir.join("store/key-chris-jid-1").exists());

    assert!(
        manager.terminate()?,
        "SIGTERM must stop the manager cleanly:\n{}",
        manager.log()
    );
    assert!(
        manager.log().contains("manager stopped"),
        "{}",
        manager.log()
    );
    Ok(())
}

#[test]
fn refuses_to_start_with_a_clear_reason() -> Result<()> {
    let dir = TestDir::new("manager-refusals")?;
    std::fs::create_dir_all(dir.join("store"))?;
    std::fs::write(dir.join("token"), TOKEN)?;
    // Each backend that cannot reach its engine says which engine, and how to point at
    // another; none of them starts serving regardless.
    // (flags, environment, what stderr must say)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 3] = [
        (
            &["--backend", "swarm"],
            &[(
                "DISPATCH_MANAGER_SWARM__HOST",
                "unix:///nonexistent/engine.sock",
            )],
            "unix:///nonexistent/engine.sock",
        ),
        (
            &["--backend", "kubernetes"],
            &[("KUBECONFIG", "/nonexistent/kubeconfig")],
            "/nonexistent/kubeconfig",
        ),
        (
            &["--backend", "mainframe"],
            &[],
            "unknown backend `mainframe`",
        ),
    ];
    for (args, env, says) in cases {
        let mut command = command(&dir);
        command.args(args).envs(env.iter().copied());
        let output = command.output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let output = Command::new(MANAGER)
        .args([
            "--backend",
            "local",
            "--token-file",
            "/nonexistent/token",
            "--store-root",
        ])
        .arg(dir.join("store"))
        .output()?;
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/token"));
    let output = Command::new(MANAGER)
        .args(["--backend", "local", "--store-root"])
        .arg(dir.join("store"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--token-file") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    Ok(())
}

/// A manager deployed where pfcon ran keeps pfcon's environment: each variable reaches the
/// backend table that uses it, as `--print-config` shows (and loads back as TOML).
#[test]
fn pfcons_variables_reach_the_backends_that_use_them() -> Result<()> {
    let dir = TestDir::new("manager-pfcon-env")?;
    std::fs::create_dir_all(dir.join("store"))?;
    std::fs::write(dir.join("token"), TOKEN)?;
    let output = command(&dir)
        .args(["--backend", "openshift", "--print-config"])
        .envs([
            ("CONTAINER_USER", "1000-1999:1000"),
            ("JOB_LABELS", "site=mgh, tier = gpu"),
            ("IGNORE_LIMITS", "yes"),
            ("SHM_SIZE", "512"),
            ("JOB_NAMESPACE", "chris-jobs"),
            ("VOLUME_NAME", "storebase-claim"),
            ("NODE_SELECTOR", "kubernetes.io/arch=amd64,gpu=a100"),
            ("IMAGE_PULL_SECRETS", "regcred, other"),
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: toml::Table = toml::from_str(&stdout).context("--print-config is TOML")?;
    let table = |name: &str| -> Result<&toml::Table> {
        shown
            .get(name)
            .and_then(toml::Value::as_table)
            .with_context(|| format!("no [{name}] in {stdout}"))
    };
    assert_eq!(shown["container_user"].as_str(), Some("1000-1999:1000"));
    assert_eq!(table("job_labels")?["tier"].as_str(), Some("gpu"));
    assert_eq!(table("docker")?["ignore_limits"].as_bool(), Some(true));
    assert_eq!(table("swarm")?["ignore_limits"].as_bool(), Some(true));
    assert_eq!(table("docker")?["shm_size_mib"].as_integer(), Some(512));
    let kubernetes = table("kubernetes")?;
    assert_eq!(kubernetes["shm_size_mib"].as_integer(), Some(512));
    assert_eq!(kubernetes["namespace"].as_str(), Some("chris-jobs"));
    assert_eq!(kubernetes["pvc_name"].as_str(), Some("storebase-claim"));
    assert_eq!(
        kubernetes["node_selector"]["gpu"].as_str(),
        Some("a100"),
        "{stdout}"
    );
    let secrets: Vec<&str> = kubernetes["image_pull_secrets"]
        .as_array()
        .context("image_pull_secrets")?
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();
    assert_eq!(secrets, ["regcred", "other"]);

    // A malformed pfcon list is refused, naming the variable.
    let output = command(&dir)
        .args(["--backend", "kubernetes", "--print-config"])
        .env("NODE_SELECTOR", "gpu")
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("NODE_SELECTOR"));
    Ok(())
}

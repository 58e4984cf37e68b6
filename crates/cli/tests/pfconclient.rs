//! CUBE's own client, python-pfconclient 4.0.0 from PyPI, unmodified, drives a full
//! zipfile-mode cycle against `dispatch up --pfcon-listen` with a real Docker site
//! (`tests/pfconclient/zipfile_cycle.py`). The client is installed by
//! `scripts/setup-pfconclient.sh`, which the test command runs; without it this test fails.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_testkit::images::{Engine, ensure_test_image};
use dispatch_testkit::{ServiceBinary, TestDir};

const DISPATCH: &str = env!("CARGO_BIN_EXE_dispatch");
const PASSWORD: &str = "cube-compute-password";

/// The address a service logged as `<what> address=<addr>`.
fn logged_address(log: &str, what: &str) -> Option<String> {
    log.lines()
        .filter(|line| line.contains(what))
        .find_map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("address="))
                .map(str::to_owned)
        })
}

/// What a cycle script is given besides its own mode.
struct Context {
    api: String,
    image: String,
    storebase: std::path::PathBuf,
    work: std::path::PathBuf,
}

/// Runs `dispatch up` with pfcon's API in `mode` on Docker, waits for its site, runs the
/// client's cycle `script` with the arguments `args` makes, then stops the hub.
fn cycle(mode: &str, script: &str, args: impl FnOnce(&Context) -> Vec<String>) -> Result<()> {
    let python = std::env::var("DISPATCH_TEST_PFCONCLIENT_PYTHON").context(
        "DISPATCH_TEST_PFCONCLIENT_PYTHON is not set: run `eval \"$(scripts/setup-pfconclient.sh)\"` (scripts/test.sh does)",
    )?;
    let image = ensure_test_image(Engine::Docker)?;
    let dir = TestDir::new(&format!("pfconclient-{mode}"))?;
    let mut up = Command::new(DISPATCH);
    up.env("PFCON_PASSWORD", PASSWORD)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
            "--pfcon-listen",
            "127.0.0.1:0",
            "--pfcon-storage",
            mode,
            "--backend",
            "docker",
            "--data-dir",
        ])
        .arg(dir.join("hub"));
    let mut hub = ServiceBinary::spawn(up, "pfcon API serving", dir.join("up.log"))?;

    // CUBE registers a compute resource once the hub is up; wait for its site as an
    // operator would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let coordinator = loop {
        if let Some(address) = logged_address(&hub.log(), "coordinator serving") {
            break format!("http://{address}");
        }
        if Instant::now() > deadline {
            bail!("the coordinator never said where it serves: {}", hub.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    loop {
        let sites = Command::new(DISPATCH)
            .args(["--coordinator", &coordinator, "sites", "--json"])
            .output()?;
        let sites: serde_json::Value = serde_json::from_slice(&sites.stdout).unwrap_or_default();
        let connected = sites.as_array().is_some_and(|all| {
            all.iter()
                .any(|s| s["name"] == "local" && s["health"] == "connected")
        });
        if connected {
            break;
        }
        if Instant::now() > deadline {
            bail!("the site never connected: {sites}\n{}", hub.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let context = Context {
        api: format!("{}/api/v1/", hub.uri),
        image,
        storebase: dir.join("hub/hub/store"),
        work: dir.join("client"),
    };
    std::fs::create_dir_all(&context.work)?;
    let script = format!(
        "{}/../../tests/pfconclient/{script}",
        env!("CARGO_MANIFEST_DIR")
    );
    let output = Command::new(&python)
        .arg(script)
        .args(args(&context))
        .output()?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "pfconclient's {mode} cycle failed:\n{printed}\nhub log:\n{}",
        hub.log()
    );
    let summary: serde_json::Value = serde_json::from_str(
        printed
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the script printed no summary")?,
    )?;
    assert_eq!(summary["status"], "finishedSuccessfully", "{summary}");
    assert!(hub.terminate()?, "dispatch up exits 0: {}", hub.log());
    Ok(())
}

fn text(path: &std::path::Path) -> String {
    path.display().to_string()
}

#[test]
fn python_pfconclient_runs_a_zipfile_cycle_against_dispatch_up_on_docker() -> Result<()> {
    cycle("zipfile", "zipfile_cycle.py", |c| {
        vec![
            c.api.clone(),
            "pfcon".into(),
            PASSWORD.into(),
            c.image.clone(),
            text(&c.work),
        ]
    })
}

#[test]
fn python_pfconclient_runs_an_fslink_cycle_with_chris_links_on_docker() -> Result<()> {
    cycle("fslink", "innetwork_cycle.py", |c| {
        vec![
            "fslink".into(),
            c.api.clone(),
            "pfcon".into(),
            PASSWORD.into(),
            c.image.clone(),
            text(&c.storebase),
            text(&c.work),
        ]
    })
}

#[test]
fn python_pfconclient_runs_a_filesystem_cycle_on_docker() -> Result<()> {
    cycle("filesystem", "innetwork_cycle.py", |c| {
        vec![
            "filesystem".into(),
            c.api.clone(),
            "pfcon".into(),
            PASSWORD.into(),
            c.image.clone(),
            text(&c.storebase),
            text(&c.work),
        ]
    })
}

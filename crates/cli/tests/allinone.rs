//! The all-in-one commands as a newcomer runs them: `dispatch demo` on Docker and on
//! local processes, and `dispatch up` with a second site joined by `dispatch site join`,
//! each the real binary on loopback.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dispatch_manager::backend::labels;
use dispatch_testkit::engine_cli;
use dispatch_testkit::images::{Engine, plugin_host_path};
use dispatch_testkit::{ServiceBinary, TestDir};

const DISPATCH: &str = env!("CARGO_BIN_EXE_dispatch");

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Removes the demo jobs' containers when a test ends: the demo keeps its job (and so its
/// container, for `dispatch logs`) as a user would want, but a test leaves nothing.
#[derive(Default)]
struct DemoContainers(Vec<String>);

impl Drop for DemoContainers {
    fn drop(&mut self) {
        for job_id in &self.0 {
            let found =
                engine_cli::labelled_containers(Engine::Docker, &[(labels::JOB_ID, job_id)]);
            for line in found.unwrap_or_default() {
                if let Some(id) = line.split(' ').next() {
                    let _ = engine_cli::run(Engine::Docker, &["rm", "-f", id]);
                }
            }
        }
    }
}

/// Runs the demo in `data_dir` and checks what it prints and the outputs it leaves; returns
/// the id of the job it ran.
fn demo(data_dir: &Path, backend: &str) -> Result<String> {
    let output = Command::new(DISPATCH)
        .args(["demo", "--backend", backend, "--data-dir"])
        .arg(data_dir)
        .output()?;
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("backend         {backend}")),
        "{printed}"
    );
    // States as they happen, then the log lines of the plugin, then the outputs.
    let states: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .filter(|w| {
            [
                "queued",
                "staging-in",
                "running",
                "staging-out",
                "succeeded",
            ]
            .contains(w)
        })
        .collect();
    assert_eq!(
        states,
        [
            "queued",
            "staging-in",
            "running",
            "staging-out",
            "succeeded"
        ],
        "{printed}"
    );
    assert!(
        printed.contains("  |   reports/mri-brain-001.txt: 3 lines, 13 words, 105 bytes"),
        "the plugin's log is shown live: {printed}"
    );
    let outputs = printed
        .lines()
        .find_map(|l| {
            l.split_once(") in ")
                .map(|(_, path)| path.trim().to_owned())
        })
        .context("the demo says where the outputs are")?;
    let outputs = Path::new(&outputs);
    assert!(outputs.starts_with(data_dir), "{}", outputs.display());
    assert_eq!(
        std::fs::read_to_string(outputs.join("summary.txt"))?,
        "files 4\nlines 10\nwords 50\nbytes 351\n"
    );
    assert_eq!(
        std::fs::read_to_string(outputs.join("notes/clinic.txt.counts.txt"))?,
        "lines 2\nwords 9\nbytes 60\n"
    );
    let job_id = printed
        .lines()
        .find_map(|l| l.strip_prefix("[+] submitted job "))
        .and_then(|rest| rest.split(';').next())
        .context("the demo names its job")?;
    Ok(job_id.to_owned())
}

#[test]
fn the_demo_runs_end_to_end_on_docker_with_an_image_it_builds() -> Result<()> {
    let dir = TestDir::new("demo-docker")?;
    let mut containers = DemoContainers::default();
    containers.0.push(demo(&dir.join("demo"), "docker")?);
    // A second run in the same directory starts afresh and reuses the image.
    containers.0.push(demo(&dir.join("demo"), "docker")?);
    Ok(())
}

#[test]
fn the_demo_runs_end_to_end_on_local_processes() -> Result<()> {
    let dir = TestDir::new("demo-local")?;
    demo(&dir.join("demo"), "local").map(drop)
}

/// Runs `dispatch` against the hub at `uri`.
fn dispatch(uri: &str, args: &[&str]) -> Result<Output> {
    Ok(Command::new(DISPATCH)
        .args(args)
        .env("DISPATCH_COORDINATOR", uri)
        .env_remove("DISPATCH_TOKEN")
        .output()?)
}

fn succeed(uri: &str, args: &[&str]) -> Result<String> {
    let output = dispatch(uri, args)?;
    if !output.status.success() {
        bail!("dispatch {args:?} failed: {}", text(&output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn up_runs_a_hub_and_site_and_a_second_site_joins_and_gets_its_jobs() -> Result<()> {
    let dir = TestDir::new("up")?;
    let mut up = Command::new(DISPATCH);
    up.args([
        "up",
        "--listen",
        "127.0.0.1:0",
        "--broker-listen",
        "127.0.0.1:0",
        "--backend",
        "local",
        "--data-dir",
    ])
    .arg(dir.join("hub"));
    let mut hub = ServiceBinary::spawn(up, "coordinator serving", dir.join("up.log"))?;
    let uri = hub.uri.clone();

    let token = succeed(&uri, &["site", "token", "create", "--name", "remote"])?;
    std::fs::write(dir.join("remote.token"), token.trim())?;
    let mut join = Command::new(DISPATCH);
    join.env("DISPATCH_COORDINATOR", &uri)
        .args([
            "site",
            "join",
            "--name",
            "remote",
            "--backend",
            "local",
            "--label",
            "zone=remote",
            "--token-file",
        ])
        .arg(dir.join("remote.token"))
        .arg("--data-dir")
        .arg(dir.join("remote"));
    let mut remote = ServiceBinary::spawn(join, "broker serving", dir.join("join.log"))?;

    // Both sites connect.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sites: serde_json::Value = serde_json::from_str(&succeed(&uri, &["sites", "--json"])?)?;
        let connected = sites
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|s| s["health"] == "connected")
                    .filter_map(|s| s["name"].as_str())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if connected.contains(&"local") && connected.contains(&"remote") {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "sites did not connect: {sites}\nup: {}\njoin: {}",
                hub.log(),
                remote.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // A job that asks for the remote site's label runs there, inputs in, outputs out.
    let inputs = dir.join("inputs");
    std::fs::create_dir_all(inputs.join("sub"))?;
    std::fs::write(inputs.join("a.txt"), "alpha\n")?;
    std::fs::write(inputs.join("sub/b.txt"), "beta\n")?;
    let script = plugin_host_path("copy.sh")?;
    let script = script.display().to_string();
    let input_dir = inputs.display().to_string();
    let submitted = succeed(
        &uri,
        &[
            "submit",
            "--job-id",
            "to-remote",
            "--image",
            "local/none:0",
            "--site-label",
            "zone=remote",
            "--input-dir",
            &input_dir,
            "--cpu",
            "100",
            "--memory",
            "64",
            "--wait",
            "--",
            "/bin/sh",
            &script,
        ],
    )?;
    assert!(submitted.contains("succeeded"), "{submitted}");
    assert!(
        dir.join("remote/site/store/key-to-remote/incoming/sub/b.txt")
            .exists(),
        "the job ran at the remote site"
    );
    assert!(!dir.join("hub/site/store/key-to-remote").exists());
    let status: serde_json::Value =
        serde_json::from_str(&succeed(&uri, &["status", "to-remote", "--json"])?)?;
    assert_eq!(status["state"], "succeeded", "{status}");

    let fetched = dir.join("fetched");
    let fetched_arg = fetched.display().to_string();
    succeed(&uri, &["outputs", "to-remote", &fetched_arg])?;
    assert_eq!(std::fs::read_to_string(fetched.join("a.txt"))?, "alpha\n");
    assert_eq!(
        std::fs::read_to_string(fetched.join("sub/b.txt"))?,
        "beta\n"
    );

    // Both stop cleanly on SIGTERM, as Ctrl-C would stop them.
    assert!(remote.terminate()?, "site join exits 0: {}", remote.log());
    assert!(hub.terminate()?, "up exits 0: {}", hub.log());
    Ok(())
}

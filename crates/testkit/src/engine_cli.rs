//! The container engine's own account of what a backend made, read through its CLI
//! (`docker`, `podman`): what the conformance harnesses check a backend against,
//! independently of the backend's code.

use anyhow::{Context, Result, ensure};

use crate::conformance::ObservedLimits;
use crate::images::Engine;

/// Runs the engine's CLI and returns what it printed; a failure carries its stderr.
pub fn run(engine: Engine, args: &[&str]) -> Result<String> {
    let out = engine
        .command()
        .args(args)
        .output()
        .with_context(|| format!("cannot run the {} CLI", engine.program()))?;
    ensure!(
        out.status.success(),
        "{} {args:?}: {}",
        engine.program(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The containers, running or not, that carry every one of `labels` (`key=value`), one
/// `id name status` line each.
pub fn labelled_containers(engine: Engine, labels: &[(&str, &str)]) -> Result<Vec<String>> {
    let mut args = vec!["ps".to_owned(), "-a".into()];
    for (key, value) in labels {
        args.push("--filter".into());
        args.push(format!("label={key}={value}"));
    }
    args.push("--format".into());
    args.push("{{.ID}} {{.Names}} {{.Status}}".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(run(engine, &args)?.lines().map(str::to_owned).collect())
}

/// The CPU and memory limits the engine holds for the first of `containers` (lines as
/// [`labelled_containers`] gives them).
pub fn container_limits(engine: Engine, containers: &[String]) -> Result<ObservedLimits> {
    let id = containers
        .first()
        .and_then(|line| line.split(' ').next())
        .context("no container for the job")?;
    let out = run(
        engine,
        &[
            "inspect",
            "--format",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            id,
        ],
    )?;
    let mut parts = out.split_whitespace();
    let nano: u64 = parts.next().context("no NanoCpus")?.parse()?;
    let memory: u64 = parts.next().context("no Memory")?.parse()?;
    Ok(ObservedLimits {
        cpu_millicores: u32::try_from(nano / 1_000_000)?,
        memory_mib: memory >> 20,
    })
}

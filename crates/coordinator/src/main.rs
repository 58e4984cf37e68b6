//! `dispatch-coordinator`: the hub's job store and client API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

use dispatch_coordinator::{CoordinatorConfig, server};

/// The ChRIS Dispatch coordinator: accepts jobs, keeps them durably, and serves their state.
///
/// Settings come from defaults, then `--config`, then DISPATCH_COORDINATOR_* variables,
/// then pfcon's variables for its REST API (PFCON_USER, PFCON_PASSWORD, SECRET_KEY,
/// PFCON_INNETWORK, STORAGE_ENV, STOREBASE_MOUNT, CONTAINER_ENV, COMPUTE_VOLUME_TYPE,
/// VOLUME_NAME, JOB_LOGS_TAIL, REMOVE_JOBS; PFCON_LEGACY_API for pfcon 5's `jobs/` API),
/// then flags.
#[derive(Parser)]
#[command(name = "dispatch-coordinator", version)]
struct Cli {
    /// TOML configuration file (keys as in `--print-config`).
    #[arg(long, env = "DISPATCH_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the gRPC API [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<String>,
    /// Where the coordinator keeps its database and key [default: /var/lib/dispatch-coordinator].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// postgres://... to keep jobs in PostgreSQL [default: SQLite in the data dir].
    #[arg(long)]
    database_url: Option<String>,
    /// File holding the token API clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve the API without a token (a private coordinator on loopback).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Serve pfcon's REST API for CUBE on this address, e.g. 0.0.0.0:5005 (pfcon.listen).
    #[arg(long)]
    pfcon_listen: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// Print the configuration that would be used (database password hidden), then exit.
    #[arg(long)]
    print_config: bool,
}

fn text(value: &str) -> toml::Value {
    toml::Value::String(value.to_owned())
}

fn path(value: &std::path::Path) -> toml::Value {
    text(&value.display().to_string())
}

fn flags(cli: &Cli) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    let mut set = |key: &str, value: Option<toml::Value>| {
        if let Some(value) = value {
            out.push((key.to_owned(), value));
        }
    };
    set("listen", cli.listen.as_deref().map(text));
    set("data_dir", cli.data_dir.as_deref().map(path));
    set("database_url", cli.database_url.as_deref().map(text));
    set("token_file", cli.token_file.as_deref().map(path));
    set(
        "insecure_no_auth",
        cli.insecure_no_auth.then_some(toml::Value::Boolean(true)),
    );
    set("pfcon.listen", cli.pfcon_listen.as_deref().map(text));
    set("log_json", cli.json.then_some(toml::Value::Boolean(true)));
    out
}

/// pfcon's settings under pfcon's names, for a coordinator deployed where pfcon was.
fn pfcon_settings(env: &BTreeMap<String, String>) -> anyhow::Result<Vec<(String, toml::Value)>> {
    let flag = |name: &str, value: &str| -> anyhow::Result<bool> {
        match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            other => anyhow::bail!("{name}: `{other}` is neither true nor false"),
        }
    };
    let mut out = Vec::new();
    for (name, key) in [
        ("PFCON_USER", "pfcon.user"),
        ("PFCON_PASSWORD", "pfcon.password"),
        ("SECRET_KEY", "pfcon.secret_key"),
        ("STORAGE_ENV", "pfcon.storage_env"),
        ("STOREBASE_MOUNT", "pfcon.storebase"),
        ("CONTAINER_ENV", "pfcon.container_env"),
        ("COMPUTE_VOLUME_TYPE", "pfcon.compute_volume_type"),
        ("VOLUME_NAME", "pfcon.volume_name"),
    ] {
        if let Some(value) = env.get(name) {
            out.push((key.to_owned(), text(value)));
        }
    }
    for (name, key) in [
        ("PFCON_INNETWORK", "pfcon.innetwork"),
        ("REMOVE_JOBS", "pfcon.remove_jobs"),
        ("PFCON_LEGACY_API", "pfcon.legacy_api"),
    ] {
        if let Some(value) = env.get(name) {
            out.push((key.to_owned(), toml::Value::Boolean(flag(name, value)?)));
        }
    }
    if let Some(tail) = env.get("JOB_LOGS_TAIL") {
        let lines: i64 = tail
            .trim()
            .parse()
            .with_context(|| format!("JOB_LOGS_TAIL: `{tail}` is not a number of lines"))?;
        out.push(("pfcon.job_logs_tail".into(), toml::Value::Integer(lines)));
    }
    Ok(out)
}

fn load(cli: &Cli) -> anyhow::Result<CoordinatorConfig> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut overrides = pfcon_settings(&env)?;
    overrides.extend(flags(cli));
    let layers = dispatch_service::Layers {
        file: cli.config.as_deref(),
        env: &env,
        env_prefix: "DISPATCH_COORDINATOR_",
        env_not_keys: &["CONFIG"],
        overrides: &overrides,
    };
    let config: CoordinatorConfig = dispatch_service::load(&layers)?;
    config.check()?;
    Ok(config)
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config.redacted())?);
        return Ok(());
    }
    dispatch_service::init_tracing(config.log_json, "info");
    server::auth(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another coordinator running there?",
                config.listen
            )
        })?;
    server::run(
        Arc::new(config),
        listener,
        dispatch_service::shutdown_signal(),
    )
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match serve(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

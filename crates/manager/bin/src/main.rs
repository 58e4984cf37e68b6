//! `dispatch-manager`: runs jobs on one compute backend, chosen with `--backend`, and
//! serves the manager's gRPC API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Parser;

use dispatch_manager::{Backend, Manager, ManagerConfig, SiteSession, server};

/// The ChRIS Dispatch container manager: runs jobs on Docker, Podman, Swarm,
/// Kubernetes/OpenShift, Slurm or local processes.
///
/// Settings come from defaults, then `--config`, then pfcon's environment variables
/// (CONTAINER_USER, JOB_LABELS, ENABLE_HOME_WORKAROUND, IGNORE_LIMITS, SHM_SIZE,
/// DOCKER_HOST; for Kubernetes JOB_NAMESPACE, VOLUME_NAME, NODE_SELECTOR,
/// IMAGE_PULL_SECRETS), then DISPATCH_MANAGER_* variables, then flags.
///
/// With --coordinator-uri (or a [hub] table) it also joins a ChRIS Dispatch coordinator:
/// once with --join-token-file, then with the credential it keeps in its state dir.
#[derive(Parser)]
#[command(name = "dispatch-manager", version)]
struct Cli {
    /// Compute backend: docker, podman, swarm, kubernetes, openshift, slurm or local.
    #[arg(long)]
    backend: Option<String>,
    /// TOML configuration file (keys as in `--print-config`).
    #[arg(long, env = "DISPATCH_MANAGER_CONFIG")]
    config: Option<PathBuf>,
    /// TOML file with the slurm backend's settings (the keys of a `[slurm]` table, or a
    /// file holding that table), e.g. partition, account, runtime, job_dir; laid over the
    /// `[slurm]` table of --config.
    #[arg(long, env = "DISPATCH_MANAGER_SLURM_CONFIG")]
    slurm_config: Option<PathBuf>,
    /// Address of the manager's gRPC API [default: 127.0.0.1:7444].
    #[arg(long)]
    listen: Option<String>,
    /// This replica's id; labels everything it creates, so keep it stable.
    #[arg(long)]
    manager_id: Option<String>,
    /// The site's storeBase directory [default: /var/local/storeBase].
    #[arg(long)]
    store_root: Option<PathBuf>,
    /// Where the manager keeps its own records [default: /var/lib/dispatch-manager].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// File holding the token API clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve the API without a token (a private manager on loopback).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Docker engine to use, e.g. unix:///run/podman/podman.sock [default: DOCKER_HOST or
    /// the local socket].
    #[arg(long)]
    docker_host: Option<String>,
    /// The coordinator to join and take work from, e.g. http://hub.example.org:7440
    /// (sets hub.coordinator_uri; without it the manager serves only its own API).
    #[arg(long)]
    coordinator_uri: Option<String>,
    /// File holding the one-time join token for the first start (hub.join_token_file).
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// Print the configuration that would be used, then exit.
    #[arg(long)]
    print_config: bool,
}

fn text(value: &str) -> toml::Value {
    toml::Value::String(value.to_owned())
}

/// A pfcon-style `k=v,k2=v2` list as a table.
fn key_values(name: &str, list: &str) -> anyhow::Result<toml::Table> {
    let mut table = toml::Table::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("{name}: `{pair}` is not key=value"))?;
        table.insert(key.trim().to_owned(), text(value.trim()));
    }
    Ok(table)
}

/// pfcon's settings under pfcon's names, for a manager deployed where pfcon was.
fn pfcon_settings(env: &BTreeMap<String, String>) -> anyhow::Result<Vec<(String, toml::Value)>> {
    let mut out = Vec::new();
    let truthy = |v: &str| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    };
    if let Some(user) = env.get("CONTAINER_USER") {
        out.push(("container_user".into(), text(user)));
    }
    if let Some(labels) = env.get("JOB_LABELS") {
        out.push((
            "job_labels".into(),
            toml::Value::Table(key_values("JOB_LABELS", labels)?),
        ));
    }
    if let Some(flag) = env.get("ENABLE_HOME_WORKAROUND") {
        out.push((
            "enable_home_workaround".into(),
            toml::Value::Boolean(truthy(flag)),
        ));
    }
    if let Some(flag) = env.get("IGNORE_LIMITS") {
        for table in ["docker", "swarm"] {
            out.push((
                format!("{table}.ignore_limits"),
                toml::Value::Boolean(truthy(flag)),
            ));
        }
    }
    if let Some(size) = env.get("SHM_SIZE") {
        let size: i64 = size
            .trim()
            .parse()
            .with_context(|| format!("SHM_SIZE: `{size}` is not a number of MiB"))?;
        for table in ["docker", "kubernetes"] {
            out.push((format!("{table}.shm_size_mib"), toml::Value::Integer(size)));
        }
    }
    // pfcon's Kubernetes settings.
    if let Some(namespace) = env.get("JOB_NAMESPACE") {
        out.push(("kubernetes.namespace".into(), text(namespace.trim())));
    }
    if let Some(volume) = env.get("VOLUME_NAME") {
        out.push(("kubernetes.pvc_name".into(), text(volume.trim())));
    }
    if let Some(selector) = env.get("NODE_SELECTOR") {
        out.push((
            "kubernetes.node_selector".into(),
            toml::Value::Table(key_values("NODE_SELECTOR", selector)?),
        ));
    }
    if let Some(secrets) = env.get("IMAGE_PULL_SECRETS") {
        let names = secrets
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(text)
            .collect();
        out.push((
            "kubernetes.image_pull_secrets".into(),
            toml::Value::Array(names),
        ));
    }
    if let Some(host) = env.get("DOCKER_HOST") {
        out.push(("docker.host".into(), text(host)));
    }
    Ok(out)
}

fn flags(cli: &Cli) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    let mut set = |key: &str, value: Option<toml::Value>| {
        if let Some(value) = value {
            out.push((key.to_owned(), value));
        }
    };
    set("backend", cli.backend.as_deref().map(text));
    set("listen", cli.listen.as_deref().map(text));
    set("manager_id", cli.manager_id.as_deref().map(text));
    set(
        "store_root",
        cli.store_root
            .as_ref()
            .map(|p| text(&p.display().to_string())),
    );
    set(
        "state_dir",
        cli.state_dir
            .as_ref()
            .map(|p| text(&p.display().to_string())),
    );
    set(
        "token_file",
        cli.token_file
            .as_ref()
            .map(|p| text(&p.display().to_string())),
    );
    set("docker.host", cli.docker_host.as_deref().map(text));
    set(
        "hub.coordinator_uri",
        cli.coordinator_uri.as_deref().map(text),
    );
    set(
        "hub.join_token_file",
        cli.join_token_file
            .as_ref()
            .map(|p| text(&p.display().to_string())),
    );
    set(
        "insecure_no_auth",
        cli.insecure_no_auth.then_some(toml::Value::Boolean(true)),
    );
    set("log_json", cli.json.then_some(toml::Value::Boolean(true)));
    out
}

fn load(cli: &Cli) -> anyhow::Result<ManagerConfig> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut overrides = pfcon_settings(&env)?;
    overrides.extend(flags(cli));
    let layers = dispatch_service::Layers {
        file: cli.config.as_deref(),
        env: &env,
        env_prefix: "DISPATCH_MANAGER_",
        env_not_keys: &["CONFIG", "SLURM_CONFIG"],
        overrides: &overrides,
    };
    Ok(dispatch_service::load(&layers)?)
}

/// The backend named in the configuration, connected.
async fn backend(config: &ManagerConfig, slurm: &toml::Table) -> anyhow::Result<Arc<dyn Backend>> {
    match config.backend.as_str() {
        "docker" | "podman" => docker_backend(config).await,
        "local" => local_backend(config).await,
        "slurm" => slurm_backend(config, slurm).await,
        "swarm" => swarm_backend(config).await,
        "kubernetes" | "openshift" => kubernetes_backend(config).await,
        other => bail!(
            "unknown backend `{other}`; use docker, podman, swarm, kubernetes, openshift, slurm or local"
        ),
    }
}

#[cfg(feature = "swarm")]
fn swarm_settings(config: &ManagerConfig) -> anyhow::Result<dispatch_backend_swarm::SwarmConfig> {
    Ok(dispatch_backend_swarm::SwarmConfig::from_table(
        config.swarm.clone(),
    )?)
}

#[cfg(feature = "swarm")]
async fn swarm_backend(config: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let settings = swarm_settings(config).context("[swarm] settings")?;
    let backend =
        dispatch_backend_swarm::SwarmBackend::connect(&config.manager_id, settings).await?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "swarm"))]
async fn swarm_backend(_: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    bail!("this dispatch-manager was built without feature `swarm`")
}

#[cfg(feature = "kubernetes")]
fn kubernetes_settings(
    config: &ManagerConfig,
) -> anyhow::Result<dispatch_backend_kubernetes::KubernetesConfig> {
    let mut table = config.kubernetes.clone();
    if config.backend == "openshift" && !table.contains_key("openshift") {
        table.insert("openshift".into(), toml::Value::Boolean(true));
    }
    let settings = dispatch_backend_kubernetes::KubernetesConfig::from_table(table)?;
    settings.check()?;
    Ok(settings)
}

#[cfg(feature = "kubernetes")]
async fn kubernetes_backend(config: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let settings = kubernetes_settings(config).context("[kubernetes] settings")?;
    let backend = dispatch_backend_kubernetes::KubernetesBackend::connect(
        &config.manager_id,
        &config.store_root,
        settings,
    )
    .await?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "kubernetes"))]
async fn kubernetes_backend(_: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    bail!("this dispatch-manager was built without feature `kubernetes`")
}

/// The slurm backend's settings: the configuration's `[slurm]` table, with the keys of the
/// file `--slurm-config` names laid over it.
fn slurm_table(cli: &Cli, config: &ManagerConfig) -> anyhow::Result<toml::Table> {
    let mut merged = config.slurm.clone();
    let Some(path) = &cli.slurm_config else {
        return Ok(merged);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --slurm-config {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("--slurm-config {} is not TOML", path.display()))?;
    // A file holding a `[slurm]` table, such as a copy of --print-config's, is taken too.
    if table.len() == 1
        && let Some(toml::Value::Table(inner)) = table.remove("slurm")
    {
        table = inner;
    }
    merged.extend(table);
    Ok(merged)
}

#[cfg(feature = "slurm")]
fn slurm_settings(
    config: &ManagerConfig,
    table: &toml::Table,
) -> anyhow::Result<dispatch_backend_slurm::SlurmConfig> {
    let settings = dispatch_backend_slurm::SlurmConfig::from_table(
        table.clone(),
        &config.state_dir.join("slurm"),
    )?;
    settings.check()?;
    Ok(settings)
}

#[cfg(feature = "slurm")]
async fn slurm_backend(
    config: &ManagerConfig,
    table: &toml::Table,
) -> anyhow::Result<Arc<dyn Backend>> {
    let settings = slurm_settings(config, table).context("[slurm] settings")?;
    let backend = dispatch_backend_slurm::SlurmBackend::open(&config.manager_id, settings)?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "slurm"))]
async fn slurm_backend(_: &ManagerConfig, _: &toml::Table) -> anyhow::Result<Arc<dyn Backend>> {
    bail!("this dispatch-manager was built without feature `slurm`")
}

#[cfg(feature = "docker")]
async fn docker_backend(config: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let mut table = config.docker.clone();
    if config.backend == "podman" && !table.contains_key("kind") {
        table.insert("kind".into(), text("podman"));
    }
    let settings: dispatch_backend_docker::DockerConfig = toml::Value::Table(table)
        .try_into()
        .context("configuration of the docker backend")?;
    let backend =
        dispatch_backend_docker::DockerBackend::connect(&config.manager_id, settings).await?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "docker"))]
async fn docker_backend(_: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    bail!("this dispatch-manager was built without feature `docker`")
}

#[cfg(feature = "local")]
async fn local_backend(config: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    let mut table = config.local.clone();
    if !table.contains_key("state_dir") {
        table.insert(
            "state_dir".into(),
            text(&config.state_dir.join("local").display().to_string()),
        );
    }
    let settings: dispatch_backend_local::LocalConfig = toml::Value::Table(table)
        .try_into()
        .context("configuration of the local backend")?;
    tracing::warn!("the local backend runs jobs as plain processes on this host: no isolation");
    let backend = dispatch_backend_local::LocalBackend::open(&config.manager_id, settings)?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "local"))]
async fn local_backend(_: &ManagerConfig) -> anyhow::Result<Arc<dyn Backend>> {
    bail!("this dispatch-manager was built without feature `local`")
}

/// Checks the settings of every backend compiled in, so a misspelt key is reported by
/// `--print-config` too, not only when that backend starts.
fn check_backend_settings(config: &ManagerConfig, slurm: &toml::Table) -> anyhow::Result<()> {
    #[cfg(feature = "docker")]
    {
        let _: dispatch_backend_docker::DockerConfig = toml::Value::Table(config.docker.clone())
            .try_into()
            .context("[docker] settings")?;
    }
    #[cfg(feature = "local")]
    {
        let mut table = config.local.clone();
        table
            .entry("state_dir")
            .or_insert_with(|| text(&config.state_dir.join("local").display().to_string()));
        let _: dispatch_backend_local::LocalConfig = toml::Value::Table(table)
            .try_into()
            .context("[local] settings")?;
    }
    #[cfg(feature = "slurm")]
    slurm_settings(config, slurm).context("[slurm] settings")?;
    #[cfg(feature = "swarm")]
    swarm_settings(config).context("[swarm] settings")?;
    #[cfg(feature = "kubernetes")]
    kubernetes_settings(config).context("[kubernetes] settings")?;
    #[cfg(not(feature = "slurm"))]
    let _ = slurm;
    Ok(())
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    let slurm = slurm_table(&cli, &config)?;
    check_backend_settings(&config, &slurm)?;
    if cli.print_config {
        let mut shown = config.clone();
        // The slurm settings as the backend reads them (defaults filled in, the
        // --slurm-config file laid over), so the output loads back as one file.
        #[cfg(feature = "slurm")]
        if config.backend == "slurm" || !slurm.is_empty() {
            let settings = slurm_settings(&config, &slurm)?;
            shown.slurm = match toml::Value::try_from(settings)? {
                toml::Value::Table(table) => table,
                _ => bail!("the slurm settings do not form a table"),
            };
        }
        print!("{}", toml::to_string_pretty(&shown)?);
        return Ok(());
    }
    dispatch_service::init_tracing(config.log_json, "info");
    server::auth(&config)?;
    let backend = backend(&config, &slurm).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another manager running there?",
                config.listen
            )
        })?;
    let config = Arc::new(config);
    if !config.hub.is_enabled() {
        server::run(
            config,
            backend,
            listener,
            dispatch_service::shutdown_signal(),
        )
        .await?;
        return Ok(());
    }
    // One manager for both faces, so the API and the hub's leases share its per-job locks.
    let manager = Manager::start(&config, backend).await?;
    let session = SiteSession::start(config.clone(), manager.clone()).await?;
    let stop_session = session.shutdown_token();
    let served = server::serve(config, manager, listener, async move {
        dispatch_service::shutdown_signal().await;
        // The session says goodbye while the API drains; jobs keep running.
        stop_session.cancel();
    })
    .await;
    session.shutdown().await;
    served?;
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

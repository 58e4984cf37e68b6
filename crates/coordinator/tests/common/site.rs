//! Real sites for the coordinator's tests: a manager over the local backend (plain `sh`
//! processes) with its site session joined to the coordinator under test, optionally with
//! a site broker in front of its store; and the waits the tests share.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;

use dispatch_backend_local::{LocalBackend, LocalConfig};
use dispatch_coordinator::CoordinatorConfig;
use dispatch_manager::{Manager, ManagerConfig, SiteSession};
use dispatch_proto::v1;
use dispatch_proto::v1::coordinator_client::CoordinatorClient;
use dispatch_testkit::images::{plugin_host_path, plugins_dir};
use dispatch_testkit::{ServiceBinary, TestDir, workspace_binary};

use super::TestDb;

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// A client of the coordinator under test.
pub type Client = CoordinatorClient<tonic::transport::Channel>;

/// A coordinator configuration for site tests: 1 s heartbeats, a site unreachable after
/// 3 s of silence, jobs requeued, and a scheduler that looks at least every 100 ms.
pub fn hub_config(db: &TestDb) -> CoordinatorConfig {
    let mut config = db.config();
    config.sites.heartbeat_seconds = 1;
    config.sites.unreachable_after_heartbeats = 3;
    config.sites.lease_seconds = 10;
    config.sites.status_resend_seconds = 2;
    config.scheduler.interval_millis = 100;
    config.shutdown_grace_seconds = 5;
    config
}

/// Shows the services' logs with a failing test's output (`RUST_LOG` to change).
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// What makes one test site differ from another.
#[derive(Debug, Clone, Default)]
pub struct SiteOptions {
    /// Labels it advertises.
    pub labels: Vec<(&'static str, &'static str)>,
    /// Jobs it runs at once (0: bounded by resources).
    pub max_jobs: u32,
    /// Its site broker (URI, grant file), if it stages.
    pub broker: Option<(String, PathBuf)>,
}

/// `prefix` made unique to this run: the local backend names its cgroups after the
/// manager id (`<name>-manager`) and the job id, so two tests running the same job ids
/// at once (the SQLite and PostgreSQL runs of one test, or two test processes) must not
/// share a site name.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..8])
}

/// A create a join token, and write it where a manager reads it.
pub async fn join_token(client: &mut Client, dir: &TestDir, name: &str) -> Result<PathBuf> {
    let token = client
        .create_join_token(v1::CreateJoinTokenRequest {
            site_name: name.into(),
            ttl_seconds: 0,
            labels: HashMap::new(),
        })
        .await?
        .into_inner();
    let path = dir.join(&format!("{name}.join-token"));
    std::fs::write(&path, format!("{}\n", token.join_token))?;
    Ok(path)
}

/// The settings of a manager that joins `hub_uri` as site `name`.
pub fn manager_config(
    dir: &TestDir,
    name: &str,
    hub_uri: &str,
    token_file: PathBuf,
    options: &SiteOptions,
) -> Result<ManagerConfig> {
    let root = dir.join(name);
    let store_root = root.join("store");
    let state_dir = root.join("state");
    std::fs::create_dir_all(&store_root)?;
    std::fs::create_dir_all(&state_dir)?;
    let mut config = ManagerConfig {
        manager_id: format!("{name}-manager"),
        backend: "local".into(),
        store_root,
        state_dir,
        insecure_no_auth: true,
        shutdown_grace_seconds: 5,
        ..ManagerConfig::default()
    };
    let hub = &mut config.hub;
    hub.coordinator_uri = hub_uri.to_owned();
    hub.join_token_file = Some(token_file);
    hub.site_name = name.to_owned();
    hub.site_labels = options
        .labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    hub.max_concurrent_jobs = options.max_jobs;
    hub.reconnect_initial_millis = 50;
    hub.reconnect_max_seconds = 1;
    hub.job_poll_millis = 50;
    hub.heartbeat_seconds = 1;
    if let Some((uri, grant_file)) = &options.broker {
        hub.site_broker_uri = uri.clone();
        hub.site_broker_grant_file = Some(grant_file.clone());
    }
    Ok(config)
}

/// A manager and its site session, as the manager binary runs them.
pub struct Site {
    /// The manager (to look at what its backend holds).
    pub manager: Arc<Manager>,
    session: SiteSession,
}

impl Site {
    /// Starts the manager over the local backend and its site session.
    pub async fn start(config: &ManagerConfig) -> Result<Self> {
        trace();
        let backend = LocalBackend::open(
            &config.manager_id,
            LocalConfig::new(config.state_dir.join("local")),
        )?;
        let manager = Manager::start(config, Arc::new(backend)).await?;
        let session = SiteSession::start(Arc::new(config.clone()), manager.clone()).await?;
        Ok(Self { manager, session })
    }

    /// Says goodbye and stops, as a manager shutting down does (jobs keep running).
    pub async fn stop(self) {
        self.session.shutdown().await;
    }
}

/// A site in a runtime of its own, so a test can kill it the way a crash or a pulled
/// cable would: no goodbye, no last report, the connection simply gone.
pub struct KillableSite {
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KillableSite {
    /// Starts the site and waits until its manager runs.
    pub fn start(config: &ManagerConfig) -> Result<Self> {
        let config = config.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.into()));
                    return;
                }
            };
            let site = match runtime.block_on(Site::start(&config)) {
                Ok(site) => site,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let _ = killed.recv();
            // Every task of the site is dropped where it stands, its sockets with it; the
            // site itself is dropped only then, when nothing is left to say goodbye.
            runtime.shutdown_background();
            drop(site);
        });
        ready_rx
            .recv_timeout(WAIT)
            .context("the killable site did not start")??;
        Ok(Self {
            kill: Some(kill),
            thread: Some(thread),
        })
    }

    /// Kills the site: its runtime is dropped mid-flight.
    pub fn kill(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the site's thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for KillableSite {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Waits until `pick` finds what it wants among the registered sites.
pub async fn wait_for_site<T>(
    client: &mut Client,
    what: &str,
    pick: impl Fn(&[v1::Site]) -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sites = client
            .list_sites(v1::ListSitesRequest::default())
            .await?
            .into_inner()
            .sites;
        if let Some(found) = pick(&sites) {
            return Ok(found);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}; sites: {sites:#?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the site named `name` has a manager session open; returns its id.
pub async fn wait_connected(client: &mut Client, name: &str) -> Result<String> {
    wait_for_site(client, &format!("site {name} connected"), |sites| {
        sites
            .iter()
            .find(|s| {
                s.name == name
                    && s.health == v1::SiteHealth::Connected as i32
                    && !s.managers.is_empty()
            })
            .map(|s| s.site_id.clone())
    })
    .await
}

/// Waits until the site `site_id` is in `health`.
pub async fn wait_health(client: &mut Client, site_id: &str, health: v1::SiteHealth) -> Result<()> {
    wait_for_site(client, &format!("site {site_id} {health:?}"), |sites| {
        sites
            .iter()
            .any(|s| s.site_id == site_id && s.health == health as i32)
            .then_some(())
    })
    .await
}

/// A job running a test plugin (`crates/testkit/plugins/<plugin>`) with `sh` on the
/// local backend: an FS plugin with no inputs unless the test adds some.
pub fn plugin_job(job_id: &str, plugin: &str, args: &[&str]) -> Result<v1::JobSpec> {
    let script = plugin_host_path(plugin)?;
    Ok(v1::JobSpec {
        job_id: job_id.into(),
        image: "local/ignored-by-the-local-backend:1".into(),
        entrypoint: vec!["/bin/sh".into(), script.display().to_string()],
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        plugin_type: v1::PluginType::Fs.into(),
        cpu_millicores: 100,
        memory_mib: 64,
        workers: 1,
        storage_mode: v1::StorageMode::Zipfile.into(),
        ..v1::JobSpec::default()
    })
}

/// Submits a job.
pub async fn submit(client: &mut Client, spec: v1::JobSpec) -> Result<v1::Job> {
    client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            upload: None,
            retry_if_failed: false,
        })
        .await?
        .into_inner()
        .job
        .context("no job in the answer")
}

/// Follows the events of `job_id` from the start of the log until `done` says so.
pub async fn watch_until(
    client: &mut Client,
    job_id: &str,
    done: impl Fn(&[v1::JobEvent]) -> bool,
) -> Result<Vec<v1::JobEvent>> {
    let mut stream = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(0),
            job_ids: vec![job_id.into()],
            ..v1::WatchJobsRequest::default()
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(event)) => seen.push(event?),
            Ok(None) => bail!("the watch ended; events: {seen:#?}"),
            Err(_) => bail!("timed out watching {job_id}; events: {seen:#?}"),
        }
    }
    Ok(seen)
}

/// True once an event of `events` ends the job.
pub fn ended(events: &[v1::JobEvent]) -> bool {
    events.iter().any(|e| e.state().is_terminal())
}

/// The states of `events`, in order.
pub fn states(events: &[v1::JobEvent]) -> Vec<v1::JobState> {
    events.iter().map(v1::JobEvent::state).collect()
}

/// A job running the `record.sh` test plugin: it appends `start <job_id>` to `log`,
/// sleeps `seconds`, writes its id to `record.txt` in its output dir, and appends
/// `end <job_id>`, so a test can count each job's runs ([`recorded_runs`]).
pub fn recorded_job(job_id: &str, log: &Path, seconds: &str) -> Result<v1::JobSpec> {
    // Not in testkit's image list (the container backends never run it): taken from the
    // plugins directory directly.
    let script = plugins_dir().join("record.sh");
    let mut spec = plugin_job(job_id, "exit.sh", &[])?;
    spec.entrypoint = vec!["/bin/sh".into(), script.display().to_string()];
    spec.args = vec![
        "--log".into(),
        log.display().to_string(),
        "--name".into(),
        job_id.into(),
        "--seconds".into(),
        seconds.into(),
    ];
    Ok(spec)
}

/// How many times each job recorded in `log` started and ended.
pub fn recorded_runs(log: &Path) -> Result<BTreeMap<String, (u32, u32)>> {
    let text = match std::fs::read_to_string(log) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error.into()),
    };
    let mut runs: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        let (Some(what), Some(name)) = (words.next(), words.next()) else {
            bail!("a torn line in {}: {line:?}", log.display());
        };
        let counts = runs.entry(name.to_owned()).or_default();
        match what {
            "start" => counts.0 += 1,
            "end" => counts.1 += 1,
            _ => bail!("an unknown line in {}: {line:?}", log.display()),
        }
    }
    Ok(runs)
}

/// Starts the real `dispatch-manager` binary with `config` (written to a file beside its
/// state) on a port-0 API, its log in `log`.
pub fn manager_binary(config: &ManagerConfig, log: PathBuf) -> Result<ServiceBinary> {
    let file = config.state_dir.join("manager.toml");
    std::fs::write(&file, toml::to_string(config)?)?;
    let mut command = std::process::Command::new(workspace_binary("dispatch-manager")?);
    command
        .env_remove("DISPATCH_MANAGER_CONFIG")
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0"]);
    ServiceBinary::spawn(command, "manager serving", log)
}

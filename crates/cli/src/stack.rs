//! The services `dispatch up`, `dispatch demo` and `dispatch site join` run in this
//! process: a hub (coordinator and hub broker) and a site (site broker and a manager
//! joined to a hub), with their files under one data directory.
//!
//! The pieces are the same libraries the separate binaries serve, started with settings
//! chosen here so that a newcomer has nothing to write: keys and grants are made on first
//! start and kept in the data directory, the site joins with a token the hub creates for
//! it, and the backend is Docker when an engine answers, else local processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use dispatch_broker::config::BrokerConfig;
use dispatch_broker::grant::GrantKey;
use dispatch_coordinator::CoordinatorConfig;
use dispatch_manager::{Backend, Manager, ManagerConfig, SiteSession};
use dispatch_proto::v1 as pb;

/// How long the site broker's grant for its own manager lasts; it is minted afresh at
/// every start, so this only has to outlive one run.
const SITE_GRANT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long services get to finish their calls when stopping.
const GRACE_SECONDS: u64 = 5;

/// Which compute backend the site runs jobs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Docker if an engine answers (DOCKER_HOST or the local socket), else local.
    Auto,
    /// Containers on a Docker (or Podman) engine.
    Docker,
    /// Plain processes on this host, without isolation.
    Local,
}

/// The backend a site ended up with, and why.
pub struct ChosenBackend {
    /// `docker` or `local`.
    pub kind: &'static str,
    /// One sentence for the user.
    pub why: String,
    backend: Arc<dyn Backend>,
}

/// Connects the backend `choice` names; with `Auto`, Docker when its engine answers.
pub async fn choose_backend(
    choice: BackendChoice,
    manager_id: &str,
    state_dir: &Path,
) -> Result<ChosenBackend> {
    let docker = || async {
        dispatch_backend_docker::DockerBackend::connect(
            manager_id,
            dispatch_backend_docker::DockerConfig::default(),
        )
        .await
    };
    let local = || -> Result<Arc<dyn Backend>> {
        let config = dispatch_backend_local::LocalConfig::new(state_dir.join("local"));
        Ok(Arc::new(dispatch_backend_local::LocalBackend::open(
            manager_id, config,
        )?))
    };
    match choice {
        BackendChoice::Docker => Ok(ChosenBackend {
            kind: "docker",
            why: "asked for".into(),
            backend: Arc::new(docker().await?),
        }),
        BackendChoice::Local => Ok(ChosenBackend {
            kind: "local",
            why: "asked for; jobs run as plain processes, without isolation".into(),
            backend: local()?,
        }),
        BackendChoice::Auto => match docker().await {
            Ok(backend) => Ok(ChosenBackend {
                kind: "docker",
                why: "a Docker engine answered".into(),
                backend: Arc::new(backend),
            }),
            Err(error) => Ok(ChosenBackend {
                kind: "local",
                why: format!(
                    "no Docker engine answered ({error}); jobs run as plain processes, without isolation"
                ),
                backend: local()?,
            }),
        },
    }
}

/// Where the hub listens and how sites and clients reach it.
pub struct HubOptions {
    /// The data directory (the hub's files go in `hub/`).
    pub data_dir: PathBuf,
    /// The coordinator's gRPC address.
    pub listen: SocketAddr,
    /// The hub broker's address.
    pub broker_listen: SocketAddr,
    /// The host name sites and clients dial; default: the listen address's IP.
    pub advertise: Option<String>,
    /// pfcon's REST API for CUBE, if wanted.
    pub pfcon: Option<PfconOptions>,
}

/// pfcon's REST API on the hub: where, and the one login CUBE uses.
pub struct PfconOptions {
    /// Its address.
    pub listen: SocketAddr,
    /// The user CUBE logs in as.
    pub user: String,
    /// Its password; `None`: one made up on first start and kept in the data directory.
    pub password: Option<String>,
    /// pfcon's storage mode: `zipfile`, or `fslink` or `filesystem` (in-network: CUBE
    /// shares the hub's store).
    pub storage: String,
}

/// A running hub: the coordinator and the hub broker.
pub struct Hub {
    /// The coordinator as clients and sites dial it.
    pub coordinator_uri: String,
    /// The hub broker as clients and sites dial it.
    pub broker_uri: String,
    /// The hub broker's store.
    pub store_root: PathBuf,
    /// The token clients present, when the hub listens beyond loopback.
    pub client_token: Option<String>,
    /// Where the client token is kept.
    pub client_token_file: Option<PathBuf>,
    /// pfcon's API base URL (`http://host:port/api/v1/`) and where its password is kept.
    pub pfcon: Option<(String, PathBuf)>,
    services: Services,
}

impl Hub {
    /// Starts the hub broker and the coordinator; both listen before this returns.
    pub async fn start(options: &HubOptions, stop: &CancellationToken) -> Result<Self> {
        let root = options.data_dir.join("hub");
        let keys = root.join("keys");
        create_private_dir(&keys)?;
        let broker_key = ensure_secret(&keys.join("hub-broker.key"))?;
        let broker_listener = bind(options.broker_listen, "the hub broker").await?;
        let coordinator_listener = bind(options.listen, "the coordinator").await?;
        let host = |address: SocketAddr| {
            let host = options
                .advertise
                .clone()
                .unwrap_or_else(|| address.ip().to_string());
            format!("http://{}:{}", bracket(&host), address.port())
        };
        let broker_uri = host(broker_listener.local_addr()?);
        let coordinator_uri = host(coordinator_listener.local_addr()?);

        let mut services = Services::new(stop.clone());
        let broker = BrokerConfig {
            store_root: root.join("store"),
            grant_key_file: Some(broker_key.clone()),
            shutdown_grace_seconds: GRACE_SECONDS,
            ..BrokerConfig::default()
        };
        std::fs::create_dir_all(&broker.store_root)
            .with_context(|| format!("cannot create {}", broker.store_root.display()))?;
        broker.validate()?;
        services.spawn("hub broker", broker_listener, move |listener, stopped| {
            Box::pin(async move {
                dispatch_broker::server::run(Arc::new(broker), listener, stopped).await?;
                Ok(())
            })
        });

        let loopback = coordinator_listener.local_addr()?.ip().is_loopback();
        let (client_token, client_token_file) = if loopback {
            (None, None)
        } else {
            let file = keys.join("client.token");
            ensure_secret(&file)?;
            let token = std::fs::read_to_string(&file)?.trim().to_owned();
            (Some(token), Some(file))
        };
        let mut config = CoordinatorConfig {
            data_dir: root.join("coordinator"),
            insecure_no_auth: loopback,
            token_file: client_token_file.clone(),
            shutdown_grace_seconds: GRACE_SECONDS,
            ..CoordinatorConfig::default()
        };
        config.hub_broker.uri = broker_uri.clone();
        config.hub_broker.grant_key_file = Some(broker_key);
        let mut pfcon = None;
        let pfcon_listener = match &options.pfcon {
            Some(face) => {
                let listener = bind(face.listen, "pfcon's API").await?;
                let password_file = keys.join("pfcon.password");
                match &face.password {
                    Some(password) => write_private(&password_file, password)?,
                    None => {
                        ensure_secret(&password_file)?;
                    }
                }
                let secret_file = ensure_secret(&keys.join("pfcon.secret"))?;
                config.pfcon = dispatch_coordinator::pfcon::PfconConfig {
                    listen: Some(listener.local_addr()?),
                    user: face.user.clone(),
                    password: read_secret(&password_file)?,
                    secret_key: read_secret(&secret_file)?,
                    storebase: root.join("store"),
                    innetwork: face.storage != "zipfile",
                    storage_env: face.storage.clone(),
                    ..Default::default()
                };
                pfcon = Some((
                    format!("{}/api/v1/", host(listener.local_addr()?)),
                    password_file,
                ));
                Some(listener)
            }
            None => None,
        };
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        config.check()?;
        services.spawn(
            "coordinator",
            coordinator_listener,
            move |listener, stopped| {
                Box::pin(async move {
                    let config = Arc::new(config);
                    dispatch_coordinator::server::auth(&config)?;
                    let store = dispatch_coordinator::server::open_store(&config).await?;
                    let served = dispatch_coordinator::server::run_with_listeners(
                        config,
                        store.clone(),
                        listener,
                        pfcon_listener,
                        stopped,
                    )
                    .await;
                    store.close().await;
                    served?;
                    Ok(())
                })
            },
        );
        Ok(Self {
            coordinator_uri,
            broker_uri,
            store_root: root.join("store"),
            client_token,
            client_token_file,
            pfcon,
            services,
        })
    }

    /// Stops both services and waits for them.
    pub async fn stop(self) -> Result<()> {
        self.services.stop().await
    }
}

/// Where a site keeps its files and which hub it joins.
pub struct SiteOptions {
    /// The data directory (the site's files go in `site/`).
    pub data_dir: PathBuf,
    /// The site's name at the hub.
    pub name: String,
    /// The coordinator to join.
    pub coordinator_uri: String,
    /// The one-time join token, needed on the first start only.
    pub join_token: Option<String>,
    /// Labels jobs can ask for.
    pub labels: BTreeMap<String, String>,
    /// The compute backend.
    pub backend: BackendChoice,
    /// The site's storeBase; default: `site/store` in the data directory. A site that
    /// shares the hub's store (pfcon's filesystem mode) names the hub's.
    pub store_root: Option<PathBuf>,
}

/// A running site: a site broker and a manager with its session to the hub.
pub struct Site {
    /// The backend it chose.
    pub backend_kind: &'static str,
    /// Why it chose it.
    pub backend_why: String,
    /// The site's storeBase.
    pub store_root: PathBuf,
    session: SiteSession,
    services: Services,
}

impl Site {
    /// The directory a site of this data directory keeps its files in.
    pub fn root(data_dir: &Path) -> PathBuf {
        data_dir.join("site")
    }

    /// True once the site joined a hub (it has a credential and needs no token).
    pub fn has_joined(data_dir: &Path) -> bool {
        Self::root(data_dir)
            .join("state/site-credential.json")
            .exists()
    }

    /// Starts the site broker, the manager and its session to the hub.
    pub async fn start(options: &SiteOptions, stop: &CancellationToken) -> Result<Self> {
        let root = Self::root(&options.data_dir);
        let keys = root.join("keys");
        create_private_dir(&keys)?;
        let store_root = options
            .store_root
            .clone()
            .unwrap_or_else(|| root.join("store"));
        let state_dir = root.join("state");
        for dir in [&store_root, &state_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let key_file = ensure_secret(&keys.join("site-broker.key"))?;
        let key = GrantKey::from_secret(&std::fs::read(&key_file)?)?;
        let grant_file = keys.join("site-broker.grant");
        write_private(
            &grant_file,
            &key.mint_for("dispatch-site-manager", &[], &[""], SITE_GRANT_TTL),
        )?;
        let token_file = keys.join("join.token");
        match &options.join_token {
            Some(token) => write_private(&token_file, token)?,
            None if !Self::has_joined(&options.data_dir) => bail!(
                "site `{}` has not joined a hub yet: give it a join token (`dispatch site token create` on the hub)",
                options.name
            ),
            None => {}
        }

        let mut services = Services::new(stop.clone());
        let broker_listener =
            bind(SocketAddr::from(([127, 0, 0, 1], 0)), "the site broker").await?;
        let broker_uri = format!("http://{}", broker_listener.local_addr()?);
        let broker = BrokerConfig {
            store_root: store_root.clone(),
            grant_key_file: Some(key_file),
            shutdown_grace_seconds: GRACE_SECONDS,
            ..BrokerConfig::default()
        };
        broker.validate()?;
        services.spawn("site broker", broker_listener, move |listener, stopped| {
            Box::pin(async move {
                dispatch_broker::server::run(Arc::new(broker), listener, stopped).await?;
                Ok(())
            })
        });

        // Stable across restarts (it labels the site's containers) and distinct for each
        // data directory, so two `dispatch up` on one engine never take each other's jobs.
        let manager_id = format!(
            "{}-{}",
            options.name,
            &blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex()[..8]
        );
        let chosen = match choose_backend(options.backend, &manager_id, &state_dir).await {
            Ok(chosen) => chosen,
            Err(error) => {
                services.stop().await?;
                return Err(error);
            }
        };
        let mut config = ManagerConfig {
            manager_id,
            backend: chosen.kind.into(),
            store_root: store_root.clone(),
            state_dir,
            insecure_no_auth: true,
            shutdown_grace_seconds: GRACE_SECONDS,
            ..ManagerConfig::default()
        };
        let hub = &mut config.hub;
        hub.coordinator_uri = options.coordinator_uri.clone();
        hub.join_token_file = Some(token_file);
        hub.site_name = options.name.clone();
        hub.site_labels = options.labels.clone();
        hub.site_broker_uri = broker_uri;
        hub.site_broker_grant_file = Some(grant_file);
        let started = async {
            let manager = Manager::start(&config, chosen.backend.clone()).await?;
            anyhow::Ok(SiteSession::start(Arc::new(config), manager).await?)
        };
        let session = match started.await {
            Ok(session) => session,
            Err(error) => {
                services.stop().await?;
                return Err(error);
            }
        };
        Ok(Self {
            backend_kind: chosen.kind,
            backend_why: chosen.why,
            store_root,
            session,
            services,
        })
    }

    /// Says goodbye to the hub (jobs keep running) and stops the site broker.
    pub async fn stop(self) -> Result<()> {
        self.session.shutdown().await;
        self.services.stop().await
    }
}

/// Creates a join token for `name` at the hub and waits until nothing more is needed.
pub async fn create_join_token(
    coordinator_uri: &str,
    token: Option<&str>,
    name: &str,
) -> Result<String> {
    let hub = crate::Hub {
        coordinator: coordinator_uri.to_owned(),
        token: token.map(str::to_owned),
        json: false,
    };
    let mut client = crate::connect_retrying(&hub, Duration::from_secs(30)).await?;
    let answer = client
        .create_join_token(pb::CreateJoinTokenRequest {
            site_name: name.to_owned(),
            ttl_seconds: 0,
            labels: Default::default(),
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    Ok(answer.join_token)
}

type ServiceFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Services running as tasks of this process, stopped together.
struct Services {
    stop: CancellationToken,
    mine: CancellationToken,
    running: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

impl Services {
    fn new(stop: CancellationToken) -> Self {
        let mine = stop.child_token();
        Self {
            stop,
            mine,
            running: Vec::new(),
        }
    }

    /// Runs `serve` on `listener` until these services (or the whole process) stop; a
    /// service that fails stops the whole process.
    fn spawn(
        &mut self,
        name: &'static str,
        listener: TcpListener,
        serve: impl FnOnce(TcpListener, WaitForCancellationFutureOwned) -> ServiceFuture,
    ) {
        let whole = self.stop.clone();
        let future = serve(listener, self.mine.clone().cancelled_owned());
        self.running.push((
            name,
            tokio::spawn(async move {
                let result = future.await;
                if let Err(error) = &result {
                    eprintln!("error: {name} stopped: {error:#}");
                    whole.cancel();
                }
                result
            }),
        ));
    }

    /// Stops every service, newest first, and waits for each.
    async fn stop(mut self) -> Result<()> {
        self.mine.cancel();
        let mut first_error = None;
        while let Some((name, task)) = self.running.pop() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    first_error.get_or_insert(error.context(format!("{name} failed")));
                }
                Err(join) => {
                    first_error.get_or_insert(anyhow::anyhow!("{name} panicked: {join}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| {
        format!(
            "{what} cannot listen on {address}; is another `dispatch up` running? Pick another port"
        )
    })
}

/// `[::1]` for IPv6 literals in URIs, the name unchanged otherwise.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    Ok(())
}

/// Writes `content` to `path`, readable by this user only.
fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(content.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn read_secret(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_owned())
}

/// The file holding a random secret, created on first use.
fn ensure_secret(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        write_private(path, &secret)?;
    }
    Ok(path.to_path_buf())
}

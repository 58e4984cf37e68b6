//! What the coordinator's tests share: a database of their own (an SQLite file in a
//! temporary directory, or a fresh PostgreSQL database beside DISPATCH_TEST_POSTGRES_URL),
//! job specs, and an in-process coordinator on a port-0 listener.

#![allow(dead_code)]

pub mod site;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use sqlx::{AssertSqlSafe, Connection as _, Executor as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use dispatch_coordinator::config::Database;
use dispatch_coordinator::seal::EnvSealer;
use dispatch_coordinator::{CoordinatorConfig, Store, server};
use dispatch_proto::v1;
use dispatch_proto::v1::coordinator_client::CoordinatorClient;
use dispatch_testkit::TestDir;

/// The variable naming the PostgreSQL the tests may create databases in.
pub const POSTGRES_URL_VAR: &str = "DISPATCH_TEST_POSTGRES_URL";

/// A database only this test uses, removed when dropped (kept with RETAIN_TMP=1).
pub struct TestDb {
    /// Holds the SQLite file, the env key and anything else the test writes.
    pub dir: TestDir,
    /// The database.
    pub database: Database,
    postgres: Option<PostgresDb>,
}

struct PostgresDb {
    admin_url: String,
    name: String,
}

impl TestDb {
    /// An SQLite file in a fresh directory.
    pub fn sqlite() -> Result<Self> {
        let dir = TestDir::new("coordinator")?;
        let database = Database::Sqlite(dir.join("data/coordinator.db"));
        Ok(Self {
            dir,
            database,
            postgres: None,
        })
    }

    /// A fresh database in the PostgreSQL named by DISPATCH_TEST_POSTGRES_URL. Fails
    /// (never skips) when the variable is unset: CI must run these.
    pub async fn postgres() -> Result<Self> {
        let Ok(admin_url) = std::env::var(POSTGRES_URL_VAR) else {
            bail!(
                "{POSTGRES_URL_VAR} is not set: run `eval \"$(scripts/setup-postgres.sh)\"` first (scripts/test.sh does); the PostgreSQL tests must not be skipped"
            );
        };
        let name = format!("dispatch_t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url} ({POSTGRES_URL_VAR})"))?;
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url.as_str(), String::new()),
        };
        let (server, _) = base
            .rsplit_once('/')
            .context("the PostgreSQL URL names no database")?;
        let url = format!("{server}/{name}{query}");
        Ok(Self {
            dir: TestDir::new("coordinator-pg")?,
            database: Database::Postgres(url),
            postgres: Some(PostgresDb { admin_url, name }),
        })
    }

    /// The URL a coordinator's `database_url` takes.
    pub fn url(&self) -> String {
        match &self.database {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres(url) => url.clone(),
        }
    }

    /// Opens the store with a key fixed for the test.
    pub async fn open(&self) -> Result<Store> {
        Ok(Store::open(&self.database, EnvSealer::from_key([42; 32])).await?)
    }

    /// A plain connection for looking at rows the way an operator would.
    pub async fn raw(&self) -> Result<sqlx::AnyConnection> {
        sqlx::any::install_default_drivers();
        Ok(sqlx::AnyConnection::connect(&self.url()).await?)
    }

    /// A coordinator configuration over this database, insecure, on port 0.
    pub fn config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: self.dir.join("data"),
            database_url: self.url(),
            insecure_no_auth: true,
            shutdown_grace_seconds: 30,
            ..CoordinatorConfig::default()
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(postgres) = self.postgres.take() else {
            return;
        };
        if !self.dir.is_temporary() {
            eprintln!("RETAIN_TMP: keeping database {}", postgres.name);
            return;
        }
        // Drop runs outside any runtime the test may still be in: its own thread and
        // runtime, so a failing test cleans up too.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&postgres.admin_url).await?;
                admin
                    .execute(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        postgres.name
                    )))
                    .await?;
                admin.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop a test database: {error:#}");
        }
    }
}

/// A valid spec for job `job_id`, which tests change one field at a time.
pub fn spec(job_id: &str) -> v1::JobSpec {
    v1::JobSpec {
        job_id: job_id.into(),
        image: "ghcr.io/fnndsc/pl-dircopy:2.1.1".into(),
        entrypoint: vec!["python3".into(), "/usr/local/bin/dircopy".into()],
        args: vec!["--dir".into(), "home/bob/uploads".into()],
        args_path_flags: vec!["--dir".into()],
        plugin_type: v1::PluginType::Ds.into(),
        env: vec!["CHRIS_USER_TOKEN=tok-secret-value".into(), "EMPTY=".into()],
        cpu_millicores: 1000,
        memory_mib: 300,
        workers: 1,
        auid: "bob".into(),
        storage_mode: v1::StorageMode::Fslink.into(),
        inputs: Some(v1::InputSpec {
            source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
                input_dirs: vec!["home/bob/uploads".into()],
            })),
        }),
        output_dir: format!("home/bob/feeds/{job_id}"),
        labels: HashMap::from([("feed".into(), "7".into())]),
        time_limit_seconds: 3600,
        ..v1::JobSpec::default()
    }
}

/// [`spec`], checked.
pub fn checked(job_id: &str) -> dispatch_proto::JobSpec {
    dispatch_proto::JobSpec::try_from(spec(job_id)).expect("a valid spec")
}

/// A coordinator served in-process on a port-0 listener, over a store the test can drive.
pub struct Running {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// The store the coordinator serves (the test may place jobs through it).
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<dispatch_coordinator::Result<()>>,
}

impl Running {
    /// Opens the store `config` names and serves it.
    pub async fn start(config: CoordinatorConfig) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let uri = format!("http://{}", listener.local_addr()?);
        let store = server::open_store(&config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run_with_store(
            Arc::new(config),
            store.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            uri,
            store,
            stop: Some(stop),
            task,
        })
    }

    /// Opens the store `config` names and serves it, with pfcon's REST API on a port of
    /// its own; returns that API's base URI (`http://127.0.0.1:<port>/api/v1/`) too.
    pub async fn start_with_pfcon(config: CoordinatorConfig) -> Result<(Self, String)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let pfcon = TcpListener::bind("127.0.0.1:0").await?;
        let uri = format!("http://{}", listener.local_addr()?);
        let pfcon_uri = format!("http://{}/api/v1/", pfcon.local_addr()?);
        let store = server::open_store(&config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run_with_listeners(
            Arc::new(config),
            store.clone(),
            listener,
            Some(pfcon),
            async {
                let _ = stopped.await;
            },
        ));
        let running = Self {
            uri,
            store,
            stop: Some(stop),
            task,
        };
        Ok((running, pfcon_uri))
    }

    /// A client of it.
    pub async fn client(&self) -> Result<CoordinatorClient<tonic::transport::Channel>> {
        Ok(CoordinatorClient::connect(self.uri.clone()).await?)
    }

    /// Triggers shutdown, waits for the server to finish, and closes the store.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.task).await?;
        self.store.close().await;
        Ok(served?)
    }
}

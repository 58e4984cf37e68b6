//! Serving the coordinator: the client API (`Coordinator`) and the site API
//! (`SiteRegistry`), with health and reflection, on one bound listener until a shutdown
//! signal; beside them the owned scheduler and site monitor tasks. Then a drain: watch
//! and log streams and site sessions are ended (clients resume from the last sequence
//! they saw, sites reconnect), other calls get the grace period, the tasks stop, and the
//! store is closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use dispatch_proto::v1::coordinator_server::CoordinatorServer;
use dispatch_proto::v1::site_registry_server::SiteRegistryServer;
use dispatch_service::InFlight;

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::hub_broker::HubBroker;
use crate::registry::Registry;
use crate::scheduler::{self, Scheduler};
use crate::seal::EnvSealer;
use crate::service::{Auth, CoordinatorService};
use crate::site_service::SiteRegistryService;
use crate::store::Store;
use crate::tasks::Tasks;

/// Largest gRPC message either way on the site API (reconcile pages, leases).
const MAX_SITE_MESSAGE_BYTES: usize = 16 << 20;

/// Shortest client token accepted: long enough that guessing it is hopeless.
const MIN_TOKEN_CHARS: usize = 16;

/// Checks how clients are admitted and reads the API token, if any.
pub fn auth(config: &CoordinatorConfig) -> Result<Auth> {
    match (&config.token_file, config.insecure_no_auth) {
        (Some(path), _) => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("token_file {}: {e}", path.display())))?;
            let token = token.trim();
            if token.len() < MIN_TOKEN_CHARS {
                return Err(Error::Config(format!(
                    "token_file {}: the token has {} characters; use at least {MIN_TOKEN_CHARS} random ones",
                    path.display(),
                    token.len()
                )));
            }
            Ok(Auth::Token(token.into()))
        }
        (None, true) => Ok(Auth::Open),
        (None, false) => Err(Error::Config(
            "no token_file: give --token-file (a file with a token of 16+ characters), or --insecure-no-auth for a private loopback coordinator".into(),
        )),
    }
}

/// Opens the job store `config` names (creating the database and the env key on first
/// start).
pub async fn open_store(config: &CoordinatorConfig) -> Result<Store> {
    config.check()?;
    let sealer = EnvSealer::load_or_create(&config.env_key_path())?;
    Store::open(&config.database()?, sealer).await
}

/// Serves the coordinator for `config` on `listener` until `shutdown` resolves, then
/// drains for at most `shutdown_grace_seconds`.
pub async fn run(
    config: Arc<CoordinatorConfig>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    auth(&config)?;
    let store = open_store(&config).await?;
    let served = run_with_store(config, store.clone(), listener, shutdown).await;
    store.close().await;
    if served.is_ok() {
        tracing::info!("coordinator stopped");
    }
    served
}

/// Serves the client and site APIs over a store the caller opened and keeps (the
/// all-in-one mode shares it; tests drive jobs through it), with the scheduler and the
/// site monitor running beside them, until `shutdown`.
pub async fn run_with_store(
    config: Arc<CoordinatorConfig>,
    store: Store,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let pfcon = match config.pfcon.listen {
        Some(address) if config.pfcon.is_enabled() => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| Error::Config(format!("pfcon.listen {address}: {e}")))?,
        ),
        _ => None,
    };
    run_with_listeners(config, store, listener, pfcon, shutdown).await
}

/// As [`run_with_store`], with pfcon's REST API on `pfcon_listener` when given (bound by
/// the caller, so tests may use port 0).
pub async fn run_with_listeners(
    config: Arc<CoordinatorConfig>,
    store: Store,
    listener: TcpListener,
    pfcon_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let auth = auth(&config)?;
    config.check()?;
    let hub = HubBroker::from_config(&config.hub_broker)?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Server(e.to_string()))?;
    let database = config.database()?.describe();
    tracing::info!(%address, %database, "coordinator serving");

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health
        .set_serving::<SiteRegistryServer<SiteRegistryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dispatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let in_flight = InFlight::default();
    let stopping = CancellationToken::new();
    let tasks = Tasks::new();
    let wake = scheduler::Handle::new();
    let registry = Registry::start(
        store.clone(),
        config.clone(),
        hub,
        wake.clone(),
        tasks.clone(),
        stopping.child_token(),
    )
    .await?;
    tasks.spawn(
        "scheduler",
        Scheduler::new(
            store.clone(),
            registry.clone(),
            config.clone(),
            wake,
            stopping.child_token(),
        )
        .run(),
    );
    tasks.spawn("site monitor", registry.clone().monitor());
    if let Some(pfcon_listener) = pfcon_listener {
        let service = CoordinatorService::new(
            store.clone(),
            registry.clone(),
            Auth::Open,
            in_flight.clone(),
            stopping.clone(),
        );
        let face = match crate::pfcon::http::Face::new(config.pfcon.clone(), service) {
            Ok(face) => Arc::new(face),
            Err(error) => {
                stopping.cancel();
                tasks.close_and_wait().await;
                return Err(error);
            }
        };
        let stop = stopping.clone();
        tasks.spawn("pfcon API", async move {
            if let Err(error) = crate::pfcon::http::serve(face, pfcon_listener, async move {
                stop.cancelled().await;
            })
            .await
            {
                tracing::error!(%error, "pfcon API stopped");
            }
        });
    }
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(CoordinatorService::new(
            store,
            registry.clone(),
            auth,
            in_flight.clone(),
            stopping.clone(),
        )))
        .add_service(
            SiteRegistryServer::new(SiteRegistryService::new(registry))
                .max_decoding_message_size(MAX_SITE_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_SITE_MESSAGE_BYTES),
        )
        // Without TCP_NODELAY a response's trailers wait on the client's delayed ACK: about
        // 40 ms a call (measured by the load bench).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stopped.await;
            },
        );
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => {
            stopping.cancel();
            tasks.close_and_wait().await;
            return served.map_err(|e| Error::Server(e.to_string()));
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down; watch streams end, other calls get the grace period");
    health
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health
        .set_not_serving::<SiteRegistryServer<SiteRegistryService>>()
        .await;
    let _ = stop_accepting.send(());
    stopping.cancel();
    // Done when the server has closed every connection, or when no call is left: idle
    // client connections must not hold the stop (dispatch_service::drain).
    let drained = async {
        tokio::select! {
            served = &mut serve => served.map_err(|e| Error::Server(e.to_string())),
            () = in_flight.idle() => Ok(()),
        }
    };
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let served = match tokio::time::timeout(grace, drained).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                calls = in_flight.count(),
                "grace period over; exiting with calls in flight"
            );
            Ok(())
        }
    };
    // The scheduler, the monitor and the session tasks saw `stopping`; a round or a
    // report being stored finishes first (each is one short transaction).
    if tokio::time::timeout(grace, tasks.close_and_wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tasks.len(),
            "tasks still running after the grace period"
        );
    }
    served
}

//! Serving the coordinator: gRPC with health and reflection on a bound listener until a
//! shutdown signal, then a drain: watch streams are ended (their clients resume from the
//! last sequence they saw), other calls get the grace period, and the store is closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use dispatch_proto::v1::coordinator_server::CoordinatorServer;
use dispatch_service::InFlight;

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::seal::EnvSealer;
use crate::service::{Auth, CoordinatorService};
use crate::store::Store;

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

/// Serves the client API over a store the caller opened and keeps (the all-in-one mode
/// shares it with the scheduler; tests drive jobs through it), until `shutdown`.
pub async fn run_with_store(
    config: Arc<CoordinatorConfig>,
    store: Store,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let auth = auth(&config)?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Server(e.to_string()))?;
    let database = config.database()?.describe();
    tracing::info!(%address, %database, "coordinator serving");

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dispatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let in_flight = InFlight::default();
    let stopping = CancellationToken::new();
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(CoordinatorService::new(
            store,
            auth,
            in_flight.clone(),
            stopping.clone(),
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => return served.map_err(|e| Error::Server(e.to_string())),
        () = shutdown => {}
    }
    tracing::info!("shutting down; watch streams end, other calls get the grace period");
    health
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
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
    match tokio::time::timeout(Duration::from_secs(config.shutdown_grace_seconds), drained).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(
            calls = in_flight.count(),
            "grace period over; exiting with calls in flight"
        ),
    }
    Ok(())
}

//! Serving the manager: gRPC with health and reflection on a bound listener until a
//! shutdown signal. Jobs keep running when the manager stops; the next start finds them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;

use dispatch_proto::v1::manager_server::ManagerServer;

use dispatch_service::InFlight;

use crate::backend::Backend;
use crate::config::ManagerConfig;
use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::service::{Auth, ManagerService};

/// Checks the configuration and reads the API token, if any.
pub fn auth(config: &ManagerConfig) -> Result<Auth> {
    match (&config.token_file, config.insecure_no_auth) {
        (Some(path), _) => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| Error::Server(format!("token_file {}: {e}", path.display())))?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(Error::Server(format!(
                    "token_file {}: the token has {} characters; use at least 16 random ones",
                    path.display(),
                    token.len()
                )));
            }
            Ok(Auth::Token(token.into()))
        }
        (None, true) => Ok(Auth::Open),
        (None, false) => Err(Error::Server(
            "no token_file: give --token-file (a file with a token of 16+ characters), or --insecure-no-auth for a private loopback manager".into(),
        )),
    }
}

/// Serves the manager for `config` over `backend` on `listener` until `shutdown`
/// resolves, then lets calls in flight finish for at most `shutdown_grace_seconds`.
pub async fn run(
    config: Arc<ManagerConfig>,
    backend: Arc<dyn Backend>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    auth(&config)?;
    let manager = Manager::start(&config, backend).await?;
    serve(config, manager, listener, shutdown).await
}

/// [`run`] over a manager already started, so the site session and the API share one
/// [`Manager`] (its per-job locks and time-limit watches).
pub async fn serve(
    config: Arc<ManagerConfig>,
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let auth = auth(&config)?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Server(e.to_string()))?;
    tracing::info!(%address, manager = %config.manager_id, backend = %config.backend, "manager serving");

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ManagerServer<ManagerService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dispatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let in_flight = InFlight::default();
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ManagerServer::new(ManagerService::new(
            manager,
            auth,
            in_flight.clone(),
        )))
        .serve_with_incoming_shutdown(
            // Set per accepted socket: the builder's tcp_nodelay applies only to listeners
            // tonic binds itself, and without it replies wait on delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stopped.await;
            },
        );
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => return served.map_err(|e| Error::Server(e.to_string())),
        () = shutdown => {}
    }
    tracing::info!("shutting down; jobs keep running and are found again at the next start");
    health
        .set_not_serving::<ManagerServer<ManagerService>>()
        .await;
    let _ = stop_accepting.send(());
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
    tracing::info!("manager stopped");
    Ok(())
}

//! Serving the broker: gRPC with health and reflection on a bound listener, until a
//! shutdown signal, then a drain with a deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use dispatch_proto::v1::broker_server::BrokerServer;

use dispatch_service::InFlight;

use crate::client::MAX_MESSAGE_BYTES;
use crate::config::BrokerConfig;
use crate::error::{Error, Result};
use crate::service::{Auth, BrokerService};
use crate::store::{LocalStore, Store};

/// Serves the broker for `config` on `listener` until `shutdown` resolves; then stops
/// accepting, tells transfers to checkpoint, and waits for them at most
/// `shutdown_grace_seconds`.
pub async fn run(
    config: Arc<BrokerConfig>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let key = config
        .grant_key()
        .map_err(|e| Error::invalid("config", e.to_string()))?;
    let auth = key.map_or(Auth::Open, Auth::Grants);
    let root = config.store_root.clone();
    let store = crate::service::blocking(move || LocalStore::open(&root)).await?;
    let ttl = Duration::from_secs(config.transfer_ttl_hours * 3600);
    match store.discard_stale_transfers(ttl) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed abandoned transfers"),
        Err(error) => tracing::warn!(%error, "could not remove abandoned transfers"),
    }
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("read address of", "listener", e))?;
    tracing::info!(%address, store = %store.root().display(), store_id = store.id(), auth = matches!(auth, Auth::Grants(_)), "broker serving");
    let store: Arc<dyn Store> = Arc::new(store);

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let in_flight = InFlight::default();
    let service = BrokerService::new(
        store,
        auth,
        config.clone(),
        cancel.clone(),
        tasks.clone(),
        in_flight.clone(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<BrokerService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dispatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;

    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            BrokerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
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
    tracing::info!(
        grace_seconds = config.shutdown_grace_seconds,
        "shutting down: checkpointing transfers"
    );
    health
        .set_not_serving::<BrokerServer<BrokerService>>()
        .await;
    cancel.cancel();
    let _ = stop_accepting.send(());
    tasks.close();
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    // Done when every transfer has checkpointed and no call is left, or when the server
    // has closed every connection: idle client connections must not hold the stop
    // (dispatch_service::drain).
    let work_done = async {
        tasks.wait().await;
        in_flight.idle().await;
    };
    let drained = tokio::time::timeout(grace, async {
        tokio::select! {
            served = &mut serve => served,
            () = work_done => Ok(()),
        }
    })
    .await;
    match drained {
        Ok(served) => served.map_err(|e| Error::Server(e.to_string()))?,
        Err(_) => tracing::warn!(
            "grace period over; exiting with work in flight (transfers resume from their last checkpoint)"
        ),
    }
    tracing::info!("broker stopped");
    Ok(())
}

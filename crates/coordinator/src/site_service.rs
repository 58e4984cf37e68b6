//! The site-facing API (`dispatch.v1.SiteRegistry`): registration, the session stream,
//! and heartbeats without a session. The work is the registry's; this module reads each
//! session's messages in order, one task per session, and hands each to the registry.
//! Reading in order is what keeps a site's reports in sequence: report N is stored and
//! acknowledged before report N+1 is looked at.

use std::collections::HashMap;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use dispatch_proto::v1::{self, site_message, site_registry_server};

use crate::error::Error;
use crate::registry::{OpenedSession, Registry};
use crate::store::UnixMicros;

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Jobs held in a reconcile report still being received, at most (pages of 500).
const MAX_RECONCILE_JOBS: usize = 1_000_000;

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct SiteRegistryService {
    registry: Registry,
}

impl SiteRegistryService {
    /// Serves `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

/// One open session, read by its own task.
struct SessionTask {
    registry: Registry,
    site_id: String,
    manager_id: String,
    key: u64,
    connected_at: UnixMicros,
    close: CancellationToken,
    /// Pages of reconcile reports not complete yet, by request id.
    reconciling: HashMap<u64, Vec<v1::BackendJobStatus>>,
}

impl SessionTask {
    async fn run(mut self, mut inbound: Streaming<v1::SiteMessage>) {
        loop {
            let received = tokio::select! {
                received = inbound.message() => received,
                () = self.close.cancelled() => break,
            };
            match received {
                Ok(Some(v1::SiteMessage {
                    message: Some(message),
                })) => {
                    if self.on_message(message).await {
                        break;
                    }
                }
                Ok(Some(v1::SiteMessage { message: None })) => {}
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(site = %self.site_id, manager = %self.manager_id,
                        error = %status.message(), "site session broke off");
                    break;
                }
            }
        }
        let Some((tx, end)) = self.registry.session_closed(&self.site_id, self.key).await else {
            return;
        };
        let end = if self.registry.stopping().is_cancelled() {
            // Not the site's doing: ask it to come back (to this hub once restarted).
            Some(Status::unavailable(
                "the coordinator is shutting down; reconnect",
            ))
        } else {
            end
        };
        if let Some(status) = end {
            let _ = tx.try_send(Err(status));
        }
    }

    /// Handles one message; true when the session should end (a goodbye).
    async fn on_message(&mut self, message: site_message::Message) -> bool {
        use site_message::Message as M;
        self.registry.touch(&self.site_id, self.key);
        let (site, key) = (self.site_id.as_str(), self.key);
        match message {
            M::Hello(_) => {
                tracing::warn!(site = %site, "a second hello on one session; ignoring");
            }
            M::Capacity(capacity) => self.registry.on_capacity(site, key, capacity),
            M::Heartbeat(_) => self.registry.on_heartbeat(site, key),
            M::Status(report) => self.registry.on_status(site, key, report).await,
            M::Logs(data) => self.registry.on_logs(site, key, data),
            M::Reconcile(report) => self.on_reconcile(report).await,
            M::Declined(declined) => self.registry.on_declined(site, key, declined).await,
            M::GrantRequest(request) => self.registry.on_grant_request(site, key, request).await,
            M::Goodbye(goodbye) => {
                self.registry.on_goodbye(site, key, &goodbye.message);
                // The manager waits briefly for the hub to end the stream.
                return true;
            }
        }
        false
    }

    async fn on_reconcile(&mut self, report: v1::ReconcileReport) {
        let pages = self.reconciling.entry(report.request_id).or_default();
        if pages.len() + report.jobs.len() > MAX_RECONCILE_JOBS {
            tracing::warn!(site = %self.site_id, "a reconcile report too large; ignoring it");
            self.reconciling.remove(&report.request_id);
            return;
        }
        pages.extend(report.jobs);
        if !report.complete {
            return;
        }
        let jobs = self
            .reconciling
            .remove(&report.request_id)
            .unwrap_or_default();
        self.registry
            .reconcile(
                &self.site_id,
                self.key,
                &self.manager_id,
                self.connected_at,
                jobs,
            )
            .await;
    }
}

#[tonic::async_trait]
impl site_registry_server::SiteRegistry for SiteRegistryService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(
            self.registry.register(request.into_inner()).await?,
        ))
    }

    type SessionStream = ReceiverStream<Result<v1::HubMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::SiteMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let Some(v1::SiteMessage {
            message: Some(site_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Error::Unauthenticated(
                "the first message of a session must be hello, with the site credential".into(),
            )
            .into());
        };
        let OpenedSession {
            key,
            site_id,
            manager_id,
            connected_at,
            close,
            outbound,
        } = self.registry.open_session(hello).await?;
        let task = SessionTask {
            registry: self.registry.clone(),
            site_id,
            manager_id,
            key,
            connected_at,
            close,
            reconciling: HashMap::new(),
        };
        self.registry
            .tasks()
            .spawn("site session", task.run(inbound));
        Ok(Response::new(ReceiverStream::new(outbound)))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        Ok(Response::new(
            self.registry.heartbeat(request.into_inner()).await?,
        ))
    }
}

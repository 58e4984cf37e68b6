//! A **fake** coordinator: a scripted, in-process `dispatch.v1.SiteRegistry` server that
//! tests drive to exercise a manager's site session ("fake the peer, not the network").
//!
//! It listens on a port-0 loopback listener bound before it serves, trades one join token
//! for a site credential (answering a retry with the same request id with the same site),
//! accepts hellos carrying that credential, records every `SiteMessage` it receives,
//! acknowledges status reports (unless told not to), answers heartbeats, and sends the
//! commands a test asks for to the newest session. It can drop that session on demand to
//! test reconnects, lose a registration's answer, and refuse a revoked site. It keeps no
//! job store and places nothing: the test is the scheduler.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use dispatch_proto::v1::site_registry_server::{SiteRegistry, SiteRegistryServer};
use dispatch_proto::v1::{self as pb, hub_message, site_message};

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeCoordinatorOptions {
    /// The one join token it accepts.
    pub join_token: String,
    /// `SessionConfig.heartbeat_interval_seconds` it hands out.
    pub heartbeat_seconds: u32,
    /// `SessionConfig.status_resend_seconds` it hands out.
    pub status_resend_seconds: u32,
    /// Acknowledge each status report as it arrives.
    pub auto_ack: bool,
    /// Answer the first `Register` with UNAVAILABLE after registering the site, as if the
    /// answer were lost on the way.
    pub lose_first_register_answer: bool,
}

impl Default for FakeCoordinatorOptions {
    fn default() -> Self {
        Self {
            join_token: "fake-join-token-0123456789".into(),
            heartbeat_seconds: 1,
            status_resend_seconds: 30,
            auto_ack: true,
            lose_first_register_answer: false,
        }
    }
}

/// One message a site sent, and on which session (0 for the first accepted one).
#[derive(Debug, Clone)]
pub struct Received {
    /// Index of the session among those accepted.
    pub session: usize,
    /// What was sent.
    pub message: site_message::Message,
}

struct Issued {
    request_id: String,
    site_id: String,
    credential: String,
}

struct Current {
    session: usize,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
    stop_reading: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Inner {
    registrations: Vec<pb::RegisterRequest>,
    issued: Option<Issued>,
    lost_an_answer: bool,
    auto_ack: bool,
    revoked: bool,
    hellos: Vec<pb::SiteHello>,
    refused_hellos: usize,
    current: Option<Current>,
    received: Vec<Received>,
}

struct State {
    options: FakeCoordinatorOptions,
    inner: Mutex<Inner>,
    /// Bumped on every event, so waiters look again.
    changed: watch::Sender<u64>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn session_config(&self) -> pb::SessionConfig {
        pb::SessionConfig {
            heartbeat_interval_seconds: self.options.heartbeat_seconds,
            unreachable_after_seconds: self.options.heartbeat_seconds * 5,
            max_log_chunk_bytes: 64 * 1024,
            status_resend_seconds: self.options.status_resend_seconds,
        }
    }
}

fn hub(message: hub_message::Message) -> pb::HubMessage {
    pb::HubMessage {
        message: Some(message),
    }
}

struct Service {
    state: Arc<State>,
}

#[tonic::async_trait]
impl SiteRegistry for Service {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let state = &self.state;
        let mut inner = state.lock();
        inner.registrations.push(request.clone());
        state.bump();
        let answer = match &inner.issued {
            Some(issued) if issued.request_id == request.request_id => Some(pb::RegisterResponse {
                site_id: issued.site_id.clone(),
                site_credential: issued.credential.clone(),
                credential_expires_at: None,
                config: Some(state.session_config()),
            }),
            Some(_) => return Err(Status::unauthenticated("this join token was already used")),
            None if request.join_token != state.options.join_token => {
                return Err(Status::unauthenticated("unknown join token"));
            }
            None => None,
        };
        let answer = answer.unwrap_or_else(|| {
            let issued = Issued {
                request_id: request.request_id.clone(),
                site_id: format!("site-{}", uuid::Uuid::new_v4().simple()),
                credential: format!("fake-credential-{}", uuid::Uuid::new_v4().simple()),
            };
            let answer = pb::RegisterResponse {
                site_id: issued.site_id.clone(),
                site_credential: issued.credential.clone(),
                credential_expires_at: None,
                config: Some(state.session_config()),
            };
            inner.issued = Some(issued);
            answer
        });
        if state.options.lose_first_register_answer && !inner.lost_an_answer {
            inner.lost_an_answer = true;
            return Err(Status::unavailable(
                "the fake coordinator lost this answer on purpose",
            ));
        }
        Ok(Response::new(answer))
    }

    type SessionStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::SiteMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session ended before hello"))?;
        let Some(site_message::Message::Hello(hello)) = first.message else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(256);
        let (stop_reading, stopped) = oneshot::channel();
        let session = {
            let mut inner = state.lock();
            let known = inner.issued.as_ref().is_some_and(|i| {
                i.site_id == hello.site_id && i.credential == hello.site_credential
            });
            if !known || inner.revoked {
                inner.refused_hellos += 1;
                state.bump();
                return Err(Status::unauthenticated(
                    "unknown or revoked site credential",
                ));
            }
            let session = inner.hellos.len();
            inner.hellos.push(hello.clone());
            inner.received.push(Received {
                session,
                message: site_message::Message::Hello(hello.clone()),
            });
            // A newer session replaces an older one of the (single) manager.
            if let Some(mut old) = inner.current.take()
                && let Some(stop) = old.stop_reading.take()
            {
                let _ = stop.send(());
            }
            inner.current = Some(Current {
                session,
                tx: tx.clone(),
                stop_reading: Some(stop_reading),
            });
            session
        };
        let accepted = pb::SessionAccepted {
            session_id: format!("fake-session-{session}"),
            site_id: hello.site_id.clone(),
            config: Some(state.session_config()),
            hub_broker: None,
            server_time: Some(SystemTime::now().into()),
        };
        let _ = tx
            .send(Ok(hub(hub_message::Message::Accepted(accepted))))
            .await;
        state.bump();
        tokio::spawn(read_session(state, session, inbound, tx, stopped));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let inner = self.state.lock();
        let known = inner.issued.as_ref().is_some_and(|i| {
            i.site_id == request.site_id && i.credential == request.site_credential
        });
        if !known || inner.revoked {
            return Err(Status::unauthenticated(
                "unknown or revoked site credential",
            ));
        }
        Ok(Response::new(pb::HeartbeatResponse {
            work_pending: false,
            config: Some(self.state.session_config()),
            server_time: Some(SystemTime::now().into()),
        }))
    }
}

/// Records what one session sends until it ends or the test drops it.
async fn read_session(
    state: Arc<State>,
    session: usize,
    mut inbound: Streaming<pb::SiteMessage>,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let received = tokio::select! {
            received = inbound.message() => received,
            _ = &mut stopped => break,
        };
        let Ok(Some(pb::SiteMessage {
            message: Some(message),
        })) = received
        else {
            break;
        };
        let answer = {
            let mut inner = state.lock();
            inner.received.push(Received {
                session,
                message: message.clone(),
            });
            match &message {
                site_message::Message::Status(report) if inner.auto_ack => {
                    report.status.as_ref().map(|status| {
                        hub_message::Message::StatusAck(pb::StatusAck {
                            job_id: status.job_id.clone(),
                            attempt: status.attempt,
                            up_to_sequence: report.sequence,
                        })
                    })
                }
                site_message::Message::Heartbeat(_) => {
                    Some(hub_message::Message::Heartbeat(pb::SessionHeartbeat {
                        sent_at: Some(SystemTime::now().into()),
                    }))
                }
                _ => None,
            }
        };
        state.bump();
        if let Some(answer) = answer {
            let _ = tx.send(Ok(hub(answer))).await;
        }
    }
    let mut inner = state.lock();
    if inner.current.as_ref().is_some_and(|c| c.session == session) {
        inner.current = None;
    }
    drop(inner);
    state.bump();
}

/// The fake coordinator, serving until dropped or stopped.
pub struct FakeCoordinator {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// Its address.
    pub address: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCoordinator {
    /// Starts the fake on a fresh loopback port.
    pub async fn start(options: FakeCoordinatorOptions) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                auto_ack: options.auto_ack,
                ..Inner::default()
            }),
            options,
            changed,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let service = SiteRegistryServer::new(Service {
            state: state.clone(),
        });
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            uri: format!("http://{address}"),
            address,
            state,
            stop: Some(stop),
            task,
        })
    }

    /// The join token it accepts.
    pub fn join_token(&self) -> &str {
        &self.state.options.join_token
    }

    /// Every `Register` call so far.
    pub fn registrations(&self) -> Vec<pb::RegisterRequest> {
        self.state.lock().registrations.clone()
    }

    /// The site id it issued, if any.
    pub fn site_id(&self) -> Option<String> {
        self.state.lock().issued.as_ref().map(|i| i.site_id.clone())
    }

    /// The credential it issued, if any (for checking it was stored, never logged).
    pub fn credential(&self) -> Option<String> {
        self.state
            .lock()
            .issued
            .as_ref()
            .map(|i| i.credential.clone())
    }

    /// The hello of every accepted session, in order.
    pub fn hellos(&self) -> Vec<pb::SiteHello> {
        self.state.lock().hellos.clone()
    }

    /// Hellos refused (bad or revoked credential).
    pub fn refused_hellos(&self) -> usize {
        self.state.lock().refused_hellos
    }

    /// Everything the site sent, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().received.clone()
    }

    /// Waits until `pick` finds what it looks for in what was received (and in the
    /// accepted hellos' count), or fails after `within` saying what was awaited.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        pick: impl Fn(&[Received]) -> Option<T>,
    ) -> Result<T> {
        let mut changes = self.state.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let found = pick(&self.state.lock().received);
            if let Some(found) = found {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!(
                    "timed out after {within:?} waiting for {what}; received:\n{:#?}",
                    self.state.lock().received
                ),
            }
        }
    }

    /// Waits for the `n`th accepted session (1 for the first) and returns its hello.
    pub async fn wait_for_session(&self, n: usize, within: Duration) -> Result<pb::SiteHello> {
        let mut changes = self.state.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(hello) = self.state.lock().hellos.get(n - 1).cloned() {
                return Ok(hello);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                bail!("timed out after {within:?} waiting for session {n}");
            }
        }
    }

    /// Every status report received about `job_id`, with the session it came on.
    pub fn status_reports(&self, job_id: &str) -> Vec<(usize, pb::StatusReport)> {
        status_reports(&self.state.lock().received, job_id)
    }

    /// Waits for a status report putting `job_id` in `state`.
    pub async fn wait_for_state(
        &self,
        job_id: &str,
        state: pb::JobState,
        within: Duration,
    ) -> Result<pb::StatusReport> {
        self.wait_for(&format!("{job_id} {state:?}"), within, |received| {
            status_reports(received, job_id)
                .into_iter()
                .map(|(_, r)| r)
                .find(|r| r.status.as_ref().is_some_and(|s| s.state() == state))
        })
        .await
    }

    /// Sends a command to the newest session.
    pub async fn send(&self, message: hub_message::Message) -> Result<()> {
        let tx = self
            .state
            .lock()
            .current
            .as_ref()
            .map(|c| c.tx.clone())
            .context("no site session is open")?;
        tx.send(Ok(hub(message)))
            .await
            .map_err(|_| anyhow::anyhow!("the site session closed"))
    }

    /// Leases a job attempt to the site.
    pub async fn run_job(&self, lease: pb::RunJobCommand) -> Result<()> {
        self.send(hub_message::Message::RunJob(lease)).await
    }

    /// Tells the site to cancel a job attempt.
    pub async fn cancel_job(&self, job_id: &str, attempt: u32, message: &str) -> Result<()> {
        self.send(hub_message::Message::CancelJob(pb::CancelJobCommand {
            job_id: job_id.into(),
            attempt,
            message: message.into(),
        }))
        .await
    }

    /// Tells the site to remove what it holds for a job.
    pub async fn remove_job(&self, job_id: &str, attempt: u32, staging_area: bool) -> Result<()> {
        self.send(hub_message::Message::RemoveJob(pb::RemoveJobCommand {
            job_id: job_id.into(),
            attempt,
            remove_staging_area: staging_area,
        }))
        .await
    }

    /// Asks the site for a reconcile report.
    pub async fn request_reconcile(&self, request_id: u64) -> Result<()> {
        self.send(hub_message::Message::ReconcileRequest(
            pb::ReconcileRequest { request_id },
        ))
        .await
    }

    /// Acknowledges an attempt's reports up to `up_to`.
    pub async fn ack(&self, job_id: &str, attempt: u32, up_to: u64) -> Result<()> {
        self.send(hub_message::Message::StatusAck(pb::StatusAck {
            job_id: job_id.into(),
            attempt,
            up_to_sequence: up_to,
        }))
        .await
    }

    /// Turns the automatic acknowledgement of status reports on or off.
    pub fn set_auto_ack(&self, on: bool) {
        self.state.lock().auto_ack = on;
    }

    /// Refuses the site's credential from now on (and drops its session).
    pub fn revoke(&self) {
        self.state.lock().revoked = true;
        self.drop_session();
    }

    /// Ends the newest session with UNAVAILABLE, as a broken connection or a restarted
    /// hub would; nothing more it sends is recorded. False if none was open.
    pub fn drop_session(&self) -> bool {
        let current = self.state.lock().current.take();
        let Some(mut current) = current else {
            return false;
        };
        if let Some(stop) = current.stop_reading.take() {
            let _ = stop.send(());
        }
        let _ = current.tx.try_send(Err(Status::unavailable(
            "the fake coordinator dropped the session",
        )));
        self.state.bump();
        true
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) -> Result<()> {
        self.drop_session();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

fn status_reports(received: &[Received], job_id: &str) -> Vec<(usize, pb::StatusReport)> {
    received
        .iter()
        .filter_map(|r| match &r.message {
            site_message::Message::Status(report)
                if report.status.as_ref().is_some_and(|s| s.job_id == job_id) =>
            {
                Some((r.session, report.clone()))
            }
            _ => None,
        })
        .collect()
}

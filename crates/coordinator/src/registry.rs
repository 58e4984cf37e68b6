//! The site registry: which sites exist, which of their managers are connected, what each
//! can take, and everything the hub says to them.
//!
//! Sites live in the store (store/sites.rs); the registry keeps them in memory too, with
//! what is not worth a write per message: the open sessions (one per manager replica),
//! when each manager was last heard from, the capacity each advertised, the leases sent
//! and not yet reflected in an advertisement, and the log relays in flight. Every change
//! to a job goes through the store (and so through the state machine) before the site is
//! told anything about it; the registry's memory only decides whom to tell.
//!
//! Liveness is per manager: a manager that goes silent for `sites.heartbeat_seconds` ×
//! `sites.unreachable_after_heartbeats` without a goodbye is lost, and the jobs placed
//! with it follow `sites.loss_policy`; a site is UNREACHABLE once all its managers are.
//! The owned monitor task ([`Registry::monitor`]) checks this, takes back leases a site
//! never answered, writes liveness to the store in batches, and expires unused uploads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use dispatch_proto::job::{Labels, NAME_MAX_BYTES};
use dispatch_proto::{FieldError, JobId, JobSpec, v1};

use crate::config::{CoordinatorConfig, LossPolicy};
use crate::error::{Error, Result};
use crate::hub_broker::HubBroker;
use crate::scheduler::{self, Candidate};
use crate::secret::{self, Purpose};
use crate::state::{JobState, Reason};
use crate::store::{
    JobRecord, NewJoinToken, Registration, ReportOutcome, SiteHealth, SiteRecord, Store, UnixMicros,
};
use crate::tasks::Tasks;

/// Messages queued for one site session before it counts as stuck (and is closed, to
/// reconnect and reconcile).
const OUTBOUND_QUEUE: usize = 4096;
/// Log chunks queued for one `JobLogs` client before it counts as too slow.
const LOG_QUEUE: usize = 256;
/// Largest page of `ListSites`.
const MAX_SITE_PAGE: u32 = 1000;
/// Longest a join token may be asked to live.
const MAX_TOKEN_TTL_SECONDS: u32 = 30 * 24 * 3600;
/// The newest site protocol this coordinator speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Stands for the managers of a site that was connected when the coordinator stopped,
/// until one of them says hello.
const UNKNOWN_MANAGER: &str = "";
/// How often the monitor looks for expired uploads.
const UPLOAD_SWEEP: Duration = Duration::from_secs(60);

type Outbound = mpsc::Sender<Result<v1::HubMessage, Status>>;

fn hub(message: v1::hub_message::Message) -> v1::HubMessage {
    v1::HubMessage {
        message: Some(message),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn resources_of(spec: &JobSpec) -> v1::Resources {
    v1::Resources {
        cpu_millicores: spec.cpu().0,
        memory_mib: spec.memory().0,
        gpus: spec.gpus(),
    }
}

/// A lease sent to a session and not yet reflected in its advertised capacity.
#[derive(Debug, Clone)]
struct Lease {
    resources: v1::Resources,
    sent_at: Instant,
    /// The site reported on it: the next capacity update counts it.
    reported: bool,
}

/// The hub's side of one open site session.
struct SessionEntry {
    id: String,
    manager_id: String,
    manager_version: String,
    tx: Outbound,
    connected_at: UnixMicros,
    last_heartbeat: UnixMicros,
    capabilities: v1::Capabilities,
    capacity: v1::CapacityUpdate,
    leases: HashMap<(String, u32), Lease>,
    /// No new leases until then (a NO_CAPACITY decline), or until the next capacity
    /// update, whichever is first.
    paused_until: Option<Instant>,
    /// The manager is going away: no new leases.
    draining: bool,
    logs: HashMap<u64, mpsc::Sender<Result<v1::LogChunk, Status>>>,
    next_log_request: u64,
    close: CancellationToken,
    /// The status the stream ends with when the hub closes it.
    end: Option<Status>,
}

impl SessionEntry {
    fn send(&self, message: v1::hub_message::Message) -> bool {
        match self.tx.try_send(Ok(hub(message))) {
            Ok(()) => true,
            Err(_) => {
                // Full (the site stopped reading) or closed: either way the session is of
                // no use; the manager reconnects and reconciles.
                self.close.cancel();
                false
            }
        }
    }

    fn shut(&mut self, status: Status) {
        self.end.get_or_insert(status);
        self.close.cancel();
    }

    fn free(&self) -> (v1::Resources, Option<u32>) {
        let mut free = self.capacity.free.unwrap_or_default();
        for lease in self.leases.values() {
            free.cpu_millicores = free
                .cpu_millicores
                .saturating_sub(lease.resources.cpu_millicores);
            free.memory_mib = free.memory_mib.saturating_sub(lease.resources.memory_mib);
            free.gpus = free.gpus.saturating_sub(lease.resources.gpus);
        }
        let slots = (self.capabilities.max_concurrent_jobs > 0).then(|| {
            self.capacity
                .free_job_slots
                .saturating_sub(u32::try_from(self.leases.len()).unwrap_or(u32::MAX))
        });
        (free, slots)
    }
}

/// When a manager was last heard from.
#[derive(Debug, Clone)]
struct ManagerLiveness {
    last_seen: Instant,
    /// It said goodbye: its silence is planned, its jobs wait for it.
    goodbye: bool,
    /// Its silence outlasted the limit and its jobs followed the loss policy.
    lost: bool,
}

struct SiteEntry {
    record: SiteRecord,
    sessions: HashMap<u64, SessionEntry>,
    managers: HashMap<String, ManagerLiveness>,
    /// Last word from any manager, not yet written to the store.
    seen_at: Option<UnixMicros>,
    dirty: bool,
}

impl SiteEntry {
    fn new(record: SiteRecord) -> Self {
        Self {
            record,
            sessions: HashMap::new(),
            managers: HashMap::new(),
            seen_at: None,
            dirty: false,
        }
    }

    fn touch(&mut self, manager_id: &str) {
        let now = Instant::now();
        self.managers.remove(UNKNOWN_MANAGER);
        let manager = self
            .managers
            .entry(manager_id.to_owned())
            .or_insert(ManagerLiveness {
                last_seen: now,
                goodbye: false,
                lost: false,
            });
        manager.last_seen = now;
        manager.goodbye = false;
        manager.lost = false;
        self.seen_at = Some(UnixMicros::now());
        self.dirty = true;
    }

    /// The session to reach `manager_id` by (the newest), or any when none is given.
    fn session_for(&self, manager_id: &str) -> Option<&SessionEntry> {
        self.sessions
            .values()
            .filter(|s| manager_id.is_empty() || s.manager_id == manager_id)
            .max_by_key(|s| s.connected_at)
    }

    fn to_wire(&self, active_jobs: u32) -> v1::Site {
        let record = &self.record;
        let mut managers: Vec<v1::ManagerSessionInfo> = self
            .sessions
            .values()
            .map(|s| v1::ManagerSessionInfo {
                manager_id: s.manager_id.clone(),
                session_id: s.id.clone(),
                manager_version: s.manager_version.clone(),
                connected_at: Some(s.connected_at.to_proto()),
                last_heartbeat_at: Some(s.last_heartbeat.to_proto()),
            })
            .collect();
        managers.sort_by(|a, b| a.manager_id.cmp(&b.manager_id));
        v1::Site {
            site_id: record.site_id.clone(),
            name: record.name.clone(),
            labels: record.labels().into_iter().collect(),
            capabilities: Some(record.capabilities.clone()),
            health: v1::SiteHealth::from(record.health).into(),
            capacity: record.capacity,
            managers,
            registered_at: Some(record.registered_at.to_proto()),
            last_seen_at: self
                .seen_at
                .or(record.last_seen_at)
                .map(UnixMicros::to_proto),
            active_jobs,
        }
    }
}

#[derive(Default)]
struct State {
    sites: HashMap<String, SiteEntry>,
    /// Sites that declined a job as one they can never run, by job id.
    declined: HashMap<String, Vec<String>>,
}

struct Inner {
    store: Store,
    config: Arc<CoordinatorConfig>,
    hub: Option<HubBroker>,
    scheduler: scheduler::Handle,
    tasks: Tasks,
    stop: CancellationToken,
    state: Mutex<State>,
    next_key: AtomicU64,
}

/// The site registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// What opening a session gives the session task.
pub struct OpenedSession {
    /// The session's key in the registry.
    pub key: u64,
    /// The site.
    pub site_id: String,
    /// The manager replica.
    pub manager_id: String,
    /// When it was accepted.
    pub connected_at: UnixMicros,
    /// Cancelled when the hub ends the session.
    pub close: CancellationToken,
    /// The stream to the site (its first message, `accepted`, already queued).
    pub outbound: mpsc::Receiver<Result<v1::HubMessage, Status>>,
}

fn check_name(field: &str, raw: &str) -> Result<(), FieldError> {
    if raw.len() > NAME_MAX_BYTES || raw.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("must be at most {NAME_MAX_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

impl Registry {
    /// Loads the registered sites and starts with every manager that holds jobs given
    /// one full liveness window to reconnect (a restarted coordinator must not count
    /// its own downtime against its sites).
    pub async fn start(
        store: Store,
        config: Arc<CoordinatorConfig>,
        hub: Option<HubBroker>,
        scheduler: scheduler::Handle,
        tasks: Tasks,
        stop: CancellationToken,
    ) -> Result<Self> {
        let mut state = State::default();
        for record in store.sites().await? {
            let mut entry = SiteEntry::new(record);
            if entry.record.health == SiteHealth::Connected {
                // Connected when the coordinator stopped: its managers get one window to
                // say hello again, or the site is shown unreachable.
                entry.managers.insert(
                    UNKNOWN_MANAGER.to_owned(),
                    ManagerLiveness {
                        last_seen: Instant::now(),
                        goodbye: false,
                        lost: false,
                    },
                );
            }
            if entry.record.health != SiteHealth::Revoked {
                for job in store.placed_at_site(&entry.record.site_id).await? {
                    let manager = job.status.site.map(|s| s.manager_id).unwrap_or_default();
                    entry.managers.insert(
                        manager,
                        ManagerLiveness {
                            last_seen: Instant::now(),
                            goodbye: false,
                            lost: false,
                        },
                    );
                }
            }
            state.sites.insert(entry.record.site_id.clone(), entry);
        }
        tracing::info!(sites = state.sites.len(), "site registry loaded");
        if let Some(hub) = &hub {
            hub.learn_store_id().await;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                config,
                hub,
                scheduler,
                tasks,
                stop,
                state: Mutex::new(state),
                next_key: AtomicU64::new(1),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The owner of the session tasks.
    pub fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }

    /// Cancelled when the coordinator stops.
    pub fn stopping(&self) -> &CancellationToken {
        &self.inner.stop
    }

    /// Wakes the scheduler.
    pub fn nudge(&self) {
        self.inner.scheduler.nudge();
    }

    /// The hub broker, when one is configured.
    pub fn hub_broker(&self) -> Option<&HubBroker> {
        self.inner.hub.as_ref()
    }

    /// How managers should behave on their sessions.
    pub fn session_config(&self) -> v1::SessionConfig {
        let sites = &self.inner.config.sites;
        v1::SessionConfig {
            heartbeat_interval_seconds: sites.heartbeat_seconds,
            unreachable_after_seconds: u32::try_from(sites.unreachable_after().as_secs())
                .unwrap_or(u32::MAX),
            max_log_chunk_bytes: sites.max_log_chunk_bytes,
            status_resend_seconds: sites.status_resend_seconds,
        }
    }

    // ---- Admin ----

    /// Makes a join token; the token is in the answer only, and stored as a hash.
    pub async fn create_join_token(
        &self,
        request: v1::CreateJoinTokenRequest,
    ) -> Result<v1::CreateJoinTokenResponse> {
        check_name("site_name", &request.site_name)?;
        let labels = Labels::parse("labels", request.labels)?;
        if !request.site_name.is_empty() && self.store().site_name_taken(&request.site_name).await?
        {
            return Err(Error::FailedPrecondition(format!(
                "a site named `{}` is already registered; pick another name (or revoke that site)",
                request.site_name
            )));
        }
        let ttl = match request.ttl_seconds {
            0 => self.inner.config.sites.join_token_ttl_seconds,
            n => n.min(MAX_TOKEN_TTL_SECONDS),
        };
        let token = secret::generate(Purpose::JoinToken)?;
        let now = UnixMicros::now();
        let expires_at = UnixMicros(now.0 + i64::from(ttl) * 1_000_000);
        let record = NewJoinToken {
            token_id: secret::new_id("jt"),
            hash: secret::hash(Purpose::JoinToken, &token),
            site_name: request.site_name,
            admin_labels: labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            created_at: now,
            expires_at,
        };
        self.store().insert_join_token(&record).await?;
        tracing::info!(token = %record.token_id, site_name = %record.site_name, ttl_s = ttl,
            "join token created");
        Ok(v1::CreateJoinTokenResponse {
            join_token: token,
            token_id: record.token_id,
            expires_at: Some(expires_at.to_proto()),
        })
    }

    /// The registered sites, by name, filtered and paged.
    pub async fn list_sites(&self, request: v1::ListSitesRequest) -> Result<v1::ListSitesResponse> {
        let health = request
            .health
            .iter()
            .map(|&raw| {
                v1::SiteHealth::try_from(raw)
                    .map_err(|_| format!("unknown value {raw}"))
                    .and_then(SiteHealth::try_from)
                    .map_err(|reason| Error::InvalidArgument(FieldError::new("health", reason)))
            })
            .collect::<Result<Vec<_>>>()?;
        let kind = v1::BackendKind::try_from(request.backend_kind).map_err(|_| {
            FieldError::new(
                "backend_kind",
                format!("unknown value {}", request.backend_kind),
            )
        })?;
        let page = request.page.unwrap_or_default();
        let after = match page.page_token.as_str() {
            "" => None,
            token => Some(
                URL_SAFE_NO_PAD
                    .decode(token)
                    .ok()
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .ok_or_else(|| {
                        FieldError::new(
                            "page.page_token",
                            "is not a token from a previous page of this listing",
                        )
                    })?,
            ),
        };
        let size = match page.page_size {
            0 => 100,
            n => n.min(MAX_SITE_PAGE),
        } as usize;
        let active = self.store().active_jobs_by_site().await?;
        let mut sites: Vec<v1::Site> = {
            let state = self.state();
            state
                .sites
                .values()
                .filter(|e| health.is_empty() || health.contains(&e.record.health))
                .filter(|e| {
                    kind == v1::BackendKind::Unspecified
                        || e.record.capabilities.backend_kind() == kind
                })
                .filter(|e| after.as_ref().is_none_or(|name| e.record.name > *name))
                .map(|e| e.to_wire(active.get(&e.record.site_id).copied().unwrap_or(0)))
                .collect()
        };
        sites.sort_by(|a, b| a.name.cmp(&b.name));
        let next_page_token = if sites.len() > size {
            sites.truncate(size);
            sites
                .last()
                .map(|s| URL_SAFE_NO_PAD.encode(&s.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(v1::ListSitesResponse {
            sites,
            next_page_token,
        })
    }

    /// Revokes a site: its credential stops working at once, its sessions are closed,
    /// and its active jobs follow the loss policy (`wait` counts as `requeue` here: a
    /// revoked site never comes back to finish them). Replayable.
    pub async fn revoke(&self, site_id: &str, message: &str) -> Result<v1::Site> {
        if site_id.is_empty() {
            return Err(FieldError::new("site_id", "is required").into());
        }
        let record = self.store().revoke_site(site_id, message).await?;
        {
            let mut state = self.state();
            let entry = state
                .sites
                .entry(site_id.to_owned())
                .or_insert_with(|| SiteEntry::new(record.clone()));
            entry.record = record;
            for session in entry.sessions.values_mut() {
                session.shut(Status::unauthenticated(
                    "this site was revoked by an admin; it can no longer connect",
                ));
            }
            entry.managers.clear();
        }
        tracing::warn!(site = %site_id, %message, "site revoked");
        let policy = match self.inner.config.sites.loss_policy {
            LossPolicy::Wait => LossPolicy::Requeue,
            other => other,
        };
        self.apply_loss_policy(
            site_id,
            None,
            policy,
            &format!("its site `{site_id}` was revoked"),
        )
        .await;
        let active = self.store().active_jobs_by_site().await?;
        let state = self.state();
        let entry = state
            .sites
            .get(site_id)
            .ok_or_else(|| Error::UnknownSite(site_id.to_owned()))?;
        Ok(entry.to_wire(active.get(site_id).copied().unwrap_or(0)))
    }

    // ---- Site registry ----

    /// Trades a join token for a site id and credential (see `Store::register_site`).
    pub async fn register(&self, request: v1::RegisterRequest) -> Result<v1::RegisterResponse> {
        if request.join_token.trim().is_empty() {
            return Err(Error::Unauthenticated("a join token is required".into()));
        }
        check_name("site_name", &request.site_name)?;
        check_name("manager_id", &request.manager_id)?;
        check_name("request_id", &request.request_id)?;
        let credential = secret::generate(Purpose::SiteCredential)?;
        let registration = Registration {
            token_hash: secret::hash(Purpose::JoinToken, &request.join_token),
            request_id: request.request_id,
            suggested_name: request.site_name,
            capabilities: request.capabilities.unwrap_or_default(),
            site_id: secret::new_id("site"),
            credential_hash: secret::hash(Purpose::SiteCredential, &credential),
        };
        let registered = self.store().register_site(&registration).await?;
        let site = registered.site;
        tracing::info!(site = %site.site_id, name = %site.name, manager = %request.manager_id,
            replayed = registered.replayed, kind = ?site.capabilities.backend_kind(), "site registered");
        let site_id = site.site_id.clone();
        {
            let mut state = self.state();
            match state.sites.get_mut(&site_id) {
                Some(entry) => entry.record = site,
                None => {
                    state.sites.insert(site_id.clone(), SiteEntry::new(site));
                }
            }
        }
        Ok(v1::RegisterResponse {
            site_id,
            site_credential: credential,
            credential_expires_at: None,
            config: Some(self.session_config()),
        })
    }

    /// Checks a site's credential; the site's record when it holds.
    fn authenticate(&self, site_id: &str, credential: &str) -> Result<SiteRecord> {
        let state = self.state();
        let refused = || Error::Unauthenticated("unknown site or wrong site credential".into());
        let entry = state.sites.get(site_id).ok_or_else(refused)?;
        if !entry.record.credential_matches(credential) {
            return Err(refused());
        }
        if entry.record.health == SiteHealth::Revoked {
            return Err(Error::Unauthenticated(format!(
                "site `{site_id}` was revoked; join again with a new token"
            )));
        }
        Ok(entry.record.clone())
    }

    /// Accepts a hello: the site is authenticated, its capabilities recorded, and a
    /// session opened with `accepted` as its first message.
    pub async fn open_session(&self, hello: v1::SiteHello) -> Result<OpenedSession> {
        if hello.protocol_version > PROTOCOL_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "this coordinator speaks site protocol {PROTOCOL_VERSION}; the manager speaks {}",
                hello.protocol_version
            )));
        }
        let record = self.authenticate(&hello.site_id, &hello.site_credential)?;
        if hello.manager_id.is_empty() {
            return Err(FieldError::new("hello.manager_id", "is required").into());
        }
        check_name("hello.manager_id", &hello.manager_id)?;
        let capabilities = hello.capabilities.clone().unwrap_or_default();
        let capacity = hello.capacity.unwrap_or_default();
        let now = UnixMicros::now();
        self.store()
            .site_connected(&record.site_id, &capabilities, Some(&capacity), now)
            .await?;
        let key = self.inner.next_key.fetch_add(1, Ordering::SeqCst);
        let session_id = secret::new_id("session");
        let (tx, outbound) = mpsc::channel(OUTBOUND_QUEUE);
        let close = self.inner.stop.child_token();
        let accepted = v1::SessionAccepted {
            session_id: session_id.clone(),
            site_id: record.site_id.clone(),
            config: Some(self.session_config()),
            hub_broker: self.inner.hub.as_ref().map(HubBroker::endpoint),
            server_time: Some(SystemTime::now().into()),
        };
        {
            let mut state = self.state();
            let entry = state
                .sites
                .get_mut(&record.site_id)
                .ok_or_else(|| Error::UnknownSite(record.site_id.clone()))?;
            if entry.record.health == SiteHealth::Revoked {
                return Err(Error::Unauthenticated("this site was revoked".into()));
            }
            entry.record.capabilities = capabilities.clone();
            entry.record.capacity = Some(capacity);
            entry.record.health = SiteHealth::Connected;
            entry.record.last_seen_at = Some(now);
            entry.record.first_session_at.get_or_insert(now);
            entry.touch(&hello.manager_id);
            // A manager has one session: a new hello replaces one left half-open.
            for old in entry
                .sessions
                .values_mut()
                .filter(|s| s.manager_id == hello.manager_id)
            {
                old.shut(Status::aborted(
                    "replaced by a newer session of this manager",
                ));
            }
            let session = SessionEntry {
                id: session_id.clone(),
                manager_id: hello.manager_id.clone(),
                manager_version: capabilities.manager_version.clone(),
                tx,
                connected_at: now,
                last_heartbeat: now,
                capabilities,
                capacity,
                leases: HashMap::new(),
                paused_until: None,
                draining: false,
                logs: HashMap::new(),
                next_log_request: 1,
                close: close.clone(),
                end: None,
            };
            session.send(v1::hub_message::Message::Accepted(accepted));
            entry.sessions.insert(key, session);
        }
        tracing::info!(site = %record.site_id, name = %record.name, manager = %hello.manager_id,
            session = %session_id, "site session open");
        self.nudge();
        Ok(OpenedSession {
            key,
            site_id: record.site_id,
            manager_id: hello.manager_id,
            connected_at: now,
            close,
            outbound,
        })
    }

    /// A heartbeat without a session: the manager is alive.
    pub async fn heartbeat(&self, request: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse> {
        self.authenticate(&request.site_id, &request.site_credential)?;
        check_name("manager_id", &request.manager_id)?;
        let has_session = {
            let mut state = self.state();
            let entry = state
                .sites
                .get_mut(&request.site_id)
                .ok_or_else(|| Error::UnknownSite(request.site_id.clone()))?;
            entry.touch(&request.manager_id);
            if let Some(capacity) = request.capacity {
                entry.record.capacity = Some(capacity);
            }
            entry
                .sessions
                .values()
                .any(|s| s.manager_id == request.manager_id)
        };
        let work_pending = !has_session && self.store().any_queued().await?;
        Ok(v1::HeartbeatResponse {
            work_pending,
            config: Some(self.session_config()),
            server_time: Some(SystemTime::now().into()),
        })
    }

    // ---- The client API's hooks ----

    /// Refuses, at submission, a job no registered site could ever run (an unknown site,
    /// a kind or labels no site has, limits beyond every site's largest job). With no
    /// site registered yet, anything goes: the job waits for one.
    pub fn check_admissible(&self, spec: &JobSpec) -> Result<()> {
        let state = self.state();
        let sites: Vec<&SiteRecord> = state
            .sites
            .values()
            .map(|e| &e.record)
            .filter(|r| r.health != SiteHealth::Revoked)
            .collect();
        if sites.is_empty() {
            return Ok(());
        }
        let placement = spec.placement();
        if let Some(wanted) = placement.site_id()
            && !sites.iter().any(|s| s.site_id == wanted)
        {
            return Err(FieldError::new(
                "spec.placement.site_id",
                format!("no site `{wanted}` is registered (ListSites shows those that are)"),
            )
            .into());
        }
        let allowed: Vec<&&SiteRecord> = sites
            .iter()
            .filter(|s| {
                scheduler::placement_admits(
                    spec,
                    &s.site_id,
                    scheduler::backend_kind(&s.capabilities),
                    &s.labels(),
                )
            })
            .collect();
        if allowed.is_empty() {
            return Err(FieldError::new(
                "spec.placement",
                "no registered site has this backend kind and these labels",
            )
            .into());
        }
        let refusals: Vec<(&'static str, String)> = allowed
            .iter()
            .filter_map(|s| scheduler::never_fits(spec, &s.capabilities))
            .collect();
        if refusals.len() < allowed.len() {
            return Ok(());
        }
        // Name the field most sites refused it for, with what the largest site offers.
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (field, _) in &refusals {
            *counts.entry(field).or_default() += 1;
        }
        let field = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(field, _)| *field)
            .unwrap_or("spec");
        let detail = refusals
            .iter()
            .filter(|(f, _)| *f == field)
            .map(|(_, why)| why.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Err(FieldError::new(
            format!("spec.{field}"),
            format!("no registered site can ever run this job ({detail})"),
        )
        .into())
    }

    /// Tells the job's site to stop it (a cancel recorded by `CancelJob` or `DeleteJob`).
    /// A site not connected now gets it when it reconciles.
    pub fn forward_cancel(&self, job: &JobRecord) {
        if !job.status.state.is_placed() || !job.status.cancel_requested {
            return;
        }
        let Some(site) = &job.status.site else {
            return;
        };
        let message = job
            .cancel_requested
            .as_ref()
            .map(|(_, why)| why.clone())
            .unwrap_or_default();
        let sent = self.send_to_manager(
            &site.site_id,
            &site.manager_id,
            v1::hub_message::Message::CancelJob(v1::CancelJobCommand {
                job_id: job.job_id.to_string(),
                attempt: job.status.attempt,
                message,
            }),
        );
        tracing::info!(job = %job.job_id, site = %site.site_id, sent, "cancel forwarded to the site");
    }

    /// Tells a site to remove what it holds for a job attempt.
    pub fn forward_remove(
        &self,
        site_id: &str,
        manager_id: &str,
        job_id: &str,
        attempt: u32,
        staging_area: bool,
    ) -> bool {
        self.send_to_manager(
            site_id,
            manager_id,
            v1::hub_message::Message::RemoveJob(v1::RemoveJobCommand {
                job_id: job_id.to_owned(),
                attempt,
                remove_staging_area: staging_area,
            }),
        )
    }

    /// Relays a job's log from its site: a stream of chunks that ends with the log
    /// (or, following, when the job ends), and stops the relay when dropped.
    pub fn follow_logs(
        &self,
        job: &JobRecord,
        tail_lines: Option<u32>,
        follow: bool,
    ) -> Result<LogFollow> {
        let site = job.status.site.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "job `{}` was never placed at a site; it has no log yet",
                job.job_id
            ))
        })?;
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        let mut state = self.state();
        let entry = state
            .sites
            .get_mut(&site.site_id)
            .ok_or_else(|| Error::UnknownSite(site.site_id.clone()))?;
        let key = entry
            .sessions
            .iter()
            .filter(|(_, s)| site.manager_id.is_empty() || s.manager_id == site.manager_id)
            .max_by_key(|(_, s)| s.connected_at)
            .map(|(key, _)| *key)
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "site `{}` is not connected; the log of job `{}` can be read once it reconnects",
                    site.site_id, job.job_id
                ))
            })?;
        let session = entry
            .sessions
            .get_mut(&key)
            .ok_or_else(|| Error::Unavailable("the site's session closed".into()))?;
        let request_id = session.next_log_request;
        session.next_log_request += 1;
        session.logs.insert(request_id, tx);
        let sent = session.send(v1::hub_message::Message::FollowLogs(
            v1::FollowLogsCommand {
                request_id,
                job_id: job.job_id.to_string(),
                tail_lines,
                follow,
            },
        ));
        if !sent {
            session.logs.remove(&request_id);
            return Err(Error::Unavailable("the site's session closed".into()));
        }
        Ok(LogFollow {
            rx,
            registry: self.clone(),
            site_id: site.site_id.clone(),
            key,
            request_id,
        })
    }

    fn stop_logs(&self, site_id: &str, key: u64, request_id: u64) {
        let mut state = self.state();
        let Some(session) = state
            .sites
            .get_mut(site_id)
            .and_then(|e| e.sessions.get_mut(&key))
        else {
            return;
        };
        if session.logs.remove(&request_id).is_some() {
            session.send(v1::hub_message::Message::StopLogs(v1::StopLogsCommand {
                request_id,
            }));
        }
    }

    // ---- Scheduling ----

    /// The open sessions that may take work now, with what each can take.
    pub fn candidates(&self) -> Vec<Candidate> {
        let now = Instant::now();
        let state = self.state();
        let mut out = Vec::new();
        for entry in state.sites.values() {
            if matches!(entry.record.health, SiteHealth::Revoked) {
                continue;
            }
            let labels = entry.record.labels();
            for (key, session) in &entry.sessions {
                if session.draining
                    || session.close.is_cancelled()
                    || session.paused_until.is_some_and(|until| until > now)
                {
                    continue;
                }
                let (free, slots) = session.free();
                let mut session_labels: BTreeMap<String, String> = session
                    .capabilities
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                session_labels.extend(entry.record.admin_labels.clone());
                out.push(Candidate {
                    site_id: entry.record.site_id.clone(),
                    session: *key,
                    manager_id: session.manager_id.clone(),
                    kind: scheduler::backend_kind(&session.capabilities),
                    labels: if session_labels.is_empty() {
                        labels.clone()
                    } else {
                        session_labels
                    },
                    capabilities: session.capabilities.clone(),
                    free,
                    slots,
                });
            }
        }
        out.sort_by(|a, b| a.site_id.cmp(&b.site_id).then(a.session.cmp(&b.session)));
        out
    }

    /// Sites that declined `job_id` as one they can never run.
    pub fn declined_by(&self, job_id: &str) -> Vec<String> {
        self.state()
            .declined
            .get(job_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Sends the lease of a job just placed (committed STAGING_IN) to the session chosen
    /// for it; if it cannot be sent, the placement is taken back at once.
    pub async fn lease(&self, site_id: &str, key: u64, job: &JobRecord) {
        let attempt = job.status.attempt;
        let spec = match self.store().run_spec(&job.job_id).await {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(job = %job.job_id, %error, "cannot read the job's spec to lease it");
                self.end_attempt(
                    job.job_id.as_str(),
                    attempt,
                    site_id,
                    JobState::Queued,
                    Reason::new(
                        v1::ReasonCode::Requeued,
                        format!("the lease could not be built: {error}"),
                    ),
                )
                .await;
                return;
            }
        };
        let site_store_id = {
            let state = self.state();
            state
                .sites
                .get(site_id)
                .and_then(|e| e.sessions.get(&key))
                .map(|s| s.capabilities.site_store_id.clone())
                .unwrap_or_default()
        };
        let command = v1::RunJobCommand {
            spec: Some(v1::JobSpec::from(&spec)),
            attempt,
            staging: self
                .inner
                .hub
                .as_ref()
                .map(|h| h.plan(&spec, attempt, &site_store_id)),
            lease_seconds: self.inner.config.sites.lease_seconds,
        };
        let sent = {
            let mut state = self.state();
            match state
                .sites
                .get_mut(site_id)
                .and_then(|e| e.sessions.get_mut(&key))
            {
                Some(session) if !session.close.is_cancelled() => {
                    session.leases.insert(
                        (job.job_id.to_string(), attempt),
                        Lease {
                            resources: resources_of(&spec),
                            sent_at: Instant::now(),
                            reported: false,
                        },
                    );
                    let sent = session.send(v1::hub_message::Message::RunJob(command));
                    if !sent {
                        session.leases.remove(&(job.job_id.to_string(), attempt));
                    }
                    sent
                }
                _ => false,
            }
        };
        if sent {
            tracing::info!(job = %job.job_id, attempt, site = %site_id, "job placed");
            return;
        }
        self.end_attempt(
            job.job_id.as_str(),
            attempt,
            site_id,
            JobState::Queued,
            Reason::new(
                v1::ReasonCode::Requeued,
                "the site's session closed before the lease reached it",
            ),
        )
        .await;
    }

    /// Ends an attempt placed at `site_id` from the hub's side: back to the queue (a new
    /// attempt) or to an end (LOST). Nothing happens if the job moved on meanwhile.
    async fn end_attempt(
        &self,
        job_id: &str,
        attempt: u32,
        site_id: &str,
        to: JobState,
        reason: Reason,
    ) -> Option<JobRecord> {
        let id = JobId::parse(job_id).ok()?;
        match self.store().get(&id).await {
            Ok(job)
                if job.status.attempt == attempt
                    && job
                        .status
                        .site
                        .as_ref()
                        .is_some_and(|s| s.site_id == site_id) => {}
            Ok(_) => return None,
            Err(error) => {
                tracing::warn!(job = %job_id, %error, "cannot read the job");
                return None;
            }
        }
        let transition = crate::state::Transition::Enter {
            to,
            reason,
            attempt: Some(attempt),
            site: None,
        };
        match self.store().transition(&id, transition, None).await {
            Ok(job) => {
                tracing::info!(job = %job_id, attempt, site = %site_id, state = %job.status.state,
                    reason = %job.status.reason.message, "attempt taken back from its site");
                if job.status.state == JobState::Queued {
                    self.nudge();
                }
                Some(job)
            }
            Err(Error::IllegalTransition { refusal, .. }) => {
                tracing::debug!(job = %job_id, attempt, %refusal, "the attempt moved on meanwhile");
                None
            }
            Err(error) => {
                tracing::warn!(job = %job_id, attempt, %error, "cannot take the attempt back");
                None
            }
        }
    }

    /// Applies the loss policy to the jobs placed at a site (with one manager, or with
    /// any).
    async fn apply_loss_policy(
        &self,
        site_id: &str,
        manager_id: Option<&str>,
        policy: LossPolicy,
        why: &str,
    ) {
        let jobs = match self.store().placed_at_site(site_id).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::error!(site = %site_id, %error, "cannot read the site's jobs; the loss policy waits for the next check");
                return;
            }
        };
        let jobs: Vec<JobRecord> = jobs
            .into_iter()
            .filter(|job| {
                manager_id
                    .is_none_or(|m| job.status.site.as_ref().is_some_and(|s| s.manager_id == m))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        tracing::warn!(site = %site_id, manager = ?manager_id, jobs = jobs.len(), ?policy, %why,
            "applying the site-loss policy");
        for job in jobs {
            let (to, reason) = match policy {
                LossPolicy::Wait => continue,
                LossPolicy::Requeue => (
                    JobState::Queued,
                    Reason::new(v1::ReasonCode::Requeued, format!("requeued: {why}")),
                ),
                LossPolicy::Fail => (
                    JobState::Lost,
                    Reason::new(v1::ReasonCode::SiteLost, why.to_owned()),
                ),
            };
            self.end_attempt(job.job_id.as_str(), job.status.attempt, site_id, to, reason)
                .await;
        }
    }

    // ---- Talking to sessions ----

    fn send_to(&self, site_id: &str, key: u64, message: v1::hub_message::Message) -> bool {
        let state = self.state();
        state
            .sites
            .get(site_id)
            .and_then(|e| e.sessions.get(&key))
            .is_some_and(|s| s.send(message))
    }

    fn send_to_manager(
        &self,
        site_id: &str,
        manager_id: &str,
        message: v1::hub_message::Message,
    ) -> bool {
        let state = self.state();
        state
            .sites
            .get(site_id)
            .and_then(|e| e.session_for(manager_id))
            .is_some_and(|s| s.send(message))
    }

    /// Any message from a session: its manager is alive.
    pub(crate) fn touch(&self, site_id: &str, key: u64) {
        let mut state = self.state();
        let Some(entry) = state.sites.get_mut(site_id) else {
            return;
        };
        let Some(manager) = entry.sessions.get(&key).map(|s| s.manager_id.clone()) else {
            return;
        };
        entry.touch(&manager);
    }

    /// A session heartbeat: answered with the hub's.
    pub(crate) fn on_heartbeat(&self, site_id: &str, key: u64) {
        {
            let mut state = self.state();
            if let Some(session) = state
                .sites
                .get_mut(site_id)
                .and_then(|e| e.sessions.get_mut(&key))
            {
                session.last_heartbeat = UnixMicros::now();
            }
        }
        self.send_to(
            site_id,
            key,
            v1::hub_message::Message::Heartbeat(v1::SessionHeartbeat {
                sent_at: Some(SystemTime::now().into()),
            }),
        );
    }

    /// New free capacity from a session: leases it has reported on are now counted by
    /// the site itself.
    pub(crate) fn on_capacity(&self, site_id: &str, key: u64, capacity: v1::CapacityUpdate) {
        {
            let mut state = self.state();
            let Some(entry) = state.sites.get_mut(site_id) else {
                return;
            };
            entry.record.capacity = Some(capacity);
            entry.dirty = true;
            if let Some(session) = entry.sessions.get_mut(&key) {
                session.capacity = capacity;
                session.leases.retain(|_, lease| !lease.reported);
                session.paused_until = None;
            }
        }
        self.nudge();
    }

    fn mark_reported(&self, site_id: &str, key: u64, job_id: &str, attempt: u32) {
        let mut state = self.state();
        if let Some(lease) = state
            .sites
            .get_mut(site_id)
            .and_then(|e| e.sessions.get_mut(&key))
            .and_then(|s| s.leases.get_mut(&(job_id.to_owned(), attempt)))
        {
            lease.reported = true;
        }
    }

    /// A status report: applied once through the store, then acknowledged (a report the
    /// store could not take is not acknowledged: the site sends it again). What the site
    /// holds that the hub has moved on from is removed.
    pub(crate) async fn on_status(&self, site_id: &str, key: u64, report: v1::StatusReport) {
        let Some(status) = report.status.clone() else {
            tracing::warn!(site = %site_id, "a status report without a status; ignoring");
            return;
        };
        let ack = v1::hub_message::Message::StatusAck(v1::StatusAck {
            job_id: status.job_id.clone(),
            attempt: status.attempt,
            up_to_sequence: report.sequence,
        });
        let outcome = match self.store().apply_report(site_id, &report).await {
            Ok(outcome) => outcome,
            Err(Error::InvalidArgument(error)) => {
                tracing::warn!(site = %site_id, %error, "a status report that can never apply; acknowledged and dropped");
                self.send_to(site_id, key, ack);
                return;
            }
            Err(error) => {
                tracing::warn!(site = %site_id, job = %status.job_id, %error,
                    "cannot store a status report; the site will send it again");
                return;
            }
        };
        self.send_to(site_id, key, ack);
        self.mark_reported(site_id, key, &status.job_id, status.attempt);
        let reported_terminal =
            v1::JobState::try_from(status.state).is_ok_and(v1::JobState::is_terminal);
        match outcome {
            ReportOutcome::Replay => {}
            ReportOutcome::Applied { job, changed } => {
                if changed {
                    self.state().declined.remove(job.job_id.as_str());
                    tracing::info!(job = %job.job_id, attempt = job.status.attempt, site = %site_id,
                        state = %job.status.state, "job state reported");
                }
                if job.status.state.is_terminal() && job.times.deleted.is_some() {
                    self.send_to(
                        site_id,
                        key,
                        remove(job.job_id.as_str(), job.status.attempt, true),
                    );
                }
            }
            ReportOutcome::Stale { job } => {
                tracing::info!(job = %status.job_id, attempt = status.attempt, site = %site_id,
                    current = ?job.as_ref().map(|j| j.status.attempt),
                    "a report on an attempt the hub has moved on from; telling the site to remove it");
                self.send_to(
                    site_id,
                    key,
                    remove(&status.job_id, status.attempt, job.is_none()),
                );
            }
            ReportOutcome::Ended { job } => {
                let deleted = job.times.deleted.is_some();
                if !reported_terminal || deleted {
                    self.send_to(
                        site_id,
                        key,
                        remove(&status.job_id, status.attempt, deleted),
                    );
                }
            }
        }
    }

    /// Log bytes for a relay.
    pub(crate) fn on_logs(&self, site_id: &str, key: u64, data: v1::LogData) {
        let Some(chunk) = data.chunk else {
            return;
        };
        let mut state = self.state();
        let Some(session) = state
            .sites
            .get_mut(site_id)
            .and_then(|e| e.sessions.get_mut(&key))
        else {
            return;
        };
        let Some(client) = session.logs.get(&data.request_id) else {
            return;
        };
        let eof = chunk.eof;
        let delivered = client.try_send(Ok(chunk));
        if delivered.is_err() {
            if let Some(client) = session.logs.remove(&data.request_id) {
                let _ = client.try_send(Err(Status::resource_exhausted(
                    "the log client reads too slowly; ask again",
                )));
            }
            session.send(v1::hub_message::Message::StopLogs(v1::StopLogsCommand {
                request_id: data.request_id,
            }));
        } else if eof {
            session.logs.remove(&data.request_id);
        }
    }

    /// A lease the site would not take: the job goes back to the queue (a new attempt,
    /// no failure counted), and the session gets no work for a while (no room) or for
    /// good (draining), or never this job again (unsupported).
    pub(crate) async fn on_declined(&self, site_id: &str, key: u64, declined: v1::LeaseDeclined) {
        let reason = declined.reason();
        {
            let mut state = self.state();
            if reason == v1::DeclineReason::Unsupported {
                let sites = state.declined.entry(declined.job_id.clone()).or_default();
                if !sites.iter().any(|s| s == site_id) {
                    sites.push(site_id.to_owned());
                }
            }
            let pause = Duration::from_secs(u64::from(self.inner.config.sites.heartbeat_seconds));
            if let Some(session) = state
                .sites
                .get_mut(site_id)
                .and_then(|e| e.sessions.get_mut(&key))
            {
                session
                    .leases
                    .remove(&(declined.job_id.clone(), declined.attempt));
                match reason {
                    v1::DeclineReason::Draining => session.draining = true,
                    v1::DeclineReason::Unsupported => {}
                    v1::DeclineReason::NoCapacity | v1::DeclineReason::Unspecified => {
                        session.paused_until = Some(Instant::now() + pause);
                    }
                }
            }
        }
        tracing::info!(job = %declined.job_id, attempt = declined.attempt, site = %site_id,
            ?reason, detail = %declined.message, "lease declined");
        self.end_attempt(
            &declined.job_id,
            declined.attempt,
            site_id,
            JobState::Queued,
            Reason::new(
                v1::ReasonCode::Requeued,
                format!(
                    "site `{site_id}` declined it ({}): {}",
                    reason.as_str_name(),
                    declined.message
                ),
            ),
        )
        .await;
    }

    /// Fresh broker grants for an attempt the site still runs under; a stale attempt
    /// gets none and is told to go.
    pub(crate) async fn on_grant_request(
        &self,
        site_id: &str,
        key: u64,
        request: v1::GrantRequest,
    ) {
        let Some(hub) = self.inner.hub.clone() else {
            tracing::warn!(site = %site_id, job = %request.job_id, "grants asked for, but no hub broker is configured");
            return;
        };
        let Ok(id) = JobId::parse(&request.job_id) else {
            return;
        };
        let job = match self.store().get(&id).await {
            Ok(job) => job,
            Err(Error::NotFound(_)) => {
                self.send_to(site_id, key, remove(&request.job_id, request.attempt, true));
                return;
            }
            Err(error) => {
                tracing::warn!(job = %request.job_id, %error, "cannot read the job for fresh grants");
                return;
            }
        };
        let current = job.status.attempt == request.attempt
            && !job.status.state.is_terminal()
            && job
                .status
                .site
                .as_ref()
                .is_some_and(|s| s.site_id == site_id);
        if !current {
            self.send_to(
                site_id,
                key,
                remove(&request.job_id, request.attempt, false),
            );
            return;
        }
        let Ok(spec) = JobSpec::try_from(job.spec.clone()) else {
            return;
        };
        let grants = hub.grants(&spec, request.attempt, request.direction());
        self.send_to(site_id, key, v1::hub_message::Message::Grants(grants));
    }

    /// The manager said goodbye: it is going away on purpose, and its jobs wait for it.
    pub(crate) fn on_goodbye(&self, site_id: &str, key: u64, message: &str) {
        let mut state = self.state();
        let Some(entry) = state.sites.get_mut(site_id) else {
            return;
        };
        let Some(session) = entry.sessions.get_mut(&key) else {
            return;
        };
        session.draining = true;
        let manager_id = session.manager_id.clone();
        if let Some(manager) = entry.managers.get_mut(&manager_id) {
            manager.goodbye = true;
        }
        tracing::info!(site = %site_id, manager = %manager_id, %message, "site manager said goodbye");
    }

    /// A complete reconcile report from a manager: what its backend really has, against
    /// what the hub placed with it.
    pub(crate) async fn reconcile(
        &self,
        site_id: &str,
        key: u64,
        manager_id: &str,
        since: UnixMicros,
        reported: Vec<v1::BackendJobStatus>,
    ) {
        let ids: Vec<String> = reported
            .iter()
            .map(|j| j.job_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let stored = match self.store().jobs_by_ids(&ids).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(site = %site_id, %error, "cannot reconcile the site's report");
                return;
            }
        };
        let mut present = HashSet::new();
        let (mut removed, mut cancels) = (0, 0);
        for held in &reported {
            present.insert((held.job_id.clone(), held.attempt));
            let held_terminal =
                v1::JobState::try_from(held.state).is_ok_and(v1::JobState::is_terminal);
            let Some(job) = stored.get(&held.job_id) else {
                // Purged or never the hub's: nothing of it should stay.
                self.send_to(site_id, key, remove(&held.job_id, held.attempt, true));
                removed += 1;
                continue;
            };
            let here = job
                .status
                .site
                .as_ref()
                .is_some_and(|s| s.site_id == site_id);
            if job.status.attempt != held.attempt || !here {
                // An attempt the hub has moved on from (requeued elsewhere meanwhile).
                self.send_to(site_id, key, remove(&held.job_id, held.attempt, false));
                removed += 1;
            } else if job.status.state.is_terminal() {
                let deleted = job.times.deleted.is_some();
                if !held_terminal || deleted {
                    // The hub gave up on it (or the client deleted it): it must not run on.
                    self.send_to(site_id, key, remove(&held.job_id, held.attempt, deleted));
                    removed += 1;
                }
            } else if job.status.cancel_requested {
                self.forward_cancel(job);
                cancels += 1;
            }
        }
        let placed = match self.store().placed_at_site(site_id).await {
            Ok(placed) => placed,
            Err(error) => {
                tracing::warn!(site = %site_id, %error, "cannot reconcile the site's report");
                return;
            }
        };
        let missing: Vec<JobRecord> = placed
            .into_iter()
            .filter(|job| {
                job.status
                    .site
                    .as_ref()
                    .is_some_and(|s| s.manager_id == manager_id)
            })
            // Placed before this session opened (a lease sent since may not be in the
            // report yet) and not held by the site.
            .filter(|job| job.times.staging_in.is_some_and(|at| at < since))
            .filter(|job| !present.contains(&(job.job_id.to_string(), job.status.attempt)))
            .collect();
        tracing::info!(site = %site_id, manager = %manager_id, held = reported.len(), removed,
            cancels, missing = missing.len(), "site reconciled");
        for job in missing {
            let (to, reason) = match self.inner.config.sites.loss_policy {
                LossPolicy::Fail => (
                    JobState::Lost,
                    Reason::new(
                        v1::ReasonCode::SiteLost,
                        format!(
                            "site `{site_id}` no longer has attempt {}",
                            job.status.attempt
                        ),
                    ),
                ),
                // Waiting is pointless: the site says it does not have the job.
                LossPolicy::Wait | LossPolicy::Requeue => (
                    JobState::Queued,
                    Reason::new(
                        v1::ReasonCode::Requeued,
                        format!(
                            "requeued: site `{site_id}` no longer has attempt {}",
                            job.status.attempt
                        ),
                    ),
                ),
            };
            self.end_attempt(job.job_id.as_str(), job.status.attempt, site_id, to, reason)
                .await;
        }
    }

    /// A session ended (the site closed it, the connection broke, or the hub closed it):
    /// its log relays end, its leases stop counting against it, and a site all of whose
    /// managers said goodbye is DISCONNECTED. The status is what the stream ends with.
    pub(crate) async fn session_closed(
        &self,
        site_id: &str,
        key: u64,
    ) -> Option<(Outbound, Option<Status>)> {
        let (ended, disconnected) = {
            let mut state = self.state();
            let entry = state.sites.get_mut(site_id)?;
            let session = entry.sessions.remove(&key)?;
            for (_, client) in session.logs {
                let _ = client.try_send(Err(Status::unavailable(
                    "the site's session closed; ask again once it reconnects",
                )));
            }
            let all_said_goodbye = entry.sessions.is_empty()
                && entry.managers.values().all(|m| m.goodbye || m.lost)
                && entry.managers.values().any(|m| m.goodbye);
            let disconnected = all_said_goodbye && entry.record.health == SiteHealth::Connected;
            if disconnected {
                entry.record.health = SiteHealth::Disconnected;
            }
            tracing::info!(site = %site_id, manager = %session.manager_id, session = %session.id,
                "site session closed");
            (Some((session.tx, session.end)), disconnected)
        };
        if disconnected
            && let Err(error) = self
                .store()
                .set_site_health(site_id, SiteHealth::Disconnected)
                .await
        {
            tracing::warn!(site = %site_id, %error, "cannot record the site's health");
        }
        ended
    }

    // ---- The monitor ----

    /// The registry's own loop, until the coordinator stops: managers silent too long
    /// are lost (their jobs follow the policy), leases never answered are taken back,
    /// liveness is written in batches, and unused uploads expire.
    pub async fn monitor(self) {
        let heartbeat = Duration::from_secs(u64::from(self.inner.config.sites.heartbeat_seconds));
        let tick = (heartbeat / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.inner.stop.cancelled() => break,
            }
            if let Some(hub) = &self.inner.hub {
                hub.learn_store_id().await;
            }
            self.check_liveness().await;
            self.check_leases().await;
            self.flush_liveness().await;
            if last_sweep.elapsed() >= UPLOAD_SWEEP {
                last_sweep = Instant::now();
                self.expire_uploads().await;
            }
        }
        self.flush_liveness().await;
        tracing::debug!("site monitor stopped");
    }

    async fn check_liveness(&self) {
        let limit = self.inner.config.sites.unreachable_after();
        let now = Instant::now();
        let mut lost = Vec::new();
        let mut unreachable = Vec::new();
        {
            let mut state = self.state();
            for entry in state.sites.values_mut() {
                if entry.record.health == SiteHealth::Revoked {
                    continue;
                }
                let site_id = entry.record.site_id.clone();
                for (manager_id, manager) in &mut entry.managers {
                    if manager.goodbye || manager.lost || now - manager.last_seen <= limit {
                        continue;
                    }
                    manager.lost = true;
                    lost.push((site_id.clone(), manager_id.clone()));
                }
                for (_, manager_id) in lost.iter().filter(|(s, _)| *s == site_id) {
                    for session in entry
                        .sessions
                        .values_mut()
                        .filter(|s| s.manager_id == *manager_id)
                    {
                        session.shut(Status::unavailable("no heartbeat within the limit"));
                    }
                }
                let alive = entry.managers.values().any(|m| !m.lost && !m.goodbye);
                let any_lost = entry.managers.values().any(|m| m.lost);
                if !alive && any_lost && entry.record.health != SiteHealth::Unreachable {
                    entry.record.health = SiteHealth::Unreachable;
                    unreachable.push(site_id);
                }
            }
        }
        for site_id in &unreachable {
            tracing::warn!(site = %site_id, after_s = limit.as_secs(), "site unreachable");
            if let Err(error) = self
                .store()
                .set_site_health(site_id, SiteHealth::Unreachable)
                .await
            {
                tracing::warn!(site = %site_id, %error, "cannot record the site's health");
            }
        }
        let policy = self.inner.config.sites.loss_policy;
        for (site_id, manager_id) in lost {
            let why = format!(
                "site `{site_id}` (manager `{manager_id}`) stopped answering for {} s",
                limit.as_secs()
            );
            self.apply_loss_policy(&site_id, Some(&manager_id), policy, &why)
                .await;
        }
    }

    async fn check_leases(&self) {
        let limit = Duration::from_secs(u64::from(self.inner.config.sites.lease_seconds));
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut state = self.state();
            for entry in state.sites.values_mut() {
                for (key, session) in &mut entry.sessions {
                    let stale: Vec<(String, u32)> = session
                        .leases
                        .iter()
                        .filter(|(_, lease)| !lease.reported && now - lease.sent_at > limit)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in stale {
                        session.leases.remove(&id);
                        session.send(remove(&id.0, id.1, false));
                        expired.push((entry.record.site_id.clone(), *key, id));
                    }
                }
            }
        }
        for (site_id, _, (job_id, attempt)) in expired {
            self.end_attempt(
                &job_id,
                attempt,
                &site_id,
                JobState::Queued,
                Reason::new(
                    v1::ReasonCode::Requeued,
                    format!(
                        "site `{site_id}` did not answer the lease within {} s",
                        limit.as_secs()
                    ),
                ),
            )
            .await;
        }
    }

    async fn flush_liveness(&self) {
        let seen: Vec<(String, UnixMicros, Option<v1::CapacityUpdate>)> = {
            let mut state = self.state();
            state
                .sites
                .values_mut()
                .filter(|e| e.dirty)
                .filter_map(|e| {
                    e.dirty = false;
                    let at = e.seen_at?;
                    e.record.last_seen_at = Some(at);
                    Some((e.record.site_id.clone(), at, e.record.capacity))
                })
                .collect()
        };
        if let Err(error) = self.store().record_site_liveness(&seen).await {
            tracing::warn!(%error, sites = seen.len(), "cannot record when sites were last seen");
        }
    }

    async fn expire_uploads(&self) {
        let expired = match self.store().expired_uploads(UnixMicros::now(), 100).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "cannot look for expired uploads");
                return;
            }
        };
        for upload in expired {
            if let Some(hub) = &self.inner.hub {
                let deleted = async {
                    let mut client = hub.client_for(&[upload.hub_path.as_str()])?;
                    client
                        .raw()
                        .delete(v1::DeleteRequest {
                            path: upload.hub_path.clone(),
                            must_exist: false,
                        })
                        .await
                        .map_err(|s| Error::Unavailable(s.message().to_owned()))?;
                    Ok::<_, Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(30), deleted).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(upload = %upload.upload_id, %error, "cannot remove an expired upload at the hub broker; trying again later");
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            match self.store().forget_upload(&upload.upload_id).await {
                Ok(true) => tracing::info!(upload = %upload.upload_id, "unused upload expired"),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(upload = %upload.upload_id, %error, "cannot forget an expired upload")
                }
            }
        }
    }
}

fn remove(job_id: &str, attempt: u32, staging_area: bool) -> v1::hub_message::Message {
    v1::hub_message::Message::RemoveJob(v1::RemoveJobCommand {
        job_id: job_id.to_owned(),
        attempt,
        remove_staging_area: staging_area,
    })
}

/// A job's log as its site relays it; dropping it stops the relay.
pub struct LogFollow {
    rx: mpsc::Receiver<Result<v1::LogChunk, Status>>,
    registry: Registry,
    site_id: String,
    key: u64,
    request_id: u64,
}

impl Stream for LogFollow {
    type Item = Result<v1::LogChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for LogFollow {
    fn drop(&mut self) {
        self.registry
            .stop_logs(&self.site_id, self.key, self.request_id);
    }
}

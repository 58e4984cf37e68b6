//! The broker's gRPC face: checks each request at the door (credentials, paths, sizes),
//! then hands the work to the store and the transfer protocol on blocking threads.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use dispatch_proto::v1 as pb;
use pb::broker_server::Broker;

use dispatch_service::InFlight;

use crate::config::BrokerConfig;
use crate::error::{Error, Result};
use crate::grant::{Access, Grant, GrantKey};
use crate::path::StorePath;
use crate::receive::{Incoming, Landing};
use crate::stage;
use crate::store::{self, ExistingPolicy, Source, Store};
use crate::tar_encode::survey;
use crate::transfer::{
    ChunkSource, Compression, Receiver, TransferParams, chunk_size_from_wire, seal,
};

/// How often an upload reports progress, in stream bytes.
const PROGRESS_BYTES: u64 = 64 << 20;
/// Default and largest page of a listing.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs blocking work (filesystem, hashing) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Server(format!("worker failed: {e}")))?
}

/// Parses a path from a request field; the root only where `allow_root`.
pub(crate) fn parse_path(field: &str, raw: &str, allow_root: bool) -> Result<StorePath> {
    let path = StorePath::from_api(raw).map_err(|reason| Error::InvalidPath {
        field: field.to_owned(),
        path: raw.to_owned(),
        reason,
    })?;
    if path.is_root() && !allow_root {
        return Err(Error::invalid(
            field,
            "must name a path below the store's root",
        ));
    }
    store::check_not_reserved(field, &path)?;
    Ok(path)
}

/// Parses the source of a download.
pub(crate) fn parse_source(source: Option<pb::TreeSource>) -> Result<Source> {
    match source.and_then(|s| s.source) {
        Some(pb::tree_source::Source::Tree(tree)) => Ok(Source::Tree {
            path: parse_path("source.tree.path", &tree.path, true)?,
            skip_chrislinks: tree.skip_chrislinks,
        }),
        Some(pb::tree_source::Source::JobInputs(inputs)) => {
            parse_job_inputs("source.job_inputs", &inputs)
        }
        None => Err(Error::invalid(
            "source",
            "is required: give `tree` or `job_inputs`",
        )),
    }
}

/// Parses a job's input description.
pub(crate) fn parse_job_inputs(field: &str, inputs: &pb::JobInputs) -> Result<Source> {
    if inputs.input_dirs.is_empty() {
        return Err(Error::invalid(
            format!("{field}.input_dirs"),
            "needs at least one input dir",
        ));
    }
    let input_dirs = inputs
        .input_dirs
        .iter()
        .map(|dir| parse_path(&format!("{field}.input_dirs"), dir, false))
        .collect::<Result<Vec<_>>>()?;
    let output_dir = parse_path(&format!("{field}.output_dir"), &inputs.output_dir, false)?;
    Ok(Source::JobInputs {
        input_dirs,
        output_dir,
    })
}

/// Who may do what: grants checked with a key, or everyone may do everything.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Requests need a grant signed with this key.
    Grants(GrantKey),
    /// No checks (a private loopback broker).
    Open,
}

impl Auth {
    /// The grant presented in `authorization: Bearer <token>`.
    pub fn authorize(&self, metadata: &MetadataMap) -> Result<Grant> {
        match self {
            Auth::Open => Ok(Grant {
                sub: "anonymous".into(),
                read: vec![],
                write: vec![String::new()],
                exp: u64::MAX,
            }),
            Auth::Grants(key) => {
                let header = metadata.get("authorization").ok_or_else(|| {
                    Error::Unauthenticated(
                        "missing `authorization: Bearer <grant>` metadata".into(),
                    )
                })?;
                let token = header
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Error::Unauthenticated(
                            "the authorization metadata must be `Bearer <grant>`".into(),
                        )
                    })?;
                key.verify(token.trim())
            }
        }
    }
}

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    auth: Auth,
    config: Arc<BrokerConfig>,
    /// Transfers being received right now: one connection per transfer at a time.
    active: Mutex<HashSet<String>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    in_flight: InFlight,
}

/// Holds a transfer id in the active set until dropped.
struct Claim {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut active) = self.inner.active.lock() {
            active.remove(&self.id);
        }
    }
}

impl BrokerService {
    /// A service over `store`; `shutdown` tells long transfers to checkpoint and stop, and
    /// `tasks` tracks them so the server can wait for them.
    pub fn new(
        store: Arc<dyn Store>,
        auth: Auth,
        config: Arc<BrokerConfig>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        in_flight: InFlight,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                auth,
                config,
                active: Mutex::new(HashSet::new()),
                shutdown,
                tasks,
                in_flight,
            }),
        }
    }

    fn claim(&self, id: &str) -> Result<Claim> {
        let mut active = self
            .inner
            .active
            .lock()
            .map_err(|_| Error::Server("transfer registry poisoned".into()))?;
        if !active.insert(id.to_owned()) {
            return Err(Error::Busy(id.to_owned()));
        }
        Ok(Claim {
            inner: self.inner.clone(),
            id: id.to_owned(),
        })
    }
}

/// Receives an upload on a blocking thread and tells the client how it went.
fn land_upload(
    landing: &Landing,
    receiver: Receiver,
    work: mpsc::Receiver<Incoming>,
    replies: &mpsc::Sender<Result<pb::UploadResponse, Status>>,
) {
    let reply = |message| {
        replies.blocking_send(Ok(pb::UploadResponse {
            message: Some(message),
        }))
    };
    let mut reported = receiver.next_offset();
    let progress = |offset: u64| {
        if offset - reported >= PROGRESS_BYTES {
            reported = offset;
            let _ = reply(pb::upload_response::Message::Progress(pb::UploadProgress {
                committed_offset: offset,
            }));
        }
    };
    match landing.receive(receiver, work, progress) {
        Ok(Some(summary)) => {
            tracing::info!(
                transfer = %landing.transfer_id, destination = %landing.destination, files = summary.counts.files,
                bytes = summary.stream_bytes, digest = %summary.digest_hex(), "upload committed"
            );
            let committed = pb::UploadCommitted {
                summary: Some(summary.to_wire()),
                destination: landing.destination.to_string(),
            };
            let _ = reply(pb::upload_response::Message::Committed(committed));
        }
        Ok(None) => {
            tracing::info!(transfer = %landing.transfer_id, "upload interrupted; it can be resumed")
        }
        Err(error) => {
            tracing::warn!(transfer = %landing.transfer_id, %error, "upload failed");
            let _ = replies.blocking_send(Err(error.into()));
        }
    }
}

/// Reads the client's messages and passes them to the blocking worker.
async fn forward_upload(
    mut inbound: Streaming<pb::UploadRequest>,
    work: mpsc::Sender<Incoming>,
    replies: mpsc::Sender<Result<pb::UploadResponse, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => {
                let _ = replies.send(Err(Error::ShuttingDown.into())).await;
                return;
            }
            message = inbound.message() => message,
        };
        let item = match message {
            Ok(Some(pb::UploadRequest {
                message: Some(pb::upload_request::Message::Chunk(chunk)),
            })) => Incoming::Chunk(chunk),
            Ok(Some(pb::UploadRequest {
                message: Some(pb::upload_request::Message::Commit(commit)),
            })) => {
                let finish = Incoming::Finish {
                    stream_bytes: commit.stream_bytes,
                    digest: commit.tree_digest,
                    skipped: 0,
                };
                let _ = work.send(finish).await;
                return;
            }
            Ok(Some(_)) => {
                let error = Error::invalid(
                    "message",
                    "after `open`, send only `chunk` messages and then `commit`",
                );
                let _ = replies.send(Err(error.into())).await;
                return;
            }
            // The client closed or the connection dropped: the worker checkpoints.
            Ok(None) | Err(_) => return,
        };
        if work.send(item).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    type UploadStream = ResponseStream<pb::UploadResponse>;
    type DownloadStream = ResponseStream<pb::DownloadResponse>;
    type StageInStream = ResponseStream<pb::StageProgress>;
    type StageOutStream = ResponseStream<pb::StageProgress>;

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::UploadRequest {
                message: Some(pb::upload_request::Message::Open(open)),
            }) => open,
            _ => {
                return Err(Error::invalid(
                    "open",
                    "the first message of an upload must be `open`",
                )
                .into());
            }
        };
        let destination = parse_path("open.destination", &open.destination, false)?;
        grant.check(Access::Write, &destination)?;
        let chunk_size =
            chunk_size_from_wire(open.chunk_size, self.inner.config.default_chunk_size)?;
        let compression = Compression::from_wire(open.compression)?;
        let policy = match pb::ExistingPolicy::try_from(open.existing) {
            Ok(pb::ExistingPolicy::Unspecified | pb::ExistingPolicy::Fail) => ExistingPolicy::Fail,
            Ok(pb::ExistingPolicy::Replace) => ExistingPolicy::Replace,
            Err(_) => {
                return Err(Error::invalid(
                    "open.existing",
                    format!("unknown value {}", open.existing),
                )
                .into());
            }
        };
        let transfer_id = if open.transfer_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            store::check_transfer_id(&open.transfer_id)?;
            open.transfer_id
        };
        let claim = self.claim(&transfer_id)?;
        let params = TransferParams {
            destination: destination.as_str().to_owned(),
            chunk_size,
            compression,
        };
        let (store, limits, id) = (
            self.inner.store.clone(),
            self.inner.config.limits,
            transfer_id.clone(),
        );
        let checkpoint_bytes = self.inner.config.checkpoint_bytes;
        let receiver = blocking(move || {
            let mut receiver = Receiver::open(&store.transfer_area(&id)?, params, limits)?;
            receiver.set_checkpoint_bytes(checkpoint_bytes);
            Ok(receiver)
        })
        .await?;
        tracing::info!(transfer = %transfer_id, destination = %destination, subject = %grant.sub,
            resume_offset = receiver.next_offset(), "upload opened");

        let (replies, stream) = mpsc::channel(16);
        let accepted = pb::UploadAccepted {
            transfer_id: transfer_id.clone(),
            resume_offset: receiver.next_offset(),
            chunk_size,
        };
        let _ = replies
            .send(Ok(pb::UploadResponse {
                message: Some(pb::upload_response::Message::Accepted(accepted)),
            }))
            .await;

        let landing = Landing {
            store: self.inner.store.clone(),
            transfer_id,
            destination,
            policy,
            sync: self.inner.config.sync_on_commit,
        };
        let (work_tx, work_rx) = mpsc::channel(4);
        let worker_replies = replies.clone();
        let failure_replies = replies.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let worker = tokio::task::spawn_blocking(move || {
                land_upload(&landing, receiver, work_rx, &worker_replies)
            });
            forward_upload(inbound, work_tx, replies, shutdown).await;
            if let Err(failure) = worker.await {
                // A bug, not bad input: say so rather than leave the client waiting.
                tracing::error!(transfer = %claim.id, %failure, "upload worker failed");
                let status =
                    Status::internal("the broker failed while applying this upload; see its log");
                let _ = failure_replies.send(Err(status)).await;
            }
            drop(claim);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let request = request.into_inner();
        let source = parse_source(request.source)?;
        for path in source.read_paths() {
            grant.check(Access::Read, path)?;
        }
        let chunk_size =
            chunk_size_from_wire(request.chunk_size, self.inner.config.default_chunk_size)?;
        let compression = Compression::from_wire(request.compression)?;
        let (replies, stream) = mpsc::channel(8);
        let download = Download {
            store: self.inner.store.clone(),
            source,
            offset: request.offset,
            chunk_size,
            compression,
            expected_version: request.expected_source_version,
            shutdown: self.inner.shutdown.clone(),
        };
        let tasks = self.inner.tasks.clone();
        tasks.spawn_blocking(move || {
            if let Err(error) = download.send(&replies) {
                tracing::warn!(%error, "download failed");
                let _ = replies.blocking_send(Err(error.into()));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let path = parse_path("path", &request.get_ref().path, true)?;
        grant.check(Access::Read, &path)?;
        let store = self.inner.store.clone();
        let info = blocking(move || store.stat(&path)).await?;
        Ok(Response::new(pb::StatResponse {
            exists: info.is_some(),
            entry: info.map(entry_to_wire),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let request = request.into_inner();
        let path = parse_path("path", &request.path, true)?;
        grant.check(Access::Read, &path)?;
        let page = request.page.unwrap_or_default();
        let limit = match page.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let skip: u64 = if page.page_token.is_empty() {
            0
        } else {
            page.page_token.parse().map_err(|_| {
                Error::invalid("page.page_token", "is not a token this broker issued")
            })?
        };
        let store = self.inner.store.clone();
        let recursive = request.recursive;
        let entries = blocking(move || store.list(&path, recursive, skip, limit)).await?;
        let next_page_token = if entries.len() == limit {
            (skip + limit as u64).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListResponse {
            entries: entries.into_iter().map(entry_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let request = request.into_inner();
        let path = parse_path("path", &request.path, false)?;
        grant.check(Access::Write, &path)?;
        let store = self.inner.store.clone();
        let must_exist = request.must_exist;
        let summary = blocking(move || {
            if must_exist && store.stat(&path)?.is_none() {
                return Err(Error::NotFound(path.to_string()));
            }
            store.delete(&path)
        })
        .await?;
        Ok(Response::new(pb::DeleteResponse {
            removed_entries: summary.removed_entries,
            removed_bytes: summary.removed_bytes,
        }))
    }

    async fn stage_in(
        &self,
        request: Request<pb::StageInRequest>,
    ) -> Result<Response<Self::StageInStream>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let plan = stage::StageIn::from_request(request.into_inner())?;
        grant.check(Access::Write, &plan.destination)?;
        Ok(Response::new(self.run_stage(stage::Plan::In(plan))))
    }

    async fn stage_out(
        &self,
        request: Request<pb::StageOutRequest>,
    ) -> Result<Response<Self::StageOutStream>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let plan = stage::StageOut::from_request(request.into_inner())?;
        grant.check(Access::Read, &plan.source)?;
        Ok(Response::new(self.run_stage(stage::Plan::Out(plan))))
    }

    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::BrokerInfo>, Status> {
        let _call = self.inner.in_flight.enter();
        self.inner.auth.authorize(request.metadata())?;
        let config = &self.inner.config;
        Ok(Response::new(pb::BrokerInfo {
            store_id: self.inner.store.id().to_owned(),
            store_root: self.inner.store.root().display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            limits: Some(pb::ArchiveLimits {
                max_total_bytes: config.limits.max_total_bytes,
                max_entries: config.limits.max_entries,
                max_expansion_ratio: config.limits.max_expansion_ratio,
                max_path_bytes: config.limits.max_path_bytes,
            }),
            default_chunk_size: config.default_chunk_size,
        }))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        let _call = self.inner.in_flight.enter();
        let grant = self.inner.auth.authorize(request.metadata())?;
        let path = parse_path("path", &request.get_ref().path, true)?;
        let access = if request.get_ref().write {
            Access::Write
        } else {
            Access::Read
        };
        grant.check(access, &path)?;
        Ok(Response::new(pb::CheckAccessResponse {}))
    }
}

impl BrokerService {
    fn run_stage(&self, plan: stage::Plan) -> ResponseStream<pb::StageProgress> {
        let (progress, stream) = mpsc::channel(16);
        let store = self.inner.store.clone();
        let shutdown = self.inner.shutdown.clone();
        let limits = self.inner.config.limits;
        let sync = self.inner.config.sync_on_commit;
        self.inner.tasks.spawn(async move {
            let context = stage::Context {
                store,
                limits,
                sync,
                shutdown,
                progress: progress.clone(),
            };
            if let Err(error) = plan.run(context).await {
                tracing::warn!(%error, "stage failed");
                let _ = progress.send(Err(error.into())).await;
            }
        });
        Box::pin(ReceiverStream::new(stream))
    }
}

fn entry_to_wire(info: store::EntryInfo) -> pb::Entry {
    let kind = match info.kind {
        store::EntryInfoKind::File => pb::EntryKind::File,
        store::EntryInfoKind::Directory => pb::EntryKind::Directory,
        store::EntryInfoKind::Symlink => pb::EntryKind::Symlink,
        store::EntryInfoKind::Other => pb::EntryKind::Other,
    };
    pb::Entry {
        path: info.path.to_string(),
        kind: kind as i32,
        size: info.size,
        modified_unix: info.modified_unix,
    }
}

/// One download, run on a blocking thread.
struct Download {
    store: Arc<dyn Store>,
    source: Source,
    offset: u64,
    chunk_size: u32,
    compression: Compression,
    expected_version: String,
    shutdown: CancellationToken,
}

impl Download {
    fn send(self, replies: &mpsc::Sender<Result<pb::DownloadResponse, Status>>) -> Result<()> {
        let send = |message| {
            replies
                .blocking_send(Ok(pb::DownloadResponse {
                    message: Some(message),
                }))
                .is_ok()
        };
        let surveyed = survey(self.store.walk(&self.source)?)?;
        if !self.expected_version.is_empty() && self.expected_version != surveyed.version {
            return Err(Error::SourceChanged(describe(&self.source)));
        }
        if !self.offset.is_multiple_of(u64::from(self.chunk_size))
            || self.offset > surveyed.stream_bytes
        {
            return Err(Error::invalid(
                "offset",
                format!(
                    "{} is not a chunk boundary within the stream of {} bytes",
                    self.offset, surveyed.stream_bytes
                ),
            ));
        }
        let header = pb::DownloadHeader {
            source_version: surveyed.version.clone(),
            stream_bytes: surveyed.stream_bytes,
            entries: surveyed.entries,
            chunk_size: self.chunk_size,
        };
        if !send(pb::download_response::Message::Header(header)) {
            return Ok(());
        }
        let mut chunks = ChunkSource::new(self.store.walk(&self.source)?, self.chunk_size);
        chunks.skip_to(self.offset)?;
        while let Some(chunk) = chunks.next_chunk()? {
            if self.shutdown.is_cancelled() {
                return Err(Error::ShuttingDown);
            }
            if !send(pb::download_response::Message::Chunk(seal(
                &chunk,
                self.compression,
            )?)) {
                // The client went away; it resumes with a new request.
                return Ok(());
            }
        }
        let summary = chunks.summary();
        if summary.stream_bytes != surveyed.stream_bytes {
            return Err(Error::SourceChanged(describe(&self.source)));
        }
        send(pb::download_response::Message::Trailer(summary.to_wire()));
        Ok(())
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::Tree { path, .. } => path.to_string(),
        Source::JobInputs { input_dirs, .. } => input_dirs
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

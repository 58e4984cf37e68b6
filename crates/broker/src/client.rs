//! A client for a broker: uploads and downloads trees with the transfer protocol, and
//! resumes them across dropped connections and broker restarts until they are verified.
//!
//! It is what a site broker uses to reach the hub broker, what the `dispatch` CLI uses,
//! and what tests use as a real user would.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use dispatch_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::path::StorePath;
use crate::receive::{Incoming, Landing};
use crate::service::blocking;
use crate::store::{ExistingPolicy, Source, Store};
use crate::transfer::{ChunkSource, Compression, Receiver, TransferParams, TreeSummary, seal};

/// Largest message either side sends (a chunk of the largest size plus framing).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Adds the grant to every request.
#[derive(Clone)]
pub struct GrantInterceptor {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for GrantInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// The generated client with the grant attached.
pub type RawClient = pb::broker_client::BrokerClient<InterceptedService<Channel, GrantInterceptor>>;

/// How a transfer is run.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Names the transfer so a later call (after this process died, say) resumes it;
    /// `None` picks a fresh one.
    pub transfer_id: Option<String>,
    /// Wire compression.
    pub compression: Compression,
    /// Chunk size; 0 means the server's default.
    pub chunk_size: u32,
    /// Replace what is at the destination.
    pub replace: bool,
    /// Attempts before giving up on a transfer that keeps failing for retryable reasons.
    pub max_attempts: u32,
    /// First wait between attempts; doubles up to 5 s.
    pub retry_delay: Duration,
    /// Stops the transfer (it stays resumable).
    pub cancel: CancellationToken,
    /// Flush the destination's filesystem before reporting a download done.
    pub sync: bool,
    /// Caps the rate, in stream bytes per second, so a transfer does not take a shared
    /// link whole (like rsync's `--bwlimit`).
    pub max_bytes_per_second: Option<u64>,
}

/// Paces a stream to a rate: how long to wait before sending the next bytes.
struct Pacer {
    rate: Option<u64>,
    started: std::time::Instant,
    sent: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Self {
            rate: rate.filter(|r| *r > 0),
            started: std::time::Instant::now(),
            sent: 0,
        }
    }

    /// Records `bytes` sent; returns how long to wait to stay under the rate.
    fn pace(&mut self, bytes: u64) -> Duration {
        self.sent += bytes;
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
        due.saturating_sub(self.started.elapsed())
    }
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            transfer_id: None,
            compression: Compression::None,
            chunk_size: 0,
            replace: false,
            max_attempts: 20,
            retry_delay: Duration::from_millis(100),
            cancel: CancellationToken::new(),
            max_bytes_per_second: None,
            sync: true,
        }
    }
}

/// Where a transfer is: stream bytes done of the total (0 while unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the tar stream verified so far.
    pub done: u64,
    /// Length of the tar stream, or 0.
    pub total: u64,
    /// Times the transfer was resumed.
    pub resumes: u32,
}

impl Progress {
    /// Nothing done yet.
    pub const NONE: Progress = Progress {
        done: 0,
        total: 0,
        resumes: 0,
    };
}

/// Called as a transfer moves; must be cheap.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a finished transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOutcome {
    /// Its id (to quote in logs).
    pub transfer_id: String,
    /// What arrived, verified.
    pub summary: TreeSummary,
    /// Times it was resumed after a failure.
    pub resumes: u32,
    /// Offset each attempt started at: the first is 0 unless an earlier call was resumed.
    pub attempt_offsets: Vec<u64>,
}

/// The attempts of one transfer: decides after each whether to resume, and when.
struct Attempts<'a> {
    options: &'a TransferOptions,
    what: &'static str,
    transfer_id: String,
    /// Offset each attempt that reached the broker started at.
    offsets: Vec<u64>,
    /// Attempts made, including those that never reached the broker.
    made: u32,
    delay: Duration,
}

impl<'a> Attempts<'a> {
    fn new(options: &'a TransferOptions, what: &'static str) -> Self {
        Self {
            options,
            what,
            transfer_id: options
                .transfer_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            offsets: Vec::new(),
            made: 0,
            delay: options.retry_delay,
        }
    }

    /// Given an attempt's result (`None`: cancelled), ends the transfer or waits before
    /// the next attempt.
    async fn settle(
        &mut self,
        result: Option<Result<TreeSummary>>,
    ) -> ControlFlow<Result<TransferOutcome>> {
        let error = match result {
            None => return ControlFlow::Break(Err(Error::Cancelled)),
            Some(Ok(summary)) => {
                return ControlFlow::Break(Ok(TransferOutcome {
                    transfer_id: std::mem::take(&mut self.transfer_id),
                    summary,
                    resumes: self.offsets.len().saturating_sub(1) as u32,
                    attempt_offsets: std::mem::take(&mut self.offsets),
                }));
            }
            Some(Err(error)) => error,
        };
        self.made += 1;
        if !error.is_retryable() || self.made >= self.options.max_attempts {
            return ControlFlow::Break(Err(error));
        }
        tracing::info!(transfer = %self.transfer_id, %error, "{} interrupted; resuming", self.what);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        ControlFlow::Continue(())
    }
}

/// A connection to one broker.
#[derive(Clone)]
pub struct BrokerClient {
    raw: RawClient,
}

/// A peer's error as ours, keeping whether it is worth retrying.
fn from_status(status: Status) -> Error {
    let retryable = matches!(
        status.code(),
        Code::Unavailable
            | Code::Aborted
            | Code::DataLoss
            | Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
    ) || (status.code() == Code::Internal && status.message().contains("h2"));
    if retryable {
        Error::Peer(format!("{} ({:?})", status.message(), status.code()))
    } else {
        Error::Remote {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl BrokerClient {
    /// A client for the broker at `uri`, presenting `grant`. Connects lazily, and
    /// reconnects by itself after the broker restarts.
    pub fn connect(uri: &str, grant: Option<&str>) -> Result<Self> {
        let endpoint = Endpoint::from_shared(uri.to_owned())
            .map_err(|e| Error::invalid("uri", format!("`{uri}` is not a valid URI: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20);
        let header = grant
            .map(|grant| format!("Bearer {grant}").parse())
            .transpose()
            .map_err(|_| Error::invalid("grant", "contains characters not allowed in a header"))?;
        let channel = endpoint.connect_lazy();
        let raw =
            pb::broker_client::BrokerClient::with_interceptor(channel, GrantInterceptor { header })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { raw })
    }

    /// The generated client, for calls this type does not wrap.
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.raw
    }

    /// The broker's identity and limits.
    pub async fn info(&mut self) -> Result<pb::BrokerInfo> {
        Ok(self
            .raw
            .get_info(pb::GetInfoRequest {})
            .await
            .map_err(from_status)?
            .into_inner())
    }

    /// Asks whether our grant allows reading (or writing) `path` there.
    pub async fn check_access(&mut self, path: &str, write: bool) -> Result<()> {
        self.raw
            .check_access(pb::CheckAccessRequest {
                path: path.to_owned(),
                write,
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    /// Sends the tree `source` of the local `store` to `destination` on the broker,
    /// resuming across failures until it is committed there.
    pub async fn upload(
        &mut self,
        store: Arc<dyn Store>,
        source: Source,
        destination: &str,
        options: &TransferOptions,
        progress: Option<ProgressFn>,
    ) -> Result<TransferOutcome> {
        let mut attempts = Attempts::new(options, "upload");
        loop {
            let attempt = self.upload_once(
                &store,
                &source,
                destination,
                &attempts.transfer_id,
                options,
                progress.clone(),
                &mut attempts.offsets,
            );
            let result = tokio::select! {
                result = attempt => Some(result),
                () = options.cancel.cancelled() => None,
            };
            if let ControlFlow::Break(outcome) = attempts.settle(result).await {
                return outcome;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_once(
        &mut self,
        store: &Arc<dyn Store>,
        source: &Source,
        destination: &str,
        transfer_id: &str,
        options: &TransferOptions,
        progress: Option<ProgressFn>,
        attempt_offsets: &mut Vec<u64>,
    ) -> Result<TreeSummary> {
        let (requests, outbound) = mpsc::channel(4);
        let existing = if options.replace {
            pb::ExistingPolicy::Replace
        } else {
            pb::ExistingPolicy::Fail
        };
        let open = pb::UploadOpen {
            destination: destination.to_owned(),
            transfer_id: transfer_id.to_owned(),
            compression: options.compression.to_wire() as i32,
            chunk_size: options.chunk_size,
            existing: existing as i32,
            expected_stream_bytes: 0,
        };
        let _ = requests
            .send(pb::UploadRequest {
                message: Some(pb::upload_request::Message::Open(open)),
            })
            .await;
        let mut responses = self
            .raw
            .upload(ReceiverStream::new(outbound))
            .await
            .map_err(from_status)?
            .into_inner();
        let accepted = match responses.message().await.map_err(from_status)? {
            Some(pb::UploadResponse {
                message: Some(pb::upload_response::Message::Accepted(accepted)),
            }) => accepted,
            _ => return Err(Error::Peer("the broker did not accept the upload".into())),
        };
        attempt_offsets.push(accepted.resume_offset);
        let resumes = attempt_offsets.len().saturating_sub(1) as u32;

        let (store, source, compression) = (store.clone(), source.clone(), options.compression);
        let rate = options.max_bytes_per_second;
        let producer = tokio::task::spawn_blocking(move || -> Result<TreeSummary> {
            let mut chunks = ChunkSource::new(store.walk(&source)?, accepted.chunk_size);
            chunks.skip_to(accepted.resume_offset)?;
            let mut pacer = Pacer::new(rate);
            while let Some(chunk) = chunks.next_chunk()? {
                let chunk_len = chunk.data.len() as u64;
                let message = pb::upload_request::Message::Chunk(seal(&chunk, compression)?);
                if requests
                    .blocking_send(pb::UploadRequest {
                        message: Some(message),
                    })
                    .is_err()
                {
                    return Err(Error::Peer("the broker closed the upload".into()));
                }
                std::thread::sleep(pacer.pace(chunk_len));
                if let Some(progress) = &progress {
                    progress(Progress {
                        done: chunks.offset(),
                        total: 0,
                        resumes,
                    });
                }
            }
            let summary = chunks.summary();
            let commit = pb::UploadCommit {
                stream_bytes: summary.stream_bytes,
                tree_digest: summary.digest.to_vec().into(),
            };
            let message = pb::upload_request::Message::Commit(commit);
            if requests
                .blocking_send(pb::UploadRequest {
                    message: Some(message),
                })
                .is_err()
            {
                return Err(Error::Peer("the broker closed the upload".into()));
            }
            Ok(summary)
        });

        let committed = loop {
            match responses.message().await {
                Ok(Some(pb::UploadResponse {
                    message: Some(pb::upload_response::Message::Committed(c)),
                })) => break Ok(c),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    break Err(Error::Peer(
                        "the upload stream ended before the commit".into(),
                    ));
                }
                Err(status) => break Err(from_status(status)),
            }
        };
        drop(responses);
        let produced = producer
            .await
            .map_err(|e| Error::Server(format!("upload worker failed: {e}")))?;
        let committed = committed?;
        let sent = produced?;
        let theirs = committed.summary.map(|s| s.tree_digest).unwrap_or_default();
        if theirs[..] != sent.digest {
            return Err(Error::DigestMismatch {
                sender: sent.digest_hex(),
                receiver: crate::transfer::hex(&theirs),
            });
        }
        Ok(sent)
    }

    /// Brings `source` from the broker into `destination` of the local `store`, resuming
    /// across failures; the tree appears there only once verified.
    pub async fn download(
        &mut self,
        source: pb::TreeSource,
        store: Arc<dyn Store>,
        destination: StorePath,
        options: &TransferOptions,
        progress: Option<ProgressFn>,
    ) -> Result<TransferOutcome> {
        let chunk_size = match options.chunk_size {
            0 => self.info().await?.default_chunk_size,
            n => n,
        };
        let params = TransferParams {
            destination: destination.to_string(),
            chunk_size,
            compression: options.compression,
        };
        let mut attempts = Attempts::new(options, "download");
        loop {
            let attempt = self.download_once(
                &source,
                &store,
                &destination,
                &attempts.transfer_id,
                &params,
                options,
                progress.clone(),
                &mut attempts.offsets,
            );
            let result = tokio::select! {
                result = attempt => Some(result),
                () = options.cancel.cancelled() => None,
            };
            if let ControlFlow::Break(outcome) = attempts.settle(result).await {
                return outcome;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn download_once(
        &mut self,
        source: &pb::TreeSource,
        store: &Arc<dyn Store>,
        destination: &StorePath,
        transfer_id: &str,
        params: &TransferParams,
        options: &TransferOptions,
        progress: Option<ProgressFn>,
        attempt_offsets: &mut Vec<u64>,
    ) -> Result<TreeSummary> {
        let (open_store, id, open_params) = (store.clone(), transfer_id.to_owned(), params.clone());
        let (receiver, area) = blocking(move || {
            let area = open_store.transfer_area(&id)?;
            Ok((
                Receiver::open(
                    &area,
                    open_params,
                    crate::tar_decode::ArchiveLimits::default(),
                )?,
                area,
            ))
        })
        .await?;
        let version_file = area.join("source_version");
        let known_version = std::fs::read_to_string(&version_file).unwrap_or_default();
        let offset = receiver.next_offset();
        attempt_offsets.push(offset);
        let resumes = attempt_offsets.len().saturating_sub(1) as u32;
        let request = pb::DownloadRequest {
            source: Some(source.clone()),
            offset,
            compression: params.compression.to_wire() as i32,
            chunk_size: params.chunk_size,
            expected_source_version: if offset == 0 {
                String::new()
            } else {
                known_version
            },
        };
        let mut responses = self
            .raw
            .download(request)
            .await
            .map_err(from_status)?
            .into_inner();
        let header = match responses.message().await.map_err(from_status)? {
            Some(pb::DownloadResponse {
                message: Some(pb::download_response::Message::Header(h)),
            }) => h,
            _ => return Err(Error::Peer("the broker sent no download header".into())),
        };
        std::fs::write(&version_file, &header.source_version)
            .map_err(|e| Error::io("write", version_file.display(), e))?;

        let landing = Landing {
            store: store.clone(),
            transfer_id: transfer_id.to_owned(),
            destination: destination.clone(),
            policy: if options.replace {
                ExistingPolicy::Replace
            } else {
                ExistingPolicy::Fail
            },
            sync: options.sync,
        };
        let total = header.stream_bytes;
        let (work, incoming) = mpsc::channel(4);
        let worker = tokio::task::spawn_blocking(move || {
            landing.receive(receiver, incoming, |done| {
                if let Some(progress) = &progress {
                    progress(Progress {
                        done,
                        total,
                        resumes,
                    });
                }
            })
        });
        let mut pacer = Pacer::new(options.max_bytes_per_second);
        let streamed = loop {
            match responses.message().await {
                Ok(Some(pb::DownloadResponse {
                    message: Some(pb::download_response::Message::Chunk(chunk)),
                })) => {
                    tokio::time::sleep(pacer.pace(u64::from(chunk.length))).await;
                    if work.send(Incoming::Chunk(chunk)).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(pb::DownloadResponse {
                    message: Some(pb::download_response::Message::Trailer(trailer)),
                })) => {
                    let finish = Incoming::Finish {
                        stream_bytes: trailer.stream_bytes,
                        digest: trailer.tree_digest,
                        skipped: trailer.skipped,
                    };
                    let _ = work.send(finish).await;
                    break Ok(());
                }
                Ok(Some(_)) => continue,
                Ok(None) => break Err(Error::Peer("the download ended before its trailer".into())),
                Err(status) => break Err(from_status(status)),
            }
        };
        drop(work);
        let landed = worker
            .await
            .map_err(|e| Error::Server(format!("download worker failed: {e}")))?;
        match (landed, streamed) {
            (Ok(Some(summary)), _) => Ok(summary),
            (Err(error), _) => Err(error),
            (Ok(None), Err(error)) => Err(error),
            (Ok(None), Ok(())) => Err(Error::Peer("the download stopped early".into())),
        }
    }
}

//! Staging a job's data between a site broker (this one) and the hub broker: inputs in,
//! outputs out. The site always dials the hub, so a site behind a firewall needs no open
//! port. When the site can see the hub's store on a shared filesystem, data moves by hard
//! link (copy where linking fails) and never crosses the wire.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use dispatch_proto::v1 as pb;

use crate::client::{BrokerClient, Progress, ProgressFn, TransferOptions};
use crate::error::{Error, Result};
use crate::extract::ExtractRoot;
use crate::path::StorePath;
use crate::service::{blocking, parse_job_inputs, parse_path};
use crate::store::{ExistingPolicy, LocalStore, Source, Store};
use crate::tar_encode::TreeCounts;
use crate::transfer::{Compression, STAGED_TREE};
use crate::tree::{EntryKind, Walked};

/// How data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Link when the stores are shared, else transfer.
    Auto,
    /// Hard links only.
    Link,
    /// Over the wire only.
    Transfer,
}

impl Method {
    fn from_wire(value: i32) -> Result<Self> {
        match pb::StageMethod::try_from(value) {
            Ok(pb::StageMethod::Unspecified | pb::StageMethod::Auto) => Ok(Self::Auto),
            Ok(pb::StageMethod::Link) => Ok(Self::Link),
            Ok(pb::StageMethod::Transfer) => Ok(Self::Transfer),
            Err(_) => Err(Error::invalid("method", format!("unknown value {value}"))),
        }
    }
}

/// The hub broker and the grant to show it.
#[derive(Debug, Clone)]
pub struct Hub {
    /// Its URI.
    pub uri: String,
    /// Grant issued by the coordinator for this job and direction.
    pub grant: String,
}

impl Hub {
    fn from_wire(endpoint: Option<pb::Endpoint>, grant: String) -> Result<Self> {
        let endpoint = endpoint.ok_or_else(|| Error::invalid("hub", "is required"))?;
        if endpoint.uri.is_empty() {
            return Err(Error::invalid("hub.uri", "is required"));
        }
        if !endpoint.ca_pem.is_empty() {
            return Err(Error::invalid(
                "hub.ca_pem",
                "TLS to the hub is not supported by this broker build yet",
            ));
        }
        Ok(Self {
            uri: endpoint.uri,
            grant,
        })
    }
}

/// Transfer ids for staging are derived from the job, so a stage repeated after a broker
/// restart resumes the interrupted transfer instead of starting over.
fn stage_transfer_id(direction: &str, job_id: &str) -> String {
    format!(
        "{direction}-{}",
        &blake3::hash(job_id.as_bytes()).to_hex()[..40]
    )
}

/// Bring a job's inputs into this broker's store.
#[derive(Debug, Clone)]
pub struct StageIn {
    /// The job.
    pub job_id: String,
    /// Where to pull from.
    pub hub: Hub,
    /// What to read at the hub.
    pub inputs: Source,
    /// Where the inputs land here.
    pub destination: StorePath,
    /// Link, transfer or choose.
    pub method: Method,
    /// Wire compression.
    pub compression: Compression,
}

impl StageIn {
    /// Checks a request.
    pub fn from_request(request: pb::StageInRequest) -> Result<Self> {
        let job_id = check_job_id(&request.job_id)?;
        let inputs = request
            .inputs
            .ok_or_else(|| Error::invalid("inputs", "is required"))?;
        let destination = if request.destination.is_empty() {
            parse_path("destination", &format!("key-{job_id}/incoming"), false)?
        } else {
            parse_path("destination", &request.destination, false)?
        };
        Ok(Self {
            inputs: parse_job_inputs("inputs", &inputs)?,
            hub: Hub::from_wire(request.hub, request.hub_grant)?,
            job_id,
            destination,
            method: Method::from_wire(request.method)?,
            compression: Compression::from_wire(request.compression)?,
        })
    }
}

/// Push a job's outputs from this broker's store to the hub.
#[derive(Debug, Clone)]
pub struct StageOut {
    /// The job.
    pub job_id: String,
    /// Where to push to.
    pub hub: Hub,
    /// The outputs here.
    pub source: StorePath,
    /// Where they land at the hub.
    pub destination: StorePath,
    /// Link, transfer or choose.
    pub method: Method,
    /// Wire compression.
    pub compression: Compression,
    /// Replace what is at the destination.
    pub replace: bool,
}

impl StageOut {
    /// Checks a request.
    pub fn from_request(request: pb::StageOutRequest) -> Result<Self> {
        let job_id = check_job_id(&request.job_id)?;
        let source = if request.source.is_empty() {
            parse_path("source", &format!("key-{job_id}/outgoing"), false)?
        } else {
            parse_path("source", &request.source, false)?
        };
        Ok(Self {
            hub: Hub::from_wire(request.hub, request.hub_grant)?,
            job_id,
            source,
            destination: parse_path("destination", &request.destination, false)?,
            method: Method::from_wire(request.method)?,
            compression: Compression::from_wire(request.compression)?,
            replace: request.replace,
        })
    }

    fn outputs(&self) -> Source {
        // Plugins may not author links, and symlinks never leave (walks skip them).
        Source::Tree {
            path: self.source.clone(),
            skip_chrislinks: true,
        }
    }
}

fn check_job_id(job_id: &str) -> Result<String> {
    dispatch_proto::JobId::parse(job_id)
        .map(String::from)
        .map_err(|e| Error::invalid(e.field.clone(), e.reason.clone()))
}

/// A stage to run.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Inputs in.
    In(StageIn),
    /// Outputs out.
    Out(StageOut),
}

/// What a stage needs from the service running it.
pub struct Context {
    /// This broker's store.
    pub store: Arc<dyn Store>,
    /// Limits for what arrives.
    pub limits: crate::tar_decode::ArchiveLimits,
    /// Sync before reporting done.
    pub sync: bool,
    /// Stops the stage (it stays resumable).
    pub shutdown: CancellationToken,
    /// Where progress goes.
    pub progress: mpsc::Sender<Result<pb::StageProgress, Status>>,
}

impl Context {
    fn report(&self, phase: pb::StagePhase, progress: Progress) {
        let message = pb::StageProgress {
            phase: phase as i32,
            bytes_done: progress.done,
            bytes_total: progress.total,
            resumes: progress.resumes,
            result: None,
        };
        // Progress is advisory: a slow reader loses intermediate reports, never the result.
        let _ = self.progress.try_send(Ok(message));
    }

    fn progress_fn(&self) -> ProgressFn {
        let sender = self.progress.clone();
        Arc::new(move |progress: Progress| {
            let message = pb::StageProgress {
                phase: pb::StagePhase::Transferring as i32,
                bytes_done: progress.done,
                bytes_total: progress.total,
                resumes: progress.resumes,
                result: None,
            };
            let _ = sender.try_send(Ok(message));
        })
    }

    async fn done(
        &self,
        method: Method,
        summary: pb::TreeSummary,
        destination: String,
        resumes: u32,
    ) {
        let wire_method = match method {
            Method::Link => pb::StageMethod::Link,
            _ => pb::StageMethod::Transfer,
        };
        let message = pb::StageProgress {
            phase: pb::StagePhase::Done as i32,
            bytes_done: summary.stream_bytes.max(summary.file_bytes),
            bytes_total: summary.stream_bytes.max(summary.file_bytes),
            resumes,
            result: Some(pb::StageResult {
                method: wire_method as i32,
                summary: Some(summary),
                destination,
            }),
        };
        let _ = self.progress.send(Ok(message)).await;
    }
}

/// True if the hub's store is visible here at the path the hub reports.
fn hub_store_visible(info: &pb::BrokerInfo) -> bool {
    LocalStore::peek_id(Path::new(&info.store_root)).is_some_and(|id| id == info.store_id)
}

fn choose(method: Method, shared: bool, info: &pb::BrokerInfo) -> Result<Method> {
    match (method, shared) {
        (Method::Auto, true) | (Method::Link, true) => Ok(Method::Link),
        (Method::Auto, false) | (Method::Transfer, _) => Ok(Method::Transfer),
        (Method::Link, false) => Err(Error::NotShared(format!(
            "the hub's store `{}` is not visible from this site; stage with method TRANSFER or AUTO",
            info.store_root
        ))),
    }
}

impl Plan {
    /// Runs the stage, reporting progress, and a final DONE message with the result.
    pub async fn run(self, cx: Context) -> Result<()> {
        match self {
            Plan::In(stage) => stage_in(stage, cx).await,
            Plan::Out(stage) => stage_out(stage, cx).await,
        }
    }
}

/// Reaches the hub broker and decides how to move the data.
async fn connect_hub(
    cx: &Context,
    hub: &Hub,
    requested: Method,
) -> Result<(BrokerClient, pb::BrokerInfo, Method)> {
    cx.report(pb::StagePhase::Preparing, Progress::NONE);
    let mut client = BrokerClient::connect(&hub.uri, Some(&hub.grant))?;
    let info = client.info().await?;
    let method = choose(requested, hub_store_visible(&info), &info)?;
    Ok((client, info, method))
}

async fn stage_in(stage: StageIn, cx: Context) -> Result<()> {
    let (mut hub, info, method) = connect_hub(&cx, &stage.hub, stage.method).await?;
    tracing::info!(job = %stage.job_id, ?method, hub = %stage.hub.uri, "staging inputs in");
    if method == Method::Link {
        for path in stage.inputs.read_paths() {
            hub.check_access(path.as_str(), false).await?;
        }
        cx.report(pb::StagePhase::Linking, Progress::NONE);
        let hub_root = info.store_root.clone();
        let (store, inputs, destination) = (
            cx.store.clone(),
            stage.inputs.clone(),
            stage.destination.clone(),
        );
        let id = stage_transfer_id("in", &stage.job_id);
        let sync = cx.sync;
        let counts = blocking(move || {
            let hub_store = LocalStore::open(Path::new(&hub_root))?;
            link_tree(
                hub_store.walk(&inputs)?,
                store.as_ref(),
                &id,
                &destination,
                ExistingPolicy::Replace,
                sync,
            )
        })
        .await?;
        cx.done(
            method,
            link_summary(counts),
            stage.destination.to_string(),
            0,
        )
        .await;
        return Ok(());
    }
    let Source::JobInputs {
        input_dirs,
        output_dir,
    } = &stage.inputs
    else {
        return Err(Error::invalid("inputs", "must be a job's inputs"));
    };
    let source = pb::TreeSource {
        source: Some(pb::tree_source::Source::JobInputs(pb::JobInputs {
            input_dirs: input_dirs.iter().map(|d| d.to_string()).collect(),
            output_dir: output_dir.to_string(),
        })),
    };
    let options = TransferOptions {
        transfer_id: Some(stage_transfer_id("in", &stage.job_id)),
        compression: stage.compression,
        replace: true,
        sync: cx.sync,
        cancel: cx.shutdown.child_token(),
        ..TransferOptions::default()
    };
    cx.report(pb::StagePhase::Transferring, Progress::NONE);
    let outcome = hub
        .download(
            source,
            cx.store.clone(),
            stage.destination.clone(),
            &options,
            Some(cx.progress_fn()),
        )
        .await?;
    cx.done(
        method,
        outcome.summary.to_wire(),
        stage.destination.to_string(),
        outcome.resumes,
    )
    .await;
    Ok(())
}

async fn stage_out(stage: StageOut, cx: Context) -> Result<()> {
    let (mut hub, info, method) = connect_hub(&cx, &stage.hub, stage.method).await?;
    tracing::info!(job = %stage.job_id, ?method, hub = %stage.hub.uri, "staging outputs out");
    let policy = if stage.replace {
        ExistingPolicy::Replace
    } else {
        ExistingPolicy::Fail
    };
    if method == Method::Link {
        hub.check_access(stage.destination.as_str(), true).await?;
        cx.report(pb::StagePhase::Linking, Progress::NONE);
        let hub_root = info.store_root.clone();
        let (store, outputs, destination) =
            (cx.store.clone(), stage.outputs(), stage.destination.clone());
        let id = stage_transfer_id("out", &stage.job_id);
        let sync = cx.sync;
        let counts = blocking(move || {
            let hub_store = LocalStore::open(Path::new(&hub_root))?;
            link_tree(
                store.walk(&outputs)?,
                &hub_store,
                &id,
                &destination,
                policy,
                sync,
            )
        })
        .await?;
        cx.done(
            method,
            link_summary(counts),
            stage.destination.to_string(),
            0,
        )
        .await;
        return Ok(());
    }
    let options = TransferOptions {
        transfer_id: Some(stage_transfer_id("out", &stage.job_id)),
        compression: stage.compression,
        replace: stage.replace,
        cancel: cx.shutdown.child_token(),
        ..TransferOptions::default()
    };
    cx.report(pb::StagePhase::Transferring, Progress::NONE);
    let outcome = hub
        .upload(
            cx.store.clone(),
            stage.outputs(),
            stage.destination.as_str(),
            &options,
            Some(cx.progress_fn()),
        )
        .await?;
    cx.done(
        method,
        outcome.summary.to_wire(),
        stage.destination.to_string(),
        outcome.resumes,
    )
    .await;
    Ok(())
}

fn link_summary(counts: TreeCounts) -> pb::TreeSummary {
    pb::TreeSummary {
        files: counts.files,
        directories: counts.directories,
        symlinks: 0,
        file_bytes: counts.file_bytes,
        stream_bytes: 0,
        tree_digest: Default::default(),
        skipped: counts.skipped,
    }
}

/// Builds the tree of `walk` in a transfer area of `target` by hard links (copies where
/// linking fails), then publishes it at `destination`.
pub fn link_tree(
    walk: crate::tree::TreeWalk,
    target: &dyn Store,
    transfer_id: &str,
    destination: &StorePath,
    policy: ExistingPolicy,
    sync: bool,
) -> Result<TreeCounts> {
    let area = target.transfer_area(transfer_id)?;
    let staged = area.join(STAGED_TREE);
    // A stage repeated after a crash starts its links over.
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(|e| Error::io("remove", staged.display(), e))?;
    }
    std::fs::create_dir_all(&staged)
        .map_err(|e| Error::io("create directory", staged.display(), e))?;
    let mut root = ExtractRoot::new(staged.clone());
    let mut counts = TreeCounts::default();
    let built = (|| -> Result<()> {
        for item in walk {
            match item? {
                Walked::Skipped { .. } => counts.skipped += 1,
                Walked::Entry(entry) => match entry.kind {
                    EntryKind::Directory => {
                        root.create_dir(&entry.path, entry.mode)?;
                        counts.directories += 1;
                    }
                    EntryKind::File { size } => {
                        root.link_or_copy(&entry.path, &entry.source, entry.mode)?;
                        counts.files += 1;
                        counts.file_bytes += size;
                    }
                    EntryKind::Symlink { .. } => counts.skipped += 1,
                },
            }
        }
        if sync {
            target.sync()?;
        }
        target.publish(&staged, destination, policy)
    })();
    if let Err(error) = built {
        let _ = target.discard_transfer(transfer_id);
        return Err(error);
    }
    target.discard_transfer(transfer_id)?;
    Ok(counts)
}

//! `dispatch`: the suite's command line. It talks to a coordinator (submit, follow, cancel,
//! delete jobs; manage sites) and to the hub broker the coordinator names (upload inputs,
//! download outputs), showing progress on every transfer and wait.

mod demo;
mod demo_plugin;
mod show;
mod stack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use dispatch_broker::StorePath;
use dispatch_broker::client::{BrokerClient, Progress, TransferOptions};
use dispatch_broker::store::{LocalStore, Source};
use dispatch_broker::tar_encode::TreeCounts;
use dispatch_proto::v1::{self as pb, coordinator_client::CoordinatorClient};

/// Runs analysis jobs through a ChRIS Dispatch coordinator.
#[derive(Parser)]
#[command(name = "dispatch", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    hub: Hub,
    #[command(subcommand)]
    command: Command,
}

/// Which coordinator to talk to, and how to print.
#[derive(Args)]
pub(crate) struct Hub {
    /// The coordinator's address.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    pub(crate) coordinator: String,
    /// The client token the coordinator expects (or set DISPATCH_TOKEN).
    #[arg(long, global = true, env = "DISPATCH_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub (coordinator, hub broker) and a site (site broker, a manager) in this
    /// process, data in one directory: the whole suite on one machine.
    Up(UpArgs),
    /// Run a sample plugin over a sample input end to end on a fresh machine: no image
    /// to pull, no network; shows states and logs live and where the outputs are.
    Demo {
        /// Where the demo's services keep their files and the outputs land.
        #[arg(long, default_value = "dispatch-demo")]
        data_dir: PathBuf,
        /// Compute backend: auto picks Docker when an engine answers, else local.
        #[arg(long, value_enum, default_value = "auto")]
        backend: stack::BackendChoice,
    },
    /// The demo's sample plugin (what the demo's container runs).
    #[command(hide = true)]
    DemoPlugin {
        /// Options, then the input and output directories.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Submit a job: `dispatch submit --image IMG [options] -- ENTRYPOINT [ARGS...]`.
    Submit(SubmitArgs),
    /// Show one job.
    Status {
        /// The job's id.
        job_id: String,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in these states (queued, running, succeeded, failed, ...).
        #[arg(long = "state")]
        states: Vec<StateArg>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Follow state changes as they happen (all jobs, or the ones named).
    Watch {
        /// Only these jobs.
        job_ids: Vec<String>,
        /// Stop once every named job has ended.
        #[arg(long)]
        until_done: bool,
    },
    /// Print a job's log.
    Logs {
        /// The job's id.
        job_id: String,
        /// Keep printing new output until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Start with only the last N lines.
        #[arg(long)]
        tail: Option<u32>,
    },
    /// Download a job's outputs into a directory.
    Outputs {
        /// The job's id.
        job_id: String,
        /// Directory to create.
        destination: PathBuf,
    },
    /// Cancel a job.
    Cancel {
        /// The job's id.
        job_id: String,
    },
    /// Clean up after a job (cancelling it first if it still runs).
    Delete {
        /// The job's id.
        job_id: String,
        /// Also forget the job record itself.
        #[arg(long)]
        purge: bool,
    },
    /// List the sites that joined the coordinator.
    Sites,
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCommand),
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Create a one-time token a new site joins with (shown once).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run a site on this machine (a site broker and a manager) joined to the hub at
    /// --coordinator; it dials out, so it needs no inbound port.
    Join(JoinArgs),
}

#[derive(Args)]
struct UpArgs {
    /// Where every service keeps its files (database, stores, keys, state).
    #[arg(long, env = "DISPATCH_DATA_DIR", default_value = "dispatch-data")]
    data_dir: PathBuf,
    /// The coordinator's address; beyond loopback, clients need the token it prints.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: std::net::SocketAddr,
    /// The hub broker's address (sites and clients move data through it).
    #[arg(long, default_value = "127.0.0.1:7443")]
    broker_listen: std::net::SocketAddr,
    /// The host name remote sites and clients dial, when it is not the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// Compute backend of the local site: auto picks Docker when an engine answers.
    #[arg(long, value_enum, default_value = "auto")]
    backend: stack::BackendChoice,
    /// Run only the hub: sites join from other machines (`dispatch site join`).
    #[arg(long)]
    no_site: bool,
    /// Name of the local site.
    #[arg(long, default_value = "local")]
    site_name: String,
    /// Also serve pfcon's REST API here, for CUBE (e.g. 127.0.0.1:5005).
    #[arg(long)]
    pfcon_listen: Option<std::net::SocketAddr>,
    /// The user CUBE logs in to the pfcon API as.
    #[arg(long, env = "PFCON_USER", default_value = "pfcon")]
    pfcon_user: String,
    /// Its password [default: made up on first start and kept in the data directory].
    #[arg(long, env = "PFCON_PASSWORD", hide_env_values = true)]
    pfcon_password: Option<String>,
    /// pfcon's storage mode: zipfile (CUBE sends zips), or fslink or filesystem (CUBE
    /// shares this hub's store, `<data-dir>/hub/store`).
    #[arg(long, value_enum, default_value = "zipfile")]
    pfcon_storage: PfconStorage,
}

/// pfcon's storage modes `dispatch up` serves.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PfconStorage {
    Zipfile,
    Fslink,
    Filesystem,
}

impl PfconStorage {
    fn word(self) -> &'static str {
        match self {
            PfconStorage::Zipfile => "zipfile",
            PfconStorage::Fslink => "fslink",
            PfconStorage::Filesystem => "filesystem",
        }
    }
}

#[derive(Args)]
struct JoinArgs {
    /// The site's name at the hub (the one its join token was created for).
    #[arg(long)]
    name: String,
    /// File holding the join token (`dispatch site token create` on the hub); needed on
    /// the first start only.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the site keeps its files (store, state, keys).
    #[arg(long, env = "DISPATCH_DATA_DIR", default_value = "dispatch-site")]
    data_dir: PathBuf,
    /// Compute backend: auto picks Docker when an engine answers.
    #[arg(long, value_enum, default_value = "auto")]
    backend: stack::BackendChoice,
    /// Label key=value jobs can ask for (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token.
    Create {
        /// A name for the site that will use it.
        #[arg(long)]
        name: String,
        /// How long it stays valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PluginTypeArg {
    Fs,
    Ds,
    Ts,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Queued,
    StagingIn,
    Running,
    StagingOut,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
}

impl StateArg {
    fn wire(self) -> pb::JobState {
        match self {
            StateArg::Queued => pb::JobState::Queued,
            StateArg::StagingIn => pb::JobState::StagingIn,
            StateArg::Running => pb::JobState::Running,
            StateArg::StagingOut => pb::JobState::StagingOut,
            StateArg::Succeeded => pb::JobState::Succeeded,
            StateArg::Failed => pb::JobState::Failed,
            StateArg::Cancelled => pb::JobState::Cancelled,
            StateArg::Lost => pb::JobState::Lost,
        }
    }
}

#[derive(Args)]
struct SubmitArgs {
    /// The job's id (letters, digits, `_`, `.`, `-`); default: a new random one.
    #[arg(long)]
    job_id: Option<String>,
    /// The container image.
    #[arg(long)]
    image: String,
    /// Plugin type: ds gets the inputs as an argument, fs and ts only the output dir.
    #[arg(long = "type", value_enum, default_value = "ds")]
    plugin_type: PluginTypeArg,
    /// A directory uploaded as the job's inputs.
    #[arg(long)]
    input_dir: Option<PathBuf>,
    /// CPU in millicores (1000 = one core).
    #[arg(long, default_value_t = 1000)]
    cpu: u32,
    /// Memory limit in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// GPUs.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Label key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Run only at sites carrying this label key=value (repeatable).
    #[arg(long = "site-label")]
    site_labels: Vec<String>,
    /// Flags whose value is the input dir (pfcon's args_path_flags).
    #[arg(long = "path-flag")]
    path_flags: Vec<String>,
    /// Stop the job after this many seconds.
    #[arg(long)]
    time_limit: Option<u32>,
    /// Wait until the job ends, showing its state.
    #[arg(long)]
    wait: bool,
    /// The entrypoint, then its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A coordinator client that sends the token with every call.
pub(crate) type Client =
    CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

/// Adds the client token to every call.
#[derive(Clone)]
struct TokenInterceptor(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// Connects to the coordinator, trying again for `patience` while it is starting.
pub(crate) async fn connect_retrying(hub: &Hub, patience: Duration) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match connect(hub).await {
            Ok(client) => return Ok(client),
            Err(error) if tokio::time::Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn connect(hub: &Hub) -> Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(hub.coordinator.clone())
        .with_context(|| format!("`{}` is not a valid address", hub.coordinator))?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the coordinator at {}; is it running?",
                hub.coordinator
            )
        })?;
    let token = hub
        .token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("the token has characters a header cannot carry")?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        TokenInterceptor(token),
    ))
}

/// The coordinator's refusal as a plain sentence.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

fn key_value(field: &str, items: &[String]) -> Result<HashMap<String, String>> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .with_context(|| format!("{field}: `{item}` is not key=value"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn transfer_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn on_progress(bar: &ProgressBar) -> Arc<dyn Fn(Progress) + Send + Sync> {
    let bar = bar.clone();
    Arc::new(move |p: Progress| {
        if p.total > 0 {
            bar.set_length(p.total);
        }
        bar.set_position(p.done);
    })
}

/// Uploads `dir` to the hub broker as the inputs of `job_id`, with a progress bar.
pub(crate) async fn upload_inputs(
    client: &mut Client,
    job_id: &str,
    dir: &std::path::Path,
) -> Result<pb::UploadReference> {
    let reserved = client
        .create_upload(pb::CreateUploadRequest {
            job_id: job_id.to_owned(),
            expected_bytes: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let access = reserved
        .access
        .context("the coordinator gave no broker access")?;
    let endpoint = access.broker.context("the coordinator named no broker")?;
    let mut broker = BrokerClient::connect(&endpoint.uri, Some(&access.grant))?;
    let source =
        LocalStore::read_only(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let bar = transfer_bar("uploading inputs");
    let outcome = broker
        .upload(
            Arc::new(source),
            Source::Tree {
                path: StorePath::root(),
                skip_chrislinks: false,
            },
            &access.path,
            &TransferOptions::default(),
            Some(on_progress(&bar)),
        )
        .await?;
    bar.finish_and_clear();
    eprintln!(
        "uploaded {} files ({} bytes)",
        outcome.summary.counts.files, outcome.summary.counts.file_bytes
    );
    Ok(pb::UploadReference {
        upload_id: reserved.upload_id,
        tree_digest: outcome.summary.digest.to_vec().into(),
    })
}

/// Downloads the outputs of `job_id` into `destination` (a new directory), with a
/// progress bar.
pub(crate) async fn download_outputs(
    client: &mut Client,
    job_id: &str,
    destination: &std::path::Path,
) -> Result<TreeCounts> {
    let answer = client
        .get_job_outputs(pb::GetJobOutputsRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let access = answer
        .access
        .context("the coordinator gave no broker access")?;
    let endpoint = access.broker.context("the coordinator named no broker")?;
    let mut broker = BrokerClient::connect(&endpoint.uri, Some(&access.grant))?;
    let destination = std::path::absolute(destination)?;
    let parent = destination
        .parent()
        .context("the destination needs a parent directory")?;
    std::fs::create_dir_all(parent)?;
    let name = destination
        .file_name()
        .and_then(|n| n.to_str())
        .context("the destination needs a UTF-8 name")?;
    let store = LocalStore::for_downloads(parent)?;
    let source = pb::TreeSource {
        source: Some(pb::tree_source::Source::Tree(pb::TreePath {
            path: access.path.clone(),
            skip_chrislinks: true,
        })),
    };
    let bar = transfer_bar("downloading outputs");
    let outcome = broker
        .download(
            source,
            Arc::new(store),
            StorePath::from_api(name)?,
            &TransferOptions::default(),
            Some(on_progress(&bar)),
        )
        .await?;
    bar.finish_and_clear();
    Ok(outcome.summary.counts)
}

async fn submit(hub: &Hub, args: SubmitArgs) -> Result<()> {
    let mut client = connect(hub).await?;
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| format!("job-{}", uuid::Uuid::new_v4()));
    let (entrypoint, rest) = args
        .command
        .split_first()
        .context("give the entrypoint after `--`")?;
    let upload = match &args.input_dir {
        Some(dir) => Some(upload_inputs(&mut client, &job_id, dir).await?),
        None => None,
    };
    let spec = pb::JobSpec {
        job_id: job_id.clone(),
        image: args.image,
        entrypoint: vec![entrypoint.clone()],
        args: rest.to_vec(),
        args_path_flags: args.path_flags,
        plugin_type: match args.plugin_type {
            PluginTypeArg::Fs => pb::PluginType::Fs,
            PluginTypeArg::Ds => pb::PluginType::Ds,
            PluginTypeArg::Ts => pb::PluginType::Ts,
        } as i32,
        env: args.env,
        cpu_millicores: args.cpu,
        memory_mib: args.memory,
        gpus: args.gpus,
        workers: 1,
        labels: key_value("label", &args.labels)?,
        time_limit_seconds: args.time_limit.unwrap_or(0),
        placement: (!args.site_labels.is_empty())
            .then(|| {
                anyhow::Ok(pb::Placement {
                    site_labels: key_value("site-label", &args.site_labels)?,
                    ..Default::default()
                })
            })
            .transpose()?,
        ..Default::default()
    };
    let request = pb::SubmitJobRequest {
        spec: Some(spec),
        upload,
        retry_if_failed: false,
    };
    let answer = client
        .submit_job(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let job = answer.job.context("the coordinator returned no job")?;
    if hub.json {
        println!("{}", show::job_json(&job));
    } else if answer.created {
        println!("{job_id}");
    } else {
        eprintln!("job {job_id} already exists; not submitted again");
        println!("{job_id}");
    }
    if args.wait {
        let done = wait_for_end(&mut client, &job_id).await?;
        if !hub.json {
            println!("{}", show::job_line(&done));
        }
        if done.state() != pb::JobState::Succeeded {
            bail!("job {job_id} ended {}", show::state_word(done.state()));
        }
    }
    Ok(())
}

/// Follows a job's events with a spinner until it reaches a terminal state.
async fn wait_for_end(client: &mut Client, job_id: &str) -> Result<pb::Job> {
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut events = client
        .watch_jobs(pb::WatchJobsRequest {
            after_sequence: Some(0),
            job_ids: vec![job_id.to_owned()],
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    loop {
        let job = client
            .get_job(pb::GetJobRequest {
                job_id: job_id.to_owned(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        spinner.set_message(format!("{job_id}: {}", show::state_word(job.state())));
        if show::is_terminal(job.state()) {
            spinner.finish_and_clear();
            return Ok(job);
        }
        match events.message().await {
            Ok(Some(_)) => {}
            Ok(None) => bail!("the coordinator ended the watch; run `dispatch status {job_id}`"),
            Err(status) => return Err(status_error(status)),
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let hub = &cli.hub;
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Demo { data_dir, backend } => {
            demo::run(demo::DemoOptions { data_dir, backend }).await
        }
        Command::DemoPlugin { args } => demo_plugin::run(&args),
        Command::Site(SiteCommand::Join(args)) => join(hub, args).await,
        Command::Submit(args) => submit(hub, args).await,
        Command::Status { job_id } => {
            let mut client = connect(hub).await?;
            let job = client
                .get_job(pb::GetJobRequest { job_id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{}",
                if hub.json {
                    show::job_json(&job).to_string()
                } else {
                    show::job_details(&job)
                }
            );
            Ok(())
        }
        Command::List { states, limit } => {
            let mut client = connect(hub).await?;
            let request = pb::ListJobsRequest {
                page: Some(pb::PageRequest {
                    page_size: limit,
                    page_token: String::new(),
                }),
                states: states.iter().map(|s| s.wire() as i32).collect(),
                ..Default::default()
            };
            let jobs = client
                .list_jobs(request)
                .await
                .map_err(status_error)?
                .into_inner()
                .jobs;
            if hub.json {
                println!(
                    "{}",
                    serde_json::Value::Array(jobs.iter().map(show::job_json).collect())
                );
            } else {
                for job in &jobs {
                    println!("{}", show::job_line(job));
                }
            }
            Ok(())
        }
        Command::Watch {
            job_ids,
            until_done,
        } => {
            let mut client = connect(hub).await?;
            let mut pending: std::collections::BTreeSet<String> = job_ids.iter().cloned().collect();
            let request = pb::WatchJobsRequest {
                after_sequence: Some(0),
                job_ids,
                ..Default::default()
            };
            let mut events = client
                .watch_jobs(request)
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(event) = events.message().await.map_err(status_error)? {
                if hub.json {
                    println!("{}", show::event_json(&event));
                } else {
                    println!("{}", show::event_line(&event));
                }
                if until_done && show::is_terminal(event.state()) {
                    pending.remove(&event.job_id);
                    if pending.is_empty() {
                        break;
                    }
                }
            }
            Ok(())
        }
        Command::Logs {
            job_id,
            follow,
            tail,
        } => {
            let mut client = connect(hub).await?;
            let request = pb::JobLogsRequest {
                job_id,
                tail_lines: tail,
                follow,
            };
            let mut chunks = client
                .job_logs(request)
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(chunk) = chunks.message().await.map_err(status_error)? {
                print!("{}", String::from_utf8_lossy(&chunk.data));
                if chunk.eof {
                    break;
                }
            }
            Ok(())
        }
        Command::Outputs {
            job_id,
            destination,
        } => {
            let mut client = connect(hub).await?;
            let counts = download_outputs(&mut client, &job_id, &destination).await?;
            let destination = std::path::absolute(&destination)?;
            println!(
                "{} files ({} bytes) of job {job_id} are in {}",
                counts.files,
                counts.file_bytes,
                destination.display()
            );
            Ok(())
        }
        Command::Cancel { job_id } => {
            let mut client = connect(hub).await?;
            let job = client
                .cancel_job(pb::CancelJobRequest {
                    job_id,
                    message: "cancelled with the dispatch CLI".into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{}",
                if hub.json {
                    show::job_json(&job).to_string()
                } else {
                    show::job_line(&job)
                }
            );
            Ok(())
        }
        Command::Delete { job_id, purge } => {
            let mut client = connect(hub).await?;
            let answer = client
                .delete_job(pb::DeleteJobRequest {
                    job_id: job_id.clone(),
                    purge,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if hub.json {
                println!(
                    "{}",
                    serde_json::json!({ "job_id": job_id, "purged": answer.purged })
                );
            } else {
                println!(
                    "{job_id}: {}",
                    if answer.purged { "purged" } else { "deleted" }
                );
            }
            Ok(())
        }
        Command::Sites => {
            let mut client = connect(hub).await?;
            let sites = client
                .list_sites(pb::ListSitesRequest::default())
                .await
                .map_err(status_error)?
                .into_inner()
                .sites;
            if hub.json {
                println!(
                    "{}",
                    serde_json::Value::Array(sites.iter().map(show::site_json).collect())
                );
            } else {
                for site in &sites {
                    println!("{}", show::site_line(site));
                }
            }
            Ok(())
        }
        Command::Site(SiteCommand::Token(TokenCommand::Create { name, ttl_seconds })) => {
            let mut client = connect(hub).await?;
            let request = pb::CreateJoinTokenRequest {
                site_name: name,
                ttl_seconds,
                labels: HashMap::new(),
            };
            let token = client
                .create_join_token(request)
                .await
                .map_err(status_error)?
                .into_inner();
            if hub.json {
                println!(
                    "{}",
                    serde_json::json!({ "join_token": token.join_token, "token_id": token.token_id })
                );
            } else {
                println!("{}", token.join_token);
                eprintln!("shown once: give it to the site's manager (`[hub] join_token_file`)");
            }
            Ok(())
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    dispatch_service::init_tracing(false, "warn");
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = std::path::absolute(&args.data_dir)?;
    let stop = CancellationToken::new();
    let hub = stack::Hub::start(
        &stack::HubOptions {
            data_dir: data_dir.clone(),
            listen: args.listen,
            broker_listen: args.broker_listen,
            advertise: args.advertise,
            pfcon: args.pfcon_listen.map(|listen| stack::PfconOptions {
                listen,
                user: args.pfcon_user.clone(),
                password: args.pfcon_password.clone(),
                storage: args.pfcon_storage.word().into(),
            }),
        },
        &stop,
    )
    .await?;
    println!("coordinator   {}", hub.coordinator_uri);
    println!("hub broker    {}", hub.broker_uri);
    if let Some((url, password_file)) = &hub.pfcon {
        println!(
            "pfcon API     {url} (user {}, password in {}, storage {})",
            args.pfcon_user,
            password_file.display(),
            args.pfcon_storage.word()
        );
        if args.pfcon_storage != PfconStorage::Zipfile {
            println!(
                "storeBase     {} (share it with CUBE)",
                hub.store_root.display()
            );
        }
    }
    if let Some(file) = &hub.client_token_file {
        println!(
            "client token  in {} (export DISPATCH_TOKEN=\"$(cat {})\")",
            file.display(),
            file.display()
        );
    }
    let site = if args.no_site {
        None
    } else {
        let started = async {
            let join_token = if stack::Site::has_joined(&data_dir) {
                None
            } else {
                Some(
                    stack::create_join_token(
                        &hub.coordinator_uri,
                        hub.client_token.as_deref(),
                        &args.site_name,
                    )
                    .await?,
                )
            };
            stack::Site::start(
                &stack::SiteOptions {
                    data_dir: data_dir.clone(),
                    name: args.site_name.clone(),
                    coordinator_uri: hub.coordinator_uri.clone(),
                    join_token,
                    labels: Default::default(),
                    backend: args.backend,
                    // In pfcon's filesystem mode the plugin reads and writes the shared
                    // store in place, so the local site works in the hub's store.
                    store_root: (args.pfcon_storage == PfconStorage::Filesystem)
                        .then(|| hub.store_root.clone()),
                },
                &stop,
            )
            .await
        };
        match started.await {
            Ok(site) => {
                println!(
                    "site          {} on backend {} ({})",
                    args.site_name, site.backend_kind, site.backend_why
                );
                Some(site)
            }
            Err(error) => {
                stop.cancel();
                let _ = hub.stop().await;
                return Err(error);
            }
        }
    };
    println!("data          {}", data_dir.display());
    println!(
        "ready: `dispatch --coordinator {} submit ...`; Ctrl-C stops",
        hub.coordinator_uri
    );
    tokio::select! {
        () = dispatch_service::shutdown_signal() => {}
        () = stop.cancelled() => {}
    }
    eprintln!("stopping");
    let site_stopped = match site {
        Some(site) => site.stop().await,
        None => Ok(()),
    };
    stop.cancel();
    let hub_stopped = hub.stop().await;
    site_stopped.and(hub_stopped)
}

async fn join(hub: &Hub, args: JoinArgs) -> Result<()> {
    dispatch_service::init_tracing(false, "info");
    let join_token = match &args.token_file {
        Some(file) if !stack::Site::has_joined(&args.data_dir) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the join token in {}", file.display()))?
                .trim()
                .to_owned(),
        ),
        _ => None,
    };
    let stop = CancellationToken::new();
    let site = stack::Site::start(
        &stack::SiteOptions {
            data_dir: std::path::absolute(&args.data_dir)?,
            name: args.name.clone(),
            coordinator_uri: hub.coordinator.clone(),
            join_token,
            labels: key_value("label", &args.labels)?.into_iter().collect(),
            backend: args.backend,
            store_root: None,
        },
        &stop,
    )
    .await?;
    println!(
        "site {} on backend {} ({}), store {}; dialing the hub at {}; Ctrl-C stops",
        args.name,
        site.backend_kind,
        site.backend_why,
        site.store_root.display(),
        hub.coordinator
    );
    tokio::select! {
        () = dispatch_service::shutdown_signal() => {}
        () = stop.cancelled() => {}
    }
    site.stop().await
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

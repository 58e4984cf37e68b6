//! `dispatch-broker`: serves a store over gRPC, mints grants, and pushes or pulls trees
//! to and from a broker from the command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use dispatch_broker::client::{BrokerClient, Progress, TransferOptions};
use dispatch_broker::config::BrokerConfig;
use dispatch_broker::grant::GrantKey;
use dispatch_broker::store::{LocalStore, Source};
use dispatch_broker::transfer::Compression;
use dispatch_broker::{StorePath, server};
use dispatch_proto::v1 as pb;

/// The ChRIS Dispatch file broker: streams directory trees between the hub and its sites,
/// resumable and checksummed.
#[derive(Parser)]
#[command(name = "dispatch-broker", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a store over gRPC (the default).
    Serve(ServeArgs),
    /// Print a grant (a bearer token) for some paths, signed with the broker's key.
    Grant(GrantArgs),
    /// Upload a local directory to a broker.
    Push(PushArgs),
    /// Download a tree from a broker into a local directory.
    Pull(PullArgs),
}

#[derive(Args, Default)]
struct ServeArgs {
    /// TOML configuration file (keys as in `--print-config`).
    #[arg(long, env = "DISPATCH_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7443 [default: 127.0.0.1:7443].
    #[arg(long)]
    listen: Option<String>,
    /// The storeBase directory to serve [default: /var/local/storeBase].
    #[arg(long)]
    store_root: Option<PathBuf>,
    /// File holding the secret (16+ bytes) that grants are signed with.
    #[arg(long)]
    grant_key_file: Option<PathBuf>,
    /// Accept requests without a grant (only for a private broker on loopback).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Print the configuration that would be used, then exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct GrantArgs {
    /// File holding the broker's grant secret.
    #[arg(long)]
    grant_key_file: PathBuf,
    /// Who the grant is for (shown in the broker's logs).
    #[arg(long, default_value = "operator")]
    subject: String,
    /// A path (and what is below it) the holder may read; `/` for the whole store.
    #[arg(long = "read")]
    read: Vec<String>,
    /// A path (and what is below it) the holder may write and read; `/` for the whole store.
    #[arg(long = "write")]
    write: Vec<String>,
    /// How long the grant is valid, in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_seconds: u64,
}

#[derive(Args)]
struct Remote {
    /// The broker's URI, e.g. http://127.0.0.1:7443.
    #[arg(
        long,
        env = "DISPATCH_BROKER_URI",
        default_value = "http://127.0.0.1:7443"
    )]
    broker: String,
    /// The grant to present (from `dispatch-broker grant` or the coordinator).
    #[arg(long, env = "DISPATCH_GRANT", hide_env_values = true)]
    grant: Option<String>,
    /// Name the transfer, so running the same command again resumes it.
    #[arg(long)]
    transfer_id: Option<String>,
    /// Compress chunks with gzip (worth it on slow links with compressible data).
    #[arg(long)]
    gzip: bool,
    /// Replace what is at the destination.
    #[arg(long)]
    replace: bool,
    /// Attempts before giving up when the connection keeps failing.
    #[arg(long, default_value_t = 20)]
    max_attempts: u32,
    /// Cap the rate at this many MiB/s, to leave room on a shared link.
    #[arg(long, value_name = "MIB_PER_S")]
    bwlimit: Option<f64>,
}

#[derive(Args)]
struct PushArgs {
    #[command(flatten)]
    remote: Remote,
    /// Local directory to send.
    source: PathBuf,
    /// Store path it becomes at the broker, e.g. key-chris-jid-1/incoming.
    destination: String,
    /// Leave out `*.chrislink` files.
    #[arg(long)]
    skip_chrislinks: bool,
}

#[derive(Args)]
struct PullArgs {
    #[command(flatten)]
    remote: Remote,
    /// Store path at the broker.
    source: String,
    /// Local directory to create (must not exist, unless --replace).
    destination: PathBuf,
}

fn overrides(args: &ServeArgs) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    if let Some(listen) = &args.listen {
        out.push(("listen".into(), toml::Value::String(listen.clone())));
    }
    if let Some(root) = &args.store_root {
        out.push((
            "store_root".into(),
            toml::Value::String(root.display().to_string()),
        ));
    }
    if let Some(key) = &args.grant_key_file {
        out.push((
            "grant_key_file".into(),
            toml::Value::String(key.display().to_string()),
        ));
    }
    if args.insecure_no_auth {
        out.push(("insecure_no_auth".into(), toml::Value::Boolean(true)));
    }
    if args.log_json {
        out.push(("log_json".into(), toml::Value::Boolean(true)));
    }
    out
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let config = BrokerConfig::load(args.config.as_deref(), &env, &overrides(&args))?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    dispatch_service::init_tracing(config.log_json, "info");
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another broker running there?",
                config.listen
            )
        })?;
    server::run(
        Arc::new(config),
        listener,
        dispatch_service::shutdown_signal(),
    )
    .await?;
    Ok(())
}

fn mint(args: GrantArgs) -> anyhow::Result<()> {
    let secret = std::fs::read(&args.grant_key_file)
        .with_context(|| format!("cannot read {}", args.grant_key_file.display()))?;
    let key = GrantKey::from_secret(&secret)?;
    if args.read.is_empty() && args.write.is_empty() {
        anyhow::bail!("give at least one --read or --write path (`/` means the whole store)");
    }
    for path in args.read.iter().chain(&args.write) {
        StorePath::from_api(path).with_context(|| format!("`{path}` is not a valid store path"))?;
    }
    let read: Vec<&str> = args.read.iter().map(String::as_str).collect();
    let write: Vec<&str> = args.write.iter().map(String::as_str).collect();
    println!(
        "{}",
        key.mint_for(
            &args.subject,
            &read,
            &write,
            Duration::from_secs(args.ttl_seconds)
        )
    );
    Ok(())
}

fn options(remote: &Remote) -> TransferOptions {
    TransferOptions {
        transfer_id: remote.transfer_id.clone(),
        compression: if remote.gzip {
            Compression::Gzip
        } else {
            Compression::None
        },
        replace: remote.replace,
        max_attempts: remote.max_attempts,
        max_bytes_per_second: remote.bwlimit.map(|mib| (mib * f64::from(1 << 20)) as u64),
        ..TransferOptions::default()
    }
}

/// Prints progress to stderr at most once a second.
fn progress_printer(what: &'static str) -> Arc<dyn Fn(Progress) + Send + Sync> {
    let last = std::sync::Mutex::new(Instant::now());
    let started = Instant::now();
    Arc::new(move |p: Progress| {
        let Ok(mut last) = last.lock() else { return };
        if last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let mib = p.done as f64 / (1 << 20) as f64;
        let rate = mib / started.elapsed().as_secs_f64().max(0.001);
        let total = if p.total > 0 {
            format!(" of {:.1} MiB", p.total as f64 / (1 << 20) as f64)
        } else {
            String::new()
        };
        eprintln!(
            "{what}: {mib:.1} MiB{total} ({rate:.0} MiB/s, {} resumes)",
            p.resumes
        );
    })
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    dispatch_service::init_tracing(false, "info");
    let source_dir = args
        .source
        .canonicalize()
        .with_context(|| format!("cannot read {}", args.source.display()))?;
    // The source directory is read as a store of its own, without writing into it.
    let store = LocalStore::read_only(&source_dir)?;
    let mut client = BrokerClient::connect(&args.remote.broker, args.remote.grant.as_deref())?;
    let source = Source::Tree {
        path: StorePath::root(),
        skip_chrislinks: args.skip_chrislinks,
    };
    let options = options(&args.remote);
    let outcome = client
        .upload(
            Arc::new(store),
            source,
            &args.destination,
            &options,
            Some(progress_printer("pushed")),
        )
        .await?;
    if outcome
        .attempt_offsets
        .first()
        .is_some_and(|offset| *offset > 0)
    {
        println!(
            "resumed an earlier attempt at byte {}",
            outcome.attempt_offsets[0]
        );
    }
    println!(
        "pushed {} files ({} bytes) to {} in transfer {}; digest {}; resumed {} times",
        outcome.summary.counts.files,
        outcome.summary.counts.file_bytes,
        args.destination,
        outcome.transfer_id,
        outcome.summary.digest_hex(),
        outcome.resumes
    );
    Ok(())
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    dispatch_service::init_tracing(false, "info");
    let destination = std::path::absolute(&args.destination)?;
    let parent = destination
        .parent()
        .context("the destination needs a parent directory")?;
    let name = destination
        .file_name()
        .and_then(|n| n.to_str())
        .context("the destination needs a UTF-8 name")?;
    let store = LocalStore::for_downloads(parent)?;
    let mut client = BrokerClient::connect(&args.remote.broker, args.remote.grant.as_deref())?;
    let source = pb::TreeSource {
        source: Some(pb::tree_source::Source::Tree(pb::TreePath {
            path: args.source.clone(),
            skip_chrislinks: false,
        })),
    };
    let options = options(&args.remote);
    let outcome = client
        .download(
            source,
            Arc::new(store),
            StorePath::from_api(name)?,
            &options,
            Some(progress_printer("pulled")),
        )
        .await?;
    if outcome
        .attempt_offsets
        .first()
        .is_some_and(|offset| *offset > 0)
    {
        println!(
            "resumed an earlier attempt at byte {}",
            outcome.attempt_offsets[0]
        );
    }
    println!(
        "pulled {} files ({} bytes) into {}; digest {}; resumed {} times",
        outcome.summary.counts.files,
        outcome.summary.counts.file_bytes,
        destination.display(),
        outcome.summary.digest_hex(),
        outcome.resumes
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Grant(args)) => mint(args),
        Some(Command::Push(args)) => push(args).await,
        Some(Command::Pull(args)) => pull(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The chain of causes, without a backtrace: these are for the person at the
            // terminal, not for a debugger.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

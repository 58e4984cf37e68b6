//! `dispatch demo`: one job end to end on a machine with nothing but this program. It
//! starts a hub and a site in this process (as `dispatch up` does), writes a sample input
//! tree, uploads it, runs the sample ds plugin over it (in a tiny image built from this
//! binary where Docker runs, as a plain process otherwise), shows the job's states and
//! log as they happen, and downloads the outputs.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use dispatch_proto::v1 as pb;

use crate::stack::{BackendChoice, Hub, HubOptions, Site, SiteOptions};

/// The site the demo runs its job at.
const SITE: &str = "demo";
/// Repository of the image built for the demo plugin.
const IMAGE_REPOSITORY: &str = "localhost/dispatch-demo";
/// How long the demo waits for the site to connect or the job to end.
const PATIENCE: Duration = Duration::from_secs(300);

/// What `dispatch demo` is told.
pub struct DemoOptions {
    /// Where the services keep their files, and where the outputs land.
    pub data_dir: PathBuf,
    /// The backend.
    pub backend: BackendChoice,
}

/// Runs the demo and prints where its outputs are.
pub async fn run(options: DemoOptions) -> Result<()> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("cannot create {}", options.data_dir.display()))?;
    let data_dir = std::path::absolute(&options.data_dir)?;
    println!("dispatch demo: a sample plugin over a sample input tree, end to end");
    println!("  data directory  {}", data_dir.display());

    // The services start afresh at every run (a demo keeps no jobs); outputs stay.
    let services = data_dir.join("services");
    if services.exists() {
        std::fs::remove_dir_all(&services)
            .with_context(|| format!("cannot clear {}", services.display()))?;
    }
    let stop = CancellationToken::new();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let hub = Hub::start(
        &HubOptions {
            data_dir: services.clone(),
            listen: loopback,
            broker_listen: loopback,
            advertise: None,
            pfcon: None,
        },
        &stop,
    )
    .await?;
    let outcome = with_hub(&hub, &services, &data_dir, options.backend, &stop).await;
    stop.cancel();
    let stopped = hub.stop().await;
    outcome.and(stopped)
}

async fn with_hub(
    hub: &Hub,
    services: &Path,
    data_dir: &Path,
    backend: BackendChoice,
    stop: &CancellationToken,
) -> Result<()> {
    let token = crate::stack::create_join_token(&hub.coordinator_uri, None, SITE).await?;
    let site = Site::start(
        &SiteOptions {
            data_dir: services.to_path_buf(),
            name: SITE.into(),
            coordinator_uri: hub.coordinator_uri.clone(),
            join_token: Some(token),
            labels: Default::default(),
            backend,
            store_root: None,
        },
        stop,
    )
    .await?;
    println!(
        "  backend         {} ({})",
        site.backend_kind, site.backend_why
    );
    let outcome = with_site(hub, &site, data_dir).await;
    let stopped = site.stop().await;
    outcome.and(stopped)
}

async fn with_site(hub: &Hub, site: &Site, data_dir: &Path) -> Result<()> {
    let entrypoint = match site.backend_kind {
        "docker" => {
            let image = build_image(data_dir).await?;
            println!("  image           {image} (built from this program; nothing pulled)");
            (
                image,
                vec!["/dispatch".to_owned(), "demo-plugin".to_owned()],
            )
        }
        _ => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            (
                "local/none:0".to_owned(),
                vec![exe.display().to_string(), "demo-plugin".to_owned()],
            )
        }
    };
    let (image, entrypoint) = entrypoint;
    let hub_address = crate::Hub {
        coordinator: hub.coordinator_uri.clone(),
        token: hub.client_token.clone(),
        json: false,
    };
    let mut client = crate::connect_retrying(&hub_address, Duration::from_secs(30)).await?;
    wait_for_site(&mut client).await?;
    println!("[+] hub and site started; site `{SITE}` connected");

    let input = data_dir.join("sample-input");
    write_sample_inputs(&input)?;
    let job_id = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let upload = crate::upload_inputs(&mut client, &job_id, &input).await?;
    let spec = pb::JobSpec {
        job_id: job_id.clone(),
        image,
        entrypoint,
        plugin_type: pb::PluginType::Ds as i32,
        cpu_millicores: 500,
        memory_mib: 256,
        workers: 1,
        ..Default::default()
    };
    client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            upload: Some(upload),
            retry_if_failed: false,
        })
        .await
        .map_err(crate::status_error)?;
    println!("[+] submitted job {job_id}; its states and log follow");

    let last = follow(&mut client, &job_id).await?;
    if last != pb::JobState::Succeeded {
        bail!(
            "job {job_id} ended {}; rerun with RUST_LOG=info to see the services' logs",
            crate::show::state_word(last)
        );
    }
    let destination = data_dir.join("outputs").join(&job_id);
    let counts = crate::download_outputs(&mut client, &job_id, &destination).await?;
    println!(
        "[+] outputs: {} files ({} bytes) in {}",
        counts.files,
        counts.file_bytes,
        destination.display()
    );
    let summary = std::fs::read_to_string(destination.join("summary.txt"))
        .context("the outputs have no summary.txt")?;
    for line in summary.lines() {
        println!("    summary.txt: {line}");
    }
    Ok(())
}

async fn wait_for_site(client: &mut crate::Client) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let sites = client
            .list_sites(pb::ListSitesRequest::default())
            .await
            .map_err(crate::status_error)?
            .into_inner()
            .sites;
        let connected = sites.iter().any(|site| {
            site.name == SITE
                && site.health == pb::SiteHealth::Connected as i32
                && !site.managers.is_empty()
        });
        if connected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("site `{SITE}` did not connect to the hub; rerun with RUST_LOG=info to see why");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prints the job's state changes and, once it runs, its log, until it ends.
async fn follow(client: &mut crate::Client, job_id: &str) -> Result<pb::JobState> {
    let mut events = client
        .watch_jobs(pb::WatchJobsRequest {
            after_sequence: Some(0),
            job_ids: vec![job_id.to_owned()],
            ..Default::default()
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let mut logs: Option<tokio::task::JoinHandle<()>> = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let last = loop {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => event.map_err(crate::status_error)?,
            Ok(None) => bail!("the hub ended the watch of {job_id}"),
            Err(_) => bail!("job {job_id} did not end within {} s", PATIENCE.as_secs()),
        };
        let state = event.state();
        let reason = crate::show::reason_text(event.reason.as_ref());
        let reason = if reason.is_empty() || reason == crate::show::state_word(state) {
            String::new()
        } else {
            format!(" ({reason})")
        };
        println!("    {}{reason}", crate::show::state_word(state));
        if state == pb::JobState::Running && logs.is_none() {
            logs = Some(tokio::spawn(print_log(client.clone(), job_id.to_owned())));
        }
        if crate::show::is_terminal(state) {
            break state;
        }
    };
    if let Some(logs) = logs
        && tokio::time::timeout(Duration::from_secs(10), logs)
            .await
            .is_err()
    {
        println!("    (the rest of the log is at `dispatch logs {job_id}`)");
    }
    Ok(last)
}

async fn print_log(mut client: crate::Client, job_id: String) {
    let request = pb::JobLogsRequest {
        job_id,
        tail_lines: None,
        follow: true,
    };
    let mut chunks = match client.job_logs(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => {
            println!("  | (no log: {})", status.message());
            return;
        }
    };
    let mut pending = String::new();
    while let Ok(Some(chunk)) = chunks.message().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.data));
        while let Some(end) = pending.find('\n') {
            println!("  | {}", &pending[..end]);
            pending.drain(..=end);
        }
        let _ = std::io::stdout().flush();
        if chunk.eof {
            break;
        }
    }
    if !pending.is_empty() {
        println!("  | {pending}");
    }
}

/// A small tree that looks like what clinicians send: notes and reports in folders.
fn write_sample_inputs(root: &Path) -> Result<()> {
    let files: [(&str, &str); 4] = [
        (
            "README.txt",
            "Sample input for the ChRIS Dispatch demo.\nEach file is counted by the demo plugin.\n",
        ),
        (
            "reports/mri-brain-001.txt",
            "Study: MRI brain without contrast\nFindings: no acute intracranial abnormality.\nImpression: normal study.\n",
        ),
        (
            "reports/mri-brain-002.txt",
            "Study: MRI brain with contrast\nFindings: stable postoperative changes.\nImpression: no new enhancement.\n",
        ),
        (
            "notes/clinic.txt",
            "Follow-up in six months.\nRepeat imaging if symptoms change.\n",
        ),
    ];
    for (name, text) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Builds (once per version of this program) an image holding this binary and the
/// shared libraries it loads, with `docker import`: no base image, no registry.
async fn build_image(data_dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let tag = {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(std::fs::File::open(&exe)?)
            .context("cannot read this program")?;
        hasher.finalize().to_hex()[..16].to_owned()
    };
    let image = format!("{IMAGE_REPOSITORY}:{tag}");
    let docker = bollard::Docker::connect_with_defaults()
        .context("cannot reach the Docker engine to build the demo image")?;
    if docker.inspect_image(&image).await.is_ok() {
        return Ok(image);
    }
    let archive = data_dir.join("demo-image.tar");
    let libraries = shared_libraries(&exe)?;
    {
        let file = std::fs::File::create(&archive)
            .with_context(|| format!("cannot write {}", archive.display()))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        builder.follow_symlinks(true);
        builder.sparse(false);
        append_dir(&mut builder, "tmp", 0o1777)?;
        let mut dirs = std::collections::BTreeSet::new();
        for library in &libraries {
            let inside = library.strip_prefix("/").unwrap_or(library);
            for ancestor in inside.ancestors().skip(1) {
                if !ancestor.as_os_str().is_empty() {
                    dirs.insert(ancestor.to_path_buf());
                }
            }
        }
        for dir in &dirs {
            append_dir(&mut builder, &dir.display().to_string(), 0o755)?;
        }
        for library in &libraries {
            let inside = library.strip_prefix("/").unwrap_or(library);
            builder
                .append_path_with_name(library, inside)
                .with_context(|| format!("cannot add {}", library.display()))?;
        }
        builder
            .append_path_with_name(&exe, "dispatch")
            .context("cannot add this program to the image")?;
        builder.into_inner()?.flush()?;
    }
    let file = tokio::fs::File::open(&archive).await?;
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let options = bollard::query_parameters::CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(IMAGE_REPOSITORY)
        .tag(&tag)
        .build();
    let mut progress = docker.create_image(Some(options), Some(body), None);
    while let Some(step) = progress.next().await {
        step.context("the Docker engine refused the demo image")?;
    }
    let _ = std::fs::remove_file(&archive);
    Ok(image)
}

fn append_dir<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(mode);
    header.set_size(0);
    header.set_mtime(0);
    builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
    Ok(())
}

/// The files `ldd` says `exe` loads (none for a static binary).
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let output = std::process::Command::new("ldd")
        .arg(exe)
        .output()
        .context("cannot run ldd to find the libraries this program needs")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            found.push(PathBuf::from(path));
        }
    }
    Ok(found)
}

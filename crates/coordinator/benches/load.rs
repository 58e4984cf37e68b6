//! Coordinator load: submissions, placements and memory, against the real
//! `dispatch-coordinator` binary (SQLite in a temporary directory) on loopback.
//!
//! In one run, in this order:
//!
//! 1. **Baselines.** Raw SQLite inserts committed one at a time in WAL mode with
//!    `synchronous = FULL`, in the same directory as the coordinator's database: the
//!    ceiling of any store that syncs once per submission (what the coordinator did before
//!    group commit). Then a no-op gRPC call (`grpc.health.v1.Health/Check`) on the
//!    coordinator at the submitters' concurrency: the ceiling of the transport and of
//!    this machine's two cores shared by client and server.
//! 2. **Submissions.** `BENCH_SUBMIT_JOBS` (10,000) `SubmitJob` calls from
//!    `BENCH_CONCURRENCY` (16) concurrent callers, no site connected (the jobs stay
//!    queued): submissions per second, p50 and p99 latency, and both as ratios to the
//!    baselines.
//! 3. **Memory.** The queue is filled to `BENCH_QUEUE_JOBS` (100,000) jobs the same way;
//!    the coordinator's VmRSS and VmHWM (/proc/<pid>/status) with them stored, against its
//!    RSS when it had just started.
//! 4. **Placements.** `BENCH_SITES` (1,000) simulated sites join (a join token each,
//!    `Register`, a session with hello and heartbeats, as a manager does) advertising no
//!    free capacity, so nothing is placed while they connect. Once all are connected
//!    every site advertises room for thousands of jobs at once, and the clock runs until
//!    the sites have received `BENCH_PLACEMENTS` (all queued jobs) leases: placements per
//!    second, each a job committed QUEUED to STAGING_IN and its lease delivered. The
//!    sites only take leases (they report nothing: `sites.lease_seconds` is raised so no
//!    lease is taken back during the run); every job must be leased exactly once.
//!
//! It prints each figure with PASS/FAIL against the targets (>= 5,000
//! submissions/s, p99 <= 5 ms, >= 1,500 placements/s, RSS <= 150 MiB with 100,000 jobs).
//! With `BENCH_ENFORCE=1` a FAIL exits non-zero.
//!
//! Environment: the counts above; `BENCH_BASELINE_COMMITS` (2,000);
//! `BENCH_PLACEMENT_TIMEOUT_SECONDS` (300); `BENCH_DIR` (where the temporary directory
//! goes; default the system's, which must be a real disk for the sync figures to mean
//! anything); `RETAIN_TMP=1` keeps it (the coordinator's log is in it).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use dispatch_proto::v1::coordinator_client::CoordinatorClient;
use dispatch_proto::v1::site_registry_client::SiteRegistryClient;
use dispatch_proto::v1::{self, hub_message, site_message};
use dispatch_testkit::ServiceBinary;

/// The targets.
const TARGET_SUBMITS_PER_SECOND: f64 = 5000.0;
const TARGET_P99_MS: f64 = 5.0;
const TARGET_PLACEMENTS_PER_SECOND: f64 = 1500.0;
const TARGET_RSS_MIB: f64 = 150.0;
/// Site sessions per connection.
const SESSIONS_PER_CONNECTION: usize = 50;
/// Concurrent join token and registration calls while the sites join.
const JOIN_CONCURRENCY: usize = 16;
/// What each site advertises once the clock runs: room for every job it could be sent.
const SITE_CPU_MILLICORES: u32 = 1_000_000_000;
const SITE_MEMORY_MIB: u64 = 1_000_000_000;

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let passed = runtime.block_on(run(&settings))?;
    if !passed && settings.enforce {
        std::process::exit(1);
    }
    Ok(())
}

struct Settings {
    submit_jobs: usize,
    queue_jobs: usize,
    concurrency: usize,
    connections: usize,
    sites: usize,
    placements: usize,
    baseline_commits: usize,
    placement_timeout: Duration,
    dir: Option<std::path::PathBuf>,
    retain: bool,
    enforce: bool,
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

impl Settings {
    fn from_env() -> Result<Self> {
        let submit_jobs = env_usize("BENCH_SUBMIT_JOBS", 10_000)?;
        let queue_jobs = env_usize("BENCH_QUEUE_JOBS", 100_000)?.max(submit_jobs);
        let settings = Self {
            submit_jobs,
            queue_jobs,
            concurrency: env_usize("BENCH_CONCURRENCY", 16)?.max(1),
            connections: env_usize("BENCH_CONNECTIONS", 4)?.max(1),
            sites: env_usize("BENCH_SITES", 1000)?.max(1),
            placements: env_usize("BENCH_PLACEMENTS", queue_jobs)?.min(queue_jobs),
            baseline_commits: env_usize("BENCH_BASELINE_COMMITS", 2000)?.max(1),
            placement_timeout: Duration::from_secs(env_usize(
                "BENCH_PLACEMENT_TIMEOUT_SECONDS",
                300,
            )? as u64),
            dir: std::env::var_os("BENCH_DIR").map(Into::into),
            retain: env_flag("RETAIN_TMP"),
            enforce: env_flag("BENCH_ENFORCE"),
        };
        ensure!(
            settings.submit_jobs > 0,
            "BENCH_SUBMIT_JOBS must be at least 1"
        );
        Ok(settings)
    }
}

/// Latencies of one kind of call, and how long they all took.
struct Timings {
    calls: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Timings {
    fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0..=1) in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }

    fn summary(&self) -> String {
        format!(
            "{:>8.0}/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} calls in {:.2} s)",
            self.per_second(),
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(1.0),
            self.calls,
            self.elapsed.as_secs_f64()
        )
    }
}

async fn run(settings: &Settings) -> Result<bool> {
    let dir = match &settings.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::Builder::new()
                .prefix("coordinator-load-")
                .tempdir_in(dir)?
        }
        None => tempfile::Builder::new()
            .prefix("coordinator-load-")
            .tempdir()?,
    };
    println!("coordinator load benchmark in {}", dir.path().display());
    let outcome = measure(settings, dir.path()).await;
    if settings.retain {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    outcome
}

async fn measure(settings: &Settings, dir: &Path) -> Result<bool> {
    // 1. The sync baseline, before the coordinator shares the disk.
    let commits = sqlite_commit_baseline(&dir.join("baseline.db"), settings.baseline_commits)
        .await
        .context("the SQLite baseline")?;
    println!(
        "baseline: SQLite, one synced commit per insert: {:.0} commits/s ({} in {:.2} s)",
        commits.per_second(),
        commits.calls,
        commits.elapsed.as_secs_f64()
    );

    let mut coordinator = start_coordinator(dir)?;
    let pid = coordinator.pid();
    let idle_rss = rss_kib(pid, "VmRSS")?;
    let channels = connect(&coordinator.uri, settings.connections).await?;

    let noop = noop_calls(&channels, settings.submit_jobs, settings.concurrency).await?;
    println!(
        "baseline: gRPC no-op (Health/Check) x{}: {}",
        settings.concurrency,
        noop.summary()
    );

    // 2. Submissions.
    let cpu_before = cpu_seconds(pid)?;
    let submits = submit_jobs(&channels, 0..settings.submit_jobs, settings.concurrency).await?;
    let submit_cpu = cpu_seconds(pid)? - cpu_before;
    println!(
        "submit: SubmitJob x{}: {}",
        settings.concurrency,
        submits.summary()
    );

    // 3. The queue filled; memory with it stored.
    let fill = submit_jobs(
        &channels,
        settings.submit_jobs..settings.queue_jobs,
        settings.concurrency,
    )
    .await?;
    if fill.calls > 0 {
        println!(
            "fill: SubmitJob up to {}: {}",
            settings.queue_jobs,
            fill.summary()
        );
    }
    let stored_rss = rss_kib(pid, "VmRSS")?;
    let stored_hwm = rss_kib(pid, "VmHWM")?;

    // 4. Placements.
    let placements = place_jobs(&coordinator.uri, &channels, settings, pid).await?;
    let end_rss = rss_kib(pid, "VmRSS")?;
    let end_hwm = rss_kib(pid, "VmHWM")?;
    drop(channels);
    let clean = coordinator.terminate()?;
    if !clean {
        println!("warning: the coordinator did not exit cleanly on SIGTERM");
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut passed = true;
    let mut verdict = |ok: bool| {
        passed &= ok;
        if ok { "PASS" } else { "FAIL" }
    };
    println!();
    println!("results (the same run; 2 cores shared by the coordinator and this client)");
    let rate = submits.per_second();
    println!(
        "  submissions/s      {rate:>9.0}  target >= {TARGET_SUBMITS_PER_SECOND:.0}  {}  \
         ({:.2}x SQLite one-sync-per-commit, {:.2}x gRPC no-op)",
        verdict(rate >= TARGET_SUBMITS_PER_SECOND),
        rate / commits.per_second(),
        rate / noop.per_second()
    );
    println!(
        "  submit p50         {:>9.2} ms  ({:.2}x gRPC no-op p50)",
        submits.quantile_ms(0.5),
        submits.quantile_ms(0.5) / noop.quantile_ms(0.5)
    );
    println!(
        "  coordinator CPU    {:>9.0} us per submission, {:.0} us per placement",
        submit_cpu * 1e6 / submits.calls as f64,
        placements.cpu_seconds * 1e6 / placements.placed as f64
    );
    let p99 = submits.quantile_ms(0.99);
    println!(
        "  submit p99         {p99:>9.2} ms  target <= {TARGET_P99_MS:.0} ms  {}  ({:.2}x gRPC no-op p99)",
        verdict(p99 <= TARGET_P99_MS),
        p99 / noop.quantile_ms(0.99)
    );
    let placed_rate = placements.per_second();
    println!(
        "  placements/s       {placed_rate:>9.0}  target >= {TARGET_PLACEMENTS_PER_SECOND:.0}  {}  \
         ({} jobs to {} sites in {:.2} s; first 20% at {:.0}/s)",
        verdict(placed_rate >= TARGET_PLACEMENTS_PER_SECOND),
        placements.placed,
        settings.sites,
        placements.elapsed.as_secs_f64(),
        placements.first_fifth_per_second
    );
    let stored = mib(stored_rss);
    println!(
        "  RSS, {} jobs   {stored:>9.1} MiB  target <= {TARGET_RSS_MIB:.0} MiB  {}  \
         (VmHWM {:.1} MiB; {:.1} MiB at start, {:.2}x)",
        settings.queue_jobs,
        verdict(stored <= TARGET_RSS_MIB),
        mib(stored_hwm),
        mib(idle_rss),
        stored / mib(idle_rss)
    );
    println!(
        "  RSS after placing  {:>9.1} MiB  (VmHWM {:.1} MiB, with {} site sessions)",
        mib(end_rss),
        mib(end_hwm),
        settings.sites
    );
    Ok(passed)
}

/// Inserts `count` rows the size of a stored job, each in its own synced commit.
async fn sqlite_commit_baseline(path: &Path, count: usize) -> Result<Timings> {
    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    sqlx::query("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec BLOB NOT NULL)")
        .execute(&mut conn)
        .await?;
    let spec = vec![7u8; 600];
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let call = Instant::now();
        sqlx::query("INSERT INTO jobs (job_id, spec) VALUES ($1, $2)")
            .bind(format!("baseline-{i}"))
            .bind(spec.clone())
            .execute(&mut conn)
            .await?;
        latencies.push(call.elapsed());
    }
    let elapsed = started.elapsed();
    conn.close().await?;
    latencies.sort();
    Ok(Timings {
        calls: count,
        elapsed,
        latencies,
    })
}

fn start_coordinator(dir: &Path) -> Result<ServiceBinary> {
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n\
             listen = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\n\
             insecure_no_auth = true\n\
             shutdown_grace_seconds = 10\n\
             [sites]\n\
             # The simulated sites take leases without reporting on them.\n\
             lease_seconds = 3600\n",
            dir.join("data").display()
        ),
    )?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_dispatch-coordinator"));
    command
        .env_remove("DISPATCH_COORDINATOR_CONFIG")
        .arg("--config")
        .arg(&config);
    ServiceBinary::spawn(command, "coordinator serving", dir.join("coordinator.log"))
}

async fn connect(uri: &str, count: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(Channel::from_shared(uri.to_owned())?.connect().await?);
    }
    Ok(channels)
}

/// CPU time (user and system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command (which may hold spaces) start after its `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command in /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .context("a short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command;
    // clock ticks are 1/100 s on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// A line of /proc/<pid>/status, in KiB.
fn rss_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Runs `calls` calls of `call` from `concurrency` workers, timing each.
async fn timed<F, Fut>(
    channels: &[Channel],
    calls: std::ops::Range<usize>,
    concurrency: usize,
    call: F,
) -> Result<Timings>
where
    F: Fn(Channel, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(calls.start));
    let end = calls.end;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let channel = channels[worker % channels.len()].clone();
        let next = next.clone();
        let call = call.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let at = Instant::now();
                call(channel.clone(), i).await?;
                latencies.push(at.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(calls.len());
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Timings {
        calls: calls.len(),
        elapsed,
        latencies,
    })
}

async fn noop_calls(channels: &[Channel], calls: usize, concurrency: usize) -> Result<Timings> {
    timed(channels, 0..calls, concurrency, |channel, _| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(())
    })
    .await
}

fn job_id(i: usize) -> String {
    format!("load-{i:07}")
}

/// A job as CUBE submits one: a ds plugin reading a shared input directory, with a
/// token in its env and a label.
fn job_spec(i: usize) -> v1::JobSpec {
    let id = job_id(i);
    v1::JobSpec {
        image: "ghcr.io/fnndsc/pl-dircopy:2.1.1".into(),
        entrypoint: vec!["python3".into(), "/usr/local/bin/dircopy".into()],
        args: vec!["--dir".into(), "home/bob/uploads".into()],
        args_path_flags: vec!["--dir".into()],
        plugin_type: v1::PluginType::Ds.into(),
        env: vec!["CHRIS_USER_TOKEN=tok-secret-value".into()],
        cpu_millicores: 1000,
        memory_mib: 300,
        workers: 1,
        auid: "bob".into(),
        storage_mode: v1::StorageMode::Fslink.into(),
        inputs: Some(v1::InputSpec {
            source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
                input_dirs: vec!["home/bob/uploads".into()],
            })),
        }),
        output_dir: format!("home/bob/feeds/{id}"),
        labels: [("feed".to_owned(), (i % 100).to_string())].into(),
        time_limit_seconds: 3600,
        job_id: id,
        ..v1::JobSpec::default()
    }
}

async fn submit_jobs(
    channels: &[Channel],
    jobs: std::ops::Range<usize>,
    concurrency: usize,
) -> Result<Timings> {
    timed(channels, jobs, concurrency, |channel, i| async move {
        let answer = CoordinatorClient::new(channel)
            .submit_job(v1::SubmitJobRequest {
                spec: Some(job_spec(i)),
                upload: None,
                retry_if_failed: false,
            })
            .await
            .with_context(|| format!("submitting {}", job_id(i)))?
            .into_inner();
        ensure!(answer.created, "{} was not created", job_id(i));
        Ok(())
    })
    .await
}

/// What the placement run measured.
struct Placements {
    placed: usize,
    elapsed: Duration,
    first_fifth_per_second: f64,
    cpu_seconds: f64,
}

impl Placements {
    fn per_second(&self) -> f64 {
        self.placed as f64 / self.elapsed.as_secs_f64()
    }
}

/// What the simulated sites have been sent.
#[derive(Default)]
struct Leases {
    count: AtomicUsize,
    jobs: std::sync::Mutex<HashSet<String>>,
    duplicates: AtomicUsize,
}

fn capabilities() -> v1::Capabilities {
    let largest = v1::Resources {
        cpu_millicores: 64_000,
        memory_mib: 512 * 1024,
        gpus: 0,
    };
    v1::Capabilities {
        backend_kind: v1::BackendKind::Local.into(),
        total: Some(largest),
        max_per_job: Some(largest),
        storage_modes: vec![
            v1::StorageMode::Zipfile.into(),
            v1::StorageMode::Fslink.into(),
        ],
        max_workers: 1,
        ..v1::Capabilities::default()
    }
}

fn capacity(cpu_millicores: u32, memory_mib: u64) -> v1::CapacityUpdate {
    v1::CapacityUpdate {
        free: Some(v1::Resources {
            cpu_millicores,
            memory_mib,
            gpus: 0,
        }),
        free_job_slots: 0,
        active_jobs: 0,
    }
}

/// One simulated site: registered, its session open.
struct SimulatedSite {
    outbound: mpsc::Sender<v1::SiteMessage>,
}

async fn place_jobs(
    uri: &str,
    channels: &[Channel],
    settings: &Settings,
    pid: u32,
) -> Result<Placements> {
    let joining = Instant::now();
    let site_channels = connect(uri, settings.sites.div_ceil(SESSIONS_PER_CONNECTION)).await?;
    let leases = Arc::new(Leases::default());
    let registered = register_sites(channels, settings.sites).await?;
    let sessions = Arc::new(Mutex::new(Vec::with_capacity(settings.sites)));
    let mut opening = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicUsize::new(0));
    let registered = Arc::new(registered);
    for _ in 0..JOIN_CONCURRENCY {
        let (next, registered, sessions, leases) = (
            next.clone(),
            registered.clone(),
            sessions.clone(),
            leases.clone(),
        );
        let site_channels = site_channels.clone();
        opening.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((site_id, credential)) = registered.get(i) else {
                    break;
                };
                let channel = site_channels[i / SESSIONS_PER_CONNECTION].clone();
                let site = open_session(channel, site_id, credential, leases.clone()).await?;
                sessions.lock().await.push(site);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = opening.join_next().await {
        done??;
    }
    let sessions = std::mem::take(&mut *sessions.lock().await);
    println!(
        "sites: {} joined and connected in {:.1} s, advertising no room",
        sessions.len(),
        joining.elapsed().as_secs_f64()
    );
    ensure!(
        leases.count.load(Ordering::SeqCst) == 0,
        "jobs were placed before the sites advertised room"
    );

    // The clock runs from the moment every site advertises room.
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    for site in &sessions {
        site.outbound
            .send(v1::SiteMessage {
                message: Some(site_message::Message::Capacity(capacity(
                    SITE_CPU_MILLICORES,
                    SITE_MEMORY_MIB,
                ))),
            })
            .await
            .context("a site session closed")?;
    }
    let target = settings.placements;
    let fifth = target.div_ceil(5);
    let mut first_fifth = None;
    let mut last_report = Instant::now();
    loop {
        let placed = leases.count.load(Ordering::SeqCst);
        if first_fifth.is_none() && placed >= fifth {
            first_fifth = Some(started.elapsed());
        }
        if placed >= target {
            break;
        }
        if started.elapsed() > settings.placement_timeout {
            bail!(
                "only {placed} of {target} jobs placed within {} s",
                settings.placement_timeout.as_secs()
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            println!(
                "  {placed} placed after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let placed = leases.count.load(Ordering::SeqCst);
    let duplicates = leases.duplicates.load(Ordering::SeqCst);
    ensure!(duplicates == 0, "{duplicates} jobs were leased twice");
    drop(sessions);
    let first_fifth = first_fifth.unwrap_or(elapsed);
    Ok(Placements {
        placed,
        elapsed,
        first_fifth_per_second: fifth as f64 / first_fifth.as_secs_f64(),
        cpu_seconds: cpu,
    })
}

/// Join tokens for `count` sites, and each site registered: (site id, credential).
async fn register_sites(channels: &[Channel], count: usize) -> Result<Vec<(String, String)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..JOIN_CONCURRENCY {
        let channel = channels[worker % channels.len()].clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut client = CoordinatorClient::new(channel.clone());
            let mut sites = SiteRegistryClient::new(channel);
            let mut registered = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let token = client
                    .create_join_token(v1::CreateJoinTokenRequest::default())
                    .await?
                    .into_inner();
                let site = sites
                    .register(v1::RegisterRequest {
                        join_token: token.join_token,
                        site_name: format!("load-site-{i:04}"),
                        manager_id: format!("load-manager-{i:04}"),
                        capabilities: Some(capabilities()),
                        request_id: format!("load-register-{i}"),
                    })
                    .await?
                    .into_inner();
                registered.push((site.site_id, site.site_credential));
            }
            anyhow::Ok(registered)
        });
    }
    let mut registered = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        registered.extend(done??);
    }
    Ok(registered)
}

/// Opens a site's session with no room advertised; a task then takes its leases and
/// sends heartbeats as the hub asks, until the session ends.
async fn open_session(
    channel: Channel,
    site_id: &str,
    credential: &str,
    leases: Arc<Leases>,
) -> Result<SimulatedSite> {
    let (outbound, rx) = mpsc::channel(16);
    let manager_id = format!("{site_id}-manager");
    outbound
        .send(v1::SiteMessage {
            message: Some(site_message::Message::Hello(v1::SiteHello {
                site_id: site_id.to_owned(),
                site_credential: credential.to_owned(),
                manager_id,
                capabilities: Some(capabilities()),
                capacity: Some(capacity(0, 0)),
                protocol_version: 1,
            })),
        })
        .await?;
    let mut inbound = SiteRegistryClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let accepted = match inbound.message().await? {
        Some(v1::HubMessage {
            message: Some(hub_message::Message::Accepted(accepted)),
        }) => accepted,
        other => bail!("expected the session accepted, got {other:?}"),
    };
    let interval = accepted
        .config
        .map_or(10, |c| c.heartbeat_interval_seconds)
        .max(1);
    let heartbeats = outbound.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(u64::from(interval)));
        tick.tick().await;
        loop {
            tokio::select! {
                message = inbound.message() => {
                    match message {
                        Ok(Some(message)) => take(&leases, message),
                        Ok(None) | Err(_) => break,
                    }
                }
                _ = tick.tick() => {
                    let beat = v1::SiteMessage {
                        message: Some(site_message::Message::Heartbeat(v1::SessionHeartbeat {
                            sent_at: Some(std::time::SystemTime::now().into()),
                        })),
                    };
                    if heartbeats.send(beat).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(SimulatedSite { outbound })
}

/// Counts a lease (and notes a job leased twice).
fn take(leases: &Leases, message: v1::HubMessage) {
    let Some(hub_message::Message::RunJob(lease)) = message.message else {
        return;
    };
    let job_id = lease.spec.map(|s| s.job_id).unwrap_or_default();
    let fresh = leases
        .jobs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(job_id);
    if !fresh {
        leases.duplicates.fetch_add(1, Ordering::SeqCst);
    }
    leases.count.fetch_add(1, Ordering::SeqCst);
}

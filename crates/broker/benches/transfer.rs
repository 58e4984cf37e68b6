//! Broker-to-broker throughput against a plain TCP pipe, on loopback.
//!
//! Moves one tree (by default the 1 GiB: one 512 MiB file plus 10,000 small files
//! totalling another 512 MiB) two ways in the same run, alternating, after a warm-up of each:
//!
//! - **broker**: two real `dispatch-broker` processes, a hub holding the tree and a site
//!   asked to `StageIn` with method TRANSFER, so the tree crosses the wire even though both
//!   stores are on one filesystem. Timed from the request until the DONE message, so it
//!   includes the survey, chunking, hashing, verifying, the site's `syncfs` and publishing.
//! - **tar pipe**: `tar -cf - .` writing into one end of a connected TCP socket pair and
//!   `tar -xf -` reading the other end, both real processes, timed until the extracting
//!   tar exits (no sync: that is what `tar | nc` gives you; the time a `sync` takes right
//!   after is printed as well, for a like-for-like comparison with the broker's `syncfs`).
//!
//! Both read the same source files from a warm page cache, every destination is compared
//! with the source (content hash, size, mode, mtime) so nothing passes by moving nothing,
//! and the filesystem is synced, untimed, before each run, so the broker's `syncfs` flushes
//! only its own writes.
//!
//! Destinations are kept until the end rather than removed after each run: on ext4 without
//! a journal, inodes deleted in the last minutes are skipped one by one when new ones are
//! allocated (`recently_deleted` in `find_inode_bit`), and removing 10,000 files between
//! runs made the next run's file creation cost seconds of CPU, landing on whichever path
//! came next. A run therefore needs twice the tree's size in free space per round.
//!
//! It prints the median time of each path, both throughputs, their ratio, each process's
//! peak RSS and CPU time, and PASS/FAIL against the targets (broker >= 0.7x the
//! pipe; each broker's peak RSS < 64 MiB). With `BENCH_ENFORCE=1` a FAIL exits non-zero.
//!
//! Environment:
//! - `BENCH_DIR`: where the tree goes (kept and reused while its size is unchanged);
//!   default `target/dispatch-bench`.
//! - `BENCH_SCRATCH_DIR`: where the site broker's store and the tar pipe's destinations go
//!   (removed at the end); default `BENCH_DIR`.
//! - `BENCH_LARGE_MIB` (512), `BENCH_SMALL_FILES` (10000), `BENCH_SMALL_KIB` (default:
//!   512 MiB spread over the small files, about 52 KiB each).
//! - `BENCH_RUNS` (3) timed runs of each path, `BENCH_WARMUP` (1) untimed runs of each.
//! - `BENCH_GZIP=1`: ask the stage for gzip chunks (the data is incompressible).
//! - `BENCH_ENFORCE=1`: exit 1 when a target is missed.
//! - `RETAIN_TMP=1`: keep the scratch directory (the brokers' logs are in it).
//! - `DISPATCH_BROKER_*` reach both brokers (e.g. `DISPATCH_BROKER_DEFAULT_CHUNK_SIZE`),
//!   except the sync and log settings the harness sets itself.
//!
//! Needs GNU `tar`, and `/usr/bin/time` (Debian package `time`) for the tars' peak RSS:
//! reading a child's rusage otherwise takes `wait4`, which would need `unsafe` here.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_proto::v1 as pb;
use dispatch_testkit::{BrokerBinary, TestKey, TreeListing, tree_listing, write_pattern_file};

const MIB: u64 = 1 << 20;
/// Issue's targets.
const TARGET_RATIO: f64 = 0.7;
const TARGET_RSS_MIB: f64 = 64.0;
/// Where the tree lives in the hub's store.
const TREE: &str = "data/tree";
/// Small files are spread over this many directories.
const SMALL_DIRS: u64 = 100;
const GNU_TIME: &str = "/usr/bin/time";

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let passed = run(&settings)?;
    // Everything (brokers, scratch directories) is dropped by now.
    if !passed && settings.enforce {
        std::process::exit(1);
    }
    Ok(())
}

/// What to move and how often.
struct Settings {
    dir: PathBuf,
    scratch_dir: PathBuf,
    large_bytes: u64,
    small_files: u64,
    small_bytes: u64,
    runs: usize,
    warmup: usize,
    gzip: bool,
    enforce: bool,
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(value) => {
            Ok(Some(value.trim().parse().with_context(|| {
                format!("{name}={value} is not a whole number")
            })?))
        }
        Err(_) => Ok(None),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

impl Settings {
    fn from_env() -> Result<Self> {
        let large_bytes = env_u64("BENCH_LARGE_MIB")?.unwrap_or(512) * MIB;
        let small_files = env_u64("BENCH_SMALL_FILES")?.unwrap_or(10_000);
        let small_bytes = match env_u64("BENCH_SMALL_KIB")? {
            Some(kib) => kib * 1024,
            None => (512 * MIB).checked_div(small_files).unwrap_or(0),
        };
        let dir = match std::env::var_os("BENCH_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => default_bench_dir()?,
        };
        let dir = std::path::absolute(dir)?;
        let scratch_dir = match std::env::var_os("BENCH_SCRATCH_DIR") {
            Some(scratch) => std::path::absolute(scratch)?,
            None => dir.clone(),
        };
        Ok(Self {
            dir,
            scratch_dir,
            large_bytes,
            small_files,
            small_bytes,
            runs: usize::try_from(env_u64("BENCH_RUNS")?.unwrap_or(3).max(1))?,
            warmup: usize::try_from(env_u64("BENCH_WARMUP")?.unwrap_or(1))?,
            gzip: env_flag("BENCH_GZIP"),
            enforce: env_flag("BENCH_ENFORCE"),
        })
    }

    fn file_bytes(&self) -> u64 {
        self.large_bytes + self.small_files * self.small_bytes
    }

    /// Identifies the generated tree, so a tree of other sizes is never reused.
    fn marker(&self) -> String {
        format!(
            "v1 large={} small_files={} small_bytes={}\n",
            self.large_bytes, self.small_files, self.small_bytes
        )
    }
}

/// `target/dispatch-bench`: the bench runs from `target/<profile>/deps/`.
fn default_bench_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("unexpected location of the bench binary")?;
    Ok(target.join("dispatch-bench"))
}

fn run(settings: &Settings) -> Result<bool> {
    std::fs::create_dir_all(&settings.dir)?;
    let hub_root = settings.dir.join("hub");
    let source = hub_root.join(TREE);
    ensure_tree(settings, &source)?;
    eprintln!("reading the source tree (this also warms the page cache)");
    let expected = tree_listing(&source)?;

    std::fs::create_dir_all(&settings.scratch_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("scratch-")
        .tempdir_in(&settings.scratch_dir)?;
    let site_root = scratch.path().join("site");
    std::fs::create_dir_all(&site_root)?;
    let key = TestKey::create(scratch.path())?;
    let grant = key.admin();
    let binary = Path::new(env!("CARGO_BIN_EXE_dispatch-broker"));
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let hub_log = scratch.path().join("hub.log");
    let hub = BrokerBinary::start(binary, &hub_root, &key, any_port, hub_log, &[])?;
    let site_log = scratch.path().join("site.log");
    let site = BrokerBinary::start(binary, &site_root, &key, any_port, site_log, &[])?;
    let ticks = clock_ticks();
    let tar_stats = Path::new(GNU_TIME).exists();
    if !tar_stats {
        eprintln!("{GNU_TIME} is missing (Debian package `time`): no RSS or CPU for the tars");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stager = Stager {
        site_uri: site.uri.clone(),
        hub_uri: hub.uri.clone(),
        grant,
        gzip: settings.gzip,
    };
    let chunk_size = runtime.block_on(stager.chunk_size())?;

    let mut broker_runs = Vec::new();
    let mut tar_runs = Vec::new();
    for round in 0..settings.warmup + settings.runs {
        let timed = round >= settings.warmup;
        let label = if timed {
            format!("run {}/{}", round - settings.warmup + 1, settings.runs)
        } else {
            format!("warm-up {}/{}", round + 1, settings.warmup)
        };

        // The tar pipe.
        let destination = scratch.path().join(format!("tar-{round}"));
        std::fs::create_dir_all(&destination)?;
        sync()?;
        let machine_before = machine_busy(ticks)?;
        let mut pipe = tar_pipe(&source, &destination, tar_stats)?;
        pipe.machine_busy = machine_busy(ticks)? - machine_before;
        pipe.sync_after = timed_sync()?;
        check_same(&expected, &destination, "the tar pipe")?;
        eprintln!(
            "{label}: tar pipe {:6.2} s {:6.1} MiB/s, sync after {:.2} s; cpu tar -c {}, tar -x {}; {}",
            pipe.elapsed.as_secs_f64(),
            mib_per_s(settings.file_bytes(), pipe.elapsed),
            pipe.sync_after.as_secs_f64(),
            show_cpu(pipe.create.map(|p| p.cpu)),
            show_cpu(pipe.extract.map(|p| p.cpu)),
            machine(
                pipe.machine_busy,
                pipe.elapsed,
                pipe.create
                    .zip(pipe.extract)
                    .map(|(c, x)| c.cpu.total() + x.cpu.total())
            ),
        );

        // The brokers.
        let destination = format!("incoming/run-{round}");
        sync()?;
        let before = (cpu(hub.pid(), ticks)?, cpu(site.pid(), ticks)?);
        let machine_before = machine_busy(ticks)?;
        let job = format!("bench-{}-{round}", std::process::id());
        let mut staged = runtime
            .block_on(stager.stage_in(&job, &destination))
            .with_context(|| format!("stage-in failed; site log:\n{}", tail(&site.log())))?;
        staged.machine_busy = machine_busy(ticks)? - machine_before;
        staged.hub_cpu = cpu(hub.pid(), ticks)? - before.0;
        staged.site_cpu = cpu(site.pid(), ticks)? - before.1;
        staged.sync_after = timed_sync()?;
        check_same(&expected, &site_root.join(&destination), "the brokers")?;
        eprintln!(
            "{label}: brokers  {:6.2} s {:6.1} MiB/s, sync after {:.2} s; cpu hub {}, site {}; bytes applied from {:.2} s to {:.2} s; {}",
            staged.elapsed.as_secs_f64(),
            mib_per_s(settings.file_bytes(), staged.elapsed),
            staged.sync_after.as_secs_f64(),
            staged.hub_cpu,
            staged.site_cpu,
            staged.first_byte.unwrap_or_default().as_secs_f64(),
            staged.last_byte.unwrap_or_default().as_secs_f64(),
            machine(
                staged.machine_busy,
                staged.elapsed,
                Some(staged.hub_cpu.total() + staged.site_cpu.total())
            ),
        );
        if timed {
            tar_runs.push(pipe);
            broker_runs.push(staged);
        }
    }

    let report = Report {
        settings,
        chunk_size,
        hub_rss_mib: hub.peak_rss_kib()? as f64 / 1024.0,
        site_rss_mib: site.peak_rss_kib()? as f64 / 1024.0,
        broker_runs,
        tar_runs,
    };
    let passed = report.print();
    drop((hub, site));
    if std::env::var_os("RETAIN_TMP").is_some_and(|v| v == "1") {
        eprintln!("RETAIN_TMP: keeping {}", scratch.keep().display());
    } else {
        eprintln!("removing {}", scratch.path().display());
    }
    Ok(passed)
}

/// Writes the tree unless the one there was made with the same sizes.
fn ensure_tree(settings: &Settings, tree: &Path) -> Result<()> {
    let marker = settings.dir.join("tree.marker");
    if tree.is_dir() && std::fs::read_to_string(&marker).is_ok_and(|m| m == settings.marker()) {
        eprintln!("reusing the tree at {}", tree.display());
        return Ok(());
    }
    eprintln!(
        "writing the tree at {}: {} MiB file + {} files of {} bytes",
        tree.display(),
        settings.large_bytes / MIB,
        settings.small_files,
        settings.small_bytes
    );
    let _ = std::fs::remove_file(&marker);
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    std::fs::create_dir_all(tree)?;
    write_pattern_file(&tree.join("large.bin"), settings.large_bytes, 1)?;
    for i in 0..settings.small_files {
        let dir = tree.join(format!("small/d{:03}", i % SMALL_DIRS));
        if i < SMALL_DIRS {
            std::fs::create_dir_all(&dir)?;
        }
        write_pattern_file(
            &dir.join(format!("f{i:05}.bin")),
            settings.small_bytes,
            i + 2,
        )?;
    }
    std::fs::write(&marker, settings.marker())?;
    Ok(())
}

fn check_same(expected: &TreeListing, destination: &Path, what: &str) -> Result<()> {
    let got = tree_listing(destination)?;
    if &got == expected {
        return Ok(());
    }
    let missing = expected.keys().find(|k| !got.contains_key(*k));
    let extra = got.keys().find(|k| !expected.contains_key(*k));
    let differs = expected
        .iter()
        .find(|(k, v)| got.get(*k).is_some_and(|g| g != *v));
    bail!(
        "{what} delivered a different tree ({} entries, {} expected): first missing {missing:?}, first extra {extra:?}, first different {differs:?} (now {:?})",
        got.len(),
        expected.len(),
        differs.and_then(|(k, _)| got.get(k)),
    )
}

/// Stage-in requests to the site broker.
struct Stager {
    site_uri: String,
    hub_uri: String,
    grant: String,
    gzip: bool,
}

/// One stage-in as the bench saw it.
#[derive(Clone, Copy)]
struct BrokerRun {
    elapsed: Duration,
    /// When progress first reported a chunk applied: what comes before is connecting to
    /// the hub, its survey of the tree and the first chunk.
    first_byte: Option<Duration>,
    /// When progress first reported every byte applied: what follows is the digest check,
    /// the `syncfs` and the publish.
    last_byte: Option<Duration>,
    stream_bytes: u64,
    hub_cpu: Cpu,
    site_cpu: Cpu,
    /// How long a `sync` right after took (should be nothing: the broker synced).
    sync_after: Duration,
    /// CPU time the whole machine spent during the run, in core-seconds.
    machine_busy: f64,
}

impl Stager {
    async fn client(&self) -> Result<pb::broker_client::BrokerClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(self.site_uri.clone())?
            .connect()
            .await?;
        Ok(pb::broker_client::BrokerClient::new(channel))
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", self.grant).parse()?);
        Ok(request)
    }

    /// The chunk size a stage will use: the hub's default (both brokers see the same
    /// environment, so asking the site gives the same answer).
    async fn chunk_size(&self) -> Result<u32> {
        let info = self
            .client()
            .await?
            .get_info(self.request(pb::GetInfoRequest {})?)
            .await?
            .into_inner();
        Ok(info.default_chunk_size)
    }

    async fn stage_in(&self, job_id: &str, destination: &str) -> Result<BrokerRun> {
        let mut client = self.client().await?;
        let compression = if self.gzip {
            pb::Compression::Gzip
        } else {
            pb::Compression::None
        };
        let request = self.request(pb::StageInRequest {
            job_id: job_id.to_owned(),
            hub: Some(pb::Endpoint {
                uri: self.hub_uri.clone(),
                ..Default::default()
            }),
            hub_grant: self.grant.clone(),
            inputs: Some(pb::JobInputs {
                input_dirs: vec![TREE.to_owned()],
                output_dir: "out/x".to_owned(),
            }),
            destination: destination.to_owned(),
            method: pb::StageMethod::Transfer as i32,
            compression: compression as i32,
        })?;
        let started = Instant::now();
        let mut progress = client.stage_in(request).await?.into_inner();
        let (mut first_byte, mut last_byte) = (None, None);
        while let Some(message) = progress.message().await? {
            let phase = pb::StagePhase::try_from(message.phase).unwrap_or_default();
            if phase == pb::StagePhase::Transferring
                && message.bytes_done > 0
                && first_byte.is_none()
            {
                first_byte = Some(started.elapsed());
            }
            if phase == pb::StagePhase::Transferring
                && message.bytes_total > 0
                && message.bytes_done >= message.bytes_total
                && last_byte.is_none()
            {
                last_byte = Some(started.elapsed());
            }
            if phase == pb::StagePhase::Done {
                let elapsed = started.elapsed();
                let result = message.result.context("DONE without a result")?;
                if result.method != pb::StageMethod::Transfer as i32 {
                    bail!("the stage did not go over the wire: {result:?}");
                }
                let summary = result.summary.context("DONE without a summary")?;
                return Ok(BrokerRun {
                    elapsed,
                    first_byte,
                    last_byte,
                    stream_bytes: summary.stream_bytes,
                    hub_cpu: Cpu::default(),
                    site_cpu: Cpu::default(),
                    sync_after: Duration::ZERO,
                    machine_busy: 0.0,
                });
            }
        }
        bail!("the stage-in stream ended without DONE")
    }
}

/// CPU time, user and system, in seconds.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;

    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s (user {:.2} + sys {:.2})",
            self.total(),
            self.user,
            self.system
        )
    }
}

fn show_cpu(cpu: Option<Cpu>) -> String {
    cpu.map_or("n/a".to_owned(), |cpu| cpu.to_string())
}

/// One run of the tar pipe.
#[derive(Clone, Copy)]
struct TarRun {
    elapsed: Duration,
    /// How long a `sync` right after took: the tar pipe's share of getting data to disk.
    sync_after: Duration,
    /// CPU time the whole machine spent during the run, in core-seconds.
    machine_busy: f64,
    create: Option<ProcessStats>,
    extract: Option<ProcessStats>,
}

/// What GNU time reported for one process.
#[derive(Clone, Copy)]
struct ProcessStats {
    peak_rss_kib: u64,
    cpu: Cpu,
}

/// `tar -c` into one end of a TCP connection, `tar -x` from the other.
fn tar_pipe(source: &Path, destination: &Path, with_stats: bool) -> Result<TarRun> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let sending = TcpStream::connect(listener.local_addr()?)?;
    let (receiving, _) = listener.accept()?;
    drop(listener);
    let stats_dir = destination.with_extension("stats");
    std::fs::create_dir_all(&stats_dir)?;
    let (create_stats, extract_stats) = (stats_dir.join("create"), stats_dir.join("extract"));
    // Each Command is dropped right after spawning, so this process keeps no copy of either
    // socket and the extracting tar sees the end of the stream when the creating one exits.
    let started = Instant::now();
    let mut extract = {
        let mut command = timed_command(with_stats, &extract_stats);
        command
            .arg("-C")
            .arg(destination)
            .args(["-xf", "-"])
            .stdin(Stdio::from(OwnedFd::from(receiving)));
        command.spawn().context("cannot start tar -x")?
    };
    let mut create = {
        let mut command = timed_command(with_stats, &create_stats);
        command
            .arg("-C")
            .arg(source)
            .args(["-cf", "-", "."])
            .stdout(Stdio::from(OwnedFd::from(sending)));
        command.spawn().context("cannot start tar -c")?
    };
    let extracted = extract.wait()?;
    let elapsed = started.elapsed();
    let created = create.wait()?;
    if !created.success() || !extracted.success() {
        bail!("the tar pipe failed: tar -c {created}, tar -x {extracted}");
    }
    let run = TarRun {
        elapsed,
        sync_after: Duration::ZERO,
        machine_busy: 0.0,
        create: with_stats
            .then(|| read_gnu_time(&create_stats))
            .transpose()?,
        extract: with_stats
            .then(|| read_gnu_time(&extract_stats))
            .transpose()?,
    };
    std::fs::remove_dir_all(&stats_dir)?;
    Ok(run)
}

/// `tar`, under GNU time when `with_stats`, writing its figures to `stats`.
fn timed_command(with_stats: bool, stats: &Path) -> Command {
    if !with_stats {
        return Command::new("tar");
    }
    let mut command = Command::new(GNU_TIME);
    command.args(["-f", "%M %U %S", "-o"]).arg(stats).arg("tar");
    command
}

fn read_gnu_time(path: &Path) -> Result<ProcessStats> {
    let text = std::fs::read_to_string(path)?;
    let line = text.lines().last().context("GNU time wrote nothing")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [rss, user, system] = fields[..] else {
        bail!("unexpected GNU time output {line:?}");
    };
    Ok(ProcessStats {
        peak_rss_kib: rss.parse()?,
        cpu: Cpu {
            user: user.parse()?,
            system: system.parse()?,
        },
    })
}

fn sync() -> Result<()> {
    if !Command::new("sync").status()?.success() {
        bail!("sync failed");
    }
    Ok(())
}

fn timed_sync() -> Result<Duration> {
    let started = Instant::now();
    sync()?;
    Ok(started.elapsed())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time of a running process so far (`/proc/<pid>/stat`).
fn cpu(pid: u32, ticks: f64) -> Result<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let after_name = stat
        .rsplit_once(')')
        .context("unexpected /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after_name` starts at field 3.
    let (Some(user), Some(system)) = (fields.get(11), fields.get(12)) else {
        bail!("unexpected /proc/<pid>/stat");
    };
    Ok(Cpu {
        user: user.parse::<f64>()? / ticks,
        system: system.parse::<f64>()? / ticks,
    })
}

/// CPU time the whole machine has spent busy since boot, in core-seconds (`/proc/stat`).
fn machine_busy(ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(str::parse::<f64>)
        .collect::<Result<Vec<_>, _>>()?;
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy,
    // and guest time is already counted in user.
    let busy: f64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy / ticks)
}

/// How busy the machine was during a run, and how much of that was someone else: other
/// processes competing for the cores make a run slower than it is.
fn machine(busy: f64, elapsed: Duration, ours: Option<f64>) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut text = format!(
        "machine busy {busy:.2} of {:.2} core-s",
        elapsed.as_secs_f64() * cores as f64
    );
    if let Some(ours) = ours {
        text.push_str(&format!(", others {:.2}", (busy - ours).max(0.0)));
    }
    text
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The middle value by `key` (the upper middle for an even count).
fn median<T: Copy>(values: &[T], key: impl Fn(&T) -> f64) -> Option<T> {
    let mut values = values.to_vec();
    values.sort_by(|a, b| key(a).total_cmp(&key(b)));
    values.get(values.len() / 2).copied()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

struct Report<'a> {
    settings: &'a Settings,
    chunk_size: u32,
    hub_rss_mib: f64,
    site_rss_mib: f64,
    broker_runs: Vec<BrokerRun>,
    tar_runs: Vec<TarRun>,
}

impl Report<'_> {
    /// Prints the report; true if every target is met.
    fn print(&self) -> bool {
        let s = self.settings;
        let bytes = s.file_bytes();
        let broker = median(&self.broker_runs, |r| r.elapsed.as_secs_f64());
        let tar = median(&self.tar_runs, |r| r.elapsed.as_secs_f64());
        let (Some(broker), Some(tar)) = (broker, tar) else {
            println!("no timed runs");
            return false;
        };
        let tar_peak = |pick: fn(&TarRun) -> Option<ProcessStats>| {
            self.tar_runs
                .iter()
                .filter_map(pick)
                .map(|p| p.peak_rss_kib)
                .max()
                .map_or("n/a".to_owned(), |kib| {
                    format!("{:.1} MiB", kib as f64 / 1024.0)
                })
        };
        let broker_rate = mib_per_s(bytes, broker.elapsed);
        let tar_rate = mib_per_s(bytes, tar.elapsed);
        let ratio = broker_rate / tar_rate;
        let with_sync = (tar.elapsed + tar.sync_after).as_secs_f64() / broker.elapsed.as_secs_f64();

        let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
        let ratio_ok = ratio >= TARGET_RATIO;
        let hub_ok = self.hub_rss_mib < TARGET_RSS_MIB;
        let site_ok = self.site_rss_mib < TARGET_RSS_MIB;
        let lines = [
            String::new(),
            "== broker vs tar pipe over loopback ==".to_owned(),
            format!(
                "tree: {} files, {:.1} MiB of file data ({} MiB + {} x {} bytes); broker tar stream {:.1} MiB",
                s.small_files + 1,
                bytes as f64 / MIB as f64,
                s.large_bytes / MIB,
                s.small_files,
                s.small_bytes,
                broker.stream_bytes as f64 / MIB as f64
            ),
            format!(
                "runs: median of {} after {} warm-up; chunk size {} KiB; compression {}",
                s.runs,
                s.warmup,
                self.chunk_size / 1024,
                if s.gzip { "gzip" } else { "none" }
            ),
            format!(
                "broker (StageIn TRANSFER):  {:7.2} s {broker_rate:7.1} MiB/s  (first chunk applied at {:.2} s, last at {:.2} s; then verify, syncfs, publish)",
                broker.elapsed.as_secs_f64(),
                broker.first_byte.unwrap_or_default().as_secs_f64(),
                broker.last_byte.unwrap_or_default().as_secs_f64()
            ),
            format!(
                "tar pipe (tar | tcp | tar): {:7.2} s {tar_rate:7.1} MiB/s  (a sync right after took {:.2} s more)",
                tar.elapsed.as_secs_f64(),
                tar.sync_after.as_secs_f64()
            ),
            format!(
                "ratio broker/tar:           {ratio:7.2}  (against tar followed by sync: {with_sync:.2})"
            ),
            format!(
                "peak RSS: hub broker {:.1} MiB, site broker {:.1} MiB, tar -c {}, tar -x {}",
                self.hub_rss_mib,
                self.site_rss_mib,
                tar_peak(|r| r.create),
                tar_peak(|r| r.extract)
            ),
            format!(
                "cpu of the median runs: hub broker {}, site broker {}, tar -c {}, tar -x {}",
                broker.hub_cpu,
                broker.site_cpu,
                show_cpu(tar.create.map(|p| p.cpu)),
                show_cpu(tar.extract.map(|p| p.cpu))
            ),
            format!(
                "load during the median runs: brokers: {}; tar pipe: {}",
                machine(
                    broker.machine_busy,
                    broker.elapsed,
                    Some(broker.hub_cpu.total() + broker.site_cpu.total())
                ),
                machine(
                    tar.machine_busy,
                    tar.elapsed,
                    tar.create
                        .zip(tar.extract)
                        .map(|(c, x)| c.cpu.total() + x.cpu.total())
                ),
            ),
            format!(
                "{} throughput ratio {ratio:.2} >= {TARGET_RATIO}",
                verdict(ratio_ok)
            ),
            format!(
                "{} hub broker peak RSS {:.1} MiB < {TARGET_RSS_MIB} MiB",
                verdict(hub_ok),
                self.hub_rss_mib
            ),
            format!(
                "{} site broker peak RSS {:.1} MiB < {TARGET_RSS_MIB} MiB",
                verdict(site_ok),
                self.site_rss_mib
            ),
        ];
        let mut out = std::io::stdout().lock();
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        ratio_ok && hub_ok && site_ok
    }
}

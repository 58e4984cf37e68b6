//! pfcon's REST API under load, against `dispatch up --pfcon-listen` (release build, local
//! backend, zipfile mode) on loopback, each figure beside a baseline from the same run:
//!
//! 1. authenticated server-info GETs (`pluginjobs/`), requests/s and p50/p99, against
//!    unauthenticated `health/` GETs on the same server (the floor of HTTP on this
//!    machine);
//! 2. plugin-job POSTs (a small zip each), requests/s and p99: on a hub with no site, where
//!    the jobs stay queued (the API alone, as with a no-op backend), then on the hub whose
//!    local site runs each job (`/bin/true`) as it comes;
//! 3. the round trip of a tree of `BENCH_PFCON_FILES` (10,000) files and
//!    `BENCH_PFCON_MIB` (800) MiB: the zip POST, and the output zip GET once the job
//!    copied its inputs to its outputs, each timed against `tar -c | TCP | tar -x` of the
//!    same tree, with the peak RSS of the whole `dispatch up` process (hub and site).
//!
//! The aims: at least 20,000 GETs/s and 2,000 POSTs/s, each direction at most
//! 1.3x the raw pipe, RSS at most 128 MiB. For reference, pfcon 6.0.6 serves that GET at
//! about 2,100/s here and needs 10 s in and 23.5 s out for such a tree, peaking at 1.5 GiB.
//!
//! GETs are driven by `wrk` when it is installed (scripts/bench.sh installs it), else by
//! threads of a Rust client, which spend more CPU than the server does.
//!
//! Environment: `BENCH_PFCON_GETS` (20,000; without wrk), `BENCH_PFCON_POSTS` (2,000),
//! `BENCH_PFCON_CONCURRENCY` (16), `BENCH_PFCON_FILES`, `BENCH_PFCON_MIB`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_testkit::{ServiceBinary, TestDir, multipart_body, write_pattern_file};

const DISPATCH: &str = env!("CARGO_BIN_EXE_dispatch");
const PASSWORD: &str = "bench-password";
const BOUNDARY: &str = "dispatch-bench-boundary-51c3";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1800)))
        .build()
        .into()
}

/// Latencies of one load run.
struct Run {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Run {
    fn show(&self, what: &str) {
        println!(
            "{what:<34} {:>8.0}/s  p50 {:.2} ms  p99 {:.2} ms",
            self.per_second, self.p50_ms, self.p99_ms
        );
    }
}

/// `total` calls of `call` from `concurrency` threads, each with its own keep-alive agent.
fn load(
    total: usize,
    concurrency: usize,
    call: impl Fn(&ureq::Agent, usize) -> Result<()> + Send + Sync + 'static,
) -> Result<Run> {
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let agent = agent();
                let mut took = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(took);
                    }
                    let at = Instant::now();
                    call(&agent, i)?;
                    took.push(at.elapsed());
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for worker in workers {
        all.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let at =
        |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Ok(Run {
        per_second: total as f64 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}

/// `wrk` (Debian's package; scripts/bench.sh installs it) at `url` for 10 s with
/// `concurrency` connections: a load generator light enough that the server, not the
/// client, is measured. `None` when wrk is not installed.
fn wrk(url: &str, bearer: Option<&str>, concurrency: usize) -> Result<Option<Run>> {
    let mut command = Command::new("wrk");
    command.args(["-t2", &format!("-c{concurrency}"), "-d10s", "--latency"]);
    if let Some(bearer) = bearer {
        command.args(["-H", &format!("Authorization: {bearer}")]);
    }
    let output = match command.arg(url).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw failed requests at {url}:\n{text}");
    }
    let millis = |word: &str| -> Option<f64> {
        let (number, factor) = if let Some(n) = word.strip_suffix("us") {
            (n, 0.001)
        } else if let Some(n) = word.strip_suffix("ms") {
            (n, 1.0)
        } else {
            (word.strip_suffix('s')?, 1000.0)
        };
        number.parse::<f64>().ok().map(|n| n * factor)
    };
    let field = |label: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(label)
                .map(str::trim)
                .map(str::to_owned)
        })
    };
    let run = Run {
        per_second: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("wrk printed no Requests/sec")?,
        p50_ms: field("50%").and_then(|v| millis(&v)).context("no p50")?,
        p99_ms: field("99%").and_then(|v| millis(&v)).context("no p99")?,
    };
    Ok(Some(run))
}

fn get_ok(agent: &ureq::Agent, url: &str, bearer: Option<&str>) -> Result<()> {
    let mut request = agent.get(url);
    if let Some(bearer) = bearer {
        request = request.header("Authorization", bearer);
    }
    let mut response = request.call()?;
    let status = response.status().as_u16();
    response.body_mut().read_to_vec()?;
    if status != 200 {
        bail!("GET {url}: {status}");
    }
    Ok(())
}

fn plugin_fields(jid: &str) -> Vec<(&'static str, String)> {
    vec![
        ("jid", jid.to_owned()),
        ("image", "local/none:0".into()),
        ("entrypoint", "/bin/sh".into()),
        ("entrypoint", "-c".into()),
        ("entrypoint", "cp -R \"$1\"/. \"$2\"/".into()),
        ("entrypoint", "copy".into()),
        ("type", "ds".into()),
        ("auid", "bench".into()),
        ("number_of_workers", "1".into()),
        ("cpu_limit", "100".into()),
        ("memory_limit", "256".into()),
        ("gpu_limit", "0".into()),
    ]
}

fn post(
    agent: &ureq::Agent,
    url: &str,
    bearer: &str,
    body: impl Read + Send + 'static,
) -> Result<serde_json::Value> {
    let mut response = agent
        .post(url)
        .header("Authorization", bearer)
        .header(
            "Content-Type",
            &format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .send(ureq::SendBody::from_owned_reader(body))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    if status != 201 {
        bail!("POST {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// A tree of `files` files adding up to `bytes`, of data that does not compress.
fn make_tree(root: &Path, files: usize, bytes: u64) -> Result<()> {
    let per_file = bytes / files as u64;
    for i in 0..files {
        let path = root.join(format!("series-{:03}/slice-{i:05}.dcm", i / 100));
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        write_pattern_file(&path, per_file, i as u64)?;
    }
    Ok(())
}

/// Zips `root` as CUBE would (stored: the data does not shrink).
fn zip_tree(root: &Path, out: &Path) -> Result<()> {
    let mut writer = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                paths.push(entry.path());
            }
        }
    }
    paths.sort();
    for path in paths {
        let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        writer.start_file(name, options)?;
        std::io::copy(&mut std::fs::File::open(&path)?, &mut writer)?;
    }
    writer.finish()?.flush()?;
    Ok(())
}

/// `tar -c src | TCP | tar -x dst` on loopback, synced: seconds.
fn tar_pipe(src: &Path, dst: &Path) -> Result<f64> {
    std::fs::create_dir_all(dst)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let started = Instant::now();
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || -> Result<()> {
        let (mut socket, _) = listener.accept()?;
        let mut tar = Command::new("tar")
            .args(["-x", "-f", "-", "-C"])
            .arg(&dst)
            .stdin(Stdio::piped())
            .spawn()?;
        std::io::copy(&mut socket, tar.stdin.as_mut().context("stdin")?)?;
        drop(tar.stdin.take());
        if !tar.wait()?.success() {
            bail!("tar -x failed");
        }
        Ok(())
    });
    let mut sender = Command::new("tar")
        .args(["-c", "-f", "-", "-C"])
        .arg(src)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut socket = std::net::TcpStream::connect(address)?;
    std::io::copy(sender.stdout.as_mut().context("stdout")?, &mut socket)?;
    drop(socket);
    if !sender.wait()?.success() {
        bail!("tar -c failed");
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the tar receiver panicked"))??;
    Command::new("sync").status()?;
    Ok(started.elapsed().as_secs_f64())
}

/// `dispatch up` with pfcon's API on loopback, data in `data_dir` (with its local site
/// unless `no_site`), and a bearer token for it: the process, the API's base URL, the
/// `Authorization` value.
fn start_hub(data_dir: &Path, no_site: bool) -> Result<(ServiceBinary, String, String)> {
    let mut up = Command::new(DISPATCH);
    up.env("PFCON_PASSWORD", PASSWORD).args([
        "up",
        "--listen",
        "127.0.0.1:0",
        "--broker-listen",
        "127.0.0.1:0",
        "--pfcon-listen",
        "127.0.0.1:0",
    ]);
    if no_site {
        up.arg("--no-site");
    } else {
        up.args(["--backend", "local"]);
    }
    up.arg("--data-dir").arg(data_dir);
    let log = data_dir.with_extension("log");
    let hub = ServiceBinary::spawn(up, "pfcon API serving", log)?;
    let api = format!("{}/api/v1/", hub.uri);
    let login: serde_json::Value = serde_json::from_str(
        &agent()
            .post(&format!("{api}auth-token/"))
            .send_json(serde_json::json!({"pfcon_user": "pfcon", "pfcon_password": PASSWORD}))?
            .body_mut()
            .read_to_string()?,
    )?;
    let bearer = format!("Bearer {}", login["token"].as_str().context("no token")?);
    Ok((hub, api, bearer))
}

fn main() -> Result<()> {
    let gets = env_or("BENCH_PFCON_GETS", 20_000);
    let posts = env_or("BENCH_PFCON_POSTS", 2_000);
    let concurrency = env_or("BENCH_PFCON_CONCURRENCY", 16);
    let files = env_or("BENCH_PFCON_FILES", 10_000);
    let mib = env_or("BENCH_PFCON_MIB", 800) as u64;

    let dir = TestDir::new("pfcon-bench")?;
    let (hub, api, bearer) = start_hub(&dir.join("hub"), false)?;
    // The local site joins just after the hub starts.
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "pfcon API benchmark: dispatch up (release, local backend, zipfile mode), {concurrency} clients"
    );

    let health = format!("{api}health/");
    let info = format!("{api}pluginjobs/");
    let (baseline, served, tool) = match (
        wrk(&health, None, concurrency)?,
        wrk(&info, Some(&bearer), concurrency)?,
    ) {
        (Some(baseline), Some(served)) => (baseline, served, "wrk"),
        _ => {
            let info_bearer = bearer.clone();
            let info_url = info.clone();
            (
                load(gets, concurrency, move |agent, _| {
                    get_ok(agent, &health, None)
                })?,
                load(gets, concurrency, move |agent, _| {
                    get_ok(agent, &info_url, Some(&info_bearer))
                })?,
                "threads of ureq (install wrk for a lighter client)",
            )
        }
    };
    println!("GETs driven by {tool}");
    baseline.show("baseline: GET health/ (no auth)");
    served.show("GET pluginjobs/ (server info)");

    let small = dir.join("small.zip");
    {
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&small)?);
        writer.start_file("input.txt", zip::write::SimpleFileOptions::default())?;
        writer.write_all(b"a small input\n")?;
        writer.finish()?;
    }
    let small_bytes = Arc::new(std::fs::read(&small)?);
    let post_load = |api: &str, bearer: &str, prefix: &'static str| {
        let url = format!("{api}pluginjobs/");
        let bearer = bearer.to_owned();
        let small_bytes = small_bytes.clone();
        load(posts, concurrency, move |agent, i| {
            let body = multipart_body(
                BOUNDARY,
                &plugin_fields(&format!("{prefix}-{i}")),
                std::io::Cursor::new(small_bytes.to_vec()),
            );
            post(agent, &url, &bearer, body).map(|_| ())
        })
    };
    // The API alone: a hub with no site, where posted jobs stay queued (no backend runs).
    let (queue_only, queue_api, queue_bearer) = start_hub(&dir.join("queue-only"), true)?;
    let posted = post_load(&queue_api, &queue_bearer, "bench-queued")?;
    posted.show("POST pluginjobs/ (small zip, no site: the API alone)");
    drop(queue_only);
    // The same with the jobs placed on the local site and run there as they come.
    let posted_running = post_load(&api, &bearer, "bench-post")?;
    posted_running.show("POST pluginjobs/ (small zip, jobs run at the local site)");

    // The round trip of a large tree, against tar over TCP.
    let tree = dir.join("tree");
    make_tree(&tree, files, mib << 20)?;
    let tar_seconds = tar_pipe(&tree, &dir.join("tar-copy"))?;
    let zip_path = dir.join("tree.zip");
    zip_tree(&tree, &zip_path)?;
    let started = Instant::now();
    let body = multipart_body(
        BOUNDARY,
        &plugin_fields("bench-large"),
        std::fs::File::open(&zip_path)?,
    );
    post(&agent(), &format!("{api}pluginjobs/"), &bearer, body)?;
    let in_seconds = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let job: serde_json::Value = serde_json::from_str(
            &agent()
                .get(&format!("{api}pluginjobs/bench-large/"))
                .header("Authorization", &bearer)
                .call()?
                .body_mut()
                .read_to_string()?,
        )?;
        match job["compute"]["status"].as_str() {
            Some("finishedSuccessfully") => break,
            Some("finishedWithError" | "undefined") => bail!("the large job failed: {job}"),
            _ if Instant::now() > deadline => bail!("the large job did not end: {job}"),
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    let started = Instant::now();
    let mut response = agent()
        .get(&format!("{api}pluginjobs/bench-large/file/"))
        .header("Authorization", &bearer)
        .call()?;
    let saved = dir.join("out.zip");
    std::io::copy(
        &mut response.body_mut().as_reader(),
        &mut std::fs::File::create(&saved)?,
    )?;
    let out_seconds = started.elapsed().as_secs_f64();
    let returned = zip::ZipArchive::new(std::fs::File::open(&saved)?)?.len();
    if returned < files {
        bail!("the output zip holds {returned} entries, fewer than the {files} sent");
    }
    let peak_mib = hub.peak_rss_kib()? / 1024;

    println!("results ({mib} MiB in {files} files for the round trip)");
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "  GET server info        {:>8.0}/s  p99 {:.2} ms  target >= 20000/s  {}  ({:.2}x health/; pfcon 6.0.6: ~2,100/s)",
        served.per_second,
        served.p99_ms,
        verdict(served.per_second >= 20_000.0),
        served.per_second / baseline.per_second
    );
    println!(
        "  POST plugin job        {:>8.0}/s  p99 {:.2} ms  target >= 2000/s  {}  (no site; {:.0}/s with the jobs running at a local site)",
        posted.per_second,
        posted.p99_ms,
        verdict(posted.per_second >= 2_000.0),
        posted_running.per_second
    );
    println!(
        "  zip in                 {in_seconds:>8.1} s  {:.2}x tar|tcp|tar ({tar_seconds:.1} s)  target <= 1.3x  {}",
        in_seconds / tar_seconds,
        verdict(in_seconds / tar_seconds <= 1.3)
    );
    println!(
        "  zip out                {out_seconds:>8.1} s  {:.2}x tar|tcp|tar  target <= 1.3x  {}",
        out_seconds / tar_seconds,
        verdict(out_seconds / tar_seconds <= 1.3)
    );
    println!(
        "  peak RSS (hub + site)  {peak_mib:>8} MiB  target <= 128 MiB  {}",
        verdict(peak_mib <= 128)
    );
    Ok(())
}

//! The large-data case of pfcon's zipfile mode, where pfcon itself fails (it holds whole
//! zips in memory: FNNDSC/pfcon#155, #120): a 5 GiB input of 20,000 files goes in as one
//! streamed multipart POST and comes back out as one streamed zip, through
//! `dispatch up` (every service of the hub and the site in that one process), whose peak
//! RSS must stay under 128 MiB.
//!
//! `DISPATCH_PFCON_LARGE_MIB` sets the size (default 5120); the test command runs it at
//! 1024 to spare CI's disk (the 5 GiB run needs about 31 GiB free).

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_testkit::images::plugin_host_path;
use dispatch_testkit::{ServiceBinary, TestDir, fill_pattern, multipart_body};

const DISPATCH: &str = env!("CARGO_BIN_EXE_dispatch");
const PASSWORD: &str = "large-data-password";
const FILES: u64 = 20_000;
const RSS_LIMIT_MIB: u64 = 128;

/// Writes the input zip (stored entries, as the data would not shrink) to `path`.
fn write_zip(path: &std::path::Path, total: u64) -> Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut writer = zip::ZipWriter::new(file);
    let per_file = total / FILES;
    let mut noise = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; per_file as usize];
    for i in 0..FILES {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        writer.start_file(format!("series-{:03}/slice-{i:05}.dcm", i / 200), options)?;
        fill_pattern(&mut noise, &mut buf);
        writer.write_all(&buf)?;
    }
    writer.finish()?.flush()?;
    Ok(())
}

#[test]
fn a_large_input_of_twenty_thousand_files_goes_in_and_out_under_128_mib() -> Result<()> {
    let mib: u64 = std::env::var("DISPATCH_PFCON_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5120);
    let total = mib << 20;
    let dir = TestDir::new("pfcon-large")?;
    let zip_path = dir.join("input.zip");
    let made = Instant::now();
    write_zip(&zip_path, total)?;
    eprintln!(
        "large-data: input zip written in {:.1} s",
        made.elapsed().as_secs_f64()
    );

    let mut up = Command::new(DISPATCH);
    up.env("PFCON_PASSWORD", PASSWORD)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
            "--pfcon-listen",
            "127.0.0.1:0",
            "--backend",
            "local",
            "--data-dir",
        ])
        .arg(dir.join("hub"));
    let mut hub = ServiceBinary::spawn(up, "pfcon API serving", dir.join("up.log"))?;
    let api = format!("{}/api/v1/", hub.uri);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1800)))
        .build()
        .into();
    let login: serde_json::Value = serde_json::from_str(
        &agent
            .post(&format!("{api}auth-token/"))
            .send_json(serde_json::json!({"pfcon_user": "pfcon", "pfcon_password": PASSWORD}))?
            .body_mut()
            .read_to_string()?,
    )?;
    let bearer = format!("Bearer {}", login["token"].as_str().context("token")?);

    // The site joins right after the hub starts; a job posted before it did is refused.
    let script = plugin_host_path("copy.sh")?.display().to_string();
    let fields: Vec<(&str, String)> = vec![
        ("jid", "large-1".into()),
        ("image", "local/none:0".into()),
        ("entrypoint", "/bin/sh".into()),
        ("entrypoint", script),
        ("type", "ds".into()),
        ("auid", "cube".into()),
        ("number_of_workers", "1".into()),
        ("cpu_limit", "1000".into()),
        ("memory_limit", "512".into()),
        ("gpu_limit", "0".into()),
    ];
    let boundary = "dispatch-large-boundary-7e1f";
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    let posted = loop {
        let body = multipart_body(boundary, &fields, std::fs::File::open(&zip_path)?);
        let mut response = agent
            .post(&format!("{api}pluginjobs/"))
            .header("Authorization", &bearer)
            .header(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send(ureq::SendBody::from_owned_reader(body))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        if status == 201 {
            break serde_json::from_str::<serde_json::Value>(&text)?;
        }
        if Instant::now() > deadline || !text.contains("site") {
            bail!("POST failed ({status}): {text}\n{}", hub.log());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let upload_seconds = started.elapsed().as_secs_f64();
    let ran = Instant::now();
    assert_eq!(posted["data"]["nfiles"], FILES, "{posted}");

    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let text = agent
            .get(&format!("{api}pluginjobs/large-1/"))
            .header("Authorization", &bearer)
            .call()?
            .body_mut()
            .read_to_string()?;
        let job: serde_json::Value = serde_json::from_str(&text)?;
        match job["compute"]["status"].as_str() {
            Some("finishedSuccessfully") => break,
            Some("finishedWithError" | "undefined") => bail!("the job failed: {job}"),
            _ if Instant::now() > deadline => bail!("the job did not end: {job}"),
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }

    let run_seconds = ran.elapsed().as_secs_f64();
    // The output zip, read as it streams: every input file comes back, byte for byte in
    // size, plus the plugin's run.json.
    let started = Instant::now();
    let mut response = agent
        .get(&format!("{api}pluginjobs/large-1/file/"))
        .header("Authorization", &bearer)
        .call()?;
    assert_eq!(response.status().as_u16(), 200);
    // Saved as it arrives (a zip's directory is at its end), then checked from disk.
    let saved = dir.join("output.zip");
    let mut reader = response.body_mut().as_reader();
    std::io::copy(&mut reader, &mut std::fs::File::create(&saved)?)?;
    let download_seconds = started.elapsed().as_secs_f64();
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(std::fs::File::open(&saved)?))?;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut sink = vec![0u8; 1 << 20];
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        loop {
            let n = entry.read(&mut sink)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        files += 1;
    }
    eprintln!(
        "large-data: output zip checked in {:.1} s",
        started.elapsed().as_secs_f64() - download_seconds
    );
    let per_file = total / FILES;
    assert_eq!(files, FILES + 1, "the inputs plus run.json");
    assert!(bytes >= per_file * FILES, "{bytes} bytes came back");

    let peak_mib = hub.peak_rss_kib()? / 1024;
    eprintln!(
        "large-data: {mib} MiB in {FILES} files: in {upload_seconds:.1} s, run and stage {run_seconds:.1} s, out {download_seconds:.1} s; peak RSS of dispatch up (hub and site) {peak_mib} MiB"
    );
    assert!(
        peak_mib < RSS_LIMIT_MIB,
        "peak RSS {peak_mib} MiB is over {RSS_LIMIT_MIB} MiB"
    );
    let stopping = Instant::now();
    assert!(hub.terminate()?, "dispatch up exits 0: {}", hub.log());
    eprintln!(
        "large-data: stopped in {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    Ok(())
}

//! The test harness: starts real services (in-process on a listener bound to port 0, or as
//! their real binaries), builds test trees, compares trees, cuts connections on purpose,
//! and reads a process's peak memory. It holds no assertions of its own and is never a
//! dependency of a service.
//!
//! `RETAIN_TMP=1` keeps every temporary directory a test made (and the logs in it).

pub mod conformance;
pub mod engine_cli;
pub mod fake_coordinator;
pub mod images;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use dispatch_broker::config::BrokerConfig;
use dispatch_broker::grant::GrantKey;

/// A temporary directory that survives the test when `RETAIN_TMP=1`.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory.
    pub fn new(label: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dispatch-{label}-"))
            .tempdir()?;
        let path = dir.path().to_path_buf();
        let retain = std::env::var_os("RETAIN_TMP").is_some_and(|v| v == "1");
        let dir = if retain {
            eprintln!("RETAIN_TMP: keeping {}", path.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Self { dir, path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// True while the directory will be removed on drop.
    pub fn is_temporary(&self) -> bool {
        self.dir.is_some()
    }
}

/// A secret shared by the test's brokers and the grants it mints.
pub struct TestKey {
    /// File holding the secret, for `--grant-key-file`.
    pub file: PathBuf,
    /// The key, for minting grants.
    pub key: GrantKey,
}

impl TestKey {
    /// Writes a fresh random secret into `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let secret = format!(
            "{}{}",
            blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex(),
            std::process::id()
        );
        let file = dir.join("grant.key");
        std::fs::write(&file, &secret)?;
        Ok(Self {
            file,
            key: GrantKey::from_secret(secret.as_bytes())?,
        })
    }

    /// A grant to read and write the whole store for an hour.
    pub fn admin(&self) -> String {
        self.key
            .mint_for("test-admin", &[], &[""], Duration::from_secs(3600))
    }
}

/// A broker running in this process, on a listener bound before it started.
pub struct InProcessBroker {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// Its address.
    pub address: SocketAddr,
    /// Its store root.
    pub store_root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<dispatch_broker::Result<()>>,
}

impl InProcessBroker {
    /// Starts a broker on `store_root` with the configuration `tune` leaves.
    pub async fn start(
        store_root: &Path,
        key: Option<&TestKey>,
        tune: impl FnOnce(&mut BrokerConfig),
    ) -> Result<Self> {
        let mut config = BrokerConfig {
            store_root: store_root.to_path_buf(),
            grant_key_file: key.map(|k| k.file.clone()),
            insecure_no_auth: key.is_none(),
            shutdown_grace_seconds: 10,
            // Tests' temp dirs live on the same disk as everything else: syncing each
            // commit only slows them down without testing anything more.
            sync_on_commit: false,
            ..BrokerConfig::default()
        };
        tune(&mut config);
        config.validate()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatch_broker::server::run(
            Arc::new(config),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            uri: format!("http://{address}"),
            address,
            store_root: store_root.to_path_buf(),
            stop: Some(stop),
            task,
        })
    }

    /// Triggers the shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

/// Path of a workspace binary built next to the running test (`target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test binary location")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --bins` first (the test script does)",
            path.display()
        );
    }
    Ok(path)
}

/// A service running as its real binary (`dispatch-broker`, `dispatch-manager`), its log
/// drained into a file.
pub struct ServiceBinary {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// Its address.
    pub address: SocketAddr,
    child: Child,
    log: PathBuf,
    log_writer: Option<std::thread::JoinHandle<()>>,
}

/// A broker binary (the name the broker's tests use).
pub type BrokerBinary = ServiceBinary;

impl ServiceBinary {
    /// Starts `command` and waits for the log line `<ready> address=<addr>` that every
    /// service prints once it serves, to learn its address (so it may listen on port 0).
    /// The log goes to `log`; an exit before that line is an error carrying the log.
    pub fn spawn(mut command: Command, ready: &str, log: PathBuf) -> Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let pattern = regex::Regex::new(&format!(r"{} address=(\S+)", regex::escape(ready)))?;
        let mut seen = Vec::new();
        let address = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("{program} exited before serving:\n{}", seen.join("\n"));
            };
            let plain = strip_ansi(&line?);
            if let Some(found) = pattern.captures(&plain) {
                break found[1].parse::<SocketAddr>()?;
            }
            seen.push(plain);
        };
        // Keep draining its log into the file so the pipe never fills.
        let log_writer = std::thread::spawn(move || {
            let mut log_file = log_file;
            for line in seen.into_iter().map(Ok).chain(lines) {
                let Ok(line) = line else { break };
                let _ = std::io::Write::write_all(
                    &mut log_file,
                    format!("{}\n", strip_ansi(&line)).as_bytes(),
                );
            }
        });
        Ok(Self {
            uri: format!("http://{address}"),
            address,
            child,
            log,
            log_writer: Some(log_writer),
        })
    }

    /// Starts `dispatch-broker` on `store_root`, on `listen` (port 0 for any). `env` adds
    /// `DISPATCH_BROKER_*` settings.
    pub fn start(
        binary: &Path,
        store_root: &Path,
        key: &TestKey,
        listen: SocketAddr,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .envs(env.iter().copied())
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--store-root")
            .arg(store_root)
            .arg("--grant-key-file")
            .arg(&key.file)
            .env("DISPATCH_BROKER_SYNC_ON_COMMIT", "false")
            .env("DISPATCH_BROKER_SHUTDOWN_GRACE_SECONDS", "10");
        Self::spawn(command, "broker serving", log)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Result<u64> {
        peak_rss_kib(self.child.id())
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.finish_log();
        Ok(())
    }

    /// Waits until everything the process logged is in the log file.
    fn finish_log(&mut self) {
        if let Some(writer) = self.log_writer.take() {
            let _ = writer.join();
        }
    }

    /// Sends SIGTERM and waits for it to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> Result<bool> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("could not signal the service");
        }
        let status = self.child.wait()?;
        self.finish_log();
        Ok(status.success())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Peak resident memory of a process, in KiB (`VmHWM` in `/proc/<pid>/status`).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM line")
}

/// What a tree holds, path by path: kind, size, mode bits and a BLAKE3 of the content.
pub type TreeListing = BTreeMap<String, String>;

/// Lists a tree for comparison (symlinks by target; content by hash).
pub fn tree_listing(root: &Path) -> Result<TreeListing> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if rel == ".dispatch" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)?;
            let mode = meta.permissions().mode() & 0o777;
            let value = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path)?.display())
            } else if meta.is_dir() {
                pending.push(path);
                "dir".to_owned()
            } else {
                let mut hasher = blake3::Hasher::new();
                let mut file = std::fs::File::open(&path)?;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                format!(
                    "file {} {mode:o} {} mtime={}",
                    meta.len(),
                    hasher.finalize().to_hex(),
                    meta.mtime()
                )
            };
            out.insert(rel, value);
        }
    }
    Ok(out)
}

/// Fills `buf` with the next bytes of a xorshift64 stream from `state`: cheap, and no
/// compressor can shrink it, like real image data.
pub fn fill_pattern(state: &mut u64, buf: &mut [u8]) {
    for word in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

/// Writes `len` bytes of deterministic, incompressible-looking data to `path`.
pub fn write_pattern_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut remaining = len;
    let mut block = vec![0u8; 1 << 16];
    while remaining > 0 {
        fill_pattern(&mut state, &mut block);
        let n = remaining.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        remaining -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// A `multipart/form-data` body as python-requests sends one (CUBE's client): the text
/// `fields`, then `file` as the `data_file` part, read as it is sent (never held whole).
pub fn multipart_body<F: std::io::Read + Send + 'static>(
    boundary: &str,
    fields: &[(&str, String)],
    file: F,
) -> impl std::io::Read + Send + use<F> {
    let mut head = Vec::new();
    for (name, value) in fields {
        head.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    head.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"data_file\"; filename=\"data.zip\"\r\nContent-Type: application/zip\r\n\r\n")
            .as_bytes(),
    );
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    std::io::Read::chain(
        std::io::Read::chain(std::io::Cursor::new(head), file),
        std::io::Cursor::new(tail),
    )
}

/// A tree with what breaks naive transfer code: many small files, empty files and dirs,
/// a file larger than a chunk, deep and long names, and names with spaces, unicode,
/// leading dashes, quotes and newlines.
pub fn write_varied_tree(root: &Path, small_files: usize, large_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let small = root.join("many/small");
    std::fs::create_dir_all(&small)?;
    for i in 0..small_files {
        std::fs::write(
            small.join(format!("f{i:05}.txt")),
            format!("small file number {i}\n").repeat(i % 7),
        )?;
    }
    std::fs::create_dir_all(root.join("empty/dir/inside"))?;
    std::fs::write(root.join("empty/zero-bytes"), b"")?;
    write_pattern_file(&root.join("large.bin"), large_bytes, 7)?;
    let odd = root.join("odd names");
    std::fs::create_dir_all(&odd)?;
    for name in [
        "with space.txt",
        "ünïcødé-数据.nii",
        "-leading-dash",
        "quote'\"s",
        "new\nline",
        "tab\there",
        "#hash%percent",
    ] {
        std::fs::write(odd.join(name), name.as_bytes())?;
    }
    let long_dir = root.join("d".repeat(120)).join("e".repeat(200));
    std::fs::create_dir_all(&long_dir)?;
    std::fs::write(long_dir.join("f".repeat(250)), b"long path")?;
    let mut deep = root.join("deep");
    for level in 0..40 {
        deep.push(format!("level{level}"));
    }
    std::fs::create_dir_all(&deep)?;
    std::fs::write(deep.join("bottom"), b"bottom")?;
    let exec = root.join("run.sh");
    std::fs::write(&exec, b"#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A TCP proxy that forwards to `target` but cuts each of the first `cuts` connections
/// once `after_bytes` have passed (both directions counted): a dropped link on demand.
pub struct FlakyProxy {
    /// `http://127.0.0.1:<port>` of the proxy.
    pub uri: String,
    cuts_done: Arc<AtomicUsize>,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyProxy {
    /// Starts the proxy on a listener bound to port 0.
    pub async fn start(target: SocketAddr, cuts: usize, after_bytes: u64) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let cuts_done = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (done, total) = (cuts_done.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            let mut connection = 0usize;
            while let Ok((client, _)) = listener.accept().await {
                let cut = connection < cuts;
                connection += 1;
                let (done, total) = (done.clone(), total.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let limit = if cut { Some(after_bytes) } else { None };
                    if relay(client, server, limit, &total).await {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Self {
            uri: format!("http://{address}"),
            cuts_done,
            bytes,
            task,
        })
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts_done.load(Ordering::SeqCst)
    }

    /// Bytes relayed client-to-server, over all connections.
    pub fn bytes_up(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays both ways; returns true if it cut the connection on purpose (once `limit`
/// bytes have passed, counting both directions).
async fn relay(
    client: TcpStream,
    server: TcpStream,
    limit: Option<u64>,
    total: &AtomicU64,
) -> bool {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    let mut passed = 0u64;
    loop {
        let room = limit.map_or(usize::MAX, |limit| (limit - passed) as usize);
        let moved = tokio::select! {
            read = client_read.read(&mut up) => match read {
                Ok(n) if n > 0 => {
                    let n = n.min(room);
                    total.fetch_add(n as u64, Ordering::SeqCst);
                    server_write.write_all(&up[..n]).await.map(|()| n)
                }
                _ => return false,
            },
            read = server_read.read(&mut down) => match read {
                Ok(n) if n > 0 => {
                    let n = n.min(room);
                    client_write.write_all(&down[..n]).await.map(|()| n)
                }
                _ => return false,
            },
        };
        let Ok(moved) = moved else { return false };
        passed += moved as u64;
        if limit.is_some_and(|limit| passed >= limit) {
            return true;
        }
    }
}

/// Builds tar streams by hand, including entries no well-behaved archiver would write.
pub mod craft {
    /// One entry: a GNU header with `name` written raw (no checks), then `data` padded.
    pub fn entry(name: &[u8], kind: tar::EntryType, data: &[u8], link: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        let n = name.len().min(100);
        header.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        header.as_old_mut().linkname[..l].copy_from_slice(&link[..l]);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// A GNU long-name extension followed by a regular file entry carrying `data`.
    pub fn long_named_file(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut value = name.to_vec();
        value.push(0);
        let mut out = entry(b"././@LongLink", tar::EntryType::GNULongName, &value, b"");
        out.extend(entry(b"placeholder", tar::EntryType::Regular, data, b""));
        out
    }

    /// The end-of-archive marker.
    pub fn end() -> Vec<u8> {
        vec![0u8; 1024]
    }

    /// Entries followed by the end marker.
    pub fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = entries.concat();
        out.extend(end());
        out
    }
}

/// How [`upload_raw_with`] sends.
#[derive(Debug, Clone, Default)]
pub struct RawUpload {
    /// Names the transfer (to resume one); empty for a new one.
    pub transfer_id: String,
    /// Gzip each chunk.
    pub gzip: bool,
}

/// What a raw upload got.
#[derive(Debug, Clone)]
pub struct RawOutcome {
    /// Where the broker said to start.
    pub resumed_at: u64,
    /// The broker's verdict.
    pub committed: dispatch_proto::v1::UploadCommitted,
}

/// Uploads raw tar bytes (valid or not) with correct chunk checksums, as a client that
/// does not check what it sends would; returns the broker's verdict.
pub async fn upload_raw(
    uri: &str,
    grant: &str,
    destination: &str,
    tar: &[u8],
    gzip: bool,
) -> std::result::Result<dispatch_proto::v1::UploadCommitted, tonic::Status> {
    let how = RawUpload {
        transfer_id: String::new(),
        gzip,
    };
    Ok(upload_raw_with(uri, grant, destination, tar, &how)
        .await?
        .committed)
}

/// [`upload_raw`] with a transfer id, reporting where the broker resumed.
pub async fn upload_raw_with(
    uri: &str,
    grant: &str,
    destination: &str,
    tar: &[u8],
    how: &RawUpload,
) -> std::result::Result<RawOutcome, tonic::Status> {
    use dispatch_proto::v1 as pb;
    let gzip = how.gzip;
    let mut client = dispatch_broker::client::BrokerClient::connect(uri, Some(grant))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let chunk_size = 64 * 1024usize;
    let compression = if gzip {
        pb::Compression::Gzip
    } else {
        pb::Compression::None
    };
    let mut messages = vec![pb::UploadRequest {
        message: Some(pb::upload_request::Message::Open(pb::UploadOpen {
            destination: destination.to_owned(),
            transfer_id: how.transfer_id.clone(),
            compression: compression as i32,
            chunk_size: chunk_size as u32,
            ..Default::default()
        })),
    }];
    let mut digest = blake3::Hasher::new();
    for (i, piece) in tar.chunks(chunk_size).enumerate() {
        let hash = blake3::hash(piece);
        digest.update(hash.as_bytes());
        let data = if gzip {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::Write::write_all(&mut encoder, piece)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            encoder
                .finish()
                .map_err(|e| tonic::Status::internal(e.to_string()))?
        } else {
            piece.to_vec()
        };
        messages.push(pb::UploadRequest {
            message: Some(pb::upload_request::Message::Chunk(pb::Chunk {
                offset: (i * chunk_size) as u64,
                data: data.into(),
                length: piece.len() as u32,
                checksum: hash.as_bytes().to_vec().into(),
                compression: 0,
            })),
        });
    }
    messages.push(pb::UploadRequest {
        message: Some(pb::upload_request::Message::Commit(pb::UploadCommit {
            stream_bytes: tar.len() as u64,
            tree_digest: digest.finalize().as_bytes().to_vec().into(),
        })),
    });
    let mut responses = client
        .raw()
        .upload(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut resumed_at = 0;
    while let Some(response) = responses.message().await? {
        match response.message {
            Some(pb::upload_response::Message::Accepted(accepted)) => {
                resumed_at = accepted.resume_offset
            }
            Some(pb::upload_response::Message::Committed(committed)) => {
                return Ok(RawOutcome {
                    resumed_at,
                    committed,
                });
            }
            _ => {}
        }
    }
    Err(tonic::Status::unknown("the upload ended without a verdict"))
}

/// The test suite every [`Store`](dispatch_broker::store::Store) implementation runs from
/// its own tests, so all stores keep the same promises.
pub mod store_suite {
    use std::path::Path;
    use std::sync::Arc;

    use anyhow::{Result, ensure};
    use dispatch_broker::store::{DeleteSummary, EntryInfoKind, ExistingPolicy, Source, Store};
    use dispatch_broker::tree::Walked;
    use dispatch_broker::{Error, StorePath};

    /// Opens (creating if needed) a store rooted at the given directory.
    pub type OpenStore<'a> = &'a dyn Fn(&Path) -> Result<Arc<dyn Store>>;

    fn p(s: &str) -> StorePath {
        StorePath::from_api(s).unwrap_or_default()
    }

    /// Runs every case, each in its own directory under `dir`.
    pub fn run(dir: &Path, open: OpenStore<'_>) -> Result<()> {
        lists_in_walk_order_and_hides_bookkeeping(&dir.join("list"), open)?;
        never_goes_through_planted_symlinks(&dir.join("links"), open)?;
        publishes_whole_trees_by_policy(&dir.join("publish"), open)?;
        walks_skip_links_and_bookkeeping(&dir.join("walk"), open)?;
        Ok(())
    }

    /// Listings page through a tree depth-first in name order, without the store's own files.
    pub fn lists_in_walk_order_and_hides_bookkeeping(
        root: &Path,
        open: OpenStore<'_>,
    ) -> Result<()> {
        let store = open(root)?;
        std::fs::create_dir_all(store.root().join("a/b"))?;
        std::fs::write(store.root().join("a/b/f"), b"123")?;
        std::fs::write(store.root().join("a-c"), b"1")?;
        let all = store.list(&StorePath::root(), true, 0, 100)?;
        let names: Vec<_> = all.iter().map(|e| e.path.as_str()).collect();
        ensure!(names == ["a", "a/b", "a/b/f", "a-c"], "listing {names:?}");
        ensure!(
            all[2].kind == EntryInfoKind::File && all[2].size == 3,
            "{:?}",
            all[2]
        );
        let page = store.list(&StorePath::root(), true, 2, 1)?;
        ensure!(
            page.len() == 1 && page[0].path.as_str() == "a/b/f",
            "page {page:?}"
        );
        let shallow = store.list(&StorePath::root(), false, 0, 100)?;
        ensure!(shallow.len() == 2, "non-recursive listing {shallow:?}");
        ensure!(matches!(
            store.list(&p("nothing"), true, 0, 10),
            Err(Error::NotFound(_))
        ));
        Ok(())
    }

    /// A symlink planted in the store (by a plugin, say) never redirects an operation.
    pub fn never_goes_through_planted_symlinks(root: &Path, open: OpenStore<'_>) -> Result<()> {
        let store = open(&root.join("store"))?;
        let outside = root.join("outside");
        std::fs::create_dir_all(&outside)?;
        std::fs::write(outside.join("secret"), b"x")?;
        std::os::unix::fs::symlink(&outside, store.root().join("evil"))?;
        ensure!(matches!(
            store.stat(&p("evil/secret")),
            Err(Error::PermissionDenied(_))
        ));
        ensure!(store.delete(&p("evil/secret")).is_err());
        ensure!(
            store
                .walk(&Source::Tree {
                    path: p("evil/x"),
                    skip_chrislinks: false
                })
                .is_err()
        );
        let area = store.transfer_area("planted")?;
        std::fs::create_dir_all(area.join("tree"))?;
        ensure!(
            store
                .publish(&area.join("tree"), &p("evil/dest"), ExistingPolicy::Fail)
                .is_err()
        );
        ensure!(
            !outside.join("dest").exists(),
            "published through a symlink"
        );
        // Deleting the link removes the link, not what it points to.
        store.delete(&p("evil"))?;
        ensure!(outside.join("secret").exists());
        Ok(())
    }

    /// A tree is published whole, or refused, as the policy says; deletes count and replay.
    pub fn publishes_whole_trees_by_policy(root: &Path, open: OpenStore<'_>) -> Result<()> {
        let store = open(root)?;
        let stage = |content: &str| -> Result<std::path::PathBuf> {
            let tree = store.transfer_area(content)?.join("tree");
            std::fs::create_dir_all(&tree)?;
            std::fs::write(tree.join("f"), content)?;
            Ok(tree)
        };
        store.publish(&stage("one")?, &p("k/incoming"), ExistingPolicy::Fail)?;
        let refused = store.publish(&stage("two")?, &p("k/incoming"), ExistingPolicy::Fail);
        ensure!(
            matches!(refused, Err(Error::AlreadyExists(_))),
            "{refused:?}"
        );
        ensure!(std::fs::read_to_string(store.root().join("k/incoming/f"))? == "one");
        store.publish(&stage("three")?, &p("k/incoming"), ExistingPolicy::Replace)?;
        ensure!(std::fs::read_to_string(store.root().join("k/incoming/f"))? == "three");
        for id in ["one", "two", "three"] {
            store.discard_transfer(id)?;
        }
        let summary = store.delete(&p("k"))?;
        ensure!(
            summary
                == DeleteSummary {
                    removed_entries: 3,
                    removed_bytes: 5
                },
            "{summary:?}"
        );
        ensure!(store.delete(&p("k"))? == DeleteSummary::default());
        ensure!(
            store.delete(&StorePath::root()).is_err(),
            "the root must not be deletable"
        );
        Ok(())
    }

    /// Walks are deterministic, never include symlinks or the store's own directory, and
    /// leave out `.chrislink` files when asked.
    pub fn walks_skip_links_and_bookkeeping(root: &Path, open: OpenStore<'_>) -> Result<()> {
        let store = open(root)?;
        std::fs::create_dir_all(store.root().join("out/sub"))?;
        std::fs::write(store.root().join("out/sub/r.txt"), b"r")?;
        std::fs::write(store.root().join("out/x.chrislink"), b"home/y")?;
        std::os::unix::fs::symlink("/etc", store.root().join("out/etc"))?;
        let names = |source: &Source| -> Result<Vec<String>> {
            store
                .walk(source)?
                .map(|item| {
                    Ok(match item? {
                        Walked::Entry(entry) => entry.path.to_string(),
                        Walked::Skipped { path, .. } => format!("skipped {path}"),
                    })
                })
                .collect()
        };
        let outputs = Source::Tree {
            path: p("out"),
            skip_chrislinks: true,
        };
        let first = names(&outputs)?;
        ensure!(
            first == ["skipped etc", "sub", "sub/r.txt", "skipped x.chrislink"],
            "{first:?}"
        );
        ensure!(names(&outputs)? == first, "walks must repeat exactly");
        let everything = names(&Source::Tree {
            path: StorePath::root(),
            skip_chrislinks: false,
        })?;
        ensure!(
            !everything.iter().any(|n| n.contains(".dispatch")),
            "{everything:?}"
        );
        Ok(())
    }
}

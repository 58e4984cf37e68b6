//! A job's log is the output file Slurm writes on the node (`output.log`, stdout and
//! stderr interleaved): its last lines without reading it whole, and following it as it
//! grows until the job has ended.

use std::future::Future;
use std::io::{self, SeekFrom};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use dispatch_manager::backend::{BackendError, LogStream};
use dispatch_manager::log_file::tail_start;

/// Bytes read at a time, backwards (finding the tail) and forwards (streaming).
const CHUNK: usize = 64 * 1024;
/// How often a follower looks for new output.
const POLL: Duration = Duration::from_millis(200);
/// How often a follower asks whether the job has ended.
const ENDED_CHECK: Duration = Duration::from_millis(500);

/// Answers whether the job has ended (`Err`: it cannot be told; the follower stops).
pub(crate) type EndedCheck =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<bool, BackendError>> + Send>> + Send + Sync>;

struct Reader {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    /// Where the next read starts.
    offset: u64,
    /// Without follow: bytes left to give.
    remaining: Option<u64>,
    ended: EndedCheck,
    /// Set once the job has ended: one last drain, then the end.
    draining: bool,
    last_check: Option<Instant>,
    buf: Vec<u8>,
}

/// Streams the file at `path` from its last `tail` lines (all when `None`). Without
/// `follow` the stream stops at the end the file had when asked (a file not written yet
/// gives nothing); with it, it polls until `ended` says so and what was written is drained.
pub(crate) async fn stream(
    path: PathBuf,
    tail: Option<u32>,
    follow: bool,
    ended: EndedCheck,
) -> Result<LogStream, BackendError> {
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> io::Result<Option<(std::fs::File, u64, u64)>> {
            let mut file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            let start = match tail {
                Some(lines) => tail_start(&mut file, len, lines)?,
                None => 0,
            };
            Ok(Some((file, start, len)))
        })
        .await
        .map_err(|e| BackendError::Engine(format!("the log reader failed: {e}")))??
    };
    let (file, offset, len) = match opened {
        Some((file, start, len)) => (Some(tokio::fs::File::from_std(file)), start, len),
        None => (None, 0, 0),
    };
    let reader = Reader {
        path,
        file,
        offset,
        remaining: if follow { None } else { Some(len - offset) },
        ended,
        draining: false,
        last_check: None,
        buf: vec![0; CHUNK],
    };
    Ok(Box::pin(futures::stream::unfold(reader, Reader::next)))
}

impl Reader {
    async fn read_some(&mut self) -> Result<usize, BackendError> {
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(0);
        };
        file.seek(SeekFrom::Start(self.offset)).await?;
        let want = match self.remaining {
            Some(left) => usize::try_from(left).unwrap_or(CHUNK).min(CHUNK),
            None => CHUNK,
        };
        let read = file.read(&mut self.buf[..want]).await?;
        self.offset += read as u64;
        if let Some(left) = self.remaining.as_mut() {
            *left -= read as u64;
        }
        Ok(read)
    }

    async fn next(mut self) -> Option<(Result<Bytes, BackendError>, Self)> {
        loop {
            if self.remaining == Some(0) {
                return None;
            }
            match self.read_some().await {
                Ok(0) => {}
                Ok(read) => {
                    let bytes = Bytes::copy_from_slice(&self.buf[..read]);
                    return Some((Ok(bytes), self));
                }
                Err(error) => {
                    self.remaining = Some(0);
                    return Some((Err(error), self));
                }
            }
            // Nothing more for now.
            if self.remaining.is_some() || self.draining {
                return None;
            }
            let due = self.last_check.is_none_or(|at| at.elapsed() >= ENDED_CHECK);
            if due {
                self.last_check = Some(Instant::now());
                match (self.ended)().await {
                    // Read once more: the job may have written its last lines meanwhile.
                    Ok(true) => {
                        self.draining = true;
                        continue;
                    }
                    Ok(false) => {}
                    Err(error) => {
                        self.remaining = Some(0);
                        return Some((Err(error), self));
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

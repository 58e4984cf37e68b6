//! Reading a job's log file: its last lines without reading it whole, and following it as
//! it grows until the job has ended.

use std::io::{self, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use dispatch_manager::backend::{BackendError, LogStream};
use dispatch_manager::log_file::tail_start;

/// Bytes read at a time, backwards (finding the tail) and forwards (streaming).
const CHUNK: usize = 64 * 1024;

/// How often a follower looks for new output.
const POLL: Duration = Duration::from_millis(100);

/// Streams the job's log from its last `tail` lines (all when `None`). Without `follow`
/// the stream stops at the end the file had when asked; with it, it keeps polling until
/// `ended` turns true (or its sender goes) and what was written before is drained.
pub(crate) async fn stream(
    path: PathBuf,
    tail: Option<u32>,
    follow: bool,
    ended: watch::Receiver<bool>,
) -> Result<LogStream, BackendError> {
    let (file, start, len) = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        let start = match tail {
            Some(lines) => tail_start(&mut file, len, lines)?,
            None => 0,
        };
        Ok::<_, io::Error>((file, start, len))
    })
    .await
    .map_err(|e| BackendError::Engine(format!("log reader failed: {e}")))??;
    let mut file = tokio::fs::File::from_std(file);
    file.seek(SeekFrom::Start(start)).await?;
    let reader = Reader {
        file,
        remaining: if follow { None } else { Some(len - start) },
        ended,
        sender_gone: false,
        buf: vec![0; CHUNK],
    };
    Ok(Box::pin(futures::stream::unfold(reader, Reader::next)))
}

struct Reader {
    file: tokio::fs::File,
    /// Bytes left to send when not following.
    remaining: Option<u64>,
    ended: watch::Receiver<bool>,
    sender_gone: bool,
    buf: Vec<u8>,
}

impl Reader {
    /// The next chunk, or `None` at the end. An error ends the stream after it is sent.
    async fn next(mut self) -> Option<(Result<Bytes, BackendError>, Self)> {
        loop {
            // Read the flag before reading the file: once it is true, every byte the job
            // wrote is already in the file, so an empty read after it means the end.
            let ended = self.sender_gone || *self.ended.borrow();
            let want = match self.remaining {
                Some(0) => return None,
                Some(left) => usize::try_from(left).unwrap_or(CHUNK).min(CHUNK),
                None => CHUNK,
            };
            let n = match self.file.read(&mut self.buf[..want]).await {
                Ok(n) => n,
                Err(e) => {
                    self.remaining = Some(0);
                    return Some((Err(e.into()), self));
                }
            };
            if n > 0 {
                if let Some(left) = self.remaining.as_mut() {
                    *left -= n as u64;
                }
                return Some((Ok(Bytes::copy_from_slice(&self.buf[..n])), self));
            }
            if self.remaining.is_some() || ended {
                return None;
            }
            self.wait_for_output().await;
        }
    }

    /// Waits a poll interval, or less if the job ends meanwhile.
    async fn wait_for_output(&mut self) {
        if let Ok(Err(_)) = tokio::time::timeout(POLL, self.ended.changed()).await {
            self.sender_gone = true;
        }
    }
}

//! The receiving loop shared by the broker's upload handler and the client's download:
//! apply chunks, then on the sender's final word verify, sync, publish and clean up; on
//! an interruption keep a resumable journal; on a refusal discard what arrived.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use dispatch_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::path::StorePath;
use crate::store::{ExistingPolicy, Store};
use crate::transfer::{Compression, Receiver, TreeSummary, VerifiedChunk, verify_chunk};

/// What the network side hands the receiving loop.
pub(crate) enum Incoming {
    /// The next chunk.
    Chunk(pb::Chunk),
    /// The sender's last word: the stream's length and its tree digest.
    Finish {
        /// Length of the whole tar stream.
        stream_bytes: u64,
        /// The sender's digest.
        digest: Bytes,
        /// Entries the sender left out on purpose, for the summary.
        skipped: u64,
    },
}

/// What the verifying thread hands the writing one.
enum Checked {
    Chunk(Result<VerifiedChunk>),
    Finish(u64, Bytes, u64),
}

/// Checks each chunk as it arrives; stops at the first refused chunk, the sender's last
/// word, or when the writer stops listening.
fn verify_incoming(
    mut incoming: mpsc::Receiver<Incoming>,
    verified: &std::sync::mpsc::SyncSender<Checked>,
    chunk_size: u32,
    compression: Compression,
) {
    while let Some(item) = incoming.blocking_recv() {
        let checked = match item {
            Incoming::Chunk(chunk) => Checked::Chunk(verify_chunk(&chunk, chunk_size, compression)),
            Incoming::Finish {
                stream_bytes,
                digest,
                skipped,
            } => Checked::Finish(stream_bytes, digest, skipped),
        };
        let last = !matches!(checked, Checked::Chunk(Ok(_)));
        if verified.send(checked).is_err() || last {
            return;
        }
    }
}

/// Where a received tree lands, and how.
pub(crate) struct Landing {
    pub store: Arc<dyn Store>,
    pub transfer_id: String,
    pub destination: StorePath,
    pub policy: ExistingPolicy,
    pub sync: bool,
}

/// After an error: is the transfer worth resuming?
fn keeps_transfer(error: &Error) -> bool {
    !matches!(
        error,
        Error::EntryRefused { .. }
            | Error::LimitExceeded(_)
            | Error::MalformedArchive { .. }
            | Error::DigestMismatch { .. }
            | Error::InvalidArgument { .. }
    )
}

impl Landing {
    /// Runs on a blocking thread until the sender finishes (`Ok(Some)`), the channel closes
    /// first (`Ok(None)`, journal saved), or something fails.
    pub fn receive(
        &self,
        mut receiver: Receiver,
        incoming: mpsc::Receiver<Incoming>,
        mut on_progress: impl FnMut(u64),
    ) -> Result<Option<TreeSummary>> {
        let (chunk_size, compression) =
            (receiver.params().chunk_size, receiver.params().compression);
        // Checksums (and gzip) are checked on a second thread while this one writes
        // files, so a receiver uses two cores where it has them.
        let (verified, checked) = std::sync::mpsc::sync_channel(2);
        let finish = std::thread::scope(|scope| {
            scope.spawn(move || verify_incoming(incoming, &verified, chunk_size, compression));
            for item in checked {
                match item {
                    Checked::Chunk(Ok(chunk)) => {
                        if let Err(error) = receiver.apply(chunk) {
                            return Err(self.after_error(error));
                        }
                        on_progress(receiver.next_offset());
                    }
                    Checked::Chunk(Err(error)) => {
                        // Nothing of the refused chunk was applied: save the state so the
                        // retry starts right at it.
                        receiver.checkpoint()?;
                        return Err(self.after_error(error));
                    }
                    Checked::Finish(stream_bytes, digest, skipped) => {
                        return Ok(Some((stream_bytes, digest, skipped)));
                    }
                }
            }
            receiver.checkpoint()?;
            Ok(None)
        })?;
        let Some(finish) = finish else {
            return Ok(None);
        };
        let (stream_bytes, digest, skipped) = finish;
        let landed = receiver
            .finish(stream_bytes, &digest)
            .and_then(|(mut summary, staged)| {
                summary.counts.skipped = skipped;
                if self.sync {
                    self.store.sync()?;
                }
                self.store
                    .publish(&staged, &self.destination, self.policy)?;
                self.store.discard_transfer(&self.transfer_id)?;
                Ok(summary)
            });
        landed.map(Some).map_err(|error| self.after_error(error))
    }

    fn after_error(&self, error: Error) -> Error {
        if !keeps_transfer(&error)
            && let Err(e) = self.store.discard_transfer(&self.transfer_id)
        {
            {
                tracing::warn!(transfer = %self.transfer_id, error = %e, "could not discard a refused transfer");
            }
        }
        error
    }
}

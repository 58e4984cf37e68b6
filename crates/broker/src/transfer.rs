//! The transfer protocol's two ends, independent of gRPC: a [`ChunkSource`] cuts a tar
//! stream into checksummed chunks, a [`Receiver`] verifies and applies them and keeps a
//! journal so it can resume after a dropped connection or a killed process.
//!
//! Chunks are a fixed size of uncompressed tar bytes (the last may be shorter), so chunk
//! boundaries and hashes are the same in every attempt of a transfer, and the tree digest
//! (BLAKE3 of the concatenated chunk hashes) can be computed by either end from its own
//! chunk hashes, without holding the stream.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use dispatch_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::extract::ExtractRoot;
use crate::tar_decode::{ArchiveLimits, DecoderState, TarDecoder};
use crate::tar_encode::{TarEncoder, TreeCounts};
use crate::tree::TreeWalk;

/// Chunk size used when the client does not choose one.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size accepted: smaller chunks cost more in headers than they carry.
pub const MIN_CHUNK_SIZE: u32 = 16 << 10;
/// Largest chunk size accepted: keeps each message well under gRPC's size limit.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// The receiver saves its journal after this many bytes by default: what a crash can cost
/// to resend.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 32 << 20;
/// The expansion ratio is judged only after this many tar bytes, so small archives of
/// zeros are not refused.
const RATIO_GRACE_BYTES: u64 = 1 << 20;

/// How chunks are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As is.
    None,
    /// Each chunk gzip-compressed on its own (fast level: the network is rarely slower
    /// than the compressor on a LAN).
    Gzip,
}

impl Compression {
    /// From the wire enum (unknown values are refused).
    pub fn from_wire(value: i32) -> Result<Self> {
        match pb::Compression::try_from(value) {
            Ok(pb::Compression::Unspecified | pb::Compression::None) => Ok(Self::None),
            Ok(pb::Compression::Gzip) => Ok(Self::Gzip),
            Err(_) => Err(Error::invalid(
                "compression",
                format!("unknown value {value}; use NONE or GZIP"),
            )),
        }
    }

    /// To the wire enum.
    pub fn to_wire(self) -> pb::Compression {
        match self {
            Self::None => pb::Compression::None,
            Self::Gzip => pb::Compression::Gzip,
        }
    }
}

/// Checks a requested chunk size (0 means the default).
pub fn chunk_size_from_wire(value: u32, default: u32) -> Result<u32> {
    let size = if value == 0 { default } else { value };
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(Error::invalid(
            "chunk_size",
            format!("{size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes"),
        ));
    }
    Ok(size)
}

/// What a finished transfer moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSummary {
    /// Entry counts and bytes.
    pub counts: TreeCounts,
    /// Length of the tar stream.
    pub stream_bytes: u64,
    /// BLAKE3 of the concatenated chunk hashes.
    pub digest: [u8; 32],
}

impl TreeSummary {
    /// The digest as hex, for messages.
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }

    /// To the wire message.
    pub fn to_wire(&self) -> pb::TreeSummary {
        pb::TreeSummary {
            files: self.counts.files,
            directories: self.counts.directories,
            symlinks: self.counts.symlinks,
            file_bytes: self.counts.file_bytes,
            stream_bytes: self.stream_bytes,
            tree_digest: self.digest.to_vec().into(),
            skipped: self.counts.skipped,
        }
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sending end: a tar stream cut into chunks, with their hashes and the tree digest.
pub struct ChunkSource {
    encoder: TarEncoder,
    chunk_size: usize,
    /// Chunk buffers reused round-robin: a buffer is reused once every copy of the chunk
    /// it carried has been dropped (sent), so steady streaming allocates nothing.
    buffers: Vec<BytesMut>,
    next_buffer: usize,
    digest: blake3::Hasher,
    finished: bool,
}

/// Chunks that may be in flight at once (channels and the gRPC encoder) before a buffer
/// has to be allocated rather than reused.
const BUFFER_RING: usize = 16;

/// One chunk, before compression.
#[derive(Debug, Clone)]
pub struct RawChunk {
    /// Offset in the tar stream.
    pub offset: u64,
    /// The uncompressed bytes.
    pub data: Bytes,
    /// BLAKE3 of `data`.
    pub hash: [u8; 32],
}

impl ChunkSource {
    /// Chunks of `chunk_size` bytes of the tar stream of `walk`.
    pub fn new(walk: TreeWalk, chunk_size: u32) -> Self {
        Self {
            encoder: TarEncoder::new(walk),
            chunk_size: chunk_size as usize,
            buffers: (0..BUFFER_RING).map(|_| BytesMut::new()).collect(),
            next_buffer: 0,
            digest: blake3::Hasher::new(),
            finished: false,
        }
    }

    /// The next chunk, or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<RawChunk>> {
        if self.finished {
            return Ok(None);
        }
        let offset = self.encoder.offset();
        let buf = &mut self.buffers[self.next_buffer];
        self.next_buffer = (self.next_buffer + 1) % BUFFER_RING;
        // Takes the whole allocation back if the chunk it last carried is gone.
        buf.reserve(self.chunk_size);
        buf.resize(self.chunk_size, 0);
        let n = self.encoder.fill(&mut buf[..])?;
        if n < self.chunk_size {
            self.finished = true;
        }
        let data = buf.split_to(n).freeze();
        buf.clear();
        if n == 0 {
            return Ok(None);
        }
        let hash = *blake3::hash(&data).as_bytes();
        self.digest.update(&hash);
        Ok(Some(RawChunk { offset, data, hash }))
    }

    /// Reads and hashes chunks up to `offset` without returning them: what a resumed
    /// sender does to rebuild the tree digest of the part the receiver already has.
    pub fn skip_to(&mut self, offset: u64) -> Result<()> {
        while self.encoder.offset() < offset {
            if self.next_chunk()?.is_none() {
                break;
            }
        }
        if self.encoder.offset() != offset {
            return Err(Error::invalid(
                "offset",
                format!(
                    "{offset} is not a chunk boundary of this stream (length {})",
                    self.encoder.offset()
                ),
            ));
        }
        Ok(())
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.encoder.offset()
    }

    /// The summary; complete once [`ChunkSource::next_chunk`] has returned `None`.
    pub fn summary(&self) -> TreeSummary {
        TreeSummary {
            counts: self.encoder.counts(),
            stream_bytes: self.encoder.offset(),
            digest: *self.digest.finalize().as_bytes(),
        }
    }
}

/// Bytes of a chunk compressed first, to judge whether the rest is worth compressing.
const COMPRESSION_PROBE: usize = 64 * 1024;

/// Prepares a chunk for the wire. With gzip, a chunk whose first 64 KiB do not shrink by
/// a tenth (image data, archives) is sent as it is: compressing it would cost far more
/// CPU than it saves on the wire.
pub fn seal(chunk: &RawChunk, compression: Compression) -> Result<pb::Chunk> {
    let gzip = |bytes: &[u8]| -> Result<Vec<u8>> {
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(bytes.len() / 2),
            flate2::Compression::fast(),
        );
        encoder
            .write_all(bytes)
            .and_then(|()| encoder.finish())
            .map_err(|e| Error::io("compress chunk at offset", chunk.offset, e))
    };
    let raw = || (chunk.data.clone(), pb::Compression::None);
    let (data, marked) = match compression {
        Compression::None => raw(),
        Compression::Gzip => {
            let probe = &chunk.data[..chunk.data.len().min(COMPRESSION_PROBE)];
            if gzip(probe)?.len() * 10 > probe.len() * 9 {
                raw()
            } else {
                let packed = gzip(&chunk.data)?;
                if packed.len() < chunk.data.len() {
                    (Bytes::from(packed), pb::Compression::Gzip)
                } else {
                    raw()
                }
            }
        }
    };
    Ok(pb::Chunk {
        offset: chunk.offset,
        data,
        length: u32::try_from(chunk.data.len()).unwrap_or(u32::MAX),
        checksum: Bytes::copy_from_slice(&chunk.hash),
        compression: marked as i32,
    })
}

/// A chunk whose checksum has been checked, ready to apply.
#[derive(Debug, Clone)]
pub struct VerifiedChunk {
    /// Offset in the tar stream.
    pub offset: u64,
    /// The uncompressed bytes.
    pub data: Bytes,
    /// Their BLAKE3 hash.
    pub hash: [u8; 32],
    /// Bytes it took on the wire.
    pub wire_bytes: u64,
}

/// Decompresses (bounded by the declared length) and checks a chunk's checksum. Pure, so
/// it can run on another thread than the one writing files.
pub fn verify_chunk(
    chunk: &pb::Chunk,
    chunk_size: u32,
    compression: Compression,
) -> Result<VerifiedChunk> {
    let corrupt = |reason: String| Error::CorruptChunk {
        offset: chunk.offset,
        reason,
    };
    if chunk.length == 0 || chunk.length > chunk_size {
        return Err(corrupt(format!(
            "length {} is outside 1..={chunk_size}",
            chunk.length
        )));
    }
    let gzipped = match pb::Compression::try_from(chunk.compression) {
        Ok(pb::Compression::Unspecified) => compression == Compression::Gzip,
        Ok(pb::Compression::None) => false,
        Ok(pb::Compression::Gzip) => true,
        Err(_) => {
            return Err(corrupt(format!(
                "unknown compression {}",
                chunk.compression
            )));
        }
    };
    let data = if gzipped {
        // Bounded: a chunk cannot inflate past its declared length (plus one byte, to
        // notice that it tried).
        let mut out = Vec::with_capacity(chunk.length as usize);
        flate2::read::GzDecoder::new(&chunk.data[..])
            .take(u64::from(chunk.length) + 1)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(format!("gzip data is damaged: {e}")))?;
        Bytes::from(out)
    } else {
        chunk.data.clone()
    };
    if data.len() != chunk.length as usize {
        return Err(corrupt(format!(
            "carries {} bytes, declares {}",
            data.len(),
            chunk.length
        )));
    }
    let hash = blake3::hash(&data);
    if chunk.checksum.len() != 32 || hash.as_bytes()[..] != chunk.checksum[..] {
        return Err(corrupt("checksum does not match its bytes".into()));
    }
    Ok(VerifiedChunk {
        offset: chunk.offset,
        data,
        hash: *hash.as_bytes(),
        wire_bytes: chunk.data.len() as u64,
    })
}

/// Parameters fixed when a transfer opens; a resume must present the same ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferParams {
    /// Where the tree goes when it is committed (store-relative, informational here).
    pub destination: String,
    /// Uncompressed chunk size.
    pub chunk_size: u32,
    /// Wire compression.
    pub compression: Compression,
}

/// What the journal records at each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    version: u32,
    params: TransferParams,
    /// Chunks verified and applied; their hashes are the first `chunks` × 32 bytes of
    /// `chunks.bin`.
    chunks: u64,
    wire_bytes: u64,
    short_chunk_seen: bool,
    decoder: DecoderState,
}

const JOURNAL: &str = "journal.json";
const HASHES: &str = "chunks.bin";
/// Directory mtimes to apply at the end, one `<mtime> <path>` line each.
const DIR_TIMES: &str = "dir-times.txt";
/// Directory inside a transfer area where the tree is assembled.
pub const STAGED_TREE: &str = "tree";

/// The receiving end of one transfer, working in its own area (a directory holding the
/// journal, the chunk hashes and the tree being assembled).
pub struct Receiver {
    area: PathBuf,
    journal: Journal,
    decoder: TarDecoder,
    hashes: File,
    unsaved_hashes: Vec<u8>,
    since_checkpoint: u64,
    limits: ArchiveLimits,
    checkpoint_bytes: u64,
}

impl Receiver {
    /// Opens the transfer in `area`: a new one if the area holds no journal, else the one
    /// recorded there, which must have been opened with the same `params`.
    pub fn open(area: &Path, params: TransferParams, limits: ArchiveLimits) -> Result<Self> {
        let tree = area.join(STAGED_TREE);
        let journal_path = area.join(JOURNAL);
        let journal = match fs::read(&journal_path) {
            Ok(bytes) => {
                let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::io(
                        "read journal",
                        journal_path.display(),
                        std::io::Error::other(e),
                    )
                })?;
                if journal.params != params {
                    return Err(Error::invalid(
                        "open",
                        format!(
                            "the transfer was opened with {:?}; resume it with the same destination, chunk size and compression, or use a new transfer id",
                            journal.params
                        ),
                    ));
                }
                Some(journal)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("read journal", journal_path.display(), e)),
        };
        fs::create_dir_all(&tree).map_err(|e| Error::io("create directory", tree.display(), e))?;
        let hashes_path = area.join(HASHES);
        let hashes = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&hashes_path)
            .map_err(|e| Error::io("open", hashes_path.display(), e))?;
        let root = ExtractRoot::new(tree);
        let (journal, decoder) = match journal {
            Some(journal) => {
                // Hashes appended after the last checkpoint belong to chunks that will be
                // sent again.
                hashes
                    .set_len(journal.chunks * 32)
                    .map_err(|e| Error::io("truncate", hashes_path.display(), e))?;
                let decoder = TarDecoder::resume(journal.decoder.clone(), root, limits)?;
                (journal, decoder)
            }
            None => {
                hashes
                    .set_len(0)
                    .map_err(|e| Error::io("truncate", hashes_path.display(), e))?;
                let decoder = TarDecoder::new(root, limits);
                let journal = Journal {
                    version: 1,
                    params,
                    chunks: 0,
                    wire_bytes: 0,
                    short_chunk_seen: false,
                    decoder: decoder.state().clone(),
                };
                (journal, decoder)
            }
        };
        let mut receiver = Self {
            area: area.to_path_buf(),
            journal,
            decoder,
            hashes,
            unsaved_hashes: Vec::new(),
            since_checkpoint: 0,
            limits,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
        };
        receiver.checkpoint()?;
        Ok(receiver)
    }

    /// Saves the journal every `bytes` of stream instead of the default.
    pub fn set_checkpoint_bytes(&mut self, bytes: u64) {
        self.checkpoint_bytes = bytes.max(1);
    }

    /// The offset the sender must send next.
    pub fn next_offset(&self) -> u64 {
        self.decoder.state().offset
    }

    /// The transfer's parameters.
    pub fn params(&self) -> &TransferParams {
        &self.journal.params
    }

    /// Verifies a chunk and writes what it carries. A chunk that fails its checksum is not
    /// applied, and the transfer can go on with it resent; any other error leaves the
    /// transfer unusable.
    pub fn accept(&mut self, chunk: &pb::Chunk) -> Result<()> {
        let expected = self.next_offset();
        if chunk.offset != expected {
            return Err(Error::OutOfOrder {
                expected,
                got: chunk.offset,
            });
        }
        let verified = verify_chunk(
            chunk,
            self.journal.params.chunk_size,
            self.journal.params.compression,
        )?;
        self.apply(verified)
    }

    /// Writes a chunk checked by [`verify_chunk`] (in order; the offset is checked here).
    pub fn apply(&mut self, chunk: VerifiedChunk) -> Result<()> {
        let expected = self.next_offset();
        if chunk.offset != expected {
            return Err(Error::OutOfOrder {
                expected,
                got: chunk.offset,
            });
        }
        let length = chunk.data.len() as u64;
        if self.journal.short_chunk_seen {
            return Err(Error::CorruptChunk {
                offset: chunk.offset,
                reason: "a chunk follows the stream's short last chunk".into(),
            });
        }
        let wire_bytes = self.journal.wire_bytes + chunk.wire_bytes;
        let stream_bytes = expected + length;
        if stream_bytes > RATIO_GRACE_BYTES
            && stream_bytes > wire_bytes.saturating_mul(u64::from(self.limits.max_expansion_ratio))
        {
            return Err(Error::LimitExceeded(format!(
                "{stream_bytes} bytes expanded from {wire_bytes} compressed bytes, a ratio over {}",
                self.limits.max_expansion_ratio
            )));
        }
        self.decoder.feed(&chunk.data)?;
        self.unsaved_hashes.extend_from_slice(&chunk.hash);
        self.journal.chunks += 1;
        self.journal.wire_bytes = wire_bytes;
        self.journal.short_chunk_seen = length < u64::from(self.journal.params.chunk_size);
        self.since_checkpoint += length;
        if self.since_checkpoint >= self.checkpoint_bytes {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Saves the journal, so a restart resumes from here.
    pub fn checkpoint(&mut self) -> Result<()> {
        let hashes_path = || self.area.join(HASHES).display().to_string();
        self.hashes
            .write_all(&self.unsaved_hashes)
            .map_err(|e| Error::io("write", hashes_path(), e))?;
        self.unsaved_hashes.clear();
        self.save_dir_times()?;
        self.journal.decoder = self.decoder.state().clone();
        let bytes = serde_json::to_vec(&self.journal).map_err(|e| {
            Error::io(
                "encode journal",
                self.area.display(),
                std::io::Error::other(e),
            )
        })?;
        let tmp = self.area.join("journal.json.tmp");
        fs::write(&tmp, bytes).map_err(|e| Error::io("write", tmp.display(), e))?;
        fs::rename(&tmp, self.area.join(JOURNAL))
            .map_err(|e| Error::io("rename", tmp.display(), e))?;
        self.since_checkpoint = 0;
        Ok(())
    }

    fn save_dir_times(&mut self) -> Result<()> {
        let times = self.decoder.take_dir_times();
        if times.is_empty() {
            return Ok(());
        }
        let path = self.area.join(DIR_TIMES);
        let mut text = String::new();
        for (dir, mtime) in times {
            text.push_str(&format!("{mtime} {}\n", dir.as_str()));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open", path.display(), e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| Error::io("write", path.display(), e))
    }

    fn apply_dir_times(&self) -> Result<()> {
        use std::io::BufRead;
        let path = self.area.join(DIR_TIMES);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("open", path.display(), e)),
        };
        let tree = self.area.join(STAGED_TREE);
        let lines = std::io::BufReader::new(file).lines();
        let times = lines.map_while(|line| line.ok()).filter_map(|line| {
            let (mtime, dir) = line.split_once(' ')?;
            Some((
                crate::path::StorePath::from_archive(dir.as_bytes()).ok()?,
                mtime.parse().ok()?,
            ))
        });
        crate::tar_decode::set_dir_times(&tree, times)
    }

    /// Checks the stream is complete and its digest is the sender's; returns the summary
    /// and the directory holding the assembled tree (not yet synced or published).
    pub fn finish(
        mut self,
        stream_bytes: u64,
        sender_digest: &[u8],
    ) -> Result<(TreeSummary, PathBuf)> {
        self.checkpoint()?;
        if self.next_offset() != stream_bytes {
            return Err(Error::invalid(
                "commit.stream_bytes",
                format!(
                    "the sender says {stream_bytes} bytes, {} arrived",
                    self.next_offset()
                ),
            ));
        }
        if !self.decoder.is_finished() {
            return Err(Error::MalformedArchive {
                offset: stream_bytes,
                reason: "the stream ends before the end-of-archive marker".into(),
            });
        }
        let digest = self.digest()?;
        if digest[..] != *sender_digest {
            return Err(Error::DigestMismatch {
                sender: hex(sender_digest),
                receiver: hex(&digest),
            });
        }
        self.apply_dir_times()?;
        let summary = TreeSummary {
            counts: self.decoder.state().counts,
            stream_bytes,
            digest,
        };
        Ok((summary, self.area.join(STAGED_TREE)))
    }

    fn digest(&self) -> Result<[u8; 32]> {
        let path = self.area.join(HASHES);
        let mut file = File::open(&path).map_err(|e| Error::io("open", path.display(), e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Error::io("read", path.display(), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(*hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::StorePath;
    use crate::tree::{WalkOptions, walk_dir};

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(
            root.join("a/b/big"),
            (0..3_000_000u32)
                .map(|i| (i % 13) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        for i in 0..50 {
            fs::write(root.join(format!("a/small-{i}")), format!("file {i}")).unwrap();
        }
    }

    fn params(compression: Compression) -> TransferParams {
        TransferParams {
            destination: "dest".into(),
            chunk_size: MIN_CHUNK_SIZE * 4,
            compression,
        }
    }

    #[test]
    fn round_trip_with_a_restart_and_a_corrupt_chunk() {
        for compression in [Compression::None, Compression::Gzip] {
            let src = tempfile::tempdir().unwrap();
            tree(src.path());
            let area = tempfile::tempdir().unwrap();
            let walk = || walk_dir(src.path(), StorePath::root(), WalkOptions::default()).unwrap();
            let p = params(compression);

            let mut receiver =
                Receiver::open(area.path(), p.clone(), ArchiveLimits::default()).unwrap();
            let mut source = ChunkSource::new(walk(), p.chunk_size);
            for i in 0..10 {
                let chunk = source.next_chunk().unwrap().unwrap();
                let mut sealed = seal(&chunk, compression).unwrap();
                if i == 5 {
                    let mut bad = sealed.clone();
                    let mut data = bad.data.to_vec();
                    data[3] ^= 0x40;
                    bad.data = data.into();
                    let err = receiver.accept(&bad).unwrap_err();
                    assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
                    sealed = seal(&chunk, compression).unwrap();
                }
                receiver.accept(&sealed).unwrap();
            }
            receiver.checkpoint().unwrap();
            let resume_at = receiver.next_offset();
            // Two more chunks applied but never checkpointed, then the process "dies".
            for _ in 0..2 {
                let chunk = source.next_chunk().unwrap().unwrap();
                receiver
                    .accept(&seal(&chunk, compression).unwrap())
                    .unwrap();
            }
            drop(receiver);

            let mut receiver =
                Receiver::open(area.path(), p.clone(), ArchiveLimits::default()).unwrap();
            assert_eq!(receiver.next_offset(), resume_at);
            let mut source = ChunkSource::new(walk(), p.chunk_size);
            source.skip_to(resume_at).unwrap();
            while let Some(chunk) = source.next_chunk().unwrap() {
                receiver
                    .accept(&seal(&chunk, compression).unwrap())
                    .unwrap();
            }
            let sent = source.summary();
            let (summary, staged) = receiver.finish(sent.stream_bytes, &sent.digest).unwrap();
            assert_eq!(
                summary,
                TreeSummary {
                    counts: sent.counts,
                    ..summary.clone()
                }
            );
            assert_eq!(summary.digest, sent.digest);
            assert_eq!(summary.counts.files, 51);
            assert_eq!(
                fs::read(staged.join("a/b/big")).unwrap(),
                fs::read(src.path().join("a/b/big")).unwrap()
            );
        }
    }

    #[test]
    fn refuses_out_of_order_and_wrong_digest() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let area = tempfile::tempdir().unwrap();
        let p = params(Compression::None);
        let mut receiver =
            Receiver::open(area.path(), p.clone(), ArchiveLimits::default()).unwrap();
        let mut source = ChunkSource::new(
            walk_dir(src.path(), StorePath::root(), WalkOptions::default()).unwrap(),
            p.chunk_size,
        );
        let first = seal(&source.next_chunk().unwrap().unwrap(), Compression::None).unwrap();
        let second = seal(&source.next_chunk().unwrap().unwrap(), Compression::None).unwrap();
        assert!(matches!(
            receiver.accept(&second),
            Err(Error::OutOfOrder { expected: 0, .. })
        ));
        receiver.accept(&first).unwrap();
        receiver.accept(&second).unwrap();
        while let Some(chunk) = source.next_chunk().unwrap() {
            receiver
                .accept(&seal(&chunk, Compression::None).unwrap())
                .unwrap();
        }
        let sent = source.summary();
        let err = receiver.finish(sent.stream_bytes, &[0u8; 32]).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn refuses_a_gzip_bomb() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("zeros"), vec![0u8; 8 << 20]).unwrap();
        let area = tempfile::tempdir().unwrap();
        let p = TransferParams {
            chunk_size: MAX_CHUNK_SIZE,
            ..params(Compression::Gzip)
        };
        let limits = ArchiveLimits {
            max_expansion_ratio: 50,
            ..ArchiveLimits::default()
        };
        let mut receiver = Receiver::open(area.path(), p.clone(), limits).unwrap();
        let mut source = ChunkSource::new(
            walk_dir(src.path(), StorePath::root(), WalkOptions::default()).unwrap(),
            p.chunk_size,
        );
        let mut refused = None;
        while let Some(chunk) = source.next_chunk().unwrap() {
            if let Err(e) = receiver.accept(&seal(&chunk, Compression::Gzip).unwrap()) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(Error::LimitExceeded(_))),
            "{refused:?}"
        );
    }
}

//! Reads a tar stream as it arrives and writes its entries under an [`ExtractRoot`],
//! refusing anything hostile, with a state that can be saved at any byte and resumed.
//!
//! It is a push parser: bytes come in pieces of any size (network chunks), nothing but one
//! header block and one bounded extension header is buffered, and file data goes straight
//! to disk. [`DecoderState`] is serialisable so a receiver killed mid-file picks up at the
//! same byte, even inside a large file.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::extract::ExtractRoot;
use crate::path::StorePath;
use crate::tar_encode::{BLOCK, TreeCounts};

/// Largest extension header (long name, long link, PAX record set) accepted.
const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

/// What an archive may contain before it is refused as a bomb or a disk filler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveLimits {
    /// Sum of file sizes.
    pub max_total_bytes: u64,
    /// Files, directories and links.
    pub max_entries: u64,
    /// Largest ratio of tar bytes to wire bytes (compressed) once 1 MiB has arrived.
    pub max_expansion_ratio: u32,
    /// Longest entry name, in bytes.
    pub max_path_bytes: u32,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: 1 << 40,
            max_entries: 5_000_000,
            max_expansion_ratio: 200,
            max_path_bytes: crate::path::MAX_PATH_BYTES as u32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Extension {
    LongName,
    LongLink,
    Pax,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Header,
    FileData {
        path: StorePathText,
        remaining: u64,
        written: u64,
        mtime: u64,
    },
    Extension {
        kind: Extension,
        remaining: u64,
        data: Vec<u8>,
    },
    Padding {
        remaining: u64,
    },
    Ended,
}

/// A store path kept as text in the saved state, re-checked when loaded.
type StorePathText = String;

/// Everything needed to continue decoding at `offset` after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderState {
    /// Bytes of the stream consumed.
    pub offset: u64,
    /// What has been written.
    pub counts: TreeCounts,
    block: Vec<u8>,
    phase: Phase,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    zero_blocks: u8,
}

impl Default for DecoderState {
    fn default() -> Self {
        Self {
            offset: 0,
            counts: TreeCounts::default(),
            block: Vec::new(),
            phase: Phase::Header,
            long_name: None,
            long_link: None,
            pax_size: None,
            zero_blocks: 0,
        }
    }
}

/// The push parser.
pub struct TarDecoder {
    state: DecoderState,
    root: ExtractRoot,
    limits: ArchiveLimits,
    file: Option<File>,
    /// Directories written and the mtime they should end with: applied once their
    /// contents are all in place (writing into a directory changes its mtime).
    dir_times: Vec<(StorePath, u64)>,
}

impl TarDecoder {
    /// Starts a new stream into `root`.
    pub fn new(root: ExtractRoot, limits: ArchiveLimits) -> Self {
        Self {
            state: DecoderState::default(),
            root,
            limits,
            file: None,
            dir_times: Vec::new(),
        }
    }

    /// Continues a stream from a saved state; a file that was being written is cut back to
    /// the length the state recorded.
    pub fn resume(
        state: DecoderState,
        mut root: ExtractRoot,
        limits: ArchiveLimits,
    ) -> Result<Self> {
        let file = match &state.phase {
            Phase::FileData { path, written, .. } => {
                let path = StorePath::from_archive(path.as_bytes())
                    .map_err(|e| Error::refused(path, e.to_string()))?;
                Some(root.reopen_file(&path, *written)?)
            }
            _ => None,
        };
        Ok(Self {
            state,
            root,
            limits,
            file,
            dir_times: Vec::new(),
        })
    }

    /// The state to save; call only between [`TarDecoder::feed`] calls.
    pub fn state(&self) -> &DecoderState {
        &self.state
    }

    /// Directory mtimes recorded since the last call, to be applied when the tree is
    /// complete (see [`set_dir_times`]).
    pub fn take_dir_times(&mut self) -> Vec<(StorePath, u64)> {
        std::mem::take(&mut self.dir_times)
    }

    /// True once the end-of-archive marker has been read.
    pub fn is_finished(&self) -> bool {
        self.state.phase == Phase::Ended
    }

    /// Consumes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let used = self.step(data)?;
            self.state.offset += used as u64;
            data = &data[used..];
        }
        Ok(())
    }

    fn step(&mut self, data: &[u8]) -> Result<usize> {
        match &mut self.state.phase {
            Phase::Header => {
                let block_len = BLOCK as usize;
                if self.state.block.is_empty() && data.len() >= block_len {
                    let mut block = [0u8; BLOCK as usize];
                    block.copy_from_slice(&data[..block_len]);
                    self.read_header(&block)?;
                    return Ok(block_len);
                }
                let need = block_len - self.state.block.len();
                let take = need.min(data.len());
                self.state.block.extend_from_slice(&data[..take]);
                if self.state.block.len() == block_len {
                    let mut block = [0u8; BLOCK as usize];
                    block.copy_from_slice(&self.state.block);
                    self.state.block.clear();
                    self.read_header(&block)?;
                }
                Ok(take)
            }
            Phase::FileData {
                path,
                remaining,
                written,
                mtime,
            } => {
                let take = data
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                let Some(file) = self.file.as_mut() else {
                    return Err(Error::MalformedArchive {
                        offset: self.state.offset,
                        reason: "file data without an open file".into(),
                    });
                };
                file.write_all(&data[..take])
                    .map_err(|e| Error::io("write", &*path, e))?;
                *remaining -= take as u64;
                *written += take as u64;
                if *remaining == 0 {
                    let (size, mtime, path) = (*written, *mtime, path.clone());
                    self.finish_file(&path, size, mtime)?;
                }
                Ok(take)
            }
            Phase::Extension {
                kind,
                remaining,
                data: buffer,
            } => {
                let take = data
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                buffer.extend_from_slice(&data[..take]);
                *remaining -= take as u64;
                if *remaining == 0 {
                    let (kind, buffer) = (*kind, std::mem::take(buffer));
                    let padding = (BLOCK - buffer.len() as u64 % BLOCK) % BLOCK;
                    self.apply_extension(kind, buffer)?;
                    self.state.phase = padding_or_header(padding);
                }
                Ok(take)
            }
            Phase::Padding { remaining } => {
                let take = data
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= take as u64;
                if *remaining == 0 {
                    self.state.phase = Phase::Header;
                }
                Ok(take)
            }
            Phase::Ended => {
                // GNU tar pads archives to a 10 KiB record with zeros; anything else after
                // the end marker is not part of the tree.
                if data.iter().any(|&b| b != 0) {
                    return Err(Error::MalformedArchive {
                        offset: self.state.offset,
                        reason: "data after the end-of-archive marker".into(),
                    });
                }
                Ok(data.len())
            }
        }
    }

    fn finish_file(&mut self, path: &str, size: u64, mtime: u64) -> Result<()> {
        if let Some(file) = self.file.take() {
            file.set_modified(mtime_to_time(mtime))
                .map_err(|e| Error::io("set mtime of", path, e))?;
        }
        self.state.phase = padding_or_header((BLOCK - size % BLOCK) % BLOCK);
        Ok(())
    }

    fn malformed(&self, reason: impl Into<String>) -> Error {
        Error::MalformedArchive {
            offset: self.state.offset,
            reason: reason.into(),
        }
    }

    fn read_header(&mut self, block: &[u8; BLOCK as usize]) -> Result<()> {
        if block.iter().all(|&b| b == 0) {
            self.state.zero_blocks += 1;
            if self.state.zero_blocks == 2 {
                self.state.phase = Phase::Ended;
            }
            return Ok(());
        }
        if self.state.zero_blocks > 0 {
            return Err(self.malformed("a lone zero block inside the archive"));
        }
        let header = tar::Header::from_byte_slice(block);
        verify_checksum(header).map_err(|reason| self.malformed(reason))?;
        let kind = header.entry_type();
        let refusal = match kind {
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                Some("device and FIFO entries are not allowed")
            }
            tar::EntryType::GNUSparse => Some("sparse files are not supported"),
            _ => None,
        };
        if let Some(reason) = refusal {
            let name = self
                .state
                .long_name
                .take()
                .unwrap_or_else(|| header.path_bytes().into_owned());
            return Err(Error::refused(String::from_utf8_lossy(&name), reason));
        }
        let header_size = header
            .size()
            .map_err(|e| self.malformed(format!("bad size field: {e}")))?;
        let size = self.state.pax_size.take().unwrap_or(header_size);

        match kind {
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink | tar::EntryType::XHeader => {
                if size > MAX_EXTENSION_BYTES {
                    let shown = String::from_utf8_lossy(&header.path_bytes()).into_owned();
                    return Err(Error::refused(
                        shown,
                        format!(
                            "extension header of {size} bytes is larger than {MAX_EXTENSION_BYTES}"
                        ),
                    ));
                }
                let extension = match kind {
                    tar::EntryType::GNULongName => Extension::LongName,
                    tar::EntryType::GNULongLink => Extension::LongLink,
                    _ => Extension::Pax,
                };
                self.state.phase = if size == 0 {
                    Phase::Header
                } else {
                    Phase::Extension {
                        kind: extension,
                        remaining: size,
                        data: Vec::new(),
                    }
                };
                return Ok(());
            }
            _ => {}
        }

        if kind == tar::EntryType::XGlobalHeader {
            if size > MAX_EXTENSION_BYTES {
                let shown = String::from_utf8_lossy(&header.path_bytes()).into_owned();
                return Err(Error::refused(
                    shown,
                    "global extension header is too large",
                ));
            }
            self.state.phase = padding_or_header(size.div_ceil(BLOCK) * BLOCK);
            return Ok(());
        }

        let name_bytes = self
            .state
            .long_name
            .take()
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let shown = String::from_utf8_lossy(&name_bytes).into_owned();

        if name_bytes.len() > self.limits.max_path_bytes as usize {
            return Err(Error::refused(
                &shown,
                format!("name is longer than {} bytes", self.limits.max_path_bytes),
            ));
        }
        let path = StorePath::from_archive(&name_bytes)
            .map_err(|e| Error::refused(&shown, e.to_string()))?;
        if self.state.counts.entries() >= self.limits.max_entries {
            return Err(Error::LimitExceeded(format!(
                "more than {} entries",
                self.limits.max_entries
            )));
        }
        let mode = header.mode().unwrap_or(0o644);
        let link_name = self.state.long_link.take();

        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if path.is_root() {
                    return Err(Error::refused(&shown, "a file cannot replace the root"));
                }
                let total = self.state.counts.file_bytes.saturating_add(size);
                if total > self.limits.max_total_bytes {
                    return Err(Error::LimitExceeded(format!(
                        "entry `{shown}` would bring the tree to {total} bytes, over the limit of {}",
                        self.limits.max_total_bytes
                    )));
                }
                let mtime = header.mtime().unwrap_or(0);
                self.file = Some(self.root.create_file(&path, mode)?);
                self.state.counts.files += 1;
                self.state.counts.file_bytes = total;
                self.state.phase = Phase::FileData {
                    path: path.as_str().to_owned(),
                    remaining: size,
                    written: 0,
                    mtime,
                };
                if size == 0 {
                    self.finish_file(path.as_str(), 0, mtime)?;
                }
            }
            tar::EntryType::Directory => {
                self.root.create_dir(&path, mode)?;
                if !path.is_root() {
                    self.state.counts.directories += 1;
                }
                self.dir_times.push((path, header.mtime().unwrap_or(0)));
                self.skip_data(size)?;
            }
            tar::EntryType::Symlink => {
                let target = link_name.unwrap_or_else(|| {
                    header
                        .link_name_bytes()
                        .map(|b| b.into_owned())
                        .unwrap_or_default()
                });
                let target = String::from_utf8(target)
                    .map_err(|_| Error::refused(&shown, "symlink target is not valid UTF-8"))?;
                self.root.symlink(&path, &target)?;
                self.state.counts.symlinks += 1;
                self.skip_data(size)?;
            }
            tar::EntryType::Link => {
                let target = link_name.unwrap_or_else(|| {
                    header
                        .link_name_bytes()
                        .map(|b| b.into_owned())
                        .unwrap_or_default()
                });
                let target = StorePath::from_archive(&target)
                    .map_err(|e| Error::refused(&shown, format!("hard link target: {e}")))?;
                self.root.hard_link(&path, &target)?;
                self.state.counts.files += 1;
                self.skip_data(size)?;
            }
            other => {
                return Err(Error::refused(
                    &shown,
                    format!("entry type {:?} is not supported", other.as_byte() as char),
                ));
            }
        }
        Ok(())
    }

    /// Entries that carry no file still declare a size in some archivers; skip it.
    fn skip_data(&mut self, size: u64) -> Result<()> {
        let padded = size
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .ok_or_else(|| self.malformed(format!("declared size {size} is beyond any archive")))?;
        self.state.phase = padding_or_header(padded);
        Ok(())
    }

    fn apply_extension(&mut self, kind: Extension, data: Vec<u8>) -> Result<()> {
        match kind {
            Extension::LongName => self.state.long_name = Some(trim_nul(data)),
            Extension::LongLink => self.state.long_link = Some(trim_nul(data)),
            Extension::Pax => {
                for record in pax_records(&data).map_err(|reason| self.malformed(reason))? {
                    let (key, value) = record;
                    match key {
                        b"path" => self.state.long_name = Some(value.to_vec()),
                        b"linkpath" => self.state.long_link = Some(value.to_vec()),
                        b"size" => {
                            let size = std::str::from_utf8(value)
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .ok_or_else(|| self.malformed("PAX size is not a number"))?;
                            self.state.pax_size = Some(size);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// Latest mtime set on disk (the last second of year 9999): later ones, which only a
/// hostile archive carries, are clamped rather than overflowing the clock.
const MAX_MTIME: u64 = 253_402_300_799;

fn mtime_to_time(mtime: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(mtime.min(MAX_MTIME))
}

/// Gives directories under `root` the mtimes their archive entries carried.
pub fn set_dir_times(
    root: &std::path::Path,
    times: impl IntoIterator<Item = (StorePath, u64)>,
) -> Result<()> {
    for (path, mtime) in times {
        let at = path.under(root);
        // A directory replaced or gone by now is not an error: there is nothing to date.
        let Ok(dir) = File::open(&at) else { continue };
        dir.set_modified(mtime_to_time(mtime))
            .map_err(|e| Error::io("set mtime of", &path, e))?;
    }
    Ok(())
}

fn padding_or_header(padding: u64) -> Phase {
    if padding == 0 {
        Phase::Header
    } else {
        Phase::Padding { remaining: padding }
    }
}

fn trim_nul(mut data: Vec<u8>) -> Vec<u8> {
    while data.last() == Some(&0) {
        data.pop();
    }
    data
}

fn verify_checksum(header: &tar::Header) -> std::result::Result<(), String> {
    let stored = header
        .cksum()
        .map_err(|e| format!("bad header checksum field: {e}"))?;
    let bytes = header.as_bytes();
    let computed: u32 = bytes[..148]
        .iter()
        .chain(&[b' '; 8])
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum();
    if stored != computed {
        return Err(format!(
            "header checksum {stored} does not match its contents ({computed})"
        ));
    }
    Ok(())
}

/// Splits PAX extended-header records (`<len> <key>=<value>\n`).
/// A PAX record: key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

fn pax_records(mut data: &[u8]) -> std::result::Result<Vec<PaxRecord<'_>>, String> {
    let mut records = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length is not a number")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length does not fit the record".into());
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without `=`")?;
        records.push((&body[..eq], &body[eq + 1..]));
        data = &data[len..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn decode_all(bytes: &[u8], piece: usize) -> (tempfile::TempDir, Result<TreeCounts>) {
        let dir = tempfile::tempdir().unwrap();
        let mut decoder = TarDecoder::new(
            ExtractRoot::new(dir.path().to_path_buf()),
            ArchiveLimits::default(),
        );
        for chunk in bytes.chunks(piece.max(1)) {
            if let Err(e) = decoder.feed(chunk) {
                return (dir, Err(e));
            }
        }
        assert!(decoder.is_finished());
        let counts = decoder.state().counts;
        (dir, Ok(counts))
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut out);
            build(&mut builder);
            builder.finish().unwrap();
        }
        out
    }

    fn file_header(size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h
    }

    #[test]
    fn reads_archives_from_the_tar_crate_in_any_piece_size() {
        let long = format!("dir/{}/file", "x".repeat(200));
        let bytes = archive(|b| {
            b.append_data(&mut file_header(5), "a.txt", &b"hello"[..])
                .unwrap();
            b.append_data(&mut file_header(3), &long, &b"abc"[..])
                .unwrap();
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_size(0);
            b.append_link(&mut link, "dir/alias", "sub/x").unwrap();
            let mut hard = tar::Header::new_gnu();
            hard.set_entry_type(tar::EntryType::Link);
            hard.set_size(0);
            b.append_link(&mut hard, "hard.txt", "a.txt").unwrap();
        });
        for piece in [1, 7, 512, 4096, 1 << 20] {
            let (dir, counts) = decode_all(&bytes, piece);
            let counts = counts.unwrap();
            assert_eq!(counts.files, 3);
            assert_eq!(counts.symlinks, 1);
            assert_eq!(fs::read(dir.path().join("a.txt")).unwrap(), b"hello");
            assert_eq!(fs::read(dir.path().join(&long)).unwrap(), b"abc");
            assert_eq!(fs::read(dir.path().join("hard.txt")).unwrap(), b"hello");
        }
    }

    #[test]
    fn resumes_inside_a_file() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = archive(|b| {
            b.append_data(&mut file_header(data.len() as u64), "big.bin", &data[..])
                .unwrap();
            b.append_data(&mut file_header(2), "after", &b"ok"[..])
                .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let root = || ExtractRoot::new(dir.path().to_path_buf());
        let mut decoder = TarDecoder::new(root(), ArchiveLimits::default());
        decoder.feed(&bytes[..50_000]).unwrap();
        let saved = serde_json::to_string(decoder.state()).unwrap();
        // Bytes written past the checkpoint by a process that then died.
        decoder.feed(&bytes[50_000..60_000]).unwrap();
        drop(decoder);
        let state: DecoderState = serde_json::from_str(&saved).unwrap();
        let at = usize::try_from(state.offset).unwrap();
        let mut decoder = TarDecoder::resume(state, root(), ArchiveLimits::default()).unwrap();
        decoder.feed(&bytes[at..]).unwrap();
        assert!(decoder.is_finished());
        assert_eq!(fs::read(dir.path().join("big.bin")).unwrap(), data);
        assert_eq!(fs::read(dir.path().join("after")).unwrap(), b"ok");
    }

    #[test]
    fn refuses_devices_and_sparse_files() {
        for (kind, reason) in [
            (tar::EntryType::Char, "device and FIFO"),
            (tar::EntryType::Block, "device and FIFO"),
            (tar::EntryType::Fifo, "device and FIFO"),
            (tar::EntryType::GNUSparse, "sparse"),
        ] {
            let bytes = archive(|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_size(0);
                b.append_data(&mut h, "dev", &b""[..]).unwrap();
            });
            let (_dir, result) = decode_all(&bytes, 512);
            let err = result.unwrap_err().to_string();
            assert!(err.contains("`dev`") && err.contains(reason), "{err}");
        }
    }

    #[test]
    fn survives_absurd_mtimes_and_sizes() {
        // Found by fuzzing: a binary mtime near 2^63 overflowed the clock, and a link
        // declaring a size near 2^64 overflowed the padding arithmetic.
        let mut file = tar::Header::new_gnu();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_size(1);
        file.set_mode(0o644);
        file.set_mtime(u64::MAX >> 1);
        file.as_old_mut().name[..1].copy_from_slice(b"f");
        file.set_cksum();
        let mut bytes = file.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 512]);
        let (dir, counts) = decode_all(&[bytes.clone(), vec![0; 1024]].concat(), 512);
        counts.unwrap();
        assert!(dir.path().join("f").exists());

        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Directory);
        link.set_size(u64::MAX - 3);
        link.as_old_mut().name[..2].copy_from_slice(b"d/");
        link.set_cksum();
        let (_dir, result) = decode_all(&[link.as_bytes().to_vec(), vec![0; 1024]].concat(), 512);
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("beyond any archive")
        );
    }

    #[test]
    fn refuses_a_corrupted_header() {
        let mut bytes = archive(|b| b.append_data(&mut file_header(1), "f", &b"x"[..]).unwrap());
        bytes[0] ^= 1;
        let (_dir, result) = decode_all(&bytes, 512);
        assert!(result.unwrap_err().to_string().contains("checksum"));
    }

    #[test]
    fn reads_pax_paths() {
        let long = format!("dir/{}", "p".repeat(250));
        let mut bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut bytes);
            let record = format!("path={long}\n");
            let len = record.len() + 4;
            let pax = format!("{len} {record}");
            assert_eq!(pax.len(), len);
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(pax.len() as u64);
            b.append_data(&mut h, "PaxHeaders/x", pax.as_bytes())
                .unwrap();
            let mut f = tar::Header::new_ustar();
            f.set_size(1);
            f.set_mode(0o644);
            b.append_data(&mut f, "short", &b"z"[..]).unwrap();
            b.finish().unwrap();
        }
        let (dir, counts) = decode_all(&bytes, 100);
        counts.unwrap();
        assert_eq!(fs::read(dir.path().join(&long)).unwrap(), b"z");
        assert!(!dir.path().join("short").exists());
    }
}

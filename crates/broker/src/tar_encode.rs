//! Turns a tree walk into a tar stream, lazily: at most one file is open and one entry's
//! headers are buffered, whatever the size of the tree.
//!
//! The stream is GNU tar (long names as `././@LongLink` entries), readable by any tar, and
//! deterministic: owner 0:0, no user or group names, permission bits only, file mtimes.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{Error, Result};
use crate::tree::{EntryKind, TreeEntry, TreeWalk, Walked};

/// Size of a tar block.
pub const BLOCK: u64 = 512;
/// Longest name that fits a header's name field.
const NAME_FIELD: usize = 100;

/// Counts of what went into a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeCounts {
    /// Regular files (hard links included).
    pub files: u64,
    /// Directories.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Sum of the file sizes.
    pub file_bytes: u64,
    /// Entries left out on purpose.
    pub skipped: u64,
}

impl TreeCounts {
    /// Entries written (files, directories, links).
    pub fn entries(&self) -> u64 {
        self.files + self.directories + self.symlinks
    }
}

fn padded(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// Bytes the entry takes in the stream: long-name blocks, header, data and padding.
pub fn encoded_len(entry: &TreeEntry) -> u64 {
    let name_len = entry_name(entry).len();
    let mut len = BLOCK;
    if name_len > NAME_FIELD {
        len += BLOCK + padded(name_len as u64 + 1);
    }
    match &entry.kind {
        EntryKind::File { size } => len += padded(*size),
        EntryKind::Symlink { target } if target.len() > NAME_FIELD => {
            len += BLOCK + padded(target.len() as u64 + 1);
        }
        _ => {}
    }
    len
}

/// Length of the end-of-archive marker (two zero blocks).
pub const END_LEN: u64 = 2 * BLOCK;

fn entry_name(entry: &TreeEntry) -> String {
    match entry.kind {
        EntryKind::Directory => format!("{}/", entry.path.as_str()),
        _ => entry.path.as_str().to_owned(),
    }
}

/// Streams a tree walk as tar bytes through [`Read`].
pub struct TarEncoder {
    walk: TreeWalk,
    /// Header bytes of the current entry not yet read out.
    pending: Vec<u8>,
    pending_at: usize,
    file: Option<OpenFile>,
    padding: u64,
    ended: bool,
    counts: TreeCounts,
    offset: u64,
}

struct OpenFile {
    file: File,
    remaining: u64,
    entry: TreeEntry,
}

impl TarEncoder {
    /// A stream over `walk`, starting at byte 0.
    pub fn new(walk: TreeWalk) -> Self {
        Self {
            walk,
            pending: Vec::with_capacity(3 * BLOCK as usize),
            pending_at: 0,
            file: None,
            padding: 0,
            ended: false,
            counts: TreeCounts::default(),
            offset: 0,
        }
    }

    /// What has been streamed so far.
    pub fn counts(&self) -> TreeCounts {
        self.counts
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Fills `buf` completely unless the stream ends first; returns the bytes written.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        self.offset += filled as u64;
        Ok(filled)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.pending_at < self.pending.len() {
                let n = (self.pending.len() - self.pending_at).min(buf.len());
                buf[..n].copy_from_slice(&self.pending[self.pending_at..self.pending_at + n]);
                self.pending_at += n;
                return Ok(n);
            }
            if let Some(open) = &mut self.file {
                if open.remaining > 0 {
                    let want = buf
                        .len()
                        .min(usize::try_from(open.remaining).unwrap_or(usize::MAX));
                    let n = open
                        .file
                        .read(&mut buf[..want])
                        .map_err(|e| Error::io("read", open.entry.source.display(), e))?;
                    if n == 0 {
                        return Err(Error::SourceChanged(format!(
                            "{} (it shrank while being sent)",
                            open.entry.path
                        )));
                    }
                    open.remaining -= n as u64;
                    return Ok(n);
                }
                self.file = None;
            }
            if self.padding > 0 {
                let n = buf
                    .len()
                    .min(usize::try_from(self.padding).unwrap_or(usize::MAX));
                buf[..n].fill(0);
                self.padding -= n as u64;
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            self.start_next_entry()?;
        }
    }

    fn start_next_entry(&mut self) -> Result<()> {
        self.pending.clear();
        self.pending_at = 0;
        let entry = loop {
            match self.walk.next() {
                None => {
                    self.ended = true;
                    self.padding = END_LEN;
                    return Ok(());
                }
                Some(Err(error)) => return Err(error),
                Some(Ok(Walked::Skipped { .. })) => self.counts.skipped += 1,
                Some(Ok(Walked::Entry(entry))) => break entry,
            }
        };
        write_headers(&entry, &mut self.pending);
        match &entry.kind {
            EntryKind::Directory => self.counts.directories += 1,
            EntryKind::Symlink { .. } => self.counts.symlinks += 1,
            EntryKind::File { size } => {
                self.counts.files += 1;
                self.counts.file_bytes += size;
                self.padding = padded(*size) - size;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&entry.source)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => {
                            Error::SourceChanged(format!("{} (it was removed)", entry.path))
                        }
                        _ => Error::io("open", entry.source.display(), e),
                    })?;
                let remaining = *size;
                self.file = Some(OpenFile {
                    file,
                    remaining,
                    entry,
                });
            }
        }
        Ok(())
    }
}

fn gnu_header(kind: tar::EntryType, size: u64, mode: u32, mtime: u64, name: &[u8]) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    let field = &mut header.as_old_mut().name;
    let n = name.len().min(NAME_FIELD);
    field[..n].copy_from_slice(&name[..n]);
    header
}

fn push_long(out: &mut Vec<u8>, kind: tar::EntryType, value: &[u8]) {
    let mut header = gnu_header(kind, value.len() as u64 + 1, 0o644, 0, b"././@LongLink");
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(value);
    let written = value.len() as u64;
    out.resize(out.len() + (padded(written + 1) - written) as usize, 0);
}

fn write_headers(entry: &TreeEntry, out: &mut Vec<u8>) {
    let name = entry_name(entry);
    if name.len() > NAME_FIELD {
        push_long(out, tar::EntryType::GNULongName, name.as_bytes());
    }
    let (kind, size) = match &entry.kind {
        EntryKind::Directory => (tar::EntryType::Directory, 0),
        EntryKind::File { size } => (tar::EntryType::Regular, *size),
        EntryKind::Symlink { target } => {
            if target.len() > NAME_FIELD {
                push_long(out, tar::EntryType::GNULongLink, target.as_bytes());
            }
            (tar::EntryType::Symlink, 0)
        }
    };
    let mut header = gnu_header(kind, size, entry.mode & 0o777, entry.mtime, name.as_bytes());
    if let EntryKind::Symlink { target } = &entry.kind {
        let field = &mut header.as_old_mut().linkname;
        let n = target.len().min(NAME_FIELD);
        field[..n].copy_from_slice(&target.as_bytes()[..n]);
    }
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
}

/// Walks a tree once without reading file contents: its stream length, entry count, and
/// a version that changes when any path, kind, size, mode or mtime changes.
pub fn survey(walk: TreeWalk) -> Result<Survey> {
    let mut hasher = blake3::Hasher::new();
    let mut survey = Survey {
        stream_bytes: END_LEN,
        entries: 0,
        version: String::new(),
    };
    for item in walk {
        let Walked::Entry(entry) = item? else {
            continue;
        };
        survey.stream_bytes += encoded_len(&entry);
        survey.entries += 1;
        let (kind, size, target) = match &entry.kind {
            EntryKind::Directory => ('d', 0, ""),
            EntryKind::File { size } => ('f', *size, ""),
            EntryKind::Symlink { target } => ('l', 0, target.as_str()),
        };
        hasher.update(entry.path.as_str().as_bytes());
        hasher.update(
            format!(
                "\0{kind}\0{size}\0{:o}\0{}\0{target}\n",
                entry.mode, entry.mtime
            )
            .as_bytes(),
        );
    }
    survey.version = hasher.finalize().to_hex()[..32].to_owned();
    Ok(survey)
}

/// What [`survey`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// Length of the tar stream the tree encodes to.
    pub stream_bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
    /// Identity of the tree's shape and metadata.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::StorePath;
    use crate::tree::{WalkOptions, walk_dir};

    #[test]
    fn stream_is_readable_by_the_tar_crate_and_its_length_is_predicted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let long = "n".repeat(150);
        std::fs::create_dir_all(root.join("sub").join(&long)).unwrap();
        std::fs::write(root.join("sub").join(&long).join("f.txt"), b"hello").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("big"), vec![7u8; 3000]).unwrap();
        std::fs::create_dir(root.join("emptydir")).unwrap();

        let walk = || walk_dir(root, StorePath::root(), WalkOptions::default()).unwrap();
        let surveyed = survey(walk()).unwrap();
        let mut encoder = TarEncoder::new(walk());
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 777];
        loop {
            let n = encoder.fill(&mut buf).unwrap();
            bytes.extend_from_slice(&buf[..n]);
            if n < buf.len() {
                break;
            }
        }
        assert_eq!(bytes.len() as u64, surveyed.stream_bytes);
        assert_eq!(surveyed.entries, 6);
        assert_eq!(encoder.counts().files, 3);
        assert_eq!(encoder.counts().file_bytes, 3005);

        let mut archive = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name.ends_with("f.txt") {
                let mut text = String::new();
                entry.read_to_string(&mut text).unwrap();
                assert_eq!(text, "hello");
            }
            names.push(name);
        }
        assert_eq!(names.len(), 6);
        assert!(names.contains(&format!("sub/{long}/f.txt")));
    }
}

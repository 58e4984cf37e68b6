//! Zip archives as pfcon's zipfile mode exchanges them, streamed both ways: an upload is
//! unpacked entry by entry as its bytes arrive (pfcon reads the whole zip into memory
//! first), and outputs are zipped straight onto the response. The unpacking refuses what
//! the broker refuses in tar streams: names that climb out or are absolute, links,
//! devices, too many entries, too many bytes, and bombs.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;

use dispatch_broker::extract::ExtractRoot;
use dispatch_broker::path::StorePath;
use dispatch_broker::tar_decode::ArchiveLimits;

/// Why an upload was refused: pfcon's field and a sentence.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// Not a zip, or a damaged one (pfcon's `data_file: Bad zip file`).
    #[error("Bad zip file")]
    Bad(String),
    /// A zip with an entry we refuse.
    #[error("{0}")]
    Refused(String),
    /// Our own disk failed.
    #[error("{0}")]
    Io(String),
}

/// What an unpacking wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files.
    pub files: u64,
    /// Bytes in them.
    pub bytes: u64,
}

/// Counts the compressed bytes read, to bound the expansion ratio.
struct Counting<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// Unpacks the zip read from `source` into `root` (an existing empty directory).
pub fn unpack(
    source: impl Read,
    root: &Path,
    limits: &ArchiveLimits,
) -> Result<Unpacked, ZipError> {
    let wire = Rc::new(Cell::new(0u64));
    let mut source = Counting {
        inner: source,
        read: wire.clone(),
    };
    let mut target = ExtractRoot::new(root.to_path_buf());
    let mut done = Unpacked::default();
    let mut entries = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let entry = zip::read::read_zipfile_from_stream(&mut source)
            .map_err(|e| ZipError::Bad(e.to_string()))?;
        let Some(mut entry) = entry else {
            break;
        };
        entries += 1;
        if entries > limits.max_entries {
            return Err(ZipError::Refused(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw_name = entry
            .name()
            .map_err(|_| ZipError::Refused("an entry's name is not UTF-8".into()))?
            .into_owned();
        let trimmed = raw_name.trim_end_matches('/');
        if trimmed.len() > limits.max_path_bytes as usize {
            return Err(ZipError::Refused(format!(
                "`{raw_name}`: the name is longer than {} bytes",
                limits.max_path_bytes
            )));
        }
        let path = StorePath::from_api(trimmed)
            .map_err(|e| ZipError::Refused(format!("`{raw_name}`: {e}")))?;
        if path.is_root() {
            continue;
        }
        let mode = entry.unix_mode().unwrap_or(0);
        let kind = mode & 0o170_000;
        if entry.is_dir() {
            target
                .create_dir(&path, 0o755)
                .map_err(|e| ZipError::Refused(format!("`{raw_name}`: {e}")))?;
            continue;
        }
        if kind != 0 && kind != 0o100_000 {
            return Err(ZipError::Refused(format!(
                "`{raw_name}`: only files and directories are accepted (links, devices and pipes are not)"
            )));
        }
        if done.bytes.saturating_add(entry.size()) > limits.max_total_bytes {
            return Err(ZipError::Refused(format!(
                "`{raw_name}`: the files add up to more than {} bytes",
                limits.max_total_bytes
            )));
        }
        let mut file = target
            .create_file(&path, 0o644)
            .map_err(|e| ZipError::Refused(format!("`{raw_name}`: {e}")))?;
        loop {
            let n = entry
                .read(&mut buffer)
                .map_err(|e| ZipError::Bad(format!("`{raw_name}`: {e}")))?;
            if n == 0 {
                break;
            }
            done.bytes += n as u64;
            if done.bytes > limits.max_total_bytes {
                return Err(ZipError::Refused(format!(
                    "`{raw_name}`: the files add up to more than {} bytes",
                    limits.max_total_bytes
                )));
            }
            // Bounded from the first byte: a small zip may expand to at most the ratio
            // times 1 MiB.
            let allowed =
                u64::from(limits.max_expansion_ratio).saturating_mul(wire.get().max(1 << 20));
            if done.bytes > allowed {
                return Err(ZipError::Refused(format!(
                    "`{raw_name}`: expands more than {}-fold (a zip bomb?)",
                    limits.max_expansion_ratio
                )));
            }
            file.write_all(&buffer[..n])
                .map_err(|e| ZipError::Io(format!("cannot write `{raw_name}`: {e}")))?;
        }
        done.files += 1;
    }
    Ok(done)
}

/// Bytes of a file looked at to decide whether compressing it is worth it: enough to tell
/// text from image data, few enough that the test costs a fraction of the file (a 64 KiB
/// sample of every file cost most of the zip's time on trees of 80 KiB files).
const SAMPLE_BYTES: usize = 16 * 1024;
/// Deflate level: the fastest, since outputs are mostly images that barely shrink.
const DEFLATE_LEVEL: i64 = 1;

/// True when a sample from the middle of `file` (`size` bytes) deflates to under 90%:
/// images and other compressed data are stored as they are (deflating them costs the most
/// time for nothing), text and tables are deflated. The middle, not the start, so that a
/// header does not speak for the data after it. Leaves `file` at its start.
fn shrinks(file: &mut std::fs::File, size: u64, buffer: &mut [u8]) -> io::Result<bool> {
    use std::io::Seek as _;
    let limit = SAMPLE_BYTES.min(buffer.len());
    let start = (size / 2).saturating_sub(limit as u64 / 2);
    file.seek(io::SeekFrom::Start(start))?;
    let mut filled = 0;
    while filled < limit {
        let n = file.read(&mut buffer[filled..limit])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    file.seek(io::SeekFrom::Start(0))?;
    if filled < 512 {
        return Ok(true);
    }
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::with_capacity(filled), flate2::Compression::fast());
    encoder.write_all(&buffer[..filled])?;
    let compressed = encoder.finish()?;
    Ok(compressed.len() * 10 < filled * 9)
}

/// Writes a zip of the regular files under `root` (none if it is missing) to `out`, paths relative to `root`,
/// leaving out symlinks and `.chrislink` files as pfcon does; returns the files written.
pub fn pack(root: &Path, out: impl Write) -> io::Result<u64> {
    let mut writer = zip::ZipWriter::new_stream(out);
    let mut files = 0u64;
    // A root that is not there yet (outputs not back) makes an empty zip.
    let mut stack: Vec<_> = root
        .is_dir()
        .then(|| root.to_path_buf())
        .into_iter()
        .collect();
    let mut buffer = vec![0u8; 256 * 1024];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if !kind.is_file() || name.ends_with(".chrislink") {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let size = entry.metadata()?.len();
            let mut file = std::fs::File::open(&path)?;
            let method = if shrinks(&mut file, size, &mut buffer)? {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(method)
                .compression_level(
                    (method == zip::CompressionMethod::Deflated).then_some(DEFLATE_LEVEL),
                )
                .large_file(size >= u64::from(u32::MAX))
                .unix_permissions(0o644);
            writer
                .start_file(relative, options)
                .map_err(io::Error::other)?;
            loop {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buffer[..n])?;
            }
            files += 1;
        }
    }
    writer.finish().map_err(io::Error::other)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn outputs_round_trip_text_deflated_noise_stored_links_left_out() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("outgoing");
        std::fs::create_dir_all(root.join("sub"))?;
        std::fs::write(root.join("report.txt"), "findings ".repeat(2000))?;
        let image = noise(200_000);
        std::fs::write(root.join("sub/scan.dcm"), &image)?;
        // A header that compresses well before data that does not: the data decides.
        let mut with_header = vec![0u8; 20_000];
        with_header.extend(noise(200_000));
        std::fs::write(root.join("sub/header.nii"), &with_header)?;
        std::fs::write(root.join("sub/evil.chrislink"), "home/alice")?;
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape"))?;

        let mut zipped = Vec::new();
        assert_eq!(pack(&root, &mut zipped)?, 3);
        let mut archive =
            zip::ZipArchive::new(io::Cursor::new(zipped)).map_err(io::Error::other)?;
        assert_eq!(archive.len(), 3);
        let headed = archive
            .by_name("sub/header.nii")
            .map_err(io::Error::other)?;
        assert_eq!(headed.compression(), zip::CompressionMethod::Stored);
        drop(headed);
        let report = archive.by_name("report.txt").map_err(io::Error::other)?;
        assert_eq!(report.compression(), zip::CompressionMethod::Deflated);
        drop(report);
        let mut scan = archive.by_name("sub/scan.dcm").map_err(io::Error::other)?;
        assert_eq!(scan.compression(), zip::CompressionMethod::Stored);
        let mut back = Vec::new();
        scan.read_to_end(&mut back)?;
        assert_eq!(back, image);
        Ok(())
    }

    #[test]
    fn unpacking_refuses_what_climbs_out_and_counts_what_it_wrote() -> io::Result<()> {
        let zip_of = |names: &[&str]| -> io::Result<Vec<u8>> {
            let mut writer = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
            for name in names {
                writer
                    .start_file(*name, zip::write::SimpleFileOptions::default())
                    .map_err(io::Error::other)?;
                writer.write_all(b"data")?;
            }
            Ok(writer.finish().map_err(io::Error::other)?.into_inner())
        };
        let dir = tempfile::tempdir()?;
        let ok = dir.path().join("ok");
        std::fs::create_dir_all(&ok)?;
        let done = unpack(
            &zip_of(&["a.txt", "d/b.txt"])?[..],
            &ok,
            &ArchiveLimits::default(),
        )
        .map_err(io::Error::other)?;
        assert_eq!(done, Unpacked { files: 2, bytes: 8 });
        assert_eq!(std::fs::read(ok.join("d/b.txt"))?, b"data");

        let bad = dir.path().join("bad");
        std::fs::create_dir_all(&bad)?;
        let refused = unpack(
            &zip_of(&["../up.txt"])?[..],
            &bad,
            &ArchiveLimits::default(),
        );
        assert!(
            matches!(refused, Err(ZipError::Refused(ref why)) if why.contains("../up.txt")),
            "{refused:?}"
        );
        assert!(!dir.path().join("up.txt").exists());
        // An absolute name lands inside, as Python's zipfile extracts it.
        let rooted = dir.path().join("rooted");
        std::fs::create_dir_all(&rooted)?;
        unpack(
            &zip_of(&["/abs.txt"])?[..],
            &rooted,
            &ArchiveLimits::default(),
        )
        .map_err(io::Error::other)?;
        assert!(rooted.join("abs.txt").exists());
        let garbage = unpack(&b"not a zip at all"[..], &bad, &ArchiveLimits::default());
        assert!(matches!(garbage, Err(ZipError::Bad(_))), "{garbage:?}");
        let few = ArchiveLimits {
            max_entries: 1,
            ..ArchiveLimits::default()
        };
        let refused = unpack(&zip_of(&["x", "y"])?[..], &dir.path().join("ok"), &few);
        assert!(matches!(refused, Err(ZipError::Refused(_))), "{refused:?}");
        Ok(())
    }
}

//! Helpers shared by the fuzz targets: how an input is cut into network-sized pieces, and
//! the checks that whatever the decoder wrote stayed inside its root.
//!
//! The checks panic (so libFuzzer reports a crash) when an invariant is broken; they never
//! panic on their own I/O hiccups that could not come from the code under test.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// How a stream is cut into the pieces handed to the push parser, chosen by two control
/// bytes at the front of a fuzz input so the fuzzer can vary the cut independently of the
/// bytes being cut.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    mode: u8,
    size: u8,
    /// Save the decoder's state and resume a fresh decoder from it after every piece.
    pub resume_between_pieces: bool,
    /// Rewrite the checksum of every block (see [`fix_checksums`]) before decoding.
    pub fix_checksums: bool,
}

impl Plan {
    /// Reads the plan from `control` (two bytes).
    pub fn new(control: [u8; 2]) -> Self {
        Self {
            mode: control[0] & 0b11,
            size: control[1],
            resume_between_pieces: control[0] & 0b100 != 0,
            fix_checksums: control[0] & 0b1000 != 0,
        }
    }

    /// Splits `data` into non-empty pieces, in order, covering all of it.
    pub fn pieces<'a>(&self, data: &'a [u8]) -> Vec<&'a [u8]> {
        // Sizes around the 512-byte block matter most to the parser.
        const FIXED: [usize; 8] = [1, 7, 100, 511, 512, 513, 1024, 4096];
        let mut out = Vec::new();
        let mut rest = data;
        let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(self.size) ^ (data.len() as u64) << 8;
        while !rest.is_empty() {
            let len = match self.mode {
                // All at once.
                0 => rest.len(),
                // One fixed size.
                1 => FIXED[usize::from(self.size & 7)],
                // Pseudo-random sizes from 1 to 1..=1021 bytes.
                _ => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let cap = usize::from(self.size) * 4 + 1;
                    1 + (rng % cap as u64) as usize
                }
            };
            let (piece, tail) = rest.split_at(len.min(rest.len()));
            out.push(piece);
            rest = tail;
        }
        out
    }
}

/// Writes a correct header checksum into every 512-byte block of `stream` that is not all
/// zeros, the way `tar` does (six octal digits, NUL, space).
///
/// Headers always start on a block boundary, so this lets mutated headers past the
/// checksum test that random mutation almost never satisfies; file data blocks get 8
/// changed bytes, which is harmless.
pub fn fix_checksums(stream: &mut [u8]) {
    for block in stream.chunks_exact_mut(512) {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        let field = format!("{:06o}\0 ", sum);
        block[148..156].copy_from_slice(field.as_bytes());
    }
}

/// Splits a fuzz input into its two control bytes and the stream.
pub fn control_and_stream(data: &[u8]) -> Option<([u8; 2], &[u8])> {
    let (control, stream) = data.split_first_chunk::<2>()?;
    Some((*control, stream))
}

/// Panics unless `dir` holds nothing but names from `allowed`.
pub fn assert_only(dir: &Path, allowed: &[&str]) {
    let entries = fs::read_dir(dir).expect("list the scratch directory");
    for entry in entries {
        let name = entry.expect("read a directory entry").file_name();
        assert!(
            allowed.iter().any(|a| a.as_bytes() == name.as_bytes()),
            "something was created outside the extraction root: {:?} in {}",
            name,
            dir.display()
        );
    }
}

/// Panics if the tree under `root` could lead outside it: `root` replaced by a non-directory;
/// a symlink that is absolute, empty, has a `..` component or resolves outside the root; an
/// entry that is neither a directory, a regular file nor a symlink; or a regular file with
/// hard links outside the root (its link count exceeds the links found inside).
pub fn assert_confined(root: &Path) {
    let meta = fs::symlink_metadata(root).expect("the extraction root still exists");
    assert!(
        meta.is_dir(),
        "the extraction root {} is no longer a directory: {:?}",
        root.display(),
        meta.file_type()
    );
    let canonical_root = fs::canonicalize(root).expect("canonicalize the root");
    let mut links: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("list a directory in the root") {
            let entry = entry.expect("read a directory entry");
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).expect("lstat an entry");
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).expect("read a symlink");
                let bytes = target.as_os_str().as_bytes();
                assert!(!bytes.is_empty(), "empty symlink at {}", path.display());
                assert!(
                    !bytes.starts_with(b"/"),
                    "absolute symlink {} -> {}",
                    path.display(),
                    target.display()
                );
                assert!(
                    !bytes.split(|&b| b == b'/').any(|c| c == b".."),
                    "symlink with `..` {} -> {}",
                    path.display(),
                    target.display()
                );
                // Dangling links and loops are harmless; a resolved one must stay inside.
                if let Ok(resolved) = fs::canonicalize(&path) {
                    assert!(
                        resolved.starts_with(&canonical_root),
                        "symlink {} resolves outside the root, to {}",
                        path.display(),
                        resolved.display()
                    );
                }
            } else if kind.is_file() {
                let seen = links
                    .entry((meta.dev(), meta.ino()))
                    .or_insert((0, meta.nlink()));
                seen.0 += 1;
            } else {
                panic!("special file {:?} at {}", kind, path.display());
            }
        }
    }
    for ((_, ino), (inside, nlink)) in links {
        assert_eq!(
            inside, nlink,
            "inode {ino} has {nlink} links but only {inside} inside the root: a hard link reaches outside"
        );
    }
}

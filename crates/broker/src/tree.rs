//! Trees as a lazy, deterministic sequence of entries: what a sender turns into a tar stream
//! and what a shared-filesystem stage turns into hard links.
//!
//! The order is fixed (a depth-first walk, each directory's children sorted by name), so
//! walking the same unchanged tree twice gives the same entries, and the same tar bytes:
//! that is what lets a transfer resume at an offset.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::path::StorePath;

/// File name suffix of a ChRIS link (pfcon-api.md §2.13).
pub const CHRISLINK_SUFFIX: &str = ".chrislink";

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory; its children follow it.
    Directory,
    /// A regular file of `size` bytes, read from the entry's `source`.
    File {
        /// Length in bytes, as seen by the walk; a file that changes size while it is
        /// sent fails the transfer.
        size: u64,
    },
    /// A symbolic link to `target` (only ever produced by archives, never by a walk).
    Symlink {
        /// The link's target text.
        target: String,
    },
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Where the entry goes, relative to the tree's root.
    pub path: StorePath,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (no set-id or sticky bits).
    pub mode: u32,
    /// Modification time, seconds since the epoch (0 for earlier times).
    pub mtime: u64,
    /// Where its bytes are read from on the local filesystem.
    pub source: PathBuf,
}

/// An item of a walk: an entry, or something left out on purpose (counted, not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walked {
    /// An entry of the tree.
    Entry(TreeEntry),
    /// Left out, with why: symlinks, `.chrislink` files in outputs, sockets, devices.
    Skipped {
        /// Path relative to the tree's root.
        path: StorePath,
        /// Why it was left out.
        reason: &'static str,
    },
}

/// A walk in progress.
pub type TreeWalk = Box<dyn Iterator<Item = Result<Walked>> + Send>;

/// What a plain directory walk leaves out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkOptions {
    /// Leave out `*.chrislink` files: plugins may not author links (pfcon#175).
    pub skip_chrislinks: bool,
    /// A name left out (and not descended into) at the walk's root: a store's own
    /// bookkeeping directory.
    pub exclude_at_root: Option<&'static str>,
}

/// Walks the directory `dir` lazily: `dir` itself is the root and is not an entry; paths
/// are relative to it and prefixed with `prefix`. Symlinks are never followed nor sent.
pub fn walk_dir(dir: &Path, prefix: StorePath, options: WalkOptions) -> Result<TreeWalk> {
    let meta = fs::symlink_metadata(dir).map_err(|e| Error::io("read", dir.display(), e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "path",
            format!("`{}` is not a directory", dir.display()),
        ));
    }
    let mut walk = DirWalk {
        stack: Vec::new(),
        options,
    };
    walk.push_dir(dir.to_path_buf(), prefix)?;
    Ok(Box::new(walk))
}

/// Describes one filesystem object as a tree entry at `path`, or says why it is left out.
pub fn describe(source: &Path, path: StorePath, options: WalkOptions) -> Result<Walked> {
    let meta = fs::symlink_metadata(source).map_err(|e| Error::io("read", source.display(), e))?;
    Ok(describe_meta(source.to_path_buf(), path, &meta, options))
}

fn describe_meta(
    source: PathBuf,
    path: StorePath,
    meta: &fs::Metadata,
    options: WalkOptions,
) -> Walked {
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        EntryKind::Directory
    } else if file_type.is_file() {
        if options.skip_chrislinks && path.file_name().ends_with(CHRISLINK_SUFFIX) {
            return Walked::Skipped {
                path,
                reason: "plugins may not write .chrislink files",
            };
        }
        EntryKind::File { size: meta.len() }
    } else if file_type.is_symlink() {
        return Walked::Skipped {
            path,
            reason: "symlinks are not sent",
        };
    } else {
        return Walked::Skipped {
            path,
            reason: "not a regular file or directory",
        };
    };
    Walked::Entry(TreeEntry {
        path,
        kind,
        mode: meta.permissions().mode() & 0o777,
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        source,
    })
}

struct DirLevel {
    dir: PathBuf,
    prefix: StorePath,
    names: std::vec::IntoIter<std::ffi::OsString>,
}

struct DirWalk {
    stack: Vec<DirLevel>,
    options: WalkOptions,
}

impl DirWalk {
    fn push_dir(&mut self, dir: PathBuf, prefix: StorePath) -> Result<()> {
        let read = fs::read_dir(&dir).map_err(|e| Error::io("list", dir.display(), e))?;
        let mut names = Vec::new();
        for item in read {
            let item = item.map_err(|e| Error::io("list", dir.display(), e))?;
            names.push(item.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        self.stack.push(DirLevel {
            dir,
            prefix,
            names: names.into_iter(),
        });
        Ok(())
    }

    fn next_item(&mut self) -> Option<Result<Walked>> {
        loop {
            let at_root = self.stack.len() == 1;
            let level = self.stack.last_mut()?;
            let Some(name) = level.names.next() else {
                self.stack.pop();
                continue;
            };
            if at_root && self.options.exclude_at_root.is_some_and(|x| name == x) {
                continue;
            }
            let source = level.dir.join(&name);
            let Some(text) = name.to_str() else {
                return Some(Err(Error::refused(
                    source.display(),
                    "the name is not valid UTF-8, so it cannot be sent",
                )));
            };
            let path = match level.prefix.child(text) {
                Ok(path) => path,
                Err(reason) => {
                    return Some(Err(Error::refused(source.display(), reason.to_string())));
                }
            };
            let meta = match fs::symlink_metadata(&source) {
                Ok(meta) => meta,
                // Removed between the listing and now: the tree is being changed under us,
                // but a vanished entry cannot be sent, so it is simply not part of it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Some(Err(Error::io("read", source.display(), e))),
            };
            let walked = describe_meta(source.clone(), path.clone(), &meta, self.options);
            let is_dir = matches!(
                &walked,
                Walked::Entry(TreeEntry {
                    kind: EntryKind::Directory,
                    ..
                })
            );
            if is_dir && let Err(error) = self.push_dir(source, path) {
                return Some(Err(error));
            }
            return Some(Ok(walked));
        }
    }
}

impl Iterator for DirWalk {
    type Item = Result<Walked>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(walk: TreeWalk) -> Vec<String> {
        walk.map(|w| match w.unwrap() {
            Walked::Entry(e) => e.path.as_str().to_owned(),
            Walked::Skipped { path, .. } => format!("skip:{}", path.as_str()),
        })
        .collect()
    }

    #[test]
    fn walk_is_sorted_depth_first_and_skips_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/inner")).unwrap();
        fs::write(root.join("b/inner/z"), b"z").unwrap();
        fs::write(root.join("a"), b"a").unwrap();
        fs::write(root.join("c.chrislink"), b"home/x").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("d")).unwrap();
        let walked = paths(walk_dir(root, StorePath::root(), WalkOptions::default()).unwrap());
        assert_eq!(
            walked,
            ["a", "b", "b/inner", "b/inner/z", "c.chrislink", "skip:d"]
        );
        let outputs = WalkOptions {
            skip_chrislinks: true,
            exclude_at_root: None,
        };
        let walked = paths(walk_dir(root, StorePath::from_api("out").unwrap(), outputs).unwrap());
        assert_eq!(
            walked,
            [
                "out/a",
                "out/b",
                "out/b/inner",
                "out/b/inner/z",
                "skip:out/c.chrislink",
                "skip:out/d"
            ]
        );
    }
}

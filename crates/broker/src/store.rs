//! Where trees live: the [`Store`] trait, and [`LocalStore`], a directory on a local or
//! shared filesystem (pfcon's storeBase).
//!
//! A store hands out walks of its trees, gives each incoming transfer a private area
//! inside itself, and publishes an assembled tree at its destination in one rename, so a
//! tree is either absent or complete. Its own bookkeeping lives under `.dispatch/`, which
//! no request may name.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::chrislink;
use crate::error::{Error, Result};
use crate::path::StorePath;
use crate::tree::{self, TreeWalk, WalkOptions};

/// Name of the store's own directory at its root.
pub const RESERVED_DIR: &str = ".dispatch";

/// What a walk reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory tree.
    Tree {
        /// The directory.
        path: StorePath,
        /// Leave out `*.chrislink` files (a job's outputs).
        skip_chrislinks: bool,
    },
    /// A job's inputs with `.chrislink` files expanded (pfcon's fslink copy).
    JobInputs {
        /// Input dirs (or files), merged at the root.
        input_dirs: Vec<StorePath>,
        /// The job's output dir: links to it or its ancestors are refused.
        output_dir: StorePath,
    },
}

impl Source {
    /// The paths a caller must be allowed to read to walk this source.
    pub fn read_paths(&self) -> Vec<&StorePath> {
        match self {
            Source::Tree { path, .. } => vec![path],
            Source::JobInputs { input_dirs, .. } => input_dirs.iter().collect(),
        }
    }
}

/// What is at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// Store-relative path.
    pub path: StorePath,
    /// File, directory, symlink or other.
    pub kind: EntryInfoKind,
    /// Bytes (files), 0 otherwise.
    pub size: u64,
    /// Seconds since the epoch.
    pub modified_unix: i64,
}

/// Kinds of entries a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryInfoKind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link (never followed).
    Symlink,
    /// Socket, device, FIFO.
    Other,
}

/// What a delete removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteSummary {
    /// Files, directories and links removed.
    pub removed_entries: u64,
    /// Bytes of the files removed.
    pub removed_bytes: u64,
}

/// What to do when a destination is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingPolicy {
    /// Refuse unless the destination is missing or an empty directory.
    Fail,
    /// Swap the new tree in and remove the old one.
    Replace,
}

/// A place trees live: the seam between the transfer protocol and storage.
///
/// Calls block (filesystem work); async callers run them on a blocking thread.
pub trait Store: Send + Sync + 'static {
    /// Random id of this store, stable across restarts: two brokers that see the same id
    /// at the same root share a filesystem. Empty for a read-only store.
    fn id(&self) -> &str;

    /// The root directory on this machine's filesystem.
    fn root(&self) -> &Path;

    /// What is at `path`, or `None`.
    fn stat(&self, path: &StorePath) -> Result<Option<EntryInfo>>;

    /// The entries under `path` in walk order, skipping the first `skip`, at most `limit`.
    fn list(
        &self,
        path: &StorePath,
        recursive: bool,
        skip: u64,
        limit: usize,
    ) -> Result<Vec<EntryInfo>>;

    /// Removes what is at `path` (a file, link or whole tree); nothing there is not an error.
    fn delete(&self, path: &StorePath) -> Result<DeleteSummary>;

    /// A lazy, deterministic walk of `source`.
    fn walk(&self, source: &Source) -> Result<TreeWalk>;

    /// The private directory of transfer `transfer_id`, created if missing.
    fn transfer_area(&self, transfer_id: &str) -> Result<PathBuf>;

    /// Removes transfer `transfer_id`'s area and whatever it had assembled.
    fn discard_transfer(&self, transfer_id: &str) -> Result<()>;

    /// Moves the assembled tree `staged` (inside a transfer area) to `destination`.
    fn publish(&self, staged: &Path, destination: &StorePath, policy: ExistingPolicy)
    -> Result<()>;

    /// Flushes everything written to the store's filesystem to disk.
    fn sync(&self) -> Result<()>;
}

/// A store in a local (or network-mounted) directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    id: String,
    /// Where transfer areas go; `None` for a read-only store.
    transfers: Option<PathBuf>,
}

/// Where a download into a user's own directory keeps its partial state until it is done.
pub const PARTIAL_DIR: &str = ".dispatch-partial";

/// Checks a transfer id: it names a directory, so it is kept to a safe alphabet.
pub fn check_transfer_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(Error::invalid(
            "transfer_id",
            format!("`{id}` must be 1-64 letters, digits, `-` or `_`"),
        ));
    }
    Ok(())
}

/// Refuses paths inside the store's own bookkeeping directory.
pub fn check_not_reserved(field: &str, path: &StorePath) -> Result<()> {
    if path.components().next() == Some(RESERVED_DIR) {
        return Err(Error::invalid(
            field,
            format!("`{path}` is inside the broker's reserved `{RESERVED_DIR}` directory"),
        ));
    }
    Ok(())
}

impl LocalStore {
    /// Opens (creating if needed) the store rooted at `root`, writing its id on first use.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).map_err(|e| Error::io("create store root", root.display(), e))?;
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("resolve store root", root.display(), e))?;
        let reserved = root.join(RESERVED_DIR);
        fs::create_dir_all(reserved.join("transfers"))
            .map_err(|e| Error::io("create directory", reserved.display(), e))?;
        let id_path = reserved.join("store-id");
        let id = match fs::read_to_string(&id_path) {
            Ok(id) => id.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = uuid::Uuid::new_v4().to_string();
                let tmp = reserved.join("store-id.tmp");
                fs::write(&tmp, &id).map_err(|e| Error::io("write", tmp.display(), e))?;
                fs::rename(&tmp, &id_path).map_err(|e| Error::io("write", id_path.display(), e))?;
                id
            }
            Err(e) => return Err(Error::io("read", id_path.display(), e)),
        };
        let transfers = Some(reserved.join("transfers"));
        Ok(Self {
            root,
            id,
            transfers,
        })
    }

    /// A directory read as a store without writing anything into it: the source of an
    /// upload from a user's own directory. Transfers into it are refused.
    pub fn read_only(root: &Path) -> Result<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("resolve", root.display(), e))?;
        if !root.is_dir() {
            return Err(Error::invalid(
                "source",
                format!("`{}` is not a directory", root.display()),
            ));
        }
        Ok(Self {
            root,
            transfers: None,
            id: String::new(),
        })
    }

    /// A user's directory that downloads land in: nothing is written into it but the
    /// trees themselves and, while a download is incomplete, its state under
    /// `.dispatch-partial/` (removed once no download is pending).
    pub fn for_downloads(root: &Path) -> Result<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("resolve", root.display(), e))?;
        let transfers = Some(root.join(PARTIAL_DIR));
        Ok(Self {
            root,
            id: String::new(),
            transfers,
        })
    }

    /// The id of the store at `root` if there is one, without creating anything: how a
    /// broker finds out whether it can see another broker's store.
    pub fn peek_id(root: &Path) -> Option<String> {
        fs::read_to_string(root.join(RESERVED_DIR).join("store-id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// `path` on disk, after checking that no component of it is a symlink: a link
    /// planted in a tree (by a plugin, say) must not redirect a store operation.
    fn resolve(&self, path: &StorePath) -> Result<PathBuf> {
        let mut at = self.root.clone();
        let mut components = path.components().peekable();
        while let Some(component) = components.next() {
            at.push(component);
            if components.peek().is_none() {
                break;
            }
            match fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Error::PermissionDenied(format!(
                        "`{path}` goes through a symlink; store paths may not"
                    )));
                }
                _ => {}
            }
        }
        Ok(at)
    }

    fn transfers_dir(&self) -> Result<&Path> {
        self.transfers.as_deref().ok_or_else(|| {
            Error::PermissionDenied(format!("`{}` was opened read-only", self.root.display()))
        })
    }

    /// Removes transfer areas left alone for longer than `max_age`: transfers that were
    /// abandoned and will never be resumed.
    pub fn discard_stale_transfers(&self, max_age: std::time::Duration) -> Result<u64> {
        let dir = self.transfers_dir()?;
        let mut removed = 0;
        let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir.display(), e))?;
        for entry in entries.flatten() {
            let age = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > max_age) {
                fs::remove_dir_all(entry.path())
                    .map_err(|e| Error::io("remove", entry.path().display(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn entry_info(path: StorePath, meta: &fs::Metadata) -> EntryInfo {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        EntryInfoKind::Symlink
    } else if file_type.is_dir() {
        EntryInfoKind::Directory
    } else if file_type.is_file() {
        EntryInfoKind::File
    } else {
        EntryInfoKind::Other
    };
    let size = if kind == EntryInfoKind::File {
        meta.len()
    } else {
        0
    };
    EntryInfo {
        path,
        kind,
        size,
        modified_unix: meta.mtime(),
    }
}

/// The children of `dir` (whose store path is `prefix`) sorted by name, without the
/// store's reserved directory.
fn sorted_children(
    dir: &Path,
    prefix: &StorePath,
) -> Result<Vec<(StorePath, fs::Metadata, PathBuf)>> {
    let mut children = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", prefix, e))? {
        let entry = entry.map_err(|e| Error::io("list", prefix, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if prefix.is_root() && name == RESERVED_DIR {
            continue;
        }
        let Ok(child) = prefix.child(&name) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        children.push((child, meta, entry.path()));
    }
    children.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(children)
}

impl Store for LocalStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn root(&self) -> &Path {
        &self.root
    }

    fn stat(&self, path: &StorePath) -> Result<Option<EntryInfo>> {
        let at = self.resolve(path)?;
        match fs::symlink_metadata(&at) {
            Ok(meta) => Ok(Some(entry_info(path.clone(), &meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    fn list(
        &self,
        path: &StorePath,
        recursive: bool,
        skip: u64,
        limit: usize,
    ) -> Result<Vec<EntryInfo>> {
        let at = self.resolve(path)?;
        let meta = fs::symlink_metadata(&at).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(path.to_string()),
            _ => Error::io("read", path, e),
        })?;
        if !meta.is_dir() {
            return Ok(if skip == 0 {
                vec![entry_info(path.clone(), &meta)]
            } else {
                Vec::new()
            });
        }
        let mut out = Vec::new();
        let mut seen = 0u64;
        // Depth-first, each directory's children in name order: the same order as a walk.
        let mut stack = vec![sorted_children(&at, path)?.into_iter()];
        while let Some(level) = stack.last_mut() {
            let Some((child, meta, source)) = level.next() else {
                stack.pop();
                continue;
            };
            seen += 1;
            if seen > skip {
                out.push(entry_info(child.clone(), &meta));
                if out.len() >= limit {
                    break;
                }
            }
            if recursive && meta.is_dir() {
                stack.push(sorted_children(&source, &child)?.into_iter());
            }
        }
        Ok(out)
    }

    fn delete(&self, path: &StorePath) -> Result<DeleteSummary> {
        if path.is_root() {
            return Err(Error::invalid("path", "refusing to delete the whole store"));
        }
        let at = self.resolve(path)?;
        let meta = match fs::symlink_metadata(&at) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeleteSummary::default()),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let mut summary = DeleteSummary::default();
        if meta.is_dir() {
            // Count first (without following links), then let the standard library remove
            // the tree: its remove_dir_all never follows symlinks.
            let mut pending = vec![at.clone()];
            while let Some(dir) = pending.pop() {
                for entry in fs::read_dir(&dir)
                    .map_err(|e| Error::io("list", dir.display(), e))?
                    .flatten()
                {
                    let Ok(meta) = entry.metadata() else { continue };
                    summary.removed_entries += 1;
                    if meta.is_dir() {
                        pending.push(entry.path());
                    } else if meta.is_file() {
                        summary.removed_bytes += meta.len();
                    }
                }
            }
            fs::remove_dir_all(&at).map_err(|e| Error::io("delete", path, e))?;
        } else {
            if meta.is_file() {
                summary.removed_bytes = meta.len();
            }
            fs::remove_file(&at).map_err(|e| Error::io("delete", path, e))?;
        }
        summary.removed_entries += 1;
        Ok(summary)
    }

    fn walk(&self, source: &Source) -> Result<TreeWalk> {
        match source {
            Source::Tree {
                path,
                skip_chrislinks,
            } => {
                let at = self.resolve(path)?;
                if fs::symlink_metadata(&at).is_err() {
                    return Err(Error::NotFound(path.to_string()));
                }
                // The store's own directory is never part of a tree, even one walked from
                // the root.
                let exclude_at_root = path.is_root().then_some(RESERVED_DIR);
                let options = WalkOptions {
                    skip_chrislinks: *skip_chrislinks,
                    exclude_at_root,
                };
                tree::walk_dir(&at, StorePath::root(), options)
            }
            Source::JobInputs {
                input_dirs,
                output_dir,
            } => {
                for dir in input_dirs {
                    self.resolve(dir)?;
                }
                chrislink::walk_job_inputs(&self.root, input_dirs, output_dir)
            }
        }
    }

    fn transfer_area(&self, transfer_id: &str) -> Result<PathBuf> {
        check_transfer_id(transfer_id)?;
        let area = self.transfers_dir()?.join(transfer_id);
        fs::create_dir_all(&area).map_err(|e| Error::io("create directory", area.display(), e))?;
        Ok(area)
    }

    fn discard_transfer(&self, transfer_id: &str) -> Result<()> {
        check_transfer_id(transfer_id)?;
        let transfers = self.transfers_dir()?;
        let area = transfers.join(transfer_id);
        match fs::remove_dir_all(&area) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io("remove", area.display(), e))
            }
            _ => {
                // Leaves no empty bookkeeping behind in a user's directory; fails
                // harmlessly while other transfers are pending.
                if self.id.is_empty() {
                    let _ = fs::remove_dir(transfers);
                }
                Ok(())
            }
        }
    }

    fn publish(
        &self,
        staged: &Path,
        destination: &StorePath,
        policy: ExistingPolicy,
    ) -> Result<()> {
        if destination.is_root() {
            return Err(Error::invalid(
                "destination",
                "a tree cannot replace the store's root",
            ));
        }
        let at = self.resolve(destination)?;
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", destination, e))?;
            // create_dir_all follows links; re-check now that every parent exists.
            self.resolve(destination)?;
        }
        match fs::rename(staged, &at) {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR | libc::EISDIR)
                ) => {}
            Err(e) => return Err(Error::io("publish", destination, e)),
        }
        if policy == ExistingPolicy::Fail {
            return Err(Error::AlreadyExists(destination.to_string()));
        }
        let old = staged.with_file_name("replaced");
        fs::rename(&at, &old).map_err(|e| Error::io("move aside", destination, e))?;
        fs::rename(staged, &at).map_err(|e| Error::io("publish", destination, e))?;
        let removed = if fs::symlink_metadata(&old).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&old)
        } else {
            fs::remove_file(&old)
        };
        removed.map_err(|e| Error::io("remove replaced tree at", destination, e))
    }

    fn sync(&self) -> Result<()> {
        let dir =
            fs::File::open(&self.root).map_err(|e| Error::io("open", self.root.display(), e))?;
        rustix::fs::syncfs(&dir).map_err(|e| Error::io("sync", self.root.display(), e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_its_id_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let again = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.id(), again.id());
        assert_eq!(LocalStore::peek_id(dir.path()).as_deref(), Some(store.id()));
    }

    #[test]
    fn download_stores_leave_no_bookkeeping_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::for_downloads(dir.path()).unwrap();
        store.transfer_area("t1").unwrap();
        assert!(dir.path().join(PARTIAL_DIR).is_dir());
        store.discard_transfer("t1").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let read_only = LocalStore::read_only(dir.path()).unwrap();
        assert!(matches!(
            read_only.transfer_area("t2"),
            Err(Error::PermissionDenied(_))
        ));
    }
}

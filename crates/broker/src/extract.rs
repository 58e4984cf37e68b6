//! Writes entries under one root directory without ever leaving it.
//!
//! Paths are already free of `..` and absolute forms ([`StorePath`]); what remains is the
//! filesystem itself: no write goes through a symlink (every parent is checked with
//! `lstat`, files are opened with `O_NOFOLLOW`), a directory is never replaced by anything
//! else, and symlinks may only point below their own directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::path::StorePath;

/// A directory that entries are written into.
pub struct ExtractRoot {
    root: PathBuf,
    /// The last parent directory found safe; entries arrive grouped by directory, so most
    /// checks are one comparison. Safe to cache because a directory is never replaced.
    checked_parent: Option<StorePath>,
}

impl ExtractRoot {
    /// Entries go under `root`, which must exist.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            checked_parent: None,
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates (or keeps) the directory at `path`.
    pub fn create_dir(&mut self, path: &StorePath, mode: u32) -> Result<()> {
        if path.is_root() {
            return Ok(());
        }
        self.ensure_parent(path)?;
        let target = path.under(&self.root);
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::refused(
                    path,
                    "a directory would replace an earlier entry that is not one",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&target).map_err(|e| Error::io("create directory", path, e))?;
            }
            Err(e) => return Err(Error::io("read", path, e)),
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(dir_mode(mode)))
            .map_err(|e| Error::io("set permissions of", path, e))
    }

    /// Creates the file at `path`, empty, replacing a file or link that is there.
    pub fn create_file(&mut self, path: &StorePath, mode: u32) -> Result<File> {
        if path.is_root() {
            return Err(Error::refused(path, "a file cannot replace the root"));
        }
        self.ensure_parent(path)?;
        let target = path.under(&self.root);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(file_mode(mode))
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
        };
        let file = match open() {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.remove_non_dir(path, &target)?;
                open().map_err(|e| Error::io("create file", path, e))?
            }
            Err(e) => return Err(Error::io("create file", path, e)),
        };
        // The umask may have removed bits the archive asked for.
        file.set_permissions(fs::Permissions::from_mode(file_mode(mode)))
            .map_err(|e| Error::io("set permissions of", path, e))?;
        Ok(file)
    }

    /// Reopens a file written in an earlier attempt, cut back to `len` bytes, positioned at
    /// its end: resuming inside a large file does not resend what is already there.
    pub fn reopen_file(&mut self, path: &StorePath, len: u64) -> Result<File> {
        self.ensure_parent(path)?;
        let target = path.under(&self.root);
        let mut file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
            .map_err(|e| Error::io("reopen file", path, e))?;
        file.set_len(len)
            .map_err(|e| Error::io("truncate", path, e))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek", path, e))?;
        Ok(file)
    }

    /// Creates a symlink, if its target stays below the link's own directory.
    pub fn symlink(&mut self, path: &StorePath, target: &str) -> Result<()> {
        check_symlink_target(target).map_err(|reason| Error::refused(path, reason))?;
        if path.is_root() {
            return Err(Error::refused(path, "a link cannot replace the root"));
        }
        self.ensure_parent(path)?;
        let at = path.under(&self.root);
        if fs::symlink_metadata(&at).is_ok() {
            self.remove_non_dir(path, &at)?;
        }
        std::os::unix::fs::symlink(target, &at).map_err(|e| Error::io("create symlink", path, e))
    }

    /// Creates a hard link at `path` to the regular file `target` written earlier into
    /// this root.
    pub fn hard_link(&mut self, path: &StorePath, target: &StorePath) -> Result<()> {
        if path.is_root() || target.is_root() {
            return Err(Error::refused(path, "a hard link cannot involve the root"));
        }
        self.check_no_symlink_in(target).map_err(|_| {
            Error::refused(
                path,
                format!(
                    "hard link target `{target}` is not a file written earlier in this archive"
                ),
            )
        })?;
        let source = target.under(&self.root);
        match fs::symlink_metadata(&source) {
            Ok(meta) if meta.is_file() => {}
            _ => {
                return Err(Error::refused(
                    path,
                    format!(
                        "hard link target `{target}` is not a file written earlier in this archive"
                    ),
                ));
            }
        }
        self.ensure_parent(path)?;
        let at = path.under(&self.root);
        if fs::symlink_metadata(&at).is_ok() {
            self.remove_non_dir(path, &at)?;
        }
        fs::hard_link(&source, &at).map_err(|e| Error::io("create hard link", path, e))
    }

    /// Places the file `source` (outside this root, on the same filesystem ideally) at
    /// `path` by hard link, or by copy where a link is impossible (another filesystem,
    /// link count limits). Returns true if it was linked.
    pub fn link_or_copy(&mut self, path: &StorePath, source: &Path, mode: u32) -> Result<bool> {
        if path.is_root() {
            return Err(Error::refused(path, "a file cannot replace the root"));
        }
        self.ensure_parent(path)?;
        let at = path.under(&self.root);
        if fs::symlink_metadata(&at).is_ok() {
            self.remove_non_dir(path, &at)?;
        }
        if fs::hard_link(source, &at).is_ok() {
            return Ok(true);
        }
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(source)
            .map_err(|e| Error::io("open", source.display(), e))?;
        let mut to = self.create_file(path, mode)?;
        io::copy(&mut from, &mut to).map_err(|e| Error::io("copy into", path, e))?;
        Ok(false)
    }

    fn remove_non_dir(&self, path: &StorePath, at: &Path) -> Result<()> {
        match fs::symlink_metadata(at) {
            Ok(meta) if meta.is_dir() => Err(Error::refused(
                path,
                "an earlier entry at this path is a directory",
            )),
            Ok(_) => fs::remove_file(at).map_err(|e| Error::io("replace", path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Makes sure every ancestor of `path` is a real directory, creating missing ones.
    fn ensure_parent(&mut self, path: &StorePath) -> Result<()> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        if parent.is_root() || self.checked_parent.as_ref() == Some(&parent) {
            return Ok(());
        }
        let mut at = self.root.clone();
        for component in parent.components() {
            at.push(component);
            match fs::symlink_metadata(&at) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) => {
                    let what = if meta.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(Error::refused(
                        path,
                        format!(
                            "its parent `{}` is {what}",
                            at.strip_prefix(&self.root).unwrap_or(&at).display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&at)
                        .map_err(|e| Error::io("create directory", at.display(), e))?;
                }
                Err(e) => return Err(Error::io("read", at.display(), e)),
            }
        }
        self.checked_parent = Some(parent);
        Ok(())
    }

    fn check_no_symlink_in(&self, path: &StorePath) -> Result<()> {
        let mut at = self.root.clone();
        for component in path.components() {
            at.push(component);
            let meta = fs::symlink_metadata(&at).map_err(|e| Error::io("read", at.display(), e))?;
            if meta.file_type().is_symlink() {
                return Err(Error::refused(path, "goes through a symlink"));
            }
        }
        Ok(())
    }
}

/// Why a symlink target is refused, or `Ok` if it only reaches below the link's directory.
///
/// Relative targets without `..` can only resolve downwards, and so can chains of them, so
/// no combination of accepted links reaches outside the tree.
pub fn check_symlink_target(target: &str) -> std::result::Result<(), String> {
    if target.is_empty() {
        return Err("symlink target is empty".into());
    }
    if target.starts_with('/') {
        return Err(format!(
            "symlink target `{target}` is absolute; only relative links below the link's directory are accepted"
        ));
    }
    if target.contains('\0') {
        return Err("symlink target contains a NUL byte".into());
    }
    if target.split('/').any(|c| c == "..") {
        return Err(format!(
            "symlink target `{target}` climbs with `..`; only links below the link's directory are accepted"
        ));
    }
    if target.len() > crate::path::MAX_PATH_BYTES {
        return Err("symlink target is too long".into());
    }
    Ok(())
}

/// Directories stay traversable and writable by their owner (the broker) whatever the
/// archive says; set-id and sticky bits never survive.
fn dir_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o700
}

/// Files stay readable and writable by their owner; set-id and sticky bits never survive.
fn file_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o600
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> StorePath {
        StorePath::from_api(s).unwrap()
    }

    #[test]
    fn writes_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        let mut x = ExtractRoot::new(root.clone());

        let err = x
            .create_file(&p("escape/owned"), 0o644)
            .unwrap_err()
            .to_string();
        assert!(err.contains("escape") && err.contains("symlink"), "{err}");
        assert!(
            x.create_file(&p("escape"), 0o644).is_ok(),
            "a link itself may be replaced"
        );
        assert!(fs::symlink_metadata(root.join("escape")).unwrap().is_file());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        assert!(x.symlink(&p("l1"), "/etc").is_err());
        assert!(x.symlink(&p("d/l2"), "../x").is_err());
        assert!(x.symlink(&p("d/l3"), "sub/file").is_ok());

        x.create_dir(&p("adir"), 0o755).unwrap();
        assert!(x.create_file(&p("adir"), 0o644).is_err());
        assert!(x.hard_link(&p("h"), &p("adir")).is_err());
        assert!(x.hard_link(&p("h"), &p("d/l3")).is_err());
        x.create_file(&p("real"), 0o4755).unwrap();
        let mode = fs::metadata(root.join("real"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "set-uid bit must be dropped");
        x.hard_link(&p("h"), &p("real")).unwrap();
    }
}

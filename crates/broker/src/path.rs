//! Store-relative paths: the only kind of path that crosses the broker's doors.
//!
//! A [`StorePath`] is normalised once, when it is parsed, and from then on cannot name
//! anything outside the directory it is relative to: it has no `..`, is not absolute, has
//! no empty or `.` components, no NUL, is valid UTF-8 and stays within the length limits.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single component accepted, in bytes (Linux's `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Why a path was refused; the message is meant for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The bytes are not UTF-8, so the name could not be shown or stored faithfully.
    #[error("name is not valid UTF-8")]
    NotUtf8,
    /// An absolute path in an archive would be written outside the destination.
    #[error("absolute paths are not allowed")]
    Absolute,
    /// `..` could climb out of the destination.
    #[error("`..` components are not allowed")]
    ParentComponent,
    /// A NUL byte would truncate the name at the system call.
    #[error("names may not contain NUL bytes")]
    Nul,
    /// Longer than [`MAX_PATH_BYTES`].
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    /// A component is longer than [`MAX_COMPONENT_BYTES`].
    #[error("a path component is longer than {MAX_COMPONENT_BYTES} bytes")]
    ComponentTooLong,
    /// The path has no components where one is required.
    #[error("path is empty")]
    Empty,
}

/// A normalised path relative to a root (a store, a transfer's tree, an archive).
///
/// The empty path is the root itself.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    /// The root.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// Parses a path given through an API (gRPC, REST, config): surrounding `/` are
    /// stripped, as pfcon strips them from job ids and storage paths.
    pub fn from_api(raw: &str) -> Result<Self, PathError> {
        Self::normalise(raw.trim_matches('/'))
    }

    /// Parses an entry name read from an archive: an absolute name is refused rather than
    /// stripped, because it signals an archive built to escape.
    pub fn from_archive(raw: &[u8]) -> Result<Self, PathError> {
        let text = std::str::from_utf8(raw).map_err(|_| PathError::NotUtf8)?;
        if text.starts_with('/') {
            return Err(PathError::Absolute);
        }
        Self::normalise(text)
    }

    /// Like [`StorePath::from_api`], but the root is refused.
    pub fn non_root_from_api(raw: &str) -> Result<Self, PathError> {
        let path = Self::from_api(raw)?;
        if path.is_root() {
            return Err(PathError::Empty);
        }
        Ok(path)
    }

    fn normalise(text: &str) -> Result<Self, PathError> {
        if text.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        if text.contains('\0') {
            return Err(PathError::Nul);
        }
        let mut out = String::with_capacity(text.len());
        for component in text.split('/') {
            match component {
                "" | "." => continue,
                ".." => return Err(PathError::ParentComponent),
                name if name.len() > MAX_COMPONENT_BYTES => {
                    return Err(PathError::ComponentTooLong);
                }
                name => {
                    if !out.is_empty() {
                        out.push('/');
                    }
                    out.push_str(name);
                }
            }
        }
        Ok(Self(out))
    }

    /// True for the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path as text, `/`-separated, without leading or trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This path under `base` on the local filesystem.
    pub fn under(&self, base: &Path) -> PathBuf {
        if self.is_root() {
            base.to_path_buf()
        } else {
            base.join(&self.0)
        }
    }

    /// `self/name`, where `name` is one already-checked component or relative path.
    pub fn join(&self, other: &StorePath) -> StorePath {
        match (self.is_root(), other.is_root()) {
            (true, _) => other.clone(),
            (_, true) => self.clone(),
            _ => StorePath(format!("{}/{}", self.0, other.0)),
        }
    }

    /// Appends one component given as text, checking it.
    pub fn child(&self, name: &str) -> Result<StorePath, PathError> {
        if name.contains('/') || name == "." || name.is_empty() {
            return Err(PathError::Empty);
        }
        let child = Self::normalise(name)?;
        if self.0.len() + 1 + child.0.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        Ok(self.join(&child))
    }

    /// The parent, or `None` for the root.
    pub fn parent(&self) -> Option<StorePath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(at) => StorePath(self.0[..at].to_owned()),
            None => StorePath::root(),
        })
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// The components, root first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// True if `self` is `ancestor` or lies below it, comparing whole components.
    pub fn starts_with(&self, ancestor: &StorePath) -> bool {
        ancestor.is_root()
            || self.0 == ancestor.0
            || (self.0.starts_with(&ancestor.0)
                && self.0.as_bytes().get(ancestor.0.len()) == Some(&b'/'))
    }

    /// `self` with the leading `ancestor` removed, or `None` if it is not below it.
    pub fn strip_prefix(&self, ancestor: &StorePath) -> Option<StorePath> {
        if !self.starts_with(ancestor) {
            return None;
        }
        if ancestor.is_root() {
            return Some(self.clone());
        }
        Some(StorePath(
            self.0[ancestor.0.len()..]
                .trim_start_matches('/')
                .to_owned(),
        ))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn archive_names_are_normalised() {
        let p = StorePath::from_archive(b"./a//b/./c/").unwrap();
        assert_eq!(p.as_str(), "a/b/c");
        assert_eq!(StorePath::from_archive(b"./").unwrap(), StorePath::root());
    }

    #[test]
    fn hostile_archive_names_are_refused() {
        assert_eq!(
            StorePath::from_archive(b"/etc/passwd"),
            Err(PathError::Absolute)
        );
        assert_eq!(
            StorePath::from_archive(b"a/../../x"),
            Err(PathError::ParentComponent)
        );
        assert_eq!(
            StorePath::from_archive(b".."),
            Err(PathError::ParentComponent)
        );
        assert_eq!(StorePath::from_archive(b"a\0b"), Err(PathError::Nul));
        assert_eq!(
            StorePath::from_archive(&[b'a', 0xff, b'b']),
            Err(PathError::NotUtf8)
        );
        let long_component = vec![b'x'; 256];
        assert_eq!(
            StorePath::from_archive(&long_component),
            Err(PathError::ComponentTooLong)
        );
        let long_path = "d/".repeat(2100);
        assert_eq!(
            StorePath::from_archive(long_path.as_bytes()),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn api_paths_strip_slashes() {
        assert_eq!(
            StorePath::from_api("/key-1/incoming/").unwrap().as_str(),
            "key-1/incoming"
        );
        assert!(StorePath::non_root_from_api("/").is_err());
    }

    #[test]
    fn prefixes_compare_whole_components() {
        let bob = StorePath::from_api("home/bob").unwrap();
        assert!(StorePath::from_api("home/bob/x").unwrap().starts_with(&bob));
        assert!(StorePath::from_api("home/bob").unwrap().starts_with(&bob));
        assert!(!StorePath::from_api("home/bobby").unwrap().starts_with(&bob));
        assert_eq!(
            StorePath::from_api("home/bob/x/y")
                .unwrap()
                .strip_prefix(&bob)
                .unwrap()
                .as_str(),
            "x/y"
        );
        assert_eq!(
            StorePath::from_api("a/b")
                .unwrap()
                .parent()
                .unwrap()
                .as_str(),
            "a"
        );
        assert_eq!(
            StorePath::from_api("a").unwrap().parent().unwrap(),
            StorePath::root()
        );
    }

    proptest! {
        #[test]
        fn parsed_paths_never_escape(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = StorePath::from_archive(&raw) {
                let base = Path::new("/base");
                let joined = p.under(base);
                prop_assert!(joined.starts_with(base));
                prop_assert!(!p.components().any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!p.as_str().starts_with('/') && !p.as_str().ends_with('/'));
                prop_assert!(p.as_str().len() <= MAX_PATH_BYTES);
            }
        }

        #[test]
        fn normalising_is_idempotent(parts in proptest::collection::vec("[a-z.]{0,4}", 0..8)) {
            let raw = parts.join("/");
            if let Ok(p) = StorePath::from_archive(raw.as_bytes()) {
                let again = StorePath::from_archive(p.as_str().as_bytes()).unwrap();
                prop_assert_eq!(again, p);
            }
        }

        #[test]
        fn dot_dot_anywhere_is_refused(prefix in "[a-z]{1,3}(/[a-z]{1,3}){0,3}", suffix in "(/[a-z]{1,3}){0,3}") {
            let raw = format!("{prefix}/..{suffix}");
            prop_assert_eq!(StorePath::from_archive(raw.as_bytes()), Err(PathError::ParentComponent));
        }
    }
}

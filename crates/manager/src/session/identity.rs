//! The site's identity at the hub: the site id and credential the coordinator issued for a
//! join token, kept in one file only the manager's user can read, and the request id of a
//! registration in flight, so a retry after a lost answer is recognised as the same one.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `Register` gave this site. The credential never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteIdentity {
    /// The site's id at the hub.
    pub site_id: String,
    /// The secret presented in every hello.
    pub site_credential: String,
    /// The coordinator that issued it, so a manager pointed at another hub says so
    /// instead of presenting a credential that hub never issued.
    pub coordinator_uri: String,
}

impl std::fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteIdentity")
            .field("site_id", &self.site_id)
            .field("site_credential", &"<redacted>")
            .field("coordinator_uri", &self.coordinator_uri)
            .finish()
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old content or the new, never a
/// mix, and only the owner can read it (mode 0600): a temporary file beside it, synced,
/// renamed over, and the directory synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A file left by an older version with wider bits is narrowed too.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The identity stored at `path`, if the site has joined.
pub fn load(path: &Path) -> std::io::Result<Option<SiteIdentity>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stores the identity at `path` (0600, atomically).
pub fn store(path: &Path, identity: &SiteIdentity) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(identity).map_err(std::io::Error::other)?;
    write_private(path, &bytes)
}

fn request_id_path(credential_file: &Path) -> PathBuf {
    let mut name = credential_file.as_os_str().to_os_string();
    name.push(".request-id");
    PathBuf::from(name)
}

/// The id of the registration in flight: the one written before an earlier attempt (in
/// this process or one that crashed), else a fresh one, written before it is used.
pub fn pending_request_id(credential_file: &Path) -> std::io::Result<String> {
    let path = request_id_path(credential_file);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = uuid::Uuid::new_v4().to_string();
    write_private(&path, id.as_bytes())?;
    Ok(id)
}

/// Forgets the registration in flight once its answer is stored.
pub fn clear_request_id(credential_file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(request_id_path(credential_file)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn identity_is_private_atomic_and_redacted() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state/site.json");
        assert_eq!(load(&path)?, None);
        let identity = SiteIdentity {
            site_id: "site-1".into(),
            site_credential: "very-secret".into(),
            coordinator_uri: "http://hub".into(),
        };
        store(&path, &identity)?;
        assert_eq!(load(&path)?, Some(identity.clone()));
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{identity:?}").contains("very-secret"));

        let first = pending_request_id(&path)?;
        assert_eq!(pending_request_id(&path)?, first, "a retry reuses the id");
        clear_request_id(&path)?;
        assert_ne!(pending_request_id(&path)?, first);
        Ok(())
    }
}

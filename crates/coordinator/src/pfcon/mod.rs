//! pfcon's REST API on the coordinator, so that CUBE uses the suite unmodified: it points
//! a compute resource at this address and speaks to it exactly as it speaks to pfcon
//! (`../shared/reference/pfcon-api.md`). Each request is translated onto the coordinator's
//! own job API, in process, so a job submitted by CUBE is checked, stored, scheduled and
//! staged exactly as one submitted over gRPC; inputs and outputs are read and written in
//! the hub broker's store (pfcon's `STOREBASE_MOUNT`), streamed, never held whole.
//!
//! This build serves pfcon 6's API (what CUBE 7 speaks) and, behind `legacy_api`, pfcon
//! 5's `jobs/` API (CUBE 6.11 and older), in the zipfile (out-of-network), filesystem and
//! fslink (in-network, shared storeBase) modes. Object storage (`swift`, `s3`) is refused
//! at start-up, by name, until it lands.

pub mod http;
pub mod jwt;
pub mod shared;
pub mod zipio;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The pfcon version whose API this face speaks, reported as `server_version`.
pub const SERVER_VERSION: &str = "6.0.6";
/// The pfcon version whose `jobs/` API the legacy routes speak.
pub const LEGACY_SERVER_VERSION: &str = "5.3.1";

/// The `[pfcon]` table: pfcon's own settings, also read from pfcon's environment
/// variable names (`PFCON_USER`, `PFCON_PASSWORD`, `SECRET_KEY`, `PFCON_INNETWORK`,
/// `STORAGE_ENV`, `STOREBASE_MOUNT`, `CONTAINER_ENV`, `JOB_LOGS_TAIL`, `REMOVE_JOBS`, ...)
/// by the coordinator binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PfconConfig {
    /// Address of the REST API; unset: the face is off.
    pub listen: Option<SocketAddr>,
    /// The one user CUBE logs in as (`PFCON_USER`).
    pub user: String,
    /// Its password (`PFCON_PASSWORD`).
    pub password: String,
    /// The key login tokens are signed with (`SECRET_KEY`).
    pub secret_key: String,
    /// In-network mode (`PFCON_INNETWORK`): CUBE sends storage paths, not zips.
    pub innetwork: bool,
    /// `zipfile`, `filesystem`, `fslink`, `swift` or `s3` (`STORAGE_ENV`); empty:
    /// pfcon's default for the network mode.
    pub storage_env: String,
    /// The hub broker's store as this machine sees it (`STOREBASE_MOUNT`): uploads are
    /// unpacked there and outputs read from there.
    pub storebase: PathBuf,
    /// Log lines a job object carries (`JOB_LOGS_TAIL`).
    pub job_logs_tail: u32,
    /// `false` keeps jobs at their sites on DELETE (`REMOVE_JOBS=no`).
    pub remove_jobs: bool,
    /// Serve pfcon 5's `jobs/` API too, for CUBE 6.11 and older (`PFCON_LEGACY_API`).
    pub legacy_api: bool,
    /// What server info reports as `container_env` (`CONTAINER_ENV`).
    pub container_env: String,
    /// What server info reports as `compute_volume_type` (`COMPUTE_VOLUME_TYPE`): one the
    /// container env allows (docker and podman: `host` or `docker_local_volume`; swarm:
    /// `host`; kubernetes and openshift: `kubernetes_pvc`); empty: the env's default.
    pub compute_volume_type: String,
    /// The PVC holding storeBase (`VOLUME_NAME`), required with `kubernetes_pvc`, as pfcon
    /// requires it. The Kubernetes sites' own `[kubernetes] pvc_name` is what their jobs
    /// mount.
    pub volume_name: String,
}

impl Default for PfconConfig {
    fn default() -> Self {
        Self {
            listen: None,
            user: String::new(),
            password: String::new(),
            secret_key: String::new(),
            innetwork: false,
            storage_env: String::new(),
            storebase: PathBuf::from("/var/local/storeBase"),
            job_logs_tail: 1000,
            remove_jobs: true,
            legacy_api: false,
            container_env: "docker".into(),
            compute_volume_type: String::new(),
            volume_name: String::new(),
        }
    }
}

/// pfcon's storage modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageEnv {
    /// Out-of-network: inputs arrive as a zip, outputs leave as one.
    Zipfile,
    /// In-network, shared storeBase: the plugin reads its one input dir as it is and
    /// writes straight to its output dir; no copy, no ChRIS links.
    Filesystem,
    /// In-network, shared storeBase: a copy job first gathers the input dirs (ChRIS links
    /// expanded, by hard link where it can) into `key-<jid>/incoming`.
    Fslink,
}

impl StorageEnv {
    /// The word pfcon uses.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageEnv::Zipfile => "zipfile",
            StorageEnv::Filesystem => "filesystem",
            StorageEnv::Fslink => "fslink",
        }
    }

    /// Whether CUBE must run a copy job before the plugin job.
    pub fn requires_copy_job(self) -> bool {
        self == StorageEnv::Fslink
    }

    /// The job spec's storage mode.
    pub fn wire(self) -> dispatch_proto::v1::StorageMode {
        match self {
            StorageEnv::Zipfile => dispatch_proto::v1::StorageMode::Zipfile,
            StorageEnv::Filesystem => dispatch_proto::v1::StorageMode::Filesystem,
            StorageEnv::Fslink => dispatch_proto::v1::StorageMode::Fslink,
        }
    }
}

impl PfconConfig {
    /// True when the face is to be served.
    pub fn is_enabled(&self) -> bool {
        self.listen.is_some()
    }

    /// The storage mode, after the fail-fast checks pfcon makes at start-up (and ours:
    /// modes not in this build are refused by name).
    pub fn storage(&self) -> Result<StorageEnv> {
        let word = match (self.storage_env.as_str(), self.innetwork) {
            ("", false) => "zipfile",
            ("", true) => "swift",
            (word, _) => word,
        };
        match (word, self.innetwork) {
            ("zipfile", false) => Ok(StorageEnv::Zipfile),
            ("zipfile", true) => Err(Error::Config(
                "pfcon: STORAGE_ENV=zipfile is the out-of-network mode; unset PFCON_INNETWORK or pick filesystem or fslink".into(),
            )),
            ("filesystem" | "fslink" | "swift" | "s3", false) => Err(Error::Config(format!(
                "pfcon: STORAGE_ENV={word} is an in-network mode; set PFCON_INNETWORK=true, or use zipfile"
            ))),
            ("swift" | "s3", true) => Err(Error::Config(format!(
                "pfcon: STORAGE_ENV={word} needs object storage, which this build does not have yet; use zipfile (out-of-network) for now"
            ))),
            ("filesystem", true) => Ok(StorageEnv::Filesystem),
            ("fslink", true) => Ok(StorageEnv::Fslink),
            (other, _) => Err(Error::Config(format!(
                "pfcon: STORAGE_ENV `{other}` is not one of zipfile, filesystem, fslink, swift, s3"
            ))),
        }
    }

    /// Checks the settings when the face is on: the credentials are set and the storage
    /// mode is one this build serves.
    pub fn check(&self) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let missing: Vec<&str> = [
            ("user (PFCON_USER)", self.user.is_empty()),
            ("password (PFCON_PASSWORD)", self.password.is_empty()),
            ("secret_key (SECRET_KEY)", self.secret_key.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, empty)| empty.then_some(name))
        .collect();
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "pfcon: {} must be set when pfcon.listen is",
                missing.join(", ")
            )));
        }
        self.storage()?;
        self.check_volume_type()
    }

    /// The volume types `CONTAINER_ENV` allows, its default first (pfcon's own table, but
    /// `host` first for docker: the hub's storeBase is a host directory).
    fn allowed_volume_types(&self) -> Result<&'static [&'static str]> {
        match self.container_env.as_str() {
            "docker" | "podman" => Ok(&["host", "docker_local_volume"]),
            "swarm" => Ok(&["host"]),
            "kubernetes" | "openshift" => Ok(&["kubernetes_pvc"]),
            other => Err(Error::Config(format!(
                "pfcon: CONTAINER_ENV `{other}` is not one of docker, podman, swarm, kubernetes, openshift"
            ))),
        }
    }

    /// `COMPUTE_VOLUME_TYPE`, or the container env's default when it is unset.
    pub fn volume_type(&self) -> &str {
        if !self.compute_volume_type.is_empty() {
            return &self.compute_volume_type;
        }
        self.allowed_volume_types()
            .ok()
            .and_then(|allowed| allowed.first().copied())
            .unwrap_or("host")
    }

    /// pfcon's fail-fast check of the container env, the volume type and `VOLUME_NAME`.
    fn check_volume_type(&self) -> Result<()> {
        let allowed = self.allowed_volume_types()?;
        let volume_type = self.volume_type();
        if !allowed.contains(&volume_type) {
            return Err(Error::Config(format!(
                "pfcon: COMPUTE_VOLUME_TYPE `{volume_type}` cannot be used with CONTAINER_ENV={}; use {}",
                self.container_env,
                allowed.join(" or ")
            )));
        }
        if volume_type == "kubernetes_pvc" && self.volume_name.trim().is_empty() {
            return Err(Error::Config(
                "pfcon: VOLUME_NAME must name the storeBase PVC when COMPUTE_VOLUME_TYPE is kubernetes_pvc".into(),
            ));
        }
        Ok(())
    }

    /// The settings with the password and key hidden, for `--print-config`.
    pub fn redacted(&self) -> Self {
        let hide = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                "***".into()
            }
        };
        Self {
            password: hide(&self.password),
            secret_key: hide(&self.secret_key),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> PfconConfig {
        PfconConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 5005))),
            user: "pfcon".into(),
            password: "pfcon1234".into(),
            secret_key: "key".into(),
            ..PfconConfig::default()
        }
    }

    #[test]
    fn off_by_default_and_zipfile_when_out_of_network() -> Result<()> {
        assert!(!PfconConfig::default().is_enabled());
        PfconConfig::default().check()?;
        assert_eq!(on().storage()?, StorageEnv::Zipfile);
        for (word, mode) in [
            ("fslink", StorageEnv::Fslink),
            ("filesystem", StorageEnv::Filesystem),
        ] {
            let config = PfconConfig {
                storage_env: word.into(),
                innetwork: true,
                ..on()
            };
            assert_eq!(config.storage()?, mode);
            assert!(mode.requires_copy_job() == (word == "fslink"));
        }
        on().check()
    }

    #[test]
    fn invalid_combinations_fail_fast_naming_the_setting() {
        let cases: [(&str, bool, &str); 6] = [
            ("zipfile", true, "out-of-network"),
            ("fslink", false, "in-network"),
            ("swift", true, "object storage"),
            ("", true, "object storage"),
            ("s3", true, "object storage"),
            ("nfs", false, "is not one of"),
        ];
        for (storage_env, innetwork, says) in cases {
            let config = PfconConfig {
                storage_env: storage_env.into(),
                innetwork,
                ..on()
            };
            let error = config
                .check()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(says), "{storage_env}/{innetwork}: {error}");
        }
        let error = PfconConfig {
            password: String::new(),
            ..on()
        }
        .check()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("PFCON_PASSWORD"), "{error}");
    }

    /// pfcon's TestConfigValidation, case by case.
    #[test]
    fn container_env_and_volume_type_are_checked_together() {
        let with = |container_env: &str, volume_type: &str, volume_name: &str| PfconConfig {
            container_env: container_env.into(),
            compute_volume_type: volume_type.into(),
            volume_name: volume_name.into(),
            ..on()
        };
        let refusal = |config: PfconConfig| {
            config
                .check()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // Kubernetes without VOLUME_NAME: refused, naming it and the volume type.
        let error = refusal(with("kubernetes", "", ""));
        assert!(
            error.contains("VOLUME_NAME") && error.contains("kubernetes_pvc"),
            "{error}"
        );
        // Kubernetes defaults to kubernetes_pvc, and starts with a volume name.
        let config = with("kubernetes", "", "storebase");
        assert_eq!(config.volume_type(), "kubernetes_pvc");
        assert!(config.check().is_ok());
        assert!(
            with("openshift", "kubernetes_pvc", "storebase")
                .check()
                .is_ok()
        );
        // Kubernetes with a host volume, swarm with a PVC: refused, naming both settings.
        for (env, volume) in [("kubernetes", "host"), ("swarm", "kubernetes_pvc")] {
            let error = refusal(with(env, volume, "storebase"));
            assert!(
                error.contains("COMPUTE_VOLUME_TYPE") && error.contains(env),
                "{env}/{volume}: {error}"
            );
        }
        // Docker with host starts, and host is docker's default.
        assert!(with("docker", "host", "").check().is_ok());
        assert_eq!(with("docker", "", "").volume_type(), "host");
        assert!(with("podman", "docker_local_volume", "").check().is_ok());
        let error = refusal(with("mainframe", "", ""));
        assert!(error.contains("CONTAINER_ENV"), "{error}");
    }
}

//! From a checked job spec to what a backend runs: the job's directories in the site
//! store (by pfcon's storage modes), its command, environment, user and labels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dispatch_proto::JobSpec;
use dispatch_proto::job::{Inputs, StorageMode};

use crate::backend::{JobRequest, labels};
use crate::config::ManagerConfig;
use crate::error::{Error, Result};
use crate::user::ContainerUser;

/// Labels the manager adds beyond pfcon's, so a restarted manager knows a job's limits.
pub mod extra_labels {
    /// CPU limit in millicores.
    pub const CPU: &str = "org.chrisproject.dispatch.cpu-millicores";
    /// Memory limit in MiB.
    pub const MEMORY: &str = "org.chrisproject.dispatch.memory-mib";
    /// GPUs.
    pub const GPUS: &str = "org.chrisproject.dispatch.gpus";
}

/// Everything fixed when the manager starts that shapes each job.
#[derive(Debug, Clone)]
pub struct Planner {
    store_root: PathBuf,
    manager_id: String,
    user: ContainerUser,
    home_workaround: bool,
    job_labels: BTreeMap<String, String>,
    default_time_limit: Option<std::time::Duration>,
}

impl Planner {
    /// Reads what it needs from the configuration (checked there).
    pub fn new(config: &ManagerConfig) -> Result<Self> {
        let user = ContainerUser::parse(&config.container_user)
            .map_err(|reason| Error::Server(format!("configuration: {reason}")))?;
        let store_root = std::fs::canonicalize(&config.store_root).map_err(|e| Error::Storage {
            path: config.store_root.display().to_string(),
            reason: format!("the store root must exist: {e}"),
        })?;
        Ok(Self {
            store_root,
            manager_id: config.manager_id.clone(),
            user,
            home_workaround: config.enable_home_workaround,
            job_labels: config.job_labels.clone(),
            default_time_limit: (config.default_time_limit_seconds > 0)
                .then(|| std::time::Duration::from_secs(config.default_time_limit_seconds)),
        })
    }

    /// The site store's root.
    pub fn store_root(&self) -> &Path {
        &self.store_root
    }

    /// The job's `key-<job_id>` area.
    pub fn key_dir(&self, spec_key: &str) -> PathBuf {
        self.store_root.join(spec_key)
    }

    /// Prepares the job's directories and builds its request.
    pub fn plan(&self, spec: &JobSpec) -> Result<JobRequest> {
        let key = self.key_dir(&spec.job_id().storage_key());
        let in_store = |relative: &str| self.store_root.join(relative);
        let (incoming, outgoing) = match spec.storage_mode() {
            StorageMode::Filesystem => {
                let Inputs::Shared(dirs) = spec.inputs() else {
                    return Err(Error::Unsupported {
                        field: "inputs".into(),
                        reason: "filesystem storage needs shared input dirs".into(),
                    });
                };
                let output = spec
                    .output_dir()
                    .map(|d| in_store(d.as_str()))
                    .ok_or_else(|| Error::Unsupported {
                        field: "output_dir".into(),
                        reason: "field is required".into(),
                    })?;
                (dirs.first().map(|d| in_store(d.as_str())), output)
            }
            StorageMode::Fslink => {
                let output = spec
                    .output_dir()
                    .map(|d| in_store(d.as_str()))
                    .ok_or_else(|| Error::Unsupported {
                        field: "output_dir".into(),
                        reason: "field is required".into(),
                    })?;
                (Some(key.join("incoming")), output)
            }
            _ => (Some(key.join("incoming")), key.join("outgoing")),
        };
        if let Some(incoming) = &incoming {
            self.prepare(incoming, spec.storage_mode() != StorageMode::Filesystem)?;
        }
        self.prepare(&outgoing, true)?;
        let user = self.user.pick();
        if let Some(user) = user {
            make_writable_by(&outgoing, user.uid, user.gid)?;
        }

        let mut env: Vec<(String, String)> = spec
            .env()
            .iter()
            .map(|e| (e.name().to_owned(), e.value().to_owned()))
            .collect();
        if self.home_workaround {
            env.push(("HOME".into(), "/tmp".into()));
        }
        let time_limit = spec.time_limit().or(self.default_time_limit);

        // Operator and client labels first, the suite's own last, so none can be forged.
        let mut all_labels = self.job_labels.clone();
        all_labels.extend(
            spec.labels()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        all_labels.insert(labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into());
        all_labels.insert(labels::JOB_ID.into(), spec.job_id().to_string());
        all_labels.insert(labels::JOB_KIND.into(), "plugin".into());
        all_labels.insert(labels::MANAGER_ID.into(), self.manager_id.clone());
        all_labels.insert(extra_labels::CPU.into(), spec.cpu().0.to_string());
        all_labels.insert(extra_labels::MEMORY.into(), spec.memory().0.to_string());
        all_labels.insert(extra_labels::GPUS.into(), spec.gpus().to_string());
        if let Some(limit) = time_limit {
            all_labels.insert(labels::TIME_LIMIT.into(), limit.as_secs().to_string());
        }

        Ok(JobRequest {
            job_id: spec.job_id().clone(),
            image: spec.image().to_owned(),
            command: spec.command(),
            env,
            cpu: spec.cpu(),
            memory: spec.memory(),
            gpus: spec.gpus(),
            workers: spec.workers().get(),
            time_limit,
            incoming,
            outgoing,
            user,
            labels: all_labels,
        })
    }

    /// Creates `dir` (when `create`) and checks it lies inside the store, whatever links
    /// the path crosses.
    fn prepare(&self, dir: &Path, create: bool) -> Result<()> {
        let storage = |reason: String| Error::Storage {
            path: dir.display().to_string(),
            reason,
        };
        if create {
            std::fs::create_dir_all(dir).map_err(|e| storage(format!("cannot create it: {e}")))?;
        }
        let real =
            std::fs::canonicalize(dir).map_err(|e| storage(format!("cannot read it: {e}")))?;
        if !real.starts_with(&self.store_root) {
            return Err(storage(format!(
                "it resolves to {}, outside the store {}",
                real.display(),
                self.store_root.display()
            )));
        }
        Ok(())
    }
}

/// Lets the job's user write its outputs: chown when the manager may (root), else open
/// the directory to all, as pfcon does for object-storage modes.
fn make_writable_by(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::fs::chown(dir, Some(uid), Some(gid)).is_ok() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(|e| {
        Error::Storage {
            path: dir.display().to_string(),
            reason: format!("cannot make it writable for uid {uid}: {e}"),
        }
    })
}

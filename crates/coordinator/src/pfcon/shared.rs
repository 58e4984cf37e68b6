//! The work of pfcon's in-network modes, where CUBE and the hub share storeBase: the
//! fslink copy job, which gathers a job's input dirs into `key-<jid>/incoming` (ChRIS
//! links expanded, files hard-linked where they can be), and the listing of a job's
//! output dir that CUBE registers files from.
//!
//! pfcon runs copies in op containers; here the hub does it with the broker's own input
//! walk, on a blocking thread. Its state is kept beside the data it concerns
//! (`key-<jid>/copy_status.json`, written atomically), so it survives a restart; a copy
//! found `started` with no copy running in this process was cut off, and reads
//! `undefined`, which CUBE treats as failed and pfcon's rules run again.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use dispatch_broker::StorePath;
use dispatch_broker::store::{ExistingPolicy, LocalStore};

/// The file a copy job's state is kept in, inside `key-<jid>`.
const COPY_STATUS_FILE: &str = "copy_status.json";

/// Copies running in this process.
#[derive(Debug, Default)]
pub struct Copies {
    running: Mutex<HashSet<String>>,
}

impl Copies {
    fn set(&self, jid: &str, running: bool) {
        let mut set = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running {
            set.insert(jid.to_owned());
        } else {
            set.remove(jid);
        }
    }

    fn is_running(&self, jid: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(jid)
    }
}

/// A copy job's state, as its job object reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    /// pfcon's status word.
    pub status: String,
    /// What went wrong, if anything.
    pub message: String,
    /// When the state was entered.
    pub timestamp: String,
    /// Files gathered.
    pub nfiles: u64,
}

fn key_dir(storebase: &Path, jid: &str) -> PathBuf {
    storebase.join(format!("key-{jid}"))
}

/// Writes `value` as JSON at `path` atomically (readers see the old or the new file).
fn write_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

fn now() -> String {
    prost_types::Timestamp::from(std::time::SystemTime::now()).to_string()
}

/// The copy job of `jid`, if one was posted (and its data not deleted since).
pub fn copy_status(storebase: &Path, copies: &Copies, jid: &str) -> Option<CopyRecord> {
    let path = key_dir(storebase, jid).join(COPY_STATUS_FILE);
    let bytes = std::fs::read(path).ok()?;
    let mut record: CopyRecord = serde_json::from_slice(&bytes).ok()?;
    if record.status == "started" && !copies.is_running(jid) {
        record.status = "undefined".into();
        record.message = "the copy was cut off (the coordinator restarted); post it again".into();
    }
    Some(record)
}

/// Starts the copy job of `jid`: `input_dirs` gathered into `key-<jid>/incoming`, with
/// `output_dir` guarding against links that lead into the job's own output. Returns
/// the state it started in.
pub fn start_copy(
    storebase: &Path,
    copies: &Arc<Copies>,
    jid: &str,
    input_dirs: Vec<StorePath>,
    output_dir: StorePath,
    storage_env: &str,
) -> io::Result<CopyRecord> {
    let key = key_dir(storebase, jid);
    std::fs::create_dir_all(&key)?;
    write_json(
        &key.join("job_params.json"),
        &serde_json::json!({
            "jid": jid,
            "storage_env": storage_env,
            "input_dirs": input_dirs.iter().map(StorePath::as_str).collect::<Vec<_>>(),
            "output_dir": output_dir.as_str(),
        }),
    )?;
    let started = CopyRecord {
        status: "started".into(),
        message: String::new(),
        timestamp: now(),
        nfiles: 0,
    };
    let status_file = key.join(COPY_STATUS_FILE);
    write_json(&status_file, &started)?;
    copies.set(jid, true);
    let (storebase, copies, jid) = (storebase.to_path_buf(), copies.clone(), jid.to_owned());
    tokio::task::spawn_blocking(move || {
        let outcome = gather(&storebase, &jid, &input_dirs, &output_dir);
        let record = match outcome {
            Ok(nfiles) => CopyRecord {
                status: "finishedSuccessfully".into(),
                message: String::new(),
                timestamp: now(),
                nfiles,
            },
            Err(error) => {
                tracing::warn!(job = %jid, %error, "copy job failed");
                CopyRecord {
                    status: "finishedWithError".into(),
                    message: error.to_string(),
                    timestamp: now(),
                    nfiles: 0,
                }
            }
        };
        if let Err(error) = write_json(&status_file, &record) {
            tracing::error!(job = %jid, %error, "cannot record the end of a copy job");
        }
        copies.set(&jid, false);
    });
    Ok(started)
}

/// The copy itself: the broker's input walk (links expanded) linked into place.
fn gather(
    storebase: &Path,
    jid: &str,
    input_dirs: &[StorePath],
    output_dir: &StorePath,
) -> dispatch_broker::Result<u64> {
    let (walk, counts) =
        dispatch_broker::chrislink::walk_job_inputs_with_counts(storebase, input_dirs, output_dir)?;
    let store = LocalStore::open(storebase)?;
    let destination = StorePath::from_api(&format!("key-{jid}/incoming"))
        .map_err(|e| dispatch_broker::Error::invalid("jid", e.to_string()))?;
    dispatch_broker::stage::link_tree(
        walk,
        &store,
        &format!("pfcon-copy-{jid}"),
        &destination,
        ExistingPolicy::Replace,
        true,
    )?;
    Ok(counts.files())
}

/// The files under `root`, relative to it, symlinks left out; in fslink mode ChRIS link
/// files a plugin wrote are deleted and left out too (pfcon's security fix: a plugin must
/// not make CUBE register links to other users' data).
pub fn list_outputs(root: &Path, delete_links: bool) -> io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            if entry.file_name().to_string_lossy().ends_with(".chrislink") {
                if delete_links {
                    std::fs::remove_file(&path)?;
                }
                continue;
            }
            let relative = path.strip_prefix(root).map_err(io::Error::other)?;
            found.push(relative.to_string_lossy().into_owned());
        }
    }
    found.sort();
    Ok(found)
}

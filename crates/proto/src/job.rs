//! Checked domain types for jobs, made from the wire once, at the door.
//!
//! `JobSpec::try_from(v1::JobSpec)` is the only way to get a [`JobSpec`]: it checks every
//! field, normalises what pfcon normalises (a leading `/` on the job id and on storage
//! paths), and names the offending field in a [`FieldError`]. Code past the door then works
//! with types that cannot hold a bad value: a [`JobId`] is a safe single path component, a
//! [`JobSpec`] always has an entrypoint, limits above zero and a storage mode that fits its
//! inputs.
//!
//! [`JobSpec::command`] builds the container's command exactly as pfcon does
//! (pfcon-api.md §2.6), including its `localize_path_args`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use crate::v1;

/// Where a job's inputs are mounted in its container (read-only).
pub const INCOMING_DIR: &str = "/share/incoming";
/// Where a job writes its outputs in its container (read-write).
pub const OUTGOING_DIR: &str = "/share/outgoing";
/// Longest run time a job may ask for: 30 days.
pub const MAX_TIME_LIMIT_SECONDS: u32 = 30 * 24 * 60 * 60;
/// Lowest and highest `priority`.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;
/// Most labels one job (or one placement selector) may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const LABEL_KEY_MAX_BYTES: usize = 128;
/// Longest label value, in bytes.
pub const LABEL_VALUE_MAX_BYTES: usize = 512;
/// Longest storage-relative path, in bytes (Linux's `PATH_MAX`).
pub const STORAGE_PATH_MAX_BYTES: usize = 4096;
/// Longest image reference, in bytes.
pub const IMAGE_MAX_BYTES: usize = 1024;
/// Longest `auid` or site id, in bytes.
pub const NAME_MAX_BYTES: usize = 256;
/// Largest CPU request accepted, in millicores: 1,000 cores, beyond any one node.
pub const MAX_CPU_MILLICORES: u32 = 1_000_000;
/// Largest memory request accepted, in MiB: 64 TiB, beyond any one node.
pub const MAX_MEMORY_MIB: u64 = 64 << 20;
/// Largest GPU request accepted.
pub const MAX_GPUS: u32 = 64;
/// Largest number of workers accepted.
pub const MAX_WORKERS: u32 = 1024;

/// Why a wire value was refused, naming the field (`env`, `inputs.shared.input_dirs`, ...)
/// so both the gRPC face and the pfcon face can tell the client which one.
///
/// Displayed as `field: reason`, the shape of pfcon's messages (`entrypoint: cannot be
/// empty`). The reason never repeats a value that could be a secret (env values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Dotted path of the field in the request message, without list indices.
    pub field: String,
    /// What is wrong with it, in words for the client.
    pub reason: String,
}

impl FieldError {
    /// A refusal of `field` for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error seen from an enclosing message: `env` becomes `spec.env`.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl From<FieldError> for tonic::Status {
    fn from(error: FieldError) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// A job's id: 1 to 128 ASCII letters, digits, `_`, `.` and `-`, starting with a letter
/// or digit (as CUBE's `chris-jid-<n>`). It is therefore one safe path component, so
/// `key-<id>` can never escape the store root, and every engine can name a container,
/// Slurm job or label after it. A leading `/` is stripped first, as pfcon's `jid.lstrip('/')` does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(String);

impl JobId {
    /// Longest id, in bytes.
    pub const MAX_BYTES: usize = 128;

    /// Checks `raw` (after stripping leading `/`) and wraps it.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let id = raw.trim_start_matches('/');
        let refuse = |reason: String| Err(FieldError::new("job_id", reason));
        if id.is_empty() {
            return refuse("cannot be empty".into());
        }
        if id.len() > Self::MAX_BYTES {
            return refuse(format!(
                "must be at most {} bytes, got {}",
                Self::MAX_BYTES,
                id.len()
            ));
        }
        if id.contains('/') {
            return refuse("must not contain '/'".into());
        }
        // Every engine can name its unit of work after such an id (Docker's container
        // names, Slurm job names, Kubernetes labels), so no backend has to refuse one.
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return refuse(format!(
                "`{id}` contains {bad:?}; use letters, digits, `_`, `.` and `-` only"
            ));
        }
        if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return refuse(format!("`{id}` must start with a letter or a digit"));
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The job's storage area in a store, `key-<id>` (pfcon-api.md §2.12).
    pub fn storage_key(&self) -> String {
        format!("key-{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = FieldError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::parse(raw)
    }
}

impl TryFrom<String> for JobId {
    type Error = FieldError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CPU in thousandths of a core (1000 = one core), as pfcon's `cpu_limit`.
///
/// Zero is a valid amount (a site with no free CPU); a job's request is checked to be
/// above zero at the door instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CpuMillis(pub u32);

impl CpuMillis {
    /// The number of millicores.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Docker's `NanoCpus` for this amount.
    pub const fn nano_cpus(self) -> u64 {
        self.0 as u64 * 1_000_000
    }

    /// Whole cores, rounded up (Slurm's `--cpus-per-task`).
    pub const fn cores_ceil(self) -> u32 {
        self.0.div_ceil(1000)
    }
}

impl fmt::Display for CpuMillis {
    /// Kubernetes quantity form: `1500m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

/// Memory in MiB (2^20 bytes), as pfcon's `memory_limit`. Zero is a valid amount, as for
/// [`CpuMillis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MemoryMib(pub u64);

impl MemoryMib {
    /// The number of MiB.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The amount in bytes, saturating at `u64::MAX` (16 EiB: more than any machine).
    pub const fn bytes(self) -> u64 {
        self.0.saturating_mul(1 << 20)
    }
}

impl fmt::Display for MemoryMib {
    /// Kubernetes quantity form: `512Mi`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}Mi", self.0)
    }
}

/// The kind of ChRIS plugin, which decides the command's positional arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginType {
    /// Feed synthesis (`fs`): gets only the output dir.
    Fs,
    /// Data synthesis (`ds`): gets the input dir, then the output dir.
    Ds,
    /// Topology (`ts`): gets only the output dir, as pfcon calls it.
    Ts,
}

impl PluginType {
    /// pfcon's spelling: `fs`, `ds` or `ts`.
    pub const fn as_pfcon_str(self) -> &'static str {
        match self {
            Self::Fs => "fs",
            Self::Ds => "ds",
            Self::Ts => "ts",
        }
    }
}

impl FromStr for PluginType {
    type Err = FieldError;

    /// Parses pfcon's `type` form field.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "fs" => Ok(Self::Fs),
            "ds" => Ok(Self::Ds),
            "ts" => Ok(Self::Ts),
            _ => Err(FieldError::new("type", "must be one of ds, fs, ts")),
        }
    }
}

impl TryFrom<i32> for PluginType {
    type Error = FieldError;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match v1::PluginType::try_from(value) {
            Ok(v1::PluginType::Fs) => Ok(Self::Fs),
            Ok(v1::PluginType::Ds) => Ok(Self::Ds),
            Ok(v1::PluginType::Ts) => Ok(Self::Ts),
            Ok(v1::PluginType::Unspecified) => {
                Err(FieldError::new("plugin_type", "must be FS, DS or TS"))
            }
            Err(_) => Err(FieldError::new(
                "plugin_type",
                format!("unknown value {value}"),
            )),
        }
    }
}

impl From<PluginType> for v1::PluginType {
    fn from(kind: PluginType) -> Self {
        match kind {
            PluginType::Fs => Self::Fs,
            PluginType::Ds => Self::Ds,
            PluginType::Ts => Self::Ts,
        }
    }
}

/// How the hub's data is reached, as pfcon names the modes (pfcon-api.md §2.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageMode {
    /// Inputs arrive as an archive through the hub; outputs go back the same way.
    Zipfile,
    /// One shared input dir mounted as is; outputs written in place.
    Filesystem,
    /// Shared input dirs staged by link, with `.chrislink` expansion.
    Fslink,
    /// OpenStack Swift object storage.
    Swift,
    /// S3 object storage.
    S3,
}

impl StorageMode {
    /// pfcon's `STORAGE_ENV` spelling.
    pub const fn as_pfcon_str(self) -> &'static str {
        match self {
            Self::Zipfile => "zipfile",
            Self::Filesystem => "filesystem",
            Self::Fslink => "fslink",
            Self::Swift => "swift",
            Self::S3 => "s3",
        }
    }

    /// The wire value for a known mode; `None` for UNSPECIFIED, `Err` for a value this
    /// build does not know.
    fn from_wire(field: &str, value: i32) -> Result<Option<Self>, FieldError> {
        match v1::StorageMode::try_from(value) {
            Ok(v1::StorageMode::Unspecified) => Ok(None),
            Ok(v1::StorageMode::Zipfile) => Ok(Some(Self::Zipfile)),
            Ok(v1::StorageMode::Filesystem) => Ok(Some(Self::Filesystem)),
            Ok(v1::StorageMode::Fslink) => Ok(Some(Self::Fslink)),
            Ok(v1::StorageMode::Swift) => Ok(Some(Self::Swift)),
            Ok(v1::StorageMode::S3) => Ok(Some(Self::S3)),
            Err(_) => Err(FieldError::new(field, format!("unknown value {value}"))),
        }
    }
}

impl From<StorageMode> for v1::StorageMode {
    fn from(mode: StorageMode) -> Self {
        match mode {
            StorageMode::Zipfile => Self::Zipfile,
            StorageMode::Filesystem => Self::Filesystem,
            StorageMode::Fslink => Self::Fslink,
            StorageMode::Swift => Self::Swift,
            StorageMode::S3 => Self::S3,
        }
    }
}

/// The kind of compute a manager drives (`--backend <kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Docker Engine containers.
    Docker,
    /// Docker Swarm services.
    Swarm,
    /// Kubernetes or OpenShift batch/v1 Jobs.
    Kubernetes,
    /// Slurm batch jobs.
    Slurm,
    /// Podman through its Docker-compatible socket.
    Podman,
    /// Plain local processes.
    Local,
}

impl BackendKind {
    /// Every kind, in wire order.
    pub const ALL: [Self; 6] = [
        Self::Docker,
        Self::Swarm,
        Self::Kubernetes,
        Self::Slurm,
        Self::Podman,
        Self::Local,
    ];

    /// The lower-case name used by `--backend` and in config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Swarm => "swarm",
            Self::Kubernetes => "kubernetes",
            Self::Slurm => "slurm",
            Self::Podman => "podman",
            Self::Local => "local",
        }
    }

    /// The wire value for a known kind; `None` for UNSPECIFIED (any kind).
    fn from_wire(field: &str, value: i32) -> Result<Option<Self>, FieldError> {
        match v1::BackendKind::try_from(value) {
            Ok(v1::BackendKind::Unspecified) => Ok(None),
            Ok(v1::BackendKind::Docker) => Ok(Some(Self::Docker)),
            Ok(v1::BackendKind::Swarm) => Ok(Some(Self::Swarm)),
            Ok(v1::BackendKind::Kubernetes) => Ok(Some(Self::Kubernetes)),
            Ok(v1::BackendKind::Slurm) => Ok(Some(Self::Slurm)),
            Ok(v1::BackendKind::Podman) => Ok(Some(Self::Podman)),
            Ok(v1::BackendKind::Local) => Ok(Some(Self::Local)),
            Err(_) => Err(FieldError::new(field, format!("unknown value {value}"))),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = FieldError;

    /// Parses the `--backend` name; `openshift` is Kubernetes, as in pfcon.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if raw == "openshift" {
            return Ok(Self::Kubernetes);
        }
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == raw)
            .ok_or_else(|| {
                FieldError::new(
                    "backend",
                    "must be one of docker, swarm, kubernetes, openshift, slurm, podman, local",
                )
            })
    }
}

impl From<BackendKind> for v1::BackendKind {
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Docker => Self::Docker,
            BackendKind::Swarm => Self::Swarm,
            BackendKind::Kubernetes => Self::Kubernetes,
            BackendKind::Slurm => Self::Slurm,
            BackendKind::Podman => Self::Podman,
            BackendKind::Local => Self::Local,
        }
    }
}

/// One `KEY=VALUE` environment entry, KEY a POSIX name (`[A-Za-z_][A-Za-z0-9_]*`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EnvVar {
    name: String,
    value: String,
}

impl EnvVar {
    /// Splits `entry` at its first `=` and checks both sides. The error never repeats the
    /// entry: env values carry secrets (CUBE sends `CHRIS_USER_TOKEN`).
    pub fn parse(entry: &str) -> Result<Self, FieldError> {
        let refuse = || {
            FieldError::new(
                "env",
                "must be a list of \"key=value\" strings, with key matching [A-Za-z_][A-Za-z0-9_]*",
            )
        };
        let (name, value) = entry.split_once('=').ok_or_else(refuse)?;
        let mut chars = name.chars();
        let starts_well = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(refuse());
        }
        if value.contains('\0') {
            return Err(FieldError::new("env", "values must not contain NUL"));
        }
        Ok(Self {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The variable's value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for EnvVar {
    /// `NAME=VALUE`, the form Docker and Kubernetes take.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

impl fmt::Debug for EnvVar {
    /// Shows the name only: values may be secrets and must not reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvVar({}=<redacted>)", self.name)
    }
}

/// A path relative to a store root (the hub's or a site's): not empty, no `..`
/// component, no control characters, at most 4096 bytes. Leading `/` are stripped first,
/// as pfcon and CUBE treat storage paths as relative whatever they start with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoragePath(String);

impl StoragePath {
    /// Checks `raw` as the value of `field`.
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        let path = raw.trim_start_matches('/');
        let refuse = |reason: String| Err(FieldError::new(field, reason));
        if path.is_empty() {
            return refuse("cannot be empty".into());
        }
        if path.len() > STORAGE_PATH_MAX_BYTES {
            return refuse(format!(
                "must be at most {STORAGE_PATH_MAX_BYTES} bytes, got {}",
                path.len()
            ));
        }
        if path.chars().any(char::is_control) {
            return refuse("must not contain control characters".into());
        }
        if path.split('/').any(|part| part == "..") {
            return refuse("must not contain '..'".into());
        }
        Ok(Self(path.to_owned()))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoragePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checked labels: at most 64; keys of 1 to 128 bytes of `[A-Za-z0-9._/-]` starting and
/// ending with a letter or digit; values up to 512 bytes without control characters.
/// Ordered, so they print and compare the same every time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Checks `map` as the value of `field`.
    pub fn parse(field: &str, map: HashMap<String, String>) -> Result<Self, FieldError> {
        if map.len() > MAX_LABELS {
            return Err(FieldError::new(
                field,
                format!("at most {MAX_LABELS} labels, got {}", map.len()),
            ));
        }
        for (key, value) in &map {
            check_label(key, value).map_err(|reason| FieldError::new(field, reason))?;
        }
        Ok(Self(map.into_iter().collect()))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every label, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when every label of `selector` is here with the same value.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector.iter().all(|(k, v)| self.get(k) == Some(v))
    }

    fn to_wire(&self) -> HashMap<String, String> {
        self.0.clone().into_iter().collect()
    }
}

fn check_label(key: &str, value: &str) -> Result<(), String> {
    let shown = shorten(key);
    if key.is_empty() || key.len() > LABEL_KEY_MAX_BYTES {
        return Err(format!(
            "key {shown} must be 1 to {LABEL_KEY_MAX_BYTES} bytes"
        ));
    }
    let edges_ok = key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key.ends_with(|c: char| c.is_ascii_alphanumeric());
    let chars_ok = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if !edges_ok || !chars_ok {
        return Err(format!(
            "key {shown} must be letters, digits and . _ / -, starting and ending with a letter or digit"
        ));
    }
    if value.len() > LABEL_VALUE_MAX_BYTES {
        return Err(format!(
            "value of {shown} must be at most {LABEL_VALUE_MAX_BYTES} bytes"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "value of {shown} must not contain control characters"
        ));
    }
    Ok(())
}

/// A client-supplied name quoted for an error message: at most 64 characters, control
/// characters escaped, so a hostile value cannot flood or forge a log line.
fn shorten(raw: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut shown: String = raw.chars().take(MAX_CHARS).collect();
    if raw.chars().nth(MAX_CHARS).is_some() {
        shown.push_str("...");
    }
    format!("{shown:?}")
}

/// Checks an optional free-text name (`auid`, a site id): at most 256 bytes, no control
/// characters.
fn check_name(field: &str, raw: &str) -> Result<(), FieldError> {
    if raw.len() > NAME_MAX_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be at most {NAME_MAX_BYTES} bytes, got {}", raw.len()),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks the words of a command-line list: none may hold NUL, which `exec` cannot pass.
fn check_words(field: &str, words: &[String]) -> Result<(), FieldError> {
    match words.iter().position(|w| w.contains('\0')) {
        Some(index) => Err(FieldError::new(
            field,
            format!("item {index} contains a NUL byte"),
        )),
        None => Ok(()),
    }
}

/// Where a job's inputs come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Inputs {
    /// No inputs: `/share/incoming` starts empty.
    #[default]
    None,
    /// A tree the client uploaded to the hub broker.
    Uploaded {
        /// Hub-store-relative directory holding it.
        hub_path: StoragePath,
        /// BLAKE3 tree digest it was committed with, when known.
        tree_digest: Option<[u8; 32]>,
    },
    /// Directories in the hub's shared storage, in order (never empty: an empty list is
    /// [`Inputs::None`]).
    Shared(Vec<StoragePath>),
}

impl Inputs {
    fn from_wire(wire: Option<v1::InputSpec>) -> Result<Self, FieldError> {
        use v1::input_spec::Source;
        match wire.and_then(|spec| spec.source) {
            None => Ok(Self::None),
            Some(Source::Uploaded(uploaded)) => {
                let hub_path = StoragePath::parse("inputs.uploaded.hub_path", &uploaded.hub_path)?;
                let tree_digest = match uploaded.tree_digest.len() {
                    0 => None,
                    _ => Some(
                        <[u8; 32]>::try_from(&uploaded.tree_digest[..]).map_err(|_| {
                            FieldError::new(
                                "inputs.uploaded.tree_digest",
                                format!(
                                    "must be 32 bytes or empty, got {}",
                                    uploaded.tree_digest.len()
                                ),
                            )
                        })?,
                    ),
                };
                Ok(Self::Uploaded {
                    hub_path,
                    tree_digest,
                })
            }
            Some(Source::Shared(shared)) => {
                let dirs = shared
                    .input_dirs
                    .iter()
                    .map(|dir| StoragePath::parse("inputs.shared.input_dirs", dir))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if dirs.is_empty() {
                    Self::None
                } else {
                    Self::Shared(dirs)
                })
            }
        }
    }

    fn to_wire(&self) -> Option<v1::InputSpec> {
        use v1::input_spec::Source;
        let source = match self {
            Self::None => return None,
            Self::Uploaded {
                hub_path,
                tree_digest,
            } => Source::Uploaded(v1::UploadedInputs {
                hub_path: hub_path.as_str().to_owned(),
                tree_digest: tree_digest
                    .map(|d| prost::bytes::Bytes::copy_from_slice(&d))
                    .unwrap_or_default(),
            }),
            Self::Shared(dirs) => Source::Shared(v1::SharedInputs {
                input_dirs: dirs.iter().map(|d| d.as_str().to_owned()).collect(),
            }),
        };
        Some(v1::InputSpec {
            source: Some(source),
        })
    }
}

/// Constraints on which site may run a job. The default allows any site.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    backend_kind: Option<BackendKind>,
    site_labels: Labels,
    site_id: Option<String>,
}

impl Placement {
    /// Only sites of this kind; `None`: any kind.
    pub fn backend_kind(&self) -> Option<BackendKind> {
        self.backend_kind
    }

    /// Labels a site must carry, all of them.
    pub fn site_labels(&self) -> &Labels {
        &self.site_labels
    }

    /// The one site allowed; `None`: any.
    pub fn site_id(&self) -> Option<&str> {
        self.site_id.as_deref()
    }

    /// True when a site of `kind`, id `site_id` and labels `labels` may run the job.
    pub fn admits(&self, kind: BackendKind, site_id: &str, labels: &Labels) -> bool {
        self.backend_kind.is_none_or(|k| k == kind)
            && self.site_id.as_deref().is_none_or(|id| id == site_id)
            && labels.matches(&self.site_labels)
    }

    fn from_wire(wire: Option<v1::Placement>) -> Result<Self, FieldError> {
        let Some(wire) = wire else {
            return Ok(Self::default());
        };
        let backend_kind = BackendKind::from_wire("placement.backend_kind", wire.backend_kind)?;
        let site_labels = Labels::parse("placement.site_labels", wire.site_labels)?;
        check_name("placement.site_id", &wire.site_id)?;
        let site_id = Some(wire.site_id).filter(|id| !id.is_empty());
        Ok(Self {
            backend_kind,
            site_labels,
            site_id,
        })
    }

    fn to_wire(&self) -> Option<v1::Placement> {
        if *self == Self::default() {
            return None;
        }
        Some(v1::Placement {
            backend_kind: self
                .backend_kind
                .map_or(v1::BackendKind::Unspecified, v1::BackendKind::from)
                .into(),
            site_labels: self.site_labels.to_wire(),
            site_id: self.site_id.clone().unwrap_or_default(),
        })
    }
}

/// A checked job spec: what `v1::JobSpec` says, known to be runnable as written.
///
/// Fields are private so that a `JobSpec` can only come from [`TryFrom<v1::JobSpec>`],
/// which checks them together (e.g. the storage mode against the inputs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    job_id: JobId,
    image: String,
    entrypoint: Vec<String>,
    args: Vec<String>,
    args_path_flags: Vec<String>,
    plugin_type: PluginType,
    env: Vec<EnvVar>,
    cpu: CpuMillis,
    memory: MemoryMib,
    gpus: u32,
    workers: NonZeroU32,
    auid: String,
    storage_mode: StorageMode,
    inputs: Inputs,
    output_dir: Option<StoragePath>,
    labels: Labels,
    time_limit: Option<Duration>,
    priority: i32,
    placement: Placement,
}

impl JobSpec {
    /// The job's id.
    pub fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// The OCI image reference.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The program and its leading words; never empty.
    pub fn entrypoint(&self) -> &[String] {
        &self.entrypoint
    }

    /// The plugin's arguments as given (see [`JobSpec::command`] for what runs).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Flags in `args` whose value is replaced by the input dir.
    pub fn args_path_flags(&self) -> &[String] {
        &self.args_path_flags
    }

    /// The kind of plugin.
    pub fn plugin_type(&self) -> PluginType {
        self.plugin_type
    }

    /// The container's environment, in order (a later duplicate wins).
    pub fn env(&self) -> &[EnvVar] {
        &self.env
    }

    /// CPU limit per worker; above zero.
    pub fn cpu(&self) -> CpuMillis {
        self.cpu
    }

    /// Memory limit per worker; above zero.
    pub fn memory(&self) -> MemoryMib {
        self.memory
    }

    /// GPUs per worker.
    pub fn gpus(&self) -> u32 {
        self.gpus
    }

    /// Parallel copies of the container; at least 1.
    pub fn workers(&self) -> NonZeroU32 {
        self.workers
    }

    /// The user the job runs for; may be empty.
    pub fn auid(&self) -> &str {
        &self.auid
    }

    /// How the hub's data is reached (UNSPECIFIED resolved at the door).
    pub fn storage_mode(&self) -> StorageMode {
        self.storage_mode
    }

    /// Where the inputs come from.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    /// The hub directory for the outputs as the client gave it; always set unless the
    /// mode is [`StorageMode::Zipfile`].
    pub fn output_dir(&self) -> Option<&StoragePath> {
        self.output_dir.as_ref()
    }

    /// Where the outputs go at the hub: `output_dir`, else `key-<job_id>/outgoing`.
    pub fn hub_output_path(&self) -> String {
        match &self.output_dir {
            Some(dir) => dir.as_str().to_owned(),
            None => format!("{}/outgoing", self.job_id.storage_key()),
        }
    }

    /// The client's labels.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// Run-time limit; `None`: the site's own.
    pub fn time_limit(&self) -> Option<Duration> {
        self.time_limit
    }

    /// Queue priority, higher first.
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// Where the job may run.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The container's command, built as pfcon builds it: entrypoint, the args with each
    /// path flag's value replaced by `/share/incoming`, `/share/incoming` again for DS
    /// plugins only, and `/share/outgoing` last.
    pub fn command(&self) -> Vec<String> {
        let mut command = self.entrypoint.clone();
        command.extend(localize_path_args(
            &self.args,
            &self.args_path_flags,
            INCOMING_DIR,
        ));
        if self.plugin_type == PluginType::Ds {
            command.push(INCOMING_DIR.to_owned());
        }
        command.push(OUTGOING_DIR.to_owned());
        command
    }
}

/// pfcon's `localize_path_args`: scans `args` left to right; where an arg is one of
/// `path_flags`, emits it, then `input_dir` in place of the value after it (which is
/// skipped). A path flag that ends the list still gets `input_dir` after it, as pfcon's
/// recursion does.
pub fn localize_path_args(
    args: &[impl AsRef<str>],
    path_flags: &[impl AsRef<str>],
    input_dir: &str,
) -> Vec<String> {
    let mut localized = Vec::with_capacity(args.len() + 1);
    let mut rest = args;
    while let Some((arg, tail)) = rest.split_first() {
        let arg = arg.as_ref();
        localized.push(arg.to_owned());
        if path_flags.iter().any(|flag| flag.as_ref() == arg) {
            localized.push(input_dir.to_owned());
            rest = tail.get(1..).unwrap_or_default();
        } else {
            rest = tail;
        }
    }
    localized
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = FieldError;

    /// Checks fields in wire order and stops at the first refusal.
    fn try_from(wire: v1::JobSpec) -> Result<Self, Self::Error> {
        let job_id = JobId::parse(&wire.job_id)?;

        if wire.image.is_empty() {
            return Err(FieldError::new("image", "cannot be empty"));
        }
        if wire.image.len() > IMAGE_MAX_BYTES {
            return Err(FieldError::new(
                "image",
                format!(
                    "must be at most {IMAGE_MAX_BYTES} bytes, got {}",
                    wire.image.len()
                ),
            ));
        }
        if wire
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "image",
                "must not contain whitespace or control characters",
            ));
        }

        match wire.entrypoint.first() {
            None => return Err(FieldError::new("entrypoint", "cannot be empty")),
            Some(program) if program.is_empty() => {
                return Err(FieldError::new(
                    "entrypoint",
                    "the program (first item) cannot be empty",
                ));
            }
            Some(_) => {}
        }
        check_words("entrypoint", &wire.entrypoint)?;
        check_words("args", &wire.args)?;
        check_words("args_path_flags", &wire.args_path_flags)?;
        if let Some(index) = wire.args_path_flags.iter().position(String::is_empty) {
            return Err(FieldError::new(
                "args_path_flags",
                format!("item {index} is empty"),
            ));
        }

        let plugin_type = PluginType::try_from(wire.plugin_type)?;

        let env = wire
            .env
            .iter()
            .map(|entry| EnvVar::parse(entry))
            .collect::<Result<Vec<_>, _>>()?;

        if wire.cpu_millicores == 0 {
            return Err(FieldError::new("cpu_millicores", "must be greater than 0"));
        }
        if wire.cpu_millicores > MAX_CPU_MILLICORES {
            return Err(FieldError::new(
                "cpu_millicores",
                format!(
                    "{} is beyond any node; at most {MAX_CPU_MILLICORES} (1000 = one core)",
                    wire.cpu_millicores
                ),
            ));
        }
        if wire.memory_mib == 0 {
            return Err(FieldError::new("memory_mib", "must be greater than 0"));
        }
        if wire.memory_mib > MAX_MEMORY_MIB {
            return Err(FieldError::new(
                "memory_mib",
                format!(
                    "{} MiB is beyond any node; at most {MAX_MEMORY_MIB} MiB",
                    wire.memory_mib
                ),
            ));
        }
        if wire.gpus > MAX_GPUS {
            return Err(FieldError::new(
                "gpus",
                format!("{} is beyond any node; at most {MAX_GPUS}", wire.gpus),
            ));
        }
        if wire.workers > MAX_WORKERS {
            return Err(FieldError::new(
                "workers",
                format!("at most {MAX_WORKERS}, got {}", wire.workers),
            ));
        }
        let workers = NonZeroU32::new(wire.workers)
            .ok_or_else(|| FieldError::new("workers", "must be at least 1"))?;
        check_name("auid", &wire.auid)?;

        let inputs = Inputs::from_wire(wire.inputs)?;
        let storage_mode = match (
            StorageMode::from_wire("storage_mode", wire.storage_mode)?,
            &inputs,
        ) {
            (Some(mode), _) => mode,
            (None, Inputs::Shared(_)) => {
                return Err(FieldError::new(
                    "storage_mode",
                    "must be set when the inputs are shared input_dirs",
                ));
            }
            (None, _) => StorageMode::Zipfile,
        };
        match (storage_mode, &inputs) {
            (StorageMode::Zipfile, Inputs::Shared(_)) => {
                return Err(FieldError::new(
                    "inputs.shared.input_dirs",
                    "need a shared storage mode (filesystem, fslink, swift or s3), not zipfile",
                ));
            }
            (StorageMode::Filesystem, Inputs::Shared(dirs)) if dirs.len() > 1 => {
                return Err(FieldError::new(
                    "inputs.shared.input_dirs",
                    format!(
                        "filesystem storage mounts one input dir, got {}",
                        dirs.len()
                    ),
                ));
            }
            (mode, Inputs::Uploaded { .. }) if mode != StorageMode::Zipfile => {
                return Err(FieldError::new(
                    "inputs.uploaded",
                    format!(
                        "an uploaded archive needs storage mode zipfile, not {}",
                        mode.as_pfcon_str()
                    ),
                ));
            }
            _ => {}
        }

        let output_dir = if wire.output_dir.is_empty() {
            if storage_mode != StorageMode::Zipfile {
                // pfcon's own words for the in-network case.
                return Err(FieldError::new("output_dir", "field is required"));
            }
            None
        } else {
            Some(StoragePath::parse("output_dir", &wire.output_dir)?)
        };

        let labels = Labels::parse("labels", wire.labels)?;

        let time_limit = match wire.time_limit_seconds {
            0 => None,
            seconds if seconds > MAX_TIME_LIMIT_SECONDS => {
                return Err(FieldError::new(
                    "time_limit_seconds",
                    format!("must be at most {MAX_TIME_LIMIT_SECONDS} (30 days), got {seconds}"),
                ));
            }
            seconds => Some(Duration::from_secs(u64::from(seconds))),
        };

        if !PRIORITY_RANGE.contains(&wire.priority) {
            return Err(FieldError::new(
                "priority",
                format!(
                    "must be between {} and {}, got {}",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end(),
                    wire.priority
                ),
            ));
        }

        let placement = Placement::from_wire(wire.placement)?;

        Ok(Self {
            job_id,
            image: wire.image,
            entrypoint: wire.entrypoint,
            args: wire.args,
            args_path_flags: wire.args_path_flags,
            plugin_type,
            env,
            cpu: CpuMillis(wire.cpu_millicores),
            memory: MemoryMib(wire.memory_mib),
            gpus: wire.gpus,
            workers,
            auid: wire.auid,
            storage_mode,
            inputs,
            output_dir,
            labels,
            time_limit,
            priority: wire.priority,
            placement,
        })
    }
}

impl From<&JobSpec> for v1::JobSpec {
    /// The normalised spec on the wire (what the coordinator stores and sends to sites);
    /// reading it back gives an equal [`JobSpec`].
    fn from(spec: &JobSpec) -> Self {
        Self {
            job_id: spec.job_id.as_str().to_owned(),
            image: spec.image.clone(),
            entrypoint: spec.entrypoint.clone(),
            args: spec.args.clone(),
            args_path_flags: spec.args_path_flags.clone(),
            plugin_type: v1::PluginType::from(spec.plugin_type).into(),
            env: spec.env.iter().map(ToString::to_string).collect(),
            cpu_millicores: spec.cpu.get(),
            memory_mib: spec.memory.get(),
            gpus: spec.gpus,
            workers: spec.workers.get(),
            auid: spec.auid.clone(),
            storage_mode: v1::StorageMode::from(spec.storage_mode).into(),
            inputs: spec.inputs.to_wire(),
            output_dir: spec
                .output_dir
                .as_ref()
                .map(|dir| dir.as_str().to_owned())
                .unwrap_or_default(),
            labels: spec.labels.to_wire(),
            time_limit_seconds: spec.time_limit.map_or(0, |limit| {
                u32::try_from(limit.as_secs()).unwrap_or(u32::MAX)
            }),
            priority: spec.priority,
            placement: spec.placement.to_wire(),
        }
    }
}

impl From<JobSpec> for v1::JobSpec {
    fn from(spec: JobSpec) -> Self {
        Self::from(&spec)
    }
}

impl v1::JobSpec {
    /// Blanks every env value (`KEY=VALUE` becomes `KEY=`), as `Job.spec` is sent back
    /// to clients: values may be secrets (CUBE's `CHRIS_USER_TOKEN`). An entry without
    /// `=` is dropped whole.
    pub fn redact_env(&mut self) {
        self.env.retain(|entry| entry.contains('='));
        for entry in &mut self.env {
            if let Some(eq) = entry.find('=') {
                entry.truncate(eq + 1);
            }
        }
    }
}

impl v1::JobState {
    /// True for SUCCEEDED, FAILED, CANCELLED and LOST: states a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Lost
        )
    }

    /// The state in pfcon's words (pfcon-api.md §2.4). Staging counts as not started
    /// (in) and started (out): CUBE fetches outputs on a finished status, so a job is
    /// reported finished only once its outputs are at the hub. CANCELLED is
    /// `finishedWithError` (pfcon has no cancel; CUBE reads it as a failed run) and LOST is
    /// `undefined`, which CUBE treats as an error.
    pub fn pfcon_status(self) -> v1::PfconStatus {
        match self {
            Self::Queued | Self::StagingIn => v1::PfconStatus::NotStarted,
            Self::Running | Self::StagingOut => v1::PfconStatus::Started,
            Self::Succeeded => v1::PfconStatus::FinishedSuccessfully,
            Self::Failed | Self::Cancelled => v1::PfconStatus::FinishedWithError,
            Self::Lost | Self::Unspecified => v1::PfconStatus::Undefined,
        }
    }
}

impl v1::PfconStatus {
    /// pfcon's era C spelling, as the REST face writes it: `notStarted`, `started`,
    /// `finishedSuccessfully`, `finishedWithError`, `undefined` (also for UNSPECIFIED).
    pub fn as_pfcon_str(self) -> &'static str {
        match self {
            Self::NotStarted => "notStarted",
            Self::Started => "started",
            Self::FinishedSuccessfully => "finishedSuccessfully",
            Self::FinishedWithError => "finishedWithError",
            Self::Undefined | Self::Unspecified => "undefined",
        }
    }

    /// True for the statuses after which pfcon's clients stop polling.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::FinishedSuccessfully | Self::FinishedWithError | Self::Undefined
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A spec that passes every check; tests change one field at a time.
    fn valid() -> v1::JobSpec {
        v1::JobSpec {
            job_id: "chris-jid-42".into(),
            image: "ghcr.io/fnndsc/pl-dircopy:2.1.1".into(),
            entrypoint: vec!["python3".into(), "/usr/local/bin/dircopy".into()],
            args: vec![
                "--dir".into(),
                "home/bob/uploads".into(),
                "--verbose".into(),
            ],
            args_path_flags: vec!["--dir".into()],
            plugin_type: v1::PluginType::Ds.into(),
            env: vec!["CHRIS_JID=chris-jid-42".into(), "EMPTY=".into()],
            cpu_millicores: 1000,
            memory_mib: 300,
            gpus: 0,
            workers: 1,
            auid: "bob".into(),
            storage_mode: v1::StorageMode::Unspecified.into(),
            inputs: None,
            output_dir: String::new(),
            labels: HashMap::from([("feed".into(), "7".into())]),
            time_limit_seconds: 3600,
            priority: 0,
            placement: None,
        }
    }

    fn refused(change: impl FnOnce(&mut v1::JobSpec)) -> FieldError {
        let mut wire = valid();
        change(&mut wire);
        match JobSpec::try_from(wire) {
            Ok(spec) => panic!("accepted {spec:?}"),
            Err(error) => error,
        }
    }

    fn assert_refused(field: &str, reason_part: &str, change: impl FnOnce(&mut v1::JobSpec)) {
        let error = refused(change);
        assert_eq!(error.field, field, "{error}");
        assert!(
            error.reason.contains(reason_part),
            "{error:?} does not say {reason_part:?}"
        );
    }

    fn shared(dirs: &[&str]) -> Option<v1::InputSpec> {
        Some(v1::InputSpec {
            source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
                input_dirs: dirs.iter().map(|d| (*d).to_owned()).collect(),
            })),
        })
    }

    fn uploaded(path: &str, digest: Vec<u8>) -> Option<v1::InputSpec> {
        Some(v1::InputSpec {
            source: Some(v1::input_spec::Source::Uploaded(v1::UploadedInputs {
                hub_path: path.into(),
                tree_digest: digest.into(),
            })),
        })
    }

    // pfcon's test_cmd.py::test_localize_path_args, case by case.

    #[test]
    fn localize_empty() {
        let none: [&str; 0] = [];
        assert_eq!(
            localize_path_args(&none, &none, INCOMING_DIR),
            Vec::<String>::new()
        );
    }

    #[test]
    fn localize_bool_flag() {
        let none: [&str; 0] = [];
        assert_eq!(
            localize_path_args(&["--boolFlag"], &none, INCOMING_DIR),
            ["--boolFlag"]
        );
    }

    #[test]
    fn localize_non_path_flag() {
        let none: [&str; 0] = [];
        assert_eq!(
            localize_path_args(&["--something", "3"], &none, INCOMING_DIR),
            ["--something", "3"]
        );
    }

    #[test]
    fn localize_path_flag() {
        assert_eq!(
            localize_path_args(
                &["--something", "user/uploads/wow.txt"],
                &["--something"],
                INCOMING_DIR
            ),
            ["--something", "/share/incoming"]
        );
    }

    #[test]
    fn localize_mixed() {
        assert_eq!(
            localize_path_args(
                &[
                    "--boolFlag",
                    "--something",
                    "user/uploads/wow.txt",
                    "--foo",
                    "bar"
                ],
                &["--something"],
                INCOMING_DIR
            ),
            [
                "--boolFlag",
                "--something",
                "/share/incoming",
                "--foo",
                "bar"
            ]
        );
    }

    #[test]
    fn localize_two_path_flags() {
        assert_eq!(
            localize_path_args(
                &["-foo", "3", "-bar", "4", "-bam", "5"],
                &["-foo", "-bar"],
                INCOMING_DIR
            ),
            [
                "-foo",
                "/share/incoming",
                "-bar",
                "/share/incoming",
                "-bam",
                "5"
            ]
        );
    }

    #[test]
    fn localize_trailing_path_flag_gets_input_dir_like_pfcon() {
        // pfcon: [args[0], input_dir] + localize(args[2:]) with args[2:] == [].
        assert_eq!(
            localize_path_args(&["-v", "--dir"], &["--dir"], INCOMING_DIR),
            ["-v", "--dir", "/share/incoming"]
        );
    }

    #[test]
    fn localize_skipped_value_is_not_read_as_a_flag() {
        assert_eq!(
            localize_path_args(&["--dir", "--dir", "x"], &["--dir"], INCOMING_DIR),
            ["--dir", "/share/incoming", "x"]
        );
    }

    #[test]
    fn command_for_each_plugin_type() {
        let spec = JobSpec::try_from(valid()).expect("valid");
        assert_eq!(
            spec.command(),
            [
                "python3",
                "/usr/local/bin/dircopy",
                "--dir",
                "/share/incoming",
                "--verbose",
                "/share/incoming",
                "/share/outgoing"
            ]
        );
        for kind in [v1::PluginType::Fs, v1::PluginType::Ts] {
            let mut wire = valid();
            wire.plugin_type = kind.into();
            let spec = JobSpec::try_from(wire).expect("valid");
            assert_eq!(
                spec.command(),
                [
                    "python3",
                    "/usr/local/bin/dircopy",
                    "--dir",
                    "/share/incoming",
                    "--verbose",
                    "/share/outgoing"
                ],
                "{kind:?}"
            );
        }
    }

    #[test]
    fn valid_spec_is_accepted_and_resolved() {
        let spec = JobSpec::try_from(valid()).expect("valid");
        assert_eq!(spec.job_id().as_str(), "chris-jid-42");
        assert_eq!(spec.storage_mode(), StorageMode::Zipfile);
        assert_eq!(spec.inputs(), &Inputs::None);
        assert_eq!(spec.hub_output_path(), "key-chris-jid-42/outgoing");
        assert_eq!(spec.time_limit(), Some(Duration::from_secs(3600)));
        assert_eq!(spec.env()[1].name(), "EMPTY");
        assert_eq!(spec.env()[1].value(), "");
        assert_eq!(spec.labels().get("feed"), Some("7"));
    }

    #[test]
    fn round_trips_through_the_wire() {
        let mut wire = valid();
        wire.job_id = "/chris-jid-9".into();
        wire.storage_mode = v1::StorageMode::Fslink.into();
        wire.inputs = shared(&["/home/bob/uploads", "home/bob/feeds/feed_1"]);
        wire.output_dir = "/home/bob/feeds/feed_2/pl-x_2/data".into();
        wire.placement = Some(v1::Placement {
            backend_kind: v1::BackendKind::Slurm.into(),
            site_labels: HashMap::from([("region".into(), "eu".into())]),
            site_id: "site-1".into(),
        });
        let spec = JobSpec::try_from(wire).expect("valid");
        assert_eq!(spec.job_id().as_str(), "chris-jid-9");
        assert_eq!(
            spec.output_dir().map(StoragePath::as_str),
            Some("home/bob/feeds/feed_2/pl-x_2/data")
        );
        let again = JobSpec::try_from(v1::JobSpec::from(&spec)).expect("still valid");
        assert_eq!(again, spec);

        let mut wire = valid();
        wire.inputs = uploaded("uploads/u-1", vec![7; 32]);
        let spec = JobSpec::try_from(wire).expect("valid");
        assert_eq!(
            spec.inputs(),
            &Inputs::Uploaded {
                hub_path: StoragePath::parse("x", "uploads/u-1").expect("path"),
                tree_digest: Some([7; 32])
            }
        );
        let again = JobSpec::try_from(v1::JobSpec::from(spec.clone())).expect("still valid");
        assert_eq!(again, spec);
    }

    #[test]
    fn job_id_rules() {
        assert_eq!(
            JobId::parse("//chris-jid-1").expect("valid").as_str(),
            "chris-jid-1"
        );
        assert_eq!(
            JobId::parse("chris-jid-1").expect("valid").storage_key(),
            "key-chris-jid-1"
        );
        assert!(JobId::parse(&"a".repeat(JobId::MAX_BYTES)).is_ok());
        for (raw, reason) in [
            ("", "cannot be empty"),
            ("/", "cannot be empty"),
            ("a/b", "'/'"),
            ("a\0b", "contains"),
            ("a\nb", "contains"),
            ("a b", "contains ' '"),
            ("ü", "contains"),
            (".hidden", "start with a letter"),
            ("/..", "start with a letter"),
            ("-x", "start with a letter"),
        ] {
            let error = JobId::parse(raw).expect_err(raw);
            assert_eq!(error.field, "job_id");
            assert!(error.reason.contains(reason), "{raw:?}: {error}");
        }
        let long = "a".repeat(JobId::MAX_BYTES + 1);
        assert!(JobId::parse(&long).is_err());
    }

    #[test]
    fn refuses_bad_job_id() {
        assert_refused("job_id", "cannot be empty", |w| w.job_id.clear());
        assert_refused("job_id", "'/'", |w| w.job_id = "a/b".into());
    }

    #[test]
    fn refuses_bad_image() {
        assert_refused("image", "cannot be empty", |w| w.image.clear());
        assert_refused("image", "whitespace", |w| w.image = "busybox latest".into());
        assert_refused("image", "at most", |w| w.image = "a".repeat(2000));
    }

    #[test]
    fn refuses_bad_entrypoint_and_args() {
        let error = refused(|w| w.entrypoint.clear());
        assert_eq!(error.to_string(), "entrypoint: cannot be empty");
        assert_refused("entrypoint", "program", |w| {
            w.entrypoint = vec![String::new()]
        });
        assert_refused("entrypoint", "item 2 contains a NUL", |w| {
            w.entrypoint.push("a\0".into());
        });
        assert_refused("args", "item 0 contains a NUL", |w| {
            w.args = vec!["\0".into()]
        });
        assert_refused("args_path_flags", "NUL", |w| {
            w.args_path_flags = vec!["--x\0".into()];
        });
        assert_refused("args_path_flags", "item 1 is empty", |w| {
            w.args_path_flags.push(String::new());
        });
    }

    #[test]
    fn refuses_bad_plugin_type() {
        assert_refused("plugin_type", "FS, DS or TS", |w| {
            w.plugin_type = v1::PluginType::Unspecified.into();
        });
        assert_refused("plugin_type", "unknown value 99", |w| w.plugin_type = 99);
    }

    #[test]
    fn refuses_bad_env_without_echoing_it() {
        for entry in ["NOEQUALS", "=secret", "1ABC=x", "A-B=x", "A B=x", " A=x"] {
            let error = refused(|w| w.env.push(entry.into()));
            assert_eq!(error.field, "env", "{entry:?}");
            assert!(error.reason.contains("key=value"), "{error}");
            assert!(
                !error.to_string().contains(entry),
                "{error} echoes {entry:?}"
            );
        }
        assert_refused("env", "NUL", |w| w.env.push("SECRET=a\0b".into()));
        // The value is everything after the first '='.
        let mut wire = valid();
        wire.env = vec!["A_1==b=c".into()];
        let spec = JobSpec::try_from(wire).expect("valid");
        assert_eq!(spec.env()[0].value(), "=b=c");
        assert!(!format!("{:?}", spec.env()[0]).contains("=b=c"));
    }

    #[test]
    fn refuses_zero_limits() {
        assert_refused("cpu_millicores", "greater than 0", |w| w.cpu_millicores = 0);
        assert_refused("memory_mib", "greater than 0", |w| w.memory_mib = 0);
        assert_refused("workers", "at least 1", |w| w.workers = 0);
        assert_refused("cpu_millicores", "beyond any node", |w| {
            w.cpu_millicores = 1_000_000_000
        });
        assert_refused("memory_mib", "beyond any node", |w| w.memory_mib = 1 << 40);
        assert_refused("gpus", "beyond any node", |w| w.gpus = 1000);
    }

    #[test]
    fn refuses_bad_auid() {
        assert_refused("auid", "control", |w| w.auid = "bob\r\nforged".into());
        assert_refused("auid", "at most", |w| w.auid = "b".repeat(300));
    }

    #[test]
    fn refuses_storage_and_input_mismatches() {
        assert_refused("storage_mode", "unknown value 42", |w| w.storage_mode = 42);
        assert_refused("storage_mode", "must be set", |w| {
            w.inputs = shared(&["home/bob"]);
        });
        assert_refused("inputs.shared.input_dirs", "zipfile", |w| {
            w.storage_mode = v1::StorageMode::Zipfile.into();
            w.inputs = shared(&["home/bob"]);
        });
        assert_refused("inputs.shared.input_dirs", "one input dir", |w| {
            w.storage_mode = v1::StorageMode::Filesystem.into();
            w.output_dir = "out".into();
            w.inputs = shared(&["a", "b"]);
        });
        assert_refused("inputs.uploaded", "zipfile", |w| {
            w.storage_mode = v1::StorageMode::Fslink.into();
            w.output_dir = "out".into();
            w.inputs = uploaded("uploads/u", vec![]);
        });
        assert_refused("inputs.shared.input_dirs", "'..'", |w| {
            w.storage_mode = v1::StorageMode::Fslink.into();
            w.output_dir = "out".into();
            w.inputs = shared(&["home/../etc"]);
        });
        assert_refused("inputs.shared.input_dirs", "cannot be empty", |w| {
            w.storage_mode = v1::StorageMode::Fslink.into();
            w.output_dir = "out".into();
            w.inputs = shared(&["/"]);
        });
        assert_refused("inputs.uploaded.hub_path", "cannot be empty", |w| {
            w.inputs = uploaded("", vec![]);
        });
        assert_refused("inputs.uploaded.tree_digest", "32 bytes", |w| {
            w.inputs = uploaded("uploads/u", vec![1, 2, 3]);
        });
        // An empty shared list is no inputs at all, so zipfile is fine.
        let mut wire = valid();
        wire.inputs = shared(&[]);
        assert_eq!(
            JobSpec::try_from(wire).expect("valid").inputs(),
            &Inputs::None
        );
    }

    #[test]
    fn refuses_bad_output_dir() {
        let error = refused(|w| {
            w.storage_mode = v1::StorageMode::Filesystem.into();
            w.inputs = shared(&["home/bob"]);
        });
        assert_eq!(error.to_string(), "output_dir: field is required");
        assert_refused("output_dir", "'..'", |w| w.output_dir = "a/../../b".into());
        assert_refused("output_dir", "control", |w| w.output_dir = "a\0b".into());
    }

    #[test]
    fn refuses_bad_labels() {
        assert_refused("labels", "1 to 128", |w| {
            w.labels.insert(String::new(), "v".into());
        });
        assert_refused("labels", "starting and ending", |w| {
            w.labels.insert("-bad".into(), "v".into());
        });
        assert_refused("labels", "starting and ending", |w| {
            w.labels.insert("a b".into(), "v".into());
        });
        assert_refused("labels", "at most 512", |w| {
            w.labels.insert("k".into(), "v".repeat(513));
        });
        assert_refused("labels", "control", |w| {
            w.labels.insert("k".into(), "a\nb".into());
        });
        assert_refused("labels", "at most 64 labels", |w| {
            w.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        });
        let mut wire = valid();
        wire.labels
            .insert("org.chrisproject/feed-id_2".into(), String::new());
        assert!(JobSpec::try_from(wire).is_ok());
    }

    #[test]
    fn refuses_bad_time_limit_and_priority() {
        assert_refused("time_limit_seconds", "30 days", |w| {
            w.time_limit_seconds = MAX_TIME_LIMIT_SECONDS + 1;
        });
        let mut wire = valid();
        wire.time_limit_seconds = 0;
        assert_eq!(JobSpec::try_from(wire).expect("valid").time_limit(), None);
        assert_refused("priority", "between -1000 and 1000", |w| w.priority = 1001);
        assert_refused("priority", "between -1000 and 1000", |w| w.priority = -1001);
    }

    #[test]
    fn refuses_bad_placement() {
        let placement = |kind: i32, labels: &[(&str, &str)], site: &str| {
            Some(v1::Placement {
                backend_kind: kind,
                site_labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                site_id: site.into(),
            })
        };
        assert_refused("placement.backend_kind", "unknown value 77", |w| {
            w.placement = placement(77, &[], "");
        });
        assert_refused("placement.site_labels", "key", |w| {
            w.placement = placement(0, &[("bad key", "v")], "");
        });
        assert_refused("placement.site_id", "control", |w| {
            w.placement = placement(0, &[], "a\tb");
        });
        let mut wire = valid();
        wire.placement = placement(v1::BackendKind::Kubernetes.into(), &[("gpu", "a100")], "");
        let spec = JobSpec::try_from(wire).expect("valid");
        let site_labels = Labels::parse(
            "x",
            HashMap::from([
                ("gpu".to_owned(), "a100".to_owned()),
                ("region".to_owned(), "eu".to_owned()),
            ]),
        )
        .expect("labels");
        assert!(
            spec.placement()
                .admits(BackendKind::Kubernetes, "s1", &site_labels)
        );
        assert!(
            !spec
                .placement()
                .admits(BackendKind::Slurm, "s1", &site_labels)
        );
        assert!(
            !spec
                .placement()
                .admits(BackendKind::Kubernetes, "s1", &Labels::default())
        );
        // No placement admits anything.
        let spec = JobSpec::try_from(valid()).expect("valid");
        assert!(
            spec.placement()
                .admits(BackendKind::Local, "s", &Labels::default())
        );
    }

    #[test]
    fn redact_env_keeps_names_only() {
        let mut wire = valid();
        wire.env = vec![
            "CHRIS_USER_TOKEN=s3cret=x".into(),
            "EMPTY=".into(),
            "junk".into(),
        ];
        wire.redact_env();
        assert_eq!(wire.env, ["CHRIS_USER_TOKEN=", "EMPTY="]);
        assert!(JobSpec::try_from(wire).is_ok());
    }

    #[test]
    fn field_error_nests_and_becomes_invalid_argument() {
        let error = FieldError::new("env", "bad").within("spec");
        assert_eq!(error.to_string(), "spec.env: bad");
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "spec.env: bad");
    }

    #[test]
    fn job_state_maps_to_pfcon_status() {
        use v1::{JobState as S, PfconStatus as P};
        let expected = [
            (S::Unspecified, P::Undefined, "undefined", false),
            (S::Queued, P::NotStarted, "notStarted", false),
            (S::StagingIn, P::NotStarted, "notStarted", false),
            (S::Running, P::Started, "started", false),
            (S::StagingOut, P::Started, "started", false),
            (
                S::Succeeded,
                P::FinishedSuccessfully,
                "finishedSuccessfully",
                true,
            ),
            (S::Failed, P::FinishedWithError, "finishedWithError", true),
            (
                S::Cancelled,
                P::FinishedWithError,
                "finishedWithError",
                true,
            ),
            (S::Lost, P::Undefined, "undefined", true),
        ];
        for (state, status, word, terminal) in expected {
            assert_eq!(state.pfcon_status(), status, "{state:?}");
            assert_eq!(status.as_pfcon_str(), word, "{state:?}");
            assert_eq!(state.is_terminal(), terminal, "{state:?}");
            // A terminal state always looks terminal to pfcon clients, and vice versa
            // for every state a stored job can be in.
            if state != S::Unspecified {
                assert_eq!(status.is_terminal(), terminal, "{state:?}");
            }
        }
        assert_eq!(P::Unspecified.as_pfcon_str(), "undefined");
    }

    #[test]
    fn names_parse_and_print() {
        assert_eq!("ds".parse::<PluginType>().expect("ds"), PluginType::Ds);
        assert_eq!(PluginType::Ts.as_pfcon_str(), "ts");
        assert_eq!("DS".parse::<PluginType>().expect_err("DS").field, "type");
        for kind in BackendKind::ALL {
            assert_eq!(kind.as_str().parse::<BackendKind>().expect("kind"), kind);
        }
        assert_eq!(
            "openshift".parse::<BackendKind>().expect("openshift"),
            BackendKind::Kubernetes
        );
        assert!("cromwell".parse::<BackendKind>().is_err());
        assert_eq!(CpuMillis(1500).to_string(), "1500m");
        assert_eq!(CpuMillis(1500).nano_cpus(), 1_500_000_000);
        assert_eq!(CpuMillis(1500).cores_ceil(), 2);
        assert_eq!(MemoryMib(300).to_string(), "300Mi");
        assert_eq!(MemoryMib(2).bytes(), 2 * 1024 * 1024);
        assert_eq!(MemoryMib(u64::MAX).bytes(), u64::MAX);
    }

    /// Text that is sometimes hostile, sometimes plausible, sometimes empty.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9_./=-]{0,12}",
            Just(String::new()),
            Just("..".to_owned()),
        ]
    }

    fn words() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(text(), 0..5)
    }

    fn label_map() -> impl Strategy<Value = HashMap<String, String>> {
        prop::collection::hash_map(text(), text(), 0..4)
    }

    fn small_enum() -> impl Strategy<Value = i32> {
        prop_oneof![0..8i32, any::<i32>()]
    }

    fn inputs() -> impl Strategy<Value = Option<v1::InputSpec>> {
        use v1::input_spec::Source;
        prop_oneof![
            Just(None),
            Just(Some(v1::InputSpec { source: None })),
            (text(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(hub_path, digest)| {
                Some(v1::InputSpec {
                    source: Some(Source::Uploaded(v1::UploadedInputs {
                        hub_path,
                        tree_digest: digest.into(),
                    })),
                })
            }),
            words().prop_map(|input_dirs| Some(v1::InputSpec {
                source: Some(Source::Shared(v1::SharedInputs { input_dirs })),
            })),
        ]
    }

    fn wire_spec() -> impl Strategy<Value = v1::JobSpec> {
        let identity = (
            text(),
            text(),
            words(),
            words(),
            words(),
            small_enum(),
            words(),
        );
        let limits = (
            prop_oneof![Just(1000u32), any::<u32>()],
            prop_oneof![Just(300u64), any::<u64>()],
            any::<u32>(),
            prop_oneof![Just(1u32), any::<u32>()],
            text(),
        );
        let data = (small_enum(), inputs(), text(), label_map());
        let rest = (
            prop_oneof![Just(0u32), any::<u32>()],
            prop_oneof![Just(0i32), any::<i32>()],
            prop::option::of((small_enum(), label_map(), text())),
        );
        (identity, limits, data, rest).prop_map(
            |(
                (job_id, image, entrypoint, args, args_path_flags, plugin_type, env),
                (cpu_millicores, memory_mib, gpus, workers, auid),
                (storage_mode, inputs, output_dir, labels),
                (time_limit_seconds, priority, placement),
            )| v1::JobSpec {
                job_id,
                image,
                entrypoint,
                args,
                args_path_flags,
                plugin_type,
                env,
                cpu_millicores,
                memory_mib,
                gpus,
                workers,
                auid,
                storage_mode,
                inputs,
                output_dir,
                labels,
                time_limit_seconds,
                priority,
                placement: placement.map(|(backend_kind, site_labels, site_id)| v1::Placement {
                    backend_kind,
                    site_labels,
                    site_id,
                }),
            },
        )
    }

    /// A valid spec with one field set to arbitrary text, and the field name a refusal
    /// must carry.
    fn one_field_changed() -> impl Strategy<Value = (v1::JobSpec, &'static str)> {
        (0..12usize, text()).prop_map(|(which, value)| {
            let mut wire = valid();
            let field = match which {
                0 => {
                    wire.job_id = value;
                    "job_id"
                }
                1 => {
                    wire.image = value;
                    "image"
                }
                2 => {
                    wire.entrypoint[0] = value;
                    "entrypoint"
                }
                3 => {
                    wire.args.push(value);
                    "args"
                }
                4 => {
                    wire.args_path_flags.push(value);
                    "args_path_flags"
                }
                5 => {
                    wire.env.push(value);
                    "env"
                }
                6 => {
                    wire.auid = value;
                    "auid"
                }
                7 => {
                    wire.output_dir = value;
                    "output_dir"
                }
                8 => {
                    wire.labels.insert(value, "v".into());
                    "labels"
                }
                9 => {
                    wire.labels.insert("k".into(), value);
                    "labels"
                }
                10 => {
                    wire.storage_mode = v1::StorageMode::Fslink.into();
                    wire.output_dir = "out".into();
                    wire.inputs = shared(&[&value]);
                    "inputs.shared.input_dirs"
                }
                _ => {
                    wire.placement = Some(v1::Placement {
                        site_id: value,
                        ..Default::default()
                    });
                    "placement.site_id"
                }
            };
            (wire, field)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A refusal always names the field that is wrong.
        #[test]
        fn refusals_name_the_changed_field((wire, field) in one_field_changed()) {
            match JobSpec::try_from(wire) {
                Ok(spec) => {
                    let again = JobSpec::try_from(v1::JobSpec::from(&spec));
                    prop_assert_eq!(again.as_ref(), Ok(&spec));
                }
                Err(error) => prop_assert_eq!(error.field, field),
            }
        }

        /// The door never panics, and whatever it lets in survives the wire unchanged and
        /// builds a command ending in the output dir.
        #[test]
        fn try_from_never_panics(wire in wire_spec()) {
            if let Ok(spec) = JobSpec::try_from(wire) {
                let again = JobSpec::try_from(v1::JobSpec::from(&spec));
                prop_assert_eq!(again.as_ref(), Ok(&spec));
                let command = spec.command();
                prop_assert!(command.len() > spec.entrypoint().len());
                prop_assert_eq!(command.last().map(String::as_str), Some(OUTGOING_DIR));
            }
        }

        /// Localizing keeps every non-flag-value argument and never shortens the list.
        #[test]
        fn localize_never_shortens(args in words(), flags in words()) {
            let localized = localize_path_args(&args, &flags, INCOMING_DIR);
            prop_assert!(localized.len() >= args.len());
            if flags.is_empty() {
                prop_assert_eq!(localized, args);
            }
        }

        /// Job ids that parse are one safe path component.
        #[test]
        fn job_ids_are_safe_components(raw in text()) {
            if let Ok(id) = JobId::parse(&raw) {
                let id = id.as_str();
                prop_assert!(!id.is_empty() && id.len() <= JobId::MAX_BYTES);
                prop_assert!(!id.contains('/') && !id.contains('\0') && !id.starts_with('.'));
            }
        }
    }
}

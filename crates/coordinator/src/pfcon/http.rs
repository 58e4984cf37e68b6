//! The routes of pfcon 6's API, each translated onto the coordinator's job API.
//!
//! pfcon's rules kept here: every route ends in `/`; form bodies repeat keys for lists;
//! a POST of an existing job that is running or succeeded returns it (201) and schedules
//! nothing, one that failed is run again; DELETEs answer 204 even for unknown jobs;
//! errors are `{"message": ...}`, a dict keyed by field for validation errors.

// A refusal here is the HTTP response itself, returned once per request: boxing it would
// add an allocation and nothing else.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::Code;

use dispatch_broker::StorePath;
use dispatch_broker::tar_decode::ArchiveLimits;
use dispatch_proto::v1;
use dispatch_proto::v1::coordinator_server::Coordinator as _;

use super::jwt::Tokens;
use super::shared::{self, Copies, CopyRecord};
use super::zipio::{self, ZipError};
use super::{LEGACY_SERVER_VERSION, PfconConfig, SERVER_VERSION, StorageEnv};
use crate::service::CoordinatorService;

/// Where uploads wait while they are unpacked, inside the store but outside any path a
/// grant can name.
const UNPACKING_DIR: &str = ".dispatch-pfcon";
/// Most bytes of log a job object carries, whatever `JOB_LOGS_TAIL` says.
const MAX_LOG_BYTES: usize = 4 << 20;
/// Largest url-encoded or JSON body (job fields, never data).
const MAX_FORM_BYTES: usize = 16 << 20;
/// Chunks of an upload in flight between the connection and the unpacker.
const UPLOAD_QUEUE: usize = 16;

/// Everything a request needs. Shared by all requests.
pub struct Face {
    config: PfconConfig,
    storage: StorageEnv,
    tokens: Tokens,
    service: CoordinatorService,
    limits: ArchiveLimits,
    copies: Arc<Copies>,
}

impl Face {
    /// The face over `service`, with the checked `config`.
    pub fn new(config: PfconConfig, service: CoordinatorService) -> crate::Result<Self> {
        config.check()?;
        let storage = config.storage()?;
        if !config.storebase.is_dir() {
            return Err(crate::Error::Config(format!(
                "pfcon.storebase (STOREBASE_MOUNT) {} is not a directory; point it at the hub broker's store_root",
                config.storebase.display()
            )));
        }
        Ok(Self {
            tokens: Tokens::new(&config.secret_key),
            config,
            storage,
            service,
            limits: ArchiveLimits::default(),
            copies: Arc::default(),
        })
    }
}

/// Serves the face on `listener` until `shutdown`.
pub async fn serve(
    face: Arc<Face>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, storage_env = face.storage.as_str(), "pfcon API serving");
    use axum::serve::ListenerExt as _;
    // Replies are small and many (status polls): never hold one back for a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router(face))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes, for serving or for tests.
pub fn router(face: Arc<Face>) -> Router {
    let routes = if face.config.legacy_api {
        Router::new()
            .route("/api/v1/jobs/", get(legacy_server_info).post(legacy_post))
            .route("/api/v1/jobs/{jid}/", get(legacy_get).delete(legacy_delete))
            .route("/api/v1/jobs/{jid}/file/", get(get_plugin_file))
    } else {
        Router::new()
    };
    routes
        .route("/api/v1/health/", get(health))
        .route("/api/v1/auth-token/", axum::routing::post(auth_token))
        .route(
            "/api/v1/pluginjobs/",
            get(server_info).post(post_plugin_job),
        )
        .route(
            "/api/v1/pluginjobs/{jid}/",
            get(get_plugin_job).delete(delete_plugin_job),
        )
        .route("/api/v1/pluginjobs/{jid}/file/", get(get_plugin_file))
        .route("/api/v1/copyjobs/", get(server_info).post(post_copy_job))
        .route(
            "/api/v1/copyjobs/{jid}/",
            get(get_copy_job).delete(delete_op_job),
        )
        .route(
            "/api/v1/uploadjobs/",
            get(server_info).post(post_upload_job),
        )
        .route(
            "/api/v1/uploadjobs/{jid}/",
            get(get_upload_job).delete(delete_op_job),
        )
        .route(
            "/api/v1/deletejobs/",
            get(server_info).post(post_delete_job),
        )
        .route(
            "/api/v1/deletejobs/{jid}/",
            get(get_delete_job).delete(delete_op_job),
        )
        // Uploads are streamed to disk, however large; form bodies are bounded below.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(face)
}

/// A response with pfcon's error shape.
fn message(status: StatusCode, text: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "message": text.into() }))).into_response()
}

/// The coordinator's refusal as pfcon would answer it.
fn from_status(status: &tonic::Status) -> Response {
    let code = match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    message(code, status.message())
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Admits a request with a valid token, or answers 401 in pfcon's words.
fn authorize(face: &Face, headers: &HeaderMap) -> Result<(), Response> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default());
    face.tokens
        .check(header, now_seconds())
        .map_err(|refusal| message(StatusCode::UNAUTHORIZED, refusal.message()))
}

async fn health() -> Response {
    axum::Json(json!({ "health": "OK" })).into_response()
}

/// Form fields with repeated keys, in order.
#[derive(Debug, Default)]
struct Fields(BTreeMap<String, Vec<String>>);

impl Fields {
    fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let mut fields = Self::default();
        for (key, value) in pairs {
            fields.0.entry(key).or_default().push(value);
        }
        fields
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.0.get(name).cloned().unwrap_or_default()
    }
}

/// Collects field errors the way pfcon's parser bundles them.
#[derive(Default)]
struct Problems(BTreeMap<String, String>);

impl Problems {
    fn add(&mut self, field: &str, text: impl Into<String>) {
        self.0
            .entry(field.to_owned())
            .or_insert_with(|| text.into());
    }

    fn required<'a>(&mut self, fields: &'a Fields, name: &str) -> Option<&'a str> {
        let value = fields.one(name);
        if value.is_none() {
            self.add(name, "Missing required parameter in the post body");
        }
        value
    }

    fn int(&mut self, fields: &Fields, name: &str, default: Option<i64>) -> Option<i64> {
        match (fields.one(name), default) {
            (None, Some(default)) => Some(default),
            (None, None) => {
                self.add(name, "Missing required parameter in the post body");
                None
            }
            (Some(raw), _) => match raw.trim().parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    self.add(
                        name,
                        format!("invalid literal for int() with base 10: '{raw}'"),
                    );
                    None
                }
            },
        }
    }

    fn into_response(self) -> Result<(), Response> {
        if self.0.is_empty() {
            return Ok(());
        }
        Err((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "message": self.0 })),
        )
            .into_response())
    }
}

/// Reads an url-encoded (or JSON, for auth-token) body into fields.
async fn form_fields(request: Request) -> Result<Fields, Response> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|e| {
            message(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the form body is over {MAX_FORM_BYTES} bytes or was cut off: {e}"),
            )
        })?;
    if is_json {
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| message(StatusCode::BAD_REQUEST, format!("the JSON body: {e}")))?;
        let pairs = value
            .as_object()
            .map(|object| {
                object
                    .iter()
                    .filter_map(|(k, v)| {
                        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        (!v.is_null()).then(|| (k.clone(), text))
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Ok(Fields::from_pairs(pairs));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|e| message(StatusCode::BAD_REQUEST, format!("the form body: {e}")))?;
    Ok(Fields::from_pairs(pairs))
}

async fn auth_token(State(face): State<Arc<Face>>, request: Request) -> Response {
    let fields = match form_fields(request).await {
        Ok(fields) => fields,
        Err(response) => return response,
    };
    let mut problems = Problems::default();
    let user = problems.required(&fields, "pfcon_user");
    let password = problems.required(&fields, "pfcon_password");
    if let Err(response) = problems.into_response() {
        return response;
    }
    let matches = |given: Option<&str>, expected: &str| {
        let (a, b) = (given.unwrap_or_default().as_bytes(), expected.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    };
    if !(matches(user, &face.config.user) & matches(password, &face.config.password)) {
        return message(
            StatusCode::BAD_REQUEST,
            "Unable to log in with provided credentials.",
        );
    }
    let token = face.tokens.issue(&face.config.user, now_seconds());
    axum::Json(json!({ "token": token })).into_response()
}

async fn server_info(State(face): State<Arc<Face>>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    axum::Json(json!({
        "server_version": SERVER_VERSION,
        "pfcon_innetwork": face.config.innetwork,
        "storage_env": face.storage.as_str(),
        "requires_copy_job": face.storage.requires_copy_job(),
        "requires_upload_job": false,
        "container_env": face.config.container_env,
        "compute_volume_type": face.config.volume_type(),
    }))
    .into_response()
}

/// pfcon's status word for one of our states.
fn status_word(state: v1::JobState) -> &'static str {
    match state {
        v1::JobState::Queued | v1::JobState::StagingIn => "notStarted",
        v1::JobState::Running | v1::JobState::StagingOut => "started",
        v1::JobState::Succeeded => "finishedSuccessfully",
        v1::JobState::Failed | v1::JobState::Cancelled => "finishedWithError",
        v1::JobState::Lost | v1::JobState::Unspecified => "undefined",
    }
}

/// `shlex.join`: each word quoted for a POSIX shell where it needs it.
fn shell_join(words: &[String]) -> String {
    let quote = |word: &String| {
        let safe = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c));
        if safe {
            word.clone()
        } else {
            format!("'{}'", word.replace('\'', r#"'"'"'"#))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

fn timestamp(stamp: Option<&prost_types::Timestamp>) -> String {
    stamp.map(ToString::to_string).unwrap_or_default()
}

/// Which of pfcon's APIs a request came through: they spell one status differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Era {
    /// pfcon 6 (`pluginjobs/` ...), what CUBE 7 speaks.
    Current,
    /// pfcon 5.3 and older (`jobs/`), what CUBE 6.11 and older speak.
    Legacy,
}

impl Era {
    fn status(self, state: v1::JobState) -> &'static str {
        match (self, status_word(state)) {
            (Era::Legacy, "notStarted") => "notstarted",
            (_, word) => word,
        }
    }
}

/// The job object pfcon returns, `logs` included, in `era`'s spelling.
fn job_object(era: Era, job: &v1::Job, jid: &str, logs: String) -> Value {
    let spec = job.spec.as_ref();
    let reason = job
        .reason
        .as_ref()
        .map(|r| r.message.clone())
        .unwrap_or_default();
    json!({
        "jid": jid,
        "image": spec.map(|s| s.image.clone()).unwrap_or_default(),
        "cmd": shell_join(&job.command),
        "status": era.status(job.state()),
        "message": if job.message.is_empty() { reason } else { job.message.clone() },
        "timestamp": timestamp(job.updated_at.as_ref()),
        "logs": logs,
    })
}

/// The object of a copy, upload or delete job: the hub does that work itself, so there
/// is no image, command or log.
fn op_job(jid: &str, status: &str, message: &str, timestamp: &str) -> Value {
    json!({ "compute": {
        "jid": jid,
        "image": "",
        "cmd": "",
        "status": status,
        "message": message,
        "timestamp": timestamp,
        "logs": "",
    }})
}

/// A skipped operation's job object, as pfcon answers when there is nothing to do.
fn skipped(jid: &str, what: &str) -> Response {
    (
        StatusCode::CREATED,
        axum::Json(op_job(jid, "finishedSuccessfully", what, "")),
    )
        .into_response()
}

impl Face {
    async fn job(&self, jid: &str) -> Result<Option<v1::Job>, tonic::Status> {
        match self
            .service
            .get_job(tonic::Request::new(v1::GetJobRequest {
                job_id: jid.to_owned(),
            }))
            .await
        {
            Ok(job) => Ok(Some(job.into_inner())),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// The last `job_logs_tail` lines of the job's log, or nothing when the site cannot
    /// say (not placed yet, unreachable): a status poll must not fail for want of logs.
    async fn logs(&self, jid: &str) -> String {
        let request = v1::JobLogsRequest {
            job_id: jid.to_owned(),
            tail_lines: Some(self.config.job_logs_tail),
            follow: false,
        };
        let Ok(stream) = self.service.job_logs(tonic::Request::new(request)).await else {
            return String::new();
        };
        let mut stream = stream.into_inner();
        let mut bytes = Vec::new();
        let read = async {
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                let room = MAX_LOG_BYTES.saturating_sub(bytes.len());
                bytes.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                if chunk.eof || room == 0 {
                    break;
                }
            }
        };
        if tokio::time::timeout(std::time::Duration::from_secs(20), read)
            .await
            .is_err()
        {
            tracing::warn!(job = jid, "the job's log did not arrive in time");
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A job id as pfcon takes it: leading slashes dropped.
fn clean_jid(raw: &str) -> String {
    raw.trim_start_matches('/').to_owned()
}

async fn get_plugin_job(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    plugin_status(&face, &jid, Era::Current).await
}

/// A plugin job's object with its log, or 404.
async fn plugin_status(face: &Face, jid: &str, era: Era) -> Response {
    match face.job(jid).await {
        Ok(Some(job)) => {
            let logs = face.logs(jid).await;
            axum::Json(json!({ "compute": job_object(era, &job, jid, logs) })).into_response()
        }
        Ok(None) => message(StatusCode::NOT_FOUND, format!("Job {jid} not found")),
        Err(status) => from_status(&status),
    }
}

async fn delete_plugin_job(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    if face.config.remove_jobs {
        let request = v1::DeleteJobRequest {
            job_id: jid.clone(),
            purge: false,
        };
        match face.service.delete_job(tonic::Request::new(request)).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return from_status(&status),
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// DELETE of a copy, upload or delete job: there is no container to remove (the brokers
/// did the work), so it is always done.
async fn delete_op_job(State(face): State<Arc<Face>>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn post_copy_job(State(face): State<Arc<Face>>, request: Request) -> Response {
    if let Err(response) = authorize(&face, request.headers()) {
        return response;
    }
    let fields = match form_fields(request).await {
        Ok(fields) => fields,
        Err(response) => return response,
    };
    let mut problems = Problems::default();
    let jid = problems.required(&fields, "jid").map(clean_jid);
    let output_dir = problems.required(&fields, "output_dir").map(str::to_owned);
    problems.int(&fields, "cpu_limit", Some(1000));
    problems.int(&fields, "memory_limit", Some(300));
    if let Err(response) = problems.into_response() {
        return response;
    }
    let jid = jid.unwrap_or_default();
    if !face.storage.requires_copy_job() {
        return skipped(&jid, "copySkipped");
    }
    if key_name_is_bad(&jid) {
        return bad_field("jid", "is not a job id pfcon accepts");
    }
    let input_dirs = match fields
        .list("input_dirs")
        .iter()
        .map(|dir| storage_path("input_dirs", dir))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(dirs) => dirs,
        Err(response) => return response,
    };
    let output_dir = match storage_path("output_dir", &output_dir.unwrap_or_default()) {
        Ok(dir) => dir,
        Err(response) => return response,
    };
    let storebase = &face.config.storebase;
    if let Some(record) = shared::copy_status(storebase, &face.copies, &jid)
        && matches!(
            record.status.as_str(),
            "started" | "notStarted" | "finishedSuccessfully"
        )
    {
        return (StatusCode::CREATED, axum::Json(copy_object(&jid, &record))).into_response();
    }
    match shared::start_copy(
        storebase,
        &face.copies,
        &jid,
        input_dirs,
        output_dir,
        face.storage.as_str(),
    ) {
        Ok(record) => (StatusCode::CREATED, axum::Json(copy_object(&jid, &record))).into_response(),
        Err(error) => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot start the copy of job {jid}: {error}"),
        ),
    }
}

/// A storage path from a form field, or pfcon's 400 naming the field.
fn storage_path(field: &str, raw: &str) -> Result<StorePath, Response> {
    StorePath::from_api(raw.trim_start_matches('/'))
        .map_err(|e| bad_field(field, format!("`{raw}`: {e}")))
}

/// Job ids that cannot name a `key-<jid>` directory.
fn key_name_is_bad(jid: &str) -> bool {
    jid.is_empty() || jid.contains('/') || jid.starts_with('.') || jid.len() > 200
}

/// A copy job's object.
fn copy_object(jid: &str, record: &CopyRecord) -> Value {
    op_job(jid, &record.status, &record.message, &record.timestamp)
}

async fn post_upload_job(State(face): State<Arc<Face>>, request: Request) -> Response {
    if let Err(response) = authorize(&face, request.headers()) {
        return response;
    }
    let fields = match form_fields(request).await {
        Ok(fields) => fields,
        Err(response) => return response,
    };
    let mut problems = Problems::default();
    let jid = problems.required(&fields, "jid").map(clean_jid);
    problems.required(&fields, "job_output_path");
    problems.int(&fields, "cpu_limit", Some(1000));
    problems.int(&fields, "memory_limit", Some(300));
    if let Err(response) = problems.into_response() {
        return response;
    }
    // Only object storage needs an upload; no mode this build serves does.
    skipped(&jid.unwrap_or_default(), "uploadSkipped")
}

/// GET of a copy or upload job: in zipfile mode none is ever run.
async fn get_copy_job(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    match shared::copy_status(&face.config.storebase, &face.copies, &jid) {
        Some(record) => axum::Json(copy_object(&jid, &record)).into_response(),
        None => message(StatusCode::NOT_FOUND, format!("Job {jid}-copy not found")),
    }
}

async fn get_upload_job(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    message(StatusCode::NOT_FOUND, format!("Job {jid}-upload not found"))
}

/// The job's directory in the store, if it is one (never through a symlink).
fn key_dir(face: &Face, jid: &str) -> Option<PathBuf> {
    if key_name_is_bad(jid) {
        return None;
    }
    let path = face.config.storebase.join(format!("key-{jid}"));
    std::fs::symlink_metadata(&path)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|_| path)
}

async fn post_delete_job(State(face): State<Arc<Face>>, request: Request) -> Response {
    if let Err(response) = authorize(&face, request.headers()) {
        return response;
    }
    let fields = match form_fields(request).await {
        Ok(fields) => fields,
        Err(response) => return response,
    };
    let mut problems = Problems::default();
    let jid = problems.required(&fields, "jid").map(clean_jid);
    problems.int(&fields, "cpu_limit", Some(1000));
    problems.int(&fields, "memory_limit", Some(300));
    if let Err(response) = problems.into_response() {
        return response;
    }
    let jid = jid.unwrap_or_default();
    let job = match face.job(&jid).await {
        Ok(job) => job,
        Err(status) => return from_status(&status),
    };
    let upload = job
        .as_ref()
        .and_then(upload_dir_of)
        .map(|d| face.config.storebase.join(d));
    let key = key_dir(&face, &jid);
    // pfcon skips when the job has no directory. Ours has data at the hub from the moment
    // it is posted (its upload, then its outputs): skipped when neither is there.
    let upload = upload.filter(|dir| dir.exists());
    if key.is_none() && upload.is_none() {
        return skipped(&jid, "deleteSkipped");
    }
    if let Some(copy) = shared::copy_status(&face.config.storebase, &face.copies, &jid)
        && matches!(copy.status.as_str(), "started" | "notStarted")
    {
        return message(
            StatusCode::CONFLICT,
            format!(
                "The copy job is still active (status: {}). All jobs must finish before scheduling a delete job.",
                copy.status
            ),
        );
    }
    if let Some(job) = &job {
        let word = status_word(job.state());
        if matches!(word, "started" | "notStarted") {
            return message(
                StatusCode::CONFLICT,
                format!(
                    "The plugin job is still active (status: {word}). All jobs must finish before scheduling a delete job."
                ),
            );
        }
    }
    for dir in [key, upload].into_iter().flatten() {
        if let Err(error) = remove_tree(&dir).await {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot remove the data of job {jid}: {error}"),
            );
        }
    }
    (
        StatusCode::CREATED,
        axum::Json(op_job(
            &jid,
            "finishedSuccessfully",
            "",
            &timestamp(Some(&prost_types::Timestamp::from(SystemTime::now()))),
        )),
    )
        .into_response()
}

/// Removes a tree in the store on a blocking thread (symlinks inside are removed, never
/// followed).
async fn remove_tree(path: &Path) -> io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    })
    .await
    .map_err(io::Error::other)?
}

/// The store path of a job's uploaded inputs.
fn upload_dir_of(job: &v1::Job) -> Option<String> {
    match job.spec.as_ref()?.inputs.as_ref()?.source.as_ref()? {
        v1::input_spec::Source::Uploaded(uploaded) => Some(uploaded.hub_path.clone()),
        v1::input_spec::Source::Shared(_) => None,
    }
}

/// GET of a delete job: done once the job's directory is gone.
async fn get_delete_job(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    match face.job(&jid).await {
        Ok(Some(_)) if key_dir(&face, &jid).is_none() => {
            axum::Json(op_job(&jid, "finishedSuccessfully", "", "")).into_response()
        }
        Ok(_) => message(StatusCode::NOT_FOUND, format!("Job {jid}-delete not found")),
        Err(status) => from_status(&status),
    }
}

/// pfcon 5's server info: no `requires_*` flags.
async fn legacy_server_info(State(face): State<Arc<Face>>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    axum::Json(json!({
        "server_version": LEGACY_SERVER_VERSION,
        "pfcon_innetwork": face.config.innetwork,
        "storage_env": face.storage.as_str(),
        "container_env": face.config.container_env,
        "compute_volume_type": face.config.volume_type(),
    }))
    .into_response()
}

async fn legacy_post(State(face): State<Arc<Face>>, request: Request) -> Response {
    if let Err(response) = authorize(&face, request.headers()) {
        return response;
    }
    match post_plugin_job_inner(&face, request, Era::Legacy).await {
        Ok(response) | Err(response) => response,
    }
}

async fn legacy_get(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    plugin_status(&face, &jid, Era::Legacy).await
}

/// pfcon 5's DELETE: the job's data goes at once, then the job itself; an unknown job
/// is 404 (not pfcon 6's unconditional 204).
async fn legacy_delete(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    let job = match face.job(&jid).await {
        Ok(Some(job)) => job,
        Ok(None) => return message(StatusCode::NOT_FOUND, format!("Job {jid} not found")),
        Err(status) => return from_status(&status),
    };
    let upload = upload_dir_of(&job).map(|d| face.config.storebase.join(d));
    for dir in [key_dir(&face, &jid), upload].into_iter().flatten() {
        if let Err(error) = remove_tree(&dir).await {
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot remove the data of job {jid}: {error}"),
            );
        }
    }
    if face.config.remove_jobs {
        let request = v1::DeleteJobRequest {
            job_id: jid.clone(),
            purge: false,
        };
        if let Err(status) = face.service.delete_job(tonic::Request::new(request)).await
            && status.code() != Code::NotFound
        {
            return from_status(&status);
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A blocking reader over chunks sent from the connection's task.
struct ChannelReader {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// An upload being unpacked into a directory of its own, removed unless kept.
struct Unpacking {
    dir: PathBuf,
    kept: bool,
}

impl Drop for Unpacking {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Reads a plugin-job POST: its fields, and its zip unpacked as it arrives.
async fn read_plugin_post(
    face: &Face,
    request: Request,
) -> Result<(Fields, Option<(Unpacking, zipio::Unpacked)>), Response> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !multipart {
        return Ok((form_fields(request).await?, None));
    }
    let mut parts = Multipart::from_request(request, &())
        .await
        .map_err(|e| message(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut pairs = Vec::new();
    let mut fields_bytes = 0usize;
    let mut unpacked = None;
    loop {
        let field = parts
            .next_field()
            .await
            .map_err(|e| message(StatusCode::BAD_REQUEST, e.to_string()))?;
        let Some(mut field) = field else {
            break;
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name != "data_file" {
            // Fields are job descriptors, never data: bounded like a form body.
            let mut text = Vec::new();
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| message(StatusCode::BAD_REQUEST, e.to_string()))?
            {
                fields_bytes += chunk.len();
                if fields_bytes > MAX_FORM_BYTES {
                    return Err(message(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the form fields add up to more than {MAX_FORM_BYTES} bytes"),
                    ));
                }
                text.extend_from_slice(&chunk);
            }
            pairs.push((name, String::from_utf8_lossy(&text).into_owned()));
            continue;
        }
        if unpacked.is_some() {
            return Err(bad_field("data_file", "give one zip file"));
        }
        let parent = face.config.storebase.join(UNPACKING_DIR);
        let dir = parent.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&dir).map_err(|e| {
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot unpack into {}: {e}", dir.display()),
            )
        })?;
        let unpacking = Unpacking { dir, kept: false };
        let (send, chunks) = tokio::sync::mpsc::channel::<Bytes>(UPLOAD_QUEUE);
        let root = unpacking.dir.clone();
        let limits = face.limits;
        let worker = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                chunks,
                current: Bytes::new(),
            };
            let result = zipio::unpack(reader, &root, &limits);
            // Read what is left so the sender never blocks on a full queue.
            result
        });
        let mut send = Some(send);
        let mut receive_error = None;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    if let Some(sender) = &send
                        && sender.send(chunk).await.is_err()
                    {
                        // The unpacker stopped (refused the zip); drain the body.
                        send = None;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    receive_error = Some(error.to_string());
                    break;
                }
            }
        }
        drop(send);
        let result = worker
            .await
            .map_err(|e| message(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        if let Some(error) = receive_error {
            return Err(message(
                StatusCode::BAD_REQUEST,
                format!("the upload was cut off: {error}"),
            ));
        }
        match result {
            Ok(done) => unpacked = Some((unpacking, done)),
            Err(ZipError::Bad(detail)) => {
                tracing::info!(%detail, "refused a bad zip");
                return Err(bad_field("data_file", "Bad zip file"));
            }
            Err(ZipError::Refused(why)) => return Err(bad_field("data_file", why)),
            Err(ZipError::Io(why)) => return Err(message(StatusCode::INTERNAL_SERVER_ERROR, why)),
        }
    }
    Ok((Fields::from_pairs(pairs), unpacked))
}

/// pfcon's `"<field>: <reason>"` message.
fn bad_field(field: &str, reason: impl std::fmt::Display) -> Response {
    message(StatusCode::BAD_REQUEST, format!("{field}: {reason}"))
}

/// The plugin job's spec from pfcon's fields, or pfcon's 400.
fn plugin_spec(face: &Face, fields: &Fields) -> Result<v1::JobSpec, Response> {
    let mut problems = Problems::default();
    let jid = problems.required(fields, "jid").map(clean_jid);
    let image = problems.required(fields, "image").map(str::to_owned);
    let auid = problems.required(fields, "auid").map(str::to_owned);
    let workers = problems.int(fields, "number_of_workers", None);
    let cpu = problems.int(fields, "cpu_limit", None);
    let memory = problems.int(fields, "memory_limit", None);
    let gpus = problems.int(fields, "gpu_limit", None);
    let plugin_type = problems.required(fields, "type").and_then(|t| match t {
        "ds" => Some(v1::PluginType::Ds),
        "fs" => Some(v1::PluginType::Fs),
        "ts" => Some(v1::PluginType::Ts),
        other => {
            problems.add("type", format!("{other} is not a valid choice"));
            None
        }
    });
    problems.into_response()?;
    let entrypoint = fields.list("entrypoint");
    if entrypoint.is_empty() {
        return Err(bad_field("entrypoint", "cannot be empty"));
    }
    let env = fields.list("env");
    if env.iter().any(|e| !e.contains('=')) {
        return Err(bad_field("env", r#"must be a list of "key=value" strings"#));
    }
    let workers = workers.unwrap_or(1);
    if workers != 1
        && matches!(
            face.config.container_env.as_str(),
            "docker" | "podman" | "swarm"
        )
    {
        return Err(message(
            StatusCode::BAD_REQUEST,
            format!("Compute environment only supports number_of_workers=1, got {workers}"),
        ));
    }
    let number = |field: &str, value: Option<i64>| -> Result<i64, Response> {
        let value = value.unwrap_or_default();
        if value < 0 {
            return Err(bad_field(field, "must not be negative"));
        }
        Ok(value)
    };
    Ok(v1::JobSpec {
        job_id: jid.unwrap_or_default(),
        image: image.unwrap_or_default(),
        entrypoint,
        args: fields.list("args"),
        args_path_flags: fields.list("args_path_flags"),
        plugin_type: plugin_type.map_or(0, |t| t as i32),
        env,
        cpu_millicores: u32::try_from(number("cpu_limit", cpu)?).unwrap_or(u32::MAX),
        memory_mib: u64::try_from(number("memory_limit", memory)?).unwrap_or(u64::MAX),
        gpus: u32::try_from(number("gpu_limit", gpus)?).unwrap_or(u32::MAX),
        workers: u32::try_from(workers).unwrap_or(1),
        auid: auid.unwrap_or_default(),
        storage_mode: face.storage.wire() as i32,
        ..Default::default()
    })
}

async fn post_plugin_job(State(face): State<Arc<Face>>, request: Request) -> Response {
    if let Err(response) = authorize(&face, request.headers()) {
        return response;
    }
    match post_plugin_job_inner(&face, request, Era::Current).await {
        Ok(response) | Err(response) => response,
    }
}

async fn post_plugin_job_inner(
    face: &Face,
    request: Request,
    era: Era,
) -> Result<Response, Response> {
    let (fields, unpacked) = read_plugin_post(face, request).await?;
    if era == Era::Legacy && !fields.0.contains_key("args") {
        // pfcon 5 required `args`, even for plugins that take none.
        return Err((
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({ "message": { "args": "Missing required parameter in the post body" } }),
            ),
        )
            .into_response());
    }
    let mut spec = plugin_spec(face, &fields)?;
    if face.storage != StorageEnv::Zipfile {
        // In-network: CUBE names storage paths; a zip, if any, is not used.
        drop(unpacked);
        return post_shared_plugin_job(face, &fields, &mut spec, era).await;
    }
    let Some((mut unpacking, _)) = unpacked else {
        return Err((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "message": { "data_file": "Missing required parameter in the post body" } })),
        )
            .into_response());
    };
    let jid = spec.job_id.clone();
    let retry = match replay(face, &jid, era).await {
        Ok(answer) => return Ok(answer),
        Err(retry) => retry,
    };
    // ChRIS links in the zip become the directories they name, as pfcon expands them.
    let root = unpacking.dir.clone();
    let expanded =
        tokio::task::spawn_blocking(move || dispatch_broker::chrislink::expand_in_place(&root))
            .await
            .map_err(|e| message(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Err(error) = expanded {
        return Err(bad_field("data_file", error));
    }
    let root = unpacking.dir.clone();
    let nfiles = tokio::task::spawn_blocking(move || count_files(&root))
        .await
        .map_err(|e| message(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;

    // The inputs go straight into the hub's store, where a site's stage-in reads them.
    let hub_path = format!("uploads/pfcon-{}", uuid::Uuid::new_v4().simple());
    let destination = face.config.storebase.join(&hub_path);
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot create {}: {e}", parent.display()),
            )
        })?;
    }
    std::fs::rename(&unpacking.dir, &destination).map_err(|e| {
        message(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot place the inputs at {}: {e}", destination.display()),
        )
    })?;
    unpacking.kept = true;
    let submitted = face.service.submit_placed(spec, hub_path, retry).await;
    let job = match submitted {
        Ok(answer) => answer.job.unwrap_or_default(),
        Err(status) => {
            let _ = remove_tree(&destination).await;
            return Err(from_status(&status));
        }
    };
    let data = json!({
        "jid": jid,
        "nfiles": nfiles,
        "timestamp": python_now(),
        "path": destination.display().to_string(),
    });
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "data": data, "compute": job_object(era, &job, &jid, String::new()) })),
    )
        .into_response())
}

/// The answer to a replayed plugin POST, if the job exists and pfcon would not run it
/// again; `Err(true)` when it exists and failed (run it again), `Err(false)` when new.
async fn replay(face: &Face, jid: &str, era: Era) -> Result<Response, bool> {
    let existing = face.job(jid).await.map_err(|_| false)?;
    let Some(job) = existing else {
        return Err(false);
    };
    let word = status_word(job.state());
    if !matches!(word, "started" | "notStarted" | "finishedSuccessfully") {
        return Err(true);
    }
    let logs = face.logs(jid).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "data": {}, "compute": job_object(era, &job, jid, logs) })),
    )
        .into_response())
}

/// A plugin POST in an in-network mode: inputs and outputs are storeBase paths.
async fn post_shared_plugin_job(
    face: &Face,
    fields: &Fields,
    spec: &mut v1::JobSpec,
    era: Era,
) -> Result<Response, Response> {
    let jid = spec.job_id.clone();
    let output_dir = match fields.one("output_dir") {
        Some(dir) if !dir.is_empty() => storage_path("output_dir", dir)?,
        _ => return Err(bad_field("output_dir", "field is required")),
    };
    if face.storage == StorageEnv::Fslink {
        match shared::copy_status(&face.config.storebase, &face.copies, &jid) {
            None => {
                return Err(message(
                    StatusCode::CONFLICT,
                    "No copy job found. A copy job must complete successfully before scheduling a plugin job.",
                ));
            }
            Some(copy) if copy.status != "finishedSuccessfully" => {
                return Err(message(
                    StatusCode::CONFLICT,
                    format!(
                        "Copy job has not completed successfully (status: {}). Run the copy job first.",
                        copy.status
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let retry = match replay(face, &jid, era).await {
        Ok(answer) => return Ok(answer),
        Err(retry) => retry,
    };
    let (input, data) = match face.storage {
        StorageEnv::Fslink => (format!("key-{jid}/incoming"), json!({})),
        _ => {
            let Some(first) = fields.list("input_dirs").into_iter().next() else {
                return Err(bad_field("input_dirs", "field is required"));
            };
            let input = storage_path("input_dirs", &first)?;
            let root = face.config.storebase.join(input.as_str());
            let nfiles = tokio::task::spawn_blocking(move || {
                std::fs::metadata(&root)
                    .ok()
                    .filter(std::fs::Metadata::is_dir)
                    .map(|_| count_files(&root))
                    .map(|n| (n, root))
            })
            .await
            .map_err(|e| message(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let Some((nfiles, root)) = nfiles else {
                return Err(bad_field(
                    "input_dirs",
                    "Error accessing files from shared filesystem",
                ));
            };
            let data = json!({
                "jid": jid,
                "nfiles": nfiles,
                "timestamp": python_now(),
                "path": root.display().to_string(),
            });
            (input.as_str().to_owned(), data)
        }
    };
    spec.inputs = Some(v1::InputSpec {
        source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
            input_dirs: vec![input],
        })),
    });
    spec.output_dir = output_dir.as_str().to_owned();
    let job = face
        .service
        .submit_job(tonic::Request::new(v1::SubmitJobRequest {
            spec: Some(spec.clone()),
            upload: None,
            retry_if_failed: retry,
        }))
        .await
        .map_err(|s| from_status(&s))?
        .into_inner()
        .job
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "data": data, "compute": job_object(era, &job, &jid, String::new()) })),
    )
        .into_response())
}

/// Files under `root`, `.chrislink` files left out (they were expanded).
fn count_files(root: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && !entry.file_name().to_string_lossy().ends_with(".chrislink")
            {
                count += 1;
            }
        }
    }
    count
}

/// `str(datetime.now())` as pfcon writes it: `2026-03-12 10:30:00.123456` (UTC here).
fn python_now() -> String {
    let stamp = prost_types::Timestamp::from(SystemTime::now()).to_string();
    // `2026-03-12T10:30:00.123456789Z` -> `2026-03-12 10:30:00.123456`
    let stamp = stamp.trim_end_matches('Z').replacen('T', " ", 1);
    match stamp.split_once('.') {
        Some((seconds, fraction)) => format!("{seconds}.{:0<6.6}", fraction),
        None => format!("{stamp}.000000"),
    }
}

/// Query of the file route.
#[derive(serde::Deserialize)]
struct FileQuery {
    job_output_path: Option<String>,
}

/// A writer that sends what is written as chunks of the response body.
struct ChannelWriter {
    chunks: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    const CHUNK: usize = 256 * 1024;

    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.chunks
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

async fn get_plugin_file(
    State(face): State<Arc<Face>>,
    UrlPath(jid): UrlPath<String>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&face, &headers) {
        return response;
    }
    if face.storage != StorageEnv::Zipfile {
        return output_listing(&face, &jid, query.job_output_path).await;
    }
    let job = match face.job(&jid).await {
        Ok(Some(job)) => job,
        Ok(None) => return message(StatusCode::NOT_FOUND, format!("Job {jid} not found")),
        Err(status) => return from_status(&status),
    };
    let Some(key) = key_dir(&face, &jid).or_else(|| {
        // Not back at the hub yet: pfcon creates outgoing/ and sends an empty zip.
        (!job.state().is_terminal()).then(|| face.config.storebase.join(format!("key-{jid}")))
    }) else {
        return message(
            StatusCode::NOT_FOUND,
            format!("No output of job {jid} at the hub"),
        );
    };
    let outgoing = key.join("outgoing");
    let (send, receive) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter {
            chunks: send.clone(),
            buffer: Vec::with_capacity(ChannelWriter::CHUNK),
        };
        // Not back yet: pfcon sends an empty zip.
        let packed = zipio::pack(&outgoing, &mut writer);
        let flushed = packed.and_then(|_| writer.flush());
        if let Err(error) = flushed {
            tracing::warn!(%error, "zipping outputs failed");
            let _ = send.blocking_send(Err(error));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receive));
    (
        [
            (header::CONTENT_TYPE, "application/zip".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename={jid}.zip"),
            ),
        ],
        body,
    )
        .into_response()
}

/// In-network modes: the files of the output dir, as JSON CUBE registers them from.
async fn output_listing(face: &Face, jid: &str, path: Option<String>) -> Response {
    let Some(raw) = path.filter(|p| !p.is_empty()) else {
        return message(
            StatusCode::BAD_REQUEST,
            "job_output_path: query parameter is required",
        );
    };
    let relative = raw.trim_matches('/').to_owned();
    let store_path = match StorePath::from_api(&relative) {
        Ok(path) => path,
        Err(e) => return bad_field("job_output_path", format!("`{raw}`: {e}")),
    };
    let root = face.config.storebase.join(store_path.as_str());
    let delete_links = face.storage == StorageEnv::Fslink;
    let listed = tokio::task::spawn_blocking(move || {
        let is_dir = std::fs::symlink_metadata(&root).is_ok_and(|m| m.is_dir());
        is_dir.then(|| shared::list_outputs(&root, delete_links))
    })
    .await;
    match listed {
        Ok(Some(Ok(files))) => (
            [(
                header::CONTENT_DISPOSITION,
                format!("attachment; filename={jid}.json"),
            )],
            axum::Json(json!({ "job_output_path": relative, "rel_file_paths": files })),
        )
            .into_response(),
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            format!("{relative} is not a directory in storeBase"),
        ),
        Ok(Some(Err(error))) => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot list {relative}: {error}"),
        ),
        Err(error) => message(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_joined_as_shlex_joins_them() {
        let words: Vec<String> = ["python3", "app.py", "--msg", "hello world", "it's", ""]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            shell_join(&words),
            r#"python3 app.py --msg 'hello world' 'it'"'"'s' ''"#
        );
    }

    #[test]
    fn states_map_to_pfcons_words() {
        assert_eq!(status_word(v1::JobState::Queued), "notStarted");
        assert_eq!(status_word(v1::JobState::StagingIn), "notStarted");
        assert_eq!(status_word(v1::JobState::Running), "started");
        assert_eq!(status_word(v1::JobState::StagingOut), "started");
        assert_eq!(status_word(v1::JobState::Succeeded), "finishedSuccessfully");
        assert_eq!(status_word(v1::JobState::Failed), "finishedWithError");
        assert_eq!(status_word(v1::JobState::Cancelled), "finishedWithError");
        assert_eq!(status_word(v1::JobState::Lost), "undefined");
    }

    #[test]
    fn timestamps_look_like_pythons_str_of_now() {
        let stamp = python_now();
        assert_eq!(stamp.len(), "2026-03-12 10:30:00.123456".len(), "{stamp}");
        assert_eq!(&stamp[10..11], " ");
        assert_eq!(&stamp[19..20], ".");
    }
}

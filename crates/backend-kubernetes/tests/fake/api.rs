//! The fake API server's routes (see the parent module): what the real one answers, for
//! the requests the backend makes.

// A route's early answer is its whole `Response`, made once per request: boxing it would
// only add noise.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dispatch_backend_kubernetes::names::{is_dns_label, is_label_key, is_label_value};
use k8s_openapi::api::batch::v1::{Job, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use serde_json::{Value, json};

use super::Cluster;

type Shared = State<Arc<Cluster>>;
type Params = Query<HashMap<String, String>>;

/// Largest total size of one object's annotations the real server takes.
const MAX_ANNOTATIONS: usize = 256 * 1024;

pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs",
            get(list_jobs).post(create_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            get(get_job).patch(patch_job).delete(delete_job),
        )
        .route("/api/v1/namespaces/{namespace}/pods", get(list_pods))
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}",
            get(get_pod).delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/log",
            get(pod_log),
        )
        .fallback(not_served)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&cluster),
            count_requests,
        ))
        .with_state(cluster)
}

async fn count_requests(
    State(cluster): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    cluster.count_request(format!("{} {}", request.method(), request.uri().path()));
    next.run(request).await
}

/// A `Status` error, as the real server sends it.
pub fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn not_found(kind: &str, group: &str, name: &str) -> Response {
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{qualified} \"{name}\" not found"),
        json!({ "name": name, "group": group, "kind": kind }),
    )
}

fn invalid(kind: &str, name: &str, causes: &[String]) -> Response {
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{kind}.batch \"{name}\" is invalid: {}", causes.join(", ")),
        json!({ "name": name, "group": "batch", "kind": kind,
                "causes": causes.iter().map(|c| json!({"message": c})).collect::<Vec<_>>() }),
    )
}

fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, json!({}))
}

fn json_response<T: serde::Serialize>(code: StatusCode, value: &T) -> Response {
    (code, axum::Json(value)).into_response()
}

async fn not_served(method: Method, uri: Uri) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "the server could not find the requested resource ({method} {uri}; this fake serves only the backend's routes)"
        ),
        json!({}),
    )
}

/// The namespace is the one served, or the answer the real server gives for an empty one.
fn check_namespace(cluster: &Cluster, namespace: &str) -> Result<(), Response> {
    if namespace == cluster.namespace {
        Ok(())
    } else {
        Err(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
            json!({ "name": namespace, "kind": "namespaces" }),
        ))
    }
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0+fake-dispatch-test",
            "gitCommit": "fake",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "none (a fake API server)",
            "compiler": "rustc",
            "platform": "linux/amd64",
        }),
    )
}

// ---------------------------------------------------------------------------------------
// Label selectors.

enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// Parses `labelSelector`: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
            return Err(format!(
                "set-based requirement `{part}` is not served by this fake"
            ));
        }
        let requirement = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else {
            Requirement::Exists(part.into())
        };
        let key = match &requirement {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if !is_label_key(key) {
            return Err(format!(
                "unable to parse requirement: invalid label key \"{key}\""
            ));
        }
        out.push(requirement);
    }
    Ok(out)
}

fn matches(selector: &[Requirement], labels: Option<&BTreeMap<String, String>>) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k));
    selector.iter().all(|r| match r {
        Requirement::Equals(k, v) => get(k) == Some(v),
        Requirement::NotEquals(k, v) => get(k) != Some(v),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    })
}

fn list_params(params: &HashMap<String, String>) -> Result<Vec<Requirement>, Response> {
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return Err(bad_request(
            "watch is not served by this fake API server".into(),
        ));
    }
    if params.contains_key("fieldSelector") || params.contains_key("continue") {
        return Err(bad_request(
            "fieldSelector and continue are not served by this fake API server".into(),
        ));
    }
    parse_selector(params.get("labelSelector").map_or("", String::as_str)).map_err(bad_request)
}

// ---------------------------------------------------------------------------------------
// Validation, as much of the real server's as the backend could trip.

fn check_metadata(meta: &ObjectMeta, causes: &mut Vec<String>) {
    for (key, value) in meta.labels.iter().flatten() {
        if !is_label_key(key) {
            causes.push(format!("metadata.labels: Invalid value: \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.'"));
        }
        if !is_label_value(value) {
            causes.push(format!("metadata.labels: Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
    }
    let mut size = 0;
    for (key, value) in meta.annotations.iter().flatten() {
        if !is_label_key(key) {
            causes.push(format!("metadata.annotations: Invalid value: \"{key}\""));
        }
        size += key.len() + value.len();
    }
    if size > MAX_ANNOTATIONS {
        causes.push(format!(
            "metadata.annotations: Too long: must have at most {MAX_ANNOTATIONS} bytes"
        ));
    }
}

fn check_job(job: &Job) -> Vec<String> {
    let mut causes = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    if !is_dns_label(name) {
        causes.push(format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"));
    }
    check_metadata(&job.metadata, &mut causes);
    let Some(spec) = job.spec.as_ref() else {
        causes.push("spec: Required value".into());
        return causes;
    };
    if let Some(meta) = spec.template.metadata.as_ref() {
        check_metadata(meta, &mut causes);
    }
    let Some(pod) = spec.template.spec.as_ref() else {
        causes.push("spec.template.spec: Required value".into());
        return causes;
    };
    if !matches!(pod.restart_policy.as_deref(), Some("Never" | "OnFailure")) {
        causes.push("spec.template.spec.restartPolicy: Required value: valid values: \"OnFailure\", \"Never\"".into());
    }
    if pod.containers.is_empty() {
        causes.push("spec.template.spec.containers: Required value".into());
    }
    for container in &pod.containers {
        if container.image.as_deref().is_none_or(str::is_empty) {
            causes.push("spec.template.spec.containers[0].image: Required value".into());
        }
    }
    causes
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

// ---------------------------------------------------------------------------------------
// Jobs.

async fn create_job(
    State(cluster): Shared,
    Path(namespace): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    let mut job: Job = match serde_json::from_slice(&body) {
        Ok(job) => job,
        Err(error) => return bad_request(format!("the request body is not a Job: {error}")),
    };
    let name = job.metadata.name.clone().unwrap_or_default();
    let causes = check_job(&job);
    if !causes.is_empty() {
        return invalid("Job", &name, &causes);
    }
    let mut objects = cluster.objects();
    if objects.jobs.contains_key(&name) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("jobs.batch \"{name}\" already exists"),
            json!({ "name": name, "group": "batch", "kind": "jobs" }),
        );
    }
    // What the real server fills in.
    let uid = uuid::Uuid::new_v4().to_string();
    job.metadata.uid = Some(uid.clone());
    job.metadata.namespace = Some(namespace);
    job.metadata.resource_version = Some(objects.next_version());
    job.metadata.creation_timestamp = Some(now());
    job.metadata.generation = Some(1);
    let spec = job.spec.get_or_insert_with(JobSpec::default);
    spec.parallelism.get_or_insert(1);
    spec.completions.get_or_insert(1);
    spec.backoff_limit.get_or_insert(6);
    spec.suspend.get_or_insert(false);
    spec.completion_mode
        .get_or_insert_with(|| "NonIndexed".into());
    let controller_labels = BTreeMap::from([
        ("batch.kubernetes.io/controller-uid".to_owned(), uid.clone()),
        ("batch.kubernetes.io/job-name".to_owned(), name.clone()),
        ("controller-uid".to_owned(), uid.clone()),
        ("job-name".to_owned(), name.clone()),
    ]);
    spec.selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "batch.kubernetes.io/controller-uid".to_owned(),
            uid,
        )])),
        match_expressions: None,
    });
    spec.template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(controller_labels);
    job.status = Some(JobStatus::default());
    objects.jobs.insert(name, job.clone());
    drop(objects);
    cluster.changed.notify_one();
    json_response(StatusCode::CREATED, &job)
}

async fn list_jobs(
    State(cluster): Shared,
    Path(namespace): Path<String>,
    Query(params): Params,
) -> Response {
    let selector = match list_params(&params) {
        Ok(selector) => selector,
        Err(response) => return response,
    };
    let objects = cluster.objects();
    let items: Vec<&Job> = if namespace == cluster.namespace {
        objects
            .jobs
            .values()
            .filter(|job| matches(&selector, job.metadata.labels.as_ref()))
            .collect()
    } else {
        Vec::new()
    };
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "batch/v1",
            "kind": "JobList",
            "metadata": { "resourceVersion": objects.resource_version.to_string() },
            "items": items,
        }),
    )
}

async fn get_job(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    match cluster.objects().jobs.get(&name) {
        Some(job) => json_response(StatusCode::OK, job),
        None => not_found("jobs", "batch", &name),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(object) = target {
                for (key, value) in fields {
                    if value.is_null() {
                        object.remove(key);
                    } else {
                        merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn patch_job(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/merge-patch+json") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}); this fake serves merge patches only"
            ),
            json!({}),
        );
    }
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(error) => return bad_request(format!("the patch is not JSON: {error}")),
    };
    let mut objects = cluster.objects();
    let Some(stored) = objects.jobs.get(&name).cloned() else {
        return not_found("jobs", "batch", &name);
    };
    let mut value = serde_json::to_value(&stored).unwrap_or(Value::Null);
    merge_patch(&mut value, &patch);
    let mut patched: Job = match serde_json::from_value(value) {
        Ok(job) => job,
        Err(error) => return bad_request(format!("the patched object is not a Job: {error}")),
    };
    if patched.metadata.name != stored.metadata.name || patched.metadata.uid != stored.metadata.uid
    {
        return invalid(
            "Job",
            &name,
            &["metadata: name and uid cannot change".into()],
        );
    }
    let mut causes = Vec::new();
    check_metadata(&patched.metadata, &mut causes);
    if !causes.is_empty() {
        return invalid("Job", &name, &causes);
    }
    // The pod template of a Job cannot change (only scheduling fields of a suspended one).
    let template = |job: &Job| job.spec.as_ref().map(|s| s.template.clone());
    if template(&patched) != template(&stored) {
        return invalid("Job", &name, &["spec.template: field is immutable".into()]);
    }
    patched.metadata.resource_version = Some(objects.next_version());
    objects.jobs.insert(name, patched.clone());
    drop(objects);
    cluster.changed.notify_one();
    json_response(StatusCode::OK, &patched)
}

async fn delete_job(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(options) => options,
            Err(error) => return bad_request(format!("the body is not DeleteOptions: {error}")),
        }
    };
    let policy = options["propagationPolicy"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| params.get("propagationPolicy").cloned());
    let mut objects = cluster.objects();
    let Some(job) = objects.jobs.get(&name).cloned() else {
        return not_found("jobs", "batch", &name);
    };
    if let Some(uid) = options["preconditions"]["uid"].as_str()
        && Some(uid) != job.metadata.uid.as_deref()
    {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on jobs.batch \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                job.metadata.uid.as_deref().unwrap_or_default()
            ),
            json!({ "name": name, "group": "batch", "kind": "jobs" }),
        );
    }
    let uid = job.metadata.uid.clone().unwrap_or_default();
    objects.jobs.remove(&name);
    objects.next_version();
    let owned: Vec<String> = objects
        .pods
        .iter()
        .filter(|(_, pod)| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .map(|(name, _)| name.clone())
        .collect();
    match policy.as_deref() {
        // Kubernetes' default for batch/v1 Jobs: the pods stay, without an owner.
        None | Some("Orphan") => {
            for pod in &owned {
                if let Some(pod) = objects.pods.get_mut(pod) {
                    pod.metadata.owner_references = None;
                }
            }
        }
        Some("Background" | "Foreground") => {
            let removed: Vec<Pod> = owned
                .iter()
                .filter_map(|pod| objects.pods.remove(pod))
                .collect();
            drop(objects);
            for pod in removed {
                cluster.kubelet.forget(&pod);
            }
        }
        Some(other) => {
            return bad_request(format!("unknown propagationPolicy {other}"));
        }
    }
    cluster.changed.notify_one();
    json_response(StatusCode::OK, &job)
}

// ---------------------------------------------------------------------------------------
// Pods.

async fn list_pods(
    State(cluster): Shared,
    Path(namespace): Path<String>,
    Query(params): Params,
) -> Response {
    let selector = match list_params(&params) {
        Ok(selector) => selector,
        Err(response) => return response,
    };
    let objects = cluster.objects();
    let items: Vec<&Pod> = if namespace == cluster.namespace {
        objects
            .pods
            .values()
            .filter(|pod| matches(&selector, pod.metadata.labels.as_ref()))
            .collect()
    } else {
        Vec::new()
    };
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": { "resourceVersion": objects.resource_version.to_string() },
            "items": items,
        }),
    )
}

async fn get_pod(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    match cluster.objects().pods.get(&name) {
        Some(pod) => json_response(StatusCode::OK, pod),
        None => not_found("pods", "", &name),
    }
}

async fn delete_pod(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    let removed = {
        let mut objects = cluster.objects();
        let removed = objects.pods.remove(&name);
        objects.next_version();
        removed
    };
    match removed {
        Some(pod) => {
            cluster.kubelet.forget(&pod);
            cluster.changed.notify_one();
            json_response(StatusCode::OK, &pod)
        }
        None => not_found("pods", "", &name),
    }
}

async fn pod_log(
    State(cluster): Shared,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Params,
) -> Response {
    if let Err(response) = check_namespace(&cluster, &namespace) {
        return response;
    }
    let Some(pod) = cluster.objects().pods.get(&name).cloned() else {
        return not_found("pods", "", &name);
    };
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_default();
    if let Some(asked) = params.get("container")
        && asked != &container
    {
        return bad_request(format!("container {asked} is not valid for pod {name}"));
    }
    let state = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.clone());
    let started = state
        .as_ref()
        .is_some_and(|s| s.running.is_some() || s.terminated.is_some());
    if !started {
        let reason = state
            .and_then(|s| s.waiting)
            .and_then(|w| w.reason)
            .unwrap_or_else(|| "ContainerCreating".into());
        return bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        ));
    }
    let tail = match params.get("tailLines").map(|t| t.parse::<u32>()) {
        None => None,
        Some(Ok(tail)) => Some(tail),
        Some(Err(_)) => return bad_request("tailLines must be a number".into()),
    };
    let follow = params
        .get("follow")
        .is_some_and(|f| f == "true" || f == "1");
    match cluster.kubelet.logs(&name, tail, follow).await {
        Ok(stream) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Err(error) => status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("fake kubelet: reading the log of {name}: {error}"),
            json!({}),
        ),
    }
}

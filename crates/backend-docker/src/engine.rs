//! What the docker and swarm backends share of talking to one Docker-API engine: the words
//! of its errors, and getting an image onto it under a pull policy.

use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::CreateImageOptions;
use dispatch_manager::BackendError;
use futures::TryStreamExt;

use crate::config::PullPolicy;
use crate::is_image_reference;
use crate::spec::pull_reference;

/// How long connecting (and negotiating the API version) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an engine is, and how to name it and its setting in messages.
#[derive(Debug, Clone, Copy)]
pub struct EngineAddress<'a> {
    /// `unix:///path`, `/path`, `tcp://host:port` or `http://host:port`.
    pub host: &'a str,
    /// What the engine is called in messages (`Docker`, `Podman`).
    pub kind: &'a str,
    /// The config table whose `host` names it (`docker`, `swarm`).
    pub table: &'static str,
    /// That setting, as a refusal names it (`docker.host`).
    pub host_field: &'static str,
}

/// Connects to the engine and agrees on an API version both sides speak (Docker 20.10
/// speaks 1.41, older than bollard's default), within [`CONNECT_TIMEOUT`]; the error says
/// what to check.
pub async fn connect(address: EngineAddress<'_>) -> Result<Docker, BackendError> {
    let EngineAddress {
        host,
        kind,
        table,
        host_field,
    } = address;
    let url = if host.starts_with('/') {
        format!("unix://{host}")
    } else {
        host.to_owned()
    };
    let unreachable = |why: String| {
        BackendError::Engine(format!(
            "cannot reach the {kind} engine at {host}: {why}; check that the engine runs, \
             that this user may open its socket, and the [{table}] host setting (or \
             DOCKER_HOST)"
        ))
    };
    let docker = Docker::connect_with_host(&url).map_err(|error| match error {
        DockerError::UnsupportedURISchemeError { .. } => BackendError::Unsupported {
            field: host_field,
            reason: format!(
                "`{host}` is not an engine address this build supports: use \
                 unix:///path/to/socket, tcp://host:port or http://host:port"
            ),
        },
        other => unreachable(describe(&other)),
    })?;
    tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| unreachable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|error| unreachable(describe(&error)))
}

/// The HTTP status the engine answered with, if it answered.
pub fn status_code(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// An error with its chain of causes: hyper's own message ("client error (Connect)") says
/// little without them.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A failed engine call as a [`BackendError`], saying what was being done and whether the
/// engine at `host` answered at all.
pub fn engine_error(host: &str, action: &str, error: &DockerError) -> BackendError {
    match error {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => BackendError::Engine(format!(
            "{action}: the engine answered {status_code}: {message}"
        )),
        DockerError::RequestTimeoutError => BackendError::Engine(format!(
            "{action}: the engine at {host} did not answer in time"
        )),
        other => BackendError::Engine(format!(
            "{action}: cannot talk to the engine at {host}: {}",
            describe(other)
        )),
    }
}

/// How an image is got onto an engine: the backend's pull policy and timeout, and the name
/// of its config table, for messages that say which setting to change.
#[derive(Debug, Clone, Copy)]
pub struct ImagePolicy<'a> {
    /// When to pull.
    pub pull: PullPolicy,
    /// Longest a pull may take.
    pub timeout: Duration,
    /// `docker` or `swarm`.
    pub table: &'a str,
}

/// Makes sure the engine at `host` has `image`, pulling it as `policy` allows. An image the
/// engine has is used without asking any registry (unless the policy is `always`); one it
/// cannot get is [`BackendError::ImageNotFound`], promptly.
pub async fn ensure_image(
    docker: &Docker,
    host: &str,
    image: &str,
    policy: ImagePolicy<'_>,
) -> Result<(), BackendError> {
    let not_found = |reason: String| BackendError::ImageNotFound {
        image: image.to_owned(),
        reason,
    };
    if !is_image_reference(image) {
        return Err(not_found("not a valid image reference".into()));
    }
    if policy.pull != PullPolicy::Always {
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(error) if status_code(&error) == Some(404) => {}
            Err(error) => {
                return Err(engine_error(
                    host,
                    &format!("inspecting image `{image}`"),
                    &error,
                ));
            }
        }
        if policy.pull == PullPolicy::Never {
            return Err(not_found(format!(
                "the engine at {host} does not have it, and [{}] pull_policy is `never`",
                policy.table
            )));
        }
    }
    let (from_image, tag) = pull_reference(image);
    let options = CreateImageOptions {
        from_image: Some(from_image),
        tag,
        ..CreateImageOptions::default()
    };
    tracing::info!(
        image,
        timeout_seconds = policy.timeout.as_secs(),
        "pulling image"
    );
    // Dropping the stream closes the request, which makes the engine cancel the pull.
    let pull = docker
        .create_image(Some(options), None, None)
        .try_for_each(|_| async { Ok(()) });
    match tokio::time::timeout(policy.timeout, pull).await {
        Ok(Ok(())) => Ok(()),
        Err(_) => Err(not_found(format!(
            "the pull did not finish within {} s ([{}] pull_timeout_seconds)",
            policy.timeout.as_secs(),
            policy.table
        ))),
        // The engine answered: the registry or the image is not to be had.
        Ok(Err(DockerError::DockerResponseServerError { message, .. })) => {
            Err(not_found(format!("pull failed: {message}")))
        }
        Ok(Err(DockerError::DockerStreamError { error })) => {
            Err(not_found(format!("pull failed: {error}")))
        }
        Ok(Err(error)) => Err(engine_error(
            host,
            &format!("pulling image `{image}`"),
            &error,
        )),
    }
}

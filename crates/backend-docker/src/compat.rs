//! Podman's Docker-compatible API, read as Docker's.
//!
//! Podman 4.3 (Debian 12) answers a container inspect with its own state names where
//! Docker's enumeration has none (`stopped` for an exited container, `configured` and
//! `initialized` before the start), which bollard's typed models refuse outright. bollard
//! hands back the whole body with such an error (feature `json_data_content`): the
//! functions here map those states onto Docker's and read the body again.

use bollard::errors::Error as DockerError;
use bollard::models::ContainerInspectResponse;
use serde_json::Value;

/// Docker's name for a state Podman reports, or `None` when it is already Docker's.
fn docker_status(status: &str) -> Option<&'static str> {
    match status {
        // Exited and cleaned up: Docker's `exited`, exit code and all.
        "stopped" => Some("exited"),
        // Created, not yet started (`initialized`: the runtime has it, not yet running).
        "configured" | "initialized" => Some("created"),
        "created" | "running" | "paused" | "restarting" | "removing" | "exited" | "dead"
        | "stopping" | "" => None,
        // Anything newer: unknown, which is reported as LOST rather than not read at all.
        _ => Some(""),
    }
}

/// The inspect body that `error` carries, read after mapping Podman's states; `None` when
/// `error` is not a body bollard could not read, or the body is not an inspect.
pub(crate) fn inspect_from_error(error: &DockerError) -> Option<ContainerInspectResponse> {
    let DockerError::JsonDataError { contents, .. } = error else {
        return None;
    };
    let mut body: Value = serde_json::from_str(contents).ok()?;
    normalise_state(body.get_mut("State")?);
    serde_json::from_value(body).ok()
}

/// The container ids of a container list body that `error` carries (Podman may give a
/// state in the list that bollard cannot read).
pub(crate) fn ids_from_error(error: &DockerError) -> Option<Vec<String>> {
    let DockerError::JsonDataError { contents, .. } = error else {
        return None;
    };
    let body: Vec<Value> = serde_json::from_str(contents).ok()?;
    Some(
        body.iter()
            .filter_map(|container| container.get("Id")?.as_str().map(str::to_owned))
            .collect(),
    )
}

fn normalise_state(state: &mut Value) {
    let docker = state
        .get("Status")
        .and_then(Value::as_str)
        .and_then(docker_status);
    if let (Some(docker), Some(object)) = (docker, state.as_object_mut()) {
        object.insert("Status".into(), Value::from(docker));
    }
}

/// Whether a failed create says the name is taken: Docker answers 409, Podman 500 with
/// "is already in use".
pub(crate) fn is_name_conflict(error: &DockerError) -> bool {
    match error {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => *status_code == 409 || message.contains("already in use"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::ContainerStateStatusEnum;

    use super::*;

    fn unreadable(body: &str) -> DockerError {
        DockerError::JsonDataError {
            message: "unknown variant".into(),
            column: 0,
            contents: body.into(),
        }
    }

    #[test]
    fn podman_states_read_as_dockers() {
        let cases = [
            ("stopped", ContainerStateStatusEnum::EXITED),
            ("configured", ContainerStateStatusEnum::CREATED),
            ("initialized", ContainerStateStatusEnum::CREATED),
            ("running", ContainerStateStatusEnum::RUNNING),
            ("something-new", ContainerStateStatusEnum::EMPTY),
        ];
        for (podman, docker) in cases {
            let body = format!(
                r#"{{"Id":"abc","Name":"/job-1","State":{{"Status":"{podman}","ExitCode":3}}}}"#
            );
            let inspect = inspect_from_error(&unreadable(&body)).unwrap();
            let state = inspect.state.unwrap();
            assert_eq!(state.status, Some(docker), "{podman}");
            assert_eq!(state.exit_code, Some(3));
        }
        assert!(inspect_from_error(&unreadable("not json")).is_none());
        assert!(inspect_from_error(&DockerError::RequestTimeoutError).is_none());
    }

    #[test]
    fn list_ids_survive_unknown_states() {
        let body = r#"[{"Id":"a","State":"stopped"},{"Id":"b","State":"running"},{"Names":[]}]"#;
        assert_eq!(ids_from_error(&unreadable(body)).unwrap(), ["a", "b"]);
    }

    #[test]
    fn name_conflicts_are_recognised_on_both_engines() {
        let answer = |status_code, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.into(),
        };
        assert!(is_name_conflict(&answer(
            409,
            "Conflict. The container name is already in use"
        )));
        assert!(is_name_conflict(&answer(
            500,
            "the container name \"x\" is already in use by 2bc7"
        )));
        assert!(!is_name_conflict(&answer(500, "no space left on device")));
    }
}

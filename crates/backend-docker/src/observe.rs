//! What `GET /containers/{id}/json` says, in the suite's terms: pure, so each state is
//! checked by unit tests without an engine.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use dispatch_manager::Observed;
use dispatch_manager::backend::labels;
use dispatch_proto::job::JobId;
use dispatch_proto::v1::{JobState, ReasonCode};

/// The exit code of a process killed by SIGKILL, which is how the kernel's OOM killer ends
/// a container.
const SIGKILL_EXIT_CODE: i32 = 137;

/// Whether labels mark a container as created by the suite for this manager.
pub(crate) fn is_owned(labels: Option<&HashMap<String, String>>, manager_id: &str) -> bool {
    labels.is_some_and(|labels| {
        labels.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGED_BY_VALUE)
            && labels.get(labels::MANAGER_ID).map(String::as_str) == Some(manager_id)
    })
}

/// The container's name without Docker's leading `/`.
pub(crate) fn container_name(inspect: &ContainerInspectResponse) -> Option<&str> {
    inspect
        .name
        .as_deref()
        .map(|name| name.trim_start_matches('/'))
}

/// What the engine says of the job, or `None` when the container's name is no job id.
///
/// An exit code of 137 (SIGKILL) under a memory limit is read as an out-of-memory kill
/// even when the engine's `OOMKilled` flag is false, unless `killed_by_us` says this
/// backend sent the signal: Podman never sets the flag, and dockerd 20.10 on cgroup v1
/// misses it now and then (seen: 1 run in 30 of the same memory hog, for good, when the
/// kernel's OOM event reaches it after the exit).
pub(crate) fn observe(inspect: &ContainerInspectResponse, killed_by_us: bool) -> Option<Observed> {
    let name = container_name(inspect)?;
    let job_id = JobId::parse(name).ok()?;
    let outcome = outcome(inspect, killed_by_us);
    let state = inspect.state.as_ref();
    let config = inspect.config.as_ref();
    let command = config
        .map(|config| {
            let entrypoint = config.entrypoint.iter().flatten();
            entrypoint
                .chain(config.cmd.iter().flatten())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let finished_at = state
        .and_then(|s| s.finished_at.as_deref())
        .and_then(parse_time);
    // Docker records StartedAt once the runtime's start call returns, which for a job of a
    // few milliseconds can be after the exit it has already recorded: the job cannot have
    // started after it finished.
    let started_at = state
        .and_then(|s| s.started_at.as_deref())
        .and_then(parse_time)
        .map(|started| finished_at.map_or(started, |finished| started.min(finished)));
    Some(Observed {
        job_id,
        state: outcome.state,
        reason: outcome.reason,
        exit_code: outcome.exit_code,
        message: outcome.message,
        image: config.and_then(|c| c.image.clone()).unwrap_or_default(),
        command,
        started_at,
        finished_at,
        backend_name: name.to_owned(),
        labels: config
            .and_then(|c| c.labels.as_ref())
            .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
    })
}

struct Outcome {
    state: JobState,
    reason: ReasonCode,
    exit_code: Option<i32>,
    message: String,
}

fn outcome(inspect: &ContainerInspectResponse, killed_by_us: bool) -> Outcome {
    let state = inspect.state.clone().unwrap_or_default();
    let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
    let exit_code = state.exit_code.and_then(|code| i32::try_from(code).ok());
    let error = state.error.filter(|error| !error.is_empty());
    let oom_flag = state.oom_killed == Some(true);
    let memory_limited = inspect
        .host_config
        .as_ref()
        .and_then(|host| host.memory)
        .is_some_and(|bytes| bytes > 0);

    let mut message = match status {
        ContainerStateStatusEnum::EMPTY => "unknown".to_owned(),
        status => status.to_string(),
    };
    if let Some(error) = &error {
        message.push_str(": ");
        message.push_str(error);
    }
    let outcome = |state, reason, exit_code, message| Outcome {
        state,
        reason,
        exit_code,
        message,
    };
    use ContainerStateStatusEnum as S;
    match status {
        // A container whose start failed stays `created`, with the runtime's error and an
        // exit code (127: executable not found, 126: not executable): it will never run.
        S::CREATED if error.is_some() => outcome(
            JobState::Failed,
            ReasonCode::BackendError,
            exit_code.filter(|&code| code != 0),
            message,
        ),
        S::CREATED => outcome(JobState::Queued, ReasonCode::Unspecified, None, message),
        // Restarting cannot happen with restart policy `no`; stopping is Podman's state
        // between a stop request and the exit.
        S::RUNNING | S::PAUSED | S::RESTARTING | S::STOPPING => {
            outcome(JobState::Running, ReasonCode::Unspecified, None, message)
        }
        S::EXITED => match exit_code {
            // Docker's flag is only trusted once the container has exited: it is also set
            // when the OOM killer ended a child while the main process survived.
            Some(code) if oom_flag => {
                message.push_str(" (OOMKilled)");
                outcome(JobState::Failed, ReasonCode::OomKilled, Some(code), message)
            }
            // The flag is unreliable (see `observe`).
            Some(SIGKILL_EXIT_CODE) if memory_limited && !killed_by_us => {
                message.push_str(" (exit code 137 under a memory limit: taken as OOMKilled)");
                outcome(
                    JobState::Failed,
                    ReasonCode::OomKilled,
                    Some(SIGKILL_EXIT_CODE),
                    message,
                )
            }
            Some(0) => outcome(JobState::Succeeded, ReasonCode::ExitCode, Some(0), message),
            Some(code) => outcome(JobState::Failed, ReasonCode::ExitCode, Some(code), message),
            None => {
                message.push_str(" (no exit code)");
                outcome(JobState::Lost, ReasonCode::BackendError, None, message)
            }
        },
        // `dead`: the engine failed to remove or stop it; `removing`: on its way out; an
        // empty status: the engine cannot say.
        S::DEAD | S::REMOVING | S::EMPTY => {
            outcome(JobState::Lost, ReasonCode::BackendError, exit_code, message)
        }
    }
}

/// Reads an RFC 3339 time as the engine writes it (`2024-05-01T10:00:00.123456789Z`,
/// Podman may give an offset instead of `Z`). Docker's zero time (`0001-01-01T00:00:00Z`,
/// "never") and anything before 1970 or unreadable give `None`.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let separator =
        |at: usize, expected: &[u8]| bytes.get(at).is_some_and(|b| expected.contains(b));
    let separators = [
        (4, b"-" as &[u8]),
        (7, b"-"),
        (10, b"Tt "),
        (13, b":"),
        (16, b":"),
    ];
    if !separators
        .iter()
        .all(|&(at, expected)| separator(at, expected))
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let in_range = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 60;
    if !in_range {
        return None;
    }
    let mut at = 19;
    let mut nanos: u32 = 0;
    if bytes.get(at) == Some(&b'.') {
        let start = at + 1;
        let mut end = start;
        while bytes.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return None;
        }
        // Keep nanosecond precision; more digits than that are dropped.
        let digits = &text[start..end.min(start + 9)];
        let scale = 10u32.pow(9 - u32::try_from(digits.len()).ok()?);
        nanos = digits.parse::<u32>().ok()? * scale;
        at = end;
    }
    let offset_seconds = match bytes.get(at) {
        Some(b'Z' | b'z') if at + 1 == bytes.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == bytes.len() && separator(at + 3, b":") => {
            let hours = number(at + 1..at + 3)?;
            let minutes = number(at + 4..at + 6)?;
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let seconds = u64::try_from(seconds).ok()?;
    if seconds == 0 && nanos == 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerConfig, ContainerState, HostConfig};

    use super::*;

    fn container(status: ContainerStateStatusEnum, exit_code: i64) -> ContainerInspectResponse {
        ContainerInspectResponse {
            name: Some("/chris-jid-7".into()),
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(exit_code),
                oom_killed: Some(false),
                started_at: Some("2024-05-01T10:00:00.5Z".into()),
                finished_at: Some("0001-01-01T00:00:00Z".into()),
                ..ContainerState::default()
            }),
            config: Some(ContainerConfig {
                image: Some("localhost/x:1".into()),
                entrypoint: Some(vec!["sh".into()]),
                cmd: Some(vec!["-c".into(), "exit 3".into()]),
                labels: Some(HashMap::from([
                    (
                        labels::MANAGED_BY.to_owned(),
                        labels::MANAGED_BY_VALUE.to_owned(),
                    ),
                    (labels::MANAGER_ID.to_owned(), "m1".to_owned()),
                ])),
                ..ContainerConfig::default()
            }),
            host_config: Some(HostConfig {
                memory: Some(32 << 20),
                ..HostConfig::default()
            }),
            ..ContainerInspectResponse::default()
        }
    }

    fn observed(inspect: &ContainerInspectResponse) -> Observed {
        observe(inspect, false).unwrap()
    }

    #[test]
    fn states_map_as_pfcon_maps_them() {
        use ContainerStateStatusEnum as S;
        let cases = [
            (
                S::CREATED,
                0,
                JobState::Queued,
                ReasonCode::Unspecified,
                None,
            ),
            (
                S::RUNNING,
                0,
                JobState::Running,
                ReasonCode::Unspecified,
                None,
            ),
            (
                S::PAUSED,
                0,
                JobState::Running,
                ReasonCode::Unspecified,
                None,
            ),
            (
                S::RESTARTING,
                0,
                JobState::Running,
                ReasonCode::Unspecified,
                None,
            ),
            (
                S::EXITED,
                0,
                JobState::Succeeded,
                ReasonCode::ExitCode,
                Some(0),
            ),
            (
                S::EXITED,
                3,
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(3),
            ),
            (
                S::EXITED,
                1,
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(1),
            ),
            (
                S::DEAD,
                0,
                JobState::Lost,
                ReasonCode::BackendError,
                Some(0),
            ),
            (
                S::REMOVING,
                0,
                JobState::Lost,
                ReasonCode::BackendError,
                Some(0),
            ),
        ];
        for (status, code, state, reason, exit_code) in cases {
            let seen = observed(&container(status, code));
            assert_eq!(
                (seen.state, seen.reason, seen.exit_code),
                (state, reason, exit_code),
                "{status}"
            );
            assert_eq!(seen.message, status.to_string());
        }
    }

    #[test]
    fn the_record_carries_what_was_run() {
        let seen = observed(&container(ContainerStateStatusEnum::EXITED, 3));
        assert_eq!(seen.job_id.as_str(), "chris-jid-7");
        assert_eq!(seen.backend_name, "chris-jid-7");
        assert_eq!(seen.image, "localhost/x:1");
        assert_eq!(seen.command, ["sh", "-c", "exit 3"]);
        assert_eq!(
            seen.labels.get(labels::MANAGER_ID).map(String::as_str),
            Some("m1")
        );
        assert_eq!(
            seen.started_at,
            Some(UNIX_EPOCH + Duration::new(1_714_557_600, 500_000_000))
        );
        assert_eq!(seen.finished_at, None);
    }

    #[test]
    fn a_job_never_starts_after_it_finished() {
        let mut inspect = container(ContainerStateStatusEnum::EXITED, 0);
        if let Some(state) = inspect.state.as_mut() {
            state.started_at = Some("2024-05-01T10:00:00.5Z".into());
            state.finished_at = Some("2024-05-01T10:00:00.4Z".into());
        }
        let seen = observed(&inspect);
        assert_eq!(seen.started_at, seen.finished_at);
        assert!(seen.started_at.is_some());
    }

    #[test]
    fn oom_flag_fails_with_oom_killed() {
        let mut inspect = container(ContainerStateStatusEnum::EXITED, 137);
        if let Some(state) = inspect.state.as_mut() {
            state.oom_killed = Some(true);
        }
        let seen = observed(&inspect);
        assert_eq!(
            (seen.state, seen.reason, seen.exit_code),
            (JobState::Failed, ReasonCode::OomKilled, Some(137))
        );
        assert_eq!(seen.message, "exited (OOMKilled)");
        // Still running after a child was OOM-killed: running.
        if let Some(state) = inspect.state.as_mut() {
            state.status = Some(ContainerStateStatusEnum::RUNNING);
        }
        assert_eq!(observed(&inspect).state, JobState::Running);
    }

    #[test]
    fn exit_137_under_a_memory_limit_is_oom_unless_we_killed_it() {
        let inspect = container(ContainerStateStatusEnum::EXITED, 137);
        let seen = observe(&inspect, false).unwrap();
        assert_eq!(
            (seen.state, seen.reason, seen.exit_code),
            (JobState::Failed, ReasonCode::OomKilled, Some(137))
        );
        assert!(
            seen.message.contains("taken as OOMKilled"),
            "{}",
            seen.message
        );
        let killed = observe(&inspect, true).unwrap();
        assert_eq!(
            (killed.reason, killed.exit_code),
            (ReasonCode::ExitCode, Some(137))
        );
        let mut unlimited = inspect.clone();
        unlimited.host_config = Some(HostConfig::default());
        assert_eq!(
            observe(&unlimited, false).unwrap().reason,
            ReasonCode::ExitCode
        );
    }

    #[test]
    fn a_failed_start_is_a_failure_with_the_runtime_error() {
        let mut inspect = container(ContainerStateStatusEnum::CREATED, 127);
        if let Some(state) = inspect.state.as_mut() {
            state.error = Some("exec: \"nope\": executable file not found in $PATH".into());
        }
        let seen = observed(&inspect);
        assert_eq!(
            (seen.state, seen.reason, seen.exit_code),
            (JobState::Failed, ReasonCode::BackendError, Some(127))
        );
        assert!(
            seen.message.starts_with("created: exec: \"nope\""),
            "{}",
            seen.message
        );
    }

    #[test]
    fn ownership_needs_both_labels() {
        let inspect = container(ContainerStateStatusEnum::RUNNING, 0);
        let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
        assert!(is_owned(labels, "m1"));
        assert!(!is_owned(labels, "m2"));
        assert!(!is_owned(None, "m1"));
        let mut other = labels.cloned().unwrap_or_default();
        other.insert(labels::MANAGED_BY.into(), "someone-else".into());
        assert!(!is_owned(Some(&other), "m1"));
    }

    #[test]
    fn a_name_that_is_no_job_id_is_skipped() {
        let mut inspect = container(ContainerStateStatusEnum::RUNNING, 0);
        inspect.name = Some("/.hidden".into());
        assert!(observe(&inspect, false).is_none());
    }

    #[test]
    fn times_parse_with_fractions_and_offsets() {
        let at = |s, n| Some(UNIX_EPOCH + Duration::new(s, n));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), at(1, 0));
        assert_eq!(
            parse_time("2024-02-29T23:59:59.123456789Z"),
            at(1_709_251_199, 123_456_789)
        );
        assert_eq!(
            parse_time("2024-02-29T23:59:59.1234567891Z"),
            at(1_709_251_199, 123_456_789)
        );
        assert_eq!(
            parse_time("2024-03-01T01:59:59+02:00"),
            at(1_709_251_199, 0)
        );
        assert_eq!(
            parse_time("2024-02-29T21:29:59-02:30"),
            at(1_709_251_199, 0)
        );
        assert_eq!(parse_time("2000-01-01T00:00:00Z"), at(946_684_800, 0));
        for never in [
            "0001-01-01T00:00:00Z",
            "",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "garbage",
        ] {
            assert_eq!(parse_time(never), None, "{never}");
        }
    }
}

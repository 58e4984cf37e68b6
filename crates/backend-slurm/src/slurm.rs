//! Slurm's command-line tools: running them (bounded, never through a shell) and reading
//! what they print, then mapping a Slurm job state to the suite's terms.
//!
//! Every tool runs with `SLURM_TIME_FORMAT=%s`, so times come as seconds since the epoch,
//! whatever the site's time zone. Parsers take any text: odd output gives `None` or an
//! error naming the command, never a panic.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispatch_manager::BackendError;
use dispatch_proto::v1::{JobState, ReasonCode};

use crate::config::SlurmConfig;

/// `squeue`'s format: fields whose values we control or that hold no `|` first, the free
/// text reason last.
pub(crate) const SQUEUE_FORMAT: &str = "%i|%T|%S|%e|%j|%k|%r";

/// The exit code a process killed by SIGKILL shows (128 + 9), as from a shell or Docker.
pub(crate) const SIGKILL_EXIT_CODE: i32 = 137;

/// Runs Slurm's tools as configured.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    config: std::sync::Arc<SlurmConfig>,
}

/// What one run of a tool gave.
#[derive(Debug)]
pub(crate) struct Ran {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Tools {
    pub(crate) fn new(config: std::sync::Arc<SlurmConfig>) -> Self {
        Self { config }
    }

    /// Runs `tool` with `args`, within the configured timeout, and returns what it said
    /// whatever its exit status.
    pub(crate) async fn run_raw(&self, tool: &str, args: &[String]) -> Result<Ran, BackendError> {
        let program = self.config.tool(tool);
        let mut command = tokio::process::Command::new(&program);
        command
            .args(args)
            .env("SLURM_TIME_FORMAT", "%s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(conf) = &self.config.slurm_conf {
            command.env("SLURM_CONF", conf);
        }
        let timeout = Duration::from_secs(self.config.command_timeout_seconds);
        let shown = show_command(tool, args);
        let child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                BackendError::Engine(format!(
                    "`{}` was not found: install Slurm's client tools on this host (Debian: \
                     slurm-client), or point [slurm] bin_dir at them",
                    program.display()
                ))
            } else {
                BackendError::Engine(format!("cannot run `{shown}`: {error}"))
            }
        })?;
        let output = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                BackendError::Engine(format!(
                    "`{shown}` did not answer within {} s: is slurmctld up? ([slurm] \
                     command_timeout_seconds)",
                    timeout.as_secs()
                ))
            })?
            .map_err(|error| BackendError::Engine(format!("`{shown}` failed: {error}")))?;
        Ok(Ran {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    /// Runs `tool` and returns its stdout, or an error naming the command and what it said.
    pub(crate) async fn run(&self, tool: &str, args: &[String]) -> Result<String, BackendError> {
        let ran = self.run_raw(tool, args).await?;
        if ran.success {
            Ok(ran.stdout)
        } else {
            Err(failed(tool, args, &ran))
        }
    }
}

/// The error for a tool that exited non-zero.
pub(crate) fn failed(tool: &str, args: &[String], ran: &Ran) -> BackendError {
    let said = if ran.stderr.is_empty() {
        ran.stdout.trim()
    } else {
        ran.stderr.as_str()
    };
    let mut hint = "";
    if said.contains("Unable to contact slurm controller")
        || said.contains("Zero Bytes were transmitted")
        || said.contains("Connection refused")
    {
        hint = " (is slurmctld running, and does SLURM_CONF or [slurm] slurm_conf name its slurm.conf?)";
    } else if said.to_ascii_lowercase().contains("munge") {
        hint = " (is munged running with the cluster's key?)";
    }
    BackendError::Engine(format!(
        "`{}` failed (exit {}): {said}{hint}",
        show_command(tool, args),
        ran.code
            .map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
    ))
}

fn show_command(tool: &str, args: &[String]) -> String {
    let mut shown = tool.to_owned();
    for arg in args {
        shown.push(' ');
        shown.push_str(arg);
    }
    shown
}

/// One Slurm job as `squeue`, `scontrol` or `sacct` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SlurmJob {
    /// Slurm's job id.
    pub id: String,
    /// The base state (`PENDING`, `RUNNING`, `TIMEOUT`...), without flags or `by <uid>`.
    pub state: String,
    /// Slurm's reason (`Resources`, `NonZeroExitCode`, `None`...).
    pub reason: String,
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
    pub name: String,
    pub comment: String,
    /// `ExitCode=code:signal`, where the tool says it.
    pub exit: Option<(i32, i32)>,
}

/// Seconds since the epoch as the tools print them with `SLURM_TIME_FORMAT=%s`; `N/A`,
/// `Unknown`, `None` and 0 are no time.
pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    let seconds: u64 = text.trim().parse().ok()?;
    (seconds > 0).then(|| UNIX_EPOCH + Duration::from_secs(seconds))
}

/// The first word of a state, upper case: scontrol and sacct may add `by <uid>` or flags.
fn base_state(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches('+')
        .to_ascii_uppercase()
}

/// `3:0` -> (3, 0).
pub(crate) fn parse_exit(text: &str) -> Option<(i32, i32)> {
    let (code, signal) = text.trim().split_once(':')?;
    Some((code.parse().ok()?, signal.parse().ok()?))
}

/// One line of `squeue --format` [`SQUEUE_FORMAT`].
pub(crate) fn parse_squeue_line(line: &str) -> Option<SlurmJob> {
    let mut fields = line.splitn(7, '|');
    let id = fields.next()?.trim();
    if id.is_empty() {
        return None;
    }
    let state = base_state(fields.next()?);
    let start = parse_time(fields.next()?);
    let end = parse_time(fields.next()?);
    let name = fields.next()?.trim().to_owned();
    let comment = fields.next()?.trim().to_owned();
    let reason = fields.next().unwrap_or("").trim().to_owned();
    Some(SlurmJob {
        id: id.to_owned(),
        state,
        reason,
        start,
        end,
        name,
        comment,
        exit: None,
    })
}

/// `key=value` pairs of `scontrol --oneliner show job`. A word without `=` belongs to the
/// value before it (reasons and paths may hold spaces); the first occurrence of a key wins.
pub(crate) fn parse_scontrol_pairs(text: &str) -> HashMap<String, String> {
    let mut pairs: HashMap<String, String> = HashMap::new();
    let mut last: Option<String> = None;
    for word in text.split_whitespace() {
        let key_value = word.split_once('=').filter(|(key, _)| {
            !key.is_empty()
                && key.starts_with(|c: char| c.is_ascii_alphabetic())
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | ':'))
        });
        match key_value {
            Some((key, value)) => {
                if pairs.contains_key(key) {
                    last = None;
                } else {
                    pairs.insert(key.to_owned(), value.to_owned());
                    last = Some(key.to_owned());
                }
            }
            None => {
                if let Some(value) = last.as_ref().and_then(|key| pairs.get_mut(key)) {
                    value.push(' ');
                    value.push_str(word);
                }
            }
        }
    }
    pairs
}

/// `scontrol --oneliner show job <id>`, one job.
pub(crate) fn parse_scontrol(text: &str) -> Option<SlurmJob> {
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("JobId="))?;
    let pairs = parse_scontrol_pairs(line);
    let get = |key: &str| pairs.get(key).map(String::as_str).unwrap_or("");
    let id = get("JobId");
    if id.is_empty() {
        return None;
    }
    let comment = match get("Comment") {
        "(null)" => "",
        other => other,
    };
    Some(SlurmJob {
        id: id.to_owned(),
        state: base_state(get("JobState")),
        reason: get("Reason").to_owned(),
        start: parse_time(get("StartTime")),
        end: parse_time(get("EndTime")),
        name: get("JobName").to_owned(),
        comment: comment.to_owned(),
        exit: parse_exit(get("ExitCode")),
    })
}

/// `sacct --parsable2 --noheader --allocations --format=JobID,State,ExitCode,Start,End,JobName,Comment`.
pub(crate) fn parse_sacct(text: &str, slurm_id: &str) -> Option<SlurmJob> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split('|').collect();
        if fields.len() < 7 || fields[0].trim() != slurm_id {
            return None;
        }
        Some(SlurmJob {
            id: slurm_id.to_owned(),
            state: base_state(fields[1]),
            reason: String::new(),
            exit: parse_exit(fields[2]),
            start: parse_time(fields[3]),
            end: parse_time(fields[4]),
            name: fields[5].trim().to_owned(),
            comment: fields[6..].join("|").trim().to_owned(),
        })
    })
}

/// `sbatch --parsable` prints `<id>` or `<id>;<cluster>`.
pub(crate) fn parse_sbatch(stdout: &str) -> Option<String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())?;
    let id = line.split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit() || c == '_')).then(|| id.to_owned())
}

/// What the job's own files say of its end (see `script.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EndFiles {
    /// The plugin's exit code, when the script wrote it.
    pub exit_code: Option<i32>,
    /// The runtime flagged an OOM kill of the container.
    pub oom: bool,
}

/// A Slurm job's state in the suite's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub state: JobState,
    pub reason: ReasonCode,
    pub exit_code: Option<i32>,
    pub message: String,
}

/// True for the Slurm states after which a job can change no more.
pub(crate) fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "DEADLINE"
            | "OUT_OF_MEMORY"
            | "NODE_FAIL"
            | "BOOT_FAIL"
            | "PREEMPTED"
            | "SPECIAL_EXIT"
            | "REVOKED"
    )
}

/// Maps a Slurm state. `files`: the job's exit and OOM files; `runtime_limits_memory`: the
/// container runtime applies the memory limit itself (Docker, Podman), so an exit code of
/// 137 from a job Slurm did not stop is taken for an OOM kill (Podman never flags one).
pub(crate) fn outcome(job: &SlurmJob, files: EndFiles, runtime_limits_memory: bool) -> Outcome {
    // A real signal N shows as 128 + N; Slurm also puts its own numbers there (125 after
    // an OOM kill), which are no exit code.
    let slurm_code = job.exit.and_then(|(code, signal)| match signal {
        0 => Some(code),
        1..=64 => Some(128 + signal),
        _ => None,
    });
    let exit_code = files.exit_code.or(slurm_code);
    let mut message = job.state.clone();
    let reason_shown = !job.reason.is_empty() && job.reason != "None";
    if reason_shown {
        message.push_str(&format!(" ({})", job.reason));
    }
    let out = |state, reason, exit_code, message| Outcome {
        state,
        reason,
        exit_code,
        message,
    };
    match job.state.as_str() {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
        | "CONFIGURING" => out(JobState::Queued, ReasonCode::Unspecified, None, message),
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "STAGE_OUT"
        | "RESIZING" => out(JobState::Running, ReasonCode::Unspecified, None, message),
        "COMPLETED" => match exit_code {
            Some(0) | None => out(JobState::Succeeded, ReasonCode::ExitCode, Some(0), message),
            Some(code) => out(JobState::Failed, ReasonCode::ExitCode, Some(code), message),
        },
        "FAILED" | "SPECIAL_EXIT" => match exit_code {
            Some(code) if files.oom => {
                message.push_str(", the runtime reports OOMKilled");
                out(JobState::Failed, ReasonCode::OomKilled, Some(code), message)
            }
            Some(SIGKILL_EXIT_CODE) if runtime_limits_memory => {
                message.push_str(", exit code 137 under a memory limit: taken as OOMKilled");
                out(
                    JobState::Failed,
                    ReasonCode::OomKilled,
                    Some(SIGKILL_EXIT_CODE),
                    message,
                )
            }
            Some(code) => out(JobState::Failed, ReasonCode::ExitCode, Some(code), message),
            None => out(JobState::Failed, ReasonCode::BackendError, None, message),
        },
        "OUT_OF_MEMORY" => out(
            JobState::Failed,
            ReasonCode::OomKilled,
            Some(
                files
                    .exit_code
                    .filter(|&c| c != 0)
                    .unwrap_or(SIGKILL_EXIT_CODE),
            ),
            message,
        ),
        "TIMEOUT" | "DEADLINE" => out(JobState::Failed, ReasonCode::TimeLimit, exit_code, message),
        "CANCELLED" => out(JobState::Failed, ReasonCode::Cancelled, exit_code, message),
        "NODE_FAIL" | "BOOT_FAIL" => {
            out(JobState::Failed, ReasonCode::NodeFail, exit_code, message)
        }
        "PREEMPTED" => out(JobState::Failed, ReasonCode::Preempted, exit_code, message),
        "REVOKED" => out(JobState::Lost, ReasonCode::BackendError, exit_code, message),
        // A state this build does not know: not ended as far as anyone can tell.
        _ if job.start.is_some() => {
            message.push_str(" (a Slurm state this backend does not know)");
            out(JobState::Running, ReasonCode::Unspecified, None, message)
        }
        _ => {
            message.push_str(" (a Slurm state this backend does not know)");
            out(JobState::Queued, ReasonCode::Unspecified, None, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, exit: Option<(i32, i32)>) -> SlurmJob {
        SlurmJob {
            id: "7".into(),
            state: state.into(),
            reason: "None".into(),
            exit,
            ..SlurmJob::default()
        }
    }

    #[test]
    fn squeue_lines_parse_and_odd_ones_do_not_panic() {
        let line = "42|PENDING|N/A|1795551721|chris-jid-1|chris-dispatch:m1:chris-jid-1|ReqNodeNotAvail, UnavailableNodes:n|1";
        let parsed = parse_squeue_line(line).unwrap();
        assert_eq!(parsed.id, "42");
        assert_eq!(parsed.state, "PENDING");
        assert_eq!(parsed.start, None);
        assert_eq!(
            parsed.end,
            Some(UNIX_EPOCH + Duration::from_secs(1_795_551_721))
        );
        assert_eq!(parsed.name, "chris-jid-1");
        assert_eq!(parsed.comment, "chris-dispatch:m1:chris-jid-1");
        assert_eq!(parsed.reason, "ReqNodeNotAvail, UnavailableNodes:n|1");
        for odd in ["", "|", "1|RUNNING", "garbage", "1|R|x|y|z"] {
            let _ = parse_squeue_line(odd);
        }
        assert!(parse_squeue_line("").is_none());
    }

    #[test]
    fn scontrol_output_parses() {
        let text = "JobId=1 JobName=hogtest UserId=root(0) JobState=OUT_OF_MEMORY Reason=OutOfMemory Dependency=(null) ExitCode=0:125 StartTime=1795551632 EndTime=1795551633 Command=/a dir/job.sh WorkDir=/tmp Comment=chris-dispatch:m1:hog  StdErr=/tmp/st/1.out";
        let parsed = parse_scontrol(text).unwrap();
        assert_eq!(parsed.id, "1");
        assert_eq!(parsed.state, "OUT_OF_MEMORY");
        assert_eq!(parsed.reason, "OutOfMemory");
        assert_eq!(parsed.exit, Some((0, 125)));
        assert_eq!(parsed.comment, "chris-dispatch:m1:hog");
        assert_eq!(parsed.name, "hogtest");
        assert!(parsed.start.is_some() && parsed.end.is_some());
        let pairs = parse_scontrol_pairs(text);
        assert_eq!(
            pairs.get("Command").map(String::as_str),
            Some("/a dir/job.sh")
        );
        let null = parse_scontrol("JobId=2 JobState=CANCELLED Comment=(null) ExitCode=x").unwrap();
        assert_eq!((null.comment.as_str(), null.exit), ("", None));
        assert!(parse_scontrol("slurm_load_jobs error: Invalid job id specified").is_none());
        assert!(parse_scontrol("").is_none());
    }

    #[test]
    fn sacct_and_sbatch_output_parse() {
        let text = "12|CANCELLED by 0|0:15|1795551632|1795551640|chris-jid-1|chris-dispatch:m1:chris-jid-1\n";
        let parsed = parse_sacct(text, "12").unwrap();
        assert_eq!(parsed.state, "CANCELLED");
        assert_eq!(parsed.exit, Some((0, 15)));
        assert!(parse_sacct(text, "13").is_none());
        assert_eq!(parse_sbatch("123\n").as_deref(), Some("123"));
        assert_eq!(parse_sbatch("123;cluster\n").as_deref(), Some("123"));
        assert_eq!(parse_sbatch("sbatch: error: x"), None);
        assert_eq!(parse_sbatch(""), None);
    }

    #[test]
    fn states_map_with_reasons() {
        let cases = [
            (
                "PENDING",
                None,
                EndFiles::default(),
                JobState::Queued,
                ReasonCode::Unspecified,
                None,
            ),
            (
                "RUNNING",
                None,
                EndFiles::default(),
                JobState::Running,
                ReasonCode::Unspecified,
                None,
            ),
            (
                "COMPLETING",
                None,
                EndFiles::default(),
                JobState::Running,
                ReasonCode::Unspecified,
                None,
            ),
            (
                "COMPLETED",
                Some((0, 0)),
                EndFiles::default(),
                JobState::Succeeded,
                ReasonCode::ExitCode,
                Some(0),
            ),
            (
                "FAILED",
                Some((3, 0)),
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::ExitCode,
                Some(3),
            ),
            (
                "FAILED",
                Some((137, 0)),
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::OomKilled,
                Some(137),
            ),
            (
                "FAILED",
                Some((1, 0)),
                EndFiles {
                    exit_code: Some(137),
                    oom: true,
                },
                JobState::Failed,
                ReasonCode::OomKilled,
                Some(137),
            ),
            (
                "OUT_OF_MEMORY",
                Some((0, 125)),
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::OomKilled,
                Some(137),
            ),
            (
                "TIMEOUT",
                Some((0, 15)),
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::TimeLimit,
                Some(143),
            ),
            (
                "CANCELLED",
                Some((0, 9)),
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::Cancelled,
                Some(137),
            ),
            (
                "NODE_FAIL",
                None,
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::NodeFail,
                None,
            ),
            (
                "PREEMPTED",
                None,
                EndFiles::default(),
                JobState::Failed,
                ReasonCode::Preempted,
                None,
            ),
            (
                "REVOKED",
                None,
                EndFiles::default(),
                JobState::Lost,
                ReasonCode::BackendError,
                None,
            ),
            (
                "SOMETHING_NEW",
                None,
                EndFiles::default(),
                JobState::Queued,
                ReasonCode::Unspecified,
                None,
            ),
        ];
        for (state, exit, files, expected, reason, code) in cases {
            let seen = outcome(&job(state, exit), files, true);
            assert_eq!(
                (seen.state, seen.reason, seen.exit_code),
                (expected, reason, code),
                "{state} {exit:?} {files:?}"
            );
            assert!(seen.message.starts_with(state), "{}", seen.message);
        }
        // Without a runtime memory limit, 137 is an ordinary exit code.
        let seen = outcome(&job("FAILED", Some((137, 0))), EndFiles::default(), false);
        assert_eq!(seen.reason, ReasonCode::ExitCode);
        let mut pending = job("PENDING", None);
        pending.reason = "Resources".into();
        assert_eq!(
            outcome(&pending, EndFiles::default(), true).message,
            "PENDING (Resources)"
        );
    }

    #[test]
    fn times_and_exit_codes() {
        assert_eq!(parse_time("N/A"), None);
        assert_eq!(parse_time("Unknown"), None);
        assert_eq!(parse_time("0"), None);
        assert_eq!(parse_time("2026-11-24T20:20:32"), None);
        assert_eq!(
            parse_time(" 10 "),
            Some(UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(parse_exit("3:0"), Some((3, 0)));
        assert_eq!(parse_exit("3"), None);
        assert_eq!(parse_exit("a:b"), None);
    }
}

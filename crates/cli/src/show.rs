//! How jobs, events and sites are shown: one line, a detailed block, or JSON.

use dispatch_proto::v1 as pb;
use serde_json::{Value, json};

/// A state as a short lower-case word.
pub fn state_word(state: pb::JobState) -> &'static str {
    match state {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Queued => "queued",
        pb::JobState::StagingIn => "staging-in",
        pb::JobState::Running => "running",
        pb::JobState::StagingOut => "staging-out",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Lost => "lost",
    }
}

/// True once the job can change no more.
pub fn is_terminal(state: pb::JobState) -> bool {
    matches!(
        state,
        pb::JobState::Succeeded
            | pb::JobState::Failed
            | pb::JobState::Cancelled
            | pb::JobState::Lost
    )
}

/// A state's reason in a few words: its code, exit code and message, where set.
pub fn reason_text(reason: Option<&pb::StateReason>) -> String {
    let Some(reason) = reason else {
        return String::new();
    };
    let mut parts = Vec::new();
    if reason.code() != pb::ReasonCode::Unspecified {
        parts.push(
            reason
                .code()
                .as_str_name()
                .trim_start_matches("REASON_CODE_")
                .to_ascii_lowercase(),
        );
    }
    if let Some(code) = reason.exit_code {
        parts.push(format!("exit {code}"));
    }
    if !reason.message.is_empty() {
        parts.push(reason.message.clone());
    }
    parts.join(", ")
}

fn time(stamp: Option<&prost_types::Timestamp>) -> String {
    stamp.map(|t| t.to_string()).unwrap_or_default()
}

/// `job-id  state  site  reason`.
pub fn job_line(job: &pb::Job) -> String {
    let id = job.spec.as_ref().map(|s| s.job_id.as_str()).unwrap_or("?");
    let site = if job.site_id.is_empty() {
        "-"
    } else {
        job.site_id.as_str()
    };
    format!(
        "{id:<40} {:<11} {site:<20} {}",
        state_word(job.state()),
        reason_text(job.reason.as_ref())
    )
    .trim_end()
    .to_owned()
}

/// A block with everything a person checks about a job.
pub fn job_details(job: &pb::Job) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let mut lines = vec![
        format!("job        {}", spec.job_id),
        format!("state      {}", state_word(job.state())),
        format!("attempt    {}", job.attempt),
        format!("image      {}", spec.image),
        format!("command    {}", job.command.join(" ")),
        format!(
            "limits     {} millicores, {} MiB, {} GPUs",
            spec.cpu_millicores, spec.memory_mib, spec.gpus
        ),
        format!("submitted  {}", time(job.submitted_at.as_ref())),
    ];
    if !job.site_id.is_empty() {
        lines.push(format!("site       {}", job.site_id));
    }
    if job.running_at.is_some() {
        lines.push(format!("running    {}", time(job.running_at.as_ref())));
    }
    if job.finished_at.is_some() {
        lines.push(format!("finished   {}", time(job.finished_at.as_ref())));
    }
    let reason = reason_text(job.reason.as_ref());
    if !reason.is_empty() {
        lines.push(format!("reason     {reason}"));
    }
    if !job.message.is_empty() {
        lines.push(format!("message    {}", job.message));
    }
    lines.join("\n")
}

/// A job as JSON.
pub fn job_json(job: &pb::Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    json!({
        "job_id": spec.job_id,
        "state": state_word(job.state()),
        "reason": reason_text(job.reason.as_ref()),
        "exit_code": job.reason.as_ref().and_then(|r| r.exit_code),
        "attempt": job.attempt,
        "site_id": job.site_id,
        "image": spec.image,
        "command": job.command,
        "submitted_at": time(job.submitted_at.as_ref()),
        "finished_at": time(job.finished_at.as_ref()),
        "message": job.message,
    })
}

/// `sequence  time  job  state  reason`.
pub fn event_line(event: &pb::JobEvent) -> String {
    format!(
        "{:>8} {} {:<40} {:<11} {}",
        event.sequence,
        time(event.time.as_ref()),
        event.job_id,
        state_word(event.state()),
        reason_text(event.reason.as_ref())
    )
    .trim_end()
    .to_owned()
}

/// An event as JSON.
pub fn event_json(event: &pb::JobEvent) -> Value {
    json!({
        "sequence": event.sequence,
        "time": time(event.time.as_ref()),
        "job_id": event.job_id,
        "state": state_word(event.state()),
        "reason": reason_text(event.reason.as_ref()),
        "site_id": event.site_id,
        "attempt": event.attempt,
    })
}

/// `site-id  name  health`.
pub fn site_line(site: &pb::Site) -> String {
    format!(
        "{:<24} {:<24} {}",
        site.site_id,
        site.name,
        site.health()
            .as_str_name()
            .trim_start_matches("SITE_HEALTH_")
            .to_ascii_lowercase()
    )
}

/// A site as JSON.
pub fn site_json(site: &pb::Site) -> Value {
    json!({
        "site_id": site.site_id,
        "name": site.name,
        "health": site.health().as_str_name().trim_start_matches("SITE_HEALTH_").to_ascii_lowercase(),
        "labels": site.labels,
    })
}

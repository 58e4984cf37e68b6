//! The job state machine: which state a job may move to from which, decided in one place.
//!
//! [`apply`] is the only judge of a change. The store calls it inside the database
//! transaction that writes the new state and its event, so a change is either refused
//! before anything is written, or stored with its event at once.
//!
//! The rules:
//!
//! ```text
//!             +-----------> CANCELLED, FAILED
//!             |
//!  (submit) QUEUED --place--> STAGING_IN --> RUNNING --> STAGING_OUT --> SUCCEEDED
//!             ^                   |             |             |
//!             |                   +-------------+-------------+--> FAILED, CANCELLED, LOST
//!             |                   |             |             |
//!             +---- requeue ------+-------------+-------------+   (a new attempt)
//! ```
//!
//! RUNNING may also end SUCCEEDED directly (nothing to stage out). Within one attempt a
//! terminal state (SUCCEEDED, FAILED, CANCELLED, LOST) is a sink: the attempt reaches
//! exactly one, once, and nothing follows it. Only an explicit [`Transition::Retry`] (a
//! client resubmitting with `retry_if_failed`, as pfcon re-runs a failed job) starts the
//! job again, as a new attempt numbered one higher; a requeue (a site declined or was
//! lost) also starts a new attempt, so reports about the old one are recognised as stale.

use std::fmt;
use std::str::FromStr;

use dispatch_proto::v1;

/// Where a job is in its life: `dispatch.v1.JobState` without UNSPECIFIED, which no stored
/// job can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Accepted and waiting for a site.
    Queued,
    /// Placed at a site, which is bringing the inputs in.
    StagingIn,
    /// The container has started.
    Running,
    /// The container has ended; outputs are on their way to the hub.
    StagingOut,
    /// Terminal: exited 0 and the outputs are at the hub.
    Succeeded,
    /// Terminal: the run or its staging failed.
    Failed,
    /// Terminal: a client cancelled it.
    Cancelled,
    /// Terminal: its site was lost and the policy gave up on it.
    Lost,
}

impl JobState {
    /// Every state, in wire order.
    pub const ALL: [Self; 8] = [
        Self::Queued,
        Self::StagingIn,
        Self::Running,
        Self::StagingOut,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Lost,
    ];

    /// True for the states an attempt never leaves.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Lost
        )
    }

    /// True while the job is placed at a site and not finished: the states in which a
    /// site holds (or is about to hold) something for it.
    pub const fn is_placed(self) -> bool {
        matches!(self, Self::StagingIn | Self::Running | Self::StagingOut)
    }

    /// True for the ends a client may retry (`retry_if_failed`): every end but success.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Failed | Self::Cancelled | Self::Lost)
    }

    /// The name stored in the database and shown in messages: the wire name without its
    /// `JOB_STATE_` prefix, so rows read the same as the protocol.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::StagingIn => "STAGING_IN",
            Self::Running => "RUNNING",
            Self::StagingOut => "STAGING_OUT",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Lost => "LOST",
        }
    }

    /// True when the state machine lets a job go from `self` to `to` within one attempt
    /// (the edges of the diagram above; [`Transition::Retry`] is not one of them).
    pub const fn may_enter(self, to: Self) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, StagingIn | Cancelled | Failed)
                | (StagingIn, Running | Queued | Failed | Cancelled | Lost)
                | (
                    Running,
                    StagingOut | Succeeded | Queued | Failed | Cancelled | Lost
                )
                | (StagingOut, Succeeded | Queued | Failed | Cancelled | Lost)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == raw)
            .ok_or_else(|| format!("unknown job state `{raw}`"))
    }
}

impl From<JobState> for v1::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => Self::Queued,
            JobState::StagingIn => Self::StagingIn,
            JobState::Running => Self::Running,
            JobState::StagingOut => Self::StagingOut,
            JobState::Succeeded => Self::Succeeded,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
            JobState::Lost => Self::Lost,
        }
    }
}

impl TryFrom<v1::JobState> for JobState {
    type Error = String;

    fn try_from(state: v1::JobState) -> Result<Self, Self::Error> {
        Ok(match state {
            v1::JobState::Queued => Self::Queued,
            v1::JobState::StagingIn => Self::StagingIn,
            v1::JobState::Running => Self::Running,
            v1::JobState::StagingOut => Self::StagingOut,
            v1::JobState::Succeeded => Self::Succeeded,
            v1::JobState::Failed => Self::Failed,
            v1::JobState::Cancelled => Self::Cancelled,
            v1::JobState::Lost => Self::Lost,
            v1::JobState::Unspecified => return Err("UNSPECIFIED is not a job state".into()),
        })
    }
}

/// Why a job is in its state (`dispatch.v1.StateReason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// What kind of reason, in words a program can act on.
    pub code: v1::ReasonCode,
    /// Detail for people; never a secret.
    pub message: String,
    /// The container's exit code, when it exited by itself.
    pub exit_code: Option<i32>,
}

impl Reason {
    /// Ordinary progress: no particular reason.
    pub fn progress() -> Self {
        Self::new(v1::ReasonCode::Unspecified, "")
    }

    /// A reason of `code` with a message.
    pub fn new(code: v1::ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            exit_code: None,
        }
    }

    /// The container exited by itself with `exit_code`.
    pub fn exited(exit_code: i32) -> Self {
        Self {
            code: v1::ReasonCode::ExitCode,
            message: String::new(),
            exit_code: Some(exit_code),
        }
    }

    /// A client cancelled the job; `message` is theirs, or a default one.
    pub fn cancelled(message: &str) -> Self {
        let message = if message.is_empty() {
            "cancelled by a client"
        } else {
            message
        };
        Self::new(v1::ReasonCode::Cancelled, message)
    }
}

impl From<&Reason> for v1::StateReason {
    fn from(reason: &Reason) -> Self {
        Self {
            code: reason.code.into(),
            message: reason.message.clone(),
            exit_code: reason.exit_code,
        }
    }
}

/// A site a job is placed at, and the manager replica holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRef {
    /// The site's id.
    pub site_id: String,
    /// The manager replica's id; empty when not known yet.
    pub manager_id: String,
}

/// What [`apply`] needs to know of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Its state.
    pub state: JobState,
    /// Why it is there.
    pub reason: Reason,
    /// Its current attempt (1 for the first).
    pub attempt: u32,
    /// Where it is placed, if anywhere.
    pub site: Option<SiteRef>,
    /// A client asked to cancel it while it was placed; the site has not confirmed yet.
    pub cancel_requested: bool,
}

impl Status {
    /// A job just accepted: QUEUED, first attempt.
    pub fn submitted() -> Self {
        Self {
            state: JobState::Queued,
            reason: Reason::progress(),
            attempt: 1,
            site: None,
            cancel_requested: false,
        }
    }
}

/// A change someone wants to make to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Move the job to `to` within an attempt: a placement (QUEUED to STAGING_IN, which
    /// needs `site`), a site's report, a cancel, a requeue (back to QUEUED, which starts a
    /// new attempt), or an end decided at the hub (LOST).
    Enter {
        /// The state to enter.
        to: JobState,
        /// Why.
        reason: Reason,
        /// The attempt the change is about (a site reports on the attempt it was given);
        /// `None`: whichever attempt is current.
        attempt: Option<u32>,
        /// Where the job is placed; required when entering STAGING_IN, ignored otherwise.
        site: Option<SiteRef>,
    },
    /// Start a job that ended FAILED, CANCELLED or LOST again, as a new attempt in QUEUED.
    Retry {
        /// Why, for the QUEUED event.
        reason: Reason,
    },
}

/// Why [`apply`] refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The attempt already ended; a terminal state is a sink.
    #[error(
        "the job already ended {state} (attempt {attempt}); a finished job never changes state"
    )]
    Finished {
        /// Its terminal state.
        state: JobState,
        /// The attempt that ended.
        attempt: u32,
    },
    /// The state machine has no such edge.
    #[error("a job cannot go from {from} to {to}")]
    Illegal {
        /// The current state.
        from: JobState,
        /// The state asked for.
        to: JobState,
    },
    /// The change is about an attempt the job has moved on from (or never had).
    #[error("the change is about attempt {asked}, but the job is on attempt {current}")]
    StaleAttempt {
        /// The attempt the change named.
        asked: u32,
        /// The job's current attempt.
        current: u32,
    },
    /// Entering STAGING_IN without saying where.
    #[error("placing a job (QUEUED to STAGING_IN) needs the site it is placed at")]
    SiteRequired,
    /// A retry of a job that has not ended, or that succeeded.
    #[error("only a job that ended FAILED, CANCELLED or LOST can be retried; this one is {state}")]
    NotRetryable {
        /// Its state.
        state: JobState,
    },
}

/// What a job becomes after an accepted change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The job's new status.
    pub status: Status,
    /// True when the change started a new attempt (a requeue or a retry): per-attempt
    /// details (placement times, outputs, the cancel request) start afresh.
    pub new_attempt: bool,
}

/// Decides whether `transition` may happen to a job in `current`, and what the job
/// becomes. Pure: the caller stores the result and its event in one transaction.
///
/// A job whose cancel was requested never goes back to the queue: a requeue ends it
/// CANCELLED instead, since the client no longer wants it run anywhere.
pub fn apply(current: &Status, transition: &Transition) -> Result<Applied, Refusal> {
    match transition {
        Transition::Retry { reason } => {
            if !current.state.is_retryable() {
                return Err(Refusal::NotRetryable {
                    state: current.state,
                });
            }
            Ok(Applied {
                status: Status {
                    state: JobState::Queued,
                    reason: reason.clone(),
                    attempt: current.attempt.saturating_add(1),
                    site: None,
                    cancel_requested: false,
                },
                new_attempt: true,
            })
        }
        Transition::Enter {
            to,
            reason,
            attempt,
            site,
        } => {
            if let Some(asked) = *attempt
                && asked != current.attempt
            {
                return Err(Refusal::StaleAttempt {
                    asked,
                    current: current.attempt,
                });
            }
            if current.state.is_terminal() {
                return Err(Refusal::Finished {
                    state: current.state,
                    attempt: current.attempt,
                });
            }
            if !current.state.may_enter(*to) {
                return Err(Refusal::Illegal {
                    from: current.state,
                    to: *to,
                });
            }
            match to {
                JobState::StagingIn => {
                    let site = site.clone().ok_or(Refusal::SiteRequired)?;
                    Ok(Applied {
                        status: Status {
                            state: JobState::StagingIn,
                            reason: reason.clone(),
                            attempt: current.attempt,
                            site: Some(site),
                            cancel_requested: current.cancel_requested,
                        },
                        new_attempt: false,
                    })
                }
                // Back to the queue from a placement. A cancelled-while-placed job ends
                // here instead: it was only waiting for its site to let go of it.
                JobState::Queued if current.cancel_requested => Ok(Applied {
                    status: Status {
                        state: JobState::Cancelled,
                        reason: Reason::cancelled(""),
                        attempt: current.attempt,
                        site: current.site.clone(),
                        cancel_requested: true,
                    },
                    new_attempt: false,
                }),
                JobState::Queued => Ok(Applied {
                    status: Status {
                        state: JobState::Queued,
                        reason: reason.clone(),
                        attempt: current.attempt.saturating_add(1),
                        site: None,
                        cancel_requested: false,
                    },
                    new_attempt: true,
                }),
                _ => Ok(Applied {
                    status: Status {
                        state: *to,
                        reason: reason.clone(),
                        attempt: current.attempt,
                        site: current.site.clone(),
                        cancel_requested: current.cancel_requested,
                    },
                    new_attempt: false,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn site() -> SiteRef {
        SiteRef {
            site_id: "site-1".into(),
            manager_id: "manager-1".into(),
        }
    }

    fn enter(to: JobState) -> Transition {
        Transition::Enter {
            to,
            reason: Reason::progress(),
            attempt: None,
            site: Some(site()),
        }
    }

    fn in_state(state: JobState) -> Status {
        Status {
            state,
            site: state.is_placed().then(site),
            ..Status::submitted()
        }
    }

    /// The whole table: every (from, to) pair is allowed exactly when the diagram has the
    /// edge, and a terminal state refuses everything.
    #[test]
    fn transition_table() {
        use JobState::*;
        let allowed: &[(JobState, &[JobState])] = &[
            (Queued, &[StagingIn, Cancelled, Failed]),
            (StagingIn, &[Running, Queued, Failed, Cancelled, Lost]),
            (
                Running,
                &[StagingOut, Succeeded, Queued, Failed, Cancelled, Lost],
            ),
            (StagingOut, &[Succeeded, Queued, Failed, Cancelled, Lost]),
            (Succeeded, &[]),
            (Failed, &[]),
            (Cancelled, &[]),
            (Lost, &[]),
        ];
        for (from, targets) in allowed {
            for to in JobState::ALL {
                let result = apply(&in_state(*from), &enter(to));
                if targets.contains(&to) {
                    let applied = result.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
                    assert_eq!(
                        applied.status.state, to,
                        "{from} -> {to} lands where it says"
                    );
                } else if from.is_terminal() {
                    assert!(
                        matches!(result, Err(Refusal::Finished { .. })),
                        "{from} -> {to}: {result:?}"
                    );
                } else {
                    assert_eq!(
                        result,
                        Err(Refusal::Illegal { from: *from, to }),
                        "{from} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn placement_needs_a_site_and_keeps_it() {
        let queued = Status::submitted();
        let no_site = Transition::Enter {
            to: JobState::StagingIn,
            reason: Reason::progress(),
            attempt: None,
            site: None,
        };
        assert_eq!(apply(&queued, &no_site), Err(Refusal::SiteRequired));
        let placed = apply(&queued, &enter(JobState::StagingIn)).expect("placed");
        assert_eq!(placed.status.site, Some(site()));
        let running = apply(&placed.status, &enter(JobState::Running)).expect("running");
        assert_eq!(running.status.site, Some(site()));
        assert!(!running.new_attempt);
    }

    #[test]
    fn requeue_starts_a_new_attempt_unless_cancel_was_requested() {
        let running = in_state(JobState::Running);
        let requeued = apply(&running, &enter(JobState::Queued)).expect("requeued");
        assert_eq!(requeued.status.state, JobState::Queued);
        assert_eq!(requeued.status.attempt, 2);
        assert_eq!(requeued.status.site, None);
        assert!(requeued.new_attempt);

        let cancelling = Status {
            cancel_requested: true,
            ..running
        };
        let ended = apply(&cancelling, &enter(JobState::Queued)).expect("ended");
        assert_eq!(ended.status.state, JobState::Cancelled);
        assert_eq!(ended.status.attempt, 1);
        assert_eq!(ended.status.reason.code, v1::ReasonCode::Cancelled);
    }

    #[test]
    fn stale_attempts_are_refused() {
        let running = Status {
            attempt: 3,
            ..in_state(JobState::Running)
        };
        let report = Transition::Enter {
            to: JobState::Succeeded,
            reason: Reason::exited(0),
            attempt: Some(2),
            site: None,
        };
        assert_eq!(
            apply(&running, &report),
            Err(Refusal::StaleAttempt {
                asked: 2,
                current: 3
            })
        );
    }

    #[test]
    fn retry_only_after_an_unsuccessful_end() {
        let retry = Transition::Retry {
            reason: Reason::new(v1::ReasonCode::Requeued, "retried"),
        };
        for state in JobState::ALL {
            let result = apply(&in_state(state), &retry);
            if state.is_retryable() {
                let applied = result.expect("retried");
                assert_eq!(applied.status.state, JobState::Queued);
                assert_eq!(applied.status.attempt, 2);
                assert!(applied.new_attempt);
            } else {
                assert_eq!(result, Err(Refusal::NotRetryable { state }));
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            let wire = v1::JobState::from(state);
            assert_eq!(JobState::try_from(wire), Ok(state));
            assert_eq!(wire.is_terminal(), state.is_terminal());
            assert_eq!(format!("JOB_STATE_{state}"), wire.as_str_name());
        }
        assert!(JobState::try_from(v1::JobState::Unspecified).is_err());
        assert!("queued".parse::<JobState>().is_err());
    }

    fn any_state() -> impl Strategy<Value = JobState> {
        (0..JobState::ALL.len()).prop_map(|i| JobState::ALL[i])
    }

    fn any_transition() -> impl Strategy<Value = Transition> {
        prop_oneof![
            8 => (any_state(), prop::option::of(0u32..4), any::<bool>()).prop_map(
                |(to, attempt, with_site)| Transition::Enter {
                    to,
                    reason: Reason::progress(),
                    attempt,
                    site: with_site.then(site),
                }
            ),
            1 => Just(Transition::Retry { reason: Reason::progress() }),
        ]
    }

    /// An event as the store would record it.
    #[derive(Debug)]
    struct Event {
        attempt: u32,
        state: JobState,
        by_retry: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever is thrown at a job: within an attempt, nothing follows a terminal
        /// state and at most one terminal event is recorded; attempts only grow, by one,
        /// and a finished attempt is followed only by a retry.
        #[test]
        fn terminal_states_are_sinks(
            cancel_at in prop::option::of(0usize..40),
            transitions in prop::collection::vec(any_transition(), 0..40),
        ) {
            let mut status = Status::submitted();
            let mut events = vec![Event { attempt: 1, state: JobState::Queued, by_retry: false }];
            for (i, transition) in transitions.iter().enumerate() {
                if cancel_at == Some(i) && status.state.is_placed() {
                    status.cancel_requested = true;
                }
                let before = status.clone();
                match apply(&status, transition) {
                    Ok(applied) => {
                        let retry = matches!(transition, Transition::Retry { .. });
                        prop_assert!(
                            !before.state.is_terminal() || retry,
                            "left terminal {} by {:?}",
                            before.state,
                            transition
                        );
                        if applied.new_attempt {
                            prop_assert_eq!(applied.status.attempt, before.attempt + 1);
                            prop_assert_eq!(applied.status.state, JobState::Queued);
                        } else {
                            prop_assert_eq!(applied.status.attempt, before.attempt);
                        }
                        if applied.status.state.is_placed() {
                            prop_assert!(applied.status.site.is_some());
                        }
                        events.push(Event {
                            attempt: applied.status.attempt,
                            state: applied.status.state,
                            by_retry: matches!(transition, Transition::Retry { .. }),
                        });
                        status = applied.status;
                    }
                    Err(_) => prop_assert_eq!(&status, &before),
                }
            }
            for pair in events.windows(2) {
                let (earlier, later) = (&pair[0], &pair[1]);
                prop_assert!(later.attempt >= earlier.attempt);
                if earlier.state.is_terminal() {
                    prop_assert!(later.by_retry, "{:?} followed {:?}", later, earlier);
                    prop_assert_eq!(later.attempt, earlier.attempt + 1);
                }
            }
            let last_attempt = events.last().map_or(1, |e| e.attempt);
            for attempt in 1..=last_attempt {
                let terminal = events
                    .iter()
                    .filter(|e| e.attempt == attempt && e.state.is_terminal())
                    .count();
                prop_assert!(terminal <= 1, "attempt {} ended {} times", attempt, terminal);
            }
        }
    }
}

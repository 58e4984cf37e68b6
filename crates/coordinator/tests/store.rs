//! The job store, run the same way on SQLite and on PostgreSQL: every case is one async
//! function, called by a test per database (`sqlite_<case>` and `postgres_<case>`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use futures::StreamExt as _;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use dispatch_coordinator::state::{JobState, Reason, SiteRef, Transition};
use dispatch_coordinator::store::{EventFilter, EventRecord, JobFilter, UnixMicros};
use dispatch_coordinator::{Error, Store};
use dispatch_proto::job::Labels;
use dispatch_proto::{JobId, JobSpec, v1};

use common::{TestDb, checked, spec};

/// Runs each case on a fresh SQLite file and on a fresh PostgreSQL database.
macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let db = super::TestDb::sqlite()?;
                    super::$case(&db).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let db = super::TestDb::postgres().await?;
                    super::$case(&db).await
                }
            )*
        }
    };
}

on_both_databases!(
    submit_replay_and_conflict,
    env_values_are_sealed,
    lifecycle_events_and_refusals,
    retry_if_failed_starts_a_new_attempt,
    list_pages_and_filters,
    cancel_queued_placed_and_finished,
    delete_and_purge,
    events_replay_follow_and_prune,
    concurrent_writers_keep_the_log_whole,
    everything_survives_a_reopen,
);

fn id(raw: &str) -> JobId {
    JobId::parse(raw).expect("a valid job id")
}

fn site(name: &str) -> SiteRef {
    SiteRef {
        site_id: name.into(),
        manager_id: format!("{name}-manager"),
    }
}

fn enter(to: JobState, reason: Reason) -> Transition {
    Transition::Enter {
        to,
        reason,
        attempt: None,
        site: None,
    }
}

fn place(at: &str) -> Transition {
    Transition::Enter {
        to: JobState::StagingIn,
        reason: Reason::progress(),
        attempt: None,
        site: Some(site(at)),
    }
}

fn with(job_id: &str, change: impl FnOnce(&mut v1::JobSpec)) -> JobSpec {
    let mut wire = spec(job_id);
    change(&mut wire);
    JobSpec::try_from(wire).expect("a valid spec")
}

async fn submit_replay_and_conflict(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let first = store.submit(&checked("job-1"), false).await?;
    ensure!(first.created);
    let job = &first.job;
    assert_eq!(job.status.state, JobState::Queued);
    assert_eq!(job.status.attempt, 1);
    assert!(job.sequence > 0);
    assert_eq!(job.status.site, None);
    assert_eq!(job.times.queued, job.times.created);

    let replay = store.submit(&checked("job-1"), false).await?;
    assert!(!replay.created);
    assert_eq!(replay.job, first.job, "a replay returns the stored job");
    assert_eq!(store.head(), first.job.sequence, "a replay writes no event");

    // A leading `/` is normalised away at the door, so this is the same job.
    let slash = with("/job-1", |w| w.output_dir = "home/bob/feeds/job-1".into());
    let slash = store.submit(&slash, false).await?;
    assert!(!slash.created);

    let other = with("job-1", |w| {
        w.image = "ghcr.io/fnndsc/pl-other:1".into();
        w.env[0] = "CHRIS_USER_TOKEN=another-secret".into();
    });
    match store.submit(&other, false).await {
        Err(error @ Error::AlreadyExists { .. }) => {
            let message = error.to_string();
            assert!(message.contains("image, env"), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The record is still the first one.
    let stored = store.get(&id("job-1")).await?;
    assert_eq!(stored.spec.image, "ghcr.io/fnndsc/pl-dircopy:2.1.1");
    assert!(matches!(
        store.get(&id("job-unknown")).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

async fn env_values_are_sealed(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&checked("job-secret"), false).await?;
    let shown = store.get(&id("job-secret")).await?;
    assert_eq!(shown.spec.env, ["CHRIS_USER_TOKEN=", "EMPTY="]);
    let wire = shown.to_wire();
    assert_eq!(
        wire.spec.as_ref().map(|s| s.env.clone()),
        Some(vec!["CHRIS_USER_TOKEN=".to_owned(), "EMPTY=".to_owned()])
    );
    // The site gets the real values.
    let runnable = store.run_spec(&id("job-secret")).await?;
    assert_eq!(
        runnable
            .env()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["CHRIS_USER_TOKEN=tok-secret-value", "EMPTY="]
    );
    // Nothing in the database holds the value in plain text.
    let mut raw = db.raw().await?;
    let row = sqlx::query("SELECT spec, env_sealed FROM jobs WHERE job_id = 'job-secret'")
        .fetch_one(&mut raw)
        .await?;
    for column in ["spec", "env_sealed"] {
        let bytes: Vec<u8> = row.try_get(column)?;
        assert!(
            !bytes.windows(12).any(|w| w == b"secret-value"),
            "{column} holds the secret"
        );
    }
    // A store with another key cannot open the env.
    let stranger = Store::open(
        &db.database,
        dispatch_coordinator::seal::EnvSealer::from_key([1; 32]),
    )
    .await?;
    assert!(matches!(
        stranger.run_spec(&id("job-secret")).await,
        Err(Error::Sealing(_))
    ));
    Ok(())
}

async fn lifecycle_events_and_refusals(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let job = id("job-life");
    store.submit(&checked("job-life"), false).await?;
    match store
        .transition(&job, enter(JobState::Running, Reason::progress()), None)
        .await
    {
        Err(Error::IllegalTransition { refusal, .. }) => {
            assert_eq!(
                refusal.to_string(),
                "a job cannot go from QUEUED to RUNNING"
            );
        }
        other => panic!("QUEUED -> RUNNING must be refused, got {other:?}"),
    }
    let placed = store.transition(&job, place("site-a"), None).await?;
    assert_eq!(placed.status.site, Some(site("site-a")));
    assert!(placed.times.staging_in.is_some());
    let observed = UnixMicros(1_700_000_000_000_000);
    let running = store
        .transition(
            &job,
            Transition::Enter {
                to: JobState::Running,
                reason: Reason::progress(),
                attempt: Some(1),
                site: None,
            },
            Some(observed),
        )
        .await?;
    assert_eq!(
        running.times.running,
        Some(observed),
        "the site's time is kept"
    );
    assert_eq!(running.status.site, Some(site("site-a")));
    let stale = Transition::Enter {
        to: JobState::StagingOut,
        reason: Reason::progress(),
        attempt: Some(7),
        site: None,
    };
    assert!(matches!(
        store.transition(&job, stale, None).await,
        Err(Error::IllegalTransition { .. })
    ));
    store
        .transition(&job, enter(JobState::StagingOut, Reason::exited(0)), None)
        .await?;
    let done = store
        .transition(&job, enter(JobState::Succeeded, Reason::exited(0)), None)
        .await?;
    assert!(done.times.finished.is_some());
    assert_eq!(done.status.reason.exit_code, Some(0));
    for to in JobState::ALL {
        let refused = store
            .transition(&job, enter(to, Reason::progress()), None)
            .await;
        assert!(
            matches!(refused, Err(Error::IllegalTransition { .. })),
            "SUCCEEDED -> {to}: {refused:?}"
        );
    }

    let events = store.job_events(&job).await?;
    let states: Vec<_> = events.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::StagingIn,
            JobState::Running,
            JobState::StagingOut,
            JobState::Succeeded
        ]
    );
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(events[1].site_id.as_deref(), Some("site-a"));
    assert_eq!(events[2].occurred_at, observed);
    assert_eq!(events[4].reason.exit_code, Some(0));
    let stored = store.get(&job).await?;
    assert_eq!(stored.sequence, events[4].sequence);
    assert_eq!(stored, done);
    Ok(())
}

async fn retry_if_failed_starts_a_new_attempt(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let job = id("job-retry");
    store.submit(&checked("job-retry"), false).await?;
    store.transition(&job, place("site-a"), None).await?;
    store
        .transition(&job, enter(JobState::Running, Reason::progress()), None)
        .await?;
    let failed = store
        .transition(&job, enter(JobState::Failed, Reason::exited(3)), None)
        .await?;
    assert_eq!(failed.status.state, JobState::Failed);

    // Without retry_if_failed a resubmission is a replay.
    let replay = store.submit(&checked("job-retry"), false).await?;
    assert!(!replay.created);
    assert_eq!(replay.job.status.state, JobState::Failed);

    // With it, a new attempt, running the spec just sent (a new token, say).
    let resent = with("job-retry", |w| w.env[0] = "CHRIS_USER_TOKEN=fresh".into());
    let retried = store.submit(&resent, true).await?;
    assert!(retried.created);
    let again = &retried.job;
    assert_eq!(again.status.state, JobState::Queued);
    assert_eq!(again.status.attempt, 2);
    assert_eq!(again.status.reason.code, v1::ReasonCode::Requeued);
    assert_eq!(again.status.site, None);
    assert_eq!(again.times.running, None, "per-attempt times start afresh");
    assert_eq!(again.times.finished, None);
    assert_eq!(again.times.created, failed.times.created);
    let env: Vec<String> = store
        .run_spec(&job)
        .await?
        .env()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(env[0], "CHRIS_USER_TOKEN=fresh");

    // A report about the old attempt is refused.
    let old = Transition::Enter {
        to: JobState::Succeeded,
        reason: Reason::exited(0),
        attempt: Some(1),
        site: None,
    };
    assert!(store.transition(&job, old, None).await.is_err());

    // A success is never retried: the resubmission is a replay.
    store.transition(&job, place("site-b"), None).await?;
    store
        .transition(&job, enter(JobState::Running, Reason::progress()), None)
        .await?;
    store
        .transition(&job, enter(JobState::Succeeded, Reason::exited(0)), None)
        .await?;
    let after_success = store.submit(&resent, true).await?;
    assert!(!after_success.created);
    assert_eq!(after_success.job.status.state, JobState::Succeeded);

    let events = store.job_events(&job).await?;
    let per_attempt = |attempt: u32| {
        events
            .iter()
            .filter(|e| e.attempt == attempt)
            .map(|e| e.state)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        per_attempt(1),
        [
            JobState::Queued,
            JobState::StagingIn,
            JobState::Running,
            JobState::Failed
        ]
    );
    assert_eq!(
        per_attempt(2),
        [
            JobState::Queued,
            JobState::StagingIn,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    Ok(())
}

async fn list_pages_and_filters(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    for i in 0..7 {
        let spec = with(&format!("job-{i}"), |w| {
            w.labels = HashMap::from([
                (
                    "parity".into(),
                    if i % 2 == 0 { "even" } else { "odd" }.into(),
                ),
                ("feed".into(), "7".into()),
            ]);
            w.auid = if i < 5 { "bob" } else { "alice" }.into();
        });
        store.submit(&spec, false).await?;
    }
    store
        .transition(&id("job-1"), place("site-a"), None)
        .await?;
    store
        .transition(&id("job-2"), place("site-b"), None)
        .await?;
    store.cancel(&id("job-3"), "").await?;

    let all = JobFilter::default();
    let first = store.list(&all, 3, None).await?;
    let names = |jobs: &[dispatch_coordinator::store::JobRecord]| {
        jobs.iter()
            .map(|j| j.job_id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&first.jobs),
        ["job-6", "job-5", "job-4"],
        "newest first"
    );
    let token = first.next.clone().expect("more pages");
    // Jobs added between pages do not shift the pages after the token.
    store.submit(&checked("job-late"), false).await?;
    let second = store.list(&all, 3, Some(&token)).await?;
    assert_eq!(names(&second.jobs), ["job-3", "job-2", "job-1"]);
    let third = store.list(&all, 3, second.next.as_ref()).await?;
    assert_eq!(names(&third.jobs), ["job-0"]);
    assert!(third.next.is_none(), "the last page has no token");
    let everything = store.list(&all, 0, None).await?;
    assert_eq!(everything.jobs.len(), 8);
    assert_eq!(everything.jobs[0].job_id.as_str(), "job-late");

    let by = |filter: JobFilter| {
        let store = store.clone();
        async move { Ok::<_, Error>(names(&store.list(&filter, 0, None).await?.jobs)) }
    };
    assert_eq!(
        by(JobFilter {
            states: vec![JobState::StagingIn, JobState::Cancelled],
            ..JobFilter::default()
        })
        .await?,
        ["job-3", "job-2", "job-1"]
    );
    let labels = |pairs: &[(&str, &str)]| {
        Labels::parse(
            "labels",
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
        .expect("valid labels")
    };
    assert_eq!(
        by(JobFilter {
            labels: labels(&[("parity", "odd"), ("feed", "7")]),
            ..JobFilter::default()
        })
        .await?,
        ["job-5", "job-3", "job-1"]
    );
    assert_eq!(
        by(JobFilter {
            labels: labels(&[("parity", "odd")]),
            auid: Some("alice".into()),
            ..JobFilter::default()
        })
        .await?,
        ["job-5"]
    );
    assert_eq!(
        by(JobFilter {
            site_id: Some("site-b".into()),
            ..JobFilter::default()
        })
        .await?,
        ["job-2"]
    );
    assert!(
        by(JobFilter {
            labels: labels(&[("parity", "none")]),
            ..JobFilter::default()
        })
        .await?
        .is_empty()
    );
    Ok(())
}

async fn cancel_queued_placed_and_finished(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&checked("job-q"), false).await?;
    let cancelled = store.cancel(&id("job-q"), "changed my mind").await?;
    assert_eq!(cancelled.status.state, JobState::Cancelled);
    assert_eq!(cancelled.status.reason.code, v1::ReasonCode::Cancelled);
    assert_eq!(cancelled.status.reason.message, "changed my mind");
    // Terminal: returned unchanged, no second event.
    let again = store.cancel(&id("job-q"), "again").await?;
    assert_eq!(again, cancelled);
    assert_eq!(store.job_events(&id("job-q")).await?.len(), 2);

    store.submit(&checked("job-p"), false).await?;
    store
        .transition(&id("job-p"), place("site-a"), None)
        .await?;
    let requested = store.cancel(&id("job-p"), "").await?;
    assert_eq!(
        requested.status.state,
        JobState::StagingIn,
        "the site decides"
    );
    assert!(requested.status.cancel_requested);
    let (_, why) = requested.cancel_requested.clone().expect("recorded");
    assert_eq!(why, "cancelled by a client");
    assert_eq!(store.get(&id("job-p")).await?, requested);
    // If the site gives the job back, it does not go back to the queue.
    let ended = store
        .transition(
            &id("job-p"),
            enter(
                JobState::Queued,
                Reason::new(v1::ReasonCode::Requeued, "site declined"),
            ),
            None,
        )
        .await?;
    assert_eq!(ended.status.state, JobState::Cancelled);
    assert!(matches!(
        store.cancel(&id("job-none"), "").await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

async fn delete_and_purge(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&checked("job-d"), false).await?;
    let deleted = store.delete(&id("job-d"), false).await?;
    assert!(!deleted.purged);
    let job = deleted.job.expect("kept");
    assert_eq!(job.status.state, JobState::Cancelled, "cancelled first");
    let deleted_at = job.times.deleted.expect("deleted_at");
    // Replayable, and deleted_at stays the first one.
    let again = store.delete(&id("job-d"), false).await?;
    assert_eq!(again.job.and_then(|j| j.times.deleted), Some(deleted_at));
    // A deleted job is not retried by a resubmission.
    assert!(matches!(
        store.submit(&checked("job-d"), true).await,
        Err(Error::FailedPrecondition(_))
    ));

    let purged = store.delete(&id("job-d"), true).await?;
    assert!(purged.purged && purged.job.is_none());
    assert!(matches!(
        store.get(&id("job-d")).await,
        Err(Error::NotFound(_))
    ));
    assert!(store.job_events(&id("job-d")).await?.is_empty());
    let mut raw = db.raw().await?;
    let labels: i64 = sqlx::query("SELECT COUNT(*) AS n FROM job_labels WHERE job_id = 'job-d'")
        .fetch_one(&mut raw)
        .await?
        .try_get("n")?;
    assert_eq!(labels, 0);
    // A replay of the purge, and a new job under the old id.
    assert!(store.delete(&id("job-d"), true).await?.purged);
    assert!(matches!(
        store.delete(&id("job-d"), false).await,
        Err(Error::NotFound(_))
    ));
    let fresh = store.submit(&checked("job-d"), false).await?;
    assert!(fresh.created);
    assert_eq!(fresh.job.status.attempt, 1);

    // A job its site still holds: cancel requested, purge refused until it ends.
    store.submit(&checked("job-run"), false).await?;
    store
        .transition(&id("job-run"), place("site-a"), None)
        .await?;
    match store.delete(&id("job-run"), true).await {
        Err(error @ Error::FailedPrecondition(_)) => {
            assert!(error.to_string().contains("site-a"), "{error}");
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    let marked = store
        .delete(&id("job-run"), false)
        .await?
        .job
        .expect("kept");
    assert!(marked.status.cancel_requested);
    assert!(marked.times.deleted.is_some());
    store
        .transition(
            &id("job-run"),
            enter(JobState::Cancelled, Reason::cancelled("")),
            None,
        )
        .await?;
    assert!(store.delete(&id("job-run"), true).await?.purged);
    Ok(())
}

/// The stream's next event, within a deadline.
async fn next<S>(stream: &mut S) -> Result<EventRecord>
where
    S: futures::Stream<Item = dispatch_coordinator::Result<EventRecord>> + Unpin,
{
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(event))) => Ok(event),
        other => anyhow::bail!("expected an event, got {other:?}"),
    }
}

async fn events_replay_follow_and_prune(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&checked("job-a"), false).await?;
    store.submit(&checked("job-b"), false).await?;
    let stop = CancellationToken::new();
    let all = store.follow(0, EventFilter::default(), stop.clone());
    let only_b = store.follow(
        0,
        EventFilter {
            job_ids: vec!["job-b".into()],
            ..EventFilter::default()
        },
        stop.clone(),
    );
    futures::pin_mut!(all, only_b);
    // Replay.
    assert_eq!(next(&mut all).await?.job_id, "job-a");
    assert_eq!(next(&mut all).await?.job_id, "job-b");
    assert_eq!(next(&mut only_b).await?.job_id, "job-b");
    // Live.
    store
        .transition(&id("job-a"), place("site-a"), None)
        .await?;
    store
        .transition(&id("job-b"), place("site-b"), None)
        .await?;
    let live = next(&mut all).await?;
    assert_eq!(
        (live.job_id.as_str(), live.state),
        ("job-a", JobState::StagingIn)
    );
    assert_eq!(next(&mut all).await?.job_id, "job-b");
    let filtered = next(&mut only_b).await?;
    assert_eq!(filtered.job_id, "job-b");
    assert_eq!(filtered.site_id.as_deref(), Some("site-b"));
    // Stopping ends the stream with UNAVAILABLE, naming where to resume.
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), all.next()).await? {
        Some(Err(Error::Unavailable(message))) => {
            assert!(message.contains(&store.head().to_string()), "{message}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert!(all.next().await.is_none());

    // Pruning: replays from before the pruned point are refused.
    let head = store.head();
    let removed = store.prune_events_through(head - 1).await?;
    assert_eq!(removed, head - 1);
    assert!(matches!(
        store.check_replay_from(0),
        Err(Error::OutOfRange(_))
    ));
    assert!(store.check_replay_from(head - 1).is_ok());
    assert!(matches!(
        store.check_replay_from(head + 1),
        Err(Error::OutOfRange(_))
    ));
    let rest = store
        .events(head - 1, head, &EventFilter::default(), 10)
        .await?;
    assert_eq!(rest.len(), 1);
    assert_eq!(
        store.prune_events_through(head - 2).await?,
        0,
        "already pruned"
    );
    // The pruned point survives a reopen.
    store.close().await;
    let reopened = db.open().await?;
    assert_eq!(reopened.pruned_through(), head - 1);
    assert_eq!(reopened.head(), head);
    Ok(())
}

async fn concurrent_writers_keep_the_log_whole(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let mut tasks = tokio::task::JoinSet::new();
    // Ten clients submit one id at once; twenty submit ids of their own.
    for _ in 0..10 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .submit(&checked("job-same"), false)
                .await
                .map(|s| s.created)
        });
    }
    for i in 0..20 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .submit(&checked(&format!("job-own-{i}")), false)
                .await
                .map(|s| s.created)
        });
    }
    let mut created = 0;
    while let Some(done) = tasks.join_next().await {
        created += usize::from(done??);
    }
    assert_eq!(created, 21, "one of the same-id submissions created it");

    // Concurrent changes to one job: exactly one placement wins, the rest are refused.
    let mut placements = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = store.clone();
        placements.spawn(async move {
            store
                .transition(&id("job-same"), place(&format!("site-{i}")), None)
                .await
        });
    }
    let mut won = 0;
    while let Some(done) = placements.join_next().await {
        match done? {
            Ok(_) => won += 1,
            Err(Error::IllegalTransition { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(won, 1);

    // The log is gapless and matches the jobs' latest sequences.
    let events = store
        .events(0, store.head(), &EventFilter::default(), 1000)
        .await?;
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=store.head()).collect::<Vec<_>>());
    assert_eq!(events.len(), 22);
    let same = store.get(&id("job-same")).await?;
    assert_eq!(
        same.sequence,
        events
            .iter()
            .rfind(|e| e.job_id == "job-same")
            .map_or(0, |e| e.sequence)
    );
    Ok(())
}

async fn everything_survives_a_reopen(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&checked("job-kept"), false).await?;
    store
        .transition(&id("job-kept"), place("site-a"), None)
        .await?;
    let before = store.get(&id("job-kept")).await?;
    let events_before = store.job_events(&id("job-kept")).await?;
    let head = store.head();
    store.close().await;

    let reopened = db.open().await?;
    assert_eq!(reopened.get(&id("job-kept")).await?, before);
    assert_eq!(reopened.job_events(&id("job-kept")).await?, events_before);
    assert_eq!(reopened.head(), head);
    // The sequence goes on from where it was.
    let next = reopened
        .transition(
            &id("job-kept"),
            enter(JobState::Running, Reason::progress()),
            None,
        )
        .await?;
    assert_eq!(next.sequence, head + 1);
    Ok(())
}

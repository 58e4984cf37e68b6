//! The store's site side (join tokens, sites, uploads) and its dispatch side (the queue
//! in order, batched placements, status reports applied once), on SQLite and on
//! PostgreSQL alike: each case is one async function run once per database.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use sqlx::Row as _;

use dispatch_coordinator::Error;
use dispatch_coordinator::secret::{self, Purpose};
use dispatch_coordinator::state::{JobState, SiteRef};
use dispatch_coordinator::store::{
    NewJoinToken, PlacementOrder, Registration, ReportOutcome, SiteHealth, UnixMicros, UploadRecord,
};
use dispatch_proto::{JobId, JobSpec, v1};

use common::{TestDb, spec};

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
    join_tokens_are_single_use_expiring_and_hashed,
    a_lost_registration_answer_is_replayed_with_the_same_site,
    sites_record_health_capacity_and_revocation,
    the_queue_is_read_in_priority_then_fifo_order,
    placements_commit_together_and_skip_jobs_that_moved,
    reports_apply_once_and_walk_legal_paths,
    uploads_are_claimed_by_one_job_and_expire,
);

fn id(raw: &str) -> JobId {
    JobId::parse(raw).expect("a valid job id")
}

fn token(name: &str, ttl: Duration) -> (String, NewJoinToken) {
    let secret = secret::generate(Purpose::JoinToken).expect("randomness");
    let now = UnixMicros::now();
    let record = NewJoinToken {
        token_id: secret::new_id("jt"),
        hash: secret::hash(Purpose::JoinToken, &secret),
        site_name: name.into(),
        admin_labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        created_at: now,
        expires_at: UnixMicros(now.0 + i64::try_from(ttl.as_micros()).expect("small")),
    };
    (secret, record)
}

fn registration(token: &str, request_id: &str) -> (String, Registration) {
    let credential = secret::generate(Purpose::SiteCredential).expect("randomness");
    let registration = Registration {
        token_hash: secret::hash(Purpose::JoinToken, token),
        request_id: request_id.into(),
        suggested_name: "manager-suggests".into(),
        capabilities: v1::Capabilities {
            backend_kind: v1::BackendKind::Local.into(),
            labels: [("zone".to_owned(), "b".to_owned())].into(),
            ..v1::Capabilities::default()
        },
        site_id: secret::new_id("site"),
        credential_hash: secret::hash(Purpose::SiteCredential, &credential),
    };
    (credential, registration)
}

fn unauthenticated(result: Result<impl std::fmt::Debug, Error>, part: &str) {
    match result {
        Err(Error::Unauthenticated(message)) => {
            assert!(message.contains(part), "`{message}` should say `{part}`");
        }
        other => panic!("expected UNAUTHENTICATED ({part}), got {other:?}"),
    }
}

async fn join_tokens_are_single_use_expiring_and_hashed(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let (secret, record) = token("lab", Duration::from_secs(600));
    store.insert_join_token(&record).await?;
    let (credential, first) = registration(&secret, "req-1");
    let registered = store.register_site(&first).await?;
    ensure!(!registered.replayed);
    let site = registered.site;
    assert_eq!(site.name, "lab", "the token's name wins over the manager's");
    assert_eq!(site.health, SiteHealth::Disconnected, "no session yet");
    assert!(site.credential_matches(&credential));
    assert!(!site.credential_matches("dsc1_not-it"));
    assert_eq!(
        site.labels().get("zone").map(String::as_str),
        Some("a"),
        "the admin's labels override the manager's"
    );

    // Used: refused, whatever the request id (but the one that used it).
    let (_, again) = registration(&secret, "req-2");
    unauthenticated(store.register_site(&again).await, "already used");
    let (_, unknown) = registration("djt1_never-issued", "req-3");
    unauthenticated(store.register_site(&unknown).await, "unknown join token");

    let (expired_secret, mut expired) = token("", Duration::from_secs(600));
    expired.expires_at = UnixMicros(UnixMicros::now().0 - 1);
    store.insert_join_token(&expired).await?;
    let (_, late) = registration(&expired_secret, "req-4");
    unauthenticated(store.register_site(&late).await, "expired");

    // A second site wanting a taken name gets a free one.
    let (other_secret, mut other) = token("", Duration::from_secs(600));
    other.site_name.clear();
    store.insert_join_token(&other).await?;
    let (_, mut second) = registration(&other_secret, "req-5");
    second.suggested_name = "lab".into();
    let second = store.register_site(&second).await?;
    assert_eq!(second.site.name, "lab-2");
    assert!(store.site_name_taken("lab").await?);

    // Only hashes are stored.
    let mut raw = db.raw().await?;
    for (table, column) in [("join_tokens", "token_hash"), ("sites", "credential_hash")] {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {column} FROM {table}")))
            .fetch_all(&mut raw)
            .await?;
        for row in rows {
            let stored: Vec<u8> = row.try_get(column)?;
            assert_eq!(stored.len(), 32);
            for secret in [&secret, &credential] {
                assert!(
                    !stored
                        .windows(8)
                        .any(|w| secret.as_bytes().windows(8).any(|s| s == w)),
                    "{table}.{column} holds a secret"
                );
            }
        }
    }
    Ok(())
}

async fn a_lost_registration_answer_is_replayed_with_the_same_site(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let (secret, record) = token("", Duration::from_secs(600));
    store.insert_join_token(&record).await?;
    let (lost_credential, first) = registration(&secret, "req-lost");
    let first = store.register_site(&first).await?;
    assert_eq!(first.site.name, "manager-suggests");

    // The answer never arrived: the manager retries with the same request id.
    let (credential, retry) = registration(&secret, "req-lost");
    let retry = store.register_site(&retry).await?;
    ensure!(retry.replayed);
    assert_eq!(retry.site.site_id, first.site.site_id, "the same site");
    let stored = store.site(&first.site.site_id).await?.expect("stored");
    assert!(
        stored.credential_matches(&credential),
        "the new credential works"
    );
    assert!(
        !stored.credential_matches(&lost_credential),
        "the lost one does not"
    );
    assert_eq!(store.sites().await?.len(), 1, "no second site");

    // Once the site has opened a session, the token is spent for good.
    store
        .site_connected(
            &first.site.site_id,
            &v1::Capabilities::default(),
            None,
            UnixMicros::now(),
        )
        .await?;
    let (_, late) = registration(&secret, "req-lost");
    unauthenticated(store.register_site(&late).await, "already used");
    Ok(())
}

async fn sites_record_health_capacity_and_revocation(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let (secret, record) = token("health", Duration::from_secs(600));
    store.insert_join_token(&record).await?;
    let (_, registration) = registration(&secret, "req");
    let site = store.register_site(&registration).await?.site;
    let capabilities = v1::Capabilities {
        backend_kind: v1::BackendKind::Docker.into(),
        max_workers: 1,
        ..v1::Capabilities::default()
    };
    let capacity = v1::CapacityUpdate {
        free: Some(v1::Resources {
            cpu_millicores: 4000,
            memory_mib: 8192,
            gpus: 1,
        }),
        free_job_slots: 3,
        active_jobs: 1,
    };
    let now = UnixMicros::now();
    store
        .site_connected(&site.site_id, &capabilities, Some(&capacity), now)
        .await?;
    let later = UnixMicros(now.0 + 5_000_000);
    let mut fuller = capacity;
    fuller.active_jobs = 2;
    store
        .record_site_liveness(&[(site.site_id.clone(), later, Some(fuller))])
        .await?;
    let stored = store.site(&site.site_id).await?.expect("stored");
    assert_eq!(stored.health, SiteHealth::Connected);
    assert_eq!(stored.capabilities, capabilities);
    assert_eq!(stored.capacity, Some(fuller));
    assert_eq!(stored.last_seen_at, Some(later));
    assert_eq!(stored.first_session_at, Some(now));

    store
        .set_site_health(&site.site_id, SiteHealth::Unreachable)
        .await?;
    let revoked = store.revoke_site(&site.site_id, "stolen laptop").await?;
    assert_eq!(revoked.health, SiteHealth::Revoked);
    assert!(revoked.revoked_at.is_some());
    let again = store.revoke_site(&site.site_id, "again").await?;
    assert_eq!(again.revoked_at, revoked.revoked_at, "replayable");
    store
        .set_site_health(&site.site_id, SiteHealth::Connected)
        .await?;
    assert_eq!(
        store.site(&site.site_id).await?.map(|s| s.health),
        Some(SiteHealth::Revoked),
        "a revoked site stays revoked"
    );
    assert!(matches!(
        store.revoke_site("site-none", "").await,
        Err(Error::UnknownSite(_))
    ));

    // Reopened, everything is still there.
    store.close().await;
    let store = db.open().await?;
    let sites = store.sites().await?;
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].health, SiteHealth::Revoked);
    Ok(())
}

fn job_with(job_id: &str, priority: i32) -> JobSpec {
    let mut wire = spec(job_id);
    wire.priority = priority;
    JobSpec::try_from(wire).expect("valid")
}

async fn the_queue_is_read_in_priority_then_fifo_order(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    for (name, priority) in [("a", 0), ("b", 5), ("c", 0), ("d", -3), ("e", 5), ("f", 0)] {
        store.submit(&job_with(name, priority), false).await?;
    }
    let order = |jobs: &[dispatch_coordinator::store::QueuedJob]| {
        jobs.iter()
            .map(|j| j.job_id.to_string())
            .collect::<Vec<_>>()
    };
    let all = store.queued_jobs(None, 100).await?;
    assert_eq!(order(&all), ["b", "e", "a", "c", "f", "d"]);
    assert!(all.iter().all(|j| j.attempt == 1));
    // Paged by position: the next page starts after the last job of the previous one.
    let first = store.queued_jobs(None, 2).await?;
    assert_eq!(order(&first), ["b", "e"]);
    let rest = store.queued_jobs(first.last().map(|j| j.key()), 3).await?;
    assert_eq!(order(&rest), ["a", "c", "f"]);
    let last = store.queued_jobs(rest.last().map(|j| j.key()), 3).await?;
    assert_eq!(order(&last), ["d"]);
    store.cancel(&id("c"), "").await?;
    assert_eq!(
        order(&store.queued_jobs(None, 100).await?),
        ["b", "e", "a", "f", "d"]
    );
    Ok(())
}

fn order(job: &str, attempt: u32, at: &str) -> PlacementOrder {
    PlacementOrder {
        job_id: id(job),
        attempt,
        site: SiteRef {
            site_id: at.into(),
            manager_id: format!("{at}-m"),
        },
    }
}

async fn placements_commit_together_and_skip_jobs_that_moved(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    for name in ["p1", "p2", "p3"] {
        store.submit(&job_with(name, 0), false).await?;
    }
    store.cancel(&id("p2"), "changed my mind").await?;
    let head = store.head();
    let placed = store
        .place(&[
            order("p1", 1, "site-a"),
            order("p2", 1, "site-a"),
            order("p3", 2, "site-b"),
            order("missing", 1, "site-a"),
        ])
        .await?;
    let placed: Vec<String> = placed.iter().map(|j| j.job_id.to_string()).collect();
    assert_eq!(
        placed,
        ["p1"],
        "p2 was cancelled, p3 is on attempt 1, not 2"
    );
    let p1 = store.get(&id("p1")).await?;
    assert_eq!(p1.status.state, JobState::StagingIn);
    assert_eq!(
        p1.status.site.as_ref().map(|s| s.manager_id.as_str()),
        Some("site-a-m")
    );
    assert_eq!(p1.sequence, head + 1, "one event, in sequence");
    assert_eq!(store.head(), head + 1, "published");
    let events = store.job_events(&id("p1")).await?;
    assert_eq!(
        events.iter().map(|e| e.state).collect::<Vec<_>>(),
        [JobState::Queued, JobState::StagingIn]
    );
    assert_eq!(store.placed_at_site("site-a").await?.len(), 1);
    assert_eq!(
        store.active_jobs_by_site().await?.get("site-a").copied(),
        Some(1)
    );
    Ok(())
}

fn report(job: &str, attempt: u32, sequence: u64, state: v1::JobState) -> v1::StatusReport {
    v1::StatusReport {
        sequence,
        status: Some(v1::BackendJobStatus {
            job_id: job.into(),
            attempt,
            state: state.into(),
            reason: Some(v1::StateReason {
                code: if state.is_terminal() {
                    v1::ReasonCode::ExitCode.into()
                } else {
                    v1::ReasonCode::Unspecified.into()
                },
                message: String::new(),
                exit_code: state.is_terminal().then_some(0),
            }),
            message: format!("{state:?}").to_lowercase(),
            ..v1::BackendJobStatus::default()
        }),
        observed_at: Some(UnixMicros::now().to_proto()),
        outputs: (state == v1::JobState::Succeeded).then(|| v1::TreeSummary {
            files: 3,
            ..v1::TreeSummary::default()
        }),
    }
}

async fn reports_apply_once_and_walk_legal_paths(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    store.submit(&job_with("r1", 0), false).await?;
    store.place(&[order("r1", 1, "site-a")]).await?;

    // The lease accepted: not news for the state machine.
    let outcome = store
        .apply_report("site-a", &report("r1", 1, 1, v1::JobState::Queued))
        .await?;
    assert!(
        matches!(&outcome, ReportOutcome::Applied { changed: false, job } if job.status.state == JobState::StagingIn),
        "{outcome:?}"
    );
    // A fast job ended between two looks: RUNNING is recorded on the way.
    let outcome = store
        .apply_report("site-a", &report("r1", 1, 2, v1::JobState::Succeeded))
        .await?;
    let ReportOutcome::Applied { job, changed: true } = outcome else {
        panic!("expected the report applied, got {outcome:?}");
    };
    assert_eq!(job.status.state, JobState::Succeeded);
    assert_eq!(job.status.reason.exit_code, Some(0));
    assert_eq!(job.outputs.as_ref().map(|o| o.files), Some(3));
    assert_eq!(job.message, "succeeded");
    let states: Vec<JobState> = store
        .job_events(&id("r1"))
        .await?
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::StagingIn,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    let head = store.head();

    // Replays (after a reconnect) change nothing.
    for sequence in [1, 2] {
        let replay = store
            .apply_report(
                "site-a",
                &report("r1", 1, sequence, v1::JobState::Succeeded),
            )
            .await?;
        assert!(matches!(replay, ReportOutcome::Replay), "{replay:?}");
    }
    assert_eq!(store.head(), head, "no event from a replay");

    // A report beyond the end: the hub ended the attempt already.
    let late = store
        .apply_report("site-a", &report("r1", 1, 3, v1::JobState::Running))
        .await?;
    assert!(matches!(late, ReportOutcome::Ended { .. }), "{late:?}");

    // Another site, another attempt, an unknown job: stale.
    store.submit(&job_with("r2", 0), false).await?;
    store.place(&[order("r2", 1, "site-a")]).await?;
    let elsewhere = store
        .apply_report("site-b", &report("r2", 1, 1, v1::JobState::Running))
        .await?;
    assert!(
        matches!(elsewhere, ReportOutcome::Stale { job: Some(_) }),
        "{elsewhere:?}"
    );
    let old = store
        .apply_report("site-a", &report("r2", 7, 1, v1::JobState::Running))
        .await?;
    assert!(
        matches!(old, ReportOutcome::Stale { job: Some(_) }),
        "{old:?}"
    );
    let unknown = store
        .apply_report("site-a", &report("r-none", 1, 1, v1::JobState::Running))
        .await?;
    assert!(
        matches!(unknown, ReportOutcome::Stale { job: None }),
        "{unknown:?}"
    );
    assert!(matches!(
        store
            .apply_report("site-a", &report("bad id", 1, 1, v1::JobState::Running))
            .await,
        Err(Error::InvalidArgument(_))
    ));

    // Running, then staging out with the run's exit code, then failed: in order.
    store
        .apply_report("site-a", &report("r2", 1, 1, v1::JobState::Running))
        .await?;
    store
        .apply_report("site-a", &report("r2", 1, 2, v1::JobState::StagingOut))
        .await?;
    store
        .apply_report("site-a", &report("r2", 1, 3, v1::JobState::Failed))
        .await?;
    let r2 = store.get(&id("r2")).await?;
    assert_eq!(r2.status.state, JobState::Failed);
    assert!(r2.times.staging_out.is_some() && r2.times.finished.is_some());
    Ok(())
}

async fn uploads_are_claimed_by_one_job_and_expire(db: &TestDb) -> Result<()> {
    let store = db.open().await?;
    let now = UnixMicros::now();
    let upload = |upload_id: &str, job_id: Option<&str>, expires: i64| UploadRecord {
        upload_id: upload_id.into(),
        hub_path: format!("uploads/{upload_id}"),
        job_id: job_id.map(Into::into),
        expected_bytes: 10,
        created_at: now,
        expires_at: UnixMicros(now.0 + expires),
        used_by_job: None,
    };
    store
        .insert_upload(&upload("u1", None, 600_000_000))
        .await?;
    store
        .insert_upload(&upload("u2", Some("job-x"), 600_000_000))
        .await?;
    store.insert_upload(&upload("u3", None, -1)).await?;

    let claimed = store.claim_upload("u1", "job-a").await?;
    assert_eq!(claimed.used_by_job.as_deref(), Some("job-a"));
    store.claim_upload("u1", "job-a").await?;
    let refused = |result: Result<UploadRecord, Error>, part: &str| match result {
        Err(Error::FailedPrecondition(message)) => {
            assert!(message.contains(part), "`{message}` should say `{part}`");
        }
        other => panic!("expected FAILED_PRECONDITION ({part}), got {other:?}"),
    };
    refused(store.claim_upload("u1", "job-b").await, "already uses it");
    refused(
        store.claim_upload("u2", "job-a").await,
        "created for job `job-x`",
    );
    store.claim_upload("u2", "job-x").await?;
    refused(store.claim_upload("u3", "job-a").await, "expired");
    refused(store.claim_upload("u-none", "job-a").await, "not known");

    let expired = store.expired_uploads(UnixMicros::now(), 10).await?;
    assert_eq!(
        expired
            .iter()
            .map(|u| u.upload_id.as_str())
            .collect::<Vec<_>>(),
        ["u3"],
        "used uploads never expire"
    );
    assert!(store.forget_upload("u3").await?);
    assert!(!store.forget_upload("u1").await?, "a used upload stays");
    assert!(store.upload("u3").await?.is_none());
    Ok(())
}

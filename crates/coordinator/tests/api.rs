//! The client API through the generated gRPC client, against a coordinator served
//! in-process on a port-0 listener: what a CLI or the pfcon face sees.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tonic::{Code, Request, Status};

use dispatch_coordinator::state::{JobState, Reason, SiteRef, Transition};
use dispatch_proto::JobId;
use dispatch_proto::v1;
use dispatch_proto::v1::coordinator_client::CoordinatorClient;

use common::{Running, TestDb, spec};

type Client = CoordinatorClient<tonic::transport::Channel>;

/// One change to a valid spec.
type SpecChange = fn(&mut v1::JobSpec);

fn submit(spec: v1::JobSpec) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(spec),
        upload: None,
        retry_if_failed: false,
    }
}

async fn refused<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Status {
    match call.await {
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
        Err(status) => status,
    }
}

fn assert_status(status: &Status, code: Code, message_part: &str) {
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(message_part),
        "`{}` should mention `{message_part}`",
        status.message()
    );
}

async fn job(client: &mut Client, id: &str) -> Result<v1::Job> {
    Ok(client
        .get_job(v1::GetJobRequest { job_id: id.into() })
        .await?
        .into_inner())
}

fn place(at: &str) -> Transition {
    Transition::Enter {
        to: JobState::StagingIn,
        reason: Reason::progress(),
        attempt: None,
        site: Some(SiteRef {
            site_id: at.into(),
            manager_id: "m-1".into(),
        }),
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

fn id(raw: &str) -> JobId {
    JobId::parse(raw).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn submit_replay_conflict_and_retry() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;

    let first = client.submit_job(submit(spec("job-1"))).await?.into_inner();
    assert!(first.created);
    let stored = first.job.context("a job")?;
    assert_eq!(stored.state, v1::JobState::Queued as i32);
    assert_eq!(stored.attempt, 1);
    assert!(stored.submitted_at.is_some() && stored.updated_at.is_some());
    assert!(stored.finished_at.is_none());
    let shown = stored.spec.clone().context("spec")?;
    assert_eq!(
        shown.env,
        ["CHRIS_USER_TOKEN=", "EMPTY="],
        "env values never shown"
    );
    assert_eq!(
        stored.command,
        [
            "python3",
            "/usr/local/bin/dircopy",
            "--dir",
            "/share/incoming",
            "/share/incoming",
            "/share/outgoing"
        ]
    );

    let replay = client.submit_job(submit(spec("job-1"))).await?.into_inner();
    assert!(!replay.created);
    assert_eq!(replay.job.as_ref(), Some(&stored));
    assert_eq!(job(&mut client, "job-1").await?, stored);

    let mut other = spec("job-1");
    other.memory_mib = 600;
    let conflict = refused(client.submit_job(submit(other))).await;
    assert_status(&conflict, Code::AlreadyExists, "memory_mib");

    // A failed job: a plain resubmission is a replay, retry_if_failed a new attempt.
    coordinator
        .store
        .transition(&id("job-1"), place("site-a"), None)
        .await?;
    coordinator
        .store
        .transition(
            &id("job-1"),
            enter(
                JobState::Failed,
                Reason::new(v1::ReasonCode::ImageNotFound, "pull failed"),
            ),
            None,
        )
        .await?;
    let replay = client.submit_job(submit(spec("job-1"))).await?.into_inner();
    assert!(!replay.created);
    let failed = replay.job.context("job")?;
    assert_eq!(failed.state, v1::JobState::Failed as i32);
    assert_eq!(
        failed.reason.as_ref().map(|r| r.code),
        Some(v1::ReasonCode::ImageNotFound as i32)
    );
    assert!(failed.finished_at.is_some());
    let retried = client
        .submit_job(v1::SubmitJobRequest {
            retry_if_failed: true,
            ..submit(spec("job-1"))
        })
        .await?
        .into_inner();
    assert!(retried.created);
    let again = retried.job.context("job")?;
    assert_eq!(again.state, v1::JobState::Queued as i32);
    assert_eq!(again.attempt, 2);
    assert!(again.site_id.is_empty() && again.finished_at.is_none());
    assert!(again.sequence > failed.sequence);
    coordinator.stop().await
}

#[tokio::test]
async fn refusals_name_the_field() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;

    let no_spec = refused(client.submit_job(v1::SubmitJobRequest::default())).await;
    assert_status(&no_spec, Code::InvalidArgument, "spec: is required");

    let cases: [(&str, SpecChange); 6] = [
        ("spec.job_id: cannot be empty", |w| w.job_id.clear()),
        ("spec.image: cannot be empty", |w| w.image.clear()),
        ("spec.entrypoint: cannot be empty", |w| w.entrypoint.clear()),
        ("spec.cpu_millicores: must be greater than 0", |w| {
            w.cpu_millicores = 0;
        }),
        (
            "spec.inputs.shared.input_dirs: must not contain '..'",
            |w| {
                w.inputs = Some(v1::InputSpec {
                    source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
                        input_dirs: vec!["home/../etc".into()],
                    })),
                });
            },
        ),
        ("spec.labels: ", |w| {
            w.labels.insert("bad key".into(), "v".into());
        }),
    ];
    for (message, change) in cases {
        let mut wire = spec("job-bad");
        change(&mut wire);
        let status = refused(client.submit_job(submit(wire))).await;
        assert_status(&status, Code::InvalidArgument, message);
    }

    // Inputs from an upload: only through `upload`, which comes later.
    let mut uploaded = spec("job-up");
    uploaded.storage_mode = v1::StorageMode::Zipfile.into();
    uploaded.output_dir.clear();
    uploaded.inputs = Some(v1::InputSpec {
        source: Some(v1::input_spec::Source::Uploaded(v1::UploadedInputs {
            hub_path: "uploads/someone-elses".into(),
            tree_digest: Default::default(),
        })),
    });
    let status = refused(client.submit_job(submit(uploaded))).await;
    assert_status(&status, Code::InvalidArgument, "spec.inputs.uploaded:");
    let status = refused(client.submit_job(v1::SubmitJobRequest {
        upload: Some(v1::UploadReference {
            upload_id: "u-1".into(),
            tree_digest: Default::default(),
        }),
        ..submit(spec("job-up"))
    }))
    .await;
    assert_status(&status, Code::InvalidArgument, "spec.inputs: must be unset");
    let mut zipfile = spec("job-up");
    zipfile.storage_mode = v1::StorageMode::Zipfile.into();
    zipfile.output_dir.clear();
    zipfile.inputs = None;
    let status = refused(client.submit_job(v1::SubmitJobRequest {
        upload: Some(v1::UploadReference {
            upload_id: "u-1".into(),
            tree_digest: Default::default(),
        }),
        ..submit(zipfile)
    }))
    .await;
    assert_status(&status, Code::FailedPrecondition, "no hub broker");

    let status = refused(client.get_job(v1::GetJobRequest {
        job_id: "no-such-job".into(),
    }))
    .await;
    assert_status(&status, Code::NotFound, "no-such-job");
    let status = refused(client.get_job(v1::GetJobRequest {
        job_id: "a b".into(),
    }))
    .await;
    assert_status(&status, Code::InvalidArgument, "job_id: ");
    let status = refused(client.list_jobs(v1::ListJobsRequest {
        states: vec![99],
        ..Default::default()
    }))
    .await;
    assert_status(&status, Code::InvalidArgument, "states: unknown value 99");
    let status = refused(client.list_jobs(v1::ListJobsRequest {
        page: Some(v1::PageRequest {
            page_size: 1,
            page_token: "forged".into(),
        }),
        ..Default::default()
    }))
    .await;
    assert_status(&status, Code::InvalidArgument, "page.page_token");
    let status = refused(client.cancel_job(v1::CancelJobRequest {
        job_id: "no-such-job".into(),
        message: String::new(),
    }))
    .await;
    assert_status(&status, Code::NotFound, "no-such-job");
    coordinator.stop().await
}

#[tokio::test]
async fn without_a_hub_broker_or_a_site_calls_say_what_they_need() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    let status = refused(client.job_logs(v1::JobLogsRequest {
        job_id: "j".into(),
        tail_lines: None,
        follow: false,
    }))
    .await;
    assert_status(&status, Code::NotFound, "`j`");
    client.submit_job(submit(spec("queued"))).await?;
    let status = refused(client.job_logs(v1::JobLogsRequest {
        job_id: "queued".into(),
        tail_lines: None,
        follow: false,
    }))
    .await;
    assert_status(&status, Code::FailedPrecondition, "never placed");
    let status = refused(client.create_upload(v1::CreateUploadRequest::default())).await;
    assert_status(&status, Code::FailedPrecondition, "no hub broker");
    let status = refused(client.get_job_outputs(v1::GetJobOutputsRequest {
        job_id: "queued".into(),
    }))
    .await;
    assert_status(&status, Code::FailedPrecondition, "not back at the hub");
    let status = refused(client.revoke_site(v1::RevokeSiteRequest::default())).await;
    assert_status(&status, Code::InvalidArgument, "site_id");
    let status = refused(client.revoke_site(v1::RevokeSiteRequest {
        site_id: "site-nope".into(),
        message: String::new(),
    }))
    .await;
    assert_status(&status, Code::NotFound, "site-nope");
    let sites = client
        .list_sites(v1::ListSitesRequest::default())
        .await?
        .into_inner();
    assert!(sites.sites.is_empty() && sites.next_page_token.is_empty());
    coordinator.stop().await
}

#[tokio::test]
async fn list_pages_and_filters() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    for i in 0..5 {
        let mut wire = spec(&format!("job-{i}"));
        wire.labels = HashMap::from([("row".into(), (i % 2).to_string())]);
        client.submit_job(submit(wire)).await?;
    }
    coordinator
        .store
        .transition(&id("job-3"), place("site-x"), None)
        .await?;
    let page = |token: &str, size: u32| v1::ListJobsRequest {
        page: Some(v1::PageRequest {
            page_size: size,
            page_token: token.into(),
        }),
        ..Default::default()
    };
    let names = |jobs: &[v1::Job]| {
        jobs.iter()
            .map(|j| {
                j.spec
                    .as_ref()
                    .map(|s| s.job_id.clone())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
    };
    let first = client.list_jobs(page("", 2)).await?.into_inner();
    assert_eq!(names(&first.jobs), ["job-4", "job-3"]);
    client.submit_job(submit(spec("job-new"))).await?;
    let second = client
        .list_jobs(page(&first.next_page_token, 2))
        .await?
        .into_inner();
    assert_eq!(names(&second.jobs), ["job-2", "job-1"]);
    let last = client
        .list_jobs(page(&second.next_page_token, 2))
        .await?
        .into_inner();
    assert_eq!(names(&last.jobs), ["job-0"]);
    assert!(last.next_page_token.is_empty());

    let filtered = client
        .list_jobs(v1::ListJobsRequest {
            labels: HashMap::from([("row".into(), "1".into())]),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(names(&filtered.jobs), ["job-3", "job-1"]);
    let placed = client
        .list_jobs(v1::ListJobsRequest {
            states: vec![v1::JobState::StagingIn as i32],
            site_id: "site-x".into(),
            auid: "bob".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(names(&placed.jobs), ["job-3"]);
    assert_eq!(placed.jobs[0].site_id, "site-x");
    coordinator.stop().await
}

/// The stream's next event, within a deadline.
async fn next_event(events: &mut tonic::Streaming<v1::JobEvent>) -> Result<v1::JobEvent> {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .context("no event within 10 s")??
        .context("the stream ended")
}

#[tokio::test]
async fn watch_replays_then_follows() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    client.submit_job(submit(spec("job-a"))).await?;
    let b = client
        .submit_job(submit(spec("job-b")))
        .await?
        .into_inner()
        .job
        .context("job")?;

    // From the start: both submissions, then live events.
    let mut all = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Only what happens from now on, only placements.
    let mut placements = client
        .watch_jobs(v1::WatchJobsRequest {
            states: vec![v1::JobState::StagingIn as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = next_event(&mut all).await?;
    assert_eq!(first.job_id, "job-a");
    assert_eq!(first.state, v1::JobState::Queued as i32);
    assert_eq!(first.attempt, 1);
    let second = next_event(&mut all).await?;
    assert_eq!(
        (second.job_id.as_str(), second.sequence),
        ("job-b", b.sequence)
    );

    coordinator
        .store
        .transition(&id("job-b"), place("site-b"), None)
        .await?;
    let cancelled = client
        .cancel_job(v1::CancelJobRequest {
            job_id: "job-a".into(),
            message: "not needed".into(),
        })
        .await?
        .into_inner();
    let live = next_event(&mut all).await?;
    assert_eq!(
        (live.job_id.as_str(), live.state, live.site_id.as_str()),
        ("job-b", v1::JobState::StagingIn as i32, "site-b")
    );
    let live = next_event(&mut all).await?;
    assert_eq!(live.job_id, "job-a");
    assert_eq!(live.state, v1::JobState::Cancelled as i32);
    assert_eq!(live.sequence, cancelled.sequence);
    assert_eq!(
        live.reason.map(|r| (r.code, r.message)),
        Some((v1::ReasonCode::Cancelled as i32, "not needed".to_owned()))
    );
    let placed = next_event(&mut placements).await?;
    assert_eq!(placed.job_id, "job-b");

    // Resuming from the last sequence seen gives nothing twice.
    let mut resumed = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(second.sequence),
            job_ids: vec!["job-a".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(next_event(&mut resumed).await?.sequence, cancelled.sequence);

    let status = refused(client.watch_jobs(v1::WatchJobsRequest {
        after_sequence: Some(1_000_000),
        ..Default::default()
    }))
    .await;
    assert_status(&status, Code::OutOfRange, "beyond the newest event");
    coordinator.store.prune_events_through(2).await?;
    let status = refused(client.watch_jobs(v1::WatchJobsRequest {
        after_sequence: Some(0),
        ..Default::default()
    }))
    .await;
    assert_status(&status, Code::OutOfRange, "pruned");
    coordinator.stop().await
}

#[tokio::test]
async fn cancel_and_delete() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    client.submit_job(submit(spec("job-q"))).await?;
    let cancelled = client
        .cancel_job(v1::CancelJobRequest {
            job_id: "job-q".into(),
            message: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state, v1::JobState::Cancelled as i32);
    assert!(cancelled.finished_at.is_some());
    // Unchanged when asked again.
    let again = client
        .cancel_job(v1::CancelJobRequest {
            job_id: "job-q".into(),
            message: "again".into(),
        })
        .await?
        .into_inner();
    assert_eq!(again, cancelled);

    client.submit_job(submit(spec("job-r"))).await?;
    coordinator
        .store
        .transition(&id("job-r"), place("site-a"), None)
        .await?;
    let running = client
        .cancel_job(v1::CancelJobRequest {
            job_id: "job-r".into(),
            message: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        running.state,
        v1::JobState::StagingIn as i32,
        "the site confirms later"
    );

    let deleted = client
        .delete_job(v1::DeleteJobRequest {
            job_id: "job-q".into(),
            purge: false,
        })
        .await?
        .into_inner();
    assert!(!deleted.purged);
    assert!(deleted.job.context("kept")?.deleted_at.is_some());
    let status = refused(client.delete_job(v1::DeleteJobRequest {
        job_id: "job-r".into(),
        purge: true,
    }))
    .await;
    assert_status(&status, Code::FailedPrecondition, "site-a");
    let purged = client
        .delete_job(v1::DeleteJobRequest {
            job_id: "job-q".into(),
            purge: true,
        })
        .await?
        .into_inner();
    assert!(purged.purged && purged.job.is_none());
    let status = refused(client.get_job(v1::GetJobRequest {
        job_id: "job-q".into(),
    }))
    .await;
    assert_eq!(status.code(), Code::NotFound);
    let fresh = client.submit_job(submit(spec("job-q"))).await?.into_inner();
    assert!(fresh.created, "a purged id is free again");
    coordinator.stop().await
}

#[tokio::test]
async fn token_is_required_and_health_and_reflection_answer() -> Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    const TOKEN: &str = "coordinator-test-token-0123456789";
    let db = TestDb::sqlite()?;
    let token_file = db.dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let mut config = db.config();
    config.insecure_no_auth = false;
    config.token_file = Some(token_file);
    let coordinator = Running::start(config).await?;
    let mut client = coordinator.client().await?;

    let status = refused(client.submit_job(submit(spec("job-1")))).await;
    assert_status(&status, Code::Unauthenticated, "authorization");
    let mut wrong = Request::new(v1::GetJobRequest {
        job_id: "job-1".into(),
    });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token".parse()?);
    let status = refused(client.get_job(wrong)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut right = Request::new(submit(spec("job-1")));
    right
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    assert!(client.submit_job(right).await?.into_inner().created);

    let channel = tonic::transport::Endpoint::from_shared(coordinator.uri.clone())?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dispatch.v1.Coordinator".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.context("a reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"dispatch.v1.Coordinator".to_owned()),
        "{names:?}"
    );
    coordinator.stop().await
}

/// The drain: an open watch is ended (telling its client where to resume) and the server
/// stops well within its grace period, although the client keeps its connection.
#[tokio::test]
async fn shutdown_ends_watches_and_drains() -> Result<()> {
    let db = TestDb::sqlite()?;
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    client.submit_job(submit(spec("job-1"))).await?;
    let mut events = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    next_event(&mut events).await?;

    let started = Instant::now();
    coordinator.stop().await?;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped in {:?}, not within the drain",
        started.elapsed()
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), events.message()).await?;
    match ended {
        Err(status) => assert_status(&status, Code::Unavailable, "after_sequence 1"),
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    Ok(())
}

/// A stopped coordinator's successor on the same data finds everything: the jobs, their
/// events, and the sequence to go on from.
async fn restart_keeps_everything(db: &TestDb) -> Result<()> {
    let coordinator = Running::start(db.config()).await?;
    let mut client = coordinator.client().await?;
    client.submit_job(submit(spec("job-1"))).await?;
    client.submit_job(submit(spec("job-2"))).await?;
    coordinator
        .store
        .transition(&id("job-1"), place("site-a"), None)
        .await?;
    client
        .cancel_job(v1::CancelJobRequest {
            job_id: "job-2".into(),
            message: String::new(),
        })
        .await?;
    let before = (
        job(&mut client, "job-1").await?,
        job(&mut client, "job-2").await?,
    );
    coordinator.stop().await?;

    let successor = Running::start(db.config()).await?;
    let mut client = successor.client().await?;
    let after = (
        job(&mut client, "job-1").await?,
        job(&mut client, "job-2").await?,
    );
    assert_eq!(after, before);
    let replay = client.submit_job(submit(spec("job-1"))).await?.into_inner();
    assert!(!replay.created, "still known: a replay");
    let mut events = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut events).await?;
        seen.push((event.sequence, event.job_id, event.state));
    }
    assert_eq!(
        seen,
        [
            (1, "job-1".to_owned(), v1::JobState::Queued as i32),
            (2, "job-2".to_owned(), v1::JobState::Queued as i32),
            (3, "job-1".to_owned(), v1::JobState::StagingIn as i32),
            (4, "job-2".to_owned(), v1::JobState::Cancelled as i32),
        ]
    );
    client.submit_job(submit(spec("job-3"))).await?;
    assert_eq!(next_event(&mut events).await?.sequence, 5);
    successor.stop().await
}

#[tokio::test]
async fn restart_keeps_everything_sqlite() -> Result<()> {
    restart_keeps_everything(&TestDb::sqlite()?).await
}

#[tokio::test]
async fn restart_keeps_everything_postgres() -> Result<()> {
    restart_keeps_everything(&TestDb::postgres().await?).await
}

//! The manager's site session against a fake coordinator: a real manager over the local
//! backend (plain processes) joins the fake hub, runs what it is leased, reports every
//! state once and in order, survives dropped streams and its own restarts without losing
//! a report, and declines what it has no room for.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dispatch_backend_local::{LocalBackend, LocalConfig};
use dispatch_manager::{Manager, ManagerConfig, SiteSession};
use dispatch_proto::v1::{self as pb, JobState, hub_message, site_message};
use dispatch_testkit::fake_coordinator::{FakeCoordinator, FakeCoordinatorOptions, Received};
use dispatch_testkit::images::plugin_host_path;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey};

const WAIT: Duration = Duration::from_secs(30);

/// A manager's settings for joining `hub`, with its join token written to a file.
fn site_config(dir: &TestDir, hub: &FakeCoordinator) -> Result<ManagerConfig> {
    let store_root = dir.join("store");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&store_root)?;
    std::fs::create_dir_all(&state_dir)?;
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, format!("{}\n", hub.join_token()))?;
    let mut config = ManagerConfig {
        manager_id: format!("session-{}", uuid::Uuid::new_v4().simple()),
        backend: "local".into(),
        store_root,
        state_dir,
        insecure_no_auth: true,
        shutdown_grace_seconds: 5,
        ..ManagerConfig::default()
    };
    config.hub.coordinator_uri = hub.uri.clone();
    config.hub.join_token_file = Some(token_file);
    config
        .hub
        .site_labels
        .insert("region".into(), "test".into());
    config.hub.reconnect_initial_millis = 50;
    config.hub.reconnect_max_seconds = 1;
    config.hub.job_poll_millis = 50;
    Ok(config)
}

/// A manager and its site session, started as the binary would.
struct Site {
    manager: Arc<Manager>,
    session: SiteSession,
}

impl Site {
    async fn start(config: &ManagerConfig) -> Result<Self> {
        // The session's logs, shown with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .try_init();
        let backend = LocalBackend::open(
            &config.manager_id,
            LocalConfig::new(config.state_dir.join("local")),
        )?;
        let manager = Manager::start(config, Arc::new(backend)).await?;
        let session = SiteSession::start(Arc::new(config.clone()), manager.clone()).await?;
        Ok(Self { manager, session })
    }

    /// Shuts the session down (goodbye) and lets go of the backend, as a stopping
    /// manager does; jobs keep running.
    async fn stop(self) {
        self.session.shutdown().await;
        drop(self.manager);
    }
}

fn plugin_spec(job_id: &str, plugin: &str, args: &[&str]) -> Result<pb::JobSpec> {
    let script = plugin_host_path(plugin)?;
    Ok(pb::JobSpec {
        job_id: job_id.into(),
        image: "ignored/by-the-local-backend:1".into(),
        entrypoint: vec!["/bin/sh".into(), script.display().to_string()],
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        plugin_type: pb::PluginType::Fs as i32,
        cpu_millicores: 100,
        memory_mib: 64,
        workers: 1,
        storage_mode: pb::StorageMode::Zipfile as i32,
        ..Default::default()
    })
}

fn lease(spec: pb::JobSpec, attempt: u32) -> pb::RunJobCommand {
    pb::RunJobCommand {
        spec: Some(spec),
        attempt,
        staging: None,
        lease_seconds: 60,
    }
}

fn states(reports: &[(usize, pb::StatusReport)]) -> Vec<JobState> {
    reports
        .iter()
        .filter_map(|(_, r)| r.status.as_ref().map(|s| s.state()))
        .collect()
}

/// The reports without replays, by sequence (checking a replay repeats its original).
fn distinct(reports: Vec<(usize, pb::StatusReport)>) -> Vec<(usize, pb::StatusReport)> {
    let mut seen: Vec<(usize, pb::StatusReport)> = Vec::new();
    for (session, report) in reports {
        match seen.iter().find(|(_, r)| r.sequence == report.sequence) {
            Some((_, first)) => assert_eq!(first.status, report.status, "a replay differs"),
            None => seen.push((session, report)),
        }
    }
    seen.sort_by_key(|(_, r)| r.sequence);
    seen
}

fn sequences(reports: &[(usize, pb::StatusReport)]) -> Vec<u64> {
    reports.iter().map(|(_, r)| r.sequence).collect()
}

/// The first complete reconcile report answering `request_id` on `session`.
fn reconcile_report(
    received: &[Received],
    session: usize,
    request_id: u64,
) -> Option<pb::ReconcileReport> {
    received.iter().find_map(|r| match &r.message {
        site_message::Message::Reconcile(report)
            if r.session == session && report.request_id == request_id && report.complete =>
        {
            Some(report.clone())
        }
        _ => None,
    })
}

#[tokio::test]
async fn joins_once_with_its_token_and_reuses_the_stored_credential() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions {
        lose_first_register_answer: true,
        ..FakeCoordinatorOptions::default()
    })
    .await?;
    let dir = TestDir::new("session-join")?;
    let config = site_config(&dir, &hub)?;
    let site = Site::start(&config).await?;

    let hello = hub.wait_for_session(1, WAIT).await?;
    assert_eq!(Some(hello.site_id.clone()), hub.site_id());
    assert_eq!(Some(hello.site_credential.clone()), hub.credential());
    assert_eq!(hello.manager_id, config.manager_id);
    assert_eq!(hello.protocol_version, 1);
    let capabilities = hello.capabilities.clone().context("no capabilities")?;
    assert_eq!(capabilities.backend_kind(), pb::BackendKind::Local);
    assert_eq!(
        capabilities.labels.get("region").map(String::as_str),
        Some("test")
    );
    assert!(hello.capacity.is_some());

    // The first answer was lost: the retry carried the same request id and got the same
    // site, not a refusal for a used token.
    let registrations = hub.registrations();
    assert_eq!(registrations.len(), 2, "{registrations:?}");
    assert!(!registrations[0].request_id.is_empty());
    assert_eq!(registrations[0].request_id, registrations[1].request_id);
    assert_eq!(registrations[0].join_token, hub.join_token());

    let credential_file = config.credential_file();
    let mode = std::fs::metadata(&credential_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credential file must be private");
    let stored = std::fs::read_to_string(&credential_file)?;
    assert!(stored.contains(&hello.site_id));

    // Every session starts with a reconcile report (empty: nothing runs here yet).
    let report = hub
        .wait_for("the unprompted reconcile report", WAIT, |r| {
            reconcile_report(r, 0, 0)
        })
        .await?;
    assert!(report.jobs.is_empty(), "{report:?}");

    site.stop().await;
    hub.wait_for("a goodbye", WAIT, |received| {
        received
            .iter()
            .find(|r| matches!(r.message, site_message::Message::Goodbye(_)))
            .cloned()
    })
    .await?;

    // A restart needs no token: the stored credential opens the next session.
    std::fs::remove_file(dir.join("join-token"))?;
    let site = Site::start(&config).await?;
    let again = hub.wait_for_session(2, WAIT).await?;
    assert_eq!(again.site_id, hello.site_id);
    assert_eq!(hub.registrations().len(), 2, "no second registration");
    site.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn runs_a_leased_job_and_reports_each_state_once_in_order() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("session-run")?;
    let config = site_config(&dir, &hub)?;
    let site = Site::start(&config).await?;
    hub.wait_for_session(1, WAIT).await?;

    let spec = plugin_spec("job-order", "sleep.sh", &["--seconds", "1"])?;
    hub.run_job(lease(spec, 1)).await?;
    let done = hub
        .wait_for_state("job-order", JobState::Succeeded, WAIT)
        .await?;
    let reports = hub.status_reports("job-order");
    assert_eq!(
        states(&reports),
        [JobState::Queued, JobState::Running, JobState::Succeeded]
    );
    assert_eq!(sequences(&reports), [1, 2, 3]);
    assert!(
        reports
            .iter()
            .all(|(_, r)| r.status.as_ref().is_some_and(|s| s.attempt == 1))
    );
    let status = done.status.context("no status")?;
    assert_eq!(status.reason.and_then(|r| r.exit_code), Some(0));
    assert!(done.observed_at.is_some());

    // Free capacity was advertised as the job came and went.
    hub.wait_for("a capacity update counting the job", WAIT, |received| {
        received.iter().find_map(|r| match &r.message {
            site_message::Message::Capacity(c) if c.active_jobs == 1 => Some(()),
            _ => None,
        })
    })
    .await?;

    // The hub relays the job's log through the session.
    hub.send(hub_message::Message::FollowLogs(pb::FollowLogsCommand {
        request_id: 9,
        job_id: "job-order".into(),
        tail_lines: None,
        follow: false,
    }))
    .await?;
    let text = hub
        .wait_for("the whole log", WAIT, |received| {
            let chunks: Vec<&pb::LogChunk> = received
                .iter()
                .filter_map(|r| match &r.message {
                    site_message::Message::Logs(data) if data.request_id == 9 => {
                        data.chunk.as_ref()
                    }
                    _ => None,
                })
                .collect();
            chunks.iter().any(|c| c.eof).then(|| {
                chunks
                    .iter()
                    .flat_map(|c| c.data.iter().copied())
                    .collect::<Vec<u8>>()
            })
        })
        .await?;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("started") && text.contains("done"),
        "log: {text}"
    );

    // Heartbeats flow at the hub's interval (1 s here).
    hub.wait_for("a heartbeat", WAIT, |received| {
        received
            .iter()
            .find(|r| matches!(r.message, site_message::Message::Heartbeat(_)))
            .cloned()
    })
    .await?;

    hub.remove_job("job-order", 1, true).await?;
    wait_until_gone(&site.manager, "job-order").await?;
    assert!(!config.store_root.join("key-job-order").exists());
    site.stop().await;
    hub.stop().await
}

async fn wait_until_gone(manager: &Manager, job_id: &str) -> Result<()> {
    let id = dispatch_proto::JobId::parse(job_id)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while manager.status(&id).await.is_ok() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{job_id} was not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn reports_left_unacknowledged_are_sent_again_after_a_reconnect() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions {
        auto_ack: false,
        ..FakeCoordinatorOptions::default()
    })
    .await?;
    let dir = TestDir::new("session-resend")?;
    let config = site_config(&dir, &hub)?;
    let site = Site::start(&config).await?;
    hub.wait_for_session(1, WAIT).await?;

    let spec = plugin_spec("job-resend", "sleep.sh", &["--seconds", "2"])?;
    hub.run_job(lease(spec, 1)).await?;
    hub.wait_for_state("job-resend", JobState::Running, WAIT)
        .await?;
    assert!(hub.drop_session(), "a session was open");
    hub.wait_for_session(2, WAIT).await?;
    hub.wait_for_state("job-resend", JobState::Succeeded, WAIT)
        .await?;

    let reports = hub.status_reports("job-resend");
    let on_second: Vec<u64> = reports
        .iter()
        .filter(|(session, _)| *session == 1)
        .map(|(_, r)| r.sequence)
        .collect();
    assert!(
        on_second.starts_with(&[1, 2]),
        "the new session starts with the unacknowledged reports: {on_second:?}"
    );
    // Duplicates are the same report again: same sequence, same state.
    for (_, report) in &reports {
        let first = reports
            .iter()
            .find(|(_, r)| r.sequence == report.sequence)
            .map(|(_, r)| r.status.as_ref().map(|s| s.state()));
        assert_eq!(first, Some(report.status.as_ref().map(|s| s.state())));
    }
    let mut distinct = sequences(&reports);
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct, [1, 2, 3], "no report lost, none invented");

    // Once acknowledged, reports are not sent again.
    hub.ack("job-resend", 1, 3).await?;
    assert!(hub.drop_session());
    hub.wait_for_session(3, WAIT).await?;
    hub.wait_for("the third session's reconcile report", WAIT, |r| {
        reconcile_report(r, 2, 0)
    })
    .await?;
    let resent = hub
        .status_reports("job-resend")
        .into_iter()
        .filter(|(session, _)| *session == 2)
        .count();
    assert_eq!(resent, 0, "acknowledged reports must not come back");
    let outbox = std::fs::read_dir(config.state_dir.join("outbox"))?.count();
    assert_eq!(outbox, 0, "a finished, acknowledged attempt leaves no file");

    site.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn a_cancel_from_the_hub_stops_the_job() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("session-cancel")?;
    let config = site_config(&dir, &hub)?;
    let site = Site::start(&config).await?;
    hub.wait_for_session(1, WAIT).await?;

    let spec = plugin_spec("job-cancel", "sleep.sh", &["--seconds", "60"])?;
    hub.run_job(lease(spec, 2)).await?;
    hub.wait_for_state("job-cancel", JobState::Running, WAIT)
        .await?;
    // A cancel for an attempt that is not the one running changes nothing.
    hub.cancel_job("job-cancel", 1, "stale").await?;
    hub.cancel_job("job-cancel", 2, "the user changed their mind")
        .await?;
    let cancelled = hub
        .wait_for_state("job-cancel", JobState::Cancelled, WAIT)
        .await?;
    let reason = cancelled
        .status
        .and_then(|s| s.reason)
        .context("no reason")?;
    assert_eq!(reason.code(), pb::ReasonCode::Cancelled);
    assert!(
        reason.message.contains("changed their mind"),
        "{}",
        reason.message
    );
    assert_eq!(
        states(&hub.status_reports("job-cancel")),
        [JobState::Queued, JobState::Running, JobState::Cancelled]
    );
    hub.remove_job("job-cancel", 2, true).await?;
    wait_until_gone(&site.manager, "job-cancel").await?;
    site.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn a_restarted_manager_reconciles_and_keeps_reporting_its_running_job() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("session-restart")?;
    let config = site_config(&dir, &hub)?;
    let site = Site::start(&config).await?;
    hub.wait_for_session(1, WAIT).await?;

    let spec = plugin_spec("job-restart", "sleep.sh", &["--seconds", "60"])?;
    hub.run_job(lease(spec, 3)).await?;
    hub.wait_for_state("job-restart", JobState::Running, WAIT)
        .await?;
    site.stop().await;

    let site = Site::start(&config).await?;
    hub.wait_for_session(2, WAIT).await?;
    let report = hub
        .wait_for("the reconcile report after the restart", WAIT, |r| {
            reconcile_report(r, 1, 0)
        })
        .await?;
    let job = report
        .jobs
        .iter()
        .find(|j| j.job_id == "job-restart")
        .with_context(|| format!("the running job is missing from {report:?}"))?;
    assert_eq!(job.state(), JobState::Running);
    assert_eq!(
        job.attempt, 3,
        "the attempt survives in the backend's labels"
    );

    hub.request_reconcile(7).await?;
    let asked = hub
        .wait_for("the requested reconcile report", WAIT, |r| {
            reconcile_report(r, 1, 7)
        })
        .await?;
    assert!(asked.jobs.iter().any(|j| j.job_id == "job-restart"));

    // The resumed lease keeps numbering where the first run left off.
    hub.cancel_job("job-restart", 3, "done testing").await?;
    hub.wait_for_state("job-restart", JobState::Cancelled, WAIT)
        .await?;
    // A report whose ack the stop overtook comes again after the restart: a replay,
    // same sequence, which the hub ignores.
    let reports = distinct(hub.status_reports("job-restart"));
    assert_eq!(
        states(&reports),
        [JobState::Queued, JobState::Running, JobState::Cancelled]
    );
    assert_eq!(sequences(&reports), [1, 2, 3]);
    hub.remove_job("job-restart", 0, true).await?;
    wait_until_gone(&site.manager, "job-restart").await?;
    site.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn work_over_capacity_or_beyond_the_site_is_declined() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("session-decline")?;
    let mut config = site_config(&dir, &hub)?;
    config.hub.max_concurrent_jobs = 1;
    let site = Site::start(&config).await?;
    let hello = hub.wait_for_session(1, WAIT).await?;
    assert_eq!(
        hello.capabilities.as_ref().map(|c| c.max_concurrent_jobs),
        Some(1)
    );
    assert_eq!(hello.capacity.map(|c| c.free_job_slots), Some(1));

    let first = plugin_spec("job-first", "sleep.sh", &["--seconds", "60"])?;
    hub.run_job(lease(first, 1)).await?;
    hub.wait_for_state("job-first", JobState::Running, WAIT)
        .await?;
    let second = plugin_spec("job-second", "sleep.sh", &["--seconds", "1"])?;
    hub.run_job(lease(second, 1)).await?;
    let mut wide = plugin_spec("job-wide", "sleep.sh", &["--seconds", "1"])?;
    wide.workers = 4;
    hub.run_job(lease(wide, 1)).await?;

    let declined = |job: &'static str| {
        move |received: &[Received]| {
            received.iter().find_map(|r| match &r.message {
                site_message::Message::Declined(d) if d.job_id == job => Some(d.clone()),
                _ => None,
            })
        }
    };
    let no_room = hub
        .wait_for("job-second declined", WAIT, declined("job-second"))
        .await?;
    assert_eq!(no_room.reason(), pb::DeclineReason::NoCapacity);
    assert_eq!(no_room.attempt, 1);
    let never = hub
        .wait_for("job-wide declined", WAIT, declined("job-wide"))
        .await?;
    assert_eq!(never.reason(), pb::DeclineReason::Unsupported);
    assert!(never.message.contains("workers"), "{}", never.message);
    assert!(hub.status_reports("job-second").is_empty());
    hub.wait_for("no free slot advertised", WAIT, |received| {
        received.iter().find_map(|r| match &r.message {
            site_message::Message::Capacity(c) if c.free_job_slots == 0 && c.active_jobs == 1 => {
                Some(())
            }
            _ => None,
        })
    })
    .await?;

    hub.cancel_job("job-first", 1, "cleanup").await?;
    hub.wait_for_state("job-first", JobState::Cancelled, WAIT)
        .await?;
    hub.remove_job("job-first", 1, true).await?;
    wait_until_gone(&site.manager, "job-first").await?;
    site.stop().await;
    hub.stop().await
}

/// A CUBE-like upload at the hub: two files, one in a subdirectory.
fn hub_inputs(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("uploads/u1/sub"))?;
    std::fs::write(root.join("uploads/u1/a.txt"), "input a\n")?;
    std::fs::write(root.join("uploads/u1/sub/b.txt"), "input b\n")?;
    Ok(())
}

#[tokio::test]
async fn a_staged_job_pulls_its_inputs_and_pushes_its_outputs_through_the_brokers() -> Result<()> {
    let hub = FakeCoordinator::start(FakeCoordinatorOptions::default()).await?;
    let dir = TestDir::new("session-staging")?;
    let mut config = site_config(&dir, &hub)?;
    std::fs::create_dir_all(dir.join("hub-keys"))?;
    std::fs::create_dir_all(dir.join("site-keys"))?;
    let hub_key = TestKey::create(&dir.join("hub-keys"))?;
    let site_key = TestKey::create(&dir.join("site-keys"))?;
    hub_inputs(&dir.join("hub"))?;
    let hub_broker = InProcessBroker::start(&dir.join("hub"), Some(&hub_key), |_| {}).await?;
    // The site broker fronts the manager's own store.
    let site_broker = InProcessBroker::start(&config.store_root, Some(&site_key), |_| {}).await?;
    let grant_file = dir.join("site-broker.grant");
    std::fs::write(&grant_file, site_key.admin())?;
    config.hub.site_broker_uri = site_broker.uri.clone();
    config.hub.site_broker_grant_file = Some(grant_file);
    let site = Site::start(&config).await?;
    let hello = hub.wait_for_session(1, WAIT).await?;
    let store_id = hello
        .capabilities
        .map(|c| c.site_store_id)
        .unwrap_or_default();
    assert!(
        !store_id.is_empty(),
        "the site broker's store id is advertised"
    );

    let job = "job-staged";
    let mut spec = plugin_spec(job, "copy.sh", &[])?;
    spec.plugin_type = pb::PluginType::Ds as i32;
    let output = "home/alice/feed/out";
    let plan = pb::StagingPlan {
        hub_broker: Some(pb::Endpoint {
            uri: hub_broker.uri.clone(),
            ..Default::default()
        }),
        hub_inputs: Some(pb::JobInputs {
            input_dirs: vec!["uploads/u1".into()],
            output_dir: output.into(),
        }),
        hub_output_path: output.into(),
        input_grant: hub_key
            .key
            .mint_for(job, &["uploads/u1"], &[], Duration::from_secs(600)),
        output_grant: hub_key
            .key
            .mint_for(job, &[], &[output], Duration::from_secs(600)),
        grants_expire_at: None,
        method: pb::StageMethod::Transfer as i32,
        compression: pb::Compression::Gzip as i32,
    };
    hub.run_job(pb::RunJobCommand {
        spec: Some(spec),
        attempt: 1,
        staging: Some(plan),
        lease_seconds: 60,
    })
    .await?;
    let done = hub.wait_for_state(job, JobState::Succeeded, WAIT).await?;

    let seen = states(&hub.status_reports(job));
    assert_eq!(seen.first(), Some(&JobState::StagingIn), "{seen:?}");
    assert!(seen.contains(&JobState::StagingOut), "{seen:?}");
    assert_eq!(seen.last(), Some(&JobState::Succeeded), "{seen:?}");
    assert!(
        !seen.contains(&JobState::Queued),
        "a staged job never goes back to QUEUED: {seen:?}"
    );
    let summary = done
        .outputs
        .context("the terminal report carries outputs")?;
    assert_eq!(
        summary.files, 3,
        "a.txt, sub/b.txt and run.json: {summary:?}"
    );

    let incoming = config.store_root.join(format!("key-{job}/incoming"));
    assert_eq!(
        std::fs::read_to_string(incoming.join("sub/b.txt"))?,
        "input b\n"
    );
    let delivered = dir.join("hub").join(output);
    assert_eq!(
        std::fs::read_to_string(delivered.join("a.txt"))?,
        "input a\n"
    );
    assert_eq!(
        std::fs::read_to_string(delivered.join("sub/b.txt"))?,
        "input b\n"
    );
    assert!(delivered.join("run.json").exists());

    hub.remove_job(job, 1, true).await?;
    wait_until_gone(&site.manager, job).await?;
    site.stop().await;
    site_broker.stop().await?;
    hub_broker.stop().await?;
    hub.stop().await
}

//! Sites against the coordinator, both served in-process: real managers (the local
//! backend, plain `sh` processes) join with join tokens, take leases, report, and are
//! killed; and a scripted site speaking the protocol directly where a test needs to send
//! exactly the messages it wants (replays, wrong credentials).

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, ensure};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use dispatch_coordinator::config::LossPolicy;
use dispatch_coordinator::secret::{self, Purpose};
use dispatch_coordinator::store::{NewJoinToken, UnixMicros};
use dispatch_proto::JobId;
use dispatch_proto::v1::site_registry_client::SiteRegistryClient;
use dispatch_proto::v1::{self, hub_message, site_message};
use dispatch_testkit::TestDir;

use common::site::{
    KillableSite, Site, SiteOptions, WAIT, ended, hub_config, join_token, manager_config,
    plugin_job, states, submit, unique_name, wait_connected, wait_health, watch_until,
};
use common::{Running, TestDb};

type Registry = SiteRegistryClient<tonic::transport::Channel>;

/// One change to a valid spec.
type SpecChange = fn(&mut v1::JobSpec);

fn assert_status(status: &Status, code: Code, part: &str) {
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(part),
        "`{}` should mention `{part}`",
        status.message()
    );
}

#[tokio::test]
async fn a_job_runs_at_a_real_site_and_every_state_is_watched_sqlite() -> Result<()> {
    a_job_runs_at_a_real_site_and_every_state_is_watched(&TestDb::sqlite()?).await
}

#[tokio::test]
async fn a_job_runs_at_a_real_site_and_every_state_is_watched_postgres() -> Result<()> {
    a_job_runs_at_a_real_site_and_every_state_is_watched(&TestDb::postgres().await?).await
}

async fn a_job_runs_at_a_real_site_and_every_state_is_watched(db: &TestDb) -> Result<()> {
    let hub = Running::start(hub_config(db)).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("site-run")?;
    // A name of its own: the SQLite and PostgreSQL runs go at once, and the local backend
    // names its cgroups after the manager and the job.
    let name = unique_name("alpha");
    let token = join_token(&mut client, &dir, &name).await?;
    let config = manager_config(&dir, &name, &hub.uri, token, &SiteOptions::default())?;
    let site = Site::start(&config).await?;
    let site_id = wait_connected(&mut client, &name).await?;

    let job = submit(
        &mut client,
        plugin_job("run-1", "sleep.sh", &["--seconds", "1"])?,
    )
    .await?;
    assert_eq!(job.state(), v1::JobState::Queued);
    let events = watch_until(&mut client, "run-1", ended).await?;
    assert_eq!(
        states(&events),
        [
            v1::JobState::Queued,
            v1::JobState::StagingIn,
            v1::JobState::Running,
            v1::JobState::Succeeded
        ]
    );
    assert!(
        events[1..]
            .iter()
            .all(|e| e.site_id == site_id && e.attempt == 1)
    );
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    let done = client
        .get_job(v1::GetJobRequest {
            job_id: "run-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(done.state(), v1::JobState::Succeeded);
    assert_eq!(done.site_id, site_id);
    assert_eq!(done.manager_id, config.manager_id);
    assert_eq!(done.reason.as_ref().and_then(|r| r.exit_code), Some(0));
    assert!(done.running_at.is_some() && done.finished_at.is_some());

    // The log comes from the site, through its session.
    let mut log = client
        .job_logs(v1::JobLogsRequest {
            job_id: "run-1".into(),
            tail_lines: None,
            follow: false,
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = log.message().await? {
        text.extend_from_slice(&chunk.data);
        if chunk.eof {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("started") && text.contains("done"), "{text}");

    // The site says goodbye: DISCONNECTED (its jobs would wait for it), not unreachable.
    site.stop().await;
    wait_health(&mut client, &site_id, v1::SiteHealth::Disconnected).await?;
    let status = client
        .job_logs(v1::JobLogsRequest {
            job_id: "run-1".into(),
            tail_lines: Some(1),
            follow: false,
        })
        .await
        .expect_err("no site to relay from");
    assert_status(&status, Code::Unavailable, "not connected");
    hub.stop().await
}

#[tokio::test]
async fn two_sites_get_jobs_by_labels_and_capacity() -> Result<()> {
    let db = TestDb::sqlite()?;
    let hub = Running::start(hub_config(&db)).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("site-two")?;
    let small_token = join_token(&mut client, &dir, "small").await?;
    let big_token = join_token(&mut client, &dir, "big").await?;
    let small = Site::start(&manager_config(
        &dir,
        "small",
        &hub.uri,
        small_token,
        &SiteOptions {
            labels: vec![("tier", "small")],
            max_jobs: 1,
            broker: None,
        },
    )?)
    .await?;
    let big = Site::start(&manager_config(
        &dir,
        "big",
        &hub.uri,
        big_token,
        &SiteOptions {
            labels: vec![("tier", "big")],
            max_jobs: 3,
            broker: None,
        },
    )?)
    .await?;
    let small_id = wait_connected(&mut client, "small").await?;
    let big_id = wait_connected(&mut client, "big").await?;

    let mut head = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(0),
            ..v1::WatchJobsRequest::default()
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut spec = plugin_job(&format!("pinned-{i}"), "sleep.sh", &["--seconds", "1"])?;
        spec.placement = Some(v1::Placement {
            site_labels: HashMap::from([("tier".into(), "small".into())]),
            ..v1::Placement::default()
        });
        ids.push(spec.job_id.clone());
        submit(&mut client, spec).await?;
    }
    for i in 0..4 {
        let spec = plugin_job(&format!("free-{i}"), "sleep.sh", &["--seconds", "1"])?;
        ids.push(spec.job_id.clone());
        submit(&mut client, spec).await?;
    }

    // Follow every event in log order: no site ever holds more than its slots.
    let mut active: HashMap<String, Vec<String>> = HashMap::new();
    let mut site_of: HashMap<String, String> = HashMap::new();
    let mut finished = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while finished < ids.len() {
        let event = tokio::time::timeout_at(deadline, head.message())
            .await
            .context("timed out waiting for the jobs to end")??
            .context("the watch ended")?;
        match event.state() {
            v1::JobState::StagingIn => {
                site_of.insert(event.job_id.clone(), event.site_id.clone());
                let held = active.entry(event.site_id.clone()).or_default();
                held.push(event.job_id.clone());
                let limit = if event.site_id == small_id { 1 } else { 3 };
                ensure!(
                    held.len() <= limit,
                    "site {} holds {held:?}, more than its {limit} slots",
                    event.site_id
                );
            }
            state if state.is_terminal() => {
                ensure!(state == v1::JobState::Succeeded, "{event:?}");
                finished += 1;
                if let Some(held) = active.get_mut(&event.site_id) {
                    held.retain(|j| *j != event.job_id);
                }
            }
            _ => {}
        }
    }
    for i in 0..3 {
        assert_eq!(
            site_of.get(&format!("pinned-{i}")),
            Some(&small_id),
            "jobs asking for tier=small run there"
        );
    }
    let on_big = site_of.values().filter(|s| **s == big_id).count();
    assert!(on_big >= 2, "the big site took most free jobs: {site_of:?}");

    small.stop().await;
    big.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn a_site_killed_mid_job_loses_it_to_another_site_and_removes_it_on_return() -> Result<()> {
    let db = TestDb::sqlite()?;
    let mut config = hub_config(&db);
    config.sites.loss_policy = LossPolicy::Requeue;
    let hub = Running::start(config).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("site-kill")?;
    let doomed_token = join_token(&mut client, &dir, "doomed").await?;
    let doomed_config = manager_config(
        &dir,
        "doomed",
        &hub.uri,
        doomed_token,
        &SiteOptions::default(),
    )?;
    let doomed = KillableSite::start(&doomed_config)?;
    let doomed_id = wait_connected(&mut client, "doomed").await?;

    submit(
        &mut client,
        plugin_job("survivor", "sleep.sh", &["--seconds", "3"])?,
    )
    .await?;
    watch_until(&mut client, "survivor", |events| {
        events.iter().any(|e| e.state() == v1::JobState::Running)
    })
    .await?;

    // A second site joins, then the first dies without a word.
    let spare_token = join_token(&mut client, &dir, "spare").await?;
    let spare = Site::start(&manager_config(
        &dir,
        "spare",
        &hub.uri,
        spare_token,
        &SiteOptions::default(),
    )?)
    .await?;
    let spare_id = wait_connected(&mut client, "spare").await?;
    doomed.kill()?;

    let events = watch_until(&mut client, "survivor", ended).await?;
    let terminal: Vec<&v1::JobEvent> = events.iter().filter(|e| e.state().is_terminal()).collect();
    assert_eq!(terminal.len(), 1, "{events:#?}");
    assert_eq!(terminal[0].state(), v1::JobState::Succeeded);
    assert_eq!(terminal[0].site_id, spare_id);
    assert_eq!(terminal[0].attempt, 2);
    let requeued = events
        .iter()
        .find(|e| e.state() == v1::JobState::Queued && e.attempt == 2)
        .context("the job went back to the queue")?;
    let reason = requeued.reason.clone().unwrap_or_default();
    assert_eq!(reason.code(), v1::ReasonCode::Requeued);
    assert!(reason.message.contains("doomed"), "{reason:?}");
    wait_health(&mut client, &doomed_id, v1::SiteHealth::Unreachable).await?;

    // The dead site comes back: it is told to remove the attempt it held, and its
    // reports about it change nothing.
    let back = Site::start(&doomed_config).await?;
    wait_connected(&mut client, "doomed").await?;
    let id = JobId::parse("survivor")?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while back.manager.status(&id).await.is_ok() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the old attempt was not removed from the returning site"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = hub.store.job_events(&id).await?;
    assert_eq!(
        stored.iter().filter(|e| e.state.is_terminal()).count(),
        1,
        "exactly one terminal state: {stored:#?}"
    );
    let job = hub.store.get(&id).await?;
    assert_eq!(job.status.attempt, 2);
    back.stop().await;
    spare.stop().await;
    hub.stop().await
}

#[tokio::test]
async fn with_the_fail_policy_a_lost_site_ends_its_jobs_lost() -> Result<()> {
    let db = TestDb::sqlite()?;
    let mut config = hub_config(&db);
    config.sites.loss_policy = LossPolicy::Fail;
    let hub = Running::start(config).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("site-fail")?;
    let token = join_token(&mut client, &dir, "flaky").await?;
    let site = KillableSite::start(&manager_config(
        &dir,
        "flaky",
        &hub.uri,
        token,
        &SiteOptions::default(),
    )?)?;
    wait_connected(&mut client, "flaky").await?;
    submit(
        &mut client,
        plugin_job("doomed-job", "sleep.sh", &["--seconds", "5"])?,
    )
    .await?;
    watch_until(&mut client, "doomed-job", |events| {
        events.iter().any(|e| e.state() == v1::JobState::Running)
    })
    .await?;
    site.kill()?;
    let events = watch_until(&mut client, "doomed-job", ended).await?;
    let last = events.last().context("events")?;
    assert_eq!(last.state(), v1::JobState::Lost);
    assert_eq!(
        last.reason.as_ref().map(v1::StateReason::code),
        Some(v1::ReasonCode::SiteLost)
    );
    hub.stop().await
}

async fn registry(hub: &Running) -> Result<Registry> {
    Ok(SiteRegistryClient::connect(hub.uri.clone()).await?)
}

fn capabilities(max_cpu: u32) -> v1::Capabilities {
    v1::Capabilities {
        backend_kind: v1::BackendKind::Local.into(),
        total: Some(v1::Resources {
            cpu_millicores: max_cpu,
            memory_mib: 4096,
            gpus: 0,
        }),
        max_per_job: Some(v1::Resources {
            cpu_millicores: max_cpu,
            memory_mib: 4096,
            gpus: 0,
        }),
        storage_modes: vec![
            v1::StorageMode::Zipfile.into(),
            v1::StorageMode::Fslink.into(),
        ],
        max_workers: 1,
        ..v1::Capabilities::default()
    }
}

fn register(token: &str, request_id: &str) -> v1::RegisterRequest {
    v1::RegisterRequest {
        join_token: token.into(),
        site_name: "scripted".into(),
        manager_id: "scripted-manager".into(),
        capabilities: Some(capabilities(4000)),
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn used_expired_and_unknown_join_tokens_are_refused() -> Result<()> {
    let db = TestDb::sqlite()?;
    let hub = Running::start(hub_config(&db)).await?;
    let mut client = hub.client().await?;
    let mut sites = registry(&hub).await?;

    let token = client
        .create_join_token(v1::CreateJoinTokenRequest {
            site_name: "lab".into(),
            ttl_seconds: 600,
            labels: HashMap::from([("room".into(), "b12".into())]),
        })
        .await?
        .into_inner();
    assert!(token.join_token.starts_with("djt1_"));
    assert!(!token.token_id.is_empty() && token.expires_at.is_some());
    let first = sites
        .register(register(&token.join_token, "r-1"))
        .await?
        .into_inner();
    assert!(!first.site_id.is_empty() && first.site_credential.starts_with("dsc1_"));
    assert_eq!(first.config.map(|c| c.heartbeat_interval_seconds), Some(1));

    // Used: refused; the same request again (a lost answer): the same site.
    let status = sites
        .register(register(&token.join_token, "r-2"))
        .await
        .expect_err("used");
    assert_status(&status, Code::Unauthenticated, "already used");
    let replay = sites
        .register(register(&token.join_token, "r-1"))
        .await?
        .into_inner();
    assert_eq!(replay.site_id, first.site_id);

    // Expired (made in the past through the store) and unknown tokens: refused.
    let expired = secret::generate(Purpose::JoinToken)?;
    let now = UnixMicros::now();
    hub.store
        .insert_join_token(&NewJoinToken {
            token_id: "jt-old".into(),
            hash: secret::hash(Purpose::JoinToken, &expired),
            site_name: String::new(),
            admin_labels: Default::default(),
            created_at: UnixMicros(now.0 - 7_200_000_000),
            expires_at: UnixMicros(now.0 - 3_600_000_000),
        })
        .await?;
    let status = sites
        .register(register(&expired, "r-3"))
        .await
        .expect_err("expired");
    assert_status(&status, Code::Unauthenticated, "expired");
    let status = sites
        .register(register("djt1_made-up", "r-4"))
        .await
        .expect_err("unknown");
    assert_status(&status, Code::Unauthenticated, "unknown join token");

    // The site as an admin sees it: labels from the token over the manager's.
    let listed = client
        .list_sites(v1::ListSitesRequest::default())
        .await?
        .into_inner()
        .sites;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "lab");
    assert_eq!(
        listed[0].labels.get("room").map(String::as_str),
        Some("b12")
    );
    assert_eq!(listed[0].health(), v1::SiteHealth::Disconnected);

    // A hello with the wrong credential, then a revoked site's: refused.
    let (_tx, status) = open(&mut sites, &replay.site_id, "dsc1_wrong").await;
    assert_status(
        &status.expect_err("wrong credential"),
        Code::Unauthenticated,
        "credential",
    );
    let revoked = client
        .revoke_site(v1::RevokeSiteRequest {
            site_id: replay.site_id.clone(),
            message: "retired".into(),
        })
        .await?
        .into_inner();
    assert_eq!(revoked.health(), v1::SiteHealth::Revoked);
    let (_tx, status) = open(&mut sites, &replay.site_id, &replay.site_credential).await;
    assert_status(
        &status.expect_err("revoked"),
        Code::Unauthenticated,
        "revoked",
    );
    let heartbeat = sites
        .heartbeat(v1::HeartbeatRequest {
            site_id: replay.site_id.clone(),
            site_credential: replay.site_credential.clone(),
            manager_id: "scripted-manager".into(),
            capacity: None,
        })
        .await
        .expect_err("revoked");
    assert_status(&heartbeat, Code::Unauthenticated, "revoked");
    hub.stop().await
}

/// Opens a session saying hello; the outbound sender and the first answer.
async fn open(
    sites: &mut Registry,
    site_id: &str,
    credential: &str,
) -> (
    mpsc::Sender<v1::SiteMessage>,
    Result<tonic::Streaming<v1::HubMessage>, Status>,
) {
    let (tx, rx) = mpsc::channel(64);
    let hello = v1::SiteMessage {
        message: Some(site_message::Message::Hello(v1::SiteHello {
            site_id: site_id.into(),
            site_credential: credential.into(),
            manager_id: "scripted-manager".into(),
            capabilities: Some(capabilities(4000)),
            capacity: Some(v1::CapacityUpdate {
                free: Some(v1::Resources {
                    cpu_millicores: 4000,
                    memory_mib: 4096,
                    gpus: 0,
                }),
                free_job_slots: 0,
                active_jobs: 0,
            }),
            protocol_version: 1,
        })),
    };
    let _ = tx.send(hello).await;
    let opened = sites
        .session(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    let opened = match opened {
        Ok(mut inbound) => match inbound.message().await {
            Ok(Some(v1::HubMessage {
                message: Some(hub_message::Message::Accepted(_)),
            })) => Ok(inbound),
            Ok(other) => Err(Status::internal(format!(
                "expected accepted, got {other:?}"
            ))),
            Err(status) => Err(status),
        },
        Err(status) => Err(status),
    };
    (tx, opened)
}

/// The next message of `kind` from the hub (others are skipped).
async fn next<T>(
    inbound: &mut tonic::Streaming<v1::HubMessage>,
    pick: impl Fn(hub_message::Message) -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .context("timed out waiting for the hub")??
            .context("the hub ended the session")?;
        if let Some(found) = message.message.and_then(&pick) {
            return Ok(found);
        }
    }
}

fn report(lease: &v1::RunJobCommand, sequence: u64, state: v1::JobState) -> v1::SiteMessage {
    let job_id = lease
        .spec
        .as_ref()
        .map(|s| s.job_id.clone())
        .unwrap_or_default();
    v1::SiteMessage {
        message: Some(site_message::Message::Status(v1::StatusReport {
            sequence,
            status: Some(v1::BackendJobStatus {
                job_id,
                attempt: lease.attempt,
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
                manager_id: "scripted-manager".into(),
                ..v1::BackendJobStatus::default()
            }),
            observed_at: Some(SystemTime::now().into()),
            outputs: None,
        })),
    }
}

fn acked(message: hub_message::Message) -> Option<v1::StatusAck> {
    match message {
        hub_message::Message::StatusAck(ack) => Some(ack),
        _ => None,
    }
}

#[tokio::test]
async fn status_reports_replayed_after_a_reconnect_change_nothing() -> Result<()> {
    let db = TestDb::sqlite()?;
    let hub = Running::start(hub_config(&db)).await?;
    let mut client = hub.client().await?;
    let mut sites = registry(&hub).await?;
    let token = client
        .create_join_token(v1::CreateJoinTokenRequest::default())
        .await?
        .into_inner();
    let site = sites
        .register(register(&token.join_token, "r"))
        .await?
        .into_inner();
    let (tx, inbound) = open(&mut sites, &site.site_id, &site.site_credential).await;
    let mut inbound = inbound?;

    submit(&mut client, plugin_job("replayed", "sleep.sh", &[])?).await?;
    let lease = next(&mut inbound, |m| match m {
        hub_message::Message::RunJob(lease) => Some(lease),
        _ => None,
    })
    .await?;
    assert_eq!(lease.attempt, 1);
    assert_eq!(
        lease.spec.as_ref().map(|s| s.job_id.as_str()),
        Some("replayed")
    );
    assert!(lease.staging.is_none(), "no hub broker configured");
    for (sequence, state) in [
        (1, v1::JobState::Queued),
        (2, v1::JobState::Running),
        (3, v1::JobState::Succeeded),
    ] {
        tx.send(report(&lease, sequence, state)).await?;
        let ack = next(&mut inbound, acked).await?;
        assert_eq!((ack.job_id.as_str(), ack.attempt), ("replayed", 1));
        assert_eq!(ack.up_to_sequence, sequence);
    }
    let id = JobId::parse("replayed")?;
    let done = hub.store.get(&id).await?;
    assert_eq!(done.status.state.to_string(), "SUCCEEDED");
    let events = hub.store.job_events(&id).await?;
    let head = hub.store.head();

    // The connection drops before the acks arrived (as far as the site knows): a new
    // session sends every report again. Each is acknowledged; nothing changes.
    drop(tx);
    drop(inbound);
    let (tx, inbound) = open(&mut sites, &site.site_id, &site.site_credential).await;
    let mut inbound = inbound?;
    for sequence in 1..=3 {
        let state = [
            v1::JobState::Queued,
            v1::JobState::Running,
            v1::JobState::Succeeded,
        ][sequence as usize - 1];
        tx.send(report(&lease, sequence, state)).await?;
        let ack = next(&mut inbound, acked).await?;
        assert_eq!(ack.up_to_sequence, sequence);
    }
    assert_eq!(hub.store.get(&id).await?, done);
    assert_eq!(hub.store.job_events(&id).await?, events);
    assert_eq!(hub.store.head(), head, "no event from a replay");
    hub.stop().await
}

#[tokio::test]
async fn bad_input_is_refused_at_submit_against_the_registered_sites() -> Result<()> {
    let db = TestDb::sqlite()?;
    let hub = Running::start(hub_config(&db)).await?;
    let mut client = hub.client().await?;

    // No site yet: anything that passes the door waits for one.
    let mut early = plugin_job("early", "sleep.sh", &[])?;
    early.cpu_millicores = 900_000;
    assert_eq!(
        submit(&mut client, early).await?.state(),
        v1::JobState::Queued
    );

    let mut sites = registry(&hub).await?;
    let token = client
        .create_join_token(v1::CreateJoinTokenRequest::default())
        .await?
        .into_inner();
    let site = sites
        .register(register(&token.join_token, "r"))
        .await?
        .into_inner();

    let cases: [(&str, SpecChange); 5] = [
        ("spec.placement.site_id", |s| {
            s.placement = Some(v1::Placement {
                site_id: "site-nowhere".into(),
                ..v1::Placement::default()
            });
        }),
        ("spec.placement", |s| {
            s.placement = Some(v1::Placement {
                backend_kind: v1::BackendKind::Slurm.into(),
                ..v1::Placement::default()
            });
        }),
        ("spec.cpu_millicores", |s| s.cpu_millicores = 64_000),
        ("spec.memory_mib", |s| s.memory_mib = 1 << 30),
        ("spec.storage_mode", |s| {
            s.storage_mode = v1::StorageMode::Filesystem.into();
            s.output_dir = "out".into();
            s.inputs = Some(v1::InputSpec {
                source: Some(v1::input_spec::Source::Shared(v1::SharedInputs {
                    input_dirs: vec!["in".into()],
                })),
            });
        }),
    ];
    for (field, change) in cases {
        let mut spec = plugin_job("refused", "sleep.sh", &[])?;
        change(&mut spec);
        let status = client
            .submit_job(v1::SubmitJobRequest {
                spec: Some(spec),
                upload: None,
                retry_if_failed: false,
            })
            .await
            .expect_err(field);
        assert_status(&status, Code::InvalidArgument, &format!("{field}: "));
    }
    let mut pinned = plugin_job("pinned", "sleep.sh", &[])?;
    pinned.placement = Some(v1::Placement {
        site_id: site.site_id.clone(),
        ..v1::Placement::default()
    });
    assert_eq!(
        submit(&mut client, pinned).await?.state(),
        v1::JobState::Queued
    );
    // The job accepted before any site came stays as it was: a replay is not refused.
    let mut early = plugin_job("early", "sleep.sh", &[])?;
    early.cpu_millicores = 900_000;
    submit(&mut client, early).await?;
    hub.stop().await
}

#[tokio::test]
async fn cancels_and_deletes_reach_the_site() -> Result<()> {
    let db = TestDb::sqlite()?;
    let hub = Running::start(hub_config(&db)).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("site-cancel")?;
    let token = join_token(&mut client, &dir, "gamma").await?;
    let config = manager_config(&dir, "gamma", &hub.uri, token, &SiteOptions::default())?;
    let site = Site::start(&config).await?;
    wait_connected(&mut client, "gamma").await?;

    submit(
        &mut client,
        plugin_job("long", "sleep.sh", &["--seconds", "60"])?,
    )
    .await?;
    watch_until(&mut client, "long", |events| {
        events.iter().any(|e| e.state() == v1::JobState::Running)
    })
    .await?;
    let cancelling = client
        .cancel_job(v1::CancelJobRequest {
            job_id: "long".into(),
            message: "not needed after all".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        cancelling.state(),
        v1::JobState::Running,
        "the site confirms the cancel"
    );
    let events = watch_until(&mut client, "long", ended).await?;
    let last = events.last().context("events")?;
    assert_eq!(last.state(), v1::JobState::Cancelled);
    assert_eq!(
        last.reason.as_ref().map(v1::StateReason::code),
        Some(v1::ReasonCode::Cancelled)
    );

    // Deleting the ended job removes what the site holds of it.
    let id = JobId::parse("long")?;
    assert!(site.manager.status(&id).await.is_ok(), "kept until deleted");
    client
        .delete_job(v1::DeleteJobRequest {
            job_id: "long".into(),
            purge: false,
        })
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while site.manager.status(&id).await.is_ok() {
        ensure!(tokio::time::Instant::now() < deadline, "not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!config.store_root.join("key-long").exists());
    site.stop().await;
    hub.stop().await
}

fn lease_of(message: hub_message::Message) -> Option<v1::RunJobCommand> {
    match message {
        hub_message::Message::RunJob(lease) => Some(lease),
        _ => None,
    }
}

#[tokio::test]
async fn declines_unanswered_leases_and_grant_requests() -> Result<()> {
    let db = TestDb::sqlite()?;
    let dir = TestDir::new("site-scripted")?;
    let key = dir.join("grant.key");
    std::fs::write(&key, "a-secret-shared-with-the-hub-broker")?;
    let mut config = hub_config(&db);
    config.sites.lease_seconds = 1;
    // No broker listens there: grants are still signed, and AUTO staging is sent as
    // TRANSFER while the broker's store is unknown.
    config.hub_broker.uri = "http://127.0.0.1:9".into();
    config.hub_broker.grant_key_file = Some(key);
    let hub = Running::start(config).await?;
    let mut client = hub.client().await?;
    let mut sites = registry(&hub).await?;
    let token = client
        .create_join_token(v1::CreateJoinTokenRequest::default())
        .await?
        .into_inner();
    let site = sites
        .register(register(&token.join_token, "r"))
        .await?
        .into_inner();
    let (tx, inbound) = open(&mut sites, &site.site_id, &site.site_credential).await;
    let mut inbound = inbound?;

    submit(&mut client, plugin_job("bounced", "sleep.sh", &[])?).await?;
    let first = next(&mut inbound, lease_of).await?;
    assert_eq!(first.attempt, 1);
    let plan = first.staging.clone().context("a staging plan")?;
    assert!(plan.input_grant.is_empty(), "no inputs, no input grant");
    assert!(!plan.output_grant.is_empty());
    assert_eq!(plan.hub_output_path, "key-bounced/outgoing");
    assert_eq!(plan.method(), v1::StageMethod::Transfer);

    // Declined for lack of room: back to the queue as a new attempt, and no new lease
    // until the site says it has room.
    tx.send(v1::SiteMessage {
        message: Some(site_message::Message::Declined(v1::LeaseDeclined {
            job_id: "bounced".into(),
            attempt: 1,
            reason: v1::DeclineReason::NoCapacity.into(),
            message: "full".into(),
        })),
    })
    .await?;
    tx.send(v1::SiteMessage {
        message: Some(site_message::Message::Capacity(v1::CapacityUpdate {
            free: Some(v1::Resources {
                cpu_millicores: 2000,
                memory_mib: 2048,
                gpus: 0,
            }),
            free_job_slots: 0,
            active_jobs: 0,
        })),
    })
    .await?;
    let second = next(&mut inbound, lease_of).await?;
    assert_eq!(second.attempt, 2);

    // Left unanswered past lease_seconds: taken back (the site told to drop it) and
    // leased again.
    let removed = next(&mut inbound, |m| match m {
        hub_message::Message::RemoveJob(remove) => Some(remove),
        _ => None,
    })
    .await?;
    assert_eq!((removed.job_id.as_str(), removed.attempt), ("bounced", 2));
    let third = next(&mut inbound, lease_of).await?;
    assert_eq!(third.attempt, 3);
    tx.send(report(&third, 1, v1::JobState::Queued)).await?;
    next(&mut inbound, acked).await?;

    // Fresh grants for the current attempt; a stale one is told to go.
    tx.send(v1::SiteMessage {
        message: Some(site_message::Message::GrantRequest(v1::GrantRequest {
            job_id: "bounced".into(),
            attempt: 3,
            direction: v1::GrantDirection::Outputs.into(),
        })),
    })
    .await?;
    let grants = next(&mut inbound, |m| match m {
        hub_message::Message::Grants(grants) => Some(grants),
        _ => None,
    })
    .await?;
    assert_eq!(grants.attempt, 3);
    assert!(!grants.output_grant.is_empty() && grants.input_grant.is_empty());
    tx.send(v1::SiteMessage {
        message: Some(site_message::Message::GrantRequest(v1::GrantRequest {
            job_id: "bounced".into(),
            attempt: 2,
            direction: v1::GrantDirection::Inputs.into(),
        })),
    })
    .await?;
    let removed = next(&mut inbound, |m| match m {
        hub_message::Message::RemoveJob(remove) => Some(remove),
        _ => None,
    })
    .await?;
    assert_eq!(removed.attempt, 2);

    // Heartbeats are answered; a manager with a session open has nothing pending.
    tx.send(v1::SiteMessage {
        message: Some(site_message::Message::Heartbeat(v1::SessionHeartbeat {
            sent_at: Some(SystemTime::now().into()),
        })),
    })
    .await?;
    next(&mut inbound, |m| match m {
        hub_message::Message::Heartbeat(beat) => Some(beat),
        _ => None,
    })
    .await?;
    let beat = sites
        .heartbeat(v1::HeartbeatRequest {
            site_id: site.site_id.clone(),
            site_credential: site.site_credential.clone(),
            manager_id: "scripted-manager".into(),
            capacity: None,
        })
        .await?
        .into_inner();
    assert!(!beat.work_pending);

    let events = hub.store.job_events(&JobId::parse("bounced")?).await?;
    let requeues: Vec<String> = events
        .iter()
        .filter(|e| e.state.to_string() == "QUEUED" && e.attempt > 1)
        .map(|e| e.reason.message.clone())
        .collect();
    assert_eq!(requeues.len(), 2, "{events:#?}");
    assert!(requeues[0].contains("declined it (DECLINE_REASON_NO_CAPACITY): full"));
    assert!(requeues[1].contains("did not answer the lease"));
    drop(tx);
    hub.stop().await
}

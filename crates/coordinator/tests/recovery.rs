//! Crashes in the middle of work, and what must survive them: the `dispatch-coordinator`
//! binary SIGKILLed while a site runs fifty jobs and restarted on the same data and port,
//! and the `dispatch-manager` binary SIGKILLed while its jobs run and restarted on the
//! same state. Every job must end exactly once, SUCCEEDED, having run exactly once: each
//! job's plugin (`record.sh`) appends a line to a file shared by the test when it starts
//! and when it ends, so a job run twice, or twice at once, shows there.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use futures::StreamExt as _;

use dispatch_coordinator::CoordinatorConfig;
use dispatch_coordinator::config::LossPolicy;
use dispatch_proto::JobId;
use dispatch_proto::v1;
use dispatch_testkit::{ServiceBinary, TestDir};

use common::site::{
    Client, Site, SiteOptions, WAIT, ended, hub_config, join_token, manager_binary, manager_config,
    recorded_job, recorded_runs, submit, unique_name, wait_connected, wait_health, watch_until,
};
use common::{Running, TestDb};

const COORDINATOR: &str = env!("CARGO_BIN_EXE_dispatch-coordinator");

/// Jobs the coordinator is killed in the middle of.
const JOBS: usize = 50;
/// How many of them a site runs at once.
const SITE_SLOTS: u32 = 8;
/// How many jobs have ended at the site when the coordinator is killed, each time (the
/// rest are running there, leased, or queued at the hub); the second kill finds a
/// coordinator that has itself recovered from the first.
const KILL_AFTER_ENDED: [usize; 2] = [6, 26];
/// How long all fifty may take, the crash included.
const ALL_JOBS_WAIT: Duration = Duration::from_secs(120);

/// The coordinator binary over the configuration in `config_file`, listening on `listen`.
fn coordinator(config_file: &Path, listen: &str, log: std::path::PathBuf) -> Result<ServiceBinary> {
    let mut command = Command::new(COORDINATOR);
    command
        .env_remove("DISPATCH_COORDINATOR_CONFIG")
        .arg("--config")
        .arg(config_file)
        .args(["--listen", listen]);
    ServiceBinary::spawn(command, "coordinator serving", log)
}

/// Writes `config` where the coordinator binary reads it.
fn write_config(config: &CoordinatorConfig, dir: &TestDir) -> Result<std::path::PathBuf> {
    let file = dir.join("coordinator.toml");
    std::fs::write(&file, toml::to_string(config)?)?;
    Ok(file)
}

/// What a test saw of every job's events, across coordinators.
#[derive(Default)]
struct Seen {
    /// The last sequence read, to resume from.
    after: u64,
    /// Terminal events by job.
    terminal: BTreeMap<String, Vec<v1::JobEvent>>,
}

impl Seen {
    fn ended(&self) -> usize {
        self.terminal.len()
    }

    fn record(&mut self, event: v1::JobEvent) {
        self.after = self.after.max(event.sequence);
        if event.state().is_terminal() {
            self.terminal
                .entry(event.job_id.clone())
                .or_default()
                .push(event);
        }
    }
}

/// Follows every job's events from after `seen.after` until `enough` says so; false when
/// the stream broke first (the coordinator died).
async fn follow(
    client: &mut Client,
    seen: &mut Seen,
    wait: Duration,
    enough: impl Fn(&Seen) -> bool,
) -> Result<bool> {
    let mut stream = client
        .watch_jobs(v1::WatchJobsRequest {
            after_sequence: Some(seen.after),
            ..v1::WatchJobsRequest::default()
        })
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + wait;
    while !enough(seen) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => seen.record(event),
            Ok(Some(Err(_)) | None) => return Ok(false),
            Err(_) => bail!(
                "timed out: {} of {JOBS} jobs ended; terminal events: {:#?}",
                seen.ended(),
                seen.terminal
            ),
        }
    }
    Ok(true)
}

/// Checks, in the store itself, that each job has exactly one terminal event, SUCCEEDED.
async fn assert_one_success_each(db: &TestDb, ids: &[String]) -> Result<Vec<u32>> {
    let store = db.open().await?;
    let mut attempts = Vec::new();
    for id in ids {
        let events = store.job_events(&JobId::parse(id)?).await?;
        let terminal: Vec<_> = events.iter().filter(|e| e.state.is_terminal()).collect();
        ensure!(
            terminal.len() == 1 && terminal[0].state == dispatch_coordinator::JobState::Succeeded,
            "job {id} must end exactly once, SUCCEEDED: {events:#?}"
        );
        attempts.push(terminal[0].attempt);
    }
    store.close().await;
    Ok(attempts)
}

/// Checks that every job of `ids`, and nothing else, ran exactly once.
fn assert_ran_once_each(log: &Path, ids: &[String]) -> Result<()> {
    let runs = recorded_runs(log)?;
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != (1, 1)).collect();
    ensure!(
        twice.is_empty(),
        "jobs must run exactly once (start, end): {twice:?}"
    );
    let ran: Vec<&String> = runs.keys().collect();
    let mut wanted: Vec<&String> = ids.iter().collect();
    wanted.sort();
    ensure!(ran == wanted, "jobs that ran: {ran:?}");
    Ok(())
}

#[tokio::test]
async fn coordinator_killed_mid_run_of_fifty_jobs_loses_none_and_runs_none_twice_sqlite()
-> Result<()> {
    coordinator_killed_mid_run(&TestDb::sqlite()?).await
}

#[tokio::test]
async fn coordinator_killed_mid_run_of_fifty_jobs_loses_none_and_runs_none_twice_postgres()
-> Result<()> {
    coordinator_killed_mid_run(&TestDb::postgres().await?).await
}

async fn coordinator_killed_mid_run(db: &TestDb) -> Result<()> {
    let dir = TestDir::new("recovery-hub")?;
    let config_file = write_config(&hub_config(db), &dir)?;
    let first = coordinator(&config_file, "127.0.0.1:0", dir.join("first.log"))?;
    let mut client = Client::connect(first.uri.clone()).await?;

    // All queued before the site joins, so the crash finds jobs in every state.
    let log = dir.join("runs.log");
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let id = format!("crash-{i:02}");
        submit(&mut client, recorded_job(&id, &log, "0.5")?).await?;
        ids.push(id);
    }
    let name = unique_name("steady");
    let token = join_token(&mut client, &dir, &name).await?;
    let site = Site::start(&manager_config(
        &dir,
        &name,
        &first.uri,
        token,
        &SiteOptions {
            max_jobs: SITE_SLOTS,
            ..SiteOptions::default()
        },
    )?)
    .await?;
    let site_id = wait_connected(&mut client, &name).await?;

    // Killed once a few jobs have ended at the site (its own record, not the hub's, which
    // a watch would show late), and each time succeeded by a coordinator on the same data
    // and the same port, so the site finds it again on its own.
    let mut hub = first;
    let mut started_at_kills = Vec::new();
    for (round, ended) in KILL_AFTER_ENDED.into_iter().enumerate() {
        wait_for_runs(&log, |n| n >= ended).await?;
        hub.kill()?;
        let started = recorded_runs(&log)?.len();
        ensure!(
            started < JOBS,
            "every job had started before kill {round}: the test proves nothing"
        );
        started_at_kills.push(started);
        let successor = coordinator(
            &config_file,
            &hub.address.to_string(),
            dir.join(&format!("successor-{round}.log")),
        )?;
        ensure!(successor.address == hub.address);
        client = Client::connect(successor.uri.clone()).await?;
        ensure!(
            wait_connected(&mut client, &name).await? == site_id,
            "the site came back as itself"
        );
        hub = successor;
    }
    // Every job's events from the start of the log, those the killed coordinators wrote too.
    let mut seen = Seen::default();
    let all = follow(&mut client, &mut seen, ALL_JOBS_WAIT, |s| s.ended() >= JOBS).await?;
    ensure!(all, "the successor's watch broke: {}", hub.log());

    for id in &ids {
        let terminal = seen.terminal.get(id).map(Vec::as_slice).unwrap_or_default();
        ensure!(
            terminal.len() == 1 && terminal[0].state() == v1::JobState::Succeeded,
            "job {id} must end exactly once, SUCCEEDED: {terminal:#?}"
        );
    }
    assert_ran_once_each(&log, &ids)?;
    for id in &ids {
        let job = client
            .get_job(v1::GetJobRequest { job_id: id.clone() })
            .await?
            .into_inner();
        ensure!(
            job.state() == v1::JobState::Succeeded
                && job.reason.as_ref().and_then(|r| r.exit_code) == Some(0),
            "{job:#?}"
        );
    }

    site.stop().await;
    ensure!(hub.terminate()?, "the successor exits cleanly on SIGTERM");
    // Nothing arrived after the watch stopped reading: the stored log has one end each.
    let attempts = assert_one_success_each(db, &ids).await?;
    let retried = attempts.iter().filter(|a| **a > 1).count();
    eprintln!(
        "{started_at_kills:?} of {JOBS} jobs had started at the kills; {retried} were placed again after one"
    );
    Ok(())
}

/// Waits until the number of runs recorded in `log` as ended satisfies `enough`.
async fn wait_for_runs(log: &Path, enough: impl Fn(usize) -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let runs = recorded_runs(log)?;
        let ended: u32 = runs.values().map(|(_, ends)| ends).sum();
        if enough(ended as usize) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for runs to end: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a job's outputs are at a site without a broker: `key-<id>/outgoing`.
fn site_output(store_root: &Path, id: &str) -> Result<String> {
    let file = store_root
        .join(JobId::parse(id)?.storage_key())
        .join("outgoing/record.txt");
    std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))
}

#[tokio::test]
async fn manager_killed_mid_job_and_restarted_reconciles_each_job_once_sqlite() -> Result<()> {
    manager_killed_mid_job(&TestDb::sqlite()?).await
}

#[tokio::test]
async fn manager_killed_mid_job_and_restarted_reconciles_each_job_once_postgres() -> Result<()> {
    manager_killed_mid_job(&TestDb::postgres().await?).await
}

async fn manager_killed_mid_job(db: &TestDb) -> Result<()> {
    let mut config = hub_config(db);
    // The site goes unreachable while its manager is down; its jobs wait for it.
    config.sites.loss_policy = LossPolicy::Wait;
    let hub = Running::start(config).await?;
    let mut client = hub.client().await?;
    let dir = TestDir::new("recovery-manager")?;
    let name = unique_name("phoenix");
    let token = join_token(&mut client, &dir, &name).await?;
    let manager_config = manager_config(&dir, &name, &hub.uri, token, &SiteOptions::default())?;
    let mut manager = manager_binary(&manager_config, dir.join("first-manager.log"))?;
    let site_id = wait_connected(&mut client, &name).await?;

    // One job ends while no manager watches it, one runs on past the restart.
    let log = dir.join("runs.log");
    let jobs = [("while-down", "2"), ("past-restart", "10")];
    for (id, seconds) in jobs {
        submit(&mut client, recorded_job(id, &log, seconds)?).await?;
    }
    for (id, _) in jobs {
        watch_until(&mut client, id, |events| {
            events.iter().any(|e| e.state() == v1::JobState::Running)
        })
        .await?;
    }
    manager.kill()?;
    wait_health(&mut client, &site_id, v1::SiteHealth::Unreachable).await?;
    for (id, _) in jobs {
        let job = client
            .get_job(v1::GetJobRequest { job_id: id.into() })
            .await?
            .into_inner();
        ensure!(
            job.state() == v1::JobState::Running && job.attempt == 1,
            "with the wait policy a lost site's job stays as it was: {job:#?}"
        );
    }

    wait_for_runs(&log, |ended| ended >= 1).await?;
    let runs = recorded_runs(&log)?;
    ensure!(
        runs.get("while-down") == Some(&(1, 1)) && runs.get("past-restart") == Some(&(1, 0)),
        "one job must end while the manager is down, the other run past its restart: {runs:?}"
    );
    let mut manager = manager_binary(&manager_config, dir.join("second-manager.log"))?;
    ensure!(wait_connected(&mut client, &name).await? == site_id);
    for (id, _) in jobs {
        watch_until(&mut client, id, ended).await?;
    }
    for (id, _) in jobs {
        let job = client
            .get_job(v1::GetJobRequest { job_id: id.into() })
            .await?
            .into_inner();
        ensure!(
            job.state() == v1::JobState::Succeeded
                && job.attempt == 1
                && job.site_id == site_id
                && job.manager_id == manager_config.manager_id
                && job.reason.as_ref().and_then(|r| r.exit_code) == Some(0),
            "{job:#?}\nmanager log:\n{}",
            manager.log()
        );
        let events = hub.store.job_events(&JobId::parse(id)?).await?;
        ensure!(
            events.iter().filter(|e| e.state.is_terminal()).count() == 1
                && events.iter().all(|e| e.attempt == 1),
            "one attempt, one end: {events:#?}"
        );
        ensure!(
            site_output(&manager_config.store_root, id)? == format!("{id}\n"),
            "the outputs of {id} are those of one run"
        );
    }
    let ids: Vec<String> = jobs.iter().map(|(id, _)| (*id).to_owned()).collect();
    assert_ran_once_each(&log, &ids)?;

    ensure!(manager.terminate()?, "the manager exits cleanly on SIGTERM");
    hub.stop().await
}

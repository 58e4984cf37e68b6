//! Interrupted transfers resume from the last verified offset and end checksum-equal: after
//! a dropped connection, a killed broker, a broker stopped with SIGTERM, and a killed
//! client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dispatch_broker::StorePath;
use dispatch_broker::client::{BrokerClient, Progress, TransferOptions};
use dispatch_broker::store::{LocalStore, Source, Store};
use dispatch_proto::v1 as pb;
use dispatch_testkit::{
    BrokerBinary, FlakyProxy, InProcessBroker, TestDir, TestKey, tree_listing, write_pattern_file,
    write_varied_tree,
};

const BROKER: &str = env!("CARGO_BIN_EXE_dispatch-broker");
/// Small checkpoints, so a short test tree crosses several.
const CHECKPOINT: &str = "1048576";

fn source_tree(root: &Path) -> anyhow::Result<()> {
    write_varied_tree(root, 300, 0)?;
    write_pattern_file(&root.join("large.bin"), 24 << 20, 3)?;
    Ok(())
}

fn whole(store: &Path) -> anyhow::Result<Arc<dyn Store>> {
    Ok(Arc::new(LocalStore::read_only(store)?))
}

fn root_tree() -> Source {
    Source::Tree {
        path: StorePath::root(),
        skip_chrislinks: false,
    }
}

#[tokio::test]
async fn uploads_and_downloads_survive_dropped_connections() -> anyhow::Result<()> {
    let dir = TestDir::new("dropped")?;
    let source = dir.join("source");
    source_tree(&source)?;
    let broker =
        InProcessBroker::start(&dir.join("store"), None, |c| c.checkpoint_bytes = 1 << 20).await?;

    // Cut the first three connections after 6 MiB each.
    let proxy = FlakyProxy::start(broker.address, 3, 6 << 20).await?;
    let mut client = BrokerClient::connect(&proxy.uri, None)?;
    let options = TransferOptions {
        chunk_size: 256 * 1024,
        ..TransferOptions::default()
    };
    let up = client
        .upload(whole(&source)?, root_tree(), "up", &options, None)
        .await?;
    assert_eq!(proxy.cuts(), 3);
    assert_eq!(up.resumes, 3, "{:?}", up.attempt_offsets);
    assert!(
        up.attempt_offsets.windows(2).all(|w| w[1] > w[0]),
        "each attempt must resume further: {:?}",
        up.attempt_offsets
    );
    assert!(
        proxy.bytes_up() < up.summary.stream_bytes + (12 << 20),
        "resumed uploads must not resend everything"
    );
    assert_eq!(tree_listing(&source)?, tree_listing(&dir.join("store/up"))?);

    let proxy = FlakyProxy::start(broker.address, 2, 6 << 20).await?;
    let mut client = BrokerClient::connect(&proxy.uri, None)?;
    let back: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.join("back"))?);
    let tree = pb::TreeSource {
        source: Some(pb::tree_source::Source::Tree(pb::TreePath {
            path: "up".into(),
            skip_chrislinks: false,
        })),
    };
    let down = client
        .download(tree, back, StorePath::from_api("down")?, &options, None)
        .await?;
    assert_eq!(proxy.cuts(), 2);
    assert_eq!(down.resumes, 2);
    assert!(
        down.attempt_offsets[1] > 0 && down.attempt_offsets[2] > down.attempt_offsets[1],
        "{:?}",
        down.attempt_offsets
    );
    assert_eq!(down.summary.digest, up.summary.digest);
    assert_eq!(
        tree_listing(&source)?,
        tree_listing(&dir.join("back/down"))?
    );
    broker.stop().await?;
    Ok(())
}

/// Uploads through a broker binary that is stopped mid-transfer (with `signal`) and
/// started again on the same address; checks the upload resumed past 0 and is intact.
async fn upload_across_broker_restart(signal: &str) -> anyhow::Result<()> {
    let dir = TestDir::new(&format!("restart-{signal}"))?;
    let key = TestKey::create(dir.path())?;
    let source = dir.join("source");
    source_tree(&source)?;
    let store = dir.join("store");
    let env = [("DISPATCH_BROKER_CHECKPOINT_BYTES", CHECKPOINT)];
    let log = dir.join("broker.log");
    let mut broker = BrokerBinary::start(
        Path::new(BROKER),
        &store,
        &key,
        "127.0.0.1:0".parse()?,
        log.clone(),
        &env,
    )?;
    let address: SocketAddr = broker.address;

    let interrupted = Arc::new(AtomicBool::new(false));
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = interrupted.clone();
    let progress = Arc::new(move |p: Progress| {
        if p.done > 8 << 20 && !flag.swap(true, Ordering::SeqCst) {
            let _ = reached.send(());
        }
    });
    let mut client = BrokerClient::connect(&broker.uri, Some(&key.admin()))?;
    let options = TransferOptions {
        chunk_size: 256 * 1024,
        max_bytes_per_second: Some(24 << 20),
        ..TransferOptions::default()
    };
    let upload = tokio::spawn({
        let source = whole(&source)?;
        async move {
            client
                .upload(
                    source,
                    root_tree(),
                    "key-x/incoming",
                    &options,
                    Some(progress),
                )
                .await
        }
    });

    reached_rx.recv().await;
    if signal == "KILL" {
        broker.kill()?;
    } else {
        assert!(
            broker.terminate()?,
            "the broker must exit cleanly on SIGTERM:\n{}",
            broker.log()
        );
        let log_text = broker.log();
        assert!(log_text.contains("shutting down"), "{log_text}");
        assert!(log_text.contains("broker stopped"), "{log_text}");
    }
    let journal = std::fs::read_dir(store.join(".dispatch/transfers"))?.count();
    assert_eq!(
        journal, 1,
        "the interrupted transfer's journal must survive the broker"
    );
    let restarted = BrokerBinary::start(Path::new(BROKER), &store, &key, address, log, &env)?;

    let outcome = upload.await??;
    assert!(outcome.resumes >= 1, "{:?}", outcome.attempt_offsets);
    let last = *outcome.attempt_offsets.last().unwrap_or(&0);
    assert!(
        last >= 4 << 20,
        "the restarted broker must resume past the checkpoints: {:?}",
        outcome.attempt_offsets
    );
    assert_eq!(
        tree_listing(&source)?,
        tree_listing(&store.join("key-x/incoming"))?
    );
    assert!(
        restarted.log().contains(&format!("resume_offset={last}")),
        "{}",
        restarted.log()
    );
    Ok(())
}

#[tokio::test]
async fn upload_resumes_after_the_broker_is_killed() -> anyhow::Result<()> {
    upload_across_broker_restart("KILL").await
}

#[tokio::test]
async fn sigterm_drains_and_the_upload_resumes_on_the_next_broker() -> anyhow::Result<()> {
    upload_across_broker_restart("TERM").await
}

#[tokio::test]
async fn a_killed_client_resumes_with_the_same_transfer_id() -> anyhow::Result<()> {
    let dir = TestDir::new("client-killed")?;
    let key = TestKey::create(dir.path())?;
    let source = dir.join("source");
    source_tree(&source)?;
    let store = dir.join("store");
    let env = [("DISPATCH_BROKER_CHECKPOINT_BYTES", CHECKPOINT)];
    let broker = BrokerBinary::start(
        Path::new(BROKER),
        &store,
        &key,
        "127.0.0.1:0".parse()?,
        dir.join("broker.log"),
        &env,
    )?;
    let grant = key.admin();
    let push = || {
        let mut command = Command::new(BROKER);
        command
            .args([
                "push",
                "--broker",
                &broker.uri,
                "--transfer-id",
                "cli-1",
                "--bwlimit",
                "16",
            ])
            .arg(&source)
            .arg("pushed")
            .env("DISPATCH_GRANT", &grant);
        command
    };
    let mut first = push()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let journal = store.join(".dispatch/transfers/cli-1/journal.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let offset = std::fs::read_to_string(&journal)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|j| j["decoder"]["offset"].as_u64())
            .unwrap_or(0);
        if offset >= 4 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the first push made no progress");
        assert!(
            first.try_wait()?.is_none(),
            "the first push ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill()?;
    first.wait()?;

    let second = push().output()?;
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let resumed_at: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed an earlier attempt at byte "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        resumed_at >= 4 << 20,
        "the second push must resume, not restart:\n{stdout}"
    );
    assert_eq!(tree_listing(&source)?, tree_listing(&store.join("pushed"))?);
    Ok(())
}

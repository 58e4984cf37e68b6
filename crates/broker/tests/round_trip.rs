//! Trees go up to a real broker (served in-process on a port-0 listener) and come back
//! down through the same client a user runs, and arrive identical.

use std::sync::Arc;

use dispatch_broker::StorePath;
use dispatch_broker::client::{BrokerClient, TransferOptions};
use dispatch_broker::store::{LocalStore, Source, Store};
use dispatch_broker::transfer::Compression;
use dispatch_proto::v1 as pb;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey, tree_listing, write_varied_tree};

fn tree_source(path: &str) -> pb::TreeSource {
    pb::TreeSource {
        source: Some(pb::tree_source::Source::Tree(pb::TreePath {
            path: path.into(),
            skip_chrislinks: false,
        })),
    }
}

async fn round_trip(compression: Compression) -> anyhow::Result<()> {
    let dir = TestDir::new("round-trip")?;
    let key = TestKey::create(dir.path())?;
    let source = dir.join("source");
    write_varied_tree(&source, 2_000, 5 << 20)?;
    let broker = InProcessBroker::start(&dir.join("store"), Some(&key), |_| {}).await?;
    let mut client = BrokerClient::connect(&broker.uri, Some(&key.admin()))?;
    let options = TransferOptions {
        compression,
        chunk_size: 256 * 1024,
        ..TransferOptions::default()
    };

    let local: Arc<dyn Store> = Arc::new(LocalStore::open(&source)?);
    let up = client
        .upload(
            local,
            Source::Tree {
                path: StorePath::root(),
                skip_chrislinks: false,
            },
            "key-j1/incoming",
            &options,
            None,
        )
        .await?;
    assert_eq!(up.resumes, 0);
    assert_eq!(up.summary.counts.files, 2_000 + 1 + 1 + 7 + 1 + 1 + 1);
    assert_eq!(
        tree_listing(&source)?,
        tree_listing(&dir.join("store/key-j1/incoming"))?
    );

    let back: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.join("back"))?);
    let down = client
        .download(
            tree_source("key-j1/incoming"),
            back,
            StorePath::from_api("copy")?,
            &options,
            None,
        )
        .await?;
    assert_eq!(
        down.summary.digest, up.summary.digest,
        "the same tree must give the same digest both ways"
    );
    assert_eq!(
        tree_listing(&source)?,
        tree_listing(&dir.join("back/copy"))?
    );

    // Nothing of either transfer is left behind.
    let transfers = std::fs::read_dir(dir.join("store/.dispatch/transfers"))?.count();
    assert_eq!(transfers, 0);
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn varied_tree_round_trips_unchanged() -> anyhow::Result<()> {
    round_trip(Compression::None).await
}

#[tokio::test]
async fn varied_tree_round_trips_unchanged_with_gzip() -> anyhow::Result<()> {
    round_trip(Compression::Gzip).await
}

#[tokio::test]
async fn empty_tree_round_trips() -> anyhow::Result<()> {
    let dir = TestDir::new("empty")?;
    std::fs::create_dir_all(dir.join("source"))?;
    let broker = InProcessBroker::start(&dir.join("store"), None, |_| {}).await?;
    let mut client = BrokerClient::connect(&broker.uri, None)?;
    let local: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.join("source"))?);
    let up = client
        .upload(
            local,
            Source::Tree {
                path: StorePath::root(),
                skip_chrislinks: false,
            },
            "empty",
            &TransferOptions::default(),
            None,
        )
        .await?;
    assert_eq!(up.summary.counts.entries(), 0);
    assert!(dir.join("store/empty").is_dir());
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_existing_destination_is_kept_unless_replacing() -> anyhow::Result<()> {
    let dir = TestDir::new("existing")?;
    let source = dir.join("source");
    std::fs::create_dir_all(&source)?;
    std::fs::write(source.join("new.txt"), "new")?;
    std::fs::create_dir_all(dir.join("store/dest"))?;
    std::fs::write(dir.join("store/dest/old.txt"), "old")?;
    let broker = InProcessBroker::start(&dir.join("store"), None, |_| {}).await?;
    let mut client = BrokerClient::connect(&broker.uri, None)?;
    let local: Arc<dyn Store> = Arc::new(LocalStore::open(&source)?);
    let tree = Source::Tree {
        path: StorePath::root(),
        skip_chrislinks: false,
    };
    let options = TransferOptions {
        transfer_id: Some("replace-test".into()),
        ..TransferOptions::default()
    };
    let refused = client
        .upload(local.clone(), tree.clone(), "dest", &options, None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("already exists"), "{refused}");
    assert!(dir.join("store/dest/old.txt").exists());

    // The verified tree was kept: asking again with `replace` finishes without resending.
    let replace = TransferOptions {
        replace: true,
        ..options
    };
    let done = client.upload(local, tree, "dest", &replace, None).await?;
    assert!(
        done.attempt_offsets[0] > 0,
        "the retry should resume at the end: {:?}",
        done.attempt_offsets
    );
    assert!(!dir.join("store/dest/old.txt").exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("store/dest/new.txt"))?,
        "new"
    );
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn outputs_leave_out_links_and_chrislinks() -> anyhow::Result<()> {
    let dir = TestDir::new("outputs")?;
    let store_root = dir.join("store");
    let outgoing = store_root.join("key-j2/outgoing");
    std::fs::create_dir_all(outgoing.join("sub"))?;
    std::fs::write(outgoing.join("sub/result.txt"), "result")?;
    std::fs::write(outgoing.join("forged.chrislink"), "home/alice/secrets")?;
    std::os::unix::fs::symlink("/etc/passwd", outgoing.join("passwd"))?;
    let broker = InProcessBroker::start(&store_root, None, |_| {}).await?;
    let mut client = BrokerClient::connect(&broker.uri, None)?;
    let source = pb::TreeSource {
        source: Some(pb::tree_source::Source::Tree(pb::TreePath {
            path: "key-j2/outgoing".into(),
            skip_chrislinks: true,
        })),
    };
    let back: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.join("back"))?);
    let down = client
        .download(
            source,
            back,
            StorePath::from_api("out")?,
            &TransferOptions::default(),
            None,
        )
        .await?;
    assert_eq!(down.summary.counts.files, 1);
    assert_eq!(down.summary.counts.skipped, 2);
    let listing = tree_listing(&dir.join("back/out"))?;
    assert_eq!(
        listing.keys().collect::<Vec<_>>(),
        ["sub", "sub/result.txt"]
    );
    broker.stop().await?;
    Ok(())
}

//! Hostile archives sent to a real broker: each is refused with an error that names the
//! entry and the reason, nothing is written outside the destination, the destination does
//! not appear, and the transfer's area is discarded.

use dispatch_testkit::craft::{archive, entry, long_named_file};
use dispatch_testkit::{InProcessBroker, RawUpload, TestDir, TestKey, upload_raw, upload_raw_with};
use tar::EntryType;
use tonic::Code;

struct Case {
    name: &'static str,
    tar: Vec<u8>,
    code: Code,
    /// Words the error message must contain (the entry and the reason).
    says: &'static [&'static str],
    gzip: bool,
}

fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
    entry(name, EntryType::Regular, data, b"")
}

fn cases() -> Vec<Case> {
    let many_entries: Vec<Vec<u8>> = (0..60)
        .map(|i| file(format!("f{i}").as_bytes(), b""))
        .collect();
    // Declare 1 TiB + 1 byte without sending it: refused before anything is written.
    let huge_size = {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_size((1 << 40) + 1);
        header.set_mode(0o644);
        header.as_old_mut().name[..8].copy_from_slice(b"huge.bin");
        header.set_cksum();
        header.as_bytes().to_vec()
    };
    let zeros = vec![0u8; 8 << 20];
    vec![
        Case {
            name: "parent traversal",
            tar: archive(&[file(b"../../escaped.txt", b"x")]),
            code: Code::InvalidArgument,
            says: &["`../../escaped.txt`", "`..`"],
            gzip: false,
        },
        Case {
            name: "traversal in the middle",
            tar: archive(&[file(b"ok/../../../escaped.txt", b"x")]),
            code: Code::InvalidArgument,
            says: &["escaped.txt", "`..`"],
            gzip: false,
        },
        Case {
            name: "absolute path",
            tar: archive(&[file(b"/tmp/escaped.txt", b"x")]),
            code: Code::InvalidArgument,
            says: &["`/tmp/escaped.txt`", "absolute"],
            gzip: false,
        },
        Case {
            name: "symlink out by absolute target",
            tar: archive(&[entry(b"etc", EntryType::Symlink, b"", b"/etc")]),
            code: Code::InvalidArgument,
            says: &["`etc`", "absolute"],
            gzip: false,
        },
        Case {
            name: "symlink out by dot-dot",
            tar: archive(&[entry(b"up", EntryType::Symlink, b"", b"../../..")]),
            code: Code::InvalidArgument,
            says: &["`up`", "`..`"],
            gzip: false,
        },
        Case {
            name: "write through a symlink planted earlier",
            tar: archive(&[
                entry(b"link", EntryType::Symlink, b"", b"sub"),
                file(b"link/file", b"x"),
            ]),
            code: Code::InvalidArgument,
            says: &["`link/file`", "symlink"],
            gzip: false,
        },
        Case {
            name: "hard link out",
            tar: archive(&[entry(
                b"passwd",
                EntryType::Link,
                b"",
                b"../../../etc/passwd",
            )]),
            code: Code::InvalidArgument,
            says: &["`passwd`", "hard link target"],
            gzip: false,
        },
        Case {
            name: "hard link to something never written",
            tar: archive(&[entry(b"h", EntryType::Link, b"", b"nothing-here")]),
            code: Code::InvalidArgument,
            says: &["`h`", "not a file written earlier"],
            gzip: false,
        },
        Case {
            name: "character device",
            tar: archive(&[entry(b"null", EntryType::Char, b"", b"")]),
            code: Code::InvalidArgument,
            says: &["`null`", "device and FIFO"],
            gzip: false,
        },
        Case {
            name: "block device",
            tar: archive(&[entry(b"sda", EntryType::Block, b"", b"")]),
            code: Code::InvalidArgument,
            says: &["`sda`", "device and FIFO"],
            gzip: false,
        },
        Case {
            name: "fifo",
            tar: archive(&[entry(b"pipe", EntryType::Fifo, b"", b"")]),
            code: Code::InvalidArgument,
            says: &["`pipe`", "device and FIFO"],
            gzip: false,
        },
        Case {
            name: "name not UTF-8",
            tar: archive(&[file(&[b'b', b'a', b'd', 0xff, 0xfe], b"x")]),
            code: Code::InvalidArgument,
            says: &["not valid UTF-8"],
            gzip: false,
        },
        Case {
            name: "component too long",
            tar: archive(&[long_named_file(&[b'n'; 300], b"x")]),
            code: Code::InvalidArgument,
            says: &["nnnn", "longer than 255"],
            gzip: false,
        },
        Case {
            name: "path too long",
            tar: archive(&[long_named_file("d/".repeat(2100).as_bytes(), b"x")]),
            code: Code::InvalidArgument,
            says: &["d/d/d/", "longer than"],
            gzip: false,
        },
        Case {
            name: "too many entries",
            tar: archive(&many_entries),
            code: Code::ResourceExhausted,
            says: &["more than 50 entries"],
            gzip: false,
        },
        Case {
            name: "declared size over the total limit",
            tar: archive(&[huge_size]),
            code: Code::ResourceExhausted,
            says: &["`huge.bin`", "over the limit"],
            gzip: false,
        },
        Case {
            name: "gzip bomb",
            tar: archive(&[file(b"zeros.bin", &zeros)]),
            code: Code::ResourceExhausted,
            says: &["ratio over 100"],
            gzip: true,
        },
    ]
}

#[tokio::test]
async fn hostile_archives_are_refused_and_leave_nothing_behind() -> anyhow::Result<()> {
    let dir = TestDir::new("hostile")?;
    let key = TestKey::create(dir.path())?;
    let store = dir.join("area/store");
    let broker = InProcessBroker::start(&store, Some(&key), |config| {
        config.limits.max_entries = 50;
        config.limits.max_expansion_ratio = 100;
    })
    .await?;
    let grant = key.admin();
    for (i, case) in cases().into_iter().enumerate() {
        let destination = format!("job-{i}/incoming");
        let error = match upload_raw(&broker.uri, &grant, &destination, &case.tar, case.gzip).await
        {
            Ok(committed) => panic!("{}: accepted as {committed:?}", case.name),
            Err(status) => status,
        };
        assert_eq!(
            error.code(),
            case.code,
            "{}: {}",
            case.name,
            error.message()
        );
        for word in case.says {
            assert!(
                error.message().contains(word),
                "{}: `{}` does not mention {word}",
                case.name,
                error.message()
            );
        }
        assert!(
            !store.join(&destination).exists(),
            "{}: the destination appeared",
            case.name
        );
        let leftovers = std::fs::read_dir(store.join(".dispatch/transfers"))?.count();
        assert_eq!(
            leftovers, 0,
            "{}: the refused transfer's area was kept",
            case.name
        );
    }
    // Nothing escaped next to the store or above it.
    let beside: Vec<_> = std::fs::read_dir(dir.join("area"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(beside, ["store"]);
    assert!(!std::path::Path::new("/tmp/escaped.txt").exists());
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn safe_links_inside_the_tree_are_kept() -> anyhow::Result<()> {
    let dir = TestDir::new("safe-links")?;
    let broker = InProcessBroker::start(&dir.join("store"), None, |_| {}).await?;
    let tar = archive(&[
        file(b"data/real.txt", b"content"),
        entry(b"latest", EntryType::Symlink, b"", b"data/real.txt"),
        entry(b"data/again.txt", EntryType::Link, b"", b"data/real.txt"),
    ]);
    upload_raw(&broker.uri, "unused", "tree", &tar, false).await?;
    let root = dir.join("store/tree");
    assert_eq!(
        std::fs::read_link(root.join("latest"))?,
        std::path::Path::new("data/real.txt")
    );
    assert_eq!(std::fs::read(root.join("data/again.txt"))?, b"content");
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_corrupted_chunk_is_refused_and_the_transfer_resumes() -> anyhow::Result<()> {
    use dispatch_proto::v1 as pb;
    let dir = TestDir::new("corrupt")?;
    let broker = InProcessBroker::start(&dir.join("store"), None, |_| {}).await?;
    let tar = archive(&[file(b"a.txt", &[b'a'; 100_000])]);
    let mut client = dispatch_broker::client::BrokerClient::connect(&broker.uri, None)?;
    let chunk_size = 64 * 1024;
    let open = pb::UploadRequest {
        message: Some(pb::upload_request::Message::Open(pb::UploadOpen {
            destination: "dest".into(),
            transfer_id: "corrupt-1".into(),
            chunk_size,
            ..Default::default()
        })),
    };
    let piece = &tar[..chunk_size as usize];
    let mut bad = piece.to_vec();
    bad[600] ^= 1;
    let chunk = pb::Chunk {
        offset: 0,
        data: bad.into(),
        length: chunk_size,
        checksum: blake3::hash(piece).as_bytes().to_vec().into(),
        compression: 0,
    };
    let messages = vec![
        open.clone(),
        pb::UploadRequest {
            message: Some(pb::upload_request::Message::Chunk(chunk)),
        },
    ];
    let mut responses = client
        .raw()
        .upload(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut refusal = None;
    loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the corrupted chunk must be refused");
    assert_eq!(refusal.code(), Code::DataLoss, "{}", refusal.message());
    assert!(
        refusal.message().contains("offset 0") && refusal.message().contains("checksum"),
        "{}",
        refusal.message()
    );

    // The same transfer id reopens at offset 0, and the good bytes then go through. The
    // broker may still be closing the first attempt: it says so (ABORTED) and a client
    // retries, as BrokerClient does.
    let how = RawUpload {
        transfer_id: "corrupt-1".into(),
        gzip: false,
    };
    let mut attempts = 0;
    let upload = loop {
        match upload_raw_with(&broker.uri, "unused", "dest", &tar, &how).await {
            Err(status) if status.code() == Code::Aborted && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => break other?,
        }
    };
    assert_eq!(upload.resumed_at, 0);
    assert_eq!(
        std::fs::read(dir.join("store/dest/a.txt"))?,
        vec![b'a'; 100_000]
    );
    broker.stop().await?;
    Ok(())
}

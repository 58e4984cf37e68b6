//! The broker's door: grants are required and scoped, health and reflection answer without
//! one, and stat, list and delete do what a user expects.

use std::time::Duration;

use dispatch_broker::client::BrokerClient;
use dispatch_broker::grant::Grant;
use dispatch_proto::v1 as pb;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey, craft, upload_raw};
use tonic::Code;

#[tokio::test]
async fn grants_are_required_checked_and_scoped() -> anyhow::Result<()> {
    let dir = TestDir::new("grants")?;
    let key = TestKey::create(dir.path())?;
    std::fs::create_dir_all(dir.join("store/key-a/incoming"))?;
    std::fs::write(dir.join("store/key-a/incoming/in.txt"), "a")?;
    std::fs::create_dir_all(dir.join("store/key-b"))?;
    let broker = InProcessBroker::start(&dir.join("store"), Some(&key), |_| {}).await?;
    let stat = |path: &str| pb::StatRequest { path: path.into() };

    let mut anonymous = BrokerClient::connect(&broker.uri, None)?;
    let status = anonymous.raw().stat(stat("key-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization"),
        "{}",
        status.message()
    );

    let forged = TestKey::create(&dir.join("store/key-b"))?.admin();
    let mut forger = BrokerClient::connect(&broker.uri, Some(&forged))?;
    let status = forger.raw().stat(stat("key-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let expired = key.key.mint(&Grant {
        sub: "late".into(),
        read: vec!["".into()],
        write: vec![],
        exp: 1,
    });
    let mut late = BrokerClient::connect(&broker.uri, Some(&expired))?;
    let status = late.raw().stat(stat("key-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{}", status.message());

    // A job's grant: read its inputs, write its outputs, nothing else.
    let job = key.key.mint_for(
        "job-a",
        &["key-a/incoming"],
        &["key-a/outgoing"],
        Duration::from_secs(60),
    );
    let mut client = BrokerClient::connect(&broker.uri, Some(&job))?;
    assert!(
        client
            .raw()
            .stat(stat("key-a/incoming/in.txt"))
            .await?
            .into_inner()
            .exists
    );
    let status = client.raw().stat(stat("key-b")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("`key-b`") && status.message().contains("job-a"),
        "{}",
        status.message()
    );
    let status = client
        .raw()
        .delete(pb::DeleteRequest {
            path: "key-a/incoming".into(),
            must_exist: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let tar = craft::archive(&[craft::entry(
        b"out.txt",
        tar::EntryType::Regular,
        b"out",
        b"",
    )]);
    let refused = upload_raw(&broker.uri, &job, "key-b/outgoing", &tar, false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    upload_raw(&broker.uri, &job, "key-a/outgoing", &tar, false).await?;
    assert_eq!(
        std::fs::read_to_string(dir.join("store/key-a/outgoing/out.txt"))?,
        "out"
    );
    client.check_access("key-a/outgoing", true).await?;
    assert!(client.check_access("key-a/incoming", true).await.is_err());
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_grant() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = TestDir::new("health")?;
    let key = TestKey::create(dir.path())?;
    let broker = InProcessBroker::start(&dir.join("store"), Some(&key), |_| {}).await?;
    let channel = tonic::transport::Endpoint::from_shared(broker.uri.clone())?
        .connect()
        .await?;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dispatch.v1.Broker".into(),
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
    let response = responses.message().await?.expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"dispatch.v1.Broker".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    broker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stat_list_and_delete() -> anyhow::Result<()> {
    let dir = TestDir::new("stat")?;
    let store = dir.join("store");
    for i in 0..25 {
        std::fs::create_dir_all(store.join(format!("tree/d{}", i % 5)))?;
        std::fs::write(
            store.join(format!("tree/d{}/f{i:02}", i % 5)),
            vec![b'x'; i],
        )?;
    }
    let broker = InProcessBroker::start(&store, None, |_| {}).await?;
    let mut client = BrokerClient::connect(&broker.uri, None)?;

    let info = client
        .raw()
        .stat(pb::StatRequest {
            path: "tree/d1/f06".into(),
        })
        .await?
        .into_inner();
    let entry = info.entry.expect("an entry");
    assert_eq!((entry.kind, entry.size), (pb::EntryKind::File as i32, 6));
    assert!(
        !client
            .raw()
            .stat(pb::StatRequest {
                path: "nothing".into()
            })
            .await?
            .into_inner()
            .exists
    );
    let refused = client
        .raw()
        .stat(pb::StatRequest {
            path: "a/../../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("`..`"), "{}", refused.message());
    let reserved = client
        .raw()
        .stat(pb::StatRequest {
            path: ".dispatch/store-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reserved.code(), Code::InvalidArgument);

    // Pages of 7 cover all 30 entries (5 dirs, 25 files) once, in walk order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = pb::PageRequest {
            page_size: 7,
            page_token: token.clone(),
        };
        let list = client
            .raw()
            .list(pb::ListRequest {
                path: "tree".into(),
                recursive: true,
                page: Some(page),
            })
            .await?
            .into_inner();
        seen.extend(list.entries.into_iter().map(|e| e.path));
        if list.next_page_token.is_empty() {
            break;
        }
        token = list.next_page_token;
    }
    assert_eq!(seen.len(), 30);
    assert_eq!(seen[0], "tree/d0");
    assert_eq!(seen[1], "tree/d0/f00");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 30);

    let removed = client
        .raw()
        .delete(pb::DeleteRequest {
            path: "tree".into(),
            must_exist: true,
        })
        .await?
        .into_inner();
    assert_eq!(removed.removed_entries, 31);
    assert_eq!(removed.removed_bytes, (0..25).sum::<u64>());
    assert!(!store.join("tree").exists());
    let again = client
        .raw()
        .delete(pb::DeleteRequest {
            path: "tree".into(),
            must_exist: false,
        })
        .await?
        .into_inner();
    assert_eq!(again.removed_entries, 0);
    let missing = client
        .raw()
        .delete(pb::DeleteRequest {
            path: "tree".into(),
            must_exist: true,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let root = client
        .raw()
        .delete(pb::DeleteRequest {
            path: "/".into(),
            must_exist: false,
        })
        .await
        .unwrap_err();
    assert_eq!(root.code(), Code::InvalidArgument);

    let info = client.info().await?;
    assert_eq!(info.store_root, store.canonicalize()?.display().to_string());
    assert!(!info.store_id.is_empty());
    broker.stop().await?;
    Ok(())
}

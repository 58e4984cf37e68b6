//! Inputs and outputs through real brokers, end to end: a client reserves an upload at
//! the hub broker and sends its tree there under the coordinator's grant, submits the job
//! naming the upload, a real site's broker pulls the inputs into `key-<job>/incoming`,
//! the job runs, the site's broker pushes the outputs back, and the client downloads
//! them with a read grant from `GetJobOutputs`.

mod common;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tonic::Code;

use dispatch_broker::StorePath;
use dispatch_broker::client::{BrokerClient, TransferOptions};
use dispatch_broker::store::{LocalStore, Source, Store};
use dispatch_proto::v1;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey, tree_listing};

use common::site::{
    Site, SiteOptions, ended, hub_config, join_token, manager_config, plugin_job, states,
    wait_connected, watch_until,
};
use common::{Running, TestDb};

fn input_tree(root: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("a.txt"), "input a\n")?;
    std::fs::write(root.join("sub/b.txt"), "input b\n")?;
    Ok(())
}

#[tokio::test]
async fn inputs_and_outputs_travel_through_the_hub_and_site_brokers() -> Result<()> {
    let dir = TestDir::new("staging-e2e")?;
    std::fs::create_dir_all(dir.join("hub-keys"))?;
    std::fs::create_dir_all(dir.join("site-keys"))?;
    let hub_key = TestKey::create(&dir.join("hub-keys"))?;
    let site_key = TestKey::create(&dir.join("site-keys"))?;
    let hub_broker = InProcessBroker::start(&dir.join("hub-store"), Some(&hub_key), |_| {}).await?;

    let db = TestDb::sqlite()?;
    let mut config = hub_config(&db);
    config.hub_broker.uri = hub_broker.uri.clone();
    config.hub_broker.grant_key_file = Some(hub_key.file.clone());
    let hub = Running::start(config).await?;
    let mut client = hub.client().await?;

    let token = join_token(&mut client, &dir, "stager").await?;
    let grant_file = dir.join("site-broker.grant");
    std::fs::write(&grant_file, site_key.admin())?;
    let mut site_config = manager_config(&dir, "stager", &hub.uri, token, &SiteOptions::default())?;
    let site_broker =
        InProcessBroker::start(&site_config.store_root, Some(&site_key), |_| {}).await?;
    site_config.hub.site_broker_uri = site_broker.uri.clone();
    site_config.hub.site_broker_grant_file = Some(grant_file);
    let site = Site::start(&site_config).await?;
    wait_connected(&mut client, "stager").await?;

    // The client reserves an upload and sends its tree with the grant it got.
    let upload = client
        .create_upload(v1::CreateUploadRequest {
            job_id: "staged".into(),
            expected_bytes: 0,
        })
        .await?
        .into_inner();
    let access = upload.access.clone().context("upload access")?;
    assert_eq!(access.path, format!("uploads/{}", upload.upload_id));
    let broker_uri = access.broker.clone().context("broker endpoint")?.uri;
    assert_eq!(broker_uri, hub_broker.uri);

    // Submitting before the upload is committed is refused (and binds nothing).
    let mut spec = plugin_job("staged", "copy.sh", &[])?;
    spec.plugin_type = v1::PluginType::Ds.into();
    let early = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec.clone()),
            upload: Some(v1::UploadReference {
                upload_id: upload.upload_id.clone(),
                tree_digest: Default::default(),
            }),
            retry_if_failed: false,
        })
        .await
        .expect_err("not committed yet");
    assert_eq!(
        early.code(),
        Code::FailedPrecondition,
        "{}",
        early.message()
    );
    assert!(
        early.message().contains("not committed"),
        "{}",
        early.message()
    );

    let source = dir.join("inputs");
    input_tree(&source)?;
    let local: Arc<dyn Store> = Arc::new(LocalStore::open(&source)?);
    let mut uploader = BrokerClient::connect(&broker_uri, Some(&access.grant))?;
    let sent = uploader
        .upload(
            local,
            Source::Tree {
                path: StorePath::root(),
                skip_chrislinks: false,
            },
            &access.path,
            &TransferOptions::default(),
            None,
        )
        .await?;
    // The upload grant writes only its own place.
    let elsewhere = uploader.check_access("uploads/someone-else", true).await;
    assert!(
        elsewhere.is_err(),
        "an upload grant reaches only its upload"
    );

    let submitted = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec.clone()),
            upload: Some(v1::UploadReference {
                upload_id: upload.upload_id.clone(),
                tree_digest: sent.summary.digest.to_vec().into(),
            }),
            retry_if_failed: false,
        })
        .await?
        .into_inner();
    assert!(submitted.created);
    let job = submitted.job.context("job")?;
    let inputs = job
        .spec
        .as_ref()
        .and_then(|s| s.inputs.clone())
        .and_then(|i| i.source);
    let Some(v1::input_spec::Source::Uploaded(uploaded)) = inputs else {
        panic!("the coordinator fills the inputs in: {inputs:?}");
    };
    assert_eq!(uploaded.hub_path, access.path);
    assert_eq!(
        uploaded.tree_digest.as_ref(),
        sent.summary.digest.as_slice()
    );

    // Outputs are not there before the job ends.
    let status = client
        .get_job_outputs(v1::GetJobOutputsRequest {
            job_id: "staged".into(),
        })
        .await
        .expect_err("not back yet");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let events = watch_until(&mut client, "staged", ended).await?;
    assert_eq!(
        states(&events),
        [
            v1::JobState::Queued,
            v1::JobState::StagingIn,
            v1::JobState::Running,
            v1::JobState::StagingOut,
            v1::JobState::Succeeded
        ],
        "{events:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(site_config.store_root.join("key-staged/incoming/sub/b.txt"))?,
        "input b\n",
        "the site broker pulled the inputs"
    );

    let outputs = client
        .get_job_outputs(v1::GetJobOutputsRequest {
            job_id: "staged".into(),
        })
        .await?
        .into_inner();
    let summary = outputs.summary.context("summary")?;
    assert_eq!(summary.files, 3, "a.txt, sub/b.txt, run.json: {summary:?}");
    let access = outputs.access.context("output access")?;
    assert_eq!(access.path, "key-staged/outgoing");
    let mut downloader = BrokerClient::connect(&broker_uri, Some(&access.grant))?;
    let back: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.join("downloaded"))?);
    let got = downloader
        .download(
            v1::TreeSource {
                source: Some(v1::tree_source::Source::Tree(v1::TreePath {
                    path: access.path.clone(),
                    skip_chrislinks: false,
                })),
            },
            back,
            StorePath::from_api("outputs")?,
            &TransferOptions::default(),
            None,
        )
        .await?;
    assert_eq!(got.summary.digest.as_slice(), summary.tree_digest.as_ref());
    let downloaded = dir.join("downloaded/outputs");
    assert_eq!(
        std::fs::read_to_string(downloaded.join("a.txt"))?,
        "input a\n"
    );
    assert_eq!(
        std::fs::read_to_string(downloaded.join("sub/b.txt"))?,
        "input b\n"
    );
    assert!(downloaded.join("run.json").exists());
    let hub_outputs = tree_listing(&dir.join("hub-store/key-staged/outgoing"))?;
    assert_eq!(hub_outputs, tree_listing(&downloaded)?);
    // The read grant reads only the job's outputs.
    assert!(
        downloader
            .check_access(&format!("uploads/{}", upload.upload_id), false)
            .await
            .is_err()
    );

    // An upload serves one job.
    let mut other = plugin_job("other", "copy.sh", &[])?;
    other.plugin_type = v1::PluginType::Ds.into();
    let status = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(other),
            upload: Some(v1::UploadReference {
                upload_id: upload.upload_id.clone(),
                tree_digest: Default::default(),
            }),
            retry_if_failed: false,
        })
        .await
        .expect_err("taken");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("created for job `staged`"),
        "{}",
        status.message()
    );

    site.stop().await;
    hub.stop().await?;
    site_broker.stop().await?;
    hub_broker.stop().await
}

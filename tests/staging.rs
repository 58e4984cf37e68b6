//! A site broker stages a job's data with the hub broker: inputs in (with ChRIS links
//! expanded), outputs out (without symlinks or forged links), over the wire or by hard
//! link on a shared filesystem, each under the grant the coordinator would issue.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use dispatch_broker::client::BrokerClient;
use dispatch_proto::v1 as pb;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey, tree_listing};
use tonic::Code;

/// A CUBE-like hub store: a feed's data with a link to another user's shared dir, which
/// itself links to a pipeline dir.
fn hub_layout(root: &Path) -> anyhow::Result<()> {
    let data = root.join("home/alice/feed/data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("scan.dcm"), vec![7u8; 300_000])?;
    std::fs::write(data.join("bob.chrislink"), "home/bob/shared\n")?;
    std::fs::create_dir_all(root.join("home/bob/shared"))?;
    std::fs::write(root.join("home/bob/shared/notes.txt"), "bob's notes")?;
    std::fs::write(
        root.join("home/bob/shared/pipes.chrislink"),
        "PIPELINES/bob",
    )?;
    std::fs::create_dir_all(root.join("PIPELINES/bob"))?;
    std::fs::write(root.join("PIPELINES/bob/pipeline.yml"), "steps: []")?;
    std::fs::create_dir_all(root.join("home/alice/feed/out"))?;
    Ok(())
}

struct Sites {
    _dir: TestDir,
    hub: InProcessBroker,
    site: InProcessBroker,
    hub_key: TestKey,
    site_grant: String,
}

async fn start() -> anyhow::Result<Sites> {
    let dir = TestDir::new("staging")?;
    std::fs::create_dir_all(dir.join("hub-keys"))?;
    std::fs::create_dir_all(dir.join("site-keys"))?;
    let hub_key = TestKey::create(&dir.join("hub-keys"))?;
    let site_key = TestKey::create(&dir.join("site-keys"))?;
    hub_layout(&dir.join("hub"))?;
    let hub = InProcessBroker::start(&dir.join("hub"), Some(&hub_key), |_| {}).await?;
    let site = InProcessBroker::start(&dir.join("site"), Some(&site_key), |_| {}).await?;
    let site_grant = site_key.admin();
    Ok(Sites {
        _dir: dir,
        hub,
        site,
        hub_key,
        site_grant,
    })
}

fn inputs() -> pb::JobInputs {
    pb::JobInputs {
        input_dirs: vec!["home/alice/feed/data".into()],
        output_dir: "home/alice/feed/out".into(),
    }
}

async fn run_stage(
    client: &mut BrokerClient,
    request: StageRequest,
) -> Result<(pb::StageResult, Vec<pb::StageProgress>), tonic::Status> {
    let mut stream = match request {
        StageRequest::In(r) => client.raw().stage_in(r).await?.into_inner(),
        StageRequest::Out(r) => client.raw().stage_out(r).await?.into_inner(),
    };
    let mut seen = Vec::new();
    while let Some(progress) = stream.message().await? {
        if let Some(result) = progress.result.clone() {
            seen.push(progress);
            return Ok((result, seen));
        }
        seen.push(progress);
    }
    Err(tonic::Status::unknown("the stage ended without a result"))
}

enum StageRequest {
    In(pb::StageInRequest),
    Out(pb::StageOutRequest),
}

fn stage_in(sites: &Sites, job: &str, grant: &str, method: pb::StageMethod) -> StageRequest {
    StageRequest::In(pb::StageInRequest {
        job_id: job.into(),
        hub: Some(pb::Endpoint {
            uri: sites.hub.uri.clone(),
            ..Default::default()
        }),
        hub_grant: grant.into(),
        inputs: Some(inputs()),
        method: method as i32,
        ..Default::default()
    })
}

fn job_read_grant(sites: &Sites) -> String {
    sites.hub_key.key.mint_for(
        "chris-jid-1",
        &["home/alice/feed/data"],
        &[],
        Duration::from_secs(600),
    )
}

/// What `incoming/` holds after staging, sorted: the links replaced by the trees they name.
const EXPECTED_INPUTS: [&str; 5] = [
    "home_bob_shared",
    "home_bob_shared/PIPELINES_bob",
    "home_bob_shared/PIPELINES_bob/pipeline.yml",
    "home_bob_shared/notes.txt",
    "scan.dcm",
];

fn listed(root: &Path) -> anyhow::Result<Vec<String>> {
    Ok(tree_listing(root)?.into_keys().collect())
}

#[tokio::test]
async fn stage_in_over_the_wire_expands_chris_links() -> anyhow::Result<()> {
    let sites = start().await?;
    let mut site = BrokerClient::connect(&sites.site.uri, Some(&sites.site_grant))?;
    let request = stage_in(
        &sites,
        "chris-jid-1",
        &job_read_grant(&sites),
        pb::StageMethod::Transfer,
    );
    let (result, progress) = run_stage(&mut site, request).await?;
    assert_eq!(result.method, pb::StageMethod::Transfer as i32);
    assert_eq!(result.destination, "key-chris-jid-1/incoming");
    let summary = result.summary.expect("a summary");
    assert_eq!(
        summary.files, 3,
        "scan.dcm, notes.txt, pipeline.yml; no link files"
    );
    assert_eq!(summary.tree_digest.len(), 32);
    assert!(
        progress
            .iter()
            .any(|p| p.phase == pb::StagePhase::Transferring as i32)
    );
    let incoming = sites.site.store_root.join("key-chris-jid-1/incoming");
    let expected: Vec<String> = EXPECTED_INPUTS.iter().map(|p| p.to_string()).collect();
    assert_eq!(listed(&incoming)?, expected);
    assert_eq!(
        std::fs::read_to_string(incoming.join("home_bob_shared/PIPELINES_bob/pipeline.yml"))?,
        "steps: []"
    );

    // Staging again (a retried job) replaces the inputs and ends the same.
    run_stage(
        &mut site,
        stage_in(
            &sites,
            "chris-jid-1",
            &job_read_grant(&sites),
            pb::StageMethod::Transfer,
        ),
    )
    .await?;
    assert_eq!(listed(&incoming)?, expected);
    Ok(())
}

#[tokio::test]
async fn stage_in_on_a_shared_filesystem_links_instead_of_copying() -> anyhow::Result<()> {
    let sites = start().await?;
    let mut site = BrokerClient::connect(&sites.site.uri, Some(&sites.site_grant))?;
    let (result, _) = run_stage(
        &mut site,
        stage_in(
            &sites,
            "chris-jid-2",
            &job_read_grant(&sites),
            pb::StageMethod::Auto,
        ),
    )
    .await?;
    assert_eq!(
        result.method,
        pb::StageMethod::Link as i32,
        "both stores are on one filesystem here"
    );
    let linked = sites
        .site
        .store_root
        .join("key-chris-jid-2/incoming/scan.dcm");
    let original = sites.hub.store_root.join("home/alice/feed/data/scan.dcm");
    assert_eq!(
        std::fs::metadata(&linked)?.ino(),
        std::fs::metadata(&original)?.ino(),
        "a hard link, not a copy"
    );
    let expected: Vec<String> = EXPECTED_INPUTS.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        listed(&sites.site.store_root.join("key-chris-jid-2/incoming"))?,
        expected
    );
    Ok(())
}

#[tokio::test]
async fn staging_obeys_the_hub_grant_and_the_output_dir_rule() -> anyhow::Result<()> {
    let sites = start().await?;
    let mut site = BrokerClient::connect(&sites.site.uri, Some(&sites.site_grant))?;
    let other_job = sites.hub_key.key.mint_for(
        "chris-jid-9",
        &["home/alice/feed/other"],
        &[],
        Duration::from_secs(600),
    );
    for method in [pb::StageMethod::Transfer, pb::StageMethod::Link] {
        let refused = run_stage(
            &mut site,
            stage_in(&sites, "chris-jid-3", &other_job, method),
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{method:?}: {}",
            refused.message()
        );
        assert!(!sites.site.store_root.join("key-chris-jid-3").exists());
    }

    // A link to the job's own output dir (or above it) is refused, whatever the method.
    std::fs::write(
        sites
            .hub
            .store_root
            .join("home/alice/feed/data/loop.chrislink"),
        "home/alice",
    )?;
    for method in [pb::StageMethod::Transfer, pb::StageMethod::Link] {
        let refused = run_stage(
            &mut site,
            stage_in(&sites, "chris-jid-4", &job_read_grant(&sites), method),
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{method:?}: {}",
            refused.message()
        );
        assert!(
            refused.message().contains("loop.chrislink"),
            "{}",
            refused.message()
        );
        assert!(!sites.site.store_root.join("key-chris-jid-4").exists());
    }
    Ok(())
}

#[tokio::test]
async fn stage_out_leaves_symlinks_and_forged_links_behind() -> anyhow::Result<()> {
    let sites = start().await?;
    let mut site = BrokerClient::connect(&sites.site.uri, Some(&sites.site_grant))?;
    for (job, method, destination) in [
        (
            "chris-jid-5",
            pb::StageMethod::Transfer,
            "home/alice/feed/out/wire",
        ),
        (
            "chris-jid-6",
            pb::StageMethod::Auto,
            "home/alice/feed/out/linked",
        ),
    ] {
        let outgoing = sites.site.store_root.join(format!("key-{job}/outgoing"));
        std::fs::create_dir_all(outgoing.join("results"))?;
        std::fs::write(outgoing.join("results/volume.nii"), vec![1u8; 200_000])?;
        std::fs::write(outgoing.join("steal.chrislink"), "home/bob/shared")?;
        std::os::unix::fs::symlink("/etc/shadow", outgoing.join("shadow"))?;
        let grant = sites
            .hub_key
            .key
            .mint_for(job, &[], &[destination], Duration::from_secs(600));
        let request = StageRequest::Out(pb::StageOutRequest {
            job_id: job.into(),
            hub: Some(pb::Endpoint {
                uri: sites.hub.uri.clone(),
                ..Default::default()
            }),
            hub_grant: grant,
            destination: destination.into(),
            method: method as i32,
            ..Default::default()
        });
        let (result, _) = run_stage(&mut site, request).await?;
        let summary = result.summary.expect("a summary");
        assert_eq!((summary.files, summary.skipped), (1, 2), "{method:?}");
        let landed = sites.hub.store_root.join(destination);
        assert_eq!(
            listed(&landed)?,
            ["results", "results/volume.nii"],
            "{method:?}"
        );
    }
    // Without a grant for the destination, nothing is written at the hub.
    let grant = sites.hub_key.key.mint_for(
        "chris-jid-5",
        &[],
        &["home/alice/feed/out/wire"],
        Duration::from_secs(600),
    );
    let request = StageRequest::Out(pb::StageOutRequest {
        job_id: "chris-jid-5".into(),
        hub: Some(pb::Endpoint {
            uri: sites.hub.uri.clone(),
            ..Default::default()
        }),
        hub_grant: grant,
        destination: "home/bob/shared/overwrite".into(),
        method: pb::StageMethod::Auto as i32,
        ..Default::default()
    });
    let refused = run_stage(&mut site, request).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "{}",
        refused.message()
    );
    assert!(
        !sites
            .hub
            .store_root
            .join("home/bob/shared/overwrite")
            .exists()
    );
    Ok(())
}

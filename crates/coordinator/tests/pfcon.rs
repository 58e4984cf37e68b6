//! pfcon's REST API as CUBE and pfcon's own tests use it, black-box over HTTP: a real
//! coordinator with the face on, a real hub broker whose store is pfcon's storeBase, and
//! a real site (local backend, site broker) running the test plugins. Carries the
//! assertions of pfcon's test list (pfcon-api.md §8) that apply to zipfile mode: auth and
//! its exact refusals, server info, skipped copy and upload jobs, plugin jobs with a zip
//! in and a zip out, idempotent replays, rescheduling of failed jobs, guards, validation
//! messages, delete jobs, and DELETEs that always answer 204.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use dispatch_coordinator::pfcon::PfconConfig;
use dispatch_coordinator::pfcon::jwt::Tokens;
use dispatch_testkit::images::plugin_host_path;
use dispatch_testkit::{InProcessBroker, TestDir, TestKey, multipart_body};

use common::site::{
    Site, SiteOptions, hub_config, join_token, manager_config, unique_name, wait_connected,
};
use common::{Running, TestDb};

const USER: &str = "pfcon";
const PASSWORD: &str = "pfcon1234";
const SECRET: &str = "pfcon-test-secret";

/// A hub with the pfcon face on and one site.
struct Hub {
    _db: TestDb,
    dir: TestDir,
    api: String,
    storebase: PathBuf,
    agent: ureq::Agent,
    token: String,
    hub: Running,
    site: Site,
    brokers: Vec<InProcessBroker>,
}

impl Hub {
    async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, |_| {}).await
    }

    async fn start_with(name: &str, tune: impl FnOnce(&mut PfconConfig)) -> Result<Self> {
        let dir = TestDir::new(name)?;
        std::fs::create_dir_all(dir.join("hub-keys"))?;
        std::fs::create_dir_all(dir.join("site-keys"))?;
        let hub_key = TestKey::create(&dir.join("hub-keys"))?;
        let site_key = TestKey::create(&dir.join("site-keys"))?;
        let storebase = dir.join("storeBase");
        std::fs::create_dir_all(&storebase)?;
        let hub_broker = InProcessBroker::start(&storebase, Some(&hub_key), |_| {}).await?;

        let db = TestDb::sqlite()?;
        let mut config = hub_config(&db);
        config.hub_broker.uri = hub_broker.uri.clone();
        config.hub_broker.grant_key_file = Some(hub_key.file.clone());
        config.pfcon = PfconConfig {
            // Bound by the test itself; any address marks the face on.
            listen: Some("127.0.0.1:1".parse()?),
            user: USER.into(),
            password: PASSWORD.into(),
            secret_key: SECRET.into(),
            storebase: storebase.clone(),
            job_logs_tail: 50,
            ..PfconConfig::default()
        };
        tune(&mut config.pfcon);
        let config_storage = config.pfcon.storage_env.clone();
        let (hub, api) = Running::start_with_pfcon(config).await?;
        let mut client = hub.client().await?;
        // A site name of its own: the local backend names its cgroups after the manager
        // and the job, and a job of an earlier run may still be ending.
        let site_name = unique_name("pfcon-site");
        let token = join_token(&mut client, &dir, &site_name).await?;
        let grant_file = dir.join("site-broker.grant");
        std::fs::write(&grant_file, site_key.admin())?;
        let filesystem = config_storage == "filesystem";
        let mut site_config =
            manager_config(&dir, &site_name, &hub.uri, token, &SiteOptions::default())?;
        if filesystem {
            // pfcon's filesystem mode runs where the compute mounts storeBase itself.
            site_config.store_root = storebase.clone();
        }
        let site_broker =
            InProcessBroker::start(&site_config.store_root, Some(&site_key), |_| {}).await?;
        site_config.hub.site_broker_uri = site_broker.uri.clone();
        site_config.hub.site_broker_grant_file = Some(grant_file);
        let site = Site::start(&site_config).await?;
        wait_connected(&mut client, &site_name).await?;

        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut hub = Self {
            _db: db,
            dir,
            api,
            storebase,
            agent,
            token: String::new(),
            hub,
            site,
            brokers: vec![hub_broker, site_broker],
        };
        let (status, body) = hub.post_json(
            "auth-token/",
            &serde_json::json!({"pfcon_user": USER, "pfcon_password": PASSWORD}),
        )?;
        assert_eq!(status, 200, "{body}");
        hub.token = body["token"].as_str().context("token")?.to_owned();
        Ok(hub)
    }

    async fn stop(self) -> Result<()> {
        self.site.stop().await;
        self.hub.stop().await?;
        for broker in self.brokers {
            broker.stop().await?;
        }
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn get(&self, path: &str) -> Result<(u16, Value)> {
        let mut response = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.bearer())
            .call()?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn get_with(&self, path: &str, authorization: Option<&str>) -> Result<(u16, Value)> {
        let mut request = self.agent.get(&self.url(path));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let mut response = request.call()?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let mut response = self.agent.post(&self.url(path)).send_json(body)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Result<(u16, Value)> {
        let mut response = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.bearer())
            .send_form(fields.iter().copied())?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// A multipart POST as python-requests sends one: the fields, then the zip.
    fn post_multipart(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        zip: &[u8],
    ) -> Result<(u16, Value)> {
        let boundary = "dispatch-test-boundary-1b2c3d";
        let fields: Vec<(&str, String)> =
            fields.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let mut body = Vec::new();
        multipart_body(boundary, &fields, std::io::Cursor::new(zip.to_vec()))
            .read_to_end(&mut body)?;
        let mut response = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.bearer())
            .header(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send(&body[..])?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn delete(&self, path: &str) -> Result<u16> {
        let response = self
            .agent
            .delete(&self.url(path))
            .header("Authorization", &self.bearer())
            .call()?;
        Ok(response.status().as_u16())
    }

    /// Polls the plugin job until it ends, as CUBE does.
    fn wait_plugin(&self, jid: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get(&format!("pluginjobs/{jid}/"))?;
            assert_eq!(status, 200, "{body}");
            let word = body["compute"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if matches!(
                word.as_str(),
                "finishedSuccessfully" | "finishedWithError" | "undefined"
            ) {
                return Ok(body["compute"].clone());
            }
            if Instant::now() > deadline {
                bail!("job {jid} did not end: {body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A zip of `files` (name, content) as CUBE builds one.
fn zip_of(files: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, content) in files {
        writer.start_file(*name, zip::write::SimpleFileOptions::default())?;
        writer.write_all(content.as_bytes())?;
    }
    Ok(writer.finish()?.into_inner())
}

/// The names and contents in a zip.
fn unzip(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
    let mut out = Vec::new();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        out.push((file.name()?.to_string(), text));
    }
    out.sort();
    Ok(out)
}

fn plugin_fields<'a>(jid: &'a str, script: &'a str, kind: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("jid", jid),
        ("image", "local/ignored:1"),
        ("entrypoint", "/bin/sh"),
        ("entrypoint", script),
        ("type", kind),
        ("auid", "cube"),
        ("number_of_workers", "1"),
        ("cpu_limit", "100"),
        ("memory_limit", "64"),
        ("gpu_limit", "0"),
    ]
}

fn script(name: &str) -> Result<String> {
    Ok(plugin_host_path(name)?.display().to_string())
}

fn no_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_health_and_server_info_answer_as_pfcon_does() -> Result<()> {
    let hub = Hub::start("pfcon-auth").await?;
    let (status, body) = hub.get_with("health/", None)?;
    assert_eq!((status, body), (200, serde_json::json!({"health": "OK"})));

    let (status, body) = hub.post_json(
        "auth-token/",
        &serde_json::json!({"pfcon_user": USER, "pfcon_password": "wrong"}),
    )?;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "Unable to log in with provided credentials."
    );
    let (status, body) = hub.post_json("auth-token/", &serde_json::json!({}))?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]["pfcon_user"].is_string(), "{body}");
    assert!(body["message"]["pfcon_password"].is_string(), "{body}");
    // A form login works too.
    let mut response = hub
        .agent
        .post(&hub.url("auth-token/"))
        .send_form([("pfcon_user", USER), ("pfcon_password", PASSWORD)])?;
    assert_eq!(response.status().as_u16(), 200);
    let form: Value = serde_json::from_str(&response.body_mut().read_to_string()?)?;
    assert!(
        form["token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3)
    );

    for list in ["copyjobs/", "pluginjobs/", "uploadjobs/", "deletejobs/"] {
        let (status, info) = hub.get(list)?;
        assert_eq!(status, 200, "{list}: {info}");
        assert!(info["server_version"].is_string(), "{info}");
        assert_eq!(info["pfcon_innetwork"], false);
        assert_eq!(info["storage_env"], "zipfile");
        assert_eq!(info["requires_copy_job"], false);
        assert_eq!(info["requires_upload_job"], false);
        assert_eq!(info["container_env"], "docker");
        assert_eq!(info["compute_volume_type"], "host");
    }

    let expired = format!("Bearer {}", Tokens::new(SECRET).issue(USER, 1_000));
    let foreign = format!(
        "Bearer {}",
        Tokens::new("another key").issue(USER, 4_000_000_000)
    );
    let refusals = [
        (None, "Missing authorization header."),
        (Some("Token abc"), "Invalid authorization header."),
        (Some("Bearer garbage"), "Invalid authorization token."),
        (Some(foreign.as_str()), "Invalid authorization token."),
        (Some(expired.as_str()), "Expired authorization token."),
    ];
    for (header, says) in refusals {
        let (status, body) = hub.get_with("pluginjobs/", header)?;
        assert_eq!(status, 401, "{header:?}: {body}");
        assert_eq!(body["message"], says, "{header:?}");
    }
    // Unknown routes are 404 without a token check, as in flask.
    let (status, _) = hub.get_with("nothing-here/", None)?;
    assert_eq!(status, 404);
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zipfile_plugin_job_runs_end_to_end_with_cubes_calls() -> Result<()> {
    let hub = Hub::start("pfcon-cycle").await?;
    let jid = "chris-jid-1";
    // CUBE's sequence for an out-of-network compute resource.
    let (status, copy) = hub.post_form(
        "copyjobs/",
        &[("jid", jid), ("output_dir", "home/cube/feeds/1/out")],
    )?;
    assert_eq!(status, 201, "{copy}");
    assert_eq!(copy["compute"]["status"], "finishedSuccessfully");
    assert_eq!(copy["compute"]["message"], "copySkipped");

    let zip = zip_of(&[("test.txt", "hello\n"), ("sub/deeper/b.txt", "bee\n")])?;
    let copy_sh = script("copy.sh")?;
    let fields = plugin_fields(jid, &copy_sh, "ds");
    let (status, posted) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(posted["data"]["jid"], jid);
    assert_eq!(posted["data"]["nfiles"], 2, "{posted}");
    assert!(posted["data"]["timestamp"].is_string());
    assert_eq!(posted["compute"]["jid"], jid);
    assert_eq!(posted["compute"]["image"], "local/ignored:1");
    assert_eq!(posted["compute"]["status"], "notStarted", "{posted}");
    assert_eq!(posted["compute"]["logs"], "");
    let cmd = posted["compute"]["cmd"].as_str().unwrap_or_default();
    assert!(
        cmd.starts_with("/bin/sh ") && cmd.ends_with(" /share/incoming /share/outgoing"),
        "pfcon's command for a ds plugin: {cmd}"
    );

    let done = hub.wait_plugin(jid)?;
    assert_eq!(done["status"], "finishedSuccessfully", "{done}");
    // A replay of a finished job returns it and schedules nothing.
    let (status, again) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["compute"]["status"], "finishedSuccessfully");
    let mut client = hub.hub.client().await?;
    let job = client
        .get_job(dispatch_proto::v1::GetJobRequest { job_id: jid.into() })
        .await?
        .into_inner();
    assert_eq!(job.attempt, 1, "the replay ran nothing");

    // The output zip holds the plugin's outputs, paths relative to outgoing/.
    let mut response = hub
        .agent
        .get(&hub.url(&format!("pluginjobs/{jid}/file/")))
        .header("Authorization", &hub.bearer())
        .call()?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/zip")
    );
    assert_eq!(
        response
            .headers()
            .get("content-disposition")
            .and_then(|v| v.to_str().ok()),
        Some(format!("attachment; filename={jid}.zip").as_str())
    );
    let bytes = response.body_mut().read_to_vec()?;
    let files = unzip(&bytes)?;
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["run.json", "sub/deeper/b.txt", "test.txt"],
        "{files:?}"
    );
    assert_eq!(files[2].1, "hello\n");

    let (status, upload) = hub.post_form(
        "uploadjobs/",
        &[("jid", jid), ("job_output_path", "home/cube/feeds/1/out")],
    )?;
    assert_eq!(status, 201, "{upload}");
    assert_eq!(upload["compute"]["message"], "uploadSkipped");

    // The delete job removes the job's data from storeBase.
    assert!(hub.storebase.join(format!("key-{jid}")).is_dir());
    let (status, deleted) = hub.post_form("deletejobs/", &[("jid", jid)])?;
    assert_eq!(status, 201, "{deleted}");
    assert_eq!(deleted["compute"]["status"], "finishedSuccessfully");
    assert!(!hub.storebase.join(format!("key-{jid}")).exists());
    assert!(
        no_entries(&hub.storebase.join("uploads")),
        "the job's inputs are gone too"
    );
    let (status, status_body) = hub.get(&format!("deletejobs/{jid}/"))?;
    assert_eq!(status, 200, "{status_body}");
    assert_eq!(status_body["compute"]["status"], "finishedSuccessfully");
    let (status, again) = hub.post_form("deletejobs/", &[("jid", jid)])?;
    assert_eq!(status, 201);
    assert_eq!(again["compute"]["message"], "deleteSkipped");

    for route in ["copyjobs", "pluginjobs", "uploadjobs", "deletejobs"] {
        assert_eq!(hub.delete(&format!("{route}/{jid}/"))?, 204, "{route}");
    }
    assert_eq!(hub.delete("pluginjobs/chris-jid-never/")?, 204);
    let (status, _) = hub.get("pluginjobs/chris-jid-never/")?;
    assert_eq!(status, 404);
    assert!(no_entries(&hub.storebase.join(".dispatch-pfcon")));
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_posts_get_pfcons_messages_and_leave_nothing_behind() -> Result<()> {
    let hub = Hub::start("pfcon-bad").await?;
    let zip = zip_of(&[("a.txt", "a\n")])?;
    let copy_sh = script("copy.sh")?;

    let (status, body) = hub.post_multipart("pluginjobs/", &[("jid", "x")], &zip)?;
    assert_eq!(status, 400, "{body}");
    for field in [
        "image",
        "auid",
        "number_of_workers",
        "cpu_limit",
        "memory_limit",
        "gpu_limit",
        "type",
    ] {
        assert!(body["message"][field].is_string(), "{field}: {body}");
    }

    let mut fields = plugin_fields("bad-1", &copy_sh, "ds");
    fields.retain(|(k, _)| *k != "entrypoint");
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(
        (status, body["message"].clone()),
        (400, "entrypoint: cannot be empty".into())
    );

    let mut fields = plugin_fields("bad-2", &copy_sh, "ds");
    fields.push(("env", "NOT_A_PAIR"));
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        r#"env: must be a list of "key=value" strings"#
    );

    let mut fields = plugin_fields("bad-3", &copy_sh, "ds");
    fields.retain(|(k, _)| *k != "number_of_workers");
    fields.push(("number_of_workers", "2"));
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "Compute environment only supports number_of_workers=1, got 2"
    );

    let mut fields = plugin_fields("bad-4", &copy_sh, "xs");
    fields.push(("cpu_limit", "lots"));
    fields.retain(|(k, v)| !(*k == "cpu_limit" && *v == "100"));
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, &zip)?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]["type"].is_string(), "{body}");
    assert!(
        body["message"]["cpu_limit"]
            .as_str()
            .is_some_and(|m| m.contains("'lots'")),
        "{body}"
    );

    let fields = plugin_fields("bad-5", &copy_sh, "ds");
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, b"this is not a zip")?;
    assert_eq!(
        (status, body["message"].clone()),
        (400, "data_file: Bad zip file".into())
    );

    // Hostile entries are refused, naming the entry; nothing lands outside.
    let evil = zip_of(&[("ok.txt", "fine\n"), ("../../escaped.txt", "gotcha\n")])?;
    let fields = plugin_fields("bad-6", &copy_sh, "ds");
    let (status, body) = hub.post_multipart("pluginjobs/", &fields, &evil)?;
    assert_eq!(status, 400, "{body}");
    let text = body["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("data_file: ") && text.contains("escaped.txt"),
        "{text}"
    );
    assert!(!hub.dir.join("escaped.txt").exists());
    assert!(!hub.storebase.join("escaped.txt").exists());

    // A form POST without the zip names the missing file.
    let (status, body) = hub.post_form("pluginjobs/", &plugin_fields("bad-7", &copy_sh, "ds"))?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]["data_file"].is_string(), "{body}");
    let (status, body) = hub.post_form("copyjobs/", &[("jid", "c")])?;
    assert_eq!(status, 400);
    assert!(body["message"]["output_dir"].is_string(), "{body}");

    assert!(
        no_entries(&hub.storebase.join(".dispatch-pfcon")),
        "unpacking dirs are removed"
    );
    let mut client = hub.hub.client().await?;
    let jobs = client
        .list_jobs(dispatch_proto::v1::ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "no bad POST made a job: {jobs:?}");
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_job_is_run_again_and_an_active_one_blocks_its_delete() -> Result<()> {
    let hub = Hub::start("pfcon-retry").await?;
    let zip = zip_of(&[("a.txt", "a\n")])?;

    // A plugin that fails ends finishedWithError; posting it again runs it again.
    let exit_sh = script("exit.sh")?;
    let mut failing = plugin_fields("retry-1", &exit_sh, "fs");
    failing.push(("args", "--code"));
    failing.push(("args", "3"));
    let (status, body) = hub.post_multipart("pluginjobs/", &failing, &zip)?;
    assert_eq!(status, 201, "{body}");
    let ended = hub.wait_plugin("retry-1")?;
    assert_eq!(ended["status"], "finishedWithError", "{ended}");
    let passing = plugin_fields("retry-1", &exit_sh, "fs");
    let (status, body) = hub.post_multipart("pluginjobs/", &passing, &zip)?;
    assert_eq!(status, 201, "{body}");
    let ended = hub.wait_plugin("retry-1")?;
    assert_eq!(ended["status"], "finishedSuccessfully", "{ended}");

    // A running job: replays return it as is, and a delete job waits for it.
    let sleep_sh = script("sleep.sh")?;
    let mut sleeping = plugin_fields("busy-1", &sleep_sh, "fs");
    sleeping.push(("args", "--seconds"));
    sleeping.push(("args", "30"));
    let (status, _) = hub.post_multipart("pluginjobs/", &sleeping, &zip)?;
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = hub.get("pluginjobs/busy-1/")?;
        if body["compute"]["status"] == "started" {
            break;
        }
        assert!(Instant::now() < deadline, "never started: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = hub.post_multipart("pluginjobs/", &sleeping, &zip)?;
    assert_eq!(status, 201);
    assert_eq!(body["compute"]["status"], "started");
    let (status, body) = hub.post_form("deletejobs/", &[("jid", "busy-1")])?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["message"],
        "The plugin job is still active (status: started). All jobs must finish before scheduling a delete job."
    );
    assert_eq!(hub.delete("pluginjobs/busy-1/")?, 204);
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_legacy_jobs_api_serves_cube_6() -> Result<()> {
    let hub = Hub::start_with("pfcon-legacy", |pfcon| pfcon.legacy_api = true).await?;
    let (status, info) = hub.get("jobs/")?;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["storage_env"], "zipfile");
    assert_eq!(info["pfcon_innetwork"], false);
    assert_eq!(info["compute_volume_type"], "host");
    assert!(info["server_version"].is_string());
    assert!(
        info.get("requires_copy_job").is_none(),
        "pfcon 5 had no such flag: {info}"
    );

    let zip = zip_of(&[("out/test.txt", "legacy\n")])?;
    let copy_sh = script("copy.sh")?;
    // pfcon 5 required args, even empty.
    let (status, body) =
        hub.post_multipart("jobs/", &plugin_fields("legacy-1", &copy_sh, "ds"), &zip)?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]["args"].is_string(), "{body}");

    let mut fields = plugin_fields("legacy-1", &copy_sh, "ds");
    fields.push(("args", "--saveinputmeta"));
    fields.push(("args", "yes"));
    let (status, body) = hub.post_multipart("jobs/", &fields, &zip)?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["nfiles"], 1);
    assert!(
        matches!(
            body["compute"]["status"].as_str(),
            Some("notstarted" | "started")
        ),
        "pfcon 5 spelt it in lower case: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = hub.get("jobs/legacy-1/")?;
        assert_eq!(status, 200, "{body}");
        if body["compute"]["status"] == "finishedSuccessfully" {
            break;
        }
        assert!(Instant::now() < deadline, "never finished: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut response = hub
        .agent
        .get(&hub.url("jobs/legacy-1/file/"))
        .header("Authorization", &hub.bearer())
        .call()?;
    assert_eq!(response.status().as_u16(), 200);
    let files = unzip(&response.body_mut().read_to_vec()?)?;
    assert!(
        files.contains(&("out/test.txt".to_owned(), "legacy\n".to_owned())),
        "{files:?}"
    );

    assert_eq!(hub.delete("jobs/legacy-1/")?, 204);
    assert!(
        !hub.storebase.join("key-legacy-1").exists(),
        "the data went with it"
    );
    assert_eq!(hub.delete("jobs/never-posted/")?, 404);
    // The current API is served beside it.
    let (status, _) = hub.get("pluginjobs/")?;
    assert_eq!(status, 200);
    hub.stop().await
}

/// Writes `files` (storeBase-relative name, content) into the shared storeBase, as CUBE's
/// storage would hold them.
fn write_store(storebase: &Path, files: &[(&str, &str)]) -> Result<()> {
    for (name, content) in files {
        let path = storebase.join(name);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(path, content)?;
    }
    Ok(())
}

fn wait_copy(hub: &Hub, jid: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = hub.get(&format!("copyjobs/{jid}/"))?;
        assert_eq!(status, 200, "{body}");
        let word = body["compute"]["status"].as_str().unwrap_or_default();
        if word != "started" && word != "notStarted" {
            return Ok(body["compute"].clone());
        }
        if Instant::now() > deadline {
            bail!("copy {jid} did not end: {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fslink_mode_copies_with_chris_links_then_runs_into_the_output_dir() -> Result<()> {
    let hub = Hub::start_with("pfcon-fslink", |pfcon| {
        pfcon.innetwork = true;
        pfcon.storage_env = "fslink".into();
    })
    .await?;
    let (_, info) = hub.get("copyjobs/")?;
    assert_eq!(info["storage_env"], "fslink");
    assert_eq!(info["pfcon_innetwork"], true);
    assert_eq!(info["requires_copy_job"], true);
    assert_eq!(info["requires_upload_job"], false);

    write_store(
        &hub.storebase,
        &[
            ("home/bob/uploads/test.txt", "shared input\n"),
            ("home/bob/uploads/pipes.chrislink", "home/bob/PIPELINES\n"),
            ("home/bob/PIPELINES/pipeline.yml", "steps: []\n"),
        ],
    )?;
    let jid = "chris-jid-21";
    let out = "home/bob/feeds/21/pl-copy_21/data";
    let copy_sh = script("copy.sh")?;
    let mut plugin = plugin_fields(jid, &copy_sh, "ds");
    plugin.push(("output_dir", out));
    plugin.push(("input_dirs", "home/bob/uploads"));

    // The guard: no plugin before its copy.
    let (status, body) = hub.post_form("pluginjobs/", &plugin)?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["message"],
        "No copy job found. A copy job must complete successfully before scheduling a plugin job."
    );

    let copy_fields = [
        ("jid", jid),
        ("input_dirs", "home/bob/uploads"),
        ("output_dir", out),
    ];
    let (status, body) = hub.post_form("copyjobs/", &copy_fields)?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["compute"]["jid"], jid);
    let copied = wait_copy(&hub, jid)?;
    assert_eq!(copied["status"], "finishedSuccessfully", "{copied}");
    let incoming = hub.storebase.join(format!("key-{jid}/incoming"));
    assert_eq!(
        std::fs::read_to_string(incoming.join("test.txt"))?,
        "shared input\n"
    );
    assert_eq!(
        std::fs::read_to_string(incoming.join("home_bob_PIPELINES/pipeline.yml"))?,
        "steps: []\n",
        "the ChRIS link became the directory it names"
    );
    assert!(!incoming.join("pipes.chrislink").exists());
    let params: Value = serde_json::from_slice(&std::fs::read(
        hub.storebase.join(format!("key-{jid}/job_params.json")),
    )?)?;
    assert_eq!(params["jid"], jid);
    assert_eq!(params["storage_env"], "fslink");
    // A finished copy posted again is returned, not run again.
    let (status, again) = hub.post_form("copyjobs/", &copy_fields)?;
    assert_eq!(
        (status, again["compute"]["status"].clone()),
        (201, "finishedSuccessfully".into())
    );

    let (status, posted) = hub.post_form("pluginjobs/", &plugin)?;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(
        posted["data"],
        serde_json::json!({}),
        "pfcon's fslink data is empty"
    );
    let done = hub.wait_plugin(jid)?;
    assert_eq!(done["status"], "finishedSuccessfully", "{done}");
    let output = hub.storebase.join(out);
    assert_eq!(
        std::fs::read_to_string(output.join("test.txt"))?,
        "shared input\n"
    );

    // CUBE lists the output dir; links a plugin wrote are deleted and left out.
    std::fs::write(output.join("evil.chrislink"), "home/alice\n")?;
    let (status, body) = hub.get(&format!("pluginjobs/{jid}/file/"))?;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "job_output_path: query parameter is required"
    );
    let (status, listing) = hub.get(&format!("pluginjobs/{jid}/file/?job_output_path=/{out}"))?;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(listing["job_output_path"], out);
    let files: Vec<&str> = listing["rel_file_paths"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        files.contains(&"test.txt") && files.contains(&"run.json"),
        "{listing}"
    );
    assert!(
        files.contains(&"home_bob_PIPELINES/pipeline.yml"),
        "{listing}"
    );
    assert!(
        !files.iter().any(|f| f.ends_with(".chrislink")),
        "{listing}"
    );
    assert!(
        !output.join("evil.chrislink").exists(),
        "the plugin's link is deleted"
    );
    let (status, _) = hub.get(&format!(
        "pluginjobs/{jid}/file/?job_output_path=home/nobody"
    ))?;
    assert_eq!(status, 404);

    let (status, upload) =
        hub.post_form("uploadjobs/", &[("jid", jid), ("job_output_path", out)])?;
    assert_eq!(
        (status, upload["compute"]["message"].clone()),
        (201, "uploadSkipped".into())
    );
    let (status, deleted) = hub.post_form("deletejobs/", &[("jid", jid)])?;
    assert_eq!(status, 201, "{deleted}");
    assert!(!hub.storebase.join(format!("key-{jid}")).exists());
    assert!(
        output.join("test.txt").exists(),
        "the outputs are CUBE's: they stay"
    );
    for route in ["copyjobs", "pluginjobs", "uploadjobs", "deletejobs"] {
        assert_eq!(hub.delete(&format!("{route}/{jid}/"))?, 204, "{route}");
    }
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filesystem_mode_runs_on_the_input_dir_as_it_is() -> Result<()> {
    let hub = Hub::start_with("pfcon-filesystem", |pfcon| {
        pfcon.innetwork = true;
        pfcon.storage_env = "filesystem".into();
    })
    .await?;
    let (_, info) = hub.get("pluginjobs/")?;
    assert_eq!(info["storage_env"], "filesystem");
    assert_eq!(info["requires_copy_job"], false);
    write_store(
        &hub.storebase,
        &[
            ("home/bob/uploads/a.txt", "a\n"),
            ("home/bob/uploads/sub/b.txt", "b\n"),
        ],
    )?;
    let jid = "chris-jid-31";
    let out = "home/bob/feeds/31/out";
    let (status, copy) = hub.post_form("copyjobs/", &[("jid", jid), ("output_dir", out)])?;
    assert_eq!(
        (status, copy["compute"]["message"].clone()),
        (201, "copySkipped".into())
    );

    let copy_sh = script("copy.sh")?;
    let mut missing = plugin_fields("chris-jid-30", &copy_sh, "ds");
    missing.push(("output_dir", out));
    missing.push(("input_dirs", "home/bob/not-there"));
    let (status, body) = hub.post_form("pluginjobs/", &missing)?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["message"],
        "input_dirs: Error accessing files from shared filesystem"
    );
    let mut no_output = plugin_fields("chris-jid-30", &copy_sh, "ds");
    no_output.push(("input_dirs", "home/bob/uploads"));
    let (status, body) = hub.post_form("pluginjobs/", &no_output)?;
    assert_eq!(
        (status, body["message"].clone()),
        (400, "output_dir: field is required".into())
    );

    let mut plugin = plugin_fields(jid, &copy_sh, "ds");
    plugin.push(("output_dir", out));
    plugin.push(("input_dirs", "home/bob/uploads"));
    let (status, posted) = hub.post_form("pluginjobs/", &plugin)?;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(posted["data"]["nfiles"], 2, "{posted}");
    let done = hub.wait_plugin(jid)?;
    assert_eq!(done["status"], "finishedSuccessfully", "{done}");
    assert_eq!(
        std::fs::read_to_string(hub.storebase.join(out).join("sub/b.txt"))?,
        "b\n"
    );
    let (status, listing) = hub.get(&format!("pluginjobs/{jid}/file/?job_output_path={out}"))?;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(
        listing["rel_file_paths"],
        serde_json::json!(["a.txt", "run.json", "sub/b.txt"])
    );
    // Nothing of the job lives in key-<jid> in this mode: the delete job is skipped.
    let (status, deleted) = hub.post_form("deletejobs/", &[("jid", "chris-jid-unknown")])?;
    assert_eq!(
        (status, deleted["compute"]["message"].clone()),
        (201, "deleteSkipped".into())
    );
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_jobs_that_failed_or_were_cut_off_run_again() -> Result<()> {
    let hub = Hub::start_with("pfcon-copy-retry", |pfcon| {
        pfcon.innetwork = true;
        pfcon.storage_env = "fslink".into();
    })
    .await?;
    let out = "home/bob/feeds/22/pl-x_22/data";
    // A ChRIS link to an ancestor of the job's own output dir fails the copy, as in pfcon.
    write_store(
        &hub.storebase,
        &[
            ("home/bob/in22/a.txt", "a\n"),
            ("home/bob/in22/loop.chrislink", "home/bob/feeds"),
        ],
    )?;
    let fields = [
        ("jid", "chris-jid-22"),
        ("input_dirs", "home/bob/in22"),
        ("output_dir", out),
    ];
    let (status, _) = hub.post_form("copyjobs/", &fields)?;
    assert_eq!(status, 201);
    let failed = wait_copy(&hub, "chris-jid-22")?;
    assert_eq!(failed["status"], "finishedWithError", "{failed}");
    assert!(
        failed["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{failed}"
    );
    // The plugin's guard names the copy's status.
    let copy_sh = script("copy.sh")?;
    let mut plugin = plugin_fields("chris-jid-22", &copy_sh, "ds");
    plugin.push(("output_dir", out));
    let (status, body) = hub.post_form("pluginjobs/", &plugin)?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["message"],
        "Copy job has not completed successfully (status: finishedWithError). Run the copy job first."
    );
    // Fixed and posted again, it runs again.
    std::fs::remove_file(hub.storebase.join("home/bob/in22/loop.chrislink"))?;
    let (status, _) = hub.post_form("copyjobs/", &fields)?;
    assert_eq!(status, 201);
    let copied = wait_copy(&hub, "chris-jid-22")?;
    assert_eq!(copied["status"], "finishedSuccessfully", "{copied}");

    // A copy cut off by a restart (its state says started, nothing runs it) reads
    // undefined, blocks nothing forever, and runs again when posted.
    let key = hub.storebase.join("key-chris-jid-23");
    std::fs::create_dir_all(&key)?;
    std::fs::write(
        key.join("copy_status.json"),
        r#"{"status":"started","message":"","timestamp":"","nfiles":0}"#,
    )?;
    let (status, body) = hub.get("copyjobs/chris-jid-23/")?;
    assert_eq!(
        (status, body["compute"]["status"].clone()),
        (200, "undefined".into())
    );
    let (status, _) = hub.post_form(
        "copyjobs/",
        &[
            ("jid", "chris-jid-23"),
            ("input_dirs", "home/bob/in22"),
            ("output_dir", out),
        ],
    )?;
    assert_eq!(status, 201);
    let copied = wait_copy(&hub, "chris-jid-23")?;
    assert_eq!(copied["status"], "finishedSuccessfully", "{copied}");

    // Job descriptors are bounded: a 17 MiB field is refused, not held.
    let huge = "x".repeat(17 << 20);
    let mut fields = plugin_fields("chris-jid-24", &copy_sh, "ds");
    fields.push(("auid", &huge));
    // The server answers 413 and closes; a client still sending may see the close first.
    match hub.post_multipart("pluginjobs/", &fields, &zip_of(&[("a", "a")])?) {
        Ok((status, body)) => assert_eq!(status, 413, "{body}"),
        Err(error) => {
            let text = error.to_string();
            assert!(
                ["Broken pipe", "reset", "Peer disconnected"]
                    .iter()
                    .any(|said| text.contains(said)),
                "{error:#}"
            );
        }
    }
    // On a connection of its own: the refused one was closed by the server.
    let fresh: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let status = fresh
        .get(&hub.url("pluginjobs/chris-jid-24/"))
        .header("Authorization", &hub.bearer())
        .call()?
        .status()
        .as_u16();
    assert_eq!(status, 404, "no job was made");
    hub.stop().await
}

/// pfcon's `test_rejected_when_copy_running`: a delete job is refused while its copy runs,
/// and the message names the copy and its status. The copy gathers 20,000 files, so it is
/// still running when the delete comes a moment after it was posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_waits_for_a_running_copy() -> Result<()> {
    let hub = Hub::start_with("pfcon-copy-running", |pfcon| {
        pfcon.innetwork = true;
        pfcon.storage_env = "fslink".into();
    })
    .await?;
    let many = hub.storebase.join("home/bob/many");
    for group in 0..100 {
        let dir = many.join(format!("g{group:03}"));
        std::fs::create_dir_all(&dir)?;
        for file in 0..200 {
            std::fs::write(
                dir.join(format!("f{file:03}.txt")),
                format!("{group}/{file}\n"),
            )?;
        }
    }
    let jid = "chris-jid-24";
    let (status, body) = hub.post_form(
        "copyjobs/",
        &[
            ("jid", jid),
            ("input_dirs", "home/bob/many"),
            ("output_dir", "home/bob/feeds/24/pl-x_24/data"),
        ],
    )?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = hub.post_form("deletejobs/", &[("jid", jid)])?;
    assert_eq!(
        status, 409,
        "the copy was over before the delete came: {body}"
    );
    assert_eq!(
        body["message"],
        "The copy job is still active (status: started). All jobs must finish before scheduling a delete job."
    );
    let copied = wait_copy(&hub, jid)?;
    assert_eq!(copied["status"], "finishedSuccessfully", "{copied}");
    // Once the copy is over, the delete goes ahead and the job's data is gone.
    let (status, body) = hub.post_form("deletejobs/", &[("jid", jid)])?;
    assert_eq!(status, 201, "{body}");
    assert!(!hub.storebase.join(format!("key-{jid}")).exists());
    hub.stop().await
}

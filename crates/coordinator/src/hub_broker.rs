//! The hub broker as the coordinator sees it: where sites and clients reach it, and the
//! grants that say what each may do there. The coordinator signs grants with the secret
//! it shares with the hub broker (`dispatch_broker::grant`): a site gets a grant to read
//! its job's inputs and one to write its job's outputs, a client one to write its upload
//! and one to read its job's outputs, each limited to those paths and a lifetime. The
//! coordinator itself never moves a byte.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use dispatch_broker::client::BrokerClient;
use dispatch_broker::grant::GrantKey;
use dispatch_proto::job::Inputs;
use dispatch_proto::{JobSpec, v1};

use crate::config::{HubBrokerConfig, StageMethod, WireCompression};
use crate::error::{Error, Result};

/// The hub broker and the key its grants are signed with. Cheap to clone.
#[derive(Clone)]
pub struct HubBroker {
    endpoint: v1::Endpoint,
    key: GrantKey,
    grant_ttl: Duration,
    upload_ttl: Duration,
    compression: v1::Compression,
    method: v1::StageMethod,
    /// The hub broker's store id, once it answered: a site whose broker fronts the same
    /// store stages by link, any other over the wire.
    store_id: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for HubBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubBroker")
            .field("uri", &self.endpoint.uri)
            .finish_non_exhaustive()
    }
}

/// The hub-store-relative input dirs of a job: what its input grant may read.
pub fn input_dirs(spec: &JobSpec) -> Vec<String> {
    match spec.inputs() {
        Inputs::None => Vec::new(),
        Inputs::Uploaded { hub_path, .. } => vec![hub_path.as_str().to_owned()],
        Inputs::Shared(dirs) => dirs.iter().map(|d| d.as_str().to_owned()).collect(),
    }
}

fn subject(job_id: &str, attempt: u32) -> String {
    format!("job:{job_id}#{attempt}")
}

impl HubBroker {
    /// The hub broker `config` names, with its grant key read; `None` when no hub broker
    /// is configured.
    pub fn from_config(config: &HubBrokerConfig) -> Result<Option<Self>> {
        if config.uri.is_empty() {
            return Ok(None);
        }
        let key_file = config.grant_key_file.as_ref().ok_or_else(|| {
            Error::Config("hub_broker.grant_key_file is required with hub_broker.uri".into())
        })?;
        let secret = std::fs::read(key_file).map_err(|e| {
            Error::Config(format!(
                "hub_broker.grant_key_file {}: {e}",
                key_file.display()
            ))
        })?;
        let key = GrantKey::from_secret(&secret).map_err(|e| {
            Error::Config(format!(
                "hub_broker.grant_key_file {}: {e}",
                key_file.display()
            ))
        })?;
        let ca_pem = match &config.ca_pem_file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("hub_broker.ca_pem_file {}: {e}", path.display()))
            })?,
            None => String::new(),
        };
        Ok(Some(Self {
            endpoint: v1::Endpoint {
                uri: config.uri.clone(),
                ca_pem,
                tls_server_name: config.tls_server_name.clone(),
            },
            key,
            grant_ttl: Duration::from_secs(u64::from(config.grant_ttl_seconds)),
            upload_ttl: Duration::from_secs(u64::from(config.upload_ttl_seconds)),
            compression: match config.compression {
                WireCompression::None => v1::Compression::None,
                WireCompression::Gzip => v1::Compression::Gzip,
            },
            method: match config.stage_method {
                StageMethod::Auto => v1::StageMethod::Auto,
                StageMethod::Link => v1::StageMethod::Link,
                StageMethod::Transfer => v1::StageMethod::Transfer,
            },
            store_id: Arc::new(Mutex::new(None)),
        }))
    }

    /// The hub broker's store id, if it has answered.
    pub fn store_id(&self) -> Option<String> {
        self.store_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the hub broker for its store id, unless known already. Until it is known,
    /// AUTO staging is sent as TRANSFER, which works whether or not the stores are one.
    pub async fn learn_store_id(&self) {
        if self.store_id().is_some() {
            return;
        }
        let asked = async {
            let mut client = self.client_for(&[])?;
            client
                .info()
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))
        };
        match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(info)) if !info.store_id.is_empty() => {
                tracing::info!(broker = %self.endpoint.uri, store = %info.store_id, "hub broker reached");
                *self.store_id.lock().unwrap_or_else(PoisonError::into_inner) = Some(info.store_id);
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(broker = %self.endpoint.uri, %error, "cannot reach the hub broker yet");
            }
            Err(_) => {
                tracing::warn!(broker = %self.endpoint.uri, "the hub broker did not answer within 5 s");
            }
        }
    }

    /// How a site whose broker fronts `site_store_id` stages: AUTO is decided here, at
    /// the hub, which knows both store ids (a site cannot tell a store that merely looks
    /// like the hub's from the hub's).
    fn method_for(&self, site_store_id: &str) -> v1::StageMethod {
        if self.method != v1::StageMethod::Auto {
            return self.method;
        }
        match self.store_id() {
            Some(hub) if !site_store_id.is_empty() && hub == site_store_id => v1::StageMethod::Link,
            _ => v1::StageMethod::Transfer,
        }
    }

    /// How sites and clients dial it.
    pub fn endpoint(&self) -> v1::Endpoint {
        self.endpoint.clone()
    }

    /// How long an upload reservation waits to be used.
    pub fn upload_ttl(&self) -> Duration {
        self.upload_ttl
    }

    fn expiry(&self) -> prost_types::Timestamp {
        (SystemTime::now() + self.grant_ttl).into()
    }

    fn input_grant(&self, spec: &JobSpec, attempt: u32) -> String {
        let dirs = input_dirs(spec);
        if dirs.is_empty() {
            return String::new();
        }
        let read: Vec<&str> = dirs.iter().map(String::as_str).collect();
        self.key.mint_for(
            &subject(spec.job_id().as_str(), attempt),
            &read,
            &[],
            self.grant_ttl,
        )
    }

    fn output_grant(&self, spec: &JobSpec, attempt: u32) -> String {
        let output = spec.hub_output_path();
        self.key.mint_for(
            &subject(spec.job_id().as_str(), attempt),
            &[],
            &[output.as_str()],
            self.grant_ttl,
        )
    }

    /// The staging plan of one attempt of a job at a site whose broker fronts
    /// `site_store_id`: the hub broker, what to read and write there, grants for exactly
    /// that, and how to move the data.
    pub fn plan(&self, spec: &JobSpec, attempt: u32, site_store_id: &str) -> v1::StagingPlan {
        let output = spec.hub_output_path();
        v1::StagingPlan {
            hub_broker: Some(self.endpoint()),
            hub_inputs: Some(v1::JobInputs {
                input_dirs: input_dirs(spec),
                output_dir: output.clone(),
            }),
            hub_output_path: output,
            input_grant: self.input_grant(spec, attempt),
            output_grant: self.output_grant(spec, attempt),
            grants_expire_at: Some(self.expiry()),
            method: self.method_for(site_store_id).into(),
            compression: self.compression.into(),
        }
    }

    /// Fresh grants for a site that asked (`GrantRequest`).
    pub fn grants(
        &self,
        spec: &JobSpec,
        attempt: u32,
        direction: v1::GrantDirection,
    ) -> v1::GrantsIssued {
        let mut issued = v1::GrantsIssued {
            job_id: spec.job_id().to_string(),
            attempt,
            input_grant: String::new(),
            output_grant: String::new(),
            expires_at: Some(self.expiry()),
        };
        match direction {
            v1::GrantDirection::Inputs => issued.input_grant = self.input_grant(spec, attempt),
            v1::GrantDirection::Outputs => issued.output_grant = self.output_grant(spec, attempt),
            v1::GrantDirection::Unspecified => {}
        }
        issued
    }

    /// Write access to an upload's place, for the client that reserved it.
    pub fn upload_access(&self, upload_id: &str, hub_path: &str) -> v1::BrokerAccess {
        let grant = self.key.mint_for(
            &format!("upload:{upload_id}"),
            &[],
            &[hub_path],
            self.upload_ttl,
        );
        v1::BrokerAccess {
            broker: Some(self.endpoint()),
            grant,
            path: hub_path.to_owned(),
            expires_at: Some((SystemTime::now() + self.upload_ttl).into()),
        }
    }

    /// Read access to a job's outputs, for a client.
    pub fn output_access(&self, job_id: &str, hub_path: &str) -> v1::BrokerAccess {
        let grant = self.key.mint_for(
            &format!("outputs:{job_id}"),
            &[hub_path],
            &[],
            self.grant_ttl,
        );
        v1::BrokerAccess {
            broker: Some(self.endpoint()),
            grant,
            path: hub_path.to_owned(),
            expires_at: Some(self.expiry()),
        }
    }

    /// A client of the hub broker allowed to read and write `paths` for a minute: the
    /// coordinator's own calls (is an upload there, remove an expired one).
    pub fn client_for(&self, paths: &[&str]) -> Result<BrokerClient> {
        let grant = self
            .key
            .mint_for("coordinator", &[], paths, Duration::from_secs(60));
        BrokerClient::connect(&self.endpoint.uri, Some(&grant))
            .map_err(|e| Error::Unavailable(format!("hub broker {}: {e}", self.endpoint.uri)))
    }
}

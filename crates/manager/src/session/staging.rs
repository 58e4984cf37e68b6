//! Asking the site broker to stage a job's data with the hub broker: the broker does the
//! moving (by link on a shared filesystem, else over the wire, resumably); the manager
//! only says what, under which of the coordinator's grants, and waits for the result.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;

use dispatch_broker::client::BrokerClient;
use dispatch_proto::v1 as pb;

/// Tries of one stage while the site broker cannot be reached; the broker itself resumes
/// a transfer that breaks, so these only cover the broker being down or restarting.
const ATTEMPTS: u32 = 5;

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The hub broker refused the job's grant as expired: ask the hub for a fresh one.
    #[error("the grant expired: {0}")]
    GrantExpired(String),
    /// Stopped by a cancel or a shutdown.
    #[error("stopped")]
    Stopped,
    /// Anything else, in the broker's words.
    #[error("{0}")]
    Failed(String),
}

/// The site broker in front of this manager's store.
#[derive(Clone)]
pub struct SiteBroker {
    uri: String,
    grant: String,
}

impl std::fmt::Debug for SiteBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteBroker")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

fn classify(status: tonic::Status) -> (StageError, bool) {
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied if message.contains("expired") => {
            (StageError::GrantExpired(message), false)
        }
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled => {
            (StageError::Failed(message), true)
        }
        code => (StageError::Failed(format!("{message} ({code:?})")), false),
    }
}

impl SiteBroker {
    /// The broker at `uri`, called with `grant`.
    pub fn new(uri: String, grant: String) -> Self {
        Self { uri, grant }
    }

    fn client(&self) -> Result<BrokerClient, StageError> {
        BrokerClient::connect(&self.uri, Some(&self.grant))
            .map_err(|e| StageError::Failed(format!("site broker {}: {e}", self.uri)))
    }

    /// The store id the broker reports, so the hub can tell a shared filesystem.
    pub async fn store_id(&self) -> Option<String> {
        let mut client = self.client().ok()?;
        match client.info().await {
            Ok(info) => Some(info.store_id),
            Err(error) => {
                tracing::warn!(broker = %self.uri, %error, "cannot reach the site broker");
                None
            }
        }
    }

    /// Brings a job's inputs from the hub into `key-<job_id>/incoming`.
    pub async fn stage_in(
        &self,
        job_id: &str,
        plan: &pb::StagingPlan,
        stop: &CancellationToken,
    ) -> Result<pb::StageResult, StageError> {
        let request = pb::StageInRequest {
            job_id: job_id.to_owned(),
            hub: plan.hub_broker.clone(),
            hub_grant: plan.input_grant.clone(),
            inputs: plan.hub_inputs.clone(),
            destination: String::new(),
            method: plan.method,
            compression: plan.compression,
        };
        self.retrying(job_id, "stage in", stop, |mut client| {
            let request = request.clone();
            async move {
                let stream = client.raw().stage_in(request).await?.into_inner();
                finish(stream).await
            }
        })
        .await
    }

    /// Pushes a job's outputs from `source` (store-relative) to the hub.
    pub async fn stage_out(
        &self,
        job_id: &str,
        plan: &pb::StagingPlan,
        source: String,
        stop: &CancellationToken,
    ) -> Result<pb::StageResult, StageError> {
        let request = pb::StageOutRequest {
            job_id: job_id.to_owned(),
            hub: plan.hub_broker.clone(),
            hub_grant: plan.output_grant.clone(),
            source,
            destination: plan.hub_output_path.clone(),
            method: plan.method,
            compression: plan.compression,
            // A stage-out repeated (after a restart, or for a retried attempt) replaces
            // what an earlier one left.
            replace: true,
        };
        self.retrying(job_id, "stage out", stop, |mut client| {
            let request = request.clone();
            async move {
                let stream = client.raw().stage_out(request).await?.into_inner();
                finish(stream).await
            }
        })
        .await
    }

    async fn retrying<F, Fut>(
        &self,
        job_id: &str,
        what: &'static str,
        stop: &CancellationToken,
        call: F,
    ) -> Result<pb::StageResult, StageError>
    where
        F: Fn(BrokerClient) -> Fut,
        Fut: Future<Output = Result<pb::StageResult, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let result = tokio::select! {
                result = call(self.client()?) => result,
                () = stop.cancelled() => return Err(StageError::Stopped),
            };
            let status = match result {
                Ok(result) => return Ok(result),
                Err(status) => status,
            };
            let (error, retryable) = classify(status);
            if !retryable || attempt >= ATTEMPTS {
                return Err(error);
            }
            tracing::warn!(job = %job_id, broker = %self.uri, attempt, %error, "{what} failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return Err(StageError::Stopped),
            }
            delay = (delay * 2).min(Duration::from_secs(8));
            attempt += 1;
        }
    }
}

/// Reads a stage's progress to its result.
async fn finish(
    mut stream: tonic::Streaming<pb::StageProgress>,
) -> Result<pb::StageResult, tonic::Status> {
    while let Some(progress) = stream.message().await? {
        if let Some(result) = progress.result {
            return Ok(result);
        }
    }
    Err(tonic::Status::unknown("the stage ended without a result"))
}

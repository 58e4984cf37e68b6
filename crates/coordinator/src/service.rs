//! The client job API (`dispatch.v1.Coordinator`): checks each request at the door, then
//! hands it to the [`Store`]. The parts that later steps bring (logs, uploads, outputs,
//! sites) answer FAILED_PRECONDITION saying which step; none fakes a success.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use dispatch_proto::job::Labels;
use dispatch_proto::v1::{self, coordinator_server};
use dispatch_proto::{FieldError, JobId, JobSpec};
use dispatch_service::InFlight;

use crate::error::Error;
use crate::state::JobState;
use crate::store::{EventFilter, JobFilter, PageKey, Store};

/// Who may call: holders of the configured token, or anyone.
#[derive(Clone)]
pub enum Auth {
    /// Requests need `authorization: Bearer <token>`.
    Token(Arc<str>),
    /// No check (a private coordinator on loopback).
    Open,
}

impl Auth {
    /// Admits a request carrying the token, in time independent of how much of it matches.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Error> {
        let Auth::Token(expected) = self else {
            return Ok(());
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("missing `authorization: Bearer <token>` metadata".into())
            })?;
        let (a, b) = (presented.trim().as_bytes(), expected.as_bytes());
        let differs =
            a.len() != b.len() || a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
        if differs {
            return Err(Error::Unauthenticated(
                "the token is not this coordinator's".into(),
            ));
        }
        Ok(())
    }
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct CoordinatorService {
    store: Store,
    auth: Auth,
    in_flight: InFlight,
    stopping: CancellationToken,
}

impl CoordinatorService {
    /// Serves `store`, admitting callers by `auth`; counts its calls (streams included) in
    /// `in_flight`, and ends its watch streams when `stopping` is cancelled.
    pub fn new(store: Store, auth: Auth, in_flight: InFlight, stopping: CancellationToken) -> Self {
        Self {
            store,
            auth,
            in_flight,
            stopping,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn job_id(field: &str, raw: &str) -> Result<JobId, Error> {
    JobId::parse(raw).map_err(|e| Error::InvalidArgument(FieldError::new(field, e.reason)))
}

fn states(field: &str, raw: &[i32]) -> Result<Vec<JobState>, Error> {
    raw.iter()
        .map(|&value| {
            v1::JobState::try_from(value)
                .map_err(|_| format!("unknown value {value}"))
                .and_then(JobState::try_from)
                .map_err(|reason| Error::InvalidArgument(FieldError::new(field, reason)))
        })
        .collect()
}

fn optional_name(field: &str, raw: String) -> Result<Option<String>, Error> {
    if raw.len() > dispatch_proto::job::NAME_MAX_BYTES || raw.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(FieldError::new(
            field,
            format!(
                "must be at most {} bytes without control characters",
                dispatch_proto::job::NAME_MAX_BYTES
            ),
        )));
    }
    Ok(Some(raw).filter(|name| !name.is_empty()))
}

/// The door of `SubmitJob`: the spec checked, and inputs only from where this step can
/// take them.
fn submitted_spec(request: &mut v1::SubmitJobRequest) -> Result<JobSpec, Error> {
    if request.upload.is_some() {
        return Err(Error::NotYet {
            what: "upload:",
            comes_with: "uploads come with the hub broker integration; for now give inputs already in the hub's storage in spec.inputs.shared",
        });
    }
    let wire = request
        .spec
        .take()
        .ok_or_else(|| FieldError::new("spec", "is required"))?;
    if let Some(v1::input_spec::Source::Uploaded(_)) =
        wire.inputs.as_ref().and_then(|i| i.source.as_ref())
    {
        // Only the coordinator may point a job at an upload, once it has checked the
        // upload is the caller's: a client naming a hub path would read anyone's inputs.
        return Err(FieldError::new(
            "spec.inputs.uploaded",
            "is filled in by the coordinator from `upload`; send the upload reference instead",
        )
        .into());
    }
    Ok(JobSpec::try_from(wire).map_err(|e| e.within("spec"))?)
}

#[tonic::async_trait]
impl coordinator_server::Coordinator for CoordinatorService {
    type WatchJobsStream = BoxStream<v1::JobEvent>;
    type JobLogsStream = BoxStream<v1::LogChunk>;

    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let mut request = request.into_inner();
        let spec = submitted_spec(&mut request)?;
        let submitted = self.store.submit(&spec, request.retry_if_failed).await?;
        tracing::info!(
            job = %spec.job_id(),
            created = submitted.created,
            attempt = submitted.job.status.attempt,
            state = %submitted.job.status.state,
            "job submitted"
        );
        Ok(Response::new(v1::SubmitJobResponse {
            job: Some(submitted.job.to_wire()),
            created: submitted.created,
        }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let id = job_id("job_id", &request.get_ref().job_id)?;
        Ok(Response::new(self.store.get(&id).await?.to_wire()))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let filter = JobFilter {
            states: states("states", &request.states)?,
            labels: Labels::parse("labels", request.labels).map_err(Error::from)?,
            site_id: optional_name("site_id", request.site_id)?,
            auid: optional_name("auid", request.auid)?,
        };
        let page = request.page.unwrap_or_default();
        let after = match page.page_token.as_str() {
            "" => None,
            token => Some(PageKey::from_token(token).ok_or_else(|| {
                Error::from(FieldError::new(
                    "page.page_token",
                    "is not a token from a previous page of this listing",
                ))
            })?),
        };
        let listed = self
            .store
            .list(&filter, page.page_size, after.as_ref())
            .await?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: listed.jobs.iter().map(|job| job.to_wire()).collect(),
            next_page_token: listed.next.map(|key| key.to_token()).unwrap_or_default(),
        }))
    }

    async fn watch_jobs(
        &self,
        request: Request<v1::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        // The stream holds its own guard: a drain waits for (and ends) open watches.
        let call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let filter = EventFilter {
            job_ids: request
                .job_ids
                .iter()
                .map(|raw| job_id("job_ids", raw).map(String::from))
                .collect::<Result<_, _>>()?,
            states: states("states", &request.states)?,
            labels: Labels::parse("labels", request.labels).map_err(Error::from)?,
            site_id: optional_name("site_id", request.site_id)?,
        };
        let after = match request.after_sequence {
            Some(after) => {
                self.store.check_replay_from(after)?;
                after
            }
            None => self.store.head(),
        };
        let events = self
            .store
            .follow(after, filter, self.stopping.child_token())
            .map(move |item| {
                let _call = &call;
                item.map(|event| event.to_wire()).map_err(Status::from)
            });
        Ok(Response::new(Box::pin(events)))
    }

    async fn job_logs(
        &self,
        request: Request<v1::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "JobLogs:",
            comes_with: "logs are relayed from the job's site, which comes with the site session step",
        }
        .into())
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id("job_id", &request.job_id)?;
        let job = self.store.cancel(&id, &request.message).await?;
        tracing::info!(
            job = %id,
            state = %job.status.state,
            cancel_requested = job.status.cancel_requested,
            "job cancel"
        );
        Ok(Response::new(job.to_wire()))
    }

    async fn delete_job(
        &self,
        request: Request<v1::DeleteJobRequest>,
    ) -> Result<Response<v1::DeleteJobResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id("job_id", &request.job_id)?;
        let deleted = self.store.delete(&id, request.purge).await?;
        tracing::info!(job = %id, purged = deleted.purged, "job deleted");
        Ok(Response::new(v1::DeleteJobResponse {
            job: deleted.job.map(|job| job.to_wire()),
            purged: deleted.purged,
        }))
    }

    async fn create_upload(
        &self,
        request: Request<v1::CreateUploadRequest>,
    ) -> Result<Response<v1::CreateUploadResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "CreateUpload:",
            comes_with: "uploads come with the hub broker integration",
        }
        .into())
    }

    async fn get_job_outputs(
        &self,
        request: Request<v1::GetJobOutputsRequest>,
    ) -> Result<Response<v1::GetJobOutputsResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "GetJobOutputs:",
            comes_with: "outputs are served through the hub broker, which comes with the hub broker integration",
        }
        .into())
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "CreateJoinToken:",
            comes_with: "join tokens come with the site registry step",
        }
        .into())
    }

    async fn list_sites(
        &self,
        request: Request<v1::ListSitesRequest>,
    ) -> Result<Response<v1::ListSitesResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "ListSites:",
            comes_with: "sites come with the site registry step",
        }
        .into())
    }

    async fn revoke_site(
        &self,
        request: Request<v1::RevokeSiteRequest>,
    ) -> Result<Response<v1::Site>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Err(Error::NotYet {
            what: "RevokeSite:",
            comes_with: "sites come with the site registry step",
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_checks_the_bearer_token() {
        let auth = Auth::Token("a-long-enough-token".into());
        let mut metadata = MetadataMap::new();
        assert!(matches!(
            auth.check(&metadata),
            Err(Error::Unauthenticated(_))
        ));
        metadata.insert("authorization", "Bearer wrong".parse().expect("ascii"));
        assert!(auth.check(&metadata).is_err());
        metadata.insert(
            "authorization",
            "Bearer a-long-enough-token".parse().expect("ascii"),
        );
        assert!(auth.check(&metadata).is_ok());
        assert!(Auth::Open.check(&MetadataMap::new()).is_ok());
    }

    #[test]
    fn states_refuse_unspecified_and_unknown() {
        assert_eq!(
            states("states", &[1, 8]).expect("known"),
            [JobState::Queued, JobState::Lost]
        );
        let error = states("states", &[0]).expect_err("unspecified");
        assert!(error.to_string().starts_with("states: "), "{error}");
        let error = states("states", &[42]).expect_err("unknown");
        assert_eq!(error.to_string(), "states: unknown value 42");
    }
}

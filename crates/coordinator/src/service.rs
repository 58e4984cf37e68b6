//! The client job API (`dispatch.v1.Coordinator`): checks each request at the door, then
//! hands it to the [`Store`] (jobs) or the [`Registry`] (sites, logs, what sites must be
//! told). A change is committed before the site hears of it and before the client is
//! answered.

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
use crate::registry::Registry;
use crate::state::JobState;
use crate::store::{EventFilter, JobFilter, PageKey, Store, UnixMicros, UploadRecord};

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
    registry: Registry,
    auth: Auth,
    in_flight: InFlight,
    stopping: CancellationToken,
}

impl CoordinatorService {
    /// Serves `store` and `registry`, admitting callers by `auth`; counts its calls
    /// (streams included) in `in_flight`, and ends its streams when `stopping` is
    /// cancelled.
    pub fn new(
        store: Store,
        registry: Registry,
        auth: Auth,
        in_flight: InFlight,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            auth,
            in_flight,
            stopping,
        }
    }

    /// The door of `SubmitJob`: the spec checked; with an upload, its inputs pointed at
    /// the upload once it is known to be committed at the hub broker and free for this
    /// job; and, for a new job, one some registered site could run.
    async fn submitted_spec(&self, request: &mut v1::SubmitJobRequest) -> Result<JobSpec, Error> {
        let mut wire = request
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
        let upload = request.upload.take();
        if let Some(reference) = &upload {
            if wire.inputs.as_ref().is_some_and(|i| i.source.is_some()) {
                return Err(FieldError::new(
                    "spec.inputs",
                    "must be unset with `upload`: the coordinator fills it in",
                )
                .into());
            }
            check_upload_id(&reference.upload_id)?;
            wire.inputs = Some(v1::InputSpec {
                source: Some(v1::input_spec::Source::Uploaded(v1::UploadedInputs {
                    hub_path: upload_path(&reference.upload_id),
                    tree_digest: reference.tree_digest.clone(),
                })),
            });
        }
        let spec = JobSpec::try_from(wire).map_err(|e| {
            if e.field == "inputs.uploaded.tree_digest" {
                FieldError::new("upload.tree_digest", e.reason)
            } else {
                e.within("spec")
            }
        })?;
        self.admissible(&spec).await?;
        if let Some(reference) = &upload {
            self.check_upload(&reference.upload_id, spec.job_id().as_str())
                .await?;
        }
        Ok(spec)
    }

    /// Refuses a new job no registered site could run. A stored job was judged when it
    /// was accepted: its replay (or retry) is not refused because the sites changed since.
    /// Looked up only when the sites refuse it, so a new job costs the store nothing
    /// before its write.
    async fn admissible(&self, spec: &JobSpec) -> Result<(), Error> {
        if let Err(refused) = self.registry.check_admissible(spec) {
            match self.store.get(spec.job_id()).await {
                Ok(_) => {}
                Err(Error::NotFound(_)) => return Err(refused),
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Stores a checked submission and answers it.
    async fn store_submission(
        &self,
        spec: &JobSpec,
        retry_if_failed: bool,
    ) -> Result<v1::SubmitJobResponse, Error> {
        let submitted = self.store.submit(spec, retry_if_failed).await?;
        if submitted.created {
            self.registry.nudge();
        }
        tracing::info!(
            job = %spec.job_id(),
            created = submitted.created,
            attempt = submitted.job.status.attempt,
            state = %submitted.job.status.state,
            "job submitted"
        );
        Ok(v1::SubmitJobResponse {
            job: Some(submitted.job.to_wire()),
            created: submitted.created,
        })
    }

    /// Submits a job whose inputs this process placed in the hub's store itself, at
    /// `hub_path` (pfcon's face unpacks CUBE's zip there). The upload reservation and
    /// its checks guard against a client naming another's upload; here nobody names
    /// anything, so they are skipped, and with them two synced writes per job.
    pub async fn submit_placed(
        &self,
        mut wire: v1::JobSpec,
        hub_path: String,
        retry_if_failed: bool,
    ) -> Result<v1::SubmitJobResponse, Status> {
        let _call = self.in_flight.enter();
        wire.inputs = Some(v1::InputSpec {
            source: Some(v1::input_spec::Source::Uploaded(v1::UploadedInputs {
                hub_path,
                tree_digest: Default::default(),
            })),
        });
        let spec = JobSpec::try_from(wire).map_err(|e| Error::from(e.within("spec")))?;
        self.admissible(&spec).await?;
        Ok(self.store_submission(&spec, retry_if_failed).await?)
    }

    /// An upload may be used by a job: it is committed at the hub broker, then bound to
    /// the job (refused if it is another job's, or expired).
    async fn check_upload(&self, upload_id: &str, job_id: &str) -> Result<UploadRecord, Error> {
        let hub = self.registry.hub_broker().ok_or_else(|| {
            Error::FailedPrecondition(
                "upload: this coordinator has no hub broker (hub_broker.uri); give inputs already in the hub's storage in spec.inputs.shared".into(),
            )
        })?;
        let path = upload_path(upload_id);
        let mut client = hub.client_for(&[path.as_str()])?;
        let stat = client
            .raw()
            .stat(v1::StatRequest { path: path.clone() })
            .await
            .map_err(|status| {
                Error::Unavailable(format!(
                    "cannot ask the hub broker about upload `{upload_id}`: {}",
                    status.message()
                ))
            })?
            .into_inner();
        let committed = stat.exists
            && stat
                .entry
                .is_some_and(|e| e.kind() == v1::EntryKind::Directory);
        if !committed {
            return Err(Error::FailedPrecondition(format!(
                "upload `{upload_id}` is not committed at the hub broker; finish Broker.Upload (with the grant from CreateUpload) before submitting"
            )));
        }
        self.store.claim_upload(upload_id, job_id).await
    }
}

/// Where an upload lives at the hub broker.
fn upload_path(upload_id: &str) -> String {
    format!("uploads/{upload_id}")
}

fn check_upload_id(raw: &str) -> Result<(), Error> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new("upload.upload_id", "is not an id CreateUpload returned").into())
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
        let spec = self.submitted_spec(&mut request).await?;
        Ok(Response::new(
            self.store_submission(&spec, request.retry_if_failed)
                .await?,
        ))
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
        // The stream holds its own guard, as watch streams do.
        let call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id("job_id", &request.job_id)?;
        let job = self.store.get(&id).await?;
        let relay = self
            .registry
            .follow_logs(&job, request.tail_lines, request.follow)?;
        let chunks = relay
            .take_until(self.stopping.clone().cancelled_owned())
            .map(move |chunk| {
                let _call = &call;
                chunk
            });
        Ok(Response::new(Box::pin(chunks)))
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
        self.registry.forward_cancel(&job);
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
        let before = self.store.get(&id).await.ok();
        let deleted = self.store.delete(&id, request.purge).await?;
        // The site lets go of what it holds: stops the job first if it still runs (and
        // removes it once it reports the end), or removes it now.
        match (&deleted.job, &before) {
            (Some(job), _) if job.status.cancel_requested && job.status.state.is_placed() => {
                self.registry.forward_cancel(job);
            }
            (Some(job), _) | (None, Some(job)) if job.status.state.is_terminal() => {
                if let Some(site) = &job.status.site {
                    self.registry.forward_remove(
                        &site.site_id,
                        &site.manager_id,
                        job.job_id.as_str(),
                        job.status.attempt,
                        true,
                    );
                }
            }
            _ => {}
        }
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
        let request = request.into_inner();
        let hub = self.registry.hub_broker().ok_or_else(|| {
            Error::FailedPrecondition(
                "CreateUpload: this coordinator has no hub broker (hub_broker.uri); give inputs already in the hub's storage in spec.inputs.shared".into(),
            )
        })?;
        let job = match request.job_id.as_str() {
            "" => None,
            raw => Some(job_id("job_id", raw)?.to_string()),
        };
        let upload_id = crate::secret::new_id("up");
        let now = UnixMicros::now();
        let ttl = i64::try_from(hub.upload_ttl().as_micros()).unwrap_or(i64::MAX);
        let record = UploadRecord {
            hub_path: upload_path(&upload_id),
            upload_id: upload_id.clone(),
            job_id: job,
            expected_bytes: request.expected_bytes,
            created_at: now,
            expires_at: UnixMicros(now.0.saturating_add(ttl)),
            used_by_job: None,
        };
        self.store.insert_upload(&record).await?;
        tracing::info!(upload = %upload_id, job = ?record.job_id, "upload reserved");
        Ok(Response::new(v1::CreateUploadResponse {
            access: Some(hub.upload_access(&upload_id, &record.hub_path)),
            upload_id,
        }))
    }

    async fn get_job_outputs(
        &self,
        request: Request<v1::GetJobOutputsRequest>,
    ) -> Result<Response<v1::GetJobOutputsResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let id = job_id("job_id", &request.get_ref().job_id)?;
        let job = self.store.get(&id).await?;
        let finished = matches!(job.status.state, JobState::Succeeded | JobState::Failed);
        let (true, Some(summary)) = (finished, job.outputs.clone()) else {
            return Err(Error::FailedPrecondition(format!(
                "the outputs of job `{id}` are not back at the hub ({}{})",
                job.status.state,
                if finished {
                    ", and none were staged out"
                } else {
                    "; wait until it ends"
                }
            ))
            .into());
        };
        let hub = self.registry.hub_broker().ok_or_else(|| {
            Error::FailedPrecondition(
                "GetJobOutputs: this coordinator has no hub broker (hub_broker.uri)".into(),
            )
        })?;
        let spec = JobSpec::try_from(job.spec.clone())
            .map_err(|e| Error::Corrupt(format!("job `{id}` spec: {e}")))?;
        Ok(Response::new(v1::GetJobOutputsResponse {
            access: Some(hub.output_access(id.as_str(), &spec.hub_output_path())),
            summary: Some(summary),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Ok(Response::new(
            self.registry
                .create_join_token(request.into_inner())
                .await?,
        ))
    }

    async fn list_sites(
        &self,
        request: Request<v1::ListSitesRequest>,
    ) -> Result<Response<v1::ListSitesResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Ok(Response::new(
            self.registry.list_sites(request.into_inner()).await?,
        ))
    }

    async fn revoke_site(
        &self,
        request: Request<v1::RevokeSiteRequest>,
    ) -> Result<Response<v1::Site>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        Ok(Response::new(
            self.registry
                .revoke(&request.site_id, &request.message)
                .await?,
        ))
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

//! The manager's gRPC face (`dispatch.v1.Manager`): checks each request at the door, then
//! hands it to the [`Manager`].

use std::sync::Arc;

use futures::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use dispatch_proto::v1::{self as pb, manager_server};
use dispatch_proto::{JobId, JobSpec};

use dispatch_service::InFlight;

use crate::error::Error;
use crate::manager::Manager;

/// Largest page of `ListOwn`.
const MAX_PAGE: usize = 1000;

/// Who may call: holders of the configured token, or anyone.
#[derive(Clone)]
pub enum Auth {
    /// Requests need `authorization: Bearer <token>`.
    Token(Arc<str>),
    /// No check (a private manager on loopback).
    Open,
}

impl Auth {
    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Auth::Token(expected) = self else {
            return Ok(());
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        // Compared without an early exit, so the time taken says nothing of the token.
        let (a, b) = (presented.trim().as_bytes(), expected.as_bytes());
        let differs =
            a.len() != b.len() || a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
        if differs {
            return Err(Status::unauthenticated("the token is not this manager's"));
        }
        Ok(())
    }
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct ManagerService {
    manager: Arc<Manager>,
    auth: Auth,
    in_flight: InFlight,
}

impl ManagerService {
    /// Serves `manager`, admitting callers by `auth`; counts its calls in `in_flight`.
    pub fn new(manager: Arc<Manager>, auth: Auth, in_flight: InFlight) -> Self {
        Self {
            manager,
            auth,
            in_flight,
        }
    }
}

fn job_id(raw: &str) -> Result<JobId, Status> {
    JobId::parse(raw).map_err(|e| Status::from(Error::InvalidSpec(e)))
}

type LogStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl manager_server::Manager for ManagerService {
    type LogsStream = LogStream;

    async fn schedule(
        &self,
        request: Request<pb::ManagerScheduleRequest>,
    ) -> Result<Response<pb::ManagerScheduleResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let wire = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let spec = JobSpec::try_from(wire).map_err(|e| Status::from(Error::InvalidSpec(e)))?;
        if request.staging.is_some() {
            return Err(Status::failed_precondition(
                "staging: this manager runs jobs on data already in its site store; staging through the hub comes with the site session",
            ));
        }
        let (status, created) = self.manager.schedule(&spec).await?;
        Ok(Response::new(pb::ManagerScheduleResponse {
            status: Some(status),
            created,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::ManagerGetJobRequest>,
    ) -> Result<Response<pb::BackendJobStatus>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let id = job_id(&request.get_ref().job_id)?;
        Ok(Response::new(self.manager.status(&id).await?))
    }

    async fn logs(
        &self,
        request: Request<pb::ManagerLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id(&request.job_id)?;
        let chunks = self
            .manager
            .logs(&id, request.tail_lines, request.follow)
            .await?;
        Ok(Response::new(Box::pin(
            chunks.map(|chunk| chunk.map_err(Status::from)),
        )))
    }

    async fn cancel(
        &self,
        request: Request<pb::ManagerCancelRequest>,
    ) -> Result<Response<pb::BackendJobStatus>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id(&request.job_id)?;
        Ok(Response::new(
            self.manager.cancel(&id, &request.message).await?,
        ))
    }

    async fn remove(
        &self,
        request: Request<pb::ManagerRemoveRequest>,
    ) -> Result<Response<pb::ManagerRemoveResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let id = job_id(&request.job_id)?;
        let removed = self
            .manager
            .remove(&id, request.remove_staging_area)
            .await?;
        Ok(Response::new(pb::ManagerRemoveResponse { removed }))
    }

    async fn list_own(
        &self,
        request: Request<pb::ManagerListOwnRequest>,
    ) -> Result<Response<pb::ManagerListOwnResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        let request = request.into_inner();
        let page = request.page.unwrap_or_default();
        let size = match page.page_size as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let states: Vec<i32> = request.states;
        let mut jobs: Vec<_> = self
            .manager
            .list_own()
            .await?
            .into_iter()
            .filter(|j| states.is_empty() || states.contains(&j.state))
            .collect();
        // The token is the last job id of the previous page: stable while jobs come and go.
        if !page.page_token.is_empty() {
            jobs.retain(|j| j.job_id > page.page_token);
        }
        let next_page_token = if jobs.len() > size {
            jobs[size - 1].job_id.clone()
        } else {
            String::new()
        };
        jobs.truncate(size);
        Ok(Response::new(pb::ManagerListOwnResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn capabilities(
        &self,
        request: Request<pb::ManagerCapabilitiesRequest>,
    ) -> Result<Response<pb::ManagerCapabilitiesResponse>, Status> {
        let _call = self.in_flight.enter();
        self.auth.check(request.metadata())?;
        Ok(Response::new(self.manager.capabilities().await?))
    }
}

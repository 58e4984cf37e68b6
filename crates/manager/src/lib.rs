//! The manager: owns containers. It turns jobs into a compute engine's unit of work through
//! one [`Backend`](backend::Backend), enforces what the engine does not (time limits,
//! idempotent submits, what a cancel means), and serves the `dispatch.v1.Manager` API.
//!
//! With a `[hub]` configured it also joins a coordinator and runs the jobs the hub leases
//! to it ([`session`]), staging their data through the site broker.
//!
//! It must never touch what it did not create (everything it creates is labelled with the
//! job id and its manager id), and never start a job twice under one id.

pub mod backend;
pub mod config;
pub mod error;
pub mod ledger;
pub mod log_file;
pub mod manager;
pub mod request;
pub mod server;
pub mod service;
pub mod session;
pub mod user;

pub use backend::{Backend, BackendError, JobRequest, Observed};
pub use config::ManagerConfig;
pub use error::{Error, Result};
pub use manager::Manager;
pub use session::SiteSession;

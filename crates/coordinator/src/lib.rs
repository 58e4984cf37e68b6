//! The coordinator: the hub's controller. It owns jobs and sites: it accepts jobs over the
//! client API (`dispatch.v1.Coordinator`), keeps every job and every state change durably
//! (SQLite by default, PostgreSQL with the same code and migrations), and decides their
//! states through one state machine. Sites join with a one-time token and dial in
//! (`dispatch.v1.SiteRegistry`); the registry keeps their sessions and heartbeats, the
//! scheduler places queued jobs on those with room, and status reports come back over
//! the sessions, applied once each. The pfcon REST face builds on this later.
//!
//! It must never acknowledge a change before it is committed, never let a job reach two
//! terminal states (or one twice), never store or log a job's env values, a join token or
//! a site credential in plain text, and never touch containers or bytes itself: sites run
//! jobs, brokers move data (the coordinator only signs the grants that let them).

pub mod config;
pub mod error;
pub mod hub_broker;
pub mod pfcon;
pub mod registry;
pub mod scheduler;
pub mod seal;
pub mod secret;
pub mod server;
pub mod service;
pub mod site_service;
pub mod state;
pub mod store;
pub mod tasks;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use state::{JobState, Reason, Transition};
pub use store::Store;

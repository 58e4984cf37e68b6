//! The coordinator: the hub's controller. It owns jobs: it accepts them over the client
//! API (`dispatch.v1.Coordinator`), keeps every job and every state change durably
//! (SQLite by default, PostgreSQL with the same code and migrations), and decides their
//! states through one state machine. Sites, scheduling and the pfcon REST face build on
//! this store in later steps.
//!
//! It must never acknowledge a change before it is committed, never let a job reach two
//! terminal states (or one twice), never store or log a job's env values in plain text,
//! and never touch containers or bytes itself: sites run jobs, brokers move data.

pub mod config;
pub mod error;
pub mod seal;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use state::{JobState, Reason, Transition};
pub use store::Store;

//! The broker: owns bytes. It streams directory trees between clients and stores, and
//! between a site's broker and the hub's, as checksummed, resumable tar chunks.
//!
//! It must never write outside the area it was asked to write to, never follow a symlink
//! while writing, and never report a transfer done before every byte is verified and on
//! disk.

pub mod chrislink;
pub mod client;
pub mod config;
pub mod error;
pub mod extract;
pub mod grant;
pub mod path;
mod receive;
pub mod server;
pub mod service;
pub mod stage;
pub mod store;
pub mod tar_decode;
pub mod tar_encode;
pub mod transfer;
pub mod tree;

pub use error::{Error, Result};
pub use path::StorePath;

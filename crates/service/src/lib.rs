//! What every service binary shares, and nothing else: layered configuration, logging,
//! the shutdown signal, and the count of calls in flight that a drain waits for.

pub mod config;
pub mod drain;
pub mod logging;

pub use config::{ConfigError, Layers, load};
pub use drain::{InFlight, shutdown_signal};
pub use logging::init_tracing;

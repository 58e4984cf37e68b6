//! Where every service's logs go: stderr, text (coloured on a terminal) or JSON lines,
//! filtered by `RUST_LOG` when it is set.

/// Installs the log subscriber once for this process; later calls change nothing.
/// `default_filter` applies when `RUST_LOG` is unset (e.g. `info`).
pub fn init_tracing(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

//! Logging setup shared by the binaries: `RUST_LOG`-style filter, default `info`.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

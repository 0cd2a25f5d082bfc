//! What every ZTNA process shares: identity and TLS, QUIC transport settings, configuration
//! loading, stream I/O helpers, logging and the metrics registry.

pub mod backoff;
pub mod config;
pub mod identity;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod signals;
pub mod transport;

pub use identity::{Identity, SpiffeId};
pub use tokio_util::sync::CancellationToken;

/// Version string reported in `Hello` and `ztna_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

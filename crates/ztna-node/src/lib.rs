//! What every ZTNA process shares: identity and TLS, QUIC transport settings, configuration
//! loading, stream I/O helpers, logging and the metrics registry.

pub mod answered;
pub mod backoff;
pub mod client;
pub mod clock;
pub mod config;
pub mod credit;
pub mod daemon;
pub mod datagram;
pub mod fdlimit;
pub mod flows;
pub mod health;
pub mod identity;
pub mod io;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod ratelimit;
pub mod renew;
pub mod rotation;
pub mod signals;
pub mod status;
pub mod transport;
pub mod udp;

pub use identity::{Identity, SpiffeId};
pub use rustls_pki_types::CertificateDer;
pub use tokio_util::sync::CancellationToken;

/// Version string reported in `Hello` and `ztna_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Locks a mutex, recovering the data if a previous holder panicked, so one failed task cannot
/// wedge a shared table for the rest of the process.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

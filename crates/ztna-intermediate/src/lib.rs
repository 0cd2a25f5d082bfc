//! ztna-intermediate: the public QUIC relay.
//!
//! Authenticates every peer by mTLS (SPIFFE role checked), authorizes registrations and flows by
//! a default-deny [`policy`], keeps the [`registry`] of service → connectors, relays TCP flows as
//! spliced QUIC streams and UDP flows as rewritten datagrams, reports each client's observed
//! address, and drains gracefully.

pub mod cli;
pub mod config;
pub mod metrics;
pub mod policy;
pub mod registry;
mod server;

pub use config::Config;
pub use server::{Handle, Intermediate, StartError};

use ztna_node::CancellationToken;

/// Runs an intermediate until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Intermediate::bind(config)?.run(shutdown).await;
    Ok(())
}

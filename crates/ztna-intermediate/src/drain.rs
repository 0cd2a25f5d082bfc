//! The drain: not ready, refuse new connections, GoAway to every peer (the sessions send it when
//! `draining` flips), let flows finish until `drain_timeout` — TCP flows and opens in progress
//! are waited for, UDP flows only while they are active — then close and wait for the peers to
//! be told.

use std::time::Duration;

use quinn::VarInt;
use tracing::{info, warn};
use ztna_proto::codes;

use crate::state::Shared;

/// A UDP flow quiet for this long does not hold a drain: UDP is connectionless, the client's
/// next datagram opens a flow wherever the agent is by then.
pub(crate) const UDP_DRAIN_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn drain(endpoint: &quinn::Endpoint, shared: &Shared) {
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    info!(timeout = ?shared.config.drain_timeout, "draining: refusing new connections, sending GoAway");
    shared.health.set_stopping();
    shared.health.set_status("draining: sending GoAway");
    shared.metrics.draining.set(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    shared.metrics.drain_started.set(now.as_secs_f64());
    shared.draining.send_replace(true);
    // Keep answering new connection attempts with a refusal (they retry elsewhere).
    let endpoint2 = endpoint.clone();
    let refuser = tokio::spawn(async move {
        while let Some(incoming) = endpoint2.accept().await {
            incoming.refuse();
        }
    });
    let left = shared
        .flows
        .drain(deadline, UDP_DRAIN_GRACE, codes::DRAINING)
        .await;
    if left > 0 {
        warn!(left, "drain timeout reached, closed the remaining flows");
    } else {
        info!("drain complete: no flows left");
    }
    endpoint.close(VarInt::from_u32(codes::DRAINING), b"intermediate drained");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    refuser.abort();
    shared.metrics.draining.set(0);
    shared.metrics.drain_started.set(0.0);
    info!("intermediate stopped");
}

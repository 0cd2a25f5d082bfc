//! Accepting connections: the QUIC handshake (mutual TLS with SPIFFE roles, checked by the
//! verifiers in `ztna_node::identity`), then a session per authenticated peer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info_span, Instrument};
use ztna_node::identity::{describe_connection_error, peer_chain, peer_id};
use ztna_node::ratelimit::LogLimiter;
use ztna_node::CancellationToken;

use crate::session;
use crate::state::Shared;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refused handshakes are logged at most once a second (a flood must not flood the journal).
static REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(1));

static SHED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(5));

/// Handshakes in progress; see [`admit`].
pub(crate) struct Pending(AtomicUsize);

impl Pending {
    pub const fn new() -> Pending {
        Pending(AtomicUsize::new(0))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts one handshake in progress while it lives.
struct InProgress(Arc<Shared>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.handshakes_pending.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What to do with a new connection attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Handshake,
    /// Ask the client to prove its address (QUIC Retry: one round trip, a stateless token)
    /// before any handshake state is kept: spoofed sources never answer.
    Retry,
    /// At the hard cap: drop it (the client retransmits, then tries another relay).
    Drop,
}

/// Above `retry_above` handshakes in progress, unproven addresses get a Retry; at `max`, new
/// attempts are dropped. Proven addresses (they answered a Retry) go through up to `max`.
pub(crate) fn admit(pending: usize, validated: bool, retry_above: usize, max: usize) -> Admit {
    if pending >= max {
        Admit::Drop
    } else if !validated && pending >= retry_above {
        Admit::Retry
    } else {
        Admit::Handshake
    }
}

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) {
    let c = &shared.config;
    let (retry_above, max) = (
        c.handshake_retry_threshold as usize,
        c.max_handshakes as usize,
    );
    let shed = &shared.metrics.handshakes_shed;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let pending = shared.handshakes_pending.get();
                match admit(pending, incoming.remote_address_validated(), retry_above, max) {
                    Admit::Handshake => {
                        shared.handshakes_pending.0.fetch_add(1, Ordering::Relaxed);
                        let guard = InProgress(shared.clone());
                        tokio::spawn(handshake(shared.clone(), incoming, guard));
                    }
                    Admit::Retry => {
                        shed.with_label_values(&["retry"]).inc();
                        ztna_node::info_limited!(SHED_LOG, pending, "many handshakes in progress: answering new ones with a QUIC Retry (address validation)");
                        if incoming.retry().is_err() {
                            shed.with_label_values(&["dropped"]).inc();
                        }
                    }
                    Admit::Drop => {
                        shed.with_label_values(&["dropped"]).inc();
                        ztna_node::warn_limited!(SHED_LOG, pending, max, "handshake limit reached (max_handshakes): dropping new connection attempts");
                        incoming.ignore();
                    }
                }
            }
        }
    }
}

async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming, _in_progress: InProgress) {
    let remote = ztna_node::transport::canonical(incoming.remote_address());
    let handshakes = &shared.metrics.handshakes;
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await })
        .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let unauthorized = matches!(&e, quinn::ConnectionError::TransportError(t)
                if matches!(u64::from(t.code), 0x12a..=0x131 | 0x133 | 0x174));
            let result = if unauthorized {
                "unauthorized"
            } else {
                "failed"
            };
            handshakes.with_label_values(&[result]).inc();
            ztna_node::warn_limited!(REFUSED_LOG, %remote, result, reason = %describe_connection_error(&e), "handshake refused");
            return;
        }
        Err(_) => {
            handshakes.with_label_values(&["failed"]).inc();
            ztna_node::warn_limited!(REFUSED_LOG, %remote, "handshake timed out");
            return;
        }
    };
    let Some(id) = peer_id(&conn) else {
        handshakes.with_label_values(&["unauthorized"]).inc();
        conn.close(
            quinn::VarInt::from_u32(ztna_proto::codes::UNAUTHORIZED),
            b"no SPIFFE identity",
        );
        return;
    };
    handshakes.with_label_values(&["ok"]).inc();
    drop(_in_progress);
    let chain = peer_chain(&conn);
    let span = info_span!("peer", peer = %id, addr = %remote);
    session::run(shared, conn, id, chain).instrument(span).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_under_load_and_a_hard_cap() {
        assert_eq!(admit(0, false, 64, 1024), Admit::Handshake);
        assert_eq!(admit(63, false, 64, 1024), Admit::Handshake);
        assert_eq!(admit(64, false, 64, 1024), Admit::Retry);
        // A client that answered the Retry is let through.
        assert_eq!(admit(64, true, 64, 1024), Admit::Handshake);
        assert_eq!(admit(1024, true, 64, 1024), Admit::Drop);
        assert_eq!(admit(5000, false, 64, 1024), Admit::Drop);
    }
}

//! Accepting connections: the QUIC handshake (mutual TLS with SPIFFE roles, checked by the
//! verifiers in `ztna_node::identity`), then a session per authenticated peer.

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

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                tokio::spawn(handshake(shared.clone(), incoming));
            }
        }
    }
}

async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming) {
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
    let chain = peer_chain(&conn);
    let span = info_span!("peer", peer = %id, addr = %remote);
    session::run(shared, conn, id, chain).instrument(span).await;
}

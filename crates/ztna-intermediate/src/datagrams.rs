//! The UDP datagram relay: each datagram from a peer is routed by its flow id to the other side
//! of the flow, with the id rewritten for that connection. A payload too large for a datagram on
//! the next hop goes on the flow's stream instead; anything that still cannot be carried is
//! counted by reason and logged (rate-limited).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ztna_node::datagram::{self as dg, Sent};
use ztna_node::identity::describe_connection_error;
use ztna_proto::datagram;

use crate::registry::Peer;
use crate::state::Shared;

pub(crate) const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// Relays `peer`'s datagrams until its connection ends; returns why it ended.
pub(crate) async fn relay(shared: Arc<Shared>, peer: Arc<Peer>, direction: &'static str) -> String {
    let m = &shared.metrics;
    let bytes = m.bytes("udp", direction);
    let dropped = |reason: &str| m.datagrams_dropped.with_label_values(&[reason]);
    let (drop_unknown, drop_malformed, drop_full, drop_gone, drop_stream) = (
        dropped("unknown_flow"),
        dropped("malformed"),
        dropped("send_buffer_full"),
        dropped("peer_gone"),
        dropped("stream_full"),
    );
    let mut arena = BytesMut::new();
    loop {
        let d = match peer.conn.read_datagram().await {
            Ok(d) => d,
            Err(e) => return describe_connection_error(&e),
        };
        let Ok((id, payload)) = datagram::decode(&d) else {
            drop_malformed.inc();
            ztna_node::warn_limited!(
                DROP_LOG_EVERY,
                direction,
                size = d.len(),
                "UDP datagram dropped: malformed (no valid flow id)"
            );
            continue;
        };
        let routes = peer.routes();
        let Some(route) = routes.get(&id) else {
            drop_unknown.inc();
            ztna_node::warn_limited!(
                DROP_LOG_EVERY,
                direction,
                flow = id,
                "UDP datagram dropped: no such flow (it ended, or never existed)"
            );
            continue;
        };
        route.activity.touch();
        let Ok(out) = datagram::encode_into(&mut arena, route.flow_id, &payload) else {
            drop_malformed.inc();
            ztna_node::warn_limited!(
                DROP_LOG_EVERY,
                direction,
                size = payload.len(),
                "UDP datagram dropped: cannot be re-encoded for the next hop"
            );
            continue;
        };
        let outcome = dg::send_fair(&route.peer.fair, &route.meter, &route.peer.conn, out);
        match outcome {
            Sent::Queued => bytes.inc_by(payload.len() as u64),
            Sent::TooLarge => match route.overflow.try_send(payload.clone()) {
                Ok(()) => bytes.inc_by(payload.len() as u64),
                Err(_) => {
                    drop_stream.inc();
                    ztna_node::warn_limited!(DROP_LOG_EVERY, size = payload.len(), "UDP payload dropped: too large for a datagram and the flow's stream queue is full");
                }
            },
            Sent::BufferFull => {
                drop_full.inc();
                ztna_node::warn_limited!(
                    DROP_LOG_EVERY,
                    direction,
                    "UDP datagram dropped: send buffer full (the next hop is congested)"
                );
            }
            Sent::Gone => {
                drop_gone.inc();
                ztna_node::warn_limited!(
                    DROP_LOG_EVERY,
                    direction,
                    "UDP datagram dropped: the other side of the flow is gone"
                );
            }
        }
    }
}

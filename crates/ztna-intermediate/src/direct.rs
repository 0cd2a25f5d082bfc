//! Brokering direct agent ↔ connector paths (P2P).
//!
//! An agent asks for a direct path to a service. The intermediate checks the policy, picks the
//! connector (healthy, least loaded, as for relayed flows), offers the agent's candidates to the
//! connector (which starts punching towards them and answers with its own), then sends the agent
//! the connector's candidates and a ticket signed with this intermediate's key. The ticket binds
//! the agent's SPIFFE ID, the connector's, the service and an expiry ≤ 60 s; the connector
//! accepts the direct connection and its flows only with it. Policy stays here: no ticket, no
//! direct flow. Outcomes are counted in `ztna_intermediate_p2p_total{result}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use ztna_proto::ticket::{Ticket, TicketBody, MAX_TICKET_LIFETIME_MS};
use ztna_proto::{Protocol, ServerMsg, MAX_CANDIDATES};

use crate::registry::Peer;
use crate::state::Shared;

/// How long a connector has to answer an offer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime of the tickets issued here.
pub(crate) const TICKET_LIFETIME_MS: u64 = MAX_TICKET_LIFETIME_MS;

const DIRECT_LOG_EVERY: Duration = Duration::from_secs(1);

type Answer = (bool, Vec<SocketAddr>, String);

/// Offers waiting for the connector's answer.
#[derive(Default)]
pub(crate) struct Broker {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
}

fn count(shared: &Shared, result: &str) {
    shared.metrics.p2p.with_label_values(&[result]).inc();
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Signs a ticket for `agent` to reach `services` at `connector`.
fn ticket(shared: &Shared, agent: &str, connector: &str, services: Vec<String>) -> Option<Vec<u8>> {
    let identity = shared.identity();
    let body = TicketBody {
        intermediate: identity.id.to_string(),
        agent: agent.to_string(),
        connector: connector.to_string(),
        services,
        not_after_ms: unix_ms() + TICKET_LIFETIME_MS,
    }
    .encode();
    match identity.sign(&body) {
        Ok((scheme, signature)) => Some(
            Ticket {
                body,
                scheme,
                signature,
            }
            .encode(),
        ),
        Err(e) => {
            warn!(error = %e, "cannot sign a direct-path ticket");
            None
        }
    }
}

/// The connector for a direct path to `service`: the one a relayed flow would get.
fn connector_for(shared: &Shared, service: &str) -> Option<Arc<Peer>> {
    shared
        .registry
        .candidates(service, Protocol::Tcp)
        .into_iter()
        .next()
        .or_else(|| {
            shared
                .registry
                .candidates(service, Protocol::Udp)
                .into_iter()
                .next()
        })
}

fn with_observed(mut candidates: Vec<SocketAddr>, observed: SocketAddr) -> Vec<SocketAddr> {
    let observed = ztna_node::transport::canonical(observed);
    candidates.retain(|c| *c != observed);
    candidates.insert(0, observed);
    candidates.truncate(MAX_CANDIDATES);
    candidates
}

/// Handles an agent's [`ztna_proto::ClientMsg::DirectRequest`].
pub(crate) async fn broker(
    shared: Arc<Shared>,
    agent: Arc<Peer>,
    service: String,
    candidates: Vec<SocketAddr>,
) {
    let refuse = |result: &str, reason: String| {
        count(&shared, result);
        ztna_node::info_limited!(DIRECT_LOG_EVERY, %service, result, why = %reason, "no direct path");
        agent.say(ServerMsg::DirectRefused {
            service: service.clone(),
            reason,
        });
    };
    if !shared.policy().may_reach(&service, &agent.id_str) {
        let why = format!("policy does not allow {} to reach {service}", agent.id);
        return refuse("denied", why);
    }
    if shared.is_draining() {
        return refuse("failed", "the intermediate is draining".to_string());
    }
    let Some(connector) = connector_for(&shared, &service) else {
        return refuse("failed", format!("no connector is serving {service}"));
    };
    let request = shared.direct.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = oneshot::channel();
    ztna_node::lock(&shared.direct.pending).insert(request, tx);
    let offer = ServerMsg::DirectOffer {
        request,
        agent: agent.id_str.to_string(),
        service: service.clone(),
        candidates: with_observed(candidates, agent.conn.remote_address()),
    };
    let answer = if connector.say(offer) {
        tokio::time::timeout(ANSWER_TIMEOUT, rx)
            .await
            .ok()
            .and_then(|r| r.ok())
    } else {
        None
    };
    ztna_node::lock(&shared.direct.pending).remove(&request);
    let (accepted, c_candidates, reason) = match answer {
        Some(a) => a,
        None => {
            return refuse(
                "failed",
                format!("connector {} did not answer the offer", connector.id),
            )
        }
    };
    if !accepted {
        return refuse(
            "disabled",
            format!("connector {} refused: {reason}", connector.id),
        );
    }
    let Some(ticket) = ticket(
        &shared,
        &agent.id_str,
        &connector.id_str,
        vec![service.clone()],
    ) else {
        return refuse("failed", "no ticket could be signed".to_string());
    };
    debug!(%service, connector = %connector.id, "direct path brokered");
    let start = ServerMsg::DirectStart {
        service,
        connector: connector.id_str.to_string(),
        candidates: with_observed(c_candidates, connector.conn.remote_address()),
        ticket,
    };
    let go = ServerMsg::DirectGo { request };
    // Both sides start punching at about the same moment: the one farther away is told first,
    // the nearer one half a round-trip difference later.
    let (a, c) = (agent.conn.rtt() / 2, connector.conn.rtt() / 2);
    let skew = a.abs_diff(c).min(MAX_START_SKEW);
    if a >= c {
        agent.say(start);
        tokio::time::sleep(skew).await;
        connector.say(go);
    } else {
        connector.say(go);
        tokio::time::sleep(skew).await;
        agent.say(start);
    }
}

/// At most this much is waited to align the start of a punch.
const MAX_START_SKEW: Duration = Duration::from_millis(500);

/// An agent asked for direct paths faster than its budget (8 at once, then 2 per second).
pub(crate) fn over_budget(shared: &Shared, agent: &Peer, service: String) {
    shared
        .metrics
        .limit_rejections
        .with_label_values(&["direct_requests"])
        .inc();
    ztna_node::info_limited!(DIRECT_LOG_EVERY, %service, "direct-path requests over budget, refused");
    agent.say(ServerMsg::DirectRefused {
        service,
        reason: "too many direct-path requests; try again later".to_string(),
    });
}

/// A connector's answer to an offer.
pub(crate) fn answered(
    shared: &Shared,
    request: u64,
    accepted: bool,
    candidates: Vec<SocketAddr>,
    reason: String,
) {
    if let Some(tx) = ztna_node::lock(&shared.direct.pending).remove(&request) {
        let _ = tx.send((accepted, candidates, reason));
    }
}

/// An agent's report on a brokered attempt.
pub(crate) fn result(shared: &Shared, service: &str, success: bool, reason: &str) {
    if success {
        count(shared, "success");
        info!(%service, "direct path up");
    } else {
        count(shared, "failed");
        ztna_node::info_limited!(DIRECT_LOG_EVERY, %service, why = %reason, "direct path attempt failed; flows use the relay");
    }
}

/// A fresh ticket for an established direct path, if the policy still allows it and the
/// connector still serves the service here.
pub(crate) fn refresh(shared: &Shared, agent: &Peer, service: &str, connector: &str) {
    let serves = shared
        .registry
        .candidates(service, Protocol::Tcp)
        .into_iter()
        .chain(shared.registry.candidates(service, Protocol::Udp))
        .any(|c| &*c.id_str == connector);
    if !shared.policy().may_reach(service, &agent.id_str) || !serves {
        agent.say(ServerMsg::DirectRefused {
            service: service.to_string(),
            reason: format!("no longer allowed to reach {service} via {connector}"),
        });
        return;
    }
    if let Some(ticket) = ticket(shared, &agent.id_str, connector, vec![service.to_string()]) {
        agent.say(ServerMsg::Ticket {
            service: service.to_string(),
            connector: connector.to_string(),
            ticket,
        });
    }
}

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
use tracing::{debug, warn};
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

/// Offers waiting for the connector's answer: request → (the offered connector's connection,
/// where its answer goes).
#[derive(Default)]
pub(crate) struct Broker {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, (u64, oneshot::Sender<Answer>)>>,
}

impl Broker {
    /// A new offer to the connector on connection `conn`: its request number and where the
    /// answer will come.
    fn offer(&self, conn: u64) -> (u64, oneshot::Receiver<Answer>) {
        let request = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        ztna_node::lock(&self.pending).insert(request, (conn, tx));
        (request, rx)
    }

    /// Forgets an offer (answered, or given up on).
    fn forget(&self, request: u64) {
        ztna_node::lock(&self.pending).remove(&request);
    }

    /// An answer from the connector on connection `from`; false (and nothing delivered) unless
    /// the offer went to that connection.
    fn answer(&self, from: u64, request: u64, answer: Answer) -> bool {
        let mut pending = ztna_node::lock(&self.pending);
        if pending.get(&request).is_none_or(|(to, _)| *to != from) {
            return false;
        }
        if let Some((_, tx)) = pending.remove(&request) {
            let _ = tx.send(answer);
        }
        true
    }
}

/// The most of a connector's refusal reason passed on to an agent (the rest is cut, so the
/// message stays within the agent's limits).
const MAX_PEER_REASON: usize = 256;

/// `s` cut to at most `max` bytes, at a character boundary.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
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

/// Signs a ticket for `agent` to reach `services` at `connector`, with the key `connector`
/// knows us by.
fn ticket(
    shared: &Shared,
    agent: &str,
    connector: &Peer,
    services: Vec<String>,
) -> Option<Vec<u8>> {
    let identity = connector
        .signer
        .clone()
        .unwrap_or_else(|| Arc::new(shared.identity()));
    let body = TicketBody {
        intermediate: identity.id.to_string(),
        agent: agent.to_string(),
        connector: connector.id_str.to_string(),
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

/// A peer's candidates as passed on to the other side: the address we observe first, then the
/// ones it named that a peer may be sent packets at. Never an unspecified, multicast or
/// broadcast address or port 0, and loopback only for a peer we see on loopback: the other side
/// punches at each of them, and a peer must not be able to aim that at the other side's own
/// host.
fn with_observed(candidates: Vec<SocketAddr>, observed: SocketAddr) -> Vec<SocketAddr> {
    let observed = ztna_node::transport::canonical(observed);
    let punchable = |c: &SocketAddr| {
        let ip = c.ip();
        let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        c.port() != 0
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && !broadcast
            && (!ip.is_loopback() || observed.ip().is_loopback())
    };
    let mut candidates: Vec<SocketAddr> = candidates
        .into_iter()
        .map(ztna_node::transport::canonical)
        .filter(|c| *c != observed && punchable(c))
        .collect();
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
    let (request, rx) = shared.direct.offer(connector.conn_id);
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
    shared.direct.forget(request);
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
            format!(
                "connector {} refused: {}",
                connector.id,
                clip(reason, MAX_PEER_REASON)
            ),
        );
    }
    let Some(ticket) = ticket(&shared, &agent.id_str, &connector, vec![service.clone()]) else {
        return refuse("failed", "no ticket could be signed".to_string());
    };
    debug!(%service, connector = %connector.id, "direct path brokered");
    let start_service = service.clone();
    let start = ServerMsg::DirectStart {
        service,
        connector: connector.id_str.to_string(),
        candidates: with_observed(c_candidates, connector.conn.remote_address()),
        ticket,
    };
    let go = ServerMsg::DirectGo { request };
    // The agent reports how this attempt went (`result`).
    agent.asked_direct(&start_service);
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

/// A connector's answer to an offer; ignored unless the offer went to that connector.
pub(crate) fn answered(
    shared: &Shared,
    from: &Peer,
    request: u64,
    accepted: bool,
    candidates: Vec<SocketAddr>,
    reason: String,
) {
    let known = ztna_node::lock(&shared.direct.pending).contains_key(&request);
    if !shared
        .direct
        .answer(from.conn_id, request, (accepted, candidates, reason))
        && known
    {
        ztna_node::warn_limited!(DIRECT_LOG_EVERY, connector = %from.id, request, "answer to a direct-path offer made to another connector, ignored");
    }
}

/// An agent's report on an attempt it asked this intermediate about (a direct-path or ticket
/// request not yet reported on); any other report is ignored.
pub(crate) fn result(shared: &Shared, agent: &Peer, service: &str, success: bool, reason: &str) {
    if !agent.take_asked_direct(service) {
        ztna_node::warn_limited!(DIRECT_LOG_EVERY, %service, "report on a direct-path attempt this agent did not ask about here, ignored");
        return;
    }
    if success {
        count(shared, "success");
        ztna_node::info_limited!(DIRECT_LOG_EVERY, %service, "direct path up");
    } else {
        count(shared, "failed");
        ztna_node::info_limited!(DIRECT_LOG_EVERY, %service, why = %reason, "direct path attempt failed; flows use the relay");
    }
}

/// A fresh ticket for an established direct path, if the policy still allows the agent to
/// reach the service and the connector to serve it, and the connector offers it here or did
/// until it withdrew it and is still connected: a draining connector deregisters at once, but
/// its running direct flows may finish (until its `drain_timeout`), so their tickets are
/// renewed. It takes no new flow while it drains.
pub(crate) fn refresh(shared: &Shared, agent: &Peer, service: &str, connector: &str) {
    let policy = shared.policy();
    let serving = shared.registry.holder(service, connector).filter(|_| {
        policy.may_reach(service, &agent.id_str) && policy.may_serve(service, connector)
    });
    let Some(serving) = serving else {
        agent.say(ServerMsg::DirectRefused {
            service: service.to_string(),
            reason: format!("no longer allowed to reach {service} via {connector}"),
        });
        return;
    };
    if let Some(ticket) = ticket(shared, &agent.id_str, &serving, vec![service.to_string()]) {
        // A ticket to join a running path is reported on (`result`); one that renews it is not.
        agent.asked_direct(service);
        agent.say(ServerMsg::Ticket {
            service: service.to_string(),
            connector: connector.to_string(),
            ticket,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the connector an offer went to can answer it: another connector's answer (request
    /// numbers are easy to guess) is not delivered, and the real answer still is.
    #[test]
    fn an_offer_is_answered_only_by_the_connector_it_went_to() {
        let broker = Broker::default();
        let (request, mut rx) = broker.offer(7);
        let answer = |reason: &str| (false, vec![], reason.to_string());
        assert!(!broker.answer(8, request, answer("forged")));
        assert!(rx.try_recv().is_err(), "a forged answer was delivered");
        assert!(broker.answer(7, request, answer("genuine")));
        assert_eq!(rx.try_recv().map(|a| a.2), Ok("genuine".to_string()));
        assert!(
            !broker.answer(7, request, answer("again")),
            "answered twice"
        );
    }

    #[test]
    fn a_peer_reason_is_clipped_at_a_character_boundary() {
        let long = "é".repeat(300);
        let clipped = clip(long, MAX_PEER_REASON);
        assert!(
            clipped.len() <= MAX_PEER_REASON + '…'.len_utf8(),
            "{}",
            clipped.len()
        );
        assert!(clipped.ends_with('…'));
        assert_eq!(clip("short".to_string(), MAX_PEER_REASON), "short");
    }

    /// Candidates passed on are ones the other side may punch at: the observed address first,
    /// never unspecified, multicast, broadcast or port 0, and loopback only for a peer on
    /// loopback.
    #[test]
    fn candidates_are_filtered_before_the_other_side_punches_at_them() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let named = vec![
            a("192.168.1.20:4433"),
            a("127.0.0.1:22"),
            a("0.0.0.0:4433"),
            a("224.0.0.1:4433"),
            a("255.255.255.255:4433"),
            a("10.0.0.5:0"),
            a("[::1]:22"),
            a("[ff02::1]:4433"),
            a("[2001:db8::5]:4433"),
            a("[::ffff:10.1.2.3]:4433"),
        ];
        let got = with_observed(named.clone(), a("198.51.100.7:40000"));
        assert_eq!(
            got,
            vec![
                a("198.51.100.7:40000"),
                a("192.168.1.20:4433"),
                a("[2001:db8::5]:4433"),
                a("10.1.2.3:4433"),
            ]
        );
        // A peer we see on loopback (tests, one host) keeps its loopback candidates.
        let local = with_observed(named, a("127.0.0.1:40000"));
        assert!(local.contains(&a("127.0.0.1:22")), "{local:?}");
    }
}

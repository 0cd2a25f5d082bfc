//! Direct (P2P) paths: agents connect straight to this connector's endpoint (the same UDP socket
//! that carries its connections to the intermediates, so NAT mappings match what the
//! intermediates observed).
//!
//! Policy lives at the intermediates, so a direct connection is accepted only with a ticket an
//! intermediate we are connected to signed, for this agent (the connection's client
//! certificate), for this connector, unexpired; and a flow on it only for a service the ticket
//! names and this connector serves. Anything else is refused with the reason, counted in
//! `ztna_connector_direct_refused_total{reason}`, and never reaches a backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::VarInt;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::identity::{cert_not_after, describe_connection_error, peer_id, verify_signature};
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::CancellationToken;
use ztna_proto::ticket::{Ticket, MAX_TICKET_LIFETIME_MS};
use ztna_proto::{codes, DirectMsg, DirectReply, PROTOCOL_VERSION};

use crate::flow::{self, ConnState};
use crate::Shared;

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, and how often, to punch towards an agent's candidates after an offer.
const PUNCH_FOR: Duration = Duration::from_secs(3);
const PUNCH_EVERY: Duration = Duration::from_millis(100);
/// Clock skew tolerated on ticket expiry.
const SKEW_MS: u64 = 2_000;

const REFUSE_LOG_EVERY: Duration = Duration::from_secs(1);
/// How often a direct connection checks for services whose ticket lapsed (the precision of
/// ending their flows).
const REVOKE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Direct connections one agent identity may have to this connector at once. An agent needs
/// one (its services share it); the rest is room for a restart's leftovers.
pub(crate) const MAX_DIRECT_CONNECTIONS_PER_AGENT: usize = 8;

/// A place among an agent's direct connections, given back on drop.
pub(crate) struct ConnSlot {
    shared: Arc<Shared>,
    agent: String,
}

impl ConnSlot {
    fn take(shared: &Arc<Shared>, agent: &str) -> Option<ConnSlot> {
        let mut m = ztna_node::lock(&shared.direct_per_agent);
        let n = m.entry(agent.to_string()).or_insert(0);
        if *n >= MAX_DIRECT_CONNECTIONS_PER_AGENT {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            shared: shared.clone(),
            agent: agent.to_string(),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = ztna_node::lock(&self.shared.direct_per_agent);
        if let Some(n) = m.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.agent);
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A direct flow's connection and agent (in its [`crate::FlowMeta`]).
#[derive(Clone)]
pub(crate) struct FlowOf {
    /// The direct connection's `stable_id`.
    pub conn: usize,
    pub agent: Arc<str>,
}

/// One direct connection: who is on it and what its tickets allow.
pub(crate) struct DirectPath {
    pub of: FlowOf,
    pub auth: DirectAuth,
}

/// How long a service stays allowed on a direct connection, and whether its flows were ended
/// when that time passed.
struct Grant {
    until_ms: u64,
    revoked: bool,
}

/// What a direct connection's tickets allow: each service until its latest ticket expires.
/// Services of one agent on this connector share the connection, each with tickets of its own.
#[derive(Default)]
pub(crate) struct DirectAuth {
    inner: RwLock<BTreeMap<String, Grant>>,
}

/// Whether a grant until `until_ms` has lapsed at `now_ms` (with the tolerated clock skew).
fn lapsed(until_ms: u64, now_ms: u64) -> bool {
    now_ms > until_ms.saturating_add(SKEW_MS)
}

impl DirectAuth {
    /// Adds a valid ticket's services (or extends their expiry); forgets lapsed services whose
    /// flows were already ended.
    fn add(&self, services: Vec<String>, not_after_ms: u64) {
        let now = unix_ms();
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, grant| !(grant.revoked && lapsed(grant.until_ms, now)));
        for s in services {
            let grant = g.entry(s).or_insert(Grant {
                until_ms: not_after_ms,
                revoked: false,
            });
            grant.until_ms = grant.until_ms.max(not_after_ms);
            if !lapsed(grant.until_ms, now) {
                grant.revoked = false;
            }
        }
    }

    /// The services flows may be opened for now.
    fn services(&self) -> Vec<String> {
        let now = unix_ms();
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .filter(|(_, grant)| !lapsed(grant.until_ms, now))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Services whose last ticket has lapsed since the previous call: their running flows on
    /// this connection must end (policy lives at the intermediates; a service they no longer
    /// renew tickets for is no longer allowed).
    fn take_lapsed(&self) -> Vec<String> {
        let now = unix_ms();
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.iter_mut()
            .filter(|(_, grant)| !grant.revoked && lapsed(grant.until_ms, now))
            .map(|(s, grant)| {
                grant.revoked = true;
                s.clone()
            })
            .collect()
    }

    /// Whether a flow to `service` may be opened now; the refusal reason (metric label, text)
    /// otherwise.
    pub fn allows(&self, service: &str) -> Result<(), (&'static str, String)> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match g.get(service) {
            None => Err((
                "service_not_allowed",
                format!("no ticket on the direct path allows {service}"),
            )),
            Some(grant) if lapsed(grant.until_ms, unix_ms()) => Err((
                "expired",
                format!("the direct path's ticket for {service} expired; use the relay"),
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Checks a ticket presented by `agent`; returns the services it allows here and its expiry.
/// The signature is checked before anything the ticket says is believed.
fn verify(
    shared: &Shared,
    agent: &str,
    bytes: &[u8],
) -> Result<(Vec<String>, u64), (&'static str, String)> {
    let ticket = Ticket::decode(bytes).map_err(|e| ("malformed", e))?;
    let body = ticket.body().map_err(|e| ("malformed", e))?;
    // Signed by an intermediate we are connected to (whose certificate we verified ourselves
    // in the handshake, and which has not expired since).
    let cert = ztna_node::lock(&shared.intermediate_certs)
        .get(&body.intermediate)
        .map(|(cert, _)| cert.clone())
        .ok_or_else(|| {
            (
                "unknown_intermediate",
                format!(
                    "ticket from {}, an intermediate this connector is not connected to",
                    body.intermediate
                ),
            )
        })?;
    if cert_not_after(&cert).is_none_or(|t| t < SystemTime::now()) {
        return Err((
            "unknown_intermediate",
            format!(
                "ticket from {}, whose certificate has expired",
                body.intermediate
            ),
        ));
    }
    verify_signature(&cert, ticket.scheme, &ticket.body, &ticket.signature)
        .map_err(|e| ("bad_signature", e))?;
    let me = shared.tls.id().to_string();
    if body.connector != me {
        return Err((
            "wrong_connector",
            format!("ticket is for {}, this is {me}", body.connector),
        ));
    }
    if body.agent != agent {
        return Err((
            "wrong_agent",
            format!("ticket is for {}, presented by {agent}", body.agent),
        ));
    }
    let now = unix_ms();
    if lapsed(body.not_after_ms, now) {
        return Err(("expired", "ticket expired".to_string()));
    }
    if body.not_after_ms > now.saturating_add(MAX_TICKET_LIFETIME_MS + SKEW_MS) {
        return Err((
            "bad_ticket",
            "ticket lives longer than tickets may".to_string(),
        ));
    }
    let services: Vec<String> = body
        .services
        .into_iter()
        .filter(|s| shared.services.contains_key(s))
        .collect();
    if services.is_empty() {
        return Err((
            "service_not_allowed",
            "ticket names no service this connector serves".to_string(),
        ));
    }
    Ok((services, body.not_after_ms))
}

fn refused(shared: &Shared, reason: &str) {
    shared
        .metrics
        .direct_refused
        .with_label_values(&[reason])
        .inc();
}

/// The hop limit of the first punch: through our own NAT, not as far as the agent's.
pub(crate) const FIRST_PUNCH_TTL: u8 = 2;
/// Time between the first (low-TTL) punch and full-TTL packets on both sides, longer than the
/// difference between the moments the two sides get the start signal.
pub(crate) const FULL_PUNCH_AFTER: Duration = Duration::from_millis(50);

/// An offer's key: the intermediate (its index in the config) and its request number (each
/// intermediate numbers its own requests).
type OfferKey = (usize, u64);

/// Offers answered, waiting for the intermediate's start signal: offer → agent candidates.
#[derive(Default)]
pub(crate) struct Offers(
    std::sync::Mutex<std::collections::HashMap<OfferKey, (Vec<SocketAddr>, tokio::time::Instant)>>,
);

impl Offers {
    pub fn remember(&self, intermediate: usize, request: u64, candidates: Vec<SocketAddr>) {
        let mut m = ztna_node::lock(&self.0);
        let now = tokio::time::Instant::now();
        m.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(10));
        m.insert((intermediate, request), (candidates, now));
    }

    pub fn take(&self, intermediate: usize, request: u64) -> Option<Vec<SocketAddr>> {
        ztna_node::lock(&self.0)
            .remove(&(intermediate, request))
            .map(|(c, _)| c)
    }
}

/// The start signal for an offer: open our NAT mapping towards the agent's candidates with a
/// low-TTL packet (it dies before the agent's NAT), then punch with full TTL for a few seconds
/// (the agent's handshake may arrive any moment).
pub(crate) fn punch(shared: &Arc<Shared>, candidates: Vec<SocketAddr>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let Some(puncher) = &shared.puncher else {
            return;
        };
        shared.metrics.direct_punches.inc();
        puncher.punch_ttl(&candidates, FIRST_PUNCH_TTL);
        tokio::time::sleep(FULL_PUNCH_AFTER).await;
        let end = tokio::time::Instant::now() + PUNCH_FOR;
        let mut tick = tokio::time::interval(PUNCH_EVERY);
        while tokio::time::Instant::now() < end {
            tick.tick().await;
            puncher.punch(&candidates);
        }
    });
}

/// Accepts direct connections until `stop`.
pub(crate) async fn accept(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        if shared.is_draining() {
            incoming.refuse();
            continue;
        }
        let remote = ztna_node::transport::canonical(incoming.remote_address());
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let conn = match tokio::time::timeout(HELLO_TIMEOUT, async {
                    incoming.accept()?.await
                })
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        refused(&shared, "handshake");
                        ztna_node::info_limited!(REFUSE_LOG_EVERY, why = %describe_connection_error(&e), "direct connection refused in the handshake");
                        return;
                    }
                    Err(_) => {
                        refused(&shared, "handshake");
                        ztna_node::info_limited!(REFUSE_LOG_EVERY, "direct connection refused: the handshake did not complete in time");
                        return;
                    }
                };
                serve(shared, conn).await;
            }
            .instrument(info_span!("direct", agent_addr = %remote)),
        );
    }
}

/// Refuses a direct connection: the reason on its control stream (given a moment to be read),
/// then the close with `code`.
async fn refuse_path(
    mut send: quinn::SendStream,
    conn: &quinn::Connection,
    code: u32,
    why: String,
) {
    let reply = DirectReply::Refused {
        reason: why.clone(),
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(VarInt::from_u32(code), why.as_bytes());
}

async fn serve(shared: Arc<Shared>, conn: quinn::Connection) {
    let Some(agent) = peer_id(&conn) else {
        refused(&shared, "handshake");
        conn.close(VarInt::from_u32(codes::UNAUTHORIZED), b"no SPIFFE identity");
        return;
    };
    let agent = agent.to_string();
    let (mut send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            refused(&shared, "no_ticket");
            conn.close(VarInt::from_u32(codes::UNAUTHORIZED), b"no ticket");
            return;
        }
    };
    let mut recv = FramedRecv::new(recv);
    let ticket = match recv.expect::<DirectMsg>(HELLO_TIMEOUT).await {
        Ok(DirectMsg::Hello { version, ticket }) if version == PROTOCOL_VERSION => ticket,
        Ok(_) => {
            refused(&shared, "no_ticket");
            conn.close(
                VarInt::from_u32(codes::PROTOCOL),
                b"expected Hello with a ticket",
            );
            return;
        }
        Err(e) => {
            refused(&shared, "no_ticket");
            conn.close(
                VarInt::from_u32(codes::PROTOCOL),
                format!("hello: {e}").as_bytes(),
            );
            return;
        }
    };
    let (services, not_after) = match verify(&shared, &agent, &ticket) {
        Ok(v) => v,
        Err((label, why)) => {
            refused(&shared, label);
            ztna_node::warn_limited!(REFUSE_LOG_EVERY, %agent, why = %why, "direct connection refused");
            return refuse_path(send, &conn, codes::UNAUTHORIZED, why).await;
        }
    };
    let Some(_slot) = ConnSlot::take(&shared, &agent) else {
        refused(&shared, "too_many_connections");
        let why = format!(
            "{agent} already has {MAX_DIRECT_CONNECTIONS_PER_AGENT} direct connections to this connector"
        );
        ztna_node::warn_limited!(REFUSE_LOG_EVERY, %agent, "direct connection refused: too many from this agent");
        return refuse_path(send, &conn, codes::LIMIT, why).await;
    };
    let path = Arc::new(DirectPath {
        of: FlowOf {
            conn: conn.stable_id(),
            agent: Arc::from(agent.as_str()),
        },
        auth: DirectAuth::default(),
    });
    let auth = &path.auth;
    auth.add(services.clone(), not_after);
    if write_frame(
        &mut send,
        &DirectReply::Welcome {
            services: services.clone(),
        },
    )
    .await
    .is_err()
    {
        return;
    }
    info!(%agent, ?services, "direct path up");
    let gauge = &shared.metrics.direct_connections;
    gauge.inc();
    let state = Arc::new(ConnState::direct(conn.clone()));
    let control = async {
        loop {
            match recv.next::<DirectMsg>().await {
                // A refreshed ticket, or one for another service of ours: answered, so the
                // agent knows whether the path carries the service. (Agents before path
                // sharing do not read answers; a failed write is no reason to drop the path.)
                Ok(Some(DirectMsg::Ticket { ticket })) => {
                    let reply = match verify(&shared, &agent, &ticket) {
                        Ok((services, not_after)) => {
                            auth.add(services, not_after);
                            DirectReply::Welcome {
                                services: auth.services(),
                            }
                        }
                        Err((label, why)) => {
                            refused(&shared, label);
                            debug!(why = %why, "ticket on the direct path refused; the services of earlier tickets stay until they expire");
                            DirectReply::Refused { reason: why }
                        }
                    };
                    let _ = write_frame(&mut send, &reply).await;
                }
                Ok(Some(DirectMsg::Hello { .. })) => {
                    conn.close(VarInt::from_u32(codes::PROTOCOL), b"duplicate Hello");
                    return;
                }
                Ok(None) | Err(_) => return,
            }
        }
    };
    let flows = async {
        loop {
            match conn.accept_bi().await {
                Ok((s, r)) => {
                    let span = info_span!("flow", stream = %r.id());
                    shared.flows.spawn(
                        flow::handle(shared.clone(), state.clone(), s, r, Some(path.clone()))
                            .instrument(span),
                    );
                }
                Err(_) => return,
            }
        }
    };
    let datagrams = async {
        while let Ok(d) = conn.read_datagram().await {
            flow::dispatch(&shared, &state, &d);
        }
    };
    // A service whose tickets stop coming (the intermediates no longer allow it, or the agent
    // stopped asking) loses its running flows here when the last one lapses, as relayed flows
    // are ended when a policy reload forbids them.
    let revoke = async {
        let mut tick = tokio::time::interval(REVOKE_CHECK_EVERY);
        loop {
            tick.tick().await;
            let lapsed = auth.take_lapsed();
            if lapsed.is_empty() {
                continue;
            }
            let conn_id = path.of.conn;
            let cut = shared.flows.cancel_where(codes::REVOKED, |e| {
                e.meta.direct.as_ref().is_some_and(|d| d.conn == conn_id)
                    && lapsed.iter().any(|s| **s == *e.meta.service)
            });
            for service in &lapsed {
                debug!(%service, "ticket lapsed on the direct path; new flows for it are refused");
            }
            if cut > 0 {
                shared.metrics.direct_revoked.inc_by(cut as u64);
                warn!(%agent, services = ?lapsed, flows = cut, "direct flows ended: their service's ticket lapsed and was not renewed");
            }
            if auth.services().is_empty() {
                // Nothing may run on it any more: no reason to keep it (and its keepalives).
                conn.close(
                    VarInt::from_u32(codes::REVOKED),
                    b"every ticket on this direct path lapsed",
                );
                return;
            }
        }
    };
    tokio::select! {
        _ = control => {}
        _ = flows => {}
        _ = datagrams => {}
        _ = revoke => {}
    }
    gauge.dec();
    let why = conn
        .close_reason()
        .map(|e| describe_connection_error(&e))
        .unwrap_or_else(|| "closed".to_string());
    info!(%agent, reason = %why, "direct path closed");
    if conn.close_reason().is_none() {
        conn.close(VarInt::from_u32(codes::OK), b"direct path closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Services sharing a direct connection keep their own tickets: one expiring takes nothing
    /// from the others, and a later ticket never shortens a service's time.
    #[test]
    fn each_service_on_a_shared_path_keeps_its_own_expiry() {
        let auth = DirectAuth::default();
        let now = unix_ms();
        auth.add(vec!["web".into()], now + 30_000);
        auth.add(vec!["db".into()], now - 10_000);
        assert_eq!(auth.allows("web"), Ok(()));
        assert_eq!(auth.allows("db").map_err(|e| e.0), Err("expired"));
        assert_eq!(
            auth.allows("ssh").map_err(|e| e.0),
            Err("service_not_allowed")
        );
        assert_eq!(auth.services(), vec!["web".to_string()]);
        auth.add(vec!["db".into()], now + 30_000);
        auth.add(vec!["web".into()], now + 1_000);
        assert_eq!(auth.allows("db"), Ok(()));
        assert_eq!(
            auth.inner.read().unwrap().get("web").unwrap().until_ms,
            now + 30_000,
            "an earlier expiry shortened web's ticket"
        );
        assert_eq!(auth.services(), vec!["db".to_string(), "web".to_string()]);
    }

    /// A service whose last ticket lapsed is reported once (its flows are then ended), and a
    /// fresh ticket brings it back; one that is renewed in time is never reported.
    #[test]
    fn a_lapsed_service_is_reported_once_and_a_fresh_ticket_restores_it() {
        let auth = DirectAuth::default();
        let now = unix_ms();
        auth.add(vec!["web".into()], now + 30_000);
        auth.add(vec!["db".into()], now - SKEW_MS - 1);
        assert_eq!(auth.take_lapsed(), vec!["db".to_string()]);
        assert!(auth.take_lapsed().is_empty(), "reported twice");
        assert_eq!(auth.allows("db").map_err(|e| e.0), Err("expired"));
        auth.add(vec!["db".into()], now + 30_000);
        assert_eq!(auth.allows("db"), Ok(()));
        assert!(auth.take_lapsed().is_empty());
        // Within the tolerated skew it is not lapsed yet.
        let auth = DirectAuth::default();
        auth.add(vec!["web".into()], now - SKEW_MS / 2);
        assert!(auth.take_lapsed().is_empty());
        assert_eq!(auth.allows("web"), Ok(()));
        // A peer's expiry near u64::MAX neither overflows nor lapses.
        assert!(!lapsed(u64::MAX, now));
    }

    /// Each intermediate numbers its own offers from 1: the same number from two of them are
    /// two offers, each punched for on its own start signal.
    #[test]
    fn offers_of_two_intermediates_with_the_same_number_are_kept_apart() {
        let offers = Offers::default();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        offers.remember(0, 1, vec![a]);
        offers.remember(1, 1, vec![b]);
        assert_eq!(offers.take(0, 1), Some(vec![a]));
        assert_eq!(offers.take(1, 1), Some(vec![b]));
        assert_eq!(offers.take(0, 1), None);
    }
}

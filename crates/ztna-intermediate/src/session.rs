//! One authenticated peer: Hello/Welcome on the control stream, then the session as a few
//! independent tasks joined together (control reader, control writer, status pushes, flow
//! streams, datagram relay, RTT sampling, certificate expiry). Each owns its own loop, so a
//! control write that waits for a slow peer never stalls that peer's datagrams or flows; the
//! first task to end (the connection closed, a protocol violation, the certificate expired)
//! ends the session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::{SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::identity::describe_connection_error;
use ztna_node::io::{write_frame, FramedRecv, StreamError};
use ztna_node::SpiffeId;
use ztna_proto::{
    codes, ClientMsg, Role, ServerMsg, ServiceState, MAX_LIST_LEN, PROTOCOL_REVISION,
    PROTOCOL_VERSION,
};

use crate::registry::Peer;
use crate::state::Shared;
use crate::{datagrams, direct, flow};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Control messages queued for one peer before it counts as not reading them.
const CONTROL_QUEUE: usize = 2 * MAX_LIST_LEN;

const LIMIT_LOG_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// Why a session ended, for the disconnect log line.
fn lost(conn: &quinn::Connection) -> String {
    conn.close_reason()
        .map(|e| describe_connection_error(&e))
        .unwrap_or_else(|| "connection lost".to_string())
}

/// Runs a peer's session. `reloads`: [`Shared::reloads`] when its handshake began (under the CA
/// in force then).
pub(crate) async fn run(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    id: SpiffeId,
    chain: Vec<ztna_node::CertificateDer<'static>>,
    reloads: u64,
) {
    // Counted from the handshake on, not from Hello: a peer cannot hold more connections than
    // its identity may have by not saying Hello (each could buffer a connection window of
    // unaccepted streams meanwhile).
    let id_str: Arc<str> = Arc::from(id.to_string());
    let _conn_slot = match shared.limits.admit_connection(&id_str) {
        Ok(slot) => slot,
        Err(limit) => {
            shared
                .metrics
                .limit_rejections
                .with_label_values(&[limit.label()])
                .inc();
            let reason = format!(
                "this identity already holds {} connections ({})",
                shared.config.max_connections_per_identity,
                limit.key()
            );
            ztna_node::warn_limited!(LIMIT_LOG_EVERY, %reason, "refusing peer");
            close(&conn, codes::LIMIT, &reason);
            return;
        }
    };
    let (mut send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(reason = %describe_connection_error(&e), "peer left before hello");
            return;
        }
        Err(_) => {
            warn!("no control stream within {HELLO_TIMEOUT:?}, closing");
            close(
                &conn,
                codes::PROTOCOL,
                "expected a control stream with Hello",
            );
            return;
        }
    };
    let mut recv = FramedRecv::new(recv);
    let hello = match recv.expect::<ClientMsg>(HELLO_TIMEOUT).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "bad hello, closing");
            close(&conn, codes::PROTOCOL, &format!("bad hello: {e}"));
            return;
        }
    };
    let ClientMsg::Hello {
        version,
        role,
        software,
        watch,
    } = hello
    else {
        warn!("first control message was not Hello, closing");
        close(
            &conn,
            codes::PROTOCOL,
            "first control message must be Hello",
        );
        return;
    };
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "unsupported protocol version {version}; this intermediate speaks {PROTOCOL_VERSION}"
        );
        warn!(%reason, "refusing peer");
        refuse(&conn, &mut send, codes::VERSION, &reason).await;
        return;
    }
    if role != id.role || role == Role::Intermediate {
        let reason = if role == Role::Intermediate {
            "intermediates do not peer".to_string()
        } else {
            format!(
                "hello says role {role} but the certificate says {}",
                id.role
            )
        };
        warn!(%reason, "refusing peer");
        refuse(&conn, &mut send, codes::UNAUTHORIZED, &reason).await;
        return;
    }
    // In a block: a message still in scope would take room in the session's task for as long
    // as the connection lives.
    let welcomed = {
        let welcome = ServerMsg::Welcome {
            version: PROTOCOL_REVISION,
            identity: id.to_string(),
            observed_addr: ztna_node::transport::canonical(conn.remote_address()),
        };
        write_frame(&mut send, &welcome).await.is_ok()
    };
    if !welcomed {
        return;
    }
    if role == Role::Connector {
        // All flows to a connector share this connection: give it the larger window.
        let w = shared.config.connector_connection_window;
        conn.set_receive_window(quinn::VarInt::from_u64(w).unwrap_or(quinn::VarInt::MAX));
        conn.set_send_window(w);
    }
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let signer = (role == Role::Connector).then(|| Arc::new(shared.identity()));
    let peer = Arc::new(Peer::new(conn.clone(), id, conn_id, &chain, tx, signer));
    // The TLS session keeps the chain (`Peer::chain`); this copy would otherwise live as long as
    // the session.
    drop(chain);
    ztna_node::lock(&shared.peers).insert(conn_id, peer.clone());
    // A reload between its handshake and now did not see it in `peers`: check it here against
    // the CA now in force (after the insert, so a later reload's walk sees it instead).
    if shared.reloads.load(Ordering::SeqCst) != reloads
        && revoke_if_not_accepted(&shared, &peer, "during its handshake").is_err()
    {
        ztna_node::lock(&shared.peers).remove(&conn_id);
        return;
    }
    // Its handshake RTT now; then every few seconds with all peers (`status_loop`).
    shared
        .metrics
        .rtt(role.as_str())
        .observe(conn.rtt().as_secs_f64());
    let gauge = shared
        .metrics
        .connections
        .with_label_values(&[role.as_str()]);
    gauge.inc();
    info!(%software, "{role} connected");
    let why = match role {
        Role::Agent => agent(&shared, &peer, send, recv, rx, watch).await,
        // Boxed: a connector's session is the larger, and a relay holds few of them against
        // thousands of agents.
        _ => Box::pin(connector(&shared, &peer, send, recv, rx)).await,
    };
    // The session is what authorizes the connection (certificate expiry, CA reloads and the
    // per-identity limit all work on sessions): it never outlives it. Ended from the peer's side
    // (its control stream reset, say) the connection would otherwise stay up for as long as a
    // flow holds it, unlimited and unwatched.
    if conn.close_reason().is_none() {
        close(&conn, codes::PROTOCOL, &format!("session ended: {why}"));
    }
    gauge.dec();
    ztna_node::lock(&shared.peers).remove(&conn_id);
    let gone = shared.registry.remove_peer(conn_id);
    peer.routes().clear();
    if gone.is_empty() {
        info!(reason = %why, "{role} disconnected");
    } else {
        info!(reason = %why, services = ?gone, "{role} disconnected");
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut SendStream, code: u32, reason: &str) {
    let msg = ServerMsg::Refused {
        reason: reason.to_string(),
    };
    let _ = write_frame(send, &msg).await;
    let _ = send.finish();
    // Give the frame a moment to arrive before the close overtakes it.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    close(conn, code, reason);
}

/// Sends the peer's queued control messages, in order.
async fn write_control(mut send: SendStream, mut rx: mpsc::Receiver<Box<ServerMsg>>) -> String {
    while let Some(msg) = rx.recv().await {
        // Boxed: an idle connection's task would otherwise keep room for a write it rarely makes.
        if let Err(e) = Box::pin(write_frame(&mut send, &msg)).await {
            return format!("control stream write failed: {e}");
        }
    }
    let _ = send.finish();
    std::future::pending().await
}

/// Tells the peer something, then closes with `code` once it had a moment to read it.
async fn say_then_close(peer: &Peer, msg: ServerMsg, code: u32, reason: &str) -> String {
    let _ = peer.tell(msg).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    close(&peer.conn, code, reason);
    reason.to_string()
}

fn protocol_error(conn: &quinn::Connection, what: &str, e: &StreamError) -> String {
    if e.is_protocol() {
        warn!(error = %e, "protocol violation on {what}, closing connection");
        close(conn, codes::PROTOCOL, &format!("{what}: {e}"));
        format!("protocol violation on {what}: {e}")
    } else {
        conn.close_reason()
            .map(|e| describe_connection_error(&e))
            .unwrap_or_else(|| format!("{what} ended: {e}"))
    }
}

/// After a CA reload that a check of `peer` may have missed (`when`: during its handshake or its
/// renewal): re-checks its chain against the CA now in force, and closes it if refused (unless
/// the reload's own walk already did). The reason, if refused.
fn revoke_if_not_accepted(shared: &Shared, peer: &Peer, when: &str) -> Result<(), String> {
    let Err(why) = shared
        .identity()
        .verify_client_chain(&peer.chain(), &[peer.role])
    else {
        return Ok(());
    };
    let reason = format!("certificate no longer accepted: {why}");
    if peer.conn.close_reason().is_none() {
        warn!(%why, "certificate no longer accepted after a reload {when}, disconnecting");
        shared
            .metrics
            .revocations
            .with_label_values(&["ca_changed"])
            .inc();
        close(&peer.conn, codes::REVOKED, &reason);
    }
    Err(reason)
}

/// Closes the connection when the peer's certificate expires: an established connection must
/// not outlive the credential it was authorized with (a renewal moves the moment, see [`renew`]).
async fn expire(shared: &Shared, peer: &Peer) -> String {
    let mut expires = peer.expires.subscribe();
    loop {
        let Some(at) = *expires.borrow_and_update() else {
            if expires.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        };
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if left.is_zero() {
            break;
        }
        // Re-check at least hourly: the wall clock may be stepped (and a renewed connection may
        // live long).
        tokio::select! {
            _ = tokio::time::sleep(left.min(Duration::from_secs(3_600))) => {}
            _ = expires.changed() => {}
        }
    }
    shared
        .metrics
        .revocations
        .with_label_values(&["certificate_expired"])
        .inc();
    warn!("peer certificate expired, closing the connection");
    close(&peer.conn, codes::REVOKED, "certificate expired");
    "certificate expired".to_string()
}

/// A peer's renewal of its certificate on this connection (`ztna_node::renew`): checked as a new
/// handshake would be, against the CA in force, for the same SPIFFE ID; the connection then
/// expires with the new certificate. The answer is for the peer's log.
fn renew(
    shared: &Shared,
    peer: &Peer,
    chain: Vec<Vec<u8>>,
    scheme: u16,
    signature: &[u8],
) -> ServerMsg {
    let counted = |result: &str| shared.metrics.renewals.with_label_values(&[result]).inc();
    if !peer.renew_budget.take() {
        counted("refused");
        ztna_node::warn_limited!(LIMIT_LOG_EVERY, "renewal refused: too many");
        return ServerMsg::RenewRefused {
            reason: "too many renewals on this connection; try again in a minute".to_string(),
        };
    }
    // Under the CA in force now; a reload that swaps it during the check re-verifies below.
    let reloads = shared.reloads.load(Ordering::SeqCst);
    let checked = ztna_node::renew::check(
        &peer.conn,
        &shared.identity(),
        &peer.id,
        peer.role,
        chain,
        scheme,
        signature,
    );
    let renewed = match checked {
        Ok(r) => r,
        Err(reason) => {
            counted("refused");
            ztna_node::warn_limited!(LIMIT_LOG_EVERY, %reason, "renewal refused; the connection keeps its certificate and ends at its notAfter");
            return ServerMsg::RenewRefused { reason };
        }
    };
    let not_after = renewed.not_after;
    let previous = peer.renewed(renewed.chain, not_after);
    if shared.reloads.load(Ordering::SeqCst) != reloads {
        // A reload during the check: the new chain is re-checked against the CA now in force. If
        // refused, the renewal is, and the connection goes back to its previous certificate
        // (checked in turn: the reload may have refused that one too).
        let now = shared.identity();
        if let Err(why) = now.verify_client_chain(&peer.chain(), &[peer.role]) {
            peer.restore(previous);
            let _ = revoke_if_not_accepted(shared, peer, "during its renewal");
            counted("refused");
            return ServerMsg::RenewRefused {
                reason: format!("certificate no longer accepted: {why}"),
            };
        }
    }
    counted("accepted");
    let not_after_unix = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    info!(
        not_after_unix,
        "certificate renewed on this connection: it now ends at the new notAfter"
    );
    ServerMsg::Renewed { not_after_unix }
}

// ---------------------------------------------------------------------------------------------
// Agents

async fn agent(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    send: SendStream,
    recv: FramedRecv,
    rx: mpsc::Receiver<Box<ServerMsg>>,
    watch: Vec<String>,
) -> String {
    tokio::select! {
        why = write_control(send, rx) => why,
        why = agent_control(shared, peer, recv) => why,
        why = push_status(shared, peer, watch) => why,
        why = accept_flows(shared, peer) => why,
        why = datagrams::relay(shared.clone(), peer.clone(), "to_connector") => why,
        why = expire(shared, peer) => why,
    }
}

/// After Hello an agent only talks about direct paths (see `direct`).
async fn agent_control(shared: &Arc<Shared>, peer: &Arc<Peer>, mut recv: FramedRecv) -> String {
    loop {
        match recv.next::<ClientMsg>().await {
            // The agent closed its side of the control stream; it can still open flows.
            Ok(None) => return std::future::pending().await,
            Ok(Some(ClientMsg::Register { service, .. })) => {
                warn!(%service, "agent tried to register a service, closing");
                let reason = "agents cannot register services".to_string();
                let msg = ServerMsg::RegisterRejected {
                    service,
                    reason: reason.clone(),
                };
                return Box::pin(say_then_close(peer, msg, codes::UNAUTHORIZED, &reason)).await;
            }
            Ok(Some(ClientMsg::DirectRequest { service, .. })) if !peer.direct_budget.take() => {
                direct::over_budget(shared, peer, service);
            }
            Ok(Some(ClientMsg::TicketRequest { service, .. })) if !peer.direct_budget.take() => {
                direct::over_budget(shared, peer, service);
            }
            Ok(Some(ClientMsg::DirectRequest {
                service,
                candidates,
            })) => {
                tokio::spawn(
                    direct::broker(shared.clone(), peer.clone(), service, candidates)
                        .in_current_span(),
                );
            }
            Ok(Some(ClientMsg::DirectResult {
                service,
                success,
                reason,
            })) => direct::result(shared, peer, &service, success, &reason),
            Ok(Some(ClientMsg::TicketRequest { service, connector })) => {
                direct::refresh(shared, peer, &service, &connector);
            }
            Ok(Some(ClientMsg::Renew {
                chain,
                scheme,
                signature,
            })) => {
                let answer = renew(shared, peer, chain, scheme, &signature);
                // Boxed, as every rare wait here: the task's state is as large as its largest
                // wait, for as long as the connection lives.
                if !Box::pin(peer.tell(answer)).await {
                    return lost(&peer.conn);
                }
            }
            Ok(Some(other)) => {
                warn!(msg = ?other, "unexpected control message from agent, closing");
                close(&peer.conn, codes::PROTOCOL, "unexpected control message");
                return "unexpected control message".to_string();
            }
            Err(e) => return protocol_error(&peer.conn, "control stream", &e),
        }
    }
}

/// Availability of `service` as seen by `agent`, with the reason.
fn status_for(shared: &Shared, service: &str, agent: &str) -> (ServiceState, String) {
    if !shared.policy().may_reach(service, agent) {
        return (
            ServiceState::Denied,
            format!("policy does not allow {agent} to reach {service}"),
        );
    }
    match shared.registry.count(service) {
        0 => (
            ServiceState::Unavailable,
            format!("no connector is serving {service}"),
        ),
        n => (
            ServiceState::Available,
            format!("{n} connector(s) serving {service}"),
        ),
    }
}

fn goaway(shared: &Shared) -> ServerMsg {
    ServerMsg::GoAway {
        reason: "intermediate is draining".to_string(),
        deadline_ms: shared.config.drain_timeout.as_millis() as u64,
        reconnect: shared.config.reconnect_hint.clone(),
    }
}

/// Pushes the availability of every watched service at once and on every change, and GoAway
/// when the drain starts.
async fn push_status(shared: &Shared, peer: &Peer, watch: Vec<String>) -> String {
    let mut changes = shared.registry.subscribe();
    let mut draining = shared.draining.subscribe();
    let mut last: HashMap<String, ServiceState> = HashMap::new();
    let mut goaway_sent = false;
    loop {
        changes.borrow_and_update();
        for service in &watch {
            let (state, reason) = status_for(shared, service, &peer.id_str);
            if last.get(service) != Some(&state) {
                last.insert(service.clone(), state);
                let msg = ServerMsg::ServiceStatus {
                    service: service.clone(),
                    state,
                    reason,
                };
                if !peer.tell(msg).await {
                    return lost(&peer.conn);
                }
            }
        }
        if *draining.borrow_and_update() && !goaway_sent {
            goaway_sent = true;
            if !peer.tell(goaway(shared)).await {
                return lost(&peer.conn);
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return std::future::pending().await },
            r = draining.changed() => if r.is_err() { return std::future::pending().await },
        }
    }
}

/// Concurrent streams a new connection may open before it has shown it needs more. quinn keeps
/// an entry per permitted stream from the start in two hash tables: 1016 of them made an idle
/// agent connection cost 136 KiB; 64 cost 5.4 KiB (tables of 128 slots); 28 is the most that
/// fits tables of 32 slots. The credit is raised at 21 open flows, one round trip before it is
/// needed.
pub(crate) const INITIAL_STREAMS: u32 = 28;

/// The agent's stream credit: starts at [`INITIAL_STREAMS`] and doubles whenever three quarters
/// of it are open, up to `max` (`max_flows_per_agent` + control + headroom). An agent that needs
/// more waits one round trip for the raised limit; it is never refused for it.
///
/// quinn announces a raised limit (MAX_STREAMS) only when it grows by more than an eighth of
/// the new limit; a smaller raise waits until streams close. So the last step goes straight to
/// `max` when a doubling would leave less than that to go ([`next_limit`]): 448 → 896 → 1016
/// left the agent at 896 streams, and its 896th concurrent flow waited ~10 s for 8 others to end.
struct StreamCredit {
    open: Arc<AtomicUsize>,
    limit: u32,
    max: u32,
}

/// One open stream; gives its credit back when the flow ends.
struct OpenStream(Arc<AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamCredit {
    fn new(max: u32) -> StreamCredit {
        StreamCredit {
            open: Arc::new(AtomicUsize::new(0)),
            limit: initial_streams(max),
            max,
        }
    }

    /// Counts a newly accepted stream; raises the peer's limit when it is running short.
    fn opened(&mut self, conn: &quinn::Connection) -> OpenStream {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if self.limit < self.max && open.saturating_mul(4) >= (self.limit as usize) * 3 {
            self.limit = next_limit(self.limit, self.max);
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(self.limit));
        }
        OpenStream(self.open.clone())
    }
}

/// A new agent connection's stream limit: [`INITIAL_STREAMS`], or `max` when that is less than
/// an eighth above it (the one raise left would not be announced).
pub(crate) fn initial_streams(max: u32) -> u32 {
    if max.saturating_sub(INITIAL_STREAMS) <= max / 8 {
        max
    } else {
        INITIAL_STREAMS
    }
}

/// The stream limit after `limit`: doubled, or `max` once a doubling would leave at most an
/// eighth of `max` to go (a raise quinn would not announce, see [`StreamCredit`]).
fn next_limit(limit: u32, max: u32) -> u32 {
    let next = limit.saturating_mul(2).min(max);
    if max - next <= max / 8 {
        max
    } else {
        next
    }
}

async fn accept_flows(shared: &Arc<Shared>, peer: &Arc<Peer>) -> String {
    let mut credit = StreamCredit::new(shared.config.max_streams_per_agent());
    loop {
        match peer.conn.accept_bi().await {
            Ok((s, r)) => {
                let span = info_span!("flow", stream = %r.id());
                let held = credit.opened(&peer.conn);
                let flow = flow::agent_flow(shared.clone(), peer.clone(), s, r);
                shared.flows.spawn(
                    async move {
                        let _held = held;
                        flow.await
                    }
                    .instrument(span),
                );
            }
            Err(e) => return describe_connection_error(&e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connectors

async fn connector(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    send: SendStream,
    recv: FramedRecv,
    rx: mpsc::Receiver<Box<ServerMsg>>,
) -> String {
    tokio::select! {
        why = write_control(send, rx) => why,
        why = connector_control(shared, peer, recv) => why,
        why = report_consumed(peer) => why,
        why = push_goaway(shared, peer) => why,
        why = refuse_streams(peer) => why,
        why = datagrams::relay(shared.clone(), peer.clone(), "to_agent") => why,
        why = expire(shared, peer) => why,
    }
}

/// Registrations and deregistrations. Every offer is kept with its standing under the current
/// policy, so a policy reload can bring back one that was refused (see `reload`).
async fn connector_control(shared: &Shared, peer: &Arc<Peer>, mut recv: FramedRecv) -> String {
    loop {
        let reply = match recv.next::<ClientMsg>().await {
            Ok(None) => {
                debug!("connector closed its control stream");
                close(&peer.conn, codes::OK, "control stream closed");
                return "connector closed its control stream".to_string();
            }
            Ok(Some(ClientMsg::Register { .. } | ClientMsg::Deregister { .. }))
                if !peer.registration_budget.take() =>
            {
                shared
                    .metrics
                    .limit_rejections
                    .with_label_values(&["registrations"])
                    .inc();
                warn!(
                    "connector registers and deregisters services faster than {} a second, closing",
                    crate::registry::REGISTRATIONS_PER_SECOND
                );
                close(&peer.conn, codes::PROTOCOL, "registration changes too fast");
                return "registration changes too fast".to_string();
            }
            Ok(Some(ClientMsg::Register { service, .. }))
                if !shared.registry.offers(&service, peer.conn_id)
                    && shared.registry.offers_of(peer.conn_id)
                        >= crate::registry::MAX_OFFERS_PER_CONNECTION =>
            {
                let reason = format!(
                    "a connection may offer at most {} services",
                    crate::registry::MAX_OFFERS_PER_CONNECTION
                );
                ztna_node::warn_limited!(LIMIT_LOG_EVERY, %service, "registration refused: {reason}");
                ServerMsg::RegisterRejected { service, reason }
            }
            Ok(Some(ClientMsg::Register { service, tcp, udp })) => {
                let allowed = shared.policy().may_serve(&service, &peer.id_str);
                shared.registry.offer(&service, peer, tcp, udp, allowed);
                if allowed {
                    ztna_node::info_limited!(LIMIT_LOG_EVERY, %service, tcp, udp, "service registered");
                    ServerMsg::Registered { service }
                } else {
                    let reason = format!("policy does not allow {} to serve {service}", peer.id);
                    ztna_node::warn_limited!(LIMIT_LOG_EVERY, %service, "registration denied by policy");
                    ServerMsg::RegisterRejected { service, reason }
                }
            }
            Ok(Some(ClientMsg::Deregister { service })) => {
                shared.registry.withdraw(&service, peer.conn_id);
                ztna_node::info_limited!(LIMIT_LOG_EVERY, %service, "service deregistered");
                continue;
            }
            Ok(Some(ClientMsg::DirectAnswer {
                request,
                accepted,
                candidates,
                reason,
            })) => {
                direct::answered(shared, peer, request, accepted, candidates, reason);
                continue;
            }
            Ok(Some(ClientMsg::CreditReports { receive_window })) => {
                if peer.credit.get().is_some() {
                    warn!("second CreditReports, closing");
                    close(&peer.conn, codes::PROTOCOL, "duplicate CreditReports");
                    return "duplicate CreditReports".to_string();
                }
                // Within what the connector can buffer (half of it: a second agent at its
                // budget still leaves room) and within what we were configured to allow.
                let window = shared
                    .config
                    .effective_identity_window()
                    .min(receive_window / 2);
                let budget = ztna_node::credit::SendBudget::new(
                    window,
                    Some(shared.metrics.credit_waits.clone()),
                );
                debug!(
                    window = budget.window(),
                    "connector reports consumption; per-agent flow credit on"
                );
                let _ = peer.credit.set(budget);
                ServerMsg::CreditReports {
                    identity_window: shared.config.effective_identity_window(),
                }
            }
            Ok(Some(ClientMsg::Consumed { flows })) => {
                if let Some(budget) = peer.credit.get() {
                    for (stream, consumed) in flows {
                        budget.credit(stream, consumed);
                    }
                }
                continue;
            }
            Ok(Some(ClientMsg::Renew {
                chain,
                scheme,
                signature,
            })) => renew(shared, peer, chain, scheme, &signature),
            Ok(Some(ClientMsg::Hello { .. })) => {
                warn!("second Hello, closing");
                close(&peer.conn, codes::PROTOCOL, "duplicate Hello");
                return "duplicate Hello".to_string();
            }
            Ok(Some(other)) => {
                warn!(msg = ?other, "unexpected control message from connector, closing");
                close(&peer.conn, codes::PROTOCOL, "unexpected control message");
                return "unexpected control message".to_string();
            }
            Err(e) => return protocol_error(&peer.conn, "control stream", &e),
        };
        if !peer.tell(reply).await {
            return lost(&peer.conn);
        }
    }
}

/// Reports what we read from the connector's flows, so it can budget its agents' downloads.
async fn report_consumed(peer: &Peer) -> String {
    loop {
        let ready = peer.consumed.next_report().await;
        for chunk in ready.chunks(MAX_LIST_LEN) {
            let msg = ServerMsg::Consumed {
                flows: chunk.to_vec(),
            };
            if !peer.tell(msg).await {
                return lost(&peer.conn);
            }
        }
    }
}

async fn push_goaway(shared: &Shared, peer: &Peer) -> String {
    let mut draining = shared.draining.subscribe();
    if draining.wait_for(|d| *d).await.is_err() {
        return std::future::pending().await;
    }
    if !peer.tell(goaway(shared)).await {
        return lost(&peer.conn);
    }
    std::future::pending().await
}

async fn refuse_streams(peer: &Peer) -> String {
    match peer.conn.accept_bi().await {
        Ok(_) => {
            warn!("connector tried to open a flow, closing");
            close(
                &peer.conn,
                codes::UNAUTHORIZED,
                "connectors cannot open flows",
            );
            "connector tried to open a flow".to_string()
        }
        Err(e) => describe_connection_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every raise of an agent's stream limit is one quinn announces at once (it sends
    /// MAX_STREAMS only for a raise of more than an eighth of the new limit), and the limit
    /// reaches `max_flows_per_agent` + 16 for any setting.
    #[test]
    fn every_stream_limit_raise_is_announced_and_the_limit_reaches_its_max() {
        for flows in 1..=20_000u32 {
            let max = flows + 16;
            let mut limit = initial_streams(max);
            let mut steps = 0;
            while limit < max {
                let next = next_limit(limit, max);
                assert!(
                    next - limit > next / 8,
                    "max_flows_per_agent {flows}: {limit} -> {next} would not be announced"
                );
                limit = next;
                steps += 1;
                assert!(steps < 40, "max_flows_per_agent {flows}: no end");
            }
            assert_eq!(limit, max);
        }
        // The default (1000 flows): 28 56 112 224 448 1016.
        let mut seen = vec![INITIAL_STREAMS];
        while *seen.last().unwrap() < 1016 {
            seen.push(next_limit(*seen.last().unwrap(), 1016));
        }
        assert_eq!(seen, [28, 56, 112, 224, 448, 1016]);
    }
}

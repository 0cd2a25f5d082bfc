//! Connection handling: handshake, control sessions, flow relay, datagram relay, drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn::{RecvStream, SendStream, VarInt};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::health::Health;
use ztna_node::identity::{describe_connection_error, peer_id, IdentityError};
use ztna_node::io::{read_frame, read_frame_timeout, splice_quic, write_frame, StreamError};
use ztna_node::ops::Ops;
use ztna_node::{CancellationToken, Identity, SpiffeId};
use ztna_proto::{
    codes, datagram, ClientMsg, FlowOpen, FlowReply, Protocol, RejectReason, Role, ServerMsg,
    ServiceState, PROTOCOL_VERSION,
};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::registry::{lock, Peer, Registry, Route};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const FLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the connector may take to answer a flow open (it includes its backend connect).
const CONNECTOR_REPLY_TIMEOUT: Duration = Duration::from_secs(15);
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on ops_listen {addr}: {source}")]
    Ops {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    config: Config,
    endpoint: quinn::Endpoint,
    health: Health,
    identity: RwLock<SpiffeId>,
    policy: RwLock<Arc<Policy>>,
    registry: Registry,
    metrics: Metrics,
    /// Becomes true when the drain starts; sessions send GoAway on the change.
    draining: watch::Sender<bool>,
    /// Flow opens in progress (header read, connector not yet answered). The drain waits for
    /// these too, so it never closes the endpoint under a flow that is about to be accepted.
    opening: std::sync::atomic::AtomicUsize,
    next_conn_id: AtomicU64,
}

/// Counts a flow open in progress on [`Shared::opening`] while it lives.
struct Opening<'a>(&'a Shared);

impl<'a> Opening<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.opening.fetch_add(1, Ordering::SeqCst);
        Opening(shared)
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A bound intermediate, ready to [`run`](Intermediate::run).
pub struct Intermediate {
    endpoint: quinn::Endpoint,
    ops: Ops,
    shared: Arc<Shared>,
}

/// Control of a running intermediate (reload), usable while [`Intermediate::run`] runs.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new configuration's certificates, CA and policy without touching established
    /// connections: new handshakes use the new certificate and CA, new flows and registrations
    /// the new policy, and registrations the new policy no longer allows are dropped. On error
    /// nothing changes.
    pub fn reload(&self, new: Config) -> Result<String, String> {
        let shared = &self.shared;
        new.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let identity = Identity::load(&new.tls, Role::Intermediate).map_err(|e| e.to_string())?;
        let server = ztna_node::transport::server_config(
            &identity,
            &[Role::Agent, Role::Connector],
            &shared.config.transport(),
        )
        .map_err(|e| e.to_string())?;
        ztna_node::daemon::warn_unapplied(&[
            ("listen", new.listen != shared.config.listen),
            ("ops_listen", new.ops_listen != shared.config.ops_listen),
            (
                "drain_timeout",
                new.drain_timeout != shared.config.drain_timeout,
            ),
            ("keepalive", new.keepalive != shared.config.keepalive),
            (
                "idle_timeout",
                new.idle_timeout != shared.config.idle_timeout,
            ),
            (
                "max_flows_per_agent",
                new.max_flows_per_agent != shared.config.max_flows_per_agent,
            ),
            (
                "reconnect_hint",
                new.reconnect_hint != shared.config.reconnect_hint,
            ),
        ]);
        shared.endpoint.set_server_config(Some(server));
        shared
            .metrics
            .common
            .cert_expiry
            .set(identity.expiry_unix());
        let policy = Arc::new(Policy::new(new.policy));
        let rules = policy.rules().len();
        *shared.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        let dropped = shared
            .registry
            .retain(|service, peer| policy.may_serve(service, &peer.id.to_string()));
        for (service, peer) in &dropped {
            warn!(%service, connector = %peer, "registration no longer allowed by policy, removed");
        }
        // Agents get their service status recomputed under the new policy.
        shared.registry.bump();
        let id = identity.id.to_string();
        *shared.identity.write().unwrap_or_else(|p| p.into_inner()) = identity.id.clone();
        Ok(format!(
            "certificate {id} (expires at unix {:.0}), {rules} policy rules, {} registrations removed",
            identity.expiry_unix(),
            dropped.len()
        ))
    }
}

impl Intermediate {
    /// Loads the identity and binds the QUIC socket. Must be called inside a Tokio runtime.
    pub fn bind(config: Config) -> Result<Intermediate, StartError> {
        let identity = Identity::load(&config.tls, Role::Intermediate)?;
        let server = ztna_node::transport::server_config(
            &identity,
            &[Role::Agent, Role::Connector],
            &config.transport(),
        )?;
        let bind_err = |source| StartError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new(
            ztna_node::transport::restart_aware_endpoint_config(&identity),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Ops {
            addr: config.ops_listen,
            source,
        })?;
        let metrics = Metrics::new();
        metrics.common.cert_expiry.set(identity.expiry_unix());
        metrics
            .drain_timeout
            .set(config.drain_timeout.as_secs_f64());
        // Every service the policy knows shows up at 0 until a connector registers it, so a
        // service that never got a connector alerts like one that lost it.
        for rule in &config.policy {
            metrics
                .service_connectors
                .with_label_values(&[&rule.service]);
        }
        let registry = Registry::new(metrics.service_connectors.clone());
        let policy = Arc::new(Policy::new(config.policy.clone()));
        let health = Health::new(config.idle_timeout.max(Duration::from_secs(5)));
        Ok(Intermediate {
            endpoint: endpoint.clone(),
            ops,
            shared: Arc::new(Shared {
                config,
                endpoint,
                health,
                identity: RwLock::new(identity.id),
                policy: RwLock::new(policy),
                registry,
                metrics,
                draining: watch::Sender::new(false),
                opening: std::sync::atomic::AtomicUsize::new(0),
                next_conn_id: AtomicU64::new(1),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// Address of the ops endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub fn ops_addr(&self) -> std::io::Result<SocketAddr> {
        self.ops.local_addr()
    }

    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled, then drains: refuses new connections, sends GoAway to
    /// every peer, lets flows finish until `drain_timeout`, closes and waits for peers to be told.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let health = shared.health.clone();
        health.set_status("serving: 0 agents, 0 connectors, 0 flows");
        health.set_ready(true);
        let background = ztna_node::ops::start_background(
            self.ops,
            shared.metrics.common.clone(),
            health.clone(),
        );
        tokio::spawn(status_loop(shared.clone(), background.clone()));
        info!(
            listen = %self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            identity = %lock_read(&shared.identity),
            rules = shared.policy().rules().len(),
            "intermediate listening"
        );
        if shared.policy().rules().is_empty() {
            warn!("no [[policy]] rules: every registration and flow will be denied");
        }
        let accept = async {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    incoming = self.endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        tokio::spawn(handle_incoming(shared.clone(), incoming));
                    }
                }
            }
        };
        health.watched("accept loop", accept).await;
        drain(&self.endpoint, &shared).await;
        background.cancel();
    }
}

/// Keeps the operator status line current.
async fn status_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = &shared.metrics;
        let flows: i64 = ["tcp", "udp"]
            .iter()
            .map(|p| m.flows_active.with_label_values(&[p]).get())
            .sum();
        let agents = m.connections.with_label_values(&["agent"]).get();
        let connectors = m.connections.with_label_values(&["connector"]).get();
        let status = if *shared.draining.borrow() {
            format!("draining: {flows} flows left")
        } else {
            format!("serving: {agents} agents, {connectors} connectors, {flows} flows")
        };
        shared.health.set_status(status);
    }
}

async fn drain(endpoint: &quinn::Endpoint, shared: &Shared) {
    {
        let deadline = Instant::now() + shared.config.drain_timeout;
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
        loop {
            let active: i64 = ["tcp", "udp"]
                .iter()
                .map(|p| shared.metrics.flows_active.with_label_values(&[p]).get())
                .sum::<i64>()
                + shared.opening.load(Ordering::SeqCst) as i64;
            if active == 0 {
                info!("drain complete: no flows left");
                break;
            }
            if Instant::now() >= deadline {
                warn!(active, "drain timeout reached, closing remaining flows");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        endpoint.close(VarInt::from_u32(codes::DRAINING), b"intermediate drained");
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        refuser.abort();
        shared.metrics.draining.set(0);
        shared.metrics.drain_started.set(0.0);
        info!("intermediate stopped");
    }
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn handle_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
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
            warn!(%remote, result, reason = %describe_connection_error(&e), "handshake refused");
            return;
        }
        Err(_) => {
            handshakes.with_label_values(&["failed"]).inc();
            warn!(%remote, "handshake timed out");
            return;
        }
    };
    let Some(id) = peer_id(&conn) else {
        handshakes.with_label_values(&["unauthorized"]).inc();
        close(&conn, codes::UNAUTHORIZED, "no SPIFFE identity");
        return;
    };
    handshakes.with_label_values(&["ok"]).inc();
    let span = info_span!("peer", peer = %id, addr = %remote);
    session(shared, conn, id).instrument(span).await;
}

async fn session(shared: Arc<Shared>, conn: quinn::Connection, id: SpiffeId) {
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
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
    let hello = match read_frame_timeout::<ClientMsg>(&mut recv, HELLO_TIMEOUT).await {
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
    if role != id.role {
        let reason = format!(
            "hello says role {role} but the certificate says {}",
            id.role
        );
        warn!(%reason, "refusing peer");
        refuse(&conn, &mut send, codes::UNAUTHORIZED, &reason).await;
        return;
    }
    let welcome = ServerMsg::Welcome {
        version: PROTOCOL_VERSION,
        identity: id.to_string(),
        observed_addr: ztna_node::transport::canonical(conn.remote_address()),
    };
    if write_frame(&mut send, &welcome).await.is_err() {
        return;
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let peer = Arc::new(Peer::new(conn.clone(), id, conn_id));
    let gauge = shared
        .metrics
        .connections
        .with_label_values(&[role.as_str()]);
    gauge.inc();
    info!(%software, "{role} connected");
    match role {
        Role::Agent => agent_session(&shared, &peer, send, recv, watch).await,
        Role::Connector => connector_session(&shared, &peer, send, recv).await,
        Role::Intermediate => close(&conn, codes::UNAUTHORIZED, "intermediates do not peer"),
    }
    gauge.dec();
    let gone = shared.registry.remove_peer(conn_id);
    lock(&peer.routes).clear();
    let reason = conn
        .close_reason()
        .map(|e| describe_connection_error(&e))
        .unwrap_or_default();
    info!(services = ?gone, %reason, "{role} disconnected");
}

async fn refuse(conn: &quinn::Connection, send: &mut SendStream, code: u32, reason: &str) {
    let msg = ServerMsg::Refused {
        reason: reason.to_string(),
    };
    send_then_close(conn, send, &msg, code, reason).await;
}

/// Sends a last control message, then closes the connection once the peer has it (or after a
/// short grace period), so the peer can log our reason.
async fn send_then_close(
    conn: &quinn::Connection,
    send: &mut SendStream,
    msg: &ServerMsg,
    code: u32,
    reason: &str,
) {
    let _ = write_frame(send, msg).await;
    let _ = send.finish();
    // Give the frame a moment to arrive before the close overtakes it.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    close(conn, code, reason);
}

/// Availability of `service` as seen by `agent`, with the reason.
fn status_for(shared: &Shared, service: &str, agent: &SpiffeId) -> (ServiceState, String) {
    if !shared.policy().may_reach(service, &agent.to_string()) {
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

async fn agent_session(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    mut send: SendStream,
    mut recv: RecvStream,
    watch: Vec<String>,
) {
    let conn = &peer.conn;
    let mut changes = shared.registry.subscribe();
    let mut draining = shared.draining.subscribe();
    let mut last: std::collections::HashMap<String, ServiceState> = Default::default();
    let mut rtt = tokio::time::interval(RTT_SAMPLE_INTERVAL);
    let rtt_hist = shared.metrics.rtt("agent");
    let datagrams = relay_datagrams(shared.clone(), peer.clone(), "to_connector");
    tokio::pin!(datagrams);
    let mut control_open = true;
    let mut goaway_sent = false;
    let mut push_status = true;
    loop {
        if push_status {
            push_status = false;
            for service in &watch {
                let (state, reason) = status_for(shared, service, &peer.id);
                if last.get(service) != Some(&state) {
                    last.insert(service.clone(), state);
                    let msg = ServerMsg::ServiceStatus {
                        service: service.clone(),
                        state,
                        reason,
                    };
                    if write_frame(&mut send, &msg).await.is_err() {
                        return;
                    }
                }
            }
        }
        if *draining.borrow_and_update() && !goaway_sent {
            goaway_sent = true;
            let _ = write_frame(&mut send, &goaway(shared)).await;
        }
        tokio::select! {
            _ = changes.changed() => push_status = true,
            _ = draining.changed() => {}
            _ = rtt.tick() => rtt_hist.observe(conn.rtt().as_secs_f64()),
            () = &mut datagrams => return,
            msg = read_frame::<ClientMsg>(&mut recv), if control_open => match msg {
                Ok(None) => control_open = false,
                Ok(Some(ClientMsg::Register { service, .. })) => {
                    warn!(%service, "agent tried to register a service, closing");
                    let reason = "agents cannot register services".to_string();
                    let msg = ServerMsg::RegisterRejected { service, reason: reason.clone() };
                    send_then_close(conn, &mut send, &msg, codes::UNAUTHORIZED, &reason).await;
                    return;
                }
                Ok(Some(other)) => {
                    warn!(msg = ?other, "unexpected control message from agent, closing");
                    close(conn, codes::PROTOCOL, "unexpected control message");
                    return;
                }
                Err(e) => {
                    protocol_error(conn, "control stream", &e);
                    return;
                }
            },
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let span = info_span!("flow", stream = %r.id());
                    tokio::spawn(agent_flow(shared.clone(), peer.clone(), s, r).instrument(span));
                }
                Err(_) => return,
            },
        }
    }
}

fn goaway(shared: &Shared) -> ServerMsg {
    ServerMsg::GoAway {
        reason: "intermediate is draining".to_string(),
        deadline_ms: shared.config.drain_timeout.as_millis() as u64,
        reconnect: shared.config.reconnect_hint.clone(),
    }
}

fn protocol_error(conn: &quinn::Connection, what: &str, e: &StreamError) {
    match e {
        StreamError::Frame(_) => {
            warn!(error = %e, "protocol violation on {what}, closing connection");
            close(conn, codes::PROTOCOL, &format!("{what}: {e}"));
        }
        _ => debug!(error = %e, "{what} ended"),
    }
}

async fn connector_session(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let conn = &peer.conn;
    let mut draining = shared.draining.subscribe();
    let mut rtt = tokio::time::interval(RTT_SAMPLE_INTERVAL);
    let rtt_hist = shared.metrics.rtt("connector");
    let datagrams = relay_datagrams(shared.clone(), peer.clone(), "to_agent");
    tokio::pin!(datagrams);
    let mut goaway_sent = false;
    loop {
        if *draining.borrow_and_update() && !goaway_sent {
            goaway_sent = true;
            let _ = write_frame(&mut send, &goaway(shared)).await;
        }
        tokio::select! {
            _ = draining.changed() => {}
            _ = rtt.tick() => rtt_hist.observe(conn.rtt().as_secs_f64()),
            () = &mut datagrams => return,
            msg = read_frame::<ClientMsg>(&mut recv) => {
                let reply = match msg {
                    Ok(None) => {
                        debug!("connector closed its control stream");
                        close(conn, codes::OK, "control stream closed");
                        return;
                    }
                    Ok(Some(ClientMsg::Register { service, tcp, udp })) => {
                        if shared.policy().may_serve(&service, &peer.id.to_string()) {
                            shared.registry.register(&service, peer, tcp, udp);
                            info!(%service, tcp, udp, "service registered");
                            ServerMsg::Registered { service }
                        } else {
                            let reason = format!("policy does not allow {} to serve {service}", peer.id);
                            warn!(%service, "registration denied by policy");
                            ServerMsg::RegisterRejected { service, reason }
                        }
                    }
                    Ok(Some(ClientMsg::Deregister { service })) => {
                        shared.registry.deregister(&service, peer.conn_id);
                        info!(%service, "service deregistered");
                        continue;
                    }
                    Ok(Some(ClientMsg::Hello { .. })) => {
                        warn!("second Hello, closing");
                        close(conn, codes::PROTOCOL, "duplicate Hello");
                        return;
                    }
                    Err(e) => {
                        protocol_error(conn, "control stream", &e);
                        return;
                    }
                };
                if write_frame(&mut send, &reply).await.is_err() {
                    return;
                }
            }
            stream = conn.accept_bi() => {
                if stream.is_ok() {
                    warn!("connector tried to open a flow, closing");
                    close(conn, codes::UNAUTHORIZED, "connectors cannot open flows");
                }
                return;
            }
        }
    }
}

struct FlowGuard<'a> {
    shared: &'a Shared,
    protocol: Protocol,
    peers: [Arc<Peer>; 2],
}

impl<'a> FlowGuard<'a> {
    fn new(shared: &'a Shared, protocol: Protocol, peers: [Arc<Peer>; 2]) -> Self {
        shared
            .metrics
            .flows_active
            .with_label_values(&[protocol.as_str()])
            .inc();
        for p in &peers {
            p.active_flows.fetch_add(1, Ordering::Relaxed);
        }
        FlowGuard {
            shared,
            protocol,
            peers,
        }
    }
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .metrics
            .flows_active
            .with_label_values(&[self.protocol.as_str()])
            .dec();
        for p in &self.peers {
            p.active_flows.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

async fn agent_flow(
    shared: Arc<Shared>,
    agent: Arc<Peer>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let open = match read_frame_timeout::<FlowOpen>(&mut recv, FLOW_HEADER_TIMEOUT).await {
        Ok(o) => o,
        Err(e) => {
            protocol_error(&agent.conn, "flow header", &e);
            let _ = send.reset(VarInt::from_u32(e.code()));
            return;
        }
    };
    let FlowOpen {
        service,
        protocol,
        flow_id,
    } = open;
    let span = info_span!("open", %service, %protocol);
    async move {
        let opening = Opening::new(&shared);
        let flows = &shared.metrics.flows;
        if !shared.policy().may_reach(&service, &agent.id.to_string()) {
            let msg = format!("policy does not allow {} to reach {service}", agent.id);
            return reject_flow(flows, &mut send, protocol, RejectReason::Denied, msg).await;
        }
        let limit = shared.config.max_flows_per_agent as usize;
        if agent.active_flows.load(Ordering::Relaxed) >= limit {
            let msg = format!("this agent already has {limit} flows open (max_flows_per_agent)");
            return reject_flow(flows, &mut send, protocol, RejectReason::Limit, msg).await;
        }
        if protocol == Protocol::Udp && agent.routes().contains_key(&flow_id) {
            let msg = format!("UDP flow id {flow_id} is already in use on this connection");
            return reject_flow(flows, &mut send, protocol, RejectReason::BadRequest, msg).await;
        }
        // Try connectors least-loaded first; one that vanished or stalls is skipped.
        let mut chosen = None;
        for c in shared.registry.candidates(&service, protocol) {
            let c_flow_id = if protocol == Protocol::Udp { c.alloc_flow_id() } else { 0 };
            match open_at_connector(&c, &service, protocol, c_flow_id).await {
                Ok((cs, cr, reply)) => {
                    chosen = Some((c, c_flow_id, cs, cr, reply));
                    break;
                }
                Err(e) => debug!(connector = %c.id, error = %e, "connector did not take the flow, trying next"),
            }
        }
        let Some((connector, c_flow_id, mut c_send, mut c_recv, reply)) = chosen else {
            if *shared.draining.borrow() {
                // The connectors are leaving because we are: the agent should retry this flow on
                // another intermediate rather than fail it.
                let msg = "intermediate is draining; open the flow on another intermediate".to_string();
                return reject_flow(flows, &mut send, protocol, RejectReason::Draining, msg).await;
            }
            let msg = format!("no connector is serving {service} over {protocol}");
            return reject_flow(flows, &mut send, protocol, RejectReason::Unavailable, msg).await;
        };
        if let FlowReply::Reject { reason, message } = reply {
            return reject_flow(flows, &mut send, protocol, reason, message).await;
        }
        if protocol == Protocol::Udp {
            agent.routes().insert(flow_id, Route { peer: connector.clone(), flow_id: c_flow_id });
            connector.routes().insert(c_flow_id, Route { peer: agent.clone(), flow_id });
        }
        // Count the flow before the agent hears Accept: from then on data can flow, and the
        // least-loaded choice and the gauges must already see it.
        let guard = FlowGuard::new(&shared, protocol, [agent.clone(), connector.clone()]);
        drop(opening);
        if write_frame(&mut send, &FlowReply::Accept).await.is_err() {
            let _ = c_send.reset(VarInt::from_u32(codes::FLOW_ABORTED));
        } else {
            flows.with_label_values(&[protocol.as_str(), "ok"]).inc();
            debug!(connector = %connector.id, "flow accepted");
            let up = shared.metrics.bytes(protocol.as_str(), "to_connector");
            let down = shared.metrics.bytes(protocol.as_str(), "to_agent");
            let stats = splice_quic((&mut send, &mut recv), (&mut c_send, &mut c_recv), Some(&up), Some(&down)).await;
            debug!(up = stats.forward, down = stats.backward, aborted = stats.aborted, "flow ended");
        }
        drop(guard);
        if protocol == Protocol::Udp {
            agent.routes().remove(&flow_id);
            connector.routes().remove(&c_flow_id);
        }
    }
    .instrument(span)
    .await
}

async fn reject_flow(
    flows: &prometheus::IntCounterVec,
    send: &mut SendStream,
    protocol: Protocol,
    reason: RejectReason,
    message: String,
) {
    flows
        .with_label_values(&[protocol.as_str(), reason.outcome()])
        .inc();
    info!(reason = reason.as_str(), %message, "flow rejected");
    let _ = write_frame(send, &FlowReply::Reject { reason, message }).await;
    let _ = send.finish();
}

async fn open_at_connector(
    c: &Peer,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
) -> Result<(SendStream, RecvStream, FlowReply), StreamError> {
    let (mut s, mut r) = c.conn.open_bi().await.map_err(|_| StreamError::Closed)?;
    write_frame(
        &mut s,
        &FlowOpen {
            service: service.to_string(),
            protocol,
            flow_id,
        },
    )
    .await?;
    let reply = read_frame_timeout::<FlowReply>(&mut r, CONNECTOR_REPLY_TIMEOUT).await;
    match reply {
        Ok(reply) => Ok((s, r, reply)),
        Err(e) => {
            let _ = s.reset(VarInt::from_u32(codes::FLOW_ABORTED));
            Err(e)
        }
    }
}

/// Relays this peer's datagrams to the peer its flow is routed to, rewriting the flow id.
async fn relay_datagrams(shared: Arc<Shared>, peer: Arc<Peer>, direction: &'static str) {
    let m = &shared.metrics;
    let bytes = m.bytes("udp", direction);
    let drop_unknown = m.datagrams_dropped.with_label_values(&["unknown_flow"]);
    let drop_large = m.datagrams_dropped.with_label_values(&["too_large"]);
    let drop_gone = m.datagrams_dropped.with_label_values(&["peer_gone"]);
    let drop_malformed = m.datagrams_dropped.with_label_values(&["malformed"]);
    let mut arena = BytesMut::new();
    loop {
        let Ok(d) = peer.conn.read_datagram().await else {
            return;
        };
        let Ok((id, payload)) = datagram::decode(&d) else {
            drop_malformed.inc();
            continue;
        };
        let Some(route) = peer.routes().get(&id).cloned() else {
            drop_unknown.inc();
            continue;
        };
        let Ok(out) = datagram::encode_into(&mut arena, route.flow_id, &payload) else {
            drop_malformed.inc();
            continue;
        };
        match route.peer.conn.send_datagram(out) {
            Ok(()) => bytes.inc_by(payload.len() as u64),
            Err(quinn::SendDatagramError::TooLarge) => drop_large.inc(),
            Err(_) => drop_gone.inc(),
        }
    }
}

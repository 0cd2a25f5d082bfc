//! Flows from an intermediate to the backends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tracing::debug;
use ztna_node::clock::Activity;
use ztna_node::credit::{FlowCredit, Meter, SendBudget};
use ztna_node::datagram::{self as dg, Sent};
use ztna_node::flows::{FlowGuard, Kind};
use ztna_node::io::{
    prepare_tcp, splice_tcp, write_frame, write_raw_frames, FramedRecv, SpliceCtl, FRAME_BATCH,
};
use ztna_proto::{datagram, varint, FlowAgent, FlowOpen, FlowReply, Protocol, RejectReason};

use crate::backend::{connect_tcp, open_udp, Backend, UdpBackend};
use crate::{FlowMeta, Shared};

const FLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload we can receive.
const MAX_UDP: usize = 65_535;
/// Socket buffers of each backend-facing UDP socket: room for a burst at line rate.
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

const REJECT_LOG_EVERY: Duration = Duration::from_secs(1);
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// How long a flow waits for the intermediate's answer to our `CreditReports` (it is sent
/// before the intermediate routes us any flow, so it is normally there already).
const CREDIT_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Per-connection state: the UDP flows whose datagrams arrive on this connection.
pub(crate) struct ConnState {
    pub conn: quinn::Connection,
    /// Its datagram send buffer, shared fairly by the UDP flows on it.
    pub fair: dg::Fair,
    udp: Mutex<HashMap<u64, UdpFlow>>,
    /// Flow credit with an intermediate of protocol revision 2 or later (not on direct paths).
    pub credit: Option<ConnCredit>,
    /// A direct (P2P) connection from an agent: its flows also count in `direct_flows`.
    pub direct: bool,
    /// Flows running on this connection (see [`ConnState::flow_started`]).
    pub users: ztna_node::rotation::Users,
}

/// Held by a flow's task while it runs on a connection.
pub(crate) struct OnConn(Arc<ConnState>);

impl Drop for OnConn {
    fn drop(&mut self) {
        self.0.users.remove();
    }
}

/// Flow credit on a connection to an intermediate: what we read from its flows (reported on
/// the control stream) and the per-agent budget of what we send it (from its answer).
pub(crate) struct ConnCredit {
    pub consumed: Arc<Meter>,
    pub budget: tokio::sync::watch::Sender<Option<Arc<SendBudget>>>,
}

impl ConnCredit {
    /// The per-agent budget, once the intermediate answered (`None` if it did not in time:
    /// the flow then goes unbudgeted rather than failing).
    async fn budget(&self) -> Option<Arc<SendBudget>> {
        let mut rx = self.budget.subscribe();
        let got = tokio::time::timeout(CREDIT_ANSWER_WAIT, rx.wait_for(|b| b.is_some())).await;
        match got {
            Ok(Ok(b)) => b.clone(),
            _ => None,
        }
    }
}

struct UdpFlow {
    backend: Arc<UdpBackend>,
    service: Arc<str>,
    activity: Activity,
    /// Resolved once per flow, so the per-datagram path does no label lookup.
    to_backend: prometheus::IntCounter,
    backend_errors: prometheus::IntCounter,
}

impl ConnState {
    pub fn new(conn: quinn::Connection) -> ConnState {
        ConnState {
            fair: dg::Fair::new(&conn),
            conn,
            udp: Mutex::new(HashMap::new()),
            credit: None,
            direct: false,
            users: Default::default(),
        }
    }

    /// Counts a flow on this connection until the returned guard is dropped.
    pub fn flow_started(self: &Arc<Self>) -> OnConn {
        self.users.add();
        OnConn(self.clone())
    }

    /// A direct (P2P) connection from an agent.
    pub fn direct(conn: quinn::Connection) -> ConnState {
        ConnState {
            direct: true,
            ..ConnState::new(conn)
        }
    }

    /// A connection to an intermediate that takes consumption reports (revision 2).
    pub fn with_credit(conn: quinn::Connection) -> ConnState {
        ConnState {
            credit: Some(ConnCredit {
                consumed: Meter::new(),
                budget: tokio::sync::watch::channel(None).0,
            }),
            ..ConnState::new(conn)
        }
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UdpFlow>> {
        ztna_node::lock(&self.udp)
    }
}

/// A datagram from the intermediate: send its payload to the flow's backend. The payload is a
/// slice of the received buffer; nothing is allocated.
pub(crate) fn dispatch(shared: &Shared, state: &ConnState, d: &Bytes) {
    let m = &shared.metrics;
    let Ok((id, payload)) = datagram::decode(d) else {
        m.udp_dropped.with_label_values(&["malformed"]).inc();
        ztna_node::warn_limited!(
            DROP_LOG_EVERY,
            size = d.len(),
            "UDP datagram dropped: malformed (no valid flow id)"
        );
        return;
    };
    let flows = state.flows();
    let Some(flow) = flows.get(&id) else {
        m.udp_dropped.with_label_values(&["unknown_flow"]).inc();
        ztna_node::warn_limited!(
            DROP_LOG_EVERY,
            flow = id,
            "UDP datagram dropped: no such flow (it ended, or never existed)"
        );
        return;
    };
    flow.activity.touch();
    to_backend(shared, flow, &payload);
}

fn to_backend(shared: &Shared, flow: &UdpFlow, payload: &[u8]) {
    match flow.backend.socket.try_send(payload) {
        Ok(n) => flow.to_backend.inc_by(n as u64),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            shared
                .metrics
                .udp_dropped
                .with_label_values(&["backend_busy"])
                .inc();
            ztna_node::warn_limited!(DROP_LOG_EVERY, service = %flow.service, "UDP datagram to the backend dropped: socket buffer full");
        }
        Err(e) => {
            flow.backend_errors.inc();
            shared
                .metrics
                .udp_dropped
                .with_label_values(&["backend_error"])
                .inc();
            ztna_node::warn_limited!(DROP_LOG_EVERY, service = %flow.service, error = %e, "UDP datagram to the backend dropped: send failed");
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                // An earlier datagram was refused by the backend's host (ICMP).
                moved(&flow.service, &flow.backend, flow.backend.addr());
            }
        }
    }
}

/// After the backend's host refused a datagram sent to `refused`: the flow moves to the
/// backend's next address, if it has one (see [`UdpBackend::refused`]).
fn moved(service: &str, backend: &UdpBackend, refused: SocketAddr) {
    if let Some(next) = backend.refused(refused) {
        ztna_node::warn_limited!(DROP_LOG_EVERY, %service, from = %refused, to = %next, "the backend's host refused the UDP flow's datagrams: it moves to the backend's next address");
    }
}

async fn reject(
    shared: &Shared,
    mut send: SendStream,
    open: &FlowOpen,
    reason: RejectReason,
    why: String,
) {
    ztna_node::info_limited!(REJECT_LOG_EVERY, service = %open.service, protocol = %open.protocol, reason = reason.as_str(), why = %why, "flow rejected");
    if shared.services.contains_key(&open.service) {
        shared
            .metrics
            .flows
            .with_label_values(&[&open.service, open.protocol.as_str(), "error"])
            .inc();
    }
    let _ = write_frame(
        &mut send,
        &FlowReply::Reject {
            reason,
            message: why,
        },
    )
    .await;
    let _ = send.finish();
}

/// On a direct path: why no ticket allows a flow to `service` now (counted), if none does.
fn unticketed(
    shared: &Shared,
    direct: &Option<Arc<crate::direct::DirectPath>>,
    service: &str,
) -> Option<String> {
    let (label, why) = direct.as_ref()?.auth.allows(service).err()?;
    shared
        .metrics
        .direct_refused
        .with_label_values(&[label])
        .inc();
    Some(why)
}

/// One flow stream from an intermediate, or from an agent on a direct path (`direct`: what its
/// ticket allows).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    mut send: SendStream,
    recv: RecvStream,
    direct: Option<Arc<crate::direct::DirectPath>>,
) {
    let mut recv = FramedRecv::new(recv);
    let open = match recv.expect::<FlowOpen>(FLOW_HEADER_TIMEOUT).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "bad flow header from intermediate");
            let _ = send.reset(VarInt::from_u32(e.code()));
            return;
        }
    };
    // On a connection with flow credit the intermediate names the flow's agent next.
    let mut agent: Option<Arc<str>> = None;
    if direct.is_none() && state.credit.is_some() {
        match recv.expect::<FlowAgent>(FLOW_HEADER_TIMEOUT).await {
            Ok(a) => agent = Some(Arc::from(a.agent)),
            Err(e) => {
                tracing::warn!(error = %e, "bad flow agent frame from intermediate");
                let _ = send.reset(VarInt::from_u32(e.code()));
                return;
            }
        }
    }
    if let Some(why) = unticketed(&shared, &direct, &open.service) {
        return reject(&shared, send, &open, RejectReason::Denied, why).await;
    }
    let Some(svc) = shared.services.get(&open.service) else {
        let why = format!("this connector does not serve {:?}", open.service);
        return reject(&shared, send, &open, RejectReason::BadRequest, why).await;
    };
    let backend = match open.protocol {
        Protocol::Tcp => svc.tcp.clone(),
        Protocol::Udp => svc.udp.clone(),
    };
    let Some(backend) = backend else {
        let why = format!("service {} has no {} backend", open.service, open.protocol);
        return reject(&shared, send, &open, RejectReason::BadRequest, why).await;
    };
    if shared.is_draining() {
        let why = "connector is draining; use another connector".to_string();
        return reject(&shared, send, &open, RejectReason::Draining, why).await;
    }
    let meta = FlowMeta {
        service: Arc::from(open.service.as_str()),
        direct: direct.as_ref().map(|p| p.of.clone()),
    };
    let (max, per_agent) = (
        shared.max_flows,
        shared.config.max_direct_flows_per_agent as usize,
    );
    let agent_of = direct.as_ref().map(|p| p.of.agent.clone());
    let guard = match shared.flows.register_if(meta, Kind::Opening, |flows| {
        let (mut all, mut agents_n) = (0, 0);
        for e in flows {
            all += 1;
            if let (Some(a), Some(d)) = (&agent_of, &e.meta.direct) {
                if d.agent == *a {
                    agents_n += 1;
                }
            }
        }
        if all >= max {
            Err(format!("connector is at its flow limit ({max}, max_flows)"))
        } else if agent_of.is_some() && agents_n >= per_agent {
            Err(format!(
                "the agent has {per_agent} direct flows at this connector \
                 (max_direct_flows_per_agent)"
            ))
        } else {
            Ok(())
        }
    }) {
        Ok(g) => g,
        Err(why) => {
            if direct.is_some() {
                shared
                    .metrics
                    .direct_refused
                    .with_label_values(&["flow_limit"])
                    .inc();
            }
            return reject(&shared, send, &open, RejectReason::Limit, why).await;
        }
    };
    // Registered before this check, so a ticket lapsing in between ends the flow with the others.
    if let Some(why) = unticketed(&shared, &direct, &open.service) {
        drop(guard);
        return reject(&shared, send, &open, RejectReason::Denied, why).await;
    }
    match open.protocol {
        Protocol::Tcp => {
            let credit = (&*state, agent);
            tcp_flow(&shared, guard, send, recv, &open, &backend, credit).await
        }
        Protocol::Udp => udp_flow(&shared, &state, guard, send, recv, &open, &backend).await,
    }
}

async fn tcp_flow(
    shared: &Shared,
    mut guard: FlowGuard<FlowMeta>,
    mut send: SendStream,
    recv: FramedRecv,
    open: &FlowOpen,
    backend: &Backend,
    (state, agent): (&ConnState, Option<Arc<str>>),
) {
    let service = open.service.as_str();
    let limit = shared.config.connect_timeout;
    let tcp = match connect_tcp(&shared.resolver, backend, service, limit).await {
        Ok((t, _)) => t,
        Err(why) => {
            shared
                .metrics
                .backend_errors
                .with_label_values(&[service])
                .inc();
            return reject(shared, send, open, RejectReason::BackendUnreachable, why).await;
        }
    };
    // If this process dies, the backend sees a reset, never a clean end of a truncated stream.
    prepare_tcp(&tcp);
    guard.set_kind(Kind::Tcp);
    let m = &shared.metrics;
    // Counted before Accept goes out, so a drain never misses a flow that is about to carry data.
    guard.count_in(m.flows_active.with_label_values(&[service, "tcp"]));
    if write_frame(&mut send, &FlowReply::Accept).await.is_err() {
        return;
    }
    m.flows.with_label_values(&[service, "tcp", "ok"]).inc();
    if state.direct {
        m.direct_flows.with_label_values(&[service, "tcp"]).inc();
    }
    let to_agent = m.bytes.with_label_values(&[service, "to_agent"]);
    let to_backend = m.bytes.with_label_values(&[service, "to_backend"]);
    let ctl = SpliceCtl::for_flow(&guard, Some(shared.config.tcp_idle_timeout));
    let (mut recv, prefix) = recv.into_parts();
    // Flow credit: this agents_n unconsumed bytes at the intermediate stay within its budget,
    // and what we read is reported back.
    let stream = u64::from(send.id());
    let (mut gate, mut meter) = (None, None);
    if let (Some(c), Some(agent)) = (&state.credit, &agent) {
        gate = c.budget().await.map(|b| b.open(stream, agent));
        meter = Some(c.consumed.flow(stream));
    }
    let credit = FlowCredit {
        send: gate.as_ref(),
        recv: meter.as_ref(),
    };
    let stats = splice_tcp(
        tcp,
        &mut send,
        &mut recv,
        prefix,
        Some(&to_agent),
        Some(&to_backend),
        &ctl,
        credit,
    )
    .await;
    debug!(%service, agent = agent.as_deref().unwrap_or("-"), to_agent = stats.forward, to_backend = stats.backward, end = ?stats.end, "tcp flow ended");
}

async fn udp_flow(
    shared: &Shared,
    state: &Arc<ConnState>,
    mut guard: FlowGuard<FlowMeta>,
    mut send: SendStream,
    mut recv: FramedRecv,
    open: &FlowOpen,
    backend: &Backend,
) {
    let service: Arc<str> = Arc::from(open.service.as_str());
    let m = &shared.metrics;
    // A *connected* socket: the kernel drops datagrams from any address but the backend.
    let opened = open_udp(
        &shared.resolver,
        backend,
        &service,
        shared.config.connect_timeout,
        UDP_SOCKET_BUFFER,
    )
    .await;
    let backend = match opened {
        Ok(b) => Arc::new(b),
        Err(why) => {
            m.backend_errors.with_label_values(&[&service]).inc();
            return reject(shared, send, open, RejectReason::BackendUnreachable, why).await;
        }
    };
    let inserted = {
        let mut flows = state.flows();
        match flows.entry(open.flow_id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(UdpFlow {
                    backend: backend.clone(),
                    service: service.clone(),
                    activity: guard.activity.clone(),
                    to_backend: m.bytes.with_label_values(&[&service, "to_backend"]),
                    backend_errors: m.backend_errors.with_label_values(&[&service]),
                });
                true
            }
        }
    };
    if !inserted {
        let why = format!("UDP flow id {} already in use", open.flow_id);
        return reject(shared, send, open, RejectReason::BadRequest, why).await;
    }
    guard.set_kind(Kind::Udp);
    guard.count_in(m.flows_active.with_label_values(&[&service, "udp"]));
    if write_frame(&mut send, &FlowReply::Accept).await.is_ok() {
        m.flows.with_label_values(&[&service, "udp", "ok"]).inc();
        if state.direct {
            m.direct_flows.with_label_values(&[&service, "udp"]).inc();
        }
        let idle = shared.config.udp_idle_timeout;
        let ended = {
            let reader = backend_reader(
                shared,
                state,
                &backend,
                open.flow_id,
                &service,
                &guard.activity,
                &mut send,
            );
            // Payloads too large for a datagram arrive on the stream; its end is the flow's end.
            let carried = m
                .udp_stream_carried
                .with_label_values(&[&service, "to_backend"]);
            let from_agent = async {
                loop {
                    match recv.next_frame().await {
                        Ok(Some(p)) => {
                            guard.activity.touch();
                            carried.inc();
                            if let Some(f) = state.flows().get(&open.flow_id) {
                                to_backend(shared, f, &p);
                            }
                        }
                        _ => return,
                    }
                }
            };
            tokio::select! {
                _ = reader => None,
                _ = from_agent => None,
                _ = guard.activity.idle_out(idle) => {
                    debug!(%service, "udp flow idle, closing");
                    None
                }
                _ = guard.cancel.cancelled() => Some(guard.code.get()),
            }
        };
        match ended {
            Some(code) => {
                let _ = send.reset(VarInt::from_u32(code));
            }
            None => {
                let _ = send.finish();
            }
        }
    }
    state.flows().remove(&open.flow_id);
}

/// Reads the flow's backend socket and sends each datagram to the intermediate; one too large
/// for a datagram on the path goes on the flow's stream.
///
/// One arena per flow: the header is written once per datagram, the payload is received
/// straight behind it, and the frozen result is handed to quinn without a copy or an allocation
/// (the arena is refilled a chunk at a time). Anything not from `backend` is refused and counted.
#[allow(clippy::too_many_arguments)]
async fn backend_reader(
    shared: &Shared,
    state: &ConnState,
    backend: &UdpBackend,
    flow_id: u64,
    service: &str,
    activity: &Activity,
    send: &mut SendStream,
) {
    let m = &shared.metrics;
    let socket = &backend.socket;
    let rejected = m.udp_rejected.with_label_values(&[service]);
    let to_agent = m.bytes.with_label_values(&[service, "to_agent"]);
    let carried = m
        .udp_stream_carried
        .with_label_values(&[service, "to_agent"]);
    let dropped = |r: &str| m.udp_dropped.with_label_values(&[r]);
    let (drop_full, drop_gone) = (dropped("send_buffer_full"), dropped("peer_gone"));
    let drop_refused = dropped("backend_error");
    let overflowed = dropped("socket_overflow");
    ztna_node::udp::report_overflows(socket);
    let mut overflows = ztna_node::udp::OverflowCounter::default();
    let mut hdr = [0u8; datagram::MAX_HEADER_LEN];
    let Ok(hdr_len) = varint::encode(flow_id, &mut hdr) else {
        return;
    };
    let mut arena = BytesMut::new();
    // This flow's share of the connection's datagram send buffer.
    let meter = dg::FlowMeter::default();
    // Payloads too large for a datagram, gathered while more datagrams are ready at once, then
    // written to the stream together.
    // Counted once written.
    let mut batch: Vec<Bytes> = Vec::with_capacity(FRAME_BATCH);
    // Reads since the batch's first payload: at most FRAME_BATCH before it goes out, whatever
    // they bring (datagram-sized ones too), so a payload is not held back behind a steady flow.
    let mut reads = 0;
    loop {
        datagram::reserve(&mut arena, hdr_len + MAX_UDP);
        arena.extend_from_slice(&hdr[..hdr_len]);
        let got = if batch.is_empty() {
            ztna_node::udp::recv_buf_from(socket, &mut arena).await
        } else {
            // A non-blocking read is not budgeted by tokio: this keeps the task yielding.
            tokio::task::coop::consume_budget().await;
            reads += 1;
            ztna_node::udp::try_recv_buf_from(socket, &mut arena)
        };
        let flush = !batch.is_empty() && (got.is_err() || reads >= FRAME_BATCH);
        if flush {
            // Nothing more ready, enough gathered, or an error to handle below: out they go.
            let (payloads, bytes) = (batch.len(), batch.iter().map(|b| b.len()).sum::<usize>());
            if write_raw_frames(send, &mut batch).await.is_err() {
                return;
            }
            carried.inc_by(payloads as u64);
            to_agent.inc_by(bytes as u64);
            reads = 0;
            if matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                arena.clear();
                continue;
            }
        }
        let (n, from) = match got {
            Ok(r) => {
                let lost = overflows.delta(r.overflows);
                if lost > 0 {
                    overflowed.inc_by(lost);
                    ztna_node::warn_limited!(DROP_LOG_EVERY, %service, lost, "the kernel dropped UDP datagrams from the backend: the socket's receive buffer was full (raise net.core.rmem_max)");
                }
                (r.len, r.from)
            }
            Err(e) => {
                m.backend_errors.with_label_values(&[service]).inc();
                arena.clear();
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    // The backend's host refused a datagram we sent (ICMP port unreachable: no
                    // one listens there now). The kernel reports it on whichever call comes
                    // next, usually this read rather than a send, so it is counted here as a
                    // drop like a failed send. The flow stays: it moves to the backend's next
                    // address of the same family if it has one, round robin; otherwise a
                    // backend that comes back gets the flow's next datagrams.
                    drop_refused.inc();
                    let refused = backend.addr();
                    ztna_node::warn_limited!(DROP_LOG_EVERY, %service, backend = %refused, "UDP datagram to the backend dropped: the backend's host refused it (nothing listens on that port)");
                    moved(service, backend, refused);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                ztna_node::warn_limited!(DROP_LOG_EVERY, %service, error = %e, "backend socket failed; the UDP flow ends");
                return;
            }
        };
        if from != backend.addr() {
            // Not from the flow's backend (the connected socket should already prevent this).
            rejected.inc();
            ztna_node::warn_limited!(DROP_LOG_EVERY, %service, %from, "refused UDP datagram from unexpected source");
            arena.clear();
            continue;
        }
        activity.touch();
        let out = arena.split().freeze();
        match dg::send_fair(&state.fair, &meter, &state.conn, out.clone()) {
            Sent::Queued => to_agent.inc_by(n as u64),
            Sent::TooLarge => batch.push(out.slice(hdr_len..)),
            Sent::BufferFull => {
                drop_full.inc();
                ztna_node::warn_limited!(DROP_LOG_EVERY, %service, "UDP datagram to the agent dropped: send buffer full (the path is congested; a flow sending more than its share of it is dropped first)");
            }
            Sent::Gone => {
                drop_gone.inc();
                return;
            }
        }
    }
}

//! One flow from an agent: read its header, check policy and limits, open it at a connector
//! (healthy and least loaded first, the next one when a connector refuses or does not answer),
//! then relay it: TCP as two spliced streams, UDP as datagrams (see `datagrams`) plus the flow's
//! streams for payloads too large for a datagram on the next hop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{SendStream, VarInt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};
use ztna_node::credit::FlowCredit;
use ztna_node::flows::{FlowGuard, Kind};
use ztna_node::io::{
    splice_quic, take_ready, write_frame, write_raw_frames, FramedRecv, QuicSide, SpliceCtl,
    StreamError, FRAME_BATCH,
};
use ztna_proto::{codes, FlowAgent, FlowOpen, FlowReply, Protocol, RejectReason};

use crate::registry::{Peer, Route};
use crate::session::close;
use crate::state::{FlowMeta, Shared};

const FLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Opening a stream towards a connector waits while its stream limit is reached; that is a busy
/// connector, so the next one is tried.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connector may take to answer (it includes its backend connect).
const CONNECTOR_REPLY_TIMEOUT: Duration = Duration::from_secs(12);
/// How long all attempts at opening one flow may take together.
const OPEN_DEADLINE: Duration = Duration::from_secs(18);
/// Oversized UDP payloads queued per flow and direction for the flow's stream.
const OVERFLOW_QUEUE: usize = 64;

const REJECT_LOG_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn agent_flow(
    shared: Arc<Shared>,
    agent: Arc<Peer>,
    mut send: SendStream,
    recv: quinn::RecvStream,
) {
    let mut recv = FramedRecv::new(recv);
    let open = match recv.expect::<FlowOpen>(FLOW_HEADER_TIMEOUT).await {
        Ok(o) => o,
        Err(e) => {
            if e.is_protocol() {
                tracing::warn!(error = %e, "protocol violation in a flow header, closing connection");
                close(&agent.conn, codes::PROTOCOL, &format!("flow header: {e}"));
            }
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
    open_and_relay(&shared, &agent, send, recv, service, protocol, flow_id)
        .instrument(span)
        .await
}

async fn open_and_relay(
    shared: &Arc<Shared>,
    agent: &Arc<Peer>,
    mut send: SendStream,
    recv: FramedRecv,
    service: String,
    protocol: Protocol,
    flow_id: u64,
) {
    let m = &shared.metrics;
    let reject = |send: SendStream, reason: RejectReason, why: String| {
        m.flows
            .with_label_values(&[protocol.as_str(), reason.outcome()])
            .inc();
        ztna_node::info_limited!(REJECT_LOG_EVERY, reason = reason.as_str(), why = %why, "flow rejected");
        send_reject(send, reason, why)
    };
    if !shared.policy().may_reach(&service, &agent.id_str) {
        let why = format!("policy does not allow {} to reach {service}", agent.id);
        return reject(send, RejectReason::Denied, why).await;
    }
    let mut slot = match shared.limits.admit_flow(&agent.id_str) {
        Ok(s) => s,
        Err(limit) => {
            m.limit_rejections.with_label_values(&[limit.label()]).inc();
            let why = match limit {
                crate::limits::Limit::FlowsPerAgent => format!(
                    "this agent already has {} flows open ({})",
                    shared.config.max_flows_per_agent,
                    limit.key()
                ),
                _ => format!("the intermediate is at its flow limit ({})", limit.key()),
            };
            return reject(send, RejectReason::Limit, why).await;
        }
    };
    if protocol == Protocol::Udp && agent.routes().contains_key(&flow_id) {
        let why = format!("UDP flow id {flow_id} is already in use on this connection");
        return reject(send, RejectReason::BadRequest, why).await;
    }
    let opened = match open_at_connector(shared, &agent.id_str, &service, protocol, &mut slot).await
    {
        Ok(o) => o,
        Err((reason, why)) => return reject(send, reason, why).await,
    };
    let Opened {
        connector,
        flow_id: c_flow_id,
        send: mut c_send,
        recv: c_recv,
    } = opened;
    // In the flow table (revocation, drain) and counted before the agent hears Accept: from
    // then on data can flow, and the least-loaded choice and the gauges must already see it.
    let meta = FlowMeta {
        agent: agent.id_str.clone(),
        service: Arc::from(service.as_str()),
        connector: connector.id_str.clone(),
    };
    let kind = match protocol {
        Protocol::Tcp => Kind::Tcp,
        Protocol::Udp => Kind::Udp,
    };
    let mut guard = shared.flows.register(meta, kind);
    // The policy was checked before the open, which can take seconds at the connector; a reload
    // in between cancels only the flows already in the table. Checked again now that this one is
    // (a reload writes the policy before it cancels), so a revocation cannot slip past.
    let policy = shared.policy();
    if !policy.may_reach(&service, &agent.id_str) || !policy.may_serve(&service, &connector.id_str)
    {
        drop(guard);
        let _ = c_send.reset(VarInt::from_u32(codes::REVOKED));
        let why = format!(
            "policy no longer allows {} to reach {service} via {}",
            agent.id, connector.id
        );
        return reject(send, RejectReason::Denied, why).await;
    }
    guard.count_in(m.flows_active.with_label_values(&[protocol.as_str()]));
    let _loads = (agent.load_guard(), connector.load_guard());
    // A UDP flow's routes exist before the agent hears Accept: its first datagram follows the
    // Accept at once and would otherwise race this task to the route table (and be dropped as
    // an unknown flow if this thread were descheduled in between).
    let udp = (protocol == Protocol::Udp)
        .then(|| UdpRoutes::install(agent, &connector, flow_id, c_flow_id, &guard.activity));
    if write_frame(&mut send, &FlowReply::Accept).await.is_err() {
        // The agent gave up on the flow (reset or stopped it) while the connector opened it.
        let _ = c_send.reset(VarInt::from_u32(codes::FLOW_ABORTED));
        m.flows
            .with_label_values(&[protocol.as_str(), "error"])
            .inc();
        return;
    }
    m.flows.with_label_values(&[protocol.as_str(), "ok"]).inc();
    debug!(connector = %connector.id, "flow accepted");
    match udp {
        None => {
            let ctl = SpliceCtl::for_flow(&guard, Some(shared.config.tcp_idle_timeout));
            let up = m.bytes("tcp", "to_connector");
            let down = m.bytes("tcp", "to_agent");
            let (mut a_recv, a_prefix) = recv.into_parts();
            let (mut c_recv, c_prefix) = c_recv.into_parts();
            // Flow credit towards a connector that reports consumption: this agent's unconsumed
            // bytes there stay within its budget, and what we read is reported back.
            let stream = u64::from(c_send.id());
            let gate = connector
                .credit
                .get()
                .map(|b| b.open(stream, &agent.id_str));
            let meter = gate.as_ref().map(|_| connector.consumed.flow(stream));
            let stats = splice_quic(
                QuicSide {
                    send: &mut send,
                    recv: &mut a_recv,
                    prefix: a_prefix,
                    credit: FlowCredit::default(),
                },
                QuicSide {
                    send: &mut c_send,
                    recv: &mut c_recv,
                    prefix: c_prefix,
                    credit: FlowCredit {
                        send: gate.as_ref(),
                        recv: meter.as_ref(),
                    },
                },
                Some(&up),
                Some(&down),
                &ctl,
            )
            .await;
            debug!(up = stats.forward, down = stats.backward, end = ?stats.end, "flow ended");
        }
        Some((routes, to_c_rx, to_a_rx)) => {
            relay_udp(
                shared,
                &guard,
                (send, recv, to_a_rx),
                (c_send, c_recv, to_c_rx),
            )
            .await;
            drop(routes);
        }
    }
}

async fn send_reject(mut send: SendStream, reason: RejectReason, why: String) {
    let msg = FlowReply::Reject {
        reason,
        message: why,
    };
    let _ = write_frame(&mut send, &msg).await;
    let _ = send.finish();
}

struct Opened {
    connector: Arc<Peer>,
    flow_id: u64,
    send: SendStream,
    recv: FramedRecv,
}

/// Opens the flow at the best connector that takes it. One already at `max_flows_per_connector`
/// here is skipped before anything is asked of it (the flow is counted against the connector it
/// is tried at, in `slot`). A connector that refuses (its backend is down, it is at a limit), is
/// busy or does not answer is demoted for a while and the next one is tried; only when none
/// takes the flow is it rejected, with the last reason heard.
async fn open_at_connector(
    shared: &Shared,
    agent: &str,
    service: &str,
    protocol: Protocol,
    slot: &mut crate::limits::FlowSlot,
) -> Result<Opened, (RejectReason, String)> {
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut last: Option<(RejectReason, String)> = None;
    // `last` is our own per-connector limit (not something a connector said).
    let mut limited_here = false;
    for c in shared.registry.candidates(service, protocol) {
        if Instant::now() >= deadline {
            break;
        }
        if let Err(limit) = shared.limits.assign_connector(slot, c.conn_id) {
            debug!(connector = %c.id, "connector at its flow limit here, trying the next one");
            last = Some((
                RejectReason::Limit,
                format!("the connector is at its flow limit ({})", limit.key()),
            ));
            limited_here = true;
            continue;
        }
        let c_flow_id = if protocol == Protocol::Udp {
            c.alloc_flow_id()
        } else {
            0
        };
        match try_connector(&c, agent, service, protocol, c_flow_id, deadline).await {
            Ok((send, recv, FlowReply::Accept)) => {
                c.health.succeeded();
                return Ok(Opened {
                    connector: c,
                    flow_id: c_flow_id,
                    send,
                    recv,
                });
            }
            Ok((_, _, FlowReply::Reject { reason, message })) => {
                c.health.failed();
                debug!(connector = %c.id, reason = reason.as_str(), why = %message, "connector refused the flow, trying the next one");
                last = Some((reason, message));
                limited_here = false;
            }
            Err(e) => {
                c.health.failed();
                debug!(connector = %c.id, error = %e, "connector did not take the flow, trying the next one");
            }
        }
    }
    if let Some(last) = last {
        if limited_here {
            // Counted once per flow refused for it (a flow that found room at another connector
            // was not refused).
            shared
                .metrics
                .limit_rejections
                .with_label_values(&[crate::limits::Limit::FlowsPerConnector.label()])
                .inc();
        }
        return Err(last);
    }
    if shared.is_draining() {
        // The connectors are leaving because we are: the agent should retry this flow on another
        // intermediate rather than fail it.
        return Err((
            RejectReason::Draining,
            "intermediate is draining; open the flow on another intermediate".to_string(),
        ));
    }
    Err((
        RejectReason::Unavailable,
        format!("no connector is serving {service} over {protocol}"),
    ))
}

async fn try_connector(
    c: &Peer,
    agent: &str,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
    deadline: Instant,
) -> Result<(SendStream, FramedRecv, FlowReply), StreamError> {
    let (mut s, r) = match tokio::time::timeout(OPEN_STREAM_TIMEOUT, c.conn.open_bi()).await {
        Ok(Ok(x)) => x,
        Ok(Err(_)) => return Err(StreamError::Closed),
        Err(_) => return Err(StreamError::Timeout),
    };
    let open = FlowOpen {
        service: service.to_string(),
        protocol,
        flow_id,
    };
    write_frame(&mut s, &open).await?;
    if c.credit.get().is_some() {
        let who = FlowAgent {
            agent: agent.to_string(),
        };
        write_frame(&mut s, &who).await?;
    }
    let mut r = FramedRecv::new(r);
    let limit = CONNECTOR_REPLY_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    match r.expect::<FlowReply>(limit).await {
        Ok(reply) => Ok((s, r, reply)),
        Err(e) => {
            let _ = s.reset(VarInt::from_u32(codes::FLOW_ABORTED));
            Err(e)
        }
    }
}

/// A relayed UDP flow's two entries in the datagram relay (`datagrams::relay` rewrites flow ids
/// per hop), removed when this is dropped, whichever way the flow ends.
struct UdpRoutes {
    agent: Arc<Peer>,
    connector: Arc<Peer>,
    a_id: u64,
    c_id: u64,
}

impl UdpRoutes {
    /// Routes both ways; the receivers get the payloads the datagram relay could not send as
    /// datagrams on the next hop (towards the connector, towards the agent).
    fn install(
        agent: &Arc<Peer>,
        connector: &Arc<Peer>,
        a_id: u64,
        c_id: u64,
        activity: &ztna_node::clock::Activity,
    ) -> (Self, mpsc::Receiver<Bytes>, mpsc::Receiver<Bytes>) {
        let (to_c, to_c_rx) = mpsc::channel(OVERFLOW_QUEUE);
        let (to_a, to_a_rx) = mpsc::channel(OVERFLOW_QUEUE);
        agent.routes().insert(
            a_id,
            Route {
                peer: connector.clone(),
                meter: Default::default(),
                flow_id: c_id,
                overflow: to_c,
                activity: activity.clone(),
            },
        );
        connector.routes().insert(
            c_id,
            Route {
                peer: agent.clone(),
                meter: Default::default(),
                flow_id: a_id,
                overflow: to_a,
                activity: activity.clone(),
            },
        );
        let routes = UdpRoutes {
            agent: agent.clone(),
            connector: connector.clone(),
            a_id,
            c_id,
        };
        (routes, to_c_rx, to_a_rx)
    }
}

impl Drop for UdpRoutes {
    fn drop(&mut self) {
        self.agent.routes().remove(&self.a_id);
        self.connector.routes().remove(&self.c_id);
    }
}

/// Carries a relayed UDP flow's lifetime (idle timeout, drain, revocation) and the payloads too
/// large for a datagram, on the flow's streams; its datagrams go through `datagrams::relay`.
async fn relay_udp(
    shared: &Shared,
    guard: &FlowGuard<FlowMeta>,
    (mut a_send, a_recv, to_a_rx): (SendStream, FramedRecv, mpsc::Receiver<Bytes>),
    (mut c_send, c_recv, to_c_rx): (SendStream, FramedRecv, mpsc::Receiver<Bytes>),
) {
    let m = &shared.metrics;
    let up_n = (
        m.udp_stream_carried.with_label_values(&["to_connector"]),
        m.bytes("udp", "to_connector"),
    );
    let down_n = (
        m.udp_stream_carried.with_label_values(&["to_agent"]),
        m.bytes("udp", "to_agent"),
    );
    let idle = shared.config.udp_idle_timeout;
    let ended = {
        let full = m.datagrams_dropped.with_label_values(&["stream_full"]);
        let up = forward_frames(a_recv, to_c_rx, &mut c_send, &up_n, &full, guard);
        let down = forward_frames(c_recv, to_a_rx, &mut a_send, &down_n, &full, guard);
        tokio::select! {
            _ = async { tokio::join!(up, down) } => None,
            _ = guard.cancel.cancelled() => Some(guard.code.get()),
            _ = guard.activity.idle_out(idle) => Some(codes::IDLE),
        }
    };
    if let Some(code) = ended {
        // Cut short (idle, drain, revocation): both ends learn why.
        let c = VarInt::from_u32(code);
        let _ = a_send.reset(c);
        let _ = c_send.reset(c);
    }
    debug!(end = ?ended, "udp flow ended");
}

/// Payloads of one direction of a UDP flow's stream read from the sender and not yet written
/// to the receiver. Beyond them, payloads are dropped (`stream_full`), as UDP may be.
const STREAM_QUEUE: usize = 64;

/// Passes one direction of a UDP flow's stream on: raw frames (oversized payloads) from the
/// sender, plus those the datagram relay could not send as datagrams on the next hop (counted
/// in `carried`; their bytes were counted by the datagram relay). The sender's frames count in
/// `bytes`, the relay's UDP payload bytes, like its datagrams.
///
/// The sender's stream is read whether or not the receiver keeps up: what the receiver does not
/// take is queued (at most [`STREAM_QUEUE`] payloads), then dropped and counted in `dropped`.
/// Waiting for the receiver instead would leave the sender's data in our receive window: an
/// agent that never reads its UDP flows would fill the window of the connector connection that
/// every agent's flows to that connector share (UDP flows have no flow credit).
async fn forward_frames(
    mut from: FramedRecv,
    mut overflow: mpsc::Receiver<Bytes>,
    to: &mut SendStream,
    (carried, bytes): &(prometheus::IntCounter, prometheus::IntCounter),
    dropped: &prometheus::IntCounter,
    guard: &FlowGuard<FlowMeta>,
) {
    let (queue, mut queued) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    // How the sender's side ended: None finished, Some(code) reset.
    let read = async move {
        loop {
            match from.next_frame().await {
                Ok(Some(p)) => {
                    guard.activity.touch();
                    let n = p.len() as u64;
                    match queue.try_send(p) {
                        Ok(()) => bytes.inc_by(n),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            dropped.inc();
                            ztna_node::warn_limited!(crate::datagrams::DROP_LOG_EVERY, size = n, "UDP payload dropped: too large for a datagram and the flow's stream queue is full (the receiver does not keep up)");
                        }
                        // The receiver's side ended: nothing more goes there.
                        Err(mpsc::error::TrySendError::Closed(_)) => return None,
                    }
                }
                Ok(None) => return None,
                Err(e) => return Some(e.code()),
            }
        }
    };
    // Owns the queue's receiving end: when the receiver's side fails, the reading stops too.
    let to_w = &mut *to;
    let write = async move {
        let mut overflow_open = true;
        let mut overflow_first = false;
        let mut batch = Vec::with_capacity(FRAME_BATCH);
        loop {
            tokio::select! {
                p = queued.recv() => match p {
                    Some(p) => batch.push(p),
                    None => return true,
                },
                p = overflow.recv(), if overflow_open => match p {
                    Some(p) => {
                        carried.inc();
                        batch.push(p);
                    }
                    None => {
                        overflow_open = false;
                        continue;
                    }
                },
            };
            // Whatever else is ready, from both queues, goes in the same write; the queues
            // take turns at filling the batch first, so neither crowds the other out.
            overflow_first = !overflow_first;
            let mut from_overflow = 0;
            let mut take_overflow = |batch: &mut Vec<Bytes>| {
                if overflow_open {
                    let n = batch.len();
                    take_ready(&mut overflow, batch);
                    from_overflow += batch.len() - n;
                }
            };
            if overflow_first {
                take_overflow(&mut batch);
            }
            take_ready(&mut queued, &mut batch);
            if !overflow_first {
                take_overflow(&mut batch);
            }
            carried.inc_by(from_overflow as u64);
            guard.activity.touch();
            if write_raw_frames(to_w, &mut batch).await.is_err() {
                return false;
            }
        }
    };
    let (reset, written) = tokio::join!(read, write);
    match reset {
        Some(code) => {
            let _ = to.reset(VarInt::from_u32(code));
        }
        None if written => {
            let _ = to.finish();
        }
        None => {}
    }
}

//! Local UDP ports: each client address becomes one UDP flow whose datagrams travel as QUIC
//! datagrams (payloads too large for one go on the flow's stream).
//!
//! A flow is carried by one relay at a time (a *leg*). When that relay drains (GoAway) or goes
//! away while another can carry the service, the flow moves: a new leg is opened on the other
//! relay while the old one still delivers, then the flow switches to it, so the local client
//! keeps its address and loses nothing sent after the move. Datagrams that arrive while no leg
//! is open yet are queued (bounded) and sent once it is.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, SendStream, VarInt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::clock::Activity;
use ztna_node::datagram::{self as dg, Sent};
use ztna_node::flows::{FlowGuard, Kind};
use ztna_node::io::{take_ready, write_raw_frames, FramedRecv, StreamError};
use ztna_node::{lock, CancellationToken};
use ztna_proto::{codes, datagram, Protocol};

use crate::open::{open_any, OpenError, Opened, Via};
use crate::relays::{choose, Choice};
use crate::{FlowMeta, Shared};

/// Datagrams queued per flow while its leg is being opened or moved.
const PENDING: usize = 128;
/// Oversized payloads queued per flow for the flow's stream.
const OVERFLOW_QUEUE: usize = 64;

const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// Every UDP flow of the agent by flow id (flow ids are unique per agent, whichever relay
/// carries the flow), for datagrams coming back.
#[derive(Default)]
pub(crate) struct UdpFlows {
    by_id: Mutex<HashMap<u64, ById>>,
    next_id: AtomicU64,
}

/// A flow id's flow and the connection its datagrams may come from (the `stable_id` of the one
/// it was opened on; none while it is being opened).
struct ById {
    flow: Arc<UdpFlow>,
    conn: Option<usize>,
}

impl UdpFlows {
    fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Datagrams for flow `id` are accepted from connection `conn` (its `stable_id`) only, from
    /// now on: it is being opened there.
    pub fn carried_by(&self, id: u64, conn: usize) {
        if let Some(e) = lock(&self.by_id).get_mut(&id) {
            e.conn = Some(conn);
        }
    }

    /// A datagram from a relay or a direct path (`from`: its connection's `stable_id`): hand
    /// its payload to the flow's local client, if the flow is carried there (no other relay or
    /// connector may send into it). What cannot be delivered is counted in `dropped` and logged.
    pub fn dispatch(&self, d: &Bytes, from: usize, dropped: &prometheus::IntCounterVec) {
        let Ok((id, payload)) = datagram::decode(d) else {
            dropped.with_label_values(&["malformed"]).inc();
            ztna_node::warn_limited!(
                DROP_LOG_EVERY,
                size = d.len(),
                "UDP datagram dropped: malformed (no valid flow id)"
            );
            return;
        };
        let flow = lock(&self.by_id)
            .get(&id)
            .map(|e| (e.flow.clone(), e.conn == Some(from)));
        match flow {
            Some((flow, true)) => flow.to_client(&payload),
            Some((flow, false)) => {
                flow.drop_one("wrong_path");
                ztna_node::warn_limited!(
                    DROP_LOG_EVERY,
                    flow = id,
                    service = %flow.service,
                    "UDP datagram dropped: it came on a connection that does not carry its flow"
                );
            }
            None => {
                dropped.with_label_values(&["unknown_flow"]).inc();
                ztna_node::warn_limited!(
                    DROP_LOG_EVERY,
                    flow = id,
                    "UDP datagram dropped: no such flow (it ended, or never existed)"
                );
            }
        }
    }
}

/// Counts one more, stopping at the top.
fn bump(n: &AtomicU32) {
    let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_add(1));
}

/// The leg a flow's datagrams go out on.
#[derive(Clone)]
struct Path {
    via: Via,
    id: u64,
    overflow: mpsc::Sender<Bytes>,
}

struct UdpFlow {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    service: Arc<str>,
    activity: Activity,
    /// Datagrams from the client, and to it (saturating counts: only 0, 1 and more matter).
    asked: AtomicU32,
    answered: AtomicU32,
    path: Mutex<Option<Path>>,
    pending: Mutex<VecDeque<Bytes>>,
    dropped: prometheus::IntCounterVec,
    /// Its share of the datagram send buffer of the connection it is on.
    meter: dg::FlowMeter,
}

impl UdpFlow {
    fn drop_one(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }

    fn to_client(&self, payload: &[u8]) {
        self.activity.touch();
        bump(&self.answered);
        if let Err(e) = self.socket.try_send_to(payload, self.client) {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                self.drop_one("client_busy");
                ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, client = %self.client, "UDP datagram to the local client dropped: the forward's send buffer is full");
            } else {
                self.drop_one("client_error");
                ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, client = %self.client, error = %e, "UDP datagram to the local client dropped: send failed");
            }
        }
    }

    /// How long this flow may stay quiet: `query` once it looks like one answered query (one
    /// datagram from the client, an answer back), `idle` otherwise.
    fn idle_limit(&self, idle: Duration, query: Duration) -> Duration {
        let asked = self.asked.load(Ordering::Relaxed);
        if asked <= 1 && self.answered.load(Ordering::Relaxed) >= 1 {
            query.min(idle)
        } else {
            idle
        }
    }

    fn queue(&self, payload: &[u8]) {
        self.push(&mut lock(&self.pending), payload);
    }

    /// Queues `payload` on the locked queue `q`.
    fn push(&self, q: &mut VecDeque<Bytes>, payload: &[u8]) {
        if q.len() >= PENDING {
            self.drop_one("pending");
            ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, queued = PENDING, "UDP datagram dropped: the flow has no path yet and its queue is full");
            return;
        }
        q.push_back(Bytes::copy_from_slice(payload));
    }

    /// A datagram from the local client: out on the current leg, or queued until there is one.
    fn send_out(&self, arena: &mut BytesMut, payload: &[u8]) {
        self.activity.touch();
        let path = lock(&self.path).clone();
        let p = match path {
            Some(p) => p,
            None => {
                // Queued under the queue's lock after looking at the path again: a leg set in
                // between is seen here, or, set just after, its flush (which takes this lock
                // after setting the path) sends this datagram. None is left behind in the queue.
                let mut q = lock(&self.pending);
                match lock(&self.path).clone() {
                    Some(p) => p,
                    None => return self.push(&mut q, payload),
                }
            }
        };
        let Ok(d) = datagram::encode_into(arena, p.id, payload) else {
            self.drop_one("malformed");
            ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, size = payload.len(), "UDP datagram dropped: cannot be encoded");
            return;
        };
        match dg::send_fair(p.via.fair(), &self.meter, p.via.conn(), d) {
            Sent::Queued => {}
            Sent::TooLarge => {
                // A copy of its own: a slice of the arena would hold a whole arena chunk
                // (256 KiB) per queued payload.
                if p.overflow
                    .try_send(Bytes::copy_from_slice(payload))
                    .is_err()
                {
                    self.drop_one("stream_full");
                    ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, size = payload.len(), "UDP datagram dropped: too large for a QUIC datagram and the flow's stream queue is full");
                }
            }
            Sent::BufferFull => {
                self.drop_one("send_buffer_full");
                ztna_node::warn_limited!(DROP_LOG_EVERY, service = %self.service, "UDP datagram dropped: send buffer full (the path is congested; a flow sending more than its share of it is dropped first)");
            }
            // The leg's connection is gone: keep it for the next leg.
            Sent::Gone => self.queue(payload),
        }
    }

    /// Sends what was queued on the current leg.
    fn flush(&self) {
        let queued: Vec<Bytes> = lock(&self.pending).drain(..).collect();
        let mut arena = BytesMut::new();
        for p in queued {
            self.send_out(&mut arena, &p);
        }
    }
}

/// Serves one local UDP port until the agent drains: then datagrams from new client addresses
/// are dropped while running flows continue, and the loop ends when they have.
pub(crate) async fn udp(
    shared: Arc<Shared>,
    service: String,
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
) {
    let service: Arc<str> = Arc::from(service);
    let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpFlow>>>> = Arc::default();
    let mut buf = vec![0u8; 65_535];
    let mut arena = BytesMut::new();
    let mut accepting = true;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    ztna_node::udp::report_overflows(&socket);
    let mut overflows = ztna_node::udp::OverflowCounter::default();
    let overflowed = shared
        .metrics
        .udp_dropped
        .with_label_values(&["socket_overflow"]);
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled(), if accepting => {
                accepting = false;
                continue;
            }
            _ = tick.tick(), if !accepting => {
                if lock(&clients).is_empty() {
                    return;
                }
                continue;
            }
            r = ztna_node::udp::recv_from(&socket, &mut buf) => match r {
                Ok(r) => {
                    let lost = overflows.delta(r.overflows);
                    if lost > 0 {
                        overflowed.inc_by(lost);
                        ztna_node::warn_limited!(DROP_LOG_EVERY, %service, lost, "the kernel dropped UDP datagrams from local clients: the forward's receive buffer was full (raise net.core.rmem_max)");
                    }
                    (r.len, r.from)
                }
                Err(e) => {
                    debug!(error = %e, "udp recv error");
                    continue;
                }
            },
        };
        let payload = &buf[..n];
        let existing = lock(&clients).get(&client).cloned();
        if let Some(flow) = existing {
            bump(&flow.asked);
            flow.send_out(&mut arena, payload);
            continue;
        }
        if !accepting {
            shared
                .metrics
                .udp_dropped
                .with_label_values(&["draining"])
                .inc();
            ztna_node::warn_limited!(DROP_LOG_EVERY, %service, %client, "UDP datagram from a new client dropped: the agent is draining");
            continue;
        }
        let guard = shared.flows.register(
            FlowMeta {
                service: service.clone(),
            },
            Kind::Udp,
        );
        let flow = Arc::new(UdpFlow {
            socket: socket.clone(),
            client,
            service: service.clone(),
            activity: guard.activity.clone(),
            asked: AtomicU32::new(0),
            answered: AtomicU32::new(0),
            path: Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            dropped: shared.metrics.udp_dropped.clone(),
            meter: Default::default(),
        });
        bump(&flow.asked);
        flow.queue(payload);
        lock(&clients).insert(client, flow.clone());
        let span = info_span!("udp", %service, %client);
        shared
            .flows
            .spawn(run_flow(shared.clone(), flow, guard, clients.clone()).instrument(span));
    }
}

/// One path's part in carrying a flow (a relay, or the direct path to the connector).
struct Leg {
    via: Via,
    id: u64,
    send: SendStream,
    recv: FramedRecv,
    overflow: mpsc::Receiver<Bytes>,
}

enum LegEnd {
    /// The flow is over (idle, closed by the other side, or the agent stops).
    Over,
    /// Its relay is draining or was lost and another may carry the flow. `broken`: the leg can
    /// carry nothing more (its stream or connection ended), so the flow ends if no other relay
    /// takes it.
    Move { broken: bool },
}

async fn open_leg(
    shared: &Arc<Shared>,
    flow: &Arc<UdpFlow>,
    avoid: &mut Vec<(usize, u64)>,
    allow_direct: bool,
) -> Result<Leg, OpenError> {
    let id = shared.udp.alloc_id();
    // Known before Accept, so the first datagrams coming back are delivered.
    lock(&shared.udp.by_id).insert(
        id,
        ById {
            flow: flow.clone(),
            conn: None,
        },
    );
    match open_any(
        shared,
        &flow.service,
        Protocol::Udp,
        id,
        avoid,
        allow_direct,
    )
    .await
    {
        Ok(Opened { via, send, recv }) => {
            let (tx, rx) = mpsc::channel(OVERFLOW_QUEUE);
            *lock(&flow.path) = Some(Path {
                via: via.clone(),
                id,
                overflow: tx,
            });
            flow.flush();
            Ok(Leg {
                via,
                id,
                send,
                recv,
                overflow: rx,
            })
        }
        Err(e) => {
            lock(&shared.udp.by_id).remove(&id);
            Err(e)
        }
    }
}

async fn run_flow(
    shared: Arc<Shared>,
    flow: Arc<UdpFlow>,
    guard: FlowGuard<FlowMeta>,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpFlow>>>>,
) {
    let flows = &shared.metrics.flows;
    let service = flow.service.clone();
    let mut avoid = Vec::new();
    let mut leg = match open_leg(&shared, &flow, &mut avoid, true).await {
        Ok(leg) => {
            flows
                .with_label_values(&[&service, "udp", leg.via.label(), "ok"])
                .inc();
            info!(via = %leg.via.name(), path = leg.via.label(), "udp flow open");
            leg
        }
        Err(e) => {
            let (label, why) = e.describe();
            flows
                .with_label_values(&[&service, "udp", "relay", label])
                .inc();
            ztna_node::warn_limited!(DROP_LOG_EVERY, why = %why, "refusing UDP flow to {service}");
            // Keep the entry briefly so a burst is not re-opened per datagram.
            tokio::time::sleep(Duration::from_millis(500)).await;
            forget(&clients, &flow);
            return;
        }
    };
    let idle = shared.config.udp_idle_timeout;
    loop {
        match run_leg(&shared, &flow, &guard, &mut leg, idle).await {
            LegEnd::Over => break,
            LegEnd::Move { broken } => {
                // A relay leg moves to another relay; a direct leg falls back to the relay.
                let (mut avoid, allow_direct) = match &leg.via {
                    Via::Relay(link) => (vec![(link.index, link.generation)], true),
                    Via::Direct(_) => (Vec::new(), false),
                };
                match open_leg(&shared, &flow, &mut avoid, allow_direct).await {
                    Ok(next) => {
                        info!(from = %leg.via.name(), to = %next.via.name(), path = next.via.label(), "udp flow moved");
                        shared.metrics.udp_moves.inc();
                        let old = std::mem::replace(&mut leg, next);
                        shared
                            .flows
                            .spawn(retire_leg(shared.clone(), flow.clone(), old));
                    }
                    Err(e) => {
                        let (_, why) = e.describe();
                        if broken || leg.via.conn().close_reason().is_some() {
                            warn!(why = %why, "udp flow lost its intermediate and none other can carry it");
                            break;
                        }
                        // The old leg still works (a draining relay serves until it closes).
                        debug!(why = %why, "udp flow stays on its draining intermediate");
                        wait_for_change(&shared, &guard).await;
                    }
                }
            }
        }
    }
    let code = guard.cancel.is_cancelled().then(|| guard.code.get());
    end_leg(&shared, leg, code);
    forget(&clients, &flow);
    debug!("udp flow ended");
}

/// Waits until the relay snapshot changes (or the flow is cancelled) before trying to move again.
async fn wait_for_change(shared: &Shared, guard: &FlowGuard<FlowMeta>) {
    let mut snaps = shared.relays.subscribe();
    snaps.borrow_and_update();
    tokio::select! {
        _ = snaps.changed() => {}
        _ = guard.cancel.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

/// A leg the flow moved away from keeps delivering what is still in flight on it (a reply to a
/// datagram sent just before the move) for a few round trips, then ends.
async fn retire_leg(shared: Arc<Shared>, flow: Arc<UdpFlow>, mut leg: Leg) {
    let grace =
        (leg.via.conn().rtt() * 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    let _ = tokio::time::timeout(grace, async {
        while let Ok(Some(p)) = leg.recv.next_frame().await {
            flow.to_client(&p);
        }
    })
    .await;
    end_leg(&shared, leg, None);
}

fn end_leg(shared: &Shared, mut leg: Leg, code: Option<u32>) {
    match code {
        Some(c) => {
            let _ = leg.send.reset(VarInt::from_u32(c));
        }
        None => {
            let _ = leg.send.finish();
        }
    }
    lock(&shared.udp.by_id).remove(&leg.id);
}

fn forget(clients: &Mutex<HashMap<SocketAddr, Arc<UdpFlow>>>, flow: &Arc<UdpFlow>) {
    {
        let mut c = lock(clients);
        if c.get(&flow.client).is_some_and(|f| Arc::ptr_eq(f, flow)) {
            c.remove(&flow.client);
        }
    }
    // Datagrams still queued for a path the flow never got (or lost for good).
    let lost = lock(&flow.pending).drain(..).count();
    if lost > 0 {
        flow.dropped
            .with_label_values(&["no_path"])
            .inc_by(lost as u64);
        ztna_node::warn_limited!(DROP_LOG_EVERY, service = %flow.service, lost, "UDP datagrams dropped: the flow ended before they had a path");
    }
}

async fn run_leg(
    shared: &Shared,
    flow: &UdpFlow,
    guard: &FlowGuard<FlowMeta>,
    leg: &mut Leg,
    idle: Duration,
) -> LegEnd {
    let mut snaps = shared.relays.subscribe();
    // A relay leg moves when its relay drains or goes away and another can carry the flow; a
    // direct leg when its connection ends (below).
    let should_move = |snaps: &tokio::sync::watch::Receiver<crate::relays::Snapshot>| {
        let Via::Relay(link) = &leg.via else {
            return false;
        };
        let snap = snaps.borrow();
        !snap.is_current_and_usable(link)
            && matches!(
                choose(&snap, &flow.service, &[(link.index, link.generation)]),
                Choice::Use(_)
            )
    };
    if should_move(&snaps) {
        return LegEnd::Move { broken: false };
    }
    let query = shared.config.udp_query_idle_timeout;
    loop {
        let quiet = flow.activity.idle_for();
        let limit = flow.idle_limit(idle, query);
        if quiet >= limit {
            debug!(?limit, "udp flow idle, closing");
            return LegEnd::Over;
        }
        // An answer comes outside this loop (datagrams are dispatched by the connection's
        // reader): while the flow may still turn out to be one query, look again that soon.
        let recheck = if limit == idle && flow.asked.load(Ordering::Relaxed) <= 1 {
            query.min(limit - quiet)
        } else {
            limit - quiet
        };
        tokio::select! {
            f = leg.recv.next_frame() => match f {
                Ok(Some(p)) => {
                    flow.to_client(&p);
                    // The rest of what arrived with it, without another turn of this loop.
                    while let Some(p) = leg.recv.buffered_frame() {
                        flow.to_client(&p);
                    }
                }
                Ok(None) => return LegEnd::Over,
                Err(e) => {
                    let drained = matches!(&e, StreamError::Read(ReadError::Reset(c)) if *c == VarInt::from_u32(codes::DRAINING));
                    let lost = leg.via.conn().close_reason().is_some();
                    if drained || lost {
                        return LegEnd::Move { broken: true };
                    }
                    return LegEnd::Over;
                }
            },
            p = leg.overflow.recv() => {
                if let Some(p) = p {
                    // Everything queued behind it goes in the same write.
                    let mut batch = vec![p];
                    take_ready(&mut leg.overflow, &mut batch);
                    if write_raw_frames(&mut leg.send, &mut batch).await.is_err() {
                        return LegEnd::Move { broken: true };
                    }
                }
            }
            r = snaps.changed() => {
                if r.is_ok() && should_move(&snaps) {
                    return LegEnd::Move { broken: false };
                }
            }
            _ = tokio::time::sleep(recheck + Duration::from_millis(10)) => {}
            _ = guard.cancel.cancelled() => return LegEnd::Over,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("dropped", "test"), &["reason"])
            .unwrap()
    }

    /// A flow of the `dns` forward on `socket` for `client`, with no path yet.
    fn test_flow(
        socket: Arc<UdpSocket>,
        client: SocketAddr,
        dropped: prometheus::IntCounterVec,
    ) -> UdpFlow {
        UdpFlow {
            socket,
            client,
            service: Arc::from("dns"),
            activity: Activity::new(),
            asked: AtomicU32::new(0),
            answered: AtomicU32::new(0),
            path: Mutex::new(None),
            pending: Mutex::new(VecDeque::new()),
            dropped,
            meter: Default::default(),
        }
    }

    /// One datagram out and an answer back (a DNS lookup) is held for the short query timeout;
    /// a second datagram from the client, or no answer yet, keeps the full idle timeout.
    #[tokio::test]
    async fn an_answered_single_query_is_held_only_for_the_query_timeout() {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client = socket.local_addr().unwrap();
        let flow = test_flow(socket.clone(), client, counter());
        let (idle, query) = (Duration::from_secs(60), Duration::from_secs(5));
        bump(&flow.asked);
        assert_eq!(flow.idle_limit(idle, query), idle, "not answered yet");
        socket.writable().await.unwrap();
        flow.to_client(b"answer");
        assert_eq!(flow.idle_limit(idle, query), query, "one query, answered");
        flow.to_client(b"more");
        assert_eq!(flow.idle_limit(idle, query), query);
        bump(&flow.asked);
        assert_eq!(flow.idle_limit(idle, query), idle, "a conversation");
        assert_eq!(
            flow.idle_limit(Duration::from_secs(2), query),
            Duration::from_secs(2)
        );
    }

    /// A datagram for a flow reaches its local client only when it comes on the connection the
    /// flow was opened on; the same flow id from another relay's or connector's connection is
    /// dropped and counted as `wrong_path` (flow ids are sequential and easy to guess).
    #[tokio::test]
    async fn datagrams_are_delivered_only_from_the_connection_carrying_the_flow() {
        let forward = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // Sends to clients are non-blocking (`try_send_to`): let tokio learn it is writable.
        forward.writable().await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dropped = counter();
        let flow = Arc::new(test_flow(
            forward,
            client.local_addr().unwrap(),
            dropped.clone(),
        ));
        let flows = UdpFlows::default();
        let id = flows.alloc_id();
        lock(&flows.by_id).insert(
            id,
            ById {
                flow: flow.clone(),
                conn: None,
            },
        );
        let (carrier, other) = (0x1000usize, 0x2000usize);
        flows.carried_by(id, carrier);
        let mut arena = BytesMut::new();
        let injected = datagram::encode_into(&mut arena, id, b"injected").unwrap();
        flows.dispatch(&injected, other, &dropped);
        assert_eq!(dropped.with_label_values(&["wrong_path"]).get(), 1);
        let genuine = datagram::encode_into(&mut arena, id, b"genuine").unwrap();
        flows.dispatch(&genuine, carrier, &dropped);
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("the genuine datagram reached the client")
            .unwrap();
        assert_eq!(
            &buf[..n],
            b"genuine",
            "the injected datagram reached the client"
        );
    }
}

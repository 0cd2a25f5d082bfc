//! The tunnel to an intermediate: connect, hello, service status, failover on loss or GoAway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::backoff::{BackoffPolicy, Reconnect};
use ztna_node::client::{self, Control};
use ztna_node::identity::describe_connection_error;
use ztna_node::io::read_frame;
use ztna_node::{lock, CancellationToken};
use ztna_proto::{datagram, Role, ServerMsg, ServiceState};

use crate::Shared;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long no watched service may have a connector via this intermediate before the agent tries
/// the next intermediate (which may still have one, e.g. after a partial network cut), even
/// without a flow asking for it.
const REHOME_AFTER: Duration = Duration::from_secs(2);
/// How long the agent remembers which services an intermediate lacked when it left it. A
/// service down everywhere therefore costs one move per intermediate per this period.
const REHOME_MEMORY: Duration = Duration::from_secs(30);

/// What the agent knows about the intermediates it is not connected to.
#[derive(Default)]
pub(crate) struct Rehomes {
    /// intermediate → (when the agent left it, services it had no connector for then).
    missing: HashMap<String, (Instant, Vec<String>)>,
    /// Index of the intermediate a requested move goes to.
    next: Option<usize>,
}

/// One connection to an intermediate.
pub struct Session {
    pub conn: quinn::Connection,
    pub intermediate: String,
    status: Mutex<HashMap<String, (ServiceState, String)>>,
    /// UDP flow id → (local socket, local client) for return traffic.
    udp: Mutex<HashMap<u64, (Arc<UdpSocket>, SocketAddr)>>,
    going_away: AtomicBool,
    /// Position of this intermediate in the configured list.
    index: usize,
    /// A flow found a service without a connector here and asked to move to the next
    /// intermediate.
    moving: AtomicBool,
    /// Flows running on this connection.
    active: std::sync::atomic::AtomicUsize,
}

/// Counts a flow on a session while it lives.
pub(crate) struct FlowOnSession(Arc<Session>);

impl Drop for FlowOnSession {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// Availability of `service` as last pushed by the intermediate, with the reason.
    pub fn status(&self, service: &str) -> Option<(ServiceState, String)> {
        lock(&self.status).get(service).cloned()
    }

    /// Every service status pushed so far, sorted by name.
    pub fn services(&self) -> Vec<(String, ServiceState)> {
        let mut v: Vec<_> = lock(&self.status)
            .iter()
            .map(|(k, (s, _))| (k.clone(), *s))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn track_flow(self: &Arc<Session>) -> FlowOnSession {
        self.active.fetch_add(1, Ordering::Relaxed);
        FlowOnSession(self.clone())
    }

    /// True once the intermediate sent GoAway or the connection closed.
    pub fn retiring(&self) -> bool {
        self.going_away.load(Ordering::Relaxed) || self.conn.close_reason().is_some()
    }

    pub(crate) fn add_udp(&self, id: u64, socket: Arc<UdpSocket>, client: SocketAddr) {
        lock(&self.udp).insert(id, (socket, client));
    }

    pub(crate) fn remove_udp(&self, id: u64) {
        lock(&self.udp).remove(&id);
    }

    fn dispatch(&self, d: &Bytes) {
        let Ok((id, payload)) = datagram::decode(d) else {
            return;
        };
        let udp = lock(&self.udp);
        if let Some((socket, client)) = udp.get(&id) {
            let _ = socket.try_send_to(&payload, *client);
        }
    }
}

/// Called when `service` has no connector via `session` (a flow wants it, or it has been missing
/// for a while): if another intermediate may have one, stops using `session` for new flows,
/// wakes the tunnel manager to move there and returns true; a flow then waits for that session.
/// Returns false when the service should be refused here and now: there is one intermediate
/// only, or every other one is known (from the last visit, within [`REHOME_MEMORY`]) to lack
/// the service or to lack a service that works here, so moving would not help or would break
/// something else. That knowledge is also what keeps an agent from hopping when a service is
/// down everywhere.
pub(crate) fn request_rehome(shared: &Shared, session: &Session, service: &str) -> bool {
    if session.moving.load(Ordering::SeqCst) {
        return true;
    }
    let mut memory = lock(&shared.rehomes);
    if session.moving.load(Ordering::SeqCst) {
        return true;
    }
    let targets = &shared.config.intermediates;
    let working_here: Vec<String> = session
        .services()
        .into_iter()
        .filter(|(_, s)| *s == ServiceState::Available)
        .map(|(n, _)| n)
        .collect();
    let choice = (1..targets.len())
        .map(|k| (session.index + k) % targets.len())
        .find(|&j| match memory.missing.get(&targets[j]) {
            Some((seen, missing)) if seen.elapsed() < REHOME_MEMORY => !missing
                .iter()
                .any(|m| m == service || working_here.contains(m)),
            _ => true,
        });
    let Some(next) = choice else {
        return false;
    };
    memory.next = Some(next);
    // The flow may have learnt it from a rejection before the pushed status caught up: record it
    // where the manager looks when it leaves, so the agent does not come straight back for it.
    lock(&session.status).insert(
        service.to_string(),
        (
            ServiceState::Unavailable,
            "a flow was refused here".to_string(),
        ),
    );
    session.moving.store(true, Ordering::SeqCst);
    // Not retiring yet for the manager (it retires on the wake-up), but new flows skip it now.
    session.going_away.store(true, Ordering::SeqCst);
    shared.rehome_now.notify_one();
    true
}

/// Waits up to `limit` for a usable session.
pub(crate) async fn current(shared: &Shared, limit: Duration) -> Option<Arc<Session>> {
    let mut rx = shared.current.subscribe();
    let res = tokio::time::timeout(
        limit,
        rx.wait_for(|s| s.as_ref().is_some_and(|s| !s.retiring())),
    )
    .await;
    match res {
        Ok(Ok(s)) => s.clone(),
        _ => None,
    }
}

pub(crate) async fn manage(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
) {
    let targets = shared.config.intermediates.clone();
    let mut backoff = Reconnect::new(BackoffPolicy::default());
    let mut idx = 0usize;
    loop {
        let target = targets[idx % targets.len()].clone();
        let span = info_span!("intermediate", %target);
        let outcome = tokio::select! {
            o = connect_and_serve(&shared, &endpoint, &target, idx % targets.len()).instrument(span) => o,
            _ = stop.cancelled() => return,
        };
        if let Some(left) = shared.current.send_replace(None) {
            let missing = left
                .services()
                .into_iter()
                .filter(|(_, s)| *s != ServiceState::Available)
                .map(|(n, _)| n)
                .collect();
            lock(&shared.rehomes)
                .missing
                .insert(left.intermediate.clone(), (Instant::now(), missing));
        }
        shared.update_status();
        shared.metrics.connected.set(0);
        idx = match (&outcome, lock(&shared.rehomes).next.take()) {
            (Outcome::Rehome, Some(next)) => next,
            _ => idx % targets.len() + 1,
        };
        let delay = match outcome {
            Outcome::GoAway => {
                // A drain, not a failure: delays grown by earlier failures start over.
                backoff.reset();
                Duration::ZERO
            }
            Outcome::Rehome => Duration::ZERO,
            Outcome::Lost(since) => backoff.next_delay(since),
        };
        if !delay.is_zero() {
            debug!(?delay, "reconnecting after backoff");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

enum Outcome {
    GoAway,
    /// A watched service had no connector via this intermediate for a while; try the next one.
    Rehome,
    Lost(Option<Instant>),
}

/// Stops using a session for new flows. Flows already on it keep running (their datagrams keep
/// flowing); once the last one ends, the connection is closed.
fn retire(session: &Arc<Session>) {
    session.going_away.store(true, Ordering::Relaxed);
    let s = session.clone();
    tokio::spawn(async move {
        let mut idle_check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                d = s.conn.read_datagram() => match d {
                    Ok(d) => s.dispatch(&d),
                    Err(_) => return,
                },
                _ = idle_check.tick() => {
                    if s.active.load(Ordering::Relaxed) == 0 {
                        s.conn.close(quinn::VarInt::from_u32(ztna_proto::codes::OK), b"agent moved to another intermediate");
                        return;
                    }
                }
            }
        }
    });
}

async fn connect_and_serve(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    target: &str,
    index: usize,
) -> Outcome {
    let conn = match client::connect(endpoint, &shared.client(), target, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(reason) => {
            warn!(%reason, "cannot connect to intermediate");
            return Outcome::Lost(None);
        }
    };
    let mut watch: Vec<String> = shared
        .config
        .forward
        .iter()
        .map(|f| f.service.clone())
        .collect();
    watch.sort();
    watch.dedup();
    let software = format!("ztna-agent/{}", ztna_node::VERSION);
    let Control {
        mut recv,
        observed_addr,
        identity,
        ..
    } = match client::hello(&conn, Role::Agent, software, watch, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(reason) => {
            warn!(%reason, "intermediate did not welcome this agent");
            return Outcome::Lost(None);
        }
    };
    info!(%identity, %observed_addr, "connected to intermediate");
    let since = Instant::now();
    let session = Arc::new(Session {
        conn: conn.clone(),
        intermediate: target.to_string(),
        status: Mutex::new(HashMap::new()),
        udp: Mutex::new(HashMap::new()),
        going_away: AtomicBool::new(false),
        index,
        moving: AtomicBool::new(false),
        active: std::sync::atomic::AtomicUsize::new(0),
    });
    shared.current.send_replace(Some(session.clone()));
    shared.update_status();
    shared.metrics.connected.set(1);
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut unavailable_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = check.tick() => {
                let states = session.services();
                // Without a flow asking, move only when nothing works here: a working service is
                // not given up for one that may be missing everywhere (a flow for the missing
                // one can still ask, see `request_rehome`).
                let useless = !states.iter().any(|(_, s)| *s == ServiceState::Available);
                let missing = states
                    .iter()
                    .find(|(_, s)| useless && *s == ServiceState::Unavailable)
                    .map(|(n, _)| n.clone());
                match (&missing, unavailable_since) {
                    (None, _) => unavailable_since = None,
                    (Some(_), None) => unavailable_since = Some(Instant::now()),
                    (Some(service), Some(t)) if t.elapsed() >= REHOME_AFTER && request_rehome(shared, &session, service) => {
                        info!(%service, "no connector for {service} via this intermediate; moving to the next intermediate (running flows finish here)");
                        retire(&session);
                        return Outcome::Rehome;
                    }
                    _ => {}
                }
            }
            _ = shared.rehome_now.notified() => {
                // A wake-up left over from an earlier session is ignored.
                if session.moving.load(Ordering::SeqCst) {
                    info!("a flow found no connector via this intermediate; moving to the next intermediate (running flows finish here)");
                    retire(&session);
                    return Outcome::Rehome;
                }
            }
            msg = read_frame::<ServerMsg>(&mut recv) => match msg {
                Ok(Some(ServerMsg::ServiceStatus { service, state, reason })) => {
                    let available = state == ServiceState::Available;
                    shared.metrics.service_available.with_label_values(&[&service]).set(i64::from(available));
                    if available {
                        info!(%service, %reason, "service available");
                    } else {
                        warn!(%service, %reason, "service unavailable");
                    }
                    lock(&session.status).insert(service, (state, reason));
                    shared.update_status();
                }
                Ok(Some(ServerMsg::GoAway { reason, deadline_ms, .. })) => {
                    info!(%reason, deadline_ms, "intermediate going away: new flows move to the next intermediate, running flows finish here");
                    retire(&session);
                    return Outcome::GoAway;
                }
                Ok(Some(other)) => debug!(msg = ?other, "control message"),
                Ok(None) | Err(_) => {
                    let reason = conn.close_reason().map(|c| describe_connection_error(&c)).unwrap_or_default();
                    warn!(%reason, "lost intermediate");
                    if client::closed_by_drain(&conn) {
                        return Outcome::GoAway;
                    }
                    return Outcome::Lost(Some(since));
                }
            },
            d = conn.read_datagram() => match d {
                Ok(d) => session.dispatch(&d),
                Err(e) => {
                    warn!(reason = %describe_connection_error(&e), "lost intermediate");
                    if client::closed_by_drain(&conn) {
                        return Outcome::GoAway;
                    }
                    return Outcome::Lost(Some(since));
                }
            },
        }
    }
}

//! Direct (P2P) paths to connectors.
//!
//! When a flow opens for a service, the agent asks a relay for a direct path (unless one is up,
//! being tried, or backing off). The relay checks the policy, has the connector punch towards
//! our candidates and hands us the connector's candidates plus a ticket. We connect from the
//! same UDP socket that carries our relay connections (so the NAT mapping the relay observed is
//! the one the connector punches to), present the ticket, and from then on new flows for that
//! service go direct. A direct path that stops answering is noticed within 3 s (keepalive 1 s,
//! idle timeout 3 s); new flows then go via the relay and the agent tries again with backoff.
//! An attempt that fails never delays a flow: flows use the relay meanwhile.
//!
//! Services served by the same connector share one direct connection: when the relay names a
//! connector we already have a path to, the new service's ticket is presented on that path's
//! control stream (no second punch, handshake or keepalive), and the connector's answer says
//! whether the path now carries it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use ztna_node::backoff::{BackoffPolicy, Reconnect};
use ztna_node::identity::{describe_connection_error, peer_id};
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::lock;
use ztna_proto::{ClientMsg, DirectMsg, DirectReply, Role, ServerMsg, PROTOCOL_VERSION};

use crate::relays::{choose, Choice};
use crate::Shared;
use ztna_proto::RejectReason;

/// How long to wait for the relay's answer to a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the connection attempt may take (the connector punches for 3 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The hop limit of the first punch: through our own NAT, not as far as the connector's.
const FIRST_PUNCH_TTL: u8 = 2;
/// Pause between the low-TTL punch and full-TTL packets (longer than the skew between the two
/// sides' start signals).
const FULL_PUNCH_AFTER: Duration = Duration::from_millis(50);
/// Longest wait behind another set-up towards the same connector after which we still punch
/// (the connector punches for 3 s after its start signal).
const PUNCH_STALE_AFTER: Duration = Duration::from_secs(1);
/// How long a ticket lives (at most).
const TICKET_LIFETIME: Duration = Duration::from_millis(ztna_proto::ticket::MAX_TICKET_LIFETIME_MS);
/// Tickets live 60 s; refresh at half that.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// After a refresh that failed for a reason that may pass, the next try comes this soon.
const REFRESH_RETRY: Duration = Duration::from_secs(3);

/// An established direct connection to a connector, shared by every service it carries.
pub struct DirectPath {
    /// SPIFFE ID of the connector.
    pub connector: String,
    pub conn: quinn::Connection,
    /// Its datagram send buffer, shared fairly by the UDP flows on it.
    pub fair: ztna_node::datagram::Fair,
    /// The control stream: tickets out, the connector's answers back.
    control: tokio::sync::Mutex<(quinn::SendStream, FramedRecv)>,
    /// Whether the connector answers tickets presented on the control stream (connectors
    /// before path sharing only read them): cleared when an answer does not come.
    answers: AtomicBool,
    /// The services whose flows this path carries.
    services: Mutex<BTreeSet<String>>,
    /// The connector refused a flow because it is draining: new flows go via the relay (and a
    /// new attempt may find another connector) while running ones finish here.
    draining: AtomicBool,
    drained: tokio::sync::Notify,
}

impl DirectPath {
    fn new(
        connector: String,
        conn: quinn::Connection,
        control: (quinn::SendStream, FramedRecv),
        service: &str,
    ) -> DirectPath {
        DirectPath {
            connector,
            fair: ztna_node::datagram::Fair::new(&conn),
            conn,
            control: tokio::sync::Mutex::new(control),
            answers: AtomicBool::new(true),
            services: Mutex::new(BTreeSet::from([service.to_string()])),
            draining: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
        }
    }

    /// Takes new flows: open, and its connector not draining.
    fn live(&self) -> bool {
        self.conn.close_reason().is_none() && !self.draining.load(Ordering::Relaxed)
    }

    /// The connector refused a flow here because it is draining: no new flow is sent here
    /// again (one round trip lost, once), and the services' `keep` tasks hand them back to
    /// the relay and a new attempt.
    pub fn connector_draining(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            info!(connector = %self.connector, services = ?self.services(), "the connector is draining; new flows use the relay, running ones finish on the direct path");
            self.drained.notify_waiters();
        }
    }

    /// Resolves once the connector was seen draining.
    async fn seen_draining(&self) {
        let notified = self.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.draining.load(Ordering::Relaxed) {
            return;
        }
        notified.await
    }

    fn services(&self) -> Vec<String> {
        lock(&self.services).iter().cloned().collect()
    }

    /// Presents a ticket on the control stream. With a connector that answers, waits for the
    /// answer: the services the path now carries (`None` from a connector that does not
    /// answer), or why not.
    async fn present(&self, ticket: Vec<u8>) -> Result<Option<Vec<String>>, NotTaken> {
        let mut control = self.control.lock().await;
        let (send, recv) = &mut *control;
        write_frame(send, &DirectMsg::Ticket { ticket })
            .await
            .map_err(|e| NotTaken::Unanswered(e.to_string()))?;
        if !self.answers.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match recv.expect::<DirectReply>(ANSWER_TIMEOUT).await {
            Ok(DirectReply::Welcome { services }) => Ok(Some(services)),
            Ok(DirectReply::Refused { reason }) => Err(NotTaken::Refused(reason)),
            Err(e) => {
                // An older connector: it takes tickets without a word. From now on, present
                // refreshed tickets without waiting, and give other services paths of their own.
                self.answers.store(false, Ordering::Relaxed);
                Err(NotTaken::Unanswered(format!(
                    "the connector did not answer the ticket: {e}"
                )))
            }
        }
    }
}

/// Why a ticket presented on a path was not taken.
enum NotTaken {
    /// The connector refused it, with this reason.
    Refused(String),
    /// No answer (an older connector, or the stream failed).
    Unanswered(String),
}

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTaken::Refused(why) => write!(f, "the connector refused: {why}"),
            NotTaken::Unanswered(why) => f.write_str(why),
        }
    }
}

enum PathState {
    Trying,
    Up(Arc<DirectPath>),
    /// Not before this instant; the schedule grows with each failure.
    Backoff(Instant, Box<Reconnect>),
}

/// What a relay answered to our request.
enum Answer {
    Start {
        connector: String,
        candidates: Vec<SocketAddr>,
        ticket: Vec<u8>,
    },
    Refused(String),
}

/// A relay's answer to a refresh: a fresh ticket, or why the service may no longer go direct.
type FreshTicket = Result<Vec<u8>, String>;

/// The agent's direct paths, by service.
#[derive(Default)]
pub(crate) struct Direct {
    paths: Mutex<HashMap<String, PathState>>,
    /// Live direct connections, by connector.
    conns: Mutex<HashMap<String, Arc<DirectPath>>>,
    /// One path set-up at a time per connector, so services that ask at once share it.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    /// Tickets asked of the relay (or its refusal), by service: for the refresh loop and for a
    /// service joining a live connection. With the connector asked about, so that a late answer
    /// about another connector is not taken for this one.
    tickets: Mutex<HashMap<(String, String), oneshot::Sender<FreshTicket>>>,
}

impl Direct {
    /// The direct path for `service`, if one is up.
    pub fn up(&self, service: &str) -> Option<Arc<DirectPath>> {
        match lock(&self.paths).get(service) {
            Some(PathState::Up(p)) if p.live() => Some(p.clone()),
            _ => None,
        }
    }

    /// The live direct connection to `connector`, if there is one.
    fn to(&self, connector: &str) -> Option<Arc<DirectPath>> {
        lock(&self.conns)
            .get(connector)
            .filter(|p| p.live())
            .cloned()
    }

    /// Services whose new flows go direct now.
    pub fn count(&self) -> usize {
        lock(&self.paths)
            .values()
            .filter(|s| matches!(s, PathState::Up(p) if p.live()))
            .count()
    }

    /// A relay's message about direct paths.
    pub fn deliver(&self, msg: ServerMsg) {
        match msg {
            ServerMsg::DirectStart {
                service,
                connector,
                candidates,
                ticket,
            } => {
                if let Some(tx) = lock(&self.waiting).remove(&service) {
                    let _ = tx.send(Answer::Start {
                        connector,
                        candidates,
                        ticket,
                    });
                }
            }
            ServerMsg::DirectRefused { service, reason } => {
                // An attempt's request, or a refresh the policy no longer allows.
                if let Some(tx) = lock(&self.waiting).remove(&service) {
                    let _ = tx.send(Answer::Refused(reason));
                } else {
                    // It names no connector: taken as the answer to one ticket asked for the
                    // service (if two are asked at once, for two connectors, the other times
                    // out and is asked again).
                    let mut tickets = lock(&self.tickets);
                    let key = tickets.keys().find(|(s, _)| *s == service).cloned();
                    if let Some(tx) = key.and_then(|k| tickets.remove(&k)) {
                        let _ = tx.send(Err(reason));
                    }
                }
            }
            ServerMsg::Ticket {
                service,
                connector,
                ticket,
            } => {
                if let Some(tx) = lock(&self.tickets).remove(&(service, connector)) {
                    let _ = tx.send(Ok(ticket));
                }
            }
            _ => {}
        }
    }
}

/// A flow for `service` is opening: try a direct path if none is up, tried or backing off.
pub(crate) fn want(shared: &Arc<Shared>, service: &str) {
    if !shared.config.p2p {
        return;
    }
    let mut paths = lock(&shared.direct.paths);
    let backoff = match paths.remove(service) {
        None => Reconnect::new(policy()),
        // Up, or just died: its `keep` task owns the state and moves it to a backoff when it
        // sees the path end (at once). Starting an attempt here too would race it: two attempts,
        // two `keep`s, each overwriting the other's state.
        Some(PathState::Up(p)) => {
            paths.insert(service.to_string(), PathState::Up(p));
            return;
        }
        Some(PathState::Trying) => {
            paths.insert(service.to_string(), PathState::Trying);
            return;
        }
        Some(PathState::Backoff(until, b)) => {
            if Instant::now() < until {
                paths.insert(service.to_string(), PathState::Backoff(until, b));
                return;
            }
            *b
        }
    };
    paths.insert(service.to_string(), PathState::Trying);
    drop(paths);
    let shared = shared.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let Attempt { path, asked } = attempt(&shared, &service).await;
        // A refusal was counted by the relay that gave it (denied, disabled, or the connector
        // did not answer); other outcomes are reported to the relay that was asked, so each
        // attempt counts once in its p2p metric, at that relay.
        let report = |success: bool, why: &str| {
            if let Some(link) = &asked {
                link.say(ClientMsg::DirectResult {
                    service: service.clone(),
                    success,
                    reason: why.chars().take(512).collect(),
                });
            }
        };
        match path {
            Ok(path) => {
                report(true, "");
                lock(&shared.direct.paths).insert(service.clone(), PathState::Up(path.clone()));
                shared.update_direct_gauge();
                keep(&shared, &service, path, backoff).await;
            }
            Err(no) => {
                let why = match no {
                    NoPath::Refused(why) => why,
                    NoPath::Failed(why) => {
                        report(false, &why);
                        why
                    }
                };
                back_off(&shared, &service, backoff, None);
                debug!(%service, why = %why, "no direct path; flows use the relay");
            }
        }
    });
}

/// Backoff after a failed attempt or a lost path: 1 s doubling to a minute.
fn policy() -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        healthy_after: Duration::from_secs(60),
        ..BackoffPolicy::default()
    }
}

fn back_off(shared: &Shared, service: &str, mut b: Reconnect, since: Option<Instant>) {
    let delay = b.next_delay(since);
    lock(&shared.direct.paths).insert(
        service.to_string(),
        PathState::Backoff(Instant::now() + delay, Box::new(b)),
    );
    shared.update_direct_gauge();
}

fn relay_for(shared: &Shared, service: &str) -> Option<Arc<crate::relays::Link>> {
    let snap = shared.relays.borrow();
    match choose(&snap, service, &[]) {
        Choice::Use(i) => snap.link(i),
        _ => None,
    }
}

/// How an attempt went.
struct Attempt {
    path: Result<Arc<DirectPath>, NoPath>,
    /// The relay asked (for a direct path, or a ticket to join a live one): the outcome is
    /// reported to it, not to whichever relay carries the service by then. None: no relay.
    asked: Option<Arc<crate::relays::Link>>,
}

/// Why an attempt gave no direct path.
enum NoPath {
    /// The relay refused the request and counted why.
    Refused(String),
    /// The relay brokered it, or never answered: reported to the relay as `failed`.
    Failed(String),
}

async fn attempt(shared: &Arc<Shared>, service: &str) -> Attempt {
    let Some(link) = relay_for(shared, service) else {
        let why = "no relay carries the service now".to_string();
        return Attempt {
            path: Err(NoPath::Refused(why)),
            asked: None,
        };
    };
    // Held while its answer is awaited: a link retiring after a certificate rotation waits.
    let held = crate::relays::LinkUse::new(link.clone());
    let path = match join(shared, &link, service).await {
        Some(path) => Ok(path),
        None => request(shared, &link, service).await,
    };
    drop(held);
    Attempt {
        path,
        asked: Some(link),
    }
}

/// Asks `link` for a direct path to `service` and sets it up with the connector it names.
async fn request(
    shared: &Arc<Shared>,
    link: &crate::relays::Link,
    service: &str,
) -> Result<Arc<DirectPath>, NoPath> {
    let (tx, rx) = oneshot::channel();
    lock(&shared.direct.waiting).insert(service.to_string(), tx);
    let candidates = shared
        .puncher
        .as_ref()
        .map(|p| p.local_candidates())
        .unwrap_or_default();
    link.say(ClientMsg::DirectRequest {
        service: service.to_string(),
        candidates,
    });
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
    lock(&shared.direct.waiting).remove(service);
    let (connector, candidates, ticket) = match answer {
        Ok(Ok(Answer::Start {
            connector,
            candidates,
            ticket,
        })) => (connector, candidates, ticket),
        Ok(Ok(Answer::Refused(why))) => {
            return Err(NoPath::Refused(format!("refused by the relay: {why}")))
        }
        _ => return Err(NoPath::Failed("the relay did not answer".to_string())),
    };
    let answered = Instant::now();
    let gate = lock(&shared.direct.connecting)
        .entry(connector.clone())
        .or_default()
        .clone();
    let result = {
        let _gate = gate.lock().await;
        establish(shared, service, &connector, candidates, ticket, answered)
            .await
            .map_err(NoPath::Failed)
    };
    // Forget the gate when no other attempt holds it (the map would otherwise keep one per
    // connector ever seen).
    {
        let mut gates = lock(&shared.direct.connecting);
        if gates
            .get(&connector)
            .is_some_and(|g| Arc::ptr_eq(g, &gate) && Arc::strong_count(g) == 2)
        {
            gates.remove(&connector);
        }
    }
    result
}

/// Asks `link` for a ticket for `service` at `connector`; waits up to [`ANSWER_TIMEOUT`].
async fn ask_ticket(
    shared: &Shared,
    link: &crate::relays::Link,
    service: &str,
    connector: &str,
) -> Result<Result<FreshTicket, oneshot::error::RecvError>, tokio::time::error::Elapsed> {
    let key = (service.to_string(), connector.to_string());
    let (tx, rx) = oneshot::channel();
    lock(&shared.direct.tickets).insert(key.clone(), tx);
    link.say(ClientMsg::TicketRequest {
        service: key.0.clone(),
        connector: key.1.clone(),
    });
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
    lock(&shared.direct.tickets).remove(&key);
    answer
}

/// Most live direct connections asked about, one after the other, before a new set-up.
const MAX_JOIN_ASKS: usize = 4;

/// Puts `service` on a live direct connection to a connector that serves it too, if the relay
/// signs a ticket for it there: one round trip to the relay and one to the connector, and no
/// offer, start signal or punching (the connector would otherwise punch towards us for 3 s for
/// a connection we already have). The relay checks the policy and that the connector serves
/// the service, as for any ticket. `None`: no such connection (or a refusal): set one up.
async fn join(
    shared: &Arc<Shared>,
    link: &crate::relays::Link,
    service: &str,
) -> Option<Arc<DirectPath>> {
    let paths: Vec<Arc<DirectPath>> = lock(&shared.direct.conns)
        .values()
        .filter(|p| p.live() && p.answers.load(Ordering::Relaxed))
        .take(MAX_JOIN_ASKS)
        .cloned()
        .collect();
    for path in paths {
        let ticket = match ask_ticket(shared, link, service, &path.connector).await {
            Ok(Ok(Ok(ticket))) => ticket,
            // Not allowed there, or the connector does not serve it: ask about the next.
            Ok(Ok(Err(why))) => {
                debug!(%service, connector = %path.connector, why = %why, "no ticket for the live direct connection");
                continue;
            }
            _ => continue,
        };
        match path.present(ticket).await {
            Ok(Some(services)) if services.iter().any(|s| s == service) => {
                lock(&path.services).insert(service.to_string());
                info!(%service, connector = %path.connector, addr = %ztna_node::transport::canonical(path.conn.remote_address()), services = ?path.services(), "direct path up (joined the live connection to the connector, no new punch)");
                return Some(path);
            }
            Ok(_) => {}
            Err(why) => {
                debug!(%service, connector = %path.connector, why = %why, "the live direct connection did not take the service")
            }
        }
    }
    None
}

/// With the per-connector gate held: shares the live path to `connector` when it takes the
/// ticket, otherwise punches and connects.
async fn establish(
    shared: &Arc<Shared>,
    service: &str,
    connector: &str,
    candidates: Vec<SocketAddr>,
    ticket: Vec<u8>,
    answered: Instant,
) -> Result<Arc<DirectPath>, String> {
    let connector = connector.to_string();
    if let Some(path) = shared.direct.to(&connector) {
        if path.answers.load(Ordering::Relaxed) {
            match path.present(ticket.clone()).await {
                Ok(Some(services)) if services.iter().any(|s| s == service) => {
                    lock(&path.services).insert(service.to_string());
                    info!(%service, %connector, addr = %ztna_node::transport::canonical(path.conn.remote_address()), services = ?path.services(), "direct path up (on the connection the connector's other services use)");
                    return Ok(path);
                }
                Ok(_) => {
                    debug!(%service, %connector, "the connector's answer leaves the service out; connecting anew")
                }
                Err(why) => {
                    debug!(%service, %connector, why = %why, "the direct connection did not take the service; connecting anew")
                }
            }
        }
    }
    // The connector punches for 3 s from its start signal, sent when the relay answered us.
    // After a long wait behind another set-up towards it, punching now would miss it: ask
    // again later (flows use the relay meanwhile).
    let waited = answered.elapsed();
    if waited > PUNCH_STALE_AFTER {
        return Err(format!(
            "waited {waited:.1?} behind another set-up towards {connector}; its punching is over"
        ));
    }
    // The connector got its start signal at about this moment. Open our NAT mapping towards
    // every candidate with a low-TTL packet (it dies before the connector's NAT, where an early
    // unsolicited packet could claim the port pair), give the other side the same moment to do
    // likewise, then punch and connect with full TTL.
    if let Some(p) = &shared.puncher {
        p.punch_ttl(&candidates, FIRST_PUNCH_TTL);
        tokio::time::sleep(FULL_PUNCH_AFTER).await;
        p.punch(&candidates);
    }
    let conn = connect(shared, &connector, &candidates).await?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let mut recv = FramedRecv::new(recv);
    write_frame(
        &mut send,
        &DirectMsg::Hello {
            version: PROTOCOL_VERSION,
            ticket: ticket.clone(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    match recv.expect::<DirectReply>(CONNECT_TIMEOUT).await {
        Ok(DirectReply::Welcome { services }) => {
            let addr = ztna_node::transport::canonical(conn.remote_address());
            let path = Arc::new(DirectPath::new(
                connector.clone(),
                conn,
                (send, recv),
                service,
            ));
            // Can the path carry this connector's other services? Only if the connector
            // answers tickets on it: ask with the ticket it just took. A connector from before
            // path sharing takes it silently (and would replace the path's service with the
            // next one's), so other services get paths of their own there. One round trip with
            // a current connector; flows use the relay until the path is up either way.
            let shared_ok = path.present(ticket).await.is_ok();
            info!(%service, %connector, %addr, ?services, shares = shared_ok, "direct path up");
            if let Some(old) = lock(&shared.direct.conns).insert(connector, path.clone()) {
                // The connector's paths that cannot be shared (see above) each keep their
                // service until they end.
                debug!(connector = %old.connector, "a second direct connection to this connector");
            }
            tokio::spawn(run(shared.clone(), path.clone()));
            Ok(path)
        }
        Ok(DirectReply::Refused { reason }) => Err(format!("the connector refused: {reason}")),
        Err(e) => Err(conn
            .close_reason()
            .map(|c| describe_connection_error(&c))
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Tries every candidate (a new one every 50 ms) until one connects to `connector`.
async fn connect(
    shared: &Shared,
    connector: &str,
    candidates: &[SocketAddr],
) -> Result<quinn::Connection, String> {
    let identity = shared.tls.identity();
    let mut opts = shared.config.transport();
    opts.keepalive = Duration::from_secs(1);
    opts.idle_timeout = Duration::from_secs(3);
    let client = ztna_node::transport::client_config(&identity, Role::Connector, &opts)
        .map_err(|e| e.to_string())?;
    let mut attempts = tokio::task::JoinSet::new();
    for (i, addr) in candidates.iter().copied().enumerate() {
        let Ok(connecting) = shared
            .endpoint
            .connect_with(client.clone(), addr, "ztna-connector")
        else {
            continue;
        };
        attempts.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            connecting.await.map_err(|e| describe_connection_error(&e))
        });
    }
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last = "no candidate to try".to_string();
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, attempts.join_next()).await {
        match r {
            Ok(Ok(conn)) => {
                // The connector the relay named, not another one that answered on that address.
                match peer_id(&conn) {
                    Some(id) if id.to_string() == connector => {
                        attempts.abort_all();
                        return Ok(conn);
                    }
                    other => {
                        conn.close(
                            quinn::VarInt::from_u32(ztna_proto::codes::UNAUTHORIZED),
                            b"not the connector named",
                        );
                        last = format!(
                            "{:?} answered instead of {connector}",
                            other.map(|i| i.to_string())
                        );
                    }
                }
            }
            Ok(Err(e)) => last = e,
            Err(_) => {}
        }
    }
    attempts.abort_all();
    Err(format!(
        "no candidate answered within {CONNECT_TIMEOUT:?} ({last})"
    ))
}

/// Delivers an established connection's datagrams until it ends, then forgets it.
async fn run(shared: Arc<Shared>, path: Arc<DirectPath>) {
    while let Ok(d) = path.conn.read_datagram().await {
        shared
            .udp
            .dispatch(&d, path.conn.stable_id(), &shared.metrics.udp_dropped);
    }
    let why = path
        .conn
        .close_reason()
        .map(|e| describe_connection_error(&e))
        .unwrap_or_else(|| "closed".to_string());
    warn!(connector = %path.connector, services = ?path.services(), reason = %why, "direct path lost; new flows use the relay");
    {
        let mut conns = lock(&shared.direct.conns);
        if conns
            .get(&path.connector)
            .is_some_and(|p| Arc::ptr_eq(p, &path))
        {
            conns.remove(&path.connector);
        }
    }
    shared.update_direct_gauge();
}

/// Keeps `service` on an established path: refreshes its ticket until the path dies, then
/// backs off (new flows use the relay meanwhile).
async fn keep(shared: &Arc<Shared>, service: &str, path: Arc<DirectPath>, backoff: Reconnect) {
    let since = Instant::now();
    let refresh = async {
        // When the connector last took a ticket for the service.
        let mut fresh = Instant::now();
        // The last refresh failed for a reason that may pass (a relay reconnecting, the
        // connector not registered there again yet): try again soon, not in 30 s.
        let mut retry = false;
        loop {
            tokio::time::sleep(if retry { REFRESH_RETRY } else { REFRESH_EVERY }).await;
            retry = true;
            if fresh.elapsed() >= TICKET_LIFETIME {
                return "no fresh ticket within a ticket's lifetime".to_string();
            }
            let link = {
                let snap = shared.relays.borrow();
                match choose(&snap, service, &[]) {
                    Choice::Use(i) => snap.link(i),
                    // The policy no longer lets us reach the service: no relay would issue a
                    // ticket, and flows to it are refused here anyway.
                    Choice::Refuse(RejectReason::Denied, why) => {
                        return format!("the relays deny the service now: {why}")
                    }
                    // No relay takes new flows for it (its connector drains, or is away): ask any
                    // relay that is up, which renews the ticket while the connector is still
                    // connected there; otherwise the path keeps working until its ticket
                    // expires, and we try again shortly.
                    _ => (0..snap.relays.len())
                        .filter(|&i| snap.relays[i].is_up())
                        .find_map(|i| snap.link(i)),
                }
            };
            let Some(link) = link else {
                continue;
            };
            let link = crate::relays::LinkUse::new(link);
            let ticket = match ask_ticket(shared, &link, service, &path.connector).await {
                Ok(Ok(Ok(ticket))) => ticket,
                // Refused by this relay: a policy change shows up as Denied in its status
                // (above) and ends the service here; anything else (the connector is not
                // registered there again yet after a restart) may pass before the ticket runs
                // out.
                Ok(Ok(Err(why))) => {
                    debug!(%service, connector = %path.connector, why = %why, "fresh ticket refused by the relay; trying again");
                    continue;
                }
                _ => continue,
            };
            match path.present(ticket).await {
                Ok(Some(services)) if !services.iter().any(|s| s == service) => {
                    return "the connector's answer to the fresh ticket leaves the service out"
                        .to_string()
                }
                Err(NotTaken::Refused(why)) => {
                    return format!("the connector refused the fresh ticket: {why}")
                }
                Err(NotTaken::Unanswered(why)) => {
                    debug!(%service, connector = %path.connector, why = %why, "refreshed ticket not answered");
                }
                Ok(_) => {
                    fresh = Instant::now();
                    retry = false;
                }
            }
        }
    };
    let mut backoff = Some(backoff);
    let mut refresh = Box::pin(refresh);
    loop {
        tokio::select! {
            _ = path.conn.closed() => break,
            why = &mut refresh => {
                info!(%service, connector = %path.connector, why = %why, "the direct path no longer carries the service; its new flows use the relay");
                break;
            }
            // New flows use the relay from now on, and after the backoff a new attempt may
            // find another connector; the ticket is still renewed, so flows running here finish
            // (until the connector closes the path at the end of its drain).
            _ = path.seen_draining(), if backoff.is_some() => {
                if let Some(b) = backoff.take() {
                    back_off(shared, service, b, Some(since));
                }
            }
        }
    }
    drop(refresh);
    let empty = {
        let mut services = lock(&path.services);
        services.remove(service);
        services.is_empty()
    };
    if empty {
        close_when_unused(path);
    }
    if let Some(b) = backoff {
        back_off(shared, service, b, Some(since));
    }
}

/// A path that carries no service any more is closed: by the time `keep` gives a service up,
/// it is no longer allowed there (or its ticket lapsed, or the path died), so nothing on it may
/// run on, and neither side should keep an idle connection and its keepalives for good.
fn close_when_unused(path: Arc<DirectPath>) {
    if lock(&path.services).is_empty() && path.conn.close_reason().is_none() {
        debug!(connector = %path.connector, "closing a direct path that carries no service any more");
        path.conn.close(
            quinn::VarInt::from_u32(ztna_proto::codes::OK),
            b"no service left on the direct path",
        );
    }
}

//! Service registry: which connector connections offer which service, which of those offers
//! the policy allows, and how healthy each connector has been lately.
//!
//! Offers are kept even when the policy rejects them, so a policy reload can re-evaluate every
//! offer in both directions: a registration the new policy forbids is removed, and one it now
//! allows (refused earlier) comes into service without the connector having to reconnect.
//!
//! A withdrawn offer (a connector deregistering, say when it drains) takes no new flow, but is
//! kept until the connection closes: direct flows still running there need their tickets
//! renewed until they finish ([`Registry::holder`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use ztna_node::clock::{now_ms, Activity};
use ztna_node::SpiffeId;
use ztna_proto::{Protocol, Role, ServerMsg};

pub use ztna_node::lock;

/// Where a UDP flow's datagrams arriving on one connection go.
#[derive(Clone)]
pub struct Route {
    pub peer: Arc<Peer>,
    pub flow_id: u64,
    /// This flow's share of `peer`'s datagram send buffer.
    pub meter: Arc<ztna_node::datagram::FlowMeter>,
    /// Payloads too large for a datagram towards `peer` are carried on the flow's stream.
    pub overflow: mpsc::Sender<bytes::Bytes>,
    pub activity: Activity,
}

/// Recent flow-open outcomes of a connector, for a least-loaded choice that avoids a connector
/// whose opens keep failing (say its backend is down while another connector's is up).
#[derive(Default)]
pub struct ConnectorHealth {
    consecutive_failures: AtomicU32,
    demoted_until_ms: AtomicU64,
}

impl ConnectorHealth {
    /// A flow open failed here: demote for 1 s, doubling per consecutive failure, up to 30 s.
    pub fn failed(&self) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = (1000u64 << (n - 1).min(5)).min(30_000);
        self.demoted_until_ms
            .store(now_ms() + ms, Ordering::Relaxed);
    }

    pub fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.demoted_until_ms.store(0, Ordering::Relaxed);
    }

    pub fn demoted(&self) -> bool {
        now_ms() < self.demoted_until_ms.load(Ordering::Relaxed)
    }
}

/// One authenticated peer connection (agent or connector).
pub struct Peer {
    pub conn: quinn::Connection,
    /// Its datagram send buffer, shared fairly by the UDP flows relayed to it.
    pub fair: ztna_node::datagram::Fair,
    pub id: SpiffeId,
    /// `id` as text, made once (policy checks, limits, logs).
    pub id_str: Arc<str>,
    pub role: Role,
    /// Stable id of this connection within the process.
    pub conn_id: u64,
    /// notAfter of its certificate: the connection is closed then. A renewal moves it.
    pub expires: tokio::sync::watch::Sender<Option<SystemTime>>,
    /// The chain of its last accepted renewal (`ztna_node::renew`), if any: what a CA reload
    /// re-verifies instead of the handshake's.
    renewed: Mutex<Option<Vec<ztna_node::CertificateDer<'static>>>>,
    /// Renewals it may ask for (each costs a chain verification): a rotation brings one.
    pub renew_budget: ztna_node::ratelimit::TokenBucket,
    /// Control messages to send to it (the session's writer task sends them in order). Boxed:
    /// a channel allocates 32 slots at once, which for messages held inline cost about 3 KiB
    /// per idle connection.
    pub control: mpsc::Sender<Box<ServerMsg>>,
    /// UDP flow id on this connection → where its datagrams go.
    pub routes: Mutex<HashMap<u64, Route>>,
    /// Next flow id this side allocates on this connection (towards connectors).
    next_flow_id: AtomicU64,
    /// Flows currently relayed over this connection (for the least-loaded choice).
    pub load: AtomicUsize,
    pub health: ConnectorHealth,
    /// Direct-path and ticket requests this peer may make (each makes us message a connector).
    pub direct_budget: ztna_node::ratelimit::TokenBucket,
    /// A connector's Register and Deregister messages: each wakes every agent session that
    /// watches services. A connector registers its services when it connects and deregisters
    /// them when it drains; one that flips them faster is closed.
    pub registration_budget: ztna_node::ratelimit::TokenBucket,
    /// An agent's direct-path and ticket requests not yet reported on, by service: only those
    /// may be reported (`DirectResult`), so an agent cannot make up attempts in the P2P counts.
    pub direct_asked: Mutex<HashMap<String, (u8, std::time::Instant)>>,
    /// A connector's flow credit, once it said it reports consumption (protocol revision 2):
    /// what each agent may have unconsumed in flight towards it.
    pub credit: std::sync::OnceLock<Arc<ztna_node::credit::SendBudget>>,
    /// What we read from a connector's flows, reported back to it (revision 2).
    pub consumed: Arc<ztna_node::credit::Meter>,
    /// A connector's: our identity as it was when it authenticated us. Its direct-path tickets
    /// are signed with this key, the one whose certificate the connector holds (a reload that
    /// changes our key does not break its direct paths until it reconnects).
    pub signer: Option<Arc<ztna_node::Identity>>,
}

/// What a connection ran under before a renewal ([`Peer::renewed`]).
pub struct Previous {
    chain: Option<Vec<ztna_node::CertificateDer<'static>>>,
    expires: Option<SystemTime>,
}

/// Renewals a connection may ask for at once, and per second after that (one a minute: a
/// certificate is re-issued far less often; a refused one may be retried).
const RENEW_BURST: u32 = 4;
const RENEWS_PER_SECOND: f64 = 1.0 / 60.0;

/// Register/Deregister messages a connector connection may send at once (all its services,
/// twice over), and per second after that.
pub const REGISTRATION_BURST: u32 = 2 * MAX_OFFERS_PER_CONNECTION as u32;
pub const REGISTRATIONS_PER_SECOND: f64 = 4.0;

/// Services with requests awaiting a report, and requests per service, that an agent
/// connection may have (more are not recorded: their reports are then not counted).
const MAX_ASKED_SERVICES: usize = 64;
const MAX_ASKED_PER_SERVICE: u8 = 4;
/// How long after its last DirectStart or Ticket a report on a service is taken: an agent
/// reports within its answer and handshake timeouts; a ticket refresh of a running path is
/// never reported, and its entry lapses.
const ASKED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

impl Peer {
    /// Notes a DirectStart or Ticket sent to this agent for `service` (see `direct_asked`).
    pub fn asked_direct(&self, service: &str) {
        let now = std::time::Instant::now();
        let mut asked = ztna_node::lock(&self.direct_asked);
        if asked.len() >= MAX_ASKED_SERVICES {
            asked.retain(|_, (_, at)| now.duration_since(*at) < ASKED_FOR);
        }
        let full = asked.len() >= MAX_ASKED_SERVICES;
        match asked.get_mut(service) {
            Some((n, at)) => {
                if now.duration_since(*at) >= ASKED_FOR {
                    *n = 0;
                }
                *n = (*n + 1).min(MAX_ASKED_PER_SERVICE);
                *at = now;
            }
            None if !full => {
                asked.insert(service.to_string(), (1, now));
            }
            None => {}
        }
    }

    /// Takes one DirectStart or Ticket for `service` awaiting a report; false if there is none.
    pub fn take_asked_direct(&self, service: &str) -> bool {
        let mut asked = ztna_node::lock(&self.direct_asked);
        let Some((n, at)) = asked.get_mut(service) else {
            return false;
        };
        let live = at.elapsed() < ASKED_FOR;
        if live && *n > 1 {
            *n -= 1;
        } else {
            asked.remove(service);
        }
        live
    }

    pub fn new(
        conn: quinn::Connection,
        id: SpiffeId,
        conn_id: u64,
        chain: &[ztna_node::CertificateDer<'static>],
        control: mpsc::Sender<Box<ServerMsg>>,
        signer: Option<Arc<ztna_node::Identity>>,
    ) -> Peer {
        let expires = chain
            .first()
            .and_then(|c| ztna_node::identity::cert_not_after(c));
        Peer {
            fair: ztna_node::datagram::Fair::new(&conn),
            conn,
            id_str: Arc::from(id.to_string()),
            role: id.role,
            id,
            conn_id,
            expires: tokio::sync::watch::channel(expires).0,
            renewed: Mutex::new(None),
            renew_budget: ztna_node::ratelimit::TokenBucket::new(RENEW_BURST, RENEWS_PER_SECOND),
            control,
            routes: Mutex::new(HashMap::new()),
            next_flow_id: AtomicU64::new(1),
            load: AtomicUsize::new(0),
            health: ConnectorHealth::default(),
            direct_budget: ztna_node::ratelimit::TokenBucket::new(8, 2.0),
            direct_asked: Mutex::new(HashMap::new()),
            registration_budget: ztna_node::ratelimit::TokenBucket::new(
                REGISTRATION_BURST,
                REGISTRATIONS_PER_SECOND,
            ),
            credit: std::sync::OnceLock::new(),
            consumed: ztna_node::credit::Meter::new(),
            signer,
        }
    }

    pub fn alloc_flow_id(&self) -> u64 {
        self.next_flow_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
        lock(&self.routes)
    }

    /// Queues a control message without waiting; false if the peer is not reading them.
    pub fn say(&self, msg: ServerMsg) -> bool {
        self.control.try_send(Box::new(msg)).is_ok()
    }

    /// Queues a control message, waiting for room; false once the peer's session has ended.
    pub fn tell(&self, msg: ServerMsg) -> impl std::future::Future<Output = bool> + '_ {
        // Boxed before the first await: a waiting caller's task holds a pointer, not the message.
        let msg = Box::new(msg);
        async move { self.control.send(msg).await.is_ok() }
    }

    /// The certificate chain it authenticated with (the TLS session keeps it), or the one of its
    /// last renewal; re-verified when the CA changes.
    pub fn chain(&self) -> Vec<ztna_node::CertificateDer<'static>> {
        match &*lock(&self.renewed) {
            Some(chain) => chain.clone(),
            None => ztna_node::identity::peer_chain(&self.conn),
        }
    }

    /// Runs the connection on under a renewed certificate: its chain and notAfter. Returns what
    /// it ran under before (for [`Peer::restore`]).
    pub fn renewed(
        &self,
        chain: Vec<ztna_node::CertificateDer<'static>>,
        not_after: SystemTime,
    ) -> Previous {
        let chain = lock(&self.renewed).replace(chain);
        let expires = self.expires.send_replace(Some(not_after));
        Previous { chain, expires }
    }

    /// Undoes a renewal: the connection runs under what it ran under before.
    pub fn restore(&self, previous: Previous) {
        *lock(&self.renewed) = previous.chain;
        self.expires.send_replace(previous.expires);
    }

    /// Counts a flow on this connection while the returned guard lives.
    pub fn load_guard(self: &Arc<Self>) -> LoadGuard {
        self.load.fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }
}

/// See [`Peer::load_guard`].
pub struct LoadGuard(Arc<Peer>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Offer {
    peer: Arc<Peer>,
    tcp: bool,
    udp: bool,
    /// Whether the current policy allows this connector to serve the service.
    allowed: bool,
    /// Deregistered: no new flow goes there.
    withdrawn: bool,
}

impl Offer {
    /// Takes new flows.
    fn serving(&self) -> bool {
        self.allowed && !self.withdrawn
    }
}

/// A registration whose standing changed on a policy reload.
pub struct Change {
    pub peer: Arc<Peer>,
    pub service: String,
    pub allowed: bool,
}

/// Services one connector connection may offer (each offer is kept, denied ones too, for a
/// later reload to allow): a connector cannot grow the registry without bound.
pub const MAX_OFFERS_PER_CONNECTION: usize = ztna_proto::MAX_LIST_LEN;

/// service → offers. Every change bumps a version watched by agent sessions.
pub struct Registry {
    services: Mutex<HashMap<String, Vec<Offer>>>,
    changed: watch::Sender<u64>,
    gauge: prometheus::IntGaugeVec,
    /// Services with a `service_connectors` series: the policy's (shown at 0 until a connector
    /// comes) and any that had an allowed connector. Offers the policy denies add none, so the
    /// metric's labels stay as few as the policy's services.
    shown: Mutex<HashSet<String>>,
}

impl Registry {
    /// `shown`: the services of the policy, whose series exist from the start.
    pub fn new(
        gauge: prometheus::IntGaugeVec,
        shown: impl IntoIterator<Item = String>,
    ) -> Registry {
        Registry {
            services: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            gauge,
            shown: Mutex::new(shown.into_iter().collect()),
        }
    }

    /// Services `conn_id` offers now.
    pub fn offers_of(&self, conn_id: u64) -> usize {
        lock(&self.services)
            .values()
            .filter(|offers| offers.iter().any(|o| o.peer.conn_id == conn_id))
            .count()
    }

    /// Whether `conn_id` offers `service` now.
    pub fn offers(&self, service: &str, conn_id: u64) -> bool {
        lock(&self.services)
            .get(service)
            .is_some_and(|offers| offers.iter().any(|o| o.peer.conn_id == conn_id))
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells watchers (agent sessions) to recompute service status.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn set_gauge(&self, service: &str, offers: &[Offer]) {
        let n = offers.iter().filter(|o| o.serving()).count();
        let mut shown = lock(&self.shown);
        if n > 0 {
            shown.insert(service.to_string());
        } else if !shown.contains(service) {
            return;
        }
        self.gauge.with_label_values(&[service]).set(n as i64);
    }

    /// After a policy reload: series for the new policy's services (0 without a connector)
    /// and any a connector serves now, and none for the rest. A service taken out of the
    /// policy would otherwise stay at 0 (alerting as unavailable) until a restart, and one
    /// added would have no series until a connector came.
    pub fn show_policy(&self, policy_services: impl IntoIterator<Item = String>) {
        let services = lock(&self.services);
        let mut keep: HashSet<String> = policy_services.into_iter().collect();
        for (name, offers) in services.iter() {
            if offers.iter().any(Offer::serving) {
                keep.insert(name.clone());
            }
        }
        let mut shown = lock(&self.shown);
        for gone in shown.difference(&keep) {
            let _ = self.gauge.remove_label_values(&[gone]);
        }
        for name in &keep {
            let n = services
                .get(name)
                .map_or(0, |o| o.iter().filter(|o| o.serving()).count());
            self.gauge.with_label_values(&[name]).set(n as i64);
        }
        *shown = keep;
    }

    /// Records a connector's offer (replacing an earlier one of the same connection) and whether
    /// the policy allows it.
    pub fn offer(&self, service: &str, peer: &Arc<Peer>, tcp: bool, udp: bool, allowed: bool) {
        let was_allowed = {
            let mut s = lock(&self.services);
            let offers = s.entry(service.to_string()).or_default();
            let was_allowed = offers
                .iter()
                .any(|o| o.peer.conn_id == peer.conn_id && o.serving());
            offers.retain(|o| o.peer.conn_id != peer.conn_id);
            offers.push(Offer {
                peer: peer.clone(),
                tcp,
                udp,
                allowed,
                withdrawn: false,
            });
            self.set_gauge(service, offers);
            was_allowed
        };
        // A denied offer changes no agent's view: no need to wake every agent session.
        if allowed || was_allowed {
            self.bump();
        }
    }

    /// Withdraws a connection's offer of `service` (kept, taking no new flow, until the
    /// connection closes); true if it was serving it.
    pub fn withdraw(&self, service: &str, conn_id: u64) -> bool {
        let removed = {
            let mut s = lock(&self.services);
            let Some(offers) = s.get_mut(service) else {
                return false;
            };
            let mut was = false;
            for o in offers.iter_mut().filter(|o| o.peer.conn_id == conn_id) {
                was |= o.serving();
                o.withdrawn = true;
            }
            self.set_gauge(service, offers);
            was
        };
        if removed {
            self.bump();
        }
        removed
    }

    /// Removes every offer of a connection (it closed). Returns the services it served.
    pub fn remove_peer(&self, conn_id: u64) -> Vec<String> {
        let mut gone = Vec::new();
        {
            let mut s = lock(&self.services);
            for (service, offers) in s.iter_mut() {
                if offers
                    .iter()
                    .any(|o| o.peer.conn_id == conn_id && o.serving())
                {
                    gone.push(service.clone());
                }
                offers.retain(|o| o.peer.conn_id != conn_id);
                self.set_gauge(service, offers);
            }
            s.retain(|_, offers| !offers.is_empty());
        }
        if !gone.is_empty() {
            self.bump();
        }
        gone.sort();
        gone
    }

    /// Re-evaluates every offer with `allowed(service, peer)`; returns those whose standing
    /// changed (in both directions).
    pub fn reevaluate(&self, allowed: impl Fn(&str, &Peer) -> bool) -> Vec<Change> {
        let mut changes = Vec::new();
        {
            let mut s = lock(&self.services);
            for (service, offers) in s.iter_mut() {
                // A withdrawn offer is not registered: nothing to tell its connector.
                for o in offers.iter_mut().filter(|o| !o.withdrawn) {
                    let now = allowed(service, &o.peer);
                    if now != o.allowed {
                        o.allowed = now;
                        changes.push(Change {
                            peer: o.peer.clone(),
                            service: service.clone(),
                            allowed: now,
                        });
                    }
                }
                self.set_gauge(service, offers);
            }
        }
        if !changes.is_empty() {
            self.bump();
        }
        changes
    }

    /// Connectors allowed to serve `service` over `protocol`: healthy ones least loaded first,
    /// then those whose recent opens failed (still tried rather than refusing the flow).
    pub fn candidates(&self, service: &str, protocol: Protocol) -> Vec<Arc<Peer>> {
        let s = lock(&self.services);
        let mut peers: Vec<Arc<Peer>> = s
            .get(service)
            .map(|offers| {
                offers
                    .iter()
                    .filter(|o| {
                        o.serving()
                            && match protocol {
                                Protocol::Tcp => o.tcp,
                                Protocol::Udp => o.udp,
                            }
                    })
                    .map(|o| o.peer.clone())
                    .collect()
            })
            .unwrap_or_default();
        peers.sort_by_key(|p| (p.health.demoted(), p.load.load(Ordering::Relaxed)));
        peers
    }

    /// Number of connectors serving `service` (any protocol) under the current policy.
    pub fn count(&self, service: &str) -> usize {
        lock(&self.services)
            .get(service)
            .map(|o| o.iter().filter(|o| o.serving()).count())
            .unwrap_or(0)
    }

    /// The connection of connector `connector` that offers `service`, or offered it and still
    /// is connected (withdrawn, say while it drains), whether or not the policy allowed it when
    /// it was offered: for renewing the tickets of direct flows running there. The caller
    /// checks the current policy.
    pub fn holder(&self, service: &str, connector: &str) -> Option<Arc<Peer>> {
        let s = lock(&self.services);
        let offers = s.get(service)?;
        // One serving now first, then one that withdrew.
        offers
            .iter()
            .filter(|o| &*o.peer.id_str == connector)
            .min_by_key(|o| !o.serving())
            .map(|o| o.peer.clone())
    }
}

//! Service registry: which connector connections serve which service, and per-connection UDP
//! routing tables.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use ztna_node::SpiffeId;
use ztna_proto::Protocol;

/// State of one peer connection (agent or connector) that flows and datagrams refer to.
pub struct Peer {
    pub conn: quinn::Connection,
    pub id: SpiffeId,
    /// Stable id of this connection within the process.
    pub conn_id: u64,
    /// UDP flow id on this connection → where its datagrams go.
    pub routes: Mutex<HashMap<u64, Route>>,
    /// Next flow id this side allocates on this connection (connector side).
    next_flow_id: AtomicU64,
    /// Flows currently relayed over this connection.
    pub active_flows: AtomicUsize,
}

#[derive(Clone)]
pub struct Route {
    pub peer: Arc<Peer>,
    pub flow_id: u64,
}

impl Peer {
    pub fn new(conn: quinn::Connection, id: SpiffeId, conn_id: u64) -> Peer {
        Peer {
            conn,
            id,
            conn_id,
            routes: Mutex::new(HashMap::new()),
            next_flow_id: AtomicU64::new(1),
            active_flows: AtomicUsize::new(0),
        }
    }

    pub fn alloc_flow_id(&self) -> u64 {
        self.next_flow_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn routes(&self) -> MutexGuard<'_, HashMap<u64, Route>> {
        lock(&self.routes)
    }
}

pub use ztna_node::lock;

struct Offer {
    peer: Arc<Peer>,
    tcp: bool,
    udp: bool,
}

/// service → connectors offering it. Every change bumps a version watched by agent sessions.
pub struct Registry {
    services: Mutex<HashMap<String, Vec<Offer>>>,
    changed: watch::Sender<u64>,
    gauge: prometheus::IntGaugeVec,
}

impl Registry {
    pub fn new(gauge: prometheus::IntGaugeVec) -> Registry {
        Registry {
            services: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            gauge,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells watchers (agent sessions) to recompute service status.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn set_gauge(&self, service: &str, n: usize) {
        self.gauge.with_label_values(&[service]).set(n as i64);
    }

    pub fn register(&self, service: &str, peer: &Arc<Peer>, tcp: bool, udp: bool) {
        {
            let mut s = lock(&self.services);
            let offers = s.entry(service.to_string()).or_default();
            offers.retain(|o| o.peer.conn_id != peer.conn_id);
            offers.push(Offer {
                peer: peer.clone(),
                tcp,
                udp,
            });
            self.set_gauge(service, offers.len());
        }
        self.bump();
    }

    pub fn deregister(&self, service: &str, conn_id: u64) -> bool {
        let removed = {
            let mut s = lock(&self.services);
            let Some(offers) = s.get_mut(service) else {
                return false;
            };
            let before = offers.len();
            offers.retain(|o| o.peer.conn_id != conn_id);
            let n = offers.len();
            self.set_gauge(service, n);
            if n == 0 {
                s.remove(service);
            }
            n != before
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
                let before = offers.len();
                offers.retain(|o| o.peer.conn_id != conn_id);
                if offers.len() != before {
                    gone.push(service.clone());
                    self.set_gauge(service, offers.len());
                }
            }
            s.retain(|_, offers| !offers.is_empty());
        }
        if !gone.is_empty() {
            self.bump();
        }
        gone
    }

    /// Keeps only the offers `keep(service, peer)` allows; returns what was removed.
    pub fn retain(&self, keep: impl Fn(&str, &Peer) -> bool) -> Vec<(String, SpiffeId)> {
        let mut removed = Vec::new();
        {
            let mut s = lock(&self.services);
            for (service, offers) in s.iter_mut() {
                offers.retain(|o| {
                    let ok = keep(service, &o.peer);
                    if !ok {
                        removed.push((service.clone(), o.peer.id.clone()));
                    }
                    ok
                });
                self.set_gauge(service, offers.len());
            }
            s.retain(|_, offers| !offers.is_empty());
        }
        if !removed.is_empty() {
            self.bump();
        }
        removed
    }

    /// Connectors for `service` and `protocol`, least loaded first.
    pub fn candidates(&self, service: &str, protocol: Protocol) -> Vec<Arc<Peer>> {
        let s = lock(&self.services);
        let mut peers: Vec<Arc<Peer>> = s
            .get(service)
            .map(|offers| {
                offers
                    .iter()
                    .filter(|o| match protocol {
                        Protocol::Tcp => o.tcp,
                        Protocol::Udp => o.udp,
                    })
                    .map(|o| o.peer.clone())
                    .collect()
            })
            .unwrap_or_default();
        peers.sort_by_key(|p| p.active_flows.load(Ordering::Relaxed));
        peers
    }

    /// Number of connectors serving `service` (any protocol).
    pub fn count(&self, service: &str) -> usize {
        lock(&self.services)
            .get(service)
            .map(|o| o.len())
            .unwrap_or(0)
    }
}

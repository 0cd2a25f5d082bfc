//! ztna-agent: exposes services on local ports and tunnels each connection through an
//! intermediate.
//!
//! The agent keeps a link to every configured intermediate ([`link`]); one manager task owns
//! what is known about them ([`relays`]); every new flow picks its relay from that ([`open`]):
//! the first one, in configured order, that is connected, not draining and has the service.
//! Local ports: TCP in [`forward`], UDP in [`udp`].

pub mod cli;
pub mod config;
mod direct;
mod forward;
mod link;
pub mod metrics;
mod open;
pub mod relays;
pub mod status;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use ztna_node::client::ClientTls;
use ztna_node::flows::Flows;
use ztna_node::health::Health;
use ztna_node::identity::IdentityError;
use ztna_node::ops::Ops;
use ztna_node::CancellationToken;
use ztna_proto::{codes, Protocol, Role, ServiceState};

pub use config::{Config, Forward, ForwardProtocol};
pub use metrics::Metrics;
pub use relays::Snapshot;

use crate::relays::{Conn, Event};

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Socket buffers of each local UDP port: room for a burst at line rate.
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// A UDP flow quiet for this long does not hold a drain.
const UDP_DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How often the status line is refreshed besides on every relay change (as the connector's).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What the flow table knows of each flow.
#[derive(Clone)]
pub(crate) struct FlowMeta {
    pub service: Arc<str>,
}

pub(crate) struct Shared {
    pub config: Config,
    /// Certificate and QUIC client config for new connections; replaced on reload.
    pub tls: ClientTls,
    pub metrics: Metrics,
    pub health: Health,
    pub flows: Flows<FlowMeta>,
    pub udp: udp::UdpFlows,
    /// What is known about every relay (written only by the manager task).
    pub relays: watch::Sender<Snapshot>,
    /// To the manager task.
    pub events: mpsc::UnboundedSender<Event>,
    /// Direct (P2P) paths to connectors.
    pub direct: direct::Direct,
    /// The one QUIC endpoint (relay links and direct paths share its socket).
    pub endpoint: quinn::Endpoint,
    /// Sends hole-punching packets from that socket (when P2P is on).
    pub puncher: Option<ztna_node::transport::Puncher>,
}

impl Shared {
    pub fn report(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    pub fn update_direct_gauge(&self) {
        self.metrics.direct_paths.set(self.direct.count() as i64);
    }

    /// Readiness, the status line and the availability metrics, from a snapshot.
    fn update_status(&self, snap: &Snapshot) {
        if self.health.is_stopping() {
            let flows = self.flows.len();
            self.health
                .set_status(format!("draining: {flows} flows left"));
            return;
        }
        let m = &self.metrics;
        m.connected.set(i64::from(snap.connected() > 0));
        m.intermediates_connected.set(snap.connected() as i64);
        let mut services: Vec<&str> = self
            .config
            .forward
            .iter()
            .map(|f| f.service.as_str())
            .collect();
        services.sort_unstable();
        services.dedup();
        let mut words = Vec::new();
        for s in &services {
            let state = snap.service_state(s);
            let available = matches!(state, Some((ServiceState::Available, _)));
            m.service_available
                .with_label_values(&[s])
                .set(i64::from(available));
            words.push(match state {
                Some((ServiceState::Available, _)) => format!("{s} available"),
                Some((ServiceState::Unavailable, _)) => format!("{s} unavailable (no connector)"),
                Some((ServiceState::Denied, _)) => format!("{s} denied by policy"),
                None => format!("{s} unknown"),
            });
        }
        let relays: Vec<String> = snap
            .relays
            .iter()
            .map(|r| match &r.conn {
                Conn::Up { draining: false } => format!("{} up", r.target),
                Conn::Up { draining: true } => format!("{} draining", r.target),
                Conn::Connecting => format!("{} connecting", r.target),
                Conn::Down { .. } => format!("{} down", r.target),
            })
            .collect();
        if snap.connected() == 0 {
            self.health.set_ready(false);
            self.health
                .set_status(format!("connecting: {}", relays.join(", ")));
            return;
        }
        self.health.set_status(format!(
            "connected to {}/{} intermediates ({}); {}",
            snap.connected(),
            snap.relays.len(),
            relays.join(", "),
            words.join(", ")
        ));
        // Ready while some relay takes new flows; a draining one only finishes what runs.
        self.health.set_ready(snap.usable() > 0);
    }
}

/// Control of a running agent (reload).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new configuration's certificate and CA to new connections; the current links
    /// and their flows keep running. Other changes need a restart. On error nothing changes.
    pub fn reload(&self, new: Config) -> Result<String, String> {
        let shared = &self.shared;
        new.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let old = &shared.config;
        ztna_node::warn_unapplied!(new, old;
            intermediates, forward, ops_listen, drain_timeout, bind, open_timeout,
            udp_idle_timeout, udp_query_idle_timeout, keepalive, idle_timeout, p2p, stream_window,
            connection_window,
            log_format,
        );
        shared
            .tls
            .reload(&new.tls, &shared.metrics.common.cert_expiry)
    }
}

enum Listener {
    Tcp(TcpListener),
    Udp(Arc<tokio::net::UdpSocket>),
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    endpoint: quinn::Endpoint,
    ops: Ops,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    listeners: Vec<(Forward, Listener)>,
}

impl Agent {
    /// Loads the identity, binds the QUIC endpoint and every local port (so a port in use is an
    /// error at startup, not later). Must be called inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Agent, StartError> {
        let tls = ClientTls::load(&config.tls, Role::Agent, config.transport())?;
        let bind_err = |source| StartError::Bind {
            what: "QUIC socket",
            addr: config.bind,
            source,
        };
        let (endpoint, puncher) = if config.p2p {
            let (e, p) = ztna_node::transport::punchable_endpoint(
                config.bind,
                quinn::EndpointConfig::default(),
                None,
            )
            .map_err(bind_err)?;
            (e, Some(p))
        } else {
            (
                ztna_node::transport::client_endpoint(config.bind).map_err(bind_err)?,
                None,
            )
        };
        let mut listeners = Vec::new();
        for f in &config.forward {
            let l = match f.protocol {
                ForwardProtocol::Tcp => {
                    Listener::Tcp(TcpListener::bind(f.listen).await.map_err(|source| {
                        StartError::Bind {
                            what: "TCP forward",
                            addr: f.listen,
                            source,
                        }
                    })?)
                }
                ForwardProtocol::Udp => {
                    if f.listen.ip().is_unspecified() {
                        // Replies leave from the address the route picks, not necessarily the
                        // one the client sent to; resolvers drop such answers.
                        tracing::warn!(service = %f.service, listen = %f.listen, "UDP forward on a wildcard address: on a host with several addresses (Docker bridges, loopback aliases, IPv6 privacy addresses) a reply may leave from another address than the client asked, and resolvers drop it; listen on the address clients use");
                    }
                    Listener::Udp(Arc::new(
                        ztna_node::udp::bound(f.listen, UDP_SOCKET_BUFFER)
                            .await
                            .map_err(|source| StartError::Bind {
                                what: "UDP forward",
                                addr: f.listen,
                                source,
                            })?,
                    ))
                }
            };
            listeners.push((f.clone(), l));
        }
        let list: Vec<(String, &'static str)> = config
            .forward
            .iter()
            .map(|f| (f.service.clone(), Protocol::from(f.protocol).as_str()))
            .collect();
        let metrics = Metrics::new(&list, config.intermediates.len());
        metrics.common.cert_expiry.set(tls.expiry_unix());
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Bind {
            what: "ops_listen",
            addr: config.ops_listen,
            source,
        })?;
        ztna_node::fdlimit::raise_nofile();
        let health = Health::new(config.idle_timeout.max(Duration::from_secs(5)));
        let (events_tx, events) = mpsc::unbounded_channel();
        let snapshot = Snapshot::new(&config.intermediates);
        Ok(Agent {
            endpoint: endpoint.clone(),
            ops,
            shared: Arc::new(Shared {
                config,
                tls,
                metrics,
                health,
                flows: Flows::new(),
                udp: udp::UdpFlows::default(),
                relays: watch::Sender::new(snapshot),
                events: events_tx,
                direct: direct::Direct::default(),
                endpoint: endpoint.clone(),
                puncher,
            }),
            events,
            listeners,
        })
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

    /// The local addresses actually bound, in `[[forward]]` order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, Protocol, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(f, l)| {
                let addr = match l {
                    Listener::Tcp(t) => t.local_addr().ok()?,
                    Listener::Udp(u) => u.local_addr().ok()?,
                };
                Some((f.service.clone(), f.protocol.into(), addr))
            })
            .collect()
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// What the agent knows about its relays, as it changes.
    pub fn relays(&self) -> watch::Receiver<Snapshot> {
        self.shared.relays.subscribe()
    }

    /// Runs until `shutdown` is cancelled, then drains: new local connections are refused at
    /// once, running flows may finish until `drain_timeout` (UDP flows only while active).
    pub async fn run(self, shutdown: CancellationToken) {
        let ports = self.local_addrs();
        let shared = self.shared;
        let health = shared.health.clone();
        shared.update_status(&shared.relays.borrow());
        let background = ztna_node::ops::start_background(
            self.ops.with_status(status::provider(&shared, ports)),
            shared.metrics.common.clone(),
            health.clone(),
            self.endpoint.local_addr().ok(),
        );
        info!(
            identity = %shared.tls.id(),
            intermediates = ?shared.config.intermediates,
            "agent starting"
        );
        tokio::spawn(relays::manage(self.events, shared.relays.clone()));
        // Status, readiness and availability metrics follow every snapshot, and the flow
        // count once a second (a drain's "N flows left" counts down as flows finish).
        let status = {
            let shared = shared.clone();
            let mut snaps = shared.relays.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STATUS_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    shared.update_status(&snaps.borrow_and_update());
                    tokio::select! {
                        changed = snaps.changed() => if changed.is_err() { return },
                        _ = tick.tick() => {}
                    }
                }
            })
        };
        let stop_links = CancellationToken::new();
        let mut links = tokio::task::JoinSet::new();
        for (index, target) in shared.config.intermediates.iter().enumerate() {
            let name = format!("link to {target}");
            let fut = link::supervise(
                shared.clone(),
                self.endpoint.clone(),
                index,
                target.clone(),
                shared.events.clone(),
                stop_links.clone(),
            );
            let h = health.clone();
            links.spawn(async move { h.watched(&name, fut).await });
        }
        let stop_accepting = CancellationToken::new();
        let mut forwards = tokio::task::JoinSet::new();
        for (f, l) in self.listeners {
            let addr = match &l {
                Listener::Tcp(t) => t.local_addr().ok(),
                Listener::Udp(u) => u.local_addr().ok(),
            };
            info!(service = %f.service, protocol = ?f.protocol, listen = ?addr, "forwarding");
            let name = format!("{:?} forward {}", f.protocol, f.service);
            let h = health.clone();
            match l {
                Listener::Tcp(t) => {
                    let fwd = forward::tcp(shared.clone(), f.service, t, stop_accepting.clone());
                    forwards.spawn(async move { h.watched(&name, fwd).await })
                }
                Listener::Udp(u) => {
                    let fwd = udp::udp(shared.clone(), f.service, u, stop_accepting.clone());
                    forwards.spawn(async move { h.watched(&name, fwd).await })
                }
            };
        }
        shutdown.cancelled().await;
        // The drain: refuse new local connections, let running flows finish.
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        health.set_stopping();
        let running = shared.flows.len();
        info!(running, timeout = ?shared.config.drain_timeout, "draining: new local connections are refused, running flows may finish");
        stop_accepting.cancel();
        shared.update_status(&shared.relays.borrow());
        let left = shared
            .flows
            .drain(deadline, UDP_DRAIN_GRACE, codes::SHUTDOWN)
            .await;
        if left > 0 {
            warn!(left, "drain timeout reached, closed the remaining flows");
        } else {
            info!("drain complete: no flows left");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while forwards.join_next().await.is_some() {}
        })
        .await;
        forwards.abort_all();
        stop_links.cancel();
        while links.join_next().await.is_some() {}
        status.abort();
        self.endpoint
            .close(quinn::VarInt::from_u32(codes::SHUTDOWN), b"agent stopped");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        background.cancel();
        info!("agent stopped");
    }
}

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Agent::bind(config).await?.run(shutdown).await;
    Ok(())
}

//! ztna-agent: exposes services on local ports and tunnels each connection through an
//! intermediate, failing over between intermediates.

pub mod cli;
pub mod config;
mod forward;
pub mod metrics;
mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::info;
use ztna_node::client::ClientTls;
use ztna_node::health::Health;
use ztna_node::identity::IdentityError;
use ztna_node::ops::Ops;
use ztna_node::CancellationToken;
use ztna_proto::{Protocol, Role, ServiceState};

pub use config::{Config, Forward, ForwardProtocol};
pub use metrics::Metrics;
pub use tunnel::Session;

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

impl Shared {
    pub fn client(&self) -> quinn::ClientConfig {
        self.tls.config()
    }

    /// Recomputes readiness and the status line (after a connection or service status change).
    pub fn update_status(&self) {
        let current = self.current.borrow().clone();
        let Some(session) = current.filter(|s| !s.retiring()) else {
            self.health.set_ready(false);
            self.health.set_status("connecting to an intermediate");
            return;
        };
        let services: Vec<String> = session
            .services()
            .into_iter()
            .map(|(name, state)| match state {
                ServiceState::Available => format!("{name} available"),
                ServiceState::Unavailable => format!("{name} unavailable (no connector)"),
                ServiceState::Denied => format!("{name} denied by policy"),
            })
            .collect();
        self.health.set_status(format!(
            "connected to {}; {}",
            session.intermediate,
            services.join(", ")
        ));
        self.health.set_ready(true);
    }
}

/// Control of a running agent (reload).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new configuration's certificate and CA to new connections; the current tunnel
    /// and its flows keep running. Other changes need a restart. On error nothing changes.
    pub fn reload(&self, new: Config) -> Result<String, String> {
        let shared = &self.shared;
        new.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        ztna_node::daemon::warn_unapplied(&[
            (
                "intermediates",
                new.intermediates != shared.config.intermediates,
            ),
            ("forward", new.forward != shared.config.forward),
            ("ops_listen", new.ops_listen != shared.config.ops_listen),
        ]);
        shared
            .tls
            .reload(&new.tls, &shared.metrics.common.cert_expiry)
    }
}

pub(crate) struct Shared {
    pub config: Config,
    /// Certificate and QUIC client config for new connections; replaced on reload.
    pub tls: ClientTls,
    pub metrics: Metrics,
    pub health: Health,
    /// The session new flows use; `None` while (re)connecting.
    pub current: watch::Sender<Option<Arc<Session>>>,
    pub next_udp_id: AtomicU64,
    /// What is known about the other intermediates, for moves made because a service has no
    /// connector via the current one.
    pub rehomes: std::sync::Mutex<tunnel::Rehomes>,
    /// Wakes the tunnel manager when a flow asked to move to the next intermediate.
    pub rehome_now: tokio::sync::Notify,
}

enum Listener {
    Tcp(TcpListener),
    Udp(Arc<UdpSocket>),
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    endpoint: quinn::Endpoint,
    ops: Ops,
    shared: Arc<Shared>,
    listeners: Vec<(Forward, Listener)>,
}

impl Agent {
    /// Loads the identity, binds the QUIC endpoint and every local port (so a port in use is an
    /// error at startup, not later). Must be called inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Agent, StartError> {
        let tls = ClientTls::load(&config.tls, Role::Agent, config.transport())?;
        let endpoint = ztna_node::transport::client_endpoint(config.bind).map_err(|source| {
            StartError::Bind {
                what: "QUIC socket",
                addr: config.bind,
                source,
            }
        })?;
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
                    Listener::Udp(Arc::new(UdpSocket::bind(f.listen).await.map_err(
                        |source| StartError::Bind {
                            what: "UDP forward",
                            addr: f.listen,
                            source,
                        },
                    )?))
                }
            };
            listeners.push((f.clone(), l));
        }
        let list: Vec<(String, &'static str)> = config
            .forward
            .iter()
            .map(|f| (f.service.clone(), Protocol::from(f.protocol).as_str()))
            .collect();
        let metrics = Metrics::new(&list);
        metrics.common.cert_expiry.set(tls.expiry_unix());
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Bind {
            what: "ops_listen",
            addr: config.ops_listen,
            source,
        })?;
        let health = Health::new(config.idle_timeout.max(std::time::Duration::from_secs(5)));
        Ok(Agent {
            endpoint,
            ops,
            shared: Arc::new(Shared {
                config,
                tls,
                metrics,
                health,
                current: watch::Sender::new(None),
                rehomes: std::sync::Mutex::new(tunnel::Rehomes::default()),
                rehome_now: tokio::sync::Notify::new(),
                next_udp_id: AtomicU64::new(1),
            }),
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

    /// The session new flows would use now (`None` while connecting).
    pub fn session(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.shared.current.subscribe()
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let health = shared.health.clone();
        shared.update_status();
        let background = ztna_node::ops::start_background(
            self.ops,
            shared.metrics.common.clone(),
            health.clone(),
        );
        info!(
            identity = %shared.tls.id(),
            intermediates = ?shared.config.intermediates,
            "agent starting"
        );
        let mut tasks = tokio::task::JoinSet::new();
        let manage = tunnel::manage(shared.clone(), self.endpoint.clone(), shutdown.clone());
        let h = health.clone();
        tasks.spawn(async move { h.watched("tunnel", manage).await });
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
                    let fwd = forward::tcp(shared.clone(), f.service, t, shutdown.clone());
                    tasks.spawn(async move { h.watched(&name, fwd).await })
                }
                Listener::Udp(u) => {
                    let fwd = forward::udp(shared.clone(), f.service, u, shutdown.clone());
                    tasks.spawn(async move { h.watched(&name, fwd).await })
                }
            };
        }
        shutdown.cancelled().await;
        health.set_stopping();
        health.set_status("stopping");
        while tasks.join_next().await.is_some() {}
        self.endpoint.close(
            quinn::VarInt::from_u32(ztna_proto::codes::SHUTDOWN),
            b"agent stopped",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
        background.cancel();
        info!("agent stopped");
    }
}

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Agent::bind(config).await?.run(shutdown).await;
    Ok(())
}

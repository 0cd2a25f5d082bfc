//! ztna-agent: exposes services on local ports and tunnels each connection through an
//! intermediate, failing over between intermediates.

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
use ztna_node::identity::IdentityError;
use ztna_node::{CancellationToken, Identity};
use ztna_proto::{Protocol, Role};

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

pub(crate) struct Shared {
    pub config: Config,
    pub identity: Identity,
    pub client: quinn::ClientConfig,
    pub metrics: Metrics,
    /// The session new flows use; `None` while (re)connecting.
    pub current: watch::Sender<Option<Arc<Session>>>,
    pub next_udp_id: AtomicU64,
}

enum Listener {
    Tcp(TcpListener),
    Udp(Arc<UdpSocket>),
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    listeners: Vec<(Forward, Listener)>,
}

impl Agent {
    /// Loads the identity, binds the QUIC endpoint and every local port (so a port in use is an
    /// error at startup, not later). Must be called inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Agent, StartError> {
        let identity = Identity::load(&config.tls, Role::Agent)?;
        let client = ztna_node::transport::client_config(
            &identity,
            Role::Intermediate,
            &config.transport(),
        )?;
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
        metrics.common.cert_expiry.set(identity.expiry_unix());
        Ok(Agent {
            endpoint,
            shared: Arc::new(Shared {
                config,
                identity,
                client,
                metrics,
                current: watch::Sender::new(None),
                next_udp_id: AtomicU64::new(1),
            }),
            listeners,
        })
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
        info!(identity = %shared.identity.id, intermediates = ?shared.config.intermediates, "agent starting");
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(tunnel::manage(
            shared.clone(),
            self.endpoint.clone(),
            shutdown.clone(),
        ));
        for (f, l) in self.listeners {
            let addr = match &l {
                Listener::Tcp(t) => t.local_addr().ok(),
                Listener::Udp(u) => u.local_addr().ok(),
            };
            info!(service = %f.service, protocol = ?f.protocol, listen = ?addr, "forwarding");
            match l {
                Listener::Tcp(t) => {
                    tasks.spawn(forward::tcp(shared.clone(), f.service, t, shutdown.clone()))
                }
                Listener::Udp(u) => {
                    tasks.spawn(forward::udp(shared.clone(), f.service, u, shutdown.clone()))
                }
            };
        }
        shutdown.cancelled().await;
        while tasks.join_next().await.is_some() {}
        self.endpoint.close(
            quinn::VarInt::from_u32(ztna_proto::codes::SHUTDOWN),
            b"agent stopped",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
        info!("agent stopped");
    }
}

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Agent::bind(config).await?.run(shutdown).await;
    Ok(())
}

//! ztna-connector: runs next to private backends, dials out to every intermediate, registers its
//! services and forwards flows to the backends.
//!
//! UDP flows use one *connected* socket per flow, and every datagram read is checked against the
//! flow's backend address, so no other local process can inject into the tunnel (seed finding 7).
//! The receive path reuses one arena per flow: no allocation per datagram (seed finding 14).

pub mod config;
mod flow;
pub mod metrics;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::info;
use ztna_node::identity::IdentityError;
use ztna_node::{CancellationToken, Identity};
use ztna_proto::Role;

pub use config::{Config, ServiceConfig};
pub use metrics::Metrics;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot bind QUIC socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub config: Config,
    pub services: HashMap<String, ServiceConfig>,
    pub identity: Identity,
    pub client: quinn::ClientConfig,
    pub metrics: Metrics,
    /// Flows running on any connection (drain waits for 0).
    pub active_flows: AtomicUsize,
    /// Set when the drain starts: sessions deregister and stop taking flows.
    pub draining: watch::Sender<bool>,
    /// Intermediates we are currently registered with, by index (for status and readiness).
    pub registered: watch::Sender<Vec<bool>>,
}

/// A bound connector, ready to [`run`](Connector::run).
pub struct Connector {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl Connector {
    /// Loads the identity and binds the QUIC endpoint. Must be called inside a Tokio runtime.
    pub fn bind(config: Config) -> Result<Connector, StartError> {
        let identity = Identity::load(&config.tls, Role::Connector)?;
        let client = ztna_node::transport::client_config(
            &identity,
            Role::Intermediate,
            &config.transport(),
        )?;
        let endpoint = ztna_node::transport::client_endpoint(config.bind).map_err(|source| {
            StartError::Bind {
                addr: config.bind,
                source,
            }
        })?;
        let list: Vec<(String, bool, bool)> = config
            .service
            .iter()
            .map(|s| (s.name.clone(), s.tcp.is_some(), s.udp.is_some()))
            .collect();
        let metrics = Metrics::new(&list, config.intermediates.len());
        metrics.common.cert_expiry.set(identity.expiry_unix());
        let services = config
            .service
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let n = config.intermediates.len();
        Ok(Connector {
            endpoint,
            shared: Arc::new(Shared {
                config,
                services,
                identity,
                client,
                metrics,
                active_flows: AtomicUsize::new(0),
                draining: watch::Sender::new(false),
                registered: watch::Sender::new(vec![false; n]),
            }),
        })
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// Number of intermediates the connector is registered with, as it changes.
    pub fn registered(&self) -> watch::Receiver<Vec<bool>> {
        self.shared.registered.subscribe()
    }

    /// Runs until `shutdown` is cancelled, then deregisters everywhere, drains flows and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        info!(
            identity = %shared.identity.id,
            intermediates = ?shared.config.intermediates,
            services = ?shared.services.keys().collect::<Vec<_>>(),
            "connector starting"
        );
        let mut tasks = tokio::task::JoinSet::new();
        let stop_sessions = CancellationToken::new();
        for (idx, target) in shared.config.intermediates.iter().enumerate() {
            tasks.spawn(session::supervise(
                shared.clone(),
                self.endpoint.clone(),
                idx,
                target.clone(),
                stop_sessions.clone(),
            ));
        }
        shutdown.cancelled().await;
        info!("draining: deregistering services on every intermediate");
        shared.draining.send_replace(true);
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        // Sessions deregister as soon as they see the drain; give them a moment to do so, then
        // wait for running flows.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while shared.active_flows.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = shared.active_flows.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(left, "drain timeout reached, closing remaining flows");
        }
        stop_sessions.cancel();
        while tasks.join_next().await.is_some() {}
        self.endpoint.close(
            quinn::VarInt::from_u32(ztna_proto::codes::SHUTDOWN),
            b"connector stopped",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("connector stopped");
    }
}

/// Runs a connector until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Connector::bind(config)?.run(shutdown).await;
    Ok(())
}

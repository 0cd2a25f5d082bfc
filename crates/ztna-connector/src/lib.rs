//! ztna-connector: runs next to private backends, dials out to every intermediate, registers its
//! services and forwards flows to the backends.
//!
//! UDP flows use one *connected* socket per flow, and every datagram read is checked against the
//! flow's backend address, so no other local process can inject into the tunnel (seed finding 7).
//! The receive path reuses one arena per flow: no allocation per datagram (seed finding 14).

pub mod cli;
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
use ztna_node::client::ClientTls;
use ztna_node::health::Health;
use ztna_node::identity::IdentityError;
use ztna_node::ops::Ops;
use ztna_node::CancellationToken;
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
    #[error("cannot listen on ops_listen {addr}: {source}")]
    Ops {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub config: Config,
    pub services: HashMap<String, ServiceConfig>,
    /// Certificate and QUIC client config for new connections; replaced on reload.
    pub tls: ClientTls,
    pub metrics: Metrics,
    pub health: Health,
    /// Flows running on any connection (drain waits for 0).
    pub active_flows: AtomicUsize,
    /// Set when the drain starts: sessions deregister and stop taking flows.
    pub draining: watch::Sender<bool>,
    /// Intermediates we are currently registered with, by index (for status and readiness).
    pub registered: watch::Sender<Vec<bool>>,
}

impl Shared {
    pub fn client(&self) -> quinn::ClientConfig {
        self.tls.config()
    }

    /// Recomputes readiness and the status line after a registration change.
    pub fn update_status(&self) {
        let registered = self.registered.borrow().clone();
        let n = registered.iter().filter(|b| **b).count();
        self.metrics.intermediates_connected.set(n as i64);
        if *self.draining.borrow() {
            let flows = self.active_flows.load(Ordering::Relaxed);
            self.health
                .set_status(format!("draining: deregistered, {flows} flows left"));
            return;
        }
        let mut names: Vec<&str> = self.services.keys().map(String::as_str).collect();
        names.sort_unstable();
        self.health.set_status(format!(
            "registered {} on {n}/{} intermediates",
            names.join(","),
            registered.len()
        ));
        self.health.set_ready(n > 0);
    }
}

/// A bound connector, ready to [`run`](Connector::run).
pub struct Connector {
    endpoint: quinn::Endpoint,
    ops: Ops,
    shared: Arc<Shared>,
}

/// Control of a running connector (reload).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new configuration's certificate and CA to new connections; established
    /// connections and their flows keep running. Other changes need a restart. On error nothing
    /// changes.
    pub fn reload(&self, new: Config) -> Result<String, String> {
        let shared = &self.shared;
        new.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let old = &shared.config;
        let same_services = new.service.len() == old.service.len()
            && new.service.iter().all(|s| {
                shared
                    .services
                    .get(&s.name)
                    .is_some_and(|o| o.tcp == s.tcp && o.udp == s.udp)
            });
        ztna_node::daemon::warn_unapplied(&[
            ("intermediates", new.intermediates != old.intermediates),
            ("service", !same_services),
            ("ops_listen", new.ops_listen != old.ops_listen),
            ("bind", new.bind != old.bind),
        ]);
        shared
            .tls
            .reload(&new.tls, &shared.metrics.common.cert_expiry)
    }
}

impl Connector {
    /// Loads the identity and binds the QUIC endpoint. Must be called inside a Tokio runtime.
    pub fn bind(config: Config) -> Result<Connector, StartError> {
        let tls = ClientTls::load(&config.tls, Role::Connector, config.transport())?;
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Ops {
            addr: config.ops_listen,
            source,
        })?;
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
        metrics.common.cert_expiry.set(tls.expiry_unix());
        let services = config
            .service
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let n = config.intermediates.len();
        let health = Health::new(config.idle_timeout.max(Duration::from_secs(5)));
        Ok(Connector {
            endpoint,
            ops,
            shared: Arc::new(Shared {
                config,
                services,
                tls,
                metrics,
                health,
                active_flows: AtomicUsize::new(0),
                draining: watch::Sender::new(false),
                registered: watch::Sender::new(vec![false; n]),
            }),
        })
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
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

    /// Number of intermediates the connector is registered with, as it changes.
    pub fn registered(&self) -> watch::Receiver<Vec<bool>> {
        self.shared.registered.subscribe()
    }

    /// Runs until `shutdown` is cancelled, then deregisters everywhere, drains flows and returns.
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
            services = ?shared.services.keys().collect::<Vec<_>>(),
            "connector starting"
        );
        let mut tasks = tokio::task::JoinSet::new();
        let stop_sessions = CancellationToken::new();
        for (idx, target) in shared.config.intermediates.iter().enumerate() {
            let name = format!("session with {target}");
            let session = session::supervise(
                shared.clone(),
                self.endpoint.clone(),
                idx,
                target.clone(),
                stop_sessions.clone(),
            );
            let health = health.clone();
            tasks.spawn(async move { health.watched(&name, session).await });
        }
        shutdown.cancelled().await;
        info!("draining: deregistering services on every intermediate");
        health.set_stopping();
        shared.draining.send_replace(true);
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        // Sessions deregister as soon as they see the drain (no new flow is routed here), then
        // running flows may finish.
        let mut registered = shared.registered.subscribe();
        let _ =
            tokio::time::timeout_at(deadline, registered.wait_for(|v| v.iter().all(|b| !b))).await;
        while shared.active_flows.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            shared.update_status();
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
        background.cancel();
        info!("connector stopped");
    }
}

/// Runs a connector until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Connector::bind(config)?.run(shutdown).await;
    Ok(())
}

//! ztna-intermediate: the public QUIC relay.
//!
//! Authenticates every peer by mTLS (SPIFFE role checked), authorizes registrations and flows by
//! a default-deny [`policy`], keeps the [`registry`] of service → connectors, relays TCP flows as
//! spliced QUIC streams and UDP flows as rewritten datagrams, reports each client's observed
//! address, and drains gracefully.
//!
//! Where things live: [`accept`](accept) (handshakes), `session` (one peer's control stream,
//! flows and datagrams as separate tasks), `flow` (opening a flow at a connector and relaying
//! it), `datagrams` (the UDP datagram relay), `limits`, `drain`, `reload`.

pub mod cli;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod status;

mod accept;
mod datagrams;
mod direct;
mod drain;
mod flow;
mod reload;
mod session;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};
use ztna_node::flows::Flows;
use ztna_node::health::Health;
use ztna_node::identity::IdentityError;
use ztna_node::ops::Ops;
use ztna_node::{CancellationToken, Identity};
use ztna_proto::Role;

pub use config::Config;

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::state::Shared;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr}: {source}")]
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

/// A bound intermediate, ready to [`run`](Intermediate::run).
pub struct Intermediate {
    endpoint: quinn::Endpoint,
    ops: Ops,
    shared: Arc<Shared>,
}

/// Control of a running intermediate (reload), usable while [`Intermediate::run`] runs.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new configuration's certificates, CA and policy without touching what the new
    /// configuration still allows: new handshakes use the new certificate and CA; peers whose
    /// certificate the new CA does not accept are disconnected; registrations and flows are
    /// re-evaluated under the new policy in both directions. On error nothing changes.
    pub fn reload(&self, new: Config) -> Result<String, String> {
        reload::apply(&self.shared, new)
    }
}

impl Intermediate {
    /// Loads the identity and binds the QUIC socket. Must be called inside a Tokio runtime.
    pub fn bind(config: Config) -> Result<Intermediate, StartError> {
        let (identity, _) = Identity::load_verified(&config.tls, Role::Intermediate)?;
        let server = ztna_node::transport::server_config(
            &identity,
            &[Role::Agent, Role::Connector],
            &config.transport(),
        )?;
        let bind_err = |source| StartError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_err)?;
        ztna_node::transport::size_quic_socket(&socket, ztna_node::transport::RELAY_SOCKET_BUFFER);
        let endpoint = quinn::Endpoint::new(
            ztna_node::transport::restart_aware_endpoint_config(&identity),
            Some(server),
            socket,
            std::sync::Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Ops {
            addr: config.ops_listen,
            source,
        })?;
        let metrics = Metrics::new();
        metrics.common.cert_expiry.set(identity.expiry_unix());
        metrics
            .drain_timeout
            .set(config.drain_timeout.as_secs_f64());
        // Every service the policy knows shows up at 0 until a connector registers it, so a
        // service that never got a connector alerts like one that lost it.
        for rule in &config.policy {
            metrics
                .service_connectors
                .with_label_values(&[&rule.service]);
        }
        let registry = Registry::new(
            metrics.service_connectors.clone(),
            config.policy.iter().map(|r| r.service.clone()),
        );
        let policy = Arc::new(Policy::new(config.policy.clone()));
        let health = Health::new(config.idle_timeout.max(Duration::from_secs(5)));
        let limits = limits::Limits::new(&config);
        Ok(Intermediate {
            endpoint: endpoint.clone(),
            ops,
            shared: Arc::new(Shared {
                config,
                endpoint,
                health,
                identity: RwLock::new(identity),
                policy: RwLock::new(policy),
                registry,
                metrics,
                flows: Flows::new(),
                limits,
                draining: watch::Sender::new(false),
                peers: Mutex::new(HashMap::new()),
                next_conn_id: AtomicU64::new(1),
                reloads: AtomicU64::new(0),
                handshakes_pending: accept::Pending::new(),
                direct: direct::Broker::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
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

    /// Serves until `shutdown` is cancelled, then drains: refuses new connections, sends GoAway to
    /// every peer, lets flows finish until `drain_timeout` (UDP flows only while they are
    /// active), closes and waits for peers to be told.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let health = shared.health.clone();
        health.set_status("serving: 0 agents, 0 connectors, 0 flows");
        shared.update_ready();
        let background = ztna_node::ops::start_background(
            self.ops.with_status(status::provider(&shared)),
            shared.metrics.common.clone(),
            health.clone(),
            self.endpoint.local_addr().ok(),
        );
        tokio::spawn(status_loop(shared.clone(), background.clone()));
        info!(
            listen = %self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            identity = %shared.identity().id,
            rules = shared.policy().rules().len(),
            "intermediate listening"
        );
        if shared.policy().rules().is_empty() {
            warn!("no [[policy]] rules: every registration and flow will be denied");
        }
        health
            .watched(
                "accept loop",
                accept::accept_loop(shared.clone(), self.endpoint.clone(), shutdown),
            )
            .await;
        drain::drain(&self.endpoint, &shared).await;
        background.cancel();
    }
}

/// How often every peer's RTT goes into `ztna_intermediate_peer_rtt_seconds`: one sweep for all
/// peers, not a timer per connection (10,000 idle agents: 2,000 wake-ups a second).
const RTT_SAMPLE_EVERY: u64 = 5;

/// Keeps the operator status line and readiness current, and samples the peers' RTT.
async fn status_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if ticks.is_multiple_of(RTT_SAMPLE_EVERY) {
            sample_rtt(&shared);
        }
        let (agents, connectors) = {
            let peers = ztna_node::lock(&shared.peers);
            let agents = peers.values().filter(|p| p.role == Role::Agent).count();
            (agents, peers.len() - agents)
        };
        let flows = shared.flows.len();
        let status = if shared.is_draining() {
            format!("draining: {flows} flows left")
        } else {
            let (n, max) = shared.limits.saturation();
            if n >= max {
                format!("saturated: {n}/{max} flows (max_flows); {agents} agents, {connectors} connectors")
            } else {
                format!("serving: {agents} agents, {connectors} connectors, {flows} flows")
            }
        };
        shared.health.set_status(status);
        shared
            .metrics
            .handshakes_in_progress
            .set(shared.handshakes_pending.get() as i64);
        shared
            .metrics
            .quic_connections
            .set(shared.endpoint.open_connections() as i64);
        shared.update_ready();
    }
}

fn sample_rtt(shared: &Shared) {
    let peers: Vec<Arc<registry::Peer>> =
        ztna_node::lock(&shared.peers).values().cloned().collect();
    let (agents, connectors) = (shared.metrics.rtt("agent"), shared.metrics.rtt("connector"));
    for p in peers {
        let hist = if p.role == Role::Agent {
            &agents
        } else {
            &connectors
        };
        hist.observe(p.conn.rtt().as_secs_f64());
    }
}

/// Runs an intermediate until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Intermediate::bind(config)?.run(shutdown).await;
    Ok(())
}

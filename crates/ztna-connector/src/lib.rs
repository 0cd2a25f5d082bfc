//! ztna-connector: runs next to private backends, dials out to every intermediate, registers its
//! services and forwards flows to the backends.
//!
//! UDP flows use one *connected* socket per flow, and every datagram read is checked against the
//! flow's backend address, so the kernel drops datagrams from other sources before we read them
//! and anything that slips through is refused and counted. The receive path reuses one arena per
//! flow: no allocation per datagram.

pub mod backend;
pub mod cli;
pub mod config;
mod direct;
mod flow;
pub mod metrics;
mod session;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};
use ztna_node::client::ClientTls;
use ztna_node::flows::Flows;
use ztna_node::health::Health;
use ztna_node::identity::IdentityError;
use ztna_node::ops::Ops;
use ztna_node::CancellationToken;
use ztna_proto::{codes, Role};

pub use backend::{Backend, Resolver};
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

/// Where one service stands with one intermediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Asked, no answer yet.
    Pending,
    Registered,
    /// Refused (policy), with the intermediate's reason. A policy reload there may still
    /// register it later; the intermediate then says so.
    Rejected(String),
}

/// Per configured intermediate (in config order): the standing of each service there; empty
/// while not connected.
pub type Registrations = Vec<BTreeMap<String, Registration>>;

/// What the flow table knows of each flow.
#[derive(Clone)]
pub(crate) struct FlowMeta {
    pub service: Arc<str>,
    /// On a direct (P2P) path: that connection and its agent (per-agent limit, revocation when
    /// the service's ticket lapses).
    pub direct: Option<direct::FlowOf>,
}

pub(crate) struct Shared {
    pub config: Config,
    pub services: HashMap<String, ServiceConfig>,
    /// Certificate and QUIC client config for new connections; replaced on reload.
    pub tls: ClientTls,
    pub metrics: Metrics,
    pub health: Health,
    pub flows: Flows<FlowMeta>,
    /// `max_flows`, lowered to fit the descriptor limit.
    pub max_flows: usize,
    /// Set when the drain starts: sessions deregister and stop taking flows.
    pub draining: watch::Sender<bool>,
    /// What is registered where (status, readiness, metrics).
    pub registrations: watch::Sender<Registrations>,
    /// Sends hole-punching packets from the endpoint's socket (when P2P is on).
    pub puncher: Option<ztna_node::transport::Puncher>,
    /// Direct-path offers answered, waiting for their start signal.
    pub offers: direct::Offers,
    /// Certificates of the intermediates we are connected to, by SPIFFE ID: direct-path tickets
    /// must be signed by one of them. With the number of connections to it.
    pub intermediate_certs:
        std::sync::Mutex<HashMap<String, (ztna_node::CertificateDer<'static>, usize)>>,
    /// Backend host names to addresses (cached briefly).
    pub resolver: Resolver,
    /// Direct connections open per agent identity.
    pub direct_per_agent: std::sync::Mutex<HashMap<String, usize>>,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Records the standing of `service` on intermediate `idx` (`None`: forget everything there,
    /// the connection is gone) and recomputes status, readiness and metrics.
    pub fn set_registration(&self, idx: usize, service: Option<(&str, Registration)>) {
        self.registrations.send_modify(|regs| {
            if let Some(slot) = regs.get_mut(idx) {
                match service {
                    Some((s, r)) => {
                        slot.insert(s.to_string(), r);
                    }
                    None => slot.clear(),
                }
            }
        });
        self.update_status();
    }

    /// Recomputes readiness, the status line and the registration metrics from what is
    /// registered where.
    pub fn update_status(&self) {
        let regs = self.registrations.borrow().clone();
        let targets = &self.config.intermediates;
        let registered_on = |i: usize| {
            regs[i]
                .values()
                .any(|r| matches!(r, Registration::Registered))
        };
        let connected = (0..regs.len()).filter(|i| registered_on(*i)).count();
        self.metrics.intermediates_connected.set(connected as i64);
        let mut names: Vec<&str> = self.services.keys().map(String::as_str).collect();
        names.sort_unstable();
        for s in &names {
            let n = regs
                .iter()
                .filter(|r| matches!(r.get(*s), Some(Registration::Registered)))
                .count();
            self.metrics
                .service_registrations
                .with_label_values(&[s])
                .set(n as i64);
        }
        let flows = self.flows.len();
        if self.is_draining() {
            self.health.set_ready(false);
            self.health
                .set_status(format!("draining: deregistered, {flows} flows left"));
            return;
        }
        let saturated = flows >= self.max_flows;
        // "registered web,dns on 2/2 intermediates", or per service where they differ, with the
        // reason a registration was refused.
        let mut parts: Vec<(usize, Vec<&str>)> = Vec::new();
        let mut refusals = Vec::new();
        for s in &names {
            let n = regs
                .iter()
                .filter(|r| matches!(r.get(*s), Some(Registration::Registered)))
                .count();
            match parts.iter_mut().find(|(k, _)| *k == n) {
                Some((_, v)) => v.push(s),
                None => parts.push((n, vec![s])),
            }
            for (i, r) in regs.iter().enumerate() {
                if let Some(Registration::Rejected(why)) = r.get(*s) {
                    refusals.push(format!("{s} rejected by {}: {why}", targets[i]));
                }
            }
        }
        parts.sort_by_key(|p| std::cmp::Reverse(p.0));
        let total = targets.len();
        let mut line = parts
            .iter()
            .map(|(n, v)| format!("{} on {n}/{total} intermediates", v.join(",")))
            .collect::<Vec<_>>()
            .join(", ");
        line = format!("registered {line}");
        if !refusals.is_empty() {
            line.push_str(&format!(" ({})", refusals.join("; ")));
        }
        if saturated {
            line = format!(
                "saturated: {flows}/{} flows (max_flows); {line}",
                self.max_flows
            );
        }
        self.health.set_status(line);
        self.health.set_ready(connected > 0 && !saturated);
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
    endpoint: Arc<std::sync::Mutex<Option<quinn::Endpoint>>>,
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
        ztna_node::daemon::warn_unapplied(&[("service", !same_services)]);
        ztna_node::warn_unapplied!(new, old;
            intermediates, ops_listen, bind, max_flows, max_direct_flows_per_agent,
            drain_timeout, connect_timeout,
            udp_idle_timeout, tcp_idle_timeout, keepalive, idle_timeout, p2p, stream_window,
            connection_window, log_format,
        );
        // The direct paths' server config is built from the new identity before anything
        // changes, so a reload either applies entirely or not at all.
        let (summary, server) =
            shared
                .tls
                .reload_with(&new.tls, &shared.metrics.common.cert_expiry, |identity| {
                    if !shared.config.p2p {
                        return Ok(None);
                    }
                    direct_server_config(identity, &shared.config)
                        .map(Some)
                        .map_err(|e| e.to_string())
                })?;
        if let (Some(server), Some(endpoint)) = (server, &*ztna_node::lock(&self.endpoint)) {
            endpoint.set_server_config(Some(server));
        }
        Ok(summary)
    }
}

/// The server side of direct paths: agents only (mutual TLS), detection of a dead path within
/// 3 s (idle timeout 3 s; the agent pings every second, we only as a backstop), as many streams
/// as one agent may have direct flows.
fn direct_server_config(
    identity: &ztna_node::Identity,
    config: &Config,
) -> Result<quinn::ServerConfig, IdentityError> {
    let mut opts = config.transport();
    opts.idle_timeout = Duration::from_secs(3);
    // One agent's flows: a connection never needs more streams than its agent may have flows.
    opts.max_streams = config.max_direct_flows_per_agent.saturating_add(16);
    opts.keepalive = ztna_node::transport::server_keepalive(opts.idle_timeout);
    ztna_node::transport::server_config(identity, &[Role::Agent], &opts)
}

impl Connector {
    /// Loads the identity and binds the QUIC endpoint. Must be called inside a Tokio runtime.
    pub fn bind(config: Config) -> Result<Connector, StartError> {
        Connector::bind_with_resolver(config, Resolver::system())
    }

    /// [`bind`](Connector::bind), with backend names resolved by `resolver` instead of the
    /// system's resolver.
    pub fn bind_with_resolver(config: Config, resolver: Resolver) -> Result<Connector, StartError> {
        let tls = ClientTls::load(&config.tls, Role::Connector, config.transport())?;
        let ops = Ops::bind(config.ops_listen).map_err(|source| StartError::Ops {
            addr: config.ops_listen,
            source,
        })?;
        let bind_err = |source| StartError::Bind {
            addr: config.bind,
            source,
        };
        let (endpoint, puncher) = if config.p2p {
            let server = direct_server_config(&tls.identity(), &config)?;
            let (e, p) = ztna_node::transport::punchable_endpoint(
                config.bind,
                quinn::EndpointConfig::default(),
                Some(server),
            )
            .map_err(bind_err)?;
            (e, Some(p))
        } else {
            (
                ztna_node::transport::client_endpoint(config.bind).map_err(bind_err)?,
                None,
            )
        };
        let list: Vec<(String, bool, bool)> = config
            .service
            .iter()
            .map(|s| (s.name.clone(), s.tcp.is_some(), s.udp.is_some()))
            .collect();
        let metrics = Metrics::new(&list, config.intermediates.len());
        metrics.common.cert_expiry.set(tls.expiry_unix());
        let max_flows = ztna_node::fdlimit::flow_budget(config.max_flows);
        if max_flows < config.max_flows {
            warn!(
                max_flows,
                configured = config.max_flows,
                "max_flows lowered to fit the descriptor limit (raise LimitNOFILE / ulimit -n)"
            );
        }
        metrics.flow_capacity.set(i64::from(max_flows));
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
                flows: Flows::new(),
                max_flows: max_flows as usize,
                draining: watch::Sender::new(false),
                registrations: watch::Sender::new(vec![BTreeMap::new(); n]),
                puncher,
                offers: direct::Offers::default(),
                intermediate_certs: std::sync::Mutex::new(HashMap::new()),
                direct_per_agent: std::sync::Mutex::new(HashMap::new()),
                resolver,
            }),
        })
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// The QUIC endpoint's local address (direct paths arrive here).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
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
            endpoint: Arc::new(std::sync::Mutex::new(Some(self.endpoint.clone()))),
        }
    }

    /// What is registered where, as it changes.
    pub fn registrations(&self) -> watch::Receiver<Registrations> {
        self.shared.registrations.subscribe()
    }

    /// Runs until `shutdown` is cancelled, then deregisters everywhere, drains flows and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let health = shared.health.clone();
        shared.update_status();
        let background = ztna_node::ops::start_background(
            self.ops.with_status(status::provider(&shared)),
            shared.metrics.common.clone(),
            health.clone(),
            self.endpoint.local_addr().ok(),
        );
        info!(
            identity = %shared.tls.id(),
            intermediates = ?shared.config.intermediates,
            services = ?shared.services.keys().collect::<Vec<_>>(),
            max_flows = shared.max_flows,
            "connector starting"
        );
        tokio::spawn(check_backend_names(shared.clone()));
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
        if shared.config.p2p {
            tokio::spawn(direct::accept(
                shared.clone(),
                self.endpoint.clone(),
                stop_sessions.clone(),
            ));
        }
        // Status follows the flow count too (saturation).
        let status = {
            let shared = shared.clone();
            let stop = background.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => shared.update_status(),
                    }
                }
            })
        };
        shutdown.cancelled().await;
        info!("draining: deregistering services on every intermediate");
        health.set_stopping();
        shared.draining.send_replace(true);
        shared.update_status();
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        // Sessions deregister as soon as they see the drain (no new flow is routed here), then
        // running flows may finish.
        let mut regs = shared.registrations.subscribe();
        let _ = tokio::time::timeout_at(
            deadline,
            regs.wait_for(|v| {
                v.iter()
                    .all(|r| !r.values().any(|s| matches!(s, Registration::Registered)))
            }),
        )
        .await;
        let left = shared
            .flows
            .drain(deadline, UDP_DRAIN_GRACE, codes::SHUTDOWN)
            .await;
        if left > 0 {
            warn!(left, "drain timeout reached, closed the remaining flows");
        }
        stop_sessions.cancel();
        while tasks.join_next().await.is_some() {}
        status.abort();
        self.endpoint.close(
            quinn::VarInt::from_u32(codes::SHUTDOWN),
            b"connector stopped",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        background.cancel();
        info!("connector stopped");
    }
}

/// Backends given by name are resolved when a flow opens; this looks each one up once at start
/// (which also fills the cache), so a name that does not resolve is in the log before a user
/// runs into it.
async fn check_backend_names(shared: Arc<Shared>) {
    for s in &shared.config.service {
        for (protocol, backend) in [("tcp", &s.tcp), ("udp", &s.udp)] {
            let Some(backend) = backend.as_ref().filter(|b| b.addr().is_none()) else {
                continue;
            };
            match shared
                .resolver
                .resolve(backend, shared.config.connect_timeout)
                .await
            {
                Ok(addrs) => {
                    info!(service = %s.name, protocol, %backend, ?addrs, "backend name resolves")
                }
                Err(why) => warn!(
                    service = %s.name,
                    protocol,
                    %why,
                    "backend name does not resolve now: its flows are refused until it does"
                ),
            }
        }
    }
}

/// A UDP flow quiet for this long does not hold a drain.
const UDP_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Runs a connector until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Connector::bind(config)?.run(shutdown).await;
    Ok(())
}

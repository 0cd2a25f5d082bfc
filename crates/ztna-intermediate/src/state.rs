//! What the intermediate's tasks share.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;
use ztna_node::flows::Flows;
use ztna_node::health::Health;
use ztna_node::Identity;

use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::registry::{Peer, Registry};

/// What the flow table knows of each flow (for revocation on a policy reload).
#[derive(Clone)]
pub(crate) struct FlowMeta {
    pub agent: Arc<str>,
    pub service: Arc<str>,
    pub connector: Arc<str>,
}

pub(crate) struct Shared {
    pub config: Config,
    pub endpoint: quinn::Endpoint,
    pub health: Health,
    /// Our own identity (its CA verifies peers; replaced on reload).
    pub identity: RwLock<Identity>,
    pub policy: RwLock<Arc<Policy>>,
    pub registry: Registry,
    pub metrics: Metrics,
    pub flows: Flows<FlowMeta>,
    pub limits: Arc<Limits>,
    /// Becomes true when the drain starts; sessions send GoAway on the change.
    pub draining: watch::Sender<bool>,
    /// Every established session, by connection id (for reload re-verification).
    pub peers: Mutex<HashMap<u64, Arc<Peer>>>,
    pub next_conn_id: AtomicU64,
    /// Reloads of the identity and CA so far: a session that began before one re-checks its
    /// peer's chain (the reload's walk over `peers` may have missed it).
    pub reloads: AtomicU64,
    /// Direct-path offers waiting for connectors' answers.
    pub direct: crate::direct::Broker,
    /// QUIC handshakes in progress (flood defence).
    pub handshakes_pending: crate::accept::Pending,
}

impl Shared {
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn identity(&self) -> Identity {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Readiness: listening, not draining, not at the flow limit.
    pub fn update_ready(&self) {
        let (flows, max) = self.limits.saturation();
        self.health.set_ready(!self.is_draining() && flows < max);
    }
}

//! Resource limits that no single identity can exceed, however many connections it opens:
//! concurrent flows per agent identity, per connector connection and in total, and concurrent
//! connections per identity. Each admitted flow or connection holds a slot; dropping the slot
//! gives it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;

/// Which limit refused something (the `limit` label of
/// `ztna_intermediate_limit_rejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    FlowsPerAgent,
    FlowsPerConnector,
    Flows,
    ConnectionsPerIdentity,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::FlowsPerAgent => "flows_per_agent",
            Limit::FlowsPerConnector => "flows_per_connector",
            Limit::Flows => "flows",
            Limit::ConnectionsPerIdentity => "connections_per_identity",
        }
    }

    /// The config key that sets it.
    pub fn key(self) -> &'static str {
        match self {
            Limit::FlowsPerAgent => "max_flows_per_agent",
            Limit::FlowsPerConnector => "max_flows_per_connector",
            Limit::Flows => "max_flows",
            Limit::ConnectionsPerIdentity => "max_connections_per_identity",
        }
    }

    pub const ALL: [Limit; 4] = [
        Limit::FlowsPerAgent,
        Limit::FlowsPerConnector,
        Limit::Flows,
        Limit::ConnectionsPerIdentity,
    ];
}

#[derive(Default)]
struct Counts {
    flows_by_agent: HashMap<Arc<str>, usize>,
    flows_by_connector: HashMap<u64, usize>,
    flows: usize,
    conns_by_identity: HashMap<Arc<str>, usize>,
}

pub struct Limits {
    per_agent: usize,
    per_connector: usize,
    total: usize,
    conns_per_identity: usize,
    counts: Mutex<Counts>,
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Limits {
    pub fn new(c: &Config) -> Arc<Limits> {
        Arc::new(Limits {
            per_agent: c.max_flows_per_agent as usize,
            per_connector: c.max_flows_per_connector as usize,
            total: c.max_flows as usize,
            conns_per_identity: c.max_connections_per_identity as usize,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        ztna_node::lock(&self.counts)
    }

    /// Admits a flow of `agent`, counted against the agent's and the total limit.
    pub fn admit_flow(self: &Arc<Self>, agent: &Arc<str>) -> Result<FlowSlot, Limit> {
        let mut c = self.counts();
        if c.flows >= self.total {
            return Err(Limit::Flows);
        }
        let n = c.flows_by_agent.get(agent).copied().unwrap_or(0);
        if n >= self.per_agent {
            return Err(Limit::FlowsPerAgent);
        }
        c.flows_by_agent.insert(agent.clone(), n + 1);
        c.flows += 1;
        Ok(FlowSlot {
            limits: self.clone(),
            agent: agent.clone(),
            connector: None,
        })
    }

    /// Counts the flow against connector connection `conn_id` as well.
    pub fn assign_connector(&self, slot: &mut FlowSlot, conn_id: u64) -> Result<(), Limit> {
        let mut c = self.counts();
        if let Some(old) = slot.connector.take() {
            dec(&mut c.flows_by_connector, &old);
        }
        let n = c.flows_by_connector.get(&conn_id).copied().unwrap_or(0);
        if n >= self.per_connector {
            return Err(Limit::FlowsPerConnector);
        }
        c.flows_by_connector.insert(conn_id, n + 1);
        slot.connector = Some(conn_id);
        Ok(())
    }

    /// Flows through this intermediate, and whether that is at the limit (not ready).
    pub fn saturation(&self) -> (usize, usize) {
        (self.counts().flows, self.total)
    }

    /// Admits a connection of `identity`.
    pub fn admit_connection(self: &Arc<Self>, identity: &Arc<str>) -> Result<ConnSlot, Limit> {
        let mut c = self.counts();
        let n = c.conns_by_identity.get(identity).copied().unwrap_or(0);
        if n >= self.conns_per_identity {
            return Err(Limit::ConnectionsPerIdentity);
        }
        c.conns_by_identity.insert(identity.clone(), n + 1);
        Ok(ConnSlot {
            limits: self.clone(),
            identity: identity.clone(),
        })
    }
}

/// A flow's place under the limits.
pub struct FlowSlot {
    limits: Arc<Limits>,
    agent: Arc<str>,
    connector: Option<u64>,
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        dec(&mut c.flows_by_agent, &self.agent);
        if let Some(conn) = self.connector {
            dec(&mut c.flows_by_connector, &conn);
        }
        c.flows = c.flows.saturating_sub(1);
    }
}

/// A connection's place under the per-identity limit.
pub struct ConnSlot {
    limits: Arc<Limits>,
    identity: Arc<str>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        dec(&mut self.limits.counts().conns_by_identity, &self.identity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_agent: u32, per_connector: u32, total: u32, conns: u32) -> Arc<Limits> {
        Arc::new(Limits {
            per_agent: per_agent as usize,
            per_connector: per_connector as usize,
            total: total as usize,
            conns_per_identity: conns as usize,
            counts: Mutex::new(Counts::default()),
        })
    }

    #[test]
    fn per_identity_across_connections_and_slots_come_back() {
        let l = limits(2, 2, 5, 1);
        let id = |s: &str| -> Arc<str> { Arc::from(s) };
        let (a, b, c) = (id("agent/a"), id("agent/b"), id("agent/c"));
        let a1 = l.admit_flow(&a).unwrap();
        let _a2 = l.admit_flow(&a).unwrap();
        assert_eq!(l.admit_flow(&a).err(), Some(Limit::FlowsPerAgent));
        let mut b1 = l.admit_flow(&b).unwrap();
        let mut b2 = l.admit_flow(&b).unwrap();
        let mut c1 = l.admit_flow(&c).unwrap();
        assert_eq!(l.admit_flow(&c).err(), Some(Limit::Flows));
        assert_eq!(l.saturation(), (5, 5));
        drop(a1);
        let _a3 = l.admit_flow(&a).expect("a slot came back");
        l.assign_connector(&mut b1, 9).unwrap();
        l.assign_connector(&mut b2, 9).unwrap();
        assert_eq!(
            l.assign_connector(&mut c1, 9).err(),
            Some(Limit::FlowsPerConnector)
        );
        // Re-assigning a slot moves it; it does not count twice.
        l.assign_connector(&mut b2, 9).unwrap();
        drop(b1);
        l.assign_connector(&mut c1, 9)
            .expect("a connector slot came back");
        let k1 = l.admit_connection(&a).unwrap();
        assert_eq!(
            l.admit_connection(&a).err(),
            Some(Limit::ConnectionsPerIdentity)
        );
        drop(k1);
        assert!(l.admit_connection(&a).is_ok());
    }
}

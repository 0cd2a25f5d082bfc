//! What `GET /status` answers for an intermediate, and the summary `ztna-intermediate status`
//! prints from it: peers connected, connectors and flows per service, flows by protocol, and
//! the limits with how close the relay is to them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ztna_node::flows::Kind;
use ztna_node::status::{count, table, Common};
use ztna_proto::Role;

use crate::limits::Limit;
use crate::state::Shared;

/// The intermediate's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    #[serde(flatten)]
    pub common: Common,
    /// The QUIC address it listens on.
    pub listen: String,
    pub connections: Connections,
    /// Every service of the policy, in name order.
    pub services: Vec<Service>,
    pub flows: Flows,
    pub limits: Limits,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Connections {
    pub agents: usize,
    pub connectors: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    pub service: String,
    /// Connectors serving it now (registered and allowed by the policy).
    pub connectors: usize,
    /// Flows relayed for it now.
    pub active_flows: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Flows {
    pub active: usize,
    pub tcp: usize,
    pub udp: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_flows: usize,
    pub max_flows_per_agent: u32,
    pub max_flows_per_connector: u32,
    pub max_connections_per_identity: u32,
    /// Flows counted against `max_flows` now.
    pub flows: usize,
    /// `flows` as a percentage of `max_flows`.
    pub saturation_percent: f64,
    /// At `max_flows`: new flows are refused and the relay reports not ready.
    pub saturated: bool,
    /// Flows and connections refused at each limit since start (by limit name).
    pub rejections: BTreeMap<String, u64>,
}

pub(crate) fn snapshot(shared: &Shared) -> Status {
    let (agents, connectors) = {
        let peers = ztna_node::lock(&shared.peers);
        let agents = peers.values().filter(|p| p.role == Role::Agent).count();
        (agents, peers.len() - agents)
    };
    let names: BTreeSet<String> = shared
        .policy()
        .rules()
        .iter()
        .map(|r| r.service.clone())
        .collect();
    let services = names
        .into_iter()
        .map(|name| Service {
            connectors: shared.registry.count(&name),
            active_flows: shared.flows.count(|e| *e.meta.service == *name),
            service: name,
        })
        .collect();
    let (in_use, max) = shared.limits.saturation();
    let c = &shared.config;
    let identity = shared.identity();
    Status {
        common: Common::new(
            Role::Intermediate,
            &identity.id,
            identity.expiry_unix(),
            &shared.health,
        ),
        listen: shared
            .endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        connections: Connections { agents, connectors },
        services,
        flows: Flows {
            active: shared.flows.len(),
            tcp: shared.flows.count(|e| e.kind == Kind::Tcp),
            udp: shared.flows.count(|e| e.kind == Kind::Udp),
        },
        limits: Limits {
            max_flows: max,
            max_flows_per_agent: c.max_flows_per_agent,
            max_flows_per_connector: c.max_flows_per_connector,
            max_connections_per_identity: c.max_connections_per_identity,
            flows: in_use,
            saturation_percent: if max == 0 {
                0.0
            } else {
                (in_use as f64 * 1000.0 / max as f64).round() / 10.0
            },
            saturated: in_use >= max,
            rejections: Limit::ALL
                .iter()
                .map(|l| {
                    let n = shared
                        .metrics
                        .limit_rejections
                        .with_label_values(&[l.label()])
                        .get();
                    (l.label().to_string(), n)
                })
                .collect(),
        },
    }
}

/// The provider for the ops endpoint's `/status` (it does not keep the relay alive).
pub(crate) fn provider(
    shared: &Arc<Shared>,
) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
    ztna_node::status::provider(shared, snapshot)
}

/// The summary `ztna-intermediate status` prints.
pub fn render(value: &serde_json::Value) -> Result<String, String> {
    let s: Status = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.common.render(&mut out);
    let _ = writeln!(out, "\nlistening on {}", s.listen);
    let _ = writeln!(
        out,
        "peers: {}, {}",
        count(s.connections.agents, "agent"),
        count(s.connections.connectors, "connector")
    );
    out.push_str("services:\n");
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|svc| {
            vec![
                svc.service.clone(),
                match svc.connectors {
                    0 => "no connector".to_string(),
                    n => count(n, "connector"),
                },
                count(svc.active_flows, "flow"),
            ]
        })
        .collect();
    out.push_str(&table(&rows, 2));
    let f = &s.flows;
    let _ = writeln!(
        out,
        "flows: {} active (tcp {}, udp {})",
        f.active, f.tcp, f.udp
    );
    let l = &s.limits;
    out.push_str("limits:\n");
    let mut rows = vec![
        vec![
            "max_flows".to_string(),
            format!(
                "{}/{} in use ({}%){}",
                l.flows,
                l.max_flows,
                l.saturation_percent,
                if l.saturated { ": SATURATED" } else { "" }
            ),
        ],
        vec![
            "max_flows_per_agent".to_string(),
            l.max_flows_per_agent.to_string(),
        ],
        vec![
            "max_flows_per_connector".to_string(),
            l.max_flows_per_connector.to_string(),
        ],
        vec![
            "max_connections_per_identity".to_string(),
            l.max_connections_per_identity.to_string(),
        ],
    ];
    let refused: Vec<String> = l
        .rejections
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    rows.push(vec![
        "refused at a limit".to_string(),
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        },
    ]);
    out.push_str(&table(&rows, 2));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_services_flows_and_limits() {
        let v = serde_json::json!({
            "role": "intermediate",
            "identity": "spiffe://corp.example/intermediate/relay-a",
            "ready": false,
            "status": "draining: 3 flows left",
            "draining": true,
            "certificate": {"not_after": "2026-05-01T12:00:00Z", "days_left": -2},
            "listen": "0.0.0.0:4433",
            "connections": {"agents": 3, "connectors": 1},
            "services": [
                {"service": "dns", "connectors": 0, "active_flows": 0},
                {"service": "web", "connectors": 1, "active_flows": 3}
            ],
            "flows": {"active": 3, "tcp": 2, "udp": 1},
            "limits": {"max_flows": 100000, "max_flows_per_agent": 1000, "max_flows_per_connector": 16000,
                       "max_connections_per_identity": 16, "flows": 3, "saturation_percent": 0.0,
                       "saturated": false, "rejections": {"flows": 0, "flows_per_agent": 7}}
        });
        let text = render(&v).unwrap();
        for want in [
            "  NOT READY: draining: 3 flows left",
            "  draining: new flows are refused, running flows finish",
            "(EXPIRED 2 days ago)",
            "listening on 0.0.0.0:4433",
            "peers: 3 agents, 1 connector",
            "  dns  no connector  0 flows",
            "  web  1 connector   3 flows",
            "flows: 3 active (tcp 2, udp 1)",
            "  max_flows                     3/100000 in use (0%)",
            "  refused at a limit            flows_per_agent 7",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}

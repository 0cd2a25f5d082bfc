//! What `GET /status` answers for a connector, and the summary `ztna-connector status` prints
//! from it: each intermediate with the standing of every service there (registered, pending,
//! rejected and why), each service with its backends and flows, and the flow capacity.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ztna_node::flows::Kind;
use ztna_node::status::{table, Common};
use ztna_proto::Role;

use crate::{Registration, Shared};

/// The connector's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    #[serde(flatten)]
    pub common: Common,
    /// In configured order.
    pub intermediates: Vec<Intermediate>,
    /// In name order.
    pub services: Vec<Service>,
    pub flows: Flows,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Intermediate {
    /// As configured (`host:port`).
    pub target: String,
    /// `registered` (at least one service is), `connected` (nothing registered: pending or
    /// rejected) or `disconnected` (connecting or retrying).
    pub state: String,
    /// The standing of each service there.
    pub services: BTreeMap<String, Standing>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Standing {
    /// `registered`, `pending` (asked, no answer yet; also after deregistering in a drain) or
    /// `rejected`.
    pub state: String,
    /// Why it was rejected, in the intermediate's words.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    pub service: String,
    /// TCP backend as configured (an address or `host:port` resolved per flow).
    pub tcp: Option<String>,
    pub udp: Option<String>,
    /// For a backend given by name (by protocol, `tcp`/`udp`): the resolver's latest answer.
    pub resolved: BTreeMap<String, Resolved>,
    /// Intermediates it is registered with, of `intermediates`.
    pub registered_on: usize,
    pub intermediates: usize,
    pub active_flows: ServiceFlows,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resolved {
    /// In the order TCP and UDP try them.
    pub addresses: Vec<String>,
    /// Why the name did not resolve.
    pub error: Option<String>,
    /// Age of the answer (it is looked up again after 30 s, a failure after 5 s).
    pub age_seconds: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceFlows {
    pub tcp: usize,
    pub udp: usize,
    /// Connecting to the backend.
    pub opening: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Flows {
    pub active: usize,
    /// `max_flows` (lowered to fit the descriptor limit).
    pub capacity: usize,
    /// At capacity: new flows are refused (the intermediate tries another connector).
    pub saturated: bool,
}

pub(crate) fn snapshot(shared: &Shared) -> Status {
    let regs = shared.registrations.borrow().clone();
    let targets = &shared.config.intermediates;
    let intermediates = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let here = regs.get(i).cloned().unwrap_or_default();
            let state = if here.values().any(|r| *r == Registration::Registered) {
                "registered"
            } else if here.is_empty() {
                "disconnected"
            } else {
                "connected"
            };
            Intermediate {
                target: target.clone(),
                state: state.to_string(),
                services: here
                    .into_iter()
                    .map(|(s, r)| {
                        let standing = match r {
                            Registration::Registered => Standing {
                                state: "registered".into(),
                                reason: None,
                            },
                            Registration::Pending => Standing {
                                state: "pending".into(),
                                reason: None,
                            },
                            Registration::Rejected(why) => Standing {
                                state: "rejected".into(),
                                reason: Some(why),
                            },
                        };
                        (s, standing)
                    })
                    .collect(),
            }
        })
        .collect();
    let mut names: Vec<&String> = shared.services.keys().collect();
    names.sort();
    let services = names
        .into_iter()
        .map(|name| {
            let svc = &shared.services[name];
            let flows = |k: Kind| {
                shared
                    .flows
                    .count(|e| &*e.meta.service == name.as_str() && e.kind == k)
            };
            let resolved = [("tcp", &svc.tcp), ("udp", &svc.udp)]
                .into_iter()
                .filter_map(|(p, b)| {
                    let (age, answer) = shared.resolver.cached(b.as_ref()?)?;
                    let (addresses, error) = match answer {
                        Ok(a) => (a.iter().map(|a| a.to_string()).collect(), None),
                        Err(why) => (Vec::new(), Some(why)),
                    };
                    let r = Resolved {
                        addresses,
                        error,
                        age_seconds: age.as_secs(),
                    };
                    Some((p.to_string(), r))
                })
                .collect();
            Service {
                service: name.clone(),
                tcp: svc.tcp.as_ref().map(|b| b.to_string()),
                udp: svc.udp.as_ref().map(|b| b.to_string()),
                resolved,
                registered_on: regs
                    .iter()
                    .filter(|r| r.get(name) == Some(&Registration::Registered))
                    .count(),
                intermediates: targets.len(),
                active_flows: ServiceFlows {
                    tcp: flows(Kind::Tcp),
                    udp: flows(Kind::Udp),
                    opening: flows(Kind::Opening),
                },
            }
        })
        .collect();
    let active = shared.flows.len();
    Status {
        common: Common::new(
            Role::Connector,
            &shared.tls.id(),
            shared.tls.expiry_unix(),
            &shared.health,
        ),
        intermediates,
        services,
        flows: Flows {
            active,
            capacity: shared.max_flows,
            saturated: active >= shared.max_flows,
        },
    }
}

/// The provider for the ops endpoint's `/status` (it does not keep the connector alive).
pub(crate) fn provider(
    shared: &Arc<Shared>,
) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
    ztna_node::status::provider(shared, snapshot)
}

/// The summary `ztna-connector status` prints.
pub fn render(value: &serde_json::Value) -> Result<String, String> {
    let s: Status = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.common.render(&mut out);
    out.push_str("\nintermediates:\n");
    let mut rows = Vec::new();
    for i in &s.intermediates {
        let standings: Vec<String> = i
            .services
            .iter()
            .map(|(name, st)| match &st.reason {
                Some(why) => format!("{name} {} ({why})", st.state),
                None => format!("{name} {}", st.state),
            })
            .collect();
        rows.push(vec![
            i.target.clone(),
            i.state.clone(),
            standings.join(", "),
        ]);
    }
    out.push_str(&table(&rows, 2));
    out.push_str("services:\n");
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|svc| {
            let backends = [("tcp", &svc.tcp), ("udp", &svc.udp)]
                .iter()
                .filter_map(|(p, b)| {
                    let b = b.as_ref()?;
                    Some(match svc.resolved.get(*p) {
                        Some(Resolved {
                            error: Some(why), ..
                        }) => format!("{p} {b} (does not resolve: {why})"),
                        Some(r) => format!("{p} {b} ({})", r.addresses.join(" ")),
                        None => format!("{p} {b}"),
                    })
                })
                .collect::<Vec<_>>()
                .join(", ");
            let f = &svc.active_flows;
            vec![
                svc.service.clone(),
                backends,
                format!("registered on {}/{}", svc.registered_on, svc.intermediates),
                format!("flows: tcp {}, udp {}, opening {}", f.tcp, f.udp, f.opening),
            ]
        })
        .collect();
    out.push_str(&table(&rows, 2));
    let f = &s.flows;
    let _ = writeln!(
        out,
        "flows: {} active of {} (max_flows){}",
        f.active,
        f.capacity,
        if f.saturated {
            ": SATURATED, new flows are refused"
        } else {
            ""
        }
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_registrations_and_reasons() {
        let v = serde_json::json!({
            "role": "connector",
            "identity": "spiffe://corp.example/connector/web-1",
            "version": "0.1.0",
            "ready": true,
            "status": "registered web on 1/2 intermediates",
            "certificate": {"not_after": "2026-05-01T12:00:00Z", "days_left": 0},
            "intermediates": [
                {"target": "relay-a:4433", "state": "registered", "services": {
                    "web": {"state": "registered"},
                    "db": {"state": "rejected", "reason": "policy does not allow it"}}},
                {"target": "relay-b:4433", "state": "disconnected", "services": {}}
            ],
            "services": [
                {"service": "db", "tcp": "db.internal:5432", "registered_on": 0, "intermediates": 2,
                 "resolved": {"tcp": {"addresses": ["10.0.0.5:5432", "10.0.0.6:5432"], "age_seconds": 3}},
                 "active_flows": {"tcp": 0, "udp": 0, "opening": 0}},
                {"service": "dns", "udp": "dns.internal:53", "registered_on": 0, "intermediates": 2,
                 "resolved": {"udp": {"error": "cannot resolve dns.internal: not found"}}},
                {"service": "web", "tcp": "127.0.0.1:8080", "udp": "127.0.0.1:8081", "registered_on": 1,
                 "intermediates": 2, "active_flows": {"tcp": 3, "udp": 1, "opening": 0}}
            ],
            "flows": {"active": 4, "capacity": 16000, "saturated": false}
        });
        let text = render(&v).unwrap();
        for want in [
            "  ready: registered web on 1/2 intermediates",
            "(expires within a day)",
            "  relay-a:4433  registered    db rejected (policy does not allow it), web registered",
            "  relay-b:4433  disconnected",
            "  db   tcp db.internal:5432 (10.0.0.5:5432 10.0.0.6:5432)  ",
            "  dns  udp dns.internal:53 (does not resolve: cannot resolve dns.internal: not found)  ",
            "  web  tcp 127.0.0.1:8080, udp 127.0.0.1:8081  ",
            "registered on 1/2  flows: tcp 3, udp 1, opening 0",
            "flows: 4 active of 16000 (max_flows)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}

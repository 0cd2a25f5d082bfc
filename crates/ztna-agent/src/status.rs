//! What `GET /status` answers for an agent, and the summary `ztna-agent status` prints from it:
//! each intermediate (state, address, RTT, the error that keeps it down), each forwarded
//! service (availability, and the relay a new flow would use now), and the flows running.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ztna_node::flows::Kind;
use ztna_node::status::{count, table, Common};
use ztna_proto::{Protocol, Role, ServiceState};

use crate::relays::{choose, Choice, Conn};
use crate::Shared;

/// The agent's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    #[serde(flatten)]
    pub common: Common,
    /// In configured order (= preference).
    pub intermediates: Vec<Intermediate>,
    /// One per `[[forward]]`.
    pub services: Vec<Service>,
    pub flows: Flows,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Intermediate {
    /// As configured (`host:port`).
    pub target: String,
    /// `connected`, `connecting`, `draining` (it sent GoAway: running flows finish there, new
    /// ones go elsewhere) or `down` (retrying; `error` says why).
    pub state: String,
    /// The address the connection uses.
    pub address: Option<String>,
    /// Round-trip time of the connection, in milliseconds.
    pub rtt_ms: Option<f64>,
    pub error: Option<String>,
    /// What it said about each service: `available`, `unavailable` or `denied`.
    pub services: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    pub service: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The local address it is forwarded from.
    pub listen: String,
    /// `available`, `unavailable`, `denied`, or `unknown` (no intermediate said yet).
    pub state: String,
    /// Why, in the intermediate's words.
    pub reason: String,
    /// The intermediate a new flow would use now, if any.
    pub relay: Option<String>,
    /// How it would get there: `relay` (through the intermediate).
    pub path: Option<String>,
    /// Flows of this forward running now.
    pub active_flows: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Flows {
    pub active: usize,
    pub tcp: usize,
    pub udp: usize,
    /// Waiting for a tunnel or an answer.
    pub opening: usize,
}

fn state_word(s: ServiceState) -> &'static str {
    match s {
        ServiceState::Available => "available",
        ServiceState::Unavailable => "unavailable",
        ServiceState::Denied => "denied",
    }
}

/// The status now. `ports` are the forwards' bound addresses, in `[[forward]]` order.
pub(crate) fn snapshot(shared: &Shared, ports: &[(String, Protocol, SocketAddr)]) -> Status {
    let snap = shared.relays.borrow().clone();
    let intermediates = snap
        .relays
        .iter()
        .map(|r| {
            let (state, error) = match &r.conn {
                Conn::Up { draining: false } => ("connected", None),
                Conn::Up { draining: true } => ("draining", None),
                Conn::Connecting => ("connecting", None),
                Conn::Down { error } => ("down", Some(error.clone())),
            };
            let conn = r.link.as_ref().map(|l| &l.conn);
            Intermediate {
                target: r.target.clone(),
                state: state.to_string(),
                address: conn
                    .map(|c| ztna_node::transport::canonical(c.remote_address()).to_string()),
                rtt_ms: conn.map(|c| (c.rtt().as_secs_f64() * 10_000.0).round() / 10.0),
                error,
                services: r
                    .services
                    .iter()
                    .map(|(s, (st, _))| (s.clone(), state_word(*st).to_string()))
                    .collect(),
            }
        })
        .collect();
    let services = ports
        .iter()
        .map(|(service, protocol, listen)| {
            let (state, reason) = match snap.service_state(service) {
                Some((st, why)) => (state_word(st), why),
                None => ("unknown", String::new()),
            };
            let relay = match choose(&snap, service, &[]) {
                Choice::Use(i) => snap.relays.get(i).map(|r| r.target.clone()),
                Choice::Wait | Choice::Refuse(..) => None,
            };
            let mine = |k: Kind| match protocol {
                Protocol::Tcp => matches!(k, Kind::Tcp | Kind::Opening),
                Protocol::Udp => k == Kind::Udp,
            };
            Service {
                service: service.clone(),
                protocol: protocol.as_str().to_string(),
                listen: listen.to_string(),
                state: state.to_string(),
                reason,
                // New flows go direct while a direct path is up, else via the relay.
                path: match shared.direct.up(service) {
                    Some(_) => Some("direct".to_string()),
                    None => relay.as_ref().map(|_| "relay".to_string()),
                },
                relay: match shared.direct.up(service) {
                    Some(d) => Some(format!(
                        "{} at {}",
                        d.connector,
                        ztna_node::transport::canonical(d.conn.remote_address())
                    )),
                    None => relay,
                },
                active_flows: shared
                    .flows
                    .count(|e| &*e.meta.service == service.as_str() && mine(e.kind)),
            }
        })
        .collect();
    let count = |k: Kind| shared.flows.count(|e| e.kind == k);
    Status {
        common: Common::new(
            Role::Agent,
            &shared.tls.id(),
            shared.tls.expiry_unix(),
            &shared.health,
        ),
        intermediates,
        services,
        flows: Flows {
            active: shared.flows.len(),
            tcp: count(Kind::Tcp),
            udp: count(Kind::Udp),
            opening: count(Kind::Opening),
        },
    }
}

/// The provider for the ops endpoint's `/status` (it does not keep the agent alive).
pub(crate) fn provider(
    shared: &Arc<Shared>,
    ports: Vec<(String, Protocol, SocketAddr)>,
) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
    ztna_node::status::provider(shared, move |s| snapshot(s, &ports))
}

/// The summary `ztna-agent status` prints.
pub fn render(value: &serde_json::Value) -> Result<String, String> {
    let s: Status = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.common.render(&mut out);
    out.push_str("\nintermediates:\n");
    let rows: Vec<Vec<String>> = s
        .intermediates
        .iter()
        .map(|r| {
            let mut row = vec![r.target.clone(), r.state.clone()];
            // The address used, when the target is a name (or another spelling of it).
            if let Some(a) = r.address.as_ref().filter(|a| **a != r.target) {
                row.push(a.clone());
            }
            if let Some(rtt) = r.rtt_ms {
                row.push(format!("rtt {rtt:.1} ms"));
            }
            if let Some(e) = &r.error {
                row.push(e.clone());
            }
            row
        })
        .collect();
    out.push_str(&table(&rows, 2));
    out.push_str("services:\n");
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|f| {
            let how = match (&f.relay, f.state.as_str()) {
                (Some(r), _) => format!("via {r} ({})", f.path.as_deref().unwrap_or("relay")),
                (None, "available" | "unknown") => "waiting for an intermediate".to_string(),
                (None, _) => f.reason.clone(),
            };
            vec![
                f.service.clone(),
                f.protocol.clone(),
                f.listen.clone(),
                f.state.clone(),
                how,
                count(f.active_flows, "flow"),
            ]
        })
        .collect();
    out.push_str(&table(&rows, 2));
    let f = &s.flows;
    let _ = writeln!(
        out,
        "flows: {} active (tcp {}, udp {}, opening {})",
        f.active, f.tcp, f.udp, f.opening
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_relays_services_and_paths() {
        let v = serde_json::json!({
            "role": "agent",
            "identity": "spiffe://corp.example/agent/alice",
            "version": "0.1.0",
            "pid": 42,
            "uptime_seconds": 7500,
            "ready": true,
            "status": "connected to 1/2 intermediates",
            "draining": false,
            "certificate": {"not_after": "2026-05-01T12:00:00Z", "not_after_unix": 1777636800, "days_left": 29},
            "intermediates": [
                {"target": "relay-a:4433", "state": "connected", "address": "192.0.2.1:4433", "rtt_ms": 12.34, "services": {"web": "available"}},
                {"target": "192.0.2.2:4433", "state": "draining", "address": "192.0.2.2:4433", "rtt_ms": 3.0},
                {"target": "relay-b:4433", "state": "down", "error": "timed out"}
            ],
            "services": [
                {"service": "web", "protocol": "tcp", "listen": "127.0.0.1:8080", "state": "available",
                 "reason": "1 connector(s) serving web", "relay": "relay-a:4433", "path": "relay", "active_flows": 2},
                {"service": "dns", "protocol": "udp", "listen": "127.0.0.1:5353", "state": "unavailable",
                 "reason": "no connector is serving dns", "relay": null, "path": null, "active_flows": 0}
            ],
            "flows": {"active": 2, "tcp": 2, "udp": 0, "opening": 0}
        });
        let text = render(&v).unwrap();
        for want in [
            "spiffe://corp.example/agent/alice  (agent 0.1.0, pid 42, up 2h 5m)",
            "  ready: connected to 1/2 intermediates",
            "certificate valid until 2026-05-01T12:00:00Z (29 days left)",
            "  relay-a:4433    connected  192.0.2.1:4433  rtt 12.3 ms",
            "  192.0.2.2:4433  draining   rtt 3.0 ms",
            "  relay-b:4433    down       timed out",
            "  web  tcp  127.0.0.1:8080  available    via relay-a:4433 (relay)     2 flows",
            "  dns  udp  127.0.0.1:5353  unavailable  no connector is serving dns  0 flows",
            "flows: 2 active (tcp 2, udp 0, opening 0)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A status from a daemon that knows less still renders.
        assert!(render(&serde_json::json!({"role": "agent"})).is_ok());
        assert!(render(&serde_json::json!({"role": "agent", "services": 3})).is_err());
    }
}

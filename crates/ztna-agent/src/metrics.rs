//! The agent's metrics: names and labels are a contract with the dashboards and alert rules in `nixos/monitoring/` (README lists them).

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};
use ztna_node::metrics::{self as m, Common};

#[derive(Clone)]
pub struct Metrics {
    pub common: Common,
    pub connected: IntGauge,
    pub service_available: IntGaugeVec,
    pub flows: IntCounterVec,
    pub udp_dropped: IntCounterVec,
}

impl Metrics {
    pub fn new(services: &[(String, &'static str)]) -> Metrics {
        let common = Common::new("agent");
        let r = &common.registry;
        let me = Metrics {
            connected: m::gauge(
                r,
                "ztna_agent_connected",
                "1 while the agent has a tunnel to an intermediate.",
            ),
            service_available: m::gauge_vec(
                r,
                "ztna_agent_service_available",
                "1 if the service can be reached now, as pushed by the intermediate.",
                &["service"],
            ),
            flows: m::counter_vec(
                r,
                "ztna_agent_flows_total",
                "Local connections/flows by outcome.",
                &["service", "protocol", "path", "result"],
            ),
            udp_dropped: m::counter_vec(
                r,
                "ztna_agent_udp_dropped_total",
                "Local UDP datagrams dropped (too large for the path, flow not open yet).",
                &["reason"],
            ),
            common,
        };
        for (s, p) in services {
            me.service_available.with_label_values(&[s]);
            for res in ["ok", "denied", "unavailable", "error"] {
                me.flows.with_label_values(&[s.as_str(), p, "relay", res]);
            }
        }
        for r in ["too_large", "pending", "no_tunnel"] {
            me.udp_dropped.with_label_values(&[r]);
        }
        me
    }
}

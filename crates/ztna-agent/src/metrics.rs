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
    pub intermediates_connected: IntGauge,
    pub intermediates_configured: IntGauge,
    pub udp_moves: prometheus::IntCounter,
    pub direct_paths: IntGauge,
}

impl Metrics {
    pub fn new(services: &[(String, &'static str)], intermediates: usize) -> Metrics {
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
                "UDP datagrams dropped, by reason (pending: queue full while the flow opens; no_path: still queued when the flow could not open or ended; send_buffer_full: the path is congested; stream_full: oversized payload queue full; client_busy / client_error: the local client could not be sent to; draining: new client during a drain; socket_overflow: the kernel dropped them, the forward's receive buffer was full; unknown_flow / malformed: from a relay or direct path, for no flow of ours).",
                &["reason"],
            ),
            intermediates_connected: m::gauge(
                r,
                "ztna_agent_intermediates_connected",
                "Intermediates the agent has a connection to (draining ones included).",
            ),
            intermediates_configured: m::gauge(
                r,
                "ztna_agent_intermediates_configured",
                "Intermediates in the configuration.",
            ),
            direct_paths: m::gauge(
                r,
                "ztna_agent_direct_paths",
                "Services whose new flows go direct (P2P) now (services of one connector share its connection).",
            ),
            udp_moves: m::counter(
                r,
                "ztna_agent_udp_flows_moved_total",
                "UDP flows moved to another intermediate because theirs drained or went away.",
            ),
            common,
        };
        for (s, p) in services {
            me.service_available.with_label_values(&[s]);
            for path in ["relay", "direct"] {
                for res in ["ok", "denied", "unavailable", "error"] {
                    me.flows.with_label_values(&[s.as_str(), p, path, res]);
                }
            }
        }
        me.intermediates_configured.set(intermediates as i64);
        for r in [
            "pending",
            "no_path",
            "send_buffer_full",
            "stream_full",
            "client_busy",
            "client_error",
            "draining",
            "socket_overflow",
            "unknown_flow",
            "wrong_path",
            "malformed",
        ] {
            me.udp_dropped.with_label_values(&[r]);
        }
        me
    }
}

//! The intermediate's metrics: names and labels are a contract with the dashboards and alert rules in `nixos/monitoring/` (README lists them).

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use ztna_node::metrics::{self as m, Common};

#[derive(Clone)]
pub struct Metrics {
    pub common: Common,
    pub connections: IntGaugeVec,
    pub handshakes: IntCounterVec,
    pub service_connectors: IntGaugeVec,
    pub flows_active: IntGaugeVec,
    pub flows: IntCounterVec,
    pub relay_bytes: IntCounterVec,
    pub datagrams_dropped: IntCounterVec,
    pub p2p: IntCounterVec,
    pub peer_rtt: prometheus::HistogramVec,
    pub draining: IntGauge,
    pub limit_rejections: IntCounterVec,
    pub handshakes_shed: IntCounterVec,
    pub handshakes_in_progress: IntGauge,
    pub quic_connections: IntGauge,
    pub revocations: IntCounterVec,
    pub renewals: IntCounterVec,
    pub udp_stream_carried: IntCounterVec,
    pub drain_timeout: prometheus::Gauge,
    pub drain_started: prometheus::Gauge,
    pub credit_waits: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let common = Common::new("intermediate");
        let r = &common.registry;
        let me = Metrics {
            connections: m::gauge_vec(
                r,
                "ztna_intermediate_connections",
                "Established peer connections.",
                &["role"],
            ),
            handshakes: m::counter_vec(
                r,
                "ztna_intermediate_handshakes_total",
                "Incoming QUIC handshakes by outcome.",
                &["result"],
            ),
            service_connectors: m::gauge_vec(
                r,
                "ztna_intermediate_service_connectors",
                "Connectors registered per service.",
                &["service"],
            ),
            flows_active: m::gauge_vec(
                r,
                "ztna_intermediate_flows_active",
                "Flows being relayed.",
                &["protocol"],
            ),
            flows: m::counter_vec(
                r,
                "ztna_intermediate_flows_total",
                "Flow open requests by outcome.",
                &["protocol", "result"],
            ),
            relay_bytes: m::counter_vec(
                r,
                "ztna_intermediate_relay_bytes_total",
                "Payload bytes relayed.",
                &["protocol", "direction"],
            ),
            datagrams_dropped: m::counter_vec(
                r,
                "ztna_intermediate_datagrams_dropped_total",
                "UDP datagrams dropped by the relay, by reason (unknown_flow: for a flow that ended or never existed; malformed: no valid flow id; peer_gone: the other side's connection ended; send_buffer_full: the next hop is congested; stream_full: a payload too large for a datagram and the flow's stream queue full).",
                &["reason"],
            ),
            p2p: m::counter_vec(
                r,
                "ztna_intermediate_p2p_total",
                "Direct-path (P2P) brokering outcomes: success and failed as reported by agents, denied by policy, disabled at the connector.",
                &["result"],
            ),
            peer_rtt: m::histogram_vec(
                r,
                "ztna_intermediate_peer_rtt_seconds",
                "QUIC round-trip time to peers.",
                &["role"],
                m::rtt_buckets(),
            ),
            draining: m::gauge(
                r,
                "ztna_intermediate_draining",
                "1 while the intermediate drains.",
            ),
            credit_waits: m::counter(
                r,
                "ztna_intermediate_credit_waits_total",
                "Writes towards a connector that waited because the flow's agent already had identity_window bytes there not yet consumed.",
            ),
            limit_rejections: m::counter_vec(
                r,
                "ztna_intermediate_limit_rejections_total",
                "Flows and connections refused because a limit was reached.",
                &["limit"],
            ),
            handshakes_shed: m::counter_vec(
                r,
                "ztna_intermediate_handshakes_shed_total",
                "New connection attempts answered with a QUIC Retry, queued for a handshake slot (proven addresses at max_handshakes), dropped (no slot), or dropped because their source had max_handshakes_per_source in progress (per_source).",
                &["action"],
            ),
            handshakes_in_progress: m::gauge(
                r,
                "ztna_intermediate_handshakes_in_progress",
                "QUIC handshakes in progress.",
            ),
            quic_connections: m::gauge(
                r,
                "ztna_intermediate_quic_connections",
                "QUIC connections the endpoint holds: handshaking, established, and closed ones still draining (3 PTO each), which keep their memory until then.",
            ),
            revocations: m::counter_vec(
                r,
                "ztna_intermediate_revocations_total",
                "Connections, flows and registrations ended because access was revoked.",
                &["reason"],
            ),
            renewals: m::counter_vec(
                r,
                "ztna_intermediate_renewals_total",
                "Certificate renewals of established connections (protocol revision 3), by result.",
                &["result"],
            ),
            udp_stream_carried: m::counter_vec(
                r,
                "ztna_intermediate_udp_stream_payloads_total",
                "UDP payloads too large for a QUIC datagram on the next hop, carried on the flow's stream instead.",
                &["direction"],
            ),
            drain_timeout: m::float_gauge(
                r,
                "ztna_intermediate_drain_timeout_seconds",
                "Configured drain_timeout.",
            ),
            drain_started: m::float_gauge(
                r,
                "ztna_intermediate_drain_started_timestamp_seconds",
                "When the current drain started (Unix time); 0 when not draining.",
            ),
            common,
        };
        // Make every label combination visible from the start, so dashboards and alerts see 0,
        // not an absent series.
        for role in ["agent", "connector"] {
            me.connections.with_label_values(&[role]);
            me.peer_rtt.with_label_values(&[role]);
        }
        for r in ["ok", "unauthorized", "failed"] {
            me.handshakes.with_label_values(&[r]);
        }
        for p in ["tcp", "udp"] {
            me.flows_active.with_label_values(&[p]);
            for r in ["ok", "denied", "unavailable", "error"] {
                me.flows.with_label_values(&[p, r]);
            }
            for d in ["to_connector", "to_agent"] {
                me.relay_bytes.with_label_values(&[p, d]);
            }
        }
        for r in [
            "unknown_flow",
            "peer_gone",
            "malformed",
            "send_buffer_full",
            "stream_full",
        ] {
            me.datagrams_dropped.with_label_values(&[r]);
        }
        for a in ["retry", "queued", "dropped"] {
            me.handshakes_shed.with_label_values(&[a]);
        }
        for l in crate::limits::Limit::ALL {
            me.limit_rejections.with_label_values(&[l.label()]);
        }
        me.limit_rejections.with_label_values(&["direct_requests"]);
        for r in [
            "certificate_expired",
            "ca_changed",
            "policy_flow",
            "policy_registration",
        ] {
            me.revocations.with_label_values(&[r]);
        }
        for r in ["accepted", "refused"] {
            me.renewals.with_label_values(&[r]);
        }
        for d in ["to_connector", "to_agent"] {
            me.udp_stream_carried.with_label_values(&[d]);
        }
        for r in ["success", "failed", "denied", "disabled"] {
            me.p2p.with_label_values(&[r]);
        }
        me
    }

    pub fn bytes(&self, protocol: &str, direction: &str) -> IntCounter {
        self.relay_bytes.with_label_values(&[protocol, direction])
    }

    pub fn rtt(&self, role: &str) -> Histogram {
        self.peer_rtt.with_label_values(&[role])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

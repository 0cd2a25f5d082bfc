//! The connector's metrics: names and labels are a contract with the dashboards and alert rules in `nixos/monitoring/` (README lists them).

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use ztna_node::metrics::{self as m, Common};

#[derive(Clone)]
pub struct Metrics {
    pub common: Common,
    pub intermediates_connected: IntGauge,
    pub intermediates_configured: IntGauge,
    pub reconnects: IntCounter,
    pub reconnect_backoff: prometheus::Gauge,
    pub flows_active: IntGaugeVec,
    pub flows: IntCounterVec,
    pub bytes: IntCounterVec,
    pub backend_errors: IntCounterVec,
    pub udp_rejected: IntCounterVec,
    pub udp_dropped: IntCounterVec,
    pub service_registrations: IntGaugeVec,
    pub flow_capacity: IntGauge,
    pub udp_stream_carried: IntCounterVec,
    pub direct_connections: IntGauge,
    pub direct_refused: IntCounterVec,
    pub direct_flows: IntCounterVec,
    pub direct_punches: IntCounter,
    pub direct_revoked: IntCounter,
    pub credit_waits: IntCounter,
}

impl Metrics {
    pub fn new(services: &[(String, bool, bool)], intermediates: usize) -> Metrics {
        let common = Common::new("connector");
        let r = &common.registry;
        let me = Metrics {
            intermediates_connected: m::gauge(
                r,
                "ztna_connector_intermediates_connected",
                "Intermediates this connector is registered with.",
            ),
            intermediates_configured: m::gauge(
                r,
                "ztna_connector_intermediates_configured",
                "Intermediates in the configuration.",
            ),
            reconnect_backoff: m::float_gauge(
                r,
                "ztna_connector_reconnect_backoff_seconds",
                "Delay before the most recent reconnect attempt (grows while an intermediate stays unreachable).",
            ),
            credit_waits: m::counter(
                r,
                "ztna_connector_credit_waits_total",
                "Writes towards an intermediate that waited because the flow's agent already had the intermediate's identity_window bytes there not yet consumed.",
            ),
            reconnects: m::counter(
                r,
                "ztna_connector_reconnects_total",
                "Connection attempts after a lost or failed connection (polling an intermediate that drained for a restart counts once, however many polls it takes).",
            ),
            flows_active: m::gauge_vec(
                r,
                "ztna_connector_flows_active",
                "Flows being forwarded to backends.",
                &["service", "protocol"],
            ),
            flows: m::counter_vec(
                r,
                "ztna_connector_flows_total",
                "Flow requests by outcome.",
                &["service", "protocol", "result"],
            ),
            bytes: m::counter_vec(
                r,
                "ztna_connector_bytes_total",
                "Payload bytes forwarded.",
                &["service", "direction"],
            ),
            backend_errors: m::counter_vec(
                r,
                "ztna_connector_backend_errors_total",
                "Backend connects or sends that failed.",
                &["service"],
            ),
            udp_rejected: m::counter_vec(
                r,
                "ztna_connector_udp_rejected_total",
                "UDP datagrams refused because they did not come from the flow's backend.",
                &["service"],
            ),
            udp_dropped: m::counter_vec(
                r,
                "ztna_connector_udp_dropped_total",
                "UDP datagrams dropped, by reason (unknown_flow / malformed: from an intermediate or agent, for no flow of ours; backend_busy / backend_error: the backend could not be sent to; send_buffer_full: the path to the intermediate is congested; peer_gone: its connection ended; socket_overflow: the kernel dropped datagrams from the backend, the receive buffer was full).",
                &["reason"],
            ),
            service_registrations: m::gauge_vec(
                r,
                "ztna_connector_service_registrations",
                "Intermediates on which the service is registered now (accepted by their policy).",
                &["service"],
            ),
            flow_capacity: m::gauge(
                r,
                "ztna_connector_flow_capacity",
                "Flows this connector may serve at once (max_flows, lowered to fit the descriptor limit).",
            ),
            udp_stream_carried: m::counter_vec(
                r,
                "ztna_connector_udp_stream_payloads_total",
                "UDP payloads too large for a QUIC datagram, carried on the flow's stream instead.",
                &["service", "direction"],
            ),
            direct_connections: m::gauge(
                r,
                "ztna_connector_direct_connections",
                "Direct (P2P) connections from agents.",
            ),
            direct_refused: m::counter_vec(
                r,
                "ztna_connector_direct_refused_total",
                "Direct connections and direct flows refused, by reason (no_ticket, malformed, bad_ticket, bad_signature, expired, wrong_agent, wrong_connector, unknown_intermediate, service_not_allowed, handshake, too_many_connections, flow_limit).",
                &["reason"],
            ),
            direct_flows: m::counter_vec(
                r,
                "ztna_connector_direct_flows_total",
                "Flows accepted on direct (P2P) connections from agents (also counted in ztna_connector_flows_total{result=\"ok\"}, which counts relayed and direct flows).",
                &["service", "protocol"],
            ),
            direct_revoked: m::counter(
                r,
                "ztna_connector_direct_revoked_total",
                "Running flows on direct (P2P) connections ended because their service's last ticket lapsed unrenewed (the intermediates no longer allow it).",
            ),
            direct_punches: m::counter(
                r,
                "ztna_connector_direct_punches_total",
                "Direct-path set-ups this connector punched for: on an intermediate's start signal, packets towards the agent's candidates for 3 s. An agent's further services of this connector join its existing direct connection without one.",
            ),
            common,
        };
        for r in [
            "no_ticket",
            "malformed",
            "bad_ticket",
            "bad_signature",
            "expired",
            "wrong_agent",
            "wrong_connector",
            "unknown_intermediate",
            "service_not_allowed",
            "handshake",
            "too_many_connections",
            "flow_limit",
        ] {
            me.direct_refused.with_label_values(&[r]);
        }
        me.intermediates_configured.set(intermediates as i64);
        for (s, tcp, udp) in services {
            me.service_registrations.with_label_values(&[s]);
            me.backend_errors.with_label_values(&[s]);
            me.udp_rejected.with_label_values(&[s]);
            for d in ["to_backend", "to_agent"] {
                me.bytes.with_label_values(&[s, d]);
            }
            if *udp {
                for d in ["to_backend", "to_agent"] {
                    me.udp_stream_carried.with_label_values(&[s, d]);
                }
            }
            for (p, on) in [("tcp", *tcp), ("udp", *udp)] {
                if on {
                    me.flows_active.with_label_values(&[s, p]);
                    me.direct_flows.with_label_values(&[s, p]);
                    for res in ["ok", "error"] {
                        me.flows.with_label_values(&[s, p, res]);
                    }
                }
            }
        }
        for r in [
            "unknown_flow",
            "malformed",
            "backend_busy",
            "backend_error",
            "send_buffer_full",
            "peer_gone",
            "socket_overflow",
        ] {
            me.udp_dropped.with_label_values(&[r]);
        }
        me
    }
}

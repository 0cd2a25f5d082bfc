//! Metrics shared by every daemon, and small helpers to register the rest.
//!
//! Each daemon owns one [`prometheus::Registry`]; the ops endpoint serves it at `/metrics`.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Registration never fails for the fixed, distinct names used in this workspace; if it ever
/// did (a programming error caught by every test), the metric still works, just unexported.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

pub fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(
        r,
        IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(
        r,
        IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn float_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    reg(
        r,
        Gauge::new(name, help).unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(
        r,
        GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    reg(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .unwrap_or_else(|_| unreachable_metric(name)),
    )
}

pub fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .unwrap_or_else(|_| unreachable_metric(name)),
    )
}

#[track_caller]
fn unreachable_metric(name: &str) -> ! {
    // Metric names and label sets are compile-time constants of this workspace.
    panic!("invalid metric definition {name}")
}

/// RTT buckets from 1 ms to 5 s.
pub fn rtt_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
}

/// `ztna_build_info` and `ztna_tls_cert_expiry_timestamp_seconds`, present on every daemon.
#[derive(Clone)]
pub struct Common {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub cert_expiry: Gauge,
    /// Packets the kernel dropped at the daemon's QUIC socket (receive buffer full).
    pub quic_socket_drops: IntCounter,
    /// How the last reload (SIGHUP) went: see [`ReloadGauges`].
    pub reloads: ReloadGauges,
}

/// `ztna_config_last_reload_successful` (1 at start and after a reload that applied, 0 after
/// one that failed) and `ztna_config_last_reload_success_timestamp_seconds` (start, or the
/// last reload that applied): `systemctl reload` only sends SIGHUP and always succeeds, so a
/// failed reload would otherwise show only in the log.
#[derive(Clone)]
pub struct ReloadGauges {
    pub successful: prometheus::IntGauge,
    pub success_time: Gauge,
}

impl ReloadGauges {
    /// Records a reload's outcome.
    pub fn record(&self, ok: bool) {
        self.successful.set(i64::from(ok));
        if ok {
            self.success_time.set(unix_now());
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Common {
    pub fn new(role: &str) -> Common {
        let registry = Registry::new();
        let build_info = gauge_vec(
            &registry,
            "ztna_build_info",
            "Build information of this ZTNA daemon (always 1).",
            &["version", "role"],
        );
        build_info.with_label_values(&[crate::VERSION, role]).set(1);
        let cert_expiry = float_gauge(
            &registry,
            "ztna_tls_cert_expiry_timestamp_seconds",
            "notAfter of the certificate this daemon presents, as a Unix timestamp.",
        );
        let quic_socket_drops = counter(
            &registry,
            "ztna_quic_socket_drops_total",
            "Packets the kernel dropped at this daemon's QUIC UDP socket because its receive buffer was full (read from /proc every 5 s). QUIC resends what streams lost; UDP flows' datagrams are gone. Raise net.core.rmem_max.",
        );
        let reloads = ReloadGauges {
            successful: gauge(
                &registry,
                "ztna_config_last_reload_successful",
                "1 if the last reload (SIGHUP) applied, or none was asked since start; 0 if it failed and the running configuration was kept (the log says why).",
            ),
            success_time: float_gauge(
                &registry,
                "ztna_config_last_reload_success_timestamp_seconds",
                "When the configuration in use was loaded (start, or the last reload that applied), as a Unix timestamp.",
            ),
        };
        reloads.record(true);
        Common {
            registry,
            build_info,
            cert_expiry,
            quic_socket_drops,
            reloads,
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

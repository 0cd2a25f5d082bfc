//! Connector configuration: the keys of `connector.toml`, their defaults and validation.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use ztna_node::config::{self, addr, duration, size, ConfigError, TlsConfig};
use ztna_node::logging::LogFormat;

use crate::backend::Backend;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Every intermediate to register with (`host:port`); the connector keeps a connection to each.
    pub intermediates: Vec<String>,
    #[serde(default = "default_ops", with = "addr")]
    pub ops_listen: SocketAddr,
    /// Local UDP address of the QUIC endpoint (also used for direct P2P paths later). The default
    /// `[::]:0` is dual stack (IPv6 and IPv4), or `0.0.0.0:0` on a host without IPv6.
    #[serde(default = "default_bind", with = "addr")]
    pub bind: SocketAddr,
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// Timeout for connecting to a TCP backend; a refused or silent backend rejects the flow.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// A UDP flow with no datagram in either direction for this long is closed.
    #[serde(default = "default_udp_idle", with = "duration")]
    pub udp_idle_timeout: Duration,
    /// A TCP flow with no byte in either direction for this long is reset (like a NAT's timeout).
    #[serde(default = "default_tcp_idle", with = "duration")]
    pub tcp_idle_timeout: Duration,
    /// Concurrent flows this connector serves (each holds a socket); at the limit new flows are
    /// refused (the intermediate tries another connector) and the connector reports not ready.
    /// Also capped by the process's descriptor limit (LimitNOFILE).
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Concurrent flows one agent identity may have on direct (P2P) paths to this connector,
    /// across its direct connections. Relayed flows are limited at the intermediate
    /// (`max_flows_per_agent` there), which never sees direct ones.
    #[serde(default = "default_max_direct_flows_per_agent")]
    pub max_direct_flows_per_agent: u32,
    #[serde(default = "default_keepalive", with = "duration")]
    pub keepalive: Duration,
    #[serde(default = "default_idle", with = "duration")]
    pub idle_timeout: Duration,
    pub tls: TlsConfig,
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// Log format: `text` (colour only on a terminal) or `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Accept direct (P2P) connections from agents with a ticket from an intermediate; off:
    /// every flow comes through an intermediate.
    #[serde(default = "default_p2p")]
    pub p2p: bool,
    /// Flow-control window of one flow (bytes in flight before the receiver reads): one flow's
    /// throughput is at most this per round trip, and a stalled flow holds at most this.
    #[serde(default = "default_stream_window", with = "size")]
    pub stream_window: u64,
    /// Flow-control window of a connection to an intermediate (all flows through it together):
    /// the most one intermediate's flows can make this connector buffer.
    #[serde(default = "default_connection_window", with = "size")]
    pub connection_window: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Backend for TCP flows: `host:port`, the host an IP address or a name resolved when a
    /// flow opens.
    #[serde(default)]
    pub tcp: Option<Backend>,
    /// Backend for UDP flows, likewise.
    #[serde(default)]
    pub udp: Option<Backend>,
}

impl ztna_node::config::Paths for Config {
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut std::path::PathBuf)> {
        self.tls.paths_mut()
    }
}

impl ztna_node::daemon::DaemonConfig for Config {
    fn tls(&self) -> &TlsConfig {
        &self.tls
    }
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

pub fn default_ops() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9471))
}
fn default_bind() -> SocketAddr {
    ztna_node::transport::DUAL_STACK_ANY
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_max_flows() -> u32 {
    16_000
}
fn default_max_direct_flows_per_agent() -> u32 {
    1000
}
fn default_keepalive() -> Duration {
    Duration::from_secs(1)
}
fn default_idle() -> Duration {
    Duration::from_secs(5)
}

fn default_stream_window() -> u64 {
    ztna_node::transport::DEFAULT_STREAM_WINDOW
}
fn default_connection_window() -> u64 {
    64 << 20
}

fn default_p2p() -> bool {
    true
}

impl Config {
    pub fn load(
        path: Option<&Path>,
        overrides: Vec<(&str, toml::Value)>,
    ) -> Result<Config, ConfigError> {
        let cfg: Config = config::load(path, overrides)?;
        cfg.validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: config::origin(path),
                key,
                message,
            })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.intermediates.is_empty() {
            return Err((
                "intermediates".into(),
                "list at least one intermediate (host:port)".into(),
            ));
        }
        for i in &self.intermediates {
            config::check_host_port(i).map_err(|m| ("intermediates".to_string(), m))?;
        }
        if self.service.is_empty() {
            return Err((
                "service".into(),
                "configure at least one [[service]]".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.service.iter().enumerate() {
            if s.name.is_empty() {
                return Err((format!("service[{i}].name"), "must not be empty".into()));
            }
            if !seen.insert(&s.name) {
                return Err((
                    format!("service[{i}].name"),
                    format!("duplicate service {:?}", s.name),
                ));
            }
            if s.tcp.is_none() && s.udp.is_none() {
                return Err((
                    format!("service[{i}]"),
                    format!(
                        "service {:?} needs a `tcp` and/or `udp` backend address",
                        s.name
                    ),
                ));
            }
        }
        if self.keepalive >= self.idle_timeout {
            return Err((
                "keepalive".into(),
                "must be shorter than idle_timeout".into(),
            ));
        }
        if self.max_flows == 0 {
            return Err(("max_flows".into(), "must be at least 1".into()));
        }
        if self.max_direct_flows_per_agent == 0 {
            return Err((
                "max_direct_flows_per_agent".into(),
                "must be at least 1 (p2p = false turns direct paths off)".into(),
            ));
        }
        for (key, v) in [
            ("tcp_idle_timeout", self.tcp_idle_timeout),
            ("udp_idle_timeout", self.udp_idle_timeout),
        ] {
            if v < Duration::from_secs(1) {
                return Err((key.into(), "must be at least 1s".into()));
            }
        }
        // 0s would refuse every flow ("connect_timeout used up") while the config passed.
        if self.connect_timeout < Duration::from_millis(100) {
            return Err(("connect_timeout".into(), "must be at least 100ms".into()));
        }
        if self.stream_window < 64 * 1024 {
            return Err(("stream_window".into(), "must be at least 64KiB".into()));
        }
        if self.connection_window < 64 * 1024 {
            return Err(("connection_window".into(), "must be at least 64KiB".into()));
        }
        Ok(())
    }

    pub fn transport(&self) -> ztna_node::transport::TransportOptions {
        ztna_node::transport::TransportOptions {
            keepalive: self.keepalive,
            idle_timeout: self.idle_timeout,
            // Flows arrive as streams the intermediate opens: allow every flow we may serve.
            max_streams: self.max_flows.saturating_add(16),
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: &str) -> Result<(), (String, String)> {
        let text = format!(
            "intermediates = [\"relay:4433\"]\n{extra}\n[[service]]\nname = \"web\"\n\
             tcp = \"127.0.0.1:8080\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
        );
        let cfg: Config = toml::from_str(&text).map_err(|e| ("parse".into(), e.to_string()))?;
        cfg.validate()
    }

    /// Timeouts that would make every flow fail at once are refused by --check-config, with
    /// the key named.
    #[test]
    fn timeouts_that_end_every_flow_are_refused() {
        assert_eq!(with(""), Ok(()));
        for (line, key) in [
            ("udp_idle_timeout = \"0s\"", "udp_idle_timeout"),
            ("tcp_idle_timeout = \"500ms\"", "tcp_idle_timeout"),
            ("connect_timeout = \"0s\"", "connect_timeout"),
        ] {
            assert_eq!(with(line).map_err(|e| e.0), Err(key.to_string()), "{line}");
        }
        assert_eq!(
            with("udp_idle_timeout = \"1s\"\nconnect_timeout = \"100ms\""),
            Ok(())
        );
    }
}

//! Intermediate configuration: the keys of `intermediate.toml`, their defaults and validation.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use ztna_node::config::{self, addr, duration, size, ConfigError, TlsConfig};
use ztna_node::logging::LogFormat;

use crate::policy::{Policy, PolicyRule};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// QUIC listen address.
    #[serde(default = "default_listen", with = "addr")]
    pub listen: SocketAddr,
    /// Ops endpoint (metrics, health); loopback by default.
    #[serde(default = "default_ops", with = "addr")]
    pub ops_listen: SocketAddr,
    /// How long running flows may continue after a drain starts.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// The intermediate's own PING interval on an idle connection. Agents and connectors ping
    /// it themselves (their `keepalive`), so this is a backstop for peers whose keepalive is
    /// longer than our `idle_timeout`. Unset: 4/5 of `idle_timeout`
    /// ([`ztna_node::transport::server_keepalive`]).
    #[serde(default, deserialize_with = "duration::option")]
    pub keepalive: Option<Duration>,
    /// A peer we have heard nothing from for this long is dead.
    #[serde(default = "default_idle", with = "duration")]
    pub idle_timeout: Duration,
    /// Concurrent flows one agent identity may have open, across all its connections.
    #[serde(default = "default_flows_per_agent")]
    pub max_flows_per_agent: u32,
    /// Concurrent flows routed to one connector connection.
    #[serde(default = "default_flows_per_connector")]
    pub max_flows_per_connector: u32,
    /// Concurrent flows through this intermediate; at the limit it reports not ready.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// With this many QUIC handshakes in progress, new attempts must first prove their address
    /// (QUIC Retry, one extra round trip): a flood from spoofed sources then costs no handshake.
    #[serde(default = "default_retry_threshold")]
    pub handshake_retry_threshold: u32,
    /// At most this many QUIC handshakes in progress. Beyond it, addresses that answered a
    /// Retry wait (first come, first served, up to 3 s, at most 4× this many) for a slot; others
    /// are dropped.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: u32,
    /// At most this many of them (in progress or waiting for a slot) from one source address
    /// (IPv4) or /64 (IPv6): one host that stalls its handshakes cannot hold every slot.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: u32,
    /// Concurrent connections one identity (agent or connector) may hold.
    #[serde(default = "default_connections_per_identity")]
    pub max_connections_per_identity: u32,
    /// A TCP flow with no byte in either direction for this long is reset (like a NAT's timeout).
    #[serde(default = "default_tcp_idle", with = "duration")]
    pub tcp_idle_timeout: Duration,
    /// A UDP flow with no datagram in either direction for this long is closed.
    #[serde(default = "default_udp_idle", with = "duration")]
    pub udp_idle_timeout: Duration,
    /// Peers told in GoAway where to reconnect (e.g. the other intermediate).
    #[serde(default)]
    pub reconnect_hint: Vec<String>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
    /// Log format: `text` (colour only on a terminal) or `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Flow-control window of one flow (bytes in flight before the receiver reads): one flow's
    /// throughput is at most this per round trip, and a stalled flow holds at most this.
    #[serde(default = "default_stream_window", with = "size")]
    pub stream_window: u64,
    /// Flow-control window of one agent connection (all its flows together): the most one
    /// agent connection can make the relay buffer.
    #[serde(default = "default_agent_window", with = "size")]
    pub agent_connection_window: u64,
    /// Flow-control window of one connector connection (all flows through it together).
    #[serde(default = "default_connector_window", with = "size")]
    pub connector_connection_window: u64,
    /// Most bytes one agent identity may have in flight towards one connector (and the
    /// connector towards us) that the other side has not consumed yet, over all its flows and
    /// connections. Keeps one agent's stalled flows from filling the connector connection's
    /// window that every agent shares. Used at most half of `connector_connection_window` (and
    /// of the connector's `connection_window`); needs connectors of revision 2 or later.
    #[serde(default = "default_identity_window", with = "size")]
    pub identity_window: u64,
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

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}
pub fn default_ops() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9470))
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Duration {
    Duration::from_secs(5)
}
fn default_flows_per_agent() -> u32 {
    1000
}
fn default_flows_per_connector() -> u32 {
    16_000
}
fn default_max_flows() -> u32 {
    100_000
}
fn default_retry_threshold() -> u32 {
    64
}
fn default_max_handshakes() -> u32 {
    2048
}
fn default_max_handshakes_per_source() -> u32 {
    128
}
fn default_connections_per_identity() -> u32 {
    8
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(60)
}

fn default_stream_window() -> u64 {
    ztna_node::transport::DEFAULT_STREAM_WINDOW
}
fn default_agent_window() -> u64 {
    16 << 20
}
fn default_connector_window() -> u64 {
    64 << 20
}
fn default_identity_window() -> u64 {
    ztna_node::credit::DEFAULT_IDENTITY_WINDOW
}

impl Config {
    /// Loads and validates a config file with command-line overrides.
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
        Policy::new(self.policy.clone())
            .validate()
            .map_err(|m| ("policy".to_string(), m))?;
        if let Some(k) = self.keepalive.filter(|k| *k >= self.idle_timeout) {
            return Err((
                "keepalive".into(),
                format!(
                    "must be shorter than idle_timeout ({k:?} >= {:?})",
                    self.idle_timeout
                ),
            ));
        }
        for (key, v) in [
            ("max_flows_per_agent", self.max_flows_per_agent),
            ("max_flows_per_connector", self.max_flows_per_connector),
            ("max_flows", self.max_flows),
            (
                "max_connections_per_identity",
                self.max_connections_per_identity,
            ),
            ("max_handshakes", self.max_handshakes),
            ("max_handshakes_per_source", self.max_handshakes_per_source),
        ] {
            if v == 0 {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        for (key, v) in [
            ("tcp_idle_timeout", self.tcp_idle_timeout),
            ("udp_idle_timeout", self.udp_idle_timeout),
        ] {
            if v < Duration::from_secs(1) {
                return Err((key.into(), "must be at least 1s".into()));
            }
        }
        if self.stream_window < 64 * 1024 {
            return Err(("stream_window".into(), "must be at least 64KiB".into()));
        }
        if self.agent_connection_window < 64 * 1024 {
            return Err((
                "agent_connection_window".into(),
                "must be at least 64KiB".into(),
            ));
        }
        if self.connector_connection_window < 64 * 1024 {
            return Err((
                "connector_connection_window".into(),
                "must be at least 64KiB".into(),
            ));
        }
        use ztna_node::credit::{MAX_IDENTITY_WINDOW, MIN_IDENTITY_WINDOW};
        if !(MIN_IDENTITY_WINDOW..=MAX_IDENTITY_WINDOW).contains(&self.identity_window) {
            return Err((
                "identity_window".into(),
                "must be between 64KiB and 1GiB".into(),
            ));
        }
        Ok(())
    }

    /// The per-agent budget in use: `identity_window`, at most half the connector window, so a
    /// second agent at its budget still leaves room for everyone else.
    pub fn effective_identity_window(&self) -> u64 {
        self.identity_window
            .min(self.connector_connection_window / 2)
            .max(ztna_node::credit::MIN_IDENTITY_WINDOW)
    }

    /// Streams one agent connection may have open at most: control stream + flows, with
    /// headroom for flows that are closing.
    pub fn max_streams_per_agent(&self) -> u32 {
        self.max_flows_per_agent.saturating_add(16)
    }

    /// The PING interval in use: `keepalive`, or the backstop derived from `idle_timeout`.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
            .unwrap_or_else(|| ztna_node::transport::server_keepalive(self.idle_timeout))
    }

    pub fn transport(&self) -> ztna_node::transport::TransportOptions {
        ztna_node::transport::TransportOptions {
            keepalive: self.keepalive(),
            idle_timeout: self.idle_timeout,
            // A new connection's stream credit; an agent's grows with its flows up to
            // `max_streams_per_agent` (see `session::StreamCredit`).
            max_streams: crate::session::initial_streams(self.max_streams_per_agent()),
            stream_window: self.stream_window,
            // Agents' window; connector connections get theirs when they say who they are.
            connection_window: self.agent_connection_window,
            ..Default::default()
        }
    }
}

//! Agent configuration: the keys of `agent.toml`, their defaults and validation.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use ztna_node::config::{self, addr, duration, size, ConfigError, TlsConfig};
use ztna_node::logging::LogFormat;
use ztna_proto::Protocol;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Intermediates in order of preference; the agent uses one and fails over to the next.
    pub intermediates: Vec<String>,
    #[serde(default = "default_ops", with = "addr")]
    pub ops_listen: SocketAddr,
    /// Local UDP address of the QUIC endpoint. The default `[::]:0` is dual stack (IPv6 and
    /// IPv4), or `0.0.0.0:0` on a host without IPv6.
    #[serde(default = "default_bind", with = "addr")]
    pub bind: SocketAddr,
    #[serde(default = "default_udp_idle", with = "duration")]
    pub udp_idle_timeout: Duration,
    /// A UDP flow whose client sent one datagram and got an answer (a DNS lookup: resolvers ask
    /// each query from a new port) ends after this long without traffic, not
    /// `udp_idle_timeout`: each such flow holds a slot of the relay's `max_flows_per_agent`.
    #[serde(default = "default_udp_query_idle", with = "duration")]
    pub udp_query_idle_timeout: Duration,
    /// How long a new local connection may wait for a tunnel (at startup or during failover)
    /// before it is refused.
    #[serde(default = "default_open_timeout", with = "duration")]
    pub open_timeout: Duration,
    /// On SIGTERM, how long running flows may continue while new local connections are refused.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default = "default_keepalive", with = "duration")]
    pub keepalive: Duration,
    #[serde(default = "default_idle", with = "duration")]
    pub idle_timeout: Duration,
    pub tls: TlsConfig,
    #[serde(default)]
    pub forward: Vec<Forward>,
    /// Log format: `text` (colour only on a terminal) or `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Ask for direct (P2P) paths to connectors; new flows use one once it is up, the relay
    /// otherwise. Off: every flow goes through an intermediate.
    #[serde(default = "default_p2p")]
    pub p2p: bool,
    /// Flow-control window of one flow (bytes in flight before the receiver reads): one flow's
    /// throughput is at most this per round trip, and a stalled flow holds at most this.
    #[serde(default = "default_stream_window", with = "size")]
    pub stream_window: u64,
    /// Flow-control window of a connection to an intermediate (all its flows together).
    #[serde(default = "default_connection_window", with = "size")]
    pub connection_window: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProtocol {
    Tcp,
    Udp,
}

impl From<ForwardProtocol> for Protocol {
    fn from(p: ForwardProtocol) -> Protocol {
        match p {
            ForwardProtocol::Tcp => Protocol::Tcp,
            ForwardProtocol::Udp => Protocol::Udp,
        }
    }
}

/// A local port that tunnels to a service.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub service: String,
    pub protocol: ForwardProtocol,
    #[serde(with = "addr")]
    pub listen: SocketAddr,
}

impl Forward {
    /// Parses the `--forward` shorthand `tcp:127.0.0.1:8080=web`.
    pub fn parse(s: &str) -> Result<Forward, String> {
        let usage = || {
            format!("invalid forward {s:?}: expected PROTO:ADDR:PORT=SERVICE, e.g. tcp:127.0.0.1:8080=web")
        };
        let (lhs, service) = s.rsplit_once('=').ok_or_else(usage)?;
        let (proto, listen) = lhs.split_once(':').ok_or_else(usage)?;
        let protocol = match proto {
            "tcp" => ForwardProtocol::Tcp,
            "udp" => ForwardProtocol::Udp,
            _ => {
                return Err(format!(
                    "invalid forward {s:?}: protocol must be tcp or udp"
                ))
            }
        };
        let listen =
            config::parse_addr(listen).map_err(|e| format!("invalid forward {s:?}: {e}"))?;
        if service.is_empty() {
            return Err(usage());
        }
        Ok(Forward {
            service: service.to_string(),
            protocol,
            listen,
        })
    }
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
    SocketAddr::from(([127, 0, 0, 1], 9472))
}
fn default_bind() -> SocketAddr {
    ztna_node::transport::DUAL_STACK_ANY
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_udp_query_idle() -> Duration {
    Duration::from_secs(5)
}
fn default_open_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
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
    16 << 20
}

fn default_p2p() -> bool {
    true
}

impl Config {
    pub fn load(
        path: Option<&Path>,
        overrides: Vec<(&str, toml::Value)>,
        extra: Vec<Forward>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = config::load(path, overrides)?;
        cfg.forward.extend(extra);
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
        if self.forward.is_empty() {
            return Err((
                "forward".into(),
                "configure at least one [[forward]] (or --forward)".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.forward.iter().enumerate() {
            if f.service.is_empty() {
                return Err((format!("forward[{i}].service"), "must not be empty".into()));
            }
            if !seen.insert((f.listen, f.protocol)) {
                return Err((
                    format!("forward[{i}].listen"),
                    format!("{} is used twice", f.listen),
                ));
            }
        }
        if self.keepalive >= self.idle_timeout {
            return Err((
                "keepalive".into(),
                "must be shorter than idle_timeout".into(),
            ));
        }
        if self.stream_window < 64 * 1024 {
            return Err(("stream_window".into(), "must be at least 64KiB".into()));
        }
        if self.connection_window < 64 * 1024 {
            return Err(("connection_window".into(), "must be at least 64KiB".into()));
        }
        if self.udp_idle_timeout < Duration::from_secs(1) {
            return Err(("udp_idle_timeout".into(), "must be at least 1s".into()));
        }
        if self.udp_query_idle_timeout < Duration::from_secs(1) {
            return Err((
                "udp_query_idle_timeout".into(),
                "must be at least 1s".into(),
            ));
        }
        // 0s would refuse every local connection at once while the config passed.
        if self.open_timeout < Duration::from_millis(100) {
            return Err(("open_timeout".into(), "must be at least 100ms".into()));
        }
        Ok(())
    }

    pub fn transport(&self) -> ztna_node::transport::TransportOptions {
        ztna_node::transport::TransportOptions {
            keepalive: self.keepalive,
            idle_timeout: self.idle_timeout,
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_shorthand() {
        let f = Forward::parse("tcp:127.0.0.1:8080=web").unwrap();
        assert_eq!(f.service, "web");
        assert_eq!(f.protocol, ForwardProtocol::Tcp);
        assert_eq!(f.listen, "127.0.0.1:8080".parse().unwrap());
        let f = Forward::parse("udp:[::1]:53=dns").unwrap();
        assert_eq!(f.protocol, ForwardProtocol::Udp);
        assert!(Forward::parse("sctp:127.0.0.1:1=x")
            .unwrap_err()
            .contains("tcp or udp"));
        assert!(Forward::parse("tcp:127.0.0.1=web").is_err());
        assert!(Forward::parse("tcp:127.0.0.1:80=").is_err());
    }

    fn with(extra: &str) -> Result<(), (String, String)> {
        let text = format!(
            "intermediates = [\"relay:4433\"]\n{extra}\n[[forward]]\nservice = \"web\"\nprotocol = \"tcp\"\n\
             listen = \"127.0.0.1:8080\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
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
            (
                "udp_query_idle_timeout = \"500ms\"",
                "udp_query_idle_timeout",
            ),
            ("open_timeout = \"0s\"", "open_timeout"),
        ] {
            assert_eq!(with(line).map_err(|e| e.0), Err(key.to_string()), "{line}");
        }
    }
}

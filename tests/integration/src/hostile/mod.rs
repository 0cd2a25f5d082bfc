//! The hostile test client's building blocks (issue 12): attacks driven through our own protocol
//! crate, the well-behaved victim, and the backends and local clients the system cases need.
//!
//! Everything here is bounded in count and time, and talks only to loopback or private
//! (RFC 1918) addresses: [`check_target`] refuses anything else, so a typo cannot aim a flood at
//! a real host. The `ztna-hostile` binary is a thin command line over these functions; the
//! in-process tests call them directly.

pub mod attacks;
pub mod direct;
pub mod initials;
pub mod local;
pub mod stall;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::{Connection, Endpoint, SendStream};
use ztna_node::config::TlsConfig;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::transport::TransportOptions;
use ztna_proto::{frame, ClientMsg, FlowOpen, FlowReply, Protocol, RejectReason, Role};

/// Cancelled to end a running attack early (the binary cancels it on SIGTERM/SIGINT): the
/// attacker then leaves the way it would at its deadline, closing its connections.
pub fn stop_token() -> &'static ztna_node::CancellationToken {
    static STOP: std::sync::OnceLock<ztna_node::CancellationToken> = std::sync::OnceLock::new();
    STOP.get_or_init(ztna_node::CancellationToken::new)
}

/// Completes at `deadline` or when the attack is stopped, whichever is first.
pub async fn until(deadline: tokio::time::Instant) {
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => {}
        _ = stop_token().cancelled() => {}
    }
}

/// Seconds since the Unix epoch, for events the driver compares with certificate times.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// True for addresses this tool may talk to: loopback, RFC 1918 and IPv6 ULA/loopback.
pub fn allowed_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Refuses targets outside loopback and private ranges.
pub fn check_target(addr: SocketAddr) -> Result<SocketAddr, String> {
    if allowed_ip(addr.ip()) {
        Ok(addr)
    } else {
        Err(format!(
            "{addr} is neither loopback nor a private address: the hostile client only talks to \
             test networks"
        ))
    }
}

/// Nearest-rank percentile of an ascending slice (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Adds one to a named tally.
pub fn tally(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

/// Who the attacker is: a certificate, its key, the CA it trusts, and the role it claims.
#[derive(Clone, Debug)]
pub struct Creds {
    pub tls: TlsConfig,
    pub role: Role,
}

impl Creds {
    /// The QUIC client config for these credentials (verifies the intermediate by SPIFFE role).
    pub fn client_config(&self) -> Result<quinn::ClientConfig, String> {
        let identity =
            ztna_node::Identity::load(&self.tls, self.role).map_err(|e| e.to_string())?;
        ztna_node::transport::client_config(
            &identity,
            Role::Intermediate,
            &TransportOptions::default(),
        )
        .map_err(|e| e.to_string())
    }
}

/// A client endpoint for talking to `server` (IPv4 or IPv6 wildcard, ephemeral port).
pub fn client_endpoint(server: SocketAddr) -> Result<Endpoint, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
    } else {
        "[::]:0".parse().map_err(|e| format!("{e}"))?
    };
    Endpoint::client(bind).map_err(|e| format!("client endpoint: {e}"))
}

/// An authenticated session with an intermediate: the connection and its control stream.
pub struct Session {
    pub conn: Connection,
    pub control_send: SendStream,
    pub control_recv: FramedRecv,
}

/// Connects and says Hello. A refusal (`Refused`, a closed connection) comes back as its reason.
pub async fn session(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
    role: Role,
    watch: Vec<String>,
    limit: Duration,
) -> Result<Session, String> {
    check_target(server)?;
    let attempt = async {
        let connecting = endpoint
            .connect_with(config.clone(), server, "ztna-intermediate")
            .map_err(|e| format!("connect: {e}"))?;
        let conn = connecting
            .await
            .map_err(|e| ztna_node::identity::describe_connection_error(&e))?;
        let ctl = ztna_node::client::hello(&conn, role, "ztna-hostile".into(), watch, limit).await;
        match ctl {
            Ok(c) => Ok(Session {
                conn,
                control_send: c.send,
                control_recv: c.recv,
            }),
            Err(e) => {
                // The reason the intermediate gave when it closed, if it did.
                let closed = tokio::time::timeout(Duration::from_millis(500), conn.closed())
                    .await
                    .map(|c| ztna_node::identity::describe_connection_error(&c))
                    .ok();
                Err(closed.map(|c| format!("{e} ({c})")).unwrap_or(e))
            }
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| format!("no Welcome within {limit:?}"))?
}

/// How one flow open ended.
pub enum FlowOutcome {
    Accepted(SendStream, FramedRecv),
    Rejected(RejectReason, String),
    /// `open_bi` did not get a stream within the limit (the peer's stream limit is reached).
    OpenTimeout,
    /// The `FlowOpen` could not be written within the limit (the connection's flow-control
    /// window is full: earlier flows filled it and the peer does not grant more).
    WriteTimeout,
    /// No `FlowReply` within the limit.
    ReplyTimeout,
    /// The stream or connection failed; the text says how.
    Failed(String),
}

impl FlowOutcome {
    /// A short label for tallies: `accepted`, `rejected:<reason>`, `open_timeout`, ...
    pub fn label(&self) -> String {
        match self {
            FlowOutcome::Accepted(..) => "accepted".into(),
            FlowOutcome::Rejected(r, _) => format!("rejected:{}", r.as_str()),
            FlowOutcome::OpenTimeout => "open_timeout".into(),
            FlowOutcome::WriteTimeout => "write_timeout".into(),
            FlowOutcome::ReplyTimeout => "reply_timeout".into(),
            FlowOutcome::Failed(why) => format!("failed:{}", short(why)),
        }
    }
}

/// The first words of an error, so tallies group alike failures.
pub fn short(why: &str) -> String {
    let cut: String = why.chars().take(60).collect();
    cut.split(':').next().unwrap_or("").trim().to_string()
}

/// Opens one flow: a stream, its `FlowOpen`, optionally a half-close, then the reply.
pub async fn open_flow(
    conn: &Connection,
    open: &FlowOpen,
    half_close: bool,
    limit: Duration,
) -> FlowOutcome {
    let (mut send, recv) = match tokio::time::timeout(limit, conn.open_bi()).await {
        Err(_) => return FlowOutcome::OpenTimeout,
        Ok(Err(e)) => {
            return FlowOutcome::Failed(ztna_node::identity::describe_connection_error(&e))
        }
        Ok(Ok(s)) => s,
    };
    match tokio::time::timeout(limit, write_frame(&mut send, open)).await {
        Err(_) => return FlowOutcome::WriteTimeout,
        Ok(Err(e)) => return FlowOutcome::Failed(e.to_string()),
        Ok(Ok(())) => {}
    }
    if half_close {
        let _ = send.finish();
    }
    let mut recv = FramedRecv::new(recv);
    match recv.expect::<FlowReply>(limit).await {
        Ok(FlowReply::Accept) => FlowOutcome::Accepted(send, recv),
        Ok(FlowReply::Reject { reason, message }) => FlowOutcome::Rejected(reason, message),
        Err(ztna_node::io::StreamError::Timeout) => FlowOutcome::ReplyTimeout,
        Err(e) => FlowOutcome::Failed(e.to_string()),
    }
}

/// A `FlowOpen` for a TCP flow to `service`.
pub fn tcp_open(service: &str) -> FlowOpen {
    FlowOpen {
        service: service.to_string(),
        protocol: Protocol::Tcp,
        flow_id: 0,
    }
}

/// A frame that the old decoder accepts and the new one refuses: a message whose service name is
/// `len` bytes (up to the 64 KiB frame cap).
pub fn long_name_frame(kind: NameKind, len: usize) -> Result<bytes::Bytes, String> {
    let service = "n".repeat(len);
    let encoded = match kind {
        NameKind::Flow => frame::encode(&FlowOpen {
            service,
            protocol: Protocol::Tcp,
            flow_id: 0,
        }),
        NameKind::Register => frame::encode(&ClientMsg::Register {
            service,
            tcp: true,
            udp: false,
        }),
    };
    encoded.map_err(|e| format!("a {len}-byte name does not fit one frame: {e}"))
}

/// Which message carries the long names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// `FlowOpen` on a new stream (agents).
    Flow,
    /// `Register` on the control stream (connectors).
    Register,
}

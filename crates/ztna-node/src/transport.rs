//! QUIC transport settings and endpoint construction shared by every role.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, VarInt};
use ztna_proto::Role;

use crate::identity::{Identity, IdentityError};

/// Tunables of a QUIC connection. Defaults notice a dead path within ~3× the keepalive interval
/// (the idle timeout), not the 30–40 s the old system needed.
#[derive(Debug, Clone, Copy)]
pub struct TransportOptions {
    /// PING interval on an otherwise idle connection. Clients ping; a server pings only as a
    /// backstop ([`server_keepalive`]).
    pub keepalive: Duration,
    /// A connection with no packet from the peer for this long is dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams the peer may open (= concurrent flows + control).
    pub max_streams: u32,
    /// Bytes of received datagrams buffered before new ones are dropped.
    pub datagram_buffer: usize,
    /// Flow-control window of one stream (one flow): bytes the peer may send before we read
    /// them. One flow's throughput is at most this per round trip (16 MiB over a 100 ms path:
    /// about 1.3 Gbit/s); it is also what a stalled flow can hold in memory.
    pub stream_window: u64,
    /// Flow-control window of a whole connection (all its flows together): the most a peer can
    /// make us buffer, however many flows it stalls. Also our send window towards the peer.
    pub connection_window: u64,
}

/// The PING interval of a server (an intermediate, or a connector's direct listener) on an idle
/// connection: 4/5 of its idle timeout, a backstop.
///
/// Its clients ping it every keepalive of theirs (1 s by default), and the ACK of each PING
/// keeps both ends' idle timers running. quinn restarts the keepalive timer on every packet it
/// receives, so a server with the clients' 1 s keepalive takes turns with them: 1.3 PINGs and
/// 2.6 datagrams per idle connection and second instead of 0.9 and 1.9, and 10,000 idle agents
/// cost an intermediate 25-30 % of one core instead of 20-22 % (`ztna-bench --mode scale`).
/// Pinging before its own idle timeout still keeps alive a client whose keepalive is longer than
/// that (an agent tuned for a relay with thousands of agents, talking to one left at defaults).
pub fn server_keepalive(idle_timeout: Duration) -> Duration {
    idle_timeout * 4 / 5
}

/// How long after a (possibly false) MTU black hole the path MTU is probed again.
pub const MTU_BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(1);

/// Default stream window: one flow reaches about 1.3 Gbit/s over a 100 ms path.
pub const DEFAULT_STREAM_WINDOW: u64 = 16 << 20;

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_streams: 1024,
            datagram_buffer: 1024 * 1024,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_STREAM_WINDOW,
        }
    }
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

impl TransportOptions {
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keepalive));
        t.max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams));
        // Flows are bidirectional streams; nothing uses unidirectional ones.
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.datagram_receive_buffer_size(Some(self.datagram_buffer));
        t.datagram_send_buffer_size(self.datagram_buffer);
        // Bounded windows: quinn's default connection receive window is unlimited, so a peer
        // stalling many flows could make us buffer without limit.
        t.stream_receive_window(varint(self.stream_window));
        t.receive_window(varint(self.connection_window.max(self.stream_window)));
        t.send_window(self.connection_window.max(self.stream_window));
        t.mtu_discovery_config(Some(Self::mtu_discovery()));
        t
    }

    /// Path MTU discovery. quinn takes a few bursts of lost full-size packets for an MTU black
    /// hole and then falls back to 1200 bytes; congestion loss looks the same. With quinn's 60 s
    /// cooldown a single lossy second pushed every full-size UDP payload onto the flow's
    /// stream (reliable, head-of-line blocked) for a minute (`ztna-bench --mode udp`: 41-58 % of
    /// the 5 s after a burst with 3 s, at most about 1 s of it with 1 s). Searching again soon
    /// heals a false alarm; a real black hole costs a few lost probes per search, never data.
    fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
        let mut m = quinn::MtuDiscoveryConfig::default();
        m.black_hole_cooldown(MTU_BLACK_HOLE_COOLDOWN);
        m
    }
}

/// QUIC server config accepting clients whose certificate carries one of `client_roles`.
pub fn server_config(
    identity: &Identity,
    client_roles: &[Role],
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, IdentityError> {
    let tls = identity.server_config(client_roles)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(opts.transport_config()));
    // Packets buffered for an attempt not yet accepted (waiting for a handshake slot): quinn's
    // defaults (10 MiB each, 100 MiB in all) suit 0-RTT data, which we never accept. A client
    // only retransmits its Initial meanwhile; a source stuffing queued attempts with packets
    // would otherwise hold memory before it has authenticated.
    cfg.incoming_buffer_size(INCOMING_BUFFER);
    cfg.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// See [`server_config`]: a few retransmitted Initials per waiting attempt.
pub const INCOMING_BUFFER: u64 = 16 * 1024;
/// See [`server_config`].
pub const INCOMING_BUFFER_TOTAL: u64 = 8 << 20;

/// QUIC client config that only accepts a server with `server_role`.
pub fn client_config(
    identity: &Identity,
    server_role: Role,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, IdentityError> {
    let tls = identity.client_config(server_role)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(opts.transport_config()));
    Ok(cfg)
}

/// Endpoint config of a server whose restarts peers should notice at once.
///
/// The stateless-reset key and the connection-ID generator key are derived from our private
/// key, so a restarted process recognises the connection IDs it issued before a crash and
/// answers the peers' next packet (a keepalive, within a second) with a valid stateless reset.
/// Without this, peers would only notice the crash after their idle timeout.
pub fn restart_aware_endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let reset = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &identity.derive_secret("stateless reset"),
    );
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset));
    let cid = identity.derive_secret("connection id");
    let cid_key = u64::from_le_bytes([
        cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
    ]);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// The default local address of agents and connectors: every IPv6 and (dual stack) IPv4 address.
pub const DUAL_STACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0);

/// One UDP socket, one endpoint, usable as client now and as server later (P2P after hole
/// punching: `endpoint.set_server_config(Some(..))` on the same socket).
///
/// An IPv6 wildcard (`[::]:port`, the default) makes a dual-stack socket (IPV6_V6ONLY off), so
/// intermediates are reachable over IPv6 and IPv4; on a host without IPv6 it falls back to
/// `0.0.0.0:port`. Any other address is bound as given. The socket notes which peers answer a
/// handshake ([`crate::answered`]).
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<Endpoint> {
    crate::answered::endpoint(quinn::EndpointConfig::default(), None, bind_socket(bind)?)
}

/// Like [`client_endpoint`], plus a [`Puncher`] that sends hole-punching packets from the very
/// same socket (so a NAT maps them like the endpoint's own traffic). `server` makes the endpoint
/// accept connections too (a connector's direct paths).
pub fn punchable_endpoint(
    bind: SocketAddr,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<(Endpoint, Puncher)> {
    let socket = bind_socket(bind)?;
    let puncher = Puncher {
        v6: socket.local_addr()?.is_ipv6(),
        socket: socket.try_clone()?,
    };
    Ok((crate::answered::endpoint(config, server, socket)?, puncher))
}

/// Sends hole-punching packets from an endpoint's socket (a second handle on the same socket).
/// The packets are 4 bytes: a QUIC endpoint receiving them drops them without an answer.
pub struct Puncher {
    socket: std::net::UdpSocket,
    v6: bool,
}

impl Puncher {
    /// Sends one punch packet to each target; returns how many went out.
    pub fn punch(&self, targets: &[SocketAddr]) -> usize {
        targets
            .iter()
            .filter_map(|t| self.reachable(*t))
            .filter(|t| self.socket.send_to(b"ztna", t).is_ok())
            .count()
    }

    /// Sends one punch packet to each target with an IP TTL / hop limit of `ttl`, so it opens
    /// our own NAT's mapping but expires before it reaches the other side's NAT (there, an
    /// unsolicited packet arriving before that NAT's own mapping exists can claim the port pair
    /// and make it map the peer's packets to another port). The socket's TTL is set for these
    /// sends and restored at once.
    pub fn punch_ttl(&self, targets: &[SocketAddr], ttl: u8) -> usize {
        let sock = socket2::SockRef::from(&self.socket);
        let (v4, v6) = (sock.ttl().ok(), sock.unicast_hops_v6().ok());
        let _ = sock.set_ttl(u32::from(ttl));
        if self.v6 {
            let _ = sock.set_unicast_hops_v6(u32::from(ttl));
        }
        let n = self.punch(targets);
        if let Some(t) = v4 {
            let _ = sock.set_ttl(t);
        }
        if let (true, Some(h)) = (self.v6, v6) {
            let _ = sock.set_unicast_hops_v6(h);
        }
        n
    }

    /// `t` as this socket can send to it (IPv4 through a dual-stack socket as IPv4-mapped).
    fn reachable(&self, t: SocketAddr) -> Option<SocketAddr> {
        match (self.v6, t.ip()) {
            (true, std::net::IpAddr::V4(v4)) => Some(SocketAddr::new(
                std::net::IpAddr::V6(v4.to_ipv6_mapped()),
                t.port(),
            )),
            (false, std::net::IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .map(|v4| SocketAddr::new(v4.into(), t.port())),
            _ => Some(t),
        }
    }

    /// The addresses a peer on the same network may reach this socket at: every up interface's
    /// address (loopback and link-local excluded) with the socket's port, IPv4 first.
    pub fn local_candidates(&self) -> Vec<SocketAddr> {
        let Ok(local) = self.socket.local_addr() else {
            return Vec::new();
        };
        let mut out: Vec<SocketAddr> = interface_addrs()
            .into_iter()
            .filter(|ip| self.v6 || ip.is_ipv4())
            .map(|ip| SocketAddr::new(ip, local.port()))
            .collect();
        out.sort_by_key(|a| a.is_ipv6());
        out.truncate(8);
        out
    }
}

/// Addresses of the host's interfaces that are up, without loopback, link-local and
/// unspecified ones.
pub fn interface_addrs() -> Vec<std::net::IpAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once; every pointer is checked
    // for null and the address structs are read according to their family.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_UP as libc::c_uint) == 0 {
                continue;
            }
            let ip = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            };
            let link_local = match ip {
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
                IpAddr::V4(v4) => v4.is_link_local(),
            };
            if !ip.is_loopback() && !ip.is_unspecified() && !link_local && !out.contains(&ip) {
                out.push(ip);
            }
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// The UDP socket of an agent's or connector's endpoint (see [`client_endpoint`]).
fn bind_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = bind_socket_inner(bind)?;
    size_quic_socket(&s, QUIC_SOCKET_BUFFER);
    Ok(s)
}

/// Receive and send buffer of an agent's or connector's QUIC socket. With the kernel's default
/// (~208 KiB) a relay dropped thousands of datagrams per GiB in bursts, which QUIC takes for
/// congestion: 4 MiB raised one flow through the relay from about 2.0 to 2.9 Gbit/s on loopback
/// (ztna-bench).
pub const QUIC_SOCKET_BUFFER: usize = 4 << 20;

/// Receive and send buffer of an intermediate's QUIC socket, which takes every peer's traffic:
/// in a reconnect storm of 10,000 agents a 4 MiB buffer overflowed in about half the runs
/// (up to 25,165 datagrams dropped), and each lost handshake packet stalls its agent for a
/// retransmission timeout of seconds (its first RTT sample is inflated by the storm); 16 MiB
/// dropped none in five runs (`ztna-bench --mode scale`). The kernel charges the buffer only
/// while datagrams wait in it.
pub const RELAY_SOCKET_BUFFER: usize = 16 << 20;

/// Sizes a QUIC socket's buffers to `bytes`; warns when the kernel grants less (its limit is
/// `net.core.rmem_max` / `wmem_max`; the NixOS modules raise them). A process that may pass
/// the limit (`CAP_NET_ADMIN`, e.g. root outside the NixOS modules' sandbox) does so, as
/// quic-go does, instead of running with buffers its operator never chose.
pub fn size_quic_socket(socket: &std::net::UdpSocket, bytes: usize) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
    // Linux reports twice what it granted (bookkeeping overhead included).
    let granted = || s.recv_buffer_size().unwrap_or(0) / 2;
    if granted() < bytes / 2 && crate::udp::force_buffers(socket, bytes) {
        static FORCED: std::sync::Once = std::sync::Once::new();
        FORCED.call_once(|| {
            tracing::info!(
                kib = bytes / 1024,
                "UDP socket buffers set past net.core.rmem_max / wmem_max (CAP_NET_ADMIN)"
            );
        });
    }
    let granted = granted();
    if granted < bytes / 2 {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                granted_kib = granted / 1024,
                wanted_kib = bytes / 1024,
                "the kernel limits UDP socket buffers (net.core.rmem_max); bursts will be dropped \
                 as loss: sysctl -w net.core.rmem_max={bytes} net.core.wmem_max={bytes}"
            );
        });
    }
}

fn bind_socket_inner(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = match dual_stack_socket(bind) {
        Ok(s) => s,
        Err(e) if bind.ip().is_unspecified() && bind.is_ipv6() && no_ipv6(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], bind.port()));
            tracing::info!(error = %e, %v4, "no IPv6 on this host, binding IPv4 only");
            std::net::UdpSocket::bind(v4)?
        }
        Err(e) => return Err(e),
    };
    Ok(socket)
}

fn dual_stack_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() && bind.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// Errors that mean "this host has no IPv6" (kernel without it, disabled, or forbidden by a
/// sandbox such as systemd's RestrictAddressFamilies).
fn no_ipv6(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::AddrNotAvailable | ErrorKind::Unsupported
    ) || matches!(
        e.raw_os_error(),
        Some(97 /* Linux EAFNOSUPPORT */) | Some(93 /* Linux EPROTONOSUPPORT */)
    )
}

/// An address as an operator expects to read it: an IPv4 peer seen through a dual-stack socket
/// (`[::ffff:192.0.2.1]:4433`) becomes `192.0.2.1:4433`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The name to send as SNI for `target` (`host:port`). The server is verified by SPIFFE role,
/// not by this name.
pub fn sni(target: &str) -> String {
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() || host.is_empty() {
        "ztna-intermediate".to_string()
    } else {
        host.to_string()
    }
}

/// Resolves `host:port` to every address, IPv6 and IPv4 interleaved (RFC 8305 order: the
/// resolver's first address, then alternating families), plus the name to send as SNI.
pub async fn resolve_all(target: &str) -> std::io::Result<(Vec<SocketAddr>, String)> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host(target).await?.collect();
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{target} resolves to no address"),
        ));
    }
    Ok((interleave(found), sni(target)))
}

/// Orders addresses for connection attempts: the first family the resolver preferred, then the
/// other, alternating; duplicates removed.
fn interleave(found: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = Vec::new();
    for a in found {
        if !seen.contains(&a) {
            seen.push(a);
        }
    }
    let first_v6 = seen.first().is_some_and(|a| a.is_ipv6());
    let (mut a, mut b): (Vec<_>, Vec<_>) = seen.into_iter().partition(|x| x.is_ipv6() == first_v6);
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(a.len() + b.len());
    while !a.is_empty() || !b.is_empty() {
        out.extend(a.pop());
        out.extend(b.pop());
    }
    out
}

/// Resolves `host:port` and returns the first address plus the name to send as SNI.
pub async fn resolve(target: &str) -> std::io::Result<(SocketAddr, String)> {
    let (addrs, sni) = resolve_all(target).await?;
    let first = addrs.first().copied().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{target} resolves to no address"),
        )
    })?;
    Ok((first, sni))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process has `CAP_NET_ADMIN` (bit 12 of `CapEff`).
    fn net_admin() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
                u64::from_str_radix(hex, 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 12) != 0)
    }

    /// A relay's socket gets the 16 MiB it asks for when the process may pass the kernel's
    /// limit, and exactly what the limit allows otherwise (never an error).
    #[cfg(target_os = "linux")]
    #[test]
    fn quic_socket_buffers_pass_the_kernels_limit_only_with_cap_net_admin() {
        let limit: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if limit == 0 || limit >= RELAY_SOCKET_BUFFER {
            println!(
                "skipped: net.core.rmem_max is {limit}, which does not limit a {RELAY_SOCKET_BUFFER}-byte buffer"
            );
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        size_quic_socket(&socket, RELAY_SOCKET_BUFFER);
        let s = socket2::SockRef::from(&socket);
        let (recv, send) = (
            s.recv_buffer_size().unwrap() / 2,
            s.send_buffer_size().unwrap() / 2,
        );
        if net_admin() {
            assert_eq!((recv, send), (RELAY_SOCKET_BUFFER, RELAY_SOCKET_BUFFER));
        } else {
            println!("without CAP_NET_ADMIN: the kernel's limit {limit} applies");
            assert!(recv <= limit, "{recv} > {limit}");
        }
    }

    #[test]
    fn interleaves_families_starting_with_the_resolvers_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = interleave(vec![
            a("[2001:db8::1]:4433"),
            a("[2001:db8::2]:4433"),
            a("192.0.2.1:4433"),
            a("[2001:db8::1]:4433"),
            a("192.0.2.2:4433"),
        ]);
        assert_eq!(
            got,
            vec![
                a("[2001:db8::1]:4433"),
                a("192.0.2.1:4433"),
                a("[2001:db8::2]:4433"),
                a("192.0.2.2:4433"),
            ]
        );
    }

    #[test]
    fn canonical_and_sni() {
        assert_eq!(
            canonical("[::ffff:192.0.2.1]:4433".parse().unwrap()),
            "192.0.2.1:4433".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            canonical("[::1]:4433".parse().unwrap()),
            "[::1]:4433".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(sni("[::1]:4433"), "ztna-intermediate");
        assert_eq!(sni("203.0.113.7:4433"), "ztna-intermediate");
        assert_eq!(sni("relay.example.com:4433"), "relay.example.com");
    }

    #[tokio::test]
    async fn default_endpoint_is_dual_stack() {
        let ep = client_endpoint(DUAL_STACK_ANY).unwrap();
        let local = ep.local_addr().unwrap();
        // On a host with IPv6 the socket is [::] (reaching IPv4 too); without, 0.0.0.0.
        assert!(local.ip().is_unspecified(), "{local}");
        let v4_target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // quinn refuses an IPv4 target on an IPv6-only socket; a dual-stack one accepts it.
        let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(
                rustls::ClientConfig::builder_with_provider(crate::identity::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
            .unwrap(),
        ));
        assert!(ep.connect_with(cfg, v4_target, "x").is_ok());
    }
}

#[cfg(all(test, target_os = "linux"))]
mod punch_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Receives one datagram and returns the IP TTL it arrived with (IP_RECVTTL).
    fn recv_ttl(s: &std::net::UdpSocket) -> Option<i32> {
        let on: libc::c_int = 1;
        let mut buf = [0u8; 64];
        let mut control = [0u64; 8];
        // SAFETY: every pointer refers to a live local buffer of the stated length.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            if libc::recvmsg(s.as_raw_fd(), &mut msg, 0) < 0 {
                return None;
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        None
    }

    #[tokio::test]
    async fn low_ttl_punches_leave_with_that_ttl_and_the_socket_keeps_its_own() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = rx.local_addr().unwrap();
        // The default dual-stack socket, sending to an IPv4 peer (as IPv4-mapped).
        let (_ep, p) =
            punchable_endpoint(DUAL_STACK_ANY, quinn::EndpointConfig::default(), None).unwrap();
        assert_eq!(p.punch_ttl(&[to], 2), 1);
        assert_eq!(recv_ttl(&rx), Some(2));
        assert_eq!(p.punch(&[to]), 1);
        let normal = recv_ttl(&rx).unwrap_or(0);
        assert!(normal > 2, "the socket kept TTL {normal}");
    }
}

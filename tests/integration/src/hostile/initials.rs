//! Item 8: a handshake flood. Valid QUIC Initial packets (each a fresh client connection with a
//! real TLS ClientHello offering `ztna/1`, built by quinn-proto) sent from spoofed source
//! addresses through a raw socket (root only), at a fixed rate. The intermediate has to do the
//! work of a handshake for each while its answers go nowhere.
//!
//! Sources are drawn from a network given on the command line, which must be loopback or
//! private (in a namespace or on 127.0.0.0/8), and so must the target.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{check_target, client_endpoint, percentile, Creds};

/// Most packets one run may send.
pub const MAX_PACKETS: usize = 200_000;

pub struct Initials {
    pub target: SocketAddr,
    /// Spoofed sources: addresses in `source_net/source_prefix`.
    pub source_net: Ipv4Addr,
    pub source_prefix: u8,
    pub rate: f64,
    pub secs: f64,
    /// Also time a real handshake (with `Creds`) every this often while flooding.
    pub probe_every: Option<Duration>,
}

/// A small xorshift generator: source addresses and ports need spread, not secrecy.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Builds `n` distinct Initial packets (UDP payloads) for `target`.
pub fn build_initials(
    config: &quinn::ClientConfig,
    target: SocketAddr,
    n: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let n = n.min(MAX_PACKETS);
    let ep_config = Arc::new(quinn_proto::EndpointConfig::default());
    let mut endpoint = quinn_proto::Endpoint::new(ep_config.clone(), None, false, None);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // A fresh endpoint now and then keeps its connection table small.
        if i % 512 == 511 {
            endpoint = quinn_proto::Endpoint::new(ep_config.clone(), None, false, None);
        }
        let now = std::time::Instant::now();
        let (_, mut conn) = endpoint
            .connect(now, config.clone(), target, "ztna-intermediate")
            .map_err(|e| format!("building an Initial: {e}"))?;
        let mut buf = Vec::with_capacity(1500);
        let t = conn
            .poll_transmit(now, 1, &mut buf)
            .ok_or("quinn-proto produced no Initial packet")?;
        buf.truncate(t.size);
        out.push(buf);
    }
    Ok(out)
}

/// A raw IPv4 socket that takes whole IP packets (IP_HDRINCL).
struct RawSocket(libc::c_int);

impl RawSocket {
    fn open() -> Result<RawSocket, String> {
        // SAFETY: plain socket(2) call; the descriptor is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(format!(
                "raw socket: {} (spoofed sources need root or CAP_NET_RAW)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(RawSocket(fd))
    }

    fn send(&self, packet: &[u8], dst: Ipv4Addr) -> std::io::Result<()> {
        // SAFETY: zeroed sockaddr_in is a valid value; we fill family and address.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr = libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        };
        // SAFETY: buffer and address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// IPv4 + UDP headers around `payload`. The kernel fills the IP checksum, total length and ID;
/// the UDP checksum is left 0 ("none"), which IPv4 allows.
fn ip_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let total = 20 + 8 + payload.len();
    out.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    out.extend_from_slice(&src.ip().octets());
    out.extend_from_slice(&dst.ip().octets());
    let udp_len = 8 + payload.len();
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&[(udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    out.extend_from_slice(payload);
}

/// Sends the packets at `rate` per second from random sources; returns (sent, send errors).
fn flood(
    packets: &[Vec<u8>],
    target: SocketAddrV4,
    net: Ipv4Addr,
    prefix: u8,
    rate: f64,
    deadline: std::time::Instant,
) -> Result<(u64, u64), String> {
    let sock = RawSocket::open()?;
    let host_bits = 32 - u32::from(prefix.min(32));
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    let base = u32::from(net) & !mask;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let started = std::time::Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(1600);
    for p in packets {
        let now = std::time::Instant::now();
        if now >= deadline || super::stop_token().is_cancelled() {
            break;
        }
        let due = started + Duration::from_secs_f64(sent as f64 / rate);
        if due > now {
            std::thread::sleep(due - now);
        }
        let host = (rng.next() as u32) & mask;
        let src_ip = Ipv4Addr::from(base | host.max(1));
        let src_port = 1024 + (rng.next() % 64_000) as u16;
        ip_udp(SocketAddrV4::new(src_ip, src_port), target, p, &mut buf);
        match sock.send(&buf, *target.ip()) {
            Ok(()) => sent += 1,
            Err(_) => errors += 1,
        }
    }
    Ok((sent, errors))
}

/// Times real handshakes (with `creds`) every `every` until `stop`; returns seconds per handshake
/// (failures as `None`).
async fn probe_handshakes(
    creds: Creds,
    target: SocketAddr,
    every: Duration,
    stop: Instant,
) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    let Ok(config) = creds.client_config() else {
        return out;
    };
    let Ok(endpoint) = client_endpoint(target) else {
        return out;
    };
    let mut tick = tokio::time::interval(every);
    while Instant::now() < stop && out.len() < 10_000 && !super::stop_token().is_cancelled() {
        tick.tick().await;
        let started = Instant::now();
        let attempt = async {
            let c = endpoint
                .connect_with(config.clone(), target, "ztna-intermediate")
                .ok()?;
            c.await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Some(conn)) => {
                out.push(Some(started.elapsed().as_secs_f64()));
                conn.close(0u32.into(), b"probe");
            }
            _ => out.push(None),
        }
    }
    out
}

pub async fn initials(
    creds: &Creds,
    o: &Initials,
    emit: &(dyn Fn(Value) + Sync),
) -> Result<Value, String> {
    let target = check_target(o.target)?;
    let SocketAddr::V4(target4) = target else {
        return Err("initials: IPv4 targets only".into());
    };
    if !super::allowed_ip(o.source_net.into()) {
        return Err(format!(
            "source network {} is neither loopback nor private",
            o.source_net
        ));
    }
    let rate = o.rate.clamp(1.0, 100_000.0);
    let n = ((rate * o.secs.clamp(0.0, 600.0)).ceil() as usize).min(MAX_PACKETS);
    let config = creds.client_config()?;
    let built = Instant::now();
    let packets = tokio::task::spawn_blocking(move || build_initials(&config, target, n))
        .await
        .map_err(|e| format!("{e}"))??;
    let build_secs = built.elapsed().as_secs_f64();
    let size = packets.first().map(Vec::len).unwrap_or(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.secs.clamp(0.0, 600.0));
    let std_deadline =
        std::time::Instant::now() + Duration::from_secs_f64(o.secs.clamp(0.0, 600.0));
    let (net, prefix) = (o.source_net, o.source_prefix);
    emit(json!({"event": "flooding", "packets": n, "t": super::unix_now()}));
    let sender = tokio::task::spawn_blocking(move || {
        flood(&packets, target4, net, prefix, rate, std_deadline)
    });
    let probes = match o.probe_every {
        Some(every) => probe_handshakes(creds.clone(), target, every, deadline).await,
        None => Vec::new(),
    };
    let (sent, errors) = sender.await.map_err(|e| format!("{e}"))??;
    let secs = started.elapsed().as_secs_f64();
    let mut ok: Vec<f64> = probes.iter().flatten().map(|s| s * 1000.0).collect();
    ok.sort_by(f64::total_cmp);
    Ok(json!({
        "attack": "initials",
        "packets_built": n,
        "build_secs": build_secs,
        "packet_bytes": size,
        "sent": sent,
        "send_errors": errors,
        "secs": secs,
        "rate_achieved": if secs > 0.0 { sent as f64 / secs } else { 0.0 },
        "probe_handshakes": probes.len(),
        "probe_failed": probes.iter().filter(|p| p.is_none()).count(),
        "probe_p50_ms": percentile(&ok, 50.0),
        "probe_max_ms": ok.last().copied().unwrap_or(0.0),
    }))
}

//! Which peers have answered a connection attempt.
//!
//! A relay that sheds load during a reconnect storm answers a new attempt with a QUIC Retry at
//! once, then handles the handshake when its turn comes, which can take longer than
//! [`crate::backoff::CONNECT_TIMEOUT`]. quinn does not tell the client about the Retry, so a
//! client that gave up at the timeout threw away the relay's work and came back for more: with
//! 10,000 agents reconnecting to one relay (`ztna-bench --mode scale`) 4,481–6,821 attempts
//! failed that way after the relay's restart. Client sockets are therefore wrapped so that every QUIC long-header packet
//! (Initial, Retry, Handshake: only handshakes send them) records its sender here, and
//! [`crate::client::connect`] gives an attempt longer when the peer has answered it.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::transport::canonical;

/// (local socket, peer) → when the peer last sent that socket a long-header packet.
static HEARD: LazyLock<Mutex<HashMap<(SocketAddr, SocketAddr), Instant>>> =
    LazyLock::new(Default::default);

/// Entries kept before old ones are dropped (only handshakes add entries, one per peer).
const MAX_ENTRIES: usize = 4096;
/// Entries older than this are dropped when the table is full.
const KEEP: Duration = Duration::from_secs(60);

/// Whether `peer` sent the socket bound to `local` a QUIC long-header packet at or after `since`.
pub fn since(local: SocketAddr, peer: SocketAddr, since: Instant) -> bool {
    crate::lock(&HEARD)
        .get(&(canonical(local), canonical(peer)))
        .is_some_and(|t| *t >= since)
}

fn record(local: SocketAddr, peer: SocketAddr) {
    let now = Instant::now();
    let mut heard = crate::lock(&HEARD);
    if heard.len() >= MAX_ENTRIES {
        heard.retain(|_, t| now.duration_since(*t) < KEEP);
        if heard.len() >= MAX_ENTRIES {
            heard.clear();
        }
    }
    heard.insert((canonical(local), canonical(peer)), now);
}

/// A QUIC version 1 long-header packet (RFC 9000 §17.2: header form and fixed bit set, then the
/// 32-bit version): what a server sends while a handshake is in progress.
fn is_handshake_packet(datagram: &[u8]) -> bool {
    datagram.len() >= 7 && datagram[0] & 0xc0 == 0xc0 && datagram[1..5] == [0, 0, 0, 1]
}

/// A UDP socket for quinn that notes who answered (see the module docs).
pub struct Watched {
    inner: Arc<dyn AsyncUdpSocket>,
    local: SocketAddr,
}

impl Watched {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> io::Result<Watched> {
        let local = inner.local_addr()?;
        Ok(Watched { inner, local })
    }
}

impl fmt::Debug for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("local", &self.local)
            .finish()
    }
}

impl AsyncUdpSocket for Watched {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let ready = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &ready {
            for (buf, m) in bufs.iter().zip(meta.iter()).take(*n) {
                // With GRO one buffer holds several datagrams of one sender; the first tells.
                let first = &buf[..m.len.min(m.stride).min(buf.len())];
                if is_handshake_packet(first) {
                    record(self.local, m.addr);
                }
            }
        }
        ready
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A quinn endpoint on `socket` whose socket is [`Watched`].
pub fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
) -> io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let watched = Arc::new(Watched::new(runtime.wrap_udp_socket(socket)?)?);
    quinn::Endpoint::new_with_abstract_socket(config, server, watched, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_quic_v1_long_headers_count() {
        let mut initial = vec![0xc3, 0, 0, 0, 1, 8, 1, 2, 3];
        assert!(is_handshake_packet(&initial));
        // Retry: long header, type 3.
        initial[0] = 0xf0;
        assert!(is_handshake_packet(&initial));
        // Short header (1-RTT), another version, a 4-byte hole-punching packet, nothing.
        assert!(!is_handshake_packet(&[0x43, 0, 0, 0, 1, 8, 1]));
        assert!(!is_handshake_packet(&[0xc3, 0xff, 0, 0, 0x1d, 8, 1]));
        assert!(!is_handshake_packet(&[0xc3, 0, 0, 0]));
        assert!(!is_handshake_packet(&[]));
    }

    #[test]
    fn records_per_local_socket_and_peer() {
        let local: SocketAddr = "[::]:40001".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4433".parse().unwrap();
        let before = Instant::now();
        assert!(!since(local, peer, before));
        record(local, mapped);
        assert!(
            since(local, peer, before),
            "a v4-mapped sender is the same peer"
        );
        assert!(!since("[::]:40002".parse().unwrap(), peer, before));
        assert!(!since(local, peer, Instant::now() + Duration::from_secs(1)));
    }
}

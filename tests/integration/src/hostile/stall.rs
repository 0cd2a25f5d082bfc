//! A real (not spoofed) source that starts QUIC handshakes and never finishes them: it answers
//! the relay's Retry (so it has proven its address), then, once the relay's handshake flight has
//! arrived, sends nothing more. Each attempt holds a handshake slot at the relay until its idle
//! timeout. What one ordinary host could do to a relay without any certificate.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// A client socket that goes silent once the server's handshake packets arrive (a long-header
/// packet that is not a Retry): the client's own handshake flight, its retransmissions and any
/// close are all dropped.
struct Stalling {
    inner: Arc<dyn AsyncUdpSocket>,
    silent: AtomicBool,
}

impl fmt::Debug for Stalling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stalling").finish()
    }
}

impl AsyncUdpSocket for Stalling {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.silent.load(Ordering::Relaxed) {
            return Ok(());
        }
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
                // Long header (0b11......), type not Retry (0b..11....).
                if m.len > 0 && buf[0] & 0xc0 == 0xc0 && buf[0] & 0x30 != 0x30 {
                    self.silent.store(true, Ordering::Relaxed);
                }
            }
        }
        ready
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Starts a stalled handshake from `source` (an address of this host) every `every` until
/// `stop`, keeping each client alive; returns how many were started.
pub async fn stall_handshakes(
    target: SocketAddr,
    source: std::net::IpAddr,
    config: quinn::ClientConfig,
    every: Duration,
    stop: ztna_node::CancellationToken,
) -> Result<u64, String> {
    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
    let started = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    let mut tick = tokio::time::interval(every);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let socket =
            std::net::UdpSocket::bind(SocketAddr::new(source, 0)).map_err(|e| e.to_string())?;
        let inner = runtime.wrap_udp_socket(socket).map_err(|e| e.to_string())?;
        let stalling = Arc::new(Stalling {
            inner,
            silent: AtomicBool::new(false),
        });
        let ep = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            stalling,
            runtime.clone(),
        )
        .map_err(|e| e.to_string())?;
        let connecting = ep
            .connect_with(config.clone(), target, "ztna-intermediate")
            .map_err(|e| e.to_string())?;
        started.fetch_add(1, Ordering::Relaxed);
        // It never completes; hold it (and its endpoint) until the end.
        held.push((
            ep,
            tokio::spawn(async move { connecting.await.map(|_| ()) }),
        ));
        // Forget the ones whose attempt is over (timed out), keeping memory bounded.
        held.retain(|(_, t)| !t.is_finished());
    }
    for (ep, t) in held {
        t.abort();
        ep.close(0u32.into(), b"");
    }
    Ok(started.load(Ordering::Relaxed))
}

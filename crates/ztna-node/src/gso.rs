//! Segmentation offload (GSO) only for connections that send in bulk.
//!
//! quinn gives every connection a transmit buffer sized for a full GSO batch (ten full-size
//! packets, about 14 KiB) the first time it sends two packets at once, which every handshake
//! does, and keeps it for the connection's life (quinn 0.11.12 `connection.rs` `drive_transmit`,
//! quinn-proto 0.11.19 `poll_transmit`). An intermediate holding 10,000 idle agent connections
//! thus kept 130 MiB of buffers that only bulk transfers use: a third of its memory per
//! connection (`ztna-bench --mode scale`).
//!
//! [`Runtime`] runs each of quinn's tasks (one driver per connection, one per endpoint) with a
//! count of the bytes it has sent, and its sockets offer GSO to a task only once that count
//! passes [`BULK`]. Until then quinn sends one packet per transmit, so its buffer stays one
//! packet long. A connection carrying a bulk flow passes [`BULK`] within its first
//! milliseconds, and from then on batches as before.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, TokioRuntime, UdpPoller};

/// Bytes a task sends before its socket offers it segmentation offload: 64 KiB, some 45
/// full-size packets. A handshake (a few KiB) and months of keepalives stay below it for long
/// (an idle connection sends about 40 B a second); a bulk flow passes it at once.
pub const BULK: u64 = 64 * 1024;

tokio::task_local! {
    /// Bytes sent so far by the quinn task being polled.
    static SENT: Cell<u64>;
}

/// quinn's Tokio runtime, with each spawned task counting what it sends (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct Runtime;

impl Runtime {
    pub fn shared() -> Arc<dyn quinn::Runtime> {
        Arc::new(Runtime)
    }
}

impl quinn::Runtime for Runtime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(SENT.scope(Cell::new(0), future));
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(Socket::new(TokioRuntime.wrap_udp_socket(t)?)))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A socket that offers GSO to a task once it has sent [`BULK`] bytes.
pub struct Socket {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl Socket {
    /// `inner` with GSO offered only to bulk senders; quinn must run on [`Runtime`] for it to
    /// tell them apart (elsewhere it offers what `inner` does).
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Socket {
        Socket { inner }
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// The segments to offer a task that has sent `sent` bytes (`None`: not a counted task), when
/// the socket can send `max` at once.
fn segments(sent: Option<u64>, max: usize) -> usize {
    match sent {
        Some(sent) if sent < BULK => 1,
        _ => max,
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        let _ = SENT.try_with(|s| s.set(s.get().saturating_add(transmit.contents.len() as u64)));
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        segments(
            SENT.try_with(Cell::get).ok(),
            self.inner.max_transmit_segments(),
        )
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_task_past_the_bulk_mark_is_offered_segmentation() {
        assert_eq!(segments(Some(0), 10), 1);
        assert_eq!(segments(Some(BULK - 1), 10), 1);
        assert_eq!(segments(Some(BULK), 10), 10);
        // A socket that lost GSO (quinn-udp drops to 1 after a failed GSO send) stays at 1.
        assert_eq!(segments(Some(BULK), 1), 1);
        // Outside quinn's tasks nothing changes.
        assert_eq!(segments(None, 10), 10);
    }

    #[tokio::test]
    async fn sends_are_counted_in_quinn_tasks_only() {
        assert!(SENT.try_with(Cell::get).is_err());
        let (tx, rx) = tokio::sync::oneshot::channel();
        quinn::Runtime::spawn(
            &Runtime,
            Box::pin(async move {
                let _ = tx.send(SENT.try_with(Cell::get).ok());
            }),
        );
        assert_eq!(rx.await.ok(), Some(Some(0)));
    }
}

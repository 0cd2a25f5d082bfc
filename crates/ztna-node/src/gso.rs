//! Segmentation offload (GSO) only for connections that send in bulk.
//!
//! quinn gives every connection a transmit buffer sized for a full GSO batch (ten full-size
//! packets, about 14 KiB) the first time it sends two packets at once, which every handshake
//! does, and keeps it for the connection's life (quinn 0.11.12 `connection.rs` `drive_transmit`,
//! quinn-proto 0.11.19 `poll_transmit`). An intermediate holding 10,000 idle agent connections
//! thus reserved 130 MiB of heap for buffers that only bulk transfers use; resident, that was
//! 3 KiB per connection (42.4 KiB before this, 39.3 after, `ztna-bench --mode scale`; the rest
//! of each buffer was never written).
//!
//! [`Runtime`] runs each of quinn's tasks (one driver per connection, one per endpoint) with a
//! count of the bytes it sent in the current second, and its sockets offer GSO to a task only
//! while that count is past [`BULK`]. Until then quinn sends one packet per transmit, so its
//! buffer stays one packet long. A connection carrying a bulk flow passes [`BULK`] within the
//! first milliseconds of each second and batches from then on; keepalives (about 40 B a second)
//! and loss probes never do.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, TokioRuntime, UdpPoller};

/// Bytes a task sends in one [`PERIOD`] before its socket offers it segmentation offload: 64 KiB
/// (some 45 full-size packets, 512 kbit/s). A handshake (about 7 KiB) and keepalives stay below
/// it; a bulk flow passes it at once.
pub const BULK: u64 = 64 * 1024;
/// The period [`BULK`] counts over.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Bytes a task sent since `since` (the start of its current period).
#[derive(Clone, Copy)]
struct Sent {
    bytes: u64,
    since: Instant,
}

tokio::task_local! {
    /// What the quinn task being polled sent in its current period.
    static SENT: Cell<Sent>;
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
        let sent = Sent {
            bytes: 0,
            since: Instant::now(),
        };
        tokio::spawn(SENT.scope(Cell::new(sent), future));
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

/// The segments to offer a task that has sent `sent` bytes in its current period (`None`: not a
/// counted task), when the socket can send `max` at once.
fn segments(sent: Option<u64>, max: usize) -> usize {
    match sent {
        Some(sent) if sent < BULK => 1,
        _ => max,
    }
}

/// What the current task sent in its current period (`None` outside quinn's tasks).
fn sent_now(now: Instant) -> Option<u64> {
    SENT.try_with(|s| {
        let s = s.get();
        if now.saturating_duration_since(s.since) < PERIOD {
            s.bytes
        } else {
            0
        }
    })
    .ok()
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        let now = Instant::now();
        let _ = SENT.try_with(|s| {
            let mut sent = s.get();
            if now.saturating_duration_since(sent.since) >= PERIOD {
                sent = Sent {
                    bytes: 0,
                    since: now,
                };
            }
            sent.bytes = sent.bytes.saturating_add(transmit.contents.len() as u64);
            s.set(sent);
        });
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
        segments(sent_now(Instant::now()), self.inner.max_transmit_segments())
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
    async fn sends_are_counted_in_quinn_tasks_only_and_per_period() {
        assert_eq!(sent_now(Instant::now()), None);
        let (tx, rx) = tokio::sync::oneshot::channel();
        quinn::Runtime::spawn(
            &Runtime,
            Box::pin(async move {
                let start = Instant::now();
                let fresh = sent_now(start);
                SENT.with(|s| {
                    s.set(Sent {
                        bytes: BULK,
                        since: start,
                    })
                });
                let within = sent_now(start + PERIOD / 2);
                let after = sent_now(start + PERIOD);
                let _ = tx.send((fresh, within, after));
            }),
        );
        // A new task has sent nothing; a period's bytes count only within that period.
        assert_eq!(rx.await.ok(), Some((Some(0), Some(BULK), Some(0))));
    }
}

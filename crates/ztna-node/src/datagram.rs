//! Sending QUIC datagrams without silent loss: quinn's `send_datagram` discards the *oldest*
//! queued datagrams when its buffer is full and nobody would know; here a full buffer is an
//! outcome the caller counts, and a payload too large for the path is one it can carry another
//! way (on the flow's stream).
//!
//! The flows of a connection share its datagram send buffer, and a datagram that finds it full is
//! dropped whichever flow it belongs to: one flow sending far more than the path carries (a
//! bulk transfer, a video burst) would keep the buffer full and starve every other flow (a DNS
//! query's answer) as much as itself. [`Fair`] keeps the buffer's second half for the flows that
//! send no more than their share: once it is half full, a flow that offered more than the fair
//! share in the last 100 ms (the connection's offered bytes over its sending flows) is dropped,
//! while the others still get through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// What happened to a datagram handed to [`send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Larger than the path currently allows.
    TooLarge,
    /// The send buffer is full (congestion): dropped instead of evicting older datagrams.
    BufferFull,
    /// The connection is gone.
    Gone,
}

/// Queues `d` on `conn` unless that would drop older datagrams or it cannot fit the path.
pub fn send(conn: &quinn::Connection, d: Bytes) -> Sent {
    send_if(conn, d, |_| true)
}

/// [`send`], for one of the flows sharing `conn` through `fair` (`meter`: this flow's).
pub fn send_fair(fair: &Fair, meter: &FlowMeter, conn: &quinn::Connection, d: Bytes) -> Sent {
    let heavy = fair.offer(meter, d.len() as u64);
    send_if(conn, d, |space| !heavy || space >= fair.capacity / 2)
}

/// [`send`] if `room(space left in the buffer)` allows it (else [`Sent::BufferFull`]).
fn send_if(conn: &quinn::Connection, d: Bytes, room: impl FnOnce(usize) -> bool) -> Sent {
    match conn.max_datagram_size() {
        None => return Sent::Gone,
        Some(max) if d.len() > max => return Sent::TooLarge,
        _ => {}
    }
    let space = conn.datagram_send_buffer_space();
    if space < d.len() || !room(space) {
        return Sent::BufferFull;
    }
    match conn.send_datagram(d) {
        Ok(()) => Sent::Queued,
        Err(quinn::SendDatagramError::TooLarge) => Sent::TooLarge,
        Err(_) => Sent::Gone,
    }
}

/// How long the offered bytes of a connection and of its flows are counted together.
const WINDOW: Duration = Duration::from_millis(100);

/// One connection's datagram send buffer, shared fairly by its flows (see the module docs).
pub struct Fair {
    start: Instant,
    /// The buffer's size (its free space when the connection was new).
    capacity: usize,
    /// The current window, counted from `start`.
    window: AtomicU64,
    /// Bytes offered, and flows that offered any, in the current window.
    offered: AtomicU64,
    flows: AtomicU64,
    /// The last window's fair share per flow (`u64::MAX` when there was none).
    share: AtomicU64,
}

/// One flow's offered bytes on a [`Fair`] connection (its own, whichever task sends them).
#[derive(Default)]
pub struct FlowMeter {
    window: AtomicU64,
    offered: AtomicU64,
    /// What it offered in the window before `window`.
    last: AtomicU64,
}

impl Fair {
    /// For `conn`, new (its datagram send buffer is empty).
    pub fn new(conn: &quinn::Connection) -> Fair {
        Fair::with_capacity(conn.datagram_send_buffer_space())
    }

    /// For a connection whose datagram send buffer holds `capacity` bytes.
    fn with_capacity(capacity: usize) -> Fair {
        Fair {
            start: Instant::now(),
            capacity,
            window: AtomicU64::new(0),
            offered: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            share: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts `n` bytes offered by the flow of `meter`; true if it offered more than its fair
    /// share in the last window (then it gets only the buffer's first half).
    fn offer(&self, meter: &FlowMeter, n: u64) -> bool {
        let now = (self.start.elapsed().as_millis() / WINDOW.as_millis()) as u64;
        self.offer_in(now, meter, n)
    }

    /// [`Fair::offer`] in window `now`.
    fn offer_in(&self, now: u64, meter: &FlowMeter, n: u64) -> bool {
        let current = self.window.load(Ordering::Acquire);
        if current != now
            && self
                .window
                .compare_exchange(current, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread closes the window (others count on into the next one).
            let offered = self.offered.swap(0, Ordering::AcqRel);
            let flows = self.flows.swap(0, Ordering::AcqRel);
            // No share to keep to for a flow alone, or after a quiet spell.
            let share = match flows {
                0 | 1 => u64::MAX,
                _ if now != current + 1 => u64::MAX,
                f => offered / f,
            };
            self.share.store(share, Ordering::Release);
        }
        let mine = meter.window.load(Ordering::Relaxed);
        if mine != now {
            let before = meter.offered.swap(0, Ordering::Relaxed);
            let last = if mine + 1 == now { before } else { 0 };
            meter.last.store(last, Ordering::Relaxed);
            meter.window.store(now, Ordering::Relaxed);
            self.flows.fetch_add(1, Ordering::AcqRel);
        }
        meter.offered.fetch_add(n, Ordering::Relaxed);
        self.offered.fetch_add(n, Ordering::AcqRel);
        // An eighth of slack: flows offering about as much as each other are all within it.
        let share = self.share.load(Ordering::Acquire);
        meter.last.load(Ordering::Relaxed) > share.saturating_add(share / 8)
    }
}

/// Whether a datagram of `len` bytes (header included) fits `conn`'s path now.
pub fn fits(conn: &quinn::Connection, len: usize) -> bool {
    conn.max_datagram_size().is_some_and(|max| len <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fair() -> Fair {
        Fair::with_capacity(1 << 20)
    }

    /// Offers `per_window` bytes in 1200-byte datagrams for each meter in windows `from..to`;
    /// whether each meter was heavy at the end.
    fn run(f: &Fair, meters: &[(&FlowMeter, u64)], windows: std::ops::Range<u64>) -> Vec<bool> {
        let mut heavy = vec![false; meters.len()];
        for w in windows {
            for (i, (m, per_window)) in meters.iter().enumerate() {
                for _ in 0..per_window / 1200 {
                    heavy[i] = f.offer_in(w, m, 1200);
                }
            }
        }
        heavy
    }

    #[test]
    fn a_flow_alone_is_never_heavy() {
        let f = fair();
        let bulk = FlowMeter::default();
        assert_eq!(run(&f, &[(&bulk, 10_000_000)], 0..5), [false]);
    }

    #[test]
    fn beside_a_light_flow_a_bulk_one_is_heavy_and_the_light_one_not() {
        let f = fair();
        let (bulk, query) = (FlowMeter::default(), FlowMeter::default());
        // The first window has no share yet.
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 0..1),
            [false, false]
        );
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 1..4),
            [true, false]
        );
        // The bulk flow stops: a window later it is light again.
        assert_eq!(
            run(&f, &[(&bulk, 2_400), (&query, 2_400)], 4..6),
            [false, false]
        );
    }

    #[test]
    fn flows_offering_alike_are_none_heavy() {
        let f = fair();
        let (a, b, c) = (
            FlowMeter::default(),
            FlowMeter::default(),
            FlowMeter::default(),
        );
        let alike = [(&a, 3_000_000), (&b, 3_120_000), (&c, 2_940_000)];
        assert_eq!(run(&f, &alike, 0..6), [false, false, false]);
    }

    #[test]
    fn after_a_quiet_spell_no_share_holds() {
        let f = fair();
        let (bulk, query) = (FlowMeter::default(), FlowMeter::default());
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 0..3),
            [true, false]
        );
        // Nothing for a second; then the bulk flow alone.
        assert_eq!(run(&f, &[(&bulk, 10_000_000)], 13..14), [false]);
    }
}

//! Sending QUIC datagrams without silent loss: quinn's `send_datagram` discards the *oldest*
//! queued datagrams when its buffer is full and nobody would know; here a full buffer is an
//! outcome the caller counts, and a payload too large for the path is one it can carry another
//! way (on the flow's stream).
//!
//! The flows of a connection share its datagram send buffer (1 MiB). On a congested path a flow
//! offering far more than the path carries (a bulk transfer, a video burst) would keep it full:
//! every other flow's datagram would be dropped as often as the bulk flow's, and the ones that
//! got in would wait behind a full buffer, 0.8 s on a 10 Mbit/s path (`dig` beside `iperf3` in
//! the namespace suite). [`Fair`] gives each flow a class from what it offered in the last
//! 100 ms window or, if more, so far in this one:
//! - **small** (under 64 KiB, 5 Mbit/s: a DNS, VoIP or interactive flow): queued while the
//!   buffer has room;
//! - **heavy** (more than the fair share in the last window, the connection's offered bytes over
//!   its sending flows, plus an eighth): queued while the buffer as a whole holds less than the
//!   path sent in 20 ms, and never past half of it;
//! - **bulk** (the rest, such as a lone large flow): queued while the buffer holds less than the
//!   path sent in 100 ms.
//!
//! Both limits are at least 64 KiB (what a reader hands over at once), so on a path slower than
//! 26 Mbit/s a heavy flow's queue is 64 KiB (52 ms at 10 Mbit/s). They apply only while a queue
//! stands: once the buffer held less than 32 KiB at a window's end the path keeps up, and bursts
//! of any size may use the whole buffer. So on a congested path a small flow's datagram waits
//! behind about 100 ms of queue, or the heavy flows' short one, instead of a full buffer, and the
//! bulk flow still keeps the path busy. (A lone flow's 50 ms queue cost it a twentieth of what
//! it delivered while recovering from a lossy burst, in `ztna-bench --mode udp`; 100 ms costs
//! nothing there.)
//!
//! Upstream quinn writes queued datagrams into a packet before stream data, so while a datagram
//! queue stood the connection's TCP flows got only the room packets had left; our quinn-proto
//! (`vendor/README.md`) lets the two take turns.

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
    let space = conn.datagram_send_buffer_space();
    send_if(conn, d, space, |_| true)
}

/// [`send`], for one of the flows sharing `conn` through `fair` (`meter`: this flow's).
pub fn send_fair(fair: &Fair, meter: &FlowMeter, conn: &quinn::Connection, d: Bytes) -> Sent {
    let len = d.len() as u64;
    let occupied = |space: usize| fair.capacity.saturating_sub(space) as u64;
    let space = conn.datagram_send_buffer_space();
    let class = fair.offer(meter, len, occupied(space));
    let sent = send_if(conn, d, space, |space| occupied(space) < fair.limit(class));
    if sent == Sent::Queued {
        fair.queued.fetch_add(len, Ordering::Relaxed);
    }
    sent
}

/// [`send`] if `room(space left in the buffer)` allows it (else [`Sent::BufferFull`]); `space`:
/// the buffer's free space, read just before.
fn send_if(
    conn: &quinn::Connection,
    d: Bytes,
    space: usize,
    room: impl FnOnce(usize) -> bool,
) -> Sent {
    match conn.max_datagram_size() {
        None => return Sent::Gone,
        Some(max) if d.len() > max => return Sent::TooLarge,
        _ => {}
    }
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
/// A heavy flow's datagrams are queued while the buffer holds less than the path sent in this
/// long, a bulk flow's while it holds less than it sent in [`BULK_QUEUE`]...
const HEAVY_QUEUE: Duration = Duration::from_millis(20);
const BULK_QUEUE: Duration = Duration::from_millis(100);
/// ...or less than this (what a reader hands over at once: 32 datagrams of 1500 B is 47 KiB). A
/// flow that offered less than this in the last window and so far in this one is small; a
/// queue of half this or more at a window's end stands.
const QUEUE_MIN: u64 = 64 * 1024;

/// A flow's class on its connection (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Small,
    Bulk,
    Heavy,
}

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
    /// Bytes queued into the buffer (by [`send_fair`]) since `start`.
    queued: AtomicU64,
    /// When the last window closed (ms since `start`), and `queued` and the buffer's occupancy
    /// then: what the path sent since is what left the buffer.
    mark_ms: AtomicU64,
    mark_queued: AtomicU64,
    mark_occupied: AtomicU64,
    /// What the path carried, in bytes a second, while a queue stood at the last measurement
    /// (`u64::MAX`: none stood); the classes' limits follow from it ([`Fair::limit`]).
    drain: AtomicU64,
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
            queued: AtomicU64::new(0),
            mark_ms: AtomicU64::new(0),
            mark_queued: AtomicU64::new(0),
            mark_occupied: AtomicU64::new(0),
            drain: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts `n` bytes offered by the flow of `meter` while the buffer holds `occupied` bytes;
    /// the flow's class, from what it offered in the last window and so far in this one.
    fn offer(&self, meter: &FlowMeter, n: u64, occupied: u64) -> Class {
        self.offer_at(self.start.elapsed().as_millis() as u64, meter, n, occupied)
    }

    /// [`Fair::offer`] at `ms` since `start`.
    fn offer_at(&self, ms: u64, meter: &FlowMeter, n: u64, occupied: u64) -> Class {
        let now = ms / WINDOW.as_millis() as u64;
        let current = self.window.load(Ordering::Acquire);
        // A sender that read the time just before another one closed the window does not close
        // it again (nor take it back).
        if now > current
            && self
                .window
                .compare_exchange(current, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread closes the window (others count on into the next one).
            self.measure_path(ms, occupied);
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
        if now > mine {
            let before = meter.offered.swap(0, Ordering::Relaxed);
            let last = if mine + 1 == now { before } else { 0 };
            meter.last.store(last, Ordering::Relaxed);
            meter.window.store(now, Ordering::Relaxed);
            self.flows.fetch_add(1, Ordering::AcqRel);
        }
        let so_far = meter.offered.fetch_add(n, Ordering::Relaxed) + n;
        self.offered.fetch_add(n, Ordering::AcqRel);
        // An eighth of slack: flows offering about as much as each other are all within it.
        let share = self.share.load(Ordering::Acquire);
        let last = meter.last.load(Ordering::Relaxed);
        if last.max(so_far) < QUEUE_MIN {
            Class::Small
        } else if last > share.saturating_add(share / 8) {
            Class::Heavy
        } else {
            Class::Bulk
        }
    }

    /// The occupancy below which a datagram of a flow of `class` is queued.
    fn limit(&self, class: Class) -> u64 {
        let (queue, ceiling) = match class {
            Class::Small => return u64::MAX,
            Class::Bulk => (BULK_QUEUE, self.capacity as u64),
            Class::Heavy => (HEAVY_QUEUE, (self.capacity / 2) as u64),
        };
        match self.drain.load(Ordering::Relaxed) {
            u64::MAX => ceiling,
            per_s => (per_s.saturating_mul(queue.as_millis() as u64) / 1000)
                .clamp(QUEUE_MIN, ceiling.max(QUEUE_MIN)),
        }
    }

    /// At a window's close: the rate at which the buffer drained since the last one, which is
    /// what the path carried if a queue stood.
    fn measure_path(&self, ms: u64, occupied: u64) {
        let since = ms.saturating_sub(self.mark_ms.load(Ordering::Relaxed));
        if since < WINDOW.as_millis() as u64 / 2 {
            // Too short to tell a rate (the first window, or a close right after a late one):
            // the next close measures over both.
            return;
        }
        self.mark_ms.store(ms, Ordering::Relaxed);
        let queued = self.queued.load(Ordering::Relaxed);
        let came = queued.saturating_sub(self.mark_queued.swap(queued, Ordering::Relaxed));
        let was = self.mark_occupied.swap(occupied, Ordering::Relaxed);
        // Below half the floor (not the floor itself, which a flow held at the floor hovers
        // around): the path keeps up, no limit but the buffer's.
        let drain = if occupied < QUEUE_MIN / 2 {
            u64::MAX
        } else {
            (was + came).saturating_sub(occupied) * 1000 / since
        };
        self.drain.store(drain, Ordering::Relaxed);
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
    /// each meter's class at the end.
    fn run(f: &Fair, meters: &[(&FlowMeter, u64)], windows: std::ops::Range<u64>) -> Vec<Class> {
        let mut class = vec![Class::Small; meters.len()];
        for w in windows {
            for (i, (m, per_window)) in meters.iter().enumerate() {
                for _ in 0..per_window / 1200 {
                    class[i] = f.offer_at(w * 100, m, 1200, 0);
                }
            }
        }
        class
    }

    use Class::*;

    #[test]
    fn a_large_flow_alone_is_bulk_never_heavy_and_a_modest_one_small() {
        let f = fair();
        let bulk = FlowMeter::default();
        assert_eq!(run(&f, &[(&bulk, 10_000_000)], 0..5), [Bulk]);
        // 400 kbit/s (a video call's audio and more): small.
        let call = FlowMeter::default();
        assert_eq!(run(&fair(), &[(&call, 5_000)], 0..5), [Small]);
    }

    #[test]
    fn beside_a_light_flow_a_bulk_one_is_heavy_and_the_light_one_small() {
        let f = fair();
        let (bulk, query) = (FlowMeter::default(), FlowMeter::default());
        // The first window has no share yet, but what the bulk flow offers in it is large.
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 0..1),
            [Bulk, Small]
        );
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 1..4),
            [Heavy, Small]
        );
        // The bulk flow slows down: a window later it is small again.
        assert_eq!(
            run(&f, &[(&bulk, 2_400), (&query, 2_400)], 4..6),
            [Small, Small]
        );
    }

    #[test]
    fn large_flows_offering_alike_are_none_heavy() {
        let f = fair();
        let (a, b, c) = (
            FlowMeter::default(),
            FlowMeter::default(),
            FlowMeter::default(),
        );
        let alike = [(&a, 3_000_000), (&b, 3_120_000), (&c, 2_940_000)];
        assert_eq!(run(&f, &alike, 0..6), [Bulk, Bulk, Bulk]);
    }

    /// `windows` 100 ms windows in which the buffer holds `occupied` at each end while
    /// `per_window` more are queued (and as many sent by the path).
    fn congested(
        f: &Fair,
        m: &FlowMeter,
        windows: std::ops::Range<u64>,
        per_window: u64,
        occupied: u64,
    ) {
        for w in windows {
            f.offer_at(w * 100, m, 1200, occupied);
            f.queued.fetch_add(per_window, Ordering::Relaxed);
        }
    }

    fn limits(f: &Fair) -> (u64, u64) {
        (f.limit(Bulk), f.limit(Heavy))
    }

    /// With a queue standing, a bulk flow's queue is what the path drained in 100 ms and a heavy
    /// one's in 20 ms: 125 KB and 64 KiB (the floor) on a 10 Mbit/s path, the floor for both on a
    /// 4 Mbit/s one, the buffer / half of it (the ceilings) on a fast one. Once no queue stands,
    /// only the buffer limits.
    #[test]
    fn bulk_and_heavy_queues_follow_what_the_path_carries() {
        let limits_at = |bytes_per_s: u64, occupied: u64| {
            let f = fair();
            congested(&f, &FlowMeter::default(), 0..5, bytes_per_s / 10, occupied);
            limits(&f)
        };
        assert_eq!(limits_at(1_250_000, 600_000), (125_000, QUEUE_MIN));
        assert_eq!(limits_at(500_000, 600_000), (QUEUE_MIN, QUEUE_MIN));
        assert_eq!(limits_at(10_000_000, 600_000), (1_000_000, 200_000));
        assert_eq!(limits_at(125_000_000, 600_000), (1 << 20, 1 << 19));
        assert_eq!(limits_at(1_250_000, 1_000), (1 << 20, 1 << 19));
        // A flow held at the 64 KiB floor leaves the buffer just under it at times: that is
        // still a standing queue (below half the floor is not).
        assert_eq!(limits_at(1_250_000, 60_000), (125_000, QUEUE_MIN));
        assert_eq!(limits_at(1_250_000, 30_000), (1 << 20, 1 << 19));
    }

    /// A sender that read the time just before another closed the window does not take the
    /// window back, nor measure the path over a millisecond (a rate 100 times too high).
    #[test]
    fn a_late_sender_does_not_reopen_a_closed_window() {
        let f = fair();
        let m = FlowMeter::default();
        congested(&f, &m, 0..4, 125_000, 600_000);
        let state = || (f.window.load(Ordering::Relaxed), limits(&f));
        assert_eq!(state(), (3, (125_000, QUEUE_MIN)));
        // Window 3 was closed at 300 ms; a sender still at 299 ms comes in late.
        f.offer_at(299, &m, 1200, 600_000);
        assert_eq!(state(), (3, (125_000, QUEUE_MIN)));
        // A close 20 ms after the last measurement (as after a late close) measures nothing: over
        // so short a time, nothing queued would read as a path that carries nothing.
        f.mark_ms.store(380, Ordering::Relaxed);
        f.offer_at(400, &m, 1200, 600_000);
        assert_eq!(state(), (4, (125_000, QUEUE_MIN)));
    }

    #[test]
    fn after_a_quiet_spell_no_share_holds() {
        let f = fair();
        let (bulk, query) = (FlowMeter::default(), FlowMeter::default());
        assert_eq!(
            run(&f, &[(&bulk, 10_000_000), (&query, 2_400)], 0..3),
            [Heavy, Small]
        );
        // Nothing for a second; then the bulk flow alone: large, not heavy.
        assert_eq!(run(&f, &[(&bulk, 10_000_000)], 13..14), [Bulk]);
    }
}

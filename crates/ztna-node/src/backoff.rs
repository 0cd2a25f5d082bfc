//! Reconnect schedule.
//!
//! * After an unexplained failure: exponential backoff (`backon`, initial 200 ms, doubling),
//!   capped so a peer that comes back is used within seconds (cap 3 s; with the 3 s handshake
//!   timeout a returned peer is reached within about 5 s), with "equal jitter" applied *after*
//!   the cap (each delay is 50–100 % of the capped value), so a fleet that lost the same relay
//!   does not come back in lockstep.
//! * After a drain (GoAway, or a close with the DRAINING code) the peer told us a restart is
//!   planned: poll every 0.5–1 s (jittered) until it is back, for up to `planned_window`. An
//!   attempt then starts every poll interval: one the peer does not answer ends when the next
//!   is due ([`Reconnect::attempt_limit`]), so a peer that returns hears from us within a
//!   second, not within a 3 s handshake timeout plus the poll.
//! * A connection that stayed up for `healthy_after` resets the schedule.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// A connection that lived at least this long resets the backoff.
    pub healthy_after: Duration,
    /// Poll interval while a peer restarts after a drain (jittered down to half of it).
    pub planned_poll: Duration,
    /// How long after a drain to keep polling at `planned_poll` before falling back to the
    /// exponential schedule (a relay that was drained and never came back).
    pub planned_window: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(3),
            healthy_after: Duration::from_secs(10),
            planned_poll: Duration::from_secs(1),
            planned_window: Duration::from_secs(300),
        }
    }
}

/// Handshake timeout for (re)connection attempts: long enough for a slow path's handshake, short
/// enough that a returned peer is not missed for long by an attempt whose Initials went nowhere.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Handshake timeout once the peer has answered the attempt (a QUIC Retry or any handshake
/// packet, see [`crate::answered`]): it is alive and busy, most likely with a reconnect storm,
/// and starting over would only add to its load. A silent peer still gets [`CONNECT_TIMEOUT`],
/// and a peer that falls silent after answering ends the attempt at the QUIC idle timeout.
pub const ANSWERED_CONNECT_TIMEOUT: Duration = Duration::from_secs(12);

/// How long a client waits for `Welcome` once the intermediate has confirmed the handshake
/// (`HANDSHAKE_DONE`, see [`crate::client::hello`]; before that, [`CONNECT_TIMEOUT`]). It has
/// completed its side and will read our `Hello`; in a reconnect storm its first Welcomes take
/// seconds, and giving up would throw away the handshake it just paid for and queue another. A
/// relay that dies meanwhile still ends the wait at the QUIC idle timeout; only one whose control
/// plane hangs while QUIC answers costs this long. The intermediate waits as long for `Hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Reconnect {
    policy: BackoffPolicy,
    iter: ExponentialBackoff,
    /// Set by [`Reconnect::planned`]: until when to poll at the planned interval.
    planned_until: Option<Instant>,
    /// While polling: when the attempt under way started, and the interval drawn for it (its
    /// limit).
    poll: Option<(Instant, Duration)>,
    /// While polling: the shortest attempt, two round trips of the connection that drained (a
    /// relay's first answer must be able to arrive within an attempt on a long path).
    poll_floor: Duration,
}

impl Reconnect {
    pub fn new(policy: BackoffPolicy) -> Reconnect {
        Reconnect {
            policy,
            iter: Self::build(&policy),
            planned_until: None,
            poll: None,
            poll_floor: Duration::ZERO,
        }
    }

    fn build(p: &BackoffPolicy) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(p.initial)
            .with_max_delay(p.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// Starts the schedule over (a connection succeeded and stayed up).
    pub fn reset(&mut self) {
        self.iter = Self::build(&self.policy);
        self.planned_until = None;
        self.poll = None;
    }

    /// The peer drained on purpose: it is restarting, so poll it at the planned interval until it
    /// is back (delays grown by earlier failures do not carry over). `rtt`: the round-trip time
    /// of the connection that drained; an attempt lasts at least two of them.
    pub fn planned(&mut self, rtt: Duration) {
        self.iter = Self::build(&self.policy);
        self.planned_until = Some(Instant::now() + self.policy.planned_window);
        self.poll_floor = rtt.saturating_mul(2);
    }

    /// True while polling a peer that drained.
    pub fn is_planned(&self) -> bool {
        self.planned_until.is_some_and(|t| Instant::now() < t)
    }

    /// How long the next attempt may wait for the peer's first answer: [`CONNECT_TIMEOUT`], or
    /// while polling a peer that drained, one poll interval (jittered), so that the attempts
    /// start a poll interval apart. Either way an attempt the peer answered is given longer
    /// ([`crate::client::connect_any`]): a busy peer is not abandoned.
    pub fn attempt_limit(&mut self) -> Duration {
        if self.is_planned() {
            let p = jitter(self.policy.planned_poll).max(self.poll_floor);
            self.poll = Some((Instant::now(), p));
            p
        } else {
            self.poll = None;
            CONNECT_TIMEOUT
        }
    }

    /// Delay before the next attempt, given when the last connection was established (if it was).
    /// While polling, a failed attempt from [`Reconnect::attempt_limit`] is followed by the next
    /// one a poll interval after it started (at once after one that used its whole interval; an
    /// attempt refused at once still waits the interval).
    pub fn next_delay(&mut self, connected_since: Option<Instant>) -> Duration {
        match self.poll.take() {
            Some((started, p)) if connected_since.is_none() && self.is_planned() => {
                return p.saturating_sub(started.elapsed());
            }
            _ => {}
        }
        if connected_since.is_some_and(|t| t.elapsed() >= self.policy.healthy_after) {
            self.iter = Self::build(&self.policy);
        }
        let base = if self.is_planned() {
            self.policy.planned_poll
        } else {
            self.iter
                .next()
                .unwrap_or(self.policy.max)
                .min(self.policy.max)
        };
        jitter(base)
    }
}

/// 50–100 % of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets_only_when_healthy() {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            healthy_after: Duration::from_millis(0),
            ..Default::default()
        };
        let mut r = Reconnect::new(BackoffPolicy {
            healthy_after: Duration::from_secs(3600),
            ..policy
        });
        let delays: Vec<Duration> = (0..8).map(|_| r.next_delay(Some(Instant::now()))).collect();
        assert!(
            delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200),
            "{delays:?}"
        );
        // 200, 400, 800, 1600 ms, then the cap; each jittered to 50-100 %.
        assert!(delays[4] >= Duration::from_millis(1000), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        // A short-lived connection does not reset; a healthy one does.
        let mut r = Reconnect::new(policy);
        for _ in 0..5 {
            r.next_delay(None);
        }
        assert!(r.next_delay(None) >= Duration::from_millis(1000));
        assert!(r.next_delay(Some(Instant::now())) <= Duration::from_millis(200));
    }

    #[test]
    fn after_a_drain_polls_every_second_with_jitter() {
        let mut r = Reconnect::new(BackoffPolicy::default());
        for _ in 0..10 {
            r.next_delay(None);
        }
        r.planned(Duration::from_millis(1));
        assert!(r.is_planned());
        let delays: Vec<Duration> = (0..50).map(|_| r.next_delay(None)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1)),
            "{delays:?}"
        );
        // Jittered: not all the same.
        assert!(delays.iter().any(|d| *d != delays[0]), "{delays:?}");
        r.reset();
        assert!(!r.is_planned());
    }

    #[test]
    fn while_polling_attempts_start_a_poll_interval_apart() {
        let mut r = Reconnect::new(BackoffPolicy::default());
        // Not polling: the full handshake timeout.
        assert_eq!(r.attempt_limit(), CONNECT_TIMEOUT);
        r.planned(Duration::from_millis(1));
        for _ in 0..50 {
            // One refused at once: the next one a poll interval after it started.
            let limit = r.attempt_limit();
            assert!(
                limit >= Duration::from_millis(500) && limit <= Duration::from_secs(1),
                "{limit:?}"
            );
            let d = r.next_delay(None);
            assert!(
                d <= limit && d + Duration::from_millis(50) >= limit,
                "{d:?} {limit:?}"
            );
        }
        // An attempt that used its whole interval: the next one starts at once.
        let limit = r.attempt_limit();
        std::thread::sleep(limit);
        assert_eq!(r.next_delay(None), Duration::ZERO);
        // A connection that was up and ended: the planned poll, as before.
        r.attempt_limit();
        let d = r.next_delay(Some(Instant::now()));
        assert!(d >= Duration::from_millis(500), "{d:?}");
        r.reset();
        assert_eq!(r.attempt_limit(), CONNECT_TIMEOUT);
        // After a drain on a 900 ms path, each attempt has time for the relay's first answer.
        r.planned(Duration::from_millis(900));
        assert!((0..20).all(|_| r.attempt_limit() >= Duration::from_millis(1800)));
    }

    #[test]
    fn the_default_cap_keeps_a_returned_peer_within_five_seconds() {
        let p = BackoffPolicy::default();
        let mut r = Reconnect::new(p);
        let worst = (0..100)
            .map(|_| r.next_delay(None))
            .max()
            .unwrap_or_default();
        assert!(
            worst + CONNECT_TIMEOUT <= Duration::from_secs(6),
            "{worst:?}"
        );
        assert!(worst <= p.max);
    }
}

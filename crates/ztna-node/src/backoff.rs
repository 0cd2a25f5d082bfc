//! Reconnect backoff: exponential with jitter (`backon`), initial ~200 ms, capped at 30 s, reset
//! only after a connection has stayed healthy for a while.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// A connection that lived at least this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(10),
        }
    }
}

pub struct Reconnect {
    policy: BackoffPolicy,
    iter: ExponentialBackoff,
}

impl Reconnect {
    pub fn new(policy: BackoffPolicy) -> Reconnect {
        Reconnect {
            policy,
            iter: Self::build(&policy),
        }
    }

    fn build(p: &BackoffPolicy) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(p.initial)
            .with_max_delay(p.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Starts the schedule over. For a peer that went away on purpose (a drain with GoAway): that
    /// says nothing about whether it is reachable, and it is usually back within seconds, so the
    /// delays that grow while it restarts must not carry over from earlier failures.
    pub fn reset(&mut self) {
        self.iter = Self::build(&self.policy);
    }

    /// Delay before the next attempt, given when the last connection was established (if it was).
    pub fn next_delay(&mut self, connected_since: Option<Instant>) -> Duration {
        if connected_since.is_some_and(|t| t.elapsed() >= self.policy.healthy_after) {
            self.iter = Self::build(&self.policy);
        }
        // backon's jitter adds up to one more delay on top; the cap is a promise to operators
        // ("reconnects within 30 s of the peer being back"), so it holds with jitter too.
        self.iter
            .next()
            .unwrap_or(self.policy.max)
            .min(self.policy.max)
    }
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
        };
        let mut r = Reconnect::new(BackoffPolicy {
            healthy_after: Duration::from_secs(3600),
            ..policy
        });
        let delays: Vec<Duration> = (0..8).map(|_| r.next_delay(Some(Instant::now()))).collect();
        // Jitter adds up to one extra delay; the trend still grows, and the cap holds.
        assert!(
            delays[0] >= Duration::from_millis(200) && delays[0] <= Duration::from_millis(400),
            "{delays:?}"
        );
        assert!(delays[4] >= Duration::from_millis(1600), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        // A short-lived connection does not reset; a healthy one does.
        let mut r = Reconnect::new(policy);
        for _ in 0..5 {
            r.next_delay(None);
        }
        assert!(r.next_delay(None) >= Duration::from_millis(1600));
        assert!(r.next_delay(Some(Instant::now())) <= Duration::from_millis(400));
        // A drain starts the schedule over, however short the connection was.
        for _ in 0..5 {
            r.next_delay(None);
        }
        r.reset();
        assert!(r.next_delay(None) <= Duration::from_millis(400));
    }
}

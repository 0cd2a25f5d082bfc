//! Rate-limited logging: a line that a peer can trigger at will (a refused flow, a dropped
//! datagram) is logged at most once per period *per call site*; the rest are counted and the
//! count is reported with the next line from that site that gets through. Per site, so that a
//! frequent kind of event (say, datagrams dropped for congestion) cannot hide a rarer one (a
//! send the host's firewall refused) for the whole period.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// Lets one event through per period and counts the others.
#[derive(Debug)]
pub struct LogLimiter {
    period_ms: u64,
    /// When the last event was let through (ms since the process clock's epoch), plus one so 0
    /// means "never".
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const fn new(period: Duration) -> LogLimiter {
        LogLimiter {
            period_ms: period.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed since the
    /// last one that was; `None` when it must be dropped (it is counted).
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms() + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.period_ms;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Logs at `$level` at most once per `$every` (a constant `Duration`) from this call site,
/// appending how many lines this site skipped since its last one. Evaluates to whether it
/// logged. Use [`warn_limited!`] or [`info_limited!`].
#[doc(hidden)]
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $every:expr, $($arg:tt)+) => {{
        static SITE: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new($every);
        match SITE.allow() {
            Some(skipped) => {
                tracing::event!($level, skipped, $($arg)+);
                true
            }
            None => false,
        }
    }};
}

/// Logs at warn level at most once per `$every` (a constant `Duration`) from this call site,
/// appending how many lines this site skipped since its last one. Evaluates to whether it
/// logged.
#[macro_export]
macro_rules! warn_limited {
    ($every:expr, $($arg:tt)+) => {
        $crate::log_limited!(tracing::Level::WARN, $every, $($arg)+)
    };
}

/// Logs at info level at most once per `$every` from this call site (see [`warn_limited!`]).
#[macro_export]
macro_rules! info_limited {
    ($every:expr, $($arg:tt)+) => {
        $crate::log_limited!(tracing::Level::INFO, $every, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_period_and_counts_the_rest() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow(), Some(0));
        for _ in 0..99 {
            assert_eq!(l.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow(), Some(99));
        assert_eq!(l.allow(), None);
    }

    /// Each call site of the macros has its own state: a site that fires all the time does not
    /// silence another one.
    #[test]
    fn each_call_site_is_limited_on_its_own() {
        const EVERY: Duration = Duration::from_secs(60);
        fn frequent() -> bool {
            crate::warn_limited!(EVERY, "a frequent warning")
        }
        fn rare() -> bool {
            crate::info_limited!(EVERY, "a rare note")
        }
        assert!(frequent());
        for _ in 0..50 {
            assert!(!frequent());
        }
        assert!(rare(), "the frequent site silenced the rare one");
        assert!(!rare());
    }
}

/// A token bucket: `burst` events at once, then `per_second` on average.
#[derive(Debug)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl TokenBucket {
    pub fn new(burst: u32, per_second: f64) -> TokenBucket {
        TokenBucket {
            burst: f64::from(burst),
            per_second,
            state: std::sync::Mutex::new((f64::from(burst), std::time::Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&self) -> bool {
        let mut s = crate::lock(&self.state);
        let now = std::time::Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.per_second;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let b = TokenBucket::new(3, 10.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.take());
        assert!(!b.take());
    }
}

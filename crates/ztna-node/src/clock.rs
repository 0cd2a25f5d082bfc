//! A cheap monotonic millisecond clock and activity markers, for idle decisions on hot paths
//! (one relaxed atomic store per packet, no system call).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the first call in this process (monotonic).
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// When something (a flow) last moved a byte. Cheap to clone and to touch.
#[derive(Clone, Debug)]
pub struct Activity(Arc<AtomicU64>);

impl Activity {
    /// A marker that was just touched.
    pub fn new() -> Activity {
        Activity(Arc::new(AtomicU64::new(now_ms())))
    }

    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// How long since the last touch.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }

    /// Completes once nothing has touched this for `limit` (an idle timeout). Sleeps until the
    /// earliest moment that could be, so a busy flow costs one wake-up per `limit`.
    pub async fn idle_out(&self, limit: Duration) {
        loop {
            let quiet = self.idle_for();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet + Duration::from_millis(5)).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_out_waits_for_quiet_not_for_the_first_deadline() {
        let a = Activity::new();
        let t0 = std::time::Instant::now();
        let toucher = {
            let a = a.clone();
            async move {
                // Touched at 60 ms: the 100 ms idle timeout is counted from then.
                tokio::time::sleep(Duration::from_millis(60)).await;
                a.touch();
            }
        };
        tokio::join!(toucher, a.idle_out(Duration::from_millis(100)));
        assert!(
            t0.elapsed() >= Duration::from_millis(160),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn idle_grows_and_touch_resets() {
        let a = Activity::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for() >= Duration::from_millis(25));
        a.touch();
        assert!(a.idle_for() < Duration::from_millis(25));
    }
}

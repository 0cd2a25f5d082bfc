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
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_grows_and_touch_resets() {
        let a = Activity::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for() >= Duration::from_millis(25));
        a.touch();
        assert!(a.idle_for() < Duration::from_millis(25));
    }
}

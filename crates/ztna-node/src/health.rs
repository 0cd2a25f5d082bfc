//! Health of a daemon: liveness (for `/healthz` and the systemd watchdog), readiness (for
//! `/readyz`), and a one-line status for operators (systemd `STATUS=`).
//!
//! Liveness means the runtime is scheduling tasks *and* every registered main loop made progress
//! recently. Main loops hold a [`Beat`] and call [`Beat::beat`] from a periodic branch of their
//! `select!`; a loop stuck on something that never returns stops beating, the probe fails, and
//! the watchdog is no longer petted, so systemd restarts the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often main loops beat.
pub const BEAT_INTERVAL: Duration = Duration::from_millis(500);

struct Inner {
    epoch: Instant,
    stall_after: Duration,
    ready: watch::Sender<bool>,
    status: watch::Sender<String>,
    stopping: watch::Sender<bool>,
    runtime: Arc<AtomicU64>,
    loops: Mutex<Vec<(String, Weak<AtomicU64>)>>,
}

/// Shared health state of one daemon. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

/// A main loop's progress marker; dropping it unregisters the loop.
pub struct Beat {
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl Beat {
    pub fn beat(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Health {
    /// `stall_after`: a loop that has not beaten for this long fails the liveness probe.
    pub fn new(stall_after: Duration) -> Health {
        Health {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                stall_after,
                ready: watch::Sender::new(false),
                status: watch::Sender::new("starting".to_string()),
                stopping: watch::Sender::new(false),
                runtime: Arc::new(AtomicU64::new(0)),
                loops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Time since this daemon's health was created (its start).
    pub fn uptime(&self) -> Duration {
        self.inner.epoch.elapsed()
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Registers a main loop; it must call [`Beat::beat`] at least every `stall_after`.
    pub fn register(&self, name: &str) -> Beat {
        let last = Arc::new(AtomicU64::new(self.now_ms()));
        let mut loops = crate::lock(&self.inner.loops);
        loops.retain(|(_, w)| w.strong_count() > 0);
        loops.push((name.to_string(), Arc::downgrade(&last)));
        Beat {
            epoch: self.inner.epoch,
            last,
        }
    }

    /// Runs `fut` as a watched main loop: a beat branch in the *same* task proves the task keeps
    /// being polled. A task blocked in a synchronous call or spinning without yielding stops
    /// beating and fails the liveness probe.
    pub async fn watched<F: std::future::Future>(&self, name: &str, fut: F) -> F::Output {
        let beat = self.register(name);
        let mut tick = tokio::time::interval(BEAT_INTERVAL);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tick.tick() => beat.beat(),
            }
        }
    }

    /// Starts the runtime heartbeat: a task that proves the runtime schedules work.
    pub fn spawn_heartbeat(&self) {
        let runtime = self.inner.runtime.clone();
        let epoch = self.inner.epoch;
        runtime.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                runtime.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        });
    }

    /// The liveness probe: `Err` names what is stalled.
    pub fn live(&self) -> Result<(), String> {
        let now = self.now_ms();
        let limit = self.inner.stall_after.as_millis() as u64;
        let rt = now.saturating_sub(self.inner.runtime.load(Ordering::Relaxed));
        if rt > limit {
            return Err(format!("runtime not scheduling for {rt} ms"));
        }
        for (name, w) in crate::lock(&self.inner.loops).iter() {
            if let Some(last) = w.upgrade() {
                let quiet = now.saturating_sub(last.load(Ordering::Relaxed));
                if quiet > limit {
                    return Err(format!("{name} made no progress for {quiet} ms"));
                }
            }
        }
        Ok(())
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner
            .ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }

    /// Sets the operator-facing status line (sent to systemd only when it changes).
    pub fn set_status(&self, status: impl Into<String>) {
        let status = status.into();
        self.inner.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    pub fn status(&self) -> String {
        self.inner.status.borrow().clone()
    }

    /// Marks the start of a drain: not ready, and `STOPPING=1` to systemd right away (not via the
    /// notify task, which may already be shutting down when a drain is short).
    pub fn set_stopping(&self) {
        self.set_ready(false);
        if !self.inner.stopping.send_replace(true) && std::env::var_os("NOTIFY_SOCKET").is_some() {
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// Talks to systemd until `stop`: `READY=1` at once, `STATUS=` on every change (`STOPPING=1` is sent
    /// by [`Health::set_stopping`]), and `WATCHDOG=1` every half `WATCHDOG_USEC` while the liveness probe
    /// passes. Returns immediately, doing nothing, without `NOTIFY_SOCKET`.
    pub async fn notify_systemd(self, stop: tokio_util::sync::CancellationToken) {
        use sd_notify::NotifyState;
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let send = |states: &[NotifyState]| {
            if let Err(e) = sd_notify::notify(states) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        };
        let mut status = self.inner.status.subscribe();
        let first = status.borrow_and_update().clone();
        send(&[NotifyState::Ready, NotifyState::Status(&first)]);
        let period = sd_notify::watchdog_enabled().map(|usec| usec / 2);
        let mut watchdog = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = status.changed() => {
                    if r.is_err() { return; }
                    let s = status.borrow_and_update().clone();
                    send(&[NotifyState::Status(&s)]);
                }
                _ = watchdog.tick(), if period.is_some() => match self.live() {
                    Ok(()) => {
                        if failing {
                            tracing::info!("liveness probe passes again, petting the watchdog");
                            failing = false;
                        }
                        send(&[NotifyState::Watchdog]);
                    }
                    Err(why) => {
                        if !failing {
                            tracing::error!(%why, "liveness probe failing: not petting the systemd watchdog");
                            failing = true;
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn liveness_fails_when_a_loop_stalls_and_recovers() {
        let h = Health::new(Duration::from_millis(300));
        h.spawn_heartbeat();
        let beat = h.register("accept loop");
        assert!(h.live().is_ok());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let err = h.live().unwrap_err();
        assert!(err.contains("accept loop"), "{err}");
        beat.beat();
        assert!(h.live().is_ok());
        // A watched task that blocks its thread stops beating.
        let h2 = h.clone();
        let blocked = tokio::spawn(async move {
            h2.watched("blocking task", async {
                std::thread::sleep(Duration::from_millis(600));
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(450)).await;
        beat.beat();
        let err = h.live().unwrap_err();
        assert!(err.contains("blocking task"), "{err}");
        blocked.await.unwrap();
        // A loop that ended (its Beat dropped) no longer counts.
        drop(beat);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(h.live().is_ok());
    }

    #[test]
    fn ready_status_stopping() {
        let h = Health::new(Duration::from_secs(1));
        assert!(!h.is_ready());
        h.set_ready(true);
        assert!(h.is_ready());
        h.set_status("registered web on 1/2 intermediates");
        assert_eq!(h.status(), "registered web on 1/2 intermediates");
        h.set_stopping();
        assert!(!h.is_ready() && h.is_stopping());
    }
}

//! Flow lifecycle in one place.
//!
//! Every flow task of a daemon is spawned on one [`TaskTracker`] and holds a [`FlowGuard`]
//! while it lives, which puts an [`Entry`] (what the flow is, its cancellation token and its
//! activity clock) in one table. From that table a daemon answers every control question about
//! its flows (how many an identity has, which ones a new policy forbids, which UDP flows are
//! idle) without reading a metric, and a drain is: cancel what may go, then wait for the tracker.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Activity;

/// What a flow is carrying, as far as lifecycle decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Header read or open in progress: about to carry data, so a drain waits for it.
    Opening,
    Tcp,
    /// Connectionless: a drain does not wait for a UDP flow that has been idle for a grace
    /// period (the client can send its next datagram anywhere).
    Udp,
}

/// The application error code a cancelled flow resets its streams with (why it was ended:
/// draining, revoked, shutdown), set by whoever cancels it.
#[derive(Clone, Debug)]
pub struct CancelCode(Arc<AtomicU32>);

impl CancelCode {
    pub fn new(code: u32) -> CancelCode {
        CancelCode(Arc::new(AtomicU32::new(code)))
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, code: u32) {
        self.0.store(code, Ordering::Relaxed);
    }
}

impl Default for CancelCode {
    fn default() -> Self {
        CancelCode::new(ztna_proto::codes::FLOW_ABORTED)
    }
}

/// One live flow.
#[derive(Clone)]
pub struct Entry<M> {
    pub meta: M,
    pub kind: Kind,
    pub cancel: CancellationToken,
    pub code: CancelCode,
    pub activity: Activity,
}

impl<M> Entry<M> {
    fn cancel_with(&self, code: u32) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        self.code.set(code);
        self.cancel.cancel();
        true
    }
}

struct Inner<M> {
    tracker: TaskTracker,
    table: Mutex<HashMap<u64, Entry<M>>>,
    next_id: AtomicU64,
    /// Cancelled by [`Flows::cancel_all`]; every flow's token is a child of it.
    all: CancellationToken,
}

/// The flow table of one daemon. Cheap to clone.
pub struct Flows<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for Flows<M> {
    fn clone(&self) -> Self {
        Flows {
            inner: self.inner.clone(),
        }
    }
}

/// Keeps a flow in the table while it lives; dropping it removes the flow (and decrements its
/// gauge, if it has one).
pub struct FlowGuard<M> {
    id: u64,
    inner: Weak<Inner<M>>,
    pub cancel: CancellationToken,
    /// Why it was cancelled (valid once `cancel` fired).
    pub code: CancelCode,
    pub activity: Activity,
    gauge: Option<IntGauge>,
}

impl<M> FlowGuard<M> {
    /// Changes what the flow carries (an opening flow becomes TCP or UDP).
    pub fn set_kind(&self, kind: Kind) {
        if let Some(inner) = self.inner.upgrade() {
            if let Some(e) = crate::lock(&inner.table).get_mut(&self.id) {
                e.kind = kind;
            }
        }
    }

    /// Counts the flow in `gauge` from now until the guard drops.
    pub fn count_in(&mut self, gauge: IntGauge) {
        gauge.inc();
        if let Some(old) = self.gauge.replace(gauge) {
            old.dec();
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl<M> Drop for FlowGuard<M> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            crate::lock(&inner.table).remove(&self.id);
        }
        if let Some(g) = &self.gauge {
            g.dec();
        }
    }
}

impl<M: Clone + Send + 'static> Default for Flows<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Clone + Send + 'static> Flows<M> {
    pub fn new() -> Flows<M> {
        Flows {
            inner: Arc::new(Inner {
                tracker: TaskTracker::new(),
                table: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                all: CancellationToken::new(),
            }),
        }
    }

    /// Spawns a flow task on the tracker (a drain waits for it).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tracker.spawn(fut)
    }

    fn entry(&self, meta: M, kind: Kind) -> (Entry<M>, FlowGuard<M>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.inner.all.child_token();
        let code = CancelCode::default();
        let activity = Activity::new();
        let entry = Entry {
            meta,
            kind,
            cancel: cancel.clone(),
            code: code.clone(),
            activity: activity.clone(),
        };
        let guard = FlowGuard {
            id,
            inner: Arc::downgrade(&self.inner),
            cancel,
            code,
            activity,
            gauge: None,
        };
        (entry, guard)
    }

    /// Puts a flow in the table until the returned guard is dropped.
    pub fn register(&self, meta: M, kind: Kind) -> FlowGuard<M> {
        let (entry, guard) = self.entry(meta, kind);
        crate::lock(&self.inner.table).insert(guard.id, entry);
        guard
    }

    /// Registers a flow only if `admit(table)` agrees, atomically with the check (so limits
    /// cannot be overrun by flows opening at the same moment). `admit` returns the refusal.
    pub fn register_if<E>(
        &self,
        meta: M,
        kind: Kind,
        admit: impl FnOnce(&mut dyn Iterator<Item = &Entry<M>>) -> Result<(), E>,
    ) -> Result<FlowGuard<M>, E> {
        let mut table = crate::lock(&self.inner.table);
        admit(&mut table.values())?;
        let (entry, guard) = self.entry(meta, kind);
        table.insert(guard.id, entry);
        Ok(guard)
    }

    pub fn len(&self) -> usize {
        crate::lock(&self.inner.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows matching `f`.
    pub fn count(&self, f: impl Fn(&Entry<M>) -> bool) -> usize {
        crate::lock(&self.inner.table)
            .values()
            .filter(|e| f(e))
            .count()
    }

    /// Cancels every flow matching `f` with `code`; returns how many.
    pub fn cancel_where(&self, code: u32, f: impl Fn(&Entry<M>) -> bool) -> usize {
        let table = crate::lock(&self.inner.table);
        table
            .values()
            .filter(|e| f(e))
            .filter(|e| e.cancel_with(code))
            .count()
    }

    /// Cancels every flow with `code`, now and any registered later.
    pub fn cancel_all(&self, code: u32) {
        for e in crate::lock(&self.inner.table).values() {
            e.code.set(code);
        }
        self.inner.all.cancel();
    }

    /// Lets flows finish until `deadline`: UDP flows idle for `udp_grace` are ended at once (and
    /// later ones as they fall idle), TCP flows and opens in progress are waited for. New flow
    /// tasks may still be spawned meanwhile (a flow that raced the drain). Returns the number of
    /// flows still running at the deadline (which are then cancelled).
    ///
    /// Flows ended by the drain are cancelled with `code` (e.g. DRAINING).
    pub async fn drain(
        &self,
        deadline: tokio::time::Instant,
        udp_grace: Duration,
        code: u32,
    ) -> usize {
        let tick = (udp_grace / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        loop {
            self.cancel_where(code, |e| {
                e.kind == Kind::Udp && e.activity.idle_for() >= udp_grace
            });
            if self.is_empty() && self.inner.tracker.is_empty() {
                return 0;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let left = self.len().max(self.inner.tracker.len());
                self.cancel_where(code, |_| true);
                // Cancelled flows reset their streams and close their sockets; give them a
                // moment so peers are told why.
                self.inner.tracker.close();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), self.inner.tracker.wait()).await;
                self.inner.tracker.reopen();
                return left;
            }
            let until = deadline.min(now + tick);
            self.inner.tracker.close();
            let _ = tokio::time::timeout_at(until, self.inner.tracker.wait()).await;
            self.inner.tracker.reopen();
        }
    }

    /// Cancels everything with `code` and waits up to `limit` for the flow tasks to end.
    pub async fn close(&self, code: u32, limit: Duration) {
        self.cancel_all(code);
        self.inner.tracker.close();
        let _ = tokio::time::timeout(limit, self.inner.tracker.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tcp_but_not_for_idle_udp() {
        let flows: Flows<&'static str> = Flows::new();
        let udp = flows.register("dns", Kind::Udp);
        let tcp = flows.register("ssh", Kind::Tcp);
        let udp_cancel = udp.cancel.clone();
        flows.spawn(async move {
            udp_cancel.cancelled().await;
            drop(udp);
        });
        let tcp_cancel = tcp.cancel.clone();
        flows.spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(tcp);
        });
        let started = tokio::time::Instant::now();
        let left = flows
            .drain(
                started + Duration::from_secs(5),
                Duration::from_millis(100),
                3,
            )
            .await;
        assert_eq!(left, 0);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(!tcp_cancel.is_cancelled(), "a running TCP flow was cut");
    }

    #[tokio::test]
    async fn deadline_cancels_what_is_left_and_limits_are_atomic() {
        let flows: Flows<u32> = Flows::new();
        let g = flows.register(7, Kind::Tcp);
        let c = g.cancel.clone();
        let code = g.code.clone();
        flows.spawn(async move {
            c.cancelled().await;
            drop(g);
        });
        let left = flows
            .drain(
                tokio::time::Instant::now() + Duration::from_millis(100),
                Duration::from_secs(1),
                3,
            )
            .await;
        assert_eq!(code.get(), 3, "cancelled flows are told why");
        assert_eq!(left, 1);
        assert!(flows.is_empty());
        let admit = |it: &mut dyn Iterator<Item = &Entry<u32>>| {
            if it.filter(|e| e.meta == 1).count() >= 2 {
                Err("limit")
            } else {
                Ok(())
            }
        };
        let a = flows.register_if(1, Kind::Tcp, admit).unwrap();
        let _b = flows.register_if(1, Kind::Tcp, admit).unwrap();
        assert!(flows.register_if(1, Kind::Tcp, admit).is_err());
        drop(a);
        let _c = flows
            .register_if(1, Kind::Tcp, admit)
            .expect("a slot freed");
        assert_eq!(flows.cancel_where(10, |e| e.meta == 1), 2);
    }
}

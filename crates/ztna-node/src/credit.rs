//! Flow credit per agent on the connection an intermediate and a connector share.
//!
//! Every relayed flow to a connector is a stream on one QUIC connection, and QUIC's connection
//! flow-control window is shared by all of them. A flow whose receiver stops consuming (a backend
//! that never reads, an agent that never reads its download) keeps up to one stream window of
//! that shared window; four such flows fill the default 64 MiB and every other flow on the
//! connection, whoever it belongs to, stops. Per-stream windows cannot be made small without
//! capping one flow's throughput over a long path, so the bound is placed per agent instead:
//!
//! * the receiver counts the payload bytes it reads from each flow stream ([`FlowMeter`]) and
//!   reports the totals on the control stream a few milliseconds later ([`Meter::next_report`]);
//! * the sender keeps, per agent identity, the bytes written and not yet reported consumed at or
//!   below a budget ([`SendBudget`]; each flow writes through its [`Gate`]). A flow that would
//!   exceed it waits, and so only that agent's flows stop; the rest of the window stays free.
//!
//! Peers that predate protocol revision 2 send no reports; flows to them are not budgeted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::{Notify, Semaphore};

/// Default budget of one agent's unconsumed bytes towards one peer: two stream windows, so the
/// budget never binds a single flow before its stream window does (a report takes a round trip
/// to come back, like a window update), and half of the default connector connection window.
/// `ztna-bench --mode wan` at 50/100 ms per hop: with one stream window (16 MiB) one flow
/// reached 0.73-0.88 of the build without flow credit, with two 1.0-1.1.
pub const DEFAULT_IDENTITY_WINDOW: u64 = 32 << 20;
/// Smallest budget accepted.
pub const MIN_IDENTITY_WINDOW: u64 = 64 << 10;
/// Largest budget accepted (a semaphore counts at most `u32::MAX` permits at once).
pub const MAX_IDENTITY_WINDOW: u64 = 1 << 30;
/// How long a report waits for more reads to gather after the first unreported one.
pub const REPORT_DELAY: Duration = Duration::from_millis(2);

/// The sending side's accounts: per agent identity, what its flows may still write.
pub struct SendBudget {
    window: u64,
    waits: Option<IntCounter>,
    inner: Mutex<Accounts>,
}

#[derive(Default)]
struct Accounts {
    /// Free bytes per identity (permits = window - in flight).
    groups: HashMap<Arc<str>, Arc<Semaphore>>,
    /// Open flows by stream id.
    flows: HashMap<u64, Arc<Account>>,
}

struct Account {
    free: Arc<Semaphore>,
    /// Bytes this flow took from its identity's budget.
    written: AtomicU64,
    /// Bytes already given back on reports (changed only under the accounts' lock).
    credited: AtomicU64,
}

impl SendBudget {
    /// `window` is clamped to [`MIN_IDENTITY_WINDOW`]..=[`MAX_IDENTITY_WINDOW`]; `waits` counts
    /// writes that had to wait for their identity's budget.
    pub fn new(window: u64, waits: Option<IntCounter>) -> Arc<SendBudget> {
        Arc::new(SendBudget {
            window: window.clamp(MIN_IDENTITY_WINDOW, MAX_IDENTITY_WINDOW),
            waits,
            inner: Mutex::new(Accounts::default()),
        })
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// The gate a new flow (stream `stream`, for agent `identity`) writes through.
    pub fn open(self: &Arc<Self>, stream: u64, identity: &Arc<str>) -> Gate {
        let mut a = crate::lock(&self.inner);
        let free = a
            .groups
            .entry(identity.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.window as usize)))
            .clone();
        let account = Arc::new(Account {
            free,
            written: AtomicU64::new(0),
            credited: AtomicU64::new(0),
        });
        a.flows.insert(stream, account.clone());
        Gate {
            budget: self.clone(),
            stream,
            identity: identity.clone(),
            account,
        }
    }

    /// A report from the receiver: stream `stream` has had `consumed` payload bytes read in
    /// total. Unknown (already ended) streams are ignored; totals never credit more than was
    /// written, so a lying peer can only slow its own agents' flows.
    pub fn credit(&self, stream: u64, consumed: u64) {
        let a = crate::lock(&self.inner);
        let Some(acc) = a.flows.get(&stream) else {
            return;
        };
        let upto = consumed.min(acc.written.load(Ordering::SeqCst));
        let done = acc.credited.load(Ordering::SeqCst);
        if upto > done {
            acc.credited.store(upto, Ordering::SeqCst);
            acc.free.add_permits((upto - done) as usize);
        }
    }

    /// Bytes `identity` has in flight (written, not reported consumed).
    #[cfg(test)]
    fn in_flight(&self, identity: &str) -> u64 {
        let a = crate::lock(&self.inner);
        a.groups
            .get(identity)
            .map(|s| self.window.saturating_sub(s.available_permits() as u64))
            .unwrap_or(0)
    }

    /// Open flows with an account.
    #[cfg(test)]
    fn flows(&self) -> usize {
        crate::lock(&self.inner).flows.len()
    }
}

/// One flow's way to write against its agent's budget. Dropping it (the flow ended, its stream
/// is gone) gives back whatever was not reported consumed.
pub struct Gate {
    budget: Arc<SendBudget>,
    stream: u64,
    identity: Arc<str>,
    account: Arc<Account>,
}

impl Gate {
    /// Waits until `n` more bytes fit in the agent's budget, then counts them as in flight.
    /// A write larger than the whole budget takes all of it.
    pub async fn take(&self, n: u64) {
        let n = n.min(self.budget.window) as u32;
        if n == 0 {
            return;
        }
        let free = &self.account.free;
        let permit = match free.try_acquire_many(n) {
            Ok(p) => Ok(p),
            Err(_) => {
                if let Some(c) = &self.budget.waits {
                    c.inc();
                }
                free.acquire_many(n).await
            }
        };
        // The semaphore is never closed; if it were, the flow simply goes unbudgeted.
        if let Ok(p) = permit {
            p.forget();
            self.account.written.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let mut a = crate::lock(&self.budget.inner);
        if a.flows
            .get(&self.stream)
            .is_some_and(|acc| Arc::ptr_eq(acc, &self.account))
        {
            a.flows.remove(&self.stream);
        }
        let written = self.account.written.load(Ordering::SeqCst);
        let credited = self.account.credited.load(Ordering::SeqCst);
        if written > credited {
            self.account.credited.store(written, Ordering::SeqCst);
            self.account.free.add_permits((written - credited) as usize);
        }
        // The map's reference and this flow's: no other flow of the identity is left.
        if Arc::strong_count(&self.account.free) <= 2 {
            a.groups.remove(&self.identity);
        }
    }
}

/// The receiving side: which flows read bytes since the last report.
#[derive(Default)]
pub struct Meter {
    dirty: Mutex<Vec<(u64, Arc<Counter>)>>,
    changed: Notify,
}

#[derive(Default)]
struct Counter {
    read: AtomicU64,
    dirty: AtomicBool,
}

/// Counts the payload bytes read from one flow stream.
pub struct FlowMeter {
    meter: Arc<Meter>,
    stream: u64,
    counter: Arc<Counter>,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter::default())
    }

    /// The counter of flow stream `stream`.
    pub fn flow(self: &Arc<Self>, stream: u64) -> FlowMeter {
        FlowMeter {
            meter: self.clone(),
            stream,
            counter: Arc::new(Counter::default()),
        }
    }

    /// The flows that read bytes since the last report, with their totals; waits until there
    /// is at least one, then [`REPORT_DELAY`] longer to gather more. Cancel-safe: the flows
    /// stay listed until a call returns them.
    pub async fn next_report(&self) -> Vec<(u64, u64)> {
        loop {
            if crate::lock(&self.dirty).is_empty() {
                self.changed.notified().await;
                continue;
            }
            tokio::time::sleep(REPORT_DELAY).await;
            let ready = self.collect();
            if !ready.is_empty() {
                return ready;
            }
        }
    }

    fn collect(&self) -> Vec<(u64, u64)> {
        let ready = std::mem::take(&mut *crate::lock(&self.dirty));
        ready
            .into_iter()
            .map(|(stream, c)| {
                c.dirty.store(false, Ordering::SeqCst);
                (stream, c.read.load(Ordering::SeqCst))
            })
            .collect()
    }
}

impl FlowMeter {
    pub fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.counter.read.fetch_add(n, Ordering::SeqCst);
        if !self.counter.dirty.swap(true, Ordering::SeqCst) {
            crate::lock(&self.meter.dirty).push((self.stream, self.counter.clone()));
            self.meter.changed.notify_one();
        }
    }
}

/// A flow's credit hooks on one stream pair: the gate its writes pass, the meter its reads
/// count on. Both absent on connections without flow credit.
#[derive(Clone, Copy, Default)]
pub struct FlowCredit<'a> {
    pub send: Option<&'a Gate>,
    pub recv: Option<&'a FlowMeter>,
}

impl FlowCredit<'_> {
    pub(crate) async fn take(&self, n: u64) {
        if let Some(g) = self.send {
            g.take(n).await;
        }
    }

    pub(crate) fn read(&self, n: u64) {
        if let Some(m) = self.recv {
            m.add(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = MIN_IDENTITY_WINDOW;

    #[tokio::test]
    async fn one_identity_waits_at_its_budget_and_others_do_not() {
        let b = SendBudget::new(W, None);
        let mallory: Arc<str> = Arc::from("mallory");
        let alice: Arc<str> = Arc::from("alice");
        let m1 = b.open(1, &mallory);
        let m2 = b.open(5, &mallory);
        m1.take(W / 2).await;
        m2.take(W / 2).await;
        assert_eq!(b.in_flight("mallory"), W);
        // Mallory's third write waits; alice's goes through at once.
        let blocked = tokio::time::timeout(Duration::from_millis(50), m1.take(1)).await;
        assert!(blocked.is_err(), "a write past the budget must wait");
        let a = b.open(9, &alice);
        tokio::time::timeout(Duration::from_millis(50), a.take(W))
            .await
            .expect("another identity has its own budget");
        // A report frees room for mallory.
        b.credit(1, 1000);
        tokio::time::timeout(Duration::from_millis(50), m1.take(1000))
            .await
            .expect("consumed bytes are credited back");
    }

    #[tokio::test]
    async fn reports_never_credit_more_than_was_written_and_ended_flows_give_back() {
        let b = SendBudget::new(W, None);
        let id: Arc<str> = Arc::from("a");
        let g = b.open(1, &id);
        g.take(1000).await;
        b.credit(1, u64::MAX);
        assert_eq!(b.in_flight("a"), 0);
        g.take(W).await;
        b.credit(1, 500); // older total than already credited: nothing changes
        assert_eq!(b.in_flight("a"), W);
        b.credit(77, W); // unknown stream
        assert_eq!(b.in_flight("a"), W);
        drop(g);
        assert_eq!(b.in_flight("a"), 0);
        assert_eq!(b.flows(), 0);
        assert!(crate::lock(&b.inner).groups.is_empty());
    }

    #[tokio::test]
    async fn meter_reports_each_changed_flow_once_with_its_total() {
        let m = Meter::new();
        let f1 = m.flow(1);
        let f2 = m.flow(5);
        f1.add(10);
        f1.add(20);
        f2.add(7);
        let mut r = m.next_report().await;
        r.sort();
        assert_eq!(r, vec![(1, 30), (5, 7)]);
        f2.add(1);
        assert_eq!(m.next_report().await, vec![(5, 8)]);
        assert!(
            tokio::time::timeout(Duration::from_millis(30), m.next_report())
                .await
                .is_err(),
            "nothing new, nothing to report"
        );
    }
}

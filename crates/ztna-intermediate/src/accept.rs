//! Accepting connections: the QUIC handshake (mutual TLS with SPIFFE roles, checked by the
//! verifiers in `ztna_node::identity`), then a session per authenticated peer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info_span, Instrument};
use ztna_node::identity::{describe_connection_error, peer_chain, peer_id};
use ztna_node::CancellationToken;

use crate::session;
use crate::state::Shared;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refused handshakes are logged at most once a second (a flood must not flood the journal).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(1);

const SHED_LOG_EVERY: Duration = Duration::from_secs(5);

/// How long a proven address waits for a handshake slot at the cap before it is dropped. The
/// client heard our Retry and waits (`ztna_node::backoff::ANSWERED_CONNECT_TIMEOUT`), but its
/// QUIC idle timeout (5 s by default) runs from that Retry: the wait must leave room for it.
const QUEUE_WAIT: Duration = Duration::from_secs(3);

/// Handshakes in progress and proven addresses waiting for one of them; see [`admit`].
pub(crate) struct Pending {
    in_progress: AtomicUsize,
    queued: AtomicUsize,
    /// A slot was freed.
    freed: tokio::sync::Notify,
    /// Attempts in progress or queued, per source (see [`source_of`]); only sources with some.
    sources: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

impl Pending {
    pub fn new() -> Pending {
        Pending {
            in_progress: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            sources: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Attempts in progress or queued from `source`.
    fn of_source(&self, source: IpAddr) -> usize {
        ztna_node::lock(&self.sources)
            .get(&source)
            .copied()
            .unwrap_or(0)
    }

    pub fn get(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Takes a handshake slot if one of `max` is free.
    fn claim(&self, max: usize) -> bool {
        self.in_progress
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Counts one handshake in progress (globally and for its source) while it lives; its end lets
/// a queued one in.
struct InProgress {
    shared: Arc<Shared>,
    _source: Option<FromSource>,
}

impl InProgress {
    fn new(shared: &Arc<Shared>, source: Option<FromSource>) -> InProgress {
        InProgress {
            shared: shared.clone(),
            _source: source,
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let p = &self.shared.handshakes_pending;
        p.in_progress.fetch_sub(1, Ordering::AcqRel);
        p.freed.notify_one();
    }
}

/// Counts one attempt (in progress or queued) against its source while it lives.
struct FromSource(Arc<Shared>, IpAddr);

impl FromSource {
    fn new(shared: &Arc<Shared>, source: IpAddr) -> FromSource {
        *ztna_node::lock(&shared.handshakes_pending.sources)
            .entry(source)
            .or_default() += 1;
        FromSource(shared.clone(), source)
    }
}

impl Drop for FromSource {
    fn drop(&mut self) {
        let mut sources = ztna_node::lock(&self.0.handshakes_pending.sources);
        if let Some(n) = sources.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.1);
            }
        }
    }
}

/// What one source is, for [`Pending::of_source`]: an IPv4 address, or an IPv6 /64 (what one
/// host or site usually holds).
pub(crate) fn source_of(addr: std::net::SocketAddr) -> IpAddr {
    match addr.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Counts one proven address waiting for a slot while it lives.
struct Queued(Arc<Shared>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0
            .handshakes_pending
            .queued
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// What to do with a new connection attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Handshake,
    /// Ask the client to prove its address (QUIC Retry: one round trip, a stateless token)
    /// before any handshake state is kept: spoofed sources never answer.
    Retry,
    /// A proven address at the cap (or behind others already waiting): wait, first come first
    /// served, up to [`QUEUE_WAIT`] for a slot. It heard our Retry, so its client is waiting
    /// too; dropping it would waste that round trip and leave it to time out.
    Queue,
    /// A proven address with no room left to wait: drop it (the client retransmits, then tries
    /// another relay).
    Drop,
    /// A proven address whose source already has `max_handshakes_per_source` attempts in
    /// progress or queued: drop it (its client retransmits later).
    DropSource,
}

/// Proven addresses waiting for a slot, at most, per handshake slot (a waiting attempt holds only
/// its buffered Initial, and [`QUEUE_WAIT`] bounds its stay).
const QUEUE_PER_SLOT: usize = 4;

/// From `retry_above` handshakes in progress (and always at `max`), unproven addresses get a
/// Retry: it keeps no state, and spoofed sources never answer it. Proven addresses (they
/// answered one) go through up to `max`, then queue in arrival order, at most
/// [`QUEUE_PER_SLOT`] × `max` of them; beyond that they are dropped.
///
/// A proven source with `per_source_max` attempts already (`of_source`, which counts proven
/// attempts only) is dropped: one host cannot hold every slot. Unproven attempts are not counted
/// per source (a spoofer could otherwise use up a victim's share); at most `retry_above` of
/// them start a handshake at a time in all.
pub(crate) fn admit(
    pending: usize,
    queued: usize,
    validated: bool,
    retry_above: usize,
    max: usize,
    of_source: usize,
    per_source_max: usize,
) -> Admit {
    if validated && of_source >= per_source_max {
        return Admit::DropSource;
    }
    if validated {
        if pending < max && queued == 0 {
            Admit::Handshake
        } else if queued < max.saturating_mul(QUEUE_PER_SLOT) {
            Admit::Queue
        } else {
            Admit::Drop
        }
    } else if pending >= retry_above.min(max) {
        Admit::Retry
    } else {
        Admit::Handshake
    }
}

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) {
    let c = &shared.config;
    let (retry_above, max, per_source_max) = (
        c.handshake_retry_threshold as usize,
        c.max_handshakes as usize,
        c.max_handshakes_per_source as usize,
    );
    let shed = &shared.metrics.handshakes_shed;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let p = &shared.handshakes_pending;
                let pending = p.get();
                let source = source_of(incoming.remote_address());
                let validated = incoming.remote_address_validated();
                match admit(pending, p.queued(), validated, retry_above, max, p.of_source(source), per_source_max) {
                    Admit::Handshake => {
                        p.in_progress.fetch_add(1, Ordering::AcqRel);
                        let held = validated.then(|| FromSource::new(&shared, source));
                        let guard = InProgress::new(&shared, held);
                        tokio::spawn(handshake(shared.clone(), Box::new(incoming), guard));
                    }
                    Admit::Queue => {
                        shed.with_label_values(&["queued"]).inc();
                        p.queued.fetch_add(1, Ordering::AcqRel);
                        let waiting = Queued(shared.clone());
                        let held = FromSource::new(&shared, source);
                        tokio::spawn(wait_for_slot(shared.clone(), Box::new(incoming), waiting, held, max));
                    }
                    Admit::DropSource => {
                        shed.with_label_values(&["per_source"]).inc();
                        ztna_node::warn_limited!(SHED_LOG_EVERY, %source, per_source_max, "this source has max_handshakes_per_source connection attempts in progress: dropping its new ones");
                        incoming.ignore();
                    }
                    Admit::Retry => {
                        shed.with_label_values(&["retry"]).inc();
                        ztna_node::info_limited!(SHED_LOG_EVERY, pending, "many handshakes in progress: answering new ones with a QUIC Retry (address validation)");
                        if incoming.retry().is_err() {
                            shed.with_label_values(&["dropped"]).inc();
                        }
                    }
                    Admit::Drop => {
                        shed.with_label_values(&["dropped"]).inc();
                        ztna_node::warn_limited!(SHED_LOG_EVERY, pending, max, "handshake limit reached (max_handshakes) and its queue is full: dropping new connection attempts");
                        incoming.ignore();
                    }
                }
            }
        }
    }
}

/// A queued attempt: takes the first free slot (the longest waiter is woken first), or is
/// dropped after [`QUEUE_WAIT`].
async fn wait_for_slot(
    shared: Arc<Shared>,
    incoming: Box<quinn::Incoming>,
    waiting: Queued,
    held: FromSource,
    max: usize,
) {
    let deadline = tokio::time::Instant::now() + QUEUE_WAIT;
    let p = &shared.handshakes_pending;
    loop {
        if shared.is_draining() {
            // Refused like every attempt that arrives during a drain (it retries elsewhere).
            incoming.refuse();
            return;
        }
        let freed = p.freed.notified();
        if p.claim(max) {
            drop(waiting);
            // Several slots may have freed under one stored wake-up: pass it on.
            if p.get() < max && p.queued() > 0 {
                p.freed.notify_one();
            }
            let guard = InProgress::new(&shared, Some(held));
            handshake(shared.clone(), incoming, guard).await;
            return;
        }
        tokio::select! {
            _ = freed => {}
            _ = tokio::time::sleep_until(deadline) => {
                shared.metrics.handshakes_shed.with_label_values(&["dropped"]).inc();
                ztna_node::warn_limited!(SHED_LOG_EVERY, max, "no handshake slot within {QUEUE_WAIT:?}: dropping a queued connection attempt");
                incoming.ignore();
                return;
            }
        }
    }
}

/// `incoming` is boxed: the task of an accepted connection lives as long as the connection, and
/// an `Incoming` (384 bytes, twice over in the task's state) would take room in it all along.
async fn handshake(shared: Arc<Shared>, incoming: Box<quinn::Incoming>, _in_progress: InProgress) {
    let remote = ztna_node::transport::canonical(incoming.remote_address());
    let handshakes = &shared.metrics.handshakes;
    let reloads = shared.reloads.load(Ordering::SeqCst);
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await })
        .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let unauthorized = matches!(&e, quinn::ConnectionError::TransportError(t)
                if matches!(u64::from(t.code), 0x12a..=0x131 | 0x133 | 0x174));
            let result = if unauthorized {
                "unauthorized"
            } else {
                "failed"
            };
            handshakes.with_label_values(&[result]).inc();
            ztna_node::warn_limited!(REFUSED_LOG_EVERY, %remote, result, reason = %describe_connection_error(&e), "handshake refused");
            return;
        }
        Err(_) => {
            handshakes.with_label_values(&["failed"]).inc();
            ztna_node::warn_limited!(REFUSED_LOG_EVERY, %remote, "handshake timed out");
            return;
        }
    };
    let Some(id) = peer_id(&conn) else {
        handshakes.with_label_values(&["unauthorized"]).inc();
        conn.close(
            quinn::VarInt::from_u32(ztna_proto::codes::UNAUTHORIZED),
            b"no SPIFFE identity",
        );
        return;
    };
    handshakes.with_label_values(&["ok"]).inc();
    drop(_in_progress);
    let chain = peer_chain(&conn);
    let span = info_span!("peer", peer = %id, addr = %remote);
    session::run(shared, conn, id, chain, reloads)
        .instrument(span)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_under_load_a_queue_for_proven_addresses_and_a_hard_cap() {
        assert_eq!(admit(0, 0, false, 64, 1024, 0, 128), Admit::Handshake);
        assert_eq!(admit(63, 0, false, 64, 1024, 0, 128), Admit::Handshake);
        assert_eq!(admit(64, 0, false, 64, 1024, 0, 128), Admit::Retry);
        // A client that answered the Retry is let through.
        assert_eq!(admit(64, 0, true, 64, 1024, 0, 128), Admit::Handshake);
        // At the cap it waits for a slot, and so does every proven address behind it.
        assert_eq!(admit(1024, 0, true, 64, 1024, 0, 128), Admit::Queue);
        assert_eq!(admit(1000, 3, true, 64, 1024, 0, 128), Admit::Queue);
        assert_eq!(admit(1024, 4095, true, 64, 1024, 0, 128), Admit::Queue);
        assert_eq!(admit(1024, 4096, true, 64, 1024, 0, 128), Admit::Drop);
        // Unproven addresses never wait: they are asked to prove themselves, at the cap too
        // (and never start a handshake beyond it, whatever the Retry threshold).
        assert_eq!(admit(1000, 3, false, 64, 1024, 0, 128), Admit::Retry);
        assert_eq!(admit(5000, 0, false, 64, 1024, 0, 128), Admit::Retry);
        assert_eq!(admit(1024, 0, false, 4096, 1024, 0, 128), Admit::Retry);
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        // Below its share a source is treated like any other.
        assert_eq!(admit(10, 0, true, 64, 1024, 127, 128), Admit::Handshake);
        assert_eq!(admit(100, 0, false, 64, 1024, 127, 128), Admit::Retry);
        // At its share: dropped once proven. Unproven attempts are not held to it (their source
        // may be spoofed), only to the Retry threshold.
        assert_eq!(admit(10, 0, false, 64, 1024, 128, 128), Admit::Handshake);
        assert_eq!(admit(64, 0, false, 64, 1024, 128, 128), Admit::Retry);
        assert_eq!(admit(10, 0, true, 64, 1024, 128, 128), Admit::DropSource);
        assert_eq!(admit(1024, 0, true, 64, 1024, 500, 128), Admit::DropSource);
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let s = |a: &str| source_of(a.parse().unwrap()).to_string();
        assert_eq!(s("192.0.2.7:443"), "192.0.2.7");
        assert_eq!(s("[::ffff:192.0.2.7]:443"), "192.0.2.7");
        assert_eq!(
            s("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443"),
            "2001:db8:1:2::"
        );
        assert_eq!(
            s("[2001:db8:1:2::1]:1"),
            s("[2001:db8:1:2:ffff::9]:2"),
            "one /64 is one source"
        );
        assert_ne!(s("[2001:db8:1:2::1]:1"), s("[2001:db8:1:3::1]:1"));
    }
}

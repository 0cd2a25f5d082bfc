//! What the agent knows about each intermediate, owned by one task, and the decision every new
//! flow makes from it.
//!
//! The agent keeps a link to every configured intermediate (like the connector). Each link task
//! reports what happens to it ([`Event`]); the manager task ([`manage`]) is the only writer of
//! the per-relay knowledge and publishes it as an immutable [`Snapshot`]. A new flow asks
//! [`choose`] for a relay: a pure function of the snapshot, unit-tested below without sockets.
//!
//! The rules, in order:
//! 1. Use the first relay (config order = preference) that is connected, not draining and has the
//!    service available.
//! 2. If none, wait while a relay is still connecting or has not reported the service yet.
//! 3. Otherwise use a draining relay that still has the service (the only way left; it serves
//!    until it closes).
//! 4. Otherwise refuse, with the reason the relays gave (no connector, or denied), or say that no
//!    relay is reachable and why.
//!
//! So a relay that sent GoAway or refused a connection is never chosen while another one works,
//! a service that any reachable non-draining relay has is never refused, and flows for one
//! service never move because of another service: there are no moves, only per-flow choices.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use ztna_proto::{RejectReason, ServiceState};

/// A connection to one intermediate, as flows use it.
pub struct Link {
    pub index: usize,
    /// Counts connections to this relay; events about an older one are ignored.
    pub generation: u64,
    pub target: String,
    pub conn: quinn::Connection,
    /// Its datagram send buffer, shared fairly by the UDP flows on it.
    pub fair: ztna_node::datagram::Fair,
    /// Messages for its control stream (direct-path requests).
    pub control: mpsc::Sender<ztna_proto::ClientMsg>,
    /// Flows it carries (see [`LinkUse`]).
    pub users: ztna_node::rotation::Users,
    /// It replaces a link of this relay that is up, made with a certificate a reload replaced:
    /// the services that one reported stand until this one reports its own.
    pub rotation: bool,
}

/// A flow's hold on a relay link, counted while the flow lives: a link made with a certificate
/// a reload replaced closes once no flow holds it.
pub struct LinkUse(Arc<Link>);

impl LinkUse {
    pub fn new(link: Arc<Link>) -> LinkUse {
        link.users.add();
        LinkUse(link)
    }
}

impl std::ops::Deref for LinkUse {
    type Target = Link;
    fn deref(&self) -> &Link {
        &self.0
    }
}

impl Drop for LinkUse {
    fn drop(&mut self) {
        self.0.users.remove();
    }
}

impl Link {
    /// Queues a control message; false if the link is going away or not keeping up.
    pub fn say(&self, msg: ztna_proto::ClientMsg) -> bool {
        self.control.try_send(msg).is_ok()
    }
}

/// Where one relay stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conn {
    /// First attempt, or attempts while a relay that drained is expected back, in progress.
    Connecting,
    Up {
        /// It sent GoAway: running flows finish there, new ones go elsewhere.
        draining: bool,
    },
    /// The last attempt failed or the connection was lost; retrying with backoff.
    Down { error: String },
}

/// One relay in a snapshot.
#[derive(Clone)]
pub struct RelayView {
    pub target: String,
    pub conn: Conn,
    /// The current connection while `conn` is `Up`.
    pub link: Option<Arc<Link>>,
    pub generation: u64,
    /// Pushed by the relay (reset when the connection is lost).
    pub services: BTreeMap<String, (ServiceState, String)>,
    /// Services that were available there when it drained for a restart. Back on a new
    /// connection, it may say "no connector" for them while their connectors, restarted with it,
    /// are still reconnecting: flows for them wait (until it has them again, or for
    /// [`RETURN_GRACE`] after it came back) instead of being refused.
    pub returning: BTreeSet<String>,
}

/// How long after a relay that drained is back its "no connector" for a service that was
/// available before is taken as "not yet" (connectors poll a drained relay about every second).
pub const RETURN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl RelayView {
    pub fn new(target: &str) -> RelayView {
        RelayView {
            target: target.to_string(),
            conn: Conn::Connecting,
            link: None,
            generation: 0,
            services: BTreeMap::new(),
            returning: BTreeSet::new(),
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.conn, Conn::Up { .. })
    }

    /// Its available services are expected back after it returns (see `returning`).
    fn expect_back(&mut self) {
        let had = self
            .services
            .iter()
            .filter(|(_, (state, _))| *state == ServiceState::Available)
            .map(|(s, _)| s.clone());
        self.returning.extend(had);
    }

    pub fn usable(&self) -> bool {
        self.conn == Conn::Up { draining: false }
    }

    pub fn draining(&self) -> bool {
        self.conn == Conn::Up { draining: true }
    }

    pub fn state(&self, service: &str) -> Option<ServiceState> {
        self.services.get(service).map(|(s, _)| *s)
    }
}

/// Everything the agent knows about its relays, in config order.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub relays: Vec<RelayView>,
}

/// What a new flow should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Open it via the relay at this index.
    Use(usize),
    /// Ask again when the snapshot changes.
    Wait,
    Refuse(RejectReason, String),
}

/// The relay for a new flow to `service`, skipping the connections in `avoid` (relay index and
/// connection generation: ones this flow already failed on). A relay that has since lost that
/// connection is considered again: it may be reconnecting, or back with a new one.
pub fn choose(snap: &Snapshot, service: &str, avoid: &[(usize, u64)]) -> Choice {
    let considered = || {
        snap.relays
            .iter()
            .enumerate()
            .filter(|(i, r)| !(r.is_up() && avoid.contains(&(*i, r.generation))))
    };
    // 1. Connected, not draining, service available: the first in preference order.
    if let Some((i, _)) =
        considered().find(|(_, r)| r.usable() && r.state(service) == Some(ServiceState::Available))
    {
        return Choice::Use(i);
    }
    // 2. Something may still tell us the service is there.
    let pending = considered().any(|(_, r)| match &r.conn {
        Conn::Connecting => true,
        Conn::Up { draining: false } => {
            r.state(service).is_none()
                || (r.returning.contains(service)
                    && r.state(service) == Some(ServiceState::Unavailable))
        }
        _ => false,
    });
    if pending {
        return Choice::Wait;
    }
    // 3. A draining relay that still has it.
    if let Some((i, _)) = considered()
        .find(|(_, r)| r.draining() && r.state(service) == Some(ServiceState::Available))
    {
        return Choice::Use(i);
    }
    // 4. Refuse, in the relays' own words.
    let said: Vec<&(ServiceState, String)> = considered()
        .filter(|(_, r)| r.is_up())
        .filter_map(|(_, r)| r.services.get(service))
        .collect();
    if let Some((_, why)) = said.iter().find(|(s, _)| *s == ServiceState::Unavailable) {
        return Choice::Refuse(RejectReason::Unavailable, why.clone());
    }
    if let Some((_, why)) = said.iter().find(|(s, _)| *s == ServiceState::Denied) {
        return Choice::Refuse(RejectReason::Denied, why.clone());
    }
    if considered().any(|(_, r)| r.is_up()) {
        return Choice::Refuse(
            RejectReason::Unavailable,
            format!("no usable intermediate serves {service} now"),
        );
    }
    let errors: Vec<String> = snap
        .relays
        .iter()
        .filter_map(|r| match &r.conn {
            Conn::Down { error } => Some(format!("{}: {error}", r.target)),
            _ => None,
        })
        .collect();
    Choice::Refuse(
        RejectReason::Unavailable,
        if errors.is_empty() {
            "no intermediate reachable".to_string()
        } else {
            format!("no intermediate reachable ({})", errors.join("; "))
        },
    )
}

impl Snapshot {
    pub fn new(targets: &[String]) -> Snapshot {
        Snapshot {
            relays: targets.iter().map(|t| RelayView::new(t)).collect(),
        }
    }

    /// The service's availability as a user would see it: available if some usable relay has it;
    /// otherwise what the connected relays said.
    pub fn service_state(&self, service: &str) -> Option<(ServiceState, String)> {
        let said: Vec<(bool, &(ServiceState, String))> = self
            .relays
            .iter()
            .filter(|r| r.is_up())
            .filter_map(|r| r.services.get(service).map(|s| (r.usable(), s)))
            .collect();
        said.iter()
            .find(|(usable, (s, _))| *usable && *s == ServiceState::Available)
            .or_else(|| {
                said.iter()
                    .find(|(_, (s, _))| *s == ServiceState::Available)
            })
            .or_else(|| {
                said.iter()
                    .find(|(_, (s, _))| *s == ServiceState::Unavailable)
            })
            .or_else(|| said.first())
            .map(|(_, x)| (*x).clone())
    }

    /// Relays with a connection up (draining or not).
    pub fn connected(&self) -> usize {
        self.relays.iter().filter(|r| r.is_up()).count()
    }

    /// Relays connected and not draining.
    pub fn usable(&self) -> usize {
        self.relays.iter().filter(|r| r.usable()).count()
    }

    /// The link of relay `i` if it is up.
    pub fn link(&self, i: usize) -> Option<Arc<Link>> {
        self.relays.get(i).and_then(|r| r.link.clone())
    }

    /// Whether `link` is still its relay's current, non-draining connection.
    pub fn is_current_and_usable(&self, link: &Link) -> bool {
        self.relays
            .get(link.index)
            .is_some_and(|r| r.generation == link.generation && r.usable())
    }
}

/// What link tasks and flows report to the manager.
pub enum Event {
    Connecting(usize),
    /// The link of this generation ended while a newer one is being made (a certificate
    /// rotation): flows wait for the newer one, unless it is up already.
    Lost {
        index: usize,
        generation: u64,
    },
    Up(Arc<Link>),
    Status {
        index: usize,
        generation: u64,
        service: String,
        state: ServiceState,
        reason: String,
    },
    /// GoAway (or a Draining refusal) on that connection.
    Draining {
        index: usize,
        generation: u64,
    },
    Down {
        index: usize,
        error: String,
    },
    /// [`RETURN_GRACE`] has passed since that connection came up: its "no connector" answers
    /// count from now on.
    Settled {
        index: usize,
        generation: u64,
    },
    /// A flow was told the service is missing there although the last status said otherwise
    /// (the status push is on its way): believe the flow until the relay says more.
    Missing {
        index: usize,
        generation: u64,
        service: String,
        reason: String,
    },
}

/// Applies one event (the manager's whole job, kept pure for tests). Events about a connection
/// that is no longer current are ignored.
pub fn apply(snap: &mut Snapshot, ev: Event) {
    fn current(snap: &mut Snapshot, i: usize, generation: u64) -> Option<&mut RelayView> {
        snap.relays
            .get_mut(i)
            .filter(|r| r.generation == generation && r.is_up())
    }
    match ev {
        Event::Lost { index, generation } => {
            if current(snap, index, generation).is_some() {
                apply(snap, Event::Connecting(index));
            }
        }
        Event::Connecting(i) => {
            if let Some(r) = snap.relays.get_mut(i) {
                // What it had when it went away (polls after a drain add nothing: their
                // `services` is already empty).
                r.expect_back();
                r.conn = Conn::Connecting;
                r.link = None;
                r.services.clear();
            }
        }
        Event::Up(link) => {
            // An older connection's news is stale (two reloads in a row).
            if let Some(r) = snap.relays.get_mut(link.index) {
                if link.generation > r.generation {
                    let keep = link.rotation && r.is_up();
                    r.conn = Conn::Up { draining: false };
                    r.generation = link.generation;
                    r.link = Some(link);
                    if !keep {
                        r.services.clear();
                    }
                }
            }
        }
        Event::Status {
            index,
            generation,
            service,
            state,
            reason,
        } => {
            if let Some(r) = current(snap, index, generation) {
                if state == ServiceState::Available {
                    r.returning.remove(&service);
                }
                r.services.insert(service, (state, reason));
            }
        }
        Event::Draining { index, generation } => {
            if let Some(r) = current(snap, index, generation) {
                r.conn = Conn::Up { draining: true };
                // Noted now: its connectors leave it before it closes, and its "no connector"
                // for a service can come before the close.
                r.expect_back();
            }
        }
        Event::Down { index, error } => {
            if let Some(r) = snap.relays.get_mut(index) {
                r.conn = Conn::Down { error };
                r.link = None;
                r.services.clear();
                r.returning.clear();
            }
        }
        Event::Settled { index, generation } => {
            if let Some(r) = current(snap, index, generation) {
                r.returning.clear();
            }
        }
        Event::Missing {
            index,
            generation,
            service,
            reason,
        } => {
            if let Some(r) = current(snap, index, generation) {
                r.services
                    .insert(service, (ServiceState::Unavailable, reason));
            }
        }
    }
}

/// The manager: owns the per-relay knowledge, applies events in order, publishes snapshots.
pub async fn manage(mut events: mpsc::UnboundedReceiver<Event>, out: watch::Sender<Snapshot>) {
    while let Some(ev) = events.recv().await {
        out.send_modify(|snap| apply(snap, ev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServiceState::{Available as A, Denied as D, Unavailable as U};

    /// A relay in a table row: its connection and what it said about services.
    fn relay(conn: Conn, services: &[(&str, ServiceState)]) -> RelayView {
        RelayView {
            target: "r".into(),
            conn,
            link: None,
            generation: 1,
            services: services
                .iter()
                .map(|(s, st)| (s.to_string(), (*st, format!("{s} is {st:?}"))))
                .collect(),
            returning: BTreeSet::new(),
        }
    }
    fn up(services: &[(&str, ServiceState)]) -> RelayView {
        relay(Conn::Up { draining: false }, services)
    }
    fn draining(services: &[(&str, ServiceState)]) -> RelayView {
        relay(Conn::Up { draining: true }, services)
    }
    fn down() -> RelayView {
        relay(
            Conn::Down {
                error: "timed out".into(),
            },
            &[],
        )
    }
    fn connecting() -> RelayView {
        relay(Conn::Connecting, &[])
    }
    fn refuse_unavailable() -> Choice {
        Choice::Refuse(RejectReason::Unavailable, String::new())
    }

    /// Compares choices, ignoring refusal texts (checked separately).
    fn same(a: &Choice, b: &Choice) -> bool {
        match (a, b) {
            (Choice::Refuse(x, _), Choice::Refuse(y, _)) => x == y,
            _ => a == b,
        }
    }

    #[test]
    fn decision_table() {
        /// (situation, relays, service, connections to avoid (index, generation), expected
        /// choice)
        type Case = (
            &'static str,
            Vec<RelayView>,
            &'static str,
            Vec<(usize, u64)>,
            Choice,
        );
        let cases: Vec<Case> = vec![
            (
                "first usable relay with the service wins",
                vec![up(&[("web", A)]), up(&[("web", A)])],
                "web",
                vec![],
                Choice::Use(0),
            ),
            (
                "a service only via B goes to B, flows for web stay on A",
                vec![up(&[("web", A), ("dns", U)]), up(&[("web", A), ("dns", A)])],
                "dns",
                vec![],
                Choice::Use(1),
            ),
            (
                "... and web still goes to A",
                vec![up(&[("web", A), ("dns", U)]), up(&[("web", A), ("dns", A)])],
                "web",
                vec![],
                Choice::Use(0),
            ),
            (
                "a draining relay is never chosen while another works",
                vec![draining(&[("web", A)]), up(&[("web", A)])],
                "web",
                vec![],
                Choice::Use(1),
            ),
            (
                "web only via B, B draining, A lacks it: B still serves it",
                vec![up(&[("web", U)]), draining(&[("web", A)])],
                "web",
                vec![],
                Choice::Use(1),
            ),
            (
                "lone relay draining: still used until it closes",
                vec![draining(&[("web", A)])],
                "web",
                vec![],
                Choice::Use(0),
            ),
            (
                "a relay that refused connections (down) is skipped",
                vec![down(), up(&[("web", A)])],
                "web",
                vec![],
                Choice::Use(1),
            ),
            (
                "still connecting at start: wait, do not refuse",
                vec![up(&[("web", U)]), connecting()],
                "web",
                vec![],
                Choice::Wait,
            ),
            (
                "status not pushed yet: wait",
                vec![up(&[])],
                "web",
                vec![],
                Choice::Wait,
            ),
            (
                "down everywhere reachable: refuse at once",
                vec![up(&[("web", U)]), down()],
                "web",
                vec![],
                refuse_unavailable(),
            ),
            (
                "down on both: refuse at once",
                vec![up(&[("web", U)]), up(&[("web", U)])],
                "web",
                vec![],
                refuse_unavailable(),
            ),
            (
                "denied everywhere: refuse as denied",
                vec![up(&[("web", D)]), up(&[("web", D)])],
                "web",
                vec![],
                Choice::Refuse(RejectReason::Denied, String::new()),
            ),
            (
                "nothing reachable: refuse",
                vec![down(), down()],
                "web",
                vec![],
                refuse_unavailable(),
            ),
            (
                "a relay the flow failed on is avoided",
                vec![up(&[("web", A)]), up(&[("web", A)])],
                "web",
                vec![(0, 1)],
                Choice::Use(1),
            ),
            (
                "avoiding the only one that has it: refuse",
                vec![up(&[("web", A)]), up(&[("web", U)])],
                "web",
                vec![(0, 1)],
                refuse_unavailable(),
            ),
            (
                "the lone relay the flow failed on drained and is expected back: wait for it",
                vec![connecting()],
                "web",
                vec![(0, 1)],
                Choice::Wait,
            ),
            (
                "... and once it is back on a new connection, use it",
                vec![RelayView {
                    generation: 2,
                    ..up(&[("web", A)])
                }],
                "web",
                vec![(0, 1)],
                Choice::Use(0),
            ),
            (
                "back after a restart, no connector yet for a service it had: wait for it",
                vec![RelayView {
                    returning: ["web".to_string()].into(),
                    ..up(&[("web", U), ("db", U)])
                }],
                "web",
                vec![],
                Choice::Wait,
            ),
            (
                "... but a service it did not have is refused at once",
                vec![RelayView {
                    returning: ["web".to_string()].into(),
                    ..up(&[("web", U), ("db", U)])
                }],
                "db",
                vec![],
                refuse_unavailable(),
            ),
            (
                "preference order beats draining order",
                vec![
                    up(&[("web", A)]),
                    draining(&[("web", A)]),
                    up(&[("web", A)]),
                ],
                "web",
                vec![],
                Choice::Use(0),
            ),
        ];
        for (name, relays, service, avoid, want) in cases {
            let snap = Snapshot { relays };
            let got = choose(&snap, service, &avoid);
            assert!(same(&got, &want), "{name}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn refusals_carry_the_reason() {
        let snap = Snapshot {
            relays: vec![up(&[("web", U)]), down()],
        };
        match choose(&snap, "web", &[]) {
            Choice::Refuse(RejectReason::Unavailable, why) => assert_eq!(why, "web is Unavailable"),
            other => panic!("{other:?}"),
        }
        let snap = Snapshot {
            relays: vec![down(), down()],
        };
        match choose(&snap, "web", &[]) {
            Choice::Refuse(_, why) => assert!(why.contains("timed out"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A lone relay drains for a restart and comes back before the connector: its "no
    /// connector" for a service it had is "not yet" until the connector is back or the grace
    /// has passed; a service it did not have is refused at once.
    #[test]
    fn a_relay_back_from_a_restart_is_waited_for_while_its_connectors_return() {
        let mut snap = Snapshot::new(&["a:1".to_string()]);
        let status = |generation, service: &str, state| Event::Status {
            index: 0,
            generation,
            service: service.into(),
            state,
            reason: format!("{service} is {state:?}"),
        };
        snap.relays[0].conn = Conn::Up { draining: false };
        snap.relays[0].generation = 1;
        apply(&mut snap, status(1, "web", A));
        apply(&mut snap, status(1, "db", U));
        apply(
            &mut snap,
            Event::Draining {
                index: 0,
                generation: 1,
            },
        );
        // Its connector leaves the draining relay before the relay closes, and the relay says
        // so (one CI run: the agent was back before the connector and refused the flows).
        apply(&mut snap, status(1, "web", U));
        // Closed after the drain; polled until it is back.
        apply(&mut snap, Event::Connecting(0));
        apply(&mut snap, Event::Connecting(0));
        assert_eq!(choose(&snap, "web", &[]), Choice::Wait);
        // Back on connection 2 (what `Event::Up` does), before the connector.
        snap.relays[0].conn = Conn::Up { draining: false };
        snap.relays[0].generation = 2;
        snap.relays[0].services.clear();
        apply(&mut snap, status(2, "web", U));
        apply(&mut snap, status(2, "db", U));
        assert_eq!(
            choose(&snap, "web", &[]),
            Choice::Wait,
            "web was there before"
        );
        assert!(matches!(choose(&snap, "db", &[]), Choice::Refuse(..)));
        apply(&mut snap, status(2, "web", A));
        assert_eq!(choose(&snap, "web", &[]), Choice::Use(0));
        // Gone again from the connector's side later: refused at once, as always.
        apply(&mut snap, status(2, "web", U));
        assert!(matches!(choose(&snap, "web", &[]), Choice::Refuse(..)));
        // The grace ends on its own when no connector comes back.
        snap.relays[0].returning.insert("web".into());
        apply(
            &mut snap,
            Event::Settled {
                index: 0,
                generation: 1,
            },
        );
        assert_eq!(
            choose(&snap, "web", &[]),
            Choice::Wait,
            "a stale Settled counts"
        );
        apply(
            &mut snap,
            Event::Settled {
                index: 0,
                generation: 2,
            },
        );
        assert!(matches!(choose(&snap, "web", &[]), Choice::Refuse(..)));
        // An unplanned loss forgets it.
        snap.relays[0].returning.insert("web".into());
        apply(
            &mut snap,
            Event::Down {
                index: 0,
                error: "lost".into(),
            },
        );
        assert!(snap.relays[0].returning.is_empty());
    }

    #[test]
    fn events_follow_connections_and_ignore_stale_ones() {
        let mut snap = Snapshot::new(&["a:1".to_string(), "b:1".to_string()]);
        assert_eq!(choose(&snap, "web", &[]), Choice::Wait);
        // Relay 0 comes up (generation 1) and says web is available.
        snap.relays[0].conn = Conn::Up { draining: false };
        snap.relays[0].generation = 1;
        let status = |index, generation, state| Event::Status {
            index,
            generation,
            service: "web".into(),
            state,
            reason: String::new(),
        };
        apply(&mut snap, status(0, 1, A));
        apply(
            &mut snap,
            Event::Down {
                index: 1,
                error: "refused".into(),
            },
        );
        assert_eq!(choose(&snap, "web", &[]), Choice::Use(0));
        // A stale event from an older connection of relay 0 changes nothing.
        apply(
            &mut snap,
            Event::Draining {
                index: 0,
                generation: 0,
            },
        );
        apply(&mut snap, status(0, 0, U));
        assert_eq!(choose(&snap, "web", &[]), Choice::Use(0));
        // A flow learns web is missing there before the push does: believed.
        apply(
            &mut snap,
            Event::Missing {
                index: 0,
                generation: 1,
                service: "web".into(),
                reason: "no connector".into(),
            },
        );
        assert!(matches!(choose(&snap, "web", &[]), Choice::Refuse(..)));
        apply(&mut snap, status(0, 1, A));
        apply(
            &mut snap,
            Event::Draining {
                index: 0,
                generation: 1,
            },
        );
        assert!(snap.relays[0].draining());
        // Draining and nothing else: still used.
        assert_eq!(choose(&snap, "web", &[]), Choice::Use(0));
        assert_eq!(snap.service_state("web").map(|s| s.0), Some(A));
        apply(
            &mut snap,
            Event::Down {
                index: 0,
                error: "closed".into(),
            },
        );
        assert!(snap.relays[0].services.is_empty());
        assert_eq!(snap.connected(), 0);
    }
}

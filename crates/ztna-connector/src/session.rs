//! One supervised session per configured intermediate: connect, hello, register, then serve the
//! connection as independent tasks (control stream, flow streams, datagrams) until it is lost or
//! we stop; deregister on drain; reconnect with backoff after any loss (polling at ~1 s while an
//! intermediate that drained restarts).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use quinn::VarInt;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::backoff::{BackoffPolicy, Reconnect, CONNECT_TIMEOUT};
use ztna_node::client::{self, Control};
use ztna_node::identity::describe_connection_error;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::rotation::{self, Running};
use ztna_node::CancellationToken;
use ztna_proto::{codes, ClientMsg, Role, ServerMsg, MAX_LIST_LEN};

use crate::flow::{self, ConnState};
use crate::{Registration, Shared};

pub(crate) async fn supervise(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    idx: usize,
    target: String,
    stop: CancellationToken,
) {
    let span = info_span!("intermediate", %target);
    async move {
        let mut backoff = Reconnect::new(BackoffPolicy::default());
        // Whether a connection to this intermediate was up before.
        let mut was_up = false;
        let mut rotations = shared.tls.rotations();
        rotations.borrow_and_update();
        // The connection whose registrations count, and one made with a reloaded certificate
        // that takes over once the intermediate answered its registrations (rotation module).
        let mut serving: Option<Running<Ended>> = None;
        let mut candidate: Option<Running<Ended>> = None;
        // When to make the next connection (None: none is needed).
        let mut attempt_at = Some(tokio::time::Instant::now());
        loop {
            if stop.is_cancelled() {
                break;
            }
            if shared.is_draining() && serving.is_none() && candidate.is_none() {
                return;
            }
            if shared.is_draining() {
                attempt_at = None;
            }
            if attempt_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
                attempt_at = None;
                let (identity, config) = shared.tls.current();
                if let Err(next) = rotation::connection_needed(&serving, &identity) {
                    attempt_at = next;
                    continue;
                }
                let limit = backoff.attempt_limit();
                let attempt = tokio::select! {
                    r = client::connect(&endpoint, &config, &target, limit) => r,
                    _ = stop.cancelled() => break,
                };
                match attempt {
                    Ok(conn) => {
                        let handover = serving.is_some();
                        // A reconnect is a connection up again after one was lost: an
                        // intermediate that is down and polled in vain counts when it is back,
                        // once (so does a restart after a drain), and a flapping one counts
                        // every time. Failed attempts show in the backoff gauge and in
                        // intermediates_connected. Moving to a new certificate is not one.
                        if was_up && !handover {
                            shared.metrics.reconnects.inc();
                        }
                        was_up = true;
                        let running =
                            spawn_serve(&shared, conn, idx, &stop, handover, &target, identity);
                        if handover {
                            if let Some(old) = candidate.replace(running) {
                                old.retire();
                            }
                        } else {
                            serving = Some(running);
                        }
                    }
                    Err(reason) => {
                        let delay = backoff.next_delay(None);
                        if serving.is_none() {
                            warn!(%reason, "cannot connect to intermediate");
                            shared.metrics.reconnect_backoff.set(delay.as_secs_f64());
                            info!(?delay, "reconnecting after backoff");
                        } else {
                            warn!(%reason, ?delay, "cannot connect with the new certificate; the old connection keeps serving, trying again");
                        }
                        attempt_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
                continue;
            }
            let wake = async {
                match attempt_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A candidate that is ready takes over before anything else is looked at: the
                // relays already use it (agent), or it holds the registrations (connector).
                biased;
                _ = rotation::ready(&candidate) => {
                    // The new connection has the services: the old one retires.
                    if let Some(old) = serving.take() {
                        old.retire();
                    }
                    serving = candidate.take();
                    debug!("moved to the new certificate");
                }
                _ = wake => {}
                _ = stop.cancelled() => break,
                _ = rotation::rotated(&mut rotations) => {
                    // A connection with the new certificate, unless the serving one is renewed
                    // in place (decided when the attempt is due).
                    if let Some(old) = candidate.take() {
                        old.retire();
                    }
                    attempt_at = Some(tokio::time::Instant::now());
                }
                _ = rotation::renewal_refused(&serving) => {
                    if candidate.is_none() && attempt_at.is_none() {
                        attempt_at = Some(tokio::time::Instant::now());
                    }
                }
                ended = rotation::ended(&mut candidate) => {
                    // The old connection keeps serving; try again after the backoff.
                    let delay = backoff.next_delay(ended.since);
                    warn!(?delay, "the connection with the new certificate failed; the old one keeps serving, trying again");
                    attempt_at = Some(tokio::time::Instant::now() + delay);
                }
                ended = rotation::ended(&mut serving) => {
                    if let Some(next) = candidate.take() {
                        // Lost while moving: the new connection serves alone from now on (its
                        // answers replace the registrations shown).
                        serving = Some(next);
                        continue;
                    }
                    shared.set_registration(idx, None);
                    if stop.is_cancelled() || shared.is_draining() {
                        continue;
                    }
                    if ended.drained {
                        // The intermediate drained on purpose (a restart or upgrade): poll it at
                        // about a second until it is back, whatever earlier failures did to the
                        // delays.
                        backoff.planned(ended.rtt);
                    }
                    let delay = backoff.next_delay(ended.since);
                    shared.metrics.reconnect_backoff.set(delay.as_secs_f64());
                    info!(?delay, "reconnecting after backoff");
                    attempt_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
        // Stopping: each connection closes itself.
        for r in [serving, candidate].into_iter().flatten() {
            let _ = r.task.await;
        }
    }
    .instrument(span)
    .await
}

/// Serves a new connection in a task of its own, watched by the liveness probe.
fn spawn_serve(
    shared: &Arc<Shared>,
    conn: quinn::Connection,
    idx: usize,
    stop: &CancellationToken,
    handover: bool,
    target: &str,
    made_with: ztna_node::Identity,
) -> Running<Ended> {
    let (shared, stop) = (shared.clone(), stop.clone());
    let name = format!("session with {target}");
    let in_place = ztna_node::renew::InPlace::new(made_with.id.clone());
    Running::spawn(in_place.clone(), move |retire, answered| {
        let health = shared.health.clone();
        let session = Session {
            retire,
            answered,
            handover,
            made_with,
            in_place,
        };
        let fut = serve(shared, conn, idx, stop, session).instrument(tracing::Span::current());
        async move { health.watched(&name, fut).await }
    })
}

/// A connection's part in a certificate rotation.
struct Session {
    /// Cancelled to retire the connection: it deregisters its services (the connection made with
    /// the new certificate has them) and closes once its last flow ends.
    retire: CancellationToken,
    /// Cancelled once the intermediate answered every registration of this connection.
    answered: CancellationToken,
    /// It replaces a connection that still serves: the registrations keep showing that one's
    /// until this one's are answered.
    handover: bool,
    /// The identity the connection was made with (a renewal replaces its certificate).
    made_with: ztna_node::Identity,
    /// Shared with the supervisor: whether it can be renewed in place, and its refusals.
    in_place: std::sync::Arc<ztna_node::renew::InPlace>,
}

/// How a connection ended, for the backoff.
#[derive(Default)]
struct Ended {
    /// When it was established (for the "stayed healthy" reset), if it was.
    since: Option<Instant>,
    /// The intermediate told us it was draining (GoAway, or a close with the DRAINING code).
    drained: bool,
    /// The connection's round-trip time when it ended.
    rtt: std::time::Duration,
}

impl Ended {
    /// Lost before it served (no Welcome, or a failed write of our first messages): a failure,
    /// unless the intermediate's close says it drained.
    fn lost_early(conn: &quinn::Connection) -> Ended {
        Ended {
            drained: client::closed_by_drain(conn),
            ..Ended::default()
        }
    }
}

/// Runs one connection until it is lost, we stop, or it retires after a certificate rotation.
async fn serve(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    idx: usize,
    stop: CancellationToken,
    session: Session,
) -> Ended {
    let shared = &shared;
    let software = format!("ztna-connector/{}", ztna_node::VERSION);
    let Control {
        mut send,
        recv,
        observed_addr,
        revision,
        ..
    } = match client::hello(&conn, Role::Connector, software, vec![], CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(reason) => {
            warn!(%reason, "intermediate did not welcome this connector");
            return Ended::lost_early(&conn);
        }
    };
    debug!(%observed_addr, "welcomed");
    let since = Instant::now();
    // Its certificate vouches for the direct-path tickets it issues.
    let _known = KnownCert::new(shared, &conn);
    // Flow credit (revision 2): said before any Register, so the intermediate knows it before it
    // routes us a flow.
    let credit = revision >= 2;
    if credit {
        let msg = ClientMsg::CreditReports {
            receive_window: shared.config.connection_window,
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return Ended::lost_early(&conn);
        }
    }
    let names = sorted_services(shared);
    for name in &names {
        let s = &shared.services[*name];
        let msg = ClientMsg::Register {
            service: s.name.clone(),
            tcp: s.tcp.is_some(),
            udp: s.udp.is_some(),
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return Ended::lost_early(&conn);
        }
        if !session.handover {
            shared.set_registration(idx, Some((&s.name, Registration::Pending)));
        }
    }
    let state = Arc::new(if credit {
        ConnState::with_credit(conn.clone())
    } else {
        ConnState::new(conn.clone())
    });
    let mut drained = false;
    // After a rotation: closed once its last flow ended. The grace lets flows the intermediate
    // routed here before it saw the deregistration arrive.
    let retired = state.users.retired_and_unused(&session.retire);
    let why = tokio::select! {
        why = control(shared, &state, idx, send, recv, &mut drained, &session, revision) => why,
        why = accept_flows(shared, &state) => why,
        why = datagrams(shared, &state) => why,
        _ = retired => {
            info!("closed the connection made with the replaced certificate: its last flow ended");
            conn.close(VarInt::from_u32(codes::SHUTDOWN), b"certificate replaced");
            return Ended { since: Some(since), drained: false, rtt: conn.rtt() };
        }
        _ = stop.cancelled() => {
            conn.close(VarInt::from_u32(codes::SHUTDOWN), b"connector stopped");
            return Ended { since: Some(since), drained: false, rtt: conn.rtt() };
        }
    };
    if session.retire.is_cancelled() {
        warn!(reason = %why, "lost the connection made with the replaced certificate");
    } else {
        warn!(reason = %why, "lost intermediate");
    }
    // Read before our own close below, which replaces the connection's close reason: when the
    // relay closed right after its drain began, its GoAway may never have left, and the DRAINING
    // close code is all that says the restart is planned.
    let drained = drained || client::closed_by_drain(&conn);
    // Ended on our side (a candidate the intermediate would not register, a control stream
    // error): nothing serves its flows any more, so the intermediate must not route any here.
    conn.close(VarInt::from_u32(codes::SHUTDOWN), b"session ended");
    Ended {
        since: Some(since),
        drained,
        rtt: conn.rtt(),
    }
}

/// An intermediate's certificate, known (for direct-path tickets) while a connection to it is
/// up; two connections to one intermediate (a certificate rotation) count twice.
struct KnownCert<'a> {
    shared: &'a Shared,
    id: String,
    cert: ztna_node::CertificateDer<'static>,
}

impl<'a> KnownCert<'a> {
    fn new(shared: &'a Shared, conn: &quinn::Connection) -> Option<KnownCert<'a>> {
        let id = ztna_node::identity::peer_id(conn)?.to_string();
        let cert = ztna_node::identity::peer_chain(conn).into_iter().next()?;
        let mut certs = ztna_node::lock(&shared.intermediate_certs);
        match certs.get_mut(&id) {
            Some((known, n)) if *known == cert => *n += 1,
            _ => {
                certs.insert(id.clone(), (cert.clone(), 1));
            }
        }
        Some(KnownCert { shared, id, cert })
    }
}

impl Drop for KnownCert<'_> {
    fn drop(&mut self) {
        let mut certs = ztna_node::lock(&self.shared.intermediate_certs);
        if let Some((known, n)) = certs.get_mut(&self.id) {
            if *known == self.cert {
                *n -= 1;
                if *n == 0 {
                    certs.remove(&self.id);
                }
            }
        }
    }
}

/// The control stream: registration answers (which may come at any time: a policy reload at the
/// intermediate can register or reject a service later), GoAway, our deregistration when we
/// drain, and the renewal of the connection's certificate after a rotation (revision 3).
#[allow(clippy::too_many_arguments)]
async fn control(
    shared: &Arc<Shared>,
    state: &ConnState,
    idx: usize,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    drained: &mut bool,
    session: &Session,
    revision: u16,
) -> String {
    let mut draining = shared.draining.subscribe();
    let (mut renewals, renewal_answers) = ztna_node::renew::Follower::new(
        &shared.tls,
        &session.made_with,
        session.in_place.clone(),
        revision,
    );
    let mut deregistered = false;
    let mut answers = Answers {
        got: BTreeMap::new(),
        publishing: !session.handover,
    };
    if let Err(why) = answers.check(shared, idx, session) {
        return why;
    }
    loop {
        if session.retire.is_cancelled() && !deregistered {
            // The connection made with the new certificate has the services now; the
            // registrations show that one's.
            deregistered = true;
            for service in sorted_services(shared) {
                let msg = ClientMsg::Deregister {
                    service: service.clone(),
                };
                let _ = write_frame(&mut send, &msg).await;
            }
            info!("certificate replaced: deregistered this connection; its running flows continue");
        }
        if *draining.borrow_and_update() && !deregistered {
            deregistered = true;
            for service in sorted_services(shared) {
                let msg = ClientMsg::Deregister {
                    service: service.clone(),
                };
                let _ = write_frame(&mut send, &msg).await;
                shared.set_registration(idx, Some((service, Registration::Pending)));
            }
            info!("deregistered; running flows continue");
        }
        let report = async {
            match &state.credit {
                Some(c) => c.consumed.next_report().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = draining.changed() => if r.is_err() { return std::future::pending().await },
            _ = session.retire.cancelled(), if !deregistered => {}
            renewal = renewals.next(&shared.tls, &state.conn) => {
                if write_frame(&mut send, &renewal).await.is_err() {
                    return "control stream write failed".to_string();
                }
            }
            ready = report => {
                for chunk in ready.chunks(MAX_LIST_LEN) {
                    let msg = ClientMsg::Consumed { flows: chunk.to_vec() };
                    if write_frame(&mut send, &msg).await.is_err() {
                        return "control stream write failed".to_string();
                    }
                }
            }
            msg = recv.next::<ServerMsg>() => match msg {
                Ok(Some(ServerMsg::Registered { service })) => {
                    if !shared.services.contains_key(&service) {
                        debug!(%service, "ignoring a registration we did not ask for");
                    } else if !deregistered {
                        info!(%service, "registered");
                        answers.record(shared, idx, &service, Registration::Registered);
                        if let Err(why) = answers.check(shared, idx, session) {
                            return why;
                        }
                    }
                }
                Ok(Some(ServerMsg::RegisterRejected { service, reason })) => {
                    if shared.services.contains_key(&service) && !session.retire.is_cancelled() {
                        warn!(%service, why = %reason, "registration rejected");
                        answers.record(shared, idx, &service, Registration::Rejected(reason));
                        if let Err(why) = answers.check(shared, idx, session) {
                            return why;
                        }
                    }
                }
                Ok(Some(ServerMsg::DirectOffer { request, agent, service, candidates })) => {
                    let answer = match &shared.puncher {
                        Some(puncher) if shared.config.p2p && !shared.is_draining() => {
                            debug!(%agent, %service, ?candidates, "direct path offered; punching at the start signal");
                            shared.offers.remember(idx, request, candidates);
                            ClientMsg::DirectAnswer {
                                request,
                                accepted: true,
                                candidates: puncher.local_candidates(),
                                reason: String::new(),
                            }
                        }
                        _ => ClientMsg::DirectAnswer {
                            request,
                            accepted: false,
                            candidates: vec![],
                            reason: if shared.is_draining() {
                                "the connector is draining".to_string()
                            } else {
                                "P2P is disabled on this connector (p2p = false)".to_string()
                            },
                        },
                    };
                    if write_frame(&mut send, &answer).await.is_err() {
                        return "control stream write failed".to_string();
                    }
                }
                Ok(Some(ServerMsg::CreditReports { identity_window })) => {
                    if let Some(c) = &state.credit {
                        let budget = ztna_node::credit::SendBudget::new(
                            identity_window,
                            Some(shared.metrics.credit_waits.clone()),
                        );
                        debug!(window = budget.window(), "per-agent flow credit on");
                        c.budget.send_replace(Some(budget));
                    }
                }
                Ok(Some(ServerMsg::Consumed { flows })) => {
                    if let Some(b) = state.credit.as_ref().and_then(|c| c.budget.borrow().clone()) {
                        for (stream, consumed) in flows {
                            b.credit(stream, consumed);
                        }
                    }
                }
                Ok(Some(ServerMsg::DirectGo { request })) => {
                    if let Some(candidates) = shared.offers.take(idx, request) {
                        crate::direct::punch(shared, candidates);
                    }
                }
                Ok(Some(ServerMsg::GoAway { reason, deadline_ms, reconnect })) => {
                    // The hint is logged for the operator; we keep to the intermediates of our
                    // own configuration (we are connected to every one of them already).
                    info!(why = %reason, deadline_ms, hint = ?reconnect, "intermediate is draining; running flows continue, reconnecting when it closes");
                    *drained = true;
                }
                Ok(Some(other)) if renewal_answers.take(&other) => {}
                Ok(Some(other)) => debug!(msg = ?other, "control message"),
                Ok(None) => return "the intermediate closed the control stream".to_string(),
                Err(e) => return format!("control stream: {e}"),
            },
        }
    }
}

fn sorted_services(shared: &Shared) -> Vec<&String> {
    let mut names: Vec<&String> = shared.services.keys().collect();
    names.sort();
    names
}

/// The intermediate's answers to this connection's registrations. A connection that serves
/// shows them at once; a candidate in a certificate rotation keeps them until every service has
/// an answer, and takes over only if each service registered on the serving connection is
/// registered on it too (a new certificate the policy refuses leaves the old one serving).
struct Answers {
    got: BTreeMap<String, Registration>,
    publishing: bool,
}

impl Answers {
    fn record(&mut self, shared: &Shared, idx: usize, service: &str, r: Registration) {
        if self.publishing {
            shared.set_registration(idx, Some((service, r.clone())));
        }
        self.got.insert(service.to_string(), r);
    }

    /// Once every service has an answer: ready (the handover may go on), or, for a candidate
    /// refused what the serving connection has, the reason to give up.
    fn check(&mut self, shared: &Shared, idx: usize, session: &Session) -> Result<(), String> {
        if self.got.len() < shared.services.len() || session.answered.is_cancelled() {
            return Ok(());
        }
        if !self.publishing {
            let shown = shared
                .registrations
                .borrow()
                .get(idx)
                .cloned()
                .unwrap_or_default();
            let lost: Vec<&String> = shown
                .iter()
                .filter(|(s, r)| {
                    **r == Registration::Registered
                        && self.got.get(*s) != Some(&Registration::Registered)
                })
                .map(|(s, _)| s)
                .collect();
            if !lost.is_empty() {
                return Err(format!(
                    "the intermediate does not register {lost:?} for the new certificate; the old connection keeps serving"
                ));
            }
            for (service, r) in &self.got {
                shared.set_registration(idx, Some((service, r.clone())));
            }
            self.publishing = true;
        }
        session.answered.cancel();
        Ok(())
    }
}

async fn accept_flows(shared: &Arc<Shared>, state: &Arc<ConnState>) -> String {
    loop {
        match state.conn.accept_bi().await {
            Ok((s, r)) => {
                let span = info_span!("flow", stream = %r.id());
                let on_conn = state.flow_started();
                let flow = flow::handle(shared.clone(), state.clone(), s, r, None);
                shared.flows.spawn(
                    async move {
                        flow.await;
                        drop(on_conn);
                    }
                    .instrument(span),
                );
            }
            Err(e) => return describe_connection_error(&e),
        }
    }
}

async fn datagrams(shared: &Shared, state: &ConnState) -> String {
    loop {
        match state.conn.read_datagram().await {
            Ok(d) => flow::dispatch(shared, state, &d),
            Err(e) => return describe_connection_error(&e),
        }
    }
}

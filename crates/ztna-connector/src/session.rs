//! One supervised session per configured intermediate: connect, hello, register, then serve the
//! connection as independent tasks (control stream, flow streams, datagrams) until it is lost or
//! we stop; deregister on drain; reconnect with backoff after any loss (polling at ~1 s while an
//! intermediate that drained restarts).

use std::sync::Arc;
use std::time::Instant;

use quinn::VarInt;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::backoff::{BackoffPolicy, Reconnect, CONNECT_TIMEOUT};
use ztna_node::client::{self, Control};
use ztna_node::identity::describe_connection_error;
use ztna_node::io::{write_frame, FramedRecv};
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
        loop {
            if stop.is_cancelled() || shared.is_draining() {
                return;
            }
            let limit = backoff.attempt_limit();
            let ended = match client::connect(&endpoint, &shared.client(), &target, limit).await {
                Ok(conn) => {
                    // A reconnect is a connection up again after one was lost: an intermediate
                    // that is down and polled in vain counts when it is back, once (so does a
                    // restart after a drain), and a flapping one counts every time. Failed
                    // attempts show in the backoff gauge and in intermediates_connected.
                    if was_up {
                        shared.metrics.reconnects.inc();
                    }
                    was_up = true;
                    serve(&shared, conn, idx, &stop).await
                }
                Err(reason) => {
                    warn!(%reason, "cannot connect to intermediate");
                    Ended::default()
                }
            };
            shared.set_registration(idx, None);
            if stop.is_cancelled() || shared.is_draining() {
                return;
            }
            if ended.drained {
                // The intermediate drained on purpose (a restart or upgrade): poll it at about a
                // second until it is back, whatever earlier failures did to the delays.
                backoff.planned(ended.rtt);
            }
            let delay = backoff.next_delay(ended.since);
            shared.metrics.reconnect_backoff.set(delay.as_secs_f64());
            info!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await
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

/// Runs one connection until it is lost or we stop.
async fn serve(
    shared: &Arc<Shared>,
    conn: quinn::Connection,
    idx: usize,
    stop: &CancellationToken,
) -> Ended {
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
            return Ended::default();
        }
    };
    debug!(%observed_addr, "welcomed");
    let since = Instant::now();
    // Its certificate vouches for the direct-path tickets it issues.
    let intermediate = ztna_node::identity::peer_id(&conn).map(|id| id.to_string());
    let cert = ztna_node::identity::peer_chain(&conn).into_iter().next();
    if let (Some(id), Some(cert)) = (&intermediate, &cert) {
        ztna_node::lock(&shared.intermediate_certs).insert(id.clone(), cert.clone());
    }
    // Flow credit (revision 2): said before any Register, so the intermediate knows it before it
    // routes us a flow.
    let credit = revision >= 2;
    if credit {
        let msg = ClientMsg::CreditReports {
            receive_window: shared.config.connection_window,
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return Ended::default();
        }
    }
    let mut names: Vec<&String> = shared.services.keys().collect();
    names.sort();
    for name in names {
        let s = &shared.services[name];
        let msg = ClientMsg::Register {
            service: s.name.clone(),
            tcp: s.tcp.is_some(),
            udp: s.udp.is_some(),
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return Ended::default();
        }
        shared.set_registration(idx, Some((&s.name, Registration::Pending)));
    }
    let state = Arc::new(if credit {
        ConnState::with_credit(conn.clone())
    } else {
        ConnState::new(conn.clone())
    });
    let mut drained = false;
    let why = tokio::select! {
        why = control(shared, &state, idx, send, recv, &mut drained) => why,
        why = accept_flows(shared, &state) => why,
        why = datagrams(shared, &state) => why,
        _ = stop.cancelled() => {
            conn.close(VarInt::from_u32(codes::SHUTDOWN), b"connector stopped");
            forget_cert(shared, intermediate.as_deref(), cert.as_ref());
            return Ended { since: Some(since), drained: false, rtt: conn.rtt() };
        }
    };
    warn!(reason = %why, "lost intermediate");
    forget_cert(shared, intermediate.as_deref(), cert.as_ref());
    Ended {
        since: Some(since),
        drained: drained || client::closed_by_drain(&conn),
        rtt: conn.rtt(),
    }
}

fn forget_cert(
    shared: &Shared,
    id: Option<&str>,
    cert: Option<&ztna_node::CertificateDer<'static>>,
) {
    if let (Some(id), Some(cert)) = (id, cert) {
        let mut certs = ztna_node::lock(&shared.intermediate_certs);
        if certs.get(id) == Some(cert) {
            certs.remove(id);
        }
    }
}

/// The control stream: registration answers (which may come at any time: a policy reload at the
/// intermediate can register or reject a service later), GoAway, and our deregistration when we
/// drain.
async fn control(
    shared: &Arc<Shared>,
    state: &ConnState,
    idx: usize,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    drained: &mut bool,
) -> String {
    let mut draining = shared.draining.subscribe();
    let mut deregistered = false;
    loop {
        if *draining.borrow_and_update() && !deregistered {
            deregistered = true;
            let mut names: Vec<&String> = shared.services.keys().collect();
            names.sort();
            for service in names {
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
                        shared.set_registration(idx, Some((&service, Registration::Registered)));
                    }
                }
                Ok(Some(ServerMsg::RegisterRejected { service, reason })) => {
                    if shared.services.contains_key(&service) {
                        warn!(%service, why = %reason, "registration rejected");
                        shared.set_registration(idx, Some((&service, Registration::Rejected(reason))));
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
                Ok(Some(other)) => debug!(msg = ?other, "control message"),
                Ok(None) => return "the intermediate closed the control stream".to_string(),
                Err(e) => return format!("control stream: {e}"),
            },
        }
    }
}

async fn accept_flows(shared: &Arc<Shared>, state: &Arc<ConnState>) -> String {
    loop {
        match state.conn.accept_bi().await {
            Ok((s, r)) => {
                let span = info_span!("flow", stream = %r.id());
                shared.flows.spawn(
                    flow::handle(shared.clone(), state.clone(), s, r, None).instrument(span),
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

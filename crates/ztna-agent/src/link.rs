//! One supervised link per configured intermediate: connect, hello, then follow its control
//! stream (service status, GoAway) and deliver its datagrams, until the connection ends; then
//! reconnect (polling at about a second after a drain, exponential backoff capped at 3 s after
//! a failure). Everything that happens is reported to the relay manager.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::backoff::{BackoffPolicy, Reconnect, CONNECT_TIMEOUT};
use ztna_node::client::{self, Control};
use ztna_node::identity::describe_connection_error;
use ztna_node::rotation::{self, Running};
use ztna_node::CancellationToken;
use ztna_proto::{Role, ServerMsg, ServiceState};

use crate::relays::{Event, Link};
use crate::Shared;

pub(crate) async fn supervise(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    index: usize,
    target: String,
    events: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
) {
    let span = info_span!("intermediate", %target);
    async move {
        let mut backoff = Reconnect::new(BackoffPolicy::default());
        let mut generation = 0u64;
        let mut rotations = shared.tls.rotations();
        rotations.borrow_and_update();
        // The link flows use, and one made with a reloaded certificate that takes over once it
        // is up (ztna_node::rotation).
        let mut serving: Option<Running<Ended>> = None;
        let mut candidate: Option<Running<Ended>> = None;
        let (mut serving_generation, mut candidate_generation) = (0u64, 0u64);
        // When to make the next connection (None: none is needed).
        let mut attempt_at = Some(tokio::time::Instant::now());
        let _ = events.send(Event::Connecting(index));
        loop {
            if stop.is_cancelled() {
                break;
            }
            if attempt_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
                attempt_at = None;
                let (identity, client_config) = shared.tls.current();
                if let Err(next) = rotation::connection_needed(&serving, &identity) {
                    attempt_at = next;
                    continue;
                }
                let limit = backoff.attempt_limit();
                let attempt = tokio::select! {
                    r = client::connect(&endpoint, &client_config, &target, limit) => r,
                    _ = stop.cancelled() => break,
                };
                match attempt {
                    Ok(conn) => {
                        generation += 1;
                        let rotation = serving.is_some();
                        if rotation {
                            candidate_generation = generation;
                        } else {
                            serving_generation = generation;
                        }
                        let (control, said) = mpsc::channel(64);
                        let link = Arc::new(Link {
                            index,
                            generation,
                            target: target.clone(),
                            fair: ztna_node::datagram::Fair::new(&conn),
                            conn,
                            control,
                            users: Default::default(),
                            rotation,
                        });
                        let (shared, events, stop) = (shared.clone(), events.clone(), stop.clone());
                        let name = format!("link to {target}");
                        let in_place = ztna_node::renew::InPlace::new(identity.id.clone());
                        let renewal = Renewal {
                            made_with: identity,
                            in_place: in_place.clone(),
                        };
                        let running = Running::spawn(in_place, move |retire, up| {
                            let health = shared.health.clone();
                            let fut = serve(shared, link, said, events, stop, retire, up, renewal)
                                .instrument(tracing::Span::current());
                            // Its control stream and datagrams are watched by the liveness probe.
                            async move { health.watched(&name, fut).await }
                        });
                        if rotation {
                            if let Some(old) = candidate.replace(running) {
                                old.retire();
                            }
                        } else {
                            serving = Some(running);
                        }
                    }
                    Err(why) => {
                        warn!(reason = %why, "cannot connect to intermediate");
                        if serving.is_none() && candidate.is_none() {
                            let _ = events.send(if backoff.is_planned() {
                                Event::Connecting(index)
                            } else {
                                Event::Down { index, error: why }
                            });
                        }
                        let delay = backoff.next_delay(None);
                        debug!(?delay, "reconnecting after backoff");
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
                    // New flows use the new link from now on: the old one retires.
                    if let Some(old) = serving.take() {
                        old.retire();
                    }
                    serving = candidate.take();
                    serving_generation = candidate_generation;
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
                    // The old link keeps serving; try again after the backoff.
                    let delay = backoff.next_delay(ended.since);
                    warn!(?delay, reason = %ended.why, "the connection with the new certificate failed; the old one keeps serving, trying again");
                    attempt_at = Some(tokio::time::Instant::now() + delay);
                }
                ended = rotation::ended(&mut serving) => {
                    if let Some(next) = candidate.take() {
                        // Lost while moving: flows wait for the new link (up to open_timeout),
                        // unless it is up already (then the manager has it, and this is stale).
                        let _ = events.send(Event::Lost {
                            index,
                            generation: serving_generation,
                        });
                        serving = Some(next);
                        serving_generation = candidate_generation;
                        continue;
                    }
                    if ended.drained {
                        // A restart is planned: poll at about a second until it is back.
                        backoff.planned(ended.rtt);
                    }
                    // While a relay that drained is expected back, new flows that only it can
                    // carry wait for it (up to open_timeout) instead of being refused: a planned
                    // restart is then invisible to users. Otherwise it is down and flows go
                    // elsewhere or are refused.
                    let _ = events.send(if backoff.is_planned() {
                        Event::Connecting(index)
                    } else {
                        Event::Down {
                            index,
                            error: ended.why.clone(),
                        }
                    });
                    if stop.is_cancelled() {
                        break;
                    }
                    let delay = backoff.next_delay(ended.since);
                    debug!(?delay, "reconnecting after backoff");
                    attempt_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
        // Stopping: each link closes itself.
        for r in [serving, candidate].into_iter().flatten() {
            let _ = r.task.await;
        }
    }
    .instrument(span)
    .await
}

/// What a link's session needs to renew its connection's certificate in place.
struct Renewal {
    /// The identity the connection was made with.
    made_with: ztna_node::Identity,
    /// Shared with the supervisor.
    in_place: Arc<ztna_node::renew::InPlace>,
}

#[derive(Default)]
struct Ended {
    since: Option<Instant>,
    drained: bool,
    why: String,
    /// The connection's round-trip time when it ended.
    rtt: std::time::Duration,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut said: mpsc::Receiver<ztna_proto::ClientMsg>,
    events: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
    retire: CancellationToken,
    up: CancellationToken,
    renewal: Renewal,
) -> Ended {
    let (shared, events) = (&*shared, &events);
    let conn = &link.conn;
    let mut watch: Vec<String> = shared
        .config
        .forward
        .iter()
        .map(|f| f.service.clone())
        .collect();
    watch.sort();
    watch.dedup();
    let software = format!("ztna-agent/{}", ztna_node::VERSION);
    let Control {
        mut recv,
        observed_addr,
        identity,
        mut send,
        revision,
    } = match client::hello(conn, Role::Agent, software, watch, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(why) => {
            warn!(reason = %why, "intermediate did not welcome this agent");
            return Ended {
                why,
                ..Ended::default()
            };
        }
    };
    info!(%identity, %observed_addr, "connected to intermediate");
    let since = Instant::now();
    if retire.is_cancelled() {
        // Replaced by a newer rotation before it was up: never offered to flows.
        conn.close(
            quinn::VarInt::from_u32(ztna_proto::codes::SHUTDOWN),
            b"certificate replaced",
        );
        return Ended {
            why: "certificate replaced".into(),
            ..Ended::default()
        };
    }
    // Ready before the relay manager hears of it, so the supervisor never takes a link the
    // manager uses for a candidate it may drop.
    up.cancel();
    let _ = events.send(Event::Up(link.clone()));
    {
        let (events, index, generation) = (events.clone(), link.index, link.generation);
        tokio::spawn(async move {
            tokio::time::sleep(crate::relays::RETURN_GRACE).await;
            let _ = events.send(Event::Settled { index, generation });
        });
    }
    let mut drained = false;
    // After a certificate rotation (revision 3): this connection runs on under the new one.
    let (mut renewals, renewal_answers) = ztna_node::renew::Follower::new(
        &shared.tls,
        &renewal.made_with,
        renewal.in_place,
        revision,
    );
    let control = async {
        loop {
            match recv.next::<ServerMsg>().await {
                Ok(Some(ServerMsg::ServiceStatus {
                    service,
                    state,
                    reason,
                })) => {
                    if state == ServiceState::Available {
                        info!(%service, why = %reason, "service available");
                    } else {
                        warn!(%service, why = %reason, "service unavailable");
                    }
                    let _ = events.send(Event::Status {
                        index: link.index,
                        generation: link.generation,
                        service,
                        state,
                        reason,
                    });
                }
                Ok(Some(ServerMsg::GoAway {
                    reason,
                    deadline_ms,
                    reconnect,
                })) => {
                    // The hint is logged for the operator; the agent uses the intermediates of
                    // its own configuration only (an address from a relay is not trusted config).
                    info!(why = %reason, deadline_ms, hint = ?reconnect, "intermediate going away: new flows use another intermediate, running flows finish here");
                    drained = true;
                    let _ = events.send(Event::Draining {
                        index: link.index,
                        generation: link.generation,
                    });
                }
                Ok(Some(
                    msg @ (ServerMsg::DirectStart { .. }
                    | ServerMsg::DirectRefused { .. }
                    | ServerMsg::Ticket { .. }),
                )) => shared.direct.deliver(msg),
                Ok(Some(other)) if renewal_answers.take(&other) => {}
                Ok(Some(other)) => debug!(msg = ?other, "control message"),
                Ok(None) => return "the intermediate closed the control stream".to_string(),
                Err(e) => {
                    return conn
                        .close_reason()
                        .map(|c| describe_connection_error(&c))
                        .unwrap_or_else(|| format!("control stream: {e}"))
                }
            }
        }
    };
    let datagrams = async {
        loop {
            match conn.read_datagram().await {
                Ok(d) => shared
                    .udp
                    .dispatch(&d, conn.stable_id(), &shared.metrics.udp_dropped),
                Err(e) => return describe_connection_error(&e),
            }
        }
    };
    let writer = async {
        let mut open = true;
        loop {
            let msg = tokio::select! {
                m = said.recv(), if open => match m {
                    Some(m) => m,
                    None => {
                        open = false;
                        continue;
                    }
                },
                m = renewals.next(&shared.tls, conn) => m,
            };
            if let Err(e) = ztna_node::io::write_frame(&mut send, &msg).await {
                return format!("control stream write failed: {e}");
            }
        }
    };
    // After a rotation: closed once no flow holds it (UDP flows move to the new link).
    let retired = link.users.retired_and_unused(&retire);
    let why = tokio::select! {
        why = control => why,
        why = datagrams => why,
        why = writer => why,
        _ = retired => {
            info!("closed the connection made with the replaced certificate: its last flow ended");
            conn.close(quinn::VarInt::from_u32(ztna_proto::codes::SHUTDOWN), b"certificate replaced");
            return Ended { since: Some(since), drained: false, why: "certificate replaced".into(), rtt: conn.rtt() };
        }
        _ = stop.cancelled() => "agent stopping".to_string(),
    };
    let drained = drained || client::closed_by_drain(conn);
    if drained {
        info!(reason = %why, "intermediate closed after its drain; reconnecting as it restarts");
    } else if !stop.is_cancelled() {
        warn!(reason = %why, "lost intermediate");
    }
    Ended {
        since: Some(since),
        drained,
        why,
        rtt: conn.rtt(),
    }
}

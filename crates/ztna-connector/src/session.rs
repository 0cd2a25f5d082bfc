//! One supervised session per configured intermediate: connect, hello, register, serve flows,
//! deregister on drain, reconnect with backoff after any loss.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::backoff::{BackoffPolicy, Reconnect};
use ztna_node::client::{self, Control};
use ztna_node::identity::describe_connection_error;
use ztna_node::io::{read_frame, read_frame_timeout, write_frame};
use ztna_node::CancellationToken;
use ztna_proto::{codes, ClientMsg, Role, ServerMsg};

use crate::flow::{self, ConnState};
use crate::Shared;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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
        let mut attempt = 0u64;
        loop {
            if stop.is_cancelled() || *shared.draining.borrow() {
                return;
            }
            if attempt > 0 {
                shared.metrics.reconnects.inc();
            }
            attempt += 1;
            let ended = match client::connect(&endpoint, &shared.client(), &target, CONNECT_TIMEOUT)
                .await
            {
                Ok(conn) => serve(&shared, conn, idx, &stop).await,
                Err(reason) => {
                    warn!(%reason, "cannot connect to intermediate");
                    Ended::default()
                }
            };
            if stop.is_cancelled() || *shared.draining.borrow() {
                return;
            }
            if ended.drained {
                // The intermediate drained on purpose (a restart or upgrade): delays grown by
                // earlier failures start over, so we are back soon after it is.
                backoff.reset();
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
    /// When it was registered (for the "stayed healthy" reset), if it was.
    since: Option<Instant>,
    /// The intermediate told us it was draining (GoAway) before the connection ended.
    drained: bool,
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
        mut recv,
        observed_addr,
        ..
    } = match client::hello(&conn, Role::Connector, software, vec![], REPLY_TIMEOUT).await {
        Ok(c) => c,
        Err(reason) => {
            warn!(%reason, "intermediate did not welcome this connector");
            return Ended::default();
        }
    };
    debug!(%observed_addr, "welcomed");
    for s in shared.services.values() {
        let msg = ClientMsg::Register {
            service: s.name.clone(),
            tcp: s.tcp.is_some(),
            udp: s.udp.is_some(),
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return Ended::default();
        }
    }
    let mut registered = Vec::new();
    let mut drained = false;
    for _ in 0..shared.services.len() {
        match read_frame_timeout::<ServerMsg>(&mut recv, REPLY_TIMEOUT).await {
            Ok(ServerMsg::Registered { service }) => registered.push(service),
            Ok(ServerMsg::RegisterRejected { service, reason }) => {
                warn!(%service, %reason, "registration rejected");
            }
            Ok(ServerMsg::GoAway { reason, .. }) => {
                info!(%reason, "intermediate is draining; will reconnect when it closes");
                drained = true;
            }
            Ok(other) => debug!(msg = ?other, "ignoring control message"),
            Err(e) => {
                warn!(error = %e, "registration failed");
                return Ended {
                    since: None,
                    drained,
                };
            }
        }
    }
    let since = Instant::now();
    registered.sort();
    info!(services = ?registered, "registered");
    set_registered(shared, idx, !registered.is_empty());

    let state = Arc::new(ConnState::new(conn.clone()));
    let mut draining = shared.draining.subscribe();
    let mut deregistered = false;
    loop {
        if *draining.borrow_and_update() && !deregistered {
            deregistered = true;
            for service in &registered {
                let _ = write_frame(
                    &mut send,
                    &ClientMsg::Deregister {
                        service: service.clone(),
                    },
                )
                .await;
            }
            info!(services = ?registered, "deregistered; running flows continue");
            set_registered(shared, idx, false);
        }
        tokio::select! {
            _ = draining.changed() => {}
            _ = stop.cancelled() => {
                conn.close(VarInt::from_u32(codes::SHUTDOWN), b"connector stopped");
                break;
            }
            msg = read_frame::<ServerMsg>(&mut recv) => match msg {
                Ok(Some(ServerMsg::GoAway { reason, deadline_ms, .. })) => {
                    info!(%reason, deadline_ms, "intermediate is draining; running flows continue, reconnecting when it closes");
                    drained = true;
                }
                Ok(Some(other)) => debug!(msg = ?other, "control message"),
                Ok(None) | Err(_) => {
                    let reason = conn.close_reason().map(|c| describe_connection_error(&c)).unwrap_or_default();
                    warn!(%reason, "lost intermediate");
                    break;
                }
            },
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let span = info_span!("flow", stream = %r.id());
                    tokio::spawn(flow::handle(shared.clone(), state.clone(), s, r).instrument(span));
                }
                Err(e) => {
                    warn!(reason = %describe_connection_error(&e), "lost intermediate");
                    break;
                }
            },
            d = conn.read_datagram() => match d {
                Ok(d) => flow::dispatch(shared, &state, &d),
                Err(e) => {
                    warn!(reason = %describe_connection_error(&e), "lost intermediate");
                    break;
                }
            },
        }
    }
    set_registered(shared, idx, false);
    Ended {
        since: Some(since),
        drained: drained || client::closed_by_drain(&conn),
    }
}

fn set_registered(shared: &Shared, idx: usize, on: bool) {
    shared.registered.send_modify(|v| {
        if let Some(slot) = v.get_mut(idx) {
            *slot = on;
        }
    });
    shared.update_status();
}

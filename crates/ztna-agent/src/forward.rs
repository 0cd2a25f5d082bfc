//! Local ports: each TCP connection becomes one flow stream; each UDP client address becomes one
//! UDP flow whose datagrams travel as QUIC datagrams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, info, info_span, warn, Instrument};
use ztna_node::io::{read_frame_timeout, splice_tcp, write_frame, StreamError};
use ztna_node::{lock, CancellationToken};
use ztna_proto::{codes, datagram, FlowOpen, FlowReply, Protocol, RejectReason, ServiceState};

use crate::tunnel::{current, request_rehome, Session};
use crate::Shared;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a flow could not be opened.
enum OpenError {
    /// Refused with a reason; do not retry.
    Rejected(RejectReason, String),
    /// No usable tunnel within the open timeout.
    NoTunnel,
}

/// Opens a flow on the current session, moving to the next session if the connection it tried
/// was lost or is going away (failover must not fail flows).
async fn open_flow(
    shared: &Shared,
    service: &str,
    protocol: Protocol,
    flow_id: impl Fn() -> u64,
) -> Result<(Arc<Session>, u64, SendStream, RecvStream), OpenError> {
    let deadline = Instant::now() + shared.config.open_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(session) = current(shared, left).await else {
            return Err(OpenError::NoTunnel);
        };
        // Known unavailable or denied: refuse at once, do not make the user wait for a timeout.
        match session.status(service) {
            Some((ServiceState::Denied, reason)) => {
                return Err(OpenError::Rejected(RejectReason::Denied, reason))
            }
            Some((ServiceState::Unavailable, reason)) => {
                // Another intermediate may still reach a connector: wait for it instead.
                if request_rehome(shared, &session, service) {
                    continue;
                }
                return Err(OpenError::Rejected(RejectReason::Unavailable, reason));
            }
            _ => {}
        }
        let id = flow_id();
        match try_open(&session, service, protocol, id).await {
            Ok((send, recv, FlowReply::Accept)) => return Ok((session, id, send, recv)),
            Ok((_, _, FlowReply::Reject { reason, message })) => {
                // An intermediate that is draining (or whose connection we already know is
                // going) cannot speak for the others: try the flow on the next one.
                let moving = reason == RejectReason::Draining
                    || (reason == RejectReason::Unavailable
                        && (session.retiring() || request_rehome(shared, &session, service)));
                if moving && Instant::now() < deadline {
                    debug!(reason = reason.as_str(), %message, "intermediate is going away, retrying the flow on the next one");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                return Err(OpenError::Rejected(reason, message));
            }
            Err(e) => {
                if session.retiring() && Instant::now() < deadline {
                    debug!(error = %e, "tunnel went away while opening, retrying on the next one");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                return Err(OpenError::Rejected(
                    RejectReason::Error,
                    format!("tunnel error: {e}"),
                ));
            }
        }
    }
}

async fn try_open(
    session: &Session,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
) -> Result<(SendStream, RecvStream, FlowReply), StreamError> {
    let (mut send, mut recv) = session
        .conn
        .open_bi()
        .await
        .map_err(|_| StreamError::Closed)?;
    write_frame(
        &mut send,
        &FlowOpen {
            service: service.to_string(),
            protocol,
            flow_id,
        },
    )
    .await?;
    let reply = read_frame_timeout::<FlowReply>(&mut recv, REPLY_TIMEOUT).await?;
    Ok((send, recv, reply))
}

pub(crate) async fn tcp(
    shared: Arc<Shared>,
    service: String,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let service: Arc<str> = Arc::from(service);
    loop {
        let (tcp, client) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(%service, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let span = info_span!("flow", %service, %client);
        tokio::spawn(tcp_flow(shared.clone(), service.clone(), tcp).instrument(span));
    }
}

fn refuse_tcp(tcp: TcpStream) {
    // RST, so the local client fails at once instead of seeing an empty, clean close.
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

async fn tcp_flow(shared: Arc<Shared>, service: Arc<str>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let flows = &shared.metrics.flows;
    match open_flow(&shared, &service, Protocol::Tcp, || 0).await {
        Ok((session, _, mut send, mut recv)) => {
            let _on = session.track_flow();
            flows
                .with_label_values(&[&service, "tcp", "relay", "ok"])
                .inc();
            debug!(intermediate = %session.intermediate, "flow open");
            let stats = splice_tcp(tcp, &mut send, &mut recv, None, None).await;
            debug!(
                up = stats.forward,
                down = stats.backward,
                aborted = stats.aborted,
                "flow ended"
            );
        }
        Err(OpenError::Rejected(reason, message)) => {
            flows
                .with_label_values(&[&service, "tcp", "relay", reason.outcome()])
                .inc();
            warn!(reason = reason.as_str(), %message, "refusing local connection to {service}");
            refuse_tcp(tcp);
        }
        Err(OpenError::NoTunnel) => {
            flows
                .with_label_values(&[&service, "tcp", "relay", "unavailable"])
                .inc();
            warn!("refusing local connection to {service}: no intermediate reachable");
            refuse_tcp(tcp);
        }
    }
}

struct UdpClient {
    session: Option<Arc<Session>>,
    id: u64,
    last: Arc<AtomicU64>,
    close: CancellationToken,
}

pub(crate) async fn udp(
    shared: Arc<Shared>,
    service: String,
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
) {
    let service: Arc<str> = Arc::from(service);
    let clients: Arc<Mutex<HashMap<SocketAddr, UdpClient>>> = Arc::default();
    let epoch = Instant::now();
    let idle_ms = shared.config.udp_idle_timeout.as_millis() as u64;
    let mut buf = vec![0u8; 65_535];
    let mut arena = BytesMut::new();
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    let dropped = |r: &str| shared.metrics.udp_dropped.with_label_values(&[r]).inc();
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = sweep.tick() => {
                let now = epoch.elapsed().as_millis() as u64;
                lock(&clients).retain(|addr, c| {
                    let dead = c.close.is_cancelled()
                        || now.saturating_sub(c.last.load(Ordering::Relaxed)) >= idle_ms
                        || c.session.as_ref().is_some_and(|s| s.conn.close_reason().is_some());
                    if dead {
                        debug!(client = %addr, "udp flow closed (idle or ended)");
                        c.close.cancel();
                    }
                    !dead
                });
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "udp recv error");
                    continue;
                }
            },
        };
        let now = epoch.elapsed().as_millis() as u64;
        let payload = &buf[..n];
        let mut map = lock(&clients);
        match map.get(&client) {
            Some(c) => {
                c.last.store(now, Ordering::Relaxed);
                let Some(session) = &c.session else {
                    dropped("pending");
                    continue;
                };
                let Ok(d) = datagram::encode_into(&mut arena, c.id, payload) else {
                    continue;
                };
                match session.conn.send_datagram(d) {
                    Ok(()) => {}
                    Err(quinn::SendDatagramError::TooLarge) => {
                        dropped("too_large");
                        debug!(%service, size = n, max = ?session.conn.max_datagram_size(), "datagram too large for the path, dropped");
                    }
                    Err(_) => dropped("no_tunnel"),
                }
            }
            None => {
                let id = shared.next_udp_id.fetch_add(1, Ordering::Relaxed);
                let last = Arc::new(AtomicU64::new(now));
                let close = CancellationToken::new();
                map.insert(
                    client,
                    UdpClient {
                        session: None,
                        id,
                        last: last.clone(),
                        close: close.clone(),
                    },
                );
                drop(map);
                let first = payload.to_vec();
                let span = info_span!("udp", service = %service, %client);
                tokio::spawn(
                    udp_flow(
                        shared.clone(),
                        service.clone(),
                        socket.clone(),
                        clients.clone(),
                        client,
                        first,
                        close,
                    )
                    .instrument(span),
                );
            }
        }
    }
    for (_, c) in lock(&clients).drain() {
        c.close.cancel();
    }
}

async fn udp_flow(
    shared: Arc<Shared>,
    service: Arc<str>,
    socket: Arc<UdpSocket>,
    clients: Arc<Mutex<HashMap<SocketAddr, UdpClient>>>,
    client: SocketAddr,
    first: Vec<u8>,
    close: CancellationToken,
) {
    let flows = &shared.metrics.flows;
    let id = match lock(&clients).get(&client) {
        Some(c) => c.id,
        None => return,
    };
    let (session, mut send, mut recv) =
        match open_flow(&shared, &service, Protocol::Udp, || id).await {
            Ok((session, _, send, recv)) => (session, send, recv),
            Err(e) => {
                let (label, why) = match e {
                    OpenError::Rejected(r, m) => (r.outcome(), format!("{}: {m}", r.as_str())),
                    OpenError::NoTunnel => ("unavailable", "no intermediate reachable".to_string()),
                };
                flows
                    .with_label_values(&[&service, "udp", "relay", label])
                    .inc();
                warn!(reason = %why, "refusing UDP flow to {service}");
                // Keep the entry briefly (cancelled) so a burst is not re-opened per datagram.
                close.cancel();
                return;
            }
        };
    flows
        .with_label_values(&[&service, "udp", "relay", "ok"])
        .inc();
    let _on = session.track_flow();
    session.add_udp(id, socket, client);
    if let Some(c) = lock(&clients).get_mut(&client) {
        c.session = Some(session.clone());
    }
    let mut arena = BytesMut::new();
    if let Ok(d) = datagram::encode_into(&mut arena, id, &first) {
        if let Err(quinn::SendDatagramError::TooLarge) = session.conn.send_datagram(d) {
            shared
                .metrics
                .udp_dropped
                .with_label_values(&["too_large"])
                .inc();
        }
    }
    info!(intermediate = %session.intermediate, "udp flow open");
    tokio::select! {
        _ = close.cancelled() => {
            let _ = send.finish();
        }
        _ = async { while let Ok(Some(_)) = recv.read_chunk(1024, true).await {} } => {
            let _ = send.reset(VarInt::from_u32(codes::OK));
        }
    }
    session.remove_udp(id);
    close.cancel();
    debug!("udp flow ended");
}

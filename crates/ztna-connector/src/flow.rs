//! Flows from an intermediate to the backends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::{debug, info, warn};
use ztna_node::io::{read_frame_timeout, splice_tcp, write_frame};
use ztna_proto::{datagram, varint, FlowOpen, FlowReply, Protocol, RejectReason};

use crate::Shared;

const FLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload we can receive.
const MAX_UDP: usize = 65_535;

/// Per-connection state: the UDP flows whose datagrams arrive on this connection.
pub(crate) struct ConnState {
    conn: quinn::Connection,
    udp: Mutex<HashMap<u64, UdpFlow>>,
    epoch: Instant,
}

struct UdpFlow {
    socket: Arc<UdpSocket>,
    service: Arc<str>,
    last: Arc<AtomicU64>,
    /// Resolved once per flow, so the per-datagram path does no label lookup.
    to_backend: prometheus::IntCounter,
    backend_errors: prometheus::IntCounter,
}

impl ConnState {
    pub fn new(conn: quinn::Connection) -> ConnState {
        ConnState {
            conn,
            udp: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UdpFlow>> {
        ztna_node::lock(&self.udp)
    }
}

/// A datagram from the intermediate: send its payload to the flow's backend. The payload is a
/// slice of the received buffer; nothing is allocated.
pub(crate) fn dispatch(shared: &Shared, state: &ConnState, d: &Bytes) {
    let m = &shared.metrics;
    let Ok((id, payload)) = datagram::decode(d) else {
        m.udp_dropped.with_label_values(&["unknown_flow"]).inc();
        return;
    };
    let now = state.now_ms();
    let flows = state.flows();
    let Some(flow) = flows.get(&id) else {
        m.udp_dropped.with_label_values(&["unknown_flow"]).inc();
        return;
    };
    flow.last.store(now, Ordering::Relaxed);
    match flow.socket.try_send(&payload) {
        Ok(n) => flow.to_backend.inc_by(n as u64),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            m.udp_dropped.with_label_values(&["backend_busy"]).inc();
        }
        Err(e) => {
            debug!(service = %flow.service, error = %e, "backend send failed");
            flow.backend_errors.inc();
        }
    }
}

struct ActiveGuard<'a> {
    shared: &'a Shared,
    gauge: prometheus::IntGauge,
}

impl<'a> ActiveGuard<'a> {
    fn new(shared: &'a Shared, service: &str, protocol: Protocol) -> Self {
        let gauge = shared
            .metrics
            .flows_active
            .with_label_values(&[service, protocol.as_str()]);
        gauge.inc();
        shared.active_flows.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { shared, gauge }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        self.shared.active_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn reject(
    shared: &Shared,
    send: &mut SendStream,
    open: &FlowOpen,
    reason: RejectReason,
    message: String,
) {
    info!(service = %open.service, protocol = %open.protocol, reason = reason.as_str(), %message, "flow rejected");
    if shared.services.contains_key(&open.service) {
        shared
            .metrics
            .flows
            .with_label_values(&[&open.service, open.protocol.as_str(), "error"])
            .inc();
    }
    let _ = write_frame(send, &FlowReply::Reject { reason, message }).await;
    let _ = send.finish();
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let open = match read_frame_timeout::<FlowOpen>(&mut recv, FLOW_HEADER_TIMEOUT).await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "bad flow header from intermediate");
            let _ = send.reset(VarInt::from_u32(e.code()));
            return;
        }
    };
    let Some(svc) = shared.services.get(&open.service) else {
        let msg = format!("this connector does not serve {:?}", open.service);
        return reject(&shared, &mut send, &open, RejectReason::BadRequest, msg).await;
    };
    let backend = match open.protocol {
        Protocol::Tcp => svc.tcp,
        Protocol::Udp => svc.udp,
    };
    let Some(backend) = backend else {
        let msg = format!("service {} has no {} backend", open.service, open.protocol);
        return reject(&shared, &mut send, &open, RejectReason::BadRequest, msg).await;
    };
    match open.protocol {
        Protocol::Tcp => tcp_flow(&shared, send, recv, &open, backend).await,
        Protocol::Udp => udp_flow(&shared, &state, send, recv, &open, backend).await,
    }
}

async fn tcp_flow(
    shared: &Shared,
    mut send: SendStream,
    mut recv: RecvStream,
    open: &FlowOpen,
    backend: SocketAddr,
) {
    let service = open.service.as_str();
    let tcp = match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(backend))
        .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            shared
                .metrics
                .backend_errors
                .with_label_values(&[service])
                .inc();
            let msg = format!("backend {backend} of {service} refused the connection: {e}");
            return reject(
                shared,
                &mut send,
                open,
                RejectReason::BackendUnreachable,
                msg,
            )
            .await;
        }
        Err(_) => {
            shared
                .metrics
                .backend_errors
                .with_label_values(&[service])
                .inc();
            let msg = format!(
                "backend {backend} of {service} did not answer within {:?}",
                shared.config.connect_timeout
            );
            return reject(
                shared,
                &mut send,
                open,
                RejectReason::BackendUnreachable,
                msg,
            )
            .await;
        }
    };
    let _ = tcp.set_nodelay(true);
    // Counted before Accept goes out, so a drain never misses a flow that is about to carry data.
    let _guard = ActiveGuard::new(shared, service, Protocol::Tcp);
    if write_frame(&mut send, &FlowReply::Accept).await.is_err() {
        return;
    }
    let m = &shared.metrics;
    m.flows.with_label_values(&[service, "tcp", "ok"]).inc();
    let to_agent = m.bytes.with_label_values(&[service, "to_agent"]);
    let to_backend = m.bytes.with_label_values(&[service, "to_backend"]);
    let stats = splice_tcp(
        tcp,
        &mut send,
        &mut recv,
        Some(&to_agent),
        Some(&to_backend),
    )
    .await;
    debug!(%service, to_agent = stats.forward, to_backend = stats.backward, aborted = stats.aborted, "tcp flow ended");
}

async fn udp_flow(
    shared: &Shared,
    state: &Arc<ConnState>,
    mut send: SendStream,
    mut recv: RecvStream,
    open: &FlowOpen,
    backend: SocketAddr,
) {
    let service: Arc<str> = Arc::from(open.service.as_str());
    let local: SocketAddr = if backend.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    // A *connected* socket: the kernel drops datagrams from any address but the backend.
    let socket = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot open a UDP socket for {service}: {e}");
            return reject(shared, &mut send, open, RejectReason::Error, msg).await;
        }
    };
    if let Err(e) = socket.connect(backend).await {
        shared
            .metrics
            .backend_errors
            .with_label_values(&[&service])
            .inc();
        let msg = format!("backend {backend} of {service} is unreachable: {e}");
        return reject(
            shared,
            &mut send,
            open,
            RejectReason::BackendUnreachable,
            msg,
        )
        .await;
    }
    let socket = Arc::new(socket);
    let last = Arc::new(AtomicU64::new(state.now_ms()));
    let inserted = {
        let mut flows = state.flows();
        match flows.entry(open.flow_id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(UdpFlow {
                    socket: socket.clone(),
                    service: service.clone(),
                    last: last.clone(),
                    to_backend: shared
                        .metrics
                        .bytes
                        .with_label_values(&[&service, "to_backend"]),
                    backend_errors: shared.metrics.backend_errors.with_label_values(&[&service]),
                });
                true
            }
        }
    };
    if !inserted {
        let msg = format!("UDP flow id {} already in use", open.flow_id);
        return reject(shared, &mut send, open, RejectReason::BadRequest, msg).await;
    }
    let guard = ActiveGuard::new(shared, &service, Protocol::Udp);
    if write_frame(&mut send, &FlowReply::Accept).await.is_ok() {
        shared
            .metrics
            .flows
            .with_label_values(&[&service, "udp", "ok"])
            .inc();
        let idle = shared.config.udp_idle_timeout;
        let reader = backend_reader(
            shared,
            state,
            &socket,
            backend,
            open.flow_id,
            &service,
            &last,
        );
        let watch_stream = async {
            // The stream carries the flow's lifetime: finished or reset means the agent side ended.
            while let Ok(Some(_)) = recv.read_chunk(1024, true).await {}
        };
        let idle_check = async {
            loop {
                tokio::time::sleep(idle / 4 + Duration::from_millis(10)).await;
                let quiet = state.now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    debug!(%service, "udp flow idle, closing");
                    return;
                }
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = watch_stream => {}
            _ = idle_check => {}
        }
        let _ = send.finish();
    }
    state.flows().remove(&open.flow_id);
    drop(guard);
}

/// Reads the flow's backend socket and sends each datagram to the intermediate.
///
/// One arena per flow: the header is written once per datagram, the payload is received
/// straight behind it, and the frozen result is handed to quinn without a copy or an allocation
/// (the arena is refilled a chunk at a time). Anything not from `backend` is refused and counted.
async fn backend_reader(
    shared: &Shared,
    state: &ConnState,
    socket: &UdpSocket,
    backend: SocketAddr,
    flow_id: u64,
    service: &str,
    last: &AtomicU64,
) {
    let m = &shared.metrics;
    let rejected = m.udp_rejected.with_label_values(&[service]);
    let to_agent = m.bytes.with_label_values(&[service, "to_agent"]);
    let too_large = m.udp_dropped.with_label_values(&["too_large"]);
    let mut hdr = [0u8; datagram::MAX_HEADER_LEN];
    let Ok(hdr_len) = varint::encode(flow_id, &mut hdr) else {
        return;
    };
    let mut arena = BytesMut::new();
    loop {
        datagram::reserve(&mut arena, hdr_len + MAX_UDP);
        arena.extend_from_slice(&hdr[..hdr_len]);
        let (n, from) = match socket.recv_buf_from(&mut arena).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP port unreachable from the backend surfaces here; keep the flow.
                debug!(%service, error = %e, "backend socket error");
                m.backend_errors.with_label_values(&[service]).inc();
                arena.clear();
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                return;
            }
        };
        if from != backend {
            // Not from the flow's backend (the connected socket should already prevent this).
            rejected.inc();
            warn!(%service, %from, "refused UDP datagram from unexpected source");
            arena.clear();
            continue;
        }
        last.store(state.now_ms(), Ordering::Relaxed);
        let out = arena.split().freeze();
        match state.conn.send_datagram(out) {
            Ok(()) => to_agent.inc_by(n as u64),
            Err(quinn::SendDatagramError::TooLarge) => too_large.inc(),
            Err(_) => return,
        }
    }
}

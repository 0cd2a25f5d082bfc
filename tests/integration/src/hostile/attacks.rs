//! Attacks by an authenticated peer, spoken in our own protocol: exhaustion with idle flows,
//! write floods into a backend that never reads, oversized names, and a held flow that reports
//! how (and when) the intermediate ends it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, ReadError, VarInt, WriteError};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use ztna_proto::{codes, Role, ServerMsg};

use super::{
    client_endpoint, long_name_frame, open_flow, session, tally, tcp_open, unix_now, Creds,
    FlowOutcome, NameKind, Session,
};

/// Most connections and flows one run may open (whatever the command line says).
pub const MAX_CONNS: usize = 256;
pub const MAX_FLOWS: usize = 20_000;
/// Longest any attack may run.
pub const MAX_SECS: f64 = 600.0;

fn bounded_secs(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.clamp(0.0, MAX_SECS))
}

const HELLO_LIMIT: Duration = Duration::from_secs(10);

/// Opens `conns` sessions one after another; refusals are tallied, not fatal.
async fn sessions(
    creds: &Creds,
    server: SocketAddr,
    conns: usize,
    watch: &str,
) -> Result<(quinn::Endpoint, Vec<Session>, BTreeMap<String, u64>), String> {
    let config = creds.client_config()?;
    let endpoint = client_endpoint(server)?;
    let mut ok = Vec::new();
    let mut refused = BTreeMap::new();
    for _ in 0..conns.min(MAX_CONNS) {
        match session(
            &endpoint,
            &config,
            server,
            creds.role,
            vec![watch.to_string()],
            HELLO_LIMIT,
        )
        .await
        {
            Ok(s) => ok.push(s),
            Err(e) => tally(&mut refused, super::short(&e)),
        }
    }
    Ok((endpoint, ok, refused))
}

async fn leave(endpoint: quinn::Endpoint, sessions: Vec<Session>) {
    for s in &sessions {
        s.conn
            .close(VarInt::from_u32(codes::OK), b"attacker leaves");
    }
    drop(sessions);
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
}

/// Item 1: `conns` connections with one certificate, `flows` idle TCP flows on each (FlowOpen,
/// then nothing; optionally half-closed), held for `hold`, then everything closed.
pub struct Exhaust {
    pub server: SocketAddr,
    pub service: String,
    pub conns: usize,
    pub flows: usize,
    pub half_close: bool,
    pub hold_secs: f64,
    pub open_timeout: Duration,
}

pub async fn exhaust(creds: &Creds, o: &Exhaust) -> Result<Value, String> {
    let started = Instant::now();
    let (endpoint, sess, refused) = sessions(creds, o.server, o.conns, &o.service).await?;
    let per_conn = o.flows.min(MAX_FLOWS / o.conns.clamp(1, MAX_CONNS));
    let open = Arc::new(tcp_open(&o.service));
    let limit = Arc::new(Semaphore::new(128));
    let mut outcomes = BTreeMap::new();
    let mut held = Vec::new();
    let opening = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in &sess {
        for _ in 0..per_conn {
            let (conn, open, limit) = (s.conn.clone(), open.clone(), limit.clone());
            let (half_close, timeout) = (o.half_close, o.open_timeout);
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                open_flow(&conn, &open, half_close, timeout).await
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        let outcome = done.map_err(|e| format!("flow task: {e}"))?;
        tally(&mut outcomes, outcome.label());
        if let FlowOutcome::Accepted(send, recv) = outcome {
            held.push((send, recv));
        }
    }
    let open_secs = opening.elapsed().as_secs_f64();
    let accepted = held.len();
    let alive_before = sess
        .iter()
        .filter(|s| s.conn.close_reason().is_none())
        .count();
    super::until(Instant::now() + bounded_secs(o.hold_secs)).await;
    let alive_after = sess
        .iter()
        .filter(|s| s.conn.close_reason().is_none())
        .count();
    drop(held);
    leave(endpoint, sess).await;
    Ok(json!({
        "attack": "exhaust",
        "connections_ok": alive_before,
        "connections_alive_after_hold": alive_after,
        "connections_refused": refused,
        "flows_per_connection": per_conn,
        "flows_accepted": accepted,
        "flow_outcomes": outcomes,
        "open_secs": open_secs,
        "secs": started.elapsed().as_secs_f64(),
    }))
}

/// Item 2: `flows` flows (spread over `conns` connections) that write as fast as flow control
/// lets them, towards a backend that never reads, for `secs`; then the attacker leaves.
pub struct FloodWrite {
    pub server: SocketAddr,
    pub service: String,
    pub conns: usize,
    pub flows: usize,
    pub secs: f64,
}

pub async fn flood_write(creds: &Creds, o: &FloodWrite) -> Result<Value, String> {
    let (endpoint, sess, refused) = sessions(creds, o.server, o.conns, &o.service).await?;
    if sess.is_empty() {
        return Err(format!("no connection accepted: {refused:?}"));
    }
    let flows = o.flows.min(MAX_FLOWS);
    let open = Arc::new(tcp_open(&o.service));
    let written = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + bounded_secs(o.secs);
    let limit = Arc::new(Semaphore::new(128));
    let chunk = bytes::Bytes::from(vec![0x5a; 64 * 1024]);
    // Every flow opens at once and then writes until the deadline.
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..flows {
        let conn = sess[i % sess.len()].conn.clone();
        let (open, limit, written, chunk) =
            (open.clone(), limit.clone(), written.clone(), chunk.clone());
        writers.spawn(async move {
            // Opening is bounded by the deadline too: once earlier flows have filled the
            // connection's window, a late FlowOpen may never be sent.
            let outcome = tokio::select! {
                o = async {
                    let _permit = limit.acquire_owned().await;
                    open_flow(&conn, &open, false, Duration::from_secs(5)).await
                } => o,
                _ = super::until(deadline) => FlowOutcome::OpenTimeout,
            };
            let label = outcome.label();
            if let FlowOutcome::Accepted(mut send, _recv) = outcome {
                let push = async {
                    loop {
                        if send.write_chunk(chunk.clone()).await.is_err() {
                            return;
                        }
                        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                };
                tokio::select! {
                    _ = push => {}
                    _ = super::until(deadline) => {}
                }
            }
            label
        });
    }
    let mut outcomes = BTreeMap::new();
    while let Some(done) = writers.join_next().await {
        tally(&mut outcomes, done.unwrap_or_else(|e| format!("task: {e}")));
    }
    let opened = outcomes.get("accepted").copied().unwrap_or(0);
    let bytes = written.load(Ordering::Relaxed);
    leave(endpoint, sess).await;
    Ok(json!({
        "attack": "flood-write",
        "flows_writing": opened,
        "flow_outcomes": outcomes,
        "connections_refused": refused,
        "bytes_written": bytes,
        "left_at": unix_now(),
    }))
}

/// Item 6: messages with huge service names at `rate` per second for `secs`. `FlowOpen`s on new
/// streams (an agent the policy denies) or `Register`s on the control stream (a connector). A
/// connection the intermediate closes is replaced, at most `reconnects_per_sec` times a second.
pub struct Names {
    pub server: SocketAddr,
    pub kind: NameKind,
    pub name_len: usize,
    pub rate: f64,
    pub secs: f64,
    pub reconnects_per_sec: f64,
}

pub async fn names(creds: &Creds, o: &Names) -> Result<Value, String> {
    let frame = long_name_frame(o.kind, o.name_len)?;
    let config = creds.client_config()?;
    let endpoint = client_endpoint(o.server)?;
    let started = Instant::now();
    let deadline = started + bounded_secs(o.secs);
    let rate = o.rate.clamp(0.1, 100_000.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let results = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut closes = BTreeMap::new();
    let mut connect_failures = BTreeMap::new();
    let inflight = Arc::new(Semaphore::new(256));
    let mut current: Option<(quinn::Connection, quinn::SendStream)> = None;
    let mut readers = tokio::task::JoinSet::new();
    let (mut sent, mut skipped, mut connects) = (0u64, 0u64, 0u64);
    let min_gap = Duration::from_secs_f64(1.0 / o.reconnects_per_sec.clamp(0.1, 1000.0));
    let mut last_connect: Option<Instant> = None;
    while Instant::now() < deadline && !super::stop_token().is_cancelled() {
        tick.tick().await;
        if let Some((conn, _)) = &current {
            if let Some(e) = conn.close_reason() {
                tally(
                    &mut closes,
                    ztna_node::identity::describe_connection_error(&e),
                );
                current = None;
            }
        }
        if current.is_none() {
            if last_connect.is_some_and(|t| t.elapsed() < min_gap) {
                skipped += 1;
                continue;
            }
            last_connect = Some(Instant::now());
            connects += 1;
            match session(
                &endpoint,
                &config,
                o.server,
                creds.role,
                vec![],
                HELLO_LIMIT,
            )
            .await
            {
                Ok(Session {
                    conn,
                    control_send,
                    mut control_recv,
                }) => {
                    // Count what the intermediate answers on the control stream.
                    let results = results.clone();
                    readers.spawn(async move {
                        while let Ok(Some(m)) = control_recv.next::<ServerMsg>().await {
                            let label = match m {
                                ServerMsg::RegisterRejected { .. } => "register_rejected",
                                ServerMsg::Registered { .. } => "registered",
                                _ => continue,
                            };
                            tally(&mut ztna_node::lock(&results), label);
                        }
                    });
                    current = Some((conn, control_send));
                }
                Err(e) => {
                    tally(&mut connect_failures, super::short(&e));
                    continue;
                }
            }
        }
        let Some((conn, control_send)) = current.as_mut() else {
            continue;
        };
        match o.kind {
            NameKind::Register => {
                let write = control_send.write_chunk(frame.clone());
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), write).await {
                    sent += 1;
                }
            }
            NameKind::Flow => {
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                sent += 1;
                let conn = conn.clone();
                let frame = frame.clone();
                let results = results.clone();
                readers.spawn(async move {
                    let _permit = permit;
                    let label = one_raw_flow(&conn, frame).await;
                    tally(&mut ztna_node::lock(&results), label);
                });
            }
        }
        // Reap finished readers so the set stays small.
        while readers.try_join_next().is_some() {}
    }
    if let Some((conn, _)) = current.take() {
        conn.close(VarInt::from_u32(codes::OK), b"attacker leaves");
    }
    let drain = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        readers.abort_all();
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    let results = ztna_node::lock(&results).clone();
    Ok(json!({
        "attack": "names",
        "kind": match o.kind { NameKind::Flow => "flow", NameKind::Register => "register" },
        "name_len": o.name_len,
        "sent": sent,
        "skipped": skipped,
        "connects": connects,
        "connect_failures": connect_failures,
        "closed_by_peer": closes,
        "replies": results,
        "secs": started.elapsed().as_secs_f64(),
    }))
}

/// Sends one pre-encoded flow header on a new stream and classifies the answer.
async fn one_raw_flow(conn: &quinn::Connection, frame: bytes::Bytes) -> String {
    let limit = Duration::from_secs(3);
    let (mut send, recv) = match tokio::time::timeout(limit, conn.open_bi()).await {
        Err(_) => return "open_timeout".into(),
        Ok(Err(e)) => return format!("closed: {}", super::short(&describe(&e))),
        Ok(Ok(s)) => s,
    };
    if send.write_chunk(frame).await.is_err() {
        return "write_failed".into();
    }
    let _ = send.finish();
    let mut recv = ztna_node::io::FramedRecv::new(recv);
    match recv.expect::<ztna_proto::FlowReply>(limit).await {
        Ok(ztna_proto::FlowReply::Accept) => "accepted".into(),
        Ok(ztna_proto::FlowReply::Reject { reason, .. }) => format!("rejected:{}", reason.as_str()),
        Err(ztna_node::io::StreamError::Timeout) => "reply_timeout".into(),
        // The old intermediate echoes the name into its reject text, past the text cap.
        Err(e) if e.is_protocol() => "reply_oversized".into(),
        Err(_) => match conn.close_reason() {
            Some(e) => format!("closed: {}", super::short(&describe(&e))),
            None => "stream_failed".into(),
        },
    }
}

fn describe(e: &ConnectionError) -> String {
    ztna_node::identity::describe_connection_error(e)
}

/// Item 3: one flow held open and pinged through an echo backend; new flows attempted every
/// `new_flow_every`. Reports, as events with Unix times, when the flow ended (and its reset
/// code) and when the connection was closed (and why). Ends when the connection closes or after
/// `secs`.
pub struct Hold {
    pub server: SocketAddr,
    pub service: String,
    pub secs: f64,
    pub interval: Duration,
    pub new_flow_every: Duration,
}

/// How a held flow ended, from the client's side.
fn flow_end_read(e: &ReadError) -> Value {
    match e {
        ReadError::Reset(code) => reset_event("reset", *code),
        ReadError::ConnectionLost(c) => conn_event(c),
        other => json!({"how": "error", "error": other.to_string()}),
    }
}

fn flow_end_write(e: &WriteError) -> Value {
    match e {
        WriteError::Stopped(code) => reset_event("stopped", *code),
        WriteError::ConnectionLost(c) => conn_event(c),
        other => json!({"how": "error", "error": other.to_string()}),
    }
}

fn reset_event(how: &str, code: VarInt) -> Value {
    let code = code.into_inner();
    json!({"how": how, "code": code, "code_name": codes::name(code)})
}

fn conn_event(c: &ConnectionError) -> Value {
    let code = match c {
        ConnectionError::ApplicationClosed(a) => Some(a.error_code.into_inner()),
        _ => None,
    };
    json!({"how": "connection_closed", "code": code, "reason": describe(c)})
}

pub async fn hold(creds: &Creds, o: &Hold, emit: &(dyn Fn(Value) + Sync)) -> Result<Value, String> {
    let config = creds.client_config()?;
    let endpoint = client_endpoint(o.server)?;
    let s = session(
        &endpoint,
        &config,
        o.server,
        creds.role,
        vec![o.service.clone()],
        HELLO_LIMIT,
    )
    .await?;
    let open = tcp_open(&o.service);
    let (mut send, recv) = match open_flow(&s.conn, &open, false, Duration::from_secs(10)).await {
        FlowOutcome::Accepted(send, recv) => (send, recv),
        other => return Err(format!("the held flow was not accepted: {}", other.label())),
    };
    let (mut recv, _) = recv.into_parts();
    emit(json!({"event": "flow_open", "t": unix_now()}));
    let deadline = Instant::now() + bounded_secs(o.secs);
    let mut ping = tokio::time::interval(o.interval.max(Duration::from_millis(10)));
    let mut probe = tokio::time::interval(o.new_flow_every.max(Duration::from_millis(100)));
    probe.tick().await;
    let mut flow_alive = true;
    let (mut pings_ok, mut seq) = (0u64, 0u64);
    let mut flow_end = Value::Null;
    let mut new_flows = BTreeMap::new();
    let mut last_new_flow_accepted: Option<f64> = None;
    let conn_end;
    loop {
        tokio::select! {
            c = s.conn.closed() => {
                let mut ev = conn_event(&c);
                ev["event"] = "connection_closed".into();
                ev["t"] = unix_now().into();
                emit(ev.clone());
                conn_end = ev;
                break;
            }
            _ = super::until(deadline) => {
                conn_end = Value::Null;
                break;
            }
            _ = ping.tick(), if flow_alive => {
                seq += 1;
                let msg = seq.to_be_bytes();
                let r = async {
                    send.write_all(&msg).await.map_err(|e| flow_end_write(&e))?;
                    let mut back = [0u8; 8];
                    recv.read_exact(&mut back).await.map_err(|e| match e {
                        quinn::ReadExactError::ReadError(e) => flow_end_read(&e),
                        quinn::ReadExactError::FinishedEarly(_) => json!({"how": "finished"}),
                    })?;
                    if back != msg { return Err(json!({"how": "corrupt"})); }
                    Ok::<(), Value>(())
                };
                match tokio::time::timeout(Duration::from_secs(3), r).await {
                    Ok(Ok(())) => pings_ok += 1,
                    Ok(Err(mut ev)) => {
                        ev["event"] = "flow_ended".into();
                        ev["t"] = unix_now().into();
                        emit(ev.clone());
                        flow_end = ev;
                        flow_alive = false;
                    }
                    Err(_) => {
                        let ev = json!({"event": "flow_stalled", "t": unix_now()});
                        emit(ev.clone());
                        flow_end = ev;
                        flow_alive = false;
                    }
                }
            }
            _ = probe.tick() => {
                let outcome = open_flow(&s.conn, &open, false, Duration::from_secs(3)).await;
                let label = outcome.label();
                let t = unix_now();
                if matches!(outcome, FlowOutcome::Accepted(..)) {
                    last_new_flow_accepted = Some(t);
                }
                if let FlowOutcome::Accepted(mut fs, _) = outcome {
                    let _ = fs.reset(VarInt::from_u32(codes::OK));
                }
                emit(json!({"event": "new_flow", "t": t, "result": label}));
                tally(&mut new_flows, label);
            }
        }
    }
    s.conn.close(VarInt::from_u32(codes::OK), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(json!({
        "attack": "hold",
        "pings_ok": pings_ok,
        "flow_end": flow_end,
        "connection_end": conn_end,
        "new_flows": new_flows,
        "last_new_flow_accepted": last_new_flow_accepted,
    }))
}

/// The role a certificate claims, from its SPIFFE ID.
pub fn role_of(tls: &ztna_node::config::TlsConfig) -> Result<Role, String> {
    let pem = std::fs::read(&tls.cert).map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| format!("{}: no certificate", tls.cert.display()))?
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    ztna_node::SpiffeId::from_cert(&der).map(|id| id.role)
}

//! The local side of the attacks: the victim (a well-behaved client measured alongside), the
//! backends (echo, a sink that never reads, a source, a counter that tells EOF from reset), and
//! plain TCP/UDP clients for the SIGKILL and descriptor cases.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;

use super::{check_target, percentile, tally, unix_now};

/// Longest any local run may last, and most UDP flows one run may hold.
pub const MAX_SECS: f64 = 3600.0;
pub const MAX_UDP_FLOWS: usize = 20_000;

fn bounded(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.clamp(0.0, MAX_SECS))
}

/// How an I/O error reads in a report: `reset` for RST, else the error kind.
fn io_kind(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::BrokenPipe => "broken_pipe".into(),
        ErrorKind::UnexpectedEof => "eof_early".into(),
        k => format!("{k:?}").to_lowercase(),
    }
}

/// The victim: one TCP round trip every `interval` through an agent's local port, each on its
/// own connection (connect, send, half-close, read the echo to EOF, compare), for `secs` or
/// `count` requests. Each request is started on time even when earlier ones are slow.
pub struct Victim {
    pub target: SocketAddr,
    pub interval: Duration,
    pub secs: f64,
    pub count: Option<usize>,
    pub timeout: Duration,
}

async fn one_request(target: SocketAddr, i: usize, timeout: Duration) -> Result<f64, String> {
    let started = Instant::now();
    let msg = format!("victim request {i:08}\n").into_bytes();
    let exchange = async {
        let mut s = TcpStream::connect(target).await.map_err(|e| io_kind(&e))?;
        s.write_all(&msg).await.map_err(|e| io_kind(&e))?;
        s.shutdown().await.map_err(|e| io_kind(&e))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.map_err(|e| io_kind(&e))?;
        if back == msg {
            Ok(())
        } else if back.is_empty() {
            Err("empty".to_string())
        } else {
            Err("mismatch".to_string())
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => Ok(started.elapsed().as_secs_f64()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timeout".into()),
    }
}

pub async fn victim(o: &Victim) -> Result<Value, String> {
    let target = check_target(o.target)?;
    let started = Instant::now();
    let deadline = started + bounded(o.secs);
    let max = o.count.unwrap_or(usize::MAX).min(100_000);
    let mut tick = tokio::time::interval(o.interval.max(Duration::from_millis(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0;
    while i < max && (o.count.is_some() || Instant::now() < deadline) {
        tick.tick().await;
        let timeout = o.timeout;
        tasks.spawn(async move { one_request(target, i, timeout).await });
        i += 1;
    }
    let mut lat = Vec::new();
    let mut errors = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(secs)) => lat.push(secs * 1000.0),
            Ok(Err(e)) => tally(&mut errors, e),
            Err(e) => tally(&mut errors, format!("task: {e}")),
        }
    }
    lat.sort_by(f64::total_cmp);
    let total = i;
    let ok = lat.len();
    Ok(json!({
        "mode": "victim",
        "requests": total,
        "ok": ok,
        "failed": total - ok,
        "success_pct": if total > 0 { 100.0 * ok as f64 / total as f64 } else { 0.0 },
        "p50_ms": percentile(&lat, 50.0),
        "p99_ms": percentile(&lat, 99.0),
        "max_ms": lat.last().copied().unwrap_or(0.0),
        "errors": errors,
        "secs": started.elapsed().as_secs_f64(),
    }))
}

/// Backends. Each listener is optional; the process serves until `secs` pass.
#[derive(Default)]
pub struct Serve {
    /// Echo every byte back, half-close after the client does.
    pub echo: Vec<SocketAddr>,
    /// Accept and never read (the flood-write target).
    pub sink: Vec<SocketAddr>,
    /// Send `source_bytes` to every connection, then FIN; reports how each ended.
    pub source: Vec<SocketAddr>,
    pub source_bytes: u64,
    /// Read everything; reports bytes and whether the end was a clean EOF or a reset.
    pub count: Vec<SocketAddr>,
    /// UDP echo.
    pub udp_echo: Vec<SocketAddr>,
    pub secs: f64,
}

/// Emits one event (a JSON line); shared by the backend tasks.
pub type Emit = Arc<dyn Fn(Value) + Send + Sync>;

const MAX_SINK_CONNS: usize = 50_000;

pub async fn serve(o: &Serve, emit: Emit) -> Result<(), String> {
    let mut tasks = tokio::task::JoinSet::new();
    let bind = |a: SocketAddr| async move {
        check_target(a)?;
        TcpListener::bind(a)
            .await
            .map_err(|e| format!("bind {a}: {e}"))
    };
    for a in &o.echo {
        let l = bind(*a).await?;
        tasks.spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    }
    for a in &o.sink {
        let l = bind(*a).await?;
        tasks.spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                if held.len() < MAX_SINK_CONNS {
                    held.push(s);
                }
            }
        });
    }
    for a in &o.source {
        let l = bind(*a).await?;
        let (total, emit) = (o.source_bytes, emit.clone());
        tasks.spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let emit = emit.clone();
                tokio::spawn(async move {
                    let chunk = vec![0xa5u8; 64 * 1024];
                    let mut sent = 0u64;
                    let mut end = "done".to_string();
                    while sent < total {
                        let n = (total - sent).min(chunk.len() as u64) as usize;
                        if let Err(e) = s.write_all(&chunk[..n]).await {
                            end = io_kind(&e);
                            break;
                        }
                        sent += n as u64;
                    }
                    if end == "done" {
                        let _ = s.shutdown().await;
                    }
                    emit(
                        json!({"event": "source_end", "bytes": sent, "end": end, "t": unix_now()}),
                    );
                });
            }
        });
    }
    for a in &o.count {
        let l = bind(*a).await?;
        let emit = emit.clone();
        tasks.spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let emit = emit.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0u64;
                    let mut next_report = 16u64 << 20;
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break "eof".to_string(),
                            Ok(n) => {
                                got += n as u64;
                                if got >= next_report {
                                    emit(json!({"event": "count_progress", "bytes": got, "t": unix_now()}));
                                    next_report += 16 << 20;
                                }
                            }
                            Err(e) => break io_kind(&e),
                        }
                    };
                    emit(json!({"event": "count_end", "bytes": got, "end": end, "t": unix_now()}));
                });
            }
        });
    }
    for a in &o.udp_echo {
        check_target(*a)?;
        let s = UdpSocket::bind(a)
            .await
            .map_err(|e| format!("bind udp {a}: {e}"))?;
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
    }
    emit(json!({"event": "serving", "t": unix_now()}));
    super::until(Instant::now() + bounded(o.secs)).await;
    tasks.abort_all();
    Ok(())
}

/// Sleeps so that `done` bytes take at least `done / rate` seconds since `started`.
async fn pace(started: Instant, done: u64, mib_per_sec: f64) {
    if mib_per_sec > 0.0 {
        let due = started + Duration::from_secs_f64(done as f64 / (mib_per_sec * 1048576.0));
        tokio::time::sleep_until(due).await;
    }
}

/// A TCP upload of `bytes` at up to `mib_per_sec` (0: as fast as possible) through `target`.
pub struct Upload {
    pub target: SocketAddr,
    pub bytes: u64,
    pub mib_per_sec: f64,
    pub secs: f64,
}

pub async fn upload(o: &Upload) -> Result<Value, String> {
    let target = check_target(o.target)?;
    let started = Instant::now();
    let run = async {
        let mut s = TcpStream::connect(target).await.map_err(|e| io_kind(&e))?;
        let chunk = vec![0x3cu8; 64 * 1024];
        let mut sent = 0u64;
        while sent < o.bytes {
            let n = (o.bytes - sent).min(chunk.len() as u64) as usize;
            if let Err(e) = s.write_all(&chunk[..n]).await {
                return Ok((sent, format!("write: {}", io_kind(&e))));
            }
            sent += n as u64;
            pace(started, sent, o.mib_per_sec).await;
        }
        let _ = s.shutdown().await;
        let mut rest = Vec::new();
        let end = match s.read_to_end(&mut rest).await {
            Ok(_) => "done".to_string(),
            Err(e) => format!("read: {}", io_kind(&e)),
        };
        Ok::<_, String>((sent, end))
    };
    let (sent, end) = match tokio::time::timeout(bounded(o.secs), run).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (0, format!("connect: {e}")),
        Err(_) => (0, "timeout".into()),
    };
    Ok(json!({"mode": "upload", "sent": sent, "end": end, "secs": started.elapsed().as_secs_f64()}))
}

/// Reads from `target` until it ends, at up to `mib_per_sec`; reports bytes and how it ended
/// (`eof` for a FIN, `reset` for an RST).
pub struct Download {
    pub target: SocketAddr,
    pub mib_per_sec: f64,
    pub secs: f64,
}

pub async fn download(o: &Download) -> Result<Value, String> {
    let target = check_target(o.target)?;
    let started = Instant::now();
    let mut got = 0u64;
    let run = async {
        let mut s = TcpStream::connect(target).await.map_err(|e| io_kind(&e))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok::<String, String>("eof".to_string()),
                Ok(n) => {
                    got += n as u64;
                    pace(started, got, o.mib_per_sec).await;
                }
                Err(e) => return Ok(io_kind(&e)),
            }
        }
    };
    let end = match tokio::time::timeout(bounded(o.secs), run).await {
        Ok(Ok(end)) => end,
        Ok(Err(e)) => format!("connect: {e}"),
        Err(_) => "timeout".into(),
    };
    Ok(
        json!({"mode": "download", "bytes": got, "end": end, "secs": started.elapsed().as_secs_f64()}),
    )
}

/// Item 7: `count` UDP flows through an agent's UDP port, one local socket (= one flow) each,
/// opened at `rate` per second; each sends until answered (3 tries); all are held for `hold`
/// seconds, then closed.
pub struct UdpFlows {
    pub target: SocketAddr,
    pub count: usize,
    pub rate: f64,
    pub hold_secs: f64,
}

pub async fn udp_flows(o: &UdpFlows, emit: &(dyn Fn(Value) + Sync)) -> Result<Value, String> {
    let target = check_target(o.target)?;
    ztna_node::fdlimit::raise_nofile();
    let count = o.count.min(MAX_UDP_FLOWS);
    let local: SocketAddr = if target.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.rate.clamp(1.0, 1e5)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut errors = BTreeMap::new();
    for i in 0..count {
        tick.tick().await;
        let s = match UdpSocket::bind(local).await {
            Ok(s) => s,
            Err(e) => {
                tally(&mut errors, format!("bind: {}", io_kind(&e)));
                continue;
            }
        };
        if let Err(e) = s.connect(target).await {
            tally(&mut errors, format!("connect: {}", io_kind(&e)));
            continue;
        }
        tasks.spawn(async move {
            let msg = format!("udp flow {i:06}");
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                if s.send(msg.as_bytes()).await.is_err() {
                    continue;
                }
                let wait = tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf));
                if let Ok(Ok(n)) = wait.await {
                    if &buf[..n] == msg.as_bytes() {
                        return (s, true);
                    }
                }
            }
            (s, false)
        });
    }
    let mut held = Vec::new();
    let mut answered = 0usize;
    while let Some(r) = tasks.join_next().await {
        if let Ok((s, ok)) = r {
            answered += usize::from(ok);
            held.push(s);
        }
    }
    let opened_secs = started.elapsed().as_secs_f64();
    emit(json!({"event": "flows_open", "answered": answered, "t": unix_now()}));
    super::until(Instant::now() + bounded(o.hold_secs)).await;
    drop(held);
    Ok(json!({
        "mode": "udp-flows",
        "flows": count,
        "answered": answered,
        "unanswered": count - answered,
        "errors": errors,
        "open_secs": opened_secs,
        "left_at": unix_now(),
    }))
}

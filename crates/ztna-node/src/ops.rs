//! The ops endpoint: `GET /metrics` (Prometheus text), `GET /healthz` (liveness probe),
//! `GET /readyz` (200 only when the daemon can do its job), `GET /status` (JSON, from the
//! provider the daemon registers with [`Ops::with_status`]; see [`crate::status`]).
//!
//! A deliberately small HTTP/1.1 server: one request per connection, request head capped at
//! 8 KiB and 2 s, at most 256 connections at once. It listens on loopback by default.
//!
//! Connections that send nothing cannot starve a real probe: each gets 2 s for its request head,
//! and when every slot is taken the oldest connection still waiting for its head is dropped to
//! make room for the new one (a request being answered is never dropped).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Common;

const MAX_HEAD: usize = 8 * 1024;
/// Time a connection has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;

/// What `GET /status` answers: the daemon's state, now, as JSON.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// A bound ops listener (bind early so a port in use fails the start).
pub struct Ops {
    listener: TcpListener,
    status: Option<StatusFn>,
}

impl Ops {
    /// Binds the listener; must be called inside a Tokio runtime.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Ops> {
        let std = std::net::TcpListener::bind(addr)?;
        std.set_nonblocking(true)?;
        Ok(Ops {
            listener: TcpListener::from_std(std)?,
            status: None,
        })
    }

    /// Serves `GET /status` from `status` (called once per request; keep it quick).
    pub fn with_status(
        mut self,
        status: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Ops {
        self.status = Some(Arc::new(status));
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, metrics: Common, health: Health, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        // Connections still reading their head, oldest first: evicted when slots run out.
        let waiting: Arc<Mutex<VecDeque<(u64, CancellationToken)>>> = Arc::default();
        let mut next_id = 0u64;
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "ops accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // Full: drop the connection that has waited longest for its request head.
                    let oldest = crate::lock(&waiting).pop_front();
                    let Some((_, evict)) = oldest else {
                        continue; // every slot is answering a request: drop the new one
                    };
                    evict.cancel();
                    match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            };
            let id = next_id;
            next_id += 1;
            let evicted = CancellationToken::new();
            crate::lock(&waiting).push_back((id, evicted.clone()));
            let (metrics, health, waiting) = (metrics.clone(), health.clone(), waiting.clone());
            let status = self.status.clone();
            tokio::spawn(async move {
                let _ = handle(stream, &metrics, &health, status.as_ref(), &evicted, || {
                    crate::lock(&waiting).retain(|(i, _)| *i != id);
                })
                .await;
                crate::lock(&waiting).retain(|(i, _)| *i != id);
                drop(permit);
            });
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

/// Serves one connection. `evicted` drops it while it is still waiting for its request head;
/// `got_head` is called once the head is in (from then on it is not evicted).
async fn handle(
    mut stream: TcpStream,
    metrics: &Common,
    health: &Health,
    status: Option<&StatusFn>,
    evicted: &CancellationToken,
    got_head: impl FnOnce(),
) -> std::io::Result<()> {
    let head = tokio::select! {
        _ = evicted.cancelled() => return Ok(()),
        r = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)) => match r {
            Ok(Some(head)) => head,
            _ => return Ok(()),
        },
    };
    got_head();
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, ctype, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.render(),
            ),
            "/healthz" => match health.live() {
                Ok(()) => (200, "text/plain", "ok\n".to_string()),
                Err(why) => (503, "text/plain", format!("unhealthy: {why}\n")),
            },
            "/readyz" => {
                if health.is_ready() {
                    (200, "text/plain", format!("ready: {}\n", health.status()))
                } else {
                    (
                        503,
                        "text/plain",
                        format!("not ready: {}\n", health.status()),
                    )
                }
            }
            "/status" => match status {
                Some(f) => {
                    let mut body = serde_json::to_string_pretty(&f()).unwrap_or_default();
                    body.push('\n');
                    (200, "application/json", body)
                }
                None => (404, "text/plain", "no status here\n".to_string()),
            },
            _ => (
                404,
                "text/plain",
                "not found (try /metrics, /healthz, /readyz, /status)\n".to_string(),
            ),
        }
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Starts what every daemon runs beside its work: the runtime heartbeat, the ops endpoint, the
/// systemd notifier, the heap trimmer and the count of kernel drops at its QUIC socket (bound to
/// `quic`). Cancel the returned token when the daemon has finished.
pub fn start_background(
    ops: Ops,
    metrics: Common,
    health: Health,
    quic: Option<SocketAddr>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    health.spawn_heartbeat();
    if let Some(addr) = quic {
        tokio::spawn(crate::udp::watch_quic_socket(
            addr.port(),
            metrics.quic_socket_drops.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(ops.serve(metrics, health.clone(), stop.clone()));
    tokio::spawn(health.notify_systemd(stop.clone()));
    tokio::spawn(crate::memory::trimmer(stop.clone()));
    stop
}

/// Minimal GET for tests and tools: returns (status code, body).
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    get_limited(addr, path, u64::MAX).await
}

/// [`get`], reading at most `max` bytes of the answer (a longer one is cut there).
pub async fn get_limited(addr: SocketAddr, path: &str, max: u64) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: ztna\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    (&mut s).take(max).read_to_end(&mut raw).await?;
    let out = String::from_utf8_lossy(&raw).into_owned();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let ops = Ops::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ops.local_addr().unwrap();
        let metrics = Common::new("test");
        let health = Health::new(Duration::from_secs(2));
        health.spawn_heartbeat();
        let stop = CancellationToken::new();
        tokio::spawn(ops.serve(metrics, health.clone(), stop.clone()));
        let (code, body) = get(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("ztna_build_info{role=\"test\""), "{body}");
        assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
        health.set_status("connecting");
        let (code, body) = get(addr, "/readyz").await.unwrap();
        assert_eq!((code, body.as_str()), (503, "not ready: connecting\n"));
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.unwrap().0, 200);
        assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
        // Garbage and oversized heads do not take the server down.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&vec![b'A'; 20_000]).await.unwrap();
        drop(s);
        let _beat_never = health.register("stuck loop");
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let (code, body) = get(addr, "/healthz").await.unwrap();
        assert_eq!(code, 503);
        assert!(body.contains("stuck loop"), "{body}");
        stop.cancel();
    }

    #[tokio::test]
    async fn serves_the_registered_status_as_json() {
        // Without a provider there is no /status.
        let ops = Ops::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let bare = ops.local_addr().unwrap();
        let health = Health::new(Duration::from_secs(2));
        let stop = CancellationToken::new();
        tokio::spawn(ops.serve(Common::new("test"), health.clone(), stop.clone()));
        assert_eq!(get(bare, "/status").await.unwrap().0, 404);
        // With one, every request asks it afresh.
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        let ops = Ops::bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .with_status(move || {
                let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                serde_json::json!({ "role": "test", "asked": n })
            });
        let addr = ops.local_addr().unwrap();
        tokio::spawn(ops.serve(Common::new("test"), health, stop.clone()));
        for n in 1..=2 {
            let (code, body) = get(addr, "/status").await.unwrap();
            assert_eq!(code, 200);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["asked"], n);
        }
        // /readyz and /metrics are as they were.
        assert_eq!(get(addr, "/readyz").await.unwrap().0, 503);
        assert_eq!(get(addr, "/metrics").await.unwrap().0, 200);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_do_not_starve_healthz() {
        let ops = Ops::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ops.local_addr().unwrap();
        let health = Health::new(Duration::from_secs(5));
        health.spawn_heartbeat();
        let stop = CancellationToken::new();
        tokio::spawn(ops.serve(Common::new("test"), health.clone(), stop.clone()));
        // 300 connections that send nothing (more than the 256 slots), held open...
        let mut silent = Vec::new();
        for _ in 0..300 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // ...while probes keep asking, some at the same time.
        let mut ok = 0;
        let mut failed = Vec::new();
        for round in 0..10 {
            let probes: Vec<_> = (0..8)
                .map(|_| tokio::spawn(async move { get(addr, "/healthz").await }))
                .collect();
            for p in probes {
                match p.await.unwrap() {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("round {round}: {other:?}")),
                }
            }
            // More silent connections arrive between rounds.
            for _ in 0..20 {
                silent.push(TcpStream::connect(addr).await.unwrap());
            }
        }
        assert!(failed.is_empty(), "{ok} ok, failed: {failed:?}");
        assert_eq!(ok, 80);
        drop(silent);
        stop.cancel();
    }
}

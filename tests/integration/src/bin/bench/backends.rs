//! Backends (a TCP sink that counts, the harness's echoes) and the clients that measure through
//! them: bulk throughput, 64-byte ping-pong, connection setup.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;
use ztna_integration::loopback0;

use crate::util::{CpuOf, Samples};

pub const MIB: u64 = 1024 * 1024;
pub const MSG: usize = 64;
/// Write size of the TCP clients (what a socket-to-socket copy would use).
const WRITE: usize = 256 * 1024;

/// TCP sink: reads and discards; on EOF writes the connection's byte count (u64 BE). `received`
/// counts every byte of every connection as it arrives (for rates over a time window).
pub struct TcpSink {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
}

pub async fn tcp_sink() -> Result<TcpSink> {
    let l = TcpListener::bind(loopback0()).await?;
    let addr = l.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let received = r2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n as u64;
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(TcpSink { addr, received })
}

fn pattern() -> Vec<u8> {
    (0..WRITE as u32).map(|i| (i * 31 + 7) as u8).collect()
}

/// One bulk transfer's result.
#[derive(Clone, Copy, Default)]
pub struct Bulk {
    pub mib_s: f64,
    /// CPU seconds per GiB moved, of whatever `cpu` named.
    pub cpu_per_gib: f64,
}

/// Sends `mib` MiB to the sink at `addr` over one TCP connection, half-closes, verifies the
/// count; returns the rate and the CPU per GiB of `cpu`.
pub async fn throughput(addr: SocketAddr, mib: u64, cpu: &CpuOf) -> Result<Bulk> {
    let chunk = pattern();
    let total = mib * MIB;
    let mark = cpu.mark();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    let got = s.read_u64().await.context("reading sink count")?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_s = mark.since();
    if got != total {
        bail!("sink counted {got} bytes, sent {total}");
    }
    Ok(Bulk {
        mib_s: mib as f64 / secs,
        cpu_per_gib: cpu_s / (total as f64 / (1024.0 * MIB as f64)),
    })
}

/// Sends for `secs` over one TCP connection and returns (average MiB/s over the whole transfer,
/// steady MiB/s = what the sink received during the second half of the sending time, after
/// slow start).
pub async fn throughput_for(sink: &TcpSink, addr: SocketAddr, secs: f64) -> Result<(f64, f64)> {
    let chunk = pattern();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let half = Duration::from_secs_f64(secs / 2.0);
    let end = Duration::from_secs_f64(secs);
    let mut at_half: Option<(Instant, u64)> = None;
    let mut sent = 0u64;
    let mut steady = 0.0;
    let write = async {
        loop {
            let el = start.elapsed();
            if at_half.is_none() && el >= half {
                at_half = Some((Instant::now(), sink.received.load(Ordering::Relaxed)));
            }
            if el >= end {
                if let Some((t, b)) = at_half {
                    let got = sink.received.load(Ordering::Relaxed) - b;
                    steady = got as f64 / MIB as f64 / t.elapsed().as_secs_f64();
                }
                break;
            }
            s.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        anyhow::Ok(())
    };
    // A stalled path cannot hold the run: the whole transfer gets twice its time plus 20 s.
    timeout(Duration::from_secs_f64(secs * 2.0 + 20.0), write)
        .await
        .context("bulk transfer stalled")??;
    s.shutdown().await?;
    let got = timeout(Duration::from_secs(60), s.read_u64())
        .await
        .context("sink count never came")??;
    let secs_all = start.elapsed().as_secs_f64();
    if got != sent {
        bail!("sink counted {got} bytes, sent {sent}");
    }
    Ok((got as f64 / MIB as f64 / secs_all, steady))
}

/// One connection through a TCP echo: `warmup` then `rounds` sequential 64-byte round trips.
pub async fn tcp_rtt(addr: SocketAddr, warmup: usize, rounds: usize) -> Result<Samples> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let us = ping_pong(&mut wr, &mut rd, warmup, rounds, "tcp echo").await?;
    wr.shutdown().await?;
    Ok(us)
}

/// `warmup` then `rounds` sequential 64-byte round trips through an echo reached by `wr`/`rd`
/// (a TCP connection or a QUIC stream); each must come back unchanged within 5 s.
pub async fn ping_pong<W, R>(
    wr: &mut W,
    rd: &mut R,
    warmup: usize,
    rounds: usize,
    what: &str,
) -> Result<Samples>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let mut msg = [0u8; MSG];
    let mut back = [0u8; MSG];
    let mut us = Vec::with_capacity(rounds);
    for i in 0..warmup + rounds {
        msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let t = Instant::now();
        wr.write_all(&msg).await?;
        timeout(Duration::from_secs(5), rd.read_exact(&mut back))
            .await
            .with_context(|| format!("{what} timed out"))??;
        let dt = t.elapsed();
        if back != msg {
            bail!("{what} returned different bytes at round {i}");
        }
        if i >= warmup {
            us.push(dt.as_secs_f64() * 1e6);
        }
    }
    Ok(Samples::new(us))
}

/// Sends datagram `seq` and waits up to `wait` for its echo (stale echoes are skipped).
async fn udp_once(s: &UdpSocket, seq: u64, wait: Duration) -> Result<Option<Duration>> {
    let mut msg = [0u8; MSG];
    msg[..8].copy_from_slice(&seq.to_be_bytes());
    let mut buf = [0u8; 2048];
    let t = Instant::now();
    s.send(&msg).await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(n) = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await else {
            return Ok(None);
        };
        if n? == MSG && buf[..MSG] == msg {
            return Ok(Some(t.elapsed()));
        }
    }
}

/// Connected UDP client against a UDP echo: opens the flow, then `warmup` + `rounds` round trips
/// (1 s timeout each, at most 10 lost). Returns the samples and the number lost.
pub async fn udp_rtt(addr: SocketAddr, warmup: usize, rounds: usize) -> Result<(Samples, usize)> {
    let s = UdpSocket::bind(loopback0()).await?;
    s.connect(addr).await?;
    let mut seq = 0u64;
    let open = Instant::now();
    while udp_once(&s, seq, Duration::from_millis(200))
        .await?
        .is_none()
    {
        seq += 1;
        if open.elapsed() > Duration::from_secs(10) {
            bail!("udp flow to {addr} never opened");
        }
    }
    let (mut us, mut lost) = (Vec::with_capacity(rounds), 0);
    for i in 0..warmup + rounds {
        seq += 1;
        let r = udp_once(&s, seq, Duration::from_secs(1)).await?;
        match (i >= warmup, r) {
            (true, Some(dt)) => us.push(dt.as_secs_f64() * 1e6),
            (true, None) => lost += 1,
            _ => {}
        }
        if lost >= 10 {
            break;
        }
    }
    Ok((Samples::new(us), lost))
}

/// New-connection setup as a user sees it: TCP connect to `addr` (a TCP echo, directly or
/// through an agent's local port), write 64 bytes, time until they come back; `rounds` times,
/// one after the other.
pub async fn tcp_setup(addr: SocketAddr, warmup: usize, rounds: usize) -> Result<Samples> {
    let mut us = Vec::with_capacity(rounds);
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    for i in 0..warmup + rounds {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&msg).await?;
        timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .context("first echo timed out")??;
        let dt = t.elapsed();
        if i >= warmup {
            us.push(dt.as_secs_f64() * 1e6);
        }
        s.shutdown().await?;
        let mut rest = Vec::new();
        let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    Ok(Samples::new(us))
}

//! `ztna-bench`: prints relay-vs-direct numbers for one agent → intermediate → connector chain,
//! all in-process on loopback. Not a test; bounded in time.
//!
//! Run: `cargo run --release -p ztna-integration --bin ztna-bench [-- --mib N]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

const MIB: u64 = 1024 * 1024;
const MSG: usize = 64;
const ROUNDS: usize = 2000;
const WARMUP: usize = 100;
const MAX_LOST: usize = 10;
const STEP_LIMIT: Duration = Duration::from_secs(30);

/// TCP sink backend: reads and discards everything; on EOF writes the byte count (u64 BE).
async fn tcp_sink() -> Result<SocketAddr> {
    let l = TcpListener::bind(loopback0()).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Sends `mib` MiB to the sink at `addr`, half-closes, verifies the count; returns MiB/s.
async fn throughput(addr: SocketAddr, mib: u64) -> Result<f64> {
    let chunk: Vec<u8> = (0..MIB as u32).map(|i| (i * 31 + 7) as u8).collect();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    for _ in 0..mib {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let got = s.read_u64().await.context("reading sink count")?; // big-endian
    let secs = start.elapsed().as_secs_f64();
    if got != mib * MIB {
        bail!("sink counted {got} bytes, sent {}", mib * MIB);
    }
    Ok(mib as f64 / secs)
}

/// Round-trip samples in microseconds, sorted; `lost` is `Some` for UDP.
struct Rtt(Vec<f64>, Option<usize>);

impl Rtt {
    fn new(mut us: Vec<f64>, lost: Option<usize>) -> Rtt {
        us.sort_by(f64::total_cmp);
        Rtt(us, lost)
    }
    fn show(&self) -> String {
        let v = &self.0;
        let pct = |p: usize| v.get((v.len() * p / 100).min(v.len().saturating_sub(1)));
        let f = |x: Option<&f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
        let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let (p50, p99, mean) = (f(pct(50)), f(pct(99)), f(mean.as_ref()));
        let mut s = format!("p50 {p50} p99 {p99} mean {mean}");
        if let Some(lost) = self.1 {
            s.push_str(&format!(" lost {lost}/{}", v.len() + lost));
        }
        s
    }
}

fn row(name: &str, relay: &str, direct: &str) {
    println!("{name:<20}relay  {relay:<42} direct {direct}");
}

/// One connection through the TCP echo: WARMUP then ROUNDS sequential 64-byte round trips.
async fn tcp_rtt(addr: SocketAddr) -> Result<Rtt> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut msg = [0u8; MSG];
    let mut back = [0u8; MSG];
    let mut us = Vec::with_capacity(ROUNDS);
    for i in 0..WARMUP + ROUNDS {
        msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let t = Instant::now();
        s.write_all(&msg).await?;
        timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .context("tcp echo timed out")??;
        let dt = t.elapsed();
        if back != msg {
            bail!("tcp echo returned different bytes at round {i}");
        }
        if i >= WARMUP {
            us.push(dt.as_secs_f64() * 1e6);
        }
    }
    s.shutdown().await?;
    Ok(Rtt::new(us, None))
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
        } // otherwise a late echo of an earlier datagram: keep waiting
    }
}

/// Connected UDP client: opens the flow, WARMUP, then ROUNDS round trips with 1 s timeout each.
/// Gives up after MAX_LOST losses so the run stays bounded (the sent count shows it).
async fn udp_rtt(addr: SocketAddr) -> Result<Rtt> {
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
    let (mut us, mut lost) = (Vec::with_capacity(ROUNDS), 0);
    for i in 0..WARMUP + ROUNDS {
        seq += 1;
        let r = udp_once(&s, seq, Duration::from_secs(1)).await?;
        match (i >= WARMUP, r) {
            (true, Some(dt)) => us.push(dt.as_secs_f64() * 1e6),
            (true, None) => lost += 1,
            _ => {}
        }
        if lost >= MAX_LOST {
            break;
        }
    }
    Ok(Rtt::new(us, Some(lost)))
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    timeout(STEP_LIMIT, f)
        .await
        .with_context(|| format!("{what}: over {STEP_LIMIT:?}"))?
        .with_context(|| what.to_string())
}

fn parse_mib() -> Result<u64> {
    let mut mib = 256;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => {
                let v = args.next().context("--mib needs a value")?;
                mib = v.parse().with_context(|| format!("bad --mib {v:?}"))?;
            }
            other => bail!("unknown argument {other:?} (usage: ztna-bench [--mib N])"),
        }
    }
    if mib == 0 {
        bail!("--mib must be > 0");
    }
    Ok(mib)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mib = parse_mib()?;
    logs();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug (WARNING: debug_assertions on; numbers are not representative, use --release)"
    } else {
        "release"
    };
    println!("ztna-bench: nproc {nproc}, tokio worker_threads 2, profile {profile}");
    println!(
        "tcp throughput: one flow, {mib} MiB to a sink; rtt: {ROUNDS} sequential 64B round trips \
         after {WARMUP} warmup; relay = via agent/intermediate/connector, direct = to the backend"
    );

    let pki = Pki::new();
    let (echo_tcp, echo_task) = tcp_echo().await;
    let (echo_udp, _seen, echo_udp_task) = udp_echo().await;
    let sink = tcp_sink().await?;
    let im = start_intermediate(&pki, open_policy(&["echo", "sink"]));
    let services = [
        ("echo", Some(echo_tcp), Some(echo_udp)),
        ("sink", Some(sink), None),
    ];
    let mut c = start_connector(&pki, "bench-1", &[im.addr], &services);
    c.wait_registered(1).await;
    let forwards = [
        ("echo", ForwardProtocol::Tcp),
        ("echo", ForwardProtocol::Udp),
        ("sink", ForwardProtocol::Tcp),
    ];
    let mut a = start_agent(&pki, "bench", &[im.addr], &forwards).await;
    a.wait_status("echo", ServiceState::Available).await;
    a.wait_status("sink", ServiceState::Available).await;
    let (relay_sink, relay_tcp, relay_udp) = (
        a.port("sink", Protocol::Tcp),
        a.port("echo", Protocol::Tcp),
        a.port("echo", Protocol::Udp),
    );

    let r = step("relay tcp throughput", throughput(relay_sink, mib)).await?;
    let d = step("direct tcp throughput", throughput(sink, mib)).await?;
    let (r, d) = (format!("{r:.1} MiB/s"), format!("{d:.1} MiB/s"));
    row("tcp throughput", &r, &d);

    let r = step("relay tcp rtt", tcp_rtt(relay_tcp)).await?;
    let d = step("direct tcp rtt", tcp_rtt(echo_tcp)).await?;
    row("tcp rtt 64B (us)", &r.show(), &d.show());

    let r = step("relay udp rtt", udp_rtt(relay_udp)).await?;
    let d = step("direct udp rtt", udp_rtt(echo_udp)).await?;
    row("udp rtt 64B (us)", &r.show(), &d.show());

    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
    echo_task.abort();
    echo_udp_task.abort();
    Ok(())
}

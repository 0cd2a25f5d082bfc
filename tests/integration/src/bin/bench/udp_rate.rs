//! UDP at a fixed offered rate: a paced sender (its own thread, timestamps and sequence numbers
//! in every datagram) and a counting sink (the connector's backend, its own thread). Each run
//! is split into phases (e.g. before, during and after a lossy burst), counted separately.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::util::Samples;

/// Header of every datagram: run id, phase, sequence number, send time (ns since EPOCH).
const HEADER: usize = 4 + 1 + 8 + 8;
pub const PHASES: usize = 4;
/// Phase 0 is the warm-up that opens the flow; it is not counted.
const WARMUP: u8 = 0;

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The UDP backend that counts what arrives.
pub struct UdpSink {
    pub addr: SocketAddr,
    sock: Arc<UdpSocket>,
}

impl UdpSink {
    pub fn bind() -> Result<UdpSink> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        // As large as rmem_max allows: the sink must not be the bottleneck.
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(8 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        Ok(UdpSink {
            addr,
            sock: Arc::new(sock),
        })
    }
}

/// Counts of one run, per phase.
#[derive(Default, Clone)]
pub struct RateResult {
    pub sent: [u64; PHASES],
    pub received: [u64; PHASES],
    /// Offered rate actually achieved by the sender, Mbit/s of payload, per phase.
    pub offered_mbit: [f64; PHASES],
    pub send_errors: u64,
    /// One-way latency of the datagrams received in the measured phases (µs).
    pub latency: Samples,
}

impl RateResult {
    pub fn delivered(&self, phase: usize) -> f64 {
        if self.sent[phase] == 0 {
            return f64::NAN;
        }
        self.received[phase] as f64 / self.sent[phase] as f64
    }
}

/// Sends from one socket (one flow) to `target` and counts at `sink`: opens the flow with a
/// warm-up, then for each `(phase, duration)` of `phases` sends `size`-byte datagrams at
/// `bits_per_s` (payload bits), awaiting `at_phase(phase)` as each phase starts.
pub async fn run<F, Fut>(
    target: SocketAddr,
    sink: &UdpSink,
    run_id: u32,
    size: usize,
    bits_per_s: f64,
    phases: &[(u8, Duration)],
    mut at_phase: F,
) -> Result<RateResult>
where
    F: FnMut(u8) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if size < HEADER {
        bail!("datagrams must be at least {HEADER} bytes");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let warm = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (sock, stop, warm) = (sink.sock.clone(), stop.clone(), warm.clone());
        std::thread::Builder::new()
            .name("bench-usink".into())
            .spawn(move || receive(&sock, run_id, &stop, &warm))?
    };
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
    let _ = socket2::SockRef::from(&*sock).set_send_buffer_size(4 << 20);
    sock.connect(target)?;
    let result = async {
        // Warm-up: one datagram every 10 ms until the sink has seen one (the flow is open),
        // for at most 5 s.
        let (s, w) = (sock.clone(), warm.clone());
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; size];
            for seq in 0..500u64 {
                if w.load(Ordering::Relaxed) > 0 {
                    break;
                }
                fill(&mut buf, run_id, WARMUP, seq);
                let _ = s.send(&buf);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut r = RateResult::default();
        for &(phase, dur) in phases {
            at_phase(phase).await;
            let s = sock.clone();
            let (sent, errors, secs) = tokio::task::spawn_blocking(move || {
                paced(&s, run_id, phase, size, bits_per_s, dur)
            })
            .await?;
            let p = phase as usize;
            r.sent[p] += sent;
            r.send_errors += errors;
            r.offered_mbit[p] = sent as f64 * size as f64 * 8.0 / secs / 1e6;
        }
        // Let what is in flight arrive.
        tokio::time::sleep(Duration::from_millis(700)).await;
        anyhow::Ok(r)
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let (received, latency) = tokio::task::spawn_blocking(move || receiver.join())
        .await?
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
    let mut r = result?;
    r.received = received;
    r.latency = Samples::new(latency);
    Ok(r)
}

fn fill(buf: &mut [u8], run: u32, phase: u8, seq: u64) {
    buf[..4].copy_from_slice(&run.to_be_bytes());
    buf[4] = phase;
    buf[5..13].copy_from_slice(&seq.to_be_bytes());
    buf[13..21].copy_from_slice(&now_ns().to_be_bytes());
}

/// Sends at `bits_per_s` for `dur`, in slots of 250 µs; a sender that falls behind by more
/// than 5 ms of traffic (CPU starved) skips ahead instead of bursting. Returns (sent, send
/// errors, seconds).
fn paced(
    sock: &UdpSocket,
    run: u32,
    phase: u8,
    size: usize,
    bits_per_s: f64,
    dur: Duration,
) -> (u64, u64, f64) {
    let pps = bits_per_s / (size as f64 * 8.0);
    let cap = (pps * 0.005).max(1.0) as u64;
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    let (mut sent, mut skipped, mut errors) = (0u64, 0u64, 0u64);
    loop {
        let el = start.elapsed();
        if el >= dur {
            break;
        }
        let due = ((el.as_secs_f64() * pps) as u64).saturating_sub(skipped);
        if due > sent + cap {
            skipped += due - sent - cap;
        }
        let due = ((el.as_secs_f64() * pps) as u64).saturating_sub(skipped);
        while sent < due {
            fill(&mut buf, run, phase, sent);
            if sock.send(&buf).is_err() {
                errors += 1;
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(250));
    }
    (sent, errors, start.elapsed().as_secs_f64())
}

/// The sink's thread: counts this run's datagrams per phase until told to stop (or 10 min).
fn receive(
    sock: &UdpSocket,
    run: u32,
    stop: &AtomicBool,
    warm: &AtomicU64,
) -> ([u64; PHASES], Vec<f64>) {
    let mut counts = [0u64; PHASES];
    let mut latency = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        if n < HEADER || buf[..4] != run.to_be_bytes() {
            continue;
        }
        let phase = buf[4] as usize;
        if phase >= PHASES {
            continue;
        }
        counts[phase] += 1;
        if phase == WARMUP as usize {
            warm.fetch_add(1, Ordering::Relaxed);
        } else {
            let sent = u64::from_be_bytes(buf[13..21].try_into().unwrap_or_default());
            latency.push(now_ns().saturating_sub(sent) as f64 / 1e3);
        }
    }
    (counts, latency)
}

//! An in-process UDP delay proxy (netem is not available here): every datagram is held for a
//! fixed one-way delay in each direction, and a settable fraction is dropped on arrival, one by
//! one or in runs of consecutive datagrams (as a full queue drops them), and datagrams above a
//! settable size are dropped (a link with a smaller MTU), and a settable rate is enforced in each
//! direction by dropping what exceeds it (a policer: a link slower than the daemons).
//! Clients talk to `addr`; each client address gets its own upstream socket (like a NAT), so
//! the server sees one address per client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::loopback0;
use anyhow::Result;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes a delay line may hold before it drops (a 1 Gbit/s stream for half a second).
const MAX_QUEUED: u64 = 64 * 1024 * 1024;

#[derive(Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    /// Dropped on purpose (the loss setting).
    pub lost: AtomicU64,
    /// Dropped because a delay line was full.
    pub overflow: AtomicU64,
    /// Dropped for being larger than the path's MTU setting.
    pub too_big: AtomicU64,
    /// Dropped for exceeding the rate setting.
    pub policed: AtomicU64,
}

#[derive(Clone)]
struct Shared {
    delay: Duration,
    /// Loss in parts per million, applied to both directions.
    loss_ppm: Arc<AtomicU32>,
    /// Longest run of consecutive drops (runs are 1..=this long, uniformly).
    max_run: Arc<AtomicU32>,
    /// Largest UDP payload passed, both directions (0: no limit).
    max_size: Arc<AtomicUsize>,
    /// Bytes per second passed in each direction (0: no limit).
    rate: Arc<AtomicU64>,
    stats: Arc<ProxyStats>,
    queued: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Shared,
}

impl Proxy {
    /// Sets the loss (0.0–1.0) from now on, in runs of 1..=`max_run` consecutive datagrams
    /// (1: independent drops).
    pub fn set_loss(&self, fraction: f64, max_run: u32) {
        self.shared.max_run.store(max_run.max(1), Ordering::Relaxed);
        let ppm = (fraction.clamp(0.0, 1.0) * 1e6) as u32;
        self.shared.loss_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Drops every datagram with a UDP payload above `bytes`, both ways, from now on (a path
    /// MTU of `bytes` + 28 on IPv4); 0 lifts the limit.
    pub fn set_max_datagram(&self, bytes: usize) {
        self.shared.max_size.store(bytes, Ordering::Relaxed);
    }

    /// Passes at most `bytes_per_sec` of UDP payload per second in each direction from now on,
    /// with bursts of up to 64 KiB, and drops the rest; 0 lifts the limit.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in ztna_node::lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

/// Starts a proxy in front of `upstream` with `one_way` delay per direction.
pub async fn start(upstream: SocketAddr, one_way: Duration) -> Result<Proxy> {
    let front = Arc::new(big_buffers(UdpSocket::bind(loopback0()).await?));
    let addr = front.local_addr()?;
    let shared = Shared {
        delay: one_way,
        loss_ppm: Arc::default(),
        max_run: Arc::new(AtomicU32::new(1)),
        max_size: Arc::default(),
        rate: Arc::default(),
        stats: Arc::default(),
        queued: Arc::default(),
        tasks: Arc::default(),
    };
    let s2 = shared.clone();
    let task = tokio::spawn(async move {
        let mut uplinks: HashMap<SocketAddr, mpsc::UnboundedSender<(Instant, Bytes)>> =
            HashMap::new();
        let mut rng = Loss::new(0x9e37_79b9_7f4a_7c15);
        let mut policer = Policer::default();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            if !s2.admit(&mut rng, &mut policer, n) {
                continue;
            }
            let tx = match uplinks.get(&from) {
                Some(tx) => tx.clone(),
                None => {
                    let Ok(tx) = s2.open_client(&front, from, upstream).await else {
                        continue;
                    };
                    uplinks.insert(from, tx.clone());
                    tx
                }
            };
            let due = Instant::now() + s2.delay;
            let _ = tx.send((due, Bytes::copy_from_slice(&buf[..n])));
        }
    });
    ztna_node::lock(&shared.tasks).push(task);
    Ok(Proxy { addr, shared })
}

impl Shared {
    /// Applies the MTU, rate and loss settings and the queue bound to a datagram of `n` bytes
    /// (`policer`: its direction's).
    fn admit(&self, loss: &mut Loss, policer: &mut Policer, n: usize) -> bool {
        let max = self.max_size.load(Ordering::Relaxed);
        if max > 0 && n > max {
            self.stats.too_big.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !policer.admit(self.rate.load(Ordering::Relaxed), n) {
            self.stats.policed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let (ppm, max_run) = (
            self.loss_ppm.load(Ordering::Relaxed),
            self.max_run.load(Ordering::Relaxed),
        );
        if loss.drop(ppm, max_run) {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.queued.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > MAX_QUEUED {
            self.queued.fetch_sub(n as u64, Ordering::Relaxed);
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// A new client: its upstream socket, the delay line towards the server, and the reader of
    /// the server's answers with its delay line back to the client.
    async fn open_client(
        &self,
        front: &Arc<UdpSocket>,
        client: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<mpsc::UnboundedSender<(Instant, Bytes)>> {
        let up = Arc::new(big_buffers(UdpSocket::bind(loopback0()).await?));
        up.connect(upstream).await?;
        let (up_tx, up_rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
        let (down_tx, down_rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
        let mut tasks = Vec::new();
        let (me, sock) = (self.clone(), up.clone());
        tasks.push(tokio::spawn(me.delay_line(up_rx, move |b| {
            let sock = sock.clone();
            async move {
                let _ = sock.send(&b).await;
            }
        })));
        let (me, sock) = (self.clone(), front.clone());
        tasks.push(tokio::spawn(me.delay_line(down_rx, move |b| {
            let sock = sock.clone();
            async move {
                let _ = sock.send_to(&b, client).await;
            }
        })));
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Loss::new(u64::from(client.port()) << 32 | 0x2545_f491);
            let mut policer = Policer::default();
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = up.recv(&mut buf).await {
                if me.admit(&mut rng, &mut policer, n) {
                    let due = Instant::now() + me.delay;
                    let _ = down_tx.send((due, Bytes::copy_from_slice(&buf[..n])));
                }
            }
        }));
        ztna_node::lock(&self.tasks).extend(tasks);
        Ok(up_tx)
    }

    /// Releases each datagram at its due time, in order (the delay is the same for all).
    async fn delay_line<F, Fut>(self, mut rx: mpsc::UnboundedReceiver<(Instant, Bytes)>, send: F)
    where
        F: Fn(Bytes) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while let Some((due, b)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let n = b.len() as u64;
            send(b).await;
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The emulated path itself must not lose datagrams: buffers as large as the system allows.
fn big_buffers(s: UdpSocket) -> UdpSocket {
    let r = socket2::SockRef::from(&s);
    let _ = r.set_recv_buffer_size(4 << 20);
    let _ = r.set_send_buffer_size(4 << 20);
    s
}

/// A token bucket for one direction: `rate` bytes a second, bursts up to [`BURST`].
#[derive(Default)]
struct Policer {
    tokens: f64,
    last: Option<std::time::Instant>,
}

/// Largest burst a policer passes at once.
const BURST: f64 = 64.0 * 1024.0;

impl Policer {
    fn admit(&mut self, rate: u64, n: usize) -> bool {
        if rate == 0 {
            self.last = None;
            return true;
        }
        let now = std::time::Instant::now();
        let elapsed = self
            .last
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.tokens = match self.last {
            None => BURST,
            Some(_) => (self.tokens + elapsed * rate as f64).min(BURST),
        };
        self.last = Some(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// Loss of one direction: a run of 1..=max_run consecutive datagrams starts with the probability
/// that makes the long-run fraction `ppm`.
struct Loss {
    rng: Rng,
    /// Datagrams left to drop in the current run.
    left: u32,
}

impl Loss {
    fn new(seed: u64) -> Loss {
        Loss {
            rng: Rng(seed | 1),
            left: 0,
        }
    }

    fn drop(&mut self, ppm: u32, max_run: u32) -> bool {
        if ppm == 0 {
            self.left = 0;
            return false;
        }
        if self.left > 0 {
            self.left -= 1;
            return true;
        }
        // fraction = r·L / (1 + r·L) for runs starting with probability r, mean length L.
        let f = f64::from(ppm.min(999_999)) / 1e6;
        let mean_run = (1.0 + f64::from(max_run)) / 2.0;
        let start = f / ((1.0 - f) * mean_run);
        if f64::from(self.rng.below(1_000_000)) < start * 1e6 {
            self.left = self.rng.below(max_run);
            return true;
        }
        false
    }
}

/// xorshift64*: enough randomness for dropping packets, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(n)) as u32
    }
}

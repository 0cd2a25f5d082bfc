//! Scale: N agent connections with distinct identities from this process against one
//! intermediate process. Each connection behaves like an agent's link to its relay (the same
//! client config and transport options, Hello with an empty watch list, the agent's reconnect
//! schedule: poll at about a second after a drain, exponential backoff after a failure).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;
use ztna_integration::*;
use ztna_node::backoff::{BackoffPolicy, Reconnect, CONNECT_TIMEOUT};
use ztna_node::transport::TransportOptions;
use ztna_node::{client, CancellationToken, Identity};
use ztna_pki::IssueRequest;
use ztna_proto::{Role, ServerMsg};

use crate::relays::{eventually_async, Bins};
use crate::util::{proc_cpu, rss_kib, scrape, udp_socket_drops};

/// Initial connections in flight at once (the first connect is a ramp, not a storm).
const RAMP_CONCURRENCY: usize = 128;

pub struct Opts {
    pub agents: usize,
    pub per_socket: usize,
    /// Loopback addresses the client sockets send from (1: every agent behind one NAT).
    pub sources: usize,
    pub quiet: Duration,
    /// Keepalive of both sides (idle timeout 3x, at least 5 s); `None` = shipped defaults.
    pub keepalive: Option<Duration>,
}

/// The idle timeout that goes with a keepalive: three missed keepalives, at least 5 s.
fn idle_for(keepalive: Duration) -> Duration {
    (keepalive * 3).max(Duration::from_secs(5))
}

/// Connection attempts and how they failed.
#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    /// `timed_out` split by [`Stage`].
    stages: [AtomicU64; Stage::ALL.len()],
    other: AtomicU64,
    /// Welcomed only after more than [`CONNECT_TIMEOUT`] (the intermediate had confirmed the
    /// handshake, so `client::hello` waited on instead of starting over).
    welcomed_late: AtomicU64,
}

impl Counts {
    fn load(&self) -> Failures {
        Failures {
            attempts: self.attempts.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            stages: std::array::from_fn(|i| self.stages[i].load(Ordering::Relaxed)),
            other: self.other.load(Ordering::Relaxed),
            welcomed_late: self.welcomed_late.load(Ordering::Relaxed),
        }
    }
    fn fail(&self, kind: &Fail) {
        let counter = match kind {
            Fail::Refused(_) => &self.refused,
            Fail::TimedOut(stage) => {
                self.stages[*stage as usize].fetch_add(1, Ordering::Relaxed);
                &self.timed_out
            }
            Fail::Other(_) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Stats {
    up: AtomicUsize,
    all: Counts,
    /// The same for attempts that *started* after the mark (the restarted process was spawned).
    /// An attempt that began earlier failed against the old, draining process (its refusal) or
    /// an unbound port, whenever its failure was counted.
    late: Counts,
    mark: OnceLock<Instant>,
    last_other: Mutex<String>,
    last_refused: Mutex<String>,
}

#[derive(Clone, Copy, Default)]
struct Failures {
    attempts: u64,
    refused: u64,
    timed_out: u64,
    stages: [u64; Stage::ALL.len()],
    other: u64,
    welcomed_late: u64,
}

impl Stats {
    fn after_mark(&self, started: Instant) -> bool {
        self.mark.get().is_some_and(|m| started >= *m)
    }
    /// An attempt starts now; returns its start for [`Stats::fail`].
    fn attempt(&self) -> Instant {
        let now = Instant::now();
        self.all.attempts.fetch_add(1, Ordering::Relaxed);
        if self.after_mark(now) {
            self.late.attempts.fetch_add(1, Ordering::Relaxed);
        }
        now
    }
    fn welcomed_late(&self, started: Instant) {
        self.all.welcomed_late.fetch_add(1, Ordering::Relaxed);
        if self.after_mark(started) {
            self.late.welcomed_late.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn fail(&self, kind: Fail, started: Instant) {
        self.all.fail(&kind);
        if self.after_mark(started) {
            self.late.fail(&kind);
        }
        match kind {
            Fail::Refused(why) => *ztna_node::lock(&self.last_refused) = why,
            Fail::Other(why) => *ztna_node::lock(&self.last_other) = why,
            Fail::TimedOut(_) => {}
        }
    }
}

impl std::ops::Sub for Failures {
    type Output = Failures;
    fn sub(self, o: Failures) -> Failures {
        Failures {
            attempts: self.attempts - o.attempts,
            refused: self.refused - o.refused,
            timed_out: self.timed_out - o.timed_out,
            stages: std::array::from_fn(|i| self.stages[i] - o.stages[i]),
            other: self.other - o.other,
            welcomed_late: self.welcomed_late - o.welcomed_late,
        }
    }
}

enum Fail {
    Refused(String),
    TimedOut(Stage),
    Other(String),
}

/// Where a timed-out attempt gave up.
#[derive(Clone, Copy)]
enum Stage {
    /// Nothing came back within [`CONNECT_TIMEOUT`].
    Silent,
    /// The relay answered (a Retry or part of a handshake) but the handshake did not complete
    /// within [`ztna_node::backoff::ANSWERED_CONNECT_TIMEOUT`].
    Answered,
    /// QUIC's idle timeout ended the handshake (nothing from the relay for that long).
    Idle,
    /// Connected, but the relay had not confirmed the handshake when `client::hello` gave up
    /// (after [`CONNECT_TIMEOUT`]).
    Unconfirmed,
    /// Connected and confirmed, but no Welcome in time (`client::hello`).
    Hello,
}

impl Stage {
    const ALL: [(Stage, &'static str); 5] = [
        (Stage::Silent, "no answer"),
        (Stage::Answered, "answered, handshake too slow"),
        (Stage::Idle, "QUIC idle timeout in the handshake"),
        (Stage::Unconfirmed, "handshake never confirmed"),
        (Stage::Hello, "confirmed, no Welcome"),
    ];
}

/// What the scale run found (None where a phase did not get that far).
#[derive(Default)]
pub struct Report {
    pub agents: usize,
    pub sockets: usize,
    pub issue_secs: f64,
    pub connected: usize,
    pub connect_secs: f64,
    pub rss_base_kib: f64,
    pub rss_full_kib: f64,
    pub kib_per_conn: Option<f64>,
    pub quiet_cpu_pct: Option<f64>,
    pub generator_cpu_pct: Option<f64>,
    pub storm_exit_secs: Option<f64>,
    /// From the new process's start until all N are connected again.
    pub storm_secs: Option<f64>,
    /// CPU (% of one core) of the new intermediate and of the load generator until all were
    /// back.
    pub storm_cpu_pct: (Option<f64>, Option<f64>),
    /// Datagrams the kernel dropped at full UDP receive buffers until all were back: the new
    /// intermediate's socket, the load generator's.
    pub storm_socket_drops: (u64, u64),
    /// Intermediate CPU milliseconds per connection during the initial ramp (handshake cost).
    pub ramp_cpu_ms_per_conn: Option<f64>,
    /// From SIGTERM until all N are connected again.
    pub storm_total_secs: Option<f64>,
    pub storm_reconnected: usize,
    pub storm: String,
    /// Failed attempts among those that started after the restarted process was spawned.
    pub storm_failed: u64,
    /// Failures counted after the spawn, whenever their attempt started (includes refusals by
    /// the old, draining process and attempts sent before anything listened again).
    pub storm_failed_counted_after: u64,
    pub rss_after_storm_kib: Option<f64>,
    pub rss_after_leave_kib: Option<f64>,
    /// Seconds from the last agent session's end until the intermediate's QUIC connections had
    /// all drained (closed connections stay for 3 PTO, with their memory); None: not measured
    /// (a build without `ztna_intermediate_quic_connections`, or not drained within 60 s).
    pub drained_secs: Option<f64>,
    /// Fraction of the connections' memory given back after they left (and drained).
    pub returned: Option<f64>,
    /// RSS once all of them connected again after leaving.
    pub rss_rejoined_kib: Option<f64>,
    /// The same idle connections held by a bare quinn server (see [`crate::quinn_anchor`]).
    pub anchor: Option<Anchor>,
    pub notes: Vec<String>,
}

/// What N idle connections cost a bare quinn server with the intermediate's configuration.
#[derive(Default)]
pub struct Anchor {
    pub connected: usize,
    pub connect_secs: f64,
    pub ramp_cpu_ms_per_conn: Option<f64>,
    pub rss_base_kib: f64,
    pub rss_full_kib: f64,
    pub kib_per_conn: Option<f64>,
    pub quiet_cpu_pct: Option<f64>,
    pub generator_cpu_pct: Option<f64>,
}

pub async fn run(pki: Arc<Pki>, bins: &Bins, opts: &Opts) -> Result<Report> {
    let n = opts.agents;
    let mut rep = Report {
        agents: n,
        ..Report::default()
    };
    let nofile = ztna_node::fdlimit::raise_nofile();
    let sockets = n.div_ceil(opts.per_socket.max(1));
    rep.sockets = sockets;
    if sockets as u64 + 256 > nofile {
        rep.notes.push(format!(
            "descriptor limit {nofile} is too low for {sockets} sockets"
        ));
    }

    // The intermediate, with the keepalive and timeouts of a default deployment.
    let listen = free_udp_port();
    let ops = free_tcp_port();
    let cfg_path = intermediate_file(&pki, "im-scale", listen, ops, &["echo"]);
    if let Some(k) = opts.keepalive {
        // Top-level keys go before the file's tables. The intermediate's own keepalive stays
        // unset: a backstop at 4/5 of its idle timeout, as an operator would leave it.
        let text = std::fs::read_to_string(&cfg_path).context("read scale config")?;
        let keys = format!("idle_timeout = \"{}ms\"\n", idle_for(k).as_millis());
        std::fs::write(&cfg_path, keys + &text).context("write scale config")?;
    }
    // The anchor first: as many connections held by bare quinn, in a process of its own. Its
    // clients are configs of their own, so that no TLS session they cached reaches the
    // intermediate's handshakes.
    let anchor_configs = issue(pki.clone(), n, opts.keepalive).await?;
    match anchor(
        &cfg_path,
        &anchor_configs,
        sockets,
        opts.sources,
        opts.quiet,
    )
    .await
    {
        Ok(a) => rep.anchor = Some(a),
        Err(e) => rep.notes.push(format!("the quinn anchor failed: {e:#}")),
    }
    drop(anchor_configs);

    // N identities, each with its own client config (as N agents would have).
    let t = Instant::now();
    let configs = issue(pki.clone(), n, opts.keepalive).await?;
    rep.issue_secs = t.elapsed().as_secs_f64();

    let mut im = bins.spawn("intermediate", "intermediate-scale", &cfg_path);
    if !wait_ready(ops, Duration::from_secs(15)).await {
        bail!("scale intermediate did not become ready\n{}", im.tail(20));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    rep.rss_base_kib = rss_kib(im.pid()).unwrap_or(0.0);

    let mut endpoints = Vec::with_capacity(sockets);
    for i in 0..sockets {
        match generator_endpoint(i, opts.sources) {
            Ok(ep) => endpoints.push(ep),
            Err(e) => {
                rep.notes.push(format!(
                    "could open only {} of {sockets} client sockets: {e}",
                    endpoints.len()
                ));
                break;
            }
        }
    }
    if endpoints.is_empty() {
        bail!("no client socket");
    }

    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let ramp = Arc::new(Semaphore::new(RAMP_CONCURRENCY));
    let me = std::process::id();
    let ramp_cpu = proc_cpu(im.pid());
    let t = Instant::now();
    // One task per agent identity, spread over the generator's sockets.
    let spawn_all = |stop: &CancellationToken| -> Vec<tokio::task::JoinHandle<()>> {
        configs
            .iter()
            .enumerate()
            .map(|(i, cfg)| {
                let ep = endpoints[i % endpoints.len()].clone();
                tokio::spawn(agent(
                    ep,
                    cfg.clone(),
                    listen,
                    stats.clone(),
                    stop.clone(),
                    ramp.clone(),
                ))
            })
            .collect()
    };
    let tasks = spawn_all(&stop);
    let all_up = |limit: Duration| {
        let stats = stats.clone();
        async move {
            eventually_async(limit, || {
                let s = stats.clone();
                async move { s.up.load(Ordering::Relaxed) >= n }
            })
            .await
        }
    };
    let ok = all_up(Duration::from_secs(240)).await;
    rep.connect_secs = t.elapsed().as_secs_f64();
    rep.connected = stats.up.load(Ordering::Relaxed);
    if let (Some(a), Some(b)) = (ramp_cpu, proc_cpu(im.pid())) {
        rep.ramp_cpu_ms_per_conn = Some((b - a) * 1e3 / rep.connected.max(1) as f64);
    }
    if !ok {
        rep.notes.push(format!(
            "only {} of {n} connected within 240 s (last other error: {})",
            rep.connected,
            ztna_node::lock(&stats.last_other)
        ));
    }

    // Quiet: keepalives only.
    tokio::time::sleep(Duration::from_secs(3)).await;
    rep.rss_full_kib = rss_kib(im.pid()).unwrap_or(0.0);
    let up = stats.up.load(Ordering::Relaxed);
    if up > 0 {
        rep.kib_per_conn = Some((rep.rss_full_kib - rep.rss_base_kib) / up as f64);
    }
    let (c0, g0, t0) = (proc_cpu(im.pid()), proc_cpu(me), Instant::now());
    tokio::time::sleep(opts.quiet).await;
    let secs = t0.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (c0, proc_cpu(im.pid())) {
        rep.quiet_cpu_pct = Some((b - a) / secs * 100.0);
    }
    if let (Some(a), Some(b)) = (g0, proc_cpu(me)) {
        rep.generator_cpu_pct = Some((b - a) / secs * 100.0);
    }

    // Reconnect storm: SIGTERM (drain: GoAway, close), wait for the exit, start again.
    let before = stats.all.load();
    let h_before = scrape(ops).await;
    let t_term = Instant::now();
    im.signal("TERM");
    if im.wait_exit(Duration::from_secs(60)).await.is_none() {
        rep.notes
            .push("the intermediate did not exit within 60 s of SIGTERM".into());
    }
    rep.storm_exit_secs = Some(t_term.elapsed().as_secs_f64());
    drop(im);
    let at_start = stats.all.load();
    let _ = stats.mark.set(Instant::now());
    let t_start = Instant::now();
    let g_start = proc_cpu(me);
    let g_drops = udp_socket_drops(me);
    let im2 = bins.spawn("intermediate", "intermediate-scale-2", &cfg_path);
    // The new process's socket drops, sampled until all are back (its sockets die with it).
    let im_drops = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pid, d) = (im2.pid(), im_drops.clone());
        tokio::spawn(async move {
            for _ in 0..2400 {
                d.fetch_max(udp_socket_drops(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let ok = all_up(Duration::from_secs(120)).await;
    sampler.abort();
    rep.storm_socket_drops = (
        im_drops
            .load(Ordering::Relaxed)
            .max(udp_socket_drops(im2.pid())),
        udp_socket_drops(me).saturating_sub(g_drops),
    );
    let storm_secs = t_start.elapsed().as_secs_f64();
    rep.storm_cpu_pct = (
        proc_cpu(im2.pid()).map(|c| c / storm_secs * 100.0),
        g_start
            .zip(proc_cpu(me))
            .map(|(a, b)| (b - a) / storm_secs * 100.0),
    );
    rep.storm_reconnected = stats.up.load(Ordering::Relaxed);
    if ok {
        rep.storm_secs = Some(storm_secs);
        rep.storm_total_secs = Some(t_term.elapsed().as_secs_f64());
    } else {
        rep.notes.push(format!(
            "after the restart only {} of {n} were back within 120 s",
            rep.storm_reconnected
        ));
    }
    let drain = at_start - before;
    let f = stats.all.load() - at_start;
    rep.storm_failed_counted_after = f.refused + f.timed_out + f.other;
    let late = stats.late.load();
    rep.storm_failed = late.refused + late.timed_out + late.other;
    let h_after = scrape(ops).await;
    let hs = |t: &str, r: &str| metric(t, "ztna_intermediate_handshakes_total", &[("result", r)]);
    rep.storm = format!(
        "while the old process drained: {} attempts, {} refused, {} timed out, {} other; after \
         the restart: {} attempts, {} refused, {} timed out, {} other (of these, the attempts \
         that started after the new process was spawned: {} attempts, {} refused, {} timed out, \
         {} other); the new process counted handshakes ok {} failed {} unauthorized {} (the old \
         one: ok {})",
        drain.attempts,
        drain.refused,
        drain.timed_out,
        drain.other,
        f.attempts,
        f.refused,
        f.timed_out,
        f.other,
        late.attempts,
        late.refused,
        late.timed_out,
        late.other,
        hs(&h_after, "ok"),
        hs(&h_after, "failed"),
        hs(&h_after, "unauthorized"),
        hs(&h_before, "ok"),
    );
    rep.storm.push_str(&format!(
        " ({} of the attempts that started after it were welcomed only after more than \
         {CONNECT_TIMEOUT:?}: the intermediate had confirmed the handshake, so they waited)",
        late.welcomed_late
    ));
    if late.timed_out > 0 {
        let by: Vec<String> = Stage::ALL
            .iter()
            .map(|(stage, name)| format!("{name} {}", late.stages[*stage as usize]))
            .collect();
        rep.storm.push_str(&format!(
            " (where those that started after it timed out: {})",
            by.join(", ")
        ));
    }
    if f.refused > 0 {
        rep.storm.push_str(&format!(
            " (last refusal: {})",
            ztna_node::lock(&stats.last_refused)
        ));
    }
    if f.other > 0 {
        rep.storm.push_str(&format!(
            " (last other: {})",
            ztna_node::lock(&stats.last_other)
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    rep.rss_after_storm_kib = rss_kib(im2.pid());

    // Leave: every agent closes its connection.
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let gone = eventually_async(Duration::from_secs(30), || async {
        metric(
            &scrape(ops).await,
            "ztna_intermediate_connections",
            &[("role", "agent")],
        ) == 0.0
    })
    .await;
    if !gone {
        rep.notes
            .push("the intermediate still counted agents 30 s after they left".into());
    }
    // Closed QUIC connections drain for 3 PTO each before quinn frees them; after a storm on
    // two busy cores the RTT estimates (and so the PTOs) are inflated, and draining can take
    // longer than 5 s. Measure the memory once they have drained, and say how long that took.
    let t_left = Instant::now();
    let quic = |text: &str| {
        text.contains("ztna_intermediate_quic_connections")
            .then(|| metric(text, "ztna_intermediate_quic_connections", &[]))
    };
    if quic(&scrape(ops).await).is_some() {
        let drained = eventually_async(Duration::from_secs(60), || async {
            quic(&scrape(ops).await) == Some(0.0)
        })
        .await;
        if drained {
            rep.drained_secs = Some(t_left.elapsed().as_secs_f64());
        } else {
            rep.notes.push(
                "the intermediate's QUIC connections had not drained 60 s after the agents left"
                    .into(),
            );
        }
    }
    // Then one heap trim period (`ztna_node::memory::TRIM_EVERY`) and a little.
    tokio::time::sleep(ztna_node::memory::TRIM_EVERY + Duration::from_secs(1)).await;
    rep.rss_after_leave_kib = rss_kib(im2.pid());
    if let (Some(full), Some(after)) = (rep.rss_after_storm_kib, rep.rss_after_leave_kib) {
        let held = full - rep.rss_base_kib;
        if held > 0.0 {
            rep.returned = Some((full - after) / held);
        }
    }

    // Come back: all of them connect again (≤128 in flight). An RSS near the previous peak means
    // the process reuses the memory it kept; growing by as much again would be a leak.
    let stop = CancellationToken::new();
    let tasks = spawn_all(&stop);
    if all_up(Duration::from_secs(240)).await {
        tokio::time::sleep(Duration::from_secs(3)).await;
        rep.rss_rejoined_kib = rss_kib(im2.pid());
    } else {
        rep.notes.push(format!(
            "coming back, only {} of {n} connected within 240 s",
            stats.up.load(Ordering::Relaxed)
        ));
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"bench done");
    }
    let mut im2 = im2;
    im2.signal("TERM");
    let _ = im2.wait_exit(Duration::from_secs(30)).await;
    Ok(rep)
}

/// The anchor phase: a bare quinn server (the intermediate's configuration file) takes N
/// connections like the intermediate's from fresh generator sockets; its RSS per connection, its CPU while they idle
/// for `quiet`, and its handshake CPU during the ramp. The connections then close and the
/// server is stopped.
async fn anchor(
    cfg_path: &std::path::Path,
    configs: &[quinn::ClientConfig],
    sockets: usize,
    sources: usize,
    quiet: Duration,
) -> Result<Anchor> {
    let n = configs.len();
    let server = crate::quinn_anchor::spawn(cfg_path)?;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut a = Anchor {
        rss_base_kib: rss_kib(pid).unwrap_or(0.0),
        ..Anchor::default()
    };
    let endpoints = (0..sockets)
        .map(|i| generator_endpoint(i, sources))
        .collect::<std::io::Result<Vec<_>>>()
        .context("anchor client sockets")?;
    let up = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let ramp = Arc::new(Semaphore::new(RAMP_CONCURRENCY));
    let cpu0 = proc_cpu(pid);
    let t = Instant::now();
    let tasks: Vec<_> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            tokio::spawn(bare(
                endpoints[i % endpoints.len()].clone(),
                cfg.clone(),
                server.addr,
                up.clone(),
                stop.clone(),
                ramp.clone(),
            ))
        })
        .collect();
    let all = eventually_async(Duration::from_secs(240), || {
        let up = up.clone();
        async move { up.load(Ordering::Relaxed) >= n }
    })
    .await;
    a.connect_secs = t.elapsed().as_secs_f64();
    a.connected = up.load(Ordering::Relaxed);
    if let (Some(c0), Some(c1)) = (cpu0, proc_cpu(pid)) {
        a.ramp_cpu_ms_per_conn = Some((c1 - c0) * 1e3 / a.connected.max(1) as f64);
    }
    if all {
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.rss_full_kib = rss_kib(pid).unwrap_or(0.0);
        let held = up.load(Ordering::Relaxed);
        if held > 0 {
            a.kib_per_conn = Some((a.rss_full_kib - a.rss_base_kib) / held as f64);
        }
        let me = std::process::id();
        let (c0, g0, t0) = (proc_cpu(pid), proc_cpu(me), Instant::now());
        tokio::time::sleep(quiet).await;
        let secs = t0.elapsed().as_secs_f64();
        a.quiet_cpu_pct = c0.zip(proc_cpu(pid)).map(|(x, y)| (y - x) / secs * 100.0);
        a.generator_cpu_pct = g0.zip(proc_cpu(me)).map(|(x, y)| (y - x) / secs * 100.0);
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"anchor done");
    }
    drop(server);
    if !all {
        bail!("only {} of {n} connected within 240 s", a.connected);
    }
    Ok(a)
}

/// One connection to the anchor: connect (retrying every second), hold until it ends or `stop`.
async fn bare(
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    target: SocketAddr,
    up: Arc<AtomicUsize>,
    stop: CancellationToken,
    ramp: Arc<Semaphore>,
) {
    let mut permit = ramp.acquire_owned().await.ok();
    while !stop.is_cancelled() {
        let attempt = tokio::select! {
            r = client::connect_any(
                &ep, &cfg, "the quinn anchor", vec![target], "ztna-intermediate", CONNECT_TIMEOUT,
            ) => r,
            _ = stop.cancelled() => return,
        };
        permit.take();
        match attempt {
            Ok(conn) => {
                up.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = stop.cancelled() => conn.close(0u32.into(), b"leaving"),
                }
                up.fetch_sub(1, Ordering::Relaxed);
            }
            Err(_) => tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            },
        }
    }
}

/// A client endpoint like an agent's, but with receive and send buffers as large as the system
/// allows: one socket here carries `--agents-per-socket` agents, and its drops must not be
/// counted against the intermediate. Socket `i` sends from loopback address 127.0.0.2 + i
/// modulo `sources` (at most 250), as agents come from many hosts: the intermediate admits at
/// most `max_handshakes_per_source` handshakes per source address at a time.
fn generator_endpoint(i: usize, sources: usize) -> std::io::Result<quinn::Endpoint> {
    let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % sources.clamp(1, 250)) as u8);
    let socket = std::net::UdpSocket::bind((ip, 0))?;
    let r = socket2::SockRef::from(&socket);
    r.set_recv_buffer_size(8 << 20)?;
    r.set_send_buffer_size(8 << 20)?;
    // Watched like an agent's socket: the agent's connect gives a relay that answered longer.
    ztna_node::answered::endpoint(quinn::EndpointConfig::default(), None, socket)
}

/// Issues `n` agent certificates from the test CA on the blocking pool (two at a time) and
/// builds each one's QUIC client config as an agent does.
async fn issue(
    pki: Arc<Pki>,
    n: usize,
    keepalive: Option<Duration>,
) -> Result<Vec<quinn::ClientConfig>> {
    let mut opts = agent_transport(&pki)?;
    if let Some(k) = keepalive {
        opts.keepalive = k;
        opts.idle_timeout = idle_for(k);
    }
    let workers = 2;
    let mut handles = Vec::new();
    for w in 0..workers {
        let pki = pki.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            let ca: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pki.ca.cert_pem().as_bytes())
                    .collect::<Result<_, _>>()
                    .context("CA PEM")?;
            let mut out = Vec::new();
            for i in (w..n).step_by(workers) {
                let issued = pki
                    .ca
                    .issue(&IssueRequest::new("agent", &format!("scale-{i}")))?;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .context("leaf PEM")?;
                let key =
                    PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).context("key PEM")?;
                let id = Identity::from_parts(
                    ca.clone(),
                    chain,
                    key,
                    Role::Agent,
                    std::path::Path::new("scale"),
                )?;
                let cfg = ztna_node::transport::client_config(&id, Role::Intermediate, &opts)?;
                out.push((i, cfg));
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, c)| c).collect())
}

/// The transport options of an agent with a default configuration.
pub fn agent_transport(pki: &Pki) -> Result<TransportOptions> {
    Ok(agent_config(pki)?.transport())
}

/// A default agent configuration (for its transport options).
pub fn agent_config(pki: &Pki) -> Result<ztna_agent::Config> {
    let tls = pki.issue("agent", "defaults");
    let text = format!(
        "intermediates = [\"127.0.0.1:1\"]\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    );
    toml::from_str(&text).context("default agent config")
}

/// One agent's link: connect, Hello, hold until the connection ends, reconnect on the agent's
/// schedule; until `stop`, then close.
async fn agent(
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    target: SocketAddr,
    stats: Arc<Stats>,
    stop: CancellationToken,
    ramp: Arc<Semaphore>,
) {
    let mut backoff = Reconnect::new(BackoffPolicy::default());
    let mut permit = ramp.acquire_owned().await.ok();
    while !stop.is_cancelled() {
        let started = stats.attempt();
        let limit = backoff.attempt_limit();
        let attempt = tokio::select! {
            r = connect(&ep, &cfg, target, &stats, started, limit) => r,
            _ = stop.cancelled() => return,
        };
        permit.take();
        let (since, drained, rtt) = match attempt {
            Ok((conn, control)) => {
                let since = Instant::now();
                let held = conn.clone();
                let drained = hold(conn, control, &stats, &stop).await;
                (Some(since), drained, held.rtt())
            }
            Err(f) => {
                stats.fail(f, started);
                (None, false, Duration::ZERO)
            }
        };
        if stop.is_cancelled() {
            return;
        }
        if drained {
            backoff.planned(rtt);
        }
        let delay = backoff.next_delay(since);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Handshake (the agent's own connect: `limit` from its schedule, [`CONNECT_TIMEOUT`] or a poll
/// interval, longer once the relay answered) and Hello within the agent's timeout.
async fn connect(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    target: SocketAddr,
    stats: &Stats,
    started: Instant,
    limit: Duration,
) -> Result<(quinn::Connection, client::Control), Fail> {
    let conn = match client::connect_any(
        ep,
        cfg,
        "the scale intermediate",
        vec![target],
        "ztna-intermediate",
        limit,
    )
    .await
    {
        Ok(c) => c,
        Err(why) if why.contains(&format!("did not complete within {limit:?}")) => {
            return Err(Fail::TimedOut(Stage::Silent))
        }
        Err(why) if why.contains("did not complete") => {
            return Err(Fail::TimedOut(Stage::Answered))
        }
        Err(why) if why.contains("timed out") => return Err(Fail::TimedOut(Stage::Idle)),
        Err(why) if why.contains("refused") || why.contains("closed by peer") => {
            return Err(Fail::Refused(why))
        }
        Err(why) => return Err(Fail::Other(why)),
    };
    let software = format!("ztna-bench/{}", ztna_node::VERSION);
    let said = Instant::now();
    match client::hello(&conn, Role::Agent, software, Vec::new(), CONNECT_TIMEOUT).await {
        Ok(c) => {
            if said.elapsed() > CONNECT_TIMEOUT {
                stats.welcomed_late(started);
            }
            Ok((conn, c))
        }
        Err(why) if why.contains("refused") || why.contains("closed") => Err(Fail::Refused(why)),
        Err(why) if why.contains("timed out") => Err(Fail::TimedOut(
            if conn.stats().frame_rx.handshake_done > 0 {
                Stage::Hello
            } else {
                Stage::Unconfirmed
            },
        )),
        Err(why) => Err(Fail::Other(why)),
    }
}

/// Holds a welcomed connection until it ends or `stop` (then closes it); returns whether the
/// intermediate drained (GoAway or a close with the draining code).
async fn hold(
    conn: quinn::Connection,
    mut control: client::Control,
    stats: &Stats,
    stop: &CancellationToken,
) -> bool {
    stats.up.fetch_add(1, Ordering::Relaxed);
    let mut drained = false;
    let ended = async {
        // Bounded by the connection: its end ends the stream with an error.
        loop {
            match control.recv.next::<ServerMsg>().await {
                Ok(Some(ServerMsg::GoAway { .. })) => drained = true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = ended => {}
        _ = stop.cancelled() => conn.close(0u32.into(), b"agent leaving"),
    }
    stats.up.fetch_sub(1, Ordering::Relaxed);
    drained || client::closed_by_drain(&conn)
}

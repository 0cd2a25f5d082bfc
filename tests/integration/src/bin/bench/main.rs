//! `ztna-bench`: the relay path against its anchors, side by side in one run, on loopback.
//!
//! * anchor: one quinn hop in this process, built like the daemons' (same rustls configs,
//!   transport options, certificates from the test PKI);
//! * the relay path agent → intermediate → connector as three processes (the real command
//!   lines) and in this process (library entry points);
//! * direct TCP/UDP to the backends as the baseline.
//!
//! Modes (`--mode tcp,rtt,setup,wan,udp,scale`, default all): one-stream TCP throughput and CPU
//! per GiB; 64-byte RTT; new-connection setup; WAN (delay proxies on both QUIC hops); UDP at
//! fixed offered rates and a burst-then-steady run; scale (N agent connections against one
//! intermediate process, idle memory and CPU, a reconnect storm). Prints a table, then one
//! `ratio NAME VALUE` line per goal of issue 13. Bounded in time; not a test.
//!
//! Run: `cargo build --release -p ztna-integration --bins && target/release/ztna-bench`
//! (`--help` for the options).

mod backends;
mod hop;
mod quinn_anchor;
mod relays;
mod scale;
mod udp_rate;
mod util;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::time::timeout;
use ztna_integration::*;
use ztna_node::Identity;
use ztna_proto::Role;

use backends::Bulk;
use relays::{Backends, Bins, InprocRelay, ProcRelay};
use util::{median, mib_s_to_gbit, opt, rss_kib, CpuOf, Samples};

const MODES: [&str; 7] = ["tcp", "rtt", "setup", "p2p", "wan", "udp", "scale"];
const USAGE: &str =
    "usage: ztna-bench [--mode tcp,rtt,setup,p2p,wan,udp,scale] [--mib N] [--repeat N]
                  [--rounds N] [--setups N] [--rtt 50ms,100ms] [--wan-secs S] [--udp-secs S]
                  [--burst-trials N] [--burst-run N] [--agents N] [--agents-per-socket N]
                  [--source-addresses N] [--quiet-secs S] [--keepalive 1s]";
/// No single measurement may hold the run longer than this.
const STEP_LIMIT: Duration = Duration::from_secs(300);

struct Args {
    modes: BTreeSet<String>,
    mib: u64,
    repeat: usize,
    rounds: usize,
    setups: usize,
    rtts: Vec<Duration>,
    wan_secs: f64,
    udp_secs: f64,
    burst_trials: u32,
    burst_run: u32,
    agents: usize,
    per_socket: usize,
    sources: usize,
    quiet: Duration,
    /// Scale mode: keepalive of the agents (idle timeout 3x, at least 5 s, on both sides);
    /// `None` = the shipped defaults.
    keepalive: Option<Duration>,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut a = Args {
            modes: MODES.iter().map(|s| s.to_string()).collect(),
            mib: 256,
            repeat: 3,
            rounds: 2000,
            setups: 300,
            rtts: vec![Duration::from_millis(50), Duration::from_millis(100)],
            wan_secs: 8.0,
            udp_secs: 3.0,
            burst_trials: 4,
            burst_run: 1,
            agents: 10_000,
            per_socket: 100,
            sources: 250,
            quiet: Duration::from_secs(10),
            keepalive: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let v = it
                .next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            let num = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| *x > 0.0 && x.is_finite())
                    .with_context(|| format!("bad {flag} {v:?}"))
            };
            match flag.as_str() {
                "--mode" => {
                    a.modes = v.split(',').map(|s| s.trim().to_string()).collect();
                    if let Some(bad) = a.modes.iter().find(|m| !MODES.contains(&m.as_str())) {
                        bail!("unknown mode {bad:?} (modes: {})", MODES.join(","));
                    }
                }
                "--mib" => a.mib = num(&v)? as u64,
                "--repeat" => a.repeat = num(&v)? as usize,
                "--rounds" => a.rounds = num(&v)? as usize,
                "--setups" => a.setups = num(&v)? as usize,
                "--rtt" => {
                    a.rtts = v
                        .split(',')
                        .map(|s| {
                            util::parse_duration(s)
                                .filter(|d| !d.is_zero())
                                .with_context(|| format!("bad --rtt {s:?} (e.g. 50ms)"))
                        })
                        .collect::<Result<_>>()?
                }
                "--wan-secs" => a.wan_secs = num(&v)?.min(120.0),
                "--udp-secs" => a.udp_secs = num(&v)?.min(60.0),
                "--burst-trials" => a.burst_trials = num(&v)?.min(20.0) as u32,
                "--burst-run" => a.burst_run = num(&v)?.min(1000.0) as u32,
                "--agents" => a.agents = num(&v)? as usize,
                "--agents-per-socket" => a.per_socket = num(&v)? as usize,
                "--source-addresses" => a.sources = (num(&v)? as usize).min(250),
                "--quiet-secs" => a.quiet = Duration::from_secs_f64(num(&v)?.min(120.0)),
                "--keepalive" => {
                    a.keepalive = Some(
                        ztna_node::config::parse_duration(&v)
                            .ok()
                            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
                            .with_context(|| {
                                format!("bad --keepalive {v:?} (e.g. 10s, at most 60s)")
                            })?,
                    )
                }
                _ => bail!("unknown argument {flag:?}\n{USAGE}"),
            }
        }
        if a.mib == 0 || a.repeat == 0 || a.rounds == 0 || a.setups == 0 || a.agents == 0 {
            bail!("numbers must be at least 1");
        }
        Ok(a)
    }

    fn has(&self, m: &str) -> bool {
        self.modes.contains(m)
    }
}

fn runtime(name: &str, workers: Option<usize>) -> Result<Runtime> {
    let mut b = Builder::new_multi_thread();
    b.thread_name(name).enable_all();
    if let Some(w) = workers {
        b.worker_threads(w);
    }
    Ok(b.build()?)
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(util::UDP_ECHO_CHILD) {
        return util::udp_echo_child();
    }
    if std::env::args().nth(1).as_deref() == Some(quinn_anchor::CHILD) {
        let config = std::env::args_os()
            .nth(2)
            .context("the quinn anchor child needs a config file")?;
        return quinn_anchor::child(std::path::Path::new(&config));
    }
    let args = Args::parse()?;
    // The load generators, backends and delay proxies.
    let io = runtime("bench-io", Some(2))?;
    // In-process daemons and the anchor's two ends: default worker count, like a daemon.
    let ztna = runtime(relays::THREADS, None)?;
    let hop_srv = runtime("hop-srv", None)?;
    let hop_cli = runtime("hop-cli", None)?;
    logs();
    let result = io.block_on(run(
        &args,
        ztna.handle().clone(),
        hop_srv.handle().clone(),
        hop_cli.handle().clone(),
    ));
    for rt in [ztna, hop_srv, hop_cli, io] {
        rt.shutdown_timeout(Duration::from_secs(5));
    }
    result
}

fn progress(what: &str) {
    eprintln!("[ztna-bench {}] {what}", chrono_now());
}

fn chrono_now() -> String {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    format!(
        "{:6.1}s",
        START.get_or_init(Instant::now).elapsed().as_secs_f64()
    )
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    progress(what);
    timeout(STEP_LIMIT, f)
        .await
        .with_context(|| format!("{what}: over {STEP_LIMIT:?}"))?
        .with_context(|| what.to_string())
}

/// Everything measured, for the table and the goals.
#[derive(Default)]
struct Figures {
    tcp: Vec<(&'static str, Vec<Bulk>)>,
    /// Drop counters that moved in the relay processes during the TCP runs.
    tcp_drops: Vec<String>,
    /// The same for the direct-path (P2P) processes.
    p2p_drops: Vec<String>,
    tcp_rtt: Vec<(&'static str, Samples)>,
    udp_rtt: Vec<(&'static str, Samples, usize)>,
    /// Plain UDP ping-pong between the anchor's two runtimes: the hop's baseline.
    hop_plain_udp: Option<(Samples, usize)>,
    /// Plain UDP ping-pong with another process (blocking echo): what one cross-process round
    /// trip costs on this machine, before any QUIC or proxying.
    two_process_udp: Option<(Samples, usize)>,
    setup: Vec<(&'static str, Samples)>,
    /// Flows each agent opened during the tcp and rtt runs: (relay, direct).
    paths: Vec<(&'static str, (f64, f64))>,
    windows: Vec<String>,
    wan: Vec<Wan>,
    udp: Vec<UdpRow>,
    /// Many small UDP flows held open (a DNS-like service): what each costs each daemon.
    udp_flows: Option<UdpFlows>,
    /// One per trial (each on fresh connections).
    burst: Vec<Burst>,
    scale: Option<scale::Report>,
}

struct Wan {
    rtt: Duration,
    avg: f64,
    steady: f64,
    /// Datagrams the kernel dropped at full socket receive buffers during the run: agent,
    /// intermediate, connector, this process (the proxies).
    drops: [u64; 4],
    /// Datagrams the proxies passed on, and dropped for a full delay line.
    forwarded: u64,
    overflow: u64,
}

struct UdpFlows {
    flows: usize,
    /// Flows whose datagram came back, and those that got another flow's.
    answered: usize,
    wrong: usize,
    /// Drop counters that moved meanwhile.
    drops: Vec<String>,
    /// KiB of resident memory per flow: agent, intermediate, connector.
    kib: [f64; 3],
}

struct UdpRow {
    size: usize,
    mbit: f64,
    direct: udp_rate::RateResult,
    relay: udp_rate::RateResult,
    /// CPU seconds of the three daemons over the relay run.
    relay_cpu: f64,
    drops: Vec<String>,
}

impl UdpRow {
    /// CPU seconds of the three daemons per GiB of payload delivered through them.
    fn cpu_per_gib(&self) -> f64 {
        let gib = self.relay.received[1] as f64 * self.size as f64 / (1u64 << 30) as f64;
        self.relay_cpu / gib
    }
}

struct Burst {
    /// UDP payload bytes of every datagram.
    size: usize,
    r: udp_rate::RateResult,
    rate_mbit: f64,
    lost_by_proxy: u64,
    /// Counters that moved during each phase.
    drops: Vec<Vec<String>>,
    /// Payloads the connector received on the flow's stream (not as datagrams) per phase.
    on_stream: Vec<f64>,
}

impl Figures {
    fn tcp_of(&self, name: &str) -> Option<(f64, f64)> {
        let v = &self.tcp.iter().find(|(n, _)| *n == name)?.1;
        let mib: Vec<f64> = v.iter().map(|b| b.mib_s).collect();
        let cpu: Vec<f64> = v.iter().map(|b| b.cpu_per_gib).collect();
        Some((median(&mib)?, median(&cpu)?))
    }
    fn rtt_of(&self, name: &str) -> Option<&Samples> {
        self.tcp_rtt
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
    }
    fn setup_of(&self, name: &str) -> Option<&Samples> {
        self.setup.iter().find(|(n, _)| *n == name).map(|(_, s)| s)
    }
}

const DIRECT: &str = "direct";
const HOP: &str = "one quinn hop";
const RELAY: &str = "relay, processes";
const INPROC: &str = "relay, in-process";
const P2P: &str = "direct path (P2P), processes";

async fn run(args: &Args, ztna: Handle, hop_srv: Handle, hop_cli: Handle) -> Result<()> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug (WARNING: not representative, build with --release)"
    } else {
        "release"
    };
    let bins = Bins::find()?;
    println!("ztna-bench: {nproc} cores, profile {profile}, modes {}", {
        let m: Vec<&str> = args.modes.iter().map(|s| s.as_str()).collect();
        m.join(",")
    });
    println!("daemons (processes): {}", bins.describe());
    println!(
        "NOTE: loopback, cores shared with everything else on this machine: figures are noisy. \
         Compare columns of one run; quote medians of several runs."
    );
    let pki = Arc::new(Pki::new());
    let b = Backends::start().await?;
    let mut f = Figures::default();

    // `p2p` adds the direct path agent -> connector as a row of the tcp and rtt tables.
    let side_by_side = args.has("tcp") || args.has("rtt") || args.has("setup") || args.has("p2p");
    let relay = if side_by_side || args.has("udp") {
        Some(
            step(
                "start relay processes",
                ProcRelay::start(&pki, &bins, &b, "main", None, false),
            )
            .await?,
        )
    } else {
        None
    };
    let (inproc, hop) = if side_by_side {
        let inproc = step(
            "start in-process relay",
            InprocRelay::start(&ztna, pki.clone(), &b),
        )
        .await?;
        let hop = step("start the anchor (one quinn hop)", async {
            let sid = Identity::load(&pki.issue("intermediate", "hop"), Role::Intermediate)?;
            let cid = Identity::load(&pki.issue("agent", "hop"), Role::Agent)?;
            let sopts = intermediate_config(&pki, loopback0(), Vec::new()).transport();
            let copts = scale::agent_transport(&pki)?;
            hop::Hop::start(&hop_srv, &hop_cli, sid, sopts, cid, copts).await
        })
        .await?;
        (Some(inproc), Some(hop))
    } else {
        (None, None)
    };
    let p2p = if args.has("p2p") {
        let r = step(
            "start agent, relay and connector with p2p = true",
            ProcRelay::start(&pki, &bins, &b, "p2p", None, true),
        )
        .await?;
        step(
            "wait for the direct paths",
            r.wait_direct(Duration::from_secs(15)),
        )
        .await?;
        Some(r)
    } else {
        None
    };

    if let (Some(relay), Some(inproc), Some(hop)) = (&relay, &inproc, &hop) {
        let before = (relay.flows_by_path().await, p2p_flows(&p2p).await);
        if args.has("tcp") || args.has("p2p") {
            tcp(args, &mut f, &b, relay, inproc, hop, p2p.as_ref()).await?;
        }
        if args.has("rtt") || args.has("p2p") {
            rtt(args, &mut f, &b, relay, inproc, hop, p2p.as_ref()).await?;
        }
        let after = (relay.flows_by_path().await, p2p_flows(&p2p).await);
        f.paths.push((RELAY, sub(after.0, before.0)));
        if let (Some(a), Some(b)) = (after.1, before.1) {
            f.paths.push((P2P, sub(a, b)));
        }
        if args.has("setup") {
            setup(args, &mut f, &b, relay, inproc, hop).await?;
        }
    }
    if let Some(r) = p2p {
        r.stop().await;
    }
    if let Some(h) = hop {
        h.close().await;
    }
    if let Some(i) = inproc {
        step("stop in-process relay", async {
            i.stop().await;
            Ok(())
        })
        .await?;
    }
    if args.has("udp") {
        if let Some(relay) = &relay {
            udp(args, &mut f, &b, relay).await?;
            f.udp_flows = Some(step("udp: many small flows", udp_flows(relay)).await?);
        }
        // 1200 B fit a QUIC datagram on a 1500-byte path; 1472 B (a full-MTU IPv4 payload)
        // never do and ride the flow's stream throughout.
        for size in [1200, 1472] {
            for trial in 1..=args.burst_trials {
                burst(&mut f, &pki, &bins, &b, (trial, size), args.burst_run).await?;
            }
        }
    }
    if let Some(r) = relay {
        r.stop().await;
    }
    if args.has("wan") {
        wan(args, &mut f, &pki, &bins, &b).await?;
    }
    if args.has("scale") {
        let opts = scale::Opts {
            agents: args.agents,
            per_socket: args.per_socket,
            sources: args.sources,
            quiet: args.quiet,
            keepalive: args.keepalive,
        };
        let what = format!("scale: {} agents against one intermediate", args.agents);
        f.scale = Some(
            timeout(Duration::from_secs(900), async {
                progress(&what);
                scale::run(pki.clone(), &bins, &opts).await
            })
            .await
            .context("scale: over 900 s")??,
        );
    }
    report(args, &f, nproc);
    Ok(())
}

async fn p2p_flows(p2p: &Option<ProcRelay>) -> Option<(f64, f64)> {
    match p2p {
        Some(r) => Some(r.flows_by_path().await),
        None => None,
    }
}

fn sub(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

async fn tcp(
    args: &Args,
    f: &mut Figures,
    b: &Backends,
    relay: &ProcRelay,
    inproc: &InprocRelay,
    hop: &hop::Hop,
    p2p: Option<&ProcRelay>,
) -> Result<()> {
    let mib = args.mib;
    let mut rows: Vec<(&'static str, Vec<Bulk>)> =
        [DIRECT, HOP, RELAY, INPROC].map(|n| (n, Vec::new())).into();
    if p2p.is_some() {
        rows.push((P2P, Vec::new()));
    }
    let p2p_cpu = p2p.map(|r| CpuOf::Pids(r.pids()));
    let direct_cpu = CpuOf::Threads(vec!["bench-io"]);
    let relay_cpu = CpuOf::Pids(relay.pids());
    let inproc_cpu = CpuOf::Threads(vec![relays::THREADS]);
    let before = relay.drop_snapshot().await;
    let p2p_before = match p2p {
        Some(p) => Some(p.drop_snapshot().await),
        None => None,
    };
    for i in 0..args.repeat {
        let n = i + 1;
        let r = step(
            &format!("tcp {n}: direct"),
            backends::throughput(b.sink.addr, mib, &direct_cpu),
        )
        .await?;
        rows[0].1.push(r);
        let r = step(&format!("tcp {n}: one quinn hop"), hop.bulk(mib)).await?;
        rows[1].1.push(r);
        let r = step(
            &format!("tcp {n}: relay, processes"),
            backends::throughput(relay.ports.sink, mib, &relay_cpu),
        )
        .await?;
        rows[2].1.push(r);
        let r = step(
            &format!("tcp {n}: relay, in-process"),
            backends::throughput(inproc.ports.sink, mib, &inproc_cpu),
        )
        .await?;
        rows[3].1.push(r);
        if let (Some(p), Some(cpu)) = (p2p, &p2p_cpu) {
            let r = step(
                &format!("tcp {n}: direct path (P2P)"),
                backends::throughput(p.ports.sink, mib, cpu),
            )
            .await?;
            rows[4].1.push(r);
        }
    }
    f.tcp = rows;
    f.tcp_drops = relays::snapshot_deltas(&before, &relay.drop_snapshot().await);
    if let (Some(p), Some(before)) = (p2p, p2p_before) {
        f.p2p_drops = relays::snapshot_deltas(&before, &p.drop_snapshot().await);
    }
    Ok(())
}

async fn rtt(
    args: &Args,
    f: &mut Figures,
    b: &Backends,
    relay: &ProcRelay,
    inproc: &InprocRelay,
    hop: &hop::Hop,
    p2p: Option<&ProcRelay>,
) -> Result<()> {
    let (w, n) = (100, args.rounds);
    let d = step("rtt: tcp direct", backends::tcp_rtt(b.echo_tcp, w, n)).await?;
    let h = step("rtt: one quinn hop (stream)", hop.rtt_stream(w, n)).await?;
    let r = step(
        "rtt: tcp relay, processes",
        backends::tcp_rtt(relay.ports.echo_tcp, w, n),
    )
    .await?;
    let i = step(
        "rtt: tcp relay, in-process",
        backends::tcp_rtt(inproc.ports.echo_tcp, w, n),
    )
    .await?;
    f.tcp_rtt = vec![(DIRECT, d), (HOP, h), (RELAY, r), (INPROC, i)];
    if let Some(p) = p2p {
        let s = step(
            "rtt: tcp direct path (P2P)",
            backends::tcp_rtt(p.ports.echo_tcp, w, n),
        )
        .await?;
        f.tcp_rtt.push((P2P, s));
    }
    let (d, dl) = step("rtt: udp direct", backends::udp_rtt(b.echo_udp, w, n)).await?;
    let (h, hl) = step("rtt: one quinn hop (datagrams)", hop.rtt_datagram(w, n)).await?;
    let (r, rl) = step(
        "rtt: udp relay, processes",
        backends::udp_rtt(relay.ports.echo_udp, w, n),
    )
    .await?;
    let (i, il) = step(
        "rtt: udp relay, in-process",
        backends::udp_rtt(inproc.ports.echo_udp, w, n),
    )
    .await?;
    let (p, pl) = step(
        "rtt: plain udp between the anchor's runtimes",
        hop.rtt_plain_udp(w, n),
    )
    .await?;
    f.udp_rtt = vec![
        (DIRECT, d, dl),
        (HOP, h, hl),
        (RELAY, r, rl),
        (INPROC, i, il),
    ];
    if let Some(p) = p2p {
        let (s, l) = step(
            "rtt: udp direct path (P2P)",
            backends::udp_rtt(p.ports.echo_udp, w, n),
        )
        .await?;
        f.udp_rtt.push((P2P, s, l));
    }
    f.hop_plain_udp = Some((p, pl));
    let child = util::SelfChild::spawn(&[util::UDP_ECHO_CHILD.as_ref()], "the UDP echo child")?;
    let (c, cl) = step(
        "rtt: plain udp to another process",
        backends::udp_rtt(child.addr, w, n),
    )
    .await?;
    f.two_process_udp = Some((c, cl));
    Ok(())
}

const HOP_FULL: &str = "one quinn hop, full handshake";
const HOP_RESUMED: &str = "one quinn hop, shared config";

async fn setup(
    args: &Args,
    f: &mut Figures,
    b: &Backends,
    relay: &ProcRelay,
    inproc: &InprocRelay,
    hop: &hop::Hop,
) -> Result<()> {
    let (w, n) = (20, args.setups);
    let d = step("setup: direct", backends::tcp_setup(b.echo_tcp, w, n)).await?;
    let full = step("setup: one quinn hop, full", hop.handshakes(w, n, true)).await?;
    let shared = step("setup: one quinn hop, shared", hop.handshakes(w, n, false)).await?;
    let r = step(
        "setup: relay, processes",
        backends::tcp_setup(relay.ports.echo_tcp, w, n),
    )
    .await?;
    let i = step(
        "setup: relay, in-process",
        backends::tcp_setup(inproc.ports.echo_tcp, w, n),
    )
    .await?;
    f.setup = vec![
        (DIRECT, d),
        (HOP_FULL, full),
        (HOP_RESUMED, shared),
        (RELAY, r),
        (INPROC, i),
    ];
    Ok(())
}

/// `field: value` out of a `Debug` rendering, `VarInt(..)` unwrapped.
fn debug_field(text: &str, field: &str) -> String {
    let key = format!(" {field}: ");
    let Some(i) = text.find(&key) else {
        return "?".into();
    };
    let rest = &text[i + key.len()..];
    let mut depth = 0;
    let end = rest
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' if depth > 0 => depth -= 1,
                _ => {}
            }
            depth == 0 && (c == ',' || c == '}')
        })
        .map_or(rest.len(), |(i, _)| i);
    let v = rest[..end].trim();
    v.strip_prefix("VarInt(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(v)
        .to_string()
}

fn windows(role: &str, t: &quinn::TransportConfig) -> (String, Option<f64>) {
    let d = format!("{t:?}");
    let srw = debug_field(&d, "stream_receive_window");
    let line = format!(
        "{role:<13} stream_receive_window {srw}  receive_window {}  send_window {}  \
         initial_mtu {}  min_mtu {}  mtu_discovery {}",
        debug_field(&d, "receive_window"),
        debug_field(&d, "send_window"),
        debug_field(&d, "initial_mtu"),
        debug_field(&d, "min_mtu"),
        debug_field(&d, "mtu_discovery_config"),
    );
    (line, srw.parse().ok())
}

fn connector_config(pki: &Pki) -> Result<ztna_connector::Config> {
    let tls = pki.issue("connector", "defaults");
    let text = format!(
        "intermediates = [\"127.0.0.1:1\"]\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [[service]]\nname = \"x\"\ntcp = \"127.0.0.1:1\"\n",
        tls.ca.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    );
    toml::from_str(&text).context("default connector config")
}

async fn wan(args: &Args, f: &mut Figures, pki: &Pki, bins: &Bins, b: &Backends) -> Result<()> {
    let mut smallest: Option<f64> = None;
    for (role, t) in [
        ("agent", scale::agent_config(pki)?.transport()),
        (
            "intermediate",
            intermediate_config(pki, loopback0(), Vec::new()).transport(),
        ),
        ("connector", connector_config(pki)?.transport()),
    ] {
        let (line, srw) = windows(role, &t.transport_config());
        f.windows.push(line);
        if let Some(w) = srw {
            smallest = Some(smallest.map_or(w, |s: f64| s.min(w)));
        }
    }
    if let Some(w) = smallest {
        f.windows.push(format!(
            "one flow's ceiling from the smallest stream window: {:.0} Mbit/s at 50 ms RTT, {:.0} \
             Mbit/s at 100 ms (window / RTT); memory cost: up to stream_receive_window per \
             flow per hop, receive_window per connection",
            w * 8.0 / 0.05 / 1e6,
            w * 8.0 / 0.1 / 1e6
        ));
    }
    let mut rtts = vec![Duration::ZERO];
    rtts.extend(args.rtts.iter().copied());
    for rtt in rtts {
        let secs = if rtt.is_zero() {
            (args.wan_secs / 2.0).max(2.0)
        } else {
            args.wan_secs
        };
        let tag = format!("wan{}", rtt.as_millis());
        let r = step(
            &format!("wan: start relay with {} ms RTT per hop", rtt.as_millis()),
            ProcRelay::start(pki, bins, b, &tag, Some(rtt / 2), false),
        )
        .await?;
        let pids = [
            r.agent.pid(),
            r.im.pid(),
            r.connector.pid(),
            std::process::id(),
        ];
        let drops0 = pids.map(util::udp_socket_drops);
        let res = step(
            &format!(
                "wan: one TCP flow for {secs} s at {} ms RTT per hop",
                rtt.as_millis()
            ),
            backends::throughput_for(&b.sink, r.ports.sink, secs),
        )
        .await;
        let drops1 = pids.map(util::udp_socket_drops);
        let drops: [u64; 4] = std::array::from_fn(|i| drops1[i].saturating_sub(drops0[i]));
        let (fwd, overflow) = r.proxies.iter().fold((0, 0), |(f, o), p| {
            let s = p.stats();
            (
                f + s.forwarded.load(std::sync::atomic::Ordering::Relaxed),
                o + s.overflow.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        r.stop().await;
        let (avg, steady) = res?;
        f.wan.push(Wan {
            rtt,
            avg,
            steady,
            drops,
            forwarded: fwd,
            overflow,
        });
    }
    Ok(())
}

const SIZES: [usize; 2] = [1200, 1472];
const RATES: [f64; 3] = [100e6, 500e6, 1e9];

async fn udp(args: &Args, f: &mut Figures, b: &Backends, relay: &ProcRelay) -> Result<()> {
    let dur = Duration::from_secs_f64(args.udp_secs);
    let mut run_id = 100;
    for size in SIZES {
        for rate in RATES {
            run_id += 1;
            let mbit = rate / 1e6;
            let direct = step(
                &format!("udp: direct {size} B at {mbit} Mbit/s"),
                udp_rate::run(
                    b.usink.addr,
                    &b.usink,
                    run_id,
                    size,
                    rate,
                    &[(1, dur)],
                    |_| async {},
                ),
            )
            .await?;
            let before = relay.drop_snapshot().await;
            let cpu = CpuOf::Pids(relay.pids()).mark();
            run_id += 1;
            let r = step(
                &format!("udp: relay {size} B at {mbit} Mbit/s"),
                udp_rate::run(
                    relay.ports.usink,
                    &b.usink,
                    run_id,
                    size,
                    rate,
                    &[(1, dur)],
                    |_| async {},
                ),
            )
            .await?;
            let relay_cpu = cpu.since();
            let drops = relays::snapshot_deltas(&before, &relay.drop_snapshot().await);
            if r.received[0] == 0 {
                progress("udp: warning: the flow's warm-up never reached the sink");
            }
            f.udp.push(UdpRow {
                size,
                mbit,
                direct,
                relay: r,
                relay_cpu,
                drops,
            });
        }
    }
    Ok(())
}

/// Flows held open by [`udp_flows`]: a DNS-like service sees one per client source port, each
/// held for the udp_idle_timeout. Within the intermediate's `max_flows_per_agent` (1000).
const UDP_FLOWS: usize = 900;

/// Opens [`UDP_FLOWS`] UDP flows through the relay, one 32-byte datagram each from its own
/// socket (echoed), keeps them open, and reports each daemon's resident memory per flow.
async fn udp_flows(relay: &ProcRelay) -> Result<UdpFlows> {
    let pids = [relay.agent.pid(), relay.im.pid(), relay.connector.pid()];
    let rss = || pids.map(|p| rss_kib(p).unwrap_or(f64::NAN));
    let before = rss();
    let drops_before = relay.drop_snapshot().await;
    let mut sockets = Vec::with_capacity(UDP_FLOWS);
    let (mut answered, mut wrong) = (0, 0);
    for chunk in 0..UDP_FLOWS.div_ceil(100) {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..100.min(UDP_FLOWS - chunk * 100) {
            let target = relay.ports.echo_udp;
            batch.spawn(async move {
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                s.connect(target).await?;
                let mut msg = [0u8; 32];
                msg[..8].copy_from_slice(&((chunk * 100 + i) as u64).to_be_bytes());
                let mut buf = [0u8; 64];
                // 0: no answer, 1: its own datagram back, 2: another's.
                let mut got = 0;
                for _ in 0..3 {
                    s.send(&msg).await?;
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(1000), s.recv(&mut buf)).await
                    {
                        got = if buf[..n] == msg { 1 } else { 2 };
                        break;
                    }
                }
                anyhow::Ok((s, got))
            });
        }
        while let Some(r) = batch.join_next().await {
            let (s, got) = r??;
            answered += usize::from(got == 1);
            wrong += usize::from(got == 2);
            sockets.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    drop(sockets);
    let drops = relays::snapshot_deltas(&drops_before, &relay.drop_snapshot().await);
    let kib = [0, 1, 2].map(|i| (after[i] - before[i]) / UDP_FLOWS as f64);
    progress(&format!(
        "udp flows: {answered}/{UDP_FLOWS} answered ({wrong} with another flow's datagram); KiB \
         per flow: agent {:.1}, intermediate {:.1}, connector {:.1}",
        kib[0], kib[1], kib[2]
    ));
    Ok(UdpFlows {
        flows: UDP_FLOWS,
        answered,
        wrong,
        kib,
        drops,
    })
}

/// Burst then steady: `size`-byte datagrams at 100 Mbit/s through delay proxies (no delay) on both
/// hops: 1 s clean, 1 s with 30 % loss on both hops (in runs of 1..=`run` datagrams), 5 s clean
/// again. Whether a burst collapses the MTU is a matter of chance (quinn's black-hole detection
/// counts separate bursts of lost large packets), so each trial runs on fresh connections.
async fn burst(
    f: &mut Figures,
    pki: &Pki,
    bins: &Bins,
    b: &Backends,
    (trial, size): (u32, usize),
    run: u32,
) -> Result<()> {
    let r = step(
        &format!("udp burst {trial} ({size} B): start relay with loss proxies"),
        ProcRelay::start(
            pki,
            bins,
            b,
            &format!("burst{trial}"),
            Some(Duration::ZERO),
            false,
        ),
    )
    .await?;
    let rate = 100e6;
    let phases = [
        (1u8, Duration::from_secs(1)),
        (2, Duration::from_secs(1)),
        (3, Duration::from_secs(5)),
    ];
    let snaps = std::sync::Mutex::new(Vec::new());
    let res = step(
        &format!("udp burst {trial} ({size} B): 1 s clean, 1 s 30 % loss, 5 s clean"),
        udp_rate::run(
            r.ports.usink,
            &b.usink,
            900 + trial + size as u32,
            size,
            rate,
            &phases,
            |p| {
                let (r, snaps) = (&r, &snaps);
                async move {
                    let s = r.drop_snapshot().await;
                    ztna_node::lock(snaps).push(s);
                    for px in &r.proxies {
                        px.set_loss(if p == 2 { 0.30 } else { 0.0 }, run);
                    }
                }
            },
        ),
    )
    .await;
    let mut snaps = snaps.into_inner().unwrap_or_else(|p| p.into_inner());
    snaps.push(r.drop_snapshot().await);
    let lost_by_proxy = r
        .proxies
        .iter()
        .map(|p| p.stats().lost.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let drops = snaps
        .windows(2)
        .map(|w| relays::snapshot_deltas(&w[0], &w[1]))
        .collect();
    let on_stream = snaps
        .windows(2)
        .map(|w| {
            let sum = |s: &relays::Snapshot| {
                s.iter()
                    .filter(|(n, _)| *n == "connector")
                    .flat_map(|(_, m)| m.iter())
                    .filter(|(k, _)| k.starts_with("ztna_connector_udp_stream_payloads_total"))
                    .map(|(_, v)| v)
                    .sum::<f64>()
            };
            sum(&w[1]) - sum(&w[0])
        })
        .collect();
    r.stop().await;
    f.burst.push(Burst {
        size,
        r: res?,
        rate_mbit: rate / 1e6,
        lost_by_proxy,
        drops,
        on_stream,
    });
    Ok(())
}

fn fmt_pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1} %", x * 100.0)
    } else {
        "-".into()
    }
}

struct Goal {
    name: &'static str,
    what: String,
    value: Option<f64>,
    target: &'static str,
}

fn report(args: &Args, f: &Figures, nproc: usize) {
    println!();
    println!("== ztna-bench results ({nproc} cores; noisy: compare within a run, take medians of runs) ==");
    if !f.tcp.is_empty() {
        println!();
        println!(
            "TCP, one stream, {} MiB per transfer, median of {}:",
            args.mib, args.repeat
        );
        println!(
            "  {:<34}{:>10}{:>9}{:>12}   runs (MiB/s)",
            "", "MiB/s", "Gbit/s", "CPU-s/GiB"
        );
        for (name, v) in &f.tcp {
            let (m, c) = f.tcp_of(name).unwrap_or((f64::NAN, f64::NAN));
            let runs: Vec<String> = v.iter().map(|b| format!("{:.0}", b.mib_s)).collect();
            println!(
                "  {name:<34}{m:>10.1}{:>9.2}{c:>12.2}   {}",
                mib_s_to_gbit(m),
                runs.join(" ")
            );
        }
        println!(
            "  (CPU of: direct = this process's load threads (client + sink); one quinn hop = \
             both ends' runtimes; relay, processes = the three daemon processes; relay, \
             in-process = the daemons' runtime)"
        );
        if !f.tcp_drops.is_empty() {
            println!(
                "  relay processes, during these runs: {}",
                f.tcp_drops.join("; ")
            );
        }
        if !f.p2p_drops.is_empty() {
            println!(
                "  direct-path (P2P) processes, during these runs: {}",
                f.p2p_drops.join("; ")
            );
        }
    }
    if !f.tcp_rtt.is_empty() {
        println!();
        println!("64-byte RTT, µs, {} sequential round trips:", args.rounds);
        println!(
            "  {:<34}{:>7} {:>7}   {:>7} {:>7} lost",
            "", "tcp p50", "p99", "udp p50", "p99"
        );
        for ((name, t), (_, u, lost)) in f.tcp_rtt.iter().zip(&f.udp_rtt) {
            println!("  {name:<34}{}   {} {lost}", t.show(), u.show());
        }
        if let Some((p, lost)) = &f.hop_plain_udp {
            println!(
                "  {:<34}{:>7} {:>7}   {} {lost}",
                "plain udp, the anchor's runtimes",
                "",
                "",
                p.show()
            );
        }
        if let Some((p, lost)) = &f.two_process_udp {
            println!(
                "  {:<34}{:>7} {:>7}   {} {lost}",
                "plain udp, two processes",
                "",
                "",
                p.show()
            );
        }
        println!(
            "  (one quinn hop: tcp column = a stream, udp column = QUIC datagrams; plain udp = the \
             same two runtimes without QUIC, the hop's own baseline; two processes = this process \
             and a blocking UDP echo process: one cross-process round trip; per round trip the in-process \
             anchor pays none, the direct path (P2P) three, the relay path four)"
        );
    }
    if !f.paths.is_empty() {
        let text: Vec<String> = f
            .paths
            .iter()
            .map(|(name, (relay, direct))| {
                format!("{name}: {relay:.0} via the relay, {direct:.0} direct")
            })
            .collect();
        println!(
            "  flows the agents opened during the tcp and rtt runs (ztna_agent_flows_total by path): {}",
            text.join("; ")
        );
        // A relay row must measure the relay: a direct flow there (daemons that were not told
        // `p2p = false`, e.g. wrapper scripts under ZTNA_BIN_DIR) invalidates its figures.
        for (name, (_, direct)) in &f.paths {
            if name.starts_with("relay") && *direct > 0.0 {
                println!(
                    "  WARNING: {direct:.0} flow(s) of the {name:?} rows went direct: those rows and \
                     their ratios are NOT the relay path"
                );
            }
        }
        // And the direct-path row must measure the direct path: a flow via the relay there
        // (a path lost or not yet up) makes its figures a mix of both.
        for (name, (relay, _)) in &f.paths {
            if *name == P2P && *relay > 0.0 {
                println!(
                    "  WARNING: {relay:.0} flow(s) of the {name:?} rows went via the relay: those \
                     rows and the p2p ratios are NOT the direct path alone"
                );
            }
        }
    }
    if !f.setup.is_empty() {
        println!();
        println!(
            "New-connection setup, µs, {} in a row (TCP connect → first 64 bytes echoed; quinn: \
             client handshake):",
            args.setups
        );
        println!("  {:<34}{:>7} {:>7}", "", "p50", "p99");
        for (name, s) in &f.setup {
            println!("  {name:<34}{}", s.show());
        }
    }
    if !f.wan.is_empty() {
        println!();
        println!("WAN: one TCP flow through the relay processes, a delay proxy on each QUIC hop:");
        for w in &f.windows {
            println!("  windows: {w}");
        }
        println!(
            "  {:<16}{:>10}{:>13}{:>9}{:>13}   socket drops: agent/intermediate/connector/proxies",
            "RTT per hop", "avg MiB/s", "steady MiB/s", "Gbit/s", "proxied pkts",
        );
        for w in &f.wan {
            let d = w.drops;
            println!(
                "  {:<16}{:>10.1}{:>13.1}{:>9.3}{:>13}   {}/{}/{}/{}",
                format!("{} ms", w.rtt.as_millis()),
                w.avg,
                w.steady,
                mib_s_to_gbit(w.steady),
                w.forwarded,
                d[0],
                d[1],
                d[2],
                d[3] + w.overflow,
            );
        }
        println!(
            "  (steady = the sink's rate over the second half of {} s of sending; 0 ms = the same \
             proxies without delay, the loopback baseline; socket drops = datagrams the kernel \
             dropped at a full UDP receive buffer of that process during the run: losses QUIC's \
             congestion control reacts to)",
            args.wan_secs
        );
    }
    if !f.udp.is_empty() {
        println!();
        println!(
            "UDP, one flow, offered for {} s (payload bits), relay = the processes:",
            args.udp_secs
        );
        println!(
            "  {:<16}{:>12}{:>12}{:>12}{:>12}{:>14}{:>18}",
            "size @ offered",
            "direct",
            "relay",
            "offered",
            "one-way p50",
            "p99 (µs)",
            "relay CPU-s/GiB"
        );
        for u in &f.udp {
            println!(
                "  {:<16}{:>12}{:>12}{:>12}{:>12}{:>14}{:>18}",
                format!("{} B @ {}M", u.size, u.mbit),
                fmt_pct(u.direct.delivered(1)),
                fmt_pct(u.relay.delivered(1)),
                format!("{:.0}M", u.relay.offered_mbit[1]),
                opt(u.relay.latency.p50(), 0),
                opt(u.relay.latency.p99(), 0),
                opt(Some(u.cpu_per_gib()), 2),
            );
            if !u.drops.is_empty() {
                println!("      drops: {}", u.drops.join("; "));
            }
        }
    }
    if let Some(u) = &f.udp_flows {
        println!();
        println!(
            "UDP, {} flows opened 100 at a time, one 32-byte datagram each (retried twice after \
             1 s), held open: {} answered, {} with another flow's datagram; resident memory per \
             flow: agent {:.1} KiB, intermediate {:.1} KiB, connector {:.1} KiB",
            u.flows, u.answered, u.wrong, u.kib[0], u.kib[1], u.kib[2]
        );
        if !u.drops.is_empty() {
            println!("      drops: {}", u.drops.join("; "));
        }
    }
    for (trial, bu) in f.burst.iter().enumerate() {
        let of_size = f.burst.iter().filter(|b| b.size == bu.size).count();
        println!();
        println!(
            "UDP burst then steady, trial {}/{of_size} ({} B at {} Mbit/s; delay proxies without \
             delay on both hops; fresh connections):",
            trial % of_size.max(1) + 1,
            bu.size,
            bu.rate_mbit
        );
        for (p, name) in [
            (1, "1 s clean"),
            (2, "1 s 30 % loss"),
            (3, "5 s after the burst"),
        ] {
            println!(
                "  {name:<22} sent {:>7} received {:>7} delivered {}",
                bu.r.sent[p],
                bu.r.received[p],
                fmt_pct(bu.r.delivered(p))
            );
            if let Some(n) = bu.on_stream.get(p - 1) {
                println!(
                    "      carried on the flow's stream, not as datagrams (too large for the \
                     path MTU): {n} (of {} sent)",
                    bu.r.sent[p]
                );
            }
            if let Some(d) = bu.drops.get(p - 1).filter(|d| !d.is_empty()) {
                println!("      counters moved: {}", d.join("; "));
            }
        }
        println!(
            "  dropped by the proxies on purpose: {} (udp_stream_payloads = payloads too large \
             for a datagram, carried on the flow's stream)",
            bu.lost_by_proxy
        );
    }
    if let Some(s) = &f.scale {
        println!();
        println!(
            "Scale: {} agent connections (distinct identities, {} client sockets from {} \
             loopback addresses) against one intermediate process:",
            s.agents,
            s.sockets,
            s.sockets.min(args.sources)
        );
        println!(
            "  certificates issued in {:.1} s; {} connected in {:.1} s (≤128 handshakes in \
             flight; intermediate CPU {} ms per connection)",
            s.issue_secs,
            s.connected,
            s.connect_secs,
            opt(s.ramp_cpu_ms_per_conn, 2)
        );
        println!(
            "  intermediate RSS: {:.0} MiB before, {:.0} MiB with them: {} KiB per connection",
            s.rss_base_kib / 1024.0,
            s.rss_full_kib / 1024.0,
            opt(s.kib_per_conn, 1)
        );
        println!(
            "  keepalives ({}) over {:.0} s quiet: intermediate {} % of one core (load generator {} %)",
            match args.keepalive {
                Some(k) => format!("every {k:?}, --keepalive"),
                None => "shipped defaults".to_string(),
            },
            args.quiet.as_secs_f64(),
            opt(s.quiet_cpu_pct, 1),
            opt(s.generator_cpu_pct, 1)
        );
        if let Some(a) = &s.anchor {
            println!(
                "  anchor, a bare quinn server with the intermediate's configuration file (its own \
                 process; {} more identities from fresh sockets, no stream): {} connected in \
                 {:.1} s (CPU {} ms per connection); RSS {:.0} → {:.0} MiB: {} KiB per connection; \
                 keepalives over {:.0} s quiet: {} % of one core (load generator {} %)",
                s.agents,
                a.connected,
                a.connect_secs,
                opt(a.ramp_cpu_ms_per_conn, 2),
                a.rss_base_kib / 1024.0,
                a.rss_full_kib / 1024.0,
                opt(a.kib_per_conn, 1),
                args.quiet.as_secs_f64(),
                opt(a.quiet_cpu_pct, 1),
                opt(a.generator_cpu_pct, 1)
            );
        }
        println!(
            "  reconnect storm: SIGTERM → exit {} s; restart → all {} back in {} s (SIGTERM → all \
             back {} s; {} back)",
            opt(s.storm_exit_secs, 1),
            s.agents,
            opt(s.storm_secs, 1),
            opt(s.storm_total_secs, 1),
            s.storm_reconnected,
        );
        println!("    {}", s.storm);
        println!(
            "    until all were back: CPU new intermediate {} %, load generator {} % of one core; \
             datagrams dropped at full UDP receive buffers: intermediate {}, load generator {}",
            opt(s.storm_cpu_pct.0, 0),
            opt(s.storm_cpu_pct.1, 0),
            s.storm_socket_drops.0,
            s.storm_socket_drops.1
        );
        println!(
            "  RSS after the storm {} MiB; after all left, their QUIC connections drained \
             {} s later (3 PTO each); 6 s after that {} MiB: {} of the connections' memory given back",
            opt(s.rss_after_storm_kib.map(|k| k / 1024.0), 0),
            opt(s.drained_secs, 1),
            opt(s.rss_after_leave_kib.map(|k| k / 1024.0), 0),
            s.returned.map_or("-".into(), fmt_pct)
        );
        println!(
            "  all {} connected again after leaving: RSS {} MiB (near the previous figure: the \
             memory is kept for reuse; higher by as much again: a leak)",
            s.agents,
            opt(s.rss_rejoined_kib.map(|k| k / 1024.0), 0)
        );
        for n in &s.notes {
            println!("  note: {n}");
        }
    }

    let goals = goals(f);
    if goals.is_empty() {
        return;
    }
    println!();
    println!("Goals (issue 13; p2p_*: issue 14):");
    for g in &goals {
        println!(
            "  {:<32}{:>10}  target {:<8} {}",
            g.name,
            opt(g.value, 3),
            g.target,
            g.what
        );
    }
    for g in &goals {
        // Machine-readable: a figure that could not be measured is `nan`.
        let v = g
            .value
            .filter(|v| v.is_finite())
            .map_or("nan".into(), |v| format!("{v:.3}"));
        println!("ratio {} {v}", g.name);
    }
}

fn goals(f: &Figures) -> Vec<Goal> {
    let mut g = Vec::new();
    if let (Some((relay, rcpu)), Some((hop, hcpu))) = (f.tcp_of(RELAY), f.tcp_of(HOP)) {
        g.push(Goal {
            name: "tcp_throughput_relay_vs_hop",
            what: "1: relay (processes) MiB/s / one quinn hop MiB/s".into(),
            value: Some(relay / hop),
            target: ">= 0.6",
        });
        g.push(Goal {
            name: "tcp_cpu_per_gib_relay_vs_hop",
            what: "1: CPU-s/GiB of the three daemons / of one quinn hop (both ends)".into(),
            value: Some(rcpu / hcpu),
            target: "<= 2.2",
        });
    }
    let p50 = |s: Option<&Samples>| s.and_then(|s| s.p50());
    let (d, r) = (p50(f.rtt_of(DIRECT)), p50(f.rtt_of(RELAY)));
    let h = p50(f.rtt_of(HOP));
    let plain = p50(f.hop_plain_udp.as_ref().map(|(s, _)| s));
    if let (Some(d), Some(h), Some(r), Some(p)) = (d, h, r, plain) {
        // What one hop adds: its stream ping-pong over a plain UDP ping-pong between the same
        // two runtimes (never below 0).
        let added_hop = (h - p).max(0.0);
        g.push(Goal {
            name: "rtt_added_relay_vs_budget",
            what: format!(
                "2: (relay − direct) / (2 × (hop − plain udp) + 20 µs), TCP p50s = {:.0} / {:.0} µs",
                r - d,
                2.0 * added_hop + 20.0
            ),
            value: Some((r - d) / (2.0 * added_hop + 20.0)),
            target: "<= 1",
        });
    }
    if let (Some((p2p, _)), Some((hop, _))) = (f.tcp_of(P2P), f.tcp_of(HOP)) {
        g.push(Goal {
            name: "p2p_tcp_direct_vs_hop",
            what: "issue 14: direct path (processes) MiB/s / one quinn hop MiB/s".into(),
            value: Some(p2p / hop),
            target: ">= 0.9",
        });
    }
    if let (Some(d), Some(h), Some(x), Some(p)) = (d, h, p50(f.rtt_of(P2P)), plain) {
        let added_hop = (h - p).max(0.0);
        g.push(Goal {
            name: "p2p_rtt_added_vs_hop_us",
            what: format!(
                "issue 14: (direct path − direct TCP) − (hop − plain udp), TCP p50s = {:.0} − {:.0} µs",
                x - d,
                added_hop
            ),
            value: Some((x - d) - added_hop),
            target: "<= 20",
        });
    }
    if let Some(s) = f.rtt_of(RELAY) {
        if let (Some(p50), Some(p99)) = (s.p50(), s.p99()) {
            g.push(Goal {
                name: "rtt_p99_over_p50_relay",
                what: "2: relay (processes) 64-byte TCP RTT p99 / p50".into(),
                value: Some(p99 / p50),
                target: "<= 2",
            });
        }
    }
    if let (Some(s), Some(hs), Some(rtt)) = (p50(f.setup_of(RELAY)), p50(f.setup_of(HOP_FULL)), r) {
        g.push(Goal {
            name: "setup_relay_vs_budget",
            what: format!(
                "2: relay setup p50 / (full quinn handshake p50 + relay RTT p50) = {s:.0} / {:.0} µs",
                hs + rtt
            ),
            value: Some(s / (hs + rtt)),
            target: "<= 1",
        });
    }
    if let Some(base) = f.wan.iter().find(|w| w.rtt.is_zero()).map(|w| w.steady) {
        for Wan { rtt, steady, .. } in f.wan.iter().filter(|w| !w.rtt.is_zero()) {
            let name: &'static str = match rtt.as_millis() {
                50 => "wan_50ms_vs_loopback",
                100 => "wan_100ms_vs_loopback",
                _ => "wan_other_rtt_vs_loopback",
            };
            g.push(Goal {
                name,
                what: format!(
                    "3: steady MiB/s at {} ms RTT per hop / at 0 ms",
                    rtt.as_millis()
                ),
                value: Some(steady / base),
                target: ">= 0.8",
            });
        }
    }
    for u in &f.udp {
        if u.mbit == 1000.0 {
            g.push(Goal {
                name: if u.size == 1200 {
                    "udp_1g_1200_delivered"
                } else {
                    "udp_1g_1472_delivered"
                },
                what: format!("4: fraction delivered, {} B at 1 Gbit/s offered", u.size),
                value: Some(u.relay.delivered(1)),
                target: ">= 0.9",
            });
        }
    }
    for size in [1200, 1472] {
        let trials: Vec<&Burst> = f.burst.iter().filter(|b| b.size == size).collect();
        if trials.is_empty() {
            continue;
        }
        let worst = trials
            .iter()
            .map(|b| b.r.delivered(3))
            .fold(f64::INFINITY, f64::min);
        g.push(Goal {
            name: if size == 1200 {
                "udp_after_burst_delivered"
            } else {
                "udp_after_burst_delivered_1472"
            },
            what: format!(
                "4: fraction delivered in the 5 s after a 1 s 30 % loss burst ({size} B), worst \
                 of {} trials",
                trials.len()
            ),
            value: Some(worst),
            target: ">= 0.9",
        });
        if size != 1200 {
            // Always on the stream (larger than any datagram on a 1500-byte path): no MTU
            // collapse to measure.
            continue;
        }
        // Payloads of the burst still queued spill into the next phase: at most all.
        let collapsed: Vec<f64> = trials
            .iter()
            .filter_map(|b| Some((b.on_stream.get(2)? / b.r.sent[3].max(1) as f64).min(1.0)))
            .collect();
        let n = collapsed.iter().filter(|c| **c > 0.5).count();
        g.push(Goal {
            name: "udp_after_burst_mtu_collapsed",
            what: format!(
                "4: fraction of those payloads too large for a datagram after the burst (MTU \
                 collapse; carried on the stream), worst of {} trials; collapsed in {n}",
                collapsed.len()
            ),
            value: collapsed.iter().copied().reduce(f64::max),
            target: "0",
        });
    }
    if let Some(s) = &f.scale {
        g.push(Goal {
            name: "scale_kib_per_connection",
            what: "5: intermediate RSS growth / idle agent connection".into(),
            value: s.kib_per_conn,
            target: "<= 30",
        });
        g.push(Goal {
            name: "scale_keepalive_cpu_pct",
            what: "5: intermediate CPU, % of one core, with every agent idle".into(),
            value: s.quiet_cpu_pct,
            target: "<= 5",
        });
        if let Some(a) = &s.anchor {
            g.push(Goal {
                name: "scale_kib_per_connection_quinn",
                what: "5, the anchor: a bare quinn server's RSS growth / idle connection".into(),
                value: a.kib_per_conn,
                target: "-",
            });
            g.push(Goal {
                name: "scale_keepalive_cpu_pct_quinn",
                what: "5, the anchor: a bare quinn server's CPU, % of one core, every connection \
                       idle"
                    .into(),
                value: a.quiet_cpu_pct,
                target: "-",
            });
        }
        g.push(Goal {
            name: "scale_memory_returned",
            what:
                "5: fraction of the connections' RSS given back once they left and drained (+6 s)"
                    .into(),
            value: s.returned,
            target: "~ 1",
        });
        g.push(Goal {
            name: "scale_storm_seconds",
            what: "5: restart → every agent connected again (nan: not all back within 120 s)"
                .into(),
            value: s.storm_secs,
            target: "<= 30",
        });
        g.push(Goal {
            name: "scale_storm_failed_attempts",
            what: format!(
                "5: attempts started after the restarted process was spawned that were refused \
                 or timed out (counted after it by time, whenever they started: {})",
                s.storm_failed_counted_after
            ),
            value: Some(s.storm_failed as f64),
            target: "0",
        });
    }
    g
}

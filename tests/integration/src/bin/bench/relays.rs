//! The relay path agent → intermediate → connector, two ways: as three child processes running
//! the real command lines (as deployed), and in this process through the library entry points
//! (on a runtime of their own, so their CPU time can be told apart from the load generator's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

use crate::backends::TcpSink;
use crate::udp_rate::UdpSink;
use ztna_integration::proxy::{self, Proxy};

/// Thread-name prefix of the runtime that hosts the in-process daemons.
pub const THREADS: &str = "ztna-rt";

pub const SERVICES: [&str; 3] = ["echo", "sink", "usink"];

/// The backends every relay forwards to.
pub struct Backends {
    pub echo_tcp: SocketAddr,
    pub echo_udp: SocketAddr,
    pub sink: TcpSink,
    pub usink: UdpSink,
    tasks: Vec<JoinHandle<()>>,
}

impl Backends {
    pub async fn start() -> Result<Backends> {
        let (echo_tcp, t1) = tcp_echo().await;
        let (echo_udp, _seen, t2) = udp_echo().await;
        let sink = crate::backends::tcp_sink().await?;
        let usink = UdpSink::bind()?;
        Ok(Backends {
            echo_tcp,
            echo_udp,
            sink,
            usink,
            tasks: vec![t1, t2],
        })
    }

    fn services(&self) -> Vec<(&'static str, Option<SocketAddr>, Option<SocketAddr>)> {
        vec![
            ("echo", Some(self.echo_tcp), Some(self.echo_udp)),
            ("sink", Some(self.sink.addr), None),
            ("usink", None, Some(self.usink.addr)),
        ]
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The agent's local ports.
#[derive(Clone, Copy)]
pub struct Ports {
    pub echo_tcp: SocketAddr,
    pub echo_udp: SocketAddr,
    pub sink: SocketAddr,
    pub usink: SocketAddr,
}

/// Which daemon executables to run: the `ztna-daemon` test binary built next to this one, or
/// the release binaries in `ZTNA_BIN_DIR` (for before/after comparisons).
#[derive(Clone)]
pub enum Bins {
    Daemon(PathBuf),
    Dir(PathBuf),
}

impl Bins {
    pub fn find() -> Result<Bins> {
        if let Some(dir) = std::env::var_os("ZTNA_BIN_DIR") {
            let dir = PathBuf::from(dir);
            for role in ["intermediate", "connector", "agent"] {
                let p = dir.join(format!("ztna-{role}"));
                if !p.is_file() {
                    bail!("ZTNA_BIN_DIR: {} does not exist", p.display());
                }
            }
            return Ok(Bins::Dir(dir));
        }
        let exe = std::env::current_exe().context("own path")?;
        let daemon = exe.with_file_name("ztna-daemon");
        if !daemon.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release -p ztna-integration --bins` \
                 (or set ZTNA_BIN_DIR to a directory with ztna-intermediate, ztna-connector and \
                 ztna-agent)",
                daemon.display()
            );
        }
        Ok(Bins::Daemon(daemon))
    }

    /// Whether these daemons have direct paths (and so the `p2p` key): the test binary always;
    /// other binaries when the agent carries the direct-path metric's name.
    pub fn knows_p2p(&self) -> bool {
        match self {
            Bins::Daemon(_) => true,
            Bins::Dir(d) => std::fs::read(d.join("ztna-agent")).is_ok_and(|b| {
                b.windows(b"ztna_agent_direct_paths".len())
                    .any(|w| w == b"ztna_agent_direct_paths")
            }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Bins::Daemon(p) => format!("{} ROLE", p.display()),
            Bins::Dir(d) => format!("{}/ztna-ROLE", d.display()),
        }
    }

    pub fn spawn(&self, role: &str, name: &str, config: &std::path::Path) -> Proc {
        match self {
            Bins::Daemon(p) => Proc::spawn_program(p, &[role], name, config, &[]),
            Bins::Dir(d) => {
                Proc::spawn_program(&d.join(format!("ztna-{role}")), &[], name, config, &[])
            }
        }
    }
}

/// The relay path as three processes, optionally with a delay proxy on each QUIC hop.
pub struct ProcRelay {
    pub im: Proc,
    pub connector: Proc,
    pub agent: Proc,
    pub im_ops: SocketAddr,
    pub c_ops: SocketAddr,
    pub a_ops: SocketAddr,
    pub ports: Ports,
    /// agent ↔ intermediate, connector ↔ intermediate (when started with a delay).
    pub proxies: Vec<Proxy>,
}

impl ProcRelay {
    /// Starts intermediate, connector and agent; with `one_way`, the agent and the connector
    /// reach the intermediate through a delay proxy each (that one-way delay per direction).
    /// `p2p`: whether agent and connector may set up a direct path (on loopback they always
    /// can, and flows would then bypass the relay and its proxies: every relay measurement
    /// runs with `false`).
    pub async fn start(
        pki: &Pki,
        bins: &Bins,
        b: &Backends,
        tag: &str,
        one_way: Option<Duration>,
        p2p: bool,
    ) -> Result<ProcRelay> {
        let listen = free_udp_port();
        let im_ops = free_tcp_port();
        let cfg = intermediate_file(pki, &format!("im-{tag}"), listen, im_ops, &SERVICES);
        let im = bins.spawn("intermediate", &format!("intermediate-{tag}"), &cfg);
        if !wait_ready(im_ops, Duration::from_secs(15)).await {
            bail!("intermediate did not become ready\n{}", im.tail(20));
        }
        let mut proxies = Vec::new();
        let (a_target, c_target) = match one_way {
            Some(d) => {
                let pa = proxy::start(listen, d).await?;
                let pc = proxy::start(listen, d).await?;
                let t = (pa.addr, pc.addr);
                proxies.push(pa);
                proxies.push(pc);
                t
            }
            None => (listen, listen),
        };
        // Older daemons (ZTNA_BIN_DIR) may predate the `p2p` key and refuse it as unknown; they
        // have no direct path either.
        let p2p_key = if p2p || bins.knows_p2p() {
            format!("\np2p = {p2p}")
        } else {
            String::new()
        };
        let c_ops = free_tcp_port();
        let cfg = connector_file(
            pki,
            &format!("conn-{tag}"),
            &[c_target],
            &b.services(),
            &format!("ops_listen = \"{c_ops}\"{p2p_key}"),
        );
        let connector = bins.spawn("connector", &format!("connector-{tag}"), &cfg);
        if !wait_ready(c_ops, Duration::from_secs(15)).await {
            bail!("connector did not become ready\n{}", connector.tail(20));
        }
        let ports = Ports {
            echo_tcp: free_tcp_port(),
            echo_udp: free_udp_port(),
            sink: free_tcp_port(),
            usink: free_udp_port(),
        };
        let a_ops = free_tcp_port();
        let cfg = agent_file(
            pki,
            &format!("agent-{tag}"),
            &[a_target],
            &[
                ("echo", "tcp", ports.echo_tcp),
                ("echo", "udp", ports.echo_udp),
                ("sink", "tcp", ports.sink),
                ("usink", "udp", ports.usink),
            ],
            &format!("ops_listen = \"{a_ops}\"{p2p_key}"),
        );
        let agent = bins.spawn("agent", &format!("agent-{tag}"), &cfg);
        let r = ProcRelay {
            im,
            connector,
            agent,
            im_ops,
            c_ops,
            a_ops,
            ports,
            proxies,
        };
        r.wait_available().await?;
        Ok(r)
    }

    /// Waits until the agent reports every service available.
    async fn wait_available(&self) -> Result<()> {
        let ok = eventually_async(Duration::from_secs(20), || async {
            let text = crate::util::scrape(self.a_ops).await;
            SERVICES
                .iter()
                .all(|s| metric(&text, "ztna_agent_service_available", &[("service", s)]) == 1.0)
        })
        .await;
        if !ok {
            bail!(
                "agent never saw every service available\n{}\n{}\n{}",
                self.agent.tail(15),
                self.connector.tail(15),
                self.im.tail(15)
            );
        }
        Ok(())
    }

    /// The agent's flows so far by path: (relay, direct), from `ztna_agent_flows_total`.
    pub async fn flows_by_path(&self) -> (f64, f64) {
        let text = crate::util::scrape(self.a_ops).await;
        let mut by = (0.0, 0.0);
        for line in text
            .lines()
            .filter(|l| l.starts_with("ztna_agent_flows_total{"))
        {
            let v: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if line.contains("path=\"direct\"") {
                by.1 += v;
            } else if line.contains("path=\"relay\"") {
                by.0 += v;
            }
        }
        by
    }

    /// Opens a flow to each service the direct-path rows use (`echo` for the RTT rows, `sink`
    /// for the TCP rows) until the agent reports a direct path up for each (within `limit`).
    /// Direct paths are per service and a service's first flow goes via the relay while its
    /// path is set up, so waiting for one service only would measure the relay in the other's
    /// first transfer.
    pub async fn wait_direct(&self, limit: Duration) -> Result<()> {
        let wanted = [self.ports.echo_tcp, self.ports.sink];
        let ok = eventually_async(limit, || async {
            for port in wanted {
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(port),
                )
                .await;
            }
            let text = crate::util::scrape(self.a_ops).await;
            metric(&text, "ztna_agent_direct_paths", &[]) >= wanted.len() as f64
        })
        .await;
        if !ok {
            bail!(
                "the direct paths for echo and sink never came up\n{}\n{}\n{}",
                self.agent.tail(15),
                self.connector.tail(15),
                self.im.tail(15)
            );
        }
        let text = crate::util::scrape(self.c_ops).await;
        crate::progress(&format!(
            "direct paths up for echo and sink on {} connection(s) to the connector",
            metric(&text, "ztna_connector_direct_connections", &[])
        ));
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
        vec![self.agent.pid(), self.im.pid(), self.connector.pid()]
    }

    /// (name, ops address) of each daemon.
    pub fn ops(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("agent", self.a_ops),
            ("intermediate", self.im_ops),
            ("connector", self.c_ops),
        ]
    }

    /// Drop counters of each daemon's /metrics, plus the datagrams the kernel dropped at its UDP
    /// sockets' full receive buffers (which no metric counts), as
    /// `udp_socket_receive_buffer_drops (kernel)`.
    pub async fn drop_snapshot(&self) -> Snapshot {
        let mut out = Vec::new();
        for ((name, ops), pid) in
            self.ops()
                .into_iter()
                .zip([self.agent.pid(), self.im.pid(), self.connector.pid()])
        {
            let mut m = crate::util::drop_counters(&crate::util::scrape(ops).await);
            m.insert(
                "udp_socket_receive_buffer_drops (kernel)".into(),
                crate::util::udp_socket_drops(pid) as f64,
            );
            out.push((name, m));
        }
        out
    }

    /// SIGTERM to all three, waits for them to exit (bounded); dropping kills what is left.
    pub async fn stop(mut self) {
        for p in [&self.agent, &self.connector, &self.im] {
            p.signal("TERM");
        }
        for p in [&mut self.agent, &mut self.connector, &mut self.im] {
            let _ = p.wait_exit(Duration::from_secs(15)).await;
        }
    }
}

/// Per daemon: counter name with labels → value.
pub type Snapshot = Vec<(&'static str, std::collections::HashMap<String, f64>)>;

/// What moved between two snapshots, as `daemon: name{labels} +delta`.
pub fn snapshot_deltas(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    before
        .iter()
        .zip(after)
        .flat_map(|((name, b), (_, a))| {
            crate::util::counter_deltas(b, a)
                .into_iter()
                .map(move |l| format!("{name}: {l}"))
        })
        .collect()
}

/// Polls an async condition every 50 ms until true or `limit` passes.
pub async fn eventually_async<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The relay path in this process, on the `ztna` runtime.
pub struct InprocRelay {
    im: IntermediateHandle,
    c: ConnectorHandle,
    a: AgentHandle,
    pub ports: Ports,
}

impl InprocRelay {
    pub async fn start(ztna: &Handle, pki: Arc<Pki>, b: &Backends) -> Result<InprocRelay> {
        let services = b.services();
        let (im, c, a) = ztna
            .spawn(async move {
                let im = start_intermediate(&pki, open_policy(&SERVICES));
                let svc: Vec<(&str, Option<SocketAddr>, Option<SocketAddr>)> = services.to_vec();
                let mut c = start_connector(&pki, "inproc", &[im.addr], &svc);
                c.wait_registered(1).await;
                let forwards = [
                    ("echo", ForwardProtocol::Tcp),
                    ("echo", ForwardProtocol::Udp),
                    ("sink", ForwardProtocol::Tcp),
                    ("usink", ForwardProtocol::Udp),
                ];
                let mut a = start_agent(&pki, "inproc", &[im.addr], &forwards).await;
                for s in SERVICES {
                    a.wait_status(s, ServiceState::Available).await;
                }
                (im, c, a)
            })
            .await
            .context("starting the in-process relay")?;
        let ports = Ports {
            echo_tcp: a.port("echo", Protocol::Tcp),
            echo_udp: a.port("echo", Protocol::Udp),
            sink: a.port("sink", Protocol::Tcp),
            usink: a.port("usink", Protocol::Udp),
        };
        Ok(InprocRelay { im, c, a, ports })
    }

    pub async fn stop(self) {
        self.a.daemon.shutdown().await;
        self.c.daemon.shutdown().await;
        self.im.daemon.shutdown().await;
    }
}

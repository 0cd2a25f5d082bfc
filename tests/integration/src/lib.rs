//! Test harness: a throwaway PKI, echo backends, and the three daemons started through their
//! library entry points on loopback.

pub mod hostile;
pub mod proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use ztna_node::config::TlsConfig;
use ztna_node::CancellationToken;
use ztna_pki::{Ca, IssueRequest, Issued, Validity};

pub use ztna_agent::{Forward, ForwardProtocol};
pub use ztna_intermediate::policy::PolicyRule;

pub const TD: &str = "test.example";

/// Installs a test log subscriber once (RUST_LOG controls it; quiet by default).
pub fn logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A deployment CA in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_path: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        Self::with_domain(TD)
    }

    pub fn with_domain(td: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate(td, Validity::days(30)).expect("CA");
        let (ca_path, _) = ca.write(dir.path(), false).expect("write CA");
        Pki { dir, ca, ca_path }
    }

    /// Writes an issued cert and returns a `[tls]` section trusting *this* CA.
    pub fn tls_for(&self, issued: &Issued, file: &str) -> TlsConfig {
        let (cert, key) = issued
            .write(self.dir.path(), file, true)
            .expect("write cert");
        TlsConfig {
            ca: self.ca_path.clone(),
            cert,
            key,
        }
    }

    pub fn issue(&self, role: &str, name: &str) -> TlsConfig {
        let issued = self
            .ca
            .issue(&IssueRequest::new(role, name))
            .expect("issue");
        self.tls_for(&issued, &format!("{role}-{name}"))
    }

    pub fn id(role: &str, name: &str) -> String {
        format!("spiffe://{TD}/{role}/{name}")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Policy that lets `connector/*` serve and `agent/*` reach each service.
pub fn open_policy(services: &[&str]) -> Vec<PolicyRule> {
    services
        .iter()
        .map(|s| PolicyRule {
            service: s.to_string(),
            connectors: vec![format!("spiffe://{TD}/connector/*")],
            agents: vec![format!("spiffe://{TD}/agent/*")],
        })
        .collect()
}

pub struct Daemon<M> {
    pub metrics: M,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl<M> Daemon<M> {
    /// Cancels and waits for the daemon to return.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn tls_toml(tls: &TlsConfig) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    )
}

pub struct IntermediateHandle {
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub daemon: Daemon<ztna_intermediate::metrics::Metrics>,
}

pub fn intermediate_config(
    pki: &Pki,
    listen: SocketAddr,
    policy: Vec<PolicyRule>,
) -> ztna_intermediate::Config {
    let tls = pki.issue("intermediate", "relay");
    let text = format!(
        "listen = \"{listen}\"\nops_listen = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n{}",
        tls_toml(&tls)
    );
    let mut cfg: ztna_intermediate::Config = toml::from_str(&text).expect("intermediate config");
    cfg.policy = policy;
    cfg
}

pub fn start_intermediate_with(cfg: ztna_intermediate::Config) -> IntermediateHandle {
    let im = ztna_intermediate::Intermediate::bind(cfg).expect("bind intermediate");
    let addr = im.local_addr().expect("addr");
    let ops = im.ops_addr().expect("ops addr");
    let metrics = im.metrics();
    let stop = CancellationToken::new();
    let task = tokio::spawn(im.run(stop.clone()));
    IntermediateHandle {
        addr,
        ops,
        daemon: Daemon {
            metrics,
            stop,
            task,
        },
    }
}

pub fn start_intermediate(pki: &Pki, policy: Vec<PolicyRule>) -> IntermediateHandle {
    start_intermediate_with(intermediate_config(pki, loopback0(), policy))
}

pub struct ConnectorHandle {
    pub ops: SocketAddr,
    /// Its QUIC endpoint (where direct paths arrive), as a loopback address.
    pub quic: SocketAddr,
    /// The configuration it was started with, and its reload handle (what SIGHUP calls).
    pub config: ztna_connector::Config,
    pub handle: ztna_connector::Handle,
    pub daemon: Daemon<ztna_connector::Metrics>,
    pub registered: tokio::sync::watch::Receiver<ztna_connector::Registrations>,
}

/// Intermediates on which at least one service is registered.
pub fn registered_on(regs: &ztna_connector::Registrations) -> usize {
    regs.iter()
        .filter(|r| {
            r.values()
                .any(|s| *s == ztna_connector::Registration::Registered)
        })
        .count()
}

impl ConnectorHandle {
    /// Waits until registered with `n` intermediates.
    pub async fn wait_registered(&mut self, n: usize) {
        let ok = tokio::time::timeout(
            Duration::from_secs(10),
            self.registered.wait_for(|v| registered_on(v) >= n),
        )
        .await;
        assert!(
            matches!(ok, Ok(Ok(_))),
            "connector did not register with {n} intermediate(s)"
        );
    }
}

/// `services`: (name, tcp backend, udp backend).
pub fn start_connector(
    pki: &Pki,
    name: &str,
    intermediates: &[SocketAddr],
    services: &[(&str, Option<SocketAddr>, Option<SocketAddr>)],
) -> ConnectorHandle {
    let tls = pki.issue("connector", name);
    start_connector_with(tls, intermediates, services, "")
}

/// Top-level settings shared by connector and agent configs, then `settings` (which may
/// override the defaults used here), then `[tls]`.
fn client_toml(
    tls: &TlsConfig,
    intermediates: &[SocketAddr],
    defaults: &str,
    settings: &str,
) -> String {
    let list: Vec<String> = intermediates.iter().map(|a| format!("\"{a}\"")).collect();
    let mut text = format!("intermediates = [{}]\n{settings}\n", list.join(", "));
    for line in defaults.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if !settings.lines().any(|l| l.trim_start().starts_with(key)) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str(&tls_toml(tls));
    text
}

/// Connector config text: `services` are (name, tcp backend, udp backend).
fn connector_toml<B: std::fmt::Display>(
    tls: &TlsConfig,
    intermediates: &[SocketAddr],
    services: &[(&str, Option<B>, Option<B>)],
    settings: &str,
) -> String {
    let defaults =
        "udp_idle_timeout = \"10s\"\ndrain_timeout = \"5s\"\nops_listen = \"127.0.0.1:0\"";
    let mut text = client_toml(tls, intermediates, defaults, settings);
    for (name, tcp, udp) in services {
        text.push_str(&format!("[[service]]\nname = \"{name}\"\n"));
        if let Some(t) = tcp {
            text.push_str(&format!("tcp = \"{t}\"\n"));
        }
        if let Some(u) = udp {
            text.push_str(&format!("udp = \"{u}\"\n"));
        }
    }
    text
}

/// Writes a connector config file for a child process and returns its path.
pub fn connector_file(
    pki: &Pki,
    name: &str,
    intermediates: &[SocketAddr],
    services: &[(&str, Option<SocketAddr>, Option<SocketAddr>)],
    settings: &str,
) -> PathBuf {
    let tls = pki.issue("connector", name);
    let path = pki.dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &path,
        connector_toml(&tls, intermediates, services, settings),
    )
    .expect("write config");
    path
}

/// Writes an agent config file for a child process (`forwards`: service, protocol, local
/// address) and returns its path.
pub fn agent_file(
    pki: &Pki,
    name: &str,
    intermediates: &[SocketAddr],
    forwards: &[(&str, &str, SocketAddr)],
    settings: &str,
) -> PathBuf {
    let tls = pki.issue("agent", name);
    let mut text = client_toml(
        &tls,
        intermediates,
        "ops_listen = \"127.0.0.1:0\"",
        settings,
    );
    for (service, protocol, listen) in forwards {
        text.push_str(&format!(
            "[[forward]]\nservice = \"{service}\"\nprotocol = \"{protocol}\"\nlisten = \"{listen}\"\n"
        ));
    }
    let path = pki.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Starts a connector; `settings` are extra top-level TOML lines (e.g. `udp_idle_timeout = "1s"`).
pub fn start_connector_with(
    tls: TlsConfig,
    intermediates: &[SocketAddr],
    services: &[(&str, Option<SocketAddr>, Option<SocketAddr>)],
    settings: &str,
) -> ConnectorHandle {
    let text = connector_toml(&tls, intermediates, services, settings);
    start_connector_text(&text, ztna_connector::Resolver::system())
}

/// Starts a connector whose backends are written as in a config file (`"db.test:5432"`,
/// `"127.0.0.1:8080"`), with backend names resolved by `resolver`.
pub fn start_connector_resolving(
    pki: &Pki,
    name: &str,
    intermediates: &[SocketAddr],
    services: &[(&str, Option<&str>, Option<&str>)],
    resolver: ztna_connector::Resolver,
) -> ConnectorHandle {
    let tls = pki.issue("connector", name);
    let text = connector_toml(&tls, intermediates, services, "");
    start_connector_text(&text, resolver)
}

fn start_connector_text(text: &str, resolver: ztna_connector::Resolver) -> ConnectorHandle {
    let cfg: ztna_connector::Config = toml::from_str(text).expect("connector config");
    cfg.validate().expect("valid connector config");
    let config = cfg.clone();
    let c = ztna_connector::Connector::bind_with_resolver(cfg, resolver).expect("bind connector");
    let handle = c.handle();
    let metrics = c.metrics();
    let registered = c.registrations();
    let ops = c.ops_addr().expect("ops addr");
    let port = c.local_addr().expect("quic addr").port();
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.run(stop.clone()));
    ConnectorHandle {
        ops,
        quic: SocketAddr::from(([127, 0, 0, 1], port)),
        config,
        handle,
        daemon: Daemon {
            metrics,
            stop,
            task,
        },
        registered,
    }
}

pub struct AgentHandle {
    pub ops: SocketAddr,
    pub daemon: Daemon<ztna_agent::Metrics>,
    /// (service, protocol, local address) in forward order.
    pub ports: Vec<(String, ztna_proto::Protocol, SocketAddr)>,
    /// What the agent knows about its relays.
    pub relays: tokio::sync::watch::Receiver<ztna_agent::Snapshot>,
    /// The configuration it was started with, and its reload handle (what SIGHUP calls).
    pub config: ztna_agent::Config,
    pub handle: ztna_agent::Handle,
}

impl AgentHandle {
    pub fn port(&self, service: &str, protocol: ztna_proto::Protocol) -> SocketAddr {
        self.ports
            .iter()
            .find(|(s, p, _)| s == service && *p == protocol)
            .map(|(_, _, a)| *a)
            .expect("forward configured")
    }

    /// Waits until the agent sees `service` in the given state (as a user would: available if
    /// some usable relay has it), and returns the reason the relay gave.
    pub async fn wait_status(&mut self, service: &str, want: ztna_proto::ServiceState) -> String {
        let mut reason = String::new();
        let ok = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some((a, r)) = self.relays.borrow().service_state(service) {
                    if a == want {
                        reason = r;
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "agent never saw {service} in state {want:?}");
        reason
    }

    /// Waits until the agent's relay number `relay` (configuration order) is up, not draining,
    /// and has `service` available: new flows then go to the first such relay, so a test that
    /// counts flows per relay waits for the one it expects to carry them.
    pub async fn wait_relay_has(&mut self, relay: usize, service: &str) {
        let ok = eventually(Duration::from_secs(10), || {
            self.relays.borrow().relays.get(relay).is_some_and(|r| {
                r.usable() && r.state(service) == Some(ztna_proto::ServiceState::Available)
            })
        })
        .await;
        assert!(ok, "agent's relay {relay} never had {service} available");
    }

    /// Waits until the agent has seen relay number `relay` announce its drain (GoAway).
    pub async fn wait_relay_draining(&mut self, relay: usize) {
        let ok = eventually(Duration::from_secs(10), || {
            self.relays
                .borrow()
                .relays
                .get(relay)
                .is_some_and(|r| r.draining())
        })
        .await;
        assert!(ok, "agent never saw relay {relay} draining");
    }
}

pub async fn start_agent(
    pki: &Pki,
    name: &str,
    intermediates: &[SocketAddr],
    forwards: &[(&str, ForwardProtocol)],
) -> AgentHandle {
    start_agent_with(pki.issue("agent", name), intermediates, forwards, "").await
}

/// The common chain behind an intermediate at `im`: connector `web-1` serving `web` from the
/// TCP backend `echo` (registered), and agent `alice` forwarding `web` over TCP (available).
pub async fn web_chain(
    pki: &Pki,
    im: SocketAddr,
    echo: SocketAddr,
) -> (ConnectorHandle, AgentHandle) {
    web_chain_with(pki, im, echo, "", "").await
}

/// [`web_chain`] with extra top-level TOML lines for the connector and for the agent (e.g.
/// `p2p = true`, `bind = "[::1]:0"`).
pub async fn web_chain_with(
    pki: &Pki,
    im: SocketAddr,
    echo: SocketAddr,
    connector_settings: &str,
    agent_settings: &str,
) -> (ConnectorHandle, AgentHandle) {
    let mut c = start_connector_with(
        pki.issue("connector", "web-1"),
        &[im],
        &[("web", Some(echo), None)],
        connector_settings,
    );
    c.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im],
        &[("web", ForwardProtocol::Tcp)],
        agent_settings,
    )
    .await;
    a.wait_status("web", ztna_proto::ServiceState::Available)
        .await;
    (c, a)
}

/// A UDP chain: connector `dns-1` serving `dns` (UDP, backend `echo`) and agent `alice`
/// forwarding it, both on `im` and ready. Like [`web_chain`].
pub async fn dns_chain(
    pki: &Pki,
    im: SocketAddr,
    echo: SocketAddr,
) -> (ConnectorHandle, AgentHandle) {
    let mut c = start_connector(pki, "dns-1", &[im], &[("dns", None, Some(echo))]);
    c.wait_registered(1).await;
    let mut a = start_agent(pki, "alice", &[im], &[("dns", ForwardProtocol::Udp)]).await;
    a.wait_status("dns", ztna_proto::ServiceState::Available)
        .await;
    (c, a)
}

/// Starts an agent; `settings` are extra top-level TOML lines.
pub async fn start_agent_with(
    tls: TlsConfig,
    intermediates: &[SocketAddr],
    forwards: &[(&str, ForwardProtocol)],
    settings: &str,
) -> AgentHandle {
    try_start_agent_with(tls, intermediates, forwards, settings)
        .await
        .expect("bind agent")
}

/// [`start_agent_with`], or why the agent refused to start.
pub async fn try_start_agent_with(
    tls: TlsConfig,
    intermediates: &[SocketAddr],
    forwards: &[(&str, ForwardProtocol)],
    settings: &str,
) -> Result<AgentHandle, String> {
    // Relay behaviour is what most tests check: direct paths are opt-in here (`p2p = true`).
    let defaults = "udp_idle_timeout = \"10s\"\nopen_timeout = \"5s\"\nops_listen = \"127.0.0.1:0\"\np2p = false";
    let text = client_toml(&tls, intermediates, defaults, settings);
    let mut cfg: ztna_agent::Config = toml::from_str(&text).expect("agent config");
    cfg.forward = forwards
        .iter()
        .map(|(s, p)| Forward {
            service: s.to_string(),
            protocol: *p,
            listen: loopback0(),
        })
        .collect();
    let config = cfg.clone();
    let agent = ztna_agent::Agent::bind(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let handle = agent.handle();
    let ports = agent.local_addrs();
    let ops = agent.ops_addr().expect("ops addr");
    let metrics = agent.metrics();
    let relays = agent.relays();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    Ok(AgentHandle {
        ops,
        daemon: Daemon {
            metrics,
            stop,
            task,
        },
        ports,
        relays,
        config,
        handle,
    })
}

/// TCP echo backend. Echoes until the client half-closes, then closes its side.
pub async fn tcp_echo() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(loopback0()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// TCP backend that answers every connection with its own name, then closes.
pub async fn tcp_named(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(loopback0()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// UDP echo backend; records every source address it saw (the connector's backend-facing sockets).
pub async fn udp_echo() -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>, JoinHandle<()>) {
    udp_echo_on(loopback0()).await
}

/// [`udp_echo`] on a given address (a backend that comes back on its port).
pub async fn udp_echo_on(
    at: SocketAddr,
) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>, JoinHandle<()>) {
    let s = UdpSocket::bind(at).await.expect("bind");
    let addr = s.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            {
                let mut v = seen2.lock().unwrap_or_else(|p| p.into_inner());
                if !v.contains(&from) {
                    v.push(from);
                }
            }
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen, task)
}

/// Sends `msg` on a connected UDP socket (a client of an agent's UDP forward, an echo behind it)
/// until it comes back, at most 20 times; answers to earlier datagrams that arrive first are
/// read and skipped. How many sends it took, or `None`.
pub async fn udp_round_trip(client: &UdpSocket, msg: &[u8]) -> Option<usize> {
    let mut buf = [0u8; 2048];
    for attempt in 1..=20 {
        client.send(msg).await.ok()?;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(250), client.recv(&mut buf)).await
        {
            if &buf[..n] == msg {
                return Some(attempt);
            }
        }
    }
    None
}

/// Connects to a local forward and exchanges `msg`, returning what came back (until EOF).
pub async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Value of a counter/gauge sample in a rendered metrics text, summed over matching lines.
/// Opens a local connection to an agent port that should be refused; asserts that nothing was
/// delivered on it and returns how long the refusal took.
pub async fn refused_locally(port: SocketAddr) -> Duration {
    let started = std::time::Instant::now();
    if let Ok(mut s) = tokio::net::TcpStream::connect(port).await {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        assert!(
            matches!(r, Ok(Err(_))) || (matches!(r, Ok(Ok(_))) && buf.is_empty()),
            "a refused connection to {port} delivered {} bytes or hung: {r:?}",
            buf.len()
        );
    }
    started.elapsed()
}

/// Agents connected to an intermediate, from its metrics.
pub fn agents_on(h: &IntermediateHandle) -> f64 {
    metric(
        &h.daemon.metrics.common.render(),
        "ztna_intermediate_connections",
        &[("role", "agent")],
    )
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Sends `n` datagrams that name a flow no one has (id 4242) and `n` without a valid flow id (a
/// varint that announces 8 bytes and has 1) on `conn`; then waits (5 s at most) until the
/// receiving daemon's `dropped` counter (`render` gives its metrics text) shows at least `n`
/// under `unknown_flow` and under `malformed`. Returns the two counts.
pub async fn stray_datagrams_counted(
    conn: &quinn::Connection,
    n: usize,
    render: impl Fn() -> String,
    dropped: &str,
) -> (f64, f64) {
    let mut arena = bytes::BytesMut::new();
    let unknown = ztna_proto::datagram::encode_into(&mut arena, 4242, b"no such flow")
        .expect("a small flow id encodes");
    for _ in 0..n {
        let _ = conn.send_datagram(unknown.clone());
        let _ = conn.send_datagram(bytes::Bytes::from_static(&[0xff]));
    }
    let counts = || {
        let text = render();
        (
            metric(&text, dropped, &[("reason", "unknown_flow")]),
            metric(&text, dropped, &[("reason", "malformed")]),
        )
    };
    eventually(Duration::from_secs(5), || {
        let (u, m) = counts();
        u >= n as f64 && m >= n as f64
    })
    .await;
    counts()
}

/// Polls an async check until it returns true or `limit` passes.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f().await
}

/// A hand-driven QUIC client with a given certificate, for hostile-peer tests.
pub async fn raw_connect(
    tls: &TlsConfig,
    role: ztna_proto::Role,
    server: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let identity = ztna_node::Identity::load(tls, role).map_err(|e| e.to_string())?;
    let cfg = ztna_node::transport::client_config(
        &identity,
        ztna_proto::Role::Intermediate,
        &ztna_node::transport::TransportOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let ep = quinn::Endpoint::client(loopback0()).map_err(|e| e.to_string())?;
    let connecting = ep
        .connect_with(cfg, server, "ztna-intermediate")
        .map_err(|e| e.to_string())?;
    match connecting.await {
        Ok(c) => Ok((ep, c)),
        Err(e) => Err(ztna_node::identity::describe_connection_error(&e)),
    }
}

/// Connects with a certificate the server should refuse and returns the refusal as the client
/// sees it. In TLS 1.3 the client may finish its side of the handshake before the server has
/// checked the client certificate, so a refusal can also arrive as an immediate close.
pub async fn refused(
    tls: &TlsConfig,
    role: ztna_proto::Role,
    server: SocketAddr,
) -> Option<String> {
    match raw_connect(tls, role, server).await {
        Err(e) => Some(e),
        Ok((_ep, conn)) => {
            let _ = conn.open_bi().await;
            closed_reason(&conn).await
        }
    }
}

/// Waits for a connection to close and describes why.
pub async fn closed_reason(conn: &quinn::Connection) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .ok()
        .map(|e| ztna_node::identity::describe_connection_error(&e))
}

/// A loopback port below the kernel's ephemeral range that `bindable` could bind a moment ago.
///
/// A port the kernel picked for a port-0 bind is free only until the next outgoing connection
/// or port-0 bind, ours or a daemon's, takes it as its own (CI saw an agent fail with "cannot
/// bind TCP forward 127.0.0.1:36581: Address already in use"). Ports below
/// `ip_local_port_range` are never handed out that way. A counter keeps this process's picks
/// apart, and the process id spreads concurrent test processes over the range.
fn pick_port(bindable: impl Fn(SocketAddr) -> bool) -> Option<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FLOOR: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())?;
    let span = ephemeral_low.checked_sub(FLOOR).filter(|s| *s >= 1000)?;
    let base = std::process::id().wrapping_mul(7919) % span;
    (0..span.min(4000)).find_map(|_| {
        let port = FLOOR + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        bindable(addr).then_some(addr)
    })
}

/// A loopback port that was free a moment ago (UDP for QUIC listeners).
pub fn free_udp_port() -> SocketAddr {
    pick_port(|a| std::net::UdpSocket::bind(a).is_ok()).unwrap_or_else(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    })
}

/// A loopback TCP port that was free a moment ago (ops endpoints and forwards of child
/// processes).
pub fn free_tcp_port() -> SocketAddr {
    pick_port(|a| std::net::TcpListener::bind(a).is_ok()).unwrap_or_else(|| {
        let s = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    })
}

/// `GET` on an ops endpoint: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    ztna_node::ops::get(addr, path)
        .await
        .unwrap_or((0, String::new()))
}

/// Writes an intermediate config file and returns its path.
pub fn intermediate_file(
    pki: &Pki,
    name: &str,
    listen: SocketAddr,
    ops: SocketAddr,
    services: &[&str],
) -> PathBuf {
    let tls = pki.issue("intermediate", name);
    let mut text = format!(
        "listen = \"{listen}\"\nops_listen = \"{ops}\"\ndrain_timeout = \"10s\"\n{}",
        tls_toml(&tls)
    );
    for s in services {
        text.push_str(&format!(
            "[[policy]]\nservice = \"{s}\"\nconnectors = [\"spiffe://{TD}/connector/*\"]\nagents = [\"spiffe://{TD}/agent/*\"]\n"
        ));
    }
    let path = pki.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// A daemon running as a child process (the real command line, via the `ztna-daemon` test
/// binary). Killed on drop; its output goes to a log file whose tail is printed on failure.
pub struct Proc {
    pub name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    /// `bin` is the test's `env!("CARGO_BIN_EXE_ztna-daemon")` (only test targets see it).
    pub fn spawn(
        bin: &str,
        role: &str,
        name: &str,
        config: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Proc {
        Self::spawn_program(bin.as_ref(), &[role], name, config, env)
    }

    /// Runs `program ARGS... --config CONFIG` (e.g. a release `ztna-intermediate` with no
    /// arguments before `--config`).
    pub fn spawn_program(
        program: &std::path::Path,
        args: &[&str],
        name: &str,
        config: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Proc {
        let log = config.with_extension(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = std::process::Command::new(program)
            .args(args)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ztna-daemon");
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} failed", self.name);
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; returns its exit code (None on timeout or by signal).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if tokio::time::Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` log lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- last {n} lines of {} ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.tail(30));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until an ops endpoint answers `/readyz` with 200.
pub async fn wait_ready(ops: SocketAddr, limit: Duration) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if http_get(ops, "/readyz").await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A policy rule: `agents` may reach `service` at any connector.
pub fn reach(service: &str, agents: &[&str]) -> PolicyRule {
    PolicyRule {
        service: service.into(),
        connectors: vec![format!("spiffe://{TD}/connector/*")],
        agents: agents.iter().map(|a| Pki::id("agent", a)).collect(),
    }
}

/// An intermediate in this process that a test can reload: its address, handle, stop token and
/// task.
pub fn reloadable_intermediate(
    cfg: ztna_intermediate::Config,
) -> (
    std::net::SocketAddr,
    ztna_intermediate::Handle,
    ztna_node::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let im = ztna_intermediate::Intermediate::bind(cfg).expect("bind intermediate");
    let (addr, handle) = (im.local_addr().expect("addr"), im.handle());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = im.run(stop).await;
        }
    });
    (addr, handle, stop, task)
}

/// A TCP backend that counts the connections it accepts (none may come from a refused ticket).
pub async fn counting_echo() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, n)
}

//! Operations: the ops endpoint and its metrics contract, readiness, sd_notify, drains and
//! restarts of intermediates under continuous load, crash recovery with backoff, connector
//! shutdown, and SIGHUP reload. Process-level cases run the real command lines via `ztna-daemon`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-daemon");

const INTERMEDIATE_METRICS: &[&str] = &[
    "ztna_build_info",
    "ztna_tls_cert_expiry_timestamp_seconds",
    "ztna_intermediate_connections",
    "ztna_intermediate_handshakes_total",
    "ztna_intermediate_service_connectors",
    "ztna_intermediate_flows_active",
    "ztna_intermediate_flows_total",
    "ztna_intermediate_relay_bytes_total",
    "ztna_intermediate_datagrams_dropped_total",
    "ztna_intermediate_p2p_total",
    "ztna_intermediate_peer_rtt_seconds_bucket",
    "ztna_intermediate_draining",
];
const CONNECTOR_METRICS: &[&str] = &[
    "ztna_build_info",
    "ztna_tls_cert_expiry_timestamp_seconds",
    "ztna_connector_intermediates_connected",
    "ztna_connector_reconnects_total",
    "ztna_connector_flows_active",
    "ztna_connector_flows_total",
    "ztna_connector_bytes_total",
    "ztna_connector_backend_errors_total",
    "ztna_connector_udp_rejected_total",
];
const AGENT_METRICS: &[&str] = &[
    "ztna_build_info",
    "ztna_tls_cert_expiry_timestamp_seconds",
    "ztna_agent_connected",
    "ztna_agent_service_available",
    "ztna_agent_flows_total",
];

fn assert_present(what: &str, text: &str, names: &[&str]) {
    for n in names {
        assert!(
            text.lines().any(|l| !l.starts_with('#')
                && (l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} ")))),
            "{what}: metric {n} missing from /metrics"
        );
    }
}

/// Runs `promtool check metrics` on a scrape, if promtool is installed.
fn promtool_check(what: &str, text: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIP promtool check for {what}: promtool not installed (Debian package `prometheus`; .ci/run installs it)");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed for {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn ready(ops: std::net::SocketAddr) -> u16 {
    http_get(ops, "/readyz").await.0
}

async fn until_ready(ops: std::net::SocketAddr, want: u16) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if ready(ops).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_contract_moves_with_traffic_and_readyz_follows_the_design() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (uecho, _s, _u) = udp_echo().await;
    let relay = free_udp_port();
    // Connector and agent start before the intermediate exists: not ready.
    let mut c = start_connector(&pki, "web-1", &[relay], &[("web", Some(echo), Some(uecho))]);
    let mut a = start_agent(
        &pki,
        "alice",
        &[relay],
        &[("web", ForwardProtocol::Tcp), ("web", ForwardProtocol::Udp)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready(c.ops).await,
        503,
        "connector ready without any intermediate"
    );
    assert_eq!(ready(a.ops).await, 503, "agent ready without a tunnel");
    assert_eq!(
        http_get(c.ops, "/healthz").await.0,
        200,
        "healthz is about liveness, not connectivity"
    );

    let im = start_intermediate_with(intermediate_config(&pki, relay, open_policy(&["web"])));
    assert!(
        until_ready(im.ops, 200).await,
        "listening intermediate not ready"
    );
    c.wait_registered(1).await;
    assert!(
        until_ready(c.ops, 200).await,
        "registered connector not ready"
    );
    a.wait_status("web", ServiceState::Available).await;
    assert!(until_ready(a.ops, 200).await, "connected agent not ready");
    let (_, body) = http_get(c.ops, "/readyz").await;
    assert!(
        body.contains("registered web on 1/1 intermediates"),
        "{body}"
    );

    // Traffic: TCP and UDP.
    for _ in 0..5 {
        assert_eq!(
            tcp_roundtrip(a.port("web", Protocol::Tcp), b"ping")
                .await
                .unwrap(),
            b"ping"
        );
    }
    let u = UdpSocket::bind(loopback0()).await.unwrap();
    u.connect(a.port("web", Protocol::Udp)).await.unwrap();
    let mut buf = [0u8; 64];
    let mut echoed = false;
    for _ in 0..20 {
        u.send(b"dgram").await.unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), u.recv(&mut buf)).await
        {
            echoed = true;
            break;
        }
    }
    assert!(echoed);

    let (code, im_text) = http_get(im.ops, "/metrics").await;
    assert_eq!(code, 200);
    let (_, c_text) = http_get(c.ops, "/metrics").await;
    let (_, a_text) = http_get(a.ops, "/metrics").await;
    assert_present("intermediate", &im_text, INTERMEDIATE_METRICS);
    assert_present("connector", &c_text, CONNECTOR_METRICS);
    assert_present("agent", &a_text, AGENT_METRICS);
    promtool_check("intermediate", &im_text);
    promtool_check("connector", &c_text);
    promtool_check("agent", &a_text);
    // They moved.
    let m = |t: &str, n: &str, l: &[(&str, &str)]| metric(t, n, l);
    assert_eq!(
        m(
            &im_text,
            "ztna_intermediate_connections",
            &[("role", "agent")]
        ),
        1.0
    );
    assert_eq!(
        m(
            &im_text,
            "ztna_intermediate_connections",
            &[("role", "connector")]
        ),
        1.0
    );
    assert!(
        m(
            &im_text,
            "ztna_intermediate_handshakes_total",
            &[("result", "ok")]
        ) >= 2.0
    );
    assert_eq!(
        m(
            &im_text,
            "ztna_intermediate_service_connectors",
            &[("service", "web")]
        ),
        1.0
    );
    assert_eq!(
        m(
            &im_text,
            "ztna_intermediate_flows_total",
            &[("protocol", "tcp"), ("result", "ok")]
        ),
        5.0
    );
    assert_eq!(
        m(
            &im_text,
            "ztna_intermediate_flows_total",
            &[("protocol", "udp"), ("result", "ok")]
        ),
        1.0
    );
    assert!(
        m(
            &im_text,
            "ztna_intermediate_relay_bytes_total",
            &[("protocol", "tcp"), ("direction", "to_agent")]
        ) >= 20.0
    );
    assert!(
        m(
            &im_text,
            "ztna_intermediate_relay_bytes_total",
            &[("protocol", "udp"), ("direction", "to_connector")]
        ) >= 5.0
    );
    assert!(
        m(
            &im_text,
            "ztna_intermediate_peer_rtt_seconds_count",
            &[("role", "connector")]
        ) >= 1.0
    );
    assert!(m(&im_text, "ztna_tls_cert_expiry_timestamp_seconds", &[]) > 1.7e9);
    assert_eq!(
        m(&c_text, "ztna_connector_intermediates_connected", &[]),
        1.0
    );
    assert_eq!(
        m(
            &c_text,
            "ztna_connector_flows_total",
            &[("service", "web"), ("protocol", "tcp"), ("result", "ok")]
        ),
        5.0
    );
    assert!(
        m(
            &c_text,
            "ztna_connector_bytes_total",
            &[("service", "web"), ("direction", "to_backend")]
        ) >= 25.0
    );
    assert_eq!(m(&a_text, "ztna_agent_connected", &[]), 1.0);
    assert_eq!(
        m(
            &a_text,
            "ztna_agent_service_available",
            &[("service", "web")]
        ),
        1.0
    );
    assert_eq!(
        m(
            &a_text,
            "ztna_agent_flows_total",
            &[
                ("service", "web"),
                ("protocol", "tcp"),
                ("path", "relay"),
                ("result", "ok")
            ]
        ),
        5.0
    );

    // Drain with a flow running: the intermediate is not ready at once, and the agent (told by
    // GoAway, with nowhere else to go) is not ready either.
    let mut held = TcpStream::connect(a.port("web", Protocol::Tcp))
        .await
        .unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    im.daemon.stop.cancel();
    assert!(
        until_ready(im.ops, 503).await,
        "draining intermediate still ready"
    );
    let (_, body) = http_get(im.ops, "/readyz").await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(
        m(
            &http_get(im.ops, "/metrics").await.1,
            "ztna_intermediate_draining",
            &[]
        ),
        1.0
    );
    assert!(
        until_ready(a.ops, 503).await,
        "agent ready after GoAway with no other intermediate"
    );
    assert!(
        !im.daemon.task.is_finished(),
        "drain did not wait for the running flow"
    );
    // The running flow still works during the drain.
    held.write_all(b"y").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");
    drop(held);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), im.daemon.task)
            .await
            .is_ok()
    );
    assert!(
        until_ready(c.ops, 503).await,
        "connector ready with no intermediate"
    );
    c.daemon.shutdown().await;
    a.daemon.shutdown().await;
}

/// A flow open that reaches an intermediate after its drain started and after its connectors
/// left must come back as `Draining` (the agent then retries on the next intermediate), not as
/// "unavailable", which the agent would pass on to the user as a refused connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_opened_on_a_draining_intermediate_is_told_to_go_elsewhere() {
    use ztna_node::io::{write_frame, FramedRecv};
    use ztna_proto::{ClientMsg, FlowOpen, FlowReply, RejectReason, Role, ServerMsg};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;

    let tls = pki.issue("agent", "alice");
    let (_ep, conn) = raw_connect(&tls, Role::Agent, im.addr)
        .await
        .expect("agent connects");
    let (mut ctl_send, ctl_recv) = conn.open_bi().await.expect("control stream");
    let mut ctl_recv = FramedRecv::new(ctl_recv);
    let hello = ClientMsg::Hello {
        version: ztna_proto::PROTOCOL_VERSION,
        role: Role::Agent,
        software: "test".into(),
        watch: vec!["web".into()],
    };
    write_frame(&mut ctl_send, &hello).await.expect("hello");
    let open = |conn: quinn::Connection| async move {
        let (mut s, r) = conn.open_bi().await.expect("flow stream");
        let mut r = FramedRecv::new(r);
        let req = FlowOpen {
            service: "web".into(),
            protocol: Protocol::Tcp,
            flow_id: 0,
        };
        write_frame(&mut s, &req).await.expect("flow open");
        let reply = r
            .expect::<FlowReply>(Duration::from_secs(5))
            .await
            .expect("flow reply");
        (s, r, reply)
    };
    // A running flow keeps the drain waiting.
    let (mut held_s, mut held_r, reply) = open(conn.clone()).await;
    assert!(matches!(reply, FlowReply::Accept), "{reply:?}");
    held_s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    held_r.stream().read_exact(&mut buf).await.expect("echo");

    im.daemon.stop.cancel();
    let mut goaway = false;
    while let Ok(m) = ctl_recv.expect::<ServerMsg>(Duration::from_secs(5)).await {
        if matches!(m, ServerMsg::GoAway { .. }) {
            goaway = true;
            break;
        }
    }
    assert!(goaway, "no GoAway after the drain started");
    // The connector leaves (it deregisters first; the held flow keeps it draining).
    c.daemon.stop.cancel();
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")]
        ) == 0.0)
        .await,
        "connector did not deregister"
    );
    let (_s, _r, reply) = open(conn.clone()).await;
    match reply {
        FlowReply::Reject {
            reason: RejectReason::Draining,
            message,
        } => {
            assert!(message.contains("draining"), "{message}")
        }
        other => panic!("expected a Draining rejection, got {other:?}"),
    }
    assert!(
        !im.daemon.task.is_finished(),
        "the drain did not wait for the running flow"
    );
    drop((held_s, held_r));
    conn.close(0u32.into(), b"done");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), im.daemon.task)
            .await
            .is_ok(),
        "intermediate did not finish its drain"
    );
}

/// Continuous new TCP flows through the agent, counting failures.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

fn start_load(port: std::net::SocketAddr) -> Load {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut attempts = 0u64;
        let mut failures = Vec::new();
        while !*rx.borrow() {
            attempts += 1;
            let msg = format!("flow {attempts}");
            match tokio::time::timeout(Duration::from_secs(10), tcp_roundtrip(port, msg.as_bytes()))
                .await
            {
                Ok(Ok(back)) if back == msg.as_bytes() => {}
                other => failures.push(format!("attempt {attempts}: {other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (attempts, failures)
    });
    Load { stop, task }
}

impl Load {
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.send_replace(true);
        self.task.await.expect("load task")
    }
}

async fn wait_registered_count(
    c: &mut ConnectorHandle,
    n: usize,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(
        limit,
        c.registered
            .wait_for(|v| ztna_integration::registered_on(v) == n),
    )
    .await
    .ok()
    .map(|_| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_both_intermediates_under_load_fails_no_flow() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let relays: Vec<_> = ["relay-a", "relay-b"]
        .iter()
        .map(|name| {
            let (addr, ops) = (free_udp_port(), free_tcp_port());
            let cfg = intermediate_file(&pki, name, addr, ops, &["web"]);
            (name.to_string(), addr, ops, cfg)
        })
        .collect();
    let mut procs: Vec<Proc> = relays
        .iter()
        .map(|(n, _, _, cfg)| Proc::spawn(BIN, "intermediate", n, cfg, &[]))
        .collect();
    for (_, _, ops, _) in &relays {
        assert!(wait_ready(*ops, Duration::from_secs(10)).await);
    }
    let addrs: Vec<_> = relays.iter().map(|r| r.1).collect();
    let mut c = start_connector(&pki, "web-1", &addrs, &[("web", Some(echo), None)]);
    c.wait_registered(2).await;
    let mut a = start_agent(&pki, "alice", &addrs, &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let load = start_load(a.port("web", Protocol::Tcp));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    for (i, (name, _, ops, cfg)) in relays.iter().enumerate() {
        let t0 = Instant::now();
        procs[i].signal("TERM");
        let code = procs[i].wait_exit(Duration::from_secs(30)).await;
        let drained = t0.elapsed();
        assert_eq!(
            code,
            Some(0),
            "{name} did not drain and exit 0\n{}",
            procs[i].tail(30)
        );
        assert!(
            procs[i].log().contains("drain complete"),
            "{}",
            procs[i].tail(30)
        );
        procs[i] = Proc::spawn(BIN, "intermediate", name, cfg, &[]);
        let t1 = Instant::now();
        assert!(
            wait_ready(*ops, Duration::from_secs(10)).await,
            "{} not ready after restart",
            name
        );
        let back = wait_registered_count(&mut c, 2, Duration::from_secs(15)).await;
        assert!(
            back.is_some(),
            "connector not back on 2/2 after restarting {name}"
        );
        println!(
            "MEASURED {name}: SIGTERM to exit under load {:.0} ms; restart to connector on 2/2 {:.0} ms",
            drained.as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let (attempts, failures) = load.finish().await;
    println!(
        "MEASURED rolling restart: {attempts} flows attempted, {} failed",
        failures.len()
    );
    assert!(attempts > 50, "load too small to mean anything: {attempts}");
    assert!(
        failures.is_empty(),
        "{} of {attempts} flows failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_intermediates_connected",
            &[]
        ),
        2.0
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_reregisters_fast_and_backoff_grows_while_down() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (addr, ops) = (free_udp_port(), free_tcp_port());
    let cfg = intermediate_file(&pki, "relay", addr, ops, &["web"]);
    let mut relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    assert!(wait_ready(ops, Duration::from_secs(10)).await);
    // Default keepalive (1 s) and idle timeout (5 s).
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let reconnects = |c: &ConnectorHandle| {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_reconnects_total",
            &[],
        )
    };
    let before = reconnects(&c);

    // Crash and immediate restart on the same port.
    let t_kill = Instant::now();
    relay.signal("KILL");
    assert_eq!(
        relay.wait_exit(Duration::from_secs(5)).await,
        None,
        "SIGKILL leaves no exit code"
    );
    relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    assert!(wait_ready(ops, Duration::from_secs(10)).await);
    let t_restart = Instant::now();
    // First the connector must notice the loss, then register again.
    let lost = wait_registered_count(&mut c, 0, Duration::from_secs(10)).await;
    assert!(lost.is_some(), "connector never noticed the crash");
    let back = wait_registered_count(&mut c, 1, Duration::from_secs(5)).await;
    assert!(
        back.is_some(),
        "not registered again within 5 s of the restart\n{}",
        relay.tail(20)
    );
    println!(
        "MEASURED crash to re-registration: {:.0} ms after SIGKILL, {:.0} ms after the restarted relay was ready",
        t_kill.elapsed().as_secs_f64() * 1e3,
        t_restart.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        reconnects(&c),
        before + 1.0,
        "one crash and restart is one reconnect"
    );

    // Down for a while: a connector with fast loss detection shows its backoff growing.
    let mut fast = start_connector_with(
        pki.issue("connector", "web-2"),
        &[addr],
        &[("web", Some(echo), None)],
        "keepalive = \"250ms\"\nidle_timeout = \"1s\"",
    );
    fast.wait_registered(1).await;
    relay.signal("KILL");
    let _ = relay.wait_exit(Duration::from_secs(5)).await;
    let mut seen: Vec<f64> = Vec::new();
    let end = Instant::now() + Duration::from_secs(16);
    while Instant::now() < end {
        let v = metric(
            &fast.daemon.metrics.common.render(),
            "ztna_connector_reconnect_backoff_seconds",
            &[],
        );
        if v > 0.0 && seen.last() != Some(&v) {
            seen.push(v);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("MEASURED backoff delays while the relay stayed down 16 s: {seen:?}");
    assert!(seen.len() >= 3, "too few reconnect attempts: {seen:?}");
    // Each delay follows the schedule: 200 ms doubling, capped at 3 s, each drawn at 50-100 %
    // of its step ("equal jitter", ztna_node::backoff). Two draws in a row may still decrease
    // (1.55 s at the 1.6 s step, then 1.51 s at the 3 s cap, in one CI run).
    let policy = ztna_node::backoff::BackoffPolicy::default();
    for (k, v) in seen.iter().enumerate() {
        let step =
            (policy.initial.as_secs_f64() * 2f64.powi(k as i32)).min(policy.max.as_secs_f64());
        assert!(
            *v >= step / 2.0 - 1e-3 && *v <= step + 1e-3,
            "delay {k} is {v:.3} s, outside the schedule's [{:.3}, {step:.3}] s: {seen:?}",
            step / 2.0
        );
    }
    assert!(
        seen[seen.len() - 1] >= 2.0 * seen[0],
        "backoff did not grow: {seen:?}"
    );
    // Attempts at a relay that is down are not reconnects (ZtnaReconnectStorm would fire on
    // every outage, duplicating the down alerts); the connection that comes back is one.
    let while_down = reconnects(&fast);
    let _relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    let back = wait_registered_count(&mut fast, 1, Duration::from_secs(10)).await;
    assert!(back.is_some(), "web-2 not back after the restart");
    println!(
        "MEASURED reconnects_total of web-2: {while_down} after {} failed attempts over 16 s, {} \
         once back",
        seen.len(),
        reconnects(&fast)
    );
    assert_eq!(while_down, 0.0, "failed attempts counted as reconnects");
    assert_eq!(reconnects(&fast), 1.0);
    fast.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_only_connector_deregisters_first_then_drains_and_exits_zero() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let c_ops = free_tcp_port();
    let cfg = connector_file(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None)],
        &format!("ops_listen = \"{c_ops}\""),
    );
    let mut conn = Proc::spawn(BIN, "connector", "connector", &cfg, &[]);
    assert!(
        wait_ready(c_ops, Duration::from_secs(10)).await,
        "{}",
        conn.tail(20)
    );
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    // A flow that keeps the connector's drain busy.
    let mut held = TcpStream::connect(port).await.unwrap();
    held.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();

    let t0 = Instant::now();
    conn.signal("TERM");
    let gone = eventually(Duration::from_secs(5), || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")],
        ) == 0.0
    })
    .await;
    assert!(gone, "intermediate still lists the connector");
    assert!(conn.alive(), "connector exited before it was deregistered");
    a.wait_status("web", ServiceState::Unavailable).await;
    let took = refused_locally(port).await;
    assert!(
        took < Duration::from_secs(1),
        "new connection took {:?} to fail",
        took
    );
    // The running flow continues during the drain.
    held.write_all(b"b").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"b");
    assert!(conn.alive());
    drop(held);
    let code = conn.wait_exit(Duration::from_secs(10)).await;
    println!(
        "MEASURED connector SIGTERM to exit with one flow held open then closed: {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(code, Some(0), "{}", conn.tail(20));
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

fn pem_certs(path: &std::path::Path) -> Vec<Vec<u8>> {
    let pem = std::fs::read(path).unwrap();
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.unwrap().to_vec())
        .collect()
}

async fn presented_cert(pki: &Pki, addr: std::net::SocketAddr) -> Vec<u8> {
    let tls = pki.issue("agent", "probe");
    let (_ep, conn) = raw_connect(&tls, ztna_proto::Role::Agent, addr)
        .await
        .expect("connect");
    let certs = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("peer certs");
    certs[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_survives_a_broken_file() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (addr, ops) = (free_udp_port(), free_tcp_port());
    let cfg = intermediate_file(&pki, "relay", addr, ops, &["web"]);
    let mut relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    assert!(wait_ready(ops, Duration::from_secs(10)).await);
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut held = TcpStream::connect(port).await.unwrap();
    held.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    let cert_path = pki.dir.path().join("intermediate-relay.pem");
    let old_der = pem_certs(&cert_path)[0].clone();
    assert_eq!(presented_cert(&pki, addr).await, old_der);
    let expiry = |t: &str| metric(t, "ztna_tls_cert_expiry_timestamp_seconds", &[]);
    let old_expiry = expiry(&http_get(ops, "/metrics").await.1);
    // How the last reload went: `systemctl reload` itself always succeeds.
    let reload = |t: &str| {
        (
            metric(t, "ztna_config_last_reload_successful", &[]),
            metric(t, "ztna_config_last_reload_success_timestamp_seconds", &[]),
        )
    };
    let at_start = reload(&http_get(ops, "/metrics").await.1);
    assert_eq!(at_start.0, 1.0, "successful at start");
    assert!(at_start.1 > 0.0);

    // Re-issue (longer validity) in place and SIGHUP.
    let mut req = ztna_pki::IssueRequest::new("intermediate", "relay");
    req.validity = ztna_pki::Validity::days(90);
    let issued = pki.ca.issue(&req).unwrap();
    pki.tls_for(&issued, "intermediate-relay");
    let new_der = pem_certs(&cert_path)[0].clone();
    assert_ne!(new_der, old_der);
    // Keys a reload cannot apply are changed too: the reload goes ahead and names each of them.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "drain_timeout = \"10s\"",
            "drain_timeout = \"20s\"\nmax_handshakes = 100",
        ),
    )
    .unwrap();
    relay.signal("HUP");
    let reloaded = eventually(Duration::from_secs(5), || {
        relay.log().contains("configuration reloaded")
    })
    .await;
    assert!(reloaded, "{}", relay.tail(20));
    let log = relay.log();
    let unapplied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a reload does not apply it"))
        .collect();
    for key in ["drain_timeout", "max_handshakes"] {
        assert!(
            unapplied.iter().any(|l| l.contains(key)),
            "{key} not named: {unapplied:?}"
        );
    }
    let new_expiry = expiry(&http_get(ops, "/metrics").await.1);
    let after_good = reload(&http_get(ops, "/metrics").await.1);
    assert_eq!(after_good.0, 1.0);
    assert!(after_good.1 >= at_start.1, "{after_good:?} {at_start:?}");
    let want = issued.not_after.unix_timestamp() as f64;
    assert!(
        new_expiry != old_expiry && (new_expiry - want).abs() < 2.0,
        "expiry metric {old_expiry} -> {new_expiry}, want {want}"
    );
    assert_eq!(
        presented_cert(&pki, addr).await,
        new_der,
        "new connections do not present the new certificate"
    );
    // The flow opened before the reload keeps running; new flows work.
    held.write_all(b"2").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2");
    assert_eq!(
        tcp_roundtrip(port, b"after reload").await.unwrap(),
        b"after reload"
    );

    // A broken file: the reload fails, the old config stays, the process lives.
    std::fs::write(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    relay.signal("HUP");
    let failed = eventually(Duration::from_secs(5), || {
        relay.log().contains("reload failed")
    })
    .await;
    assert!(failed, "{}", relay.tail(20));
    assert!(relay.alive());
    assert_eq!(expiry(&http_get(ops, "/metrics").await.1), new_expiry);
    let after_bad = reload(&http_get(ops, "/metrics").await.1);
    println!("MEASURED reload gauges: start {at_start:?}, after a good reload {after_good:?}, after a failed one {after_bad:?}");
    assert_eq!(after_bad, (0.0, after_good.1), "a failed reload shows");
    assert_eq!(presented_cert(&pki, addr).await, new_der);
    held.write_all(b"3").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert_eq!(tcp_roundtrip(port, b"still").await.unwrap(), b"still");

    // The connector's reload (what its SIGHUP runs): a re-issued certificate moves its expiry
    // metric and keeps its registration and flows; a broken one is refused and changes nothing.
    let c_expiry = || expiry(&c.daemon.metrics.common.render());
    let before = c_expiry();
    let mut req = ztna_pki::IssueRequest::new("connector", "web-1");
    req.validity = ztna_pki::Validity::days(90);
    let issued = pki.ca.issue(&req).unwrap();
    pki.tls_for(&issued, "connector-web-1");
    let summary = c.handle.reload(c.config.clone()).expect("connector reload");
    assert!(summary.contains("web-1"), "{summary}");
    let want = issued.not_after.unix_timestamp() as f64;
    assert!(
        c_expiry() != before && (c_expiry() - want).abs() < 2.0,
        "connector expiry metric {before} -> {}, want {want}",
        c_expiry()
    );
    std::fs::write(
        pki.dir.path().join("connector-web-1.pem"),
        "not a certificate",
    )
    .unwrap();
    assert!(c.handle.reload(c.config.clone()).is_err());
    assert!(
        (c_expiry() - want).abs() < 2.0,
        "a failed reload moved the metric"
    );
    held.write_all(b"4").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    assert_eq!(tcp_roundtrip(port, b"after").await.unwrap(), b"after");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_speaks_sd_notify_on_a_real_socket() {
    logs();
    let pki = Pki::new();
    let (addr, ops) = (free_udp_port(), free_tcp_port());
    let cfg = intermediate_file(&pki, "relay", addr, ops, &["web"]);
    let sock_path = pki.dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let sp = sock_path.to_string_lossy().to_string();
    let mut relay = Proc::spawn(
        BIN,
        "intermediate",
        "relay",
        &cfg,
        &[("NOTIFY_SOCKET", &sp), ("WATCHDOG_USEC", "400000")],
    );
    // Messages for 3 s from READY=1 (start-up of a debug build on a loaded machine may take a
    // while; the watchdog pings are counted from readiness on).
    let mut msgs: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut end = Instant::now() + Duration::from_secs(15);
    let mut ready = false;
    while let Ok(Ok(n)) = tokio::time::timeout(
        end.saturating_duration_since(Instant::now()),
        sock.recv(&mut buf),
    )
    .await
    {
        for m in String::from_utf8_lossy(&buf[..n]).lines() {
            if m == "READY=1" && !ready {
                ready = true;
                end = Instant::now() + Duration::from_secs(3);
            }
            msgs.push(m.to_string());
        }
    }
    assert_eq!(
        msgs.first().map(String::as_str),
        Some("READY=1"),
        "{msgs:?}\n{}",
        relay.tail(20)
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("STATUS=serving: 0 agents")),
        "{msgs:?}"
    );
    let pings = msgs.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        (10..=18).contains(&pings),
        "expected ~14 WATCHDOG=1 in 3 s at 200 ms, got {pings}"
    );
    relay.signal("TERM");
    let mut after = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
        after.extend(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string),
        );
        if after.iter().any(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert!(after.iter().any(|m| m == "STOPPING=1"), "{after:?}");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).await, Some(0));
}

/// A backend that reads a request (up to 16 bytes), waits `delay`, answers `bytes` bytes, holds
/// the connection for `hold` and then closes it with a FIN.
async fn answering_backend(delay: Duration, bytes: usize, hold: Duration) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 16];
                let _ = s.read(&mut req).await;
                tokio::time::sleep(delay).await;
                let _ = s.write_all(&vec![0x5au8; bytes]).await;
                tokio::time::sleep(hold).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A backend that answers every connection with `chunks` × 64 KiB, one chunk every `gap`, then
/// closes: a download that takes a while.
async fn slow_download_backend(chunks: usize, gap: Duration) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                for _ in 0..chunks {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// SIGTERM on the agent is a drain: a download in progress completes (every byte, then a clean
/// end), a new local connection is refused at once, and the agent exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_agent_lets_a_running_transfer_finish_and_refuses_new_ones() {
    logs();
    let pki = Pki::new();
    let backend = slow_download_backend(40, Duration::from_millis(60)).await;
    let im = start_intermediate(&pki, open_policy(&["files"]));
    let mut c = start_connector(
        &pki,
        "files-1",
        &[im.addr],
        &[("files", Some(backend), None)],
    );
    c.wait_registered(1).await;
    let (port, ops) = (free_tcp_port(), free_tcp_port());
    let cfg = agent_file(
        &pki,
        "alice",
        &[im.addr],
        &[("files", "tcp", port)],
        &format!("ops_listen = \"{ops}\"\ndrain_timeout = \"30s\""),
    );
    let mut agent = Proc::spawn(BIN, "agent", "agent", &cfg, &[]);
    assert!(
        wait_ready(ops, Duration::from_secs(10)).await,
        "{}",
        agent.tail(20)
    );
    let download = tokio::spawn(async move {
        let mut s = TcpStream::connect(port).await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok::<usize, std::io::Error>(got.len())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    agent.signal("TERM");
    // New local connections are refused during the drain, as soon as the agent has handled
    // the signal (polled: a loaded machine may take a moment to deliver and handle it).
    let refused = eventually_async(Duration::from_secs(5), || async {
        match TcpStream::connect(port).await {
            Err(_) => true,
            Ok(mut s) => {
                let mut b = [0u8; 1];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            }
        }
    })
    .await;
    assert!(
        refused,
        "new connections were still accepted 5 s into the drain"
    );
    let got = tokio::time::timeout(Duration::from_secs(20), download)
        .await
        .expect("download finished")
        .expect("task")
        .expect("download completed without error");
    let code = agent.wait_exit(Duration::from_secs(10)).await;
    println!(
        "MEASURED agent SIGTERM during a 2.5 MiB download: {got} bytes arrived, exit {code:?} {:.0} ms after SIGTERM",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(got, 40 * 64 * 1024, "the transfer was cut");
    assert_eq!(code, Some(0), "{}", agent.tail(20));
    assert!(agent.log().contains("drain complete"), "{}", agent.tail(20));
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A drain waits for a flow, and then for its last bytes to reach the agent, before it closes
/// the connection: here the backend answers with 2 MiB and closes just after the drain began,
/// on a path with an 80 ms round trip, so most of the answer is still on its way when the
/// relay's side of the flow ends. Closing then would discard it and the client would see a
/// reset (as in one CI run of the rolling restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_only_after_the_last_bytes_of_a_flow_were_delivered() {
    logs();
    const ANSWER: usize = 2 << 20;
    let pki = Pki::new();
    let backend = answering_backend(Duration::from_millis(400), ANSWER, Duration::ZERO).await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(backend), None)]);
    c.wait_registered(1).await;
    // 40 ms each way between agent and relay.
    let far = ztna_integration::proxy::start(im.addr, Duration::from_millis(40))
        .await
        .unwrap();
    let mut a = start_agent(&pki, "alice", &[far.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let download = tokio::spawn(async move {
        let mut s = TcpStream::connect(port).await?;
        s.write_all(b"GET").await?;
        // Request sent and half-closed (as an HTTP/1.0 client or `tcp_roundtrip` does), so the
        // relay's side of the flow ends as soon as the answer has passed through it.
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok::<usize, std::io::Error>(got.len())
    });
    // The flow is open and waiting for the backend's answer: start the drain.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t0 = Instant::now();
    im.daemon.stop.cancel();
    let got = tokio::time::timeout(Duration::from_secs(20), download)
        .await
        .expect("download finished")
        .expect("task");
    let drained = tokio::time::timeout(Duration::from_secs(20), im.daemon.task).await;
    println!(
        "MEASURED drain during a 2 MiB answer over an 80 ms path: {got:?}, intermediate stopped {:.0} ms after the drain began",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        got.map_err(|e| e.to_string()),
        Ok(ANSWER),
        "the end of the answer was lost when the drain closed the connection"
    );
    assert!(drained.is_ok(), "the intermediate did not finish its drain");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

/// `ztna_intermediate_quic_connections` counts the endpoint's QUIC connections, including closed
/// ones still draining (they keep their memory until then): up with an agent, back to 0 once it
/// has left and its connection drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_gauge_follows_the_endpoint_until_drained() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let quic = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_quic_connections",
            &[],
        )
    };
    assert_eq!(quic(), 0.0);
    let a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    assert!(
        eventually(Duration::from_secs(5), || quic() == 1.0).await,
        "one agent: gauge {}",
        quic()
    );
    a.daemon.shutdown().await;
    assert!(
        eventually(Duration::from_secs(5), || quic() == 0.0).await,
        "agent gone: gauge {}",
        quic()
    );
    im.daemon.shutdown().await;
}

/// `ztna_intermediate_peer_rtt_seconds` gets a sample when a peer connects and then one per
/// peer on every sweep (every 5 s), without a timer per connection: an idle agent's count grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_rtt_is_sampled_at_connect_and_by_the_periodic_sweep() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let count = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_peer_rtt_seconds_count",
            &[("role", "agent")],
        )
    };
    let a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    assert!(
        eventually(Duration::from_secs(2), || count() >= 1.0).await,
        "no sample at connect: count {}",
        count()
    );
    let at_connect = count();
    assert!(
        eventually(Duration::from_secs(8), || count() > at_connect).await,
        "no sweep sample within 8 s of an idle agent: count {}",
        count()
    );
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A flow in the middle of a transfer when the path between the relay and the connector goes
/// silent cannot be replayed elsewhere (its request may have been acted on): the relay gives
/// the connector up at the idle timeout, the agent resets the local connection (never a clean
/// end the client could take for a complete answer) and says in its log why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_cut_by_the_tunnel_resets_the_local_connection_and_the_agent_says_why() {
    logs();
    let pki = Pki::new();
    // Answers 64 KiB at once, then holds the connection open: the flow is mid-transfer.
    let backend = answering_backend(Duration::ZERO, 64 << 10, Duration::from_secs(60)).await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    // The connector reaches the relay through a line that can be cut silently.
    let line = ztna_integration::proxy::start(im.addr, Duration::ZERO)
        .await
        .unwrap();
    let mut c = start_connector(&pki, "web-1", &[line.addr], &[("web", Some(backend), None)]);
    c.wait_registered(1).await;
    let (port, ops) = (free_tcp_port(), free_tcp_port());
    // No direct path: the flow must go through the relay whose connector link is cut.
    let cfg = agent_file(
        &pki,
        "alice",
        &[im.addr],
        &[("web", "tcp", port)],
        &format!("ops_listen = \"{ops}\"\np2p = false"),
    );
    let agent = Proc::spawn(BIN, "agent", "agent", &cfg, &[]);
    assert!(
        wait_ready(ops, Duration::from_secs(10)).await,
        "{}",
        agent.tail(20)
    );
    let open = || async {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(b"GET").await.unwrap();
        let mut first = vec![0u8; 64 << 10];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first))
            .await
            .expect("the first 64 KiB in time")
            .expect("the first 64 KiB");
        s
    };
    // A client that resets its own connection is not the tunnel's doing: no warning.
    let s = open().await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !agent.log().contains("cut by the tunnel"),
        "a client's own reset was logged as the tunnel's\n{}",
        agent.tail(20)
    );
    let mut s = open().await;
    let t0 = Instant::now();
    line.set_loss(1.0, 1);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    let after = t0.elapsed();
    println!(
        "MEASURED flow cut between relay and connector: the local client saw {end:?} {:.0} ms after the cut",
        after.as_secs_f64() * 1e3
    );
    let end = end.expect("the cut flow was left hanging");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the cut flow must end with a reset, not a clean end"
    );
    // The relay's idle timeout (5 s) ends the connector's connection, then the flow.
    assert!(
        after >= Duration::from_secs(4) && after < Duration::from_secs(9),
        "reset after {after:?}"
    );
    let told = eventually(Duration::from_secs(2), || {
        agent.log().contains("a flow to web was cut by the tunnel")
    })
    .await;
    assert!(
        told,
        "the agent did not log the cut flow\n{}",
        agent.tail(20)
    );
    // With the relay's reason: the stream was reset or stopped with FLOW_ABORTED.
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("cut by the tunnel"));
    assert!(
        line.is_some_and(|l| l.contains("by the peer: flow aborted") && l.contains("down=65536")),
        "{}",
        agent.tail(20)
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Packets the kernel drops at a daemon's QUIC socket (receive buffer full) are counted in
/// `ztna_quic_socket_drops_total`: a stopped relay (SIGSTOP) gets a burst it cannot read, and
/// once it runs again the counter shows what the kernel dropped. quinn has no counter of its own
/// for these; before, no metric did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_drops_at_the_quic_socket_are_counted() {
    logs();
    let pki = Pki::new();
    let (addr, ops) = (free_udp_port(), free_tcp_port());
    let cfg = intermediate_file(&pki, "relay", addr, ops, &["web"]);
    let relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    assert!(wait_ready(ops, Duration::from_secs(10)).await);
    let drops = || async {
        let (_, text) = http_get(ops, "/metrics").await;
        metric(&text, "ztna_quic_socket_drops_total", &[])
    };
    assert_eq!(drops().await, 0.0);
    relay.signal("STOP");
    // Far more than the relay's receive buffer holds (16 MiB, RELAY_SOCKET_BUFFER: granted past
    // net.core.rmem_max when the test runs as root, about 14,000 of these).
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let junk = [0u8; 1200];
    for _ in 0..40_000 {
        let _ = tx.send_to(&junk, addr);
    }
    let kernel = ztna_node::udp::kernel_drops_at(addr.port());
    relay.signal("CONT");
    let counted = eventually_async(Duration::from_secs(15), || async {
        drops().await >= 1000.0
    })
    .await;
    let n = drops().await;
    println!("MEASURED 40,000 packets to a stopped relay: kernel says {kernel:?} dropped, ztna_quic_socket_drops_total {n}");
    assert!(
        counted,
        "counted {n}, kernel {kernel:?}\n{}",
        relay.tail(20)
    );
    if let Some(k) = kernel {
        assert!(n >= k as f64, "counted {n} of the kernel's {k}");
    }
}

/// Datagrams an agent cannot send because its relay stopped answering (SIGSTOP: no ACKs, the
/// congestion window stays full) fill quinn's datagram send buffer; what no longer fits is
/// counted as `send_buffer_full` and logged, not discarded silently; payloads too large for a
/// datagram, which ride the flow's stream, are counted as `stream_full` once its queue is full.
/// The flow carries datagrams again once the relay runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_beyond_a_stalled_paths_send_buffer_are_counted() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let (relay, c, a, client) = dns_flow_via_relay_process(&pki, echo).await;
    let dropped = |reason| {
        dropped_in(
            &a.daemon.metrics.common,
            "ztna_agent_udp_dropped_total",
            reason,
        )
    };
    // 3 MiB of 1200-byte datagrams: three times the 1 MiB datagram send buffer.
    drops_are_counted(
        &relay,
        dropped("send_buffer_full"),
        Counted::WhileStopped,
        async {
            send_paced(&client, None, 2_600).await;
            true
        },
        (500.0, 2_600.0),
        &client,
        "2,600 datagrams of 1200 B towards a stopped relay: agent send_buffer_full",
    )
    .await;
    // Payloads too large for a datagram ride the flow's stream, through a queue of 64. 19 MB is
    // more than the stream may buffer towards the stalled relay (its 16 MiB window), so the
    // queue fills whatever the machine's speed: what does not fit is counted as `stream_full`.
    drops_are_counted(
        &relay,
        dropped("stream_full"),
        Counted::WhileStopped,
        async {
            send_sized(&client, None, 1472, 13_000, Pace::Yield).await;
            true
        },
        (100.0, 13_000.0),
        &client,
        "13,000 payloads of 1472 B (on the stream) towards a stopped relay: agent stream_full",
    )
    .await;
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

/// The relay's side of a stalled path: datagrams it cannot pass to a connector that stopped
/// answering (SIGSTOP) fill its datagram send buffer towards it, and what no longer fits is
/// counted at the intermediate as `send_buffer_full`, not lost silently. The flow carries
/// again once the connector runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_counts_datagrams_beyond_a_stalled_connectors_send_buffer() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let (conn, _c_ops, im, a, client) = dns_flow_via_connector_process(&pki, echo).await;
    // 3 MiB of 1200-byte datagrams, three times the relay's 1 MiB datagram send buffer, paced
    // (about 30 Mbit/s) so that they reach the relay on a busy machine too.
    drops_are_counted(
        &conn,
        dropped_in(
            &im.daemon.metrics.common,
            "ztna_intermediate_datagrams_dropped_total",
            "send_buffer_full",
        ),
        Counted::WhileStopped,
        async {
            send_paced(&client, None, 2_600).await;
            true
        },
        (1_000.0, 2_600.0),
        &client,
        "2,600 datagrams (3 MiB, paced) towards a stopped connector: intermediate send_buffer_full",
    )
    .await;
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// The connector's side of a stalled path: a backend answering a flow with more than the path
/// takes while the relay is stopped (SIGSTOP) fills the connector's datagram send buffer, and
/// what no longer fits is counted at the connector as `send_buffer_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_counts_backend_datagrams_beyond_a_stalled_paths_send_buffer() {
    logs();
    let pki = Pki::new();
    let mut backend = BurstingBackend::start().await;
    let (relay, c, a, client) = dns_flow_via_relay_process(&pki, backend.addr).await;
    drops_are_counted(
        &relay,
        dropped_in(
            &c.daemon.metrics.common,
            "ztna_connector_udp_dropped_total",
            "send_buffer_full",
        ),
        Counted::WhileStopped,
        backend.burst(2_600, true),
        (500.0, 2_600.0),
        &client,
        "2,600 backend datagrams (3 MiB, paced) towards a stopped relay: connector send_buffer_full",
    )
    .await;
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

/// While an agent drains, its running UDP flow keeps carrying, and datagrams from a new local
/// client are neither turned into a flow nor lost silently: each is counted as `draining`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_counts_datagrams_of_new_clients_and_keeps_its_flows() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, echo).await;
    let port = a.port("dns", Protocol::Udp);
    let running = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    running.connect(port).await.unwrap();
    assert!(
        udp_round_trip(&running, b"before").await.is_some(),
        "the flow never carried"
    );
    let draining = || {
        metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_udp_dropped_total",
            &[("reason", "draining")],
        )
    };
    let before = draining();
    // The drain begins (what SIGTERM does). Each probe comes from a new client address, until
    // one is counted: the forward has taken the drain in.
    a.daemon.stop.cancel();
    let mut probes = 0;
    let started = eventually_async(Duration::from_secs(5), || {
        probes += 1;
        async {
            let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let _ = probe.send_to(b"probe", port).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            draining() > before
        }
    })
    .await;
    assert!(
        started,
        "no datagram counted as draining after {probes} probes"
    );
    let late = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    late.connect(port).await.unwrap();
    let counted = draining();
    for _ in 0..5 {
        late.send(b"new client").await.unwrap();
    }
    let all = eventually(Duration::from_secs(5), || draining() - counted >= 5.0).await;
    let mut buf = [0u8; 64];
    let answered = tokio::time::timeout(Duration::from_millis(500), late.recv(&mut buf))
        .await
        .is_ok();
    let carried = udp_round_trip(&running, b"during the drain").await;
    println!(
        "MEASURED draining agent: 5 datagrams of a new client counted as draining {}, answered {answered}; \
         the running flow answered after {carried:?} attempts",
        draining() - counted
    );
    assert!(all, "only {} of 5 counted", draining() - counted);
    assert_eq!(draining() - counted, 5.0, "counted more than were sent");
    assert!(!answered, "a new client was served during the drain");
    assert!(
        carried.is_some(),
        "the running flow stopped during the drain"
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A payload that fits the agent's path as a datagram but not the connector's (whose path MTU
/// is smaller) rides the flow's stream from the relay on. While the connector is stopped
/// (SIGSTOP) that stream stalls, and what the relay's queue for it cannot hold is counted at the
/// relay as `stream_full`, not lost silently; the flow carries again once the connector runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_counts_payloads_beyond_a_stalled_narrower_paths_stream_queue() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    // The connector reaches the relay over a path that drops UDP payloads above 1250 bytes, so
    // its path MTU settles below what a 1300-byte payload needs; the agent's path is loopback.
    let narrow = ztna_integration::proxy::start(im.addr, Duration::ZERO)
        .await
        .unwrap();
    narrow.set_max_datagram(1250);
    let c_ops = free_tcp_port();
    // Small windows: the relay can buffer at most 1 MiB on the stalled flow's stream.
    let cfg = connector_file(
        &pki,
        "dns-1",
        &[narrow.addr],
        &[("dns", None, Some(echo))],
        &format!(
            "ops_listen = \"{c_ops}\"\nstream_window = \"1MiB\"\nconnection_window = \"2MiB\""
        ),
    );
    let conn = Proc::spawn(BIN, "connector", "connector", &cfg, &[]);
    assert!(
        wait_ready(c_ops, Duration::from_secs(10)).await,
        "{}",
        conn.tail(20)
    );
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("dns", ForwardProtocol::Udp)]).await;
    a.wait_status("dns", ServiceState::Available).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    let relay_metric = |name: &str, label: (&str, &str)| {
        metric(&im.daemon.metrics.common.render(), name, &[label])
    };
    let moved_to_stream = || {
        relay_metric(
            "ztna_intermediate_udp_stream_payloads_total",
            ("direction", "to_connector"),
        )
    };
    // Round trips of 1300 bytes until the relay is the one moving them onto the stream (the
    // agent's path has found its MTU and sends them as datagrams).
    let big = [5u8; 1300];
    let narrowed = eventually_async(Duration::from_secs(10), || async {
        udp_round_trip(&client, &big).await.is_some() && moved_to_stream() > 0.0
    })
    .await;
    assert!(
        narrowed,
        "the relay never carried a 1300-byte payload on the stream (proxy dropped {} as too big)\n{}",
        narrow.stats().too_big.load(std::sync::atomic::Ordering::Relaxed),
        conn.tail(20)
    );
    // 3.9 MB in 1300-byte payloads, paced: far more than the stalled stream takes.
    drops_are_counted(
        &conn,
        || async {
            relay_metric(
                "ztna_intermediate_datagrams_dropped_total",
                ("reason", "stream_full"),
            )
        },
        Counted::WhileStopped,
        async {
            send_sized(&client, None, 1300, 3_000, Pace::Paced).await;
            true
        },
        (500.0, 3_000.0),
        &client,
        "3,000 payloads of 1300 B for a stopped connector behind a 1250-byte path: relay stream_full",
    )
    .await;
    println!("MEASURED carried on the stream: {}", moved_to_stream());
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A connector that falls behind its backend (here: stopped with SIGSTOP) loses the backend's
/// datagrams in the kernel, at the flow's full socket receive buffer. It counts them as
/// `socket_overflow` once it runs again (the kernel reports them with the next datagram it
/// queues), and the flow carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_counts_what_the_kernel_drops_at_its_flows_socket() {
    logs();
    let pki = Pki::new();
    let mut backend = BurstingBackend::start().await;
    let (conn, c_ops, im, a, client) = dns_flow_via_connector_process(&pki, backend.addr).await;
    drops_are_counted(
        &conn,
        || overflowed(c_ops, "ztna_connector_udp_dropped_total"),
        Counted::OnResume,
        backend.burst(OVERFLOW_BURST, false),
        (2_000.0, OVERFLOW_BURST as f64),
        &client,
        "10,000 backend datagrams of 1200 B towards a stopped connector: connector socket_overflow",
    )
    .await;
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An agent that falls behind its local client (stopped with SIGSTOP) loses the client's
/// datagrams in the kernel, at the forward's full receive buffer; it counts them as
/// `socket_overflow` once it runs again, and the flow carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_counts_what_the_kernel_drops_at_its_forwards_socket() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let mut c = start_connector(&pki, "dns-1", &[im.addr], &[("dns", None, Some(echo))]);
    c.wait_registered(1).await;
    let (port, ops) = (free_udp_port(), free_tcp_port());
    let cfg = agent_file(
        &pki,
        "alice",
        &[im.addr],
        &[("dns", "udp", port)],
        &format!("ops_listen = \"{ops}\""),
    );
    let agent = Proc::spawn(BIN, "agent", "agent", &cfg, &[]);
    assert!(
        wait_ready(ops, Duration::from_secs(10)).await,
        "{}",
        agent.tail(20)
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(port).await.unwrap();
    assert!(
        udp_round_trip(&client, b"before").await.is_some(),
        "the flow never carried\n{}",
        agent.tail(20)
    );
    drops_are_counted(
        &agent,
        || overflowed(ops, "ztna_agent_udp_dropped_total"),
        Counted::OnResume,
        async {
            send_sized(&client, None, 1200, OVERFLOW_BURST, Pace::Yield).await;
            true
        },
        (2_000.0, OVERFLOW_BURST as f64),
        &client,
        "10,000 client datagrams of 1200 B towards a stopped agent: agent socket_overflow",
    )
    .await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Datagrams the overflow tests send at a stopped daemon: 12 MB in 1200-byte datagrams, more
/// than a socket's receive buffer holds.
const OVERFLOW_BURST: usize = 10_000;

/// When the drops a test provokes show in their counter.
#[derive(Clone, Copy, PartialEq)]
enum Counted {
    /// While the process is stopped: a running daemon counts them.
    WhileStopped,
    /// Once the stopped process runs again: it counts them itself. The kernel's drops at a
    /// socket are reported with the next datagram it queues, the round trip after the resume.
    OnResume,
}

/// Stops `stopped` (SIGSTOP) while `send` pushes traffic at it or through it, lets it run
/// again, and checks that the counter `dropped` rose by at least `at_least` and by no more than
/// `at_most` (what was sent), and that `client`'s flow carries afterwards. Prints the count.
async fn drops_are_counted<R, F>(
    stopped: &Proc,
    dropped: R,
    when: Counted,
    send: impl std::future::Future<Output = bool>,
    (at_least, at_most): (f64, f64),
    client: &UdpSocket,
    what: &str,
) where
    R: Fn() -> F,
    F: std::future::Future<Output = f64>,
{
    let before = dropped().await;
    stopped.signal("STOP");
    let sent = send.await;
    let risen = || async { dropped().await - before >= at_least };
    let mut counted =
        when == Counted::WhileStopped && eventually_async(Duration::from_secs(5), risen).await;
    stopped.signal("CONT");
    assert!(sent, "{what}: the traffic was not all sent");
    let carried = udp_round_trip(client, b"after").await;
    if when == Counted::OnResume {
        counted = eventually_async(Duration::from_secs(5), risen).await;
    }
    let n = dropped().await - before;
    println!("MEASURED {what} {n}");
    assert!(
        carried.is_some(),
        "{what}: the flow did not carry again\n{}",
        stopped.tail(20)
    );
    assert!(counted, "{what}: only {n} counted\n{}", stopped.tail(20));
    assert!(n <= at_most, "{what}: {n} counted, more than were sent");
}

/// A reader of `name{reason=...}` in an in-process daemon's registry, for [`drops_are_counted`].
fn dropped_in<'a>(
    common: &'a ztna_node::metrics::Common,
    name: &'static str,
    reason: &'static str,
) -> impl Fn() -> std::future::Ready<f64> + 'a {
    move || std::future::ready(metric(&common.render(), name, &[("reason", reason)]))
}

/// `reason="socket_overflow"` of the counter `name`, read from a daemon process's ops endpoint.
async fn overflowed(ops: std::net::SocketAddr, name: &str) -> f64 {
    metric(
        &http_get(ops, "/metrics").await.1,
        name,
        &[("reason", "socket_overflow")],
    )
}

/// A UDP backend that echoes, and on [`BurstingBackend::burst`] sends datagrams of 1200 bytes
/// to the last peer it heard from (the connector's socket for the flow).
struct BurstingBackend {
    addr: std::net::SocketAddr,
    go: tokio::sync::mpsc::Sender<(usize, bool)>,
    done: tokio::sync::mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl BurstingBackend {
    async fn start() -> BurstingBackend {
        let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap();
        let (go, mut go_rx) = tokio::sync::mpsc::channel::<(usize, bool)>(1);
        let (done_tx, done) = tokio::sync::mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut peer = None;
            loop {
                tokio::select! {
                    r = backend.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { return };
                        peer = Some(from);
                        let _ = backend.send_to(&buf[..n], from).await;
                    }
                    Some((n, paced)) = go_rx.recv() => {
                        let Some(to) = peer else { continue };
                        if paced {
                            send_paced(&backend, Some(to), n).await;
                        } else {
                            send_sized(&backend, Some(to), 1200, n, Pace::Yield).await;
                        }
                        let _ = done_tx.send(()).await;
                    }
                }
            }
        });
        BurstingBackend {
            addr,
            go,
            done,
            task,
        }
    }

    /// Sends `n` datagrams (`paced`: see [`send_paced`]); false if they were not all sent
    /// within 10 s.
    async fn burst(&mut self, n: usize, paced: bool) -> bool {
        if self.go.send((n, paced)).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.done.recv()).await,
            Ok(Some(()))
        )
    }
}

impl Drop for BurstingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An intermediate process (which tests stop with SIGSTOP) for service `dns`, an in-process
/// connector serving it from the UDP `backend`, an agent forwarding it, and a local client
/// connected to the agent's port whose first datagram made the round trip.
async fn dns_flow_via_relay_process(
    pki: &Pki,
    backend: std::net::SocketAddr,
) -> (Proc, ConnectorHandle, AgentHandle, UdpSocket) {
    let (addr, ops) = (free_udp_port(), free_tcp_port());
    let cfg = intermediate_file(pki, "relay", addr, ops, &["dns"]);
    let relay = Proc::spawn(BIN, "intermediate", "relay", &cfg, &[]);
    assert!(wait_ready(ops, Duration::from_secs(10)).await);
    let (c, a) = dns_chain(pki, addr, backend).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    assert!(
        udp_round_trip(&client, b"before").await.is_some(),
        "the flow never carried"
    );
    (relay, c, a, client)
}

/// A connector process (which tests stop with SIGSTOP; its ops endpoint is returned) serving
/// service `dns` from the UDP `backend`, an in-process intermediate, an agent forwarding `dns`,
/// and a local client connected to the agent's port whose first datagram made the round trip.
async fn dns_flow_via_connector_process(
    pki: &Pki,
    backend: std::net::SocketAddr,
) -> (
    Proc,
    std::net::SocketAddr,
    IntermediateHandle,
    AgentHandle,
    UdpSocket,
) {
    let im = start_intermediate(pki, open_policy(&["dns"]));
    let c_ops = free_tcp_port();
    let cfg = connector_file(
        pki,
        "dns-1",
        &[im.addr],
        &[("dns", None, Some(backend))],
        &format!("ops_listen = \"{c_ops}\""),
    );
    let conn = Proc::spawn(BIN, "connector", "connector", &cfg, &[]);
    assert!(
        wait_ready(c_ops, Duration::from_secs(10)).await,
        "{}",
        conn.tail(20)
    );
    let mut a = start_agent(pki, "alice", &[im.addr], &[("dns", ForwardProtocol::Udp)]).await;
    a.wait_status("dns", ServiceState::Available).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    assert!(
        udp_round_trip(&client, b"before").await.is_some(),
        "the flow never carried\n{}",
        conn.tail(20)
    );
    (conn, c_ops, im, a, client)
}

/// How [`send_sized`] spaces its datagrams.
#[derive(Clone, Copy, PartialEq)]
enum Pace {
    /// About 30 Mbit/s of 1200-byte datagrams (a millisecond's pause every four), so that they
    /// get past the sockets of a busy machine.
    Paced,
    /// As fast as the socket takes them, yielding to the runtime after each (in-process
    /// daemons share it with the test).
    Yield,
}

/// Sends `n` datagrams of 1200 bytes from `socket` (to `to`, or to its connected peer), paced.
async fn send_paced(socket: &UdpSocket, to: Option<std::net::SocketAddr>, n: usize) {
    send_sized(socket, to, 1200, n, Pace::Paced).await
}

/// Sends `n` datagrams of `size` bytes from `socket` (to `to`, or to its connected peer).
async fn send_sized(
    socket: &UdpSocket,
    to: Option<std::net::SocketAddr>,
    size: usize,
    n: usize,
    pace: Pace,
) {
    let payload = vec![7u8; size];
    for i in 0..n {
        let _ = match to {
            Some(to) => socket.send_to(&payload, to).await,
            None => socket.send(&payload).await,
        };
        if pace == Pace::Paced && i % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else if pace == Pace::Yield {
            tokio::task::yield_now().await;
        }
    }
}

/// An idle agent connection's keepalive: the agent pings, the intermediate only acknowledges
/// (quinn restarts a keepalive timer on every packet received, so an intermediate pinging as
/// often as its agents would take turns with them: a PING and its ACK more each second). It pings
/// as a backstop before its own idle timeout, which keeps alive a peer tuned to ping less often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_pings_idle_peers_only_as_a_backstop() {
    use ztna_integration::hostile::{client_endpoint, session};
    use ztna_node::transport::{client_config, TransportOptions};
    logs();
    let pki = Pki::new();
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.idle_timeout = Duration::from_secs(3);
    assert_eq!(cfg.keepalive(), Duration::from_millis(2400));
    let im = start_intermediate_with(cfg);
    let client = |name: &str, keepalive_ms: u64, idle_secs: u64| {
        let id = ztna_node::Identity::load(&pki.issue("agent", name), ztna_proto::Role::Agent)
            .expect("identity");
        let opts = TransportOptions {
            keepalive: Duration::from_millis(keepalive_ms),
            idle_timeout: Duration::from_secs(idle_secs),
            ..TransportOptions::default()
        };
        client_config(&id, ztna_proto::Role::Intermediate, &opts).expect("client config")
    };
    let ep = client_endpoint(im.addr).expect("endpoint");
    let connect = |cfg: quinn::ClientConfig| {
        let ep = ep.clone();
        async move {
            session(
                &ep,
                &cfg,
                im.addr,
                ztna_proto::Role::Agent,
                vec![],
                Duration::from_secs(5),
            )
            .await
            .expect("session")
        }
    };
    // An agent with the shipped keepalive (1 s), and one tuned to ping less often than the
    // intermediate's idle timeout (8 s against 3 s).
    let shipped = connect(client("alice", 1000, 5)).await;
    let sparse = connect(client("bob", 8000, 20)).await;
    let (shipped0, sparse0) = (shipped.conn.stats(), sparse.conn.stats());
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (shipped1, sparse1) = (shipped.conn.stats(), sparse.conn.stats());
    let pings_from_im =
        |a: &quinn::ConnectionStats, b: &quinn::ConnectionStats| b.frame_rx.ping - a.frame_rx.ping;
    let datagrams = |a: &quinn::ConnectionStats, b: &quinn::ConnectionStats| {
        (b.udp_rx.datagrams + b.udp_tx.datagrams) - (a.udp_rx.datagrams + a.udp_tx.datagrams)
    };
    println!(
        "MEASURED over 7 s idle: the intermediate sent {} PINGs to an agent with the shipped 1 s \
         keepalive (the agent sent {}; {} datagrams both ways), {} to one pinging every 8 s",
        pings_from_im(&shipped0, &shipped1),
        shipped1.frame_tx.ping - shipped0.frame_tx.ping,
        datagrams(&shipped0, &shipped1),
        pings_from_im(&sparse0, &sparse1),
    );
    assert!(
        shipped.conn.close_reason().is_none() && sparse.conn.close_reason().is_none(),
        "an idle connection was closed: {:?} / {:?}",
        shipped.conn.close_reason(),
        sparse.conn.close_reason()
    );
    // A 1 s keepalive on the intermediate sends 4-5 here; one loss probe is allowed for.
    assert!(
        pings_from_im(&shipped0, &shipped1) <= 1,
        "the intermediate pinged a peer that pings it every second {} times in 7 s",
        pings_from_im(&shipped0, &shipped1)
    );
    assert!(
        pings_from_im(&sparse0, &sparse1) >= 2,
        "the intermediate did not ping a peer that pings less often than its idle timeout"
    );
    assert_eq!(agents_on(&im), 2.0, "the intermediate lost an idle agent");
    im.daemon.shutdown().await;
}

/// A draining agent's status (`/readyz`, systemd's `STATUS=`) counts its flows down as they
/// finish: an operator watching a drain sees it progress, not the count of when it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agents_status_counts_its_flows_down() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (c, a) = web_chain(&pki, im.addr, echo).await;
    let port = a.port("web", Protocol::Tcp);
    let mut flows = Vec::new();
    for msg in [b"one", b"two"] {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(msg).await.unwrap();
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, msg, "the flow did not carry");
        flows.push(s);
    }
    let status = || async { http_get(a.ops, "/readyz").await.1 };
    a.daemon.stop.cancel();
    let two = eventually_async(Duration::from_secs(3), || async {
        status().await.contains("draining: 2 flows left")
    })
    .await;
    assert!(two, "status at the drain's start: {}", status().await);
    // One client leaves; the agent's side of that flow ends and the status follows.
    drop(flows.pop());
    let t = Instant::now();
    // The status is refreshed every second: 2.5 s leaves room for a loaded machine.
    let one = eventually_async(Duration::from_millis(2500), || async {
        status().await.contains("draining: 1 flows left")
    })
    .await;
    println!(
        "MEASURED draining agent status: {:?} after a flow ended: {}",
        t.elapsed(),
        status().await
    );
    assert!(one, "status after a flow ended: {}", status().await);
    drop(flows);
    let stopped = tokio::time::timeout(Duration::from_secs(10), a.daemon.task).await;
    assert!(stopped.is_ok(), "the agent did not finish its drain");
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

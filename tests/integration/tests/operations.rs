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
    assert!(until_ready(im.ops, 200).await, "listening intermediate not ready");
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

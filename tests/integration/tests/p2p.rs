//! Direct (P2P) paths, in-process on loopback: brokered by the intermediate, authorized by its
//! ticket at the connector, used by new flows once up, with the relay as fallback.

use std::time::{Duration, Instant};

use ztna_integration::hostile::direct::{self, signed_ticket, Attempt, DirectOutcome};
use ztna_integration::hostile::{open_flow, tcp_open, FlowOutcome};
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

const T: Duration = Duration::from_secs(10);

fn relay_bytes(im: &IntermediateHandle) -> f64 {
    metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_relay_bytes_total",
        &[],
    )
}

/// Services whose new flows go direct at `a` now.
fn direct_paths(a: &AgentHandle) -> f64 {
    metric(
        &a.daemon.metrics.common.render(),
        "ztna_agent_direct_paths",
        &[],
    )
}

/// `a`'s flows of `protocol` that went direct and ended well.
fn direct_flows_ok(a: &AgentHandle, protocol: &str) -> f64 {
    metric(
        &a.daemon.metrics.common.render(),
        "ztna_agent_flows_total",
        &[("path", "direct"), ("protocol", protocol), ("result", "ok")],
    )
}

/// Direct paths the relay counted as up (reported by agents).
fn p2p_success(im: &IntermediateHandle) -> f64 {
    metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_p2p_total",
        &[("result", "success")],
    )
}

/// Agents' direct connections to `c` now.
fn direct_connections(c: &ConnectorHandle) -> f64 {
    metric(
        &c.daemon.metrics.common.render(),
        "ztna_connector_direct_connections",
        &[],
    )
}

/// The first flow goes via the relay (and asks for a direct path); once the path is up, new
/// flows go direct: the relay carries none of their bytes. Every outcome is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_go_direct_once_the_path_is_up_and_the_relay_carries_none_of_their_bytes() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (uecho, _seen, _u) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), Some(uecho))],
    );
    c.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im.addr],
        &[("web", ForwardProtocol::Tcp), ("web", ForwardProtocol::Udp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let t0 = Instant::now();
    assert_eq!(tcp_roundtrip(port, b"first").await.unwrap(), b"first");
    assert!(
        eventually(T, || direct_paths(&a) == 1.0).await,
        "no direct path came up"
    );
    println!(
        "MEASURED direct path up {:?} after the first flow",
        t0.elapsed()
    );
    let (_, status) = http_get(a.ops, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert!(
        status["services"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["path"] == "direct")),
        "{status:#}"
    );
    let before = relay_bytes(&im);
    let payload = vec![7u8; 1 << 20];
    for _ in 0..5 {
        assert_eq!(tcp_roundtrip(port, &payload).await.unwrap(), payload);
    }
    let client = tokio::net::UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(a.port("web", Protocol::Udp)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    for i in 0..20u32 {
        client.send(&i.to_be_bytes()).await.unwrap();
        let n = tokio::time::timeout(T, client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], &i.to_be_bytes());
    }
    let relayed = relay_bytes(&im) - before;
    println!("MEASURED 5 MiB TCP and 20 UDP round trips on the direct path: {relayed} bytes through the relay");
    assert_eq!(relayed, 0.0, "the relay carried direct flows' bytes");
    assert_eq!(direct_flows_ok(&a, "tcp"), 5.0);
    assert_eq!(direct_flows_ok(&a, "udp"), 1.0);
    assert_eq!(p2p_success(&im), 1.0);
    assert_eq!(direct_connections(&c), 1.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A P2P agent forwarding `web` and `db` (TCP) through `relay`, both services available there:
/// the agent and its two local ports.
async fn web_and_db_agent(
    pki: &Pki,
    relay: std::net::SocketAddr,
) -> (AgentHandle, std::net::SocketAddr, std::net::SocketAddr) {
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[relay],
        &[("web", ForwardProtocol::Tcp), ("db", ForwardProtocol::Tcp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    a.wait_status("db", ServiceState::Available).await;
    let (web, db) = (a.port("web", Protocol::Tcp), a.port("db", Protocol::Tcp));
    (a, web, db)
}

/// Two services behind one connector share one direct connection: the second service's ticket
/// (asked of the relay for that connector) is presented on the first's control stream, with no
/// offer, punching or handshake, and both services' flows go direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_one_connector_share_one_direct_connection() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web", "db"]));
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None), ("db", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let (a, web, db) = web_and_db_agent(&pki, im.addr).await;
    assert_eq!(tcp_roundtrip(web, b"w").await.unwrap(), b"w");
    assert!(
        eventually(T, || direct_paths(&a) == 1.0).await,
        "no direct path for web"
    );
    let t0 = Instant::now();
    assert_eq!(tcp_roundtrip(db, b"d").await.unwrap(), b"d");
    assert!(
        eventually(T, || direct_paths(&a) == 2.0).await,
        "db never went direct"
    );
    println!(
        "MEASURED db direct {:?} after its first flow (web's connection)",
        t0.elapsed()
    );
    assert_eq!(
        direct_connections(&c),
        1.0,
        "db got a connection of its own instead of sharing web's"
    );
    assert_eq!(
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_punches_total",
            &[]
        ),
        1.0,
        "the connector punched again for db, which joined the connection web's punch opened"
    );
    let before = relay_bytes(&im);
    let payload = vec![9u8; 256 << 10];
    for port in [web, db, web, db] {
        assert_eq!(tcp_roundtrip(port, &payload).await.unwrap(), payload);
    }
    assert_eq!(
        relay_bytes(&im) - before,
        0.0,
        "the relay carried direct flows' bytes"
    );
    assert_eq!(direct_flows_ok(&a, "tcp"), 4.0);
    assert_eq!(p2p_success(&im), 2.0);
    assert_eq!(direct_connections(&c), 1.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// With a direct connection to one connector up, a service only another connector serves gets
/// a connection of its own: the relay refuses a ticket for it on the live connection, and the
/// agent asks for a path (offer, punch, handshake) to the other connector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_of_another_connector_gets_its_own_direct_connection() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web", "db"]));
    let mut c1 = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    let mut c2 = start_connector(&pki, "db-1", &[im.addr], &[("db", Some(echo), None)]);
    c1.wait_registered(1).await;
    c2.wait_registered(1).await;
    let (a, web, db) = web_and_db_agent(&pki, im.addr).await;
    assert_eq!(tcp_roundtrip(web, b"w").await.unwrap(), b"w");
    assert!(
        eventually(T, || direct_paths(&a) == 1.0).await,
        "no direct path for web"
    );
    assert_eq!(tcp_roundtrip(db, b"d").await.unwrap(), b"d");
    assert!(
        eventually(T, || direct_paths(&a) == 2.0).await,
        "db never went direct"
    );
    let punches = |c: &ConnectorHandle| {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_punches_total",
            &[],
        )
    };
    assert_eq!(
        (direct_connections(&c1), direct_connections(&c2)),
        (1.0, 1.0)
    );
    assert_eq!((punches(&c1), punches(&c2)), (1.0, 1.0));
    for port in [web, db] {
        assert_eq!(tcp_roundtrip(port, b"both").await.unwrap(), b"both");
    }
    assert_eq!(direct_flows_ok(&a, "tcp"), 2.0);
    a.daemon.shutdown().await;
    c1.daemon.shutdown().await;
    c2.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A policy reload that takes one of two services sharing a direct connection away from the
/// agent: at its next ticket refresh (30 s) the relay refuses a fresh ticket, the agent stops
/// sending that service's flows direct, and the other service stays direct on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ticket_refresh_takes_only_that_service_off_the_shared_path() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(
        &pki,
        loopback0(),
        vec![reach("web", &["alice"]), reach("db", &["alice"])],
    );
    let (addr, handle, stop, task) = reloadable_intermediate(base.clone());
    let mut c = start_connector(
        &pki,
        "web-1",
        &[addr],
        &[("web", Some(echo), None), ("db", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let (a, web, db) = web_and_db_agent(&pki, addr).await;
    for port in [web, db] {
        assert_eq!(tcp_roundtrip(port, b"x").await.unwrap(), b"x");
    }
    assert!(
        eventually(T, || direct_paths(&a) == 2.0).await,
        "web and db never both went direct"
    );
    let mut cfg = base.clone();
    cfg.policy = vec![reach("web", &["alice"])];
    handle.reload(cfg).expect("reload");
    let t0 = Instant::now();
    // The first refresh comes 30 s after the path came up.
    assert!(
        eventually(Duration::from_secs(40), || direct_paths(&a) == 1.0).await,
        "db stayed on the direct path after the relay refused its fresh ticket"
    );
    println!(
        "MEASURED db off the direct path {:?} after the reload",
        t0.elapsed()
    );
    let web = a.port("web", Protocol::Tcp);
    let before = direct_flows_ok(&a, "tcp");
    assert_eq!(tcp_roundtrip(web, b"still").await.unwrap(), b"still");
    assert_eq!(
        direct_flows_ok(&a, "tcp"),
        before + 1.0,
        "web left the direct path too"
    );
    assert_eq!(direct_connections(&c), 1.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = task.await;
}

/// On an established direct connection the connector answers every ticket: a valid one for
/// another service adds it (and keeps the first), an invalid one is refused with its reason,
/// counted, and takes nothing away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_answers_tickets_on_an_established_direct_connection() {
    use ztna_node::io::{write_frame, FramedRecv};
    use ztna_proto::{DirectMsg, DirectReply, Role, PROTOCOL_VERSION};
    logs();
    let pki = Pki::new();
    let (echo, accepted) = counting_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web", "db", "ssh"]));
    let relay = ztna_node::Identity::load(&cfg.tls, Role::Intermediate).unwrap();
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[
            ("web", Some(echo), None),
            ("db", Some(echo), None),
            ("ssh", Some(echo), None),
        ],
    );
    c.wait_registered(1).await;
    let (a_id, c_id) = (Pki::id("agent", "alice"), Pki::id("connector", "web-1"));
    let conn = direct::dial_connector(c.quic, &pki.issue("agent", "alice"), T)
        .await
        .unwrap();
    let (mut control, r) = conn.open_bi().await.unwrap();
    let mut control_recv = FramedRecv::new(r);
    let flow = |service: &'static str| {
        let conn = conn.clone();
        async move { open_flow(&conn, &tcp_open(service), false, T).await }
    };
    let ticket = |agent: &str, service: &str| {
        signed_ticket(&relay, agent, &c_id, &[service], 30_000).unwrap()
    };
    write_frame(
        &mut control,
        &DirectMsg::Hello {
            version: PROTOCOL_VERSION,
            ticket: ticket(&a_id, "web"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        control_recv.expect::<DirectReply>(T).await.unwrap(),
        DirectReply::Welcome {
            services: vec!["web".into()]
        }
    );
    assert!(
        matches!(flow("db").await, FlowOutcome::Rejected(..)),
        "db without its ticket"
    );
    write_frame(
        &mut control,
        &DirectMsg::Ticket {
            ticket: ticket(&a_id, "db"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        control_recv.expect::<DirectReply>(T).await.unwrap(),
        DirectReply::Welcome {
            services: vec!["db".into(), "web".into()]
        },
        "a valid ticket for db adds db and keeps web"
    );
    assert!(matches!(flow("db").await, FlowOutcome::Accepted(..)));
    assert!(matches!(flow("web").await, FlowOutcome::Accepted(..)));
    let refused = || {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_refused_total",
            &[("reason", "wrong_agent")],
        )
    };
    let before = refused();
    write_frame(
        &mut control,
        &DirectMsg::Ticket {
            ticket: ticket(&Pki::id("agent", "bob"), "ssh"),
        },
    )
    .await
    .unwrap();
    match control_recv.expect::<DirectReply>(T).await.unwrap() {
        DirectReply::Refused { reason } => {
            println!("MEASURED bob's ticket on alice's path: refused: {reason}");
            assert!(reason.contains("bob"), "{reason}");
        }
        other => panic!("bob's ticket was taken: {other:?}"),
    }
    assert_eq!(refused(), before + 1.0);
    let backend_before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        matches!(flow("ssh").await, FlowOutcome::Rejected(..)),
        "ssh after a refused ticket"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        backend_before,
        "a refused ticket reached a backend"
    );
    assert!(
        matches!(flow("web").await, FlowOutcome::Accepted(..)),
        "a refused ticket took web away"
    );
    assert!(
        conn.close_reason().is_none(),
        "a refused ticket closed the path"
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A crafted direct attempt from a fresh connection as `agent_tls`: what the connector did.
async fn attempt(
    conn_addr: std::net::SocketAddr,
    agent_tls: &ztna_node::config::TlsConfig,
    ticket: Option<Vec<u8>>,
    service: &str,
) -> Attempt {
    let conn = direct::dial_connector(conn_addr, agent_tls, T)
        .await
        .expect("TLS to the connector (a valid agent certificate)");
    direct::direct_attempt(&conn, ticket, service, T).await
}

/// The connector accepts a direct connection and its flows only with a ticket an intermediate it
/// is connected to signed, for this agent, this connector, an allowed service, unexpired. Every
/// other case is refused with its reason, counted, and never reaches a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_refuses_direct_connections_without_a_valid_ticket() {
    logs();
    let pki = Pki::new();
    let (echo, accepted) = counting_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web", "db"]));
    let relay_identity =
        ztna_node::Identity::load(&cfg.tls, ztna_proto::Role::Intermediate).unwrap();
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None), ("db", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let alice = pki.issue("agent", "alice");
    let (a_id, c_id) = (Pki::id("agent", "alice"), Pki::id("connector", "web-1"));
    let foreign = Pki::new();
    let foreign_relay = ztna_node::Identity::load(
        &foreign.issue("intermediate", "relay"),
        ztna_proto::Role::Intermediate,
    )
    .unwrap();
    let impostor_relay = ztna_node::Identity::load(
        &pki.issue("intermediate", "impostor"),
        ztna_proto::Role::Intermediate,
    )
    .unwrap();
    let cases: Vec<(&str, Option<Vec<u8>>, &str, &str)> = vec![
        ("no ticket", None, "web", "no_ticket"),
        (
            "expired",
            Some(signed_ticket(&relay_identity, &a_id, &c_id, &["web"], -10_000).unwrap()),
            "web",
            "expired",
        ),
        (
            "for another agent",
            Some(
                signed_ticket(
                    &relay_identity,
                    &Pki::id("agent", "bob"),
                    &c_id,
                    &["web"],
                    30_000,
                )
                .unwrap(),
            ),
            "web",
            "wrong_agent",
        ),
        (
            "for another connector",
            Some(
                signed_ticket(
                    &relay_identity,
                    &a_id,
                    &Pki::id("connector", "web-2"),
                    &["web"],
                    30_000,
                )
                .unwrap(),
            ),
            "web",
            "wrong_connector",
        ),
        (
            "for db, used for web",
            Some(signed_ticket(&relay_identity, &a_id, &c_id, &["db"], 30_000).unwrap()),
            "web",
            "service_not_allowed",
        ),
        (
            "signed by a relay the connector is not connected to",
            Some(signed_ticket(&impostor_relay, &a_id, &c_id, &["web"], 30_000).unwrap()),
            "web",
            "unknown_intermediate",
        ),
        // Same SPIFFE ID as the real relay, another key: the signature does not verify.
        (
            "signed by another CA's relay",
            Some(signed_ticket(&foreign_relay, &a_id, &c_id, &["web"], 30_000).unwrap()),
            "web",
            "bad_signature",
        ),
        (
            "living longer than tickets may",
            Some(signed_ticket(&relay_identity, &a_id, &c_id, &["web"], 3_600_000).unwrap()),
            "web",
            "bad_ticket",
        ),
        (
            "garbage",
            Some(vec![0xde, 0xad, 0xbe, 0xef]),
            "web",
            "malformed",
        ),
    ];
    let refused = |label: &str| {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_refused_total",
            &[("reason", label)],
        )
    };
    for (name, ticket, service, label) in cases {
        let before = refused(label);
        let outcome = attempt(c.quic, &alice, ticket, service).await.outcome;
        println!("ticket {name}: {outcome:?}");
        assert_ne!(outcome, DirectOutcome::FlowAccepted, "{name}: accepted");
        assert!(
            eventually(Duration::from_secs(2), || refused(label) > before).await,
            "{name}: not counted as {label}"
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused ticket reached a backend"
    );
    // The genuine article works.
    let good = signed_ticket(&relay_identity, &a_id, &c_id, &["web"], 30_000).unwrap();
    let ok = attempt(c.quic, &alice, Some(good), "web").await;
    assert_eq!(ok.outcome, DirectOutcome::FlowAccepted);
    let flow = ok.flow.expect("the accepted flow's stream");
    assert!(
        direct::echoes(flow, b"through the direct path", T).await,
        "the accepted flow did not reach the echo backend"
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// With `p2p = false` on the connector the intermediate reports the attempt as disabled and
/// every flow goes via the relay, without delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_off_at_the_connector_keeps_every_flow_on_the_relay() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (c, a) = web_chain_with(&pki, im.addr, echo, "p2p = false", "p2p = true").await;
    let port = a.port("web", Protocol::Tcp);
    let mut worst = Duration::ZERO;
    let started = Instant::now();
    for i in 0..20 {
        let t0 = Instant::now();
        let msg = format!("m{i}");
        assert_eq!(
            tcp_roundtrip(port, msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
        worst = worst.max(t0.elapsed());
    }
    let took = started.elapsed();
    let im_text = im.daemon.metrics.common.render();
    let p2p = |result| {
        metric(
            &im_text,
            "ztna_intermediate_p2p_total",
            &[("result", result)],
        )
    };
    println!(
        "MEASURED 20 flows with P2P off at the connector in {took:?}: slowest {worst:?}, \
         {} attempt(s) counted disabled",
        p2p("disabled")
    );
    // The agent asks again after a backoff of 1 s doubling (jittered to at least half), so
    // the flows' duration bounds the attempts: 1 in the first half second, then one more per
    // doubling. A loop of asks at every flow would count 20.
    let most = 1.0 + (took.as_secs_f64() / 0.5).max(1.0).log2().ceil();
    assert!(
        p2p("disabled") >= 1.0 && p2p("disabled") <= most,
        "{} attempts counted disabled in {took:?} (at most {most})",
        p2p("disabled")
    );
    assert_eq!(p2p("success") + p2p("failed"), 0.0, "{im_text}");
    assert_eq!(
        metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_flows_total",
            &[("path", "relay"), ("result", "ok")]
        ),
        20.0
    );
    assert!(
        worst < Duration::from_secs(1),
        "a flow was delayed: {worst:?}"
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// `p2p = false` on the agent (the harness default; set here explicitly): it never asks the
/// relay for a direct path, so the relay counts no P2P outcome and the connector sees no direct
/// connection, while every flow works via the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2p_off_at_the_agent_never_asks_for_a_direct_path() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (c, a) = web_chain_with(&pki, im.addr, echo, "", "p2p = false").await;
    let port = a.port("web", Protocol::Tcp);
    for i in 0..10 {
        let msg = format!("m{i}");
        assert_eq!(
            tcp_roundtrip(port, msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
        // Room for an attempt to show, had one been made.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = im.daemon.metrics.common.render();
    let asked: f64 = ["success", "failed", "denied", "disabled"]
        .iter()
        .map(|r| metric(&text, "ztna_intermediate_p2p_total", &[("result", r)]))
        .sum();
    println!("MEASURED p2p off at the agent: {asked} direct-path requests counted, 10 flows");
    assert_eq!(asked, 0.0, "{text}");
    assert_eq!(direct_connections(&c), 0.0);
    assert_eq!(direct_flows_ok(&a, "tcp"), 0.0);
    assert_eq!(
        metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_flows_total",
            &[("path", "relay"), ("result", "ok")]
        ),
        10.0
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An agent asking for a direct path to a service its policy does not allow (a crafted client:
/// ours never asks for a service no relay offers it) is refused with the reason, counted as
/// `denied`, and the connector is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_path_request_for_a_denied_service_is_refused_and_counted() {
    use ztna_node::io::{write_frame, FramedRecv};
    use ztna_proto::{ClientMsg, Role, ServerMsg, PROTOCOL_VERSION};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    // db is served, but only bob may reach it.
    let mut policy = open_policy(&["web"]);
    policy.push(PolicyRule {
        service: "db".into(),
        connectors: vec![Pki::id("connector", "*")],
        agents: vec![Pki::id("agent", "bob")],
    });
    let im = start_intermediate(&pki, policy);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None), ("db", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let (_ep, conn) = raw_connect(&pki.issue("agent", "alice"), Role::Agent, im.addr)
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let hello = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Agent,
        software: "test".into(),
        watch: vec!["db".into()],
    };
    write_frame(&mut send, &hello).await.unwrap();
    let p2p = |result| {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_p2p_total",
            &[("result", result)],
        )
    };
    let before = p2p("denied");
    write_frame(
        &mut send,
        &ClientMsg::DirectRequest {
            service: "db".into(),
            candidates: vec![],
        },
    )
    .await
    .unwrap();
    let reason = tokio::time::timeout(T, async {
        loop {
            match recv.expect::<ServerMsg>(T).await {
                Ok(ServerMsg::DirectRefused { service, reason }) => {
                    assert_eq!(service, "db");
                    return reason;
                }
                Ok(ServerMsg::DirectStart { .. }) => panic!("a denied service was brokered"),
                Ok(_) => continue,
                Err(e) => panic!("control stream ended: {e}"),
            }
        }
    })
    .await
    .expect("no answer to the direct-path request");
    println!("MEASURED direct-path request for a denied service: refused: {reason}");
    assert!(reason.contains("policy does not allow"), "{reason}");
    assert_eq!(p2p("denied"), before + 1.0);
    assert_eq!(p2p("success") + p2p("failed") + p2p("disabled"), 0.0);
    assert_eq!(direct_connections(&c), 0.0);
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// IPv6 only: relay, connector and agent each bound to `[::1]`, so the only candidates that can
/// work are IPv6 ones (the observed address the relay sends). The path comes up over IPv6 and
/// the relay carries none of the direct flows' bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_path_comes_up_over_ipv6() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let v6: std::net::SocketAddr = "[::1]:0".parse().unwrap();
    let im = start_intermediate_with(intermediate_config(&pki, v6, open_policy(&["web"])));
    let bind = "bind = \"[::1]:0\"";
    let (c, a) = web_chain_with(&pki, im.addr, echo, bind, &format!("p2p = true\n{bind}")).await;
    let port = a.port("web", Protocol::Tcp);
    assert_eq!(tcp_roundtrip(port, b"first").await.unwrap(), b"first");
    assert!(
        eventually(T, || direct_paths(&a) == 1.0).await,
        "no direct path over IPv6"
    );
    let (_, status) = http_get(a.ops, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let via = status["services"][0]["relay"]
        .as_str()
        .unwrap_or("")
        .to_string();
    println!("MEASURED direct path over IPv6: {via}");
    assert!(via.contains(" at [::1]:"), "{status:#}");
    let before = relay_bytes(&im);
    let payload = vec![6u8; 1 << 20];
    for _ in 0..3 {
        assert_eq!(tcp_roundtrip(port, &payload).await.unwrap(), payload);
    }
    assert_eq!(relay_bytes(&im) - before, 0.0);
    assert_eq!(direct_flows_ok(&a, "tcp"), 3.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Datagrams on a direct connection that name no flow, or no valid flow id at all, are counted by
/// reason at the connector (`unknown_flow`, `malformed`) and logged; they reach no backend and
/// leave the path working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_counts_datagrams_it_cannot_place_on_a_direct_path() {
    logs();
    let pki = Pki::new();
    let (echo, accepted) = counting_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    let relay = ztna_node::Identity::load(&cfg.tls, ztna_proto::Role::Intermediate).unwrap();
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let (a_id, c_id) = (Pki::id("agent", "alice"), Pki::id("connector", "web-1"));
    let conn = direct::dial_connector(c.quic, &pki.issue("agent", "alice"), T)
        .await
        .unwrap();
    let ticket = signed_ticket(&relay, &a_id, &c_id, &["web"], 30_000).unwrap();
    // A ticketed path with no flow yet: a Hello and a rejected flow for a service it lacks.
    let probe = direct::direct_attempt(&conn, Some(ticket), "nope", T).await;
    assert!(
        matches!(probe.outcome, DirectOutcome::FlowRejected(_)),
        "{:?}",
        probe.outcome
    );
    let (unknown, malformed) = stray_datagrams_counted(
        &conn,
        3,
        || c.daemon.metrics.common.render(),
        "ztna_connector_udp_dropped_total",
    )
    .await;
    println!(
        "MEASURED 3 unknown-flow and 3 malformed datagrams on a direct path: unknown_flow {unknown}, malformed {malformed}"
    );
    assert!(
        unknown >= 3.0 && malformed >= 3.0,
        "unknown_flow {unknown}, malformed {malformed} (3 each sent)"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a stray datagram opened a backend connection"
    );
    // The path still carries flows.
    let ok = direct::direct_attempt(&conn, None, "web", T).await;
    assert_eq!(ok.outcome, DirectOutcome::FlowAccepted);
    let flow = ok.flow.expect("the accepted flow's stream");
    assert!(direct::echoes(flow, b"still here", T).await);
    drop(probe);
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Reads a flow's stream until it ends: the application code it was reset with, if it was.
async fn reset_code(flow: (quinn::SendStream, ztna_node::io::FramedRecv)) -> Option<u64> {
    let (_send, recv) = flow;
    let (mut recv, _) = recv.into_parts();
    let mut buf = [0u8; 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(quinn::ReadError::Reset(code)) => return Some(code.into_inner()),
            Err(_) => return None,
        }
    }
}

/// Policy lives at the intermediates: a service whose tickets stop coming loses its running
/// direct flows when its last ticket lapses (ended with the REVOKED code, counted), as relayed
/// flows end when a reload forbids them. Another service's flows on the same connection carry
/// on, and a fresh ticket lets the service in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_direct_flow_ends_when_its_ticket_lapses_unrenewed() {
    use ztna_node::io::{write_frame, FramedRecv};
    use ztna_proto::{DirectMsg, DirectReply, Role, PROTOCOL_VERSION};
    logs();
    let pki = Pki::new();
    let (echo, _accepted) = counting_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web", "db"]));
    let relay = ztna_node::Identity::load(&cfg.tls, Role::Intermediate).unwrap();
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None), ("db", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let (a_id, c_id) = (Pki::id("agent", "alice"), Pki::id("connector", "web-1"));
    let conn = direct::dial_connector(c.quic, &pki.issue("agent", "alice"), T)
        .await
        .unwrap();
    let (mut control, r) = conn.open_bi().await.unwrap();
    let mut control_recv = FramedRecv::new(r);
    // web: a ticket of 1 s (lapses 1 s + the 2 s of tolerated skew from now); db: 30 s.
    let issued = Instant::now();
    let short = signed_ticket(&relay, &a_id, &c_id, &["web"], 1_000).unwrap();
    write_frame(
        &mut control,
        &DirectMsg::Hello {
            version: PROTOCOL_VERSION,
            ticket: short,
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        control_recv.expect::<DirectReply>(T).await.unwrap(),
        DirectReply::Welcome { .. }
    ));
    let db_ticket = signed_ticket(&relay, &a_id, &c_id, &["db"], 30_000).unwrap();
    write_frame(&mut control, &DirectMsg::Ticket { ticket: db_ticket })
        .await
        .unwrap();
    control_recv.expect::<DirectReply>(T).await.unwrap();
    let flow = |service: &'static str| {
        let conn = conn.clone();
        async move {
            match open_flow(&conn, &tcp_open(service), false, T).await {
                FlowOutcome::Accepted(s, r) => Some((s, r)),
                _ => None,
            }
        }
    };
    let web = flow("web").await.expect("web flow accepted");
    let (mut db_send, db_recv) = flow("db").await.expect("db flow accepted");
    let revoked = || {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_revoked_total",
            &[],
        )
    };
    assert_eq!(revoked(), 0.0);
    let code = tokio::time::timeout(Duration::from_secs(8), reset_code(web))
        .await
        .expect("the web flow outlived its ticket by more than 5 s");
    let after = issued.elapsed();
    println!("MEASURED web flow ended {after:?} after its 1 s ticket was issued (code {code:?})");
    assert_eq!(code, Some(u64::from(ztna_proto::codes::REVOKED)));
    assert!(
        after >= Duration::from_millis(2_900),
        "ended early: {after:?}"
    );
    assert_eq!(revoked(), 1.0);
    // db's flow on the same connection carries on.
    let (mut db_recv, early) = db_recv.into_parts();
    assert!(early.is_empty());
    db_send.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(
        T,
        tokio::io::AsyncReadExt::read_exact(&mut db_recv, &mut got),
    )
    .await
    .expect("db echo")
    .unwrap();
    assert_eq!(&got, b"still here");
    // New web flows are refused; a fresh ticket lets web in again.
    assert!(
        flow("web").await.is_none(),
        "a web flow after its ticket lapsed"
    );
    let fresh = signed_ticket(&relay, &a_id, &c_id, &["web"], 30_000).unwrap();
    write_frame(&mut control, &DirectMsg::Ticket { ticket: fresh })
        .await
        .unwrap();
    control_recv.expect::<DirectReply>(T).await.unwrap();
    let again = flow("web").await.expect("web after a fresh ticket");
    assert!(direct::echoes(again, b"back", T).await);
    // A connection whose every ticket lapsed is closed by the connector.
    let lone = direct::dial_connector(c.quic, &pki.issue("agent", "alice"), T)
        .await
        .unwrap();
    let short = signed_ticket(&relay, &a_id, &c_id, &["web"], 500).unwrap();
    let first = direct::direct_attempt(&lone, Some(short), "web", T).await;
    assert_eq!(first.outcome, DirectOutcome::FlowAccepted);
    let why = tokio::time::timeout(Duration::from_secs(6), lone.closed())
        .await
        .expect("a direct connection without a valid ticket stayed open");
    println!("MEASURED a connection whose only ticket lapsed: {why}");
    assert!(
        matches!(&why, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ztna_proto::codes::REVOKED)),
        "{why}"
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// The intermediates never see direct flows, so the connector holds each agent to
/// `max_direct_flows_per_agent` across its direct connections, and to a few direct connections;
/// other agents are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_holds_each_agent_to_its_direct_flow_and_connection_limits() {
    logs();
    let pki = Pki::new();
    let (echo, _accepted) = counting_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    let relay = ztna_node::Identity::load(&cfg.tls, ztna_proto::Role::Intermediate).unwrap();
    let im = start_intermediate_with(cfg);
    let mut c = start_connector_with(
        pki.issue("connector", "web-1"),
        &[im.addr],
        &[("web", Some(echo), None)],
        "max_direct_flows_per_agent = 3",
    );
    c.wait_registered(1).await;
    let c_id = Pki::id("connector", "web-1");
    let (alice, bob) = (pki.issue("agent", "alice"), pki.issue("agent", "bob"));
    let ticket = |agent: &str| signed_ticket(&relay, agent, &c_id, &["web"], 30_000).unwrap();
    let refused = |reason: &str| {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_direct_refused_total",
            &[("reason", reason)],
        )
    };
    // Three flows on two connections of alice's: the third is her last.
    let a1 = attempt(
        c.quic,
        &alice,
        Some(ticket(&Pki::id("agent", "alice"))),
        "web",
    )
    .await;
    let a2 = attempt(
        c.quic,
        &alice,
        Some(ticket(&Pki::id("agent", "alice"))),
        "web",
    )
    .await;
    assert_eq!(a1.outcome, DirectOutcome::FlowAccepted);
    assert_eq!(a2.outcome, DirectOutcome::FlowAccepted);
    let conn = direct::dial_connector(c.quic, &alice, T).await.unwrap();
    let a3 =
        direct::direct_attempt(&conn, Some(ticket(&Pki::id("agent", "alice"))), "web", T).await;
    assert_eq!(a3.outcome, DirectOutcome::FlowAccepted);
    let over = open_flow(&conn, &tcp_open("web"), false, T).await;
    match &over {
        FlowOutcome::Rejected(reason, why) => {
            println!("MEASURED alice's 4th direct flow: {reason:?}: {why}");
            assert_eq!(*reason, ztna_proto::RejectReason::Limit);
            assert!(why.contains("max_direct_flows_per_agent"), "{why}");
        }
        other => panic!("a 4th direct flow: {}", other.label()),
    }
    assert_eq!(refused("flow_limit"), 1.0);
    // Bob is not held to alice's count.
    let b = attempt(c.quic, &bob, Some(ticket(&Pki::id("agent", "bob"))), "web").await;
    assert_eq!(b.outcome, DirectOutcome::FlowAccepted);
    // Once one of alice's flows ends, she may open another.
    drop(a1);
    let t0 = Instant::now();
    let mut freed = None;
    while freed.is_none() && t0.elapsed() < T {
        match open_flow(&conn, &tcp_open("web"), false, T).await {
            FlowOutcome::Accepted(s, r) => freed = Some((s, r)),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        freed.is_some(),
        "alice's flow count did not go down when a flow ended"
    );
    // Connections: she has 2 now (a1's and a2's ended with their control streams); up to 8 at
    // once.
    let mut held = vec![];
    let mut refused_at = None;
    for i in 0..10 {
        let conn = direct::dial_connector(c.quic, &alice, T).await.unwrap();
        let r = direct::direct_attempt(
            &conn,
            Some(ticket(&Pki::id("agent", "alice"))),
            "nothing",
            T,
        )
        .await;
        if let DirectOutcome::Refused(why) = &r.outcome {
            println!("MEASURED alice's connection {i} more: refused: {why}");
            assert!(why.contains("8 direct connections"), "{why}");
            refused_at = Some(i);
            break;
        }
        // Its control stream is what keeps a direct connection: hold both.
        held.push((conn, r));
    }
    assert_eq!(refused_at, Some(6), "alice held 2 and may have 8");
    assert!(refused("too_many_connections") >= 1.0);
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An intermediate that reloads a new key keeps signing tickets for a connector connected
/// before the reload with the key that connector knows it by: direct paths keep coming up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_paths_come_up_after_the_intermediate_reloads_a_new_key() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    let (addr, handle, stop, task) = reloadable_intermediate(cfg.clone());
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    // A new certificate and key for the same identity, in place, then a reload.
    let before = std::fs::read(&cfg.tls.key).unwrap();
    pki.issue("intermediate", "relay");
    assert_ne!(
        std::fs::read(&cfg.tls.key).unwrap(),
        before,
        "the key did not change"
    );
    handle.reload(cfg.clone()).expect("reload");
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[addr],
        &[("web", ForwardProtocol::Tcp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    assert_eq!(tcp_roundtrip(port, b"first").await.unwrap(), b"first");
    let up = eventually(T, || direct_paths(&a) == 1.0).await;
    let bad = metric(
        &c.daemon.metrics.common.render(),
        "ztna_connector_direct_refused_total",
        &[("reason", "bad_signature")],
    );
    println!("MEASURED direct path after the key reload: up {up}, tickets refused as bad_signature {bad}");
    assert!(up, "no direct path after the intermediate's key changed");
    assert_eq!(bad, 0.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = task.await;
}

/// A policy reload that takes an agent's only direct service away ends its direct path: the
/// agent closes the connection once it carries no service (neither side keeps an idle connection
/// and its keepalives), and a flow that was running on it ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_path_left_without_a_service_is_closed_with_its_flows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(&pki, loopback0(), vec![reach("web", &["alice"])]);
    let (addr, handle, stop, task) = reloadable_intermediate(base.clone());
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[addr],
        &[("web", ForwardProtocol::Tcp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    assert_eq!(tcp_roundtrip(port, b"first").await.unwrap(), b"first");
    assert!(eventually(T, || direct_paths(&a) == 1.0).await);
    // A flow on the direct path, kept open.
    let before = direct_flows_ok(&a, "tcp");
    let mut held = tokio::net::TcpStream::connect(port).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    assert!(
        eventually(T, || direct_flows_ok(&a, "tcp") == before + 1.0).await,
        "the held flow did not go direct"
    );
    let mut cfg = base.clone();
    cfg.policy = vec![reach("web", &["bob"])];
    handle.reload(cfg).expect("reload");
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(45), || direct_connections(&c) == 0.0).await,
        "the direct connection stayed open without a service"
    );
    let closed_after = t0.elapsed();
    let ended = tokio::time::timeout(Duration::from_secs(5), held.read(&mut one)).await;
    println!(
        "MEASURED direct connection closed {closed_after:?} after the reload; held flow: {ended:?}"
    );
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the flow outlived its direct path: {ended:?}"
    );
    assert_eq!(direct_paths(&a), 0.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = task.await;
}

/// A connector that drains refuses new flows on its direct paths (Draining). The agent sends
/// no further new flow there after the first refusal: they go via the relay to the other
/// connector, then direct to it. A flow already running on the draining connector's direct path
/// carries on, and the relay still renews its ticket although the connector has withdrawn the
/// service (the flow may run until the connector's `drain_timeout`, which may be longer than a
/// ticket's 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_connectors_direct_path_takes_no_new_flows_and_its_running_ones_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use ztna_node::io::write_frame;
    use ztna_proto::{ClientMsg, Role, ServerMsg};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (two, _t) = tcp_named("two").await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c1 = start_connector_with(
        pki.issue("connector", "web-1"),
        &[im.addr],
        &[("web", Some(echo), None)],
        "drain_timeout = \"60s\"",
    );
    c1.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im.addr],
        &[("web", ForwardProtocol::Tcp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    assert_eq!(tcp_roundtrip(port, b"w").await.unwrap(), b"w");
    assert!(
        eventually(T, || direct_paths(&a) == 1.0).await,
        "no direct path to web-1"
    );
    let c1_metric = |name: &str, labels: &[(&str, &str)]| {
        metric(&c1.daemon.metrics.common.render(), name, labels)
    };
    // A long flow on the direct path to web-1.
    let mut held = tokio::net::TcpStream::connect(port).await.unwrap();
    let mut byte = [0u8; 1];
    held.write_all(b"a").await.unwrap();
    held.read_exact(&mut byte).await.unwrap();
    assert_eq!(
        c1_metric("ztna_connector_direct_flows_total", &[("service", "web")]),
        1.0,
        "the held flow did not go direct"
    );
    let mut c2 = start_connector(&pki, "web-2", &[im.addr], &[("web", Some(two), None)]);
    c2.wait_registered(1).await;
    // web-1 drains: it withdraws web at the relay, and waits for the held flow.
    c1.daemon.stop.cancel();
    let withdrawn = eventually(T, || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")],
        ) == 1.0
    })
    .await;
    assert!(withdrawn, "web-1 never withdrew web at the relay");
    let refused = || c1_metric("ztna_connector_flows_total", &[("result", "error")]);
    let refused_before = refused();
    let t0 = Instant::now();
    let mut flows = 0;
    while direct_connections(&c2) < 1.0 || flows < 6 {
        assert!(t0.elapsed() < T, "no direct path to web-2 within {T:?}");
        assert_eq!(tcp_roundtrip(port, b"x").await.unwrap(), b"two");
        flows += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let direct_to_two = t0.elapsed();
    let refusals = refused() - refused_before;
    // The relay renews the held flow's ticket at web-1, which no longer offers web.
    let bob = ztna_integration::hostile::Creds {
        tls: pki.issue("agent", "bob"),
        role: Role::Agent,
    };
    let ep = ztna_integration::hostile::client_endpoint(im.addr).unwrap();
    let ztna_integration::hostile::Session {
        control_send: mut send,
        control_recv: mut recv,
        ..
    } = ztna_integration::hostile::session(
        &ep,
        &bob.client_config().unwrap(),
        im.addr,
        Role::Agent,
        vec!["web".into()],
        T,
    )
    .await
    .unwrap();
    let mut ticket_for = async |connector: String| {
        let ask = ClientMsg::TicketRequest {
            service: "web".into(),
            connector,
        };
        write_frame(&mut send, &ask).await.unwrap();
        loop {
            match recv.expect::<ServerMsg>(T).await {
                Ok(ServerMsg::Ticket { .. }) => return Ok(()),
                Ok(ServerMsg::DirectRefused { reason, .. }) => return Err(reason),
                Ok(_) => continue,
                Err(e) => panic!("control stream ended: {e}"),
            }
        }
    };
    let renewed = ticket_for(Pki::id("connector", "web-1")).await;
    let stranger = ticket_for(Pki::id("connector", "web-9")).await;
    held.write_all(b"b").await.unwrap();
    held.read_exact(&mut byte).await.unwrap();
    println!(
        "MEASURED web-1 draining: {flows} new flows, {refusals} refused by web-1's direct path, \
         direct to web-2 after {direct_to_two:?}; ticket at web-1 (withdrawn): {renewed:?}; \
         at a connector never seen: {stranger:?}; the held flow still echoes"
    );
    assert_eq!(byte, *b"b", "the held flow on the draining path broke");
    assert_eq!(
        refusals, 1.0,
        "new flows kept being sent to the draining connector's direct path"
    );
    assert!(
        renewed.is_ok(),
        "no ticket renewal at the draining connector: {renewed:?}"
    );
    assert!(stranger.is_err(), "a ticket for a connector never seen");
    // Once the held flow ends, web-1's drain completes.
    drop(held);
    let done = tokio::time::timeout(T, c1.daemon.task).await;
    assert!(done.is_ok(), "web-1's drain did not end with its last flow");
    a.daemon.shutdown().await;
    c2.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Sends `msg` on a hostile session's control stream and waits for the intermediate's answer:
/// everything sent before it has been read.
async fn say_and_hear(s: &mut ztna_integration::hostile::Session, msg: &ztna_proto::ClientMsg) {
    ztna_node::io::write_frame(&mut s.control_send, msg)
        .await
        .unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        s.control_recv.next::<ztna_proto::ServerMsg>(),
    )
    .await;
    assert!(matches!(answered, Ok(Ok(Some(_)))), "{answered:?}");
}

/// An agent cannot make up P2P results: reports on attempts it never asked this intermediate
/// about are ignored (not counted as success or failure); a real attempt still counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_on_attempts_never_asked_about_are_not_counted() {
    use ztna_integration::hostile::{session, Creds};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector_with(
        pki.issue("connector", "web-1"),
        &[im.addr],
        &[("web", Some(echo), None)],
        "p2p = true",
    );
    c.wait_registered(1).await;
    let creds = Creds {
        tls: pki.issue("agent", "mallory"),
        role: ztna_proto::Role::Agent,
    };
    let ep = ztna_integration::hostile::client_endpoint(im.addr).unwrap();
    let mut s = session(
        &ep,
        &creds.client_config().unwrap(),
        im.addr,
        ztna_proto::Role::Agent,
        vec![],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let counts = || {
        let text = im.daemon.metrics.common.render();
        ["success", "failed"]
            .map(|r| metric(&text, "ztna_intermediate_p2p_total", &[("result", r)]))
    };
    for _ in 0..1000 {
        let msg = ztna_proto::ClientMsg::DirectResult {
            service: "web".into(),
            success: true,
            reason: String::new(),
        };
        ztna_node::io::write_frame(&mut s.control_send, &msg)
            .await
            .unwrap();
    }
    // A message after them, answered: the results before it were all read.
    let request = ztna_proto::ClientMsg::DirectRequest {
        service: "web".into(),
        candidates: vec![],
    };
    say_and_hear(&mut s, &request).await;
    let after = counts();
    println!("MEASURED 1000 unsolicited DirectResults: p2p_total success/failed {after:?}");
    assert_eq!(after, [0.0, 0.0], "made-up results were counted");
    // Now it asked, and was sent a DirectStart: one report counts, a second one does not.
    for expect in [1.0, 1.0] {
        let msg = ztna_proto::ClientMsg::DirectResult {
            service: "web".into(),
            success: false,
            reason: "test".into(),
        };
        ztna_node::io::write_frame(&mut s.control_send, &msg)
            .await
            .unwrap();
        let ok = eventually(Duration::from_secs(2), || counts()[1] == expect).await;
        assert!(ok, "{:?}", counts());
    }
    // A message after it, answered (a ticket for a connector that does not exist is refused):
    // the report before it was read.
    let ticket = ztna_proto::ClientMsg::TicketRequest {
        service: "web".into(),
        connector: "spiffe://test.example/connector/nobody".into(),
    };
    say_and_hear(&mut s, &ticket).await;
    assert_eq!(
        counts()[1],
        1.0,
        "a second report on one request was counted"
    );
    s.conn.close(0u32.into(), b"");
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

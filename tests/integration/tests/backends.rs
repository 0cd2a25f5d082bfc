//! Backends given by host name (`tcp = "db.internal:5432"`): resolved when a flow opens, every
//! address tried for TCP, a name that does not resolve refused at once with the host named.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use ztna_connector::Resolver;
use ztna_integration::*;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_proto::{ClientMsg, FlowOpen, FlowReply, Protocol, RejectReason, Role, ServiceState};

/// Opens a flow the way an agent does, bypassing the agent, and returns the reply it got.
async fn raw_open(pki: &Pki, relay: SocketAddr, service: &str, protocol: Protocol) -> FlowReply {
    let tls = pki.issue("agent", "raw");
    let (_ep, conn) = raw_connect(&tls, Role::Agent, relay)
        .await
        .expect("agent connects");
    let (mut ctl, _ctl_recv) = conn.open_bi().await.expect("control stream");
    let hello = ClientMsg::Hello {
        version: ztna_proto::PROTOCOL_VERSION,
        role: Role::Agent,
        software: "test".into(),
        watch: vec![],
    };
    write_frame(&mut ctl, &hello).await.expect("hello");
    let (mut s, r) = conn.open_bi().await.expect("flow stream");
    let mut r = FramedRecv::new(r);
    let open = FlowOpen {
        service: service.into(),
        protocol,
        flow_id: 7,
    };
    write_frame(&mut s, &open).await.expect("flow open");
    r.expect::<FlowReply>(Duration::from_secs(10))
        .await
        .expect("flow reply")
}

async fn udp_roundtrip(port: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 2048];
    for _ in 0..20 {
        s.send_to(msg, port).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
        {
            return buf[..n].to_vec();
        }
    }
    Vec::new()
}

/// `localhost:PORT` through the operating system's resolver, for TCP and UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_by_name_through_the_system_resolver() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    // UDP uses the name's first address it can send to (both are loopback here): put the
    // backend there, whichever family it is.
    let first: SocketAddr = tokio::net::lookup_host("localhost:0")
        .await
        .expect("localhost resolves")
        .next()
        .expect("an address");
    let udp = UdpSocket::bind(first).await.unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let tcp_name = format!("localhost:{}", echo.port());
    let udp_name = format!("localhost:{udp_port}");
    let im = start_intermediate(&pki, open_policy(&["web", "dns"]));
    let mut c = start_connector_resolving(
        &pki,
        "web-1",
        &[im.addr],
        &[
            ("web", Some(&tcp_name), None),
            ("dns", None, Some(&udp_name)),
        ],
        Resolver::system(),
    );
    c.wait_registered(1).await;
    let mut a = start_agent(
        &pki,
        "alice",
        &[im.addr],
        &[("web", ForwardProtocol::Tcp), ("dns", ForwardProtocol::Udp)],
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    a.wait_status("dns", ServiceState::Available).await;
    let got = tcp_roundtrip(a.port("web", Protocol::Tcp), b"by name")
        .await
        .unwrap();
    assert_eq!(got, b"by name");
    let got = udp_roundtrip(a.port("dns", Protocol::Udp), b"udp by name").await;
    assert_eq!(got, b"udp by name");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A name with several addresses whose first refuses: the next one carries the flow. A name
/// that does not resolve: the flow is refused at once, the reason names the host, and it is
/// counted as a backend error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_is_tried_and_a_name_that_does_not_resolve_is_refused_promptly() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    // 127.0.0.2 is loopback as well, and nothing listens there: connection refused (TCP), ICMP
    // port unreachable (UDP).
    let ips: [IpAddr; 2] = ["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()];
    let resolver = Resolver::fixed(&[("db.test", &ips)]);
    let db = format!("db.test:{}", echo.port());
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dns = format!("db.test:{}", udp.local_addr().unwrap().port());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let gone = "gone.test:5432".to_string();
    let im = start_intermediate(&pki, open_policy(&["db", "dns", "gone", "gone-udp"]));
    let mut c = start_connector_resolving(
        &pki,
        "web-1",
        &[im.addr],
        &[
            ("db", Some(&db), None),
            ("dns", None, Some(&dns)),
            ("gone", Some(&gone), None),
            ("gone-udp", None, Some(&gone)),
        ],
        resolver,
    );
    c.wait_registered(1).await;
    let mut a = start_agent(
        &pki,
        "alice",
        &[im.addr],
        &[
            ("db", ForwardProtocol::Tcp),
            ("dns", ForwardProtocol::Udp),
            ("gone", ForwardProtocol::Tcp),
        ],
    )
    .await;
    a.wait_status("db", ServiceState::Available).await;
    a.wait_status("gone", ServiceState::Available).await;
    for i in 0..3 {
        let msg = format!("flow {i}");
        let got = tcp_roundtrip(a.port("db", Protocol::Tcp), msg.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            got,
            msg.as_bytes(),
            "db.test's second address carries the flow"
        );
    }
    // The user's connection is refused at once, not after connect_timeout.
    let took = refused_locally(a.port("gone", Protocol::Tcp)).await;
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");
    // What the agent was told.
    for (service, protocol) in [("gone", Protocol::Tcp), ("gone-udp", Protocol::Udp)] {
        match raw_open(&pki, im.addr, service, protocol).await {
            FlowReply::Reject {
                reason: RejectReason::BackendUnreachable,
                message,
            } => assert!(
                message.contains("backend gone.test:5432 of")
                    && message.contains("cannot resolve gone.test"),
                "{message}"
            ),
            other => panic!("{service}: expected BackendUnreachable, got {other:?}"),
        }
    }
    // The connector's status shows what each name resolved to, or why it did not.
    let (code, body) = http_get(c.ops, "/status").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let service = |name: &str| {
        v["services"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["service"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
    };
    let p = echo.port();
    assert_eq!(
        service("db")["resolved"]["tcp"]["addresses"],
        serde_json::json!([format!("127.0.0.2:{p}"), format!("127.0.0.1:{p}")])
    );
    let why = service("gone")["resolved"]["tcp"]["error"].clone();
    assert!(
        why.as_str()
            .is_some_and(|w| w.contains("cannot resolve gone.test")),
        "{why}"
    );
    let text = c.daemon.metrics.common.render();
    let errors = |s| {
        metric(
            &text,
            "ztna_connector_backend_errors_total",
            &[("service", s)],
        )
    };
    assert_eq!(errors("db"), 0.0, "a refused first address is not an error");
    assert_eq!(errors("gone"), 2.0);
    assert_eq!(errors("gone-udp"), 1.0);
    // UDP: the first address's host refuses the flow's first datagram (ICMP); the flow moves to
    // the next address, and the client's retry is answered from there.
    a.wait_status("dns", ServiceState::Available).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    let mut buf = [0u8; 64];
    let mut answered_after = None;
    for attempt in 0..20 {
        client.send(b"who is db").await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(250), client.recv(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"who is db");
            answered_after = Some(attempt);
            break;
        }
    }
    let answered_after = answered_after.expect("no answer from db.test's second address in 5 s");
    for i in 0..5 {
        let msg = format!("query {i}");
        client.send(msg.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("answered once moved")
            .unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
    }
    let refused = metric(
        &c.daemon.metrics.common.render(),
        "ztna_connector_udp_dropped_total",
        &[("reason", "backend_error")],
    );
    assert!(
        refused >= 1.0,
        "the first address never refused (answered after {answered_after} retries): the test proves nothing"
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

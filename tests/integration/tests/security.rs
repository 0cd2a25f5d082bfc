//! Identity, policy and hostile input: every refusal has a reason, and the daemons keep serving
//! everyone else.

use std::time::Duration;

use tokio::net::UdpSocket;
use ztna_integration::*;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_pki::{IssueRequest, Validity};
use ztna_proto::{
    ClientMsg, FlowOpen, FlowReply, Protocol, RejectReason, Role, ServerMsg, ServiceState,
    PROTOCOL_VERSION,
};

struct World {
    pki: Pki,
    im: IntermediateHandle,
    _c: ConnectorHandle,
    agent: AgentHandle,
}

/// Policy: only agent/alice may reach web; only connector/web-* may serve it.
async fn world() -> World {
    logs();
    let pki = Pki::new();
    let (echo, _) = tcp_echo().await;
    let policy = vec![PolicyRule {
        service: "web".into(),
        connectors: vec![Pki::id("connector", "web-*")],
        agents: vec![Pki::id("agent", "alice")],
    }];
    let im = start_intermediate(&pki, policy);
    let (c, agent) = web_chain(&pki, im.addr, echo).await;
    World {
        pki,
        im,
        _c: c,
        agent,
    }
}

async fn legit_still_works(w: &World) {
    let back = tcp_roundtrip(w.agent.port("web", Protocol::Tcp), b"still here")
        .await
        .unwrap();
    assert_eq!(back, b"still here", "legitimate agent affected");
}

async fn hello(conn: &quinn::Connection, role: Role) -> (quinn::SendStream, FramedRecv, ServerMsg) {
    let (mut s, r) = conn.open_bi().await.unwrap();
    let mut r = FramedRecv::new(r);
    let msg = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role,
        software: "test".into(),
        watch: vec!["web".into()],
    };
    write_frame(&mut s, &msg).await.unwrap();
    let reply = r.expect::<ServerMsg>(Duration::from_secs(5)).await.unwrap();
    (s, r, reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denied_agent_learns_why_and_is_refused_at_once() {
    let w = world().await;
    let mut mallory = start_agent(
        &w.pki,
        "mallory",
        &[w.im.addr],
        &[("web", ForwardProtocol::Tcp)],
    )
    .await;
    let reason = mallory.wait_status("web", ServiceState::Denied).await;
    assert!(
        reason.contains("policy does not allow") && reason.contains("agent/mallory"),
        "{reason}"
    );
    // The local connection is refused immediately, not after a timeout.
    let took = refused_locally(mallory.port("web", Protocol::Tcp)).await;
    assert!(took < Duration::from_secs(1), "refusal took {:?}", took);
    let text = mallory.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_agent_flows_total",
            &[("service", "web"), ("result", "denied")]
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "ztna_agent_service_available", &[("service", "web")]),
        0.0
    );

    // A flow opened anyway (bypassing the agent's own check) is denied by the intermediate.
    let tls = w.pki.issue("agent", "mallory2");
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (_cs, _cr, _) = hello(&conn, Role::Agent).await;
    let (mut s, r) = conn.open_bi().await.unwrap();
    let mut r = FramedRecv::new(r);
    write_frame(
        &mut s,
        &FlowOpen {
            service: "web".into(),
            protocol: Protocol::Tcp,
            flow_id: 0,
        },
    )
    .await
    .unwrap();
    match r.expect::<FlowReply>(Duration::from_secs(5)).await.unwrap() {
        FlowReply::Reject {
            reason: RejectReason::Denied,
            message,
        } => assert!(message.contains("mallory2"), "{message}"),
        other => panic!("expected denial, got {other:?}"),
    }
    let text = w.im.daemon.metrics.common.render();
    assert!(
        metric(
            &text,
            "ztna_intermediate_flows_total",
            &[("protocol", "tcp"), ("result", "denied")]
        ) >= 1.0
    );
    legit_still_works(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_expired_and_wrong_role_are_refused_with_reasons() {
    let w = world().await;
    // Certificate from another CA (same trust domain name), presented to the real intermediate.
    let foreign = Pki::new();
    let issued = foreign
        .ca
        .issue(&IssueRequest::new("agent", "eve"))
        .unwrap();
    let mut tls = foreign.tls_for(&issued, "eve");
    tls.ca = w.pki.ca_path.clone();
    let err = refused(&tls, Role::Agent, w.im.addr)
        .await
        .expect("foreign CA accepted");
    assert!(err.contains("not issued by the deployment CA"), "{err}");

    // Expired certificate from the right CA.
    let mut req = IssueRequest::new("agent", "old");
    let now = time::OffsetDateTime::now_utc();
    req.validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let issued = w.pki.ca.issue(&req).unwrap();
    let tls = w.pki.tls_for(&issued, "old");
    let err = refused(&tls, Role::Agent, w.im.addr)
        .await
        .expect("expired cert accepted");
    assert!(err.contains("expired"), "{err}");
    // The real agent refuses to start with that certificate, and says why (it used to start,
    // report itself up and never get a tunnel).
    let why =
        match try_start_agent_with(tls, &[w.im.addr], &[("web", ForwardProtocol::Tcp)], "").await {
            Ok(_) => panic!("an agent started with an expired certificate"),
            Err(why) => why,
        };
    println!("MEASURED agent start with an expired certificate: {why}");
    assert!(why.contains("expired on"), "{why}");

    // An intermediate certificate may not be used as a client.
    let tls = w.pki.issue("intermediate", "rogue-relay");
    let err = refused(&tls, Role::Intermediate, w.im.addr)
        .await
        .expect("intermediate as client accepted");
    assert!(err.contains("access denied"), "{err}");

    // A certificate without a SPIFFE ID.
    let issued = w
        .pki
        .ca
        .issue_raw("nospiffe", &[], Validity::days(1))
        .unwrap();
    let tls = w.pki.tls_for(&issued, "nospiffe");
    assert!(ztna_node::Identity::load(&tls, Role::Agent)
        .unwrap_err()
        .to_string()
        .contains("no SPIFFE ID"));

    // Each client reads its refusal before the relay's handshake task has
    // counted it: the count follows within moments, not necessarily first.
    let unauthorized = || {
        metric(
            &w.im.daemon.metrics.common.render(),
            "ztna_intermediate_handshakes_total",
            &[("result", "unauthorized")],
        )
    };
    assert!(
        eventually(Duration::from_secs(5), || unauthorized() >= 3.0).await,
        "{}",
        w.im.daemon.metrics.common.render()
    );

    // Connector certificate claiming to be an agent in Hello.
    let tls = w.pki.issue("connector", "web-9");
    let (_ep, conn) = raw_connect(&tls, Role::Connector, w.im.addr).await.unwrap();
    let (_s, _r, reply) = hello(&conn, Role::Agent).await;
    assert!(
        matches!(&reply, ServerMsg::Refused { reason } if reason.contains("certificate says connector")),
        "{reply:?}"
    );
    assert!(closed_reason(&conn).await.unwrap().contains("unauthorized"));

    // An agent may not register services.
    let tls = w.pki.issue("agent", "alice2");
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (mut s, mut r, _) = hello(&conn, Role::Agent).await;
    write_frame(
        &mut s,
        &ClientMsg::Register {
            service: "web".into(),
            tcp: true,
            udp: false,
        },
    )
    .await
    .unwrap();
    let mut rejected = false;
    while let Ok(m) = r.expect::<ServerMsg>(Duration::from_secs(5)).await {
        if let ServerMsg::RegisterRejected { reason, .. } = m {
            assert!(reason.contains("agents cannot register"), "{reason}");
            rejected = true;
            break;
        }
    }
    assert!(rejected);
    assert!(closed_reason(&conn).await.unwrap().contains("unauthorized"));

    // A connector may not open flows.
    let tls = w.pki.issue("connector", "web-8");
    let (_ep, conn) = raw_connect(&tls, Role::Connector, w.im.addr).await.unwrap();
    let (_s, _r, _) = hello(&conn, Role::Connector).await;
    let (mut fs, _fr) = conn.open_bi().await.unwrap();
    write_frame(
        &mut fs,
        &FlowOpen {
            service: "web".into(),
            protocol: Protocol::Tcp,
            flow_id: 0,
        },
    )
    .await
    .unwrap();
    let why = closed_reason(&conn).await.unwrap();
    assert!(why.contains("connectors cannot open flows"), "{why}");

    // A connector the policy does not allow for the service gets a rejection with the reason.
    let tls = w.pki.issue("connector", "db-1");
    let (_ep, conn) = raw_connect(&tls, Role::Connector, w.im.addr).await.unwrap();
    let (mut s, mut r, _) = hello(&conn, Role::Connector).await;
    write_frame(
        &mut s,
        &ClientMsg::Register {
            service: "web".into(),
            tcp: true,
            udp: false,
        },
    )
    .await
    .unwrap();
    let reply = r.expect::<ServerMsg>(Duration::from_secs(5)).await.unwrap();
    assert!(
        matches!(&reply, ServerMsg::RegisterRejected { reason, .. } if reason.contains("does not allow")),
        "{reply:?}"
    );

    legit_still_works(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_unknown_version_close_only_that_connection() {
    let w = world().await;
    let tls = w.pki.issue("agent", "fuzzer");

    // Oversized frame announced on the control stream.
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (mut s, _r) = conn.open_bi().await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let why = closed_reason(&conn).await.expect("not closed");
    assert!(why.contains("protocol violation"), "{why}");

    // Garbage payload in a well-sized frame.
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (mut s, _r) = conn.open_bi().await.unwrap();
    s.write_all(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .await
        .unwrap();
    let why = closed_reason(&conn).await.expect("not closed");
    assert!(why.contains("protocol violation"), "{why}");

    // Unknown protocol version.
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (mut s, r) = conn.open_bi().await.unwrap();
    let mut r = FramedRecv::new(r);
    let msg = ClientMsg::Hello {
        version: 99,
        role: Role::Agent,
        software: "future".into(),
        watch: vec![],
    };
    write_frame(&mut s, &msg).await.unwrap();
    let reply = r.expect::<ServerMsg>(Duration::from_secs(5)).await.unwrap();
    assert!(
        matches!(&reply, ServerMsg::Refused { reason } if reason.contains("version 99")),
        "{reply:?}"
    );
    let why = closed_reason(&conn).await.expect("not closed");
    assert!(why.contains("unsupported protocol version"), "{why}");

    // Malformed flow header after a proper hello.
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (_cs, _cr, _) = hello(&conn, Role::Agent).await;
    let (mut s, _r) = conn.open_bi().await.unwrap();
    s.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
    let why = closed_reason(&conn).await.expect("not closed");
    assert!(why.contains("protocol violation"), "{why}");

    // Garbage datagrams for unknown flows are dropped and counted, the connection stays up.
    let (_ep, conn) = raw_connect(&tls, Role::Agent, w.im.addr).await.unwrap();
    let (_cs, _cr, _) = hello(&conn, Role::Agent).await;
    for i in 0..100u8 {
        let _ = conn.send_datagram(bytes::Bytes::from(vec![0x3f, i, i]));
    }
    let counted = eventually(Duration::from_secs(5), || {
        metric(
            &w.im.daemon.metrics.common.render(),
            "ztna_intermediate_datagrams_dropped_total",
            &[("reason", "unknown_flow")],
        ) >= 50.0
    })
    .await;
    assert!(counted, "garbage datagrams not counted");
    // Datagrams without a valid flow id (a varint that announces 8 bytes and has 1).
    for _ in 0..10 {
        let _ = conn.send_datagram(bytes::Bytes::from_static(&[0xff]));
    }
    let malformed = eventually(Duration::from_secs(5), || {
        metric(
            &w.im.daemon.metrics.common.render(),
            "ztna_intermediate_datagrams_dropped_total",
            &[("reason", "malformed")],
        ) >= 10.0
    })
    .await;
    assert!(
        malformed,
        "datagrams without a flow id not counted as malformed"
    );
    assert!(conn.close_reason().is_none());

    legit_still_works(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_local_udp_sender_cannot_inject_into_the_tunnel() {
    logs();
    let pki = Pki::new();
    let (echo, seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, echo).await;
    let client = UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            client.send(b"legit-0").await.unwrap();
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
            {
                return;
            }
        }
    })
    .await;
    assert!(opened.is_ok());
    // The backend saw the connector's backend-facing socket(s): aim the rogue at them.
    let targets: Vec<_> = seen.lock().unwrap().clone();
    assert!(!targets.is_empty());
    let rogue = UdpSocket::bind(loopback0()).await.unwrap();
    let flood = tokio::spawn(async move {
        for i in 0..2000u32 {
            for t in &targets {
                let _ = rogue.send_to(format!("INJECT-{i}").as_bytes(), t).await;
            }
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    // Legitimate traffic keeps working during the flood, and nothing injected reaches the agent.
    for i in 1..=200u32 {
        let msg = format!("legit-{i}");
        client.send(msg.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            !buf[..n].starts_with(b"INJECT"),
            "injected datagram reached the agent"
        );
        assert_eq!(&buf[..n], msg.as_bytes());
    }
    flood.await.unwrap();
    // Drain anything still in flight: none of it may be injected data.
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
    {
        assert!(
            !buf[..n].starts_with(b"INJECT"),
            "injected datagram reached the agent"
        );
    }
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// At `max_handshakes`, clients that proved their address (they answered our Retry) wait for a
/// slot in arrival order instead of being dropped: dropped, each would stall for its QUIC
/// retransmission timer (a second or more) and, in a reconnect storm, time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proven_clients_at_the_handshake_cap_wait_for_a_slot_instead_of_being_dropped() {
    logs();
    let pki = Pki::new();
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.handshake_retry_threshold = 0;
    cfg.max_handshakes = 2;
    let im = start_intermediate_with(cfg);
    let tls: Vec<_> = (0..8)
        .map(|i| pki.issue("agent", &format!("queued-{i}")))
        .collect();
    let t = std::time::Instant::now();
    let clients: Vec<_> = tls
        .into_iter()
        .map(|tls| {
            let addr = im.addr;
            tokio::spawn(async move { raw_connect(&tls, Role::Agent, addr).await })
        })
        .collect();
    let mut held = Vec::new();
    for c in clients {
        held.push(
            c.await
                .unwrap()
                .unwrap_or_else(|e| panic!("not connected after {:?}: {e}", t.elapsed())),
        );
    }
    eprintln!("8 clients connected in {:?}", t.elapsed());
    let text = im.daemon.metrics.common.render();
    let shed = |action| {
        metric(
            &text,
            "ztna_intermediate_handshakes_shed_total",
            &[("action", action)],
        )
    };
    assert!(shed("queued") >= 1.0, "{text}");
    assert_eq!(shed("dropped"), 0.0, "{text}");
    // The server counts a handshake once the client's Finished arrived.
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_handshakes_total",
            &[("result", "ok")]
        ) == 8.0)
        .await
    );
    drop(held);
    im.daemon.shutdown().await;
}

/// Under a handshake flood the relay answers unproven addresses with a QUIC Retry. A real client
/// still connects (it answers the Retry) and its flows work; the Retry is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_under_handshake_load_lets_real_clients_through() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    // Every unproven address gets a Retry, as in a flood.
    cfg.handshake_retry_threshold = 0;
    let im = start_intermediate_with(cfg);
    let (c, a) = web_chain(&pki, im.addr, echo).await;
    assert_eq!(
        tcp_roundtrip(a.port("web", Protocol::Tcp), b"after a retry")
            .await
            .unwrap(),
        b"after a retry"
    );
    let text = im.daemon.metrics.common.render();
    assert!(
        metric(
            &text,
            "ztna_intermediate_handshakes_shed_total",
            &[("action", "retry")]
        ) >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_handshakes_total",
            &[("result", "ok")]
        ),
        2.0
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An intermediate never starts, or takes a reload, with a certificate every peer would refuse:
/// expired, or issued by another deployment's CA. (It used to start, answer /readyz with 200
/// and pass a deploy's readiness gate while every peer refused it.) A refused reload keeps the
/// running certificate, and peers keep connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_refuses_to_start_or_reload_with_a_certificate_peers_would_refuse() {
    logs();
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let mut req = IssueRequest::new("intermediate", "stale");
    req.validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let expired = pki.tls_for(&pki.ca.issue(&req).unwrap(), "stale");
    let other = Pki::new();
    let mut foreign = other.issue("intermediate", "relay");
    foreign.ca = pki.ca_path.clone();
    for (what, tls, want) in [
        ("expired", expired.clone(), "expired on"),
        ("another CA's", foreign.clone(), "not issued by the CA"),
    ] {
        let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
        cfg.tls = tls;
        let why = match ztna_intermediate::Intermediate::bind(cfg) {
            Ok(_) => panic!("an intermediate started with {what} certificate"),
            Err(e) => e.to_string(),
        };
        println!("MEASURED start with {what} certificate: {why}");
        assert!(why.contains(want), "{why}");
    }
    let base = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    let (addr, handle, stop, task) = reloadable_intermediate(base.clone());
    for (what, tls) in [("expired", expired), ("another CA's", foreign)] {
        let mut cfg = base.clone();
        cfg.tls = tls;
        let why = handle
            .reload(cfg)
            .expect_err("reload took a bad certificate");
        println!("MEASURED reload with {what} certificate refused: {why}");
    }
    let (echo, _e) = tcp_echo().await;
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// Every certificate of the CA file is a trust anchor that can vouch for any identity of the
/// deployment: a daemon accepts a bundle of CAs of its trust domain (a CA rotation), and refuses
/// to load one holding another deployment's CA or a leaf.
#[test]
fn the_ca_file_may_hold_only_cas_of_the_trust_domain() {
    let pki = Pki::new();
    let tls = pki.issue("agent", "a");
    let own = std::fs::read_to_string(&pki.ca_path).unwrap();
    let with = |extra: &str| {
        let path = pki.dir.path().join("bundle.pem");
        std::fs::write(&path, format!("{own}{extra}")).unwrap();
        let mut t = tls.clone();
        t.ca = path;
        ztna_node::Identity::load(&t, Role::Agent)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let next = ztna_pki::Ca::generate("test.example", Validity::days(10)).unwrap();
    assert_eq!(with(next.cert_pem()), Ok(()), "two CAs of the trust domain");
    let other = ztna_pki::Ca::generate("other.example", Validity::days(10)).unwrap();
    let e = with(other.cert_pem()).unwrap_err();
    assert!(e.contains("trust domain other.example"), "{e}");
    let leaf = pki
        .ca
        .issue(&IssueRequest::new("agent", "b"))
        .unwrap()
        .cert_pem;
    let first = &leaf[..leaf.find("-----END CERTIFICATE-----").unwrap() + 25];
    let e = with(&format!("{first}\n")).unwrap_err();
    assert!(e.contains("not a CA certificate"), "{e}");
    println!("MEASURED a CA file with a leaf in it: {e}");
}

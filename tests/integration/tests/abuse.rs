//! Abuse resistance, in-process: revocation reaches established connections and flows, a broken
//! connector is routed around, and one agent identity cannot take more than its share.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztna_integration::*;
use ztna_node::CancellationToken;
use ztna_pki::{IssueRequest, Validity};
use ztna_proto::{Protocol, ServiceState};

const T: Duration = Duration::from_secs(10);

/// Opens a local connection through an agent and proves it carries bytes.
async fn held_flow(port: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    s
}

/// True when a held flow still carries a byte both ways (within `T`).
async fn echoes(s: &mut TcpStream, b: u8) -> bool {
    if s.write_all(&[b]).await.is_err() {
        return false;
    }
    let mut one = [0u8; 1];
    matches!(
        tokio::time::timeout(T, s.read_exact(&mut one)).await,
        Ok(Ok(_))
    ) && one[0] == b
}

fn renewals(im: &IntermediateHandle, result: &str) -> f64 {
    metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_renewals_total",
        &[("result", result)],
    )
}

/// Waits until a held flow is cut (reset or closed), returning how long that took.
async fn cut_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    // Keep poking: a cut shows as a read error, EOF, or a write error.
    let r = tokio::time::timeout(limit, async {
        loop {
            if s.write_all(b"x").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    r.ok().map(|_| t0.elapsed())
}

fn revocations(im: &IntermediateHandle, reason: &str) -> f64 {
    metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_revocations_total",
        &[("reason", reason)],
    )
}

/// A certificate of `role`/`name` valid until `secs` seconds from now, written as `file` (with the
/// other files of `pki`), and its notAfter.
fn short_lived(
    pki: &Pki,
    role: &str,
    name: &str,
    file: &str,
    secs: i64,
) -> (ztna_node::config::TlsConfig, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let not_after = now + time::Duration::seconds(secs);
    let issued = pki
        .ca
        .issue(&IssueRequest {
            validity: Validity {
                not_before: now - time::Duration::minutes(5),
                not_after,
            },
            ..IssueRequest::new(role, name)
        })
        .unwrap();
    (pki.tls_for(&issued, file), not_after)
}

/// New TCP flows through `port`, one every 20 ms, each a checked round trip, until `stop`:
/// (opened, failed).
fn flow_load(
    port: std::net::SocketAddr,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u32, u32)> {
    tokio::spawn(async move {
        let (mut attempts, mut failures) = (0u32, 0u32);
        while !stop.is_cancelled() {
            attempts += 1;
            let msg = attempts.to_be_bytes();
            match tokio::time::timeout(T, tcp_roundtrip(port, &msg)).await {
                Ok(Ok(got)) if got == msg => {}
                _ => failures += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (attempts, failures)
    })
}

/// An agent whose certificate expires while connected is disconnected at notAfter (with the
/// reason, counted), its open flow ends, and it cannot come back with that certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_during_a_connection_is_cut_at_not_after() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let (tls, not_after) = short_lived(&pki, "agent", "shortlived", "agent-shortlived", 4);
    let mut a = start_agent_with(tls, &[im.addr], &[("web", ForwardProtocol::Tcp)], "").await;
    a.wait_status("web", ServiceState::Available).await;
    let mut held = held_flow(a.port("web", Protocol::Tcp)).await;
    let cut = cut_within(&mut held, Duration::from_secs(10))
        .await
        .expect("the flow outlived the certificate");
    let late = time::OffsetDateTime::now_utc() - not_after;
    println!(
        "MEASURED connection of an expiring certificate cut {:.2} s after notAfter (flow cut after {cut:?})",
        late.as_seconds_f64()
    );
    assert!(late.as_seconds_f64() < 2.0, "cut {late} after notAfter");
    assert_eq!(revocations(&im, "certificate_expired"), 1.0);
    // It cannot come back: new handshakes refuse the expired certificate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agents_on(&im), 0.0, "the expired agent reconnected");
    let took = refused_locally(a.port("web", Protocol::Tcp)).await;
    assert!(took < T);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

fn connectors_on(im: &IntermediateHandle) -> f64 {
    metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_connections",
        &[("role", "connector")],
    )
}

/// Reissues `role`/`name`'s certificate (valid for the default span), writes it over `file`, and
/// reloads the daemon with `reload`.
fn reissue(pki: &Pki, role: &str, name: &str, file: &str, reload: impl FnOnce()) {
    let renewed = pki.ca.issue(&IssueRequest::new(role, name)).unwrap();
    pki.tls_for(&renewed, file);
    reload();
}

/// Reloads (`reload(n)`, with the n-th re-issued certificate) until the intermediate has
/// accepted four renewals (its budget), then once more, and waits for that fifth one to be
/// refused.
async fn renew_past_the_budget(im: &IntermediateHandle, mut reload: impl FnMut(u32)) {
    let start = renewals(im, "accepted") as u32;
    for n in start + 1..=4 {
        reload(n);
        let renewed = eventually(Duration::from_secs(5), || {
            renewals(im, "accepted") == f64::from(n)
        })
        .await;
        assert!(renewed, "renewal {n} not accepted");
    }
    reload(5);
    let refused = eventually(Duration::from_secs(5), || renewals(im, "refused") == 1.0).await;
    assert!(refused, "the fifth renewal within a minute was not refused");
}

/// A connector's certificate re-issued and reloaded (SIGHUP) before the old one expires: its
/// connection is renewed in place (the intermediate checks the new certificate and lets the
/// connection run until the new notAfter). No second connection, no re-registration; a flow
/// that was running and flows opened all along outlive the old notAfter. Rotations beyond the
/// intermediate's renewal budget (four at once) are refused, and the connector then moves make
/// before break: a new connection registers before the old one deregisters, and the old one
/// closes once no flow uses it; no flow fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_reloaded_with_a_new_certificate_is_renewed_in_place_or_moves_before_the_old_one_expires(
) {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    // Long enough for start-up, the reload and the checks below on a loaded machine.
    let (tls, not_after) = short_lived(&pki, "connector", "web-1", "connector-web-1", 15);
    let mut c = start_connector_with(tls, &[im.addr], &[("web", Some(echo), None)], "");
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut before = held_flow(port).await;
    // New flows all along, from before the reload to after the old notAfter: none may fail.
    let load_stop = CancellationToken::new();
    let load = flow_load(port, load_stop.clone());

    // Renewed in place, as an automated renewal would, and reloaded.
    reissue(&pki, "connector", "web-1", "connector-web-1", || {
        c.handle.reload(c.config.clone()).expect("reload");
    });
    let renewed = eventually(Duration::from_secs(5), || renewals(&im, "accepted") == 1.0).await;
    assert!(renewed, "the connection was not renewed in place");
    assert_eq!(connectors_on(&im), 1.0, "a second connection for a renewal");
    assert!(
        echoes(&mut before, b'2').await,
        "the flow broke at the reload"
    );

    // Past the old notAfter: nothing is cut.
    let wait = not_after - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::from_secs_f64(wait.as_seconds_f64().max(0.0))).await;
    let mut kept = 0;
    for i in 0..3u8 {
        kept += u32::from(echoes(&mut before, b'a' + i).await);
    }
    println!(
        "MEASURED connector rotation: flow from before the reload echoed {kept}/3 after the old notAfter; renewals accepted {}, connections {}",
        renewals(&im, "accepted"),
        connectors_on(&im)
    );
    assert_eq!(
        kept, 3,
        "the flow was cut at the old certificate's notAfter"
    );
    assert_eq!(revocations(&im, "certificate_expired"), 0.0);
    assert_eq!(connectors_on(&im), 1.0);
    assert_eq!(
        registered_on(&c.registered.borrow()),
        1,
        "the renewal touched the registration"
    );

    // Three more renewals use up the intermediate's budget of four; the next is refused, and
    // the connector moves to a new connection made with the new certificate.
    let t0 = Instant::now();
    renew_past_the_budget(&im, |_| {
        reissue(&pki, "connector", "web-1", "connector-web-1", || {
            c.handle.reload(c.config.clone()).expect("reload");
        })
    })
    .await;
    let both = eventually(Duration::from_secs(5), || connectors_on(&im) == 2.0).await;
    assert!(
        both,
        "no second connection after the refusal: {}",
        connectors_on(&im)
    );
    let one_serving = eventually(Duration::from_secs(5), || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")],
        ) == 1.0
    })
    .await;
    assert!(one_serving, "the old connection did not deregister");
    assert_eq!(registered_on(&c.registered.borrow()), 1);
    // The flow from before stays on the old connection; once it ends, the connection closes.
    assert!(
        echoes(&mut before, b'z').await,
        "the flow broke at the move"
    );
    drop(before);
    let back_to_one = eventually(Duration::from_secs(10), || connectors_on(&im) == 1.0).await;
    println!(
        "MEASURED refused renewal: moved to a new connection, the old one closed {:?} after the reloads past the budget began",
        t0.elapsed()
    );
    assert!(
        back_to_one,
        "the old connection stayed: {}",
        connectors_on(&im)
    );
    load_stop.cancel();
    let (attempts, failures) = load.await.unwrap();
    println!("MEASURED new flows across five rotations and the old notAfter: {attempts} opened, {failures} failed");
    assert_eq!(failures, 0, "flows failed during the rotations");
    assert!(attempts > 50, "only {attempts} flows");
    assert_eq!(tcp_roundtrip(port, b"new").await.unwrap(), b"new");
    let reconnects = metric(
        &c.daemon.metrics.common.render(),
        "ztna_connector_reconnects_total",
        &[],
    );
    assert_eq!(reconnects, 0.0, "a rotation is not a reconnect");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// After a rotation that did not take: the connector shows `web` registered, the intermediate
/// has one connection serving it, and flows work.
async fn the_old_connection_still_serves(
    im: &IntermediateHandle,
    c: &ConnectorHandle,
    port: std::net::SocketAddr,
) {
    let regs = c.registered.borrow().clone();
    assert_eq!(
        regs[0].get("web"),
        Some(&ztna_connector::Registration::Registered),
        "{regs:?}"
    );
    assert_eq!(
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")],
        ),
        1.0
    );
    for i in 0..5u8 {
        assert_eq!(tcp_roundtrip(port, &[i]).await.unwrap(), vec![i]);
    }
}

/// With one connection per identity allowed, a rotation is renewed in place (no second
/// connection needed). Once renewals are refused (the budget), the move to a new connection is
/// refused too (the limit): that leaves the old connection serving; the connector stays
/// registered, flows keep working, and it keeps trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rotation_leaves_the_old_connection_serving() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.max_connections_per_identity = 1;
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    // Renewed in place while the intermediate's budget lasts (four): the limit is no obstacle.
    // The fifth is refused: the connector tries a new connection, which the limit refuses.
    renew_past_the_budget(&im, |_| {
        reissue(&pki, "connector", "web-1", "connector-web-1", || {
            c.handle.reload(c.config.clone()).expect("reload");
        })
    })
    .await;
    let refused = eventually(Duration::from_secs(5), || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_limit_rejections_total",
            &[("limit", "connections_per_identity")],
        ) >= 1.0
    })
    .await;
    assert!(refused, "the intermediate never refused the new connection");
    // Past the first retry: still registered on the old connection, flows work.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connectors_on(&im), 1.0);
    the_old_connection_still_serves(&im, &c, port).await;
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A reload with a certificate whose identity the policy does not let serve: the new
/// connection's registrations are rejected, so it does not take over; the old connection keeps
/// the service registered and flows working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_to_an_identity_the_policy_refuses_leaves_the_old_connection_serving() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let policy = vec![PolicyRule {
        service: "web".into(),
        connectors: vec![Pki::id("connector", "web-1")],
        agents: vec![format!("spiffe://{TD}/agent/*")],
    }];
    let im = start_intermediate(&pki, policy);
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    // The wrong certificate in the connector's files (say, another host's).
    let other = pki
        .ca
        .issue(&IssueRequest::new("connector", "web-2"))
        .unwrap();
    pki.tls_for(&other, "connector-web-1");
    let handshakes = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_handshakes_total",
            &[("result", "ok")],
        )
    };
    let before = handshakes();
    c.handle.reload(c.config.clone()).expect("reload");
    // The new connection comes up (a handshake), is refused the service, and goes away again
    // (too quickly to be seen in the connections gauge).
    let tried = eventually(Duration::from_secs(5), || handshakes() > before).await;
    assert!(tried, "the new connection never came up");
    tokio::time::sleep(Duration::from_secs(2)).await;
    the_old_connection_still_serves(&im, &c, port).await;
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// The same for an agent: after a reload with a renewed certificate, its connection is renewed
/// in place, and a TCP and a UDP flow that were running outlive the old notAfter. Once its
/// renewals are refused (the intermediate's budget), it moves make before break: new flows and
/// the UDP flow use a connection made with the new certificate, the TCP flow stays on the old
/// connection, which closes once nothing uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reloaded_with_a_new_certificate_is_renewed_in_place_or_moves_before_the_old_one_expires(
) {
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
    // Long enough for start-up, the reload and the checks below on a loaded machine.
    let (tls, not_after) = short_lived(&pki, "agent", "alice", "agent-alice", 15);
    let forwards = [("web", ForwardProtocol::Tcp), ("web", ForwardProtocol::Udp)];
    let mut a = start_agent_with(tls, &[im.addr], &forwards, "").await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut before = held_flow(port).await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(a.port("web", Protocol::Udp)).await.unwrap();
    assert!(udp_round_trip(&udp, b"u0").await.is_some());

    let reload = |a: &AgentHandle| {
        reissue(&pki, "agent", "alice", "agent-alice", || {
            a.handle.reload(a.config.clone()).expect("reload");
        })
    };
    reload(&a);
    let renewed = eventually(Duration::from_secs(5), || renewals(&im, "accepted") == 1.0).await;
    assert!(renewed, "the connection was not renewed in place");
    assert_eq!(agents_on(&im), 1.0, "a second connection for a renewal");

    let wait = not_after - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::from_secs_f64(wait.as_seconds_f64().max(0.0))).await;
    let mut kept = 0;
    for i in 0..3u8 {
        kept += u32::from(echoes(&mut before, b'a' + i).await);
    }
    let mut answered = 0;
    for i in 0..5u8 {
        if udp_round_trip(&udp, &[b'v', i]).await.is_some() {
            answered += 1;
        }
    }
    println!("MEASURED agent rotation: after the old notAfter, TCP flow from before the reload echoed {kept}/3, UDP flow answered {answered}/5");
    assert_eq!(
        kept, 3,
        "the TCP flow was cut at the old certificate's notAfter"
    );
    assert_eq!(
        answered, 5,
        "the UDP flow was cut at the old certificate's notAfter"
    );
    assert_eq!(revocations(&im, "certificate_expired"), 0.0);
    assert_eq!(agents_on(&im), 1.0);

    // Renewals beyond the budget are refused: the agent moves to a new connection.
    renew_past_the_budget(&im, |_| reload(&a)).await;
    let both = eventually(Duration::from_secs(5), || agents_on(&im) == 2.0).await;
    assert!(
        both,
        "no second connection after the refusal: {}",
        agents_on(&im)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut after = held_flow(port).await;
    assert!(udp_round_trip(&udp, b"u1").await.is_some());
    assert!(
        echoes(&mut before, b'z').await,
        "the TCP flow broke at the move"
    );
    drop(before);
    // The UDP flow moved: the old connection, now without flows, closes.
    let back_to_one = eventually(Duration::from_secs(10), || agents_on(&im) == 1.0).await;
    assert!(back_to_one, "the old connection stayed: {}", agents_on(&im));
    assert!(udp_round_trip(&udp, b"w").await.is_some());
    assert!(echoes(&mut after, b'y').await);
    let udp_drops = metric(
        &a.daemon.metrics.common.render(),
        "ztna_agent_udp_dropped_total",
        &[],
    );
    println!("MEASURED agent moved after a refused renewal; agent UDP drops {udp_drops}");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A CA rotation with the deployment running, in three reloads of every daemon: trust both CAs,
/// move every certificate to the new CA (connectors' and agents' connections are renewed in
/// place), then trust only the new CA. New flows all along: none fails, a flow held from before
/// the rotation survives it, and no peer is disconnected when the old CA goes; a certificate of
/// the old CA is refused afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_in_three_reloads_fails_no_flow() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    let im = ztna_intermediate::Intermediate::bind(base.clone()).unwrap();
    let (addr, im_handle, metrics) = (im.local_addr().unwrap(), im.handle(), im.metrics());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn(im.run(stop.clone()));
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut held = held_flow(port).await;
    let load_stop = CancellationToken::new();
    let load = flow_load(port, load_stop.clone());
    let reload_all = |what: &str| {
        let im_summary = im_handle.reload(base.clone()).expect("intermediate reload");
        c.handle.reload(c.config.clone()).expect("connector reload");
        a.handle.reload(a.config.clone()).expect("agent reload");
        println!("{what}: intermediate: {im_summary}");
        im_summary
    };
    let old_pem = std::fs::read_to_string(&pki.ca_path).unwrap();
    let new_ca = ztna_pki::Ca::generate(TD, Validity::days(30)).unwrap();

    // 1. Trust both: the CA file every daemon names becomes a bundle.
    std::fs::write(&pki.ca_path, format!("{old_pem}{}", new_ca.cert_pem())).unwrap();
    let s1 = reload_all("both CAs");
    assert!(s1.contains("0 peers disconnected"), "{s1}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Every certificate re-issued by the new CA, in place; the intermediate first.
    let handshakes = || {
        metric(
            &metrics.common.render(),
            "ztna_intermediate_handshakes_total",
            &[("result", "ok")],
        )
    };
    let before = handshakes();
    for (role, name) in [
        ("intermediate", "relay"),
        ("connector", "web-1"),
        ("agent", "alice"),
    ] {
        let issued = new_ca.issue(&IssueRequest::new(role, name)).unwrap();
        pki.tls_for(&issued, &format!("{role}-{name}"));
    }
    let s2 = reload_all("new certificates");
    assert!(s2.contains("0 peers disconnected"), "{s2}");
    // The connector's and the agent's connections are renewed to their new certificates in
    // place: no new connection.
    let moved = eventually(Duration::from_secs(10), || {
        let text = metrics.common.render();
        let on = |role| metric(&text, "ztna_intermediate_connections", &[("role", role)]);
        let renewed = metric(
            &text,
            "ztna_intermediate_renewals_total",
            &[("result", "accepted")],
        );
        renewed == 2.0 && on("connector") == 1.0 && on("agent") == 1.0
    })
    .await;
    assert!(moved, "the connections were not renewed in place");
    assert_eq!(handshakes(), before, "a new connection for a renewal");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. Trust only the new CA: nobody is left on the old one.
    std::fs::write(&pki.ca_path, new_ca.cert_pem()).unwrap();
    let s3 = reload_all("new CA only");
    assert!(s3.contains("0 peers disconnected"), "{s3}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    load_stop.cancel();
    let (attempts, failures) = load.await.unwrap();
    let revoked = metric(
        &metrics.common.render(),
        "ztna_intermediate_revocations_total",
        &[],
    );
    let kept = echoes(&mut held, b'h').await;
    println!("MEASURED CA rotation in three reloads: {attempts} new flows, {failures} failed; peers revoked {revoked}; flow held from before alive: {kept}");
    assert!(kept, "the flow held from before the rotation was cut");
    assert_eq!(failures, 0, "flows failed during the CA rotation");
    assert!(attempts > 50, "only {attempts} flows");
    assert_eq!(revoked, 0.0);
    assert_eq!(registered_on(&c.registered.borrow()), 1);
    // A certificate of the old CA is refused now.
    let stale = pki.issue("agent", "mallory");
    let why = refused(&stale, ztna_proto::Role::Agent, addr).await;
    assert!(
        why.as_deref().is_some_and(|w| w.contains("deployment CA")),
        "an old-CA agent was not refused: {why:?}"
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A reload that removes an agent from the policy ends that agent's open flow (REVOKED) while
/// another agent's flow carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_ends_the_open_flows_it_no_longer_allows() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let rule = |agents: &[&str]| PolicyRule {
        service: "web".into(),
        connectors: vec![format!("spiffe://{TD}/connector/*")],
        agents: agents.iter().map(|a| Pki::id("agent", a)).collect(),
    };
    let base = intermediate_config(&pki, loopback0(), vec![rule(&["alice", "bob"])]);
    let im = ztna_intermediate::Intermediate::bind(base.clone()).unwrap();
    let (addr, handle, metrics) = (im.local_addr().unwrap(), im.handle(), im.metrics());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn(im.run(stop.clone()));
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut alice = start_agent(&pki, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    let mut bob = start_agent(&pki, "bob", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    alice.wait_status("web", ServiceState::Available).await;
    bob.wait_status("web", ServiceState::Available).await;
    let mut a_flow = held_flow(alice.port("web", Protocol::Tcp)).await;
    let mut b_flow = held_flow(bob.port("web", Protocol::Tcp)).await;
    let mut cfg = base.clone();
    cfg.policy = vec![rule(&["bob"])];
    let summary = handle.reload(cfg).expect("reload");
    assert!(summary.contains("1 flows ended"), "{summary}");
    // Same CA: every peer's chain (read back from its TLS session) still verifies.
    assert!(summary.contains(" 0 peers disconnected"), "{summary}");
    let cut = cut_within(&mut a_flow, Duration::from_secs(5)).await;
    assert!(cut.is_some(), "alice's flow outlived her policy");
    println!("MEASURED flow no longer allowed by a reload cut after {cut:?}");
    b_flow.write_all(b"2").await.unwrap();
    let mut one = [0u8; 1];
    b_flow.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2", "bob's flow was disturbed");
    alice.wait_status("web", ServiceState::Denied).await;
    assert_eq!(
        metric(
            &metrics.common.render(),
            "ztna_intermediate_revocations_total",
            &[("reason", "policy_flow")]
        ),
        1.0
    );
    alice.daemon.shutdown().await;
    bob.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A flow whose open is still under way at the connector (its backend's name takes 1.5 s to
/// resolve) when a reload revokes the agent's access is refused, not accepted after the reload
/// under the old policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_still_opening_when_a_reload_revokes_it_is_refused() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(&pki, loopback0(), vec![reach("web", &["alice"])]);
    let (addr, handle, stop, task) = reloadable_intermediate(base.clone());
    let slow = ztna_connector::Resolver::with_lookup(|_, port| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
        })
    })
    .with_ttl(Duration::ZERO, Duration::ZERO);
    let backend = format!("slow.test:{}", echo.port());
    let mut c = start_connector_resolving(
        &pki,
        "web-1",
        &[addr],
        &[("web", Some(backend.as_str()), None)],
        slow,
    );
    c.wait_registered(1).await;
    let mut alice = start_agent(&pki, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    alice.wait_status("web", ServiceState::Available).await;
    let port = alice.port("web", Protocol::Tcp);
    let t0 = Instant::now();
    let opening = tokio::spawn(async move { tcp_roundtrip(port, b"late").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cfg = base.clone();
    cfg.policy = vec![reach("web", &["bob"])];
    handle.reload(cfg).expect("reload");
    let r = opening.await.unwrap();
    println!(
        "MEASURED flow opening across a revoking reload: {:?} after {:?}",
        r.as_ref().map(|b| String::from_utf8_lossy(b).to_string()),
        t0.elapsed()
    );
    assert!(
        r.is_err(),
        "the flow was accepted after the reload revoked it"
    );
    alice.daemon.shutdown().await;
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A reload to a new CA disconnects the peers authenticated under the old one (they are told
/// why), while peers with certificates from the new CA connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ca_on_reload_disconnects_peers_of_the_old_ca() {
    logs();
    let old = Pki::new();
    let new = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(&old, loopback0(), open_policy(&["web"]));
    let im = ztna_intermediate::Intermediate::bind(base.clone()).unwrap();
    let (addr, handle, metrics) = (im.local_addr().unwrap(), im.handle(), im.metrics());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn(im.run(stop.clone()));
    let mut c = start_connector(&old, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&old, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let mut held = held_flow(a.port("web", Protocol::Tcp)).await;
    // The relay moves to the new CA (new certificate and trust anchor).
    let mut cfg = base.clone();
    cfg.tls = new.issue("intermediate", "relay");
    let summary = handle.reload(cfg).expect("reload");
    println!("reload: {summary}");
    assert!(summary.contains("2 peers disconnected"), "{summary}");
    assert!(
        cut_within(&mut held, Duration::from_secs(5))
            .await
            .is_some(),
        "a flow of the old CA outlived the reload"
    );
    let text = metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_revocations_total",
            &[("reason", "ca_changed")]
        ),
        2.0
    );
    assert!(
        eventually(T, || metric(
            &metrics.common.render(),
            "ztna_intermediate_connections",
            &[]
        ) == 0.0)
        .await,
        "old-CA peers still connected"
    );
    // Peers of the new CA are welcome.
    let (echo2, _e2) = tcp_echo().await;
    let mut c2 = start_connector(&new, "web-2", &[addr], &[("web", Some(echo2), None)]);
    c2.wait_registered(1).await;
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    c2.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// Two connectors serve web; one's backend is dead, so it refuses every flow (and, having no
/// flows, is always the least loaded). Flows are retried on the healthy one and the broken one
/// is demoted: users see no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_with_a_dead_backend_is_routed_around() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut broken = start_connector(&pki, "web-broken", &[im.addr], &[("web", Some(dead), None)]);
    let mut good = start_connector(&pki, "web-good", &[im.addr], &[("web", Some(echo), None)]);
    broken.wait_registered(1).await;
    good.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut ok = 0;
    let t0 = Instant::now();
    for i in 0..50 {
        let msg = format!("request {i}");
        if tcp_roundtrip(port, msg.as_bytes()).await.ok().as_deref() == Some(msg.as_bytes()) {
            ok += 1;
        }
    }
    let refused_by_broken = metric(
        &broken.daemon.metrics.common.render(),
        "ztna_connector_backend_errors_total",
        &[],
    );
    println!(
        "MEASURED 50 requests with one of two connectors' backend dead: {ok}/50 ok in {:?}; the broken connector was tried {refused_by_broken} times",
        t0.elapsed()
    );
    assert!(ok >= 49, "{ok}/50");
    assert!(
        refused_by_broken < 10.0,
        "the broken connector was not demoted ({refused_by_broken} attempts)"
    );
    a.daemon.shutdown().await;
    broken.daemon.shutdown().await;
    good.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// The session authorizes the connection (certificate expiry, CA reloads and the per-identity
/// connection limit all watch sessions): a peer that ends its session from its side, by
/// resetting its control stream, loses the connection and the flows on it, instead of keeping
/// them unwatched while it opens more connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_resets_its_control_stream_loses_the_connection_and_its_flows() {
    use ztna_integration::hostile::{self, open_flow, tcp_open, Creds, FlowOutcome};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let creds = Creds {
        tls: pki.issue("agent", "alice"),
        role: ztna_proto::Role::Agent,
    };
    let ep = hostile::client_endpoint(im.addr).unwrap();
    let mut session = hostile::session(
        &ep,
        &creds.client_config().unwrap(),
        im.addr,
        ztna_proto::Role::Agent,
        vec!["web".into()],
        T,
    )
    .await
    .expect("session");
    let (mut send, recv) = match open_flow(&session.conn, &tcp_open("web"), false, T).await {
        FlowOutcome::Accepted(s, r) => (s, r),
        other => panic!("flow: {}", other.label()),
    };
    let (mut recv, _) = recv.into_parts();
    send.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    recv.read_exact(&mut got).await.unwrap();
    let agents = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_connections",
            &[("role", "agent")],
        )
    };
    assert_eq!(agents(), 1.0);
    let t0 = Instant::now();
    session
        .control_send
        .reset(quinn::VarInt::from_u32(0))
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(3), session.conn.closed())
        .await
        .expect("the connection outlived its session");
    println!(
        "MEASURED control stream reset: connection closed after {:?}: {why}",
        t0.elapsed()
    );
    assert!(why.to_string().contains("session ended"), "{why}");
    let mut buf = [0u8; 16];
    assert!(
        !matches!(recv.read(&mut buf).await, Ok(Some(_))),
        "the flow carried on"
    );
    // The session's cleanup follows the close within moments.
    assert!(
        eventually(Duration::from_secs(2), || agents() == 0.0).await,
        "the agent gauge stayed at {}",
        agents()
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A connector cannot grow the intermediate's registry or its metrics without bound: offers the
/// policy denies add no `service_connectors` series, and one connection may offer at most 256
/// services; beyond that each registration is refused with the reason. Its permitted service
/// stays registered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_cannot_grow_the_registry_or_the_metrics_without_bound() {
    use ztna_integration::hostile::{self, Creds};
    use ztna_node::io::write_frame;
    use ztna_proto::{ClientMsg, ServerMsg};
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let creds = Creds {
        tls: pki.issue("connector", "greedy"),
        role: ztna_proto::Role::Connector,
    };
    let ep = hostile::client_endpoint(im.addr).unwrap();
    let mut s = hostile::session(
        &ep,
        &creds.client_config().unwrap(),
        im.addr,
        ztna_proto::Role::Connector,
        vec![],
        T,
    )
    .await
    .expect("session");
    let register = |service: String| ClientMsg::Register {
        service,
        tcp: true,
        udp: false,
    };
    write_frame(&mut s.control_send, &register("web".into()))
        .await
        .unwrap();
    let (mut denied, mut capped) = (0, 0);
    let mut last_capped = String::new();
    for i in 0..300 {
        write_frame(&mut s.control_send, &register(format!("junk-{i}")))
            .await
            .unwrap();
    }
    let mut registered = false;
    while denied + capped < 300 {
        match s.control_recv.expect::<ServerMsg>(T).await.expect("answer") {
            ServerMsg::Registered { service } if service == "web" => registered = true,
            ServerMsg::RegisterRejected { reason, .. } if reason.contains("at most") => {
                capped += 1;
                last_capped = reason;
            }
            ServerMsg::RegisterRejected { .. } => denied += 1,
            _ => {}
        }
    }
    println!("MEASURED 300 unpermitted offers: {denied} denied by policy, {capped} over the cap ({last_capped})");
    assert!(registered, "web was not registered");
    assert_eq!((denied, capped), (255, 45), "web takes one of the 256");
    let text = im.daemon.metrics.common.render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("ztna_intermediate_service_connectors{"))
        .count();
    assert_eq!(series, 1, "{text}");
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_service_connectors",
            &[("service", "web")]
        ),
        1.0
    );
    assert!(s.conn.close_reason().is_none(), "the connector was dropped");
    im.daemon.shutdown().await;
}

/// A peer whose handshake completed under the old CA but whose Hello comes after a reload to a
/// new CA is not admitted on the strength of that handshake: it is disconnected like the peers
/// the reload found connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_between_its_handshake_and_hello_during_a_ca_reload_is_disconnected() {
    use ztna_integration::hostile::{self, Creds};
    logs();
    let (old, new) = (Pki::new(), Pki::new());
    let base = intermediate_config(&old, loopback0(), open_policy(&["web"]));
    let (addr, handle, stop, task) = reloadable_intermediate(base.clone());
    let creds = Creds {
        tls: old.issue("agent", "alice"),
        role: ztna_proto::Role::Agent,
    };
    let ep = hostile::client_endpoint(addr).unwrap();
    let conn = ep
        .connect_with(creds.client_config().unwrap(), addr, "ztna-intermediate")
        .unwrap()
        .await
        .expect("handshake under the old CA");
    let mut cfg = base.clone();
    cfg.tls = new.issue("intermediate", "relay");
    handle.reload(cfg).expect("reload");
    let hello =
        ztna_node::client::hello(&conn, ztna_proto::Role::Agent, "test".into(), vec![], T).await;
    let why = tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .expect("admitted after the reload on its old-CA handshake");
    println!(
        "MEASURED Hello after the CA reload: hello {:?}; closed: {why}",
        hello.as_ref().map(|_| "welcomed")
    );
    assert!(
        why.to_string().contains("certificate no longer accepted"),
        "{why}"
    );
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A connector already at `max_flows_per_connector` here is not asked to open a flow it would
/// then have to give up: its backend sees no connection for it, and the flow is refused as a
/// limit, counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_at_its_flow_limit_here_is_not_asked_to_open_more() {
    use std::sync::atomic::Ordering;
    logs();
    let pki = Pki::new();
    let (backend, accepted) = counting_echo().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.max_flows_per_connector = 1;
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(backend), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let held = held_flow(port).await;
    assert!(
        tcp_roundtrip(port, b"more").await.is_err(),
        "a second flow through a connector at its limit"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let limited = metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_limit_rejections_total",
        &[("limit", "flows_per_connector")],
    );
    let at_backend = accepted.load(Ordering::SeqCst);
    println!("MEASURED flow beyond max_flows_per_connector: backend connections {at_backend} (1 held), counted {limited}");
    assert_eq!(
        at_backend, 1,
        "the connector opened a backend connection for a flow it could not keep"
    );
    assert_eq!(limited, 1.0);
    drop(held);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// The per-identity connection limit counts connections from their handshake, not from Hello:
/// connections that never say Hello cannot pile up past it (each could buffer a connection
/// window of unaccepted streams while the intermediate waits for its Hello).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_count_against_the_identity_limit() {
    use ztna_integration::hostile::{self, Creds};
    logs();
    let pki = Pki::new();
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.max_connections_per_identity = 2;
    let im = start_intermediate_with(cfg);
    let creds = Creds {
        tls: pki.issue("agent", "mallory"),
        role: ztna_proto::Role::Agent,
    };
    let client = creds.client_config().unwrap();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let ep = hostile::client_endpoint(im.addr).unwrap();
        let conn = ep
            .connect_with(client.clone(), im.addr, "ztna-intermediate")
            .unwrap()
            .await
            .expect("handshake");
        conns.push((ep, conn));
    }
    let third = &conns[2].1;
    let why = tokio::time::timeout(Duration::from_secs(3), third.closed())
        .await
        .expect("a third Hello-less connection of the identity stayed open");
    println!("MEASURED third connection without Hello: {why}");
    assert!(
        why.to_string().contains("already holds 2 connections"),
        "{why}"
    );
    assert!(conns[0].1.close_reason().is_none() && conns[1].1.close_reason().is_none());
    im.daemon.shutdown().await;
}

/// `ztna_intermediate_service_connectors` follows a policy reload: a service taken out of the
/// policy loses its series (it stayed at 0 until a restart, firing ZtnaServiceUnavailable for a
/// service nobody offers any more), and one added shows at 0 until a connector serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_connectors_series_follow_a_policy_reload() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let base = intermediate_config(&pki, loopback0(), open_policy(&["web", "old"]));
    let im = ztna_intermediate::Intermediate::bind(base.clone()).unwrap();
    let (addr, handle, metrics) = (im.local_addr().unwrap(), im.handle(), im.metrics());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = im.run(stop).await;
        }
    });
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let series = || {
        let text = metrics.common.render();
        let mut shown: Vec<(String, f64)> = ["web", "old", "new"]
            .iter()
            .filter(|s| {
                text.contains(&format!(
                    "ztna_intermediate_service_connectors{{service=\"{s}\"}}"
                ))
            })
            .map(|s| {
                let n = metric(
                    &text,
                    "ztna_intermediate_service_connectors",
                    &[("service", s)],
                );
                (s.to_string(), n)
            })
            .collect();
        shown.sort_by(|a, b| a.0.cmp(&b.0));
        shown
    };
    let before = series();
    let mut cfg = base.clone();
    cfg.policy = open_policy(&["web", "new"]);
    handle.reload(cfg).expect("reload");
    let after = series();
    println!("MEASURED service_connectors series before the reload {before:?}, after {after:?}");
    assert_eq!(before, vec![("old".into(), 0.0), ("web".into(), 1.0)]);
    assert_eq!(after, vec![("new".into(), 0.0), ("web".into(), 1.0)]);
    c.daemon.shutdown().await;
    stop.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// Opens the control stream of a crafted client and says Hello as an agent; the intermediate's
/// revision.
async fn crafted_hello(
    conn: &quinn::Connection,
) -> (quinn::SendStream, ztna_node::io::FramedRecv, u16) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = ztna_node::io::FramedRecv::new(recv);
    let hello = ztna_proto::ClientMsg::Hello {
        version: ztna_proto::PROTOCOL_VERSION,
        role: ztna_proto::Role::Agent,
        software: "crafted".into(),
        watch: vec![],
    };
    ztna_node::io::write_frame(&mut send, &hello).await.unwrap();
    match recv.expect::<ztna_proto::ServerMsg>(T).await.unwrap() {
        ztna_proto::ServerMsg::Welcome { version, .. } => (send, recv, version),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// Sends a renewal and returns the intermediate's answer: Ok(not_after_unix) or Err(reason).
async fn renew_on(
    send: &mut quinn::SendStream,
    recv: &mut ztna_node::io::FramedRecv,
    msg: &ztna_proto::ClientMsg,
) -> Result<u64, String> {
    ztna_node::io::write_frame(send, msg).await.unwrap();
    loop {
        match recv.expect::<ztna_proto::ServerMsg>(T).await.unwrap() {
            ztna_proto::ServerMsg::Renewed { not_after_unix } => return Ok(not_after_unix),
            ztna_proto::ServerMsg::RenewRefused { reason } => return Err(reason),
            _ => continue,
        }
    }
}

/// A renewal is what lets a connection outlive its certificate, so only the connection's own
/// peer may make one, for its own identity, with a certificate of the deployment's CA. A crafted
/// client with a valid agent certificate (expiring in 6 s) tries: another agent's certificate, a
/// renewal signed for its other connection (replayed), a certificate of another CA, the new
/// certificate signed with the old key (a stolen old key), a connector certificate, garbage,
/// and too many renewals. Each is refused with the reason and counted; its
/// connection ends at the old notAfter all the same. Its one proper renewal is accepted, with the
/// new notAfter, and that connection outlives the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_renewal_proven_on_the_connection_for_the_same_identity_extends_it() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (tls, not_after) = short_lived(&pki, "agent", "mallory", "agent-mallory-old", 6);
    let (_ep1, conn1) = raw_connect(&tls, ztna_proto::Role::Agent, im.addr)
        .await
        .unwrap();
    let (_ep2, conn2) = raw_connect(&tls, ztna_proto::Role::Agent, im.addr)
        .await
        .unwrap();
    let (mut s1, mut r1, revision) = crafted_hello(&conn1).await;
    assert!(revision >= 3, "intermediate revision {revision}");
    let (mut s2, mut r2, _) = crafted_hello(&conn2).await;
    let load = |tls: &ztna_node::config::TlsConfig| {
        ztna_node::Identity::load(tls, ztna_proto::Role::Agent).unwrap()
    };
    let old = load(&tls);
    let renewed = load(&pki.issue("agent", "mallory"));
    let alice = load(&pki.issue("agent", "alice"));
    // What a thief of the old key alone could send: the new certificate, which is public, with
    // a signature of the old key.
    // Exactly what the new key would sign for this connection, signed with the old key.
    let old_key_signs =
        |conn: &quinn::Connection, new: &ztna_node::Identity, old: &ztna_node::Identity| {
            let leaf = new.chain[0].clone();
            let msg = ztna_node::renew::signed_part(conn, &leaf).unwrap();
            let (scheme, signature) = old.sign(&msg).unwrap();
            ztna_proto::ClientMsg::Renew {
                chain: vec![leaf.to_vec()],
                scheme,
                signature,
            }
        };
    let foreign = load(&Pki::new().issue("agent", "mallory"));
    let request = |conn: &quinn::Connection, id: &ztna_node::Identity| {
        ztna_node::renew::request(conn, id).unwrap()
    };

    let mut refusals = Vec::new();
    // On the first connection: three forgeries, then the real one, then one too many.
    for (case, msg, expected) in [
        (
            "another agent's certificate",
            request(&conn1, &alice),
            "agent/alice",
        ),
        (
            "replayed from the other connection",
            request(&conn2, &renewed),
            "not signed for this connection",
        ),
        (
            "another CA",
            request(&conn1, &foreign),
            "not issued by the deployment CA",
        ),
    ] {
        let reason = renew_on(&mut s1, &mut r1, &msg).await.expect_err(case);
        assert!(reason.contains(expected), "{case}: {reason}");
        refusals.push((case, reason));
    }
    let until = renew_on(&mut s1, &mut r1, &request(&conn1, &renewed))
        .await
        .expect("the proper renewal");
    let expected = renewed
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(until, expected, "Renewed names the new notAfter");
    let reason = renew_on(&mut s1, &mut r1, &request(&conn1, &renewed))
        .await
        .expect_err("a fifth renewal within a minute");
    assert!(reason.contains("too many"), "{reason}");
    refusals.push(("one too many", reason));
    // On the second: the new certificate signed with the old key, a connector's certificate and
    // garbage.
    let connector = ztna_node::Identity::load(
        &pki.issue("connector", "mallory"),
        ztna_proto::Role::Connector,
    )
    .unwrap();
    let garbage = ztna_proto::ClientMsg::Renew {
        chain: vec![vec![0x30, 0x03, 0x02, 0x01, 0x00]],
        scheme: 0x0403,
        signature: vec![0; 64],
    };
    for (case, msg, expected) in [
        (
            "the new certificate signed with the old key",
            old_key_signs(&conn2, &renewed, &old),
            "not signed for this connection",
        ),
        (
            "a connector certificate",
            request(&conn2, &connector),
            "wrong role",
        ),
        ("garbage", garbage, "certificate"),
    ] {
        let reason = renew_on(&mut s2, &mut r2, &msg).await.expect_err(case);
        assert!(reason.contains(expected), "{case}: {reason}");
        refusals.push((case, reason));
    }
    println!("MEASURED renewal refusals: {refusals:#?}");
    assert_eq!(renewals(&im, "refused"), 7.0);
    assert_eq!(renewals(&im, "accepted"), 1.0);

    // Past the old notAfter: the connection with only refused renewals is cut, the renewed one
    // is not.
    let wait = not_after - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::from_secs_f64(wait.as_seconds_f64().max(0.0))).await;
    let cut = conn2.close_reason().map(|e| e.to_string());
    println!(
        "MEASURED past the old notAfter: refused connection {cut:?}, renewed connection {:?}",
        conn1.close_reason()
    );
    assert!(
        cut.as_deref()
            .is_some_and(|c| c.contains("certificate expired")),
        "the connection whose renewals were refused outlived its certificate: {cut:?}"
    );
    assert!(
        conn1.close_reason().is_none(),
        "the renewed connection was cut at the old notAfter: {:?}",
        conn1.close_reason()
    );
    assert_eq!(revocations(&im, "certificate_expired"), 1.0);
    im.daemon.shutdown().await;
}

/// A refused renewal is retried a minute later on the same connection: an agent rotates five
/// times at once; the fifth renewal is refused (the intermediate's budget of four), so new flows
/// move to a new connection, and a TCP flow left on the old one is carried over to the new
/// certificate by the retry once the budget allows it again. The fourth certificate expires 75 s
/// after it was issued, after the retry: without the retry, the flow is cut then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_is_retried_a_minute_later() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let port = a.port("web", Protocol::Tcp);
    let mut held = held_flow(port).await;
    let mut fourth_expires = None;
    renew_past_the_budget(&im, |n| {
        if n == 4 {
            let (_, not_after) = short_lived(&pki, "agent", "alice", "agent-alice", 75);
            fourth_expires = Some(not_after);
            a.handle.reload(a.config.clone()).expect("reload");
        } else {
            reissue(&pki, "agent", "alice", "agent-alice", || {
                a.handle.reload(a.config.clone()).expect("reload");
            })
        }
    })
    .await;
    let fourth_expires = fourth_expires.expect("a fourth certificate");
    let t0 = Instant::now();
    let moved = eventually(Duration::from_secs(5), || agents_on(&im) == 2.0).await;
    assert!(moved, "no new connection after the refusal");
    // The old connection stays for the held flow, and retries.
    let retried = eventually(Duration::from_secs(80), || renewals(&im, "accepted") == 5.0).await;
    println!(
        "MEASURED refused renewal retried and accepted {:?} after the refusal; connections {}",
        t0.elapsed(),
        agents_on(&im)
    );
    assert!(retried, "the refused renewal was not retried");
    assert!(
        t0.elapsed() >= Duration::from_secs(55),
        "retried before the budget allowed"
    );
    assert_eq!(renewals(&im, "refused"), 1.0, "retried too often");
    // Past the fourth certificate's notAfter: the retry carried the flow over.
    let wait =
        fourth_expires - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::from_secs_f64(wait.as_seconds_f64().max(0.0))).await;
    assert!(
        echoes(&mut held, b'r').await,
        "the held flow was cut at the fourth certificate's notAfter"
    );
    assert_eq!(revocations(&im, "certificate_expired"), 0.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

//! Issue 12 in-process: the hostile client's attacks (`ztna_integration::hostile`) against the
//! daemons' library entry points, with the victim measured alongside. The same attacks run
//! against real processes, with RSS and log volume, in `tests/system/hostile.py`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use ztna_integration::hostile::{attacks, local, Creds, NameKind};
use ztna_integration::*;
use ztna_proto::{Role, ServiceState};

fn creds(tls: ztna_node::config::TlsConfig, role: Role) -> Creds {
    Creds { tls, role }
}

/// A backend that accepts and never reads, writes or closes (holds up to 10,000 connections).
async fn sink() -> SocketAddr {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            if held.len() < 10_000 {
                held.push(s);
            }
        }
    });
    addr
}

fn victim(port: SocketAddr, secs: f64) -> local::Victim {
    local::Victim {
        target: port,
        interval: Duration::from_millis(100),
        secs,
        count: None,
        timeout: Duration::from_secs(3),
    }
}

fn gauge(text: &str, name: &str) -> f64 {
    metric(text, name, &[])
}

/// Item 1: one agent identity opening many connections with many idle, half-closed flows towards
/// a backend that never answers gets no more than its limits, a victim on another service of the
/// same connector keeps working, and everything is freed when the attacker leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_exhaust_the_relay_across_connections() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let dead_end = sink().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web", "other"]));
    cfg.max_flows_per_agent = 60;
    cfg.max_connections_per_identity = 3;
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(dead_end), None), ("other", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let mut a = start_agent(
        &pki,
        "alice",
        &[im.addr],
        &[("other", ForwardProtocol::Tcp)],
    )
    .await;
    a.wait_status("other", ServiceState::Available).await;

    let attacker = creds(pki.issue("agent", "mallory"), Role::Agent);
    let o = attacks::Exhaust {
        server: im.addr,
        service: "web".into(),
        conns: 6,
        flows: 40,
        half_close: true,
        hold_secs: 3.0,
        open_timeout: Duration::from_secs(3),
    };
    let v = victim(a.port("other", ztna_proto::Protocol::Tcp), 4.0);
    let (attack, during) = tokio::join!(attacks::exhaust(&attacker, &o), local::victim(&v));
    let (attack, during) = (attack.unwrap(), during.unwrap());
    let freed = eventually(Duration::from_secs(5), || {
        gauge(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_flows_active",
        ) == 0.0
            && gauge(
                &c.daemon.metrics.common.render(),
                "ztna_connector_flows_active",
            ) == 0.0
    })
    .await;
    let after = local::victim(&local::Victim {
        count: Some(20),
        ..victim(a.port("other", ztna_proto::Protocol::Tcp), 0.0)
    })
    .await
    .unwrap();
    println!("MEASURED exhaust: attacker {attack}; victim during {during}; after {after}");
    assert!(attack["connections_ok"].as_u64().unwrap() <= 3, "{attack}");
    assert_eq!(attack["flows_accepted"], 60, "{attack}");
    assert!(during["success_pct"].as_f64().unwrap() >= 99.0, "{during}");
    assert_eq!(after["ok"], 20, "{after}");
    assert!(freed, "flows still held after the attacker left");
}

/// An agent connection starts with a small stream credit (an idle connection stays cheap) that
/// grows with its flows: `max_flows_per_agent` (1000) concurrent flows on one connection are all
/// accepted, without a refusal or a timeout. (The raise from 896 to 1016 streams was one quinn
/// does not announce until streams close: flows past 896 waited for others to end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_credit_grows_with_an_agents_flows() {
    logs();
    let pki = Pki::new();
    let dead_end = sink().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(dead_end), None)]);
    c.wait_registered(1).await;
    let agent = creds(pki.issue("agent", "busy"), Role::Agent);
    let o = attacks::Exhaust {
        server: im.addr,
        service: "web".into(),
        conns: 1,
        flows: 1000,
        half_close: false,
        // Longer than the open timeout: no flow's end frees credit for a waiting one.
        hold_secs: 8.0,
        open_timeout: Duration::from_secs(5),
    };
    let r = attacks::exhaust(&agent, &o).await.unwrap();
    println!("MEASURED stream credit: {r}");
    assert_eq!(r["flows_accepted"], 1000, "{r}");
    assert_eq!(r["connections_ok"], 1, "{r}");
}

/// Item 6: service names past the protocol's cap are refused when the frame is decoded, and the
/// connection is closed with a protocol violation that names the field; the victim is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_names_are_refused_at_decode() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (_c, a) = web_chain(&pki, im.addr, echo).await;
    let v = victim(a.port("web", ztna_proto::Protocol::Tcp), 2.5);
    for (kind, cert) in [
        (
            NameKind::Flow,
            creds(pki.issue("agent", "mallory"), Role::Agent),
        ),
        (
            NameKind::Register,
            creds(pki.issue("connector", "rogue"), Role::Connector),
        ),
    ] {
        let o = attacks::Names {
            server: im.addr,
            kind,
            name_len: 65_000,
            rate: 200.0,
            secs: 2.0,
            reconnects_per_sec: 10.0,
        };
        let (r, during) = tokio::join!(attacks::names(&cert, &o), local::victim(&v));
        let (r, during) = (r.unwrap(), during.unwrap());
        println!("MEASURED names {kind:?}: {r}; victim {during}");
        let closes = r["closed_by_peer"].as_object().unwrap();
        assert!(
            !closes.is_empty()
                && closes
                    .keys()
                    .all(|k| k.contains("protocol violation") && k.contains("128-byte limit")),
            "{r}"
        );
        assert!(
            r["replies"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("rejected") && k != "registered"),
            "a long name reached policy: {r}"
        );
        assert!(during["success_pct"].as_f64().unwrap() >= 99.0, "{during}");
    }
    let text = im.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_flows_total",
            &[("result", "denied")]
        ),
        0.0,
        "oversized opens were evaluated as flows"
    );
}

/// A DNS-like service: 900 clients (one UDP flow each, from their own port), 100 at a time, each
/// sending one query and retrying after 1 s, up to 3 times, like a resolver. Every one is
/// answered: flows up to `max_flows_per_agent` open at once. Before, the 896th concurrent flow of
/// an agent waited ~10 s for a stream (see `stream_credit_grows_with_an_agents_flows`), and its
/// client gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_hundred_concurrent_udp_flows_of_one_agent_are_all_answered() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, echo).await;
    let port = a.port("dns", ztna_proto::Protocol::Udp);
    let started = std::time::Instant::now();
    let (mut sockets, mut unanswered, mut retried) = (Vec::new(), Vec::new(), 0);
    for batch_no in 0..9u64 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..100u64 {
            batch.spawn(async move {
                let s = tokio::net::UdpSocket::bind(loopback0()).await.unwrap();
                s.connect(port).await.unwrap();
                let query = (batch_no * 100 + i).to_be_bytes();
                let mut buf = [0u8; 64];
                for attempt in 0..3 {
                    s.send(&query).await.unwrap();
                    let answer =
                        tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await;
                    if let Ok(Ok(n)) = answer {
                        assert_eq!(&buf[..n], &query, "another flow's answer");
                        return (s, Some(attempt));
                    }
                }
                (s, None)
            });
        }
        while let Some(r) = batch.join_next().await {
            let (s, answered) = r.unwrap();
            match answered {
                Some(attempt) => retried += usize::from(attempt > 0),
                None => unanswered.push(s.local_addr().unwrap()),
            }
            sockets.push(s);
        }
    }
    println!(
        "MEASURED 900 concurrent UDP flows in {:?}: {} unanswered after 3 tries, {retried} \
         answered only on a retry",
        started.elapsed(),
        unanswered.len()
    );
    assert!(unanswered.is_empty(), "unanswered clients: {unanswered:?}");
    drop(sockets);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A DNS resolver asks each query from a new port: every query is a UDP flow. An answered
/// single query ends after `udp_query_idle_timeout`, not `udp_idle_timeout`, so steady lookups
/// do not use up the agent's `max_flows_per_agent` (here 20) and get its other flows refused.
/// 60 lookups at 10 per second, each from its own port: all answered, and a TCP flow of the
/// same agent afterwards too. (Before, each lookup held a flow for udp_idle_timeout: the 21st
/// and later were refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_dns_lookups_from_new_ports_do_not_use_up_the_agents_flows() {
    logs();
    let pki = Pki::new();
    let (dns, _seen, _d) = udp_echo().await;
    let (echo, _e) = tcp_echo().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["dns", "web"]));
    cfg.max_flows_per_agent = 20;
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "dns-1",
        &[im.addr],
        &[("dns", None, Some(dns)), ("web", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im.addr],
        &[("dns", ForwardProtocol::Udp), ("web", ForwardProtocol::Tcp)],
        "udp_query_idle_timeout = \"1s\"",
    )
    .await;
    a.wait_status("dns", ServiceState::Available).await;
    let port = a.port("dns", ztna_proto::Protocol::Udp);
    let mut unanswered = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..60u64 {
        let s = tokio::net::UdpSocket::bind(loopback0()).await.unwrap();
        s.connect(port).await.unwrap();
        let mut buf = [0u8; 16];
        let mut answered = false;
        for _ in 0..2 {
            s.send(&i.to_be_bytes()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await;
            if matches!(got, Ok(Ok(8))) && buf[..8] == i.to_be_bytes() {
                answered = true;
                break;
            }
        }
        if !answered {
            unanswered.push(i);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let web = tcp_roundtrip(a.port("web", ztna_proto::Protocol::Tcp), b"after").await;
    let refused = metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_limit_rejections_total",
        &[("limit", "flows_per_agent")],
    );
    println!(
        "MEASURED 60 lookups from new ports in {:?} with max_flows_per_agent 20: {} unanswered \
         {unanswered:?}, {refused} flows refused at the limit; a TCP flow afterwards: {:?}",
        started.elapsed(),
        unanswered.len(),
        web.as_ref().map(|b| String::from_utf8_lossy(b).to_string())
    );
    assert!(unanswered.is_empty(), "unanswered lookups: {unanswered:?}");
    assert_eq!(web.unwrap(), b"after");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// One real host that starts QUIC handshakes and stalls them (it answers the Retry, then goes
/// silent) cannot hold the relay's handshake slots: it gets at most `max_handshakes_per_source`
/// of them, the rest of its attempts are dropped and counted, and other clients' handshakes go
/// through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_stalling_handshakes_does_not_lock_out_other_clients() {
    logs();
    // The attacker holds about a thousand sockets at a time.
    ztna_node::fdlimit::raise_nofile();
    let pki = Pki::new();
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.max_handshakes = 64;
    cfg.handshake_retry_threshold = 16;
    cfg.max_handshakes_per_source = 16;
    let im = start_intermediate_with(cfg);
    let mallory = pki.issue("agent", "mallory");
    let identity = ztna_node::Identity::load(&mallory, Role::Agent).unwrap();
    let config = ztna_node::transport::client_config(
        &identity,
        Role::Intermediate,
        &ztna_node::transport::TransportOptions::default(),
    )
    .unwrap();
    // 127.0.0.2 is this host too (loopback is a /8): the attacker is one source, the victims
    // another.
    let stop = ztna_node::CancellationToken::new();
    let attack = tokio::spawn(ztna_integration::hostile::stall::stall_handshakes(
        im.addr,
        "127.0.0.2".parse().unwrap(),
        config,
        Duration::from_millis(5),
        stop.clone(),
    ));
    let text = || im.daemon.metrics.common.render();
    let in_progress = || gauge(&text(), "ztna_intermediate_handshakes_in_progress");
    // Let the stalled attempts pile up (each lives for the relay's 5 s idle timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alice = pki.issue("agent", "alice");
    let mut took = Vec::new();
    let mut failed = Vec::new();
    let mut peak = in_progress();
    for _ in 0..10 {
        let t0 = std::time::Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(5),
            raw_connect(&alice, Role::Agent, im.addr),
        )
        .await
        {
            Ok(Ok((ep, conn))) => {
                took.push(t0.elapsed().as_secs_f64() * 1000.0);
                conn.close(0u32.into(), b"");
                ep.close(0u32.into(), b"");
            }
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("no handshake within 5 s".into()),
        }
        peak = peak.max(in_progress());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    let started = attack.await.unwrap().unwrap();
    let shed = metric(
        &text(),
        "ztna_intermediate_handshakes_shed_total",
        &[("action", "per_source")],
    );
    took.sort_by(f64::total_cmp);
    println!(
        "MEASURED {started} stalled handshake attempts from one source: {shed} dropped as per_source, \
         at most {peak} handshakes in progress; 10 handshakes from another source: {} failed, \
         {:.1} ms median, {:.1} ms slowest ({failed:?})",
        failed.len(),
        took.get(took.len() / 2).copied().unwrap_or(f64::NAN),
        took.last().copied().unwrap_or(f64::NAN),
    );
    assert!(started > 500, "the attack started only {started} attempts");
    assert!(shed > 0.0, "nothing was dropped per source");
    // Its proven attempts (16) and the unproven ones below the Retry threshold (16), the probe.
    assert!(peak <= 16.0 + 16.0 + 2.0, "{peak} handshakes in progress");
    assert!(failed.is_empty(), "{failed:?}");
    // Not stuck behind the attacker's attempts (a slot frees after seconds): a lost packet on a
    // loaded machine may cost one retransmission (about 1 s).
    let median = took[took.len() / 2];
    assert!(
        median < 500.0 && took.last().is_some_and(|t| *t < 3000.0),
        "handshakes took {took:?} ms"
    );
    im.daemon.shutdown().await;
}

/// A connector that flips a service's registration in a loop (each flip wakes every agent
/// session watching services) is closed once it goes past its budget; an honest connector's
/// registration at connect, and its service, are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_flipping_its_registrations_is_closed() {
    use ztna_integration::hostile::{client_endpoint, session};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut honest = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    honest.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let rogue = creds(pki.issue("connector", "web-9"), Role::Connector);
    let ep = client_endpoint(im.addr).unwrap();
    let mut s = session(
        &ep,
        &rogue.client_config().unwrap(),
        im.addr,
        Role::Connector,
        vec![],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut sent = 0u32;
    for i in 0..10_000u32 {
        let msg = if i % 2 == 0 {
            ztna_proto::ClientMsg::Register {
                service: "web".into(),
                tcp: true,
                udp: false,
            }
        } else {
            ztna_proto::ClientMsg::Deregister {
                service: "web".into(),
            }
        };
        if ztna_node::io::write_frame(&mut s.control_send, &msg)
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let why = tokio::time::timeout(Duration::from_secs(5), s.conn.closed())
        .await
        .map(|e| ztna_node::identity::describe_connection_error(&e));
    let rejected = metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_limit_rejections_total",
        &[("limit", "registrations")],
    );
    println!("MEASURED registration flips: {sent} written before the write failed; closed: {why:?}; limit_rejections{{registrations}} {rejected}");
    assert!(
        why.as_deref()
            .is_ok_and(|w| w.contains("registration changes too fast")),
        "{why:?}"
    );
    assert_eq!(rejected, 1.0);
    assert_eq!(registered_on(&honest.registered.borrow()), 1);
    assert_eq!(
        tcp_roundtrip(a.port("web", ztna_proto::Protocol::Tcp), b"still")
            .await
            .unwrap(),
        b"still"
    );
    a.daemon.shutdown().await;
    honest.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

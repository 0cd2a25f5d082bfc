//! End to end through agent → intermediate → connector → backend, in one process on loopback.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_8mib_intact_64_concurrent_and_half_close() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (c, a) = web_chain(&pki, im.addr, echo).await;
    let port = a.port("web", Protocol::Tcp);

    // 8 MiB over one flow, hash compared; the writer half-closes and still reads everything back.
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&data);
    let s = TcpStream::connect(port).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: we keep reading
    });
    let mut got = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut got))
        .await
        .expect("8 MiB in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), 8 * 1024 * 1024);
    assert_eq!(Sha256::digest(&got), want, "8 MiB corrupted");

    // 64 concurrent flows, each with its own payload.
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        tasks.push(tokio::spawn(async move {
            let msg: Vec<u8> = (0..20_000u32).map(|j| (i * 7 + j) as u8).collect();
            let back = tcp_roundtrip(port, &msg).await.unwrap();
            assert_eq!(back, msg, "flow {i} corrupted");
        }));
    }
    for t in tasks {
        tokio::time::timeout(T, t)
            .await
            .expect("concurrent flows in time")
            .unwrap();
    }
    let text = im.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_flows_total",
            &[("protocol", "tcp"), ("result", "ok")]
        ),
        65.0
    );
    assert!(
        metric(
            &text,
            "ztna_intermediate_relay_bytes_total",
            &[("protocol", "tcp"), ("direction", "to_connector")]
        ) >= 8.0 * 1024.0 * 1024.0
    );
    let ctext = c.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &ctext,
            "ztna_connector_flows_total",
            &[("service", "web"), ("result", "ok")]
        ),
        65.0
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_1000_mixed_sizes_and_payloads_of_any_size_echoed() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, echo).await;
    let port = a.port("dns", Protocol::Udp);
    let client = UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(port).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    // The first datagram opens the flow (it is queued while the flow opens, not lost).
    client.send(b"hello").await.unwrap();
    let n = tokio::time::timeout(T, client.recv(&mut buf))
        .await
        .expect("first datagram answered")
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    let mut lost = 0;
    for i in 0..1000u32 {
        let size = 1 + (i as usize * 37) % 1100;
        let msg: Vec<u8> = (0..size).map(|j| (i as usize + j) as u8).collect();
        client.send(&msg).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf)).await {
            Ok(Ok(n)) => assert_eq!(&buf[..n], &msg[..], "datagram {i} corrupted"),
            _ => lost += 1,
        }
    }
    assert_eq!(lost, 0, "datagrams lost on loopback");
    // Full-MTU application datagrams, iperf3's default UDP size and the largest UDP payload
    // there is: larger than a QUIC datagram can carry, so they travel on the flow's stream,
    // both ways, intact.
    for size in [1472usize, 8192, 32_768, 65_507] {
        let msg: Vec<u8> = (0..size).map(|j| (j * 7 + size) as u8).collect();
        client.send(&msg).await.unwrap();
        let n = tokio::time::timeout(T, client.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{size}-byte datagram not echoed"))
            .unwrap();
        assert_eq!(n, size, "{size}-byte datagram truncated");
        assert_eq!(&buf[..n], &msg[..], "{size}-byte datagram corrupted");
    }
    // A burst of full-MTU datagrams sent back to back (as iperf3 or a video call sends them):
    // written to the stream in batches, each one must still arrive whole, once and in order
    // (the stream is ordered both ways). 60 stays within every queue on the way (64).
    const BURST: usize = 60;
    let burst: Vec<Vec<u8>> = (0..BURST)
        .map(|i| (0..1472usize).map(|j| (i * 131 + j * 3) as u8).collect())
        .collect();
    for msg in &burst {
        client.send(msg).await.unwrap();
    }
    for (i, msg) in burst.iter().enumerate() {
        let n = tokio::time::timeout(T, client.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("burst: datagram {i} of {BURST} not echoed"))
            .unwrap();
        assert!(
            buf[..n] == msg[..],
            "burst: echo {i} is not datagram {i} ({n} bytes)"
        );
    }
    let text = c.daemon.metrics.common.render();
    for direction in ["to_backend", "to_agent"] {
        let carried = metric(
            &text,
            "ztna_connector_udp_stream_payloads_total",
            &[("direction", direction)],
        );
        assert!(
            carried >= 4.0 + BURST as f64,
            "{direction}: {carried} carried on the stream"
        );
    }
    let dropped = metric(
        &a.daemon.metrics.common.render(),
        "ztna_agent_udp_dropped_total",
        &[],
    );
    assert_eq!(dropped, 0.0, "the agent dropped datagrams");
    // The relay counts every payload byte it carried, as datagrams or on the flow's stream.
    let sent: usize = 5
        + (0..1000usize).map(|i| 1 + (i * 37) % 1100).sum::<usize>()
        + [1472usize, 8192, 32_768, 65_507].iter().sum::<usize>()
        + BURST * 1472;
    let text = im.daemon.metrics.common.render();
    for direction in ["to_connector", "to_agent"] {
        let counted = metric(
            &text,
            "ztna_intermediate_relay_bytes_total",
            &[("protocol", "udp"), ("direction", direction)],
        );
        assert_eq!(counted, sent as f64, "relay UDP bytes {direction}");
    }
    // Still working afterwards, as datagrams.
    client.send(b"after").await.unwrap();
    let n = tokio::time::timeout(T, client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"after");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_one_connector_and_two_connectors_share_one_service() {
    logs();
    let pki = Pki::new();
    let (a1, _x) = tcp_named("one").await;
    let (a2, _y) = tcp_named("two").await;
    let (db, _z) = tcp_named("db").await;
    let im = start_intermediate(&pki, open_policy(&["web", "db"]));
    let mut c1 = start_connector(
        &pki,
        "c1",
        &[im.addr],
        &[("web", Some(a1), None), ("db", Some(db), None)],
    );
    let mut c2 = start_connector(&pki, "c2", &[im.addr], &[("web", Some(a2), None)]);
    c1.wait_registered(1).await;
    c2.wait_registered(1).await;
    let mut a = start_agent(
        &pki,
        "alice",
        &[im.addr],
        &[("web", ForwardProtocol::Tcp), ("db", ForwardProtocol::Tcp)],
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;
    a.wait_status("db", ServiceState::Available).await;
    let web = a.port("web", Protocol::Tcp);
    assert_eq!(
        tcp_roundtrip(a.port("db", Protocol::Tcp), b"")
            .await
            .unwrap(),
        b"db"
    );
    // Concurrent flows spread over both connectors (least loaded first).
    let mut holds = Vec::new();
    let mut names = std::collections::HashMap::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(web).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        *names.entry(String::from_utf8(out).unwrap()).or_insert(0) += 1;
        holds.push(s);
    }
    assert!(
        names.get("one").copied().unwrap_or(0) > 0 && names.get("two").copied().unwrap_or(0) > 0,
        "flows not shared: {names:?}"
    );
    // One connector stops: every new flow goes to the survivor.
    c2.daemon.shutdown().await;
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_service_connectors",
            &[("service", "web")]
        ) == 1.0)
        .await
    );
    for _ in 0..10 {
        assert_eq!(tcp_roundtrip(web, b"").await.unwrap(), b"one");
    }
    a.daemon.shutdown().await;
    c1.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_rejects_the_flow_promptly_with_reason() {
    logs();
    let pki = Pki::new();
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(dead), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let took = refused_locally(a.port("web", Protocol::Tcp)).await;
    assert!(took < Duration::from_secs(2), "refusal took {:?}", took);
    let ctext = c.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &ctext,
            "ztna_connector_backend_errors_total",
            &[("service", "web")]
        ),
        1.0
    );
    let atext = a.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &atext,
            "ztna_agent_flows_total",
            &[("service", "web"), ("result", "unavailable")]
        ),
        1.0
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A backend that never answers the SYN (its accept queue is full, so the kernel drops it) is
/// given up after `connect_timeout`, not after the kernel's minutes of SYN retries, and the
/// agent's user sees the connection refused with the reason counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_is_given_up_after_connect_timeout() {
    logs();
    let pki = Pki::new();
    let silent = tokio::net::TcpSocket::new_v4().unwrap();
    silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = silent.listen(0).unwrap();
    let backend = silent.local_addr().unwrap();
    // Backlog 0 queues one connection; with it taken, further SYNs go unanswered.
    let _filler = std::net::TcpStream::connect(backend).unwrap();
    let probe = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(backend)).await;
    if probe.is_ok() {
        println!("SKIP silent backend: this kernel still answers SYNs on a full accept queue");
        return;
    }
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector_with(
        pki.issue("connector", "web-1"),
        &[im.addr],
        &[("web", Some(backend), None)],
        "connect_timeout = \"700ms\"",
    );
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let took = refused_locally(a.port("web", Protocol::Tcp)).await;
    println!(
        "MEASURED silent backend: local connection refused after {took:?} (connect_timeout 700ms)"
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "refusal after {took:?}, expected just after connect_timeout"
    );
    assert_eq!(
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_backend_errors_total",
            &[("service", "web")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_flows_total",
            &[("service", "web"), ("result", "unavailable")]
        ),
        1.0
    );
    drop(silent);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_per_agent_are_bounded() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.max_flows_per_agent = 2;
    let im = start_intermediate_with(cfg);
    let (c, a) = web_chain(&pki, im.addr, echo).await;
    let port = a.port("web", Protocol::Tcp);
    // Two long-lived flows, proven open by an echo each.
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(T, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        held.push(s);
    }
    // The third is refused by the limit.
    if let Ok(mut s) = TcpStream::connect(port).await {
        let _ = s.write_all(b"x").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(
            r.is_err() || buf.is_empty(),
            "flow over the limit was relayed"
        );
    }
    let text = im.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_flows_total",
            &[("protocol", "tcp"), ("result", "error")]
        ),
        1.0
    );
    // Closing one makes room again.
    drop(held.pop());
    let ok = eventually(Duration::from_secs(5), || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_flows_active",
            &[("protocol", "tcp")],
        ) <= 1.0
    })
    .await;
    assert!(ok);
    assert_eq!(tcp_roundtrip(port, b"again").await.unwrap(), b"again");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_udp_flows_are_closed_everywhere_and_reopen_on_demand() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let idle = "udp_idle_timeout = \"1s\"";
    let mut c = start_connector_with(
        pki.issue("connector", "dns-1"),
        &[im.addr],
        &[("dns", None, Some(echo))],
        idle,
    );
    c.wait_registered(1).await;
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im.addr],
        &[("dns", ForwardProtocol::Udp)],
        idle,
    )
    .await;
    a.wait_status("dns", ServiceState::Available).await;
    let client = UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    let mut buf = [0u8; 64];
    let echo_once = |msg: &'static [u8]| {
        let client = &client;
        async move {
            let mut buf = [0u8; 64];
            for _ in 0..30 {
                client.send(msg).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
                {
                    return buf[..n] == *msg;
                }
            }
            false
        }
    };
    assert!(echo_once(b"one").await, "first flow never echoed");
    let active = |text: &str| {
        metric(
            text,
            "ztna_intermediate_flows_active",
            &[("protocol", "udp")],
        )
    };
    assert_eq!(active(&im.daemon.metrics.common.render()), 1.0);
    // Quiet for longer than the idle timeout: the flow ends at the connector and the relay.
    let closed = eventually(Duration::from_secs(6), || {
        active(&im.daemon.metrics.common.render()) == 0.0
            && metric(
                &c.daemon.metrics.common.render(),
                "ztna_connector_flows_active",
                &[("protocol", "udp")],
            ) == 0.0
    })
    .await;
    assert!(closed, "idle UDP flow still open");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf))
            .await
            .is_err()
    );
    // The next datagram opens a fresh flow.
    assert!(echo_once(b"two").await, "flow did not reopen");
    let ok = metric(
        &c.daemon.metrics.common.render(),
        "ztna_connector_flows_total",
        &[("protocol", "udp"), ("result", "ok")],
    );
    assert_eq!(ok, 2.0);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Relays A and B (policy allows web and db) and one connector for web that reaches only B
/// (think: its path to A is cut).
async fn web_only_via_relay_b() -> (
    Pki,
    IntermediateHandle,
    IntermediateHandle,
    ConnectorHandle,
    tokio::task::JoinHandle<()>,
) {
    logs();
    let pki = Pki::new();
    let (echo, echo_task) = tcp_echo().await;
    let a_relay = start_intermediate(&pki, open_policy(&["web", "db"]));
    let b_relay = start_intermediate(&pki, open_policy(&["web", "db"]));
    let mut c = start_connector(&pki, "web-1", &[b_relay.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    (pki, a_relay, b_relay, c, echo_task)
}

/// Handshakes an intermediate completed (a reconnecting or hopping agent shows up here).
fn handshakes(h: &IntermediateHandle) -> f64 {
    metric(
        &h.daemon.metrics.common.render(),
        "ztna_intermediate_handshakes_total",
        &[("result", "ok")],
    )
}

/// Web is served only via relay B (its connector cannot reach A). The agent, configured with A
/// first, never refuses web: its very first flow goes via B. A service served nowhere is refused
/// at once, naming the reason, and nothing reconnects or hops for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_only_via_the_second_relay_works_from_the_first_flow() {
    let (pki, a_relay, b_relay, c, _e) = web_only_via_relay_b().await;
    let mut agent = start_agent(
        &pki,
        "alice",
        &[a_relay.addr, b_relay.addr],
        &[("web", ForwardProtocol::Tcp), ("db", ForwardProtocol::Tcp)],
    )
    .await;
    agent.wait_status("web", ServiceState::Available).await;
    let t0 = std::time::Instant::now();
    let back = tcp_roundtrip(agent.port("web", Protocol::Tcp), b"first try").await;
    println!(
        "MEASURED first web flow with web only via relay B: {:?}",
        t0.elapsed()
    );
    assert_eq!(back.expect("the flow went via relay B"), b"first try");
    for i in 0..20 {
        let msg = format!("web {i}");
        assert_eq!(
            tcp_roundtrip(agent.port("web", Protocol::Tcp), msg.as_bytes())
                .await
                .expect("web flow"),
            msg.as_bytes()
        );
    }
    let text = agent.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_agent_flows_total",
            &[("service", "web"), ("result", "ok")]
        ),
        21.0
    );
    // db is served nowhere: refused promptly with the relays' reason.
    let took = refused_locally(agent.port("db", Protocol::Tcp)).await;
    assert!(took < Duration::from_secs(1), "db refusal took {took:?}");
    let reason = agent.wait_status("db", ServiceState::Unavailable).await;
    assert!(reason.contains("no connector"), "{reason}");
    // The agent holds one connection to each relay and never reconnected or hopped.
    let before = handshakes(&a_relay) + handshakes(&b_relay);
    for _ in 0..5 {
        refused_locally(agent.port("db", Protocol::Tcp)).await;
    }
    assert_eq!(
        tcp_roundtrip(agent.port("web", Protocol::Tcp), b"still")
            .await
            .unwrap(),
        b"still"
    );
    assert_eq!((agents_on(&a_relay), agents_on(&b_relay)), (1.0, 1.0));
    assert_eq!(
        handshakes(&a_relay) + handshakes(&b_relay),
        before,
        "the agent reconnected"
    );
    agent.daemon.shutdown().await;
    c.daemon.shutdown().await;
    a_relay.daemon.shutdown().await;
    b_relay.daemon.shutdown().await;
}

/// Services split across intermediates (web only via A, db only via B): each goes where it is
/// served, and a long-running web flow is never disturbed by db flows (no moves, no bouncing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_services_each_go_where_they_are_served_and_a_running_flow_is_never_disturbed() {
    logs();
    let pki = Pki::new();
    let (web, _w) = tcp_echo().await;
    let (db, _d) = tcp_named("db").await;
    let a_relay = start_intermediate(&pki, open_policy(&["web", "db"]));
    let b_relay = start_intermediate(&pki, open_policy(&["web", "db"]));
    let mut cw = start_connector(&pki, "web-1", &[a_relay.addr], &[("web", Some(web), None)]);
    let mut cd = start_connector(&pki, "db-1", &[b_relay.addr], &[("db", Some(db), None)]);
    cw.wait_registered(1).await;
    cd.wait_registered(1).await;
    let mut agent = start_agent(
        &pki,
        "alice",
        &[a_relay.addr, b_relay.addr],
        &[("web", ForwardProtocol::Tcp), ("db", ForwardProtocol::Tcp)],
    )
    .await;
    agent.wait_status("web", ServiceState::Available).await;
    agent.wait_status("db", ServiceState::Available).await;
    let web_port = agent.port("web", Protocol::Tcp);
    let db_port = agent.port("db", Protocol::Tcp);
    // A long-running web flow (think: an ssh session).
    let mut held = tokio::net::TcpStream::connect(web_port).await.unwrap();
    let mut one = [0u8; 5];
    held.write_all(b"hello").await.unwrap();
    held.read_exact(&mut one).await.unwrap();
    let before = handshakes(&a_relay) + handshakes(&b_relay);
    for i in 0..20 {
        assert_eq!(
            tcp_roundtrip(db_port, b"x").await.unwrap(),
            b"db",
            "db flow {i}"
        );
        let msg = format!("web {i}");
        assert_eq!(
            tcp_roundtrip(web_port, msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
        held.write_all(b"still").await.unwrap();
        held.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"still", "the running web flow was disturbed");
    }
    assert_eq!(
        handshakes(&a_relay) + handshakes(&b_relay),
        before,
        "the agent reconnected"
    );
    let text = agent.daemon.metrics.common.render();
    for service in ["web", "db"] {
        assert_eq!(
            metric(
                &text,
                "ztna_agent_flows_total",
                &[("service", service), ("result", "unavailable")]
            ),
            0.0,
            "{service} flows were refused"
        );
    }
    agent.daemon.shutdown().await;
    cw.daemon.shutdown().await;
    cd.daemon.shutdown().await;
    a_relay.daemon.shutdown().await;
    b_relay.daemon.shutdown().await;
}

/// Like `dig +tries=1`: each query comes from a new port (a new UDP flow) and is sent once, so
/// the first datagram of every flow must arrive. It reaches the connector right after the flow's
/// backend socket is made; tokio's `try_send` on a socket whose first readiness event the
/// reactor had not yet seen failed without trying, and the connector counted the query as
/// `backend_busy` (1-3 of 600 lost in half the runs; in the netns suite, a lost DNS query).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_first_datagram_of_every_new_udp_flow_is_answered() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, echo).await;
    let port = a.port("dns", Protocol::Udp);
    const FLOWS: usize = 600;
    const AT_ONCE: usize = 40;
    let mut lost = 0;
    for round in 0..FLOWS / AT_ONCE {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..AT_ONCE {
            tasks.spawn(async move {
                let s = UdpSocket::bind(loopback0()).await.unwrap();
                s.connect(port).await.unwrap();
                let msg = format!("query {round}/{i}");
                s.send(msg.as_bytes()).await.unwrap();
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await,
                    Ok(Ok(n)) if buf[..n] == *msg.as_bytes()
                )
            });
        }
        while let Some(ok) = tasks.join_next().await {
            lost += usize::from(!ok.unwrap());
        }
    }
    let unknown = metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_datagrams_dropped_total",
        &[("reason", "unknown_flow")],
    );
    let drops: Vec<String> = [
        a.daemon.metrics.common.render(),
        im.daemon.metrics.common.render(),
        c.daemon.metrics.common.render(),
    ]
    .iter()
    .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
    .filter(|l| l.contains("dropped") && !l.starts_with('#'))
    .collect();
    assert_eq!(
        (lost, unknown),
        (0, 0.0),
        "{lost} of {FLOWS} single-datagram flows got no answer; the relay dropped {unknown} datagrams of unknown flows; drops: {drops:?}"
    );
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// Datagrams a local client sends to a UDP forward whose service no connector serves wait for a
/// path that never comes: when the agent refuses the flow they are counted as dropped
/// (`no_path`) and logged, not discarded silently; a burst beyond the flow's queue (128) is
/// counted as `pending` as it arrives. Every datagram sent is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_of_a_udp_flow_that_cannot_open_are_counted_as_dropped() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("dns", ForwardProtocol::Udp)]).await;
    a.wait_status("dns", ServiceState::Unavailable).await;
    let client = UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    const SENT: usize = 140;
    for i in 0..SENT {
        client.send(&[i as u8; 100]).await.unwrap();
    }
    let dropped = |reason: &str| {
        metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_udp_dropped_total",
            &[("reason", reason)],
        )
    };
    // (A datagram the kernel dropped at the forward's full socket is counted too, by reason.)
    let counted = || dropped("no_path") + dropped("pending") + dropped("socket_overflow");
    assert!(
        eventually(Duration::from_secs(5), || counted() >= SENT as f64).await,
        "{SENT} datagrams sent, {} counted (no_path {}, pending {})",
        counted(),
        dropped("no_path"),
        dropped("pending")
    );
    println!(
        "MEASURED {SENT} datagrams to an unavailable UDP service: no_path {}, pending {}",
        dropped("no_path"),
        dropped("pending")
    );
    assert_eq!(counted(), SENT as f64, "a datagram counted twice");
    assert!(
        dropped("pending") >= 1.0,
        "a burst beyond the queue was not counted as pending"
    );
    a.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A UDP service whose backend is down: its host refuses the datagrams (ICMP port unreachable),
/// and the connector counts them as dropped (`backend_error`) and logs them, instead of losing
/// them silently. It keeps the flow: once the backend is back on its port, the same client's
/// next datagrams are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_counts_what_a_down_backend_refuses_and_outlives_it() {
    logs();
    let pki = Pki::new();
    // A port no one listens on.
    let down = free_udp_port();
    let im = start_intermediate(&pki, open_policy(&["dns"]));
    let (c, a) = dns_chain(&pki, im.addr, down).await;
    let client = UdpSocket::bind(loopback0()).await.unwrap();
    client.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    let refused = || {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_udp_dropped_total",
            &[("reason", "backend_error")],
        )
    };
    for i in 0..5u8 {
        client.send(&[i; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || refused() >= 1.0).await,
        "datagrams the down backend's host refused were not counted as backend_error"
    );
    let while_down = refused();
    // The backend comes back on its port.
    let (_, _, echo) = udp_echo_on(down).await;
    let answered_after = udp_round_trip(&client, b"are you back").await;
    println!(
        "MEASURED 5 datagrams to a down UDP backend: {while_down} counted as backend_error; \
         the same flow answered after the backend came back: {answered_after:?} datagrams"
    );
    assert!(
        answered_after.is_some(),
        "the flow did not carry datagrams again once the backend was back"
    );
    echo.abort();
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An HTTP server refusing an upload early (413 after the first 4 KiB of 16 MiB), as nginx does:
/// it answers, closes its side (FIN) and reads and discards the rest for a while (a lingering
/// close). The client, still uploading, gets the whole answer and then the end of the stream,
/// as it does without the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_response_to_an_upload_reaches_the_client() {
    const ANSWER: &[u8] =
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    logs();
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(ANSWER).await;
                let _ = s.shutdown().await;
                let linger = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
            });
        }
    });
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let (c, a) = web_chain(&pki, im.addr, backend).await;
    let port = a.port("web", Protocol::Tcp);
    for i in 0..5 {
        let (mut r, mut w) = tokio::net::TcpStream::connect(port)
            .await
            .unwrap()
            .into_split();
        let upload = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..256 {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got)).await;
        upload.abort();
        println!(
            "MEASURED early answer {i}: {:?}, end {end:?}",
            String::from_utf8_lossy(&got).lines().next()
        );
        assert_eq!(got, ANSWER, "upload {i}: the answer did not arrive whole");
        assert!(matches!(end, Ok(Ok(_))), "upload {i}: {end:?}");
    }
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

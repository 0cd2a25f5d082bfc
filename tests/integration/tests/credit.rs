//! Flow credit: one agent's stalled flows cannot fill the intermediate ↔ connector connection
//! that every agent's flows to that connector share, in either direction; connectors that predate
//! flow credit keep working unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use ztna_integration::*;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_proto::{ClientMsg, FlowOpen, FlowReply, Protocol, Role, ServerMsg, PROTOCOL_VERSION};

const T: Duration = Duration::from_secs(10);
/// More stalled flows than the default 64 MiB connector window holds at 16 MiB per stream.
const STALLED_FLOWS: usize = 40;
/// Agent processes (connections) of the attacking identity.
const MALLORY_CONNECTIONS: usize = 4;

/// A backend that accepts connections and never reads from them. Its small receive buffer
/// keeps the kernel from absorbing what the flows push, as a busy remote backend would.
async fn tcp_sink() -> (SocketAddr, JoinHandle<()>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.set_nonblocking(true).unwrap();
    sock.bind(&loopback0().into()).unwrap();
    sock.listen(128).unwrap();
    let l = TcpListener::from_std(sock.into()).unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// A backend that writes to every connection as fast as it is read, forever.
async fn tcp_source() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 256 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    (addr, task)
}

/// The victim: `n` round trips of 64 KiB through `port` (echo), each within `limit`. Returns
/// how many succeeded and the slowest.
async fn victim(port: SocketAddr, n: usize, limit: Duration) -> (usize, Duration) {
    let payload = vec![0x5au8; 64 * 1024];
    let mut ok = 0;
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let t0 = Instant::now();
        let r = tokio::time::timeout(limit, tcp_roundtrip(port, &payload)).await;
        let took = t0.elapsed();
        worst = worst.max(took);
        if matches!(r, Ok(Ok(ref back)) if back == &payload) {
            ok += 1;
        }
    }
    (ok, worst)
}

struct World {
    im: IntermediateHandle,
    connector: ConnectorHandle,
    /// The same identity on several connections (as an attacker would: each connection has its
    /// own window at the relay).
    mallory: Vec<AgentHandle>,
    alice: AgentHandle,
    _backends: Vec<JoinHandle<()>>,
}

/// Connector `shared-1` serves `web` (echo) and `bulk` (`bulk` backend) through one
/// intermediate; mallory forwards `bulk`, alice forwards `web`.
async fn world(pki: &Pki, bulk: (SocketAddr, JoinHandle<()>)) -> World {
    let (echo, e) = tcp_echo().await;
    let im = start_intermediate(pki, open_policy(&["web", "bulk"]));
    let mut c = start_connector(
        pki,
        "shared-1",
        &[im.addr],
        &[("web", Some(echo), None), ("bulk", Some(bulk.0), None)],
    );
    c.wait_registered(1).await;
    let mut mallory = Vec::new();
    for _ in 0..MALLORY_CONNECTIONS {
        let tls = pki.issue("agent", "mallory");
        let forwards = [("bulk", ForwardProtocol::Tcp)];
        let mut m = start_agent_with(tls, &[im.addr], &forwards, "drain_timeout = \"1s\"").await;
        m.wait_status("bulk", ztna_proto::ServiceState::Available)
            .await;
        mallory.push(m);
    }
    let mut alice = start_agent(pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    alice
        .wait_status("web", ztna_proto::ServiceState::Available)
        .await;
    World {
        im,
        connector: c,
        mallory,
        alice,
        _backends: vec![e, bulk.1],
    }
}

/// Waits until `read` (a byte count) is above 0 and has not grown for 500 ms, at most 30 s;
/// returns its value.
async fn until_stable(read: impl Fn() -> f64) -> f64 {
    let mut last = -1.0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = read();
        if now == last && now > 0.0 {
            break;
        }
        last = now;
    }
    last
}

/// Waits until the relay's TCP byte counter in `direction` stops growing (mallory's flows have
/// filled everything they can), at most 30 s; returns its value.
async fn settle(im: &IntermediateHandle, direction: &str) -> f64 {
    until_stable(|| {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_relay_bytes_total",
            &[("protocol", "tcp"), ("direction", direction)],
        )
    })
    .await
}

/// Alice's 20 round trips of 64 KiB through `web`, each within 3 s: (succeeded, slowest).
async fn alice_round_trips(w: &World) -> (usize, Duration) {
    victim(
        w.alice.port("web", Protocol::Tcp),
        20,
        Duration::from_secs(3),
    )
    .await
}

/// Mallory pushes into a backend that never reads on more flows than the connector
/// connection's window can hold; alice, on the same connector through the same relay, still
/// gets every round trip through, quickly. (Without flow credit her uploads stop as soon as
/// mallory's stalled flows fill the shared window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_of_one_agent_do_not_stop_another_agents_flows() {
    logs();
    let pki = Pki::new();
    let w = world(&pki, tcp_sink().await).await;
    let ports: Vec<SocketAddr> = w
        .mallory
        .iter()
        .map(|m| m.port("bulk", Protocol::Tcp))
        .collect();
    let written = Arc::new(AtomicU64::new(0));
    let mut pushers = Vec::new();
    for i in 0..STALLED_FLOWS {
        let port = ports[i % ports.len()];
        let written = written.clone();
        pushers.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(port).await else {
                return;
            };
            let chunk = vec![1u8; 256 * 1024];
            while s.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let relayed = settle(&w.im, "to_connector").await;
    // Stalled means stalled at both ends: mallory's writes into the agents' sockets stop too
    // once every window on the way is full (at most 30 s). Until then alice would share the
    // machine with a bulk upload still filling windows, which is not what this test is about.
    let t_quiet = Instant::now();
    let stuck = until_stable(|| written.load(Ordering::Relaxed) as f64).await as u64;
    let c_text = w.connector.daemon.metrics.common.render();
    let to_backend = metric(
        &c_text,
        "ztna_connector_bytes_total",
        &[("direction", "to_backend")],
    );
    let (ok, worst) = alice_round_trips(&w).await;
    let waits = metric(
        &w.im.daemon.metrics.common.render(),
        "ztna_intermediate_credit_waits_total",
        &[],
    );
    eprintln!(
        "mallory wrote {} MiB into a backend that never reads on {STALLED_FLOWS} flows (writes stopped {:.1?} after the relay's); the relay sent {} MiB to the connector, which wrote {} MiB to the backend; alice: {ok}/20 round trips, slowest {worst:?}; intermediate credit waits {waits}",
        stuck >> 20,
        t_quiet.elapsed(),
        relayed as u64 >> 20,
        to_backend as u64 >> 20
    );
    assert_eq!(
        ok, 20,
        "alice's flows on the shared connector stalled (slowest {worst:?})"
    );
    assert!(waits > 0.0, "mallory's flows never hit their budget");
    // Mallory goes away: its flows, blocked on a budget the backend will never free, end with
    // it instead of pinning their buffers at the relay.
    for p in pushers {
        p.abort();
    }
    let leaving: Vec<_> = w.mallory.into_iter().map(|m| m.daemon.shutdown()).collect();
    for l in leaving {
        l.await;
    }
    let im = &w.im;
    let active = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_flows_active",
            &[("protocol", "tcp")],
        )
    };
    let t0 = Instant::now();
    let gone = eventually(T, || active() == 0.0).await;
    eprintln!(
        "relay flows after mallory left: {} ({:?})",
        active(),
        t0.elapsed()
    );
    assert!(
        gone,
        "{} of mallory's flows outlived it at the relay",
        active()
    );
}

/// Mallory downloads from a backend that never stops on flows it never reads; alice's flows on
/// the same connector keep working. (Without flow credit mallory's unread downloads fill the
/// intermediate's receive window for the connector connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_downloads_of_one_agent_do_not_stop_another_agents_flows() {
    logs();
    let pki = Pki::new();
    let w = world(&pki, tcp_source().await).await;
    let ports: Vec<SocketAddr> = w
        .mallory
        .iter()
        .map(|m| m.port("bulk", Protocol::Tcp))
        .collect();
    let mut held = Vec::new();
    for i in 0..STALLED_FLOWS {
        let port = ports[i % ports.len()];
        let mut s = TcpStream::connect(port).await.unwrap();
        // One byte so the flow is open end to end; then never read.
        s.write_all(b"x").await.unwrap();
        held.push(s);
    }
    let relayed = settle(&w.im, "to_agent").await;
    let (ok, worst) = alice_round_trips(&w).await;
    let waits = metric(
        &w.connector.daemon.metrics.common.render(),
        "ztna_connector_credit_waits_total",
        &[],
    );
    eprintln!(
        "mallory holds {STALLED_FLOWS} unread downloads ({} MiB relayed to its agents before they stalled); alice: {ok}/20 round trips, slowest {worst:?}; connector credit waits {waits}",
        relayed as u64 >> 20
    );
    assert_eq!(
        ok, 20,
        "alice's flows on the shared connector stalled (slowest {worst:?})"
    );
    assert!(waits > 0.0, "mallory's downloads never hit their budget");
    drop(held);
}

/// A connector that predates flow credit (it never sends CreditReports) still gets flows in the
/// old format: FlowOpen, then payload, no FlowAgent frame; and bytes pass both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_without_flow_credit_get_flows_in_the_old_format() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let tls = pki.issue("connector", "old-1");
    let (_ep, conn) = raw_connect(&tls, Role::Connector, im.addr)
        .await
        .expect("connect");
    let (mut send, recv) = conn.open_bi().await.expect("control stream");
    let mut recv = FramedRecv::new(recv);
    let hello = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Connector,
        software: "ztna-connector/0.1.0".into(),
        watch: vec![],
    };
    write_frame(&mut send, &hello).await.unwrap();
    match recv.expect::<ServerMsg>(T).await.expect("welcome") {
        ServerMsg::Welcome { version, .. } => assert!(version >= 2, "revision {version}"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let register = ClientMsg::Register {
        service: "web".into(),
        tcp: true,
        udp: false,
    };
    write_frame(&mut send, &register).await.unwrap();
    match recv.expect::<ServerMsg>(T).await.expect("registered") {
        ServerMsg::Registered { .. } => {}
        other => panic!("expected Registered, got {other:?}"),
    }
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ztna_proto::ServiceState::Available)
        .await;
    let port = a.port("web", Protocol::Tcp);
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        back
    });
    let (mut fs, fr) = tokio::time::timeout(T, conn.accept_bi())
        .await
        .expect("a flow arrives")
        .expect("stream");
    let mut fr = FramedRecv::new(fr);
    let open = fr.expect::<FlowOpen>(T).await.expect("FlowOpen");
    assert_eq!(open.service, "web");
    write_frame(&mut fs, &FlowReply::Accept).await.unwrap();
    let (mut raw, prefix) = fr.into_parts();
    let mut got = prefix.to_vec();
    while got.len() < 4 {
        let chunk = tokio::time::timeout(T, raw.read_chunk(64, true))
            .await
            .expect("payload")
            .expect("read")
            .expect("not finished");
        got.extend_from_slice(&chunk.bytes);
    }
    assert_eq!(&got, b"ping", "payload follows FlowOpen directly");
    fs.write_all(b"pong").await.unwrap();
    let back = tokio::time::timeout(T, client).await.unwrap().unwrap();
    assert_eq!(&back, b"pong");
}

/// A UDP backend that answers every datagram with `count` datagrams of 8 KiB (too large for a
/// QUIC datagram: they ride the flow's stream).
async fn udp_blaster(count: usize) -> (SocketAddr, JoinHandle<()>) {
    let s = Arc::new(tokio::net::UdpSocket::bind(loopback0()).await.unwrap());
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = s.recv_from(&mut buf).await {
            let s = s.clone();
            tokio::spawn(async move {
                let big = vec![0xabu8; 8192];
                for _ in 0..count {
                    if s.send_to(&big, from).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
    });
    (addr, task)
}

/// Mallory (a crafted agent) opens UDP flows to a backend that answers with a flood of 8 KiB
/// datagrams, too large for QUIC datagrams, so they ride each flow's stream, and never reads
/// those streams. UDP flows have no flow credit: the relay must not let her unread payloads
/// fill the connector connection's window that alice's flows share. It drops what she does not
/// take (`stream_full`), and alice's round trips through the same connector keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_udp_streams_of_one_agent_do_not_stop_another_agents_flows() {
    use ztna_integration::hostile::{open_flow, FlowOutcome};
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    // 8 flows x 4,000 x 8 KiB = 250 MiB offered: far past the 64 MiB connector window.
    let (blaster, _b) = udp_blaster(4000).await;
    let im = start_intermediate(&pki, open_policy(&["web", "blast"]));
    let mut c = start_connector(
        &pki,
        "shared-1",
        &[im.addr],
        &[("web", Some(echo), None), ("blast", None, Some(blaster))],
    );
    c.wait_registered(1).await;
    let mut alice = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    alice
        .wait_status("web", ztna_proto::ServiceState::Available)
        .await;
    let mallory = ztna_integration::hostile::Creds {
        tls: pki.issue("agent", "mallory"),
        role: Role::Agent,
    };
    let ep = ztna_integration::hostile::client_endpoint(im.addr).unwrap();
    let session = ztna_integration::hostile::session(
        &ep,
        &mallory.client_config().unwrap(),
        im.addr,
        Role::Agent,
        vec!["blast".into()],
        T,
    )
    .await
    .expect("mallory's session");
    let conn = session.conn.clone();
    let mut held = Vec::new();
    let mut arena = bytes::BytesMut::new();
    for flow_id in 1..=8u64 {
        let open = FlowOpen {
            service: "blast".into(),
            protocol: Protocol::Udp,
            flow_id,
        };
        match open_flow(&conn, &open, false, T).await {
            FlowOutcome::Accepted(s, r) => held.push((s, r)),
            _ => panic!("mallory's UDP flow {flow_id} was not accepted"),
        }
        let go = ztna_proto::datagram::encode_into(&mut arena, flow_id, b"go").unwrap();
        conn.send_datagram(go).unwrap();
    }
    let relayed = until_stable(|| {
        metric(
            &c.daemon.metrics.common.render(),
            "ztna_connector_bytes_total",
            &[("service", "blast"), ("direction", "to_agent")],
        )
    })
    .await;
    let (ok, worst) = victim(alice.port("web", Protocol::Tcp), 20, Duration::from_secs(3)).await;
    let dropped = metric(
        &im.daemon.metrics.common.render(),
        "ztna_intermediate_datagrams_dropped_total",
        &[("reason", "stream_full")],
    );
    println!(
        "MEASURED mallory's 8 unread UDP flows: {} MiB sent by the connector, {dropped} payloads \
         dropped at the relay (stream_full); alice: {ok}/20 round trips, slowest {worst:?}",
        relayed as u64 >> 20
    );
    assert_eq!(
        ok, 20,
        "alice's flows on the shared connector stalled (slowest {worst:?})"
    );
    assert!(dropped > 0.0, "nothing was dropped for mallory");
    drop(held);
    alice.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

//! UDP flows share their connection's datagram send buffer fairly: on a path slower than what
//! one flow sends (a bulk transfer, a video burst), a light flow on the same connection (DNS-like
//! queries) is not starved with it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

/// A UDP backend that answers a datagram holding a number N with N datagrams of 1200 bytes,
/// sent over the next 200 ms at a steady pace (a stream at N × 6 KB/s).
async fn blaster() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let s = std::sync::Arc::new(UdpSocket::bind(loopback0()).await.unwrap());
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let count: u32 = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            let s = s.clone();
            tokio::spawn(async move {
                let payload = [7u8; 1200];
                let per_ms = count.div_ceil(200);
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut left = count;
                while left > 0 {
                    tick.tick().await;
                    for _ in 0..per_ms.min(left) {
                        let _ = s.send_to(&payload, from).await;
                    }
                    left = left.saturating_sub(per_ms);
                }
            });
        }
    });
    (addr, task)
}

/// Size of a query and of its answer (a large DNS answer, a game or VoIP packet with room to
/// spare): a datagram that needs as much of the send buffer's free space as the bulk flow's.
const QUERY: usize = 1000;

fn full_drops(text: &str, name: &str) -> f64 {
    metric(text, name, &[("reason", "send_buffer_full")])
}

/// An intermediate whose connector reaches it over a 2.5 MB/s path (5 ms each way), serving
/// `light` (name, TCP backend, UDP backend) and the UDP service "bulk" at `bulk`, and an agent
/// forwarding both (`light` over `protocol`), both services available.
async fn congested_chain(
    pki: &Pki,
    light: (
        &str,
        Option<std::net::SocketAddr>,
        Option<std::net::SocketAddr>,
    ),
    protocol: ForwardProtocol,
    bulk: std::net::SocketAddr,
) -> (
    IntermediateHandle,
    ztna_integration::proxy::Proxy,
    ConnectorHandle,
    AgentHandle,
) {
    let im = start_intermediate(pki, open_policy(&[light.0, "bulk"]));
    let path = ztna_integration::proxy::start(im.addr, Duration::from_millis(5))
        .await
        .unwrap();
    path.set_rate(2_500_000);
    let mut c = start_connector(
        pki,
        "c-1",
        &[path.addr],
        &[light, ("bulk", None, Some(bulk))],
    );
    c.wait_registered(1).await;
    let mut a = start_agent(
        pki,
        "alice",
        &[im.addr],
        &[(light.0, protocol), ("bulk", ForwardProtocol::Udp)],
    )
    .await;
    a.wait_status(light.0, ServiceState::Available).await;
    a.wait_status("bulk", ServiceState::Available).await;
    (im, path, c, a)
}

/// The connector reaches the intermediate over a 2.5 MB/s path (20 Mbit/s, 5 ms each way). A
/// bulk UDP flow gets a steady 12 MB/s from its backend (almost five times the path)
/// while a second flow of the same agent sends a 1000-byte query every 5 ms for 3 s. The queries' answers
/// share the connector's connection with the bulk flow's datagrams: at least 90 % of them must
/// come back, within 150 ms (p50), while the bulk flow fills the path and has its excess
/// dropped (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_udp_flow_does_not_starve_a_query_flow_on_a_congested_path() {
    logs();
    let pki = Pki::new();
    let (echo, _seen, _e) = udp_echo().await;
    let (bulk, _b) = blaster().await;
    let (im, path, c, a) =
        congested_chain(&pki, ("dns", None, Some(echo)), ForwardProtocol::Udp, bulk).await;

    let q = Arc::new(UdpSocket::bind(loopback0()).await.unwrap());
    q.connect(a.port("dns", Protocol::Udp)).await.unwrap();
    assert!(udp_round_trip(&q, b"warm-up").await.is_some());
    let b = Arc::new(UdpSocket::bind(loopback0()).await.unwrap());
    b.connect(a.port("bulk", Protocol::Udp)).await.unwrap();
    let bulk_bytes = Arc::new(AtomicU64::new(0));
    let reader = {
        let (b, bulk_bytes) = (b.clone(), bulk_bytes.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = b.recv(&mut buf).await {
                bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let answered: Arc<Mutex<HashSet<u64>>> = Arc::default();
    // When each query left, and how long each answer took.
    let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let took: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let answers = {
        let (q, answered) = (q.clone(), answered.clone());
        let (sent_at, took) = (sent_at.clone(), took.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = q.recv(&mut buf).await {
                if n != QUERY {
                    continue;
                }
                if let Ok(seq) = <[u8; 8]>::try_from(&buf[..8]) {
                    let seq = u64::from_be_bytes(seq);
                    if ztna_node::lock(&answered).insert(seq) {
                        if let Some(t) = ztna_node::lock(&sent_at).get(seq as usize) {
                            ztna_node::lock(&took).push(t.elapsed());
                        }
                    }
                }
            }
        })
    };
    let drops = || {
        (
            full_drops(
                &c.daemon.metrics.common.render(),
                "ztna_connector_udp_dropped_total",
            ),
            full_drops(
                &im.daemon.metrics.common.render(),
                "ztna_intermediate_udp_dropped_total",
            ),
        )
    };
    let before = drops();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut next_bulk = t0;
    while t0.elapsed() < Duration::from_secs(3) {
        if Instant::now() >= next_bulk {
            b.send(b"2000").await.unwrap();
            next_bulk += Duration::from_millis(200);
        }
        let mut query = [0u8; QUERY];
        query[..8].copy_from_slice(&sent.to_be_bytes());
        ztna_node::lock(&sent_at).push(Instant::now());
        q.send(&query).await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = answered.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
    let after = drops();
    let mib = bulk_bytes.load(Ordering::Relaxed) as f64 / 1048576.0;
    let fraction = got as f64 / sent as f64;
    let mut took = ztna_node::lock(&took).clone();
    took.sort();
    let at =
        |q: f64| took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1)));
    let (p50, p90) = (
        at(0.5).copied().unwrap_or(Duration::MAX),
        at(0.9).copied().unwrap_or(Duration::MAX),
    );
    println!(
        "MEASURED queries answered {got}/{sent} ({fraction:.3}) in {p50:.0?} (p50) / {p90:.0?} (p90) beside a bulk flow that got {mib:.1} MiB in 3 s over a 2.5 MB/s path; send_buffer_full drops: connector {}, intermediate {}; policed at the path {}",
        after.0 - before.0,
        after.1 - before.1,
        path.stats().policed.load(Ordering::Relaxed)
    );
    assert!(
        after.0 - before.0 > 0.0,
        "the bulk flow never filled the connector's send buffer: the test proves nothing"
    );
    assert!(
        fraction >= 0.9,
        "the bulk flow starved the queries: {got}/{sent} answered"
    );
    // Nor did they wait behind its queue: the path's 10 ms round trip plus the 64 KiB a heavy
    // flow may queue (26 ms here; a full 1 MiB buffer would be 400 ms), with room for a loaded
    // machine.
    assert!(
        p50 <= Duration::from_millis(150),
        "the queries waited behind the bulk flow's queue: {p50:?} (p50)"
    );
    reader.abort();
    answers.abort();
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// A TCP backend that sends zeros to every client as fast as it reads them (a download).
async fn tcp_source() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let chunk = [0u8; 16 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    (addr, task)
}

/// Reads from `s` until `stop`, counting into `n`.
async fn count_into(mut s: tokio::net::TcpStream, n: Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(k) = s.read(&mut buf).await {
        if k == 0 {
            break;
        }
        n.fetch_add(k as u64, Ordering::Relaxed);
    }
}

/// The same 2.5 MB/s path between connector and intermediate carries a TCP download (scp, a
/// package mirror) and a bulk UDP flow at almost five times the path's rate. quinn writes queued
/// datagrams into each packet before stream data, so while the UDP flow keeps a queue the
/// download would get only the room packets have left (a seventh of them with 1200-byte
/// datagrams). Both must get a fair part of the path: each at least a quarter of what the path
/// carried for the two, and the download at least a third of what it got alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_udp_flow_does_not_starve_a_tcp_download_on_the_same_connection() {
    logs();
    let pki = Pki::new();
    let (source, _s) = tcp_source().await;
    let (bulk, _b) = blaster().await;
    let (im, _path, c, a) = congested_chain(
        &pki,
        ("files", Some(source), None),
        ForwardProtocol::Tcp,
        bulk,
    )
    .await;

    let tcp_bytes = Arc::new(AtomicU64::new(0));
    let download = tokio::net::TcpStream::connect(a.port("files", Protocol::Tcp))
        .await
        .unwrap();
    let reader_tcp = tokio::spawn(count_into(download, tcp_bytes.clone()));
    // The download alone, once it is past slow start.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t = tcp_bytes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let alone = (tcp_bytes.load(Ordering::Relaxed) - t) as f64 / 2.0;

    let b = Arc::new(UdpSocket::bind(loopback0()).await.unwrap());
    b.connect(a.port("bulk", Protocol::Udp)).await.unwrap();
    let udp_bytes = Arc::new(AtomicU64::new(0));
    let reader_udp = {
        let (b, udp_bytes) = (b.clone(), udp_bytes.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = b.recv(&mut buf).await {
                udp_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let t0 = Instant::now();
    let mut next_bulk = t0;
    let mut counted = None;
    while t0.elapsed() < Duration::from_secs(4) {
        // Measure over the last 3 s, once the UDP flow's queue stands.
        if counted.is_none() && t0.elapsed() >= Duration::from_secs(1) {
            counted = Some((
                Instant::now(),
                tcp_bytes.load(Ordering::Relaxed),
                udp_bytes.load(Ordering::Relaxed),
            ));
        }
        b.send(b"2000").await.unwrap();
        next_bulk += Duration::from_millis(200);
        tokio::time::sleep_until(next_bulk.into()).await;
    }
    let (since, tcp0, udp0) = counted.unwrap();
    let secs = since.elapsed().as_secs_f64();
    let tcp = (tcp_bytes.load(Ordering::Relaxed) - tcp0) as f64 / secs;
    let udp = (udp_bytes.load(Ordering::Relaxed) - udp0) as f64 / secs;
    let both = tcp + udp;
    println!(
        "MEASURED over a 2.5 MB/s path: download alone {:.2} MB/s; beside bulk UDP (12 MB/s offered) download {:.2} MB/s, UDP {:.2} MB/s (download {:.2} of the two)",
        alone / 1e6,
        tcp / 1e6,
        udp / 1e6,
        tcp / both
    );
    assert!(
        alone > 1_000_000.0,
        "the download alone got only {alone:.0} B/s: the path or the test is broken"
    );
    assert!(
        tcp >= both / 4.0 && tcp >= alone / 3.0,
        "the UDP flow starved the download: {tcp:.0} B/s beside {udp:.0} B/s of UDP (alone {alone:.0})"
    );
    assert!(
        udp >= both / 4.0,
        "the download starved the UDP flow: {udp:.0} B/s beside {tcp:.0} B/s"
    );
    reader_tcp.abort();
    reader_udp.abort();
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

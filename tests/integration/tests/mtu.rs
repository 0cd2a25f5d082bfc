//! Path MTU after a (real or apparent) black hole: with the daemons' transport settings, full-size
//! packets are allowed again within seconds once the path carries them, not after quinn's default
//! 60 s cooldown (during which every UDP payload above ~1150 bytes rides the flow's stream).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use ztna_integration::*;
use ztna_node::identity::Identity;
use ztna_node::transport;
use ztna_proto::Role;

/// Datagrams above this many bytes are dropped while the black hole is on.
const HOLE_ABOVE: usize = 1250;
/// A QUIC datagram payload this large needs a path that carries packets above `HOLE_ABOVE`.
const FULL: usize = 1300;

/// Polls until `cond` holds (every 20 ms, at most `limit`); how long it took.
async fn until(limit: Duration, cond: impl Fn() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_size_packets_return_within_seconds_after_a_black_hole() {
    logs();
    let pki = Pki::new();
    let opts = intermediate_config(&pki, loopback0(), Vec::new()).transport();
    let server_id = Identity::load(&pki.issue("intermediate", "mtu"), Role::Intermediate).unwrap();
    let client_id = Identity::load(&pki.issue("agent", "mtu"), Role::Agent).unwrap();

    let server_cfg = transport::server_config(&server_id, &[Role::Agent], &opts).unwrap();
    let server = quinn::Endpoint::new(
        transport::restart_aware_endpoint_config(&server_id),
        Some(server_cfg),
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let server_addr = server.local_addr().unwrap();
    // The server drains whatever the client streams at it.
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((_send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(_)) = recv.read_chunk(1 << 16, true).await {}
                    });
                }
            });
        }
    });

    // A black hole when switched on: every UDP payload above `HOLE_ABOVE` is dropped, both ways.
    let hole = ztna_integration::proxy::start(server_addr, Duration::ZERO)
        .await
        .unwrap();
    let via = hole.addr;
    let client_cfg = transport::client_config(&client_id, Role::Intermediate, &opts).unwrap();
    let ep = transport::client_endpoint(transport::DUAL_STACK_ANY).unwrap();
    let conn = ep
        .connect_with(client_cfg, via, "ztna-intermediate")
        .unwrap()
        .await
        .unwrap();
    // Bulk data keeps full-size packets on the path the whole time.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![0x5a; 64 * 1024]);
        while send.write_chunk(chunk.clone()).await.is_ok() {}
    });
    let fits = |c: &quinn::Connection| c.max_datagram_size().unwrap_or(0) >= FULL;

    let found = until(Duration::from_secs(10), || fits(&conn)).await;
    assert!(
        found.is_some(),
        "path MTU discovery never allowed a {FULL}-byte datagram"
    );

    hole.set_max_datagram(HOLE_ABOVE);
    let fell = until(Duration::from_secs(10), || !fits(&conn)).await;
    assert!(fell.is_some(), "the black hole was never detected");
    tokio::time::sleep(Duration::from_millis(500)).await;
    hole.set_max_datagram(0);

    let back = until(Duration::from_secs(15), || fits(&conn)).await;
    println!(
        "MEASURED mtu: discovered in {found:?}, black hole detected {fell:?} after it opened, \
         {FULL}-byte datagrams fit again {back:?} after it closed"
    );
    let back = back.expect("full-size datagrams did not fit again within 15 s of the path healing");
    assert!(
        back <= transport::MTU_BLACK_HOLE_COOLDOWN + Duration::from_secs(2),
        "took {back:?}"
    );
    writer.abort();
    conn.close(0u32.into(), b"done");
}

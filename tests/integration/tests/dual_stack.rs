//! Dual stack by default: agents and connectors reach an intermediate that listens on IPv6 only,
//! connection attempts race over every address (happy eyeballs), and IPv4 peers seen through a
//! dual-stack socket are reported as plain IPv4.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_integration::*;
use ztna_proto::{ClientMsg, Protocol, Role, ServerMsg, PROTOCOL_VERSION};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_relay_with_default_bind() {
    logs();
    let pki = Pki::new();
    let v6: SocketAddr = "[::1]:0".parse().unwrap();
    let im = start_intermediate_with(intermediate_config(&pki, v6, open_policy(&["web"])));
    assert!(im.addr.is_ipv6(), "{}", im.addr);
    let (echo, _e) = tcp_echo().await;
    // No `bind` in either config: the default must reach an IPv6 relay.
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ztna_proto::ServiceState::Available)
        .await;
    let got = tcp_roundtrip(a.port("web", Protocol::Tcp), b"over ipv6")
        .await
        .expect("flow through the IPv6 relay");
    assert_eq!(got, b"over ipv6");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_eyeballs_moves_on_from_a_silent_address() {
    logs();
    let pki = Pki::new();
    let v6: SocketAddr = "[::1]:0".parse().unwrap();
    let im = start_intermediate_with(intermediate_config(&pki, v6, open_policy(&["web"])));
    let tls = pki.issue("agent", "alice");
    let identity = ztna_node::Identity::load(&tls, Role::Agent).unwrap();
    let client = ztna_node::transport::client_config(
        &identity,
        Role::Intermediate,
        &ztna_node::transport::TransportOptions::default(),
    )
    .unwrap();
    let ep = ztna_node::transport::client_endpoint(ztna_node::transport::DUAL_STACK_ANY).unwrap();
    // A name that resolves to an IPv4 address where nothing answers QUIC, then the relay.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addrs = vec![silent.local_addr().unwrap(), im.addr];
    let t0 = Instant::now();
    let conn = ztna_node::client::connect_any(
        &ep,
        &client,
        "relay.test:4433",
        addrs.clone(),
        "relay.test",
        Duration::from_secs(5),
    )
    .await
    .expect("the second address answers");
    let took = t0.elapsed();
    assert_eq!(conn.remote_address(), im.addr);
    // The second attempt started after the attempt delay, not after the first one timed out.
    assert!(
        took >= ztna_node::client::ATTEMPT_DELAY && took < Duration::from_secs(2),
        "{took:?}"
    );
    println!("MEASURED happy eyeballs: connected via the second address after {took:?}");

    // Nothing answers anywhere: the error names every address.
    let none = vec![silent.local_addr().unwrap()];
    let err = ztna_node::client::connect_any(
        &ep,
        &client,
        "relay.test:4433",
        none,
        "relay.test",
        Duration::from_millis(600),
    )
    .await
    .unwrap_err();
    assert!(err.contains("did not complete within"), "{err}");
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_peer_of_a_dual_stack_relay_is_reported_as_ipv4() {
    logs();
    let pki = Pki::new();
    let any6: SocketAddr = "[::]:0".parse().unwrap();
    let im = start_intermediate_with(intermediate_config(&pki, any6, open_policy(&["web"])));
    let v4: SocketAddr = SocketAddr::from(([127, 0, 0, 1], im.addr.port()));
    let tls = pki.issue("agent", "bob");
    let (ep, conn) = raw_connect(&tls, Role::Agent, v4)
        .await
        .expect("IPv4 client reaches a relay listening on [::]");
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = ztna_node::io::FramedRecv::new(recv);
    ztna_node::io::write_frame(
        &mut send,
        &ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Agent,
            software: "test".into(),
            watch: vec![],
        },
    )
    .await
    .unwrap();
    let reply: ServerMsg = recv.expect(Duration::from_secs(5)).await.unwrap();
    let ServerMsg::Welcome { observed_addr, .. } = reply else {
        panic!("expected Welcome, got {reply:?}");
    };
    assert_eq!(observed_addr, ep.local_addr().unwrap());
    assert!(observed_addr.is_ipv4(), "{observed_addr}");
    im.daemon.shutdown().await;
}

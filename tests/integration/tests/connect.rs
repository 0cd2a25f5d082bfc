//! How long an agent or connector waits for a relay's handshake: a relay that answered (here: a
//! QUIC Retry, as an intermediate sheds load in a reconnect storm) gets
//! `ANSWERED_CONNECT_TIMEOUT`; a silent address still fails after `CONNECT_TIMEOUT`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_integration::*;
use ztna_node::backoff::{ANSWERED_CONNECT_TIMEOUT, CONNECT_TIMEOUT};
use ztna_node::transport::{client_config, client_endpoint, server_config, TransportOptions};
use ztna_node::{client, Identity};
use ztna_proto::Role;

fn configs(pki: &Pki) -> (quinn::ServerConfig, quinn::ClientConfig) {
    let opts = TransportOptions::default();
    let im = Identity::load(&pki.issue("intermediate", "im-busy"), Role::Intermediate).unwrap();
    let agent = Identity::load(&pki.issue("agent", "alice"), Role::Agent).unwrap();
    (
        server_config(&im, &[Role::Agent], &opts).unwrap(),
        client_config(&agent, Role::Intermediate, &opts).unwrap(),
    )
}

/// An agent's or connector's connect to `addr` (its own endpoint and timeout), and how long it
/// took.
async fn connect(
    client_cfg: &quinn::ClientConfig,
    addr: SocketAddr,
) -> (Result<quinn::Connection, String>, Duration) {
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let t = Instant::now();
    let got = client::connect_any(
        &ep,
        client_cfg,
        "test relay",
        vec![addr],
        "ztna-intermediate",
        CONNECT_TIMEOUT,
    )
    .await;
    (got, t.elapsed())
}

/// A relay that answers every new attempt with a Retry at once and then takes `busy` before it
/// handles the handshake: what a client sees of an intermediate working through a storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_answered_with_a_retry_gets_longer_than_the_connect_timeout() {
    let pki = Pki::new();
    let (server, client_cfg) = configs(&pki);
    let relay = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = relay.local_addr().unwrap();
    // Past the connect timeout, within the idle timeout (5 s without a packet ends any attempt).
    let busy = CONNECT_TIMEOUT + Duration::from_secs(1);
    let serve = tokio::spawn(async move {
        while let Some(incoming) = relay.accept().await {
            if !incoming.remote_address_validated() {
                incoming.retry().unwrap();
                continue;
            }
            tokio::time::sleep(busy).await;
            let conn = incoming.accept().unwrap().await.unwrap();
            // Hold it until the client has seen it established.
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            return;
        }
    });
    let (got, took) = connect(&client_cfg, addr).await;
    let conn = got.unwrap_or_else(|e| panic!("not connected after {took:?}: {e}"));
    assert!(
        took >= busy && took < ANSWERED_CONNECT_TIMEOUT,
        "connected after {took:?}; the relay was busy for {busy:?}"
    );
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_address_fails_after_the_connect_timeout() {
    let pki = Pki::new();
    let (_, client_cfg) = configs(&pki);
    // Bound, so nothing answers with an ICMP error either: Initials just vanish.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let (got, took) = connect(&client_cfg, addr).await;
    let err = got
        .err()
        .unwrap_or_else(|| panic!("connected to a silent socket"));
    assert!(
        took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(1),
        "gave up after {took:?} ({err})"
    );
    assert!(
        err.contains(&format!("did not complete within {CONNECT_TIMEOUT:?}")),
        "{err}"
    );
}

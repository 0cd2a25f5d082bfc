//! How long an agent or connector waits for a relay's handshake: a relay that answered (here: a
//! QUIC Retry, as an intermediate sheds load in a reconnect storm) gets
//! `ANSWERED_CONNECT_TIMEOUT`; a silent address still fails after `CONNECT_TIMEOUT`. After the
//! handshake, a relay that confirmed it gets `WELCOME_TIMEOUT` for a slow Welcome; one that never
//! confirmed it gets `CONNECT_TIMEOUT`. And what an agent does with datagrams from its relay that
//! it cannot place (the stand-in relay sends them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_integration::*;
use ztna_node::backoff::{ANSWERED_CONNECT_TIMEOUT, CONNECT_TIMEOUT, WELCOME_TIMEOUT};
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::transport::{client_config, client_endpoint, server_config, TransportOptions};
use ztna_node::{client, Identity};
use ztna_proto::{ClientMsg, Role, ServerMsg, PROTOCOL_REVISION};

fn configs(pki: &Pki) -> (quinn::ServerConfig, quinn::ClientConfig) {
    let opts = TransportOptions::default();
    let im = Identity::load(&pki.issue("intermediate", "im-busy"), Role::Intermediate).unwrap();
    let agent = Identity::load(&pki.issue("agent", "alice"), Role::Agent).unwrap();
    (
        server_config(&im, &[Role::Agent], &opts).unwrap(),
        client_config(&agent, Role::Intermediate, &opts).unwrap(),
    )
}

/// A stand-in intermediate (a bare quinn server with an intermediate's identity) whose behaviour
/// each test scripts, its address, and an agent's client config for it.
fn fake_relay(pki: &Pki) -> (quinn::Endpoint, SocketAddr, quinn::ClientConfig) {
    let (server, client_cfg) = configs(pki);
    let relay = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = relay.local_addr().unwrap();
    (relay, addr, client_cfg)
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
    let (relay, addr, client_cfg) = fake_relay(&pki);
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

/// An intermediate that completes the handshake at once but answers Hello only after `busy`
/// (past the connect timeout): what an agent sees of a relay whose first Welcomes take seconds
/// in a reconnect storm. A real agent must wait for it, not close the connection and dial again
/// (which would throw the handshake away and add another to the relay's queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_a_slow_welcome_instead_of_dialling_again() {
    let pki = Pki::new();
    let (relay, addr, _) = fake_relay(&pki);
    let busy = CONNECT_TIMEOUT + Duration::from_secs(1);
    assert!(busy < WELCOME_TIMEOUT);
    let dialled = Arc::new(AtomicUsize::new(0));
    let count = dialled.clone();
    let serve = tokio::spawn(async move {
        while let Some(incoming) = relay.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(conn) = incoming.accept().unwrap().await else {
                    return;
                };
                let Some((_send, mut recv)) = welcome_after(&conn, busy).await else {
                    return;
                };
                // Read whatever the agent says next until it leaves.
                while let Ok(Some(_)) = recv.next::<ClientMsg>().await {}
            });
        }
    });
    let agent = start_agent(&pki, "alice", &[addr], &[("web", ForwardProtocol::Tcp)]).await;
    let connected = eventually(busy + Duration::from_secs(3), || {
        agent.daemon.metrics.intermediates_connected.get() == 1
    })
    .await;
    let n = dialled.load(Ordering::SeqCst);
    assert!(
        connected,
        "the agent never got connected to a relay that welcomes after {busy:?} ({n} connections)"
    );
    assert_eq!(
        n, 1,
        "the agent dialled again instead of waiting for Welcome"
    );
    agent.daemon.shutdown().await;
    serve.abort();
}

/// A UDP path to `server` that carries the client's datagrams only until the server first
/// answers: the server's flight reaches the client (whose handshake then completes), but the
/// client's Finished and everything after it are lost, so the server never confirms.
async fn lost_after_first_answer(server: SocketAddr) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut client = None;
        let mut answered = false;
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    if !answered {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { return };
                    answered = true;
                    if let Some(to) = client {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    addr
}

/// The other side of the Welcome wait: a relay that never confirmed our handshake (our last
/// handshake packet lost; its retransmission can be many seconds away after a storm's inflated
/// first RTT sample) is given only the connect timeout, and the agent starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_confirmed_the_handshake_gets_only_the_connect_timeout_for_welcome() {
    let pki = Pki::new();
    let (relay, addr, client_cfg) = fake_relay(&pki);
    let path = lost_after_first_answer(addr).await;
    let serve = tokio::spawn(async move {
        while let Some(incoming) = relay.accept().await {
            // Never completes: the client's Finished does not arrive.
            tokio::spawn(async move { incoming.accept().unwrap().await });
        }
    });
    let (got, took) = connect(&client_cfg, path).await;
    let conn =
        got.unwrap_or_else(|e| panic!("the client's side did not complete after {took:?}: {e}"));
    let t = Instant::now();
    let said = client::hello(&conn, Role::Agent, "test".into(), vec![], CONNECT_TIMEOUT).await;
    let took = t.elapsed();
    assert!(
        said.is_err(),
        "welcomed by a relay that never confirmed the handshake"
    );
    assert!(
        took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(1),
        "gave up on Welcome after {took:?}, the connect timeout is {CONNECT_TIMEOUT:?}"
    );
    serve.abort();
}

/// Datagrams from a relay that name no flow of the agent, or carry no valid flow id, are counted
/// by reason at the agent (`unknown_flow`, `malformed`) and logged, and the agent stays
/// connected. (A real intermediate only forwards datagrams of flows it knows; a relay of another
/// version, or a flow that ended at the agent while the backend still answered, is what sends
/// them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_counts_datagrams_from_its_relay_it_cannot_place() {
    logs();
    let pki = Pki::new();
    let (relay, addr, _) = fake_relay(&pki);
    let (welcomed_tx, welcomed_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let Some(incoming) = relay.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else {
            return;
        };
        let Some((_send, mut recv)) = welcome_after(&conn, Duration::ZERO).await else {
            return;
        };
        let _ = welcomed_tx.send(conn.clone());
        // Read whatever the agent says next until it leaves.
        while let Ok(Some(_)) = recv.next::<ClientMsg>().await {}
    });
    let a = start_agent(&pki, "alice", &[addr], &[("dns", ForwardProtocol::Udp)]).await;
    let conn = tokio::time::timeout(Duration::from_secs(10), welcomed_rx)
        .await
        .expect("the agent reached the stand-in relay")
        .expect("welcomed");
    let (unknown, malformed) = stray_datagrams_counted(
        &conn,
        3,
        || a.daemon.metrics.common.render(),
        "ztna_agent_udp_dropped_total",
    )
    .await;
    println!(
        "MEASURED 3 unknown-flow and 3 malformed datagrams from the relay: unknown_flow {unknown}, malformed {malformed}"
    );
    assert!(
        unknown >= 3.0 && malformed >= 3.0,
        "unknown_flow {unknown}, malformed {malformed} (3 each sent)"
    );
    assert!(
        conn.close_reason().is_none(),
        "the agent left the relay over stray datagrams: {:?}",
        conn.close_reason()
    );
    a.daemon.shutdown().await;
    server.abort();
}

/// The stand-in relay's side of Hello: reads the agent's Hello (within 10 s) and, `delay` later,
/// welcomes agent alice. The control stream, kept open by the caller (the agent reads it).
async fn welcome_after(
    conn: &quinn::Connection,
    delay: Duration,
) -> Option<(quinn::SendStream, FramedRecv)> {
    let (mut send, recv) = conn.accept_bi().await.ok()?;
    let mut recv = FramedRecv::new(recv);
    let Ok(ClientMsg::Hello { .. }) = recv.expect::<ClientMsg>(Duration::from_secs(10)).await
    else {
        return None;
    };
    tokio::time::sleep(delay).await;
    let welcome = ServerMsg::Welcome {
        version: PROTOCOL_REVISION,
        identity: Pki::id("agent", "alice"),
        observed_addr: conn.remote_address(),
    };
    write_frame(&mut send, &welcome).await.ok()?;
    Some((send, recv))
}

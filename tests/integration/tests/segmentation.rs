//! Segmentation offload only for bulk senders (`ztna_node::gso`): a relay's idle connections send
//! one packet per transmit, so quinn never gives them its ten-packet transmit buffer, while a
//! connection carrying a bulk transfer still sends GSO batches.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use ztna_integration::*;
use ztna_node::identity::Identity;
use ztna_node::transport;
use ztna_proto::Role;

/// A server socket that notes every transmit it sends: its bytes and whether it was a GSO batch.
struct Recorder {
    inner: Arc<dyn AsyncUdpSocket>,
    sent: Arc<Mutex<Vec<(usize, bool)>>>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Recorder")
    }
}

impl AsyncUdpSocket for Recorder {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }
    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.inner.try_send(t)?;
        let batch = t.segment_size.is_some_and(|s| s < t.contents.len());
        ztna_node::lock(&self.sent).push((t.contents.len(), batch));
        Ok(())
    }
    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }
    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }
    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// What the server sent: during the handshake and an idle second, then for a 4 MiB download.
struct Sent {
    idle: Vec<(usize, bool)>,
    bulk: Vec<(usize, bool)>,
    gso_available: bool,
}

/// A relay-like server (the intermediate's certificate and transport settings) on `runtime`, a
/// client that connects, exchanges a few bytes, idles for a second, then downloads 4 MiB.
async fn serve(bulk_only: bool) -> Sent {
    let pki = Pki::new();
    let opts = intermediate_config(&pki, loopback0(), Vec::new()).transport();
    let server_id = Identity::load(&pki.issue("intermediate", "gso"), Role::Intermediate).unwrap();
    let client_id = Identity::load(&pki.issue("agent", "gso"), Role::Agent).unwrap();
    let server_cfg = transport::server_config(&server_id, &[Role::Agent], &opts).unwrap();

    let runtime: Arc<dyn quinn::Runtime> = if bulk_only {
        ztna_node::gso::Runtime::shared()
    } else {
        Arc::new(quinn::TokioRuntime)
    };
    let plain = runtime
        .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let gso_available = plain.max_transmit_segments() > 1;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let recorder: Arc<dyn AsyncUdpSocket> = Arc::new(Recorder {
        inner: plain,
        sent: sent.clone(),
    });
    let socket: Arc<dyn AsyncUdpSocket> = if bulk_only {
        Arc::new(ztna_node::gso::Socket::new(recorder))
    } else {
        recorder
    };
    let server = quinn::Endpoint::new_with_abstract_socket(
        transport::restart_aware_endpoint_config(&server_id),
        Some(server_cfg),
        socket,
        runtime,
    )
    .unwrap();
    let server_addr = server.local_addr().unwrap();
    // The server answers a one-byte request "s" with a few bytes, "b" with 4 MiB.
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut req = [0u8; 1];
                    if recv.read_exact(&mut req).await.is_err() {
                        return;
                    }
                    let body = if req[0] == b'b' {
                        vec![0x5a; 4 << 20]
                    } else {
                        b"welcome".to_vec()
                    };
                    let _ = send.write_all(&body).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            });
        }
    });

    let client_cfg = transport::client_config(&client_id, Role::Intermediate, &opts).unwrap();
    let ep = transport::client_endpoint(transport::DUAL_STACK_ANY).unwrap();
    let conn = ep
        .connect_with(client_cfg, server_addr, "ztna-intermediate")
        .unwrap()
        .await
        .unwrap();
    let ask = |what: u8| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&[what]).await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(8 << 20).await.unwrap().len()
        }
    };
    assert_eq!(ask(b's').await, 7);
    // Keepalives only (the transport's 1 s keepalive and the server's ACKs).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = std::mem::take(&mut *ztna_node::lock(&sent));
    assert_eq!(ask(b'b').await, 4 << 20);
    let bulk = std::mem::take(&mut *ztna_node::lock(&sent));
    conn.close(0u32.into(), b"done");
    Sent {
        idle,
        bulk,
        gso_available,
    }
}

fn summary(s: &[(usize, bool)]) -> String {
    let batches = s.iter().filter(|(_, b)| *b).count();
    let bytes: usize = s.iter().map(|(n, _)| n).sum();
    format!("{} transmits ({batches} GSO batches), {bytes} B", s.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_send_single_packets_and_bulk_ones_batch() {
    logs();
    let ours = serve(true).await;
    let plain = serve(false).await;
    println!(
        "MEASURED segmentation: handshake and idle {} (quinn's runtime: {}); 4 MiB download {} \
         (quinn's runtime: {})",
        summary(&ours.idle),
        summary(&plain.idle),
        summary(&ours.bulk),
        summary(&plain.bulk),
    );
    assert!(
        ours.idle.len() >= 3,
        "handshake and keepalive: {:?}",
        ours.idle
    );
    assert!(
        ours.idle.iter().all(|(_, batch)| !batch),
        "an idle connection sent a GSO batch, so quinn gave it a batch-sized buffer: {:?}",
        ours.idle
    );
    if !ours.gso_available {
        println!("SKIPPED the batching checks: this kernel's UDP socket has no GSO");
        return;
    }
    // Without the runtime, the handshake alone already sends a batch: that is what this avoids.
    assert!(
        plain.idle.iter().any(|(_, batch)| *batch),
        "quinn's own runtime sent no batch during the handshake: {:?}",
        plain.idle
    );
    let batched: usize = ours.bulk.iter().filter(|(_, b)| *b).map(|(n, _)| n).sum();
    let total: usize = ours.bulk.iter().map(|(n, _)| n).sum();
    assert!(
        batched * 2 >= total,
        "a bulk transfer sent only {batched} of {total} B in GSO batches"
    );
}

//! The anchor: one quinn hop in this process, a server and a client built exactly as the daemons
//! build theirs (`ztna_node::transport::{server_config, client_config}`, the intermediate's and
//! the agent's transport options, identities from the test PKI, the intermediate's endpoint
//! config, the agent's dual-stack client endpoint). Server and client each run on their own
//! multi-threaded runtime with the default worker count, as two daemon processes would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::time::timeout;
use ztna_node::transport::{self, TransportOptions};
use ztna_node::Identity;
use ztna_proto::Role;

use crate::backends::{Bulk, MIB, MSG};
use crate::util::{CpuOf, Samples};

/// Thread-name prefix of the anchor's runtimes (for its CPU time).
pub const THREADS: &str = "hop-";
const CHUNK: usize = 64 * 1024;

pub struct Hop {
    cli: Handle,
    addr: SocketAddr,
    client_ep: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    client_id: Identity,
    client_opts: TransportOptions,
    conn: quinn::Connection,
    server_ep: quinn::Endpoint,
    plain_echo: SocketAddr,
    plain_task: tokio::task::JoinHandle<()>,
}

/// Flow kinds on the anchor's streams (first byte).
const BULK: u8 = b'B';
const ECHO: u8 = b'E';

impl Hop {
    /// Starts the server on `srv` and connects a client from `cli`.
    pub async fn start(
        srv: &Handle,
        cli: &Handle,
        server_id: Identity,
        server_opts: TransportOptions,
        client_id: Identity,
        client_opts: TransportOptions,
    ) -> Result<Hop> {
        let server_ep = srv
            .spawn(async move {
                let cfg = transport::server_config(&server_id, &[Role::Agent], &server_opts)?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let ep = quinn::Endpoint::new(
                    transport::restart_aware_endpoint_config(&server_id),
                    Some(cfg),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )?;
                let ep2 = ep.clone();
                tokio::spawn(async move {
                    while let Some(incoming) = ep2.accept().await {
                        tokio::spawn(async move {
                            if let Ok(Ok(conn)) =
                                timeout(Duration::from_secs(10), async { incoming.accept()?.await })
                                    .await
                            {
                                serve(conn).await;
                            }
                        });
                    }
                });
                anyhow::Ok(ep)
            })
            .await??;
        let addr = server_ep.local_addr()?;
        // A plain UDP echo on the server's runtime: the same two runtimes without QUIC, to tell
        // what the quinn hop itself adds to a round trip.
        let (plain_echo, plain_task) = srv
            .spawn(async {
                let (addr, _seen, task) = ztna_integration::udp_echo().await;
                (addr, task)
            })
            .await?;
        let (client_ep, client_cfg, conn, client_id) = {
            let id = client_id.clone();
            cli.spawn(async move {
                let cfg = transport::client_config(&id, Role::Intermediate, &client_opts)?;
                let ep = transport::client_endpoint(transport::DUAL_STACK_ANY)?;
                let conn = ep
                    .connect_with(cfg.clone(), addr, "ztna-intermediate")?
                    .await?;
                anyhow::Ok((ep, cfg, conn, id))
            })
            .await??
        };
        Ok(Hop {
            cli: cli.clone(),
            addr,
            client_ep,
            client_cfg,
            client_id,
            client_opts,
            conn,
            server_ep,
            plain_echo,
            plain_task,
        })
    }

    /// `mib` MiB on one stream, written in 64 KiB pieces (as a TCP splice would), counted and
    /// discarded by the server; rate and CPU per GiB of both runtimes.
    pub async fn bulk(&self, mib: u64) -> Result<Bulk> {
        let conn = self.conn.clone();
        let cpu = CpuOf::Threads(vec![THREADS]);
        let mark = cpu.mark();
        let start = Instant::now();
        let total = mib * MIB;
        let got = self
            .cli
            .spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&[BULK]).await?;
                let buf: Vec<u8> = (0..CHUNK as u32).map(|i| (i * 31 + 7) as u8).collect();
                let mut sent = 0u64;
                while sent < total {
                    let n = (total - sent).min(CHUNK as u64) as usize;
                    send.write_all(&buf[..n]).await?;
                    sent += n as u64;
                }
                send.finish()?;
                let mut count = [0u8; 8];
                recv.read_exact(&mut count).await?;
                anyhow::Ok(u64::from_be_bytes(count))
            })
            .await??;
        let secs = start.elapsed().as_secs_f64();
        let cpu_s = mark.since();
        if got != total {
            bail!("anchor server counted {got} bytes, sent {total}");
        }
        Ok(Bulk {
            mib_s: mib as f64 / secs,
            cpu_per_gib: cpu_s / (total as f64 / (1024.0 * MIB as f64)),
        })
    }

    /// 64-byte ping-pong on one stream.
    pub async fn rtt_stream(&self, warmup: usize, rounds: usize) -> Result<Samples> {
        let conn = self.conn.clone();
        self.cli
            .spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&[ECHO]).await?;
                let us =
                    crate::backends::ping_pong(&mut send, &mut recv, warmup, rounds, "anchor echo")
                        .await?;
                send.finish()?;
                Ok(us)
            })
            .await?
    }

    /// 64-byte ping-pong with QUIC datagrams (1 s timeout each, at most 10 lost).
    pub async fn rtt_datagram(&self, warmup: usize, rounds: usize) -> Result<(Samples, usize)> {
        let conn = self.conn.clone();
        self.cli
            .spawn(async move {
                let mut us = Vec::with_capacity(rounds);
                let mut lost = 0;
                for i in 0..warmup + rounds {
                    let mut msg = [0u8; MSG];
                    msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    let msg = Bytes::copy_from_slice(&msg);
                    let t = Instant::now();
                    conn.send_datagram(msg.clone())?;
                    let wait = async {
                        loop {
                            let d = conn.read_datagram().await?;
                            if d == msg {
                                return anyhow::Ok(());
                            }
                        }
                    };
                    match (timeout(Duration::from_secs(1), wait).await, i >= warmup) {
                        (Ok(r), true) => {
                            r?;
                            us.push(t.elapsed().as_secs_f64() * 1e6)
                        }
                        (Ok(r), false) => r?,
                        (Err(_), true) => lost += 1,
                        (Err(_), false) => {}
                    }
                    if lost >= 10 {
                        break;
                    }
                }
                Ok((Samples::new(us), lost))
            })
            .await?
    }

    /// 64-byte ping-pong over plain UDP between the anchor's two runtimes (no QUIC).
    pub async fn rtt_plain_udp(&self, warmup: usize, rounds: usize) -> Result<(Samples, usize)> {
        let echo = self.plain_echo;
        self.cli
            .spawn(async move { crate::backends::udp_rtt(echo, warmup, rounds).await })
            .await?
    }

    /// Client-side handshake times of `rounds` new connections from the same endpoint. With
    /// `fresh`, every connection gets a newly built client config (no TLS session to resume: a
    /// full handshake); otherwise they share one config as a daemon's reconnects do.
    pub async fn handshakes(&self, warmup: usize, rounds: usize, fresh: bool) -> Result<Samples> {
        let ep = self.client_ep.clone();
        let shared = self.client_cfg.clone();
        let id = self.client_id.clone();
        let opts = self.client_opts;
        let addr = self.addr;
        self.cli
            .spawn(async move {
                let mut us = Vec::with_capacity(rounds);
                for i in 0..warmup + rounds {
                    let cfg = if fresh {
                        transport::client_config(&id, Role::Intermediate, &opts)?
                    } else {
                        shared.clone()
                    };
                    let t = Instant::now();
                    let conn = timeout(
                        Duration::from_secs(5),
                        ep.connect_with(cfg, addr, "ztna-intermediate")?,
                    )
                    .await
                    .map_err(|_| anyhow!("anchor handshake timed out"))??;
                    let dt = t.elapsed();
                    conn.close(0u32.into(), b"bench");
                    if i >= warmup {
                        us.push(dt.as_secs_f64() * 1e6);
                    }
                }
                Ok(Samples::new(us))
            })
            .await?
    }

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bench done");
        self.client_ep.close(0u32.into(), b"bench done");
        self.server_ep.close(0u32.into(), b"bench done");
        self.plain_task.abort();
        let ep = self.client_ep.clone();
        let _ = self
            .cli
            .spawn(async move { timeout(Duration::from_secs(2), ep.wait_idle()).await })
            .await;
    }
}

/// The anchor server's side of a connection: streams by kind, datagrams echoed.
async fn serve(conn: quinn::Connection) {
    let dconn = conn.clone();
    let datagrams = async move {
        while let Ok(d) = dconn.read_datagram().await {
            let _ = dconn.send_datagram(d);
        }
    };
    let streams = async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(stream(send, recv));
        }
    };
    tokio::join!(datagrams, streams);
}

async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind).await?;
    match kind[0] {
        BULK => {
            let mut total = 0u64;
            while let Some(c) = recv.read_chunk(CHUNK, true).await? {
                total += c.bytes.len() as u64;
            }
            send.write_all(&total.to_be_bytes()).await?;
            send.finish()?;
        }
        ECHO => {
            let mut buf = vec![0u8; CHUNK];
            while let Some(n) = recv.read(&mut buf).await? {
                send.write_all(&buf[..n]).await?;
            }
            send.finish()?;
        }
        k => bail!("unknown anchor stream kind {k}"),
    }
    Ok(())
}

//! The scale mode's anchor: a bare quinn server in a process of its own, built from the scale
//! intermediate's own configuration file (the same certificate, transport options, endpoint
//! config and socket buffers), that accepts every connection and holds it without opening a
//! stream or reading one. What an idle agent connection costs it (RSS, keepalive CPU) is what
//! quinn and rustls cost by themselves; the intermediate's figures above it are ours.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ztna_node::transport;
use ztna_node::Identity;
use ztna_proto::Role;

use crate::util::SelfChild;

/// First argument that makes `ztna-bench` the anchor server (then `CONFIG`).
pub const CHILD: &str = "--quinn-anchor-child";

/// The child's side: prints its address, then serves until stdin closes (its parent went away)
/// or 15 minutes have passed.
pub fn child(config: &std::path::Path) -> Result<()> {
    let cfg = ztna_intermediate::Config::load(Some(config), Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The daemons' runtime (`ztna_node::daemon`): multi-threaded, a worker per core.
    let rt = tokio::runtime::Runtime::new()?;
    let addr = rt.block_on(async {
        let id = Identity::load(&cfg.tls, Role::Intermediate)?;
        let server =
            transport::server_config(&id, &[Role::Agent, Role::Connector], &cfg.transport())?;
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        transport::size_quic_socket(&socket, transport::RELAY_SOCKET_BUFFER);
        let ep = quinn::Endpoint::new(
            transport::restart_aware_endpoint_config(&id),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let addr = ep.local_addr()?;
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(30), async {
                        incoming.accept()?.await
                    })
                    .await
                    {
                        conn.closed().await;
                    }
                });
            }
        });
        anyhow::Ok(addr)
    })?;
    crate::util::serve_until_parent_leaves(addr, Duration::from_secs(900))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The anchor server as a child process (this binary, re-run with [`CHILD`]); killed on drop.
pub fn spawn(config: &std::path::Path) -> Result<SelfChild> {
    SelfChild::spawn(
        &[CHILD.as_ref(), config.as_os_str()],
        "the quinn anchor child",
    )
}

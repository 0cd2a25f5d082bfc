//! QUIC transport settings and endpoint construction shared by every role.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, VarInt};
use ztna_proto::Role;

use crate::identity::{Identity, IdentityError};

/// Tunables of a QUIC connection. Defaults notice a dead path within ~3× the keepalive interval
/// (the idle timeout), not the 30–40 s the old system needed.
#[derive(Debug, Clone, Copy)]
pub struct TransportOptions {
    /// PING interval on an otherwise idle connection.
    pub keepalive: Duration,
    /// A connection with no packet from the peer for this long is dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams the peer may open (= concurrent flows + control).
    pub max_streams: u32,
    /// Bytes of received datagrams buffered before new ones are dropped.
    pub datagram_buffer: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_streams: 1024,
            datagram_buffer: 1024 * 1024,
        }
    }
}

impl TransportOptions {
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keepalive));
        t.max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams));
        // Flows are bidirectional streams; nothing uses unidirectional ones.
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.datagram_receive_buffer_size(Some(self.datagram_buffer));
        t.datagram_send_buffer_size(self.datagram_buffer);
        t
    }
}

/// QUIC server config accepting clients whose certificate carries one of `client_roles`.
pub fn server_config(
    identity: &Identity,
    client_roles: &[Role],
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, IdentityError> {
    let tls = identity.server_config(client_roles)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(opts.transport_config()));
    Ok(cfg)
}

/// QUIC client config that only accepts a server with `server_role`.
pub fn client_config(
    identity: &Identity,
    server_role: Role,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, IdentityError> {
    let tls = identity.client_config(server_role)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(opts.transport_config()));
    Ok(cfg)
}

/// Endpoint config of a server whose restarts peers should notice at once.
///
/// The stateless-reset key and the connection-ID generator key are derived from our private
/// key, so a restarted process recognises the connection IDs it issued before a crash and
/// answers the peers' next packet (a keepalive, within a second) with a valid stateless reset.
/// Without this, peers would only notice the crash after their idle timeout.
pub fn restart_aware_endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    let reset = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &identity.derive_secret("stateless reset"),
    );
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset));
    let cid = identity.derive_secret("connection id");
    let cid_key = u64::from_le_bytes([
        cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
    ]);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// One UDP socket, one endpoint, usable as client now and as server later (P2P after hole
/// punching: `endpoint.set_server_config(Some(..))` on the same socket).
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<Endpoint> {
    Endpoint::client(bind)
}

/// Resolves `host:port` and returns the address plus the name to send as SNI. The server is
/// verified by SPIFFE role, not by this name.
pub async fn resolve(target: &str) -> std::io::Result<(SocketAddr, String)> {
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{target} resolves to no address"),
            )
        })?;
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let sni = if host.parse::<std::net::IpAddr>().is_ok() || host.is_empty() {
        "ztna-intermediate".to_string()
    } else {
        host.to_string()
    };
    Ok((addr, sni))
}

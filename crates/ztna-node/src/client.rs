//! The client side of the control protocol, shared by the connector and the agent: connect to an
//! intermediate, say Hello, get Welcome.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{SendStream, VarInt};
use ztna_proto::{codes, ClientMsg, Role, ServerMsg, PROTOCOL_VERSION};

use crate::identity::describe_connection_error;
use crate::io::{write_frame, FramedRecv};

/// Connects to `target` (`host:port`) within `limit`; the error says why in operator words.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    target: &str,
    limit: Duration,
) -> Result<quinn::Connection, String> {
    let (addr, sni) = crate::transport::resolve(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    let connecting = endpoint
        .connect_with(client.clone(), addr, &sni)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(describe_connection_error(&e)),
        Err(_) => Err(format!("handshake did not complete within {limit:?}")),
    }
}

/// An open control stream after a successful Hello/Welcome.
pub struct Control {
    pub send: SendStream,
    /// The intermediate's messages; cancel-safe to read in a `select!`.
    pub recv: FramedRecv,
    /// Our address as the intermediate sees it.
    pub observed_addr: SocketAddr,
    /// The intermediate's view of our identity.
    pub identity: String,
}

/// Opens the control stream and exchanges Hello/Welcome. A `Refused` answer or anything else
/// comes back as an error naming the reason.
pub async fn hello(
    conn: &quinn::Connection,
    role: Role,
    software: String,
    watch: Vec<String>,
    limit: Duration,
) -> Result<Control, String> {
    let lost = |e: &dyn std::fmt::Display| {
        conn.close_reason()
            .map(|c| describe_connection_error(&c))
            .unwrap_or_else(|| e.to_string())
    };
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let mut recv = FramedRecv::new(recv);
    let msg = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role,
        software,
        watch,
    };
    write_frame(&mut send, &msg).await.map_err(|e| lost(&e))?;
    match recv.expect::<ServerMsg>(limit).await {
        Ok(ServerMsg::Welcome {
            identity,
            observed_addr,
            ..
        }) => Ok(Control {
            send,
            recv,
            observed_addr,
            identity,
        }),
        Ok(ServerMsg::Refused { reason }) => Err(format!("refused by the intermediate: {reason}")),
        Ok(other) => {
            conn.close(VarInt::from_u32(codes::PROTOCOL), b"expected Welcome");
            Err(format!("expected Welcome, got {other:?}"))
        }
        Err(e) => Err(lost(&e)),
    }
}

/// The identity a client presents to intermediates, replaceable while running (SIGHUP).
pub struct ClientTls {
    role: Role,
    opts: crate::transport::TransportOptions,
    current: std::sync::RwLock<(crate::Identity, quinn::ClientConfig)>,
}

impl ClientTls {
    pub fn load(
        tls: &crate::config::TlsConfig,
        role: Role,
        opts: crate::transport::TransportOptions,
    ) -> Result<ClientTls, crate::identity::IdentityError> {
        let (identity, config) = Self::build(tls, role, &opts)?;
        Ok(ClientTls {
            role,
            opts,
            current: std::sync::RwLock::new((identity, config)),
        })
    }

    fn build(
        tls: &crate::config::TlsConfig,
        role: Role,
        opts: &crate::transport::TransportOptions,
    ) -> Result<(crate::Identity, quinn::ClientConfig), crate::identity::IdentityError> {
        let identity = crate::Identity::load(tls, role)?;
        let config = crate::transport::client_config(&identity, Role::Intermediate, opts)?;
        Ok((identity, config))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (crate::Identity, quinn::ClientConfig)> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The QUIC client config for the next connection.
    pub fn config(&self) -> quinn::ClientConfig {
        self.read().1.clone()
    }

    pub fn id(&self) -> crate::SpiffeId {
        self.read().0.id.clone()
    }

    pub fn expiry_unix(&self) -> f64 {
        self.read().0.expiry_unix()
    }

    /// Loads new files; on success new connections present them (established ones keep
    /// theirs) and `expiry` (the `ztna_tls_cert_expiry_timestamp_seconds` gauge) follows. On
    /// error nothing changes.
    pub fn reload(
        &self,
        tls: &crate::config::TlsConfig,
        expiry: &prometheus::Gauge,
    ) -> Result<String, String> {
        let (identity, config) =
            Self::build(tls, self.role, &self.opts).map_err(|e| e.to_string())?;
        let summary = format!(
            "certificate {} (expires at unix {:.0}) used for new connections",
            identity.id,
            identity.expiry_unix()
        );
        expiry.set(identity.expiry_unix());
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (identity, config);
        Ok(summary)
    }
}

/// True when the intermediate closed `conn` at the end of a drain (restart or upgrade), as
/// opposed to a failure: the client's reconnect backoff starts over.
pub fn closed_by_drain(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == VarInt::from_u32(codes::DRAINING)
    )
}

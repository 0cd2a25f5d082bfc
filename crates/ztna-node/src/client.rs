//! The client side of the control protocol, shared by the connector and the agent: connect to an
//! intermediate, say Hello, get Welcome.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{SendStream, VarInt};
use ztna_proto::{codes, ClientMsg, Role, ServerMsg, PROTOCOL_VERSION};

use crate::backoff::{ANSWERED_CONNECT_TIMEOUT, WELCOME_TIMEOUT};
use crate::identity::describe_connection_error;
use crate::io::{write_frame, FramedRecv, StreamError};

/// How long one connection attempt runs alone before the next address is tried beside it
/// (happy eyeballs, RFC 8305's recommended 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to `target` (`host:port`) within `limit`; the error says why in operator words.
///
/// Every address the name resolves to is tried, IPv6 and IPv4 interleaved, happy-eyeballs style:
/// the next attempt starts when the previous one failed or after [`ATTEMPT_DELAY`], the first
/// handshake to complete wins and the others are abandoned. The address used is logged.
/// Addresses of a family the endpoint cannot reach (IPv6 on an IPv4-only socket) are skipped.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    target: &str,
    limit: Duration,
) -> Result<quinn::Connection, String> {
    let (addrs, sni) = crate::transport::resolve_all(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    connect_any(endpoint, client, target, addrs, &sni, limit).await
}

/// [`connect`] to already resolved `addrs` (in order of preference), sending `sni`; `target`
/// names them in messages.
pub async fn connect_any(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    target: &str,
    addrs: Vec<SocketAddr>,
    sni: &str,
    limit: Duration,
) -> Result<quinn::Connection, String> {
    let v4_only = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(false);
    let (usable, skipped): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.into_iter().partition(|a| !(v4_only && a.is_ipv6()));
    if usable.is_empty() {
        return Err(format!(
            "{target} has only IPv6 addresses ({}), but the local socket is IPv4 only: set \
             `bind = \"[::]:0\"` or leave `bind` at its default",
            list(&skipped)
        ));
    }
    let started = std::time::Instant::now();
    let attempt = race(endpoint, client, &usable, sni);
    tokio::pin!(attempt);
    let mut outcome = tokio::time::timeout(limit, &mut attempt).await;
    let mut waited = limit;
    // A peer that answered (with a Retry while it sheds load, or part of a handshake) is alive
    // and busy: give it longer instead of starting over (see `crate::answered`).
    let answered = || {
        endpoint.local_addr().is_ok_and(|local| {
            usable
                .iter()
                .any(|a| crate::answered::since(local, *a, started))
        })
    };
    if outcome.is_err() && limit < ANSWERED_CONNECT_TIMEOUT && answered() {
        tracing::debug!(
            intermediate = target,
            "the peer answered but the handshake is slow: waiting up to {ANSWERED_CONNECT_TIMEOUT:?}"
        );
        outcome = tokio::time::timeout(ANSWERED_CONNECT_TIMEOUT - limit, &mut attempt).await;
        waited = ANSWERED_CONNECT_TIMEOUT;
    }
    match outcome {
        Ok(Ok((conn, addr))) => {
            tracing::info!(intermediate = target, %addr, "QUIC connection established");
            Ok(conn)
        }
        Ok(Err(failures)) => Err(describe_failures(&failures)),
        Err(_) if usable.len() == 1 => Err(format!("handshake did not complete within {waited:?}")),
        Err(_) => Err(format!(
            "handshake did not complete within {waited:?} on any of {}",
            list(&usable)
        )),
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| crate::transport::canonical(*a).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_failures(failures: &[(SocketAddr, String)]) -> String {
    match failures {
        [(_, why)] => why.clone(),
        _ => failures
            .iter()
            .map(|(a, why)| format!("{}: {why}", crate::transport::canonical(*a)))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

type Attempt = std::pin::Pin<
    Box<dyn std::future::Future<Output = (SocketAddr, Result<quinn::Connection, String>)> + Send>,
>;

/// Races handshakes to `addrs` in order, each started [`ATTEMPT_DELAY`] after the previous one
/// or as soon as every running one failed. Returns the first connection (with its address as
/// an operator reads it), or every address's failure. Attempts still running when one wins are
/// dropped, which closes them.
async fn race(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addrs: &[SocketAddr],
    sni: &str,
) -> Result<(quinn::Connection, SocketAddr), Vec<(SocketAddr, String)>> {
    enum Step {
        Finished(usize, SocketAddr, Result<quinn::Connection, String>),
        Delay,
    }
    let mut pending: Vec<Attempt> = Vec::new();
    let mut failures = Vec::new();
    let mut next = addrs.iter().copied();
    loop {
        while pending.is_empty() {
            let Some(addr) = next.next() else {
                return Err(failures);
            };
            start(endpoint, client, addr, sni, &mut pending, &mut failures);
        }
        let more = next.len() > 0;
        let step = {
            let first_done = std::future::poll_fn(|cx| {
                for (i, p) in pending.iter_mut().enumerate() {
                    if let std::task::Poll::Ready((addr, r)) = p.as_mut().poll(cx) {
                        return std::task::Poll::Ready(Step::Finished(i, addr, r));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                step = first_done => step,
                _ = tokio::time::sleep(ATTEMPT_DELAY), if more => Step::Delay,
            }
        };
        match step {
            Step::Finished(i, addr, Ok(conn)) => {
                drop(pending.swap_remove(i));
                return Ok((conn, crate::transport::canonical(addr)));
            }
            Step::Finished(i, addr, Err(why)) => {
                drop(pending.swap_remove(i));
                tracing::debug!(addr = %crate::transport::canonical(addr), %why, "connection attempt failed");
                failures.push((addr, why));
                // A failed attempt starts the next address at once instead of after the delay.
                if let Some(addr) = next.next() {
                    start(endpoint, client, addr, sni, &mut pending, &mut failures);
                }
            }
            Step::Delay => {
                if let Some(addr) = next.next() {
                    start(endpoint, client, addr, sni, &mut pending, &mut failures);
                }
            }
        }
    }
}

fn start(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: SocketAddr,
    sni: &str,
    pending: &mut Vec<Attempt>,
    failures: &mut Vec<(SocketAddr, String)>,
) {
    match endpoint.connect_with(client.clone(), addr, sni) {
        Ok(connecting) => pending.push(Box::pin(async move {
            (
                addr,
                connecting.await.map_err(|e| describe_connection_error(&e)),
            )
        })),
        Err(e) => failures.push((addr, e.to_string())),
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
    /// The intermediate's protocol revision (`Welcome.version`, see
    /// [`ztna_proto::PROTOCOL_REVISION`]): which later messages it understands.
    pub revision: u16,
}

/// Opens the control stream and exchanges Hello/Welcome within `limit`, or within
/// [`WELCOME_TIMEOUT`] once the intermediate has confirmed the handshake. A `Refused` answer or
/// anything else comes back as an error naming the reason.
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
    let mut answer = recv.expect::<ServerMsg>(limit).await;
    // An intermediate that confirmed the handshake (HANDSHAKE_DONE) has completed its side and
    // will read our Hello: it is busy, most likely with a reconnect storm, and starting over
    // would throw that handshake away. One that has not confirmed it after `limit` has most
    // likely lost our last handshake packet (its retransmission can be many seconds away after
    // a storm's inflated first RTT sample): a new attempt is the faster way in.
    if matches!(answer, Err(StreamError::Timeout))
        && limit < WELCOME_TIMEOUT
        && conn.stats().frame_rx.handshake_done > 0
    {
        tracing::debug!("the intermediate confirmed the handshake but has not welcomed us yet: waiting up to {WELCOME_TIMEOUT:?}");
        answer = recv.expect::<ServerMsg>(WELCOME_TIMEOUT - limit).await;
    }
    match answer {
        Ok(ServerMsg::Welcome {
            version,
            identity,
            observed_addr,
        }) => Ok(Control {
            send,
            recv,
            observed_addr,
            identity,
            revision: version,
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
    /// Counts reloads that brought a different certificate: connections made with the old one
    /// move over to it (make before break), as the intermediates close them when it expires.
    rotations: tokio::sync::watch::Sender<u64>,
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
            rotations: tokio::sync::watch::channel(0).0,
        })
    }

    fn build(
        tls: &crate::config::TlsConfig,
        role: Role,
        opts: &crate::transport::TransportOptions,
    ) -> Result<(crate::Identity, quinn::ClientConfig), crate::identity::IdentityError> {
        let (identity, _) = crate::Identity::load_verified(tls, role)?;
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

    /// The identity in use and the QUIC client config made from it, read together: a
    /// connection made with this config was made with this identity (whose certificate a
    /// renewal then replaces, see [`crate::renew`]).
    pub fn current(&self) -> (crate::Identity, quinn::ClientConfig) {
        let r = self.read();
        (r.0.clone(), r.1.clone())
    }

    pub fn id(&self) -> crate::SpiffeId {
        self.read().0.id.clone()
    }

    /// The identity currently in use (for direct paths: a server config, a client config to a
    /// connector).
    pub fn identity(&self) -> crate::Identity {
        self.read().0.clone()
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
        self.reload_with(tls, expiry, |_| Ok(()))
            .map(|(summary, ())| summary)
    }

    /// [`reload`](Self::reload), with `also` built from the new identity first (say, a server
    /// config): if it fails, nothing changes.
    pub fn reload_with<T>(
        &self,
        tls: &crate::config::TlsConfig,
        expiry: &prometheus::Gauge,
        also: impl FnOnce(&crate::Identity) -> Result<T, String>,
    ) -> Result<(String, T), String> {
        let (identity, config) =
            Self::build(tls, self.role, &self.opts).map_err(|e| e.to_string())?;
        let extra = also(&identity)?;
        let summary = format!(
            "certificate {} (expires at unix {:.0}) used for new connections",
            identity.id,
            identity.expiry_unix()
        );
        expiry.set(identity.expiry_unix());
        let rotated = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            let rotated = current.0.chain != identity.chain;
            *current = (identity, config);
            rotated
        };
        if rotated {
            self.rotations.send_modify(|n| *n += 1);
        }
        Ok((summary, extra))
    }

    /// Changes each time a reload brings a different certificate.
    pub fn rotations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rotations.subscribe()
    }
}

/// True when the intermediate closed `conn` at the end of a drain (restart or upgrade), as
/// opposed to a failure: the client's reconnect backoff starts over. Ask before closing `conn`
/// on our side: quinn's `close` replaces the reason the peer gave.
pub fn closed_by_drain(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == VarInt::from_u32(codes::DRAINING)
    )
}

//! A connection's certificate renewed in place (protocol revision 3).
//!
//! An intermediate closes a connection when the certificate it was made with expires. A client
//! whose certificate was re-issued moves to a new connection (make before break, see
//! [`crate::rotation`]), but a TCP flow cannot move between QUIC connections: without this, a
//! flow still running on the old connection was cut at the old certificate's notAfter.
//!
//! So the client also sends its new chain over the old connection ([`ClientMsg::Renew`]), with
//! a signature made with the new key over keying material exported from that connection's TLS
//! session for the new leaf ([RFC 5705] / [RFC 8446 §7.5] exporter). The exporter is a secret
//! of that one session: the signature proves that whoever holds the new key is this
//! connection's peer, and it cannot be replayed on another connection or for another
//! certificate. The intermediate checks the chain as a new handshake would (its CA now, valid
//! now, same role and trust domain), and that it names the same SPIFFE ID as the connection
//! (a renewal never changes who the peer is: policy decisions made for it stay true), then lets
//! the connection run until the new notAfter.
//!
//! [RFC 5705]: https://www.rfc-editor.org/rfc/rfc5705
//! [RFC 8446 §7.5]: https://www.rfc-editor.org/rfc/rfc8446#section-7.5

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use ztna_proto::{ClientMsg, Role};

use crate::client::ClientTls;
use crate::identity::{cert_not_after, verify_signature, Identity, SpiffeId};

/// Exporter label (RFC 8446 §7.5; "EXPORTER-" prefix for labels outside the IANA registry).
const LABEL: &[u8] = b"EXPORTER-ztna-renew-v1";
/// Prefix of what is signed, so the signature means nothing elsewhere (tickets are signed with
/// the intermediates' keys, never with a client's, but the key could be used for more one day).
const CONTEXT: &[u8] = b"ztna certificate renewal v1\0";

/// What the new key signs: the context string, then 32 bytes exported from `conn`'s TLS session
/// with the new leaf as the exporter's context.
fn signed_part(conn: &quinn::Connection, leaf: &[u8]) -> Result<Vec<u8>, String> {
    let mut secret = [0u8; 32];
    conn.export_keying_material(&mut secret, LABEL, leaf)
        .map_err(|_| "the TLS session exports no keying material".to_string())?;
    let mut msg = Vec::with_capacity(CONTEXT.len() + secret.len());
    msg.extend_from_slice(CONTEXT);
    msg.extend_from_slice(&secret);
    Ok(msg)
}

/// The renewal a client sends over `conn` to carry it over to `new`'s certificate.
pub fn request(conn: &quinn::Connection, new: &Identity) -> Result<ClientMsg, String> {
    let leaf = new
        .chain
        .first()
        .ok_or_else(|| "the new identity has no certificate".to_string())?;
    let msg = signed_part(conn, leaf)?;
    let (scheme, signature) = new.sign(&msg).map_err(|e| e.to_string())?;
    Ok(ClientMsg::Renew {
        chain: new.chain.iter().map(|c| c.to_vec()).collect(),
        scheme,
        signature,
    })
}

/// A renewal that passed [`check`]: the new chain and its leaf's notAfter.
pub struct Renewed {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The intermediate's check of a renewal received on `conn`, whose peer is `peer` (`role`), under
/// `ours` (the CA in force now). The reason for a refusal is worded for the peer's log.
pub fn check(
    conn: &quinn::Connection,
    ours: &Identity,
    peer: &SpiffeId,
    role: Role,
    chain: Vec<Vec<u8>>,
    scheme: u16,
    signature: &[u8],
) -> Result<Renewed, String> {
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let id = ours.verify_client_chain(&chain, &[role])?;
    if id != *peer {
        return Err(format!(
            "the new certificate is for {id}; this connection is {peer}, and a renewal cannot change it"
        ));
    }
    let leaf = chain.first().ok_or_else(|| "no certificate".to_string())?;
    let msg = signed_part(conn, leaf)?;
    verify_signature(leaf, scheme, &msg, signature)
        .map_err(|e| format!("not signed for this connection with the new key: {e}"))?;
    let not_after =
        cert_not_after(leaf).ok_or_else(|| "the new certificate has no notAfter".to_string())?;
    Ok(Renewed { chain, not_after })
}

/// A client's side, for one connection to an intermediate of revision 3 or later: after each
/// certificate rotation that brings a new certificate for the same identity, the renewal to
/// send on it. Connections made with the old certificate then keep their running flows past
/// its notAfter; a rotation to another identity renews nothing (a new connection is the only
/// way to become someone else).
pub struct Follower {
    rotations: tokio::sync::watch::Receiver<u64>,
    /// The leaf this connection runs under now, as far as we know.
    leaf: Vec<u8>,
    id: SpiffeId,
    enabled: bool,
}

impl Follower {
    /// `revision`: the intermediate's (`Welcome`). Made when the connection is up: the identity
    /// then is the one it was made with.
    pub fn new(tls: &ClientTls, revision: u16) -> Follower {
        let identity = tls.identity();
        let mut rotations = tls.rotations();
        rotations.borrow_and_update();
        Follower {
            leaf: identity
                .chain
                .first()
                .map(|c| c.to_vec())
                .unwrap_or_default(),
            id: identity.id,
            rotations,
            enabled: revision >= 3,
        }
    }

    /// Waits for a rotation of `tls` that calls for a renewal of `conn`, and returns it
    /// (cancel-safe).
    pub async fn next(&mut self, tls: &ClientTls, conn: &quinn::Connection) -> ClientMsg {
        loop {
            if !self.enabled {
                return std::future::pending().await;
            }
            crate::rotation::rotated(&mut self.rotations).await;
            let new = tls.identity();
            let Some(leaf) = new.chain.first() else {
                continue;
            };
            if leaf.as_ref() == self.leaf.as_slice() {
                continue;
            }
            if new.id != self.id {
                tracing::info!(old = %self.id, new = %new.id, "the new certificate is for another identity: this connection keeps the old one, and ends at its notAfter");
                continue;
            }
            match request(conn, &new) {
                Ok(msg) => {
                    self.leaf = leaf.to_vec();
                    return msg;
                }
                Err(why) => {
                    tracing::warn!(%why, "cannot renew this connection's certificate; it ends at the old notAfter");
                }
            }
        }
    }
}

/// Logs an intermediate's answer to a renewal; false for any other message.
pub fn answered(msg: &ztna_proto::ServerMsg) -> bool {
    match msg {
        ztna_proto::ServerMsg::Renewed { not_after_unix } => {
            tracing::info!(
                not_after_unix,
                "certificate renewed on this connection: its flows run on past the old certificate's expiry"
            );
            true
        }
        ztna_proto::ServerMsg::RenewRefused { reason } => {
            tracing::warn!(%reason, "the intermediate refused to renew this connection's certificate: its flows end at the old notAfter");
            true
        }
        _ => false,
    }
}

//! A connection's certificate renewed in place (protocol revision 3).
//!
//! An intermediate closes a connection when the certificate it was made with expires. A client
//! whose certificate was re-issued moves to a new connection (make before break, see
//! [`crate::rotation`]), but a TCP flow cannot move between QUIC connections: without this, a
//! flow still running on the old connection was cut at the old certificate's notAfter.
//!
//! So the client sends its new certificate over the connection ([`ClientMsg::Renew`]), with
//! a signature made with the new key over keying material exported from that connection's TLS
//! session for the new leaf ([RFC 5705] / [RFC 8446 §7.5] exporter). The exporter is a secret
//! of that one session: the signature proves that whoever holds the new key is this
//! connection's peer, and it cannot be replayed on another connection or for another
//! certificate. The intermediate checks the chain as a new handshake would (its CA now, valid
//! now, same role and trust domain), and that it names the same SPIFFE ID as the connection
//! (a renewal never changes who the peer is: policy decisions made for it stay true), then lets
//! the connection run until the new notAfter.
//!
//! A connection renewed in place is the whole rotation: the supervisor makes a connection with
//! the new certificate (make before break) only when renewing is not possible: an intermediate
//! older than revision 3, a new identity, or a refusal ([`InPlace`]). A refused renewal is
//! retried every minute (what the intermediate's budget allows) until it is accepted or the
//! connection ends.
//!
//! [RFC 5705]: https://www.rfc-editor.org/rfc/rfc5705
//! [RFC 8446 §7.5]: https://www.rfc-editor.org/rfc/rfc8446#section-7.5

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use ztna_proto::{ClientMsg, Role, ServerMsg};

use crate::client::ClientTls;
use crate::identity::{cert_not_after, verify_signature, Identity, SpiffeId};

/// Exporter label (RFC 8446 §7.5 / RFC 5705; private to this protocol, not IANA-registered).
const LABEL: &[u8] = b"EXPORTER-ztna-renew-v1";
/// Prefix of what is signed, so the signature means nothing elsewhere (tickets are signed with
/// the intermediates' keys, never with a client's, but the key could be used for more one day).
const CONTEXT: &[u8] = b"ztna certificate renewal v1\0";

/// What the new key signs: the context string, then 32 bytes exported from `conn`'s TLS session
/// with the new leaf as the exporter's context.
pub fn signed_part(conn: &quinn::Connection, leaf: &[u8]) -> Result<Vec<u8>, String> {
    let mut secret = [0u8; 32];
    conn.export_keying_material(&mut secret, LABEL, leaf)
        .map_err(|_| "the TLS session exports no keying material".to_string())?;
    let mut msg = Vec::with_capacity(CONTEXT.len() + secret.len());
    msg.extend_from_slice(CONTEXT);
    msg.extend_from_slice(&secret);
    Ok(msg)
}

/// The renewal a client sends over `conn` to carry it over to `new`'s certificate: the leaf
/// alone (the intermediate trusts leaves issued by its CA directly, nothing else).
pub fn request(conn: &quinn::Connection, new: &Identity) -> Result<ClientMsg, String> {
    let leaf = new
        .chain
        .first()
        .ok_or_else(|| "the new identity has no certificate".to_string())?;
    let msg = signed_part(conn, leaf)?;
    let (scheme, signature) = new.sign(&msg).map_err(|e| e.to_string())?;
    Ok(ClientMsg::Renew {
        chain: vec![leaf.to_vec()],
        scheme,
        signature,
    })
}

/// A renewal that passed [`check`]: the new leaf and its notAfter.
pub struct Renewed {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// Longest reason a refusal carries (the peer refuses longer text at decode).
const MAX_REASON: usize = 512;

/// The intermediate's check of a renewal received on `conn`, whose peer is `peer` (`role`), under
/// `ours` (the CA in force now). Only the first certificate of `chain` counts: it must be issued
/// by the CA directly, as at a handshake. The reason for a refusal is worded for the peer's log.
pub fn check(
    conn: &quinn::Connection,
    ours: &Identity,
    peer: &SpiffeId,
    role: Role,
    chain: Vec<Vec<u8>>,
    scheme: u16,
    signature: &[u8],
) -> Result<Renewed, String> {
    let leaf = CertificateDer::from(
        chain
            .into_iter()
            .next()
            .ok_or_else(|| "no certificate".to_string())?,
    );
    let chain = vec![leaf];
    let id = ours.verify_client_chain(&chain, &[role]).map_err(capped)?;
    if id != *peer {
        return Err(capped(format!(
            "the new certificate is for {id}; this connection is {peer}, and a renewal cannot change it"
        )));
    }
    let msg = signed_part(conn, &chain[0])?;
    verify_signature(&chain[0], scheme, &msg, signature).map_err(|e| {
        capped(format!(
            "not signed for this connection with the new key: {e}"
        ))
    })?;
    let not_after = cert_not_after(&chain[0])
        .ok_or_else(|| "the new certificate has no notAfter".to_string())?;
    Ok(Renewed { chain, not_after })
}

/// `e` cut to [`MAX_REASON`] bytes.
fn capped(mut e: String) -> String {
    if e.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !e.is_char_boundary(end) {
            end -= 1;
        }
        e.truncate(end);
    }
    e
}

/// How long after a refusal a renewal is tried again (the intermediate allows one a minute).
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(61);

/// What a connection's session and its supervisor share: how far renewing it in place got, so
/// that the supervisor makes a connection with a new certificate only when that is needed.
pub struct InPlace {
    /// The identity the connection was made with.
    made_with: SpiffeId,
    state: std::sync::Mutex<State>,
    /// Counts refusals (and renewals that could not be made).
    refusals: tokio::sync::watch::Sender<u64>,
    /// Refusals the supervisor has seen ([`InPlace::refused`]).
    handled: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The session has read Welcome (until then, whether it can renew is not known).
    welcomed: bool,
    /// The intermediate announced revision 3 or later.
    capable: bool,
    /// The leaf the intermediate holds for the connection.
    confirmed: Vec<u8>,
    /// The last renewal was refused (or could not be made), and none was accepted since.
    refused: bool,
}

/// Whether a supervisor should make a connection now ([`InPlace::connection_needed`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    Now,
    /// Not yet: ask again after this long (the connection is still saying Hello).
    Later(std::time::Duration),
    /// The serving connection holds the current certificate, or is being renewed to it.
    No,
}

impl InPlace {
    pub fn new(made_with: SpiffeId) -> Arc<InPlace> {
        Arc::new(InPlace {
            made_with,
            state: Default::default(),
            refusals: tokio::sync::watch::channel(0).0,
            handled: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// For the supervisor of the serving connection, when a connection with `current` (the
    /// certificate in use now) might be made: not while the serving one holds it or is being
    /// renewed to it in place.
    pub fn connection_needed(&self, current: &Identity) -> Need {
        let st = self.state();
        if !st.welcomed {
            return Need::Later(std::time::Duration::from_millis(100));
        }
        let leaf = current.chain.first().map(|c| c.as_ref());
        if leaf == Some(st.confirmed.as_slice()) {
            return Need::No;
        }
        if st.capable && !st.refused && current.id == self.made_with {
            tracing::info!("certificate replaced: renewing the connection in place");
            return Need::No;
        }
        Need::Now
    }

    /// Returns once a renewal of this connection was refused since the last time this returned
    /// (for its supervisor: a refusal is seen whenever it happened).
    pub async fn refused(&self) {
        let seen = self.handled.load(Ordering::Acquire);
        let mut rx = self.refusals.subscribe();
        let now = match rx.wait_for(|n| *n > seen).await {
            Ok(n) => Some(*n),
            Err(_) => None,
        };
        let Some(now) = now else {
            return std::future::pending().await;
        };
        self.handled.store(now, Ordering::Release);
    }

    fn refuse(&self) {
        self.state().refused = true;
        self.refusals.send_modify(|n| *n += 1);
    }
}

/// The intermediate's answer to a renewal, from the control stream's reader to the [`Follower`].
#[derive(Debug)]
enum Answer {
    Renewed,
    Refused,
}

/// The control stream reader's end: hands the answers to renewals to the [`Follower`].
pub struct Answers(tokio::sync::mpsc::UnboundedSender<Answer>);

impl Answers {
    /// Takes (and logs) an answer to a renewal; false for any other message.
    pub fn take(&self, msg: &ServerMsg) -> bool {
        let answer = match msg {
            ServerMsg::Renewed { not_after_unix } => {
                tracing::info!(
                    not_after_unix,
                    "certificate renewed on this connection: it and its flows run on under the new certificate"
                );
                Answer::Renewed
            }
            ServerMsg::RenewRefused { reason } => {
                tracing::warn!(%reason, retry_in = ?RETRY_AFTER, "the intermediate refused to renew this connection's certificate: it ends at its current certificate's notAfter unless a retry is accepted (new flows use a connection made with the new certificate, where one can be made)");
                Answer::Refused
            }
            _ => return false,
        };
        let _ = self.0.send(answer);
        true
    }
}

/// How long an answer to a renewal is waited for before it counts as refused.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A client's side, for one connection to an intermediate: after each certificate rotation that
/// brings a new certificate for the same identity, the renewal to send on it (revision 3 or
/// later), again a minute after a refusal, until one is accepted. A rotation to another
/// identity renews nothing (a new connection is the only way to become someone else).
pub struct Follower {
    rotations: tokio::sync::watch::Receiver<u64>,
    /// The leaf of a renewal sent and not answered yet, and until when it is waited for.
    pending: Option<(Vec<u8>, tokio::time::Instant)>,
    /// After a refusal: not before this.
    retry_at: Option<tokio::time::Instant>,
    /// Something changed (a rotation, an answer, a retry due): look again.
    dirty: bool,
    /// The leaf whose identity change was last logged.
    told: Vec<u8>,
    answers: tokio::sync::mpsc::UnboundedReceiver<Answer>,
    in_place: Arc<InPlace>,
    enabled: bool,
}

impl Follower {
    /// For a connection made with `made_with`, whose intermediate said `revision` (`Welcome`).
    pub fn new(
        tls: &ClientTls,
        made_with: &Identity,
        in_place: Arc<InPlace>,
        revision: u16,
    ) -> (Follower, Answers) {
        // Subscribed first: a reload from here on is seen, one before shows in the leaf.
        let rotations = tls.rotations();
        let enabled = revision >= 3;
        let leaf = made_with
            .chain
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        {
            let mut st = in_place.state();
            st.welcomed = true;
            st.capable = enabled;
            st.confirmed = leaf.clone();
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Follower {
                rotations,
                pending: None,
                retry_at: None,
                dirty: true,
                told: leaf,
                answers: rx,
                in_place,
                enabled,
            },
            Answers(tx),
        )
    }

    /// Waits until `conn` is due for a renewal to `tls`'s certificate, and returns it
    /// (cancel-safe: state changes only between awaits).
    pub async fn next(&mut self, tls: &ClientTls, conn: &quinn::Connection) -> ClientMsg {
        if !self.enabled {
            return std::future::pending().await;
        }
        loop {
            if self.dirty && self.pending.is_none() && self.retry_at.is_none() {
                self.dirty = false;
                if let Some(msg) = self.due(tls, conn) {
                    return msg;
                }
            }
            let timer = self
                .retry_at
                .or_else(|| self.pending.as_ref().map(|(_, until)| *until));
            let wake = async {
                match timer {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = crate::rotation::rotated(&mut self.rotations) => self.dirty = true,
                _ = wake => {
                    if self.retry_at.take().is_none() && self.pending.take().is_some() {
                        tracing::warn!(wait = ?ANSWER_WAIT, "no answer to the renewal of this connection's certificate: taken for a refusal");
                        self.refused();
                    }
                    self.dirty = true;
                }
                answer = self.answers.recv() => {
                    self.dirty = true;
                    match answer {
                        Some(Answer::Renewed) => {
                            if let Some((leaf, _)) = self.pending.take() {
                                let mut st = self.in_place.state();
                                st.confirmed = leaf;
                                st.refused = false;
                            }
                        }
                        Some(Answer::Refused) => {
                            self.pending = None;
                            self.refused();
                        }
                        // The reader is gone: so is the connection.
                        None => return std::future::pending().await,
                    }
                }
            }
        }
    }

    /// A refusal (or a renewal that could not be made or was not answered): the supervisor
    /// makes a connection with the new certificate; this one tries again a minute later.
    fn refused(&mut self) {
        self.retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
        self.in_place.refuse();
    }

    /// The renewal to send now, if the certificate in use is not the one the intermediate holds
    /// for this connection.
    fn due(&mut self, tls: &ClientTls, conn: &quinn::Connection) -> Option<ClientMsg> {
        let new = tls.identity();
        let leaf = new.chain.first()?;
        if leaf.as_ref() == self.in_place.state().confirmed.as_slice() {
            return None;
        }
        if new.id != self.in_place.made_with {
            if self.told.as_slice() != leaf.as_ref() {
                self.told = leaf.to_vec();
                tracing::info!(old = %self.in_place.made_with, new = %new.id, "the new certificate is for another identity: this connection keeps the old one");
            }
            return None;
        }
        match request(conn, &new) {
            Ok(msg) => {
                self.pending = Some((leaf.to_vec(), tokio::time::Instant::now() + ANSWER_WAIT));
                Some(msg)
            }
            Err(why) => {
                tracing::warn!(%why, "cannot renew this connection's certificate; trying again in a minute");
                self.refused();
                None
            }
        }
    }
}

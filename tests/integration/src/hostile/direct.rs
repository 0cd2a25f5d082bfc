//! A crafted direct (P2P) client: it dials a connector's QUIC endpoint as an agent (mutual TLS
//! with a valid agent certificate), presents a ticket it made itself, or none, and tries a TCP
//! flow. The connector must refuse every ticket an intermediate it is connected to did not sign
//! for this agent, this connector and this service, unexpired, and never open a backend
//! connection for one. `p2p.rs` runs it in-process; `ztna-hostile ticket` runs it in the NAT
//! matrix (`tests/system/p2p.py`), from a host on the connector's LAN.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::{Connection, SendStream};
use ztna_node::config::TlsConfig;
use ztna_node::io::{write_frame, FramedRecv};
use ztna_node::transport::TransportOptions;
use ztna_node::Identity;
use ztna_proto::ticket::{Ticket, TicketBody};
use ztna_proto::{DirectMsg, DirectReply, Role, PROTOCOL_VERSION};

use super::{check_target, client_endpoint, open_flow, tcp_open, FlowOutcome};

/// What the connector did with a crafted direct attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectOutcome {
    /// Refused at Hello (or the connection closed), with the reason given.
    Refused(String),
    /// Welcomed, then the flow for the service was rejected with this message.
    FlowRejected(String),
    /// Welcomed and the flow was accepted.
    FlowAccepted,
}

impl DirectOutcome {
    /// `refused`, `flow_rejected` or `accepted`, for JSON output.
    pub fn label(&self) -> &'static str {
        match self {
            DirectOutcome::Refused(_) => "refused",
            DirectOutcome::FlowRejected(_) => "flow_rejected",
            DirectOutcome::FlowAccepted => "accepted",
        }
    }

    /// The reason the connector gave, if any.
    pub fn reason(&self) -> &str {
        match self {
            DirectOutcome::Refused(r) | DirectOutcome::FlowRejected(r) => r,
            DirectOutcome::FlowAccepted => "",
        }
    }
}

/// One attempt: the outcome, the accepted flow's stream (to prove the backend answers), and the
/// path's control stream (the connector closes the path when it ends, so it is kept here).
pub struct Attempt {
    pub outcome: DirectOutcome,
    pub flow: Option<(SendStream, FramedRecv)>,
    pub control: Option<(SendStream, FramedRecv)>,
}

/// A ticket as an intermediate signs them: `signer` is the intermediate's identity (or anyone's,
/// to forge one), valid for `lifetime_ms` from now (negative: already expired).
pub fn signed_ticket(
    signer: &Identity,
    agent: &str,
    connector: &str,
    services: &[&str],
    lifetime_ms: i64,
) -> Result<Vec<u8>, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64;
    let body = TicketBody {
        intermediate: signer.id.to_string(),
        agent: agent.to_string(),
        connector: connector.to_string(),
        services: services.iter().map(|s| s.to_string()).collect(),
        not_after_ms: now.saturating_add(lifetime_ms).max(0) as u64,
    }
    .encode();
    let (scheme, signature) = signer.sign(&body).map_err(|e| e.to_string())?;
    Ok(Ticket {
        body,
        scheme,
        signature,
    }
    .encode())
}

/// A QUIC connection to a connector's endpoint as `agent` (mutual TLS; no ticket yet).
pub async fn dial_connector(
    server: SocketAddr,
    agent: &TlsConfig,
    limit: Duration,
) -> Result<Connection, String> {
    check_target(server)?;
    let identity = Identity::load(agent, Role::Agent).map_err(|e| e.to_string())?;
    let cfg = ztna_node::transport::client_config(
        &identity,
        Role::Connector,
        &TransportOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let ep = client_endpoint(server)?;
    let connecting = ep
        .connect_with(cfg, server, "ztna-connector")
        .map_err(|e| format!("connect: {e}"))?;
    match tokio::time::timeout(limit, connecting).await {
        Err(_) => Err(format!("no handshake with {server} within {limit:?}")),
        Ok(Err(e)) => Err(format!(
            "TLS to the connector: {}",
            ztna_node::identity::describe_connection_error(&e)
        )),
        Ok(Ok(c)) => Ok(c),
    }
}

/// On a connection from [`dial_connector`]: presents `ticket` (or goes straight to a flow
/// without one) and opens a TCP flow to `service`.
pub async fn direct_attempt(
    conn: &Connection,
    ticket: Option<Vec<u8>>,
    service: &str,
    limit: Duration,
) -> Attempt {
    let refused = |reason: String| Attempt {
        outcome: DirectOutcome::Refused(reason),
        flow: None,
        control: None,
    };
    let mut control = None;
    if let Some(ticket) = ticket {
        let (mut s, r) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return refused(ztna_node::identity::describe_connection_error(&e)),
        };
        let mut r = FramedRecv::new(r);
        let hello = DirectMsg::Hello {
            version: PROTOCOL_VERSION,
            ticket,
        };
        if let Err(e) = write_frame(&mut s, &hello).await {
            return refused(e.to_string());
        }
        match r.expect::<DirectReply>(limit).await {
            Ok(DirectReply::Refused { reason }) => return refused(reason),
            Ok(DirectReply::Welcome { .. }) => control = Some((s, r)),
            Err(e) => return refused(e.to_string()),
        }
    }
    match open_flow(conn, &tcp_open(service), false, limit).await {
        FlowOutcome::Accepted(send, recv) => Attempt {
            outcome: DirectOutcome::FlowAccepted,
            flow: Some((send, recv)),
            control,
        },
        FlowOutcome::Rejected(_, message) => Attempt {
            outcome: DirectOutcome::FlowRejected(message),
            flow: None,
            control,
        },
        other => {
            // The connector closed the connection (no Hello): its reason, if it gave one.
            let closed = tokio::time::timeout(limit, conn.closed())
                .await
                .map(|e| ztna_node::identity::describe_connection_error(&e))
                .unwrap_or_else(|_| other.label());
            refused(closed)
        }
    }
}

/// Writes `payload` on an accepted flow and reads it back (the backend is an echo): true when
/// every byte came back unchanged within `limit`.
pub async fn echoes(flow: (SendStream, FramedRecv), payload: &[u8], limit: Duration) -> bool {
    let (mut send, recv) = flow;
    let (mut recv, early) = recv.into_parts();
    let round_trip = async {
        send.write_all(payload).await.ok()?;
        let mut got = early.to_vec();
        let mut buf = vec![0u8; payload.len()];
        while got.len() < payload.len() {
            let n = recv.read(&mut buf).await.ok()??;
            got.extend_from_slice(&buf[..n]);
        }
        Some(got == payload)
    };
    matches!(
        tokio::time::timeout(limit, round_trip).await,
        Ok(Some(true))
    )
}

/// `ztna-hostile ticket`: one crafted attempt, described by the command line.
pub struct TicketProbe {
    pub server: SocketAddr,
    /// Our agent certificate (a valid one: the ticket is the only thing wrong).
    pub agent: TlsConfig,
    pub service: String,
    /// The connector's SPIFFE ID the ticket names.
    pub connector: String,
    /// Who signs the ticket (an intermediate's certificate and key); `None`: no ticket at all.
    pub signer: Option<TlsConfig>,
    /// The agent the ticket names (default: ours).
    pub for_agent: Option<String>,
    /// The services the ticket names (default: `service`).
    pub for_services: Vec<String>,
    pub lifetime_ms: i64,
    /// Presented as the ticket instead of a signed one.
    pub raw_ticket: Option<Vec<u8>>,
    pub limit: Duration,
}

/// Runs one [`TicketProbe`]: the outcome, the connector's reason, and for an accepted flow
/// whether the backend behind it echoed.
pub async fn ticket_probe(o: &TicketProbe) -> Result<serde_json::Value, String> {
    let me = Identity::load(&o.agent, Role::Agent)
        .map_err(|e| e.to_string())?
        .id
        .to_string();
    let ticket = match (&o.raw_ticket, &o.signer) {
        (Some(raw), _) => Some(raw.clone()),
        (None, None) => None,
        (None, Some(signer)) => {
            let signer =
                Identity::load(signer, Role::Intermediate).map_err(|e| format!("signer: {e}"))?;
            let services: Vec<&str> = if o.for_services.is_empty() {
                vec![o.service.as_str()]
            } else {
                o.for_services.iter().map(String::as_str).collect()
            };
            let agent = o.for_agent.as_deref().unwrap_or(&me);
            Some(signed_ticket(
                &signer,
                agent,
                &o.connector,
                &services,
                o.lifetime_ms,
            )?)
        }
    };
    let conn = dial_connector(o.server, &o.agent, o.limit).await?;
    let attempt = direct_attempt(&conn, ticket, &o.service, o.limit).await;
    let echoed = match attempt.flow {
        Some(flow) => echoes(flow, b"ztna ticket probe", o.limit).await,
        None => false,
    };
    conn.close(0u32.into(), b"done");
    Ok(serde_json::json!({
        "mode": "ticket",
        "agent": me,
        "outcome": attempt.outcome.label(),
        "reason": attempt.outcome.reason(),
        "echoed": echoed,
    }))
}

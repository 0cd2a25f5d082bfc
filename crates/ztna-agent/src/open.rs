//! Opening a flow: ask the relay snapshot where to go ([`choose`]), open the stream there, and
//! on a refusal that another relay may not share (that relay is draining, or its status was
//! stale) try the next relay within `open_timeout`. Failover never fails a flow that some relay
//! can carry.

use std::sync::Arc;
use std::time::Duration;

use quinn::{SendStream, VarInt};
use tokio::time::Instant;
use tracing::debug;
use ztna_node::io::{write_frame, FramedRecv, StreamError};
use ztna_proto::{codes, FlowOpen, FlowReply, Protocol, RejectReason};

use crate::direct::DirectPath;
use crate::relays::{choose, Choice, Event, LinkUse};
use crate::Shared;

/// How long the intermediate may take to answer an open (it tries connectors one after another
/// within its own 18 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a flow could not be opened.
pub(crate) enum OpenError {
    /// Refused with a reason; do not retry.
    Rejected(RejectReason, String),
    /// No relay could say within the open timeout.
    NoTunnel(String),
}

impl OpenError {
    /// The `result` label and the text for the log line.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            OpenError::Rejected(r, why) => (r.outcome(), format!("{}: {why}", r.as_str())),
            OpenError::NoTunnel(why) => ("unavailable", why.clone()),
        }
    }
}

/// What carries a flow: a relay link or a direct path to the connector.
#[derive(Clone)]
pub(crate) enum Via {
    Relay(Arc<LinkUse>),
    Direct(Arc<DirectPath>),
}

impl Via {
    pub fn conn(&self) -> &quinn::Connection {
        match self {
            Via::Relay(l) => &l.conn,
            Via::Direct(d) => &d.conn,
        }
    }

    /// The connection's datagram send buffer, shared fairly by its UDP flows.
    pub fn fair(&self) -> &ztna_node::datagram::Fair {
        match self {
            Via::Relay(l) => &l.fair,
            Via::Direct(d) => &d.fair,
        }
    }

    /// The `path` label of `ztna_agent_flows_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Via::Relay(_) => "relay",
            Via::Direct(_) => "direct",
        }
    }

    /// For logs: the relay's address or the connector's identity.
    pub fn name(&self) -> &str {
        match self {
            Via::Relay(l) => &l.target,
            Via::Direct(d) => &d.connector,
        }
    }
}

/// An accepted flow.
pub(crate) struct Opened {
    pub via: Via,
    pub send: SendStream,
    pub recv: FramedRecv,
}

/// Opens a flow on the service's direct path when one is up (and asks for one when none is:
/// `direct::want`), otherwise, or when the direct path cannot take it, via the best relay.
pub(crate) async fn open_any(
    shared: &Arc<Shared>,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
    avoid: &mut Vec<(usize, u64)>,
    allow_direct: bool,
) -> Result<Opened, OpenError> {
    crate::direct::want(shared, service);
    if allow_direct {
        if let Some(path) = shared.direct.up(service) {
            match try_open(shared, &path.conn, service, protocol, flow_id).await {
                Ok((send, recv, FlowReply::Accept)) => {
                    return Ok(Opened {
                        via: Via::Direct(path),
                        send,
                        recv,
                    })
                }
                Ok((_, _, FlowReply::Reject { reason, message })) => {
                    if reason == RejectReason::Draining {
                        path.connector_draining();
                    }
                    debug!(reason = reason.as_str(), why = %message, "the direct path refused the flow; using the relay");
                }
                Err(e) => debug!(error = %e, "the direct path failed; using the relay"),
            }
        }
    }
    open_flow(shared, service, protocol, flow_id, avoid).await
}

/// Opens a flow to `service` on the best relay, moving to the next when one cannot take it.
/// `avoid` lists relays not to use (and collects the ones this call gave up on).
pub(crate) async fn open_flow(
    shared: &Shared,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
    avoid: &mut Vec<(usize, u64)>,
) -> Result<Opened, OpenError> {
    let deadline = Instant::now() + shared.config.open_timeout;
    let mut snaps = shared.relays.subscribe();
    loop {
        let choice = choose(&snaps.borrow_and_update(), service, avoid);
        let index = match choice {
            Choice::Use(i) => i,
            Choice::Refuse(reason, why) => return Err(OpenError::Rejected(reason, why)),
            Choice::Wait => {
                if tokio::time::timeout_at(deadline, snaps.changed())
                    .await
                    .is_err()
                {
                    let why = match choose(&snaps.borrow(), service, &[]) {
                        Choice::Refuse(_, why) => why,
                        _ => format!(
                            "no intermediate could carry the flow within {:?} (open_timeout)",
                            shared.config.open_timeout
                        ),
                    };
                    return Err(OpenError::NoTunnel(why));
                }
                continue;
            }
        };
        let Some(link) = snaps.borrow().link(index) else {
            continue;
        };
        // Held from the open on, so a link retiring after a certificate rotation waits for it.
        let link = LinkUse::new(link);
        match try_open(shared, &link.conn, service, protocol, flow_id).await {
            Ok((send, recv, FlowReply::Accept)) => {
                return Ok(Opened {
                    via: Via::Relay(Arc::new(link)),
                    send,
                    recv,
                })
            }
            Ok((_, _, FlowReply::Reject { reason, message })) => {
                let event = match reason {
                    // It is draining and has nothing left to offer: it cannot speak for the others.
                    RejectReason::Draining => Some(Event::Draining {
                        index,
                        generation: link.generation,
                    }),
                    // Its status was about to change (a connector just left): believe the flow.
                    RejectReason::Unavailable => Some(Event::Missing {
                        index,
                        generation: link.generation,
                        service: service.to_string(),
                        reason: message.clone(),
                    }),
                    _ => None,
                };
                let Some(event) = event else {
                    return Err(OpenError::Rejected(reason, message));
                };
                debug!(intermediate = %link.target, reason = reason.as_str(), why = %message, "trying the flow on the next intermediate");
                shared.report(event);
                avoid.push((index, link.generation));
            }
            Err(e) => {
                let gone = link.conn.close_reason().is_some();
                if !gone && !matches!(e, StreamError::Timeout) {
                    return Err(OpenError::Rejected(
                        RejectReason::Error,
                        format!("tunnel error: {e}"),
                    ));
                }
                debug!(intermediate = %link.target, error = %e, "the intermediate went away or did not answer; trying the next one");
                avoid.push((index, link.generation));
            }
        }
        if Instant::now() >= deadline {
            return Err(OpenError::NoTunnel(format!(
                "no intermediate could carry the flow within {:?} (open_timeout)",
                shared.config.open_timeout
            )));
        }
    }
}

async fn try_open(
    shared: &Shared,
    conn: &quinn::Connection,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
) -> Result<(SendStream, FramedRecv, FlowReply), StreamError> {
    let (mut send, recv) = conn.open_bi().await.map_err(|_| StreamError::Closed)?;
    if protocol == Protocol::Udp {
        // Its datagrams come back on this connection, and only this one.
        shared.udp.carried_by(flow_id, conn.stable_id());
    }
    let open = FlowOpen {
        service: service.to_string(),
        protocol,
        flow_id,
    };
    write_frame(&mut send, &open).await?;
    let mut recv = FramedRecv::new(recv);
    let reply = tokio::select! {
        r = recv.expect::<FlowReply>(REPLY_TIMEOUT) => r,
        _ = conn.closed() => Err(StreamError::Closed),
    };
    match reply {
        Ok(reply) => Ok((send, recv, reply)),
        Err(e) => {
            let _ = send.reset(VarInt::from_u32(codes::FLOW_ABORTED));
            Err(e)
        }
    }
}

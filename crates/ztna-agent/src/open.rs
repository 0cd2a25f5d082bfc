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

use crate::relays::{choose, Choice, Event, Link};
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

/// An accepted flow.
pub(crate) struct Opened {
    pub link: Arc<Link>,
    pub send: SendStream,
    pub recv: FramedRecv,
}

/// Opens a flow to `service` on the best relay, moving to the next when one cannot take it.
/// `avoid` lists relays not to use (and collects the ones this call gave up on).
pub(crate) async fn open_flow(
    shared: &Shared,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
    avoid: &mut Vec<usize>,
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
        match try_open(&link, service, protocol, flow_id).await {
            Ok((send, recv, FlowReply::Accept)) => return Ok(Opened { link, send, recv }),
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
                avoid.push(index);
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
                avoid.push(index);
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
    link: &Link,
    service: &str,
    protocol: Protocol,
    flow_id: u64,
) -> Result<(SendStream, FramedRecv, FlowReply), StreamError> {
    let (mut send, recv) = link.conn.open_bi().await.map_err(|_| StreamError::Closed)?;
    let open = FlowOpen {
        service: service.to_string(),
        protocol,
        flow_id,
    };
    write_frame(&mut send, &open).await?;
    let mut recv = FramedRecv::new(recv);
    let reply = tokio::select! {
        r = recv.expect::<FlowReply>(REPLY_TIMEOUT) => r,
        _ = link.conn.closed() => Err(StreamError::Closed),
    };
    match reply {
        Ok(reply) => Ok((send, recv, reply)),
        Err(e) => {
            let _ = send.reset(VarInt::from_u32(codes::FLOW_ABORTED));
            Err(e)
        }
    }
}

//! Messages of the ZTNA protocol.
//!
//! * The **control stream** is the first bidirectional stream a client opens. The client sends
//!   [`ClientMsg`]s, the intermediate answers with [`ServerMsg`]s. The first client message is
//!   always `Hello`, the first server message `Welcome` (or `Refused`).
//! * Every other bidirectional stream is a **flow**. It starts with one [`FlowOpen`] frame from the
//!   opener and one [`FlowReply`] frame from the other side; for TCP, raw bytes follow in both
//!   directions; for UDP, the stream stays open for the flow's lifetime and payloads travel as
//!   datagrams (see [`crate::datagram`]).

use std::net::SocketAddr;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Longest service name (and software string) a peer may send. Names come from configuration,
/// so anything longer is hostile or broken and is refused when the frame is decoded, before it
/// can reach a log line or a table.
pub const MAX_NAME_LEN: usize = 128;
/// Longest free-text reason a peer may send.
pub const MAX_TEXT_LEN: usize = 1024;
/// Most entries in a list a peer may send (watched services, reconnect hints).
pub const MAX_LIST_LEN: usize = 256;

/// A message of this protocol: serde-encoded, with bounds that [`crate::frame::decode_payload`]
/// enforces beyond the frame size cap.
pub trait Message: Serialize + DeserializeOwned {
    /// Checks what the frame cap cannot: name and list lengths. The error names the field.
    fn check(&self) -> Result<(), String>;
}

fn name(field: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} of {} bytes exceeds the {MAX_NAME_LEN}-byte limit",
            s.len()
        ));
    }
    Ok(())
}

fn text(field: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_LEN {
        return Err(format!(
            "{field} of {} bytes exceeds the {MAX_TEXT_LEN}-byte limit",
            s.len()
        ));
    }
    Ok(())
}

/// Most address candidates one side may offer for a direct path.
pub const MAX_CANDIDATES: usize = 16;

fn candidates_ok(c: &[SocketAddr]) -> Result<(), String> {
    if c.len() > MAX_CANDIDATES {
        return Err(format!(
            "{} candidates, more than the limit of {MAX_CANDIDATES}",
            c.len()
        ));
    }
    Ok(())
}

fn ticket_ok(t: &[u8]) -> Result<(), String> {
    if t.len() > crate::ticket::MAX_TICKET_LEN {
        return Err(format!("ticket of {} bytes is too large", t.len()));
    }
    Ok(())
}

fn list<T>(field: &str, v: &[T], each: impl Fn(&T) -> Result<(), String>) -> Result<(), String> {
    if v.len() > MAX_LIST_LEN {
        return Err(format!(
            "{field} has {} entries, more than the limit of {MAX_LIST_LEN}",
            v.len()
        ));
    }
    v.iter().try_for_each(each)
}

/// What a peer is, as carried in its certificate's SPIFFE ID.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Connector,
    Intermediate,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
            Role::Intermediate => "intermediate",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "connector" => Some(Role::Connector),
            "intermediate" => Some(Role::Intermediate),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a flow.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Client (agent or connector) → intermediate, on the control stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// First message. `watch` lists services whose availability an agent wants pushed to it.
    Hello {
        version: u16,
        role: Role,
        software: String,
        watch: Vec<String>,
    },
    /// Connector offers a service (for the protocols it has backends for).
    Register {
        service: String,
        tcp: bool,
        udp: bool,
    },
    /// Connector stops offering a service: no new flows are routed to it.
    Deregister { service: String },
    /// Agent asks for a direct path to a connector serving `service`. `candidates` are its local
    /// addresses (the intermediate adds the address it observes).
    DirectRequest {
        service: String,
        candidates: Vec<SocketAddr>,
    },
    /// Connector's answer to a [`ServerMsg::DirectOffer`]: its local candidates, or a refusal
    /// (P2P disabled there) with the reason.
    DirectAnswer {
        request: u64,
        accepted: bool,
        candidates: Vec<SocketAddr>,
        reason: String,
    },
    /// Agent reports how a brokered attempt ended (for `ztna_intermediate_p2p_total`).
    DirectResult {
        service: String,
        success: bool,
        reason: String,
    },
    /// Agent asks for a fresh ticket for an established direct path (tickets live ≤ 60 s).
    TicketRequest { service: String, connector: String },
    /// Connector (revision 2, sent right after Welcome, before any Register): it reports the
    /// bytes it consumes per flow ([`ClientMsg::Consumed`]) and expects a [`FlowAgent`] frame
    /// after every [`FlowOpen`] on this connection. `receive_window` is its connection's
    /// flow-control window, which the intermediate's per-agent budget must stay well within.
    CreditReports { receive_window: u64 },
    /// Connector (revision 2): per flow stream (its QUIC stream id), the total payload bytes it
    /// has read so far. Lets the intermediate bound what one agent has in flight towards this
    /// connector, so one agent's stalled flows cannot fill the window all agents share.
    Consumed { flows: Vec<(u64, u64)> },
    /// Agent or connector (revision 3): its certificate was re-issued, and this connection, made
    /// with the old one, is to run on under the new one instead of ending at the old notAfter.
    /// `chain` is the new chain (DER, leaf first). `signature` is made with the new key, under
    /// TLS `scheme`, over keying material exported from this connection's TLS session for the
    /// new leaf (see `ztna_node::renew`): it proves the holder of the new key is this
    /// connection's peer, and is worth nothing on any other connection.
    Renew {
        chain: Vec<Vec<u8>>,
        scheme: u16,
        signature: Vec<u8>,
    },
}

/// Most certificates in a renewal's chain (leaf and intermediates).
pub const MAX_CHAIN_LEN: usize = 4;

/// Intermediate → client, on the control stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    /// Answer to `Hello`: our version, the identity we authenticated, and the client's address as
    /// we observe it (QUIC address discovery).
    Welcome {
        version: u16,
        identity: String,
        observed_addr: SocketAddr,
    },
    /// The connection is refused; it will be closed right after this message.
    Refused {
        reason: String,
    },
    Registered {
        service: String,
    },
    RegisterRejected {
        service: String,
        reason: String,
    },
    /// Pushed to agents for every watched service, at once and on every change.
    ServiceStatus {
        service: String,
        state: ServiceState,
        reason: String,
    },
    /// To a connector: an agent wants a direct path; punch towards `candidates` and answer with
    /// [`ClientMsg::DirectAnswer`].
    DirectOffer {
        request: u64,
        agent: String,
        service: String,
        candidates: Vec<SocketAddr>,
    },
    /// To a connector: the agent of offer `request` starts now; punch towards its candidates.
    /// Sent together with the agent's [`ServerMsg::DirectStart`] (timed so both arrive at
    /// about the same moment), so both sides open their NAT mappings at once.
    DirectGo {
        request: u64,
    },
    /// To an agent: connect directly to `connector` at one of `candidates` now (it is punching
    /// towards you) and present `ticket` there.
    DirectStart {
        service: String,
        connector: String,
        candidates: Vec<SocketAddr>,
        ticket: Vec<u8>,
    },
    /// To an agent: no direct path for `service`, and why. Flows keep using the relay.
    DirectRefused {
        service: String,
        reason: String,
    },
    /// To an agent: a fresh ticket for its direct path to `connector`.
    Ticket {
        service: String,
        connector: String,
        ticket: Vec<u8>,
    },
    /// The intermediate is draining: open no new flows here, move to another intermediate.
    /// Running flows may finish until `deadline_ms` from now.
    GoAway {
        reason: String,
        deadline_ms: u64,
        reconnect: Vec<String>,
    },
    /// Answer to [`ClientMsg::CreditReports`]: the intermediate sends the agent behind every
    /// flow ([`FlowAgent`]) and its own consumption reports; the connector keeps what one agent
    /// has unconsumed in flight towards the intermediate at or below `identity_window` bytes.
    CreditReports {
        identity_window: u64,
    },
    /// Intermediate → connector (revision 2): per flow stream, the total payload bytes the
    /// intermediate has read from it so far.
    Consumed {
        flows: Vec<(u64, u64)>,
    },
    /// Answer to [`ClientMsg::Renew`]: the connection now expires at `not_after_unix` (seconds),
    /// the new certificate's notAfter.
    Renewed {
        not_after_unix: u64,
    },
    /// Answer to [`ClientMsg::Renew`]: refused, with the reason; the connection keeps its
    /// certificate and ends at its notAfter.
    RenewRefused {
        reason: String,
    },
}

/// Whether an agent can reach a service right now.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// At least one connector serves it and policy allows this agent.
    Available,
    /// Policy allows this agent, but no connector serves it now.
    Unavailable,
    /// No policy rule lets this agent reach it.
    Denied,
}

/// First frame on a flow stream, from the side that opens it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowOpen {
    pub service: String,
    pub protocol: Protocol,
    /// For UDP: the id that prefixes this flow's datagrams on this connection. 0 for TCP.
    pub flow_id: u64,
}

/// Second frame of a flow from an intermediate to a connector that sent
/// [`ClientMsg::CreditReports`]: the agent the flow is for (its SPIFFE ID). The connector budgets
/// what it sends per agent, and names the agent in its logs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowAgent {
    pub agent: String,
}

/// Why a flow was not opened.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No policy rule allows this agent to reach the service.
    Denied,
    /// No connector currently serves the service (for that protocol).
    Unavailable,
    /// The connector could not reach its backend.
    BackendUnreachable,
    /// A limit was hit (flows per agent, ...).
    Limit,
    /// The relay is draining.
    Draining,
    /// The request was malformed or named an unknown service.
    BadRequest,
    /// Anything else.
    Error,
}

impl RejectReason {
    /// The `result` label of the flow metrics this outcome counts under.
    pub fn outcome(self) -> &'static str {
        match self {
            RejectReason::Denied => "denied",
            RejectReason::Unavailable
            | RejectReason::BackendUnreachable
            | RejectReason::Draining => "unavailable",
            RejectReason::Limit | RejectReason::BadRequest | RejectReason::Error => "error",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Denied => "denied",
            RejectReason::Unavailable => "unavailable",
            RejectReason::BackendUnreachable => "backend_unreachable",
            RejectReason::Limit => "limit",
            RejectReason::Draining => "draining",
            RejectReason::BadRequest => "bad_request",
            RejectReason::Error => "error",
        }
    }
}

/// Answer to [`FlowOpen`]; bytes flow only after `Accept`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FlowReply {
    Accept,
    Reject {
        reason: RejectReason,
        message: String,
    },
}

impl Message for ClientMsg {
    fn check(&self) -> Result<(), String> {
        match self {
            ClientMsg::Hello {
                software, watch, ..
            } => {
                name("software", software)?;
                list("watch", watch, |s| name("watched service name", s))
            }
            ClientMsg::Register { service, .. } | ClientMsg::Deregister { service } => {
                name("service name", service)
            }
            ClientMsg::DirectRequest {
                service,
                candidates,
            } => {
                name("service name", service)?;
                candidates_ok(candidates)
            }
            ClientMsg::DirectAnswer {
                candidates, reason, ..
            } => {
                text("reason", reason)?;
                candidates_ok(candidates)
            }
            ClientMsg::DirectResult {
                service, reason, ..
            } => {
                name("service name", service)?;
                text("reason", reason)
            }
            ClientMsg::TicketRequest { service, connector } => {
                name("service name", service)?;
                text("connector", connector)
            }
            ClientMsg::CreditReports { .. } => Ok(()),
            ClientMsg::Consumed { flows } => list("consumed", flows, |_| Ok(())),
            ClientMsg::Renew { chain, .. } => {
                if chain.is_empty() || chain.len() > MAX_CHAIN_LEN {
                    return Err(format!(
                        "renewal chain of {} certificates (1 to {MAX_CHAIN_LEN})",
                        chain.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Message for ServerMsg {
    fn check(&self) -> Result<(), String> {
        match self {
            ServerMsg::Welcome { identity, .. } => text("identity", identity),
            ServerMsg::Refused { reason } => text("reason", reason),
            ServerMsg::Registered { service } => name("service name", service),
            ServerMsg::RegisterRejected { service, reason }
            | ServerMsg::ServiceStatus {
                service, reason, ..
            } => {
                name("service name", service)?;
                text("reason", reason)
            }
            ServerMsg::GoAway {
                reason, reconnect, ..
            } => {
                text("reason", reason)?;
                list("reconnect", reconnect, |s| text("reconnect hint", s))
            }
            ServerMsg::DirectOffer {
                agent,
                service,
                candidates,
                ..
            } => {
                text("agent", agent)?;
                name("service name", service)?;
                candidates_ok(candidates)
            }
            ServerMsg::DirectStart {
                service,
                connector,
                candidates,
                ticket,
            } => {
                name("service name", service)?;
                text("connector", connector)?;
                candidates_ok(candidates)?;
                ticket_ok(ticket)
            }
            ServerMsg::DirectRefused { service, reason } => {
                name("service name", service)?;
                text("reason", reason)
            }
            ServerMsg::DirectGo { .. } => Ok(()),
            ServerMsg::Ticket {
                service,
                connector,
                ticket,
            } => {
                name("service name", service)?;
                text("connector", connector)?;
                ticket_ok(ticket)
            }
            ServerMsg::CreditReports { .. } => Ok(()),
            ServerMsg::Consumed { flows } => list("consumed", flows, |_| Ok(())),
            ServerMsg::Renewed { .. } => Ok(()),
            ServerMsg::RenewRefused { reason } => text("reason", reason),
        }
    }
}

/// Agent → connector on a direct connection's first stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum DirectMsg {
    /// First message: protocol version and the ticket an intermediate issued for this path.
    Hello { version: u16, ticket: Vec<u8> },
    /// A fresh ticket (tickets live ≤ 60 s; flows on the path need a valid one), or a ticket
    /// for another service of the same connector, which then shares the connection. Answered
    /// with a `DirectReply` (connectors before path sharing did not answer).
    Ticket { ticket: Vec<u8> },
}

/// Connector → agent on a direct connection's first stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum DirectReply {
    /// The ticket is good: flows for `services` (every service a valid ticket on this
    /// connection allows) may be opened until their tickets expire.
    Welcome { services: Vec<String> },
    /// Refused, with the reason. After `Hello` the connection is closed; after `Ticket` it
    /// stays, with the services of earlier tickets.
    Refused { reason: String },
}

impl Message for DirectMsg {
    fn check(&self) -> Result<(), String> {
        match self {
            DirectMsg::Hello { ticket, .. } | DirectMsg::Ticket { ticket } => ticket_ok(ticket),
        }
    }
}

impl Message for DirectReply {
    fn check(&self) -> Result<(), String> {
        match self {
            DirectReply::Welcome { services } => {
                list("services", services, |s| name("service name", s))
            }
            DirectReply::Refused { reason } => text("reason", reason),
        }
    }
}

impl Message for FlowOpen {
    fn check(&self) -> Result<(), String> {
        name("service name", &self.service)
    }
}

impl Message for FlowAgent {
    fn check(&self) -> Result<(), String> {
        text("agent", &self.agent)
    }
}

impl Message for FlowReply {
    fn check(&self) -> Result<(), String> {
        match self {
            FlowReply::Accept => Ok(()),
            FlowReply::Reject { message, .. } => text("message", message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, FrameDecoder};
    use proptest::prelude::*;
    use std::fmt::Debug;

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Agent),
            Just(Role::Connector),
            Just(Role::Intermediate)
        ]
    }
    fn proto() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
    }
    fn name() -> impl Strategy<Value = String> {
        ".{0,40}"
    }
    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }
    fn client_msg() -> impl Strategy<Value = ClientMsg> {
        prop_oneof![
            (
                any::<u16>(),
                role(),
                name(),
                proptest::collection::vec(name(), 0..5)
            )
                .prop_map(|(version, role, software, watch)| ClientMsg::Hello {
                    version,
                    role,
                    software,
                    watch
                }),
            (name(), any::<bool>(), any::<bool>())
                .prop_map(|(service, tcp, udp)| ClientMsg::Register { service, tcp, udp }),
            name().prop_map(|service| ClientMsg::Deregister { service }),
            any::<u64>().prop_map(|receive_window| ClientMsg::CreditReports { receive_window }),
            proptest::collection::vec(any::<(u64, u64)>(), 0..MAX_LIST_LEN)
                .prop_map(|flows| ClientMsg::Consumed { flows }),
            (
                proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..600),
                    1..=MAX_CHAIN_LEN
                ),
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..128)
            )
                .prop_map(|(chain, scheme, signature)| ClientMsg::Renew {
                    chain,
                    scheme,
                    signature
                }),
        ]
    }
    fn server_msg() -> impl Strategy<Value = ServerMsg> {
        prop_oneof![
            (any::<u16>(), name(), addr()).prop_map(|(version, identity, observed_addr)| {
                ServerMsg::Welcome {
                    version,
                    identity,
                    observed_addr,
                }
            }),
            name().prop_map(|reason| ServerMsg::Refused { reason }),
            name().prop_map(|service| ServerMsg::Registered { service }),
            (name(), name())
                .prop_map(|(service, reason)| ServerMsg::RegisterRejected { service, reason }),
            (name(), state(), name()).prop_map(|(service, state, reason)| {
                ServerMsg::ServiceStatus {
                    service,
                    state,
                    reason,
                }
            }),
            (
                name(),
                any::<u64>(),
                proptest::collection::vec(name(), 0..3)
            )
                .prop_map(|(reason, deadline_ms, reconnect)| ServerMsg::GoAway {
                    reason,
                    deadline_ms,
                    reconnect
                }),
            any::<u64>().prop_map(|identity_window| ServerMsg::CreditReports { identity_window }),
            proptest::collection::vec(any::<(u64, u64)>(), 0..MAX_LIST_LEN)
                .prop_map(|flows| ServerMsg::Consumed { flows }),
            any::<u64>().prop_map(|not_after_unix| ServerMsg::Renewed { not_after_unix }),
            name().prop_map(|reason| ServerMsg::RenewRefused { reason }),
        ]
    }
    fn state() -> impl Strategy<Value = ServiceState> {
        prop_oneof![
            Just(ServiceState::Available),
            Just(ServiceState::Unavailable),
            Just(ServiceState::Denied),
        ]
    }
    fn reject_reason() -> impl Strategy<Value = RejectReason> {
        prop_oneof![
            Just(RejectReason::Denied),
            Just(RejectReason::Unavailable),
            Just(RejectReason::BackendUnreachable),
            Just(RejectReason::Limit),
            Just(RejectReason::Draining),
            Just(RejectReason::BadRequest),
            Just(RejectReason::Error),
        ]
    }

    fn round_trip<T: Message + PartialEq + Debug>(msg: &T) {
        let wire = frame::encode(msg).unwrap();
        let mut d = FrameDecoder::new();
        d.extend(&wire);
        let back: T = d.next_msg().unwrap().unwrap();
        assert_eq!(&back, msg);
        assert_eq!(d.pending(), 0);
    }

    proptest! {
        #[test]
        fn client_msg_round_trip(m in client_msg()) { round_trip(&m); }
        #[test]
        fn server_msg_round_trip(m in server_msg()) { round_trip(&m); }
        #[test]
        fn flow_open_round_trip(service in name(), protocol in proto(), flow_id in any::<u64>()) {
            round_trip(&FlowOpen { service, protocol, flow_id });
        }
        #[test]
        fn flow_agent_round_trip(agent in name()) {
            round_trip(&FlowAgent { agent });
        }
        #[test]
        fn flow_reply_round_trip(reason in reject_reason(), message in name(), accept in any::<bool>()) {
            let m = if accept { FlowReply::Accept } else { FlowReply::Reject { reason, message } };
            round_trip(&m);
        }

        #[test]
        fn oversized_names_are_refused_at_decode(len in (MAX_NAME_LEN + 1)..(4 * MAX_NAME_LEN)) {
            // Encoded like a well-formed message, refused for its bounds, naming the field.
            let open = frame::encode(&FlowOpen { service: "s".repeat(len), protocol: Protocol::Tcp, flow_id: 0 }).unwrap();
            let reg = frame::encode(&ClientMsg::Register { service: "s".repeat(len), tcp: true, udp: false }).unwrap();
            let e1 = frame::decode_payload::<FlowOpen>(&open[frame::HEADER_LEN..]).unwrap_err().to_string();
            let e2 = frame::decode_payload::<ClientMsg>(&reg[frame::HEADER_LEN..]).unwrap_err().to_string();
            for e in [e1, e2] {
                prop_assert!(e.contains("service name") && e.contains("limit"), "{}", e);
            }
            let ok = frame::encode(&FlowOpen { service: "s".repeat(MAX_NAME_LEN), protocol: Protocol::Tcp, flow_id: 0 }).unwrap();
            prop_assert!(frame::decode_payload::<FlowOpen>(&ok[frame::HEADER_LEN..]).is_ok());
        }

        #[test]
        fn a_renewal_without_a_chain_or_with_too_long_a_one_is_refused_at_decode(n in prop_oneof![Just(0usize), (MAX_CHAIN_LEN + 1)..(3 * MAX_CHAIN_LEN)]) {
            let m = frame::encode(&ClientMsg::Renew { chain: vec![vec![1, 2, 3]; n], scheme: 0x0403, signature: vec![] }).unwrap();
            let e = frame::decode_payload::<ClientMsg>(&m[frame::HEADER_LEN..]).unwrap_err().to_string();
            prop_assert!(e.contains("renewal chain"), "{}", e);
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = frame::decode_payload::<ClientMsg>(&bytes);
            let _ = frame::decode_payload::<ServerMsg>(&bytes);
            let _ = frame::decode_payload::<FlowOpen>(&bytes);
            let _ = frame::decode_payload::<FlowReply>(&bytes);
            let _ = frame::decode_payload::<FlowAgent>(&bytes);
        }

        #[test]
        fn too_many_consumption_entries_are_refused(extra in 1usize..64) {
            let m = ClientMsg::Consumed { flows: vec![(0, 0); MAX_LIST_LEN + extra] };
            let wire = frame::encode(&m).unwrap();
            let e = frame::decode_payload::<ClientMsg>(&wire[frame::HEADER_LEN..]).unwrap_err().to_string();
            prop_assert!(e.contains("consumed"), "{}", e);
        }
    }
}

//! ZTNA wire protocol: every message type and codec, no I/O (the quinn-proto split).
//!
//! * [`frame`]: length-prefixed frames with a hard size cap, used on every stream header and on the
//!   control stream.
//! * [`msg`]: the messages carried in those frames (Hello/Welcome, Register, ServiceStatus, GoAway,
//!   flow open/accept/reject).
//! * [`varint`]: QUIC variable-length integers, used to prefix UDP payload datagrams with a flow id.
//! * [`datagram`]: encode/decode of `flow id + payload` datagrams without copying the payload.

pub mod datagram;
pub mod frame;
pub mod msg;
pub mod ticket;
pub mod varint;

pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use msg::*;

/// ALPN protocol identifier negotiated by every ZTNA QUIC connection.
pub const ALPN: &[u8] = b"ztna/1";

/// Version carried in `Hello`. A peer with a different major version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Revision carried in `Welcome`: what the intermediate understands beyond version 1. Clients
/// still say version 1 in `Hello` (so older intermediates accept them) and use a later
/// revision's messages only when `Welcome` announces it; older clients ignore the field.
///
/// * 2: flow credit. A connector may send [`ClientMsg::CreditReports`] and
///   [`ClientMsg::Consumed`]; the intermediate then adds [`FlowAgent`] to every flow it opens
///   there and reports what it consumes with [`ServerMsg::Consumed`].
/// * 3: certificate renewal in place. A client may send [`ClientMsg::Renew`] with its re-issued
///   certificate; the intermediate answers [`ServerMsg::Renewed`] (the connection now expires
///   with the new certificate) or [`ServerMsg::RenewRefused`].
pub const PROTOCOL_REVISION: u16 = 3;

/// Application error codes used to close connections and reset streams.
///
/// They show up in the peer's logs as `closed by peer: <code>`, so each has a stable meaning.
pub mod codes {
    /// Normal close, nothing went wrong.
    pub const OK: u32 = 0;
    /// The peer violated the protocol (malformed/oversized frame, wrong message, unknown version).
    pub const PROTOCOL: u32 = 1;
    /// The peer's identity is not allowed to do what it attempted (wrong role, policy).
    pub const UNAUTHORIZED: u32 = 2;
    /// The sender is draining (GoAway was sent) and is now closing.
    pub const DRAINING: u32 = 3;
    /// A limit was hit (too many flows, too many streams).
    pub const LIMIT: u32 = 4;
    /// Flow-level: the other side of a relayed flow went away.
    pub const FLOW_ABORTED: u32 = 5;
    /// Flow-level: the local TCP peer reset the connection (maps TCP RST onto the stream).
    pub const FLOW_RESET: u32 = 6;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 7;
    /// Unsupported protocol version.
    pub const VERSION: u32 = 8;
    /// Flow-level: no byte in either direction for the configured idle timeout.
    pub const IDLE: u32 = 9;
    /// Connection or flow: the peer's certificate expired, its CA is no longer trusted, or the
    /// policy no longer allows what it carries.
    pub const REVOKED: u32 = 10;

    /// Human-readable name of a code, for logs.
    pub fn name(code: u64) -> &'static str {
        match code {
            0 => "ok",
            1 => "protocol violation",
            2 => "unauthorized",
            3 => "draining",
            4 => "limit exceeded",
            5 => "flow aborted",
            6 => "reset by peer",
            7 => "shutdown",
            8 => "unsupported protocol version",
            9 => "idle timeout",
            10 => "access revoked",
            _ => "unknown",
        }
    }
}

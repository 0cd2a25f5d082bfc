//! Sending QUIC datagrams without silent loss: quinn's `send_datagram` discards the *oldest*
//! queued datagrams when its buffer is full and nobody would know; here a full buffer is an
//! outcome the caller counts, and a payload too large for the path is one it can carry another
//! way (on the flow's stream).

use bytes::Bytes;

/// What happened to a datagram handed to [`send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Larger than the path currently allows.
    TooLarge,
    /// The send buffer is full (congestion): dropped instead of evicting older datagrams.
    BufferFull,
    /// The connection is gone.
    Gone,
}

/// Queues `d` on `conn` unless that would drop older datagrams or it cannot fit the path.
pub fn send(conn: &quinn::Connection, d: Bytes) -> Sent {
    match conn.max_datagram_size() {
        None => return Sent::Gone,
        Some(max) if d.len() > max => return Sent::TooLarge,
        _ => {}
    }
    if conn.datagram_send_buffer_space() < d.len() {
        return Sent::BufferFull;
    }
    match conn.send_datagram(d) {
        Ok(()) => Sent::Queued,
        Err(quinn::SendDatagramError::TooLarge) => Sent::TooLarge,
        Err(_) => Sent::Gone,
    }
}

/// Whether a datagram of `len` bytes (header included) fits `conn`'s path now.
pub fn fits(conn: &quinn::Connection, len: usize) -> bool {
    conn.max_datagram_size().is_some_and(|max| len <= max)
}

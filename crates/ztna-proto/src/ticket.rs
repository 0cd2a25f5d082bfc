//! Direct-path tickets: what an intermediate vouches for when it brokers a direct agent ↔
//! connector connection. Policy lives only at the intermediate, so the connector accepts a direct
//! connection (and flows on it) only with a ticket an intermediate it is registered with signed,
//! binding the agent's SPIFFE ID, the connector's, the services and a short expiry.
//!
//! Wire form: `postcard(Ticket)`, where `body` is `postcard(TicketBody)` and `signature` is the
//! intermediate's signature over `body` with its certificate's key (`scheme` is the TLS
//! SignatureScheme code). Signing and verifying live with the keys (ztna-node); this module only
//! encodes.

use serde::{Deserialize, Serialize};

/// Tickets are small; anything larger is refused before it is parsed.
pub const MAX_TICKET_LEN: usize = 4096;
/// The longest a ticket may live.
pub const MAX_TICKET_LIFETIME_MS: u64 = 60_000;

/// What the ticket says.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TicketBody {
    /// SPIFFE ID of the intermediate that issued it (whose key signed it).
    pub intermediate: String,
    /// SPIFFE ID of the agent it was issued to (must match the direct connection's client).
    pub agent: String,
    /// SPIFFE ID of the connector it is for.
    pub connector: String,
    /// Services the agent may open flows to on the direct path.
    pub services: Vec<String>,
    /// Unix time (ms) after which it is void.
    pub not_after_ms: u64,
}

/// A signed ticket.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub body: Vec<u8>,
    /// TLS SignatureScheme code of `signature`.
    pub scheme: u16,
    pub signature: Vec<u8>,
}

impl Ticket {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Ticket, String> {
        if bytes.len() > MAX_TICKET_LEN {
            return Err(format!("ticket of {} bytes is too large", bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| format!("malformed ticket: {e}"))
    }

    pub fn body(&self) -> Result<TicketBody, String> {
        postcard::from_bytes(&self.body).map_err(|e| format!("malformed ticket body: {e}"))
    }
}

impl TicketBody {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let body = TicketBody {
            intermediate: "spiffe://t/intermediate/r".into(),
            agent: "spiffe://t/agent/a".into(),
            connector: "spiffe://t/connector/c".into(),
            services: vec!["web".into()],
            not_after_ms: 1,
        };
        let t = Ticket {
            body: body.encode(),
            scheme: 0x0403,
            signature: vec![1, 2, 3],
        };
        let back = Ticket::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.body().unwrap(), body);
        assert!(Ticket::decode(&vec![0u8; MAX_TICKET_LEN + 1])
            .unwrap_err()
            .contains("too large"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(t) = Ticket::decode(&bytes) {
                let _ = t.body();
            }
        }
    }
}

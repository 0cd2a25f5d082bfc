//! Length-prefixed frames: `u32 big-endian length ‖ payload`, with a hard cap on the length.
//!
//! The cap is checked before any payload byte is buffered, so a peer announcing a 4 GiB frame
//! costs us four bytes of reading, not an allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use thiserror::Error;

use crate::msg::Message;

/// Hard cap on one frame's payload. Control messages and flow headers are tiny; 64 KiB leaves
/// room for a long registration list while bounding what a peer can make us buffer.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Serializes `msg` into a complete frame (prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    Ok(out.freeze())
}

/// Deserializes one frame's payload (without the prefix) and checks the message's bounds
/// ([`Message::check`]). Trailing bytes are an error: a frame holds exactly one message.
pub fn decode_payload<T: Message>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    msg.check().map_err(FrameError::Malformed)?;
    Ok(msg)
}

/// The length prefix of a raw frame carrying `len` bytes (an opaque payload such as a UDP
/// datagram too large for one QUIC datagram).
pub fn raw_header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok((len as u32).to_be_bytes())
}

/// Checks a length prefix against the cap.
pub fn check_len(prefix: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Incremental frame decoder for byte streams that arrive in arbitrary pieces.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete frame's payload, `Ok(None)` if more bytes are needed, or an error
    /// as soon as the announced length exceeds the cap.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut prefix = [0u8; HEADER_LEN];
        prefix.copy_from_slice(&self.buf[..HEADER_LEN]);
        let len = check_len(prefix)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Decodes the next complete message, if any.
    pub fn next_msg<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame()? {
            Some(payload) => decode_payload(&payload).map(Some),
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet returned; non-zero at end of stream means a truncated frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes buffered past the last complete frame (data a peer sent after a header).
    pub fn take_pending(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::ClientMsg;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut d = FrameDecoder::new();
        d.extend(&u32::MAX.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let msg = ClientMsg::Deregister {
            service: "x".repeat(MAX_FRAME_LEN + 1),
        };
        assert!(matches!(encode(&msg), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut f = encode(&ClientMsg::Deregister {
            service: "web".into(),
        })
        .unwrap()
        .to_vec();
        f.push(0);
        f[3] += 1;
        let mut d = FrameDecoder::new();
        d.extend(&f);
        assert!(matches!(
            d.next_msg::<ClientMsg>(),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn split_anywhere_round_trip(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend_from_slice(&(p.len() as u32).to_be_bytes());
                wire.extend_from_slice(p);
            }
            let cut = cut.index(wire.len() + 1);
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in [&wire[..cut], &wire[cut..]] {
                d.extend(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert_eq!(got, payloads);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new();
            d.extend(&bytes);
            while let Ok(Some(_)) = d.next_msg::<ClientMsg>() {}
        }
    }
}

//! UDP payload datagrams: `varint(flow id) ‖ payload`. The flow id is scoped to one QUIC
//! connection; the intermediate rewrites it on each hop.

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint::{self, VarIntError};

/// Largest header a datagram can carry (an 8-byte varint).
pub const MAX_HEADER_LEN: usize = 8;

/// Splits a received datagram into its flow id and payload. The payload is a slice of the same
/// buffer: no copy, no allocation.
pub fn decode(datagram: &Bytes) -> Result<(u64, Bytes), VarIntError> {
    let (id, n) = varint::decode(datagram)?;
    Ok((id, datagram.slice(n..)))
}

/// Appends `varint(flow id) ‖ payload` to `arena` and returns it as a frozen `Bytes`.
///
/// `arena` is a long-lived buffer owned by the caller: frozen chunks are split off its front, so
/// once quinn has sent (and dropped) earlier datagrams the same allocation is reused. In steady
/// state this allocates one arena chunk per `ARENA_CHUNK / datagram size` datagrams, not one per
/// datagram.
pub fn encode_into(
    arena: &mut BytesMut,
    flow_id: u64,
    payload: &[u8],
) -> Result<Bytes, VarIntError> {
    reserve(arena, MAX_HEADER_LEN + payload.len());
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = varint::encode(flow_id, &mut hdr)?;
    arena.put_slice(&hdr[..n]);
    arena.put_slice(payload);
    Ok(arena.split().freeze())
}

/// Size of the arena chunks used by [`encode_into`] and [`reserve`].
pub const ARENA_CHUNK: usize = 256 * 1024;

/// Makes room for `need` more bytes in `arena`, reclaiming or allocating a whole chunk at a time.
pub fn reserve(arena: &mut BytesMut, need: usize) {
    if arena.capacity() - arena.len() < need {
        arena.reserve(ARENA_CHUNK.max(need));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(id in 0..=varint::MAX, payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut arena = BytesMut::new();
            let d = encode_into(&mut arena, id, &payload).unwrap();
            let (id2, p2) = decode(&d).unwrap();
            prop_assert_eq!(id2, id);
            prop_assert_eq!(&p2[..], &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }

    #[test]
    fn arena_reuses_allocation() {
        let mut arena = BytesMut::new();
        let first = encode_into(&mut arena, 1, &[0u8; 1000]).unwrap();
        let ptr = first.as_ptr();
        drop(first);
        // Many datagrams come from the same chunk while the chunk has room.
        let mut ptrs = Vec::new();
        for i in 0..100u64 {
            let d = encode_into(&mut arena, i, &[1u8; 1000]).unwrap();
            ptrs.push(d.as_ptr() as usize);
        }
        let base = ptr as usize;
        assert!(ptrs
            .iter()
            .all(|p| *p >= base && *p < base + ARENA_CHUNK + 8));
    }
}

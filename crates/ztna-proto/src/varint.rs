//! QUIC variable-length integers (RFC 9000 §16): 1, 2, 4 or 8 bytes, the two top bits of the
//! first byte giving the length. Values up to 2^62-1.

use thiserror::Error;

/// Largest value a varint can hold.
pub const MAX: u64 = (1 << 62) - 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VarIntError {
    #[error("varint truncated")]
    Truncated,
    #[error("value {0} does not fit a varint")]
    TooLarge(u64),
}

/// Number of bytes `v` takes when encoded minimally.
pub fn encoded_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Encodes `v` into the front of `out`, returning the number of bytes written.
pub fn encode(v: u64, out: &mut [u8]) -> Result<usize, VarIntError> {
    if v > MAX {
        return Err(VarIntError::TooLarge(v));
    }
    let len = encoded_len(v);
    if out.len() < len {
        return Err(VarIntError::Truncated);
    }
    let tag: u64 = match len {
        1 => 0b00,
        2 => 0b01,
        4 => 0b10,
        _ => 0b11,
    };
    let word = v | (tag << (len * 8 - 2));
    out[..len].copy_from_slice(&word.to_be_bytes()[8 - len..]);
    Ok(len)
}

/// Decodes a varint from the front of `buf`, returning the value and the bytes consumed.
pub fn decode(buf: &[u8]) -> Result<(u64, usize), VarIntError> {
    let first = *buf.first().ok_or(VarIntError::Truncated)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len).ok_or(VarIntError::Truncated)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Ok((v, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 §A.1 sample encodings.
        assert_eq!(
            decode(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]).unwrap(),
            (151_288_809_941_952_652, 8)
        );
        assert_eq!(decode(&[0x9d, 0x7f, 0x3e, 0x7d]).unwrap(), (494_878_333, 4));
        assert_eq!(decode(&[0x7b, 0xbd]).unwrap(), (15_293, 2));
        assert_eq!(decode(&[0x25]).unwrap(), (37, 1));
        let mut b = [0u8; 8];
        assert_eq!(encode(15_293, &mut b).unwrap(), 2);
        assert_eq!(&b[..2], &[0x7b, 0xbd]);
    }

    #[test]
    fn rejects_too_large_and_truncated() {
        let mut b = [0u8; 8];
        assert_eq!(encode(MAX + 1, &mut b), Err(VarIntError::TooLarge(MAX + 1)));
        assert_eq!(encode(1 << 20, &mut b[..2]), Err(VarIntError::Truncated));
        assert_eq!(decode(&[0x9d, 0x7f]), Err(VarIntError::Truncated));
        assert_eq!(decode(&[]), Err(VarIntError::Truncated));
    }

    proptest! {
        #[test]
        fn round_trip(v in 0..=MAX) {
            let mut b = [0u8; 8];
            let n = encode(v, &mut b).unwrap();
            prop_assert_eq!(n, encoded_len(v));
            prop_assert_eq!(decode(&b[..n]).unwrap(), (v, n));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = decode(&bytes);
        }
    }
}

//! The wire encoding of the control channel. This is the only module that knows bincode:
//! everything else calls [`encode`] and [`decode`], so the codec can be swapped without
//! touching the message definitions or the channel.
//!
//! The configuration is fixed (little endian, variable-length integers) and carries a hard
//! byte limit, so a hostile length prefix can never make the decoder allocate more than
//! [`MAX_ENCODED_SIZE`] bytes. Inputs larger than the limit are refused before decoding,
//! encodings larger than the limit are refused while encoding (into a bounded buffer), and
//! trailing bytes after a complete value are an error: one datagram carries one value.

use bincode::config::{Configuration, LittleEndian, Varint};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest encoded value, in bytes, in either direction.
pub const MAX_ENCODED_SIZE: usize = 64 * 1024;

/// Bound on what decoding one value may allocate. bincode's limit does not count input
/// bytes (those are bounded by [`MAX_ENCODED_SIZE`] before decoding starts): it counts
/// what the decoder claims, i.e. every primitive at its full in-memory width and every
/// container's length up front (so a hostile length prefix fails before any allocation).
/// A byte string is claimed twice (container and elements) and a varint-encoded `u64`
/// takes 1 input byte but claims 8, hence the headroom over the input bound.
pub const MAX_DECODE_CLAIM: usize = 4 * MAX_ENCODED_SIZE;

type WireConfig = Configuration<LittleEndian, Varint, bincode::config::Limit<MAX_DECODE_CLAIM>>;

const fn config() -> WireConfig {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_DECODE_CLAIM>()
}

/// Errors of [`encode`] and [`decode`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value does not fit in [`MAX_ENCODED_SIZE`] bytes.
    #[error("encoded value exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The value could not be encoded.
    #[error("failed to encode value")]
    Encode(#[source] bincode::error::EncodeError),
    /// The input is longer than [`MAX_ENCODED_SIZE`].
    #[error("input of {size} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// Length of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The input is not a valid encoding of the expected type.
    #[error("failed to decode {size}-byte input")]
    Decode {
        /// Length of the input.
        size: usize,
        /// What bincode reported.
        #[source]
        source: bincode::error::DecodeError,
    },
    /// A complete value was decoded but bytes were left over.
    #[error("{trailing} trailing bytes after a {consumed}-byte value")]
    TrailingBytes {
        /// Bytes the value used.
        consumed: usize,
        /// Bytes left over.
        trailing: usize,
    },
}

/// Encodes `value`; fails if the encoding would exceed [`MAX_ENCODED_SIZE`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Encoding into a bounded buffer means an oversized value fails early instead of
    // growing a vector without bound.
    let mut buf = vec![0u8; MAX_ENCODED_SIZE];
    match bincode::serde::encode_into_slice(value, &mut buf, config()) {
        Ok(len) => {
            buf.truncate(len);
            Ok(buf)
        }
        Err(bincode::error::EncodeError::UnexpectedEnd) => Err(CodecError::OutputTooLarge {
            limit: MAX_ENCODED_SIZE,
        }),
        Err(e) => Err(CodecError::Encode(e)),
    }
}

/// Decodes exactly one `T` from `bytes`; the input must be no longer than
/// [`MAX_ENCODED_SIZE`] and must contain nothing after the value.
///
/// The result is only syntactically valid: callers that receive it from a peer must still
/// run the message's `Validate::validate` (the channel's `recv` does).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_ENCODED_SIZE {
        return Err(CodecError::InputTooLarge {
            size: bytes.len(),
            limit: MAX_ENCODED_SIZE,
        });
    }
    let (value, consumed) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|source| {
            CodecError::Decode {
                size: bytes.len(),
                source,
            }
        })?;
    if consumed != bytes.len() {
        return Err(CodecError::TrailingBytes {
            consumed,
            trailing: bytes.len().saturating_sub(consumed),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Sample {
        Unit,
        Named { id: String, n: u64, flags: Vec<u8> },
        Tuple(u32, bool),
    }

    /// Small deterministic PRNG (xorshift64*), enough to produce garbage inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn samples() -> Vec<Sample> {
        vec![
            Sample::Unit,
            Sample::Named {
                id: "blk0".into(),
                n: u64::MAX,
                flags: vec![1, 2, 3],
            },
            Sample::Tuple(7, true),
        ]
    }

    #[test]
    fn round_trip() {
        for s in samples() {
            let bytes = encode(&s).unwrap();
            assert_eq!(decode::<Sample>(&bytes).unwrap(), s);
        }
    }

    #[test]
    fn largest_byte_string_round_trips() {
        let v = Sample::Named {
            id: "x".repeat(100),
            n: 1,
            flags: vec![0xa5; MAX_ENCODED_SIZE - 200],
        };
        let bytes = encode(&v).unwrap();
        assert!(bytes.len() <= MAX_ENCODED_SIZE);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), v);
    }

    #[test]
    fn oversized_value_refused_on_encode() {
        let big = Sample::Named {
            id: String::new(),
            n: 0,
            flags: vec![0; MAX_ENCODED_SIZE],
        };
        assert!(matches!(
            encode(&big),
            Err(CodecError::OutputTooLarge {
                limit: MAX_ENCODED_SIZE
            })
        ));
    }

    #[test]
    fn oversized_input_refused_on_decode() {
        let input = vec![0u8; MAX_ENCODED_SIZE + 1];
        let err = decode::<Sample>(&input).unwrap_err();
        assert!(
            matches!(err, CodecError::InputTooLarge { size, .. } if size == MAX_ENCODED_SIZE + 1)
        );
    }

    #[test]
    fn huge_length_prefix_rejected_without_allocation() {
        // Variant 1 (Named), then a string length of u64::MAX in varint form (0xff + 8 bytes).
        let mut input = vec![1u8, 0xff];
        input.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&input),
            Err(CodecError::Decode { .. })
        ));
        // A length just above the claim limit.
        let mut input = vec![1u8, 0xfc];
        input.extend_from_slice(&((MAX_DECODE_CLAIM as u32) + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&input),
            Err(CodecError::Decode { .. })
        ));
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut bytes = encode(&Sample::Tuple(1, false)).unwrap();
        let len = bytes.len();
        bytes.push(0);
        let err = decode::<Sample>(&bytes).unwrap_err();
        assert!(
            matches!(err, CodecError::TrailingBytes { consumed, trailing: 1 } if consumed == len)
        );
    }

    #[test]
    fn garbage_and_truncated_inputs_do_not_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (rng.next() % 64) as usize;
            let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = decode::<Sample>(&input);
        }
        for s in samples() {
            let bytes = encode(&s).unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    decode::<Sample>(&bytes[..cut]).is_err(),
                    "prefix {cut} decoded"
                );
            }
        }
        // Invalid UTF-8 in a string and an unknown variant are errors.
        assert!(decode::<Sample>(&[1, 1, 0xff, 0, 0]).is_err());
        assert!(decode::<Sample>(&[9]).is_err());
    }
}

//! The Datagram Extended Transport Header (DETH, 8 bytes) carried by UD packets.

use crate::bytes::{array, get_u24, get_u32, out_slice, put_u24, put_u32};
use crate::WireError;

/// The General Services Interface QP number (QP1), where CM MADs are sent and received.
pub const GSI_QP: u32 = 1;

/// The well-known Q_Key of QP1.
pub const GSI_QKEY: u32 = 0x8001_0000;

/// Datagram Extended Transport Header.
///
/// | byte | field |
/// |---|---|
/// | 0–3 | Q_Key |
/// | 4 | reserved |
/// | 5–7 | SrcQP (24) |
///
/// The reserved byte is ignored when parsing and written as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Deth {
    /// Queue key the sender presents to the destination QP.
    pub q_key: u32,
    /// Source QP number (24 bits; truncated when written).
    pub src_qp: u32,
}

impl Deth {
    /// Size on the wire.
    pub const LEN: usize = 8;

    /// The DETH of a QP1 (GSI) packet: Q_Key 0x80010000, SrcQP 1.
    pub const GSI: Deth = Deth {
        q_key: GSI_QKEY,
        src_qp: GSI_QP,
    };

    /// Parses the first 8 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Deth, WireError> {
        Ok(Deth::from_bytes(array::<8>(input, "DETH")?))
    }

    /// Decodes a DETH from its 8 bytes.
    pub fn from_bytes(b: &[u8; 8]) -> Deth {
        Deth {
            q_key: get_u32(b, 0),
            src_qp: get_u24(b, 5),
        }
    }

    /// Encodes the DETH.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        put_u32(&mut b, 0, self.q_key);
        put_u24(&mut b, 5, self.src_qp);
        b
    }

    /// Writes the DETH to the start of `out`, returning 8.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "DETH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_at_their_offsets() {
        assert_eq!(Deth::GSI.to_bytes(), [0x80, 0x01, 0, 0, 0, 0, 0, 1]);
        let d = Deth {
            q_key: 0x0123_4567,
            src_qp: 0xAB_CDEF,
        };
        assert_eq!(d.to_bytes(), [0x01, 0x23, 0x45, 0x67, 0, 0xAB, 0xCD, 0xEF]);
        assert_eq!(Deth::parse(&d.to_bytes()), Ok(d));
        assert_eq!(Deth::from_bytes(&[0, 0, 0, 0, 0xff, 0, 0, 2]).src_qp, 2);
        for n in 0..8 {
            assert!(Deth::parse(&[0u8; 8][..n]).is_err());
        }
    }
}

//! The Base Transport Header (BTH, 12 bytes), first header of every RoCEv2 UDP payload.

use crate::bytes::{array, bits, get_u16, get_u24, out_slice, place, put_u16, put_u24};
use crate::WireError;

/// The default (full-membership) partition key.
pub const DEFAULT_P_KEY: u16 = 0xFFFF;

/// Largest value of a 24-bit field (QPN, PSN).
pub const MAX_U24: u32 = 0x00FF_FFFF;

/// Base Transport Header.
///
/// Layout (bit fields numbered from the most significant bit):
///
/// | byte | field |
/// |---|---|
/// | 0 | OpCode |
/// | 1 | SE (1) · M (1) · PadCnt (2) · TVer (4) |
/// | 2–3 | P_Key |
/// | 4 | FECN (1) · BECN (1) · reserved (6) |
/// | 5–7 | DestQP (24) |
/// | 8 | AckReq (1) · reserved (7) |
/// | 9–11 | PSN (24) |
///
/// Reserved bits are ignored when parsing and written as zero. Values wider than their field
/// are truncated when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Bth {
    /// OpCode: transport (top 3 bits) and operation (low 5 bits); see [`crate::opcode`].
    pub opcode: u8,
    /// Solicited Event.
    pub solicited_event: bool,
    /// MigReq (path migration state).
    pub mig_req: bool,
    /// PadCnt: 0–3 bytes of padding before the ICRC that bring the payload to a multiple of 4.
    pub pad_count: u8,
    /// Transport header version (0 in this specification generation).
    pub transport_version: u8,
    /// Partition key.
    pub p_key: u16,
    /// Forward explicit congestion notification.
    pub fecn: bool,
    /// Backward explicit congestion notification.
    pub becn: bool,
    /// Destination QP (24 bits).
    pub dest_qp: u32,
    /// Acknowledge request.
    pub ack_req: bool,
    /// Packet sequence number (24 bits).
    pub psn: u32,
}

impl Bth {
    /// Size on the wire.
    pub const LEN: usize = 12;

    /// Parses the first 12 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Bth, WireError> {
        Ok(Bth::from_bytes(array::<12>(input, "BTH")?))
    }

    /// Decodes a BTH from its 12 bytes.
    pub fn from_bytes(b: &[u8; 12]) -> Bth {
        Bth {
            opcode: b[0],
            solicited_event: bits(b[1], 0, 1) != 0,
            mig_req: bits(b[1], 1, 1) != 0,
            pad_count: bits(b[1], 2, 2),
            transport_version: bits(b[1], 4, 4),
            p_key: get_u16(b, 2),
            fecn: bits(b[4], 0, 1) != 0,
            becn: bits(b[4], 1, 1) != 0,
            dest_qp: get_u24(b, 5),
            ack_req: bits(b[8], 0, 1) != 0,
            psn: get_u24(b, 9),
        }
    }

    /// Encodes the BTH.
    pub fn to_bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.opcode;
        b[1] = place(self.solicited_event.into(), 0, 1)
            | place(self.mig_req.into(), 1, 1)
            | place(self.pad_count, 2, 2)
            | place(self.transport_version, 4, 4);
        put_u16(&mut b, 2, self.p_key);
        b[4] = place(self.fecn.into(), 0, 1) | place(self.becn.into(), 1, 1);
        put_u24(&mut b, 5, self.dest_qp);
        b[8] = place(self.ack_req.into(), 0, 1);
        put_u24(&mut b, 9, self.psn);
        b
    }

    /// Writes the BTH to the start of `out`, returning 12.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, WireError> {
        out_slice(out, Self::LEN, "BTH")?.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_at_its_offset() {
        let base = Bth::default().to_bytes();
        assert_eq!(base, [0; 12]);
        let cases: [(Bth, [u8; 12]); 11] = [
            (
                Bth {
                    opcode: 0x64,
                    ..Bth::default()
                },
                [0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    solicited_event: true,
                    ..Bth::default()
                },
                [0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    mig_req: true,
                    ..Bth::default()
                },
                [0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    pad_count: 3,
                    ..Bth::default()
                },
                [0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    transport_version: 0xf,
                    ..Bth::default()
                },
                [0, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    p_key: 0x8123,
                    ..Bth::default()
                },
                [0, 0, 0x81, 0x23, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    fecn: true,
                    ..Bth::default()
                },
                [0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    becn: true,
                    ..Bth::default()
                },
                [0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Bth {
                    dest_qp: 0x123456,
                    ..Bth::default()
                },
                [0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0, 0, 0, 0],
            ),
            (
                Bth {
                    ack_req: true,
                    ..Bth::default()
                },
                [0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0],
            ),
            (
                Bth {
                    psn: 0xf9b3fb,
                    ..Bth::default()
                },
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf9, 0xb3, 0xfb],
            ),
        ];
        for (bth, bytes) in cases {
            assert_eq!(bth.to_bytes(), bytes, "{bth:?}");
            assert_eq!(Bth::from_bytes(&bytes), bth);
        }
    }

    #[test]
    fn reserved_bits_ignored_and_wide_values_truncated() {
        let b = Bth::from_bytes(&[0x04, 0, 0xff, 0xff, 0x3f, 0, 0, 0x11, 0x7f, 0, 0, 1]);
        assert!(!b.fecn && !b.becn && !b.ack_req);
        assert_eq!(
            b.to_bytes(),
            [0x04, 0, 0xff, 0xff, 0, 0, 0, 0x11, 0, 0, 0, 1]
        );
        let wide = Bth {
            dest_qp: 0xff00_0001,
            psn: 0x0100_0002,
            pad_count: 7,
            ..Bth::default()
        };
        let b = wide.to_bytes();
        assert_eq!(&b[5..8], &[0, 0, 1]);
        assert_eq!(&b[9..12], &[0, 0, 2]);
        assert_eq!(b[1], 0x30);
    }

    #[test]
    fn short_input_is_an_error() {
        for n in 0..12 {
            assert_eq!(
                Bth::parse(&[0u8; 12][..n]),
                Err(WireError::TooShort {
                    what: "BTH",
                    len: n,
                    need: 12
                })
            );
        }
        let mut out = [0u8; 11];
        assert!(Bth::default().write(&mut out).is_err());
    }
}

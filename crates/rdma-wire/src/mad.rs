//! Management datagrams (MADs): the 256-byte messages carried on QP1, and their 24-byte common
//! header.

use crate::bytes::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::WireError;

/// Size of a MAD.
pub const MAD_SIZE: usize = 256;

/// Size of the common MAD header.
pub const MAD_HEADER_LEN: usize = 24;

/// A whole MAD.
pub type Mad = [u8; MAD_SIZE];

/// The base version of every MAD in use.
pub const BASE_VERSION: u8 = 1;

/// Management classes.
pub mod class {
    /// Subnet management, LID routed.
    pub const SUBN_LID_ROUTED: u8 = 0x01;
    /// Subnet administration.
    pub const SUBN_ADM: u8 = 0x03;
    /// Performance management.
    pub const PERF_MGMT: u8 = 0x04;
    /// Baseboard management.
    pub const BM: u8 = 0x05;
    /// Device management.
    pub const DEV_MGT: u8 = 0x06;
    /// Communication management.
    pub const CM: u8 = 0x07;
    /// SNMP tunneling.
    pub const SNMP: u8 = 0x08;
    /// Subnet management, directed route.
    pub const SUBN_DIRECTED_ROUTE: u8 = 0x81;
}

/// The CM class version (IBA 1.2 and later).
pub const CM_CLASS_VERSION: u8 = 2;

/// MAD methods.
pub mod method {
    /// Get.
    pub const GET: u8 = 0x01;
    /// Set.
    pub const SET: u8 = 0x02;
    /// Send (every CM message).
    pub const SEND: u8 = 0x03;
    /// Trap.
    pub const TRAP: u8 = 0x05;
    /// Report.
    pub const REPORT: u8 = 0x06;
    /// TrapRepress.
    pub const TRAP_REPRESS: u8 = 0x07;
    /// Response bit, or-ed into the request method.
    pub const RESP: u8 = 0x80;
    /// GetResp.
    pub const GET_RESP: u8 = 0x81;
    /// ReportResp.
    pub const REPORT_RESP: u8 = 0x86;
}

/// CM attribute IDs.
pub mod attr {
    /// ClassPortInfo.
    pub const CLASS_PORT_INFO: u16 = 0x0001;
    /// ConnectRequest.
    pub const REQ: u16 = 0x0010;
    /// MsgRcptAck.
    pub const MRA: u16 = 0x0011;
    /// ConnectReject.
    pub const REJ: u16 = 0x0012;
    /// ConnectReply.
    pub const REP: u16 = 0x0013;
    /// ReadyToUse.
    pub const RTU: u16 = 0x0014;
    /// DisconnectRequest.
    pub const DREQ: u16 = 0x0015;
    /// DisconnectReply.
    pub const DREP: u16 = 0x0016;
    /// ServiceIDResReq.
    pub const SIDR_REQ: u16 = 0x0017;
    /// ServiceIDResReqResp.
    pub const SIDR_REP: u16 = 0x0018;
    /// LoadAlternatePath.
    pub const LAP: u16 = 0x0019;
    /// AlternatePathResponse.
    pub const APR: u16 = 0x001A;
}

/// The common MAD header (bytes 0–23 of every MAD).
///
/// | byte | field |
/// |---|---|
/// | 0 | BaseVersion |
/// | 1 | MgmtClass |
/// | 2 | ClassVersion |
/// | 3 | R (1) · Method (7), kept together in `method` |
/// | 4–5 | Status |
/// | 6–7 | ClassSpecific |
/// | 8–15 | TransactionID |
/// | 16–17 | AttributeID |
/// | 18–19 | reserved |
/// | 20–23 | AttributeModifier |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MadHeader {
    /// BaseVersion (1).
    pub base_version: u8,
    /// Management class (see [`class`]).
    pub mgmt_class: u8,
    /// Class version (2 for CM).
    pub class_version: u8,
    /// Method including the response bit (see [`method`]).
    pub method: u8,
    /// Status.
    pub status: u16,
    /// Class-specific field.
    pub class_specific: u16,
    /// Transaction ID.
    pub transaction_id: u64,
    /// Attribute ID (see [`attr`]).
    pub attribute_id: u16,
    /// Reserved bytes 18–19, kept so a MAD can be re-encoded unchanged.
    pub reserved: u16,
    /// Attribute modifier.
    pub attribute_modifier: u32,
}

impl MadHeader {
    /// A CM header: base version 1, class 0x07, class version 2, method Send, the given
    /// attribute ID and transaction ID.
    pub const fn cm(attribute_id: u16, transaction_id: u64) -> MadHeader {
        MadHeader {
            base_version: BASE_VERSION,
            mgmt_class: class::CM,
            class_version: CM_CLASS_VERSION,
            method: method::SEND,
            status: 0,
            class_specific: 0,
            transaction_id,
            attribute_id,
            reserved: 0,
            attribute_modifier: 0,
        }
    }

    /// Parses the header at the start of a MAD (at least 24 bytes).
    pub fn parse(input: &[u8]) -> Result<MadHeader, WireError> {
        let b = crate::bytes::array::<MAD_HEADER_LEN>(input, "MAD header")?;
        Ok(MadHeader::from_bytes(b))
    }

    /// Decodes the header from its 24 bytes.
    pub fn from_bytes(b: &[u8; MAD_HEADER_LEN]) -> MadHeader {
        MadHeader {
            base_version: b[0],
            mgmt_class: b[1],
            class_version: b[2],
            method: b[3],
            status: get_u16(b, 4),
            class_specific: get_u16(b, 6),
            transaction_id: get_u64(b, 8),
            attribute_id: get_u16(b, 16),
            reserved: get_u16(b, 18),
            attribute_modifier: get_u32(b, 20),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; MAD_HEADER_LEN] {
        let mut b = [0u8; MAD_HEADER_LEN];
        b[0] = self.base_version;
        b[1] = self.mgmt_class;
        b[2] = self.class_version;
        b[3] = self.method;
        put_u16(&mut b, 4, self.status);
        put_u16(&mut b, 6, self.class_specific);
        put_u64(&mut b, 8, self.transaction_id);
        put_u16(&mut b, 16, self.attribute_id);
        put_u16(&mut b, 18, self.reserved);
        put_u32(&mut b, 20, self.attribute_modifier);
        b
    }

    /// Writes the header into the first 24 bytes of a MAD.
    pub fn write(&self, mad: &mut Mad) {
        mad[..MAD_HEADER_LEN].copy_from_slice(&self.to_bytes());
    }
}

/// `input` as a whole MAD: exactly 256 bytes, or an error saying how long it was.
pub fn as_mad(input: &[u8]) -> Result<&Mad, WireError> {
    input.try_into().map_err(|_| {
        if input.len() < MAD_SIZE {
            WireError::TooShort {
                what: "MAD",
                len: input.len(),
                need: MAD_SIZE,
            }
        } else {
            WireError::TooLong {
                what: "MAD",
                len: input.len(),
                max: MAD_SIZE,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn header_fields_at_their_offsets() {
        let h = MadHeader {
            base_version: 0x01,
            mgmt_class: 0x07,
            class_version: 0x02,
            method: 0x83,
            status: 0x0405,
            class_specific: 0x0607,
            transaction_id: 0x0809_0a0b_0c0d_0e0f,
            attribute_id: 0x1011,
            reserved: 0x1213,
            attribute_modifier: 0x1415_1617,
        };
        let b = h.to_bytes();
        assert_eq!(
            b,
            [
                0x01, 0x07, 0x02, 0x83, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
                0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17
            ]
        );
        assert_eq!(MadHeader::parse(&b), Ok(h));
        let mut mad = [0u8; MAD_SIZE];
        h.write(&mut mad);
        assert_eq!(MadHeader::parse(&mad), Ok(h));
        assert_eq!(
            MadHeader::cm(attr::REQ, 0x2_e510_f3bc).to_bytes()[..4],
            [1, 7, 2, 3]
        );
    }

    #[test]
    fn mad_length_is_checked() {
        assert_eq!(
            as_mad(&[0u8; 120]).unwrap_err().to_string(),
            "MAD too short: 120 bytes, need 256"
        );
        assert_eq!(
            as_mad(&[0u8; 257]).unwrap_err().to_string(),
            "MAD too long: 257 bytes, at most 256"
        );
        assert!(as_mad(&[0u8; 256]).is_ok());
        for n in 0..24 {
            assert!(MadHeader::parse(&[0u8; 24][..n]).is_err());
        }
    }
}

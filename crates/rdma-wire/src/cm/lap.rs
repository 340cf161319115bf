//! LAP (LoadAlternatePath, 0x0019) and APR (AlternatePathResponse, 0x001A).

use super::{begin, check, CmPath};
use crate::bytes::{bits, get, get_u24, get_u32, place, put, put_u24, put_u32};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a LAP's private data.
pub const LAP_PRIVATE_DATA_LEN: usize = 168;

/// Length of an APR's additional information.
pub const APR_ADD_INFO_LEN: usize = 72;

/// Length of an APR's private data.
pub const APR_PRIVATE_DATA_LEN: usize = 148;

/// APR status values.
pub mod apr_status {
    /// Alternate path loaded.
    pub const SUCCESS: u8 = 0;
    /// Invalid communication ID.
    pub const INVALID_COMM_ID: u8 = 1;
    /// Path migration is not supported.
    pub const UNSUPPORTED: u8 = 2;
    /// Rejected.
    pub const REJECTED: u8 = 3;
    /// Redirect.
    pub const REDIRECT: u8 = 4;
    /// The path given is the current one.
    pub const IS_CURRENT: u8 = 5;
    /// Invalid QPN/EECN.
    pub const INVALID_QPN_EECN: u8 = 6;
    /// Invalid LID.
    pub const INVALID_LID: u8 = 7;
    /// Invalid GID.
    pub const INVALID_GID: u8 = 8;
    /// Invalid flow label.
    pub const INVALID_FLOW_LABEL: u8 = 9;
    /// Invalid traffic class.
    pub const INVALID_TCLASS: u8 = 10;
    /// Invalid hop limit.
    pub const INVALID_HOP_LIMIT: u8 = 11;
    /// Invalid packet rate.
    pub const INVALID_PACKET_RATE: u8 = 12;
    /// Invalid SL.
    pub const INVALID_SL: u8 = 13;
}

/// LoadAlternatePath.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | reserved (32) |
/// | 36 | RemoteQPN/EECN (24) · 39 RemoteCMResponseTimeout (5) · reserved (3) |
/// | 40 | reserved (32) |
/// | 44–87 | alternate path ([`CmPath`]; GIDs at 48 and 64, flow label and traffic class at 80, hop limit 84, packet rate 85, SL 86, ACK timeout 87) |
/// | 88 | PrivateData (168) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lap {
    /// MAD header. [`Lap::build`] forces the class to CM and the attribute ID to LAP.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Receiver's QPN or EECN (24 bits).
    pub remote_qpn: u32,
    /// Remote CM response timeout (5 bits).
    pub remote_cm_response_timeout: u8,
    /// The alternate path to load.
    pub alternate_path: CmPath,
    /// Private data.
    pub private_data: [u8; LAP_PRIVATE_DATA_LEN],
}

impl Default for Lap {
    fn default() -> Lap {
        Lap {
            hdr: MadHeader::cm(attr::LAP, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            remote_qpn: 0,
            remote_cm_response_timeout: 0,
            alternate_path: CmPath::default(),
            private_data: [0; LAP_PRIVATE_DATA_LEN],
        }
    }
}

impl Lap {
    /// Parses a LAP from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Lap, WireError> {
        let (m, hdr) = check(input, attr::LAP, "LAP")?;
        Ok(Lap::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Lap {
        Lap {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            remote_qpn: get_u24(m, 36),
            remote_cm_response_timeout: bits(m[39], 0, 5),
            alternate_path: CmPath::read_lap(m),
            private_data: get(m, 88),
        }
    }

    /// Encodes the LAP into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::LAP);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        put_u24(out, 36, self.remote_qpn);
        out[39] = place(self.remote_cm_response_timeout, 0, 5);
        self.alternate_path.write_lap(out);
        put(out, 88, &self.private_data);
    }
}

super::cm_common!(Lap, attr::LAP, "LAP");

/// AlternatePathResponse.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | AdditionalInfoLength · 33 APStatus — see [`apr_status`] · 34 reserved (16) |
/// | 36 | AdditionalInfo (72) |
/// | 108 | PrivateData (148) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Apr {
    /// MAD header. [`Apr::build`] forces the class to CM and the attribute ID to APR.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Number of valid additional-information bytes.
    pub additional_info_length: u8,
    /// Status of the LAP answered.
    pub ap_status: u8,
    /// Additional information.
    pub additional_info: [u8; APR_ADD_INFO_LEN],
    /// Private data.
    pub private_data: [u8; APR_PRIVATE_DATA_LEN],
}

impl Default for Apr {
    fn default() -> Apr {
        Apr {
            hdr: MadHeader::cm(attr::APR, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            additional_info_length: 0,
            ap_status: 0,
            additional_info: [0; APR_ADD_INFO_LEN],
            private_data: [0; APR_PRIVATE_DATA_LEN],
        }
    }
}

impl Apr {
    /// Parses an APR from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Apr, WireError> {
        let (m, hdr) = check(input, attr::APR, "APR")?;
        Ok(Apr::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Apr {
        Apr {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            additional_info_length: m[32],
            ap_status: m[33],
            additional_info: get(m, 36),
            private_data: get(m, 108),
        }
    }

    /// Encodes the APR into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::APR);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        out[32] = self.additional_info_length;
        out[33] = self.ap_status;
        put(out, 36, &self.additional_info);
        put(out, 108, &self.private_data);
    }
}

super::cm_common!(Apr, attr::APR, "APR");

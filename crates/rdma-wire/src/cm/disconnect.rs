//! DREQ (DisconnectRequest, 0x0015) and DREP (DisconnectReply, 0x0016).

use super::{begin, check};
use crate::bytes::{get, get_u24, get_u32, put, put_u24, put_u32};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a DREQ's private data.
pub const DREQ_PRIVATE_DATA_LEN: usize = 220;

/// Length of a DREP's private data.
pub const DREP_PRIVATE_DATA_LEN: usize = 224;

/// DisconnectRequest.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | RemoteQPN/EECN (24) · reserved (8) |
/// | 36 | PrivateData (220) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dreq {
    /// MAD header. [`Dreq::build`] forces the class to CM and the attribute ID to DREQ.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Receiver's QPN (or EECN) (24 bits).
    pub remote_qpn: u32,
    /// Private data.
    pub private_data: [u8; DREQ_PRIVATE_DATA_LEN],
}

impl Default for Dreq {
    fn default() -> Dreq {
        Dreq {
            hdr: MadHeader::cm(attr::DREQ, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            remote_qpn: 0,
            private_data: [0; DREQ_PRIVATE_DATA_LEN],
        }
    }
}

impl Dreq {
    /// Parses a DREQ from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Dreq, WireError> {
        let (m, hdr) = check(input, attr::DREQ, "DREQ")?;
        Ok(Dreq::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Dreq {
        Dreq {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            remote_qpn: get_u24(m, 32),
            private_data: get(m, 36),
        }
    }

    /// Encodes the DREQ into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::DREQ);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        put_u24(out, 32, self.remote_qpn);
        put(out, 36, &self.private_data);
    }
}

super::cm_common!(Dreq, attr::DREQ, "DREQ");

/// DisconnectReply.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | PrivateData (224) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Drep {
    /// MAD header. [`Drep::build`] forces the class to CM and the attribute ID to DREP.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Private data.
    pub private_data: [u8; DREP_PRIVATE_DATA_LEN],
}

impl Default for Drep {
    fn default() -> Drep {
        Drep {
            hdr: MadHeader::cm(attr::DREP, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            private_data: [0; DREP_PRIVATE_DATA_LEN],
        }
    }
}

impl Drep {
    /// Parses a DREP from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Drep, WireError> {
        let (m, hdr) = check(input, attr::DREP, "DREP")?;
        Ok(Drep::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Drep {
        Drep {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            private_data: get(m, 32),
        }
    }

    /// Encodes the DREP into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::DREP);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        put(out, 32, &self.private_data);
    }
}

super::cm_common!(Drep, attr::DREP, "DREP");

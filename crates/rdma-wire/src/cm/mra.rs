//! MRA (MsgRcptAck, 0x0011): "your message arrived, I need more time".

use super::{begin, check};
use crate::bytes::{bits, get, get_u32, place, put, put_u32};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of an MRA's private data.
pub const MRA_PRIVATE_DATA_LEN: usize = 222;

/// MsgRcptAck.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | MessageMRAed (2) · reserved (6) — see [`super::msg`] |
/// | 33 | ServiceTimeout (5) · reserved (3) |
/// | 34 | PrivateData (222) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mra {
    /// MAD header. [`Mra::build`] forces the class to CM and the attribute ID to MRA.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID (for an MRA of a REQ: the REQ's LocalCommID).
    pub remote_comm_id: u32,
    /// Which message is acknowledged (2 bits: REQ 0, REP 1, LAP 2).
    pub message_mraed: u8,
    /// How much longer the sender needs (5 bits, 4.096 µs × 2^n).
    pub service_timeout: u8,
    /// Private data.
    pub private_data: [u8; MRA_PRIVATE_DATA_LEN],
}

impl Default for Mra {
    fn default() -> Mra {
        Mra {
            hdr: MadHeader::cm(attr::MRA, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            message_mraed: 0,
            service_timeout: 0,
            private_data: [0; MRA_PRIVATE_DATA_LEN],
        }
    }
}

impl Mra {
    /// Parses an MRA from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Mra, WireError> {
        let (m, hdr) = check(input, attr::MRA, "MRA")?;
        Ok(Mra::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Mra {
        Mra {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            message_mraed: bits(m[32], 0, 2),
            service_timeout: bits(m[33], 0, 5),
            private_data: get(m, 34),
        }
    }

    /// Encodes the MRA into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::MRA);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        out[32] = place(self.message_mraed, 0, 2);
        out[33] = place(self.service_timeout, 0, 5);
        put(out, 34, &self.private_data);
    }
}

super::cm_common!(Mra, attr::MRA, "MRA");

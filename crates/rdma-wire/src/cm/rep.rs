//! REP (ConnectReply, 0x0013) and RTU (ReadyToUse, 0x0014).

use super::{begin, check};
use crate::bytes::{bits, get, get_u24, get_u32, get_u64, place, put, put_u24, put_u32, put_u64};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a REP's private data.
pub const REP_PRIVATE_DATA_LEN: usize = 196;

/// Length of an RTU's private data.
pub const RTU_PRIVATE_DATA_LEN: usize = 224;

/// ConnectReply: the passive side accepts a REQ.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID (the REQ's LocalCommID) |
/// | 32 | LocalQKey |
/// | 36 | LocalQPN (24) · 39 VendorID bits 23–16 |
/// | 40 | LocalEECN (24) · 43 VendorID bits 15–8 |
/// | 44 | StartingPSN (24) · 47 VendorID bits 7–0 |
/// | 48 | ResponderResources · 49 InitiatorDepth |
/// | 50 | TargetACKDelay (5) · FailoverAccepted (2) · EndToEndFlowControl (1) |
/// | 51 | RNRRetryCount (3) · SRQ (1) · reserved (4) |
/// | 52 | LocalCAGUID (8 bytes) |
/// | 60 | PrivateData (196) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rep {
    /// MAD header. [`Rep::build`] forces the class to CM and the attribute ID to REP.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID (from its REQ).
    pub remote_comm_id: u32,
    /// Sender's Q_Key.
    pub local_qkey: u32,
    /// Sender's QPN (24 bits).
    pub local_qpn: u32,
    /// Sender's EE context number (24 bits, RD only).
    pub local_eecn: u32,
    /// Starting PSN (24 bits).
    pub starting_psn: u32,
    /// Vendor ID (24 bits, spread over bytes 39, 43 and 47).
    pub vendor_id: u32,
    /// Responder resources.
    pub responder_resources: u8,
    /// Initiator depth.
    pub initiator_depth: u8,
    /// Target ACK delay (5 bits).
    pub target_ack_delay: u8,
    /// Failover accepted (2 bits).
    pub failover_accepted: u8,
    /// End-to-end flow control.
    pub end_to_end_flow_control: bool,
    /// RNR retry count (3 bits).
    pub rnr_retry_count: u8,
    /// The sender uses a shared receive queue.
    pub srq: bool,
    /// Sender's CA GUID.
    pub local_ca_guid: u64,
    /// Private data.
    pub private_data: [u8; REP_PRIVATE_DATA_LEN],
}

impl Default for Rep {
    fn default() -> Rep {
        Rep {
            hdr: MadHeader::cm(attr::REP, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            local_qkey: 0,
            local_qpn: 0,
            local_eecn: 0,
            starting_psn: 0,
            vendor_id: 0,
            responder_resources: 0,
            initiator_depth: 0,
            target_ack_delay: 0,
            failover_accepted: 0,
            end_to_end_flow_control: false,
            rnr_retry_count: 0,
            srq: false,
            local_ca_guid: 0,
            private_data: [0; REP_PRIVATE_DATA_LEN],
        }
    }
}

impl Rep {
    /// Parses a REP from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Rep, WireError> {
        let (m, hdr) = check(input, attr::REP, "REP")?;
        Ok(Rep::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Rep {
        Rep {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            local_qkey: get_u32(m, 32),
            local_qpn: get_u24(m, 36),
            local_eecn: get_u24(m, 40),
            starting_psn: get_u24(m, 44),
            vendor_id: u32::from_be_bytes([0, m[39], m[43], m[47]]),
            responder_resources: m[48],
            initiator_depth: m[49],
            target_ack_delay: bits(m[50], 0, 5),
            failover_accepted: bits(m[50], 5, 2),
            end_to_end_flow_control: bits(m[50], 7, 1) != 0,
            rnr_retry_count: bits(m[51], 0, 3),
            srq: bits(m[51], 3, 1) != 0,
            local_ca_guid: get_u64(m, 52),
            private_data: get(m, 60),
        }
    }

    /// Encodes the REP into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::REP);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        put_u32(out, 32, self.local_qkey);
        put_u24(out, 36, self.local_qpn);
        put_u24(out, 40, self.local_eecn);
        put_u24(out, 44, self.starting_psn);
        let [_, vh, vm, vl] = self.vendor_id.to_be_bytes();
        out[39] = vh;
        out[43] = vm;
        out[47] = vl;
        out[48] = self.responder_resources;
        out[49] = self.initiator_depth;
        out[50] = place(self.target_ack_delay, 0, 5)
            | place(self.failover_accepted, 5, 2)
            | place(self.end_to_end_flow_control.into(), 7, 1);
        out[51] = place(self.rnr_retry_count, 0, 3) | place(self.srq.into(), 3, 1);
        put_u64(out, 52, self.local_ca_guid);
        put(out, 60, &self.private_data);
    }
}

super::cm_common!(Rep, attr::REP, "REP");

/// ReadyToUse: the active side confirms a REP.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID |
/// | 32 | PrivateData (224) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rtu {
    /// MAD header. [`Rtu::build`] forces the class to CM and the attribute ID to RTU.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Private data.
    pub private_data: [u8; RTU_PRIVATE_DATA_LEN],
}

impl Default for Rtu {
    fn default() -> Rtu {
        Rtu {
            hdr: MadHeader::cm(attr::RTU, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            private_data: [0; RTU_PRIVATE_DATA_LEN],
        }
    }
}

impl Rtu {
    /// Parses an RTU from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Rtu, WireError> {
        let (m, hdr) = check(input, attr::RTU, "RTU")?;
        Ok(Rtu::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Rtu {
        Rtu {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            private_data: get(m, 32),
        }
    }

    /// Encodes the RTU into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::RTU);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        put(out, 32, &self.private_data);
    }
}

super::cm_common!(Rtu, attr::RTU, "RTU");

//! REJ (ConnectReject, 0x0012).

use super::{begin, check};
use crate::bytes::{bits, get, get_u16, get_u32, place, put, put_u16, put_u32};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a REJ's additional rejection information.
pub const REJ_ARI_LEN: usize = 72;

/// Length of a REJ's private data.
pub const REJ_PRIVATE_DATA_LEN: usize = 148;

/// REJ reason codes (IBA table 109, as Linux's `ib_cm_rej_reason`).
pub mod reason {
    /// No QP available.
    pub const NO_QP: u16 = 1;
    /// No EE context available.
    pub const NO_EEC: u16 = 2;
    /// No resources available.
    pub const NO_RESOURCES: u16 = 3;
    /// Timeout (sent with RemoteCommID possibly 0).
    pub const TIMEOUT: u16 = 4;
    /// Unsupported request.
    pub const UNSUPPORTED: u16 = 5;
    /// Invalid communication ID.
    pub const INVALID_COMM_ID: u16 = 6;
    /// Invalid communication instance.
    pub const INVALID_COMM_INSTANCE: u16 = 7;
    /// Invalid service ID (nobody listens).
    pub const INVALID_SERVICE_ID: u16 = 8;
    /// Invalid transport service type.
    pub const INVALID_TRANSPORT_TYPE: u16 = 9;
    /// Stale connection.
    pub const STALE_CONN: u16 = 10;
    /// RDC does not exist.
    pub const RDC_NOT_EXIST: u16 = 11;
    /// Primary remote GID rejected.
    pub const INVALID_GID: u16 = 12;
    /// Primary remote LID rejected.
    pub const INVALID_LID: u16 = 13;
    /// Primary SL rejected.
    pub const INVALID_SL: u16 = 14;
    /// Primary traffic class rejected.
    pub const INVALID_TRAFFIC_CLASS: u16 = 15;
    /// Primary hop limit rejected.
    pub const INVALID_HOP_LIMIT: u16 = 16;
    /// Primary packet rate rejected.
    pub const INVALID_PACKET_RATE: u16 = 17;
    /// Alternate remote GID rejected.
    pub const INVALID_ALT_GID: u16 = 18;
    /// Alternate remote LID rejected.
    pub const INVALID_ALT_LID: u16 = 19;
    /// Alternate SL rejected.
    pub const INVALID_ALT_SL: u16 = 20;
    /// Alternate traffic class rejected.
    pub const INVALID_ALT_TRAFFIC_CLASS: u16 = 21;
    /// Alternate hop limit rejected.
    pub const INVALID_ALT_HOP_LIMIT: u16 = 22;
    /// Alternate packet rate rejected.
    pub const INVALID_ALT_PACKET_RATE: u16 = 23;
    /// Port CM redirect.
    pub const PORT_CM_REDIRECT: u16 = 24;
    /// Port redirect.
    pub const PORT_REDIRECT: u16 = 25;
    /// Invalid path MTU.
    pub const INVALID_MTU: u16 = 26;
    /// Insufficient responder resources.
    pub const INSUFFICIENT_RESP_RESOURCES: u16 = 27;
    /// Consumer defined (rdma_cm's rejections by the application).
    pub const CONSUMER_DEFINED: u16 = 28;
    /// Invalid RNR retry count.
    pub const INVALID_RNR_RETRY: u16 = 29;
    /// Duplicate local communication ID.
    pub const DUPLICATE_LOCAL_COMM_ID: u16 = 30;
    /// Unsupported class version.
    pub const INVALID_CLASS_VERSION: u16 = 31;
    /// Primary flow label rejected.
    pub const INVALID_FLOW_LABEL: u16 = 32;
    /// Alternate flow label rejected.
    pub const INVALID_ALT_FLOW_LABEL: u16 = 33;
}

/// ConnectReject.
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 28 | RemoteCommID (0 when the rejected REQ's sender is unknown, e.g. a timeout) |
/// | 32 | MessageRejected (2) · reserved (6) — see [`super::msg`] |
/// | 33 | RejectedInfoLength (7) · reserved (1) |
/// | 34 | Reason (16) — see [`reason`] |
/// | 36 | AdditionalRejectionInformation (72) |
/// | 108 | PrivateData (148) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rej {
    /// MAD header. [`Rej::build`] forces the class to CM and the attribute ID to REJ.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Receiver's communication ID.
    pub remote_comm_id: u32,
    /// Which message is rejected (2 bits: REQ 0, REP 1, other 2).
    pub message_rejected: u8,
    /// Number of valid ARI bytes (7 bits).
    pub rejected_info_length: u8,
    /// Reason code.
    pub reason: u16,
    /// Additional rejection information.
    pub ari: [u8; REJ_ARI_LEN],
    /// Private data.
    pub private_data: [u8; REJ_PRIVATE_DATA_LEN],
}

impl Default for Rej {
    fn default() -> Rej {
        Rej {
            hdr: MadHeader::cm(attr::REJ, 0),
            local_comm_id: 0,
            remote_comm_id: 0,
            message_rejected: 0,
            rejected_info_length: 0,
            reason: 0,
            ari: [0; REJ_ARI_LEN],
            private_data: [0; REJ_PRIVATE_DATA_LEN],
        }
    }
}

impl Rej {
    /// Parses a REJ from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Rej, WireError> {
        let (m, hdr) = check(input, attr::REJ, "REJ")?;
        Ok(Rej::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Rej {
        Rej {
            hdr,
            local_comm_id: get_u32(m, 24),
            remote_comm_id: get_u32(m, 28),
            message_rejected: bits(m[32], 0, 2),
            rejected_info_length: bits(m[33], 0, 7),
            reason: get_u16(m, 34),
            ari: get(m, 36),
            private_data: get(m, 108),
        }
    }

    /// Encodes the REJ into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::REJ);
        put_u32(out, 24, self.local_comm_id);
        put_u32(out, 28, self.remote_comm_id);
        out[32] = place(self.message_rejected, 0, 2);
        out[33] = place(self.rejected_info_length, 0, 7);
        put_u16(out, 34, self.reason);
        put(out, 36, &self.ari);
        put(out, 108, &self.private_data);
    }
}

super::cm_common!(Rej, attr::REJ, "REJ");

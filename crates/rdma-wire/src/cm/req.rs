//! REQ (ConnectRequest, attribute 0x0010).

use super::{begin, check, CmPath};
use crate::bytes::{bits, get, get_u16, get_u24, get_u32, get_u64, place, put, put_u16};
use crate::bytes::{put_u24, put_u32, put_u64};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a REQ's private data.
pub const REQ_PRIVATE_DATA_LEN: usize = 92;

/// ConnectRequest: the active side's request to connect to a service.
///
/// MAD offsets (bit fields from the most significant bit):
///
/// | offset | field |
/// |---|---|
/// | 24 | LocalCommID |
/// | 29 | VendorID (24) |
/// | 32 | ServiceID (8 bytes) |
/// | 40 | LocalCAGUID (8 bytes) |
/// | 52 | LocalQKey |
/// | 56 | LocalQPN (24) · 59 ResponderResources |
/// | 60 | LocalEECN (24) · 63 InitiatorDepth |
/// | 64 | RemoteEECN (24) · 67 RemoteCMResponseTimeout (5) · TransportServiceType (2) · EndToEndFlowControl (1) |
/// | 68 | StartingPSN (24) · 71 LocalCMResponseTimeout (5) · RetryCount (3) |
/// | 72 | PartitionKey |
/// | 74 | PathMTU (4) · RDCExists (1) · RNRRetryCount (3) |
/// | 75 | MaxCMRetries (4) · SRQ (1) · ExtendedTransportType (3) |
/// | 76–119 | primary path ([`CmPath`]: LIDs, GIDs at 80 and 96, flow label, …) |
/// | 120–163 | alternate path; 163 also holds SAPSupported (bit 5) |
/// | 164 | PrivateData (92) |
///
/// Reserved bits are ignored when parsing and written as zero; values wider than their field
/// are truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Req {
    /// MAD header. [`Req::build`] forces the class to CM and the attribute ID to REQ.
    pub hdr: MadHeader,
    /// Sender's communication ID.
    pub local_comm_id: u32,
    /// Vendor ID (24 bits).
    pub vendor_id: u32,
    /// Service ID (for rdma_cm: see [`crate::rdma_cm::service_id`]).
    pub service_id: u64,
    /// Sender's CA GUID.
    pub local_ca_guid: u64,
    /// Sender's Q_Key (used by RD).
    pub local_qkey: u32,
    /// Sender's QPN (24 bits).
    pub local_qpn: u32,
    /// Responder resources (RDMA reads / atomics the sender accepts in flight).
    pub responder_resources: u8,
    /// Sender's EE context number (24 bits, RD only).
    pub local_eecn: u32,
    /// Initiator depth.
    pub initiator_depth: u8,
    /// Remote EE context number (24 bits, RD only).
    pub remote_eecn: u32,
    /// How long the remote CM may take to answer (5 bits, 4.096 µs × 2^n).
    pub remote_cm_response_timeout: u8,
    /// Transport service type (2 bits: 0 RC, 1 UC, 2 RD, 3 extended; see
    /// `extended_transport_type`).
    pub transport_service_type: u8,
    /// End-to-end flow control.
    pub end_to_end_flow_control: bool,
    /// Sender's starting PSN (24 bits).
    pub starting_psn: u32,
    /// How long the sender's CM may take to answer (5 bits).
    pub local_cm_response_timeout: u8,
    /// Transport retry count (3 bits).
    pub retry_count: u8,
    /// Partition key.
    pub p_key: u16,
    /// Path MTU (4 bits: 1 = 256 … 5 = 4096).
    pub path_mtu: u8,
    /// RDC exists.
    pub rdc_exists: bool,
    /// RNR retry count (3 bits).
    pub rnr_retry_count: u8,
    /// Maximum CM retries (4 bits).
    pub max_cm_retries: u8,
    /// The sender uses a shared receive queue.
    pub srq: bool,
    /// Extended transport type (3 bits; 1 = XRC).
    pub extended_transport_type: u8,
    /// Primary path (offsets 76–119).
    pub primary_path: CmPath,
    /// Alternate path (offsets 120–163); all zero when there is none.
    pub alternate_path: CmPath,
    /// SAP supported (byte 163, bit 5).
    pub sap_supported: bool,
    /// Private data; rdma_cm puts its [`crate::rdma_cm::CmaHeader`] in the first 36 bytes.
    pub private_data: [u8; REQ_PRIVATE_DATA_LEN],
}

impl Default for Req {
    fn default() -> Req {
        Req {
            hdr: MadHeader::cm(attr::REQ, 0),
            local_comm_id: 0,
            vendor_id: 0,
            service_id: 0,
            local_ca_guid: 0,
            local_qkey: 0,
            local_qpn: 0,
            responder_resources: 0,
            local_eecn: 0,
            initiator_depth: 0,
            remote_eecn: 0,
            remote_cm_response_timeout: 0,
            transport_service_type: 0,
            end_to_end_flow_control: false,
            starting_psn: 0,
            local_cm_response_timeout: 0,
            retry_count: 0,
            p_key: 0,
            path_mtu: 0,
            rdc_exists: false,
            rnr_retry_count: 0,
            max_cm_retries: 0,
            srq: false,
            extended_transport_type: 0,
            primary_path: CmPath::default(),
            alternate_path: CmPath::default(),
            sap_supported: false,
            private_data: [0; REQ_PRIVATE_DATA_LEN],
        }
    }
}

impl Req {
    /// Parses a REQ from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<Req, WireError> {
        let (m, hdr) = check(input, attr::REQ, "REQ")?;
        Ok(Req::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> Req {
        Req {
            hdr,
            local_comm_id: get_u32(m, 24),
            vendor_id: get_u24(m, 29),
            service_id: get_u64(m, 32),
            local_ca_guid: get_u64(m, 40),
            local_qkey: get_u32(m, 52),
            local_qpn: get_u24(m, 56),
            responder_resources: m[59],
            local_eecn: get_u24(m, 60),
            initiator_depth: m[63],
            remote_eecn: get_u24(m, 64),
            remote_cm_response_timeout: bits(m[67], 0, 5),
            transport_service_type: bits(m[67], 5, 2),
            end_to_end_flow_control: bits(m[67], 7, 1) != 0,
            starting_psn: get_u24(m, 68),
            local_cm_response_timeout: bits(m[71], 0, 5),
            retry_count: bits(m[71], 5, 3),
            p_key: get_u16(m, 72),
            path_mtu: bits(m[74], 0, 4),
            rdc_exists: bits(m[74], 4, 1) != 0,
            rnr_retry_count: bits(m[74], 5, 3),
            max_cm_retries: bits(m[75], 0, 4),
            srq: bits(m[75], 4, 1) != 0,
            extended_transport_type: bits(m[75], 5, 3),
            primary_path: CmPath::read_req(m, 76),
            alternate_path: CmPath::read_req(m, 120),
            sap_supported: bits(m[163], 5, 1) != 0,
            private_data: get(m, 164),
        }
    }

    /// Encodes the REQ into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::REQ);
        put_u32(out, 24, self.local_comm_id);
        put_u24(out, 29, self.vendor_id);
        put_u64(out, 32, self.service_id);
        put_u64(out, 40, self.local_ca_guid);
        put_u32(out, 52, self.local_qkey);
        put_u24(out, 56, self.local_qpn);
        out[59] = self.responder_resources;
        put_u24(out, 60, self.local_eecn);
        out[63] = self.initiator_depth;
        put_u24(out, 64, self.remote_eecn);
        out[67] = place(self.remote_cm_response_timeout, 0, 5)
            | place(self.transport_service_type, 5, 2)
            | place(self.end_to_end_flow_control.into(), 7, 1);
        put_u24(out, 68, self.starting_psn);
        out[71] = place(self.local_cm_response_timeout, 0, 5) | place(self.retry_count, 5, 3);
        put_u16(out, 72, self.p_key);
        out[74] = place(self.path_mtu, 0, 4)
            | place(self.rdc_exists.into(), 4, 1)
            | place(self.rnr_retry_count, 5, 3);
        out[75] = place(self.max_cm_retries, 0, 4)
            | place(self.srq.into(), 4, 1)
            | place(self.extended_transport_type, 5, 3);
        self.primary_path.write_req(out, 76);
        self.alternate_path.write_req(out, 120);
        out[163] |= place(self.sap_supported.into(), 5, 1);
        put(out, 164, &self.private_data);
    }
}

super::cm_common!(Req, attr::REQ, "REQ");

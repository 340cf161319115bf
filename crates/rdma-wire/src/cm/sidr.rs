//! SIDR_REQ (ServiceIDResReq, 0x0017) and SIDR_REP (ServiceIDResReqResp, 0x0018): service-ID
//! resolution for unreliable-datagram services.

use super::{begin, check};
use crate::bytes::put_u64;
use crate::bytes::{get, get_u16, get_u24, get_u32, get_u64, put, put_u16, put_u24, put_u32};
use crate::mad::{attr, Mad, MadHeader};
use crate::WireError;

/// Length of a SIDR_REQ's private data.
pub const SIDR_REQ_PRIVATE_DATA_LEN: usize = 216;

/// Length of a SIDR_REP's additional information.
pub const SIDR_REP_ADD_INFO_LEN: usize = 72;

/// Length of a SIDR_REP's private data.
pub const SIDR_REP_PRIVATE_DATA_LEN: usize = 136;

/// SIDR_REP status values.
pub mod sidr_status {
    /// The service is available: QPN and Q_Key are valid.
    pub const SUCCESS: u8 = 0;
    /// Service ID not supported.
    pub const UNSUPPORTED: u8 = 1;
    /// Rejected by the service provider.
    pub const REJECT: u8 = 2;
    /// No QP available.
    pub const NO_QP: u8 = 3;
    /// Redirect (ClassPortInfo in the additional information).
    pub const REDIRECT: u8 = 4;
    /// Unsupported class version.
    pub const UNSUPPORTED_VERSION: u8 = 5;
}

/// ServiceIDResReq.
///
/// | offset | field |
/// |---|---|
/// | 24 | RequestID |
/// | 28 | PartitionKey · 30 reserved (16) |
/// | 32 | ServiceID (8 bytes) |
/// | 40 | PrivateData (216) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SidrReq {
    /// MAD header. [`SidrReq::build`] forces the class to CM and the attribute ID to SIDR_REQ.
    pub hdr: MadHeader,
    /// Request ID, echoed by the SIDR_REP.
    pub request_id: u32,
    /// Partition key.
    pub p_key: u16,
    /// Service ID.
    pub service_id: u64,
    /// Private data; rdma_cm puts its [`crate::rdma_cm::CmaHeader`] in the first 36 bytes.
    pub private_data: [u8; SIDR_REQ_PRIVATE_DATA_LEN],
}

impl Default for SidrReq {
    fn default() -> SidrReq {
        SidrReq {
            hdr: MadHeader::cm(attr::SIDR_REQ, 0),
            request_id: 0,
            p_key: 0,
            service_id: 0,
            private_data: [0; SIDR_REQ_PRIVATE_DATA_LEN],
        }
    }
}

impl SidrReq {
    /// Parses a SIDR_REQ from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<SidrReq, WireError> {
        let (m, hdr) = check(input, attr::SIDR_REQ, "SIDR_REQ")?;
        Ok(SidrReq::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> SidrReq {
        SidrReq {
            hdr,
            request_id: get_u32(m, 24),
            p_key: get_u16(m, 28),
            service_id: get_u64(m, 32),
            private_data: get(m, 40),
        }
    }

    /// Encodes the SIDR_REQ into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::SIDR_REQ);
        put_u32(out, 24, self.request_id);
        put_u16(out, 28, self.p_key);
        put_u64(out, 32, self.service_id);
        put(out, 40, &self.private_data);
    }
}

super::cm_common!(SidrReq, attr::SIDR_REQ, "SIDR_REQ");

/// ServiceIDResReqResp.
///
/// | offset | field |
/// |---|---|
/// | 24 | RequestID (equal to the SIDR_REQ's) |
/// | 28 | Status — see [`sidr_status`] · 29 AdditionalInformationLength |
/// | 30 | VendorID bits 23–8 |
/// | 32 | QPN (24) · 35 VendorID bits 7–0 |
/// | 36 | ServiceID (8 bytes) |
/// | 44 | Q_Key |
/// | 48 | AdditionalInformation (72) |
/// | 120 | PrivateData (136) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SidrRep {
    /// MAD header. [`SidrRep::build`] forces the class to CM and the attribute ID to SIDR_REP.
    pub hdr: MadHeader,
    /// Request ID of the SIDR_REQ answered.
    pub request_id: u32,
    /// Status.
    pub status: u8,
    /// Number of valid additional-information bytes.
    pub additional_info_length: u8,
    /// Vendor ID (24 bits, spread over bytes 30–31 and 35).
    pub vendor_id: u32,
    /// QPN of the service (24 bits).
    pub qpn: u32,
    /// Service ID.
    pub service_id: u64,
    /// Q_Key of the service.
    pub qkey: u32,
    /// Additional information.
    pub additional_info: [u8; SIDR_REP_ADD_INFO_LEN],
    /// Private data.
    pub private_data: [u8; SIDR_REP_PRIVATE_DATA_LEN],
}

impl Default for SidrRep {
    fn default() -> SidrRep {
        SidrRep {
            hdr: MadHeader::cm(attr::SIDR_REP, 0),
            request_id: 0,
            status: 0,
            additional_info_length: 0,
            vendor_id: 0,
            qpn: 0,
            service_id: 0,
            qkey: 0,
            additional_info: [0; SIDR_REP_ADD_INFO_LEN],
            private_data: [0; SIDR_REP_PRIVATE_DATA_LEN],
        }
    }
}

impl SidrRep {
    /// Parses a SIDR_REP from a 256-byte MAD (checks length, class and attribute ID).
    pub fn parse(input: &[u8]) -> Result<SidrRep, WireError> {
        let (m, hdr) = check(input, attr::SIDR_REP, "SIDR_REP")?;
        Ok(SidrRep::decode(m, hdr))
    }

    pub(crate) fn decode(m: &Mad, hdr: MadHeader) -> SidrRep {
        SidrRep {
            hdr,
            request_id: get_u32(m, 24),
            status: m[28],
            additional_info_length: m[29],
            vendor_id: u32::from_be_bytes([0, m[30], m[31], m[35]]),
            qpn: get_u24(m, 32),
            service_id: get_u64(m, 36),
            qkey: get_u32(m, 44),
            additional_info: get(m, 48),
            private_data: get(m, 120),
        }
    }

    /// Encodes the SIDR_REP into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        begin(out, &self.hdr, attr::SIDR_REP);
        put_u32(out, 24, self.request_id);
        out[28] = self.status;
        out[29] = self.additional_info_length;
        let [_, vh, vm, vl] = self.vendor_id.to_be_bytes();
        out[30] = vh;
        out[31] = vm;
        put_u24(out, 32, self.qpn);
        out[35] = vl;
        put_u64(out, 36, self.service_id);
        put_u32(out, 44, self.qkey);
        put(out, 48, &self.additional_info);
        put(out, 120, &self.private_data);
    }
}

super::cm_common!(SidrRep, attr::SIDR_REP, "SIDR_REP");

//! Communication management (CM) messages: the MADs of management class 0x07.
//!
//! One plain struct per message with typed fields (bit fields as separate fields, private data
//! as fixed arrays), each with `parse(&[u8])` from a whole 256-byte MAD and
//! `build(&self, &mut [u8; 256])` / `to_mad()`. Field offsets follow IBA volume 1 chapter 12
//! as Linux lays them out in `include/rdma/ibta_vol1_c12.h`; each struct's documentation lists
//! them as MAD offsets.
//!
//! [`CmMessage`] is the sum of all of them, with the accessors a multiplexer routes by:
//! [`CmMessage::local_comm_id`], [`CmMessage::remote_comm_id`] (the *receiver's* ID, carried
//! at MAD offset 28 by MRA, REJ, REP, RTU, DREQ, DREP, LAP and APR),
//! [`CmMessage::sidr_request_id`], and the REQ's primary GIDs.
//!
//! Parsing checks the MAD length (exactly 256), the management class (0x07) and the attribute
//! ID; it does not judge field values, and ignores reserved bits. Building writes reserved bits
//! as zero, truncates values wider than their field, and forces the header's class to CM and
//! attribute ID to the message's.

mod disconnect;
mod lap;
mod mra;
mod path;
mod rej;
mod rep;
mod req;
mod sidr;

pub use disconnect::{Drep, Dreq, DREP_PRIVATE_DATA_LEN, DREQ_PRIVATE_DATA_LEN};
pub use lap::{apr_status, Apr, Lap, APR_ADD_INFO_LEN, APR_PRIVATE_DATA_LEN, LAP_PRIVATE_DATA_LEN};
pub use mra::{Mra, MRA_PRIVATE_DATA_LEN};
pub use path::CmPath;
pub use rej::{reason, Rej, REJ_ARI_LEN, REJ_PRIVATE_DATA_LEN};
pub use rep::{Rep, Rtu, REP_PRIVATE_DATA_LEN, RTU_PRIVATE_DATA_LEN};
pub use req::{Req, REQ_PRIVATE_DATA_LEN};
pub use sidr::{
    sidr_status, SidrRep, SidrReq, SIDR_REP_ADD_INFO_LEN, SIDR_REP_PRIVATE_DATA_LEN,
    SIDR_REQ_PRIVATE_DATA_LEN,
};

use crate::mad::{self, attr, Mad, MadHeader, MAD_HEADER_LEN, MAD_SIZE};
use crate::{Gid, WireError};

/// Values of MRA's MessageMRAed and REJ's MessageRejected fields.
pub mod msg {
    /// The REQ.
    pub const REQ: u8 = 0;
    /// The REP.
    pub const REP: u8 = 1;
    /// MRA: the LAP; REJ: another message.
    pub const OTHER: u8 = 2;
}

/// Checks a MAD's length, class and attribute ID; returns it as an array and its header.
pub(crate) fn check<'a>(
    input: &'a [u8],
    attribute_id: u16,
    message: &'static str,
) -> Result<(&'a Mad, MadHeader), WireError> {
    let m = mad::as_mad(input)?;
    let hdr = MadHeader::from_bytes(&crate::bytes::get::<MAD_HEADER_LEN>(m, 0));
    if hdr.mgmt_class != mad::class::CM {
        return Err(WireError::WrongMgmtClass {
            class: hdr.mgmt_class,
            expected: mad::class::CM,
        });
    }
    if hdr.attribute_id != attribute_id {
        return Err(WireError::WrongAttribute {
            attr: hdr.attribute_id,
            message,
        });
    }
    Ok((m, hdr))
}

/// Zeroes `out` and writes the header with CM class and the given attribute ID.
pub(crate) fn begin(out: &mut Mad, hdr: &MadHeader, attribute_id: u16) {
    *out = [0; MAD_SIZE];
    MadHeader {
        mgmt_class: mad::class::CM,
        attribute_id,
        ..*hdr
    }
    .write(out);
}

/// The constants and conversions every CM message struct has.
macro_rules! cm_common {
    ($ty:ident, $attr:expr, $name:literal) => {
        impl $ty {
            /// CM attribute ID of this message.
            pub const ATTRIBUTE_ID: u16 = $attr;
            /// Name of this message, as used in error messages.
            pub const NAME: &'static str = $name;

            /// Encodes the message as a new 256-byte MAD.
            pub fn to_mad(&self) -> $crate::mad::Mad {
                let mut m = [0u8; $crate::mad::MAD_SIZE];
                self.build(&mut m);
                m
            }
        }

        impl TryFrom<&[u8]> for $ty {
            type Error = $crate::WireError;
            fn try_from(input: &[u8]) -> Result<$ty, $crate::WireError> {
                $ty::parse(input)
            }
        }

        impl From<$ty> for $crate::cm::CmMessage {
            fn from(m: $ty) -> $crate::cm::CmMessage {
                $crate::cm::CmMessage::$ty(m)
            }
        }
    };
}
pub(crate) use cm_common;

/// The kind of a CM message, by attribute ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CmKind {
    /// ConnectRequest (0x0010).
    Req,
    /// MsgRcptAck (0x0011).
    Mra,
    /// ConnectReject (0x0012).
    Rej,
    /// ConnectReply (0x0013).
    Rep,
    /// ReadyToUse (0x0014).
    Rtu,
    /// DisconnectRequest (0x0015).
    Dreq,
    /// DisconnectReply (0x0016).
    Drep,
    /// ServiceIDResReq (0x0017).
    SidrReq,
    /// ServiceIDResReqResp (0x0018).
    SidrRep,
    /// LoadAlternatePath (0x0019).
    Lap,
    /// AlternatePathResponse (0x001A).
    Apr,
}

impl CmKind {
    /// All kinds, in attribute-ID order.
    pub const ALL: [CmKind; 11] = [
        CmKind::Req,
        CmKind::Mra,
        CmKind::Rej,
        CmKind::Rep,
        CmKind::Rtu,
        CmKind::Dreq,
        CmKind::Drep,
        CmKind::SidrReq,
        CmKind::SidrRep,
        CmKind::Lap,
        CmKind::Apr,
    ];

    /// The attribute ID of this kind.
    pub const fn attribute_id(self) -> u16 {
        match self {
            CmKind::Req => attr::REQ,
            CmKind::Mra => attr::MRA,
            CmKind::Rej => attr::REJ,
            CmKind::Rep => attr::REP,
            CmKind::Rtu => attr::RTU,
            CmKind::Dreq => attr::DREQ,
            CmKind::Drep => attr::DREP,
            CmKind::SidrReq => attr::SIDR_REQ,
            CmKind::SidrRep => attr::SIDR_REP,
            CmKind::Lap => attr::LAP,
            CmKind::Apr => attr::APR,
        }
    }

    /// The kind with attribute ID `id` (`None` for ClassPortInfo and unknown IDs).
    pub const fn from_attribute_id(id: u16) -> Option<CmKind> {
        Some(match id {
            attr::REQ => CmKind::Req,
            attr::MRA => CmKind::Mra,
            attr::REJ => CmKind::Rej,
            attr::REP => CmKind::Rep,
            attr::RTU => CmKind::Rtu,
            attr::DREQ => CmKind::Dreq,
            attr::DREP => CmKind::Drep,
            attr::SIDR_REQ => CmKind::SidrReq,
            attr::SIDR_REP => CmKind::SidrRep,
            attr::LAP => CmKind::Lap,
            attr::APR => CmKind::Apr,
            _ => return None,
        })
    }

    /// The message's name (`"REQ"`, `"SIDR_REP"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            CmKind::Req => "REQ",
            CmKind::Mra => "MRA",
            CmKind::Rej => "REJ",
            CmKind::Rep => "REP",
            CmKind::Rtu => "RTU",
            CmKind::Dreq => "DREQ",
            CmKind::Drep => "DREP",
            CmKind::SidrReq => "SIDR_REQ",
            CmKind::SidrRep => "SIDR_REP",
            CmKind::Lap => "LAP",
            CmKind::Apr => "APR",
        }
    }

    /// MAD offset where this kind's private data starts (it runs to the end of the MAD).
    pub const fn private_data_offset(self) -> usize {
        match self {
            CmKind::Req => 164,
            CmKind::Mra => 34,
            CmKind::Rej | CmKind::Apr => 108,
            CmKind::Rep => 60,
            CmKind::Rtu | CmKind::Drep => 32,
            CmKind::Dreq => 36,
            CmKind::SidrReq => 40,
            CmKind::SidrRep => 120,
            CmKind::Lap => 88,
        }
    }

    /// Whether messages of this kind carry the receiver's communication ID at MAD offset 28
    /// (MRA, REJ, REP, RTU, DREQ, DREP, LAP, APR).
    pub const fn carries_remote_comm_id(self) -> bool {
        !matches!(self, CmKind::Req | CmKind::SidrReq | CmKind::SidrRep)
    }
}

impl core::fmt::Display for CmKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Any CM message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::large_enum_variant)] // every variant is about one MAD; boxing needs alloc
pub enum CmMessage {
    /// ConnectRequest.
    Req(Req),
    /// MsgRcptAck.
    Mra(Mra),
    /// ConnectReject.
    Rej(Rej),
    /// ConnectReply.
    Rep(Rep),
    /// ReadyToUse.
    Rtu(Rtu),
    /// DisconnectRequest.
    Dreq(Dreq),
    /// DisconnectReply.
    Drep(Drep),
    /// ServiceIDResReq.
    SidrReq(SidrReq),
    /// ServiceIDResReqResp.
    SidrRep(SidrRep),
    /// LoadAlternatePath.
    Lap(Lap),
    /// AlternatePathResponse.
    Apr(Apr),
}

impl CmMessage {
    /// Parses any CM message from a 256-byte MAD: checks the length and the class, then picks
    /// the message by attribute ID. ClassPortInfo and unknown attribute IDs are
    /// [`WireError::UnknownCmAttribute`].
    pub fn parse_mad(input: &[u8]) -> Result<CmMessage, WireError> {
        let m = mad::as_mad(input)?;
        let hdr = MadHeader::from_bytes(&crate::bytes::get::<MAD_HEADER_LEN>(m, 0));
        if hdr.mgmt_class != mad::class::CM {
            return Err(WireError::WrongMgmtClass {
                class: hdr.mgmt_class,
                expected: mad::class::CM,
            });
        }
        let kind =
            CmKind::from_attribute_id(hdr.attribute_id).ok_or(WireError::UnknownCmAttribute {
                attr: hdr.attribute_id,
            })?;
        Ok(match kind {
            CmKind::Req => CmMessage::Req(Req::decode(m, hdr)),
            CmKind::Mra => CmMessage::Mra(Mra::decode(m, hdr)),
            CmKind::Rej => CmMessage::Rej(Rej::decode(m, hdr)),
            CmKind::Rep => CmMessage::Rep(Rep::decode(m, hdr)),
            CmKind::Rtu => CmMessage::Rtu(Rtu::decode(m, hdr)),
            CmKind::Dreq => CmMessage::Dreq(Dreq::decode(m, hdr)),
            CmKind::Drep => CmMessage::Drep(Drep::decode(m, hdr)),
            CmKind::SidrReq => CmMessage::SidrReq(SidrReq::decode(m, hdr)),
            CmKind::SidrRep => CmMessage::SidrRep(SidrRep::decode(m, hdr)),
            CmKind::Lap => CmMessage::Lap(Lap::decode(m, hdr)),
            CmKind::Apr => CmMessage::Apr(Apr::decode(m, hdr)),
        })
    }

    /// The message's kind.
    pub const fn kind(&self) -> CmKind {
        match self {
            CmMessage::Req(_) => CmKind::Req,
            CmMessage::Mra(_) => CmKind::Mra,
            CmMessage::Rej(_) => CmKind::Rej,
            CmMessage::Rep(_) => CmKind::Rep,
            CmMessage::Rtu(_) => CmKind::Rtu,
            CmMessage::Dreq(_) => CmKind::Dreq,
            CmMessage::Drep(_) => CmKind::Drep,
            CmMessage::SidrReq(_) => CmKind::SidrReq,
            CmMessage::SidrRep(_) => CmKind::SidrRep,
            CmMessage::Lap(_) => CmKind::Lap,
            CmMessage::Apr(_) => CmKind::Apr,
        }
    }

    /// The MAD header.
    pub const fn header(&self) -> &MadHeader {
        match self {
            CmMessage::Req(m) => &m.hdr,
            CmMessage::Mra(m) => &m.hdr,
            CmMessage::Rej(m) => &m.hdr,
            CmMessage::Rep(m) => &m.hdr,
            CmMessage::Rtu(m) => &m.hdr,
            CmMessage::Dreq(m) => &m.hdr,
            CmMessage::Drep(m) => &m.hdr,
            CmMessage::SidrReq(m) => &m.hdr,
            CmMessage::SidrRep(m) => &m.hdr,
            CmMessage::Lap(m) => &m.hdr,
            CmMessage::Apr(m) => &m.hdr,
        }
    }

    /// The MAD header, for changing (e.g. the transaction ID).
    pub fn header_mut(&mut self) -> &mut MadHeader {
        match self {
            CmMessage::Req(m) => &mut m.hdr,
            CmMessage::Mra(m) => &mut m.hdr,
            CmMessage::Rej(m) => &mut m.hdr,
            CmMessage::Rep(m) => &mut m.hdr,
            CmMessage::Rtu(m) => &mut m.hdr,
            CmMessage::Dreq(m) => &mut m.hdr,
            CmMessage::Drep(m) => &mut m.hdr,
            CmMessage::SidrReq(m) => &mut m.hdr,
            CmMessage::SidrRep(m) => &mut m.hdr,
            CmMessage::Lap(m) => &mut m.hdr,
            CmMessage::Apr(m) => &mut m.hdr,
        }
    }

    /// The sender's communication ID (MAD offset 24); `None` for SIDR messages, which have a
    /// request ID instead.
    pub const fn local_comm_id(&self) -> Option<u32> {
        Some(match self {
            CmMessage::Req(m) => m.local_comm_id,
            CmMessage::Mra(m) => m.local_comm_id,
            CmMessage::Rej(m) => m.local_comm_id,
            CmMessage::Rep(m) => m.local_comm_id,
            CmMessage::Rtu(m) => m.local_comm_id,
            CmMessage::Dreq(m) => m.local_comm_id,
            CmMessage::Drep(m) => m.local_comm_id,
            CmMessage::Lap(m) => m.local_comm_id,
            CmMessage::Apr(m) => m.local_comm_id,
            CmMessage::SidrReq(_) | CmMessage::SidrRep(_) => return None,
        })
    }

    /// The receiver's communication ID (MAD offset 28) of MRA, REJ, REP, RTU, DREQ, DREP, LAP
    /// and APR; `None` for REQ and SIDR messages. It may be 0 (a REJ for a timed-out REQ):
    /// callers must not treat 0 as "the previous connection".
    pub const fn remote_comm_id(&self) -> Option<u32> {
        Some(match self {
            CmMessage::Mra(m) => m.remote_comm_id,
            CmMessage::Rej(m) => m.remote_comm_id,
            CmMessage::Rep(m) => m.remote_comm_id,
            CmMessage::Rtu(m) => m.remote_comm_id,
            CmMessage::Dreq(m) => m.remote_comm_id,
            CmMessage::Drep(m) => m.remote_comm_id,
            CmMessage::Lap(m) => m.remote_comm_id,
            CmMessage::Apr(m) => m.remote_comm_id,
            CmMessage::Req(_) | CmMessage::SidrReq(_) | CmMessage::SidrRep(_) => return None,
        })
    }

    /// The request ID of a SIDR_REQ or SIDR_REP (a SIDR_REP echoes its SIDR_REQ's).
    pub const fn sidr_request_id(&self) -> Option<u32> {
        match self {
            CmMessage::SidrReq(m) => Some(m.request_id),
            CmMessage::SidrRep(m) => Some(m.request_id),
            _ => None,
        }
    }

    /// The service ID of a REQ, SIDR_REQ or SIDR_REP.
    pub const fn service_id(&self) -> Option<u64> {
        match self {
            CmMessage::Req(m) => Some(m.service_id),
            CmMessage::SidrReq(m) => Some(m.service_id),
            CmMessage::SidrRep(m) => Some(m.service_id),
            _ => None,
        }
    }

    /// A REQ's primary local GID: the *sender's* address.
    pub const fn primary_local_gid(&self) -> Option<Gid> {
        match self {
            CmMessage::Req(m) => Some(m.primary_path.local_gid),
            _ => None,
        }
    }

    /// A REQ's primary remote GID: the address of the port the REQ is meant for.
    pub const fn primary_remote_gid(&self) -> Option<Gid> {
        match self {
            CmMessage::Req(m) => Some(m.primary_path.remote_gid),
            _ => None,
        }
    }

    /// The private data.
    pub fn private_data(&self) -> &[u8] {
        match self {
            CmMessage::Req(m) => &m.private_data,
            CmMessage::Mra(m) => &m.private_data,
            CmMessage::Rej(m) => &m.private_data,
            CmMessage::Rep(m) => &m.private_data,
            CmMessage::Rtu(m) => &m.private_data,
            CmMessage::Dreq(m) => &m.private_data,
            CmMessage::Drep(m) => &m.private_data,
            CmMessage::SidrReq(m) => &m.private_data,
            CmMessage::SidrRep(m) => &m.private_data,
            CmMessage::Lap(m) => &m.private_data,
            CmMessage::Apr(m) => &m.private_data,
        }
    }

    /// The private data, for changing.
    pub fn private_data_mut(&mut self) -> &mut [u8] {
        match self {
            CmMessage::Req(m) => &mut m.private_data,
            CmMessage::Mra(m) => &mut m.private_data,
            CmMessage::Rej(m) => &mut m.private_data,
            CmMessage::Rep(m) => &mut m.private_data,
            CmMessage::Rtu(m) => &mut m.private_data,
            CmMessage::Dreq(m) => &mut m.private_data,
            CmMessage::Drep(m) => &mut m.private_data,
            CmMessage::SidrReq(m) => &mut m.private_data,
            CmMessage::SidrRep(m) => &mut m.private_data,
            CmMessage::Lap(m) => &mut m.private_data,
            CmMessage::Apr(m) => &mut m.private_data,
        }
    }

    /// Encodes the message into `out`, overwriting all 256 bytes.
    pub fn build(&self, out: &mut Mad) {
        match self {
            CmMessage::Req(m) => m.build(out),
            CmMessage::Mra(m) => m.build(out),
            CmMessage::Rej(m) => m.build(out),
            CmMessage::Rep(m) => m.build(out),
            CmMessage::Rtu(m) => m.build(out),
            CmMessage::Dreq(m) => m.build(out),
            CmMessage::Drep(m) => m.build(out),
            CmMessage::SidrReq(m) => m.build(out),
            CmMessage::SidrRep(m) => m.build(out),
            CmMessage::Lap(m) => m.build(out),
            CmMessage::Apr(m) => m.build(out),
        }
    }

    /// Encodes the message as a new 256-byte MAD.
    pub fn to_mad(&self) -> Mad {
        let mut m = [0u8; MAD_SIZE];
        self.build(&mut m);
        m
    }
}

impl TryFrom<&[u8]> for CmMessage {
    type Error = WireError;
    fn try_from(input: &[u8]) -> Result<CmMessage, WireError> {
        CmMessage::parse_mad(input)
    }
}

#[cfg(test)]
mod tests;

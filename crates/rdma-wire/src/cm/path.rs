//! The path description shared by REQ (primary and alternate path) and LAP (alternate path).

use crate::bytes::{bits, get, get_u16, get_u32, place, put, put_u16, put_u32};
use crate::Gid;

/// One path of a connection, as a REQ or LAP describes it.
///
/// REQ and LAP lay the same fields out slightly differently (traffic class and packet rate
/// swap places); [`CmPath`] holds the values, the messages know the layouts. Values wider than
/// their field are truncated when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmPath {
    /// Local port LID (0xFFFF, the permissive LID, on RoCE).
    pub local_lid: u16,
    /// Remote port LID.
    pub remote_lid: u16,
    /// Local port GID.
    pub local_gid: Gid,
    /// Remote port GID.
    pub remote_gid: Gid,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Packet rate (6 bits).
    pub packet_rate: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Service level (4 bits).
    pub sl: u8,
    /// Subnet local: the remote port is on the local subnet.
    pub subnet_local: bool,
    /// Local ACK timeout (5 bits).
    pub local_ack_timeout: u8,
}

const FLOW_LABEL_MASK: u32 = 0x000F_FFFF;

impl CmPath {
    /// Decodes the 44-byte path block of a REQ starting at MAD offset `at` (76 or 120).
    ///
    /// | offset | field |
    /// |---|---|
    /// | +0 | LocalLID · +2 RemoteLID |
    /// | +4 | LocalGID (16) · +20 RemoteGID (16) |
    /// | +36 | FlowLabel (20) · reserved (6) · PacketRate (6) |
    /// | +40 | TrafficClass · +41 HopLimit |
    /// | +42 | SL (4) · SubnetLocal (1) · reserved (3) |
    /// | +43 | LocalAckTimeout (5) · reserved (3) |
    pub(crate) fn read_req(m: &[u8; 256], at: usize) -> CmPath {
        let word = get_u32(m, at + 36);
        CmPath {
            local_lid: get_u16(m, at),
            remote_lid: get_u16(m, at + 2),
            local_gid: Gid(get(m, at + 4)),
            remote_gid: Gid(get(m, at + 20)),
            flow_label: word >> 12,
            packet_rate: (word & 0x3F) as u8,
            traffic_class: m[at + 40],
            hop_limit: m[at + 41],
            sl: bits(m[at + 42], 0, 4),
            subnet_local: bits(m[at + 42], 4, 1) != 0,
            local_ack_timeout: bits(m[at + 43], 0, 5),
        }
    }

    /// Encodes a REQ path block at MAD offset `at`. The low three bits of byte `at + 43` are
    /// written as zero; the alternate block's SAPSupported bit is the REQ's business.
    pub(crate) fn write_req(&self, m: &mut [u8; 256], at: usize) {
        put_u16(m, at, self.local_lid);
        put_u16(m, at + 2, self.remote_lid);
        put(m, at + 4, &self.local_gid.0);
        put(m, at + 20, &self.remote_gid.0);
        let word = ((self.flow_label & FLOW_LABEL_MASK) << 12) | u32::from(self.packet_rate & 0x3F);
        put_u32(m, at + 36, word);
        m[at + 40] = self.traffic_class;
        m[at + 41] = self.hop_limit;
        m[at + 42] = place(self.sl, 0, 4) | place(self.subnet_local.into(), 4, 1);
        m[at + 43] = place(self.local_ack_timeout, 0, 5);
    }

    /// Decodes the alternate path of a LAP (MAD offsets 44–87).
    ///
    /// | offset | field |
    /// |---|---|
    /// | 44 | LocalLID · 46 RemoteLID |
    /// | 48 | LocalGID (16) · 64 RemoteGID (16) |
    /// | 80 | FlowLabel (20) · reserved (4) · TrafficClass (8) |
    /// | 84 | HopLimit |
    /// | 85 | reserved (2) · PacketRate (6) |
    /// | 86 | SL (4) · SubnetLocal (1) · reserved (3) |
    /// | 87 | LocalAckTimeout (5) · reserved (3) |
    pub(crate) fn read_lap(m: &[u8; 256]) -> CmPath {
        let word = get_u32(m, 80);
        CmPath {
            local_lid: get_u16(m, 44),
            remote_lid: get_u16(m, 46),
            local_gid: Gid(get(m, 48)),
            remote_gid: Gid(get(m, 64)),
            flow_label: word >> 12,
            traffic_class: (word & 0xFF) as u8,
            hop_limit: m[84],
            packet_rate: bits(m[85], 2, 6),
            sl: bits(m[86], 0, 4),
            subnet_local: bits(m[86], 4, 1) != 0,
            local_ack_timeout: bits(m[87], 0, 5),
        }
    }

    /// Encodes the alternate path of a LAP.
    pub(crate) fn write_lap(&self, m: &mut [u8; 256]) {
        put_u16(m, 44, self.local_lid);
        put_u16(m, 46, self.remote_lid);
        put(m, 48, &self.local_gid.0);
        put(m, 64, &self.remote_gid.0);
        let word = ((self.flow_label & FLOW_LABEL_MASK) << 12) | u32::from(self.traffic_class);
        put_u32(m, 80, word);
        m[84] = self.hop_limit;
        m[85] = place(self.packet_rate, 2, 6);
        m[86] = place(self.sl, 0, 4) | place(self.subnet_local.into(), 4, 1);
        m[87] = place(self.local_ack_timeout, 0, 5);
    }
}

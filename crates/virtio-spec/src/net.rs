//! Virtio network device (virtio 1.1 §5.1): feature bits, the per-packet header, the device
//! configuration and the queue numbering.

/// Receive queue of the first (only) queue pair.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue of the first queue pair.
pub const TX_QUEUE: u16 = 1;
/// Largest Ethernet frame (without FCS) a device without GSO and MTU features must accept
/// from the driver and may deliver: 1514 bytes (1500 MTU + 14 header).
pub const MAX_FRAME: usize = 1514;

/// Feature bits of a network device (bit numbers; see [`crate::features::bit`]).
pub mod features {
    /// Device handles packets with partial checksum.
    pub const CSUM: u32 = 0;
    /// Driver handles packets with partial checksum.
    pub const GUEST_CSUM: u32 = 1;
    /// Control channel offloads reconfiguration.
    pub const CTRL_GUEST_OFFLOADS: u32 = 2;
    /// Device reports its maximum MTU in the config.
    pub const MTU: u32 = 3;
    /// Device has a MAC address in the config.
    pub const MAC: u32 = 5;
    /// Driver can receive TSOv4.
    pub const GUEST_TSO4: u32 = 7;
    /// Driver can receive TSOv6.
    pub const GUEST_TSO6: u32 = 8;
    /// Driver can receive TSO with ECN.
    pub const GUEST_ECN: u32 = 9;
    /// Driver can receive UFO.
    pub const GUEST_UFO: u32 = 10;
    /// Device can receive TSOv4.
    pub const HOST_TSO4: u32 = 11;
    /// Device can receive TSOv6.
    pub const HOST_TSO6: u32 = 12;
    /// Device can receive TSO with ECN.
    pub const HOST_ECN: u32 = 13;
    /// Device can receive UFO.
    pub const HOST_UFO: u32 = 14;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// The config `status` field is valid.
    pub const STATUS: u32 = 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u32 = 17;
    /// Control channel RX mode.
    pub const CTRL_RX: u32 = 18;
    /// Control channel VLAN filtering.
    pub const CTRL_VLAN: u32 = 19;
    /// Driver can send gratuitous packets.
    pub const GUEST_ANNOUNCE: u32 = 21;
    /// Multiqueue with automatic receive steering.
    pub const MQ: u32 = 22;
    /// MAC address set through the control channel.
    pub const CTRL_MAC_ADDR: u32 = 23;
}

/// Header flag: the packet needs a checksum at `csum_start + csum_offset`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag: the checksum is known valid.
pub const HDR_F_DATA_VALID: u8 = 2;
/// GSO type: not a GSO frame.
pub const HDR_GSO_NONE: u8 = 0;

/// Length of `struct virtio_net_hdr` with VERSION_1 (`num_buffers` always present).
pub const HDR_LEN: usize = 12;

/// The header in front of every packet on the RX and TX queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `HDR_F_*`.
    pub flags: u8,
    /// `HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy for each GSO segment.
    pub hdr_len: u16,
    /// GSO segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// Buffers the packet spans (RX with MRG_RXBUF; 1 otherwise on RX, 0 on TX).
    pub num_buffers: u16,
}

impl NetHdr {
    /// Parses the header's 12 bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
    /// The header as 12 bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Offsets of `struct virtio_net_config` (the device configuration region).
pub mod config {
    /// `mac[6]` (valid with [`super::features::MAC`]).
    pub const MAC: u64 = 0;
    /// `status` (u16; valid with [`super::features::STATUS`]).
    pub const STATUS: u64 = 6;
    /// `max_virtqueue_pairs` (u16; valid with MQ).
    pub const MAX_VIRTQUEUE_PAIRS: u64 = 8;
    /// `mtu` (u16; valid with [`super::features::MTU`]).
    pub const MTU: u64 = 10;
    /// `speed` (u32, Mbit/s).
    pub const SPEED: u64 = 12;
    /// `duplex` (u8).
    pub const DUPLEX: u64 = 16;
    /// Bytes up to and including `duplex`.
    pub const LEN: u64 = 17;
    /// `status` bit: the link is up.
    pub const S_LINK_UP: u16 = 1;
    /// `status` bit: the driver should announce itself.
    pub const S_ANNOUNCE: u16 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;

    #[test]
    fn feature_bits_match_the_spec() {
        assert_eq!(bit(features::CSUM), 1);
        assert_eq!(bit(features::MAC), 0x20);
        assert_eq!(bit(features::MRG_RXBUF), 0x8000);
        assert_eq!(bit(features::STATUS), 0x1_0000);
        assert_eq!(bit(features::CTRL_VQ), 0x2_0000);
        assert_eq!(bit(features::MQ), 0x40_0000);
    }

    #[test]
    fn header_layout_matches_the_spec() {
        let h = NetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: HDR_GSO_NONE,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 1,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0, 2, 1, 4, 3, 6, 5, 8, 7, 1, 0]);
        assert_eq!(NetHdr::from_bytes(&b), h);
    }

    #[test]
    fn config_offsets_match_the_spec() {
        assert_eq!(
            [
                config::MAC,
                config::STATUS,
                config::MAX_VIRTQUEUE_PAIRS,
                config::MTU,
                config::SPEED,
                config::DUPLEX
            ],
            [0, 6, 8, 10, 12, 16]
        );
        assert_eq!((RX_QUEUE, TX_QUEUE), (0, 1));
    }
}

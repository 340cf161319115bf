//! Virtio over PCI, modern interface (virtio 1.1 §4.1): IDs, the vendor-specific capabilities
//! that locate the common configuration, notification, ISR and device configuration regions,
//! and the common configuration's register offsets.

/// PCI vendor ID of every virtio device.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
pub const MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Virtio device type of a network card.
pub const DEVICE_TYPE_NET: u16 = 1;
/// PCI device ID of a modern virtio-net device.
pub const DEVICE_ID_NET: u16 = MODERN_DEVICE_ID_BASE + DEVICE_TYPE_NET;
/// Modern devices have a revision ID of 1 or more.
pub const MODERN_REVISION: u8 = 1;
/// PCI class code of an Ethernet controller (class 02, subclass 00, prog-if 00).
pub const CLASS_NETWORK_ETHERNET: u32 = 0x02_00_00;
/// PCI capability ID of a vendor-specific capability (every virtio capability).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// `cfg_type` of a virtio PCI capability.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window.
    pub const PCI: u8 = 5;
}

/// Length of `struct virtio_pci_cap`.
pub const CAP_LEN: u8 = 16;
/// Length of `struct virtio_pci_notify_cap` (the cap plus `notify_off_multiplier`).
pub const NOTIFY_CAP_LEN: u8 = 20;

/// Offsets inside `struct virtio_pci_cap` (relative to the capability's start).
pub mod cap {
    /// `cap_vndr` (0x09).
    pub const VNDR: usize = 0;
    /// `cap_next`.
    pub const NEXT: usize = 1;
    /// `cap_len`.
    pub const LEN: usize = 2;
    /// `cfg_type`.
    pub const CFG_TYPE: usize = 3;
    /// `bar`: which BAR holds the region.
    pub const BAR: usize = 4;
    /// `id`: distinguishes several capabilities of one type.
    pub const ID: usize = 5;
    /// `offset` (u32): the region's offset in the BAR.
    pub const OFFSET: usize = 8;
    /// `length` (u32): the region's length.
    pub const LENGTH: usize = 12;
    /// `notify_off_multiplier` (u32), notification capability only.
    pub const NOTIFY_OFF_MULTIPLIER: usize = 16;
}

/// A virtio PCI capability: which region, where in which BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCap {
    /// One of [`cfg_type`].
    pub cfg_type: u8,
    /// BAR index (0 to 5).
    pub bar: u8,
    /// Offset of the region in the BAR.
    pub offset: u32,
    /// Length of the region.
    pub length: u32,
    /// `notify_off_multiplier` for [`cfg_type::NOTIFY`], otherwise 0.
    pub notify_off_multiplier: u32,
}

impl VirtioPciCap {
    /// The capability's bytes as they sit in configuration space; `next` is the following
    /// capability's offset (0 for the last). Only the first [`VirtioPciCap::len`] bytes count.
    pub fn to_bytes(&self, next: u8) -> [u8; NOTIFY_CAP_LEN as usize] {
        let mut b = [0u8; NOTIFY_CAP_LEN as usize];
        b[cap::VNDR] = PCI_CAP_ID_VNDR;
        b[cap::NEXT] = next;
        b[cap::LEN] = self.len();
        b[cap::CFG_TYPE] = self.cfg_type;
        b[cap::BAR] = self.bar;
        b[cap::OFFSET..cap::OFFSET + 4].copy_from_slice(&self.offset.to_le_bytes());
        b[cap::LENGTH..cap::LENGTH + 4].copy_from_slice(&self.length.to_le_bytes());
        if self.cfg_type == cfg_type::NOTIFY {
            b[cap::NOTIFY_OFF_MULTIPLIER..cap::NOTIFY_OFF_MULTIPLIER + 4]
                .copy_from_slice(&self.notify_off_multiplier.to_le_bytes());
        }
        b
    }
    /// Parses a capability from its bytes (at least [`CAP_LEN`]); `None` when it is not a
    /// virtio capability of a sane length.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < usize::from(CAP_LEN) || b[cap::VNDR] != PCI_CAP_ID_VNDR {
            return None;
        }
        let len = b[cap::LEN];
        let cfg = b[cap::CFG_TYPE];
        if len < CAP_LEN || (cfg == cfg_type::NOTIFY && (len < NOTIFY_CAP_LEN || b.len() < 20)) {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Some(VirtioPciCap {
            cfg_type: cfg,
            bar: b[cap::BAR],
            offset: u32_at(cap::OFFSET),
            length: u32_at(cap::LENGTH),
            notify_off_multiplier: if cfg == cfg_type::NOTIFY {
                u32_at(cap::NOTIFY_OFF_MULTIPLIER)
            } else {
                0
            },
        })
    }
    /// `cap_len` for this capability's type.
    pub const fn len(&self) -> u8 {
        if self.cfg_type == cfg_type::NOTIFY {
            NOTIFY_CAP_LEN
        } else {
            CAP_LEN
        }
    }
    /// Always false: a capability has at least its header (clippy's `len` companion).
    pub const fn is_empty(&self) -> bool {
        false
    }
}

/// Offsets of `struct virtio_pci_common_cfg` (§4.1.4.3), relative to the region's start.
pub mod common {
    /// `device_feature_select` (u32, RW).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (u32, RO): the 32 feature bits the select picks.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (u32, RW).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (u32, RW).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (u16, RW).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (u16, RO).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8, RW; writing 0 resets the device).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8, RO).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (u16, RW).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (u16, RW).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (u16, RW).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (u16, RW).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (u16, RO).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc` (u64, RW): descriptor table address.
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver` (u64, RW): available ring address.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device` (u64, RW): used ring address.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure (virtio 1.1; 1.2's `queue_notify_data`/`queue_reset` follow).
    pub const LEN: u64 = 0x38;

    /// The width in bytes of the field at `offset`, or `None` for an offset that is not the
    /// start of a field.
    pub const fn field_width(offset: u64) -> Option<u64> {
        match offset {
            DEVICE_FEATURE_SELECT | DEVICE_FEATURE | DRIVER_FEATURE_SELECT | DRIVER_FEATURE => {
                Some(4)
            }
            CONFIG_MSIX_VECTOR | NUM_QUEUES | QUEUE_SELECT | QUEUE_SIZE | QUEUE_MSIX_VECTOR
            | QUEUE_ENABLE | QUEUE_NOTIFY_OFF => Some(2),
            DEVICE_STATUS | CONFIG_GENERATION => Some(1),
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => Some(8),
            _ => None,
        }
    }
}

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (§4.1.4.5); reading the ISR register clears it.
pub mod isr {
    /// A queue has a new used buffer.
    pub const QUEUE: u8 = 1;
    /// The device configuration changed.
    pub const CONFIG: u8 = 2;
}

/// The BAR offset a driver writes to notify queue `notify_off` (the queue's `queue_notify_off`)
/// given the notification capability's offset and multiplier (§4.1.4.4).
pub const fn notify_address(cap_offset: u32, notify_off: u16, multiplier: u32) -> u64 {
    cap_offset as u64 + notify_off as u64 * multiplier as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_cfg_offsets_match_the_spec() {
        use common::*;
        let fields = [
            (DEVICE_FEATURE_SELECT, 4),
            (DEVICE_FEATURE, 4),
            (DRIVER_FEATURE_SELECT, 4),
            (DRIVER_FEATURE, 4),
            (CONFIG_MSIX_VECTOR, 2),
            (NUM_QUEUES, 2),
            (DEVICE_STATUS, 1),
            (CONFIG_GENERATION, 1),
            (QUEUE_SELECT, 2),
            (QUEUE_SIZE, 2),
            (QUEUE_MSIX_VECTOR, 2),
            (QUEUE_ENABLE, 2),
            (QUEUE_NOTIFY_OFF, 2),
            (QUEUE_DESC, 8),
            (QUEUE_DRIVER, 8),
            (QUEUE_DEVICE, 8),
        ];
        // The fields are packed back to back, like the C structure.
        let mut at = 0;
        for (off, width) in fields {
            assert_eq!(off, at, "field at {off:#x}");
            assert_eq!(field_width(off), Some(width));
            at += width;
        }
        assert_eq!(at, LEN);
        assert_eq!(field_width(0x01), None);
    }

    #[test]
    fn ids_match_the_spec() {
        assert_eq!(DEVICE_ID_NET, 0x1041);
        assert_eq!(VENDOR_ID, 0x1af4);
        assert_eq!(
            [
                cfg_type::COMMON,
                cfg_type::NOTIFY,
                cfg_type::ISR,
                cfg_type::DEVICE,
                cfg_type::PCI
            ],
            [1, 2, 3, 4, 5]
        );
        assert_eq!([isr::QUEUE, isr::CONFIG], [1, 2]);
    }

    #[test]
    fn capabilities_round_trip() {
        let n = VirtioPciCap {
            cfg_type: cfg_type::NOTIFY,
            bar: 4,
            offset: 0x3000,
            length: 0x2000,
            notify_off_multiplier: 4096,
        };
        let b = n.to_bytes(0x60);
        assert_eq!(&b[..6], &[0x09, 0x60, 20, 2, 4, 0]);
        assert_eq!(&b[8..12], &0x3000u32.to_le_bytes());
        assert_eq!(&b[16..20], &4096u32.to_le_bytes());
        assert_eq!(VirtioPciCap::from_bytes(&b), Some(n));
        let c = VirtioPciCap {
            cfg_type: cfg_type::COMMON,
            bar: 4,
            offset: 0,
            length: 0x38,
            notify_off_multiplier: 0,
        };
        let b = c.to_bytes(0);
        assert_eq!(b[cap::LEN], 16);
        assert_eq!(VirtioPciCap::from_bytes(&b[..16]), Some(c));
        // Not virtio, too short, or a notify cap without its multiplier: refused.
        let mut bad = b;
        bad[0] = 0x11;
        assert_eq!(VirtioPciCap::from_bytes(&bad), None);
        assert_eq!(VirtioPciCap::from_bytes(&b[..10]), None);
        let mut short_notify = n.to_bytes(0);
        short_notify[cap::LEN] = 16;
        assert_eq!(VirtioPciCap::from_bytes(&short_notify), None);
        assert_eq!(notify_address(0x3000, 1, 4096), 0x4000);
    }
}

//! BAR0 layout and PCI configuration space of the stand-in NIC. Nothing in BAR0 is mappable:
//! every access goes to the device over the socket (notifications included: the device's
//! worker is woken by them instead of polling).
//!
//! ```text
//! BAR0 0x0000  common configuration (virtio_pci_common_cfg, 0x38 bytes)
//!      0x1000  ISR status (1 byte, read clears)
//!      0x2000  device configuration (virtio_net_config)
//!      0x3000  notifications: queue q at 0x3000 + 4 * q (queue_notify_off = q)
//!      0x4000  MSI-X table (MSIX_VECTORS x 16 bytes)
//!      0x5000  MSI-X pending bit array
//! config 0x40 MSI-X cap -> 0x50 common -> 0x60 notify -> 0x74 ISR -> 0x84 device config
//! ```
use vfio_user_device::{config::CONFIG_SIZE as PCI_CONFIG_SIZE, ConfigSpace, Identity};
use virtio_spec::pci::{self, cfg_type, VirtioPciCap};

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Common configuration offset.
pub const COMMON: u64 = 0x0000;
/// ISR offset.
pub const ISR: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CFG: u64 = 0x2000;
/// Bytes of the device configuration region.
pub const DEVICE_CFG_LEN: u64 = 0x20;
/// Notification region offset.
pub const NOTIFY: u64 = 0x3000;
/// `notify_off_multiplier`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table offset.
pub const MSIX_TABLE: u64 = 0x4000;
/// MSI-X PBA offset.
pub const MSIX_PBA: u64 = 0x5000;
/// MSI-X vectors: configuration changes, RX, TX.
pub const MSIX_VECTORS: u16 = 3;
/// Queues: RX and TX of one pair.
pub const NUM_QUEUES: u16 = 2;
/// Largest queue size offered (the driver may choose a smaller power of two).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Size of the configuration space region.
pub const CONFIG_SIZE: u64 = PCI_CONFIG_SIZE;
/// Offset of the MSI-X capability.
pub const MSIX_CAP: usize = 0x40;

const _: () = assert!(NOTIFY + NUM_QUEUES as u64 * NOTIFY_MULTIPLIER as u64 <= MSIX_TABLE);
const _: () = assert!(MSIX_TABLE + MSIX_VECTORS as u64 * 16 <= MSIX_PBA);
const _: () = assert!(BAR0_SIZE.is_power_of_two() && MSIX_PBA + 8 <= BAR0_SIZE);

/// The virtio capabilities: (offset in configuration space, capability).
pub const CAPS: [(usize, VirtioPciCap); 4] = [
    (
        0x50,
        cap(
            cfg_type::COMMON,
            COMMON,
            virtio_spec::pci::common::LEN as u32,
            0,
        ),
    ),
    (
        0x60,
        cap(cfg_type::NOTIFY, NOTIFY, 0x1000, NOTIFY_MULTIPLIER),
    ),
    (0x74, cap(cfg_type::ISR, ISR, 4, 0)),
    (
        0x84,
        cap(cfg_type::DEVICE, DEVICE_CFG, DEVICE_CFG_LEN as u32, 0),
    ),
];

const fn cap(cfg_type: u8, offset: u64, length: u32, mult: u32) -> VirtioPciCap {
    VirtioPciCap {
        cfg_type,
        bar: 0,
        offset: offset as u32,
        length,
        notify_off_multiplier: mult,
    }
}

/// The NIC's PCI identity and where its MSI-X structures live.
pub const IDENTITY: Identity = Identity {
    vendor: pci::VENDOR_ID,
    device: pci::DEVICE_ID_NET,
    revision: pci::MODERN_REVISION,
    class_code: pci::CLASS_NETWORK_ETHERNET,
    subsystem_vendor: pci::VENDOR_ID,
    subsystem: 0x40, // modern
    bar0_size: BAR0_SIZE,
    msix_cap: MSIX_CAP,
    msix_vectors: MSIX_VECTORS,
    msix_table: MSIX_TABLE,
    msix_pba: MSIX_PBA,
};

/// The configuration space after reset: the MSI-X capability followed by the virtio
/// capabilities ([`CAPS`]).
pub fn config_space() -> ConfigSpace {
    let mut c = ConfigSpace::new(&IDENTITY);
    c.set_bytes(MSIX_CAP + 1, &[CAPS[0].0 as u8]);
    for (i, (at, cap)) in CAPS.iter().enumerate() {
        let next = CAPS.get(i + 1).map_or(0, |(n, _)| *n as u8);
        let bytes = cap.to_bytes(next);
        c.set_bytes(*at, &bytes[..usize::from(cap.len())]);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_capability_chain() {
        let c = config_space();
        let mut b = [0u8; 4];
        c.read(0, &mut b);
        assert_eq!(b, [0xf4, 0x1a, 0x41, 0x10]);
        c.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b) >> 8, pci::CLASS_NETWORK_ETHERNET);
        assert!(b[0] >= 1, "modern revision");
        // Walk the list from 0x34 as a driver does and find every virtio capability.
        let mut found = Vec::new();
        let mut first = [0u8];
        c.read(0x34, &mut first);
        let mut at = first[0] as usize;
        while at != 0 {
            let mut cap = [0u8; 20];
            c.read(at as u64, &mut cap);
            if cap[0] == pci::PCI_CAP_ID_VNDR {
                found.push(VirtioPciCap::from_bytes(&cap).expect("well-formed"));
            }
            at = cap[1] as usize;
        }
        let types: Vec<u8> = found.iter().map(|c| c.cfg_type).collect();
        assert_eq!(types, [1, 2, 3, 4]);
        assert_eq!(found[1].notify_off_multiplier, NOTIFY_MULTIPLIER);
        for f in &found {
            assert!(u64::from(f.offset) + u64::from(f.length) <= BAR0_SIZE);
        }
    }

    #[test]
    fn writes_are_masked_and_bar_sizing_works() {
        let mut c = config_space();
        c.write(0, &[0, 0]);
        let mut b = [0u8; 4];
        c.read(0, &mut b);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), pci::VENDOR_ID);
        c.write(0x10, &[0xff; 4]);
        c.read(0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), !(BAR0_SIZE as u32 - 1) | 4);
        c.write(0x10, &0xe000_0000u32.to_le_bytes());
        c.read(0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xe000_0004);
        assert!(!c.msix_enabled());
        c.write(MSIX_CAP as u64 + 2, &[0, 0x80]);
        assert!(c.msix_enabled());
    }
}

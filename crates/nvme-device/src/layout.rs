//! BAR0 layout and PCI configuration space of the stand-in controller.
//!
//! ```text
//! BAR0 0x00000  controller registers (CAP, VS, CC, CSTS, AQA, ASQ, ACQ): not mappable
//!      0x01000  doorbells: with DSTRD 9 queue pair q owns page 0x1000 * (q + 1);
//!               with DSTRD 0 all doorbells sit in page 0x1000. Mappable (memfd).
//!      0x30000  MSI-X table (MSIX_VECTORS × 16 bytes)
//!      0x38000  MSI-X pending bit array
//! ```
use nvme_spec::regs;
use vfio_user_device::{config::CONFIG_SIZE as PCI_CONFIG_SIZE, ConfigSpace, Identity};

/// Maximum number of I/O queue pairs.
pub const MAX_IO_QUEUES: u16 = 31;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x4_0000;
/// First mappable byte of BAR0 (the doorbells).
pub const DOORBELL_AREA: u64 = regs::DOORBELL_BASE;
/// Bytes of mappable doorbell pages (one page per queue pair, admin included).
pub const DOORBELL_AREA_SIZE: u64 = (MAX_IO_QUEUES as u64 + 1) * 0x1000;
/// MSI-X table offset in BAR0.
pub const MSIX_TABLE: u64 = 0x3_0000;
/// MSI-X PBA offset in BAR0.
pub const MSIX_PBA: u64 = 0x3_8000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 32;
/// Size of the configuration space region.
pub const CONFIG_SIZE: u64 = PCI_CONFIG_SIZE;
/// Offset of the MSI-X capability in configuration space.
pub const MSIX_CAP: usize = 0x40;
/// PCI vendor id (Red Hat, as QEMU's emulated NVMe controller).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id.
pub const DEVICE_ID: u16 = 0x0010;
/// Class code: mass storage, non-volatile memory, NVM Express.
pub const CLASS_CODE: u32 = 0x01_08_02;

const _: () = assert!(DOORBELL_AREA + DOORBELL_AREA_SIZE <= MSIX_TABLE);
const _: () = assert!(MSIX_TABLE + MSIX_VECTORS as u64 * 16 <= MSIX_PBA);
const _: () = assert!(BAR0_SIZE.is_power_of_two() && MSIX_PBA + 8 <= BAR0_SIZE);

/// The controller's PCI identity and where its MSI-X structures live.
pub const IDENTITY: Identity = Identity {
    vendor: VENDOR_ID,
    device: DEVICE_ID,
    revision: 2,
    class_code: CLASS_CODE,
    subsystem_vendor: VENDOR_ID,
    subsystem: DEVICE_ID,
    bar0_size: BAR0_SIZE,
    msix_cap: MSIX_CAP,
    msix_vectors: MSIX_VECTORS,
    msix_table: MSIX_TABLE,
    msix_pba: MSIX_PBA,
};

/// The configuration space after reset.
pub fn config_space() -> ConfigSpace {
    ConfigSpace::new(&IDENTITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_class_bar_and_msix_cap() {
        let c = config_space();
        let mut b = [0u8; 4];
        c.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b) >> 8, CLASS_CODE);
        c.read(0x34, &mut b);
        assert_eq!(b[0] as usize, MSIX_CAP);
        c.read(MSIX_CAP as u64, &mut b);
        assert_eq!(b[0], 0x11);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), MSIX_VECTORS - 1);
        c.read(0x1000, &mut b);
        assert_eq!(b, [0; 4], "outside reads as zero");
    }

    #[test]
    fn writes_are_masked_and_bar_sizing_works() {
        let mut c = config_space();
        c.write(0, &[0xff, 0xff]);
        let mut b = [0u8; 4];
        c.read(0, &mut b);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), VENDOR_ID);
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

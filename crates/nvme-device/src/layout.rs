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
pub const CONFIG_SIZE: u64 = 256;
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

/// The device's configuration space: registers plus which bits the client may write.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE as usize],
    bar_sizing: bool,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// The configuration space after reset.
    pub fn new() -> Self {
        let mut b = [0u8; CONFIG_SIZE as usize];
        b[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        b[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        b[6] = 0x10; // status: capability list
        b[8] = 2; // revision
        b[9..12].copy_from_slice(&CLASS_CODE.to_le_bytes()[..3]);
        b[0x10] = 0x4; // BAR0: 64-bit memory
        b[0x2c..0x2e].copy_from_slice(&VENDOR_ID.to_le_bytes());
        b[0x2e..0x30].copy_from_slice(&DEVICE_ID.to_le_bytes());
        b[0x34] = MSIX_CAP as u8;
        b[0x3d] = 1; // INTA
        b[MSIX_CAP] = 0x11;
        b[MSIX_CAP + 2..MSIX_CAP + 4].copy_from_slice(&(MSIX_VECTORS - 1).to_le_bytes());
        b[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        b[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        ConfigSpace {
            bytes: b,
            bar_sizing: false,
        }
    }

    /// Reads `data.len()` bytes at `offset`; bytes outside the space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *d = if (0x10..0x14).contains(&o) && self.bar_sizing {
                (!(BAR0_SIZE as u32 - 1) | 0x4).to_le_bytes()[(o - 0x10) as usize]
            } else {
                self.bytes.get(o as usize).copied().unwrap_or(0)
            };
        }
    }

    /// Writes: the command register, BAR0 (sizing and address) and the MSI-X control bits are
    /// writable; everything else is read-only.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0x10 && data == [0xff; 4] {
            self.bar_sizing = true;
            return;
        }
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64).map(|o| o as usize) else {
                return;
            };
            let mask: u8 = match o {
                4 => 0x06,    // memory space, bus master
                5 => 0x04,    // interrupt disable
                0x10 => 0xf0, // BAR0 low (size 256 KiB)
                0x11 => 0xff,
                0x12 => 0xfc,
                0x13..=0x17 => 0xff,            // BAR0 high
                x if x == MSIX_CAP + 3 => 0xc0, // MSI-X enable, function mask
                _ => 0,
            };
            if (0x10..0x14).contains(&o) {
                self.bar_sizing = false;
            }
            if let Some(b) = self.bytes.get_mut(o) {
                *b = (*b & !mask) | (v & mask);
            }
        }
    }

    /// MSI-X enabled and not function-masked.
    pub fn msix_enabled(&self) -> bool {
        self.bytes[MSIX_CAP + 3] & 0xc0 == 0x80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_class_bar_and_msix_cap() {
        let c = ConfigSpace::new();
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
        let mut c = ConfigSpace::new();
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

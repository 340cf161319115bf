//! The PCI configuration space of a stand-in function: a type 0 header with one 64-bit memory
//! BAR (BAR0) and an MSI-X capability whose table and PBA live in BAR0. The client may write
//! the command register, BAR0 (sizing and address) and the MSI-X control bits; everything else
//! is read-only.

/// Size of the configuration space region.
pub const CONFIG_SIZE: u64 = 256;

/// Who the function says it is, and where its BAR0 and MSI-X structures are.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// Revision id.
    pub revision: u8,
    /// Class code (base class, subclass, programming interface), 24 bits.
    pub class_code: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// Size of BAR0, a power of two of at least 16 bytes.
    pub bar0_size: u64,
    /// Offset of the MSI-X capability (the first capability).
    pub msix_cap: usize,
    /// MSI-X vectors (1 to 2048).
    pub msix_vectors: u16,
    /// MSI-X table offset in BAR0.
    pub msix_table: u64,
    /// MSI-X pending bit array offset in BAR0.
    pub msix_pba: u64,
}

/// The function's configuration space: registers plus which bits the client may write.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE as usize],
    bar0_size: u64,
    msix_cap: usize,
    bar_sizing: bool,
}

impl ConfigSpace {
    /// The configuration space after reset.
    pub fn new(id: &Identity) -> Self {
        let mut b = [0u8; CONFIG_SIZE as usize];
        b[0..2].copy_from_slice(&id.vendor.to_le_bytes());
        b[2..4].copy_from_slice(&id.device.to_le_bytes());
        b[6] = 0x10; // status: capability list
        b[8] = id.revision;
        b[9..12].copy_from_slice(&id.class_code.to_le_bytes()[..3]);
        b[0x10] = 0x4; // BAR0: 64-bit memory
        b[0x2c..0x2e].copy_from_slice(&id.subsystem_vendor.to_le_bytes());
        b[0x2e..0x30].copy_from_slice(&id.subsystem.to_le_bytes());
        b[0x34] = id.msix_cap as u8;
        b[0x3d] = 1; // INTA
        let m = id.msix_cap;
        b[m] = 0x11; // MSI-X, no next capability (see `set_bytes`)
        b[m + 2..m + 4].copy_from_slice(&(id.msix_vectors - 1).to_le_bytes());
        // BIR 0: the table and the PBA are in BAR0.
        b[m + 4..m + 8].copy_from_slice(&(id.msix_table as u32).to_le_bytes());
        b[m + 8..m + 12].copy_from_slice(&(id.msix_pba as u32).to_le_bytes());
        ConfigSpace {
            bytes: b,
            bar0_size: id.bar0_size,
            msix_cap: id.msix_cap,
            bar_sizing: false,
        }
    }

    /// Places read-only bytes at `at` while the space is built (further capabilities, the
    /// MSI-X capability's next pointer). Bytes past the end are dropped.
    pub fn set_bytes(&mut self, at: usize, bytes: &[u8]) {
        for (i, &v) in bytes.iter().enumerate() {
            if let Some(b) = at.checked_add(i).and_then(|o| self.bytes.get_mut(o)) {
                *b = v;
            }
        }
    }

    /// Reads `data.len()` bytes at `offset`; bytes outside the space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let sizing = (!(self.bar0_size as u32).wrapping_sub(1) | 0x4).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *d = if (0x10..0x14).contains(&o) && self.bar_sizing {
                sizing[(o - 0x10) as usize]
            } else {
                self.bytes.get(o as usize).copied().unwrap_or(0)
            };
        }
    }

    /// Writes the writable bits: the command register (memory space, bus master, interrupt
    /// disable), BAR0's address bits (a write of all ones to its low half starts sizing) and
    /// MSI-X enable and function mask.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0x10 && data == [0xff; 4] {
            self.bar_sizing = true;
            return;
        }
        // The address bits of a 64-bit BAR of this size.
        let bar = !(self.bar0_size.wrapping_sub(1)) & !0xf;
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64).map(|o| o as usize) else {
                return;
            };
            let mask: u8 = match o {
                4 => 0x06, // memory space, bus master
                5 => 0x04, // interrupt disable
                0x10..=0x17 => (bar >> (8 * (o - 0x10))) as u8,
                x if x == self.msix_cap + 3 => 0xc0, // MSI-X enable, function mask
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
        self.bytes[self.msix_cap + 3] & 0xc0 == 0x80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Identity = Identity {
        vendor: 0x1b36,
        device: 0x0010,
        revision: 2,
        class_code: 0x01_08_02,
        subsystem_vendor: 0x1b36,
        subsystem: 0x0010,
        bar0_size: 0x4_0000,
        msix_cap: 0x40,
        msix_vectors: 32,
        msix_table: 0x3_0000,
        msix_pba: 0x3_8000,
    };

    #[test]
    fn identity_class_bar_and_msix_cap() {
        let c = ConfigSpace::new(&ID);
        let mut b = [0u8; 4];
        c.read(0, &mut b);
        assert_eq!(b, [0x36, 0x1b, 0x10, 0x00]);
        c.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b) >> 8, ID.class_code);
        assert_eq!(b[0], 2);
        c.read(0x34, &mut b);
        assert_eq!(b[0] as usize, ID.msix_cap);
        c.read(ID.msix_cap as u64, &mut b);
        assert_eq!(b[0], 0x11);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), ID.msix_vectors - 1);
        c.read(ID.msix_cap as u64 + 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x3_0000, "table in BAR0");
        c.read(0x1000, &mut b);
        assert_eq!(b, [0; 4], "outside reads as zero");
    }

    #[test]
    fn writes_are_masked_and_bar_sizing_works() {
        for size in [0x8000u64, 0x4_0000] {
            let mut c = ConfigSpace::new(&Identity {
                bar0_size: size,
                ..ID
            });
            c.write(0, &[0xff, 0xff]);
            let mut b = [0u8; 4];
            c.read(0, &mut b);
            assert_eq!(u16::from_le_bytes([b[0], b[1]]), ID.vendor);
            c.write(0x10, &[0xff; 4]);
            c.read(0x10, &mut b);
            assert_eq!(u32::from_le_bytes(b), !(size as u32 - 1) | 4);
            // Only the address bits of a BAR of this size take a write.
            c.write(0x10, &0xe000_7ff0u32.to_le_bytes());
            c.read(0x10, &mut b);
            assert_eq!(u32::from_le_bytes(b), 0xe000_0004);
            c.write(0x14, &0x1234_5678u32.to_le_bytes());
            c.read(0x14, &mut b);
            assert_eq!(u32::from_le_bytes(b), 0x1234_5678, "BAR0 high half");
            assert!(!c.msix_enabled());
            c.write(ID.msix_cap as u64 + 2, &[0, 0x80]);
            assert!(c.msix_enabled());
            c.write(ID.msix_cap as u64 + 2, &[0, 0xc0]);
            assert!(!c.msix_enabled(), "function masked");
        }
    }

    #[test]
    fn set_bytes_extends_the_space_and_drops_what_does_not_fit() {
        let mut c = ConfigSpace::new(&ID);
        c.set_bytes(ID.msix_cap + 1, &[0x50]);
        c.set_bytes(0xfe, &[1, 2, 3]);
        let mut b = [0u8; 2];
        c.read(ID.msix_cap as u64, &mut b);
        assert_eq!(b, [0x11, 0x50]);
        c.read(0xfe, &mut b);
        assert_eq!(b, [1, 2]);
        // Read-only once built.
        c.write(0xfe, &[9, 9]);
        c.read(0xfe, &mut b);
        assert_eq!(b, [1, 2]);
    }
}

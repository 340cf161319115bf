//! The guest-visible PCI function of a passthrough device: BARs are the VMM's (placed in the
//! PCI window, sized from the device's region), the ROM is hidden, everything else is the
//! device's own configuration space, forwarded.
use std::sync::Arc;

use vmm::pci::{BarKind, PciConfiguration, PciDevice, PciHeader};

use crate::client::{Connection, CONFIG_REGION};

/// Configuration dwords of the BARs (0x10..0x28).
const BAR_REGS: std::ops::RangeInclusive<usize> = 4..=9;
/// Expansion ROM dword.
const ROM_REG: usize = 12;

/// A passthrough PCI function.
pub struct PassthroughPci {
    conn: Arc<Connection>,
    bars: PciConfiguration,
}

impl PassthroughPci {
    /// BAR0 (64-bit memory) at `bar0` with `size` bytes.
    pub fn new(conn: Arc<Connection>, bar0: u64, size: u64) -> Self {
        let mut bars = PciConfiguration::new(PciHeader {
            vendor_id: 0,
            device_id: 0,
            class_code: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        bars.add_bar(0, bar0, size, BarKind::Mem64);
        PassthroughPci { conn, bars }
    }
}

impl PciDevice for PassthroughPci {
    fn config_read(&mut self, reg: usize) -> u32 {
        if BAR_REGS.contains(&reg) {
            return self.bars.read(reg);
        }
        if reg == ROM_REG {
            return 0;
        }
        let mut b = [0u8; 4];
        match self.conn.region_read(CONFIG_REGION, reg as u64 * 4, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                tracing::warn!(error = %e, reg, "config read from a lost device");
                u32::MAX
            }
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if BAR_REGS.contains(&reg) {
            self.bars.write(reg, offset, data);
            return;
        }
        if reg == ROM_REG || offset + data.len() > 4 {
            return;
        }
        if let Err(e) = self
            .conn
            .region_write(CONFIG_REGION, reg as u64 * 4 + offset as u64, data)
        {
            tracing::warn!(error = %e, reg, "config write to a lost device");
        }
    }
}

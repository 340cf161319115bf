//! The guest-visible PCI function of a passthrough device: BARs are the VMM's (placed in the
//! PCI window, sized from the device's region), the ROM is hidden, everything else is the
//! device's own configuration space, forwarded.
use std::sync::{Arc, Mutex};

use vmm::pci::{BarKind, PciConfiguration, PciDevice, PciHeader};

use crate::{
    client::{Connection, CONFIG_REGION},
    msix::MsixRouter,
};

/// Configuration dwords of the BARs (0x10..0x28).
const BAR_REGS: std::ops::RangeInclusive<usize> = 4..=9;
/// Expansion ROM dword.
const ROM_REG: usize = 12;

/// A passthrough PCI function.
pub struct PassthroughPci {
    conn: Arc<Connection>,
    bars: PciConfiguration,
    msix: Arc<Mutex<MsixRouter>>,
    /// Offset of the MSI-X capability, and its message control as the guest last wrote it.
    msix_cap: Option<usize>,
    msix_control: u16,
}

impl PassthroughPci {
    /// BAR0 (64-bit memory) at `bar0` with `size` bytes; MSI-X capability at `msix_cap`.
    pub fn new(
        conn: Arc<Connection>,
        bar0: u64,
        size: u64,
        msix: Arc<Mutex<MsixRouter>>,
        msix_cap: Option<usize>,
    ) -> Self {
        let mut bars = PciConfiguration::new(PciHeader {
            vendor_id: 0,
            device_id: 0,
            class_code: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        bars.add_bar(0, bar0, size, BarKind::Mem64);
        PassthroughPci {
            conn,
            bars,
            msix,
            msix_cap,
            msix_control: 0,
        }
    }

    /// Migration destination: the message control the guest had programmed on the source.
    pub fn set_msix_control(&mut self, control: u16) {
        self.msix_control = control;
    }

    fn track_msix_control(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let Some(cap) = self.msix_cap else { return };
        if reg != cap / 4 {
            return;
        }
        let mut bytes = self.msix_control.to_le_bytes();
        let mut touched = false;
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            if (2..4).contains(&o) {
                bytes[o - 2] = b;
                touched = true;
            }
        }
        if touched {
            self.msix_control = u16::from_le_bytes(bytes);
            let enabled = self.msix_control & 0x8000 != 0;
            let masked = self.msix_control & 0x4000 != 0;
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .control_write(enabled, masked);
        }
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
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    reg,
                    "config read from a lost device"
                );
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
        self.track_msix_control(reg, offset, data);
        if let Err(e) = self
            .conn
            .region_write(CONFIG_REGION, reg as u64 * 4 + offset as u64, data)
        {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                reg,
                "config write to a lost device"
            );
        }
    }
}

/// Finds the MSI-X capability: (its offset, BAR0 offset of the table) when the table is in
/// BAR0. The walk is bounded (a device could present a looping list).
pub fn find_msix(conn: &Connection) -> Option<(usize, Option<u64>)> {
    let read = |off: u64| -> Option<u32> {
        let mut b = [0u8; 4];
        conn.region_read(CONFIG_REGION, off, &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    };
    let mut ptr = (read(0x34)? & 0xfc) as usize;
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let head = read(ptr as u64)?;
        if head & 0xff == 0x11 {
            let table = read(ptr as u64 + 4)?;
            let in_bar0 = table & 7 == 0;
            return Some((ptr, in_bar0.then_some((table & !7) as u64)));
        }
        ptr = ((head >> 8) & 0xfc) as usize;
    }
    None
}

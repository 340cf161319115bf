//! Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC.
use std::sync::{Arc, Mutex};

use super::PciBus;
use crate::bus::BusDevice;

/// The port device covering 0xCF8..0xD00.
pub struct PciConfigIo {
    address: u32,
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigIo {
    /// A config-space window onto `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo { address: 0, bus }
    }

    /// (bus, device, function, register) selected by the address register, if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let dev = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, dev, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => self.address >> (offset * 8),
            4..=7 => match self.target() {
                Some((b, d, f, r)) => {
                    let v = self
                        .bus
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .config_read(b, d, f, r);
                    v >> ((offset - 4) * 8)
                }
                None => 0xffff_ffff,
            },
            _ => 0xffff_ffff,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            4..=7 => {
                let within = (offset - 4) as usize;
                if within + data.len() > 4 {
                    return;
                }
                if let Some((b, d, f, r)) = self.target() {
                    self.bus
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .config_write(b, d, f, r, within, data);
                }
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "ignored PCI config address access"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::HostBridge;

    fn select(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | dev << 11 | reg << 2).to_le_bytes());
    }

    #[test]
    fn enumerates_the_host_bridge_and_absent_slots_read_ones() {
        let bus = Arc::new(Mutex::new(PciBus::default()));
        bus.lock()
            .unwrap()
            .add(0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let mut io = PciConfigIo::new(bus);
        select(&mut io, 0, 0);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        select(&mut io, 5, 0);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // disabled address register: all ones
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // the address register reads back
        select(&mut io, 3, 2);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000 | 3 << 11 | 2 << 2);
    }
}

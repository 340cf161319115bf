//! PCI bus 0: slots and configuration dispatch.
use std::sync::{Arc, Mutex};

use super::PciDevice;
use crate::{Error, Result};

/// Number of device slots on a bus.
pub const SLOTS: usize = 32;

/// A device slot number (0..32).
pub type PciSlot = u8;

/// Bus 0 and the devices on it (function 0 of each slot).
#[derive(Default)]
pub struct PciBus {
    slots: [Option<Arc<Mutex<dyn PciDevice>>>; SLOTS],
}

impl PciBus {
    /// Puts `device` into the first free slot at or after `from`.
    pub fn add(&mut self, from: PciSlot, device: Arc<Mutex<dyn PciDevice>>) -> Result<PciSlot> {
        let slot = (from as usize..SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(Error::PciSlot(from))?;
        self.slots[slot] = Some(device);
        Ok(slot as PciSlot)
    }

    /// Removes the device in `slot`.
    pub fn remove(&mut self, slot: PciSlot) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get_mut(slot as usize)?.take()
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    /// Reads a configuration dword; absent functions read as all ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        match self.device(bus, dev, func) {
            Some(d) => d.lock().unwrap_or_else(|e| e.into_inner()).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes configuration space; writes to absent functions are dropped.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, dev, func) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(reg, offset, data);
        }
    }
}

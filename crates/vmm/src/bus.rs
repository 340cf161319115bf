//! Port-IO and MMIO buses: devices register an address range; accesses nobody claims are
//! answered like real hardware does (reads of all ones, writes dropped) and counted.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use crate::{memory::GuestRam, Error, Result};

/// A device on a bus. `offset` is relative to the start of the range it registered.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Accesses nobody claimed, logged at `warn` this many times, then at `debug`.
const LOUD_UNHANDLED: u64 = 8;

/// An address space with devices in it.
pub struct Bus {
    name: &'static str,
    devices: RwLock<BTreeMap<u64, Entry>>,
    unhandled: AtomicU64,
    /// Guest RAM: an exit for a RAM address nobody claims is served from RAM (see
    /// [`Bus::set_ram_fallback`]).
    ram: std::sync::OnceLock<GuestRam>,
    ram_fallbacks: AtomicU64,
}

impl Bus {
    /// An empty bus; `name` ("pio", "mmio") appears in logs and errors.
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            devices: RwLock::new(BTreeMap::new()),
            unhandled: AtomicU64::new(0),
            ram: std::sync::OnceLock::new(),
            ram_fallbacks: AtomicU64::new(0),
        }
    }

    /// Serves unclaimed accesses to guest RAM addresses from `ram`. Such an exit happens only
    /// while a RAM range's memory slot is being replaced (a vCPU touched it between the slot's
    /// removal and its replacement, and its exit is handled after the handler that stood in
    /// for the range has gone): the access belongs to RAM.
    pub fn set_ram_fallback(&self, ram: GuestRam) {
        let _ = self.ram.set(ram);
    }

    /// Accesses served by the RAM fallback so far.
    pub fn ram_fallback_count(&self) -> u64 {
        self.ram_fallbacks.load(Ordering::Relaxed)
    }

    fn ram_fallback(&self, addr: u64, len: usize) -> Option<&GuestRam> {
        let ram = self.ram.get().filter(|r| r.contains(addr, len as u64))?;
        self.ram_fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            bus = self.name,
            addr = format_args!("{addr:#x}"),
            len,
            "exit for a RAM address served from RAM"
        );
        Some(ram)
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BusOverlap {
                bus: self.name,
                base,
                end: base.wrapping_add(len),
                other: base,
            })?;
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&b, e)) = devices.range(..end).next_back() {
            if b + e.len > base {
                return Err(Error::BusOverlap {
                    bus: self.name,
                    base,
                    end,
                    other: b,
                });
            }
        }
        devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device registered at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&base)
            .is_some()
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = devices.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= base + e.len).then(|| (addr - base, e.device.clone()))
    }

    fn note_unhandled(&self, kind: &str, addr: u64, len: usize) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < LOUD_UNHANDLED {
            tracing::warn!(
                bus = self.name,
                addr = format_args!("{addr:#x}"),
                len,
                "unhandled {kind}"
            );
        } else {
            tracing::debug!(
                bus = self.name,
                addr = format_args!("{addr:#x}"),
                len,
                "unhandled {kind}"
            );
        }
    }

    /// Dispatches a read. Returns false (and fills `data` with ones) if nobody claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                if let Some(ram) = self.ram_fallback(addr, data.len()) {
                    if ram.read(addr, data).is_ok() {
                        return true;
                    }
                }
                data.fill(0xff);
                self.note_unhandled("read", addr, data.len());
                false
            }
        }
    }

    /// Dispatches a write. Returns false (dropping it) if nobody claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => {
                if let Some(ram) = self.ram_fallback(addr, data.len()) {
                    if ram.write(addr, data).is_ok() {
                        return true;
                    }
                }
                self.note_unhandled("write", addr, data.len());
                false
            }
        }
    }

    /// Number of accesses nobody claimed so far.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_and_unknown_reads_all_ones() {
        let bus = Bus::new("pio");
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xe, vec![1, 2])]);
        // straddling the end of the range is not claimed
        assert!(!bus.read(0x10f, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x200, &[0]));
        assert_eq!(bus.unhandled_count(), 2);
    }

    #[test]
    fn unclaimed_ram_addresses_are_served_from_ram() {
        let bus = Bus::new("mmio");
        let ram = GuestRam::new(32 << 20).unwrap();
        bus.set_ram_fallback(ram.clone());
        assert!(bus.write(0x5000, &[7, 8, 9, 10]));
        let mut b = [0u8; 4];
        ram.read(0x5000, &mut b).unwrap();
        assert_eq!(b, [7, 8, 9, 10]);
        let mut r = [0u8; 4];
        assert!(bus.read(0x5000, &mut r));
        assert_eq!(r, b);
        assert_eq!((bus.ram_fallback_count(), bus.unhandled_count()), (2, 0));
        // A device still claims its range first; beyond RAM stays unclaimed.
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x5000, 0x10, dev).unwrap();
        assert!(bus.read(0x5004, &mut r));
        assert_eq!(r, [4; 4]);
        assert!(!bus.read(1 << 40, &mut r));
        assert_eq!(bus.unhandled_count(), 1);
    }

    #[test]
    fn overlaps_are_refused() {
        let bus = Bus::new("mmio");
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x1000, 0x1000, dev.clone()).unwrap();
        assert!(bus.insert(0x1800, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x800, 0x801, dev.clone()).is_err());
        assert!(bus.insert(0x800, 0x800, dev.clone()).is_ok());
        assert!(bus.insert(0x2000, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.remove(0x1000));
        assert!(bus.insert(0x1800, 0x10, dev).is_ok());
    }
}

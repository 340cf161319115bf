//! Moving guest-physical ranges of RAM onto hypervisor memory in the guest's view (KVM memory
//! slots), shared by every passthrough class: the slots of the RAM region holding a range are
//! rebuilt as RAM pieces around the remapped ranges.
use std::collections::BTreeMap;

use vmm::{
    memory::{GuestRam, RamRegion},
    memslots::{MemorySlots, SlotKind},
};

use crate::{Error, HookError, Result};

/// Page size of the remaps.
const PAGE: u64 = 4096;

/// The remapped ranges of one VM: guest-physical start → (size, host address).
#[derive(Debug, Default)]
pub struct GuestRemaps {
    map: BTreeMap<u64, (u64, u64)>,
}

impl GuestRemaps {
    /// The RAM region holding `[gpa, gpa + size)`.
    pub fn ram_region(ram: &GuestRam, gpa: u64, size: u64) -> Option<RamRegion> {
        let end = gpa.checked_add(size)?;
        ram.regions()
            .iter()
            .copied()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }

    /// Records the change (a host address, or `None` for RAM again) and rebuilds the slots of
    /// the RAM region; `name` is the device's, for errors.
    ///
    /// # Safety
    /// A host address must stay mapped and writable until the range is remapped back to RAM
    /// or the VM is gone. Callers pause the vCPUs around it.
    pub unsafe fn remap(
        &mut self,
        slots: &MemorySlots,
        ram: &GuestRam,
        name: &str,
        gpa: u64,
        size: u64,
        host: Option<u64>,
    ) -> Result<()> {
        let hook_err = |source| Error::Hook {
            name: name.into(),
            source,
        };
        if size == 0 || !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return Err(hook_err(HookError::NotPageAligned { gpa, size }));
        }
        let region = Self::ram_region(ram, gpa, size)
            .ok_or_else(|| hook_err(HookError::NotInRam { gpa, size }))?;
        match host {
            Some(host) => {
                if host % PAGE != 0 {
                    return Err(hook_err(HookError::HostNotAligned(host)));
                }
                if self
                    .map
                    .iter()
                    .any(|(&g, &(s, _))| gpa < g + s && g < gpa + size)
                {
                    return Err(hook_err(HookError::OverlapsRemap { gpa, size }));
                }
                self.map.insert(gpa, (size, host));
            }
            None => {
                if self.map.remove(&gpa).is_none() {
                    return Err(hook_err(HookError::NoRemap(gpa)));
                }
            }
        }
        let vmm_err = |what: String| {
            move |source| Error::Vmm {
                name: name.into(),
                what,
                source,
            }
        };
        // Rebuild the slots of the whole RAM region: RAM pieces around the remapped ranges.
        let rend = region.gpa + region.size;
        for (slot, info) in slots.list() {
            if info.gpa >= region.gpa && info.gpa < rend {
                slots
                    .remove(slot)
                    .map_err(vmm_err(format!("removing memory slot {slot}")))?;
            }
        }
        let ram_host = ram
            .host_address(&region)
            .map_err(vmm_err("locating guest RAM".into()))? as u64;
        let mut pieces = Vec::new();
        let mut at = region.gpa;
        for (&g, &(s, h)) in self.map.range(region.gpa..rend) {
            if g > at {
                pieces.push((at, g - at, ram_host + (at - region.gpa), SlotKind::Ram));
            }
            pieces.push((g, s, h, SlotKind::Device));
            at = g + s;
        }
        if at < rend {
            pieces.push((at, rend - at, ram_host + (at - region.gpa), SlotKind::Ram));
        }
        for (g, s, h, kind) in pieces {
            // SAFETY: RAM pieces are inside the VM's RAM mapping; remapped pieces are covered by
            // this function's safety contract.
            unsafe { slots.add(g, s, h, kind, false) }
                .map_err(vmm_err(format!("adding memory slot {g:#x}+{s:#x}")))?;
        }
        Ok(())
    }

    /// The remapped ranges (start, size, host address).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.map.iter().map(|(&g, &(s, h))| (g, s, h))
    }

    /// The remap starting at `gpa`: (size, host address).
    pub fn get(&self, gpa: u64) -> Option<(u64, u64)> {
        self.map.get(&gpa).copied()
    }

    /// Forgets the remap at `gpa` without touching the slots (the caller re-backed it).
    pub fn forget(&mut self, gpa: u64) {
        self.map.remove(&gpa);
    }
}

//! KVM memory slots: guest RAM, and device memory mapped straight into the guest (passthrough
//! BAR pages, so that doorbell writes do not exit).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// What a slot maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Guest RAM (dirty-logged during migration).
    Ram,
    /// Memory of a device (BAR pages).
    Device,
}

/// One KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host: u64,
    /// What it maps.
    pub kind: SlotKind,
    /// Guest writes exit as MMIO instead of reaching the memory.
    pub read_only: bool,
}

#[derive(Default)]
struct Inner {
    slots: BTreeMap<u32, SlotInfo>,
    dirty_logging: bool,
}

/// Pages of one slot that KVM saw the guest write.
#[derive(Clone, Debug)]
pub struct DirtyLog {
    /// The slot.
    pub info: SlotInfo,
    /// One bit per 4 KiB page of the slot, lowest page in bit 0 of word 0.
    pub bitmap: Vec<u64>,
}

impl DirtyLog {
    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(w, &bits)| {
            let base = self.info.gpa + (w as u64) * 64 * 4096;
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| base + b * 4096)
        })
    }
}

/// The VM's memory slots.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    max_slots: u32,
    inner: Mutex<Inner>,
}

impl MemorySlots {
    /// No slots yet; `max_slots` is KVM's limit.
    pub fn new(vm: Arc<VmFd>, max_slots: usize) -> Self {
        MemorySlots {
            vm,
            max_slots: max_slots.min(u32::MAX as usize) as u32,
            inner: Mutex::default(),
        }
    }

    fn set(&self, slot: u32, info: &SlotInfo, size: u64, log_dirty: bool) -> Result<()> {
        let mut flags = if info.read_only { KVM_MEM_READONLY } else { 0 };
        if log_dirty && info.kind == SlotKind::Ram {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: info.gpa,
            memory_size: size,
            userspace_addr: info.host,
        };
        // SAFETY: the caller of `add` guaranteed that `host..host+size` stays mapped while the
        // slot exists; a size of zero deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(Error::kvm("set memory region"))
    }

    /// Maps `size` bytes at host address `host` into the guest at `gpa`; returns the slot.
    ///
    /// # Safety
    /// `host..host + size` must stay a valid mapping until the slot is removed (or the VM is
    /// gone), and the guest may read and write it at any time.
    pub unsafe fn add(
        &self,
        gpa: u64,
        size: u64,
        host: u64,
        kind: SlotKind,
        read_only: bool,
    ) -> Result<u32> {
        let bad = |reason: &'static str| Error::MemorySize { size, reason };
        let aligned = |v: u64| v.is_multiple_of(4096);
        if size == 0 || !aligned(size) || !aligned(gpa) || !aligned(host) {
            return Err(bad("memory slots need page-aligned, non-empty ranges"));
        }
        let end = gpa
            .checked_add(size)
            .ok_or(bad("memory slot wraps the address space"))?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, other)) = inner
            .slots
            .iter()
            .find(|(_, s)| gpa < s.gpa + s.size && s.gpa < end)
        {
            return Err(Error::BusOverlap {
                bus: "memory slot",
                base: gpa,
                end,
                other: other.gpa,
            });
        }
        let slot = (0..self.max_slots)
            .find(|s| !inner.slots.contains_key(s))
            .ok_or(bad("no free KVM memory slot"))?;
        let info = SlotInfo {
            gpa,
            size,
            host,
            kind,
            read_only,
        };
        self.set(slot, &info, size, inner.dirty_logging)?;
        inner.slots.insert(slot, info);
        Ok(slot)
    }

    /// Removes a slot; the guest range becomes unbacked (accesses exit as MMIO).
    pub fn remove(&self, slot: u32) -> Result<SlotInfo> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let info = *inner
            .slots
            .get(&slot)
            .ok_or(Error::StateMismatch(format!("no memory slot {slot}")))?;
        self.set(slot, &info, 0, false)?;
        inner.slots.remove(&slot);
        Ok(info)
    }

    /// Turns KVM dirty logging of the RAM slots on or off. Turning it on starts with a clean
    /// log.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (&slot, info) in inner.slots.iter().filter(|(_, i)| i.kind == SlotKind::Ram) {
            self.set(slot, info, info.size, on)?;
        }
        inner.dirty_logging = on;
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dirty_logging
    }

    /// Fetches and clears the dirty log of every RAM slot.
    pub fn take_dirty_logs(&self) -> Result<Vec<DirtyLog>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.dirty_logging {
            return Err(Error::StateMismatch("dirty logging is off".into()));
        }
        let mut logs = Vec::new();
        for (&slot, info) in inner.slots.iter().filter(|(_, i)| i.kind == SlotKind::Ram) {
            let bitmap = self
                .vm
                .get_dirty_log(slot, info.size as usize)
                .map_err(Error::kvm("get dirty log"))?;
            logs.push(DirtyLog {
                info: *info,
                bitmap,
            });
        }
        Ok(logs)
    }

    /// All slots.
    pub fn list(&self) -> Vec<(u32, SlotInfo)> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .slots
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

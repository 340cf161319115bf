//! Hypervisor memory of the engine (ring copies, redirected doorbell pages) and the
//! [`Buffers`] view the adapters work on.
use std::{
    ops::Range,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use vmm::memory::GuestRam;

use crate::{Buffers, Error, Result};

/// Page size of the copies and of the memory-slot swaps.
pub const PAGE: u64 = 4096;

/// Page-aligned hypervisor memory in a memfd (so a device can be given it by DMA mapping),
/// unmapped on drop.
pub struct HostPages {
    host: *mut u8,
    len: usize,
    fd: Arc<OwnedFd>,
}

// SAFETY: the mapping is owned by this value; concurrent access is by raw copies of plain
// bytes (the guest and the poller share ring memory exactly as a guest and a device do).
unsafe impl Send for HostPages {}
// SAFETY: as above.
unsafe impl Sync for HostPages {}

impl HostPages {
    /// `len` bytes (a multiple of the page size), zeroed.
    pub fn new(len: u64) -> Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(Error::Engine(format!(
                "host copy of {len} bytes is not whole pages"
            )));
        }
        let os = |what: &str| Error::Os {
            what: format!("{what} for {len} bytes of host memory"),
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: a plain syscall with a NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"ferry-shadow".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a plain syscall on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(os("ftruncate"));
        }
        // SAFETY: a fresh shared mapping of our memfd; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        Ok(HostPages {
            host: p.cast(),
            len: len as usize,
            fd: Arc::new(fd),
        })
    }

    /// The memfd behind the pages (offset 0 is the first byte).
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.host as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are never empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` host bytes into the pages at `offset`.
    ///
    /// # Safety
    /// `src..src + len` must be readable host memory.
    pub unsafe fn fill_from(&self, offset: usize, src: *const u8, len: usize) -> bool {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: destination checked above; source is the caller's promise.
        unsafe { std::ptr::copy(src, self.host.add(offset), len) };
        true
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        if offset.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: inside the mapping (checked); the guest or the device may write it
        // concurrently, and an index is read with one load of its width.
        unsafe { vfio_user_device::shared::read(self.host.add(offset), buf) };
        true
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset.checked_add(data.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: inside the mapping (checked); an index is stored with one store of its
        // width (the other side reads it concurrently).
        unsafe { vfio_user_device::shared::write(self.host.add(offset), data) };
        true
    }

    /// Volatile load of the u32 at `offset` (a doorbell the guest writes).
    pub fn load_u32(&self, offset: usize) -> Option<u32> {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return None;
        }
        // SAFETY: aligned and inside the mapping.
        Some(unsafe { std::ptr::read_volatile(self.host.add(offset).cast::<u32>()) })
    }

    /// Volatile store of a u32 at `offset`.
    pub fn store_u32(&self, offset: usize, v: u32) -> bool {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return false;
        }
        // SAFETY: aligned and inside the mapping.
        unsafe { std::ptr::write_volatile(self.host.add(offset).cast::<u32>(), v) };
        true
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this address and length.
        unsafe { libc::munmap(self.host.cast(), self.len) };
    }
}

/// A ring copy: hypervisor pages standing for the guest-physical range `gpa`.
pub struct Copy {
    /// Guest-physical pages covered.
    pub gpa: Range<u64>,
    /// The copy.
    pub pages: HostPages,
}

/// Which copy is which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Designation {
    /// The copy is the vCPU buffer: the guest's memory slots over the ring pages are swapped
    /// onto it; the device keeps DMAing guest RAM.
    #[default]
    VcpuBuffer,
    /// The copy is the device buffer: the device's DMA (IOMMU) mapping of the ring pages is
    /// moved onto it; the guest keeps its RAM.
    DeviceBuffer,
}

/// Hypervisor memory the device reads validated PRP lists from: one area per queue, `slots`
/// slots of `per_slot` pages, DMA-mapped at `iova` (outside guest RAM).
pub struct Bounce {
    /// Queue id.
    pub qid: u16,
    /// The area.
    pub pages: HostPages,
    /// Where the device reaches it.
    pub iova: u64,
    /// Pages per slot (enough for the longest list the validator lets through).
    pub per_slot: usize,
}

/// The adapters' view: for ring ranges, the copy on the designated side and guest RAM on the
/// other; guest RAM for everything else (data buffers); bounce areas for PRP lists.
#[derive(Clone)]
pub struct EngineBuffers {
    ram: GuestRam,
    copies: Arc<Vec<Copy>>,
    designation: Designation,
    bounce: Arc<Vec<Bounce>>,
    protected: Option<Arc<passthrough::admin_guard::Protected>>,
}

impl EngineBuffers {
    /// Buffers over `ram` with the ring copies `copies` standing for the `designation` side.
    pub fn new(ram: GuestRam, copies: Arc<Vec<Copy>>, designation: Designation) -> Self {
        EngineBuffers {
            ram,
            copies,
            designation,
            bounce: Arc::new(Vec::new()),
            protected: None,
        }
    }

    /// The same view, refusing data addresses in the attachment's protected ranges too (the
    /// guarded admin SQ).
    pub fn with_protected(mut self, p: Arc<passthrough::admin_guard::Protected>) -> Self {
        self.protected = Some(p);
        self
    }

    /// The same view, with bounce areas for PRP lists.
    pub fn with_bounce(mut self, bounce: Arc<Vec<Bounce>>) -> Self {
        self.bounce = bounce;
        self
    }

    /// Guest RAM, whichever side it is.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn ram_read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.ram.contains(gpa, buf.len() as u64) && self.ram.read(gpa, buf).is_ok()
    }

    fn ram_write(&self, gpa: u64, data: &[u8]) -> bool {
        if self.copy_of(gpa, data.len()).is_some() {
            // Ring entries (the RAM side of a shadowed ring): every ring page is reported
            // dirty when the rings are brought to rest, so the write needs no record (and
            // takes no lock).
            return self
                .ram
                .volatile_slice(gpa, data.len() as u64)
                .is_some_and(|v| {
                    if v.len() != data.len() {
                        return false;
                    }
                    let guard = v.ptr_guard_mut();
                    // SAFETY: the slice covers `data.len()` bytes of mapped guest RAM, alive
                    // while `guard` is; the guest reads it concurrently, so an index is one
                    // store of its width.
                    unsafe { vfio_user_device::shared::write(guard.as_ptr(), data) };
                    true
                });
        }
        self.ram.contains(gpa, data.len() as u64) && self.ram.write(gpa, data).is_ok()
    }

    /// The designated side: the copy for ring ranges, RAM elsewhere.
    fn copy_read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.copy_of(gpa, buf.len()) {
            Some((c, off)) => c.pages.read(off, buf),
            None if self.overlaps_copy(gpa, buf.len()) => false,
            None => self.ram_read(gpa, buf),
        }
    }

    fn copy_write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.copy_of(gpa, data.len()) {
            Some((c, off)) => c.pages.write(off, data),
            None if self.overlaps_copy(gpa, data.len()) => false,
            None => self.ram_write(gpa, data),
        }
    }

    fn copy_of(&self, gpa: u64, len: usize) -> Option<(&Copy, usize)> {
        let end = gpa.checked_add(len as u64)?;
        self.copies
            .iter()
            .find(|c| gpa >= c.gpa.start && end <= c.gpa.end)
            .map(|c| (c, (gpa - c.gpa.start) as usize))
    }

    fn overlaps_copy(&self, gpa: u64, len: usize) -> bool {
        let end = gpa.saturating_add(len as u64);
        self.copies
            .iter()
            .any(|c| gpa < c.gpa.end && c.gpa.start < end)
    }
}

impl Buffers for EngineBuffers {
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.designation {
            Designation::VcpuBuffer => self.copy_read(gpa, buf),
            Designation::DeviceBuffer => self.ram_read(gpa, buf),
        }
    }
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool {
        match self.designation {
            Designation::VcpuBuffer => self.copy_write(gpa, data),
            Designation::DeviceBuffer => self.ram_write(gpa, data),
        }
    }
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.designation {
            Designation::VcpuBuffer => self.ram_read(gpa, buf),
            Designation::DeviceBuffer => self.copy_read(gpa, buf),
        }
    }
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool {
        match self.designation {
            Designation::VcpuBuffer => self.ram_write(gpa, data),
            Designation::DeviceBuffer => self.copy_write(gpa, data),
        }
    }
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        self.ram.contains(gpa, len)
    }
    fn data_in_ram(&self, gpa: u64, len: u64) -> bool {
        let end = gpa.saturating_add(len);
        self.ram.contains(gpa, len)
            && !self
                .copies
                .iter()
                .any(|c| gpa < c.gpa.end && c.gpa.start < end)
            && !self
                .protected
                .as_ref()
                .is_some_and(|p| p.overlaps(gpa, len))
    }
    fn bounce_prp_list(&self, qid: u16, slot: usize, entries: &[u64]) -> Option<u64> {
        let b = self.bounce.iter().find(|b| b.qid == qid)?;
        let offset = slot.checked_mul(b.per_slot)?.checked_mul(PAGE as usize)?;
        if offset + b.per_slot * PAGE as usize > b.pages.len() {
            return None;
        }
        let iova = b.iova + offset as u64;
        let bytes = crate::nvme::bounce::build(entries, iova, b.per_slot)?;
        b.pages.write(offset, &bytes).then_some(iova)
    }
}

/// Hypervisor copies of the pages holding the rings of `geos` (merged into page regions),
/// filled from guest RAM.
///
/// Callers pause the vCPUs first (or run before the VM starts). A device may still write its
/// completion queues meanwhile; the adapters reconcile those entries by phase afterwards.
pub fn copy_rings(ram: &GuestRam, geos: &[crate::nvme::QueueGeometry]) -> Result<Vec<Copy>> {
    copy_regions(ram, &ring_regions(geos))
}

/// Hypervisor copies of the page ranges `regions`, filled from guest RAM (any ring class:
/// [`page_regions`] of the adapters' `ring_ranges`).
pub fn copy_regions(ram: &GuestRam, regions: &[Range<u64>]) -> Result<Vec<Copy>> {
    let mut copies = Vec::new();
    for r in regions {
        let pages = HostPages::new(r.end - r.start)?;
        // A racy snapshot is what the caller wants (see above), copied out of guest RAM with
        // volatile accesses.
        let mut src = vec![0u8; (r.end - r.start) as usize];
        let whole = ram
            .volatile_slice(r.start, r.end - r.start)
            .map(|v| v.copy_to(&mut src[..]) == src.len());
        if whole != Some(true) {
            return Err(Error::Engine(format!(
                "ring pages {r:?} are not inside one RAM region"
            )));
        }
        // SAFETY: `src` is a buffer of the same length as the copy.
        unsafe { pages.fill_from(0, src.as_ptr(), src.len()) };
        copies.push(Copy {
            gpa: r.clone(),
            pages,
        });
    }
    Ok(copies)
}

/// Zeroed hypervisor pages for the rings of `geos` (merged into page regions): a fresh
/// device's rings on a migration destination, where guest RAM holds the guest's.
pub fn blank_rings(geos: &[crate::nvme::QueueGeometry]) -> Result<Vec<Copy>> {
    ring_regions(geos)
        .into_iter()
        .map(|r| {
            Ok(Copy {
                pages: HostPages::new(r.end - r.start)?,
                gpa: r,
            })
        })
        .collect()
}

fn ring_regions(geos: &[crate::nvme::QueueGeometry]) -> Vec<Range<u64>> {
    page_regions(geos.iter().flat_map(|g| {
        [
            g.sq_base..g.sq_base + g.sq_entries as u64 * 64,
            g.cq_base..g.cq_base + g.cq_entries as u64 * 16,
        ]
    }))
}

/// Merges the page-rounded `ranges` into disjoint, sorted page ranges.
pub fn page_regions(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .into_iter()
        .filter(|r| r.end > r.start)
        .map(|r| r.start & !(PAGE - 1)..r.end.div_ceil(PAGE) * PAGE)
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_merge_and_round_to_pages() {
        let r = page_regions([
            0x5000..0x5400,
            0x1000..0x1010,
            0x1800..0x2100,
            0x9000..0x9000,
        ]);
        assert_eq!(r, vec![0x1000..0x3000, 0x5000..0x6000]);
    }

    #[test]
    fn host_pages_bounds_are_checked() {
        let p = HostPages::new(PAGE).unwrap();
        assert!(p.write(0, &[1, 2, 3]));
        assert!(!p.write(4095, &[1, 2]));
        assert!(p.store_u32(8, 7));
        assert_eq!(p.load_u32(8), Some(7));
        assert_eq!(p.load_u32(4094), None);
        assert!(HostPages::new(100).is_err());
    }

    #[test]
    fn every_width_round_trips_aligned_and_unaligned() {
        let p = HostPages::new(PAGE).unwrap();
        for len in [1usize, 2, 3, 4, 8, 16] {
            for offset in [64usize, 65, 66, 68] {
                let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
                assert!(p.write(offset, &data));
                let mut back = vec![0u8; len];
                assert!(p.read(offset, &mut back));
                assert_eq!(back, data, "{len} bytes at {offset}");
            }
        }
    }
}

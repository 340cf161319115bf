//! Guest RAM: one memfd, mapped into the VMM with `vm-memory` and into the VM with KVM memory
//! slots. The memfd can be handed to device processes (DMA) and is what migration sends.
use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::{AsRawFd, FromRawFd},
    sync::{Arc, Mutex},
};

use guest_abi::layout::{self, HIGH_RAM_START, MAX_RAM, MIN_RAM};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{Error, Result};

/// Largest guest RAM Ferry builds.
pub const MAX_RAM_BYTES: u64 = MAX_RAM;

/// Page size used throughout Ferry.
pub const PAGE_SIZE: u64 = 4096;
/// Guest RAM sizes must be a multiple of this (the page tables use 2 MiB pages).
pub const RAM_ALIGN: u64 = 2 << 20;

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this piece in the memfd.
    pub file_offset: u64,
}

/// Pages the VMM itself wrote while tracking was on (KVM's dirty log does not see them).
#[derive(Debug, Default)]
struct VmmWrites {
    tracking: bool,
    pages: BTreeSet<u64>,
}

/// Guest RAM of a VM.
#[derive(Clone)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    memfd: Arc<File>,
    regions: Vec<RamRegion>,
    size: u64,
    vmm_writes: Arc<Mutex<VmmWrites>>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .field("regions", &self.regions)
            .finish()
    }
}

/// Checks that `size` is a RAM size Ferry can lay out.
pub fn validate_ram_size(size: u64) -> Result<()> {
    let bad = |reason| Err(Error::MemorySize { size, reason });
    if size < MIN_RAM {
        return bad("smaller than the 32 MiB minimum");
    }
    if size > MAX_RAM {
        return bad("larger than the maximum Ferry maps (61 GiB)");
    }
    if !size.is_multiple_of(RAM_ALIGN) {
        return bad("not a multiple of 2 MiB");
    }
    Ok(())
}

/// The RAM regions of a VM with `size` bytes of RAM.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let (lo, hi) = layout::split_ram(size);
    let mut regions = vec![RamRegion {
        gpa: 0,
        size: lo,
        file_offset: 0,
    }];
    if hi > 0 {
        regions.push(RamRegion {
            gpa: HIGH_RAM_START,
            size: hi,
            file_offset: lo,
        });
    }
    regions
}

/// The name of every guest RAM memfd (`/proc/PID/fd` shows it as `/memfd:` and this name).
pub const MEMFD_NAME: &std::ffi::CStr = c"ferry-guest-ram";

impl GuestRam {
    /// Creates zeroed guest RAM of `size` bytes backed by a new memfd.
    pub fn new(size: u64) -> Result<Self> {
        validate_ram_size(size)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a freshly created descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| Error::Memfd { size, source })?;
        Self::from_memfd(Arc::new(file), size)
    }

    /// Maps an existing memfd holding `size` bytes of guest RAM (for a restore on the same host).
    pub fn from_memfd(memfd: Arc<File>, size: u64) -> Result<Self> {
        validate_ram_size(size)?;
        let len = memfd
            .metadata()
            .map_err(|source| Error::Memfd { size, source })?
            .len();
        if len < size {
            return Err(Error::MemorySize {
                size,
                reason: "larger than the memfd given",
            });
        }
        let regions = ram_regions(size);
        let ranges = regions.iter().map(|r| {
            let file = memfd.try_clone().map(|f| FileOffset::new(f, r.file_offset));
            (GuestAddress(r.gpa), r.size as usize, file)
        });
        let mut with_files = Vec::new();
        for (gpa, len, file) in ranges {
            let file = file.map_err(|source| Error::Memfd { size, source })?;
            with_files.push((gpa, len, Some(file)));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(with_files)
            .map_err(|e| Error::MapGuestMemory(e.to_string()))?;
        Ok(GuestRam {
            memory,
            memfd,
            regions,
            size,
            vmm_writes: Arc::default(),
        })
    }

    /// The vm-memory view.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd backing all of guest RAM.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Raw fd of the memfd.
    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    /// RAM regions, lowest first.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of region `r`'s first byte.
    pub fn host_address(&self, r: &RamRegion) -> Result<*mut u8> {
        self.memory
            .get_host_address(GuestAddress(r.gpa))
            .map_err(|e| Error::GuestMemory {
                addr: r.gpa,
                len: 0,
                reason: e.to_string(),
            })
    }

    /// True when `[gpa, gpa+len)` lies entirely inside guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }

    /// Copies `data` into guest RAM at `gpa`. A naturally aligned 2-, 4- or 8-byte range is
    /// one store: a ring index a vCPU or a device reads concurrently is never seen torn (a
    /// byte-wise copy of 0xa4ff -> 0xa500 can be read as 0xa400 or 0xa5ff).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let addr = GuestAddress(gpa);
        let release = std::sync::atomic::Ordering::Release;
        match *data {
            [a, b] if gpa.is_multiple_of(2) => {
                self.memory.store(u16::from_ne_bytes([a, b]), addr, release)
            }
            [a, b, c, d] if gpa.is_multiple_of(4) => {
                self.memory
                    .store(u32::from_ne_bytes([a, b, c, d]), addr, release)
            }
            [a, b, c, d, e, f, g, h] if gpa.is_multiple_of(8) => {
                self.memory
                    .store(u64::from_ne_bytes([a, b, c, d, e, f, g, h]), addr, release)
            }
            _ => self.memory.write_slice(data, addr),
        }
        .map_err(|e| Error::GuestMemory {
            addr: gpa,
            len: data.len(),
            reason: e.to_string(),
        })?;
        self.note_write(gpa, data.len() as u64);
        Ok(())
    }

    /// Starts (or stops) recording the pages the VMM writes; starting clears the record.
    pub fn track_vmm_writes(&self, on: bool) {
        let mut w = self.vmm_writes.lock().unwrap_or_else(|e| e.into_inner());
        w.tracking = on;
        w.pages.clear();
    }

    /// Returns and clears the pages the VMM wrote since the last call.
    pub fn take_vmm_writes(&self) -> Vec<u64> {
        let mut w = self.vmm_writes.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut w.pages).into_iter().collect()
    }

    fn note_write(&self, gpa: u64, len: u64) {
        let mut w = self.vmm_writes.lock().unwrap_or_else(|e| e.into_inner());
        if w.tracking && len > 0 {
            let first = gpa / PAGE_SIZE;
            let last = (gpa + len - 1) / PAGE_SIZE;
            w.pages.extend((first..=last).map(|p| p * PAGE_SIZE));
        }
    }

    /// Copies guest RAM at `gpa` into `data`. A naturally aligned 2-, 4- or 8-byte range is
    /// one load (see [`GuestRam::write`]).
    pub fn read(&self, gpa: u64, data: &mut [u8]) -> Result<()> {
        let len = data.len();
        let addr = GuestAddress(gpa);
        let acquire = std::sync::atomic::Ordering::Acquire;
        match len {
            2 if gpa.is_multiple_of(2) => self
                .memory
                .load::<u16>(addr, acquire)
                .map(|v| data.copy_from_slice(&v.to_ne_bytes())),
            4 if gpa.is_multiple_of(4) => self
                .memory
                .load::<u32>(addr, acquire)
                .map(|v| data.copy_from_slice(&v.to_ne_bytes())),
            8 if gpa.is_multiple_of(8) => self
                .memory
                .load::<u64>(addr, acquire)
                .map(|v| data.copy_from_slice(&v.to_ne_bytes())),
            _ => self.memory.read_slice(data, addr),
        }
        .map_err(|e| Error::GuestMemory {
            addr: gpa,
            len,
            reason: e.to_string(),
        })
    }

    /// Atomically loads a u32 from guest RAM (mailbox fields shared with a running guest).
    pub fn load_u32(&self, gpa: u64) -> Result<u32> {
        self.memory
            .load(GuestAddress(gpa), std::sync::atomic::Ordering::SeqCst)
            .map_err(|e| Error::GuestMemory {
                addr: gpa,
                len: 4,
                reason: e.to_string(),
            })
    }

    /// Atomically loads a u64 from guest RAM.
    pub fn load_u64(&self, gpa: u64) -> Result<u64> {
        self.memory
            .load(GuestAddress(gpa), std::sync::atomic::Ordering::SeqCst)
            .map_err(|e| Error::GuestMemory {
                addr: gpa,
                len: 8,
                reason: e.to_string(),
            })
    }

    /// Atomically stores a u32 into guest RAM.
    pub fn store_u32(&self, gpa: u64, v: u32) -> Result<()> {
        self.memory
            .store(v, GuestAddress(gpa), std::sync::atomic::Ordering::SeqCst)
            .map_err(|e| Error::GuestMemory {
                addr: gpa,
                len: 4,
                reason: e.to_string(),
            })?;
        self.note_write(gpa, 4);
        Ok(())
    }

    /// A volatile view of `[gpa, gpa + len)`, if it lies in one RAM region.
    ///
    /// vCPUs and devices write guest RAM concurrently, so it is never handed out as `&[u8]`
    /// (a shared reference to memory someone else mutates is undefined behaviour): the view
    /// only copies with volatile accesses, and what it copies is a racy snapshot (migration
    /// re-sends pages written meanwhile).
    pub fn volatile_slice(&self, gpa: u64, len: u64) -> Option<vm_memory::VolatileSlice<'_, ()>> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)?;
        self.memory
            .get_slice(GuestAddress(gpa), usize::try_from(len).ok()?)
            .ok()
    }

    /// Mutable host bytes of `[gpa, gpa + len)`, if it lies in one RAM region.
    ///
    /// # Safety
    /// No vCPU or device may access the range while the slice lives (the migration destination
    /// fills RAM before the VM runs and before any device maps it).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, gpa: u64, len: u64) -> Option<&mut [u8]> {
        let end = gpa.checked_add(len)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)?;
        let host = self.host_address(r).ok()?;
        // SAFETY: the range lies inside region `r`'s live mapping; exclusivity is the caller's
        // promise.
        Some(unsafe {
            std::slice::from_raw_parts_mut(host.add((gpa - r.gpa) as usize), len as usize)
        })
    }

    /// The guest-physical ranges of RAM that may hold non-zero data: the memfd's data extents.
    /// Pages outside them were never written and read as zero — without the kernel allocating
    /// them, which reading them through the mapping would do.
    ///
    /// Resident pages are found with `mincore` on the mapping (page tables first: about a
    /// nanosecond a page, where `SEEK_HOLE` walks every page of a data extent in the page
    /// cache); only the runs `mincore` calls non-resident are searched with
    /// `SEEK_DATA`/`SEEK_HOLE`, which also finds pages swapped out (data `mincore` misses).
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |gpa: u64, len: u64| match out.last_mut() {
            Some((g, l)) if *g + *l == gpa => *l += len,
            _ => out.push((gpa, len)),
        };
        for r in &self.regions {
            let pages = (r.size / PAGE_SIZE) as usize;
            let resident = self.host_address(r).ok().and_then(|host| {
                let mut vec = vec![0u8; pages];
                // SAFETY: `host` is the start of region `r`'s live, page-aligned mapping of
                // `r.size` bytes; mincore only writes one byte per page into `vec`, which has
                // `pages` bytes.
                let rc = unsafe { libc::mincore(host.cast(), r.size as usize, vec.as_mut_ptr()) };
                (rc == 0).then_some(vec)
            });
            let Some(resident) = resident else {
                // No mapping to ask: the whole region through the file's extents.
                self.seek_extents(r, 0, r.size, &mut push);
                continue;
            };
            let mut i = 0;
            while i < pages {
                let yes = resident[i] & 1 != 0;
                let mut j = i + 1;
                while j < pages && (resident[j] & 1 != 0) == yes {
                    j += 1;
                }
                let (from, to) = (i as u64 * PAGE_SIZE, j as u64 * PAGE_SIZE);
                if yes {
                    push(r.gpa + from, to - from);
                } else {
                    self.seek_extents(r, from, to, &mut push);
                }
                i = j;
            }
        }
        out
    }

    /// The memfd's data extents (`SEEK_DATA`/`SEEK_HOLE`) inside `[from, to)` of region `r`
    /// (offsets into the region), each given to `push` as a guest-physical range.
    fn seek_extents(&self, r: &RamRegion, from: u64, to: u64, push: &mut impl FnMut(u64, u64)) {
        let fd = self.memfd.as_raw_fd();
        let (start, end) = ((r.file_offset + from) as i64, (r.file_offset + to) as i64);
        let mut at = start;
        while at < end {
            // SAFETY: lseek on our own memfd; it only moves the file offset, which nothing
            // else in Ferry uses (all access goes through the mapping).
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 || data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { hole.min(end) };
            let first = (data as u64) & !(PAGE_SIZE - 1);
            let last = (hole as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            push(r.gpa + (first - r.file_offset), last - first);
            at = hole;
        }
    }

    /// Makes `[gpa, gpa+len)` read as zeros again by releasing its memfd pages (a hole costs
    /// no memory, unlike writing zeros). The range must be page-aligned and inside one RAM
    /// region; anything else is refused. Only for RAM no vCPU or device uses concurrently.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<()> {
        let bad = |reason| Error::GuestMemory {
            addr: gpa,
            len: len as usize,
            reason,
        };
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad("range to discard is not page-aligned".into()));
        }
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| bad("range to discard overflows".into()))?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
            .ok_or_else(|| bad("range to discard is not inside one RAM region".into()))?;
        let offset = r.file_offset + (gpa - r.gpa);
        // SAFETY: fallocate on our own memfd with a range inside it; punching a hole only
        // replaces those pages with zeros, which every mapping of the memfd then reads.
        let rc = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(bad(format!(
                "punching a hole: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Calls `f(region, offset, bytes)` with every RAM region, in chunks of at most
    /// `chunk` bytes copied out of guest memory with volatile accesses (offset 0 starts a
    /// region).
    ///
    /// A running guest may write the memory meanwhile: callers pause the vCPUs (and devices)
    /// when they need a consistent view.
    pub fn for_each_region(&self, chunk: usize, mut f: impl FnMut(&RamRegion, u64, &[u8])) {
        let mut buf = vec![0u8; chunk.max(PAGE_SIZE as usize)];
        for r in &self.regions {
            let mut off = 0u64;
            while off < r.size {
                let n = (r.size - off).min(buf.len() as u64);
                let Some(v) = self.volatile_slice(r.gpa + off, n) else {
                    return;
                };
                let copied = v.copy_to(&mut buf[..n as usize]);
                f(r, off, &buf[..copied]);
                off += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(validate_ram_size(256 << 20).is_ok());
        assert!(validate_ram_size(16 << 20).is_err());
        assert!(validate_ram_size((256 << 20) + 4096).is_err());
        assert!(validate_ram_size(MAX_RAM + RAM_ALIGN).is_err());
    }

    #[test]
    fn regions_split_around_the_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRegion {
                gpa: 0,
                size: 3 << 30,
                file_offset: 0
            }
        );
        assert_eq!(
            r[1],
            RamRegion {
                gpa: 4 << 30,
                size: 1 << 30,
                file_offset: 3 << 30
            }
        );
    }

    /// A ring index one thread carries over a byte boundary (0x12ff <-> 0x1300) through
    /// `write` is only ever read back by `read` as one of those two values: a byte-wise copy
    /// reads 0x13ff or 0x1200, an index a queue size away, which breaks the queue.
    #[test]
    fn a_two_byte_index_is_read_and_written_whole() {
        // The caller's bytes sit at an odd address, so a copy that follows the alignment of
        // both ends (vm-memory's) would go byte by byte.
        #[repr(align(8))]
        struct Odd([u8; 4]);
        const WRITTEN: [u16; 2] = [0x12ff, 0x1300];
        let ram = GuestRam::new(32 << 20).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let at = 0x7002;
        ram.write(at, &WRITTEN[0].to_le_bytes()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i ^= 1;
                    let mut odd = Odd([0; 4]);
                    odd.0[1..3].copy_from_slice(&WRITTEN[i].to_le_bytes());
                    ram.write(at, &odd.0[1..3]).unwrap();
                }
            });
            let mut torn = Vec::new();
            for _ in 0..300_000 {
                let mut odd = Odd([0; 4]);
                ram.read(at, &mut odd.0[1..3]).unwrap();
                let v = u16::from_le_bytes([odd.0[1], odd.0[2]]);
                if !WRITTEN.contains(&v) && torn.len() < 4 {
                    torn.push(v);
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(torn.is_empty(), "torn reads of a 2-byte index: {torn:x?}");
        });
    }

    #[test]
    fn discard_zeroes_and_frees_pages() {
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.write(0x5000, &[7; 8192]).unwrap();
        ram.discard(0x5000, 4096).unwrap();
        let mut b = [1u8; 8192];
        ram.read(0x5000, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 7));
        assert!(ram.discard(0x5001, 4096).is_err());
        assert!(ram.discard(u64::MAX - 4095, 4096).is_err());
        assert!(ram.discard(64 << 20, 4096).is_err());
    }

    #[test]
    fn data_ranges_cover_written_pages_only() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(ram.data_ranges().is_empty(), "fresh RAM is all holes");
        ram.write(0x5000, &[1]).unwrap();
        ram.write((40 << 20) + 0x10, &[2; 8192]).unwrap();
        let ranges = ram.data_ranges();
        let covers = |gpa: u64| ranges.iter().any(|&(g, l)| gpa >= g && gpa < g + l);
        assert!(covers(0x5000));
        assert!(covers((40 << 20) + 0x10) && covers((40 << 20) + 0x2000));
        assert!(!covers(20 << 20), "an untouched page is a hole");
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < 8 << 20, "extents stay small: {total}");
    }

    #[test]
    fn data_ranges_find_pages_written_through_the_file_not_the_mapping() {
        // A device process writes guest RAM through its own mapping: the page is in the page
        // cache but not in this process's page tables. `mincore` still sees it; a page the
        // page tables lost (swap) is found by the extents search of the non-resident runs.
        let ram = GuestRam::new(32 << 20).unwrap();
        let r = &ram.regions[0];
        let at = r.file_offset + (9 << 20) + 0x3000;
        // SAFETY: pwrite of 4 bytes from a local buffer into our own memfd.
        let n = unsafe {
            libc::pwrite(
                ram.memfd.as_raw_fd(),
                [5u8; 4].as_ptr().cast(),
                4,
                at as libc::off_t,
            )
        };
        assert_eq!(n, 4);
        ram.write(0x1000, &[1]).unwrap();
        let ranges = ram.data_ranges();
        let covers = |gpa: u64| ranges.iter().any(|&(g, l)| gpa >= g && gpa < g + l);
        assert!(covers(r.gpa + (9 << 20) + 0x3000), "{ranges:x?}");
        assert!(covers(0x1000));
        assert!(!covers(4 << 20));
        // Adjacent pages come back as one range.
        ram.write(0x2000, &[1]).unwrap();
        let ranges = ram.data_ranges();
        assert!(
            ranges.iter().any(|&(g, l)| g <= 0x1000 && g + l >= 0x3000),
            "{ranges:x?}"
        );
    }

    #[test]
    fn memfd_ram_reads_back_and_bounds_are_checked() {
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.write(0x1234, b"ferry").unwrap();
        let mut buf = [0u8; 5];
        ram.read(0x1234, &mut buf).unwrap();
        assert_eq!(&buf, b"ferry");
        assert!(ram.write((32 << 20) - 2, b"abc").is_err());
        assert!(ram.contains(0, 32 << 20));
        assert!(!ram.contains((32 << 20) - 1, 2));
        assert!(!ram.contains(u64::MAX, 2));
        // the same bytes are visible through the memfd
        let again = GuestRam::from_memfd(ram.memfd().clone(), 32 << 20).unwrap();
        again.read(0x1234, &mut buf).unwrap();
        assert_eq!(&buf, b"ferry");
    }

    /// Guest RAM is only ever copied out with volatile accesses while another thread (a
    /// stand-in vCPU) keeps writing it: the views stop
    /// at region ends, and the chunks cover every byte once.
    #[test]
    fn volatile_copies_while_a_writer_runs() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert!(ram.volatile_slice((32 << 20) - 4096, 8192).is_none());
        assert!(ram.volatile_slice(u64::MAX - 10, 20).is_none());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = {
            let (ram, stop, rounds) = (ram.clone(), stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut v = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    v = v.wrapping_add(0x0101_0101_0101_0101);
                    for w in 0..512u64 {
                        ram.memory
                            .store(
                                v,
                                GuestAddress(0x8000 + w * 8),
                                std::sync::atomic::Ordering::Relaxed,
                            )
                            .unwrap();
                    }
                    rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while rounds.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the writer never ran");
            std::thread::yield_now();
        }
        for _ in 0..200 {
            // A racy snapshot (bytes may mix old and new values), never a reference.
            let mut page = [0u8; 4096];
            let v = ram.volatile_slice(0x8000, 4096).unwrap();
            assert_eq!(v.copy_to(&mut page[..]), 4096);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        // With the writer stopped the copy is exact.
        let last = ram.load_u64(0x8000).unwrap();
        let mut page = [0u8; 4096];
        ram.volatile_slice(0x8000, 4096)
            .unwrap()
            .copy_to(&mut page[..]);
        assert!(page
            .chunks_exact(8)
            .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == last));
        let mut seen = 0u64;
        ram.for_each_region(1 << 20, |r, off, bytes| {
            assert_eq!(r.gpa + off, seen);
            seen += bytes.len() as u64;
        });
        assert_eq!(seen, 32 << 20);
    }
}

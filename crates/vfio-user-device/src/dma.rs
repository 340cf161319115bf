//! The device's view of the client's memory: regions the client mapped with `DMA_MAP`.
//! Every access is bounds-checked against them; nothing else is reachable.
use std::{fs::File, os::fd::AsRawFd};

/// A DMA access the mapped regions do not cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA {kind} of {len} bytes at IOVA {iova:#x} is outside every mapped region")]
pub struct DmaError {
    /// "read" or "write".
    pub kind: &'static str,
    /// Address.
    pub iova: u64,
    /// Length.
    pub len: usize,
}

/// Why a `DMA_MAP` or `DMA_UNMAP` was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// No file descriptor came with the request.
    #[error("DMA_MAP of IOVA {0:#x} came without a file descriptor")]
    NoFd(u64),
    /// Size zero, unaligned or wrapping.
    #[error("DMA_MAP of {size:#x} bytes at IOVA {iova:#x} (file offset {offset:#x}) is not page aligned or wraps")]
    Bad {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
    },
    /// Reaches past the end of the file: touching those pages would kill the device process
    /// with SIGBUS.
    #[error("DMA_MAP of {size:#x} bytes at file offset {offset:#x} reaches past the file's {len:#x} bytes")]
    PastEnd {
        /// File offset.
        offset: u64,
        /// Size.
        size: u64,
        /// The file's size.
        len: u64,
    },
    /// Overlaps an existing mapping.
    #[error("DMA_MAP of IOVA {iova:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// Too many mappings.
    #[error("too many DMA mappings (limit {0})")]
    TooMany(usize),
    /// mmap failed.
    #[error("mmap of the DMA region failed")]
    Mmap(#[source] std::io::Error),
}

/// Upper bound on simultaneous mappings.
pub const MAX_REGIONS: usize = 64;

struct Region {
    iova: u64,
    size: u64,
    host: *mut u8,
}

/// The mapped regions.
#[derive(Default)]
pub struct DmaSpace {
    regions: Vec<Region>,
}

// SAFETY: the raw pointers are private mappings owned by this value; all access goes through
// `&self`/`&mut self` methods with bounds checks.
unsafe impl Send for DmaSpace {}

impl DmaSpace {
    /// Maps `size` bytes of `fd` at `offset` for IOVA `iova`.
    pub fn map(&mut self, iova: u64, size: u64, offset: u64, fd: &File) -> Result<(), MapError> {
        let page = 4096;
        if size == 0
            || !iova.is_multiple_of(page)
            || !size.is_multiple_of(page)
            || !offset.is_multiple_of(page)
            || iova.checked_add(size).is_none()
            || usize::try_from(size).is_err()
            || i64::try_from(offset).is_err()
        {
            return Err(MapError::Bad { iova, size, offset });
        }
        // A regular file (memfd, shared memory file) must hold the whole range.
        if let Ok(m) = fd.metadata() {
            if m.is_file() && offset.checked_add(size).is_none_or(|end| end > m.len()) {
                return Err(MapError::PastEnd {
                    offset,
                    size,
                    len: m.len(),
                });
            }
        }
        if self
            .regions
            .iter()
            .any(|r| iova < r.iova + r.size && r.iova < iova + size)
        {
            return Err(MapError::Overlap { iova, size });
        }
        if self.regions.len() >= MAX_REGIONS {
            return Err(MapError::TooMany(MAX_REGIONS));
        }
        // SAFETY: a fresh shared mapping of a caller-provided fd; the result is checked and the
        // mapping is owned by this DmaSpace until unmapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Mmap(std::io::Error::last_os_error()));
        }
        self.regions.push(Region {
            iova,
            size,
            host: p.cast(),
        });
        Ok(())
    }

    /// Unmaps every region inside `[iova, iova + size)`; returns how many.
    pub fn unmap(&mut self, iova: u64, size: u64) -> usize {
        let end = iova.saturating_add(size);
        let before = self.regions.len();
        self.regions.retain(|r| {
            let inside = r.iova >= iova && r.iova + r.size <= end;
            if inside {
                // SAFETY: the region was mapped by `map` with this address and size.
                unsafe { libc::munmap(r.host.cast(), r.size as usize) };
            }
            !inside
        });
        before - self.regions.len()
    }

    /// Unmaps everything.
    pub fn clear(&mut self) {
        self.unmap(0, u64::MAX);
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Host pointer for `[iova, iova + len)` if one region covers all of it.
    fn translate(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let end = iova.checked_add(len as u64)?;
        self.regions
            .iter()
            .find(|r| iova >= r.iova && end <= r.iova + r.size)
            .map(|r| {
                // SAFETY: iova - r.iova < r.size: the offset stays inside the mapping.
                unsafe { r.host.add((iova - r.iova) as usize) }
            })
    }

    /// True when `[iova, iova + len)` is mapped.
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|l| self.translate(iova, l).is_some())
    }

    /// Copies from client memory.
    pub fn read(&self, iova: u64, data: &mut [u8]) -> Result<(), DmaError> {
        let p = self.translate(iova, data.len()).ok_or(DmaError {
            kind: "read",
            iova,
            len: data.len(),
        })?;
        // SAFETY: `translate` checked the whole range lies inside a live mapping. The client
        // may write the memory concurrently (it is shared DMA memory): an index is read with
        // one load of its width (see `shared`).
        unsafe { crate::shared::read(p, data) };
        Ok(())
    }

    /// Copies into client memory.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let p = self.translate(iova, data.len()).ok_or(DmaError {
            kind: "write",
            iova,
            len: data.len(),
        })?;
        // SAFETY: as in `read`; this is the device's DMA write, an index as one store.
        unsafe { crate::shared::write(p, data) };
        Ok(())
    }

    /// Writes a 16-byte completion entry with its last dword (phase) stored last.
    pub fn write_cqe(&self, iova: u64, bytes: &[u8; 16]) -> Result<(), DmaError> {
        let p = self.translate(iova, 16).ok_or(DmaError {
            kind: "write",
            iova,
            len: 16,
        })?;
        // SAFETY: range checked; the first 12 bytes go first, then a release fence, then the
        // dword with the phase tag so a polling driver never sees a half-written entry.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, 12);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            let last = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            std::ptr::write_volatile(p.add(12).cast::<u32>(), last);
        }
        Ok(())
    }
}

impl Drop for DmaSpace {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn memfd(size: u64) -> File {
        // SAFETY: valid name, checked result.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn bounds_are_enforced() {
        let f = memfd(0x4000);
        let mut d = DmaSpace::default();
        d.map(0x10000, 0x2000, 0x1000, &f).unwrap();
        d.write(0x10ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        d.read(0x10ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(d.read(0x11ffe, &mut b).is_err(), "straddles the end");
        assert!(d.read(0xfffe, &mut b).is_err(), "starts before");
        assert!(d.read(u64::MAX - 1, &mut b).is_err(), "wraps");
        assert!(matches!(
            d.map(0x11000, 0x1000, 0, &f),
            Err(MapError::Overlap { .. })
        ));
        assert!(matches!(
            d.map(0x20001, 0x1000, 0, &f),
            Err(MapError::Bad { .. })
        ));
        assert!(matches!(
            d.map(0x20000, 0, 0, &f),
            Err(MapError::Bad { .. })
        ));
        assert_eq!(d.unmap(0x10000, 0x2000), 1);
        assert!(d.read(0x10ffe, &mut b).is_err());
    }

    #[test]
    fn a_mapping_past_the_end_of_its_file_is_refused() {
        // Found by the nvme_registers fuzz target: such a mapping succeeds, and the first
        // command whose data lies past the end killed the device process with SIGBUS.
        let f = memfd(0x4000);
        let mut d = DmaSpace::default();
        assert!(matches!(
            d.map(0x10000, 0x5000, 0, &f),
            Err(MapError::PastEnd { .. })
        ));
        assert!(matches!(
            d.map(0x10000, 0x1000, 0x4000, &f),
            Err(MapError::PastEnd { .. })
        ));
        d.map(0x10000, 0x4000, 0, &f).unwrap();
    }
}

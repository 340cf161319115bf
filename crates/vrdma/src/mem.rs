//! Guest memory as the device sees it: every access checked against guest RAM.
use pvrdma_abi::{FromBytes, Immutable, IntoBytes, KnownLayout, PVRDMA_PAGE_SIZE};

use crate::VrdmaError;

/// Guest-physical memory the device reads and writes.
pub trait GuestMemory: Send + Sync {
    /// Whether `[gpa, gpa + len)` is guest RAM.
    fn contains(&self, gpa: u64, len: u64) -> bool;
    /// Copies guest memory into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VrdmaError>;
    /// Copies `data` into guest memory.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VrdmaError>;
    /// Atomic 32-bit load (ring indexes).
    fn load_u32(&self, gpa: u64) -> Result<u32, VrdmaError>;
    /// Atomic 32-bit store (ring indexes).
    fn store_u32(&self, gpa: u64, v: u32) -> Result<(), VrdmaError>;
}

fn bad(gpa: u64, len: u64) -> VrdmaError {
    VrdmaError::BadAddress { gpa, len }
}

impl GuestMemory for vmm::memory::GuestRam {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        vmm::memory::GuestRam::contains(self, gpa, len)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VrdmaError> {
        if !self.contains(gpa, buf.len() as u64) {
            return Err(bad(gpa, buf.len() as u64));
        }
        vmm::memory::GuestRam::read(self, gpa, buf).map_err(|_| bad(gpa, buf.len() as u64))
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VrdmaError> {
        if !self.contains(gpa, data.len() as u64) {
            return Err(bad(gpa, data.len() as u64));
        }
        vmm::memory::GuestRam::write(self, gpa, data).map_err(|_| bad(gpa, data.len() as u64))
    }
    fn load_u32(&self, gpa: u64) -> Result<u32, VrdmaError> {
        if gpa % 4 != 0 || !self.contains(gpa, 4) {
            return Err(bad(gpa, 4));
        }
        vmm::memory::GuestRam::load_u32(self, gpa).map_err(|_| bad(gpa, 4))
    }
    fn store_u32(&self, gpa: u64, v: u32) -> Result<(), VrdmaError> {
        if gpa % 4 != 0 || !self.contains(gpa, 4) {
            return Err(bad(gpa, 4));
        }
        vmm::memory::GuestRam::store_u32(self, gpa, v).map_err(|_| bad(gpa, 4))
    }
}

/// Reads a layout struct from guest memory.
pub fn read_obj<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
    mem: &dyn GuestMemory,
    gpa: u64,
) -> Result<T, VrdmaError> {
    let mut v = T::new_zeroed();
    mem.read(gpa, v.as_mut_bytes())?;
    Ok(v)
}

/// Writes a layout struct into guest memory.
pub fn write_obj<T: IntoBytes + Immutable>(
    mem: &dyn GuestMemory,
    gpa: u64,
    v: &T,
) -> Result<(), VrdmaError> {
    mem.write(gpa, v.as_bytes())
}

/// Checks that `gpa` is a page of guest RAM.
pub fn check_page(mem: &dyn GuestMemory, gpa: u64) -> Result<u64, VrdmaError> {
    if gpa % PVRDMA_PAGE_SIZE != 0 {
        return Err(VrdmaError::Unaligned(gpa));
    }
    if !mem.contains(gpa, PVRDMA_PAGE_SIZE) {
        return Err(bad(gpa, PVRDMA_PAGE_SIZE));
    }
    Ok(gpa)
}

/// Walks a page directory (directory page → table pages → pages) for `npages` pages, with
/// every directory, table and page address checked; at most `max_pages`.
pub fn walk_pdir(
    mem: &dyn GuestMemory,
    pdir_dma: u64,
    npages: u32,
    max_pages: u32,
) -> Result<Vec<u64>, VrdmaError> {
    use pvrdma_abi::{page_dir_page, page_dir_table, PVRDMA_PAGE_DIR_MAX_PAGES};
    if npages == 0 || npages > max_pages.min(PVRDMA_PAGE_DIR_MAX_PAGES) {
        return Err(VrdmaError::Invalid {
            field: "page count",
            value: npages as u64,
            why: "must be between 1 and the device's limit",
        });
    }
    check_page(mem, pdir_dma)?;
    let mut pages = Vec::with_capacity(npages as usize);
    let mut table = (u32::MAX, 0u64);
    for i in 0..npages {
        let t = page_dir_table(i);
        if table.0 != t {
            let mut b = [0u8; 8];
            mem.read(pdir_dma + 8 * t as u64, &mut b)?;
            table = (t, check_page(mem, u64::from_le_bytes(b))?);
        }
        let mut b = [0u8; 8];
        mem.read(table.1 + 8 * page_dir_page(i) as u64, &mut b)?;
        pages.push(check_page(mem, u64::from_le_bytes(b))?);
    }
    Ok(pages)
}

/// A guest memory made of a byte vector at guest-physical 0 (tests and tools).
#[derive(Debug)]
pub struct VecMemory {
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl VecMemory {
    /// `size` bytes of zeroed memory.
    pub fn new(size: usize) -> VecMemory {
        VecMemory {
            bytes: std::sync::Mutex::new(vec![0; size]),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.bytes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl GuestMemory for VecMemory {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| end <= self.with(|b| b.len()) as u64)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VrdmaError> {
        if !self.contains(gpa, buf.len() as u64) {
            return Err(bad(gpa, buf.len() as u64));
        }
        self.with(|b| buf.copy_from_slice(&b[gpa as usize..gpa as usize + buf.len()]));
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VrdmaError> {
        if !self.contains(gpa, data.len() as u64) {
            return Err(bad(gpa, data.len() as u64));
        }
        self.with(|b| b[gpa as usize..gpa as usize + data.len()].copy_from_slice(data));
        Ok(())
    }
    fn load_u32(&self, gpa: u64) -> Result<u32, VrdmaError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn store_u32(&self, gpa: u64, v: u32) -> Result<(), VrdmaError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

//! The two copies of a shadowed ring: the vCPU buffer (what the guest sees) and the device
//! buffer (what the device DMAs). The engine reaches both through this trait, so the ring
//! adapters do not care which one is hypervisor memory and which one is guest RAM.
use crate::{Error, Result};

/// Byte access to both buffers by guest-physical address.
pub trait Buffers {
    /// Reads from the vCPU buffer. Returns false if the range is not backed.
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes into the vCPU buffer.
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool;
    /// Reads from the device buffer (for data pages: guest RAM as the device sees it).
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes into the device buffer.
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool;
    /// True when `[gpa, gpa + len)` is guest RAM the device may DMA.
    fn in_ram(&self, gpa: u64, len: u64) -> bool;

    /// True when a guest-supplied data address range `[gpa, gpa + len)` is guest RAM the
    /// device may DMA for a command: [`Buffers::in_ram`] minus the rings whose device side
    /// only the hypervisor writes (a command's data there would write ring entries nobody
    /// checked, or hypervisor memory where the device side is a copy).
    fn data_in_ram(&self, gpa: u64, len: u64) -> bool {
        self.in_ram(gpa, len)
    }

    /// Copies a validated PRP list (`entries`: the data pages after the first) of a command of
    /// queue `qid` into bounce slot `slot` (one per command in flight), memory the guest cannot
    /// reach and the device can, and returns the address to give the device as PRP2. None when
    /// there is no such memory: the device then reads the guest's own list.
    fn bounce_prp_list(&self, qid: u16, slot: usize, entries: &[u64]) -> Option<u64> {
        let _ = (qid, slot, entries);
        None
    }
}

/// Helpers with errors instead of booleans.
pub(crate) trait BuffersExt: Buffers {
    fn vcpu_read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vcpu(gpa, buf).then_some(()).ok_or(Error::Access {
            buffer: "vCPU",
            gpa,
            len: buf.len(),
        })
    }
    fn vcpu_write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.write_vcpu(gpa, data)
            .then_some(())
            .ok_or(Error::Access {
                buffer: "vCPU",
                gpa,
                len: data.len(),
            })
    }
    fn device_read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.read_device(gpa, buf)
            .then_some(())
            .ok_or(Error::Access {
                buffer: "device",
                gpa,
                len: buf.len(),
            })
    }
    fn device_write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.write_device(gpa, data)
            .then_some(())
            .ok_or(Error::Access {
                buffer: "device",
                gpa,
                len: data.len(),
            })
    }
}

impl<T: Buffers + ?Sized> BuffersExt for T {}

/// Two in-memory buffers over `[base, base + len)`, for tests and tools.
#[derive(Clone, Debug)]
pub struct VecBuffers {
    /// First guest-physical address covered.
    pub base: u64,
    /// The vCPU buffer.
    pub vcpu: std::cell::RefCell<Vec<u8>>,
    /// The device buffer.
    pub device: std::cell::RefCell<Vec<u8>>,
}

impl VecBuffers {
    /// Zeroed buffers of `len` bytes at `base`.
    pub fn new(base: u64, len: usize) -> Self {
        VecBuffers {
            base,
            vcpu: std::cell::RefCell::new(vec![0; len]),
            device: std::cell::RefCell::new(vec![0; len]),
        }
    }

    fn range(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.vcpu.borrow().len()).then_some(start..end)
    }
}

impl Buffers for VecBuffers {
    fn read_vcpu(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.range(gpa, buf.len())
            .map(|r| buf.copy_from_slice(&self.vcpu.borrow()[r]))
            .is_some()
    }
    fn write_vcpu(&self, gpa: u64, data: &[u8]) -> bool {
        self.range(gpa, data.len())
            .map(|r| self.vcpu.borrow_mut()[r].copy_from_slice(data))
            .is_some()
    }
    fn read_device(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.range(gpa, buf.len())
            .map(|r| buf.copy_from_slice(&self.device.borrow()[r]))
            .is_some()
    }
    fn write_device(&self, gpa: u64, data: &[u8]) -> bool {
        self.range(gpa, data.len())
            .map(|r| self.device.borrow_mut()[r].copy_from_slice(data))
            .is_some()
    }
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len)
            .ok()
            .and_then(|l| self.range(gpa, l))
            .is_some()
    }
}

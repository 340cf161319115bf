//! A polled-mode NVMe driver: finds the controller by class code, maps nothing (the guest's
//! identity map already covers BAR0), and runs `nvme_spec::queue` over guest-physical memory.
//! Register accesses exit to the VMM; I/O doorbells sit on pages the VMM mapped, so the hot
//! path does not exit.
use guest_abi::layout::WORK_BASE;
use nvme_spec::{
    identify,
    opcode::cns,
    queue::{Controller, DriverError, Platform, QueueMem, QueuePair},
};

use crate::{clock, io, pci, println};

/// Class code of an NVMe controller.
const NVME_CLASS: u32 = 0x01_08_02;
/// Most I/O queue pairs the driver sets up.
pub const MAX_QUEUES: usize = 16;
/// Most entries per I/O queue.
pub const MAX_DEPTH: u32 = 256;

/// Register access through BAR0 (each access exits to the VMM).
pub struct GuestPlatform {
    bar0: u64,
}

impl Platform for GuestPlatform {
    fn reg_read32(&mut self, offset: u64) -> u32 {
        io::mmio_read32(self.bar0 + offset)
    }
    fn reg_write32(&mut self, offset: u64, value: u32) {
        io::mmio_write32(self.bar0 + offset, value)
    }
    fn doorbell(&mut self, offset: u64) -> *mut u32 {
        (self.bar0 + offset) as *mut u32
    }
    fn now_us(&mut self) -> u64 {
        clock::ticks_to_us(clock::rdtsc())
    }
}

/// A bump allocator over the work area (identity mapped: address == bus address).
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// The low work area, from `WORK_BASE` to the end of low RAM.
    pub fn new(ram_lo_size: u64) -> Self {
        Arena {
            next: WORK_BASE,
            end: ram_lo_size,
        }
    }

    /// `bytes` of zeroed, page-aligned memory.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let len = bytes.div_ceil(4096) * 4096;
        if self.next.checked_add(len)? > self.end {
            return None;
        }
        let a = self.next;
        self.next += len;
        // SAFETY: [a, a+len) is unused work-area RAM, identity mapped.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, len as usize) };
        Some(a)
    }

    /// Hands the rest of the low work area to another user: returns its first address (page
    /// aligned); the arena allocates nothing after that.
    pub fn take_rest(&mut self) -> u64 {
        let a = self.next;
        self.next = self.end;
        a
    }

    /// A zeroed array of `n` `T`s.
    pub fn array<T: Copy>(&mut self, n: usize) -> Option<&'static mut [T]> {
        let a = self.alloc((n * core::mem::size_of::<T>()) as u64)?;
        // SAFETY: freshly allocated, zeroed, suitably aligned (page aligned), never freed; the
        // callers only use T for which all-zero bytes are a valid value.
        Some(unsafe { core::slice::from_raw_parts_mut(a as *mut T, n) })
    }
}

/// Why the driver could not start.
pub enum InitError {
    /// No function with class 01:08:02.
    NotFound,
    /// The controller did not come up.
    Driver(DriverError),
    /// Out of work-area memory.
    NoMemory,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NotFound => f.write_str("no NVMe controller (class 010802) on PCI bus 0"),
            InitError::Driver(e) => write!(f, "{}", e),
            InitError::NoMemory => f.write_str("work area exhausted"),
        }
    }
}

impl From<DriverError> for InitError {
    fn from(e: DriverError) -> Self {
        InitError::Driver(e)
    }
}

/// A controller with its I/O queues.
pub struct Nvme {
    /// The admin side.
    pub ctrl: Controller<GuestPlatform>,
    /// I/O queue pairs (queue id = index + 1).
    pub queues: [Option<QueuePair>; MAX_QUEUES],
    /// Number of I/O queue pairs.
    pub nqueues: usize,
    /// Namespace 1 size in blocks.
    pub blocks: u64,
    /// Block size.
    pub block_size: u32,
    /// Maximum transfer in bytes (MDTS).
    pub max_transfer: u64,
    /// BAR0 address.
    pub bar0: u64,
}

/// Programs MSI-X vectors `0..want` (at most the table's size) to LAPIC vector 0x40 + n on
/// CPU 0, unmasked, and enables MSI-X. Returns how many vectors were programmed (0: the
/// device has no MSI-X table in BAR0).
fn enable_msix(dev: u8, func: u8, bar0: u64, want: u16) -> u16 {
    let mut ptr = (pci::config_read(0, dev, func, 0x34) & 0xfc) as u8;
    for _ in 0..48 {
        if ptr < 0x40 {
            return 0;
        }
        let head = pci::config_read(0, dev, func, ptr);
        if head & 0xff == 0x11 {
            let table = pci::config_read(0, dev, func, ptr + 4);
            if table & 7 != 0 {
                return 0; // table in another BAR
            }
            let size = ((head >> 16) & 0x7ff) as u16 + 1;
            let n = want.min(size);
            let base = bar0 + (table & !7) as u64;
            for v in 0..n as u64 {
                io::mmio_write32(base + v * 16, 0xfee0_0000);
                io::mmio_write32(base + v * 16 + 4, 0);
                io::mmio_write32(base + v * 16 + 8, 0x40 + v as u32);
                io::mmio_write32(base + v * 16 + 12, 0);
            }
            // Message control: enable, function not masked.
            pci::config_write(0, dev, func, ptr, (head & !(0x4000 << 16)) | 0x8000 << 16);
            return n;
        }
        ptr = ((head >> 8) & 0xfc) as u8;
    }
    0
}

fn find() -> Option<(u8, u8, u64)> {
    let mut found = None;
    pci::enumerate(|f| {
        if f.class == NVME_CLASS && found.is_none() {
            found = Some((f.dev, f.func));
        }
    });
    let (dev, func) = found?;
    let lo = pci::config_read(0, dev, func, 0x10);
    let hi = if lo & 0x6 == 0x4 {
        pci::config_read(0, dev, func, 0x14) as u64
    } else {
        0
    };
    let bar0 = (lo as u64 & !0xf) | hi << 32;
    // memory space + bus master
    let cmd = pci::config_read(0, dev, func, 0x04);
    pci::config_write(0, dev, func, 0x04, (cmd & 0xffff) | 0x6);
    Some((dev, func, bar0))
}

impl Nvme {
    /// Finds the controller, resets and enables it, identifies it and creates `queues` I/O
    /// queue pairs of `depth` entries.
    pub fn init(
        arena: &mut Arena,
        queues: usize,
        depth: u16,
        interrupts: bool,
    ) -> Result<Nvme, InitError> {
        let (dev, func, bar0) = find().ok_or(InitError::NotFound)?;
        let vectors = if interrupts {
            enable_msix(dev, func, bar0, queues as u16 + 1)
        } else {
            0
        };
        let qmem = |arena: &mut Arena, entries: u16| -> Result<QueueMem, InitError> {
            let sq = arena
                .alloc(entries as u64 * 64)
                .ok_or(InitError::NoMemory)?;
            let cq = arena
                .alloc(entries as u64 * 16)
                .ok_or(InitError::NoMemory)?;
            Ok(QueueMem {
                sq: sq as *mut _,
                sq_bus: sq,
                cq: cq as *mut _,
                cq_bus: cq,
                entries,
            })
        };
        let admin = qmem(arena, 16)?;
        // SAFETY: the queue memory is fresh, zeroed work-area RAM owned by the driver.
        let mut ctrl = unsafe { Controller::init(GuestPlatform { bar0 }, admin) }?;
        let page = arena.alloc(4096).ok_or(InitError::NoMemory)?;
        ctrl.identify(cns::CONTROLLER, 0, page)?;
        // SAFETY: the controller wrote the Identify page; nothing else uses it.
        let id = unsafe { core::slice::from_raw_parts(page as *const u8, 4096) };
        let mdts = id[identify::ctrl::MDTS];
        let max_transfer = if mdts == 0 {
            1 << 20
        } else {
            4096u64 << mdts.min(8)
        };
        let sgls = identify::get_u32(id, identify::ctrl::SGLS);
        ctrl.identify(cns::NAMESPACE, 1, page)?;
        // SAFETY: as above.
        let ns = unsafe { core::slice::from_raw_parts(page as *const u8, 4096) };
        let blocks = identify::get_u64(ns, identify::ns::NSZE);
        let flbas = (ns[identify::ns::FLBAS] & 0xf) as usize;
        let block_size = identify::lba_size(ns, flbas) as u32;
        let granted = ctrl.set_queue_count(queues as u16)? as usize;
        let n = queues.min(granted).min(MAX_QUEUES);
        let mut qs: [Option<QueuePair>; MAX_QUEUES] = [const { None }; MAX_QUEUES];
        for (i, slot) in qs.iter_mut().enumerate().take(n) {
            // One entry more than the depth: a full queue keeps one slot empty.
            let m = qmem(arena, depth + 1)?;
            // SAFETY: as above.
            let qid = i as u16 + 1;
            let vector = (qid < vectors).then_some(qid);
            // SAFETY: as above.
            *slot = Some(unsafe { ctrl.create_io_queue_with(qid, m, vector) }?);
        }
        println!(
            "nvme: controller at 00:{:02x}.{} BAR0 {:#x}, DSTRD {}, {} blocks of {} bytes, MDTS {} KiB, SGLs {}, {} I/O queue(s) of {}",
            dev,
            func,
            bar0,
            ctrl.dstrd(),
            blocks,
            block_size,
            max_transfer >> 10,
            if sgls == 0 { "not supported" } else { "supported" },
            n,
            depth
        );
        Ok(Nvme {
            ctrl,
            queues: qs,
            nqueues: n,
            blocks,
            block_size,
            max_transfer,
            bar0,
        })
    }

    /// Deletes the I/O queues and shuts the controller down (the device flushes its data).
    pub fn shutdown(&mut self) -> Result<(), DriverError> {
        for q in (1..=self.nqueues as u16).rev() {
            self.ctrl.delete_io_queue(q)?;
        }
        self.ctrl.shutdown()
    }
}

/// Fills PRP1/PRP2 for a buffer of `len` bytes at `buf` (page aligned, physically contiguous),
/// writing a PRP list at `list` when more than two pages are needed.
pub fn prps(buf: u64, len: u64, list: u64) -> (u64, u64) {
    let pages = nvme_spec::prp::pages(buf, len);
    match pages {
        0 | 1 => (buf, 0),
        2 => (buf, buf + 4096),
        _ => {
            for i in 1..pages {
                // SAFETY: `list` is a page owned by the caller with room for 512 entries; the
                // caller bounds `len` by the maximum transfer (at most 256 pages).
                unsafe {
                    (list as *mut u64)
                        .add(i as usize - 1)
                        .write_volatile(buf + i * 4096)
                };
            }
            (buf, list)
        }
    }
}

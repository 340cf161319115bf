//! A polled NVMe driver on raw pointers: queue pairs with phase tracking and a controller
//! bring-up sequence. Used by the built-in guest (identity-mapped guest-physical memory) and by
//! the host-side vfio-user client (its own DMA memfd), so both run the very same code.
use crate::{
    opcode::{admin, cns, feature},
    regs::{self, aqa, cap, cc, csts},
    Cqe, Sqe, Status,
};

/// What the driver needs from its environment.
pub trait Platform {
    /// Reads a 32-bit controller register (BAR0 offset).
    fn reg_read32(&mut self, offset: u64) -> u32;
    /// Writes a 32-bit controller register.
    fn reg_write32(&mut self, offset: u64, value: u32);
    /// Where the doorbell at BAR0 `offset` can be written (a mapped page or trapped MMIO).
    fn doorbell(&mut self, offset: u64) -> *mut u32;
    /// A monotonic clock in microseconds.
    fn now_us(&mut self) -> u64;
}

/// Why a driver operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverError {
    /// The controller did not reach a state in time.
    Timeout(&'static str),
    /// CSTS.CFS is set (or the register read as all ones).
    Fatal(u32),
    /// An admin command completed with an error status.
    Command {
        /// Opcode of the command.
        opcode: u8,
        /// Its status.
        status: Status,
    },
    /// A completion named a command id that was not outstanding.
    UnexpectedCompletion {
        /// Command id in the completion.
        cid: u16,
        /// Command id expected.
        expected: u16,
    },
    /// The submission queue is full.
    QueueFull,
}

impl core::fmt::Display for DriverError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DriverError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            DriverError::Fatal(csts) => write!(f, "controller fatal status (CSTS {csts:#x})"),
            DriverError::Command { opcode, status } => {
                write!(f, "admin command {opcode:#04x} failed: {status}")
            }
            DriverError::UnexpectedCompletion { cid, expected } => {
                write!(
                    f,
                    "completion for command id {cid} while waiting for {expected}"
                )
            }
            DriverError::QueueFull => f.write_str("submission queue full"),
        }
    }
}

impl core::error::Error for DriverError {}

/// Memory for one queue pair: virtual addresses the driver uses and the bus addresses the
/// controller gets.
#[derive(Clone, Copy, Debug)]
pub struct QueueMem {
    /// Submission queue, `entries` × 64 bytes, page aligned.
    pub sq: *mut Sqe,
    /// Its bus address.
    pub sq_bus: u64,
    /// Completion queue, `entries` × 16 bytes, page aligned, zeroed.
    pub cq: *mut Cqe,
    /// Its bus address.
    pub cq_bus: u64,
    /// Entries in each queue.
    pub entries: u16,
}

/// One submission/completion queue pair, polled.
pub struct QueuePair {
    /// Queue id.
    pub qid: u16,
    mem: QueueMem,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    sq_db: *mut u32,
    cq_db: *mut u32,
}

// SAFETY: the pointers are to DMA memory and doorbells the owner of the queue pair controls;
// moving the pair to another thread moves that ownership.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// A queue pair over `mem` with its two doorbells.
    ///
    /// # Safety
    /// `mem` must describe valid, exclusively owned queue memory with a zeroed CQ, and the
    /// doorbell pointers must be writable for as long as the pair is used.
    pub unsafe fn new(qid: u16, mem: QueueMem, sq_db: *mut u32, cq_db: *mut u32) -> Self {
        QueuePair {
            qid,
            mem,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_db,
            cq_db,
        }
    }

    /// Entries per queue.
    pub fn entries(&self) -> u16 {
        self.mem.entries
    }

    /// Free submission slots (one slot always stays empty).
    pub fn free(&self) -> u16 {
        let n = self.mem.entries;
        let used = (self.sq_tail + n - self.sq_head) % n;
        n - 1 - used
    }

    /// Copies `sqe` into the next slot without ringing the doorbell.
    pub fn push(&mut self, sqe: &Sqe) -> Result<(), DriverError> {
        if self.free() == 0 {
            return Err(DriverError::QueueFull);
        }
        // SAFETY: sq_tail < entries and `new`'s caller guaranteed the queue memory.
        unsafe { self.mem.sq.add(self.sq_tail as usize).write_volatile(*sqe) };
        self.sq_tail = (self.sq_tail + 1) % self.mem.entries;
        Ok(())
    }

    /// Writes the SQ tail doorbell.
    pub fn ring(&mut self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: the doorbell pointer is valid (see `new`).
        unsafe { self.sq_db.write_volatile(self.sq_tail as u32) };
    }

    /// `push` then `ring`.
    pub fn submit(&mut self, sqe: &Sqe) -> Result<(), DriverError> {
        self.push(sqe)?;
        self.ring();
        Ok(())
    }

    /// The next completion, if the controller posted one. Does not write the CQ doorbell.
    pub fn poll(&mut self) -> Option<Cqe> {
        // SAFETY: cq_head < entries and the queue memory is valid (see `new`).
        let slot = unsafe { self.mem.cq.add(self.cq_head as usize) };
        // SAFETY: as above; dword 3 carries the phase tag and is read first.
        let dw3 = unsafe { core::ptr::addr_of!((*slot).dw[3]).read_volatile() };
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        // SAFETY: as above.
        let cqe = unsafe { slot.read_volatile() };
        self.cq_head += 1;
        if self.cq_head == self.mem.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        if cqe.sq_head() < self.mem.entries {
            self.sq_head = cqe.sq_head();
        }
        Some(cqe)
    }

    /// Writes the CQ head doorbell.
    pub fn ack(&mut self) {
        // SAFETY: the doorbell pointer is valid (see `new`).
        unsafe { self.cq_db.write_volatile(self.cq_head as u32) };
    }

    /// Current SQ tail (for tests and logs).
    pub fn sq_tail(&self) -> u16 {
        self.sq_tail
    }
}

/// A controller brought up by [`Controller::init`], with its admin queue.
pub struct Controller<P: Platform> {
    /// The environment.
    pub platform: P,
    /// CAP as read at init.
    pub cap: u64,
    admin: QueuePair,
    next_cid: u16,
    timeout_us: u64,
}

fn wait<P: Platform>(
    p: &mut P,
    timeout_us: u64,
    what: &'static str,
    mut done: impl FnMut(u32) -> bool,
) -> Result<(), DriverError> {
    let start = p.now_us();
    loop {
        let s = p.reg_read32(regs::CSTS);
        if s == u32::MAX || s & csts::CFS != 0 {
            return Err(DriverError::Fatal(s));
        }
        if done(s) {
            return Ok(());
        }
        if p.now_us().wrapping_sub(start) > timeout_us {
            return Err(DriverError::Timeout(what));
        }
        core::hint::spin_loop();
    }
}

impl<P: Platform> Controller<P> {
    /// Resets and enables the controller with `admin` as its admin queue pair.
    ///
    /// # Safety
    /// As [`QueuePair::new`] for `admin`.
    pub unsafe fn init(mut platform: P, admin: QueueMem) -> Result<Self, DriverError> {
        let lo = platform.reg_read32(regs::CAP) as u64;
        let hi = platform.reg_read32(regs::CAP + 4) as u64;
        let cap = lo | hi << 32;
        if cap == u64::MAX {
            return Err(DriverError::Fatal(u32::MAX));
        }
        let timeout_us = (cap::timeout(cap).max(1) as u64) * 500_000;
        if platform.reg_read32(regs::CC) & cc::EN != 0 {
            platform.reg_write32(regs::CC, 0);
        }
        wait(&mut platform, timeout_us, "CSTS.RDY = 0", |s| {
            s & csts::RDY == 0
        })?;
        platform.reg_write32(regs::AQA, aqa::new(admin.entries, admin.entries));
        platform.reg_write32(regs::ASQ, admin.sq_bus as u32);
        platform.reg_write32(regs::ASQ + 4, (admin.sq_bus >> 32) as u32);
        platform.reg_write32(regs::ACQ, admin.cq_bus as u32);
        platform.reg_write32(regs::ACQ + 4, (admin.cq_bus >> 32) as u32);
        platform.reg_write32(regs::CC, cc::ENABLE);
        wait(&mut platform, timeout_us, "CSTS.RDY = 1", |s| {
            s & csts::RDY != 0
        })?;
        let dstrd = cap::dstrd(cap);
        let sq_db = platform.doorbell(regs::sq_tail_doorbell(0, dstrd));
        let cq_db = platform.doorbell(regs::cq_head_doorbell(0, dstrd));
        // SAFETY: forwarded from the caller.
        let admin = unsafe { QueuePair::new(0, admin, sq_db, cq_db) };
        Ok(Controller {
            platform,
            cap,
            admin,
            next_cid: 1,
            timeout_us,
        })
    }

    /// The doorbell stride exponent.
    pub fn dstrd(&self) -> u8 {
        cap::dstrd(self.cap)
    }

    /// Submits an admin command and waits for its completion (any status).
    pub fn admin_raw(&mut self, mut sqe: Sqe) -> Result<Cqe, DriverError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.set_cid(cid);
        self.admin.submit(&sqe)?;
        let start = self.platform.now_us();
        loop {
            if let Some(c) = self.admin.poll() {
                self.admin.ack();
                if c.cid() != cid {
                    return Err(DriverError::UnexpectedCompletion {
                        cid: c.cid(),
                        expected: cid,
                    });
                }
                return Ok(c);
            }
            if self.platform.now_us().wrapping_sub(start) > self.timeout_us {
                return Err(DriverError::Timeout("an admin completion"));
            }
            core::hint::spin_loop();
        }
    }

    /// Submits an admin command without waiting; returns the command id it got.
    pub fn admin_submit(&mut self, mut sqe: Sqe) -> Result<u16, DriverError> {
        let cid = self.next_cid;
        sqe.set_cid(cid);
        self.admin.submit(&sqe)?;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        Ok(cid)
    }

    /// The next admin completion, if the controller posted one (the CQ head is rung).
    pub fn admin_poll(&mut self) -> Option<Cqe> {
        let c = self.admin.poll()?;
        self.admin.ack();
        Some(c)
    }

    /// Free admin submission slots.
    pub fn admin_free(&self) -> u16 {
        self.admin.free()
    }

    /// Submits an admin command; an error status is an error.
    pub fn admin(&mut self, sqe: Sqe) -> Result<Cqe, DriverError> {
        let c = self.admin_raw(sqe)?;
        if c.status().is_success() {
            Ok(c)
        } else {
            Err(DriverError::Command {
                opcode: sqe.opcode(),
                status: c.status(),
            })
        }
    }

    /// Identify `cns` for `nsid` into the page at bus address `buf`.
    pub fn identify(&mut self, cns: u8, nsid: u32, buf: u64) -> Result<(), DriverError> {
        let mut s = Sqe::new(admin::IDENTIFY, 0);
        s.set_nsid(nsid).set_prps(buf, 0).set_cdw(10, cns as u32);
        self.admin(s).map(|_| ())
    }

    /// Identify Controller into `buf`.
    pub fn identify_controller(&mut self, buf: u64) -> Result<(), DriverError> {
        self.identify(cns::CONTROLLER, 0, buf)
    }

    /// Asks for `n` I/O queue pairs; returns how many the controller granted (min of SQs, CQs).
    pub fn set_queue_count(&mut self, n: u16) -> Result<u16, DriverError> {
        let mut s = Sqe::new(admin::SET_FEATURES, 0);
        let v = (n - 1) as u32;
        s.set_cdw(10, feature::NUMBER_OF_QUEUES as u32)
            .set_cdw(11, v | v << 16);
        let c = self.admin(s)?;
        let sqs = (c.result() & 0xffff) as u16 + 1;
        let cqs = (c.result() >> 16) as u16 + 1;
        Ok(sqs.min(cqs))
    }

    /// Creates I/O queue pair `qid` over `mem` (CQ without interrupts, then SQ).
    ///
    /// # Safety
    /// As [`QueuePair::new`] for `mem`.
    pub unsafe fn create_io_queue(
        &mut self,
        qid: u16,
        mem: QueueMem,
    ) -> Result<QueuePair, DriverError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.create_io_queue_with(qid, mem, None) }
    }

    /// Creates I/O queue pair `qid` over `mem`; the CQ signals MSI-X `vector` when given.
    ///
    /// # Safety
    /// As [`QueuePair::new`] for `mem`.
    pub unsafe fn create_io_queue_with(
        &mut self,
        qid: u16,
        mem: QueueMem,
        vector: Option<u16>,
    ) -> Result<QueuePair, DriverError> {
        let size = (mem.entries as u32 - 1) << 16;
        let mut c = Sqe::new(admin::CREATE_CQ, 0);
        // Physically contiguous; IEN and IV when interrupts are wanted.
        let irq = vector.map_or(0, |v| 2 | (v as u32) << 16);
        c.set_prps(mem.cq_bus, 0)
            .set_cdw(10, size | qid as u32)
            .set_cdw(11, 1 | irq);
        self.admin(c)?;
        let mut s = Sqe::new(admin::CREATE_SQ, 0);
        s.set_prps(mem.sq_bus, 0)
            .set_cdw(10, size | qid as u32)
            .set_cdw(11, 1 | (qid as u32) << 16);
        self.admin(s)?;
        let dstrd = self.dstrd();
        let sq_db = self.platform.doorbell(regs::sq_tail_doorbell(qid, dstrd));
        let cq_db = self.platform.doorbell(regs::cq_head_doorbell(qid, dstrd));
        // SAFETY: forwarded from the caller.
        Ok(unsafe { QueuePair::new(qid, mem, sq_db, cq_db) })
    }

    /// Deletes I/O queue pair `qid` (SQ first, then CQ).
    pub fn delete_io_queue(&mut self, qid: u16) -> Result<(), DriverError> {
        let mut s = Sqe::new(admin::DELETE_SQ, 0);
        s.set_cdw(10, qid as u32);
        self.admin(s)?;
        let mut c = Sqe::new(admin::DELETE_CQ, 0);
        c.set_cdw(10, qid as u32);
        self.admin(c).map(|_| ())
    }

    /// Normal shutdown: CC.SHN = 01b, wait for CSTS.SHST = complete.
    pub fn shutdown(&mut self) -> Result<(), DriverError> {
        let v = self.platform.reg_read32(regs::CC);
        self.platform
            .reg_write32(regs::CC, (v & !(3 << 14)) | cc::SHN_NORMAL << 14);
        wait(
            &mut self.platform,
            self.timeout_us,
            "shutdown complete",
            |s| s & csts::SHST_MASK == csts::SHST_COMPLETE,
        )
    }
}

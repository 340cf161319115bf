//! The NVMe controller: register file, queues, admin and I/O command processing.
//!
//! The controller is driven by two parties: the vfio-user server thread (register accesses,
//! DMA mappings, interrupts) and the polling thread ([`Controller::poll`]), which reads the
//! doorbells the driver writes into the shared doorbell pages and processes new commands.
use std::{collections::BTreeMap, fs::File};

use nvme_spec::{
    identify,
    opcode::{admin, cns, feature, io, log},
    regs::{self, cap, cc, csts},
    Cqe, Sqe, Status, PAGE_SIZE,
};
use serde::Serialize;
use vfio_user_device::{ConfigSpace, Msix};

#[path = "controller_admin.rs"]
mod admin_commands;

use crate::{
    dma::DmaSpace,
    layout::{MAX_IO_QUEUES, MSIX_VECTORS},
    namespace::Namespace,
    prp::{self, PrpError},
    stats::Stats,
};

/// Maximum queue entries (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// MDTS: 2^5 pages = 128 KiB per command.
pub const MDTS: u8 = 5;
/// Largest transfer in bytes.
pub const MAX_TRANSFER: u64 = PAGE_SIZE << MDTS;
/// Commands taken from one submission queue per polling round (fairness between queues).
const BURST: usize = 64;
/// Outstanding Asynchronous Event Requests accepted (AERL + 1).
const AER_LIMIT: u32 = 4;

/// The doorbell pages: memory shared with the client (who maps it into the guest).
pub struct Doorbells {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed with volatile u32 operations
// at checked offsets.
unsafe impl Send for Doorbells {}

impl Doorbells {
    /// Maps `len` bytes of `memfd` at file offset `offset`.
    pub fn map(memfd: &File, offset: u64, len: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a memfd the caller owns; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Doorbells {
            base: p.cast(),
            len,
        })
    }

    /// Reads the doorbell at `off` bytes into the area (0 outside).
    pub fn read(&self, off: u64) -> u32 {
        if !off.is_multiple_of(4) || off + 4 > self.len as u64 {
            return 0;
        }
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.base.add(off as usize).cast::<u32>()) }
    }

    /// Writes the doorbell at `off` (ignored outside).
    pub fn write(&self, off: u64, v: u32) {
        if !off.is_multiple_of(4) || off + 4 > self.len as u64 {
            return;
        }
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::write_volatile(self.base.add(off as usize).cast::<u32>(), v) }
    }

    /// An atomic view of the word at `off` (None outside or unaligned).
    pub fn word(&self, off: u64) -> Option<&std::sync::atomic::AtomicU32> {
        if !off.is_multiple_of(4) || off + 4 > self.len as u64 {
            return None;
        }
        // SAFETY: aligned, inside the mapping, which lives as long as `self`; every access to
        // the shared page is volatile or atomic.
        Some(unsafe { std::sync::atomic::AtomicU32::from_ptr(self.base.add(off as usize).cast()) })
    }

    /// Zeroes every doorbell (not the wake protocol's words, [`crate::wake`], which live at
    /// the end of the first page: a sleeping poller or a client's flag survive a reset).
    pub fn clear(&self) {
        let keep = (crate::wake::PROTOCOL_START as usize)..4096;
        for (start, end) in [
            (0, keep.start.min(self.len)),
            (keep.end.min(self.len), self.len),
        ] {
            // SAFETY: [start, end) is inside the mapping, which is ours.
            unsafe { std::ptr::write_bytes(self.base.add(start), 0, end - start) }
        }
    }
}

impl Drop for Doorbells {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this address and length.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[derive(Clone, Copy, Debug)]
struct Sq {
    base: u64,
    entries: u16,
    cqid: u16,
    head: u16,
    bad_tail: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    ien: bool,
    vector: u16,
    bad_head: Option<u32>,
}

impl Cq {
    fn full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }
}

/// The controller's externally visible state, for logs and tests.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ControllerState {
    /// CC.
    pub cc: u32,
    /// CSTS.
    pub csts: u32,
    /// Live I/O submission queues.
    pub io_sqs: Vec<u16>,
    /// Live I/O completion queues.
    pub io_cqs: Vec<u16>,
}

/// One NVMe controller with one namespace.
pub struct Controller {
    cap: u64,
    dstrd: u8,
    regs: [u8; 0x40],
    csts: u32,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    features: BTreeMap<u8, u32>,
    aers: u32,
    ns: Namespace,
    /// DMA regions the client mapped.
    pub dma: DmaSpace,
    doorbells: Doorbells,
    msix: Msix,
    /// PCI configuration space.
    pub config: ConfigSpace,
    buf: Vec<u8>,
    /// Counters.
    pub stats: Stats,
}

fn queue_count() -> usize {
    MAX_IO_QUEUES as usize + 1
}

impl Controller {
    /// A controller in reset state over `ns`, with doorbells in `doorbells` and stride `dstrd`.
    pub fn new(ns: Namespace, doorbells: Doorbells, dstrd: u8) -> Self {
        Controller {
            cap: cap::new((MAX_QUEUE_ENTRIES - 1) as u16, dstrd, 10),
            dstrd,
            regs: [0; 0x40],
            csts: 0,
            sqs: vec![None; queue_count()],
            cqs: vec![None; queue_count()],
            features: BTreeMap::new(),
            aers: 0,
            ns,
            dma: DmaSpace::default(),
            doorbells,
            msix: Msix::new(crate::layout::MSIX_TABLE, MSIX_VECTORS),
            config: crate::layout::config_space(),
            buf: vec![0; MAX_TRANSFER as usize],
            stats: Stats::default(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    fn reg32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.regs[off..off + 4].try_into().unwrap_or([0; 4]))
    }

    fn reg64(&self, off: usize) -> u64 {
        self.reg32(off) as u64 | (self.reg32(off + 4) as u64) << 32
    }

    /// CC.
    pub fn cc(&self) -> u32 {
        self.reg32(regs::CC as usize)
    }

    /// CSTS.
    pub fn csts(&self) -> u32 {
        self.csts
    }

    /// A summary of the state.
    pub fn state(&self) -> ControllerState {
        fn live<T>(v: &[Option<T>]) -> Vec<u16> {
            (1..v.len())
                .filter(|&i| v[i].is_some())
                .map(|i| i as u16)
                .collect()
        }
        ControllerState {
            cc: self.cc(),
            csts: self.csts,
            io_sqs: live(&self.sqs),
            io_cqs: live(&self.cqs),
        }
    }

    /// Reads BAR0 at `offset`: registers, doorbells, MSI-X table and PBA; anything else reads 0.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut image = self.regs;
        image[0..8].copy_from_slice(&self.cap.to_le_bytes());
        image[8..12].copy_from_slice(&regs::VERSION_1_4.to_le_bytes());
        image[0x1c..0x20].copy_from_slice(&self.csts.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                return;
            };
            *d = if o < image.len() as u64 {
                image[o as usize]
            } else if (crate::layout::DOORBELL_AREA
                ..crate::layout::DOORBELL_AREA + crate::layout::DOORBELL_AREA_SIZE)
                .contains(&o)
            {
                let rel = o - crate::layout::DOORBELL_AREA;
                self.doorbells.read(rel & !3).to_le_bytes()[(rel & 3) as usize]
            } else {
                self.msix.byte(o).unwrap_or(0)
            };
        }
    }

    /// Writes BAR0 at `offset`.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        let (db0, dbn) = (
            crate::layout::DOORBELL_AREA,
            crate::layout::DOORBELL_AREA + crate::layout::DOORBELL_AREA_SIZE,
        );
        if offset >= db0 && end <= dbn {
            // The wake protocol's words are not doorbells: a client cannot forge them.
            let protocol = offset - db0 >= crate::wake::PROTOCOL_START && offset - db0 < 4096;
            if data.len() == 4 && offset.is_multiple_of(4) && !protocol {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.doorbells.write(offset - db0, v);
            }
            return;
        }
        if self.msix.write(offset, data) {
            return;
        }
        let old_cc = self.cc();
        let mut touched_cc = false;
        for (i, &v) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            let writable =
                (regs::CC..regs::CC + 4).contains(&o) || (regs::AQA..regs::ACQ + 8).contains(&o);
            if writable {
                self.regs[o as usize] = v;
                touched_cc |= (regs::CC..regs::CC + 4).contains(&o);
            }
        }
        if touched_cc {
            self.cc_changed(old_cc, self.cc());
        }
    }

    fn cc_changed(&mut self, old: u32, new: u32) {
        let was = old & cc::EN != 0;
        let is = new & cc::EN != 0;
        if was && !is {
            tracing::info!("controller reset (CC.EN 1 -> 0)");
            self.reset();
            return;
        }
        if !was && is {
            self.enable();
        }
        if is && cc::shn(new) != cc::SHN_NONE && cc::shn(old) == cc::SHN_NONE {
            tracing::info!(
                abrupt = cc::shn(new) == cc::SHN_ABRUPT,
                "controller shutdown"
            );
            self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_OCCURRING;
            self.stop_queues();
            if let Err(e) = self.ns.flush() {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "flushing the backing file at shutdown"
                );
            }
            self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
            self.stats.shutdowns += 1;
        }
    }

    fn enable(&mut self) {
        let aqa = self.reg32(regs::AQA as usize);
        let (asq, acq) = (
            self.reg64(regs::ASQ as usize),
            self.reg64(regs::ACQ as usize),
        );
        let (sqn, cqn) = (regs::aqa::sq_entries(aqa), regs::aqa::cq_entries(aqa));
        let cc = self.cc();
        if cc::mps(cc) != 0
            || sqn < 2
            || cqn < 2
            || sqn > MAX_QUEUE_ENTRIES
            || cqn > MAX_QUEUE_ENTRIES
            || asq % PAGE_SIZE != 0
            || acq % PAGE_SIZE != 0
        {
            tracing::warn!(
                cc = format_args!("{cc:#x}"),
                aqa = format_args!("{aqa:#x}"),
                asq = format_args!("{asq:#x}"),
                acq = format_args!("{acq:#x}"),
                "enable with an invalid admin queue configuration"
            );
            self.fatal();
            return;
        }
        self.doorbells.clear();
        self.cqs[0] = Some(Cq {
            base: acq,
            entries: cqn as u16,
            tail: 0,
            head: 0,
            phase: true,
            ien: true,
            vector: 0,
            bad_head: None,
        });
        self.sqs[0] = Some(Sq {
            base: asq,
            entries: sqn as u16,
            cqid: 0,
            head: 0,
            bad_tail: None,
        });
        self.csts = csts::RDY;
        self.stats.enables += 1;
        tracing::info!(
            asq = format_args!("{asq:#x}"),
            acq = format_args!("{acq:#x}"),
            sqn,
            cqn,
            "controller enabled"
        );
    }

    fn stop_queues(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.aers = 0;
    }

    /// Controller reset: queues gone, registers and features back to their defaults.
    pub fn reset(&mut self) {
        self.stop_queues();
        self.features.clear();
        self.regs = [0; 0x40];
        self.csts = 0;
        self.doorbells.clear();
        self.stats.resets += 1;
    }

    /// The client went away: reset, forget its memory and interrupts.
    pub fn disconnect(&mut self) {
        self.reset();
        self.dma.clear();
        self.msix.reset();
        self.config = crate::layout::config_space();
    }

    fn fatal(&mut self) {
        self.csts |= csts::CFS;
        self.stats.fatal += 1;
        tracing::error!("controller fatal status set");
    }

    /// Installs interrupt eventfds for MSI-X vectors `start..start + fds.len()` (none: clear
    /// `count` vectors). Out-of-range vectors are refused.
    pub fn set_msix(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool {
        self.msix.set_eventfds(start, count, fds)
    }

    fn signal(&mut self, vector: u16) {
        if self.msix.signal(vector, self.config.msix_enabled()) {
            self.stats.interrupts += 1;
        }
    }

    fn db_offset(&self, qid: u16, cq: bool) -> u64 {
        let o = if cq {
            regs::cq_head_doorbell(qid, self.dstrd)
        } else {
            regs::sq_tail_doorbell(qid, self.dstrd)
        };
        o - crate::layout::DOORBELL_AREA
    }

    /// One polling round: picks up CQ head and SQ tail doorbells and processes new commands.
    /// Returns the number of commands processed.
    pub fn poll(&mut self) -> usize {
        self.poll_burst(BURST)
    }

    /// [`Controller::poll`] taking at most `burst` commands from each submission queue (a
    /// polling thread that hands its core to the shadow engine between rounds takes fewer, so
    /// that the completions reach the guest, and its next submissions the device, while the
    /// device works on the rest).
    pub fn poll_burst(&mut self, burst: usize) -> usize {
        if self.csts & csts::RDY == 0 || self.csts & (csts::CFS | csts::SHST_MASK) != 0 {
            return 0;
        }
        // Only live queues' doorbells are read: with DSTRD 9 each sits on its own page, and
        // touching 64 pages per round costs more than the rest of an idle round.
        for qid in 0..queue_count() {
            if self.cqs[qid].is_none() {
                continue;
            }
            let off = self.db_offset(qid as u16, true);
            let v = self.doorbells.read(off);
            let Some(cq) = self.cqs[qid].as_mut() else {
                continue;
            };
            if v < cq.entries as u32 {
                cq.head = v as u16;
                cq.bad_head = None;
            } else if cq.bad_head != Some(v) {
                cq.bad_head = Some(v);
                self.stats.bad_doorbells += 1;
                tracing::warn!(qid, value = v, "CQ head doorbell out of range: ignored");
            }
        }
        let mut done = 0;
        let mut irq = [false; MSIX_VECTORS as usize];
        for qid in 0..queue_count() {
            if self.sqs[qid].is_none() {
                continue;
            }
            let off = self.db_offset(qid as u16, false);
            let tail = self.doorbells.read(off);
            let Some(sq) = self.sqs[qid].as_mut() else {
                continue;
            };
            if tail >= sq.entries as u32 {
                if sq.bad_tail != Some(tail) {
                    sq.bad_tail = Some(tail);
                    self.stats.bad_doorbells += 1;
                    tracing::warn!(qid, value = tail, "SQ tail doorbell out of range: ignored");
                }
                continue;
            }
            sq.bad_tail = None;
            for _ in 0..burst.clamp(1, BURST) {
                let Some(sq) = self.sqs[qid] else { break };
                if sq.head as u32 == tail {
                    break;
                }
                let Some(cq) = self.cqs[sq.cqid as usize] else {
                    break;
                };
                if cq.full() {
                    break;
                }
                let mut raw = [0u8; 64];
                if let Err(e) = self.dma.read(sq.base + sq.head as u64 * 64, &mut raw) {
                    tracing::error!(
                        qid,
                        error = &e as &dyn std::error::Error,
                        "cannot fetch a submission entry"
                    );
                    self.fatal();
                    return done;
                }
                let sqe = Sqe::from_bytes(&raw);
                let head = (sq.head + 1) % sq.entries;
                if let Some(s) = self.sqs[qid].as_mut() {
                    s.head = head;
                }
                let outcome = if qid == 0 {
                    self.admin(&sqe)
                } else {
                    Some((0, self.io(&sqe)))
                };
                done += 1;
                let Some((result, status)) = outcome else {
                    continue;
                };
                // The queue may have been deleted by this very command (admin queue only
                // deletes I/O queues, so sq 0 and cq 0 stay).
                let cqid = sq.cqid as usize;
                if let Some(v) = self.post(cqid, result, head, qid as u16, sqe.cid(), status) {
                    irq[v as usize] = true;
                }
                if self.csts & csts::CFS != 0 {
                    return done;
                }
            }
        }
        for (v, fire) in irq.iter().enumerate() {
            if *fire {
                self.signal(v as u16);
            }
        }
        done
    }

    /// Posts a completion on `cqid`; returns the vector to signal.
    fn post(
        &mut self,
        cqid: usize,
        result: u32,
        sq_head: u16,
        sqid: u16,
        cid: u16,
        status: Status,
    ) -> Option<u16> {
        let cq = self.cqs.get_mut(cqid)?.as_mut()?;
        let cqe = Cqe::new(result, sq_head, sqid, cid, status, cq.phase);
        let addr = cq.base + cq.tail as u64 * 16;
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let vector = cq.ien.then_some(cq.vector);
        if let Err(e) = self.dma.write_cqe(addr, &cqe.to_bytes()) {
            tracing::error!(
                cqid,
                error = &e as &dyn std::error::Error,
                "cannot post a completion"
            );
            self.fatal();
            return None;
        }
        vector
    }

    fn transfer_out(&mut self, prp1: u64, prp2: u64, data_len: usize) -> Status {
        let dma = &self.dma;
        let segs = match prp::walk(prp1, prp2, data_len as u64, MAX_TRANSFER, |a| {
            let mut b = [0u8; 8];
            dma.read(a, &mut b).map(|_| u64::from_le_bytes(b))
        }) {
            Ok(s) => s,
            Err(e) => return self.prp_failed(e),
        };
        let mut off = 0usize;
        for s in segs {
            let n = s.len as usize;
            if let Err(e) = self.dma.write(s.iova, &self.buf[off..off + n]) {
                tracing::debug!(error = &e as &dyn std::error::Error, "DMA write refused");
                self.stats.dma_errors += 1;
                return Status::DATA_TRANSFER_ERROR;
            }
            off += n;
        }
        Status::SUCCESS
    }

    fn transfer_in(&mut self, prp1: u64, prp2: u64, data_len: usize) -> Status {
        let dma = &self.dma;
        let segs = match prp::walk(prp1, prp2, data_len as u64, MAX_TRANSFER, |a| {
            let mut b = [0u8; 8];
            dma.read(a, &mut b).map(|_| u64::from_le_bytes(b))
        }) {
            Ok(s) => s,
            Err(e) => return self.prp_failed(e),
        };
        let mut off = 0usize;
        for s in segs {
            let n = s.len as usize;
            if let Err(e) = self.dma.read(s.iova, &mut self.buf[off..off + n]) {
                tracing::debug!(error = &e as &dyn std::error::Error, "DMA read refused");
                self.stats.dma_errors += 1;
                return Status::DATA_TRANSFER_ERROR;
            }
            off += n;
        }
        Status::SUCCESS
    }

    fn prp_failed(&mut self, e: PrpError) -> Status {
        tracing::debug!(error = &e as &dyn std::error::Error, "bad PRPs");
        match e {
            PrpError::List(_) => self.stats.dma_errors += 1,
            _ => self.stats.prp_errors += 1,
        }
        e.status()
    }

    fn io(&mut self, sqe: &Sqe) -> Status {
        let st = self.io_inner(sqe);
        if !st.is_success() {
            self.stats.io_errors += 1;
        }
        st
    }

    fn io_inner(&mut self, sqe: &Sqe) -> Status {
        if sqe.fuse() != 0 || sqe.psdt() != 0 {
            return Status::INVALID_FIELD;
        }
        match sqe.opcode() {
            io::FLUSH => {
                if sqe.nsid() != 1 && sqe.nsid() != 0xffff_ffff {
                    return Status::INVALID_NAMESPACE;
                }
                self.stats.flushes += 1;
                match self.ns.flush() {
                    Ok(()) => Status::SUCCESS,
                    Err(e) => {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            "flush of the backing file failed"
                        );
                        Status::INTERNAL_ERROR
                    }
                }
            }
            io::READ | io::WRITE => {
                if sqe.nsid() != 1 {
                    return Status::INVALID_NAMESPACE;
                }
                let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
                if !self.ns.in_range(slba, nlb) {
                    return Status::LBA_OUT_OF_RANGE;
                }
                let len = nlb * self.ns.block_size() as u64;
                if len > MAX_TRANSFER {
                    return Status::INVALID_FIELD;
                }
                let len = len as usize;
                if sqe.opcode() == io::READ {
                    self.stats.reads += 1;
                    if let Err(e) = self.ns.read(slba, &mut self.buf[..len]) {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            slba,
                            "backing file read failed"
                        );
                        return Status::INTERNAL_ERROR;
                    }
                    let st = self.transfer_out(sqe.prp1(), sqe.prp2(), len);
                    if st.is_success() {
                        self.stats.bytes_read += len as u64;
                    }
                    st
                } else {
                    self.stats.writes += 1;
                    let st = self.transfer_in(sqe.prp1(), sqe.prp2(), len);
                    if !st.is_success() {
                        return st;
                    }
                    if let Err(e) = self.ns.write(slba, &self.buf[..len]) {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            slba,
                            "backing file write failed"
                        );
                        return Status::INTERNAL_ERROR;
                    }
                    self.stats.bytes_written += len as u64;
                    Status::SUCCESS
                }
            }
            _ => Status::INVALID_OPCODE,
        }
    }
}

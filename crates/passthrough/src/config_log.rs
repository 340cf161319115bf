//! Admin queue mediation and the configuration log.
//!
//! The admin doorbells are trapped: before a new admin SQ tail reaches the device, the VMM
//! reads the new submission entries from guest RAM (bounds and indexes checked) and remembers
//! them by command id; when the guest advances the admin CQ head, the VMM reads the
//! completions it consumed and applies the successful ones to the log. Together with the
//! controller registers (CC, AQA, ASQ, ACQ) this is what a fresh device needs to be rebuilt.
//! Nothing here changes what the guest or the device sees.
use std::{collections::BTreeMap, ops::Range};

use nvme_spec::{
    opcode::admin,
    regs::{self, aqa, cc},
    Cqe, Sqe,
};
use serde::{Deserialize, Serialize};

use crate::StateError;

/// History entries kept (oldest dropped first).
pub const HISTORY: usize = 256;
/// Largest I/O queue id Ferry restores; also the most I/O SQs (and CQs) a log may hold.
pub const MAX_IO_QUEUES: u16 = 1024;
/// Largest admin queue NVMe allows (AQA's 12-bit fields).
pub const MAX_ADMIN_ENTRIES: u32 = 4096;
/// Largest counter accepted from another host (counters keep counting up from it).
pub const MAX_COUNTER: u64 = 1 << 56;
/// Most namespaces a log from another host may describe.
pub const MAX_NAMESPACES: usize = 1024;
const PAGE: u64 = 4096;

/// The first of `counters` above [`MAX_COUNTER`] (a counter from another host that would
/// overflow when counting on).
pub fn counter_too_large<const N: usize>(
    counters: [(&'static str, u64); N],
) -> Option<(&'static str, u64)> {
    counters.into_iter().find(|&(_, v)| v > MAX_COUNTER)
}

/// What device state from another host must fit: this VM's RAM and this host's device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreBounds {
    /// Guest RAM regions (guest-physical start..end).
    pub ram: Vec<Range<u64>>,
    /// Largest queue the device takes (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// MSI-X vectors of the device.
    pub msix_vectors: usize,
    /// Doorbell stride exponent of the device (CAP.DSTRD).
    pub dstrd: u8,
    /// BAR0 size in bytes.
    pub bar0_size: u64,
}

impl RestoreBounds {
    /// True when `[base, base + len)` is page aligned, does not overflow and lies inside one
    /// RAM region.
    pub fn ring_in_ram(&self, base: u64, len: u64) -> bool {
        base.is_multiple_of(PAGE)
            && base
                .checked_add(len)
                .is_some_and(|end| self.ram.iter().any(|r| base >= r.start && end <= r.end))
    }
}

/// A live I/O completion queue.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CqConfig {
    /// Guest-physical base.
    pub base: u64,
    /// Entries.
    pub entries: u32,
    /// Interrupts enabled.
    pub interrupts: bool,
    /// MSI-X vector.
    pub vector: u16,
}

/// A live I/O submission queue.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SqConfig {
    /// Guest-physical base.
    pub base: u64,
    /// Entries.
    pub entries: u32,
    /// Completion queue.
    pub cqid: u16,
    /// Priority (CDW11 bits 2:1).
    pub priority: u8,
}

/// One admin command as the VMM saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminRecord {
    /// Opcode.
    pub opcode: u8,
    /// Command id.
    pub cid: u16,
    /// CDW10.
    pub cdw10: u32,
    /// CDW11.
    pub cdw11: u32,
    /// Completion status field (None until completed).
    pub status: Option<u16>,
    /// Completion DW0.
    pub result: u32,
}

/// A namespace as the device describes it (the hypervisor's own Identify Namespace).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Logical block size in bytes (from FLBAS and its LBA format).
    pub block_size: u32,
    /// Size in blocks (NSZE).
    pub blocks: u64,
}

/// The configuration log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigLog {
    /// Last CC written.
    pub cc: u32,
    /// AQA.
    pub aqa: u32,
    /// ASQ.
    pub asq: u64,
    /// ACQ.
    pub acq: u64,
    /// Controller enables seen.
    pub enables: u64,
    /// Controller resets seen (CC.EN 1 → 0).
    pub resets: u64,
    /// Shutdown notifications seen.
    pub shutdowns: u64,
    /// Features set successfully: feature id → CDW11.
    pub features: BTreeMap<u8, u32>,
    /// Number of Queues as granted by the device (completion DW0).
    pub queues_granted: Option<u32>,
    /// Live I/O completion queues.
    pub io_cqs: BTreeMap<u16, CqConfig>,
    /// Live I/O submission queues.
    pub io_sqs: BTreeMap<u16, SqConfig>,
    /// The device's namespaces as the hypervisor's own Identify found them (filled in by the
    /// attachment; never read from guest RAM, which the guest can rewrite): the shadow
    /// engine's validator needs the block size.
    pub namespaces: BTreeMap<u32, NamespaceInfo>,
    /// MDTS from the hypervisor's own Identify Controller (None until filled in).
    pub mdts: Option<u8>,
    /// Admin commands submitted.
    pub admin_submitted: u64,
    /// Admin commands completed.
    pub admin_completed: u64,
    /// Admin commands completed with an error status.
    pub admin_failed: u64,
    /// Admin doorbell writes with out-of-range values, or entries that could not be read.
    pub anomalies: u64,
    /// The last admin commands.
    pub history: Vec<AdminRecord>,
}

impl ConfigLog {
    /// Checks a log from another host, and the guest's admin queue positions (SQ tail, CQ
    /// head) sent with it, against `b` before anything is replayed from it: queue ids unique
    /// (map keys) and in range, sizes within NVMe's and the device's maximums, rings page
    /// aligned inside guest RAM without overflow, SQs completing into existing CQs, vectors
    /// the device has, lists bounded.
    pub fn validate(&self, admin: (u32, u32), b: &RestoreBounds) -> Result<(), StateError> {
        let (sq, cq) = (aqa::sq_entries(self.aqa), aqa::cq_entries(self.aqa));
        let max_admin = MAX_ADMIN_ENTRIES.min(b.max_queue_entries);
        if !(2..=max_admin).contains(&sq) || !(2..=max_admin).contains(&cq) {
            return Err(StateError::AdminSize {
                aqa: self.aqa,
                sq,
                cq,
                max: max_admin,
            });
        }
        for (ring, base, len) in [
            ("SQ", self.asq, sq as u64 * 64),
            ("CQ", self.acq, cq as u64 * 16),
        ] {
            if !b.ring_in_ram(base, len) {
                return Err(StateError::AdminRing { ring, base, len });
            }
        }
        let (sq_tail, cq_head) = admin;
        if sq_tail >= sq || cq_head >= cq {
            return Err(StateError::AdminPositions {
                sq_tail,
                cq_head,
                sq,
                cq,
            });
        }
        let max = MAX_IO_QUEUES as usize;
        for (kind, count) in [("CQ", self.io_cqs.len()), ("SQ", self.io_sqs.len())] {
            if count > max {
                return Err(StateError::TooManyQueues { kind, count, max });
            }
        }
        let check = |kind: &'static str, qid: u16, base: u64, entries: u32, entry: u64| {
            if !(1..=MAX_IO_QUEUES).contains(&qid) {
                return Err(StateError::QueueId {
                    kind,
                    qid,
                    max: MAX_IO_QUEUES,
                });
            }
            if !(2..=b.max_queue_entries).contains(&entries) {
                return Err(StateError::QueueSize {
                    kind,
                    qid,
                    entries,
                    max: b.max_queue_entries,
                });
            }
            let len = entries as u64 * entry;
            if !b.ring_in_ram(base, len) {
                return Err(StateError::QueueRing {
                    kind,
                    qid,
                    base,
                    len,
                });
            }
            Ok(())
        };
        for (&qid, c) in &self.io_cqs {
            check("CQ", qid, c.base, c.entries, 16)?;
            if c.interrupts && c.vector as usize >= b.msix_vectors {
                return Err(StateError::Vector {
                    qid,
                    vector: c.vector,
                    count: b.msix_vectors,
                });
            }
        }
        for (&qid, q) in &self.io_sqs {
            check("SQ", qid, q.base, q.entries, 64)?;
            if !self.io_cqs.contains_key(&q.cqid) {
                return Err(StateError::MissingCq { qid, cqid: q.cqid });
            }
        }
        for (what, count, max) in [
            ("the admin history", self.history.len(), HISTORY),
            ("the namespace list", self.namespaces.len(), MAX_NAMESPACES),
        ] {
            if count > max {
                return Err(StateError::TooLong { what, count, max });
            }
        }
        if let Some((what, value)) = counter_too_large([
            ("enables", self.enables),
            ("resets", self.resets),
            ("shutdowns", self.shutdowns),
            ("admin_submitted", self.admin_submitted),
            ("admin_completed", self.admin_completed),
            ("admin_failed", self.admin_failed),
            ("anomalies", self.anomalies),
        ]) {
            return Err(StateError::Counter {
                what,
                value,
                max: MAX_COUNTER,
            });
        }
        for (&nsid, ns) in &self.namespaces {
            if !ns.block_size.is_power_of_two() || !(512..=65536).contains(&ns.block_size) {
                return Err(StateError::BlockSize {
                    nsid,
                    block_size: ns.block_size,
                });
            }
        }
        Ok(())
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        format!(
            "CC {:#x}, admin queue {} entries at {:#x}, {} I/O SQ / {} I/O CQ live, {} feature(s) set, {} admin command(s) ({} failed), {} enable(s), {} reset(s)",
            self.cc,
            aqa::sq_entries(self.aqa),
            self.asq,
            self.io_sqs.len(),
            self.io_cqs.len(),
            self.features.len(),
            self.admin_completed,
            self.admin_failed,
            self.enables,
            self.resets
        )
    }
}

/// The mediation state machine.
#[derive(Debug)]
pub struct AdminMediator {
    /// The log.
    pub log: ConfigLog,
    regs: [u8; 0x40],
    enabled: bool,
    sq_tail: u32,
    cq_head: u32,
    pending: BTreeMap<u16, Sqe>,
    /// Guest pages the device wrote for completed admin commands (Identify, Get Log Page, …):
    /// KVM's dirty log does not see them.
    device_written: std::collections::BTreeSet<u64>,
}

/// Most distinct admin data pages remembered between two [`AdminMediator::take_device_written`].
const MAX_ADMIN_DIRTY: usize = 1 << 16;

impl Default for AdminMediator {
    fn default() -> Self {
        AdminMediator {
            log: ConfigLog::default(),
            regs: [0; 0x40],
            enabled: false,
            sq_tail: 0,
            cq_head: 0,
            pending: BTreeMap::new(),
            device_written: std::collections::BTreeSet::new(),
        }
    }
}

impl AdminMediator {
    fn reg32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    fn reg64(&self, off: u64) -> u64 {
        self.reg32(off) as u64 | (self.reg32(off + 4) as u64) << 32
    }

    /// The guest's admin queue positions the mediation follows: (SQ tail read up to, CQ head).
    pub fn positions(&self) -> (u32, u32) {
        (self.sq_tail, self.cq_head)
    }

    /// Takes over a log and positions from another host (migration destination): the
    /// registers the guest programmed, the queues, and where the admin queue stands.
    pub fn adopt(&mut self, log: ConfigLog, sq_tail: u32, cq_head: u32) {
        let put = |regs: &mut [u8; 0x40], off: u64, b: &[u8]| {
            regs[off as usize..off as usize + b.len()].copy_from_slice(b);
        };
        put(&mut self.regs, regs::CC, &log.cc.to_le_bytes());
        put(&mut self.regs, regs::AQA, &log.aqa.to_le_bytes());
        put(&mut self.regs, regs::ASQ, &log.asq.to_le_bytes());
        put(&mut self.regs, regs::ACQ, &log.acq.to_le_bytes());
        self.enabled = log.cc & cc::EN != 0;
        self.sq_tail = sq_tail;
        self.cq_head = cq_head;
        self.pending.clear();
        self.log = log;
    }

    /// Admin commands submitted and not completed yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Pending admin commands the device has not completed yet: those without a completion
    /// posted (by phase) after the guest's CQ head. `read` reads guest memory.
    pub fn unanswered(&self, mut read: impl FnMut(u64, &mut [u8]) -> bool) -> usize {
        let entries = aqa::cq_entries(self.log.aqa);
        if !self.enabled || self.pending.is_empty() || entries < 2 || self.cq_head >= entries {
            return self.pending.len();
        }
        let mut entry = |i: u32| -> Option<Cqe> {
            let mut raw = [0u8; 16];
            read(self.log.acq.wrapping_add(i as u64 * 16), &mut raw).then(|| Cqe::from_bytes(&raw))
        };
        // The first unconsumed entry's phase follows from the last consumed one.
        let last = if self.cq_head == 0 {
            entries - 1
        } else {
            self.cq_head - 1
        };
        let Some(prev) = entry(last) else {
            return self.pending.len();
        };
        let mut phase = if self.cq_head == 0 {
            !prev.phase()
        } else {
            prev.phase()
        };
        let (mut j, mut answered) = (self.cq_head, 0);
        for _ in 0..entries - 1 {
            match entry(j) {
                Some(c) if c.phase() == phase => {
                    if self.pending.contains_key(&c.cid()) {
                        answered += 1;
                    }
                }
                _ => break,
            }
            j = (j + 1) % entries;
            if j == 0 {
                phase = !phase;
            }
        }
        self.pending.len().saturating_sub(answered)
    }

    /// A guest write to the register page (before it is forwarded).
    pub fn register_write(&mut self, offset: u64, data: &[u8]) {
        let old_cc = self.reg32(regs::CC);
        let mut cc_touched = false;
        for (i, &b) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            if o < self.regs.len() as u64 {
                self.regs[o as usize] = b;
                cc_touched |= (regs::CC..regs::CC + 4).contains(&o);
            }
        }
        self.log.aqa = self.reg32(regs::AQA);
        self.log.asq = self.reg64(regs::ASQ);
        self.log.acq = self.reg64(regs::ACQ);
        if !cc_touched {
            return;
        }
        let new = self.reg32(regs::CC);
        self.log.cc = new;
        let (was, is) = (old_cc & cc::EN != 0, new & cc::EN != 0);
        if was && !is {
            self.log.resets += 1;
            self.clear_queues();
            self.log.features.clear();
            self.log.queues_granted = None;
            self.enabled = false;
        } else if !was && is {
            self.log.enables += 1;
            self.clear_queues();
            self.enabled = true;
        }
        if is && cc::shn(new) != 0 && cc::shn(old_cc) == 0 {
            self.log.shutdowns += 1;
        }
    }

    fn clear_queues(&mut self) {
        self.log.io_cqs.clear();
        self.log.io_sqs.clear();
        self.pending.clear();
        self.sq_tail = 0;
        self.cq_head = 0;
    }

    /// The guest wrote `tail` to the admin SQ tail doorbell; `read` copies guest RAM.
    pub fn sq_tail_write(&mut self, tail: u32, mut read: impl FnMut(u64, &mut [u8]) -> bool) {
        let entries = aqa::sq_entries(self.log.aqa);
        if !self.enabled || tail >= entries {
            self.log.anomalies += 1;
            return;
        }
        let mut i = self.sq_tail;
        let mut n = 0;
        while i != tail && n < entries {
            let mut raw = [0u8; 64];
            if read(self.log.asq.wrapping_add(i as u64 * 64), &mut raw) {
                let sqe = Sqe::from_bytes(&raw);
                self.log.admin_submitted += 1;
                if self.pending.len() < entries as usize {
                    self.pending.insert(sqe.cid(), sqe);
                }
                self.push_history(AdminRecord {
                    opcode: sqe.opcode(),
                    cid: sqe.cid(),
                    cdw10: sqe.cdw(10),
                    cdw11: sqe.cdw(11),
                    status: None,
                    result: 0,
                });
            } else {
                self.log.anomalies += 1;
            }
            i = (i + 1) % entries;
            n += 1;
        }
        self.sq_tail = tail;
    }

    fn push_history(&mut self, r: AdminRecord) {
        if self.log.history.len() >= HISTORY {
            self.log.history.remove(0);
        }
        self.log.history.push(r);
    }

    /// The guest wrote `head` to the admin CQ head doorbell: the completions it consumed are
    /// applied to the log.
    pub fn cq_head_write(&mut self, head: u32, mut read: impl FnMut(u64, &mut [u8]) -> bool) {
        let entries = aqa::cq_entries(self.log.aqa);
        if !self.enabled || head >= entries {
            self.log.anomalies += 1;
            return;
        }
        let mut j = self.cq_head;
        let mut n = 0;
        while j != head && n < entries {
            let mut raw = [0u8; 16];
            let at = self.log.acq.wrapping_add(j as u64 * 16);
            // The device wrote this completion entry: KVM's dirty log did not see it either.
            if self.device_written.len() < MAX_ADMIN_DIRTY {
                self.device_written.insert(at & !0xfff);
            }
            if read(at, &mut raw) {
                self.complete(Cqe::from_bytes(&raw), &mut read);
            } else {
                self.log.anomalies += 1;
            }
            j = (j + 1) % entries;
            n += 1;
        }
        self.cq_head = head;
    }

    /// Pages the device wrote for admin commands completed since the last call: their data
    /// and the completion queue entries.
    pub fn take_device_written(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.device_written)
            .into_iter()
            .collect()
    }

    /// Records the guest pages a controller-to-host admin command had the device write.
    fn note_data_in(&mut self, sqe: &Sqe, read: &mut impl FnMut(u64, &mut [u8]) -> bool) {
        // Data direction is in the opcode's low bits: 10b = controller to host.
        if sqe.opcode() & 3 != 2 || sqe.psdt() != 0 {
            return;
        }
        let len: u64 = match sqe.opcode() {
            admin::GET_LOG_PAGE => {
                let dwords = ((sqe.cdw(11) & 0xffff) << 16 | sqe.cdw(10) >> 16) as u64 + 1;
                (dwords * 4).min(1 << 20)
            }
            _ => 4096,
        };
        const PAGE: u64 = 4096;
        let (prp1, prp2) = (sqe.prp1(), sqe.prp2());
        let total = (prp1 % PAGE + len).div_ceil(PAGE);
        let mut pages = vec![prp1 & !(PAGE - 1)];
        match total {
            0 | 1 => {}
            2 => pages.push(prp2 & !(PAGE - 1)),
            n => {
                // The list's first page (at most 512 entries; admin transfers are small).
                let count = (n - 1).min((PAGE - prp2 % PAGE) / 8) as usize;
                let mut raw = vec![0u8; count * 8];
                if read(prp2, &mut raw) {
                    pages.extend(
                        raw.chunks_exact(8).map(|c| {
                            u64::from_le_bytes(c.try_into().expect("8 bytes")) & !(PAGE - 1)
                        }),
                    );
                }
            }
        }
        for p in pages {
            if self.device_written.len() < MAX_ADMIN_DIRTY {
                self.device_written.insert(p);
            } else {
                self.log.anomalies += 1;
            }
        }
    }

    fn complete(&mut self, cqe: Cqe, read: &mut impl FnMut(u64, &mut [u8]) -> bool) {
        let Some(sqe) = self.pending.remove(&cqe.cid()) else {
            self.log.anomalies += 1;
            return;
        };
        self.log.admin_completed += 1;
        self.note_data_in(&sqe, read);
        let ok = cqe.status().is_success();
        if let Some(h) = self
            .log
            .history
            .iter_mut()
            .rev()
            .find(|h| h.cid == sqe.cid() && h.status.is_none())
        {
            h.status = Some(cqe.status().0);
            h.result = cqe.result();
        }
        if !ok {
            self.log.admin_failed += 1;
            return;
        }
        let qid = sqe.cdw(10) as u16;
        let entries = (sqe.cdw(10) >> 16) + 1;
        match sqe.opcode() {
            admin::CREATE_CQ => {
                self.log.io_cqs.insert(
                    qid,
                    CqConfig {
                        base: sqe.prp1(),
                        entries,
                        interrupts: sqe.cdw(11) & 2 != 0,
                        vector: (sqe.cdw(11) >> 16) as u16,
                    },
                );
            }
            admin::CREATE_SQ => {
                self.log.io_sqs.insert(
                    qid,
                    SqConfig {
                        base: sqe.prp1(),
                        entries,
                        cqid: (sqe.cdw(11) >> 16) as u16,
                        priority: ((sqe.cdw(11) >> 1) & 3) as u8,
                    },
                );
            }
            admin::DELETE_SQ => {
                self.log.io_sqs.remove(&qid);
            }
            admin::DELETE_CQ => {
                self.log.io_cqs.remove(&qid);
            }
            admin::SET_FEATURES => {
                let fid = sqe.cdw(10) as u8;
                self.log.features.insert(fid, sqe.cdw(11));
                if fid == nvme_spec::opcode::feature::NUMBER_OF_QUEUES {
                    self.log.queues_granted = Some(cqe.result());
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "config_log_tests.rs"]
mod tests;

//! Rebuilding a device from a configuration log (migration destination): the controller is
//! reset and enabled with a hypervisor-owned admin queue in host memory, DMA-mapped at an IOVA
//! above guest RAM; the features and I/O queues are replayed through it. The guest's own admin
//! queue (still at its guest-physical address) is then served by an [`AdminProxy`]: the
//! guest's admin commands, seen through the trapped admin doorbells, are re-submitted on the
//! hypervisor's queue and their completions written into the guest's admin CQ.
use std::{sync::Arc, time::Instant};

use nvme_spec::{
    opcode::admin,
    queue::{Controller, QueueMem},
    regs::{self, aqa, cc},
    Cqe, Sqe, Status,
};
use vmm::memory::GuestRam;

use crate::{
    config_log::ConfigLog,
    host_client::{DmaMemory, HostPlatform},
    Error, Result,
};

/// Entries of the hypervisor's admin queue.
const ADMIN_ENTRIES: u16 = 32;

/// Serves the guest's admin queue from the hypervisor's.
pub struct AdminProxy {
    ctrl: Controller<HostPlatform>,
    _mem: DmaMemory,
    ram: GuestRam,
    asq: u64,
    acq: u64,
    sq_entries: u32,
    cq_entries: u32,
    /// Next guest SQ slot to take.
    sq_head: u32,
    /// Next guest CQ slot to fill, and its phase.
    cq_tail: u32,
    phase: bool,
    /// Guest admin commands served.
    pub served: u64,
    /// Guest admin commands that failed on the hypervisor's queue (completed with an error).
    pub failed: u64,
}

impl AdminProxy {
    /// The guest wrote its admin SQ tail: serve every new command, in order.
    pub fn on_sq_tail(&mut self, tail: u32) {
        if tail >= self.sq_entries {
            return;
        }
        let mut n = 0;
        while self.sq_head != tail && n < self.sq_entries {
            n += 1;
            let mut raw = [0u8; 64];
            let at = self.asq.wrapping_add(self.sq_head as u64 * 64);
            let ok = self.ram.contains(at, 64) && self.ram.read(at, &mut raw).is_ok();
            self.sq_head = (self.sq_head + 1) % self.sq_entries;
            let sqe = Sqe::from_bytes(&raw);
            let (result, status) = if !ok {
                (0, Status::DATA_TRANSFER_ERROR)
            } else {
                match self.ctrl.admin_raw(sqe) {
                    Ok(c) => (c.result(), c.status()),
                    Err(e) => {
                        tracing::warn!("guest admin command {:#x}: {e}", sqe.opcode());
                        (0, Status::INTERNAL_ERROR)
                    }
                }
            };
            if !status.is_success() {
                self.failed += 1;
            }
            self.served += 1;
            let cqe = Cqe::new(
                result,
                self.sq_head as u16,
                0,
                sqe.cid(),
                status,
                self.phase,
            );
            let at = self.acq.wrapping_add(self.cq_tail as u64 * 16);
            let b = cqe.to_bytes();
            if self.ram.contains(at, 16) {
                let _ = self.ram.write(at, &b[..12]);
                std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
                let _ = self.ram.write(at + 12, &b[12..]);
            }
            self.cq_tail = (self.cq_tail + 1) % self.cq_entries;
            if self.cq_tail == 0 {
                self.phase = !self.phase;
            }
        }
    }
}

fn drv(name: &str) -> impl Fn(nvme_spec::queue::DriverError) -> Error + '_ {
    move |source| Error::Driver {
        name: name.into(),
        what: "replaying the configuration",
        source,
    }
}

/// Resets the device behind `conn`, enables it with a hypervisor admin queue at `iova`,
/// replays `log` (features, I/O CQs and SQs at the guest's addresses) and returns the proxy
/// that serves the guest's admin queue from now on.
pub(crate) fn replay(
    conn: Arc<crate::client::Connection>,
    doorbells: Arc<Vec<crate::client::MappedArea>>,
    ram: GuestRam,
    log: &ConfigLog,
    guest_admin: (u32, u32),
    iova: u64,
) -> Result<AdminProxy> {
    let name = conn.name.clone();
    let mut mem = DmaMemory::at(64 * 1024, iova)?;
    conn.dma_map(0, iova, 64 * 1024, &mem._file)?;
    let (sq, sq_bus) = mem
        .alloc(1)
        .ok_or_else(|| drv(&name)(nvme_spec::queue::DriverError::Timeout("admin memory")))?;
    let (cq, cq_bus) = mem
        .alloc(1)
        .ok_or_else(|| drv(&name)(nvme_spec::queue::DriverError::Timeout("admin memory")))?;
    let platform = HostPlatform {
        conn,
        doorbells,
        start: Instant::now(),
        failed: false,
    };
    let qm = QueueMem {
        sq: sq.cast(),
        sq_bus,
        cq: cq.cast(),
        cq_bus,
        entries: ADMIN_ENTRIES,
    };
    // SAFETY: the queue memory is inside our DMA mapping, zeroed, owned by the proxy.
    let mut ctrl = unsafe { Controller::init(platform, qm) }.map_err(drv(&name))?;
    for (&fid, &cdw11) in &log.features {
        let mut s = Sqe::new(admin::SET_FEATURES, 0);
        s.set_cdw(10, fid as u32).set_cdw(11, cdw11);
        ctrl.admin(s).map_err(drv(&name))?;
    }
    for (&qid, c) in &log.io_cqs {
        let mut s = Sqe::new(admin::CREATE_CQ, 0);
        s.set_prps(c.base, 0)
            .set_cdw(10, (c.entries - 1) << 16 | qid as u32)
            .set_cdw(11, 1 | (c.interrupts as u32) << 1 | (c.vector as u32) << 16);
        ctrl.admin(s).map_err(drv(&name))?;
    }
    for (&qid, q) in &log.io_sqs {
        let mut s = Sqe::new(admin::CREATE_SQ, 0);
        s.set_prps(q.base, 0)
            .set_cdw(10, (q.entries - 1) << 16 | qid as u32)
            .set_cdw(11, 1 | (q.priority as u32) << 1 | (q.cqid as u32) << 16);
        ctrl.admin(s).map_err(drv(&name))?;
    }
    // A controller the guest had already told to shut down is shut down here too (the guest
    // may be polling CSTS.SHST for it).
    if cc::shn(log.cc) != 0 {
        use nvme_spec::queue::Platform;
        let v = ctrl.platform.reg_read32(regs::CC);
        ctrl.platform
            .reg_write32(regs::CC, (v & !(3 << 14)) | cc::shn(log.cc) << 14);
    }
    // Where the guest's admin queue stands: everything it submitted was completed and
    // consumed before the switchover (the mediation checks), so its CQ tail is its CQ head;
    // the phase follows from the last entry it consumed.
    let (sq_tail, cq_head) = guest_admin;
    let (sq_entries, cq_entries) = (aqa::sq_entries(log.aqa), aqa::cq_entries(log.aqa));
    if sq_entries < 2 || cq_entries < 2 || sq_tail >= sq_entries || cq_head >= cq_entries {
        return Err(Error::Unsupported {
            name,
            reason: format!(
                "guest admin queue positions {sq_tail}/{cq_head} do not fit AQA {:#x}",
                log.aqa
            ),
        });
    }
    let phase_at = |i: u32| -> bool {
        let mut b = [0u8; 16];
        let at = log.acq.wrapping_add(i as u64 * 16);
        ram.contains(at, 16) && ram.read(at, &mut b).is_ok() && Cqe::from_bytes(&b).phase()
    };
    let phase = if cq_head == 0 {
        !phase_at(cq_entries - 1)
    } else {
        phase_at(cq_head - 1)
    };
    Ok(AdminProxy {
        ctrl,
        _mem: mem,
        ram,
        asq: log.asq,
        acq: log.acq,
        sq_entries,
        cq_entries,
        sq_head: sq_tail,
        cq_tail: cq_head,
        phase,
        served: 0,
        failed: 0,
    })
}

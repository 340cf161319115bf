//! Rebuilding a device from a configuration log (migration destination): the controller is
//! reset and enabled with a hypervisor-owned admin queue in host memory, DMA-mapped at an IOVA
//! above guest RAM; the features and I/O queues are replayed through it. The guest's own admin
//! queue (still at its guest-physical address) is then served by an [`AdminProxy`]: the
//! guest's admin commands, seen through the trapped admin doorbells, are re-submitted on the
//! hypervisor's queue and their completions written into the guest's admin CQ.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvme_spec::{
    opcode::admin,
    queue::Controller,
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
/// Bytes of hypervisor memory mapped for the admin queue.
const ADMIN_MEMORY: u64 = 64 * 1024;
/// Most Asynchronous Event Requests held for the guest (NVMe's AERL is at most 16).
const MAX_HELD_AERS: usize = 16;

/// Counters of the admin proxy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyStats {
    /// Guest admin commands completed (by the device or refused here).
    pub served: u64,
    /// Guest admin commands completed with an error status.
    pub failed: u64,
    /// Guest admin commands refused by validation (never reached the device).
    pub refused: u64,
    /// Asynchronous Event Requests held here (the device never sees them; they complete
    /// when the guest resets the controller).
    pub aers_held: u64,
    /// Doorbell values out of range or unreadable entries.
    pub anomalies: u64,
    /// The hypervisor's admin memory is DMA-mapped now (only while guest commands are on the
    /// device: otherwise nothing, guest-chosen or not, can reach it).
    pub mapped: bool,
    /// Times it was mapped for guest commands.
    pub maps: u64,
}

/// The proxy's state: the guest's admin queue and the hypervisor's.
struct ProxyState {
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
    /// Last CQ head the guest wrote.
    cq_head: u32,
    /// Validated guest commands not on the device yet (its queue full, or the proxy held).
    waiting: VecDeque<Sqe>,
    /// Hypervisor command id → the guest's.
    inflight: HashMap<u16, u16>,
    /// Completions for the guest not posted yet (its CQ full): cid, result, status.
    done: VecDeque<(u16, u32, Status)>,
    aers: Vec<u16>,
    held: bool,
    stats: ProxyStats,
}

/// Serves the guest's admin queue from the hypervisor's, without ever waiting on the device:
/// a guest doorbell write copies and validates the new commands and puts them on the
/// hypervisor's queue; the proxy's thread polls the completions and posts them into the
/// guest's admin CQ. A command the device never completes ties up nothing but its slot.
#[derive(Clone)]
pub struct AdminProxy {
    state: Arc<Mutex<ProxyState>>,
    stop: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    conn: Arc<crate::client::Connection>,
    iova: u64,
}

impl ProxyState {
    /// Takes the guest's new commands up to `tail`.
    fn take(&mut self, tail: u32) {
        if tail >= self.sq_entries {
            self.stats.anomalies += 1;
            return;
        }
        let mut n = 0;
        while self.sq_head != tail && n < self.sq_entries {
            n += 1;
            let mut raw = [0u8; 64];
            let at = self.asq.wrapping_add(self.sq_head as u64 * 64);
            let ok = self.ram.contains(at, 64) && self.ram.read(at, &mut raw).is_ok();
            self.sq_head = (self.sq_head + 1) % self.sq_entries;
            // The copy is what goes to the device: the guest may rewrite its slot, not this.
            let sqe = Sqe::from_bytes(&raw);
            if !ok {
                self.stats.anomalies += 1;
                self.finish(sqe.cid(), 0, Status::DATA_TRANSFER_ERROR);
                continue;
            }
            let ram = &self.ram;
            if let Err(status) =
                crate::admin_check::check_admin(&sqe, &|gpa, len| ram.contains(gpa, len))
            {
                self.stats.refused += 1;
                if self.stats.refused.is_power_of_two() {
                    tracing::warn!(
                        opcode = sqe.opcode(),
                        refused = self.stats.refused,
                        "guest admin command refused by the proxy: {status:?}"
                    );
                }
                self.finish(sqe.cid(), 0, status);
                continue;
            }
            if sqe.opcode() == admin::ASYNC_EVENT {
                if self.aers.len() >= MAX_HELD_AERS {
                    // Asynchronous Event Request Limit Exceeded.
                    self.finish(sqe.cid(), 0, Status::new(1, 0x05));
                } else {
                    self.aers.push(sqe.cid());
                    self.stats.aers_held += 1;
                }
                continue;
            }
            self.waiting.push_back(sqe);
        }
        self.submit();
    }

    /// Puts waiting commands on the hypervisor's queue while it has room.
    fn submit(&mut self) {
        while !self.held && self.stats.mapped && self.ctrl.admin_free() > 0 {
            let Some(sqe) = self.waiting.pop_front() else {
                break;
            };
            match self.ctrl.admin_submit(sqe) {
                Ok(cid) => {
                    self.inflight.insert(cid, sqe.cid());
                }
                Err(e) => {
                    tracing::warn!("guest admin command {:#x}: {e}", sqe.opcode());
                    self.finish(sqe.cid(), 0, Status::INTERNAL_ERROR);
                }
            }
        }
    }

    /// Takes the device's completions; true when there were any.
    fn reap(&mut self) -> bool {
        let mut any = false;
        while let Some(c) = self.ctrl.admin_poll() {
            any = true;
            match self.inflight.remove(&c.cid()) {
                Some(guest_cid) => self.finish(guest_cid, c.result(), c.status()),
                None => self.stats.anomalies += 1,
            }
        }
        if any {
            self.submit();
        }
        any
    }

    fn finish(&mut self, cid: u16, result: u32, status: Status) {
        if !status.is_success() {
            self.stats.failed += 1;
        }
        self.stats.served += 1;
        self.done.push_back((cid, result, status));
        self.post();
    }

    /// Posts finished completions while the guest's CQ has room (phase dword last).
    fn post(&mut self) {
        while (self.cq_tail + 1) % self.cq_entries != self.cq_head {
            let Some((cid, result, status)) = self.done.pop_front() else {
                break;
            };
            let cqe = Cqe::new(result, self.sq_head as u16, 0, cid, status, self.phase);
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

impl AdminProxy {
    fn state(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            t.thread().unpark();
        }
    }

    /// The guest wrote its admin SQ tail: its new commands are copied, validated and queued
    /// (never waits for the device).
    pub fn on_sq_tail(&self, tail: u32) {
        self.state().take(tail);
        self.wake();
    }

    /// The guest wrote its admin CQ head: room for more completions.
    pub fn on_cq_head(&self, head: u32) {
        let mut s = self.state();
        if head >= s.cq_entries {
            s.stats.anomalies += 1;
            return;
        }
        s.cq_head = head;
        s.post();
    }

    /// Counters.
    pub fn stats(&self) -> ProxyStats {
        self.state().stats
    }

    /// Guest admin commands on the device now.
    pub fn on_device(&self) -> usize {
        self.state().inflight.len()
    }

    /// Holds new guest commands back (they wait, validated) and waits up to `timeout` for
    /// those on the device to complete; true when none is left. Not for vCPU threads.
    pub fn hold(&self, timeout: Duration) -> bool {
        self.state().held = true;
        let t = Instant::now();
        loop {
            let mut s = self.state();
            s.reap();
            if s.inflight.is_empty() {
                return true;
            }
            drop(s);
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Lets held commands go to the device.
    pub fn release(&self) {
        let mut s = self.state();
        s.held = false;
        s.submit();
        drop(s);
        self.wake();
    }

    /// Stops the proxy (the guest is resetting the controller, which destroys the
    /// hypervisor's queue): its thread ends; commands still pending are dropped, as a reset
    /// drops them. Call [`AdminProxy::unmap`] once the controller is disabled.
    pub fn retire(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let mut s = self.state();
        let dropped = s.inflight.len() + s.waiting.len() + s.aers.len();
        if dropped > 0 {
            tracing::info!(
                dropped,
                "the guest reset the controller: proxied admin commands dropped"
            );
        }
        s.inflight.clear();
        s.waiting.clear();
        s.aers.clear();
    }

    /// Takes the hypervisor's admin memory away from the device (after [`AdminProxy::retire`]
    /// and the controller is disabled): nothing guest-chosen can reach it afterwards.
    pub fn unmap(&self) -> Result<()> {
        let was = std::mem::replace(&mut self.state().stats.mapped, false);
        if was {
            self.conn.dma_unmap(self.iova, ADMIN_MEMORY)?;
        }
        Ok(())
    }

    /// One turn of the proxy's thread: reap completions; map the admin memory when guest
    /// commands wait for the device, unmap it when none is on it. Returns true while the
    /// device has commands. The vfio-user requests run without the state's lock, so a vCPU
    /// taking commands never waits on them.
    fn turn(&self, file: &std::fs::File) -> bool {
        let (map, unmap, busy) = {
            let mut s = self.state();
            s.reap();
            let need = !s.held && !s.waiting.is_empty();
            let unmap = s.stats.mapped && s.inflight.is_empty() && !need;
            if unmap {
                // From here nothing is submitted until it is mapped again.
                s.stats.mapped = false;
            }
            (need && !s.stats.mapped, unmap, !s.inflight.is_empty())
        };
        if unmap {
            if let Err(e) = self.conn.dma_unmap(self.iova, ADMIN_MEMORY) {
                tracing::warn!(
                    "unmapping the admin proxy's memory: {}",
                    vmm::ErrorChain(&e)
                );
            }
        }
        if map {
            let mapped = self.conn.dma_map(0, self.iova, ADMIN_MEMORY, file);
            let mut s = self.state();
            match mapped {
                Ok(()) => {
                    s.stats.mapped = true;
                    s.stats.maps += 1;
                    s.submit();
                }
                Err(e) => {
                    tracing::warn!("mapping the admin proxy's memory: {}", vmm::ErrorChain(&e));
                    while let Some(sqe) = s.waiting.pop_front() {
                        s.finish(sqe.cid(), 0, Status::INTERNAL_ERROR);
                    }
                }
            }
            return true;
        }
        busy
    }

    fn spawn(&self) -> Result<()> {
        let file = self
            .state()
            ._mem
            ._file
            .try_clone()
            .map_err(|source| Error::Os {
                what: "duplicating the admin proxy's memfd".into(),
                source,
            })?;
        let me = self.clone();
        let name = format!("{}-admin-proxy", self.conn.name);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                sandbox::enter(sandbox::Kind::Device);
                while !me.stop.load(Ordering::SeqCst) {
                    let busy = me.turn(&file);
                    // Poll briskly while the device has commands; sleep until woken otherwise.
                    std::thread::park_timeout(if busy {
                        Duration::from_micros(200)
                    } else {
                        Duration::from_millis(100)
                    });
                }
            })
            .map_err(|source| Error::Os {
                what: "spawning the admin proxy thread".into(),
                source,
            })?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(())
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
    let mut mem = DmaMemory::at(ADMIN_MEMORY, iova)?;
    conn.dma_map(0, iova, ADMIN_MEMORY, &mem._file)?;
    let mut ctrl =
        crate::host_client::admin_controller(conn.clone(), doorbells, &mut mem, ADMIN_ENTRIES)
            .map_err(drv(&name))?;
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
    let proxy = AdminProxy {
        state: Arc::new(Mutex::new(ProxyState {
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
            cq_head,
            waiting: VecDeque::new(),
            inflight: HashMap::new(),
            done: VecDeque::new(),
            aers: Vec::new(),
            held: false,
            // Mapped for the replay; the proxy's thread unmaps it once idle.
            stats: ProxyStats {
                mapped: true,
                ..Default::default()
            },
        })),
        stop: Arc::new(AtomicBool::new(false)),
        thread: Arc::new(Mutex::new(None)),
        conn,
        iova,
    };
    proxy.spawn()?;
    Ok(proxy)
}

//! The shadow engine: owns the ring copies, the designation, the doorbell interception and the
//! poller thread, and drives one [`NvmeQueue`] adapter per I/O queue pair of a passthrough
//! NVMe device through the attachment's [`DeviceHooks`].
//!
//! - [`memory`]: host pages, the ring copies and the adapters' [`crate::Buffers`] view;
//! - [`poller`]: the thread that moves doorbells and completions while shadowed;
//! - [`device`]: the engine as a [`migration::MigratableDevice`] (source side).
pub mod checks;
pub mod device;
pub mod irq;
mod live;
pub mod memory;
mod poller;
mod restore;

use std::{
    ops::Range,
    sync::{atomic::AtomicBool, Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvme_spec::regs;
use passthrough::{
    config_log::ConfigLog, Attachment, DeviceBacking, DeviceHooks, DoorbellMode, GuestBacking,
};
use serde::{Deserialize, Serialize};
use vmm::Vm;

use crate::{
    nvme::{validate::Limits, NvmeQueue, QueueGeometry, QueueState, QueueStats},
    Error, Result, RingAdapter,
};
pub use memory::Designation;
use memory::{copy_rings, Bounce, Copy, EngineBuffers, HostPages, PAGE};

/// How guest submissions reach the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interception {
    /// The queue's doorbell page is replaced by a hypervisor page a thread polls (no exits).
    /// Queues whose doorbells share the admin page (DSTRD 0) are trapped regardless.
    #[default]
    Poll,
    /// The queue's doorbell page is unmapped: every doorbell write exits and the BAR0 trap
    /// hands it to the engine.
    Trap,
}

/// How the engine learns of the device's completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Completions {
    /// The poller looks at the device's completion queues every round.
    #[default]
    Poll,
    /// The MSI-X vectors of completion queues with interrupts enabled are taken over from
    /// KVM: the device's interrupt wakes the poller, which forwards the completions and then
    /// interrupts the guest. Queues without interrupts are polled.
    Interrupt,
}

/// Tuning of the engine.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EngineOptions {
    /// Which copy the guest sees.
    pub designation: Designation,
    /// How submissions are intercepted.
    pub interception: Interception,
    /// How completions are noticed.
    pub completions: Completions,
    /// Bound on waiting for the device to finish in-flight commands.
    pub drain_timeout: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            designation: Designation::VcpuBuffer,
            interception: Interception::Poll,
            completions: Completions::Poll,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// One shadowed queue pair and where its doorbells are.
pub(crate) struct QueueRt {
    pub q: NvmeQueue,
    /// Index of the redirected page in [`Running::pages`].
    pub page: usize,
    /// Offsets of the guest's SQ tail and CQ head doorbells in that page.
    pub sq_off: usize,
    pub cq_off: usize,
    /// Last doorbell values seen.
    pub seen_sq: u32,
    pub seen_cq: u32,
    /// Errors reaching the buffers (counted; the queue keeps going).
    pub errors: u64,
    /// The guest's MSI-X vector for this CQ, when the engine took it over.
    pub vector: Option<u16>,
}

impl QueueRt {
    /// `q`, whose doorbells are at `place` (page index, SQ and CQ offsets), last seen with the
    /// values `seen` (SQ tail, CQ head).
    pub fn new(q: NvmeQueue, place: (usize, usize, usize), seen: (u32, u32)) -> Self {
        let (page, sq_off, cq_off) = place;
        QueueRt {
            q,
            page,
            sq_off,
            cq_off,
            seen_sq: seen.0,
            seen_cq: seen.1,
            errors: 0,
            vector: None,
        }
    }

    /// Counts a failure reaching the buffers; logs the 1st, 2nd, 4th, 8th, … of them.
    pub fn note_error(&mut self, what: &str, e: &Error) {
        self.errors += 1;
        if self.errors.is_power_of_two() {
            tracing::warn!(
                qid = self.q.geometry().qid,
                errors = self.errors,
                "{what}: {}",
                vmm::ErrorChain(e)
            );
        }
    }
}

/// A redirected doorbell page: the hypervisor page the guest writes and the device's page.
pub(crate) struct DoorbellPage {
    pub bar_offset: u64,
    /// Where the guest's doorbell values land: mapped into the guest (poll mode) or written
    /// by the trap hook (trap mode).
    pub guest: Arc<HostPages>,
    /// Host address of the device's own page (mapped BAR).
    pub device: u64,
    /// Writes to this page exit (trap mode, or the admin page).
    pub trapped: bool,
}

impl DoorbellPage {
    /// Rings the device: a volatile store into its doorbell page.
    pub fn ring(&self, offset: usize, value: u32) {
        if offset.is_multiple_of(4) && offset + 4 <= PAGE as usize {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            // SAFETY: `device` is a page of the attachment's BAR mapping, which the engine's
            // `Arc<Attachment>` keeps alive; the offset is inside it and aligned.
            unsafe { std::ptr::write_volatile((self.device as *mut u8).add(offset).cast(), value) }
        }
    }
}

/// What the poller works on.
pub(crate) struct Running {
    pub queues: Vec<QueueRt>,
    pub pages: Vec<DoorbellPage>,
    pub bufs: EngineBuffers,
    /// Device-written pages not yet taken by the migration.
    pub dirty: Vec<u64>,
    /// Vectors whose queues got completions the guest has not been interrupted for yet.
    pub pending_irqs: Vec<u16>,
}

pub(crate) struct Shared {
    pub state: Mutex<Running>,
    pub stop: AtomicBool,
    /// What wakes the poller (device interrupts taken over, trapped doorbells).
    pub wakeups: irq::Wakeups,
    /// The device, to interrupt the guest through.
    pub att: Arc<Attachment>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Running> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Active {
    shared: Arc<Shared>,
    poller: Option<JoinHandle<()>>,
    copies: Arc<Vec<Copy>>,
    /// Ring ranges whose backing was moved onto the copies: the guest's memory slots
    /// ([`Designation::VcpuBuffer`]) or the device's DMA mapping ([`Designation::DeviceBuffer`]).
    remapped: Vec<Range<u64>>,
    designation: Designation,
    /// PRP-list bounce areas mapped for the device.
    bounce: Arc<Vec<Bounce>>,
    limits: Limits,
    dstrd: u8,
    entered: Instant,
}

/// A queue's counters and positions, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct QueueStatus {
    /// Positions and counters.
    pub state: QueueState,
    /// Commands in flight on the device.
    pub in_flight: usize,
    /// Buffer access errors.
    pub errors: u64,
}

/// What the engine is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EngineStatus {
    /// Shadow mode is on.
    pub shadowed: bool,
    /// While shadowed: which side the copies are.
    pub designation: Option<Designation>,
    /// While shadowed: the ring ranges (guest-physical start, end) moved onto the copies.
    pub remapped: Vec<(u64, u64)>,
    /// Per-queue status.
    pub queues: Vec<QueueStatus>,
    /// Times shadow mode was entered.
    pub entered: u64,
    /// Times shadow mode was left.
    pub left: u64,
    /// BAR0 doorbell pages mapped straight into the guest (direct mode).
    pub mapped_doorbell_pages: Vec<u64>,
    /// While shadowed: the MSI-X vectors taken over (completions by interrupt).
    pub interrupts: Vec<irq::VectorStatus>,
    /// MSI-X vectors KVM delivers straight to the guest (irqfd routes).
    pub msix_routes: Vec<u16>,
}

/// The shadow engine of one passthrough NVMe device.
pub struct Engine {
    att: Arc<Attachment>,
    opts: EngineOptions,
    active: Mutex<Option<Active>>,
    counts: Mutex<(u64, u64)>,
}

fn hook(what: impl Into<String>) -> impl FnOnce(passthrough::Error) -> Error {
    let what = what.into();
    move |source| Error::Hook { what, source }
}

fn vmm_err(what: &'static str) -> impl FnOnce(vmm::Error) -> Error {
    move |source| Error::Vmm {
        what: what.into(),
        source,
    }
}

/// The first IOVA above guest RAM the hypervisor gives its own memory at (the destination's
/// admin queue there, PRP-list bounce areas [`BOUNCE_IOVA_OFFSET`] further).
pub(crate) fn hypervisor_iova(ram: &vmm::memory::GuestRam) -> u64 {
    let ram_end = ram
        .regions()
        .iter()
        .map(|r| r.gpa + r.size)
        .max()
        .unwrap_or(0);
    ram_end.next_multiple_of(1 << 30).max(1 << 32) + (1 << 30)
}

/// Where the bounce areas start, above [`hypervisor_iova`].
const BOUNCE_IOVA_OFFSET: u64 = 1 << 30;

/// The validator's limits from what the guest learned through Identify.
pub fn limits_from(log: &ConfigLog) -> Result<Limits> {
    let (&nsid, ns) = log.namespaces.iter().next().ok_or_else(|| {
        Error::Engine(
            "the guest never read Identify Namespace data, so the block size is unknown; \
             refusing to shadow"
                .into(),
        )
    })?;
    let mdts = log.mdts.ok_or_else(|| {
        Error::Engine(
            "the guest never read Identify Controller data, so MDTS is unknown; refusing to \
             shadow"
                .into(),
        )
    })?;
    let max_transfer = match mdts {
        0 => 65536 * ns.block_size as u64,
        m => 4096u64 << m.min(18),
    };
    Ok(Limits {
        nsid,
        block_size: ns.block_size,
        max_transfer,
    })
}

/// The queue pairs of a configuration log (SQ and CQ share the queue id).
pub fn geometries(log: &ConfigLog) -> Result<Vec<QueueGeometry>> {
    let mut out = Vec::new();
    for (&qid, sq) in &log.io_sqs {
        let cq = log.io_cqs.get(&sq.cqid).ok_or_else(|| {
            Error::Engine(format!(
                "I/O SQ {qid} uses CQ {} which does not exist",
                sq.cqid
            ))
        })?;
        if sq.cqid != qid {
            return Err(Error::Engine(format!(
                "I/O SQ {qid} completes into CQ {}: only paired queues (SQ n → CQ n) can be shadowed",
                sq.cqid
            )));
        }
        out.push(QueueGeometry {
            qid,
            sq_base: sq.base,
            sq_entries: sq.entries,
            cq_base: cq.base,
            cq_entries: cq.entries,
        });
    }
    if out.is_empty() {
        return Err(Error::Engine(
            "the device has no I/O queues to shadow".into(),
        ));
    }
    Ok(out)
}

impl Engine {
    /// An engine for `att`, in direct mode.
    pub fn new(att: Arc<Attachment>, opts: EngineOptions) -> Self {
        Engine {
            att,
            opts,
            active: Mutex::new(None),
            counts: Mutex::new((0, 0)),
        }
    }

    /// The attachment.
    pub fn attachment(&self) -> &Arc<Attachment> {
        &self.att
    }

    /// Options.
    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    fn active(&self) -> MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while shadow mode is on.
    pub fn is_shadowed(&self) -> bool {
        self.active().is_some()
    }

    /// Positions and counters.
    pub fn status(&self) -> EngineStatus {
        let a = self.active();
        let queues = a
            .as_ref()
            .map(|a| {
                a.shared
                    .lock()
                    .queues
                    .iter()
                    .map(|q| QueueStatus {
                        state: q.q.state(),
                        in_flight: q.q.in_flight(),
                        errors: q.errors,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (entered, left) = *self.counts.lock().unwrap_or_else(|e| e.into_inner());
        EngineStatus {
            shadowed: a.is_some(),
            designation: a.as_ref().map(|a| a.designation),
            remapped: a
                .as_ref()
                .map(|a| a.remapped.iter().map(|r| (r.start, r.end)).collect())
                .unwrap_or_default(),
            interrupts: a
                .as_ref()
                .map(|a| a.shared.wakeups.status())
                .unwrap_or_default(),
            queues,
            entered,
            left,
            mapped_doorbell_pages: self.att.mapped_doorbell_pages(),
            msix_routes: self.att.msix_routes().iter().map(|r| r.0).collect(),
        }
    }

    /// Enters shadow mode for every I/O queue in the configuration log (vCPUs paused briefly;
    /// the device keeps running).
    pub fn enter(&self, vm: &Vm) -> Result<()> {
        self.enter_with(vm, true)
    }

    /// As [`Engine::enter`], for a VM whose vCPUs the caller already paused.
    pub fn enter_while_paused(&self, vm: &Vm) -> Result<()> {
        self.enter_with(vm, false)
    }

    fn enter_with(&self, vm: &Vm, pause: bool) -> Result<()> {
        let mut active = self.active();
        if active.is_some() {
            return Ok(());
        }
        let config = self.att.config_log();
        let limits = limits_from(&config)?;
        let geos = geometries(&config)?;
        if pause {
            vm.pause()
                .map_err(vmm_err("pausing the vCPUs to enter shadow mode"))?;
        }
        let t0 = Instant::now();
        let result = self.enter_paused(vm, &config, limits, &geos);
        let resumed = if pause {
            vm.resume().map_err(vmm_err("resuming the vCPUs"))
        } else {
            Ok(())
        };
        let a = result?;
        resumed?;
        tracing::info!(
            queues = geos.len(),
            pause_us = t0.elapsed().as_micros() as u64,
            block_size = limits.block_size,
            "shadow mode entered"
        );
        *active = Some(a);
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Ok(())
    }

    fn enter_paused(
        &self,
        vm: &Vm,
        config: &ConfigLog,
        limits: Limits,
        geos: &[QueueGeometry],
    ) -> Result<Active> {
        let ram = vm.ram().clone();
        let slots = vm.memory_slots();
        let designation = self.opts.designation;
        let mut remapped: Vec<Range<u64>> = Vec::new();
        let mut redirected: Vec<u64> = Vec::new();
        let mut mapped_bounce: Option<Arc<Vec<Bounce>>> = None;
        type Entered = (
            Vec<DoorbellPage>,
            Vec<QueueRt>,
            Arc<Vec<Copy>>,
            Vec<u64>,
            irq::Wakeups,
        );
        let result = (|| -> Result<Entered> {
            // Doorbells first: from here on nothing the guest writes reaches the device.
            let mut pages: Vec<DoorbellPage> = Vec::new();
            let mut places = Vec::new();
            for g in geos {
                let before = pages.len();
                places.push(self.doorbell_place(slots, &mut pages, g.qid, true)?);
                redirected.extend(pages[before..].iter().map(|p| p.bar_offset));
            }
            let doorbells = |i: usize| {
                let (page, sq_off, cq_off) = places[i];
                let p = &pages[page].guest;
                (
                    p.load_u32(sq_off).unwrap_or(0),
                    p.load_u32(cq_off).unwrap_or(0),
                )
            };
            let early_dirty = match designation {
                Designation::VcpuBuffer => Vec::new(),
                Designation::DeviceBuffer => {
                    self.wait_device_idle(&ram, limits, geos, doorbells)?
                }
            };
            // vCPUs are paused. With the copy as the vCPU buffer, completions the device posts
            // after the copy are reconciled by phase when the adapters attach; with the copy as
            // the device buffer the device is idle, so both copies are identical.
            let copies = Arc::new(copy_rings(&ram, geos)?);
            for c in copies.iter() {
                self.move_onto(slots, designation, c)?;
                remapped.push(c.gpa.clone());
            }
            let bounce = self.map_bounce(&ram, geos, limits)?;
            mapped_bounce = Some(bounce.clone());
            let bufs =
                EngineBuffers::new(ram.clone(), copies.clone(), designation).with_bounce(bounce);
            let mut queues = Vec::new();
            for (i, g) in geos.iter().enumerate() {
                let (page, sq_off, cq_off) = places[i];
                let (sq, cq) = doorbells(i);
                let q = NvmeQueue::attach(*g, limits, sq, cq, &bufs)?;
                queues.push(QueueRt::new(q, (page, sq_off, cq_off), (sq, cq)));
            }
            let wakeups = self.take_vectors(config, &pages, &mut queues)?;
            self.install_hook(&pages, &queues, &wakeups);
            Ok((pages, queues, copies, early_dirty, wakeups))
        })();
        let (pages, queues, copies, early_dirty, wakeups) = match result {
            Ok(v) => v,
            Err(e) => {
                if let Some(b) = &mapped_bounce {
                    self.unmap_bounce(b);
                }
                self.undo_enter(slots, designation, &remapped, &redirected);
                return Err(e);
            }
        };
        let bounce = mapped_bounce.unwrap_or_default();
        let shared = Arc::new(Shared {
            state: Mutex::new(Running {
                queues,
                pages,
                bufs: EngineBuffers::new(ram, copies.clone(), designation)
                    .with_bounce(bounce.clone()),
                dirty: early_dirty,
                pending_irqs: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            wakeups,
            att: self.att.clone(),
        });
        let poller = poller::spawn(shared.clone()).inspect_err(|_| {
            self.release_vectors(&shared.wakeups);
            self.unmap_bounce(&bounce);
            self.undo_enter(slots, designation, &remapped, &redirected);
        })?;
        Ok(Active {
            shared,
            poller: Some(poller),
            copies,
            remapped,
            designation,
            bounce,
            limits,
            dstrd: self.att.dstrd(),
            entered: Instant::now(),
        })
    }

    /// Allocates a PRP-list bounce area per queue (a slot per SQ entry, enough pages for the
    /// longest list the validator accepts) and maps it for the device above guest RAM.
    pub(crate) fn map_bounce(
        &self,
        ram: &vmm::memory::GuestRam,
        geos: &[QueueGeometry],
        limits: Limits,
    ) -> Result<Arc<Vec<Bounce>>> {
        let per_slot = checks::bounce_pages_per_slot(limits);
        let mut iova = hypervisor_iova(ram) + BOUNCE_IOVA_OFFSET;
        let mut out: Vec<Bounce> = Vec::new();
        for g in geos {
            let size = checks::bounce_bytes(g.sq_entries, per_slot).ok_or_else(|| {
                Error::Engine(format!("queue {}'s PRP-list bounce area overflows", g.qid))
            })?;
            let pages = HostPages::new(size)?;
            if let Err(e) = self.att.map_device_memory(iova, size, &pages.fd()) {
                self.unmap_bounce(&out);
                return Err(Error::Hook {
                    what: format!(
                        "mapping queue {}'s PRP-list bounce area at {iova:#x}",
                        g.qid
                    ),
                    source: e,
                });
            }
            out.push(Bounce {
                qid: g.qid,
                pages,
                iova,
                per_slot,
            });
            iova += size.next_multiple_of(1 << 21);
        }
        Ok(Arc::new(out))
    }

    /// Takes the bounce areas away from the device (it must have no command in flight).
    pub(crate) fn unmap_bounce(&self, bounce: &[Bounce]) {
        for b in bounce {
            if let Err(e) = self.att.unmap_device_memory(b.iova, b.pages.len() as u64) {
                tracing::warn!(
                    qid = b.qid,
                    "unmapping the PRP-list bounce area: {}",
                    vmm::ErrorChain(&e)
                );
            }
        }
    }

    /// Completions by interrupt: takes over the MSI-X vector of every shadowed CQ the guest
    /// created with interrupts enabled (a vector several CQs share is taken once).
    pub(crate) fn take_vectors(
        &self,
        config: &ConfigLog,
        pages: &[DoorbellPage],
        queues: &mut [QueueRt],
    ) -> Result<irq::Wakeups> {
        let mut w = irq::Wakeups::new()?;
        if self.opts.completions != Completions::Interrupt {
            for q in queues.iter() {
                let qid = q.q.geometry().qid;
                if config.io_cqs.get(&qid).is_some_and(|c| c.interrupts) {
                    tracing::warn!(
                        qid,
                        "CQ {qid} has interrupts enabled but completions are polled: the \
                         device signals the guest directly, possibly before the engine \
                         forwards the completion (use --shadow-completions interrupt)"
                    );
                }
            }
            return Ok(w);
        }
        for q in queues.iter_mut() {
            let qid = q.q.geometry().qid;
            let Some(cq) = config.io_cqs.get(&qid).filter(|c| c.interrupts) else {
                tracing::info!(
                    qid,
                    "CQ {qid} has interrupts disabled: its completions are polled"
                );
                continue;
            };
            let vector = cq.vector;
            if !w.vectors.iter().any(|v| v.vector == vector) {
                match self.att.take_interrupt(vector) {
                    Ok(fd) => w.vectors.push(irq::TakenVector {
                        vector,
                        fd,
                        received: 0.into(),
                        injected: 0.into(),
                        masked: 0.into(),
                    }),
                    Err(e) => {
                        self.release_vectors(&w);
                        return Err(Error::Hook {
                            what: format!("taking over MSI-X vector {vector} of CQ {qid}"),
                            source: e,
                        });
                    }
                }
            }
            q.vector = Some(vector);
        }
        w.can_block = pages.iter().all(|p| p.trapped) && queues.iter().all(|q| q.vector.is_some());
        Ok(w)
    }

    /// Gives the taken vectors back to KVM, each with one interrupt for the guest (completions
    /// forwarded since the last one are not left without a signal).
    pub(crate) fn release_vectors(&self, w: &irq::Wakeups) {
        for v in &w.vectors {
            self.att.release_interrupt(v.vector);
            let _ = self.att.interrupt_guest(v.vector);
        }
    }

    /// Undoes a partly entered shadow mode: hook off, doorbell pages back, ring ranges back to
    /// RAM (best effort: this runs on an error path).
    fn undo_enter(
        &self,
        slots: &vmm::memslots::MemorySlots,
        designation: Designation,
        remapped: &[Range<u64>],
        redirected: &[u64],
    ) {
        self.att.set_doorbell_hook(None);
        for &p in redirected {
            let _ = self.release_page(slots, p);
        }
        for r in remapped {
            let _ = self.move_back(slots, designation, r);
        }
    }

    /// Backs the ring range of `c` with the copy on the designated side. The copy must live
    /// (in `Active`) until [`Engine::move_back`].
    pub(crate) fn move_onto(
        &self,
        slots: &vmm::memslots::MemorySlots,
        designation: Designation,
        c: &Copy,
    ) -> Result<()> {
        let len = c.gpa.end - c.gpa.start;
        match designation {
            // SAFETY: the caller keeps the copy alive until the range is mapped back to RAM.
            Designation::VcpuBuffer => unsafe {
                self.att.remap_guest_range(
                    slots,
                    c.gpa.start,
                    len,
                    GuestBacking::Host(c.pages.addr()),
                )
            },
            Designation::DeviceBuffer => self.att.remap_device_range(
                c.gpa.start,
                len,
                DeviceBacking::Host {
                    fd: c.pages.fd(),
                    offset: 0,
                },
            ),
        }
        .map_err(hook(format!("moving ring pages {:?} onto the copy", c.gpa)))
    }

    /// Backs ring range `r` with guest RAM again on the designated side.
    fn move_back(
        &self,
        slots: &vmm::memslots::MemorySlots,
        designation: Designation,
        r: &Range<u64>,
    ) -> Result<()> {
        let len = r.end - r.start;
        match designation {
            // SAFETY: RAM backing needs no host promise.
            Designation::VcpuBuffer => unsafe {
                self.att
                    .remap_guest_range(slots, r.start, len, GuestBacking::Ram)
            },
            Designation::DeviceBuffer => {
                self.att
                    .remap_device_range(r.start, len, DeviceBacking::Ram)
            }
        }
        .map_err(hook(format!("moving ring pages {r:?} back to RAM")))
    }

    /// Copy = device buffer: the device's mapping around the rings is re-made, so it must not
    /// be doing DMA then. With the doorbells intercepted and the vCPUs paused nothing new
    /// reaches it; this waits (bounded) until the commands it already had are complete,
    /// counted from the positions in guest RAM, and it works on no guest admin command. Returns
    /// the data pages those commands may have written (reported dirty).
    fn wait_device_idle(
        &self,
        ram: &vmm::memory::GuestRam,
        limits: Limits,
        geos: &[QueueGeometry],
        doorbells: impl Fn(usize) -> (u32, u32),
    ) -> Result<Vec<u64>> {
        if let Some(g) = geos.iter().find(|g| g.sq_entries != g.cq_entries) {
            return Err(Error::Engine(format!(
                "queue {} has an SQ of {} and a CQ of {} entries: the commands in flight \
                 cannot be counted, so the device's DMA mapping cannot be moved safely (use \
                 the vCPU-buffer designation)",
                g.qid, g.sq_entries, g.cq_entries
            )));
        }
        let plain = EngineBuffers::new(ram.clone(), Arc::new(Vec::new()), Designation::VcpuBuffer);
        let mut pages = std::collections::BTreeSet::new();
        let t0 = Instant::now();
        loop {
            let mut busy = Vec::new();
            for (i, g) in geos.iter().enumerate() {
                let (sq, cq) = doorbells(i);
                let q = NvmeQueue::attach(*g, limits, sq, cq, &plain)?;
                pages.extend(q.legacy_device_pages());
                if q.in_flight() > 0 {
                    busy.push((g.qid, q.in_flight()));
                }
            }
            let admin = self.att.admin_unanswered();
            if busy.is_empty() && admin == 0 {
                return Ok(pages.into_iter().collect());
            }
            if t0.elapsed() >= self.opts.drain_timeout {
                return Err(Error::Engine(format!(
                    "the device did not finish its commands within {:?} (queue, in flight) = \
                     {busy:?}, admin commands pending {admin}; its DMA mapping was not moved",
                    self.opts.drain_timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits (bounded) until the device works on no guest admin command.
    fn wait_admin_idle(&self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let pending = self.att.admin_unanswered();
            if pending == 0 {
                return Ok(());
            }
            if t0.elapsed() >= self.opts.drain_timeout {
                return Err(Error::Engine(format!(
                    "{pending} guest admin command(s) still pending after {:?}",
                    self.opts.drain_timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Makes guest RAM hold the guest's view of every ring copy (the copy as the vCPU buffer;
    /// with the copy as the device buffer RAM is the guest's view already). Returns the ring
    /// pages, which the migration must send.
    fn rings_to_ram(a: &Active, bufs: &EngineBuffers) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        for c in a.copies.iter() {
            if a.designation == Designation::VcpuBuffer {
                let mut buf = vec![0u8; c.pages.len()];
                c.pages.read(0, &mut buf);
                bufs.ram()
                    .write(c.gpa.start, &buf)
                    .map_err(|source| Error::Vmm {
                        what: format!("writing ring pages {:?} back", c.gpa),
                        source,
                    })?;
            }
            pages.extend((c.gpa.start..c.gpa.end).step_by(PAGE as usize));
        }
        Ok(pages)
    }

    /// Where queue `qid`'s doorbells are: (index in `pages`, SQ tail offset, CQ head offset) in
    /// its page, which is intercepted and added to `pages` if it is not there yet
    /// (`copy_device`: starting from the device's values).
    pub(crate) fn doorbell_place(
        &self,
        slots: &vmm::memslots::MemorySlots,
        pages: &mut Vec<DoorbellPage>,
        qid: u16,
        copy_device: bool,
    ) -> Result<(usize, usize, usize)> {
        let sq_db = regs::sq_tail_doorbell(qid, self.att.dstrd());
        let cq_db = regs::cq_head_doorbell(qid, self.att.dstrd());
        let bar_offset = sq_db & !(PAGE - 1);
        if cq_db & !(PAGE - 1) != bar_offset {
            return Err(Error::Engine(format!(
                "queue {qid}'s doorbells are on two pages"
            )));
        }
        let page = match pages.iter().position(|p| p.bar_offset == bar_offset) {
            Some(i) => i,
            None => {
                pages.push(self.intercept(slots, bar_offset, copy_device)?);
                pages.len() - 1
            }
        };
        Ok((
            page,
            (sq_db - bar_offset) as usize,
            (cq_db - bar_offset) as usize,
        ))
    }

    /// Intercepts the doorbell page at `bar_offset`: a hypervisor page mapped in its place
    /// (poll mode) or the page left unmapped so writes exit (trap mode; always for the admin
    /// page, which DSTRD 0 queues share). `copy_device`: start from the device's values.
    pub(crate) fn intercept(
        &self,
        slots: &vmm::memslots::MemorySlots,
        bar_offset: u64,
        copy_device: bool,
    ) -> Result<DoorbellPage> {
        let device = self
            .att
            .device_page(bar_offset)
            .ok_or_else(|| Error::Engine(format!("BAR0 page {bar_offset:#x} is not mappable")))?;
        let guest = Arc::new(HostPages::new(PAGE)?);
        if copy_device {
            // SAFETY: `device` is a mapped BAR page of PAGE bytes.
            unsafe { guest.fill_from(0, device as *const u8, PAGE as usize) };
        }
        let admin_page = regs::doorbell_page(0, self.att.dstrd()) * PAGE;
        let trapped = self.opts.interception == Interception::Trap || bar_offset == admin_page;
        if bar_offset != admin_page {
            let mode = if trapped {
                DoorbellMode::Trapped
            } else {
                DoorbellMode::Redirected { host: guest.addr() }
            };
            // SAFETY: the page lives in `Running` until the mode changes back.
            unsafe { self.att.set_doorbell_mode(slots, bar_offset, mode) }
                .map_err(hook(format!("intercepting doorbell page {bar_offset:#x}")))?;
        }
        Ok(DoorbellPage {
            bar_offset,
            guest,
            device,
            trapped,
        })
    }

    /// Gives the doorbell page at `bar_offset` back to the guest (the admin page stays
    /// trapped: the mediation needs it).
    pub(crate) fn release_page(
        &self,
        slots: &vmm::memslots::MemorySlots,
        bar_offset: u64,
    ) -> Result<()> {
        if bar_offset == regs::doorbell_page(0, self.att.dstrd()) * PAGE {
            return Ok(());
        }
        // SAFETY: the device's own page, kept mapped by the attachment.
        unsafe {
            self.att
                .set_doorbell_mode(slots, bar_offset, DoorbellMode::Mapped)
        }
        .map_err(hook(format!("mapping doorbell page {bar_offset:#x} back")))
    }

    /// Trap mode: trapped doorbell writes of shadowed queues land in the hypervisor pages the
    /// poller reads.
    pub(crate) fn install_hook(
        &self,
        pages: &[DoorbellPage],
        queues: &[QueueRt],
        wakeups: &irq::Wakeups,
    ) {
        let routes: Vec<(u16, Arc<HostPages>, usize, usize)> = queues
            .iter()
            .filter(|q| pages[q.page].trapped)
            .map(|q| {
                (
                    q.q.geometry().qid,
                    pages[q.page].guest.clone(),
                    q.sq_off,
                    q.cq_off,
                )
            })
            .collect();
        if routes.is_empty() {
            return;
        }
        let wake = wakeups.wake.try_clone().ok();
        self.att
            .set_doorbell_hook(Some(Arc::new(move |qid, is_cq, value| {
                match routes.iter().find(|r| r.0 == qid) {
                    Some((_, page, sq_off, cq_off)) => {
                        page.store_u32(if is_cq { *cq_off } else { *sq_off }, value);
                        if let Some(w) = &wake {
                            let _ = w.write(1);
                        }
                        true
                    }
                    None => false,
                }
            })));
    }

    /// Pages the device wrote for completed commands since the last call.
    pub fn take_dirty(&self) -> Vec<u64> {
        match &*self.active() {
            Some(a) => std::mem::take(&mut a.shared.lock().dirty),
            None => Vec::new(),
        }
    }

    /// Queues with work left: a doorbell value the poller has not taken yet, a pending
    /// submission or a command in flight (queue, pending, in flight).
    fn busy(run: &Running) -> Vec<(u16, u32, usize)> {
        run.queues
            .iter()
            .filter(|q| {
                let page = &run.pages[q.page].guest;
                page.load_u32(q.sq_off) != Some(q.seen_sq)
                    || q.q.pending() > 0
                    || q.q.in_flight() > 0
            })
            .map(|q| (q.q.geometry().qid, q.q.pending(), q.q.in_flight()))
            .collect()
    }

    /// Waits (bounded) until every queue is idle (see [`Engine::busy`]) and stops the poller
    /// with the queues still idle. The guest must be paused.
    fn drain_and_stop(a: &mut Active, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            Self::start_poller(a)?;
            let busy = Self::busy(&a.shared.lock());
            if busy.is_empty() {
                Self::stop_poller(a);
                // The poller may have taken a doorbell between the look and the stop.
                if Self::busy(&a.shared.lock()).is_empty() {
                    return Ok(());
                }
                continue;
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Engine(format!(
                    "the device did not drain within {timeout:?}: (queue, pending, in flight) = {busy:?}"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Brings every held, idle queue's device positions onto the guest's (fillers), bounded.
    fn align_all(run: &mut Running, timeout: Duration) -> Result<u64> {
        let mut fillers = 0;
        let t0 = Instant::now();
        let Running {
            queues,
            pages,
            bufs,
            ..
        } = run;
        for q in queues.iter_mut() {
            q.q.hold(true);
            if q.q.in_sync() {
                q.q.hold(false);
                continue;
            }
            fillers += q.q.start_alignment()?;
            loop {
                let step = q.q.alignment_step(bufs)?;
                if let Some(t) = step.sq_tail {
                    pages[q.page].ring(q.sq_off, t);
                }
                if let Some(h) = step.cq_head {
                    pages[q.page].ring(q.cq_off, h);
                }
                if step.done {
                    break;
                }
                if t0.elapsed() >= timeout {
                    return Err(Error::Realign {
                        qid: q.q.geometry().qid,
                        reason: format!("fillers did not complete within {timeout:?}"),
                    });
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(fillers)
    }

    fn stop_poller(a: &mut Active) {
        a.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(p) = a.poller.take() {
            let _ = p.join();
        }
    }

    fn start_poller(a: &mut Active) -> Result<()> {
        if a.poller.is_none() {
            a.shared
                .stop
                .store(false, std::sync::atomic::Ordering::SeqCst);
            a.poller = Some(poller::spawn(a.shared.clone())?);
        }
        Ok(())
    }

    /// With the vCPUs paused: finishes pending and in-flight work (bounded), stops the
    /// poller, and makes guest RAM hold the guest's view of the ring pages, which are added to
    /// the dirty pages. Shadow mode stays on (for a rollback) until [`Engine::leave`].
    pub fn quiesce(&self) -> Result<()> {
        let mut guard = self.active();
        let a = guard
            .as_mut()
            .ok_or_else(|| Error::Engine("quiesce outside shadow mode".into()))?;
        Self::drain_and_stop(a, self.opts.drain_timeout)?;
        let mut run = a.shared.lock();
        for q in &mut run.queues {
            q.q.hold(true);
        }
        let pages = Self::rings_to_ram(a, &run.bufs)?;
        run.dirty.extend(pages);
        Ok(())
    }

    /// Undoes [`Engine::quiesce`] without leaving shadow mode (a failed migration of a VM in
    /// continuous shadow mode).
    pub fn resume_after_quiesce(&self) -> Result<()> {
        let mut guard = self.active();
        let Some(a) = guard.as_mut() else {
            return Ok(());
        };
        for q in &mut a.shared.lock().queues {
            q.q.hold(false);
        }
        Self::start_poller(a)
    }

    /// Drops the collected dirty pages except the ring pages (the unsafe negative control:
    /// what the device wrote into data buffers is not reported).
    pub fn discard_data_dirty(&self) {
        if let Some(a) = &*self.active() {
            let copies = a.copies.clone();
            a.shared
                .lock()
                .dirty
                .retain(|p| copies.iter().any(|c| c.gpa.contains(p)));
        }
    }

    /// The state to send at switchover (after [`Engine::quiesce`]).
    pub fn saved(&self) -> Result<device::SavedDevice> {
        let guard = self.active();
        let a = guard
            .as_ref()
            .ok_or_else(|| Error::Engine("save outside shadow mode".into()))?;
        let run = a.shared.lock();
        let (asq, acq, pending) = self.att.admin_positions();
        if pending > 0 {
            return Err(Error::Engine(format!(
                "{pending} guest admin command(s) are still pending at the switchover"
            )));
        }
        // The configuration as it is now (the guest may have deleted queues or shut the
        // controller down since shadowing began); queues it deleted are not sent.
        let config = self.att.config_log();
        let live: Vec<&QueueRt> = run
            .queues
            .iter()
            .filter(|q| {
                let g = q.q.geometry();
                config
                    .io_sqs
                    .get(&g.qid)
                    .is_some_and(|s| s.base == g.sq_base)
                    && config
                        .io_cqs
                        .get(&g.qid)
                        .is_some_and(|c| c.base == g.cq_base)
            })
            .collect();
        if live.len() != config.io_sqs.len() {
            return Err(Error::Engine(format!(
                "the guest created {} I/O queue(s) the engine does not shadow",
                config.io_sqs.len() - live.len()
            )));
        }
        Ok(device::SavedDevice {
            admin: (asq, acq),
            msix: self.att.msix_state(),
            config,
            limits: a.limits,
            dstrd: a.dstrd,
            queues: live.iter().map(|q| q.q.state()).collect(),
            doorbells: live
                .iter()
                .map(|q| {
                    let p = &run.pages[q.page].guest;
                    (
                        p.load_u32(q.sq_off).unwrap_or(0),
                        p.load_u32(q.cq_off).unwrap_or(0),
                    )
                })
                .collect(),
        })
    }

    /// Leaves shadow mode: pauses the vCPUs, drains (bounded), re-aligns if commands were
    /// refused, copies the guest's view back into RAM, swaps the slots back, maps the
    /// device's doorbell pages again with the guest's last values rung, resumes.
    pub fn leave(&self, vm: &Vm) -> Result<()> {
        let mut guard = self.active();
        let Some(a) = guard.as_mut() else {
            return Ok(());
        };
        vm.pause()
            .map_err(vmm_err("pausing the vCPUs to leave shadow mode"))?;
        let result = self.leave_paused(vm, a);
        let resumed = vm.resume().map_err(vmm_err("resuming the vCPUs"));
        match result {
            Ok(()) => {
                if let Some(a) = guard.take() {
                    self.release_vectors(&a.shared.wakeups);
                }
                self.counts.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
                tracing::info!("shadow mode left; the queues run direct");
                resumed
            }
            Err(e) => {
                // Still shadowed: keep forwarding so the guest is not stuck.
                let _ = Self::start_poller(a);
                for q in &mut a.shared.lock().queues {
                    q.q.hold(false);
                }
                Err(e)
            }
        }
    }

    fn leave_paused(&self, vm: &Vm, a: &mut Active) -> Result<()> {
        let slots = vm.memory_slots();
        {
            let mut run = a.shared.lock();
            for q in &mut run.queues {
                q.q.hold(false);
            }
        }
        Self::drain_and_stop(a, self.opts.drain_timeout)?;
        let mut run = a.shared.lock();
        // Forward whatever completed between the drain's last look and the stop.
        let Running {
            queues,
            bufs,
            dirty,
            ..
        } = &mut *run;
        for q in queues.iter_mut() {
            let _ = q.q.forward_completions(bufs, dirty);
        }
        Self::align_all(&mut run, self.opts.drain_timeout)?;
        for q in &run.queues {
            if !q.q.in_sync() {
                return Err(Error::Engine(format!(
                    "queue {} is not in sync after the drain",
                    q.q.geometry().qid
                )));
            }
        }
        // Both sides agree: the guest's view becomes RAM again, and the device's.
        Self::rings_to_ram(a, &run.bufs)?;
        if a.designation == Designation::DeviceBuffer {
            self.wait_admin_idle()?;
        }
        while let Some(r) = a.remapped.first().cloned() {
            self.move_back(slots, a.designation, &r)?;
            a.remapped.remove(0);
        }
        self.att.set_doorbell_hook(None);
        for p in &run.pages {
            for q in run
                .queues
                .iter()
                .filter(|q| run.pages[q.page].bar_offset == p.bar_offset)
            {
                let sq = p.guest.load_u32(q.sq_off).unwrap_or(0);
                let cq = p.guest.load_u32(q.cq_off).unwrap_or(0);
                p.ring(q.sq_off, sq);
                p.ring(q.cq_off, cq);
            }
            self.release_page(slots, p.bar_offset)?;
        }
        // Drained: no command reads a bounced list any more.
        self.unmap_bounce(&std::mem::take(&mut a.bounce));
        let stats: Vec<QueueStats> = run.queues.iter().map(|q| q.q.stats()).collect();
        tracing::info!(
            shadowed_ms = a.entered.elapsed().as_millis() as u64,
            ?stats,
            "shadow mode ending"
        );
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(a) = self.active().as_mut() {
            Self::stop_poller(a);
        }
    }
}

//! The shadow engine: owns the ring copies, the designation, the doorbell interception and the
//! poller thread, and drives one [`NvmeQueue`] adapter per I/O queue pair of a passthrough
//! NVMe device through the attachment's [`DeviceHooks`].
//!
//! - [`memory`]: host pages, the ring copies and the adapters' [`crate::Buffers`] view;
//! - [`poller`]: the thread that moves doorbells and completions while shadowed;
//! - [`device`]: the engine as a [`migration::MigratableDevice`] (source side).
pub mod checks;
pub mod cost;
pub mod device;
mod enter;
pub mod irq;
mod live;
pub mod memory;
pub mod net;
pub mod net_device;
pub mod net_migrate;
mod net_poller;
mod poller;
mod quiesce;
mod restore;

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvme_device::wake;
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
pub use restore::PreparedRestore;

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
    /// The device's wake protocol, if it speaks it: [`DoorbellPage::ring`] kicks it.
    pub wake: Option<DeviceWake>,
}

impl DoorbellPage {
    /// Rings the device: a volatile store into its doorbell page, then a kick of its polling
    /// thread if it sleeps (one fence and one load when it does not).
    pub fn ring(&self, offset: usize, value: u32) {
        if offset.is_multiple_of(4) && offset + 4 <= PAGE as usize {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            // SAFETY: `device` is a page of the attachment's BAR mapping, which the engine's
            // `Arc<Attachment>` keeps alive; the offset is inside it and aligned.
            unsafe { std::ptr::write_volatile((self.device as *mut u8).add(offset).cast(), value) }
            if let Some(w) = &self.wake {
                wake::kick_word(w.words().device);
            }
        }
    }
}

/// The stand-in device's wake words ([`nvme_device::wake`]) in its first doorbell page, found
/// by its magic there. A device without them (a real controller) is rung without kicks and
/// the poller sleeps on timers.
#[derive(Clone, Copy)]
pub(crate) struct DeviceWake {
    /// Host address of the first doorbell page (the attachment's BAR mapping).
    page: u64,
}

impl DeviceWake {
    /// The words of the device behind `att`, if it speaks the protocol.
    pub fn of(att: &Attachment) -> Option<Self> {
        let page = att.device_page(regs::DOORBELL_BASE)?;
        // SAFETY: a page of the attachment's BAR mapping, alive while `att` is; the words
        // are dropped at once.
        unsafe { wake::words(page as *mut u8) }.map(|_| DeviceWake { page })
    }

    /// The protocol's words.
    pub fn words(&self) -> wake::Words<'_> {
        // SAFETY: `page` is a page of the BAR mapping of the attachment that every holder of
        // a `DeviceWake` (the engine's state, its doorbell pages) keeps alive with an `Arc`.
        unsafe { wake::words_unchecked(self.page as *mut u8) }
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
    /// A vCPU found the poller inside a round and left it a trapped doorbell to take.
    pub kick: AtomicBool,
    /// The poller is blocking on [`irq::Wakeups::block`]: a vCPU that forwarded wakes it.
    pub parked: AtomicBool,
    /// What wakes the poller (device interrupts taken over, trapped doorbells).
    pub wakeups: irq::Wakeups,
    /// The device, to interrupt the guest through.
    pub att: Arc<Attachment>,
    /// The device's wake protocol, if it speaks it: the poller sleeps on its host word,
    /// which the device kicks when it completes commands.
    pub device_wake: Option<DeviceWake>,
    /// The poller's sleeps on the host word, and those a kick ended.
    pub sleeps: AtomicU64,
    pub woken: AtomicU64,
    /// The poller's `sched_yield`s between rounds (the core handed over without sleeping).
    pub yields: AtomicU64,
    /// The poller was stopped by a quiesce: when it ends it leaves the device's "the host
    /// kicks" word set, so a device given no more doorbells sleeps after its short spin
    /// window instead of spinning a millisecond in the downtime, on a core the switchover
    /// needs.
    pub keep_host_kicks: AtomicBool,
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
    /// While shadowed: guest admin commands the admin SQ guard refused.
    pub admin_refused: Option<u64>,
    /// While shadowed: how the poller waited (None without the device's wake protocol).
    pub poller: Option<PollerStatus>,
}

/// How the poller waited for the device's completion kick ([`nvme_device::wake`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PollerStatus {
    /// Sleeps on the host word.
    pub sleeps: u64,
    /// Those that a kick ended (the device's completions, a vCPU's trapped doorbell) rather
    /// than their time bound.
    pub woken: u64,
    /// Rounds the poller ended with a `sched_yield` instead (the core handed over to the
    /// device or the vCPU without a sleep and a wake-up).
    pub yields: u64,
}

/// The shadow engine of one passthrough NVMe device.
pub struct Engine {
    att: Arc<Attachment>,
    opts: EngineOptions,
    active: Mutex<Option<Active>>,
    counts: Mutex<(u64, u64)>,
    /// A destination's engine rebuilt on the preparation made from the pre-copy state
    /// (nothing replayed in the downtime).
    from_precopy: bool,
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
    passthrough::identity::hypervisor_iova(ram)
}

/// Where the bounce areas start, above [`hypervisor_iova`].
const BOUNCE_IOVA_OFFSET: u64 = 1 << 30;

/// Largest transfer the validator lets through while shadowed, whatever the device's MDTS:
/// it bounds every PRP walk (513 entries) and every bounce slot (2 pages).
pub const MAX_SHADOW_TRANSFER: u64 = 2 << 20;

/// The validator's limits from the log's namespaces and MDTS, which the attachment fills in
/// from the hypervisor's own Identify of the device (never from guest RAM).
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
    if !ns.block_size.is_power_of_two() || !(512..=65536).contains(&ns.block_size) {
        return Err(Error::Engine(format!(
            "namespace {nsid} has a block size of {} bytes; refusing to shadow",
            ns.block_size
        )));
    }
    let max_transfer = match mdts {
        0 => 65536 * ns.block_size as u64,
        m => 4096u64 << m.min(18),
    }
    .min(MAX_SHADOW_TRANSFER);
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
            from_precopy: false,
        }
    }

    /// True when this destination's engine was rebuilt on the device prepared from the
    /// source's pre-copy state ([`Engine::restore_prepared`] found it fit), so the downtime
    /// replayed nothing.
    pub fn restored_from_precopy(&self) -> bool {
        self.from_precopy
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
            admin_refused: self.att.admin_guard_refused(),
            poller: a.as_ref().and_then(|a| {
                a.shared.device_wake.map(|_| PollerStatus {
                    sleeps: a.shared.sleeps.load(std::sync::atomic::Ordering::Relaxed),
                    woken: a.shared.woken.load(std::sync::atomic::Ordering::Relaxed),
                    yields: a.shared.yields.load(std::sync::atomic::Ordering::Relaxed),
                })
            }),
        }
    }

    /// Tells the poller to stop, without waiting for it to end.
    fn signal_stop(a: &Active) {
        a.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A poller blocking on its events wakes now, not at the end of its bound.
        let _ = a.shared.wakeups.wake.write(1);
        if let Some(w) = &a.shared.device_wake {
            wake::kick_word(w.words().host);
        }
    }

    /// Stops the poller and waits for it to end; the device's "the host kicks" word is
    /// clear afterwards.
    fn stop_poller(a: &mut Active) {
        Self::signal_stop(a);
        if let Some(p) = a.poller.take() {
            let _ = p.join();
        }
        if a.shared
            .keep_host_kicks
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            if let Some(w) = &a.shared.device_wake {
                w.words()
                    .host_kicks
                    .store(0, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    fn start_poller(a: &mut Active) -> Result<()> {
        if a.shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
            // A poller told to stop (by a quiesce) that may not have ended yet.
            if let Some(p) = a.poller.take() {
                let _ = p.join();
            }
        }
        a.shared
            .keep_host_kicks
            .store(false, std::sync::atomic::Ordering::SeqCst);
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
        let t0 = Instant::now();
        let in_flight: usize = a.shared.lock().queues.iter().map(|q| q.q.in_flight()).sum();
        Self::stop_for_drain(a);
        let a = &*a;
        let (mut run, rounds) = Self::drain_held(a, self.opts.drain_timeout)?;
        let drained = t0.elapsed();
        let pages = Self::rings_to_ram(a, &run.bufs)?;
        run.dirty.extend(pages);
        tracing::debug!(
            in_flight,
            rounds,
            drain_ms = drained.as_secs_f64() * 1e3,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "quiesced: in-flight commands drained, rings in RAM"
        );
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
        self.unguard(slots);
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

#[cfg(test)]
mod limit_tests {
    use std::collections::BTreeMap;

    use passthrough::config_log::NamespaceInfo;

    use super::*;

    fn log(mdts: u8, block_size: u32) -> ConfigLog {
        ConfigLog {
            mdts: Some(mdts),
            namespaces: BTreeMap::from([(
                1,
                NamespaceInfo {
                    block_size,
                    blocks: 1 << 20,
                },
            )]),
            ..Default::default()
        }
    }

    /// A device without a transfer limit (MDTS 0) does not make one command cost a million
    /// list entries: the PRP walk and the bounce slots stay bounded.
    #[test]
    fn limits_are_bounded_whatever_the_device_says() {
        let l = limits_from(&log(0, 4096)).unwrap();
        assert_eq!(l.max_transfer, MAX_SHADOW_TRANSFER);
        assert!(checks::bounce_pages_per_slot(l) <= 2);
        assert_eq!(limits_from(&log(5, 512)).unwrap().max_transfer, 128 << 10);
        for bad in [0, 100, 1 << 20] {
            assert!(limits_from(&log(5, bad)).is_err(), "{bad}");
        }
    }
}

//! The shadow engine of a passthrough virtio-net device: one [`VirtQueue`] adapter per
//! enabled virtqueue (RX and TX), the ring pages' copies as the vCPU buffer (the guest's
//! memory slots over them are swapped onto the copies; the device keeps DMAing guest RAM,
//! which is the device buffer), and the guest's notifications intercepted:
//!
//! - [`Interception::Poll`]: a hypervisor page backs the notification page in the guest's
//!   view (no exits); the poller reads every queue's available index each round;
//! - [`Interception::Trap`]: notification writes exit and the BAR0 trap hands the queue
//!   index to [`net_poller::forward_on_vcpu`], which validates and forwards on that vCPU.
//!
//! Either way the poller forwards the device's used entries and records the pages the device
//! wrote (receive buffers) as dirty. MSI-X vectors of the queues are taken over from KVM, so
//! the guest is interrupted only after its used ring holds the entries.
//!
//! The generic parts are the NVMe engine's: [`HostPages`], [`Copy`], [`EngineBuffers`] and
//! [`irq::Wakeups`]; what is virtio's is here and in [`net_poller`](super::net_poller).
use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Instant,
};

use passthrough::virtio_net::NetAttachment;
use serde::Serialize;
use virtio_spec::pci::NO_VECTOR;
use vmm::Vm;

use super::{
    irq,
    memory::{copy_regions, page_regions, Copy, Designation, EngineBuffers, HostPages, PAGE},
    net_poller, EngineOptions, Interception,
};
use crate::{
    virtio::{chain::ChainLimits, VirtQueue, VirtqGeometry, VirtqState, VirtqStats},
    Error, Result, RingAdapter,
};

/// Where a virtqueue is and how the device and the guest reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QueuePlace {
    /// Ring addresses and size.
    pub geo: VirtqGeometry,
    /// `queue_notify_off`.
    pub notify_off: u16,
    /// The guest's MSI-X vector (`NO_VECTOR` for none).
    pub msix_vector: u16,
}

/// One shadowed virtqueue.
pub(crate) struct NetQueueRt {
    pub q: VirtQueue,
    pub notify_off: u16,
    /// The guest's MSI-X vector for this queue, when taken over.
    pub vector: Option<u16>,
    /// Errors reaching the buffers or the device (counted; the queue keeps going).
    pub errors: u64,
}

impl NetQueueRt {
    /// Counts a failure; logs the 1st, 2nd, 4th, 8th, … of them.
    pub fn note_error(&mut self, what: &str, e: &(dyn std::error::Error + 'static)) {
        self.errors += 1;
        if self.errors.is_power_of_two() {
            tracing::warn!(
                queue = self.q.geometry().index,
                errors = self.errors,
                "{what}: {}",
                vmm::ErrorChain(e)
            );
        }
    }
}

/// What the poller works on.
pub(crate) struct NetRunning {
    pub queues: Vec<NetQueueRt>,
    pub bufs: EngineBuffers,
    /// Device-written pages not yet taken by a migration.
    pub dirty: Vec<u64>,
    /// Vectors to send the guest after the state lock is released.
    pub pending_irqs: Vec<u16>,
}

pub(crate) struct NetShared {
    pub state: Mutex<NetRunning>,
    pub stop: AtomicBool,
    /// A vCPU found the poller inside a round: it looks again before it idles.
    pub kick: AtomicBool,
    pub wakeups: irq::Wakeups,
    pub att: Arc<NetAttachment>,
    /// Notifications the vCPUs sent while shadowed (trap mode).
    pub trapped: AtomicU64,
    /// Notifications the engine sent the device.
    pub device_notifies: AtomicU64,
    /// A queue broke (the guest's available index jumped) and DEVICE_NEEDS_RESET was
    /// reported: once per shadow session (a reset ends it).
    pub needs_reset: AtomicBool,
    /// Times DEVICE_NEEDS_RESET was reported, over every session of the engine.
    pub needs_reset_reports: Arc<AtomicU64>,
}

impl NetShared {
    pub fn lock(&self) -> MutexGuard<'_, NetRunning> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct NetActive {
    pub(super) shared: Arc<NetShared>,
    poller: Option<JoinHandle<()>>,
    /// Kept alive while the guest's slots point at them.
    _copies: Arc<Vec<Copy>>,
    remapped: Vec<Range<u64>>,
    /// Poll mode: the page backing the notification page.
    notify_page: Option<HostPages>,
    interception: Interception,
    entered: Instant,
}

impl NetActive {
    pub(super) fn copies(&self) -> &Arc<Vec<Copy>> {
        &self._copies
    }
}

/// A virtqueue's counters and positions, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct NetQueueStatus {
    /// Positions and counters.
    pub state: VirtqState,
    /// Chains in flight on the device.
    pub in_flight: usize,
    /// Buffer or device access errors.
    pub errors: u64,
}

/// What the virtio-net engine is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NetEngineStatus {
    /// Shadow mode is on.
    pub shadowed: bool,
    /// While shadowed: how notifications are intercepted.
    pub interception: Option<Interception>,
    /// While shadowed: the ring ranges (guest-physical start, end) moved onto the copies.
    pub remapped: Vec<(u64, u64)>,
    /// Per-queue status.
    pub queues: Vec<NetQueueStatus>,
    /// Notifications trapped from the guest.
    pub trapped_notifies: u64,
    /// Notifications sent to the device.
    pub device_notifies: u64,
    /// Device-written pages recorded (not yet taken).
    pub dirty_pages: usize,
    /// While shadowed: the MSI-X vectors taken over.
    pub interrupts: Vec<irq::VectorStatus>,
    /// Times shadow mode was entered.
    pub entered: u64,
    /// Times the engine reported DEVICE_NEEDS_RESET to the guest (a queue it shadowed broke).
    pub needs_reset: u64,
    /// Per queue index: counters summed over every shadow session so far (a guest reset or
    /// leaving shadow mode drops a session's queues, not these).
    pub totals: Vec<NetQueueTotals>,
}

/// A queue's counters over every shadow session.
#[derive(Clone, Debug, Serialize)]
pub struct NetQueueTotals {
    /// The queue's index.
    pub index: u16,
    /// Summed counters.
    pub stats: VirtqStats,
}

/// The shadow engine of one passthrough virtio-net device.
pub struct NetEngine {
    att: Arc<NetAttachment>,
    opts: EngineOptions,
    active: Mutex<Option<NetActive>>,
    entered: AtomicU64,
    /// Counters of the queues of sessions that ended, by queue index.
    retired: Mutex<Vec<NetQueueTotals>>,
    needs_reset_reports: Arc<AtomicU64>,
}

pub(super) fn net_err(what: &'static str) -> impl FnOnce(passthrough::Error) -> Error {
    move |source| Error::Hook {
        what: what.into(),
        source,
    }
}

impl NetEngine {
    /// An engine for `att`, in direct mode. Only the vCPU-buffer designation exists for
    /// virtio-net (the device-buffer one needs the device idle, and a receive queue never is).
    pub fn new(att: Arc<NetAttachment>, opts: EngineOptions) -> Result<Self> {
        if opts.designation != Designation::VcpuBuffer {
            return Err(Error::Engine(
                "virtio-net is shadowed with the copy as the vCPU buffer only: the \
                 device-buffer designation needs the device idle, and a receive queue never is"
                    .into(),
            ));
        }
        Ok(NetEngine {
            att,
            opts,
            active: Mutex::new(None),
            entered: AtomicU64::new(0),
            retired: Mutex::new(Vec::new()),
            needs_reset_reports: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Options.
    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    /// The attachment.
    pub fn attachment(&self) -> &Arc<NetAttachment> {
        &self.att
    }

    fn active(&self) -> MutexGuard<'_, Option<NetActive>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn active_guard(&self) -> MutexGuard<'_, Option<NetActive>> {
        self.active()
    }

    pub(super) fn set_active(&self, a: NetActive) {
        *self.active() = Some(a);
        self.entered.fetch_add(1, Ordering::Relaxed);
    }

    /// True while shadow mode is on.
    pub fn is_shadowed(&self) -> bool {
        self.active().is_some()
    }

    /// Adds the counters of a session's queues to the totals.
    pub(super) fn retire(&self, shared: &NetShared) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for q in &shared.lock().queues {
            add_totals(&mut retired, q.q.geometry().index, &q.q.stats());
        }
    }

    /// Positions and counters.
    pub fn status(&self) -> NetEngineStatus {
        let a = self.active();
        let mut st = NetEngineStatus {
            entered: self.entered.load(Ordering::Relaxed),
            needs_reset: self.needs_reset_reports.load(Ordering::Relaxed),
            totals: self
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ..Default::default()
        };
        if let Some(a) = a.as_ref() {
            let run = a.shared.lock();
            st.shadowed = true;
            st.interception = Some(a.interception);
            st.remapped = a.remapped.iter().map(|r| (r.start, r.end)).collect();
            st.queues = run
                .queues
                .iter()
                .map(|q| NetQueueStatus {
                    state: q.q.state(),
                    in_flight: q.q.in_flight(),
                    errors: q.errors,
                })
                .collect();
            st.dirty_pages = run.dirty.len();
            st.trapped_notifies = a.shared.trapped.load(Ordering::Relaxed);
            st.device_notifies = a.shared.device_notifies.load(Ordering::Relaxed);
            st.interrupts = a.shared.wakeups.status();
            for q in &st.queues {
                add_totals(&mut st.totals, q.state.geometry.index, &q.state.stats);
            }
        }
        st.totals.sort_by_key(|t| t.index);
        st
    }

    /// Device-written pages recorded since the last call (receive buffers, used rings).
    pub fn take_dirty(&self) -> Vec<u64> {
        let a = self.active();
        let Some(a) = a.as_ref() else {
            return Vec::new();
        };
        let mut d = std::mem::take(&mut a.shared.lock().dirty);
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Enters shadow mode for every enabled virtqueue (the driver must have set DRIVER_OK);
    /// pauses the vCPUs briefly.
    pub fn enter(&self, vm: &Vm) -> Result<()> {
        let mut active = self.active();
        if active.is_some() {
            return Ok(());
        }
        vm.pause().map_err(|source| Error::Vmm {
            what: "pausing the vCPUs to enter shadow mode".into(),
            source,
        })?;
        let t0 = Instant::now();
        let result = self.enter_paused(vm);
        let resumed = vm.resume().map_err(|source| Error::Vmm {
            what: "resuming the vCPUs".into(),
            source,
        });
        let a = result?;
        resumed?;
        tracing::info!(
            queues = a.shared.lock().queues.len(),
            interception = ?a.interception,
            pause_us = t0.elapsed().as_micros() as u64,
            "virtio-net shadow mode entered"
        );
        *active = Some(a);
        self.entered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn enter_paused(&self, vm: &Vm) -> Result<NetActive> {
        let cfg = self
            .att
            .net_config()
            .map_err(net_err("reading the virtio-net configuration"))?;
        if !virtio_spec::status::is_running(cfg.status) {
            return Err(Error::Engine(format!(
                "the driver has not started the device (status {:#x}); nothing to shadow",
                cfg.status
            )));
        }
        let enabled: Vec<_> = cfg.queues.iter().filter(|q| q.enabled).copied().collect();
        if enabled.is_empty() {
            return Err(Error::Engine("no virtqueue is enabled".into()));
        }
        let places: Vec<QueuePlace> = enabled
            .iter()
            .map(|q| QueuePlace {
                geo: VirtqGeometry {
                    index: q.index,
                    size: q.size,
                    desc: q.desc,
                    avail: q.driver,
                    used: q.device,
                },
                notify_off: q.notify_off,
                msix_vector: q.msix_vector,
            })
            .collect();
        self.install(vm, &places, |bufs| {
            places
                .iter()
                .map(|p| VirtQueue::attach(p.geo, cfg.features, ChainLimits::default(), bufs))
                .collect()
        })
    }

    /// Intercepts the notifications, moves the guest's view of the rings of `places` onto
    /// copies filled from RAM, has `build` make the adapters over them, takes the queues'
    /// vectors over and starts the poller; undoes all of it when a step fails.
    pub(super) fn install(
        &self,
        vm: &Vm,
        places: &[QueuePlace],
        build: impl FnOnce(&EngineBuffers) -> Result<Vec<VirtQueue>>,
    ) -> Result<NetActive> {
        let ram = vm.ram().clone();
        let slots = vm.memory_slots();
        let regions = page_regions(places.iter().flat_map(|p| p.geo.ranges()));
        let mut remapped: Vec<Range<u64>> = Vec::new();
        let mut notify_page: Option<HostPages> = None;
        let interception = self.opts.interception;
        let undo = |remapped: &[Range<u64>], notify_page: &Option<HostPages>| {
            for r in remapped {
                // SAFETY: back to RAM needs no host promise.
                if let Err(e) = unsafe {
                    self.att
                        .remap_guest_range(slots, r.start, r.end - r.start, None)
                } {
                    tracing::error!("undoing a ring remap: {}", vmm::ErrorChain(&e));
                }
            }
            if notify_page.is_some() {
                // SAFETY: taking the slot away needs no host promise.
                let _ = unsafe { self.att.map_notify_page(slots, None) };
            }
            self.att.set_notify_hook(None);
        };
        let result = (|| -> Result<(Arc<Vec<Copy>>, Vec<NetQueueRt>, irq::Wakeups)> {
            // Notifications first: from here on nothing the guest publishes reaches the
            // device unchecked. Trap mode installs the hook once the shared state exists;
            // until then (vCPUs paused) nothing is written.
            if interception == Interception::Poll {
                let page = HostPages::new(PAGE)?;
                // SAFETY: the page is kept in `NetActive` until the slot is removed.
                unsafe { self.att.map_notify_page(slots, Some(page.addr())) }
                    .map_err(net_err("mapping a page over the notification page"))?;
                notify_page = Some(page);
            }
            let copies = Arc::new(copy_regions(&ram, &regions)?);
            for c in copies.iter() {
                // SAFETY: the copies live in `NetActive` until the ranges are moved back (or the
                // VM is gone).
                unsafe {
                    self.att.remap_guest_range(
                        slots,
                        c.gpa.start,
                        c.gpa.end - c.gpa.start,
                        Some(c.pages.addr()),
                    )
                }
                .map_err(net_err("moving ring pages onto the copy"))?;
                remapped.push(c.gpa.clone());
            }
            let bufs = EngineBuffers::new(ram.clone(), copies.clone(), Designation::VcpuBuffer);
            let adapters = build(&bufs)?;
            let mut wakeups = irq::Wakeups::new()?;
            let mut queues = Vec::new();
            for (p, vq) in places.iter().zip(adapters) {
                let v = p.msix_vector;
                let vector = (v != NO_VECTOR && !wakeups.vectors.iter().any(|t| t.vector == v))
                    .then(|| self.att.take_interrupt(v))
                    .transpose()
                    .map_err(net_err("taking over a queue's MSI-X vector"))?
                    .map(|fd| {
                        wakeups.vectors.push(irq::TakenVector {
                            vector: v,
                            fd,
                            received: AtomicU64::new(0),
                            injected: AtomicU64::new(0),
                            masked: AtomicU64::new(0),
                        });
                        v
                    })
                    .or((v != NO_VECTOR).then_some(v));
                queues.push(NetQueueRt {
                    q: vq,
                    notify_off: p.notify_off,
                    vector,
                    errors: 0,
                });
            }
            Ok((copies, queues, wakeups))
        })();
        let (copies, queues, wakeups) = match result {
            Ok(v) => v,
            Err(e) => {
                for p in places {
                    if p.msix_vector != NO_VECTOR {
                        self.att.release_interrupt(p.msix_vector);
                    }
                }
                undo(&remapped, &notify_page);
                return Err(e);
            }
        };
        let dirty = queues
            .iter()
            .flat_map(|q| q.q.legacy_device_pages())
            .collect();
        let shared = Arc::new(NetShared {
            state: Mutex::new(NetRunning {
                queues,
                bufs: EngineBuffers::new(ram, copies.clone(), Designation::VcpuBuffer),
                dirty,
                pending_irqs: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            wakeups,
            att: self.att.clone(),
            trapped: AtomicU64::new(0),
            device_notifies: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
            needs_reset_reports: self.needs_reset_reports.clone(),
        });
        if interception == Interception::Trap {
            let s = Arc::downgrade(&shared);
            self.att.set_notify_hook(Some(Arc::new(move |queue| {
                if let Some(s) = s.upgrade() {
                    net_poller::forward_on_vcpu(&s, queue);
                }
            })));
        }
        let poller = match net_poller::spawn(shared.clone()) {
            Ok(p) => p,
            Err(e) => {
                self.release_vectors(&shared.wakeups);
                undo(&remapped, &notify_page);
                return Err(e);
            }
        };
        self.att.set_shadowed(true);
        Ok(NetActive {
            shared,
            poller: Some(poller),
            _copies: copies,
            remapped,
            notify_page,
            interception,
            entered: Instant::now(),
        })
    }

    pub(super) fn release_vectors(&self, w: &irq::Wakeups) {
        for v in &w.vectors {
            self.att.release_interrupt(v.vector);
        }
    }

    /// Leaves shadow mode: pauses the vCPUs, stops the poller, forwards what the device
    /// finished, and — when the device's indexes equal the guest's — copies the guest's view
    /// back into RAM and gives the guest its RAM, notifications and vectors back. A queue
    /// whose indexes differ (refused chains) cannot run direct: shadow mode stays on.
    pub fn leave(&self, vm: &Vm) -> Result<()> {
        let mut guard = self.active();
        let Some(a) = guard.as_mut() else {
            return Ok(());
        };
        vm.pause().map_err(|source| Error::Vmm {
            what: "pausing the vCPUs to leave shadow mode".into(),
            source,
        })?;
        let result = self.leave_paused(vm, a);
        let resumed = vm.resume().map_err(|source| Error::Vmm {
            what: "resuming the vCPUs".into(),
            source,
        });
        match result {
            Ok(()) => {
                if let Some(a) = guard.take() {
                    self.retire(&a.shared);
                    self.release_vectors(&a.shared.wakeups);
                    // Interrupts the device sent while taken over reach the guest now.
                    for q in &a.shared.lock().queues {
                        if let Some(v) = q.vector {
                            let _ = self.att.interrupt_guest(v);
                        }
                    }
                }
                tracing::info!("virtio-net shadow mode left; the queues run direct");
                resumed
            }
            Err(e) => {
                if a.poller.is_none() {
                    a.shared.stop.store(false, Ordering::SeqCst);
                    a.poller = net_poller::spawn(a.shared.clone()).ok();
                }
                Err(e)
            }
        }
    }

    fn leave_paused(&self, vm: &Vm, a: &mut NetActive) -> Result<()> {
        Self::stop_poller(a);
        let mut run = a.shared.lock();
        let NetRunning {
            queues,
            bufs,
            dirty,
            ..
        } = &mut *run;
        for q in queues.iter_mut() {
            let avail = q.q.guest_avail_idx(bufs)?;
            q.q.on_guest_submit(avail, bufs)?;
            q.q.forward_completions(bufs, dirty)?;
        }
        if let Some(q) = queues.iter().find(|q| !q.q.aligned()) {
            return Err(Error::Engine(format!(
                "virtqueue {} is not aligned (the device's indexes differ from the guest's \
                 after refused chains); it stays shadowed",
                q.q.geometry().index
            )));
        }
        for q in queues.iter_mut() {
            // The device may have been asked to suppress notifications differently.
            if q.q.take_device_notify(bufs).unwrap_or(true) {
                let _ = self.att.notify_device(q.notify_off, q.q.geometry().index);
            }
        }
        drop(run);
        self.give_back(vm, a)
    }

    /// The guest's view of the rings becomes RAM again: the guest-written parts (descriptor
    /// tables and available rings) are copied from the copies into RAM; the used rings are
    /// not, RAM holds the device's, which the device may still be writing (a receive queue
    /// always has buffers) and which hold at least what the guest was given. Then the
    /// notification page and hook go, and guest resets reach the device again.
    pub(super) fn give_back(&self, vm: &Vm, a: &mut NetActive) -> Result<()> {
        let slots = vm.memory_slots();
        let ram = vm.ram();
        let guest_parts: Vec<Range<u64>> = a
            .shared
            .lock()
            .queues
            .iter()
            .flat_map(|q| {
                let [desc, avail, _used] = q.q.geometry().ranges();
                [desc, avail]
            })
            .collect();
        for r in guest_parts {
            let Some(c) = a
                ._copies
                .iter()
                .find(|c| c.gpa.start <= r.start && r.end <= c.gpa.end)
            else {
                continue;
            };
            let mut b = vec![0u8; (r.end - r.start) as usize];
            c.pages.read((r.start - c.gpa.start) as usize, &mut b);
            ram.write(r.start, &b).map_err(|source| Error::Vmm {
                what: "copying the rings back into guest RAM".into(),
                source,
            })?;
        }
        while let Some(r) = a.remapped.first().cloned() {
            // SAFETY: back to RAM needs no host promise.
            unsafe {
                self.att
                    .remap_guest_range(slots, r.start, r.end - r.start, None)
            }
            .map_err(net_err("moving ring pages back to RAM"))?;
            a.remapped.remove(0);
        }
        if a.notify_page.take().is_some() {
            // SAFETY: taking the slot away needs no host promise.
            unsafe { self.att.map_notify_page(slots, None) }
                .map_err(net_err("unmapping the notification page"))?;
        }
        self.att.set_notify_hook(None);
        self.att.set_shadowed(false);
        tracing::info!(
            shadowed_ms = a.entered.elapsed().as_millis() as u64,
            "virtio-net shadow mode ending"
        );
        Ok(())
    }

    /// The guest reset the device while shadowed (the attachment holds the reset): drops
    /// every queue's shadow state without draining (the device is about to forget its
    /// queues), gives the guest its RAM back and lets the reset reach the device. Shadow
    /// mode can be entered again once the driver started the device again.
    pub fn reset(&self, vm: &Vm) -> Result<()> {
        let mut guard = self.active();
        if let Some(a) = guard.as_mut() {
            vm.pause().map_err(|source| Error::Vmm {
                what: "pausing the vCPUs for a guest reset".into(),
                source,
            })?;
            Self::stop_poller(a);
            let result = self.give_back(vm, a);
            let resumed = vm.resume().map_err(|source| Error::Vmm {
                what: "resuming the vCPUs".into(),
                source,
            });
            result?;
            if let Some(a) = guard.take() {
                self.retire(&a.shared);
                self.release_vectors(&a.shared.wakeups);
                let stats: Vec<_> = a.shared.lock().queues.iter().map(|q| q.q.stats()).collect();
                tracing::info!(?stats, "virtio-net shadow state dropped for a guest reset");
            }
            resumed?;
        }
        self.att
            .finish_reset()
            .map_err(net_err("giving the device the guest's reset"))
    }

    pub(super) fn stop_poller(a: &mut NetActive) {
        a.shared.stop.store(true, Ordering::SeqCst);
        let _ = a.shared.wakeups.wake.write(1);
        if let Some(p) = a.poller.take() {
            let _ = p.join();
        }
    }
}

impl Drop for NetEngine {
    fn drop(&mut self) {
        self.att.set_notify_hook(None);
        self.att.set_shadowed(false);
        if let Some(a) = self.active().as_mut() {
            Self::stop_poller(a);
        }
    }
}

fn add_totals(totals: &mut Vec<NetQueueTotals>, index: u16, stats: &VirtqStats) {
    match totals.iter_mut().find(|t| t.index == index) {
        Some(t) => t.stats.add(stats),
        None => totals.push(NetQueueTotals {
            index,
            stats: *stats,
        }),
    }
}

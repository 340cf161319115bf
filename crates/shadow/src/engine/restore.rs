//! The destination side: a fresh device is rebuilt from the saved state and its queues run
//! shadowed with index translation until they are re-aligned with fillers.
use std::{
    ops::Range,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Instant,
};

use passthrough::Attachment;
use vmm::Vm;

use super::{
    device::{PrecopyDevice, SavedDevice},
    geometries, limits_from,
    memory::{blank_rings, copy_rings, Bounce, Copy, Designation, EngineBuffers},
    poller, Active, DeviceWake, DoorbellPage, Engine, EngineOptions, QueueRt, Running, Shared,
};
use crate::{
    nvme::{NvmeQueue, QueueGeometry},
    Error, Result,
};

/// A destination's device prepared from the source's pre-copy state
/// ([`Engine::prepare_restore`]) while RAM still arrives: configuration replayed, ring copies
/// in place over the guest's ring pages, PRP-list bounce areas mapped. Handed to
/// [`Engine::restore_prepared`]; dropping it unused leaves the preparation in place until
/// the VM goes (the destination drops it unrun) or a full restore redoes it.
pub struct PreparedRestore {
    engine: Engine,
    pre: PrecopyDevice,
    /// The admin phase the replay used.
    phase: bool,
    geos: Vec<QueueGeometry>,
    copies: Arc<Vec<Copy>>,
    remapped: Vec<Range<u64>>,
    bounce: Arc<Vec<Bounce>>,
    /// The I/O queues' doorbell pages, intercepted.
    pages: Vec<DoorbellPage>,
    /// The poller's thread, started here and waiting for its state (spawning it is then not
    /// part of the downtime).
    poller: Option<poller::Parked>,
}

impl PreparedRestore {
    /// The pre-copy state it was prepared from.
    pub fn precopy(&self) -> &PrecopyDevice {
        &self.pre
    }

    /// True when the switchover state `saved` needs nothing this preparation did not do:
    /// the same device, configuration log, admin positions and phase (as guest RAM holds it
    /// now), limits and queues.
    fn fits(&self, att: &Arc<Attachment>, saved: &SavedDevice) -> bool {
        let mut geos: Vec<QueueGeometry> = saved.queues.iter().map(|q| q.geometry).collect();
        geos.sort_by_key(|g| g.qid);
        let mut mine = self.geos.clone();
        mine.sort_by_key(|g| g.qid);
        Arc::ptr_eq(&self.engine.att, att)
            && self.pre.config == saved.config
            && self.pre.admin == saved.admin
            && self.pre.limits == saved.limits
            && self.pre.dstrd == saved.dstrd
            && mine == geos
            && self.phase == att.admin_phase(&saved.config, saved.admin.1)
    }

    /// Takes the preparation back (admin guard off, bounce areas unmapped, ring ranges on
    /// RAM again) before a full restore replays the device anew.
    fn undo(self, vm: &Vm) {
        let slots = vm.memory_slots();
        let designation = self.engine.opts.designation;
        for p in &self.pages {
            if let Err(e) = self.engine.release_page(slots, p.bar_offset) {
                tracing::warn!(
                    "giving doorbell page {:#x} back after the pre-copy preparation: {}",
                    p.bar_offset,
                    vmm::ErrorChain(&e)
                );
            }
        }
        self.engine.unguard(slots);
        self.engine.unmap_bounce(&self.bounce);
        for r in &self.remapped {
            if let Err(e) = self.engine.move_back(slots, designation, r) {
                tracing::warn!(
                    "moving ring pages {r:?} back after the pre-copy preparation: {}",
                    vmm::ErrorChain(&e)
                );
            }
        }
    }
}

/// Milliseconds since `t0`.
fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

fn hook(what: String) -> impl FnOnce(passthrough::Error) -> Error {
    move |source| Error::Hook { what, source }
}

impl Engine {
    /// Rebuilds the device of `saved` behind `att` in `vm` (restored, not started): the
    /// arrived ring pages become the vCPU-buffer copies, the device is reset and its
    /// configuration replayed through the guest's own admin queue (the I/O queues at the
    /// guest's ring addresses, zeroed), and each queue is rebuilt, held, in
    /// front of the fresh device. Call [`Engine::realign`] once the VM runs, then
    /// [`Engine::leave`].
    pub fn restore(
        vm: &Vm,
        att: Arc<Attachment>,
        saved: &SavedDevice,
        opts: EngineOptions,
    ) -> Result<Self> {
        Self::restore_prepared(vm, att, saved, opts, None)
    }

    /// Source side: the pre-copy state to send now, while the guest runs: the configuration
    /// log, the guest's admin queue positions and phase. None while a guest admin command is
    /// pending or the log changes under the look (asked again next round), or when the log
    /// has nothing to prepare (no queues to shadow, no limits).
    pub fn precopy_state(&self) -> Option<PrecopyDevice> {
        let before = self.att.config_log();
        let (sq_tail, cq_head, pending) = self.att.admin_positions();
        let config = self.att.config_log();
        if pending > 0 || before != config || config.io_sqs.is_empty() {
            return None;
        }
        let limits = limits_from(&config).ok()?;
        geometries(&config).ok()?;
        Some(PrecopyDevice {
            admin_phase: self.att.admin_phase(&config, cq_head),
            config,
            limits,
            dstrd: self.att.dstrd(),
            admin: (sq_tail, cq_head),
            msix: self.att.msix_state(),
        })
    }

    /// Destination side, while RAM still arrives (the VM built, not started): prepares the
    /// device behind `att` from the source's pre-copy state `pre` (validated first: it came
    /// from the network): replays the configuration (reset, enable on the guest's admin
    /// queue, features, I/O queues, admin positions), puts ring copies over the guest's ring
    /// pages and maps the PRP-list bounce areas, so that [`Engine::restore_prepared`] has
    /// only the queues' positions left to do in the downtime.
    pub fn prepare_restore(
        vm: &Vm,
        att: Arc<Attachment>,
        pre: &PrecopyDevice,
        opts: EngineOptions,
    ) -> Result<PreparedRestore> {
        let t0 = Instant::now();
        pre.validate(&att.restore_bounds())?;
        let own = limits_from(&att.config_log())?;
        if own != pre.limits {
            return Err(Error::Engine(format!(
                "the source validated with {:?}, this device is {own:?}",
                pre.limits
            )));
        }
        let geos = geometries(&pre.config)?;
        let engine = Engine::new(att.clone(), opts);
        let ram = vm.ram().clone();
        let slots = vm.memory_slots();
        let designation = opts.designation;
        // Blank now; with the copy as the vCPU buffer the restore fills them with the rings
        // as they arrived.
        let copies = Arc::new(blank_rings(&geos)?);
        // Touched now, so that filling them in the downtime takes no page faults (a page the
        // host took back costs a host fault on first touch).
        for c in copies.iter() {
            c.pages.write(0, &vec![0u8; c.pages.len()]);
        }
        let mut remapped = Vec::new();
        let mut bounce_mapped = None;
        let mut pages: Vec<DoorbellPage> = Vec::new();
        let result = (|| -> Result<bool> {
            for c in copies.iter() {
                engine.move_onto(slots, designation, c)?;
                remapped.push(c.gpa.clone());
            }
            let phase = att
                .replay_with_phase(&pre.config, pre.admin, Some(pre.admin_phase))
                .map_err(hook("replaying the pre-copy configuration".into()))?;
            att.protected().set(
                passthrough::admin_guard::Owner::Engine,
                copies.iter().map(|c| c.gpa.clone()).collect(),
            );
            bounce_mapped = Some(engine.map_bounce(&ram, &geos, pre.limits)?);
            for g in &geos {
                engine.doorbell_place(slots, &mut pages, g.qid, false)?;
            }
            att.restore_msix(&pre.msix)
                .map_err(hook("restoring the guest's MSI-X table".into()))?;
            Ok(phase)
        })();
        let phase = match result {
            Ok(phase) => phase,
            Err(e) => {
                PreparedRestore {
                    engine,
                    pre: pre.clone(),
                    phase: false,
                    geos,
                    copies,
                    remapped,
                    bounce: bounce_mapped.unwrap_or_default(),
                    pages,
                    poller: None,
                }
                .undo(vm);
                return Err(e);
            }
        };
        // Not final: without it the restore spawns the poller itself.
        let poller = poller::spawn_parked()
            .inspect_err(|e| tracing::warn!("starting the poller ahead: {}", vmm::ErrorChain(e)))
            .ok();
        tracing::debug!(
            ms = ms(t0),
            queues = geos.len(),
            "restore prepared from the pre-copy state"
        );
        Ok(PreparedRestore {
            engine,
            pre: pre.clone(),
            phase,
            geos,
            copies,
            remapped,
            bounce: bounce_mapped.unwrap_or_default(),
            pages,
            poller,
        })
    }

    /// As [`Engine::restore`], after [`Engine::prepare_restore`]: when the switchover state
    /// fits the preparation (same configuration, admin positions and phase), the replay,
    /// the ring copies' placement and the bounce areas are taken from it; otherwise (the
    /// guest changed its admin configuration since the pre-copy state, or another device)
    /// the preparation is undone and the device replayed in full.
    pub fn restore_prepared(
        vm: &Vm,
        att: Arc<Attachment>,
        saved: &SavedDevice,
        opts: EngineOptions,
        prepared: Option<PreparedRestore>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        // Everything in `saved` came from the network: check all of it first.
        saved.validate(&att.restore_bounds())?;
        // The limits the source validated with must be this device's, as the hypervisor
        // identified it here.
        let own = super::limits_from(&att.config_log())?;
        if own != saved.limits {
            return Err(Error::Engine(format!(
                "the source validated with {:?}, this device is {own:?}",
                saved.limits
            )));
        }
        tracing::debug!(ms = ms(t0), "restore: state checked");
        let ram = vm.ram().clone();
        let slots = vm.memory_slots();
        let geos: Vec<_> = saved.queues.iter().map(|q| q.geometry).collect();
        let prepared = match prepared {
            Some(p) if p.engine.opts.designation == opts.designation && p.fits(&att, saved) => {
                Some(p)
            }
            Some(p) => {
                tracing::info!(
                    "the device's configuration changed since its pre-copy state: replaying it \
                     in full"
                );
                p.undo(vm);
                None
            }
            None => None,
        };
        let designation = opts.designation;
        let zero_rings = || -> Result<()> {
            if designation == Designation::VcpuBuffer {
                for g in &geos {
                    ram.write(g.sq_base, &vec![0u8; g.sq_entries as usize * 64])
                        .and_then(|_| ram.write(g.cq_base, &vec![0u8; g.cq_entries as usize * 16]))
                        .map_err(|source| Error::Vmm {
                            what: format!("zeroing queue {}'s rings", g.qid),
                            source,
                        })?;
                }
            }
            Ok(())
        };
        let fitted = prepared.is_some();
        let mut parked = None;
        let (mut engine, copies, remapped, bounce, mut pages) = match prepared {
            Some(p) => {
                if designation == Designation::VcpuBuffer {
                    // The copies become the guest's rings as they arrived.
                    for c in p.copies.iter() {
                        let len = c.gpa.end - c.gpa.start;
                        let mut buf = vec![0u8; len as usize];
                        ram.read(c.gpa.start, &mut buf)
                            .map_err(|source| Error::Vmm {
                                what: format!("reading ring pages {:?}", c.gpa),
                                source,
                            })?;
                        c.pages.write(0, &buf);
                    }
                }
                zero_rings()?;
                tracing::debug!(
                    ms = ms(t0),
                    "restore: prepared configuration and ring copies fit"
                );
                parked = p.poller;
                (p.engine, p.copies, p.remapped, p.bounce, p.pages)
            }
            None => {
                let engine = Engine::new(att.clone(), opts);
                // The VM has not started and the device has no queues yet. The device buffer
                // starts clean (a fresh queue must not find stale phase bits); the vCPU
                // buffer holds the guest's rings as they arrived.
                let copies = Arc::new(match designation {
                    Designation::VcpuBuffer => copy_rings(&ram, &geos)?,
                    Designation::DeviceBuffer => blank_rings(&geos)?,
                });
                let mut remapped = Vec::new();
                for c in copies.iter() {
                    // The copies live in `Active` until the ranges are moved back.
                    engine.move_onto(slots, designation, c)?;
                    remapped.push(c.gpa.clone());
                }
                tracing::debug!(ms = ms(t0), "restore: ring copies in place");
                zero_rings()?;
                att.replay(&saved.config, saved.admin)
                    .map_err(hook("replaying the configuration log".into()))?;
                att.protected().set(
                    passthrough::admin_guard::Owner::Engine,
                    copies.iter().map(|c| c.gpa.clone()).collect(),
                );
                tracing::debug!(ms = ms(t0), "restore: configuration replayed");
                let bounce = engine.map_bounce(&ram, &geos, saved.limits)?;
                tracing::debug!(ms = ms(t0), "restore: bounce areas mapped");
                (engine, copies, remapped, bounce, Vec::new())
            }
        };
        engine.from_precopy = fitted;
        let dstrd = att.dstrd();

        let bufs = EngineBuffers::new(ram.clone(), copies.clone(), designation)
            .with_bounce(bounce.clone())
            .with_protected(att.protected());
        let mut queues = Vec::new();
        for (state, &(sq, cq)) in saved.queues.iter().zip(&saved.doorbells) {
            let place = engine.doorbell_place(slots, &mut pages, state.geometry.qid, false)?;
            // The guest's doorbells read back what it last wrote on the source.
            pages[place.0].guest.store_u32(place.1, sq);
            pages[place.0].guest.store_u32(place.2, cq);
            let q = NvmeQueue::rebuild(state, saved.limits, &bufs)?;
            queues.push(QueueRt::new(q, place, (sq, cq)));
        }
        tracing::debug!(
            ms = ms(t0),
            "restore: doorbells intercepted, queues rebuilt"
        );
        // A prepared device has the pre-copy MSI-X state already: programmed again only if
        // the guest changed it since.
        if !fitted || att.msix_state() != saved.msix {
            att.restore_msix(&saved.msix)
                .map_err(hook("restoring the guest's MSI-X table".into()))?;
        }
        tracing::debug!(ms = ms(t0), "restore: MSI-X table restored");
        let wakeups = engine.take_vectors(&saved.config, &pages, &mut queues)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(Running {
                queues,
                pages,
                bufs,
                dirty: Vec::new(),
                pending_irqs: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            wakeups,
            att: att.clone(),
            device_wake: DeviceWake::of(&att),
            sleeps: Default::default(),
            woken: Default::default(),
            yields: Default::default(),
            keep_host_kicks: AtomicBool::new(false),
        });
        engine.install_hook(&shared);
        let poller = match parked {
            Some(p) => p.start(shared.clone()),
            None => poller::spawn(shared.clone()),
        }
        .inspect_err(|_| {
            engine.release_vectors(&shared.wakeups);
        })?;
        *engine.active() = Some(Active {
            shared,
            poller: Some(poller),
            copies,
            remapped,
            designation,
            bounce,
            limits: saved.limits,
            dstrd,
            entered: Instant::now(),
        });
        engine.counts.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        tracing::debug!(ms = ms(t0), "restore: poller running");
        Ok(engine)
    }

    /// Re-aligns every queue with fillers the guest never sees, while the VM runs; the queues
    /// then forward the guest's work (still shadowed). Returns the fillers used.
    pub fn realign(&self) -> Result<u64> {
        let t0 = Instant::now();
        let guard = self.active();
        let a = guard
            .as_ref()
            .ok_or_else(|| Error::Engine("re-alignment outside shadow mode".into()))?;
        let mut run = a.shared.lock();
        let n = Self::align_all(&mut run, self.opts.drain_timeout)?;
        tracing::info!(
            fillers = n,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "queues re-aligned with the guest's positions"
        );
        Ok(n)
    }
}

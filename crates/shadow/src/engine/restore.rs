//! The destination side: a fresh device is rebuilt from the saved state and its queues run
//! shadowed with index translation until they are re-aligned with fillers.
use std::{
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Instant,
};

use passthrough::Attachment;
use vmm::Vm;

use super::{
    device::SavedDevice,
    memory::{blank_rings, copy_rings, Designation, EngineBuffers},
    poller, Active, DeviceWake, DoorbellPage, Engine, EngineOptions, QueueRt, Running, Shared,
};
use crate::{nvme::NvmeQueue, Error, Result};

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
        let engine = Engine::new(att.clone(), opts);
        let dstrd = att.dstrd();
        let ram = vm.ram().clone();
        let slots = vm.memory_slots();
        let geos: Vec<_> = saved.queues.iter().map(|q| q.geometry).collect();
        // The VM has not started and the device has no queues yet. The device buffer starts
        // clean (a fresh queue must not find stale phase bits); the vCPU buffer holds the
        // guest's rings as they arrived.
        let designation = opts.designation;
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
        att.replay(&saved.config, saved.admin)
            .map_err(hook("replaying the configuration log".into()))?;
        att.protected().set(
            passthrough::admin_guard::Owner::Engine,
            copies.iter().map(|c| c.gpa.clone()).collect(),
        );
        tracing::debug!(ms = ms(t0), "restore: configuration replayed");
        let bounce = engine.map_bounce(&ram, &geos, saved.limits)?;
        tracing::debug!(ms = ms(t0), "restore: bounce areas mapped");

        let bufs = EngineBuffers::new(ram.clone(), copies.clone(), designation)
            .with_bounce(bounce.clone())
            .with_protected(att.protected());
        let mut pages: Vec<DoorbellPage> = Vec::new();
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
        att.restore_msix(&saved.msix)
            .map_err(hook("restoring the guest's MSI-X table".into()))?;
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
        });
        engine.install_hook(&shared);
        let poller = poller::spawn(shared.clone()).inspect_err(|_| {
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
        let guard = self.active();
        let a = guard
            .as_ref()
            .ok_or_else(|| Error::Engine("re-alignment outside shadow mode".into()))?;
        let mut run = a.shared.lock();
        let n = Self::align_all(&mut run, self.opts.drain_timeout)?;
        tracing::info!(fillers = n, "queues re-aligned with the guest's positions");
        Ok(n)
    }
}

//! Leaving shadow mode without pausing the VM (the destination, after re-alignment).
//!
//! 1. Hold every queue's submissions and let the poller finish what is in flight.
//! 2. Doorbells: trap the doorbell pages and record the guest's writes in the hypervisor pages
//!    (the poller is stopped; held work waits).
//! 3. Rings. Copy = vCPU buffer, per copy: remove the copy's slot (guest accesses now exit),
//!    copy the copy into RAM while an MMIO handler on the range holds such accesses back, then
//!    let the handler serve them from RAM, back the range with RAM again, and drop the handler.
//!    Copy = device buffer: the guest already sees RAM; with the I/O queues idle and the admin
//!    proxy held, the device's DMA mapping of the rings goes back to RAM.
//! 4. Ring the device with the guest's last doorbell values under the hook's lock, after
//!    which trapped writes go straight to the device; map the doorbell pages back.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

use passthrough::{bar::DoorbellHook, DeviceHooks};
use vmm::{bus::BusDevice, memory::GuestRam, Vm};

use super::{memory::HostPages, Engine};
use crate::{Error, Result, RingAdapter};

/// Serves a ring range from RAM while its slot is being swapped; accesses wait for `gate`.
struct RingWindow {
    ram: GuestRam,
    base: u64,
    gate: Arc<Mutex<()>>,
}

impl BusDevice for RingWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let gpa = self.base.saturating_add(offset);
        if !(self.ram.contains(gpa, data.len() as u64) && self.ram.read(gpa, data).is_ok()) {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let gpa = self.base.saturating_add(offset);
        if self.ram.contains(gpa, data.len() as u64) {
            let _ = self.ram.write(gpa, data);
        }
    }
}

/// Where trapped doorbell writes go during the exit: into the hypervisor pages until the
/// device has been rung with their values, then to the device.
struct Handover {
    routes: Vec<(u16, Arc<HostPages>, usize, usize)>,
    done: AtomicBool,
    lock: Mutex<()>,
}

impl Engine {
    /// Leaves shadow mode while the VM keeps running (see the module documentation).
    pub fn leave_live(&self, vm: &Vm) -> Result<()> {
        let mut guard = self.active();
        let Some(a) = guard.as_mut() else {
            return Ok(());
        };
        let slots = vm.memory_slots();
        // 1. Hold, drain.
        {
            let mut run = a.shared.lock();
            for q in &mut run.queues {
                q.q.hold(true);
            }
        }
        let t0 = std::time::Instant::now();
        loop {
            let busy = a.shared.lock().queues.iter().any(|q| q.q.in_flight() > 0);
            if !busy {
                break;
            }
            if t0.elapsed() >= self.opts.drain_timeout {
                for q in &mut a.shared.lock().queues {
                    q.q.hold(false);
                }
                return Err(Error::Engine(format!(
                    "in-flight commands did not finish within {:?}",
                    self.opts.drain_timeout
                )));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Self::stop_poller(a);
        let mut run = a.shared.lock();
        // Commands the hypervisor refused moved the guest's positions alone: fillers first.
        if let Err(e) = Self::align_all(&mut run, self.opts.drain_timeout) {
            // Nothing is changed yet: stay in shadow mode, the guest's queues served as before.
            for q in &mut run.queues {
                q.q.hold(false);
            }
            drop(run);
            Self::start_poller(a)?;
            return Err(e);
        }
        // 2. Doorbells: every write lands in the hypervisor pages from now on.
        let handover = Arc::new(Handover {
            routes: run
                .queues
                .iter()
                .map(|q| {
                    (
                        q.q.geometry().qid,
                        run.pages[q.page].guest.clone(),
                        q.sq_off,
                        q.cq_off,
                    )
                })
                .collect(),
            done: AtomicBool::new(false),
            lock: Mutex::new(()),
        });
        let h = handover.clone();
        let hook: DoorbellHook = Arc::new(move |qid, is_cq, value| {
            let _l = h.lock.lock().unwrap_or_else(|e| e.into_inner());
            if h.done.load(Ordering::SeqCst) {
                return false; // to the device
            }
            match h.routes.iter().find(|r| r.0 == qid) {
                Some((_, page, sq_off, cq_off)) => {
                    page.store_u32(if is_cq { *cq_off } else { *sq_off }, value);
                    true
                }
                None => false,
            }
        });
        self.att.set_doorbell_hook(Some(hook));
        for p in run.pages.iter().filter(|p| !p.trapped) {
            // SAFETY: Trapped maps nothing.
            unsafe {
                self.att
                    .set_doorbell_mode(slots, p.bar_offset, passthrough::DoorbellMode::Trapped)
            }
            .map_err(|source| Error::Hook {
                what: format!("trapping doorbell page {:#x}", p.bar_offset),
                source,
            })?;
        }
        // 3. Rings.
        if a.designation == super::Designation::DeviceBuffer {
            // The guest's view is RAM already; the device goes back to it. Its I/O queues are
            // held and idle and, once the guest admin commands on it are done, nothing DMAs
            // while its mapping around the rings is re-made.
            self.wait_admin_idle()?;
            while let Some(r) = a.remapped.first().cloned() {
                self.move_back(slots, a.designation, &r)?;
                a.remapped.remove(0);
            }
        }
        for c in a
            .copies
            .iter()
            .filter(|_| a.designation == super::Designation::VcpuBuffer)
        {
            let gate = Arc::new(Mutex::new(()));
            let window = RingWindow {
                ram: vm.ram().clone(),
                base: c.gpa.start,
                gate: gate.clone(),
            };
            let len = c.gpa.end - c.gpa.start;
            let held = gate.lock().unwrap_or_else(|e| e.into_inner());
            vm.mmio_bus()
                .insert(c.gpa.start, len, Arc::new(Mutex::new(window)))
                .map_err(|source| Error::Vmm {
                    what: format!("placing the ring window at {:#x}", c.gpa.start),
                    source,
                })?;
            let swapped = (|| -> Result<()> {
                self.att
                    .unback_remapped(slots, c.gpa.start)
                    .map_err(|source| Error::Hook {
                        what: format!("unbacking ring pages {:?}", c.gpa),
                        source,
                    })?;
                // The copy is frozen now: make RAM equal to it.
                let mut buf = vec![0u8; c.pages.len()];
                c.pages.read(0, &mut buf);
                vm.ram()
                    .write(c.gpa.start, &buf)
                    .map_err(|source| Error::Vmm {
                        what: format!("syncing ring pages {:?}", c.gpa),
                        source,
                    })?;
                drop(held);
                self.att
                    .back_with_ram(slots, c.gpa.start)
                    .map_err(|source| Error::Hook {
                        what: format!("backing ring pages {:?} with RAM", c.gpa),
                        source,
                    })
            })();
            vm.mmio_bus().remove(c.gpa.start);
            swapped?;
        }
        a.remapped.clear();
        // Held and drained: no command reads a bounced list any more.
        self.unguard(slots);
        self.unmap_bounce(&std::mem::take(&mut a.bounce));
        // 4. The device gets the guest's last doorbell values; later writes go straight to it.
        {
            let _l = handover.lock.lock().unwrap_or_else(|e| e.into_inner());
            for q in &run.queues {
                let p = &run.pages[q.page];
                p.ring(q.sq_off, p.guest.load_u32(q.sq_off).unwrap_or(0));
                p.ring(q.cq_off, p.guest.load_u32(q.cq_off).unwrap_or(0));
            }
            handover.done.store(true, Ordering::SeqCst);
        }
        for p in &run.pages {
            self.release_page(slots, p.bar_offset)?;
        }
        self.att.set_doorbell_hook(None);
        drop(run);
        if let Some(a) = guard.take() {
            self.release_vectors(&a.shared.wakeups);
        }
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        tracing::info!("shadow mode left without pausing the VM; the queues run direct");
        Ok(())
    }
}

//! Entering shadow mode: copying every I/O queue's ring pages, moving one side onto the copy
//! (the guest's memory slots for the vCPU-buffer designation, the device's DMA mapping for the
//! device-buffer one, after the device finished what it had), intercepting the doorbells, and
//! undoing all of it when a step fails.
use super::*;

impl Engine {
    /// Enters shadow mode for every I/O queue in the configuration log (vCPUs paused briefly;
    /// the device keeps running).
    pub fn enter(&self, vm: &Vm) -> Result<()> {
        self.enter_with(vm, true)
    }

    /// As [`Engine::enter`], for a VM whose vCPUs the caller already paused.
    pub fn enter_while_paused(&self, vm: &Vm) -> Result<()> {
        self.enter_with(vm, false)
    }

    pub(super) fn enter_with(&self, vm: &Vm, pause: bool) -> Result<()> {
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

    pub(super) fn enter_paused(
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
            // No guest admin command may aim the device into the rings either.
            self.att.protected().set(
                passthrough::admin_guard::Owner::Engine,
                copies.iter().map(|c| c.gpa.clone()).collect(),
            );
            // Guest admin commands are checked before the device sees them, as I/O ones are,
            // from before the bounce areas are mapped. With the copy as the device buffer the
            // device is idle here, so the ring it reads can move onto a hypervisor copy;
            // otherwise the vCPUs' view of it moves (they are paused).
            let mode = match designation {
                Designation::DeviceBuffer => passthrough::admin_guard::GuardMode::Copy,
                Designation::VcpuBuffer => passthrough::admin_guard::GuardMode::Swap,
            };
            self.att
                .guard_admin_sq(slots, Some(mode))
                .map_err(hook("guarding the guest's admin SQ"))?;
            let bounce = self.map_bounce(&ram, geos, limits)?;
            mapped_bounce = Some(bounce.clone());
            let bufs = EngineBuffers::new(ram.clone(), copies.clone(), designation)
                .with_bounce(bounce)
                .with_protected(self.att.protected());
            let mut queues = Vec::new();
            for (i, g) in geos.iter().enumerate() {
                let (page, sq_off, cq_off) = places[i];
                let (sq, cq) = doorbells(i);
                let q = NvmeQueue::attach(*g, limits, sq, cq, &bufs)?;
                queues.push(QueueRt::new(q, (page, sq_off, cq_off), (sq, cq)));
            }
            let wakeups = self.take_vectors(config, &pages, &mut queues)?;
            Ok((pages, queues, copies, early_dirty, wakeups))
        })();
        let (pages, queues, copies, early_dirty, wakeups) = match result {
            Ok(v) => v,
            Err(e) => {
                self.unguard(slots);
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
                    .with_bounce(bounce.clone())
                    .with_protected(self.att.protected()),
                dirty: early_dirty,
                pending_irqs: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            wakeups,
            att: self.att.clone(),
            device_wake: DeviceWake::of(&self.att),
            sleeps: Default::default(),
            woken: Default::default(),
            yields: Default::default(),
            keep_host_kicks: AtomicBool::new(false),
        });
        self.install_hook(&shared);
        let poller = poller::spawn(shared.clone()).inspect_err(|_| {
            self.release_vectors(&shared.wakeups);
            self.unguard(slots);
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
        let mut total = 0u64;
        for g in geos {
            let size = checks::bounce_bytes(g.sq_entries, per_slot)
                .filter(|&s| {
                    total = total.saturating_add(s.next_multiple_of(1 << 21));
                    total <= device::MAX_BOUNCE_BYTES
                })
                .ok_or_else(|| {
                    self.unmap_bounce(&out);
                    Error::Engine(format!(
                        "queue {}'s PRP-list bounce area would take the bounce areas over \
                         {} bytes",
                        g.qid,
                        device::MAX_BOUNCE_BYTES
                    ))
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

    /// Leaving (or failing to enter) shadow mode: the device reads the guest's admin SQ
    /// again (vCPUs paused, or the guard in copy mode and the engine's queues drained).
    pub(crate) fn unguard(&self, slots: &vmm::memslots::MemorySlots) {
        if let Err(e) = self.att.guard_admin_sq(slots, None) {
            tracing::warn!("dropping the admin SQ guard: {}", vmm::ErrorChain(&e));
        }
        self.att
            .protected()
            .set(passthrough::admin_guard::Owner::Engine, Vec::new());
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
    pub(super) fn undo_enter(
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
    pub(super) fn move_back(
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
    pub(super) fn wait_device_idle(
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
    pub(super) fn wait_admin_idle(&self) -> Result<()> {
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
}

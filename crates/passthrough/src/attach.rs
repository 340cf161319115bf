//! Attaching a vfio-user NVMe device to a VM: PCI function, BAR0 placement, doorbell pages as
//! memory slots (all but the admin page), DMA mapping of guest RAM, MSI-X eventfds, and a
//! watchdog that ends the VM cleanly when the device goes away. (Slightly over 800 lines: the
//! attach sequence and its undo on failure belong together, and the `DeviceHooks` impl below
//! shares the attachment's private locks and slot bookkeeping.)
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use guest_abi::layout::PCI_MMIO_BASE;
use nvme_spec::regs;
use vmm::{
    memory::{GuestRam, RamRegion},
    memslots::{MemorySlots, SlotKind},
    Vm, VmOutcome,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    bar::{disconnect_message, Bar0Trap},
    client::{Connection, MappedArea, MSIX_IRQ},
    config_log::{AdminMediator, ConfigLog, RestoreBounds},
    dma_layout::{DmaBacking, DmaLayout, Piece},
    hooks::{DeviceBacking, DeviceHooks, DoorbellMode, GuestBacking},
    msix::{MsixRouter, MsixState, Route},
    pci::{find_msix, PassthroughPci},
    Error, HookError, Result,
};

const PAGE: u64 = 4096;

/// What to attach.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Device name in messages ("nvme0").
    pub name: String,
    /// vfio-user socket.
    pub socket: std::path::PathBuf,
    /// Where BAR0 goes (PCI window).
    pub bar0_gpa: u64,
    /// How often the watchdog checks the device.
    pub watchdog_interval: Duration,
}

impl AttachOptions {
    /// Defaults for `socket`: BAR0 at the start of the PCI window.
    pub fn new(name: &str, socket: &Path) -> Self {
        AttachOptions {
            name: name.into(),
            socket: socket.to_path_buf(),
            bar0_gpa: PCI_MMIO_BASE,
            watchdog_interval: Duration::from_millis(50),
        }
    }
}

/// An attached device.
pub struct Attachment {
    conn: Arc<Connection>,
    /// What the device said about itself to the hypervisor's own Identify.
    identity: crate::identity::DeviceIdentity,
    /// The admin SQ copy the device reads while the guard is on.
    guard: crate::admin_guard::GuardSlot,
    /// Guest ranges no guest-supplied data address may point into.
    protected: Arc<crate::admin_guard::Protected>,
    mediator: Arc<Mutex<AdminMediator>>,
    ram: GuestRam,
    bar0_gpa: u64,
    bar0_size: u64,
    dstrd: u8,
    /// Largest queue the device takes (CAP.MQES + 1).
    max_queue_entries: u32,
    areas: Arc<Vec<MappedArea>>,
    hook: crate::bar::HookSlot,
    doorbell_slots: Mutex<BTreeMap<u64, u32>>,
    remaps: Mutex<crate::guest_remap::GuestRemaps>,
    /// The device's DMA mappings (guest RAM, pieces of it moved onto hypervisor memory).
    dma: Arc<Mutex<DmaLayout>>,
    vm_fd: Arc<kvm_ioctls::VmFd>,
    msix_cap: Option<usize>,
    pci: Arc<Mutex<PassthroughPci>>,
    irqs: Arc<Vec<EventFd>>,
    msix: Arc<Mutex<MsixRouter>>,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    pci_slot: u8,
}

impl Attachment {
    /// Connects to the device and attaches it to `vm` (before the VM starts).
    pub fn attach(vm: &Vm, opts: &AttachOptions) -> Result<Self> {
        let name = opts.name.clone();
        let conn = Arc::new(Connection::connect(&name, &opts.socket)?);
        let bar0_size = conn.region_size(0);
        if bar0_size < 2 * PAGE || !bar0_size.is_power_of_two() {
            return Err(Error::Unsupported {
                name,
                reason: format!(
                    "BAR0 of {bar0_size:#x} bytes (a power of two of at least 8 KiB needed)"
                ),
            });
        }
        if !opts.bar0_gpa.is_multiple_of(bar0_size) {
            return Err(Error::Unsupported {
                name,
                reason: format!(
                    "BAR0 address {:#x} is not aligned to its size {bar0_size:#x}",
                    opts.bar0_gpa
                ),
            });
        }
        // The device's class must be NVMe and CAP must be readable.
        let mut class = [0u8; 4];
        conn.region_read(crate::client::CONFIG_REGION, 8, &mut class)?;
        let class = u32::from_le_bytes(class) >> 8;
        if class != 0x01_08_02 {
            return Err(Error::Unsupported {
                name,
                reason: format!("class code {class:06x} is not NVMe (010802)"),
            });
        }
        let mut cap = [0u8; 8];
        conn.region_read(0, regs::CAP, &mut cap)?;
        let cap = u64::from_le_bytes(cap);
        let dstrd = regs::cap::dstrd(cap);
        let max_queue_entries = regs::cap::mqes(cap) as u32 + 1;

        // DMA: all of guest RAM, IOVA == GPA.
        let ram = vm.ram().clone();
        let mut pieces = Vec::new();
        for r in ram.regions() {
            conn.dma_map(r.file_offset, r.gpa, r.size, ram.memfd().as_ref())?;
            pieces.push(Piece {
                iova: r.gpa,
                size: r.size,
                backing: DmaBacking::Ram {
                    file_offset: r.file_offset,
                },
            });
        }

        // Interrupts: one eventfd per MSI-X vector, handed to the device.
        let count = conn.irq_count(MSIX_IRQ)?.min(2048);
        let mut irqs = Vec::new();
        for _ in 0..count {
            irqs.push(EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Os {
                what: "creating an MSI-X eventfd".into(),
                source,
            })?);
        }
        // vfio-user servers accept at most 16 fds per message.
        let fds: Vec<i32> = irqs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        for (i, chunk) in fds.chunks(16).enumerate() {
            conn.set_irqs(MSIX_IRQ, (i * 16) as u32, chunk)?;
        }

        let vmm_err = |what: &str| {
            let name = name.clone();
            let what = what.to_string();
            move |source| Error::Vmm { name, what, source }
        };
        let irqs = Arc::new(irqs);
        let msix_cap = find_msix(&conn);
        let msix = Arc::new(Mutex::new(MsixRouter::new(
            vm.vm_fd().clone(),
            irqs.clone(),
            msix_cap.and_then(|(_, table)| table),
        )));
        let mediator = Arc::new(Mutex::new(AdminMediator::default()));
        let dma = Arc::new(Mutex::new(DmaLayout::new(pieces)));
        let hook: crate::bar::HookSlot = Arc::new(Mutex::new(None));
        let guard: crate::admin_guard::GuardSlot = Arc::new(Mutex::new(None));
        let trap = Bar0Trap::new(
            conn.clone(),
            mediator.clone(),
            ram.clone(),
            dstrd,
            vm.lifecycle().clone(),
            msix.clone(),
            crate::bar::Routes {
                dma: dma.clone(),
                hook: hook.clone(),
                guard: guard.clone(),
            },
        );
        vm.mmio_bus()
            .insert(opts.bar0_gpa, bar0_size, Arc::new(Mutex::new(trap)))
            .map_err(vmm_err("placing BAR0 on the MMIO bus"))?;
        let pci = PassthroughPci::new(
            conn.clone(),
            opts.bar0_gpa,
            bar0_size,
            msix.clone(),
            msix_cap.map(|(cap, _)| cap),
        );
        let pci = Arc::new(Mutex::new(pci));
        let pci_slot = vm
            .pci_bus()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(1, pci.clone())
            .map_err(vmm_err("adding the PCI function"))?;

        let areas = Arc::new(conn.map_sparse(0)?);
        // The validator's limits come from the device itself, asked before the guest runs.
        let identity = crate::identity::probe(
            conn.clone(),
            areas.clone(),
            crate::identity::hypervisor_iova(&ram),
        )?;
        let mut a = Attachment {
            identity,
            guard,
            protected: Arc::default(),
            conn: conn.clone(),
            mediator,
            ram,
            bar0_gpa: opts.bar0_gpa,
            bar0_size,
            dstrd,
            max_queue_entries,
            areas,
            hook,
            doorbell_slots: Mutex::new(BTreeMap::new()),
            remaps: Mutex::new(Default::default()),
            dma,
            vm_fd: vm.vm_fd().clone(),
            msix_cap: msix_cap.map(|(cap, _)| cap),
            pci,
            irqs,
            msix,
            stop: Arc::new(AtomicBool::new(false)),
            watchdog: None,
            pci_slot,
        };
        // Every mappable page goes into the guest, except the admin doorbell page (mediated).
        let admin_page = regs::doorbell_page(0, dstrd) * PAGE;
        let pages: Vec<u64> = a
            .areas
            .iter()
            .flat_map(|ar| (0..ar.size / PAGE).map(move |i| ar.offset + i * PAGE))
            .filter(|&p| p != admin_page && p + PAGE <= bar0_size)
            .collect();
        for p in &pages {
            // SAFETY: Mapped uses the device's own pages, which `a.areas` keeps mapped.
            unsafe { a.set_doorbell_mode(vm.memory_slots(), *p, DoorbellMode::Mapped) }?;
        }
        tracing::info!(
            name = %a.conn.name,
            bar0 = format_args!("{:#x}", a.bar0_gpa),
            bar0_size,
            dstrd,
            mapped_pages = pages.len(),
            vectors = count,
            slot = pci_slot,
            "passthrough NVMe attached"
        );

        // Watchdog: a device that goes away ends the VM with a clear message.
        let stop = a.stop.clone();
        let lifecycle = vm.lifecycle().clone();
        let interval = opts.watchdog_interval;
        a.watchdog = Some(
            std::thread::Builder::new()
                .name(format!("{}-watchdog", conn.name))
                .spawn(move || {
                    sandbox::enter(sandbox::Kind::Device);
                    loop {
                        std::thread::sleep(interval);
                        if stop.load(Ordering::SeqCst) || lifecycle.is_finished() {
                            return;
                        }
                        if !conn.check_alive(regs::CSTS) {
                            let msg = disconnect_message(&conn, "no answer");
                            tracing::error!("{msg}");
                            lifecycle.finish(VmOutcome::Failed(msg));
                            return;
                        }
                    }
                })
                .map_err(|source| Error::Os {
                    what: "spawning the watchdog".into(),
                    source,
                })?,
        );
        Ok(a)
    }

    /// The MSI-X table and enable bits the guest programmed (for a migration).
    pub fn msix_state(&self) -> MsixState {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Migration destination: programs the device's MSI-X table and message control as the
    /// guest had them on the source, and routes the vectors to the guest.
    pub fn restore_msix(&self, state: &MsixState) -> Result<()> {
        crate::msix::restore_device(
            &self.conn,
            &self.msix,
            &self.pci,
            self.msix_cap,
            self.irqs.len(),
            state,
        )
    }

    /// The configuration log so far. Its namespaces and MDTS are the device's own answers
    /// to the hypervisor's Identify (never Identify data in guest RAM).
    pub fn config_log(&self) -> ConfigLog {
        let mut log = self
            .mediator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .clone();
        log.namespaces = self.identity.namespaces.clone();
        log.mdts = Some(self.identity.mdts);
        log
    }

    /// What the device said about itself to the hypervisor's own Identify at attach time.
    pub fn identity(&self) -> &crate::identity::DeviceIdentity {
        &self.identity
    }

    /// What state from another host must fit: this VM's RAM and this device.
    pub fn restore_bounds(&self) -> RestoreBounds {
        RestoreBounds {
            ram: self
                .ram
                .regions()
                .iter()
                .map(|r| r.gpa..r.gpa.saturating_add(r.size))
                .collect(),
            max_queue_entries: self.max_queue_entries,
            msix_vectors: self.irqs.len(),
            dstrd: self.dstrd,
            bar0_size: self.bar0_size,
        }
    }

    /// Doorbell stride exponent of the device.
    pub fn dstrd(&self) -> u8 {
        self.dstrd
    }

    /// BAR0 guest-physical address and size.
    pub fn bar0(&self) -> (u64, u64) {
        (self.bar0_gpa, self.bar0_size)
    }

    /// PCI slot of the function.
    pub fn pci_slot(&self) -> u8 {
        self.pci_slot
    }

    /// BAR0 offsets of the doorbell pages mapped into the guest (or redirected).
    pub fn mapped_doorbell_pages(&self) -> Vec<u64> {
        self.doorbell_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// MSI-X routes installed (vector, GSI, address, data).
    pub fn msix_routes(&self) -> Vec<Route> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).routes()
    }

    /// True once the device stopped answering.
    pub fn is_lost(&self) -> bool {
        self.conn.is_lost()
    }

    /// Host address of the device's own (mmapped) BAR0 page at `bar_offset`, where its
    /// doorbells live: the shadow engine reads the guest's last values there and rings the
    /// device there. None when the page is not mappable.
    pub fn device_page(&self, bar_offset: u64) -> Option<u64> {
        self.host_of_bar_page(bar_offset)
    }

    /// Routes trapped I/O doorbell writes to `hook` (the shadow engine's trap mode), or back
    /// to the device (None).
    pub fn set_doorbell_hook(&self, hook: Option<crate::bar::DoorbellHook>) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// The guest's admin queue positions as the mediation follows them (SQ tail, CQ head), and
    /// the admin commands still pending.
    pub fn admin_positions(&self) -> (u32, u32, usize) {
        let m = self.mediator.lock().unwrap_or_else(|e| e.into_inner());
        let (s, c) = m.positions();
        (s, c, m.pending())
    }

    /// Turns the admin SQ guard on (`Some(mode)`) or off (the shadow engine, vCPUs paused, the
    /// guest's admin commands fetched; [`crate::admin_guard::GuardMode::Copy`] re-makes the
    /// device's DMA mapping around the ring, so only with the device idle;
    /// [`crate::admin_guard::GuardMode::Swap`] moves the guest's memory slot over it, so only
    /// with the vCPUs paused): while on, guest admin commands are checked before the device is
    /// rung and the device fetches only what was checked (see [`crate::admin_guard`]). Without
    /// a controller enabled there is nothing to guard.
    pub fn guard_admin_sq(
        &self,
        slots: &MemorySlots,
        on: Option<crate::admin_guard::GuardMode>,
    ) -> Result<()> {
        use crate::admin_guard::GuardMode;
        let mut slot = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mode) = on else {
            if let Some(g) = slot.take() {
                let (refused, moves) = (g.refused, g.moves);
                let mut first_err = None;
                for r in g.off(&self.ram) {
                    let undone = match r.mode {
                        GuardMode::Copy => {
                            self.remap_device_range(r.gpa, r.len, DeviceBacking::Ram)
                        }
                        // SAFETY: RAM backing needs no host promise.
                        GuardMode::Swap => unsafe {
                            self.remap_guest_range(slots, r.gpa, r.len, GuestBacking::Ram)
                        },
                    };
                    if let Err(e) = undone {
                        first_err.get_or_insert(e);
                    }
                }
                tracing::info!(refused, moves, "admin SQ guard off");
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
            return Ok(());
        };
        if slot.is_some() {
            return Ok(());
        }
        let log = self.config_log();
        if log.cc & regs::cc::EN == 0 {
            return Ok(());
        }
        *slot = Some(self.arm_guard(&log, mode, Some(slots))?);
        Ok(())
    }

    /// A guard over the admin SQ of `log`, with the device's (`Copy`) or the vCPUs' (`Swap`,
    /// `slots` needed) view of the ring moved onto its copy.
    fn arm_guard(
        &self,
        log: &ConfigLog,
        mode: crate::admin_guard::GuardMode,
        slots: Option<&MemorySlots>,
    ) -> Result<crate::admin_guard::AdminSqGuard> {
        use crate::admin_guard::GuardMode;
        let unmapped = crate::identity::hypervisor_iova(&self.ram) - PAGE;
        let g = crate::admin_guard::AdminSqGuard::new(
            &self.ram,
            (log.asq, regs::aqa::sq_entries(log.aqa)),
            unmapped,
            mode,
            self.protected.clone(),
        )?;
        let r = g.ring();
        let moved = match (mode, slots) {
            (GuardMode::Copy, _) => self.remap_device_range(
                r.gpa,
                r.len,
                DeviceBacking::Host {
                    fd: r.fd.clone(),
                    offset: 0,
                },
            ),
            // SAFETY: the copy lives in the guard, which is only dropped after the guard goes
            // off (the slot moved back to RAM first) or with the attachment, whose VM's slots
            // go first (see `detach`).
            (GuardMode::Swap, Some(slots)) => unsafe {
                self.remap_guest_range(slots, r.gpa, r.len, GuestBacking::Host(r.host()))
            },
            (GuardMode::Swap, None) => Err(self.hook_err(HookError::GuardNeedsSlots(r.gpa))),
        };
        if let Err(e) = moved {
            self.protected
                .set(crate::admin_guard::Owner::Guard, Vec::new());
            return Err(e);
        }
        Ok(g)
    }

    /// Guest ranges no data address a guest supplies may point into while they are
    /// registered (the guarded admin SQ; the shadow engine registers its ring copies).
    pub fn protected(&self) -> Arc<crate::admin_guard::Protected> {
        self.protected.clone()
    }

    /// Guest admin commands the guard refused so far (while it is on).
    pub fn admin_guard_refused(&self) -> Option<u64> {
        self.guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|g| g.refused)
    }

    /// Where the admin SQ guard is now: the ring's guest-physical base and which buffer is
    /// the hypervisor's (None while off).
    pub fn admin_guard_ring(&self) -> Option<(u64, crate::admin_guard::GuardMode)> {
        self.guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|g| (g.ring().gpa, g.ring().mode))
    }

    /// Guest pages the device wrote for admin commands completed since the last call (data of
    /// Identify, Get Log Page and the like), and those of an admin SQ guarded by a slot swap
    /// (made to hold the guest's view first: see [`crate::admin_guard::AdminSqGuard::sync`]),
    /// for migration's dirty set.
    pub fn take_admin_device_written(&self) -> Vec<u64> {
        let mut pages = self
            .mediator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_device_written();
        if let Some(g) = self
            .guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            pages.extend(g.sync(&self.ram));
        }
        pages
    }

    /// Guest admin commands the device is still working on (submitted, no completion posted).
    pub fn admin_unanswered(&self) -> usize {
        let m = self.mediator.lock().unwrap_or_else(|e| e.into_inner());
        m.unanswered(|gpa, buf| {
            self.ram.contains(gpa, buf.len() as u64) && self.ram.read(gpa, buf).is_ok()
        })
    }

    /// Migration destination: resets the device and enables it on the guest's own admin
    /// queue, replays `log` (features, I/O queues at the guest's addresses) with the admin
    /// rings' DMA view on hypervisor memory only while it runs (the VM not started), brings
    /// the device's admin positions onto the guest's `guest_admin` (SQ tail, CQ head) with
    /// fillers, takes the log over, and guards the guest's admin SQ
    /// ([`crate::admin_guard::GuardMode::Copy`], the device idle) until the shadow engine
    /// turns the guard off. No hypervisor admin queue stays in the device's DMA space: the
    /// guest's admin commands run on its own ring (see [`crate::replay`]).
    pub fn replay(&self, log: &ConfigLog, guest_admin: (u32, u32)) -> Result<()> {
        self.replay_with_phase(log, guest_admin, None).map(|_| ())
    }

    /// As [`Attachment::replay`], with the phase of the guest's next admin completion given
    /// (`None`: read from guest RAM, see [`crate::replay::admin_phase`]); returns the phase
    /// used. A migration destination replays ahead of the switchover with the phase the
    /// source read, while guest RAM is still arriving.
    pub fn replay_with_phase(
        &self,
        log: &ConfigLog,
        guest_admin: (u32, u32),
        phase: Option<bool>,
    ) -> Result<bool> {
        log.validate(guest_admin, &self.restore_bounds())
            .map_err(|source| Error::InvalidState {
                name: self.conn.name.clone(),
                source,
            })?;
        let phase =
            crate::replay::replay(&self.conn, &self.ram, &self.dma, log, guest_admin, phase)?;
        self.mediator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .adopt(log.clone(), guest_admin.0, guest_admin.1);
        // The bounce areas the engine maps next are hypervisor memory: guest admin commands
        // are checked from here on. The device is idle (no I/O queue has a command yet), so
        // its view of the ring can move onto the checked copy.
        let mut slot = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let g = self.arm_guard(log, crate::admin_guard::GuardMode::Copy, None)?;
            *slot = Some(g);
        }
        Ok(phase)
    }

    /// The phase the guest expects its next admin completion at `cq_head` of `log`'s admin
    /// CQ with, read from guest RAM (see [`crate::replay::admin_phase`]).
    pub fn admin_phase(&self, log: &ConfigLog, cq_head: u32) -> bool {
        crate::replay::admin_phase(&self.ram, log, cq_head)
    }

    /// Live exit from a remap, step 1: removes the slot that backs the remapped range at
    /// `gpa` with hypervisor memory, leaving the range unbacked (guest accesses exit as MMIO)
    /// and every other slot untouched, so the vCPUs may keep running. Returns the size.
    pub fn unback_remapped(&self, slots: &MemorySlots, gpa: u64) -> Result<u64> {
        let (size, host) = self
            .remaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(gpa)
            .ok_or_else(|| self.hook_err(HookError::NoRemap(gpa)))?;
        let (slot, _) = slots
            .list()
            .into_iter()
            .find(|(_, i)| i.gpa == gpa && i.size == size && i.host == host)
            .ok_or_else(|| self.hook_err(HookError::NoRemapSlot(gpa)))?;
        slots.remove(slot).map_err(|source| Error::Vmm {
            name: self.conn.name.clone(),
            what: format!("removing memory slot {slot}"),
            source,
        })?;
        Ok(size)
    }

    /// Live exit from a remap, step 2: backs the range [`Attachment::unback_remapped`] left
    /// unbacked with the VM's RAM again (a slot of its own) and forgets the remap.
    pub fn back_with_ram(&self, slots: &MemorySlots, gpa: u64) -> Result<()> {
        let mut remaps = self.remaps.lock().unwrap_or_else(|e| e.into_inner());
        let (size, _) = remaps
            .get(gpa)
            .ok_or_else(|| self.hook_err(HookError::NoRemap(gpa)))?;
        let region = self
            .ram_region(gpa, size)
            .ok_or_else(|| self.hook_err(HookError::NotInRam { gpa, size }))?;
        let host = self
            .ram
            .host_address(&region)
            .map_err(|source| Error::Vmm {
                name: self.conn.name.clone(),
                what: "locating guest RAM".into(),
                source,
            })? as u64
            + (gpa - region.gpa);
        // SAFETY: inside the VM's RAM mapping, which lives as long as the VM.
        unsafe { slots.add(gpa, size, host, SlotKind::Ram, false) }.map_err(|source| {
            Error::Vmm {
                name: self.conn.name.clone(),
                what: format!("adding memory slot {gpa:#x}+{size:#x}"),
                source,
            }
        })?;
        remaps.forget(gpa);
        Ok(())
    }

    /// The guest RAM the device reaches by DMA (IOVA == GPA).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn hook_err(&self, source: HookError) -> Error {
        Error::Hook {
            name: self.conn.name.clone(),
            source,
        }
    }

    fn host_of_bar_page(&self, off: u64) -> Option<u64> {
        self.areas
            .iter()
            .find(|a| off >= a.offset && off + PAGE <= a.offset + a.size)
            .map(|a| a.host as u64 + (off - a.offset))
    }

    fn ram_region(&self, gpa: u64, size: u64) -> Option<RamRegion> {
        let end = gpa.checked_add(size)?;
        self.ram
            .regions()
            .iter()
            .copied()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }

    /// Stops the watchdog and removes the memory slots this attachment added. Call before the
    /// VM is dropped (or drop the VM first: its slots go with it).
    pub fn detach(mut self, slots: &MemorySlots) {
        self.stop_watchdog();
        for (_, slot) in std::mem::take(
            &mut *self
                .doorbell_slots
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ) {
            let _ = slots.remove(slot);
        }
        self.conn.shutdown();
    }

    fn stop_watchdog(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}

impl DeviceHooks for Attachment {
    unsafe fn remap_guest_range(
        &self,
        slots: &MemorySlots,
        gpa: u64,
        size: u64,
        backing: GuestBacking,
    ) -> Result<()> {
        let host = match backing {
            GuestBacking::Host(host) => Some(host),
            GuestBacking::Ram => None,
        };
        let mut remaps = self.remaps.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: this function's contract is the same.
        unsafe { remaps.remap(slots, &self.ram, &self.conn.name, gpa, size, host) }
    }

    unsafe fn set_doorbell_mode(
        &self,
        slots: &MemorySlots,
        bar_offset: u64,
        mode: DoorbellMode,
    ) -> Result<()> {
        let name = self.conn.name.clone();
        if !bar_offset.is_multiple_of(PAGE) || bar_offset + PAGE > self.bar0_size {
            return Err(self.hook_err(HookError::NotBarPage(bar_offset)));
        }
        let mut map = self
            .doorbell_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.remove(&bar_offset) {
            slots.remove(slot).map_err(|source| Error::Vmm {
                name: name.clone(),
                what: format!("unmapping BAR0 page {bar_offset:#x}"),
                source,
            })?;
        }
        let host = match mode {
            DoorbellMode::Trapped => return Ok(()),
            DoorbellMode::Redirected { host } => host,
            DoorbellMode::Mapped => self
                .host_of_bar_page(bar_offset)
                .ok_or_else(|| self.hook_err(HookError::BarPageNotMappable(bar_offset)))?,
        };
        // SAFETY: the device's pages stay mapped in `self.areas` for the attachment's life;
        // redirected pages are covered by this function's safety contract.
        let slot = unsafe {
            slots.add(
                self.bar0_gpa + bar_offset,
                PAGE,
                host,
                SlotKind::Device,
                false,
            )
        }
        .map_err(|source| Error::Vmm {
            name,
            what: format!("mapping BAR0 page {bar_offset:#x}"),
            source,
        })?;
        map.insert(bar_offset, slot);
        Ok(())
    }

    fn remap_device_range(&self, gpa: u64, size: u64, backing: DeviceBacking) -> Result<()> {
        remap_dma(&self.conn, &self.ram, &self.dma, gpa, size, backing)
    }

    fn map_device_memory(
        &self,
        iova: u64,
        size: u64,
        fd: &Arc<std::os::fd::OwnedFd>,
    ) -> Result<()> {
        let overlaps = iova.checked_add(size).is_none_or(|end| {
            self.ram
                .regions()
                .iter()
                .any(|r| iova < r.gpa + r.size && r.gpa < end)
        });
        if overlaps {
            return Err(self.hook_err(HookError::HostDmaInRam { iova, size }));
        }
        self.conn
            .dma_map(0, iova, size, &std::os::fd::AsRawFd::as_raw_fd(&**fd))
    }

    fn unmap_device_memory(&self, iova: u64, size: u64) -> Result<()> {
        if self.ram.contains(iova, 1) {
            return Err(self.hook_err(HookError::UnmapGuestRam(iova)));
        }
        self.conn.dma_unmap(iova, size)
    }

    fn release_interrupt(&self, vector: u16) {
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(vector);
    }

    fn interrupt_guest(&self, vector: u16) -> Result<bool> {
        let msg = self
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .message(vector);
        crate::msix::signal(&self.vm_fd, &self.conn.name, vector, msg)
    }

    fn take_interrupt(&self, vector: u16) -> Result<EventFd> {
        crate::msix::take(&self.msix, &self.irqs, &self.conn.name, vector)
    }
}

/// Makes the device's DMA view of guest range `[gpa, gpa + size)` `backing` (see
/// [`DeviceHooks::remap_device_range`]): the whole mappings it touches are unmapped and the
/// pieces mapped again, and `layout` records it; on a failure the old mappings are put back.
pub(crate) fn remap_dma(
    conn: &Connection,
    ram: &GuestRam,
    layout: &Mutex<DmaLayout>,
    gpa: u64,
    size: u64,
    backing: DeviceBacking,
) -> Result<()> {
    let hook_err = |source| Error::Hook {
        name: conn.name.clone(),
        source,
    };
    let region = gpa
        .checked_add(size)
        .and_then(|end| {
            ram.regions()
                .iter()
                .copied()
                .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
        })
        .ok_or_else(|| hook_err(HookError::NotInRam { gpa, size }))?;
    let backing = match backing {
        DeviceBacking::Ram => DmaBacking::Ram {
            file_offset: region.file_offset + (gpa - region.gpa),
        },
        DeviceBacking::Host { fd, offset } => DmaBacking::Host { fd, offset },
    };
    let mut layout = layout.lock().unwrap_or_else(|e| e.into_inner());
    let plan = layout.plan(gpa, size, backing).map_err(hook_err)?;
    let ram_fd = std::os::fd::AsRawFd::as_raw_fd(ram.memfd().as_ref());
    let map = |p: &Piece| {
        let (fd, offset) = p.backing.fd_and_offset(ram_fd);
        conn.dma_map(offset, p.iova, p.size, &fd)
    };
    for p in &plan.unmap {
        conn.dma_unmap(p.iova, p.size)?;
    }
    for (i, p) in plan.map.iter().enumerate() {
        if let Err(e) = map(p) {
            // Put the old mappings back so the device keeps reaching guest RAM.
            for q in &plan.map[..i] {
                let _ = conn.dma_unmap(q.iova, q.size);
            }
            for q in &plan.unmap {
                if let Err(e2) = map(q) {
                    tracing::error!(
                        iova = format_args!("{:#x}", q.iova),
                        size = q.size,
                        error = &e2 as &dyn std::error::Error,
                        "restoring a DMA mapping after a failed remap"
                    );
                }
            }
            return Err(e);
        }
    }
    layout.apply(&plan);
    tracing::debug!(
        gpa = format_args!("{gpa:#x}"),
        size,
        mappings = layout.pieces().len(),
        "device DMA range remapped"
    );
    Ok(())
}

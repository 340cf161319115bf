//! The PCI function in a VM: configuration space (PVRDMA IDs, BARs placed by the VMM), BAR1
//! registers on the MMIO bus (trapped: commands are rare), BAR2 UAR doorbell page mapped into
//! the guest as host memory (no VM exit per doorbell), and the device thread that runs the
//! queues when nobody else does.
//!
//! **Doorbells without exits, work without hand-offs.** A VM exit costs ~28-40 µs on Ferry's
//! machines (more under load; measured from the guest on 2026-12-05: an MMIO read or write
//! or a port write that returns to the VMM ~40 µs, an MMIO write KVM completes in the kernel
//! through an ioeventfd ~15 µs — most of an exit is KVM_RUN's return to user space and
//! re-entry, `vcpu_put`/`vcpu_load` on the nested PVM host), so the UAR page is a host page
//! in a KVM memory slot: the
//! guest's doorbell writes land in memory, and the rings in guest memory are the source of
//! truth. On a machine with few cores every hand-off between threads waits for a scheduler
//! slice, so the work is done on the thread that has it: what arrives (a MAD the
//! multiplexer routes here, a datagram on one of the VM's UD QPs) is written into the guest's
//! receive and completion queues on the port's receive thread, which then wakes a vCPU in
//! the idle wait; what the guest posted is sent by the vCPU that exits into the idle wait
//! ([`abi::FERRY_REG_IDLE_WAIT`]: send, then wait) or send-now
//! ([`abi::FERRY_REG_SEND_NOW`]) register. A delivery that finds the device busy is left to
//! the thread holding it, which runs it when it lets go (`Shared`). The device thread is the
//! fallback (a MAD held back for lack of a receive buffer, a guest that posts and never
//! exits). The built-in guest polls
//! its completion queues (the ring-3 guest runs with IF = 0);
//! a guest that enables MSI-X in the capability gets the ABI's three vectors through
//! `KVM_SIGNAL_MSI`: command response, async event, and CQ completion for CQs armed through
//! the CQ doorbell.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard, TryLockError,
    },
    thread::JoinHandle,
    time::Duration,
};

use pvrdma_abi as abi;
use vmm::{
    bus::BusDevice,
    memslots::SlotKind,
    pci::{BarKind, PciConfiguration, PciDevice, PciHeader},
    Vm,
};

use crate::{
    backend::{MadInbox, RdmaBackend},
    device::{Device, DeviceStats},
    VrdmaError,
};

/// Size of the register BAR.
pub const REG_BAR_SIZE: u64 = 0x1000;
/// Size of the UAR BAR (one doorbell page).
pub const UAR_BAR_SIZE: u64 = 0x1000;
/// Where the VMM places the device's BARs by default: registers (BAR1) at `+0`, UAR (BAR2) at
/// `+0x1000`, MSI-X (BAR0) at `+0x2000`.
pub const DEFAULT_BAR_BASE: u64 = guest_abi::layout::PCI_MMIO_BASE + 0x0800_0000;
const _: () =
    assert!(DEFAULT_BAR_BASE + REG_BAR_SIZE + UAR_BAR_SIZE <= guest_abi::layout::PCI_MMIO_END);

/// Size of the MSI-X BAR (table at 0, pending bits at 0x800).
pub const MSIX_BAR_SIZE: u64 = 0x1000;

struct ConfigSpace {
    cfg: PciConfiguration,
    /// Configuration dword holding the MSI-X message control word (upper half).
    msix_reg: usize,
    device: Arc<Shared>,
}

impl PciDevice for ConfigSpace {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.cfg.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.cfg.write(reg, offset, data);
        if reg == self.msix_reg {
            let ctl = self.cfg.read(reg) >> 16;
            self.device
                .lock()
                .set_msix_control(ctl & (1 << 15) != 0, ctl & (1 << 14) != 0);
        }
    }
}

struct MsixBar(Arc<Shared>);

impl BusDevice for MsixBar {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if data.len() == 4 && offset % 4 == 0 {
            self.0.lock().read_msix(offset)
        } else {
            0
        };
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 4 && offset % 4 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.0.lock().write_msix(offset, v);
        }
    }
}

/// MSI messages injected with `KVM_SIGNAL_MSI`.
struct KvmMsi(Arc<kvm_ioctls::VmFd>);

impl crate::device::MsiSink for KvmMsi {
    fn signal(&self, address: u64, data: u32) {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.0.signal_msi(msi) {
            tracing::debug!(error = &e as &dyn std::error::Error, "injecting an MSI");
        }
    }
}

/// How long one idle wait ([`abi::FERRY_REG_IDLE_WAIT`]) blocks a vCPU at most: long enough
/// to leave the CPU to the device and the port, short enough that a guest checking other
/// things (a stop request, a timeout) notices them in time.
const IDLE_WAIT: Duration = Duration::from_millis(5);

/// Completions published (by whichever thread wrote them) to vCPUs in the idle wait.
#[derive(Default)]
struct Completions {
    /// The device's completion count as last published.
    seen: Mutex<u64>,
    cv: Condvar,
}

impl Completions {
    fn publish(&self, count: u64) {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // The count only grows; a thread publishing a count it took earlier never hides a
        // later one (a waiter would miss it).
        if count > *s {
            *s = count;
            // Notified after the lock is released: a waiter woken while it was still held
            // would block on it again at once and need a second wake-up.
            drop(s);
            self.cv.notify_all();
        }
    }

    /// Waits until a count beyond `count` is published or `IDLE_WAIT` passes.
    fn wait_beyond(&self, count: u64) -> bool {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (s, _) = self
            .cv
            .wait_timeout_while(s, IDLE_WAIT, |s| *s <= count)
            .unwrap_or_else(|e| e.into_inner());
        *s > count
    }
}

/// The device as its threads share it: the lock, the completions published to vCPUs in the
/// idle wait, and deliveries handed to whoever holds the lock.
///
/// **No hand-off when the device is busy.** What arrives is delivered into the guest on the
/// port's receive thread ([`Shared::deliver`]). When another thread holds the device (a vCPU
/// sending in its idle wait, the device thread on a pass), the delivery is left to that
/// holder: it runs it when it lets go of the lock ([`DeviceGuard`]'s drop), so the vCPU that
/// just sent finds the answer before it waits, and no third thread (the device thread) has
/// to be woken and scheduled for it.
pub(crate) struct Shared {
    device: Mutex<Device>,
    /// A delivery is waiting for the lock's holder.
    deferred: AtomicBool,
    completions: Completions,
}

/// The locked device; dropping it runs the deliveries left to it (see [`Shared`]).
pub(crate) struct DeviceGuard<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, Device>>,
}

impl std::ops::Deref for DeviceGuard<'_> {
    type Target = Device;
    fn deref(&self) -> &Device {
        self.guard
            .as_deref()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl std::ops::DerefMut for DeviceGuard<'_> {
    fn deref_mut(&mut self) -> &mut Device {
        self.guard
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.shared.run_deferred();
    }
}

impl Shared {
    pub(crate) fn new(device: Device) -> Shared {
        Shared {
            device: Mutex::new(device),
            deferred: AtomicBool::new(false),
            completions: Completions::default(),
        }
    }

    /// Locks the device (waiting for it).
    pub(crate) fn lock(&self) -> DeviceGuard<'_> {
        DeviceGuard {
            shared: self,
            guard: Some(self.device.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Something arrived: delivered into the guest now on this thread, or by the thread that
    /// holds the device when it lets go. Never blocks.
    pub(crate) fn deliver(&self) {
        self.deferred.store(true, Ordering::SeqCst);
        self.run_deferred();
    }

    /// The completion count last published to vCPUs in the idle wait.
    #[cfg(test)]
    pub(crate) fn published(&self) -> u64 {
        *self
            .completions
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the waiting deliveries if the device is free. Each caller first publishes its
    /// side (the flag, or the lock's release) and then looks at the other, with a full
    /// fence between: a delivery whose `try_lock` failed is seen by the holder's check after
    /// its unlock, so none is left behind.
    fn run_deferred(&self) {
        loop {
            std::sync::atomic::fence(Ordering::SeqCst);
            if !self.deferred.load(Ordering::SeqCst) {
                return;
            }
            let mut g = match self.device.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            if !self.deferred.swap(false, Ordering::SeqCst) {
                return;
            }
            g.poll_receives();
            let count = g.completion_count();
            drop(g);
            self.completions.publish(count);
        }
    }
}

struct Registers {
    device: Arc<Shared>,
    /// The UAR page mapped into the guest by a KVM memory slot. The register device lives on
    /// the VM's MMIO bus, which every vCPU thread holds (`Arc<Bus>`) for as long as it can run
    /// the guest: keeping the page here keeps it mapped until the last vCPU thread is gone,
    /// even one that outlived its handle (see `VcpuHandle`'s drop), so the slot never points
    /// at unmapped (or reused) host memory.
    _uar: Arc<HostPage>,
}

impl Registers {
    /// The idle wait, on the vCPU thread that exited: first runs the queues here (the sends
    /// the guest posted go out now, without a hand-off to the device thread); then 1 at once
    /// if a CQ holds unconsumed entries (those just written included, and those delivered
    /// while the queues ran: see [`Shared`]); else blocks until a completion is written (1)
    /// or `IDLE_WAIT` passes (0). The count is taken under the device lock together with the
    /// emptiness check, so a completion written after it is never missed. A guest that
    /// posted work and wants it sent at once reads this register right away (one exit sends
    /// everything posted).
    fn idle_wait(&self) -> u32 {
        let shared = &*self.device;
        let count = {
            let mut d = shared.lock();
            d.count_exit(false);
            d.poll();
            let count = d.completion_count();
            if d.completions_pending() {
                drop(d);
                shared.completions.publish(count);
                return 1;
            }
            count
        };
        // Deliveries the lock's drop ran count as completions beyond `count`.
        shared.completions.publish(count);
        shared.completions.wait_beyond(count) as u32
    }

    /// Send now: runs the queues on the vCPU that exited; 1 if a CQ holds unconsumed entries.
    fn send_now(&self) -> u32 {
        let shared = &*self.device;
        let mut d = shared.lock();
        d.count_exit(true);
        d.poll();
        let (count, pending) = (d.completion_count(), d.completions_pending());
        drop(d);
        shared.completions.publish(count);
        pending as u32
    }
}

impl BusDevice for Registers {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if data.len() == 4 && offset == abi::FERRY_REG_IDLE_WAIT {
            self.idle_wait()
        } else if data.len() == 4 && offset == abi::FERRY_REG_SEND_NOW {
            self.send_now()
        } else if data.len() == 4 && offset % 4 == 0 {
            self.device.lock().read_reg(offset)
        } else {
            0
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 4 && offset % 4 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.device.lock().write_reg(offset, v);
        }
    }
}

/// An anonymous host page (the UAR doorbell page).
struct HostPage(*mut u8);

// SAFETY: the page is plain memory owned by this value; concurrent access goes through
// volatile reads of aligned u32s.
unsafe impl Send for HostPage {}
// SAFETY: as above.
unsafe impl Sync for HostPage {}

impl HostPage {
    fn new() -> Result<HostPage, VrdmaError> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                UAR_BAR_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VrdmaError::Io {
                what: "mapping the UAR page",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(HostPage(p.cast()))
    }

    /// The doorbell words (QP, CQ) the guest wrote since the last call (0: none); clears them.
    fn take_doorbells(&self) -> [u32; 2] {
        [abi::PVRDMA_UAR_QP_OFFSET, abi::PVRDMA_UAR_CQ_OFFSET].map(|off| {
            // SAFETY: the word lies inside the live page and is 4-byte aligned; the guest
            // writes it concurrently, hence volatile accesses. A doorbell written between the
            // load and the store is only a lost hint: the rings are polled anyway.
            unsafe {
                let p = self.0.add(off as usize).cast::<u32>();
                let v = std::ptr::read_volatile(p);
                if v != 0 {
                    std::ptr::write_volatile(p, 0);
                }
                v
            }
        })
    }
}

impl Drop for HostPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this size and is unmapped once.
        unsafe {
            libc::munmap(self.0.cast(), UAR_BAR_SIZE as usize);
        }
    }
}

/// A virtual RDMA device attached to a VM. Dropping it (or [`VrdmaHandle::stop`]) stops the
/// device thread and unregisters every GID the VM bound.
pub struct VrdmaHandle {
    device: Arc<Shared>,
    inbox: Arc<MadInbox>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _uar: Arc<HostPage>,
}

impl VrdmaHandle {
    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        self.device.lock().stats()
    }

    /// The MAD inbox (the multiplexer's callback target).
    pub fn inbox(&self) -> &Arc<MadInbox> {
        &self.inbox
    }

    /// Stops the device thread, destroys all objects and unbinds all GIDs.
    pub fn stop(&mut self) -> DeviceStats {
        self.inbox.set_direct(None);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut d = self.device.lock();
        d.reset();
        d.stats()
    }
}

impl Drop for VrdmaHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Attaches a PVRDMA function to `vm` with BARs at `bar_base` (registers) and
/// `bar_base + 0x1000` (UAR), reaching the host through `backend`. Inbound MADs for the VM go
/// to `inbox` (give the same inbox to the backend's multiplexer registration).
pub fn attach(
    vm: &Vm,
    backend: Arc<dyn RdmaBackend>,
    inbox: Arc<MadInbox>,
    bar_base: u64,
) -> Result<VrdmaHandle, VrdmaError> {
    let reg_gpa = bar_base;
    let uar_gpa = bar_base + REG_BAR_SIZE;
    let msix_gpa = uar_gpa + UAR_BAR_SIZE;
    let mem: Arc<dyn crate::GuestMemory> = Arc::new(vm.ram().clone());
    let mut dev = Device::new(mem, backend, inbox.clone());
    dev.set_msi_sink(Arc::new(KvmMsi(vm.vm_fd().clone())));
    let device = Arc::new(Shared::new(dev));

    let mut cfg = PciConfiguration::new(PciHeader {
        vendor_id: abi::PCI_VENDOR_ID_VMWARE,
        device_id: abi::PCI_DEVICE_ID_VMWARE_PVRDMA,
        class_code: abi::PCI_CLASS_PVRDMA,
        revision: 1,
        subsystem_vendor_id: abi::PCI_VENDOR_ID_VMWARE,
        subsystem_id: abi::PCI_DEVICE_ID_VMWARE_PVRDMA,
    });
    cfg.add_bar(
        abi::PCI_RESOURCE_MSIX,
        msix_gpa,
        MSIX_BAR_SIZE,
        BarKind::Mem32,
    );
    cfg.add_bar(abi::PCI_RESOURCE_REG, reg_gpa, REG_BAR_SIZE, BarKind::Mem32);
    cfg.add_bar(abi::PCI_RESOURCE_UAR, uar_gpa, UAR_BAR_SIZE, BarKind::Mem64);
    // MSI-X: table size N - 1, table and pending bits in BAR0.
    let mut body = [0u8; 10];
    body[0..2].copy_from_slice(&(abi::PVRDMA_MAX_INTERRUPTS as u16 - 1).to_le_bytes());
    body[2..6].copy_from_slice(&(abi::PCI_RESOURCE_MSIX as u32).to_le_bytes());
    body[6..10].copy_from_slice(
        &(crate::device::MSIX_PBA_OFFSET as u32 | abi::PCI_RESOURCE_MSIX as u32).to_le_bytes(),
    );
    let cap = cfg.add_capability(0x11, &body);
    // Enable (bit 15) and function mask (bit 14) of the message control word.
    cfg.set_writable(cap / 4, 0xc000_0000);

    let uar = Arc::new(HostPage::new()?);
    vm.mmio_bus().insert(
        reg_gpa,
        REG_BAR_SIZE,
        Arc::new(Mutex::new(Registers {
            device: device.clone(),
            _uar: uar.clone(),
        })),
    )?;
    vm.mmio_bus().insert(
        msix_gpa,
        MSIX_BAR_SIZE,
        Arc::new(Mutex::new(MsixBar(device.clone()))),
    )?;
    // SAFETY: the page stays mapped as long as anything that can run the guest exists: the
    // register device on the MMIO bus owns an Arc of it, and the bus is owned by the VM and
    // by every vCPU thread (also one left behind after its handle gave up joining it), so
    // the page outlives the KVM VM's last use of the slot. The guest may write it at any
    // time, which the device tolerates (it only reads doorbell words as hints).
    unsafe {
        vm.memory_slots()
            .add(uar_gpa, UAR_BAR_SIZE, uar.0 as u64, SlotKind::Device, false)?;
    }
    vm.pci_bus().lock().unwrap_or_else(|e| e.into_inner()).add(
        4,
        Arc::new(Mutex::new(ConfigSpace {
            cfg,
            msix_reg: cap / 4,
            device: device.clone(),
        })),
    )?;

    // What arrives (a MAD routed to this VM, a datagram on one of its UD QPs) is written
    // into the guest's queues on the port's receive thread itself, or by the thread holding
    // the device when it lets go of it (see `Shared`), and a vCPU in the idle wait is woken
    // from there: no hand-off to the device thread.
    let direct: crate::backend::DirectDelivery = {
        let device = Arc::downgrade(&device);
        Arc::new(move || {
            let Some(device) = device.upgrade() else {
                return false;
            };
            device.deliver();
            true
        })
    };
    inbox.set_direct(Some(direct));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (device, stop, uar, inbox) = (device.clone(), stop.clone(), uar.clone(), inbox.clone());
        std::thread::Builder::new()
            .name("pvrdma".into())
            .spawn(move || {
                sandbox::enter(sandbox::Kind::Device);
                inbox.set_waker(std::thread::current());
                poll_loop(&device, &stop, &uar)
            })
            .map_err(|e| VrdmaError::Io {
                what: "spawning the device thread",
                source: e,
            })?
    };
    tracing::info!(
        regs = format_args!("{reg_gpa:#x}"),
        uar = format_args!("{uar_gpa:#x}"),
        "pvrdma device attached"
    );
    Ok(VrdmaHandle {
        device,
        inbox,
        stop,
        thread: Some(thread),
        _uar: uar,
    })
}

/// How long the device thread parks after a pass that found nothing. Events that need it
/// wake it earlier (see `poll_loop`); this bounds how long a send posted by a guest that
/// never exits waits.
const PARK: Duration = Duration::from_millis(1);

fn poll_loop(device: &Shared, stop: &AtomicBool, uar: &HostPage) {
    // The fallback: receives are delivered on the port's receive thread (or by the thread
    // holding the device) and sends run by the vCPU that exits (module docs). This thread
    // does what they could not: a MAD the multiplexer held back for lack of a receive
    // buffer (which unparks it), and the sends of a guest that keeps polling without exiting
    // (found on its passes). A pass that found work or a new command is followed by another
    // at once; otherwise the thread parks for `PARK`. (Spinning, or waking every 20-100 µs,
    // takes the CPU from the vCPUs and the receive threads on a machine with few cores:
    // measured slower.) Doorbells are only read for the CQ arm bits. Each pass publishes the
    // completion count, which wakes a vCPU in the idle wait.
    let mut commands = 0;
    while !stop.load(Ordering::Relaxed) {
        let [_, cq_bell] = uar.take_doorbells();
        let (work, c, completed) = {
            let mut d = device.lock();
            if cq_bell != 0 {
                d.cq_doorbell(cq_bell);
            }
            (d.poll(), d.command_count(), d.completion_count())
        };
        device.completions.publish(completed);
        if work > 0 || c != commands {
            commands = c;
            continue;
        }
        std::thread::park_timeout(PARK);
    }
}

//! Attaching a vfio-user virtio-net device (class 02:00:00, virtio 1.x modern PCI) to a VM for
//! direct passthrough: the PCI function, BAR0 on the MMIO bus with every access forwarded to
//! the device (notifications included; nothing is mapped), guest RAM DMA-mapped at IOVA ==
//! GPA, MSI-X eventfds routed by KVM, and a watchdog that ends the VM cleanly when the device
//! goes away. For the shadow engine (`shadow::engine::net`): the queues' configuration read
//! back from the device, a hook that takes notification writes (trap mode) or a hypervisor
//! page over the notification page (poll mode), ring pages moved onto hypervisor copies in the
//! guest's view, and MSI-X vectors taken over ([`crate::virtio_net_shadow`]).
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use virtio_spec::pci;
use vmm::{bus::BusDevice, lifecycle::Lifecycle, Vm, VmOutcome};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    bar::disconnect_message,
    client::{Connection, CONFIG_REGION, MSIX_IRQ},
    msix::{MsixRouter, MsixState, Route},
    pci::{find_msix, PassthroughPci},
    virtio_net_shadow::{NotifyTrap, ShadowHooks},
    Error, Result,
};

/// A register the watchdog reads (common configuration `num_queues` at BAR0 offset 0, where
/// the stand-in NIC puts it: no side effect; the ISR would clear on read).
const WATCHDOG_REGISTER: u64 = pci::common::NUM_QUEUES;

/// Reads the class code of the device behind `conn` (configuration space dword 2, bits 31:8).
pub fn class_code(conn: &Connection) -> Result<u32> {
    let mut b = [0u8; 4];
    conn.region_read(CONFIG_REGION, 8, &mut b)?;
    Ok(u32::from_le_bytes(b) >> 8)
}

/// BAR0 of the NIC: every access goes to the device; MSI-X table writes also update KVM's
/// routes.
struct NetBar0 {
    conn: Arc<Connection>,
    lifecycle: Arc<Lifecycle>,
    msix: Arc<Mutex<MsixRouter>>,
    /// While shadowed: notification writes go to the engine instead of the device.
    notify: Arc<NotifyTrap>,
}

impl NetBar0 {
    fn lost(&self, e: &Error) {
        self.lifecycle.finish(VmOutcome::Failed(disconnect_message(
            &self.conn,
            &vmm::ErrorChain(e).to_string(),
        )));
    }
}

impl BusDevice for NetBar0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Err(e) = self.conn.region_read(0, offset, data) {
            data.fill(0xff);
            self.lost(&e);
            return;
        }
        self.notify.overlay_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.notify.take(offset, data) || self.notify.hold_reset(offset, data) {
            return;
        }
        {
            let mut m = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            if m.in_table(offset) {
                m.table_write(offset, data);
            }
        }
        if let Err(e) = self.conn.region_write(0, offset, data) {
            self.lost(&e);
        }
    }
}

/// An attached virtio-net device.
pub struct NetAttachment {
    pub(crate) conn: Arc<Connection>,
    bar0_gpa: u64,
    bar0_size: u64,
    pci_slot: u8,
    pub(crate) msix: Arc<Mutex<MsixRouter>>,
    pub(crate) irqs: Arc<Vec<EventFd>>,
    /// Offset of the MSI-X capability in configuration space.
    msix_cap: Option<usize>,
    pci: Arc<Mutex<PassthroughPci>>,
    pub(crate) shadow: ShadowHooks,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
}

impl NetAttachment {
    /// Connects to the device at `socket` and attaches it to `vm` (before the VM starts) with
    /// BAR0 at `bar0_gpa`.
    pub fn attach(vm: &Vm, name: &str, socket: &Path, bar0_gpa: u64) -> Result<Self> {
        let unsupported = |reason: String| Error::Unsupported {
            name: name.into(),
            reason,
        };
        let conn = Arc::new(Connection::connect(name, socket)?);
        let class = class_code(&conn)?;
        let mut id = [0u8; 4];
        conn.region_read(CONFIG_REGION, 0, &mut id)?;
        let (vendor, device) = (
            u16::from_le_bytes([id[0], id[1]]),
            u16::from_le_bytes([id[2], id[3]]),
        );
        if class != pci::CLASS_NETWORK_ETHERNET
            || vendor != pci::VENDOR_ID
            || device != pci::DEVICE_ID_NET
        {
            return Err(unsupported(format!(
                "{vendor:04x}:{device:04x} class {class:06x} is not a modern virtio-net device \
                 (1af4:1041 class 020000)"
            )));
        }
        let bar0_size = conn.region_size(0);
        if bar0_size < 0x1000 || !bar0_size.is_power_of_two() {
            return Err(unsupported(format!(
                "BAR0 of {bar0_size:#x} bytes (a power of two of at least 4 KiB needed)"
            )));
        }
        if !bar0_gpa.is_multiple_of(bar0_size) {
            return Err(unsupported(format!(
                "BAR0 address {bar0_gpa:#x} is not aligned to its size {bar0_size:#x}"
            )));
        }
        // DMA: all of guest RAM, IOVA == GPA.
        let ram = vm.ram().clone();
        for r in ram.regions() {
            conn.dma_map(r.file_offset, r.gpa, r.size, ram.memfd().as_ref())?;
        }
        // Interrupts: one eventfd per MSI-X vector, handed to the device (16 per message).
        let count = conn.irq_count(MSIX_IRQ)?.min(2048);
        let irqs = (0..count)
            .map(|_| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Os {
                    what: "creating an MSI-X eventfd".into(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fds: Vec<i32> = irqs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        for (i, chunk) in fds.chunks(16).enumerate() {
            conn.set_irqs(MSIX_IRQ, (i * 16) as u32, chunk)?;
        }
        let irqs = Arc::new(irqs);
        let msix_cap = find_msix(&conn);
        let msix = Arc::new(Mutex::new(MsixRouter::new(
            vm.vm_fd().clone(),
            irqs.clone(),
            msix_cap.and_then(|(_, table)| table),
        )));
        let vmm_err = |what: &str| {
            let (name, what) = (name.to_string(), what.to_string());
            move |source| Error::Vmm { name, what, source }
        };
        let shadow = ShadowHooks::new(vm, &conn, bar0_gpa);
        let bar = NetBar0 {
            conn: conn.clone(),
            lifecycle: vm.lifecycle().clone(),
            msix: msix.clone(),
            notify: shadow.notify.clone(),
        };
        vm.mmio_bus()
            .insert(bar0_gpa, bar0_size, Arc::new(Mutex::new(bar)))
            .map_err(vmm_err("placing BAR0 on the MMIO bus"))?;
        let pci = Arc::new(Mutex::new(PassthroughPci::new(
            conn.clone(),
            bar0_gpa,
            bar0_size,
            msix.clone(),
            msix_cap.map(|(cap, _)| cap),
        )));
        let pci_slot = vm
            .pci_bus()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(1, pci.clone())
            .map_err(vmm_err("adding the PCI function"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = spawn_watchdog(conn.clone(), vm.lifecycle().clone(), stop.clone())?;
        tracing::info!(
            name,
            bar0 = format_args!("{bar0_gpa:#x}"),
            bar0_size,
            vectors = count,
            slot = pci_slot,
            "passthrough virtio-net attached"
        );
        Ok(NetAttachment {
            conn,
            bar0_gpa,
            bar0_size,
            pci_slot,
            msix,
            irqs,
            msix_cap: msix_cap.map(|(cap, _)| cap),
            pci,
            shadow,
            stop,
            watchdog: Some(watchdog),
        })
    }

    /// BAR0 guest-physical address and size.
    pub fn bar0(&self) -> (u64, u64) {
        (self.bar0_gpa, self.bar0_size)
    }

    /// PCI slot of the function.
    pub fn pci_slot(&self) -> u8 {
        self.pci_slot
    }

    /// MSI-X routes installed (vector, GSI, address, data).
    pub fn msix_routes(&self) -> Vec<Route> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).routes()
    }

    /// The MSI-X table and enable bits the guest programmed (for a migration).
    pub fn msix_state(&self) -> MsixState {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Migration destination: programs the device's MSI-X table and message control as the
    /// guest had them on the source, and routes the vectors to the guest. `state` came from
    /// another host: a table longer than the device's is refused.
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

    /// True once the device stopped answering.
    pub fn is_lost(&self) -> bool {
        self.conn.is_lost()
    }

    /// Stops the watchdog and closes the connection (the device resets and waits for the next
    /// client).
    pub fn detach(mut self) {
        self.shadow.set_notify_hook(None);
        self.stop_watchdog();
        self.conn.shutdown();
    }

    fn stop_watchdog(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Drop for NetAttachment {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}

/// Ends the VM with a clear message when the device stops answering.
fn spawn_watchdog(
    conn: Arc<Connection>,
    lifecycle: Arc<Lifecycle>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("{}-watchdog", conn.name))
        .spawn(move || {
            sandbox::enter(sandbox::Kind::Device);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                if stop.load(Ordering::SeqCst) || lifecycle.is_finished() {
                    return;
                }
                if !conn.check_alive(WATCHDOG_REGISTER) {
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
        })
}

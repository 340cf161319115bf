//! What the shadow engine needs from a passthrough virtio-net attachment: the queues'
//! configuration (read back from the device with the vCPUs paused), notifications (a hook on
//! the BAR0 trap, or a hypervisor page over the notification page), ring pages moved onto
//! hypervisor copies in the guest's view, MSI-X vectors taken over, and the device notified.
use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use virtio_spec::{
    pci::{cfg_type, common, VirtioPciCap, PCI_CAP_ID_VNDR},
    status,
};
use vmm::{
    memory::GuestRam,
    memslots::{MemorySlots, SlotKind},
    Vm,
};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    client::{Connection, CONFIG_REGION},
    guest_remap::GuestRemaps,
    virtio_net::NetAttachment,
    Error, HookError, Result,
};

const PAGE: u64 = 4096;

/// Called on the vCPU thread with the queue index a trapped notification carries.
pub type NotifyHook = Arc<dyn Fn(u16) + Send + Sync>;

/// The notification region and the device status as the BAR0 trap sees them.
pub(crate) struct NotifyTrap {
    /// BAR0 offsets of the notification region (from the notify capability).
    range: Option<Range<u64>>,
    hook: Mutex<Option<NotifyHook>>,
    /// The engine shadows the queues: a guest reset is held for it.
    shadowed: AtomicBool,
    /// The guest wrote status 0 while shadowed; the write waits until the engine let go of
    /// the rings ([`NetAttachment::finish_reset`]). Until then the status the guest reads
    /// stays non-zero, so a driver waits (virtio 1.1 §4.1.4.3.2).
    reset_pending: AtomicBool,
    /// The engine found a shadowed queue broken: the status the guest reads carries
    /// DEVICE_NEEDS_RESET until a reset reaches the device.
    needs_reset: AtomicBool,
}

impl NotifyTrap {
    /// A write at BAR0 `offset` the engine must hold: a reset while shadowed.
    pub(crate) fn hold_reset(&self, offset: u64, data: &[u8]) -> bool {
        if offset == common_offset() + common::DEVICE_STATUS
            && data.first() == Some(&0)
            && self.shadowed.load(Ordering::SeqCst)
        {
            self.reset_pending.store(true, Ordering::SeqCst);
            return true;
        }
        if offset == common_offset() + common::DEVICE_STATUS && data.first() == Some(&0) {
            // The reset reaches the device now.
            self.needs_reset.store(false, Ordering::SeqCst);
        }
        false
    }

    /// A read at BAR0 `offset` the device answered with `data`: the engine's
    /// DEVICE_NEEDS_RESET is added to the device status byte when the read covers it.
    pub(crate) fn overlay_read(&self, offset: u64, data: &mut [u8]) {
        let at = common_offset() + common::DEVICE_STATUS;
        if !(offset..offset + data.len() as u64).contains(&at)
            || !self.needs_reset.load(Ordering::SeqCst)
        {
            return;
        }
        data[(at - offset) as usize] |= status::DEVICE_NEEDS_RESET;
    }

    /// A write at BAR0 `offset`: true when the engine took it (not forwarded).
    pub(crate) fn take(&self, offset: u64, data: &[u8]) -> bool {
        if !self.range.as_ref().is_some_and(|r| r.contains(&offset)) {
            return false;
        }
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(hook) = hook else {
            return false;
        };
        let mut v = [0u8; 2];
        for (d, s) in v.iter_mut().zip(data) {
            *d = *s;
        }
        hook(u16::from_le_bytes(v));
        true
    }
}

/// The notify capability: BAR0 offset and length of the region, `notify_off_multiplier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyRegion {
    /// BAR0 offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

/// State of the attachment the engine works through.
pub(crate) struct ShadowHooks {
    pub(crate) notify: Arc<NotifyTrap>,
    region: Option<NotifyRegion>,
    vm_fd: Arc<kvm_ioctls::VmFd>,
    ram: GuestRam,
    remaps: Mutex<GuestRemaps>,
    /// The KVM slot over the notification page (poll mode).
    notify_slot: Mutex<Option<u32>>,
    bar0_gpa: u64,
}

impl ShadowHooks {
    pub(crate) fn new(vm: &Vm, conn: &Connection, bar0_gpa: u64) -> Self {
        let region = find_notify(conn);
        ShadowHooks {
            notify: Arc::new(NotifyTrap {
                range: region.map(|r| r.offset..r.offset + r.length),
                hook: Mutex::new(None),
                shadowed: AtomicBool::new(false),
                reset_pending: AtomicBool::new(false),
                needs_reset: AtomicBool::new(false),
            }),
            region,
            vm_fd: vm.vm_fd().clone(),
            ram: vm.ram().clone(),
            remaps: Mutex::new(GuestRemaps::default()),
            notify_slot: Mutex::new(None),
            bar0_gpa,
        }
    }

    pub(crate) fn set_notify_hook(&self, hook: Option<NotifyHook>) {
        *self.notify.hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }
}

/// Walks the configuration space's capability list for the virtio notify capability in BAR0.
fn find_notify(conn: &Connection) -> Option<NotifyRegion> {
    let read = |off: u64, n: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        conn.region_read(CONFIG_REGION, off, &mut b).ok()?;
        Some(b)
    };
    let mut ptr = u64::from(read(0x34, 1)?[0] & 0xfc);
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let b = read(ptr, 20)?;
        if b[0] == PCI_CAP_ID_VNDR {
            if let Some(c) = VirtioPciCap::from_bytes(&b) {
                if c.cfg_type == cfg_type::NOTIFY && c.bar == 0 {
                    return Some(NotifyRegion {
                        offset: u64::from(c.offset),
                        length: u64::from(c.length),
                        multiplier: c.notify_off_multiplier,
                    });
                }
            }
        }
        ptr = u64::from(b[1] & 0xfc);
    }
    None
}

/// One queue as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetQueueConfig {
    /// Queue index.
    pub index: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring (driver area).
    pub driver: u64,
    /// Used ring (device area).
    pub device: u64,
    /// Enabled by the driver.
    pub enabled: bool,
    /// MSI-X vector (`NO_VECTOR` for none).
    pub msix_vector: u16,
    /// `queue_notify_off`.
    pub notify_off: u16,
}

/// The device's configuration as the engine needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Features the driver accepted.
    pub features: u64,
    /// Device status.
    pub status: u8,
    /// Every queue the device has (enabled or not).
    pub queues: Vec<NetQueueConfig>,
    /// The notify capability.
    pub notify: NotifyRegion,
}

impl NetAttachment {
    fn common_read(&self, field: u64, n: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.conn
            .region_read(0, common_offset() + field, &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }

    fn common_write(&self, field: u64, v: u64, n: usize) -> Result<()> {
        self.conn
            .region_write(0, common_offset() + field, &v.to_le_bytes()[..n])
    }

    /// Device status, read without side effects (for waiting on DRIVER_OK).
    pub fn device_status(&self) -> Result<u8> {
        Ok(self.common_read(common::DEVICE_STATUS, 1)? as u8)
    }

    /// True when the driver set DRIVER_OK (and not FAILED / NEEDS_RESET).
    pub fn driver_ok(&self) -> bool {
        self.device_status().is_ok_and(status::is_running)
    }

    /// Reads the queues' configuration back from the device. The vCPUs must be paused: the
    /// queue selector is moved (and put back). What the device reports is not trusted further
    /// than the engine's checks of every address against guest RAM.
    pub fn net_config(&self) -> Result<NetConfig> {
        let notify = self.shadow.region.ok_or_else(|| Error::Unsupported {
            name: self.conn.name.clone(),
            reason: "no virtio notify capability in BAR0".into(),
        })?;
        let mut features = 0u64;
        for half in 0..2u64 {
            self.common_write(common::DRIVER_FEATURE_SELECT, half, 4)?;
            features |= self.common_read(common::DRIVER_FEATURE, 4)? << (32 * half);
        }
        let status = self.device_status()?;
        let count = self.common_read(common::NUM_QUEUES, 2)?.min(64) as u16;
        let select = self.common_read(common::QUEUE_SELECT, 2)?;
        let mut queues = Vec::new();
        for q in 0..count {
            self.common_write(common::QUEUE_SELECT, u64::from(q), 2)?;
            queues.push(NetQueueConfig {
                index: q,
                size: self.common_read(common::QUEUE_SIZE, 2)? as u16,
                desc: self.common_read(common::QUEUE_DESC, 8)?,
                driver: self.common_read(common::QUEUE_DRIVER, 8)?,
                device: self.common_read(common::QUEUE_DEVICE, 8)?,
                enabled: self.common_read(common::QUEUE_ENABLE, 2)? != 0,
                msix_vector: self.common_read(common::QUEUE_MSIX_VECTOR, 2)? as u16,
                notify_off: self.common_read(common::QUEUE_NOTIFY_OFF, 2)? as u16,
            });
        }
        self.common_write(common::QUEUE_SELECT, select, 2)?;
        Ok(NetConfig {
            features,
            status,
            queues,
            notify,
        })
    }

    /// The configuration-change MSI-X vector the driver chose (`config_msix_vector`).
    pub fn config_vector(&self) -> Result<u16> {
        Ok(self.common_read(common::CONFIG_MSIX_VECTOR, 2)? as u16)
    }

    /// Sets the configuration-change MSI-X vector (a migration destination, after
    /// [`NetAttachment::program`]); the device may refuse it (then it reads back
    /// `NO_VECTOR`), as it may for a driver.
    pub fn set_config_vector(&self, vector: u16) -> Result<()> {
        self.common_write(common::CONFIG_MSIX_VECTOR, u64::from(vector), 2)
    }

    /// Resets the device (status 0): it stops using the rings (virtio 1.1 §2.1.2; the stand-in
    /// NIC does so before the write returns).
    pub fn reset_device(&self) -> Result<()> {
        self.common_write(common::DEVICE_STATUS, 0, 1)?;
        if self.device_status()? != 0 {
            return Err(Error::Unsupported {
                name: self.conn.name.clone(),
                reason: "the device did not reset".into(),
            });
        }
        Ok(())
    }

    /// Brings the device up as a driver that accepted `features` and set up `queues` would
    /// have (a migration destination): reset, features (refused unless the device offers all
    /// of them), each queue's size, addresses and vector, enabled, then DRIVER_OK.
    pub fn program(&self, features: u64, queues: &[NetQueueConfig]) -> Result<()> {
        let refuse = |reason: String| Error::Unsupported {
            name: self.conn.name.clone(),
            reason,
        };
        self.reset_device()?;
        let mut offered = 0u64;
        for half in 0..2u64 {
            self.common_write(common::DEVICE_FEATURE_SELECT, half, 4)?;
            offered |= self.common_read(common::DEVICE_FEATURE, 4)? << (32 * half);
        }
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} the guest uses are not offered here",
                features & !offered
            )));
        }
        let s = status::ACKNOWLEDGE | status::DRIVER;
        self.common_write(common::DEVICE_STATUS, u64::from(s), 1)?;
        for half in 0..2u64 {
            self.common_write(common::DRIVER_FEATURE_SELECT, half, 4)?;
            self.common_write(
                common::DRIVER_FEATURE,
                (features >> (32 * half)) & 0xffff_ffff,
                4,
            )?;
        }
        let s = s | status::FEATURES_OK;
        self.common_write(common::DEVICE_STATUS, u64::from(s), 1)?;
        if self.device_status()? & status::FEATURES_OK == 0 {
            return Err(refuse(format!("features {features:#x} refused")));
        }
        let count = self.common_read(common::NUM_QUEUES, 2)? as u16;
        for q in queues {
            if q.index >= count {
                return Err(refuse(format!("no queue {} ({count} queues)", q.index)));
            }
            self.common_write(common::QUEUE_SELECT, u64::from(q.index), 2)?;
            self.common_write(common::QUEUE_SIZE, u64::from(q.size), 2)?;
            self.common_write(common::QUEUE_DESC, q.desc, 8)?;
            self.common_write(common::QUEUE_DRIVER, q.driver, 8)?;
            self.common_write(common::QUEUE_DEVICE, q.device, 8)?;
            self.common_write(common::QUEUE_MSIX_VECTOR, u64::from(q.msix_vector), 2)?;
            self.common_write(common::QUEUE_ENABLE, 1, 2)?;
            if self.common_read(common::QUEUE_ENABLE, 2)? != 1 {
                return Err(refuse(format!("queue {} was not enabled", q.index)));
            }
        }
        self.common_write(common::DEVICE_STATUS, u64::from(s | status::DRIVER_OK), 1)?;
        if !self.driver_ok() {
            return Err(refuse("the device did not start".into()));
        }
        Ok(())
    }

    /// Notifies the device of queue `index` (its `queue_notify_off` is `notify_off`).
    pub fn notify_device(&self, notify_off: u16, index: u16) -> Result<()> {
        let Some(r) = self.shadow.region else {
            return Ok(());
        };
        let at = r.offset + u64::from(notify_off) * u64::from(r.multiplier);
        self.conn.region_write(0, at, &index.to_le_bytes())
    }

    /// While `on`, a guest reset (status 0) is held until [`NetAttachment::finish_reset`]
    /// instead of reaching the device under the engine's feet.
    pub fn set_shadowed(&self, on: bool) {
        self.shadow.notify.shadowed.store(on, Ordering::SeqCst);
    }

    /// The guest asked for a reset the engine holds.
    pub fn reset_pending(&self) -> bool {
        self.shadow.notify.reset_pending.load(Ordering::SeqCst)
    }

    /// Gives the device the guest's held reset (after the engine left shadow mode).
    pub fn finish_reset(&self) -> Result<()> {
        if self
            .shadow
            .notify
            .reset_pending
            .swap(false, Ordering::SeqCst)
        {
            self.common_write(common::DEVICE_STATUS, 0, 1)?;
            self.shadow
                .notify
                .needs_reset
                .store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The engine found a queue it shadows broken (what the device would have answered with
    /// DEVICE_NEEDS_RESET): the guest reads DEVICE_NEEDS_RESET in the device status until its
    /// reset reaches the device, and gets the configuration-change interrupt (its config
    /// MSI-X vector), as from the device itself.
    pub fn report_needs_reset(&self) -> Result<()> {
        self.shadow.notify.needs_reset.store(true, Ordering::SeqCst);
        let v = self.common_read(common::CONFIG_MSIX_VECTOR, 2)? as u16;
        if v != virtio_spec::pci::NO_VECTOR {
            self.interrupt_guest(v)?;
        }
        Ok(())
    }

    /// Trap mode: notification writes go to `hook` (None: to the device again).
    pub fn set_notify_hook(&self, hook: Option<NotifyHook>) {
        self.shadow.set_notify_hook(hook);
    }

    /// Poll mode: backs the notification page with host memory at `host` in the guest's view
    /// (writes no longer exit), or (None) takes it away again. Refused when the region is not
    /// one page of its own.
    ///
    /// # Safety
    /// `host` must stay mapped (one page) until the page is taken away or the VM is gone.
    pub unsafe fn map_notify_page(&self, slots: &MemorySlots, host: Option<u64>) -> Result<()> {
        let name = &self.conn.name;
        let r = self.shadow.region.ok_or_else(|| Error::Unsupported {
            name: name.clone(),
            reason: "no virtio notify capability in BAR0".into(),
        })?;
        if !r.offset.is_multiple_of(PAGE) || r.length > PAGE {
            return Err(Error::Hook {
                name: name.clone(),
                source: HookError::BarPageNotMappable(r.offset),
            });
        }
        let gpa = self.shadow.bar0_gpa + r.offset;
        let mut slot = self
            .shadow
            .notify_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let vmm_err = |what: String| {
            move |source| Error::Vmm {
                name: name.clone(),
                what,
                source,
            }
        };
        if let Some(s) = slot.take() {
            slots
                .remove(s)
                .map_err(vmm_err(format!("removing memory slot {s}")))?;
        }
        if let Some(host) = host {
            // SAFETY: the caller keeps the page mapped while the slot exists.
            let s = unsafe { slots.add(gpa, PAGE, host, SlotKind::Device, false) }.map_err(
                vmm_err(format!("mapping the notification page at {gpa:#x}")),
            )?;
            *slot = Some(s);
        }
        Ok(())
    }

    /// Moves the guest's view of `[gpa, gpa + size)` onto host memory at `host`, or back to RAM
    /// (None). The vCPUs must be paused.
    ///
    /// # Safety
    /// A host range must stay mapped until it is moved back or the VM is gone.
    pub unsafe fn remap_guest_range(
        &self,
        slots: &MemorySlots,
        gpa: u64,
        size: u64,
        host: Option<u64>,
    ) -> Result<()> {
        let mut remaps = self.shadow.remaps.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller's promise is this function's contract.
        unsafe { remaps.remap(slots, &self.shadow.ram, &self.conn.name, gpa, size, host) }
    }

    /// Takes MSI-X `vector` away from KVM: returns the eventfd the device signals.
    pub fn take_interrupt(&self, vector: u16) -> Result<EventFd> {
        crate::msix::take(&self.msix, &self.irqs, &self.conn.name, vector)
    }

    /// Gives MSI-X `vector` back to KVM.
    pub fn release_interrupt(&self, vector: u16) {
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(vector);
    }

    /// Sends the guest the message of `vector`; false when masked or off.
    pub fn interrupt_guest(&self, vector: u16) -> Result<bool> {
        let msg = self
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .message(vector);
        crate::msix::signal(&self.shadow.vm_fd, &self.conn.name, vector, msg)
    }
}

/// BAR0 offset of the common configuration (the stand-in NIC and the guest driver put it at
/// 0; the engine reads it there).
const fn common_offset() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn trap() -> NotifyTrap {
        NotifyTrap {
            range: Some(0x3000..0x4000),
            hook: Mutex::new(None),
            shadowed: AtomicBool::new(false),
            reset_pending: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Notification writes go to the hook only while one is installed, and only inside the
    /// notification region; the queue index is the written value, whatever its width.
    #[test]
    fn notifications_reach_the_hook_only_inside_the_region() {
        let t = trap();
        assert!(
            !t.take(0x3000, &1u16.to_le_bytes()),
            "no hook: to the device"
        );
        let seen = Arc::new(AtomicU32::new(0));
        let s = seen.clone();
        *t.hook.lock().unwrap() = Some(Arc::new(move |q| {
            s.store(0x1_0000 | u32::from(q), Ordering::SeqCst);
        }));
        assert!(t.take(0x3004, &1u16.to_le_bytes()));
        assert_eq!(seen.load(Ordering::SeqCst), 0x1_0001);
        assert!(t.take(0x3000, &[7]), "a one-byte write");
        assert_eq!(seen.load(Ordering::SeqCst), 0x1_0007);
        assert!(
            t.take(0x3000, &0xdead_beefu32.to_le_bytes()),
            "a wide write"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 0x1_beef);
        assert!(
            !t.take(0x2fff, &[1]) && !t.take(0x4000, &[1]),
            "outside the region"
        );
        // An empty write carries no index: taken (never forwarded) as queue 0.
        assert!(t.take(0x3000, &[]));
        assert_eq!(seen.load(Ordering::SeqCst), 0x1_0000);
    }

    /// A reset (status 0) is held only while shadowed; other status writes pass.
    #[test]
    fn a_reset_is_held_only_while_shadowed() {
        let t = trap();
        let status = common_offset() + common::DEVICE_STATUS;
        assert!(!t.hold_reset(status, &[0]), "direct: the device resets");
        t.shadowed.store(true, Ordering::SeqCst);
        assert!(!t.hold_reset(status, &[status::DRIVER_OK | status::DRIVER]));
        assert!(!t.hold_reset(common::QUEUE_SELECT, &[0]));
        assert!(!t.reset_pending.load(Ordering::SeqCst));
        assert!(t.hold_reset(status, &[0]));
        assert!(t.reset_pending.load(Ordering::SeqCst));
    }

    /// The engine's DEVICE_NEEDS_RESET is added to the status byte of every read that covers
    /// it (any width), nothing else changes, and a reset reaching the device ends it.
    #[test]
    fn needs_reset_shows_in_the_status_until_a_reset_reaches_the_device() {
        let t = trap();
        let at = common_offset() + common::DEVICE_STATUS;
        let read = |offset: u64, len: usize| {
            let mut b = vec![0x0fu8; len];
            t.overlay_read(offset, &mut b);
            b
        };
        assert_eq!(read(at, 1), [0x0f], "nothing reported");
        t.needs_reset.store(true, Ordering::SeqCst);
        let ored = 0x0f | status::DEVICE_NEEDS_RESET;
        assert_eq!(read(at, 1), [ored]);
        assert_eq!(read(at - 2, 4), [0x0f, 0x0f, ored, 0x0f]);
        assert_eq!(read(at + 1, 1), [0x0f], "config generation");
        assert_eq!(read(at - 4, 4), [0x0f; 4], "num_queues and msix config");
        // Held while shadowed: still reported; a reset that reaches the device ends it.
        t.shadowed.store(true, Ordering::SeqCst);
        assert!(t.hold_reset(at, &[0]));
        assert_eq!(read(at, 1), [ored]);
        t.shadowed.store(false, Ordering::SeqCst);
        assert!(!t.hold_reset(at, &[0]));
        assert_eq!(read(at, 1), [0x0f]);
    }
}

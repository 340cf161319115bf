//! A passthrough virtio-net device for one VM run: the attachment and its shadow engine —
//! entered once the guest's driver started the device in continuous shadow mode, for a live
//! migration otherwise ([`NetSession::migratable`]) — and the migration destination's side
//! ([`NetRestorer`]).
//!
//! On the destination the NIC stays shadowed after the migration: its device starts its queues
//! at index 0 while the guest's indexes carry on, and virtio has no way to make a device start
//! elsewhere, so the engine translates between the two (the guest sees nothing of it). The
//! guest's next reset of the device ends it; the queues run direct from then on.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use migration::{DeviceError, DeviceRestorer, MigratableDevice};
use passthrough::virtio_net::NetAttachment;
use shadow::{
    engine::net::NetEngine,
    engine::net::NetEngineStatus,
    engine::net_device::{restore_net, NetMigratable, NetMigrationState, NET_DEVICE_NAME},
    EngineOptions,
};
use vmm::Vm;

/// Where the NIC's BAR0 goes: above an NVMe BAR0 (256 KiB at the window's start), aligned to
/// any BAR0 up to 1 MiB. Source and destination place it alike.
pub const NET_BAR0: u64 = guest_abi::layout::PCI_MMIO_BASE + (1 << 20);

/// The virtio-net engine's options from the session's: the copy of a shadowed ring is always
/// the vCPU buffer for a NIC (the device-buffer designation needs the device idle, and a
/// receive queue never is), whatever the NVMe engine uses.
pub fn net_options(opts: EngineOptions) -> EngineOptions {
    EngineOptions {
        designation: shadow::engine::Designation::VcpuBuffer,
        ..opts
    }
}

/// Attaches the `ferry device virtio-net` at `socket` to `vm` (before the VM starts).
pub fn attach(vm: &Vm, socket: &std::path::Path) -> crate::Result<NetAttachment> {
    NetAttachment::attach(vm, NET_DEVICE_NAME, socket, NET_BAR0).map_err(|source| {
        crate::Error::Passthrough {
            what: "attaching the passthrough virtio-net device",
            source,
        }
    })
}

/// How long the device must have stayed started before the engine enters (the driver's
/// bring-up writes are over).
const SETTLE: Duration = Duration::from_millis(200);

/// The NIC of a session.
pub struct NetSession {
    att: Arc<NetAttachment>,
    engine: Arc<NetEngine>,
    /// Enter shadow mode once the driver started the device (and again after a reset).
    continuous: bool,
    /// Since when the driver has had DRIVER_OK set.
    running_since: Option<Instant>,
    /// Entering shadow mode failed with this (not retried).
    pub shadow_error: Option<String>,
    /// Set once continuous shadow mode has been entered (see [`NetSession::report_entered`]).
    entered: Option<Arc<AtomicBool>>,
}

impl NetSession {
    /// `att`, with an engine entering shadow mode continuously when `continuous` (otherwise
    /// for a migration only).
    pub fn new(att: NetAttachment, continuous: bool, opts: EngineOptions) -> crate::Result<Self> {
        let att = Arc::new(att);
        let engine = Arc::new(NetEngine::new(att.clone(), net_options(opts)).map_err(
            |source| crate::Error::Shadow {
                what: "starting the virtio-net shadow engine",
                source: Box::new(source),
            },
        )?);
        Ok(Self::restored(engine, continuous))
    }

    /// A session around an engine made elsewhere (the migration destination rebuilt it,
    /// shadowed).
    pub fn restored(engine: Arc<NetEngine>, continuous: bool) -> Self {
        NetSession {
            att: engine.attachment().clone(),
            engine,
            continuous,
            running_since: None,
            shadow_error: None,
            entered: None,
        }
    }

    /// Sets `flag` once continuous shadow mode has been entered (a benchmark counts shadowed
    /// traffic from then on, whatever the time entering took on a loaded machine).
    pub fn report_entered(mut self, flag: Option<Arc<AtomicBool>>) -> Self {
        self.entered = flag;
        self
    }

    /// The device as a migration source.
    pub fn migratable(&self) -> Box<dyn MigratableDevice> {
        Box::new(NetMigratable::new(self.engine.clone()))
    }

    /// True while [`NetSession::tick`] has work to do (an engine that is not in error: it
    /// waits to enter, or watches a shadowed device for a guest reset to hand over).
    pub fn wants_tick(&self) -> bool {
        self.shadow_error.is_none() && (self.continuous || self.engine.is_shadowed())
    }

    /// Enters shadow mode once the driver has run the device for [`SETTLE`]; while shadowed,
    /// hands a guest reset the attachment held to the engine (which lets go of the rings,
    /// then the device resets; shadow mode is entered again once the driver restarted it).
    pub fn tick(&mut self, vm: &Vm) {
        if !self.wants_tick() {
            return;
        }
        let engine = &self.engine;
        if engine.is_shadowed() {
            if self.att.reset_pending() {
                self.running_since = None;
                match engine.reset(vm) {
                    Ok(()) => eprintln!("ferry: virtio-net guest reset; shadow state dropped"),
                    Err(e) => {
                        let why = vmm::ErrorChain(&e).to_string();
                        tracing::error!("handing a guest reset over: {why}");
                        eprintln!("ferry: virtio-net shadow mode abandoned: {why}");
                        // The guest waits for its reset: give it, whatever the rings hold.
                        self.att.set_shadowed(false);
                        if let Err(e) = self.att.finish_reset() {
                            tracing::error!("resetting the device: {}", vmm::ErrorChain(&e));
                        }
                        self.shadow_error = Some(why);
                    }
                }
            }
            return;
        }
        if !self.continuous {
            return;
        }
        if !self.att.driver_ok() {
            self.running_since = None;
            return;
        }
        let since = *self.running_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SETTLE {
            return;
        }
        match engine.enter(vm) {
            Ok(()) => {
                if let Some(f) = &self.entered {
                    f.store(true, Ordering::SeqCst);
                }
                eprintln!(
                    "ferry: virtio-net shadow mode entered ({:?} notifications)",
                    engine.options().interception
                )
            }
            Err(e) => {
                let why = vmm::ErrorChain(&e).to_string();
                tracing::error!("entering continuous virtio-net shadow mode: {why}");
                eprintln!("ferry: continuous virtio-net shadow mode not entered: {why}");
                self.shadow_error = Some(why);
            }
        }
    }

    /// The engine's status (None without an engine).
    pub fn shadow_status(&self) -> Option<NetEngineStatus> {
        Some(self.engine.status())
    }

    /// Stops the engine and detaches the device.
    pub fn finish(self) {
        drop(self.engine);
        match Arc::try_unwrap(self.att) {
            Ok(a) => a.detach(),
            Err(_) => tracing::warn!("the virtio-net attachment is still shared; not detaching"),
        }
    }
}

/// The migration destination's side of a passthrough virtio-net NIC: attaches its own device
/// (a running `ferry device virtio-net` on the destination's network) to the arriving VM
/// while the memory arrives, and rebuilds it from the source's state in the downtime.
pub struct NetRestorer {
    socket: Option<PathBuf>,
    opts: EngineOptions,
    /// The device attached before its state came (outside the downtime).
    attached: Option<NetAttachment>,
    /// The engine, once restored (shadowed).
    pub engine: Option<Arc<NetEngine>>,
}

impl NetRestorer {
    /// A restorer that attaches the device at `socket` (None: refuse a NIC).
    pub fn new(socket: Option<PathBuf>, opts: EngineOptions) -> Self {
        NetRestorer {
            socket,
            opts: net_options(opts),
            attached: None,
            engine: None,
        }
    }

    fn attach(&self, vm: &Vm) -> Result<NetAttachment, DeviceError> {
        let socket = self.socket.as_ref().ok_or_else(net_not_configured)?;
        attach(vm, socket).map_err(DeviceError::while_doing(
            "attaching the destination's virtio-net device",
        ))
    }
}

impl DeviceRestorer for NetRestorer {
    fn prepare(&mut self, vm: &Vm, names: &[String]) -> Result<(), DeviceError> {
        // Connecting and mapping guest RAM for the device's DMA happen while the memory
        // arrives, not in the downtime. A failure is tried again (and reported) at restore.
        if names.iter().any(|n| n == NET_DEVICE_NAME)
            && self.socket.is_some()
            && self.engine.is_none()
            && self.attached.is_none()
        {
            match self.attach(vm) {
                Ok(att) => self.attached = Some(att),
                Err(e) => tracing::warn!(
                    "attaching the destination's virtio-net device before the transfer: {}",
                    vmm::ErrorChain(&e)
                ),
            }
        }
        Ok(())
    }

    fn restore(&mut self, vm: &Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        if name != NET_DEVICE_NAME || self.engine.is_some() {
            return Err(DeviceError::NoSlot { name: name.into() });
        }
        if self.socket.is_none() {
            return Err(net_not_configured());
        }
        // Garbage is refused before a device is touched.
        let state =
            NetMigrationState::decode(state).map_err(|e| DeviceError::InvalidState(e.into()))?;
        let att = match self.attached.take() {
            Some(att) => att,
            None => self.attach(vm)?,
        };
        let engine = restore_net(Arc::new(att), self.opts, vm, &state).map_err(|e| match e {
            shadow::Error::State(e) => DeviceError::InvalidState(e.into()),
            e => DeviceError::failed("rebuilding the virtio-net device from its state", e),
        })?;
        self.engine = Some(Arc::new(engine));
        Ok(())
    }
}

/// A VM with a passthrough NIC arrived at a destination started without one.
fn net_not_configured() -> DeviceError {
    DeviceError::NotConfigured(
        "the VM has a passthrough virtio-net device and this destination has none (start \
         `ferry receive` with --passthrough virtio-net=SOCKET)"
            .into(),
    )
}

/// The destination's restorers of both passthrough device classes: the NIC's state goes to
/// the [`NetRestorer`], every other device's to the NVMe one.
pub struct Restorers<'a> {
    /// The NVMe device's.
    pub nvme: &'a mut crate::passthrough::NvmeRestorer,
    /// The NIC's.
    pub net: &'a mut NetRestorer,
}

impl DeviceRestorer for Restorers<'_> {
    fn prepare(&mut self, vm: &Vm, names: &[String]) -> Result<(), DeviceError> {
        self.nvme.prepare(vm, names)?;
        self.net.prepare(vm, names)
    }

    fn precopy(&mut self, vm: &Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        // Without this the NVMe device's pre-copy state was dropped here (the trait's default)
        // and `ferry receive` replayed its whole configuration inside the downtime.
        if name == NET_DEVICE_NAME {
            self.net.precopy(vm, name, state)
        } else {
            self.nvme.precopy(vm, name, state)
        }
    }

    fn restore(&mut self, vm: &Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        if name == NET_DEVICE_NAME {
            self.net.restore(vm, name, state)
        } else {
            self.nvme.restore(vm, name, state)
        }
    }
}

#[cfg(test)]
mod tests {
    use migration::{DeviceError, DeviceRestorer};

    /// The destination's NIC restorer refuses garbage before it attaches a device (the socket
    /// here does not even exist), a device it has no slot for, and a NIC when it was started
    /// without one; the composite sends each device's state to its own class.
    #[test]
    fn the_net_restorer_refuses_bad_states_before_attaching() {
        let vm = vmm::Vm::new(&vmm::VmConfig {
            ram_size: 32 << 20,
            console: vmm::devices::serial::ConsoleSink::Null,
            ..Default::default()
        })
        .unwrap();
        let missing = std::env::temp_dir().join("ferry-no-such-net-device.sock");
        let mut r = super::NetRestorer::new(Some(missing), shadow::EngineOptions::default());
        // A prepare that cannot attach is not final (the restore reports it).
        r.prepare(&vm, &["net0".into()]).unwrap();
        for blob in [
            &[][..],
            &[1, 0, 0][..],
            &[2, 0, 0, 0][..],
            &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..],
        ] {
            match r.restore(&vm, "net0", blob) {
                Err(DeviceError::InvalidState(_)) => {}
                other => panic!("{blob:?}: {other:?}"),
            }
        }
        assert!(matches!(
            r.restore(&vm, "net7", &[1, 0, 0, 0]),
            Err(DeviceError::NoSlot { .. })
        ));
        let mut none = super::NetRestorer::new(None, shadow::EngineOptions::default());
        match none.restore(&vm, "net0", &[1, 0, 0, 0]) {
            Err(e @ DeviceError::NotConfigured(_)) => {
                assert!(
                    e.to_string().contains("--passthrough virtio-net=SOCKET"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Both classes: the NIC's state reaches the NIC's restorer, the rest the NVMe one's.
        let mut nvme =
            crate::passthrough::NvmeRestorer::new(None, shadow::EngineOptions::default()).unwrap();
        let mut both = super::Restorers {
            nvme: &mut nvme,
            net: &mut none,
        };
        assert!(matches!(
            both.restore(&vm, "net0", &[1, 0, 0, 0]),
            Err(DeviceError::NotConfigured(e)) if e.contains("virtio-net")
        ));
        assert!(matches!(
            both.restore(&vm, "nvme0", &[2, 0, 0, 0]),
            Err(DeviceError::NotConfigured(e)) if e.contains("NVMe")
        ));
        // A pre-copy state reaches the NVMe restorer too (which has no device here and says
        // so); the NIC has none to prepare and ignores one.
        assert!(matches!(
            both.precopy(&vm, "nvme0", &[1, 0, 0, 0]),
            Err(DeviceError::NotConfigured(e)) if e.contains("NVMe")
        ));
        both.precopy(&vm, "net0", &[1, 0, 0, 0]).unwrap();
    }
}

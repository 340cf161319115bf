//! How devices take part in a migration. The VMM's own devices (console, PCI host bridge) are
//! part of the VM state; a device that lives outside the VMM (a passthrough device under the
//! shadow engine) implements [`MigratableDevice`] on the source and [`DeviceRestorer`] on the
//! destination.

/// An error of another crate, boxed with its chain of causes intact.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a device's part of a migration can fail with. The cause, when there is one, is the
/// error's source: its text is not repeated here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// This side has no place for a device of that name (or has filled it already).
    #[error("no device slot for {name} here")]
    NoSlot {
        /// The device's name.
        name: String,
    },
    /// The device needs something this side was not set up with.
    #[error("{0}")]
    NotConfigured(String),
    /// The device cannot be captured right now (the switchover asks again); says why.
    #[error("{0}")]
    NotReady(String),
    /// The state sent for the device is malformed or does not fit this VM.
    #[error("its state is invalid")]
    InvalidState(#[source] BoxError),
    /// The device's implementation failed while doing `what`.
    #[error("{what}")]
    Failed {
        /// What the device was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
}

impl DeviceError {
    /// `source` made the device fail while doing `what`.
    pub fn failed(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        DeviceError::Failed {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A closure for `map_err`: the device failed while doing `what`.
    pub fn while_doing<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |e| DeviceError::failed(what, e)
    }
}

/// A device on the source side of a migration.
pub trait MigratableDevice: Send {
    /// Name, unique within the VM (sent with its state).
    fn name(&self) -> String;
    /// Called before the first memory round (e.g. to start tracking what the device writes).
    fn prepare(&mut self, vm: &vmm::Vm) -> Result<(), DeviceError>;
    /// Guest-physical pages the device wrote since the last call: these are invisible to
    /// KVM's dirty log, so migration sends them with the round.
    fn take_dirty_pages(&mut self) -> Vec<u64>;
    /// The vCPUs were just paused for the switchover: can the device be captured now? An
    /// `Err(why)` makes the migration resume the vCPUs briefly and ask again (a bounded number
    /// of times), e.g. while the guest waits for an admin command the device state cannot
    /// carry. The default is always ready.
    fn ready_for_switchover(&self, vm: &vmm::Vm) -> Result<(), DeviceError> {
        let _ = vm;
        Ok(())
    }
    /// Pre-copy state: what of the device's state is already known while the VM runs and
    /// lets the destination prepare the device outside the downtime (e.g. its configuration,
    /// replayed on the destination's device while memory still arrives). Asked before each
    /// pre-copy round after round 0 until it returns `Some`, and sent then (once). `None`:
    /// nothing to send now (the default: the device sends everything with [`save`]). The
    /// state sent with `save` must still be complete: the destination compares it with what
    /// it prepared and redoes whatever changed since.
    ///
    /// [`save`]: MigratableDevice::save
    fn precopy_state(&mut self, vm: &vmm::Vm) -> Result<Option<Vec<u8>>, DeviceError> {
        let _ = vm;
        Ok(None)
    }
    /// The vCPUs are paused: quiesce the device (finish or drain in-flight work).
    fn pause(&mut self, vm: &vmm::Vm) -> Result<(), DeviceError>;
    /// The device's state for the destination (after `pause`).
    fn save(&mut self) -> Result<Vec<u8>, DeviceError>;
    /// The migration failed: undo `prepare`/`pause`; the VM keeps running here.
    fn rollback(&mut self, vm: &vmm::Vm);
}

/// Rebuilds devices on the destination from their saved state.
pub trait DeviceRestorer {
    /// The VM was built (not started, RAM still arriving) for a migration that will bring
    /// the devices `names`: work that needs no saved state (attaching a device) can be done
    /// now, outside the downtime. The default does nothing.
    fn prepare(&mut self, vm: &vmm::Vm, names: &[String]) -> Result<(), DeviceError> {
        let _ = (vm, names);
        Ok(())
    }
    /// The source's pre-copy state of device `name` ([`MigratableDevice::precopy_state`]),
    /// received while RAM still arrives (the VM built, not started, its memory incomplete):
    /// prepare what can be prepared now; [`DeviceRestorer::restore`] gets the complete state
    /// later and must redo whatever differs. `state` came from the network: validate all of
    /// it. An error fails the migration (the source keeps the VM). The default ignores it
    /// (the switchover state is complete by itself).
    fn precopy(&mut self, vm: &vmm::Vm, name: &str, state: &[u8]) -> Result<(), DeviceError> {
        let _ = (vm, name, state);
        Ok(())
    }
    /// Restores device `name` from `state` into `vm` (built, state restored, not started yet).
    /// `state` came from the network: the restorer validates all of it before using any.
    fn restore(&mut self, vm: &vmm::Vm, name: &str, state: &[u8]) -> Result<(), DeviceError>;
}

/// A destination with no external devices: any device state is refused.
pub struct NoDevices;

impl DeviceRestorer for NoDevices {
    fn restore(&mut self, _vm: &vmm::Vm, name: &str, _state: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::NoSlot { name: name.into() })
    }
}

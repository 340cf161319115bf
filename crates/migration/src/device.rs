//! How devices take part in a migration. The VMM's own devices (console, PCI host bridge) are
//! part of the VM state; a device that lives outside the VMM (a passthrough device under the
//! shadow engine) implements [`MigratableDevice`] on the source and [`DeviceRestorer`] on the
//! destination.

/// A device on the source side of a migration.
pub trait MigratableDevice: Send {
    /// Name, unique within the VM (sent with its state).
    fn name(&self) -> String;
    /// Called before the first memory round (e.g. to start tracking what the device writes).
    fn prepare(&mut self, vm: &vmm::Vm) -> Result<(), String>;
    /// Guest-physical pages the device wrote since the last call: these are invisible to
    /// KVM's dirty log, so migration sends them with the round.
    fn take_dirty_pages(&mut self) -> Vec<u64>;
    /// The vCPUs were just paused for the switchover: can the device be captured now? An
    /// `Err(why)` makes the migration resume the vCPUs briefly and ask again (a bounded number
    /// of times), e.g. while the guest waits for an admin command the device state cannot
    /// carry. The default is always ready.
    fn ready_for_switchover(&self, vm: &vmm::Vm) -> Result<(), String> {
        let _ = vm;
        Ok(())
    }
    /// The vCPUs are paused: quiesce the device (finish or drain in-flight work).
    fn pause(&mut self, vm: &vmm::Vm) -> Result<(), String>;
    /// The device's state for the destination (after `pause`).
    fn save(&mut self) -> Result<Vec<u8>, String>;
    /// The migration failed: undo `prepare`/`pause`; the VM keeps running here.
    fn rollback(&mut self, vm: &vmm::Vm);
}

/// Rebuilds devices on the destination from their saved state.
pub trait DeviceRestorer {
    /// Restores device `name` from `state` into `vm` (built, state restored, not started yet).
    fn restore(&mut self, vm: &vmm::Vm, name: &str, state: &[u8]) -> Result<(), String>;
}

/// A destination with no external devices: any device state is refused.
pub struct NoDevices;

impl DeviceRestorer for NoDevices {
    fn restore(&mut self, _vm: &vmm::Vm, name: &str, _state: &[u8]) -> Result<(), String> {
        Err(format!("this destination has no device called {name}"))
    }
}

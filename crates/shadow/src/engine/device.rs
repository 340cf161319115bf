//! The engine as a device of a live migration (source side): prepare = enter shadow mode,
//! dirty pages = what the device wrote for completed commands, pause = drain and make RAM
//! hold the guest's view of the rings, save = configuration log + queue states, rollback =
//! leave shadow mode.
use std::sync::Arc;

use migration::MigratableDevice;
use passthrough::{config_log::ConfigLog, msix::MsixState};
use serde::{Deserialize, Serialize};
use vmm::Vm;

use super::Engine;
use crate::nvme::{validate::Limits, QueueState};

/// Version of [`SavedDevice`] on the wire (2: the MSI-X state).
pub const SAVED_VERSION: u32 = 2;

/// The device state sent at switchover.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedDevice {
    /// The admin mediation's log (controller registers, features, queues).
    pub config: ConfigLog,
    /// What the validator enforces.
    pub limits: Limits,
    /// Doorbell stride of the source device.
    pub dstrd: u8,
    /// Each queue's guest-side and device-side positions.
    pub queues: Vec<QueueState>,
    /// The guest's last doorbell values (SQ tail, CQ head) per queue.
    pub doorbells: Vec<(u32, u32)>,
    /// The guest's admin queue positions (SQ tail, CQ head) as the mediation saw them.
    pub admin: (u32, u32),
    /// The MSI-X table and enable bits the guest programmed.
    pub msix: MsixState,
}

impl SavedDevice {
    /// Versioned postcard bytes.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = SAVED_VERSION.to_le_bytes().to_vec();
        out.extend(postcard::to_allocvec(self).map_err(|e| e.to_string())?);
        Ok(out)
    }

    /// Decodes what [`SavedDevice::encode`] made (anything else is refused).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let v = b
            .get(..4)
            .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or("device state too short")?;
        if v != SAVED_VERSION {
            return Err(format!(
                "device state version {v}, this build reads {SAVED_VERSION}"
            ));
        }
        postcard::from_bytes(&b[4..]).map_err(|e| format!("device state does not decode: {e}"))
    }
}

/// The engine behind a migration: shadowing starts with the migration and, on failure, ends
/// with it.
pub struct ShadowedDevice {
    engine: Arc<Engine>,
    name: String,
    /// Shadow mode was on before the migration (continuous mode): leave it on after a failure.
    was_shadowed: bool,
    /// The negative control: no shadowing, no device dirty pages (unsafe by design).
    unsafe_no_shadow: bool,
}

impl ShadowedDevice {
    /// The migration side of `engine`.
    pub fn new(engine: Arc<Engine>, name: &str, unsafe_no_shadow: bool) -> Self {
        ShadowedDevice {
            was_shadowed: engine.is_shadowed(),
            engine,
            name: name.into(),
            unsafe_no_shadow,
        }
    }
}

impl MigratableDevice for ShadowedDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn prepare(&mut self, vm: &Vm) -> Result<(), String> {
        if self.unsafe_no_shadow {
            tracing::warn!(
                "migrating a passthrough device WITHOUT shadowing (unsafe): the pages it \
                 writes are invisible to the migration"
            );
            return Ok(());
        }
        self.was_shadowed = self.engine.is_shadowed();
        // Round 0 sends all memory: admin data pages from before it need no tracking.
        let _ = self.engine.attachment().take_admin_device_written();
        self.engine.enter(vm).map_err(|e| e.to_string())
    }

    fn ready_for_switchover(&self, _vm: &Vm) -> Result<(), String> {
        // The saved state carries the admin queue's positions, not commands in the middle.
        match self.engine.attachment().admin_positions().2 {
            0 => Ok(()),
            n => Err(format!("{n} guest admin command(s) pending")),
        }
    }

    fn take_dirty_pages(&mut self) -> Vec<u64> {
        let mut pages = self.engine.take_dirty();
        if !self.unsafe_no_shadow {
            pages.extend(self.engine.attachment().take_admin_device_written());
        }
        pages
    }

    fn pause(&mut self, vm: &Vm) -> Result<(), String> {
        if self.unsafe_no_shadow {
            // Without shadowing the device state cannot be captured honestly; enter shadow
            // mode now (vCPUs paused) only to read the positions, with nothing reported dirty
            // beyond the ring pages.
            self.engine
                .enter_while_paused(vm)
                .map_err(|e| e.to_string())?;
            self.engine.quiesce().map_err(|e| e.to_string())?;
            self.engine.discard_data_dirty();
            return Ok(());
        }
        self.engine.quiesce().map_err(|e| e.to_string())
    }

    fn save(&mut self) -> Result<Vec<u8>, String> {
        self.engine.saved().map_err(|e| e.to_string())?.encode()
    }

    fn rollback(&mut self, vm: &Vm) {
        if self.was_shadowed && !self.unsafe_no_shadow {
            // Continuous mode: keep shadowing, just let the queues run again.
            if let Err(e) = self.engine.resume_after_quiesce() {
                tracing::error!("resuming the shadowed queues after a failed migration: {e}");
            }
            return;
        }
        if let Err(e) = self.engine.leave(vm) {
            tracing::error!("leaving shadow mode after a failed migration: {e}");
        }
    }
}

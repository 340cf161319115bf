//! The engine as a device of a live migration (source side): prepare = enter shadow mode,
//! dirty pages = what the device wrote for completed commands, pause = drain and make RAM
//! hold the guest's view of the rings, save = configuration log + queue states, rollback =
//! leave shadow mode.
use std::sync::Arc;

use migration::{DeviceError, MigratableDevice};
use passthrough::{
    config_log::{ConfigLog, RestoreBounds},
    msix::MsixState,
};
use serde::{Deserialize, Serialize};
use vmm::Vm;

use super::Engine;
use crate::{
    nvme::{validate::Limits, QueueState},
    StateError,
};

/// Version of [`SavedDevice`] on the wire (2: the MSI-X state).
pub const SAVED_VERSION: u32 = 2;
/// Largest encoded state accepted (a log, 1024 queue states and an MSI-X table fit easily).
pub const MAX_SAVED_BYTES: usize = 4 << 20;
/// Most hypervisor memory the ring copies of a restored device may take.
pub const MAX_RING_COPY_BYTES: u64 = 256 << 20;
/// Most hypervisor memory the PRP-list bounce areas of a restored device may take (address
/// space of a sparse memfd; pages are touched only when lists are bounced).
pub const MAX_BOUNCE_BYTES: u64 = 1 << 30;

/// `version` (u32 LE), then `v` as postcard bytes.
fn encode_versioned<T: Serialize>(version: u32, v: &T) -> Result<Vec<u8>, StateError> {
    let mut out = version.to_le_bytes().to_vec();
    out.extend(postcard::to_allocvec(v).map_err(StateError::Encode)?);
    Ok(out)
}

/// Decodes what [`encode_versioned`] made with `version`: at most [`MAX_SAVED_BYTES`], the
/// version checked first; decoding allocates no more than the input's size allows.
fn decode_versioned<T: serde::de::DeserializeOwned>(
    version: u32,
    b: &[u8],
) -> Result<T, StateError> {
    if b.len() > MAX_SAVED_BYTES {
        return Err(StateError::TooLarge {
            len: b.len(),
            max: MAX_SAVED_BYTES,
        });
    }
    let (v, rest) = b
        .split_first_chunk::<4>()
        .ok_or(StateError::TooShort { len: b.len() })?;
    let found = u32::from_le_bytes(*v);
    if found != version {
        return Err(StateError::Version {
            found,
            expected: version,
        });
    }
    postcard::from_bytes(rest).map_err(StateError::Decode)
}

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
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        encode_versioned(SAVED_VERSION, self)
    }

    /// Decodes what [`SavedDevice::encode`] made (anything else is refused). Decoding
    /// allocates no more than the input's size allows; call [`SavedDevice::validate`] before
    /// using anything in it.
    pub fn decode(b: &[u8]) -> Result<Self, StateError> {
        decode_versioned(SAVED_VERSION, b)
    }

    /// Checks everything in a state from another host against `b` (this VM's RAM and this
    /// host's device), with checked arithmetic, before anything is allocated or mapped from
    /// it; see [`validate_saved`](super::checks::validate_saved).
    pub fn validate(&self, b: &RestoreBounds) -> Result<(), StateError> {
        super::checks::validate_saved(self, b)
    }
}

/// Version of [`PrecopyDevice`] on the wire.
pub const PRECOPY_VERSION: u32 = 1;

/// The device state sent during pre-copy: the configuration the destination replays on its
/// device while RAM still arrives. The switchover state ([`SavedDevice`]) still carries all of
/// it; the destination compares and replays again whatever changed in between.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrecopyDevice {
    /// The admin mediation's log when it was taken.
    pub config: ConfigLog,
    /// What the validator enforces.
    pub limits: Limits,
    /// Doorbell stride of the source device.
    pub dstrd: u8,
    /// The guest's admin queue positions (SQ tail, CQ head), no admin command pending.
    pub admin: (u32, u32),
    /// The phase the guest expects its next admin completion with (the destination's RAM
    /// may not hold the admin CQ yet when the configuration is replayed).
    pub admin_phase: bool,
    /// The MSI-X table and enable bits the guest programmed.
    pub msix: MsixState,
}

impl PrecopyDevice {
    /// Versioned postcard bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        encode_versioned(PRECOPY_VERSION, self)
    }

    /// Decodes what [`PrecopyDevice::encode`] made (anything else is refused); call
    /// [`PrecopyDevice::validate`] before using anything in it.
    pub fn decode(b: &[u8]) -> Result<Self, StateError> {
        decode_versioned(PRECOPY_VERSION, b)
    }

    /// The switchover state this pre-copy state stands for: its log's queue pairs, every
    /// position at 0. Fails when the log's queues cannot be shadowed.
    pub fn as_saved(&self) -> Result<SavedDevice, StateError> {
        let geos =
            super::geometries(&self.config).map_err(|e| StateError::Unshadowable(e.into()))?;
        Ok(SavedDevice {
            config: self.config.clone(),
            limits: self.limits,
            dstrd: self.dstrd,
            doorbells: vec![(0, 0); geos.len()],
            queues: geos
                .into_iter()
                .map(|geometry| QueueState {
                    geometry,
                    guest: Default::default(),
                    device: Default::default(),
                    stats: Default::default(),
                })
                .collect(),
            admin: self.admin,
            msix: self.msix.clone(),
        })
    }

    /// Checks everything in a pre-copy state from another host against `b`, as
    /// [`SavedDevice::validate`] checks a switchover state (the same checks, on
    /// [`PrecopyDevice::as_saved`]).
    pub fn validate(&self, b: &RestoreBounds) -> Result<(), StateError> {
        self.as_saved()?.validate(b)
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

    fn prepare(&mut self, vm: &Vm) -> Result<(), DeviceError> {
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
        self.engine
            .enter(vm)
            .map_err(DeviceError::while_doing("entering shadow mode"))
    }

    fn precopy_state(&mut self, _vm: &Vm) -> Result<Option<Vec<u8>>, DeviceError> {
        let Some(pre) = self.engine.precopy_state() else {
            return Ok(None);
        };
        pre.encode()
            .map(Some)
            .map_err(DeviceError::while_doing("encoding the pre-copy state"))
    }

    fn ready_for_switchover(&self, _vm: &Vm) -> Result<(), DeviceError> {
        // The saved state carries the admin queue's positions, not commands in the middle.
        match self.engine.attachment().admin_positions().2 {
            0 => Ok(()),
            n => Err(DeviceError::NotReady(format!(
                "{n} guest admin command(s) pending"
            ))),
        }
    }

    fn take_dirty_pages(&mut self) -> Vec<u64> {
        let mut pages = self.engine.take_dirty();
        if !self.unsafe_no_shadow {
            pages.extend(self.engine.attachment().take_admin_device_written());
        }
        pages
    }

    fn pause(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        if self.unsafe_no_shadow {
            // Without shadowing the device state cannot be captured honestly; enter shadow
            // mode now (vCPUs paused) only to read the positions, with nothing reported dirty
            // beyond the ring pages.
            self.engine
                .enter_while_paused(vm)
                .map_err(DeviceError::while_doing(
                    "entering shadow mode while paused",
                ))?;
            self.engine
                .quiesce()
                .map_err(DeviceError::while_doing("quiescing the queues"))?;
            self.engine.discard_data_dirty();
            return Ok(());
        }
        self.engine
            .quiesce()
            .map_err(DeviceError::while_doing("quiescing the queues"))
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        self.engine
            .saved()
            .map_err(DeviceError::while_doing("capturing the queue states"))?
            .encode()
            .map_err(DeviceError::while_doing("encoding the device state"))
    }

    fn rollback(&mut self, vm: &Vm) {
        if self.was_shadowed && !self.unsafe_no_shadow {
            // Continuous mode: keep shadowing, just let the queues run again.
            if let Err(e) = self.engine.resume_after_quiesce() {
                tracing::error!(
                    "resuming the shadowed queues after a failed migration: {}",
                    vmm::ErrorChain(&e)
                );
            }
            return;
        }
        if let Err(e) = self.engine.leave(vm) {
            tracing::error!(
                "leaving shadow mode after a failed migration: {}",
                vmm::ErrorChain(&e)
            );
        }
    }
}

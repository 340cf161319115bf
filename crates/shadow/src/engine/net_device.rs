//! The virtio-net engine as a device of a live migration (source side), and the state it
//! sends: prepare = enter shadow mode (if the session did not shadow already), dirty pages =
//! the receive buffers and used rings the device wrote, switchover = hold the queues until no
//! packet to send is in flight, pause = save (the device resets; RAM holds the guest's view
//! of the rings), save = the queues' state, the MSI-X table and the configuration vector,
//! rollback = the VM keeps running here with its NIC working (held queues released; a device
//! already reset is programmed again from the saved state and stays shadowed).
use std::sync::Arc;

use migration::{DeviceError, MigratableDevice};
use passthrough::msix::MsixState;
use serde::{Deserialize, Serialize};
use vmm::Vm;

use super::{net::NetEngine, net_migrate::NetSavedDevice};
use crate::StateError;

/// The device name a passthrough virtio-net NIC migrates under.
pub const NET_DEVICE_NAME: &str = "net0";
/// Version of [`NetMigrationState`] on the wire.
pub const NET_STATE_VERSION: u32 = 1;
/// Largest encoded state accepted (16 queues of 32 768 heads in flight fit easily).
pub const MAX_NET_STATE_BYTES: usize = 2 << 20;

/// The switchover resets the source's device once no frame arrived for this long...
const RECEIVE_QUIET: std::time::Duration = std::time::Duration::from_millis(2);
/// ... or after this long at most (the vCPUs are paused meanwhile).
const RECEIVE_SETTLE_MAX: std::time::Duration = std::time::Duration::from_millis(10);

/// What a shadowed virtio-net NIC sends at switchover.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetMigrationState {
    /// Features and each queue's place, indexes and chains in flight.
    pub device: NetSavedDevice,
    /// The MSI-X table and enable bits the guest programmed.
    pub msix: MsixState,
    /// The configuration-change vector the driver chose.
    pub config_vector: u16,
}

impl NetMigrationState {
    /// Versioned postcard bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut out = NET_STATE_VERSION.to_le_bytes().to_vec();
        out.extend(postcard::to_allocvec(self).map_err(StateError::Encode)?);
        Ok(out)
    }

    /// Decodes what [`NetMigrationState::encode`] made; anything else is refused. Decoding
    /// allocates no more than the input's size allows; the contents are checked where they
    /// are used ([`NetEngine::restore`], the attachment's MSI-X restore).
    pub fn decode(b: &[u8]) -> Result<Self, StateError> {
        if b.len() > MAX_NET_STATE_BYTES {
            return Err(StateError::TooLarge {
                len: b.len(),
                max: MAX_NET_STATE_BYTES,
            });
        }
        let (v, rest) = b
            .split_first_chunk::<4>()
            .ok_or(StateError::TooShort { len: b.len() })?;
        let found = u32::from_le_bytes(*v);
        if found != NET_STATE_VERSION {
            return Err(StateError::Version {
                found,
                expected: NET_STATE_VERSION,
            });
        }
        postcard::from_bytes(rest).map_err(StateError::Decode)
    }
}

/// A passthrough virtio-net NIC behind a migration.
pub struct NetMigratable {
    engine: Arc<NetEngine>,
    /// Shadow mode was on before the migration (continuous mode).
    was_shadowed: bool,
    /// What `pause` captured: the state, and the pages to send again.
    saved: Option<(NetMigrationState, Vec<u64>)>,
}

impl NetMigratable {
    /// The migration side of `engine`.
    pub fn new(engine: Arc<NetEngine>) -> Self {
        NetMigratable {
            was_shadowed: engine.is_shadowed(),
            engine,
            saved: None,
        }
    }
}

impl MigratableDevice for NetMigratable {
    fn name(&self) -> String {
        NET_DEVICE_NAME.into()
    }

    fn prepare(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        self.was_shadowed = self.engine.is_shadowed();
        self.saved = None;
        if !self.engine.attachment().driver_ok() {
            return Err(DeviceError::NotConfigured(
                "the guest's driver has not started the virtio-net device: its rings cannot \
                 be tracked yet (migrate once the NIC is up)"
                    .into(),
            ));
        }
        // Round 0 sends all memory: what the device wrote before needs no tracking.
        self.engine
            .enter(vm)
            .map_err(DeviceError::while_doing("entering shadow mode"))?;
        let _ = self.engine.take_dirty();
        Ok(())
    }

    fn take_dirty_pages(&mut self) -> Vec<u64> {
        let mut pages = self.engine.take_dirty();
        if let Some((_, p)) = &mut self.saved {
            pages.append(p);
        }
        pages
    }

    fn ready_for_switchover(&self, _vm: &Vm) -> Result<(), DeviceError> {
        self.engine
            .ready_for_switchover()
            .map_err(|e| DeviceError::NotReady(vmm::ErrorChain(&e).to_string()))
    }

    fn pause(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        let att = self.engine.attachment();
        let config_vector = att
            .config_vector()
            .map_err(DeviceError::while_doing("reading the configuration vector"))?;
        let msix = att.msix_state();
        let waited = self
            .engine
            .settle_receive(RECEIVE_QUIET, RECEIVE_SETTLE_MAX);
        tracing::debug!(
            waited_us = waited.as_micros() as u64,
            "switchover: frames on their way landed"
        );
        let (device, pages) = self
            .engine
            .save(vm)
            .map_err(DeviceError::while_doing("saving the virtqueues"))?;
        self.saved = Some((
            NetMigrationState {
                device,
                msix,
                config_vector,
            },
            pages,
        ));
        Ok(())
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        let (state, _) = self
            .saved
            .as_ref()
            .ok_or_else(|| DeviceError::NotReady("the virtio-net device was not paused".into()))?;
        state
            .encode()
            .map_err(DeviceError::while_doing("encoding the device state"))
    }

    fn rollback(&mut self, vm: &Vm) {
        if let Some((state, _)) = self.saved.take() {
            // The save reset the device: program it again, shadowed (its indexes start at 0
            // again, so the queues stay translated; a guest reset ends that).
            if let Err(e) = self.engine.reinstate(vm, &state.device) {
                tracing::error!(
                    "programming the virtio-net device again after a failed migration: {}",
                    vmm::ErrorChain(&e)
                );
                return;
            }
            if let Err(e) = self
                .engine
                .attachment()
                .set_config_vector(state.config_vector)
            {
                tracing::error!(
                    "restoring the configuration vector after a failed migration: {}",
                    vmm::ErrorChain(&e)
                );
            }
            return;
        }
        self.engine.release_hold();
        if !self.was_shadowed {
            if let Err(e) = self.engine.leave(vm) {
                tracing::error!(
                    "leaving virtio-net shadow mode after a failed migration: {}",
                    vmm::ErrorChain(&e)
                );
            }
        }
    }
}

/// Destination: rebuilds the NIC of `att` from `state` (from the network: checked before
/// use) into `vm` (built, RAM arrived, vCPUs not started): the MSI-X table and enable bits,
/// then the device programmed with the guest's features and rings and shadowed, the receive
/// buffers the source's device held given to it again, and the configuration vector.
pub fn restore_net(
    att: Arc<passthrough::virtio_net::NetAttachment>,
    opts: super::EngineOptions,
    vm: &Vm,
    state: &NetMigrationState,
) -> crate::Result<NetEngine> {
    att.restore_msix(&state.msix)
        .map_err(super::net::net_err("restoring the MSI-X table"))?;
    let engine = NetEngine::restore(att.clone(), opts, vm, &state.device)?;
    att.set_config_vector(state.config_vector)
        .map_err(super::net::net_err("restoring the configuration vector"))?;
    Ok(engine)
}

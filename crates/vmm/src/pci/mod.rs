//! PCI: a host bridge, one bus of 32 slots, configuration mechanism #1 at 0xCF8/0xCFC.
//!
//! Devices implement [`PciDevice`]; virtual devices build their configuration space with
//! [`PciConfiguration`]. Passthrough devices forward most of it to the real device.
mod bus;
mod config_io;
mod configuration;
mod host_bridge;

pub use bus::{PciBus, PciSlot};
pub use config_io::PciConfigIo;
pub use configuration::{BarKind, PciConfiguration, PciHeader};
pub use host_bridge::HostBridge;

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// Reads configuration dword `reg` (byte offset `reg * 4`).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within configuration dword `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

//! Ferry's stand-in NIC: a virtio 1.x (modern PCI) network device that lives in its own
//! process, speaks vfio-user on a Unix socket and puts its frames on a [`wire::Wire`] (a host
//! tap device, or one end of a socket pair in tests).
//!
//! - [`layout`]: BAR0 layout (common configuration, ISR, device configuration, notifications,
//!   MSI-X) and the PCI configuration space with its virtio capabilities;
//! - [`wire`]: where frames go: [`wire::Tap`] and [`wire::SocketWire`];
//! - [`queue`]: one split virtqueue as the device sees it, every ring entry treated as hostile;
//! - [`device`]: the register file, feature negotiation and the RX/TX data path;
//! - [`server`]: the vfio-user backend and the worker thread (woken by notifications and the
//!   wire, never spinning);
//! - [`stats`]: counters printed on exit.
//!
//! Guest memory is reached only through the client's `DMA_MAP`s (`vfio_user_device::dma`).
#![deny(missing_docs)]

pub mod device;
mod error;
pub mod layout;
pub mod queue;
pub mod server;
pub mod stats;
pub mod wire;

pub use error::{Error, Result};
pub use server::{DeviceConfig, VirtioNetDevice};
pub use stats::Stats;

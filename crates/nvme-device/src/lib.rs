//! Ferry's stand-in NVMe SSD: an NVMe controller that lives in its own process, speaks
//! vfio-user on a Unix socket and stores one namespace in a file.
//!
//! - [`layout`]: BAR0 layout (registers, one doorbell page per queue pair with DSTRD 9, MSI-X)
//!   and the PCI configuration space;
//! - [`dma`]: the device's "IOMMU": only regions the client mapped with `DMA_MAP` are reachable;
//! - [`prp`]: hostile-input-safe PRP walking;
//! - [`namespace`]: the backing file;
//! - [`controller`]: the register file and admin/I/O command processing;
//! - [`server`]: the vfio-user backend and the doorbell-polling thread;
//! - [`stats`]: counters printed on exit;
//! - [`wake`]: how the idle polling thread sleeps and who wakes it.
#![deny(missing_docs)]

pub mod controller;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod namespace;
pub mod prp;
pub mod server;
pub mod stats;
pub mod wake;

pub use error::{Error, Result};
pub use server::{DeviceConfig, NvmeDevice, PollMode};
pub use stats::Stats;
/// The DMA space, shared with the other stand-in functions.
pub use vfio_user_device::dma;

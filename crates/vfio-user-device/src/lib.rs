//! What Ferry's stand-in PCI functions (`nvme-device`, `virtio-net-device`) share, so that a
//! device crate holds only its device model:
//!
//! - [`dma`]: the device's "IOMMU": only regions the client mapped with `DMA_MAP` are
//!   reachable, every access bounds-checked;
//! - [`config`]: the configuration space of a function with one 64-bit memory BAR and MSI-X;
//! - [`msix`]: the MSI-X table in BAR0 and the interrupt eventfds of its vectors;
//! - [`server`]: the region and IRQ tables a vfio-user server announces, the bounds every
//!   region access passes first, and the [`server::Backend`] that forwards the protocol's
//!   requests to a [`server::Function`];
//! - [`shared`]: copies to and from memory another party writes concurrently, ring indexes
//!   as single loads and stores.
#![deny(missing_docs)]

pub mod config;
pub mod dma;
pub mod msix;
pub mod server;
pub mod shared;

pub use config::{ConfigSpace, Identity};
pub use msix::Msix;
pub use server::{Backend, Function, FunctionHost};

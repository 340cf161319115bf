//! Passthrough PCI devices for Ferry over vfio-user.
//!
//! - [`client`]: the vfio-user connection (shared, with disconnect detection) and the mapped
//!   BAR pages;
//! - [`pci`]: the guest-visible PCI function: configuration space virtualized (BARs placed by
//!   the VMM, the rest forwarded);
//! - [`bar`]: BAR0 accesses that exit (registers, trapped doorbell pages, MSI-X), with the
//!   admin queue mediation;
//! - [`config_log`]: the NVMe configuration log the mediation keeps;
//! - [`msix`]: MSI-X table and enable bits → KVM MSI routes and irqfds;
//! - [`hooks`]: [`DeviceHooks`], the hooks the shadow engine needs;
//! - [`dma_layout`]: the device's DMA mappings and how to move a range of them;
//! - [`admin_check`]: validation of the guest's admin commands where the hypervisor relays them;
//! - [`admin_guard`]: the guest's admin SQ while shadowed: the device fetches only checked
//!   entries; the ranges no guest data address may point into;
//! - [`attach`]: wiring it all into a VM, plus the watchdog;
//! - [`identity`]: the hypervisor's own Identify of the device (the validator's limits);
//! - [`host_client`]: a host-side NVMe driver over vfio-user (benchmark baseline, replay);
//! - [`replay`]: rebuilding a device from a configuration log through the guest's admin ring;
//! - [`vfio_user`]: Ferry's own vfio-user client (deadlines, error replies honoured);
//! - [`virtio_net`]: the second device class, a virtio-net NIC in direct passthrough.
#![deny(missing_docs)]

pub mod admin_check;
pub mod admin_guard;
pub mod attach;
pub mod bar;
pub mod client;
pub mod config_log;
pub mod dma_layout;
mod error;
pub mod guest_remap;
pub mod hooks;
pub mod host_client;
pub mod identity;
pub mod msix;
pub mod pci;
pub mod replay;
pub mod vfio_user;
pub mod virtio_net;
pub mod virtio_net_shadow;

pub use attach::{AttachOptions, Attachment};
pub use config_log::ConfigLog;
pub use error::{Error, HookError, Result, StateError};
pub use hooks::{DeviceBacking, DeviceHooks, DoorbellMode, GuestBacking};

//! The contract between Ferry's VMM and its built-in guest.
//!
//! Everything both sides must agree on lives here, written once: the guest-physical memory
//! layout, the I/O ports the guest uses to talk to the VMM, and the boot parameter block the VMM
//! writes into guest memory before the first instruction runs. The crate is `no_std` so that the
//! freestanding guest and the hypervisor compile the very same definitions.
#![no_std]
#![deny(missing_docs)]

pub mod bench;
pub mod layout;
pub mod params;
pub mod ports;

pub use params::{rdma_mode, BootParams, NvmeArgs, RdmaArgs, Workload, WorkloadArgs};

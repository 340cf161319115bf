//! Ferry's VMM core: a KVM VM with guest RAM on a memfd, vCPU threads running the built-in
//! guest in 64-bit ring 3, port-IO and MMIO buses, a 16550 console, Ferry's control port, a PCI
//! host bridge with configuration mechanism #1, and state save/restore for migration.
#![deny(missing_docs)]

pub mod bus;
pub mod devices;
mod error;
pub mod exit_cost;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod loader;
pub mod memory;
pub mod memslots;
pub mod pci;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use error::{Error, ErrorChain, Result};
pub use lifecycle::VmOutcome;
pub use vm::{open_kvm, Vm, VmConfig};

//! NVMe definitions written once for the built-in guest's driver, the stand-in controller and
//! the VMM's admin mediation (NVM Express Base Specification 1.4 / 2.0 layouts).
//!
//! Everything here is `no_std` and allocation free. [`queue`] also holds a polled queue-pair
//! driver that works on raw pointers, shared by the guest driver and the host-side client.
#![no_std]
#![deny(missing_docs)]

pub mod entry;
#[doc(hidden)]
pub mod fuzz_records;
pub mod identify;
pub mod opcode;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod status;

pub use entry::{Cqe, Sqe};
pub use status::Status;

/// The memory page size every party uses (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;

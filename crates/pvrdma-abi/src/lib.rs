//! VMware's PVRDMA device ABI, as Linux's `vmw_pvrdma` driver and rdma-core's provider define
//! it (`drivers/infiniband/hw/vmw_pvrdma/pvrdma_dev_api.h`, `pvrdma_verbs.h`, `pvrdma_ring.h`,
//! `include/uapi/rdma/vmw_pvrdma-abi.h`): the subset Ferry's virtual RDMA device and its guest
//! driver use, written once.
//!
//! Every layout is `#[repr(C)]` with explicit reserved fields and derives zerocopy's
//! `IntoBytes`/`FromBytes`, so the compiler refuses implicit padding and any byte pattern a
//! guest writes is a valid value (validation of the *meaning* is the device's job). Sizes and
//! field offsets are tested against the values the Linux headers give.
//!
//! All integers are little-endian (x86), as on the real device; GIDs are 16 raw bytes in
//! network order.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![no_std]

pub mod cmd;
pub mod consts;
pub mod dsr;
pub mod ring;
pub mod verbs;
pub mod wqe;

pub use cmd::*;
pub use consts::*;
pub use dsr::*;
pub use ring::*;
pub use verbs::*;
pub use wqe::*;

pub use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

#[cfg(test)]
mod tests;

//! Ferry's virtual RDMA device.
//!
//! A guest-facing PCI function that follows VMware's PVRDMA device ABI ([`pvrdma_abi`]):
//! BAR1 registers, BAR2 UAR doorbell page, device shared region, command and response slots,
//! page directories, async ring, QP/CQ rings. The subset Ferry needs is implemented (query
//! port/P_Key, PD, MR including DMA regions, CQ, GSI, UD and RC QPs, modify QP through
//! RESET → INIT → RTR → RTS ⇄ SQD and to ERR, CREATE_BIND/DESTROY_BIND, post send/receive,
//! completions); every other command is answered with `EOPNOTSUPP`. RC queue pairs run on
//! crates/rdma's RC transport over regions of guest memory ([`device::rc`]).
//!
//! - [`device::Device`] — registers, commands, object tables, data path; all guest input
//!   validated ([`mem`] checks every address against guest RAM and walks page directories with
//!   bounds).
//! - [`backend::RdmaBackend`] — what the device needs from the host: GID registration and the
//!   checked QP1 path of the CM multiplexer, UD and RC queue pairs on the software RoCEv2 port.
//!   Inbound MADs arrive through [`backend::MadInbox`], the multiplexer's callback target.
//! - [`attach`] — the PCI function in a KVM VM and the device thread.
#![deny(missing_docs)]
pub mod attach;
pub mod backend;
pub mod device;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod mem;

pub use attach::{attach, VrdmaHandle, DEFAULT_BAR_BASE};
pub use backend::{MadInbox, PortRcQueue, RcQueue, RdmaBackend, UdDatagram, UdOut, UdQueue};
pub use device::{Device, DeviceState, DeviceStats};
pub use error::{BackendError, BackendErrorKind, VrdmaError};
pub use mem::{GuestMemory, VecMemory};

#[cfg(test)]
mod tests;

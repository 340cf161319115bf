//! Ferry's VMM library: the lifetime of one VM behind a typed command interface.
//!
//! - [`session::run`] builds a VM, attaches its devices (a passthrough NVMe device through
//!   [`passthrough`], a virtual RDMA device through [`vrdma_host`]), boots the guest and hands
//!   it to the supervisor; the migration destination builds its VM from the stream and hands
//!   it to the same supervisor.
//! - [`supervisor::supervise`] is the VM's event loop (epoll): the VM's end, commands
//!   ([`command::Request`] from any [`command::CommandSource`] — the `ferry` binary's HTTP API
//!   is one), process signals, deadlines, and a live migration on a worker thread that a stop
//!   or `cancel-migration` cancels before its commit point.
//! - Reports are plain serde structs ([`session::SessionReport`]).
//!
//! The `ferry` binary is a thin shell over this crate: argument parsing, the HTTP transport of
//! the commands, the benchmarks and the demo. Nothing here parses a command line or prints to
//! stdout; progress and outcomes reach callers as values and `tracing` events, and a few lines
//! on stderr for the operator of a paused-after-Go VM.
#![deny(missing_docs)]

pub mod command;
mod error;
pub mod net_session;
pub mod passthrough;
pub mod scratch;
pub mod session;
pub mod signals;
pub mod supervisor;
pub mod vrdma_host;

pub use error::{Error, Result};

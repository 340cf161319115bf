//! Live migration of Ferry VMs: pre-copy over TCP with KVM dirty logging.
//!
//! The source ([`migrate`]) sends all non-zero memory in round 0, then the pages dirtied since
//! the previous round (KVM's dirty log, pages the VMM wrote itself, pages devices report) until
//! the rest fits the downtime target at the bandwidth measured so far or a round limit is hit;
//! then it pauses the vCPUs, sends the last pages, the vCPU/VM state and device states. The
//! destination ([`receive`]) restores everything, says Ready, and runs the VM only after the
//! source's Go; it reports Resumed, and the source lets go. Any failure before Go leaves the
//! VM running on the source and never runs it on the destination.
#![deny(missing_docs)]

mod channels;
pub mod compress;
pub mod cpu;
pub mod destination;
pub mod device;
mod dirty;
mod error;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod report;
pub mod source;
mod splice;
pub mod transport;
pub mod wire;

pub use compress::Compression;
pub use destination::{
    accept, listen, receive, receive_accepted, Accepted, DestinationOptions, Incoming, Strangers,
};
pub use device::{BoxError, DeviceError, DeviceRestorer, MigratableDevice, NoDevices};
pub use error::{chain, MigrationError, Result};
pub use report::{MigrationReport, Progress, ReceiveReport, RoundReport};
pub use source::{migrate, CancelToken, LimitPolicy, Outcome, SourceOptions};
pub use transport::{Security, TlsFiles, TlsIdentity};
pub use vmm::ErrorChain;

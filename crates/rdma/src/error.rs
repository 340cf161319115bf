//! The crate's error type.
use std::net::Ipv4Addr;

use rdma_wire::{Gid, WireError};

/// Everything that can fail in the port, the CM endpoint and the multiplexer. Each message
/// says what failed and with which value.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// A socket operation failed.
    #[error("{what} failed")]
    Io {
        /// What was being done (with the address).
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A wire-format error.
    #[error("wire format")]
    Wire(#[from] WireError),
    /// A GID that is not an IPv4-mapped address cannot be reached over this transport.
    #[error("GID {0} has no IPv4 address; the port carries RoCEv2 over IPv4 only")]
    NotIpv4(Gid),
    /// The port cannot take packets for a GID: binding its address failed (not an address
    /// of this host, or another process's port has it).
    #[error("cannot receive for GID {gid} (binding {addr}:{port})")]
    BindGid {
        /// The GID.
        gid: Gid,
        /// Its address.
        addr: Ipv4Addr,
        /// The UDP port.
        port: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A send from a GID the port has not claimed (it cannot be the IP source).
    #[error("GID {0} is not an address of this port")]
    NotLocalGid(Gid),
    /// A QPN that no queue pair uses.
    #[error("no queue pair {0:#x}")]
    NoSuchQp(u32),
    /// The GID is owned by another VM.
    #[error("GID {gid} is already registered to VM {owner}")]
    GidOwned {
        /// The GID.
        gid: Gid,
        /// Its owner.
        owner: u32,
    },
    /// The all-zero GID cannot be registered.
    #[error("GID {0} cannot be registered (zero GID)")]
    InvalidGid(Gid),
    /// An operation named a VM the multiplexer does not know.
    #[error("unknown VM {0}")]
    UnknownVm(u32),
    /// A VM added twice.
    #[error("VM {0} is already attached")]
    VmExists(u32),
    /// A GID outside the set the host configured for the VM.
    #[error("GID {gid} is not one the host allows VM {vm} to own")]
    GidNotAllowed {
        /// The GID.
        gid: Gid,
        /// The VM that asked.
        vm: u32,
    },
    /// Unregistering a GID the VM does not own.
    #[error("GID {gid} is not registered to VM {vm}")]
    NotOwner {
        /// The GID.
        gid: Gid,
        /// The VM that asked.
        vm: u32,
    },
    /// An outbound QP1 send refused by the multiplexer.
    #[error("send from VM {vm} refused: {reason}")]
    Refused {
        /// The VM.
        vm: u32,
        /// Why (spoofed source GID, class not allowed, malformed MAD, ...).
        reason: String,
    },
    /// A CM operation failed.
    #[error("CM: {0}")]
    Cm(String),
    /// A CM operation timed out.
    #[error("CM {what} timed out after {retries} retries")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// Retries done.
        retries: u8,
    },
    /// The peer rejected a connection.
    #[error("CM connection rejected by {gid}: reason {reason}")]
    Rejected {
        /// The rejecting GID.
        gid: Gid,
        /// The REJ reason code.
        reason: u16,
    },
    /// A SIDR request answered with a non-success status.
    #[error("SIDR request to {gid} for service {service_id:#x} answered with status {status}")]
    SidrStatus {
        /// The GID asked.
        gid: Gid,
        /// The service ID.
        service_id: u64,
        /// SIDR_REP status.
        status: u8,
    },
    /// A pcap file could not be written.
    #[error("pcap {path}")]
    Pcap {
        /// File.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A host configuration that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// No host address for an IPv4 GID (never happens with the default route to itself).
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
}

impl RdmaError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> RdmaError {
        RdmaError::Io {
            what: what.into(),
            source,
        }
    }
}

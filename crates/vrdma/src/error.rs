//! Errors of the virtual RDMA device.
use pvrdma_abi::errno;

/// What went wrong; every variant names the failing value. Command failures map to the ABI's
/// errno values with [`VrdmaError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum VrdmaError {
    /// A guest address range is not guest RAM.
    #[error("guest address {gpa:#x} (+{len:#x}) is outside guest RAM")]
    BadAddress {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A guest address is not page aligned where a page is required.
    #[error("guest address {0:#x} is not page aligned")]
    Unaligned(u64),
    /// A field has an invalid value.
    #[error("{field} = {value:#x} is invalid: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// The value.
        value: u64,
        /// Why.
        why: &'static str,
    },
    /// A handle names no object of this VM.
    #[error("no {kind} with handle {handle}")]
    NoSuchObject {
        /// Object kind.
        kind: &'static str,
        /// The handle.
        handle: u32,
    },
    /// An object table is full.
    #[error("{kind} table is full ({max} objects)")]
    TableFull {
        /// Object kind.
        kind: &'static str,
        /// Limit.
        max: usize,
    },
    /// An object is still in use.
    #[error("{kind} {handle} is in use")]
    Busy {
        /// Object kind.
        kind: &'static str,
        /// The handle.
        handle: u32,
    },
    /// The command is not part of the subset this device implements.
    #[error("command {0:#x} is not supported")]
    Unsupported(u32),
    /// The device is not active (no shared region yet).
    #[error("the device is not active")]
    NotActive,
    /// The backend (multiplexer, RoCEv2 port) refused.
    #[error("backend refused")]
    Backend(#[from] BackendError),
    /// VMM failure while attaching.
    #[error("attaching the device")]
    Vmm(#[from] vmm::Error),
    /// Host resource failure.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl VrdmaError {
    /// The ABI's error value for this failure.
    pub fn errno(&self) -> u8 {
        match self {
            VrdmaError::BadAddress { .. } | VrdmaError::Unaligned(_) => errno::EFAULT,
            VrdmaError::Invalid { .. } => errno::EINVAL,
            VrdmaError::NoSuchObject { .. } => errno::ENOENT,
            VrdmaError::TableFull { .. } => errno::ENOMEM,
            VrdmaError::Busy { .. } => errno::EBUSY,
            VrdmaError::Unsupported(_) => errno::EOPNOTSUPP,
            VrdmaError::NotActive => errno::EINVAL,
            VrdmaError::Backend(b) => match b.kind {
                BackendErrorKind::AddressInUse => errno::EADDRINUSE,
                BackendErrorKind::Refused => errno::EPERM,
                BackendErrorKind::Failed => errno::EINVAL,
            },
            VrdmaError::Vmm(_) | VrdmaError::Io { .. } => errno::ENOMEM,
        }
    }
}

/// Kinds of backend failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The GID is registered to another VM.
    AddressInUse,
    /// A policy check refused the operation (spoofed source, class not allowed).
    Refused,
    /// Anything else (socket error, unknown QP).
    Failed,
}

/// A backend failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Kind.
    pub kind: BackendErrorKind,
    /// What the backend said.
    pub message: String,
}

impl BackendError {
    /// A failure of `kind`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
        BackendError {
            kind,
            message: message.into(),
        }
    }
}

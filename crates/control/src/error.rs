//! Errors of the VMM library. Each Display says what failed; the cause is the `source`, never
//! repeated in the text (print the chain with `vmm::ErrorChain`).
use std::path::PathBuf;

/// What can go wrong running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VMM core operation failed.
    #[error("{what}")]
    Vmm {
        /// What was being done.
        what: &'static str,
        /// The VMM's error.
        #[source]
        source: vmm::Error,
    },
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Encoding or decoding saved state failed.
    #[error("{what}")]
    Encoding {
        /// What was being done.
        what: &'static str,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// The passthrough device could not be attached or used.
    #[error("{what}")]
    Passthrough {
        /// What was being done.
        what: &'static str,
        /// The attachment's error.
        #[source]
        source: passthrough::Error,
    },
    /// The device process did not come up.
    #[error("device process `{}`: {reason}", exe.display())]
    DeviceProcess {
        /// The program.
        exe: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The software RoCEv2 port or its multiplexer failed.
    #[error("{what}")]
    Rdma {
        /// What was being done.
        what: String,
        /// The RDMA error.
        #[source]
        source: rdma::RdmaError,
    },
    /// The virtual RDMA device failed.
    #[error("{what}")]
    Vrdma {
        /// What was being done.
        what: &'static str,
        /// The device's error.
        #[source]
        source: vrdma::VrdmaError,
    },
    /// The shadow engine could not be set up.
    #[error("{what}")]
    Shadow {
        /// What was being done.
        what: &'static str,
        /// The engine's error (boxed: it is large).
        #[source]
        source: Box<shadow::Error>,
    },
    /// This combination of features is not supported (yet).
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn vmm(what: &'static str) -> impl FnOnce(vmm::Error) -> Error {
        move |source| Error::Vmm { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Result of the VMM library.
pub type Result<T> = std::result::Result<T, Error>;

//! Errors of the stand-in NIC.
use std::{io, path::PathBuf};

/// What can go wrong setting up or running the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap device could not be opened or configured.
    #[error("tap device {name}")]
    Tap {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A configuration value is unusable.
    #[error("invalid device configuration: {0}")]
    Config(String),
    /// An OS resource (eventfd, thread) could not be made.
    #[error("{what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The vfio-user server failed.
    #[error("vfio-user server on {path}")]
    VfioUser {
        /// Socket path.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: vfio_user::Error,
    },
}

/// Result of the device crate.
pub type Result<T> = std::result::Result<T, Error>;

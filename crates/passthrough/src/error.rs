//! Errors of the passthrough attachment.

/// What can go wrong attaching or driving a passthrough device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the device's socket failed.
    #[error("cannot connect to passthrough device {name} at {socket}: {source}")]
    Connect {
        /// Device name.
        name: String,
        /// Socket path.
        socket: String,
        /// The library's error.
        #[source]
        source: vfio_user::Error,
    },
    /// A vfio-user request failed (the device is gone or misbehaves).
    #[error("passthrough device {name}: {what} failed: {source}")]
    Request {
        /// Device name.
        name: String,
        /// The request.
        what: String,
        /// The library's error.
        #[source]
        source: vfio_user::Error,
    },
    /// The device is not what Ferry can attach.
    #[error("passthrough device {name}: {reason}")]
    Unsupported {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A VMM operation (memory slot, bus, PCI slot) failed.
    #[error("passthrough device {name}: {what}: {source}")]
    Vmm {
        /// Device name.
        name: String,
        /// What was attempted.
        what: String,
        /// The VMM's error.
        #[source]
        source: vmm::Error,
    },
    /// An OS call failed.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A hook was asked for something outside what the device has.
    #[error("passthrough device {name}: {reason}")]
    Hook {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Result of the passthrough crate.
pub type Result<T> = std::result::Result<T, Error>;

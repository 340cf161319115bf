//! Errors of the migration engine.
use std::io;

/// What can end a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Connecting, reading or writing the migration stream failed.
    #[error("migration connection {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer does not speak Ferry's migration protocol.
    #[error("peer is not a Ferry migration endpoint (magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The peer speaks another version of the protocol.
    #[error("peer speaks migration protocol version {theirs}, this Ferry speaks {ours}")]
    Version {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// A message violates the protocol (length, checksum, address, order).
    #[error("invalid migration stream: {0}")]
    Protocol(String),
    /// The peer gave up and said why.
    #[error("peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The VM cannot be migrated (as configured).
    #[error("cannot migrate this VM: {0}")]
    NotMigratable(String),
    /// Pre-copy did not converge within the round limit and the policy says abort.
    #[error("memory did not converge in {rounds} rounds ({remaining} pages still dirty); aborted as asked")]
    NoConvergence {
        /// Rounds run.
        rounds: u32,
        /// Dirty pages left.
        remaining: u64,
    },
    /// A VMM operation failed (pause, state save or restore, dirty log).
    #[error("VMM")]
    Vmm(#[from] vmm::Error),
    /// A device failed its part.
    #[error("device {name}")]
    Device {
        /// The device.
        name: String,
        /// What happened.
        #[source]
        source: crate::device::DeviceError,
    },
    /// TLS failed (handshake, certificate verification, configuration).
    #[error("TLS {what}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// A TLS certificate, key or CA file is unusable.
    #[error("TLS file {}: {reason}", path.display())]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A value from the stream exceeds a limit this destination set (checked before use).
    #[error("refused: {0}")]
    Limit(String),
    /// Compressed guest memory that does not decode to exactly what its header announced
    /// (corrupt, or a decompression bomb): refused before anything past the bound is written.
    #[error("compressed memory refused: {0}")]
    Compressed(String),
    /// The migration was cancelled before Go (the VM keeps running on the source).
    #[error("migration cancelled")]
    Cancelled,
    /// Encoding or decoding state failed.
    #[error("state encoding: {0}")]
    Encoding(String),
}

impl MigrationError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
        move |source| MigrationError::Io { what, source }
    }
}

/// An error and its causes on one line, each printed once (`a: b: c`): [`vmm::ErrorChain`]
/// as a string.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    vmm::ErrorChain(e).to_string()
}

/// Result of the migration engine.
pub type Result<T> = std::result::Result<T, MigrationError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceError, ErrorChain};

    fn device_failure() -> MigrationError {
        let os = io::Error::new(io::ErrorKind::BrokenPipe, "socket went away");
        MigrationError::Device {
            name: "nvme0".into(),
            source: DeviceError::failed(
                "rebuilding the device",
                vmm::Error::Io {
                    what: "mapping the doorbell page".into(),
                    source: os,
                },
            ),
        }
    }

    #[test]
    fn the_chain_shows_each_cause_exactly_once() {
        let e = device_failure();
        let text = ErrorChain(&e).to_string();
        assert_eq!(
            text,
            "device nvme0: rebuilding the device: mapping the doorbell page: socket went away"
        );
        for part in [
            "nvme0",
            "rebuilding the device",
            "doorbell page",
            "went away",
        ] {
            assert_eq!(text.matches(part).count(), 1, "{part} in {text}");
        }
    }

    #[test]
    fn no_display_repeats_its_source() {
        let errors = [
            device_failure(),
            MigrationError::Io {
                what: "read",
                source: io::Error::other("connection reset"),
            },
            MigrationError::Vmm(vmm::Error::Io {
                what: "KVM_RUN".into(),
                source: io::Error::other("interrupted"),
            }),
        ];
        for e in &errors {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(c) = cur {
                if let Some(s) = c.source() {
                    assert!(
                        !c.to_string().contains(&s.to_string()),
                        "{c} repeats its source {s}"
                    );
                }
                cur = c.source();
            }
        }
    }
}

//! Errors of the VMM core.
use std::io;

/// Everything that can go wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` is missing or not usable.
    #[error(
        "cannot open /dev/kvm (Ferry needs KVM: /dev/kvm must exist and be readable and \
         writable by this user: run as root or join the kvm group)"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {0} is not supported (Ferry needs version 12)")]
    KvmApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The requested amount of guest RAM cannot be used.
    #[error("guest memory size {size} bytes is invalid: {reason}")]
    MemorySize {
        /// The size asked for.
        size: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The memfd backing guest RAM could not be created or sized.
    #[error("cannot create the {size}-byte guest RAM memfd")]
    Memfd {
        /// Size of guest RAM.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mapping guest RAM into the VMM failed.
    #[error("cannot map guest RAM: {0}")]
    MapGuestMemory(String),
    /// A guest-memory access by the VMM fell outside guest RAM.
    #[error("guest memory access at {addr:#x} ({len} bytes) failed: {reason}")]
    GuestMemory {
        /// Guest-physical address.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// vm-memory's explanation.
        reason: String,
    },
    /// The guest image is not an ELF Ferry can load.
    #[error("invalid guest image: {0}")]
    GuestImage(String),
    /// Two devices claim overlapping bus ranges.
    #[error("{bus} range {base:#x}..{end:#x} overlaps an existing device at {other:#x}")]
    BusOverlap {
        /// "pio" or "mmio".
        bus: &'static str,
        /// Start of the new range.
        base: u64,
        /// End of the new range (exclusive).
        end: u64,
        /// Start of the range it collides with.
        other: u64,
    },
    /// No PCI slot left, or the slot is taken.
    #[error("PCI slot {0} is not available")]
    PciSlot(u8),
    /// A vCPU thread could not be spawned or stopped answering.
    #[error("vCPU {id}: {reason}")]
    Vcpu {
        /// vCPU index.
        id: usize,
        /// What happened.
        reason: String,
    },
    /// A saved state does not fit this VM.
    #[error("state does not fit this VM: {0}")]
    StateMismatch(String),
    /// An I/O error with context.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// Shows an error and each of its causes once, separated by ": " (anyhow's `{:#}` layout):
/// for messages that leave the process or its log as one line (the binary's last word, an
/// abort message to a peer, a JSON report, a log line). Ferry's errors never repeat their
/// source's text; a cause whose text the error before it already ends with (an error of
/// another crate that prints its source) is left out, so each cause shows exactly once.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            cause = c.source();
        }
        Ok(())
    }
}

/// Result of the VMM core.
pub type Result<T> = std::result::Result<T, Error>;

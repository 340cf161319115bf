//! Errors of the shadow engine.

/// What can go wrong while shadowing a device's rings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ring does not fit the rules (size, alignment, inside guest RAM).
    #[error("queue {qid}: {reason}")]
    BadQueue {
        /// Queue identifier.
        qid: u16,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing one of the two buffers failed (address outside guest RAM).
    #[error("{buffer} buffer access at {gpa:#x} ({len} bytes) failed")]
    Access {
        /// "vCPU" or "device".
        buffer: &'static str,
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: usize,
    },
    /// The queue cannot be brought back in line with the guest's positions.
    #[error("queue {qid}: cannot re-align: {reason}")]
    Realign {
        /// Queue identifier.
        qid: u16,
        /// Why.
        reason: String,
    },
    /// The engine could not do what was asked (memory, hooks, timeouts); the message says
    /// what and in which state the VM was left.
    #[error("shadow engine: {0}")]
    Engine(String),
    /// A hook of the passthrough attachment failed.
    #[error("shadow engine: {what}: {source}")]
    Hook {
        /// What the engine was doing.
        what: String,
        /// The attachment's error.
        #[source]
        source: passthrough::Error,
    },
    /// The VMM refused (pausing, resuming).
    #[error("shadow engine: {what}: {source}")]
    Vmm {
        /// What the engine was doing.
        what: String,
        /// The VMM's error.
        #[source]
        source: vmm::Error,
    },
}

/// Result of the shadow engine.
pub type Result<T> = std::result::Result<T, Error>;

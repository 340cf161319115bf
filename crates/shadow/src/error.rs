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
}

/// Result of the shadow engine.
pub type Result<T> = std::result::Result<T, Error>;

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
    #[error("shadow engine: {what}")]
    Hook {
        /// What the engine was doing.
        what: String,
        /// The attachment's error.
        #[source]
        source: passthrough::Error,
    },
    /// The VMM refused (pausing, resuming).
    #[error("shadow engine: {what}")]
    Vmm {
        /// What the engine was doing.
        what: String,
        /// The VMM's error.
        #[source]
        source: vmm::Error,
    },
    /// The OS refused (memory for copies, eventfds, threads).
    #[error("shadow engine: {what}")]
    Os {
        /// What the engine was doing.
        what: String,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
    /// A saved device state (from a migration stream) is refused.
    #[error("saved device state refused")]
    State(#[from] StateError),
}

/// What is wrong with a saved device state. It arrives from the network, so everything in it
/// is checked against limits, against the VM's RAM and against the destination's device before
/// anything is allocated or mapped from it.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Fewer bytes than the version header.
    #[error("{len} bytes, shorter than the version header")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// More bytes than any state of a supported device needs.
    #[error("{len} bytes, more than the {max} accepted")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Another version of the format.
    #[error("version {found}, this build reads {expected}")]
    Version {
        /// Version received.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The bytes do not decode.
    #[error("does not decode")]
    Decode(#[source] postcard::Error),
    /// Encoding failed (source side).
    #[error("does not encode")]
    Encode(#[source] postcard::Error),
    /// Queue states and doorbell values do not pair up.
    #[error("{queues} queue states but {doorbells} doorbell pairs")]
    Doorbells {
        /// Queue states.
        queues: usize,
        /// Doorbell pairs.
        doorbells: usize,
    },
    /// More queues than the limit.
    #[error("{count} shadowed queues, more than the {max} accepted")]
    QueueCount {
        /// Queues.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// The same queue twice.
    #[error("queue {qid} appears twice")]
    DuplicateQueue {
        /// Queue id.
        qid: u16,
    },
    /// A queue id outside 1..=max.
    #[error("queue id {qid} is outside 1..={max}")]
    QueueId {
        /// Queue id.
        qid: u16,
        /// Largest accepted.
        max: u16,
    },
    /// A ring size outside what NVMe and the destination's device allow.
    #[error("queue {qid}: {ring} of {entries} entries is outside 2..={max}")]
    QueueSize {
        /// Queue id.
        qid: u16,
        /// "SQ" or "CQ".
        ring: &'static str,
        /// Entries.
        entries: u32,
        /// Largest accepted.
        max: u32,
    },
    /// A ring that overflows, is misaligned or leaves guest RAM.
    #[error(
        "queue {qid}: {ring} at {base:#x} ({len:#x} bytes) is not page aligned inside guest RAM"
    )]
    Ring {
        /// Queue id.
        qid: u16,
        /// "SQ" or "CQ".
        ring: &'static str,
        /// Guest-physical base.
        base: u64,
        /// Bytes.
        len: u64,
    },
    /// Two rings share memory.
    #[error("queue {qid}'s {ring} overlaps another ring")]
    RingsOverlap {
        /// Queue id.
        qid: u16,
        /// "SQ" or "CQ".
        ring: &'static str,
    },
    /// A position or doorbell value outside its ring.
    #[error("queue {qid}: {what} {value} is outside a ring of {entries} entries")]
    Index {
        /// Queue id.
        qid: u16,
        /// Which position.
        what: &'static str,
        /// Its value.
        value: u32,
        /// Ring entries.
        entries: u32,
    },
    /// A queue the configuration log does not have (or has elsewhere).
    #[error("queue {qid} does not match the configuration log's queue of that id")]
    NotInLog {
        /// Queue id.
        qid: u16,
    },
    /// A counter so large that counting on would overflow.
    #[error("queue {qid}: counter {what} is {value}, more than {max}")]
    Counter {
        /// Queue id.
        qid: u16,
        /// Which counter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The configuration log has a queue pair the state does not carry.
    #[error("the configuration log's queue {qid} has no saved state")]
    MissingQueue {
        /// Queue id.
        qid: u16,
    },
    /// The validator limits disagree with what the configuration log implies.
    #[error("validator limits {saved:?} disagree with the configuration log's {derived:?}")]
    Limits {
        /// Limits sent.
        saved: crate::nvme::validate::Limits,
        /// Limits the log implies.
        derived: crate::nvme::validate::Limits,
    },
    /// The configuration log implies no usable limits.
    #[error("the configuration log has no usable namespace or MDTS")]
    NoLimits(#[source] Box<Error>),
    /// The configuration log's I/O queues cannot be shadowed (none, or not in pairs).
    #[error("the configuration log's I/O queues cannot be shadowed")]
    Unshadowable(#[source] Box<Error>),
    /// The source device's doorbell stride differs from this one's (the guest's doorbell
    /// offsets would not match).
    #[error("the source device has doorbell stride {saved}, this one {device}")]
    Dstrd {
        /// Stride exponent sent.
        saved: u8,
        /// This device's.
        device: u8,
    },
    /// A queue whose doorbells lie outside BAR0.
    #[error("queue {qid}'s doorbells at {offset:#x} lie outside BAR0 ({bar0_size:#x} bytes)")]
    DoorbellOutsideBar {
        /// Queue id.
        qid: u16,
        /// Offset of the CQ head doorbell.
        offset: u64,
        /// BAR0 size.
        bar0_size: u64,
    },
    /// The hypervisor memory the state asks for (ring copies, bounce areas) exceeds the limit.
    #[error("{what} would take {bytes} bytes, more than the {max} accepted")]
    Memory {
        /// Which memory.
        what: &'static str,
        /// Bytes (saturated).
        bytes: u64,
        /// Limit.
        max: u64,
    },
    /// The configuration log or MSI-X table is refused.
    #[error("device configuration refused")]
    Config(#[source] passthrough::StateError),
}

/// Result of the shadow engine.
pub type Result<T> = std::result::Result<T, Error>;

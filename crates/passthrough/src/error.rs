//! Errors of the passthrough attachment.

/// What can go wrong attaching or driving a passthrough device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the device's socket failed.
    #[error("cannot connect to passthrough device {name} at {socket}")]
    Connect {
        /// Device name.
        name: String,
        /// Socket path.
        socket: String,
        /// The client's error.
        #[source]
        source: crate::vfio_user::ClientError,
    },
    /// A vfio-user request failed (the device is gone or misbehaves).
    #[error("passthrough device {name}: {what} failed")]
    Request {
        /// Device name.
        name: String,
        /// The request.
        what: String,
        /// The client's error.
        #[source]
        source: crate::vfio_user::ClientError,
    },
    /// The device is not what Ferry can attach.
    #[error("passthrough device {name}: {reason}")]
    Unsupported {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The hypervisor's own NVMe driver (configuration replay, host client) failed.
    #[error("passthrough device {name}: {what}")]
    Driver {
        /// Device name.
        name: String,
        /// What the driver was doing.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: nvme_spec::queue::DriverError,
    },
    /// A VMM operation (memory slot, bus, PCI slot) failed.
    #[error("passthrough device {name}: {what}")]
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
    #[error("{what}")]
    Os {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A hook was asked for something outside what the device or the VM has.
    #[error("passthrough device {name}")]
    Hook {
        /// Device name.
        name: String,
        /// What was refused.
        #[source]
        source: HookError,
    },
    /// State from another host (configuration log, MSI-X table) does not fit this device or VM.
    #[error("passthrough device {name}: the state to restore is invalid")]
    InvalidState {
        /// Device name.
        name: String,
        /// What is wrong with it.
        #[source]
        source: StateError,
    },
}

/// Why a hook of the attachment refused a request.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A guest-physical range is not whole pages.
    #[error("range {gpa:#x}+{size:#x} is not page aligned")]
    NotPageAligned {
        /// Start.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// A range is not inside one region of guest RAM (or overflows).
    #[error("range {gpa:#x}+{size:#x} is not inside one guest RAM region")]
    NotInRam {
        /// Start.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// A host address to back guest memory with is not page aligned.
    #[error("host address {0:#x} is not page aligned")]
    HostNotAligned(u64),
    /// A remap would overlap one already in place.
    #[error("range {gpa:#x}+{size:#x} overlaps an existing remap")]
    OverlapsRemap {
        /// Start.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// Nothing is remapped at this guest-physical address.
    #[error("no remap at {0:#x}")]
    NoRemap(u64),
    /// The memory slot of a remap is gone.
    #[error("no memory slot backs the remap at {0:#x}")]
    NoRemapSlot(u64),
    /// An offset is not a page of BAR0.
    #[error("BAR0 offset {0:#x} is not a page of the BAR")]
    NotBarPage(u64),
    /// A BAR0 page the device did not offer for mapping.
    #[error("BAR0 page {0:#x} is not mappable")]
    BarPageNotMappable(u64),
    /// A DMA range is empty, unaligned or overflows.
    #[error("DMA range {iova:#x}+{size:#x} is not whole pages")]
    DmaNotPages {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// A DMA range the device does not have mapped (all of it).
    #[error("DMA range {iova:#x}+{size:#x} is not fully mapped for the device")]
    DmaNotMapped {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// Hypervisor memory for the device would overlap guest RAM (or overflows).
    #[error("hypervisor DMA range {iova:#x}+{size:#x} overlaps guest RAM")]
    HostDmaInRam {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// Asked to unmap guest RAM as if it were hypervisor memory.
    #[error("refusing to unmap guest RAM at {0:#x}")]
    UnmapGuestRam(u64),
    /// The admin SQ guard's swap mode moves the vCPUs' memory slots, which needs them.
    #[error("guarding the admin SQ at {0:#x} by a slot swap needs the VM's memory slots")]
    GuardNeedsSlots(u64),
    /// An MSI-X vector the device does not have.
    #[error("MSI-X vector {vector} does not exist ({count} vectors)")]
    NoVector {
        /// The vector.
        vector: u16,
        /// Vectors the device has.
        count: usize,
    },
    /// KVM refused to deliver an MSI.
    #[error("KVM_SIGNAL_MSI for vector {vector} ({address:#x}/{data:#x})")]
    SignalMsi {
        /// The vector.
        vector: u16,
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What is wrong with device state from another host (all of it comes from the network).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The admin queue registers do not describe a usable admin queue.
    #[error("admin queue of {sq} SQ / {cq} CQ entries (AQA {aqa:#x}) is outside 2..={max}")]
    AdminSize {
        /// AQA.
        aqa: u32,
        /// SQ entries.
        sq: u32,
        /// CQ entries.
        cq: u32,
        /// Largest size accepted.
        max: u32,
    },
    /// An admin ring is misaligned or not inside guest RAM.
    #[error("admin {ring} at {base:#x} ({len:#x} bytes) is not page aligned inside guest RAM")]
    AdminRing {
        /// "SQ" or "CQ".
        ring: &'static str,
        /// Guest-physical base.
        base: u64,
        /// Bytes.
        len: u64,
    },
    /// The guest's admin queue positions do not fit the admin queue.
    #[error("admin queue positions {sq_tail}/{cq_head} do not fit {sq} SQ / {cq} CQ entries")]
    AdminPositions {
        /// SQ tail.
        sq_tail: u32,
        /// CQ head.
        cq_head: u32,
        /// SQ entries.
        sq: u32,
        /// CQ entries.
        cq: u32,
    },
    /// More I/O queues than the limit.
    #[error("{count} I/O {kind}s, more than the {max} accepted")]
    TooManyQueues {
        /// "SQ" or "CQ".
        kind: &'static str,
        /// How many.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// A queue id outside 1..=max.
    #[error("I/O {kind} id {qid} is outside 1..={max}")]
    QueueId {
        /// "SQ" or "CQ".
        kind: &'static str,
        /// Queue id.
        qid: u16,
        /// Largest id accepted.
        max: u16,
    },
    /// A queue size outside what NVMe and the device allow.
    #[error("I/O {kind} {qid} has {entries} entries, outside 2..={max}")]
    QueueSize {
        /// "SQ" or "CQ".
        kind: &'static str,
        /// Queue id.
        qid: u16,
        /// Entries.
        entries: u32,
        /// Largest size accepted.
        max: u32,
    },
    /// A ring that is not page aligned, overflows, or leaves guest RAM.
    #[error("I/O {kind} {qid} at {base:#x} ({len:#x} bytes) is not page aligned inside guest RAM")]
    QueueRing {
        /// "SQ" or "CQ".
        kind: &'static str,
        /// Queue id.
        qid: u16,
        /// Guest-physical base.
        base: u64,
        /// Bytes (saturated on overflow).
        len: u64,
    },
    /// An SQ completing into a CQ that does not exist.
    #[error("I/O SQ {qid} completes into CQ {cqid}, which does not exist")]
    MissingCq {
        /// SQ id.
        qid: u16,
        /// CQ id.
        cqid: u16,
    },
    /// A CQ interrupting through a vector the device does not have.
    #[error("I/O CQ {qid} uses MSI-X vector {vector}; the device has {count}")]
    Vector {
        /// CQ id.
        qid: u16,
        /// Vector.
        vector: u16,
        /// Vectors of the device.
        count: usize,
    },
    /// A list longer than the log keeps.
    #[error("{what} has {count} entries, more than {max}")]
    TooLong {
        /// Which list.
        what: &'static str,
        /// Entries.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// A namespace block size that is not a power of two in 512..=64 KiB.
    #[error("namespace {nsid} has a block size of {block_size} bytes")]
    BlockSize {
        /// Namespace.
        nsid: u32,
        /// Block size.
        block_size: u32,
    },
    /// A counter so large that counting on would overflow.
    #[error("counter {what} is {value}, more than {max}")]
    Counter {
        /// Which counter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Largest accepted.
        max: u64,
    },
    /// An MSI-X table larger than the device's.
    #[error("MSI-X table of {entries} entries; the device has {count}")]
    MsixTable {
        /// Entries sent.
        entries: usize,
        /// Entries of the device.
        count: usize,
    },
}

/// Result of the passthrough crate.
pub type Result<T> = std::result::Result<T, Error>;

//! What the device did, printed when it exits.
use serde::Serialize;

/// Counters of one device process. Every hostile or broken thing a driver does has its own
/// counter; none of them stops the process.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Clients served (that sent at least one region access).
    pub connections: u64,
    /// Device resets (status 0 written, vfio-user reset, client gone).
    pub resets: u64,
    /// Times the driver reached DRIVER_OK.
    pub driver_ok: u64,
    /// Feature negotiations refused (features not offered, or no VERSION_1).
    pub bad_features: u64,
    /// Queue configurations refused at enable (size, alignment).
    pub bad_queue_config: u64,
    /// Notifications received.
    pub notifications: u64,
    /// Notifications naming no queue.
    pub bad_notifications: u64,
    /// Frames sent to the wire.
    pub tx_frames: u64,
    /// Bytes sent to the wire (frames without the virtio header).
    pub tx_bytes: u64,
    /// Frames received from the wire and delivered to the driver.
    pub rx_frames: u64,
    /// Bytes delivered to the driver (frames without the virtio header).
    pub rx_bytes: u64,
    /// Frames from the wire dropped: the driver's buffer was too small.
    pub rx_dropped: u64,
    /// TX chains that were not a frame (shorter than the header, longer than the limit).
    pub tx_bad_frames: u64,
    /// Wire send errors.
    pub wire_errors: u64,
    /// Descriptor chains refused (loops, indices out of range, bad indirect tables, order):
    /// the sum of the `chain_*` classes below.
    pub chain_errors: u64,
    /// Chains longer than the queue (or an indirect table): a loop.
    pub chain_loops: u64,
    /// Heads or `next` indices at or beyond the queue size (or the indirect table).
    pub chain_bad_index: u64,
    /// Indirect descriptors not negotiated, nested, chained, or with a bad table length.
    pub chain_bad_indirect: u64,
    /// Device-readable buffers after device-writable ones.
    pub chain_read_after_write: u64,
    /// Chains whose buffers add up to more than the queue's byte limit.
    pub chain_oversized: u64,
    /// Buffers that wrap around the 64-bit address space.
    pub chain_wrapping: u64,
    /// TX chains with a device-writable buffer (refused: nothing is sent).
    pub tx_writable_chains: u64,
    /// RX chains with a device-readable buffer (refused: the frame is dropped).
    pub rx_readonly_chains: u64,
    /// Zero-length buffers seen in accepted chains (legal, but counted).
    pub zero_length_buffers: u64,
    /// DMA accesses outside the client's mappings (rings or buffers outside guest RAM).
    pub dma_errors: u64,
    /// Available indices that jumped more than the queue size (queue stopped, needs reset).
    pub bad_avail_idx: u64,
    /// Interrupts signalled.
    pub interrupts: u64,
    /// MAC address announcements sent (one each time the driver started the device, when
    /// announcing is on).
    pub announcements: u64,
}

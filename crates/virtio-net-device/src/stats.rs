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
    /// Descriptor chains refused (loops, indices out of range, bad indirect tables, order).
    pub chain_errors: u64,
    /// DMA accesses outside the client's mappings.
    pub dma_errors: u64,
    /// Available indices that jumped more than the queue size (queue stopped, needs reset).
    pub bad_avail_idx: u64,
    /// Interrupts signalled.
    pub interrupts: u64,
}

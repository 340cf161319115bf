//! The one interface between the shadow engine and device knowledge.
//!
//! An adapter owns one pair of rings a guest and a device share: for NVMe a submission queue
//! and its completion queue; for a virtio split ring the descriptor table and available ring
//! (guest → device) and the used ring (device → guest). The engine owns the copies, the
//! designation (which copy the guest sees and which one the device DMAs), the doorbells and the
//! threads; the adapter owns the entry formats, validation, index and phase translation, and
//! the record of what is in flight.
use std::ops::Range;

use crate::{Buffers, Result};

/// Device knowledge of one shadowed ring pair.
pub trait RingAdapter: Send {
    /// Guest-physical ranges of ring memory the engine must copy and swap.
    fn ring_ranges(&self) -> Vec<Range<u64>>;

    /// The guest published new work (NVMe: the SQ tail doorbell value; virtio: the available
    /// index): validate each new entry in the vCPU buffer, record it, copy it into the device
    /// buffer. Returns the value to write to the device's doorbell, if it changed.
    fn on_guest_submit(&mut self, value: u32, bufs: &dyn Buffers) -> Result<Option<u32>>;

    /// The guest consumed completions (NVMe: the CQ head doorbell value; virtio has none).
    /// Returns the value for the device's doorbell, if it changed.
    fn on_guest_consume(&mut self, value: u32) -> Option<u32>;

    /// Moves completions the device posted in the device buffer into the vCPU buffer
    /// (translating indexes and phase), and appends to `dirty` the guest-physical pages the
    /// device wrote for the commands that completed. Returns how many were forwarded.
    fn forward_completions(&mut self, bufs: &dyn Buffers, dirty: &mut Vec<u64>) -> Result<usize>;

    /// Commands forwarded to the device and not completed yet.
    fn in_flight(&self) -> usize;

    /// Stops (true) or resumes (false) forwarding new submissions; held work stays in the
    /// vCPU buffer and is forwarded once the hold ends.
    fn hold(&mut self, on: bool);
}
